//! The DPO stage (`popen_train::dpo`) on a random tiny model with real preference shards:
//! P_t from collect-pt (offline corrector) and P_s of both phases from collect-ps (phase 1's
//! acceptance thresholds opened so every sample qualifies), 4 benchmark samples.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::backend::{Autodiff, NdArray};
use popen_core::shard::{read_shard, write_shard, SegPref, TextPref};
use popen_core::shardspec::ShardSpec;
use popen_model::bundle;
use popen_prefs::collect_ps::{self, AnnotationProposer, CollectPsConfig};
use popen_prefs::collect_pt::{self, CollectPtConfig};
use popen_prefs::select::Phase;
use popen_train::config::{Precision, StageConfig, Trainable};
use popen_train::dpo::{self, DpoConfig, DpoJob, ProposalSource};
use popen_train::TrainError;
use serde_json::Value;

type B = NdArray<f32>;
type AB = Autodiff<NdArray<f32>>;

struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    train: PathBuf,
    pt: PathBuf,
    ps1: PathBuf,
    ps2: PathBuf,
}

/// A random tiny model, 4 benchmark samples and the three preference shards collected with
/// that model (so it is the reference of the shards).
fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let (train, tok, mcfg) = super::small_world(&root);
        let m = mcfg.init::<B>(&Default::default()).unwrap();
        let model = root.join("sft-model");
        bundle::save(&model, &m, &tok).unwrap();
        let all = ShardSpec::new(0, 1).unwrap();
        let dev = Default::default();
        let lex = popen_core::lexicon::Lexicon::from_benchmark_json(
            &serde_json::to_string(&popen_data::synth::lexicon()).unwrap(),
        )
        .unwrap();
        let corrector = popen_prefs::corrector::OfflineCorrector::new(lex.clone());
        let pt = root.join("pt.parquet");
        let pcfg = CollectPtConfig { max_new_tokens: 24, resample: 2, ..Default::default() };
        collect_pt::run::<B>(&model, &train, &pt, &pcfg, &corrector, "offline", &lex, all, false, &dev).unwrap();
        // Three copies per sample (the fewest a record keeps): the forwards of a debug build
        // are the test's main cost.
        let mut c1 = CollectPsConfig { phase: Phase::One, perturbations: 3, batch_size: 3, ..Default::default() };
        c1.select.phase1_min_below = 10.0;
        c1.select.phase1_max_above = -10.0;
        c1.select.phase2_top = 3;
        let ps1 = root.join("ps-phase1.parquet");
        collect_ps::run::<B>(&model, &train, &ps1, &c1, &AnnotationProposer, all, false, &dev).unwrap();
        let mut c2 = CollectPsConfig { phase: Phase::Two, perturbations: 3, batch_size: 3, ..Default::default() };
        c2.select.phase2_top = 3;
        let ps2 = root.join("ps-phase2.parquet");
        collect_ps::run::<B>(&model, &train, &ps2, &c2, &AnnotationProposer, all, false, &dev).unwrap();
        assert_eq!(read_shard::<SegPref>(&ps1).unwrap().len(), 4);
        assert_eq!(read_shard::<SegPref>(&ps2).unwrap().len(), 4);
        assert!(read_shard::<TextPref>(&pt).unwrap().len() >= 3);
        World { _dir: dir, root, model, train, pt, ps1, ps2 }
    })
}

fn cfg() -> DpoConfig {
    DpoConfig {
        epochs: 100,
        max_steps: 4,
        batch_size: 2,
        seg_batch_size: 2,
        lr: 1e-3,
        warmup_steps: 0,
        trainable: Trainable::Full,
        precision: Precision::F32,
        checkpoint_every: 2,
        keep_checkpoints: 3,
        log_every: 1,
        ..DpoConfig::default()
    }
}

/// One step of 4 pairs with L_t alone (no Eq. 4, no mask loss).
fn text_only_one_step() -> DpoConfig {
    let mut c = DpoConfig { max_steps: 1, batch_size: 4, bce_weight: 0.0, dice_weight: 0.0, ..cfg() };
    c.ablation.no_seg_loss = true;
    c
}

/// Runs the stage with `c` into `root/name` (the world's shards unless replaced).
fn run_with(
    c: &DpoConfig,
    name: &str,
    pt: Option<&Path>,
    ps1: Option<&Path>,
    ps2: Option<&Path>,
    resume: bool,
) -> popen_train::Result<dpo::DpoReport> {
    let w = world();
    let out = w.root.join(name);
    let job = DpoJob {
        config: c,
        init: &w.model,
        pt: pt.unwrap_or(&w.pt),
        ps_phase1: ps1.unwrap_or(&w.ps1),
        ps_phase2: ps2.unwrap_or(&w.ps2),
        proposals: ProposalSource::Samples(&w.train),
        out: &out,
        resume,
        progress: false,
        sam_cache: None,
        allow_foreign_ref: false,
    };
    dpo::run::<AB>(&job, &Default::default())
}

fn run(c: &DpoConfig, name: &str) -> dpo::DpoReport {
    run_with(c, name, None, None, None, false).unwrap()
}

fn metrics(name: &str) -> Vec<Value> {
    let p = world().root.join(name).join("metrics.jsonl");
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn weights_of(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let b = bundle::open::<B>(dir, &Default::default()).unwrap();
    popen_model::weights::named_tensors(&b.model).into_iter().map(|(n, _, t)| (n, t)).collect()
}

/// (a) Text DPO on one fixed batch (all pairs, every step): at step 0 the policy is the
/// reference, so both rewards are ~0; the chosen-minus-rejected margin then grows.
#[test]
fn dpo_steps_raise_the_margin() {
    let n = read_shard::<TextPref>(&world().pt).unwrap().len();
    let mut c = cfg();
    c.batch_size = n;
    c.max_steps = 3;
    c.ablation.no_seg_loss = true;
    c.bce_weight = 0.0;
    c.dice_weight = 0.0;
    let r = run(&c, "margin");
    assert_eq!((r.steps, r.text_pairs, r.seg_records), (3, n, [0, 0]));
    let m = metrics("margin");
    assert_eq!(m.len(), 3);
    for k in ["rewards/chosen", "rewards/rejected", "rewards/margins"] {
        assert!(f(&m[0][k]).abs() < 1e-3, "step 0: {k} = {} (the policy is the reference)", m[0][k]);
    }
    let margins: Vec<f64> = m.iter().map(|r| f(&r["rewards/margins"])).collect();
    for w in margins.windows(2) {
        assert!(w[1] > w[0], "margins must grow on a fixed batch: {margins:?}");
    }
    assert!(f(&m[2]["rewards/accuracies"]) > 0.5, "{}", m[2]);
    assert!(f(&m[2]["loss/text"]) < f(&m[0]["loss/text"]));
    assert!(m[0]["loss/seg"].is_null() && m[0]["seg/indicator_off"].is_null());
    for k in ["logps/chosen", "logps/rejected"] {
        assert!(f(&m[0][k]) < 0.0, "{k}");
    }
}

/// Rewrites a P_s shard with `edit` applied to every record.
fn edited_ps(src: &Path, dst: &Path, edit: impl Fn(&mut SegPref)) -> PathBuf {
    let mut recs = read_shard::<SegPref>(src).unwrap();
    for r in recs.iter_mut() {
        edit(r);
    }
    write_shard(dst, recs).unwrap();
    dst.to_path_buf()
}

/// (b) The indicator: when every reference "best" score is below anything the policy's
/// median mask can reach (s-term >= -1, boundary IoU >= 0), every target is switched off:
/// the share is reported as 1 and Eq. 4 contributes nothing; when it is above, none is.
/// With `no_indicator`, the switched-off case counts every target again.
#[test]
fn dpo_indicator_switches_the_seg_term_off() {
    let w = world();
    let low = |r: &mut SegPref| {
        r.s_terms.iter_mut().for_each(|x| *x = -5.0);
        r.b_terms.iter_mut().for_each(|x| *x = -5.0);
    };
    let high = |r: &mut SegPref| {
        r.s_terms.iter_mut().for_each(|x| *x = 5.0);
        r.b_terms.iter_mut().for_each(|x| *x = 5.0);
    };
    let (l1, l2) =
        (edited_ps(&w.ps1, &w.root.join("low1.parquet"), low), edited_ps(&w.ps2, &w.root.join("low2.parquet"), low));
    let (h1, h2) = (
        edited_ps(&w.ps1, &w.root.join("high1.parquet"), high),
        edited_ps(&w.ps2, &w.root.join("high2.parquet"), high),
    );
    let mut c = cfg();
    c.max_steps = 2;
    c.seg_batch_size = 4;
    c.ablation.no_text_loss = true;
    run_with(&c, "ind-low", None, Some(&l1), Some(&l2), false).unwrap();
    run_with(&c, "ind-high", None, Some(&h1), Some(&h2), false).unwrap();
    let (ml, mh) = (metrics("ind-low"), metrics("ind-high"));
    for (k, (a, b)) in ml.iter().zip(&mh).enumerate() {
        assert_eq!(a["ps_phase"], (k + 1) as u64, "step {k} draws phase {}", k + 1);
        assert_eq!(f(&a["seg/indicator_off"]), 1.0, "{a}");
        assert_eq!(f(&a["loss/seg"]), 0.0, "{a}");
        assert!(f(&a["seg/targets"]) >= 4.0);
        assert_eq!(f(&b["seg/indicator_off"]), 0.0, "{b}");
        assert!(f(&b["loss/seg"]) > 0.0, "{b}");
        assert!(a["rewards/chosen"].is_null() && a["loss/text"].is_null(), "no_text_loss: no text metrics");
    }
    let mut ci = c.clone();
    ci.ablation.no_indicator = true;
    ci.max_steps = 1;
    run_with(&ci, "ind-off", None, Some(&l1), Some(&l2), false).unwrap();
    for a in metrics("ind-off") {
        assert_eq!(f(&a["seg/indicator_off"]), 0.0, "{a}");
        assert!(f(&a["loss/seg"]) > 0.0, "{a}");
    }
}

/// (c) A run interrupted after its step-2 checkpoint and resumed ends bit for bit where the
/// uninterrupted run does (same data order, optimizer state); the curriculum switches from
/// phase 1 to phase 2 halfway; the manifest lists the inputs and counts.
#[test]
fn dpo_resume_continues_exactly() {
    let c = DpoConfig { max_steps: 2, checkpoint_every: 1, ..cfg() };
    let a = run(&c, "straight");
    assert_eq!(a.steps, 2);
    let w = world();
    let sa = w.root.join("straight");
    assert!(sa.join("metrics.csv").is_file() && sa.join("loss.png").is_file());
    let ma = metrics("straight");
    let phases: Vec<u64> = ma.iter().map(|r| r["ps_phase"].as_u64().unwrap()).collect();
    assert_eq!(phases, [1, 2]);
    let csv = std::fs::read_to_string(sa.join("metrics.csv")).unwrap();
    assert!(csv.starts_with("step,epoch,lr,loss,loss/text,rewards/chosen,rewards/rejected,rewards/accuracies,rewards/margins,logps/chosen,logps/rejected,nll/chosen,loss/seg"), "{csv}");
    let man: Value = serde_json::from_str(&std::fs::read_to_string(sa.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(man["stage"], "dpo");
    assert_eq!(man["counts"]["seg_records_phase1"], 4);
    assert_eq!(man["counts"]["curriculum_switch_step"], 1);
    let inputs = man["inputs"].to_string();
    for p in ["pt.parquet", "ps-phase1.parquet", "ps-phase2.parquet", "train.parquet", "model.safetensors"] {
        assert!(inputs.contains(p), "{p} not in {inputs}");
    }
    // Interrupted after step 1 (phase 1), then resumed (phase 2).
    run(&c, "resumed");
    let sb = w.root.join("resumed");
    std::fs::remove_dir_all(sb.join("checkpoints/step-000002")).unwrap();
    std::fs::remove_dir_all(sb.join("model")).unwrap();
    let e = run_with(&c, "resumed", None, None, None, false).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
    let b = run_with(&c, "resumed", None, None, None, true).unwrap();
    assert_eq!(b.resumed_from, Some(1));
    let (wa, wb) = (weights_of(&sa.join("model")), weights_of(&sb.join("model")));
    assert_eq!(wa.len(), wb.len());
    for ((na, va), (nb, vb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        assert_eq!(va, vb, "{na} differs after resume");
    }
    let mb = metrics("resumed");
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        for k in ["loss", "rewards/margins", "loss/seg", "bce", "lr"] {
            assert_eq!(x[k], y[k], "{k}");
        }
    }
    // The decoder stayed frozen; the LLM moved.
    let before: std::collections::BTreeMap<String, Vec<f32>> = weights_of(&w.model).into_iter().collect();
    let after: std::collections::BTreeMap<String, Vec<f32>> = wa.into_iter().collect();
    let changed: Vec<&String> = before.keys().filter(|k| before[*k] != after[*k]).collect();
    assert!(changed.iter().all(|n| !n.starts_with("decoder.")), "{changed:?}");
    assert!(
        changed.iter().any(|n| n.starts_with("llm.")) && changed.iter().any(|n| n.starts_with("text_hidden_fcs.")),
        "{changed:?}"
    );
}

/// (d) Each ablation switch changes what it names.
#[test]
fn dpo_ablation_switches() {
    let w = world();
    let one = |c: &mut DpoConfig| {
        c.max_steps = 1;
        c.batch_size = 4;
    };
    // no_text_loss: P_t is never read (a missing file is fine), no text metrics.
    let mut c = cfg();
    one(&mut c);
    c.ablation.no_text_loss = true;
    let missing = w.root.join("no-such-pt.parquet");
    let r = run_with(&c, "abl-notext", Some(&missing), None, None, false).unwrap();
    assert_eq!(r.text_pairs, 0);
    let m = metrics("abl-notext");
    assert!(m[0]["loss/text"].is_null() && m[0]["rewards/margins"].is_null() && m[0]["logps/chosen"].is_null());
    assert!(f(&m[0]["loss"]) > 0.0);
    // no_seg_loss: no Eq. 4 metrics, the mask loss stays.
    let mut c = cfg();
    one(&mut c);
    c.ablation.no_seg_loss = true;
    run(&c, "abl-noseg");
    let m = metrics("abl-noseg");
    assert!(m[0]["loss/seg"].is_null() && m[0]["seg/indicator_off"].is_null());
    assert!(f(&m[0]["bce"]) > 0.0 && f(&m[0]["loss/text"]) > 0.0);
    // no_lambda = lambda 1: at step 0 the policy is the reference, so its Eq. 3 values are
    // the shard's reference log-probs weighted with lambda 1 (5 without the switch).
    let c5 = text_only_one_step();
    let mut cn = c5.clone();
    cn.ablation.no_lambda = true;
    run(&c5, "abl-l5");
    run(&cn, "abl-nol");
    let (m5, mn) = (metrics("abl-l5"), metrics("abl-nol"));
    let pt = read_shard::<TextPref>(&w.pt).unwrap();
    let n = pt.len().min(4);
    let order = popen_train::data::Order { n: pt.len(), batch_size: 4, seed: c5.seed }.batch(0);
    let eq3 = |lp: &[f32], changed: &[i32], lambda: f64| -> f64 {
        let s: f64 = lp
            .iter()
            .enumerate()
            .map(|(i, &x)| x as f64 * if changed.contains(&(i as i32)) { lambda } else { 1.0 })
            .sum();
        s / lp.len() as f64
    };
    let want = |lambda: f64| -> (f64, f64) {
        let c = order.iter().map(|&i| eq3(&pt[i].ref_logp_yc, &pt[i].l_yc, lambda)).sum::<f64>() / n as f64;
        let r = order.iter().map(|&i| eq3(&pt[i].ref_logp_y, &pt[i].l_y, lambda)).sum::<f64>() / n as f64;
        (c, r)
    };
    for (m, lambda) in [(&mn, 1.0), (&m5, 5.0)] {
        let (c, r) = want(lambda);
        assert!(
            (f(&m[0]["logps/chosen"]) - c).abs() < 1e-3 * (1.0 + c.abs()),
            "lambda {lambda}: {} vs {c}",
            m[0]["logps/chosen"]
        );
        assert!(
            (f(&m[0]["logps/rejected"]) - r).abs() < 1e-3 * (1.0 + r.abs()),
            "lambda {lambda}: {} vs {r}",
            m[0]["logps/rejected"]
        );
    }
    assert_ne!(m5[0]["logps/chosen"], mn[0]["logps/chosen"], "lambda 5 weighs the changed tokens");
    // random_ps: a deterministic random order of the three kept images per target, differing
    // from the recorded ranking somewhere; it changes Eq. 4's rewards.
    let recs = read_shard::<SegPref>(&w.ps2).unwrap();
    let mut cr = cfg();
    cr.ablation.random_ps = true;
    let mut differs = 0;
    for r in &recs {
        for n in 0..r.targets() {
            let o = dpo::effective_ranking(r, n, &cr);
            assert_eq!(o, dpo::effective_ranking(r, n, &cr));
            let mut s = o;
            s.sort();
            assert_eq!(s, [0, 1, 2]);
            let rec: Vec<usize> = r.ranking(n).iter().map(|&x| x as usize).collect();
            assert_eq!(dpo::effective_ranking(r, n, &cfg()).to_vec(), rec);
            differs += usize::from(o.to_vec() != rec);
        }
    }
    assert!(differs > 0, "random_ps never changed a ranking");
    let seg_only = |c: &mut DpoConfig| {
        c.max_steps = 2;
        c.seg_batch_size = 2;
        c.ablation.no_text_loss = true;
        c.ablation.no_indicator = true;
    };
    let mut base = cfg();
    seg_only(&mut base);
    let mut rnd = base.clone();
    rnd.ablation.random_ps = true;
    run(&base, "abl-cur");
    run(&rnd, "abl-rnd");
    let (mc, mr) = (metrics("abl-cur"), metrics("abl-rnd"));
    // Step 0: the policy is the reference, every reward is 0 whatever the order; after one
    // update they differ.
    assert!(f(&mc[0]["seg/rewards_w"]).abs() < 1e-3, "{}", mc[0]);
    assert_ne!(mc[1]["seg/rewards_w"], mr[1]["seg/rewards_w"]);
    // one_phase: both phases' records in one pool over all steps.
    let mut co = base.clone();
    co.ablation.one_phase = true;
    run(&co, "abl-one");
    let mo = metrics("abl-one");
    assert!(mo.iter().all(|r| r["ps_phase"] == 0), "{mo:?}");
    assert!(mc.iter().map(|r| r["ps_phase"].as_u64().unwrap()).eq([1, 2]));
}

/// (e) Bad inputs: a NaN loss stops with the step and the last good checkpoint (kept); a
/// P_s record collected with another model names the file, record and field; a missing
/// model names the path; phase-1's indicator without proposals says what to pass.
#[test]
fn dpo_bad_inputs_are_clear_errors() {
    let w = world();
    // P_t with -inf reference log-probs in one record: its reward is inf - inf = NaN. The
    // record is placed third in the data order (batch 1), so steps 0-1 run and checkpoint.
    let mut recs = read_shard::<TextPref>(&w.pt).unwrap();
    let n = recs.len();
    let mut c = cfg();
    c.batch_size = 1;
    c.checkpoint_every = 1;
    c.ablation.no_seg_loss = true;
    c.bce_weight = 0.0;
    c.dice_weight = 0.0;
    let bad = popen_train::data::Order { n, batch_size: 1, seed: c.seed }.permutation(0)[2];
    recs[bad].ref_logp_y[0] = f32::NEG_INFINITY;
    recs[bad].ref_logp_yc[0] = f32::NEG_INFINITY;
    let bad_id = recs[bad].id.clone();
    let pt_nan = w.root.join("pt-nan.parquet");
    write_shard(&pt_nan, recs).unwrap();
    match run_with(&c, "nan", Some(&pt_nan), None, None, false) {
        Err(e @ TrainError::NonFiniteLoss { .. }) => {
            let msg = e.to_string();
            let TrainError::NonFiniteLoss { step, last_checkpoint, .. } = e else { unreachable!() };
            assert_eq!(step, 2, "{msg}");
            assert!(last_checkpoint.ends_with("step-000002"), "{msg}");
            assert!(Path::new(&last_checkpoint).join("state.json").is_file(), "the last good checkpoint is kept");
            assert!(msg.contains(&bad_id), "{msg}");
        }
        other => panic!("expected a non-finite loss error, got {other:?}"),
    }
    assert!(!w.root.join("nan/model").exists());
    // A P_s record whose embeddings have another size.
    let mut ps = read_shard::<SegPref>(&w.ps2).unwrap();
    let d = ps[1].f_dim as usize + 1;
    ps[1].f_dim = d as u32;
    ps[1].ref_f = vec![0.5; 3 * ps[1].targets() * d];
    let id = ps[1].id.clone();
    let ps_bad = w.root.join("ps2-fdim.parquet");
    write_shard(&ps_bad, ps).unwrap();
    let e = run_with(&cfg(), "fdim", None, None, Some(&ps_bad), false).unwrap_err().to_string();
    assert!(e.contains("ps2-fdim.parquet") && e.contains(&id) && e.contains("f_dim"), "{e}");
    // P_s of phase 2 given as phase 1.
    let e = run_with(&cfg(), "phase", None, Some(&w.ps2), None, false).unwrap_err().to_string();
    assert!(e.contains("ps-phase2.parquet") && e.contains("'phase'"), "{e}");
    // A missing model folder.
    let missing = w.root.join("no-such-model");
    let c = cfg();
    let out = w.root.join("err");
    let job = DpoJob {
        config: &c,
        init: &missing,
        pt: &w.pt,
        ps_phase1: &w.ps1,
        ps_phase2: &w.ps2,
        proposals: ProposalSource::None,
        out: &out,
        resume: false,
        progress: false,
        sam_cache: None,
        allow_foreign_ref: false,
    };
    let e = dpo::run::<AB>(&job, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("no-such-model"), "{e}");
    // Issue 24 item 3: shards collected with another model than --model are refused, naming
    // both (the world's shards record the world's model; this is a fresh random one).
    let other = w.root.join("other-model");
    if !other.exists() {
        let (_, tok, mcfg) = super::small_world(&w.root.join("other-world"));
        bundle::save(&other, &mcfg.init::<B>(&Default::default()).unwrap(), &tok).unwrap();
    }
    let out_f = w.root.join("foreign");
    let fjob = DpoJob { init: &other, proposals: ProposalSource::Samples(&w.train), out: &out_f, ..job };
    let e = dpo::run::<AB>(&fjob, &Default::default()).unwrap_err().to_string();
    let fp = bundle::fingerprint(&w.model).unwrap();
    assert!(
        e.contains("pt.parquet")
            && e.contains(&fp[..16])
            && e.contains("other-model")
            && e.contains("--allow-foreign-ref"),
        "{e}"
    );
    let meta = popen_core::shard::read_metadata(&w.ps1).unwrap();
    assert_eq!(meta.get(popen_core::shard::REFERENCE_MODEL_KEY), Some(&fp));
    // ... and allowed with the flag: the run gets past the check (it fails later, on the
    // other world's tokenizer, or trains: either way not on the reference).
    let fjob = DpoJob { allow_foreign_ref: true, ..fjob };
    if let Err(e) = dpo::run::<AB>(&fjob, &Default::default()) {
        assert!(!e.to_string().contains("--allow-foreign-ref"), "{e}");
    }
    // Phase 1's s-term indicator without proposals.
    let job = DpoJob { init: &w.model, ..job };
    let e = dpo::run::<AB>(&job, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("--samples") && e.contains("phase1_score"), "{e}");
    // Configs: unknown keys and bad values name the field.
    let e = toml::from_str::<DpoConfig>(&format!("{}\nbeta_x = 1.0\n", DpoConfig::default().to_toml()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("beta_x"), "{e}");
    let bad = DpoConfig { beta_s: 0.0, ..DpoConfig::default() };
    assert!(bad.validate().unwrap_err().contains("beta_s"));
    let mut bad = DpoConfig::default();
    bad.ablation.no_text_loss = true;
    bad.ablation.no_seg_loss = true;
    bad.bce_weight = 0.0;
    bad.dice_weight = 0.0;
    assert!(bad.validate().unwrap_err().contains("nothing to train"));
}

/// The configs under pipelines/ parse; the real-scale one is the paper's values (= the
/// defaults).
/// `chosen_nll` (DPO + NLL, not in the paper): at step 0 (the policy still equals the
/// reference, the same batch) the logged loss is the paper's loss plus `chosen_nll` times the
/// logged `nll/chosen`, the mean token cross-entropy of y_c (> 0); with 0 it is not logged.
#[test]
fn dpo_chosen_nll_adds_the_chosen_cross_entropy() {
    run(&DpoConfig { chosen_nll: 0.0, ..text_only_one_step() }, "nll-0");
    run(&DpoConfig { chosen_nll: 2.0, ..text_only_one_step() }, "nll-2");
    let (a, b) = (&metrics("nll-0")[0], &metrics("nll-2")[0]);
    assert!(a["nll/chosen"].is_null(), "{a}");
    let nll = f(&b["nll/chosen"]);
    assert!(nll > 0.0, "{b}");
    assert!((f(&a["loss/text"]) - f(&b["loss/text"])).abs() < 1e-6, "the DPO term itself is unchanged");
    assert!(
        (f(&b["loss"]) - (f(&a["loss"]) + 2.0 * nll)).abs() < 1e-4,
        "{} vs {} + 2 x {nll}",
        f(&b["loss"]),
        f(&a["loss"])
    );
}

#[test]
fn dpo_pipeline_configs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tiny = DpoConfig::from_toml_file(root.join("pipelines/dpo-tiny.toml")).unwrap();
    assert_eq!((tiny.precision, tiny.trainable), (Precision::F32, Trainable::Full));
    // The tiny preset's DPO + NLL (not in the paper); the 7B config keeps the paper's L_t.
    assert!(tiny.chosen_nll > 0.0);
    let real = DpoConfig::from_toml_file(root.join("pipelines/dpo-pixellm-7b.toml")).unwrap();
    assert_eq!(real, DpoConfig::default());
    assert_eq!(real.chosen_nll, 0.0);
    assert_eq!(
        (real.beta_t, real.lambda, real.beta_s, real.lr, real.batch_size, real.warmup_steps),
        (0.5, 5.0, 10.0, 3e-4, 16, 100)
    );
}

/// A tiny-sam model (random small TinyViT, `super::sam_world`): the frozen SAM encoder's
/// embeddings of the clean and median images are computed once per image and kept in
/// `sam_cache` (one file each); a second run reads them and ends with the same weights; the
/// SAM encoder and the decoder never move. An empty phase-1 shard leaves phase 2 for every
/// step, with the note in the report.
#[test]
fn dpo_sam_model_caches_embeddings_and_keeps_frozen_parts() {
    let dir = tempfile::tempdir().unwrap();
    let (init, train) = super::sam_world(dir.path());
    let dev = Default::default();
    let mut c2 = CollectPsConfig { phase: Phase::Two, perturbations: 3, batch_size: 3, ..Default::default() };
    c2.select.phase2_top = 3;
    let ps2 = dir.path().join("ps2.parquet");
    collect_ps::run::<B>(&init, &train, &ps2, &c2, &AnnotationProposer, ShardSpec::new(0, 1).unwrap(), false, &dev)
        .unwrap();
    let ps1 = dir.path().join("ps1.parquet");
    write_shard(&ps1, Vec::<SegPref>::new()).unwrap();
    let mut c = cfg();
    c.max_steps = 2;
    c.ablation.no_text_loss = true;
    let cache = dir.path().join("sam-cache");
    let run = |name: &str| {
        let out = dir.path().join(name);
        let job = DpoJob {
            config: &c,
            init: &init,
            pt: Path::new("unused"),
            ps_phase1: &ps1,
            ps_phase2: &ps2,
            proposals: ProposalSource::None,
            out: &out,
            resume: false,
            progress: false,
            sam_cache: Some(&cache),
            allow_foreign_ref: false,
        };
        dpo::run::<AB>(&job, &Default::default()).unwrap()
    };
    let r = run("a");
    assert_eq!(r.seg_records, [0, 6]);
    assert!(r.phase_note.as_deref().unwrap_or("").contains("phase-2 records serve all steps"), "{r:?}");
    let files = std::fs::read_dir(&cache).unwrap().count();
    // 2 steps x 2 records: their clean images (2 distinct in the world) and median copies.
    assert!((2..=12).contains(&files), "{files} cached embeddings");
    let before: std::collections::BTreeMap<String, Vec<f32>> = weights_of(&init).into_iter().collect();
    let after: std::collections::BTreeMap<String, Vec<f32>> = weights_of(&r.model_dir).into_iter().collect();
    let changed: Vec<&String> = before.keys().filter(|k| before[*k] != after[*k]).collect();
    assert!(changed.iter().all(|n| !n.starts_with("sam_encoder.") && !n.starts_with("decoder.")), "{changed:?}");
    assert!(changed.iter().any(|n| n.starts_with("llm.")), "{changed:?}");
    let r2 = run("b");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), files, "the second run reads the cache");
    assert_eq!(weights_of(&r2.model_dir), weights_of(&r.model_dir));
}

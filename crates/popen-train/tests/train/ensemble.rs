//! POPEN's ensemble (`popen_train::ensemble`: inference, `popen predict --ensemble K`) and the
//! `ensemble-train` stage on a random 1-layer tiny model and 4 benchmark samples, with the real
//! all-MiniLM-L6-v2 encoder (`make assets`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use popen_core::shard::{read_shard, Prediction, Sample};
use popen_core::shardspec::ShardSpec;
use popen_model::bundle;
use popen_model::infer::Predictor;
use popen_model::pixellm::{Padding, Part, PixelLmConfig, Segment};
use popen_train::config::StageConfig;
use popen_train::ensemble::{self, EnsembleSettings};
use popen_train::ensemble_train::{self, EnsembleConfig, EnsembleJob};
use popen_train::TrainError;
use serde_json::Value;

type B = NdArray<f32>;
type AB = Autodiff<NdArray<f32>>;

struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    /// With p_hat (10) and seg feedback (the tiny preset).
    model: PathBuf,
    /// Without p_hat (prompt_embeddings = 0).
    plain: PathBuf,
    train: PathBuf,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let (train, tok, mcfg) = super::small_world(&root);
        assert_eq!((mcfg.prompt_embeddings, mcfg.seg_feedback), (10, true));
        let model = root.join("dpo-model");
        bundle::save(&model, &mcfg.init::<B>(&Default::default()).unwrap(), &tok).unwrap();
        let mut pcfg = mcfg.clone();
        pcfg.prompt_embeddings = 0;
        let plain = root.join("plain-model");
        bundle::save(&plain, &pcfg.init::<B>(&Default::default()).unwrap(), &tok).unwrap();
        World { _dir: dir, root, model, plain, train }
    })
}

fn minilm() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/assets/minilm");
    assert!(p.join("model.safetensors").is_file(), "{} is missing: run make assets", p.display());
    p
}

fn settings() -> EnsembleSettings {
    EnsembleSettings { k: 3, temperature: 1.0, max_new_tokens: 12, ..Default::default() }
}

fn vals<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// SPEC 6 / issue 6: with gamma = 0 and no p_hat, the text pass equals a plain forward over
/// the concatenated input (prompt + y_1 </s> .. y_K </s> as one token piece); gamma = 0 given
/// explicitly (tau = 0 -> sigma(0) - 0.5) equals no gamma; the K answers of every item come
/// from one batched generate (K rows per item, distinct RNG streams).
#[test]
fn ensemble_text_pass_without_gamma_and_p_hat_is_a_plain_forward() {
    let w = world();
    let dev = Default::default();
    let mut b = bundle::open::<B>(&w.plain, &dev).unwrap();
    let p = Predictor::new(&b.model, &mut b.tokenizer).unwrap();
    let samples: Vec<Sample> = read_shard(&w.train).unwrap();
    let images: Vec<image::RgbImage> = samples[..2].iter().map(|s| s.decode_image().unwrap()).collect();
    let pre = p.preprocess(&images.iter().collect::<Vec<_>>()).unwrap();
    let feats = p.model.encode_images(&pre).unwrap();
    let instrs: Vec<&str> = samples[..2].iter().map(|s| s.instruction.as_str()).collect();
    let s = settings();
    let q = ensemble::Questions::new(&p, &feats, &instrs, s.share_prompt).unwrap();
    let cands = ensemble::sample_candidates(&p, &feats, &q, &s).unwrap();
    assert_eq!(cands.len(), 2);
    assert!(cands.iter().all(|c| c.len() == 3));
    assert!(
        cands[0][0].ids != cands[0][1].ids || cands[0][1].ids != cands[0][2].ids,
        "K samples should differ at temperature 1"
    );
    for (i, x) in instrs.iter().enumerate() {
        let sc = ensemble::scores(&p, &cands[i]).unwrap();
        assert!(sc.tau.iter().flatten().all(|t| (-1.0..=1.0).contains(t)));
        let zero: Vec<Vec<f32>> = sc.tau.iter().map(|t| vec![0.0; t.len()]).collect();
        let a = ensemble::text_rows(&p, x, i, &cands[i], None).unwrap();
        let g0 = ensemble::text_rows(&p, x, i, &cands[i], Some(&zero)).unwrap();
        let mut plain = p.prompt_parts(x, i).unwrap();
        let mut ids = Vec::new();
        for c in &cands[i] {
            ids.extend(&c.ids);
            ids.push(p.tokens.eos);
        }
        plain.push(Part::new(Segment::Tokens(ids)));
        let h = |rows: Vec<Part<B>>| {
            let asm = p.model.assemble(&[rows], Some(&feats), Padding::Right).unwrap();
            vals(p.model.forward_hidden(&asm).unwrap())
        };
        let (ha, hg, hp) = (h(a), h(g0), h(plain));
        assert_eq!(ha, hp, "item {i}: text pass != plain forward");
        assert_eq!(hg, hp, "item {i}: gamma 0 != no gamma");
    }
    // A gamma that is not 0 changes the pass.
    let sc = ensemble::scores(&p, &cands[0]).unwrap();
    if sc.tau.iter().flatten().any(|t| *t != 0.0) {
        let biased = ensemble::text_rows(&p, instrs[0], 0, &cands[0], Some(&sc.tau)).unwrap();
        let plain = ensemble::text_rows(&p, instrs[0], 0, &cands[0], None).unwrap();
        let asm = |r| p.model.assemble(&[r], Some(&feats), Padding::Right).unwrap();
        assert_ne!(
            vals(p.model.forward_hidden(&asm(biased)).unwrap()),
            vals(p.model.forward_hidden(&asm(plain)).unwrap())
        );
    }
}

/// `popen predict --ensemble K` writes the same shard kind, one record per sample, masks
/// consistent with the answer's `<seg>` count; the model with p_hat and seg feedback runs.
#[test]
fn ensemble_predict_writes_a_consistent_shard() {
    let w = world();
    let out = w.root.join("pred-ens.parquet");
    let cfg = popen_train::predict::PredictConfig {
        batch_size: 3,
        sampling: popen_model::sampling::SamplingConfig { max_new_tokens: 12, ..Default::default() },
        teacher_force: false,
        ensemble: Some(settings()),
        sam_cache: None,
    };
    let r = popen_train::predict::run::<B>(
        &w.model,
        &w.train,
        &out,
        &cfg,
        ShardSpec::new(0, 1).unwrap(),
        false,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(r.predictions, 4);
    let preds = read_shard::<Prediction>(&out).unwrap();
    for p in &preds {
        assert_eq!(p.answer.matches("<seg>").count(), p.masks.len(), "{}", p.answer);
        assert_eq!(serde_json::from_str::<Value>(&p.meta).unwrap()["ensemble_k"], 3);
    }
}

fn cfg() -> EnsembleConfig {
    EnsembleConfig {
        epochs: 100,
        max_steps: 2,
        batch_size: 2,
        lr: 1e-2,
        warmup_steps: 0,
        checkpoint_every: 1,
        keep_checkpoints: 3,
        log_every: 1,
        minilm: minilm(),
        ensemble: EnsembleSettings { k: 2, temperature: 1.0, max_new_tokens: 10, ..Default::default() },
        ..EnsembleConfig::default()
    }
}

fn run_with(
    c: &EnsembleConfig,
    name: &str,
    init: Option<&Path>,
    resume: bool,
) -> popen_train::Result<ensemble_train::EnsembleReport> {
    let w = world();
    let out = w.root.join(name);
    let job = EnsembleJob {
        config: c,
        init: init.unwrap_or(&w.model),
        samples: &w.train,
        out: &out,
        resume,
        progress: false,
        sam_cache: None,
    };
    ensemble_train::run::<AB>(&job, &Default::default())
}

/// The job whose losses `loss_of` / `adapt_loss_of` compute (the world's model and samples;
/// nothing is written).
fn loss_job(c: &EnsembleConfig) -> EnsembleJob<'_> {
    let w = world();
    EnsembleJob {
        config: c,
        init: &w.model,
        samples: &w.train,
        out: &w.root,
        resume: false,
        progress: false,
        sam_cache: None,
    }
}

/// Runs `c` (one step on the 4 samples) into `root/name`: the init model, the stepped model
/// and the step-0 batch's sample indices.
fn one_step(
    c: &EnsembleConfig,
    name: &str,
) -> (popen_model::pixellm::PixelLm<AB>, popen_model::pixellm::PixelLm<AB>, Vec<usize>) {
    let w = world();
    run_with(c, name, None, false).unwrap();
    let dev = Default::default();
    let m0 = bundle::open::<AB>(&w.model, &dev).unwrap().model;
    let m1 = bundle::open::<AB>(&w.root.join(name).join("model"), &dev).unwrap().model;
    (m0, m1, popen_train::data::Order { n: 4, batch_size: 4, seed: c.seed }.batch(0))
}

fn weights_of(dir: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let b = bundle::open::<B>(dir, &Default::default()).unwrap();
    popen_model::weights::named_tensors(&b.model).into_iter().map(|(n, _, t)| (n, t)).collect()
}

fn metrics(name: &str) -> Vec<Value> {
    let p = world().root.join(name).join("metrics.jsonl");
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Only p_hat changes (every other parameter bitwise equal); losses finite; metrics, manifest
/// and loss plot written; `--resume` after an interruption ends bitwise where the straight run
/// ends.
#[test]
fn ensemble_train_moves_only_p_hat_and_resumes_exactly() {
    let w = world();
    // SPEC 6's setting: only p_hat (the feedback projection frozen).
    let c = EnsembleConfig { train_seg_feedback: false, ..cfg() };
    let a = run_with(&c, "ens-straight", None, false).unwrap();
    assert_eq!(a.steps, 2);
    assert_eq!(a.trainable_params, 10 * PixelLmConfig::tiny(512).llm.hidden_size);
    let sa = w.root.join("ens-straight");
    assert!(sa.join("metrics.csv").is_file() && sa.join("loss.png").is_file());
    let ma = metrics("ens-straight");
    assert_eq!(ma.len(), 2);
    for r in &ma {
        assert!(r["loss"].as_f64().unwrap().is_finite() && r["loss/ti"].as_f64().unwrap().is_finite(), "{r}");
    }
    let man: Value = serde_json::from_str(&std::fs::read_to_string(sa.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(man["stage"], "ensemble-train");
    let before = weights_of(&w.model);
    let after = weights_of(&sa.join("model"));
    let changed: Vec<&String> = before.keys().filter(|k| before[*k] != after[*k]).collect();
    assert_eq!(changed, vec!["prompt_embeddings"], "only p_hat may change");

    // Interrupted after step 1, then resumed.
    run_with(&c, "ens-resumed", None, false).unwrap();
    let sb = w.root.join("ens-resumed");
    std::fs::remove_dir_all(sb.join("checkpoints/step-000002")).unwrap();
    std::fs::remove_dir_all(sb.join("model")).unwrap();
    let e = run_with(&c, "ens-resumed", None, false).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
    let b = run_with(&c, "ens-resumed", None, true).unwrap();
    assert_eq!(b.resumed_from, Some(1));
    assert_eq!(after, weights_of(&sb.join("model")), "resume differs");
    let mb = metrics("ens-resumed");
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        for k in ["loss", "loss/ti", "loss/si", "p_tilde", "lr"] {
            assert_eq!(x[k], y[k], "{k}");
        }
    }
}

/// SPEC 10.16 / 10.18 (`adapt_steps`, `train_seg_feedback`): the warm-up steps train the LLM
/// side, p_hat and the feedback projection but never the pixel decoder; after the warm-up
/// only p_hat and the projection move (every other weight bitwise equal to the warm-up's
/// end); metrics say which loss each step took; `--resume` from a checkpoint inside the
/// warm-up and from one after it both end bitwise where the straight run ends.
#[test]
fn ensemble_train_warm_up_trains_the_llm_side_then_only_p_hat() {
    let w = world();
    let c = EnsembleConfig { adapt_steps: 1, max_steps: 3, decay: popen_train::config::Decay::Constant, ..cfg() };
    let r = run_with(&c, "ens-adapt", None, false).unwrap();
    assert_eq!(r.steps, 3);
    let m = metrics("ens-adapt");
    assert_eq!(m.len(), 3);
    assert!(m[0]["adapt/ce"].as_f64().unwrap() > 0.0 && m[0]["adapt/mask"].as_f64().unwrap() > 0.0, "{}", m[0]);
    assert_eq!(m[0]["loss/ti"].as_f64().unwrap(), 0.0);
    for row in &m[1..] {
        assert!(row["adapt/ce"].is_null() && row["loss/ti"].as_f64().unwrap().is_finite(), "{row}");
    }
    let before = weights_of(&w.model);
    let dir = w.root.join("ens-adapt");
    let after = weights_of(&dir.join("model"));
    let changed: Vec<&String> = before.keys().filter(|k| before[*k] != after[*k]).collect();
    assert!(changed.iter().any(|k| k.starts_with("llm.")), "the LLM did not train: {changed:?}");
    // (The feedback projection gets a gradient only where a candidate has a seg group, which
    // this random model rarely writes; it may or may not move here.)
    assert!(changed.iter().any(|k| *k == "prompt_embeddings"), "{changed:?}");
    assert!(!changed.iter().any(|k| k.starts_with("decoder.")), "the pixel decoder moved: {changed:?}");
    // The warm-up alone (same rates: constant decay, no warmup), then compare.
    let c1 = EnsembleConfig { max_steps: 1, ..c.clone() };
    run_with(&c1, "ens-adapt-1", None, false).unwrap();
    let warm = weights_of(&w.root.join("ens-adapt-1/model"));
    let moved: Vec<&String> = warm.keys().filter(|k| warm[*k] != after[*k]).collect();
    assert!(
        !moved.is_empty() && moved.iter().all(|k| *k == "prompt_embeddings" || k.starts_with("seg_feedback.")),
        "after the warm-up: {moved:?}"
    );
    // Resumed inside the warm-up's end (checkpoint 1) and after it (checkpoint 2).
    for keep in [1usize, 2] {
        let name = format!("ens-adapt-resume-{keep}");
        run_with(&c, &name, None, false).unwrap();
        let d = w.root.join(&name);
        for s in keep + 1..=3 {
            std::fs::remove_dir_all(d.join(format!("checkpoints/step-{s:06}"))).unwrap();
        }
        std::fs::remove_dir_all(d.join("model")).unwrap();
        let b = run_with(&c, &name, None, true).unwrap();
        assert_eq!(b.resumed_from, Some(keep));
        assert!(after == weights_of(&d.join("model")), "resume from step {keep} differs");
    }
}

/// One warm-up step lowers its loss on the batch it stepped on, with the same K candidates
/// (sampled by the step-0 model): the LLM side learns to write the ground truth after the K
/// answers. Both the text (cross-entropy) and mask terms contribute.
#[test]
fn ensemble_warm_up_step_lowers_its_loss_on_a_fixed_batch() {
    let c = EnsembleConfig { batch_size: 4, adapt_steps: 1, max_steps: 1, lr: 1e-4, ..cfg() };
    let (m0, m1, idx) = one_step(&c, "ens-adapt-fixed");
    let job = loss_job(&c);
    let dev = Default::default();
    let l0 = ensemble_train::adapt_loss_of::<AB>(&job, &m0, None, &idx, &dev).unwrap();
    let logged = metrics("ens-adapt-fixed")[0]["loss"].as_f64().unwrap() as f32;
    assert!((logged - l0).abs() <= 1e-5, "the stage's step-0 loss {logged} is not adapt_loss_of's {l0}");
    let l1 = ensemble_train::adapt_loss_of::<AB>(&job, &m1, Some(&m0), &idx, &dev).unwrap();
    eprintln!("warm-up loss {l0} -> {l1}");
    assert!(l0.is_finite() && l1 < l0, "warm-up loss did not go down: {l0} -> {l1}");
}

/// `adapt_plain_weight` (rehearsal during the warm-up, not in the paper): the logged
/// `adapt/plain` of step 0 is SFT's own loss of the same samples in the plain layout
/// (`SftModel::loss`, the path `popen sft` steps on, PixelLM's weights 1 / 2 / 0.5), and the
/// warm-up loss grows by exactly weight x that term. `adapt_lr`: the warm-up steps take the
/// schedule scaled to `adapt_lr`, the steps after it `lr`.
#[test]
fn ensemble_warm_up_rehearsal_is_sfts_loss_and_adapt_lr_applies() {
    let w = world();
    let c = EnsembleConfig { batch_size: 4, adapt_steps: 1, max_steps: 1, lr: 1e-4, adapt_plain_weight: 0.5, ..cfg() };
    let (m0, _, idx) = one_step(&c, "ens-adapt-plain");
    let logged = &metrics("ens-adapt-plain")[0];
    let plain = logged["adapt/plain"].as_f64().unwrap() as f32;
    // SFT's loss of the same 4 samples under the step-0 model.
    let dev = Default::default();
    let o = popen_train::stage::open_init::<AB>(&w.model, &dev).unwrap();
    let samples: Vec<Sample> = read_shard(&w.train).unwrap();
    let batch: Vec<Sample> = idx.iter().map(|&i| samples[i].clone()).collect();
    let (examples, skipped) = popen_train::data::prepare(
        batch,
        &o.tokenizer,
        &o.tokens,
        o.config.seg_group_len(),
        o.config.image_tokens(),
        4096,
    );
    assert!(skipped.is_empty(), "{skipped:?}");
    let refs: Vec<&popen_train::data::Example> = examples.iter().collect();
    let pre = popen_model::preprocess::Preprocessor::pixellm(o.config.image_size);
    let sft_batch = popen_train::sft::make_batch(&refs, &pre, &popen_train::SftConfig::default()).unwrap();
    let sft_loss = popen_train::sft::SftModel { pixellm: m0.clone() }.loss(&sft_batch).unwrap().total;
    let sft_loss = sft_loss.into_data().convert::<f32>().into_vec::<f32>().unwrap()[0];
    assert!((plain - sft_loss).abs() <= 1e-4 * sft_loss.max(1.0), "adapt/plain {plain} vs SFT's loss {sft_loss}");
    // The total is the ensemble-layout warm-up loss + 0.5 x the plain term.
    let job =
        |cfg: &EnsembleConfig| ensemble_train::adapt_loss_of::<AB>(&loss_job(cfg), &m0, None, &idx, &dev).unwrap();
    let with = job(&c);
    let without = job(&EnsembleConfig { adapt_plain_weight: 0.0, ..c.clone() });
    assert!((with - without - 0.5 * plain).abs() <= 1e-4 * with.max(1.0), "{with} - {without} != 0.5 x {plain}");
    assert!((logged["loss"].as_f64().unwrap() as f32 - with).abs() <= 1e-5);
    // adapt_lr: step 0 (warm-up) at 2e-5, step 1 at lr (constant schedule, no warmup).
    let c2 = EnsembleConfig {
        adapt_steps: 1,
        max_steps: 2,
        warmup_steps: 0,
        decay: popen_train::config::Decay::Constant,
        lr: 1e-4,
        adapt_lr: 2e-5,
        ..cfg()
    };
    run_with(&c2, "ens-adapt-lr", None, false).unwrap();
    let m = metrics("ens-adapt-lr");
    let lrs: Vec<f64> = m.iter().map(|r| r["lr"].as_f64().unwrap()).collect();
    assert!((lrs[0] - 2e-5).abs() < 1e-12 && (lrs[1] - 1e-4).abs() < 1e-12, "{lrs:?}");
    assert!(m[1]["adapt/plain"].is_null(), "{}", m[1]);
    // Bad values are config errors naming the key.
    for (bad, key) in [
        (EnsembleConfig { adapt_lr: -1.0, ..cfg() }, "adapt_lr"),
        (EnsembleConfig { adapt_plain_weight: -1.0, ..cfg() }, "adapt_plain_weight"),
    ] {
        let e = bad.validate().unwrap_err();
        assert!(e.contains(key), "{e}");
    }
}

/// One step lowers the loss of the batch it stepped on ([`ensemble_train::loss_of`] of the
/// stage's step-0 batch, in the stage's order, so the same K candidates): Adam's first step
/// moves each p_hat entry by ~lr against its gradient's sign, a descent direction, and at lr
/// 1e-3 the second-order term is negligible. (Several steps draw fresh candidates per step,
/// so the loss of one batch need not fall, whatever the random init: the old 3-step version
/// of this test failed once in CI, 0.6921 -> 0.6938.)
#[test]
fn ensemble_train_steps_lower_the_loss_on_a_fixed_batch() {
    let c = EnsembleConfig { batch_size: 4, max_steps: 1, checkpoint_every: 1, lr: 1e-3, ..cfg() };
    let (m0, m1, idx) = one_step(&c, "ens-fixed");
    let job = loss_job(&c);
    let dev = Default::default();
    let l0 = ensemble_train::loss_of::<AB>(&job, &m0, &idx, &dev).unwrap();
    // After the step, on the SAME candidates and y_tilde (decoded by the step-0 model): the
    // greedy y_tilde goes through p_hat, so m1's own decode may pick other tokens and the
    // losses would not be comparable (why this test failed now and then before).
    let l1 = ensemble_train::loss_of_decoded_by::<AB>(&job, &m1, &m0, &idx, &dev).unwrap();
    // The same batch and candidates the stage stepped on: its logged step-0 loss is l0.
    let logged = metrics("ens-fixed")[0]["loss"].as_f64().unwrap() as f32;
    assert!((logged - l0).abs() <= 1e-5, "the stage's step-0 loss {logged} is not loss_of's {l0}");
    eprintln!("fixed batch loss {l0} -> {l1}");
    assert!(l0.is_finite() && l1.is_finite());
    assert!(l1 < l0, "loss did not go down: {l0} -> {l1}");
}

/// Missing MiniLM names the path; a model without p_hat is refused; a NaN loss is a
/// NonFiniteLoss naming the samples and no model folder is written; unknown config keys are
/// named.
#[test]
fn ensemble_train_bad_inputs_are_clear_errors() {
    let w = world();
    let c = EnsembleConfig { minilm: w.root.join("no-minilm"), ..cfg() };
    let e = run_with(&c, "ens-err1", None, false).unwrap_err().to_string();
    assert!(e.contains("no-minilm/model.safetensors") && e.contains("make assets"), "{e}");
    let e = run_with(&cfg(), "ens-err2", Some(&w.plain), false).unwrap_err().to_string();
    assert!(e.contains("p_hat"), "{e}");
    let c = EnsembleConfig { ti_weight: f32::NAN, ..cfg() };
    match run_with(&c, "ens-nan", None, false) {
        Err(e @ TrainError::NonFiniteLoss { .. }) => {
            let msg = e.to_string();
            let TrainError::NonFiniteLoss { step, last_checkpoint, .. } = e else { unreachable!() };
            assert_eq!((step, last_checkpoint.as_str()), (0, "none"), "{msg}");
        }
        other => panic!("expected a non-finite loss error, got {other:?}"),
    }
    assert!(!w.root.join("ens-nan/model").exists());
    let e = toml::from_str::<EnsembleConfig>(&format!("{}\nkk = 1\n", EnsembleConfig::default().to_toml()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("kk"), "{e}");
}

/// The configs under pipelines/ parse; the real-scale one has the paper's values.
#[test]
fn ensemble_pipeline_configs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tiny = EnsembleConfig::from_toml_file(root.join("pipelines/ensemble-tiny.toml")).unwrap();
    assert_eq!(tiny.ensemble.k, 3);
    // SPEC 10.18: the tiny preset adapts the small model with a warm-up; SPEC 10.16: the
    // feedback projection trains at every scale.
    assert!(tiny.adapt_steps > 0 && tiny.adapt_steps < tiny.max_steps && tiny.train_seg_feedback);
    let real = EnsembleConfig::from_toml_file(root.join("pipelines/ensemble-pixellm-7b.toml")).unwrap();
    assert_eq!(real, EnsembleConfig::default());
    assert_eq!((real.adapt_steps, real.train_seg_feedback), (0, true));
    assert_eq!((real.lr, real.epochs, real.batch_size, real.warmup_steps, real.ensemble.k), (3e-4, 2, 16, 100, 3));
}

/// A tiny-sam model (`super::sam_world`, 6 samples on 2 images): with `sam_cache`, predict
/// (plain and ensemble) and ensemble-train take the frozen SAM encoder's embeddings from the
/// cache: one file per distinct image, the same predictions and weights as computing them, and
/// a second run reads the files instead of adding any.
#[test]
fn sam_cache_serves_predict_and_ensemble_train() {
    let dir = tempfile::tempdir().unwrap();
    let (init, train) = super::sam_world(dir.path());
    let cache = dir.path().join("sam-cache");
    let files = || std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
    let predict = |name: &str, ens: bool, sam_cache: Option<&Path>| {
        let cfg = popen_train::predict::PredictConfig {
            batch_size: 4,
            sampling: popen_model::sampling::SamplingConfig { max_new_tokens: 8, ..Default::default() },
            teacher_force: false,
            ensemble: ens.then(settings),
            sam_cache: sam_cache.map(Path::to_path_buf),
        };
        let out = dir.path().join(name);
        popen_train::predict::run::<B>(
            &init,
            &train,
            &out,
            &cfg,
            ShardSpec::new(0, 1).unwrap(),
            false,
            &Default::default(),
        )
        .unwrap();
        read_shard::<Prediction>(&out).unwrap()
    };
    for ens in [false, true] {
        let fresh = predict("fresh.parquet", ens, None);
        let first = predict("first.parquet", ens, Some(&cache));
        assert_eq!(files(), 2, "one embedding per distinct image");
        let again = predict("again.parquet", ens, Some(&cache));
        assert_eq!(files(), 2);
        assert_eq!(first, again, "read back from the cache");
        for (a, b) in fresh.iter().zip(&first) {
            assert_eq!(
                (&a.id, &a.answer, &a.token_ids, &a.masks),
                (&b.id, &b.answer, &b.token_ids, &b.masks),
                "ensemble {ens}"
            );
        }
    }
    let c = EnsembleConfig { max_steps: 1, ..cfg() };
    let train_with = |name: &str, sam_cache: Option<&Path>| {
        let out = dir.path().join(name);
        let job = EnsembleJob {
            config: &c,
            init: &init,
            samples: &train,
            out: &out,
            resume: false,
            progress: false,
            sam_cache,
        };
        let r = ensemble_train::run::<AB>(&job, &Default::default()).unwrap();
        weights_of(&r.model_dir)
    };
    let fresh = train_with("ens-fresh", None);
    let before = files();
    let cached = train_with("ens-cached", Some(&cache));
    assert!(files() > before, "ensemble-train keys images by their bytes (as dpo), beside predict's files");
    let n = files();
    assert_eq!(train_with("ens-again", Some(&cache)), cached);
    assert_eq!(files(), n, "the second run reads the cache");
    for (k, v) in &fresh {
        let w = &cached[k];
        let d = v.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d <= 1e-5, "{k}: max |diff| {d}");
    }
}

fn candidate(groups: usize, logprobs: &[f32]) -> ensemble::Candidate {
    let m = popen_core::mask::Mask::zeros(2, 2);
    ensemble::Candidate {
        ids: vec![1; logprobs.len()],
        logprobs: logprobs.to_vec(),
        groups: (0..groups).map(|g| vec![g]).collect(),
        f: vec![vec![0.0]; groups],
        masks: vec![m; groups],
        mask_scores: vec![0.5; groups],
        answer: "a <seg>".into(),
    }
}

/// The fallback's choice, by hand: the highest mean token log-probability among the candidates
/// with groups (a group-less candidate never wins, however likely; ties keep the first).
#[test]
fn fallback_picks_the_likeliest_candidate_with_groups() {
    let c = [
        candidate(0, &[-0.1, -0.1]),
        candidate(1, &[-1.0, -3.0]),
        candidate(2, &[-0.5, -2.5, -1.5]),
        candidate(1, &[-2.0, -1.0, -3.0]),
    ];
    // Means: -, -2.0, -1.5, -2.0.
    assert_eq!(ensemble::best_candidate(&c), Some(2));
    assert_eq!(ensemble::best_candidate(&c[..2]), Some(1));
    assert_eq!(ensemble::best_candidate(&c[..1]), None);
    assert_eq!(ensemble::best_candidate(&[candidate(1, &[-1.0]), candidate(1, &[-1.0])]), Some(0));
}

/// With `fallback`, each record is y_tilde when it has usable groups, else the chosen
/// candidate's own answer, ids and masks; without it, the refined output is kept as is.
#[test]
fn ensemble_fallback_outputs_y_tilde_or_the_chosen_candidate() {
    let w = world();
    let model_dev = Default::default();
    let mut b = bundle::open::<B>(&w.model, &model_dev).unwrap();
    let p = Predictor::new(&b.model, &mut b.tokenizer).unwrap();
    let samples: Vec<Sample> = read_shard(&w.train).unwrap();
    let images: Vec<image::RgbImage> = samples.iter().map(|s| s.decode_image().unwrap()).collect();
    let items: Vec<(&image::RgbImage, &str)> =
        images.iter().zip(&samples).map(|(im, s)| (im, s.instruction.as_str())).collect();
    let plain = ensemble::predict(&p, &items, &settings()).unwrap();
    let fb = ensemble::predict(&p, &items, &EnsembleSettings { fallback: true, ..settings() }).unwrap();
    for (a, o) in plain.iter().zip(&fb) {
        assert!(a.fell_back.is_none());
        match o.fell_back {
            None => {
                assert_eq!(o.prediction.answer, a.prediction.answer);
                assert!(
                    ensemble::best_candidate(&o.candidates).is_none()
                        || (!o.prediction.masks.is_empty() && o.prediction.seg_issues.is_empty())
                );
            }
            Some(k) => {
                assert!(a.prediction.masks.is_empty() || !a.prediction.seg_issues.is_empty());
                assert_eq!(Some(k), ensemble::best_candidate(&o.candidates));
                let c = &o.candidates[k];
                assert_eq!(
                    (&o.prediction.answer, &o.prediction.ids, &o.prediction.masks),
                    (&c.answer, &c.ids, &c.masks)
                );
            }
        }
    }
}

/// `share_prompt` (the chat prompt prefilled once, its KV cache continued by the K samples,
/// the text pass and the seg pass) computes what re-reading the prompt in every pass computes
/// (the reference: the unshared passes, whose text pass equals a plain forward in
/// `ensemble_text_pass_without_gamma_and_p_hat_is_a_plain_forward`): with p_hat, seg
/// feedback and both gammas on, the same sampled ids (exactly), log-probs and f_k^n (1e-4),
/// the same y_tilde, seg-pass states of y_tilde's piece (1e-4), and the same predictions.
#[test]
fn shared_prompt_equals_rereading() {
    let w = world();
    let dev = Default::default();
    let mut b = bundle::open::<B>(&w.model, &dev).unwrap();
    let p = Predictor::new(&b.model, &mut b.tokenizer).unwrap();
    let samples: Vec<Sample> = read_shard(&w.train).unwrap();
    let images: Vec<image::RgbImage> = samples[..3].iter().map(|s| s.decode_image().unwrap()).collect();
    let pre = p.preprocess(&images.iter().collect::<Vec<_>>()).unwrap();
    let feats = p.model.encode_images(&pre).unwrap();
    let instrs: Vec<&str> = samples[..3].iter().map(|s| s.instruction.as_str()).collect();
    let close = |a: &[f32], b: &[f32], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}");
        let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d <= 1e-4, "{what}: differs by {d}");
    };
    let s = settings();
    let run = |share: bool| {
        let q = ensemble::Questions::new(&p, &feats, &instrs, share).unwrap();
        assert_eq!(q.prompt.is_some(), share);
        let cands = ensemble::sample_candidates(&p, &feats, &q, &s).unwrap();
        let scores: Vec<ensemble::Scores> = cands.iter().map(|c| ensemble::scores(&p, c).unwrap()).collect();
        let refined = ensemble::refine(&p, &feats, &q, &cands, &scores, &s).unwrap();
        let tails =
            (0..3).map(|i| ensemble::seg_tail(&p, &cands[i], Some(&scores[i].eta), &refined[i].0, true)).collect();
        let (hidden, starts) = q.forward(&p, &feats, tails).unwrap();
        // y_tilde's piece (+ </s>) states per item.
        let h = hidden.dims()[2];
        let states: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                let st = *starts[i].last().unwrap();
                vals(
                    hidden
                        .clone()
                        .narrow(0, i, 1)
                        .narrow(1, st, refined[i].0.len() + 1)
                        .reshape([refined[i].0.len() + 1, h]),
                )
            })
            .collect();
        (cands, refined, states)
    };
    let (ca, ra, sa) = run(true);
    let (cb, rb, sb) = run(false);
    let mut groups = 0;
    for i in 0..3 {
        for (k, (x, y)) in ca[i].iter().zip(&cb[i]).enumerate() {
            assert_eq!(x.ids, y.ids, "item {i}, sample {k}");
            close(&x.logprobs, &y.logprobs, &format!("item {i}, sample {k}: log-probs"));
            assert_eq!(x.groups, y.groups);
            groups += x.groups.len();
            for (f, g) in x.f.iter().zip(&y.f) {
                close(f, g, &format!("item {i}, sample {k}: f"));
            }
        }
        assert_eq!(ra[i].0, rb[i].0, "item {i}: y_tilde");
        close(&ra[i].1, &rb[i].1, &format!("item {i}: y_tilde log-probs"));
        close(&sa[i], &sb[i], &format!("item {i}: seg-pass states"));
    }
    eprintln!("{groups} sampled seg groups compared");
    // A random model seldom closes a seg group: give every candidate two f_k^n (and eta) by
    // hand so that the seg pass feeds them back with gamma, and compare that pass.
    let width = p.model.config().num_scales() * p.model.config().out_dim;
    let mut fake = ca.clone();
    for (i, cs) in fake.iter_mut().enumerate() {
        for (k, c) in cs.iter_mut().enumerate() {
            c.f = (0..2)
                .map(|n| (0..width).map(|j| ((i * 31 + k * 7 + n * 3 + j) % 11) as f32 * 0.1 - 0.5).collect())
                .collect();
        }
    }
    let eta: Vec<Vec<f32>> = (0..3).map(|k| vec![0.2 * k as f32 - 0.2, 0.5]).collect();
    let seg = |share: bool| {
        let q = ensemble::Questions::new(&p, &feats, &instrs, share).unwrap();
        let tails = (0..3).map(|i| ensemble::seg_tail(&p, &fake[i], Some(&eta), &ra[i].0, true)).collect();
        let (hidden, starts) = q.forward(&p, &feats, tails).unwrap();
        (0..3)
            .map(|i| vals(hidden.clone().narrow(0, i, 1).narrow(1, *starts[i].last().unwrap(), ra[i].0.len() + 1)))
            .collect::<Vec<_>>()
    };
    let (fa, fb) = (seg(true), seg(false));
    for i in 0..3 {
        close(&fa[i], &fb[i], &format!("item {i}: seg pass with feedback"));
    }
    assert_ne!(fa[0], sa[0], "the fed-back f_k^n should change the states");
    // The whole ensemble, both ways.
    let items: Vec<(&image::RgbImage, &str)> = images.iter().zip(&instrs).map(|(im, x)| (im, *x)).collect();
    let a = ensemble::predict(&p, &items, &s).unwrap();
    let b = ensemble::predict(&p, &items, &EnsembleSettings { share_prompt: false, ..s.clone() }).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (&x.prediction.answer, &x.prediction.ids, x.prediction.masks.len()),
            (&y.prediction.answer, &y.prediction.ids, y.prediction.masks.len())
        );
    }
}

/// The "without segmentation embedding ensemble" ablation (`seg_feedback = false`,
/// `predict --ensemble-no-seg-feedback`): the seg pass's tail is the K answers + p_hat +
/// y_tilde without the fed-back `f_k^n`; with it, one SegFeedback piece of every group's f.
#[test]
fn seg_feedback_off_leaves_the_seg_embeddings_out() {
    let w = world();
    let dev = Default::default();
    let mut b = bundle::open::<B>(&w.model, &dev).unwrap();
    let p = Predictor::new(&b.model, &mut b.tokenizer).unwrap();
    let d = b.model.config().num_scales() * b.model.config().out_dim;
    let mut cands = vec![candidate(2, &[-0.1, -0.2]), candidate(1, &[-0.3])];
    for c in &mut cands {
        c.f = vec![vec![0.5; d]; c.groups.len()];
    }
    let fed = |on: bool| {
        ensemble::seg_tail(&p, &cands, None, &[5, 6], on)
            .iter()
            .filter_map(|part| match &part.segment {
                Segment::SegFeedback(t) => Some(t.dims()[0]),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(fed(true), vec![3]);
    assert_eq!(fed(false), Vec::<usize>::new());
    assert_eq!(
        ensemble::seg_tail(&p, &cands, None, &[5, 6], false).len(),
        cands.len() + 2,
        "K answers, p_hat, y_tilde"
    );
}

/// `--set KEY=VALUE` (every training stage): top-level and dotted keys take TOML values, a
/// bare word is a string, the result is validated, and unknown keys or bad values are errors
/// naming the override.
#[test]
fn set_overrides_reach_nested_keys_and_unknown_keys_fail() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let file = root.join("pipelines/ensemble-tiny.toml");
    let sets = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let c = EnsembleConfig::load_with(
        Some(&file),
        None,
        None,
        &sets(&["adapt_steps=0", "train_seg_feedback=false", "ensemble.k=2", "si_pairing=positional"]),
    )
    .unwrap();
    assert_eq!((c.adapt_steps, c.train_seg_feedback, c.ensemble.k), (0, false, 2));
    assert_eq!(c.si_pairing, popen_train::ensemble_loss::Pairing::Positional);
    let base = EnsembleConfig::from_toml_file(&file).unwrap();
    assert_eq!(
        EnsembleConfig {
            adapt_steps: 0,
            train_seg_feedback: false,
            ensemble: EnsembleSettings { k: 2, ..base.ensemble.clone() },
            si_pairing: c.si_pairing,
            ..base
        },
        c
    );
    for (bad, want) in [
        ("adapt_stepz=1", "adapt_stepz"),
        ("ensemble.kk=1", "ensemble.kk"),
        ("adapt_steps", "KEY=VALUE"),
        ("adapt_steps=-1", "--set adapt_steps=-1"),
        ("ensemble.k=0", "k must be"),
    ] {
        let e = EnsembleConfig::load_with(Some(&file), None, None, &sets(&[bad])).unwrap_err().to_string();
        assert!(e.contains(want), "{bad}: {e}");
    }
}

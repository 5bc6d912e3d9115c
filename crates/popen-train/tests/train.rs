//! popen-train: losses, schedule, clipping, LoRA, the SFT loop (resume, NaN, errors),
//! prediction shards and the DPO stage (module `dpo`). One test binary.
//!
//! References: `tests/fixtures/sft_loss.json` was written by
//! `tools/reference/sft_loss_fixture.py` (PixelLM's own `dice_loss` / `sigmoid_ce_loss`,
//! torch's cross-entropy, DeepSpeed's WarmupDecayLR formula; torch 2.9.1). Clipping and LoRA
//! are checked against hand-computed values. `popen_eqs` (module): the preference and ensemble
//! equations against `tests/fixtures/popen_eqs.json` (`tools/reference/popen_eqs_fixture.py`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, Param};
use burn::nn::LinearConfig;
use burn::optim::GradientsParams;
use burn::prelude::*;
use popen_core::shard::{read_shard, write_shard, Prediction, Sample};
use popen_data::synth::{generate_sample, SynthConfig};
use popen_model::bundle;
use popen_model::pixellm::PixelLmConfig;
use popen_model::tokenizer::{Tokenizer, TINY_SPECIALS};
use popen_train::config::{Decay, Precision, SftConfig, Trainable};
use popen_train::{loss, params, schedule, sft, TrainError};
use serde_json::Value;

/// POPEN Eqs. 2-4 and the ensemble's scores and losses (tests/train/popen_eqs.rs).
#[path = "train/popen_eqs.rs"]
mod popen_eqs;

/// The DPO stage on real (collected) preference shards (tests/train/dpo.rs).
#[path = "train/dpo.rs"]
mod dpo;

type B = NdArray<f32>;
type AB = Autodiff<NdArray<f32>>;

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sft_loss.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn t2(v: &Value) -> Tensor<B, 2> {
    let rows: Vec<Vec<f32>> = serde_json::from_value(v.clone()).unwrap();
    let (h, w) = (rows.len(), rows[0].len());
    Tensor::from_data(TensorData::new(rows.concat(), [h, w]), &Default::default())
}

fn close(a: f32, b: f64, tol: f64, what: &str) {
    assert!((a as f64 - b).abs() <= tol * (1.0 + b.abs()), "{what}: {a} vs {b}");
}

#[test]
fn losses_match_pixellm_reference() {
    let fx = fixture();
    let pairs: Vec<(Tensor<B, 2>, Tensor<B, 2>)> =
        fx["masks"].as_array().unwrap().iter().map(|m| (t2(&m["logits"]), t2(&m["target"]))).collect();
    let lp = t2(&fx["logprobs"]);
    let lens: Vec<usize> = serde_json::from_value(fx["lens"].clone()).unwrap();
    let parts = loss::pixellm_loss(lp, &lens, pairs, (1.0, 2.0, 0.5));
    let v = |t: Tensor<B, 1>| t.into_scalar();
    assert_eq!((parts.tokens, parts.masks), (6, 3));
    close(v(parts.bce), fx["bce"].as_f64().unwrap(), 1e-5, "bce");
    close(v(parts.dice), fx["dice"].as_f64().unwrap(), 1e-5, "dice");
    close(v(parts.ce), fx["ce"].as_f64().unwrap(), 1e-5, "ce");
    close(v(parts.total), fx["total"].as_f64().unwrap(), 1e-5, "total");
}

#[test]
fn mask_losses_hand_computed() {
    let d = Default::default();
    // logit 0 everywhere: BCE = ln 2; DICE with an all-ones 2x2 target:
    // s = 0.5, num = 2 * 4 * 0.5 / 1000, den = (2 + 4) / 1000 -> 1 - (0.004 + 1e-6) / (0.006 + 1e-6).
    let z = Tensor::<B, 2>::zeros([2, 2], &d);
    let one = Tensor::<B, 2>::ones([2, 2], &d);
    close(loss::bce_mean(z.clone(), one.clone()).into_scalar(), std::f64::consts::LN_2, 1e-6, "bce");
    close(loss::dice(z, one).into_scalar(), 1.0 - (0.004 + 1e-6) / (0.006 + 1e-6), 1e-5, "dice");
    // No masks: the mask terms are exactly 0; CE of log-probs -1 and -3 is 2.
    let lp = Tensor::<B, 2>::from_data(TensorData::new(vec![-1.0f32, -3.0, -7.0], [1, 3]), &d);
    let p = loss::pixellm_loss(lp, &[2], vec![], (1.0, 2.0, 0.5));
    assert_eq!(p.bce.into_scalar(), 0.0);
    close(p.total.into_scalar(), 2.0, 1e-6, "ce only");
}

#[test]
fn schedule_matches_deepspeed_warmup_decay() {
    let fx = fixture();
    let s = &fx["schedule"];
    let total = s["total"].as_u64().unwrap() as usize;
    let warm = s["warmup"].as_u64().unwrap() as usize;
    let (lr, min) = (s["lr"].as_f64().unwrap(), s["min_lr"].as_f64().unwrap());
    for (i, want) in s["lrs"].as_array().unwrap().iter().enumerate() {
        let got = schedule::lr_at(i, total, warm, lr, min, Decay::Linear);
        assert!((got - want.as_f64().unwrap()).abs() < 1e-12, "step {i}: {got} vs {want}");
    }
    // Cosine: halfway through the decay it is midway; constant stays at the peak.
    // 25 steps, warmup 5: step 15 is halfway through the 20 decay steps.
    let mid = schedule::lr_at(15, 25, 5, lr, min, Decay::Cosine);
    assert!((mid - fx["cosine_mid"].as_f64().unwrap()).abs() < 1e-12);
    assert_eq!(schedule::lr_at(total - 1, total, warm, lr, min, Decay::Constant), lr);
    assert_eq!(schedule::lr_at(0, 10, 0, lr, min, Decay::Linear), lr);
}

#[derive(Module, Debug)]
struct Two<B: Backend> {
    a: Param<Tensor<B, 1>>,
    b: Param<Tensor<B, 2>>,
}

#[test]
fn global_norm_clipping_hand_computed() {
    let d = Default::default();
    let m = Two::<AB> {
        a: Param::from_tensor(Tensor::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &d)),
        b: Param::from_tensor(Tensor::from_data(TensorData::new(vec![1.0f32, 1.0, 1.0, 1.0], [2, 2]), &d)),
    };
    // loss = 3 * sum(a) + 4 * sum(b)/2 -> grads a: [3, 3], b: 2 everywhere;
    // norm = sqrt(9 + 9 + 4 * 4) = sqrt(34).
    let l = m.a.val().sum().mul_scalar(3.0) + m.b.val().sum().mul_scalar(2.0);
    let mut g = GradientsParams::from_grads(l.backward(), &m);
    let n = params::clip_global_norm::<AB, _>(&m, &mut g, 1.0);
    close(n, 34f64.sqrt(), 1e-6, "norm");
    let ga: Tensor<B, 1> = g.get(m.a.id).unwrap();
    let want = 3.0 / (34f64.sqrt() + 1e-6);
    close(ga.into_data().to_vec::<f32>().unwrap()[0], want, 1e-6, "clipped a");
    close(params::grad_norm::<AB, _>(&m, &g), 1.0, 1e-5, "norm after clipping");
    // Below the threshold nothing changes.
    let n2 = params::clip_global_norm::<AB, _>(&m, &mut g, 10.0);
    close(n2, 1.0, 1e-5, "unchanged");
}

#[test]
fn lora_starts_at_the_base_and_merges_exactly() {
    let d = Default::default();
    let mut llm_cfg = popen_model::llama::LlamaConfig::tiny();
    llm_cfg.num_hidden_layers = 2;
    let base = llm_cfg.init::<B>(&d);
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 3], [1, 4]), &d);
    let run = |m: &popen_model::llama::Llama<B>| m.forward(ids.clone(), &mut m.new_cache()).unwrap().into_data();
    let want = run(&base);
    let targets: Vec<String> = ["q_proj", "v_proj", "down_proj"].iter().map(|s| s.to_string()).collect();
    let mut adapted = popen_model::lora::add(base, &targets, 4, 8.0, 0.0, &d).unwrap();
    assert_eq!(popen_model::lora::count(&adapted), 6);
    // B = 0: the adapted model equals the base.
    run(&adapted).assert_approx_eq::<f32>(&want, burn::tensor::Tolerance::absolute(1e-6));
    // Give every B random values: outputs change, and merging reproduces them.
    for l in adapted.model.layers.iter_mut() {
        for lo in [&mut l.self_attn.q_lora, &mut l.self_attn.v_lora, &mut l.mlp.down_lora] {
            let lo = lo.as_mut().unwrap();
            let [r, o] = lo.lora_b.weight.dims();
            lo.lora_b = LinearConfig::new(r, o).with_bias(false).init(&d);
        }
    }
    let adapted_out = run(&adapted);
    let diff = adapted_out
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .zip(want.to_vec::<f32>().unwrap())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff > 1e-3, "non-zero adapters must change the output (max diff {diff})");
    let merged = popen_model::lora::merge(adapted);
    assert_eq!(popen_model::lora::count(&merged), 0);
    run(&merged).assert_approx_eq::<f32>(&adapted_out, burn::tensor::Tolerance::absolute(1e-4));
    let e = popen_model::lora::add(llm_cfg.init::<B>(&d), &["qproj".to_string()], 4, 8.0, 0.0, &d).unwrap_err();
    assert!(e.contains("qproj") && e.contains("q_proj"), "{e}");
}

// ---- the SFT loop on a tiny model ----

struct World {
    _dir: tempfile::TempDir,
    model: PathBuf,
    train: PathBuf,
    root: PathBuf,
}

/// A tiny model folder and a 6-sample train shard from the embedded benchmark.
fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SynthConfig::default();
        let samples: Vec<Sample> = (0..6).map(|i| generate_sample(&cfg, "train", i).unwrap()).collect();
        let train = dir.path().join("train.parquet");
        write_shard(&train, samples.clone()).unwrap();
        let texts: Vec<String> = samples.iter().flat_map(|s| [s.instruction.clone(), s.answer.clone()]).collect();
        let mut tok = Tokenizer::train_tiny(texts.iter().map(String::as_str), 400, TINY_SPECIALS).unwrap();
        let mut mcfg = PixelLmConfig::tiny(512);
        mcfg.llm.num_hidden_layers = 2;
        tok.add_pixellm_tokens(mcfg.seg_group_len()).unwrap();
        let model = mcfg.init::<B>(&Default::default()).unwrap();
        let mdir = dir.path().join("init");
        bundle::save(&mdir, &model, &tok).unwrap();
        let root = dir.path().to_path_buf();
        World { _dir: dir, model: mdir, train, root }
    })
}

fn small_cfg() -> SftConfig {
    SftConfig {
        // 6 samples / batch 2 = 3 micro-batches per epoch; accumulation 2: 4.5 steps in 3
        // epochs, capped at 4.
        epochs: 3,
        max_steps: 4,
        batch_size: 2,
        grad_accum: 2,
        lr: 1e-3,
        warmup_steps: 1,
        trainable: Trainable::Full,
        precision: Precision::F32,
        checkpoint_every: 2,
        keep_checkpoints: 3,
        log_every: 1,
        ..SftConfig::default()
    }
}

fn weights_of(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let ck = popen_model::weights::Checkpoint::open(dir.join("model.safetensors")).unwrap();
    let m: popen_model::pixellm::PixelLm<B> = popen_model::weights::apply_checkpoint(
        PixelLmConfig::from_toml_file(dir.join("model.toml")).unwrap().init(&Default::default()).unwrap(),
        &ck,
        burn::tensor::DType::F32,
        false,
    )
    .unwrap();
    popen_model::weights::named_tensors(&m).into_iter().map(|(n, _, t)| (n, t)).collect()
}

#[test]
fn sft_resume_continues_exactly() {
    let w = world();
    let cfg = small_cfg();
    let run = |out: &Path, resume: bool, max_steps: usize| {
        let mut c = cfg.clone();
        c.max_steps = max_steps;
        let job =
            sft::SftJob { config: &c, init: &w.model, train: &w.train, out, resume, progress: false, sam_cache: None };
        sft::run::<AB>(&job, &Default::default())
    };
    // Straight through: 4 steps.
    let a = w.root.join("straight");
    let ra = run(&a, false, 4).unwrap();
    assert_eq!(ra.steps, 4);
    assert!(a.join("metrics.jsonl").is_file() && a.join("metrics.csv").is_file() && a.join("loss.png").is_file());
    let lines = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4, "{lines}");
    // Interrupted: the same job killed after step 2 (simulated by a checkpoint-only run whose
    // later checkpoints are removed), then resumed.
    let b = w.root.join("resumed");
    run(&b, false, 4).unwrap();
    std::fs::remove_dir_all(b.join("checkpoints/step-000004")).unwrap();
    std::fs::remove_dir_all(b.join("model")).unwrap();
    // Not resuming over existing checkpoints is refused.
    let e = run(&b, false, 4).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
    let rb = run(&b, true, 4).unwrap();
    assert_eq!(rb.resumed_from, Some(2));
    let (wa, wb) = (weights_of(&a.join("model")), weights_of(&b.join("model")));
    assert_eq!(wa.len(), wb.len());
    for ((na, va), (nb, vb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        assert_eq!(va, vb, "{na} differs after resume");
    }
    // The metrics of the resumed run line up with the straight one.
    let la: Vec<Value> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lb: Vec<Value> = std::fs::read_to_string(b.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(la.len(), lb.len());
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x["loss"], y["loss"]);
        assert_eq!(x["lr"], y["lr"]);
    }
    // A different config refuses to resume.
    let mut c2 = cfg.clone();
    c2.lr = 5e-4;
    let job = sft::SftJob {
        config: &c2,
        init: &w.model,
        train: &w.train,
        out: &b,
        resume: true,
        progress: false,
        sam_cache: None,
    };
    let e = sft::run::<AB>(&job, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("different config"), "{e}");
}

#[test]
fn sft_lora_trains_adapters_and_saves_plain_layout() {
    let w = world();
    let mut cfg = small_cfg();
    cfg.max_steps = 1;
    cfg.grad_accum = 1;
    cfg.trainable = Trainable::Lora;
    let out = w.root.join("lora");
    let job = sft::SftJob {
        config: &cfg,
        init: &w.model,
        train: &w.train,
        out: &out,
        resume: false,
        progress: false,
        sam_cache: None,
    };
    let r = sft::run::<AB>(&job, &Default::default()).unwrap();
    assert!(r.trainable_params < r.total_params / 2, "{r:?}");
    // The saved model is a plain PixelLM folder (adapters merged) and loads as one.
    let b = bundle::open::<B>(&r.model_dir, &Default::default()).unwrap();
    assert_eq!(popen_model::lora::count(&b.model.llm), 0);
    // The frozen CLIP tower did not move; the q_proj weights did (merged adapters).
    let before: std::collections::BTreeMap<String, Vec<f32>> = weights_of(&w.model).into_iter().collect();
    let after: std::collections::BTreeMap<String, Vec<f32>> = weights_of(&r.model_dir).into_iter().collect();
    let tower = before.keys().find(|k| k.starts_with("vision_tower.")).unwrap();
    assert_eq!(before[tower], after[tower]);
    let k_proj = before.keys().find(|k| k.ends_with("self_attn.k_proj.weight")).unwrap();
    assert_eq!(before[k_proj], after[k_proj], "k_proj has no adapter and is frozen");
}

#[test]
fn nan_loss_stops_and_names_the_last_checkpoint() {
    let w = world();
    // A model whose lm_head holds a NaN.
    let dir = w.root.join("nan-init");
    let mut b = bundle::open::<B>(&w.model, &Default::default()).unwrap();
    let head = b.model.llm.lm_head.take().unwrap();
    let [i, o] = head.weight.dims();
    let mut vals = head.weight.val().into_data().to_vec::<f32>().unwrap();
    vals[3] = f32::NAN;
    let weight = Param::from_tensor(Tensor::from_data(TensorData::new(vals, [i, o]), &Default::default()));
    b.model.llm.lm_head = Some(burn::nn::Linear { weight, bias: head.bias });
    bundle::save(&dir, &b.model, &b.tokenizer).unwrap();
    let cfg = small_cfg();
    let out = w.root.join("nan");
    let job = sft::SftJob {
        config: &cfg,
        init: &dir,
        train: &w.train,
        out: &out,
        resume: false,
        progress: false,
        sam_cache: None,
    };
    match sft::run::<AB>(&job, &Default::default()) {
        Err(TrainError::NonFinite { step, last_checkpoint, .. }) => {
            assert_eq!(step, 0);
            assert_eq!(last_checkpoint, "none");
        }
        other => panic!("expected a non-finite loss error, got {other:?}"),
    }
    assert!(!out.join("model").exists(), "no model is written after a NaN");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let w = world();
    let cfg = small_cfg();
    let missing = w.root.join("no-such-model");
    let out = w.root.join("err");
    let job = sft::SftJob {
        config: &cfg,
        init: &missing,
        train: &w.train,
        out: &out,
        resume: false,
        progress: false,
        sam_cache: None,
    };
    let e = sft::run::<AB>(&job, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("no-such-model"), "{e}");
    // Every sample too long: nothing to train on, with the reason.
    let mut c = cfg.clone();
    c.max_len = 16;
    let job = sft::SftJob {
        config: &c,
        init: &w.model,
        train: &w.train,
        out: &out,
        resume: false,
        progress: false,
        sam_cache: None,
    };
    let e = sft::run::<AB>(&job, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("exceed max_len 16"), "{e}");
    // Invalid configs name the field.
    let mut c = cfg.clone();
    c.batch_size = 0;
    assert!(c.validate().unwrap_err().contains("batch_size"));
    c = cfg.clone();
    c.trainable = Trainable::Lora;
    c.lora.targets = vec!["wq".into()];
    assert!(c.validate().unwrap_err().contains("wq"));
}

#[test]
fn predict_writes_a_consistent_shard() {
    let w = world();
    let out = w.root.join("pred.parquet");
    let cfg = popen_train::predict::PredictConfig {
        batch_size: 4,
        sampling: popen_model::sampling::SamplingConfig { max_new_tokens: 12, ..Default::default() },
        teacher_force: false,
        ensemble: None,
        sam_cache: None,
    };
    let r = popen_train::predict::run::<B>(
        &w.model,
        &w.train,
        &out,
        &cfg,
        popen_core::shardspec::ShardSpec::new(0, 1).unwrap(),
        false,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(r.predictions, 6);
    let preds = read_shard::<Prediction>(&out).unwrap();
    let samples = read_shard::<Sample>(&w.train).unwrap();
    for (p, s) in preds.iter().zip(&samples) {
        assert_eq!((&p.id, p.width, p.height), (&s.id, s.width, s.height));
        assert_eq!(p.token_ids.len(), p.token_logprobs.len());
        assert!(p.token_ids.len() <= 12);
        assert_eq!(p.masks.len(), p.seg_count());
    }
    assert!(w.root.join("pred.manifest.json").is_file());
    // Half of the samples with --shard 1/2.
    let out2 = w.root.join("pred-1.parquet");
    let r2 = popen_train::predict::run::<B>(
        &w.model,
        &w.train,
        &out2,
        &cfg,
        popen_core::shardspec::ShardSpec::new(1, 2).unwrap(),
        false,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(r2.predictions, 3);
    // Oracle text: the ground-truth answers, one mask per target, log-probs of every token.
    let out3 = w.root.join("pred-tf.parquet");
    let tf = popen_train::predict::PredictConfig { teacher_force: true, ..cfg };
    popen_train::predict::run::<B>(
        &w.model,
        &w.train,
        &out3,
        &tf,
        popen_core::shardspec::ShardSpec::new(0, 1).unwrap(),
        false,
        &Default::default(),
    )
    .unwrap();
    for (p, s) in read_shard::<Prediction>(&out3).unwrap().iter().zip(&samples) {
        assert_eq!(p.answer, s.answer);
        assert_eq!(p.masks.len(), s.target_masks.len());
        assert_eq!(p.token_ids.len(), p.token_logprobs.len());
        assert!(p.token_logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
    }
}

/// Issue 20 item 4: bad records are validated one by one before batching, skipped with
/// their reason (manifest + stderr warning), and their batch-mates still predicted. Generated
/// bad records: an instruction over the model's max_length and one whose prompt with the image
/// tokens passes max_position_embeddings (old code: fed to the LLM as is; a 34,000-token one
/// made a 7B batch allocate 148 GB), a 100000x1 image (old code: the whole batch failed in
/// preprocessing), bytes that are no image. All six records in ONE batch.
#[test]
fn predict_skips_bad_records_alone() {
    let w = world();
    let samples = read_shard::<Sample>(&w.train).unwrap();
    let mut long = samples[1].clone();
    long.id = "long".into();
    long.instruction = vec![long.instruction.as_str(); 120].join(" ");
    // Under max_length in text (493 tokens) but over the positions with the image tokens.
    let mut longish = samples[1].clone();
    longish.id = "longish".into();
    longish.instruction = vec![longish.instruction.as_str(); 60].join(" ");
    let mut strip = samples[2].clone();
    strip.id = "strip".into();
    strip.image = popen_core::imageio::uniform_png(100_000, 1, 128).unwrap();
    (strip.width, strip.height) = (100_000, 1);
    strip.answer = "Nothing.".into();
    strip.target_names.clear();
    strip.target_masks.clear();
    strip.target_instances.clear();
    strip.instance_names.clear();
    strip.instance_masks.clear();
    let mut junk = samples[3].clone();
    junk.id = "junk".into();
    junk.image = b"\x89PNG\r\n\x1a\n truncated".to_vec();
    let shard = w.root.join("bad-records.parquet");
    write_shard(&shard, vec![samples[0].clone(), long, longish, strip, junk, samples[4].clone()]).unwrap();
    let out = w.root.join("pred-bad.parquet");
    let cfg = popen_train::predict::PredictConfig {
        batch_size: 8,
        sampling: popen_model::sampling::SamplingConfig { max_new_tokens: 4, ..Default::default() },
        teacher_force: false,
        ensemble: None,
        sam_cache: None,
    };
    let one = popen_core::shardspec::ShardSpec::new(0, 1).unwrap();
    let r = popen_train::predict::run::<B>(&w.model, &shard, &out, &cfg, one, false, &Default::default()).unwrap();
    assert_eq!(r.predictions, 2);
    let ids: Vec<String> = read_shard::<Prediction>(&out).unwrap().into_iter().map(|p| p.id).collect();
    assert_eq!(ids, [samples[0].id.clone(), samples[4].id.clone()]);
    let m = popen_core::manifest::Manifest::read(w.root.join("pred-bad.manifest.json")).unwrap();
    let reasons: Vec<(&str, &str)> = m.skipped.iter().map(|s| (s.record.as_str(), s.reason.as_str())).collect();
    assert_eq!(reasons.iter().map(|r| r.0).collect::<Vec<_>>(), ["long", "longish", "strip", "junk"]);
    assert!(
        reasons[0].1.contains("instruction: prompt of")
            && reasons[0].1.contains("text tokens > the model's max_length 512"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].1.contains("image tokens) + 4 new tokens > the model's max_position_embeddings 512"),
        "{reasons:?}"
    );
    assert!(reasons[2].1.contains("image 100000x1: aspect 100000 > max_aspect 20"), "{reasons:?}");
    assert!(reasons[3].1.contains("corrupt"), "{reasons:?}");
    // Teacher forcing counts the answer against the positions too (prompt + answer tokens).
    let tf = popen_train::predict::PredictConfig { teacher_force: true, ..cfg };
    let r = popen_train::predict::run::<B>(
        &w.model,
        &shard,
        &w.root.join("pred-bad-tf.parquet"),
        &tf,
        one,
        false,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(r.predictions, 2);
}

/// The gradient SFT relies on for the masks, d loss / d f through the pixel decoder and the
/// postprocessing to the original image size, equals central finite differences (an
/// independent reference: the forward pass alone). Checked on a random tiny model and a
/// non-square benchmark image, for both scales' coordinates of f.
#[test]
fn mask_path_gradient_matches_finite_differences() {
    let w = world();
    let dev = Default::default();
    let mut b = bundle::open::<AB>(&w.model, &dev).unwrap();
    let p = popen_model::infer::Predictor::new(&b.model, &mut b.tokenizer).unwrap();
    let m = p.model;
    let sample = read_shard::<Sample>(&w.train).unwrap().remove(0);
    let img = sample.decode_image().unwrap();
    let feats = m.encode_images(&p.preprocess(&[&img]).unwrap()).unwrap();
    let (sc, od) = (m.config().num_scales(), m.config().out_dim);
    let n = sc * od;
    let f0: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32 / 11.0 - 1.0) * 1.5).collect();
    let weights =
        |h: usize, wd: usize| -> Vec<f32> { (0..h * wd).map(|i| ((i * 7919 % 101) as f32 / 50.0) - 1.0).collect() };
    let loss_of = |fv: &[f32], grad: bool| -> (f64, Vec<f32>) {
        let mut f = Tensor::<AB, 3>::from_data(TensorData::new(fv.to_vec(), [1, sc, od]), &dev);
        if grad {
            f = f.require_grad();
        }
        let (logits, _) = m.decode_masks(&feats, f.clone(), &[0]).unwrap();
        let [h, wd] = logits[0].dims();
        let r = Tensor::<AB, 2>::from_data(TensorData::new(weights(h, wd), [h, wd]), &dev);
        let loss = (logits[0].clone() * r).sum();
        let val = loss.clone().into_scalar().elem::<f64>();
        if !grad {
            return (val, vec![]);
        }
        let g = loss.backward();
        (val, f.grad(&g).unwrap().into_data().convert::<f32>().into_vec::<f32>().unwrap())
    };
    let (_, g) = loss_of(&f0, true);
    let gmax = g.iter().fold(0f32, |a, x| a.max(x.abs()));
    assert!(gmax > 0.0);
    let eps = 2e-2f32;
    let mut checked = 0;
    for k in (0..n).step_by(n / 16) {
        let (mut a, mut c) = (f0.clone(), f0.clone());
        a[k] += eps;
        c[k] -= eps;
        let fd = (loss_of(&a, false).0 - loss_of(&c, false).0) / (2.0 * eps as f64);
        let tol = 0.03 * gmax as f64 + 0.02 * fd.abs();
        assert!(
            (g[k] as f64 - fd).abs() <= tol,
            "f[{k}] (scale {}): autodiff {} vs finite differences {fd}",
            k / od,
            g[k]
        );
        checked += 1;
    }
    assert!(checked >= 16);
}

/// A tiny `sam_encoder` model (a small random TinyViT in place of MobileSAM's) on 6 samples
/// that share 2 images (3 questions per image).
fn sam_world(root: &Path) -> (PathBuf, PathBuf) {
    let cfg = SynthConfig { questions_per_image: 3, ..SynthConfig::default() };
    let samples: Vec<Sample> = (0..6).map(|i| generate_sample(&cfg, "train", i).unwrap()).collect();
    assert_eq!(samples[0].image, samples[2].image, "questions of one image share its bytes");
    assert_ne!(samples[0].image, samples[3].image);
    let train = root.join("train.parquet");
    write_shard(&train, samples.clone()).unwrap();
    let texts: Vec<String> = samples.iter().flat_map(|s| [s.instruction.clone(), s.answer.clone()]).collect();
    let mut tok = Tokenizer::train_tiny(texts.iter().map(String::as_str), 400, TINY_SPECIALS).unwrap();
    let mut mcfg = PixelLmConfig::tiny_sam(512);
    mcfg.llm.num_hidden_layers = 1;
    mcfg.image_size = 64;
    let tv = popen_model::tiny_vit::TinyVitConfig {
        img_size: 64,
        embed_dims: vec![8, 16, 32],
        depths: vec![1, 1, 1],
        num_heads: vec![1, 2, 2],
        window_sizes: vec![2, 2, 2],
        num_classes: 0,
        out_chans: 16,
        ..popen_model::tiny_vit::TinyVitConfig::mobile_sam()
    };
    let g = tv.output_hw(64, 64).0;
    mcfg.sam_encoder = Some(tv);
    mcfg.llm_image_grid = g;
    mcfg.out_dim = 16;
    mcfg.decoder = popen_model::pixel_decoder::MaskDecoderMultiScaleConfig {
        transformer_dim: 16,
        mlp_dim: 32,
        num_heads: 2,
        iou_head_hidden_dim: 16,
        image_embedding_size: g,
        input_image_size: 64,
        low_res_size: 4 * g,
        ..mcfg.decoder.clone()
    };
    mcfg.validate().unwrap();
    tok.add_pixellm_tokens(mcfg.seg_group_len()).unwrap();
    let model = mcfg.init::<B>(&Default::default()).unwrap();
    let mdir = root.join("init");
    bundle::save(&mdir, &model, &tok).unwrap();
    (mdir, train)
}

/// tiny-sam training: the SAM encoder never changes (always frozen), `freeze = ["decoder"]`
/// keeps the decoder too while the LLM trains, and the SAM embeddings kept in `sam_cache`
/// (one per distinct image) give the same run bit for bit when read back.
#[test]
fn sft_sam_encoder_frozen_cached_and_decoder_freezable() {
    let dir = tempfile::tempdir().unwrap();
    let (init, train) = sam_world(dir.path());
    let cache = dir.path().join("sam-cache");
    let cfg = SftConfig { freeze: vec!["decoder".into()], ..small_cfg() };
    let run = |out: &Path| {
        let job = sft::SftJob {
            config: &cfg,
            init: &init,
            train: &train,
            out,
            resume: false,
            progress: false,
            sam_cache: Some(&cache),
        };
        sft::run::<AB>(&job, &Default::default()).unwrap()
    };
    let a = dir.path().join("a");
    let r = run(&a);
    assert_eq!(r.steps, 4);
    let files: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let g = PixelLmConfig::from_toml_file(init.join("model.toml")).unwrap().patch_grid();
    assert_eq!(std::fs::metadata(&files[0]).unwrap().len() as usize, 2 * 16 * g * g * 4, "2 distinct images cached");
    let before = weights_of(&init);
    let after = weights_of(&a.join("model"));
    let mut changed = Vec::new();
    for ((n, x), (m, y)) in before.iter().zip(&after) {
        assert_eq!(n, m);
        if x != y {
            changed.push(n.clone());
        }
    }
    assert!(changed.iter().all(|n| !n.starts_with("sam_encoder.") && !n.starts_with("decoder.")), "{changed:?}");
    assert!(
        changed.iter().any(|n| n.starts_with("llm.")) && changed.iter().any(|n| n.starts_with("text_hidden_fcs.")),
        "{changed:?}"
    );
    // Second run: embeddings read from the cache; same result.
    let b = dir.path().join("b");
    run(&b);
    assert_eq!(weights_of(&b.join("model")), after);
    // A cache of the wrong size is recomputed, not trusted.
    std::fs::write(&files[0], b"junk").unwrap();
    let c = dir.path().join("c");
    run(&c);
    assert_eq!(weights_of(&c.join("model")), after);
}

#[test]
fn sft_config_rejects_unknown_freeze() {
    let cfg = SftConfig { freeze: vec!["decoderr".into()], ..small_cfg() };
    let e = cfg.validate().unwrap_err();
    assert!(e.contains("decoderr") && e.contains("text_hidden_fcs"), "{e}");
}

/// Data parallelism (issue 8): 2 and 3 CPU "devices" (threads sharing the CPU) splitting a
/// micro-batch of 4 give the same loss and the same gradient, parameter by parameter, as one
/// device with the whole micro-batch (the parts' CE weighted by token share, mask terms by
/// mask share: the exact gradient of the whole micro-batch's loss, up to float rounding).
/// (Adam's update is compared through a whole run below only for the loss: it divides by
/// sqrt(v), which turns rounding noise on parameters with zero true gradient, e.g. attention
/// key biases, into visible steps.)
#[test]
fn sft_data_parallel_equals_one_device() {
    use burn::module::ModuleVisitor;
    use burn::train::TrainStep;
    let w = world();
    let dev: burn::tensor::Device<AB> = Default::default();
    let cfg = SftConfig { batch_size: 4, grad_accum: 1, max_steps: 2, ..small_cfg() };
    let bundle::Bundle { model, mut tokenizer, .. } = bundle::open::<AB>(&w.model, &dev).unwrap();
    let pcfg = model.config().clone();
    let tokens = tokenizer.add_pixellm_tokens(pcfg.seg_group_len()).unwrap();
    let samples = read_shard::<Sample>(&w.train).unwrap();
    let (examples, _) = popen_train::data::prepare(
        samples,
        &tokenizer,
        &tokens,
        pcfg.seg_group_len(),
        pcfg.image_tokens(),
        cfg.max_len,
    );
    let exs: Vec<&popen_train::data::Example> = examples.iter().take(4).collect();
    let pre = popen_model::preprocess::Preprocessor::pixellm(pcfg.image_size);
    let model = sft::SftModel { pixellm: model };
    let one = model.step(sft::make_batch(&exs, &pre, &cfg).unwrap());
    let one_stats = one.item.0.unwrap();
    let g1 = one.grads;
    struct Cmp<'a>(&'a GradientsParams, &'a GradientsParams, f32, usize);
    impl ModuleVisitor<AB> for Cmp<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AB, D>>) {
            let a = self.0.get::<B, D>(p.id);
            let b = self.1.get::<B, D>(p.id);
            match (a, b) {
                (Some(a), Some(b)) => {
                    let scale = a.clone().abs().max().into_scalar().max(1e-3);
                    let d = (a - b).abs().max().into_scalar() / scale;
                    self.2 = self.2.max(d);
                    self.3 += 1;
                }
                (None, None) => {}
                _ => panic!("a gradient exists on one side only"),
            }
        }
    }
    for d in [2usize, 3] {
        let devices = vec![dev; d];
        let (g, stats) = sft::parallel_step(&model, &exs, &pre, &cfg, &devices).unwrap();
        assert!((stats.loss - one_stats.loss).abs() < 1e-5, "{d} devices: loss {} vs {}", stats.loss, one_stats.loss);
        assert!((stats.ce - one_stats.ce).abs() < 1e-5 && (stats.dice - one_stats.dice).abs() < 1e-5);
        assert_eq!((stats.tokens, stats.masks), (one_stats.tokens, one_stats.masks));
        let mut c = Cmp(&g1, &g, 0.0, 0);
        model.visit(&mut c);
        assert!(c.3 > 50, "compared {} gradients", c.3);
        assert!(c.2 < 1e-4, "{d} devices: a gradient differs by {} (relative to its largest entry)", c.2);
    }
    // Through the trainer: the same losses with 2 devices as with 1.
    let run = |devices: usize, out: &Path| {
        let c = SftConfig { devices, ..cfg.clone() };
        let job = sft::SftJob {
            config: &c,
            init: &w.model,
            train: &w.train,
            out,
            resume: false,
            progress: false,
            sam_cache: None,
        };
        sft::run::<AB>(&job, &Default::default()).unwrap()
    };
    let r1 = run(1, &w.root.join("dp-1"));
    let r2 = run(2, &w.root.join("dp-2"));
    assert!(
        (r1.final_loss.unwrap() - r2.final_loss.unwrap()).abs() < 1e-4,
        "{:?} vs {:?}",
        r1.final_loss,
        r2.final_loss
    );
    // A config asking for 0 devices is refused.
    assert!(SftConfig { devices: 0, ..small_cfg() }.validate().unwrap_err().contains("devices"));
}

/// The seg locator's loss, hand-computed: a 2x2 grid over an 8-pixel input (cells of 4
/// px); an 8x8 image (no resize) whose target covers the left half (cells 0 and 2 equally).
/// Uniform attention: CE = log 4; attention 1/2 on each target cell: log 2; an empty target
/// counts for nothing (mean over the one non-empty object).
#[test]
fn locate_loss_hand_cases() {
    type T = NdArray<f32>;
    let dev = Default::default();
    let left: Vec<f32> = (0..64).map(|k| if k % 8 < 4 { 1.0 } else { 0.0 }).collect();
    let t = (8usize, 8usize, left);
    let empty = (8usize, 8usize, vec![0.0f32; 64]);
    let sizes = [((8usize, 8usize), (8usize, 8usize))];
    let case = |att: Vec<f32>, gts: Vec<&(usize, usize, Vec<f32>)>| -> f32 {
        let n = gts.len();
        let a = Tensor::<T, 2>::from_data(TensorData::new(att, [n, 4]), &dev);
        sft::locate_loss(a, &gts, &vec![0; n], &sizes, 8).into_scalar()
    };
    let u = case(vec![0.25; 4], vec![&t]);
    assert!((u - 4f32.ln()).abs() < 1e-6, "{u}");
    let h = case(vec![0.5, 0.0, 0.5, 0.0], vec![&t]);
    assert!((h - 2f32.ln()).abs() < 1e-6, "{h}");
    let m = case(vec![0.5, 0.0, 0.5, 0.0, 0.25, 0.25, 0.25, 0.25], vec![&t, &empty]);
    assert!((m - 2f32.ln()).abs() < 1e-6, "{m}");
}

/// POPEN's ensemble inference and the ensemble-train stage (tests/train/ensemble.rs).
#[path = "train/ensemble.rs"]
mod ensemble;

/// The dpo and ensemble test worlds' inputs: 4 benchmark samples written to
/// `root/train.parquet`, a tiny BPE learnt from their texts with PixelLM's tokens, and a
/// tiny config cut to 1 LLM layer and 2 vision layers.
fn small_world(root: &Path) -> (PathBuf, Tokenizer, PixelLmConfig) {
    let samples: Vec<Sample> = (0..4).map(|i| generate_sample(&SynthConfig::default(), "train", i).unwrap()).collect();
    let train = root.join("train.parquet");
    let texts: Vec<String> = samples.iter().flat_map(|s| [s.instruction.clone(), s.answer.clone()]).collect();
    write_shard(&train, samples).unwrap();
    let mut tok = Tokenizer::train_tiny(texts.iter().map(String::as_str), 400, TINY_SPECIALS).unwrap();
    let mut mcfg = PixelLmConfig::tiny(512);
    mcfg.llm.num_hidden_layers = 1;
    mcfg.vision.num_hidden_layers = 2;
    mcfg.vision_select_layers = vec![-1, -2];
    tok.add_pixellm_tokens(mcfg.seg_group_len()).unwrap();
    (train, tok, mcfg)
}

/// Ensemble-aware SFT (SPEC 10.18, `SftConfig::ensemble_share`): which examples are shown in
/// the ensemble layout and with which candidates is a pure function of (seed, micro-batch);
/// candidates are the example's own answer or a sibling's (same image); the SFT loss of such
/// an example is the text CE of POPEN's stage-3 layout (`ensemble::text_rows`, without gamma,
/// then the ground-truth answer: the warm-up's text pass); p_hat receives a gradient only from
/// ensemble-layout examples; and a run with the option resumes exactly.
#[test]
fn sft_ensemble_layout_examples() {
    use burn::train::TrainStep;
    use popen_train::data::{self, Example};
    let w = world();
    let dev: burn::tensor::Device<AB> = Default::default();
    let bundle::Bundle { model, mut tokenizer, .. } = bundle::open::<AB>(&w.model, &dev).unwrap();
    let pcfg = model.config().clone();
    assert!(pcfg.prompt_embeddings > 0);
    let tokens = tokenizer.add_pixellm_tokens(pcfg.seg_group_len()).unwrap();
    let samples = read_shard::<Sample>(&w.train).unwrap();
    let (mut examples, _) =
        data::prepare(samples.clone(), &tokenizer, &tokens, pcfg.seg_group_len(), pcfg.image_tokens(), 512);
    // Examples 0, 1 and 2 ask about one image (the benchmark asks several questions per
    // image); the others have no sibling.
    for i in [1, 2] {
        examples[i].image = examples[0].image.clone();
    }
    let sib = data::siblings(&examples);
    assert_eq!(sib[0], [1, 2]);
    assert_eq!(sib[1], [0, 2]);
    assert!(sib[3..].iter().all(Vec::is_empty));
    let idx: Vec<usize> = (0..examples.len()).collect();
    let draw = |m: usize, share: f64| data::with_candidates(&examples, &sib, &idx, m, 7, share, 3, 0.4, 10, 512);
    assert!(draw(0, 0.0).iter().all(Option::is_none));
    let a = draw(3, 1.0);
    assert_eq!(
        a.iter().map(|e| e.as_ref().map(|e| e.candidates.clone())).collect::<Vec<_>>(),
        draw(3, 1.0).iter().map(|e| e.as_ref().map(|e| e.candidates.clone())).collect::<Vec<_>>(),
        "the same (seed, micro-batch) draws the same"
    );
    let (mut own, mut other) = (0, 0);
    for m in 0..4 {
        for (i, e) in draw(m, 1.0).iter().enumerate().take(3) {
            for c in &e.as_ref().unwrap().candidates {
                if *c == examples[i].answer_ids {
                    own += 1;
                } else {
                    assert!(sib[i].iter().any(|&j| examples[j].answer_ids == *c), "a candidate is a sibling's answer");
                    other += 1;
                }
            }
        }
    }
    for (i, e) in a.iter().enumerate() {
        let e = e.as_ref().expect("share 1: every example in the ensemble layout");
        assert_eq!(e.candidates.len(), 3);
        if sib[i].is_empty() {
            assert!(e.candidates.iter().all(|c| *c == examples[i].answer_ids), "no sibling: the own answer");
        }
        let added: usize = e.candidates.iter().map(Vec::len).sum();
        assert_eq!(e.seq_len, examples[i].seq_len + added + 10);
    }
    assert!(own > 0 && other > 0, "own {own}, other {other}");
    let halves: usize = (0..20).map(|m| draw(m, 0.5).iter().filter(|e| e.is_some()).count()).sum();
    assert!((35..85).contains(&halves), "share 0.5 of 120 examples: {halves}");
    // max_len: an example that would not fit stays in PixelLM's layout.
    assert!(data::with_candidates(&examples, &sib, &idx, 3, 7, 1.0, 3, 0.4, 10, examples[0].seq_len)
        .iter()
        .all(Option::is_none));

    // The SFT loss of an ensemble-layout example = the stage-3 text layout's CE.
    let cfg = SftConfig { ce_weight: 1.0, ..small_cfg() };
    let pre = popen_model::preprocess::Preprocessor::pixellm(pcfg.image_size);
    let ens: &Example = a[0].as_ref().unwrap();
    let sm = sft::SftModel { pixellm: model.clone() };
    let parts = sm.loss(&sft::make_batch(&[ens], &pre, &cfg).unwrap()).unwrap();
    let ce_sft = parts.ce.clone().into_scalar();
    let plain = sm.loss(&sft::make_batch(&[&examples[0]], &pre, &cfg).unwrap()).unwrap().ce.into_scalar();
    assert!((ce_sft - plain).abs() > 1e-4, "the candidates change the loss");
    let pred = popen_model::infer::Predictor::new(&model, &mut tokenizer).unwrap();
    let cands: Vec<popen_train::ensemble::Candidate> = ens
        .candidates
        .iter()
        .map(|c| popen_train::ensemble::Candidate {
            ids: c[..c.len() - 1].to_vec(),
            logprobs: Vec::new(),
            groups: Vec::new(),
            f: Vec::new(),
            masks: Vec::new(),
            mask_scores: Vec::new(),
            answer: String::new(),
        })
        .collect();
    let mut row = popen_train::ensemble::text_rows(&pred, &samples[0].instruction, 0, &cands, None).unwrap();
    row.push(popen_model::pixellm::Part::new(popen_model::pixellm::Segment::Tokens(ens.answer_ids.clone())));
    let img = ens.decode_image().unwrap();
    let feats = model.encode_images(&[pre.apply(&img).unwrap()]).unwrap();
    let asm = model.assemble(&[row], Some(&feats), popen_model::pixellm::Padding::Right).unwrap();
    let start = *asm.piece_starts[0].last().unwrap();
    let hidden = model.forward_hidden(&asm).unwrap();
    let lp = model.response_logprobs(hidden, &[(start, ens.answer_ids.clone())]).unwrap();
    let ce_stage3 = -lp.mean().into_scalar();
    assert!((ce_sft - ce_stage3).abs() < 1e-5, "SFT {ce_sft} vs stage-3 layout {ce_stage3}");

    // p_hat learns from ensemble-layout examples only.
    let p_id = model.prompt_embeddings.as_ref().unwrap().id;
    let g_ens = sm.step(sft::make_batch(&[ens], &pre, &cfg).unwrap()).grads;
    let g = g_ens.get::<B, 2>(p_id).expect("p_hat has a gradient");
    assert!(g.abs().max().into_scalar() > 0.0);
    let g_plain = sm.step(sft::make_batch(&[&examples[0]], &pre, &cfg).unwrap()).grads;
    assert!(g_plain.get::<B, 2>(p_id).is_none_or(|g| g.abs().max().into_scalar() == 0.0));

    // Resume is exact with the option on.
    let c = SftConfig { ensemble_share: 0.5, max_steps: 4, ..small_cfg() };
    let run = |out: &Path, resume: bool| {
        let job =
            sft::SftJob { config: &c, init: &w.model, train: &w.train, out, resume, progress: false, sam_cache: None };
        sft::run::<AB>(&job, &Default::default()).unwrap()
    };
    let (s, r) = (w.root.join("ens-straight"), w.root.join("ens-resumed"));
    run(&s, false);
    run(&r, false);
    std::fs::remove_dir_all(r.join("checkpoints/step-000004")).unwrap();
    std::fs::remove_dir_all(r.join("model")).unwrap();
    assert_eq!(run(&r, true).resumed_from, Some(2));
    assert_eq!(weights_of(&s.join("model")), weights_of(&r.join("model")));
}

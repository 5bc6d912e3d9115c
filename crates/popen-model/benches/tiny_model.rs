//! PixelLM `tiny` step benchmark on CPU: `cargo bench -p popen-model --bench tiny_model`.
//!
//! One training-like step of [`PixelLmConfig::tiny`] (vocab 1000), the same step that
//! `tools/reference/bench_tiny_model.py` runs in PyTorch (see docs/bench-model.md):
//! - batch of 4 samples, each a 128x128 model input made from a non-square original
//!   (640x480, 427x640, 500x300, 384x512: longest side resized to 128, zero padding, so the
//!   ViT key mask and the LLM image-token mask are in use);
//! - each row: 12-15 prompt tokens, `<im_start>`, 64 image tokens, `<im_end>`, 8 question
//!   tokens, then a 24-token answer holding 2 segmentation groups of 6 codebook tokens;
//!   rows are right-padded to the longest (113);
//! - forward = `encode_images` + `assemble` + `forward_hidden` + lm_head on the answer
//!   positions + cross-entropy (`response_logprobs`) + `seg_embeddings` + pixel decoder
//!   low-res masks (64x64) + BCE-with-logits against a fixed target; loss = CE + 2 BCE
//!   (PixelLM's weights);
//! - forward+backward = the same on `Autodiff<backend>` plus `loss.backward()`.
//!
//! Timing: `TINY_BENCH_WARMUP` (3) untimed steps, then `TINY_BENCH_ITERS` (20) timed ones;
//! median, quartiles, min and max per mode, and the median of each stage of the forward.
//! Plain `std::time` (no criterion) to keep compile time low; every step ends by reading the
//! loss (and, for training, after `backward`), so the numbers hold for lazy backends too.
//!
//! Backends (one build each; the cargo features only exist for this benchmark):
//! - default features: `NdArray` exactly as the workspace configures burn (`std` only:
//!   no SIMD kernels, no rayon, single-threaded matrixmultiply);
//! - `--features bench-ndarray-mt`: `NdArray` with burn-ndarray's default `simd` +
//!   `multi-threads`;
//! - `--features bench-openblas`: the above plus `blas-openblas-system` (Debian
//!   `libopenblas-dev`);
//! - `--features bench-flex`: burn's pure-Rust `Flex` backend (gemm, rayon, SIMD), run in
//!   addition to `NdArray` (`TINY_BENCH_BACKENDS=flex` runs it alone).
//!
//! Results are merged, one entry per backend, into `target/bench-tiny-model.json`
//! (`TINY_BENCH_OUT`). When `target/bench-tiny-model-pytorch.json` (written by the Python
//! reference; `TINY_BENCH_REFERENCE`) exists, the table gets the PyTorch columns and ratios.

use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;
use popen_model::pixellm::{Padding, Part, PixelLm, PixelLmConfig, Segment};
use popen_model::preprocess::{Preprocessed, Preprocessor};
use serde_json::{json, Value};

type Res<T> = Result<T, Box<dyn Error>>;

const VOCAB: usize = 1000;
/// `<im_start>`, `<im_end>` and the first codebook token (`[SEG0]`..`[SEG5]` = 990..995).
const IM_START: u32 = 997;
const IM_END: u32 = 998;
const SEG0: u32 = 990;
const EOS: u32 = 2;
/// Originals (h, w): all non-square, so every image has padding.
const ORIGINALS: [(usize, usize); 4] = [(480, 640), (640, 427), (300, 500), (512, 384)];
/// Answer layout: 3 words, group, 3 words, group, 5 words, EOS = 24 tokens.
const ANSWER_LEN: usize = 24;
const GROUP_STARTS: [usize; 2] = [3, 12];
const STAGES: [&str; 5] = ["encode_images", "assemble", "llm", "lm_head+ce", "seg+decoder+bce"];

/// Ordinary token ids, deterministic and below the special ids.
fn tok(row: usize, i: usize) -> u32 {
    10 + ((row * 131 + i * 37) % 900) as u32
}

/// The step's inputs, independent of the backend (built once, outside the timing).
struct Workload {
    images: Vec<Preprocessed>,
    /// Per row: tokens before `<im_start>`, tokens after `<im_end>`, the answer.
    rows: Vec<(Vec<u32>, Vec<u32>, Vec<u32>)>,
    /// Fixed mask targets [objects, 64, 64] in {0, 1}.
    target: Vec<f32>,
    low_res: usize,
}

fn workload(cfg: &PixelLmConfig) -> Workload {
    let s = cfg.image_size;
    let pre = Preprocessor::pixellm(s);
    let images = ORIGINALS
        .iter()
        .enumerate()
        .map(|(i, &(h, w))| {
            let (rh, rw) = pre.resized_hw(h, w);
            let mut pixels = vec![0f32; 3 * s * s];
            for c in 0..3 {
                for y in 0..rh {
                    for x in 0..rw {
                        let v = ((x * 7 + y * 13 + c * 29 + i * 5) % 255) as f32;
                        pixels[c * s * s + y * s + x] = v / 64.0 - 2.0;
                    }
                }
            }
            Preprocessed { pixels, resized_hw: (rh, rw), original_hw: (h, w) }
        })
        .collect();
    let rows = (0..ORIGINALS.len())
        .map(|r| {
            let before: Vec<u32> = (0..12 + r).map(|i| tok(r, i)).collect();
            let after: Vec<u32> = (0..8).map(|i| tok(r, 100 + i)).collect();
            let mut answer: Vec<u32> = (0..ANSWER_LEN).map(|i| tok(r, 200 + i)).collect();
            for g in GROUP_STARTS {
                for j in 0..cfg.seg_group_len() {
                    answer[g + j] = SEG0 + j as u32;
                }
            }
            answer[ANSWER_LEN - 1] = EOS;
            (before, after, answer)
        })
        .collect();
    let low_res = cfg.decoder.low_res_size;
    let n_obj = ORIGINALS.len() * GROUP_STARTS.len();
    let mut target = vec![0f32; n_obj * low_res * low_res];
    for o in 0..n_obj {
        let (cy, cx, rad) = (16.0 + 4.0 * o as f32, 32.0, 12.0 + o as f32);
        for y in 0..low_res {
            for x in 0..low_res {
                let (dy, dx) = (y as f32 - cy, x as f32 - cx);
                if dy * dy + dx * dx <= rad * rad {
                    target[(o * low_res + y) * low_res + x] = 1.0;
                }
            }
        }
    }
    Workload { images, rows, target, low_res }
}

/// `mean(max(x, 0) - x t + log(1 + exp(-|x|)))`: PyTorch's `binary_cross_entropy_with_logits`.
fn bce_with_logits<B: Backend>(x: Tensor<B, 3>, t: Tensor<B, 3>) -> Tensor<B, 1> {
    let stable = x.clone().abs().neg().exp().log1p();
    (x.clone().clamp_min(0.0) - x * t + stable).mean()
}

/// The step's loss; `lap(k)` is called when stage `k` of [`STAGES`] is done.
fn step<B: Backend>(
    model: &PixelLm<B>,
    w: &Workload,
    target: &Tensor<B, 3>,
    lap: &mut dyn FnMut(usize),
) -> Res<Tensor<B, 1>> {
    let feats = model.encode_images(&w.images)?;
    lap(0);
    let rows: Vec<Vec<Part<B>>> = w
        .rows
        .iter()
        .enumerate()
        .map(|(r, (before, after, answer))| {
            let mut pre = before.clone();
            pre.push(IM_START);
            let mut post = vec![IM_END];
            post.extend_from_slice(after);
            vec![
                Part::new(Segment::Tokens(pre)),
                Part::new(Segment::Image(r)),
                Part::new(Segment::Tokens(post)),
                Part::new(Segment::Tokens(answer.clone())),
            ]
        })
        .collect();
    let asm = model.assemble(&rows, Some(&feats), Padding::Right)?;
    lap(1);
    let hidden = model.forward_hidden(&asm)?;
    lap(2);
    let starts: Vec<usize> =
        asm.piece_starts.iter().map(|p| p.last().copied().ok_or("row without pieces")).collect::<Result<_, _>>()?;
    let targets: Vec<(usize, Vec<u32>)> = starts.iter().zip(&w.rows).map(|(&s, row)| (s, row.2.clone())).collect();
    let ce = model.response_logprobs(hidden.clone(), &targets)?.mean().neg();
    lap(3);
    let group = model.config().seg_group_len();
    let objects: Vec<(usize, Vec<usize>)> = starts
        .iter()
        .enumerate()
        .flat_map(|(r, &s)| GROUP_STARTS.iter().map(move |g| (r, (s + g..s + g + group).collect())))
        .collect();
    let image_index: Vec<usize> = objects.iter().map(|o| o.0).collect();
    let f = model.seg_embeddings(hidden, &objects)?;
    let out = model.decoder.forward(&feats.scales, f, &image_index)?;
    let bce = bce_with_logits(out.low_res_masks, target.clone());
    lap(4);
    Ok(ce + bce * 2.0)
}

fn target_tensor<B: Backend>(w: &Workload, device: &B::Device) -> Tensor<B, 3> {
    let n = w.target.len() / (w.low_res * w.low_res);
    Tensor::from_data(TensorData::new(w.target.clone(), [n, w.low_res, w.low_res]), device)
}

fn env_usize(name: &str, default: usize) -> Res<usize> {
    match std::env::var(name) {
        Ok(v) => Ok(v.parse().map_err(|e| format!("{name}={v}: {e}"))?),
        Err(_) => Ok(default),
    }
}

/// Summary of a list of durations in ms.
fn stats(v: &[f64]) -> Value {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        let i = p * (s.len() - 1) as f64;
        let (lo, hi) = (i.floor() as usize, i.ceil() as usize);
        s[lo] + (s[hi] - s[lo]) * (i - lo as f64)
    };
    json!({
        "median_ms": q(0.5), "p25_ms": q(0.25), "p75_ms": q(0.75),
        "min_ms": s[0], "max_ms": s[s.len() - 1], "n": s.len(),
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Both modes on one backend (default device); returns its JSON entry.
fn run_backend<B: Backend>(name: &str, w: &Workload, warmup: usize, iters: usize) -> Res<Value>
where
    Autodiff<B>: AutodiffBackend,
{
    let cfg = PixelLmConfig::tiny(VOCAB);
    let load_before = loadavg();

    // Forward only (inference: no autodiff).
    let device: B::Device = Default::default();
    let model: PixelLm<B> = cfg.init(&device)?;
    let params = model.num_params();
    let target = target_tensor::<B>(w, &device);
    let mut fwd = Vec::new();
    let mut stage_ms: Vec<Vec<f64>> = vec![Vec::new(); STAGES.len()];
    let mut loss_value = 0.0;
    for it in 0..warmup + iters {
        let t0 = Instant::now();
        let mut last = 0.0;
        let mut laps = [0.0; STAGES.len()];
        let loss = step(&model, w, &target, &mut |k| {
            let now = ms(t0);
            laps[k] = now - last;
            last = now;
        })?;
        loss_value = loss.into_scalar().elem::<f64>();
        let total = ms(t0);
        if it >= warmup {
            fwd.push(total);
            for (k, l) in laps.iter().enumerate() {
                stage_ms[k].push(*l);
            }
        }
    }
    drop(model);

    // Forward + backward on Autodiff<B>.
    let device = Default::default();
    let model: PixelLm<Autodiff<B>> = cfg.init(&device)?;
    let target = target_tensor::<Autodiff<B>>(w, &device);
    let (mut train, mut train_fwd, mut train_bwd) = (Vec::new(), Vec::new(), Vec::new());
    for it in 0..warmup + iters {
        let t0 = Instant::now();
        let loss = step(&model, w, &target, &mut |_| {})?;
        let _value = loss.clone().into_scalar();
        let t_fwd = ms(t0);
        let grads = loss.backward();
        let g = model.text_hidden_fcs.fc_1.weight.grad(&grads).ok_or("no gradient for text_hidden_fcs.fc_1.weight")?;
        let _ = g.sum().into_scalar();
        drop(grads);
        let total = ms(t0);
        if it >= warmup {
            train.push(total);
            train_fwd.push(t_fwd);
            train_bwd.push(total - t_fwd);
        }
    }
    let stages: serde_json::Map<String, Value> =
        STAGES.iter().zip(&stage_ms).map(|(n, v)| (n.to_string(), stats(v)["median_ms"].clone())).collect();
    Ok(json!({
        "backend": name,
        "params": params,
        "loss": loss_value,
        "forward": stats(&fwd),
        "forward_backward": stats(&train),
        "train_forward_part": stats(&train_fwd),
        "train_backward_part": stats(&train_bwd),
        "forward_stages_median_ms": stages,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }))
}

fn ndarray_name() -> &'static str {
    if cfg!(feature = "bench-openblas") {
        "ndarray+openblas"
    } else if cfg!(feature = "bench-ndarray-mt") {
        "ndarray+simd+mt"
    } else {
        "ndarray"
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

fn main() -> Res<()> {
    // `cargo bench` passes `--bench`; any other argument is a filter we do not have.
    let warmup = env_usize("TINY_BENCH_WARMUP", 3)?;
    let iters = env_usize("TINY_BENCH_ITERS", 20)?.max(1);
    let cfg = PixelLmConfig::tiny(VOCAB);
    let w = workload(&cfg);
    let wanted = std::env::var("TINY_BENCH_BACKENDS").unwrap_or_default();
    let want = |n: &str| wanted.is_empty() || wanted.split(',').any(|x| x.trim() == n);

    let mut results = Vec::new();
    if want("ndarray") {
        eprintln!("running {} ({warmup} warmup + {iters} steps per mode)...", ndarray_name());
        results.push(run_backend::<burn::backend::NdArray<f32>>(ndarray_name(), &w, warmup, iters)?);
    }
    #[cfg(feature = "bench-flex")]
    if want("flex") {
        eprintln!("running flex ({warmup} warmup + {iters} steps per mode)...");
        results.push(run_backend::<burn::backend::Flex>("flex", &w, warmup, iters)?);
    }
    // The GPU (burn-cuda; fusion + autotune: the first steps compile kernels, hence warmup).
    #[cfg(feature = "bench-cuda")]
    if want("cuda") {
        eprintln!("running cuda ({warmup} warmup + {iters} steps per mode)...");
        results.push(run_backend::<burn::backend::Cuda<f32, i32>>("cuda", &w, warmup, iters)?);
    }
    if results.is_empty() {
        return Err(format!("TINY_BENCH_BACKENDS={wanted}: no backend of this build matches").into());
    }

    let reference_path = std::env::var_os("TINY_BENCH_REFERENCE")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("bench-tiny-model-pytorch.json"));
    let reference: Option<Value> =
        std::fs::read_to_string(&reference_path).ok().and_then(|s| serde_json::from_str(&s).ok());
    let med = |v: &Value, k: &str| v[k]["median_ms"].as_f64();

    println!("\nPixelLM tiny step (batch 4, seq 113, 8 masks 64x64), median ms [p25-p75]:\n");
    println!("| backend | forward (ms) | forward+backward (ms) | PyTorch fwd (ms) | PyTorch fwd+bwd (ms) | ratio fwd | ratio fwd+bwd |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let cell = |v: &Value, k: &str| {
        format!(
            "{:.1} [{:.1}-{:.1}]",
            v[k]["median_ms"].as_f64().unwrap_or(f64::NAN),
            v[k]["p25_ms"].as_f64().unwrap_or(f64::NAN),
            v[k]["p75_ms"].as_f64().unwrap_or(f64::NAN)
        )
    };
    for r in &results {
        let (pf, pt) = match &reference {
            Some(p) => (med(p, "forward"), med(p, "forward_backward")),
            None => (None, None),
        };
        let ratio = |ours: Option<f64>, theirs: Option<f64>| match (ours, theirs) {
            (Some(a), Some(b)) => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let pcell = |k: &str| match &reference {
            Some(p) if p[k].is_object() => cell(p, k),
            _ => "-".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r["backend"].as_str().unwrap_or("?"),
            cell(r, "forward"),
            cell(r, "forward_backward"),
            pcell("forward"),
            pcell("forward_backward"),
            ratio(med(r, "forward"), pf),
            ratio(med(r, "forward_backward"), pt),
        );
    }
    println!("\nratio = popen / PyTorch (below 1 = popen faster).");
    match &reference {
        Some(p) => println!(
            "PyTorch reference: {} (torch {}, {} threads, params {}, load {})",
            reference_path.display(),
            p["torch"].as_str().unwrap_or("?"),
            p["threads"],
            p["params"],
            p["loadavg_before"].as_str().unwrap_or("?")
        ),
        None => println!(
            "no PyTorch reference at {} (run tools/reference/bench_tiny_model.py first)",
            reference_path.display()
        ),
    }
    for r in &results {
        println!(
            "\n{}: params {}, loss {:.4}, load {} -> {}; training step = forward {:.1} ms + backward {:.1} ms; forward stages (median ms):",
            r["backend"].as_str().unwrap_or("?"),
            r["params"],
            r["loss"].as_f64().unwrap_or(f64::NAN),
            r["loadavg_before"].as_str().unwrap_or("?"),
            r["loadavg_after"].as_str().unwrap_or("?"),
            med(r, "train_forward_part").unwrap_or(f64::NAN),
            med(r, "train_backward_part").unwrap_or(f64::NAN),
        );
        let theirs = reference.as_ref().map(|p| &p["forward_stages_median_ms"]);
        for s in STAGES {
            let ours = r["forward_stages_median_ms"][s].as_f64().unwrap_or(f64::NAN);
            match theirs.and_then(|t| t[s].as_f64()) {
                Some(t) => println!("  {s:<16} {ours:8.2}   (PyTorch {t:.2})"),
                None => println!("  {s:<16} {ours:8.2}"),
            }
        }
    }

    // Merge into the JSON file: one entry per backend, other backends' entries kept.
    let out = std::env::var_os("TINY_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("bench-tiny-model.json"));
    let mut all: Value = std::fs::read_to_string(&out)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .filter(|v: &Value| v["runs"].is_object())
        .unwrap_or_else(|| json!({ "runs": {} }));
    for r in results {
        let name = r["backend"].as_str().unwrap_or("?").to_string();
        all["runs"][name] = r;
    }
    all["workload"] = json!({
        "config": "PixelLmConfig::tiny(1000)", "batch": ORIGINALS.len(), "image_size": cfg.image_size,
        "originals_hw": ORIGINALS, "answer_len": ANSWER_LEN, "seg_groups_per_row": GROUP_STARTS.len(),
        "warmup": warmup, "iters": iters,
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&all)?)?;
    println!("\nwrote {}", out.display());
    Ok(())
}

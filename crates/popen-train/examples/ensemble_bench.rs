//! Latency of POPEN's ensemble inference (SPEC 7) against plain greedy inference, random
//! weights: `cargo run --release -p popen-train --example ensemble_bench [ITERS] [MAX_NEW_TOKENS]`.
//!
//! Per mode and batch size (1 and 4 items): `ENS_BENCH_WARMUP` (1) untimed runs, then ITERS
//! (5) timed ones of the whole call on decoded images (preprocess, image encoding,
//! generation, masks): plain = `Predictor::predict` (greedy), ensemble =
//! `popen_train::ensemble::predict` with K = 3 (temperature 0.7). A random model never
//! stops early, so every answer (the K samples and y_tilde) has MAX_NEW_TOKENS (24) tokens,
//! the worst case for the ensemble's longer prefixes. Median per call and the ratio; JSON to
//! target/bench-ensemble[-BACKEND-PRESET].json.
//!
//! `ENS_BENCH_BACKEND`: flex (CPU, default) or cuda (build with `--features bench-cuda` and
//! CUDARC_CUDA_VERSION=13000). `ENS_BENCH_PRESET`: tiny (default) or `1b`, the tiny model with
//! a LLaMA of 2048 hidden, 16 layers, 32 heads (~0.8 B parameters in its blocks: the LLM's share of the
//! time, as at real scale, dominates).

use std::time::Instant;

use burn::prelude::Backend;
use popen_data::synth::{generate_sample, SynthConfig};
use popen_model::infer::Predictor;
use popen_model::pixellm::PixelLmConfig;
use popen_model::sampling::SamplingConfig;
use popen_model::tokenizer::{Tokenizer, TINY_SPECIALS};
use popen_train::ensemble::{self, EnsembleSettings};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Res<()> {
    let backend = std::env::var("ENS_BENCH_BACKEND").unwrap_or_else(|_| "flex".into());
    let preset = std::env::var("ENS_BENCH_PRESET").unwrap_or_else(|_| "tiny".into());
    let rows = match backend.as_str() {
        "flex" => run::<burn::backend::Flex>(&preset, &Default::default())?,
        #[cfg(feature = "bench-cuda")]
        "cuda" => run::<burn::backend::Cuda<f32, i32>>(&preset, &Default::default())?,
        other => return Err(format!("ENS_BENCH_BACKEND={other}: not in this build (flex; cuda with --features bench-cuda)").into()),
    };
    let name = if (backend.as_str(), preset.as_str()) == ("flex", "tiny") { String::new() } else { format!("-{backend}-{preset}") };
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../target/bench-ensemble{name}.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&rows)?)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

fn run<B: Backend>(preset: &str, device: &B::Device) -> Res<Vec<serde_json::Value>> {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5);
    let max_new: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(24);
    let warmup: usize = std::env::var("ENS_BENCH_WARMUP").ok().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let samples: Vec<_> = (0..4).map(|i| generate_sample(&SynthConfig::default(), "val", i)).collect::<Result<_, _>>()?;
    let texts: Vec<String> = samples.iter().flat_map(|s| [s.instruction.clone(), s.answer.clone()]).collect();
    let mut tok = Tokenizer::train_tiny(texts.iter().map(String::as_str), 400, TINY_SPECIALS)?;
    let mut cfg = PixelLmConfig::tiny(512);
    match preset {
        "tiny" => {}
        "1b" => {
            cfg.llm.hidden_size = 2048;
            cfg.llm.intermediate_size = 5632;
            cfg.llm.num_hidden_layers = 16;
            cfg.llm.num_attention_heads = 32;
            cfg.llm.num_key_value_heads = 32;
            cfg.llm.max_position_embeddings = 2048;
        }
        other => return Err(format!("ENS_BENCH_PRESET={other}: tiny or 1b").into()),
    }
    tok.add_pixellm_tokens(cfg.seg_group_len())?;
    let model = cfg.init::<B>(device)?;
    let p = Predictor::new(&model, &mut tok)?;
    let images: Vec<image::RgbImage> = samples.iter().map(|s| s.decode_image()).collect::<Result<_, _>>()?;
    let greedy = SamplingConfig { max_new_tokens: max_new, ..Default::default() };
    let ens = EnsembleSettings { k: 3, max_new_tokens: max_new, ..Default::default() };
    let mut rows = Vec::new();
    for n in [1usize, 4] {
        let items: Vec<(&image::RgbImage, &str)> = images[..n].iter().zip(&samples[..n]).map(|(im, s)| (im, s.instruction.as_str())).collect();
        let mut plain = Vec::new();
        let mut ensemble_t = Vec::new();
        for it in 0..warmup + iters {
            let t = Instant::now();
            let a = p.predict(&items, &greedy)?;
            let dt_plain = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let b = ensemble::predict(&p, &items, &ens)?;
            let dt_ens = t.elapsed().as_secs_f64();
            if it >= warmup {
                plain.push(dt_plain);
                ensemble_t.push(dt_ens);
            }
            assert_eq!((a.len(), b.len()), (n, n));
        }
        let (mp, me) = (median(plain), median(ensemble_t));
        println!("| {preset}, {n} item(s), {max_new} new tokens | {:.1} ms | {:.1} ms | {:.2}x |", mp * 1e3, me * 1e3, me / mp);
        rows.push(serde_json::json!({"preset": preset, "items": n, "max_new_tokens": max_new, "k": 3, "plain_ms": mp * 1e3, "ensemble_ms": me * 1e3, "ratio": me / mp, "iters": iters}));
    }
    Ok(rows)
}

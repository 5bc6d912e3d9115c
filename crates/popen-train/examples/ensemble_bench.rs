//! Latency of POPEN's ensemble inference (SPEC 7) against plain greedy inference, random
//! weights: `cargo run --release -p popen-train --example ensemble_bench [ITERS] [MAX_NEW_TOKENS]`.
//!
//! Per mode and batch size (1 and 4 items): `ENS_BENCH_WARMUP` (1) untimed runs, then ITERS
//! (5) timed ones of the whole call on decoded images (preprocess, image encoding,
//! generation, masks): plain = `Predictor::predict` (greedy), ensemble =
//! `popen_train::ensemble::predict` with K = 3 (temperature 0.7), once re-reading the chat
//! prompt in every pass (`share_prompt = false`) and once prefilling it once for all passes
//! (`share_prompt = true`, the default). A random model never
//! stops early, so every answer (the K samples and y_tilde) has MAX_NEW_TOKENS (24) tokens,
//! the worst case for the ensemble's longer prefixes. Median per call and the ratio; JSON to
//! target/bench-ensemble[-BACKEND-PRESET].json.
//!
//! `ENS_BENCH_BACKEND`: flex (CPU, default) or cuda (build with `--features bench-cuda` and
//! CUDARC_CUDA_VERSION=13000). `ENS_BENCH_PRESET`: tiny (default) or `1b`, the tiny model with
//! a LLaMA of 2048 hidden, 16 layers, 32 heads (~0.8 B parameters in its blocks: the LLM's share of the
//! time, as at real scale, dominates), or `smollm2`: the tiny model with the real pretrained
//! SmolLM2-135M-Instruct as its LLM (`make assets`; its tokenizer plus PixelLM's tokens, the
//! embedding grown as PixelLM grows it). A pretrained LM ends its answers and copies from its
//! context, so its refined answer can repeat a sample and the drafts can pay off; the random
//! presets never stop and never agree. Each row also reports the mean answer length and the
//! whether the refined answer repeats a sample (`ENS_BENCH_TEMPERATURE`, default 0.7, sets the
//! samples'; `ENS_BENCH_ITEMS`, default `1,4`, the batch sizes).

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
        other => {
            return Err(
                format!("ENS_BENCH_BACKEND={other}: not in this build (flex; cuda with --features bench-cuda)").into()
            )
        }
    };
    let name = if (backend.as_str(), preset.as_str()) == ("flex", "tiny") {
        String::new()
    } else {
        format!("-{backend}-{preset}")
    };
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
    let samples: Vec<_> =
        (0..4).map(|i| generate_sample(&SynthConfig::default(), "val", i)).collect::<Result<_, _>>()?;
    let texts: Vec<String> = samples.iter().flat_map(|s| [s.instruction.clone(), s.answer.clone()]).collect();
    let mut tok = Tokenizer::train_tiny(texts.iter().map(String::as_str), 400, TINY_SPECIALS)?;
    let mut cfg = PixelLmConfig::tiny(512);
    let mut smol = None;
    match preset {
        "tiny" => {}
        "smollm2" => {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../data/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
            let g = popen_model::gguf::GgufFile::open(&path)
                .map_err(|e| format!("{}: {e} (run make assets)", path.display()))?;
            tok = Tokenizer::from_gguf(&g)?;
            let llm = popen_model::llama::LlamaConfig::from_gguf(&g)?;
            cfg.llm = llm.clone();
            smol = Some((g, llm));
        }
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
    if smol.is_some() {
        cfg.llm.vocab_size = tok.vocab_size();
    }
    let mut model = cfg.init::<B>(device)?;
    if let Some((g, llm)) = &smol {
        model.llm = popen_model::llama::load_gguf::<B>(llm, g, device)?.grow_vocab(tok.vocab_size())?;
    }
    let p = Predictor::new(&model, &mut tok)?;
    let images: Vec<image::RgbImage> = samples.iter().map(|s| s.decode_image()).collect::<Result<_, _>>()?;
    let greedy = SamplingConfig { max_new_tokens: max_new, ..Default::default() };
    let temperature: f32 = std::env::var("ENS_BENCH_TEMPERATURE").ok().map(|s| s.parse()).transpose()?.unwrap_or(0.7);
    let ens = EnsembleSettings { k: 3, max_new_tokens: max_new, temperature, ..Default::default() };
    let mut rows = Vec::new();
    let sizes: Vec<usize> = match std::env::var("ENS_BENCH_ITEMS") {
        Ok(v) => v.split(',').map(|x| x.trim().parse()).collect::<Result<_, _>>()?,
        Err(_) => vec![1, 4],
    };
    for n in sizes {
        let items: Vec<(&image::RgbImage, &str)> =
            images[..n].iter().zip(&samples[..n]).map(|(im, s)| (im, s.instruction.as_str())).collect();
        let reread = EnsembleSettings { share_prompt: false, ..ens.clone() };
        let (mut plain, mut ens_reread, mut ens_shared) = (Vec::new(), Vec::new(), Vec::new());
        for it in 0..warmup + iters {
            let t = Instant::now();
            let a = p.predict(&items, &greedy)?;
            let dt_plain = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let b = ensemble::predict(&p, &items, &reread)?;
            let dt_reread = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let c = ensemble::predict(&p, &items, &ens)?;
            let dt_shared = t.elapsed().as_secs_f64();
            if it >= warmup {
                plain.push(dt_plain);
                ens_reread.push(dt_reread);
                ens_shared.push(dt_shared);
            }
            assert_eq!((a.len(), b.len(), c.len()), (n, n, n));
        }
        // Where the shared ensemble's time goes: its steps called one by one.
        let mut phases: Vec<Vec<f64>> = vec![Vec::new(); 6];
        let (mut cand_len, mut tilde_len, mut repeats, mut count) = (0usize, 0usize, 0usize, 0usize);
        for it in 0..warmup + iters {
            let mut t = Instant::now();
            let mut lap = |k: usize, phases: &mut Vec<Vec<f64>>| {
                if it >= warmup {
                    phases[k].push(t.elapsed().as_secs_f64());
                }
                t = Instant::now();
            };
            let imgs: Vec<&image::RgbImage> = items.iter().map(|(im, _)| *im).collect();
            let feats = p.encode(&p.preprocess(&imgs)?)?;
            lap(0, &mut phases);
            let instrs: Vec<&str> = items.iter().map(|(_, x)| *x).collect();
            let q = ensemble::Questions::new(&p, &feats, &instrs, true)?;
            lap(1, &mut phases);
            let cands = ensemble::sample_candidates(&p, &feats, &q, &ens)?;
            lap(2, &mut phases);
            let scores: Vec<ensemble::Scores> =
                cands.iter().map(|c| ensemble::scores(&p, c)).collect::<Result<_, _>>()?;
            let refined = ensemble::refine(&p, &feats, &q, &cands, &scores, &ens)?;
            lap(3, &mut phases);
            for (cs, r) in cands.iter().zip(&refined) {
                cand_len += cs.iter().map(|c| c.ids.len()).sum::<usize>();
                tilde_len += r.0.len();
                repeats += cs.iter().any(|c| c.ids == r.0) as usize;
                count += 1;
            }
            let tails =
                (0..n).map(|i| ensemble::seg_tail(&p, &cands[i], Some(&scores[i].eta), &refined[i].0, true)).collect();
            let (hidden, _) = q.forward(&p, &feats, tails)?;
            let _ = hidden.into_data();
            lap(4, &mut phases);
        }
        let names = [
            "image encoding",
            "prompt prefill",
            "K samples (+ their masks)",
            "scores + refined answer",
            "seg pass (forward)",
        ];
        let breakdown: Vec<String> =
            names.iter().zip(&phases).map(|(nm, v)| format!("{nm} {:.1} ms", median(v.clone()) * 1e3)).collect();
        eprintln!("{preset}, {n} item(s), shared ensemble by step: {}", breakdown.join(", "));
        let (mean_cand, mean_tilde) =
            (cand_len as f64 / (count * 3).max(1) as f64, tilde_len as f64 / count.max(1) as f64);
        eprintln!(
            "{preset}, {n} item(s): mean sample length {mean_cand:.1} tokens, refined {mean_tilde:.1}; the refined answer repeats a sample in {repeats} of {count}"
        );
        let (mp, mr, ms) = (median(plain), median(ens_reread), median(ens_shared));
        println!(
            "| {preset}, {n} item(s), {max_new} new tokens | {:.1} ms | {:.1} ms ({:.2}x) | {:.1} ms ({:.2}x) |",
            mp * 1e3,
            mr * 1e3,
            mr / mp,
            ms * 1e3,
            ms / mp
        );
        rows.push(serde_json::json!({"preset": preset, "items": n, "max_new_tokens": max_new, "k": 3, "plain_ms": mp * 1e3,
            "ensemble_reread_ms": mr * 1e3, "ratio_reread": mr / mp, "ensemble_ms": ms * 1e3, "ratio": ms / mp, "iters": iters, "temperature": temperature,
            "mean_sample_tokens": mean_cand, "mean_refined_tokens": mean_tilde, "refined_repeats_a_sample": repeats, "refined_answers": count,
            "shared_steps_ms": names.iter().zip(&phases).map(|(nm, v)| (nm.to_string(), serde_json::json!(median(v.clone()) * 1e3))).collect::<serde_json::Map<_, _>>()}));
    }
    Ok(rows)
}

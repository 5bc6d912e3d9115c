//! Throughput of collect-ps's model work (README table, `make bench-prefs`): N_p
//! teacher-forced noise-filled copies of one sample, run in batches of `batch` (what
//! collect-ps does) against N_p single forwards, on a model folder and a samples shard.
//!
//! `cargo run -p popen-prefs --example collect_bench -- MODEL_DIR SAMPLES [N_p] [batch] [samples]`

use burn::backend::Flex;
use popen_core::shard::{read_shard, Sample};
use popen_model::infer::Predictor;
use popen_prefs::noise::{perturbation_seed, NoiseConfig, NoiseRecipe};
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let model_dir = std::path::PathBuf::from(a.get(1).map(String::as_str).unwrap_or("out/demo/sft/model"));
    let samples_path = a.get(2).map(String::as_str).unwrap_or("data/synth/val.parquet");
    let np: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(30);
    let batch: usize = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(10);
    let n: usize = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(3);
    let device = Default::default();
    let b = popen_model::bundle::open::<Flex>(&model_dir, &device).expect("model folder");
    let mut tok = b.tokenizer;
    let pred = Predictor::new(&b.model, &mut tok).expect("predictor");
    let samples: Vec<Sample> = read_shard(samples_path).expect("samples shard");
    let noise = NoiseConfig::default();
    // Warm-up (allocator, caches) outside the timings.
    if let Some(s) = samples.first() {
        let img = s.decode_image().unwrap();
        pred.teacher_force(&[(&img, s.instruction.as_str(), s.answer.as_str())]).unwrap();
        let items: Vec<_> = (0..batch).map(|_| (&img, s.instruction.as_str(), s.answer.as_str())).collect();
        pred.teacher_force(&items).unwrap();
    }
    let (mut batched, mut single) = (0f64, 0f64);
    for s in samples.iter().take(n) {
        let img = s.decode_image().unwrap();
        let copies: Vec<image::RgbImage> = (0..np)
            .map(|k| {
                let seed = perturbation_seed(0, &s.id, 0, k as u32);
                NoiseRecipe::draw(seed, img.width(), img.height(), &noise).unwrap().apply(&img).unwrap()
            })
            .collect();
        let t = Instant::now();
        for chunk in copies.chunks(batch) {
            let items: Vec<_> = chunk.iter().map(|c| (c, s.instruction.as_str(), s.answer.as_str())).collect();
            pred.teacher_force(&items).unwrap();
        }
        batched += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for c in &copies {
            pred.teacher_force(&[(c, s.instruction.as_str(), s.answer.as_str())]).unwrap();
        }
        single += t.elapsed().as_secs_f64();
    }
    let copies = (np * n) as f64;
    println!(
        "{}",
        serde_json::json!({
            "model": model_dir, "n_p": np, "batch": batch, "samples": n,
            "batched_copies_per_s": copies / batched, "single_copies_per_s": copies / single,
            "batched_s_per_sample": batched / n as f64, "single_s_per_sample": single / n as f64,
            "speedup": single / batched,
        })
    );
}

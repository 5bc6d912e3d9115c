//! CPU timing of MobileSAM in burn (docs/bench-sam.md, README table): image encoder
//! (`set_image`: preprocessing + TinyViT) and the whole automatic mask generator with
//! SAM's defaults, on one photo. The PyTorch numbers of the same machine come from
//! `tools/reference/mobile_sam_fixture.py` (its `timings`).
//!
//! `cargo run --release -p popen-sam --example sam_bench -- [image] [checkpoint] [encoder
//! runs] [generator runs]` (medians; defaults 3 and 1).

use popen_sam::amg::{generate, AmgConfig};
use popen_sam::model::{Sam, SamConfig, SamKind, SamPredictor};
use std::time::Instant;

type B = burn::backend::Flex;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let image = args.get(1).map(String::as_str).unwrap_or("data/assets/labelme/JPEGImages/2011_000003.jpg");
    let ck = args.get(2).map(String::as_str).unwrap_or("data/assets/mobile_sam/mobile_sam.pt");
    let runs: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let amg_runs: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
    let img = image::open(image).expect("readable image").to_rgb8();
    let device = Default::default();
    let model = Sam::<B>::load(SamKind::MobileSam, ck, &device).expect("checkpoint loads");
    let mut p = SamPredictor::new(model, SamConfig::preset(SamKind::MobileSam), &device);
    let mut enc = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        p.set_image(&img).unwrap();
        let e = p.embedding().unwrap();
        let _ = e.into_data();
        enc.push(t.elapsed().as_secs_f64());
    }
    let mut amg = Vec::new();
    let mut n = 0;
    for _ in 0..amg_runs {
        let t = Instant::now();
        let masks = generate(&mut p, &img, &AmgConfig::default(), &mut |_, _| {}).unwrap();
        n = masks.len();
        amg.push(t.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({
            "image": image, "size": [img.width(), img.height()],
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "set_image_s": median(enc), "amg_s": median(amg), "amg_masks": n,
        })
    );
}

//! How good can a frozen MobileSAM be on a samples shard when it is told where the target
//! is? For each target mask: a point prompt at the mask's centroid (single-mask output,
//! multimask output picked by predicted IoU, and the best of the three = oracle) and a box
//! prompt at the mask's bounding box, each scored by IoU against the target.
//!
//! `cargo run --release -p popen-sam --example prompt_ceiling -- SAMPLES.parquet N SIZE`
//! (SIZE = encoder input side: 1024 as SAM, 224 as the tiny-sam preset). On the embedded
//! benchmark's val split (40 samples, 57 targets) at 224: point 0.297, multimask by predicted
//! IoU 0.205, oracle 0.520, box 0.809: the decoder needs a box, not a point.
use burn::prelude::*;
use popen_core::shard::{read_shard, Sample};
use popen_model::weights::{apply_checkpoint, Checkpoint};
use popen_sam::model::*;
type B = burn::backend::NdArray<f32>;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dev = Default::default();
    if a.len() < 4 {
        eprintln!("usage: prompt_ceiling SAMPLES.parquet N SIZE");
        std::process::exit(2);
    }
    let samples: Vec<Sample> = read_shard(&a[1]).unwrap();
    let n_max: usize = a[2].parse().unwrap();
    let size: usize = a[3].parse().unwrap();
    let mut cfg = SamConfig::preset(SamKind::MobileSam);
    if size != 1024 {
        if let EncoderConfig::TinyVit(t) = &mut cfg.encoder {
            t.img_size = size;
        }
        cfg.image_size = size;
        cfg.prompt_encoder.image_embedding_size = (size / 16, size / 16);
        cfg.prompt_encoder.input_image_size = (size, size);
    }
    let model = cfg.init::<B>(&dev).unwrap();
    let mut ck = Checkpoint::open("data/assets/mobile_sam/mobile_sam.pt").unwrap();
    ck.tensors.retain(|n, _| !n.ends_with(".num_batches_tracked"));
    let model = apply_checkpoint(model, &ck, burn::tensor::DType::F32, false).unwrap();
    let mut p = SamPredictor::new(model, cfg, &dev);
    let mut s = [0f64; 5];
    let mut cnt = 0;
    for smp in samples.iter().take(n_max) {
        let im = smp.decode_image().unwrap();
        p.set_image(&im).unwrap();
        for rle in &smp.target_masks {
            let m = rle.decode().unwrap();
            let (h, w) = (m.height() as usize, m.width() as usize);
            let (mut sx, mut sy, mut sm) = (0f64, 0f64, 0f64);
            let (mut x0, mut y0, mut x1, mut y1) = (w as f64, h as f64, 0f64, 0f64);
            for y in 0..h {
                for x in 0..w {
                    if m.get(y as u32, x as u32) {
                        sx += x as f64;
                        sy += y as f64;
                        sm += 1.0;
                        x0 = x0.min(x as f64);
                        y0 = y0.min(y as f64);
                        x1 = x1.max(x as f64 + 1.0);
                        y1 = y1.max(y as f64 + 1.0);
                    }
                }
            }
            if sm == 0.0 {
                continue;
            }
            let pt = Prompt { points: vec![[sx / sm, sy / sm]], labels: vec![1], bbox: None };
            let bx = Prompt { points: vec![], labels: vec![], bbox: Some([x0, y0, x1, y1]) };
            let iou_of = |t: Tensor<B, 2>| -> f64 {
                let v = t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
                let pm = popen_core::mask::Mask::from_row_major(
                    h as u32,
                    w as u32,
                    v.iter().map(|&x| u8::from(x > 0.0)).collect(),
                )
                .unwrap();
                popen_core::mask::iou(&pm, &m).unwrap()
            };
            let r = p.predict(std::slice::from_ref(&pt), false).unwrap();
            s[0] += iou_of(r.masks.slice([0..1, 0..1, 0..h, 0..w]).reshape([h, w]));
            let r = p.predict(&[pt], true).unwrap();
            let ious = r.iou.into_data().convert::<f32>().into_vec::<f32>().unwrap();
            let best = (0..3).max_by(|&i, &j| ious[i].partial_cmp(&ious[j]).unwrap()).unwrap();
            let mut oracle = 0f64;
            for k in 0..3 {
                let v = iou_of(r.masks.clone().slice([0..1, k..k + 1, 0..h, 0..w]).reshape([h, w]));
                if k == best {
                    s[1] += v;
                }
                oracle = oracle.max(v);
            }
            s[2] += oracle;
            let r = p.predict(&[bx], false).unwrap();
            s[3] += iou_of(r.masks.slice([0..1, 0..1, 0..h, 0..w]).reshape([h, w]));
            cnt += 1;
        }
    }
    let c = cnt as f64;
    println!(
        "size {size}: {cnt} targets: point single {:.3}, point multimask best-pred {:.3}, oracle {:.3}, box {:.3}",
        s[0] / c,
        s[1] / c,
        s[2] / c,
        s[3] / c
    );
}

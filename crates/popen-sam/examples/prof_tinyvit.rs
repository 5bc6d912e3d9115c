use burn::prelude::*;
use popen_sam::model::{ImageEncoder, Sam, SamConfig, SamKind, SamPredictor};
use popen_sam::tiny_vit::Stage;
use std::time::Instant;
type B = burn::backend::Flex;
fn sync<const D: usize>(t: &Tensor<B, D>) { let _ = t.clone().into_data(); }
fn main() {
    let img = image::open("data/assets/labelme/JPEGImages/2011_000003.jpg").unwrap().to_rgb8();
    let device = Default::default();
    let model = Sam::<B>::load(SamKind::MobileSam, "data/assets/mobile_sam/mobile_sam.pt", &device).unwrap();
    let p = SamPredictor::new(model, SamConfig::preset(SamKind::MobileSam), &device);
    let (x, _) = p.preprocess(&img).unwrap();
    let ImageEncoder::TinyVit(enc) = &p.model.image_encoder else { panic!() };
    for _ in 0..2 {
        let t0 = Instant::now();
        let t = Instant::now();
        let g = enc.patch_embed.forward(x.clone()); sync(&g);
        eprintln!("patch_embed {:.2}s", t.elapsed().as_secs_f64());
        let Stage::Conv(l0) = &enc.layers[0] else { panic!() };
        let mut g = g;
        for (i, b) in l0.blocks.iter().enumerate() {
            let t = Instant::now();
            let c1 = b.conv1.forward(g.clone()); sync(&c1);
            let a = Instant::now(); let c1 = burn::tensor::activation::gelu(c1); sync(&c1); let ge = a.elapsed().as_secs_f64();
            let a = Instant::now(); let c2 = b.conv2.forward(c1); sync(&c2); let dw = a.elapsed().as_secs_f64();
            g = b.forward(g); sync(&g);
            eprintln!("mbconv {i} {:.2}s (gelu {ge:.2} dw {dw:.2})", t.elapsed().as_secs_f64());
        }
        let t = Instant::now();
        let (mut tok, mut hw) = l0.downsample.as_ref().unwrap().forward(g); sync(&tok);
        eprintln!("merge0 {:.2}s", t.elapsed().as_secs_f64());
        for s in &enc.layers[1..] {
            let Stage::Attn(l) = s else { panic!() };
            for (i, b) in l.blocks.iter().enumerate() {
                let t = Instant::now();
                tok = b.forward(tok, hw); sync(&tok);
                eprintln!("  block {i} at {hw:?} {:.2}s", t.elapsed().as_secs_f64());
            }
            if let Some(m) = &l.downsample {
                let t = Instant::now();
                let [bb, _, c] = tok.dims();
                (tok, hw) = m.forward(tok.swap_dims(1, 2).reshape([bb, c, hw[0], hw[1]])); sync(&tok);
                eprintln!("  merge {:.2}s", t.elapsed().as_secs_f64());
            }
        }
        eprintln!("total {:.2}s", t0.elapsed().as_secs_f64());
    }
}

//! The `tiny-sam` PixelLM preset started from `mobile_sam.pt` (`PixelLm::init_from_sam`):
//! its encoder and its one-scale decoder must compute exactly what the verified MobileSAM
//! model of this crate computes (which matches the official code, tests/sam/tiny_vit.rs),
//! i.e. the weight mapping puts every SAM tensor where SAM uses it.

use burn::prelude::*;
use burn::tensor::Distribution;
use popen_model::pixellm::PixelLmConfig;
use popen_model::preprocess::Preprocessor;
use popen_sam::model::{Sam, SamKind};

use crate::tiny_vit::{mobile_sam_path, Cpu};

fn max_rel(a: Tensor<Cpu, 1>, b: Tensor<Cpu, 1>) -> f32 {
    let scale = b.clone().abs().max().into_scalar().max(1e-6);
    (a - b).abs().max().into_scalar() / scale
}

#[test]
fn tiny_sam_preset_equals_mobile_sam() {
    let dev = Default::default();
    let ck = mobile_sam_path();
    let sam = Sam::<Cpu>::load(SamKind::MobileSam, &ck, &dev).unwrap();
    let cfg = PixelLmConfig::tiny_sam(800);
    let model = cfg.init::<Cpu>(&dev).unwrap().init_from_sam(&ck).unwrap();

    // Encoder: a synthetic 96x64 picture through PixelLM's (= SAM's) preprocessing at 224.
    let img =
        image::RgbImage::from_fn(96, 64, |x, y| image::Rgb([(x * 2) as u8, (y * 3) as u8, ((x * y) % 251) as u8]));
    let pre = Preprocessor::pixellm(cfg.image_size).apply(&img).unwrap();
    let ours = model.sam_embeddings(std::slice::from_ref(&pre)).unwrap().unwrap();
    let pixels = popen_model::preprocess::to_tensor::<Cpu>(std::slice::from_ref(&pre), &dev).unwrap();
    let theirs = sam.image_encoder.forward(pixels);
    assert_eq!(ours.dims(), [1, 256, 14, 14]);
    let r = max_rel(ours.clone().flatten(0, 3), theirs.flatten(0, 3));
    assert!(r < 1e-6, "encoder differs from MobileSAM's: {r}");

    // Decoder: SAM's single-mask output for one sparse prompt token per object, on random
    // embeddings of two images (objects 0 and 2 on image 0, object 1 on image 1).
    let emb = Tensor::<Cpu, 4>::random([2, 256, 14, 14], Distribution::Normal(0.0, 0.5), &dev);
    let seg = Tensor::<Cpu, 3>::random([3, 1, 256], Distribution::Normal(0.0, 1.0), &dev);
    let out = model.decoder.forward(std::slice::from_ref(&emb), seg.clone(), &[0, 1, 0]).unwrap();
    assert_eq!(out.low_res_masks.dims(), [3, 56, 56]);
    let src = emb.select(0, Tensor::from_data([0i64, 1, 0], &dev));
    // SAM's dense positional encoding, on the 14x14 grid of a 224 input.
    let pe = sam.prompt_encoder.pe_layer.forward(14, 14).unsqueeze::<4>();
    let dense = sam.prompt_encoder.no_mask_dense(3, 14, 14);
    let (masks, iou) = sam.mask_decoder.forward(src, pe, seg, dense, false).unwrap();
    let r = max_rel(out.low_res_masks.flatten(0, 2), masks.flatten(0, 3));
    assert!(r < 1e-5, "masks differ from MobileSAM's decoder: {r}");
    let r = max_rel(out.iou_predictions, iou.flatten(0, 1));
    assert!(r < 1e-5, "IoU predictions differ: {r}");
}

#[test]
fn init_from_sam_refuses_a_clip_model_and_a_wrong_file() {
    let dev = Default::default();
    let clip = PixelLmConfig::tiny(800).init::<Cpu>(&dev).unwrap();
    let e = clip.init_from_sam(mobile_sam_path()).unwrap_err().to_string();
    assert!(e.contains("sam_encoder"), "{e}");
    // A checkpoint without the SAM tensors: every missing one is named.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let m = PixelLmConfig::tiny(800).init::<Cpu>(&dev).unwrap();
    popen_model::pixellm::save(&m, &p).unwrap();
    let sam = PixelLmConfig::tiny_sam(800).init::<Cpu>(&dev).unwrap();
    let e = sam.init_from_sam(&p).unwrap_err().to_string();
    assert!(e.contains("sam_encoder.patch_embed"), "{e}");
}

//! CLIP vision tower and PixelLM preprocessing against the reference written by
//! tools/reference/clip_fixture.py (transformers 4.57.1 `CLIPVisionModel`, PixelLM's
//! position-embedding resize and ViT mask transcribed from MaverickRen/PixelLM@c43c0aff,
//! Pillow 12.0.0 resampling); fixtures in tests/fixtures/clip/.
//!
//! Model tolerance: 1e-4 relative, |got - want| <= 1e-4 * max(1, |want|) (f32, different
//! summation order than PyTorch's kernels). Preprocessing tolerance: exact. The Rust port of
//! Pillow's fixed-point resampling reproduces Pillow's bytes, and `(u8 as f32 - mean) / std`
//! is the same two IEEE f32 operations PyTorch performs, so any difference is a bug.

#[allow(dead_code)]
use crate::common;

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;
use popen_model::clip::{
    self, patch_key_mask, patch_key_mask_values, ClipActivation, ClipError, ClipVisionConfig, ClipVisionModel,
};
use popen_model::preprocess::{resize_pil, to_tensor, PilFilter, PreprocessError, Preprocessor, IMAGENET_MEAN};
use popen_model::weights::{self, Checkpoint};

type B = NdArray<f32>;

fn dir() -> PathBuf {
    common::repo_root().join("crates/popen-model/tests/fixtures/clip")
}

fn cases() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap()
}

struct Expected(Checkpoint);

impl Expected {
    fn open() -> Self {
        Expected(Checkpoint::open(dir().join("expected.safetensors")).unwrap())
    }
    fn get(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let t = self.0.tensors.get(name).unwrap_or_else(|| panic!("fixture lacks {name}"));
        (t.shape.clone(), t.read_f32().unwrap())
    }
    fn tensor<const D: usize>(&self, name: &str) -> Tensor<B, D> {
        let (shape, v) = self.get(name);
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }
}

/// |got - want| <= rel * max(1, |want|), elementwise, with matching shapes.
fn assert_close<const D: usize>(name: &str, got: Tensor<B, D>, want: &(Vec<usize>, Vec<f32>), rel: f32) {
    assert_eq!(got.dims().to_vec(), want.0, "{name}: shape");
    let got = got.into_data().into_vec::<f32>().unwrap();
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(&want.1).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        assert!(err <= rel, "{name}[{i}]: got {g}, want {w} (rel err {err})");
        worst = worst.max(err);
    }
    eprintln!("{name}: max rel err {worst:.2e}");
}

fn fixture_cfg() -> ClipVisionConfig {
    ClipVisionConfig::from_json_file(dir().join("model/config.json")).unwrap()
}

fn load_fixture() -> ClipVisionModel<B> {
    clip::load::<B>(&fixture_cfg(), dir().join("model"), &Default::default()).unwrap()
}

#[test]
fn config_reads_hf_json_and_rejects_impossible_ones() {
    let cfg = fixture_cfg();
    assert_eq!(
        cfg,
        ClipVisionConfig {
            hidden_size: 32,
            intermediate_size: 37,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            num_channels: 3,
            image_size: 16,
            patch_size: 4,
            layer_norm_eps: 1e-5,
            hidden_act: ClipActivation::QuickGelu,
        }
    );
    // HF defaults fill missing fields; a full CLIPConfig's vision_config is used.
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("config.json");
    std::fs::write(
        &p,
        r#"{"vision_config": {"hidden_size": 1024, "intermediate_size": 4096,
        "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
        "projection_dim": 768}, "text_config": {}}"#,
    )
    .unwrap();
    assert_eq!(ClipVisionConfig::from_json_file(&p).unwrap(), ClipVisionConfig::vit_l_14_336());
    std::fs::write(&p, r#"{"hidden_act": "relu"}"#).unwrap();
    let e = ClipVisionConfig::from_json_file(&p).unwrap_err().to_string();
    assert!(e.contains("relu"), "{e}");
    let back: ClipVisionConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);

    ClipVisionConfig::vit_l_14_336().validate().unwrap();
    ClipVisionConfig::tiny().validate().unwrap();
    let bad = [
        ClipVisionConfig { num_attention_heads: 5, ..ClipVisionConfig::tiny() },
        ClipVisionConfig { num_attention_heads: 0, ..ClipVisionConfig::tiny() },
        ClipVisionConfig { patch_size: 0, ..ClipVisionConfig::tiny() },
        ClipVisionConfig { image_size: 8, ..ClipVisionConfig::tiny() },
        ClipVisionConfig { hidden_size: 0, ..ClipVisionConfig::tiny() },
        ClipVisionConfig { layer_norm_eps: 0.0, ..ClipVisionConfig::tiny() },
        ClipVisionConfig { image_size: 1 << 20, patch_size: 1, ..ClipVisionConfig::tiny() },
    ];
    for c in bad {
        assert!(matches!(c.validate(), Err(ClipError::Config(_))), "{c:?} accepted");
    }
}

#[test]
fn param_paths_are_hf_state_dict_keys() {
    let model = fixture_cfg().init::<B>(&Default::default());
    let mut ours: Vec<String> = weights::named_tensors(&model).into_iter().map(|t| t.0).collect();
    ours.sort();
    let theirs: Vec<String> =
        cases()["meta"]["model_keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect();
    assert_eq!(ours, theirs);
}

/// transformers `CLIPVisionModel(pixel_values, output_hidden_states=True)` at 16x16.
#[test]
fn hidden_states_last_and_pooled_match_transformers() {
    let ex = Expected::open();
    let model = load_fixture();
    let px = ex.tensor::<4>("base.pixel_values");
    let idx = [0isize, 1, -3, -2, -1];
    let hs = model.forward_hidden_states(px.clone(), &idx).unwrap();
    for (i, h) in idx.iter().zip(hs) {
        let name = format!("base.hidden_states.{i}");
        assert_close(&name, h, &ex.get(&name), 1e-4);
    }
    let (last, pooled) = model.forward(px).unwrap();
    assert_close("base.last_hidden_state", last, &ex.get("base.last_hidden_state"), 1e-4);
    assert_close("base.pooler_output", pooled, &ex.get("base.pooler_output"), 1e-4);
}

/// Same weights, `hidden_act = "gelu"` (exact erf GELU) in transformers.
#[test]
fn gelu_variant_matches_transformers() {
    let ex = Expected::open();
    let cfg = ClipVisionConfig { hidden_act: ClipActivation::Gelu, ..fixture_cfg() };
    let model = clip::load::<B>(&cfg, dir().join("model"), &Default::default()).unwrap();
    let (last, pooled) = model.forward(ex.tensor("base.pixel_values")).unwrap();
    assert_close("gelu.last_hidden_state", last, &ex.get("gelu.last_hidden_state"), 1e-4);
    assert_close("gelu.pooler_output", pooled, &ex.get("gelu.pooler_output"), 1e-4);
}

/// PixelLM's `resize_vision_tower` (16 -> 24 px, 4x4 -> 6x6 grid), then the tower unmasked
/// (HF forward) and with PixelLM's padded-image ViT mask (`encode_images` + `_expand_mask`).
#[test]
fn resized_tower_and_masked_forward_match_pixellm() {
    let ex = Expected::open();
    let dev = Default::default();
    let model = load_fixture().with_image_size(24).unwrap();
    assert_eq!(model.config.image_size, 24);
    assert_close(
        "resized.position_embedding",
        model.vision_model.embeddings.position_embedding.weight.val(),
        &ex.get("resized.position_embedding"),
        1e-5,
    );
    let px = ex.tensor::<4>("resized.pixel_values");
    let hs = model.forward_hidden_states(px.clone(), &[0, -2]).unwrap();
    for (i, h) in [0, -2].iter().zip(hs) {
        let name = format!("resized.hidden_states.{i}");
        assert_close(&name, h, &ex.get(&name), 1e-4);
    }
    let (last, pooled) = model.forward(px.clone()).unwrap();
    assert_close("resized.last_hidden_state", last, &ex.get("resized.last_hidden_state"), 1e-4);
    assert_close("resized.pooler_output", pooled, &ex.get("resized.pooler_output"), 1e-4);

    let hw: Vec<(usize, usize)> = cases()["model"]["resized"]["resized_hw"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_u64().unwrap() as usize))
        .collect();
    let mask_want: Vec<bool> = ex.get("resized.key_mask").1.iter().map(|v| *v > 0.5).collect();
    assert_eq!(patch_key_mask_values(&hw, 24, 4), mask_want);
    let mask = patch_key_mask::<B>(&hw, 24, 4, &dev);
    let hs = model.forward_hidden_states_masked(px.clone(), &[-3, -2], Some(mask.clone())).unwrap();
    for (i, h) in [-3, -2].iter().zip(hs) {
        let name = format!("resized_masked.hidden_states.{i}");
        assert_close(&name, h, &ex.get(&name), 1e-4);
    }
    let (last, pooled) = model.forward_masked(px, Some(mask)).unwrap();
    assert_close("resized_masked.last_hidden_state", last, &ex.get("resized_masked.last_hidden_state"), 1e-4);
    assert_close("resized_masked.pooler_output", pooled, &ex.get("resized_masked.pooler_output"), 1e-4);
}

/// Requests stop at the deepest needed layer: poisoning the last layer with NaN leaves
/// `hidden_states[-2]` (= after layer 2 of 3) exact.
#[test]
fn only_needed_layers_run() {
    let ex = Expected::open();
    let mut model = load_fixture();
    let w = &mut model.vision_model.encoder.layers[2].mlp.fc1.weight;
    *w = Param::from_tensor(Tensor::full(w.dims(), f32::NAN, &Default::default()));
    let hs = model.forward_hidden_states(ex.tensor("base.pixel_values"), &[-2, 0]).unwrap();
    assert_close("base.hidden_states.-2", hs[0].clone(), &ex.get("base.hidden_states.-2"), 1e-4);
    assert_close("base.hidden_states.0", hs[1].clone(), &ex.get("base.hidden_states.0"), 1e-4);
    assert!(model.forward_hidden_states(ex.tensor("base.pixel_values"), &[]).unwrap().is_empty());
}

#[test]
fn bad_layer_index_and_input_are_errors() {
    let model = load_fixture();
    let px = Tensor::<B, 4>::zeros([1, 3, 16, 16], &Default::default());
    for bad in [4isize, -5, 100, isize::MIN] {
        let e = model.forward_hidden_states(px.clone(), &[-2, bad]).unwrap_err();
        assert!(matches!(e, ClipError::LayerIndex { index, num_layers: 3 } if index == bad), "{e}");
        assert!(e.to_string().contains("-4..=3"), "{e}");
    }
    assert_eq!(model.resolve_layer(-4).unwrap(), 0);
    assert_eq!(model.resolve_layer(3).unwrap(), 3);
    let wrong = Tensor::<B, 4>::zeros([1, 3, 24, 24], &Default::default());
    assert!(matches!(model.forward(wrong), Err(ClipError::Input(_))));
    let mask = patch_key_mask::<B>(&[(16, 16), (16, 16)], 16, 4, &Default::default());
    let e = model.forward_masked(px, Some(mask)).unwrap_err();
    assert!(e.to_string().contains("key mask"), "{e}");
    assert!(matches!(load_fixture().with_image_size(2), Err(ClipError::Resize(_))));
}

/// A checkpoint without one tensor fails naming it; an extra tensor is named too.
#[test]
fn incomplete_checkpoint_names_the_tensor() {
    let ck = Checkpoint::open(dir().join("model")).unwrap();
    let missing = "vision_model.encoder.layers.1.mlp.fc2.bias";
    let mut kept: Vec<(String, Vec<usize>, Vec<f32>)> = ck
        .tensors
        .values()
        .filter(|t| t.name != missing)
        .map(|t| (t.name.clone(), t.shape.clone(), t.read_f32().unwrap()))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("broken.safetensors");
    weights::write_safetensors(&p, &kept, &Default::default()).unwrap();
    let e = clip::load::<B>(&fixture_cfg(), &p, &Default::default()).unwrap_err().to_string();
    assert!(e.contains(missing), "{e}");

    // Text-tower tensors of a full CLIPModel checkpoint are skipped, unknown vision ones are not.
    let t = ck.tensors.get(missing).unwrap();
    kept.push((missing.into(), t.shape.clone(), t.read_f32().unwrap()));
    kept.push(("text_model.embeddings.token_embedding.weight".into(), vec![2, 2], vec![0.0; 4]));
    kept.push(("logit_scale".into(), vec![], vec![1.0]));
    weights::write_safetensors(&p, &kept, &Default::default()).unwrap();
    clip::load::<B>(&fixture_cfg(), &p, &Default::default()).unwrap();
    kept.push(("vision_model.encoder.layers.7.mlp.fc2.bias".into(), vec![32], vec![0.0; 32]));
    weights::write_safetensors(&p, &kept, &Default::default()).unwrap();
    let e = clip::load::<B>(&fixture_cfg(), &p, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("layers.7.mlp.fc2.bias"), "{e}");
}

#[test]
fn tiny_preset_runs() {
    let cfg = ClipVisionConfig::tiny();
    let model = cfg.init::<B>(&Default::default());
    let px = Tensor::<B, 4>::random([2, 3, 64, 64], burn::tensor::Distribution::Default, &Default::default());
    let hs = model.forward_hidden_states(px.clone(), &[-2, -1]).unwrap();
    assert_eq!(hs[0].dims(), [2, 17, 64]);
    let (last, pooled) = model.forward(px).unwrap();
    assert_eq!(pooled.dims(), [2, 64]);
    assert_close(
        "tiny last == hidden_states[-1]",
        last.clone(),
        &(vec![2, 17, 64], hs[1].to_data().into_vec().unwrap()),
        0.0,
    );
    let big = model.with_image_size(96).unwrap();
    assert_eq!(big.config.num_positions(), 37);
    let out = big.forward(Tensor::zeros([1, 3, 96, 96], &Default::default())).unwrap();
    assert_eq!(out.0.dims(), [1, 37, 64]);
}

// ---------------------------------------------------------------- preprocessing

fn fixture_image() -> image::RgbImage {
    image::open(dir().join("image.png")).unwrap().to_rgb8()
}

fn u8_values(img: &image::RgbImage) -> (Vec<usize>, Vec<f32>) {
    let (w, h) = img.dimensions();
    (vec![h as usize, w as usize, 3], img.as_raw().iter().map(|v| *v as f32).collect())
}

/// PixelLM's `ResizeLongestSide.apply_image` (Pillow BILINEAR) + `preprocess`, exact.
#[test]
fn preprocessing_matches_pixellm_exactly() {
    let ex = Expected::open();
    let img = fixture_image();
    assert_eq!(img.dimensions(), (37, 23));
    let c = cases();
    for size in [32usize, 48] {
        let meta = &c["preprocess"][size.to_string()];
        let hw = (meta["resized_hw"][0].as_u64().unwrap() as usize, meta["resized_hw"][1].as_u64().unwrap() as usize);
        let pre = Preprocessor::pixellm(size);
        let out = pre.apply(&img).unwrap();
        assert_eq!(out.resized_hw, hw);
        assert_eq!(out.original_hw, (23, 37));
        let resized = resize_pil(&img, hw.1 as u32, hw.0 as u32, PilFilter::Bilinear);
        assert_eq!(u8_values(&resized), ex.get(&format!("preprocess.{size}.resized_u8")), "size {size}");
        if size == 32 {
            let want = ex.get("preprocess.32.pixels");
            assert_eq!(want.0, vec![3, 32, 32]);
            assert_eq!(out.pixels, want.1);
        }
    }
    for wh in c["preprocess"]["bicubic_sizes_wh"].as_array().unwrap() {
        let (w, h) = (wh[0].as_u64().unwrap() as u32, wh[1].as_u64().unwrap() as u32);
        let got = resize_pil(&img, w, h, PilFilter::Bicubic);
        assert_eq!(u8_values(&got), ex.get(&format!("bicubic.{w}x{h}")), "bicubic {w}x{h}");
    }
}

#[test]
fn preprocessing_rejects_bad_images_and_batches() {
    let pre = Preprocessor::pixellm(32);
    assert_eq!(pre.apply(&image::RgbImage::new(0, 5)), Err(PreprocessError::Empty { width: 0, height: 5 }));
    // 2000x1 -> 32x0: degenerate, not a panic.
    assert!(matches!(pre.apply(&image::RgbImage::new(2000, 1)), Err(PreprocessError::Degenerate { .. })));
    assert!(matches!(pre.plan(20_000, 10_000), Err(PreprocessError::TooLarge { .. })));
    assert!(matches!(Preprocessor::pixellm(0).apply(&image::RgbImage::new(4, 4)), Err(PreprocessError::BadSize(0))));
    assert_eq!(pre.plan(23, 37), Ok((20, 32)));
    // Same-size images pass through the resize untouched.
    let img = fixture_image();
    assert_eq!(resize_pil(&img, 37, 23, PilFilter::Bilinear), img);

    let a = pre.apply(&img).unwrap();
    let b = pre.apply(&image::RgbImage::from_pixel(5, 9, image::Rgb([255, 0, 10]))).unwrap();
    assert_eq!(b.resized_hw, (32, 18));
    let t = to_tensor::<B>(&[a.clone(), b.clone()], &Default::default()).unwrap();
    assert_eq!(t.dims(), [2, 3, 32, 32]);
    let v = t.into_data().into_vec::<f32>().unwrap();
    assert_eq!(&v[..3 * 32 * 32], &a.pixels[..]);
    // Red channel of b at (0, 0); padding (row 0, col 31) is exactly 0.
    assert_eq!(v[3 * 32 * 32], (255.0 - IMAGENET_MEAN[0]) / 58.395);
    assert_eq!(v[3 * 32 * 32 + 31], 0.0);
    assert!(matches!(to_tensor::<B>(&[], &Default::default()), Err(PreprocessError::Batch(_))));
    let c = Preprocessor::pixellm(16).apply(&img).unwrap();
    assert!(matches!(to_tensor::<B>(&[a, c], &Default::default()), Err(PreprocessError::Batch(_))));
}

//! SAM's ViT image encoder (popen_sam::vit) against the official `ImageEncoderViT`, through
//! fixtures written by tools/reference/sam_vit_fixture.py (torch 2.9.1, the module file of
//! facebookresearch/segment-anything as vendored in the isat-sam 1.1.0 sdist):
//! tests/fixtures/sam_vit_{small,noabs}.pt (random weights in the official full-SAM layout,
//! `image_encoder.*`), sam_vit_expected.pt (inputs, outputs, activations) and sam_vit.json
//! (configs, `get_rel_pos` cases, parameter counts of the official vit_b/l/h encoders).
//!
//! Tolerance: |got - want| <= 1e-4 * max(1, |want|) (f32 here against a float64 reference).

use std::path::PathBuf;

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use popen_model::weights::Checkpoint;
use popen_sam::vit::{get_rel_pos, linear_resize_matrix, ImageEncoderViT, VitEncoderConfig, VitError};

type B = NdArray<f32>;
const REL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn doc() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("sam_vit.json")).unwrap()).unwrap()
}

fn config(doc: &serde_json::Value, model: &str) -> VitEncoderConfig {
    serde_json::from_value(doc[model]["config"].clone()).unwrap()
}

fn encoder_ck(file: &str) -> Checkpoint {
    Checkpoint::open(fixture(file)).unwrap().sub("image_encoder")
}

fn loaded(doc: &serde_json::Value, model: &str, file: &str) -> ImageEncoderViT<B> {
    config(doc, model).init::<B>(&Default::default()).unwrap().load(&encoder_ck(file), DType::F32).unwrap()
}

struct Expected(Checkpoint);

impl Expected {
    fn open() -> Self {
        Expected(Checkpoint::open(fixture("sam_vit_expected.pt")).unwrap())
    }
    fn get(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let t = self.0.tensors.get(name).unwrap_or_else(|| panic!("fixture lacks {name}"));
        (t.shape.clone(), t.read_f32().unwrap())
    }
    fn tensor<BB: Backend, const D: usize>(&self, name: &str) -> Tensor<BB, D> {
        let (shape, v) = self.get(name);
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }
}

/// |got - want| <= rel * max(1, |want|), elementwise, with matching shapes.
fn assert_close<const D: usize>(name: &str, got: Tensor<B, D>, want: &(Vec<usize>, Vec<f32>)) {
    assert_eq!(got.dims().to_vec(), want.0, "{name}: shape");
    let got = got.into_data().into_vec::<f32>().unwrap();
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(&want.1).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        assert!(err <= REL, "{name}[{i}]: got {g}, want {w} (rel err {err})");
        worst = worst.max(err);
    }
    eprintln!("{name}: max rel err {worst:.2e} over {} values", got.len());
}

fn json_values(v: &serde_json::Value) -> (Vec<usize>, Vec<f32>) {
    let shape = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize);
    let vals = v["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32);
    (shape.collect(), vals.collect())
}

#[test]
fn vit_small_matches_official_encoder() {
    let doc = doc();
    let enc = loaded(&doc, "small", "sam_vit_small.pt");
    let exp = Expected::open();
    let x: Tensor<B, 4> = exp.tensor("small.input");
    // Patch embedding + pos, then every block: window padding (5x5 grid, window 2 -> 6x6)
    // in blocks 0 and 2, global attention in block 1.
    let mut h = enc.embed(x.clone()).unwrap();
    assert_close("small.embed", h.clone(), &exp.get("small.embed"));
    for (i, blk) in enc.blocks.iter().enumerate() {
        h = blk.forward(h);
        assert_close(&format!("small.block{i}"), h.clone(), &exp.get(&format!("small.block{i}")));
    }
    assert_close("small.output", enc.forward(x), &exp.get("small.output"));
}

#[test]
fn vit_noabs_other_sizes_interpolate_rel_pos() {
    // No pos_embed: inputs of other sizes run, and the global block's rel-pos tables (9 rows
    // for the 5x5 grid) are resized linearly: 26x60 (3x7 grid, remainder rows dropped by the
    // patch conv; 9 -> 5 and 9 -> 13), 64x16 (8x2: 9 -> 15 and 9 -> 3), 40x40 (no resize).
    let doc = doc();
    let enc = loaded(&doc, "noabs", "sam_vit_noabs.pt");
    let exp = Expected::open();
    let n = doc["noabs"]["cases"].as_array().unwrap().len();
    assert_eq!(n, 3);
    for j in 0..n {
        let x: Tensor<B, 4> = exp.tensor(&format!("noabs.{j}.input"));
        let y = enc.try_forward(x).unwrap();
        assert_close(&format!("noabs.{j}.output"), y, &exp.get(&format!("noabs.{j}.output")));
    }
}

#[test]
fn vit_get_rel_pos_matches_official() {
    // Including q != k (coordinate scaling) and tables of other lengths (resize up and down).
    let doc = doc();
    for case in doc["get_rel_pos"].as_array().unwrap() {
        let (q, k) = (case["q"].as_u64().unwrap() as usize, case["k"].as_u64().unwrap() as usize);
        let (shape, v) = json_values(&case["rel_pos"]);
        let table = Tensor::<B, 2>::from_data(TensorData::new(v, shape.clone()), &Default::default());
        let got = get_rel_pos(q, k, table);
        assert_close(&format!("get_rel_pos(q {q}, k {k}, len {})", shape[0]), got, &json_values(&case["output"]));
    }
}

#[test]
fn vit_linear_resize_matrix_rows_sum_to_one() {
    for (i, o) in [(9, 5), (9, 13), (4, 3), (3, 27), (1, 5)] {
        let m = linear_resize_matrix(i, o);
        for r in 0..o {
            let s: f32 = m[r * i..(r + 1) * i].iter().sum();
            assert!((s - 1.0).abs() < 1e-6, "{i}->{o} row {r} sums to {s}");
        }
    }
}

#[test]
fn vit_presets_and_param_counts() {
    let doc = doc();
    // The presets equal build_sam.py's, and the shape formula gives the official counts
    // (computed there on the meta device): ViT-B 89,670,912, ViT-L 308,278,272,
    // ViT-H 637,026,048.
    for (name, cfg) in [
        ("vit_b", VitEncoderConfig::vit_b()),
        ("vit_l", VitEncoderConfig::vit_l()),
        ("vit_h", VitEncoderConfig::vit_h()),
    ] {
        let p = &doc["presets"][name];
        let official: VitEncoderConfig = serde_json::from_value(p["config"].clone()).unwrap();
        assert_eq!(cfg, official, "{name} preset");
        cfg.validate().unwrap();
        let want = p["param_count"].as_u64().unwrap() as usize;
        assert_eq!(cfg.param_count(), want, "{name} parameter count");
        eprintln!("{name}: {} parameters", cfg.param_count());
    }
    assert_eq!(VitEncoderConfig::vit_b().param_count(), 89_670_912);
    // The formula against burn's own count of the small models, and against PyTorch's.
    for model in ["small", "noabs"] {
        let cfg = config(&doc, model);
        let enc = cfg.init::<B>(&Default::default()).unwrap();
        assert_eq!(cfg.param_count(), enc.num_params(), "{model}: formula vs burn");
        assert_eq!(
            cfg.param_count(),
            doc[model]["param_count"].as_u64().unwrap() as usize,
            "{model}: formula vs PyTorch"
        );
    }
}

#[test]
fn vit_checkpoint_problems_are_named() {
    let doc = doc();
    let cfg = config(&doc, "small");
    let dev = Default::default();
    let err = |cfg: &VitEncoderConfig, ck: &Checkpoint| -> String {
        match cfg.init::<B>(&dev).unwrap().load(ck, DType::F32) {
            Ok(_) => panic!("loading should fail"),
            Err(e) => {
                assert!(matches!(e, VitError::Weights(_)), "{e}");
                e.to_string()
            }
        }
    };
    // Missing.
    let mut ck = encoder_ck("sam_vit_small.pt");
    ck.tensors.remove("blocks.1.attn.rel_pos_h").unwrap();
    ck.tensors.remove("neck.3.weight").unwrap();
    let e = err(&cfg, &ck);
    assert!(e.contains("missing blocks.1.attn.rel_pos_h"), "{e}");
    assert!(e.contains("missing neck.3.weight"), "{e}");
    // Mis-shaped: window 3 wants 5-row rel-pos tables in the windowed blocks.
    let e = err(&VitEncoderConfig { window_size: 3, ..cfg.clone() }, &encoder_ck("sam_vit_small.pt"));
    assert!(e.contains("blocks.0.attn.rel_pos_h") && e.contains("blocks.2.attn.rel_pos_w"), "{e}");
    assert!(!e.contains("blocks.1.attn"), "{e}");
    // Unexpected: a model without rel pos or abs pos.
    let e = err(
        &VitEncoderConfig { use_rel_pos: false, use_abs_pos: false, ..cfg.clone() },
        &encoder_ck("sam_vit_small.pt"),
    );
    assert!(e.contains("unexpected blocks.0.attn.rel_pos_h"), "{e}");
    assert!(e.contains("unexpected pos_embed"), "{e}");
    // The whole SAM checkpoint (not narrowed to `image_encoder`).
    let e = err(&cfg, &Checkpoint::open(fixture("sam_vit_small.pt")).unwrap());
    assert!(e.contains("missing patch_embed.proj.weight"), "{e}");
    assert!(e.contains("unexpected image_encoder.pos_embed"), "{e}");
    // The noabs checkpoint has no qkv bias.
    let e = err(&VitEncoderConfig { qkv_bias: true, ..config(&doc, "noabs") }, &encoder_ck("sam_vit_noabs.pt"));
    assert!(e.contains("missing blocks.0.attn.qkv.bias"), "{e}");
}

#[test]
fn vit_bad_inputs_and_configs_fail_clearly() {
    let doc = doc();
    let enc = loaded(&doc, "small", "sam_vit_small.pt");
    let dev = Default::default();
    // pos_embed is 5x5 (40 px at patch 8): a 48x48 image is refused, not interpolated.
    let e = enc.try_forward(Tensor::zeros([1, 3, 48, 48], &dev)).unwrap_err().to_string();
    assert!(e.contains("6x6 patch grid") && e.contains("pos_embed is 5x5"), "{e}");
    let e = enc.try_forward(Tensor::zeros([1, 4, 40, 40], &dev)).unwrap_err().to_string();
    assert!(e.contains("[1, 4, 40, 40]"), "{e}");
    // 47x47 still gives a 5x5 grid (the conv drops the remainder, like PyTorch's).
    assert_eq!(enc.forward(Tensor::zeros([1, 3, 47, 47], &dev)).dims(), [1, 16, 5, 5]);

    let cfg = config(&doc, "small");
    let bad = |c: VitEncoderConfig, needle: &str| {
        let e = c.init::<B>(&dev).expect_err("config should be refused").to_string();
        assert!(e.contains(needle), "{e}");
    };
    bad(VitEncoderConfig { num_heads: 3, ..cfg.clone() }, "num_heads 3 must divide embed_dim 32");
    bad(VitEncoderConfig { global_attn_indexes: vec![3], ..cfg.clone() }, "global_attn_indexes contains 3");
    bad(VitEncoderConfig { img_size: 4, ..cfg.clone() }, "smaller than patch_size");
    bad(VitEncoderConfig { mlp_ratio: 0.0, ..cfg.clone() }, "mlp_ratio");
}

#[test]
fn vit_forward_is_differentiable() {
    // Gradients reach the rel-pos tables through the window padding, the global block and the
    // linear resize (noabs at 26x60), and the position embedding.
    type A = Autodiff<B>;
    let doc = doc();
    let exp = Expected::open();
    for (model, file, input) in
        [("small", "sam_vit_small.pt", "small.input"), ("noabs", "sam_vit_noabs.pt", "noabs.0.input")]
    {
        let enc =
            config(&doc, model).init::<A>(&Default::default()).unwrap().load(&encoder_ck(file), DType::F32).unwrap();
        let x: Tensor<A, 4> = exp.tensor(input);
        let x = x.require_grad();
        let grads = enc.forward(x.clone()).powi_scalar(2).sum().backward();
        let norm = |t: Option<Tensor<B, 2>>, what: &str| {
            let g = t.unwrap_or_else(|| panic!("{model}: no gradient for {what}"));
            let n = g.powi_scalar(2).sum().into_scalar();
            assert!(n.is_finite() && n > 0.0, "{model}: gradient of {what} is {n}");
        };
        for (i, blk) in enc.blocks.iter().enumerate() {
            let a = &blk.attn;
            norm(a.rel_pos_h.as_ref().unwrap().val().grad(&grads), &format!("blocks.{i}.rel_pos_h"));
            norm(a.rel_pos_w.as_ref().unwrap().val().grad(&grads), &format!("blocks.{i}.rel_pos_w"));
        }
        if let Some(pe) = &enc.pos_embed {
            norm(pe.val().grad(&grads).map(|g| g.reshape([1, -1])), "pos_embed");
        }
        norm(x.grad(&grads).map(|g| g.reshape([1, -1])), "input");
    }
}

#[test]
fn vit_runs_in_bf16() {
    // Parameters loaded as bf16 (GPU inference): the rel-pos resize matrix follows the
    // tables' dtype. Loose tolerance (bf16 has 8 significant bits).
    type F = burn::backend::Flex;
    let doc = doc();
    let exp = Expected::open();
    let enc = config(&doc, "noabs")
        .init::<F>(&Default::default())
        .unwrap()
        .load(&encoder_ck("sam_vit_noabs.pt"), DType::BF16)
        .unwrap();
    let x: Tensor<F, 4> = exp.tensor("noabs.0.input");
    let y = enc.forward(x.cast(DType::BF16)).cast(DType::F32);
    let (shape, want) = exp.get("noabs.0.output");
    assert_eq!(y.dims().to_vec(), shape);
    let got = y.into_data().into_vec::<f32>().unwrap();
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / w.abs().max(1.0)).fold(0f32, f32::max);
    eprintln!("bf16 noabs.0.output: max rel err {worst:.2e}");
    assert!(worst < 0.1, "bf16 max rel err {worst}");
}

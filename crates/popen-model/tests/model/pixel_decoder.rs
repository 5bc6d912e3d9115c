//! PixelLM's pixel decoder and SAM's prompt-side modules against the PyTorch reference
//! (tools/reference/pixellm_decoder_ref.py: a transcription of PixelLM's
//! mask_decoder_multi_scale.py / PixelLM.py and SAM's transformer.py, prompt_encoder.py,
//! mask_decoder.py; fixtures in tests/fixtures/pixel_decoder/). Tolerance:
//! |got - want| <= 1e-4 * max(1, |want|) per element (f32 vs a float64 reference).

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::backend::{Autodiff, NdArray};
use burn::prelude::*;
use burn::tensor::TensorData;
use popen_model::pixel_decoder::{
    mask_confidence, postprocess_masks, DecoderError, MaskDecoderMultiScaleConfig, PixelDecoder,
};
use popen_model::sam::{
    MaskDecoder, MaskDecoderConfig, PromptEncoder, PromptEncoderConfig, SamActivation, TwoWayTransformerConfig,
};
use popen_model::weights::{self, Checkpoint, Remap};

type Cpu = NdArray<f32>;
type Ad = Autodiff<NdArray<f32>>;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pixel_decoder").join(name)
}

/// Tensors of a fixture file by name: (shape, f32 values).
fn read_io(name: &str) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let ck = Checkpoint::open(fixture(name)).expect("fixture opens");
    ck.tensors.iter().map(|(k, t)| (k.clone(), (t.shape.clone(), t.read_f32().expect("fixture reads")))).collect()
}

fn tensor<Bk: Backend, const D: usize>(io: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, name: &str) -> Tensor<Bk, D> {
    let (shape, v) = io.get(name).unwrap_or_else(|| panic!("fixture lacks {name}"));
    Tensor::from_data(TensorData::new(v.clone(), shape.clone()), &Default::default())
}

fn assert_close<Bk: Backend, const D: usize>(
    what: &str,
    got: Tensor<Bk, D>,
    io: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    name: &str,
) {
    let (shape, want) = &io[name];
    assert_eq!(&got.dims().to_vec(), shape, "{what}: shape");
    let got = got.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    let mut worst = (0.0f32, 0usize);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let err = (a - b).abs() / b.abs().max(1.0);
        if err > worst.0 || err.is_nan() {
            worst = (err, i);
        }
    }
    let i = worst.1;
    assert!(worst.0 <= 1e-4, "{what}: relative error {:e} at {i}: got {} want {}", worst.0, got[i], want[i]);
    eprintln!("{what}: max relative error {:e}", worst.0);
}

fn tiny_decoder<Bk: Backend>() -> PixelDecoder<Bk> {
    MaskDecoderMultiScaleConfig::tiny()
        .init::<Bk>(&Default::default())
        .expect("tiny config")
        .load_pixellm(fixture("pixellm_weights.safetensors"))
        .expect("reference weights load")
}

fn image_index(io: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Vec<usize> {
    io["image_index"].1.iter().map(|&v| v as usize).collect()
}

/// Matches the reference's `pixellm_decode` + `postprocess_masks` + mask_score loop of
/// PixelLM.py (run per image there, interleaved objects here).
#[test]
fn pixellm_decoder_matches_reference() {
    let io = read_io("pixellm_io.safetensors");
    let dec = tiny_decoder::<Cpu>();
    let imgs = [tensor::<Cpu, 4>(&io, "image_embeddings.0"), tensor(&io, "image_embeddings.1")];
    let out = dec.forward(&imgs, tensor(&io, "seg_embeddings"), &image_index(&io)).expect("forward");
    assert_close("low_res_masks", out.low_res_masks.clone(), &io, "low_res_masks");
    assert_close("iou_predictions", out.iou_predictions, &io, "iou_predictions");

    let sizes: Vec<usize> = io["sizes"].1.iter().map(|&v| v as usize).collect();
    let masks = postprocess_masks(out.low_res_masks, sizes[0], (sizes[1], sizes[2]), (sizes[3], sizes[4]))
        .expect("postprocess");
    assert_close("postprocessed masks", masks.clone(), &io, "masks");
    // The score thresholds at 0: check it on the reference masks (exact inputs) and on ours.
    assert_close("confidence of reference masks", mask_confidence(tensor::<Cpu, 3>(&io, "masks")), &io, "confidences");
    assert_close("confidence", mask_confidence(masks), &io, "confidences");
}

/// Matches SAM's TwoWayTransformer (transformer.py) on random inputs: queries and keys.
#[test]
fn two_way_transformer_matches_reference() {
    let io = read_io("transformer_io.safetensors");
    let cfg = TwoWayTransformerConfig {
        depth: 2,
        embedding_dim: 16,
        num_heads: 2,
        mlp_dim: 32,
        activation: SamActivation::Relu,
        attention_downsample_rate: 2,
    };
    let tr = cfg.init::<Cpu>(&Default::default()).unwrap();
    let tr = weights::load(tr, fixture("transformer_weights.safetensors"), &Remap::none()).expect("strict load");
    let (q, k) =
        tr.forward(tensor(&io, "image_embedding"), tensor(&io, "image_pe"), tensor(&io, "point_embedding")).unwrap();
    assert_close("queries", q, &io, "queries");
    assert_close("keys", k, &io, "keys");
}

#[derive(Module, Debug)]
struct Sam<B: Backend> {
    prompt_encoder: PromptEncoder<B>,
    mask_decoder: MaskDecoder<B>,
}

/// Matches SAM's PromptEncoder (points padded / points + boxes + mask input) and MaskDecoder
/// (multimask and single-mask outputs) of prompt_encoder.py / mask_decoder.py.
#[test]
fn sam_prompt_encoder_and_mask_decoder_match_reference() {
    let io = read_io("sam_io.safetensors");
    let dev = Default::default();
    let sam = Sam::<Cpu> {
        prompt_encoder: PromptEncoderConfig {
            embed_dim: 16,
            image_embedding_size: (8, 8),
            input_image_size: (64, 64),
            mask_in_chans: 8,
        }
        .init(&dev)
        .unwrap(),
        mask_decoder: MaskDecoderConfig {
            transformer_dim: 16,
            transformer: TwoWayTransformerConfig {
                depth: 2,
                embedding_dim: 16,
                num_heads: 2,
                mlp_dim: 32,
                ..Default::default()
            },
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 16,
        }
        .init(&dev)
        .unwrap(),
    };
    let sam = weights::load(sam, fixture("sam_weights.safetensors"), &Remap::none()).expect("strict load");
    let pe = &sam.prompt_encoder;
    let points = || Some((tensor::<Cpu, 3>(&io, "coords"), tensor::<Cpu, 2>(&io, "labels")));
    let img = || tensor::<Cpu, 4>(&io, "image_embeddings");

    let (sp, de) = pe.forward(points(), None, None, None).unwrap();
    assert_close("a.sparse", sp.clone(), &io, "a.sparse");
    assert_close("a.dense", de.clone(), &io, "a.dense");
    let (m, i) = sam.mask_decoder.forward(img(), pe.get_dense_pe(), sp, de, true).unwrap();
    assert_close("a.masks", m, &io, "a.masks");
    assert_close("a.iou", i, &io, "a.iou");

    let (sp, de) = pe.forward(points(), Some(tensor(&io, "boxes")), Some(tensor(&io, "mask_input")), None).unwrap();
    assert_close("b.sparse", sp.clone(), &io, "b.sparse");
    assert_close("b.dense", de.clone(), &io, "b.dense");
    let (m, i) = sam.mask_decoder.forward(img(), pe.get_dense_pe(), sp, de, false).unwrap();
    assert_close("b.masks", m, &io, "b.masks");
    assert_close("b.iou", i, &io, "b.iou");
}

/// A checkpoint lacking or mis-shaping decoder tensors fails listing every name; unrelated
/// tensors of the checkpoint (the neck) are ignored.
#[test]
fn load_errors_name_the_tensors() {
    let ck = Checkpoint::open(fixture("pixellm_weights.safetensors")).unwrap();
    let mut tensors = Vec::new();
    for (name, t) in &ck.tensors {
        if name == "model.mask_decoder.level_embed.weight" || name == "model.prompt_encoder.no_mask_embed.weight" {
            continue;
        }
        let mut shape = t.shape.clone();
        let mut data = t.read_f32().unwrap();
        if name == "model.mask_decoder.iou_token.weight" {
            shape = vec![1, 8];
            data.truncate(8);
        }
        tensors.push((name.clone(), shape, data));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.safetensors");
    weights::write_safetensors(&path, &tensors, &BTreeMap::new()).unwrap();
    let dec = MaskDecoderMultiScaleConfig::tiny().init::<Cpu>(&Default::default()).unwrap();
    let err = dec.load_pixellm(&path).expect_err("must fail").to_string();
    for name in
        ["mask_decoder.level_embed.weight", "prompt_encoder.no_mask_embed.weight", "mask_decoder.iou_token.weight"]
    {
        assert!(err.contains(name), "error does not name {name}: {err}");
    }
    assert!(!err.contains("image_feature_neck"), "unrelated tensors must be ignored: {err}");

    // Not a PixelLM checkpoint at all.
    let path2 = dir.path().join("other.safetensors");
    weights::write_safetensors(&path2, &[("x.weight".into(), vec![1], vec![0.0])], &BTreeMap::new()).unwrap();
    let dec = MaskDecoderMultiScaleConfig::tiny().init::<Cpu>(&Default::default()).unwrap();
    let err = dec.load_pixellm(&path2).expect_err("must fail").to_string();
    assert!(err.contains("mask_decoder.iou_token.weight"), "{err}");
}

fn msg<T>(r: Result<T, DecoderError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Wrong input shapes are errors naming the input, never panics.
#[test]
fn wrong_shapes_are_errors() {
    let dev = Default::default();
    let dec = MaskDecoderMultiScaleConfig::tiny().init::<Cpu>(&dev).unwrap();
    let img = || Tensor::<Cpu, 4>::zeros([2, 16, 8, 8], &dev);
    let seg = || Tensor::<Cpu, 3>::zeros([3, 2, 16], &dev);
    let idx = [0, 1, 0];
    assert!(msg(dec.forward(&[img()], seg(), &idx)).contains("scales"));
    let bad = Tensor::<Cpu, 4>::zeros([2, 16, 7, 8], &dev);
    assert!(msg(dec.forward(&[img(), bad], seg(), &idx)).contains("image_embeddings[1]"));
    assert!(msg(dec.forward(&[img(), img()], Tensor::zeros([3, 2, 8], &dev), &idx)).contains("seg_embeddings"));
    assert!(msg(dec.forward(&[img(), img()], seg(), &[0, 1])).contains("image_index"));
    assert!(msg(dec.forward(&[img(), img()], seg(), &[0, 2, 0])).contains("image_index[1] = 2"));
    let low = Tensor::<Cpu, 3>::zeros([3, 32, 32], &dev);
    assert!(msg(postprocess_masks(low.clone(), 64, (65, 10), (30, 45))).contains("resized"));
    assert!(msg(postprocess_masks(low, 64, (43, 64), (0, 45))).contains("original"));
    assert!(MaskDecoderMultiScaleConfig { num_scales: 3, ..MaskDecoderMultiScaleConfig::tiny() }
        .init::<Cpu>(&dev)
        .is_err());
    assert!(MaskDecoderMultiScaleConfig { num_heads: 3, ..MaskDecoderMultiScaleConfig::tiny() }
        .init::<Cpu>(&dev)
        .is_err());

    // No objects: empty outputs.
    let out = dec.forward(&[img(), img()], Tensor::zeros([0, 2, 16], &dev), &[]).unwrap();
    assert_eq!(out.low_res_masks.dims(), [0, 32, 32]);
    assert_eq!(out.iou_predictions.dims(), [0]);
}

/// POPEN backpropagates through the frozen decoder into the seg embeddings: the gradient of
/// the (postprocessed) masks with respect to `seg_embeddings` must exist and be nonzero.
#[test]
fn gradients_reach_seg_embeddings() {
    let io = read_io("pixellm_io.safetensors");
    let dec = tiny_decoder::<Ad>();
    let imgs = [tensor::<Ad, 4>(&io, "image_embeddings.0"), tensor(&io, "image_embeddings.1")];
    let seg = tensor::<Ad, 3>(&io, "seg_embeddings").require_grad();
    let out = dec.forward(&imgs, seg.clone(), &image_index(&io)).unwrap();
    let post = postprocess_masks(out.low_res_masks.clone(), 64, (43, 64), (30, 45)).unwrap();
    let loss = out.low_res_masks.sum() + post.sum() + out.iou_predictions.sum();
    let grads = loss.backward();
    let g = seg.grad(&grads).expect("seg_embeddings has a gradient");
    assert_eq!(g.dims(), [3, 2, 16]);
    // Both scales' embeddings influence the masks.
    for l in 0..2 {
        let gl: f32 = g.clone().slice([0..3, l..l + 1, 0..16]).abs().sum().into_scalar();
        assert!(gl > 0.0 && gl.is_finite(), "scale {l}: |grad| = {gl}");
    }
}

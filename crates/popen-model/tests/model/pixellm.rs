//! The assembled PixelLM: LLaVA glue against transformers, and POPEN's additions by their
//! defining properties (gamma = 0 is no bias, no `p_hat` is the plain model, cached
//! sampling equals teacher forcing, a batch equals its rows, save/load is exact).

use std::path::PathBuf;

use burn::backend::NdArray;
use burn::prelude::*;
use burn::tensor::TensorData;
use popen_model::clip::ClipVisionConfig;
use popen_model::llama::LlamaConfig;
use popen_model::pixel_decoder::MaskDecoderMultiScaleConfig;
use popen_model::pixellm::{self, Layout, Padding, Part, PixelLm, PixelLmConfig, Segment};
use popen_model::preprocess::{Preprocessed, Preprocessor};
use popen_model::sampling::SamplingConfig;

type B = NdArray<f32>;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn vec2(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}
fn vec3(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0.0, f32::max)
}

/// A small model for the property tests (fast in debug builds).
fn small_cfg() -> PixelLmConfig {
    let mut cfg = PixelLmConfig::tiny(64);
    cfg.llm.hidden_size = 32;
    cfg.llm.intermediate_size = 48;
    cfg.llm.num_hidden_layers = 2;
    cfg.mm_projector_hidden = 64;
    cfg.vision.hidden_size = 32;
    cfg.vision.intermediate_size = 48;
    cfg.vision.num_hidden_layers = 3;
    cfg.vision.image_size = 32;
    cfg.vision.patch_size = 4;
    cfg.image_size = 32;
    cfg.vision_select_layers = vec![-2, -3];
    cfg.llm_image_grid = 4;
    cfg.out_dim = 16;
    cfg.decoder.transformer_dim = 16;
    cfg.decoder.mlp_dim = 32;
    cfg.decoder.num_heads = 2;
    cfg.decoder.iou_head_hidden_dim = 16;
    cfg.decoder.image_embedding_size = 8;
    cfg.decoder.input_image_size = 32;
    cfg.decoder.low_res_size = 32;
    cfg.prompt_embeddings = 3;
    cfg
}

fn image(w: u32, h: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let v = (x * 37 + y * 91 + seed * 13) % 251;
        image::Rgb([v as u8, (v * 3 % 256) as u8, (255 - v) as u8])
    })
}

fn preprocess(cfg: &PixelLmConfig, imgs: &[image::RgbImage]) -> Vec<Preprocessed> {
    let p = Preprocessor::pixellm(cfg.image_size);
    imgs.iter().map(|i| p.apply(i).unwrap()).collect()
}

fn prompt(image_index: usize) -> Vec<Part<B>> {
    vec![
        Part::new(Segment::Tokens(vec![1, 5, 9])),
        Part::new(Segment::Image(image_index)),
        Part::new(Segment::Tokens(vec![12, 7, 30, 2])),
    ]
}

/// transformers' LlavaForConditionalGeneration on a square image (no padding, image grid =
/// patch grid), fixture from tools/reference/llava_fixture.py: popen's CLIP -> projector ->
/// `<image>` splice -> LLaMA reproduces its logits.
#[test]
fn llava_hf_fixture() {
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llava").join("expected.json")).unwrap()).unwrap();
    let llm: LlamaConfig = serde_json::from_value(exp["text_config"].clone()).unwrap();
    let vision: ClipVisionConfig = serde_json::from_value(exp["vision_config"].clone()).unwrap();
    check_llava_fixture(llm, vision, -2);
}

/// The LLaVA fixture's weights (tests/fixtures/llava) run with `llm` / `vision` / the feature
/// layer read from some config reproduce transformers' logits.
pub(crate) fn check_llava_fixture(llm: LlamaConfig, vision: ClipVisionConfig, feature_layer: isize) {
    let dir = fixture("llava");
    let cfg = llava_fixture_config(llm, vision, feature_layer);
    let dev = Default::default();
    let (model, fresh) = pixellm::load::<B>(&cfg, &dir, Layout::LlavaHf, None, &dev).unwrap();
    assert!(fresh.iter().any(|n| n.starts_with("text_hidden_fcs.")), "{fresh:?}");
    assert!(!fresh.iter().any(|n| n.starts_with("llm.") || n.starts_with("mm_projector.")));
    assert_llava_logits(&model);
}

/// The model config of the LLaVA fixture (a LLaVA projector: hidden = the LLM width; image
/// grid = patch grid; PixelLM's parts small and fresh).
pub(crate) fn llava_fixture_config(llm: LlamaConfig, vision: ClipVisionConfig, feature_layer: isize) -> PixelLmConfig {
    PixelLmConfig {
        name: "llava-fixture".into(),
        mm_projector_hidden: llm.hidden_size,
        llm,
        image_size: vision.image_size,
        vision_select_layers: vec![feature_layer, -3],
        llm_image_grid: vision.image_size / vision.patch_size,
        seg_token_num: 1,
        out_dim: 16,
        mm_use_im_start_end: false,
        decoder: MaskDecoderMultiScaleConfig {
            transformer_dim: 16,
            mlp_dim: 32,
            num_heads: 2,
            iou_head_hidden_dim: 16,
            image_embedding_size: vision.image_size / vision.patch_size,
            input_image_size: vision.image_size,
            low_res_size: 16,
            ..MaskDecoderMultiScaleConfig::default()
        },
        vision,
        prompt_embeddings: 0,
        seg_feedback: false,
        max_length: 128,
        sam_encoder: None,
        seg_locator: 0,
        llm_image_pe: false,
        llm_image_pixels: false,
    }
}

/// `model` reproduces transformers' logits and last hidden state of the LLaVA fixture
/// (tests/fixtures/llava/expected.json).
pub(crate) fn assert_llava_logits(model: &PixelLm<B>) {
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llava").join("expected.json")).unwrap()).unwrap();
    let cfg = model.config();
    let s = cfg.image_size;
    let pixels: Vec<f32> = exp["pixels"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let pre = Preprocessed { pixels, resized_hw: (s, s), original_hw: (s, s) };
    let ids = |k: &str| -> Vec<u32> { exp[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect() };
    let feats = model.encode_images(&[pre]).unwrap();
    let row = vec![
        Part::new(Segment::Tokens(ids("before"))),
        Part::new(Segment::Image(0)),
        Part::new(Segment::Tokens(ids("after"))),
    ];
    let asm = model.assemble(&[row], Some(&feats), Padding::Right).unwrap();
    let hidden = model.forward_hidden(&asm).unwrap();
    let want_hidden: Vec<f32> =
        exp["last_hidden"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let e = max_rel(&vec3(hidden.clone()), &want_hidden);
    assert!(e < 1e-4, "last hidden state: max rel err {e}");
    let logits = vec3(model.llm.logits(hidden));
    let want: Vec<f32> = exp["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let e = max_rel(&logits, &want);
    assert!(e < 1e-4, "logits: max rel err {e}");
}

#[test]
fn gamma_zero_equals_no_gamma_and_nonzero_gamma_changes_output() {
    let cfg = small_cfg();
    let dev = Default::default();
    let model: PixelLm<B> = cfg.init(&dev).unwrap();
    let feats = model.encode_images(&preprocess(&cfg, &[image(40, 25, 1)])).unwrap();
    let plain = model.assemble(&[prompt(0)], Some(&feats), Padding::Right).unwrap();
    let mut with_zero = prompt(0);
    with_zero[2] = Part::with_gamma(Segment::Tokens(vec![12, 7, 30, 2]), vec![0.0; 4]);
    let zero = model.assemble(&[with_zero], Some(&feats), Padding::Right).unwrap();
    assert!(zero.gamma.is_some());
    let a = vec3(model.forward_hidden(&plain).unwrap());
    let b = vec3(model.forward_hidden(&zero).unwrap());
    assert_eq!(a, b);
    let mut with_bias = prompt(0);
    with_bias[2] = Part::with_gamma(Segment::Tokens(vec![12, 7, 30, 2]), vec![0.4, -0.3, 0.2, 0.1]);
    let biased = model.assemble(&[with_bias], Some(&feats), Padding::Right).unwrap();
    let c = vec3(model.forward_hidden(&biased).unwrap());
    assert!(max_rel(&a, &c) > 1e-4, "a nonzero gamma must change the hidden states");
}

#[test]
fn no_p_hat_is_the_plain_model_and_p_hat_adds_positions() {
    let cfg = small_cfg();
    let dev = Default::default();
    let with: PixelLm<B> = cfg.init(&dev).unwrap();
    // The same weights without p_hat: save, then load into prompt_embeddings = 0.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    pixellm::save(&with, &path).unwrap();
    let mut cfg0 = cfg.clone();
    cfg0.prompt_embeddings = 0;
    let err = pixellm::load::<B>(&cfg0, &path, Layout::Native, None, &dev).unwrap_err().to_string();
    assert!(err.contains("unexpected prompt_embeddings"), "{err}");
    // Our checkpoint without that tensor loads into the p_hat-free model.
    let mut named = popen_model::weights::named_tensors(&with);
    named.retain(|(n, _, _)| !n.starts_with("prompt_embeddings"));
    popen_model::weights::write_safetensors(&path, &named, &Default::default()).unwrap();
    let (without, _) = pixellm::load::<B>(&cfg0, &path, Layout::Native, None, &dev).unwrap();

    let feats_a = with.encode_images(&preprocess(&cfg, &[image(30, 30, 2)])).unwrap();
    let feats_b = without.encode_images(&preprocess(&cfg, &[image(30, 30, 2)])).unwrap();
    let a = with.assemble(&[prompt(0)], Some(&feats_a), Padding::Right).unwrap();
    let b = without.assemble(&[prompt(0)], Some(&feats_b), Padding::Right).unwrap();
    assert_eq!(vec3(with.forward_hidden(&a).unwrap()), vec3(without.forward_hidden(&b).unwrap()));

    let mut row = prompt(0);
    row.push(Part::new(Segment::Prompt));
    let p = with.assemble(&[row.clone()], Some(&feats_a), Padding::Right).unwrap();
    assert_eq!(p.width, a.width + cfg.prompt_embeddings);
    let e = without.assemble(&[row], Some(&feats_b), Padding::Right).unwrap_err().to_string();
    assert!(e.contains("prompt_embeddings = 0"), "{e}");
}

/// Sampling with the KV cache (left padding, masked image padding) and teacher forcing the
/// sampled answer give the same per-token log-probs and hidden states.
#[test]
fn cached_sampling_equals_teacher_forcing() {
    let cfg = small_cfg();
    let dev = Default::default();
    let model: PixelLm<B> = cfg.init(&dev).unwrap();
    // Two images of different aspect ratios: different padding masks in one batch.
    let imgs = [image(40, 20, 3), image(18, 36, 4)];
    let feats = model.encode_images(&preprocess(&cfg, &imgs)).unwrap();
    let mut rows = vec![prompt(0), prompt(1)];
    rows[1].insert(0, Part::new(Segment::Tokens(vec![3, 3])));
    let asm = model.assemble(&rows, Some(&feats), Padding::Left).unwrap();
    let sampling = SamplingConfig { max_new_tokens: 6, temperature: 1.0, top_p: 0.9, seed: 11 };
    let gens = model.generate(&asm, &sampling, &[]).unwrap();
    for (r, g) in gens.iter().enumerate() {
        assert_eq!(g.ids.len(), 6);
        let mut row = rows[r].clone();
        row.push(Part::new(Segment::Tokens(g.ids.clone())));
        let tf = model.assemble(&[row], Some(&feats), Padding::Right).unwrap();
        let start = *tf.piece_starts[0].last().unwrap();
        let hidden = model.forward_hidden(&tf).unwrap();
        let lp = vec2(model.response_logprobs(hidden.clone(), &[(start, g.ids.clone())]).unwrap());
        let e = max_rel(&lp, &g.logprobs);
        assert!(e < 1e-4, "row {r}: logprobs differ by {e}: {lp:?} vs {:?}", g.logprobs);
        let [_, _, h] = hidden.dims();
        let tf_hidden = hidden.slice([0..1, start..start + 6, 0..h]).reshape([6, h]);
        let e = max_rel(&vec2(tf_hidden), &vec2(g.hidden.clone()));
        assert!(e < 1e-4, "row {r}: hidden states differ by {e}");
    }
}

/// Reading `f` for a batch of (perturbed) images in one forward equals reading it per image.
#[test]
fn batched_seg_embeddings_equal_single_rows() {
    let cfg = small_cfg();
    let dev = Default::default();
    let model: PixelLm<B> = cfg.init(&dev).unwrap();
    let imgs = [image(32, 32, 5), image(32, 32, 6), image(32, 20, 7)];
    let pre = preprocess(&cfg, &imgs);
    let answer: Vec<u32> = vec![20, 21, 50, 51, 52, 53, 54, 55, 22, 50, 51, 52, 53, 54, 55, 2];
    let groups = [vec![2usize, 3, 4, 5, 6, 7], vec![9, 10, 11, 12, 13, 14]];
    let row = |i: usize| {
        let mut r = prompt(i);
        r.push(Part::new(Segment::Tokens(answer.clone())));
        r
    };
    let feats = model.encode_images(&pre).unwrap();
    let asm = model.assemble(&[row(0), row(1), row(2)], Some(&feats), Padding::Right).unwrap();
    let hidden = model.forward_hidden(&asm).unwrap();
    let start = *asm.piece_starts[0].last().unwrap();
    let objects: Vec<(usize, Vec<usize>)> =
        (0..3).flat_map(|r| groups.iter().map(move |g| (r, g.iter().map(|p| p + start).collect()))).collect();
    let f = model.seg_embeddings(hidden, &objects).unwrap();
    assert_eq!(f.dims(), [6, 2, cfg.out_dim]);
    let image_index: Vec<usize> = objects.iter().map(|o| o.0).collect();
    let (masks, _) = model.decode_masks(&feats, f.clone(), &image_index).unwrap();
    assert_eq!(masks[4].dims(), [20, 32], "masks come back at the original size");
    let fb = vec3(f);
    for r in 0..3 {
        let single = model.encode_images(&pre[r..r + 1]).unwrap();
        let a = model.assemble(&[row(0)], Some(&single), Padding::Right).unwrap();
        let h = model.forward_hidden(&a).unwrap();
        let objs: Vec<(usize, Vec<usize>)> =
            groups.iter().map(|g| (0, g.iter().map(|p| p + start).collect())).collect();
        let f1 = vec3(model.seg_embeddings(h, &objs).unwrap());
        let n = f1.len();
        let e = max_rel(&fb[r * n..(r + 1) * n], &f1);
        assert!(e < 1e-5, "row {r}: batched f differs by {e}");
    }
}

#[test]
fn seg_feedback_tokens_enter_the_sequence() {
    let cfg = small_cfg();
    let dev = Default::default();
    let model: PixelLm<B> = cfg.init(&dev).unwrap();
    let feats = model.encode_images(&preprocess(&cfg, &[image(32, 32, 8)])).unwrap();
    let f = Tensor::<B, 2>::from_data(
        TensorData::new((0..64).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(), [2, 32]),
        &dev,
    );
    let mut row = prompt(0);
    row.push(Part::with_gamma(Segment::SegFeedback(f.clone()), vec![0.2, -0.1]));
    let asm = model.assemble(&[row], Some(&feats), Padding::Right).unwrap();
    let plain = model.assemble(&[prompt(0)], Some(&feats), Padding::Right).unwrap();
    assert_eq!(asm.width, plain.width + 2);
    let h = model.forward_hidden(&asm).unwrap();
    assert!(vec3(h).iter().all(|v| v.is_finite()));
    let bad = Tensor::<B, 2>::zeros([1, 31], &dev);
    let mut row = prompt(0);
    row.push(Part::new(Segment::SegFeedback(bad)));
    let e = model.assemble(&[row], Some(&feats), Padding::Right).unwrap_err().to_string();
    assert!(e.contains("width 31"), "{e}");
}

#[test]
fn save_load_round_trip_and_errors() {
    let cfg = small_cfg();
    let dev = Default::default();
    let model: PixelLm<B> = cfg.init(&dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    pixellm::save(&model, &path).unwrap();
    assert_eq!(pixellm::saved_config(&path).unwrap(), cfg);
    let (back, fresh) = pixellm::load::<B>(&cfg, &path, Layout::Native, None, &dev).unwrap();
    assert!(fresh.is_empty());
    let feats = model.encode_images(&preprocess(&cfg, &[image(25, 31, 9)])).unwrap();
    let feats2 = back.encode_images(&preprocess(&cfg, &[image(25, 31, 9)])).unwrap();
    let a = model.assemble(&[prompt(0)], Some(&feats), Padding::Right).unwrap();
    let b = back.assemble(&[prompt(0)], Some(&feats2), Padding::Right).unwrap();
    assert_eq!(vec3(model.forward_hidden(&a).unwrap()), vec3(back.forward_hidden(&b).unwrap()));

    let mut named = popen_model::weights::named_tensors(&model);
    named.retain(|(n, _, _)| n != "text_hidden_fcs.fc_2.bias" && !n.starts_with("vision_tower."));
    popen_model::weights::write_safetensors(&path, &named, &Default::default()).unwrap();
    let e = pixellm::load::<B>(&cfg, &path, Layout::Native, None, &dev).unwrap_err().to_string();
    assert!(e.contains("no vision tower"), "{e}");
    let tower = dir.path().join("tower.safetensors");
    popen_model::weights::save(&model.vision_tower, &tower, &Default::default()).unwrap();
    let e = pixellm::load::<B>(&cfg, &path, Layout::Native, Some(&tower), &dev).unwrap_err().to_string();
    assert!(e.contains("missing text_hidden_fcs.fc_2.bias"), "{e}");

    let mut bad = cfg.clone();
    bad.out_dim = 12;
    assert!(bad.init::<B>(&dev).is_err());
    let mut bad = cfg.clone();
    bad.vision_select_layers = vec![-2, -9];
    assert!(bad.validate().is_err());
}

#[test]
fn presets_are_valid_and_match_pipelines_toml() {
    for cfg in [PixelLmConfig::tiny(600), PixelLmConfig::pixellm_7b(), PixelLmConfig::pixellm_13b()] {
        cfg.validate().unwrap();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    for (file, cfg) in [
        ("pipelines/model-pixellm-7b.toml", PixelLmConfig::pixellm_7b()),
        ("pipelines/model-pixellm-13b.toml", PixelLmConfig::pixellm_13b()),
    ] {
        let got = PixelLmConfig::from_toml_file(root.join(file)).unwrap();
        assert_eq!(got, cfg, "{file} drifted from the preset");
    }
    let tiny = PixelLmConfig::from_toml_file(root.join("pipelines/model-tiny.toml")).unwrap();
    assert_eq!(tiny, PixelLmConfig::tiny(tiny.llm.vocab_size), "model-tiny.toml drifted");
}

/// A model TOML (model.toml of a model folder, `model-init --config`) rejects a key the model
/// does not read, in a section as at the top level, naming the key and its section; every
/// shipped `pipelines/model-*.toml` still loads. Before the fix `[llm]`, `[vision]` and
/// `[decoder]` (HF-style configs that ignore unknown keys) took a misspelt key silently.
#[test]
fn model_toml_rejects_unknown_keys_in_every_section() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut shipped = 0;
    for e in std::fs::read_dir(root.join("pipelines")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("model-") && name.ends_with(".toml") {
            PixelLmConfig::from_toml_file(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
            shipped += 1;
        }
    }
    assert!(shipped >= 4, "{shipped} pipelines/model-*.toml");

    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(root.join("pipelines/model-tiny-sam.toml")).unwrap();
    // (section header the key goes under, the key line): the typo of a real key in each
    // section, and one at the top level.
    for (section, line) in [
        ("", "seg_feedbak = true"),
        ("[llm]", "hiden_size = 64"),
        ("[vision]", "patch_sise = 16"),
        ("[decoder]", "num_head = 8"),
        ("[sam_encoder]", "depth = [2, 2]"),
    ] {
        let text = if section.is_empty() {
            format!("{line}\n{good}")
        } else {
            // After the section's header line (the name also appears in comments).
            let mut lines: Vec<&str> = good.lines().collect();
            let at = lines.iter().position(|l| l.starts_with(section)).unwrap_or_else(|| panic!("no {section} header"));
            lines.insert(at + 1, line);
            lines.join("\n")
        };
        let path = tmp.path().join("model.toml");
        std::fs::write(&path, &text).unwrap();
        let key = line.split(' ').next().unwrap();
        let msg = PixelLmConfig::from_toml_file(&path).expect_err(line).to_string();
        assert!(msg.contains(key), "{line}: {msg}");
        // Top level and [sam_encoder] are serde's own `deny_unknown_fields` message.
        if ["[llm]", "[vision]", "[decoder]"].contains(&section) {
            assert!(msg.contains(section), "{line}: {msg}");
        }
    }
}

/// The seg locator's box (`pixellm::attention_box`), hand-computed: a one-hot attention
/// gives its own cell; a uniform one the whole input (the uniform distribution on
/// [0, 224) has variance 224^2 / 12, so mu -+ sqrt(3 var) = 0 and 224); two equal cells
/// side by side (centers 24 and 40, cell 16): mu = 32, var = 64 + 256/12, half =
/// sqrt(3 * 85.33) = 16 -> x from 16 to 48, y of the row's cell.
#[test]
fn locator_box_from_attention_hand_cases() {
    let dev = Default::default();
    let (g, size) = (14usize, 224usize);
    let mut rows = vec![0f32; 3 * g * g];
    rows[2 * g + 5] = 1.0; // row 0: cell (i=2, j=5)
    for v in &mut rows[g * g..2 * g * g] {
        *v = 1.0 / (g * g) as f32;
    }
    rows[2 * g * g + 3 * g + 1] = 0.5; // row 2: cells (3, 1) and (3, 2)
    rows[2 * g * g + 3 * g + 2] = 0.5;
    let a = Tensor::<B, 2>::from_data(TensorData::new(rows, [3, g * g]), &dev);
    let got = vec2(pixellm::attention_box(a, g, size));
    let want = [80.0, 32.0, 96.0, 48.0, 0.0, 0.0, 224.0, 224.0, 16.0, 48.0, 48.0, 64.0];
    for (k, (x, y)) in got.iter().zip(want).enumerate() {
        assert!((x - y).abs() < 1e-3, "entry {k}: {x} vs {y} ({got:?})");
    }
}

/// With a locator, the decoder is prompted with SAM's own box encoding of the located box:
/// `box_prompts` equals the verified `PromptEncoder::forward` of that box, and the masks
/// of `decode_masks` follow the attention (they differ when `f` changes where it points),
/// with gradients reaching the locator from the mask logits.
#[test]
fn locator_prompts_are_sam_box_prompts_and_carry_gradients() {
    use burn::backend::Autodiff;
    type A = Autodiff<NdArray<f32>>;
    let dev = Default::default();
    let mut cfg = PixelLmConfig::tiny_sam(64);
    cfg.seg_locator = 16;
    cfg.validate().unwrap();
    let model = cfg.init::<A>(&dev).unwrap();
    let pe = &model.decoder.prompt_encoder;
    let boxes = Tensor::<A, 2>::from_data(TensorData::new(vec![10.0f32, 20.0, 100.0, 150.0], [1, 4]), &dev);
    let (sparse, _) = pe.forward(None, Some(boxes.clone() - 0.5), None, None).unwrap();
    let ours = pe.box_prompts(boxes);
    assert!(max_rel(&vec3(ours.inner()), &vec3(sparse.inner())) < 1e-6);

    let loc = model.seg_locator.as_ref().unwrap();
    let g = cfg.decoder.image_embedding_size;
    let src = Tensor::<A, 4>::random([2, 256, g, g], burn::tensor::Distribution::Normal(0.0, 1.0), &dev);
    let f = Tensor::<A, 2>::random([2, 256], burn::tensor::Distribution::Normal(0.0, 1.0), &dev);
    let pixels = Tensor::<A, 3>::random([2, g * g, 48], burn::tensor::Distribution::Normal(0.0, 1.0), &dev);
    let (bx, att) = loc.locate(src, pe.get_dense_pe(), pixels, f, cfg.image_size);
    assert_eq!(bx.dims(), [2, 4]);
    let sums = vec2(att.clone().sum_dim(1).inner());
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
    let grads = bx.sum().backward();
    let gq = loc.query.weight.grad(&grads).expect("query gradient");
    let gk = loc.key.weight.grad(&grads).expect("key gradient");
    let gp = loc.pixel_key.weight.grad(&grads).expect("pixel key gradient");
    for g in [gq, gk, gp] {
        assert!(g.abs().sum().into_scalar() > 0.0);
    }
}

/// `llm_image_pe` + `llm_image_pixels`: the LLM's image tokens are
/// `mm_projector(bilinear(emb + dense_pe)) + llm_pixel_proj(cell pixels)`, built here by hand
/// from the public parts (SAM's dense PE of the decoder's prompt encoder, `resize_bilinear`,
/// `mm_projector`) and cell pixels computed by hand (4x4 sub-cell RGB means of each of the 7x7
/// cells of 32 px: a constant image, and one whose red channel is 1 left of x = 112, so cell
/// column 3 (x 96..128) has sub-columns 1, 1, 0, 0), while the decoder's scale stays the plain
/// embedding. Without them the tokens are `mm_projector(bilinear(emb))`; a CLIP model
/// refuses both.
#[test]
fn llm_image_pe_and_pixels_change_only_the_llm_tokens() {
    let dev = Default::default();
    let mut cfg = PixelLmConfig::tiny_sam(64);
    cfg.llm_image_pe = true;
    cfg.llm_image_pixels = true;
    cfg.validate().unwrap();
    let model = cfg.init::<B>(&dev).unwrap();
    let s = cfg.image_size;
    let g = cfg.decoder.image_embedding_size;
    let lg = cfg.llm_image_grid;
    assert_eq!((s, lg), (224, 7));
    let mut constant = vec![0.0f32; 3 * s * s];
    for (c, v) in [0.5f32, -1.0, 2.0].into_iter().enumerate() {
        constant[c * s * s..(c + 1) * s * s].fill(v);
    }
    let mut split = vec![0.0f32; 3 * s * s];
    for y in 0..s {
        for x in 0..112 {
            split[y * s + x] = 1.0;
        }
    }
    let images: Vec<Preprocessed> = [constant, split]
        .into_iter()
        .map(|pixels| Preprocessed { pixels, resized_hw: (s, s), original_hw: (96, 96) })
        .collect();
    // Hand-computed cell pixels [2, 49, 48]: sub-cell k = ry * 4 + rx, value k * 3 + channel.
    let mut px = vec![0.0f32; 2 * lg * lg * 48];
    for cell in 0..lg * lg {
        let cx = cell % lg;
        for k in 0..16 {
            let rx = k % 4;
            let a = cell * 48 + k * 3;
            px[a..a + 3].copy_from_slice(&[0.5, -1.0, 2.0]);
            let red = if cx < 3 || (cx == 3 && rx < 2) { 1.0 } else { 0.0 };
            px[lg * lg * 48 + a] = red;
        }
    }
    let px = Tensor::<B, 3>::from_data(TensorData::new(px, [2, lg * lg, 48]), &dev);
    let emb = Tensor::<B, 4>::random([2, 256, g, g], burn::tensor::Distribution::Normal(0.0, 1.0), &dev);
    let feats = model.encode_images_with(&images, Some(emb.clone())).unwrap();
    let projected = |grid: Tensor<B, 4>| {
        let small = popen_model::sam::resize_bilinear(grid, lg, lg).reshape([2, 256, lg * lg]).swap_dims(1, 2);
        model.mm_projector.forward(small)
    };
    let pe = model.decoder.prompt_encoder.get_dense_pe().expand([2, 256, g, g]);
    let pixel_part = model.llm_pixel_proj.as_ref().expect("llm_pixel_proj").forward(px);
    let got = vec3(feats.llm_tokens.clone());
    assert!(max_rel(&got, &vec3(projected(emb.clone() + pe.clone()) + pixel_part.clone())) < 1e-5);
    assert!(max_rel(&got, &vec3(projected(emb.clone() + pe))) > 1e-2, "the pixels must change the tokens");
    assert!(max_rel(&got, &vec3(projected(emb.clone()) + pixel_part)) > 1e-2, "the PE must change the tokens");
    let scale: Vec<f32> = feats.scales[0].clone().into_data().to_vec().unwrap();
    let plain: Vec<f32> = emb.into_data().to_vec().unwrap();
    assert_eq!(scale, plain, "the decoder's scale is the plain embedding");

    for flag in 0..2 {
        let mut clip = PixelLmConfig::tiny(64);
        if flag == 0 {
            clip.llm_image_pe = true;
        } else {
            clip.llm_image_pixels = true;
        }
        let err = clip.validate().unwrap_err().to_string();
        assert!(err.contains("needs sam_encoder"), "{err}");
    }
}

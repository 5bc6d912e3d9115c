//! SAM's automatic mask generator ("segment everything"), model-agnostic plain Rust.
//!
//! A grid of positive point prompts is run over the image (and, with `crop_n_layers > 0`,
//! over overlapping crops of it); each point yields a few candidate masks, which are
//! filtered by the model's predicted IoU, by a stability score and by closeness to a crop
//! edge, de-duplicated by box NMS within each crop and then across crops, and optionally
//! cleaned of small holes and islands. The model side is the [`PromptModel`] trait.
//!
//! The semantics follow the official Python (`SamAutomaticMaskGenerator` and
//! `utils/amg.py`, identical in segment-anything and MobileSAM) step for step, including
//! its output order and numeric details (our own implementation, not a translation):
//!
//! - Point grids: `linspace(1/(2n), 1 - 1/(2n), n)` computed as numpy does
//!   (`i * step + start`, the last value set to `stop`), x varying fastest; layer `i` uses
//!   `int(n / factor^i)` points per side. Points are scaled by the crop's (width, height).
//! - Crop boxes: `overlap = int(ratio * short_side * (2 / n_crops))`,
//!   `crop_len = int(ceil((overlap * (n - 1) + len) / n))`, origins `(crop_len - overlap) * i`,
//!   the crops of a layer enumerated x-major (`product(x0s, y0s)`), clipped at the image.
//! - Comparisons against thresholds happen in `f32`, as torch compares a `float32` tensor
//!   with a Python scalar: `iou > pred_iou_thresh` (only if the threshold is `> 0`),
//!   stability `>= stability_score_thresh` (only if `> 0`), logits `> mask_threshold`.
//! - Stability score: per-row counts are summed in `int16` (wrapping, as
//!   `.sum(-1, dtype=torch.int16)` does for rows wider than 32767 pixels), rows in `int32`;
//!   the score is `f32(intersection) / f32(union)` (NaN for an all-background mask, which
//!   the filter drops).
//! - Boxes are `x0, y0, x1, y1` of the set pixels, inclusive (so the xywh `bbox` is one
//!   pixel narrower than the mask, as in SAM's output); `[0, 0, 0, 0]` for an empty mask.
//! - NMS is torchvision's CPU kernel: scores sorted descending (NaN first), areas
//!   `(x2 - x1) * (y2 - y1)` and IoU in `f32`, suppression when `iou > thresh` compared in
//!   `f64`. Ties in score keep the earlier mask first (a stable sort). torch's own sort
//!   is not stable on every build (x86-simd-sort), so Python's order among equal scores
//!   (e.g. all masks of one crop in the cross-crop NMS, scored `1 / crop_area`) is not
//!   reproducible in general; ours is deterministic. Zero-area boxes (one-pixel-wide or
//!   empty masks) get IoU `0 / 0 = NaN` and never suppress each other. (torchvision's CUDA
//!   kernel compares in `f32`; fixtures from CPU runs match this.)
//! - Small-region removal labels 8-connected components like
//!   `cv2.connectedComponentsWithStats(mask, 8)`; the label order, which decides which of
//!   several equally large islands is kept when all are too small, is OpenCV's block-based
//!   order (first 2x2 block in raster order of 2x2 blocks).

use image::RgbImage;
use popen_core::mask::{Mask, Rle};
use serde::{Deserialize, Deserializer, Serialize};

/// What the generator needs from a promptable segmenter (implemented by popen-sam's SAM
/// models).
pub trait PromptModel {
    /// Encode one RGB image (the full image or a crop); later `predict_points` calls refer
    /// to it.
    fn set_image(&mut self, image: &RgbImage) -> Result<(), AmgError>;
    /// One positive point per prompt, in pixel coordinates (x, y) of the image given to
    /// `set_image`; multimask output. Returns `masks_per_point` mask LOGITS per point at
    /// that image's size, row-major, point-major order (point 0's masks first), and their
    /// IoU predictions.
    fn predict_points(&mut self, points: &[[f64; 2]]) -> Result<PointMasks, AmgError>;

    /// [`Self::predict_points`] with bounded memory: the logits of the masks whose IoU
    /// prediction `wanted` accepts go to `sink` in pieces of at most `max_values` logits
    /// (whole masks, or row bands of one mask when a mask is larger; at least one row),
    /// mask after mask (point-major order), rows in order. Returns the batch's sizes and all
    /// IoU predictions with `logits` empty. The default materializes [`Self::predict_points`]
    /// and slices it; SAM's predictor upsamples piece by piece (memory bounded by the
    /// budget, not by points x masks x the image's pixels).
    fn predict_points_banded(
        &mut self,
        points: &[[f64; 2]],
        max_values: usize,
        wanted: &dyn Fn(f32) -> bool,
        sink: &mut dyn FnMut(MaskRows<'_>) -> Result<(), AmgError>,
    ) -> Result<PointMasks, AmgError> {
        let out = self.predict_points(points)?;
        check_point_masks(&out, points.len(), out.height, out.width)?;
        let (h, w, k) = (out.height, out.width, out.masks_per_point);
        let band = (max_values / w.max(1)).clamp(1, h.max(1));
        for (m, &iou) in out.iou.iter().enumerate() {
            if !wanted(iou) {
                continue;
            }
            let mask = &out.logits[m * h * w..(m + 1) * h * w];
            let mut r0 = 0;
            while r0 < h {
                let r1 = (r0 + band).min(h);
                let logits = &mask[r0 * w..r1 * w];
                sink(MaskRows { mask: m, point: m / k, iou, rows: r0..r1, width: w, height: h, logits })?;
                r0 = r1;
            }
        }
        Ok(PointMasks { logits: Vec::new(), ..out })
    }
}

/// A piece of one mask's logits from [`PromptModel::predict_points_banded`]: rows `rows`
/// (of `height`), `rows.len() * width` values, row-major.
#[derive(Clone, Debug)]
pub struct MaskRows<'a> {
    /// The mask's index in the batch (point-major: point `mask / masks_per_point`).
    pub mask: usize,
    /// The prompt point's index in the batch.
    pub point: usize,
    /// Its predicted IoU.
    pub iou: f32,
    pub rows: std::ops::Range<usize>,
    pub width: usize,
    pub height: usize,
    pub logits: &'a [f32],
}

/// Mask logits and IoU predictions for a batch of point prompts (see [`PromptModel`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PointMasks {
    pub height: usize,
    pub width: usize,
    pub masks_per_point: usize,
    /// `points * masks_per_point * height * width` logits, point-major, row-major masks.
    pub logits: Vec<f32>,
    /// `points * masks_per_point` predicted IoUs, in the order of the masks.
    pub iou: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum AmgError {
    /// The model failed or returned something malformed.
    #[error("SAM model: {0}")]
    Model(String),
    /// An invalid [`AmgConfig`].
    #[error("invalid automatic mask generator config: {0}")]
    Config(String),
    /// An image the generator cannot process (empty, too large, too small for the crops).
    #[error("automatic mask generator image: {0}")]
    Image(String),
    /// A mask operation failed (should not happen with consistent inputs).
    #[error("automatic mask generator: {0}")]
    Mask(#[from] popen_core::CoreError),
}

/// Largest `crop_n_layers` accepted (layer `i` has `4^i` crops).
pub const MAX_CROP_LAYERS: usize = 8;

/// The automatic mask generator's settings; [`Default`] = SAM's defaults (tuned for ViT-H).
///
/// In a config file every field is optional. `points_per_side` and `point_grids` are
/// exclusive: a file that gives `point_grids` and leaves out `points_per_side` means
/// `points_per_side = None` (TOML has no null; in JSON `null` works too).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "AmgConfigFile")]
pub struct AmgConfig {
    /// Points sampled along each side of the image (layer 0); `None` when `point_grids`
    /// is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub points_per_side: Option<usize>,
    /// Points sent to the model at once.
    pub points_per_batch: usize,
    /// Keep masks whose predicted IoU is `>` this (0 = no filter).
    pub pred_iou_thresh: f64,
    /// Keep masks whose stability score is `>=` this (0 = no filter).
    pub stability_score_thresh: f64,
    /// How far the cutoff moves (both ways) for the stability score.
    pub stability_score_offset: f64,
    /// Logit threshold that binarizes masks (SAM's `mask_threshold`).
    pub mask_threshold: f64,
    /// Box IoU above which NMS drops a mask within one crop.
    pub box_nms_thresh: f64,
    /// Extra crop layers; layer `i` has `(2^i)^2` crops.
    pub crop_n_layers: usize,
    /// Box IoU above which NMS drops a mask across crops.
    pub crop_nms_thresh: f64,
    /// How much the crops of layer 1 overlap, as a fraction of the image's short side.
    pub crop_overlap_ratio: f64,
    /// Layer `i` samples `points_per_side / factor^i` points per side.
    pub crop_n_points_downscale_factor: usize,
    /// Explicit normalized ([0, 1]) point grids, one per crop layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub point_grids: Option<Vec<Vec<[f64; 2]>>>,
    /// If > 0, holes and islands smaller than this many pixels are removed (then NMS is
    /// rerun).
    pub min_mask_region_area: u64,
    /// Most MiB of f32 mask logits at the image's own size held at once (not a SAM
    /// setting: the masks of a point batch are upsampled in groups, or one mask in row
    /// bands, under it; the masks do not depend on it). SAM upsamples the whole batch at
    /// once: 64 points x 3 masks x 4 bytes x pixels = 9.2 GB for a 12 MP photo.
    pub mask_memory_mb: u64,
}

impl Default for AmgConfig {
    fn default() -> Self {
        AmgConfig {
            points_per_side: Some(32),
            points_per_batch: 64,
            pred_iou_thresh: 0.88,
            stability_score_thresh: 0.95,
            stability_score_offset: 1.0,
            mask_threshold: 0.0,
            box_nms_thresh: 0.7,
            crop_n_layers: 0,
            crop_nms_thresh: 0.7,
            crop_overlap_ratio: 512.0 / 1500.0,
            crop_n_points_downscale_factor: 1,
            point_grids: None,
            min_mask_region_area: 0,
            mask_memory_mb: 256,
        }
    }
}

/// What a config file holds: like [`AmgConfig`], but remembers whether `points_per_side`
/// was written at all.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct AmgConfigFile {
    #[serde(deserialize_with = "present")]
    points_per_side: Option<Option<usize>>,
    points_per_batch: usize,
    pred_iou_thresh: f64,
    stability_score_thresh: f64,
    stability_score_offset: f64,
    mask_threshold: f64,
    box_nms_thresh: f64,
    crop_n_layers: usize,
    crop_nms_thresh: f64,
    crop_overlap_ratio: f64,
    crop_n_points_downscale_factor: usize,
    point_grids: Option<Vec<Vec<[f64; 2]>>>,
    min_mask_region_area: u64,
    mask_memory_mb: u64,
}

/// A field that is present (possibly null) deserializes to `Some(..)`; absent ones get
/// the container default (`None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl Default for AmgConfigFile {
    fn default() -> Self {
        let c = AmgConfig::default();
        AmgConfigFile {
            points_per_side: None,
            points_per_batch: c.points_per_batch,
            pred_iou_thresh: c.pred_iou_thresh,
            stability_score_thresh: c.stability_score_thresh,
            stability_score_offset: c.stability_score_offset,
            mask_threshold: c.mask_threshold,
            box_nms_thresh: c.box_nms_thresh,
            crop_n_layers: c.crop_n_layers,
            crop_nms_thresh: c.crop_nms_thresh,
            crop_overlap_ratio: c.crop_overlap_ratio,
            crop_n_points_downscale_factor: c.crop_n_points_downscale_factor,
            point_grids: c.point_grids,
            min_mask_region_area: c.min_mask_region_area,
            mask_memory_mb: c.mask_memory_mb,
        }
    }
}

impl From<AmgConfigFile> for AmgConfig {
    fn from(f: AmgConfigFile) -> Self {
        let points_per_side = match f.points_per_side {
            Some(explicit) => explicit,
            None if f.point_grids.is_some() => None,
            None => AmgConfig::default().points_per_side,
        };
        AmgConfig {
            points_per_side,
            points_per_batch: f.points_per_batch,
            pred_iou_thresh: f.pred_iou_thresh,
            stability_score_thresh: f.stability_score_thresh,
            stability_score_offset: f.stability_score_offset,
            mask_threshold: f.mask_threshold,
            box_nms_thresh: f.box_nms_thresh,
            crop_n_layers: f.crop_n_layers,
            crop_nms_thresh: f.crop_nms_thresh,
            crop_overlap_ratio: f.crop_overlap_ratio,
            crop_n_points_downscale_factor: f.crop_n_points_downscale_factor,
            point_grids: f.point_grids,
            min_mask_region_area: f.min_mask_region_area,
            mask_memory_mb: f.mask_memory_mb,
        }
    }
}

fn config_err(msg: impl Into<String>) -> AmgError {
    AmgError::Config(msg.into())
}

impl AmgConfig {
    /// Checks the settings; [`generate`] calls it first.
    pub fn validate(&self) -> Result<(), AmgError> {
        self.layer_point_grids().map(|_| ())
    }

    /// The normalized point grid of each crop layer (validating the whole config).
    pub fn layer_point_grids(&self) -> Result<Vec<Vec<[f64; 2]>>, AmgError> {
        if self.points_per_batch == 0 {
            return Err(config_err("points_per_batch must be > 0"));
        }
        if self.mask_memory_mb == 0 {
            return Err(config_err("mask_memory_mb must be > 0"));
        }
        let unit = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(config_err(format!("{name} must be in [0, 1], got {v}")))
            }
        };
        unit("pred_iou_thresh", self.pred_iou_thresh)?;
        unit("stability_score_thresh", self.stability_score_thresh)?;
        unit("box_nms_thresh", self.box_nms_thresh)?;
        unit("crop_nms_thresh", self.crop_nms_thresh)?;
        if !(self.stability_score_offset.is_finite() && self.stability_score_offset >= 0.0) {
            return Err(config_err(format!(
                "stability_score_offset must be finite and >= 0, got {}",
                self.stability_score_offset
            )));
        }
        if !self.mask_threshold.is_finite() {
            return Err(config_err(format!("mask_threshold must be finite, got {}", self.mask_threshold)));
        }
        if !(0.0..1.0).contains(&self.crop_overlap_ratio) {
            return Err(config_err(format!("crop_overlap_ratio must be in [0, 1), got {}", self.crop_overlap_ratio)));
        }
        if self.crop_n_layers > MAX_CROP_LAYERS {
            return Err(config_err(format!(
                "crop_n_layers must be at most {MAX_CROP_LAYERS}, got {}",
                self.crop_n_layers
            )));
        }
        if self.crop_n_points_downscale_factor == 0 {
            return Err(config_err("crop_n_points_downscale_factor must be >= 1"));
        }
        match (self.points_per_side, &self.point_grids) {
            (Some(_), Some(_)) | (None, None) => {
                Err(config_err("exactly one of points_per_side and point_grids must be given"))
            }
            (Some(n), None) => {
                if n == 0 {
                    return Err(config_err("points_per_side must be >= 1"));
                }
                if n.checked_mul(n).is_none() {
                    return Err(config_err(format!("points_per_side {n} is too large")));
                }
                let mut grids = Vec::with_capacity(self.crop_n_layers + 1);
                for layer in 0..=self.crop_n_layers {
                    let n_layer = layer_points_per_side(n, self.crop_n_points_downscale_factor, layer);
                    if n_layer == 0 {
                        return Err(config_err(format!(
                            "crop layer {layer} gets no points: points_per_side {n} / \
                             crop_n_points_downscale_factor {}^{layer} < 1",
                            self.crop_n_points_downscale_factor
                        )));
                    }
                    grids.push(build_point_grid(n_layer));
                }
                Ok(grids)
            }
            (None, Some(grids)) => {
                if grids.len() != self.crop_n_layers + 1 {
                    return Err(config_err(format!(
                        "point_grids has {} grids, but crop_n_layers = {} needs {}",
                        grids.len(),
                        self.crop_n_layers,
                        self.crop_n_layers + 1
                    )));
                }
                for (i, g) in grids.iter().enumerate() {
                    if g.is_empty() {
                        return Err(config_err(format!("point_grids[{i}] is empty")));
                    }
                    if let Some(p) = g.iter().find(|p| !p.iter().all(|v| (0.0..=1.0).contains(v))) {
                        return Err(config_err(format!("point_grids[{i}] has point {p:?} outside [0, 1]")));
                    }
                }
                Ok(grids.clone())
            }
        }
    }
}

/// `int(n / factor**layer)` (exact integer division; 0 when the power overflows).
fn layer_points_per_side(n: usize, factor: usize, layer: usize) -> usize {
    match u32::try_from(layer).ok().and_then(|l| factor.checked_pow(l)) {
        Some(d) => n / d,
        None => 0,
    }
}

/// One generated mask, as SAM's `generate` returns it (`output_mode="coco_rle"`).
#[derive(Clone, Debug, PartialEq)]
pub struct AmgMask {
    /// The mask at the full image's size.
    pub segmentation: Rle,
    /// Foreground pixels.
    pub area: u64,
    /// `[x0, y0, x1 - x0, y1 - y0]` with `x1, y1` the last set column/row (inclusive).
    pub bbox: [f64; 4],
    pub predicted_iou: f32,
    pub stability_score: f32,
    /// The prompt point, in full-image pixels.
    pub point_coords: [f64; 2],
    /// The crop the mask came from, `[x0, y0, width, height]`.
    pub crop_box: [u32; 4],
}

/// A crop of the image: `xyxy` in pixels (`x1`, `y1` exclusive) and its layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub xyxy: [u32; 4],
    pub layer: usize,
}

/// `n * n` points evenly spaced in [0, 1]^2, offset by half a cell from the borders; x
/// varies fastest.
pub fn build_point_grid(n: usize) -> Vec<[f64; 2]> {
    let side = linspace_centered(n);
    let mut points = Vec::with_capacity(n * n);
    for &y in &side {
        for &x in &side {
            points.push([x, y]);
        }
    }
    points
}

/// numpy's `linspace(offset, 1 - offset, n)` with `offset = 1 / (2n)`.
fn linspace_centered(n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    let start = 1.0 / (2 * n) as f64;
    let stop = 1.0 - start;
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// The point grid of each crop layer: layer `i` has `int(n / factor^i)` points per side.
pub fn build_all_layer_point_grids(n: usize, n_layers: usize, factor: usize) -> Vec<Vec<[f64; 2]>> {
    (0..=n_layers).map(|i| build_point_grid(layer_points_per_side(n, factor, i))).collect()
}

/// The whole image (layer 0) and, for each extra layer `i` (1-based), `2^i x 2^i`
/// overlapping crops, enumerated x-major. Errors if a crop would be empty (an image too
/// small for that many crops).
pub fn generate_crop_boxes(
    height: u32,
    width: u32,
    n_layers: usize,
    overlap_ratio: f64,
) -> Result<Vec<CropBox>, AmgError> {
    let (im_h, im_w) = (height as i64, width as i64);
    let short_side = im_h.min(im_w);
    let mut boxes = vec![CropBox { xyxy: [0, 0, width, height], layer: 0 }];
    let crop_len =
        |orig: i64, n: i64, overlap: i64| -> i64 { ((overlap * (n - 1) + orig) as f64 / n as f64).ceil() as i64 };
    for i_layer in 0..n_layers {
        let n = 1i64 << (i_layer + 1);
        // Python: int(overlap_ratio * short_side * (2 / n_crops_per_side)), left to right.
        let overlap = (overlap_ratio * short_side as f64 * (2.0 / n as f64)) as i64;
        let crop_w = crop_len(im_w, n, overlap);
        let crop_h = crop_len(im_h, n, overlap);
        for ix in 0..n {
            let x0 = (crop_w - overlap) * ix;
            for iy in 0..n {
                let y0 = (crop_h - overlap) * iy;
                let (x1, y1) = ((x0 + crop_w).min(im_w), (y0 + crop_h).min(im_h));
                if x0 < 0 || y0 < 0 || x1 <= x0 || y1 <= y0 {
                    return Err(AmgError::Image(format!(
                        "a {width}x{height} image is too small for crop_n_layers = {n_layers}: \
                         crop [{x0}, {y0}, {x1}, {y1}] of layer {} is empty",
                        i_layer + 1
                    )));
                }
                boxes.push(CropBox { xyxy: [x0 as u32, y0 as u32, x1 as u32, y1 as u32], layer: i_layer + 1 });
            }
        }
    }
    Ok(boxes)
}

/// What one pass over a mask's logits yields.
struct Scan {
    /// Pixels `> mask_threshold + offset` (int16 row sums, int32 total, as SAM).
    intersection: i32,
    /// Pixels `> mask_threshold - offset`.
    union: i32,
    /// Inclusive box of the pixels `> mask_threshold`, in the mask's own coordinates.
    bbox: Option<[u32; 4]>,
}

/// The `f32` cutoffs used by a scan.
#[derive(Clone, Copy)]
struct Cutoffs {
    high: f32,
    low: f32,
    mask: f32,
}

impl Cutoffs {
    fn new(mask_threshold: f64, offset: f64) -> Self {
        Cutoffs {
            high: (mask_threshold + offset) as f32,
            low: (mask_threshold - offset) as f32,
            mask: mask_threshold as f32,
        }
    }
}

/// One pass over a `height x width` logit mask: stability counts, the binary mask written
/// to `out` (row `y` at `out[offset + y * stride..][..width]`) and its box.
fn scan_mask(
    logits: &[f32],
    height: usize,
    width: usize,
    cut: Cutoffs,
    out: &mut [u8],
    offset: usize,
    stride: usize,
) -> Scan {
    let mut s = ScanRows::default();
    s.rows(logits, 0..height, width, cut, out, offset, stride);
    s.finish()
}

/// [`scan_mask`] in row bands: the counts and box carried from band to band.
struct ScanRows {
    inter: i32,
    union: i32,
    top: usize,
    bottom: usize,
    left: usize,
    right: usize,
}

impl Default for ScanRows {
    fn default() -> Self {
        ScanRows { inter: 0, union: 0, top: usize::MAX, bottom: 0, left: usize::MAX, right: 0 }
    }
}

impl ScanRows {
    /// Rows `rows` of the mask (`logits` holds exactly them).
    #[allow(clippy::too_many_arguments)]
    fn rows(
        &mut self,
        logits: &[f32],
        rows: std::ops::Range<usize>,
        width: usize,
        cut: Cutoffs,
        out: &mut [u8],
        offset: usize,
        stride: usize,
    ) {
        let ScanRows { inter, union, top, bottom, left, right } = self;
        for (i, y) in rows.enumerate() {
            let row = &logits[i * width..(i + 1) * width];
            let dst = &mut out[offset + y * stride..offset + y * stride + width];
            let (mut hi, mut lo, mut fg) = (0u32, 0u32, 0u32);
            for (d, &v) in dst.iter_mut().zip(row) {
                hi += (v > cut.high) as u32;
                lo += (v > cut.low) as u32;
                let b = (v > cut.mask) as u8;
                fg += b as u32;
                *d = b;
            }
            // torch .sum(-1, dtype=int16): each row's count wraps to int16.
            *inter = inter.wrapping_add(hi as u16 as i16 as i32);
            *union = union.wrapping_add(lo as u16 as i16 as i32);
            if fg > 0 {
                if *top == usize::MAX {
                    *top = y;
                }
                *bottom = y;
                let first = dst.iter().position(|&b| b != 0).unwrap_or(0);
                let last = dst.iter().rposition(|&b| b != 0).unwrap_or(0);
                *left = (*left).min(first);
                *right = (*right).max(last);
            }
        }
    }

    fn finish(&self) -> Scan {
        let bbox = (self.top != usize::MAX).then_some([
            self.left as u32,
            self.top as u32,
            self.right as u32,
            self.bottom as u32,
        ]);
        Scan { intersection: self.inter, union: self.union, bbox }
    }
}

/// SAM's stability score of one `height x width` logit mask: the IoU of the masks
/// thresholded at `mask_threshold + offset` and `mask_threshold - offset`, i.e.
/// `count(> thr + offset) / count(> thr - offset)` (NaN when both are 0).
pub fn stability_score(logits: &[f32], height: usize, width: usize, mask_threshold: f64, offset: f64) -> f32 {
    assert_eq!(logits.len(), height * width, "stability_score: logits are not height x width");
    let mut scratch = vec![0u8; logits.len()];
    let s = scan_mask(logits, height, width, Cutoffs::new(mask_threshold, offset), &mut scratch, 0, width);
    s.intersection as f32 / s.union as f32
}

/// `x0, y0, x1, y1` (inclusive) of a mask's set pixels; `[0, 0, 0, 0]` for an empty mask.
pub fn mask_to_box(mask: &Mask) -> [u32; 4] {
    let (h, w) = (mask.height() as usize, mask.width() as usize);
    let data = mask.data();
    let (mut top, mut bottom, mut left, mut right) = (usize::MAX, 0, usize::MAX, 0);
    for y in 0..h {
        let row = &data[y * w..(y + 1) * w];
        if let Some(first) = row.iter().position(|&b| b != 0) {
            let last = row.iter().rposition(|&b| b != 0).unwrap_or(first);
            if top == usize::MAX {
                top = y;
            }
            bottom = y;
            left = left.min(first);
            right = right.max(last);
        }
    }
    if top == usize::MAX {
        [0; 4]
    } else {
        [left as u32, top as u32, right as u32, bottom as u32]
    }
}

/// Whether a box (`xyxy` in the crop's coordinates) lies within `atol` pixels of an edge
/// of `crop_box` that is not also (within `atol`) an edge of `orig_box` (both `xyxy` in
/// image pixels). Coordinate `k` of the uncropped box is compared with coordinate `k` of
/// each box.
pub fn is_box_near_crop_edge(box_xyxy: [u32; 4], crop_box: [u32; 4], orig_box: [u32; 4], atol: f64) -> bool {
    let (x0, y0) = (crop_box[0] as f64, crop_box[1] as f64);
    let b = [box_xyxy[0] as f64 + x0, box_xyxy[1] as f64 + y0, box_xyxy[2] as f64 + x0, box_xyxy[3] as f64 + y0];
    (0..4).any(|k| {
        let near_crop = (b[k] - crop_box[k] as f64).abs() <= atol;
        let near_image = (b[k] - orig_box[k] as f64).abs() <= atol;
        near_crop && !near_image
    })
}

/// Non-maximum suppression as torchvision's `nms` (CPU): returns the kept indices in
/// order of decreasing score. Boxes are `xyxy`; a box is dropped when its IoU with a kept,
/// higher-scored box is `> iou_threshold`. Equal scores keep input order; NaN scores come
/// first (torch's descending sort).
pub fn nms(boxes: &[[f32; 4]], scores: &[f32], iou_threshold: f64) -> Vec<usize> {
    assert_eq!(boxes.len(), scores.len(), "nms: one score per box");
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| {
        let (sa, sb) = (scores[a], scores[b]);
        match (sa.is_nan(), sb.is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Less,
            (false, true) => std::cmp::Ordering::Greater,
            (false, false) => sb.partial_cmp(&sa).unwrap_or(std::cmp::Ordering::Equal),
        }
    });
    let areas: Vec<f32> = boxes.iter().map(|b| (b[2] - b[0]) * (b[3] - b[1])).collect();
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for (oi, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let bi = boxes[i];
        for &j in &order[oi + 1..] {
            if suppressed[j] {
                continue;
            }
            let bj = boxes[j];
            let w = (bi[2].min(bj[2]) - bi[0].max(bj[0])).max(0.0);
            let h = (bi[3].min(bj[3]) - bi[1].max(bj[1])).max(0.0);
            let inter = w * h;
            let iou = inter / (areas[i] + areas[j] - inter);
            if iou as f64 > iou_threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// Which regions [`remove_small_regions`] removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionMode {
    /// Fill 8-connected background components smaller than the threshold (this includes
    /// the outer background if it is that small).
    Holes,
    /// Drop 8-connected foreground components smaller than the threshold; if all are, keep
    /// the largest.
    Islands,
}

/// SAM's `remove_small_regions`: returns the mask and whether it changed. Components are
/// 8-connected; "small" means fewer than `area_thresh` pixels.
pub fn remove_small_regions(mask: Mask, area_thresh: u64, mode: RegionMode) -> (Mask, bool) {
    let (h, w) = (mask.height() as usize, mask.width() as usize);
    let target = match mode {
        RegionMode::Holes => 0u8,
        RegionMode::Islands => 1u8,
    };
    let data = mask.data();
    // labels[p] = component number + 1 for pixels == target, 0 otherwise.
    let mut labels = vec![0u32; h * w];
    // Per component: size and OpenCV's label order key (first 2x2 block in block raster
    // order).
    let mut sizes: Vec<u64> = Vec::new();
    let mut keys: Vec<usize> = Vec::new();
    let block_w = w.div_ceil(2);
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for y0 in 0..h {
        for x0 in 0..w {
            let p0 = y0 * w + x0;
            if data[p0] != target || labels[p0] != 0 {
                continue;
            }
            let id = sizes.len() as u32 + 1;
            labels[p0] = id;
            stack.push((y0, x0));
            let (mut size, mut key) = (0u64, usize::MAX);
            while let Some((y, x)) = stack.pop() {
                size += 1;
                key = key.min((y / 2) * block_w + x / 2);
                for ny in y.saturating_sub(1)..(y + 2).min(h) {
                    for nx in x.saturating_sub(1)..(x + 2).min(w) {
                        let q = ny * w + nx;
                        if data[q] == target && labels[q] == 0 {
                            labels[q] = id;
                            stack.push((ny, nx));
                        }
                    }
                }
            }
            sizes.push(size);
            keys.push(key);
        }
    }
    let small: Vec<bool> = sizes.iter().map(|&s| s < area_thresh).collect();
    if !small.iter().any(|&s| s) {
        return (mask, false);
    }
    let out: Vec<u8> = match mode {
        RegionMode::Holes => {
            data.iter().zip(&labels).map(|(&v, &l)| (v != 0 || (l != 0 && small[l as usize - 1])) as u8).collect()
        }
        RegionMode::Islands => {
            let mut keep: Vec<bool> = small.iter().map(|&s| !s).collect();
            if !keep.iter().any(|&k| k) {
                // All too small: keep the largest (the first in OpenCV's label order).
                let best =
                    (0..sizes.len()).max_by(|&a, &b| sizes[a].cmp(&sizes[b]).then(keys[b].cmp(&keys[a]))).unwrap_or(0);
                keep[best] = true;
            }
            labels.iter().map(|&l| (l != 0 && keep[l as usize - 1]) as u8).collect()
        }
    };
    let (hh, ww) = (mask.height(), mask.width());
    let out = Mask::from_fn(hh, ww, |y, x| out[y as usize * w + x as usize] != 0);
    (out, true)
}

/// A mask kept so far (SAM's `MaskData` row), boxes `xyxy` inclusive.
struct Record {
    rle: Rle,
    bbox: [u32; 4],
    iou: f32,
    stability: f32,
    point: [f64; 2],
    crop: [u32; 4],
}

fn box_f32(b: &[u32; 4]) -> [f32; 4] {
    [b[0] as f32, b[1] as f32, b[2] as f32, b[3] as f32]
}

/// The records at `keep`, in that order.
fn select(records: Vec<Record>, keep: &[usize]) -> Vec<Record> {
    let mut slots: Vec<Option<Record>> = records.into_iter().map(Some).collect();
    keep.iter().filter_map(|&i| slots.get_mut(i).and_then(Option::take)).collect()
}

/// Generates masks for a whole image (SAM's `SamAutomaticMaskGenerator.generate`), in
/// SAM's output order. `progress(done, total)` counts prompt points over all crops.
pub fn generate(
    model: &mut dyn PromptModel,
    image: &RgbImage,
    cfg: &AmgConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<AmgMask>, AmgError> {
    let grids = cfg.layer_point_grids()?;
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(AmgError::Image(format!("empty {w}x{h} image")));
    }
    if w as u64 * h as u64 > u32::MAX as u64 {
        return Err(AmgError::Image(format!("a {w}x{h} image has more pixels than COCO RLE can describe")));
    }
    let crops = generate_crop_boxes(h, w, cfg.crop_n_layers, cfg.crop_overlap_ratio)?;
    let total: usize = crops.iter().map(|c| grids[c.layer].len()).sum();
    let mut done = 0usize;
    progress(0, total);
    let mut records = Vec::new();
    for crop in &crops {
        let mut tick = |n: usize| {
            done += n;
            progress(done, total);
        };
        records.extend(process_crop(model, image, *crop, &grids[crop.layer], cfg, &mut tick)?);
    }
    if crops.len() > 1 {
        // Prefer masks from smaller crops.
        let boxes: Vec<[f32; 4]> = records.iter().map(|r| box_f32(&r.bbox)).collect();
        let scores: Vec<f32> = records
            .iter()
            .map(|r| {
                let area = (r.crop[2] - r.crop[0]) as u64 * (r.crop[3] - r.crop[1]) as u64;
                1.0f32 / area as f32
            })
            .collect();
        let keep = nms(&boxes, &scores, cfg.crop_nms_thresh);
        records = select(records, &keep);
    }
    if cfg.min_mask_region_area > 0 {
        records =
            postprocess_small_regions(records, cfg.min_mask_region_area, cfg.box_nms_thresh.max(cfg.crop_nms_thresh))?;
    }
    Ok(records
        .into_iter()
        .map(|r| {
            let b = r.bbox;
            let c = r.crop;
            AmgMask {
                area: r.rle.area(),
                segmentation: r.rle,
                bbox: [b[0] as f64, b[1] as f64, (b[2] - b[0]) as f64, (b[3] - b[1]) as f64],
                predicted_iou: r.iou,
                stability_score: r.stability,
                point_coords: r.point,
                crop_box: [c[0], c[1], c[2] - c[0], c[3] - c[1]],
            }
        })
        .collect())
}

/// Checks a model answer for `n` points against the crop's size.
fn check_point_masks(out: &PointMasks, n: usize, height: usize, width: usize) -> Result<(), AmgError> {
    let bad = |msg: String| Err(AmgError::Model(msg));
    if out.height != height || out.width != width {
        return bad(format!("predict_points returned {}x{} masks for a {height}x{width} image", out.height, out.width));
    }
    if out.masks_per_point == 0 {
        return bad("predict_points returned 0 masks per point".into());
    }
    let masks = n.checked_mul(out.masks_per_point);
    let values = masks.and_then(|m| m.checked_mul(height * width));
    if masks != Some(out.iou.len()) || values != Some(out.logits.len()) {
        return bad(format!(
            "predict_points returned {} logits and {} IoUs for {n} points x {} masks of \
             {height}x{width}",
            out.logits.len(),
            out.iou.len(),
            out.masks_per_point
        ));
    }
    Ok(())
}

/// SAM's `_process_crop` + `_process_batch`: the masks of one crop after within-crop NMS,
/// boxes and points in full-image coordinates.
fn process_crop(
    model: &mut dyn PromptModel,
    image: &RgbImage,
    crop: CropBox,
    grid: &[[f64; 2]],
    cfg: &AmgConfig,
    tick: &mut dyn FnMut(usize),
) -> Result<Vec<Record>, AmgError> {
    let (im_w, im_h) = image.dimensions();
    let [x0, y0, x1, y1] = crop.xyxy;
    let (cw, ch) = (x1 - x0, y1 - y0);
    if [x0, y0, x1, y1] == [0, 0, im_w, im_h] {
        model.set_image(image)?;
    } else {
        let cropped = image::imageops::crop_imm(image, x0, y0, cw, ch).to_image();
        model.set_image(&cropped)?;
    }
    let points: Vec<[f64; 2]> = grid.iter().map(|p| [p[0] * cw as f64, p[1] * ch as f64]).collect();
    let cut = Cutoffs::new(cfg.mask_threshold, cfg.stability_score_offset);
    let iou_thresh = cfg.pred_iou_thresh as f32;
    let stab_thresh = cfg.stability_score_thresh as f32;
    let orig_box = [0, 0, im_w, im_h];
    let (ch_us, cw_us, im_w_us) = (ch as usize, cw as usize, im_w as usize);
    // The full-image binary mask; each mask rewrites the whole crop region, the rest stays 0.
    let mut full = Mask::zeros(im_h, im_w);
    let offset = y0 as usize * im_w_us + x0 as usize;
    let mut records = Vec::new();
    let budget = (cfg.mask_memory_mb.saturating_mul(1 << 20) / 4).max(1) as usize;
    let wanted = |iou: f32| cfg.pred_iou_thresh <= 0.0 || iou > iou_thresh; // NaN fails, as in torch
    for batch in points.chunks(cfg.points_per_batch) {
        // The mask being scanned and the next row it expects.
        let (mut current, mut next_row) = (usize::MAX, 0usize);
        let mut scan = ScanRows::default();
        let mut sink = |p: MaskRows<'_>| -> Result<(), AmgError> {
            let fresh = p.mask != current;
            if p.height != ch_us
                || p.width != cw_us
                || p.point >= batch.len()
                || p.rows.start >= p.rows.end
                || p.rows.end > ch_us
                || p.logits.len() != p.rows.len() * cw_us
                || p.rows.start != if fresh { 0 } else { next_row }
                || (fresh && current != usize::MAX && next_row != ch_us)
            {
                return Err(AmgError::Model(format!(
                    "predict_points_banded: piece rows {:?} of mask {} ({}x{}, {} values) out of order or \
                     not of the {ch_us}x{cw_us} image",
                    p.rows,
                    p.mask,
                    p.height,
                    p.width,
                    p.logits.len()
                )));
            }
            if fresh {
                (current, scan) = (p.mask, ScanRows::default());
            }
            next_row = p.rows.end;
            scan.rows(p.logits, p.rows.clone(), cw_us, cut, full.data_mut(), offset, im_w_us);
            if next_row < ch_us {
                return Ok(());
            }
            let done = scan.finish();
            let stability = done.intersection as f32 / done.union as f32;
            let stable = cfg.stability_score_thresh <= 0.0 || stability >= stab_thresh;
            if !stable {
                return Ok(());
            }
            let bbox = done.bbox.unwrap_or([0; 4]);
            if is_box_near_crop_edge(bbox, crop.xyxy, orig_box, 20.0) {
                return Ok(());
            }
            records.push(Record {
                rle: Rle::encode(&full),
                bbox,
                iou: p.iou,
                stability,
                point: batch[p.point],
                crop: crop.xyxy,
            });
            Ok(())
        };
        let out = model.predict_points_banded(batch, budget, &wanted, &mut sink)?;
        if current != usize::MAX && next_row != ch_us {
            return Err(AmgError::Model(format!(
                "predict_points_banded: mask {current} ended at row {next_row} of {ch_us}"
            )));
        }
        if out.height != ch_us
            || out.width != cw_us
            || out.masks_per_point == 0
            || out.iou.len() != batch.len() * out.masks_per_point
        {
            return Err(AmgError::Model(format!(
                "predict_points_banded returned {} IoUs of {}x{} masks ({} per point) for {} points of a {ch_us}x{cw_us} image",
                out.iou.len(),
                out.height,
                out.width,
                out.masks_per_point,
                batch.len()
            )));
        }
        tick(batch.len());
    }
    // Remove duplicates within this crop (boxes still in crop coordinates).
    let boxes: Vec<[f32; 4]> = records.iter().map(|r| box_f32(&r.bbox)).collect();
    let scores: Vec<f32> = records.iter().map(|r| r.iou).collect();
    let keep = nms(&boxes, &scores, cfg.box_nms_thresh);
    let mut records = select(records, &keep);
    for r in &mut records {
        r.bbox = [r.bbox[0] + x0, r.bbox[1] + y0, r.bbox[2] + x0, r.bbox[3] + y0];
        r.point = [r.point[0] + x0 as f64, r.point[1] + y0 as f64];
    }
    Ok(records)
}

/// SAM's `postprocess_small_regions`: fill small holes, drop small islands, then NMS with
/// score 1 for unchanged masks and 0 for changed ones (recomputed boxes); kept changed
/// masks get their new RLE and box.
fn postprocess_small_regions(
    mut records: Vec<Record>,
    min_area: u64,
    nms_thresh: f64,
) -> Result<Vec<Record>, AmgError> {
    if records.is_empty() {
        return Ok(records);
    }
    let mut boxes = Vec::with_capacity(records.len());
    let mut scores = Vec::with_capacity(records.len());
    let mut changed_rles: Vec<Option<Rle>> = Vec::with_capacity(records.len());
    for r in &records {
        let mask = r.rle.decode()?;
        let (mask, holes) = remove_small_regions(mask, min_area, RegionMode::Holes);
        let (mask, islands) = remove_small_regions(mask, min_area, RegionMode::Islands);
        let unchanged = !holes && !islands;
        boxes.push(mask_to_box(&mask));
        scores.push(if unchanged { 1.0f32 } else { 0.0 });
        changed_rles.push((!unchanged).then(|| Rle::encode(&mask)));
    }
    let boxes_f: Vec<[f32; 4]> = boxes.iter().map(box_f32).collect();
    let keep = nms(&boxes_f, &scores, nms_thresh);
    for &i in &keep {
        if let Some(rle) = changed_rles[i].take() {
            records[i].rle = rle;
            records[i].bbox = boxes[i];
        }
    }
    Ok(select(records, &keep))
}

//! PixelLM's image preprocessing for the CLIP tower: resize the longest side to `size`,
//! normalize with ImageNet mean/std in 0-255, zero-pad bottom/right to `size x size`.
//!
//! Which path feeds the tower: PixelLM runs with `pad_train_clip_images` /
//! `pad_val_clip_images` and `configs/preprocessor_448.json` (CLIP size 448), where the CLIP
//! input is `preprocess(ResizeLongestSide(448).apply_image(image))`, not `CLIPImageProcessor`
//! (MaverickRen/PixelLM commit c43c0aff64e0bf4ab65023667e58eb2329b54f7b: chat.py and
//! utils/multi_reason_seg_val_dataset.py). `ResizeLongestSide.apply_image` (SAM,
//! model/segment_anything/utils/transforms.py) is `np.array(resize(to_pil_image(image),
//! (newh, neww)))` with torchvision's default BILINEAR on a PIL image, i.e. Pillow's
//! `Image.resize(..., BILINEAR)`; the target shape rounds with `int(x * scale + 0.5)`.
//! `preprocess` then computes `(uint8 -> float32 - mean) / std` and pads with zeros (after
//! normalization, so padding is 0, not -mean/std).
//!
//! [`resize_pil`] ports Pillow's resampling (libImaging/Resample.c, unchanged in Pillow 12.0):
//! separable convolution whose support widens by the down-scaling factor (antialiasing),
//! coefficients in 22-bit fixed point, horizontal pass then vertical pass, each rounded and
//! clamped to u8. It reproduces Pillow's bytes exactly (tests/clip.rs checks this against
//! Pillow 12.0.0), so the whole preprocessing matches PixelLM's float32 tensor exactly.
//!
//! Decoding is the caller's: PixelLM reads images with OpenCV (`cv2.imread` + BGR->RGB); JPEG
//! decoders may differ from the `image` crate's by a few levels.

use burn::prelude::*;
use burn::tensor::TensorData;
use image::RgbImage;

/// ImageNet mean in 0-255 (`pixel_mean` of PixelLM/SAM).
pub const IMAGENET_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
/// ImageNet std in 0-255 (`pixel_std` of PixelLM/SAM).
pub const IMAGENET_STD: [f32; 3] = [58.395, 57.12, 57.375];

/// Largest accepted input, in pixels: Pillow's decompression-bomb error threshold
/// (`2 * Image.MAX_IMAGE_PIXELS` = 2 * 89,478,485), so anything Pillow (hence PixelLM) refuses
/// is refused here too.
pub const MAX_INPUT_PIXELS: u64 = 2 * 89_478_485;
/// Largest accepted output side: 8192^2 x 3 f32 is already 768 MiB per image.
pub const MAX_SIZE: usize = 8192;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreprocessError {
    #[error("image is empty ({width}x{height})")]
    Empty { width: u32, height: u32 },
    #[error(
        "image {width}x{height} has {} pixels, more than the {MAX_INPUT_PIXELS} accepted \
         (Pillow's decompression-bomb limit)",
        *width as u64 * *height as u64
    )]
    TooLarge { width: u32, height: u32 },
    #[error("output size {0} must be in 1..={MAX_SIZE}")]
    BadSize(usize),
    #[error(
        "image {width}x{height} is too elongated: resizing its longest side to {size} gives a \
         {new_w}x{new_h} image"
    )]
    Degenerate { width: u32, height: u32, size: usize, new_w: usize, new_h: usize },
    #[error("batch: {0}")]
    Batch(String),
}

/// Pillow resampling filters (`Image.BILINEAR`, `Image.BICUBIC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PilFilter {
    /// Triangle filter, support 1.
    Bilinear,
    /// Keys cubic with `a = -0.5`, support 2.
    Bicubic,
}

impl PilFilter {
    fn support(self) -> f64 {
        match self {
            PilFilter::Bilinear => 1.0,
            PilFilter::Bicubic => 2.0,
        }
    }
    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            PilFilter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            PilFilter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Pillow's `PRECISION_BITS` for 8-bit images: 32 - 8 - 2.
const PRECISION_BITS: u32 = 22;

/// One output sample's taps: first input index and fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` of Pillow's Resample.c for a full box
/// `[0, in_size)`.
fn coeffs(in_size: usize, out_size: usize, filter: PilFilter) -> Vec<Taps> {
    let scale = in_size as f32 as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncates toward zero; negatives are clamped to 0 right after.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin);
            let w: Vec<f64> = (0..n).map(|x| filter.eval((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            let one = (1u32 << PRECISION_BITS) as f64;
            let weights = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    if k < 0.0 {
                        (-0.5 + k * one) as i32
                    } else {
                        (0.5 + k * one) as i32
                    }
                })
                .collect();
            Taps { start: xmin, weights }
        })
        .collect()
}

/// Pillow's `clip8`: fixed-point sum -> u8 (arithmetic shift, then clamp).
fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `Image.resize((width, height), filter)` of Pillow for an RGB image, byte for byte (see the
/// module docs). An empty input or output size gives a black image of the requested size.
pub fn resize_pil(img: &RgbImage, width: u32, height: u32, filter: PilFilter) -> RgbImage {
    let (w0, h0) = img.dimensions();
    if (w0, h0) == (width, height) {
        return img.clone();
    }
    if width == 0 || height == 0 || w0 == 0 || h0 == 0 {
        // Nothing to sample (Pillow raises here); an all-black image of the requested size.
        return RgbImage::new(width, height);
    }
    let src = img.as_raw();
    let half = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (Pillow skips a pass whose size does not change).
    let (tmp, tw): (Vec<u8>, usize) = if w0 != width {
        let taps = coeffs(w0 as usize, width as usize, filter);
        let (w0, w1) = (w0 as usize, width as usize);
        let mut out = vec![0u8; h0 as usize * w1 * 3];
        for y in 0..h0 as usize {
            let row = &src[y * w0 * 3..(y + 1) * w0 * 3];
            for (x, t) in taps.iter().enumerate() {
                let mut acc = [half; 3];
                for (i, &k) in t.weights.iter().enumerate() {
                    let p = &row[(t.start + i) * 3..(t.start + i) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += p[c] as i64 * k as i64;
                    }
                }
                for c in 0..3 {
                    out[(y * w1 + x) * 3 + c] = clip8(acc[c]);
                }
            }
        }
        (out, w1)
    } else {
        (src.to_vec(), w0 as usize)
    };
    // Vertical pass.
    let out = if h0 != height {
        let taps = coeffs(h0 as usize, height as usize, filter);
        let mut out = vec![0u8; height as usize * tw * 3];
        for (y, t) in taps.iter().enumerate() {
            for x in 0..tw {
                let mut acc = [half; 3];
                for (i, &k) in t.weights.iter().enumerate() {
                    let p = &tmp[((t.start + i) * tw + x) * 3..((t.start + i) * tw + x) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += p[c] as i64 * k as i64;
                    }
                }
                for c in 0..3 {
                    out[(y * tw + x) * 3 + c] = clip8(acc[c]);
                }
            }
        }
        out
    } else {
        tmp
    };
    RgbImage::from_raw(width, height, out).expect("buffer sized width*height*3")
}

/// PixelLM's CLIP-input preprocessing parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessor {
    /// Output side (448 for PixelLM).
    pub size: usize,
    /// Per-channel mean in 0-255, RGB.
    pub mean: [f32; 3],
    /// Per-channel std in 0-255, RGB.
    pub std: [f32; 3],
}

/// One preprocessed image.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessed {
    /// `[3, size, size]` CHW, normalized; zero outside the top-left `resized_hw` region.
    pub pixels: Vec<f32>,
    /// `(h, w)` after the longest-side resize (PixelLM's `clip_resize`).
    pub resized_hw: (usize, usize),
    /// `(h, w)` of the input.
    pub original_hw: (usize, usize),
}

impl Preprocessed {
    /// Output side (`pixels` is `3 * side * side`).
    pub fn size(&self) -> usize {
        ((self.pixels.len() / 3) as f64).sqrt().round() as usize
    }
}

impl Preprocessor {
    /// PixelLM's settings: ImageNet mean/std in 0-255, output `size x size` (448 in PixelLM).
    pub fn pixellm(size: usize) -> Self {
        Self { size, mean: IMAGENET_MEAN, std: IMAGENET_STD }
    }

    /// SAM's `ResizeLongestSide.get_preprocess_shape`: `(int(h*s + 0.5), int(w*s + 0.5))`
    /// with `s = size / max(h, w)` in f64, as Python computes it.
    pub fn resized_hw(&self, height: usize, width: usize) -> (usize, usize) {
        let scale = self.size as f64 / height.max(width) as f64;
        let r = |v: usize| ((v as f64 * scale + 0.5) as usize).min(self.size);
        (r(height), r(width))
    }

    /// Check an input of `height x width` and return its resized `(h, w)`: errors on empty,
    /// gigantic (> [`MAX_INPUT_PIXELS`]) or degenerate (a side rounds to 0) inputs and on a
    /// `size` outside `1..=MAX_SIZE`.
    pub fn plan(&self, height: usize, width: usize) -> Result<(usize, usize), PreprocessError> {
        let (w32, h32) = (u32::try_from(width).unwrap_or(u32::MAX), u32::try_from(height).unwrap_or(u32::MAX));
        if width == 0 || height == 0 {
            return Err(PreprocessError::Empty { width: w32, height: h32 });
        }
        if width as u64 * height as u64 > MAX_INPUT_PIXELS {
            return Err(PreprocessError::TooLarge { width: w32, height: h32 });
        }
        if self.size == 0 || self.size > MAX_SIZE {
            return Err(PreprocessError::BadSize(self.size));
        }
        let (nh, nw) = self.resized_hw(height, width);
        if nh == 0 || nw == 0 {
            return Err(PreprocessError::Degenerate { width: w32, height: h32, size: self.size, new_w: nw, new_h: nh });
        }
        Ok((nh, nw))
    }

    /// Resize (Pillow bilinear), normalize, pad. Errors (never panics) as [`plan`](Self::plan).
    pub fn apply(&self, img: &RgbImage) -> Result<Preprocessed, PreprocessError> {
        let (width, height) = img.dimensions();
        let (nh, nw) = self.plan(height as usize, width as usize)?;
        let resized = resize_pil(img, nw as u32, nh as u32, PilFilter::Bilinear);
        let s = self.size;
        let mut pixels = vec![0f32; 3 * s * s];
        for (x, y, p) in resized.enumerate_pixels() {
            let (x, y) = (x as usize, y as usize);
            for c in 0..3 {
                pixels[c * s * s + y * s + x] = (p[c] as f32 - self.mean[c]) / self.std[c];
            }
        }
        Ok(Preprocessed { pixels, resized_hw: (nh, nw), original_hw: (height as usize, width as usize) })
    }
}

/// Stack preprocessed images into `[batch, 3, size, size]`. All must share one size.
pub fn to_tensor<B: Backend>(batch: &[Preprocessed], device: &B::Device) -> Result<Tensor<B, 4>, PreprocessError> {
    let Some(first) = batch.first() else {
        return Err(PreprocessError::Batch("no images".into()));
    };
    let s = first.size();
    let n = 3 * s * s;
    let mut data = Vec::with_capacity(batch.len() * n);
    for (i, p) in batch.iter().enumerate() {
        if p.pixels.len() != n {
            return Err(PreprocessError::Batch(format!(
                "image {i} has {} values, image 0 is 3x{s}x{s} = {n}",
                p.pixels.len()
            )));
        }
        data.extend_from_slice(&p.pixels);
    }
    Ok(Tensor::from_data(TensorData::new(data, [batch.len(), 3, s, s]), device))
}

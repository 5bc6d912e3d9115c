//! Image bytes in and out. Shards keep images as the PNG/JPEG bytes the source had, so a
//! decode failure is reported with the record it came from.
//!
//! Every decode checks [`ImageLimits`] on the dimensions in the file's HEADER before any
//! pixel is decoded, so a decompression bomb (a 100000x100000 PNG of a few KB) or a
//! degenerate strip (100000x1, which SAM's and CLIP's resize turn into a 0-pixel side) is an
//! error naming the image, never an allocation of gigabytes or a panic further down.

use std::io::Cursor;

use crate::error::{CoreError, Result};
use image::{ImageFormat, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

/// Per-image limits checked from the header before decoding.
///
/// Defaults: `max_pixels` = 64 MP (64 * 2^20 = 67,108,864): above a 48 MP phone sensor
/// (8000x6000) and 8K video (33 MP); the decoded RGB is then at most 192 MiB and one f32
/// mask at the original size 256 MiB. `max_aspect` = 20: SAM resizes the long side to 1024
/// (PixelLM's tiny presets to 128-224), so at 20:1 the short side keeps >= 51 px at 1024
/// (>= 11 px at 224), while a 100000x1 image rounds to 0 rows. Both are per record; a stage
/// skips a record that breaks them and lists why.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageLimits {
    /// Most pixels (width * height) an image may have.
    pub max_pixels: u64,
    /// Largest long side / short side ratio.
    pub max_aspect: f64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self { max_pixels: 64 << 20, max_aspect: 20.0 }
    }
}

impl ImageLimits {
    /// No limits (what the decoder itself allows).
    pub const NONE: ImageLimits = ImageLimits { max_pixels: u64::MAX, max_aspect: f64::INFINITY };

    /// Why a `width x height` image breaks the limits (`None`: it does not). Empty images
    /// break them too.
    pub fn violation(&self, width: u32, height: u32) -> Option<String> {
        if width == 0 || height == 0 {
            return Some(format!("image {width}x{height}: empty"));
        }
        let pixels = width as u64 * height as u64;
        if pixels > self.max_pixels {
            return Some(format!("image {width}x{height}: {pixels} pixels > max_pixels {}", self.max_pixels));
        }
        let aspect = width.max(height) as f64 / width.min(height) as f64;
        if aspect > self.max_aspect {
            return Some(format!("image {width}x{height}: aspect {aspect} > max_aspect {}", self.max_aspect));
        }
        None
    }

    /// An error for nonsensical limits (a config check).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.max_pixels == 0 || !(self.max_aspect >= 1.0) {
            return Err(format!(
                "image limits: max_pixels {} must be > 0 and max_aspect {} >= 1",
                self.max_pixels, self.max_aspect
            ));
        }
        Ok(())
    }
}

/// The container format of encoded image bytes, from their magic number.
pub fn sniff_format(bytes: &[u8]) -> Option<ImageFormat> {
    if bytes.starts_with(&[0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a]) {
        Some(ImageFormat::Png)
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some(ImageFormat::Jpeg)
    } else {
        None
    }
}

fn image_err(context: Option<&str>, message: String) -> CoreError {
    CoreError::Image { context: context.map(str::to_string), message }
}

fn reader<'a>(bytes: &'a [u8], context: Option<&str>) -> Result<(ImageReader<Cursor<&'a [u8]>>, ImageFormat)> {
    let format = sniff_format(bytes).ok_or_else(|| {
        image_err(
            context,
            format!(
                "{} bytes that are neither PNG nor JPEG (starts with {:02x?})",
                bytes.len(),
                &bytes[..bytes.len().min(4)]
            ),
        )
    })?;
    let mut r = ImageReader::new(Cursor::new(bytes));
    r.set_format(format);
    Ok((r, format))
}

/// Width and height from the image header alone (no pixel is decoded).
pub fn dimensions(bytes: &[u8], context: Option<&str>) -> Result<(u32, u32)> {
    let (r, format) = reader(bytes, context)?;
    r.into_dimensions().map_err(|e| image_err(context, format!("corrupt {format:?} data: {e}")))
}

/// Decodes PNG or JPEG bytes to RGB under the default [`ImageLimits`]. `context` names the
/// record in errors.
pub fn decode_rgb(bytes: &[u8], context: Option<&str>) -> Result<RgbImage> {
    decode_rgb_limited(bytes, context, &ImageLimits::default())
}

/// Decodes PNG or JPEG bytes to RGB after checking the header's size against `limits`.
pub fn decode_rgb_limited(bytes: &[u8], context: Option<&str>, limits: &ImageLimits) -> Result<RgbImage> {
    let (w, h) = dimensions(bytes, context)?;
    if let Some(why) = limits.violation(w, h) {
        return Err(image_err(context, why));
    }
    let (mut r, format) = reader(bytes, context)?;
    // The decoder's own allocation cap, sized for the largest image the limits allow
    // (16-bit RGBA = 8 bytes per pixel) and never below the image crate's 512 MiB default.
    let mut lim = image::Limits::default();
    lim.max_alloc = Some((w as u64 * h as u64).saturating_mul(8).max(512 << 20));
    r.limits(lim);
    let img = r.decode().map_err(|e| image_err(context, format!("corrupt {format:?} data: {e}")))?;
    Ok(img.to_rgb8())
}

/// Encodes RGB as PNG (deterministic: same pixels, same bytes).
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8)
        .map_err(|e| CoreError::Image { context: None, message: format!("PNG encoding failed: {e}") })?;
    Ok(out)
}

use image::ImageEncoder;

/// A `width x height` grayscale PNG of one `value`, encoded row by row (one row in memory):
/// a few hundred KB even for 10000x10000. For tests of [`ImageLimits`] (a decompression
/// bomb) and anything else that needs a huge image cheaply.
pub fn uniform_png(width: u32, height: u32, value: u8) -> Result<Vec<u8>> {
    let err = |e: String| CoreError::Image { context: None, message: format!("PNG encoding failed: {e}") };
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width, height);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_filter(png::Filter::NoFilter);
    enc.set_compression(png::Compression::Fast);
    let mut w = enc.write_header().map_err(|e| err(e.to_string()))?;
    {
        let mut s = w.stream_writer().map_err(|e| err(e.to_string()))?;
        let row = vec![value; width as usize];
        for _ in 0..height {
            std::io::Write::write_all(&mut s, &row).map_err(|e| err(e.to_string()))?;
        }
        s.finish().map_err(|e| err(e.to_string()))?;
    }
    w.finish().map_err(|e| err(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_roundtrip_and_errors() {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let png = encode_png(&img).unwrap();
        assert_eq!(sniff_format(&png), Some(ImageFormat::Png));
        assert_eq!(decode_rgb(&png, None).unwrap(), img);
        let e = decode_rgb(b"hello", Some("record 'x'")).unwrap_err().to_string();
        assert!(e.contains("record 'x'") && e.contains("neither PNG nor JPEG"), "{e}");
        let e = decode_rgb(&png[..png.len() / 2], Some("record 'y'")).unwrap_err().to_string();
        assert!(e.contains("record 'y'") && e.contains("corrupt"), "{e}");
    }

    /// Issue 20 item 4: limits are checked from the header, before any pixel is decoded.
    /// Reference: the old `decode_rgb` decoded both images below (the 100000x1 strip then
    /// panicked SAM's resize; the 10000x10000 one took 300 MB of RGB and GBs of masks).
    #[test]
    fn limits_reject_strips_and_bombs_from_the_header() {
        let strip = uniform_png(100_000, 1, 9).unwrap();
        let e = decode_rgb(&strip, Some("sample 'strip'")).unwrap_err().to_string();
        assert!(e.contains("sample 'strip'") && e.contains("image 100000x1: aspect 100000 > max_aspect 20"), "{e}");
        // A 10000x10000 uniform PNG is ~100 KB compressed, 100 MP decoded.
        let bomb = uniform_png(10_000, 10_000, 0).unwrap();
        assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
        assert_eq!(dimensions(&bomb, None).unwrap(), (10_000, 10_000));
        let t = std::time::Instant::now();
        let e = decode_rgb(&bomb, Some("sample 'bomb'")).unwrap_err().to_string();
        assert!(e.contains("image 10000x10000: 100000000 pixels > max_pixels 67108864"), "{e}");
        assert!(t.elapsed().as_secs_f64() < 1.0, "the header check must not decode the pixels");
        // Inside the limits: decoded; explicit looser limits let the strip through.
        let ok = uniform_png(40, 2, 3).unwrap();
        assert_eq!(decode_rgb(&ok, None).unwrap().dimensions(), (40, 2));
        let e = decode_rgb(&uniform_png(41, 2, 3).unwrap(), None).unwrap_err().to_string();
        assert!(e.contains("aspect 20.5 > max_aspect 20"), "{e}");
        let img = decode_rgb_limited(&strip, None, &ImageLimits::NONE).unwrap();
        assert_eq!(img.dimensions(), (100_000, 1));
        assert!(ImageLimits { max_aspect: 0.5, ..Default::default() }.validate().is_err());
        // Serde: every field optional (existing configs parse), unknown fields refused.
        let l: ImageLimits = serde_json::from_str(r#"{"max_aspect": 50}"#).unwrap();
        assert_eq!(l, ImageLimits { max_aspect: 50.0, ..Default::default() });
        assert!(serde_json::from_str::<ImageLimits>(r#"{"max_pixel": 5}"#).is_err());
    }
}

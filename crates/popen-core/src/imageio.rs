//! Image bytes in and out. Shards keep images as the PNG/JPEG bytes the source had, so a
//! decode failure is reported with the record it came from.

use crate::error::{CoreError, Result};
use image::{ImageFormat, RgbImage};

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

/// Decodes PNG or JPEG bytes to RGB. `context` names the record in errors.
pub fn decode_rgb(bytes: &[u8], context: Option<&str>) -> Result<RgbImage> {
    let err = |message: String| CoreError::Image { context: context.map(str::to_string), message };
    let format = sniff_format(bytes).ok_or_else(|| {
        err(format!(
            "{} bytes that are neither PNG nor JPEG (starts with {:02x?})",
            bytes.len(),
            &bytes[..bytes.len().min(4)]
        ))
    })?;
    let img = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| err(format!("corrupt {format:?} data: {e}")))?;
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
}

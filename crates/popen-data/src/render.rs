//! Overlay rendering: a sample's image upscaled, its target masks as translucent colours
//! with outlines, the other instances outlined in grey, and the instruction and answer
//! below (8x8 bitmap font; each `<seg>` drawn as a swatch in its target's colour).

use font8x8::{UnicodeFonts, BASIC_FONTS};
use image::{Rgb, RgbImage};
use popen_core::mask::Mask;
use popen_core::shard::{Sample, SEG_TOKEN};
use popen_core::{CoreError, Result};

/// Distinct overlay colours; target i gets `PALETTE[i % len]`.
pub const PALETTE: &[[u8; 3]] = &[
    [230, 25, 75],
    [0, 130, 200],
    [255, 225, 25],
    [60, 180, 75],
    [145, 30, 180],
    [245, 130, 48],
    [70, 240, 240],
    [240, 50, 230],
    [170, 110, 40],
    [0, 128, 128],
];

/// Overlay colour of target i.
pub fn palette(i: usize) -> [u8; 3] {
    PALETTE[i % PALETTE.len()]
}

const FILL_ALPHA: f32 = 0.4;
const GREY: [u8; 3] = [170, 170, 170];
const LARGEST_SCALE: u32 = 64;

/// The image upscaled by `scale` (nearest neighbour) with each mask blended in its colour
/// (40% opacity) and outlined (1 px, full colour). Masks must have the image's size.
pub fn overlay_masks(img: &RgbImage, masks: &[(Mask, [u8; 3])], scale: u32) -> Result<RgbImage> {
    if scale == 0 || scale > LARGEST_SCALE {
        return Err(CoreError::Invalid(format!("overlay scale {scale} must be within 1..={LARGEST_SCALE}")));
    }
    for (i, (m, _)) in masks.iter().enumerate() {
        if m.width() != img.width() || m.height() != img.height() {
            return Err(CoreError::Invalid(format!(
                "mask {i} is {}x{} (h x w) but the image is {}x{}",
                m.height(),
                m.width(),
                img.height(),
                img.width()
            )));
        }
    }
    let mut out = upscale(img, scale);
    for (m, c) in masks {
        draw_mask(&mut out, m, scale, Some(*c), *c);
    }
    Ok(out)
}

fn upscale(img: &RgbImage, scale: u32) -> RgbImage {
    RgbImage::from_fn(img.width() * scale, img.height() * scale, |x, y| *img.get_pixel(x / scale, y / scale))
}

/// Blends `fill` over the mask and draws its 1-px outline (on the upscaled grid).
fn draw_mask(out: &mut RgbImage, m: &Mask, scale: u32, fill: Option<[u8; 3]>, outline: [u8; 3]) {
    let (w, h) = (out.width() as i64, out.height() as i64);
    let on = |x: i64, y: i64| {
        x >= 0 && y >= 0 && x < w && y < h && m.get((y / scale as i64) as u32, (x / scale as i64) as u32)
    };
    for y in 0..h {
        for x in 0..w {
            if !on(x, y) {
                continue;
            }
            let edge = !on(x - 1, y) || !on(x + 1, y) || !on(x, y - 1) || !on(x, y + 1);
            let p = out.get_pixel_mut(x as u32, y as u32);
            if edge {
                p.0 = outline;
            } else if let Some(c) = fill {
                for (v, &cc) in p.0.iter_mut().zip(c.iter()) {
                    *v = (*v as f32 * (1.0 - FILL_ALPHA) + cc as f32 * FILL_ALPHA).round() as u8;
                }
            }
        }
    }
}

/// Widest picture [`overlay`] draws (both copies side by side).
pub const MAX_SIDE: u32 = 8192;

/// Renders a sample for inspection: the image upscaled by `scale` twice side by side (plain
/// on the left; on the right target i's mask in [`palette`]`(i)` and the other instances
/// outlined in grey), and below them the id, the target names, the
/// instruction and the answer, each `<seg>` shown as a swatch of its target's colour.
/// Errors (undecodable image, corrupt mask, mask of the wrong size) name the sample.
pub fn overlay(sample: &Sample, scale: u32) -> Result<RgbImage> {
    let ctx = |e: CoreError| CoreError::Invalid(format!("sample '{}': {e}", sample.id));
    let img = sample.decode_image()?;
    // Large photos get a smaller factor so the picture stays under MAX_SIDE pixels wide.
    let fit = (MAX_SIDE / (2 * img.width().max(img.height()).max(1))).max(1);
    if scale > fit {
        tracing::warn!(
            "sample '{}': scale {scale} lowered to {fit} to keep the picture under {MAX_SIDE} px",
            sample.id
        );
    }
    let scale = scale.min(fit);
    let decode = |field: &str, i: usize, r: &popen_core::mask::Rle| -> Result<Mask> {
        let m = r.decode().map_err(|e| CoreError::Invalid(format!("sample '{}': {field} {i}: {e}", sample.id)))?;
        if m.width() != img.width() || m.height() != img.height() {
            return Err(CoreError::Invalid(format!(
                "sample '{}': {field} {i} is {}x{} (h x w) but the image is {}x{}",
                sample.id,
                m.height(),
                m.width(),
                img.height(),
                img.width()
            )));
        }
        Ok(m)
    };
    let mut targets = Vec::with_capacity(sample.target_masks.len());
    for (i, r) in sample.target_masks.iter().enumerate() {
        targets.push((decode("target mask", i, r)?, palette(i)));
    }
    let mut others = Vec::new();
    for (i, r) in sample.instance_masks.iter().enumerate() {
        if !sample.target_instances.contains(&(i as i32)) {
            others.push(decode("instance mask", i, r)?);
        }
    }
    let mut over = overlay_masks(&img, &targets, scale).map_err(ctx)?;
    for m in &others {
        draw_mask(&mut over, m, scale, None, GREY);
    }
    // the plain image on the left, the overlay on the right
    let gap = 4;
    let mut pic = RgbImage::from_pixel(over.width() * 2 + gap, over.height(), Rgb([255, 255, 255]));
    image::imageops::replace(&mut pic, &upscale(&img, scale), 0, 0);
    image::imageops::replace(&mut pic, &over, (over.width() + gap) as i64, 0);

    // text panel
    let width = pic.width().max(320);
    let cols = ((width - 8) / 8) as usize;
    let mut lines: Vec<Vec<Cell>> = Vec::new();
    let names = if sample.target_names.is_empty() { "-".to_string() } else { sample.target_names.join(", ") };
    lines.extend(wrap(&cells(&format!("{} ({})", sample.id, names)), cols));
    lines.extend(wrap(&cells(&format!("Q: {}", sample.instruction)), cols));
    lines.extend(wrap(&cells(&format!("A: {}", sample.answer)), cols));
    let text_h = lines.len() as u32 * 10 + 8;
    let mut canvas = RgbImage::from_pixel(width, pic.height() + text_h, Rgb([255, 255, 255]));
    let x_off = (width - pic.width()) / 2;
    image::imageops::replace(&mut canvas, &pic, x_off as i64, 0);
    let mut y = pic.height() + 5;
    for line in &lines {
        let mut x = 4;
        for c in line {
            match *c {
                Cell::Char(ch) => draw_glyph(&mut canvas, x, y, ch, [0, 0, 0]),
                Cell::Swatch(i) => draw_swatch(&mut canvas, x, y, palette(i)),
            }
            x += 8;
        }
        y += 10;
    }
    Ok(canvas)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Cell {
    Char(char),
    Swatch(usize),
}

/// Text as glyph cells; each `<seg>` becomes a swatch of the next target's colour.
fn cells(text: &str) -> Vec<Cell> {
    let mut out = Vec::new();
    for (i, piece) in text.split(SEG_TOKEN).enumerate() {
        if i > 0 {
            out.push(Cell::Swatch(i - 1));
        }
        out.extend(piece.chars().map(|c| Cell::Char(if c.is_ascii() && !c.is_ascii_control() { c } else { '?' })));
    }
    out
}

/// Greedy word wrap at `cols` cells; over-long words are split.
fn wrap(text: &[Cell], cols: usize) -> Vec<Vec<Cell>> {
    let mut lines = Vec::new();
    let mut line: Vec<Cell> = Vec::new();
    for word in text.split(|c| *c == Cell::Char(' ')).filter(|w| !w.is_empty()) {
        let need = if line.is_empty() { word.len() } else { line.len() + 1 + word.len() };
        if need > cols && !line.is_empty() {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(Cell::Char(' '));
        }
        for &c in word {
            if line.len() == cols {
                lines.push(std::mem::take(&mut line));
            }
            line.push(c);
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

fn draw_glyph(img: &mut RgbImage, x: u32, y: u32, ch: char, col: [u8; 3]) {
    let Some(rows) = BASIC_FONTS.get(ch) else { return };
    for (r, bits) in rows.iter().enumerate() {
        for b in 0..8 {
            if bits & (1 << b) != 0 {
                let (px, py) = (x + b, y + r as u32);
                if px < img.width() && py < img.height() {
                    img.put_pixel(px, py, Rgb(col));
                }
            }
        }
    }
}

fn draw_swatch(img: &mut RgbImage, x: u32, y: u32, col: [u8; 3]) {
    for dy in 0..8 {
        for dx in 0..8 {
            let (px, py) = (x + dx, y + dy);
            if px < img.width() && py < img.height() {
                let border = dx == 0 || dy == 0 || dx == 7 || dy == 7;
                img.put_pixel(px, py, Rgb(if border { [0, 0, 0] } else { col }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_splits_words_and_keeps_swatches() {
        let c = cells("The red ball <seg> and a very-long-word-here.");
        assert!(c.contains(&Cell::Swatch(0)));
        let lines = wrap(&c, 10);
        assert!(lines.iter().all(|l| l.len() <= 10));
        let flat: usize = lines.iter().map(|l| l.iter().filter(|c| **c != Cell::Char(' ')).count()).sum();
        assert_eq!(flat, c.iter().filter(|c| **c != Cell::Char(' ')).count());
    }

    #[test]
    fn overlay_masks_checks_sizes_and_scale() {
        let img = RgbImage::from_pixel(4, 3, Rgb([10, 10, 10]));
        let m = Mask::from_fn(3, 4, |y, x| y == 1 && x >= 1);
        let out = overlay_masks(&img, &[(m.clone(), [255, 0, 0])], 3).unwrap();
        assert_eq!(out.dimensions(), (12, 9));
        assert_eq!(out.get_pixel(4, 3).0, [255, 0, 0]); // outline
        assert!(overlay_masks(&img, &[(Mask::zeros(4, 4), [1, 2, 3])], 2).is_err());
        assert!(overlay_masks(&img, &[], 0).is_err());
    }
}

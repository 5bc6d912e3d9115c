//! Category outlines in an object's local frame: `u` to the right, `v` down, the object
//! roughly inside [-1, 1]^2. [`part`] tells which part of the object a local point is on
//! (0 = outside), so the renderer can colour stems, pips, labels and so on.

// Explicit comparisons read better than range objects in geometry code.
#![allow(clippy::manual_range_contains)]

use super::lexicon::Shape;

/// Outside the object.
pub(crate) const OUT: u8 = 0;
/// Main body, in the object's colour.
pub(crate) const BODY: u8 = 1;
/// Secondary part in the category's fixed secondary colour (stems, caps, metal).
pub(crate) const SECOND: u8 = 2;
/// Darker body detail (spines, grooves, shadows of folds).
pub(crate) const DARK: u8 = 3;
/// Lighter body detail (stripes, labels, highlights).
pub(crate) const LIGHT: u8 = 4;
/// Near-black detail (eyes, pips on light dice).
pub(crate) const BLACK: u8 = 5;
/// Near-white detail (pages, spots, pompoms, pips on dark dice).
pub(crate) const WHITE: u8 = 6;

#[inline]
fn circ(u: f32, v: f32, cx: f32, cy: f32, r: f32) -> bool {
    let (a, b) = (u - cx, v - cy);
    a * a + b * b <= r * r
}

#[inline]
fn ell(u: f32, v: f32, cx: f32, cy: f32, a: f32, b: f32) -> bool {
    let (x, y) = ((u - cx) / a, (v - cy) / b);
    x * x + y * y <= 1.0
}

#[inline]
fn rect(u: f32, v: f32, x0: f32, x1: f32, y0: f32, y1: f32) -> bool {
    u >= x0 && u <= x1 && v >= y0 && v <= y1
}

/// Per-object shape parameters beyond the category.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ShapeParams {
    /// Dice face (1..=6).
    pub face: u8,
    /// Dice pips are white (on a dark body) instead of black.
    pub light_detail: bool,
}

/// Which part of the shape the local point (u, v) is on.
pub(crate) fn part(shape: Shape, u: f32, v: f32, p: &ShapeParams) -> u8 {
    let r2 = u * u + v * v;
    match shape {
        Shape::Ball => {
            if r2 > 1.0 {
                OUT
            } else if (v - 0.3 * u).abs() < 0.16 {
                LIGHT
            } else if circ(u, v, -0.38, -0.42, 0.16) {
                WHITE
            } else {
                BODY
            }
        }
        Shape::Peach => {
            // leaf on top, tilted
            let (lu, lv) = (u - 0.32, v + 0.9);
            let (ru, rv) = (lu * 0.87 + lv * 0.5, -lu * 0.5 + lv * 0.87);
            if ell(ru, rv, 0.0, 0.0, 0.3, 0.12) {
                SECOND
            } else if !circ(u, v, 0.0, 0.08, 0.9) {
                OUT
            } else if (u - 0.18 * (v + 0.8) * (v + 0.8) + 0.05).abs() < 0.05 && v < 0.25 {
                DARK
            } else {
                BODY
            }
        }
        Shape::Apple => {
            let su = u - 0.25 * (v + 0.6);
            if rect(su, v, -0.06, 0.06, -1.05, -0.55) {
                SECOND
            } else if (circ(u, v, -0.36, -0.1, 0.66) || circ(u, v, 0.36, -0.1, 0.66) || circ(u, v, 0.0, 0.22, 0.74))
                && !circ(u, v, 0.0, -0.9, 0.24)
            {
                if ell(u, v, -0.4, -0.3, 0.13, 0.2) {
                    LIGHT
                } else {
                    BODY
                }
            } else {
                OUT
            }
        }
        Shape::Pear => {
            let su = u - 0.2 * (v + 0.65);
            if rect(su, v, -0.05, 0.05, -1.0, -0.6) {
                SECOND
            } else if circ(u, v, 0.0, 0.38, 0.6)
                || circ(u, v, 0.0, -0.35, 0.36)
                || (v >= -0.35 && v <= 0.38 && u.abs() <= 0.36 + (v + 0.35) / 0.73 * 0.24)
            {
                if ell(u, v, -0.28, 0.2, 0.1, 0.18) {
                    LIGHT
                } else {
                    BODY
                }
            } else {
                OUT
            }
        }
        Shape::Lemon => {
            let x = (u / 0.98).abs();
            let y = v / 0.66;
            if x.powf(1.45) + y * y <= 1.0 || (v.abs() < 0.08 && u.abs() < 1.0) {
                if ell(u, v, -0.25, -0.3, 0.25, 0.1) {
                    LIGHT
                } else {
                    BODY
                }
            } else {
                OUT
            }
        }
        Shape::Egg => {
            let a = 0.66 * (1.0 + 0.16 * v);
            let (x, y) = (u / a, v / 0.95);
            if x * x + y * y <= 1.0 {
                if ell(u, v, -0.22, -0.4, 0.12, 0.2) {
                    LIGHT
                } else {
                    BODY
                }
            } else {
                OUT
            }
        }
        Shape::Banana => {
            let (du, dv) = (u, v + 0.05 + 1.35);
            let d = (du * du + dv * dv).sqrt();
            let phi = du.atan2(dv);
            let pm = 0.74;
            if phi.abs() > pm {
                return OUT;
            }
            let t = phi / pm;
            let hw = 0.27 * (1.0 - t * t).max(0.0).sqrt().max(0.3);
            if (d - 1.5).abs() > hw {
                OUT
            } else if t.abs() > 0.9 {
                SECOND
            } else if d - 1.5 < -hw * 0.55 {
                LIGHT
            } else {
                BODY
            }
        }
        Shape::Moon => {
            if circ(u, v, 0.0, 0.0, 0.95) && !circ(u, v, 0.42, -0.2, 0.78) {
                BODY
            } else {
                OUT
            }
        }
        Shape::Box => {
            // front face, top face (lighter), right side face (darker)
            if rect(u, v, -0.85, 0.55, -0.4, 0.85) {
                if u.abs() < 0.06 + 0.0 * v && v < 0.1 {
                    LIGHT
                } else {
                    BODY
                }
            } else if v < -0.4 && v >= -0.8 {
                let d = -0.4 - v;
                if u >= -0.85 + d && u <= 0.55 + d {
                    LIGHT
                } else {
                    OUT
                }
            } else if u > 0.55 && u <= 0.95 {
                let d = u - 0.55;
                if v >= -0.4 - d && v <= 0.85 - d {
                    DARK
                } else {
                    OUT
                }
            } else {
                OUT
            }
        }
        Shape::Book => {
            if !rect(u, v, -0.62, 0.62, -0.88, 0.88) {
                OUT
            } else if u < -0.47 {
                DARK
            } else if u > 0.5 && v.abs() < 0.8 {
                WHITE
            } else if rect(u, v, -0.25, 0.3, -0.55, -0.3) {
                LIGHT
            } else {
                BODY
            }
        }
        Shape::Dice => {
            let qx = (u.abs() - 0.56).max(0.0);
            let qy = (v.abs() - 0.56).max(0.0);
            if u.abs() > 0.8 || v.abs() > 0.8 || qx * qx + qy * qy > 0.24 * 0.24 {
                return OUT;
            }
            let d = 0.42;
            let pip = |x: f32, y: f32| circ(u, v, x, y, 0.13);
            let corners_a = pip(-d, -d) || pip(d, d);
            let corners_b = pip(d, -d) || pip(-d, d);
            let centre = pip(0.0, 0.0);
            let middles = pip(-d, 0.0) || pip(d, 0.0);
            let hit = match p.face {
                1 => centre,
                2 => corners_a,
                3 => corners_a || centre,
                4 => corners_a || corners_b,
                5 => corners_a || corners_b || centre,
                _ => corners_a || corners_b || middles,
            };
            if hit {
                if p.light_detail {
                    WHITE
                } else {
                    BLACK
                }
            } else if v < -0.62 {
                LIGHT
            } else {
                BODY
            }
        }
        Shape::Ring => {
            if circ(u, v, 0.0, -0.86, 0.22) {
                SECOND
            } else if r2 <= 0.92 * 0.92 && r2 >= 0.56 * 0.56 {
                if v < 0.0 && r2 > 0.8 * 0.8 && u < 0.0 {
                    LIGHT
                } else {
                    BODY
                }
            } else {
                OUT
            }
        }
        Shape::Coin => {
            if r2 > 0.9 * 0.9 {
                OUT
            } else if (r2 > 0.66 * 0.66 && r2 < 0.74 * 0.74) || rect(u, v, -0.08, 0.08, -0.36, 0.36) {
                DARK
            } else {
                BODY
            }
        }
        Shape::Star => {
            let r = r2.sqrt();
            if r > 1.0 {
                return OUT;
            }
            // angle from "up", folded into one point's half-sector
            let ang = u.atan2(-v);
            let sector = 2.0 * std::f32::consts::PI / 5.0;
            let t = (ang.rem_euclid(sector) - sector / 2.0).abs();
            let half = sector / 2.0;
            // point (r, t) in the frame where the tip is at angle 0: x along the tip
            let (x, y) = (r * (half - t).cos(), r * (half - t).sin());
            // edge from the tip (1, 0) to the inner vertex (ri cos h, ri sin h)
            let ri = 0.44;
            let (ix, iy) = (ri * half.cos(), ri * half.sin());
            // inside if on the origin side of the line tip -> inner vertex
            let cross = (ix - 1.0) * y - iy * (x - 1.0);
            if cross >= 0.0 || r < ri {
                BODY
            } else {
                OUT
            }
        }
        Shape::Heart => {
            let x = u * 1.22;
            let y = -v * 1.22 + 0.2;
            let a = x * x + y * y - 1.0;
            if a * a * a - x * x * y * y * y <= 0.0 {
                if ell(u, v, -0.42, -0.35, 0.14, 0.1) {
                    LIGHT
                } else {
                    BODY
                }
            } else {
                OUT
            }
        }
        Shape::Hat => {
            if circ(u, v, 0.0, -0.86, 0.18) {
                return WHITE;
            }
            if v < -0.86 || v > 0.86 {
                return OUT;
            }
            let w = 0.7 * (v + 0.86) / 1.72;
            if v > 0.72 && u.abs() <= 0.74 {
                return DARK;
            }
            if u.abs() > w {
                return OUT;
            }
            if (v * 2.4 - u * 1.2 + 4.0).rem_euclid(1.0) < 0.32 {
                LIGHT
            } else {
                BODY
            }
        }
        Shape::Cup => {
            let cu = u + 0.15;
            if v >= -0.78 && v <= 0.82 && cu.abs() <= 0.6 - 0.14 * (v + 0.78) / 1.6 {
                if v < -0.64 {
                    LIGHT
                } else {
                    BODY
                }
            } else if u > 0.3 {
                let (a, b) = (u - 0.42, v + 0.02);
                let rr = a * a + b * b;
                if rr <= 0.42 * 0.42 && rr >= 0.22 * 0.22 {
                    BODY
                } else {
                    OUT
                }
            } else {
                OUT
            }
        }
        Shape::Bottle => {
            if rect(u, v, -0.2, 0.2, -1.0, -0.78) {
                SECOND
            } else if rect(u, v, -0.15, 0.15, -0.78, -0.35) {
                BODY
            } else if v >= -0.35 && v < -0.05 {
                if u.abs() <= 0.15 + (v + 0.35) / 0.3 * 0.27 {
                    BODY
                } else {
                    OUT
                }
            } else if rect(u, v, -0.42, 0.42, -0.05, 0.95) {
                if v > 0.2 && v < 0.58 {
                    LIGHT
                } else if u < -0.28 {
                    DARK
                } else {
                    BODY
                }
            } else {
                OUT
            }
        }
        Shape::Key => {
            let (a, b) = (u + 0.6, v);
            let rr = a * a + b * b;
            if rr <= 0.4 * 0.4 {
                if rr >= 0.17 * 0.17 {
                    BODY
                } else {
                    OUT
                }
            } else if rect(u, v, -0.3, 0.98, -0.12, 0.12)
                || rect(u, v, 0.48, 0.62, 0.12, 0.36)
                || rect(u, v, 0.74, 0.92, 0.12, 0.32)
            {
                BODY
            } else {
                OUT
            }
        }
        Shape::Leaf => {
            if rect(u, v, 0.82, 1.08, -0.06, 0.06) {
                DARK
            } else if circ(u, v, 0.0, 0.5, 1.05) && circ(u, v, 0.0, -0.5, 1.05) {
                if v.abs() < 0.045 + 0.0 * u && u.abs() < 0.8 {
                    DARK
                } else if ((v.abs() * 2.0 - u * 1.4).rem_euclid(0.55)) < 0.07 && v.abs() > 0.08 {
                    LIGHT
                } else {
                    BODY
                }
            } else {
                OUT
            }
        }
        Shape::Fish => {
            if circ(u, v, -0.52, -0.08, 0.09) {
                BLACK
            } else if ell(u, v, -0.12, 0.0, 0.72, 0.46) {
                if (u + 0.32).abs() < 0.04 && v.abs() < 0.32 {
                    DARK
                } else if v > 0.2 {
                    LIGHT
                } else {
                    BODY
                }
            } else if u >= 0.45 && u <= 1.0 {
                let w = 0.08 + (u - 0.45) * 0.8;
                let notch = if u > 0.82 { (u - 0.82) * 1.2 } else { -1.0 };
                if v.abs() <= w && v.abs() >= notch {
                    BODY
                } else {
                    OUT
                }
            } else if rect(u, v, -0.3, 0.15, -0.6, -0.3) && v >= -0.6 + (u + 0.3) * 0.1 && v >= -0.3 - (0.15 - u) * 0.7
            {
                DARK
            } else {
                OUT
            }
        }
        Shape::Mushroom => {
            if v <= 0.02 && ell(u, v, 0.0, 0.02, 0.95, 0.82) {
                let spot = circ(u, v, -0.42, -0.3, 0.13)
                    || circ(u, v, 0.18, -0.55, 0.12)
                    || circ(u, v, 0.5, -0.18, 0.1)
                    || circ(u, v, -0.05, -0.2, 0.09);
                if spot {
                    WHITE
                } else {
                    BODY
                }
            } else if v > 0.02 && v <= 0.9 && u.abs() <= 0.26 + 0.05 * v {
                SECOND
            } else {
                OUT
            }
        }
        Shape::Kite => {
            let w = if v <= -0.3 { 0.68 * (v + 1.0) / 0.7 } else { 0.68 * (1.0 - v) / 1.3 };
            if v < -1.0 || v > 1.0 || u.abs() > w {
                OUT
            } else if u.abs() < 0.04 || (v + 0.3).abs() < 0.04 {
                DARK
            } else if u * (v + 0.3) > 0.0 {
                LIGHT
            } else {
                BODY
            }
        }
        Shape::Balloon => {
            if ell(u, v, 0.0, -0.18, 0.66, 0.8) {
                if ell(u, v, -0.26, -0.5, 0.11, 0.2) {
                    WHITE
                } else {
                    BODY
                }
            } else if v >= 0.58 && v <= 0.8 && u.abs() <= 0.03 + 0.14 * (v - 0.58) / 0.22 {
                BODY
            } else if v > 0.8 && v <= 1.0 && (u - 0.06 * ((v - 0.8) * 20.0).sin()).abs() < 0.045 {
                DARK
            } else {
                OUT
            }
        }
        Shape::Hammer => {
            if rect(u, v, -0.62, 0.5, -0.84, -0.44) || rect(u, v, 0.5, 0.66, -0.78, -0.5) {
                SECOND
            } else if rect(u, v, -0.13, 0.13, -0.44, 1.0) {
                if v > 0.55 {
                    DARK
                } else {
                    BODY
                }
            } else {
                OUT
            }
        }
        Shape::Screwdriver => {
            if v >= 0.0 && v <= 1.0 && (u.abs() <= 0.22 || ell(u, v, 0.0, 0.85, 0.22, 0.15)) {
                if (u.abs() - 0.09).abs() < 0.03 && v > 0.2 && v < 0.9 {
                    DARK
                } else {
                    BODY
                }
            } else if rect(u, v, -0.07, 0.07, -0.98, 0.0) || rect(u, v, -0.13, 0.13, -0.08, 0.0) {
                SECOND
            } else {
                OUT
            }
        }
        Shape::Spoon => {
            if ell(u, v, 0.0, -0.5, 0.38, 0.48) {
                if ell(u, v, 0.02, -0.46, 0.24, 0.32) {
                    DARK
                } else {
                    BODY
                }
            } else if v >= -0.08 && v <= 0.92 && u.abs() <= 0.075 + 0.05 * (v + 0.08) {
                BODY
            } else {
                OUT
            }
        }
    }
}

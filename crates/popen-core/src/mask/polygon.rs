//! COCO polygon rasterization, identical to pycocotools (`maskApi.c` `rleFrPoly`,
//! `rleFrBbox`, and `_mask.pyx` `frPyObjects` + `merge` as COCO's `annToRLE` uses them).
//!
//! pycocotools walks every polygon edge at 5x resolution, emitting one point per step
//! (`(int)(v + .5)` roundings), keeps the points where the walk changes column, maps those
//! back to pixel columns and rows (`(v + .5) / 5 - .5`, then `ceil`), sorts them as
//! column-major positions and reads the sorted differences as RLE runs. Only the column
//! changes at positions `5c + 2` survive the mapping, so instead of materializing every
//! point we evaluate, with the same floating-point expressions, just the steps that can
//! land on such a column: for edges that advance one column per step that is every fifth
//! step, and for steep edges the exact step where the column changes is found from an
//! estimate corrected by evaluating the C expression. The output is bit-identical (the
//! fixtures check it), while work drops from the upsampled perimeter to the number of
//! pixel columns crossed.

use super::Rle;
use crate::error::{CoreError, Result};

const SCALE: f64 = 5.0;
/// Largest |coordinate| accepted: 5x it must fit in an `int`, with room for differences.
/// pycocotools' casts overflow (undefined behaviour) beyond about 4e8.
const MAX_COORD: f64 = 1.0e8;

/// C's `(int)` conversion as x86-64 performs it: truncation toward zero, and the
/// "integer indefinite" value `INT_MIN` for NaN or out-of-range inputs. It only matters
/// for a zero-length edge (repeated vertex), where pycocotools computes `0.0 / 0` and casts
/// the NaN; keeping INT_MIN keeps even that case identical.
#[inline]
fn c_int(v: f64) -> i64 {
    if v.is_nan() || v >= 2147483648.0 || v <= -2147483649.0 {
        i32::MIN as i64
    } else {
        v as i64
    }
}

/// One edge of the polygon in rleFrPoly's normalized form: endpoints swapped so that the
/// parameter `t` runs along the major axis in increasing order (`flip` says whether the
/// C emits the points in decreasing `t`).
struct Edge {
    xs: i64,
    ys: i64,
    n: i64,
    flat: bool, // dx >= dy: one step per column
    flip: bool,
    s: f64,
}

impl Edge {
    fn new(x0: i64, y0: i64, x1: i64, y1: i64) -> Edge {
        let (mut xs, mut xe, mut ys, mut ye) = (x0, x1, y0, y1);
        let dx = (xe - xs).abs();
        let dy = (ys - ye).abs();
        let flat = dx >= dy;
        let flip = (flat && xs > xe) || (!flat && ys > ye);
        if flip {
            std::mem::swap(&mut xs, &mut xe);
            std::mem::swap(&mut ys, &mut ye);
        }
        let s = if flat { (ye - ys) as f64 / dx as f64 } else { (xe - xs) as f64 / dy as f64 };
        Edge { xs, ys, n: if flat { dx } else { dy }, flat, flip, s }
    }

    /// The C's point at parameter t: `(u, v)` in 5x coordinates.
    #[inline]
    fn point(&self, t: i64) -> (i64, i64) {
        if self.flat {
            (t + self.xs, c_int(self.ys as f64 + self.s * t as f64 + 0.5))
        } else {
            (c_int(self.xs as f64 + self.s * t as f64 + 0.5), t + self.ys)
        }
    }

    fn first_emitted(&self) -> (i64, i64) {
        self.point(if self.flip { self.n } else { 0 })
    }

    fn last_emitted(&self) -> (i64, i64) {
        self.point(if self.flip { 0 } else { self.n })
    }
}

/// Collects the y-boundary points of rleFrPoly as column-major positions `x * h + y`.
struct Boundary {
    h: u32,
    w: u32,
    pos: Vec<u32>,
}

impl Boundary {
    /// The C's test for consecutive points `prev`, `cur` (in emission order).
    #[inline]
    fn pair(&mut self, prev: (i64, i64), cur: (i64, i64)) {
        let (u0, v0) = prev;
        let (u1, v1) = cur;
        if u1 == u0 {
            return;
        }
        let xd = if u1 < u0 { u1 } else { u1 - 1 } as f64;
        let xd = (xd + 0.5) / SCALE - 0.5;
        if xd.floor() != xd || xd < 0.0 || xd > (self.w - 1) as f64 {
            return;
        }
        let mut yd = if v1 < v0 { v1 } else { v0 } as f64;
        yd = (yd + 0.5) / SCALE - 0.5;
        if yd < 0.0 {
            yd = 0.0;
        } else if yd > self.h as f64 {
            yd = self.h as f64;
        }
        let yd = yd.ceil();
        // xd <= w-1 and 0 <= yd <= h, so this is at most h*w, checked to fit u32.
        self.pos.push(xd as u32 * self.h + yd as u32);
    }

    /// All consecutive pairs inside one edge. Within an edge |du| <= 1 per step, so the
    /// pair's result does not depend on the direction it is emitted in.
    fn edge(&mut self, e: &Edge) {
        let w = self.w as i64;
        if e.n == 0 {
            return;
        }
        if e.flat {
            // u = xs + t steps by one; the pair (t, t+1) counts iff xs + t = 5c + 2.
            let lo = (e.xs - 2 + 4).div_euclid(5).max(0); // smallest c with 5c + 2 >= xs
            let hi = (e.xs + e.n - 3).div_euclid(5).min(w - 1); // 5c + 2 <= xs + n - 1
            for c in lo..=hi {
                let t = 5 * c + 2 - e.xs;
                self.pair(e.point(t), e.point(t + 1));
            }
        } else {
            if e.s == 0.0 {
                return; // vertical: the column never changes
            }
            let (ua, ub) = (e.point(0).0, e.point(e.n).0);
            let (umin, umax) = (ua.min(ub), ua.max(ub));
            // Columns U = 5c + 2 with umin <= U < umax: the step leaving U (s > 0) or
            // entering U (s < 0) is the pair whose smaller u is U.
            let lo = (umin - 2 + 4).div_euclid(5).max(0);
            let hi = (umax - 1 - 2).div_euclid(5).min(w - 1);
            let up = e.s > 0.0;
            for c in lo..=hi {
                let target = 5 * c + 2;
                // First t where the walk has left U: u > U (s > 0) or u <= U (s < 0).
                let past = |t: i64| {
                    let u = e.point(t).0;
                    if up { u > target } else { u <= target }
                };
                let q = (target as f64 + 0.5 - e.xs as f64) / e.s;
                let mut t = if up { q.ceil() } else { q.floor() + 1.0 };
                if !t.is_finite() {
                    t = 0.0;
                }
                let mut t = (t.max(0.0).min((e.n + 1) as f64)) as i64;
                while t > 0 && past(t - 1) {
                    t -= 1;
                }
                while t <= e.n && !past(t) {
                    t += 1;
                }
                if t >= 1 && t <= e.n {
                    self.pair(e.point(t - 1), e.point(t));
                }
            }
        }
    }
}

fn check_canvas(h: u32, w: u32) -> Result<()> {
    if h as u64 * w as u64 > u32::MAX as u64 {
        return Err(CoreError::Mask(format!(
            "a {h}x{w} canvas does not fit COCO RLE's 32-bit positions"
        )));
    }
    Ok(())
}

/// pycocotools `rleFrPoly` for one polygon given as points `[x, y]` (pixel coordinates,
/// pixel centres at integers + 0.5 like COCO). Points outside the canvas are fine (the
/// shape is clipped); fewer than three points give an empty or degenerate mask, as in
/// pycocotools. Non-finite or absurdly large coordinates (|c| > 1e8) are errors, where
/// pycocotools would overflow or try to allocate without bound.
pub fn rle_from_points(points: &[[f64; 2]], h: u32, w: u32) -> Result<Rle> {
    check_canvas(h, w)?;
    for (i, p) in points.iter().enumerate() {
        for &c in p {
            if !c.is_finite() || c.abs() > MAX_COORD {
                return Err(CoreError::Mask(format!(
                    "polygon point {i} ({}, {}) is not a usable coordinate",
                    p[0], p[1]
                )));
            }
        }
    }
    let n = h as u64 * w as u64;
    if h == 0 || w == 0 {
        // pycocotools gives [0] for h == 0 and runs summing past 0 for w == 0.
        return Ok(Rle { height: h, width: w, counts: vec![n as u32] });
    }
    let k = points.len();
    let vx: Vec<i64> = points.iter().map(|p| (SCALE * p[0] + 0.5) as i64).collect();
    let vy: Vec<i64> = points.iter().map(|p| (SCALE * p[1] + 0.5) as i64).collect();
    let mut b = Boundary { h, w, pos: Vec::new() };
    let mut prev_last: Option<(i64, i64)> = None;
    for j in 0..k {
        let j1 = if j + 1 == k { 0 } else { j + 1 };
        let e = Edge::new(vx[j], vy[j], vx[j1], vy[j1]);
        if let Some(p) = prev_last {
            b.pair(p, e.first_emitted());
        }
        b.edge(&e);
        prev_last = Some(e.last_emitted());
    }
    Ok(Rle { height: h, width: w, counts: runs_from_boundary(b.pos, n as u32) })
}

/// The end of rleFrPoly: sort the boundary positions, take differences, and fold
/// coinciding boundaries (zero differences) the way the C does.
fn runs_from_boundary(mut a: Vec<u32>, total: u32) -> Vec<u32> {
    a.push(total);
    a.sort_unstable();
    let mut p = 0u32;
    for v in a.iter_mut() {
        let t = *v;
        *v -= p;
        p = t;
    }
    let k = a.len();
    let mut b = Vec::with_capacity(k);
    let mut j = 0;
    b.push(a[j]);
    j += 1;
    while j < k {
        if a[j] > 0 {
            b.push(a[j]);
            j += 1;
        } else {
            j += 1;
            if j < k {
                if let Some(last) = b.last_mut() {
                    *last += a[j];
                }
                j += 1;
            }
        }
    }
    b
}

/// pycocotools `frPoly` for one polygon in COCO's flat form `[x0, y0, x1, y1, ...]`.
/// An odd number of values is an error here (pycocotools silently drops the last one; use
/// [`rle_from_coco_polygons`] to reproduce that on existing annotation files).
pub fn rle_from_polygon(xy: &[f64], h: u32, w: u32) -> Result<Rle> {
    if xy.len() % 2 != 0 {
        return Err(CoreError::Mask(format!(
            "polygon has {} values; expected x, y pairs",
            xy.len()
        )));
    }
    rle_from_points(&pairs(xy), h, w)
}

fn pairs(xy: &[f64]) -> Vec<[f64; 2]> {
    xy.chunks_exact(2).map(|c| [c[0], c[1]]).collect()
}

/// pycocotools `frBbox` (`rleFrBbox`) for a box `[x, y, width, height]`: rasterized as the
/// polygon of its four corners, so a box and its polygon give the same mask.
pub fn rle_from_bbox(bbox: [f64; 4], h: u32, w: u32) -> Result<Rle> {
    let [xs, ys, bw, bh] = bbox;
    let (xe, ye) = (xs + bw, ys + bh);
    rle_from_points(&[[xs, ys], [xs, ye], [xe, ye], [xe, ys]], h, w)
}

/// One object's COCO `segmentation` polygon list as COCO's `annToRLE` reads it:
/// `merge(frPyObjects(polygons, h, w))`, the union of all its polygons.
///
/// pycocotools decides how to read the list from its *first* element, and we mirror that
/// so existing annotation files give the same masks:
/// - first polygon with more than 4 values: every polygon is rasterized; later polygons
///   with fewer than 3 points add nothing (or a degenerate sliver), and an odd trailing
///   value is dropped, as `frPoly` does (`len // 2` points);
/// - first polygon with exactly 4 values: pycocotools takes the whole list for boxes and
///   fails (`TypeError`: `frBbox` wants an array), so this is an error; call
///   [`rle_from_bbox`] if a box was meant;
/// - first polygon with fewer than 4 values, or no polygon: pycocotools raises
///   ("input type is not supported" / `IndexError`), and so do we.
pub fn rle_from_coco_polygons(polygons: &[Vec<f64>], h: u32, w: u32) -> Result<Rle> {
    let Some(first) = polygons.first() else {
        return Err(CoreError::Mask("segmentation has no polygon".into()));
    };
    match first.len() {
        4 => {
            return Err(CoreError::Mask(
                "first polygon has 4 values (2 points): pycocotools reads such a list as \
                 bounding boxes and fails; use rle_from_bbox for a box"
                    .into(),
            ))
        }
        n if n < 4 => {
            return Err(CoreError::Mask(format!(
                "first polygon has {n} values; pycocotools needs more than 4 (3 points)"
            )))
        }
        _ => {}
    }
    let rles = polygons
        .iter()
        .enumerate()
        .map(|(i, p)| {
            rle_from_points(&pairs(p), h, w)
                .map_err(|e| CoreError::Mask(format!("polygon {i}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Rle::merge(&rles)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rleFrPoly as written in maskApi.c, every upsampled point materialized; the fast
    /// version must agree with it everywhere.
    fn reference(xy: &[f64], h: u32, w: u32) -> Vec<u32> {
        let k = xy.len() / 2;
        let mut x: Vec<i64> = (0..k).map(|j| (SCALE * xy[2 * j] + 0.5) as i64).collect();
        let mut y: Vec<i64> = (0..k).map(|j| (SCALE * xy[2 * j + 1] + 0.5) as i64).collect();
        if k > 0 {
            x.push(x[0]);
            y.push(y[0]);
        }
        let (mut u, mut v) = (Vec::new(), Vec::new());
        for j in 0..k {
            let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
            let dx = (xe - xs).abs();
            let dy = (ys - ye).abs();
            let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
            if flip {
                std::mem::swap(&mut xs, &mut xe);
                std::mem::swap(&mut ys, &mut ye);
            }
            let s = if dx >= dy { (ye - ys) as f64 / dx as f64 } else { (xe - xs) as f64 / dy as f64 };
            if dx >= dy {
                for d in 0..=dx {
                    let t = if flip { dx - d } else { d };
                    u.push(t + xs);
                    v.push(c_int(ys as f64 + s * t as f64 + 0.5));
                }
            } else {
                for d in 0..=dy {
                    let t = if flip { dy - d } else { d };
                    v.push(t + ys);
                    u.push(c_int(xs as f64 + s * t as f64 + 0.5));
                }
            }
        }
        let mut b = Boundary { h, w, pos: Vec::new() };
        for j in 1..u.len() {
            b.pair((u[j - 1], v[j - 1]), (u[j], v[j]));
        }
        runs_from_boundary(b.pos, h * w)
    }

    #[test]
    fn fast_walk_matches_the_c_walk() {
        let mut s = 12345u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        for case in 0..3000 {
            let (h, w) = (1 + (rnd() * 40.0) as u32, 1 + (rnd() * 40.0) as u32);
            let k = 1 + (rnd() * 9.0) as usize;
            let mut xy = Vec::new();
            for _ in 0..k {
                // Mix of fractional, half-integer and out-of-canvas coordinates.
                let snap = rnd() < 0.3;
                let mut px = rnd() * (w as f64 + 10.0) - 5.0;
                let mut py = rnd() * (h as f64 + 10.0) - 5.0;
                if snap {
                    px = (px * 2.0).round() / 2.0;
                    py = (py * 10.0).round() / 10.0;
                }
                xy.push(px);
                xy.push(py);
            }
            if case % 7 == 0 && k > 1 {
                // repeated vertex
                xy.push(xy[0]);
                xy.push(xy[1]);
            }
            let fast = rle_from_polygon(&xy, h, w).unwrap();
            assert_eq!(fast.counts, reference(&xy, h, w), "case {case}: {xy:?} on {h}x{w}");
            fast.validate().unwrap();
        }
    }

    #[test]
    fn square_and_box() {
        // The pixel square [1,5]x[1,5] in COCO coordinates covers pixels 1..=4? pycocotools
        // gives 4x4 = 16 pixels at rows/cols 1..=4 (checked in the fixtures); here only
        // consistency between the polygon and the box.
        let p = rle_from_polygon(&[1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0, 1.0], 10, 10).unwrap();
        let b = rle_from_bbox([1.0, 1.0, 4.0, 4.0], 10, 10).unwrap();
        assert_eq!(p, b);
        assert_eq!(p.area(), 16);
    }

    #[test]
    fn bad_polygons_are_errors() {
        let e = rle_from_polygon(&[1.0, 2.0, 3.0], 4, 4).unwrap_err().to_string();
        assert!(e.contains("3 values"), "{e}");
        let e = rle_from_polygon(&[1.0, f64::NAN, 3.0, 4.0, 0.0, 0.0], 4, 4).unwrap_err().to_string();
        assert!(e.contains("point 0"), "{e}");
        assert!(rle_from_polygon(&[1.0, 1.0, 1e300, 4.0, 0.0, 0.0], 4, 4).is_err());
        assert!(rle_from_polygon(&[1.0, 1.0, 2.0, 4.0, 0.0, 0.0], 70000, 70000).is_err());
        let e = rle_from_coco_polygons(&[], 4, 4).unwrap_err().to_string();
        assert!(e.contains("no polygon"), "{e}");
        let e = rle_from_coco_polygons(&[vec![1.0, 1.0, 3.0, 3.0]], 4, 4).unwrap_err().to_string();
        assert!(e.contains("rle_from_bbox"), "{e}");
        assert!(rle_from_coco_polygons(&[vec![1.0, 1.0]], 4, 4).is_err());
        assert!(rle_from_coco_polygons(&[vec![]], 4, 4).is_err());
        let e = rle_from_coco_polygons(&[vec![0.0, 0.0, 3.0, 0.0, 3.0, 3.0], vec![f64::INFINITY; 6]], 4, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("polygon 1"), "{e}");
    }

    #[test]
    fn degenerate_polygons() {
        assert_eq!(rle_from_polygon(&[], 4, 5).unwrap().counts, vec![20]);
        assert_eq!(rle_from_polygon(&[1.0, 1.0], 4, 5).unwrap().counts, vec![20]);
        assert_eq!(rle_from_polygon(&[1.0, 1.0, 3.0, 2.0], 4, 5).unwrap().counts, vec![20]);
        assert_eq!(rle_from_polygon(&[0.0, 0.0, 3.0, 0.0, 3.0, 3.0], 0, 5).unwrap().counts, vec![0]);
        assert_eq!(rle_from_polygon(&[0.0, 0.0, 3.0, 0.0, 3.0, 3.0], 5, 0).unwrap().counts, vec![0]);
        // Odd trailing value dropped by the COCO reader, like frPoly.
        let a = rle_from_coco_polygons(&[vec![0.0, 0.0, 3.0, 0.0, 3.0, 3.0, 9.0]], 4, 4).unwrap();
        let b = rle_from_polygon(&[0.0, 0.0, 3.0, 0.0, 3.0, 3.0], 4, 4).unwrap();
        assert_eq!(a, b);
    }
}

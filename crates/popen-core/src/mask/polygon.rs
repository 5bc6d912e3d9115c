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

    /// The C's point at parameter t: `(u, v)` in 5x coordinates. With coordinates bounded
    /// by [`MAX_COORD`] and |s| <= 1 the conversions cannot overflow; only a zero-length
    /// edge (s = 0/0) needs the C's NaN conversion.
    #[inline]
    fn point(&self, t: i64) -> (i64, i64) {
        if self.flat {
            let v = if self.n == 0 { c_int(f64::NAN) } else { (self.ys as f64 + self.s * t as f64 + 0.5) as i64 };
            (t + self.xs, v)
        } else {
            ((self.xs as f64 + self.s * t as f64 + 0.5) as i64, t + self.ys)
        }
    }

    fn first_emitted(&self) -> (i64, i64) {
        self.point(if self.flip { self.n } else { 0 })
    }

    fn last_emitted(&self) -> (i64, i64) {
        self.point(if self.flip { 0 } else { self.n })
    }
}

/// Collects the y-boundary points of rleFrPoly: `(column, row)` pairs.
struct Boundary {
    h: u32,
    w: u32,
    pts: Vec<(u32, u32)>,
}

impl Boundary {
    /// The C's test for consecutive points `prev`, `cur` (in emission order), in integers.
    ///
    /// The C computes `xd = (u' + .5) / 5 - .5` for `u' = min(u) (= u1 < u0 ? u1 : u1 - 1
    /// when |du| = 1)` and keeps it when it is an integer in `[0, w-1]`. For `u' = 5c + r`
    /// the exact value is `c + (2r - 4) / 10`, and the double computation is off by far
    /// less than 0.1 for |u'| < 2^31, so it is an integer iff `r == 2`, and then it is
    /// exactly `c` (`5c + 2.5`, its fifth `c + .5` and `c` are all representable). Likewise
    /// `ceil(clamp((v' + .5) / 5 - .5, 0, h))` equals `clamp(ceil((v' - 2) / 5), 0, h)`:
    /// the value is exact when `v' = 5c + 2` and at least 0.2 from an integer otherwise.
    /// This avoids `floor`/`ceil` (library calls without SSE4.1) in the hot loop.
    #[inline]
    fn pair(&mut self, prev: (i64, i64), cur: (i64, i64)) {
        let (u0, v0) = prev;
        let (u1, v1) = cur;
        if u1 == u0 {
            return;
        }
        let xd = if u1 < u0 { u1 } else { u1 - 1 } - 2;
        if xd.rem_euclid(5) != 0 {
            return;
        }
        let c = xd.div_euclid(5);
        if c < 0 || c >= self.w as i64 {
            return;
        }
        let v = if v1 < v0 { v1 } else { v0 };
        let y = (v + 2).div_euclid(5).clamp(0, self.h as i64); // ceil((v - 2) / 5)
        self.pts.push((c as u32, y as u32));
    }

    /// [`Boundary::pair`] for a pair already known to step from column `5c + 2` to
    /// `5c + 3` with `0 <= c < w` (the edge walks below only visit those): just the row.
    #[inline]
    fn push_column(&mut self, c: i64, v0: i64, v1: i64) {
        let v = if v1 < v0 { v1 } else { v0 };
        let y = (v + 2).div_euclid(5).clamp(0, self.h as i64);
        self.pts.push((c as u32, y as u32));
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
                self.push_column(c, e.point(t).1, e.point(t + 1).1);
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
            let inv_s = 1.0 / e.s;
            let u_at = |t: i64| e.point(t).0;
            for c in lo..=hi {
                let target = 5 * c + 2;
                // First t where the walk has left U: u > U (s > 0) or u <= U (s < 0).
                let past = |u: i64| if up { u > target } else { u <= target };
                // Estimate from the line equation (xs + s t + .5 = U + .5 + [s > 0]), then
                // walk to the exact answer with the C's own expression, so the estimate
                // only decides how many evaluations it takes (usually two).
                let q = (target as f64 + 0.5 - e.xs as f64) * inv_s;
                let mut t = if q.is_finite() { (q as i64).clamp(0, e.n + 1) } else { 0 };
                while t > 0 && past(u_at(t - 1)) {
                    t -= 1;
                }
                let mut ut = if t <= e.n { u_at(t) } else { 0 };
                while t <= e.n && !past(ut) {
                    t += 1;
                    if t <= e.n {
                        ut = u_at(t);
                    }
                }
                if t >= 1 && t <= e.n {
                    // u steps between U and U + 1 here and v increases with t.
                    self.push_column(c, e.ys + t - 1, e.ys + t);
                }
            }
        }
    }
}

fn check_canvas(h: u32, w: u32) -> Result<()> {
    if h as u64 * w as u64 > u32::MAX as u64 {
        return Err(CoreError::Mask(format!("a {h}x{w} canvas does not fit COCO RLE's 32-bit positions")));
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
    let mut b = Boundary { h, w, pts: Vec::new() };
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
    Ok(Rle { height: h, width: w, counts: runs_from_boundary(b.pts, h, w) })
}

/// The end of rleFrPoly: sort the boundary positions `x * h + y`, take differences, and
/// fold coinciding boundaries (zero differences) the way the C does.
///
/// The C sorts with qsort; a counting sort by column (few points per column, ordered by
/// an insertion sort) gives the same order in O(points + w).
fn runs_from_boundary(pts: Vec<(u32, u32)>, h: u32, w: u32) -> Vec<u32> {
    // Buckets only for the columns the shape touches.
    let x0 = pts.iter().map(|p| p.0).min().unwrap_or(0);
    let x1 = pts.iter().map(|p| p.0).max().unwrap_or(0);
    let cols = (x1 - x0) as usize + 1;
    let mut start = vec![0u32; cols + 1];
    for &(x, _) in &pts {
        start[(x - x0) as usize + 1] += 1;
    }
    for x in 0..cols {
        start[x + 1] += start[x];
    }
    let mut a = vec![0u32; pts.len() + 1];
    {
        let mut next = start.clone();
        for &(x, y) in &pts {
            let slot = &mut next[(x - x0) as usize];
            a[*slot as usize] = x * h + y;
            *slot += 1;
        }
    }
    for x in 0..cols {
        let col = &mut a[start[x] as usize..start[x + 1] as usize];
        for i in 1..col.len() {
            let v = col[i];
            let mut j = i;
            while j > 0 && col[j - 1] > v {
                col[j] = col[j - 1];
                j -= 1;
            }
            col[j] = v;
        }
    }
    let k = a.len();
    a[k - 1] = h * w; // the C's sentinel, the largest value (y <= h, x <= w - 1)
    let mut p = 0u32;
    for v in a.iter_mut() {
        let t = *v;
        *v -= p;
        p = t;
    }
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
    if !xy.len().is_multiple_of(2) {
        return Err(CoreError::Mask(format!("polygon has {} values; expected x, y pairs", xy.len())));
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
        .map(|(i, p)| rle_from_points(&pairs(p), h, w).map_err(|e| super::context(e, format_args!("polygon {i}"))))
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
        // The C's floating-point boundary test and qsort, literally.
        let mut a: Vec<u32> = Vec::new();
        for j in 1..u.len() {
            if u[j] == u[j - 1] {
                continue;
            }
            let xd = if u[j] < u[j - 1] { u[j] } else { u[j] - 1 } as f64;
            let xd = (xd + 0.5) / SCALE - 0.5;
            if xd.floor() != xd || xd < 0.0 || xd > (w - 1) as f64 {
                continue;
            }
            let mut yd = if v[j] < v[j - 1] { v[j] } else { v[j - 1] } as f64;
            yd = (yd + 0.5) / SCALE - 0.5;
            if yd < 0.0 {
                yd = 0.0;
            } else if yd > h as f64 {
                yd = h as f64;
            }
            a.push(xd as u32 * h + yd.ceil() as u32);
        }
        a.push(h * w);
        a.sort_unstable();
        let mut p = 0;
        for x in a.iter_mut() {
            let t = *x;
            *x -= p;
            p = t;
        }
        let mut b = vec![a[0]];
        let mut j = 1;
        while j < a.len() {
            if a[j] > 0 {
                b.push(a[j]);
                j += 1;
            } else {
                j += 1;
                if j < a.len() {
                    *b.last_mut().unwrap() += a[j];
                    j += 1;
                }
            }
        }
        b
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

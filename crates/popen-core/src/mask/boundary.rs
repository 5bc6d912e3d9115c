//! Boundary IoU (Cheng et al., CVPR 2021), identical to boundary-iou-api's
//! `mask_to_boundary` + `boundary_iou` (github.com/bowenc0221/boundary-iou-api,
//! `boundary_iou/utils/boundary_utils.py`, and the `boundary_iou` helper published with it).
//!
//! The reference pads the mask with one zero pixel, erodes it `d` times with a 3x3 square
//! (`cv2.erode`, whose default border never erodes from outside the padded image), crops,
//! and keeps `mask - eroded`. `d` erosions by a 3x3 square are one erosion by a
//! `(2d+1)`-square, and the one-pixel zero frame makes a window that leaves the image see a
//! zero, so a pixel survives iff its whole `(2d+1)`-square lies inside the image and is
//! foreground. That is computed separably in O(h*w) whatever `d` is: per row, runs of
//! ones shrink by `d` at both ends; per column, a running count of consecutive survivors
//! reaches `2d+1`. Rows are streamed, so Boundary IoU reads each mask once and allocates
//! only a few rows.

use super::ops::{count_and_or, intersection_union};
use super::{Mask, ONES};
use crate::error::Result;

/// boundary-iou-api's default: the band is 2% of the image diagonal.
pub const DEFAULT_BOUNDARY_DILATION_RATIO: f64 = 0.02;

/// The band width `d` in pixels: `max(1, int(round(ratio * sqrt(h^2 + w^2))))`, with
/// Python's round-half-to-even (a 75x100 mask at 0.02 gives 2, not 3). A NaN or negative
/// ratio gives 1, the reference's lower clamp.
pub fn boundary_dilation(height: u32, width: u32, ratio: f64) -> u32 {
    // h**2 + w**2 is an exact integer in Python before np.sqrt converts it.
    let sq = height as u64 * height as u64 + width as u64 * width as u64;
    let d = (ratio * (sq as f64).sqrt()).round_ties_even();
    if d.is_nan() || d < 1.0 {
        1
    } else if d >= u32::MAX as f64 {
        u32::MAX
    } else {
        d as u32
    }
}

/// Calls `f(start, end)` for every run of ones `[start, end)` in a row of 0/1 bytes,
/// skipping uniform stretches 32 and then 8 bytes at a time.
#[inline]
fn for_each_run(row: &[u8], mut f: impl FnMut(usize, usize)) {
    let n = row.len();
    let mut i = 0;
    let word = super::word;
    loop {
        while i + 32 <= n && word(row, i) | word(row, i + 8) | word(row, i + 16) | word(row, i + 24) == 0 {
            i += 32;
        }
        while i + 8 <= n && word(row, i) == 0 {
            i += 8;
        }
        while i < n && row[i] == 0 {
            i += 1;
        }
        if i >= n {
            return;
        }
        let s = i;
        while i + 32 <= n && word(row, i) & word(row, i + 8) & word(row, i + 16) & word(row, i + 24) == ONES {
            i += 32;
        }
        while i + 8 <= n && word(row, i) == ONES {
            i += 8;
        }
        while i < n && row[i] != 0 {
            i += 1;
        }
        f(s, i);
    }
}

/// Per-column counters of consecutive horizontal survivors. The narrowest type that can
/// reach `2d + 1` is used, because the update is the inner loop and narrower lanes mean
/// more pixels per vector instruction (16 with u8 on baseline SSE2).
trait Counter: Copy + Default {
    fn from_usize(k: usize) -> Self;
    fn bump(self, alive: u8) -> Self;
    fn below(self, k: Self) -> bool;
}

macro_rules! counter {
    ($t:ty) => {
        impl Counter for $t {
            #[inline(always)]
            fn from_usize(k: usize) -> Self {
                k as $t
            }
            #[inline(always)]
            fn bump(self, alive: u8) -> Self {
                if alive != 0 {
                    self.saturating_add(1)
                } else {
                    0
                }
            }
            #[inline(always)]
            fn below(self, k: Self) -> bool {
                self < k
            }
        }
    };
}
counter!(u8);
counter!(u16);
counter!(u32);

/// Produces the boundary of a mask one row at a time, top to bottom, with O(w) state:
/// nothing the size of the image is allocated, and each mask row is read once (plus again
/// from cache `d` rows later). Row `r` needs the horizontal erosion of rows up to `r + d`.
struct BoundaryRows<'a, C: Counter> {
    mask: &'a [u8],
    w: usize,
    h: usize,
    d: usize,
    k: C,
    /// Whether anything survives the erosion at all (the window fits in the image).
    eroding: bool,
    next_out: usize,
    next_in: usize,
    hz: Vec<u8>,
    up: Vec<C>,
    out: Vec<u8>,
}

impl<'a, C: Counter> BoundaryRows<'a, C> {
    fn new(mask: &'a Mask, d: usize) -> Self {
        let (h, w) = (mask.height as usize, mask.width as usize);
        let k = d.saturating_mul(2).saturating_add(1);
        let eroding = k <= h && k <= w;
        let row_buf = if eroding { w } else { 0 };
        BoundaryRows {
            mask: &mask.data,
            w,
            h,
            d,
            k: C::from_usize(k),
            eroding,
            next_out: 0,
            next_in: 0,
            hz: vec![0; row_buf],
            up: vec![C::default(); row_buf],
            out: vec![0; row_buf],
        }
    }

    /// Feeds input row `y`: horizontal erosion (runs of ones shrink by d at each end),
    /// then the vertical counters.
    fn feed(&mut self, y: usize) {
        let (w, d) = (self.w, self.d);
        let k = 2 * d + 1; // cannot overflow: only reached when 2d + 1 <= w
        let row = &self.mask[y * w..(y + 1) * w];
        let hz = &mut self.hz[..];
        hz.fill(0);
        for_each_run(row, |s, e| {
            if e - s >= k {
                hz[s + d..e - d].fill(1);
            }
        });
        for (u, &v) in self.up.iter_mut().zip(hz.iter()) {
            *u = u.bump(v);
        }
    }

    /// The next boundary row.
    fn next_row(&mut self) -> &[u8] {
        let r = self.next_out;
        self.next_out += 1;
        let (w, d) = (self.w, self.d);
        let mask_row = &self.mask[r * w..(r + 1) * w];
        if !self.eroding || r < d || r + d >= self.h {
            return mask_row; // too close to the border for anything to survive
        }
        while self.next_in <= r + d {
            self.feed(self.next_in);
            self.next_in += 1;
        }
        let k = self.k;
        for ((o, &m), &u) in self.out.iter_mut().zip(mask_row).zip(&self.up) {
            *o = m & (u.below(k) as u8);
        }
        &self.out
    }
}

fn boundary_with<C: Counter>(mask: &Mask, d: usize) -> Mask {
    let mut rows = BoundaryRows::<C>::new(mask, d);
    let mut data = Vec::with_capacity(mask.data.len());
    for _ in 0..mask.height {
        data.extend_from_slice(rows.next_row());
    }
    Mask { height: mask.height, width: mask.width, data }
}

fn counts_with<C: Counter>(a: &Mask, b: &Mask, d: usize) -> (u64, u64) {
    let (mut ra, mut rb) = (BoundaryRows::<C>::new(a, d), BoundaryRows::<C>::new(b, d));
    let (mut i, mut u) = (0, 0);
    for _ in 0..a.height {
        let (ri, ru) = count_and_or(ra.next_row(), rb.next_row());
        i += ri;
        u += ru;
    }
    (i, u)
}

/// Dispatches on the counter width `2d + 1` needs.
macro_rules! by_counter {
    ($d:expr, $f:ident($($arg:expr),*)) => {{
        let k = ($d as usize).saturating_mul(2).saturating_add(1);
        if k <= u8::MAX as usize {
            $f::<u8>($($arg),*)
        } else if k <= u16::MAX as usize {
            $f::<u16>($($arg),*)
        } else {
            $f::<u32>($($arg),*)
        }
    }};
}

/// boundary-iou-api `mask_to_boundary(mask, dilation_ratio)`: the foreground pixels within
/// `d` ([`boundary_dilation`]) pixels (Chebyshev distance) of the background or of the
/// image border.
pub fn mask_to_boundary(mask: &Mask, ratio: f64) -> Mask {
    let d = boundary_dilation(mask.height, mask.width, ratio) as usize;
    by_counter!(d, boundary_with(mask, d))
}

/// `(|Bg ∩ Bp|, |Bg ∪ Bp|)` of the two boundaries; errors on different sizes. Streams
/// both boundaries row by row into the counts, without building them.
pub fn boundary_intersection_union(a: &Mask, b: &Mask, ratio: f64) -> Result<(u64, u64)> {
    if !a.same_size(b) {
        // Same message as for plain IoU, before doing any work.
        intersection_union(a, b)?;
    }
    let d = boundary_dilation(a.height, a.width, ratio) as usize;
    Ok(by_counter!(d, counts_with(a, b, d)))
}

/// Boundary IoU of two masks, as boundary-iou-api `boundary_iou(gt, dt, dilation_ratio)`
/// (`ratio` = [`DEFAULT_BOUNDARY_DILATION_RATIO`] for the paper's setting). When both
/// boundaries are empty (both masks empty) the reference divides 0 by 0 and returns NaN;
/// we return 1.0, the same convention as for IoU ([`super::iou_from_counts`]).
pub fn boundary_iou(a: &Mask, b: &Mask, ratio: f64) -> Result<f64> {
    let (i, u) = boundary_intersection_union(a, b, ratio)?;
    Ok(super::iou_from_counts(i, u))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Literal version: erode a zero-padded copy d times with a 3x3 square.
    fn reference(mask: &Mask, ratio: f64) -> Mask {
        let d = boundary_dilation(mask.height(), mask.width(), ratio);
        let (h, w) = (mask.height() as usize, mask.width() as usize);
        let (ph, pw) = (h + 2, w + 2);
        let mut cur = vec![0u8; ph * pw];
        for y in 0..h {
            for x in 0..w {
                cur[(y + 1) * pw + x + 1] = mask.data()[y * w + x];
            }
        }
        for _ in 0..d {
            let mut next = cur.clone();
            for y in 0..ph {
                for x in 0..pw {
                    let mut v = 1u8;
                    // cv2's default border: neighbours outside the padded image are ignored.
                    for yy in y.saturating_sub(1)..=(y + 1).min(ph - 1) {
                        for xx in x.saturating_sub(1)..=(x + 1).min(pw - 1) {
                            v &= cur[yy * pw + xx];
                        }
                    }
                    next[y * pw + x] = v;
                }
            }
            cur = next;
        }
        Mask::from_fn(h as u32, w as u32, |y, x| mask.get(y, x) && cur[(y as usize + 1) * pw + x as usize + 1] == 0)
    }

    #[test]
    fn matches_iterated_erosion() {
        let mut s = 99u64;
        for case in 0..200u64 {
            let h = 1 + (case * 7 % 37) as u32;
            let w = 1 + (case * 13 % 41) as u32;
            let density = [10u64, 60, 90, 99, 100][case as usize % 5];
            let m = Mask::from_fn(h, w, |_, _| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 33) % 100 < density
            });
            for ratio in [0.0, 0.02, 0.05, 0.1] {
                assert_eq!(mask_to_boundary(&m, ratio), reference(&m, ratio), "case {case} ratio {ratio}");
            }
        }
    }

    #[test]
    fn dilation_rounds_half_to_even() {
        assert_eq!(boundary_dilation(75, 100, 0.02), 2); // 2.5 -> 2
        assert_eq!(boundary_dilation(45, 60, 0.02), 2); // 1.5 -> 2
        assert_eq!(boundary_dilation(135, 180, 0.02), 4); // 4.5 -> 4
        assert_eq!(boundary_dilation(480, 640, 0.02), 16);
        assert_eq!(boundary_dilation(15, 20, 0.02), 1); // 0.5 -> 0 -> clamped to 1
        assert_eq!(boundary_dilation(0, 0, 0.02), 1);
        assert_eq!(boundary_dilation(10, 10, f64::NAN), 1);
        assert_eq!(boundary_dilation(10, 10, -3.0), 1);
        assert_eq!(boundary_dilation(10, 10, f64::INFINITY), u32::MAX);
    }

    #[test]
    fn conventions_and_errors() {
        let e = Mask::zeros(8, 9);
        assert_eq!(boundary_iou(&e, &e, 0.02).unwrap(), 1.0);
        assert_eq!(boundary_iou(&Mask::zeros(0, 4), &Mask::zeros(0, 4), 0.02).unwrap(), 1.0);
        let full = Mask::from_fn(8, 9, |_, _| true);
        assert_eq!(boundary_iou(&e, &full, 0.02).unwrap(), 0.0);
        assert_eq!(boundary_iou(&full, &full, 0.02).unwrap(), 1.0);
        let err = boundary_iou(&e, &Mask::zeros(9, 8), 0.02).unwrap_err().to_string();
        assert!(err.contains("8x9 vs 9x8"), "{err}");
        // A huge band leaves the whole mask as boundary.
        assert_eq!(mask_to_boundary(&full, f64::INFINITY), full);
    }
}

//! Binary masks and COCO run-length encoding, bit-compatible with pycocotools.
//!
//! In memory a [`Mask`] is row-major (`data[y * width + x]`, 0 or 1), the way images are.
//! COCO RLE runs over the pixels in column-major (Fortran) order, starting with a run of
//! zeros; its compressed `counts` string is pycocotools' `rleToString` format.
//!
//! Everything here reproduces pycocotools (`maskApi.c`, `_mask.pyx`, pycocotools 2.0.x) and
//! boundary-iou-api bit for bit, so that numbers computed in Rust match the published
//! evaluation code; `tests/mask_fixtures.rs` checks that against fixtures written by
//! `tools/reference/make_mask_fixtures.py`. Where the references have no useful answer
//! (NaN, `-1`, silent garbage, a crash) we return an error or a documented value instead:
//!
//! - IoU of two empty masks is 1.0 ([`iou_from_counts`]); pycocotools says 0.0.
//! - Boundary IoU of two masks with empty boundaries is 1.0; boundary-iou-api says NaN.
//! - Size mismatches are errors; pycocotools returns `-1` (iou) or a 0x0 RLE (merge).
//!
//! Submodules: [`ops`] (IoU, merge, bbox without decoding), [`polygon`] (COCO polygon
//! rasterization), [`boundary`] (Boundary IoU).

use crate::error::{CoreError, Result};

pub mod boundary;
pub mod ops;
pub mod polygon;

pub use boundary::{
    boundary_dilation, boundary_intersection_union, boundary_iou, mask_to_boundary, DEFAULT_BOUNDARY_DILATION_RATIO,
};
pub use ops::{intersection_union, iou, iou_from_counts};
pub use polygon::{rle_from_bbox, rle_from_coco_polygons, rle_from_points, rle_from_polygon};

/// Prefixes a mask error with where it happened, without repeating "invalid mask:".
pub(crate) fn context(e: CoreError, ctx: impl std::fmt::Display) -> CoreError {
    match e {
        CoreError::Mask(m) => CoreError::Mask(format!("{ctx}: {m}")),
        other => other,
    }
}

/// A binary mask, row-major, one byte per pixel holding 0 or 1.
///
/// The kernels (area, IoU, RLE encoding, boundaries) rely on the bytes being exactly 0 or 1;
/// every constructor normalizes, and writers through [`Mask::data_mut`] must keep it so.
#[derive(Clone, PartialEq, Eq)]
pub struct Mask {
    height: u32,
    width: u32,
    data: Vec<u8>,
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mask({}x{}, area {})", self.height, self.width, self.area())
    }
}

impl Mask {
    pub fn zeros(height: u32, width: u32) -> Self {
        Mask { height, width, data: vec![0; height as usize * width as usize] }
    }

    /// Builds a mask from row-major bytes; any non-zero byte is foreground.
    pub fn from_row_major(height: u32, width: u32, mut data: Vec<u8>) -> Result<Self> {
        let n = height as usize * width as usize;
        if data.len() != n {
            return Err(CoreError::Mask(format!("{} bytes for a {height}x{width} mask (expected {n})", data.len())));
        }
        // In place: callers hand over decoded model outputs of several MB.
        for v in data.iter_mut() {
            *v = (*v != 0) as u8;
        }
        Ok(Mask { height, width, data })
    }

    pub fn from_fn(height: u32, width: u32, mut f: impl FnMut(u32, u32) -> bool) -> Self {
        let mut data = Vec::with_capacity(height as usize * width as usize);
        for y in 0..height {
            for x in 0..width {
                data.push(f(y, x) as u8);
            }
        }
        Mask { height, width, data }
    }

    pub fn height(&self) -> u32 {
        self.height
    }
    pub fn width(&self) -> u32 {
        self.width
    }
    /// Row-major 0/1 bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    /// Row-major bytes; keep them 0 or 1 (see the type's documentation).
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
    /// Gives the row-major 0/1 bytes back without copying.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }
    #[inline]
    pub fn get(&self, y: u32, x: u32) -> bool {
        self.data[y as usize * self.width as usize + x as usize] != 0
    }
    #[inline]
    pub fn set(&mut self, y: u32, x: u32, v: bool) {
        self.data[y as usize * self.width as usize + x as usize] = v as u8;
    }
    pub fn area(&self) -> u64 {
        ops::count_ones(&self.data)
    }
    pub fn is_empty(&self) -> bool {
        self.data.iter().all(|&v| v == 0)
    }
    pub fn same_size(&self, other: &Mask) -> bool {
        self.height == other.height && self.width == other.width
    }
}

/// COCO run-length encoding: `size` = [height, width], `counts` = alternating runs of 0s
/// and 1s in column-major order (the first run is zeros and may be 0 long).
///
/// The fields are public so that shards can be read without copies; an `Rle` built by hand
/// may be inconsistent, which is why every operation re-checks [`Rle::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rle {
    pub height: u32,
    pub width: u32,
    pub counts: Vec<u32>,
}

const ONES: u64 = 0x0101_0101_0101_0101;

#[inline]
fn word(bytes: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[i..i + 8]);
    u64::from_le_bytes(b)
}

/// Records the pixels where a 32-pixel block differs from the block above (XOR words,
/// one byte per pixel). Kept out of line so that the scanning loop stays in registers.
#[inline(never)]
fn record_changes(x0: usize, y: usize, d: [u64; 4], pts: &mut Vec<(u32, u32)>, per_col: &mut [u32]) {
    for (j, mut dj) in d.into_iter().enumerate() {
        while dj != 0 {
            let x = x0 + j * 8 + (dj.trailing_zeros() / 8) as usize;
            pts.push((x as u32, y as u32));
            per_col[x] += 1;
            dj &= dj - 1; // bytes are 0/1: the lowest set bit is this byte's only bit
        }
    }
}

impl Rle {
    /// Builds an RLE and checks that its runs cover height x width exactly.
    pub fn new(height: u32, width: u32, counts: Vec<u32>) -> Result<Rle> {
        let rle = Rle { height, width, counts };
        rle.validate()?;
        Ok(rle)
    }

    /// The all-background RLE, as pycocotools encodes an empty mask (`[h*w]`).
    pub fn empty(height: u32, width: u32) -> Result<Rle> {
        let n = height as u64 * width as u64;
        let n = u32::try_from(n)
            .map_err(|_| CoreError::Mask(format!("a {height}x{width} mask does not fit COCO RLE's 32-bit runs")))?;
        Ok(Rle { height, width, counts: vec![n] })
    }

    /// pycocotools `rleEncode` of the mask (as `encode(np.asfortranarray(mask))` does).
    ///
    /// The column-major walk over a row-major mask is the hot loop of the naive version
    /// (one strided byte per step). Instead, the change points below the first row are
    /// found by XOR-ing each row with the one above, 32 pixels per test, which scans
    /// uniform areas at memory speed, and are then bucketed by column (a stable counting
    /// sort keeps them in row order). Only the first pixel of each column needs the
    /// comparison with the previous column's last pixel.
    ///
    /// Like pycocotools, runs are 32-bit: a mask of more than `u32::MAX` pixels cannot be
    /// represented faithfully.
    pub fn encode(mask: &Mask) -> Rle {
        let (h, w) = (mask.height as usize, mask.width as usize);
        let data = &mask.data[..];
        if h == 0 || w == 0 {
            return Rle { height: mask.height, width: mask.width, counts: vec![0] };
        }
        // Vertical change points (x, y) with y >= 1, in row-major order.
        let mut per_col = vec![0u32; w + 1];
        let mut pts: Vec<(u32, u32)> = Vec::new();
        for y in 1..h {
            let prev = &data[(y - 1) * w..y * w];
            let cur = &data[y * w..(y + 1) * w];
            let (pw, cw) = (prev.chunks_exact(32), cur.chunks_exact(32));
            let tail = w - pw.remainder().len();
            for (i, (p32, c32)) in pw.zip(cw).enumerate() {
                // 32 pixels per test: rows rarely differ, so this loop is a plain scan.
                let d0 = word(p32, 0) ^ word(c32, 0);
                let d1 = word(p32, 8) ^ word(c32, 8);
                let d2 = word(p32, 16) ^ word(c32, 16);
                let d3 = word(p32, 24) ^ word(c32, 24);
                if d0 | d1 | d2 | d3 != 0 {
                    record_changes(i * 32, y, [d0, d1, d2, d3], &mut pts, &mut per_col);
                }
            }
            for x in tail..w {
                if prev[x] != cur[x] {
                    pts.push((x as u32, y as u32));
                    per_col[x] += 1;
                }
            }
        }
        // Counting sort by column; stable, so rows stay ascending within a column.
        let mut start = vec![0usize; w + 1];
        for x in 0..w {
            start[x + 1] = start[x] + per_col[x] as usize;
        }
        let mut ys = vec![0u32; pts.len()];
        {
            let mut next = start.clone();
            for &(x, y) in &pts {
                let slot = &mut next[x as usize];
                ys[*slot] = y;
                *slot += 1;
            }
        }
        let mut counts = Vec::with_capacity(pts.len() + w + 1);
        let mut last = 0u64; // column-major position of the previous change
        let mut prev_val = 0u8; // pixel just before the top of column x
        let hh = h as u64;
        for x in 0..w {
            let top = data[x];
            let base = x as u64 * hh;
            if top != prev_val {
                counts.push((base - last) as u32);
                last = base;
            }
            for &y in &ys[start[x]..start[x + 1]] {
                let p = base + y as u64;
                counts.push((p - last) as u32);
                last = p;
            }
            prev_val = data[(h - 1) * w + x];
        }
        counts.push((hh * w as u64 - last) as u32);
        Rle { height: mask.height, width: mask.width, counts }
    }

    /// Checks that the runs cover exactly height x width pixels.
    pub fn validate(&self) -> Result<()> {
        let expected = self.height as u64 * self.width as u64;
        // COCO RLE runs are 32-bit (as in pycocotools); this also keeps a hostile size in a
        // short string from asking decode() for terabytes.
        if expected > u32::MAX as u64 {
            return Err(CoreError::Mask(format!(
                "size {}x{} has more pixels than COCO RLE's 32-bit runs can describe",
                self.height, self.width
            )));
        }
        let total: u64 = self.counts.iter().map(|&c| c as u64).sum();
        if total != expected {
            return Err(CoreError::Mask(format!(
                "RLE counts sum to {total}, but size {}x{} has {expected} pixels",
                self.height, self.width
            )));
        }
        Ok(())
    }

    /// pycocotools `rleDecode`; errors if the counts do not cover height x width exactly.
    ///
    /// Writing each foreground pixel at `(p % h) * w + p / h` costs a division and a
    /// scattered store per pixel. Instead we mark, in row-major order, where a column
    /// changes value going down (one store per run end) and the value at the top of each
    /// column, then recover every row as the XOR of the row above with its change marks,
    /// a pass that runs eight bytes at a time.
    pub fn decode(&self) -> Result<Mask> {
        self.validate()?;
        let (h, w) = (self.height as usize, self.width as usize);
        let mut data = vec![0u8; h * w];
        if h == 0 || w == 0 {
            return Ok(Mask { height: self.height, width: self.width, data });
        }
        let hh = h as u64;
        let mut pos = 0u64;
        let mut value = false;
        for &c in &self.counts {
            let end = pos + c as u64;
            if value && c > 0 {
                // Tops of the columns that start inside [pos, end): row 0 holds their value.
                let first_col = pos.div_ceil(hh) as usize;
                let end_col = (end.div_ceil(hh) as usize).min(w);
                if first_col < end_col {
                    data[first_col..end_col].fill(1);
                }
                // Changes inside a column (not at its top) toggle the row-major mark.
                let (x0, y0) = ((pos / hh) as usize, (pos % hh) as usize);
                if y0 != 0 {
                    data[y0 * w + x0] ^= 1;
                }
                let (x1, y1) = ((end / hh) as usize, (end % hh) as usize);
                if y1 != 0 {
                    data[y1 * w + x1] ^= 1;
                }
            }
            pos = end;
            value = !value;
        }
        for y in 1..h {
            let (above, rest) = data.split_at_mut(y * w);
            let prev = &above[(y - 1) * w..];
            let cur = &mut rest[..w];
            for (c, p) in cur.iter_mut().zip(prev) {
                *c ^= *p;
            }
        }
        Ok(Mask { height: self.height, width: self.width, data })
    }

    /// Foreground pixel count (pycocotools `rleArea`).
    pub fn area(&self) -> u64 {
        self.counts.iter().skip(1).step_by(2).map(|&c| c as u64).sum()
    }

    /// pycocotools `rleToString`: the compressed `counts` string of COCO JSON.
    pub fn to_coco_string(&self) -> String {
        // At most 7 characters per value (33 bits with sign, 5 per character).
        let mut s = Vec::with_capacity(self.counts.len() * 7);
        for (i, &c) in self.counts.iter().enumerate() {
            let mut x = c as i64;
            if i > 2 {
                x -= self.counts[i - 2] as i64;
            }
            if (-16..16).contains(&x) {
                // One character: most deltas of smooth shapes are this small.
                s.push((x & 0x1f) as u8 + 48);
                continue;
            }
            loop {
                let mut c = (x & 0x1f) as u8;
                x >>= 5;
                let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
                if more {
                    c |= 0x20;
                }
                s.push(c + 48);
                if !more {
                    break;
                }
            }
        }
        // Every byte is in 48..=111, plain ASCII, so this cannot fail.
        String::from_utf8(s).unwrap_or_default()
    }

    /// pycocotools `rleFrString`, with validation: characters outside the alphabet, a
    /// truncated last value, negative or overflowing runs, and counts that do not sum to
    /// height x width are errors.
    pub fn from_coco_string(height: u32, width: u32, s: &str) -> Result<Rle> {
        let mut counts = vec![0u32; s.len()]; // at least one character per value
        let (m, total) = parse_counts(s.as_bytes(), &mut counts).map_err(|e| e.into_error(s))?;
        counts.truncate(m);
        let expected = height as u64 * width as u64;
        if expected > u32::MAX as u64 {
            return Err(CoreError::Mask(format!(
                "size {height}x{width} has more pixels than COCO RLE's 32-bit runs can describe"
            )));
        }
        if total != expected {
            return Err(CoreError::Mask(format!(
                "RLE counts sum to {total}, but size {height}x{width} has {expected} pixels"
            )));
        }
        Ok(Rle { height, width, counts })
    }
}

/// Why a counts string was rejected; turned into a message only on the error path, so
/// that the parsing loop keeps its state in registers.
enum ParseError {
    BadChar(usize),
    Truncated(usize),
    TooLong(usize),
    OutOfRange(usize, i64),
}

impl ParseError {
    #[cold]
    fn into_error(self, s: &str) -> CoreError {
        CoreError::Mask(match self {
            ParseError::BadChar(p) => {
                // Report the whole character, not a byte of its UTF-8 encoding.
                let ch = s.get(p..).and_then(|r| r.chars().next()).unwrap_or('?');
                format!("RLE string has invalid character {ch:?} at {p}")
            }
            ParseError::Truncated(p) => format!("RLE string ends inside a value at character {p}"),
            ParseError::TooLong(p) => format!("RLE string value too long at {p}"),
            ParseError::OutOfRange(m, x) => format!("RLE run {m} is out of range ({x})"),
        })
    }
}

/// The rleFrString loop: writes the runs to `out` (as long as the string) and returns
/// their number and sum.
#[inline]
fn parse_counts(bytes: &[u8], out: &mut [u32]) -> std::result::Result<(usize, u64), ParseError> {
    let n = bytes.len();
    let (mut m, mut p, mut total) = (0usize, 0usize, 0u64);
    let mut two_back = 0i64; // counts[m - 2], added from the third run on (the C's `m > 2`)
    let mut one_back = 0i64;
    while p < n {
        // Fast path: eight one-character values ('0'..='O', 48..=79) in a row, which is
        // most of a smooth shape's string. Checked for all eight bytes at once (the
        // additions cannot carry between bytes of the low-7-bit word); any run out of range
        // sends the block to the general loop below, which reports it.
        if p + 8 <= n {
            const HI: u64 = 0x8080_8080_8080_8080;
            let w = word(bytes, p);
            let low = w & !HI;
            let ge48 = (low + 0x5050_5050_5050_5050) & HI;
            let ge80 = (low + 0x3030_3030_3030_3030) & HI;
            if w & HI == 0 && ge48 == HI && ge80 == 0 {
                let d = w - 0x3030_3030_3030_3030; // eight values in 0..32, no borrows
                let (m0, t0, a0, b0) = (m, total, two_back, one_back);
                let mut bad = false;
                for i in 0..8 {
                    let mut x = (((d >> (8 * i)) as u8 ^ 0x10) as i64) - 0x10;
                    if m > 2 {
                        x += two_back;
                    }
                    bad |= x as u64 > u32::MAX as u64; // negative too
                    out[m] = x as u32;
                    m += 1;
                    total = total.wrapping_add(x as u64);
                    two_back = one_back;
                    one_back = x;
                }
                if !bad {
                    p += 8;
                    continue;
                }
                (m, total, two_back, one_back) = (m0, t0, a0, b0);
            }
        }
        let c = bytes[p].wrapping_sub(48);
        if c >= 64 {
            return Err(ParseError::BadChar(p));
        }
        p += 1;
        let mut x;
        if c & 0x20 == 0 {
            // One character (the common case): five bits, sign-extended from bit 4.
            x = ((c & 0x1f) ^ 0x10) as i64 - 0x10;
        } else {
            x = (c & 0x1f) as i64;
            let mut k = 1u32;
            loop {
                if p >= n {
                    return Err(ParseError::Truncated(p));
                }
                let c = bytes[p].wrapping_sub(48);
                if c >= 64 {
                    return Err(ParseError::BadChar(p));
                }
                if k >= 12 {
                    return Err(ParseError::TooLong(p));
                }
                x |= ((c & 0x1f) as i64) << (5 * k);
                p += 1;
                k += 1;
                if c & 0x20 == 0 {
                    if c & 0x10 != 0 {
                        x |= -1i64 << (5 * k);
                    }
                    break;
                }
            }
        }
        if m > 2 {
            x += two_back;
        }
        if !(0..=u32::MAX as i64).contains(&x) {
            return Err(ParseError::OutOfRange(m, x));
        }
        out[m] = x as u32;
        m += 1;
        total += x as u64;
        two_back = one_back;
        one_back = x;
    }
    Ok((m, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The obvious per-pixel versions, to check the fast paths against.
    fn encode_naive(m: &Mask) -> Vec<u32> {
        let (h, w) = (m.height() as usize, m.width() as usize);
        let mut counts = Vec::new();
        let (mut prev, mut run) = (0u8, 0u32);
        for x in 0..w {
            for y in 0..h {
                let v = m.data()[y * w + x];
                if v != prev {
                    counts.push(run);
                    run = 0;
                    prev = v;
                }
                run += 1;
            }
        }
        counts.push(run);
        counts
    }

    fn lcg_mask(h: u32, w: u32, seed: u64, density: u64) -> Mask {
        let mut s = seed;
        Mask::from_fn(h, w, |_, _| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) % 100 < density
        })
    }

    #[test]
    fn encode_decode_roundtrip_small() {
        // 3x2 mask, row-major [[0,1],[1,1],[0,0]]; column-major: 0,1,0 | 1,1,0
        let m = Mask::from_row_major(3, 2, vec![0, 1, 1, 1, 0, 0]).unwrap();
        let r = Rle::encode(&m);
        assert_eq!(r.counts, vec![1, 1, 1, 2, 1]);
        assert_eq!(r.area(), 3);
        assert_eq!(r.decode().unwrap(), m);
        let s = r.to_coco_string();
        assert_eq!(Rle::from_coco_string(3, 2, &s).unwrap(), r);
    }

    #[test]
    fn fast_encode_decode_match_naive() {
        for (i, &(h, w)) in [(1, 1), (1, 9), (9, 1), (7, 8), (8, 7), (17, 33), (64, 64), (3, 100)].iter().enumerate() {
            for density in [0, 3, 50, 97, 100] {
                let m = lcg_mask(h, w, i as u64 * 31 + density, density);
                let r = Rle::encode(&m);
                assert_eq!(r.counts, encode_naive(&m), "{h}x{w} density {density}");
                assert_eq!(r.decode().unwrap(), m, "{h}x{w} density {density}");
            }
        }
    }

    #[test]
    fn string_roundtrip_fuzz() {
        // Random runs of every magnitude, so both the 8-character fast path and the general
        // loop (and the switch between them) are exercised.
        let mut s = 7u64;
        for case in 0..2000 {
            let mut counts = Vec::new();
            let len = (case % 40) + 1;
            for _ in 0..len {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let bits = (s >> 60) as u32 % 28;
                counts.push(((s >> 20) as u32) & ((1u32 << bits) - 1).max(1));
            }
            let total: u64 = counts.iter().map(|&c| c as u64).sum();
            let (h, w) = (1u32, total as u32);
            let r = Rle { height: h, width: w, counts: counts.clone() };
            let st = r.to_coco_string();
            assert_eq!(Rle::from_coco_string(h, w, &st).unwrap().counts, counts, "{st}");
            // Corrupting any one character never panics.
            for pos in 0..st.len().min(12) {
                let mut b = st.clone().into_bytes();
                b[pos] = b'0' + ((b[pos] - b'0' + 17) % 64);
                let _ = Rle::from_coco_string(h, w, std::str::from_utf8(&b).unwrap());
            }
        }
        // A run that goes negative inside an all-one-character block is an error.
        assert!(Rle::from_coco_string(1, 10, "000OOOOOOOO").is_err());
    }

    #[test]
    fn zero_sized_masks() {
        for (h, w) in [(0, 0), (0, 5), (5, 0)] {
            let r = Rle::encode(&Mask::zeros(h, w));
            assert_eq!(r.counts, vec![0]);
            assert_eq!(r.to_coco_string(), "0");
            assert_eq!(r.decode().unwrap(), Mask::zeros(h, w));
        }
    }

    #[test]
    fn decode_handles_zero_length_runs() {
        // [2, 0, 1, 3, 3] on 3x3: the zero-length run of ones merges the zero runs.
        let r = Rle::new(3, 3, vec![2, 0, 1, 3, 3]).unwrap();
        let m = r.decode().unwrap();
        let col_major: Vec<u8> = (0..9).map(|p| m.data()[(p % 3) * 3 + p / 3]).collect();
        assert_eq!(col_major, vec![0, 0, 0, 1, 1, 1, 0, 0, 0]);
        // Leading zero-length zero run: full mask.
        let full = Rle::new(2, 2, vec![0, 4]).unwrap().decode().unwrap();
        assert_eq!(full.data(), &[1, 1, 1, 1]);
    }

    #[test]
    fn sizes_beyond_32_bit_runs_are_refused() {
        let e = Rle::from_coco_string(100_000, 100_000, "0").unwrap_err().to_string();
        assert!(e.contains("32-bit"), "{e}");
        let r = Rle { height: 70_000, width: 70_000, counts: vec![u32::MAX, u32::MAX] };
        assert!(r.decode().unwrap_err().to_string().contains("32-bit"));
    }

    #[test]
    fn counts_must_cover_the_image() {
        let r = Rle { height: 4, width: 4, counts: vec![3, 4] };
        let e = r.decode().unwrap_err().to_string();
        assert!(e.contains("sum to 7") && e.contains("4x4 has 16"), "{e}");
        assert!(Rle::new(4, 4, vec![3, 14]).is_err());
        assert!(Rle::from_coco_string(4, 4, "1").is_err());
        assert!(Rle::from_coco_string(4, 4, "~~~").is_err());
    }

    #[test]
    fn string_errors_are_specific() {
        let e = Rle::from_coco_string(4, 4, "0a é").unwrap_err().to_string();
        assert!(e.contains("invalid character ' ' at 2"), "{e}");
        let e = Rle::from_coco_string(4, 4, "0é").unwrap_err().to_string();
        assert!(e.contains("invalid character 'é' at 1"), "{e}");
        // 'o' = 48 + 0x3f: continuation bit set, then the string ends.
        let e = Rle::from_coco_string(4, 4, "0o").unwrap_err().to_string();
        assert!(e.contains("ends inside a value"), "{e}");
        let e = Rle::from_coco_string(4, 4, "oooooooooooo0").unwrap_err().to_string();
        assert!(e.contains("too long"), "{e}");
        // A negative first run ("_" = 48 + 0x2f... here "O" = 48 + 0x1f = -1).
        let e = Rle::from_coco_string(4, 4, "O").unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        let e = Rle::from_coco_string(1, 1, "").unwrap_err().to_string();
        assert!(e.contains("sum to 0"), "{e}");
        let e = Rle::empty(70000, 70000).unwrap_err().to_string();
        assert!(e.contains("32-bit"), "{e}");
    }

    #[test]
    fn from_row_major_normalizes_and_checks_length() {
        let m = Mask::from_row_major(1, 3, vec![0, 7, 255]).unwrap();
        assert_eq!(m.data(), &[0, 1, 1]);
        let e = Mask::from_row_major(2, 2, vec![0; 3]).unwrap_err().to_string();
        assert!(e.contains("3 bytes for a 2x2 mask (expected 4)"), "{e}");
    }
}

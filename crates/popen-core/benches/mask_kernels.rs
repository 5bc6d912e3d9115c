//! Mask kernel benchmark: `cargo bench -p popen-core --bench mask_kernels`.
//!
//! Plain `std::time` timing (no criterion, to keep compile time low). Inputs are generated
//! here and in `tools/reference/bench_masks.py` by the same deterministic procedure
//! (splitmix64, a fixed table of 64 unit directions written as decimal literals, only
//! IEEE `+ - * /`, so both languages produce bit-identical polygons); both print the same
//! input checksum to prove it. The workload: 100 COCO-like objects on 480x640 images, each
//! 1-3 star-shaped polygons of 12-48 vertices ("gt"), plus a perturbed copy of each ("dt").
//!
//! Each kernel runs over the whole batch repeatedly (at least 5 times and about a second);
//! the median batch time divided by the batch size is reported, in microseconds per item.
//! Run `python3 tools/reference/bench_masks.py` first (it writes
//! `target/bench-masks-pycocotools.json`, or the path in `MASK_BENCH_REFERENCE`) and this
//! bench adds the pycocotools column and the speedups to its Markdown table.
//! `MASK_BENCH_ONLY=polygon,boundary_iou` restricts the run to some kernels (for profiling).

use std::hint::black_box;
use std::time::{Duration, Instant};

use popen_core::mask::{
    boundary_iou, intersection_union, rle_from_coco_polygons, Mask, Rle, DEFAULT_BOUNDARY_DILATION_RATIO,
};

const H: u32 = 480;
const W: u32 = 640;
const N: usize = 100;
const SEED: u64 = 0x5EED0FB0BA;

/// cos/sin of 2*pi*k/64, as Python's `repr` prints them (shared with bench_masks.py):
/// literals rather than `f64::cos` so that both languages start from the same bits.
#[allow(clippy::approx_constant)]
const DIRS: [(f64, f64); 64] = [
    (1.0, 0.0),
    (0.9951847266721969, 0.0980171403295606),
    (0.9807852804032304, 0.19509032201612825),
    (0.9569403357322088, 0.29028467725446233),
    (0.9238795325112867, 0.3826834323650898),
    (0.881921264348355, 0.47139673682599764),
    (0.8314696123025452, 0.5555702330196022),
    (0.773010453362737, 0.6343932841636455),
    (0.7071067811865476, 0.7071067811865475),
    (0.6343932841636455, 0.773010453362737),
    (0.5555702330196023, 0.8314696123025452),
    (0.4713967368259978, 0.8819212643483549),
    (0.38268343236508984, 0.9238795325112867),
    (0.29028467725446233, 0.9569403357322089),
    (0.19509032201612833, 0.9807852804032304),
    (0.09801714032956077, 0.9951847266721968),
    (6.123233995736766e-17, 1.0),
    (-0.09801714032956065, 0.9951847266721969),
    (-0.1950903220161282, 0.9807852804032304),
    (-0.29028467725446216, 0.9569403357322089),
    (-0.3826834323650897, 0.9238795325112867),
    (-0.4713967368259977, 0.881921264348355),
    (-0.555570233019602, 0.8314696123025455),
    (-0.6343932841636454, 0.7730104533627371),
    (-0.7071067811865475, 0.7071067811865476),
    (-0.773010453362737, 0.6343932841636455),
    (-0.8314696123025453, 0.5555702330196022),
    (-0.8819212643483549, 0.47139673682599786),
    (-0.9238795325112867, 0.3826834323650899),
    (-0.9569403357322088, 0.2902846772544624),
    (-0.9807852804032304, 0.1950903220161286),
    (-0.9951847266721968, 0.09801714032956083),
    (-1.0, 1.2246467991473532e-16),
    (-0.9951847266721969, -0.09801714032956059),
    (-0.9807852804032304, -0.19509032201612836),
    (-0.9569403357322089, -0.2902846772544621),
    (-0.9238795325112868, -0.38268343236508967),
    (-0.881921264348355, -0.47139673682599764),
    (-0.8314696123025455, -0.555570233019602),
    (-0.7730104533627371, -0.6343932841636453),
    (-0.7071067811865477, -0.7071067811865475),
    (-0.6343932841636459, -0.7730104533627367),
    (-0.5555702330196022, -0.8314696123025452),
    (-0.47139673682599786, -0.8819212643483549),
    (-0.38268343236509034, -0.9238795325112865),
    (-0.29028467725446244, -0.9569403357322088),
    (-0.19509032201612866, -0.9807852804032303),
    (-0.09801714032956045, -0.9951847266721969),
    (-1.8369701987210297e-16, -1.0),
    (0.09801714032956009, -0.9951847266721969),
    (0.1950903220161283, -0.9807852804032304),
    (0.29028467725446205, -0.9569403357322089),
    (0.38268343236509, -0.9238795325112866),
    (0.4713967368259976, -0.881921264348355),
    (0.5555702330196018, -0.8314696123025455),
    (0.6343932841636456, -0.7730104533627369),
    (0.7071067811865474, -0.7071067811865477),
    (0.7730104533627367, -0.6343932841636459),
    (0.8314696123025452, -0.5555702330196022),
    (0.8819212643483548, -0.4713967368259979),
    (0.9238795325112865, -0.3826834323650904),
    (0.9569403357322088, -0.2902846772544625),
    (0.9807852804032303, -0.19509032201612872),
    (0.9951847266721969, -0.0980171403295605),
];

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / 9007199254740992.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn star(rng: &mut SplitMix, cx: f64, cy: f64, r: f64) -> Vec<f64> {
    let n = 12 + rng.below(37) as usize;
    let mut p = Vec::with_capacity(2 * n);
    for k in 0..n {
        let (c, s) = DIRS[k * 64 / n];
        let rk = r * (0.7 + 0.3 * rng.uniform());
        p.push(cx + rk * c);
        p.push(cy + rk * s);
    }
    p
}

fn object(rng: &mut SplitMix, cx: f64, cy: f64, r: f64) -> Object {
    let extra = (rng.below(4) == 0) as usize + (rng.below(8) == 0) as usize;
    let mut polys = vec![star(rng, cx, cy, r)];
    for _ in 0..extra {
        let px = cx + (rng.uniform() - 0.5) * r;
        let py = cy + (rng.uniform() - 0.5) * r;
        let pr = r * (0.4 + 0.6 * rng.uniform());
        polys.push(star(rng, px, py, pr));
    }
    polys
}

/// One object's COCO polygons.
type Object = Vec<Vec<f64>>;

/// (gt, dt) polygon lists of the N objects.
fn inputs() -> (Vec<Object>, Vec<Object>) {
    let mut rng = SplitMix(SEED);
    let (mut gt, mut dt) = (Vec::new(), Vec::new());
    for _ in 0..N {
        let cx = 40.0 + rng.uniform() * (W as f64 - 80.0);
        let cy = 40.0 + rng.uniform() * (H as f64 - 80.0);
        let r = 20.0 + rng.uniform() * 130.0;
        gt.push(object(&mut rng, cx, cy, r));
        let dx = cx + (rng.uniform() - 0.5) * 0.3 * r;
        let dy = cy + (rng.uniform() - 0.5) * 0.3 * r;
        let dr = r * (0.85 + 0.3 * rng.uniform());
        dt.push(object(&mut rng, dx, dy, dr));
    }
    (gt, dt)
}

/// Median seconds per batch; `None` when `MASK_BENCH_ONLY` (comma-separated kernel keys)
/// excludes the kernel, for profiling one at a time.
fn time_batch(key: &str, mut f: impl FnMut()) -> Option<f64> {
    if let Ok(only) = std::env::var("MASK_BENCH_ONLY") {
        if !only.split(',').any(|k| k.trim() == key) {
            return None;
        }
    }
    f(); // warm-up
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed() < Duration::from_secs(1) && times.len() < 200) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Some(times[times.len() / 2])
}

fn fnv1a(acc: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(acc, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3))
}

fn reference_results() -> Option<serde_json::Value> {
    let path = std::env::var("MASK_BENCH_REFERENCE")
        .unwrap_or_else(|_| format!("{}/../../target/bench-masks-pycocotools.json", env!("CARGO_MANIFEST_DIR")));
    let text = std::fs::read_to_string(&path).ok()?;
    eprintln!("reference timings: {path}");
    serde_json::from_str(&text).ok()
}

fn main() {
    let (gt_polys, dt_polys) = inputs();
    let to_rle = |p: &Object| rle_from_coco_polygons(p, H, W).expect("polygons rasterize");
    let gt_rle: Vec<Rle> = gt_polys.iter().map(to_rle).collect();
    let dt_rle: Vec<Rle> = dt_polys.iter().map(to_rle).collect();
    let gt_str: Vec<String> = gt_rle.iter().map(Rle::to_coco_string).collect();
    let dt_str: Vec<String> = dt_rle.iter().map(Rle::to_coco_string).collect();
    let gt_mask: Vec<Mask> = gt_rle.iter().map(|r| r.decode().unwrap()).collect();
    let dt_mask: Vec<Mask> = dt_rle.iter().map(|r| r.decode().unwrap()).collect();

    let area: u64 = gt_rle.iter().chain(&dt_rle).map(Rle::area).sum();
    let hash = gt_str.iter().chain(&dt_str).fold(0xcbf2_9ce4_8422_2325, |h, s| fnv1a(h, s.as_bytes()));
    println!("inputs: {N} gt + {N} dt objects on {H}x{W}; total area {area}; strings fnv1a {hash:016x}");

    let n = N as f64;
    let mut rows: Vec<(&str, &str, Option<f64>)> = Vec::new();
    let t = time_batch("encode", || {
        for m in &gt_mask {
            black_box(Rle::encode(black_box(m)).to_coco_string());
        }
    });
    rows.push(("encode", "mask (row-major) → COCO RLE string", t.map(|t| t / n)));
    // Same measurement of ours, against pycocotools given a mask it needs no copy for.
    rows.push(("encode_fortran", "… same, reference given a Fortran-ordered mask", t.map(|t| t / n)));
    let t = time_batch("encode_counts", || {
        for m in &gt_mask {
            black_box(Rle::encode(black_box(m)));
        }
    });
    rows.push(("encode_counts", "mask → RLE counts (no string)", t.map(|t| t / n)));
    let t = time_batch("decode", || {
        for s in &gt_str {
            black_box(Rle::from_coco_string(H, W, black_box(s)).unwrap().decode().unwrap());
        }
    });
    rows.push(("decode", "COCO RLE string → mask", t.map(|t| t / n)));
    let t = time_batch("decode_counts", || {
        for r in &gt_rle {
            black_box(black_box(r).decode().unwrap());
        }
    });
    rows.push(("decode_counts", "RLE counts → mask (no string)", t.map(|t| t / n)));
    let t = time_batch("to_string", || {
        for r in &gt_rle {
            black_box(black_box(r).to_coco_string());
        }
    });
    rows.push(("to_string", "RLE counts → string", t.map(|t| t / n)));
    let t = time_batch("from_string", || {
        for s in &gt_str {
            black_box(Rle::from_coco_string(H, W, black_box(s)).unwrap().area());
        }
    });
    rows.push(("from_string", "string → RLE counts (+ area)", t.map(|t| t / n)));
    let t = time_batch("iou_matrix", || {
        let d: Vec<Rle> = dt_str.iter().map(|s| Rle::from_coco_string(H, W, s).unwrap()).collect();
        let g: Vec<Rle> = gt_str.iter().map(|s| Rle::from_coco_string(H, W, s).unwrap()).collect();
        black_box(Rle::iou_matrix(&d, &g).unwrap());
    });
    rows.push(("iou_matrix", "RLE IoU, 100×100 matrix from strings (per matrix)", t.map(|t| t / 1.0)));
    let t = time_batch("iou_pairs", || {
        for (d, g) in dt_str.iter().zip(&gt_str) {
            let d = Rle::from_coco_string(H, W, d).unwrap();
            let g = Rle::from_coco_string(H, W, g).unwrap();
            black_box(d.iou(&g).unwrap());
        }
    });
    rows.push(("iou_pairs", "RLE IoU, matched pair from strings", t.map(|t| t / n)));
    let t = time_batch("polygon", || {
        for p in &gt_polys {
            black_box(rle_from_coco_polygons(black_box(p), H, W).unwrap().to_coco_string());
        }
    });
    rows.push(("polygon", "polygons → RLE string (annToRLE: frPyObjects + merge)", t.map(|t| t / n)));
    let t = time_batch("boundary_iou", || {
        for (g, d) in gt_mask.iter().zip(&dt_mask) {
            black_box(boundary_iou(g, d, DEFAULT_BOUNDARY_DILATION_RATIO).unwrap());
        }
    });
    rows.push(("boundary_iou", "Boundary IoU of a 480×640 mask pair (d = 16)", t.map(|t| t / n)));
    let t = time_batch("mask_iou", || {
        for (g, d) in gt_mask.iter().zip(&dt_mask) {
            black_box(intersection_union(g, d).unwrap());
        }
    });
    rows.push(("mask_iou", "IoU of decoded 480×640 masks (reference: numpy)", t.map(|t| t / n)));

    let reference = reference_results();
    println!();
    println!("| kernel | ours (µs) | reference (µs) | speedup | reference call |");
    println!("|---|---:|---:|---:|---|");
    for (key, label, secs) in rows {
        let Some(secs) = secs else { continue };
        let ours = secs * 1e6;
        let theirs = reference.as_ref().and_then(|r| r["kernels"][key]["us"].as_f64());
        let how = reference.as_ref().and_then(|r| r["kernels"][key]["how"].as_str()).unwrap_or("");
        match theirs {
            Some(p) => println!("| {label} | {ours:.2} | {p:.2} | {:.1}× | {how} |", p / ours),
            None => println!("| {label} | {ours:.2} | – | – | |"),
        }
    }
    if let Some(r) = reference {
        let same = r["checksum"]["area"].as_u64() == Some(area)
            && r["checksum"]["fnv1a"].as_str() == Some(&format!("{hash:016x}"));
        println!();
        println!("reference inputs identical: {same}; reference: {}", r["versions"]);
    }
}

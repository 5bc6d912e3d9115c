//! The automatic mask generator (`popen_sam::amg`) against SAM's Python
//! (`automatic_mask_generator.py`, `utils/amg.py`; isat-sam 1.1.0, identical in
//! segment-anything and MobileSAM). Expected values are derived by hand from the Python
//! formulas (each test says how), and the end-to-end tests use a fake model whose masks
//! are exact rectangles, so every filter, NMS and uncropping step has a known answer.

use image::{Rgb, RgbImage};
use popen_core::mask::{Mask, Rle};
use popen_sam::amg::{
    build_all_layer_point_grids, build_point_grid, generate, generate_crop_boxes, is_box_near_crop_edge, mask_to_box,
    nms, remove_small_regions, stability_score, AmgConfig, AmgError, AmgMask, CropBox, PointMasks, PromptModel,
    RegionMode,
};

// ---------------------------------------------------------------------------------------
// Point grids: linspace(1/(2n), 1 - 1/(2n), n), x fastest (build_point_grid).

#[test]
fn point_grid_matches_the_linspace_formula() {
    // n = 1: offset 1/2, a single point at the center.
    assert_eq!(build_point_grid(1), vec![[0.5, 0.5]]);
    // n = 2: offset 1/4 -> 0.25, 0.75; x varies fastest (np.tile + stack + reshape).
    assert_eq!(build_point_grid(2), vec![[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]);
    // n = 4: offset 1/8 -> 0.125 + 0.25 * i (all exact in binary).
    let g = build_point_grid(4);
    assert_eq!(g.len(), 16);
    let side = [0.125, 0.375, 0.625, 0.875];
    for (k, p) in g.iter().enumerate() {
        assert_eq!(*p, [side[k % 4], side[k / 4]], "point {k}");
    }
    // n = 3: 1/6, 1/2, 5/6 (numpy: i * step + start, last = stop exactly).
    let g = build_point_grid(3);
    let side = [1.0 / 6.0, 0.5, 1.0 - 1.0 / 6.0];
    for (k, p) in g.iter().enumerate() {
        assert!((p[0] - side[k % 3]).abs() < 1e-15 && (p[1] - side[k / 3]).abs() < 1e-15);
    }
    assert_eq!(g[8], [1.0 - 1.0 / 6.0, 1.0 - 1.0 / 6.0]);
}

#[test]
fn layer_point_grids_divide_points_per_side_by_the_factor_power() {
    // int(4 / 2^i): 4, 2, 1 points per side.
    let g = build_all_layer_point_grids(4, 2, 2);
    assert_eq!(g.iter().map(Vec::len).collect::<Vec<_>>(), vec![16, 4, 1]);
    assert_eq!(g[2], vec![[0.5, 0.5]]);
    // int(32 / 3^i): 32, 10, 3 (truncation, not rounding).
    let g = build_all_layer_point_grids(32, 2, 3);
    assert_eq!(g.iter().map(Vec::len).collect::<Vec<_>>(), vec![32 * 32, 100, 9]);
    // Factor 1: every layer the same.
    let g = build_all_layer_point_grids(5, 1, 1);
    assert_eq!(g[0], g[1]);
}

// ---------------------------------------------------------------------------------------
// Crop boxes (generate_crop_boxes), hand-derived for a 100 wide x 60 high image with the
// default overlap ratio 512/1500 = 0.34133...

fn xyxy(crops: &[CropBox], layer: usize) -> Vec<[u32; 4]> {
    crops.iter().filter(|c| c.layer == layer).map(|c| c.xyxy).collect()
}

#[test]
fn crop_boxes_one_layer_hand_derived() {
    let crops = generate_crop_boxes(60, 100, 1, 512.0 / 1500.0).unwrap();
    assert_eq!(crops[0], CropBox { xyxy: [0, 0, 100, 60], layer: 0 });
    // Layer 1, 2 crops per side: overlap = int(0.3413 * 60 * (2/2)) = int(20.48) = 20;
    // crop_w = ceil((20 * 1 + 100) / 2) = 60, crop_h = ceil((20 + 60) / 2) = 40;
    // x0 = (60 - 20) * i = 0, 40; y0 = (40 - 20) * i = 0, 20; x-major order.
    assert_eq!(xyxy(&crops, 1), vec![[0, 0, 60, 40], [0, 20, 60, 60], [40, 0, 100, 40], [40, 20, 100, 60]]);
    assert_eq!(crops.len(), 5);
}

#[test]
fn crop_boxes_two_layers_hand_derived() {
    let crops = generate_crop_boxes(60, 100, 2, 512.0 / 1500.0).unwrap();
    assert_eq!(crops.len(), 1 + 4 + 16);
    // Layer 2, 4 crops per side: overlap = int(0.3413 * 60 * (2/4)) = int(10.24) = 10;
    // crop_w = ceil((10 * 3 + 100) / 4) = ceil(32.5) = 33; crop_h = ceil((30 + 60) / 4) = 23;
    // x0 = 23 * i = 0, 23, 46, 69 (x1 = 33, 56, 79, min(102, 100));
    // y0 = 13 * i = 0, 13, 26, 39 (y1 = 23, 36, 49, min(62, 60)).
    let mut expected = Vec::new();
    for (x0, x1) in [(0, 33), (23, 56), (46, 79), (69, 100)] {
        for (y0, y1) in [(0, 23), (13, 36), (26, 49), (39, 60)] {
            expected.push([x0, y0, x1, y1]);
        }
    }
    assert_eq!(xyxy(&crops, 2), expected);
    // Layers come in order: 0, then layer 1's four, then layer 2's sixteen.
    let layers: Vec<usize> = crops.iter().map(|c| c.layer).collect();
    assert_eq!(&layers[..6], &[0, 1, 1, 1, 1, 2]);
}

#[test]
fn crop_boxes_of_a_tiny_image_are_an_error_not_empty_crops() {
    // 1x1, layer 1: overlap 0, crop_len = ceil(1/2) = 1, x0 = 0, 1 -> [1, 0, 1, 1] is empty.
    let err = generate_crop_boxes(1, 1, 1, 512.0 / 1500.0).unwrap_err();
    assert!(matches!(err, AmgError::Image(_)), "{err}");
    assert_eq!(generate_crop_boxes(1, 1, 0, 0.3).unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------
// Stability score (calculate_stability_score): count(> thr + off) / count(> thr - off).

#[test]
fn stability_score_counts_strictly_above_both_cutoffs() {
    // Cutoffs 1.0 and -1.0 with thr 0, offset 1; values equal to a cutoff are not above it.
    // > 1: {1.5, 3.0} = 2; > -1: {-0.5, 0.5, 1.0, 1.5, 3.0} = 5 -> 0.4.
    let logits = [-2.0, -1.0, -0.5, 0.5, 1.0, 1.5, 3.0, -7.0];
    assert_eq!(stability_score(&logits, 2, 4, 0.0, 1.0), 2.0 / 5.0);
    // Other threshold/offset: thr 0.5, offset 0.25 -> > 0.75: {1.0, 1.5, 3.0};
    // > 0.25: {0.5, 1.0, 1.5, 3.0} -> 3/4.
    assert_eq!(stability_score(&logits, 4, 2, 0.5, 0.25), 0.75);
    // All background: 0 / 0 = NaN (the filter then drops the mask).
    assert!(stability_score(&[-5.0; 6], 2, 3, 0.0, 1.0).is_nan());
    // Confident mask: 1.
    assert_eq!(stability_score(&[5.0, -5.0, 5.0, -5.0], 2, 2, 0.0, 1.0), 1.0);
}

#[test]
fn stability_score_row_counts_wrap_like_torch_int16() {
    // One row of 33000 pixels: 10000 at 5.0 (above both cutoffs), 23000 at 0.0 (above -1
    // only). Torch sums each row with dtype=int16: 33000 wraps to 33000 - 65536 = -32536,
    // so the score is 10000 / -32536.
    let mut logits = vec![0.0f32; 33000];
    logits[..10000].fill(5.0);
    assert_eq!(stability_score(&logits, 1, 33000, 0.0, 1.0), 10000.0f32 / -32536.0f32);
    // The same pixels over two rows stay below 32768 per row: 10000 / 33000.
    assert_eq!(stability_score(&logits, 2, 16500, 0.0, 1.0), 10000.0f32 / 33000.0f32);
}

// ---------------------------------------------------------------------------------------
// batched_mask_to_box: inclusive x0, y0, x1, y1; [0, 0, 0, 0] for an empty mask.

#[test]
fn mask_to_box_is_inclusive_and_zero_for_empty() {
    assert_eq!(mask_to_box(&Mask::zeros(5, 7)), [0, 0, 0, 0]);
    let one = Mask::from_fn(5, 7, |y, x| (y, x) == (3, 2));
    assert_eq!(mask_to_box(&one), [2, 3, 2, 3]);
    // An L: column 1 for rows 1..=4 and row 4 for columns 1..=5.
    let l = Mask::from_fn(5, 7, |y, x| (x == 1 && y >= 1) || (y == 4 && (1..=5).contains(&x)));
    assert_eq!(mask_to_box(&l), [1, 1, 5, 4]);
    let full = Mask::from_fn(5, 7, |_, _| true);
    assert_eq!(mask_to_box(&full), [0, 0, 6, 4]);
}

// ---------------------------------------------------------------------------------------
// NMS: torchvision.ops.nms / batched_nms with one category (CPU kernel).

#[test]
fn nms_suppresses_only_from_kept_boxes() {
    // A and B: inter 9 x 10 = 90, union 100 + 100 - 90 = 110, IoU 0.818 > 0.7 -> B goes.
    // A and C: inter 80, union 120, IoU 0.667 -> C stays, although C overlaps B (0.818):
    // B was suppressed and suppresses nothing.
    let boxes = [[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [2.0, 0.0, 12.0, 10.0]];
    assert_eq!(nms(&boxes, &[0.9, 0.8, 0.7], 0.7), vec![0, 2]);
    // With C scored highest: C kills B (0.818), then A vs C = 0.667 survives.
    assert_eq!(nms(&boxes, &[0.5, 0.8, 0.9], 0.7), vec![2, 0]);
}

#[test]
fn nms_orders_by_score_and_breaks_ties_by_input_order() {
    // Disjoint boxes: nothing suppressed, output sorted by score descending.
    let boxes = [[0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0], [9.0, 9.0, 10.0, 10.0]];
    assert_eq!(nms(&boxes, &[0.1, 0.9, 0.5], 0.5), vec![1, 2, 0]);
    // Equal scores keep input order (stable); identical boxes: the first one wins.
    let same = [[0.0, 0.0, 4.0, 4.0]; 3];
    assert_eq!(nms(&same, &[0.5, 0.5, 0.5], 0.7), vec![0]);
    assert_eq!(nms(&boxes, &[0.5, 0.5, 0.5], 0.7), vec![0, 1, 2]);
    // NaN sorts first (torch's descending sort).
    assert_eq!(nms(&boxes, &[0.1, f32::NAN, 0.5], 0.5), vec![1, 2, 0]);
    assert!(nms(&[], &[], 0.5).is_empty());
}

#[test]
fn nms_threshold_is_strict_and_compared_in_f64() {
    // IoU exactly 0.5 (50 / 100) is not > 0.5.
    let boxes = [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]];
    assert_eq!(nms(&boxes, &[0.9, 0.8], 0.5), vec![0, 1]);
    assert_eq!(nms(&boxes, &[0.9, 0.8], 0.49), vec![0]);
    // IoU 3/10 computed in f32 is 0.30000001192...; the kernel compares that float with
    // the double 0.3, so it is > 0.3 and the box is suppressed.
    let boxes = [[0.0, 0.0, 10.0, 1.0], [0.0, 0.0, 3.0, 1.0]];
    assert_eq!(nms(&boxes, &[0.9, 0.8], 0.3), vec![0]);
    // Zero-area boxes (one-pixel-wide masks): IoU 0 / 0 = NaN is never > thresh.
    let flat = [[5.0, 5.0, 5.0, 9.0], [5.0, 5.0, 5.0, 9.0]];
    assert_eq!(nms(&flat, &[0.9, 0.8], 0.7), vec![0, 1]);
}

// ---------------------------------------------------------------------------------------
// is_box_near_crop_edge (atol 20 after uncropping; image edges do not count).

#[test]
fn near_crop_edge_rule() {
    let crop = [40, 20, 100, 60];
    let image = [0, 0, 100, 60];
    // Uncropped [40, 25, 50, 50]: x0 = crop x0 (diff 0), far from image x0 -> near.
    assert!(is_box_near_crop_edge([0, 5, 10, 30], crop, image, 20.0));
    // Uncropped [65, 45, 85, 59]: x0, y0 25 away from the crop's; x1 and y1 are near the
    // crop's right/bottom edges but those are image edges -> not near.
    assert!(!is_box_near_crop_edge([25, 25, 45, 39], crop, image, 20.0));
    // Uncropped x0 = 60: 20 from the crop edge, within atol (<=) -> near; 61 -> not.
    assert!(is_box_near_crop_edge([20, 25, 45, 39], crop, image, 20.0));
    assert!(!is_box_near_crop_edge([21, 25, 45, 39], crop, image, 20.0));
    // The whole-image crop never filters: every crop edge is an image edge.
    assert!(!is_box_near_crop_edge([0, 0, 3, 3], image, image, 20.0));
    // An empty mask's box [0, 0, 0, 0] sits on the crop's top-left corner.
    assert!(is_box_near_crop_edge([0, 0, 0, 0], crop, image, 20.0));
}

// ---------------------------------------------------------------------------------------
// remove_small_regions (cv2.connectedComponentsWithStats(mask, 8)). The expected masks
// are hand-derived; they also agree with running SAM's function under OpenCV 5.0.

fn mask_from(rows: &[&str]) -> Mask {
    let h = rows.len() as u32;
    let w = rows[0].len() as u32;
    Mask::from_fn(h, w, |y, x| rows[y as usize].as_bytes()[x as usize] == b'#')
}

#[test]
fn remove_small_holes() {
    let ring = mask_from(&[
        ".......", //
        ".#####.", ".#####.", ".##.##.", ".#####.", ".#####.", ".......",
    ]);
    // The hole has 1 pixel: 1 < 2 -> filled; 1 < 1 is false -> unchanged.
    let (filled, changed) = remove_small_regions(ring.clone(), 2, RegionMode::Holes);
    assert!(changed);
    assert_eq!(filled, Mask::from_fn(7, 7, |y, x| (1..6).contains(&y) && (1..6).contains(&x)));
    let (same, changed) = remove_small_regions(ring.clone(), 1, RegionMode::Holes);
    assert!(!changed);
    assert_eq!(same, ring);
    // The outer background is a "hole" component too (24 pixels): with threshold 30 it is
    // filled as well, as in SAM.
    let (all, changed) = remove_small_regions(ring, 30, RegionMode::Holes);
    assert!(changed);
    assert_eq!(all.area(), 49);
    // Background components are 8-connected: the two diagonal background pixels form one
    // 2-pixel hole (with 4-connectivity they would be two 1-pixel holes).
    let diag = mask_from(&[
        ".###", //
        "#.##", "####",
    ]);
    assert!(!remove_small_regions(diag.clone(), 2, RegionMode::Holes).1);
    let (full, changed) = remove_small_regions(diag, 3, RegionMode::Holes);
    assert!(changed);
    assert_eq!(full.area(), 12);
}

#[test]
fn remove_small_islands() {
    // A 3x3 blob plus a diagonal neighbour (8-connected: one 10-pixel component) and an
    // isolated pixel.
    let m = mask_from(&[
        "........", //
        ".###....", ".###....", ".###....", "....#...", "........", "......#.",
    ]);
    let (out, changed) = remove_small_regions(m.clone(), 2, RegionMode::Islands);
    assert!(changed);
    assert_eq!(out.area(), 10);
    assert!(out.get(4, 4) && !out.get(6, 6));
    // Threshold 1: nothing is smaller than 1 pixel.
    assert_eq!(remove_small_regions(m.clone(), 1, RegionMode::Islands), (m.clone(), false));
    // All islands small: the largest survives, alone.
    let (out, changed) = remove_small_regions(m, 100, RegionMode::Islands);
    assert!(changed);
    assert_eq!(out.area(), 10);
    assert!(!out.get(6, 6));
    // An empty mask has no islands.
    let empty = Mask::zeros(3, 3);
    assert_eq!(remove_small_regions(empty.clone(), 5, RegionMode::Islands), (empty, false));
}

#[test]
fn remove_small_islands_tie_keeps_opencvs_first_label() {
    // Two single pixels, both small: SAM keeps argmax(sizes), the first label. OpenCV
    // labels by 2x2 blocks in raster order, so (row 1, col 0) [block (0, 0)] is label 1
    // and (row 0, col 5) [block (0, 2)] label 2, although the latter comes first in
    // pixel raster order. (Checked against cv2 5.0.)
    let m = mask_from(&[
        ".....#..", //
        "#.......", "........",
    ]);
    let (out, changed) = remove_small_regions(m, 5, RegionMode::Islands);
    assert!(changed);
    assert_eq!(out, mask_from(&["........", "#.......", "........"]));
}

// ---------------------------------------------------------------------------------------
// End to end with a fake model.
//
// The image holds coloured rectangles on black. For a point, the fake model looks at the
// pixel under it in the image it was given (full image or crop) and answers three masks:
//
// - on a rectangle of colour index k (k = 1, 2, 3):
//   0. the rectangle (logits +5 inside, -5 outside), IoU 0.9 + 0.01 k;
//   1. the rectangle widened by one column to the right, IoU 0.89 - 0.01 + 0.01 k: passes
//      the 0.88 filter but its box IoU with mask 0 is > 0.9, so NMS drops it;
//   2. the rectangle with weak logits (+0.5 inside): IoU 0.99 but stability 0 -> dropped;
// - on the background: the background (IoU 0.5), everything (0.6), nothing (0.97, -5
//   everywhere: stability 0/0 = NaN -> dropped).

struct FakeModel {
    image: Option<RgbImage>,
    /// (width, height) of every set_image call.
    sizes: Vec<(u32, u32)>,
    /// Points of every predict_points call.
    batches: Vec<Vec<[f64; 2]>>,
    fail_predict: bool,
    truncate_logits: bool,
}

impl FakeModel {
    fn new() -> Self {
        FakeModel { image: None, sizes: vec![], batches: vec![], fail_predict: false, truncate_logits: false }
    }
}

fn colour_index(p: &Rgb<u8>) -> u8 {
    p[0] / 40
}

impl PromptModel for FakeModel {
    fn set_image(&mut self, image: &RgbImage) -> Result<(), AmgError> {
        self.sizes.push(image.dimensions());
        self.image = Some(image.clone());
        Ok(())
    }

    fn predict_points(&mut self, points: &[[f64; 2]]) -> Result<PointMasks, AmgError> {
        if self.fail_predict {
            return Err(AmgError::Model("out of GPU memory".into()));
        }
        self.batches.push(points.to_vec());
        let img = self.image.as_ref().expect("set_image first");
        let (w, h) = (img.width() as usize, img.height() as usize);
        let colours: Vec<u8> = img.pixels().map(colour_index).collect();
        let mut logits = Vec::with_capacity(points.len() * 3 * w * h);
        let mut iou = Vec::new();
        for p in points {
            let k = colours[p[1] as usize * w + p[0] as usize];
            let inside: Vec<bool> = colours.iter().map(|&c| c == k).collect();
            let hard = |v: bool| if v { 5.0 } else { -5.0 };
            if k > 0 {
                let kf = k as f32 * 0.01;
                logits.extend(inside.iter().map(|&v| hard(v)));
                // Widened by one column: inside, or the pixel to the left is.
                logits.extend((0..w * h).map(|i| hard(inside[i] || (i % w > 0 && inside[i - 1]))));
                logits.extend(inside.iter().map(|&v| if v { 0.5 } else { -5.0 }));
                iou.extend([0.9 + kf, 0.88 + kf, 0.99]);
            } else {
                logits.extend(inside.iter().map(|&v| hard(v)));
                logits.extend(std::iter::repeat_n(5.0, w * h));
                logits.extend(std::iter::repeat_n(-5.0, w * h));
                iou.extend([0.5, 0.6, 0.97]);
            }
        }
        if self.truncate_logits {
            logits.pop();
        }
        Ok(PointMasks { height: h, width: w, masks_per_point: 3, logits, iou })
    }
}

/// 200 wide x 120 high; rectangles (x0..x1, y0..y1, exclusive ends):
/// R1 = 30..50 x 25..45 (colour 1), R2 = 90..130 x 50..70 (colour 2),
/// R3 = 150..170 x 85..100 (colour 3).
const RECTS: [[u32; 4]; 3] = [[30, 25, 50, 45], [90, 50, 130, 70], [150, 85, 170, 100]];

fn scene() -> RgbImage {
    RgbImage::from_fn(200, 120, |x, y| {
        for (i, r) in RECTS.iter().enumerate() {
            if (r[0]..r[2]).contains(&x) && (r[1]..r[3]).contains(&y) {
                let c = 40 * (i as u8 + 1);
                return Rgb([c, 255 - c, 7]);
            }
        }
        Rgb([0, 0, 0])
    })
}

fn rect_mask(r: [u32; 4]) -> Mask {
    Mask::from_fn(120, 200, |y, x| (r[0]..r[2]).contains(&x) && (r[1]..r[3]).contains(&y))
}

fn small_cfg() -> AmgConfig {
    AmgConfig { points_per_side: Some(8), ..AmgConfig::default() }
}

fn run(model: &mut FakeModel, cfg: &AmgConfig) -> (Vec<AmgMask>, Vec<(usize, usize)>) {
    let mut calls = Vec::new();
    let masks = generate(model, &scene(), cfg, &mut |d, t| calls.push((d, t))).unwrap();
    (masks, calls)
}

fn check_rect(m: &AmgMask, r: [u32; 4]) {
    assert_eq!(m.segmentation, Rle::encode(&rect_mask(r)));
    assert_eq!(m.segmentation.decode().unwrap(), rect_mask(r));
    assert_eq!(m.area, ((r[2] - r[0]) * (r[3] - r[1])) as u64);
    // SAM's bbox: inclusive corners, so width = (x1 - 1) - x0.
    assert_eq!(m.bbox, [r[0] as f64, r[1] as f64, (r[2] - 1 - r[0]) as f64, (r[3] - 1 - r[1]) as f64]);
    assert_eq!(m.stability_score, 1.0);
}

#[test]
fn generate_single_crop_filters_dedups_and_orders() {
    let mut model = FakeModel::new();
    let (masks, calls) = run(&mut model, &small_cfg());
    // One crop: the full image, 64 points in one batch.
    assert_eq!(model.sizes, vec![(200, 120)]);
    assert_eq!(model.batches.len(), 1);
    assert_eq!(model.batches[0].len(), 64);
    // The grid: (i + 0.5) / 8 of 200 and 120.
    assert_eq!(model.batches[0][0], [12.5, 7.5]);
    assert_eq!(model.batches[0][9], [37.5, 22.5]);
    assert_eq!(calls.first(), Some(&(0, 64)));
    assert_eq!(calls.last(), Some(&(64, 64)));
    // One mask per rectangle, ordered by predicted IoU (R3 0.93, R2 0.92, R1 0.91); the
    // widened masks lost the NMS, the weak/background/empty ones the filters. Among the
    // identical masks of one rectangle the first grid point (row-major) wins the tie.
    assert_eq!(masks.len(), 3, "{masks:#?}");
    let expected_points = [[162.5, 97.5], [112.5, 52.5], [37.5, 37.5]];
    for (i, m) in masks.iter().enumerate() {
        let k = 2 - i;
        check_rect(m, RECTS[k]);
        assert_eq!(m.predicted_iou, 0.9 + (k as f32 + 1.0) * 0.01);
        assert_eq!(m.point_coords, expected_points[i]);
        assert_eq!(m.crop_box, [0, 0, 200, 120]);
    }
}

#[test]
fn generate_is_independent_of_the_batch_size() {
    let (a, _) = run(&mut FakeModel::new(), &small_cfg());
    let mut model = FakeModel::new();
    let cfg = AmgConfig { points_per_batch: 7, ..small_cfg() };
    let (b, calls) = run(&mut model, &cfg);
    assert_eq!(a, b);
    // ceil(64 / 7) = 10 batches, the last with 1 point; progress after each.
    assert_eq!(model.batches.len(), 10);
    assert_eq!(model.batches[9].len(), 1);
    assert_eq!(calls.len(), 11);
    assert_eq!(calls[1], (7, 64));
}

#[test]
fn generate_thresholds_control_the_filters() {
    // pred_iou_thresh 0 and stability 0 switch the filters off.
    let cfg = AmgConfig { pred_iou_thresh: 0.0, stability_score_thresh: 0.0, ..small_cfg() };
    let (masks, _) = run(&mut FakeModel::new(), &cfg);
    let ious: Vec<f32> = masks.iter().map(|m| m.predicted_iou).collect();
    // The weak masks (IoU 0.99, stability 0) now win every rectangle's NMS, in grid order
    // of their first points (R1 in row 2, R2 in row 3, R3 in row 6).
    for (m, k) in masks[..3].iter().zip([0, 1, 2]) {
        assert_eq!(m.predicted_iou, 0.99);
        assert_eq!(m.segmentation.decode().unwrap(), rect_mask(RECTS[k]));
        assert_eq!(m.stability_score, 0.0);
    }
    // Then the empty masks (0.97) of all 60 background points: their boxes are
    // [0, 0, 0, 0], zero area, and torchvision's IoU 0 / 0 = NaN never suppresses, so
    // every one survives (as in SAM), stability NaN, in grid order.
    assert_eq!(masks.len(), 3 + 60 + 1, "{ious:?}");
    for m in &masks[3..63] {
        assert_eq!(m.predicted_iou, 0.97);
        assert_eq!(m.area, 0);
        assert!(m.stability_score.is_nan());
        assert_eq!(m.bbox, [0.0; 4]);
    }
    assert_eq!(masks[3].point_coords, [12.5, 7.5]);
    assert_eq!(masks[4].point_coords, [37.5, 7.5]);
    // Last, one "everything" mask (0.6): the others, and the background masks (0.5, same
    // full-image box), are its duplicates.
    assert_eq!(masks[63].predicted_iou, 0.6);
    assert_eq!(masks[63].area, 200 * 120);
}

#[test]
fn generate_with_a_crop_layer_uncrops_and_prefers_smaller_crops() {
    // crop_n_layers = 1 on 200 x 120: overlap = int(0.3413 * 120) = 40,
    // crop_w = ceil((40 + 200) / 2) = 120, crop_h = ceil((40 + 120) / 2) = 80,
    // crops [0,0,120,80], [0,40,120,120], [80,0,200,80], [80,40,200,120].
    let mut model = FakeModel::new();
    let cfg = AmgConfig { crop_n_layers: 1, ..small_cfg() };
    let (masks, calls) = run(&mut model, &cfg);
    assert_eq!(model.sizes, vec![(200, 120), (120, 80), (120, 80), (120, 80), (120, 80)]);
    assert_eq!(calls.last(), Some(&(320, 320)));
    // Crop grids are scaled by the crop's size: (i + 0.5) / 8 of 120 and 80.
    assert_eq!(model.batches[1][0], [7.5, 5.0]);
    // Per crop: R1 lies inside crop 0 with >= 20 px to its inner edges (kept) and touches
    // crop 1's top edge (dropped); R2 is within 20 px of an inner edge in every crop; R3
    // is kept in crop 3. Across crops, NMS scores are 1 / crop area: the crop copies
    // (1/9600) beat the full-image ones (1/24000), ties in input order (crop 0 before
    // crop 3); the full-image R1 and R3 are duplicates, R2 stays.
    assert_eq!(masks.len(), 3, "{masks:#?}");
    check_rect(&masks[0], RECTS[0]);
    assert_eq!(masks[0].crop_box, [0, 0, 120, 80]);
    // Crop 0's first point on R1: x = 37.5, y = 25 (grid row 2 of 80 px: 2.5 / 8 * 80).
    assert_eq!(masks[0].point_coords, [37.5, 25.0]);
    check_rect(&masks[1], RECTS[2]);
    assert_eq!(masks[1].crop_box, [80, 40, 120, 80]);
    // Crop 3's point (82.5, 45) in crop pixels -> (162.5, 85) in the image.
    assert_eq!(masks[1].point_coords, [162.5, 85.0]);
    check_rect(&masks[2], RECTS[1]);
    assert_eq!(masks[2].crop_box, [0, 0, 200, 120]);
    assert_eq!(masks[2].point_coords, [112.5, 52.5]);
}

#[test]
fn generate_min_region_area_fills_holes_and_reorders() {
    // Punch a one-pixel hole into R1 (at (40, 30), off every grid point).
    let mut image = scene();
    image.put_pixel(40, 30, Rgb([0, 0, 0]));
    let r1 = rect_mask(RECTS[0]);
    let holed = Mask::from_fn(120, 200, |y, x| r1.get(y, x) && (y, x) != (30, 40));
    let masks_of = |min_area: u64| {
        let cfg = AmgConfig { min_mask_region_area: min_area, ..small_cfg() };
        generate(&mut FakeModel::new(), &image, &cfg, &mut |_, _| {}).unwrap()
    };
    // Off: R1 keeps its hole, order by IoU (R3, R2, R1).
    let off = masks_of(0);
    assert_eq!(off.len(), 3);
    assert_eq!(off[2].segmentation.decode().unwrap(), holed);
    assert_eq!(off[2].area, 399);
    // On: the hole is filled; the re-NMS scores unchanged masks 1 and changed ones 0, so
    // R1 now comes last anyway, and R3, R2 keep their order (stable ties).
    let on = masks_of(5);
    assert_eq!(on.len(), 3);
    check_rect(&on[2], RECTS[0]);
    assert_eq!(on[2].predicted_iou, 0.9 + 0.01);
    assert_eq!(on[..2], off[..2]);
    // Islands: a stray pixel of R2's colour far from R2 joins R2's mask; min area 5
    // drops it, and R2 (changed, score 0) moves behind the unchanged R3 and R1.
    let mut image2 = scene();
    image2.put_pixel(5, 110, Rgb([80, 175, 7]));
    let cfg = AmgConfig { min_mask_region_area: 5, ..small_cfg() };
    let masks = generate(&mut FakeModel::new(), &image2, &cfg, &mut |_, _| {}).unwrap();
    assert_eq!(masks.len(), 3);
    check_rect(&masks[0], RECTS[2]);
    check_rect(&masks[1], RECTS[0]);
    check_rect(&masks[2], RECTS[1]);
}

#[test]
fn model_errors_surface_as_errors() {
    let mut model = FakeModel { fail_predict: true, ..FakeModel::new() };
    let err = generate(&mut model, &scene(), &small_cfg(), &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, AmgError::Model(ref m) if m.contains("out of GPU memory")), "{err}");
    // A malformed answer (one logit short) is a model error too, not a panic.
    let mut model = FakeModel { truncate_logits: true, ..FakeModel::new() };
    let err = generate(&mut model, &scene(), &small_cfg(), &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, AmgError::Model(_)), "{err}");

    // Wrong mask size, zero masks per point, a failing set_image.
    struct Bad(u8);
    impl PromptModel for Bad {
        fn set_image(&mut self, _: &RgbImage) -> Result<(), AmgError> {
            if self.0 == 2 {
                return Err(AmgError::Model("no encoder".into()));
            }
            Ok(())
        }
        fn predict_points(&mut self, points: &[[f64; 2]]) -> Result<PointMasks, AmgError> {
            let n = points.len();
            Ok(match self.0 {
                0 => PointMasks {
                    height: 10,
                    width: 10,
                    masks_per_point: 1,
                    logits: vec![0.0; n * 100],
                    iou: vec![0.9; n],
                },
                _ => PointMasks { height: 120, width: 200, masks_per_point: 0, logits: vec![], iou: vec![] },
            })
        }
    }
    for mode in 0..3 {
        let err = generate(&mut Bad(mode), &scene(), &small_cfg(), &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, AmgError::Model(_)), "{err}");
    }
    // An empty image, and one too small for the crops.
    let err = generate(&mut FakeModel::new(), &RgbImage::new(0, 5), &small_cfg(), &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, AmgError::Image(_)), "{err}");
    let cfg = AmgConfig { crop_n_layers: 2, ..small_cfg() };
    let err = generate(&mut FakeModel::new(), &RgbImage::new(2, 2), &cfg, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, AmgError::Image(_)), "{err}");
}

// ---------------------------------------------------------------------------------------
// Config validation and (de)serialization.

#[test]
fn config_validation() {
    assert!(AmgConfig::default().validate().is_ok());
    let bad = |c: AmgConfig, needle: &str| {
        let err = c.validate().unwrap_err();
        assert!(matches!(err, AmgError::Config(_)), "{err}");
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
    };
    let grid = vec![vec![[0.5, 0.5]]];
    let d = AmgConfig::default;
    bad(AmgConfig { point_grids: Some(grid.clone()), ..d() }, "exactly one");
    bad(AmgConfig { points_per_side: None, ..d() }, "exactly one");
    let ok = AmgConfig { points_per_side: None, point_grids: Some(grid.clone()), ..d() };
    assert_eq!(ok.layer_point_grids().unwrap(), grid);
    bad(AmgConfig { crop_n_layers: 1, ..ok.clone() }, "needs 2");
    bad(AmgConfig { point_grids: Some(vec![vec![]]), ..ok.clone() }, "empty");
    bad(AmgConfig { point_grids: Some(vec![vec![[1.5, 0.5]]]), ..ok }, "outside [0, 1]");
    bad(AmgConfig { points_per_batch: 0, ..d() }, "points_per_batch");
    bad(AmgConfig { points_per_side: Some(0), ..d() }, "points_per_side");
    bad(AmgConfig { pred_iou_thresh: 1.5, ..d() }, "pred_iou_thresh");
    bad(AmgConfig { stability_score_thresh: -0.1, ..d() }, "stability_score_thresh");
    bad(AmgConfig { box_nms_thresh: f64::NAN, ..d() }, "box_nms_thresh");
    bad(AmgConfig { crop_nms_thresh: 2.0, ..d() }, "crop_nms_thresh");
    bad(AmgConfig { stability_score_offset: -1.0, ..d() }, "stability_score_offset");
    bad(AmgConfig { mask_threshold: f64::INFINITY, ..d() }, "mask_threshold");
    bad(AmgConfig { crop_overlap_ratio: 1.0, ..d() }, "crop_overlap_ratio");
    bad(AmgConfig { crop_n_points_downscale_factor: 0, ..d() }, "downscale");
    bad(AmgConfig { crop_n_layers: 99, ..d() }, "crop_n_layers");
    // int(2 / 4^1) = 0 points per side in layer 1.
    bad(
        AmgConfig { points_per_side: Some(2), crop_n_layers: 1, crop_n_points_downscale_factor: 4, ..d() },
        "layer 1 gets no points",
    );
    // generate validates first, before touching the model.
    let mut model = FakeModel::new();
    let err = generate(&mut model, &scene(), &AmgConfig { points_per_batch: 0, ..d() }, &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, AmgError::Config(_)));
    assert!(model.sizes.is_empty());
}

#[test]
fn config_serde_defaults_and_exclusive_grids() {
    let c: AmgConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(c, AmgConfig::default());
    assert_eq!(c.points_per_side, Some(32));
    assert_eq!(c.crop_overlap_ratio, 512.0 / 1500.0);
    let c: AmgConfig = serde_json::from_str(r#"{"pred_iou_thresh": 0.5}"#).unwrap();
    assert_eq!(c, AmgConfig { pred_iou_thresh: 0.5, ..AmgConfig::default() });
    // Giving point_grids without points_per_side means points_per_side = None.
    let c: AmgConfig = serde_json::from_str(r#"{"point_grids": [[[0.5, 0.5]]]}"#).unwrap();
    assert_eq!(c.points_per_side, None);
    c.validate().unwrap();
    // Both written: kept as written, and validation says so.
    let c: AmgConfig = serde_json::from_str(r#"{"points_per_side": 4, "point_grids": [[[0.5, 0.5]]]}"#).unwrap();
    assert!(c.validate().is_err());
    let c: AmgConfig = serde_json::from_str(r#"{"points_per_side": null}"#).unwrap();
    assert_eq!(c.points_per_side, None);
    // Unknown fields are errors (typos in a config file).
    assert!(serde_json::from_str::<AmgConfig>(r#"{"points_per_sides": 4}"#).is_err());
    // Round trip, with and without grids.
    for c in [
        AmgConfig::default(),
        AmgConfig { points_per_side: None, point_grids: Some(vec![vec![[0.25, 0.75]]]), ..AmgConfig::default() },
    ] {
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<AmgConfig>(&s).unwrap(), c, "{s}");
    }
}

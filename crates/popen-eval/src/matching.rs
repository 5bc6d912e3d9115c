//! gIoU and cIoU as PixelLM's public evaluation computes them (MaverickRen/PixelLM,
//! `train_ds.py::ar_validate` with `utils/matcher.py::match_pred`).
//!
//! Per question PixelLM:
//! 1. matches the predicted masks to the ground-truth masks with the Hungarian algorithm
//!    (`scipy.optimize.linear_sum_assignment`, rows = predictions) on the cost
//!    `batch_sigmoid_ce_loss + batch_dice_loss` (the `cost_mask = cost_dice = 5` weights in
//!    `match_pred` are overwritten before use, so both terms weigh 1);
//! 2. lists the pairs: matched pairs in prediction order, then every unmatched ground truth
//!    with an empty prediction, then every unmatched prediction with an empty ground truth;
//! 3. scores each pair with `intersection / (union + 1e-5)`, plus 1 when the union is empty
//!    (`acc_iou[union_i == 0] += 1.0`);
//! 4. adds the pair IoUs of the image and its pair count `max_num` to an average meter.
//!
//! So gIoU = (sum of all pair IoUs) / (number of pairs) over the split: a mean over *pairs*,
//! not over images (SPEC 8's "mean over images" is LISA's single-target convention; with one
//! target per question the two agree). cIoU = total intersection / (total union + 1e-10).
//! The report also gives the per-sample mean (`giou_per_sample`) for comparison.
//!
//! Deviations, all because our predictions are binary RLE masks rather than logit maps:
//! - The matching cost reads a binary mask as logits `+L` (foreground) / `-L` (background),
//!   `L` = [`DEFAULT_MATCH_LOGIT`] unless configured, where PixelLM has the decoder's logits.
//! - The cost is evaluated on every pixel instead of 12,544 random points (`point_sample` of
//!   `torch.rand` coordinates): deterministic, and the sampled cost's expectation. Both
//!   terms then depend only on the areas and the intersection, see [`match_cost`].
//! - PixelLM's MUSE loader puts all questions of an image in one item and divides by
//!   `max(total predictions, total targets)` of the image; a sample here is one question,
//!   so the divisor is its pair count `max(P, G)`. They differ only for an image where one
//!   question over- and another under-predicts.
//! - Sums are f64 (PixelLM accumulates f32 on the GPU).
//!
//! A sample with neither predictions nor targets has no pairs and does not enter gIoU
//! (PixelLM would divide 0 by 0; MUSE has no such question).
//!
//! `tests/eval.rs` checks all of it against `tools/reference/pixellm_eval.py`, a numpy/SciPy
//! transcription of the two PixelLM functions.

use crate::error::{EvalError, Result};
use crate::hungarian::linear_sum_assignment;
use popen_core::mask::Rle;
use serde::{Deserialize, Serialize};

/// Magnitude of the logits a binary mask stands for in the matching cost
/// (sigmoid(10) = 0.99995).
pub const DEFAULT_MATCH_LOGIT: f64 = 10.0;
/// PixelLM's per-pair IoU denominator epsilon (`intersection_i / (union_i + 1e-5)`).
pub const PIXELLM_PAIR_EPS: f64 = 1e-5;
/// PixelLM's cIoU denominator epsilon (`intersection_meter.sum / (union_meter.sum + 1e-10)`).
pub const PIXELLM_CIOU_EPS: f64 = 1e-10;

/// `log(1 + exp(x))`, stable for large |x|.
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// PixelLM's matching cost of one predicted mask against one ground-truth mask:
/// `batch_sigmoid_ce_loss + batch_dice_loss` with the prediction as logits `±logit`, over
/// all `pixels` pixels. With `P`, `G` the areas, `I` the intersection and `N` the pixels:
///
/// - CE  = [I·sp(-L) + (G-I)·sp(L) + (P-I)·sp(L) + (N-P-G+I)·sp(-L)] / N, sp = softplus
///   (`binary_cross_entropy_with_logits` against 1 on target pixels, 0 elsewhere);
/// - DICE = 1 - (2·[I·σ(L) + (G-I)·σ(-L)] + 1) / (P·σ(L) + (N-P)·σ(-L) + G + 1).
pub fn match_cost(pred_area: u64, gt_area: u64, intersection: u64, pixels: u64, logit: f64) -> f64 {
    let (p, g, i, n) = (pred_area as f64, gt_area as f64, intersection as f64, pixels as f64);
    let (sp_hit, sp_miss) = (softplus(-logit), softplus(logit));
    let (s_on, s_off) = (1.0 / (1.0 + (-logit).exp()), 1.0 / (1.0 + logit.exp()));
    let ce = (i * sp_hit + (g - i) * sp_miss + (p - i) * sp_miss + (n - p - g + i) * sp_hit) / n;
    let dice = 1.0 - (2.0 * (i * s_on + (g - i) * s_off) + 1.0) / (p * s_on + (n - p) * s_off + g + 1.0);
    ce + dice
}

/// One evaluated pair: a prediction and a ground truth, either of which may be missing
/// (PixelLM's empty mask).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    /// Index of the prediction (its `<seg>`), or None for an unmatched ground truth.
    pub pred: Option<usize>,
    /// Index of the ground-truth target, or None for an unmatched prediction.
    pub gt: Option<usize>,
    pub intersection: u64,
    pub union: u64,
    /// [`pixellm_pair_iou`] of the two counts.
    pub iou: f64,
}

impl Pair {
    pub fn is_matched(&self) -> bool {
        self.pred.is_some() && self.gt.is_some()
    }
}

/// PixelLM's IoU of one pair: `i / (u + 1e-5)`, and 1 when the union is empty.
pub fn pixellm_pair_iou(intersection: u64, union: u64) -> f64 {
    let base = intersection as f64 / (union as f64 + PIXELLM_PAIR_EPS);
    if union == 0 {
        base + 1.0
    } else {
        base
    }
}

/// The row-major `preds x gts` matrix of [`match_cost`]. All masks must have one size.
pub fn cost_matrix(preds: &[Rle], gts: &[Rle], logit: f64) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(preds.len() * gts.len());
    for (pi, p) in preds.iter().enumerate() {
        let pixels = p.height as u64 * p.width as u64;
        for (gi, g) in gts.iter().enumerate() {
            let (i, _) = p
                .intersection_union(g)
                .map_err(|e| EvalError::Invalid(format!("prediction {pi} vs target {gi}: {e}")))?;
            out.push(match_cost(p.area(), g.area(), i, pixels, logit));
        }
    }
    Ok(out)
}

/// PixelLM's pairs of one question: Hungarian matching on [`cost_matrix`], then matched
/// pairs by prediction index, unmatched targets (with an empty prediction) by target index,
/// unmatched predictions (with an empty target) by prediction index. `max(P, G)` pairs.
pub fn match_masks(preds: &[Rle], gts: &[Rle], logit: f64) -> Result<Vec<Pair>> {
    let cost = cost_matrix(preds, gts, logit)?;
    let assignment = linear_sum_assignment(&cost, preds.len(), gts.len())?;
    let mut pairs = Vec::with_capacity(preds.len().max(gts.len()));
    let mut gt_used = vec![false; gts.len()];
    let mut pred_used = vec![false; preds.len()];
    for &(p, g) in &assignment {
        let (i, u) = preds[p].intersection_union(&gts[g])?;
        pairs.push(Pair { pred: Some(p), gt: Some(g), intersection: i, union: u, iou: pixellm_pair_iou(i, u) });
        pred_used[p] = true;
        gt_used[g] = true;
    }
    for (g, m) in gts.iter().enumerate().filter(|(g, _)| !gt_used[*g]) {
        let u = m.area();
        pairs.push(Pair { pred: None, gt: Some(g), intersection: 0, union: u, iou: pixellm_pair_iou(0, u) });
    }
    for (p, m) in preds.iter().enumerate().filter(|(p, _)| !pred_used[*p]) {
        let u = m.area();
        pairs.push(Pair { pred: Some(p), gt: None, intersection: 0, union: u, iou: pixellm_pair_iou(0, u) });
    }
    Ok(pairs)
}

/// Running sums for gIoU and cIoU over any set of questions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IouTotals {
    pub pairs: u64,
    pub iou_sum: f64,
    pub intersection: u64,
    pub union: u64,
}

impl IouTotals {
    pub fn add(&mut self, pairs: &[Pair]) {
        for p in pairs {
            self.pairs += 1;
            self.iou_sum += p.iou;
            self.intersection += p.intersection;
            self.union += p.union;
        }
    }

    /// PixelLM's gIoU: mean pair IoU; None without pairs.
    pub fn giou(&self) -> Option<f64> {
        (self.pairs > 0).then(|| self.iou_sum / self.pairs as f64)
    }

    /// PixelLM's cIoU: total intersection / (total union + 1e-10) (0 without any union).
    pub fn ciou(&self) -> f64 {
        self.intersection as f64 / (self.union as f64 + PIXELLM_CIOU_EPS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use popen_core::mask::Mask;

    fn rect(h: u32, w: u32, y0: u32, y1: u32, x0: u32, x1: u32) -> Rle {
        Rle::encode(&Mask::from_fn(h, w, |y, x| y >= y0 && y < y1 && x >= x0 && x < x1))
    }

    /// The closed form against a literal per-pixel evaluation of PixelLM's two cost terms.
    #[test]
    fn cost_closed_form_equals_pixel_sum() {
        let (h, w) = (7u32, 9u32);
        let p = Mask::from_fn(h, w, |y, x| (x + 2 * y) % 5 < 2);
        let g = Mask::from_fn(h, w, |y, x| x > 3 && y > 1);
        let l = 3.0f64;
        let n = (h * w) as f64;
        let (mut ce, mut num, mut sig_sum, mut t_sum) = (0.0, 0.0, 0.0, 0.0);
        for (&pv, &gv) in p.data().iter().zip(g.data()) {
            let x = if pv == 1 { l } else { -l };
            let t = gv as f64;
            // binary_cross_entropy_with_logits(x, 1) and (x, 0)
            let pos = softplus(-x);
            let neg = softplus(x);
            ce += pos * t + neg * (1.0 - t);
            let s = 1.0 / (1.0 + (-x).exp());
            num += s * t;
            sig_sum += s;
            t_sum += t;
        }
        let want = ce / n + 1.0 - (2.0 * num + 1.0) / (sig_sum + t_sum + 1.0);
        let (i, _) = popen_core::mask::intersection_union(&p, &g).unwrap();
        let got = match_cost(p.area(), g.area(), i, h as u64 * w as u64, l);
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn hand_computed_pairs_and_totals() {
        let (h, w) = (10, 10);
        let g0 = rect(h, w, 0, 4, 0, 4); // 16 px
        let g1 = rect(h, w, 6, 10, 6, 10); // 16 px
        let p_a = rect(h, w, 6, 10, 5, 10); // 20 px, 16 on g1
        let p_b = rect(h, w, 0, 2, 0, 4); // 8 px inside g0
        let p_c = rect(h, w, 4, 6, 4, 6); // 4 px, overlaps nothing
                                          // two predictions, two targets: a->g1, b->g0, listed by prediction index
        let pairs = match_masks(&[p_a.clone(), p_b.clone()], &[g0.clone(), g1.clone()], DEFAULT_MATCH_LOGIT).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!((pairs[0].pred, pairs[0].gt, pairs[0].intersection, pairs[0].union), (Some(0), Some(1), 16, 20));
        assert_eq!((pairs[1].pred, pairs[1].gt, pairs[1].intersection, pairs[1].union), (Some(1), Some(0), 8, 16));
        assert!((pairs[0].iou - 16.0 / (20.0 + 1e-5)).abs() < 1e-15);
        // one extra prediction: unmatched prediction with an empty target, IoU 0
        let pairs = match_masks(&[p_c.clone(), p_a.clone()], std::slice::from_ref(&g1), DEFAULT_MATCH_LOGIT).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!((pairs[0].pred, pairs[0].gt), (Some(1), Some(0)));
        assert_eq!((pairs[1].pred, pairs[1].gt, pairs[1].intersection, pairs[1].union), (Some(0), None, 0, 4));
        assert_eq!(pairs[1].iou, 0.0);
        // no prediction: each target pairs with an empty prediction
        let pairs = match_masks(&[], &[g0.clone(), g1.clone()], DEFAULT_MATCH_LOGIT).unwrap();
        assert_eq!(
            pairs.iter().map(|p| (p.pred, p.gt, p.union)).collect::<Vec<_>>(),
            vec![(None, Some(0), 16), (None, Some(1), 16)]
        );
        // empty target and empty prediction: union 0, IoU 1
        let e = Rle::empty(h, w).unwrap();
        let pairs = match_masks(std::slice::from_ref(&e), std::slice::from_ref(&e), DEFAULT_MATCH_LOGIT).unwrap();
        assert_eq!(pairs[0].iou, 1.0);
        // unmatched empty target with no prediction also scores 1 (PixelLM's no-object rule)
        let pairs = match_masks(&[], &[e], DEFAULT_MATCH_LOGIT).unwrap();
        assert_eq!((pairs[0].union, pairs[0].iou), (0, 1.0));

        let mut t = IouTotals::default();
        t.add(&match_masks(&[p_a, p_b], &[g0, g1], DEFAULT_MATCH_LOGIT).unwrap());
        t.add(&pairs);
        assert_eq!((t.pairs, t.intersection, t.union), (3, 24, 36));
        let want = (16.0 / (20.0 + 1e-5) + 8.0 / (16.0 + 1e-5) + 1.0) / 3.0;
        assert!((t.giou().unwrap() - want).abs() < 1e-15);
        assert!((t.ciou() - 24.0 / (36.0 + 1e-10)).abs() < 1e-15);
        assert_eq!(IouTotals::default().giou(), None);
        assert_eq!(IouTotals::default().ciou(), 0.0);
    }

    #[test]
    fn size_mismatch_is_an_error() {
        let e = match_masks(&[rect(4, 4, 0, 1, 0, 1)], &[rect(5, 4, 0, 1, 0, 1)], 10.0).unwrap_err();
        assert!(e.to_string().contains("prediction 0 vs target 0"), "{e}");
    }
}

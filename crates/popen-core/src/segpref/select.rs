//! Scores and curriculum selection of collect-ps (SPEC section 4, Algorithm 1; SPEC 10.3-10.5).
//!
//! For one sample with ground-truth masks `M_g^n` and class-agnostic proposals `M_s^j`, each
//! perturbed image `i` gives one predicted mask per target, `M^{n,i}`:
//! - Eq. 1: `s^i = mean_n [ IoU(M^{n,i}, M_g^n) - max_{j: M_s^j is not M_g^n} IoU(M^{n,i}, M_s^j) ]`
//!   where "`M_s^j` is `M_g^n`" means IoU(M_s^j, M_g^n) >= 0.5 and an empty max is 0;
//! - `b^i = mean_n BoundaryIoU(M^{n,i}, M_g^n)` (dilation 2% of the image diagonal);
//! - phase 1 accepts a batch when `min_i s^i < 0` and `max_i s^i > 0.8` and keeps the images
//!   with the highest, median and lowest `s^i`; otherwise a new batch is drawn, at most
//!   `max_regenerations` times, then the sample is skipped with its reason;
//! - phase 2 takes the 5 images with the highest `s^i` and keeps those with the highest,
//!   median and lowest `b^i`;
//! - `L_s^n`: the kept images ordered best-first by target n's own term (phase 1: its Eq. 1
//!   term, phase 2: its boundary IoU).
//!
//! Orders are deterministic: ties go to the lower index. The median of `k` sorted values is
//! the one at position `(k - 1) / 2` from the best.

use crate::mask::{boundary_iou, iou, Mask};
use serde::{Deserialize, Serialize};

use crate::{CoreError, Result};

/// Scoring and selection settings (SPEC 4.6, 10.3-10.5 defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    /// A proposal with IoU >= this against `M_g^n` is that object (excluded from the max).
    pub same_object_iou: f64,
    /// Boundary IoU band width as a fraction of the image diagonal.
    pub boundary_dilation: f64,
    /// Phase 1 accepts a batch only if its lowest `s^i` is below this...
    pub phase1_min_below: f64,
    /// ...and its highest `s^i` above this.
    pub phase1_max_above: f64,
    /// Phase 2 chooses among this many images with the highest `s^i`.
    pub phase2_top: usize,
    /// Phase 1: new batches drawn after the first before the sample is skipped.
    pub max_regenerations: u32,
}

impl Default for SelectConfig {
    fn default() -> Self {
        SelectConfig {
            same_object_iou: 0.5,
            boundary_dilation: 0.02,
            phase1_min_below: 0.0,
            phase1_max_above: 0.8,
            phase2_top: 5,
            max_regenerations: 5,
        }
    }
}

impl SelectConfig {
    /// Phase 2 keeps three images (highest, median and lowest `b^i`) of its top
    /// `phase2_top`, so fewer than 3 is refused rather than silently raised to 3.
    pub fn validate(&self) -> Result<()> {
        if self.phase2_top < 3 {
            return Err(CoreError::Invalid(format!(
                "select.phase2_top must be at least 3 (phase 2 keeps 3 images of its top phase2_top), got {}",
                self.phase2_top
            )));
        }
        Ok(())
    }
}

/// Curriculum phase of the preference data (`--phase 1|2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    One,
    Two,
}

/// The ground truth of one sample, with the proposals that count as "other objects" for
/// each target precomputed.
pub struct Targets<'m> {
    gt: &'m [Mask],
    proposals: &'m [Mask],
    /// Per target, the proposals that are not that target.
    others: Vec<Vec<usize>>,
    dilation: f64,
}

impl<'m> Targets<'m> {
    pub fn new(gt: &'m [Mask], proposals: &'m [Mask], cfg: &SelectConfig) -> Result<Self> {
        if gt.is_empty() {
            return Err(CoreError::Invalid("a sample without target masks cannot be scored".into()));
        }
        let mut others = Vec::with_capacity(gt.len());
        for (n, g) in gt.iter().enumerate() {
            let mut o = Vec::new();
            for (j, p) in proposals.iter().enumerate() {
                let v = iou(p, g).map_err(|e| CoreError::Invalid(format!("proposal {j} vs target {n}: {e}")))?;
                if v < cfg.same_object_iou {
                    o.push(j);
                }
            }
            others.push(o);
        }
        Ok(Targets { gt, proposals, others, dilation: cfg.boundary_dilation })
    }

    pub fn len(&self) -> usize {
        self.gt.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gt.is_empty()
    }

    /// Scores one perturbed image's predicted masks (one per target, in target order).
    pub fn score(&self, pred: &[Mask]) -> Result<Scored> {
        if pred.len() != self.gt.len() {
            return Err(CoreError::Invalid(format!("{} predicted masks for {} targets", pred.len(), self.gt.len())));
        }
        let (mut s_terms, mut b_terms) = (Vec::with_capacity(pred.len()), Vec::with_capacity(pred.len()));
        for (n, (p, g)) in pred.iter().zip(self.gt).enumerate() {
            let err = |e: CoreError| CoreError::Invalid(format!("target {n}: {e}"));
            let on_target = iou(p, g).map_err(err)?;
            let mut worst = 0.0f64;
            for &j in &self.others[n] {
                worst = worst.max(iou(p, &self.proposals[j]).map_err(err)?);
            }
            s_terms.push(on_target - worst);
            b_terms.push(boundary_iou(p, g, self.dilation).map_err(err)?);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        Ok(Scored { s: mean(&s_terms), b: mean(&b_terms), s_terms, b_terms })
    }
}

/// Scores of one perturbed image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// Eq. 1's `s^i` and its per-target terms.
    pub s: f64,
    pub s_terms: Vec<f64>,
    /// `b^i` and the per-target boundary IoUs.
    pub b: f64,
    pub b_terms: Vec<f64>,
}

/// Three kept images and the per-target rankings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// Indices into the scored batch: (highest, median, lowest) of the phase's criterion.
    pub kept: [usize; 3],
    /// `L_s^n` for each target: positions in `kept` (0, 1, 2), best first.
    pub rankings: Vec<[usize; 3]>,
}

/// Indices of `values` best first (descending; ties to the lower index).
fn order_desc(values: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx
}

/// (highest, median, lowest) of an order, best first.
fn extremes(order: &[usize]) -> [usize; 3] {
    [order[0], order[(order.len() - 1) / 2], order[order.len() - 1]]
}

fn rankings(scored: &[Scored], kept: [usize; 3], phase: Phase) -> Vec<[usize; 3]> {
    let targets = scored[kept[0]].s_terms.len();
    (0..targets)
        .map(|n| {
            let term = |i: usize| match phase {
                Phase::One => scored[i].s_terms[n],
                Phase::Two => scored[i].b_terms[n],
            };
            let vals: Vec<f64> = kept.iter().map(|&i| term(i)).collect();
            let o = order_desc(&vals);
            [o[0], o[1], o[2]]
        })
        .collect()
}

fn check(scored: &[Scored], need: usize) -> Result<()> {
    if scored.len() < need {
        return Err(CoreError::Invalid(format!("selection needs at least {need} scored images, got {}", scored.len())));
    }
    let t = scored[0].s_terms.len();
    if scored.iter().any(|s| s.s_terms.len() != t || s.b_terms.len() != t) {
        return Err(CoreError::Invalid("scored images disagree on the number of targets".into()));
    }
    Ok(())
}

/// Phase 1 on one batch: `None` when the batch does not qualify (regenerate).
pub fn select_phase1(scored: &[Scored], cfg: &SelectConfig) -> Result<Option<Selection>> {
    check(scored, 3)?;
    let s: Vec<f64> = scored.iter().map(|x| x.s).collect();
    let (min, max) = s.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if !(min < cfg.phase1_min_below && max > cfg.phase1_max_above) {
        return Ok(None);
    }
    let kept = extremes(&order_desc(&s));
    Ok(Some(Selection { kept, rankings: rankings(scored, kept, Phase::One) }))
}

/// Phase 2 on one batch: among the `phase2_top` highest `s^i`, the highest, median and
/// lowest `b^i`.
pub fn select_phase2(scored: &[Scored], cfg: &SelectConfig) -> Result<Selection> {
    cfg.validate()?;
    check(scored, 3)?;
    let s: Vec<f64> = scored.iter().map(|x| x.s).collect();
    let top: Vec<usize> = order_desc(&s).into_iter().take(cfg.phase2_top).collect();
    let b: Vec<f64> = top.iter().map(|&i| scored[i].b).collect();
    // Ties in b go to the better s (earlier in `top`).
    let by_b: Vec<usize> = order_desc(&b).into_iter().map(|k| top[k]).collect();
    let kept = extremes(&by_b);
    Ok(Selection { kept, rankings: rankings(scored, kept, Phase::Two) })
}

/// Outcome of selecting one sample.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Batch `batch` (0 = the first draw) was used.
    Selected { batch: u32, selection: Selection, scored: Vec<Scored> },
    /// No batch qualified within the cap; `batches` were drawn.
    Skipped { batches: u32, reason: String },
}

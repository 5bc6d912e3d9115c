//! Boundary quality and target localization error of matched predictions (SPEC 8).
//!
//! Target localization error (paper, supplementary "target localization precision"; SPEC 8):
//! a predicted object mask matched to a ground truth is an error when its IoU with it is low
//! (`IoU_g < 0.75`) while it overlaps another object (`IoU_o > 0.25`), `IoU_o` being the
//! largest IoU with the masks of the image's other objects. The rate `p` is "the proportion of
//! such wrongly-located objects among all objects" of the split (SPEC 10.20): the report's
//! `localization_error_rate` divides by every ground-truth target, an unmatched one included;
//! `localization_error_rate_matched` (the definition before issue 24) by the matched pairs. The other objects are, by default, the sample's annotated instances except the
//! matched target's own (`target_instances`); when class-agnostic proposals (SAM automatic
//! masks) are given, they are the proposals that do not correspond to the target, i.e. whose
//! IoU with the target mask is below 0.5 (SPEC 10.3). No other object gives `IoU_o = 0`.
//! IoUs here are exact (`popen_core::mask`, two empty masks = 1), not PixelLM's epsilon form.

use crate::error::Result;
use popen_core::mask::{iou_from_counts, Rle};
use serde::{Deserialize, Serialize};

/// Thresholds of the localization error (paper: 0.75 and 0.25) and of "corresponds to the
/// target" for proposals (SPEC 10.3: 0.5).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalizationConfig {
    /// A matched prediction is a localization error only if its IoU with its target is below this.
    pub iou_target_below: f64,
    /// ... and its largest IoU with another object is above this.
    pub iou_other_above: f64,
    /// A proposal with at least this IoU with the target is the target itself.
    pub proposal_target_iou: f64,
}

impl Default for LocalizationConfig {
    fn default() -> Self {
        LocalizationConfig { iou_target_below: 0.75, iou_other_above: 0.25, proposal_target_iou: 0.5 }
    }
}

/// Exact IoU of two RLEs.
pub fn iou(a: &Rle, b: &Rle) -> Result<f64> {
    let (i, u) = a.intersection_union(b)?;
    Ok(iou_from_counts(i, u))
}

/// Largest IoU of `pred` with any of `others`; 0 when there are none.
pub fn max_iou_with<'a>(pred: &Rle, others: impl IntoIterator<Item = &'a Rle>) -> Result<f64> {
    let mut best = 0.0f64;
    for o in others {
        best = best.max(iou(pred, o)?);
    }
    Ok(best)
}

/// The instance masks of an image other than the target's own instance
/// (`own_instance` = `target_instances[i]`, -1 when the target is not a listed instance).
pub fn other_instances(instance_masks: &[Rle], own_instance: i32) -> impl Iterator<Item = &Rle> {
    instance_masks.iter().enumerate().filter(move |(k, _)| *k as i64 != own_instance as i64).map(|(_, m)| m)
}

/// The proposals that are not the target: IoU with `target` below `cfg.proposal_target_iou`.
pub fn other_proposals<'a>(proposals: &'a [Rle], target: &Rle, cfg: &LocalizationConfig) -> Result<Vec<&'a Rle>> {
    let mut out = Vec::new();
    for p in proposals {
        if iou(p, target)? < cfg.proposal_target_iou {
            out.push(p);
        }
    }
    Ok(out)
}

/// The localization-error test of one matched prediction.
pub fn is_localization_error(iou_target: f64, iou_other: f64, cfg: &LocalizationConfig) -> bool {
    iou_target < cfg.iou_target_below && iou_other > cfg.iou_other_above
}

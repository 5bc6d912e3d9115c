//! Scores and curriculum selection of collect-ps (SPEC section 4, Algorithm 1): the scores,
//! the phase rules and their settings are [`popen_core::segpref::select`] (dpo's phase-1
//! indicator reads them too); the builder's regeneration loop is here.

pub use popen_core::segpref::select::*;

use crate::Result;

/// Algorithm 1's selection with conditional regeneration: `draw(batch)` scores batch
/// `batch` (perturb, predict, score). Phase 1 draws again while the batch does not qualify,
/// at most `max_regenerations` times; phase 2 uses the first batch.
pub fn select_with_regeneration(
    phase: Phase,
    cfg: &SelectConfig,
    mut draw: impl FnMut(u32) -> Result<Vec<Scored>>,
) -> Result<Outcome> {
    let mut last = (f64::NAN, f64::NAN);
    for batch in 0..=cfg.max_regenerations {
        let scored = draw(batch)?;
        let selection = match phase {
            Phase::One => select_phase1(&scored, cfg)?,
            Phase::Two => Some(select_phase2(&scored, cfg)?),
        };
        if let Some(selection) = selection {
            return Ok(Outcome::Selected { batch, selection, scored });
        }
        let s = scored.iter().map(|x| x.s);
        last = (s.clone().fold(f64::INFINITY, f64::min), s.fold(f64::NEG_INFINITY, f64::max));
    }
    Ok(Outcome::Skipped {
        batches: cfg.max_regenerations + 1,
        reason: format!(
            "phase 1: no batch had min s < {} and max s > {} in {} draws (last batch: min {:.3}, max {:.3})",
            cfg.phase1_min_below,
            cfg.phase1_max_above,
            cfg.max_regenerations + 1,
            last.0,
            last.1
        ),
    })
}

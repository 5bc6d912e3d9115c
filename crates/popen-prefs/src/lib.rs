//! popen's preference-data builder (SPEC sections 3, 4 and 10).
//!
//! - [`collect_ps`]: the collect-ps stage (model, perturbations, selection, `seg-pref/1`).
//! - [`corrector`]: the offline corrector and the [`corrector::Corrector`] trait.
//! - [`diff`]: RLHF-V's changed-token positions `L_y` / `L_yc` from a port of Python's
//!   `difflib.SequenceMatcher` (matching blocks, autojunk included), checked against
//!   difflib itself on committed fixtures.
//! - [`noise`]: the noise-filling perturbations of collect-ps as rebuildable recipes.
//! - [`select`]: Eq. 1's localization score, the boundary score and Algorithm 1's curriculum
//!   selection (phase 1 with conditional regeneration, phase 2) and the per-target rankings
//!   `L_s^n`.

pub mod collect_ps;
pub mod collect_pt;
pub mod corrector;
pub mod diff;
pub mod noise;
pub mod select;

#[derive(Debug, thiserror::Error)]
pub enum PrefsError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Core(#[from] popen_core::CoreError),
}

pub type Result<T, E = PrefsError> = std::result::Result<T, E>;

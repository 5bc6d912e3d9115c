//! popen inference: everything that runs a trained model without training it.
//!
//! - [`predict`]: `popen predict`, greedy (or teacher-forced, or ensemble) answers and masks
//!   for every sample of a shard, written as a predictions shard with its manifest.
//! - [`ensemble`]: POPEN's preference-based ensemble (SPEC 6-7): K sampled answers, the text
//!   pass and the segmentation pass (`popen predict --ensemble K`, `popen infer --ensemble K`),
//!   and the sequence layouts popen-train's `ensemble-train` reuses, so training and
//!   inference build the same sequences.
//! - [`scores`]: the tau/eta preference scores and the attention bias gamma (Eqs. 5-6).
//! - [`sam_cache`]: the frozen SAM encoder's image embeddings (tiny-sam), computed once per
//!   image and optionally kept on disk; prediction and the training stages share them.
//!
//! The model itself (PixelLM, batched generation, [`popen_model::infer::Predictor`]) is
//! popen-model's; the training stages and their losses (SFT, DPO, ensemble-train, L_ti and
//! L_si) are popen-train's, which depends on this crate, never the other way round.

pub mod ensemble;
pub mod predict;
pub mod sam_cache;
pub mod scores;

use std::path::PathBuf;

/// Errors of inference; each names the file, record or setting involved. The messages are
/// those of the `popen_train::TrainError` variants of the same names.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error("config: {0}")]
    Config(String),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("data: {0}")]
    Data(String),
    #[error("model: {0}")]
    Model(#[from] popen_model::pixellm::PixelLmError),
    #[error("shard: {0}")]
    Core(#[from] popen_core::CoreError),
}

pub type Result<T> = std::result::Result<T, InferError>;

pub(crate) fn io_err(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> InferError {
    InferError::Io { path: path.into(), message: e.to_string() }
}

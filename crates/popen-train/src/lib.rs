//! popen trainer: the SFT stage (PixelLM's recipe), the pieces every training stage shares
//! (optimizer and schedule, losses, global-norm clipping, parameter selection and LoRA,
//! checkpoints that resume exactly, metrics files and the loss curve), the preference stage
//! (`dpo`: `popen dpo`, its losses in `dpo_loss`: SPEC Eqs. 2-4) and the ensemble's training
//! (`ensemble_train`: `popen ensemble-train`, its losses L_ti and L_si in `ensemble_loss`).
//!
//! Inference is popen-infer's: prediction shards (`popen predict`), the ensemble's inference,
//! the tau/eta scores and gamma (Eqs. 5-6) and the frozen SAM encoder's embedding cache. The
//! training stages call them from there; `popen_train::{ensemble, predict}`,
//! `ensemble_loss::{token_scores, ..}` and `stage::{SamMemo, ..}` re-export them.
//!
//! Built on burn-train's step abstraction ([`burn::train::TrainStep`] / `TrainOutput`) and
//! burn-optim's AdamW; the loop itself is ours ([`train_loop`], one for all three stages,
//! each plugging in its step), because a stage must resume bit for bit (same data order,
//! optimizer state, RNG) from an atomically written checkpoint, which burn-train's `Learner`
//! does not promise.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dpo;
pub mod dpo_loss;
pub mod ensemble_loss;
pub mod ensemble_train;
pub mod loss;
pub mod metrics;
pub mod params;
pub mod schedule;
pub mod sft;
pub mod stage;
pub mod train_loop;

pub use config::{SftConfig, Trainable};
// Inference lives in popen-infer; these paths are kept for the stages' callers and tests.
pub use popen_infer::{ensemble, predict};

use std::path::PathBuf;

/// Errors of the training stages; each names the file, record or step involved.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
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
    #[error(
        "step {step}: the loss is {value} (ce {ce}, bce {bce}, dice {dice}); training stopped, the last good checkpoint is {last_checkpoint}"
    )]
    NonFinite { step: usize, value: f32, ce: f32, bce: f32, dice: f32, last_checkpoint: String },
    #[error(
        "step {step}: the loss is {value} ({parts}); training stopped, the last good checkpoint is {last_checkpoint}"
    )]
    NonFiniteLoss { step: usize, value: f32, parts: String, last_checkpoint: String },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// An inference error becomes the training error of the same name (same message).
impl From<popen_infer::InferError> for TrainError {
    fn from(e: popen_infer::InferError) -> Self {
        use popen_infer::InferError as I;
        match e {
            I::Config(m) => TrainError::Config(m),
            I::Io { path, message } => TrainError::Io { path, message },
            I::Data(m) => TrainError::Data(m),
            I::Model(e) => TrainError::Model(e),
            I::Core(e) => TrainError::Core(e),
        }
    }
}

pub(crate) fn io_err(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io { path: path.into(), message: e.to_string() }
}

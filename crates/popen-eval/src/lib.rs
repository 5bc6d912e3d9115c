//! popen eval: scores a model's answers on a reasoning-segmentation split (SPEC 8).
//!
//! - [`matching`]: gIoU and cIoU exactly as PixelLM's public evaluation (Hungarian matching
//!   of predicted to ground-truth masks, [`hungarian`]), with the deviations it documents.
//! - [`chair`]: CHAIR C_S and C_I (Eq. 7) with the benchmark's or COCO's lexicon.
//! - [`localization`]: Boundary IoU of matched pairs and the target localization error rate.
//! - [`judge`]: the optional LLM-judge score (paper's prompt), off by default.
//! - [`baseline`]: trivial predictors (nothing; the largest instance).
//! - [`report`]: [`evaluate`] (samples + predictions -> [`Report`]), JSON and Markdown.
//!
//! From Rust: read the two shards, load a [`Lexicon`], call
//! `evaluate(&EvalConfig::default(), EvalInputs { samples, predictions, lexicon, proposals: None, judge: None })`.

pub mod baseline;
pub mod chair;
pub mod error;
pub mod hungarian;
pub mod judge;
pub mod localization;
pub mod matching;
pub mod report;

pub use baseline::Baseline;
pub use chair::{ChairTruth, Lexicon};
pub use error::{EvalError, Result};
pub use judge::{Judge, JudgeConfig};
pub use report::{aggregate, align, evaluate, score_sample, EvalConfig, EvalInputs, Report, SampleScores};

//! popen core: everything the stages share.
//!
//! - [`shard`]: the Parquet shard schemas (samples, predictions; preference records arrive
//!   with their stages), atomic writes, readers that name file, row and column.
//! - [`manifest`]: the small JSON manifest every stage writes beside its shards.
//! - [`assign`]: the linear sum assignment (Hungarian) solver with SciPy's tie-breaking.
//! - [`mask`]: binary masks, COCO RLE (bit-compatible with pycocotools), polygon
//!   rasterization, IoU and Boundary IoU.
//! - [`imageio`]: image bytes in and out, with errors that name the record.
//! - [`progress`]: the shared progress-bar style.
//! - [`chat`]: a blocking client for OpenAI-compatible chat-completion endpoints.
//! - [`guard`]: output locks, refusing an output that is an input, stale temp files.
//! - [`shardspec`]: `--shard I/N` selection for cluster job arrays.
//! - [`cluster`]: the Slurm submission plan (`popen cluster submit`); merging a job array's
//!   shards is [`shard::merge`].

pub mod assign;
pub mod chat;
pub mod cluster;
pub mod config_text;
pub mod error;
pub mod guard;
pub mod imageio;
pub mod lexicon;
pub mod manifest;
pub mod mask;
pub mod progress;
pub mod segpref;
pub mod shard;
pub mod shardspec;

pub use error::{CoreError, Result};

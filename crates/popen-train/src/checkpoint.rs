//! Training checkpoints that resume exactly.
//!
//! ```text
//! OUT/checkpoints/step-000500/model.safetensors   every parameter (LoRA adapters included)
//!                            /optimizer.bin       burn record of the optimizer state
//!                            /state.json          step, config, parameter ids (written last)
//! ```
//!
//! A checkpoint is written into `step-000500.partial-<pid>` and renamed into place when
//! complete, so a killed job leaves either a whole checkpoint or a partial folder that
//! [`latest`] ignores (and the next write removes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{io_err, Result, TrainError};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer"; // burn adds ".bin"
pub const STATE_FILE: &str = "state.json";

/// What a checkpoint records besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Micro-batches consumed (the position in the data order).
    pub micro_batches: usize,
    /// The stage's config, serialized (a resume refuses a different one).
    pub config: serde_json::Value,
    /// Parameter name -> burn ParamId, for the optimizer state ([`crate::params`]).
    pub param_ids: BTreeMap<String, u64>,
    /// Loss of the last logged step.
    pub last_loss: Option<f32>,
}

pub fn dir_for(root: &Path, step: usize) -> PathBuf {
    root.join("checkpoints").join(format!("step-{step:06}"))
}

/// The newest complete checkpoint under `root`, if any.
pub fn latest(root: &Path) -> Result<Option<(PathBuf, TrainState)>> {
    let dir = root.join("checkpoints");
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut best: Option<(usize, PathBuf)> = None;
    for e in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))? {
        let e = e.map_err(|e| io_err(&dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some(n) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) else { continue };
        if e.path().join(STATE_FILE).is_file() && best.as_ref().is_none_or(|b| n > b.0) {
            best = Some((n, e.path()));
        }
    }
    match best {
        None => Ok(None),
        Some((_, p)) => {
            let state = read_state(&p)?;
            Ok(Some((p, state)))
        }
    }
}

pub fn read_state(dir: &Path) -> Result<TrainState> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
    serde_json::from_str(&text)
        .map_err(|e| TrainError::Checkpoint { path: p, message: format!("unreadable state: {e}") })
}

/// Writes a checkpoint atomically: `write_tensors(tmp_dir)` writes the model and optimizer
/// files, then the state goes last and the folder is renamed into place. Keeps the newest
/// `keep` checkpoints.
pub fn write(
    root: &Path,
    state: &TrainState,
    keep: usize,
    write_tensors: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let fin = dir_for(root, state.step);
    let parent = fin.parent().expect("checkpoint dir has a parent");
    std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    let tmp = parent.join(format!("step-{:06}.partial-{}", state.step, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    write_tensors(&tmp)?;
    let json = serde_json::to_vec_pretty(state).expect("state serializes");
    popen_core::shard::atomic_write(tmp.join(STATE_FILE), &json)?;
    if fin.exists() {
        std::fs::remove_dir_all(&fin).map_err(|e| io_err(&fin, e))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| io_err(&fin, e))?;
    prune(parent, keep)?;
    Ok(fin)
}

/// Removes partial folders and all but the newest `keep` complete checkpoints.
fn prune(dir: &Path, keep: usize) -> Result<()> {
    let mut done = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let e = e.map_err(|e| io_err(dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.contains(".partial-") {
            let _ = std::fs::remove_dir_all(e.path());
        } else if let Some(n) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) {
            done.push((n, e.path()));
        }
    }
    done.sort();
    let n = done.len();
    for (_, p) in done.into_iter().take(n.saturating_sub(keep)) {
        std::fs::remove_dir_all(&p).map_err(|e| io_err(&p, e))?;
    }
    Ok(())
}

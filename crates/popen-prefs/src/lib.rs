//! popen's preference-data builder (SPEC sections 3, 4 and 10).
//!
//! - [`collect_ps`]: the collect-ps stage (model, perturbations, selection, `seg-pref/1`).
//! - [`corrector`]: the offline corrector and the [`corrector::Corrector`] trait.
//! - [`diff`]: RLHF-V's changed-token positions `L_y` / `L_yc` from a port of Python's
//!   `difflib.SequenceMatcher` (matching blocks, autojunk included), checked against
//!   difflib itself on committed fixtures.
//! - [`openai`]: the corrector on an OpenAI-compatible endpoint (cache, retries, parsing).
//! - [`noise`]: the noise-filling perturbations of collect-ps as rebuildable recipes.
//! - [`select`]: Eq. 1's localization score, the boundary score and Algorithm 1's curriculum
//!   selection (phase 1 with conditional regeneration, phase 2) and the per-target rankings
//!   `L_s^n`.

pub mod collect_ps;
pub mod collect_pt;
pub mod corrector;
pub mod diff;
pub mod noise;
pub mod openai;
pub mod select;

#[derive(Debug, thiserror::Error)]
pub enum PrefsError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Core(#[from] popen_core::CoreError),
}

pub type Result<T, E = PrefsError> = std::result::Result<T, E>;

/// What every collect stage opens first: the model folder, the resumable output writer and
/// the manifest (config, the samples shard and the model weights as inputs). Records are
/// committed every `part_records` beside the output (`<out>.parts/`): a killed run, rerun
/// with the same config and inputs, skips the samples already written and ends with the
/// same file (`popen_core::shard::ResumableWriter`; delete the parts, as `--force` does, to
/// start over).
pub(crate) fn open_stage<B: burn::prelude::Backend, R: popen_core::shard::Record>(
    stage: &str,
    config: &serde_json::Value,
    model_dir: &std::path::Path,
    samples: &std::path::Path,
    out: &std::path::Path,
    part_records: usize,
    id_of: fn(&R) -> String,
    device: &B::Device,
) -> Result<(popen_model::bundle::Bundle<B>, popen_core::shard::ResumableWriter<R>, popen_core::manifest::Manifest)> {
    use popen_model::bundle;
    let b = bundle::open::<B>(model_dir, device).map_err(|e| PrefsError::Input(format!("{}: {e}", model_dir.display())))?;
    let mut manifest = popen_core::manifest::Manifest::new(stage, config)?;
    manifest.add_input(samples)?;
    manifest.add_input(model_dir.join(bundle::WEIGHTS_FILE))?;
    let fingerprint = std::iter::once(manifest.config_hash.clone())
        .chain(manifest.inputs.iter().map(|i| i.sha256.clone()))
        .collect::<Vec<_>>()
        .join("|");
    let writer = popen_core::shard::ResumableWriter::<R>::open(out, &fingerprint, part_records, false, id_of)?;
    if writer.resumed() > 0 {
        manifest.count("resumed", writer.resumed() as u64);
    }
    Ok((b, writer, manifest))
}

/// Closes a collect stage: the shard (all parts), then its manifest with the named counts
/// and the time.
pub(crate) fn close_stage<R: popen_core::shard::Record>(
    writer: popen_core::shard::ResumableWriter<R>,
    mut manifest: popen_core::manifest::Manifest,
    out: &std::path::Path,
    counts: &[(&str, usize)],
    t0: std::time::Instant,
) -> Result<()> {
    let rows = writer.finish()?;
    manifest.add_output(out, Some(rows as u64))?;
    for (name, n) in counts {
        manifest.count(name, *n as u64);
    }
    manifest.time("seconds", t0);
    manifest.write(popen_core::manifest::manifest_beside(out))?;
    Ok(())
}

/// Default of the configs' `part_records`.
pub(crate) fn default_part_records() -> usize {
    16
}

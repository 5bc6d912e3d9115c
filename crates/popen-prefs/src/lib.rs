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

/// The definition of a collect stage's output: its config (with the settings of the
/// corrector or proposer), the samples, the model folder's weights, config and tokenizer,
/// the `extra` inputs (proposal shards, a SAM checkpoint) and the shard task.
pub fn stage_definition(
    stage: &str,
    config: &serde_json::Value,
    model_dir: &std::path::Path,
    samples: &std::path::Path,
    extra: &[std::path::PathBuf],
    shard: &popen_core::shardspec::ShardSpec,
) -> Result<popen_core::manifest::Definition> {
    use popen_model::bundle;
    let mut def = popen_core::manifest::Definition::new(stage, config)?.input(samples)?;
    for f in [bundle::WEIGHTS_FILE, bundle::CONFIG_FILE, bundle::TOKENIZER_FILE] {
        let p = model_dir.join(f);
        if p.is_file() || f == bundle::WEIGHTS_FILE {
            def = def.input(p)?;
        }
    }
    for p in extra {
        def = def.input(p)?;
    }
    // Part sizes and request concurrency change how a run works, not what it writes.
    Ok(def.shard(shard).ignoring(&["config.part_records", "config.concurrency", "config.max_skipped_fraction"]))
}

/// What every collect stage opens first, unless `out` is already this definition's complete
/// result (then `None`, and a line saying so): the model folder, the resumable output writer
/// and the manifest. Records are committed every `part_records` beside the output
/// (`<out>.parts/`): a killed run, rerun with the same definition, skips the samples already
/// written and ends with the same file (`popen_core::shard::ResumableWriter`); parts of
/// another definition are discarded.
#[allow(clippy::type_complexity)]
pub(crate) fn open_stage<B: burn::prelude::Backend, R: popen_core::shard::Record>(
    def: &popen_core::manifest::Definition,
    model_dir: &std::path::Path,
    out: &std::path::Path,
    part_records: usize,
    id_of: fn(&R) -> String,
    device: &B::Device,
) -> Result<Option<(popen_model::bundle::Bundle<B>, popen_core::shard::ResumableWriter<R>, popen_core::manifest::Manifest)>> {
    use popen_core::manifest::{manifest_beside, Freshness};
    use popen_model::bundle;
    match def.freshness(out, &manifest_beside(out)) {
        Freshness::Complete(hash) => {
            eprintln!(
                "{} is complete: same definition {} (config, inputs, model, shard); nothing to do (--force recomputes it)",
                out.display(),
                &hash[..12]
            );
            return Ok(None);
        }
        Freshness::Stale(why) => eprintln!("{} exists but is not this run's result ({why}): recomputing", out.display()),
        Freshness::Missing => {}
    }
    let b = bundle::open::<B>(model_dir, device).map_err(|e| PrefsError::Input(format!("{}: {e}", model_dir.display())))?;
    // The reference model of the records (their log-probs / embeddings): `dpo` checks it.
    let reference = bundle::fingerprint(model_dir).map_err(|e| PrefsError::Input(e.to_string()))?;
    let mut manifest = def.manifest();
    manifest.reference_model = Some(reference.clone());
    let writer = popen_core::shard::ResumableWriter::<R>::open(out, &def.hash(), part_records, false, id_of)?
        .with_metadata(vec![(popen_core::shard::REFERENCE_MODEL_KEY.to_string(), reference)]);
    Ok(Some((b, writer, manifest)))
}

/// Closes a collect stage: the shard (all parts, resumed ones included), then its manifest:
/// `records` = rows of the output, a count per key that `tally` gives each record (over
/// every record, not only this run's), the `counts` of this run (skips are recomputed on
/// resume, so this run's skip list is the whole list), `resumed` and the time.
pub(crate) fn close_stage<R: popen_core::shard::Record>(
    writer: popen_core::shard::ResumableWriter<R>,
    mut manifest: popen_core::manifest::Manifest,
    out: &std::path::Path,
    mut tally: impl FnMut(&R) -> Option<String>,
    counts: &[(&str, usize)],
    t0: std::time::Instant,
) -> Result<()> {
    let resumed = writer.resumed();
    let mut keys: std::collections::BTreeMap<String, u64> = Default::default();
    let rows = writer.finish_visit(|r| {
        if let Some(k) = tally(r) {
            *keys.entry(k).or_default() += 1;
        }
    })?;
    manifest.add_output(out, Some(rows as u64))?;
    manifest.count("records", rows as u64);
    if resumed > 0 {
        manifest.count("resumed", resumed as u64);
    }
    for (name, n) in keys {
        manifest.count(&name, n);
    }
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

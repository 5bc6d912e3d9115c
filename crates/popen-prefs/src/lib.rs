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
pub use popen_core::segpref::noise;
pub mod openai;
pub mod select;

#[derive(Debug, thiserror::Error)]
pub enum PrefsError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Core(#[from] popen_core::CoreError),
    /// An external service (the corrector's endpoint) failed. `class` names the kind of
    /// failure without anything request-specific (`HTTP 401`, `transport`, see
    /// [`popen_core::chat::ChatError::class`]): the collect stages group skips by it and stop
    /// early when consecutive samples fail with one class (a systemic cause: a bad key, a
    /// server that is down, a spent quota). `message` is already redacted.
    #[error("{message}")]
    Service { class: String, message: String },
}

impl PrefsError {
    /// The service failure class, for [`PrefsError::Service`].
    pub fn service_class(&self) -> Option<&str> {
        match self {
            PrefsError::Service { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// Default of the configs' `max_skipped_fraction`.
pub(crate) fn default_max_skipped_fraction() -> f64 {
    0.5
}

/// Checks a `max_skipped_fraction` setting.
pub(crate) fn validate_fraction(name: &str, v: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&v) {
        return Err(PrefsError::Input(format!("{name} must be in [0, 1] (got {v})")));
    }
    Ok(())
}

/// The skips of one collect-stage run, grouped by cause, and the two rules that turn skips
/// into a failed stage (issue 20):
/// - **fail fast**: `fail_fast_after` consecutive samples (input order) skipped with a
///   service failure of the same class stop the run at the end of the window that reached
///   the count (0: never);
/// - **too many skips**: at the end, more than `max_fraction` of the samples (this run's
///   records and skips plus the resumed records) skipped for counted reasons, or no record
///   at all while every skip has one service class, fails the run.
///
/// A failed run writes neither the output nor its manifest (a rerun does not take the stage
/// for complete); its good records stay committed in `<out>.parts/` for the rerun to resume.
pub(crate) struct SkipLedger {
    stage: &'static str,
    max_fraction: f64,
    fail_fast_after: usize,
    /// Per group key: (count, the first reason).
    groups: std::collections::BTreeMap<String, (usize, String)>,
    counted: usize,
    skipped: usize,
    /// Skips with a service class.
    service: usize,
    streak: Option<(String, usize)>,
    tripped: Option<String>,
}

impl SkipLedger {
    pub(crate) fn new(stage: &'static str, max_fraction: f64, fail_fast_after: usize) -> Self {
        SkipLedger {
            stage,
            max_fraction,
            fail_fast_after,
            groups: Default::default(),
            counted: 0,
            skipped: 0,
            service: 0,
            streak: None,
            tripped: None,
        }
    }

    /// A sample made a record: ends a streak of service failures.
    pub(crate) fn ok(&mut self) {
        self.streak = None;
    }

    /// Records a skip in the manifest and the ledger. `group` is the cause the reason is
    /// grouped under; `counts`: whether it counts toward `max_fraction` (an ordinary
    /// outcome, like collect-ps's curriculum finding no pair, does not).
    pub(crate) fn skip(
        &mut self,
        manifest: &mut popen_core::manifest::Manifest,
        id: &str,
        reason: String,
        group: &str,
        service_class: Option<&str>,
        counts: bool,
    ) {
        self.skipped += 1;
        if counts {
            self.counted += 1;
            let g = self.groups.entry(group.to_string()).or_insert_with(|| (0, reason.clone()));
            g.0 += 1;
        }
        match service_class {
            Some(class) => {
                self.service += 1;
                let n = match &self.streak {
                    Some((c, n)) if c == class => n + 1,
                    _ => 1,
                };
                self.streak = Some((class.to_string(), n));
                if self.fail_fast_after > 0 && n >= self.fail_fast_after && self.tripped.is_none() {
                    self.tripped = Some(format!(
                        "{}: stopped after {n} consecutive samples failed with the same service error \
                         (fail_fast_after = {}): {reason}",
                        self.stage, self.fail_fast_after
                    ));
                }
            }
            None => self.streak = None,
        }
        // A record's own problem is warned about as it happens; a service error (the same
        // for every sample while the endpoint fails) is reported once, at the end.
        if service_class.is_some() {
            manifest.skip(id.to_string(), reason);
        } else {
            manifest.skip_warn(id.to_string(), reason);
        }
    }

    pub(crate) fn skipped(&self) -> usize {
        self.skipped
    }

    /// Counted skips.
    pub(crate) fn counted(&self) -> usize {
        self.counted
    }

    /// The fail-fast error, once a streak reached `fail_fast_after`.
    pub(crate) fn fail_fast(&self) -> Option<PrefsError> {
        self.tripped.as_ref().map(|m| PrefsError::Input(format!("{m}; {}", self.aftermath())))
    }

    /// What the caller does after an error: say where the good records are.
    fn aftermath(&self) -> &'static str {
        "no output or manifest written; the good records are committed beside the output and a rerun resumes them"
    }

    /// The end-of-run rule; `records` = records of this run plus resumed ones.
    pub(crate) fn check_end(&self, records: usize) -> Result<()> {
        let total = records + self.skipped;
        let all_one_service =
            records == 0 && self.skipped > 0 && self.service == self.skipped && self.groups.len() == 1;
        let too_many = self.counted > 0 && self.counted as f64 > self.max_fraction * total as f64;
        if !(too_many || all_one_service) {
            return Ok(());
        }
        // The most common cause, once (ties: the first key in order).
        let (_, (n, reason)) = self
            .groups
            .iter()
            .max_by(|a, b| a.1 .0.cmp(&b.1 .0).then_with(|| b.0.cmp(a.0)))
            .expect("a counted skip has a group");
        let others = self.groups.len() - 1;
        let others =
            if others > 0 { format!(" ({others} other cause(s) in the manifest's skip list)") } else { String::new() };
        let why = if too_many {
            format!("{:.1}% > max_skipped_fraction {}", 100.0 * self.counted as f64 / total as f64, self.max_fraction)
        } else {
            "no record: every sample failed with the same service error".to_string()
        };
        Err(PrefsError::Input(format!(
            "{}: {} of {total} samples skipped ({why}); most common cause ({n} samples): {reason}{others}; {}",
            self.stage,
            self.counted,
            self.aftermath()
        )))
    }
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
    Ok(def.shard(shard).ignoring(&[
        "config.part_records",
        "config.concurrency",
        "config.max_skipped_fraction",
        "config.fail_fast_after",
    ]))
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
) -> Result<
    Option<(popen_model::bundle::Bundle<B>, popen_core::shard::ResumableWriter<R>, popen_core::manifest::Manifest)>,
> {
    use popen_model::bundle;
    if def.is_complete(out) {
        return Ok(None);
    }
    let b =
        bundle::open::<B>(model_dir, device).map_err(|e| PrefsError::Input(format!("{}: {e}", model_dir.display())))?;
    // The reference model of the records (their log-probs / embeddings): `dpo` checks it.
    let reference = bundle::fingerprint(model_dir).map_err(|e| PrefsError::Input(e.to_string()))?;
    let mut manifest = def.manifest();
    manifest.reference_model = Some(reference.clone());
    let writer = popen_core::shard::ResumableWriter::<R>::open(out, &def.hash(), part_records, false, id_of)?
        .with_metadata(vec![(popen_core::shard::REFERENCE_MODEL_KEY.to_string(), reference)]);
    Ok(Some((b, writer, manifest)))
}

/// Closes a collect stage: the shard (all parts, resumed ones included, in input order:
/// `position` maps a sample id to its place among the samples the run visited), then its
/// manifest: `records` = rows of the output, a count per key that `tally` gives each record
/// (over every record, not only this run's), the `counts` of this run (skips are recomputed
/// on resume, so this run's skip list is the whole list), `resumed` and the time.
pub(crate) fn close_stage<R: popen_core::shard::Record>(
    writer: popen_core::shard::ResumableWriter<R>,
    mut manifest: popen_core::manifest::Manifest,
    out: &std::path::Path,
    mut tally: impl FnMut(&R) -> Option<String>,
    counts: &[(&str, usize)],
    t0: std::time::Instant,
    position: &std::collections::HashMap<String, usize>,
    id_of: fn(&R) -> &str,
) -> Result<()> {
    let resumed = writer.resumed();
    let mut keys: std::collections::BTreeMap<String, u64> = Default::default();
    let rows = writer.finish_ordered_visit(
        |r| position.get(id_of(r)).copied(),
        |r| {
            if let Some(k) = tally(r) {
                *keys.entry(k).or_default() += 1;
            }
        },
    )?;
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

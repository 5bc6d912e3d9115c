//! `popen collect-ps`, `popen collect-pt`: thin front ends of popen-prefs.

use crate::backend::on_backend;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use popen_core::shardspec::ShardSpec;
use popen_prefs::collect_ps::{self, AnnotationProposer, CollectPsConfig};
use popen_prefs::collect_pt::{self, CollectPtConfig};
use popen_prefs::corrector::OfflineCorrector;
use popen_prefs::select::Phase;
use std::path::PathBuf;

/// The options every resumable stage takes (`#[command(flatten)]`).
#[derive(clap::Args)]
pub struct RunArgs {
    /// This task's part of the input, I/N (cluster job arrays; inside a Slurm job array the
    /// default 0/1 becomes the array task: SLURM_ARRAY_TASK_ID/COUNT).
    #[arg(long, default_value = "0/1")]
    pub shard: ShardSpec,
    /// Recompute even if the output and its manifest are already complete, and discard the
    /// parts of a killed run (a rerun otherwise resumes them).
    #[arg(long)]
    pub force: bool,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Compute backend: flex (CPU, default), ndarray (CPU), cuda (with --features cuda).
    #[arg(long, default_value = "flex", value_parser = crate::backend::BACKENDS)]
    pub backend: String,
}

/// What a collect stage reads and writes (optional only so that `--print-config` runs alone).
#[derive(clap::Args)]
pub struct CollectIo {
    /// Model folder (the SFT model: the reference model whose answers, log-probs and seg
    /// embeddings the preferences record).
    #[arg(long, required_unless_present = "print_config")]
    model: Option<PathBuf>,
    /// Samples shard (e.g. data/synth/train.parquet).
    #[arg(long, required_unless_present = "print_config")]
    samples: Option<PathBuf>,
    /// Output shard (Parquet: text-pref for collect-pt, seg-pref for collect-ps); a manifest
    /// is written beside it. With --shard I/N the name gets the -0000I-of-0000N suffix.
    #[arg(long, required_unless_present = "print_config")]
    out: Option<PathBuf>,
}

impl CollectIo {
    /// `(model, samples, out)`; clap requires them unless `--print-config`.
    fn paths(&self, stage: &str) -> Result<(&std::path::Path, &std::path::Path, &std::path::Path)> {
        match (&self.model, &self.samples, &self.out) {
            (Some(m), Some(s), Some(o)) => Ok((m, s, o)),
            _ => bail!("{stage} needs --model, --samples and --out (see --help)"),
        }
    }
}

#[derive(clap::Args)]
pub struct CollectPsArgs {
    #[command(flatten)]
    io: CollectIo,
    /// Config TOML (pipelines/collect-ps-tiny.toml); defaults to SPEC's values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Curriculum phase: 1 (Eq. 1 extremes, regeneration) or 2 (boundary score among the top 5).
    #[arg(long)]
    phase: Option<u8>,
    /// Stage seed (noise recipes are a function of it and the sample id).
    #[arg(long)]
    seed: Option<u64>,
    /// Only this many samples, spread evenly over the input, before --shard splits them
    /// (overrides the config's max_samples; 0 = all).
    #[arg(long)]
    max_samples: Option<usize>,
    /// Class-agnostic proposals from `proposal/1` shards (e.g. SAM's automatic masks), one or
    /// more files; default: the image's own instance masks (annotations).
    #[arg(long, num_args = 1..)]
    proposals: Vec<PathBuf>,
    /// Run SAM's automatic mask generator on each image instead (MobileSAM by default;
    /// settings from --sam-config, e.g. pipelines/sam-masks.toml). `popen sam-masks` once +
    /// --proposals is cheaper when several runs share the images.
    #[arg(long, conflicts_with = "proposals")]
    sam: bool,
    /// SAM settings TOML for --sam.
    #[arg(long, requires = "sam")]
    sam_config: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

fn config(a: &CollectPsArgs) -> Result<CollectPsConfig> {
    let mut cfg: CollectPsConfig = read_toml(a.config.as_deref())?;
    match a.phase {
        None => {}
        Some(1) => cfg.phase = Phase::One,
        Some(2) => cfg.phase = Phase::Two,
        Some(p) => bail!("--phase must be 1 or 2 (got {p})"),
    }
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    if let Some(m) = a.max_samples {
        cfg.max_samples = m;
    }
    cfg.validate()?;
    Ok(cfg)
}

pub fn collect_ps(mut a: CollectPsArgs) -> Result<()> {
    a.run.shard = a.run.shard.or_slurm()?;
    let cfg = config(&a)?;
    if a.run.print_config {
        print!("{}", popen_core::config_text::config_toml(&cfg)?);
        return Ok(());
    }
    let (model, samples, out) = a.io.paths("collect-ps")?;
    let mut inputs: Vec<(&str, &std::path::Path)> = vec![("--samples", samples), ("--model", model)];
    inputs.extend(a.proposals.iter().map(|p| ("--proposals", p.as_path())));
    let (out, _lock) = claim_output(out, &a.run.shard, a.run.force, &inputs)?;
    let io = (model, samples, out.as_path());
    let report = on_backend!(a.run.backend.as_str(), B, dev => run::<B>(&a, &cfg, io, &dev))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn run<B: Backend>(
    a: &CollectPsArgs,
    cfg: &CollectPsConfig,
    (model, samples, out): (&std::path::Path, &std::path::Path, &std::path::Path),
    dev: &B::Device,
) -> Result<collect_ps::CollectPsReport> {
    let (shard_proposer, sam_proposer);
    let proposer: &dyn collect_ps::MaskProposer = if a.sam {
        let sam_cfg: popen_sam::stage::SamMasksConfig = read_toml(a.sam_config.as_deref())?;
        sam_proposer = collect_ps::SamProposer::<B>::load(&sam_cfg, dev).context("loading SAM")?;
        &sam_proposer
    } else if a.proposals.is_empty() {
        &AnnotationProposer
    } else {
        shard_proposer = collect_ps::ShardProposer::open(&a.proposals).context("reading the proposals")?;
        &shard_proposer
    };
    collect_ps::run::<B>(model, samples, out, cfg, proposer, a.run.shard, true, dev)
        .with_context(|| format!("collect-ps {} -> {}", samples.display(), out.display()))
}

/// This shard task's output path, claimed for this run: refused when it is one of `inputs`,
/// locked against a second writer (the lock is held until the returned guard drops), temp
/// files of killed runs cleared. `--force` discards the earlier result's manifest and the
/// parts of a killed run, so the stage recomputes; otherwise the stage itself decides from
/// its definition (config, inputs' hashes, model, shard) whether the output is complete.
pub(crate) fn claim_output(
    out: &std::path::Path,
    shard: &ShardSpec,
    force: bool,
    inputs: &[(&str, &std::path::Path)],
) -> Result<(PathBuf, popen_core::guard::OutputLock)> {
    let out = shard.output_path(out);
    let lock = popen_core::guard::claim_output(&out, inputs)?;
    if force {
        let mpath = popen_core::manifest::manifest_beside(&out);
        if mpath.is_file() {
            std::fs::remove_file(&mpath).with_context(|| format!("removing {}", mpath.display()))?;
        }
        let parts = popen_core::shard::parts_dir(&out);
        if parts.exists() {
            std::fs::remove_dir_all(&parts).with_context(|| format!("removing {}", parts.display()))?;
        }
    }
    Ok((out, lock))
}

#[derive(clap::Args)]
pub struct CollectPtArgs {
    #[command(flatten)]
    io: CollectIo,
    /// Config TOML (pipelines/collect-pt-tiny.toml); defaults to SPEC's values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Object lexicon of the offline corrector: the benchmark's lexicon.json, or
    /// coco:<path to CHAIR's chair_synonyms.txt>.
    #[arg(long, default_value = "data/synth/lexicon.json")]
    lexicon: String,
    /// Corrector: offline (deterministic, uses the ground truth and the lexicon) or openai
    /// (any OpenAI-compatible chat-completions endpoint, see --openai-config).
    #[arg(long, default_value = "offline", value_parser = ["offline", "openai"])]
    corrector: String,
    /// TOML of the openai corrector (pipelines/corrector-openai.toml): base_url, model, the
    /// environment variable holding the key, timeout, retries, cache folder, prompt files.
    #[arg(long)]
    openai_config: Option<PathBuf>,
    /// Stage seed (sampling and error injection are functions of it and the sample id).
    #[arg(long)]
    seed: Option<u64>,
    /// Only this many samples, spread evenly over the input, before --shard splits them
    /// (overrides the config's max_samples; 0 = all).
    #[arg(long)]
    max_samples: Option<usize>,
    #[command(flatten)]
    run: RunArgs,
}

pub fn collect_pt(mut a: CollectPtArgs) -> Result<()> {
    a.run.shard = a.run.shard.or_slurm()?;
    let mut cfg: CollectPtConfig = read_toml(a.config.as_deref())?;
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    if let Some(m) = a.max_samples {
        cfg.max_samples = m;
    }
    cfg.validate()?;
    if a.run.print_config {
        print!("{}", popen_core::config_text::config_toml(&cfg)?);
        return Ok(());
    }
    let (model, samples, out) = a.io.paths("collect-pt")?;
    let lexicon = popen_core::lexicon::Lexicon::load(&a.lexicon)
        .with_context(|| format!("loading the lexicon '{}'", a.lexicon))?;
    let corrector: Box<dyn popen_prefs::corrector::Corrector + Sync> = match a.corrector.as_str() {
        "offline" => Box::new(OfflineCorrector::new(lexicon.clone()).with_object_list(cfg.object_list)),
        "openai" => {
            let oc: popen_prefs::openai::OpenAiConfig = read_toml(a.openai_config.as_deref())?;
            Box::new(popen_prefs::openai::OpenAiCorrector::new(&oc)?)
        }
        other => bail!("corrector '{other}' is not available (available: offline, openai)"),
    };
    let (out, _lock) = claim_output(out, &a.run.shard, a.run.force, &[("--samples", samples), ("--model", model)])?;
    let report = on_backend!(a.run.backend.as_str(), B, dev => collect_pt::run::<B>(
        model,
        samples,
        &out,
        &cfg,
        corrector.as_ref(),
        &a.corrector,
        &lexicon,
        a.run.shard,
        true,
        &dev,
    ))
    .with_context(|| format!("collect-pt {} -> {}", samples.display(), out.display()))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// A config from its TOML file, or the type's defaults without one (popen-core's
/// `config_text::load`; the training stages' `StageConfig::load_with` reads its file with
/// its own I/O error and checks, then applies `--set` through `config_text::with_sets`).
pub(crate) fn read_toml<T: serde::de::DeserializeOwned + Default>(path: Option<&std::path::Path>) -> Result<T> {
    popen_core::config_text::load(path).map_err(|e| anyhow::anyhow!(e))
}

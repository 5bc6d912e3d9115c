//! `popen collect-ps`: thin front end of popen-prefs.

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use popen_core::manifest::Manifest;
use popen_core::shardspec::ShardSpec;
use popen_prefs::collect_ps::{self, AnnotationProposer, CollectPsConfig};
use popen_prefs::select::Phase;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CollectPsArgs {
    /// Model folder (the SFT model: the reference model of P_s).
    #[arg(long)]
    model: PathBuf,
    /// Samples shard (e.g. data/synth/train.parquet).
    #[arg(long)]
    samples: PathBuf,
    /// Output seg-pref shard (Parquet); a manifest is written beside it. With --shard I/N the
    /// name gets the -0000I-of-0000N suffix.
    #[arg(long)]
    out: PathBuf,
    /// Config TOML (pipelines/collect-ps-tiny.toml); defaults to SPEC's values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Curriculum phase: 1 (Eq. 1 extremes, regeneration) or 2 (boundary score among the top 5).
    #[arg(long)]
    phase: Option<u8>,
    /// Stage seed (noise recipes are a function of it and the sample id).
    #[arg(long)]
    seed: Option<u64>,
    /// This task's part of the samples, I/N (cluster job arrays).
    #[arg(long, default_value = "0/1")]
    shard: ShardSpec,
    /// Recompute even if the output and its manifest are already complete.
    #[arg(long)]
    force: bool,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Compute backend: flex (CPU, default), ndarray (CPU), cuda (with --features cuda).
    #[arg(long, default_value = "flex")]
    backend: String,
}

fn config(a: &CollectPsArgs) -> Result<CollectPsConfig> {
    let mut cfg = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => CollectPsConfig::default(),
    };
    match a.phase {
        None => {}
        Some(1) => cfg.phase = Phase::One,
        Some(2) => cfg.phase = Phase::Two,
        Some(p) => bail!("--phase must be 1 or 2 (got {p})"),
    }
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    cfg.validate()?;
    Ok(cfg)
}

pub fn collect_ps(a: CollectPsArgs) -> Result<()> {
    let cfg = config(&a)?;
    if a.print_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let out = if a.shard.is_all() {
        a.out.clone()
    } else {
        PathBuf::from(format!("{}{}.parquet", a.out.with_extension("").display(), a.shard.suffix()))
    };
    let mpath = collect_ps::manifest_path_of(&out);
    if !a.force && out.is_file() && mpath.is_file() {
        if let Ok(m) = Manifest::read(&mpath) {
            if m.outputs_intact() {
                println!("{} is complete (manifest {}); --force recomputes it", out.display(), mpath.display());
                return Ok(());
            }
        }
    }
    let report = match a.backend.as_str() {
        "flex" => run::<burn::backend::Flex>(&a, &cfg, &out, &Default::default()),
        "ndarray" => run::<burn::backend::NdArray<f32>>(&a, &cfg, &out, &Default::default()),
        #[cfg(feature = "cuda")]
        "cuda" => run::<burn::backend::Cuda<f32, i32>>(&a, &cfg, &out, &Default::default()),
        other => bail!(
            "backend '{other}' is not available in this build (available: {})",
            crate::backend::available().join(", ")
        ),
    }?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn run<B: Backend>(a: &CollectPsArgs, cfg: &CollectPsConfig, out: &std::path::Path, dev: &B::Device) -> Result<collect_ps::CollectPsReport> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    collect_ps::run::<B>(&a.model, &a.samples, out, cfg, &AnnotationProposer, a.shard.clone(), true, dev)
        .with_context(|| format!("collect-ps {} -> {}", a.samples.display(), out.display()))
}

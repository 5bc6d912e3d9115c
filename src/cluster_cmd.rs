//! `popen merge`, `popen cluster submit`: thin front ends of popen_core::shard::merge and
//! popen_core::cluster.

use anyhow::{bail, Context, Result};
use popen_core::cluster::{self, ClusterConfig};
use popen_core::shard::merge;
use popen_core::shard::{Sample, ShardReader};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The stage output the tasks wrote shards of (x.parquet: tasks wrote
    /// x-0000I-of-0000N.parquet); the merged file and x.manifest.json are written here.
    #[arg(long)]
    out: PathBuf,
    /// Number of tasks N of the job array (>= 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    shards: u32,
    /// The samples shard the stage read (its record order).
    #[arg(long, required_unless_present = "images")]
    samples: Option<PathBuf>,
    /// The photo folder sam-masks read (--images), instead of --samples.
    #[arg(long, conflicts_with = "samples")]
    images: Option<PathBuf>,
    /// Merge again even if the output and its manifest are complete.
    #[arg(long)]
    force: bool,
}

pub fn merge(a: MergeArgs) -> Result<()> {
    let _lock = popen_core::guard::claim_output(&a.out, &[])?;
    if !a.force && merge::stage_complete(&a.out) {
        println!("{} is complete (manifest beside it); --force merges again", a.out.display());
        return Ok(());
    }
    let order: Vec<String> = match (&a.samples, &a.images) {
        (Some(s), _) => {
            let mut ids = Vec::new();
            for batch in ShardReader::<Sample>::open(s)? {
                ids.extend(batch?.into_iter().map(|s| s.id));
            }
            ids
        }
        (None, Some(dir)) => popen_sam::stage::list_images(dir)?
            .iter()
            .map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default())
            .collect(),
        (None, None) => bail!("--samples or --images names the input order"),
    };
    let r = merge::merge_stage(&a.out, a.shards, &order).with_context(|| format!("merging {}", a.out.display()))?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum ClusterCommand {
    /// Submit the pipeline of a cluster TOML (pipelines/cluster.toml) with sbatch, stages
    /// chained with --dependency=afterok; complete stages are skipped.
    Submit(SubmitArgs),
}

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// Cluster TOML: Slurm resources, paths ([env]) and stages.
    #[arg(long, default_value = "pipelines/cluster.toml")]
    config: PathBuf,
    /// Print the sbatch calls instead of running them.
    #[arg(long)]
    dry_run: bool,
}

pub fn cluster(c: ClusterCommand) -> Result<()> {
    let ClusterCommand::Submit(a) = c;
    let cfg: ClusterConfig = crate::prefs_cmd::read_toml(Some(&a.config))?;
    let vars = cfg.vars(|k| std::env::var(k).ok());
    let (jobs, skipped) = cluster::plan(&cfg, &vars).with_context(|| a.config.display().to_string())?;
    for s in &skipped {
        eprintln!("skip {}: {}", s.name, s.reason);
    }
    let log_dir = cluster::expand(&cfg.slurm.log_dir, &vars, "slurm.log_dir")?;
    if !a.dry_run {
        std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {log_dir}"))?;
    }
    let ids = cluster::submit(&jobs, |job, args| {
        if a.dry_run {
            let env: Vec<String> =
                job.env.iter().filter(|(k, _)| k.starts_with("STAGE_")).map(|(k, v)| format!("{k}={v}")).collect();
            println!("{} {} {}", env.join(" "), cfg.slurm.sbatch, args.join(" "));
            Ok(format!("<{}>", job.name))
        } else {
            cluster::sbatch(&cfg.slurm.sbatch, job, args)
        }
    })?;
    for (name, id) in ids {
        if !a.dry_run {
            println!("{name} {id}");
        }
    }
    Ok(())
}

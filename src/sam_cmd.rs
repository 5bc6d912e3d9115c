//! `popen sam-masks`: thin front end of popen-sam's stage (SAM's automatic mask generator ->
//! `proposal/1` shards).

use crate::backend::on_backend;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use popen_sam::stage::{self, ImageSource, SamMasksConfig};
use std::path::{Path, PathBuf};

use crate::prefs_cmd::{claim_output, read_toml, RunArgs};

#[derive(clap::Args)]
pub struct SamMasksArgs {
    /// Samples shard (e.g. data/synth/train.parquet); proposal ids = sample ids.
    #[arg(long, conflicts_with = "images", required_unless_present_any = ["images", "print_config"])]
    samples: Option<PathBuf>,
    /// Or a folder of .jpg/.jpeg/.png photos (ids = file names without extension).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Output proposals shard (Parquet); a manifest is written beside it. With --shard I/N the
    /// name gets the -0000I-of-0000N suffix.
    #[arg(long, required_unless_present = "print_config")]
    out: Option<PathBuf>,
    /// Config TOML (pipelines/sam-masks.toml); defaults: MobileSAM, SAM's generator defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// SAM model (overrides the config).
    #[arg(long, value_parser = ["mobile_sam", "vit_b", "vit_l", "vit_h"])]
    sam_model: Option<String>,
    /// SAM checkpoint file (overrides the config; mobile_sam: data/assets/mobile_sam/mobile_sam.pt).
    #[arg(long)]
    sam_checkpoint: Option<PathBuf>,
    /// Points per image side of the generator's grid (overrides the config; SAM: 32).
    #[arg(long)]
    points_per_side: Option<usize>,
    /// Also draw the first N images' proposals as overlay PNGs into <out>.overlays/.
    #[arg(long, default_value_t = 0)]
    overlays: usize,
    #[command(flatten)]
    run: RunArgs,
}

pub fn sam_masks(mut a: SamMasksArgs) -> Result<()> {
    a.run.shard = a.run.shard.or_slurm()?;
    let mut cfg: SamMasksConfig = read_toml(a.config.as_deref())?;
    if let Some(m) = &a.sam_model {
        cfg.model = m.clone();
    }
    if let Some(c) = &a.sam_checkpoint {
        cfg.checkpoint = c.clone();
    }
    if let Some(n) = a.points_per_side {
        cfg.amg.points_per_side = Some(n);
        cfg.amg.point_grids = None;
    }
    cfg.kind()?;
    cfg.amg.validate().context("generator settings ([amg] in the config)")?;
    if a.run.print_config {
        print!("{}", popen_core::config_text::config_toml(&cfg)?);
        return Ok(());
    }
    let source = match (&a.samples, &a.images) {
        (Some(s), None) => ImageSource::Samples(s.clone()),
        (None, Some(d)) => ImageSource::Folder(d.clone()),
        _ => bail!("give --samples SHARD or --images FOLDER"),
    };
    let out_arg = a.out.clone().expect("clap requires --out");
    let input = match &source {
        ImageSource::Samples(p) => ("--samples", p.as_path()),
        ImageSource::Folder(p) => ("--images", p.as_path()),
    };
    let (out, _lock) =
        claim_output(&out_arg, &a.run.shard, a.run.force, &[input, ("--sam-checkpoint", &cfg.checkpoint)])?;
    let report = on_backend!(a.run.backend.as_str(), B, dev => run::<B>(&cfg, &source, &out, &a, &dev))?;
    if a.overlays > 0 {
        write_overlays(&source, &out, a.overlays)?;
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn run<B: Backend>(
    cfg: &SamMasksConfig,
    source: &ImageSource,
    out: &Path,
    a: &SamMasksArgs,
    dev: &B::Device,
) -> Result<stage::SamMasksReport> {
    stage::run::<B>(cfg, source, out, &a.run.shard, dev).with_context(|| format!("sam-masks -> {}", out.display()))
}

/// Overlays of the first `n` proposal sets (masks in palette colours, largest first so small
/// ones stay visible) into `<out>.overlays/<id>.png`.
fn write_overlays(source: &ImageSource, out: &Path, n: usize) -> Result<()> {
    let sets = popen_core::shard::read_shard::<popen_core::shard::ProposalSet>(out)?;
    let dir = PathBuf::from(format!("{}.overlays", out.display()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let image_of = |id: &str| -> Result<image::RgbImage> {
        match source {
            ImageSource::Folder(d) => {
                let f = stage::list_images(d)?
                    .into_iter()
                    .find(|f| f.file_stem().is_some_and(|s| s == id))
                    .with_context(|| format!("no image for '{id}' in {}", d.display()))?;
                Ok(popen_core::imageio::decode_rgb(&std::fs::read(&f)?, Some(&f.display().to_string()))?)
            }
            ImageSource::Samples(p) => {
                for s in popen_core::shard::read_shard::<popen_core::shard::Sample>(p)? {
                    if s.id == id {
                        return Ok(popen_core::imageio::decode_rgb(&s.image, Some(id))?);
                    }
                }
                bail!("no sample '{id}' in {}", p.display())
            }
        }
    };
    for set in sets.iter().take(n) {
        let img = image_of(&set.id)?;
        let mut masks: Vec<(popen_core::mask::Mask, [u8; 3])> = set
            .masks
            .iter()
            .enumerate()
            .map(|(i, r)| Ok((r.decode()?, popen_data::render::palette(i))))
            .collect::<Result<_>>()?;
        masks.sort_by_key(|(m, _)| std::cmp::Reverse(m.area()));
        let png = popen_data::render::overlay_masks(&img, &masks, 1)?;
        let path = dir.join(format!("{}.png", set.id));
        png.save(&path).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("overlays: {}", dir.display());
    Ok(())
}

//! The `sam-masks` stage: SAM's automatic mask generator over every image of a samples
//! shard (or a folder of photos), written as `proposal/1` shards (one record per image:
//! RLE masks, predicted IoU as the score, and boxes, stability scores, prompt points and
//! crop boxes in `meta`), with a manifest beside them.
//!
//! Sharded (`--shard I/N` takes positions `pos % N == I`), resumable (records are committed
//! every `chunk` images beside the output, see [`popen_core::shard::ResumableWriter`]; a
//! rerun after a kill skips them and ends with the same file), and a corrupt image, or one
//! outside `[limits]` ([`ImageLimits`]: checked from the header, before decoding) or that
//! the generator cannot process, is skipped with its reason in the manifest and a warning
//! on stderr, never a crash. Memory per image is bounded by `limits.max_pixels` and
//! `amg.mask_memory_mb`, not by points x masks x pixels.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use image::RgbImage;
use popen_core::imageio::ImageLimits;
use popen_core::manifest::{manifest_beside, Manifest};
use popen_core::shard::{for_each_taken, ProposalSet, ResumableWriter, Sample};
use popen_core::shardspec::ShardSpec;
use serde::{Deserialize, Serialize};

use crate::amg::{generate, AmgConfig, AmgError, AmgMask};
use crate::model::{Sam, SamConfig, SamKind, SamPredictor};

/// Stage errors (the message names the file and record).
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Core(#[from] popen_core::CoreError),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Model(String),
}

type Result<T> = std::result::Result<T, StageError>;

/// `pipelines/sam-masks.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamMasksConfig {
    /// Which SAM: `mobile_sam` (default; the weights `make assets` fetches), `vit_b`,
    /// `vit_l`, `vit_h` (official checkpoints, brought by the user).
    pub model: String,
    /// The checkpoint file (`.pt`/`.pth` pickle or safetensors).
    pub checkpoint: PathBuf,
    /// Images per committed part of a resumable run.
    pub chunk: usize,
    /// The automatic mask generator (SAM's defaults).
    pub amg: AmgConfig,
    /// Per-image size and aspect limits; an image outside them is skipped.
    pub limits: ImageLimits,
}

impl Default for SamMasksConfig {
    fn default() -> Self {
        Self {
            model: "mobile_sam".into(),
            checkpoint: PathBuf::from("data/assets/mobile_sam/mobile_sam.pt"),
            chunk: 8,
            amg: AmgConfig::default(),
            limits: ImageLimits::default(),
        }
    }
}

impl SamMasksConfig {
    pub fn kind(&self) -> Result<SamKind> {
        SamKind::parse(&self.model).ok_or_else(|| {
            StageError::Input(format!(
                "model '{}' is not one of {}",
                self.model,
                SamKind::ALL.map(|k| k.name()).join(", ")
            ))
        })
    }
}

/// Where the images come from.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// A `sample/1` shard; proposal ids = sample ids.
    Samples(PathBuf),
    /// A folder of `.jpg`/`.jpeg`/`.png` photos (sorted by name); ids = file stems.
    Folder(PathBuf),
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct SamMasksReport {
    pub output: PathBuf,
    /// The output was already complete for this definition: nothing was computed.
    pub up_to_date: bool,
    pub images: usize,
    pub resumed: usize,
    pub skipped: usize,
    pub masks: usize,
    pub seconds: f64,
}

/// The folder's photos in name order.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd =
        std::fs::read_dir(dir).map_err(|e| StageError::Input(format!("{}: cannot list images: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(StageError::Input(format!("{}: no .jpg/.jpeg/.png images", dir.display())));
    }
    Ok(files)
}

/// A proposals record from the generator's masks.
pub fn proposal_record(id: &str, img: &RgbImage, masks: &[AmgMask], meta: serde_json::Value) -> ProposalSet {
    let mut meta = meta;
    meta["bbox_xywh"] = masks.iter().map(|m| m.bbox.to_vec()).collect::<Vec<_>>().into();
    meta["stability_score"] = masks.iter().map(|m| m.stability_score).collect::<Vec<_>>().into();
    meta["point_coords"] = masks.iter().map(|m| m.point_coords.to_vec()).collect::<Vec<_>>().into();
    meta["crop_box_xywh"] = masks.iter().map(|m| m.crop_box.to_vec()).collect::<Vec<_>>().into();
    ProposalSet {
        id: id.to_string(),
        width: img.width(),
        height: img.height(),
        masks: masks.iter().map(|m| m.segmentation.clone()).collect(),
        scores: masks.iter().map(|m| m.predicted_iou).collect(),
        meta: meta.to_string(),
    }
}

/// Runs the stage into `out` (already the shard task's path). Parts of an earlier killed
/// run with the same config and input are resumed; remove `<out>.parts` to start over (the
/// CLI's `--force` does).
pub fn run<B: Backend>(
    cfg: &SamMasksConfig,
    source: &ImageSource,
    out: &Path,
    shard: &ShardSpec,
    device: &B::Device,
) -> Result<SamMasksReport> {
    let t0 = Instant::now();
    let kind = cfg.kind()?;
    cfg.limits.validate().map_err(StageError::Input)?;
    cfg.amg.validate().map_err(|e| StageError::Input(e.to_string()))?;
    if !cfg.checkpoint.is_file() {
        return Err(StageError::Input(format!(
            "SAM checkpoint {} not found{}",
            cfg.checkpoint.display(),
            if kind == SamKind::MobileSam { " (run `make assets`)" } else { "" }
        )));
    }
    // The definition: config, checkpoint, input (the samples shard, or every photo of the
    // folder), shard task. A complete output of the same definition is not recomputed.
    let mut def = popen_core::manifest::Definition::new("sam-masks", cfg)?.input(&cfg.checkpoint)?;
    match source {
        ImageSource::Samples(p) => def = def.input(p)?,
        ImageSource::Folder(d) => {
            for f in list_images(d)? {
                def = def.input(f)?;
            }
        }
    }
    let def = def.shard(shard).ignoring(&["chunk"]);
    if def.is_complete(out) {
        return Ok(SamMasksReport {
            output: out.to_path_buf(),
            up_to_date: true,
            images: 0,
            resumed: 0,
            skipped: 0,
            masks: 0,
            seconds: 0.0,
        });
    }
    let model = Sam::<B>::load(kind, &cfg.checkpoint, device)
        .map_err(|e| StageError::Model(format!("{}: {e}", cfg.checkpoint.display())))?;
    let mut predictor = SamPredictor::new(model, SamConfig::preset(kind), device);
    let config_json = serde_json::to_value(cfg).map_err(|e| StageError::Input(e.to_string()))?;
    let mut manifest = def.manifest();
    let mut writer = ResumableWriter::<ProposalSet>::open(out, &def.hash(), cfg.chunk, false, |r| r.id.clone())?;
    let resumed = writer.resumed();
    let meta = serde_json::json!({"tool": "sam", "model": kind.name(), "amg": config_json["amg"]});
    let (mut images, mut skipped, mut masks_total) = (0usize, 0usize, 0usize);
    let mut one = |id: &str,
                   img: std::result::Result<RgbImage, String>,
                   w: &mut ResumableWriter<ProposalSet>,
                   m: &mut Manifest|
     -> Result<()> {
        images += 1;
        if w.is_done(id) {
            return Ok(());
        }
        let img = match img {
            Ok(i) => i,
            Err(why) => {
                skipped += 1;
                m.skip_warn(id, why);
                return Ok(());
            }
        };
        let masks = match generate(&mut predictor, &img, &cfg.amg, &mut |_, _| {}) {
            Ok(masks) => masks,
            // The image's own fault (too small for the crops, a side of 0 pixels at SAM's
            // input size): skip it; a model failure stops the run.
            Err(e @ AmgError::Image(_)) => {
                skipped += 1;
                m.skip_warn(id, e.to_string());
                return Ok(());
            }
            Err(e) => return Err(StageError::Model(format!("record '{id}': {e}"))),
        };
        masks_total += masks.len();
        w.write(proposal_record(id, &img, &masks, meta.clone()))?;
        Ok(())
    };
    match source {
        ImageSource::Samples(path) => {
            for_each_taken::<Sample, StageError>(path, shard, Some("sam-masks"), |s| {
                let img = popen_core::imageio::decode_rgb_limited(&s.image, Some(&s.id), &cfg.limits)
                    .map_err(|e| e.to_string());
                one(&s.id, img, &mut writer, &mut manifest)
            })?;
        }
        ImageSource::Folder(dir) => {
            let files = list_images(dir)?;
            let bar = popen_core::progress::bar(files.len() as u64, "sam-masks");
            for (pos, f) in files.iter().enumerate() {
                bar.inc(1);
                if !shard.takes(pos) {
                    continue;
                }
                let id = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                let img = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display())).and_then(|b| {
                    popen_core::imageio::decode_rgb_limited(&b, Some(&f.display().to_string()), &cfg.limits)
                        .map_err(|e| e.to_string())
                });
                one(&id, img, &mut writer, &mut manifest)?;
            }
            bar.finish();
        }
    }
    // Counts over every record of the output (resumed ones too), not only this run's.
    let mut masks_all = 0usize;
    let rows = writer.finish_visit(|r| masks_all += r.masks.len())?;
    manifest.add_output(out, Some(rows as u64))?;
    manifest.count("images", images as u64);
    manifest.count("records", rows as u64);
    manifest.count("resumed", resumed as u64);
    manifest.count("skipped", skipped as u64);
    manifest.count("masks", masks_all as u64);
    manifest.time("seconds", t0);
    manifest.write(manifest_beside(out))?;
    Ok(SamMasksReport {
        output: out.to_path_buf(),
        up_to_date: false,
        images,
        resumed,
        skipped,
        masks: masks_total,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

//! `popen collect-ps`: the segmentation preference data `P_s` (SPEC section 4, Algorithm 1).
//!
//! Per sample: the class-agnostic proposals of the clean image ([`MaskProposer`]), `N_p`
//! noise-filled copies ([`crate::noise`]), one batched teacher-forced pass of the
//! ground-truth answer per chunk of copies (SPEC 10.2: the n-th `<seg>` lines up with
//! `M_g^n`), Eq. 1 and boundary scores, curriculum selection with capped regeneration
//! ([`crate::select`]), and one `seg-pref/1` record with the three kept copies (as recipes),
//! the reference model's `f` and masks, the scores and `L_s^n`. Skipped samples are listed
//! in the manifest with their reasons. Everything is a function of (stage seed, sample id),
//! so `--shard I/N` splits and reruns give the same records.
//!
//! Two kinds of skips: the curriculum finding no pair (phase 1's extremes not reached after
//! the regenerations) is an ordinary outcome of Algorithm 1; everything else (an image or
//! mask that does not decode, no targets, missing proposals, a model error, an invalid
//! record) is a failure. Only failures count toward `max_skipped_fraction`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use popen_core::mask::{Mask, Rle};
use popen_core::shard::{for_each_taken_of, Sample, SegPref};
use popen_core::shardspec::ShardSpec;
use popen_model::bundle;
use popen_model::infer::Predictor;
use serde::{Deserialize, Serialize};

use crate::noise::{perturbation_seed, NoiseConfig, NoiseRecipe};
use crate::select::{select_with_regeneration, Outcome, Phase, Scored, SelectConfig, Targets};
use crate::{PrefsError, Result};

/// Class-agnostic object masks of a sample's clean image.
pub trait MaskProposer {
    fn name(&self) -> &str;
    fn proposals(&self, sample: &Sample) -> Result<Vec<Mask>>;
    /// What defines its proposals besides [`inputs`](Self::inputs) (the stage's definition).
    fn settings(&self) -> serde_json::Value {
        serde_json::json!(self.name())
    }
    /// Files its proposals come from (hashed into the stage's definition).
    fn inputs(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// The image's own instance masks (the embedded benchmark and MUSE annotate every object).
pub struct AnnotationProposer;

impl MaskProposer for AnnotationProposer {
    fn name(&self) -> &str {
        "annotations"
    }

    fn proposals(&self, sample: &Sample) -> Result<Vec<Mask>> {
        sample
            .instance_masks
            .iter()
            .enumerate()
            .map(|(j, r)| r.decode().map_err(|e| PrefsError::Input(format!("instance mask {j}: {e}"))))
            .collect()
    }
}

/// Proposals precomputed into `proposal/1` shards by any tool (SAM's automatic mask
/// generator: `popen sam-masks`), looked up by sample id; a sample without proposals, or with
/// proposals of another image size, is skipped with the reason.
pub struct ShardProposer {
    by_id: std::collections::HashMap<String, popen_core::shard::ProposalSet>,
    paths: Vec<PathBuf>,
}

impl ShardProposer {
    pub fn open(paths: &[impl AsRef<Path>]) -> Result<Self> {
        Ok(ShardProposer {
            by_id: popen_core::shard::read_proposals(paths)?,
            paths: paths.iter().map(|p| p.as_ref().to_path_buf()).collect(),
        })
    }
}

impl MaskProposer for ShardProposer {
    fn name(&self) -> &str {
        "shard"
    }

    fn inputs(&self) -> Vec<PathBuf> {
        self.paths.clone()
    }

    fn proposals(&self, sample: &Sample) -> Result<Vec<Mask>> {
        let p = self
            .by_id
            .get(&sample.id)
            .ok_or_else(|| PrefsError::Input(format!("no proposals for sample '{}'", sample.id)))?;
        if (p.width, p.height) != (sample.width, sample.height) {
            return Err(PrefsError::Input(format!(
                "proposals of '{}' are {}x{}, the image is {}x{}",
                sample.id, p.width, p.height, sample.width, sample.height
            )));
        }
        p.masks
            .iter()
            .enumerate()
            .map(|(j, r)| r.decode().map_err(|e| PrefsError::Input(format!("proposal {j}: {e}"))))
            .collect()
    }
}

/// SAM's automatic masks computed on the fly (the `sam` proposer): for runs without a
/// precomputed `popen sam-masks` shard. Same masks as the stage writes for the image.
pub struct SamProposer<B: burn::prelude::Backend> {
    predictor: std::cell::RefCell<popen_sam::model::SamPredictor<B>>,
    amg: popen_sam::amg::AmgConfig,
    model: String,
    checkpoint: PathBuf,
}

impl<B: burn::prelude::Backend> SamProposer<B> {
    /// Loads `cfg.checkpoint` as `cfg.model` (see `pipelines/sam-masks.toml`).
    pub fn load(cfg: &popen_sam::stage::SamMasksConfig, device: &B::Device) -> Result<Self> {
        let kind = cfg.kind().map_err(|e| PrefsError::Input(e.to_string()))?;
        cfg.amg.validate().map_err(|e| PrefsError::Input(format!("SAM generator settings: {e}")))?;
        let model = popen_sam::model::Sam::<B>::load(kind, &cfg.checkpoint, device)
            .map_err(|e| PrefsError::Input(format!("{}: {e}", cfg.checkpoint.display())))?;
        let cfg_model = popen_sam::model::SamConfig::preset(kind);
        Ok(SamProposer {
            predictor: std::cell::RefCell::new(popen_sam::model::SamPredictor::new(model, cfg_model, device)),
            amg: cfg.amg.clone(),
            model: cfg.model.clone(),
            checkpoint: cfg.checkpoint.clone(),
        })
    }
}

impl<B: burn::prelude::Backend> MaskProposer for SamProposer<B> {
    fn name(&self) -> &str {
        "sam"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({"proposer": "sam", "model": self.model, "amg": self.amg})
    }

    fn inputs(&self) -> Vec<PathBuf> {
        vec![self.checkpoint.clone()]
    }

    fn proposals(&self, sample: &Sample) -> Result<Vec<Mask>> {
        let img = popen_core::imageio::decode_rgb(&sample.image, Some(&sample.id))?;
        let mut p = self.predictor.borrow_mut();
        let masks = popen_sam::amg::generate(&mut *p, &img, &self.amg, &mut |_, _| {})
            .map_err(|e| PrefsError::Input(format!("SAM proposals of '{}': {e}", sample.id)))?;
        masks
            .iter()
            .enumerate()
            .map(|(j, m)| m.segmentation.decode().map_err(|e| PrefsError::Input(format!("SAM mask {j}: {e}"))))
            .collect()
    }
}

/// Settings of collect-ps (SPEC 9 and 10 defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectPsConfig {
    pub seed: u64,
    pub phase: Phase,
    /// `N_p`: perturbed copies per draw (paper: 30).
    pub perturbations: usize,
    /// Copies per teacher-forced forward.
    pub batch_size: usize,
    pub noise: NoiseConfig,
    pub select: SelectConfig,
    /// Records per committed part of a resumable run (a killed job loses at most this many).
    #[serde(default = "crate::default_part_records")]
    pub part_records: usize,
    /// Only this many samples of the input, spread evenly over it, before `--shard`
    /// splits them (0 = all; the CPU demo's budget).
    #[serde(default)]
    pub max_samples: usize,
    /// The run fails (no output, no manifest; committed parts kept for the rerun) when more
    /// than this fraction of its samples (records + skips, resumed records included) is
    /// skipped by a failure: an undecodable image or mask, no targets, missing proposals, a
    /// model error, an invalid record. Samples for which the curriculum selects no pair
    /// (phase 1) are an ordinary outcome and do not count. 0 = any failure fails the run,
    /// 1 = never. Default 0.5.
    #[serde(default = "crate::default_max_skipped_fraction")]
    pub max_skipped_fraction: f64,
}

impl Default for CollectPsConfig {
    fn default() -> Self {
        CollectPsConfig {
            seed: 0,
            phase: Phase::One,
            perturbations: 30,
            batch_size: 10,
            noise: NoiseConfig::default(),
            select: SelectConfig::default(),
            part_records: crate::default_part_records(),
            max_samples: 0,
            max_skipped_fraction: crate::default_max_skipped_fraction(),
        }
    }
}

impl CollectPsConfig {
    pub fn validate(&self) -> Result<()> {
        if self.part_records == 0 {
            return Err(PrefsError::Input("part_records must be >= 1".into()));
        }
        self.noise.validate()?;
        self.select.validate()?;
        if self.perturbations < self.select.phase2_top {
            return Err(PrefsError::Input(format!(
                "perturbations ({}) must be at least select.phase2_top ({}): phase 2 chooses among the top phase2_top",
                self.perturbations, self.select.phase2_top
            )));
        }
        if self.batch_size == 0 {
            return Err(PrefsError::Input("batch_size must be > 0".into()));
        }
        crate::validate_fraction("max_skipped_fraction", self.max_skipped_fraction)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CollectPsReport {
    pub output: PathBuf,
    /// The output was already complete for this definition: nothing was computed.
    pub up_to_date: bool,
    pub records: usize,
    pub skipped: usize,
    /// Skips that were failures (the rest: the curriculum selected no pair).
    pub failed: usize,
    /// Teacher-forced perturbed images (all draws).
    pub forwards: usize,
    pub seconds: f64,
}

/// The scored copies of one draw, with what the record needs from them.
struct Draw {
    recipes: Vec<NoiseRecipe>,
    f: Vec<Vec<Vec<f32>>>,
    masks: Vec<Vec<Mask>>,
}

/// Runs collect-ps on the samples `shard` takes and writes `out` plus
/// `out` with `.manifest.json`.
#[allow(clippy::too_many_arguments)]
pub fn run<B: Backend>(
    model_dir: &Path,
    samples: &Path,
    out: &Path,
    cfg: &CollectPsConfig,
    proposer: &dyn MaskProposer,
    shard: ShardSpec,
    progress: bool,
    device: &B::Device,
) -> Result<CollectPsReport> {
    cfg.validate()?;
    let t0 = Instant::now();
    let config = serde_json::json!({"config": cfg, "proposer": proposer.settings()});
    let def = crate::stage_definition("collect-ps", &config, model_dir, samples, &proposer.inputs(), &shard)?;
    let Some((bundle::Bundle { model, mut tokenizer, .. }, mut writer, mut manifest)) =
        crate::open_stage::<B, SegPref>(&def, model_dir, out, cfg.part_records, |r| r.id.clone(), device)?
    else {
        return Ok(CollectPsReport {
            output: out.to_path_buf(),
            up_to_date: true,
            records: 0,
            skipped: 0,
            failed: 0,
            forwards: 0,
            seconds: 0.0,
        });
    };
    let predictor = Predictor::new(&model, &mut tokenizer).map_err(|e| PrefsError::Input(format!("model: {e}")))?;
    let (mut records, mut forwards) = (0usize, 0usize);
    let mut ledger = crate::SkipLedger::new("collect-ps", cfg.max_skipped_fraction, 0);
    let mut position = std::collections::HashMap::new();
    for_each_taken_of(samples, &shard, cfg.max_samples, progress.then_some("collect-ps"), |s: Sample| -> Result<()> {
        position.insert(s.id.clone(), position.len());
        if writer.is_done(&s.id) {
            return Ok(());
        }
        match collect_one(&predictor, &s, cfg, proposer, &mut forwards) {
            Ok(r) => {
                writer.write(r)?;
                records += 1;
                ledger.ok();
            }
            Err(Skip { reason, failure }) => {
                let counts = failure.is_some();
                ledger.skip(&mut manifest, &s.id, reason, failure.unwrap_or("no pair selected"), None, counts);
            }
        }
        Ok(())
    })?;
    if let Err(e) = ledger.check_end(records + writer.resumed()) {
        writer.commit()?;
        return Err(e);
    }
    let (skipped, failed) = (ledger.skipped(), ledger.counted());
    crate::close_stage(
        writer,
        manifest,
        out,
        |_| None,
        &[("skipped", skipped), ("skipped_failures", failed), ("forwards_this_run", forwards)],
        t0,
        &position,
        |r| &r.id,
    )?;
    Ok(CollectPsReport {
        output: out.to_path_buf(),
        up_to_date: false,
        records,
        skipped,
        failed,
        forwards,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Why a sample has no record: `failure` names the failing step (grouping key of
/// `max_skipped_fraction`); None: the curriculum selected no pair (an ordinary outcome).
struct Skip {
    reason: String,
    failure: Option<&'static str>,
}

impl Skip {
    fn failure(what: &'static str, reason: String) -> Self {
        Skip { reason, failure: Some(what) }
    }
}

fn collect_one<B: Backend>(
    predictor: &Predictor<'_, B>,
    s: &Sample,
    cfg: &CollectPsConfig,
    proposer: &dyn MaskProposer,
    forwards: &mut usize,
) -> std::result::Result<SegPref, Skip> {
    let skip = |what: &'static str, e: String| Skip::failure(what, format!("{what}: {e}"));
    let image = s.decode_image().map_err(|e| skip("image", e.to_string()))?;
    let gt: Vec<Mask> = s
        .target_masks
        .iter()
        .enumerate()
        .map(|(n, r)| r.decode().map_err(|e| Skip::failure("target mask", format!("target mask {n}: {e}"))))
        .collect::<std::result::Result<_, _>>()?;
    if gt.is_empty() {
        return Err(Skip::failure("no targets", "no targets: nothing to segment".into()));
    }
    let proposals = proposer.proposals(s).map_err(|e| skip("proposals", e.to_string()))?;
    let targets = Targets::new(&gt, &proposals, &cfg.select).map_err(|e| skip("targets", e.to_string()))?;
    let (w, h) = image.dimensions();
    let mut kept_draws: Vec<Draw> = Vec::new();
    let outcome = select_with_regeneration(cfg.phase, &cfg.select, |draw| {
        let recipes: Vec<NoiseRecipe> = (0..cfg.perturbations)
            .map(|i| NoiseRecipe::draw(perturbation_seed(cfg.seed, &s.id, draw, i as u32), w, h, &cfg.noise))
            .collect::<popen_core::Result<_>>()?;
        let mut d = Draw { recipes, f: Vec::new(), masks: Vec::new() };
        let mut scored: Vec<Scored> = Vec::with_capacity(cfg.perturbations);
        for chunk in d.recipes.chunks(cfg.batch_size) {
            let imgs: Vec<image::RgbImage> =
                chunk.iter().map(|r| r.apply(&image)).collect::<popen_core::Result<_>>()?;
            let items: Vec<(&image::RgbImage, &str, &str)> =
                imgs.iter().map(|im| (im, s.instruction.as_str(), s.answer.as_str())).collect();
            let forced = predictor.teacher_force(&items).map_err(|e| PrefsError::Input(format!("model: {e}")))?;
            *forwards += forced.len();
            for f in forced {
                if f.masks.len() != gt.len() {
                    return Err(PrefsError::Input(format!(
                        "the answer gives {} masks for {} targets",
                        f.masks.len(),
                        gt.len()
                    )));
                }
                scored.push(targets.score(&f.masks)?);
                d.f.push(f.f);
                d.masks.push(f.masks);
            }
        }
        kept_draws.clear();
        kept_draws.push(d);
        Ok(scored)
    })
    .map_err(|e| skip("collect", e.to_string()))?;
    let (draw_no, sel, scored) = match outcome {
        Outcome::Selected { batch, selection, scored } => (batch, selection, scored),
        Outcome::Skipped { reason, .. } => return Err(Skip { reason, failure: None }),
    };
    let d = kept_draws.pop().expect("the selected draw is kept");
    let n = gt.len();
    let f_dim = d.f[sel.kept[0]].first().map(|v| v.len()).unwrap_or(0);
    let mut rec = SegPref {
        id: s.id.clone(),
        split: s.split.clone(),
        image: s.image.clone(),
        width: s.width,
        height: s.height,
        instruction: s.instruction.clone(),
        answer: s.answer.clone(),
        phase: match cfg.phase {
            Phase::One => 1,
            Phase::Two => 2,
        },
        draw: draw_no,
        noise_seed: Vec::new(),
        noise_rect: Vec::new(),
        noise_sigma: Vec::new(),
        target_masks: s.target_masks.clone(),
        f_dim: f_dim as u32,
        ref_f: Vec::with_capacity(3 * n * f_dim),
        ref_masks: Vec::with_capacity(3 * n),
        s: Vec::new(),
        b: Vec::new(),
        s_terms: Vec::new(),
        b_terms: Vec::new(),
        rankings: sel.rankings.iter().flat_map(|r| r.iter().map(|&x| x as i32)).collect(),
        meta: serde_json::json!({"kept": sel.kept, "proposals": proposals.len()}).to_string(),
    };
    for &k in &sel.kept {
        let r = &d.recipes[k];
        rec.noise_seed.push(r.seed);
        rec.noise_rect.extend([r.x, r.y, r.width, r.height]);
        rec.noise_sigma.push(r.sigma);
        for v in &d.f[k] {
            rec.ref_f.extend_from_slice(v);
        }
        rec.ref_masks.extend(d.masks[k].iter().map(Rle::encode));
        rec.s.push(scored[k].s as f32);
        rec.b.push(scored[k].b as f32);
        rec.s_terms.extend(scored[k].s_terms.iter().map(|&x| x as f32));
        rec.b_terms.extend(scored[k].b_terms.iter().map(|&x| x as f32));
    }
    if let Err((field, msg)) = rec.validate() {
        return Err(Skip::failure("record", format!("record field '{field}': {msg}")));
    }
    Ok(rec)
}

//! The preference-optimization stage (`popen dpo`, SPEC section 5): the policy, initialised
//! from the SFT model folder, trains on
//!
//! ```text
//! L = L_t + L_s + L_ce
//! L_t   text DPO (Eq. 2) over the lambda-weighted sequence log-likelihood (Eq. 3) on P_t
//! L_s   segmentation preference (Eq. 4) on P_s: the policy's f on each target's median
//!       perturbed image against the recorded reference embeddings, with the indicator
//! L_ce  PixelLM's mask loss (bce_weight BCE + dice_weight DICE) of the policy's masks
//!       against ground truth on the P_s records' clean images (SPEC 10.11)
//! ```
//!
//! The reference model is implicit: its per-token log-probs (P_t) and segmentation
//! embeddings and scores (P_s) come from the shards, so no second model is loaded. Each
//! optimizer step draws `grad_accum` micro-batches, each a P_t batch and a P_s batch; the
//! P_s batches come from the phase-1 shard during the first half of the steps and from the
//! phase-2 shard during the second half (the curriculum). The pixel decoder (and a SAM
//! encoder) is always frozen.
//!
//! Data order, resume, checkpoints, metrics files and the final model folder work as in the
//! SFT stage ([`crate::sft`], [`crate::stage`]): everything that decides a step is a function
//! of (seed, step), so `--resume` continues bit for bit.
//!
//! The indicator of Eq. 4 compares, per target, the reference's best score (the recorded
//! Eq. 1 term in phase 1, boundary IoU in phase 2, SPEC 10.10) with the same score of the
//! policy's mask on the median image, computed every step. Eq. 1's term needs the clean
//! image's class-agnostic proposals (what collect-ps scored with): the samples shard's
//! instance masks (the `annotations` proposer) or `proposal/1` shards (`--proposals`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use popen_core::manifest::Manifest;
use popen_core::mask::{Mask, Rle};
use popen_core::segpref::noise::NoiseRecipe;
use popen_core::segpref::select::{SelectConfig, Targets};
use popen_core::shard::{read_shard, SegPref, TextPref};
use popen_model::bundle;
use popen_model::pixellm::{Padding, Part, Segment};
use popen_model::preprocess::{Preprocessed, Preprocessor};
use popen_model::tokenizer::Piece;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{Decay, LoraConfig, Precision, Trainable};
use crate::data::{self, Order};
use crate::dpo_loss::{self, SegDpoInput, SeqNorm};
use crate::loss;
use crate::metrics::{curve, opt, MetricsRow};
use crate::params;
use crate::stage;
use crate::stage::SftModel;
use crate::train_loop::Timing;
use crate::{io_err, Result, TrainError};

/// Which score of the policy's median mask the phase-1 indicator compares with the
/// reference's best (SPEC 10.10: the phase's score).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase1Score {
    /// Eq. 1's per-target term `IoU(M, M_g) - max_j IoU(M, M_s^j)` over the proposals that
    /// are not the target (needs the clean images' proposals: `--samples` or `--proposals`).
    STerm,
    /// `IoU(M, M_g)` alone, for the reference's best mask (recomputed from the recorded
    /// masks) and the policy's: for P_s collected with proposals that are not at hand.
    Iou,
}

/// The ablations of the paper's Tables 4-5 (all off = POPEN).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ablation {
    /// Without L_t: no P_t forward, no text gradient; the text metrics are empty.
    pub no_text_loss: bool,
    /// Without L_s (Eq. 4); the mask loss L_ce on the P_s clean images stays (set
    /// `bce_weight = dice_weight = 0` to drop it too).
    pub no_seg_loss: bool,
    /// Without lambda: Eq. 3 with lambda = 1 (every token weighs the same).
    pub no_lambda: bool,
    /// Without the indicator: every target of Eq. 4 counts, whatever the policy's mask.
    pub no_indicator: bool,
    /// Random P_s instead of the curriculum's preference: for every record and target,
    /// `L_s^n` is replaced by a random order of the three kept images (ChaCha8 seeded by
    /// (seed, record id, target)), so which image is "best", "median" and "worst" is chance;
    /// embeddings and images stay the recorded ones. (The paper's "random P_s collection"
    /// also picks the three images at random at collection time; that needs collect-ps.)
    pub random_ps: bool,
    /// One phase: no curriculum split; the records of both P_s shards form one pool, drawn
    /// in one shuffled order over all steps.
    pub one_phase: bool,
}

/// Every knob of the DPO stage (SPEC 5, 9, 10); TOML in `pipelines/dpo-*.toml`,
/// `popen dpo --print-config` prints the defaults (the paper's values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    /// Seed of the data orders, dropout and `random_ps`.
    pub seed: u64,
    /// Passes over the larger of P_t and P_s (phase 1 + phase 2) (paper: 2). `max_steps` > 0
    /// stops earlier.
    pub epochs: usize,
    /// Optimizer steps to run at most (0 = no limit besides `epochs`).
    pub max_steps: usize,
    /// P_t pairs per micro-batch.
    pub batch_size: usize,
    /// P_s records per micro-batch.
    pub seg_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// AdamW (paper: lr 3e-4, betas 0.9 / 0.95, weight decay 0).
    pub lr: f64,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Linear warmup steps, then `decay` (paper: 100, warmup-decay).
    pub warmup_steps: usize,
    pub decay: Decay,
    pub min_lr: f64,
    /// Global gradient-norm clipping (0 = off).
    pub grad_clip: f32,
    /// Eq. 2's beta_t (paper 0.5).
    pub beta_t: f64,
    /// Eq. 3's lambda, the weight of changed tokens (paper 5).
    pub lambda: f64,
    /// Eq. 3's divisor: `length` (the paper's 1/|y|) or `weighted_count` (RLHF-V's average,
    /// divided by the sum of the token weights).
    pub seq_norm: SeqNorm,
    /// Eq. 4's beta_s (paper 10).
    pub beta_s: f64,
    /// Not in the paper (0 = the paper's L_t): adds `chosen_nll` times the mean token
    /// cross-entropy of the corrected answers y_c to L_t (DPO + NLL, as RPO), which keeps a
    /// small model from lowering the likelihood of both answers until its text degrades
    /// (the tiny preset; README "POPEN end to end").
    #[serde(default)]
    pub chosen_nll: f32,
    /// L_ce = bce_weight BCE + dice_weight DICE (PixelLM: 2.0, 0.5).
    pub bce_weight: f32,
    pub dice_weight: f32,
    /// The phase-1 indicator's score ([`Phase1Score`]).
    pub phase1_score: Phase1Score,
    /// As collect-ps: a proposal with IoU >= this against the target is the target (Eq. 1).
    pub same_object_iou: f64,
    /// As collect-ps: Boundary IoU band as a fraction of the image diagonal.
    pub boundary_dilation: f64,
    /// Records whose prompt + answer exceed this many tokens are skipped and listed.
    pub max_len: usize,
    pub trainable: Trainable,
    /// Top-level modules kept frozen besides `trainable`; the pixel decoder is frozen always.
    pub freeze: Vec<String>,
    pub lora: LoraConfig,
    pub precision: Precision,
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    pub log_every: usize,
    #[serde(default)]
    pub ablation: Ablation,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            seed: 0,
            epochs: 2,
            max_steps: 0,
            batch_size: 16,
            seg_batch_size: 16,
            grad_accum: 1,
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 100,
            decay: Decay::Linear,
            min_lr: 0.0,
            grad_clip: 1.0,
            beta_t: dpo_loss::BETA_T,
            lambda: dpo_loss::LAMBDA,
            seq_norm: SeqNorm::Length,
            beta_s: dpo_loss::BETA_S,
            chosen_nll: 0.0,
            bce_weight: 2.0,
            dice_weight: 0.5,
            phase1_score: Phase1Score::STerm,
            same_object_iou: 0.5,
            boundary_dilation: 0.02,
            max_len: 512,
            trainable: Trainable::Lora,
            freeze: Vec::new(),
            lora: LoraConfig::default(),
            precision: Precision::Bf16,
            checkpoint_every: 500,
            keep_checkpoints: 2,
            log_every: 10,
            ablation: Ablation::default(),
        }
    }
}

crate::config::stage_config!(DpoConfig);

impl DpoConfig {
    /// Whether the stage reads P_t / P_s at all.
    pub fn uses_text(&self) -> bool {
        !self.ablation.no_text_loss
    }

    pub fn uses_seg(&self) -> bool {
        !self.ablation.no_seg_loss || self.bce_weight > 0.0 || self.dice_weight > 0.0
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let pos = |name: &str, v: usize| if v == 0 { Err(format!("{name} must be > 0")) } else { Ok(()) };
        pos("batch_size", self.batch_size)?;
        pos("seg_batch_size", self.seg_batch_size)?;
        pos("grad_accum", self.grad_accum)?;
        pos("checkpoint_every", self.checkpoint_every)?;
        pos("log_every", self.log_every)?;
        pos("max_len", self.max_len)?;
        pos("keep_checkpoints", self.keep_checkpoints)?;
        crate::config::check_optimizer(crate::config::OptimizerKnobs {
            epochs: self.epochs,
            max_steps: self.max_steps,
            lr: self.lr,
            min_lr: self.min_lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
        })?;
        for (n, v) in [("beta_t", self.beta_t), ("lambda", self.lambda), ("beta_s", self.beta_s)] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("{n} = {v} must be > 0"));
            }
        }
        if !(self.bce_weight >= 0.0 && self.dice_weight >= 0.0) {
            return Err("bce_weight and dice_weight must be >= 0".into());
        }
        if !(0.0..=1.0).contains(&self.same_object_iou) || !(self.boundary_dilation > 0.0) {
            return Err("same_object_iou must be in [0, 1] and boundary_dilation > 0".into());
        }
        if !self.uses_text() && !self.uses_seg() {
            return Err("ablation.no_text_loss and no_seg_loss with zero mask-loss weights: nothing to train".into());
        }
        for f in &self.freeze {
            if !params::FREEZABLE.contains(&f.as_str()) {
                return Err(format!("freeze: unknown module '{f}' (one of {})", params::FREEZABLE.join(", ")));
            }
        }
        if self.trainable == Trainable::Lora {
            if self.lora.r == 0 || self.lora.targets.is_empty() {
                return Err("lora.r must be > 0 and lora.targets non-empty".into());
            }
            if !(0.0..1.0).contains(&self.lora.dropout) {
                return Err(format!("lora.dropout = {} must be in [0, 1)", self.lora.dropout));
            }
            for t in &self.lora.targets {
                if !params::LORA_TARGETS.contains(&t.as_str()) {
                    return Err(format!(
                        "lora.targets: unknown projection '{t}' (one of {})",
                        params::LORA_TARGETS.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }

    /// Eq. 3's lambda after the `no_lambda` ablation.
    pub fn effective_lambda(&self) -> f64 {
        if self.ablation.no_lambda {
            1.0
        } else {
            self.lambda
        }
    }
}

// ---- data ----

/// An image a batch shows: an encoded clean image, possibly with a noise recipe on top.
#[derive(Debug, Clone)]
struct ImageSrc {
    bytes: Arc<Vec<u8>>,
    recipe: Option<NoiseRecipe>,
    /// Whose image (for errors).
    label: String,
}

impl ImageSrc {
    fn decode(&self) -> Result<image::RgbImage> {
        let img = popen_core::imageio::decode_rgb(&self.bytes, Some(&self.label))
            .map_err(|e| TrainError::Data(e.to_string()))?;
        match &self.recipe {
            None => Ok(img),
            Some(r) => r.apply(&img).map_err(|e| TrainError::Data(format!("{}: {e}", self.label))),
        }
    }
}

/// The distinct images of the stage (clean images shared by P_t and P_s records of one
/// sample; perturbed copies keyed by their recipe).
#[derive(Default)]
struct Images {
    list: Vec<ImageSrc>,
    digests: Vec<[u8; 32]>,
    /// Per image: sha256 of its bytes and recipe (its SAM cache key).
    keys: Vec<String>,
    index: HashMap<([u8; 32], Option<(u64, u32, u32, u32, u32, u32)>), usize>,
    /// The frozen SAM encoder's embeddings (tiny-sam), computed when a batch first shows an
    /// image (one image at a time, so the values do not depend on the batch) and kept.
    sam: Option<crate::stage::SamMemo>,
}

impl Images {
    fn add(&mut self, bytes: &[u8], recipe: Option<NoiseRecipe>, label: String) -> usize {
        use sha2::{Digest, Sha256};
        let d: [u8; 32] = Sha256::digest(bytes).into();
        let rk = recipe.as_ref().map(|r| (r.seed, r.x, r.y, r.width, r.height, r.sigma.to_bits()));
        if let Some(&i) = self.index.get(&(d, rk)) {
            return i;
        }
        // Share the bytes with an earlier entry of the same clean image.
        let shared = self.digests.iter().position(|x| *x == d).map(|i| self.list[i].bytes.clone());
        let bytes = shared.unwrap_or_else(|| Arc::new(bytes.to_vec()));
        let rj = recipe.as_ref().map(|r| serde_json::to_vec(r).expect("recipe serializes"));
        self.keys.push(crate::stage::sam_image_key(&bytes, rj.as_deref()));
        self.list.push(ImageSrc { bytes, recipe, label });
        self.digests.push(d);
        self.index.insert((d, rk), self.list.len() - 1);
        self.list.len() - 1
    }
}

/// One usable P_t pair.
#[derive(Debug, Clone)]
struct TextItem {
    id: String,
    image: usize,
    prompt: Vec<Piece>,
    chosen: Vec<u32>,
    rejected: Vec<u32>,
    changed_chosen: Vec<usize>,
    changed_rejected: Vec<usize>,
    ref_chosen: Vec<f32>,
    ref_rejected: Vec<f32>,
}

/// One usable P_s record.
#[derive(Debug, Clone)]
struct SegItem {
    id: String,
    phase: u32,
    clean: usize,
    prompt: Vec<Piece>,
    answer: Vec<u32>,
    groups: Vec<Vec<usize>>,
    targets: Vec<Rle>,
    /// Distinct median images: image index; `median_of[n]` = position in this list.
    medians: Vec<usize>,
    median_of: Vec<usize>,
    /// Reference embeddings [N * f_dim] of each target's best, median and worst images.
    f_w: Vec<f32>,
    f_m: Vec<f32>,
    f_l: Vec<f32>,
    /// The reference's best score per target (the phase's criterion).
    ref_best: Vec<f32>,
    /// The clean image's proposals (phase-1 s-term indicator).
    proposals: Option<Vec<Rle>>,
}

/// Where a record was skipped and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub file: String,
    pub id: String,
    pub reason: String,
}

fn file_name(p: &Path) -> String {
    p.display().to_string()
}

/// The ranking `L_s^n` used for target n (the recorded one, or a random order under
/// `random_ps`).
pub fn effective_ranking(rec: &SegPref, n: usize, cfg: &DpoConfig) -> [usize; 3] {
    let r = rec.ranking(n);
    let rec_order = [r[0] as usize, r[1] as usize, r[2] as usize];
    if !cfg.ablation.random_ps {
        return rec_order;
    }
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(cfg.seed.to_le_bytes());
    h.update(rec.id.as_bytes());
    h.update((n as u64).to_le_bytes());
    let d = h.finalize();
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&d);
    let mut rng = ChaCha8Rng::from_seed(seed);
    let mut o = [0usize, 1, 2];
    o.shuffle(&mut rng);
    o
}

fn token_ids(v: &[i32], vocab: usize, file: &Path, id: &str, field: &str) -> Result<Vec<u32>> {
    v.iter()
        .map(|&x| {
            if x < 0 || x as usize >= vocab {
                Err(TrainError::Data(format!(
                    "{}: record '{id}': field '{field}': token id {x} is outside the model's vocabulary of {vocab} (collected with another tokenizer?)",
                    file_name(file)
                )))
            } else {
                Ok(x as u32)
            }
        })
        .collect()
}

struct Prepared {
    text: Vec<TextItem>,
    /// P_s items of phase 1 and phase 2 (as the shards hold them).
    seg: [Vec<SegItem>; 2],
    skipped: Vec<Skipped>,
    images: Images,
    counts: [usize; 3],
}

struct Ctx<'a> {
    tok: &'a popen_model::tokenizer::Tokenizer,
    tokens: &'a popen_model::tokenizer::PixelLmTokens,
    group_len: usize,
    image_tokens: usize,
    vocab: usize,
    f_dim: usize,
    cfg: &'a DpoConfig,
}

fn prepare_text(
    path: &Path,
    ctx: &Ctx,
    images: &mut Images,
    skipped: &mut Vec<Skipped>,
) -> Result<(Vec<TextItem>, usize)> {
    let recs = read_shard::<TextPref>(path)?;
    let n = recs.len();
    let mut out = Vec::with_capacity(n);
    for r in recs {
        let skip = |reason: String| Skipped { file: file_name(path), id: r.id.clone(), reason };
        let chosen = token_ids(&r.y_c_ids, ctx.vocab, path, &r.id, "y_c_ids")?;
        let rejected = token_ids(&r.y_ids, ctx.vocab, path, &r.id, "y_ids")?;
        let prompt = match data::prompt_pieces(ctx.tok, &r.instruction) {
            Ok(p) => p,
            Err(e) => {
                skipped.push(skip(e));
                continue;
            }
        };
        let pl = data::prompt_len(&prompt, ctx.image_tokens);
        let longest = chosen.len().max(rejected.len());
        if pl + longest > ctx.cfg.max_len {
            skipped.push(skip(format!(
                "{} tokens (prompt {pl} + answer {longest}) exceed max_len {}",
                pl + longest,
                ctx.cfg.max_len
            )));
            continue;
        }
        let image = images.add(&r.image, None, format!("P_t record '{}'", r.id));
        out.push(TextItem {
            id: r.id.clone(),
            image,
            prompt,
            chosen,
            rejected,
            changed_chosen: r.l_yc.iter().map(|&x| x as usize).collect(),
            changed_rejected: r.l_y.iter().map(|&x| x as usize).collect(),
            ref_chosen: r.ref_logp_yc,
            ref_rejected: r.ref_logp_y,
        });
    }
    Ok((out, n))
}

/// Proposals of the clean images by sample id (phase-1 s-term indicator).
pub enum ProposalSource<'a> {
    None,
    /// A samples shard: its instance masks (collect-ps' `annotations` proposer).
    Samples(&'a Path),
    /// `proposal/1` shards (collect-ps `--proposals`).
    Shards(&'a [PathBuf]),
}

fn load_proposals(src: &ProposalSource, ids: &std::collections::HashSet<String>) -> Result<HashMap<String, Vec<Rle>>> {
    let mut out = HashMap::new();
    match src {
        ProposalSource::None => {}
        ProposalSource::Samples(p) => {
            for s in read_shard::<popen_core::shard::Sample>(p)? {
                if ids.contains(&s.id) {
                    out.insert(s.id, s.instance_masks);
                }
            }
        }
        ProposalSource::Shards(paths) => {
            for (id, set) in popen_core::shard::read_proposals(paths)? {
                if ids.contains(&id) {
                    out.insert(id, set.masks);
                }
            }
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn prepare_seg(
    path: &Path,
    phase: u32,
    ctx: &Ctx,
    images: &mut Images,
    skipped: &mut Vec<Skipped>,
    proposals: &ProposalSource,
    needs_proposals: bool,
) -> Result<(Vec<SegItem>, usize)> {
    let recs = read_shard::<SegPref>(path)?;
    let n_recs = recs.len();
    let ids: std::collections::HashSet<String> = recs.iter().map(|r| r.id.clone()).collect();
    let props = if needs_proposals && !recs.is_empty() {
        if matches!(proposals, ProposalSource::None) {
            return Err(TrainError::Config(format!(
                "{}: the phase-1 indicator compares Eq. 1's term, which needs the clean images' proposals: pass the samples shard collect-ps read (--samples, its instance masks) or its --proposals shards, or set phase1_score = \"iou\" (or ablation.no_indicator)",
                file_name(path)
            )));
        }
        load_proposals(proposals, &ids)?
    } else {
        HashMap::new()
    };
    let mut out = Vec::with_capacity(n_recs);
    for r in recs {
        let err = |field: &str, msg: String| {
            TrainError::Data(format!("{}: record '{}': field '{field}': {msg}", file_name(path), r.id))
        };
        if r.phase != phase {
            return Err(err("phase", format!("{} in the phase-{phase} input", r.phase)));
        }
        if r.f_dim as usize != ctx.f_dim {
            return Err(err(
                "f_dim",
                format!("{} but the model's segmentation embedding has {} values (scales x out_dim); the record was collected with another model", r.f_dim, ctx.f_dim),
            ));
        }
        let skip = |reason: String| Skipped { file: file_name(path), id: r.id.clone(), reason };
        let prompt = match data::prompt_pieces(ctx.tok, &r.instruction) {
            Ok(p) => p,
            Err(e) => {
                skipped.push(skip(e));
                continue;
            }
        };
        let (answer, groups) = match data::answer_with_groups(ctx.tok, ctx.tokens, &r.answer, ctx.group_len) {
            Ok(v) => v,
            Err(e) => {
                skipped.push(skip(e));
                continue;
            }
        };
        let nt = r.targets();
        if groups.len() != nt {
            skipped.push(skip(format!("answer has {} seg groups but the record has {nt} targets", groups.len())));
            continue;
        }
        let pl = data::prompt_len(&prompt, ctx.image_tokens);
        if pl + answer.len() > ctx.cfg.max_len {
            skipped.push(skip(format!(
                "{} tokens (prompt {pl} + answer {}) exceed max_len {}",
                pl + answer.len(),
                answer.len(),
                ctx.cfg.max_len
            )));
            continue;
        }
        let proposals_of = if needs_proposals {
            match props.get(&r.id) {
                Some(p) => Some(p.clone()),
                None => {
                    return Err(err(
                        "id",
                        "no proposals for this sample in the given --samples / --proposals (the phase-1 indicator needs them)".into(),
                    ))
                }
            }
        } else {
            None
        };
        let clean = images.add(&r.image, None, format!("P_s record '{}'", r.id));
        let d = ctx.f_dim;
        let (mut f_w, mut f_m, mut f_l) =
            (Vec::with_capacity(nt * d), Vec::with_capacity(nt * d), Vec::with_capacity(nt * d));
        let mut medians: Vec<usize> = Vec::new();
        let mut median_kept: Vec<usize> = Vec::new();
        let mut median_of = Vec::with_capacity(nt);
        let mut ref_best = Vec::with_capacity(nt);
        let targets_masks: Option<Vec<Mask>> = if phase == 1 && ctx.cfg.phase1_score == Phase1Score::Iou {
            Some(
                r.target_masks
                    .iter()
                    .map(|m| m.decode())
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|e| err("target_masks", e.to_string()))?,
            )
        } else {
            None
        };
        for t in 0..nt {
            let [w, m, l] = effective_ranking(&r, t, ctx.cfg);
            f_w.extend_from_slice(r.f(w, t));
            f_m.extend_from_slice(r.f(m, t));
            f_l.extend_from_slice(r.f(l, t));
            let pos = match median_kept.iter().position(|&k| k == m) {
                Some(p) => p,
                None => {
                    let rect = &r.noise_rect[4 * m..4 * m + 4];
                    let recipe = NoiseRecipe {
                        seed: r.noise_seed[m],
                        x: rect[0],
                        y: rect[1],
                        width: rect[2],
                        height: rect[3],
                        sigma: r.noise_sigma[m],
                    };
                    medians.push(images.add(&r.image, Some(recipe), format!("P_s record '{}' kept image {m}", r.id)));
                    median_kept.push(m);
                    medians.len() - 1
                }
            };
            median_of.push(pos);
            let at = w * nt + t;
            ref_best.push(match (phase, &targets_masks) {
                (1, Some(gt)) => {
                    let mk = r.ref_masks[at].decode().map_err(|e| err("ref_masks", e.to_string()))?;
                    popen_core::mask::iou(&mk, &gt[t]).map_err(|e| err("ref_masks", e.to_string()))? as f32
                }
                (1, None) => r.s_terms[at],
                _ => r.b_terms[at],
            });
        }
        out.push(SegItem {
            id: r.id.clone(),
            phase,
            clean,
            prompt,
            answer,
            groups,
            targets: r.target_masks.clone(),
            medians,
            median_of,
            f_w,
            f_m,
            f_l,
            ref_best,
            proposals: proposals_of,
        });
    }
    Ok((out, n_recs))
}

/// Mean cosine similarities over the targets of `items` between the recorded reference
/// embeddings (each the concatenation of its scales, `dim` values): (f_w, f_l) and (f_m, f_w).
fn reference_spread(items: &[SegItem], dim: usize) -> (f64, f64) {
    use crate::ensemble_loss::cos;
    let (mut wl, mut mw, mut n) = (0.0, 0.0, 0usize);
    for it in items {
        for ((w, m), l) in it.f_w.chunks(dim.max(1)).zip(it.f_m.chunks(dim.max(1))).zip(it.f_l.chunks(dim.max(1))) {
            wl += cos(w, l);
            mw += cos(m, w);
            n += 1;
        }
    }
    let n = n.max(1) as f64;
    (wl / n, mw / n)
}

// ---- batches and the loss ----

/// Preprocessed images of one micro-batch and their SAM embeddings.
struct BatchImages {
    pre: Vec<Preprocessed>,
    sam: Option<(Vec<f32>, [usize; 4])>,
    /// image index -> slot.
    slot: HashMap<usize, usize>,
}

fn batch_images<B: Backend>(
    model: &popen_model::pixellm::PixelLm<B>,
    images: &Images,
    wanted: &[usize],
    pre: &Preprocessor,
) -> Result<BatchImages> {
    let mut slot = HashMap::new();
    let mut order = Vec::new();
    for &i in wanted {
        if let std::collections::hash_map::Entry::Vacant(e) = slot.entry(i) {
            e.insert(order.len());
            order.push(i);
        }
    }
    let mut out = Vec::with_capacity(order.len());
    for &i in &order {
        let img = images.list[i].decode()?;
        out.push(pre.apply(&img).map_err(|e| TrainError::Data(format!("{}: {e}", images.list[i].label)))?);
    }
    let sam = match &images.sam {
        None => None,
        Some(sm) => {
            let keys: Vec<&str> = order.iter().map(|&i| images.keys[i].as_str()).collect();
            Some(sm.batch(model, &out, &keys)?)
        }
    };
    Ok(BatchImages { pre: out, sam, slot })
}

fn rows_of<B: Backend>(prompt: &[Piece], slot: usize, answer: &[u32]) -> Vec<Part<B>> {
    let mut parts: Vec<Part<B>> = prompt
        .iter()
        .map(|pc| match pc {
            Piece::Tokens(t) => Part::new(Segment::Tokens(t.clone())),
            Piece::Image => Part::new(Segment::Image(slot)),
        })
        .collect();
    parts.push(Part::new(Segment::Tokens(answer.to_vec())));
    parts
}

fn vals<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap_or_default()
}

/// Loss values and metrics of one micro-batch.
#[derive(Debug, Clone, Default)]
struct MicroStats {
    loss: f32,
    text: Option<dpo_loss::DpoMetrics>,
    /// Mean token cross-entropy of y_c (before the `chosen_nll` weight), when that is on.
    nll: Option<f32>,
    seg: Option<dpo_loss::SegDpoMetrics>,
    bce: f32,
    dice: f32,
    masks: usize,
    pairs: usize,
    records: usize,
}

/// L_t of a P_t micro-batch: Eq. 3 for both answers of every pair in one forward, Eq. 2.
fn text_loss<B: Backend>(
    model: &SftModel<B>,
    items: &[&TextItem],
    images: &Images,
    pre: &Preprocessor,
    cfg: &DpoConfig,
) -> Result<(Tensor<B, 1>, dpo_loss::DpoMetrics, Option<f32>)> {
    let m = &model.pixellm;
    let device = m.llm.model.embed_tokens.weight.device();
    let wanted: Vec<usize> = items.iter().map(|t| t.image).collect();
    let bi = batch_images(m, images, &wanted, pre)?;
    let sam = bi.sam.map(|(v, s)| Tensor::<B, 4>::from_data(TensorData::new(v, s), &device));
    let feats = m.encode_images_with(&bi.pre, sam)?;
    let b = items.len();
    let mut rows = Vec::with_capacity(2 * b);
    for it in items {
        rows.push(rows_of::<B>(&it.prompt, bi.slot[&it.image], &it.chosen));
    }
    for it in items {
        rows.push(rows_of::<B>(&it.prompt, bi.slot[&it.image], &it.rejected));
    }
    let asm = m.assemble(&rows, Some(&feats), Padding::Right)?;
    let hidden = m.forward_hidden(&asm)?;
    let answers: Vec<&Vec<u32>> = items.iter().map(|t| &t.chosen).chain(items.iter().map(|t| &t.rejected)).collect();
    let targets: Vec<(usize, Vec<u32>)> =
        asm.piece_starts.iter().zip(&answers).map(|(s, a)| (*s.last().expect("answer part"), (*a).clone())).collect();
    let lp = m.response_logprobs(hidden, &targets)?;
    let [_, max] = lp.dims();
    let lp_c = lp.clone().slice([0..b, 0..max]);
    let lp_r = lp.slice([b..2 * b, 0..max]);
    let lens_c: Vec<usize> = items.iter().map(|t| t.chosen.len()).collect();
    let lens_r: Vec<usize> = items.iter().map(|t| t.rejected.len()).collect();
    let ch_c: Vec<Vec<usize>> = items.iter().map(|t| t.changed_chosen.clone()).collect();
    let ch_r: Vec<Vec<usize>> = items.iter().map(|t| t.changed_rejected.clone()).collect();
    let lambda = cfg.effective_lambda();
    let nll = (cfg.chosen_nll > 0.0).then(|| crate::loss::text_ce(lp_c.clone(), &lens_c).0);
    let pc = dpo_loss::weighted_logp(lp_c, &lens_c, &ch_c, lambda, cfg.seq_norm)?;
    let pr = dpo_loss::weighted_logp(lp_r, &lens_r, &ch_r, lambda, cfg.seq_norm)?;
    let padded = |rows: Vec<&Vec<f32>>, max: usize| {
        let mut v = vec![0f32; rows.len() * max];
        for (r, x) in rows.iter().enumerate() {
            v[r * max..r * max + x.len()].copy_from_slice(x);
        }
        Tensor::<B, 2>::from_data(TensorData::new(v, [rows.len(), max]), &device)
    };
    let rc = dpo_loss::weighted_logp(
        padded(items.iter().map(|t| &t.ref_chosen).collect(), max),
        &lens_c,
        &ch_c,
        lambda,
        cfg.seq_norm,
    )?;
    let rr = dpo_loss::weighted_logp(
        padded(items.iter().map(|t| &t.ref_rejected).collect(), max),
        &lens_r,
        &ch_r,
        lambda,
        cfg.seq_norm,
    )?;
    let out = dpo_loss::text_dpo(pc, pr, rc, rr, cfg.beta_t)?;
    match nll {
        Some(n) => {
            let v = vals(n.clone()).first().copied();
            Ok((out.loss + n.mul_scalar(cfg.chosen_nll), out.metrics, v))
        }
        None => Ok((out.loss, out.metrics, None)),
    }
}

/// L_s (Eq. 4 on the median images, with the indicator) and L_ce (BCE + DICE on the clean
/// images) of a P_s micro-batch, in one forward over every record's clean image and its
/// distinct median images.
#[allow(clippy::type_complexity)]
fn seg_loss<B: Backend>(
    model: &SftModel<B>,
    items: &[&SegItem],
    images: &Images,
    pre: &Preprocessor,
    cfg: &DpoConfig,
) -> Result<(Option<Tensor<B, 1>>, Option<dpo_loss::SegDpoMetrics>, Tensor<B, 1>, Tensor<B, 1>, usize)> {
    let m = &model.pixellm;
    let device = m.llm.model.embed_tokens.weight.device();
    let with_ls = !cfg.ablation.no_seg_loss;
    let mut wanted: Vec<usize> = items.iter().map(|s| s.clean).collect();
    if with_ls {
        wanted.extend(items.iter().flat_map(|s| s.medians.iter().copied()));
    }
    let bi = batch_images(m, images, &wanted, pre)?;
    let sam = bi.sam.map(|(v, s)| Tensor::<B, 4>::from_data(TensorData::new(v, s), &device));
    let feats = m.encode_images_with(&bi.pre, sam)?;
    // Rows: each record's clean image, then (with L_s) its median images.
    let mut rows = Vec::new();
    let mut row_clean = Vec::with_capacity(items.len());
    let mut row_median: Vec<Vec<usize>> = Vec::with_capacity(items.len());
    for it in items {
        row_clean.push(rows.len());
        rows.push(rows_of::<B>(&it.prompt, bi.slot[&it.clean], &it.answer));
    }
    if with_ls {
        for it in items {
            let mut rm = Vec::with_capacity(it.medians.len());
            for &img in &it.medians {
                rm.push(rows.len());
                rows.push(rows_of::<B>(&it.prompt, bi.slot[&img], &it.answer));
            }
            row_median.push(rm);
        }
    }
    let asm = m.assemble(&rows, Some(&feats), Padding::Right)?;
    let hidden = m.forward_hidden(&asm)?;
    let starts: Vec<usize> = asm.piece_starts.iter().map(|s| *s.last().expect("answer part")).collect();

    // L_ce on the clean images.
    let mut objects = Vec::new();
    let mut obj_img = Vec::new();
    for (k, it) in items.iter().enumerate() {
        let r = row_clean[k];
        for g in &it.groups {
            objects.push((r, g.iter().map(|p| p + starts[r]).collect::<Vec<_>>()));
            obj_img.push(bi.slot[&it.clean]);
        }
    }
    let zero = || Tensor::<B, 1>::zeros([1], &device);
    let (mut bce, mut dice) = (zero(), zero());
    let n_masks = objects.len();
    if cfg.bce_weight > 0.0 || cfg.dice_weight > 0.0 {
        let f = m.seg_embeddings(hidden.clone(), &objects)?;
        let (logits, _) = m.decode_masks(&feats, f, &obj_img)?;
        let mut o = 0;
        for it in items {
            for (t, rle) in it.targets.iter().enumerate() {
                let gt = rle
                    .decode()
                    .map_err(|e| TrainError::Data(format!("P_s record '{}': target mask {t}: {e}", it.id)))?;
                let (h, w) = (gt.height() as usize, gt.width() as usize);
                let [lh, lw] = logits[o].dims();
                if (lh, lw) != (h, w) {
                    return Err(TrainError::Data(format!(
                        "P_s record '{}': target {t}: mask logits are {lh}x{lw}, the target {h}x{w}",
                        it.id
                    )));
                }
                let tgt = Tensor::<B, 2>::from_data(
                    TensorData::new(gt.data().iter().map(|&v| f32::from(v)).collect::<Vec<f32>>(), [h, w]),
                    &device,
                );
                bce = bce + loss::bce_mean(logits[o].clone(), tgt.clone());
                dice = dice + loss::dice(logits[o].clone(), tgt);
                o += 1;
            }
        }
        let denom = n_masks as f64 + 1e-8;
        bce = bce.div_scalar(denom).mul_scalar(cfg.bce_weight);
        dice = dice.div_scalar(denom).mul_scalar(cfg.dice_weight);
    }
    if !with_ls {
        return Ok((None, None, bce, dice, n_masks));
    }

    // Eq. 4 on the median images.
    let mut objects = Vec::new();
    let mut obj_img = Vec::new();
    for (k, it) in items.iter().enumerate() {
        for (t, g) in it.groups.iter().enumerate() {
            let r = row_median[k][it.median_of[t]];
            objects.push((r, g.iter().map(|p| p + starts[r]).collect::<Vec<_>>()));
            obj_img.push(bi.slot[&it.medians[it.median_of[t]]]);
        }
    }
    let f_theta = m.seg_embeddings(hidden, &objects)?;
    let [tn, sc, od] = f_theta.dims();
    let policy_scores: Vec<f32> = if cfg.ablation.no_indicator {
        vec![f32::NEG_INFINITY; tn]
    } else {
        let (logits, _) = m.decode_masks(&feats, f_theta.clone().detach(), &obj_img)?;
        let (masks, _) = popen_model::infer::binarize(logits)?;
        let sel = SelectConfig {
            same_object_iou: cfg.same_object_iou,
            boundary_dilation: cfg.boundary_dilation,
            ..SelectConfig::default()
        };
        let mut scores = Vec::with_capacity(tn);
        let mut o = 0;
        for it in items {
            let nt = it.targets.len();
            let derr = |e: String| TrainError::Data(format!("P_s record '{}': {e}", it.id));
            let gt: Vec<Mask> = it
                .targets
                .iter()
                .map(|r| r.decode())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| derr(e.to_string()))?;
            let props: Vec<Mask> = match (&it.proposals, it.phase, cfg.phase1_score) {
                (Some(p), 1, Phase1Score::STerm) => p
                    .iter()
                    .map(|r| r.decode())
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|e| derr(e.to_string()))?,
                _ => Vec::new(),
            };
            let targets = Targets::new(&gt, &props, &sel).map_err(|e| derr(e.to_string()))?;
            let sc = targets.score(&masks[o..o + nt]).map_err(|e| derr(e.to_string()))?;
            let terms = if it.phase == 1 { sc.s_terms } else { sc.b_terms };
            scores.extend(terms.iter().map(|&x| x as f32));
            o += nt;
        }
        scores
    };
    let ref_tensor = |pick: fn(&SegItem) -> &Vec<f32>| {
        let v: Vec<f32> = items.iter().flat_map(|it| pick(it).iter().copied()).collect();
        Tensor::<B, 3>::from_data(TensorData::new(v, [tn, sc, od]), &device)
    };
    let ref_best: Vec<f32> = items.iter().flat_map(|it| it.ref_best.iter().copied()).collect();
    let counts: Vec<usize> = items.iter().map(|it| it.targets.len()).collect();
    let out = dpo_loss::seg_dpo(
        SegDpoInput {
            f_theta_m: f_theta,
            f_ref_w: ref_tensor(|it| &it.f_w),
            f_ref_m: ref_tensor(|it| &it.f_m),
            f_ref_l: ref_tensor(|it| &it.f_l),
            ref_best_score: &ref_best,
            policy_median_score: &policy_scores,
            counts: &counts,
        },
        cfg.beta_s,
    )?;
    Ok((Some(out.loss), Some(out.metrics), bce, dice, n_masks))
}

/// One micro-batch's loss and gradients (scaled by 1/grad_accum); no gradients when the
/// loss is not finite.
fn micro_step<B: AutodiffBackend>(
    model: &SftModel<B>,
    text: &[&TextItem],
    seg: &[&SegItem],
    images: &Images,
    pre: &Preprocessor,
    cfg: &DpoConfig,
) -> Result<(Option<GradientsParams>, MicroStats)> {
    let device = model.pixellm.llm.model.embed_tokens.weight.device();
    let mut total = Tensor::<B, 1>::zeros([1], &device);
    let mut st = MicroStats::default();
    if !text.is_empty() {
        let (l, met, nll) = text_loss(model, text, images, pre, cfg)?;
        total = total + l;
        st.text = Some(met);
        st.nll = nll;
        st.pairs = text.len();
    }
    if !seg.is_empty() {
        let (ls, met, bce, dice, masks) = seg_loss(model, seg, images, pre, cfg)?;
        if let Some(ls) = ls {
            total = total + ls;
        }
        st.seg = met;
        let v = vals(Tensor::cat(vec![bce.clone(), dice.clone()], 0));
        st.bce = v.first().copied().unwrap_or(f32::NAN);
        st.dice = v.get(1).copied().unwrap_or(f32::NAN);
        st.masks = masks;
        st.records = seg.len();
        total = total + bce + dice;
    }
    st.loss = vals(total.clone()).first().copied().unwrap_or(f32::NAN);
    if !st.loss.is_finite() {
        return Ok((None, st));
    }
    let grads = total.mul_scalar(1.0 / cfg.grad_accum as f64).backward();
    Ok((Some(GradientsParams::from_grads(grads, model)), st))
}

// ---- metrics ----

/// One line of `metrics.jsonl` / `metrics.csv`: TRL DPOTrainer's names for the text DPO
/// terms, `seg/*` for Eq. 4, the mask loss, and the share of targets the indicator switched
/// off. Text and seg fields are empty (null) when their loss is off (ablations).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DpoStepMetrics {
    pub step: usize,
    pub epoch: f64,
    pub lr: f64,
    /// L_t (+ chosen_nll x nll/chosen) + L_s + bce + dice (mean over the step's micro-batches).
    pub loss: f32,
    #[serde(rename = "loss/text")]
    pub loss_text: Option<f32>,
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: Option<f32>,
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: Option<f32>,
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: Option<f32>,
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: Option<f32>,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: Option<f32>,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: Option<f32>,
    /// Mean token cross-entropy of y_c, added to the loss with weight `chosen_nll` (empty
    /// when that is 0).
    #[serde(rename = "nll/chosen", default)]
    pub nll_chosen: Option<f32>,
    /// Eq. 4.
    #[serde(rename = "loss/seg")]
    pub loss_seg: Option<f32>,
    #[serde(rename = "seg/rewards_w")]
    pub seg_reward_w: Option<f32>,
    #[serde(rename = "seg/rewards_l")]
    pub seg_reward_l: Option<f32>,
    #[serde(rename = "seg/margins")]
    pub seg_margin: Option<f32>,
    #[serde(rename = "seg/accuracies")]
    pub seg_accuracy: Option<f32>,
    /// Share of the step's targets whose indicator was 0 (the policy's median mask already
    /// scored at least as well as the reference's best).
    #[serde(rename = "seg/indicator_off")]
    pub seg_indicator_off: Option<f32>,
    #[serde(rename = "seg/targets")]
    pub seg_targets: usize,
    /// Weighted mask-loss terms on the clean images.
    pub bce: f32,
    pub dice: f32,
    /// Which P_s the step drew: 1, 2, or 0 (both, `one_phase`; or no P_s).
    pub ps_phase: u32,
    pub grad_norm: f32,
    pub pairs: usize,
    pub records: usize,
    pub seconds: f64,
}

impl MetricsRow for DpoStepMetrics {
    fn step(&self) -> usize {
        self.step
    }
    fn loss(&self) -> f32 {
        self.loss
    }
    fn series(rows: &[Self]) -> Vec<(&'static str, [u8; 3], Vec<(f64, f64)>)> {
        let s = |f: fn(&Self) -> Option<f32>| curve(rows, f);
        vec![
            ("loss", [20, 20, 20], s(|r| Some(r.loss))),
            ("loss/text", [31, 119, 180], s(|r| r.loss_text)),
            ("loss/seg", [148, 103, 189], s(|r| r.loss_seg)),
            ("bce", [214, 39, 40], s(|r| Some(r.bce))),
            ("dice", [44, 160, 44], s(|r| Some(r.dice))),
            ("margins", [255, 127, 14], s(|r| r.rewards_margins)),
        ]
    }
}

// ---- the stage ----

/// Inputs of the DPO stage.
pub struct DpoJob<'a> {
    pub config: &'a DpoConfig,
    /// The SFT model folder: the policy's initialisation (and the reference the shards were
    /// collected with).
    pub init: &'a Path,
    /// P_t (`collect-pt`).
    pub pt: &'a Path,
    /// P_s of curriculum phase 1 and phase 2 (`collect-ps --phase 1|2`).
    pub ps_phase1: &'a Path,
    pub ps_phase2: &'a Path,
    /// The clean images' proposals for the phase-1 indicator ([`Phase1Score::STerm`]).
    pub proposals: ProposalSource<'a>,
    pub out: &'a Path,
    pub resume: bool,
    pub progress: bool,
    /// Folder keeping the SAM embeddings between runs (tiny-sam).
    pub sam_cache: Option<&'a Path>,
    /// Train even when a preference shard records another reference model than `init`
    /// (its log-probs / embeddings then belong to that model, not to the policy's start).
    pub allow_foreign_ref: bool,
}

/// Checks that every preference shard was collected with `job.init` (the reference model
/// of Eqs. 2-4 whose log-probs / embeddings the shards store): a shard recording another
/// model's fingerprint is refused, naming both, unless `allow_foreign_ref`; a shard that
/// records none (written before popen recorded it) gets a warning.
fn check_reference(job: &DpoJob, shards: &[&Path]) -> Result<()> {
    let init = popen_model::bundle::fingerprint(job.init).map_err(|e| TrainError::Data(e.to_string()))?;
    for path in shards {
        let meta = popen_core::shard::read_metadata(path)?;
        match meta.get(popen_core::shard::REFERENCE_MODEL_KEY) {
            Some(fp) if *fp == init => {}
            Some(fp) if job.allow_foreign_ref => tracing::warn!(
                "{}: collected with model {} but --model {} is {} (--allow-foreign-ref: training anyway)",
                path.display(),
                &fp[..fp.len().min(16)],
                job.init.display(),
                &init[..16]
            ),
            Some(fp) => {
                return Err(TrainError::Data(format!(
                    "{}: collected with model {} but --model {} is model {}: its reference log-probs and \
                     embeddings belong to the other model. Pass the model collect-pt/collect-ps used as \
                     --model, recollect with this one, or --allow-foreign-ref",
                    path.display(),
                    &fp[..fp.len().min(16)],
                    job.init.display(),
                    &init[..16]
                )))
            }
            None => tracing::warn!(
                "{}: records no reference model (collected by an older popen); cannot check it was --model {}",
                path.display(),
                job.init.display()
            ),
        }
    }
    Ok(())
}

/// What `popen dpo` reports.
#[derive(Debug, Clone, Serialize)]
pub struct DpoReport {
    pub model_dir: PathBuf,
    pub steps: usize,
    pub resumed_from: Option<usize>,
    /// Usable P_t pairs and P_s records of each phase.
    pub text_pairs: usize,
    pub seg_records: [usize; 2],
    pub skipped: usize,
    /// Set when one phase had no usable records and the other served all steps.
    pub phase_note: Option<String>,
    pub final_loss: Option<f32>,
    pub trainable_params: usize,
    pub total_params: usize,
    pub seconds: f64,
}

/// Which P_s pool and micro-batch a global micro-batch index draws.
struct SegPlan {
    /// Pools of item indices: [phase 1, phase 2] or one mixed pool.
    pools: Vec<(Vec<(usize, usize)>, Order, u32)>,
    /// Micro-batch index where the second pool starts (two-phase plan).
    switch: usize,
}

impl SegPlan {
    fn batch(&self, m: usize) -> (Vec<(usize, usize)>, u32) {
        if self.pools.is_empty() {
            return (Vec::new(), 0);
        }
        let (k, local) = if self.pools.len() == 2 && m >= self.switch { (1, m - self.switch) } else { (0, m) };
        let (pool, order, phase) = &self.pools[k];
        (order.batch(local).into_iter().map(|i| pool[i]).collect(), *phase)
    }
}

/// Runs (or resumes) the DPO stage; the trained model folder is `out/model`.
pub fn run<B: AutodiffBackend>(job: &DpoJob, device: &B::Device) -> Result<DpoReport> {
    let cfg = job.config;
    cfg.validate().map_err(TrainError::Config)?;
    let t0 = Instant::now();
    let out = job.out;
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    let cfg_json = serde_json::to_value(cfg).expect("config serializes");

    // The policy: the SFT model, decoder (and SAM encoder) frozen.
    let stage::Opened { model, tokenizer, tokens, config: pcfg } = stage::open_init::<B>(job.init, device)?;
    let mut used: Vec<&Path> = Vec::new();
    if cfg.uses_text() {
        used.push(job.pt);
    }
    if cfg.uses_seg() {
        used.extend([job.ps_phase1, job.ps_phase2]);
    }
    check_reference(job, &used)?;
    let dtype = cfg.precision.dtype();
    let mut freeze = cfg.freeze.clone();
    if !freeze.iter().any(|f| f == "decoder") {
        freeze.push("decoder".into());
    }
    let model = stage::policy(model, cfg.trainable, &cfg.lora, &freeze, device)?;

    // Data.
    let ctx = Ctx {
        tok: &tokenizer,
        tokens: &tokens,
        group_len: pcfg.seg_group_len(),
        image_tokens: pcfg.image_tokens(),
        vocab: pcfg.llm.vocab_size,
        f_dim: pcfg.num_scales() * pcfg.out_dim,
        cfg,
    };
    let mut images = Images::default();
    let mut skipped = Vec::new();
    let (text, n_pt) =
        if cfg.uses_text() { prepare_text(job.pt, &ctx, &mut images, &mut skipped)? } else { (Vec::new(), 0) };
    let needs_props = !cfg.ablation.no_seg_loss && !cfg.ablation.no_indicator && cfg.phase1_score == Phase1Score::STerm;
    let (seg1, n_ps1, seg2, n_ps2) = if cfg.uses_seg() {
        let (a, na) = prepare_seg(job.ps_phase1, 1, &ctx, &mut images, &mut skipped, &job.proposals, needs_props)?;
        let (b, nb) = prepare_seg(job.ps_phase2, 2, &ctx, &mut images, &mut skipped, &job.proposals, false)?;
        (a, na, b, nb)
    } else {
        (Vec::new(), 0, Vec::new(), 0)
    };
    let ctx_f_dim = ctx.f_dim;
    let prepared = Prepared { text, seg: [seg1, seg2], skipped, images, counts: [n_pt, n_ps1, n_ps2] };
    let Prepared { text, seg, skipped, mut images, counts } = prepared;
    if cfg.uses_text() && text.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: none of its {} P_t records can be used ({})",
            job.pt.display(),
            counts[0],
            skipped.first().map(|s| format!("e.g. '{}': {}", s.id, s.reason)).unwrap_or_else(|| "empty shard".into())
        )));
    }
    let mut phase_note = None;
    if cfg.uses_seg() {
        if seg[0].is_empty() && seg[1].is_empty() {
            return Err(TrainError::Data(format!(
                "{} and {}: no usable P_s records ({} and {} in the files)",
                job.ps_phase1.display(),
                job.ps_phase2.display(),
                counts[1],
                counts[2]
            )));
        }
        if !cfg.ablation.one_phase {
            for (k, p) in [(0usize, job.ps_phase1), (1, job.ps_phase2)] {
                if seg[k].is_empty() {
                    let note = format!(
                        "{}: no usable phase-{} P_s records; the phase-{} records serve all steps (no curriculum)",
                        p.display(),
                        k + 1,
                        2 - k
                    );
                    tracing::warn!("{note}");
                    phase_note = Some(note);
                }
            }
        }
    }

    // SAM embeddings (tiny-sam): computed when a batch first shows an image, kept in memory
    // and, with --sam-cache, on disk (one file per image).
    let pre = Preprocessor::pixellm(pcfg.image_size);
    images.sam = crate::stage::SamMemo::new(&model.pixellm, job.sam_cache);

    // Orders and the step count.
    let text_order = Order { n: text.len(), batch_size: cfg.batch_size, seed: cfg.seed };
    let mk_order = |n: usize, salt: u64| Order { n, batch_size: cfg.seg_batch_size, seed: cfg.seed ^ salt };
    let pool = |k: usize| -> Vec<(usize, usize)> { (0..seg[k].len()).map(|i| (k, i)).collect() };
    let n_seg = seg[0].len() + seg[1].len();
    let text_batches = if text.is_empty() { 0 } else { text_order.batches_per_epoch() };
    let seg_batches = n_seg.div_ceil(cfg.seg_batch_size);
    let per_epoch = text_batches.max(seg_batches).max(1);
    let mut total_steps = (cfg.epochs.max(1) * per_epoch).div_ceil(cfg.grad_accum);
    if cfg.epochs == 0 || (cfg.max_steps > 0 && cfg.max_steps < total_steps) {
        total_steps = cfg.max_steps;
    }
    let half = total_steps.div_ceil(2);
    // Eq. 4 starts at margin 0 and moves f_theta toward f_w and away from f_l: how far apart
    // the recorded reference embeddings are bounds what L_s can learn (logged per phase).
    for (k, items) in seg.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
        let (wl, mw) = reference_spread(items, ctx_f_dim);
        tracing::info!(
            "dpo: P_s phase {}: reference embeddings 1 - cos(f_w, f_l) {:.2e}, 1 - cos(f_m, f_w) {:.2e} (mean over targets; near 0: L_s has little to learn from)",
            k + 1,
            1.0 - wl,
            1.0 - mw
        );
    }
    let plan = if !cfg.uses_seg() {
        SegPlan { pools: Vec::new(), switch: 0 }
    } else if cfg.ablation.one_phase || seg[0].is_empty() || seg[1].is_empty() {
        let mut all = pool(0);
        all.extend(pool(1));
        let phase = if seg[0].is_empty() {
            2
        } else if seg[1].is_empty() {
            1
        } else {
            0
        };
        SegPlan { pools: vec![(all.clone(), mk_order(all.len(), 0x5EC0), phase)], switch: 0 }
    } else {
        SegPlan {
            pools: vec![(pool(0), mk_order(seg[0].len(), 0x5EC1), 1), (pool(1), mk_order(seg[1].len(), 0x5EC2), 2)],
            switch: half * cfg.grad_accum,
        }
    };

    // Optimizer, and the checkpoint to resume from.
    let optim = crate::stage::adamw::<B>(cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay);
    let crate::stage::Start { model, optim, step: start, resumed_from, last_checkpoint: last_ckpt } =
        crate::stage::start(out, job.resume, &cfg_json, model, optim, dtype, device)?;
    let (trainable, total_params) = params::count(&model);
    tracing::info!(
        "dpo: {} P_t pairs, {} + {} P_s records ({} skipped), {} steps, {} / {} parameters train",
        text.len(),
        seg[0].len(),
        seg[1].len(),
        skipped.len(),
        total_steps,
        trainable,
        total_params
    );

    let spec = crate::train_loop::loop_spec!("dpo", cfg, out, &cfg_json, total_steps, cfg.grad_accum, job.progress);
    let mut step_plan = DpoPlan {
        cfg,
        text: &text,
        seg: &seg,
        text_order: &text_order,
        seg_plan: &plan,
        images: &images,
        pre: &pre,
        per_epoch,
    };
    let crate::train_loop::Trained { model, last_loss } =
        crate::train_loop::run(&spec, &mut step_plan, model, optim, start, last_ckpt, device)?;

    let model_dir = out.join("model");
    crate::stage::save_model(&model_dir, model.pixellm, &tokenizer)?;
    let mut manifest = Manifest::new("dpo", cfg)?;
    manifest.add_input(job.init.join(bundle::WEIGHTS_FILE))?;
    if cfg.uses_text() {
        manifest.add_input(job.pt)?;
    }
    if cfg.uses_seg() {
        manifest.add_input(job.ps_phase1)?;
        manifest.add_input(job.ps_phase2)?;
        if needs_props && !seg[0].is_empty() {
            match &job.proposals {
                ProposalSource::None => {}
                ProposalSource::Samples(p) => manifest.add_input(p)?,
                ProposalSource::Shards(ps) => {
                    for p in ps.iter() {
                        manifest.add_input(p)?;
                    }
                }
            }
        }
    }
    manifest.add_output(model_dir.join(bundle::WEIGHTS_FILE), None)?;
    manifest.count("pt_records", counts[0] as u64);
    manifest.count("ps_phase1_records", counts[1] as u64);
    manifest.count("ps_phase2_records", counts[2] as u64);
    manifest.count("text_pairs", text.len() as u64);
    manifest.count("seg_records_phase1", seg[0].len() as u64);
    manifest.count("seg_records_phase2", seg[1].len() as u64);
    manifest.count("steps", total_steps as u64);
    manifest.count("curriculum_switch_step", if plan.pools.len() == 2 { half as u64 } else { 0 });
    for s in &skipped {
        manifest.skip(s.id.clone(), format!("{}: {}", s.file, s.reason));
    }
    manifest.time("seconds", t0);
    manifest.write(out.join("manifest.json"))?;
    if let Some(n) = &phase_note {
        let p = out.join("NOTE.txt");
        popen_core::shard::atomic_write(&p, format!("{n}\n").as_bytes())?;
    }
    Ok(DpoReport {
        model_dir,
        steps: total_steps,
        resumed_from,
        text_pairs: text.len(),
        seg_records: [seg[0].len(), seg[1].len()],
        skipped: skipped.len(),
        phase_note,
        final_loss: last_loss,
        trainable_params: trainable,
        total_params,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[allow(clippy::too_many_arguments)]
fn step_metrics(
    step: usize,
    lr: f64,
    grad_norm: f32,
    phase: u32,
    stats: &[MicroStats],
    per_epoch: usize,
    grad_accum: usize,
    seconds: f64,
) -> DpoStepMetrics {
    let k = stats.len().max(1) as f32;
    let mean = |f: &dyn Fn(&MicroStats) -> Option<f32>| -> Option<f32> {
        let v: Vec<f32> = stats.iter().filter_map(f).collect();
        if v.is_empty() {
            None
        } else {
            Some(v.iter().sum::<f32>() / v.len() as f32)
        }
    };
    let targets: usize = stats.iter().filter_map(|s| s.seg.as_ref().map(|m| m.targets)).sum();
    let active: usize = stats.iter().filter_map(|s| s.seg.as_ref().map(|m| m.active)).sum();
    let has_seg = stats.iter().any(|s| s.seg.is_some());
    DpoStepMetrics {
        step,
        epoch: ((step + 1) * grad_accum) as f64 / per_epoch as f64,
        lr,
        loss: stats.iter().map(|s| s.loss).sum::<f32>() / k,
        loss_text: mean(&|s| s.text.as_ref().map(|m| m.loss)),
        rewards_chosen: mean(&|s| s.text.as_ref().map(|m| m.rewards_chosen)),
        rewards_rejected: mean(&|s| s.text.as_ref().map(|m| m.rewards_rejected)),
        rewards_accuracies: mean(&|s| s.text.as_ref().map(|m| m.rewards_accuracies)),
        rewards_margins: mean(&|s| s.text.as_ref().map(|m| m.rewards_margins)),
        logps_chosen: mean(&|s| s.text.as_ref().map(|m| m.logps_chosen)),
        logps_rejected: mean(&|s| s.text.as_ref().map(|m| m.logps_rejected)),
        nll_chosen: mean(&|s| s.nll),
        loss_seg: mean(&|s| s.seg.as_ref().map(|m| m.loss)),
        seg_reward_w: mean(&|s| s.seg.as_ref().map(|m| m.reward_w)),
        seg_reward_l: mean(&|s| s.seg.as_ref().map(|m| m.reward_l)),
        seg_margin: mean(&|s| s.seg.as_ref().map(|m| m.margin)),
        seg_accuracy: mean(&|s| s.seg.as_ref().map(|m| m.accuracy)),
        seg_indicator_off: (has_seg && targets > 0).then(|| (targets - active) as f32 / targets as f32),
        seg_targets: targets,
        bce: stats.iter().map(|s| s.bce).sum::<f32>() / k,
        dice: stats.iter().map(|s| s.dice).sum::<f32>() / k,
        ps_phase: phase,
        grad_norm,
        pairs: stats.iter().map(|s| s.pairs).sum(),
        records: stats.iter().map(|s| s.records).sum(),
        seconds,
    }
}

/// DPO's part of the training loop: `grad_accum` micro-batches of P_t pairs and P_s records
/// (the curriculum's pool of the step), their summed gradients and statistics.
struct DpoPlan<'a> {
    cfg: &'a DpoConfig,
    text: &'a [TextItem],
    seg: &'a [Vec<SegItem>; 2],
    text_order: &'a Order,
    seg_plan: &'a SegPlan,
    images: &'a Images,
    pre: &'a Preprocessor,
    per_epoch: usize,
}

impl<B: AutodiffBackend> crate::train_loop::StagePlan<B> for DpoPlan<'_> {
    /// The micro-batches' statistics and the step's P_s phase.
    type Stats = (Vec<MicroStats>, u32);
    type Row = DpoStepMetrics;

    fn gradients(
        &mut self,
        step: usize,
        model: &SftModel<B>,
        last_checkpoint: &str,
    ) -> Result<(GradientsParams, (Vec<MicroStats>, u32))> {
        let cfg = self.cfg;
        let mut acc = GradientsAccumulator::<SftModel<B>>::new();
        let mut stats: Vec<MicroStats> = Vec::with_capacity(cfg.grad_accum);
        let mut phase = 0;
        for micro in 0..cfg.grad_accum {
            let mb = step * cfg.grad_accum + micro;
            let t_items: Vec<&TextItem> = if self.text.is_empty() {
                Vec::new()
            } else {
                self.text_order.batch(mb).into_iter().map(|i| &self.text[i]).collect()
            };
            let (s_idx, ph) = self.seg_plan.batch(mb);
            phase = ph;
            let s_items: Vec<&SegItem> = s_idx.iter().map(|&(k, i)| &self.seg[k][i]).collect();
            let ids = || {
                t_items
                    .iter()
                    .map(|t| format!("P_t '{}'", t.id))
                    .chain(s_items.iter().map(|s| format!("P_s '{}'", s.id)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let (grads, st) = micro_step(model, &t_items, &s_items, self.images, self.pre, cfg)
                .map_err(|e| TrainError::Data(format!("step {step}: batch of {}: {e}", ids())))?;
            let Some(grads) = grads else {
                let parts = format!(
                    "text {}, seg {}, bce {}, dice {}; records {}",
                    st.text.as_ref().map(|m| m.loss.to_string()).unwrap_or_else(|| "off".into()),
                    st.seg.as_ref().map(|m| m.loss.to_string()).unwrap_or_else(|| "off".into()),
                    st.bce,
                    st.dice,
                    ids()
                );
                return Err(TrainError::NonFiniteLoss {
                    step,
                    value: st.loss,
                    parts,
                    last_checkpoint: last_checkpoint.to_string(),
                });
            };
            acc.accumulate(model, grads);
            stats.push(st);
        }
        Ok((acc.grads(), (stats, phase)))
    }

    fn row(
        &self,
        step: usize,
        lr: f64,
        grad_norm: f32,
        stats: (Vec<MicroStats>, u32),
        timing: Timing,
    ) -> DpoStepMetrics {
        let (stats, phase) = stats;
        step_metrics(step, lr, grad_norm, phase, &stats, self.per_epoch, self.cfg.grad_accum, timing.since_last_row)
    }

    fn detail(row: &DpoStepMetrics) -> String {
        format!(
            "(text {} seg {} bce {:.4} dice {:.4}) margin {} indicator-off {}",
            opt(row.loss_text),
            opt(row.loss_seg),
            row.bce,
            row.dice,
            opt(row.rewards_margins),
            opt(row.seg_indicator_off)
        )
    }
}

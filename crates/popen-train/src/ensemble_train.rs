//! `popen ensemble-train` (POPEN stage 3, SPEC 6 "Training of the ensemble"): only `p_hat`
//! trains; loss `L_ti + L_si` (Appendix B) with `h` = all-MiniLM-L6-v2 sentence features.
//!
//! Per micro-batch (training samples with ground truth):
//! 1. no gradient, on the inner backend: K sampled answers (one batched generate), tau/eta,
//!    the text pass's greedy `y_tilde` ([`crate::ensemble`], the same functions inference uses);
//! 2. L_ti: teacher-force `y_tilde` after the text-pass prefix (gamma on) -> `p(y_tilde)` =
//!    exp(mean log p) (the only gradient path, through `p_hat`); gains from MiniLM features of
//!    `y_tilde`, each `y_k` and the ground-truth answer (all in shard format, `<seg>` markers);
//! 3. L_si: the seg pass teacher-forced; `f_tilde` at each group of y_tilde -> mask logits at
//!    the image size; y_tilde's groups and each y_k's masks are paired with the targets by
//!    `si_pairing` (default: Hungarian matching on mask IoU, as the evaluator; SPEC 10.17;
//!    [`ensemble_loss::si_sample`]); soft IoU of sigmoid(logits) vs `M_g^n`, hard IoU of
//!    `M_k^n` (a target y_k leaves unpaired has an empty `M_k^n`); n runs over the
//!    min(#groups of y_tilde, #targets) paired targets; a sample whose y_tilde has no group
//!    adds no L_si term.
//!
//! `seg_feedback` (the Linear feeding `f_k^n` back, Eq. 6) trains with `p_hat` by default
//! (SPEC 10.16: a projection that never trains cannot carry `f`; the paper is silent on it);
//! `train_seg_feedback = false` keeps SPEC 6's "only p_hat".
//!
//! `adapt_steps` (SPEC 10.18, small models, off in the 7B config): a supervised warm-up
//! before L_ti + L_si, in which the LLM side learns to write the ground truth after the K
//! answers ([`adapt_trains`], `adapt_loss`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::stage::{self, SamMemo};
use crate::train_loop::Timing;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, TensorData};
use popen_core::manifest::Manifest;
use popen_core::shard::{read_shard, Sample};
use popen_model::bundle;
use popen_model::infer::Predictor;
use popen_model::minilm::SentenceEncoder;
use popen_model::pixellm::{Padding, PixelLm};
use popen_model::preprocess::Preprocessor;
use popen_model::tokenizer::{self, PixelLmTokens, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::config::Decay;
use crate::ensemble::{self, Candidate, EnsembleSettings, Scores};
use crate::ensemble_loss;
use crate::metrics::{curve, opt, MetricsRow};
use crate::stage::SftModel;
use crate::{io_err, params, Result, TrainError};

/// Every knob of the ensemble stage; TOML in `pipelines/ensemble-*.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsembleConfig {
    /// Seed of the data order.
    pub seed: u64,
    /// Passes over the samples (paper: 2); `max_steps` > 0 stops earlier.
    pub epochs: usize,
    pub max_steps: usize,
    /// Samples per optimizer step (paper: 16).
    pub batch_size: usize,
    /// AdamW (paper: lr 3e-4, betas 0.9 / 0.95, weight decay 0).
    pub lr: f64,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Warmup steps (paper: 100), then `decay` to `min_lr`.
    pub warmup_steps: usize,
    pub decay: Decay,
    pub min_lr: f64,
    pub grad_clip: f32,
    /// The 10 of `log sigma(10 ...)` in L_ti and L_si.
    pub scale: f64,
    /// Weights of L_ti and L_si.
    pub ti_weight: f32,
    pub si_weight: f32,
    /// Also train the seg-feedback projection that feeds `f_k^n` back (Eq. 6; SPEC 10.16:
    /// a projection that never trains cannot carry `f`; default true, false = only p_hat).
    /// With `adapt_steps`, the projection trains during the warm-up either way (with the LLM
    /// side); this switch applies to the L_ti + L_si steps after it.
    pub train_seg_feedback: bool,
    /// Small-model adaptation (SPEC 10.18, not in the paper): the first `adapt_steps` steps
    /// are a supervised warm-up in the ensemble layout: the K sampled answers (+ p_hat) in the
    /// context, the ground-truth answer as the target of the text pass (cross-entropy) and
    /// its masks as the targets of the seg pass (BCE + DICE from `f_tilde` at its groups).
    /// During them the LLM side (LLM, projectors, text_hidden_fcs) trains too; the pixel
    /// decoder and the image encoders stay frozen. After them, the paper's L_ti + L_si with
    /// p_hat (+ the feedback projection) alone. 0 = the paper's setting.
    #[serde(default)]
    pub adapt_steps: usize,
    /// Weights (cross-entropy, BCE, DICE) of the warm-up loss (PixelLM's 1, 2, 0.5).
    #[serde(default = "default_adapt_weights")]
    pub adapt_weights: [f32; 3],
    /// Peak learning rate of the warm-up steps (the schedule of `lr`, scaled by
    /// `adapt_lr / lr`); 0 = `lr`. The warm-up trains the whole LLM side, p_hat alone
    /// takes a higher rate.
    #[serde(default)]
    pub adapt_lr: f64,
    /// Rehearsal during the warm-up (not in the paper): weight of PixelLM's loss (same
    /// `adapt_weights`) of the same batch in the plain single-answer layout (chat prompt ->
    /// ground-truth answer and masks, as SFT), so the model that samples the K answers and
    /// segments them keeps what SFT and DPO taught it. 0 = off.
    #[serde(default)]
    pub adapt_plain_weight: f32,
    /// How L_si pairs the `<seg>` groups of y_tilde and y_k with the targets (SPEC 10.17):
    /// `hungarian` (mask IoU, as the evaluator; default) or `positional` (n-th with n-th).
    #[serde(default)]
    pub si_pairing: ensemble_loss::Pairing,
    /// The all-MiniLM-L6-v2 folder (model.safetensors + tokenizer.json; `make assets`).
    pub minilm: PathBuf,
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    pub log_every: usize,
    /// K, sampling temperature, gamma on/off (the ensemble inference settings).
    pub ensemble: EnsembleSettings,
}

impl Default for EnsembleConfig {
    fn default() -> Self {
        EnsembleConfig {
            seed: 0,
            epochs: 2,
            max_steps: 0,
            batch_size: 16,
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 100,
            decay: Decay::Linear,
            min_lr: 0.0,
            grad_clip: 1.0,
            scale: ensemble_loss::SCALE,
            ti_weight: 1.0,
            si_weight: 1.0,
            train_seg_feedback: true,
            adapt_steps: 0,
            adapt_weights: default_adapt_weights(),
            adapt_lr: 0.0,
            adapt_plain_weight: 0.0,
            si_pairing: ensemble_loss::Pairing::Hungarian,
            minilm: PathBuf::from("data/assets/minilm"),
            checkpoint_every: 200,
            keep_checkpoints: 2,
            log_every: 10,
            ensemble: EnsembleSettings::default(),
        }
    }
}

fn default_adapt_weights() -> [f32; 3] {
    [1.0, 2.0, 0.5]
}

crate::config::stage_config!(EnsembleConfig);

impl EnsembleConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.batch_size == 0 || self.checkpoint_every == 0 || self.log_every == 0 || self.keep_checkpoints == 0 {
            return Err("batch_size, checkpoint_every, log_every and keep_checkpoints must be > 0".into());
        }
        if self.epochs == 0 && self.max_steps == 0 {
            return Err("epochs or max_steps must be > 0".into());
        }
        if !(self.lr > 0.0) || !(self.scale > 0.0) {
            return Err("lr and scale must be > 0".into());
        }
        if !(self.adapt_lr >= 0.0 && self.adapt_lr.is_finite()) {
            return Err(format!("adapt_lr must be >= 0 (0 = lr), got {}", self.adapt_lr));
        }
        if !(self.adapt_plain_weight.is_finite() && self.adapt_plain_weight >= 0.0) {
            return Err(format!("adapt_plain_weight must be finite and >= 0, got {}", self.adapt_plain_weight));
        }
        if self.adapt_weights.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(format!("adapt_weights must be finite and >= 0, got {:?}", self.adapt_weights));
        }
        self.ensemble.validate()
    }
}

/// One row of metrics.jsonl / metrics.csv.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EnsembleStepMetrics {
    pub step: usize,
    pub epoch: f64,
    pub lr: f64,
    pub loss: f32,
    #[serde(rename = "loss/ti")]
    pub loss_ti: f32,
    #[serde(rename = "loss/si")]
    pub loss_si: Option<f32>,
    /// Mean p(y_tilde) = exp(mean log p).
    pub p_tilde: f32,
    /// Mean over samples and k of cos(h~, h_g) - cos(h_k, h_g).
    pub text_gain: f32,
    /// Mean soft IoU of the refined masks and hard IoU of the candidates' (L_si samples).
    pub iou_refined: Option<f32>,
    pub iou_candidates: Option<f32>,
    pub si_samples: usize,
    /// Warm-up steps (`adapt_steps`, SPEC 10.18): cross-entropy of the ground-truth answer
    /// and mask loss (BCE + DICE, weighted) in the ensemble layout; then loss/ti and
    /// loss/si are 0 / empty.
    #[serde(rename = "adapt/ce", default)]
    pub adapt_ce: Option<f32>,
    #[serde(rename = "adapt/mask", default)]
    pub adapt_mask: Option<f32>,
    /// Warm-up steps with `adapt_plain_weight`: PixelLM's loss in the plain layout (unweighted).
    #[serde(rename = "adapt/plain", default)]
    pub adapt_plain: Option<f32>,
    pub grad_norm: f32,
    pub seconds: f64,
}

impl MetricsRow for EnsembleStepMetrics {
    fn step(&self) -> usize {
        self.step
    }
    fn loss(&self) -> f32 {
        self.loss
    }
    fn series(rows: &[Self]) -> Vec<(&'static str, [u8; 3], Vec<(f64, f64)>)> {
        let pts = |f: &dyn Fn(&Self) -> Option<f32>| curve(rows, f);
        vec![
            ("loss", [0, 0, 0], pts(&|r| Some(r.loss))),
            ("L_ti", [200, 40, 40], pts(&|r| Some(r.loss_ti))),
            ("L_si", [40, 40, 200], pts(&|r| r.loss_si)),
            ("warm-up CE", [40, 160, 40], pts(&|r| r.adapt_ce)),
            ("warm-up mask", [160, 120, 0], pts(&|r| r.adapt_mask)),
            ("warm-up plain", [120, 40, 160], pts(&|r| r.adapt_plain)),
        ]
    }
}

/// Inputs of the stage.
pub struct EnsembleJob<'a> {
    pub config: &'a EnsembleConfig,
    /// The DPO model folder.
    pub init: &'a Path,
    /// Training samples (with ground-truth answers and masks).
    pub samples: &'a Path,
    pub out: &'a Path,
    pub resume: bool,
    pub progress: bool,
    /// Folder keeping the frozen SAM encoder's image embeddings between runs (tiny-sam; the
    /// same per-image files as dpo's `--sam-cache`).
    pub sam_cache: Option<&'a Path>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EnsembleReport {
    pub model_dir: PathBuf,
    pub steps: usize,
    pub resumed_from: Option<usize>,
    pub samples: usize,
    pub final_loss: Option<f32>,
    pub trainable_params: usize,
    pub total_params: usize,
    pub seconds: f64,
}

/// The stage's error for a model without `p_hat`.
fn no_p_hat() -> TrainError {
    TrainError::Config("the model has no p_hat (prompt_embeddings = 0 in its model.toml)".into())
}

/// Freezes everything but `p_hat` (and `seg_feedback` when asked).
pub fn only_prompt_trains<B: Backend>(mut m: PixelLm<B>, seg_feedback: bool) -> Result<PixelLm<B>> {
    let Some(p) = m.prompt_embeddings.take() else {
        return Err(no_p_hat());
    };
    let fb = m.seg_feedback.take();
    let mut m = m.no_grad();
    m.prompt_embeddings = Some(p.set_require_grad(true));
    m.seg_feedback = if seg_feedback { fb } else { fb.map(|l| l.no_grad()) };
    Ok(m)
}

/// The warm-up's trainable set (`adapt_steps`, SPEC 10.18): p_hat, the feedback projection
/// and the LLM side (LLM, projectors, neck, text_hidden_fcs); the pixel decoder and the
/// image encoders (CLIP tower, SAM encoder) stay frozen.
pub fn adapt_trains<B: Backend>(mut m: PixelLm<B>) -> Result<PixelLm<B>> {
    if m.prompt_embeddings.is_none() {
        return Err(no_p_hat());
    }
    m.sam_encoder = m.sam_encoder.no_grad();
    m.vision_tower = m.vision_tower.no_grad();
    m.decoder = m.decoder.no_grad();
    Ok(m)
}

struct Stats {
    loss: f32,
    ti: f32,
    si: Option<f32>,
    p_tilde: f32,
    gain: f32,
    iou_r: Option<f32>,
    iou_c: Option<f32>,
    si_n: usize,
    adapt: Option<(f32, f32)>,
    plain: Option<f32>,
}

fn to_host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().expect("f32 data")
}

/// Loss and gradients of one batch of samples.
#[allow(clippy::too_many_arguments)]
fn batch_loss<B: AutodiffBackend>(
    model: &SftModel<B>,
    tokenizer: &Tokenizer,
    tokens: &PixelLmTokens,
    pre: &Preprocessor,
    minilm: &SentenceEncoder<B::InnerBackend>,
    batch: &[&Sample],
    sam: Option<(&SamMemo, Vec<&str>)>,
    cfg: &EnsembleConfig,
    decoder: Option<&PixelLm<B>>,
    adapting: bool,
) -> std::result::Result<(Tensor<B, 1>, Stats), String> {
    let e = |x: popen_model::pixellm::PixelLmError| x.to_string();
    let images: Vec<image::RgbImage> = batch
        .iter()
        .map(|s| s.decode_image().map_err(|e| format!("'{}': {e}", s.id)))
        .collect::<std::result::Result<_, _>>()?;
    let instrs: Vec<&str> = batch.iter().map(|s| s.instruction.as_str()).collect();
    let preprocessed: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(i, im)| pre.apply(im).map_err(|e| format!("'{}': {e}", batch[i].id)))
        .collect::<std::result::Result<_, _>>()?;
    let s = &cfg.ensemble;

    // 1. No gradient: candidates, scores, y_tilde (decoded by `decoder` when given: the loss
    // of one model on the answers another decoded).
    let inner = decoder.unwrap_or(&model.pixellm).valid();
    // The frozen SAM encoder's embeddings (tiny-sam), once per image for the whole run.
    let emb = match sam {
        Some((memo, keys)) => Some(memo.batch(&inner, &preprocessed, &keys).map_err(|x| x.to_string())?),
        None => None,
    };
    let vp = Predictor { model: &inner, tokenizer, tokens: tokens.clone(), preprocessor: pre.clone(), sam: None };
    let vdev = inner.devices().into_iter().next().ok_or("the model has no parameters")?;
    let vemb = emb.clone().map(|(v, sh)| Tensor::<B::InnerBackend, 4>::from_data(TensorData::new(v, sh), &vdev));
    let vfeats = inner.encode_images_with(&preprocessed, vemb).map_err(e)?;
    let questions = ensemble::Questions::new(&vp, &vfeats, &instrs, s.share_prompt).map_err(e)?;
    let cands: Vec<Vec<Candidate>> = ensemble::sample_candidates(&vp, &vfeats, &questions, s).map_err(e)?;
    let scores: Vec<Scores> =
        cands.iter().map(|c| ensemble::scores(&vp, c)).collect::<std::result::Result<_, _>>().map_err(e)?;

    let m = &model.pixellm;
    let p = Predictor { model: m, tokenizer, tokens: tokens.clone(), preprocessor: pre.clone(), sam: None };
    let dev = m.devices().into_iter().next().ok_or("the model has no parameters")?;
    let feats = m
        .encode_images_with(&preprocessed, emb.map(|(v, sh)| Tensor::<B, 4>::from_data(TensorData::new(v, sh), &dev)))
        .map_err(e)?;
    if adapting {
        return adapt_loss(&p, &feats, batch, &instrs, &cands, &scores, cfg);
    }
    let refined = ensemble::refine(&vp, &vfeats, &questions, &cands, &scores, s).map_err(e)?;

    // 2. L_ti.
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, x) in instrs.iter().enumerate() {
        let r = ensemble::text_rows(&p, x, i, &cands[i], s.tau(&scores[i])).map_err(e)?;
        let mut ids = refined[i].0.clone();
        ids.push(tokens.eos);
        let mut r = r;
        r.push(popen_model::pixellm::Part::new(popen_model::pixellm::Segment::Tokens(ids.clone())));
        rows.push(r);
        targets.push(ids);
    }
    let asm = m.assemble(&rows, Some(&feats), Padding::Right).map_err(e)?;
    let hidden = m.forward_hidden(&asm).map_err(e)?;
    let tg: Vec<(usize, Vec<u32>)> =
        asm.piece_starts.iter().zip(&targets).map(|(st, t)| (*st.last().expect("parts"), t.clone())).collect();
    let lp = m.response_logprobs(hidden, &tg).map_err(e)?;
    let group = m.config().seg_group_len();
    let answer_of = |ids: &[u32]| -> std::result::Result<String, String> {
        let t = tokenizer.decode(ids, false).map_err(|e| e.to_string())?;
        Ok(tokenizer::answer_text(&t, group))
    };
    let mut gains = Vec::with_capacity(batch.len());
    for (i, smp) in batch.iter().enumerate() {
        let mut texts = vec![answer_of(&refined[i].0)?, smp.answer.clone()];
        texts.extend(cands[i].iter().map(|c| c.answer.clone()));
        let h = minilm.encode_vecs(&texts).map_err(|e| e.to_string())?;
        gains.push(ensemble_loss::sentence_gains(&h[0], &h[1], &h[2..]).map_err(|e| e.to_string())?);
    }
    let lens: Vec<usize> = targets.iter().map(Vec::len).collect();
    let ti = ensemble_loss::ti_loss(lp, &lens, &gains, cfg.scale).map_err(|e| e.to_string())?;

    // 3. L_si.
    let (seg_rows, last) = ensemble::seg_batch(&p, &instrs, &cands, &scores, &refined, s).map_err(e)?;
    let asm = m.assemble(&seg_rows, Some(&feats), Padding::Right).map_err(e)?;
    let hidden = m.forward_hidden(&asm).map_err(e)?;
    let mut objects = Vec::new();
    let mut per = Vec::new();
    for (r, smp) in batch.iter().enumerate() {
        let scan = tokenizer::seg_groups(&refined[r].0, tokens);
        // Every group: the pairing with the targets needs all of y_tilde's masks.
        let n = if smp.target_masks.is_empty() { 0 } else { scan.groups.len() };
        let st = asm.piece_starts[r][last[r]];
        for g in scan.groups.into_iter().take(n) {
            objects.push((r, g.iter().map(|q| q + st).collect::<Vec<_>>()));
        }
        per.push(n);
    }
    let (mut si_samples, mut iou_r, mut iou_c) = (Vec::new(), Vec::new(), Vec::new());
    if !objects.is_empty() {
        let f = m.seg_embeddings(hidden, &objects).map_err(e)?;
        let idx: Vec<usize> = objects.iter().map(|o| o.0).collect();
        let (logits, _) = m.decode_masks(&feats, f, &idx).map_err(e)?;
        let mut it = logits.into_iter();
        for (r, smp) in batch.iter().enumerate() {
            let n = per[r];
            let lg: Vec<Tensor<B, 2>> = it.by_ref().take(n).collect();
            if n == 0 {
                continue;
            }
            let [hh, ww] = lg[0].dims();
            let mut gts = Vec::with_capacity(smp.target_masks.len());
            for rle in &smp.target_masks {
                let mk = rle.decode().map_err(|e| format!("'{}': {e}", smp.id))?;
                if (mk.height() as usize, mk.width() as usize) != (hh, ww) {
                    return Err(format!("'{}': target mask {}x{} vs image {hh}x{ww}", smp.id, mk.height(), mk.width()));
                }
                gts.push(mk);
            }
            let cand_masks: Vec<&[popen_core::mask::Mask]> = cands[r].iter().map(|c| c.masks.as_slice()).collect();
            let Some(si) = ensemble_loss::si_sample(lg, &cand_masks, &gts, cfg.si_pairing)
                .map_err(|e| format!("'{}': {e}", smp.id))?
            else {
                continue;
            };
            iou_r.extend(to_host(ensemble_loss::soft_iou(
                burn::tensor::activation::sigmoid(si.refined_logits.clone().detach()),
                si.gt.clone(),
            )));
            iou_c.extend(ensemble_loss::hard_iou(si.candidates.clone(), si.gt.clone()).concat());
            si_samples.push(si);
        }
    }
    let si_n = si_samples.len();
    let mut loss = ti.loss.clone().mul_scalar(cfg.ti_weight);
    let mut si_val = None;
    if si_n > 0 {
        let si = ensemble_loss::si_loss(si_samples, cfg.scale).map_err(|e| e.to_string())?;
        si_val = Some(to_host(si.clone().detach())[0]);
        loss = loss + si.mul_scalar(cfg.si_weight);
    }
    let mean = |v: &[f32]| (!v.is_empty()).then(|| v.iter().sum::<f32>() / v.len() as f32);
    let all_gains: Vec<f32> = gains.concat();
    let stats = Stats {
        loss: to_host(loss.clone().detach())[0],
        ti: to_host(ti.loss.detach())[0],
        si: si_val,
        p_tilde: mean(&ti.p_tilde).unwrap_or(0.0),
        gain: mean(&all_gains).unwrap_or(0.0),
        iou_r: mean(&iou_r),
        iou_c: mean(&iou_c),
        si_n,
        adapt: None,
        plain: None,
    };
    Ok((loss, stats))
}

/// The warm-up loss of a batch (`adapt_steps`, SPEC 10.18): the ensemble's two passes with
/// the ground-truth answer in place of `y_tilde`. Text pass (prompt, the K answers with gamma
/// from tau, p_hat, answer): PixelLM's cross-entropy of the answer; seg pass (..., every
/// `f_k^n` fed back with gamma from eta, answer): `f_tilde` at each ground-truth group ->
/// mask logits -> BCE + DICE against its target mask (groups and targets in the answer's
/// order, as SFT pairs them). Weighted by `adapt_weights`.
fn adapt_loss<B: AutodiffBackend>(
    p: &Predictor<B>,
    feats: &popen_model::pixellm::ImageFeatures<B>,
    batch: &[&Sample],
    instrs: &[&str],
    cands: &[Vec<Candidate>],
    scores: &[Scores],
    cfg: &EnsembleConfig,
) -> std::result::Result<(Tensor<B, 1>, Stats), String> {
    let e = |x: popen_model::pixellm::PixelLmError| x.to_string();
    let m = p.model;
    let s = &cfg.ensemble;
    let mut answers = Vec::with_capacity(batch.len());
    let mut masks = Vec::with_capacity(batch.len());
    for smp in batch {
        let (ids, groups) =
            crate::data::answer_with_groups(p.tokenizer, &p.tokens, &smp.answer, m.config().seg_group_len())
                .map_err(|x| format!("'{}': {x}", smp.id))?;
        if groups.len() != smp.target_masks.len() {
            return Err(format!(
                "'{}': the answer has {} <seg> but the sample {} target masks",
                smp.id,
                groups.len(),
                smp.target_masks.len()
            ));
        }
        let mk: Vec<popen_core::mask::Mask> = smp
            .target_masks
            .iter()
            .map(|r| r.decode().map_err(|x| format!("'{}': target mask: {x}", smp.id)))
            .collect::<std::result::Result<_, _>>()?;
        answers.push((ids, groups));
        masks.push(mk);
    }
    // Text pass.
    let prefixes = instrs
        .iter()
        .enumerate()
        .map(|(i, x)| ensemble::text_rows(p, x, i, &cands[i], s.tau(&scores[i])))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(e)?;
    let (_, _, lp) = answer_pass(m, feats, prefixes, &answers)?;
    let lens: Vec<usize> = answers.iter().map(|a| a.0.len()).collect();
    // Seg pass: the answer without its EOS is y_tilde (seg_rows appends the EOS).
    let mut rows = Vec::with_capacity(batch.len());
    for (i, x) in instrs.iter().enumerate() {
        let ids = &answers[i].0[..answers[i].0.len() - 1];
        rows.push(ensemble::seg_rows(p, x, i, &cands[i], s.eta(&scores[i]), ids, s.seg_feedback).map_err(e)?);
    }
    let asm = m.assemble(&rows, Some(feats), Padding::Right).map_err(e)?;
    let hidden = m.forward_hidden(&asm).map_err(e)?;
    let pairs = answer_mask_pairs(m, feats, hidden, &asm, &answers, &masks, batch)?;
    let [wc, wb, wd] = cfg.adapt_weights;
    let parts = crate::loss::pixellm_loss(lp, &lens, pairs, (wc, wb, wd));
    let ce = to_host(parts.ce.detach())[0];
    let mask = to_host((parts.bce + parts.dice).detach())[0];
    let mut total = parts.total;
    // Rehearsal: the same batch in the plain layout (chat prompt -> answer, one pass).
    let mut plain = None;
    if cfg.adapt_plain_weight > 0.0 {
        let prefixes = instrs
            .iter()
            .enumerate()
            .map(|(i, x)| p.prompt_parts(x, i))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(e)?;
        let (asm, hidden, lp) = answer_pass(m, feats, prefixes, &answers)?;
        let pairs = answer_mask_pairs(m, feats, hidden, &asm, &answers, &masks, batch)?;
        let pl = crate::loss::pixellm_loss(lp, &lens, pairs, (wc, wb, wd));
        plain = Some(to_host(pl.total.clone().detach())[0]);
        total = total + pl.total.mul_scalar(cfg.adapt_plain_weight);
    }
    let stats = Stats {
        loss: to_host(total.clone().detach())[0],
        ti: 0.0,
        si: None,
        p_tilde: 0.0,
        gain: 0.0,
        iou_r: None,
        iou_c: None,
        si_n: 0,
        adapt: Some((ce, mask)),
        plain,
    };
    Ok((total, stats))
}

/// One forward of `prefixes[r]` + answer r (its token ids) per row: the assembled batch, its
/// hidden states and the answers' token log-probabilities.
#[allow(clippy::type_complexity)]
fn answer_pass<B: AutodiffBackend>(
    m: &PixelLm<B>,
    feats: &popen_model::pixellm::ImageFeatures<B>,
    prefixes: Vec<Vec<popen_model::pixellm::Part<B>>>,
    answers: &[(Vec<u32>, Vec<Vec<usize>>)],
) -> std::result::Result<(popen_model::pixellm::Assembled<B>, Tensor<B, 3>, Tensor<B, 2>), String> {
    use popen_model::pixellm::{Part, Segment};
    let e = |x: popen_model::pixellm::PixelLmError| x.to_string();
    let rows: Vec<Vec<Part<B>>> = prefixes
        .into_iter()
        .zip(answers)
        .map(|(mut r, a)| {
            r.push(Part::new(Segment::Tokens(a.0.clone())));
            r
        })
        .collect();
    let asm = m.assemble(&rows, Some(feats), Padding::Right).map_err(e)?;
    let hidden = m.forward_hidden(&asm).map_err(e)?;
    let tg: Vec<(usize, Vec<u32>)> =
        asm.piece_starts.iter().zip(answers).map(|(st, a)| (*st.last().expect("parts"), a.0.clone())).collect();
    let lp = m.response_logprobs(hidden.clone(), &tg).map_err(e)?;
    Ok((asm, hidden, lp))
}

/// The (mask logits, target) pairs of the ground-truth answers' `<seg>` groups, read from
/// `hidden` of `asm` whose last piece of row r is answer r (groups and targets in the
/// answer's order, as SFT pairs them).
fn answer_mask_pairs<B: AutodiffBackend>(
    m: &PixelLm<B>,
    feats: &popen_model::pixellm::ImageFeatures<B>,
    hidden: Tensor<B, 3>,
    asm: &popen_model::pixellm::Assembled<B>,
    answers: &[(Vec<u32>, Vec<Vec<usize>>)],
    masks: &[Vec<popen_core::mask::Mask>],
    batch: &[&Sample],
) -> std::result::Result<Vec<(Tensor<B, 2>, Tensor<B, 2>)>, String> {
    let e = |x: popen_model::pixellm::PixelLmError| x.to_string();
    let mut objects = Vec::new();
    let mut gts = Vec::new();
    for (r, (_, groups)) in answers.iter().enumerate() {
        let st = *asm.piece_starts[r].last().expect("parts");
        for (g, mk) in groups.iter().zip(&masks[r]) {
            objects.push((r, g.iter().map(|q| q + st).collect::<Vec<_>>()));
            gts.push(mk);
        }
    }
    let mut pairs = Vec::with_capacity(objects.len());
    if objects.is_empty() {
        return Ok(pairs);
    }
    let dev = hidden.device();
    let f = m.seg_embeddings(hidden, &objects).map_err(e)?;
    let idx: Vec<usize> = objects.iter().map(|o| o.0).collect();
    let (logits, _) = m.decode_masks(feats, f, &idx).map_err(e)?;
    for ((logit, mk), (r, _)) in logits.into_iter().zip(gts).zip(&objects) {
        let [h, w] = logit.dims();
        if (mk.height() as usize, mk.width() as usize) != (h, w) {
            return Err(format!("'{}': target mask {}x{} vs image {h}x{w}", batch[*r].id, mk.height(), mk.width()));
        }
        let bits: Vec<f32> = mk.data().iter().map(|&v| f32::from(v)).collect();
        pairs.push((logit, Tensor::<B, 2>::from_data(TensorData::new(bits, [h, w]), &dev)));
    }
    Ok(pairs)
}

/// The loss of one fixed batch under `model` (tests, diagnostics): samples `ids` of the
/// shard, the job's config. The same function the stage steps on.
pub fn loss_of<B: AutodiffBackend>(
    job: &EnsembleJob,
    model: &PixelLm<B>,
    ids: &[usize],
    device: &B::Device,
) -> Result<f32> {
    loss_with(job, model, None, ids, device, false)
}

/// The warm-up loss (`adapt_steps`, SPEC 10.18) of one fixed batch under `model` (tests,
/// diagnostics): the same function the stage's warm-up steps on.
/// `decoder` samples the K candidates (None: `model` itself).
pub fn adapt_loss_of<B: AutodiffBackend>(
    job: &EnsembleJob,
    model: &PixelLm<B>,
    decoder: Option<&PixelLm<B>>,
    ids: &[usize],
    device: &B::Device,
) -> Result<f32> {
    loss_with(job, model, decoder, ids, device, true)
}

/// [`loss_of`] `model` on the candidates and y_tilde that `decoder` samples and decodes
/// (y_tilde is a greedy decode through p_hat: after a step it may change, and with it the
/// targets of L_ti; comparing losses before and after a step needs the same decode).
pub fn loss_of_decoded_by<B: AutodiffBackend>(
    job: &EnsembleJob,
    model: &PixelLm<B>,
    decoder: &PixelLm<B>,
    ids: &[usize],
    device: &B::Device,
) -> Result<f32> {
    loss_with(job, model, Some(decoder), ids, device, false)
}

fn loss_with<B: AutodiffBackend>(
    job: &EnsembleJob,
    model: &PixelLm<B>,
    decoder: Option<&PixelLm<B>>,
    ids: &[usize],
    device: &B::Device,
    adapting: bool,
) -> Result<f32> {
    let stage::Opened { tokenizer, tokens, .. } = stage::open_init::<B>(job.init, device)?;
    let samples: Vec<Sample> = read_shard(job.samples)?;
    let minilm = load_minilm::<B::InnerBackend>(&job.config.minilm, device)?;
    let pre = Preprocessor::pixellm(model.config().image_size);
    let batch: Vec<&Sample> = ids.iter().map(|&i| &samples[i]).collect();
    let sm = SftModel { pixellm: model.clone() };
    let (_, st) = batch_loss(&sm, &tokenizer, &tokens, &pre, &minilm, &batch, None, job.config, decoder, adapting)
        .map_err(TrainError::Data)?;
    Ok(st.loss)
}

fn load_minilm<B: Backend>(dir: &Path, device: &B::Device) -> Result<SentenceEncoder<B>> {
    if !dir.join("model.safetensors").is_file() {
        return Err(TrainError::Data(format!(
            "the MiniLM sentence encoder is missing: {} (run `make assets`; config key `minilm`)",
            dir.join("model.safetensors").display()
        )));
    }
    SentenceEncoder::load(dir, device).map_err(|e| TrainError::Data(format!("{}: {e}", dir.display())))
}

/// Runs (or resumes) the stage; the trained model folder is `out/model`.
pub fn run<B: AutodiffBackend>(job: &EnsembleJob, device: &B::Device) -> Result<EnsembleReport> {
    let cfg = job.config;
    cfg.validate().map_err(TrainError::Config)?;
    let t0 = Instant::now();
    let out = job.out;
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    let cfg_json = serde_json::to_value(cfg).expect("config serializes");
    let minilm = load_minilm::<B::InnerBackend>(&cfg.minilm, device)?;

    let stage::Opened { model, tokenizer, tokens, config: pcfg } = stage::open_init::<B>(job.init, device)?;
    // The warm-up (adapt_steps) trains the LLM side too; the paper's steps p_hat alone.
    let model = SftModel {
        pixellm: if cfg.adapt_steps > 0 {
            adapt_trains(model)?
        } else {
            only_prompt_trains(model, cfg.train_seg_feedback)?
        },
    };
    let samples: Vec<Sample> = read_shard(job.samples)?;
    let samples: Vec<Sample> =
        samples.into_iter().filter(|s| !s.target_masks.is_empty() || !s.answer.is_empty()).collect();
    if samples.is_empty() {
        return Err(TrainError::Data(format!("{}: no samples", job.samples.display())));
    }
    let order = crate::data::Order { n: samples.len(), batch_size: cfg.batch_size, seed: cfg.seed };
    let per_epoch = order.batches_per_epoch();
    let mut total_steps = cfg.epochs * per_epoch;
    if cfg.epochs == 0 || (cfg.max_steps > 0 && cfg.max_steps < total_steps) {
        total_steps = cfg.max_steps;
    }
    let pre = Preprocessor::pixellm(pcfg.image_size);
    let sam_memo = SamMemo::new(&model.pixellm, job.sam_cache);
    // Per sample: its image's cache key (samples about one image share it).
    let sam_keys: Vec<String> = match &sam_memo {
        Some(_) => samples.iter().map(|s| crate::stage::sam_image_key(&s.image, None)).collect(),
        None => vec![],
    };
    let optim = crate::stage::adamw::<B>(cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay);
    let crate::stage::Start { model, optim, step: start, resumed_from, last_checkpoint: last_ckpt } =
        crate::stage::start(out, job.resume, &cfg_json, model, optim, DType::F32, device)?;
    let mut model = model;
    let adapt_steps = cfg.adapt_steps.min(total_steps);
    if adapt_steps > 0 && start > adapt_steps {
        model = SftModel { pixellm: only_prompt_trains(model.pixellm, cfg.train_seg_feedback)? };
    }
    let (trainable, total_params) = params::count(&model);
    if adapt_steps > 0 {
        tracing::info!(
            "ensemble-train: {} samples, {total_steps} steps: {adapt_steps} warm-up steps (ensemble layout -> ground truth, the LLM side trains: {trainable} / {total_params} parameters), then L_ti + L_si",
            samples.len()
        );
    } else {
        tracing::info!(
            "ensemble-train: {} samples, {total_steps} steps, {trainable} / {total_params} parameters train",
            samples.len()
        );
    }
    let spec = crate::train_loop::loop_spec!("ensemble-train", cfg, out, &cfg_json, total_steps, 1, job.progress);
    let mut plan = EnsemblePlan {
        cfg,
        tokenizer: &tokenizer,
        tokens: &tokens,
        pre: &pre,
        minilm: &minilm,
        samples: &samples,
        sam_memo: sam_memo.as_ref(),
        sam_keys: &sam_keys,
        order: &order,
        adapt_steps,
        per_epoch,
    };
    let crate::train_loop::Trained { model, last_loss } =
        crate::train_loop::run(&spec, &mut plan, model, optim, start, last_ckpt, device)?;
    let model_dir = out.join("model");
    crate::stage::save_model(&model_dir, model.pixellm, &tokenizer)?;
    let mut manifest = Manifest::new("ensemble-train", cfg)?;
    manifest.add_input(job.init.join(bundle::WEIGHTS_FILE))?;
    manifest.add_input(job.samples)?;
    manifest.add_input(cfg.minilm.join("model.safetensors"))?;
    manifest.add_output(model_dir.join(bundle::WEIGHTS_FILE), None)?;
    manifest.count("samples", samples.len() as u64);
    manifest.count("steps", total_steps as u64);
    manifest.time("seconds", t0);
    manifest.write(out.join("manifest.json"))?;
    Ok(EnsembleReport {
        model_dir,
        steps: total_steps,
        resumed_from,
        samples: samples.len(),
        final_loss: last_loss,
        trainable_params: trainable,
        total_params,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Ensemble-train's part of the training loop: the warm-up's switch of the trainable
/// parameters, its own rate, and one batch's L_ti + L_si (or warm-up loss) per step.
struct EnsemblePlan<'a, B: AutodiffBackend> {
    cfg: &'a EnsembleConfig,
    tokenizer: &'a Tokenizer,
    tokens: &'a PixelLmTokens,
    pre: &'a Preprocessor,
    minilm: &'a SentenceEncoder<B::InnerBackend>,
    samples: &'a [Sample],
    sam_memo: Option<&'a SamMemo>,
    sam_keys: &'a [String],
    order: &'a crate::data::Order,
    adapt_steps: usize,
    per_epoch: usize,
}

impl<B: AutodiffBackend> crate::train_loop::StagePlan<B> for EnsemblePlan<'_, B> {
    type Stats = Stats;
    type Row = EnsembleStepMetrics;

    fn begin_step(&mut self, step: usize, model: SftModel<B>) -> Result<SftModel<B>> {
        if self.adapt_steps == 0 || step != self.adapt_steps {
            return Ok(model);
        }
        let cfg = self.cfg;
        let model = SftModel { pixellm: only_prompt_trains(model.pixellm, cfg.train_seg_feedback)? };
        let (t, _) = params::count(&model);
        tracing::info!(
            "ensemble-train: warm-up done at step {step}; L_ti + L_si train {t} parameters (p_hat{})",
            if cfg.train_seg_feedback { " + seg feedback" } else { "" }
        );
        Ok(model)
    }

    fn lr(&self, step: usize, scheduled: f64) -> f64 {
        if step < self.adapt_steps && self.cfg.adapt_lr > 0.0 {
            scheduled * (self.cfg.adapt_lr / self.cfg.lr)
        } else {
            scheduled
        }
    }

    fn gradients(
        &mut self,
        step: usize,
        model: &SftModel<B>,
        last_checkpoint: &str,
    ) -> Result<(GradientsParams, Stats)> {
        let cfg = self.cfg;
        let idx = self.order.batch(step);
        let batch: Vec<&Sample> = idx.iter().map(|&i| &self.samples[i]).collect();
        // The K samples' seed moves with the step so each step draws fresh candidates.
        let mut scfg = cfg.clone();
        scfg.ensemble.seed = cfg.ensemble.seed.wrapping_add(step as u64);
        let ids = || batch.iter().map(|s| format!("'{}'", s.id)).collect::<Vec<_>>().join(", ");
        let (loss, st) = batch_loss(
            model,
            self.tokenizer,
            self.tokens,
            self.pre,
            self.minilm,
            &batch,
            self.sam_memo.map(|m| (m, idx.iter().map(|&i| self.sam_keys[i].as_str()).collect())),
            &scfg,
            None,
            step < self.adapt_steps,
        )
        .map_err(|e| TrainError::Data(format!("step {step}: batch of {}: {e}", ids())))?;
        if !st.loss.is_finite() {
            return Err(TrainError::NonFiniteLoss {
                step,
                value: st.loss,
                parts: format!("L_ti {}, L_si {}; samples {}", st.ti, opt(st.si), ids()),
                last_checkpoint: last_checkpoint.to_string(),
            });
        }
        Ok((GradientsParams::from_grads(loss.backward(), model), st))
    }

    fn row(&self, step: usize, lr: f64, grad_norm: f32, st: Stats, timing: Timing) -> EnsembleStepMetrics {
        EnsembleStepMetrics {
            step,
            epoch: (step + 1) as f64 / self.per_epoch as f64,
            lr,
            loss: st.loss,
            loss_ti: st.ti,
            loss_si: st.si,
            p_tilde: st.p_tilde,
            text_gain: st.gain,
            iou_refined: st.iou_r,
            iou_candidates: st.iou_c,
            si_samples: st.si_n,
            adapt_ce: st.adapt.map(|a| a.0),
            adapt_mask: st.adapt.map(|a| a.1),
            adapt_plain: st.plain,
            grad_norm,
            seconds: timing.step,
        }
    }

    fn detail(row: &EnsembleStepMetrics) -> String {
        match (row.adapt_ce, row.adapt_mask) {
            (Some(ce), Some(mask)) => {
                format!("(warm-up: ce {ce:.4} mask {mask:.4} plain {})", opt(row.adapt_plain))
            }
            _ => format!("(L_ti {:.4} L_si {})", row.loss_ti, opt(row.loss_si)),
        }
    }
}

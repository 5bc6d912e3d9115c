//! `popen predict`: greedy answers and masks for every sample of a shard, written as a
//! predictions shard (`popen_core::shard::Prediction`) with a manifest.
//!
//! Batches of samples go through [`popen_model::infer::Predictor::predict`] (one image
//! encoding, batched generation with KV cache, masks from the hidden states that produced
//! each seg group). An answer whose seg groups are malformed keeps its text; its masks are
//! dropped and the problem is recorded in the record's `meta` (`seg_issues`), so the
//! evaluator sees exactly what the model said.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::prelude::*;
use popen_core::manifest::Manifest;
use popen_core::mask::Rle;
use popen_core::shard::{for_each_taken, Prediction, Sample, ShardWriter, SEG_TOKEN};
use popen_core::shardspec::ShardSpec;
use popen_model::bundle;
use popen_model::infer::Predictor;
use popen_model::sampling::SamplingConfig;
use serde::Serialize;

use crate::{InferError, Result};

/// Settings of a prediction run.
#[derive(Debug, Clone, Serialize)]
pub struct PredictConfig {
    pub batch_size: usize,
    pub sampling: SamplingConfig,
    /// Oracle text: teacher-force each sample's ground-truth answer instead of generating,
    /// so the masks measure the segmentation path alone (a diagnostic upper bound on what
    /// better text would give).
    #[serde(default)]
    pub teacher_force: bool,
    /// POPEN's ensemble (SPEC 6-7): K sampled answers, the text pass, the segmentation pass;
    /// the record's answer is `y_tilde` and its masks the refined ones. None = plain greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ensemble: Option<crate::ensemble::EnsembleSettings>,
    /// Folder keeping the frozen SAM encoder's image embeddings between runs (tiny-sam).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sam_cache: Option<PathBuf>,
}

impl Default for PredictConfig {
    fn default() -> Self {
        PredictConfig {
            batch_size: 8,
            sampling: SamplingConfig { max_new_tokens: 96, ..SamplingConfig::default() },
            teacher_force: false,
            ensemble: None,
            sam_cache: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PredictReport {
    pub output: PathBuf,
    pub predictions: usize,
    pub with_seg_issues: usize,
    pub seconds: f64,
}

/// Predicts every sample of `samples` that `shard` takes and writes `out` (Parquet) and
/// `out` with `.manifest.json`.
pub fn run<B: Backend>(
    model_dir: &Path,
    samples: &Path,
    out: &Path,
    cfg: &PredictConfig,
    shard: ShardSpec,
    progress: bool,
    device: &B::Device,
) -> Result<PredictReport> {
    if cfg.batch_size == 0 {
        return Err(InferError::Config("batch_size must be > 0".into()));
    }
    cfg.sampling.validate().map_err(|e| InferError::Config(e.to_string()))?;
    if let Some(e) = &cfg.ensemble {
        e.validate().map_err(InferError::Config)?;
        if cfg.teacher_force {
            return Err(InferError::Config("--ensemble and --teacher-force exclude each other".into()));
        }
    }
    let t0 = Instant::now();
    let bundle::Bundle { model, mut tokenizer, .. } = bundle::open::<B>(model_dir, device)?;
    let mut predictor = Predictor::new(&model, &mut tokenizer)?;
    // The frozen SAM encoder's embeddings (tiny-sam), kept under cfg.sam_cache for the next
    // predict on the same images (another model of the pipeline shares the encoder).
    let sam_memo = cfg.sam_cache.as_deref().and_then(|d| crate::sam_cache::SamMemo::new(&model, Some(d)));
    predictor.sam = sam_memo.as_ref().map(|m| m as &dyn popen_model::infer::SamSource<B>);
    let mut writer = ShardWriter::<Prediction>::create(out)?;
    let mut manifest = Manifest::new("predict", cfg)?;
    manifest.add_input(samples)?;
    manifest.add_input(model_dir.join(bundle::WEIGHTS_FILE))?;
    let (mut n, mut issues, mut n_fallbacks) = (0usize, 0usize, 0usize);
    // Records validated one by one (image decodes within the limits, prompt fits the
    // model) BEFORE batching: a bad record is skipped alone, its batch-mates still run.
    let mut pending: Vec<(Sample, image::RgbImage)> = Vec::with_capacity(cfg.batch_size);
    let model_name = model.config().name.clone();
    let mut flush =
        |pending: &mut Vec<(Sample, image::RgbImage)>, writer: &mut ShardWriter<Prediction>| -> Result<()> {
            if pending.is_empty() {
                return Ok(());
            }
            let (keep, images): (Vec<Sample>, Vec<image::RgbImage>) = pending.drain(..).unzip();
            let items: Vec<(&image::RgbImage, &str)> =
                images.iter().zip(&keep).map(|(im, s)| (im, s.instruction.as_str())).collect();
            let mut fallbacks: Vec<Option<usize>> = vec![None; keep.len()];
            let preds = if cfg.teacher_force {
                let forced: Vec<(&image::RgbImage, &str, &str)> =
                    images.iter().zip(&keep).map(|(im, s)| (im, s.instruction.as_str(), s.answer.as_str())).collect();
                predictor
                    .teacher_force(&forced)?
                    .into_iter()
                    .zip(&keep)
                    .map(|(f, s)| popen_model::infer::Prediction::forced(s.answer.clone(), f))
                    .collect()
            } else if let Some(e) = &cfg.ensemble {
                let outs = crate::ensemble::predict(&predictor, &items, e)?;
                fallbacks = outs.iter().map(|o| o.fell_back).collect();
                outs.into_iter().map(|o| o.prediction).collect()
            } else {
                predictor.predict(&items, &cfg.sampling)?
            };
            for ((s, p), fell_back) in keep.iter().zip(preds).zip(fallbacks) {
                if fell_back.is_some() {
                    n_fallbacks += 1;
                }
                let mut seg_issues = p.seg_issues.clone();
                let (masks, scores) = if p.answer.matches(SEG_TOKEN).count() == p.masks.len() {
                    (p.masks.iter().map(Rle::encode).collect(), p.mask_scores.clone())
                } else {
                    seg_issues.push(format!(
                        "{} masks for {} {SEG_TOKEN} in the answer: masks dropped",
                        p.masks.len(),
                        p.answer.matches(SEG_TOKEN).count()
                    ));
                    (vec![], vec![])
                };
                let answer = if masks.is_empty() && p.answer.contains(SEG_TOKEN) {
                    // Keep counts consistent: a "<seg>" left without its mask is text, not a target.
                    p.answer.replace(SEG_TOKEN, "<seg?>")
                } else {
                    p.answer.clone()
                };
                if !seg_issues.is_empty() {
                    issues += 1;
                }
                let meta = serde_json::json!({
                    "model": model_name,
                    "stopped": p.stopped,
                    "teacher_forced": cfg.teacher_force,
                    "ensemble_k": cfg.ensemble.as_ref().map(|e| e.k),
                    "ensemble_fallback": fell_back,
                    "seg_issues": seg_issues,
                });
                writer.write(Prediction {
                    id: s.id.clone(),
                    split: s.split.clone(),
                    width: s.width,
                    height: s.height,
                    answer,
                    masks,
                    mask_scores: scores,
                    token_ids: p.ids.iter().map(|&i| i as i32).collect(),
                    token_logprobs: p.logprobs.clone(),
                    meta: meta.to_string(),
                })?;
                n += 1;
            }
            Ok(())
        };
    for_each_taken(samples, &shard, progress.then_some("predict"), |s: Sample| -> Result<()> {
        let image = match s.decode_image() {
            Ok(im) => im,
            Err(e) => {
                manifest.skip_warn(s.id.clone(), e.to_string());
                return Ok(());
            }
        };
        let new_tokens = if cfg.teacher_force {
            match predictor.answer_ids(&s.answer, model.config().seg_group_len()) {
                Ok(ids) => ids.len(),
                Err(e) => {
                    manifest.skip_warn(s.id.clone(), format!("answer: {e}"));
                    return Ok(());
                }
            }
        } else {
            cfg.sampling.max_new_tokens.max(cfg.ensemble.as_ref().map_or(0, |e| e.max_new_tokens))
        };
        if let Err(why) = predictor.check_prompt(&s.instruction, new_tokens) {
            manifest.skip_warn(s.id.clone(), why);
            return Ok(());
        }
        pending.push((s, image));
        if pending.len() == cfg.batch_size {
            flush(&mut pending, &mut writer)?;
        }
        Ok(())
    })?;
    flush(&mut pending, &mut writer)?;
    let rows = writer.finish()?;
    manifest.add_output(out, Some(rows as u64))?;
    manifest.count("predictions", n as u64);
    manifest.count("with_seg_issues", issues as u64);
    if cfg.ensemble.as_ref().is_some_and(|e| e.fallback) {
        manifest.count("ensemble_fallbacks", n_fallbacks as u64);
    }
    manifest.time("seconds", t0);
    let mpath = popen_core::manifest::manifest_beside(out);
    manifest.write(&mpath)?;
    Ok(PredictReport {
        output: out.to_path_buf(),
        predictions: n,
        with_seg_issues: issues,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

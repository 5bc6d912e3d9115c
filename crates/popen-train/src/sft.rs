//! The SFT stage: PixelLM's supervised finetuning on a samples shard.
//!
//! One optimizer step = `grad_accum` micro-batches of `batch_size` samples (each loss scaled
//! by 1/grad_accum, gradients summed), global-norm clipping, AdamW at the scheduled rate.
//! Everything that decides a step (data order, dropout RNG, rate) is a function of the seed
//! and the step index, and a checkpoint holds the parameters, the optimizer state and the
//! position, so `--resume` continues exactly where the checkpoint was taken.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{ItemLazy, TrainOutput, TrainStep};
use popen_core::manifest::Manifest;
use popen_core::mask::Mask;
use popen_model::bundle;
use popen_model::pixellm::{Padding, Part, PixelLm, Segment};
use popen_model::preprocess::{Preprocessed, Preprocessor};
use popen_model::tokenizer::Piece;
use serde::Serialize;

use crate::config::SftConfig;
use crate::data::{self, Example, Order};
use crate::loss::{pixellm_loss, LossParts};
use crate::metrics::StepMetrics;
use crate::params;
use crate::stage;
use crate::train_loop::Timing;
use crate::{io_err, Result, TrainError};

// The trained module lives in `stage` (every stage trains it); SFT's loss and step are here.
pub use crate::stage::SftModel;

/// A micro-batch, decoded and preprocessed on the host.
#[derive(Debug, Clone)]
pub struct SftBatch {
    pub images: Vec<Preprocessed>,
    pub prompts: Vec<Vec<Piece>>,
    pub answers: Vec<Vec<u32>>,
    /// Per sample, the candidate answers of the ensemble layout (empty: PixelLM's layout;
    /// [`crate::data::with_candidates`]).
    pub candidates: Vec<Vec<Vec<u32>>>,
    pub groups: Vec<Vec<Vec<usize>>>,
    /// Per sample, per object: (height, width, 0/1 pixels row-major).
    pub masks: Vec<Vec<(usize, usize, Vec<f32>)>>,
    /// Loss scale (1 / grad_accum).
    pub scale: f32,
    /// Loss weights (ce, bce, dice).
    pub weights: (f32, f32, f32),
    /// Weight of the seg locator's point loss ([`SftConfig::locate_weight`]).
    pub locate_weight: f32,
    /// The cached SAM embeddings of the images, `[n, c, g, g]` flattened, when the model has
    /// a SAM encoder and every example carries its embedding.
    pub sam: Option<(Vec<f32>, [usize; 4])>,
}

/// Loss values of one micro-batch (weighted parts, before the accumulation scale).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StepStats {
    pub loss: f32,
    pub ce: f32,
    pub bce: f32,
    pub dice: f32,
    pub tokens: usize,
    pub masks: usize,
}

/// What a train step returns: the stats, or why the step could not run.
pub struct StepOutput(pub std::result::Result<StepStats, String>);

impl ItemLazy for StepOutput {
    type ItemSync = StepOutput;
    fn sync(self) -> StepOutput {
        self
    }
}

impl<B: Backend> SftModel<B> {
    fn device(&self) -> B::Device {
        self.pixellm.llm.model.embed_tokens.weight.device()
    }

    /// PixelLM's loss of a micro-batch (teacher forcing).
    pub fn loss(&self, batch: &SftBatch) -> std::result::Result<LossParts<B>, String> {
        let m = &self.pixellm;
        let device = self.device();
        let sam =
            batch.sam.as_ref().map(|(v, shape)| Tensor::<B, 4>::from_data(TensorData::new(v.clone(), *shape), &device));
        let feats = m.encode_images_with(&batch.images, sam).map_err(|e| e.to_string())?;
        let rows: Vec<Vec<Part<B>>> = batch
            .prompts
            .iter()
            .zip(&batch.answers)
            .enumerate()
            .map(|(i, (p, a))| {
                let mut parts: Vec<Part<B>> = p
                    .iter()
                    .map(|pc| match pc {
                        Piece::Tokens(t) => Part::new(Segment::Tokens(t.clone())),
                        Piece::Image => Part::new(Segment::Image(i)),
                    })
                    .collect();
                // The ensemble layout (ensemble::answer_parts without gamma): K answers, p_hat.
                let cands = batch.candidates.get(i).map(Vec::as_slice).unwrap_or_default();
                for c in cands {
                    parts.push(Part::new(Segment::Tokens(c.clone())));
                }
                if !cands.is_empty() && m.prompt_embeddings.is_some() {
                    parts.push(Part::new(Segment::Prompt));
                }
                parts.push(Part::new(Segment::Tokens(a.clone())));
                parts
            })
            .collect();
        let asm = m.assemble(&rows, Some(&feats), Padding::Right).map_err(|e| e.to_string())?;
        let hidden = m.forward_hidden(&asm).map_err(|e| e.to_string())?;
        let starts: Vec<usize> = asm.piece_starts.iter().map(|s| *s.last().expect("answer part")).collect();
        let targets: Vec<(usize, Vec<u32>)> = starts.iter().zip(&batch.answers).map(|(s, a)| (*s, a.clone())).collect();
        let lp = m.response_logprobs(hidden.clone(), &targets).map_err(|e| e.to_string())?;
        let lens: Vec<usize> = batch.answers.iter().map(|a| a.len()).collect();
        let mut objects = Vec::new();
        let mut gts = Vec::new();
        for (r, groups) in batch.groups.iter().enumerate() {
            for (g, gt) in groups.iter().zip(&batch.masks[r]) {
                objects.push((r, g.iter().map(|p| p + starts[r]).collect::<Vec<_>>()));
                gts.push(gt);
            }
        }
        let mut pairs = Vec::with_capacity(objects.len());
        let mut locate = None;
        if !objects.is_empty() {
            let f = m.seg_embeddings(hidden, &objects).map_err(|e| e.to_string())?;
            let idx: Vec<usize> = objects.iter().map(|o| o.0).collect();
            let (logits, _, points) = m.decode_masks_located(&feats, f, &idx).map_err(|e| e.to_string())?;
            if let (Some((_, attention)), true) = (points, batch.locate_weight > 0.0) {
                locate = Some(
                    locate_loss(attention, &gts, &idx, &feats.sizes, m.config().decoder.input_image_size)
                        .mul_scalar(batch.locate_weight),
                );
            }
            for (o, (logit, (h, w, bits))) in logits.into_iter().zip(gts).enumerate() {
                let [lh, lw] = logit.dims();
                if (lh, lw) != (*h, *w) {
                    return Err(format!("object {o}: mask logits are {lh}x{lw} but the target is {h}x{w}"));
                }
                let t = Tensor::<B, 2>::from_data(TensorData::new(bits.clone(), [*h, *w]), &device);
                pairs.push((logit, t));
            }
        }
        let mut parts = pixellm_loss(lp, &lens, pairs, batch.weights);
        if let Some(l) = locate {
            // Counted with the mask terms (it is per object).
            parts.total = parts.total + l.clone();
            parts.dice = parts.dice + l;
        }
        Ok(parts)
    }
}

/// The seg locator's loss: cross-entropy of its attention over the grid cells against the
/// target mask's share of each cell, `-sum_c t_c log a_c`, mean over objects with a
/// non-empty target. Cells tile the input frame (the image resized to `resized`, padded at
/// the bottom/right); each target pixel counts for the cell its center falls in.
pub fn locate_loss<B: Backend>(
    attention: Tensor<B, 2>,
    gts: &[&(usize, usize, Vec<f32>)],
    image_index: &[usize],
    sizes: &[((usize, usize), (usize, usize))],
    input_size: usize,
) -> Tensor<B, 1> {
    let device = attention.device();
    let [n, cells] = attention.dims();
    let g = (cells as f64).sqrt().round() as usize;
    let cell = input_size as f64 / g as f64;
    let mut target = vec![0f32; n * cells];
    let mut count = 0usize;
    for (o, (gt, &img)) in gts.iter().zip(image_index).enumerate() {
        let (h, w, bits) = gt;
        let ((rh, rw), _) = sizes[img];
        let row = &mut target[o * cells..(o + 1) * cells];
        let mut on = 0f64;
        for (k, &b) in bits.iter().enumerate() {
            if b > 0.5 {
                let x = ((k % w) as f64 + 0.5) * rw as f64 / *w as f64;
                let y = ((k / w) as f64 + 0.5) * rh as f64 / *h as f64;
                let (cx, cy) = (((x / cell) as usize).min(g - 1), ((y / cell) as usize).min(g - 1));
                row[cy * g + cx] += 1.0;
                on += 1.0;
            }
        }
        if on > 0.0 {
            row.iter_mut().for_each(|v| *v = (*v as f64 / on) as f32);
            count += 1;
        }
    }
    let t = Tensor::<B, 2>::from_data(TensorData::new(target, [n, cells]), &device);
    (attention.clamp_min(1e-12).log() * t).sum().neg().div_scalar(count.max(1) as f64)
}

impl<B: AutodiffBackend> TrainStep for SftModel<B> {
    type Input = SftBatch;
    type Output = StepOutput;

    fn step(&self, batch: SftBatch) -> TrainOutput<StepOutput> {
        let parts = match self.loss(&batch) {
            Ok(p) => p,
            Err(e) => return TrainOutput { grads: GradientsParams::new(), item: StepOutput(Err(e)) },
        };
        let vals = Tensor::cat(vec![parts.total.clone(), parts.ce, parts.bce, parts.dice], 0)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_else(|_| vec![f32::NAN; 4]);
        let stats = StepStats {
            loss: vals[0],
            ce: vals[1],
            bce: vals[2],
            dice: vals[3],
            tokens: parts.tokens,
            masks: parts.masks,
        };
        if !vals.iter().all(|v| v.is_finite()) {
            return TrainOutput { grads: GradientsParams::new(), item: StepOutput(Ok(stats)) };
        }
        let grads = parts.total.mul_scalar(batch.scale).backward();
        TrainOutput::new(self, grads, StepOutput(Ok(stats)))
    }
}

/// Decodes and preprocesses the examples of one micro-batch.
pub fn make_batch(examples: &[&Example], pre: &Preprocessor, cfg: &SftConfig) -> Result<SftBatch> {
    let mut b = SftBatch {
        images: Vec::with_capacity(examples.len()),
        prompts: Vec::new(),
        answers: Vec::new(),
        candidates: Vec::new(),
        groups: Vec::new(),
        masks: Vec::new(),
        scale: 1.0 / cfg.grad_accum as f32,
        weights: (cfg.ce_weight, cfg.bce_weight, cfg.dice_weight),
        locate_weight: cfg.locate_weight,
        sam: None,
    };
    let cached: Option<Vec<&(std::sync::Arc<[f32]>, [usize; 3])>> =
        examples.iter().map(|e| e.sam_embedding.as_ref()).collect();
    if let Some(cached) = cached.filter(|c| !c.is_empty()) {
        let [c, h, w] = cached[0].1;
        if cached.iter().all(|e| e.1 == [c, h, w]) {
            let mut v = Vec::with_capacity(c * h * w * cached.len());
            for e in &cached {
                v.extend_from_slice(&e.0);
            }
            b.sam = Some((v, [cached.len(), c, h, w]));
        }
    }
    for ex in examples {
        let img = ex.decode_image().map_err(TrainError::Data)?;
        b.images.push(pre.apply(&img).map_err(|e| TrainError::Data(format!("sample '{}': {e}", ex.id)))?);
        b.prompts.push(ex.prompt.clone());
        b.answers.push(ex.answer_ids.clone());
        b.candidates.push(ex.candidates.clone());
        b.groups.push(ex.groups.clone());
        let masks: Vec<Mask> = ex.decode_masks().map_err(TrainError::Data)?;
        b.masks.push(
            masks
                .iter()
                .map(|m| (m.height() as usize, m.width() as usize, m.data().iter().map(|&v| f32::from(v)).collect()))
                .collect(),
        );
    }
    Ok(b)
}

/// Compute the frozen SAM encoder's embedding of every example's image once (batches of
/// `batch`), so that training steps skip the encoder: it never trains, and it costs more
/// than the rest of a tiny model's step. No-op for a CLIP model.
///
/// With `cache_dir`, the embeddings are also kept in `cache_dir/sam-<key>.f32` (raw
/// little-endian f32, `[images, c, g, g]`), where the key is a sha256 of the distinct
/// images (in order), the input size and the encoder's weights: another run on the same
/// data and encoder (a second seed, a resumed job) reads them instead
/// ([`crate::stage::sam_embeddings_cached`]).
pub fn cache_sam_embeddings<B: Backend>(
    model: &PixelLm<B>,
    examples: &mut [Example],
    pre: &Preprocessor,
    batch: usize,
    progress: bool,
    cache_dir: Option<&Path>,
) -> Result<()> {
    if model.sam_encoder.is_none() || examples.is_empty() {
        return Ok(());
    }
    // Samples that share an image (several questions per image) share its embedding.
    let (unique, of_example) = crate::data::image_groups(examples);
    let exs: &[Example] = examples;
    let decode = |u: usize| exs[unique[u]].decode_image().map_err(popen_infer::InferError::Data);
    let key = |u: usize, h: &mut sha2::Sha256| {
        use sha2::Digest;
        let img = &exs[unique[u]].image;
        h.update((img.len() as u64).to_le_bytes());
        h.update(img);
    };
    let Some((shared, shape)) =
        crate::stage::sam_embeddings_cached(model, unique.len(), &decode, &key, pre, batch, progress, cache_dir)?
    else {
        return Ok(());
    };
    // One shared copy per distinct image, whatever the number of questions about it.
    for (ex, &u) in examples.iter_mut().zip(&of_example) {
        ex.sam_embedding = Some((shared[u].clone(), shape));
    }
    Ok(())
}

/// One micro-batch over several devices (data parallelism, [`SftConfig::devices`]): the
/// examples are split into contiguous parts, each part's loss and gradients are computed on
/// its device in its own thread, and the gradients, moved to the first device, are summed.
/// Each part's CE is weighted by its share of the micro-batch's answer tokens and its BCE and
/// DICE by its share of the masks, which makes the sum the gradient of PixelLM's loss on the
/// whole micro-batch (a mean over its tokens and its masks), not a mean of per-device means.
pub fn parallel_step<B: AutodiffBackend>(
    model: &SftModel<B>,
    exs: &[&Example],
    pre: &Preprocessor,
    cfg: &SftConfig,
    devices: &[B::Device],
) -> std::result::Result<(GradientsParams, StepStats), String> {
    let main = &devices[0];
    let per = exs.len().div_ceil(devices.len()).max(1);
    let tokens_all: usize = exs.iter().map(|e| e.answer_ids.len()).sum();
    let masks_all: usize = exs.iter().map(|e| e.groups.len()).sum();
    let results: Vec<std::result::Result<(GradientsParams, [f32; 4], usize, usize), String>> =
        std::thread::scope(|s| {
            let handles: Vec<_> = exs
                .chunks(per)
                .zip(devices)
                .map(|(chunk, dev)| {
                    s.spawn(move || {
                        let m = model.clone().fork(dev);
                        let batch = make_batch(chunk, pre, cfg).map_err(|e| e.to_string())?;
                        let parts = m.loss(&batch)?;
                        let tokens: usize = chunk.iter().map(|e| e.answer_ids.len()).sum();
                        let masks: usize = chunk.iter().map(|e| e.groups.len()).sum();
                        let wc = tokens as f64 / tokens_all.max(1) as f64;
                        let wm = masks as f64 / masks_all.max(1) as f64;
                        let (ce, bce, dice) =
                            (parts.ce.mul_scalar(wc), parts.bce.mul_scalar(wm), parts.dice.mul_scalar(wm));
                        let total = ce.clone() + bce.clone() + dice.clone();
                        let v = Tensor::cat(vec![total.clone(), ce, bce, dice], 0)
                            .into_data()
                            .convert::<f32>()
                            .into_vec::<f32>()
                            .map_err(|e| format!("loss values: {e:?}"))?;
                        let vals = [v[0], v[1], v[2], v[3]];
                        if !vals.iter().all(|x| x.is_finite()) {
                            return Ok((GradientsParams::new(), vals, parts.tokens, parts.masks));
                        }
                        let grads = total.mul_scalar(batch.scale).backward();
                        let grads = GradientsParams::from_grads(grads, &m).to_device(main, &m);
                        Ok((grads, vals, parts.tokens, parts.masks))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("a data-parallel worker panicked".into())))
                .collect()
        });
    let mut acc = GradientsAccumulator::<SftModel<B>>::new();
    let mut stats = StepStats::default();
    for r in results {
        let (g, v, tokens, masks) = r?;
        acc.accumulate(model, g);
        stats.loss += v[0];
        stats.ce += v[1];
        stats.bce += v[2];
        stats.dice += v[3];
        stats.tokens += tokens;
        stats.masks += masks;
    }
    Ok((acc.grads(), stats))
}

/// What `popen sft` reports.
#[derive(Debug, Clone, Serialize)]
pub struct SftReport {
    pub model_dir: PathBuf,
    pub steps: usize,
    pub resumed_from: Option<usize>,
    pub examples: usize,
    pub skipped: usize,
    pub final_loss: Option<f32>,
    pub trainable_params: usize,
    pub total_params: usize,
    pub seconds: f64,
}

/// Inputs of the SFT stage.
pub struct SftJob<'a> {
    pub config: &'a SftConfig,
    /// Model folder to start from (`popen model-init` / `model-import`).
    pub init: &'a Path,
    pub train: &'a Path,
    pub out: &'a Path,
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Folder keeping the SAM embeddings between runs ([`cache_sam_embeddings`]).
    pub sam_cache: Option<&'a Path>,
}

/// Runs (or resumes) the SFT stage; the trained model folder is `out/model`.
pub fn run<B: AutodiffBackend>(job: &SftJob, device: &B::Device) -> Result<SftReport> {
    run_on::<B>(job, &vec![device.clone(); job.config.devices.max(1)])
}

/// [`run`] on explicit devices, one data-parallel replica each (`config.devices` of them;
/// the first holds the model, the optimizer and the checkpoints).
pub fn run_on<B: AutodiffBackend>(job: &SftJob, devices: &[B::Device]) -> Result<SftReport> {
    let cfg = job.config;
    let Some(device) = devices.first() else {
        return Err(TrainError::Config("no device to train on".into()));
    };
    if devices.len() != cfg.devices.max(1) {
        return Err(TrainError::Config(format!("devices = {} but {} device(s) given", cfg.devices, devices.len())));
    }
    cfg.validate().map_err(TrainError::Config)?;
    let t0 = Instant::now();
    let out = job.out;
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    let cfg_json = serde_json::to_value(cfg).expect("config serializes");

    // Model and tokenizer.
    let stage::Opened { model, tokenizer, tokens, config: pcfg } = stage::open_init::<B>(job.init, device)?;
    let dtype = cfg.precision.dtype();
    let model = stage::policy(model, cfg.trainable, &cfg.lora, &cfg.freeze, device)?;

    // Data.
    let samples = popen_core::shard::read_shard::<popen_core::shard::Sample>(job.train)?;
    let n_samples = samples.len();
    let (examples, skipped) =
        data::prepare(samples, &tokenizer, &tokens, pcfg.seg_group_len(), pcfg.image_tokens(), cfg.max_len);
    if examples.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: none of its {n_samples} samples can be used ({})",
            job.train.display(),
            skipped.first().map(|s| format!("e.g. '{}': {}", s.id, s.reason)).unwrap_or_else(|| "empty shard".into())
        )));
    }
    let mut examples = examples;
    let pre = Preprocessor::pixellm(pcfg.image_size);
    cache_sam_embeddings(&model.pixellm, &mut examples, &pre, 8, job.progress, job.sam_cache)?;
    let order = Order { n: examples.len(), batch_size: cfg.batch_size, seed: cfg.seed };
    let siblings = if cfg.ensemble_share > 0.0 { crate::data::siblings(&examples) } else { Vec::new() };
    let p_hat = model.pixellm.config().prompt_embeddings;
    let total_micro = cfg.epochs.max(1) * order.batches_per_epoch();
    let mut total_steps = total_micro.div_ceil(cfg.grad_accum);
    if cfg.epochs == 0 || (cfg.max_steps > 0 && cfg.max_steps < total_steps) {
        total_steps = cfg.max_steps;
    }

    // Optimizer, and the checkpoint to resume from.
    let optim = crate::stage::adamw::<B>(cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay);
    let crate::stage::Start { model, optim, step: start, resumed_from, last_checkpoint: last_ckpt } =
        crate::stage::start(out, job.resume, &cfg_json, model, optim, dtype, device)?;

    let (trainable, total_params) = params::count(&model);
    tracing::info!(
        "sft: {} examples ({} skipped), {} steps of {} x {} samples, {} / {} parameters train",
        examples.len(),
        skipped.len(),
        total_steps,
        cfg.batch_size,
        cfg.grad_accum,
        trainable,
        total_params
    );

    let spec = crate::train_loop::loop_spec!("sft", cfg, out, &cfg_json, total_steps, cfg.grad_accum, job.progress);
    let mut plan = SftPlan { cfg, examples: &examples, siblings: &siblings, order: &order, p_hat, pre: &pre, devices };
    let crate::train_loop::Trained { model, last_loss } =
        crate::train_loop::run(&spec, &mut plan, model, optim, start, last_ckpt, device)?;

    // The trained model folder (LoRA folded in), the curve and the manifest.
    let model_dir = out.join("model");
    crate::stage::save_model(&model_dir, model.pixellm, &tokenizer)?;
    let mut manifest = Manifest::new("sft", cfg)?;
    manifest.add_input(job.train)?;
    manifest.add_input(job.init.join(bundle::WEIGHTS_FILE))?;
    manifest.add_output(model_dir.join(bundle::WEIGHTS_FILE), None)?;
    manifest.count("samples", n_samples as u64);
    manifest.count("examples", examples.len() as u64);
    manifest.count("steps", total_steps as u64);
    for s in &skipped {
        manifest.skip(s.id.clone(), s.reason.clone());
    }
    manifest.time("seconds", t0);
    manifest.write(out.join("manifest.json"))?;
    Ok(SftReport {
        model_dir,
        steps: total_steps,
        resumed_from,
        examples: examples.len(),
        skipped: skipped.len(),
        final_loss: last_loss,
        trainable_params: trainable,
        total_params,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// SFT's part of the training loop: `grad_accum` micro-batches (data-parallel over the
/// devices), their summed gradients and mean losses.
struct SftPlan<'a, B: AutodiffBackend> {
    cfg: &'a SftConfig,
    examples: &'a [Example],
    siblings: &'a [Vec<usize>],
    order: &'a Order,
    p_hat: usize,
    pre: &'a Preprocessor,
    devices: &'a [B::Device],
}

impl<B: AutodiffBackend> crate::train_loop::StagePlan<B> for SftPlan<'_, B> {
    type Stats = (StepStats, usize);
    type Row = StepMetrics;

    fn gradients(
        &mut self,
        step: usize,
        model: &SftModel<B>,
        last_checkpoint: &str,
    ) -> Result<(GradientsParams, (StepStats, usize))> {
        let cfg = self.cfg;
        let mut acc = GradientsAccumulator::<SftModel<B>>::new();
        let mut sum = StepStats::default();
        let mut samples = 0usize;
        for micro in 0..cfg.grad_accum {
            let m = step * cfg.grad_accum + micro;
            let idx = self.order.batch(m);
            let shown = crate::data::with_candidates(
                self.examples,
                self.siblings,
                &idx,
                m,
                cfg.seed,
                cfg.ensemble_share,
                cfg.ensemble_k,
                cfg.ensemble_truth,
                self.p_hat,
                cfg.max_len,
            );
            let exs: Vec<&Example> =
                idx.iter().zip(&shown).map(|(&i, e)| e.as_ref().unwrap_or(&self.examples[i])).collect();
            let out = if self.devices.len() > 1 {
                parallel_step(model, &exs, self.pre, cfg, self.devices)
            } else {
                let batch = make_batch(&exs, self.pre, cfg)?;
                let out = model.step(batch);
                let grads = out.grads;
                out.item.0.map(|s| (grads, s))
            };
            let (grads, stats) = out.map_err(|e| {
                TrainError::Data(format!(
                    "step {step}: batch of samples {}: {e}",
                    exs.iter().map(|e| e.id.as_str()).collect::<Vec<_>>().join(", ")
                ))
            })?;
            if !stats.loss.is_finite() {
                return Err(TrainError::NonFinite {
                    step,
                    value: stats.loss,
                    ce: stats.ce,
                    bce: stats.bce,
                    dice: stats.dice,
                    last_checkpoint: last_checkpoint.to_string(),
                });
            }
            acc.accumulate(model, grads);
            let k = 1.0 / cfg.grad_accum as f32;
            sum.loss += stats.loss * k;
            sum.ce += stats.ce * k;
            sum.bce += stats.bce * k;
            sum.dice += stats.dice * k;
            samples += exs.len();
        }
        Ok((acc.grads(), (sum, samples)))
    }

    fn norm_not_finite(
        &self,
        step: usize,
        norm: f32,
        stats: &(StepStats, usize),
        last_checkpoint: String,
    ) -> TrainError {
        let s = &stats.0;
        TrainError::NonFinite { step, value: norm, ce: s.ce, bce: s.bce, dice: s.dice, last_checkpoint }
    }

    fn row(&self, step: usize, lr: f64, grad_norm: f32, stats: (StepStats, usize), timing: Timing) -> StepMetrics {
        let (s, samples) = stats;
        StepMetrics {
            step,
            epoch: ((step + 1) * self.cfg.grad_accum) as f64 / self.order.batches_per_epoch() as f64,
            lr,
            loss: s.loss,
            ce: s.ce,
            bce: s.bce,
            dice: s.dice,
            grad_norm,
            samples,
            seconds: timing.since_last_row,
        }
    }

    fn detail(row: &StepMetrics) -> String {
        format!("(ce {:.4} bce {:.4} dice {:.4})", row.ce, row.bce, row.dice)
    }
}

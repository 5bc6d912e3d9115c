//! The one training loop of SFT, DPO and ensemble-train. A stage plugs in what is its own
//! ([`StagePlan`]: the step's gradients and statistics, its metrics row, its non-finite error)
//! and the loop does the rest the same way for all three: the step's RNG seed (a function
//! of the config's seed and the step), the scheduled learning rate, global-norm clipping, the
//! non-finite-norm stop, the AdamW step, the metrics files (every `log_every` steps, the
//! first and the last), the progress bar or (without a terminal) a log line with the ETA,
//! checkpoints every `checkpoint_every` steps and at the end, and the loss curve. Everything
//! that decides a step is a function of the seed and the step index, so a run resumed from a
//! checkpoint continues bit for bit.

use std::path::Path;
use std::time::Instant;

use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;

use crate::config::Decay;
use crate::metrics::{plot_losses, MetricsLog, MetricsRow};
use crate::stage::{Optim, SftModel};
use crate::{params, schedule, Result, TrainError};

/// The settings the loop takes from a stage's config.
pub struct LoopSpec<'a> {
    /// The stage's name (progress bar).
    pub stage: &'static str,
    /// The run folder: metrics, checkpoints, loss curve.
    pub out: &'a Path,
    /// The effective config, recorded in every checkpoint (a resume must match it).
    pub config: &'a serde_json::Value,
    pub total_steps: usize,
    pub seed: u64,
    pub warmup_steps: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub decay: Decay,
    pub grad_clip: f32,
    /// Micro-batches per optimizer step (recorded in the checkpoint).
    pub grad_accum: usize,
    pub log_every: usize,
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    /// Show a progress bar when stderr is a terminal (log lines with the ETA otherwise).
    pub progress: bool,
}

/// The [`LoopSpec`] of a stage config: its `seed`, schedule (`warmup_steps`, `lr`, `min_lr`,
/// `decay`), `grad_clip` and logging/checkpoint fields, which every stage config names alike.
macro_rules! loop_spec {
    ($stage:expr, $cfg:expr, $out:expr, $config:expr, $total_steps:expr, $grad_accum:expr, $progress:expr) => {
        $crate::train_loop::LoopSpec {
            stage: $stage,
            out: $out,
            config: $config,
            total_steps: $total_steps,
            seed: $cfg.seed,
            warmup_steps: $cfg.warmup_steps,
            lr: $cfg.lr,
            min_lr: $cfg.min_lr,
            decay: $cfg.decay,
            grad_clip: $cfg.grad_clip,
            grad_accum: $grad_accum,
            log_every: $cfg.log_every,
            checkpoint_every: $cfg.checkpoint_every,
            keep_checkpoints: $cfg.keep_checkpoints,
            progress: $progress,
        }
    };
}
pub(crate) use loop_spec;

/// The time a metrics row reports.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// This step's wall time.
    pub step: f64,
    /// The wall time since the previous logged row (or the run's first step).
    pub since_last_row: f64,
}

/// What a stage adds to the loop.
pub trait StagePlan<B: AutodiffBackend> {
    /// The step's statistics, from which its metrics row is built.
    type Stats;
    type Row: MetricsRow;

    /// Called before step `step` with the model; returns the model to train (ensemble-train
    /// switches its trainable parameters when its warm-up ends).
    fn begin_step(&mut self, _step: usize, model: SftModel<B>) -> Result<SftModel<B>> {
        Ok(model)
    }

    /// The rate of step `step`, given the scheduled one.
    fn lr(&self, _step: usize, scheduled: f64) -> f64 {
        scheduled
    }

    /// The step's gradients (summed over its micro-batches) and statistics. A non-finite
    /// loss is the stage's own error (naming `last_checkpoint`).
    fn gradients(
        &mut self,
        step: usize,
        model: &SftModel<B>,
        last_checkpoint: &str,
    ) -> Result<(GradientsParams, Self::Stats)>;

    /// The error of a non-finite gradient norm (by default `NonFiniteLoss` saying so).
    fn norm_not_finite(&self, step: usize, norm: f32, _stats: &Self::Stats, last_checkpoint: String) -> TrainError {
        TrainError::NonFiniteLoss {
            step,
            value: norm,
            parts: "the gradient norm is not finite".into(),
            last_checkpoint,
        }
    }

    /// The metrics row of step `step`.
    fn row(&self, step: usize, lr: f64, grad_norm: f32, stats: Self::Stats, timing: Timing) -> Self::Row;

    /// The row's loss parts for the log line, e.g. `(ce 1.2 bce 0.3 dice 0.4)`.
    fn detail(row: &Self::Row) -> String;
}

/// What the loop hands back: the trained model and the last step's loss.
pub struct Trained<B: AutodiffBackend> {
    pub model: SftModel<B>,
    pub last_loss: Option<f32>,
}

/// Runs steps `start..spec.total_steps` of `plan` on `model` (the stage's starting point, or
/// the resumed checkpoint's: `last_checkpoint` names it for the non-finite errors).
pub fn run<B: AutodiffBackend, P: StagePlan<B>>(
    spec: &LoopSpec,
    plan: &mut P,
    model: SftModel<B>,
    mut optim: Optim<B>,
    start: usize,
    mut last_checkpoint: String,
    device: &B::Device,
) -> Result<Trained<B>> {
    let total = spec.total_steps;
    let mut log: MetricsLog<P::Row> = MetricsLog::open(spec.out, start)?;
    // Without a terminal the step lines below (loss, ETA) are the progress.
    let bar = (spec.progress && popen_core::progress::interactive()).then(|| {
        let b = popen_core::progress::bar(total as u64, spec.stage);
        b.set_position(start as u64);
        b
    });
    let mut last_loss = log.rows.last().map(MetricsRow::loss);
    let mut model = model;
    let mut row_t = Instant::now();
    let run_t = Instant::now();
    for step in start..total {
        let step_t = Instant::now();
        model = plan.begin_step(step, model)?;
        B::seed(device, spec.seed.wrapping_mul(1_000_003).wrapping_add(step as u64));
        let lr = plan.lr(step, schedule::lr_at(step, total, spec.warmup_steps, spec.lr, spec.min_lr, spec.decay));
        let (mut grads, stats) = plan.gradients(step, &model, &last_checkpoint)?;
        let norm = params::clip_global_norm::<B, _>(&model, &mut grads, spec.grad_clip);
        if !norm.is_finite() {
            return Err(plan.norm_not_finite(step, norm, &stats, last_checkpoint));
        }
        model = optim.step(lr, model, grads);
        let timing = Timing { step: step_t.elapsed().as_secs_f64(), since_last_row: row_t.elapsed().as_secs_f64() };
        let row = plan.row(step, lr, norm, stats, timing);
        let loss = row.loss();
        last_loss = Some(loss);
        let done = step + 1;
        if done % spec.log_every.max(1) == 0 || done == total || step == start {
            // Batch jobs have no terminal for the bar: a log line with the ETA instead.
            if bar.is_none() {
                let per_step = run_t.elapsed().as_secs_f64() / (done - start) as f64;
                tracing::info!(
                    "{} step {done}/{total} loss {loss:.4} {} lr {lr:.2e} grad-norm {norm:.3} eta {:.0} s",
                    spec.stage,
                    P::detail(&row),
                    per_step * (total - done) as f64
                );
            }
            log.push(row)?;
            row_t = Instant::now();
        }
        if let Some(b) = &bar {
            b.set_position(done as u64);
            b.set_prefix(format!("loss {loss:.4} lr {lr:.2e}"));
        }
        if done % spec.checkpoint_every.max(1) == 0 || done == total {
            let p = crate::stage::write_checkpoint(
                spec.out,
                &model,
                &optim,
                done,
                spec.grad_accum,
                spec.config,
                spec.keep_checkpoints,
                last_loss,
            )?;
            last_checkpoint = p.display().to_string();
            plot_losses(&log.rows, &spec.out.join("loss.png"))?;
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    // The last step wrote a checkpoint and the curve; a resumed run with no step left redraws it.
    if start >= total {
        plot_losses(&log.rows, &spec.out.join("loss.png"))?;
    }
    Ok(Trained { model, last_loss })
}

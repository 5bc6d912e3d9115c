//! `popen sft`, `popen dpo`, `popen ensemble-train` (thin front ends of popen-train) and
//! `popen predict` (of popen-infer).

use std::path::{Path, PathBuf};

use crate::backend::on_backend;
use anyhow::{bail, Context, Result};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use popen_core::shardspec::ShardSpec;
use popen_infer::predict::PredictConfig;
use popen_train::config::{Precision, StageConfig};
use popen_train::sft::{self, SftJob};
use popen_train::SftConfig;

/// The command-line fields every training stage (sft, dpo, ensemble-train) shares.
#[derive(clap::Args)]
pub struct StageArgs {
    /// Stage config (TOML: pipelines/sft-tiny.toml, dpo-tiny.toml, ensemble-tiny.toml and their
    /// real-scale *-pixellm-7b.toml). Without it, the paper's / PixelLM's values
    /// (--print-config shows them).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output folder: checkpoints/, metrics.jsonl, metrics.csv, loss.png, manifest.json (config,
    /// inputs, counts, skipped records with reasons) and the trained model folder model/.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the newest checkpoint under --out (same data order, optimizer state).
    #[arg(long)]
    resume: bool,
    /// Folder where the frozen SAM encoder's image embeddings of a tiny-sam model are kept
    /// between runs (keyed by the images, input size and encoder weights; the stages share
    /// the files); without it they are computed at every start.
    #[arg(long)]
    sam_cache: Option<PathBuf>,
    /// Override the config's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Override the config's max_steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Override any config key: --set KEY=VALUE, repeatable; KEY dotted (ensemble.k),
    /// VALUE a TOML value (3, false, [1.0, 2.0], "text"). Unknown keys are errors.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Compute backend: flex (CPU, default), ndarray (CPU), cuda (with --features cuda).
    #[arg(long, default_value = "flex", value_parser = crate::backend::BACKENDS)]
    backend: String,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

impl StageArgs {
    /// The effective config: the file or the defaults, with the overrides.
    fn config<C: StageConfig>(&self) -> Result<C> {
        Ok(C::load_with(self.config.as_deref(), self.seed, self.max_steps, &self.set)?)
    }
}

/// One training stage, runnable on any autodiff backend.
trait StageRun {
    type Report: serde::Serialize;
    /// The command's name, for errors.
    const NAME: &'static str;
    /// Runs on `devices` (data-parallel replicas where the stage has them; else the first).
    fn run<B: AutodiffBackend>(&self, devices: &[B::Device]) -> popen_train::Result<Self::Report>;
}

/// Runs a stage on the backend and precision asked for (`replicas` devices: threads sharing
/// the CPU, or GPUs `0..replicas`) and prints its report as JSON.
fn run_stage<R: StageRun>(stage: &R, backend: &str, precision: Precision, replicas: usize, out: &Path) -> Result<()> {
    fn cpu<B: AutodiffBackend, R: StageRun>(stage: &R, replicas: usize) -> popen_train::Result<R::Report> {
        stage.run::<B>(&vec![Default::default(); replicas.max(1)])
    }
    #[cfg(feature = "cuda")]
    fn gpus<B: AutodiffBackend<Device = burn::backend::cuda::CudaDevice>, R: StageRun>(
        stage: &R,
        replicas: usize,
    ) -> popen_train::Result<R::Report> {
        stage.run::<B>(&(0..replicas.max(1)).map(burn::backend::cuda::CudaDevice::new).collect::<Vec<_>>())
    }
    let report = match (backend, precision) {
        ("flex", Precision::F32) => cpu::<Autodiff<burn::backend::Flex>, R>(stage, replicas),
        ("ndarray", Precision::F32) => cpu::<Autodiff<burn::backend::NdArray<f32>>, R>(stage, replicas),
        #[cfg(feature = "cuda")]
        ("cuda", Precision::F32) => gpus::<Autodiff<burn::backend::Cuda<f32, i32>>, R>(stage, replicas),
        #[cfg(feature = "cuda")]
        ("cuda", Precision::Bf16) => gpus::<Autodiff<burn::backend::Cuda<burn::tensor::bf16, i32>>, R>(stage, replicas),
        ("flex" | "ndarray", Precision::Bf16) => bail!(
            "precision = \"bf16\" needs the cuda backend (--backend cuda); on CPU set precision = \"f32\" in the config"
        ),
        (other, _) => return Err(crate::backend::unavailable(other)),
    }
    .with_context(|| format!("{} into {}", R::NAME, out.display()))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

#[derive(clap::Args)]
pub struct SftArgs {
    /// Model folder to start from (popen model-init / model-import).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training samples shard (e.g. data/synth/train.parquet).
    #[arg(long)]
    samples: Option<PathBuf>,
    #[command(flatten)]
    stage: StageArgs,
}

#[derive(clap::Args)]
pub struct PredictArgs {
    /// Model folder.
    #[arg(long)]
    model: PathBuf,
    /// Samples shard to answer (e.g. data/synth/val.parquet).
    #[arg(long)]
    samples: PathBuf,
    /// Output predictions shard (Parquet); a manifest is written beside it.
    #[arg(long)]
    out: PathBuf,
    /// Samples per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Longest answer in tokens.
    #[arg(long, default_value_t = 96)]
    max_new_tokens: usize,
    /// This task's part of the samples, I/N (cluster job arrays).
    #[arg(long, default_value = "0/1")]
    shard: ShardSpec,
    /// Compute backend: flex (CPU, default), ndarray (CPU), cuda (with --features cuda).
    #[arg(long, default_value = "flex", value_parser = crate::backend::BACKENDS)]
    backend: String,
    /// Diagnostic: teacher-force each sample's ground-truth answer instead of generating, so
    /// the masks (and eval's gIoU/cIoU) measure the segmentation path given the right text.
    #[arg(long)]
    teacher_force: bool,
    /// POPEN's ensemble (SPEC 6-7) with K sampled answers (paper: 3): the answer is the
    /// refined y_tilde and the masks the refined ones. 0 = plain greedy prediction.
    #[arg(long, default_value_t = 0)]
    ensemble: usize,
    /// Temperature of the K ensemble samples.
    #[arg(long, default_value_t = 0.7)]
    ensemble_temperature: f32,
    /// Seed of the K ensemble samples.
    #[arg(long, default_value_t = 0)]
    ensemble_seed: u64,
    /// Not in the paper: when the refined answer has no complete <seg> group (or a malformed
    /// one), output the candidate with the highest mean token log-probability instead.
    #[arg(long)]
    ensemble_fallback: bool,
    /// Decode the refined answer token by token instead of checking the K answers as drafts
    /// (same greedy ids up to rounding; for timing comparisons).
    #[arg(long)]
    ensemble_no_draft: bool,
    /// Re-read the chat prompt (image tokens and question) in each ensemble pass instead of
    /// prefilling it once and continuing its KV cache (same results up to rounding; for timing
    /// comparisons).
    #[arg(long)]
    ensemble_no_shared_prompt: bool,
    /// Ablation (the paper's "without segmentation embedding ensemble"): the seg pass reads the
    /// K answers and p_hat but not their fed-back seg embeddings f_k^n.
    #[arg(long)]
    ensemble_no_seg_feedback: bool,
    /// Ablation (the paper's "without gamma"): no attention biases from tau / eta.
    #[arg(long)]
    ensemble_no_gamma: bool,
    /// Folder where the frozen SAM encoder's image embeddings of a tiny-sam model are kept
    /// between runs (predicting several models of the pipeline on one split encodes once).
    #[arg(long)]
    sam_cache: Option<PathBuf>,
}

impl StageRun for SftJob<'_> {
    type Report = sft::SftReport;
    const NAME: &'static str = "sft";
    fn run<B: AutodiffBackend>(&self, devices: &[B::Device]) -> popen_train::Result<Self::Report> {
        sft::run_on::<B>(self, devices)
    }
}

pub fn sft(a: SftArgs) -> Result<()> {
    let cfg: SftConfig = a.stage.config()?;
    if a.stage.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let (Some(init), Some(train), Some(out)) = (&a.model, &a.samples, &a.stage.out) else {
        bail!("popen sft needs --model MODEL_DIR, --samples TRAIN.parquet and --out DIR (see --help)");
    };
    let _lock = popen_core::guard::claim_output(out, &[("--model", init), ("--samples", train)])?;
    let job = SftJob {
        config: &cfg,
        init,
        train,
        out,
        resume: a.stage.resume,
        progress: true,
        sam_cache: a.stage.sam_cache.as_deref(),
    };
    run_stage(&job, &a.stage.backend, cfg.precision, cfg.devices, out)
}

pub fn predict(a: PredictArgs) -> Result<()> {
    let cfg = PredictConfig {
        batch_size: a.batch_size,
        sampling: popen_model::sampling::SamplingConfig { max_new_tokens: a.max_new_tokens, ..Default::default() },
        teacher_force: a.teacher_force,
        ensemble: (a.ensemble > 0).then(|| popen_infer::ensemble::EnsembleSettings {
            k: a.ensemble,
            temperature: a.ensemble_temperature,
            seed: a.ensemble_seed,
            max_new_tokens: a.max_new_tokens,
            fallback: a.ensemble_fallback,
            draft: !a.ensemble_no_draft,
            share_prompt: !a.ensemble_no_shared_prompt,
            seg_feedback: !a.ensemble_no_seg_feedback,
            gamma: !a.ensemble_no_gamma,
            ..Default::default()
        }),
        sam_cache: a.sam_cache.clone(),
    };
    let report = on_backend!(a.backend.as_str(), B, dev => predict_on::<B>(&a, &cfg, &dev))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn predict_on<B: Backend>(
    a: &PredictArgs,
    cfg: &PredictConfig,
    dev: &B::Device,
) -> Result<popen_infer::predict::PredictReport> {
    let out = a.out.clone();
    // Inside a Slurm job array the default 0/1 becomes the array task.
    let shard = a.shard.or_slurm()?;
    let out_path = shard.output_path(&out);
    let _lock = popen_core::guard::claim_output(&out_path, &[("--model", &a.model), ("--samples", &a.samples)])?;
    popen_infer::predict::run::<B>(&a.model, &a.samples, &out_path, cfg, shard, true, dev)
        .with_context(|| format!("predict {} -> {}", a.samples.display(), out_path.display()))
}

/// `popen dpo --help`.
pub const DPO_LONG_ABOUT: &str = "Preference optimization (POPEN stage 2, SPEC section 5) of the SFT model.\n\n\
Loss per step: L_t (text DPO, Eq. 2, over RLHF-V's lambda-weighted sequence log-likelihood, Eq. 3) on a \
P_t batch + L_s (Eq. 4: the policy's segmentation embedding on each target's median perturbed image \
against the recorded reference embeddings, switched off per target by the indicator) + PixelLM's mask \
loss (BCE + DICE against ground truth on the clean images) on a P_s batch. P_s of phase 1 serves the \
first half of the steps, phase 2 the second half. The reference model is the one the shards were \
collected with: its log-probs and embeddings are read from them (--model should be that model). The pixel \
decoder stays frozen.\n\n\
Writes into --out: checkpoints/, metrics.jsonl and metrics.csv (TRL's rewards/chosen, rewards/rejected, \
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected; loss/seg, seg/* and \
seg/indicator_off = share of targets the indicator switched off; bce, dice), loss.png, manifest.json \
(config, inputs, counts, skipped records with reasons) and the trained model folder model/.\n\n\
Ablations (the paper's Tables 4-5) are switches of the config's [ablation] table: no_text_loss, \
no_seg_loss, no_lambda, no_indicator, random_ps, one_phase; --print-config shows every knob.";

#[derive(clap::Args)]
pub struct DpoArgs {
    /// The SFT model folder: the policy starts from it, and it is the reference the
    /// preference shards were collected with.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Text preference shard P_t (popen collect-pt).
    #[arg(long)]
    pt: Option<PathBuf>,
    /// Segmentation preference shard P_s of curriculum phase 1 (popen collect-ps --phase 1):
    /// the first half of the steps.
    #[arg(long)]
    ps_phase1: Option<PathBuf>,
    /// P_s of phase 2 (popen collect-ps --phase 2): the second half of the steps.
    #[arg(long)]
    ps_phase2: Option<PathBuf>,
    /// The samples shard collect-ps read: its instance masks are the clean images' proposals
    /// that Eq. 1's term needs for the phase-1 indicator (collect-ps' default proposer).
    #[arg(long, conflicts_with = "proposals")]
    samples: Option<PathBuf>,
    /// The proposal shards collect-ps read (--proposals there), for the phase-1 indicator.
    #[arg(long, num_args = 1..)]
    proposals: Vec<PathBuf>,
    /// Train even if a preference shard was collected with another model than --model (the
    /// shards record their reference model; by default a mismatch is an error).
    #[arg(long)]
    allow_foreign_ref: bool,
    #[command(flatten)]
    stage: StageArgs,
}

impl StageRun for popen_train::dpo::DpoJob<'_> {
    type Report = popen_train::dpo::DpoReport;
    const NAME: &'static str = "dpo";
    fn run<B: AutodiffBackend>(&self, devices: &[B::Device]) -> popen_train::Result<Self::Report> {
        popen_train::dpo::run::<B>(self, &devices[0])
    }
}

pub fn dpo(a: DpoArgs) -> Result<()> {
    use popen_train::dpo::{DpoConfig, DpoJob, ProposalSource};
    let cfg: DpoConfig = a.stage.config()?;
    if a.stage.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let (Some(init), Some(pt), Some(ps1), Some(ps2), Some(out)) =
        (&a.model, &a.pt, &a.ps_phase1, &a.ps_phase2, &a.stage.out)
    else {
        bail!("popen dpo needs --model MODEL_DIR, --pt PT.parquet, --ps-phase1 A.parquet, --ps-phase2 B.parquet and --out DIR (see --help)");
    };
    let proposals = match (&a.samples, a.proposals.is_empty()) {
        (Some(s), _) => ProposalSource::Samples(s),
        (None, false) => ProposalSource::Shards(&a.proposals),
        (None, true) => ProposalSource::None,
    };
    let job = DpoJob {
        config: &cfg,
        init,
        pt,
        ps_phase1: ps1,
        ps_phase2: ps2,
        proposals,
        out,
        resume: a.stage.resume,
        progress: true,
        sam_cache: a.stage.sam_cache.as_deref(),
        allow_foreign_ref: a.allow_foreign_ref,
    };
    let mut inputs: Vec<(&str, &Path)> =
        vec![("--model", init), ("--pt", pt), ("--ps-phase1", ps1), ("--ps-phase2", ps2)];
    if let Some(s) = &a.samples {
        inputs.push(("--samples", s));
    }
    inputs.extend(a.proposals.iter().map(|p| ("--proposals", p.as_path())));
    let _lock = popen_core::guard::claim_output(out, &inputs)?;
    run_stage(&job, &a.stage.backend, cfg.precision, 1, out)
}

/// `popen ensemble-train --help`.
pub const ENSEMBLE_LONG_ABOUT: &str = "Ensemble training (POPEN stage 3, SPEC section 6) of the DPO model.\n\n\
Per batch of training samples: K answers are sampled from the model (one batched generate), each token \
gets its preference score tau and each <seg> its sentence score eta; the text pass (image, instruction, \
y_1..y_K with the gamma bias of Eq. 5, p_hat) generates the refined answer y_tilde; the segmentation \
pass (the same prefix, the K answers' segmentation embeddings fed back with Eq. 6's gamma, y_tilde) gives \
the refined masks. Loss = L_ti (p(y_tilde) = exp(mean log p) times the all-MiniLM-L6-v2 similarity gains \
of y_tilde over each y_k against the ground truth) + L_si (soft IoU of the refined masks vs hard IoU of \
the K answers' masks against the ground truth). Only p_hat (the model's prompt embeddings) trains; the \
LLM, vision tower, decoder and the seg-feedback projection stay frozen (train_seg_feedback = true \
unfreezes the latter). The MiniLM folder is the config's `minilm` (make assets fetches it).\n\n\
Writes OUT/model (the model folder with the trained p_hat; use it with `popen predict --ensemble K`), \
OUT/manifest.json, OUT/metrics.jsonl + metrics.csv + loss.png and OUT/checkpoints/step-N (--resume \
continues exactly from the newest).";

#[derive(clap::Args)]
pub struct EnsembleTrainArgs {
    /// The DPO model folder (popen dpo's OUT/model); it must have p_hat (prompt_embeddings > 0).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training samples shard (with ground-truth answers and masks), e.g. data/synth/train.parquet.
    #[arg(long)]
    samples: Option<PathBuf>,
    /// Override the config's MiniLM folder.
    #[arg(long)]
    minilm: Option<PathBuf>,
    #[command(flatten)]
    stage: StageArgs,
}

impl StageRun for popen_train::ensemble_train::EnsembleJob<'_> {
    type Report = popen_train::ensemble_train::EnsembleReport;
    const NAME: &'static str = "ensemble-train";
    fn run<B: AutodiffBackend>(&self, devices: &[B::Device]) -> popen_train::Result<Self::Report> {
        popen_train::ensemble_train::run::<B>(self, &devices[0])
    }
}

pub fn ensemble_train(a: EnsembleTrainArgs) -> Result<()> {
    use popen_train::ensemble_train::{EnsembleConfig, EnsembleJob};
    let mut cfg: EnsembleConfig = a.stage.config()?;
    if let Some(m) = &a.minilm {
        cfg.minilm = m.clone();
        cfg.validate().map_err(|e| anyhow::anyhow!("config: {e}"))?;
    }
    if a.stage.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let (Some(init), Some(samples), Some(out)) = (&a.model, &a.samples, &a.stage.out) else {
        bail!("popen ensemble-train needs --model MODEL_DIR, --samples TRAIN.parquet and --out DIR (see --help)");
    };
    let _lock = popen_core::guard::claim_output(out, &[("--model", init), ("--samples", samples)])?;
    let job = EnsembleJob {
        config: &cfg,
        init,
        samples,
        out,
        resume: a.stage.resume,
        progress: true,
        sam_cache: a.stage.sam_cache.as_deref(),
    };
    run_stage(&job, &a.stage.backend, Precision::F32, 1, out)
}

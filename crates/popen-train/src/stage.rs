//! What the training stages (SFT, DPO, ensemble-train) share around their loop: the trained
//! module [`SftModel`], the AdamW optimizer, `--resume` from the newest checkpoint
//! (parameters, their ids, optimizer state), writing a checkpoint, the final model folder
//! (LoRA folded in, written atomically). The loop itself is [`crate::train_loop`]. The frozen
//! SAM encoder's embedding cache ([`sam_embeddings_cached`], [`SamMemo`]) lives in
//! `popen_infer::sam_cache` and is re-exported here.

use std::path::{Path, PathBuf};

use burn::optim::AdamWConfig;
use burn::optim::Optimizer;
use burn::prelude::*;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;
use popen_model::bundle;
use popen_model::pixellm::{PixelLm, PixelLmConfig};
use popen_model::tokenizer::{PixelLmTokens, Tokenizer};
use popen_model::weights::Checkpoint;

use crate::checkpoint::{self, TrainState};
use crate::params;
use crate::{io_err, Result, TrainError};

// The SAM embedding cache lives in popen-infer (`popen predict` reads it too); old paths kept.
pub use popen_infer::sam_cache::{sam_embedding_of, sam_embeddings_cached, sam_encoder_key, sam_image_key, SamMemo};

/// The trained module of every stage: PixelLM, wrapped so that burn-train's
/// [`burn::train::TrainStep`] can be implemented for it (SFT's step is in `sft`).
#[derive(burn::module::Module, Debug)]
pub struct SftModel<B: Backend> {
    pub pixellm: PixelLm<B>,
}

/// A stage's starting model folder, opened: the model, its tokenizer with PixelLM's tokens
/// added, those tokens, and the model's config.
pub struct Opened<B: Backend> {
    pub model: PixelLm<B>,
    pub tokenizer: Tokenizer,
    pub tokens: PixelLmTokens,
    pub config: PixelLmConfig,
}

/// Opens the model folder `init` (`popen model-init`, or an earlier stage's `out/model`).
pub fn open_init<B: Backend>(init: &Path, device: &B::Device) -> Result<Opened<B>> {
    let bundle::Bundle { model, mut tokenizer, .. } = bundle::open::<B>(init, device)?;
    let config = model.config().clone();
    let tokens = tokenizer.add_pixellm_tokens(config.seg_group_len()).map_err(|e| TrainError::Data(e.to_string()))?;
    Ok(Opened { model, tokenizer, tokens, config })
}

/// The module a stage trains: `trainable`'s selection (LoRA adapters added when asked), then
/// the `freeze` modules frozen on top.
pub fn policy<B: AutodiffBackend>(
    model: PixelLm<B>,
    trainable: crate::config::Trainable,
    lora: &crate::config::LoraConfig,
    freeze: &[String],
    device: &B::Device,
) -> Result<SftModel<B>> {
    let model = params::select_trainable(model, trainable, lora, device).map_err(TrainError::Config)?;
    Ok(SftModel { pixellm: params::freeze_modules(model, freeze).map_err(TrainError::Config)? })
}

/// burn's AdamW over the trained module.
pub type Optim<B> = burn::optim::adaptor::OptimizerAdaptor<burn::optim::AdamW, SftModel<B>, B>;

/// AdamW with the given betas, epsilon and (decoupled) weight decay.
pub fn adamw<B: AutodiffBackend>(beta1: f32, beta2: f32, eps: f32, weight_decay: f32) -> Optim<B> {
    AdamWConfig::new().with_beta_1(beta1).with_beta_2(beta2).with_epsilon(eps).with_weight_decay(weight_decay).init()
}

/// Where a run starts: the model and optimizer (from the checkpoint when resumed), the first
/// step, and the checkpoint a NaN error would name.
pub struct Start<B: AutodiffBackend> {
    pub model: SftModel<B>,
    pub optim: Optim<B>,
    pub step: usize,
    pub resumed_from: Option<usize>,
    /// The newest checkpoint's folder, or "none".
    pub last_checkpoint: String,
}

/// Resumes from the newest checkpoint under `out` when `resume` (the checkpoint must have
/// been written with the same `config`), or starts at step 0; without `resume`, a folder
/// that already holds checkpoints is refused (`--resume` or another `--out`).
pub fn start<B: AutodiffBackend>(
    out: &Path,
    resume: bool,
    config: &serde_json::Value,
    model: SftModel<B>,
    optim: Optim<B>,
    dtype: DType,
    device: &B::Device,
) -> Result<Start<B>> {
    if !resume {
        if checkpoint::latest(out)?.is_some() {
            return Err(TrainError::Checkpoint {
                path: out.join("checkpoints"),
                message: "holds checkpoints of an earlier run: pass --resume to continue it, or choose another --out"
                    .into(),
            });
        }
        return Ok(Start { model, optim, step: 0, resumed_from: None, last_checkpoint: "none".into() });
    }
    let Some((dir, state)) = checkpoint::latest(out)? else {
        tracing::info!("--resume: no checkpoint under {}, starting at step 0", out.display());
        return Ok(Start { model, optim, step: 0, resumed_from: None, last_checkpoint: "none".into() });
    };
    if &state.config != config {
        return Err(TrainError::Checkpoint {
            path: dir,
            message: "was written with a different config; resume with the same config or start a new --out".into(),
        });
    }
    let model_file = dir.join(checkpoint::MODEL_FILE);
    let ck = Checkpoint::open(&model_file)
        .map_err(|e| TrainError::Checkpoint { path: model_file.clone(), message: e.to_string() })?;
    let pix = popen_model::weights::apply_checkpoint(model.pixellm, &ck, dtype, false)
        .map_err(|e| TrainError::Checkpoint { path: model_file.clone(), message: e.to_string() })?;
    let (model, missing) = params::assign_ids(SftModel { pixellm: pix }, &state.param_ids);
    if !missing.is_empty() {
        return Err(TrainError::Checkpoint {
            path: dir.join(checkpoint::STATE_FILE),
            message: format!("parameters not in the model: {}", missing.join(", ")),
        });
    }
    let opt_path = dir.join(checkpoint::OPTIMIZER_FILE);
    let rec = BinFileRecorder::<FullPrecisionSettings>::new()
        .load(opt_path.clone(), device)
        .map_err(|e| TrainError::Checkpoint { path: opt_path, message: format!("optimizer state: {e}") })?;
    let optim = optim.load_record(rec);
    tracing::info!("resuming from {} (step {})", dir.display(), state.step);
    Ok(Start {
        model,
        optim,
        step: state.step,
        resumed_from: Some(state.step),
        last_checkpoint: dir.display().to_string(),
    })
}

/// Writes the checkpoint of `step` optimizer steps (`grad_accum` micro-batches each) under
/// `out`, keeping the newest `keep`.
#[allow(clippy::too_many_arguments)]
pub fn write_checkpoint<B: AutodiffBackend>(
    out: &Path,
    model: &SftModel<B>,
    optim: &Optim<B>,
    step: usize,
    grad_accum: usize,
    config: &serde_json::Value,
    keep: usize,
    last_loss: Option<f32>,
) -> Result<PathBuf> {
    let ids = params::float_params(model).into_iter().map(|(n, (id, _, _))| (n, id.val())).collect();
    let state =
        TrainState { step, micro_batches: step * grad_accum, config: config.clone(), param_ids: ids, last_loss };
    checkpoint::write(out, &state, keep, |dir| {
        popen_model::pixellm::save(&model.pixellm, dir.join(checkpoint::MODEL_FILE))?;
        BinFileRecorder::<FullPrecisionSettings>::new()
            .record(optim.to_record(), dir.join(checkpoint::OPTIMIZER_FILE))
            .map_err(|e| io_err(dir.join(checkpoint::OPTIMIZER_FILE), format!("{e}")))?;
        Ok(())
    })
}

/// The trained model folder `dir` (LoRA adapters merged into the weights): written into a
/// sibling `<dir>.partial-<pid>` and renamed into place, so `dir` is either the previous
/// folder or the complete new one.
pub fn save_model<B: Backend>(dir: &Path, mut model: PixelLm<B>, tokenizer: &Tokenizer) -> Result<()> {
    if popen_model::lora::count(&model.llm) > 0 {
        model.llm = popen_model::lora::merge(model.llm);
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
    let tmp = dir.with_file_name(format!("{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    bundle::save(&tmp, &model, tokenizer)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, e))?;
    Ok(())
}

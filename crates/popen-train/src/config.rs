//! The SFT stage's configuration: every hyperparameter of PixelLM's recipe (PIXELLM.md
//! "Losses and training recipe", SPEC section 9), named, with its default. TOML files under
//! `pipelines/` (`sft-tiny.toml`, `sft-pixellm-7b.toml`) set them; `popen sft --print-config`
//! prints the effective one.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::{Result, TrainError};

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trainable {
    /// Every parameter (the tiny model, trained from scratch).
    Full,
    /// PixelLM's recipe at real scale: LoRA adapters on `lora.targets` of the LLM, plus
    /// lm_head, embed_tokens, the pixel decoder, text_hidden_fcs and the projectors; the
    /// CLIP tower and the rest of the LLM frozen. Adapters are merged into the weights when
    /// the model is saved.
    Lora,
    /// As `lora` without the adapters: the LLM's layers frozen entirely.
    Heads,
}

/// LoRA settings (PixelLM: r 8, alpha 16, dropout 0.05 on q_proj and v_proj).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f64,
    /// Attention/MLP projections of every LLM layer that get an adapter: any of q_proj,
    /// k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { r: 8, alpha: 16.0, dropout: 0.05, targets: vec!["q_proj".into(), "v_proj".into()] }
    }
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decay {
    /// Linear to `min_lr` at the last step (PixelLM's WarmupDecayLR).
    Linear,
    Cosine,
    Constant,
}

/// Numeric precision of the training forward/backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    F32,
    /// bf16 weights and activations (the cuda backend; PixelLM trains in bf16).
    Bf16,
}

impl Precision {
    /// The tensor dtype the model's parameters are kept in.
    pub fn dtype(self) -> burn::tensor::DType {
        match self {
            Precision::F32 => burn::tensor::DType::F32,
            Precision::Bf16 => burn::tensor::DType::BF16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// Seed of the data order, dropout and initialization of new parameters.
    pub seed: u64,
    /// Passes over the training shard (PixelLM: 10). `max_steps` > 0 stops earlier.
    pub epochs: usize,
    /// Optimizer steps to run at most (0 = no limit besides `epochs`).
    pub max_steps: usize,
    /// Samples per micro-batch (one forward/backward).
    pub batch_size: usize,
    /// Micro-batches per optimizer step (effective batch = batch_size x grad_accum).
    pub grad_accum: usize,
    /// AdamW (PixelLM: lr 3e-4, betas 0.9 / 0.95, eps 1e-8, weight decay 0).
    pub lr: f64,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Warmup steps (linear from 0), then `decay` (PixelLM: 100, linear).
    pub warmup_steps: usize,
    pub decay: Decay,
    /// Learning rate at the end of the decay.
    pub min_lr: f64,
    /// Global gradient-norm clipping (PixelLM: 1.0; 0 = off).
    pub grad_clip: f32,
    /// Loss weights (PixelLM: 1.0 CE + 2.0 BCE + 0.5 DICE).
    pub ce_weight: f32,
    pub bce_weight: f32,
    pub dice_weight: f32,
    /// Weight of the seg locator's point loss (models with `seg_locator` only; not in
    /// PixelLM): mean over objects of |point - target centroid|_1 / input side, pulling the
    /// located point onto the ground-truth mask's centroid. 0 = off.
    #[serde(default)]
    pub locate_weight: f32,
    /// Samples whose prompt + answer exceed this many tokens are skipped and reported
    /// (PixelLM: 512).
    pub max_len: usize,
    pub trainable: Trainable,
    /// Top-level modules kept frozen on top of `trainable` (one of
    /// [`crate::params::FREEZABLE`]), e.g. `["decoder"]` to keep a pretrained pixel decoder
    /// as it is (the SAM encoder of a `tiny-sam` model is always frozen).
    pub freeze: Vec<String>,
    pub lora: LoraConfig,
    pub precision: Precision,
    /// Write a checkpoint every this many optimizer steps (and at the end).
    pub checkpoint_every: usize,
    /// Checkpoints kept (oldest removed first; the final model is always kept).
    pub keep_checkpoints: usize,
    /// Metrics line every this many optimizer steps.
    pub log_every: usize,
    /// Data-parallel replicas on one node: every micro-batch is split into `devices`
    /// contiguous parts, run on separate devices (GPUs `0..devices` with `--backend cuda`;
    /// threads sharing the CPU otherwise), and their gradients are summed on the first device
    /// with each part's CE weighted by its share of the answer tokens and its mask terms by its
    /// share of the masks, so the update equals one device's on the whole micro-batch.
    #[serde(default = "one")]
    pub devices: usize,
    /// Ensemble-aware SFT (SPEC 10.18; not in PixelLM, for small models): the share of
    /// training examples shown in the ensemble layout of POPEN's stage 3 (prompt, then
    /// `ensemble_k` candidate answers each closed by `</s>`, then `p_hat`, then the ground
    /// truth as the target), so the model learns to read K answers in its context before
    /// `ensemble-train`. Candidates cost no sampling: each is the ground-truth answer with
    /// probability `ensemble_truth`, else the answer to another question about the same
    /// image (right objects, wrong question). Drawn per micro-batch from the seed (resume
    /// is exact). 0 = off (PixelLM's SFT).
    #[serde(default)]
    pub ensemble_share: f64,
    /// Candidate answers per ensemble-layout example (POPEN's K: 3).
    #[serde(default = "three")]
    pub ensemble_k: usize,
    /// Probability that a candidate is the ground-truth answer.
    #[serde(default = "point_four")]
    pub ensemble_truth: f64,
}

fn one() -> usize {
    1
}

fn three() -> usize {
    3
}

fn point_four() -> f64 {
    0.4
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            seed: 0,
            epochs: 10,
            max_steps: 0,
            batch_size: 16,
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
            ce_weight: 1.0,
            bce_weight: 2.0,
            dice_weight: 0.5,
            locate_weight: 0.0,
            max_len: 512,
            trainable: Trainable::Lora,
            freeze: Vec::new(),
            lora: LoraConfig::default(),
            precision: Precision::Bf16,
            checkpoint_every: 500,
            keep_checkpoints: 2,
            log_every: 10,
            devices: 1,
            ensemble_share: 0.0,
            ensemble_k: 3,
            ensemble_truth: 0.4,
        }
    }
}

impl SftConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let pos = |name: &str, v: usize| if v == 0 { Err(format!("{name} must be > 0")) } else { Ok(()) };
        pos("batch_size", self.batch_size)?;
        pos("grad_accum", self.grad_accum)?;
        pos("checkpoint_every", self.checkpoint_every)?;
        pos("log_every", self.log_every)?;
        pos("max_len", self.max_len)?;
        pos("keep_checkpoints", self.keep_checkpoints)?;
        pos("devices", self.devices)?;
        if !(0.0..=1.0).contains(&self.ensemble_share) || !(0.0..=1.0).contains(&self.ensemble_truth) {
            return Err(format!(
                "ensemble_share ({}) and ensemble_truth ({}) must be in [0, 1]",
                self.ensemble_share, self.ensemble_truth
            ));
        }
        if self.ensemble_share > 0.0 {
            pos("ensemble_k", self.ensemble_k)?;
        }
        check_optimizer(OptimizerKnobs {
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
        for f in &self.freeze {
            if !crate::params::FREEZABLE.contains(&f.as_str()) {
                return Err(format!("freeze: unknown module '{f}' (one of {})", crate::params::FREEZABLE.join(", ")));
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
                if !crate::params::LORA_TARGETS.contains(&t.as_str()) {
                    return Err(format!(
                        "lora.targets: unknown projection '{t}' (one of {})",
                        crate::params::LORA_TARGETS.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What every training stage's config (SFT, DPO, ensemble) shares: it is read from TOML
/// (unknown fields are errors), printed back by `--print-config`, checked, and its seed and
/// step budget can be overridden from the command line.
pub trait StageConfig: Serialize + DeserializeOwned + Default {
    /// The stage's own checks (a message naming the field).
    fn validate(&self) -> std::result::Result<(), String>;
    fn seed_mut(&mut self) -> &mut u64;
    fn max_steps_mut(&mut self) -> &mut usize;

    /// Reads and checks a TOML file; errors name the file.
    fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| crate::io_err(path, e))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        cfg.validate().map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    fn to_toml(&self) -> String {
        popen_core::config_text::config_toml(self).expect("config serializes")
    }

    /// The effective config of a command line: the file (or the defaults), then the seed and
    /// max_steps overrides, checked again.
    fn load(path: Option<&Path>, seed: Option<u64>, max_steps: Option<usize>) -> Result<Self> {
        Self::load_with(path, seed, max_steps, &[])
    }

    /// [`StageConfig::load`] with `--set KEY=VALUE` overrides applied to the TOML before it is
    /// read: KEY is a dotted path (`ensemble.k`, `adapt_steps`), VALUE a TOML value (`3`,
    /// `false`, `[1.0, 2.0]`, `"text"`; a bare word is a string). Unknown keys are errors,
    /// as in the file.
    fn load_with(path: Option<&Path>, seed: Option<u64>, max_steps: Option<usize>, sets: &[String]) -> Result<Self> {
        let cfg = match path {
            Some(p) => Self::from_toml_file(p)?,
            None => Self::default(),
        };
        let mut cfg = popen_core::config_text::with_sets(cfg, sets).map_err(TrainError::Config)?;
        if let Some(s) = seed {
            *cfg.seed_mut() = s;
        }
        if let Some(m) = max_steps {
            *cfg.max_steps_mut() = m;
        }
        cfg.validate().map_err(TrainError::Config)?;
        Ok(cfg)
    }
}

/// One `KEY=VALUE` override on a config's TOML value (popen-core's, shared by every command).
pub use popen_core::config_text::apply_set;

/// Implements [`StageConfig`] for a config with `seed` and `max_steps` fields and an inherent
/// `validate`.
macro_rules! stage_config {
    ($t:ty) => {
        impl $crate::config::StageConfig for $t {
            fn validate(&self) -> std::result::Result<(), String> {
                <$t>::validate(self)
            }
            fn seed_mut(&mut self) -> &mut u64 {
                &mut self.seed
            }
            fn max_steps_mut(&mut self) -> &mut usize {
                &mut self.max_steps
            }
        }
    };
}
pub(crate) use stage_config;

stage_config!(SftConfig);

/// The step-budget and AdamW/schedule knobs every training stage shares (SFT, DPO).
pub(crate) struct OptimizerKnobs {
    pub epochs: usize,
    pub max_steps: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub grad_clip: f32,
}

/// The checks of [`OptimizerKnobs`]: something to train, `0 <= min_lr <= lr`, `lr > 0`
/// finite, betas in [0, 1), `eps > 0`, `weight_decay` and `grad_clip` >= 0.
pub(crate) fn check_optimizer(k: OptimizerKnobs) -> std::result::Result<(), String> {
    if k.epochs == 0 && k.max_steps == 0 {
        return Err("epochs and max_steps are both 0: nothing to train".into());
    }
    if !(k.lr > 0.0 && k.lr.is_finite() && k.min_lr >= 0.0 && k.min_lr <= k.lr) {
        return Err(format!("lr {} and min_lr {} must satisfy 0 <= min_lr <= lr, lr > 0", k.lr, k.min_lr));
    }
    for (n, b) in [("beta1", k.beta1), ("beta2", k.beta2)] {
        if !(0.0..1.0).contains(&b) {
            return Err(format!("{n} = {b} must be in [0, 1)"));
        }
    }
    if !(k.eps > 0.0) || !(k.weight_decay >= 0.0) || !(k.grad_clip >= 0.0) {
        return Err("eps must be > 0, weight_decay and grad_clip >= 0".into());
    }
    Ok(())
}

//! LLaMA decoder (Hugging Face `LlamaForCausalLM` layout) in burn, with what POPEN needs on top
//! of plain decoding.
//!
//! The module tree is named like the Hugging Face checkpoint (`model.layers.{i}.self_attn.q_proj`,
//! `lm_head` unless tied), so [`Llama::load`] applies `LlamaForCausalLM` safetensors (single file
//! or sharded folder) with no remapping table, and [`load_gguf`] needs only
//! [`crate::gguf::llama_hf_name`]. The KV cache is an explicit [`KvCache`] value owned by the
//! caller, not module state, so one model serves many concurrent decodes.
//!
//! Entry points, from the lowest level up:
//! - [`Llama::embed`] -> [`Llama::forward_embeds`] (final-normed hidden states, HF
//!   `last_hidden_state`) -> [`Llama::logits`]: the embedding-level path PixelLM needs (image
//!   tokens, seg embeddings and `p_hat` are spliced in as embeddings). [`AttnExtras`] carries
//!   explicit positions, a padding mask over keys and POPEN's additive attention bias `gamma`
//!   (SPEC 6, Eq. 5; SPEC 10.6).
//! - [`token_logprobs`], [`Llama::score`] / [`Llama::score_tensor`]: teacher-forced per-token
//!   log-probabilities (SPEC 5, Eq. 3).
//! - [`crate::sampling::generate`]: batched sampling with per-row stop and seeds;
//!   [`Llama::greedy`] is its one-row greedy shorthand.

use std::path::Path;

use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::{Bool, DType, Int, TensorData};
use serde::{Deserialize, Serialize};

use crate::gguf::{GgufError, GgufFile};
use crate::lora::{self, Lora};
use crate::sampling::{generate, SamplingConfig};
use crate::weights::{self, Remap, WeightsError};

/// Errors building, loading or running a [`Llama`].
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: bad LLaMA config: {msg}")]
    Config { path: String, msg: String },
    /// Every missing or mis-shaped tensor, by its Hugging Face name.
    #[error("{path}: {} tensor problem(s): {}", problems.len(), problems.join("; "))]
    Tensors { path: String, problems: Vec<String> },
    /// Inputs that do not fit the model or each other (shapes, cache, ids, sampling settings).
    /// Returned before any state (the cache) is modified.
    #[error("LLaMA input: {0}")]
    Input(String),
}

fn input_err<T>(msg: impl Into<String>) -> Result<T, LlamaError> {
    Err(LlamaError::Input(msg.into()))
}

/// Mirrors the Hugging Face `config.json` of a `LlamaForCausalLM`.
///
/// Deserializing reads an HF `config.json` directly, as written by either generation of
/// transformers: 4.x spells the RoPE settings `rope_theta` and `rope_scaling` at the top level,
/// 5.x nests them as `rope_parameters: {rope_type, rope_theta, factor, ...}`; both are read
/// (a file carrying both spellings must agree). Unknown fields (`model_type`, `mm_*` of
/// LLaVA/PixelLM, `torch_dtype`/`dtype`, ...) are ignored, absent fields take `LlamaConfig`'s
/// defaults in transformers (the same in 4.x and 5.x: vocab 32000, hidden 4096, intermediate
/// 11008, 32 layers, 32 heads, `num_key_value_heads` = heads, eps 1e-6, theta 10000, 2048
/// positions, untied). RoPE types `default`, `linear` and `llama3` are computed
/// ([`RopeScaling`]); settings this implementation does not compute (another `rope_type`, a
/// `partial_rotary_factor` other than 1, `attention_bias`, `mlp_bias`, an activation other
/// than silu, a `head_dim` other than hidden/heads) are errors naming the field, never silently
/// ignored. Serializing writes the 4.x spelling of the fields below, which both generations of
/// transformers read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "HfLlamaConfig")]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// RoPE frequency scaling (`rope_type` other than `default`); `None`: plain RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
}

/// The RoPE scalings of transformers' `ROPE_INIT_FUNCTIONS` that popen computes: each rescales
/// the inverse frequencies once (no attention factor, no dependence on the sequence length).
/// Serialized as transformers' dict (`{"rope_type": "linear", "factor": 2.0}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// `inv_freq / factor` (position interpolation).
    Linear { factor: f64 },
    /// Llama 3.1's: wavelengths above `original / low_freq_factor` divided by `factor`, below
    /// `original / high_freq_factor` kept, smoothly interpolated in between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

/// The raw HF `config.json` fields of both transformers generations (defaults applied after
/// the RoPE fields are reconciled, see [`LlamaConfig`]).
#[derive(Deserialize)]
struct HfLlamaConfig {
    #[serde(default = "hf::vocab_size")]
    vocab_size: usize,
    #[serde(default = "hf::hidden_size")]
    hidden_size: usize,
    #[serde(default = "hf::intermediate_size")]
    intermediate_size: usize,
    #[serde(default = "hf::num_hidden_layers")]
    num_hidden_layers: usize,
    #[serde(default = "hf::num_attention_heads")]
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default = "hf::rms_norm_eps")]
    rms_norm_eps: f64,
    /// 4.x (and 5.x's legacy input): top level.
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default = "hf::max_position_embeddings")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    /// 4.x: `{"type"|"rope_type": ..., "factor": ...}` or null.
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    /// 5.x: `{"rope_type": ..., "rope_theta": ..., ...}`.
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    /// Phi-3 style top-level value; transformers 5 prefers it over the dict's.
    #[serde(default)]
    original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
}

/// transformers' `LlamaConfig` defaults.
mod hf {
    pub fn vocab_size() -> usize {
        32000
    }
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn intermediate_size() -> usize {
        11008
    }
    pub fn num_hidden_layers() -> usize {
        32
    }
    pub fn num_attention_heads() -> usize {
        32
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn rope_theta() -> f64 {
        10000.0
    }
    pub fn max_position_embeddings() -> usize {
        2048
    }
}

/// The RoPE settings of either generation, reconciled the way transformers 5's
/// `convert_rope_params_to_dict` / `standardize_rope_params` read them: the dict is
/// `rope_scaling` (4.x) or `rope_parameters` (5.x); `rope_type` falls back to the legacy
/// `type`, then `default`; `rope_theta` comes from the dict, else the top level, else 10000.
/// Where transformers would silently prefer one of two differing spellings, this is an error.
fn resolve_rope(r: &HfLlamaConfig) -> Result<(f64, Option<RopeScaling>), String> {
    use serde_json::Value;
    let present = |v: &Option<Value>| v.as_ref().filter(|v| !v.is_null()).cloned();
    let (name, dict) = match (present(&r.rope_scaling), present(&r.rope_parameters)) {
        (Some(s), Some(p)) if s != p => {
            return Err(format!("rope_scaling {s} and rope_parameters {p} disagree (one of the two, please)"))
        }
        (Some(s), _) => ("rope_scaling", Some(s)),
        (None, Some(p)) => ("rope_parameters", Some(p)),
        (None, None) => ("rope_parameters", None),
    };
    let dict = match dict {
        None => serde_json::Map::new(),
        Some(Value::Object(m)) => m,
        Some(other) => return Err(format!("{name} must be an object, got {other}")),
    };
    if let Some((k, _)) = dict.iter().find(|(_, v)| v.is_object()) {
        return Err(format!("{name}.{k}: RoPE parameters per layer type are not supported (LLaMA has one)"));
    }
    let num = |k: &str| -> Result<Option<f64>, String> {
        match dict.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| format!("{name}.{k} must be a number, got {v}")),
        }
    };
    let text = |k: &str| -> Result<Option<String>, String> {
        match dict.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(format!("{name}.{k} must be a string, got {v}")),
        }
    };
    let rope_type = match (text("rope_type")?, text("type")?) {
        (Some(a), Some(b)) if a != b => return Err(format!("{name}.rope_type {a:?} and {name}.type {b:?} disagree")),
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => "default".to_string(),
    };
    let theta = match (num("rope_theta")?, r.rope_theta) {
        (Some(a), Some(b)) if a != b => return Err(format!("{name}.rope_theta {a} and rope_theta {b} disagree")),
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => hf::rope_theta(),
    };
    let partial = num("partial_rotary_factor")?.or(r.partial_rotary_factor);
    if let Some(p) = partial.filter(|&p| p != 1.0) {
        return Err(format!("partial_rotary_factor {p} is not supported (LLaMA rotates the whole head)"));
    }
    let need = |k: &str| -> Result<f64, String> {
        num(k)?.ok_or_else(|| format!("{name}.{k} is required for rope_type {rope_type:?}"))
    };
    let positive = |k: &str, v: f64| -> Result<f64, String> {
        if v > 0.0 && v.is_finite() {
            Ok(v)
        } else {
            Err(format!("{name}.{k} {v} must be positive"))
        }
    };
    let scaling = match rope_type.as_str() {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: positive("factor", need("factor")?)? }),
        "llama3" => {
            let low = positive("low_freq_factor", need("low_freq_factor")?)?;
            let high = positive("high_freq_factor", need("high_freq_factor")?)?;
            if high <= low {
                return Err(format!("{name}.high_freq_factor {high} must exceed low_freq_factor {low}"));
            }
            let original = match r.original_max_position_embeddings {
                Some(o) => o as f64,
                None => num("original_max_position_embeddings")?.unwrap_or(r.max_position_embeddings as f64),
            };
            if !(original >= 1.0 && original.fract() == 0.0) {
                return Err(format!("{name}.original_max_position_embeddings {original} must be a positive integer"));
            }
            Some(RopeScaling::Llama3 {
                factor: positive("factor", need("factor")?)?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original as usize,
            })
        }
        other => return Err(format!("{name}.rope_type {other:?} is not supported (default, linear, llama3)")),
    };
    Ok((theta, scaling))
}

impl TryFrom<HfLlamaConfig> for LlamaConfig {
    type Error = String;

    fn try_from(r: HfLlamaConfig) -> Result<Self, String> {
        if let Some(act) = r.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(format!("hidden_act {act:?} is not supported (only silu)"));
        }
        if r.attention_bias {
            return Err("attention_bias true is not supported".into());
        }
        if r.mlp_bias {
            return Err("mlp_bias true is not supported".into());
        }
        let (rope_theta, rope_scaling) = resolve_rope(&r)?;
        let cfg = LlamaConfig {
            vocab_size: r.vocab_size,
            hidden_size: r.hidden_size,
            intermediate_size: r.intermediate_size,
            num_hidden_layers: r.num_hidden_layers,
            num_attention_heads: r.num_attention_heads,
            num_key_value_heads: r.num_key_value_heads.unwrap_or(r.num_attention_heads),
            rms_norm_eps: r.rms_norm_eps,
            rope_theta,
            max_position_embeddings: r.max_position_embeddings,
            tie_word_embeddings: r.tie_word_embeddings,
            rope_scaling,
        };
        cfg.check().map_err(|e| e.to_string())?;
        if let Some(hd) = r.head_dim.filter(|&hd| hd != cfg.head_dim()) {
            return Err(format!(
                "head_dim {hd} differs from hidden_size / num_attention_heads = {}; not supported",
                cfg.head_dim()
            ));
        }
        Ok(cfg)
    }
}

/// transformers' `LlamaConfig()` defaults (the LLaMA-7B shape), the same values that absent
/// `config.json` fields take.
impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            vocab_size: hf::vocab_size(),
            hidden_size: hf::hidden_size(),
            intermediate_size: hf::intermediate_size(),
            num_hidden_layers: hf::num_hidden_layers(),
            num_attention_heads: hf::num_attention_heads(),
            num_key_value_heads: hf::num_attention_heads(),
            rms_norm_eps: hf::rms_norm_eps(),
            rope_theta: hf::rope_theta(),
            max_position_embeddings: hf::max_position_embeddings(),
            tie_word_embeddings: false,
            rope_scaling: None,
        }
    }
}

impl LlamaConfig {
    /// A small random-weight model for shape tests.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 128,
            tie_word_embeddings: true,
            rope_scaling: None,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The RoPE inverse frequencies this config computes ([`rope_inv_freq`]).
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        rope_inv_freq(self.head_dim(), self.rope_theta, self.rope_scaling.as_ref())
    }

    /// Read an HF `config.json` (see the type's docs for defaults and rejected settings).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, LlamaError> {
        let path = path.as_ref();
        let bad = |msg: String| LlamaError::Config { path: path.display().to_string(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
    }

    /// From the `llama.*` metadata of a llama.cpp GGUF. Embeddings count as tied when the file
    /// has no `output.weight` (llama.cpp drops it for tied checkpoints).
    pub fn from_gguf(g: &GgufFile) -> Result<Self, LlamaError> {
        let arch = g.get_str("general.architecture")?.to_string();
        let u = |k: &str| g.get_u64(&format!("{arch}.{k}")).map(|v| v as usize);
        let hidden_size = u("embedding_length")?;
        let vocab_size = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => g.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let num_attention_heads = u("attention.head_count")?;
        // llama.cpp's RoPE scaling (`rope.scaling.type`; llama3's as `rope_freqs.weight`
        // factors) is not read: an error rather than plain RoPE.
        let bad = |msg: String| LlamaError::Config { path: g.path().display().to_string(), msg };
        let key = format!("{arch}.rope.scaling.type");
        if let Ok(t) = g.get_str(&key).map(str::to_string) {
            if t != "none" {
                return Err(bad(format!("{key} {t:?} is not supported")));
            }
        }
        if g.tensor_info("rope_freqs.weight").is_some() {
            return Err(bad("rope_freqs.weight (RoPE frequency factors) is not supported".into()));
        }
        let cfg = Self {
            vocab_size,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads,
            num_key_value_heads: u("attention.head_count_kv").unwrap_or(num_attention_heads),
            rms_norm_eps: g.get_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"))? as f64,
            rope_theta: g.get_f32(&format!("{arch}.rope.freq_base")).map(|v| v as f64).unwrap_or(10000.0),
            max_position_embeddings: u("context_length")?,
            tie_word_embeddings: g.tensor_info("output.weight").is_none(),
            rope_scaling: None,
        };
        cfg.validate(&g.path().display().to_string())?;
        Ok(cfg)
    }

    fn validate(&self, path: &str) -> Result<(), LlamaError> {
        self.check().map_err(|msg| LlamaError::Config { path: path.to_string(), msg })
    }

    /// Shape consistency of the config (every size positive, heads divide evenly, even head dim).
    fn check(&self) -> Result<(), String> {
        if self.vocab_size == 0 || self.hidden_size == 0 || self.intermediate_size == 0 {
            return Err("vocab_size, hidden_size and intermediate_size must be positive".into());
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "num_attention_heads {} not divisible by num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} is odd", self.head_dim()));
        }
        if !(self.rms_norm_eps >= 0.0 && self.rope_theta > 0.0) {
            return Err(format!("rms_norm_eps {} / rope_theta {} out of range", self.rms_norm_eps, self.rope_theta));
        }
        Ok(())
    }

    /// Random weights (burn's default initialisers); norms start at 1.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Llama<B> {
        let lin = |i: usize, o: usize| LinearConfig::new(i, o).with_bias(false).init(device);
        let norm =
            || RmsNorm { weight: Param::from_tensor(Tensor::ones([self.hidden_size], device)), eps: self.rms_norm_eps };
        let hd = self.head_dim();
        let layers = (0..self.num_hidden_layers)
            .map(|_| DecoderLayer {
                self_attn: Attention {
                    q_proj: lin(self.hidden_size, self.num_attention_heads * hd),
                    k_proj: lin(self.hidden_size, self.num_key_value_heads * hd),
                    v_proj: lin(self.hidden_size, self.num_key_value_heads * hd),
                    o_proj: lin(self.num_attention_heads * hd, self.hidden_size),
                    q_lora: None,
                    k_lora: None,
                    v_lora: None,
                    o_lora: None,
                    num_heads: self.num_attention_heads,
                    num_kv_heads: self.num_key_value_heads,
                    head_dim: hd,
                    rope_theta: self.rope_theta,
                    rope_scaling: self.rope_scaling.clone(),
                },
                mlp: Mlp {
                    gate_proj: lin(self.hidden_size, self.intermediate_size),
                    up_proj: lin(self.hidden_size, self.intermediate_size),
                    down_proj: lin(self.intermediate_size, self.hidden_size),
                    gate_lora: None,
                    up_lora: None,
                    down_lora: None,
                },
                input_layernorm: norm(),
                post_attention_layernorm: norm(),
            })
            .collect();
        Llama {
            model: LlamaModel {
                embed_tokens: EmbeddingConfig::new(self.vocab_size, self.hidden_size).init(device),
                layers,
                norm: norm(),
            },
            lm_head: (!self.tie_word_embeddings).then(|| lin(self.hidden_size, self.vocab_size)),
        }
    }
}

/// RMSNorm: `x * rsqrt(mean(x^2) + eps) * w`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        // Backends here are f32; the reduction stays in f32 as in HF (which upcasts).
        let inv = (x.clone().powf_scalar(2.0).mean_dim(2) + self.eps).sqrt().recip();
        x * inv * self.weight.val().unsqueeze::<3>()
    }
}

/// Extra attention inputs of one forward call. All `None` (the `Default`) = a plain causal
/// forward continuing the cache. The causal mask always applies on top.
#[derive(Debug, Clone)]
pub struct AttnExtras<B: Backend> {
    /// `[b, s]` RoPE position of each new token. Default: `cache_len + 0..s` for every row.
    /// Left-padded batches pass positions that count only real tokens (HF `generate` does
    /// `cumsum(mask) - 1`), so a padded row computes exactly what it computes alone.
    pub positions: Option<Tensor<B, 2, Int>>,
    /// `[b, cache_len + s]`: `false` marks a padding key, never attended by any query. In
    /// cached decoding pass it for the full key length (cached + new) at every step.
    pub key_keep: Option<Tensor<B, 2, Bool>>,
    /// `[b, cache_len + s]`: additive attention bias per key position, added to
    /// `QK^T / sqrt(d)` before softmax in every head and layer, the same for every query row
    /// (POPEN Eq. 5, SPEC 10.6). Used as given: differentiable iff it is a tracked tensor.
    pub gamma: Option<Tensor<B, 2>>,
}

impl<B: Backend> Default for AttnExtras<B> {
    fn default() -> Self {
        Self { positions: None, key_keep: None, gamma: None }
    }
}

/// Value written into masked attention scores: `finfo(float32).min`, as transformers' additive
/// masks use. Finite, so a query row whose keys are all masked (a padding query) gets a uniform
/// softmax instead of NaN (`-inf - -inf`), and its garbage output never poisons real rows.
const MASKED: f32 = f32::MIN;

/// Per-forward attention inputs shared by every layer: RoPE tables, the key mask and gamma.
struct AttnInputs<B: Backend> {
    /// `[b, 1, s, head_dim]`.
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
    /// `[b, 1, s, total]`, true = masked (future or padding key).
    mask: Tensor<B, 4, Bool>,
    /// `mask` repeated to the scores' `[b, kv_heads, rep, s, total]` of the first layer's
    /// head layout, materialized once for all layers: `mask_fill` (and its backward) would
    /// otherwise copy the broadcast view to a contiguous one in every layer.
    full_mask: Option<Tensor<B, 5, Bool>>,
    /// `[b, 1, 1, total]`.
    gamma: Option<Tensor<B, 4>>,
    /// The RoPE tables repeated over the first layer's heads in the projections' own layout
    /// (`[b, s, heads, head_dim]`: queries, then keys with the KV heads), materialized once for
    /// all layers, so that rotating is a same-shape product on contiguous buffers instead of
    /// a broadcast over the head axis (issue 21; bounded like `full_mask`).
    rope_full: Option<[Tensor<B, 4>; 4]>,
}

/// Grouped-query self-attention with rotate-half RoPE.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    /// LoRA adapters ([`crate::lora`]); `None` except while a trainer adapts the model.
    pub q_lora: Option<Lora<B>>,
    pub k_lora: Option<Lora<B>>,
    pub v_lora: Option<Lora<B>>,
    pub o_lora: Option<Lora<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    /// [`LlamaConfig::rope_scaling`] (the same in every layer).
    pub rope_scaling: Option<RopeScaling>,
}

/// The largest per-forward tensor (elements) that attention materializes to spare the CPU
/// backend's strided broadcasts: the repeated key mask and RoPE tables (`AttnInputs`).
const MATERIALIZE_MAX: usize = 1 << 24;

#[cfg(not(test))]
fn materialize_max() -> usize {
    MATERIALIZE_MAX
}

#[cfg(test)]
thread_local! {
    /// Tests set 0 to run the broadcast (plain) path.
    static MATERIALIZE_MAX_TEST: std::cell::Cell<usize> = const { std::cell::Cell::new(MATERIALIZE_MAX) };
}

#[cfg(test)]
fn materialize_max() -> usize {
    MATERIALIZE_MAX_TEST.with(|c| c.get())
}

/// HF `rotate_half`: `[-x2, x1]` where `x1, x2` are the halves of the head dim.
fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.narrow(3, d / 2, d / 2);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

/// RoPE inverse frequencies (`head_dim / 2` values) as transformers' `ROPE_INIT_FUNCTIONS`
/// compute them (modeling_rope_utils.py): `theta^(-2i/d)`, then [`RopeScaling`]'s rescaling
/// (linear: `/ factor`; llama3: by wavelength `2 pi / f` against `original / low_freq_factor`
/// and `original / high_freq_factor`, smoothed in between). Computed in f64.
pub fn rope_inv_freq(head_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| {
            let f = theta.powf(-(2.0 * i as f64) / head_dim as f64);
            match *scaling.unwrap_or(&RopeScaling::Linear { factor: 1.0 }) {
                RopeScaling::Linear { factor } => f / factor,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: lo,
                    high_freq_factor: hi,
                    original_max_position_embeddings: old,
                } => {
                    let old = old as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < old / hi {
                        f
                    } else if wavelen > old / lo {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                }
            }
        })
        .collect()
}

/// RoPE cos/sin `[b, 1, s, head_dim]` for integer positions `[b, s]`, laid out as
/// `concat(freqs, freqs)` and computed in f32 like HF's `LlamaRotaryEmbedding`
/// (angle = position * inv_freq, [`rope_inv_freq`]).
fn rope_tables<B: Backend>(
    positions: Tensor<B, 2, Int>,
    head_dim: usize,
    theta: f64,
    scaling: Option<&RopeScaling>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let device = positions.device();
    let [b, s] = positions.dims();
    let half = head_dim / 2;
    let inv: Vec<f32> = rope_inv_freq(head_dim, theta, scaling).into_iter().map(|f| f as f32).collect();
    let inv =
        Tensor::<B, 1>::from_data(TensorData::new(inv, [half]), &device).reshape([1, 1, half]).expand([b, s, half]);
    let ang = positions.float().reshape([b, s, 1]).expand([b, s, half]) * inv;
    let ang = Tensor::cat(vec![ang.clone(), ang], 2).unsqueeze_dim::<4>(1);
    (ang.clone().cos(), ang.sin())
}

fn apply_rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let dims = x.dims();
    x.clone() * cos.clone().expand(dims) + rotate_half(x) * sin.clone().expand(dims)
}

impl<B: Backend> Attention<B> {
    /// `x`: [batch, seq, hidden]; `cache`: this layer's (k, v), [batch, kv_heads, past, head_dim].
    fn forward(&self, x: Tensor<B, 3>, inputs: &AttnInputs<B>, cache: &mut LayerCache<B>) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = lora::apply(&self.q_proj, &self.q_lora, x.clone()).reshape([b, s, h, hd]);
        let k = lora::apply(&self.k_proj, &self.k_lora, x.clone()).reshape([b, s, kvh, hd]);
        let v = lora::apply(&self.v_proj, &self.v_lora, x).reshape([b, s, kvh, hd]).swap_dims(1, 2);

        let (q, k) = match &inputs.rope_full {
            Some([cq, sq, ck, sk]) if cq.dims() == [b, s, h, hd] && ck.dims() == [b, s, kvh, hd] => {
                (apply_rope(q, cq, sq).swap_dims(1, 2), apply_rope(k, ck, sk).swap_dims(1, 2))
            }
            _ => (
                apply_rope(q.swap_dims(1, 2), &inputs.cos, &inputs.sin),
                apply_rope(k.swap_dims(1, 2), &inputs.cos, &inputs.sin),
            ),
        };

        let (k, v) = cache.append(k, v);
        let total = k.dims()[2];

        // GQA: each KV head serves h / kvh consecutive query heads (HF repeat_kv). Instead of
        // repeating K and V (a strided copy of the whole cache per layer and step), the rep
        // query heads of one KV head are stacked along the query axis: [b, kvh, rep * s, hd]
        // against [b, kvh, total, hd] (the same dot products).
        let rep = h / kvh;
        let scores = q
            .reshape([b, kvh, rep * s, hd])
            .matmul(k.swap_dims(2, 3))
            .div_scalar((hd as f64).sqrt())
            .reshape([b, kvh, rep, s, total]);
        let scores = match &inputs.gamma {
            // [b, 1, 1, total] -> [b, 1, 1, 1, total]
            Some(g) => scores + g.clone().unsqueeze_dim::<5>(1).expand([b, kvh, rep, s, total]),
            None => scores,
        };
        // [b, 1, s, total] -> [b, 1, 1, s, total]
        let mask = match &inputs.full_mask {
            Some(m) if m.dims() == [b, kvh, rep, s, total] => m.clone(),
            _ => inputs.mask.clone().unsqueeze_dim::<5>(1).expand([b, kvh, rep, s, total]),
        };
        let attn = softmax(scores.mask_fill(mask, MASKED), 4).reshape([b, kvh, rep * s, total]);
        let out = attn.matmul(v).reshape([b, h, s, hd]).swap_dims(1, 2).reshape([b, s, h * hd]);
        lora::apply(&self.o_proj, &self.o_lora, out)
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    /// LoRA adapters ([`crate::lora`]).
    pub gate_lora: Option<Lora<B>>,
    pub up_lora: Option<Lora<B>>,
    pub down_lora: Option<Lora<B>>,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let g = lora::apply(&self.gate_proj, &self.gate_lora, x.clone());
        let u = lora::apply(&self.up_proj, &self.up_lora, x);
        lora::apply(&self.down_proj, &self.down_lora, silu(g) * u)
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> DecoderLayer<B> {
    fn forward(&self, x: Tensor<B, 3>, inputs: &AttnInputs<B>, cache: &mut LayerCache<B>) -> Tensor<B, 3> {
        let h = x.clone() + self.self_attn.forward(self.input_layernorm.forward(x), inputs, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// HF `LlamaModel`.
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
}

/// HF `LlamaForCausalLM`; `lm_head` is `None` when tied to `model.embed_tokens`.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    pub model: LlamaModel<B>,
    pub lm_head: Option<Linear<B>>,
}

/// One layer's keys and values after RoPE, [batch, kv_heads, seq, head_dim].
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    pub kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: Backend> LayerCache<B> {
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (k, v) = match self.kv.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
        };
        self.kv = Some((k.clone(), v.clone()));
        (k, v)
    }
}

/// Per-layer KV cache, owned by the caller and passed to [`Llama::forward_embeds`].
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<LayerCache<B>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| LayerCache { kv: None }).collect() }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Teacher-forcing log-probabilities: `log_softmax(logits)[.., targets]`.
///
/// `logits`: `[b, s, vocab]`, `targets`: `[b, s]` (ids < vocab; the caller aligns them, i.e.
/// `targets[:, i]` is the token predicted by `logits[:, i]`). Returns `[b, s]`. Stable
/// (max-shifted log-sum-exp) and differentiable w.r.t. `logits`.
pub fn token_logprobs<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [b, s, _] = logits.dims();
    log_softmax(logits, 2).gather(2, targets.reshape([b, s, 1])).reshape([b, s])
}

/// `x[r, idx[r, i], :]`: `[b, s, h]` gathered at `[b, n]` row-wise indices -> `[b, n, h]`.
pub fn gather_positions<B: Backend>(x: Tensor<B, 3>, idx: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let [b, _, h] = x.dims();
    let n = idx.dims()[1];
    x.gather(1, idx.reshape([b, n, 1]).expand([b, n, h]))
}

/// Checkpoint tensors that `LlamaForCausalLM` state dicts may carry but that are buffers, not
/// weights (RoPE tables are recomputed).
fn is_rotary_buffer(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

impl<B: Backend> Llama<B> {
    /// Load HF `LlamaForCausalLM` safetensors (one file, or a folder with a sharded
    /// `model.safetensors.index.json` or a single `model.safetensors`) through
    /// [`crate::weights`]: `remap` renames the checkpoint's prefixes to ours (e.g. LLaVA's
    /// layout); `*rotary_emb.inv_freq` buffers are dropped; with tied embeddings an
    /// `lm_head.weight` in the file is dropped too (transformers re-ties it to
    /// `embed_tokens`). Every other missing, unexpected or mis-shaped tensor fails the load,
    /// all listed by name. Parameters are f32.
    pub fn load(
        cfg: &LlamaConfig,
        path: impl AsRef<Path>,
        remap: &Remap,
        device: &B::Device,
    ) -> Result<Llama<B>, LlamaError> {
        let path = path.as_ref();
        cfg.validate(&path.display().to_string())?;
        let mut ck = weights::Checkpoint::open(path)?.remapped(remap);
        ck.tensors.retain(|n, _| !(is_rotary_buffer(n) || (cfg.tie_word_embeddings && n == "lm_head.weight")));
        Ok(weights::apply_checkpoint(cfg.init(device), &ck, DType::F32, false)?)
    }

    pub fn num_layers(&self) -> usize {
        self.model.layers.len()
    }

    pub fn vocab_size(&self) -> usize {
        self.model.embed_tokens.weight.dims()[0]
    }

    pub fn hidden_size(&self) -> usize {
        self.model.embed_tokens.weight.dims()[1]
    }

    pub fn device(&self) -> B::Device {
        self.model.embed_tokens.weight.device()
    }

    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.num_layers())
    }

    /// transformers' `resize_token_embeddings` for a larger vocabulary (as PixelLM does after
    /// adding its `<seg>` / codebook / image tokens to a pretrained LLM's tokenizer): rows
    /// `vocab_size()..vocab` of `embed_tokens`, and of an untied `lm_head`, are the mean of the
    /// existing rows (transformers draws them around that mean; the mean alone keeps it
    /// deterministic). Existing rows are unchanged; `vocab` below the current size is an error.
    pub fn grow_vocab(mut self, vocab: usize) -> Result<Self, LlamaError> {
        let old = self.vocab_size();
        if vocab < old {
            return input_err(format!("grow_vocab: {vocab} < the current vocabulary {old}"));
        }
        if vocab == old {
            return Ok(self);
        }
        let extra = vocab - old;
        let w = self.model.embed_tokens.weight.val();
        let mean = w.clone().mean_dim(0); // [1, h]
        let h = w.dims()[1];
        let grown = Tensor::cat(vec![w, mean.expand([extra, h])], 0);
        self.model.embed_tokens.weight = Param::from_tensor(grown);
        if let Some(head) = self.lm_head.as_mut() {
            let w = head.weight.val(); // [h, vocab]
            let mean = w.clone().mean_dim(1); // [h, 1]
            let grown = Tensor::cat(vec![w, mean.expand([h, extra])], 1);
            head.weight = Param::from_tensor(grown);
            if let Some(b) = head.bias.as_mut() {
                let v = b.val();
                let m = v.clone().mean().reshape([1]);
                *b = Param::from_tensor(Tensor::cat(vec![v, m.expand([extra])], 0));
            }
        }
        Ok(self)
    }

    /// Token embeddings `[b, s, hidden]` of ids `[b, s]`. Ids must be < vocab (burn does not
    /// bounds-check every backend); [`Llama::ids_tensor`] checks them.
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.model.embed_tokens.forward(ids)
    }

    /// `[rows, len]` id tensor of equal-length rows, every id checked against the vocabulary.
    pub fn ids_tensor(&self, rows: &[Vec<u32>]) -> Result<Tensor<B, 2, Int>, LlamaError> {
        let len = rows.first().map_or(0, Vec::len);
        if rows.is_empty() || len == 0 {
            return input_err("empty id batch");
        }
        if let Some(r) = rows.iter().position(|r| r.len() != len) {
            return input_err(format!("id row {r} has length {}, row 0 has {len}", rows[r].len()));
        }
        self.check_ids(rows)?;
        let data: Vec<i64> = rows.iter().flatten().map(|&t| t as i64).collect();
        Ok(Tensor::from_data(TensorData::new(data, [rows.len(), len]), &self.device()))
    }

    fn check_ids(&self, rows: &[Vec<u32>]) -> Result<(), LlamaError> {
        let vocab = self.vocab_size();
        for (r, row) in rows.iter().enumerate() {
            if let Some(&t) = row.iter().find(|&&t| t as usize >= vocab) {
                return input_err(format!("row {r}: token id {t} >= vocab size {vocab}"));
            }
        }
        Ok(())
    }

    /// Logits `[b, s, vocab]` of final-normed hidden states `[b, s, hidden]` (lm_head, or the
    /// embedding matrix when tied).
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                // One [b * s, h] x [h, vocab] product: expanding the (vocabulary-sized)
                // weight over the batch would copy it once per row.
                let w = self.model.embed_tokens.weight.val(); // [vocab, hidden]
                let [b, s, h] = hidden.dims();
                let v = w.dims()[0];
                hidden.reshape([b * s, h]).matmul(w.transpose()).reshape([b, s, v])
            }
        }
    }

    /// Token-level forward: `tokens` [batch, seq] continuing the positions already in `cache`
    /// (empty for a prefill). Returns logits [batch, seq, vocab] and appends this step's K/V.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Result<Tensor<B, 3>, LlamaError> {
        self.forward_with(tokens, &AttnExtras::default(), cache)
    }

    /// [`Llama::forward`] with [`AttnExtras`].
    pub fn forward_with(
        &self,
        tokens: Tensor<B, 2, Int>,
        extras: &AttnExtras<B>,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>, LlamaError> {
        let hidden = self.forward_embeds(self.embed(tokens), extras, cache)?;
        Ok(self.logits(hidden))
    }

    /// Embedding-level forward: `embeds` `[b, s, hidden]` continuing `cache`. Returns the
    /// final-normed last hidden state `[b, s, hidden]` (HF `last_hidden_state` =
    /// `hidden_states[-1]`) and appends this call's K/V to `cache`. Errors (cache untouched) on
    /// a cache of another layer count or batch, or extras of the wrong shape.
    pub fn forward_embeds(
        &self,
        embeds: Tensor<B, 3>,
        extras: &AttnExtras<B>,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>, LlamaError> {
        Ok(self.run(embeds, extras, cache, false)?.0)
    }

    /// [`Llama::forward_embeds`] returning every hidden state like HF `output_hidden_states`:
    /// `num_layers + 1` tensors `[b, s, hidden]`: the input embeddings, the outputs of layers
    /// `0..L-1` (un-normed), and last the final-normed output of layer `L-1`.
    pub fn forward_embeds_all(
        &self,
        embeds: Tensor<B, 3>,
        extras: &AttnExtras<B>,
        cache: &mut KvCache<B>,
    ) -> Result<Vec<Tensor<B, 3>>, LlamaError> {
        let (last, mut all) = self.run(embeds, extras, cache, true)?;
        all.push(last);
        Ok(all)
    }

    /// Shared forward; with `collect` also returns the embeddings and each layer's output but
    /// the last (whose normed form is the first return value).
    fn run(
        &self,
        embeds: Tensor<B, 3>,
        extras: &AttnExtras<B>,
        cache: &mut KvCache<B>,
        collect: bool,
    ) -> Result<(Tensor<B, 3>, Vec<Tensor<B, 3>>), LlamaError> {
        let inputs = self.attn_inputs(&embeds, extras, cache)?;
        let mut x = embeds;
        let mut all = Vec::new();
        for (layer, c) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            if collect {
                all.push(x.clone());
            }
            x = layer.forward(x, &inputs, c);
        }
        Ok((self.model.norm.forward(x), all))
    }

    /// Validate inputs against the model and the cache, and build the per-forward attention
    /// inputs (RoPE tables, key mask, gamma) shared by all layers.
    fn attn_inputs(
        &self,
        embeds: &Tensor<B, 3>,
        extras: &AttnExtras<B>,
        cache: &KvCache<B>,
    ) -> Result<AttnInputs<B>, LlamaError> {
        let [b, s, h] = embeds.dims();
        if h != self.hidden_size() {
            return input_err(format!("embeddings have width {h}, the model's hidden size is {}", self.hidden_size()));
        }
        if b == 0 || s == 0 {
            return input_err(format!("empty input [{b}, {s}, {h}]"));
        }
        if cache.layers.len() != self.num_layers() {
            return input_err(format!(
                "KvCache has {} layers, the model has {}",
                cache.layers.len(),
                self.num_layers()
            ));
        }
        let past = cache.len();
        for (i, (l, layer)) in cache.layers.iter().zip(&self.model.layers).enumerate() {
            let a = &layer.self_attn;
            let want = [b, a.num_kv_heads, past, a.head_dim];
            if let Some((k, v)) = &l.kv {
                if k.dims() != want || v.dims() != want {
                    return input_err(format!(
                        "KvCache layer {i} holds k {:?} / v {:?}, expected {want:?} \
                         (batch {b}, {past} cached positions)",
                        k.dims(),
                        v.dims()
                    ));
                }
            } else if past != 0 {
                return input_err(format!("KvCache layer {i} is empty, layer 0 holds {past}"));
            }
        }
        let total = past + s;
        let device = embeds.device();
        let shape_err = |name: &str, got: Vec<usize>, want: [usize; 2]| {
            input_err(format!("AttnExtras.{name} has shape {got:?}, expected {want:?}"))
        };

        let positions = match &extras.positions {
            Some(p) if p.dims() != [b, s] => return shape_err("positions", p.dims().to_vec(), [b, s]),
            Some(p) => p.clone(),
            None => Tensor::<B, 1, Int>::arange(past as i64..total as i64, &device).reshape([1, s]).expand([b, s]),
        };
        let (head_dim, theta, scaling) = self.model.layers.first().map_or((2, 10000.0, None), |l| {
            (l.self_attn.head_dim, l.self_attn.rope_theta, l.self_attn.rope_scaling.as_ref())
        });
        let heads = self.model.layers.first().map(|l| (l.self_attn.num_kv_heads, l.self_attn.num_heads));
        let (cos, sin) = rope_tables(positions, head_dim, theta, scaling);

        // Causal: query i (absolute cache index past + i) sees keys 0..=past + i.
        let causal: Vec<bool> = (0..s).flat_map(|i| (0..total).map(move |j| j > past + i)).collect();
        let mut mask = Tensor::<B, 2, Bool>::from_data(TensorData::new(causal, [s, total]), &device)
            .reshape([1, 1, s, total])
            .expand([b, 1, s, total]);
        if let Some(keep) = &extras.key_keep {
            if keep.dims() != [b, total] {
                return shape_err("key_keep", keep.dims().to_vec(), [b, total]);
            }
            let pad = keep.clone().bool_not().reshape([b, 1, 1, total]).expand([b, 1, s, total]);
            mask = mask.bool_or(pad);
        }
        let gamma = match &extras.gamma {
            Some(g) if g.dims() != [b, total] => return shape_err("gamma", g.dims().to_vec(), [b, total]),
            Some(g) => Some(g.clone().reshape([b, 1, 1, total])),
            None => None,
        };
        // Bounded (16 Mi elements): at real scale the repeated mask would cost more memory than
        // the copy it saves, and GPU kernels read the broadcast view directly.
        let full_mask = heads
            .filter(|&(_, h)| b * h * s * total <= materialize_max())
            .map(|(kvh, h)| mask.clone().unsqueeze_dim::<5>(1).repeat_dim(1, kvh).repeat_dim(2, h / kvh.max(1)));
        let rope_full = heads.filter(|&(_, h)| b * h * s * head_dim <= materialize_max()).map(|(kvh, h)| {
            // [b, 1, s, hd] -> [b, s, 1, hd] (a size-1 axis moves: no copy) -> repeated.
            let per = |t: &Tensor<B, 4>, n: usize| t.clone().swap_dims(1, 2).repeat_dim(2, n);
            [per(&cos, h), per(&sin, h), per(&cos, kvh), per(&sin, kvh)]
        });
        Ok(AttnInputs { cos, sin, mask, gamma, full_mask, rope_full })
    }

    /// Teacher-forced per-token log-probabilities with gradients: row `r` is
    /// `prompt_ids[r] ++ response_ids[r]`, right-padded into one batch (padding keys masked);
    /// entry `[r, i]` is `log p(response_r[i] | prompt_r, response_r[..i])`. Returns the
    /// log-probs `[b, max_resp_len]` (0 where masked) and the mask `[b, max_resp_len]` (true =
    /// a real response token). Logits are computed only at the scored positions. Errors on
    /// empty prompts, ids outside the vocabulary, or when every response is empty.
    pub fn score_tensor(
        &self,
        prompt_ids: &[Vec<u32>],
        response_ids: &[Vec<u32>],
    ) -> Result<(Tensor<B, 2>, Tensor<B, 2, Bool>), LlamaError> {
        let b = prompt_ids.len();
        if b == 0 || response_ids.len() != b {
            return input_err(format!(
                "score: {b} prompts and {} responses (need the same, at least one)",
                response_ids.len()
            ));
        }
        if let Some(r) = prompt_ids.iter().position(Vec::is_empty) {
            return input_err(format!("score: prompt {r} is empty (nothing predicts its first response token)"));
        }
        self.check_ids(prompt_ids)?;
        self.check_ids(response_ids)?;
        let rmax = response_ids.iter().map(Vec::len).max().unwrap_or(0);
        if rmax == 0 {
            return input_err("score: every response is empty");
        }
        let len = (0..b).map(|r| prompt_ids[r].len() + response_ids[r].len()).max().unwrap_or(0);
        let (mut ids, mut keep) = (Vec::with_capacity(b * len), Vec::with_capacity(b * len));
        let (mut idx, mut tgt, mut m) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..b {
            let (p, q) = (&prompt_ids[r], &response_ids[r]);
            let n = p.len() + q.len();
            ids.extend(p.iter().chain(q).map(|&t| t as i64));
            ids.extend(std::iter::repeat_n(0i64, len - n));
            keep.extend((0..len).map(|j| j < n));
            for i in 0..rmax {
                let real = i < q.len();
                idx.push(if real { (p.len() + i - 1) as i64 } else { 0 });
                tgt.push(if real { q[i] as i64 } else { 0 });
                m.push(real);
            }
        }
        let device = self.device();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, len]), &device);
        let keep = Tensor::<B, 2, Bool>::from_data(TensorData::new(keep, [b, len]), &device);
        let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(idx, [b, rmax]), &device);
        let tgt = Tensor::<B, 2, Int>::from_data(TensorData::new(tgt, [b, rmax]), &device);
        let mask = Tensor::<B, 2, Bool>::from_data(TensorData::new(m, [b, rmax]), &device);
        let extras = AttnExtras { key_keep: Some(keep), ..Default::default() };
        let hidden = self.forward_embeds(self.embed(ids), &extras, &mut self.new_cache())?;
        let logits = self.logits(gather_positions(hidden, idx));
        let lp = token_logprobs(logits, tgt).mask_fill(mask.clone().bool_not(), 0.0);
        Ok((lp, mask))
    }

    /// [`Llama::score_tensor`] as plain numbers: one `Vec` per row, of that row's response
    /// length (empty responses give empty rows).
    pub fn score(&self, prompt_ids: &[Vec<u32>], response_ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, LlamaError> {
        if !prompt_ids.is_empty() && response_ids.len() == prompt_ids.len() && response_ids.iter().all(Vec::is_empty) {
            self.check_ids(prompt_ids)?;
            return Ok(vec![Vec::new(); prompt_ids.len()]);
        }
        let (lp, _) = self.score_tensor(prompt_ids, response_ids)?;
        let rmax = lp.dims()[1];
        let v = lp
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| LlamaError::Input(format!("score: reading log-probs: {e:?}")))?;
        Ok(response_ids.iter().enumerate().map(|(r, q)| v[r * rmax..r * rmax + q.len()].to_vec()).collect())
    }

    /// Greedy decoding of one prompt: up to `max_new` new tokens, stopping after emitting any
    /// id in `stop` (which is included, unlike [`crate::sampling::Generation::ids`]). Returns
    /// the new ids only. Runs [`crate::sampling::generate`] at temperature 0.
    pub fn greedy(&self, prompt_ids: &[u32], max_new: usize, stop: &[u32]) -> Result<Vec<u32>, LlamaError> {
        if prompt_ids.is_empty() || max_new == 0 {
            return Ok(Vec::new());
        }
        let ids = self.ids_tensor(&[prompt_ids.to_vec()])?;
        let keep = Tensor::<B, 2, Bool>::from_data(
            TensorData::new(vec![true; prompt_ids.len()], [1, prompt_ids.len()]),
            &self.device(),
        );
        let cfg = SamplingConfig { max_new_tokens: max_new, temperature: 0.0, ..Default::default() };
        let g = generate(self, self.embed(ids), keep, None, &cfg, stop)?
            .pop()
            .ok_or_else(|| LlamaError::Input("generate returned no row".into()))?;
        let mut out = g.ids;
        out.extend(g.stop_id);
        Ok(out)
    }
}

/// `[rows, cols]` row-major -> `[cols, rows]` row-major (blocked, for cache locality).
pub fn transpose_host(d: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(d.len(), rows * cols, "transpose_host: {} values for {rows}x{cols}", d.len());
    let mut t = vec![0f32; d.len()];
    const BLK: usize = 32;
    for r0 in (0..rows).step_by(BLK) {
        for c0 in (0..cols).step_by(BLK) {
            for r in r0..(r0 + BLK).min(rows) {
                for c in c0..(c0 + BLK).min(cols) {
                    t[c * rows + r] = d[r * cols + c];
                }
            }
        }
    }
    t
}

/// Load a LLaMA from a llama.cpp GGUF. Every tensor `cfg` implies must be present with its
/// HF shape; all problems are collected and reported together by HF name.
pub fn load_gguf<B: Backend>(cfg: &LlamaConfig, g: &GgufFile, device: &B::Device) -> Result<Llama<B>, LlamaError> {
    let path = g.path().display().to_string();
    cfg.validate(&path)?;
    let hd = cfg.head_dim();
    let (hs, is) = (cfg.hidden_size, cfg.intermediate_size);

    // HF name -> GGUF name, for every tensor in the file that has an HF counterpart.
    let by_hf: std::collections::HashMap<String, String> =
        g.tensors().iter().filter_map(|t| crate::gguf::llama_hf_name(&t.name).map(|hf| (hf, t.name.clone()))).collect();

    let mut problems = Vec::new();
    // Reads an HF tensor of the expected row-major shape, or records why not.
    let mut read = |hf: String, want: Vec<usize>| -> Option<Vec<f32>> {
        let Some(gname) = by_hf.get(&hf) else {
            problems.push(format!("missing {hf} (expected shape {want:?})"));
            return None;
        };
        match g.llama_tensor_hf(gname) {
            Ok((_, shape, data)) if shape == want => Some(data),
            Ok((_, shape, _)) => {
                problems.push(format!("{hf}: shape {shape:?}, expected {want:?}"));
                None
            }
            Err(e) => {
                problems.push(format!("{hf}: {e}"));
                None
            }
        }
    };

    let vec1 = |d: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(d.clone(), [d.len()]), device);
    let norm = |d: Option<Vec<f32>>| d.map(|d| RmsNorm { weight: Param::from_tensor(vec1(d)), eps: cfg.rms_norm_eps });
    // HF Linear weight is [out, in]; burn's is [in, out]. Transposed on the host: a
    // transposed view would be copied to a contiguous matrix by every matmul (Flex), which
    // cost half of each decoding step.
    let linear = |d: Option<Vec<f32>>, out: usize, inp: usize| {
        d.map(|d| Linear {
            weight: Param::from_tensor(Tensor::<B, 2>::from_data(
                TensorData::new(transpose_host(&d, out, inp), [inp, out]),
                device,
            )),
            bias: None,
        })
    };

    let embed = read("model.embed_tokens.weight".into(), vec![cfg.vocab_size, hs]);
    let mut layers = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let q = read(format!("{p}.self_attn.q_proj.weight"), vec![cfg.num_attention_heads * hd, hs]);
        let k = read(format!("{p}.self_attn.k_proj.weight"), vec![cfg.num_key_value_heads * hd, hs]);
        let v = read(format!("{p}.self_attn.v_proj.weight"), vec![cfg.num_key_value_heads * hd, hs]);
        let o = read(format!("{p}.self_attn.o_proj.weight"), vec![hs, cfg.num_attention_heads * hd]);
        let gate = read(format!("{p}.mlp.gate_proj.weight"), vec![is, hs]);
        let up = read(format!("{p}.mlp.up_proj.weight"), vec![is, hs]);
        let down = read(format!("{p}.mlp.down_proj.weight"), vec![hs, is]);
        let n1 = read(format!("{p}.input_layernorm.weight"), vec![hs]);
        let n2 = read(format!("{p}.post_attention_layernorm.weight"), vec![hs]);
        let parts = (
            linear(q, cfg.num_attention_heads * hd, hs),
            linear(k, cfg.num_key_value_heads * hd, hs),
            linear(v, cfg.num_key_value_heads * hd, hs),
            linear(o, hs, cfg.num_attention_heads * hd),
            linear(gate, is, hs),
            linear(up, is, hs),
            linear(down, hs, is),
            norm(n1),
            norm(n2),
        );
        if let (Some(q), Some(k), Some(v), Some(o), Some(g), Some(u), Some(d), Some(n1), Some(n2)) = parts {
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj: q,
                    k_proj: k,
                    v_proj: v,
                    o_proj: o,
                    q_lora: None,
                    k_lora: None,
                    v_lora: None,
                    o_lora: None,
                    num_heads: cfg.num_attention_heads,
                    num_kv_heads: cfg.num_key_value_heads,
                    head_dim: hd,
                    rope_theta: cfg.rope_theta,
                    rope_scaling: cfg.rope_scaling.clone(),
                },
                mlp: Mlp { gate_proj: g, up_proj: u, down_proj: d, gate_lora: None, up_lora: None, down_lora: None },
                input_layernorm: n1,
                post_attention_layernorm: n2,
            });
        }
    }
    let final_norm = read("model.norm.weight".into(), vec![hs]);
    let lm_head =
        if cfg.tie_word_embeddings { None } else { Some(read("lm_head.weight".into(), vec![cfg.vocab_size, hs])) };

    if !problems.is_empty() {
        return Err(LlamaError::Tensors { path, problems });
    }
    let embed = embed.expect("checked");
    Ok(Llama {
        model: LlamaModel {
            embed_tokens: Embedding {
                weight: Param::from_tensor(Tensor::from_data(TensorData::new(embed, [cfg.vocab_size, hs]), device)),
            },
            layers,
            norm: norm(final_norm).expect("checked"),
        },
        lm_head: lm_head.map(|d| linear(d, cfg.vocab_size, hs).expect("checked")),
    })
}

#[cfg(test)]
mod fast_path_tests {
    //! The materialized attention inputs (repeated key mask and RoPE tables, issue 21) against
    //! the broadcast path they replace: same hidden states and same gradients.

    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::Distribution;

    type Ad = Autodiff<NdArray>;

    fn run(
        model: &Llama<Ad>,
        embeds: &Tensor<Ad, 3>,
        keep: &Tensor<Ad, 2, Bool>,
        probe: &Tensor<Ad, 3>,
        fast: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        MATERIALIZE_MAX_TEST.with(|c| c.set(if fast { MATERIALIZE_MAX } else { 0 }));
        let x = embeds.clone().require_grad();
        let extras = AttnExtras { key_keep: Some(keep.clone()), ..AttnExtras::default() };
        let out = model.forward_embeds(x.clone(), &extras, &mut KvCache::new(2)).expect("forward");
        let grads = (out.clone() * probe.clone()).sum().backward();
        let g = x.grad(&grads).expect("grad").into_data().to_vec::<f32>().unwrap();
        MATERIALIZE_MAX_TEST.with(|c| c.set(MATERIALIZE_MAX));
        (out.inner().into_data().to_vec::<f32>().unwrap(), g)
    }

    #[test]
    fn materialized_mask_and_rope_equal_the_broadcast_path() {
        let dev = Default::default();
        <Ad as Backend>::seed(&dev, 7);
        // GQA (4 query heads on 2 KV heads), two layers, a padded key in the second row.
        let cfg = LlamaConfig {
            vocab_size: 16,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            rope_scaling: None,
        };
        let model = cfg.init::<Ad>(&dev);
        let embeds = Tensor::<Ad, 3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &dev);
        let probe = Tensor::<Ad, 3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &dev);
        let keep = Tensor::<Ad, 2, Bool>::from_data(
            TensorData::new(vec![true, true, true, true, true, false, true, true, true, true], [2, 5]),
            &dev,
        );
        let (a, ga) = run(&model, &embeds, &keep, &probe, true);
        let (b, gb) = run(&model, &embeds, &keep, &probe, false);
        for (what, x, y) in [("hidden", &a, &b), ("d/dembeds", &ga, &gb)] {
            assert_eq!(x.len(), y.len());
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                assert!((p - q).abs() <= 1e-5 * q.abs().max(1.0), "{what}[{i}]: {p} vs {q}");
            }
        }
    }
}

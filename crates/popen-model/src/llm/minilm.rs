//! The sentence encoder `h = BERT(y)` of POPEN's ensemble loss `L_ti`: a BERT encoder
//! (Hugging Face `BertModel`, no pooler) in burn plus sentence-transformers' mean pooling and
//! L2 normalisation, as `sentence-transformers/all-MiniLM-L6-v2` computes its embeddings.
//!
//! - [`BertConfig`]: HF's `BertConfig` fields; read from a `config.json`
//!   ([`BertConfig::from_json_file`]) or inferred from a checkpoint's tensor shapes
//!   ([`BertConfig::from_checkpoint`]; the head count is not in any shape and is given).
//! - [`BertModel`]: embeddings (word + absolute position + token type, LayerNorm) and
//!   post-norm encoder layers with exact (erf) GELU. [`BertModel::forward`] takes an attention
//!   mask over keys (false = padding), as HF's `attention_mask`.
//! - [`load_bert`]: strict loading of HF BERT safetensors (names `embeddings.*`,
//!   `encoder.layer.N.*`, optionally under `bert.`; `pooler.*`, MLM/NSP heads `cls.*` and the
//!   `position_ids`/`token_type_ids` buffers are skipped). Every missing, unexpected or
//!   mis-shaped tensor is reported with the checkpoint's own names and the file.
//! - [`SentenceEncoder`]: tokenizes with the `tokenizers` crate from `tokenizer.json` (its
//!   stored padding is turned off; truncation to `max_seq_length` word pieces including
//!   `[CLS]`/`[SEP]`, 256 for all-MiniLM-L6-v2 as in its `sentence_bert_config.json`; the
//!   stored 128 of its tokenizer.json is NOT what sentence-transformers uses), batches
//!   sentences sorted by length, mean-pools the last hidden state over real tokens
//!   (`sum(h * mask) / max(sum(mask), 1e-9)`) and L2-normalises (`x / max(|x|, 1e-12)`,
//!   `F.normalize`). [`SentenceEncoder::encode`] returns `[n, hidden]`.
//!
//! Checked against sentence-transformers 5.1.2 / transformers 4.57.1 on the real
//! all-MiniLM-L6-v2 weights (`make assets`, data/assets/minilm) by
//! `tools/reference/minilm_fixture.py` -> `tests/fixtures/minilm/minilm_ref.json`
//! (tests/model/minilm.rs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Bool, DType, TensorData};
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot};
use serde::{Deserialize, Serialize};

use crate::weights::{self, Checkpoint, Remap, WeightsError};

/// all-MiniLM-L6-v2's `max_seq_length` (its `sentence_bert_config.json`): the encoder sees at
/// most this many word pieces, `[CLS]` and `[SEP]` included.
pub const MINILM_MAX_SEQ_LENGTH: usize = 256;

/// sentence-transformers' default `encode` batch size.
pub const DEFAULT_BATCH_SIZE: usize = 32;

/// Hugging Face `BertConfig`'s default head count, used when a checkpoint comes without a
/// `config.json` (all-MiniLM-L6-v2 and BERT-base have 12 heads).
pub const DEFAULT_NUM_HEADS: usize = 12;

/// Errors of configuring, loading or running the BERT encoder. File paths and tensor names
/// are part of every message.
#[derive(Debug, thiserror::Error)]
pub enum BertError {
    #[error("bad BERT config: {0}")]
    Config(String),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// A tokenizer that does not fit the model (no file at hand; [`SentenceEncoder::load`]
    /// turns it into [`BertError::Tokenizer`] with the path).
    #[error("tokenizer: {0}")]
    TokenizerSetup(String),
    #[error("input: {0}")]
    Input(String),
}

type Result<T> = std::result::Result<T, BertError>;

/// Activation of the feed-forward block (`hidden_act`). BERT checkpoints use exact GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BertActivation {
    /// Exact (erf) GELU, HF's `"gelu"`.
    #[default]
    Gelu,
    Relu,
}

/// Mirrors Hugging Face `BertConfig` (field names and defaults of transformers 4.57); other
/// fields of a `config.json` (dropouts, `initializer_range`, ...) do not change the forward
/// pass and are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: BertActivation,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: usize,
    /// Only `"absolute"` (learned positions) is implemented.
    pub position_embedding_type: String,
}

impl Default for BertConfig {
    /// HF's defaults (BERT-base).
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: BertActivation::Gelu,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            position_embedding_type: "absolute".into(),
        }
    }
}

impl BertConfig {
    /// `sentence-transformers/all-MiniLM-L6-v2` (its `config.json`).
    pub fn all_minilm_l6_v2() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            ..Self::default()
        }
    }

    /// A small random-weight model for tests.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 64,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            max_position_embeddings: 24,
            ..Self::default()
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Read a Hugging Face `config.json` of a BERT model.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let err = |msg: String| BertError::File { path: path.to_path_buf(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| err(format!("not a BERT config: {e}")))?;
        cfg.validate().map_err(|e| err(e.to_string()))?;
        Ok(cfg)
    }

    /// Infer the sizes from a checkpoint's tensor shapes (names as in HF's `BertModel`, with
    /// or without `bert.`); the head count is not visible in any shape and is given.
    pub fn from_checkpoint(ck: &Checkpoint, num_attention_heads: usize) -> Result<Self> {
        let ck = bert_checkpoint(ck.clone());
        let shape = |name: &str| -> Result<&[usize]> {
            ck.tensors.get(name).map(|t| t.shape.as_slice()).ok_or_else(|| {
                BertError::Config(format!(
                    "{}: no tensor {} (not a BERT checkpoint?)",
                    ck.source,
                    checkpoint_name(name)
                ))
            })
        };
        let dims2 = |name: &str| -> Result<[usize; 2]> {
            match shape(name)? {
                [a, b] => Ok([*a, *b]),
                s => Err(BertError::Config(format!(
                    "{}: {} has shape {s:?}, expected 2 dimensions",
                    ck.source,
                    checkpoint_name(name)
                ))),
            }
        };
        let [vocab_size, hidden_size] = dims2("embeddings.word_embeddings.weight")?;
        let [max_position_embeddings, _] = dims2("embeddings.position_embeddings.weight")?;
        let [type_vocab_size, _] = dims2("embeddings.token_type_embeddings.weight")?;
        let [intermediate_size, _] = dims2("encoder.layer.0.intermediate.dense.weight")?;
        let num_hidden_layers = (0..)
            .take_while(|i| ck.tensors.contains_key(&format!("encoder.layer.{i}.intermediate.dense.weight")))
            .count();
        let cfg = Self {
            vocab_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            intermediate_size,
            max_position_embeddings,
            type_vocab_size,
            ..Self::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reject configs no checkpoint can have.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(BertError::Config(m));
        if self.hidden_size == 0 || self.intermediate_size == 0 || self.vocab_size == 0 {
            return bad(format!(
                "hidden_size {}, intermediate_size {} and vocab_size {} must be positive",
                self.hidden_size, self.intermediate_size, self.vocab_size
            ));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.max_position_embeddings == 0 || self.type_vocab_size == 0 {
            return bad(format!(
                "max_position_embeddings {} and type_vocab_size {} must be positive",
                self.max_position_embeddings, self.type_vocab_size
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return bad(format!("layer_norm_eps {} must be positive and finite", self.layer_norm_eps));
        }
        if self.position_embedding_type != "absolute" {
            return bad(format!(
                "position_embedding_type {:?} is not implemented (only \"absolute\")",
                self.position_embedding_type
            ));
        }
        Ok(())
    }

    /// Random weights (burn's default initialisers; norms start at 1/0). Call
    /// [`validate`](Self::validate) first: an invalid config panics in burn's constructors.
    pub fn init<B: Backend>(&self, device: &B::Device) -> BertModel<B> {
        let d = self.hidden_size;
        let norm = || LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device);
        let lin = |i: usize, o: usize| LinearConfig::new(i, o).init(device);
        let layer = (0..self.num_hidden_layers)
            .map(|_| BertLayer {
                attention: BertAttention {
                    self_attn: BertSelfAttention {
                        query: lin(d, d),
                        key: lin(d, d),
                        value: lin(d, d),
                        num_heads: self.num_attention_heads,
                        head_dim: self.head_dim(),
                    },
                    output: BertAddNorm { dense: lin(d, d), layer_norm: norm() },
                },
                intermediate: BertIntermediate { dense: lin(d, self.intermediate_size), act: self.hidden_act },
                output: BertAddNorm { dense: lin(self.intermediate_size, d), layer_norm: norm() },
            })
            .collect();
        BertModel {
            embeddings: BertEmbeddings {
                word_embeddings: EmbeddingConfig::new(self.vocab_size, d).init(device),
                position_embeddings: EmbeddingConfig::new(self.max_position_embeddings, d).init(device),
                token_type_embeddings: EmbeddingConfig::new(self.type_vocab_size, d).init(device),
                layer_norm: norm(),
            },
            encoder: BertEncoder { layer },
            config: self.clone(),
        }
    }
}

/// Hugging Face `BertModel` without its pooler. Field names are the checkpoint's, except
/// `attention.self` -> `attention.self_attn` and `LayerNorm` -> `layer_norm` (Rust names);
/// [`load_bert`] translates both ways.
#[derive(Module, Debug)]
pub struct BertModel<B: Backend> {
    pub embeddings: BertEmbeddings<B>,
    pub encoder: BertEncoder<B>,
    #[module(skip)]
    pub config: BertConfig,
}

#[derive(Module, Debug)]
pub struct BertEmbeddings<B: Backend> {
    pub word_embeddings: Embedding<B>,
    pub position_embeddings: Embedding<B>,
    pub token_type_embeddings: Embedding<B>,
    pub layer_norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct BertEncoder<B: Backend> {
    pub layer: Vec<BertLayer<B>>,
}

#[derive(Module, Debug)]
pub struct BertLayer<B: Backend> {
    pub attention: BertAttention<B>,
    pub intermediate: BertIntermediate<B>,
    pub output: BertAddNorm<B>,
}

#[derive(Module, Debug)]
pub struct BertAttention<B: Backend> {
    pub self_attn: BertSelfAttention<B>,
    pub output: BertAddNorm<B>,
}

/// Multi-head self-attention with biases, scale `head_dim^-0.5`.
#[derive(Module, Debug)]
pub struct BertSelfAttention<B: Backend> {
    pub query: Linear<B>,
    pub key: Linear<B>,
    pub value: Linear<B>,
    pub num_heads: usize,
    pub head_dim: usize,
}

/// `dense`, then `LayerNorm(dense(x) + residual)`: HF's `BertSelfOutput` and `BertOutput`.
#[derive(Module, Debug)]
pub struct BertAddNorm<B: Backend> {
    pub dense: Linear<B>,
    pub layer_norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
pub struct BertIntermediate<B: Backend> {
    pub dense: Linear<B>,
    #[module(skip)]
    pub act: BertActivation,
}

impl<B: Backend> BertSelfAttention<B> {
    /// `key_bias`: `[batch, 1, 1, seq]`, 0 for real keys and `f32::MIN` for padding (HF adds
    /// its extended attention mask the same way).
    pub fn forward(&self, x: Tensor<B, 3>, key_bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let (h, hd) = (self.num_heads, self.head_dim);
        let split = |t: Tensor<B, 3>| t.reshape([b, n, h, hd]).swap_dims(1, 2);
        let q = split(self.query.forward(x.clone()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x));
        let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar((hd as f64).powf(-0.5));
        if let Some(bias) = key_bias {
            scores = scores + bias;
        }
        softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([b, n, d])
    }
}

impl<B: Backend> BertAddNorm<B> {
    pub fn forward(&self, x: Tensor<B, 3>, residual: Tensor<B, 3>) -> Tensor<B, 3> {
        self.layer_norm.forward(self.dense.forward(x) + residual)
    }
}

impl<B: Backend> BertIntermediate<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.dense.forward(x);
        match self.act {
            BertActivation::Gelu => gelu(x),
            BertActivation::Relu => burn::tensor::activation::relu(x),
        }
    }
}

impl<B: Backend> BertLayer<B> {
    pub fn forward(&self, x: Tensor<B, 3>, key_bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let a = self.attention.self_attn.forward(x.clone(), key_bias);
        let a = self.attention.output.forward(a, x);
        let i = self.intermediate.forward(a.clone());
        self.output.forward(i, a)
    }
}

impl<B: Backend> BertModel<B> {
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// HF's `last_hidden_state` `[batch, seq, hidden]`.
    ///
    /// `input_ids` `[batch, seq]` must be `< vocab_size` (not checked here: ids from
    /// [`SentenceEncoder`] are checked against the vocabulary at load), `token_type_ids`
    /// (default all 0) `< type_vocab_size`; `attention_mask` `[batch, seq]` is true for real
    /// tokens and false for padding (default: all real). Positions are `0..seq`.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        token_type_ids: Option<Tensor<B, 2, Int>>,
        attention_mask: Option<Tensor<B, 2, Bool>>,
    ) -> Result<Tensor<B, 3>> {
        let [b, n] = input_ids.dims();
        let max = self.config.max_position_embeddings;
        if b == 0 || n == 0 || n > max {
            return Err(BertError::Input(format!(
                "input_ids [{b}, {n}]: need batch >= 1 and 1 <= seq <= max_position_embeddings {max}"
            )));
        }
        let check = |what: &str, dims: [usize; 2]| {
            if dims == [b, n] {
                Ok(())
            } else {
                Err(BertError::Input(format!("{what} is {dims:?} but input_ids is [{b}, {n}]")))
            }
        };
        if let Some(t) = &token_type_ids {
            check("token_type_ids", t.dims())?;
        }
        if let Some(m) = &attention_mask {
            check("attention_mask", m.dims())?;
        }
        let device = input_ids.device();
        let e = &self.embeddings;
        let d = self.config.hidden_size;
        let token_type_ids = token_type_ids.unwrap_or_else(|| Tensor::<B, 2, Int>::zeros([b, n], &device));
        let pos = e.position_embeddings.weight.val().narrow(0, 0, n).reshape([1, n, d]);
        let x = e.word_embeddings.forward(input_ids) + e.token_type_embeddings.forward(token_type_ids) + pos;
        let mut h = e.layer_norm.forward(x);
        let bias = attention_mask
            .map(|m| Tensor::<B, 2>::zeros([b, n], &device).mask_fill(m.bool_not(), f32::MIN).reshape([b, 1, 1, n]));
        for layer in &self.encoder.layer {
            h = layer.forward(h, bias.clone());
        }
        Ok(h)
    }
}

/// Mean over real tokens (`sum(h * mask) / max(count, 1e-9)`, sentence-transformers'
/// `Pooling(mean)`): `[batch, seq, d]` -> `[batch, d]`.
pub fn mean_pool<B: Backend>(hidden: Tensor<B, 3>, mask: Tensor<B, 2, Bool>) -> Tensor<B, 2> {
    let [b, n, d] = hidden.dims();
    let m = mask.float().reshape([b, n, 1]);
    let sum = (hidden * m.clone()).sum_dim(1).reshape([b, d]);
    let count = m.sum_dim(1).reshape([b, 1]).clamp_min(1e-9);
    sum / count
}

/// Rows divided by their L2 norm, at least 1e-12 (`F.normalize(p=2, dim=1)`).
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// Cosine similarities of L2-normalised rows: `a @ b^T`, `[n, d] x [m, d]` -> `[n, m]`.
pub fn cosine_matrix<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    a.matmul(b.transpose())
}

/// Checkpoint name -> our module path: `bert.` stripped, `self` -> `self_attn`,
/// `LayerNorm` -> `layer_norm` (path segments).
fn module_name(name: &str) -> String {
    let name = name.strip_prefix("bert.").unwrap_or(name);
    name.split('.')
        .map(|s| match s {
            "self" => "self_attn",
            "LayerNorm" => "layer_norm",
            s => s,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Our module path -> the checkpoint's (HF) name.
fn checkpoint_name(path: &str) -> String {
    path.split('.')
        .map(|s| match s {
            "self_attn" => "self",
            "layer_norm" => "LayerNorm",
            s => s,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// What [`load_bert`] skips: the pooler, pre-training heads and buffers.
pub fn checkpoint_remap() -> Remap {
    Remap::none()
        .drop("pooler.*")
        .drop("bert.pooler.*")
        .drop("cls.*")
        .drop("embeddings.position_ids")
        .drop("bert.embeddings.position_ids")
        .drop("embeddings.token_type_ids")
        .drop("bert.embeddings.token_type_ids")
}

/// The checkpoint with skipped tensors dropped and names in our module's layout.
/// Names under `bert.` are reported without it, the source says `[bert.*]` (as
/// [`Checkpoint::sub`] does).
fn bert_checkpoint(ck: Checkpoint) -> Checkpoint {
    let mut ck = ck.remapped(&checkpoint_remap());
    if ck.tensors.keys().any(|n| n.starts_with("bert.")) {
        ck.source = format!("{} [bert.*]", ck.source);
    }
    let old = std::mem::take(&mut ck.tensors);
    for (name, mut t) in old {
        let new = module_name(&name);
        t.name = new.clone();
        ck.tensors.insert(new, t);
    }
    ck
}

/// Compare the model's tensors (PyTorch layout) with the checkpoint's by name and shape and
/// report every difference under the checkpoint's names, sorted (burn-store's own report
/// would name burn's paths, e.g. `layer_norm.gamma`).
fn check_names_and_shapes<B: Backend>(model: &BertModel<B>, ck: &Checkpoint) -> Result<()> {
    let want: BTreeMap<String, Vec<usize>> = model
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .map(|s| (s.full_path(), s.shape.to_vec()))
        .collect();
    let mut problems = Vec::new();
    for (name, shape) in &want {
        match ck.tensors.get(name) {
            None => problems.push(format!("missing {}", checkpoint_name(name))),
            Some(t) if &t.shape != shape => problems.push(format!(
                "{}: shape {:?} in the file, the model needs {shape:?}",
                checkpoint_name(name),
                t.shape
            )),
            Some(_) => {}
        }
    }
    for name in ck.tensors.keys().filter(|n| !want.contains_key(*n)) {
        problems.push(format!("unexpected {} (the model has no such tensor)", checkpoint_name(name)));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(BertError::Weights(WeightsError::Mismatch { source_desc: ck.source.clone(), problems }))
    }
}

/// Build a [`BertModel`] for `cfg` and load the checkpoint at `path` (safetensors file or
/// folder, see [`Checkpoint::open`]) strictly: every tensor of the model must be present with
/// its shape, and every checkpoint tensor but those [`checkpoint_remap`] skips must be used.
pub fn load_bert<B: Backend>(cfg: &BertConfig, path: impl AsRef<Path>, device: &B::Device) -> Result<BertModel<B>> {
    cfg.validate()?;
    let ck = bert_checkpoint(Checkpoint::open(path)?);
    load_bert_from(cfg, &ck, device)
}

fn load_bert_from<B: Backend>(cfg: &BertConfig, ck: &Checkpoint, device: &B::Device) -> Result<BertModel<B>> {
    let model = cfg.init::<B>(device);
    check_names_and_shapes(&model, ck)?;
    Ok(weights::apply_checkpoint(model, ck, DType::F32, false)?)
}

/// The weights file of a model folder: `model.safetensors` (or the path itself if a file).
fn weights_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("model.safetensors")
    } else {
        path.to_path_buf()
    }
}

/// sentence-transformers' `all-MiniLM-L6-v2`-style encoder: BERT + mean pooling + L2 norm.
pub struct SentenceEncoder<B: Backend> {
    pub model: BertModel<B>,
    tokenizer: tokenizers::Tokenizer,
    max_seq_length: usize,
    batch_size: usize,
    device: B::Device,
}

impl<B: Backend> SentenceEncoder<B> {
    /// Load a sentence-transformers model folder: `model.safetensors` and `tokenizer.json`
    /// (what `make assets` keeps in data/assets/minilm), plus, when present, `config.json`
    /// (else sizes from the tensor shapes and [`DEFAULT_NUM_HEADS`] heads) and
    /// `sentence_bert_config.json`'s `max_seq_length` (else [`MINILM_MAX_SEQ_LENGTH`]).
    pub fn load(dir: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        let dir = dir.as_ref();
        let missing = |p: &Path| BertError::File {
            path: p.to_path_buf(),
            msg: "missing (run `make assets`: it fetches all-MiniLM-L6-v2 into data/assets/minilm)".into(),
        };
        let wfile = weights_file(dir);
        if !wfile.is_file() {
            return Err(missing(&wfile));
        }
        let tok_file = dir.join("tokenizer.json");
        if !tok_file.is_file() {
            return Err(missing(&tok_file));
        }
        let ck = bert_checkpoint(Checkpoint::open(&wfile)?);
        let cfg_file = dir.join("config.json");
        let cfg = if cfg_file.is_file() {
            BertConfig::from_json_file(&cfg_file)?
        } else {
            BertConfig::from_checkpoint(&ck, DEFAULT_NUM_HEADS)?
        };
        let model = load_bert_from(&cfg, &ck, device)?;
        let st_file = dir.join("sentence_bert_config.json");
        let max_seq_length = if st_file.is_file() {
            let err = |msg: String| BertError::File { path: st_file.clone(), msg };
            let text = std::fs::read_to_string(&st_file).map_err(|e| err(e.to_string()))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(format!("not JSON: {e}")))?;
            v["max_seq_length"].as_u64().ok_or_else(|| err("no integer max_seq_length".into()))? as usize
        } else {
            MINILM_MAX_SEQ_LENGTH
        };
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_file)
            .map_err(|e| BertError::Tokenizer { path: tok_file.clone(), msg: e.to_string() })?;
        Self::new(model, tokenizer, max_seq_length, device).map_err(|e| match e {
            BertError::TokenizerSetup(msg) => BertError::Tokenizer { path: tok_file, msg },
            e => e,
        })
    }

    /// Wrap a model and a WordPiece tokenizer. The tokenizer's stored padding is turned off
    /// (batches are padded here, with an attention mask) and its truncation set to
    /// `max_seq_length` (longest-first, special tokens included), which must not exceed the
    /// model's `max_position_embeddings`. Every id the tokenizer can produce must be inside
    /// the model's vocabulary.
    pub fn new(
        model: BertModel<B>,
        mut tokenizer: tokenizers::Tokenizer,
        max_seq_length: usize,
        device: &B::Device,
    ) -> Result<Self> {
        let cfg = &model.config;
        if max_seq_length < 2 || max_seq_length > cfg.max_position_embeddings {
            return Err(BertError::Config(format!(
                "max_seq_length {max_seq_length} must be in 2..={} (max_position_embeddings)",
                cfg.max_position_embeddings
            )));
        }
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > cfg.vocab_size {
            return Err(BertError::TokenizerSetup(format!(
                "{vocab} tokens but the model's vocab_size is {}",
                cfg.vocab_size
            )));
        }
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_seq_length,
                strategy: tokenizers::TruncationStrategy::LongestFirst,
                stride: 0,
                direction: tokenizers::TruncationDirection::Right,
            }))
            .map_err(|e| BertError::TokenizerSetup(e.to_string()))?;
        Ok(Self { model, tokenizer, max_seq_length, batch_size: DEFAULT_BATCH_SIZE, device: device.clone() })
    }

    /// Sentences per forward pass (at least 1); the embeddings do not depend on it.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Embedding width (the model's hidden size: 384 for all-MiniLM-L6-v2).
    pub fn dim(&self) -> usize {
        self.model.config.hidden_size
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Token ids and token type ids as the encoder sees them: `[CLS] .. [SEP]`, truncated to
    /// `max_seq_length`.
    pub fn tokenize<S: AsRef<str>>(&self, sentences: &[S]) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        sentences
            .iter()
            .map(|s| {
                let enc = self
                    .tokenizer
                    .encode(s.as_ref(), true)
                    .map_err(|e| BertError::Input(format!("tokenizing {:?}: {e}", s.as_ref())))?;
                Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
            })
            .collect()
    }

    /// L2-normalised mean-pooled embeddings `[n, dim]`, row `i` for `sentences[i]`. Sentences
    /// are batched by length (longest first); padding is masked, so a sentence's embedding
    /// does not depend on its batch.
    pub fn encode<S: AsRef<str>>(&self, sentences: &[S]) -> Result<Tensor<B, 2>> {
        let n = sentences.len();
        let d = self.dim();
        if n == 0 {
            return Ok(Tensor::zeros([0, d], &self.device));
        }
        let toks = self.tokenize(sentences)?;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(toks[i].0.len()));
        let mut rows = Vec::with_capacity(n.div_ceil(self.batch_size));
        for chunk in order.chunks(self.batch_size) {
            let b = chunk.len();
            let len = chunk.iter().map(|&i| toks[i].0.len()).max().unwrap_or(1);
            let mut ids = vec![self.model.config.pad_token_id as i64; b * len];
            let mut types = vec![0i64; b * len];
            let mut mask = vec![false; b * len];
            for (r, &i) in chunk.iter().enumerate() {
                let (tid, tty) = &toks[i];
                for (j, (&t, &ty)) in tid.iter().zip(tty).enumerate() {
                    ids[r * len + j] = t as i64;
                    types[r * len + j] = ty as i64;
                    mask[r * len + j] = true;
                }
            }
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, len]), &self.device);
            let types = Tensor::<B, 2, Int>::from_data(TensorData::new(types, [b, len]), &self.device);
            let mask = Tensor::<B, 2, Bool>::from_data(TensorData::new(mask, [b, len]), &self.device);
            let h = self.model.forward(ids, Some(types), Some(mask.clone()))?;
            rows.push(l2_normalize(mean_pool(h, mask)));
        }
        let sorted = Tensor::cat(rows, 0);
        // Row k of `sorted` is sentence order[k]; put sentence i back at row i.
        let mut inverse = vec![0i64; n];
        for (k, &i) in order.iter().enumerate() {
            inverse[i] = k as i64;
        }
        let inverse = Tensor::<B, 1, Int>::from_data(TensorData::new(inverse, [n]), &self.device);
        Ok(sorted.select(0, inverse))
    }

    /// [`encode`](Self::encode) as host vectors (one per sentence).
    pub fn encode_vecs<S: AsRef<str>>(&self, sentences: &[S]) -> Result<Vec<Vec<f32>>> {
        let n = sentences.len();
        let d = self.dim();
        let flat = self
            .encode(sentences)?
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| BertError::Input(format!("reading embeddings: {e:?}")))?;
        Ok((0..n).map(|i| flat[i * d..(i + 1) * d].to_vec()).collect())
    }
}

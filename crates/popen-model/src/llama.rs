//! LLaMA decoder (Hugging Face `LlamaForCausalLM` layout) in burn.
//!
//! The module tree is named like the Hugging Face checkpoint (`model.layers.{i}.self_attn.q_proj`),
//! so [`load_gguf`] needs no remapping table beyond [`crate::gguf::llama_hf_name`]. The KV cache
//! is an explicit [`KvCache`] value owned by the caller, not module state.

use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, Int, TensorData};
use serde::{Deserialize, Serialize};

use crate::gguf::{GgufError, GgufFile};

/// Errors building or loading a [`Llama`].
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: bad LLaMA config: {msg}")]
    Config { path: String, msg: String },
    /// Every missing or mis-shaped tensor, by its Hugging Face name.
    #[error("{path}: {} tensor problem(s): {}", problems.len(), problems.join("; "))]
    Tensors { path: String, problems: Vec<String> },
}

/// Mirrors the Hugging Face `config.json` of a `LlamaForCausalLM`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
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
        let cfg = Self {
            vocab_size,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads,
            num_key_value_heads: u("attention.head_count_kv").unwrap_or(num_attention_heads),
            rms_norm_eps: g.get_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"))? as f64,
            rope_theta: g
                .get_f32(&format!("{arch}.rope.freq_base"))
                .map(|v| v as f64)
                .unwrap_or(10000.0),
            max_position_embeddings: u("context_length")?,
            tie_word_embeddings: g.tensor_info("output.weight").is_none(),
        };
        cfg.validate(&g.path().display().to_string())?;
        Ok(cfg)
    }

    fn validate(&self, path: &str) -> Result<(), LlamaError> {
        let bad = |msg: String| {
            Err(LlamaError::Config {
                path: path.to_string(),
                msg,
            })
        };
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} not divisible by num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("head_dim {} is odd", self.head_dim()));
        }
        Ok(())
    }

    /// Random weights (burn's default initialisers); norms start at 1.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Llama<B> {
        let lin = |i: usize, o: usize| LinearConfig::new(i, o).with_bias(false).init(device);
        let norm = || RmsNorm {
            weight: Param::from_tensor(Tensor::ones([self.hidden_size], device)),
            eps: self.rms_norm_eps,
        };
        let hd = self.head_dim();
        let layers = (0..self.num_hidden_layers)
            .map(|_| DecoderLayer {
                self_attn: Attention {
                    q_proj: lin(self.hidden_size, self.num_attention_heads * hd),
                    k_proj: lin(self.hidden_size, self.num_key_value_heads * hd),
                    v_proj: lin(self.hidden_size, self.num_key_value_heads * hd),
                    o_proj: lin(self.num_attention_heads * hd, self.hidden_size),
                    num_heads: self.num_attention_heads,
                    num_kv_heads: self.num_key_value_heads,
                    head_dim: hd,
                    rope_theta: self.rope_theta,
                },
                mlp: Mlp {
                    gate_proj: lin(self.hidden_size, self.intermediate_size),
                    up_proj: lin(self.hidden_size, self.intermediate_size),
                    down_proj: lin(self.intermediate_size, self.hidden_size),
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
        let inv = (x.clone().powf_scalar(2.0).mean_dim(2) + self.eps)
            .sqrt()
            .recip();
        x * inv * self.weight.val().unsqueeze::<3>()
    }
}

/// Grouped-query self-attention with rotate-half RoPE.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
}

/// HF `rotate_half`: `[-x2, x1]` where `x1, x2` are the halves of the head dim.
fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.narrow(3, d / 2, d / 2);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

/// RoPE cos/sin tables `[seq, head_dim]` for positions `offset..offset+seq`, laid out as
/// `concat(freqs, freqs)` (HF convention).
fn rope_tables<B: Backend>(
    offset: usize,
    seq: usize,
    head_dim: usize,
    theta: f64,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let half = head_dim / 2;
    let inv: Vec<f64> = (0..half)
        .map(|i| theta.powf(-(2.0 * i as f64) / head_dim as f64))
        .collect();
    let mut cos = Vec::with_capacity(seq * head_dim);
    let mut sin = Vec::with_capacity(seq * head_dim);
    for p in offset..offset + seq {
        for _ in 0..2 {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [seq, head_dim]), device),
        Tensor::from_data(TensorData::new(sin, [seq, head_dim]), device),
    )
}

fn apply_rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    x.clone() * cos.clone() + rotate_half(x) * sin.clone()
}

impl<B: Backend> Attention<B> {
    /// `x`: [batch, seq, hidden]; `cache`: this layer's (k, v), [batch, kv_heads, past, head_dim].
    pub fn forward(&self, x: Tensor<B, 3>, cache: &mut LayerCache<B>) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let device = x.device();
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q_proj
            .forward(x.clone())
            .reshape([b, s, h, hd])
            .swap_dims(1, 2);
        let k = self
            .k_proj
            .forward(x.clone())
            .reshape([b, s, kvh, hd])
            .swap_dims(1, 2);
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, s, kvh, hd])
            .swap_dims(1, 2);

        let past = cache.len();
        let (cos, sin) = rope_tables::<B>(past, s, hd, self.rope_theta, &device);
        let cos = cos.unsqueeze::<4>();
        let sin = sin.unsqueeze::<4>();
        let q = apply_rope(q, &cos, &sin);
        let k = apply_rope(k, &cos, &sin);

        let (k, v) = cache.append(k, v);
        let total = past + s;

        // GQA: each KV head serves h / kvh consecutive query heads (HF repeat_kv).
        let rep = h / kvh;
        let expand = |t: Tensor<B, 4>| {
            if rep == 1 {
                t
            } else {
                t.unsqueeze_dim::<5>(2)
                    .expand([b, kvh, rep, total, hd])
                    .reshape([b, h, total, hd])
            }
        };
        let k = expand(k);
        let v = expand(v);

        let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
        // Query i sits at absolute position past + i and may see keys 0..=past + i.
        let mask: Vec<bool> = (0..s)
            .flat_map(|i| (0..total).map(move |j| j > past + i))
            .collect();
        let mask = Tensor::<B, 2, Bool>::from_data(TensorData::new(mask, [s, total]), &device)
            .unsqueeze::<4>()
            .expand([b, h, s, total]);
        let scores = scores.mask_fill(mask, f32::NEG_INFINITY);
        let attn = softmax(scores, 3);
        let out = attn.matmul(v).swap_dims(1, 2).reshape([b, s, h * hd]);
        self.o_proj.forward(out)
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down_proj
            .forward(silu(self.gate_proj.forward(x.clone())) * self.up_proj.forward(x))
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
    pub fn forward(&self, x: Tensor<B, 3>, cache: &mut LayerCache<B>) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), cache);
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

/// Per-layer KV cache, owned by the caller and passed to [`Llama::forward`].
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<LayerCache<B>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerCache { kv: None }).collect(),
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<B: Backend> Llama<B> {
    pub fn num_layers(&self) -> usize {
        self.model.layers.len()
    }

    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.num_layers())
    }

    /// `tokens`: [batch, seq] continuing the positions already in `cache` (empty for a
    /// prefill). Returns logits [batch, seq, vocab] and appends this step's K/V to `cache`.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        assert_eq!(
            cache.layers.len(),
            self.model.layers.len(),
            "KvCache has {} layers, model has {}",
            cache.layers.len(),
            self.model.layers.len()
        );
        let mut x = self.model.embed_tokens.forward(tokens);
        for (layer, c) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, c);
        }
        let x = self.model.norm.forward(x);
        match &self.lm_head {
            Some(head) => head.forward(x),
            None => {
                let w = self.model.embed_tokens.weight.val(); // [vocab, hidden]
                x.matmul(w.transpose().unsqueeze::<3>())
            }
        }
    }

    /// Greedy decoding: prefill `prompt_ids`, then up to `max_new` one-token steps, stopping
    /// after emitting any id in `stop` (which is included). Returns the new ids only.
    pub fn greedy(&self, prompt_ids: &[u32], max_new: usize, stop: &[u32]) -> Vec<u32> {
        let device = self.model.embed_tokens.weight.device();
        let mut cache = self.new_cache();
        let mut out = Vec::new();
        if prompt_ids.is_empty() || max_new == 0 {
            return out;
        }
        let ids = |v: &[u32]| {
            let data: Vec<i64> = v.iter().map(|&t| t as i64).collect();
            Tensor::<B, 2, Int>::from_data(TensorData::new(data, [1, v.len()]), &device)
        };
        let mut input = ids(prompt_ids);
        for _ in 0..max_new {
            let logits = self.forward(input, &mut cache);
            let [_, s, vocab] = logits.dims();
            let last = logits.narrow(1, s - 1, 1).reshape([vocab]);
            let next = last
                .argmax(0)
                .into_data()
                .convert::<i64>()
                .to_vec::<i64>()
                .expect("argmax data")[0] as u32;
            out.push(next);
            if stop.contains(&next) {
                break;
            }
            input = ids(&[next]);
        }
        out
    }
}

/// Load a LLaMA from a llama.cpp GGUF. Every tensor `cfg` implies must be present with its
/// HF shape; all problems are collected and reported together by HF name.
pub fn load_gguf<B: Backend>(
    cfg: &LlamaConfig,
    g: &GgufFile,
    device: &B::Device,
) -> Result<Llama<B>, LlamaError> {
    let path = g.path().display().to_string();
    cfg.validate(&path)?;
    let hd = cfg.head_dim();
    let (hs, is) = (cfg.hidden_size, cfg.intermediate_size);

    // HF name -> GGUF name, for every tensor in the file that has an HF counterpart.
    let by_hf: std::collections::HashMap<String, String> = g
        .tensors()
        .iter()
        .filter_map(|t| crate::gguf::llama_hf_name(&t.name).map(|hf| (hf, t.name.clone())))
        .collect();

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

    let vec1 =
        |d: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(d.clone(), [d.len()]), device);
    let norm = |d: Option<Vec<f32>>| {
        d.map(|d| RmsNorm {
            weight: Param::from_tensor(vec1(d)),
            eps: cfg.rms_norm_eps,
        })
    };
    // HF Linear weight is [out, in]; burn's is [in, out].
    let linear = |d: Option<Vec<f32>>, out: usize, inp: usize| {
        d.map(|d| Linear {
            weight: Param::from_tensor(
                Tensor::<B, 2>::from_data(TensorData::new(d, [out, inp]), device).transpose(),
            ),
            bias: None,
        })
    };

    let embed = read("model.embed_tokens.weight".into(), vec![cfg.vocab_size, hs]);
    let mut layers = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let q = read(
            format!("{p}.self_attn.q_proj.weight"),
            vec![cfg.num_attention_heads * hd, hs],
        );
        let k = read(
            format!("{p}.self_attn.k_proj.weight"),
            vec![cfg.num_key_value_heads * hd, hs],
        );
        let v = read(
            format!("{p}.self_attn.v_proj.weight"),
            vec![cfg.num_key_value_heads * hd, hs],
        );
        let o = read(
            format!("{p}.self_attn.o_proj.weight"),
            vec![hs, cfg.num_attention_heads * hd],
        );
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
        if let (Some(q), Some(k), Some(v), Some(o), Some(g), Some(u), Some(d), Some(n1), Some(n2)) =
            parts
        {
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj: q,
                    k_proj: k,
                    v_proj: v,
                    o_proj: o,
                    num_heads: cfg.num_attention_heads,
                    num_kv_heads: cfg.num_key_value_heads,
                    head_dim: hd,
                    rope_theta: cfg.rope_theta,
                },
                mlp: Mlp {
                    gate_proj: g,
                    up_proj: u,
                    down_proj: d,
                },
                input_layernorm: n1,
                post_attention_layernorm: n2,
            });
        }
    }
    let final_norm = read("model.norm.weight".into(), vec![hs]);
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else {
        Some(read("lm_head.weight".into(), vec![cfg.vocab_size, hs]))
    };

    if !problems.is_empty() {
        return Err(LlamaError::Tensors { path, problems });
    }
    let embed = embed.expect("checked");
    Ok(Llama {
        model: LlamaModel {
            embed_tokens: Embedding {
                weight: Param::from_tensor(Tensor::from_data(
                    TensorData::new(embed, [cfg.vocab_size, hs]),
                    device,
                )),
            },
            layers,
            norm: norm(final_norm).expect("checked"),
        },
        lm_head: lm_head.map(|d| linear(d, cfg.vocab_size, hs).expect("checked")),
    })
}

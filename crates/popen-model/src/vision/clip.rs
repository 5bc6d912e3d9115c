//! CLIP vision tower (Hugging Face `CLIPVisionModel`) in burn, as PixelLM uses it.
//!
//! The module tree is named like the checkpoint `CLIPVisionModel.save_pretrained` writes
//! (`vision_model.embeddings.patch_embedding.weight`, `vision_model.encoder.layers.3.mlp.fc1.bias`,
//! ...), so [`load`] applies a checkpoint with no renaming table.
//!
//! PixelLM-specific pieces, all from MaverickRen/PixelLM at commit
//! c43c0aff64e0bf4ab65023667e58eb2329b54f7b:
//! - [`ClipVisionModel::with_image_size`]: the position-embedding resize of
//!   `CLIPVisionTower.load_model` (model/llava/model/multimodal_encoder/clip_encoder.py), used to
//!   run the 336-px checkpoint at 448 px;
//! - [`ClipVisionModel::forward_hidden_states_masked`] + [`patch_key_mask`]: the ViT attention
//!   mask over the zero-padded part of the image (`encode_images` in
//!   model/llava/model/llava_arch.py, `_CLIPVisionTransformer` in
//!   model/llava/model/multimodal_encoder/custom_clip.py), active with `pad_train_clip_images`;
//! - hidden-state selection by Python index (PixelLM reads `hidden_states[-2]` and `[-11]`).

use std::path::Path;

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu, sigmoid, softmax};
use burn::tensor::{Bool, TensorData};
use serde::{Deserialize, Serialize};

use crate::sam::{is_patch_conv, patch_conv2d_tokens};
use crate::weights::{self, Remap, WeightsError};

/// Errors of configuring, loading or running the CLIP vision tower.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("bad CLIP vision config: {0}")]
    Config(String),
    #[error("{path}: {msg}")]
    ConfigFile { path: String, msg: String },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// A `hidden_states` index outside `-(L+1)..=L` for an `L`-layer encoder.
    #[error(
        "hidden_states index {index} is out of range: {num_layers} encoder layers give {} hidden \
         states (valid indices {}..={num_layers})",
        num_layers + 1,
        -(*num_layers as isize) - 1
    )]
    LayerIndex { index: isize, num_layers: usize },
    #[error("pixel_values: {0}")]
    Input(String),
    #[error("position embedding resize: {0}")]
    Resize(String),
}

/// Activation of the MLP (`hidden_act` of Hugging Face's config). Another value (`gelu_new`,
/// `gelu_pytorch_tanh`, ...) is an error naming `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP checkpoints.
    #[default]
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
}

impl<'de> Deserialize<'de> for ClipActivation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        match name.as_str() {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            other => Err(serde::de::Error::custom(format!("hidden_act {other:?} is not supported (quick_gelu, gelu)"))),
        }
    }
}

/// `image_size` / `patch_size`: an integer (transformers 4.x) or, as transformers 5.x's
/// `CLIPVisionConfig` also accepts, `[height, width]`, which must be square here.
fn square_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        One(usize),
        Two(Vec<usize>),
    }
    match Size::deserialize(d)? {
        Size::One(n) => Ok(n),
        Size::Two(v) if v.len() == 2 && v[0] == v[1] => Ok(v[0]),
        Size::Two(v) => Err(serde::de::Error::custom(format!(
            "image_size / patch_size {v:?}: only square [n, n] sizes are supported"
        ))),
    }
}

/// Mirrors Hugging Face `CLIPVisionConfig` (field names and defaults of transformers 4.57 and
/// 5.x, models/clip/configuration_clip.py, which agree; 5.x may write `image_size` and
/// `patch_size` as `[h, w]`); other fields of its `config.json` (`projection_dim`,
/// `attention_dropout`, ...) are ignored because they do not change the vision tower's forward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    #[serde(deserialize_with = "square_size")]
    pub image_size: usize,
    #[serde(deserialize_with = "square_size")]
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: ClipActivation,
}

impl Default for ClipVisionConfig {
    /// Hugging Face's defaults (ViT-B/32 at 224).
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            layer_norm_eps: 1e-5,
            hidden_act: ClipActivation::QuickGelu,
        }
    }
}

/// Largest accepted `image_size / patch_size` grid side: 1024^2 patches is far beyond any CLIP
/// and keeps position tables and attention matrices allocatable.
const MAX_GRID: usize = 1024;

impl ClipVisionConfig {
    /// `openai/clip-vit-large-patch14-336`, PixelLM's vision tower (its `vision_config`).
    pub fn vit_l_14_336() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 336,
            patch_size: 14,
            layer_norm_eps: 1e-5,
            hidden_act: ClipActivation::QuickGelu,
        }
    }

    /// A small random-weight model for shape tests (4x4 patch grid).
    pub fn tiny() -> Self {
        Self {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_channels: 3,
            image_size: 64,
            patch_size: 16,
            layer_norm_eps: 1e-5,
            hidden_act: ClipActivation::QuickGelu,
        }
    }

    /// Read a `config.json`: either a `CLIPVisionConfig` or a full `CLIPConfig` (then its
    /// `vision_config` is used), as the openai/* repositories ship.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, ClipError> {
        let path = path.as_ref();
        let err = |msg: String| ClipError::ConfigFile { path: path.display().to_string(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(format!("not JSON: {e}")))?;
        if let Some(vc) = v.get_mut("vision_config") {
            v = vc.take();
        }
        let cfg: Self = serde_json::from_value(v).map_err(|e| err(e.to_string()))?;
        cfg.validate().map_err(|e| err(e.to_string()))?;
        Ok(cfg)
    }

    /// Patches per side: `image_size / patch_size` (the stride-`patch_size` convolution drops a
    /// remainder, as PyTorch's does).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Rows of the position table: one per patch plus CLS.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Reject configs no checkpoint can have.
    pub fn validate(&self) -> Result<(), ClipError> {
        let bad = |m: String| Err(ClipError::Config(m));
        if self.hidden_size == 0 || self.intermediate_size == 0 {
            return bad(format!(
                "hidden_size {} and intermediate_size {} must be positive",
                self.hidden_size, self.intermediate_size
            ));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_channels == 0 {
            return bad("num_channels must be positive".into());
        }
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return bad(format!(
                "image_size {} must be at least patch_size {} (> 0)",
                self.image_size, self.patch_size
            ));
        }
        if self.grid() > MAX_GRID {
            return bad(format!(
                "image_size {} / patch_size {} = {} patches per side exceeds {MAX_GRID}",
                self.image_size,
                self.patch_size,
                self.grid()
            ));
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return bad(format!("layer_norm_eps {} must be positive and finite", self.layer_norm_eps));
        }
        Ok(())
    }

    /// Random weights (burn's default initialisers; norms start at 1/0). Call
    /// [`validate`](Self::validate) first: an invalid config panics in burn's constructors.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipVisionModel<B> {
        let d = self.hidden_size;
        let norm = || LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device);
        let lin = |i: usize, o: usize| LinearConfig::new(i, o).init(device);
        let layers = (0..self.num_hidden_layers)
            .map(|_| ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: lin(d, d),
                    k_proj: lin(d, d),
                    v_proj: lin(d, d),
                    out_proj: lin(d, d),
                    num_heads: self.num_attention_heads,
                    head_dim: self.head_dim(),
                },
                layer_norm1: norm(),
                mlp: ClipMlp {
                    fc1: lin(d, self.intermediate_size),
                    fc2: lin(self.intermediate_size, d),
                    quick_gelu: self.hidden_act == ClipActivation::QuickGelu,
                },
                layer_norm2: norm(),
            })
            .collect();
        ClipVisionModel {
            vision_model: ClipVisionTransformer {
                embeddings: ClipVisionEmbeddings {
                    class_embedding: Param::from_tensor(Tensor::random(
                        [d],
                        burn::tensor::Distribution::Normal(0.0, 1.0),
                        device,
                    )),
                    patch_embedding: Conv2dConfig::new([self.num_channels, d], [self.patch_size, self.patch_size])
                        .with_stride([self.patch_size, self.patch_size])
                        .with_bias(false)
                        .init(device),
                    position_embedding: EmbeddingConfig::new(self.num_positions(), d).init(device),
                },
                pre_layrnorm: norm(),
                encoder: ClipEncoder { layers },
                post_layernorm: norm(),
            },
            config: self.clone(),
        }
    }
}

/// Hugging Face `CLIPVisionModel`. `config` reflects the current input size (it changes with
/// [`with_image_size`](Self::with_image_size)).
#[derive(Module, Debug)]
pub struct ClipVisionModel<B: Backend> {
    pub vision_model: ClipVisionTransformer<B>,
    #[module(skip)]
    pub config: ClipVisionConfig,
}

/// `CLIPVisionTransformer` (note HF's spelling `pre_layrnorm`).
#[derive(Module, Debug)]
pub struct ClipVisionTransformer<B: Backend> {
    pub embeddings: ClipVisionEmbeddings<B>,
    pub pre_layrnorm: LayerNorm<B>,
    pub encoder: ClipEncoder<B>,
    pub post_layernorm: LayerNorm<B>,
}

/// `CLIPVisionEmbeddings`: CLS + patch convolution (no bias) + learned positions.
#[derive(Module, Debug)]
pub struct ClipVisionEmbeddings<B: Backend> {
    pub class_embedding: Param<Tensor<B, 1>>,
    pub patch_embedding: Conv2d<B>,
    pub position_embedding: Embedding<B>,
}

#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    pub layers: Vec<ClipEncoderLayer<B>>,
}

/// Pre-norm transformer block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    pub self_attn: ClipAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: ClipMlp<B>,
    pub layer_norm2: LayerNorm<B>,
}

/// Multi-head self-attention with biases, scale `head_dim^-0.5`.
#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub num_heads: usize,
    pub head_dim: usize,
}

#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    /// `quick_gelu` if true, exact GELU otherwise.
    pub quick_gelu: bool,
}

impl<B: Backend> ClipAttention<B> {
    /// `key_bias`: `[batch, 1, 1, seq]`, 0 for visible keys and `f32::MIN` for masked ones
    /// (added to the scores, as HF adds its expanded attention mask).
    pub fn forward(&self, x: Tensor<B, 3>, key_bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let [b, n, d] = x.dims();
        let (h, hd) = (self.num_heads, self.head_dim);
        let split = |t: Tensor<B, 3>| t.reshape([b, n, h, hd]).swap_dims(1, 2);
        let q = split(self.q_proj.forward(x.clone()));
        let k = split(self.k_proj.forward(x.clone()));
        let v = split(self.v_proj.forward(x));
        let mut scores = q.matmul(k.swap_dims(2, 3)).mul_scalar((hd as f64).powf(-0.5));
        if let Some(bias) = key_bias {
            scores = scores + bias;
        }
        let out = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([b, n, d]);
        self.out_proj.forward(out)
    }
}

impl<B: Backend> ClipMlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.fc1.forward(x);
        let x = if self.quick_gelu { x.clone() * sigmoid(x.mul_scalar(1.702)) } else { gelu(x) };
        self.fc2.forward(x)
    }
}

impl<B: Backend> ClipEncoderLayer<B> {
    pub fn forward(&self, x: Tensor<B, 3>, key_bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x), key_bias);
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

impl<B: Backend> ClipVisionModel<B> {
    pub fn num_layers(&self) -> usize {
        self.vision_model.encoder.layers.len()
    }

    /// Position of a Python-style `hidden_states` index (`hidden_states` has
    /// `num_layers + 1` entries: embeddings after `pre_layrnorm`, then each layer's output).
    pub fn resolve_layer(&self, index: isize) -> Result<usize, ClipError> {
        let n = self.num_layers() as isize + 1;
        let i = if index < 0 { n + index } else { index };
        if (0..n).contains(&i) {
            Ok(i as usize)
        } else {
            Err(ClipError::LayerIndex { index, num_layers: self.num_layers() })
        }
    }

    /// `pre_layrnorm(cls ++ patch_embedding(pixels) + positions)`: `hidden_states[0]`.
    fn embed(&self, pixel_values: Tensor<B, 4>) -> Result<Tensor<B, 3>, ClipError> {
        let [b, c, h, w] = pixel_values.dims();
        let cfg = &self.config;
        if b == 0 || c != cfg.num_channels || h != cfg.image_size || w != cfg.image_size {
            return Err(ClipError::Input(format!(
                "shape [{b}, {c}, {h}, {w}] but the tower takes [batch >= 1, {}, {}, {}] (resize \
                 the position embeddings with with_image_size for another size)",
                cfg.num_channels, cfg.image_size, cfg.image_size
            )));
        }
        let e = &self.vision_model.embeddings;
        // The patch embedding is a kernel = stride convolution: patchify + one matrix product
        // straight into `[b, patches, d]` (burn's conv2d is a scalar loop on NdArray).
        let conv = &e.patch_embedding;
        let (patches, [gh, gw]) = if is_patch_conv(conv) {
            patch_conv2d_tokens(pixel_values, conv.weight.val(), conv.bias.as_ref().map(|b| b.val()))
        } else {
            let patches = conv.forward(pixel_values);
            let [_, d, gh, gw] = patches.dims();
            (patches.reshape([b, d, gh * gw]).swap_dims(1, 2), [gh, gw])
        };
        let d = patches.dims()[2];
        let cls = e.class_embedding.val().reshape([1, 1, d]).expand([b, 1, d]);
        let x = Tensor::cat(vec![cls, patches], 1);
        let [rows, _] = e.position_embedding.weight.dims();
        if rows != gh * gw + 1 {
            return Err(ClipError::Input(format!(
                "{gh}x{gw} patches + CLS need {} position rows, the table has {rows}",
                gh * gw + 1
            )));
        }
        let x = x + e.position_embedding.weight.val().unsqueeze::<3>();
        Ok(self.vision_model.pre_layrnorm.forward(x))
    }

    /// HF's `hidden_states[i]` for each requested Python index `i` (negative counts from the
    /// end), in request order. Only as many encoder layers run as the deepest request needs,
    /// e.g. PixelLM's `[-2, -11]` on ViT-L (24 layers) stops after layer 23.
    pub fn forward_hidden_states(
        &self,
        pixel_values: Tensor<B, 4>,
        layers: &[isize],
    ) -> Result<Vec<Tensor<B, 3>>, ClipError> {
        self.forward_hidden_states_masked(pixel_values, layers, None)
    }

    /// [`forward_hidden_states`](Self::forward_hidden_states) with PixelLM's key mask
    /// (`[batch, 1 + patches]`, true = may be attended; see [`patch_key_mask`]). Masked keys
    /// get no attention weight in any layer; their own outputs are still computed, as in
    /// PixelLM's `_CLIPVisionTransformer`.
    pub fn forward_hidden_states_masked(
        &self,
        pixel_values: Tensor<B, 4>,
        layers: &[isize],
        key_mask: Option<Tensor<B, 2, Bool>>,
    ) -> Result<Vec<Tensor<B, 3>>, ClipError> {
        let want: Vec<usize> = layers.iter().map(|&i| self.resolve_layer(i)).collect::<Result<_, _>>()?;
        let Some(&deepest) = want.iter().max() else {
            return Ok(Vec::new());
        };
        let (states, _) = self.run(pixel_values, key_mask, deepest, &want)?;
        // `run` kept exactly the states listed in `want`.
        Ok(want.iter().filter_map(|i| states[*i].clone()).collect())
    }

    /// Run through `depth` layers, keeping the states listed in `keep` (indices <= depth).
    #[allow(clippy::type_complexity)]
    fn run(
        &self,
        pixel_values: Tensor<B, 4>,
        key_mask: Option<Tensor<B, 2, Bool>>,
        depth: usize,
        keep: &[usize],
    ) -> Result<(Vec<Option<Tensor<B, 3>>>, Tensor<B, 3>), ClipError> {
        let [b, _, _, _] = pixel_values.dims();
        let mut h = self.embed(pixel_values)?;
        let n = h.dims()[1];
        let bias = match key_mask {
            None => None,
            Some(m) => {
                let [mb, mn] = m.dims();
                if mb != b || mn != n {
                    return Err(ClipError::Input(format!("key mask is [{mb}, {mn}] but the sequence is [{b}, {n}]")));
                }
                let zeros = Tensor::<B, 2>::zeros([b, n], &h.device());
                Some(zeros.mask_fill(m.bool_not(), f32::MIN).reshape([b, 1, 1, n]))
            }
        };
        let mut states: Vec<Option<Tensor<B, 3>>> = vec![None; depth + 1];
        if keep.contains(&0) {
            states[0] = Some(h.clone());
        }
        for (i, layer) in self.vision_model.encoder.layers[..depth].iter().enumerate() {
            h = layer.forward(h, bias.clone());
            if keep.contains(&(i + 1)) {
                states[i + 1] = Some(h.clone());
            }
        }
        Ok((states, h))
    }

    /// HF's `(last_hidden_state, pooler_output)`: the last layer's output `[b, 1 + N, d]`
    /// (no final norm) and `post_layernorm` of its CLS row `[b, d]`.
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> Result<(Tensor<B, 3>, Tensor<B, 2>), ClipError> {
        self.forward_masked(pixel_values, None)
    }

    /// [`forward`](Self::forward) with PixelLM's key mask (see
    /// [`forward_hidden_states_masked`](Self::forward_hidden_states_masked)).
    pub fn forward_masked(
        &self,
        pixel_values: Tensor<B, 4>,
        key_mask: Option<Tensor<B, 2, Bool>>,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 2>), ClipError> {
        let (_, last) = self.run(pixel_values, key_mask, self.num_layers(), &[])?;
        let [b, _, d] = last.dims();
        let cls = last.clone().narrow(1, 0, 1).reshape([b, d]);
        let pooled = self.vision_model.post_layernorm.forward(cls);
        Ok((last, pooled))
    }

    /// Run the tower at `new_image_size` by resizing the loaded position embeddings exactly as
    /// PixelLM does (`CLIPVisionTower.load_model`, `resize_vision_tower` branch,
    /// <https://github.com/MaverickRen/PixelLM/blob/c43c0aff64e0bf4ab65023667e58eb2329b54f7b/model/llava/model/multimodal_encoder/clip_encoder.py>):
    ///
    /// - the table's LAST row (in HF's layout that is the last patch's position; row 0 is
    ///   CLS's) is set aside as "cls" and appended, unchanged, as the new last row;
    /// - rows `0..g*g` (CLS's row and every patch row but the last) are viewed as a `g x g`
    ///   grid (`[:-1].permute(1, 0).view(1, D, g, g)`) and resized to `g' x g'`
    ///   (`g' = new_image_size / patch_size`) with `F.interpolate(mode="bilinear",
    ///   align_corners=False)` (no antialias), becoming rows `0..g'*g'`.
    ///
    /// So CLS's new position is the resized grid's top-left and the last patch keeps its old
    /// row: an off-by-one in PixelLM, reproduced on purpose because its projector and decoder
    /// were trained on the features it gives. Load the checkpoint at its own size, then call
    /// this (the vision tower is frozen in PixelLM, so the weights are never re-saved).
    /// The resize runs once, on CPU data, in f32 like PyTorch's CPU kernel.
    pub fn with_image_size(mut self, new_image_size: usize) -> Result<Self, ClipError> {
        let mut cfg = self.config.clone();
        let g = cfg.grid();
        cfg.image_size = new_image_size;
        cfg.validate().map_err(|e| ClipError::Resize(e.to_string()))?;
        let g2 = cfg.grid();
        let emb = self.vision_model.embeddings;
        let (id, weight, _) = emb.position_embedding.weight.consume();
        let [rows, d] = weight.dims();
        if rows != g * g + 1 {
            return Err(ClipError::Resize(format!(
                "position table has {rows} rows, a {g}x{g} grid needs {}",
                g * g + 1
            )));
        }
        let device = weight.device();
        let dtype = weight.dtype();
        let data = weight
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| ClipError::Resize(format!("reading the position table: {e:?}")))?;
        let resized = resize_position_table_pixellm(&data, g, d, g2);
        let new_weight = Tensor::<B, 2>::from_data(
            TensorData::new(resized, [g2 * g2 + 1, d]).convert_dtype(dtype),
            (&device, dtype),
        );
        let position_embedding = Embedding { weight: Param::initialized(id, new_weight) };
        self.vision_model.embeddings = ClipVisionEmbeddings { position_embedding, ..emb };
        self.config = cfg;
        Ok(self)
    }
}

/// PixelLM's position-table resize on row-major f32 data `[g*g + 1, d]` -> `[g2*g2 + 1, d]`
/// (see [`ClipVisionModel::with_image_size`]).
pub fn resize_position_table_pixellm(table: &[f32], g: usize, d: usize, g2: usize) -> Vec<f32> {
    // grid[c][y][x] = table[y*g + x][c]: rows 0..g*g, i.e. everything but the last row.
    let axis = bilinear_axis(g, g2);
    let mut out = vec![0f32; (g2 * g2 + 1) * d];
    for (oy, &(y0, y1, wy0, wy1)) in axis.iter().enumerate() {
        for (ox, &(x0, x1, wx0, wx1)) in axis.iter().enumerate() {
            let r = |y: usize, x: usize| &table[(y * g + x) * d..(y * g + x + 1) * d];
            let (a, b, c, e) = (r(y0, x0), r(y0, x1), r(y1, x0), r(y1, x1));
            let o = &mut out[(oy * g2 + ox) * d..(oy * g2 + ox + 1) * d];
            for k in 0..d {
                o[k] = wy0 * (wx0 * a[k] + wx1 * b[k]) + wy1 * (wx0 * c[k] + wx1 * e[k]);
            }
        }
    }
    out[g2 * g2 * d..].copy_from_slice(&table[g * g * d..(g * g + 1) * d]);
    out
}

/// Source indices and weights of PyTorch's `upsample_bilinear2d` along one axis with
/// `align_corners=False` and no scale factor (aten/src/ATen/native/UpSample.h:
/// `area_pixel_compute_scale` = in/out, `area_pixel_compute_source_index` =
/// max(scale * (dst + 0.5) - 0.5, 0), neighbour clamped at the edge), in f32 as on CPU.
fn bilinear_axis(input: usize, output: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// PixelLM's per-image ViT key mask as flat `[batch, 1 + grid*grid]` booleans (true = valid):
/// CLS always, and patch `(i, j)` iff pixel `(src(i), src(j))` of the un-padded region
/// `[0, h) x [0, w)` is inside it, where `src` is PyTorch's `nearest` index
/// `min(floor(dst * (image_size / grid)), image_size - 1)` (computed in f32) from the
/// `image_size`-px pixel mask to the `grid = image_size / patch_size` patch grid.
/// From `encode_images` in PixelLM's model/llava/model/llava_arch.py (commit c43c0aff), which
/// hard-codes `patch_size = 14`.
pub fn patch_key_mask_values(resized_hw: &[(usize, usize)], image_size: usize, patch_size: usize) -> Vec<bool> {
    let grid = image_size / patch_size.max(1);
    let src: Vec<usize> = (0..grid)
        .map(|o| {
            if grid == image_size {
                o
            } else if grid == 2 * image_size {
                o >> 1
            } else {
                let scale = image_size as f32 / grid as f32;
                ((o as f32 * scale).floor() as usize).min(image_size.saturating_sub(1))
            }
        })
        .collect();
    let mut out = Vec::with_capacity(resized_hw.len() * (grid * grid + 1));
    for &(h, w) in resized_hw {
        out.push(true);
        for &sy in &src {
            for &sx in &src {
                out.push(sy < h && sx < w);
            }
        }
    }
    out
}

/// [`patch_key_mask_values`] as a `[batch, 1 + grid*grid]` bool tensor for
/// [`ClipVisionModel::forward_hidden_states_masked`].
pub fn patch_key_mask<B: Backend>(
    resized_hw: &[(usize, usize)],
    image_size: usize,
    patch_size: usize,
    device: &B::Device,
) -> Tensor<B, 2, Bool> {
    let v = patch_key_mask_values(resized_hw, image_size, patch_size);
    let n = v.len() / resized_hw.len().max(1);
    Tensor::from_data(TensorData::new(v, [resized_hw.len(), n]), device)
}

/// Checkpoint tensors that are not part of the vision tower and are skipped when loading: the
/// text tower and projections of a full `CLIPModel` checkpoint (openai/* repositories), and the
/// `position_ids` buffer older transformers saved.
pub fn checkpoint_remap() -> Remap {
    Remap::none()
        .drop("text_model.*")
        .drop("text_projection.*")
        .drop("visual_projection.*")
        .drop("logit_scale")
        .drop("vision_model.embeddings.position_ids")
}

/// Build the tower for `cfg` and load a `CLIPVisionModel`/`CLIPModel` safetensors file or
/// folder into it strictly (every vision tensor must be present with its shape; see
/// [`checkpoint_remap`] for what is skipped). Resize afterwards with
/// [`ClipVisionModel::with_image_size`].
pub fn load<B: Backend>(
    cfg: &ClipVisionConfig,
    path: impl AsRef<Path>,
    device: &B::Device,
) -> Result<ClipVisionModel<B>, ClipError> {
    cfg.validate()?;
    let model = cfg.init::<B>(device);
    Ok(weights::load(model, path, &checkpoint_remap())?)
}

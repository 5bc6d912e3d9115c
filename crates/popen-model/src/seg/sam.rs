//! Segment Anything's prompt-side modules in burn: the two-way transformer, the prompt
//! encoder, the standard single-scale mask decoder and their building blocks.
//!
//! PixelLM's `MaskDecoderMultiScale` ([`crate::pixel_decoder`]) is built from these, and so is
//! any SAM-family model (SAM, MobileSAM: same decoder, different image encoder). Every
//! module is named like the PyTorch state dict of facebookresearch/segment-anything
//! (`layers.0.self_attn.q_proj`, `final_attn_token_to_image`, `norm_final_attn`,
//! `pe_layer.positional_encoding_gaussian_matrix`, `output_upscaling.0`...), so checkpoints
//! load through [`crate::weights`] without a renaming table. `nn.Sequential` members are
//! `Vec<`[`SeqLayer`]`>`, whose parameter-free entries (GELU) keep the PyTorch indices.
//!
//! Reference: segment_anything/modeling/{transformer,common,prompt_encoder,mask_decoder}.py
//! at facebookresearch/segment-anything 5717941 (checked by tests/pixel_decoder.rs against
//! tools/reference/pixellm_decoder_ref.py). Everything is differentiable with burn's
//! autodiff, including [`resize_bilinear`] (burn's own bilinear interpolation has no
//! backward pass on any backend in 0.21, so resizing is done with two interpolation
//! matrices instead).

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::{relu, sigmoid, softmax};
use burn::tensor::ops::PadMode;
use burn::tensor::{Distribution, TensorData};
use serde::{Deserialize, Serialize};

/// Wrong input shapes or invalid configurations; the message names the tensor and the
/// expected and actual shapes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamError {
    #[error("bad input shape: {0}")]
    Shape(String),
    #[error("bad configuration: {0}")]
    Config(String),
}

type Result<T> = std::result::Result<T, SamError>;

fn shape_err<T>(msg: String) -> Result<T> {
    Err(SamError::Shape(msg))
}

/// Activation of an MLP block (`nn.ReLU` in SAM's two-way transformer, `nn.GELU` in its
/// image encoder).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SamActivation {
    #[default]
    Relu,
    Gelu,
}

impl SamActivation {
    fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            SamActivation::Relu => relu(x),
            SamActivation::Gelu => burn::tensor::activation::gelu(x),
        }
    }
}

/// `LayerNorm2d` of SAM's common.py: normalises over channels of an NCHW tensor with a
/// per-channel affine (`weight`, `bias`), eps 1e-6.
#[derive(Module, Debug)]
pub struct LayerNorm2d<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> LayerNorm2d<B> {
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([channels], device)),
            bias: Param::from_tensor(Tensor::zeros([channels], device)),
            eps: 1e-6,
        }
    }

    /// `x`: `[b, c, h, w]`. Computed channels-last (`[b * h * w, c]`, one copy in and one
    /// view out): every broadcast is then a per-row scalar or a shared row, which the CPU
    /// backend runs on its contiguous SIMD paths; over axis 1 of `[b, c, h, w]` the same
    /// broadcasts went through a generic strided iterator (issue 21's SFT-step profile).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let t = x.permute([0, 2, 3, 1]).reshape([b * h * w, c]);
        let u = t.clone().mean_dim(1);
        let tc = t - u;
        let s = tc.clone().powi_scalar(2).mean_dim(1);
        let tn = tc / (s + self.eps).sqrt();
        let y = tn * self.weight.val().reshape([1, c]) + self.bias.val().reshape([1, c]);
        y.reshape([b, h, w, c]).permute([0, 3, 1, 2])
    }
}

/// One entry of a PyTorch `nn.Sequential` of SAM's convolutional heads. Enum variants do not
/// appear in parameter paths, so `Vec<SeqLayer>` is named `0.weight`, `1.weight`, ... and a
/// `Gelu` keeps its index without parameters, exactly like the PyTorch module.
///
/// The convolutions keep burn's modules (so parameter names and shapes are those of PyTorch's
/// `nn.Conv2d` / `nn.ConvTranspose2d`), but [`SeqLayer::forward`] runs the non-overlapping
/// ones (kernel == stride: all of SAM's and PixelLM's) as one matrix product plus a reshape
/// ([`patch_conv2d`], [`patch_conv_transpose2d`]) instead of burn's convolution kernels,
/// which are scalar loops on NdArray (docs/bench-model.md).
#[derive(Module, Debug)]
pub enum SeqLayer<B: Backend> {
    Conv(Conv2d<B>),
    ConvTranspose(ConvTranspose2d<B>),
    Norm(LayerNorm2d<B>),
    Gelu(Gelu),
}

impl<B: Backend> SeqLayer<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            SeqLayer::Conv(m) => conv2d_forward(m, x),
            SeqLayer::ConvTranspose(m) => conv_transpose2d_forward(m, x),
            SeqLayer::Norm(m) => m.forward(x),
            SeqLayer::Gelu(m) => m.forward(x),
        }
    }
}

/// Run an `nn.Sequential` of [`SeqLayer`]s.
pub fn seq_forward<B: Backend>(layers: &[SeqLayer<B>], mut x: Tensor<B, 4>) -> Tensor<B, 4> {
    for l in layers {
        x = l.forward(x);
    }
    x
}

/// [`seq_forward`] on a channels-last token grid `[b, h * w, c]` (row-major positions, as the
/// two-way transformer returns its keys). When the first layer is a non-overlapping
/// transposed convolution it reads the tokens directly, which saves the NCHW copy.
pub fn seq_forward_tokens<B: Backend>(
    layers: &[SeqLayer<B>],
    tokens: Tensor<B, 3>,
    h: usize,
    w: usize,
) -> Tensor<B, 4> {
    match layers.split_first() {
        Some((SeqLayer::ConvTranspose(m), rest)) if is_patch_conv_transpose(m) => {
            let x = patch_conv_transpose2d_tokens(tokens, h, w, m.weight.val(), m.bias.as_ref().map(|b| b.val()));
            seq_forward(rest, x)
        }
        _ => {
            let [b, _, c] = tokens.dims();
            seq_forward(layers, tokens.swap_dims(1, 2).reshape([b, c, h, w]))
        }
    }
}

/// Whether a `Conv2d` is a patch convolution (kernel == stride, no padding, no dilation, one
/// group): every input pixel feeds exactly one output position, so it is a matrix product.
pub fn is_patch_conv<B: Backend>(m: &Conv2d<B>) -> bool {
    m.kernel_size == m.stride
        && m.dilation == [1, 1]
        && m.groups == 1
        && matches!(m.padding, PaddingConfig2d::Valid | PaddingConfig2d::Explicit(0, 0, 0, 0))
}

/// Whether a `ConvTranspose2d` is non-overlapping (kernel == stride, no padding, no output
/// padding, no dilation, one group): each input pixel writes its own `kh x kw` output block.
pub fn is_patch_conv_transpose<B: Backend>(m: &ConvTranspose2d<B>) -> bool {
    m.kernel_size == m.stride && m.padding == [0, 0] && m.padding_out == [0, 0] && m.dilation == [1, 1] && m.groups == 1
}

/// `m.forward(x)` as matrix products where that is possible (same numbers up to float
/// summation order, gradients included): [`patch_conv2d`] for a patch convolution,
/// [`im2col_conv2d`] for a stride-1 convolution with `Valid` or explicit zero padding (e.g.
/// PixelLM's neck 3x3); burn's convolution otherwise. burn-ndarray's convolution and, worse,
/// its transposed convolution (the input gradient of every convolution) are scalar loops.
pub fn conv2d_forward<B: Backend>(m: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let bias = || m.bias.as_ref().map(|b| b.val());
    if is_patch_conv(m) {
        return patch_conv2d(x, m.weight.val(), bias());
    }
    let pad = match m.padding {
        PaddingConfig2d::Valid => Some([0; 4]),
        PaddingConfig2d::Explicit(top, left, bottom, right) => Some([top, left, bottom, right]),
        PaddingConfig2d::Same => None,
    };
    match pad {
        Some(pad) if m.stride == [1, 1] && m.dilation == [1, 1] && m.groups == 1 => {
            im2col_conv2d(x, m.weight.val(), bias(), pad)
        }
        _ => m.forward(x),
    }
}

/// Stride-1 convolution with zero padding `[top, left, bottom, right]` as one matrix product
/// over the `kh * kw` shifted views of the padded input (im2col):
/// `out[b, o, i, j] = sum_{c, ki, kj} xp[b, c, i + ki, j + kj] * W[o, c, ki, kj] + bias[o]`.
/// Needs `kh * kw` times the input in memory, which is small for 3x3 heads. A kernel larger
/// than the padded input gives an empty output, as in PyTorch.
pub fn im2col_conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    pad: [usize; 4],
) -> Tensor<B, 4> {
    let [top, left, bottom, right] = pad;
    let [b, c, h, w] = x.dims();
    let [cout, cin, kh, kw] = weight.dims();
    let (hp, wp) = (h + top + bottom, w + left + right);
    let (oh, ow) = ((hp + 1).saturating_sub(kh), (wp + 1).saturating_sub(kw));
    let x = if pad == [0; 4] { x } else { x.pad([(top, bottom), (left, right)], PadMode::Constant(0.0)) };
    if kh == 1 && kw == 1 {
        return patch_conv2d(x, weight, bias);
    }
    let cols: Vec<Tensor<B, 5>> = (0..kh)
        .flat_map(|ki| (0..kw).map(move |kj| (ki, kj)))
        .map(|(ki, kj)| x.clone().slice([0..b, 0..c, ki..ki + oh, kj..kj + ow]).unsqueeze_dim::<5>(2))
        .collect();
    // [b, c, kh*kw, oh, ow]: rows in the weight's (c, ki, kj) order.
    let cols = Tensor::cat(cols, 2).reshape([b, c * kh * kw, oh * ow]);
    let y = weight.reshape([cout, cin * kh * kw]).unsqueeze::<3>().matmul(cols);
    let y = match bias {
        Some(bias) => y + bias.reshape([1, cout, 1]),
        None => y,
    };
    y.reshape([b, cout, oh, ow])
}

/// `m.forward(x)`, through [`patch_conv_transpose2d`] when `m` is non-overlapping, burn's
/// transposed convolution otherwise.
pub fn conv_transpose2d_forward<B: Backend>(m: &ConvTranspose2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    if is_patch_conv_transpose(m) {
        patch_conv_transpose2d(x, m.weight.val(), m.bias.as_ref().map(|b| b.val()))
    } else {
        m.forward(x)
    }
}

/// Cut `x` `[b, c, h, w]` into non-overlapping `kh x kw` patches, flattened as `(c, ki, kj)`
/// (PyTorch's conv weight order): `[b, c * kh * kw, gh * gw]` with `gh = h / kh`,
/// `gw = w / kw` (a remainder is dropped, as a stride-`k` convolution does).
fn patches_cf<B: Backend>(x: Tensor<B, 4>, kh: usize, kw: usize) -> (Tensor<B, 3>, [usize; 2]) {
    let [b, c, h, w] = x.dims();
    let (gh, gw) = (h / kh, w / kw);
    let x = if gh * kh != h || gw * kw != w { x.slice([0..b, 0..c, 0..gh * kh, 0..gw * kw]) } else { x };
    let p = if kh == 1 && kw == 1 {
        x.reshape([b, c, gh * gw])
    } else {
        x.reshape([b, c, gh, kh, gw, kw]).permute([0, 1, 3, 5, 2, 4]).reshape([b, c * kh * kw, gh * gw])
    };
    (p, [gh, gw])
}

/// Patch convolution (`Conv2d` with kernel == stride, no padding) as a matrix product:
/// `out[b, o, i, j] = sum_{c, ki, kj} x[b, c, i*kh + ki, j*kw + kj] * W[o, c, ki, kj] + bias[o]`.
/// `weight`: `[c_out, c_in, kh, kw]` (PyTorch's layout). Returns `[b, c_out, h / kh, w / kw]`.
pub fn patch_conv2d<B: Backend>(x: Tensor<B, 4>, weight: Tensor<B, 4>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 4> {
    let [b, _, _, _] = x.dims();
    let [cout, cin, kh, kw] = weight.dims();
    let (p, [gh, gw]) = patches_cf(x, kh, kw);
    let y = weight.reshape([cout, cin * kh * kw]).unsqueeze::<3>().matmul(p);
    let y = match bias {
        Some(bias) => y + bias.reshape([1, cout, 1]),
        None => y,
    };
    y.reshape([b, cout, gh, gw])
}

/// [`patch_conv2d`] returning channels-last tokens `[b, gh * gw, c_out]` (row-major patch
/// order), the layout a ViT consumes next, without an NCHW round trip.
pub fn patch_conv2d_tokens<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
) -> (Tensor<B, 3>, [usize; 2]) {
    let [b, c, h, w] = x.dims();
    let [cout, cin, kh, kw] = weight.dims();
    let (gh, gw) = (h / kh, w / kw);
    let x = if gh * kh != h || gw * kw != w { x.slice([0..b, 0..c, 0..gh * kh, 0..gw * kw]) } else { x };
    let p = x.reshape([b, c, gh, kh, gw, kw]).permute([0, 2, 4, 1, 3, 5]).reshape([b, gh * gw, c * kh * kw]);
    let y = p.matmul(weight.reshape([cout, cin * kh * kw]).transpose().unsqueeze::<3>());
    let y = match bias {
        Some(bias) => y + bias.reshape([1, 1, cout]),
        None => y,
    };
    (y, [gh, gw])
}

/// Non-overlapping transposed convolution (`ConvTranspose2d` with kernel == stride, no
/// padding) as a matrix product plus a pixel shuffle:
/// `out[b, o, i*kh + ki, j*kw + kj] = sum_c x[b, c, i, j] * W[c, o, ki, kj] + bias[o]`.
/// `weight`: `[c_in, c_out, kh, kw]` (PyTorch's layout). Returns `[b, c_out, h*kh, w*kw]`.
pub fn patch_conv_transpose2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    // A transposed view: the matrix products of every backend read strided operands.
    let tokens = x.reshape([b, c, h * w]).swap_dims(1, 2);
    patch_conv_transpose2d_tokens(tokens, h, w, weight, bias)
}

/// [`patch_conv_transpose2d`] of a channels-last grid `tokens` `[b, h * w, c_in]`.
pub fn patch_conv_transpose2d_tokens<B: Backend>(
    tokens: Tensor<B, 3>,
    h: usize,
    w: usize,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, 4> {
    let [b, _, _] = tokens.dims();
    let [cin, cout, kh, kw] = weight.dims();
    let y = tokens.matmul(weight.reshape([cin, cout * kh * kw]).unsqueeze::<3>());
    // The bias is added before the pixel shuffle, as one shared row of `cout * kh * kw` values
    // (each channel's bias repeated over its kernel cells): the CPU backend's contiguous
    // broadcast path; after the shuffle, `[1, cout, 1, 1]` over `[b, cout, H, W]` took its
    // generic strided iterator (issue 21). The same values.
    let y = match bias {
        Some(bias) => y + bias.reshape([cout, 1]).repeat_dim(1, kh * kw).reshape([1, 1, cout * kh * kw]),
        None => y,
    };
    // [b, h, w, o, ki, kj] -> [b, o, h, ki, w, kj]: the one copy (the pixel shuffle).
    y.reshape([b, h, w, cout, kh, kw]).permute([0, 3, 1, 4, 2, 5]).reshape([b, cout, h * kh, w * kw])
}

/// `ConvTranspose2d(cin, cout, kernel_size=2, stride=2)` as a sequential entry.
pub fn conv_transpose_2x2<B: Backend>(cin: usize, cout: usize, device: &B::Device) -> SeqLayer<B> {
    SeqLayer::ConvTranspose(ConvTranspose2dConfig::new([cin, cout], [2, 2]).with_stride([2, 2]).init(device))
}

/// `Conv2d(cin, cout, kernel_size=k, stride=k)` (SAM's mask downscaling) as a sequential entry.
pub fn conv_kxk_stride_k<B: Backend>(cin: usize, cout: usize, k: usize, device: &B::Device) -> SeqLayer<B> {
    SeqLayer::Conv(Conv2dConfig::new([cin, cout], [k, k]).with_stride([k, k]).init(device))
}

/// `MLPBlock` of SAM's common.py: `lin2(act(lin1(x)))`.
#[derive(Module, Debug)]
pub struct MlpBlock<B: Backend> {
    pub lin1: Linear<B>,
    pub lin2: Linear<B>,
    #[module(skip)]
    pub act: SamActivation,
}

impl<B: Backend> MlpBlock<B> {
    pub fn new(dim: usize, mlp_dim: usize, act: SamActivation, device: &B::Device) -> Self {
        Self {
            lin1: LinearConfig::new(dim, mlp_dim).init(device),
            lin2: LinearConfig::new(mlp_dim, dim).init(device),
            act,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.lin2.forward(self.act.apply(self.lin1.forward(x)))
    }
}

/// SAM's `Attention`: multi-head attention whose q/k/v projections map to
/// `embedding_dim / downsample_rate` channels (the cross attentions use rate 2).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub num_heads: usize,
}

impl<B: Backend> Attention<B> {
    /// Fails when `num_heads` does not divide `embedding_dim / downsample_rate`.
    pub fn new(embedding_dim: usize, num_heads: usize, downsample_rate: usize, device: &B::Device) -> Result<Self> {
        if downsample_rate == 0 || num_heads == 0 {
            return Err(SamError::Config("attention num_heads and downsample_rate must be positive".into()));
        }
        let internal = embedding_dim / downsample_rate;
        if internal == 0 || !internal.is_multiple_of(num_heads) {
            return Err(SamError::Config(format!(
                "num_heads {num_heads} must divide embedding_dim / downsample_rate = \
                 {embedding_dim} / {downsample_rate} = {internal}"
            )));
        }
        Ok(Self {
            q_proj: LinearConfig::new(embedding_dim, internal).init(device),
            k_proj: LinearConfig::new(embedding_dim, internal).init(device),
            v_proj: LinearConfig::new(embedding_dim, internal).init(device),
            out_proj: LinearConfig::new(internal, embedding_dim).init(device),
            num_heads,
        })
    }

    /// `q`: `[b, nq, c]`, `k`, `v`: `[b, nk, c]` -> `[b, nq, c]`.
    pub fn forward(&self, q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.num_heads;
        let heads = |x: Tensor<B, 3>| {
            let [b, n, c] = x.dims();
            x.reshape([b, n, h, c / h]).swap_dims(1, 2)
        };
        let q = heads(self.q_proj.forward(q));
        let k = heads(self.k_proj.forward(k));
        let v = heads(self.v_proj.forward(v));
        let [b, _, nq, d] = q.dims();
        let attn = softmax(q.matmul(k.swap_dims(2, 3)) / (d as f64).sqrt(), 3);
        let out = attn.matmul(v).swap_dims(1, 2).reshape([b, nq, h * d]);
        self.out_proj.forward(out)
    }
}

/// SAM's `TwoWayAttentionBlock`: token self-attention, token->image cross attention, MLP on
/// the tokens, image->token cross attention, each followed by a LayerNorm.
#[derive(Module, Debug)]
pub struct TwoWayAttentionBlock<B: Backend> {
    pub self_attn: Attention<B>,
    pub norm1: LayerNorm<B>,
    pub cross_attn_token_to_image: Attention<B>,
    pub norm2: LayerNorm<B>,
    pub mlp: MlpBlock<B>,
    pub norm3: LayerNorm<B>,
    pub norm4: LayerNorm<B>,
    pub cross_attn_image_to_token: Attention<B>,
    pub skip_first_layer_pe: bool,
}

impl<B: Backend> TwoWayAttentionBlock<B> {
    /// Returns the new `(queries, keys)`.
    pub fn forward(
        &self,
        queries: Tensor<B, 3>,
        keys: Tensor<B, 3>,
        query_pe: Tensor<B, 3>,
        key_pe: Tensor<B, 3>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries.clone(), queries.clone(), queries)
        } else {
            let q = queries.clone() + query_pe.clone();
            queries.clone() + self.self_attn.forward(q.clone(), q, queries)
        };
        let queries = self.norm1.forward(queries);

        let q = queries.clone() + query_pe.clone();
        let k = add_pe(keys.clone(), &key_pe);
        let queries = queries + self.cross_attn_token_to_image.forward(q, k, keys.clone());
        let queries = self.norm2.forward(queries);

        let queries = queries.clone() + self.mlp.forward(queries);
        let queries = self.norm3.forward(queries);

        let q = queries.clone() + query_pe;
        let k = add_pe(keys.clone(), &key_pe);
        let keys = keys + self.cross_attn_image_to_token.forward(k, q, queries.clone());
        let keys = self.norm4.forward(keys);
        (queries, keys)
    }
}

/// `x [b, n, c] + pe [b or 1, n, c]`. A batch-1 `pe` is added as one shared row of `n * c`
/// values (`[b, n * c] + [1, n * c]`), a broadcast the CPU backend runs on its contiguous SIMD
/// path; `[b, n, c] + [1, n, c]` with the batch broadcast outermost took its generic strided
/// iterator (issue 21). The same values either way.
fn add_pe<B: Backend>(x: Tensor<B, 3>, pe: &Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, n, c] = x.dims();
    if pe.dims()[0] == 1 && b > 1 {
        (x.reshape([b, n * c]) + pe.clone().reshape([1, n * c])).reshape([b, n, c])
    } else {
        x + pe.clone()
    }
}

/// Hyper-parameters of SAM's `TwoWayTransformer` (defaults: SAM's mask decoder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TwoWayTransformerConfig {
    pub depth: usize,
    pub embedding_dim: usize,
    pub num_heads: usize,
    pub mlp_dim: usize,
    pub activation: SamActivation,
    pub attention_downsample_rate: usize,
}

impl Default for TwoWayTransformerConfig {
    fn default() -> Self {
        Self {
            depth: 2,
            embedding_dim: 256,
            num_heads: 8,
            mlp_dim: 2048,
            activation: SamActivation::Relu,
            attention_downsample_rate: 2,
        }
    }
}

impl TwoWayTransformerConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<TwoWayTransformer<B>> {
        let d = self.embedding_dim;
        let ln = || LayerNormConfig::new(d).init(device);
        let layers = (0..self.depth)
            .map(|i| {
                Ok(TwoWayAttentionBlock {
                    self_attn: Attention::new(d, self.num_heads, 1, device)?,
                    norm1: ln(),
                    cross_attn_token_to_image: Attention::new(
                        d,
                        self.num_heads,
                        self.attention_downsample_rate,
                        device,
                    )?,
                    norm2: ln(),
                    mlp: MlpBlock::new(d, self.mlp_dim, self.activation, device),
                    norm3: ln(),
                    norm4: ln(),
                    cross_attn_image_to_token: Attention::new(
                        d,
                        self.num_heads,
                        self.attention_downsample_rate,
                        device,
                    )?,
                    skip_first_layer_pe: i == 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TwoWayTransformer {
            layers,
            final_attn_token_to_image: Attention::new(d, self.num_heads, self.attention_downsample_rate, device)?,
            norm_final_attn: ln(),
            embedding_dim: d,
        })
    }
}

/// SAM's `TwoWayTransformer`: prompt tokens (queries) and image positions (keys) attend to
/// each other `depth` times, then a final token->image attention.
#[derive(Module, Debug)]
pub struct TwoWayTransformer<B: Backend> {
    pub layers: Vec<TwoWayAttentionBlock<B>>,
    pub final_attn_token_to_image: Attention<B>,
    pub norm_final_attn: LayerNorm<B>,
    pub embedding_dim: usize,
}

impl<B: Backend> TwoWayTransformer<B> {
    /// `image_embedding`: `[b, c, h, w]`; `image_pe`: `[b or 1, c, h, w]`;
    /// `point_embedding`: `[b, n, c]`. Returns `(queries [b, n, c], keys [b, h*w, c])`.
    pub fn forward(
        &self,
        image_embedding: Tensor<B, 4>,
        image_pe: Tensor<B, 4>,
        point_embedding: Tensor<B, 3>,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 3>)> {
        let [b, c, h, w] = image_embedding.dims();
        let [pb, pc, ph, pw] = image_pe.dims();
        let [qb, n, qc] = point_embedding.dims();
        if c != self.embedding_dim {
            return shape_err(format!(
                "image_embedding has {c} channels, the transformer has embedding_dim {}",
                self.embedding_dim
            ));
        }
        if (pb != b && pb != 1) || pc != c || ph != h || pw != w {
            return shape_err(format!("image_pe is {:?}, expected [{b} or 1, {c}, {h}, {w}]", [pb, pc, ph, pw]));
        }
        if qb != b || qc != c || n == 0 {
            return shape_err(format!("point_embedding is {:?}, expected [{b}, n >= 1, {c}]", [qb, n, qc]));
        }
        let keys = image_embedding.reshape([b, c, h * w]).swap_dims(1, 2);
        // `[pb, h*w, c]`, made contiguous once (the reshape of the transposed view copies);
        // a batch-1 encoding broadcasts in the additions below ([`add_pe`]).
        let key_pe = image_pe.reshape([pb, c, h * w]).swap_dims(1, 2).reshape([pb, h * w * c]).reshape([pb, h * w, c]);
        let mut queries = point_embedding.clone();
        let mut keys = keys;
        for layer in &self.layers {
            (queries, keys) = layer.forward(queries, keys, point_embedding.clone(), key_pe.clone());
        }
        let q = queries.clone() + point_embedding;
        let k = add_pe(keys.clone(), &key_pe);
        let queries = queries + self.final_attn_token_to_image.forward(q, k, keys.clone());
        Ok((self.norm_final_attn.forward(queries), keys))
    }
}

/// SAM's `PositionEmbeddingRandom`: random Fourier features of normalised (x, y)
/// coordinates. The Gaussian matrix is a buffer in PyTorch (loaded from checkpoints, never
/// trained), here a parameter without gradient.
#[derive(Module, Debug)]
pub struct PositionEmbeddingRandom<B: Backend> {
    /// `[2, num_pos_feats]`.
    pub positional_encoding_gaussian_matrix: Param<Tensor<B, 2>>,
}

impl<B: Backend> PositionEmbeddingRandom<B> {
    /// `scale * N(0, 1)` like PyTorch (scale 1 when `None` or <= 0).
    pub fn new(num_pos_feats: usize, scale: Option<f64>, device: &B::Device) -> Self {
        let scale = scale.filter(|s| *s > 0.0).unwrap_or(1.0);
        let g = Tensor::<B, 2>::random([2, num_pos_feats], Distribution::Normal(0.0, 1.0), device) * scale;
        Self { positional_encoding_gaussian_matrix: Param::from_tensor(g).set_require_grad(false) }
    }

    /// Channels of the encoding (`2 * num_pos_feats`).
    pub fn channels(&self) -> usize {
        2 * self.positional_encoding_gaussian_matrix.dims()[1]
    }

    /// Encode coordinates normalised to [0, 1]: `[..., 2]` (x, y) -> `[..., channels]`.
    fn pe_encoding<const D: usize>(&self, coords: Tensor<B, D>) -> Tensor<B, D> {
        let g = self.positional_encoding_gaussian_matrix.val();
        let f = g.dims()[1];
        let mut dims = coords.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let c = (coords * 2.0 - 1.0).reshape([rows, 2]).matmul(g) * (2.0 * std::f64::consts::PI);
        let out = Tensor::cat(vec![c.clone().sin(), c.cos()], 1);
        dims[D - 1] = 2 * f;
        out.reshape(dims)
    }

    /// Encoding of the pixel centres of an `h x w` grid: `[channels, h, w]`.
    pub fn forward(&self, h: usize, w: usize) -> Tensor<B, 3> {
        let device = self.positional_encoding_gaussian_matrix.val().device();
        let mut xy = Vec::with_capacity(h * w * 2);
        for i in 0..h {
            for j in 0..w {
                // f32 like PyTorch: (cumsum - 0.5) / size
                xy.push(((j + 1) as f32 - 0.5) / w as f32);
                xy.push(((i + 1) as f32 - 0.5) / h as f32);
            }
        }
        let coords = Tensor::<B, 3>::from_data(TensorData::new(xy, [h, w, 2]), &device);
        self.pe_encoding(coords).permute([2, 0, 1])
    }

    /// Encode pixel coordinates `[b, n, 2]` (x, y) of an image of `image_hw` = (h, w):
    /// `[b, n, channels]`.
    pub fn forward_with_coords(&self, coords: Tensor<B, 3>, image_hw: (usize, usize)) -> Tensor<B, 3> {
        let device = coords.device();
        let inv = Tensor::<B, 1>::from_data(
            TensorData::new(vec![1.0 / image_hw.1 as f32, 1.0 / image_hw.0 as f32], [2]),
            &device,
        );
        let [b, n, _] = coords.dims();
        self.pe_encoding(coords * inv.reshape([1, 1, 2]).expand([b, n, 2]))
    }
}

/// SAM's n-layer `MLP` (ReLU between layers, optional sigmoid on the output).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub layers: Vec<Linear<B>>,
    pub sigmoid_output: bool,
}

impl<B: Backend> Mlp<B> {
    pub fn new(
        input_dim: usize,
        hidden_dim: usize,
        output_dim: usize,
        num_layers: usize,
        sigmoid_output: bool,
        device: &B::Device,
    ) -> Self {
        let layers = (0..num_layers)
            .map(|i| {
                let n = if i == 0 { input_dim } else { hidden_dim };
                let k = if i + 1 == num_layers { output_dim } else { hidden_dim };
                LinearConfig::new(n, k).init(device)
            })
            .collect();
        Self { layers, sigmoid_output }
    }

    pub fn forward<const D: usize>(&self, mut x: Tensor<B, D>) -> Tensor<B, D> {
        let last = self.layers.len().saturating_sub(1);
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward(x);
            if i < last {
                x = relu(x);
            }
        }
        if self.sigmoid_output {
            sigmoid(x)
        } else {
            x
        }
    }
}

/// Hyper-parameters of SAM's `PromptEncoder` (defaults: SAM with a 1024 input, 64x64 grid).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptEncoderConfig {
    pub embed_dim: usize,
    /// `(h, w)` of the image embedding grid.
    pub image_embedding_size: (usize, usize),
    /// `(h, w)` of the padded model input, in pixels (point/box coordinates refer to it).
    pub input_image_size: (usize, usize),
    pub mask_in_chans: usize,
}

impl Default for PromptEncoderConfig {
    fn default() -> Self {
        Self { embed_dim: 256, image_embedding_size: (64, 64), input_image_size: (1024, 1024), mask_in_chans: 16 }
    }
}

impl PromptEncoderConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<PromptEncoder<B>> {
        if self.embed_dim < 2 || !self.embed_dim.is_multiple_of(2) {
            return Err(SamError::Config(format!("prompt encoder embed_dim {} must be even", self.embed_dim)));
        }
        if self.mask_in_chans < 4 || !self.mask_in_chans.is_multiple_of(4) {
            return Err(SamError::Config(format!(
                "mask_in_chans {} must be a positive multiple of 4",
                self.mask_in_chans
            )));
        }
        let d = self.embed_dim;
        let m = self.mask_in_chans;
        let emb = |n| EmbeddingConfig::new(n, d).init(device);
        Ok(PromptEncoder {
            pe_layer: PositionEmbeddingRandom::new(d / 2, None, device),
            point_embeddings: (0..4).map(|_| emb(1)).collect(),
            not_a_point_embed: emb(1),
            mask_downscaling: vec![
                conv_kxk_stride_k(1, m / 4, 2, device),
                SeqLayer::Norm(LayerNorm2d::new(m / 4, device)),
                SeqLayer::Gelu(Gelu::new()),
                conv_kxk_stride_k(m / 4, m, 2, device),
                SeqLayer::Norm(LayerNorm2d::new(m, device)),
                SeqLayer::Gelu(Gelu::new()),
                conv_kxk_stride_k(m, d, 1, device),
            ],
            no_mask_embed: emb(1),
            embed_dim: d,
            image_embedding_size: [self.image_embedding_size.0, self.image_embedding_size.1],
            input_image_size: [self.input_image_size.0, self.input_image_size.1],
        })
    }
}

/// SAM's `PromptEncoder`, with LISA/PixelLM's `text_embeds` (extra sparse tokens appended
/// after points and boxes).
#[derive(Module, Debug)]
pub struct PromptEncoder<B: Backend> {
    pub pe_layer: PositionEmbeddingRandom<B>,
    /// Negative point, positive point, box corner 1, box corner 2.
    pub point_embeddings: Vec<Embedding<B>>,
    pub not_a_point_embed: Embedding<B>,
    pub mask_downscaling: Vec<SeqLayer<B>>,
    pub no_mask_embed: Embedding<B>,
    pub embed_dim: usize,
    pub image_embedding_size: [usize; 2],
    pub input_image_size: [usize; 2],
}

/// Point prompts: coordinates `[b, n, 2]` (x, y in input pixels) and labels `[b, n]`
/// (1 foreground, 0 background, -1 padding).
pub type PointPrompts<B> = (Tensor<B, 3>, Tensor<B, 2>);

impl<B: Backend> PromptEncoder<B> {
    /// Dense positional encoding of the image embedding grid: `[1, embed_dim, h, w]`.
    pub fn get_dense_pe(&self) -> Tensor<B, 4> {
        let [h, w] = self.image_embedding_size;
        self.pe_layer.forward(h, w).unsqueeze::<4>()
    }

    /// The dense prompt used when there is no mask input: `no_mask_embed` broadcast to
    /// `[bs, embed_dim, h, w]`.
    pub fn no_mask_dense(&self, bs: usize, h: usize, w: usize) -> Tensor<B, 4> {
        self.no_mask_embed.weight.val().reshape([1, self.embed_dim, 1, 1]).expand([bs, self.embed_dim, h, w])
    }

    /// Box prompts `[n, 4]` (x0, y0, x1, y1 in input pixels, the frame of
    /// `get_dense_pe`'s cell centers) embedded as SAM does: two corner tokens,
    /// `[n, 2, embed_dim]`.
    pub fn box_prompts(&self, boxes: Tensor<B, 2>) -> Tensor<B, 3> {
        // `_embed_boxes` shifts by half a pixel to the pixel center: undo it.
        self.embed_boxes(boxes - 0.5)
    }

    fn embed_weight(e: &Embedding<B>) -> Tensor<B, 2> {
        e.weight.val()
    }

    fn embed_points(&self, coords: Tensor<B, 3>, labels: Tensor<B, 2>, pad: bool) -> Tensor<B, 3> {
        let [b, n, _] = coords.dims();
        let device = coords.device();
        let (coords, labels, n) = if pad {
            (
                Tensor::cat(vec![coords + 0.5, Tensor::zeros([b, 1, 2], &device)], 1),
                Tensor::cat(vec![labels, Tensor::full([b, 1], -1.0, &device)], 1),
                n + 1,
            )
        } else {
            (coords + 0.5, labels, n)
        };
        let d = self.embed_dim;
        let [ih, iw] = self.input_image_size;
        let pe = self.pe_layer.forward_with_coords(coords, (ih, iw));
        let expand = |m: Tensor<B, 2, Bool>| m.reshape([b, n, 1]).expand([b, n, d]);
        let row = |e: &Embedding<B>| Self::embed_weight(e).reshape([1, 1, d]).expand([b, n, d]);
        let pad_mask = expand(labels.clone().equal_elem(-1.0));
        let pe = pe.mask_where(pad_mask, row(&self.not_a_point_embed));
        let neg = labels.clone().equal_elem(0.0).float().reshape([b, n, 1]).expand([b, n, d]);
        let pos = labels.equal_elem(1.0).float().reshape([b, n, 1]).expand([b, n, d]);
        pe + neg * row(&self.point_embeddings[0]) + pos * row(&self.point_embeddings[1])
    }

    fn embed_boxes(&self, boxes: Tensor<B, 2>) -> Tensor<B, 3> {
        let [b, _] = boxes.dims();
        let d = self.embed_dim;
        let [ih, iw] = self.input_image_size;
        let corners = self.pe_layer.forward_with_coords((boxes + 0.5).reshape([b, 2, 2]), (ih, iw));
        let add = Tensor::cat(
            vec![Self::embed_weight(&self.point_embeddings[2]), Self::embed_weight(&self.point_embeddings[3])],
            0,
        );
        corners + add.reshape([1, 2, d]).expand([b, 2, d])
    }

    /// Returns `(sparse [b, n, embed_dim], dense [b, embed_dim, h, w])` like SAM (points are
    /// padded with one not-a-point when there are no boxes). `masks`: `[b, 1, 4h, 4w]`
    /// logits; `text_embeds`: `[b, t, embed_dim]`. The batch size is taken from the first
    /// prompt present, as SAM does (1 when none).
    pub fn forward(
        &self,
        points: Option<PointPrompts<B>>,
        boxes: Option<Tensor<B, 2>>,
        masks: Option<Tensor<B, 4>>,
        text_embeds: Option<Tensor<B, 3>>,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 4>)> {
        let d = self.embed_dim;
        let bs = points
            .as_ref()
            .map(|p| p.0.dims()[0])
            .or(boxes.as_ref().map(|b| b.dims()[0]))
            .or(masks.as_ref().map(|m| m.dims()[0]))
            .or(text_embeds.as_ref().map(|t| t.dims()[0]))
            .unwrap_or(1);
        let device = self.no_mask_embed.weight.device();
        let mut parts = Vec::new();
        let has_boxes = boxes.is_some();
        if let Some((coords, labels)) = points {
            let [cb, cn, c2] = coords.dims();
            if cb != bs || c2 != 2 || labels.dims() != [cb, cn] {
                return shape_err(format!(
                    "points: coords {:?} and labels {:?}, expected [{bs}, n, 2] and [{bs}, n]",
                    [cb, cn, c2],
                    labels.dims()
                ));
            }
            parts.push(self.embed_points(coords, labels, !has_boxes));
        }
        if let Some(boxes) = boxes {
            if boxes.dims() != [bs, 4] {
                return shape_err(format!("boxes {:?}, expected [{bs}, 4]", boxes.dims()));
            }
            parts.push(self.embed_boxes(boxes));
        }
        if let Some(t) = text_embeds {
            let [tb, _, td] = t.dims();
            if tb != bs || td != d {
                return shape_err(format!("text_embeds {:?}, expected [{bs}, t, {d}]", t.dims()));
            }
            parts.push(t);
        }
        let parts: Vec<_> = parts.into_iter().filter(|p| p.dims()[1] > 0).collect();
        let sparse = if parts.is_empty() { Tensor::zeros([bs, 0, d], &device) } else { Tensor::cat(parts, 1) };
        let [h, w] = self.image_embedding_size;
        let dense = match masks {
            Some(m) => {
                if m.dims() != [bs, 1, 4 * h, 4 * w] {
                    return shape_err(format!("masks {:?}, expected [{bs}, 1, {}, {}]", m.dims(), 4 * h, 4 * w));
                }
                seq_forward(&self.mask_downscaling, m)
            }
            None => self.no_mask_dense(bs, h, w),
        };
        Ok((sparse, dense))
    }
}

/// Hyper-parameters of SAM's standard `MaskDecoder` (defaults: SAM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MaskDecoderConfig {
    pub transformer_dim: usize,
    pub transformer: TwoWayTransformerConfig,
    pub num_multimask_outputs: usize,
    pub iou_head_depth: usize,
    pub iou_head_hidden_dim: usize,
}

impl Default for MaskDecoderConfig {
    fn default() -> Self {
        Self {
            transformer_dim: 256,
            transformer: TwoWayTransformerConfig::default(),
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 256,
        }
    }
}

impl MaskDecoderConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<MaskDecoder<B>> {
        let d = self.transformer_dim;
        if !d.is_multiple_of(8) || d != self.transformer.embedding_dim {
            return Err(SamError::Config(format!(
                "transformer_dim {d} must be a multiple of 8 and equal transformer.embedding_dim {}",
                self.transformer.embedding_dim
            )));
        }
        let m = self.num_multimask_outputs + 1;
        Ok(MaskDecoder {
            transformer: self.transformer.init(device)?,
            iou_token: EmbeddingConfig::new(1, d).init(device),
            mask_tokens: EmbeddingConfig::new(m, d).init(device),
            output_upscaling: vec![
                conv_transpose_2x2(d, d / 4, device),
                SeqLayer::Norm(LayerNorm2d::new(d / 4, device)),
                SeqLayer::Gelu(Gelu::new()),
                conv_transpose_2x2(d / 4, d / 8, device),
                SeqLayer::Gelu(Gelu::new()),
            ],
            output_hypernetworks_mlps: (0..m).map(|_| Mlp::new(d, d, d / 8, 3, false, device)).collect(),
            iou_prediction_head: Mlp::new(d, self.iou_head_hidden_dim, m, self.iou_head_depth, false, device),
            transformer_dim: d,
            num_multimask_outputs: self.num_multimask_outputs,
        })
    }
}

/// SAM's standard `MaskDecoder`: one two-way transformer, x4 upscaling, one hypernetwork MLP
/// per mask token and an IoU head.
#[derive(Module, Debug)]
pub struct MaskDecoder<B: Backend> {
    pub transformer: TwoWayTransformer<B>,
    pub iou_token: Embedding<B>,
    pub mask_tokens: Embedding<B>,
    pub output_upscaling: Vec<SeqLayer<B>>,
    pub output_hypernetworks_mlps: Vec<Mlp<B>>,
    pub iou_prediction_head: Mlp<B>,
    pub transformer_dim: usize,
    pub num_multimask_outputs: usize,
}

/// `iou_token` and `mask_tokens` stacked and broadcast to `[b, 1 + m, dim]`, followed by the
/// sparse prompts (SAM's output tokens).
pub(crate) fn output_tokens<B: Backend>(
    iou_token: &Embedding<B>,
    mask_tokens: &Embedding<B>,
    sparse: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let [b, n, d] = sparse.dims();
    let t = Tensor::cat(vec![iou_token.weight.val(), mask_tokens.weight.val()], 0);
    let k = t.dims()[0];
    let t = t.unsqueeze::<3>().expand([b, k, d]);
    if n == 0 {
        t
    } else {
        Tensor::cat(vec![t, sparse], 1)
    }
}

/// Masks from the upscaled image embedding `[b, c, H, W]` and the hypernetwork outputs of
/// the selected mask tokens `[b, k, c]`: `[b, k, H, W]`.
pub(crate) fn hyper_masks<B: Backend>(hyper_in: Tensor<B, 3>, upscaled: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, c, h, w] = upscaled.dims();
    let k = hyper_in.dims()[1];
    hyper_in.matmul(upscaled.reshape([b, c, h * w])).reshape([b, k, h, w])
}

/// Broadcast a `[1, c, h, w]` image tensor to `b` (SAM's `repeat_interleave` over the
/// prompts of one image); `[b, c, h, w]` passes through.
fn per_prompt<B: Backend>(x: Tensor<B, 4>, b: usize, what: &str) -> Result<Tensor<B, 4>> {
    let [xb, c, h, w] = x.dims();
    if xb == b {
        Ok(x)
    } else if xb == 1 {
        Ok(x.expand([b, c, h, w]))
    } else {
        shape_err(format!("{what} has batch {xb}, expected 1 or {b}"))
    }
}

impl<B: Backend> MaskDecoder<B> {
    /// SAM's `MaskDecoder.forward`. `image_embeddings`: `[1 or b, dim, h, w]`; `image_pe`:
    /// `[1, dim, h, w]`; `sparse`: `[b, n, dim]`; `dense`: `[b, dim, h, w]`. Returns masks
    /// `[b, k, 4h, 4w]` and IoU predictions `[b, k]`, with k = `num_multimask_outputs`
    /// (tokens 1..) when `multimask_output`, else 1 (token 0).
    pub fn forward(
        &self,
        image_embeddings: Tensor<B, 4>,
        image_pe: Tensor<B, 4>,
        sparse: Tensor<B, 3>,
        dense: Tensor<B, 4>,
        multimask_output: bool,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 2>)> {
        let [b, _, d] = sparse.dims();
        let [_, c, h, w] = image_embeddings.dims();
        if d != self.transformer_dim || c != d || dense.dims() != [b, d, h, w] {
            return shape_err(format!(
                "mask decoder inputs: image_embeddings {:?}, sparse {:?}, dense {:?}; \
                 expected [1 or b, {dim}, h, w], [b, n, {dim}], [b, {dim}, h, w]",
                image_embeddings.dims(),
                sparse.dims(),
                dense.dims(),
                dim = self.transformer_dim
            ));
        }
        let tokens = output_tokens(&self.iou_token, &self.mask_tokens, sparse);
        let src = per_prompt(image_embeddings, b, "image_embeddings")? + dense;
        // The transformer broadcasts a batch-1 position encoding itself (no per-prompt copy).
        let (hs, src) = self.transformer.forward(src, image_pe, tokens)?;
        let m = self.num_multimask_outputs + 1;
        let iou_token_out = hs.clone().slice([0..b, 0..1, 0..d]).reshape([b, d]);
        let upscaled = seq_forward_tokens(&self.output_upscaling, src, h, w);
        let range = if multimask_output { 1..m } else { 0..1 };
        let hyper: Vec<_> = range
            .clone()
            .map(|i| {
                let t = hs.clone().slice([0..b, 1 + i..2 + i, 0..d]);
                self.output_hypernetworks_mlps[i].forward(t)
            })
            .collect();
        let masks = hyper_masks(Tensor::cat(hyper, 1), upscaled);
        let iou = self.iou_prediction_head.forward(iou_token_out);
        let iou = iou.slice([0..b, range]);
        Ok((masks, iou))
    }
}

/// Bilinear interpolation matrix `[out, in]` of PyTorch's `F.interpolate(mode="bilinear",
/// align_corners=False)` along one axis (half-pixel centres, negative source clamped to 0,
/// the upper neighbour clamped to the last pixel).
///
/// An empty source axis (`n_in == 0`, e.g. a 100000x1 image whose short side rounds to 0
/// pixels at SAM's input size) has nothing to interpolate from: an error, not a panic.
pub fn interp_matrix(n_in: usize, n_out: usize) -> Result<Vec<f32>> {
    if n_in == 0 && n_out > 0 {
        return shape_err(format!(
            "bilinear resize of an empty axis (0 -> {n_out} pixels): the image has a side of 0 pixels at this size"
        ));
    }
    Ok(bilinear_weights(n_in, n_out))
}

/// [`interp_matrix`] without the check: `n_in == 0` gives the (empty) `[n_out, 0]` matrix.
fn bilinear_weights(n_in: usize, n_out: usize) -> Vec<f32> {
    let mut m = vec![0f32; n_out * n_in];
    if n_in == 0 {
        return m;
    }
    let scale = n_in as f32 / n_out as f32;
    for o in 0..n_out {
        let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let l1 = src - i0 as f32;
        m[o * n_in + i0] += 1.0 - l1;
        m[o * n_in + i1] += l1;
    }
    m
}

/// `F.interpolate(x, (out_h, out_w), mode="bilinear", align_corners=False)` for `[b, c, h,
/// w]`, as two matrix products so that gradients flow on every backend. Same size is the
/// identity (as in PyTorch). Panics never: zero-sized inputs give zero-sized outputs.
pub fn resize_bilinear<B: Backend>(x: Tensor<B, 4>, out_h: usize, out_w: usize) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    if (h, w) == (out_h, out_w) || b * c == 0 || h == 0 || w == 0 {
        if (h, w) == (out_h, out_w) {
            return x;
        }
        return Tensor::zeros([b, c, out_h, out_w], &x.device());
    }
    let device = x.device();
    // Both products broadcast the interpolation matrix (no per-channel copies of it).
    let x = if w != out_w {
        let mw = Tensor::<B, 2>::from_data(TensorData::new(bilinear_weights(w, out_w), [out_w, w]), &device);
        x.reshape([b * c * h, w]).matmul(mw.transpose()).reshape([b, c, h, out_w])
    } else {
        x
    };
    if h != out_h {
        let mh = Tensor::<B, 2>::from_data(TensorData::new(bilinear_weights(h, out_h), [out_h, h]), &device);
        mh.unsqueeze::<3>().matmul(x.reshape([b * c, h, out_w])).reshape([b, c, out_h, out_w])
    } else {
        x
    }
}

/// SAM's `postprocess_masks` generalised to PixelLM's: upsample `[b, c, h, w]` logits to
/// the padded `input_size` square, crop the valid `resized_hw` top-left region, resize to
/// `original_hw`.
pub fn postprocess_masks<B: Backend>(
    masks: Tensor<B, 4>,
    input_size: usize,
    resized_hw: (usize, usize),
    original_hw: (usize, usize),
) -> Result<Tensor<B, 4>> {
    let [b, c, _, _] = masks.dims();
    if resized_hw.0 == 0
        || resized_hw.1 == 0
        || resized_hw.0 > input_size
        || resized_hw.1 > input_size
        || original_hw.0 == 0
        || original_hw.1 == 0
    {
        return shape_err(format!(
            "postprocess: resized size {resized_hw:?} must be non-empty and fit the padded \
             input {input_size}x{input_size}; original size {original_hw:?} must be non-empty"
        ));
    }
    let up = resize_bilinear(masks, input_size, input_size);
    let crop = up.slice([0..b, 0..c, 0..resized_hw.0, 0..resized_hw.1]);
    Ok(resize_bilinear(crop, original_hw.0, original_hw.1))
}

#[cfg(test)]
mod interp_tests {
    use super::*;

    /// Issue 20 item 4: `interp_matrix(0, n)` panicked (`n_in - 1` underflow, the old
    /// sam.rs:1179) for a 100000x1 image, whose short side rounds to 0 rows at 1024.
    #[test]
    fn interp_matrix_of_an_empty_axis_is_an_error() {
        let e = interp_matrix(0, 1).unwrap_err().to_string();
        assert!(e.contains("empty axis"), "{e}");
        assert_eq!(interp_matrix(0, 0).unwrap(), Vec::<f32>::new());
        // Reference (PyTorch bilinear, align_corners=False): 2 -> 4 is [1, 0], [.75, .25],
        // [.25, .75], [0, 1].
        assert_eq!(interp_matrix(2, 4).unwrap(), vec![1.0, 0.0, 0.75, 0.25, 0.25, 0.75, 0.0, 1.0]);
    }
}

#[cfg(test)]
mod tests {
    //! The matrix-product convolutions against burn's own convolution modules (the reference
    //! they replace): same outputs and same gradients for input, weight and bias.

    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::backend::AutodiffBackend;

    type Ad = Autodiff<NdArray>;

    fn rand4(shape: [usize; 4], dev: &Device<Ad>) -> Tensor<Ad, 4> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), dev).require_grad()
    }

    fn assert_close(what: &str, a: Vec<f32>, b: Vec<f32>) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "{what}[{i}]: {x} vs {y}");
        }
    }

    fn values<const D: usize>(t: Tensor<NdArray, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().expect("f32 data")
    }

    /// Run `fast` and `reference` on the same input, compare outputs, then the gradients
    /// of `sum(out * probe)` w.r.t. the input and every parameter returned by `params`.
    fn check<M: Module<Ad>>(
        what: &str,
        module: &M,
        x: Tensor<Ad, 4>,
        fast: impl Fn(&M, Tensor<Ad, 4>) -> Tensor<Ad, 4>,
        reference: impl Fn(&M, Tensor<Ad, 4>) -> Tensor<Ad, 4>,
        params: impl Fn(&M) -> Vec<(&'static str, Tensor<Ad, 4>)>,
        bias: impl Fn(&M) -> Option<Tensor<Ad, 1>>,
    ) {
        let a = fast(module, x.clone());
        let b = reference(module, x.clone());
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let probe = Tensor::<Ad, 4>::random(a.dims(), Distribution::Normal(0.0, 1.0), &x.device());
        assert_close(what, values(a.clone().inner()), values(b.clone().inner()));
        let ga = (a * probe.clone()).sum().backward();
        let gb = (b * probe).sum().backward();
        let grad4 = |g: &<Ad as AutodiffBackend>::Gradients, t: &Tensor<Ad, 4>| values(t.grad(g).expect("grad"));
        assert_close(&format!("{what} d/dx"), grad4(&ga, &x), grad4(&gb, &x));
        for (name, p) in params(module) {
            assert_close(&format!("{what} d/d{name}"), grad4(&ga, &p), grad4(&gb, &p));
        }
        if let Some(bias) = bias(module) {
            assert_close(
                &format!("{what} d/dbias"),
                values(bias.grad(&ga).expect("grad")),
                values(bias.grad(&gb).expect("grad")),
            );
        }
    }

    #[test]
    fn patch_conv_transpose_matches_burn() {
        let dev = Default::default();
        for (cin, cout, k, hw, bias) in [(6, 3, [2, 2], [4, 5], true), (4, 4, [3, 2], [2, 3], false)] {
            let m = ConvTranspose2dConfig::new([cin, cout], k).with_stride(k).with_bias(bias).init::<Ad>(&dev);
            assert!(is_patch_conv_transpose(&m));
            let x = rand4([2, cin, hw[0], hw[1]], &dev);
            check(
                "conv_transpose",
                &m,
                x,
                conv_transpose2d_forward,
                |m, x| m.forward(x),
                |m| vec![("weight", m.weight.val())],
                |m| m.bias.as_ref().map(|b| b.val()),
            );
        }
    }

    /// LayerNorm2d computed channels-last (issue 21) against SAM's formula over axis 1
    /// (`u = x.mean(1); s = (x - u)^2.mean(1); (x - u) / sqrt(s + eps) * w + b`, the plain
    /// broadcasts the old forward used): values and gradients of input, weight and bias.
    #[test]
    fn layer_norm2d_channels_last_matches_the_axis_1_formula() {
        let dev = Default::default();
        let mut m = LayerNorm2d::<Ad>::new(6, &dev);
        m.weight = Param::from_tensor(Tensor::random([6], Distribution::Normal(1.0, 0.5), &dev));
        m.bias = Param::from_tensor(Tensor::random([6], Distribution::Normal(0.0, 0.5), &dev));
        let plain = |x: Tensor<Ad, 4>| {
            let u = x.clone().mean_dim(1);
            let xc = x - u;
            let s = xc.clone().powi_scalar(2).mean_dim(1);
            let xn = xc / (s + m.eps).sqrt();
            xn * m.weight.val().reshape([1, 6, 1, 1]) + m.bias.val().reshape([1, 6, 1, 1])
        };
        let x = rand4([3, 6, 4, 5], &dev);
        let probe = Tensor::<Ad, 4>::random([3, 6, 4, 5], Distribution::Normal(0.0, 1.0), &dev);
        let (a, b) = (m.forward(x.clone()), plain(x.clone()));
        assert_close("layer_norm2d", values(a.clone().inner()), values(b.clone().inner()));
        let ga = (a * probe.clone()).sum().backward();
        let gb = (b * probe).sum().backward();
        assert_close("d/dx", values(x.grad(&ga).unwrap()), values(x.grad(&gb).unwrap()));
        for (name, p) in [("weight", m.weight.val()), ("bias", m.bias.val())] {
            assert_close(name, values(p.grad(&ga).unwrap()), values(p.grad(&gb).unwrap()));
        }
    }

    #[test]
    fn patch_conv_transpose_tokens_matches_nchw() {
        let dev = Default::default();
        let m = ConvTranspose2dConfig::new([5, 3], [2, 2]).with_stride([2, 2]).init::<Ad>(&dev);
        let layers = vec![SeqLayer::ConvTranspose(m), SeqLayer::Gelu(Gelu::new())];
        let x = rand4([2, 5, 3, 4], &dev);
        let tokens = x.clone().reshape([2, 5, 12]).swap_dims(1, 2);
        let a = seq_forward_tokens(&layers, tokens, 3, 4);
        let b = seq_forward(&layers, x);
        assert_close("tokens", values(a.inner()), values(b.inner()));
    }

    #[test]
    fn patch_conv_matches_burn() {
        let dev = Default::default();
        // The last case has a remainder (9 = 2 * 4 + 1), which a strided conv drops.
        for (cin, cout, k, hw, bias) in
            [(3, 4, [2, 2], [4, 6], true), (2, 5, [1, 1], [3, 3], true), (3, 4, [4, 4], [9, 8], false)]
        {
            let m = Conv2dConfig::new([cin, cout], k).with_stride(k).with_bias(bias).init::<Ad>(&dev);
            assert!(is_patch_conv(&m));
            let x = rand4([2, cin, hw[0], hw[1]], &dev);
            check(
                "conv",
                &m,
                x.clone(),
                conv2d_forward,
                |m, x| m.forward(x),
                |m| vec![("weight", m.weight.val())],
                |m| m.bias.as_ref().map(|b| b.val()),
            );
            // The token layout is the NCHW result flattened channels-last.
            let (t, [gh, gw]) = patch_conv2d_tokens(x.clone(), m.weight.val(), m.bias.as_ref().map(|b| b.val()));
            let nchw = m.forward(x);
            assert_eq!([gh, gw], [nchw.dims()[2], nchw.dims()[3]]);
            assert_close(
                "conv tokens",
                values(t.inner()),
                values(nchw.reshape([2, cout, gh * gw]).swap_dims(1, 2).inner()),
            );
        }
    }

    #[test]
    fn im2col_conv_matches_burn() {
        let dev = Default::default();
        // PixelLM's neck 3x3 (padding 1), an asymmetric padding, no padding, and 1x1.
        for (k, pad, bias) in [
            ([3, 3], PaddingConfig2d::Explicit(1, 1, 1, 1), false),
            ([3, 2], PaddingConfig2d::Explicit(2, 0, 1, 1), true),
            ([2, 3], PaddingConfig2d::Valid, true),
            ([1, 1], PaddingConfig2d::Explicit(1, 0, 0, 1), false),
        ] {
            let m = Conv2dConfig::new([3, 4], k).with_padding(pad).with_bias(bias).init::<Ad>(&dev);
            check(
                "im2col conv",
                &m,
                rand4([2, 3, 5, 6], &dev),
                conv2d_forward,
                |m, x| m.forward(x),
                |m| vec![("weight", m.weight.val())],
                |m| m.bias.as_ref().map(|b| b.val()),
            );
        }
    }

    #[test]
    fn overlapping_convs_fall_back() {
        let dev = Default::default();
        let c = Conv2dConfig::new([2, 2], [3, 3]).init::<NdArray>(&dev);
        assert!(!is_patch_conv(&c));
        let t = ConvTranspose2dConfig::new([2, 2], [3, 3]).with_stride([2, 2]).init::<NdArray>(&dev);
        assert!(!is_patch_conv_transpose(&t));
    }
}

//! SAM's ViT image encoder (`ImageEncoderViT` of SAM ViT-B/L/H) in burn.
//!
//! A ViTDet-style plain ViT: a patch-embedding convolution to a channels-last grid
//! `[b, h, w, c]`, an absolute position embedding (`pos_embed`, `[1, h, w, c]`), `depth`
//! pre-norm transformer blocks that attend either inside non-overlapping `window_size`
//! windows (the grid zero-padded to a multiple of the window) or globally
//! (`global_attn_indexes`), with decomposed relative position terms (MViTv2) added to the
//! attention logits, and a neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) to
//! `out_chans` channels: `[b, 3, 1024, 1024] -> [b, 256, 64, 64]` for the released models.
//!
//! Parameters are named like the PyTorch state dict under `image_encoder.` of the official
//! SAM checkpoints (`patch_embed.proj`, `pos_embed`, `blocks.{i}.norm1`, `blocks.{i}.attn.qkv`,
//! `blocks.{i}.attn.proj`, `blocks.{i}.attn.rel_pos_h` / `rel_pos_w`, `blocks.{i}.norm2`,
//! `blocks.{i}.mlp.lin1` / `lin2`, `neck.0` .. `neck.3`), so [`ImageEncoderViT::load`] applies
//! a checkpoint's `image_encoder` sub-tree without a renaming table.
//!
//! Reference: segment_anything/modeling/image_encoder.py and common.py of
//! facebookresearch/segment-anything (checked by tests/sam/vit.rs against fixtures written by
//! tools/reference/sam_vit_fixture.py from the official module). Details reproduced:
//! - padded window positions are zeros AFTER `norm1`, so their keys/values are the qkv bias
//!   and they take part in the softmax of the windows at the bottom/right border;
//! - `get_rel_pos` resizes a relative-position table with `F.interpolate(mode="linear",
//!   align_corners=False)` when its length is not `2 * max(q, k) - 1` (reachable when
//!   `use_abs_pos` is off and the input grid differs from `img_size / patch_size`), and
//!   scales coordinates by the q/k size ratio, in f32 like PyTorch;
//! - exact (erf) GELU, LayerNorm eps 1e-6 (`partial(nn.LayerNorm, eps=1e-6)` of build_sam.py);
//! - the patch convolution drops a remainder of the input that is not a multiple of the
//!   patch size;
//! - no interpolation of `pos_embed`: with `use_abs_pos` the input grid must equal the
//!   embedding's grid (the official code fails on a broadcast error; we fail naming both).
//!
//! Everything in `forward` is differentiable with burn's autodiff (no host round trips; the
//! rel-pos resize is a constant interpolation matrix, the index gather a `select`).

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Int, TensorData};
use popen_model::sam::{im2col_conv2d, patch_conv2d_tokens, LayerNorm2d, MlpBlock, SamActivation, SeqLayer};
use popen_model::weights::{apply_checkpoint, Checkpoint, WeightsError};
use serde::{Deserialize, Serialize};

/// LayerNorm epsilon of every norm of the encoder (blocks and neck).
pub const LAYER_NORM_EPS: f64 = 1e-6;

/// Errors of configuring, loading or running the ViT image encoder.
#[derive(Debug, thiserror::Error)]
pub enum VitError {
    #[error("bad SAM ViT encoder config: {0}")]
    Config(String),
    #[error("SAM ViT encoder input: {0}")]
    Input(String),
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// Hyper-parameters of `ImageEncoderViT` (the constructor arguments of the official class;
/// norm and activation are fixed to LayerNorm(eps 1e-6) and exact GELU as in build_sam.py).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VitEncoderConfig {
    /// Input image size the position embedding and global rel-pos tables are made for.
    pub img_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    /// MLP hidden size is `int(embed_dim * mlp_ratio)` (truncated, as Python's `int`).
    pub mlp_ratio: f64,
    pub out_chans: usize,
    pub qkv_bias: bool,
    pub use_abs_pos: bool,
    pub use_rel_pos: bool,
    /// 0: every block attends globally.
    pub window_size: usize,
    /// Blocks that attend globally even though `window_size > 0`.
    pub global_attn_indexes: Vec<usize>,
}

impl VitEncoderConfig {
    fn sam(embed_dim: usize, depth: usize, num_heads: usize, global: [usize; 4]) -> Self {
        Self {
            img_size: 1024,
            patch_size: 16,
            in_chans: 3,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            out_chans: 256,
            qkv_bias: true,
            use_abs_pos: true,
            use_rel_pos: true,
            window_size: 14,
            global_attn_indexes: global.to_vec(),
        }
    }

    /// SAM ViT-B (`build_sam_vit_b`): 89,670,912 parameters.
    pub fn vit_b() -> Self {
        Self::sam(768, 12, 12, [2, 5, 8, 11])
    }

    /// SAM ViT-L (`build_sam_vit_l`): 308,278,272 parameters.
    pub fn vit_l() -> Self {
        Self::sam(1024, 24, 16, [5, 11, 17, 23])
    }

    /// SAM ViT-H (`build_sam_vit_h`): 637,026,048 parameters.
    pub fn vit_h() -> Self {
        Self::sam(1280, 32, 16, [7, 15, 23, 31])
    }

    /// Patch grid side of an `img_size` input (`img_size // patch_size`).
    pub fn grid_size(&self) -> usize {
        self.img_size / self.patch_size.max(1)
    }

    /// Hidden size of the MLP blocks: `int(embed_dim * mlp_ratio)`.
    pub fn mlp_dim(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Whether block `i` attends inside windows (`window_size > 0` and `i` not global).
    pub fn is_windowed(&self, i: usize) -> bool {
        self.window_size > 0 && !self.global_attn_indexes.contains(&i)
    }

    /// The side the attention of block `i` is built for (rel-pos tables have `2 * side - 1`
    /// rows): the window size, or the patch grid for global blocks.
    pub fn attn_input_size(&self, i: usize) -> usize {
        if self.is_windowed(i) {
            self.window_size
        } else {
            self.grid_size()
        }
    }

    pub fn validate(&self) -> Result<(), VitError> {
        let bad = |m: String| Err(VitError::Config(m));
        for (name, v) in [
            ("img_size", self.img_size),
            ("patch_size", self.patch_size),
            ("in_chans", self.in_chans),
            ("embed_dim", self.embed_dim),
            ("num_heads", self.num_heads),
            ("out_chans", self.out_chans),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.img_size < self.patch_size {
            return bad(format!(
                "img_size {} is smaller than patch_size {}: no patch grid",
                self.img_size, self.patch_size
            ));
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(format!("num_heads {} must divide embed_dim {}", self.num_heads, self.embed_dim));
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) || self.mlp_dim() == 0 {
            return bad(format!(
                "mlp_ratio {} must be positive and give a non-empty MLP (embed_dim {})",
                self.mlp_ratio, self.embed_dim
            ));
        }
        if let Some(i) = self.global_attn_indexes.iter().find(|&&i| i >= self.depth) {
            return bad(format!("global_attn_indexes contains {i}, but there are only {} blocks", self.depth));
        }
        Ok(())
    }

    /// Exact parameter count of the encoder, from the shapes alone (nothing allocated).
    pub fn param_count(&self) -> usize {
        let c = self.embed_dim;
        let hd = c / self.num_heads.max(1);
        let m = self.mlp_dim();
        let o = self.out_chans;
        let g = self.grid_size();
        let mut n = c * self.in_chans * self.patch_size * self.patch_size + c;
        if self.use_abs_pos {
            n += g * g * c;
        }
        for i in 0..self.depth {
            let qkv = 3 * c * c + if self.qkv_bias { 3 * c } else { 0 };
            let proj = c * c + c;
            let rel = if self.use_rel_pos { 2 * (2 * self.attn_input_size(i) - 1) * hd } else { 0 };
            let norms = 4 * c;
            let mlp = c * m + m + m * c + c;
            n += qkv + proj + rel + norms + mlp;
        }
        n + o * c + 2 * o + o * o * 9 + 2 * o
    }

    /// Validate and build the encoder with burn's default initialisation (load weights with
    /// [`ImageEncoderViT::load`]). Rel-pos tables start at zero (`rel_pos_zero_init`), the
    /// position embedding at zero, like the official constructor.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<ImageEncoderViT<B>, VitError> {
        self.validate()?;
        let c = self.embed_dim;
        let g = self.grid_size();
        let hd = c / self.num_heads;
        let norm = || LayerNormConfig::new(c).with_epsilon(LAYER_NORM_EPS).init(device);
        let blocks = (0..self.depth)
            .map(|i| {
                let s = self.attn_input_size(i);
                let rel = || self.use_rel_pos.then(|| Param::from_tensor(Tensor::zeros([2 * s - 1, hd], device)));
                VitBlock {
                    norm1: norm(),
                    attn: VitAttention {
                        qkv: LinearConfig::new(c, 3 * c).with_bias(self.qkv_bias).init(device),
                        proj: LinearConfig::new(c, c).init(device),
                        rel_pos_h: rel(),
                        rel_pos_w: rel(),
                        num_heads: self.num_heads,
                    },
                    norm2: norm(),
                    mlp: MlpBlock::new(c, self.mlp_dim(), SamActivation::Gelu, device),
                    window_size: if self.is_windowed(i) { self.window_size } else { 0 },
                }
            })
            .collect();
        let o = self.out_chans;
        let neck = vec![
            SeqLayer::Conv(Conv2dConfig::new([c, o], [1, 1]).with_bias(false).init(device)),
            SeqLayer::Norm(LayerNorm2d::new(o, device)),
            SeqLayer::Conv(
                Conv2dConfig::new([o, o], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .with_bias(false)
                    .init(device),
            ),
            SeqLayer::Norm(LayerNorm2d::new(o, device)),
        ];
        let p = self.patch_size;
        Ok(ImageEncoderViT {
            patch_embed: PatchEmbed {
                proj: Conv2dConfig::new([self.in_chans, c], [p, p]).with_stride([p, p]).init(device),
            },
            pos_embed: self.use_abs_pos.then(|| Param::from_tensor(Tensor::zeros([1, g, g, c], device))),
            blocks,
            neck,
            patch_size: p,
        })
    }
}

/// `PatchEmbed`: a `patch_size` x `patch_size`, stride `patch_size` convolution (with bias).
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    pub proj: Conv2d<B>,
}

impl<B: Backend> PatchEmbed<B> {
    /// `[b, c_in, H, W]` -> channels-last `[b, H / p, W / p, embed_dim]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b = x.dims()[0];
        let (tokens, [gh, gw]) =
            patch_conv2d_tokens(x, self.proj.weight.val(), self.proj.bias.as_ref().map(|b| b.val()));
        let c = tokens.dims()[2];
        tokens.reshape([b, gh, gw, c])
    }
}

/// The encoder's multi-head self-attention with optional decomposed relative positions.
#[derive(Module, Debug)]
pub struct VitAttention<B: Backend> {
    pub qkv: Linear<B>,
    pub proj: Linear<B>,
    /// `[2 * size - 1, head_dim]` (size: window or grid side), when `use_rel_pos`.
    pub rel_pos_h: Option<Param<Tensor<B, 2>>>,
    pub rel_pos_w: Option<Param<Tensor<B, 2>>>,
    pub num_heads: usize,
}

impl<B: Backend> VitAttention<B> {
    /// `x`: `[b, h, w, c]` -> `[b, h, w, c]`, every position attending to every other.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, w, c] = x.dims();
        let (nh, n) = (self.num_heads, h * w);
        let hd = c / nh;
        // [b, n, 3, nh, hd] -> three [b * nh, n, hd].
        let qkv = self.qkv.forward(x.reshape([b, n, c])).reshape([b, n, 3, nh, hd]);
        let part = |i: usize| {
            qkv.clone().slice([0..b, 0..n, i..i + 1, 0..nh, 0..hd]).reshape([b, n, nh, hd]).swap_dims(1, 2).reshape([
                b * nh,
                n,
                hd,
            ])
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let scale = (hd as f64).powf(-0.5);
        let mut attn = (q.clone() * scale).matmul(k.transpose());
        if let (Some(rh), Some(rw)) = (&self.rel_pos_h, &self.rel_pos_w) {
            attn = add_decomposed_rel_pos(attn, q, rh.val(), rw.val(), [h, w], [h, w]);
        }
        let y = softmax(attn, 2).matmul(v); // [b * nh, n, hd]
        let y = y.reshape([b, nh, h, w, hd]).permute([0, 2, 3, 1, 4]).reshape([b, h, w, c]);
        self.proj.forward(y)
    }
}

/// One transformer block: `x + attn(norm1(x))` (windowed or global), then
/// `x + mlp(norm2(x))`.
#[derive(Module, Debug)]
pub struct VitBlock<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn: VitAttention<B>,
    pub norm2: LayerNorm<B>,
    pub mlp: MlpBlock<B>,
    /// 0: global attention.
    pub window_size: usize,
}

impl<B: Backend> VitBlock<B> {
    /// `x`: `[b, h, w, c]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let shortcut = x.clone();
        let y = self.norm1.forward(x);
        let y = if self.window_size > 0 {
            let [_, h, w, _] = y.dims();
            let (windows, pad_hw) = window_partition(y, self.window_size);
            window_unpartition(self.attn.forward(windows), self.window_size, pad_hw, [h, w])
        } else {
            self.attn.forward(y)
        };
        let x = shortcut + y;
        x.clone() + self.mlp.forward(self.norm2.forward(x))
    }
}

/// SAM's ViT image encoder; build it with [`VitEncoderConfig::init`].
#[derive(Module, Debug)]
pub struct ImageEncoderViT<B: Backend> {
    pub patch_embed: PatchEmbed<B>,
    /// `[1, grid, grid, embed_dim]`, when `use_abs_pos`.
    pub pos_embed: Option<Param<Tensor<B, 4>>>,
    pub blocks: Vec<VitBlock<B>>,
    /// `nn.Sequential(Conv2d 1x1, LayerNorm2d, Conv2d 3x3 pad 1, LayerNorm2d)`, no conv bias.
    pub neck: Vec<SeqLayer<B>>,
    pub patch_size: usize,
}

impl<B: Backend> ImageEncoderViT<B> {
    /// Patch embedding plus absolute position embedding: `[b, c_in, H, W]` ->
    /// `[b, H / p, W / p, embed_dim]`. Fails when the channels differ from the patch
    /// convolution's, the image is smaller than one patch, or (with a position embedding)
    /// the patch grid differs from the embedding's (no interpolation, as the official code).
    pub fn embed(&self, x: Tensor<B, 4>) -> Result<Tensor<B, 4>, VitError> {
        let [b, cin, h, w] = x.dims();
        let want_c = self.patch_embed.proj.weight.dims()[1];
        let p = self.patch_size;
        if cin != want_c || b == 0 || h < p || w < p {
            return Err(VitError::Input(format!(
                "image tensor [{b}, {cin}, {h}, {w}]: want [batch >= 1, {want_c}, H >= {p}, W >= {p}]"
            )));
        }
        let x = self.patch_embed.forward(x);
        match &self.pos_embed {
            Some(pe) => {
                let [_, gh, gw, _] = x.dims();
                let [_, ph, pw, _] = pe.dims();
                if [gh, gw] != [ph, pw] {
                    return Err(VitError::Input(format!(
                        "image {h}x{w} gives a {gh}x{gw} patch grid (patch {p}), but pos_embed \
                         is {ph}x{pw} (an image of {}x{}); pos_embed is not interpolated",
                        ph * p,
                        pw * p
                    )));
                }
                Ok(x + pe.val())
            }
            None => Ok(x),
        }
    }

    /// `[b, c_in, H, W]` -> `[b, out_chans, H / p, W / p]`; see [`ImageEncoderViT::embed`] for
    /// the errors.
    pub fn try_forward(&self, x: Tensor<B, 4>) -> Result<Tensor<B, 4>, VitError> {
        let mut x = self.embed(x)?;
        for blk in &self.blocks {
            x = blk.forward(x);
        }
        Ok(self.neck_forward(x.permute([0, 3, 1, 2])))
    }

    /// The neck on `[b, embed_dim, h, w]`. Like `popen_model::sam::seq_forward`, except
    /// that the 3x3 convolution's zero padding is made in the activations' float type
    /// (burn's `pad`, used by `im2col_conv2d`, makes it in the device default type, which
    /// bf16/f16 activations on Flex refuse).
    fn neck_forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for layer in &self.neck {
            x = match layer {
                SeqLayer::Conv(m) => match m.padding {
                    PaddingConfig2d::Explicit(top, left, bottom, right)
                        if m.stride == [1, 1] && m.dilation == [1, 1] && m.groups == 1 =>
                    {
                        let x = zero_pad(x, 2, top, bottom);
                        let x = zero_pad(x, 3, left, right);
                        im2col_conv2d(x, m.weight.val(), m.bias.as_ref().map(|b| b.val()), [0; 4])
                    }
                    _ => layer.forward(x),
                },
                _ => layer.forward(x),
            };
        }
        x
    }

    /// [`ImageEncoderViT::try_forward`], panicking with its message on a wrong input shape
    /// (`[b, 3, img_size, img_size]` is always right).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.try_forward(x).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Apply a checkpoint already narrowed to the encoder (official SAM checkpoints:
    /// `Checkpoint::open(path)?.sub("image_encoder")`), strictly: every missing, unexpected
    /// or mis-shaped tensor is reported by name. Parameters take the float type `dtype`.
    pub fn load(self, ck: &Checkpoint, dtype: DType) -> Result<Self, VitError> {
        Ok(apply_checkpoint(self, ck, dtype, false)?)
    }
}

/// `x` with `before` / `after` zeros along `dim`, in `x`'s own float type (burn's `pad`
/// makes them in the device default type, which bf16/f16 tensors on Flex refuse).
fn zero_pad<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize, before: usize, after: usize) -> Tensor<B, D> {
    if before == 0 && after == 0 {
        return x;
    }
    let (device, dtype) = (x.device(), x.dtype());
    let zeros = |n: usize| {
        let mut shape = x.dims();
        shape[dim] = n;
        Tensor::<B, D>::zeros(shape, (&device, dtype))
    };
    let mut parts = Vec::with_capacity(3);
    if before > 0 {
        parts.push(zeros(before));
    }
    let tail = (after > 0).then(|| zeros(after));
    parts.push(x);
    parts.extend(tail);
    Tensor::cat(parts, dim)
}

/// Zero-pad `x` `[b, h, w, c]` at the bottom/right to multiples of `ws` and cut it into
/// `[b * nw, ws, ws, c]` windows (row-major over the window grid). Returns the padded size.
pub fn window_partition<B: Backend>(x: Tensor<B, 4>, ws: usize) -> (Tensor<B, 4>, [usize; 2]) {
    let [b, h, w, c] = x.dims();
    let (ph, pw) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
    let (hp, wp) = (h + ph, w + pw);
    let x = zero_pad(zero_pad(x, 1, 0, ph), 2, 0, pw);
    let windows = x.reshape([b, hp / ws, ws, wp / ws, ws, c]).permute([0, 1, 3, 2, 4, 5]).reshape([
        b * (hp / ws) * (wp / ws),
        ws,
        ws,
        c,
    ]);
    (windows, [hp, wp])
}

/// Inverse of [`window_partition`]: `[b * nw, ws, ws, c]` -> `[b, h, w, c]` (padding cut).
pub fn window_unpartition<B: Backend>(
    windows: Tensor<B, 4>,
    ws: usize,
    pad_hw: [usize; 2],
    hw: [usize; 2],
) -> Tensor<B, 4> {
    let [hp, wp] = pad_hw;
    let [h, w] = hw;
    let [nwb, _, _, c] = windows.dims();
    let b = nwb / ((hp / ws) * (wp / ws));
    let x = windows.reshape([b, hp / ws, wp / ws, ws, ws, c]).permute([0, 1, 3, 2, 4, 5]).reshape([b, hp, wp, c]);
    if hp > h || wp > w {
        x.slice([0..b, 0..h, 0..w, 0..c])
    } else {
        x
    }
}

/// Matrix `[out_len, in_len]` of PyTorch's `F.interpolate(mode="linear",
/// align_corners=False)` along one axis (source coordinate `(i + 0.5) * in / out - 0.5`,
/// clamped at 0; computed in f32 like ATen's CPU kernel for f32 tensors).
pub fn linear_resize_matrix(in_len: usize, out_len: usize) -> Vec<f32> {
    let mut m = vec![0f32; out_len * in_len];
    let scale = in_len as f32 / out_len as f32;
    for i in 0..out_len {
        let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(in_len - 1);
        let i1 = if i0 < in_len - 1 { i0 + 1 } else { i0 };
        let l1 = (src - i0 as f32).clamp(0.0, 1.0);
        m[i * in_len + i0] += 1.0 - l1;
        m[i * in_len + i1] += l1;
    }
    m
}

/// Row of the (resized) table each (query, key) coordinate pair reads: `(q_i * max(k/q, 1) -
/// k_j * max(q/k, 1)) + (k - 1) * max(q/k, 1)`, truncated, in f32 as PyTorch computes it.
pub fn rel_pos_indices(q_size: usize, k_size: usize) -> Vec<i64> {
    let qr = (k_size as f64 / q_size as f64).max(1.0) as f32;
    let kr = (q_size as f64 / k_size as f64).max(1.0);
    let offset = ((k_size - 1) as f64 * kr) as f32;
    let kr = kr as f32;
    let mut idx = Vec::with_capacity(q_size * k_size);
    for i in 0..q_size {
        for j in 0..k_size {
            let d = (i as f32 * qr - j as f32 * kr) + offset;
            idx.push(d as i64);
        }
    }
    idx
}

/// `get_rel_pos`: the relative-position embeddings `[q_size, k_size, c]` of a table
/// `rel_pos` `[len, c]`, which is first resized (linear, align_corners=False) to
/// `2 * max(q_size, k_size) - 1` rows when it has another length.
pub fn get_rel_pos<B: Backend>(q_size: usize, k_size: usize, rel_pos: Tensor<B, 2>) -> Tensor<B, 3> {
    let [len, c] = rel_pos.dims();
    let max_rel = 2 * q_size.max(k_size) - 1;
    let device = rel_pos.device();
    let table = if len != max_rel {
        // In the table's float type (bf16/f16 models): `from_data` would otherwise make it
        // the device default.
        let m = Tensor::<B, 2>::from_data(
            TensorData::new(linear_resize_matrix(len, max_rel), [max_rel, len]),
            (&device, rel_pos.dtype()),
        );
        m.matmul(rel_pos)
    } else {
        rel_pos
    };
    let idx =
        Tensor::<B, 1, Int>::from_data(TensorData::new(rel_pos_indices(q_size, k_size), [q_size * k_size]), &device);
    table.select(0, idx).reshape([q_size, k_size, c])
}

/// `add_decomposed_rel_pos`: `attn` `[b, qh * qw, kh * kw]` plus
/// `rel_h[b, y, x, ky] = sum_c q[b, (y, x), c] * Rh[y, ky, c]` broadcast over `kx`, and
/// `rel_w[b, y, x, kx] = sum_c q[b, (y, x), c] * Rw[x, kx, c]` broadcast over `ky`.
pub fn add_decomposed_rel_pos<B: Backend>(
    attn: Tensor<B, 3>,
    q: Tensor<B, 3>,
    rel_pos_h: Tensor<B, 2>,
    rel_pos_w: Tensor<B, 2>,
    q_size: [usize; 2],
    k_size: [usize; 2],
) -> Tensor<B, 3> {
    let ([qh, qw], [kh, kw]) = (q_size, k_size);
    let rh = get_rel_pos(qh, kh, rel_pos_h); // [qh, kh, c]
    let rw = get_rel_pos(qw, kw, rel_pos_w); // [qw, kw, c]
    let [b, _, c] = q.dims();
    let r_q = q.reshape([b, qh, qw, c]);
    // Batched over the query row y: [qh, b * qw, c] x [qh, c, kh].
    let rel_h = r_q
        .clone()
        .permute([1, 0, 2, 3])
        .reshape([qh, b * qw, c])
        .matmul(rh.swap_dims(1, 2))
        .reshape([qh, b, qw, kh])
        .permute([1, 0, 2, 3]);
    // Batched over the query column x: [qw, b * qh, c] x [qw, c, kw].
    let rel_w = r_q
        .permute([2, 0, 1, 3])
        .reshape([qw, b * qh, c])
        .matmul(rw.swap_dims(1, 2))
        .reshape([qw, b, qh, kw])
        .permute([1, 2, 0, 3]);
    let attn =
        attn.reshape([b, qh, qw, kh, kw]) + rel_h.reshape([b, qh, qw, kh, 1]) + rel_w.reshape([b, qh, qw, 1, kw]);
    attn.reshape([b, qh * qw, kh * kw])
}

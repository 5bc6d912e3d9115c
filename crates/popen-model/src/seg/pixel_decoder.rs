//! PixelLM's pixel decoder (`MaskDecoderMultiScale` plus the prompt-encoder pieces PixelLM
//! uses) in burn, generic over the backend and differentiable end to end: POPEN trains the
//! LLM through the frozen decoder, so gradients must reach the segmentation embeddings.
//!
//! Reference (public code, MaverickRen/PixelLM):
//! - `model/segment_anything/modeling/mask_decoder_multi_scale.py` (commit c43c0af):
//!   per-scale `TwoWayTransformer`s, `level_embed`, `upsample_2x`, `pe1`, the scale-1
//!   modulation `(sigmoid(mean(previous masks)) + 1) * src`, one ConvTranspose x2 of output
//!   upscaling;
//! - `model/PixelLM.py` (commit 6969b73), `model_forward`/`evaluate`: sparse prompt = the
//!   scale's seg embedding via `prompt_encoder(text_embeds=...)`, dense prompt =
//!   `no_mask_embed`, scale-0 position encoding = `prompt_encoder.get_dense_pe()`,
//!   `multimask_output=False`, fusion `sum_l multiscale_scalar[l] * interp(mask_l, 128)`
//!   with `multiscale_scalar = 1/num_scales` (a python list, not in the state dict),
//!   `postprocess_masks` and the mask score.
//!
//! State-dict layout: a PixelLM checkpoint stores the decoder as `model.mask_decoder.*` and
//! the prompt encoder as `model.prompt_encoder.*` (siblings inside `PixelLMModel`, next to
//! `model.image_feature_neck.*`, `model.text_hidden_fcs.0.{0,2}.*`,
//! `model.out_mm_projector.{0,2}.*`). [`PixelDecoder`] holds exactly those two children, and
//! [`PixelDecoder::load_pixellm`] finds the prefix in front of `mask_decoder.iou_token.weight`.

use std::path::Path;

use burn::nn::{Embedding, EmbeddingConfig, Gelu};
use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use burn::tensor::{DType, Int, TensorData};
use serde::{Deserialize, Serialize};

use crate::sam::{
    conv_transpose_2x2, hyper_masks, output_tokens, postprocess_masks as sam_postprocess, resize_bilinear, seq_forward,
    seq_forward_tokens, LayerNorm2d, Mlp, PositionEmbeddingRandom, PromptEncoder, PromptEncoderConfig, SamActivation,
    SamError, SeqLayer, TwoWayTransformer, TwoWayTransformerConfig,
};
use crate::weights::{apply_checkpoint, Checkpoint, WeightsError};

/// Errors of building, loading or running the pixel decoder. Shape errors name the input
/// and give expected and actual shapes.
#[derive(Debug, thiserror::Error)]
pub enum DecoderError {
    #[error(transparent)]
    Sam(#[from] SamError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("bad pixel decoder input: {0}")]
    Input(String),
}

type Result<T> = std::result::Result<T, DecoderError>;

fn input_err<T>(msg: String) -> Result<T> {
    Err(DecoderError::Input(msg))
}

/// Everything PixelLM's constructor fixes for the decoder and prompt encoder. Defaults are
/// PixelLM's (7B and 13B alike): `prompt_embed_dim = 256`, 448 input / patch 14 = 32x32
/// features, two scales, `TwoWayTransformer(depth=2, 256, mlp_dim=2048, num_heads=8)`,
/// `num_multimask_outputs=3`, IoU head 3 x 256, `mask_in_chans=16`, `out_size=128`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MaskDecoderMultiScaleConfig {
    pub transformer_dim: usize,
    /// `image_feature_scale_num`: 1 or 2 (PixelLM's level > 0 path upsamples the features
    /// once and reads the previous level's masks at that size, which only fits level 1).
    pub num_scales: usize,
    pub depth: usize,
    pub mlp_dim: usize,
    pub num_heads: usize,
    pub attention_downsample_rate: usize,
    pub num_multimask_outputs: usize,
    pub iou_head_depth: usize,
    pub iou_head_hidden_dim: usize,
    /// Side of the (square) image feature grid of every scale (448 / 14 = 32).
    pub image_embedding_size: usize,
    /// Side of the padded square model input in pixels (448).
    pub input_image_size: usize,
    /// Prompt encoder's mask-input channels (unused by PixelLM's forward, present in its
    /// checkpoints).
    pub mask_in_chans: usize,
    /// Side of the fused low-resolution masks (PixelLM's `out_size = 128`).
    pub low_res_size: usize,
    /// The `output_upscaling` stack: PixelLM's (x2) or SAM's own (x4), which lets the
    /// decoder start from a SAM checkpoint's `mask_decoder.*` (the `tiny-sam` preset).
    pub upscaling: Upscaling,
}

/// Shape of the decoder's `output_upscaling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Upscaling {
    /// PixelLM: ConvTranspose(dim -> dim/8, x2), LayerNorm2d, GELU.
    #[default]
    Pixellm,
    /// SAM: ConvTranspose(dim -> dim/4, x2), LayerNorm2d, GELU, ConvTranspose(dim/4 -> dim/8,
    /// x2), GELU (`output_upscaling.{0,1,3}` of a SAM checkpoint).
    Sam,
}

impl Upscaling {
    /// Side factor of the upscaling.
    pub fn factor(self) -> usize {
        match self {
            Upscaling::Pixellm => 2,
            Upscaling::Sam => 4,
        }
    }

    fn layers<B: Backend>(self, d: usize, device: &B::Device) -> Vec<SeqLayer<B>> {
        match self {
            Upscaling::Pixellm => vec![
                conv_transpose_2x2(d, d / 8, device),
                SeqLayer::Norm(LayerNorm2d::new(d / 8, device)),
                SeqLayer::Gelu(Gelu::new()),
            ],
            Upscaling::Sam => vec![
                conv_transpose_2x2(d, d / 4, device),
                SeqLayer::Norm(LayerNorm2d::new(d / 4, device)),
                SeqLayer::Gelu(Gelu::new()),
                conv_transpose_2x2(d / 4, d / 8, device),
                SeqLayer::Gelu(Gelu::new()),
            ],
        }
    }
}

impl Default for MaskDecoderMultiScaleConfig {
    fn default() -> Self {
        Self {
            transformer_dim: 256,
            num_scales: 2,
            depth: 2,
            mlp_dim: 2048,
            num_heads: 8,
            attention_downsample_rate: 2,
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 256,
            image_embedding_size: 32,
            input_image_size: 448,
            mask_in_chans: 16,
            low_res_size: 128,
            upscaling: Upscaling::Pixellm,
        }
    }
}

impl MaskDecoderMultiScaleConfig {
    /// Tiny random-weight preset for tests (the reference fixture's dims:
    /// tools/reference/pixellm_decoder_ref.py).
    pub fn tiny() -> Self {
        Self {
            transformer_dim: 16,
            num_scales: 2,
            depth: 2,
            mlp_dim: 32,
            num_heads: 2,
            attention_downsample_rate: 2,
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 16,
            image_embedding_size: 8,
            input_image_size: 64,
            mask_in_chans: 8,
            low_res_size: 32,
            upscaling: Upscaling::Pixellm,
        }
    }

    /// Side of the masks a level outputs: `grid * 2^level * factor` (level 0: output
    /// upscaling, x2 for PixelLM's, x4 for SAM's; level 1: x2 by `upsample_2x` first).
    pub fn level_mask_size(&self, level: usize) -> usize {
        (self.image_embedding_size << level) * self.upscaling.factor()
    }

    fn transformer(&self) -> TwoWayTransformerConfig {
        TwoWayTransformerConfig {
            depth: self.depth,
            embedding_dim: self.transformer_dim,
            num_heads: self.num_heads,
            mlp_dim: self.mlp_dim,
            activation: SamActivation::Relu,
            attention_downsample_rate: self.attention_downsample_rate,
        }
    }

    /// Random-weight decoder (load real weights with [`PixelDecoder::load_pixellm`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<PixelDecoder<B>> {
        let d = self.transformer_dim;
        if !(1..=2).contains(&self.num_scales) {
            return Err(SamError::Config(format!(
                "num_scales {} unsupported: PixelLM's decoder handles 1 or 2 scales",
                self.num_scales
            ))
            .into());
        }
        if d < 8 || !d.is_multiple_of(8) || self.image_embedding_size == 0 || self.low_res_size == 0 {
            return Err(SamError::Config(format!(
                "transformer_dim {d} must be a positive multiple of 8; image_embedding_size \
                 and low_res_size must be positive"
            ))
            .into());
        }
        let g = self.image_embedding_size;
        let prompt_encoder = PromptEncoderConfig {
            embed_dim: d,
            image_embedding_size: (g, g),
            input_image_size: (self.input_image_size, self.input_image_size),
            mask_in_chans: self.mask_in_chans,
        }
        .init(device)?;
        let m = self.num_multimask_outputs + 1;
        let mask_decoder = MaskDecoderMultiScale {
            transformer: (0..self.num_scales)
                .map(|_| self.transformer().init(device))
                .collect::<std::result::Result<Vec<_>, _>>()?,
            iou_token: EmbeddingConfig::new(1, d).init(device),
            mask_tokens: EmbeddingConfig::new(m, d).init(device),
            output_upscaling: self.upscaling.layers(d, device),
            upsample_2x: vec![
                conv_transpose_2x2(d, d, device),
                SeqLayer::Norm(LayerNorm2d::new(d, device)),
                SeqLayer::Gelu(Gelu::new()),
            ],
            pe1: PositionEmbeddingRandom::new(d / 2, None, device),
            output_hypernetworks_mlps: (0..m).map(|_| Mlp::new(d, d, d / 8, 3, false, device)).collect(),
            iou_prediction_head: Mlp::new(d, self.iou_head_hidden_dim, m, self.iou_head_depth, false, device),
            level_embed: EmbeddingConfig::new(self.num_scales, d).init(device),
            transformer_dim: d,
            num_multimask_outputs: self.num_multimask_outputs,
        };
        Ok(PixelDecoder { prompt_encoder, mask_decoder, num_scales: self.num_scales, low_res_size: self.low_res_size })
    }
}

/// PixelLM's `MaskDecoderMultiScale` (state-dict names of `model.mask_decoder.*`).
#[derive(Module, Debug)]
pub struct MaskDecoderMultiScale<B: Backend> {
    /// One two-way transformer per scale.
    pub transformer: Vec<TwoWayTransformer<B>>,
    pub iou_token: Embedding<B>,
    pub mask_tokens: Embedding<B>,
    /// [`Upscaling`]: PixelLM's x2 or SAM's x4 stack.
    pub output_upscaling: Vec<SeqLayer<B>>,
    /// ConvTranspose(dim -> dim, x2), LayerNorm2d, GELU: source features of level > 0.
    pub upsample_2x: Vec<SeqLayer<B>>,
    /// Position encoding of the upsampled grid of level > 0.
    pub pe1: PositionEmbeddingRandom<B>,
    pub output_hypernetworks_mlps: Vec<Mlp<B>>,
    pub iou_prediction_head: Mlp<B>,
    pub level_embed: Embedding<B>,
    pub transformer_dim: usize,
    pub num_multimask_outputs: usize,
}

impl<B: Backend> MaskDecoderMultiScale<B> {
    /// `MaskDecoderMultiScale.forward` for one level, with the image embedding already
    /// expanded per prompt (PixelLM's `repeat_interleave`).
    ///
    /// - `src`: `[b, dim, h, w]` image features of each prompt's image;
    /// - `image_pe`: `[1, dim, h, w]` (ignored for level > 0, which uses `pe1`);
    /// - `sparse`: `[b, n, dim]`; `dense`: `[b or 1, dim, h, w]` (level > 0 resizes it);
    /// - `previous_masks`: `[b, k, 2h, 2w]` for level > 0.
    ///
    /// Returns masks `[b, k, H, W]` and IoU predictions `[b, k]`, k = 1 + `num_multimask_outputs`
    /// when `multimask_output` (PixelLM keeps token 0 too), else 1.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_level(
        &self,
        src: Tensor<B, 4>,
        image_pe: Tensor<B, 4>,
        sparse: Tensor<B, 3>,
        dense: Tensor<B, 4>,
        multimask_output: bool,
        level: usize,
        previous_masks: Option<Tensor<B, 4>>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 2>)> {
        let d = self.transformer_dim;
        let [b, c, h, w] = src.dims();
        let [sb, _, sd] = sparse.dims();
        let [db, dd, dh, dw] = dense.dims();
        if level >= self.transformer.len() {
            return input_err(format!("level {level} but the decoder has {} scales", self.transformer.len()));
        }
        if c != d || sb != b || sd != d || (db != b && db != 1) || [dd, dh, dw] != [d, h, w] {
            return input_err(format!(
                "level {level}: src {:?}, sparse {:?}, dense {:?}; expected [b, {d}, h, w], \
                 [b, n, {d}], [b or 1, {d}, h, w]",
                [b, c, h, w],
                sparse.dims(),
                dense.dims()
            ));
        }
        let src = if level > 0 { self.upsample_source(src) } else { src };
        self.run_level(src, image_pe, sparse, dense, multimask_output, level, previous_masks)
    }

    /// `upsample_2x` (ConvTranspose x2, LayerNorm2d, GELU): the source features of levels
    /// above 0, `[n, dim, h, w]` -> `[n, dim, 2h, 2w]`. Every row is independent, so
    /// [`PixelDecoder::forward`] runs it once per image, before the per-object gather,
    /// instead of once per object as PixelLM's `repeat_interleave` order does.
    pub fn upsample_source(&self, src: Tensor<B, 4>) -> Tensor<B, 4> {
        seq_forward(&self.upsample_2x, src)
    }

    /// [`Self::forward_level`] after its input checks, with `src` already at the level's
    /// resolution (through [`Self::upsample_source`] for level > 0).
    #[allow(clippy::too_many_arguments)]
    fn run_level(
        &self,
        src: Tensor<B, 4>,
        image_pe: Tensor<B, 4>,
        sparse: Tensor<B, 3>,
        dense: Tensor<B, 4>,
        multimask_output: bool,
        level: usize,
        previous_masks: Option<Tensor<B, 4>>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 2>)> {
        let d = self.transformer_dim;
        let [b, _, h, w] = src.dims();
        let tokens = output_tokens(&self.iou_token, &self.mask_tokens, sparse);
        // `[1, 1, d]`, broadcast over prompts and tokens.
        let level_row = self.level_embed.weight.val().slice([level..level + 1, 0..d]).reshape([1, 1, d]);
        let tokens = tokens + level_row;

        let (src, pos) = if level > 0 {
            let prev = previous_masks
                .ok_or_else(|| DecoderError::Input(format!("level {level} needs the previous level's masks")))?;
            let [pb, _, ph, pw] = prev.dims();
            if pb != b || (ph, pw) != (h, w) {
                return input_err(format!(
                    "level {level}: previous masks {:?} must be [{b}, k, {h}, {w}]",
                    prev.dims()
                ));
            }
            // `[b, 1, h, w]`, broadcast over channels.
            let gate = sigmoid(prev.mean_dim(1)) + 1.0;
            let src = gate * src;
            // PixelLM bilinearly resizes the constant no-mask dense prompt: same constant.
            let dense = resize_bilinear(dense, h, w);
            (src + dense, self.pe1.forward(h, w).unsqueeze::<4>())
        } else {
            (src + dense, image_pe)
        };
        // The transformer broadcasts the batch-1 position encoding itself.
        let (hs, src) = self.transformer[level].forward(src, pos, tokens)?;
        let m = self.num_multimask_outputs + 1;
        let iou_token_out = hs.clone().slice([0..b, 0..1, 0..d]).reshape([b, d]);
        // The keys `[b, h*w, d]` go straight into the output upscaling's transposed
        // convolution (no NCHW copy).
        let upscaled = seq_forward_tokens(&self.output_upscaling, src, h, w);
        // PixelLM computes all m mask-token masks and keeps token 0 when not multimask; the
        // unused hypernetworks do not influence token 0, so only the kept ones are run.
        let k = if multimask_output { m } else { 1 };
        let hyper: Vec<_> = (0..k)
            .map(|i| self.output_hypernetworks_mlps[i].forward(hs.clone().slice([0..b, 1 + i..2 + i, 0..d])))
            .collect();
        let masks = hyper_masks(Tensor::cat(hyper, 1), upscaled);
        let iou = self.iou_prediction_head.forward(iou_token_out).slice([0..b, 0..k]);
        Ok((masks, iou))
    }
}

/// PixelLM's pixel decoder: `prompt_encoder` and `mask_decoder` named as in a PixelLM state
/// dict (under `model.`), with PixelLM's multi-scale call sequence in [`Self::forward`].
#[derive(Module, Debug)]
pub struct PixelDecoder<B: Backend> {
    pub prompt_encoder: PromptEncoder<B>,
    pub mask_decoder: MaskDecoderMultiScale<B>,
    pub num_scales: usize,
    pub low_res_size: usize,
}

/// Output of [`PixelDecoder::forward`], in object order.
#[derive(Debug, Clone)]
pub struct DecoderOutput<B: Backend> {
    /// `[n_objects, low_res_size, low_res_size]` fused mask logits.
    pub low_res_masks: Tensor<B, 3>,
    /// `[n_objects]`: the IoU head of the last scale, mask token 0 (PixelLM overwrites
    /// `iou_predictions` in its scale loop, so the last scale's is what it returns).
    pub iou_predictions: Tensor<B, 1>,
}

impl<B: Backend> PixelDecoder<B> {
    /// Load the decoder from a PixelLM checkpoint (a safetensors file or sharded folder):
    /// the tensors `{prefix}prompt_encoder.*` and `{prefix}mask_decoder.*`, where `prefix`
    /// is what precedes `mask_decoder.iou_token.weight` (`model.` in PixelLM's
    /// `PixelLMForCausalLM`, empty for a decoder saved alone). Other tensors of the
    /// checkpoint (LLM, CLIP, projectors, neck) are left alone; missing, unexpected or
    /// mis-shaped decoder tensors are all reported by name.
    pub fn load_pixellm(self, path: impl AsRef<Path>) -> Result<Self> {
        let ck = Checkpoint::open(path)?;
        let key = "mask_decoder.iou_token.weight";
        let prefix = ck
            .tensors
            .keys()
            .filter_map(|k| k.strip_suffix(key))
            .filter(|p| p.is_empty() || p.ends_with('.'))
            .min_by_key(|p| p.len())
            .map(str::to_string)
            .ok_or_else(|| WeightsError::Mismatch {
                source_desc: ck.source.clone(),
                problems: vec![format!("no tensor named [prefix.]{key}: not a PixelLM decoder checkpoint")],
            })?;
        let mut sub = Checkpoint {
            source: format!("{} [{prefix}prompt_encoder.*, {prefix}mask_decoder.*]", ck.source),
            metadata: ck.metadata.clone(),
            tensors: Default::default(),
        };
        for (name, t) in &ck.tensors {
            if let Some(rest) = name.strip_prefix(prefix.as_str()) {
                if rest.starts_with("prompt_encoder.") || rest.starts_with("mask_decoder.") {
                    let mut t = t.clone();
                    t.name = rest.to_string();
                    sub.tensors.insert(rest.to_string(), t);
                }
            }
        }
        Ok(apply_checkpoint(self, &sub, DType::F32, false)?)
    }

    /// PixelLM's decoder path for a batch of objects.
    ///
    /// - `image_embeddings`: per scale `[n_images, dim, g, g]` (after `image_feature_neck`);
    /// - `seg_embeddings`: `[n_objects, num_scales, dim]`, the per-scale seg embeddings;
    /// - `image_index`: the image of each object.
    ///
    /// PixelLM calls the decoder once per image with that image's objects as the batch
    /// (`repeat_interleave` of the image features). Every object is an independent batch
    /// row in all decoder operations (attention never mixes rows), so gathering each
    /// object's image features and running all objects of all images as one batch gives the
    /// same numbers, in object order.
    pub fn forward(
        &self,
        image_embeddings: &[Tensor<B, 4>],
        seg_embeddings: Tensor<B, 3>,
        image_index: &[usize],
    ) -> Result<DecoderOutput<B>> {
        self.forward_with_prompts(image_embeddings, seg_embeddings, image_index, None)
    }

    /// [`Self::forward`] with `prompts`, sparse prompt tokens `[n, t, d]` per object (the
    /// seg locator's box prompt), in place of each scale's seg embedding.
    pub fn forward_with_prompts(
        &self,
        image_embeddings: &[Tensor<B, 4>],
        seg_embeddings: Tensor<B, 3>,
        image_index: &[usize],
        prompts: Option<Tensor<B, 3>>,
    ) -> Result<DecoderOutput<B>> {
        let d = self.mask_decoder.transformer_dim;
        let [g, _] = self.prompt_encoder.image_embedding_size;
        let l_n = self.num_scales;
        if image_embeddings.len() != l_n {
            return input_err(format!("image_embeddings has {} scales, the decoder has {l_n}", image_embeddings.len()));
        }
        let n_images = image_embeddings[0].dims()[0];
        for (l, e) in image_embeddings.iter().enumerate() {
            if e.dims() != [n_images, d, g, g] {
                return input_err(format!(
                    "image_embeddings[{l}] is {:?}, expected [{n_images}, {d}, {g}, {g}]",
                    e.dims()
                ));
            }
        }
        let [n, sl, sd] = seg_embeddings.dims();
        if sl != l_n || sd != d {
            return input_err(format!("seg_embeddings is {:?}, expected [n_objects, {l_n}, {d}]", [n, sl, sd]));
        }
        if image_index.len() != n {
            return input_err(format!("image_index has {} entries for {n} objects", image_index.len()));
        }
        if let Some((o, &i)) = image_index.iter().enumerate().find(|(_, &i)| i >= n_images) {
            return input_err(format!("image_index[{o}] = {i} but there are {n_images} images"));
        }
        if let Some(e) = &prompts {
            let [en, _, ed] = e.dims();
            if en != n || ed != d {
                return input_err(format!("prompts {:?}, expected [{n}, t, {d}]", e.dims()));
            }
        }
        let device = seg_embeddings.device();
        let s = self.low_res_size;
        if n == 0 {
            return Ok(DecoderOutput {
                low_res_masks: Tensor::zeros([0, s, s], &device),
                iou_predictions: Tensor::zeros([0], &device),
            });
        }
        // One object per image, in image order: the gather is the identity.
        let identity = n == n_images && image_index.iter().enumerate().all(|(o, &i)| o == i);
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(image_index.iter().map(|&i| i as i64).collect::<Vec<_>>(), [n]),
            &device,
        );
        // prompt_encoder(text_embeds=seg) gives sparse = seg, dense = no_mask_embed (the same
        // for every object: batch 1, broadcast).
        let dense = self.prompt_encoder.no_mask_dense(1, g, g);
        let image_pe = self.prompt_encoder.get_dense_pe();
        let scalar = 1.0 / l_n as f64;
        let mut low: Option<Tensor<B, 4>> = None;
        let mut prev: Option<Tensor<B, 4>> = None;
        let mut iou_last = None;
        for (l, emb) in image_embeddings.iter().enumerate() {
            // Per image first (upsampling for l > 0), then gathered per object.
            let src = if l > 0 { self.mask_decoder.upsample_source(emb.clone()) } else { emb.clone() };
            let src = if identity { src } else { src.select(0, idx.clone()) };
            let sparse = seg_embeddings.clone().slice([0..n, l..l + 1, 0..d]);
            let sparse = match &prompts {
                Some(e) => e.clone(),
                None => sparse,
            };
            let (masks, iou) =
                self.mask_decoder.run_level(src, image_pe.clone(), sparse, dense.clone(), false, l, prev.take())?;
            let term = resize_bilinear(masks.clone(), s, s) * scalar;
            low = Some(match low {
                Some(acc) => acc + term,
                None => term,
            });
            prev = Some(masks);
            iou_last = Some(iou);
        }
        let (Some(low), Some(iou)) = (low, iou_last) else {
            return input_err("the decoder has no scales".into());
        };
        Ok(DecoderOutput { low_res_masks: low.reshape([n, s, s]), iou_predictions: iou.reshape([n]) })
    }
}

/// PixelLM's `postprocess_masks`: bilinear (align_corners=False) upsampling of `[n, h, w]`
/// logits to the padded `input_size` square, crop of the valid `resized_hw` region,
/// bilinear resize to `original_hw`. PixelLM upsamples to `max(resized_hw)`, which is the
/// padded size (448) under its longest-side resize; SAM uses its fixed input size: both are
/// `input_size` here.
pub fn postprocess_masks<B: Backend>(
    low_res: Tensor<B, 3>,
    input_size: usize,
    resized_hw: (usize, usize),
    original_hw: (usize, usize),
) -> Result<Tensor<B, 3>> {
    let [n, h, w] = low_res.dims();
    let out = sam_postprocess(low_res.reshape([n, 1, h, w]), input_size, resized_hw, original_hw)?;
    Ok(out.reshape([n, original_hw.0, original_hw.1]))
}

/// PixelLM's per-object mask score: `sum(sigmoid(x) * [x > 0]) / (count(x > 0) + 1e-6)`
/// over the pixels of each `[n, h, w]` logit map, i.e. the mean foreground probability
/// inside the predicted mask (0 for an empty mask).
pub fn mask_confidence<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 1> {
    let [n, h, w] = logits.dims();
    let x = logits.reshape([n, h * w]);
    let pos = x.clone().greater_elem(0.0).float();
    let num = (sigmoid(x) * pos.clone()).sum_dim(1);
    let den = pos.sum_dim(1) + 1e-6;
    (num / den).reshape([n])
}

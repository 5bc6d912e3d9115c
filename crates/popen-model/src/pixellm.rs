//! PixelLM assembled (LLaVA + segmentation codebook + multi-scale pixel decoder), with what
//! POPEN adds (SPEC sections 1 and 6).
//!
//! The data path follows the public PixelLM code (MaverickRen/PixelLM, `model/PixelLM.py`,
//! `model/llava/model/llava_arch.py`):
//! - the CLIP tower runs at `image_size` (448) with the patches of the zero padding masked
//!   out of its attention (`encode_images`' `vit_attention_mask`);
//! - scale 0 = `hidden_states[-2]` patches, bilinearly resized (align_corners=False) to a
//!   `llm_image_grid`^2 grid (16x16 = 256 tokens), through `mm_projector` -> the image tokens
//!   that replace `<image>`; the image tokens of padding are masked in the LLM's attention
//!   (`vit_attention_mask_for_llm`, nearest-downsampled);
//! - every scale (`hidden_states[-2]`, `hidden_states[-11]`) -> `out_mm_projector` ->
//!   `image_feature_neck` -> the pixel decoder's image embeddings;
//! - the segmentation embedding of codebook token j is `text_hidden_fcs` of the final hidden
//!   state one position BEFORE it (PixelLM masks `input_ids[:, 1:] == seg`, i.e. the state
//!   that predicts the token), grouped `(objects, scales, seg_token_num)` and averaged over the
//!   seg tokens of each scale with PixelLM's fixed weights `1/seg_token_num`.
//!
//! The `tiny-sam` preset swaps the CLIP tower for a frozen pretrained one, MobileSAM's
//! TinyViT with SAM's neck ([`PixelLmConfig::sam_encoder`], as LISA feeds SAM's encoder to
//! its decoder): its 256-channel image embedding is the decoder's only scale as it is
//! (the decoder then starts from SAM's own `mask_decoder.*`, [`PixelLm::init_from_sam`]),
//! and, bilinearly resized to the `llm_image_grid` and through `mm_projector`, the LLM's
//! image tokens. `out_mm_projector` and `image_feature_neck` do not exist in that model.
//!
//! POPEN's additions: [`Segment::Prompt`] inserts the learnable `p_hat`
//! (`prompt_embeddings`), [`Segment::SegFeedback`] feeds segmentation embeddings back in as
//! input tokens through `seg_feedback` (a Linear from `scales * out_dim` to the LLM width:
//! the embedding of an object is the concatenation of its per-scale embeddings, as SPEC 10.14
//! compares them, and a learned linear map is the least-assuming way into the token space),
//! and every segment may carry a per-position attention bias `gamma` (Eqs. 5-6).

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Gelu, Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::prelude::*;
use burn::tensor::{Bool, DType, Int, TensorData};
use serde::{Deserialize, Serialize};

use crate::clip::{ClipVisionConfig, ClipVisionModel};
use crate::llama::{AttnExtras, Llama, LlamaConfig, LlamaError};
use crate::pixel_decoder::{MaskDecoderMultiScaleConfig, PixelDecoder};
use crate::preprocess::Preprocessed;
use crate::sam::{resize_bilinear, LayerNorm2d};
use crate::sampling::{generate_at, Generation, Prefix, SamplingConfig};
use crate::tiny_vit::{TinyVit, TinyVitConfig};
use crate::weights::{self, Checkpoint, Remap, WeightsError};

/// Errors of building, loading or running a [`PixelLm`].
#[derive(Debug, thiserror::Error)]
pub enum PixelLmError {
    #[error("PixelLM config: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    ConfigFile {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Llama(#[from] LlamaError),
    #[error("vision tower: {0}")]
    Vision(String),
    #[error("pixel decoder: {0}")]
    Decoder(String),
    /// Inputs that do not fit the model or each other.
    #[error("PixelLM input: {0}")]
    Input(String),
}

type Result<T> = std::result::Result<T, PixelLmError>;

fn input<T>(msg: impl Into<String>) -> Result<T> {
    Err(PixelLmError::Input(msg.into()))
}

/// Everything that fixes a PixelLM's shapes. Presets: [`PixelLmConfig::tiny`],
/// [`PixelLmConfig::pixellm_7b`], [`PixelLmConfig::pixellm_13b`]; TOML under `pipelines/`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PixelLmConfig {
    /// A name for reports.
    pub name: String,
    /// The LLaMA decoder (HF `LlamaConfig` field names). Its vocabulary must include the
    /// added tokens (`<im_start>`, `<im_end>`, the codebook `[SEG0]`..).
    pub llm: LlamaConfig,
    /// The CLIP vision tower (HF `CLIPVisionConfig`, at the checkpoint's own image size).
    pub vision: ClipVisionConfig,
    /// Input side the tower runs at; position embeddings are interpolated from
    /// `vision.image_size` when different (PixelLM: 336 -> 448).
    pub image_size: usize,
    /// `hidden_states` indices read from the tower, one per feature scale; the first also
    /// gives the LLM's image tokens. PixelLM: `[-2, -11]`.
    pub vision_select_layers: Vec<isize>,
    /// Side of the image-token grid fed to the LLM (PixelLM: 16, i.e. 256 tokens).
    pub llm_image_grid: usize,
    /// Hidden width of `mm_projector` and `out_mm_projector` (Linear -> GELU -> Linear).
    /// PixelLM: 2H (`mm_projector_hidden_dim = 2`); LLaVA-1.5: H.
    pub mm_projector_hidden: usize,
    /// Codebook tokens per scale (PixelLM recipe: 3). The answer carries
    /// `seg_token_num * scales` tokens per object.
    pub seg_token_num: usize,
    /// Width of the segmentation embedding per scale (PixelLM `out_dim`: 256). Must equal the
    /// decoder's `transformer_dim`.
    pub out_dim: usize,
    /// `<im_start><image><im_end>` (PixelLM: true).
    pub mm_use_im_start_end: bool,
    /// The pixel decoder.
    pub decoder: MaskDecoderMultiScaleConfig,
    /// POPEN's learnable prompt embeddings `p_hat` (SPEC 6; paper: 10). 0 = none.
    pub prompt_embeddings: usize,
    /// POPEN's projection of fed-back segmentation embeddings into the LLM width (Eq. 6).
    pub seg_feedback: bool,
    /// Longest sequence the model is asked to handle (PixelLM trains at 512 text tokens).
    pub max_length: usize,
    /// A frozen SAM image encoder (MobileSAM's TinyViT + neck) in place of the CLIP tower:
    /// its embedding is the decoder's one scale and, through `mm_projector`, the LLM's image
    /// tokens. `vision` is then unused, `vision_select_layers` must have one entry, the
    /// decoder one scale of width `out_chans`, and the input is `image_size` pixels with
    /// SAM's (= PixelLM's) normalization. None (the default) = PixelLM's CLIP path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sam_encoder: Option<TinyVitConfig>,
    /// Width of the [`SegLocator`] (0, the default, = none, as PixelLM). With a locator,
    /// each object's embedding attends over the decoder's first-scale image features and
    /// the attention's extent becomes SAM's box prompt, which the decoder receives in place
    /// of the embedding. For small models whose LLM cannot place an object
    /// in a frozen SAM decoder's prompt space by itself (the tiny-sam preset).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seg_locator: usize,
    /// Add the decoder's dense positional encoding (SAM's `get_dense_pe`, the space its point
    /// prompts live in) to the SAM embedding before it is resized for the LLM (not in
    /// PixelLM; models with `sam_encoder` only). TinyViT has no absolute position embedding,
    /// so without it the LLM's image tokens do not say WHERE a feature is and an object's
    /// embedding cannot carry a location into the frozen SAM decoder. CLIP's tokens carry
    /// their ViT position embedding already. Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub llm_image_pe: bool,
    /// Add a learned projection of each LLM image cell's pixels (`CELL_SUB`^2 RGB means,
    /// `llm_pixel_proj`) to its image token (not in PixelLM; models with `sam_encoder`
    /// only). SAM's embedding is made for boundaries and says little about colour, which
    /// CLIP's tokens carry. Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub llm_image_pixels: bool,
}

/// A model TOML must name only fields the model reads, in its sections as at the top level
/// (`deny_unknown_fields`): a misspelt key would otherwise take the default silently. The
/// section types mirror Hugging Face's `config.json` files and so ignore unknown keys when
/// they read one (`LlamaConfig::from_file`, `ClipVisionConfig::from_file`); only the TOML is
/// strict. Each section's known keys are the ones its `Deserialize` asks for.
fn reject_unknown_section_keys(table: &toml::Table) -> std::result::Result<(), String> {
    let sections: [(&str, Option<&'static [&'static str]>); 4] = [
        ("llm", struct_fields::<LlamaConfig>()),
        ("vision", struct_fields::<ClipVisionConfig>()),
        ("decoder", struct_fields::<MaskDecoderMultiScaleConfig>()),
        ("sam_encoder", struct_fields::<TinyVitConfig>()),
    ];
    for (section, known) in sections {
        let (Some(toml::Value::Table(t)), Some(known)) = (table.get(section), known) else {
            continue;
        };
        if let Some(key) = t.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!(
                "unknown key `{key}` in [{section}], expected one of {}",
                known.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    Ok(())
}

/// The field names (aliases included) a derived `Deserialize` of a struct reads: serde hands
/// them to `Deserializer::deserialize_struct`, which this probe records before it stops. None
/// for a type that does not deserialize as a struct (e.g. one with `#[serde(flatten)]`).
fn struct_fields<T: serde::de::DeserializeOwned>() -> Option<&'static [&'static str]> {
    use serde::de::{Error, Visitor};
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field probe")
        }
    }
    impl std::error::Error for Stop {}
    impl Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    struct Probe<'a>(&'a mut Option<&'static [&'static str]>);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> std::result::Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> std::result::Result<V::Value, Stop> {
            *self.0 = Some(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields = None;
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl PixelLmConfig {
    pub fn num_scales(&self) -> usize {
        self.vision_select_layers.len()
    }

    /// Width of the features `mm_projector` reads (the CLIP width, or SAM's `out_chans`).
    pub fn vision_width(&self) -> usize {
        match &self.sam_encoder {
            Some(t) => t.out_chans,
            None => self.vision.hidden_size,
        }
    }

    /// Codebook tokens per object (`seg_token_num * scales`).
    pub fn seg_group_len(&self) -> usize {
        self.seg_token_num * self.num_scales()
    }

    /// Feature grid side at `image_size` (CLIP patches, or the SAM encoder's output grid).
    pub fn patch_grid(&self) -> usize {
        match &self.sam_encoder {
            Some(t) => t.output_hw(self.image_size, self.image_size).0,
            None => self.image_size / self.vision.patch_size,
        }
    }

    /// Number of LLM tokens one image becomes.
    pub fn image_tokens(&self) -> usize {
        self.llm_image_grid * self.llm_image_grid
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(PixelLmError::Config(format!("{}: {m}", self.name)));
        if self.vision_select_layers.is_empty() {
            return bad("vision_select_layers is empty".into());
        }
        if let Some(t) = &self.sam_encoder {
            if self.vision_select_layers.len() != 1 || self.decoder.num_scales != 1 {
                return bad(format!(
                    "with sam_encoder the decoder has one scale (the SAM embedding): \
                     vision_select_layers needs exactly one entry and decoder.num_scales 1 \
                     (got {:?} and {})",
                    self.vision_select_layers, self.decoder.num_scales
                ));
            }
            if self.decoder.transformer_dim != t.out_chans {
                return bad(format!(
                    "decoder.transformer_dim {} != sam_encoder.out_chans {}",
                    self.decoder.transformer_dim, t.out_chans
                ));
            }
            if self.image_size < 32 {
                return bad(format!("image_size {} too small for the SAM encoder", self.image_size));
            }
        }
        let n = self.vision.num_hidden_layers as isize;
        for &l in self.vision_select_layers.iter().filter(|_| self.sam_encoder.is_none()) {
            if l < -(n + 1) || l > n {
                return bad(format!("vision_select_layers has {l}, outside the tower's {} hidden states", n + 1));
            }
        }
        if self.sam_encoder.is_none()
            && (self.vision.patch_size == 0 || !self.image_size.is_multiple_of(self.vision.patch_size))
        {
            return bad(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.vision.patch_size
            ));
        }
        if self.llm_image_grid == 0 || self.llm_image_grid > self.patch_grid() {
            return bad(format!(
                "llm_image_grid {} must be in 1..={} (the patch grid)",
                self.llm_image_grid,
                self.patch_grid()
            ));
        }
        if self.seg_token_num == 0 {
            return bad("seg_token_num must be at least 1".into());
        }
        if self.llm_image_pe && self.sam_encoder.is_none() {
            return bad("llm_image_pe needs sam_encoder (CLIP's tokens carry their own position embedding)".into());
        }
        if self.llm_image_pixels && self.sam_encoder.is_none() {
            return bad("llm_image_pixels needs sam_encoder (CLIP's tokens carry colour already)".into());
        }
        if self.out_dim != self.decoder.transformer_dim {
            return bad(format!(
                "out_dim {} != decoder.transformer_dim {}",
                self.out_dim, self.decoder.transformer_dim
            ));
        }
        if self.decoder.num_scales != self.num_scales() {
            return bad(format!(
                "decoder.num_scales {} != number of vision_select_layers {}",
                self.decoder.num_scales,
                self.num_scales()
            ));
        }
        if self.decoder.image_embedding_size != self.patch_grid() {
            return bad(format!(
                "decoder.image_embedding_size {} != patch grid {} (image_size / patch_size)",
                self.decoder.image_embedding_size,
                self.patch_grid()
            ));
        }
        Ok(())
    }

    /// Read a config from TOML (`pipelines/model-*.toml`).
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<PixelLmConfig> {
        let path = path.as_ref();
        let err = |e: Box<dyn std::error::Error + Send + Sync>| PixelLmError::ConfigFile {
            path: path.display().to_string(),
            source: e,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(Box::new(e)))?;
        let cfg: PixelLmConfig = toml::from_str(&text).map_err(|e| err(Box::new(e)))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| err(Box::new(e)))?;
        reject_unknown_section_keys(&table).map_err(|m| err(m.into()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The model `popen` trains on the embedded benchmark: minutes on 2 CPU cores.
    pub fn tiny(vocab_size: usize) -> PixelLmConfig {
        let mut llm = LlamaConfig::tiny();
        llm.vocab_size = vocab_size;
        llm.hidden_size = 128;
        llm.intermediate_size = 344;
        llm.num_hidden_layers = 4;
        llm.num_attention_heads = 4;
        llm.num_key_value_heads = 2;
        llm.tie_word_embeddings = false;
        llm.max_position_embeddings = 512;
        let vision = ClipVisionConfig {
            hidden_size: 96,
            intermediate_size: 256,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_channels: 3,
            image_size: 128,
            patch_size: 8,
            layer_norm_eps: 1e-5,
            hidden_act: crate::clip::ClipActivation::QuickGelu,
        };
        let decoder = MaskDecoderMultiScaleConfig {
            transformer_dim: 64,
            num_scales: 2,
            depth: 2,
            mlp_dim: 256,
            num_heads: 4,
            iou_head_hidden_dim: 64,
            image_embedding_size: 16,
            input_image_size: 128,
            low_res_size: 64,
            ..MaskDecoderMultiScaleConfig::default()
        };
        PixelLmConfig {
            name: "tiny".into(),
            llm,
            vision,
            image_size: 128,
            vision_select_layers: vec![-2, -4],
            llm_image_grid: 8,
            mm_projector_hidden: 256,
            seg_token_num: 3,
            out_dim: 64,
            mm_use_im_start_end: true,
            decoder,
            prompt_embeddings: 10,
            seg_feedback: true,
            max_length: 512,
            sam_encoder: None,
            seg_locator: 0,
            llm_image_pe: false,
            llm_image_pixels: false,
        }
    }

    /// [`Self::tiny`]'s LLM on MobileSAM's pretrained parts: the frozen TinyViT encoder at
    /// 224 px (a 14x14 embedding: every attention window of TinyViT's stages fits exactly)
    /// and a one-scale decoder of SAM's shape (width 256, depth 2, 8 heads, MLP 2048, x4
    /// upscaling: 56x56 masks) that [`PixelLm::init_from_sam`] fills from `mobile_sam.pt`.
    /// The LLM reads a 7x7 grid of image tokens.
    pub fn tiny_sam(vocab_size: usize) -> PixelLmConfig {
        let base = Self::tiny(vocab_size);
        let sam = TinyVitConfig {
            img_size: 224,
            // The ImageNet classifier of the checkpoint is never run: leave it out.
            num_classes: 0,
            ..TinyVitConfig::mobile_sam()
        };
        let image_size = 224;
        let grid = sam.output_hw(image_size, image_size).0;
        let decoder = MaskDecoderMultiScaleConfig {
            num_scales: 1,
            image_embedding_size: grid,
            input_image_size: image_size,
            low_res_size: grid * 4,
            upscaling: crate::pixel_decoder::Upscaling::Sam,
            ..MaskDecoderMultiScaleConfig::default()
        };
        PixelLmConfig {
            name: "tiny-sam".into(),
            image_size,
            vision_select_layers: vec![-1],
            llm_image_grid: 7,
            out_dim: decoder.transformer_dim,
            decoder,
            sam_encoder: Some(sam),
            ..base
        }
    }

    /// PixelLM-7B: LLaVA-7B (LLaMA, H 4096) + CLIP ViT-L/14-336 run at 448.
    pub fn pixellm_7b() -> PixelLmConfig {
        let llm = LlamaConfig { vocab_size: 32000 + 3 + 6, ..LlamaConfig::default() };
        Self::pixellm(llm, "pixellm-7b")
    }

    /// PixelLM-13B: LLaVA-llama2-13B (H 5120, 40 layers, 40 heads).
    pub fn pixellm_13b() -> PixelLmConfig {
        let llm = LlamaConfig {
            vocab_size: 32000 + 3 + 6,
            hidden_size: 5120,
            intermediate_size: 13824,
            num_hidden_layers: 40,
            num_attention_heads: 40,
            num_key_value_heads: 40,
            max_position_embeddings: 4096,
            ..LlamaConfig::default()
        };
        Self::pixellm(llm, "pixellm-13b")
    }

    fn pixellm(llm: LlamaConfig, name: &str) -> PixelLmConfig {
        let mm_projector_hidden = 2 * llm.hidden_size;
        PixelLmConfig {
            mm_projector_hidden,
            name: name.into(),
            llm,
            vision: ClipVisionConfig::vit_l_14_336(),
            image_size: 448,
            vision_select_layers: vec![-2, -11],
            llm_image_grid: 16,
            seg_token_num: 3,
            out_dim: 256,
            mm_use_im_start_end: true,
            decoder: MaskDecoderMultiScaleConfig::default(),
            prompt_embeddings: 10,
            seg_feedback: true,
            max_length: 512,
            sam_encoder: None,
            seg_locator: 0,
            llm_image_pe: false,
            llm_image_pixels: false,
        }
    }

    /// Fresh random weights (burn's initializers). Position embeddings are created at
    /// `image_size` directly.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<PixelLm<B>> {
        self.validate()?;
        let h = self.llm.hidden_size;
        let v = self.vision_width();
        let mut vision_cfg = self.vision.clone();
        vision_cfg.image_size = self.image_size;
        let neck_dim = self.decoder.transformer_dim;
        let clip = self.sam_encoder.is_none();
        let sam_encoder = match &self.sam_encoder {
            Some(t) => {
                Some(t.init(device).map_err(|e| PixelLmError::Config(format!("{}: sam_encoder: {e}", self.name)))?)
            }
            None => None,
        };
        Ok(PixelLm {
            llm: self.llm.init(device),
            vision_tower: clip.then(|| vision_cfg.init(device)),
            sam_encoder,
            mm_projector: Projector::new(v, self.mm_projector_hidden, h, device),
            out_mm_projector: clip.then(|| Projector::new(v, self.mm_projector_hidden, h, device)),
            image_feature_neck: clip.then(|| FeatureNeck {
                conv_1: Conv2dConfig::new([h, neck_dim], [1, 1]).with_bias(false).init(device),
                norm_1: LayerNorm2d::new(neck_dim, device),
                conv_2: Conv2dConfig::new([neck_dim, neck_dim], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .with_bias(false)
                    .init(device),
                norm_2: LayerNorm2d::new(neck_dim, device),
            }),
            text_hidden_fcs: TextHiddenFcs {
                fc_1: LinearConfig::new(h, h).init(device),
                relu: Relu::new(),
                fc_2: LinearConfig::new(h, self.out_dim).init(device),
            },
            decoder: self
                .decoder
                .init(device)
                .map_err(|e| PixelLmError::Config(format!("{}: decoder: {e}", self.name)))?,
            prompt_embeddings: (self.prompt_embeddings > 0).then(|| {
                // Small like token embeddings, so an untrained p_hat barely moves the model.
                Param::from_tensor(Tensor::random(
                    [self.prompt_embeddings, h],
                    burn::tensor::Distribution::Normal(0.0, 0.02),
                    device,
                ))
            }),
            seg_feedback: self
                .seg_feedback
                .then(|| LinearConfig::new(self.num_scales() * self.out_dim, h).init(device)),
            seg_locator: (self.seg_locator > 0).then(|| SegLocator {
                query: LinearConfig::new(self.out_dim, self.seg_locator).init(device),
                key: LinearConfig::new(self.out_dim, self.seg_locator).init(device),
                pixel_key: LinearConfig::new(3 * CELL_SUB * CELL_SUB, self.seg_locator).init(device),
            }),
            llm_pixel_proj: self.llm_image_pixels.then(|| LinearConfig::new(3 * CELL_SUB * CELL_SUB, h).init(device)),
            cfg: self.clone(),
        })
    }
}

/// LLaVA's `mlp2x_gelu` projector (and PixelLM's `out_mm_projector`, which is the same
/// shape with a 2H hidden layer). PyTorch: `Sequential(Linear, GELU, Linear)` = `0`, `2`.
#[derive(Module, Debug)]
pub struct Projector<B: Backend> {
    pub linear_1: Linear<B>,
    pub act: Gelu,
    pub linear_2: Linear<B>,
}

impl<B: Backend> Projector<B> {
    fn new(inp: usize, hidden: usize, out: usize, device: &B::Device) -> Self {
        Projector {
            linear_1: LinearConfig::new(inp, hidden).init(device),
            act: Gelu::new(),
            linear_2: LinearConfig::new(hidden, out).init(device),
        }
    }
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.linear_2.forward(self.act.forward(self.linear_1.forward(x)))
    }
}

/// PixelLM's `image_feature_neck`: Conv1x1 (no bias) -> LayerNorm2d -> Conv3x3 (no bias)
/// -> LayerNorm2d (PyTorch indices 0..3).
#[derive(Module, Debug)]
pub struct FeatureNeck<B: Backend> {
    pub conv_1: Conv2d<B>,
    pub norm_1: LayerNorm2d<B>,
    pub conv_2: Conv2d<B>,
    pub norm_2: LayerNorm2d<B>,
}

impl<B: Backend> FeatureNeck<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        // im2col + matmul: burn 0.21's CPU conv kernels (and their backward) are scalar loops.
        let x = self.norm_1.forward(crate::sam::conv2d_forward(&self.conv_1, x));
        self.norm_2.forward(crate::sam::conv2d_forward(&self.conv_2, x))
    }
}

/// A learned "where is it" step (not in PixelLM; [`PixelLmConfig::seg_locator`]): the
/// object's embedding `f` (first scale) queries the decoder's first-scale image features
/// plus their position encoding, one key per grid cell:
///
/// ```text
/// a = softmax( (W_q f) . (W_k (src + pe))^T / sqrt(c) )          over the g*g cells
/// mu = sum_cells a * center,  var = sum_cells a * (center - mu)^2 + cell^2 / 12   per axis
/// box = mu -+ sqrt(3 var)                                          (input pixels)
/// ```
///
/// i.e. the box of the uniform distribution with the attention's mean and variance (each
/// cell read as uniform over its extent). The box becomes SAM's box prompt, in place of
/// `f`, so a frozen SAM decoder receives the kind of prompt it was trained on (MobileSAM at 224 px on the
/// benchmark: ground-truth boxes give 0.81 mean IoU, centroid points 0.30).
#[derive(Module, Debug)]
pub struct SegLocator<B: Backend> {
    pub query: Linear<B>,
    pub key: Linear<B>,
    /// Keys from each cell's own pixels ([`ImageFeatures::cell_pixels`]), added to `key`'s.
    pub pixel_key: Linear<B>,
}

impl<B: Backend> SegLocator<B> {
    /// `src`: `[n, d, g, g]` each object's image features; `pe`: `[1, d, g, g]`; `pixels`:
    /// `[n, g*g, 3 * CELL_SUB^2]` each object's image's cell pixels; `f`:
    /// `[n, d]`; `input_size`: the square input side in pixels. Returns the boxes `[n, 4]`
    /// (x0, y0, x1, y1 in input pixels) and the attention `[n, g*g]` (row-major cells).
    pub fn locate(
        &self,
        src: Tensor<B, 4>,
        pe: Tensor<B, 4>,
        pixels: Tensor<B, 3>,
        f: Tensor<B, 2>,
        input_size: usize,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let [n, d, g, _] = src.dims();
        let x = (src + pe).reshape([n, d, g * g]).swap_dims(1, 2); // [n, g*g, d]
        let k = self.key.forward(x) + self.pixel_key.forward(pixels); // [n, g*g, c]
        let c = k.dims()[2];
        let q = self.query.forward(f).reshape([n, 1, c]);
        let logits = q.matmul(k.swap_dims(1, 2)).div_scalar((c as f64).sqrt()); // [n, 1, g*g]
        let a = burn::tensor::activation::softmax(logits, 2).reshape([n, g * g]);
        (attention_box(a.clone(), g, input_size), a)
    }
}

/// Sub-grid side of [`ImageFeatures::cell_pixels`].
pub const CELL_SUB: usize = 4;

/// Each of the `g x g` cells of `size`-pixel preprocessed images as `CELL_SUB x CELL_SUB`
/// RGB means (row-major cells, then sub-rows, sub-columns, channels).
fn cell_pixels(images: &[Preprocessed], size: usize, g: usize) -> Vec<f32> {
    let f = CELL_SUB * CELL_SUB * 3;
    let mut out = vec![0f32; images.len() * g * g * f];
    let sub = size as f64 / (g * CELL_SUB) as f64;
    for (i, im) in images.iter().enumerate() {
        let mut count = vec![0f32; g * g * CELL_SUB * CELL_SUB];
        let base = i * g * g * f;
        for y in 0..size {
            let sy = ((y as f64 / sub) as usize).min(g * CELL_SUB - 1);
            for x in 0..size {
                let sx = ((x as f64 / sub) as usize).min(g * CELL_SUB - 1);
                let (cy, cx, ry, rx) = (sy / CELL_SUB, sx / CELL_SUB, sy % CELL_SUB, sx % CELL_SUB);
                let k = (cy * g + cx) * CELL_SUB * CELL_SUB + ry * CELL_SUB + rx;
                count[k] += 1.0;
                for c in 0..3 {
                    out[base + k * 3 + c] += im.pixels[c * size * size + y * size + x];
                }
            }
        }
        for (k, &n) in count.iter().enumerate() {
            for c in 0..3 {
                out[base + k * 3 + c] /= n.max(1.0);
            }
        }
    }
    out
}

/// The box of [`SegLocator`]: for attention `a` `[n, g*g]` over a `g x g` grid of cells
/// tiling `[0, input_size)^2` (row-major), the uniform box with the attention's mean and
/// variance per axis, each cell read as uniform over its extent: `mu -+ sqrt(3 var)`,
/// `var = sum a (center - mu)^2 + cell^2 / 12`, clamped to the input. `[n, 4]` (x0, y0,
/// x1, y1). A one-hot attention gives its cell, a uniform one the whole input.
pub fn attention_box<B: Backend>(a: Tensor<B, 2>, g: usize, input_size: usize) -> Tensor<B, 2> {
    let [n, cells] = a.dims();
    let device = a.device();
    let a = a.reshape([n, 1, cells]);
    let cell = input_size as f64 / g as f64;
    let mut centers = Vec::with_capacity(g * g * 2);
    for i in 0..g {
        for j in 0..g {
            centers.push(((j as f64 + 0.5) * cell) as f32);
            centers.push(((i as f64 + 0.5) * cell) as f32);
        }
    }
    let centers = Tensor::<B, 2>::from_data(TensorData::new(centers, [g * g, 2]), &device).unsqueeze::<3>(); // [1, g*g, 2]
    let mu = a.clone().matmul(centers.clone().expand([n, g * g, 2])); // [n, 1, 2]
    let dev2 = (centers - mu.clone()).powi_scalar(2); // [n, g*g, 2]
    let var = a.matmul(dev2).add_scalar(cell * cell / 12.0); // [n, 1, 2]
    let half = var.mul_scalar(3.0).sqrt();
    let lo = (mu.clone() - half.clone()).clamp(0.0, input_size as f64);
    let hi = (mu + half).clamp(0.0, input_size as f64);
    Tensor::cat(vec![lo, hi], 2).reshape([n, 4])
}

/// PixelLM's `text_hidden_fcs[0]`: Linear(H, H) -> ReLU -> Linear(H, out_dim) -> Dropout(0).
#[derive(Module, Debug)]
pub struct TextHiddenFcs<B: Backend> {
    pub fc_1: Linear<B>,
    pub relu: Relu,
    pub fc_2: Linear<B>,
}

impl<B: Backend> TextHiddenFcs<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.fc_2.forward(self.relu.forward(self.fc_1.forward(x)))
    }
}

/// PixelLM with POPEN's additions. Field names are our checkpoint names; [`Layout`] maps
/// PixelLM's and LLaVA's.
#[derive(Module, Debug)]
pub struct PixelLm<B: Backend> {
    pub llm: Llama<B>,
    /// The CLIP tower (None with a `sam_encoder`).
    pub vision_tower: Option<ClipVisionModel<B>>,
    /// The frozen SAM image encoder of [`PixelLmConfig::sam_encoder`].
    pub sam_encoder: Option<TinyVit<B>>,
    pub mm_projector: Projector<B>,
    /// PixelLM's decoder-feature path (None with a `sam_encoder`).
    pub out_mm_projector: Option<Projector<B>>,
    pub image_feature_neck: Option<FeatureNeck<B>>,
    pub text_hidden_fcs: TextHiddenFcs<B>,
    pub decoder: PixelDecoder<B>,
    /// `p_hat` [prompt_embeddings, H].
    pub prompt_embeddings: Option<Param<Tensor<B, 2>>>,
    /// Seg-embedding feedback projection [scales * out_dim -> H].
    pub seg_feedback: Option<Linear<B>>,
    /// See [`PixelLmConfig::seg_locator`].
    pub seg_locator: Option<SegLocator<B>>,
    /// See [`PixelLmConfig::llm_image_pixels`]: `3 * CELL_SUB^2 -> H`.
    pub llm_pixel_proj: Option<Linear<B>>,
    #[module(skip)]
    pub cfg: PixelLmConfig,
}

/// Image features of a batch of images, computed once and shared by every sequence that
/// shows the image (K sampled answers, perturbed copies...).
#[derive(Debug, Clone)]
pub struct ImageFeatures<B: Backend> {
    /// For a model with a [`SegLocator`]: each decoder grid cell's pixels as a
    /// `CELL_SUB x CELL_SUB` grid of RGB means, `[n_images, g*g, 3 * CELL_SUB^2]`.
    pub cell_pixels: Option<Tensor<B, 3>>,
    /// LLM image tokens [n_images, llm_image_grid^2, H].
    pub llm_tokens: Tensor<B, 3>,
    /// Attention keep-mask of those tokens, row-major [n_images][llm_image_grid^2] (false =
    /// padding). Kept on the host: `assemble` lays it into every row's mask, and reading a
    /// device tensor back there would sync the device once per image piece.
    pub llm_keep: Vec<bool>,
    /// Decoder image embeddings per scale, each [n_images, out_dim, g, g].
    pub scales: Vec<Tensor<B, 4>>,
    /// (resized_hw, original_hw) per image, for mask postprocessing.
    pub sizes: Vec<((usize, usize), (usize, usize))>,
}

/// One piece of an input sequence.
#[derive(Debug, Clone)]
pub enum Segment<B: Backend> {
    /// Text tokens.
    Tokens(Vec<u32>),
    /// The image tokens of image `i` of the [`ImageFeatures`] batch.
    Image(usize),
    /// POPEN's `p_hat` (all `prompt_embeddings` vectors).
    Prompt,
    /// Segmentation embeddings fed back as tokens: [n, scales * out_dim] (Eq. 6).
    SegFeedback(Tensor<B, 2>),
}

/// A segment and, optionally, its per-position attention bias `gamma` (Eqs. 5-6); positions
/// without one get 0.
#[derive(Debug, Clone)]
pub struct Part<B: Backend> {
    pub segment: Segment<B>,
    pub gamma: Option<Vec<f32>>,
}

impl<B: Backend> Part<B> {
    pub fn new(segment: Segment<B>) -> Self {
        Part { segment, gamma: None }
    }
    pub fn with_gamma(segment: Segment<B>, gamma: Vec<f32>) -> Self {
        Part { segment, gamma: Some(gamma) }
    }
}

/// Which side sequences of a batch are padded on: left for generation (every row ends at
/// the same position), right for teacher forcing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Left,
    Right,
}

/// A batch of assembled input sequences.
#[derive(Debug, Clone)]
pub struct Assembled<B: Backend> {
    /// [b, L, H]
    pub embeds: Tensor<B, 3>,
    /// [b, L]: false = padding (or masked image padding), never attended.
    pub keep: Tensor<B, 2, Bool>,
    /// [b, L] additive attention bias, when any piece carried one.
    pub gamma: Option<Tensor<B, 2>>,
    /// [b, L] RoPE positions: 0.. over the row's own content (edge padding excluded, masked
    /// image padding counted, as PixelLM).
    pub positions: Tensor<B, 2, Int>,
    /// Content length of each row.
    pub lens: Vec<usize>,
    /// Start of each piece in padded coordinates, per row.
    pub piece_starts: Vec<Vec<usize>>,
    /// Padded length L.
    pub width: usize,
}

impl<B: Backend> PixelLm<B> {
    pub fn config(&self) -> &PixelLmConfig {
        &self.cfg
    }

    /// Encode preprocessed images (all at `image_size`).
    pub fn encode_images(&self, images: &[Preprocessed]) -> Result<ImageFeatures<B>> {
        self.encode_images_with(images, None)
    }

    /// The frozen SAM encoder's embeddings `[n, out_chans, g, g]` of preprocessed images
    /// (None for a CLIP model). The encoder never trains, so trainers compute these once per
    /// image and pass them to [`Self::encode_images_with`].
    pub fn sam_embeddings(&self, images: &[Preprocessed]) -> Result<Option<Tensor<B, 4>>> {
        let Some(enc) = &self.sam_encoder else {
            return Ok(None);
        };
        self.check_images(images)?;
        let pixels = crate::preprocess::to_tensor::<B>(images, &self.device())
            .map_err(|e| PixelLmError::Input(e.to_string()))?;
        Ok(Some(enc.forward(pixels)))
    }

    fn check_images(&self, images: &[Preprocessed]) -> Result<()> {
        if images.is_empty() {
            return input("encode_images: no images");
        }
        let s = self.cfg.image_size;
        for (i, im) in images.iter().enumerate() {
            if im.pixels.len() != 3 * s * s {
                return input(format!(
                    "image {i}: {} values, expected 3x{s}x{s} (preprocessed at image_size {s})",
                    im.pixels.len()
                ));
            }
        }
        Ok(())
    }

    /// [`Self::encode_images`], with the SAM embeddings of these images already computed
    /// ([`Self::sam_embeddings`]; ignored by a CLIP model).
    pub fn encode_images_with(&self, images: &[Preprocessed], sam: Option<Tensor<B, 4>>) -> Result<ImageFeatures<B>> {
        let cfg = &self.cfg;
        self.check_images(images)?;
        let n = images.len();
        let s = cfg.image_size;
        let device = self.device();
        let g = cfg.patch_grid();
        let lg = cfg.llm_image_grid;
        // PixelLM's masks (llava_arch.py encode_images): the ViT key mask over CLS + patches
        // (nearest from the unpadded pixel region), and the LLM's image-token mask, the
        // patch mask nearest-resized to the llm grid (F.interpolate nearest:
        // src = floor(dst * in / out)). The SAM encoder sees the padding (as SAM does); its
        // LLM tokens are masked the same way.
        let resized: Vec<(usize, usize)> = images.iter().map(|im| im.resized_hw).collect();
        let vit_keep = crate::clip::patch_key_mask_values(&resized, s, s / g);
        let mut llm_keep = Vec::with_capacity(n * lg * lg);
        for i in 0..n {
            let row = &vit_keep[i * (g * g + 1) + 1..(i + 1) * (g * g + 1)];
            for ly in 0..lg {
                for lx in 0..lg {
                    let (py, px) = (ly * g / lg, lx * g / lg);
                    llm_keep.push(row[py * g + px]);
                }
            }
        }
        let (grid, scales) = if let Some(enc) = &self.sam_encoder {
            let emb = match sam {
                Some(e) => e,
                None => {
                    let pixels = crate::preprocess::to_tensor::<B>(images, &device)
                        .map_err(|e| PixelLmError::Input(e.to_string()))?;
                    enc.forward(pixels)
                }
            };
            let want = [n, self.cfg.vision_width(), g, g];
            if emb.dims() != want {
                return input(format!("SAM embeddings are {:?}, expected {want:?}", emb.dims()));
            }
            // The LLM's copy may carry SAM's dense positional encoding (`llm_image_pe`); the
            // decoder's scale stays the plain embedding (its two-way transformer adds the PE to
            // the keys itself).
            let grid = if cfg.llm_image_pe {
                let pe = self.decoder.prompt_encoder.get_dense_pe(); // [1, C, g, g]
                emb.clone() + pe.expand(emb.dims())
            } else {
                emb.clone()
            };
            (grid, vec![emb])
        } else {
            let (Some(tower), Some(out_proj), Some(neck)) =
                (&self.vision_tower, &self.out_mm_projector, &self.image_feature_neck)
            else {
                return Err(PixelLmError::Config(format!(
                    "{}: no vision tower (a CLIP model needs vision_tower, out_mm_projector \
                     and image_feature_neck)",
                    cfg.name
                )));
            };
            let pixels =
                crate::preprocess::to_tensor::<B>(images, &device).map_err(|e| PixelLmError::Input(e.to_string()))?;
            let vit_keep = Tensor::<B, 2, Bool>::from_data(TensorData::new(vit_keep, [n, g * g + 1]), &device);
            let hs = tower
                .forward_hidden_states_masked(pixels, &cfg.vision_select_layers, Some(vit_keep))
                .map_err(|e| PixelLmError::Vision(e.to_string()))?;
            // Drop CLS ("patch" select feature).
            let patches: Vec<Tensor<B, 3>> = hs
                .into_iter()
                .map(|h| {
                    let [b, t, c] = h.dims();
                    h.slice([0..b, 1..t, 0..c])
                })
                .collect();
            let vdim = cfg.vision.hidden_size;
            let grid = patches[0].clone().swap_dims(1, 2).reshape([n, vdim, g, g]);
            let h = cfg.llm.hidden_size;
            let scales = patches
                .into_iter()
                .map(|p| {
                    let x = out_proj.forward(p); // [n, g*g, H]
                    let x = x.swap_dims(1, 2).reshape([n, h, g, g]);
                    neck.forward(x)
                })
                .collect();
            (grid, scales)
        };
        // LLM tokens: scale-0 features on a g x g grid -> bilinear to lg x lg -> mm_projector.
        // Bilinear, align_corners=False, as PixelLM; burn 0.21's interpolate has no backward.
        let vdim = cfg.vision_width();
        let small = if lg == g { grid } else { resize_bilinear(grid, lg, lg) };
        let small = small.reshape([n, vdim, lg * lg]).swap_dims(1, 2);
        let mut llm_tokens = self.mm_projector.forward(small);
        if let Some(proj) = &self.llm_pixel_proj {
            let v = cell_pixels(images, s, lg);
            let px = Tensor::<B, 3>::from_data(TensorData::new(v, [n, lg * lg, 3 * CELL_SUB * CELL_SUB]), &device);
            llm_tokens = llm_tokens + proj.forward(px);
        }
        let cell_pixels = self.seg_locator.as_ref().map(|_| {
            let g = cfg.decoder.image_embedding_size;
            let v = cell_pixels(images, s, g);
            Tensor::<B, 3>::from_data(TensorData::new(v, [n, g * g, 3 * CELL_SUB * CELL_SUB]), &device)
        });
        Ok(ImageFeatures {
            cell_pixels,
            llm_tokens,
            llm_keep,
            scales,
            sizes: images.iter().map(|im| (im.resized_hw, im.original_hw)).collect(),
        })
    }

    fn device(&self) -> B::Device {
        self.text_hidden_fcs.fc_1.weight.val().device()
    }

    fn piece_len(&self, p: &Segment<B>) -> Result<usize> {
        Ok(match p {
            Segment::Tokens(ids) => ids.len(),
            Segment::Image(_) => self.cfg.image_tokens(),
            Segment::Prompt => {
                if self.prompt_embeddings.is_none() {
                    return input("sequence asks for p_hat but the model has prompt_embeddings = 0");
                }
                self.cfg.prompt_embeddings
            }
            Segment::SegFeedback(t) => {
                if self.seg_feedback.is_none() {
                    return input("sequence feeds seg embeddings back but seg_feedback is off");
                }
                let [_, d] = t.dims();
                let want = self.cfg.num_scales() * self.cfg.out_dim;
                if d != want {
                    return input(format!("seg feedback of width {d}, expected {want}"));
                }
                t.dims()[0]
            }
        })
    }

    /// Embed a batch of sequences (each a list of pieces) into one padded batch.
    pub fn assemble(
        &self,
        rows: &[Vec<Part<B>>],
        images: Option<&ImageFeatures<B>>,
        padding: Padding,
    ) -> Result<Assembled<B>> {
        if rows.is_empty() {
            return input("assemble: empty batch");
        }
        let device = self.device();
        let h = self.cfg.llm.hidden_size;
        let vocab = self.cfg.llm.vocab_size as u32;
        let mut lens = Vec::with_capacity(rows.len());
        for (r, row) in rows.iter().enumerate() {
            let mut len = 0;
            for (j, p) in row.iter().enumerate() {
                let l = self.piece_len(&p.segment)?;
                if let Some(g) = &p.gamma {
                    if g.len() != l {
                        return input(format!("row {r} piece {j}: gamma has {} values for {l} positions", g.len()));
                    }
                }
                match &p.segment {
                    Segment::Tokens(ids) => {
                        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
                            return input(format!("row {r} piece {j}: token id {bad} >= vocab size {vocab}"));
                        }
                    }
                    Segment::Image(i) => {
                        let n = images.map(|f| f.sizes.len()).unwrap_or(0);
                        if *i >= n {
                            return input(format!("row {r} piece {j}: image {i} but {n} images were encoded"));
                        }
                    }
                    _ => {}
                }
                len += l;
            }
            if len == 0 {
                return input(format!("row {r} is empty"));
            }
            lens.push(len);
        }
        let width = *lens.iter().max().expect("non-empty");
        let any_gamma = rows.iter().flatten().any(|p| p.gamma.is_some());
        let mut row_embeds = Vec::with_capacity(rows.len());
        let mut keep = vec![false; rows.len() * width];
        let mut gamma = vec![0f32; rows.len() * width];
        let mut positions = vec![0i64; rows.len() * width];
        let mut piece_starts = Vec::with_capacity(rows.len());
        for (r, row) in rows.iter().enumerate() {
            let pad = width - lens[r];
            let start = if padding == Padding::Left { pad } else { 0 };
            let mut parts: Vec<Tensor<B, 2>> = Vec::new();
            let mut pos = start;
            let mut starts = Vec::with_capacity(row.len());
            for p in row {
                starts.push(pos);
                let l = self.piece_len(&p.segment)?;
                let (emb, piece_keep): (Tensor<B, 2>, Option<Vec<bool>>) = match &p.segment {
                    Segment::Tokens(ids) => {
                        let t = Tensor::<B, 2, Int>::from_data(
                            TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, l]),
                            &device,
                        );
                        (self.llm.embed(t).reshape([l, h]), None)
                    }
                    Segment::Image(i) => {
                        let f = images.expect("checked above");
                        let [_, t, _] = f.llm_tokens.dims();
                        let e = f.llm_tokens.clone().slice([*i..*i + 1, 0..t, 0..h]).reshape([t, h]);
                        (e, Some(f.llm_keep[i * t..(i + 1) * t].to_vec()))
                    }
                    Segment::Prompt => (self.prompt_embeddings.as_ref().expect("checked").val(), None),
                    Segment::SegFeedback(t) => (self.seg_feedback.as_ref().expect("checked").forward(t.clone()), None),
                };
                for k in 0..l {
                    keep[r * width + pos + k] = piece_keep.as_ref().map(|v| v[k]).unwrap_or(true);
                    if let Some(g) = &p.gamma {
                        gamma[r * width + pos + k] = g[k];
                    }
                }
                parts.push(emb);
                pos += l;
            }
            // RoPE positions: 0.. over the row's own content, masked image padding
            // included, as PixelLM (no position_ids anywhere: arange over the expanded row,
            // in training and in generation); [`PixelLm::generate`] continues from there.
            for k in 0..lens[r] {
                positions[r * width + start + k] = k as i64;
            }
            let body = Tensor::cat(parts, 0);
            let row_t = if pad == 0 {
                body
            } else {
                let z = Tensor::<B, 2>::zeros([pad, h], &device);
                match padding {
                    Padding::Left => Tensor::cat(vec![z, body], 0),
                    Padding::Right => Tensor::cat(vec![body, z], 0),
                }
            };
            row_embeds.push(row_t.unsqueeze_dim::<3>(0));
            piece_starts.push(starts);
        }
        let b = rows.len();
        Ok(Assembled {
            embeds: Tensor::cat(row_embeds, 0),
            keep: Tensor::from_data(TensorData::new(keep, [b, width]), &device),
            gamma: any_gamma.then(|| Tensor::from_data(TensorData::new(gamma, [b, width]), &device)),
            positions: Tensor::from_data(TensorData::new(positions, [b, width]), &device),
            lens,
            piece_starts,
            width,
        })
    }

    /// Full (teacher-forced) forward: final-normed hidden states [b, L, H].
    pub fn forward_hidden(&self, asm: &Assembled<B>) -> Result<Tensor<B, 3>> {
        let mut cache = self.llm.new_cache();
        let extras = AttnExtras {
            positions: Some(asm.positions.clone()),
            key_keep: Some(asm.keep.clone()),
            gamma: asm.gamma.clone(),
        };
        Ok(self.llm.forward_embeds(asm.embeds.clone(), &extras, &mut cache)?)
    }

    /// Segmentation embeddings `f` from final hidden states: for each object (a list of the
    /// `seg_group_len` positions of its codebook tokens in row `row`), the PixelLM
    /// embedding [n_objects, scales, out_dim] (see the module docs for the one-position
    /// shift and the per-scale averaging).
    pub fn seg_embeddings(&self, hidden: Tensor<B, 3>, objects: &[(usize, Vec<usize>)]) -> Result<Tensor<B, 3>> {
        let [b, l, h] = hidden.dims();
        let group = self.cfg.seg_group_len();
        let (scales, seg_num, out) = (self.cfg.num_scales(), self.cfg.seg_token_num, self.cfg.out_dim);
        if objects.is_empty() {
            return Ok(Tensor::zeros([0, scales, out], &hidden.device()));
        }
        let mut idx = Vec::with_capacity(objects.len() * group);
        for (o, (row, pos)) in objects.iter().enumerate() {
            if *row >= b {
                return input(format!("object {o}: row {row} of a batch of {b}"));
            }
            if pos.len() != group {
                return input(format!("object {o}: {} codebook positions, expected {group}", pos.len()));
            }
            for &p in pos {
                if p == 0 || p >= l {
                    return input(format!("object {o}: codebook position {p} outside 1..{l}"));
                }
                idx.push((row * l + p - 1) as i64);
            }
        }
        let n = idx.len();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [n]), &hidden.device());
        let picked = hidden.reshape([b * l, h]).select(0, idx);
        let proj = self.text_hidden_fcs.forward(picked); // [n, out]
        let proj = proj.reshape([objects.len(), scales, seg_num, out]);
        // PixelLM's multiseg_scalar: plain Python floats 1/seg_token_num, never trained.
        Ok(proj.mean_dim(2).reshape([objects.len(), scales, out]))
    }

    /// Masks from segmentation embeddings: low-res fused logits through the decoder, then
    /// postprocessed to each object's original image size. Returns one [H_i, W_i] logit map
    /// per object and the fused low-res logits [n, low, low].
    pub fn decode_masks(
        &self,
        feats: &ImageFeatures<B>,
        f: Tensor<B, 3>,
        image_index: &[usize],
    ) -> Result<(Vec<Tensor<B, 2>>, Tensor<B, 3>)> {
        let (masks, low, _) = self.decode_masks_located(feats, f, image_index)?;
        Ok((masks, low))
    }

    /// [`Self::decode_masks`], plus the seg locator's boxes `[n, 4]` (x0, y0, x1, y1 in
    /// input pixels) and attention `[n, g*g]` (row-major grid cells) when the model has one.
    pub fn decode_masks_located(
        &self,
        feats: &ImageFeatures<B>,
        f: Tensor<B, 3>,
        image_index: &[usize],
    ) -> Result<(Vec<Tensor<B, 2>>, Tensor<B, 3>, Option<(Tensor<B, 2>, Tensor<B, 2>)>)> {
        let [n, _, _] = f.dims();
        if n != image_index.len() {
            return input(format!("{n} embeddings but {} image indices", image_index.len()));
        }
        let (extra, points) = match &self.seg_locator {
            Some(loc) if n > 0 => {
                let (prompts, points, attention) = self.locator_prompts(loc, feats, f.clone(), image_index)?;
                (Some(prompts), Some((points, attention)))
            }
            _ => (None, None),
        };
        let out = self
            .decoder
            .forward_with_prompts(&feats.scales, f, image_index, extra)
            .map_err(|e| PixelLmError::Decoder(e.to_string()))?;
        let low = out.low_res_masks;
        let [_, lh, lw] = low.dims();
        let mut masks = Vec::with_capacity(n);
        for (o, &img) in image_index.iter().enumerate() {
            let (resized, original) = feats.sizes[img];
            let one = low.clone().slice([o..o + 1, 0..lh, 0..lw]);
            let m = crate::pixel_decoder::postprocess_masks(one, self.cfg.image_size, resized, original)
                .map_err(|e| PixelLmError::Decoder(e.to_string()))?;
            let [_, hh, ww] = m.dims();
            masks.push(m.reshape([hh, ww]));
        }
        Ok((masks, low, points))
    }

    /// The [`SegLocator`]'s box prompts `[n, 2, d]`, its boxes `[n, 4]` and attention
    /// `[n, g*g]` for objects with embeddings `f` `[n, scales, d]`.
    fn locator_prompts(
        &self,
        loc: &SegLocator<B>,
        feats: &ImageFeatures<B>,
        f: Tensor<B, 3>,
        image_index: &[usize],
    ) -> Result<(Tensor<B, 3>, Tensor<B, 2>, Tensor<B, 2>)> {
        let [n, _, d] = f.dims();
        let Some(src) = feats.scales.first() else {
            return input("the locator needs the decoder's image features".to_string());
        };
        if let Some(&i) = image_index.iter().find(|&&i| i >= src.dims()[0]) {
            return input(format!("image index {i} but {} images", src.dims()[0]));
        }
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(image_index.iter().map(|&i| i as i64).collect::<Vec<_>>(), [n]),
            &f.device(),
        );
        let Some(pixels) = &feats.cell_pixels else {
            return input("the locator needs the cell pixels of the image features".to_string());
        };
        let src = src.clone().select(0, idx.clone());
        let pixels = pixels.clone().select(0, idx);
        let pe = self.decoder.prompt_encoder.get_dense_pe();
        let f0 = f.slice([0..n, 0..1, 0..d]).reshape([n, d]);
        let (boxes, attention) = loc.locate(src, pe, pixels, f0, self.cfg.decoder.input_image_size);
        Ok((self.decoder.prompt_encoder.box_prompts(boxes.clone()), boxes, attention))
    }

    /// Sample answers for left-padded rows (see [`crate::sampling::generate_at`]), with
    /// the same positions as [`PixelLm::assemble`] gives (PixelLM's arange).
    pub fn generate(&self, asm: &Assembled<B>, cfg: &SamplingConfig, stop_ids: &[u32]) -> Result<Vec<Generation<B>>> {
        let rows = left_padded_positions(asm);
        Ok(generate_at(&self.llm, asm.embeds.clone(), asm.keep.clone(), Some(&rows), asm.gamma.clone(), cfg, stop_ids)?)
    }

    /// The KV cache of a left-padded assembled batch (positions as [`Self::generate`]), for
    /// decodes that share it ([`crate::sampling::Prefix`]).
    pub fn prefill(&self, asm: &Assembled<B>) -> Result<Prefix<B>> {
        let rows = left_padded_positions(asm);
        Ok(crate::sampling::prefill(&self.llm, asm.embeds.clone(), asm.keep.clone(), Some(&rows), asm.gamma.clone())?)
    }

    /// `base` followed by the assembled `rows` (one per prefix row), their positions
    /// continuing each row's: the same states as assembling each prefix row's pieces and
    /// `rows[r]` as one sequence, without re-reading the prefix. Returns the longer prefix,
    /// the new positions' final-normed states `[b, L, H]` and the extension's assembly
    /// (`piece_starts` index those states). Left padding to decode from the result, right
    /// padding for a teacher-forced pass.
    pub fn extend(
        &self,
        base: &Prefix<B>,
        rows: &[Vec<Part<B>>],
        images: Option<&ImageFeatures<B>>,
        padding: Padding,
    ) -> Result<(Prefix<B>, Tensor<B, 3>, Assembled<B>)> {
        if rows.len() != base.rows() {
            return input(format!("extend: {} rows for a prefix of {}", rows.len(), base.rows()));
        }
        let asm = self.assemble(rows, images, padding)?;
        let positions = positions_from(&asm, padding, Some(&base.next_pos));
        let (prefix, hidden) =
            base.extend(&self.llm, asm.embeds.clone(), asm.keep.clone(), &positions, asm.gamma.clone())?;
        Ok((prefix, hidden, asm))
    }

    /// Token log-probs [b, L-1 -> aligned to L]: `logp[r, t]` = log p(token at t | < t) for
    /// text-token positions given as `targets[r] = (start, ids)`; returns one Vec per row.
    pub fn response_logprobs(&self, hidden: Tensor<B, 3>, targets: &[(usize, Vec<u32>)]) -> Result<Tensor<B, 2>> {
        let [b, l, _h] = hidden.dims();
        if targets.len() != b {
            return input(format!("{} targets for a batch of {b}", targets.len()));
        }
        let max = targets.iter().map(|t| t.1.len()).max().unwrap_or(0);
        if max == 0 {
            return Ok(Tensor::zeros([b, 0], &hidden.device()));
        }
        // Gather the predicting positions (start-1 .. start+len-1) per row, padded with the
        // row's first predicting position (masked out by the caller through the lengths).
        let mut pos = Vec::with_capacity(b * max);
        let mut tgt = Vec::with_capacity(b * max);
        for (r, (start, ids)) in targets.iter().enumerate() {
            if *start == 0 || start + ids.len() > l {
                return input(format!("row {r}: response at {start}..{} does not fit 1..{l}", start + ids.len()));
            }
            for k in 0..max {
                let kk = k.min(ids.len().saturating_sub(1));
                pos.push((r * l + start + kk - 1) as i64);
                tgt.push(ids.get(kk).copied().unwrap_or(0) as i64);
            }
        }
        let device = hidden.device();
        let [_, _, h] = hidden.dims();
        let sel = hidden
            .reshape([b * l, h])
            .select(0, Tensor::from_data(TensorData::new(pos, [b * max]), &device))
            .reshape([b, max, h]);
        let logits = self.llm.logits(sel);
        let tgt = Tensor::<B, 2, Int>::from_data(TensorData::new(tgt, [b, max]), &device);
        Ok(crate::llama::token_logprobs(logits, tgt))
    }
}

/// Key layouts of checkpoints we load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Our own checkpoints ([`save`] of a [`PixelLm`]).
    Native,
    /// A released PixelLM checkpoint (`PixelLMForCausalLM.state_dict()`, original LLaVA
    /// names: `model.layers.*`, `model.mm_projector.{0,2}`, `model.out_mm_projector.{0,2}`,
    /// `model.text_hidden_fcs.0.{0,2}`, `model.image_feature_neck.{0..3}`,
    /// `model.mask_decoder.*`, `model.prompt_encoder.*`; see docs/checkpoint-keys.md).
    Pixellm,
    /// An original LLaVA checkpoint (`LlavaLlamaForCausalLM`: `model.layers.*`,
    /// `model.mm_projector.{0,2}`): PixelLM training starts from one. PixelLM's own parts
    /// (`out_mm_projector`, `image_feature_neck`, `text_hidden_fcs`, the decoder) keep their
    /// initialization.
    Llava,
    /// A Hugging Face `LlavaForConditionalGeneration`, in either key layout: transformers >=
    /// 4.52 in memory (`model.vision_tower.*`, `model.multi_modal_projector.linear_{1,2}`,
    /// `model.language_model.*`, `lm_head`) or as `save_pretrained` writes it
    /// (`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
    /// `language_model.lm_head`); PixelLM's parts are fresh as with `Llava`.
    LlavaHf,
}

impl Layout {
    /// Prefix rules from this layout to our module tree.
    pub fn remap(self) -> Remap {
        let llava_common = |r: Remap| {
            r.drop("*rotary_emb.inv_freq")
                .prefix("model.vision_tower.vision_tower.", "vision_tower.")
                .prefix("model.mm_projector.0.", "mm_projector.linear_1.")
                .prefix("model.mm_projector.2.", "mm_projector.linear_2.")
        };
        match self {
            Layout::Native => Remap::none(),
            Layout::Pixellm => llava_common(Remap::none())
                // POPEN's own tensors in a `model-export --layout pixellm` folder.
                .prefix("popen.", "")
                .prefix("model.out_mm_projector.0.", "out_mm_projector.linear_1.")
                .prefix("model.out_mm_projector.2.", "out_mm_projector.linear_2.")
                .prefix("model.image_feature_neck.0.", "image_feature_neck.conv_1.")
                .prefix("model.image_feature_neck.1.", "image_feature_neck.norm_1.")
                .prefix("model.image_feature_neck.2.", "image_feature_neck.conv_2.")
                .prefix("model.image_feature_neck.3.", "image_feature_neck.norm_2.")
                .prefix("model.text_hidden_fcs.0.0.", "text_hidden_fcs.fc_1.")
                .prefix("model.text_hidden_fcs.0.2.", "text_hidden_fcs.fc_2.")
                .prefix("model.mask_decoder.", "decoder.mask_decoder.")
                .prefix("model.prompt_encoder.", "decoder.prompt_encoder.")
                .prefix("model.", "llm.model.")
                .prefix("lm_head.", "llm.lm_head."),
            Layout::Llava => {
                llava_common(Remap::none()).prefix("model.", "llm.model.").prefix("lm_head.", "llm.lm_head.")
            }
            Layout::LlavaHf => Remap::none()
                .drop("*rotary_emb.inv_freq")
                .prefix("model.vision_tower.", "vision_tower.")
                .prefix("model.multi_modal_projector.", "mm_projector.")
                .prefix("model.language_model.", "llm.model.")
                .prefix("lm_head.", "llm.lm_head.")
                // What transformers 4.57's save_pretrained still writes (the legacy layout).
                .prefix("multi_modal_projector.", "mm_projector.")
                .prefix("language_model.model.", "llm.model.")
                .prefix("language_model.lm_head.", "llm.lm_head."),
        }
    }

    /// The tensors of `model` this layout cannot hold and `ck` does not hold, by name (they
    /// keep their initialization; [`load`] returns them). A `model-export` folder holds
    /// POPEN's tensors as `popen.*`.
    fn fresh_names<B: Backend>(self, model: &PixelLm<B>, ck: &Checkpoint) -> Vec<String> {
        weights::named_tensors(model)
            .into_iter()
            .map(|(n, _, _)| n)
            .filter(|n| self.lacks(n) && !ck.tensors.contains_key(n))
            .collect()
    }

    /// Module tensors this layout cannot hold (they keep their initialization).
    fn lacks(self, name: &str) -> bool {
        let popen = name.starts_with("prompt_embeddings") || name.starts_with("seg_feedback.");
        let pixellm = ["out_mm_projector.", "image_feature_neck.", "text_hidden_fcs.", "decoder."]
            .iter()
            .any(|p| name.starts_with(p));
        match self {
            Layout::Native => false,
            Layout::Pixellm => popen,
            Layout::Llava | Layout::LlavaHf => popen || pixellm,
        }
    }
}

/// Load a checkpoint into a fresh model of `cfg`.
///
/// Every tensor must match, with two deliberate exceptions:
/// - a non-native checkpoint cannot hold POPEN's `prompt_embeddings` / `seg_feedback`, and
///   a LLaVA one not PixelLM's parts either ([`Layout`]): they keep their fresh
///   initialization and are returned by name;
/// - released PixelLM checkpoints do not hold the CLIP tower (its merge script filters
///   `vision_tower` out; see docs/checkpoint-keys.md): pass the CLIP checkpoint as
///   `vision_tower`. A tower found in the checkpoint is used otherwise.
///
/// The tower is loaded at its own image size and its position embeddings resized to
/// `image_size` as PixelLM does ([`ClipVisionModel::with_image_size`]).
pub fn load<B: Backend>(
    cfg: &PixelLmConfig,
    path: impl AsRef<Path>,
    layout: Layout,
    vision_tower: Option<&Path>,
    device: &B::Device,
) -> Result<(PixelLm<B>, Vec<String>)> {
    cfg.validate()?;
    let mut ck = Checkpoint::open(path.as_ref())?.remapped(&layout.remap());
    if cfg.sam_encoder.is_some() {
        // No CLIP tower: the SAM encoder is one of the checkpoint's modules.
        let model = cfg.init(device)?;
        let fresh = layout.fresh_names(&model, &ck);
        let model = weights::apply_checkpoint_keeping(model, &ck, DType::F32, false, &|n| layout.lacks(n))?;
        return Ok((model, fresh));
    }
    let tower_ck = ck.sub("vision_tower");
    ck.tensors.retain(|n, _| !n.starts_with("vision_tower."));
    // A tower at its own size, or already at `image_size` (a tower saved from a PixelLM
    // model, e.g. `model-export`'s `vision_tower/`): the position table says which.
    let at_size = |tower_ck: &Checkpoint| {
        let pos = tower_ck.tensors.get("vision_model.embeddings.position_embedding.weight").map(|t| t.shape[0]);
        let mut tcfg = cfg.vision.clone();
        if pos == Some((cfg.image_size / cfg.vision.patch_size).pow(2) + 1) {
            tcfg.image_size = cfg.image_size;
        }
        tcfg
    };
    let tower = if !tower_ck.tensors.is_empty() {
        weights::apply_checkpoint(at_size(&tower_ck).init(device), &tower_ck, DType::F32, false)?
    } else if let Some(tp) = vision_tower {
        let vision = |e: &dyn std::fmt::Display| PixelLmError::Vision(format!("{}: {e}", tp.display()));
        let tck = Checkpoint::open(tp).map_err(|e| vision(&e))?.remapped(&crate::clip::checkpoint_remap());
        let tcfg = at_size(&tck);
        tcfg.validate().map_err(|e| vision(&e))?;
        weights::apply_checkpoint(tcfg.init(device), &tck, DType::F32, false).map_err(|e| vision(&e))?
    } else {
        return Err(PixelLmError::Config(format!(
            "{}: the checkpoint holds no vision tower (released PixelLM checkpoints leave it out): pass the CLIP checkpoint (--vision-tower)",
            path.as_ref().display()
        )));
    };
    let tower = if tower.config.image_size != cfg.image_size {
        tower.with_image_size(cfg.image_size).map_err(|e| PixelLmError::Vision(e.to_string()))?
    } else {
        tower
    };
    let model = cfg.init(device)?;
    let fresh = layout.fresh_names(&model, &ck);
    let mut model = weights::apply_checkpoint_keeping(model, &ck, DType::F32, false, &|n| {
        n.starts_with("vision_tower.") || layout.lacks(n)
    })?;
    model.vision_tower = Some(tower);
    Ok((model, fresh))
}

impl<B: Backend> PixelLm<B> {
    /// Fill a `sam_encoder` model's SAM parts from an official SAM checkpoint
    /// (`mobile_sam.pt`): `image_encoder.*` -> `sam_encoder.*`, `prompt_encoder.*` ->
    /// `decoder.prompt_encoder.*`, `mask_decoder.transformer.*` -> the one scale's
    /// `decoder.mask_decoder.transformer.0.*` and the rest of `mask_decoder.*` (tokens,
    /// upscaling, hypernetwork MLPs, IoU head) by name. The decoder then computes SAM's
    /// single-mask output for the seg embeddings as sparse prompts: `level_embed` (PixelLM's
    /// addition to the tokens) is zeroed; `upsample_2x` and `pe1` (unused with one scale)
    /// and everything outside the SAM parts keep their initialization. Strict: every SAM
    /// tensor must land (BatchNorm's `num_batches_tracked` counters and, when the config has
    /// no classifier, TinyViT's ImageNet `head`/`norm_head` aside), and every SAM-part
    /// tensor of the model must be in the file.
    pub fn init_from_sam(self, path: impl AsRef<Path>) -> Result<Self> {
        let Some(tv) = &self.cfg.sam_encoder else {
            return Err(PixelLmError::Config(format!(
                "{}: init_from_sam needs a model with a sam_encoder (the tiny-sam preset)",
                self.cfg.name
            )));
        };
        let drop_head = tv.num_classes == 0;
        let remap = Remap::none()
            .prefix("image_encoder.", "sam_encoder.")
            .prefix("prompt_encoder.", "decoder.prompt_encoder.")
            .prefix("mask_decoder.transformer.", "decoder.mask_decoder.transformer.0.")
            .prefix("mask_decoder.", "decoder.mask_decoder.");
        let mut ck = Checkpoint::open(path.as_ref())?.remapped(&remap);
        ck.tensors.retain(|n, _| {
            !n.ends_with(".num_batches_tracked")
                && !(drop_head && (n.starts_with("sam_encoder.head.") || n.starts_with("sam_encoder.norm_head.")))
        });
        let sam_part = |n: &str| {
            (n.starts_with("sam_encoder.") || n.starts_with("decoder."))
                && !n.starts_with("decoder.mask_decoder.upsample_2x.")
                && !n.starts_with("decoder.mask_decoder.pe1.")
                && !n.starts_with("decoder.mask_decoder.level_embed.")
        };
        let mut model = weights::apply_checkpoint_keeping(self, &ck, DType::F32, false, &|n| !sam_part(n))?;
        let lvl = model.decoder.mask_decoder.level_embed.weight.val();
        let (dims, device) = (lvl.dims(), lvl.device());
        model.decoder.mask_decoder.level_embed.weight = Param::from_tensor(Tensor::zeros(dims, &device));
        Ok(model)
    }
}

/// Save a model as one safetensors file in our native layout, with its config as JSON in
/// the metadata (`popen.config`), atomically.
pub fn save<B: Backend>(model: &PixelLm<B>, path: impl AsRef<Path>) -> Result<()> {
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("popen.config".to_string(), serde_json::to_string(&model.cfg).expect("config serializes"));
    weights::save(model, path, &meta)?;
    Ok(())
}

/// The config stored in one of our checkpoints.
pub fn saved_config(path: impl AsRef<Path>) -> Result<PixelLmConfig> {
    let path = path.as_ref();
    let ck = Checkpoint::open(path)?;
    let text = ck.metadata.get("popen.config").ok_or_else(|| {
        PixelLmError::Config(format!("{}: no popen.config metadata (not a popen checkpoint)", path.display()))
    })?;
    serde_json::from_str(text)
        .map_err(|e| PixelLmError::ConfigFile { path: path.display().to_string(), source: Box::new(e) })
}

/// PixelLM's positions of a left-padded assembled batch: every position of the expanded row
/// numbered (`arange`), the padding before it clamped to 0 (masked anyway).
fn left_padded_positions<B: Backend>(asm: &Assembled<B>) -> Vec<Vec<i64>> {
    positions_from(asm, Padding::Left, None)
}

/// The positions of an assembled batch padded on `padding`'s side, row `r` numbered from
/// `start[r]` (0 without `start`); padding entries get a clamped value (masked anyway).
fn positions_from<B: Backend>(asm: &Assembled<B>, padding: Padding, start: Option<&[usize]>) -> Vec<Vec<i64>> {
    asm.lens
        .iter()
        .enumerate()
        .map(|(r, &len)| {
            let pad = if padding == Padding::Left { asm.width - len } else { 0 };
            let from = start.map_or(0, |s| s[r]) as i64;
            (0..asm.width).map(|j| from + (j as i64 - pad as i64).max(0)).collect()
        })
        .collect()
}

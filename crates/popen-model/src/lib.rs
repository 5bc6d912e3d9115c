//! popen model: PixelLM in burn (CLIP ViT + LLaMA + segmentation codebook + multi-scale
//! pixel decoder) with what POPEN adds, and the checkpoint readers it loads from.
//!
//! - [`weights`]: the one loading path (safetensors files and sharded folders, prefix
//!   remapping, strict name/shape checks) and our own checkpoints.
//! - [`gguf`], [`tokenizer`]: llama.cpp GGUF (real SmolLM2 weights) and tokenizers.
//! - [`llama`], [`sampling`], [`lora`]: the LLaMA decoder, batched generation, LoRA adapters.
//! - [`clip`], [`preprocess`]: the CLIP vision tower and PixelLM's image preprocessing.
//! - [`tiny_vit`]: MobileSAM's TinyViT-5M image encoder (popen-sam's proposer; the `tiny-sam`
//!   preset's frozen vision tower).
//! - [`sam`], [`pixel_decoder`]: SAM's two-way transformer and PixelLM's
//!   `MaskDecoderMultiScale`.
//! - [`pixellm`]: the assembled model.
//! - [`minilm`]: BERT sentence encoder (all-MiniLM-L6-v2), POPEN's `h = BERT(y)` of `L_ti`.

pub mod bench;
pub mod bundle;
pub mod clip;
pub mod export;
pub mod gguf;
pub mod infer;
pub mod llama;
pub mod llava;
pub mod lora;
pub mod minilm;
pub mod pixel_decoder;
pub mod pixellm;
pub mod preprocess;
pub mod sam;
pub mod sampling;
pub mod tiny_vit;
pub mod tokenizer;
pub mod weights;

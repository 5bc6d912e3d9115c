//! popen model: PixelLM in burn (CLIP ViT + LLaMA + segmentation codebook + multi-scale
//! pixel decoder) with what POPEN adds, and the checkpoint readers it loads from. Rooms:
//!
//! - [`llm`]: the LLaMA decoder ([`llama`]), batched generation ([`sampling`]), LoRA
//!   ([`lora`]), tokenizers ([`tokenizer`]) and the MiniLM sentence encoder ([`minilm`]:
//!   all-MiniLM-L6-v2, POPEN's `h = BERT(y)` of `L_ti`).
//! - [`vision`]: the CLIP vision tower ([`clip`]) and PixelLM's image preprocessing
//!   ([`preprocess`]).
//! - [`seg`]: SAM's modules ([`sam`]: two-way transformer and mask decoder; [`tiny_vit`]:
//!   MobileSAM's TinyViT-5M encoder, popen-sam's proposer and the `tiny-sam` preset's frozen
//!   tower) and PixelLM's `MaskDecoderMultiScale` ([`pixel_decoder`]).
//! - [`io`]: the one loading path for named tensors ([`weights`]: safetensors files and
//!   sharded folders, PyTorch pickles, prefix remapping, strict name/shape checks), llama.cpp
//!   GGUF ([`gguf`]), model folders ([`bundle`]), the LLaVA/PixelLM layouts ([`llava`]) and
//!   [`export`] back to them.
//! - [`pixellm`]: the assembled model; [`infer`]: greedy answers and masks; [`bench`]: the
//!   decode benchmark's workloads.
//!
//! Each module is also reachable at the crate root (`popen_model::llama`), its path before
//! the rooms.

pub mod bench;
pub mod infer;
pub mod io;
pub mod llm;
pub mod pixellm;
pub mod seg;
pub mod vision;

// The modules' paths before the rooms (`popen_model::llama`, ...), kept for every caller.
pub use io::{bundle, export, gguf, llava, weights};
pub use llm::{llama, lora, minilm, sampling, tokenizer};
pub use seg::{pixel_decoder, sam, tiny_vit};
pub use vision::{clip, preprocess};

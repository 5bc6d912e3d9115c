//! popen model: PixelLM in burn (issue 3, in progress) and the checkpoint readers it loads
//! from. Today: [`gguf`], the GGUF reader used to check the LLaMA code on real weights
//! (SmolLM2-135M-Instruct from `make assets`).

pub mod gguf;
pub mod llama;
pub mod tokenizer;

//! popen-model integration tests, one binary (one link of burn instead of ten; CI disk).

mod clip;
mod common;
mod config_generations;
mod export;
mod gguf;
mod llama;
mod llama_ext;
mod minilm;
mod pixel_decoder;
mod pixellm;
mod pixellm_reference;
mod tokenizer;
mod tokenizer_tiny;
mod weights;

//! The language side: the LLaMA decoder, batched generation and sampling, LoRA adapters,
//! tokenizers (PixelLM's added tokens, the tiny model's BPE), and the MiniLM sentence encoder
//! (POPEN's `h = BERT(y)` of `L_ti`).

pub mod llama;
pub mod lora;
pub mod minilm;
pub mod sampling;
pub mod tokenizer;

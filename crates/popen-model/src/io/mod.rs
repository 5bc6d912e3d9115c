//! Checkpoints in and out: the one loading path for named tensors (safetensors, PyTorch
//! pickles), llama.cpp GGUF, our model folders (bundles), the LLaVA/PixelLM name layouts and
//! the export back to them.

pub mod bundle;
pub mod export;
pub mod gguf;
pub mod llava;
pub mod weights;

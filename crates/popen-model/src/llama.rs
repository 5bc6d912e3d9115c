//! LLaMA decoder (in progress).

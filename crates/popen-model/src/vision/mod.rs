//! The image side of the LLM: the CLIP vision tower and PixelLM's image preprocessing.

pub mod clip;
pub mod preprocess;

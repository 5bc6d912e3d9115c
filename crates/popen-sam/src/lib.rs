//! popen's SAM mask proposals (issue 7).
//!
//! - [`tiny_vit`]: MobileSAM's TinyViT-5M image encoder.
//! - [`vit`]: SAM's ViT-B/L/H image encoder (`ImageEncoderViT`), official key layout.
//! - [`amg`]: the automatic mask generator (point grids, crops, filtering, NMS, RLE).
//!
//! The prompt encoder and mask decoder are [`popen_model::sam`]'s, shared with PixelLM's
//! pixel decoder.

pub mod amg;
pub mod model;
pub mod stage;
pub use popen_model::tiny_vit;
pub mod vit;

//! Segmentation: SAM's modules in one place (the two-way transformer and mask decoder, the
//! TinyViT image encoder of MobileSAM) and PixelLM's multi-scale pixel decoder built on them.

pub mod pixel_decoder;
pub mod sam;
pub mod tiny_vit;

//! popen-sam tests: one binary (link time and disk), one module per part.

mod amg;
mod stage;
mod tiny_sam;
mod tiny_vit;
mod vit;

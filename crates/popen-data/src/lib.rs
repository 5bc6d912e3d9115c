//! popen data tools: the embedded synthetic benchmark ([`synth`]), the MUSE importer
//! ([`muse`]) and overlay rendering of samples ([`render`]).

pub mod muse;
pub mod render;
pub mod synth;

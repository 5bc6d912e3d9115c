//! Shared by the model tests: where the fetched assets live.

use std::path::{Path, PathBuf};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// SmolLM2-135M-Instruct (GGUF Q4_1), fetched by `make assets`.
pub fn smollm2_path() -> PathBuf {
    let p = repo_root().join("data/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run make assets (it fetches SmolLM2-135M-Instruct.Q4_1.gguf)", p.display());
    p
}

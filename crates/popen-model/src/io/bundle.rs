//! A model folder: what every stage reads with `--model DIR` and writes as its output model.
//!
//! ```text
//! DIR/model.toml          the PixelLmConfig (TOML, every field named)
//! DIR/model.safetensors   weights, our native layout (PyTorch orientation; readable with
//!                         safetensors.torch.load_file)
//! DIR/tokenizer.json      the tokenizer with PixelLM's tokens (<im_start>, <im_end>, [SEG*])
//! DIR/tokenizer_config.json
//! ```
//!
//! Folders are written file by file with atomic renames, `model.safetensors` last, so a
//! folder whose `model.safetensors` exists is complete.

use std::path::{Path, PathBuf};

use burn::prelude::*;

use crate::pixellm::{self, Layout, PixelLm, PixelLmConfig, PixelLmError};
use crate::tokenizer::Tokenizer;

type Result<T> = std::result::Result<T, PixelLmError>;

pub const CONFIG_FILE: &str = "model.toml";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A loaded model folder.
pub struct Bundle<B: Backend> {
    pub dir: PathBuf,
    pub model: PixelLm<B>,
    pub tokenizer: Tokenizer,
}

pub(crate) fn io_err(path: &Path, e: impl std::fmt::Display) -> PixelLmError {
    PixelLmError::Input(format!("{}: {e}", path.display()))
}

/// Write `cfg` as `dir/model.toml` (atomically).
pub(crate) fn save_config(dir: &Path, cfg: &PixelLmConfig) -> Result<()> {
    let toml =
        toml::to_string_pretty(cfg).map_err(|e| PixelLmError::Config(format!("cannot write config as TOML: {e}")))?;
    popen_core::shard::atomic_write(dir.join(CONFIG_FILE), toml.as_bytes()).map_err(|e| io_err(dir, e))
}

/// Write a model folder (creating `dir`).
pub fn save<B: Backend>(dir: &Path, model: &PixelLm<B>, tokenizer: &Tokenizer) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    check_tokenizer(model.config(), tokenizer, dir)?;
    save_config(dir, model.config())?;
    tokenizer.save(dir.join(TOKENIZER_FILE)).map_err(|e| io_err(dir, e))?;
    pixellm::save(model, dir.join(WEIGHTS_FILE))
}

/// The fingerprint of a model folder: sha256 over its config, weights and tokenizer
/// (`popen-model/1`, then each file's sha256). The preference shards record the fingerprint
/// of the model they were collected with, and `dpo` checks its `--model` against it.
pub fn fingerprint(dir: &Path) -> Result<String> {
    let mut text = String::from("popen-model/1");
    for f in [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE] {
        let (sha, _) = popen_core::manifest::sha256_file(dir.join(f)).map_err(|e| io_err(dir, e))?;
        text.push_str(&format!("\n{f} {sha}"));
    }
    Ok(popen_core::manifest::sha256_hex(text.as_bytes()))
}

/// Open a model folder written by [`save`].
pub fn open<B: Backend>(dir: &Path, device: &B::Device) -> Result<Bundle<B>> {
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.is_file() {
        return Err(PixelLmError::Input(format!(
            "{}: not a popen model folder (no {WEIGHTS_FILE}; expected {CONFIG_FILE}, {WEIGHTS_FILE}, {TOKENIZER_FILE})",
            dir.display()
        )));
    }
    let cfg = PixelLmConfig::from_toml_file(dir.join(CONFIG_FILE))?;
    let tokenizer = Tokenizer::from_file(dir.join(TOKENIZER_FILE)).map_err(|e| io_err(dir, e))?;
    check_tokenizer(&cfg, &tokenizer, dir)?;
    let (model, _) = pixellm::load(&cfg, &weights, Layout::Native, None, device)?;
    Ok(Bundle { dir: dir.to_path_buf(), model, tokenizer })
}

/// Open a foreign checkpoint (a released PixelLM, LLaVA) with an explicit config and
/// tokenizer. Returns the parameters the layout cannot hold (kept at initialization).
pub fn open_foreign<B: Backend>(
    cfg: &PixelLmConfig,
    checkpoint: &Path,
    layout: Layout,
    tokenizer: &Path,
    vision_tower: Option<&Path>,
    device: &B::Device,
) -> Result<(Bundle<B>, Vec<String>)> {
    let mut tok = Tokenizer::from_file(tokenizer).map_err(|e| io_err(tokenizer, e))?;
    tok.add_pixellm_tokens(cfg.seg_group_len()).map_err(|e| io_err(tokenizer, e))?;
    check_tokenizer(cfg, &tok, tokenizer)?;
    let (model, fresh) = pixellm::load(cfg, checkpoint, layout, vision_tower, device)?;
    Ok((Bundle { dir: checkpoint.to_path_buf(), model, tokenizer: tok }, fresh))
}

/// The tokenizer must hold PixelLM's tokens and fit the model's vocabulary.
pub fn check_tokenizer(cfg: &PixelLmConfig, tok: &Tokenizer, at: &Path) -> Result<()> {
    let names = crate::tokenizer::seg_token_names(cfg.seg_group_len()).map_err(|e| io_err(at, e))?;
    let mut missing: Vec<String> = names
        .iter()
        .map(String::as_str)
        .chain([crate::tokenizer::IM_START_TOKEN, crate::tokenizer::IM_END_TOKEN])
        .filter(|t| tok.token_to_id(t).is_none())
        .map(String::from)
        .collect();
    if tok.eos_id().is_none() {
        missing.push("an EOS token".into());
    }
    if !missing.is_empty() {
        return Err(PixelLmError::Input(format!("{}: tokenizer lacks {}", at.display(), missing.join(", "))));
    }
    if tok.vocab_size() > cfg.llm.vocab_size {
        return Err(PixelLmError::Input(format!(
            "{}: tokenizer has {} tokens, more than the model's vocab_size {}",
            at.display(),
            tok.vocab_size(),
            cfg.llm.vocab_size
        )));
    }
    Ok(())
}

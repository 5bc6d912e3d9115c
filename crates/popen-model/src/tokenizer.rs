//! The LLM tokenizer: a byte-level BPE (`tokenizers::Tokenizer`) built either from a
//! `tokenizer.json` ([`Tokenizer::from_file`]) or from the tokenizer metadata of a GGUF file
//! ([`Tokenizer::from_gguf`]), e.g. SmolLM2-135M-Instruct from `make assets`.
//!
//! From a GGUF with `tokenizer.ggml.model == "gpt2"` the tokenizer is built the way
//! transformers' GGUF loader (`GGUFGPTConverter`) and llama.cpp do:
//!
//! * model: BPE with vocab `tokenizer.ggml.tokens[i] -> i` and merges
//!   `tokenizer.ggml.merges` (each split on its first space), no unk, no dropout;
//! * pre-tokenizer: `ByteLevel(add_prefix_space=false, use_regex=true)` (the GPT-2 regex),
//!   preceded by `Digits(individual_digits=true)` when `tokenizer.ggml.pre == "smollm"`
//!   (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_SMOLLM` splits every `\p{N}` first, and so does
//!   SmolLM2's own tokenizer.json; SmolLM2's vocabulary has no multi-digit tokens, so the split
//!   changes no ids there, but it keeps the pipeline identical);
//! * decoder: ByteLevel;
//! * every token with `tokenizer.ggml.token_type == 3` (CONTROL) is added as a special
//!   token, so `<|im_start|>` / `<|im_end|>` encode to single ids.
//!
//! `tokenizer.ggml.add_bos_token` (false for SmolLM2) decides whether `encode(.., true)`
//! prepends the BOS id.
//!
//! Tested against `tools/reference/tokenizer_fixture.py` (HF tokenizers + gguf-py + jinja2)
//! in `tests/tokenizer.rs`.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use crate::gguf::{GgufError, GgufFile};

/// GGUF token type id of control (special) tokens (llama.cpp `LLAMA_TOKEN_TYPE_CONTROL`).
pub const TOKEN_TYPE_CONTROL: i64 = 3;

/// The system message SmolLM2's chat template inserts when the conversation does not start
/// with one (used by [`Tokenizer::chat_prompt`] only when no chat template is known).
pub const SMOLLM2_DEFAULT_SYSTEM: &str =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// Everything that can go wrong building or using a [`Tokenizer`]. Each variant names the
/// file (and the metadata key, where there is one).
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path} is missing: run make assets (it fetches the model assets)")]
    Missing { path: PathBuf },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: metadata key '{key}': {msg}")]
    Metadata {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("tokenizer ({source_name}): {op}: {msg}")]
    Op {
        source_name: String,
        op: &'static str,
        msg: String,
    },
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// A byte-level BPE tokenizer plus the bits of model metadata a prompt needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
    /// Where it came from (for error messages).
    source_name: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source_name)
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

/// The sidecar `save` writes next to tokenizer.json (HF's `tokenizer_config.json` layout,
/// the subset used here).
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct TokenizerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bos_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    eos_token: Option<String>,
    #[serde(default)]
    add_bos_token: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chat_template: Option<String>,
}

fn config_path(tokenizer_json: &Path) -> PathBuf {
    tokenizer_json.with_file_name("tokenizer_config.json")
}

impl Tokenizer {
    /// Loads a `tokenizer.json`. If a `tokenizer_config.json` sits next to it (as [`save`]
    /// writes, and as HF model repos have), its `bos_token`, `eos_token`, `add_bos_token` and
    /// `chat_template` are read too.
    ///
    /// [`save`]: Tokenizer::save
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(TokenizerError::Missing { path: path.into() });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::File {
            path: path.into(),
            msg: format!("cannot load tokenizer.json: {e}"),
        })?;
        let cfg_path = config_path(path);
        let cfg: TokenizerConfig = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| TokenizerError::File {
                path: cfg_path.clone(),
                msg: e.to_string(),
            })?;
            serde_json::from_str(&text).map_err(|e| TokenizerError::File {
                path: cfg_path.clone(),
                msg: format!("bad tokenizer_config.json: {e}"),
            })?
        } else {
            TokenizerConfig::default()
        };
        let lookup = |key: &str, tok: &Option<String>| -> Result<Option<u32>> {
            match tok {
                None => Ok(None),
                Some(t) => inner
                    .token_to_id(t)
                    .map(Some)
                    .ok_or_else(|| TokenizerError::Metadata {
                        path: cfg_path.clone(),
                        key: key.into(),
                        msg: format!("token {t:?} is not in the vocabulary"),
                    }),
            }
        };
        let bos_id = lookup("bos_token", &cfg.bos_token)?;
        let eos_id = lookup("eos_token", &cfg.eos_token)?;
        Ok(Tokenizer {
            inner,
            bos_id,
            eos_id,
            add_bos: cfg.add_bos_token,
            chat_template: cfg.chat_template,
            source_name: path.display().to_string(),
        })
    }

    /// Opens a GGUF file and builds its tokenizer; a missing file says to run `make assets`.
    pub fn from_gguf_path(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(TokenizerError::Missing { path: path.into() });
        }
        Tokenizer::from_gguf(&GgufFile::open(path)?)
    }

    /// Builds the tokenizer from a GGUF's `tokenizer.ggml.*` metadata (module docs).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
        let path = gguf.path().to_path_buf();
        let meta_err = |key: &str, msg: String| TokenizerError::Metadata {
            path: path.clone(),
            key: key.into(),
            msg,
        };
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(meta_err(
                "tokenizer.ggml.model",
                format!(
                    "tokenizer model {model:?} is not supported (only \"gpt2\" byte-level BPE)"
                ),
            ));
        }
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
        let merges_raw = gguf.get_str_array("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match gguf.metadata().get("tokenizer.ggml.token_type") {
            None => vec![],
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_i64()).collect::<Option<Vec<_>>>())
                .ok_or_else(|| {
                    meta_err(
                        "tokenizer.ggml.token_type",
                        format!("expected ARRAY of integers, found {}", v.type_name()),
                    )
                })?,
        };
        if !types.is_empty() && types.len() != tokens.len() {
            return Err(meta_err(
                "tokenizer.ggml.token_type",
                format!("{} entries for {} tokens", types.len(), tokens.len()),
            ));
        }
        let pre = gguf
            .metadata()
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .map(str::to_owned);

        let mut vocab: Vocab = Vocab::default();
        vocab.reserve(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            let id = u32::try_from(i)
                .map_err(|_| meta_err("tokenizer.ggml.tokens", "too many tokens".into()))?;
            // First occurrence wins, as in a tokenizer.json (duplicates would be a bad file).
            vocab.entry((*t).to_owned()).or_insert(id);
        }
        let mut merges = Vec::with_capacity(merges_raw.len());
        for (i, m) in merges_raw.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                meta_err(
                    "tokenizer.ggml.merges",
                    format!("merge {i} ({m:?}) has no space"),
                )
            })?;
            merges.push((a.to_owned(), b.to_owned()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| meta_err("tokenizer.ggml.merges", format!("cannot build BPE: {e}")))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tok: PreTokenizerWrapper = match pre.as_deref() {
            Some("smollm") => Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ])
            .into(),
            _ => byte_level.into(),
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL)
            .map(|(t, _)| AddedToken::from(*t, true))
            .collect();
        inner.add_special_tokens(&special);

        let opt_id = |key: &str| -> Result<Option<u32>> {
            match gguf.metadata().get(key) {
                None => Ok(None),
                Some(v) => {
                    let id = v
                        .as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .filter(|&x| (x as usize) < tokens.len())
                        .ok_or_else(|| meta_err(key, format!("not a token id: {v:?}")))?;
                    Ok(Some(id))
                }
            }
        };
        let bos_id = opt_id("tokenizer.ggml.bos_token_id")?;
        let eos_id = opt_id("tokenizer.ggml.eos_token_id")?;
        let add_bos = gguf
            .metadata()
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let chat_template = gguf
            .metadata()
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        Ok(Tokenizer {
            inner,
            bos_id,
            eos_id,
            add_bos,
            chat_template,
            source_name: path.display().to_string(),
        })
    }

    fn op_err(&self, op: &'static str, e: impl std::fmt::Display) -> TokenizerError {
        TokenizerError::Op {
            source_name: self.source_name.clone(),
            op,
            msg: e.to_string(),
        }
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their
    /// single ids. `add_special` prepends BOS when the model asks for it
    /// (`tokenizer.ggml.add_bos_token`; false for SmolLM2).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| self.op_err("encode", e))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            if let Some(b) = self.bos_id {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`; `skip_special` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| self.op_err("decode", e))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens (49152 for SmolLM2).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Writes `path` (a tokenizer.json) and, next to it, `tokenizer_config.json` with the
    /// BOS/EOS tokens, `add_bos_token` and the chat template, so [`from_file`] restores them.
    ///
    /// [`from_file`]: Tokenizer::from_file
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.inner
            .save(path, true)
            .map_err(|e| TokenizerError::File {
                path: path.into(),
                msg: format!("cannot write tokenizer.json: {e}"),
            })?;
        let cfg = TokenizerConfig {
            bos_token: self.bos_id.and_then(|i| self.inner.id_to_token(i)),
            eos_token: self.eos_id.and_then(|i| self.inner.id_to_token(i)),
            add_bos_token: self.add_bos,
            chat_template: self.chat_template.clone(),
        };
        let cfg_path = config_path(path);
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| TokenizerError::File {
            path: cfg_path.clone(),
            msg: e.to_string(),
        })?;
        std::fs::write(&cfg_path, text).map_err(|e| TokenizerError::File {
            path: cfg_path,
            msg: e.to_string(),
        })
    }

    /// The default system block the chat template inserts before a conversation that does not
    /// start with a system message, e.g. for SmolLM2
    /// `"<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"`.
    /// Taken from the template text: the literal from `<|im_start|>system\n` to the next
    /// `<|im_end|>` plus a newline. `None` when the template has no such literal. Without a
    /// template at all, SmolLM2's default is assumed.
    pub fn default_system_block(&self) -> Option<String> {
        const START: &str = "<|im_start|>system\n";
        const END: &str = "<|im_end|>";
        let Some(t) = self.chat_template.as_deref() else {
            return Some(format!("{START}{SMOLLM2_DEFAULT_SYSTEM}{END}\n"));
        };
        let s = t.find(START)?;
        let rest = &t[s..];
        let e = rest.find(END)?;
        let body = &rest[START.len()..e];
        // The literal must be plain text (no jinja expression inside the system body).
        if body.contains("{{") || body.contains("{%") || body.contains('\'') {
            return None;
        }
        Some(format!("{START}{body}{END}\n"))
    }

    /// The ChatML prompt for one user message with the generation prompt appended — what
    /// SmolLM2's `tokenizer.chat_template` renders for
    /// `messages=[{"role": "user", "content": user}], add_generation_prompt=True`:
    ///
    /// ```text
    /// <|im_start|>system
    /// You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    /// <|im_start|>user
    /// {user}<|im_end|>
    /// <|im_start|>assistant
    /// ```
    ///
    /// (plus a trailing newline). The template inserts that default system message because
    /// the first message is not a system message; the system text is read from the template
    /// ([`default_system_block`](Tokenizer::default_system_block)).
    pub fn chat_prompt(&self, user: &str) -> String {
        let mut s = self.default_system_block().unwrap_or_default();
        s.push_str("<|im_start|>user\n");
        s.push_str(user);
        s.push_str("<|im_end|>\n<|im_start|>assistant\n");
        s
    }
}

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
//!
//! The `tiny` model's tokenizer is trained here ([`Tokenizer::train_tiny`]) on the embedded
//! benchmark's text with the tokenizers crate's byte-level BPE trainer.
//!
//! PixelLM's side (see `docs/checkpoint-keys.md`, section 4, for the sources):
//! [`Tokenizer::add_pixellm_tokens`] adds `[SEG0]..`, `<im_start>`, `<im_end>` as PixelLM's
//! training script does, [`Tokenizer::pixellm_prompt`] renders its `llava_v1` conversation,
//! [`Tokenizer::encode_with_image`] splits at `<image>` like LLaVA's `tokenizer_image_token`,
//! and [`expand_seg`] / [`collapse_seg`] / [`seg_groups`] translate between our shards'
//! `<seg>` marker and PixelLM's seg-token groups.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BpeTrainer;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use popen_core::shard::SEG_TOKEN;

use crate::gguf::{GgufError, GgufFile};

/// GGUF token type id of control (special) tokens (llama.cpp `LLAMA_TOKEN_TYPE_CONTROL`).
pub const TOKEN_TYPE_CONTROL: i64 = 3;

/// The system message SmolLM2's chat template inserts when the conversation does not start
/// with one (used by [`Tokenizer::chat_prompt`] only when no chat template is known).
pub const SMOLLM2_DEFAULT_SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// Everything that can go wrong building or using a [`Tokenizer`]. Each variant names the
/// file (and the metadata key, where there is one).
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path} is missing: run make assets (it fetches the model assets)")]
    Missing { path: PathBuf },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: metadata key '{key}': {msg}")]
    Metadata { path: PathBuf, key: String, msg: String },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("tokenizer ({source_name}): {op}: {msg}")]
    Op { source_name: String, op: &'static str, msg: String },
    /// Bad arguments to a text conversion or training call (no tokenizer involved yet).
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    /// A token sequence whose seg-token groups are malformed ([`seg_group_positions`]).
    #[error("seg token groups: {0}")]
    SegGroups(String),
}

pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// A byte-level BPE tokenizer plus the bits of model metadata a prompt needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    /// Padding id (PixelLM pads with `<unk>`); `None` when the source names none.
    pad_id: Option<u32>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pad_token: Option<String>,
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
    /// writes, and as HF model repos have), its `bos_token`, `eos_token`, `pad_token`,
    /// `add_bos_token` and `chat_template` are read too.
    ///
    /// [`save`]: Tokenizer::save
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(TokenizerError::Missing { path: path.into() });
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::File { path: path.into(), msg: format!("cannot load tokenizer.json: {e}") })?;
        let cfg_path = config_path(path);
        let cfg: TokenizerConfig = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path)
                .map_err(|e| TokenizerError::File { path: cfg_path.clone(), msg: e.to_string() })?;
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
                Some(t) => inner.token_to_id(t).map(Some).ok_or_else(|| TokenizerError::Metadata {
                    path: cfg_path.clone(),
                    key: key.into(),
                    msg: format!("token {t:?} is not in the vocabulary"),
                }),
            }
        };
        let bos_id = lookup("bos_token", &cfg.bos_token)?;
        let eos_id = lookup("eos_token", &cfg.eos_token)?;
        let pad_id = lookup("pad_token", &cfg.pad_token)?;
        Ok(Tokenizer {
            inner,
            bos_id,
            eos_id,
            pad_id,
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
        let meta_err = |key: &str, msg: String| TokenizerError::Metadata { path: path.clone(), key: key.into(), msg };
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(meta_err(
                "tokenizer.ggml.model",
                format!("tokenizer model {model:?} is not supported (only \"gpt2\" byte-level BPE)"),
            ));
        }
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
        let merges_raw = gguf.get_str_array("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match gguf.metadata().get("tokenizer.ggml.token_type") {
            None => vec![],
            Some(v) => v.as_array().and_then(|a| a.iter().map(|x| x.as_i64()).collect::<Option<Vec<_>>>()).ok_or_else(
                || {
                    meta_err(
                        "tokenizer.ggml.token_type",
                        format!("expected ARRAY of integers, found {}", v.type_name()),
                    )
                },
            )?,
        };
        if !types.is_empty() && types.len() != tokens.len() {
            return Err(meta_err(
                "tokenizer.ggml.token_type",
                format!("{} entries for {} tokens", types.len(), tokens.len()),
            ));
        }
        let pre = gguf.metadata().get("tokenizer.ggml.pre").and_then(|v| v.as_str()).map(str::to_owned);

        let mut vocab: Vocab = Vocab::default();
        vocab.reserve(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            let id = u32::try_from(i).map_err(|_| meta_err("tokenizer.ggml.tokens", "too many tokens".into()))?;
            // First occurrence wins, as in a tokenizer.json (duplicates would be a bad file).
            vocab.entry((*t).to_owned()).or_insert(id);
        }
        let mut merges = Vec::with_capacity(merges_raw.len());
        for (i, m) in merges_raw.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| meta_err("tokenizer.ggml.merges", format!("merge {i} ({m:?}) has no space")))?;
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
        let pad_id = opt_id("tokenizer.ggml.padding_token_id")?;
        let add_bos = gguf.metadata().get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false);
        let chat_template = gguf.metadata().get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_owned);
        Ok(Tokenizer { inner, bos_id, eos_id, pad_id, add_bos, chat_template, source_name: path.display().to_string() })
    }

    fn op_err(&self, op: &'static str, e: impl std::fmt::Display) -> TokenizerError {
        TokenizerError::Op { source_name: self.source_name.clone(), op, msg: e.to_string() }
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their
    /// single ids. `add_special` prepends BOS when the model asks for it
    /// (`tokenizer.ggml.add_bos_token`; false for SmolLM2).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.op_err("encode", e))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            if let Some(b) = self.bos_id {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Token ids of `text` read literally: the tokenizer's normalizer, pre-tokenizer and model
    /// (BPE) only, never its added tokens, so `"<im_start>"`, `"[SEG0]"` or `"</s>"` written in
    /// the text become the ordinary pieces of those characters and decode back to them. Text
    /// without an added token's string gets the same ids as [`encode`](Tokenizer::encode)
    /// (the same pipeline, which splits only at added tokens). No BOS.
    pub fn encode_literal(&self, text: &str) -> Result<Vec<u32>> {
        use tokenizers::{Model, Normalizer, OffsetType, PreTokenizedString, PreTokenizer};
        let err = |e: tokenizers::Error| self.op_err("encode_literal", e);
        let mut pre = PreTokenizedString::from(text);
        if let Some(n) = self.inner.get_normalizer() {
            pre.normalize(|s| n.normalize(s)).map_err(err)?;
        }
        if let Some(p) = self.inner.get_pre_tokenizer() {
            p.pre_tokenize(&mut pre).map_err(err)?;
        }
        let model = self.inner.get_model();
        pre.tokenize(|s| model.tokenize(s.get())).map_err(err)?;
        let enc = pre.into_encoding(None, 0, OffsetType::Byte).map_err(err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| self.op_err("decode", e))
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

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Writes `path` (a tokenizer.json) and, next to it, `tokenizer_config.json` with the
    /// BOS/EOS/PAD tokens, `add_bos_token` and the chat template, so [`from_file`] restores
    /// them.
    ///
    /// [`from_file`]: Tokenizer::from_file
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        self.inner.save(path, true).map_err(|e| TokenizerError::File {
            path: path.into(),
            msg: format!("cannot write tokenizer.json: {e}"),
        })?;
        let cfg = TokenizerConfig {
            bos_token: self.bos_id.and_then(|i| self.inner.id_to_token(i)),
            eos_token: self.eos_id.and_then(|i| self.inner.id_to_token(i)),
            pad_token: self.pad_id.and_then(|i| self.inner.id_to_token(i)),
            add_bos_token: self.add_bos,
            chat_template: self.chat_template.clone(),
        };
        let cfg_path = config_path(path);
        let text = serde_json::to_string_pretty(&cfg)
            .map_err(|e| TokenizerError::File { path: cfg_path.clone(), msg: e.to_string() })?;
        std::fs::write(&cfg_path, text).map_err(|e| TokenizerError::File { path: cfg_path, msg: e.to_string() })
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

// ------------------------------------------------------------------ tiny tokenizer

/// The special tokens of the `tiny` model's tokenizer, LLaMA's names and ids (`<unk>` 0,
/// `<s>` 1, `</s>` 2) so that PixelLM's conventions (BOS first, `</s>` closing an answer,
/// padding with `<unk>`) carry over unchanged.
pub const TINY_SPECIALS: &[&str] = &["<unk>", "<s>", "</s>"];

/// Size of the byte-level alphabet every [`Tokenizer::train_tiny`] vocabulary contains.
pub const BYTE_ALPHABET: usize = 256;

impl Tokenizer {
    /// Trains a byte-level BPE tokenizer (GPT-2 pre-tokenizer, no prefix space, ByteLevel
    /// decoder, like [`Tokenizer::from_gguf`] builds) on `texts` with the tokenizers crate's
    /// BPE trainer, for the `tiny` model.
    ///
    /// - The vocabulary is `specials` (ids `0..specials.len()`, in order), then all 256 byte
    ///   symbols, then merges up to `vocab_size` entries in total (fewer when the texts run
    ///   out of pairs to merge: size the model from [`vocab_size`](Tokenizer::vocab_size),
    ///   not from the budget). Because every byte is in
    ///   the vocabulary, unseen words never map to an unknown token (they fall back to
    ///   shorter pieces, at worst single bytes).
    /// - `specials` become special added tokens: each encodes to one id and is never split.
    ///   `<s>` is the BOS (and `encode(.., true)` prepends it, as LLaMA does), `</s>` the EOS
    ///   and `<unk>` the padding id when they are among `specials` (see [`TINY_SPECIALS`]).
    /// - Deterministic: the same texts (in any order), size and specials give the same
    ///   tokenizer.json bytes ([`Tokenizer::save`]); the trainer breaks ties between equally
    ///   frequent pairs by pair id, and the alphabet is sorted.
    pub fn train_tiny<'a>(
        texts: impl Iterator<Item = &'a str>,
        vocab_size: usize,
        specials: &[&str],
    ) -> Result<Tokenizer> {
        let invalid = |msg: String| TokenizerError::Invalid { op: "train_tiny", msg };
        let mut seen = HashSet::new();
        for s in specials {
            if s.is_empty() {
                return Err(invalid("an empty special token".into()));
            }
            if !seen.insert(*s) {
                return Err(invalid(format!("special token {s:?} is listed twice")));
            }
        }
        let min = specials.len() + BYTE_ALPHABET;
        if vocab_size < min {
            return Err(invalid(format!(
                "vocab_size {vocab_size} is smaller than the {} specials plus the {BYTE_ALPHABET} byte symbols",
                specials.len()
            )));
        }
        // The trainer wants a Send iterator; the texts are small, so collect them first.
        let texts: Vec<&str> = texts.collect();
        if texts.iter().all(|t| t.is_empty()) {
            return Err(invalid("no training text".into()));
        }

        let bpe = BPE::builder().build().map_err(|e| invalid(format!("cannot build an empty BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let special_tokens: Vec<AddedToken> = specials.iter().map(|s| AddedToken::from(*s, true)).collect();
        let trainer = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .special_tokens(special_tokens)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);
        inner.train(&mut trainer, texts.into_iter()).map_err(|e| invalid(format!("BPE training failed: {e}")))?;

        let has = |t: &str| specials.contains(&t);
        let id_of = |t: &str| if has(t) { inner.token_to_id(t) } else { None };
        let bos_id = id_of("<s>");
        let eos_id = id_of("</s>");
        let pad_id = id_of("<unk>");
        Ok(Tokenizer {
            bos_id,
            eos_id,
            pad_id,
            add_bos: bos_id.is_some(),
            chat_template: None,
            source_name: "train_tiny".into(),
            inner,
        })
    }
}

// ------------------------------------------------------------------ PixelLM tokens

/// LLaVA's image placeholder in prompt text (`DEFAULT_IMAGE_TOKEN`); never a vocabulary
/// token: [`Tokenizer::encode_with_image`] splits the text there.
pub const IMAGE_TOKEN: &str = "<image>";
/// Added (special) token before the image (`DEFAULT_IM_START_TOKEN`).
pub const IM_START_TOKEN: &str = "<im_start>";
/// Added (special) token after the image (`DEFAULT_IM_END_TOKEN`).
pub const IM_END_TOKEN: &str = "<im_end>";
/// LLaVA's patch token (`DEFAULT_IMAGE_PATCH_TOKEN`); PixelLM does not use it
/// (`mm_use_im_patch_token = False`) and it is never added here.
pub const IMAGE_PATCH_TOKEN: &str = "<im_patch>";
/// The id LLaVA puts where the image goes (`IMAGE_TOKEN_INDEX`).
pub const IMAGE_TOKEN_INDEX: i64 = -200;
/// Label of positions without a loss (`IGNORE_INDEX`).
pub const IGNORE_INDEX: i64 = -100;
/// Image embeddings the one `<image>` id expands to in PixelLM (16 x 16); hence its seg
/// positions shift by `PIXELLM_IMAGE_TOKENS - 1` = 255.
pub const PIXELLM_IMAGE_TOKENS: usize = 256;
/// System message of LLaVA's `llava_v1` conversation template, PixelLM's `--conv_type`.
pub const LLAVA_V1_SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.";

/// Ids of PixelLM's extra tokens in one tokenizer ([`Tokenizer::add_pixellm_tokens`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PixelLmTokens {
    /// `<im_patch>` if the vocabulary happens to have it (PixelLM never uses it).
    pub image_patch: Option<u32>,
    pub im_start: u32,
    pub im_end: u32,
    /// The seg-token group in order: `[SEG0]..[SEG{n-1}]`, or `[SEG]` when n = 1. PixelLM
    /// reads member `s * seg_token_num + t` as seg token `t` of feature scale `s`.
    pub seg: Vec<u32>,
    /// The ids of `" "`, the separator PixelLM's answers put between group members
    /// (`" ".join(...)`); [`seg_groups`] accepts exactly this or nothing between members.
    pub seg_sep: Vec<u32>,
    /// Padding id: the tokenizer's, else `<unk>` (PixelLM sets `pad_token = unk_token`), else
    /// the EOS.
    pub pad: u32,
    pub eos: u32,
    pub bos: Option<u32>,
}

/// A piece of a prompt split at the image placeholder ([`Tokenizer::encode_with_image`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Tokens(Vec<u32>),
    /// Where the image embeddings go (LLaVA's `-200`).
    Image,
}

/// PixelLM's names of `n` seg tokens: `[SEG]` alone when n = 1 (its single-token mode),
/// else `[SEG0]..[SEG{n-1}]` (`train_ds.py`: `seg_token_num * image_feature_scale_num`
/// tokens; 6 in the released recipe).
pub fn seg_token_names(n: usize) -> Result<Vec<String>> {
    match n {
        0 => Err(TokenizerError::Invalid { op: "seg_token_names", msg: "a seg group needs at least one token".into() }),
        1 => Ok(vec!["[SEG]".to_string()]),
        _ => Ok((0..n).map(|i| format!("[SEG{i}]")).collect()),
    }
}

/// The text of one object's seg group: the names joined by single spaces, e.g.
/// `"[SEG0] [SEG1] [SEG2] [SEG3] [SEG4] [SEG5]"`.
pub fn seg_group_text(n: usize) -> Result<String> {
    Ok(seg_token_names(n)?.join(" "))
}

/// Our answer format (each target followed by [`SEG_TOKEN`] `<seg>`) to PixelLM's (each
/// object followed by its whole seg group): every `<seg>` becomes [`seg_group_text`], which is
/// what PixelLM does to MUSE's `{seg}` (`text_answer.format(seg=seg_token)`). An answer that
/// already contains a seg-token name is refused: [`collapse_seg`] could not undo it.
pub fn expand_seg(answer: &str, n: usize) -> Result<String> {
    let names = seg_token_names(n)?;
    if let Some(name) = names.iter().find(|name| answer.contains(name.as_str())) {
        return Err(TokenizerError::Invalid {
            op: "expand_seg",
            msg: format!("the answer already contains {name:?}: {answer:?}"),
        });
    }
    Ok(answer.replace(SEG_TOKEN, &names.join(" ")))
}

/// Inverse of [`expand_seg`]: each exact group text (members in order, single spaces)
/// becomes `<seg>`. Anything else seg-like (a partial or reordered group in generated text)
/// is left in place, visible, rather than guessed at; [`seg_groups`] reports such groups
/// at the token level. A text that already contains `<seg>` is refused (ambiguous).
pub fn collapse_seg(text: &str, n: usize) -> Result<String> {
    if text.contains(SEG_TOKEN) {
        return Err(TokenizerError::Invalid {
            op: "collapse_seg",
            msg: format!("the text already contains {SEG_TOKEN:?}: {text:?}"),
        });
    }
    Ok(text.replace(&seg_group_text(n)?, SEG_TOKEN))
}

/// The answer text of generated ids' decoded `text` (trimmed), as predictions store it: each
/// complete seg group becomes `<seg>` ([`collapse_seg`]) and the seg-token names left over
/// (members of partial or reordered groups, which [`seg_groups`] reports as issues and which
/// get no mask) are dropped, with the spaces around them, so no raw `[SEGk]` reaches the
/// text. A text that already contains `<seg>` keeps it and only loses the stray names.
pub fn answer_text(text: &str, n: usize) -> String {
    let text = text.trim();
    let collapsed = collapse_seg(text, n).unwrap_or_else(|_| text.to_string());
    let Ok(names) = seg_token_names(n) else { return collapsed };
    if !names.iter().any(|name| collapsed.contains(name.as_str())) {
        return collapsed;
    }
    let mut t = collapsed;
    for name in &names {
        t = t.replace(name.as_str(), " ");
    }
    // Whitespace runs the removal left become one space; no space before punctuation.
    let mut out = String::with_capacity(t.len());
    for w in t.split_whitespace() {
        if !out.is_empty() && !w.starts_with(['.', ',', ';', ':', '!', '?']) {
            out.push(' ');
        }
        out.push_str(w);
    }
    out
}

/// A malformed seg group found by [`seg_groups`]. Positions index the scanned id sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SegGroupIssue {
    /// A group started at `start` but stopped after `found` of its members: the sequence
    /// ended, another token came between members, or the next seg token was not the next
    /// member (that token is reported on its own when it does not start a new group).
    Incomplete { start: usize, found: usize },
    /// Seg token member `member` at `position` where no group was open (only member 0 opens
    /// one).
    Stray { position: usize, member: usize },
}

impl std::fmt::Display for SegGroupIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SegGroupIssue::Incomplete { start, found } => {
                write!(f, "incomplete group at token {start}: only its first {found} member(s) in order")
            }
            SegGroupIssue::Stray { position, member } => {
                write!(f, "seg member {member} at token {position} outside a group (a group starts with member 0)")
            }
        }
    }
}

/// Result of [`seg_groups`]: the complete groups and the malformed ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegScan {
    /// Token positions of each complete group, `tokens.seg.len()` each, in order.
    pub groups: Vec<Vec<usize>>,
    pub issues: Vec<SegGroupIssue>,
}

/// Finds PixelLM's seg groups in a token sequence: `seg[0], seg[1], .., seg[n-1]` in this
/// order, with nothing or exactly `tokens.seg_sep` (the ids of `" "`) between consecutive
/// members. Positions are indices into `ids` (the text token sequence, before the image
/// expansion); PixelLM reads the hidden state one position before each seg token, shifted by
/// `PIXELLM_IMAGE_TOKENS - 1` when the image precedes it.
///
/// PixelLM itself only collects every seg id and reshapes them in sixes, so a broken group
/// silently shifts every later object; here such groups are reported in
/// [`SegScan::issues`] and not used.
pub fn seg_groups(ids: &[u32], tokens: &PixelLmTokens) -> SegScan {
    let n = tokens.seg.len();
    let mut scan = SegScan::default();
    if n == 0 {
        return scan;
    }
    let member = |id: u32| tokens.seg.iter().position(|&s| s == id);
    let sep = &tokens.seg_sep;
    // Members of the open group so far.
    let mut cur: Vec<usize> = Vec::with_capacity(n);
    let close = |cur: &mut Vec<usize>, scan: &mut SegScan| {
        if let Some(&start) = cur.first() {
            scan.issues.push(SegGroupIssue::Incomplete { start, found: cur.len() });
        }
        cur.clear();
    };
    for (pos, &id) in ids.iter().enumerate() {
        match member(id) {
            Some(m) => {
                if let Some(&last) = cur.last() {
                    let gap = pos - last - 1;
                    if m == cur.len() && (gap == 0 || gap == sep.len()) {
                        cur.push(pos);
                        if cur.len() == n {
                            scan.groups.push(std::mem::take(&mut cur));
                        }
                        continue;
                    }
                    close(&mut cur, &mut scan);
                }
                if m == 0 {
                    cur.push(pos);
                    if n == 1 {
                        scan.groups.push(std::mem::take(&mut cur));
                    }
                } else {
                    scan.issues.push(SegGroupIssue::Stray { position: pos, member: m });
                }
            }
            None => {
                if let Some(&last) = cur.last() {
                    // Inside a gap: only the separator's ids, in order, may appear.
                    let k = pos - last - 1;
                    if k >= sep.len() || sep[k] != id {
                        close(&mut cur, &mut scan);
                    }
                }
            }
        }
    }
    close(&mut cur, &mut scan);
    scan
}

/// [`seg_groups`] that refuses a sequence with any malformed group: the token positions of
/// each complete group, or an error listing every issue.
pub fn seg_group_positions(ids: &[u32], tokens: &PixelLmTokens) -> Result<Vec<Vec<usize>>> {
    let scan = seg_groups(ids, tokens);
    if scan.issues.is_empty() {
        Ok(scan.groups)
    } else {
        let list: Vec<String> = scan.issues.iter().map(|i| i.to_string()).collect();
        Err(TokenizerError::SegGroups(format!(
            "{} malformed of {} tokens: {}",
            scan.issues.len(),
            ids.len(),
            list.join("; ")
        )))
    }
}

impl Tokenizer {
    /// Adds PixelLM's tokens that are missing and returns all their ids; calling it again
    /// changes nothing. In PixelLM's order (`train_ds.py::main`): first the `seg_tokens`
    /// seg names ([`seg_token_names`]) as *normal* added tokens (`tokenizer.add_tokens`, so
    /// decoding with `skip_special` keeps them), then `<im_start>`, `<im_end>` as special
    /// tokens. Each encodes to one id and is never split. Needs an EOS id (PixelLM's answers
    /// end with it).
    pub fn add_pixellm_tokens(&mut self, seg_tokens: usize) -> Result<PixelLmTokens> {
        let names = seg_token_names(seg_tokens)?;
        let added: HashSet<String> = self.inner.get_added_tokens_decoder().into_values().map(|t| t.content).collect();
        let missing = |list: &[&str]| -> Vec<String> {
            list.iter().filter(|t| !added.contains(**t)).map(|t| t.to_string()).collect()
        };
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let new_seg: Vec<AddedToken> = missing(&name_refs).into_iter().map(|t| AddedToken::from(t, false)).collect();
        if !new_seg.is_empty() {
            self.inner.add_tokens(&new_seg);
        }
        let new_im: Vec<AddedToken> =
            missing(&[IM_START_TOKEN, IM_END_TOKEN]).into_iter().map(|t| AddedToken::from(t, true)).collect();
        if !new_im.is_empty() {
            self.inner.add_special_tokens(&new_im);
        }

        let single =
            |t: &str| -> Result<u32> {
                let ids = self.encode(t, false)?;
                match (ids.as_slice(), self.inner.token_to_id(t)) {
                    ([one], Some(id)) if *one == id => Ok(id),
                    _ => Err(self
                        .op_err("add_pixellm_tokens", format!("{t:?} does not encode to its single id (got {ids:?})"))),
                }
            };
        let seg = names.iter().map(|t| single(t)).collect::<Result<Vec<u32>>>()?;
        let im_start = single(IM_START_TOKEN)?;
        let im_end = single(IM_END_TOKEN)?;
        let eos = self.eos_id.ok_or_else(|| {
            self.op_err("add_pixellm_tokens", "the tokenizer has no EOS token (PixelLM ends answers with it)")
        })?;
        let pad = self.pad_id.or_else(|| self.inner.token_to_id("<unk>")).unwrap_or(eos);
        let seg_sep = self.encode(" ", false)?;
        if seg_sep.is_empty() {
            return Err(self.op_err("add_pixellm_tokens", "\" \" encodes to no token"));
        }
        Ok(PixelLmTokens {
            image_patch: self.inner.token_to_id(IMAGE_PATCH_TOKEN),
            im_start,
            im_end,
            seg,
            seg_sep,
            pad,
            eos,
            bos: self.bos_id,
        })
    }

    /// PixelLM's generation prompt for one instruction: LLaVA's `llava_v1` template with the
    /// image placeholder wrapped in `<im_start>`/`<im_end>` and put before the instruction
    /// (`chat.py::main`; the same text as training's user turn):
    ///
    /// ```text
    /// A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions. USER: <im_start><image><im_end>
    /// {instruction} ASSISTANT:
    /// ```
    ///
    /// (`SeparatorStyle.TWO`: `system + " " + "USER: " + q + " " + "ASSISTANT:"`, no trailing
    /// space.) The text holds [`IMAGE_TOKEN`]: encode it with
    /// [`encode_with_image`](Tokenizer::encode_with_image), or better take
    /// [`pixellm_prompt_pieces`](Tokenizer::pixellm_prompt_pieces), which reads the
    /// instruction literally (this string alone cannot tell template from user text).
    pub fn pixellm_prompt(&self, instruction: &str) -> String {
        format!("{LLAVA_V1_SYSTEM} USER: {IM_START_TOKEN}{IMAGE_TOKEN}{IM_END_TOKEN}\n{instruction} ASSISTANT:")
    }

    /// [`pixellm_prompt`](Tokenizer::pixellm_prompt) as the model reads it, split at the image
    /// like [`encode_with_image`](Tokenizer::encode_with_image), with the user's instruction
    /// read literally ([`encode_literal`](Tokenizer::encode_literal)): what every training
    /// and inference path feeds the model.
    ///
    /// **User text is literal.** An instruction is typed by a user (or comes from a data
    /// set), so the text of a control token in it (`<im_start>`, `<image>`, `[SEG0]`, `</s>`,
    /// any added token) stays text: it never becomes that token's id nor a second image. The
    /// template around it (`<im_start><image><im_end>`) keeps its tokens, and so do the
    /// answers the pipeline writes (`<seg>` expanded to `[SEGk]` groups, the closing EOS).
    /// PixelLM's code tokenizes the whole conversation string, so a user's `[SEG0]` would
    /// be the codebook token there; we deviate on purpose. An instruction without such text
    /// gets exactly the ids of `encode_with_image(&pixellm_prompt(instruction))`: the
    /// tokenizer splits at `<im_end>` anyway, and the rest is encoded by the same pipeline.
    pub fn pixellm_prompt_pieces(&self, instruction: &str) -> Result<Vec<Piece>> {
        let template = format!("{LLAVA_V1_SYSTEM} USER: {IM_START_TOKEN}{IMAGE_TOKEN}{IM_END_TOKEN}");
        let mut pieces = self.encode_with_image(&template)?;
        let user = self.encode_literal(&format!("\n{instruction} ASSISTANT:"))?;
        match pieces.last_mut() {
            Some(Piece::Tokens(ids)) => ids.extend(user),
            _ => pieces.push(Piece::Tokens(user)),
        }
        Ok(pieces)
    }

    /// The whole training conversation: [`pixellm_prompt`](Tokenizer::pixellm_prompt), a space,
    /// the answer (already in PixelLM's form, see [`expand_seg`]) and the template's closing
    /// `sep2`, which is LLaMA's EOS `</s>`; here the tokenizer's EOS text is used (the same
    /// string for LLaMA and the tiny tokenizer), so the answer always ends in the EOS id.
    pub fn pixellm_conversation(&self, instruction: &str, answer: &str) -> String {
        let eos = self.eos_id.and_then(|i| self.inner.id_to_token(i)).unwrap_or_else(|| "</s>".to_string());
        format!("{} {answer}{eos}", self.pixellm_prompt(instruction))
    }

    /// Splits `text` at each [`IMAGE_TOKEN`] and encodes the chunks separately, as LLaVA's
    /// `tokenizer_image_token`: only the first chunk gets the BOS (when the tokenizer adds
    /// one, see [`encode`](Tokenizer::encode)); an [`Piece::Image`] stands where LLaVA puts
    /// `-200`. Empty chunks produce no `Tokens` piece (except that a leading BOS is kept).
    pub fn encode_with_image(&self, text: &str) -> Result<Vec<Piece>> {
        let mut pieces = Vec::new();
        for (i, chunk) in text.split(IMAGE_TOKEN).enumerate() {
            if i > 0 {
                pieces.push(Piece::Image);
            }
            let ids = self.encode(chunk, i == 0)?;
            if !ids.is_empty() {
                pieces.push(Piece::Tokens(ids));
            }
        }
        Ok(pieces)
    }
}

//! The LLM corrector of collect-pt: any OpenAI-compatible chat-completions endpoint (the
//! paper used ChatGPT) with the paper's two prompts (Appendix B) as editable templates.
//!
//! - Transport: [`popen_core::chat`] (retries with exponential backoff on timeouts, 429 and
//!   5xx, honouring `Retry-After`).
//! - The API key comes from the environment variable the config names; it is sent as a
//!   bearer token and never written to logs, caches or manifests (the config serializes the
//!   variable's name only).
//! - An on-disk cache keyed by the sha256 of the request (endpoint, model, temperature,
//!   messages): a rerun costs nothing.
//! - Output parsing: the corrected answer follows a `Corrected answer:` label (the injected
//!   one a `Modified answer:` label); quotes that mark changes are removed. A reply that
//!   cannot be parsed (a refusal, another format) is asked once more without the cache, then
//!   the sample fails with the reply's excerpt (SPEC 10.13).
//! - Failures of the endpoint are [`PrefsError::Service`] errors with the failure's class, so
//!   collect-pt can stop early on a systemic cause; every server text they quote is
//!   redacted ([`popen_core::chat::redact`]: the key, bearer tokens, Authorization values).

use std::path::{Path, PathBuf};
use std::time::Duration;

use popen_core::chat::{excerpt, ChatClient, ChatConfig, Message};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::corrector::{Correction, Corrector, Method, Truth};
use crate::{PrefsError, Result};

/// The correction prompt (Appendix B (a)). Placeholders: `{objects}`, `{answer}`.
pub const CORRECTION_PROMPT: &str = "You are given the answer of a vision-language model to a question about an image, and the list of objects that are really in the answer's ground truth.
Modify, add, or delete certain words or sentences in the answer to correct its mistakes, including incorrect objects and faulty reasoning. The corrected answer should include only objects in the object list. Keep the structure of the answer and every <seg> marker after the object it follows; do not mark synonyms as changes.
Reply in exactly this format:
Original answer: <the original answer with deleted or modified parts in \"quotes\">
Corrected answer: <the corrected answer with modified or added parts in \"quotes\">

Object list: {objects}
Answer: {answer}";

/// The error-injection prompt (Appendix B (b)). Placeholders: `{objects}`, `{answer}`.
pub const INJECTION_PROMPT: &str = "You are given a correct answer about an image and the list of its objects.
Introduce errors into only a small portion of the content: change one or two objects (or their colours) into wrong ones. Do not replace words by synonyms. Keep every <seg> marker after the object it follows.
Reply in exactly this format:
Modified answer: <the modified answer>

Object list: {objects}
Answer: {answer}";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Base URL of the endpoint (`https://api.openai.com/v1`, `http://127.0.0.1:8000/v1`).
    pub base_url: String,
    pub model: String,
    /// Environment variable that holds the API key (none: no Authorization header).
    pub api_key_env: Option<String>,
    pub timeout_s: f64,
    pub retries: u32,
    pub backoff_s: f64,
    pub temperature: f64,
    /// Cache folder (none: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Prompt template files; none: [`CORRECTION_PROMPT`] / [`INJECTION_PROMPT`].
    pub correction_prompt: Option<PathBuf>,
    pub injection_prompt: Option<PathBuf>,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "https://api.openai.com/v1".into(),
            model: "gpt-3.5-turbo".into(),
            api_key_env: Some("OPENAI_API_KEY".into()),
            timeout_s: 120.0,
            retries: 4,
            backoff_s: 2.0,
            temperature: 0.0,
            cache_dir: Some(PathBuf::from("out/cache/corrector")),
            correction_prompt: None,
            injection_prompt: None,
        }
    }
}

pub struct OpenAiCorrector {
    client: ChatClient,
    cache: Option<PathBuf>,
    correction: String,
    injection: String,
}

fn read_template(path: &Option<PathBuf>, default: &str) -> Result<String> {
    let t = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|e| PrefsError::Input(format!("{}: {e}", p.display())))?,
        None => default.to_string(),
    };
    if !t.contains("{answer}") {
        return Err(PrefsError::Input(format!(
            "prompt template {} has no {{answer}} placeholder",
            path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(built in)".into())
        )));
    }
    Ok(t)
}

/// The text after `label` (case-insensitive, at a line start), up to the end of the reply
/// or the next `Original answer:` line, with change-marking quotes removed.
pub fn parse_labelled(reply: &str, label: &str) -> Option<String> {
    let lower = reply.to_lowercase();
    let want = label.to_lowercase();
    let at = lower.lines().scan(0usize, |off, l| {
        let start = *off;
        *off += l.len() + 1;
        Some((start, l))
    });
    let (start, line) =
        at.into_iter().find(|(_, l)| l.trim_start().trim_start_matches(['*', '#', ' ']).starts_with(&want))?;
    let lead = line.len() - line.trim_start().trim_start_matches(['*', '#', ' ']).len();
    let mut text = reply[start + lead + label.len()..].to_string();
    if let Some(cut) = text.to_lowercase().find("\noriginal answer:") {
        text.truncate(cut);
    }
    let cleaned: String = text
        .trim_start_matches([':', '*', ' '])
        .chars()
        .filter(|c| !matches!(c, '"' | '\u{201c}' | '\u{201d}'))
        .collect();
    let cleaned = cleaned.split_whitespace().collect::<Vec<_>>().join(" ");
    (!cleaned.is_empty()).then_some(cleaned)
}

impl OpenAiCorrector {
    pub fn new(cfg: &OpenAiConfig) -> Result<Self> {
        let api_key = match &cfg.api_key_env {
            Some(var) => Some(
                std::env::var(var)
                    .map_err(|_| PrefsError::Input(format!("the corrector's API key variable {var} is not set")))?,
            ),
            None => None,
        };
        let chat = ChatConfig {
            api_key,
            timeout: Duration::from_secs_f64(cfg.timeout_s),
            retries: cfg.retries,
            backoff: Duration::from_secs_f64(cfg.backoff_s),
            temperature: Some(cfg.temperature),
            ..ChatConfig::new(&cfg.base_url, &cfg.model)
        };
        let client = ChatClient::new(chat).map_err(|e| PrefsError::Input(e.to_string()))?;
        if let Some(d) = &cfg.cache_dir {
            std::fs::create_dir_all(d).map_err(|e| PrefsError::Input(format!("{}: {e}", d.display())))?;
        }
        Ok(OpenAiCorrector {
            client,
            cache: cfg.cache_dir.clone(),
            correction: read_template(&cfg.correction_prompt, CORRECTION_PROMPT)?,
            injection: read_template(&cfg.injection_prompt, INJECTION_PROMPT)?,
        })
    }

    fn prompt(template: &str, answer: &str, truth: &Truth) -> String {
        let objects: Vec<String> = truth
            .targets
            .iter()
            .map(|t| match &t.colour {
                Some(c) => format!("{c} {}", t.class),
                None => t.class.clone(),
            })
            .collect();
        template.replace("{objects}", &objects.join(", ")).replace("{answer}", answer)
    }

    fn cache_path(&self, prompt: &str) -> Option<PathBuf> {
        let dir = self.cache.as_ref()?;
        let c = self.client.config();
        let key = serde_json::json!({"endpoint": self.client.endpoint(), "model": c.model, "temperature": c.temperature, "prompt": prompt});
        let hash = hex::encode(Sha256::digest(key.to_string().as_bytes()));
        Some(dir.join(format!("{hash}.json")))
    }

    /// The reply to `prompt`, from the cache unless `fresh`.
    fn ask(&self, prompt: &str, fresh: bool) -> Result<String> {
        let path = self.cache_path(prompt);
        if let (Some(p), false) = (&path, fresh) {
            if let Ok(text) = std::fs::read_to_string(p) {
                if let Some(c) = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["content"].as_str().map(String::from))
                {
                    return Ok(c);
                }
            }
        }
        let reply = self
            .client
            .complete(&[Message::user(prompt)])
            .map_err(|e| PrefsError::Service { class: e.class(), message: format!("corrector: {e}") })?;
        if let Some(p) = &path {
            let body = serde_json::json!({"content": reply.content, "model": reply.model}).to_string();
            write_cache(p, body.as_bytes())?;
        }
        Ok(reply.content)
    }

    /// Asks, parses; on an unparseable reply asks once more without the cache.
    fn ask_parsed(&self, prompt: &str, label: &str) -> Result<String> {
        let first = self.ask(prompt, false)?;
        if let Some(t) = parse_labelled(&first, label) {
            return Ok(t);
        }
        let second = self.ask(prompt, true)?;
        parse_labelled(&second, label).ok_or_else(|| {
            PrefsError::Input(format!(
                "corrector reply has no '{label}' line (asked twice): {}",
                excerpt(&self.client.redact(&second))
            ))
        })
    }
}

fn write_cache(path: &Path, bytes: &[u8]) -> Result<()> {
    popen_core::shard::atomic_write(path, bytes).map_err(PrefsError::from)
}

impl Corrector for OpenAiCorrector {
    fn settings(&self) -> serde_json::Value {
        let c = self.client.config();
        serde_json::json!({
            // Not the base URL: the same model behind another endpoint (a fixed host, a new
            // port) corrects the same way, and a rerun after an outage resumes its parts.
            "kind": "openai",
            "model": c.model,
            "temperature": c.temperature,
            "max_tokens": c.max_tokens,
            "correction_prompt": self.correction,
            "injection_prompt": self.injection,
        })
    }

    fn correct(&self, y: &str, truth: &Truth) -> Result<Correction> {
        let text = self.ask_parsed(&Self::prompt(&self.correction, y, truth), "Corrected answer:")?;
        let method = if text == y.split_whitespace().collect::<Vec<_>>().join(" ") {
            Method::Unchanged
        } else {
            Method::InPlace
        };
        let text = if method == Method::Unchanged { y.to_string() } else { text };
        Ok(Correction { text, method, notes: vec!["openai".into()] })
    }

    fn inject_errors(&self, truth: &Truth, _seed: u64) -> Result<String> {
        let text = self.ask_parsed(&Self::prompt(&self.injection, &truth.answer, truth), "Modified answer:")?;
        if text == truth.answer {
            return Err(PrefsError::Input("the corrector's error injection changed nothing".into()));
        }
        Ok(text)
    }
}

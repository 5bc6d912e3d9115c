//! A small blocking client for OpenAI-compatible chat-completion endpoints
//! (`POST {base_url}/chat/completions`), used by the evaluator's LLM judge and by the
//! response corrector of `collect-pt`.
//!
//! Transport failures (connection refused, timeouts), HTTP 429 and 5xx are retried with
//! exponential backoff and jitter (a `Retry-After` header in seconds is honoured, capped at
//! a minute);
//! other statuses and malformed bodies fail at once. Every error names the endpoint, the
//! number of attempts, the status and an excerpt of the body. The API key is sent as a
//! bearer token and never appears in errors: every server text an error quotes (bodies,
//! transport messages) goes through [`redact`] when the error is built, so no log line,
//! manifest or returned error can carry it, even when the server echoes the request's
//! `Authorization` header; a reply's content has the configured key removed too.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How many characters of a response body an error quotes.
pub const BODY_EXCERPT_CHARS: usize = 300;
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Where and how to call the endpoint. `Debug` shows the key as `[REDACTED]`.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatConfig {
    /// Base URL (`https://api.openai.com/v1`, `http://127.0.0.1:8000/v1`); a URL that already
    /// ends in `/chat/completions` is used as it is.
    pub base_url: String,
    pub model: String,
    /// Bearer token; None sends no Authorization header (local servers).
    #[serde(skip_serializing)]
    pub api_key: Option<String>,
    /// Limit for one attempt, connection to last byte.
    pub timeout: Duration,
    /// Extra attempts after the first for retryable failures.
    pub retries: u32,
    /// Wait before the first retry; doubled each time.
    pub backoff: Duration,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
}

impl std::fmt::Debug for ChatConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatConfig")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| REDACTED))
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("backoff", &self.backoff)
            .field("temperature", &self.temperature)
            .field("max_tokens", &self.max_tokens)
            .finish()
    }
}

impl ChatConfig {
    /// Defaults: 120 s per attempt, 4 retries starting at 2 s, temperature 0.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        ChatConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            timeout: Duration::from_secs(120),
            retries: 4,
            backoff: Duration::from_secs(2),
            temperature: Some(0.0),
            max_tokens: None,
        }
    }

    /// The chat-completions URL.
    pub fn endpoint(&self) -> String {
        let base = self.base_url.trim_end_matches('/');
        if base.ends_with("/chat/completions") {
            base.to_string()
        } else {
            format!("{base}/chat/completions")
        }
    }
}

/// Message content: plain text, or parts (text and images) for vision models.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ImageUrl {
    /// `https://...` or `data:image/png;base64,...`.
    pub url: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    pub content: Content,
}

impl Message {
    pub fn system(text: impl Into<String>) -> Self {
        Message { role: "system".into(), content: Content::Text(text.into()) }
    }

    pub fn user(text: impl Into<String>) -> Self {
        Message { role: "user".into(), content: Content::Text(text.into()) }
    }

    pub fn user_parts(parts: Vec<Part>) -> Self {
        Message { role: "user".into(), content: Content::Parts(parts) }
    }
}

/// The request body.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ChatRequest<'a> {
    pub model: &'a str,
    pub messages: &'a [Message],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct RawResponse {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<RawChoice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct RawChoice {
    message: RawMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct RawMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

/// The first choice's text and what it took to get it.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatReply {
    pub content: String,
    /// The model the server says answered (may differ from the requested name).
    pub model: Option<String>,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
    /// Attempts made, 1 when the first succeeded.
    pub attempts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{endpoint}: HTTP {status} after {attempts} attempt(s); body: {body}")]
    Status { endpoint: String, status: u16, body: String, attempts: u32 },
    #[error("{endpoint}: request failed after {attempts} attempt(s): {message}")]
    Transport { endpoint: String, message: String, attempts: u32 },
    #[error("{endpoint}: malformed response ({message}); body: {body}")]
    Malformed { endpoint: String, message: String, body: String },
    #[error("chat client: {0}")]
    Config(String),
}

impl ChatError {
    /// The HTTP status, for errors that have one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ChatError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The kind of failure, without anything request-specific: `HTTP 401`, `transport`
    /// (connection refused, DNS, timeout: after the retries), `malformed response`,
    /// `config`. Callers group failures by it and tell a systemic cause (every request gets
    /// the same class) from per-request ones.
    pub fn class(&self) -> String {
        match self {
            ChatError::Status { status, .. } => format!("HTTP {status}"),
            ChatError::Transport { .. } => "transport".into(),
            ChatError::Malformed { .. } => "malformed response".into(),
            ChatError::Config(_) => "config".into(),
        }
    }
}

/// What [`redact`] puts in place of a secret.
pub const REDACTED: &str = "[REDACTED]";

/// `text` without secrets, for every server text that is logged or recorded: each
/// occurrence of `key` (the configured API key, when non-empty), the token after `Bearer `,
/// the value of an `Authorization` header or field (`Authorization: Basic xyz`,
/// `"authorization": "Bearer xyz"`, JSON-escaped quotes too; the scheme word is kept) and
/// `sk-` tokens (8 or more of `[A-Za-z0-9_-]` after `sk-`, OpenAI's key shape) become
/// [`REDACTED`]. Matching is ASCII case-insensitive and at word starts.
pub fn redact(text: &str, key: Option<&str>) -> String {
    let s = match key.map(str::trim).filter(|k| !k.is_empty()) {
        Some(k) => text.replace(k, REDACTED),
        None => text.to_string(),
    };
    let s = redact_after(&s, "bearer", false);
    let s = redact_after(&s, "authorization", true);
    redact_sk_tokens(&s)
}

/// A byte of a token (a key, a bearer token): printable ASCII but no quote, bracket or
/// separator.
fn token_byte(b: u8) -> bool {
    b.is_ascii_graphic() && !b"\"'\\,;<>()[]{}`".contains(&b)
}

/// Length of the run of bytes from `at` that satisfy `f`.
fn run_len(bytes: &[u8], at: usize, f: impl Fn(u8) -> bool) -> usize {
    bytes[at.min(bytes.len())..].iter().take_while(|&&b| f(b)).count()
}

/// Replaces the token after each `word` (at a word start): after whitespace (`bearer`), or
/// after a `:`/`=` separator with optional quotes and an optional scheme word (`header`).
fn redact_after(s: &str, word: &str, header: bool) -> String {
    let lower = s.to_ascii_lowercase();
    let bytes = s.as_bytes();
    let (mut out, mut last, mut i) = (String::with_capacity(s.len()), 0usize, 0usize);
    let space = |b: u8| b == b' ' || b == b'\t';
    let quote_or_space = |b: u8| matches!(b, b' ' | b'\t' | b'"' | b'\'' | b'\\');
    while let Some(off) = lower[i..].find(word) {
        let start = i + off;
        let mut j = start + word.len();
        i = j;
        if start > 0 && bytes[start - 1].is_ascii_alphanumeric() {
            continue;
        }
        if header {
            j += run_len(bytes, j, quote_or_space);
            if !matches!(bytes.get(j), Some(b':' | b'=')) {
                continue;
            }
            j += 1;
            j += run_len(bytes, j, quote_or_space);
            let scheme = run_len(bytes, j, |b| b.is_ascii_alphabetic());
            let gap = run_len(bytes, j + scheme, space);
            if scheme > 0 && gap > 0 {
                j += scheme + gap;
            }
        } else {
            let gap = run_len(bytes, j, space);
            if gap == 0 {
                continue;
            }
            j += gap;
        }
        let t = j + run_len(bytes, j, token_byte);
        if t > j {
            out.push_str(&s[last..j]);
            out.push_str(REDACTED);
            last = t;
        }
        i = t.max(i);
    }
    out.push_str(&s[last..]);
    out
}

/// Replaces `sk-` tokens (see [`redact`]).
fn redact_sk_tokens(s: &str) -> String {
    let bytes = s.as_bytes();
    let key_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    let (mut out, mut last, mut i) = (String::with_capacity(s.len()), 0usize, 0usize);
    while let Some(off) = s[i..].find("sk-") {
        let start = i + off;
        let body = run_len(bytes, start + 3, key_byte);
        i = start + 3;
        if (start > 0 && key_byte(bytes[start - 1])) || body < 8 {
            continue;
        }
        out.push_str(&s[last..start]);
        out.push_str(REDACTED);
        last = start + 3 + body;
        i = last;
    }
    out.push_str(&s[last..]);
    out
}

/// `s` cut to [`BODY_EXCERPT_CHARS`] characters, with a marker when cut.
pub fn excerpt(s: &str) -> String {
    let mut it = s.chars();
    let head: String = it.by_ref().take(BODY_EXCERPT_CHARS).collect();
    if it.next().is_some() {
        format!("{head}... ({} bytes)", s.len())
    } else {
        head
    }
}

/// A number in [0, 1) that differs between calls, threads and processes (no RNG state to
/// seed: retry timing need not be reproducible).
fn jitter_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

enum Attempt {
    Done(ChatReply),
    /// Retryable, with an optional server-requested wait.
    Retry(ChatError, Option<Duration>),
    Fail(ChatError),
}

/// A configured client; cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct ChatClient {
    config: ChatConfig,
    endpoint: String,
    agent: ureq::Agent,
}

impl std::fmt::Debug for ChatClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatClient({}, model {})", self.endpoint, self.config.model)
    }
}

impl ChatClient {
    pub fn new(config: ChatConfig) -> Result<Self, ChatError> {
        let endpoint = config.endpoint();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(ChatError::Config(format!("endpoint '{endpoint}' must start with http:// or https://")));
        }
        if config.model.is_empty() {
            return Err(ChatError::Config(format!("{endpoint}: no model name")));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(ChatClient { config, endpoint, agent })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn config(&self) -> &ChatConfig {
        &self.config
    }

    /// [`redact`] with this client's key: for server texts a caller logs or records itself
    /// (a reply it cannot parse).
    pub fn redact(&self, text: &str) -> String {
        redact(text, self.config.api_key.as_deref())
    }

    /// Sends the messages and returns the first choice, retrying as the module says.
    pub fn complete(&self, messages: &[Message]) -> Result<ChatReply, ChatError> {
        let req = ChatRequest {
            model: &self.config.model,
            messages,
            temperature: self.config.temperature,
            max_tokens: self.config.max_tokens,
        };
        let body =
            serde_json::to_string(&req).map_err(|e| ChatError::Config(format!("request does not serialize: {e}")))?;
        let mut attempt = 1u32;
        loop {
            match self.attempt(&body, attempt) {
                Attempt::Done(r) => return Ok(r),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(e, wait) => {
                    if attempt > self.config.retries {
                        return Err(e);
                    }
                    // Exponential backoff with "equal jitter" (half fixed, half random), so
                    // parallel clients that failed together do not retry together; a
                    // server's Retry-After is used as it is.
                    let backoff = self.config.backoff.saturating_mul(1u32 << (attempt - 1).min(16)).min(MAX_BACKOFF);
                    let wait = wait.unwrap_or_else(|| backoff.mul_f64(0.5 + 0.5 * jitter_unit())).min(MAX_BACKOFF);
                    tracing::warn!("{e}; retrying in {:.1} s", wait.as_secs_f64());
                    std::thread::sleep(wait);
                    attempt += 1;
                }
            }
        }
    }

    fn attempt(&self, body: &str, attempts: u32) -> Attempt {
        let endpoint = &self.endpoint;
        let mut req = self.agent.post(endpoint).header("Content-Type", "application/json");
        if let Some(k) = &self.config.api_key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut resp = match req.send(body) {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Retry(
                    ChatError::Transport { endpoint: endpoint.clone(), message: self.redact(&e.to_string()), attempts },
                    None,
                )
            }
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = match resp.body_mut().read_to_string() {
            Ok(t) => t,
            Err(e) => {
                return Attempt::Retry(
                    ChatError::Transport {
                        endpoint: endpoint.clone(),
                        message: self.redact(&format!("HTTP {status}, reading the body: {e}")),
                        attempts,
                    },
                    None,
                )
            }
        };
        if !(200..300).contains(&status) {
            // Redacted before the excerpt is cut, so no partial key survives the cut.
            let err =
                ChatError::Status { endpoint: endpoint.clone(), status, body: excerpt(&self.redact(&text)), attempts };
            return if status == 429 || status >= 500 { Attempt::Retry(err, retry_after) } else { Attempt::Fail(err) };
        }
        let malformed = |message: String| {
            Attempt::Fail(ChatError::Malformed {
                endpoint: endpoint.clone(),
                message: self.redact(&message),
                body: excerpt(&self.redact(&text)),
            })
        };
        let raw: RawResponse = match serde_json::from_str(&text) {
            Ok(r) => r,
            Err(e) => return malformed(format!("not a chat completion: {e}")),
        };
        let Some(choice) = raw.choices.into_iter().next() else { return malformed("no choices".into()) };
        let Some(content) = choice.message.content else { return malformed("the first choice has no content".into()) };
        // The content is data (an answer, a verdict): only the configured key itself is
        // removed; the token patterns of `redact` could match ordinary words ("bearer of").
        let content = match self.config.api_key.as_deref().map(str::trim).filter(|k| !k.is_empty()) {
            Some(k) if content.contains(k) => content.replace(k, REDACTED),
            _ => content,
        };
        Attempt::Done(ChatReply {
            content,
            model: raw.model,
            finish_reason: choice.finish_reason,
            usage: raw.usage,
            attempts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::mpsc;

    /// Serves one canned (status, body) per connection, in order, and sends back each
    /// request it read.
    fn serve(responses: Vec<(u16, &'static str)>) -> (String, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for (status, body) in responses {
                let Ok((mut s, _)) = listener.accept() else { return };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // headers, then Content-Length bytes of body
                let body_start = loop {
                    let n = s.read(&mut chunk).unwrap();
                    if n == 0 {
                        break None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break Some(p + 4);
                    }
                };
                let Some(start) = body_start else { continue };
                let head = String::from_utf8_lossy(&buf[..start]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                while buf.len() < start + len {
                    let n = s.read(&mut chunk).unwrap();
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let request = String::from_utf8_lossy(&buf).into_owned();
                // `{auth}` in a canned body echoes the request's Authorization value (servers
                // that quote the request headers in their error bodies).
                let auth = request
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase().starts_with("authorization:").then(|| l[14..].trim().to_string())
                    })
                    .unwrap_or_default();
                let body = body.replace("{auth}", &auth);
                tx.send(request).ok();
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(reply.as_bytes()).unwrap();
            }
        });
        (url, rx)
    }

    const OK: &str = r#"{"model":"judge-1","choices":[{"message":{"role":"assistant","content":"Accuracy: 7"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#;

    fn config(url: &str) -> ChatConfig {
        ChatConfig {
            timeout: Duration::from_secs(5),
            retries: 2,
            backoff: Duration::from_millis(5),
            ..ChatConfig::new(url, "m")
        }
    }

    #[test]
    fn success_sends_model_messages_and_key() {
        let (url, rx) = serve(vec![(200, OK)]);
        let mut cfg = config(&url);
        cfg.api_key = Some("sk-test".into());
        let c = ChatClient::new(cfg).unwrap();
        let r = c.complete(&[Message::system("be brief"), Message::user("hi")]).unwrap();
        assert_eq!(r.content, "Accuracy: 7");
        assert_eq!((r.model.as_deref(), r.finish_reason.as_deref(), r.attempts), (Some("judge-1"), Some("stop"), 1));
        assert_eq!(r.usage.unwrap().completion_tokens, 3);
        let req = rx.recv().unwrap();
        assert!(req.starts_with("POST /v1/chat/completions HTTP/1.1"), "{req}");
        assert!(req.to_ascii_lowercase().contains("authorization: bearer sk-test"), "{req}");
        let body: serde_json::Value = serde_json::from_str(&req[req.find("\r\n\r\n").unwrap() + 4..]).unwrap();
        assert_eq!(body["model"], "m");
        assert_eq!(body["messages"][1]["content"], "hi");
        assert_eq!(body["temperature"], 0.0);
    }

    #[test]
    fn server_error_is_retried() {
        let (url, _rx) = serve(vec![(500, r#"{"error":"busy"}"#), (200, OK)]);
        let r = ChatClient::new(config(&url)).unwrap().complete(&[Message::user("x")]).unwrap();
        assert_eq!(r.attempts, 2);
    }

    #[test]
    fn persistent_server_error_names_status_endpoint_and_body() {
        let (url, _rx) = serve(vec![(503, "overloaded"); 3]);
        let e = ChatClient::new(config(&url)).unwrap().complete(&[Message::user("x")]).unwrap_err();
        assert_eq!(e.status(), Some(503));
        let s = e.to_string();
        assert!(
            s.contains(&url) && s.contains("HTTP 503") && s.contains("3 attempt(s)") && s.contains("overloaded"),
            "{s}"
        );
    }

    #[test]
    fn client_error_is_not_retried() {
        let (url, _rx) = serve(vec![(401, r#"{"error":"bad key"}"#), (200, OK)]);
        let e = ChatClient::new(config(&url)).unwrap().complete(&[Message::user("x")]).unwrap_err();
        assert_eq!(e.status(), Some(401));
        assert!(e.to_string().contains("bad key"), "{e}");
    }

    #[test]
    fn malformed_json_is_an_error_with_an_excerpt() {
        let (url, _rx) = serve(vec![(200, r#"{"choices": [ oops"#)]);
        let e = ChatClient::new(config(&url)).unwrap().complete(&[Message::user("x")]).unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, ChatError::Malformed { .. }) && s.contains("oops") && s.contains(&url), "{s}");
        let (url, _rx) = serve(vec![(200, r#"{"choices": []}"#)]);
        let e = ChatClient::new(config(&url)).unwrap().complete(&[Message::user("x")]).unwrap_err();
        assert!(e.to_string().contains("no choices"), "{e}");
    }

    #[test]
    fn connection_refused_is_retried_then_reported() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}/v1/");
        let e = ChatClient::new(config(&url)).unwrap().complete(&[Message::user("x")]).unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, ChatError::Transport { attempts: 3, .. }), "{s}");
        assert!(s.contains(&format!("127.0.0.1:{port}/v1/chat/completions")), "{s}");
    }

    #[test]
    fn config_checks_and_parts_serialize() {
        assert!(ChatClient::new(ChatConfig::new("ftp://x", "m")).is_err());
        assert!(ChatClient::new(ChatConfig::new("http://x", "")).is_err());
        assert_eq!(ChatConfig::new("http://h/v1/chat/completions/", "m").endpoint(), "http://h/v1/chat/completions");
        let m = Message::user_parts(vec![
            Part::Text { text: "look".into() },
            Part::ImageUrl { image_url: ImageUrl { url: "data:image/png;base64,AA==".into() } },
        ]);
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"role":"user","content":[{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AA=="}}]}"#
        );
        assert!(excerpt(&"x".repeat(1000)).ends_with("... (1000 bytes)"));
    }

    /// Issue 20 item 3: the redaction rules on hand-written server texts (expected outputs
    /// written by hand from the rules in `redact`'s documentation).
    #[test]
    fn redact_removes_keys_bearer_tokens_and_authorization_values() {
        let key = Some("local-secret-42");
        let cases = [
            // the configured key anywhere, whatever its shape
            ("bad key local-secret-42!", "bad key [REDACTED]!"),
            // Bearer tokens, any case
            ("got BEARER abc.def-ghi, rejected", "got BEARER [REDACTED], rejected"),
            // header lines keep the scheme word
            ("Authorization: Basic dXNlcjpwYXNz\r\nHost: x", "Authorization: Basic [REDACTED]\r\nHost: x"),
            ("authorization=tok123 end", "authorization=[REDACTED] end"),
            // JSON fields, plain and escaped inside a string
            (r#"{"authorization":"Token zzz"}"#, r#"{"authorization":"Token [REDACTED]"}"#),
            (
                r#"{"echo":"{\"Authorization\": \"Bearer q1w2\"}"}"#,
                r#"{"echo":"{\"Authorization\": \"Bearer [REDACTED]\"}"}"#,
            ),
            // sk- tokens (8+ key characters), not short or embedded ones
            ("key sk-proj-AbC123xyz_9 leaked", "key [REDACTED] leaked"),
            ("task-sk-12345678 and sk-short stay", "task-sk-12345678 and sk-short stay"),
            // ordinary words stay
            ("Authorization failed; the bearer of bad news", "Authorization failed; the bearer [REDACTED] bad news"),
            ("no secrets here", "no secrets here"),
        ];
        for (text, want) in cases {
            assert_eq!(redact(text, key), want, "{text}");
        }
        // The key is removed before the patterns, so a key that contains spaces or quotes goes too.
        assert_eq!(redact("x 'my key' y", Some("'my key'")), "x [REDACTED] y");
        assert_eq!(redact("abc", Some("")), "abc");
        let mut cfg = ChatConfig::new("http://h", "m");
        cfg.api_key = Some("local-secret-42".into());
        assert!(!format!("{cfg:?}").contains("local-secret-42"));
    }

    /// Issue 20 item 3: a server that echoes the Authorization header in its 401 and 500
    /// bodies (some proxies and mock servers do): the errors name the status and keep the
    /// rest of the body, but neither the key nor the bearer token appear. The retry warnings
    /// (`tracing::warn!("{e}; ...")`) print the same redacted error.
    #[test]
    fn echoed_authorization_never_reaches_an_error() {
        let secret = "local-secret-42";
        for (status, attempts) in [(401u16, 1u32), (500, 3)] {
            let body = r#"{"error":"denied","request_headers":{"authorization":"{auth}"},"hint":"{auth}"}"#;
            let (url, rx) = serve(vec![(status, body); attempts as usize]);
            let mut cfg = config(&url);
            cfg.api_key = Some(secret.into());
            let e = ChatClient::new(cfg).unwrap().complete(&[Message::user("x")]).unwrap_err();
            assert!(rx.recv().unwrap().contains(&format!("Bearer {secret}")), "the key was sent");
            let s = e.to_string();
            assert_eq!(e.status(), Some(status));
            assert!(s.contains(&format!("HTTP {status} after {attempts} attempt(s)")) && s.contains("denied"), "{s}");
            assert!(!s.contains(secret) && s.contains(REDACTED), "{s}");
            assert_eq!(e.class(), format!("HTTP {status}"));
        }
    }
}

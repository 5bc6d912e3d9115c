//! The OpenAI-compatible corrector against a loopback server that speaks the
//! chat-completions protocol and injects failures: 500, 429 with Retry-After, malformed
//! JSON, a refusal, a slow reply past the timeout. Checks retries, the cache (a second call
//! does not reach the server), the retry-once-then-fail rule, and that the key is sent but
//! never written to the cache.
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use popen_prefs::corrector::{Corrector, Method, TargetTruth, Truth};
use popen_prefs::openai::{parse_labelled, OpenAiConfig, OpenAiCorrector};

enum Reply {
    Ok(&'static str),
    Status(u16, &'static str),
    RetryAfter(&'static str),
    Raw(&'static str),
    Slow(u64),
}

/// Serves each connection with the next scripted reply; counts requests and keeps the
/// Authorization headers it saw.
fn server(script: Vec<Reply>) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let auth = Arc::new(Mutex::new(Vec::new()));
    let (c2, a2) = (count.clone(), auth.clone());
    std::thread::spawn(move || {
        for reply in script {
            let Ok((mut s, _)) = listener.accept() else { return };
            c2.fetch_add(1, Ordering::SeqCst);
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..p]).to_string();
                    for l in head.lines() {
                        if l.to_ascii_lowercase().starts_with("authorization:") {
                            a2.lock().unwrap().push(l.to_string());
                        }
                    }
                    let len: usize = head
                        .to_ascii_lowercase()
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                        .unwrap_or(0);
                    if buf.len() >= p + 4 + len {
                        break;
                    }
                }
            }
            let (status, body, extra) = match reply {
                Reply::Ok(content) => (
                    200,
                    serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}}]})
                        .to_string(),
                    String::new(),
                ),
                Reply::Status(st, body) => (st, body.to_string(), String::new()),
                Reply::RetryAfter(body) => (429, body.to_string(), "Retry-After: 0\r\n".into()),
                Reply::Raw(body) => (200, body.to_string(), String::new()),
                Reply::Slow(ms) => {
                    std::thread::sleep(Duration::from_millis(ms));
                    (200, "{}".into(), String::new())
                }
            };
            let msg = format!(
                "HTTP/1.1 {status} X\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(msg.as_bytes()).ok();
        }
    });
    (url, count, auth)
}

fn truth() -> Truth {
    Truth {
        answer: "The red cup <seg> is on the left.".into(),
        targets: vec![TargetTruth { class: "cup".into(), colour: Some("red".into()) }],
        instance_classes: ["cup".to_string(), "key".to_string()].into_iter().collect(),
    }
}

fn config(url: &str, cache: Option<std::path::PathBuf>) -> OpenAiConfig {
    OpenAiConfig {
        base_url: url.into(),
        model: "test-model".into(),
        api_key_env: Some("POPEN_TEST_CORRECTOR_KEY".into()),
        timeout_s: 1.0,
        retries: 3,
        backoff_s: 0.01,
        cache_dir: cache,
        ..OpenAiConfig::default()
    }
}

#[test]
fn parse_the_labelled_answers() {
    let r = "Original answer: The \"blue box\" <seg> is on the left.\nCorrected answer: The \"red cup\" <seg> is on the left.";
    assert_eq!(parse_labelled(r, "Corrected answer:").unwrap(), "The red cup <seg> is on the left.");
    assert_eq!(
        parse_labelled("**Modified answer:** the \u{201c}green\u{201d} cup <seg>", "Modified answer:").unwrap(),
        "the green cup <seg>"
    );
    assert_eq!(parse_labelled("I cannot help with that.", "Corrected answer:"), None);
}

#[test]
fn retries_cache_refusals_and_failures() {
    std::env::set_var("POPEN_TEST_CORRECTOR_KEY", "sk-secret-123");
    let dir = tempfile::tempdir().unwrap();
    let good = "Original answer: The \"blue box\" <seg> is on the left.\nCorrected answer: The \"red cup\" <seg> is on the left.";
    let (url, count, auth) = server(vec![Reply::Status(500, "oops"), Reply::RetryAfter("slow down"), Reply::Ok(good)]);
    let c = OpenAiCorrector::new(&config(&url, Some(dir.path().to_path_buf()))).unwrap();
    let r = c.correct("The blue box <seg> is on the left.", &truth()).unwrap();
    assert_eq!((r.method, r.text.as_str()), (Method::InPlace, "The red cup <seg> is on the left."));
    assert_eq!(count.load(Ordering::SeqCst), 3, "500 and 429 are retried");
    assert!(auth.lock().unwrap().iter().all(|h| h.ends_with("Bearer sk-secret-123")));
    // The same request again: from the cache, the server is not contacted; the key is in no cache file.
    let again = c.correct("The blue box <seg> is on the left.", &truth()).unwrap();
    assert_eq!(again, r);
    assert_eq!(count.load(Ordering::SeqCst), 3);
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        assert!(!text.contains("sk-secret-123"));
    }

    // A refusal is asked once more (bypassing the cache), then the sample fails naming the reply.
    let (url, count, _) = server(vec![Reply::Ok("I'm sorry, I can't."), Reply::Ok("Still no.")]);
    let c = OpenAiCorrector::new(&config(&url, None)).unwrap();
    let e = c.correct("The blue box <seg>.", &truth()).unwrap_err().to_string();
    assert!(e.contains("Corrected answer:") && e.contains("Still no."), "{e}");
    assert_eq!(count.load(Ordering::SeqCst), 2);

    // Malformed JSON fails at once with the endpoint and an excerpt; no secret in the message.
    let (url, _, _) = server(vec![Reply::Raw("{not json")]);
    let c = OpenAiCorrector::new(&config(&url, None)).unwrap();
    let e = c.correct("x <seg>", &truth()).unwrap_err().to_string();
    assert!(e.contains(&url) && e.contains("not json") && !e.contains("sk-secret"), "{e}");

    // A server slower than the timeout on every attempt: a transport error after all retries.
    let (url, _, _) = server((0..4).map(|_| Reply::Slow(1500)).collect());
    let c = OpenAiCorrector::new(&config(&url, None)).unwrap();
    let e = c.correct("x <seg>", &truth()).unwrap_err().to_string();
    assert!(e.contains("4 attempt(s)"), "{e}");

    // Error injection: the modified answer; an unchanged one is refused.
    let (url, _, _) = server(vec![
        Reply::Ok("Modified answer: The \"green\" cup <seg> is on the left."),
        Reply::Ok("Modified answer: The red cup <seg> is on the left."),
    ]);
    let c = OpenAiCorrector::new(&config(&url, None)).unwrap();
    assert_eq!(c.inject_errors(&truth(), 0).unwrap(), "The green cup <seg> is on the left.");
    assert!(c.inject_errors(&truth(), 0).is_err());

    // A named but unset key variable is an error naming the variable.
    let mut cfg = config(&url, None);
    cfg.api_key_env = Some("POPEN_TEST_UNSET_VARIABLE".into());
    let e = OpenAiCorrector::new(&cfg).err().unwrap().to_string();
    assert!(e.contains("POPEN_TEST_UNSET_VARIABLE"), "{e}");
}

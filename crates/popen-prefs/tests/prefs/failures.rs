//! Issue 20, items 2 and 3: collect stages whose samples fail for a systemic reason fail
//! (non-zero exit in the CLI: `Err` here), once, without writing the output or its
//! manifest; `max_skipped_fraction` and `fail_fast_after` decide when; no server text
//! carries the API key. The corrector talks to a loopback chat-completions server
//! (127.0.0.1, port 0, a bounded number of requests, stops by itself) that echoes the
//! request's Authorization header in its error bodies, as some proxies do.
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::backend::NdArray;
use popen_core::lexicon::Lexicon;
use popen_core::manifest::{manifest_beside, Manifest};
use popen_core::shard::merge::stage_complete;
use popen_core::shard::{parts_dir, read_shard, write_shard, ProposalSet, TextPref};
use popen_core::shardspec::ShardSpec;
use popen_prefs::collect_ps::{self, CollectPsConfig, ShardProposer};
use popen_prefs::collect_pt::{self, CollectPtConfig, CollectPtReport};
use popen_prefs::corrector::{Correction, Corrector, Truth};
use popen_prefs::openai::{OpenAiConfig, OpenAiCorrector};
use popen_prefs::select::Phase;

use crate::collect::world;

type B = NdArray<f32>;

/// The key of these tests: both an OpenAI-shaped token and the configured key.
const SECRET: &str = "sk-proj-Failure7Test0Key1234";
const KEY_VAR: &str = "POPEN_TEST_FAILURES_KEY";

/// A loopback chat-completions server: each request gets `reply(prompt, authorization)`
/// (status, body); it stops after `max` requests or 300 s without one (the model runs
/// between requests: slow in a debug build on a busy machine). Returns the base URL and the
/// request count.
fn serve(max: usize, reply: impl Fn(&str, &str) -> (u16, String) + Send + 'static) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let c2 = count.clone();
    std::thread::spawn(move || {
        let mut idle = Instant::now();
        while c2.load(Ordering::SeqCst) < max && idle.elapsed() < Duration::from_secs(300) {
            let mut s = match listener.accept() {
                Ok((s, _)) => s,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            idle = Instant::now();
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let (mut buf, mut chunk) = (Vec::new(), [0u8; 65536]);
            let (head, body) = loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break (String::new(), String::new());
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..p]).to_string();
                    let len: usize = head
                        .to_ascii_lowercase()
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                        .unwrap_or(0);
                    if buf.len() >= p + 4 + len {
                        break (head, String::from_utf8_lossy(&buf[p + 4..p + 4 + len]).to_string());
                    }
                }
            };
            c2.fetch_add(1, Ordering::SeqCst);
            let auth = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().starts_with("authorization:").then(|| l[14..].trim().to_string()))
                .unwrap_or_default();
            let prompt = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["messages"][0]["content"].as_str().map(String::from))
                .unwrap_or_default();
            let (status, body) = reply(&prompt, &auth);
            let msg =
                format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            s.write_all(msg.as_bytes()).ok();
        }
    });
    (url, count)
}

/// An error body that quotes the request's Authorization header.
fn echo(auth: &str, message: &str) -> String {
    serde_json::json!({"error": {"message": message, "request": {"headers": {"Authorization": auth}}}}).to_string()
}

fn ok(content: String) -> (u16, String) {
    (200, serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}}]}).to_string())
}

/// The answer a correction or injection prompt quotes (the templates end with it).
fn quoted_answer(prompt: &str) -> &str {
    prompt.rsplit("\nAnswer: ").next().unwrap_or("").trim()
}

fn corrector(url: &str, retries: u32) -> OpenAiCorrector {
    std::env::set_var(KEY_VAR, SECRET);
    let cfg = OpenAiConfig {
        base_url: url.into(),
        model: "test-model".into(),
        api_key_env: Some(KEY_VAR.into()),
        timeout_s: 5.0,
        retries,
        backoff_s: 0.01,
        cache_dir: None,
        ..OpenAiConfig::default()
    };
    OpenAiCorrector::new(&cfg).unwrap()
}

fn lexicon() -> Lexicon {
    Lexicon::from_benchmark_json(&serde_json::to_string(&popen_data::synth::lexicon()).unwrap()).unwrap()
}

fn run_pt(
    model: &Path,
    shard: &Path,
    out: &Path,
    cfg: &CollectPtConfig,
    c: &(dyn Corrector + Sync),
) -> popen_prefs::Result<CollectPtReport> {
    collect_pt::run::<B>(
        model,
        shard,
        out,
        cfg,
        c,
        "openai",
        &lexicon(),
        ShardSpec::new(0, 1).unwrap(),
        false,
        &Default::default(),
    )
}

/// Nothing a completed stage leaves: no output, no manifest (so the CLI's rerun does not say
/// "is complete").
fn assert_no_output(out: &Path) {
    assert!(!out.exists() && !manifest_beside(out).exists() && !stage_complete(out), "{}", out.display());
}

/// Counts the corrector calls (samples that reached the corrector).
struct Counting<'a>(&'a OpenAiCorrector, AtomicUsize);

impl Corrector for Counting<'_> {
    fn correct(&self, y: &str, t: &Truth) -> popen_prefs::Result<Correction> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.correct(y, t)
    }
    fn inject_errors(&self, t: &Truth, seed: u64) -> popen_prefs::Result<String> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.inject_errors(t, seed)
    }
}

/// (a) Every request gets 401 with the key echoed. Each sample makes exactly one request
/// (401 is not retried and fails the sample at its first corrector call), so: with the
/// defaults (4 samples < fail_fast_after 8) the end rule fails the run, 4 of 4 skipped, the
/// cause quoted once ("HTTP 401" once in the message); with fail_fast_after 2 and one sample
/// per window the run stops after the second sample (2 requests). The key is in no error,
/// and neither output nor manifest is written. On the old code the run returned Ok with 0
/// records and wrote the manifest with the key in every skip reason.
#[test]
fn every_request_401_fails_the_stage_once_and_never_shows_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (model, shard, _) = world(dir.path());
    let (url, count) = serve(16, |_, auth| (401, echo(auth, "Incorrect API key provided")));
    let c = corrector(&url, 3);
    let cfg = CollectPtConfig { max_new_tokens: 24, resample: 2, ..Default::default() };
    let out = dir.path().join("pt.parquet");
    let e = run_pt(&model, &shard, &out, &cfg, &c).unwrap_err().to_string();
    assert!(e.contains("4 of 4 samples skipped") && e.contains("Incorrect API key provided"), "{e}");
    assert_eq!(e.matches("HTTP 401").count(), 1, "the reason once: {e}");
    assert!(!e.contains(SECRET) && e.contains("[REDACTED]"), "{e}");
    assert_eq!(count.load(Ordering::SeqCst), 4);
    assert_no_output(&out);

    let ff = CollectPtConfig { concurrency: 1, fail_fast_after: 2, ..cfg.clone() };
    let out2 = dir.path().join("pt-ff.parquet");
    let before = count.load(Ordering::SeqCst);
    let e = run_pt(&model, &shard, &out2, &ff, &c).unwrap_err().to_string();
    assert!(e.contains("stopped after 2 consecutive samples"), "{e}");
    assert_eq!(e.matches("HTTP 401").count(), 1, "{e}");
    assert!(!e.contains(SECRET), "{e}");
    assert_eq!(count.load(Ordering::SeqCst) - before, 2, "samples 3 and 4 are not tried");
    assert_no_output(&out2);
}

/// (b) Connection refused (a port bound, then released): every request is a transport
/// error after its retries. With two samples per window and fail_fast_after 2 the first
/// window fails and the run stops there: 2 corrector calls of 4 samples.
#[test]
fn connection_refused_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let (model, shard, _) = world(dir.path());
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let oc = corrector(&format!("http://127.0.0.1:{port}/v1"), 1);
    let c = Counting(&oc, AtomicUsize::new(0));
    let cfg =
        CollectPtConfig { max_new_tokens: 24, resample: 2, concurrency: 2, fail_fast_after: 2, ..Default::default() };
    let out = dir.path().join("pt.parquet");
    let e = run_pt(&model, &shard, &out, &cfg, &c).unwrap_err().to_string();
    assert!(
        e.contains("stopped after 2 consecutive samples") && e.contains("request failed after 2 attempt(s)"),
        "{e}"
    );
    assert_eq!(c.1.load(Ordering::SeqCst), 2);
    assert_no_output(&out);
}

/// (c) + (d) A server that knows each sample by the object list its prompts quote: it fails
/// every request of the chosen samples with 500 (echoing the key), and answers the others'
/// corrections with the sample's ground-truth answer (a valid `y_c` whatever the random
/// model said) and their injections with the quoted answer minus its first word.
/// - 1 of 4 samples failing (0.25 <= max_skipped_fraction 0.5): the run succeeds, 3
///   records, the skip listed in the manifest with HTTP 500 and the key redacted (the
///   manifest holds the key nowhere);
/// - 3 of 4 failing (0.75 > 0.5): the run fails, no output, the good record (sample 3) is
///   committed in the parts; max_skipped_fraction 1 accepts the same failures; a rerun
///   against a healthy server resumes sample 3, computes samples 0-2, and writes all 4
///   records in input order (merged runs; plain concatenation would put sample 3 first).
#[test]
fn skipped_fraction_threshold_and_redacted_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let (model, shard, samples) = world(dir.path());
    // The object list of a sample as the prompts write it ("red cup, key").
    let lex = lexicon();
    let objects = |s: &popen_core::shard::Sample| -> String {
        let t = Truth::from_sample(s, &lex);
        let names: Vec<String> = t
            .targets
            .iter()
            .map(|t| t.colour.as_ref().map(|c| format!("{c} {}", t.class)).unwrap_or(t.class.clone()))
            .collect();
        names.join(", ")
    };
    let by_objects: std::collections::HashMap<String, String> =
        samples.iter().map(|s| (objects(s), s.answer.clone())).collect();
    assert_eq!(by_objects.len(), samples.len(), "the object lists tell the samples apart");
    let server = |failing: Vec<String>| {
        let by_objects = by_objects.clone();
        serve(64, move |prompt, auth| {
            let objs =
                prompt.split("\nObject list: ").nth(1).and_then(|r| r.lines().next()).unwrap_or("").trim().to_string();
            if failing.contains(&objs) {
                return (500, echo(auth, "upstream failure"));
            }
            if prompt.contains("Modified answer:") {
                let rest: Vec<&str> = quoted_answer(prompt).split_whitespace().skip(1).collect();
                ok(format!("Modified answer: {}", rest.join(" ")))
            } else {
                ok(format!("Corrected answer: {}", by_objects.get(&objs).expect("a known sample")))
            }
        })
    };
    let cfg = CollectPtConfig { max_new_tokens: 24, resample: 2, ..Default::default() };

    let (url, _) = server(vec![objects(&samples[1])]);
    let c = corrector(&url, 1);
    let out = dir.path().join("under.parquet");
    let r = run_pt(&model, &shard, &out, &cfg, &c).unwrap();
    assert_eq!((r.records, r.skipped), (3, 1), "{r:?}");
    let text = std::fs::read_to_string(manifest_beside(&out)).unwrap();
    assert!(!text.contains(SECRET), "{text}");
    let m = Manifest::read(manifest_beside(&out)).unwrap();
    assert_eq!(m.skipped.len(), 1);
    assert_eq!(m.skipped[0].record, samples[1].id);
    let reason = &m.skipped[0].reason;
    assert!(reason.contains("HTTP 500 after 2 attempt(s)") && reason.contains("upstream failure"), "{reason}");
    assert!(reason.contains("[REDACTED]"), "{reason}");

    let (url, _) = server(samples[..3].iter().map(objects).collect());
    let c = corrector(&url, 1);
    let out = dir.path().join("over.parquet");
    let e = run_pt(&model, &shard, &out, &cfg, &c).unwrap_err().to_string();
    assert!(e.contains("3 of 4 samples skipped (75.0% > max_skipped_fraction 0.5)"), "{e}");
    assert_eq!(e.matches("HTTP 500").count(), 1, "{e}");
    assert!(!e.contains(SECRET), "{e}");
    assert_no_output(&out);
    let kept = read_shard::<TextPref>(parts_dir(&out).join("part-00000.parquet")).unwrap();
    assert_eq!(kept.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec![samples[3].id.as_str()]);
    // A threshold of 1 accepts the same failures.
    let lax = CollectPtConfig { max_skipped_fraction: 1.0, ..cfg.clone() };
    let (url, _) = server(samples[..3].iter().map(objects).collect());
    let r = run_pt(&model, &shard, &dir.path().join("lax.parquet"), &lax, &corrector(&url, 1)).unwrap();
    assert_eq!((r.records, r.skipped), (1, 3));

    let (url, _) = server(vec![]);
    let r = run_pt(&model, &shard, &out, &cfg, &corrector(&url, 1)).unwrap();
    assert_eq!((r.records, r.skipped), (3, 0));
    let recs = read_shard::<TextPref>(&out).unwrap();
    let ids: Vec<&str> = recs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, samples.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), "input order");
    let m = Manifest::read(manifest_beside(&out)).unwrap();
    assert_eq!(m.counts.get("resumed"), Some(&1));
    assert!(m.outputs_intact());
}

/// (e) The new settings: absent from a TOML they take their defaults (0.5, 8), so older
/// configs still parse; out-of-range and NaN fractions are refused; the pipelines' TOMLs
/// parse and validate.
#[test]
fn skip_settings_defaults_and_validation() {
    let pt: CollectPtConfig =
        toml::from_str("seed = 0\nmax_new_tokens = 96\nresample = 3\ntemperature = 1.0\ntop_p = 0.9\nmin_match = 3\n")
            .unwrap();
    assert_eq!((pt.max_skipped_fraction, pt.fail_fast_after), (0.5, 8));
    for bad in [-0.1, 1.01, f64::NAN] {
        let e = CollectPtConfig { max_skipped_fraction: bad, ..pt.clone() }.validate().unwrap_err().to_string();
        assert!(e.contains("max_skipped_fraction"), "{e}");
        let ps = CollectPsConfig { max_skipped_fraction: bad, ..Default::default() };
        assert!(ps.validate().unwrap_err().to_string().contains("max_skipped_fraction"));
    }
    for good in [0.0, 1.0] {
        CollectPtConfig { max_skipped_fraction: good, fail_fast_after: 0, ..pt.clone() }.validate().unwrap();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines");
    let pt: CollectPtConfig =
        toml::from_str(&std::fs::read_to_string(root.join("collect-pt-tiny.toml")).unwrap()).unwrap();
    pt.validate().unwrap();
    let ps: CollectPsConfig =
        toml::from_str(&std::fs::read_to_string(root.join("collect-ps-tiny.toml")).unwrap()).unwrap();
    ps.validate().unwrap();
    assert_eq!(ps.max_skipped_fraction, 0.5);
}

/// collect-ps counts failures, not unselected samples: proposals for sample 0 only make
/// samples 1-3 fail ("no proposals"), 3 of 4 > 0.5: the run fails naming the cause once;
/// with the threshold at 1 it succeeds and reports 3 failed skips. (Phase-1 "no pair" skips
/// are checked not to count in collect.rs: 2 of 2 skipped, the run succeeds.)
#[test]
fn collect_ps_counts_failures_toward_the_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let (model, shard, samples) = world(dir.path());
    let s = &samples[0];
    let props = vec![ProposalSet {
        id: s.id.clone(),
        width: s.width,
        height: s.height,
        masks: s.instance_masks.clone(),
        scores: vec![1.0; s.instance_masks.len()],
        meta: "{}".into(),
    }];
    let pshard = dir.path().join("proposals.parquet");
    write_shard(&pshard, props).unwrap();
    let proposer = ShardProposer::open(&[&pshard]).unwrap();
    let mut cfg = CollectPsConfig { phase: Phase::Two, perturbations: 3, batch_size: 3, ..Default::default() };
    cfg.select.phase2_top = 3;
    let run = |cfg: &CollectPsConfig, out: &Path| {
        collect_ps::run::<B>(
            &model,
            &shard,
            out,
            cfg,
            &proposer,
            ShardSpec::new(0, 1).unwrap(),
            false,
            &Default::default(),
        )
    };
    let out = dir.path().join("ps.parquet");
    let e = run(&cfg, &out).unwrap_err().to_string();
    assert!(e.contains("collect-ps: 3 of 4 samples skipped (75.0% > max_skipped_fraction 0.5)"), "{e}");
    assert_eq!(e.matches("no proposals for sample").count(), 1, "{e}");
    assert_no_output(&out);
    let lax = CollectPsConfig { max_skipped_fraction: 1.0, ..cfg.clone() };
    let out = dir.path().join("ps-lax.parquet");
    let r = run(&lax, &out).unwrap();
    assert_eq!((r.records, r.skipped, r.failed), (1, 3, 3));
    let m = Manifest::read(manifest_beside(&out)).unwrap();
    assert_eq!(m.counts.get("skipped_failures"), Some(&3));
}

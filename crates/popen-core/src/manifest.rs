//! The JSON manifest every stage writes beside its shards: what ran, on what, with which
//! config, what came out, and what was skipped and why.

use crate::error::{CoreError, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// File name of the manifest inside a stage's output folder (or `<stem>.manifest.json`
/// beside a single shard).
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    /// Row count for shards; absent for other files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
}

impl FileEntry {
    pub fn of(path: impl AsRef<Path>, rows: Option<u64>) -> Result<Self> {
        let path = path.as_ref();
        let (sha256, bytes) = sha256_file(path)?;
        Ok(FileEntry { path: path.display().to_string(), bytes, sha256, rows })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Skipped {
    /// Record id (or file:index when the record has no id).
    pub record: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub stage: String,
    pub tool_version: String,
    /// The full effective config of the stage.
    pub config: serde_json::Value,
    /// sha256 of the config's canonical JSON (sorted keys, no whitespace).
    pub config_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `I/N` when this is one task of a job array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    pub inputs: Vec<FileEntry>,
    pub outputs: Vec<FileEntry>,
    /// Named counts (rows per split, records read, ...).
    pub counts: BTreeMap<String, u64>,
    pub skipped: Vec<Skipped>,
    /// Seconds per phase of the stage.
    pub timings: BTreeMap<String, f64>,
    /// The job-array task outputs this output was merged from (`popen merge`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<FileEntry>,
    /// The hash of everything that defines the output ([`Definition::hash`]): a rerun whose
    /// definition hashes the same may skip the work; any other recomputes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<String>,
    /// Preference shards: the fingerprint of the model whose log-probs / embeddings they
    /// store (also in the shard's metadata, `popen.reference_model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_model: Option<String>,
}

impl Manifest {
    pub fn new(stage: &str, config: &impl Serialize) -> Result<Self> {
        let config = serde_json::to_value(config)
            .map_err(|e| CoreError::Invalid(format!("config of stage '{stage}' is not serializable: {e}")))?;
        let config_hash = sha256_hex(canonical_json(&config).as_bytes());
        Ok(Manifest {
            stage: stage.to_string(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            config,
            config_hash,
            seed: None,
            shard: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
            counts: BTreeMap::new(),
            skipped: Vec::new(),
            timings: BTreeMap::new(),
            merged_from: Vec::new(),
            definition: None,
            reference_model: None,
        })
    }

    pub fn add_input(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.inputs.push(FileEntry::of(path, None)?);
        Ok(())
    }

    pub fn add_output(&mut self, path: impl AsRef<Path>, rows: Option<u64>) -> Result<()> {
        self.outputs.push(FileEntry::of(path, rows)?);
        Ok(())
    }

    pub fn skip(&mut self, record: impl Into<String>, reason: impl Into<String>) {
        self.skipped.push(Skipped { record: record.into(), reason: reason.into() });
    }

    /// [`Self::skip`] plus a warning line on stderr naming the stage, record and reason (a
    /// skipped record is data the user expected in the output: say so as it happens).
    pub fn skip_warn(&mut self, record: impl Into<String>, reason: impl Into<String>) {
        let (record, reason) = (record.into(), reason.into());
        tracing::warn!("{}: skipped record '{record}': {reason}", self.stage);
        self.skip(record, reason);
    }

    pub fn count(&mut self, name: &str, n: u64) {
        *self.counts.entry(name.to_string()).or_default() += n;
    }

    /// Records the seconds since `start` under `name`.
    pub fn time(&mut self, name: &str, start: Instant) {
        self.timings.insert(name.to_string(), start.elapsed().as_secs_f64());
    }

    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut json = serde_json::to_string_pretty(self).expect("manifest serializes");
        json.push('\n');
        crate::shard::atomic_write(path, json.as_bytes())
    }

    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| CoreError::shard(path, format!("not a popen manifest: {e}")))
    }

    /// True when every output listed still exists with the recorded hash: a rerun of the
    /// stage can skip the work.
    pub fn outputs_intact(&self) -> bool {
        self.outputs.iter().all(|o| matches!(sha256_file(&o.path), Ok((h, _)) if h == o.sha256))
    }
}

/// JSON with object keys sorted and no whitespace, so equal configs hash equally.
pub fn canonical_json(v: &serde_json::Value) -> String {
    fn sort(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let sorted: BTreeMap<&String, serde_json::Value> = m.iter().map(|(k, v)| (k, sort(v))).collect();
                serde_json::to_value(sorted).expect("sorted map serializes")
            }
            serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string(&sort(v)).expect("value serializes")
}

/// sha256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// sha256 (hex) and size of a file, streamed. Memoized in the process by (path, size,
/// modification time, inode): a stage that hashes its inputs for its definition and again
/// for its manifest reads a large model file once.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<(String, u64)> {
    use std::sync::{Mutex, OnceLock};
    type Key = (PathBuf, u64, Option<std::time::SystemTime>, u64);
    static MEMO: OnceLock<Mutex<std::collections::HashMap<Key, String>>> = OnceLock::new();
    let path = path.as_ref();
    let meta = std::fs::metadata(path).map_err(|e| CoreError::io(path, e))?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let ino = 0u64;
    let key: Key = (path.to_path_buf(), meta.len(), meta.modified().ok(), ino);
    let memo = MEMO.get_or_init(Default::default);
    if let Some(h) = memo.lock().expect("hash memo").get(&key) {
        return Ok((h.clone(), meta.len()));
    }
    let (h, n) = sha256_file_uncached(path)?;
    // A file written within the clock's resolution of our read could change unseen: only
    // memoize files whose modification time is at least a second old.
    let settled = meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|d| d.as_secs() >= 1);
    if settled && n == meta.len() {
        memo.lock().expect("hash memo").insert(key, h.clone());
    }
    Ok((h, n))
}

fn sha256_file_uncached(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path).map_err(|e| CoreError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| CoreError::io(path, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

/// Manifest path beside a single-file stage output: `x.parquet` -> `x.manifest.json`.
pub fn manifest_beside(out: impl AsRef<Path>) -> PathBuf {
    PathBuf::from(format!("{}.manifest.json", out.as_ref().with_extension("").display()))
}

/// Manifest path for a stage output folder.
pub fn manifest_path(dir: impl AsRef<Path>) -> PathBuf {
    dir.as_ref().join(MANIFEST_FILE)
}

/// Bumped whenever a change to popen alters what a stage writes for the same config and
/// inputs: outputs written by an older version are recomputed when their stage runs again.
pub const OUTPUTS_VERSION: u32 = 1;

/// Everything that defines a stage's output: the stage, its effective config (with the
/// command-line overrides and the settings of helpers such as the corrector), the content of
/// every input (sha256; a moved file with the same bytes defines the same output), the
/// shard task and [`OUTPUTS_VERSION`]. A complete output whose manifest records the same
/// [`hash`](Self::hash) is the result a rerun would compute; anything else is recomputed.
#[derive(Clone, Debug, PartialEq)]
pub struct Definition {
    pub stage: String,
    pub config: serde_json::Value,
    pub inputs: Vec<FileEntry>,
    pub shard: Option<String>,
    /// Config paths (`config.part_records`) that change how a run works, not what it
    /// writes: recorded in the manifest, left out of the hash.
    pub ignored: Vec<String>,
}

impl Definition {
    pub fn new(stage: &str, config: &impl Serialize) -> Result<Self> {
        let config = serde_json::to_value(config)
            .map_err(|e| CoreError::Invalid(format!("config of stage '{stage}' is not serializable: {e}")))?;
        Ok(Definition { stage: stage.to_string(), config, inputs: Vec::new(), shard: None, ignored: Vec::new() })
    }

    /// Leaves config paths (dotted, e.g. `config.concurrency`) out of the hash: settings that
    /// do not change the output (part sizes, concurrency).
    pub fn ignoring(mut self, paths: &[&str]) -> Self {
        self.ignored.extend(paths.iter().map(|p| p.to_string()));
        self
    }

    /// The config without the ignored paths.
    fn defining_config(&self) -> serde_json::Value {
        let mut c = self.config.clone();
        for path in &self.ignored {
            let mut keys: Vec<&str> = path.split('.').collect();
            let last = keys.pop().unwrap_or_default();
            let mut at = Some(&mut c);
            for k in keys {
                at = at.and_then(|v| v.get_mut(k));
            }
            if let Some(serde_json::Value::Object(m)) = at {
                m.remove(last);
            }
        }
        c
    }

    /// Adds an input file (hashed now).
    pub fn input(mut self, path: impl AsRef<Path>) -> Result<Self> {
        self.inputs.push(FileEntry::of(path, None)?);
        Ok(self)
    }

    /// The shard task (`I/N`; the whole input records none).
    pub fn shard(mut self, shard: &crate::shardspec::ShardSpec) -> Self {
        self.shard = (!shard.is_all()).then(|| shard.to_string());
        self
    }

    /// sha256 of the canonical JSON of stage, outputs version, config, input hashes, shard.
    pub fn hash(&self) -> String {
        let v = serde_json::json!({
            "stage": self.stage,
            "outputs_version": OUTPUTS_VERSION,
            "config": self.defining_config(),
            "inputs": self.inputs.iter().map(|i| i.sha256.as_str()).collect::<Vec<_>>(),
            "shard": self.shard,
        });
        sha256_hex(canonical_json(&v).as_bytes())
    }

    /// The manifest of a run of this definition (outputs, counts and timings to be added).
    pub fn manifest(&self) -> Manifest {
        let mut m = Manifest::new(&self.stage, &self.config).expect("a JSON value serializes");
        m.inputs = self.inputs.clone();
        m.shard = self.shard.clone();
        m.definition = Some(self.hash());
        m
    }

    /// What a rerun of this definition does with `out` and the manifest beside it
    /// (`manifest`: that manifest's path).
    pub fn freshness(&self, out: &Path, manifest: &Path) -> Freshness {
        if !out.exists() || !manifest.is_file() {
            return Freshness::Missing;
        }
        let old = match Manifest::read(manifest) {
            Ok(m) => m,
            Err(e) => return Freshness::Stale(format!("its manifest is unreadable ({e})")),
        };
        if !old.outputs_intact() {
            return Freshness::Stale("the output no longer matches its manifest (changed or partly written)".into());
        }
        let hash = self.hash();
        if old.definition.as_deref() == Some(hash.as_str()) {
            return Freshness::Complete(hash);
        }
        Freshness::Stale(self.differences(&old))
    }

    /// [`freshness`](Self::freshness) of `out` (manifest beside it), said on stderr: true when
    /// `out` is already this definition's complete result (nothing to do), false when the
    /// stage must (re)compute it, after saying why an existing output is stale.
    pub fn is_complete(&self, out: &Path) -> bool {
        match self.freshness(out, &manifest_beside(out)) {
            Freshness::Complete(hash) => {
                eprintln!(
                    "{} is complete: same definition {} (config, inputs, shard); nothing to do (--force recomputes it)",
                    out.display(),
                    &hash[..12]
                );
                true
            }
            Freshness::Stale(why) => {
                eprintln!("{} exists but is not this run's result ({why}): recomputing", out.display());
                false
            }
            Freshness::Missing => false,
        }
    }

    /// Why `old` (a manifest of an earlier run) is not this definition, in words.
    pub fn differences(&self, old: &Manifest) -> String {
        let mut why = Vec::new();
        if old.definition.is_none() {
            why.push("its manifest records no definition (written by an older popen)".to_string());
        }
        if old.stage != self.stage {
            why.push(format!("stage '{}' (now '{}')", old.stage, self.stage));
        }
        let mut keys = Vec::new();
        json_differences("", &old.config, &self.config, &mut keys);
        keys.retain(|k| !self.ignored.contains(k));
        if !keys.is_empty() {
            let n = keys.len();
            keys.truncate(6);
            why.push(format!(
                "config {}{}",
                keys.join(", "),
                if n > keys.len() { format!(" and {} more", n - keys.len()) } else { String::new() }
            ));
        }
        if old.inputs.len() != self.inputs.len() {
            why.push(format!("{} inputs (now {})", old.inputs.len(), self.inputs.len()));
        } else {
            for (o, n) in old.inputs.iter().zip(&self.inputs) {
                if o.sha256 != n.sha256 {
                    why.push(format!("input {} changed", n.path));
                }
            }
        }
        if old.shard != self.shard {
            let s = |x: &Option<String>| x.clone().unwrap_or_else(|| "all".into());
            why.push(format!("shard {} (now {})", s(&old.shard), s(&self.shard)));
        }
        if why.is_empty() {
            why.push(format!("written by a popen whose outputs differ (outputs version now {OUTPUTS_VERSION})"));
        }
        why.join("; ")
    }
}

/// See [`Definition::freshness`].
#[derive(Clone, Debug, PartialEq)]
pub enum Freshness {
    /// No output (or no manifest) yet.
    Missing,
    /// The output is intact and was computed from this definition (its hash).
    Complete(String),
    /// An output exists but is not this definition's result: why.
    Stale(String),
}

/// Paths (`a.b[2]`) where two JSON values differ, in key order.
fn json_differences(at: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value::Object;
    match (a, b) {
        (Object(x), Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => json_differences(&path, p, q, out),
                    _ => out.push(path),
                }
            }
        }
        _ if a != b => out.push(if at.is_empty() { "(whole)".to_string() } else { at.to_string() }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_hash_ignores_key_order() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b":1,"a":{"y":2,"x":3}}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"a":{"x":3,"y":2},"b":1}"#).unwrap();
        assert_eq!(Manifest::new("s", &a).unwrap().config_hash, Manifest::new("s", &b).unwrap().config_hash);
        assert_eq!(canonical_json(&a), r#"{"a":{"x":3,"y":2},"b":1}"#);
    }

    #[test]
    fn write_read_and_intact() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.bin");
        std::fs::write(&out, b"abc").unwrap();
        let mut m = Manifest::new("test", &serde_json::json!({"k": 1})).unwrap();
        m.add_output(&out, Some(3)).unwrap();
        m.skip("r1", "broken");
        // sha256("abc")
        assert_eq!(m.outputs[0].sha256, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let p = manifest_path(dir.path());
        m.write(&p).unwrap();
        let back = Manifest::read(&p).unwrap();
        assert_eq!(back, m);
        assert!(back.outputs_intact());
        std::fs::write(&out, b"abd").unwrap();
        assert!(!back.outputs_intact());
    }

    /// Hand-built cases: a rerun is complete only for the same config, input bytes, shard;
    /// each difference is named.
    #[test]
    fn definition_freshness_names_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.bin");
        std::fs::write(&input, b"one").unwrap();
        let out = dir.path().join("out.bin");
        let mpath = manifest_beside(&out);
        let def = |seed: u64, phase: u8| {
            Definition::new("st", &serde_json::json!({"config": {"seed": seed, "phase": phase}}))
                .unwrap()
                .input(&input)
                .unwrap()
        };
        assert_eq!(def(0, 1).freshness(&out, &mpath), Freshness::Missing);
        std::fs::write(&out, b"result").unwrap();
        let mut m = def(0, 1).manifest();
        m.add_output(&out, None).unwrap();
        m.write(&mpath).unwrap();
        assert!(matches!(def(0, 1).freshness(&out, &mpath), Freshness::Complete(_)));
        // A setting that does not define the output (ignored) keeps it complete.
        let part = |n: u64| {
            Definition::new("st", &serde_json::json!({"config": {"seed": 0, "phase": 1, "part": n}}))
                .unwrap()
                .input(&input)
                .unwrap()
                .ignoring(&["config.part"])
        };
        assert_eq!(part(1).hash(), part(2).hash());
        assert_eq!(part(1).hash(), def(0, 1).hash(), "an ignored key is as if absent");
        let Freshness::Stale(why) = def(1, 2).freshness(&out, &mpath) else { panic!("seed and phase changed") };
        assert!(why.contains("config.phase") && why.contains("config.seed"), "{why}");
        let sharded = def(0, 1).shard(&crate::shardspec::ShardSpec::new(1, 4).unwrap());
        let Freshness::Stale(why) = sharded.freshness(&out, &mpath) else { panic!("shard changed") };
        assert!(why.contains("shard all (now 1/4)"), "{why}");
        // Same path, other bytes (and an older mtime cannot fool the memo: new inode).
        let tmp = dir.path().join("in.tmp");
        std::fs::write(&tmp, b"two").unwrap();
        std::fs::rename(&tmp, &input).unwrap();
        let Freshness::Stale(why) = def(0, 1).freshness(&out, &mpath) else { panic!("input changed") };
        assert!(why.contains("in.bin changed"), "{why}");
        // The output itself edited after the run.
        std::fs::write(&input, b"one").unwrap();
        std::fs::write(&out, b"edited").unwrap();
        assert!(matches!(def(0, 1).freshness(&out, &mpath), Freshness::Stale(w) if w.contains("no longer matches")));
    }
}

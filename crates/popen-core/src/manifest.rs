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
}

impl Manifest {
    pub fn new(stage: &str, config: &impl Serialize) -> Result<Self> {
        let config = serde_json::to_value(config)
            .map_err(|e| CoreError::Invalid(format!("config of stage '{stage}' is not serializable: {e}")))?;
        let config_hash = hex::encode(Sha256::digest(canonical_json(&config).as_bytes()));
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

/// sha256 (hex) and size of a file, streamed.
pub fn sha256_file(path: impl AsRef<Path>) -> Result<(String, u64)> {
    let path = path.as_ref();
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
}

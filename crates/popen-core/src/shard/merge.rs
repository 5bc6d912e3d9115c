//! Merging the outputs of a job array: task I of N wrote `x-0000I-of-0000N.parquet` (+ its
//! manifest) for the input positions `pos % N == I`; [`merge_stage`] checks that every task
//! finished (file and manifest present and intact, one stage, config and input set) and
//! writes `x.parquet` with the records in input order, i.e. the file a single process
//! writes (byte for byte: same records, same writer, same row groups), and
//! `x.manifest.json` (counts summed, skipped records in input order, the shard files under
//! `merged_from`).
//!
//! The input order comes from the record ids: every sharded stage writes at most one record
//! per input record, with the input's id (samples: the sample id; photo folders: the file
//! stem). A record the task skipped leaves a gap, which the id match absorbs.

use super::{read_kind, Prediction, ProposalSet, Record, SegPref, ShardReader, ShardWriter, TextPref};
use crate::error::{CoreError, Result};
use crate::manifest::{manifest_beside, FileEntry, Manifest};
use crate::shardspec::ShardSpec;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One task's output of a sharded stage.
#[derive(Clone, Debug)]
pub struct ShardOutput {
    pub shard: ShardSpec,
    pub path: PathBuf,
    pub manifest: PathBuf,
}

/// The N task outputs of stage output `out` (`ShardSpec::output_path` of each task).
pub fn shard_outputs(out: &Path, count: u32) -> Result<Vec<ShardOutput>> {
    if count == 0 {
        return Err(CoreError::Invalid(format!(
            "{}: 0 shards to merge; N is the job array's task count (>= 1), as in --shard I/N",
            out.display()
        )));
    }
    (0..count)
        .map(|i| {
            let shard = ShardSpec::new(i, count)?;
            let path = shard.output_path(out);
            let manifest = manifest_beside(&path);
            Ok(ShardOutput { shard, path, manifest })
        })
        .collect()
}

/// True when `out` and its manifest exist, the manifest's outputs are intact and, for a
/// merged output, every task shard it was merged from that is still on disk is the same
/// file (a recomputed shard makes the merge stale): a rerun of the merge has nothing to do.
pub fn stage_complete(out: &Path) -> bool {
    let m = manifest_beside(out);
    if !out.is_file() || !m.is_file() {
        return false;
    }
    let Ok(m) = Manifest::read(&m) else { return false };
    m.outputs_intact()
        && m.merged_from.iter().all(|f| {
            !Path::new(&f.path).exists() || crate::manifest::sha256_file(&f.path).is_ok_and(|(h, _)| h == f.sha256)
        })
}

/// Checks that every task of an N-task array finished: each output file and its manifest
/// exist, the manifest describes that file (its sha256) and all manifests agree on stage,
/// config and inputs. Every problem is listed, each naming the task index and the file.
pub fn check_shards(out: &Path, count: u32) -> Result<Vec<(ShardOutput, Manifest)>> {
    let mut problems = Vec::new();
    let mut found = Vec::new();
    for s in shard_outputs(out, count)? {
        let task = format!("shard {} (array task {})", s.shard, s.shard.index);
        if !s.path.is_file() {
            let parts = super::parts_dir(&s.path);
            let hint = if parts.is_dir() {
                format!("; {} holds the parts of an unfinished run", parts.display())
            } else {
                String::new()
            };
            problems.push(format!("{task}: output {} is missing{hint}", s.path.display()));
            continue;
        }
        if !s.manifest.is_file() {
            problems.push(format!("{task}: manifest {} is missing (the task did not finish)", s.manifest.display()));
            continue;
        }
        let m = match Manifest::read(&s.manifest) {
            Ok(m) => m,
            Err(e) => {
                problems.push(format!("{task}: {e}"));
                continue;
            }
        };
        let (sha, _) = crate::manifest::sha256_file(&s.path)?;
        if !m.outputs.iter().any(|o| o.sha256 == sha) {
            problems.push(format!(
                "{task}: {} does not describe {} (sha256 differs: a stale or foreign manifest)",
                s.manifest.display(),
                s.path.display()
            ));
            continue;
        }
        if let Some(recorded) = &m.shard {
            if recorded != &s.shard.to_string() {
                problems.push(format!("{task}: {} says shard {recorded}", s.manifest.display()));
                continue;
            }
        }
        found.push((s, m));
    }
    if let Some((first, m0)) = found.first() {
        let inputs = |m: &Manifest| m.inputs.iter().map(|i| i.sha256.clone()).collect::<Vec<_>>();
        for (s, m) in &found[1..] {
            let what = if m.stage != m0.stage {
                Some(format!("stage '{}' vs '{}'", m.stage, m0.stage))
            } else if m.config_hash != m0.config_hash {
                Some(format!("config hash {} vs {}", m.config_hash, m0.config_hash))
            } else if inputs(m) != inputs(m0) {
                Some("other input files".to_string())
            } else {
                None
            };
            if let Some(what) = what {
                problems.push(format!(
                    "shard {}: {} differs from {} ({what}): the tasks ran different jobs",
                    s.shard,
                    s.manifest.display(),
                    first.manifest.display()
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Err(CoreError::Invalid(format!(
            "cannot merge {} from {count} shards:\n  {}",
            out.display(),
            problems.join("\n  ")
        )));
    }
    Ok(found)
}

/// What [`merge_stage`] did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MergeReport {
    pub output: PathBuf,
    pub manifest: PathBuf,
    pub kind: String,
    pub shards: u32,
    pub rows: usize,
}

/// The id a record carries (the id of the input record it came from).
pub trait Keyed {
    fn key(&self) -> &str;
}
impl Keyed for Prediction {
    fn key(&self) -> &str {
        &self.id
    }
}
impl Keyed for TextPref {
    fn key(&self) -> &str {
        &self.id
    }
}
impl Keyed for SegPref {
    fn key(&self) -> &str {
        &self.id
    }
}
impl Keyed for ProposalSet {
    fn key(&self) -> &str {
        &self.id
    }
}

/// Checks the N task outputs of `out` ([`check_shards`]) and merges them into `out` and its
/// manifest. `order` = the ids of the stage's input records in input order (position p was
/// task `p % N`'s). The record kind is read from the shard files.
pub fn merge_stage(out: &Path, count: u32, order: &[String]) -> Result<MergeReport> {
    let shards = check_shards(out, count)?;
    let Some((first, _)) = shards.first() else {
        return Err(CoreError::Invalid(format!("{}: no shards to merge", out.display())));
    };
    let kind = read_kind(&first.path)?.unwrap_or_default();
    let rows = match kind.as_str() {
        k if k == Prediction::KIND => merge_records::<Prediction>(out, &shards, order)?,
        k if k == TextPref::KIND => merge_records::<TextPref>(out, &shards, order)?,
        k if k == SegPref::KIND => merge_records::<SegPref>(out, &shards, order)?,
        k if k == ProposalSet::KIND => merge_records::<ProposalSet>(out, &shards, order)?,
        other => {
            return Err(CoreError::shard(
                &shards[0].0.path,
                format!("holds '{other}' records; merging knows prediction, text-pref, seg-pref and proposal shards"),
            ))
        }
    };
    Ok(MergeReport { output: out.to_path_buf(), manifest: manifest_beside(out), kind, shards: count, rows })
}

/// A shard read record by record, remembering the row for messages.
struct Stream<T: Record> {
    reader: ShardReader<T>,
    buf: VecDeque<T>,
    row: usize,
}

impl<T: Record> Stream<T> {
    fn peek(&mut self) -> Result<Option<&T>> {
        while self.buf.is_empty() {
            match self.reader.next() {
                Some(batch) => self.buf.extend(batch?),
                None => return Ok(None),
            }
        }
        Ok(self.buf.front())
    }
    fn pop(&mut self) -> Option<T> {
        self.row += 1;
        self.buf.pop_front()
    }
}

/// Interleaves the task outputs back into input order and writes `out` + its manifest;
/// returns the row count.
fn merge_records<T: Record + Keyed>(out: &Path, shards: &[(ShardOutput, Manifest)], order: &[String]) -> Result<usize> {
    let t0 = Instant::now();
    let n = shards.len();
    let mut streams = shards
        .iter()
        .map(|(s, _)| Ok(Stream { reader: ShardReader::<T>::open(&s.path)?, buf: VecDeque::new(), row: 0 }))
        .collect::<Result<Vec<_>>>()?;
    // The tasks' file metadata (the reference model of preference shards) carries over; the
    // tasks must agree on it, as a single process writes one.
    let meta = |p: &Path| -> Result<Vec<(String, String)>> {
        Ok(super::read_metadata(p)?.into_iter().filter(|(k, _)| k != super::KIND_KEY).collect())
    };
    let extra = meta(&shards[0].0.path)?;
    for (s, _) in &shards[1..] {
        if meta(&s.path)? != extra {
            return Err(CoreError::shard(
                &s.path,
                format!("its file metadata differs from {}'s (another reference model?)", shards[0].0.path.display()),
            ));
        }
    }
    let mut writer = ShardWriter::<T>::create_with_metadata(out, &extra)?;
    for (pos, id) in order.iter().enumerate() {
        let s = &mut streams[pos % n];
        if s.peek()?.is_some_and(|r| r.key() == id) {
            let r = s.pop().expect("peeked");
            writer.write(r)?;
        }
    }
    for (k, s) in streams.iter_mut().enumerate() {
        let row = s.row;
        if let Some(r) = s.peek()? {
            return Err(CoreError::Shard {
                path: shards[k].0.path.clone(),
                row: Some(row),
                column: Some("id".into()),
                message: format!(
                    "record '{}' is not where the input order puts this shard's records (not among the \
                     input ids, or out of order): was the shard computed from another input?",
                    r.key()
                ),
            });
        }
    }
    let rows = writer.finish()?;
    let manifest = merged_manifest(out, shards, order, rows, t0)?;
    manifest.write(manifest_beside(out))?;
    Ok(rows)
}

/// The stage manifest of the merged output: the tasks' stage, config and inputs; counts and
/// timings summed; skipped records in input order; the task outputs under `merged_from`.
fn merged_manifest(
    out: &Path,
    shards: &[(ShardOutput, Manifest)],
    order: &[String],
    rows: usize,
    t0: Instant,
) -> Result<Manifest> {
    let m0 = &shards[0].1;
    let mut m = m0.clone();
    m.tool_version = env!("CARGO_PKG_VERSION").to_string();
    m.shard = None;
    m.outputs = vec![FileEntry::of(out, Some(rows as u64))?];
    m.counts = BTreeMap::new();
    m.timings = BTreeMap::new();
    m.skipped = Vec::new();
    m.merged_from = Vec::new();
    // The tasks' definitions differ by their shard; the merged file is defined by its shards
    // (`merged_from`), and a single-process run of the stage into this path recomputes.
    m.definition = None;
    for (s, sm) in shards {
        for (k, v) in &sm.counts {
            *m.counts.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &sm.timings {
            *m.timings.entry(k.clone()).or_default() += v;
        }
        m.skipped.extend(sm.skipped.iter().cloned());
        m.merged_from.push(FileEntry::of(&s.path, sm.outputs.first().and_then(|o| o.rows))?);
    }
    let position: HashMap<&str, usize> = order.iter().enumerate().rev().map(|(p, id)| (id.as_str(), p)).collect();
    m.skipped.sort_by_key(|s| position.get(s.record.as_str()).copied().unwrap_or(usize::MAX));
    m.time("merge_seconds", t0);
    Ok(m)
}

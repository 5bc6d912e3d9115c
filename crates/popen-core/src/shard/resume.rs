//! Resumable shard output for slow stages (SAM proposals, preference collection): records
//! are committed in small parts beside the output, so a killed job, rerun with the same
//! configuration, skips what it already wrote and finishes with the same file an
//! uninterrupted run writes.
//!
//! Layout: `<out>.parts/` holds `fingerprint` (the configuration the parts belong to) and
//! `part-00000.parquet`, `part-00001.parquet`, ... each written atomically (temp + rename)
//! by [`ShardWriter`]. [`ResumableWriter::finish`] concatenates the parts in order into
//! `<out>` (atomically) and removes the folder.
//!
//! Parts written under another fingerprint (a changed config or input) are discarded with a
//! warning: they are not this run's records. A run that fails before committing any part
//! removes the folder it created, so nothing is left to block or confuse the next run.
//! `runs` lists the first part of each run that opened the folder. A run writes its records
//! in input order, but a rerun also computes the samples an earlier run skipped (a failed
//! corrector request), which come before some resumed records in the input:
//! [`ResumableWriter::finish_ordered`] merges the runs back into input order, holding one
//! part per run in memory.

use super::{read_shard, Record, ShardWriter};
use crate::error::{CoreError, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// See the module documentation.
pub struct ResumableWriter<T: Record> {
    out: PathBuf,
    parts: PathBuf,
    chunk: usize,
    pending: Vec<T>,
    next_part: usize,
    done: HashSet<String>,
    resumed: usize,
    written: usize,
    finished: bool,
    metadata: Vec<(String, String)>,
    /// First part of each run (this one last).
    runs: Vec<usize>,
}

/// `<out>.parts`.
pub fn parts_dir(out: impl AsRef<Path>) -> PathBuf {
    let out = out.as_ref();
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!("{name}.parts"))
}

fn part_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("part-{i:05}.parquet"))
}

impl<T: Record> ResumableWriter<T> {
    /// Opens (or starts) the parts of `out`. `fingerprint` identifies the configuration and
    /// inputs: parts left by a run with a different one are discarded with a warning (they
    /// hold another definition's records); `fresh` discards any. `id_of` names a record, for
    /// [`is_done`](Self::is_done). Every `chunk` records a part is committed.
    pub fn open(
        out: impl AsRef<Path>,
        fingerprint: &str,
        chunk: usize,
        fresh: bool,
        id_of: impl Fn(&T) -> String,
    ) -> Result<Self> {
        let out = out.as_ref().to_path_buf();
        let parts = parts_dir(&out);
        if fresh && parts.exists() {
            std::fs::remove_dir_all(&parts).map_err(|e| CoreError::io(&parts, e))?;
        }
        std::fs::create_dir_all(&parts).map_err(|e| CoreError::io(&parts, e))?;
        let fp_path = parts.join("fingerprint");
        match std::fs::read_to_string(&fp_path) {
            Ok(old) if old.trim() == fingerprint => {}
            Ok(old) => {
                let n = count_parts(&parts);
                if n > 0 {
                    tracing::warn!(
                        "{}: discarding {n} committed part(s) of a run with another definition \
                         (fingerprint {} != {}): a changed config or input is recomputed",
                        parts.display(),
                        short(old.trim()),
                        short(fingerprint)
                    );
                }
                std::fs::remove_dir_all(&parts).map_err(|e| CoreError::io(&parts, e))?;
                std::fs::create_dir_all(&parts).map_err(|e| CoreError::io(&parts, e))?;
                super::atomic_write(&fp_path, fingerprint.as_bytes())?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                super::atomic_write(&fp_path, fingerprint.as_bytes())?;
            }
            Err(e) => return Err(CoreError::io(&fp_path, e)),
        }
        let mut done = HashSet::new();
        let mut next_part = 0;
        let mut resumed = 0;
        while part_path(&parts, next_part).exists() {
            for r in read_shard::<T>(part_path(&parts, next_part))? {
                done.insert(id_of(&r));
                resumed += 1;
            }
            next_part += 1;
        }
        let runs_path = parts.join("runs");
        let mut runs: Vec<usize> = match std::fs::read_to_string(&runs_path) {
            Ok(t) => t.split_whitespace().filter_map(|w| w.parse().ok()).filter(|&r| r < next_part).collect(),
            Err(_) => Vec::new(),
        };
        if runs.first() != Some(&0) {
            runs.insert(0, 0);
        }
        if runs.last() != Some(&next_part) {
            runs.push(next_part);
        }
        let text: Vec<String> = runs.iter().map(|r| r.to_string()).collect();
        super::atomic_write(&runs_path, text.join("\n").as_bytes())?;
        Ok(ResumableWriter {
            out,
            parts,
            chunk: chunk.max(1),
            pending: Vec::new(),
            next_part,
            done,
            resumed,
            written: 0,
            finished: false,
            metadata: Vec::new(),
            runs,
        })
    }

    /// Key-value metadata of the finished `<out>` (not of the parts).
    pub fn with_metadata(mut self, kv: Vec<(String, String)>) -> Self {
        self.metadata = kv;
        self
    }

    /// Whether a committed part already holds the record named `id`.
    pub fn is_done(&self, id: &str) -> bool {
        self.done.contains(id)
    }

    /// Ids of the records in committed parts.
    pub fn done_ids(&self) -> &HashSet<String> {
        &self.done
    }

    /// Records found in parts when opening (work a killed run had finished).
    pub fn resumed(&self) -> usize {
        self.resumed
    }

    /// Queues a record; commits a part once `chunk` are queued.
    pub fn write(&mut self, r: T) -> Result<()> {
        self.pending.push(r);
        self.written += 1;
        if self.pending.len() >= self.chunk {
            self.commit()?;
        }
        Ok(())
    }

    /// Commits the queued records as a part now (a stage that stops with an error keeps
    /// its good records for the rerun to resume).
    pub fn commit(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut w = ShardWriter::<T>::create(part_path(&self.parts, self.next_part))?;
        for r in self.pending.drain(..) {
            w.write(r)?;
        }
        w.finish()?;
        self.next_part += 1;
        Ok(())
    }

    /// Commits the rest, writes `<out>` from all parts in order, removes the parts; returns
    /// the row count of `<out>`.
    pub fn finish(self) -> Result<usize> {
        self.finish_visit(|_| {})
    }

    /// [`finish`](Self::finish), showing `visit` every record of `<out>` (this run's and the
    /// resumed ones), e.g. to count them for the manifest.
    pub fn finish_visit(mut self, mut visit: impl FnMut(&T)) -> Result<usize> {
        self.commit()?;
        let mut w = ShardWriter::<T>::create_with_metadata(&self.out, &self.metadata)?;
        for i in 0..self.next_part {
            for r in read_shard::<T>(part_path(&self.parts, i))? {
                visit(&r);
                w.write(r)?;
            }
        }
        let rows = w.finish()?;
        self.finished = true;
        std::fs::remove_dir_all(&self.parts).map_err(|e| CoreError::io(&self.parts, e))?;
        Ok(rows)
    }

    /// [`finish`](Self::finish) with the records in the order of `key` (a record's input
    /// position; None is an error naming the file): the runs are merged, each already in
    /// input order. Same file as `finish` when one run wrote every part.
    pub fn finish_ordered(self, key: impl Fn(&T) -> Option<usize>) -> Result<usize> {
        self.finish_ordered_visit(key, |_| {})
    }

    /// [`finish_ordered`](Self::finish_ordered), showing `visit` every record of `<out>`.
    pub fn finish_ordered_visit(
        mut self,
        key: impl Fn(&T) -> Option<usize>,
        mut visit: impl FnMut(&T),
    ) -> Result<usize> {
        self.commit()?;
        let mut bounds: Vec<usize> = self.runs.iter().copied().filter(|&r| r < self.next_part).collect();
        bounds.dedup();
        if bounds.len() <= 1 {
            return self.finish_visit(visit);
        }
        bounds.push(self.next_part);
        // Per run: its parts not yet read, and the records of the part being merged.
        type Run = std::ops::Range<usize>;
        let mut runs: Vec<(Run, std::collections::VecDeque<(usize, T)>)> =
            bounds.windows(2).map(|w| (w[0]..w[1], Default::default())).collect();
        // The next record of a run, loading its next part when the buffer is empty.
        let parts_dir = self.parts.clone();
        let fill = |run: &mut Run, q: &mut std::collections::VecDeque<(usize, T)>| -> Result<()> {
            while q.is_empty() {
                let Some(i) = run.next() else { return Ok(()) };
                let path = part_path(&parts_dir, i);
                for (row, r) in read_shard::<T>(&path)?.into_iter().enumerate() {
                    let k = key(&r).ok_or_else(|| {
                        CoreError::shard(
                            &path,
                            format!("row {row} is not a record of this input (resumed from another run?)"),
                        )
                    })?;
                    q.push_back((k, r));
                }
            }
            Ok(())
        };
        for (run, q) in runs.iter_mut() {
            fill(run, q)?;
        }
        let mut w = ShardWriter::<T>::create_with_metadata(&self.out, &self.metadata)?;
        loop {
            let best = runs.iter().enumerate().filter_map(|(i, (_, q))| q.front().map(|(k, _)| (*k, i))).min();
            let Some((_, i)) = best else { break };
            let (run, q) = &mut runs[i];
            let (_, r) = q.pop_front().expect("the run has a head");
            visit(&r);
            w.write(r)?;
            fill(run, q)?;
        }
        let rows = w.finish()?;
        self.finished = true;
        std::fs::remove_dir_all(&self.parts).map_err(|e| CoreError::io(&self.parts, e))?;
        Ok(rows)
    }

    /// Records written in this run (not counting resumed ones).
    pub fn written(&self) -> usize {
        self.written
    }
}

impl<T: Record> Drop for ResumableWriter<T> {
    /// A run that ends (error or success) without any committed part leaves no folder behind.
    fn drop(&mut self) {
        if !self.finished && count_parts(&self.parts) == 0 {
            let _ = std::fs::remove_dir_all(&self.parts);
        }
    }
}

fn count_parts(dir: &Path) -> usize {
    (0..).take_while(|&i| part_path(dir, i).exists()).count()
}

fn short(fp: &str) -> String {
    fp.chars().take(16).collect()
}

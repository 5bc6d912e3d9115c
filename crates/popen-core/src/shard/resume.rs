//! Resumable shard output for slow stages (SAM proposals, preference collection): records
//! are committed in small parts beside the output, so a killed job, rerun with the same
//! configuration, skips what it already wrote and finishes with the same file an
//! uninterrupted run writes.
//!
//! Layout: `<out>.parts/` holds `fingerprint` (the configuration the parts belong to) and
//! `part-00000.parquet`, `part-00001.parquet`, ... each written atomically (temp + rename)
//! by [`ShardWriter`]. [`ResumableWriter::finish`] concatenates the parts in order into
//! `<out>` (atomically) and removes the folder.

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
    /// inputs: parts left by a run with a different one are refused (rerun with a fresh
    /// output or remove the folder; `fresh` does that). `id_of` names a record, for
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
            Ok(old) if old.trim() != fingerprint => {
                return Err(CoreError::shard(
                    &parts,
                    format!(
                        "holds parts of a run with another configuration (fingerprint {} != {}); \
                         rerun with --force to start over",
                        old.trim(),
                        fingerprint
                    ),
                ))
            }
            Ok(_) => {}
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
        Ok(ResumableWriter {
            out,
            parts,
            chunk: chunk.max(1),
            pending: Vec::new(),
            next_part,
            done,
            resumed,
            written: 0,
        })
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

    fn commit(&mut self) -> Result<()> {
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
    pub fn finish(mut self) -> Result<usize> {
        self.commit()?;
        let mut w = ShardWriter::<T>::create(&self.out)?;
        for i in 0..self.next_part {
            for r in read_shard::<T>(part_path(&self.parts, i))? {
                w.write(r)?;
            }
        }
        let rows = w.finish()?;
        std::fs::remove_dir_all(&self.parts).map_err(|e| CoreError::io(&self.parts, e))?;
        Ok(rows)
    }

    /// Records written in this run (not counting resumed ones).
    pub fn written(&self) -> usize {
        self.written
    }
}

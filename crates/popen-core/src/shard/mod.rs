//! Parquet shards: every stage reads and writes its records through here.
//!
//! A record kind implements [`Record`] (its Arrow schema and the conversion both ways).
//! Files are plain Parquet (snappy), readable by pyarrow and duckdb without any adapter;
//! the key-value metadata `popen.kind` names the record kind. Writes go to a temporary
//! file beside the target and are renamed into place only when complete, so a killed job
//! leaves either the old file or none. Every read error names the file, and where it
//! can the row and column.

pub mod merge;
mod prediction;
mod proposal;
mod resume;
mod sample;
mod segpref;
mod textpref;

pub use prediction::Prediction;
pub use proposal::{read_proposals, ProposalSet};
pub use resume::{parts_dir, ResumableWriter};
pub use sample::{Sample, SEG_TOKEN};
pub use segpref::{SegPref, SEG_PREF_KEPT};
pub use textpref::{TextPref, TEXT_PREF_BRANCHES};

use crate::error::{CoreError, Result};
use crate::mask::Rle;
use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Int32Array, ListArray, RecordBatch, StringArray, StructArray, UInt32Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Fields, Float32Type, Int32Type, SchemaRef, UInt32Type, UInt64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Metadata key naming the record kind of a shard.
pub const KIND_KEY: &str = "popen.kind";
/// Rows per Parquet row group: small enough to stream, large enough to compress.
pub const ROW_GROUP_ROWS: usize = 256;
/// A row group is also closed once its records hold this many bytes: Arrow's binary and
/// string columns use 32-bit offsets (2 GiB per batch), and memory stays bounded.
pub const ROW_GROUP_BYTES: usize = 256 << 20;

/// A record kind stored in shards.
pub trait Record: Sized {
    /// Kind and schema version, e.g. `sample/1`; stored in the file metadata.
    const KIND: &'static str;
    fn schema() -> SchemaRef;
    fn to_batch(rows: &[Self]) -> Result<RecordBatch>;
    /// `first_row` is the file-level index of the batch's first row, for error messages.
    fn from_batch(batch: &RecordBatch, path: &Path, first_row: usize) -> Result<Vec<Self>>;
    /// Consistency check run before a record is written: `Err((field, message))`.
    fn check(&self) -> std::result::Result<(), (String, String)> {
        Ok(())
    }
    /// Rough in-memory size of the record's variable-length data, for row-group sizing.
    fn approx_bytes(&self) -> usize {
        0
    }
}

/// Streams records into a shard; the file appears at `path` only after [`finish`].
///
/// [`finish`]: ShardWriter::finish
pub struct ShardWriter<T: Record> {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<ArrowWriter<File>>,
    pending: Vec<T>,
    pending_bytes: usize,
    rows: usize,
    /// Set once the file is renamed into place; until then Drop removes the temp file.
    done: bool,
}

impl<T: Record> ShardWriter<T> {
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        Self::create_with_metadata(path, &[])
    }

    /// [`create`](Self::create) with more key-value pairs in the file's metadata (after
    /// `popen.kind`), e.g. [`REFERENCE_MODEL_KEY`].
    pub fn create_with_metadata(path: impl AsRef<Path>, extra: &[(String, String)]) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
        }
        let (tmp, file) = create_tmp(&path)?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_key_value_metadata(Some(
                std::iter::once(KeyValue::new(KIND_KEY.to_string(), T::KIND.to_string()))
                    .chain(extra.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())))
                    .collect(),
            ))
            .build();
        let writer = ArrowWriter::try_new(file, T::schema(), Some(props))
            .map_err(|e| CoreError::shard(&tmp, format!("cannot start Parquet writer: {e}")))?;
        Ok(ShardWriter { path, tmp, writer: Some(writer), pending: Vec::new(), pending_bytes: 0, rows: 0, done: false })
    }

    /// Queues a record; an inconsistent record is refused (nothing invalid reaches disk).
    pub fn write(&mut self, record: T) -> Result<()> {
        if let Err((field, msg)) = record.check() {
            let row = self.rows + self.pending.len();
            return Err(CoreError::field(&self.path, row, field, format!("refusing to write: {msg}")));
        }
        self.pending_bytes += record.approx_bytes();
        self.pending.push(record);
        if self.pending.len() >= ROW_GROUP_ROWS || self.pending_bytes >= ROW_GROUP_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = T::to_batch(&self.pending)?;
        let w = self.writer.as_mut().expect("writer open until finish");
        w.write(&batch).map_err(|e| CoreError::shard(&self.tmp, format!("write failed: {e}")))?;
        // One batch, one row group: readers stream the file group by group.
        w.flush().map_err(|e| CoreError::shard(&self.tmp, format!("write failed: {e}")))?;
        self.rows += self.pending.len();
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(())
    }

    /// Completes the file and renames it into place; returns the row count.
    pub fn finish(mut self) -> Result<usize> {
        self.flush()?;
        let w = self.writer.take().expect("writer open until finish");
        let file =
            w.into_inner().map_err(|e| CoreError::shard(&self.tmp, format!("cannot finish Parquet file: {e}")))?;
        file.sync_all().map_err(|e| CoreError::io(&self.tmp, e))?;
        drop(file);
        rename_into_place(&self.tmp, &self.path)?;
        self.done = true;
        Ok(self.rows)
    }
}

impl<T: Record> Drop for ShardWriter<T> {
    fn drop(&mut self) {
        // An unfinished or failed writer leaves no partial file behind.
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes all records to `path` atomically; returns the row count.
pub fn write_shard<T: Record>(path: impl AsRef<Path>, records: impl IntoIterator<Item = T>) -> Result<usize> {
    let mut w = ShardWriter::<T>::create(path)?;
    for r in records {
        w.write(r)?;
    }
    w.finish()
}

/// Reads every record of a shard, checking the kind and validating each row.
pub fn read_shard<T: Record>(path: impl AsRef<Path>) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for batch in ShardReader::<T>::open(path)? {
        out.extend(batch?);
    }
    Ok(out)
}

/// Reads a shard batch by batch (one row group at a time).
pub struct ShardReader<T: Record> {
    path: PathBuf,
    inner: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    next_row: usize,
    rows: usize,
    _kind: std::marker::PhantomData<T>,
}

impl<T: Record> ShardReader<T> {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| CoreError::io(&path, e))?;
        let builder = guard(&path, None, || ParquetRecordBatchReaderBuilder::try_new(file))?.map_err(|e| {
            CoreError::shard(&path, format!("not a readable Parquet file (truncated or foreign?): {e}"))
        })?;
        let meta = builder.metadata().file_metadata();
        let rows = meta.num_rows().max(0) as usize;
        let kind = meta
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|k| k.key == KIND_KEY).and_then(|k| k.value.clone()));
        match kind.as_deref() {
            Some(k) if k == T::KIND => {}
            Some(k) => return Err(CoreError::shard(&path, format!("holds '{k}' records, expected '{}'", T::KIND))),
            // Files written by other tools (pyarrow, duckdb) are accepted if the columns fit.
            None => {}
        }
        check_schema(&path, builder.schema(), &T::schema())?;
        let inner = builder
            .with_batch_size(ROW_GROUP_ROWS)
            .build()
            .map_err(|e| CoreError::shard(&path, format!("cannot read: {e}")))?;
        Ok(ShardReader { path, inner, next_row: 0, rows, _kind: std::marker::PhantomData })
    }

    /// Row count from the file footer.
    pub fn num_rows(&self) -> usize {
        self.rows
    }
}

impl<T: Record> Iterator for ShardReader<T> {
    type Item = Result<Vec<T>>;
    fn next(&mut self) -> Option<Self::Item> {
        let next_row = self.next_row;
        let inner = &mut self.inner;
        let batch = match guard(&self.path, Some(next_row), || inner.next()) {
            Err(e) => return Some(Err(e)),
            Ok(None) => return None,
            Ok(Some(Ok(b))) => b,
            Ok(Some(Err(e))) => {
                return Some(Err(CoreError::Shard {
                    path: self.path.clone(),
                    row: Some(self.next_row),
                    column: None,
                    message: format!("corrupt data in the row group starting here: {e}"),
                }))
            }
        };
        let first = self.next_row;
        self.next_row += batch.num_rows();
        Some(T::from_batch(&batch, &self.path, first))
    }
}

/// The record kind (`popen.kind` metadata) of a shard; `None` for files without it.
pub fn read_kind(path: impl AsRef<Path>) -> Result<Option<String>> {
    Ok(read_metadata(path)?.remove(KIND_KEY))
}

/// Key of a preference shard's metadata naming the model whose log-probs / embeddings it
/// stores (`popen_model::bundle::fingerprint` of the collect stage's `--model`).
pub const REFERENCE_MODEL_KEY: &str = "popen.reference_model";

/// The key-value metadata of a shard's footer (`popen.kind`, [`REFERENCE_MODEL_KEY`], ...).
pub fn read_metadata(path: impl AsRef<Path>) -> Result<std::collections::BTreeMap<String, String>> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| CoreError::io(path, e))?;
    let builder = guard(path, None, || ParquetRecordBatchReaderBuilder::try_new(file))?
        .map_err(|e| CoreError::shard(path, format!("not a readable Parquet file: {e}")))?;
    let meta = builder.metadata().file_metadata();
    Ok(meta
        .key_value_metadata()
        .map(|kv| kv.iter().filter_map(|k| k.value.clone().map(|v| (k.key.clone(), v))).collect())
        .unwrap_or_default())
}

/// Counts the rows of a shard from its footer without reading the data.
pub fn count_rows(path: impl AsRef<Path>) -> Result<usize> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| CoreError::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| CoreError::shard(path, format!("not a readable Parquet file: {e}")))?;
    Ok(builder.metadata().file_metadata().num_rows().max(0) as usize)
}

fn check_schema(path: &Path, got: &SchemaRef, want: &SchemaRef) -> Result<()> {
    for f in want.fields() {
        match got.field_with_name(f.name()) {
            Err(_) => {
                return Err(CoreError::Shard {
                    path: path.to_path_buf(),
                    row: None,
                    column: Some(f.name().clone()),
                    message: "column is missing (not a popen shard of this kind?)".into(),
                })
            }
            Ok(g) if !types_compatible(g.data_type(), f.data_type()) => {
                return Err(CoreError::Shard {
                    path: path.to_path_buf(),
                    row: None,
                    column: Some(f.name().clone()),
                    message: format!("has type {} but {} is expected", g.data_type(), f.data_type()),
                })
            }
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Same shape, ignoring nullability and the names of list items (pyarrow calls them
/// `element` or `item`).
fn types_compatible(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::List(x), DataType::List(y)) => types_compatible(x.data_type(), y.data_type()),
        (DataType::Struct(x), DataType::Struct(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|(p, q)| p.name() == q.name() && types_compatible(p.data_type(), q.data_type()))
        }
        _ => a == b,
    }
}

/// arrow-rs still has decoder panics on some malformed files (e.g. apache/arrow-rs#11121):
/// a corrupt shard must be an error naming the file, not a crash.
fn guard<R>(path: &Path, row: Option<usize>, f: impl FnOnce() -> R) -> Result<R> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        CoreError::Shard {
            path: path.to_path_buf(),
            row,
            column: None,
            message: format!("corrupt Parquet data (the decoder failed: {why})"),
        }
    })
}

/// A new temp file beside `path`, unique across processes, hosts sharing the folder and
/// writers in one process (pid + time + counter, opened with create_new).
fn create_tmp(path: &Path) -> Result<(PathBuf, File)> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    loop {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_file_name(format!(".{name}.tmp-{}-{nanos:x}-{n}", std::process::id()));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(CoreError::io(&tmp, e)),
        }
    }
}

/// Renames a finished temp file into place and syncs the folder, so the new name survives
/// a power loss.
fn rename_into_place(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).map_err(|e| CoreError::io(path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Writes bytes to `path` atomically (temp file, fsync, rename).
pub fn atomic_write(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |w| w.write_all(bytes))
}

/// Streams a file to `path` atomically: `fill` writes into a buffered temp file beside it,
/// which is fsynced and renamed into place only if `fill` succeeds (a killed job leaves the
/// old file, never a half-written one).
pub fn atomic_write_with(
    path: impl AsRef<Path>,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let path = path.as_ref();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    }
    let (tmp, f) = create_tmp(path)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let res = fill(&mut w).and_then(|_| w.into_inner().map_err(|e| e.into_error())).and_then(|f| f.sync_all());
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(CoreError::io(&tmp, e));
    }
    rename_into_place(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

// ---- checks and column helpers shared by the record kinds ----

/// Every mask of `field` has the image's size and valid RLE runs; the error names the field
/// and the mask's index.
pub(crate) fn check_masks(
    field: &str,
    masks: &[Rle],
    height: u32,
    width: u32,
) -> std::result::Result<(), (String, String)> {
    for (i, m) in masks.iter().enumerate() {
        if m.height != height || m.width != width {
            return Err((
                field.to_string(),
                format!("mask {i} is {}x{} (h x w) but the image is {height}x{width}", m.height, m.width),
            ));
        }
        if let Err(e) = m.validate() {
            return Err((field.to_string(), format!("mask {i}: {e}")));
        }
    }
    Ok(())
}

pub(crate) fn rle_struct_field() -> DataType {
    DataType::Struct(rle_fields())
}

fn rle_fields() -> Fields {
    Fields::from(vec![
        Field::new("height", DataType::UInt32, false),
        Field::new("width", DataType::UInt32, false),
        Field::new("counts", DataType::Utf8, false),
    ])
}

pub(crate) fn list_field(name: &str, item: DataType) -> Field {
    Field::new(name, DataType::List(Arc::new(Field::new("item", item, false))), false)
}

/// Builds a `list<struct<height, width, counts>>` column of COCO RLEs (compressed strings).
pub(crate) struct RleListBuilder {
    offsets: Vec<i32>,
    heights: Vec<u32>,
    widths: Vec<u32>,
    counts: Vec<String>,
}

impl RleListBuilder {
    pub(crate) fn new() -> Self {
        RleListBuilder { offsets: vec![0], heights: Vec::new(), widths: Vec::new(), counts: Vec::new() }
    }
    pub(crate) fn append(&mut self, masks: &[Rle]) {
        for m in masks {
            self.heights.push(m.height);
            self.widths.push(m.width);
            self.counts.push(m.to_coco_string());
        }
        // More than 2^31 masks in one batch cannot happen: the writer flushes by bytes.
        self.offsets.push(i32::try_from(self.heights.len()).expect("fewer than 2^31 masks per batch"));
    }
    pub(crate) fn finish(self) -> ArrayRef {
        let values = StructArray::new(
            rle_fields(),
            vec![
                Arc::new(UInt32Array::from(self.heights)) as ArrayRef,
                Arc::new(UInt32Array::from(self.widths)),
                Arc::new(StringArray::from(self.counts)),
            ],
            None,
        );
        Arc::new(ListArray::new(
            Arc::new(Field::new("item", rle_struct_field(), false)),
            OffsetBuffer::new(self.offsets.into()),
            Arc::new(values),
            None,
        ))
    }
}

/// Visits the records of a shard that `shard` takes (task I of N: positions with
/// `pos % N == I`), in file order, with a progress bar over the whole file when `progress`
/// names one. Returns the number of records visited.
pub fn for_each_taken<T: Record, E: From<CoreError>>(
    path: impl AsRef<Path>,
    shard: &crate::shardspec::ShardSpec,
    progress: Option<&str>,
    f: impl FnMut(T) -> std::result::Result<(), E>,
) -> std::result::Result<usize, E> {
    for_each_taken_of(path, shard, 0, progress, f)
}

/// The positions of a `rows`-record file that a `max_samples` limit keeps: all of them for 0
/// (or `max_samples >= rows`), else `max_samples` positions spread evenly over the file
/// (`floor(k * rows / max_samples)`, k = 0..max_samples), so a limited run still sees the
/// whole file's mix (several questions per image sit next to each other in a benchmark).
pub fn limited_positions(rows: usize, max_samples: usize) -> Option<std::collections::BTreeSet<usize>> {
    (max_samples > 0 && max_samples < rows).then(|| (0..max_samples).map(|k| k * rows / max_samples).collect())
}

/// [`for_each_taken`] over the `max_samples` records [`limited_positions`] keeps (0 = all);
/// `--shard I/N` then splits those, so the tasks of a job array together visit exactly the
/// records one limited run visits.
pub fn for_each_taken_of<T: Record, E: From<CoreError>>(
    path: impl AsRef<Path>,
    shard: &crate::shardspec::ShardSpec,
    max_samples: usize,
    progress: Option<&str>,
    mut f: impl FnMut(T) -> std::result::Result<(), E>,
) -> std::result::Result<usize, E> {
    let reader = ShardReader::<T>::open(path)?;
    let keep = limited_positions(reader.num_rows(), max_samples);
    let total = keep.as_ref().map_or(reader.num_rows(), |k| k.len());
    let bar = progress.map(|label| crate::progress::bar(total as u64, label));
    let (mut pos, mut ordinal, mut taken) = (0usize, 0usize, 0usize);
    for group in reader {
        for r in group? {
            let kept = keep.as_ref().is_none_or(|k| k.contains(&pos));
            pos += 1;
            if !kept {
                continue;
            }
            if let Some(b) = &bar {
                b.inc(1);
            }
            let take = shard.takes(ordinal);
            ordinal += 1;
            if take {
                taken += 1;
                f(r)?;
            }
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    Ok(taken)
}

/// Typed access to the columns of one batch, with errors that name the file, the file-level
/// row and the column.
pub(crate) struct Columns<'a> {
    batch: &'a RecordBatch,
    path: &'a Path,
    first_row: usize,
}

impl<'a> Columns<'a> {
    pub(crate) fn new(batch: &'a RecordBatch, path: &'a Path, first_row: usize) -> Self {
        Columns { batch, path, first_row }
    }

    fn err(&self, row: Option<usize>, name: &str, message: impl Into<String>) -> CoreError {
        CoreError::Shard {
            path: self.path.to_path_buf(),
            row: row.map(|r| self.first_row + r),
            column: Some(name.into()),
            message: message.into(),
        }
    }

    fn wrong_type(&self, name: &str, col: &dyn Array) -> CoreError {
        self.err(None, name, format!("unexpected type {}", col.data_type()))
    }

    /// The column, refusing nulls (reported at the first null's row).
    fn column(&self, name: &str) -> Result<&'a ArrayRef> {
        let col = self.batch.column_by_name(name).ok_or_else(|| self.err(None, name, "column is missing"))?;
        if let Some(row) = first_null(col.as_ref()) {
            return Err(self.err(Some(row), name, "value is null"));
        }
        Ok(col)
    }

    pub(crate) fn str(&self, name: &str) -> Result<&'a StringArray> {
        let c = self.column(name)?;
        c.as_any().downcast_ref::<StringArray>().ok_or_else(|| self.wrong_type(name, c.as_ref()))
    }

    pub(crate) fn binary(&self, name: &str) -> Result<&'a BinaryArray> {
        let c = self.column(name)?;
        c.as_any().downcast_ref::<BinaryArray>().ok_or_else(|| self.wrong_type(name, c.as_ref()))
    }

    pub(crate) fn u32(&self, name: &str) -> Result<&'a UInt32Array> {
        let c = self.column(name)?;
        c.as_primitive_opt::<UInt32Type>().ok_or_else(|| self.wrong_type(name, c.as_ref()))
    }

    /// A list column and its items, refusing null items (reported at the row holding one).
    fn list(&self, name: &str) -> Result<(&'a ListArray, &'a ArrayRef)> {
        let c = self.column(name)?;
        let l = c.as_any().downcast_ref::<ListArray>().ok_or_else(|| self.wrong_type(name, c.as_ref()))?;
        if let Some(item) = first_null(l.values().as_ref()) {
            return Err(self.err(Some(row_of_item(l, item)), name, "list holds a null item"));
        }
        Ok((l, l.values()))
    }

    pub(crate) fn list_str(&self, name: &str) -> Result<Vec<Vec<String>>> {
        let (l, v) = self.list(name)?;
        let s = v.as_any().downcast_ref::<StringArray>().ok_or_else(|| self.wrong_type(name, v.as_ref()))?;
        let all: Vec<String> = s.iter().map(|x| x.unwrap_or_default().to_string()).collect();
        Ok(split_list(l, &all))
    }

    pub(crate) fn list_i32(&self, name: &str) -> Result<Vec<Vec<i32>>> {
        let (l, v) = self.list(name)?;
        let s: &Int32Array = v.as_primitive_opt::<Int32Type>().ok_or_else(|| self.wrong_type(name, v.as_ref()))?;
        Ok(split_list(l, s.values()))
    }

    pub(crate) fn list_u32(&self, name: &str) -> Result<Vec<Vec<u32>>> {
        let (l, v) = self.list(name)?;
        let s = v.as_primitive_opt::<UInt32Type>().ok_or_else(|| self.wrong_type(name, v.as_ref()))?;
        Ok(split_list(l, s.values()))
    }

    pub(crate) fn list_u64(&self, name: &str) -> Result<Vec<Vec<u64>>> {
        let (l, v) = self.list(name)?;
        let s = v.as_primitive_opt::<UInt64Type>().ok_or_else(|| self.wrong_type(name, v.as_ref()))?;
        Ok(split_list(l, s.values()))
    }

    pub(crate) fn list_f32(&self, name: &str) -> Result<Vec<Vec<f32>>> {
        let (l, v) = self.list(name)?;
        let s = v.as_primitive_opt::<Float32Type>().ok_or_else(|| self.wrong_type(name, v.as_ref()))?;
        Ok(split_list(l, s.values()))
    }

    /// A `list<struct<height, width, counts>>` column, each compressed RLE string decoded;
    /// a malformed or null mask is reported with its row, column and index in the list.
    pub(crate) fn list_rle(&self, name: &str) -> Result<Vec<Vec<Rle>>> {
        let (l, v) = self.list(name)?;
        let st = v.as_any().downcast_ref::<StructArray>().ok_or_else(|| self.wrong_type(name, v.as_ref()))?;
        let h = st.column_by_name("height").and_then(|c| c.as_primitive_opt::<UInt32Type>());
        let w = st.column_by_name("width").and_then(|c| c.as_primitive_opt::<UInt32Type>());
        let c = st.column_by_name("counts").and_then(|c| c.as_any().downcast_ref::<StringArray>());
        let (Some(h), Some(w), Some(c)) = (h, w, c) else {
            return Err(self.wrong_type(name, v.as_ref()));
        };
        for (field, arr) in [("height", h as &dyn Array), ("width", w), ("counts", c)] {
            if let Some(item) = first_null(arr) {
                return Err(self.err(Some(row_of_item(l, item)), name, format!("a mask's '{field}' is null")));
            }
        }
        let off = l.value_offsets();
        let mut out = Vec::with_capacity(l.len());
        for row in 0..l.len() {
            let mut masks = Vec::with_capacity((off[row + 1] - off[row]) as usize);
            for (k, j) in (off[row] as usize..off[row + 1] as usize).enumerate() {
                let rle = Rle::from_coco_string(h.value(j), w.value(j), c.value(j))
                    .map_err(|e| self.err(Some(row), name, format!("mask {k}: {e}")))?;
                masks.push(rle);
            }
            out.push(masks);
        }
        Ok(out)
    }
}

fn first_null(a: &dyn Array) -> Option<usize> {
    (a.null_count() > 0).then(|| (0..a.len()).find(|&i| a.is_null(i))).flatten()
}

/// The row of a list column whose items include item index `item`.
fn row_of_item(l: &ListArray, item: usize) -> usize {
    let off = l.value_offsets();
    (0..l.len()).find(|&r| (off[r] as usize..off[r + 1] as usize).contains(&item)).unwrap_or(0)
}

fn split_list<T: Clone>(l: &ListArray, values: &[T]) -> Vec<Vec<T>> {
    let off = l.value_offsets();
    (0..l.len()).map(|i| values[off[i] as usize..off[i + 1] as usize].to_vec()).collect()
}

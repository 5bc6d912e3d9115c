//! Named tensors in and out of burn modules: the one loading path of the model crate.
//! Reads safetensors (single or sharded) and PyTorch pickles (`.bin`/`.pt`, single or sharded
//! with `pytorch_model.bin.index.json`, through burn-store's lazy reader).
//!
//! Our module trees are named like the Hugging Face / PyTorch checkpoints they load
//! (candle's and llama-burn's convention), so loading is: list the checkpoint's tensors
//! (`safetensors` file or sharded folder with `model.safetensors.index.json`), rename them
//! with a few prefix rules when a checkpoint's layout nests our tree differently (LLaVA,
//! PixelLM), and apply them with burn-store's [`ModuleSnapshot::apply`] through
//! [`PyTorchToBurnAdapter`] (Linear weights transposed, norm `weight`/`bias` ->
//! `gamma`/`beta`). Every missing, unexpected or mis-shaped tensor is collected and reported
//! together by name: a checkpoint never half-loads into a randomly initialised model.
//!
//! Our own checkpoints are safetensors in the same PyTorch layout (so Python reads them with
//! `safetensors.torch.load_file`), written atomically.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use burn::module::ParamId;
use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, TensorSnapshot, TensorSnapshotError};

/// Errors of reading, applying or writing named tensors. Paths and tensor names are always
/// part of the message.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Index { path: PathBuf, msg: String },
    #[error(
        "{source_desc}: checkpoint does not match the model ({} problem(s)):\n  {}",
        problems.len(),
        problems.join("\n  ")
    )]
    Mismatch { source_desc: String, problems: Vec<String> },
}

type Result<T> = std::result::Result<T, WeightsError>;

/// Element types of safetensors that we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StDtype {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
}

impl StDtype {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "F64" => Self::F64,
            "I64" => Self::I64,
            "I32" => Self::I32,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            Self::F16 | Self::BF16 => 2,
            Self::F32 | Self::I32 => 4,
            Self::F64 | Self::I64 => 8,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::F64 => "F64",
            Self::I64 => "I64",
            Self::I32 => "I32",
        }
    }
}

/// One tensor of a checkpoint: where its bytes are, read only when applied.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: StDtype,
    pub file: PathBuf,
    /// Absolute byte offset of the data in `file`.
    pub offset: u64,
    pub len: u64,
    /// Set for tensors of PyTorch pickles (`.bin`, `.pt`): burn-store's lazy reader;
    /// `dtype`/`offset`/`len` are then not meaningful.
    pub torch: Option<TorchTensor>,
}

/// A tensor inside a PyTorch pickle, read lazily by burn-store's reader.
#[derive(Clone)]
pub struct TorchTensor(pub Rc<TensorSnapshot>);

impl std::fmt::Debug for TorchTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TorchTensor({:?} {:?})", self.0.dtype, self.0.shape)
    }
}

impl TensorEntry {
    /// Read the tensor and convert it to f32 (every float dtype) or f32-valued ints.
    pub fn read_f32(&self) -> Result<Vec<f32>> {
        if let Some(t) = &self.torch {
            let bad = |msg: String| WeightsError::Format {
                path: self.file.clone(),
                msg: format!("tensor {}: {msg}", self.name),
            };
            let data = t.0.to_data().map_err(|e| bad(format!("{e:?}")))?;
            return data.convert::<f32>().into_vec::<f32>().map_err(|e| bad(format!("{e:?}")));
        }
        let io = |source| WeightsError::Io { path: self.file.clone(), source };
        let mut f = File::open(&self.file).map_err(io)?;
        f.seek(SeekFrom::Start(self.offset)).map_err(io)?;
        let mut buf = vec![0u8; self.len as usize];
        f.read_exact(&mut buf).map_err(io)?;
        Ok(match self.dtype {
            StDtype::F32 => buf.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            StDtype::F16 => buf.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            StDtype::BF16 => buf.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            StDtype::F64 => {
                buf.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect()
            }
            StDtype::I64 => {
                buf.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect()
            }
            StDtype::I32 => {
                buf.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as f32).collect()
            }
        })
    }
}

/// The tensors of a checkpoint: one safetensors file, or a folder with a sharded
/// `model.safetensors.index.json` (or a single `model.safetensors`).
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    /// What was opened, for messages.
    pub source: String,
    pub tensors: BTreeMap<String, TensorEntry>,
    /// `__metadata__` of the (first) file.
    pub metadata: BTreeMap<String, String>,
}

const MAX_HEADER: u64 = 100 * 1024 * 1024;

/// Parse one safetensors file's header (the data stays on disk).
pub fn read_safetensors_header(path: &Path) -> Result<(BTreeMap<String, TensorEntry>, BTreeMap<String, String>)> {
    let io = |source| WeightsError::Io { path: path.to_path_buf(), source };
    let bad = |msg: String| WeightsError::Format { path: path.to_path_buf(), msg };
    let mut f = File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| bad(format!("file of {file_len} bytes is too short for a header")))?;
    let hlen = u64::from_le_bytes(n);
    if hlen > MAX_HEADER || 8 + hlen > file_len {
        return Err(bad(format!(
            "header length {hlen} does not fit the file ({file_len} bytes); truncated or not safetensors"
        )));
    }
    let mut h = vec![0u8; hlen as usize];
    f.read_exact(&mut h).map_err(io)?;
    let json: serde_json::Value = serde_json::from_slice(&h).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let obj = json.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_start = 8 + hlen;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (k, v) in m {
                    metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                }
            }
            continue;
        }
        let dtype_s = v["dtype"].as_str().unwrap_or("?");
        let dtype =
            StDtype::parse(dtype_s).ok_or_else(|| bad(format!("tensor {name}: unsupported dtype {dtype_s}")))?;
        let shape: Vec<usize> = v["shape"]
            .as_array()
            .ok_or_else(|| bad(format!("tensor {name}: no shape")))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(format!("tensor {name}: shape is not a list of integers")))?;
        let offs = v["data_offsets"]
            .as_array()
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| bad(format!("tensor {name}: no data_offsets [begin, end]")))?;
        let numel: usize = shape.iter().product();
        let want = (numel * dtype.size()) as u64;
        if offs.1 < offs.0 || offs.1 - offs.0 != want {
            return Err(bad(format!(
                "tensor {name}: data_offsets {offs:?} hold {} bytes, shape {shape:?} of {} needs {want}",
                offs.1.saturating_sub(offs.0),
                dtype.name()
            )));
        }
        if data_start + offs.1 > file_len {
            return Err(bad(format!(
                "tensor {name}: data ends at byte {} but the file has {file_len}; truncated",
                data_start + offs.1
            )));
        }
        tensors.insert(
            name.clone(),
            TensorEntry {
                name: name.clone(),
                shape,
                dtype,
                file: path.to_path_buf(),
                offset: data_start + offs.0,
                len: want,
                torch: None,
            },
        );
    }
    Ok((tensors, metadata))
}

impl Checkpoint {
    /// Open a safetensors file, or a folder holding `model.safetensors.index.json` (sharded;
    /// every shard it names must exist and hold the tensors the index assigns to it) or
    /// `model.safetensors`.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        if path.is_dir() {
            for name in [
                "model.safetensors.index.json",
                "model.safetensors",
                "pytorch_model.bin.index.json",
                "pytorch_model.bin",
            ] {
                if path.join(name).is_file() {
                    return Self::open(path.join(name));
                }
            }
            return Err(WeightsError::Index {
                path: path.to_path_buf(),
                msg: "folder has none of model.safetensors(.index.json), pytorch_model.bin(.index.json)".into(),
            });
        }
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".index.json")) {
            return Self::open_index(path);
        }
        if is_torch_pickle(path) {
            return Ok(Checkpoint {
                source: path.display().to_string(),
                tensors: read_torch(path)?,
                metadata: BTreeMap::new(),
            });
        }
        let (tensors, metadata) = read_safetensors_header(path)?;
        Ok(Checkpoint { source: path.display().to_string(), tensors, metadata })
    }

    fn open_index(index: &Path) -> Result<Checkpoint> {
        let err = |msg: String| WeightsError::Index { path: index.to_path_buf(), msg };
        let text =
            std::fs::read_to_string(index).map_err(|source| WeightsError::Io { path: index.to_path_buf(), source })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(format!("not JSON: {e}")))?;
        let map = json["weight_map"].as_object().ok_or_else(|| err("no \"weight_map\" object".into()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| err(format!("weight_map[{name}] is not a file name")))?;
            by_file.entry(file.to_string()).or_default().push(name.clone());
        }
        let mut ck = Checkpoint { source: index.display().to_string(), ..Default::default() };
        let mut problems = Vec::new();
        for (file, names) in by_file {
            let fpath = dir.join(&file);
            if !fpath.is_file() {
                problems.push(format!("shard {file} (holding {} tensors, e.g. {}) is missing", names.len(), names[0]));
                continue;
            }
            let (tensors, metadata) = if is_torch_pickle(&fpath) {
                (read_torch(&fpath)?, BTreeMap::new())
            } else {
                read_safetensors_header(&fpath)?
            };
            if ck.metadata.is_empty() {
                ck.metadata = metadata;
            }
            for n in &names {
                if !tensors.contains_key(n) {
                    problems.push(format!("{n}: index says {file}, but that shard lacks it"));
                }
            }
            for (n, t) in tensors {
                ck.tensors.insert(n, t);
            }
        }
        if !problems.is_empty() {
            return Err(WeightsError::Mismatch { source_desc: ck.source, problems });
        }
        Ok(ck)
    }

    /// Rename tensors by the first matching rule; drop those matching `drop` patterns.
    pub fn remapped(mut self, remap: &Remap) -> Checkpoint {
        let old = std::mem::take(&mut self.tensors);
        for (name, mut t) in old {
            if remap.drop.iter().any(|p| glob_prefix(p, &name)) {
                continue;
            }
            let new = remap.apply(&name);
            t.name = new.clone();
            self.tensors.insert(new, t);
        }
        self
    }

    /// Keep only tensors under `prefix.` and strip it.
    pub fn sub(&self, prefix: &str) -> Checkpoint {
        let p = format!("{prefix}.");
        Checkpoint {
            source: format!("{} [{prefix}.*]", self.source),
            metadata: self.metadata.clone(),
            tensors: self
                .tensors
                .iter()
                .filter_map(|(n, t)| {
                    n.strip_prefix(&p).map(|s| {
                        let mut t = t.clone();
                        t.name = s.to_string();
                        (s.to_string(), t)
                    })
                })
                .collect(),
        }
    }
}

/// `.bin`, `.pt`, `.pth`: PyTorch's `torch.save` formats (zip or legacy pickle).
fn is_torch_pickle(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("bin" | "pt" | "pth"))
}

/// The tensors of a PyTorch pickle through burn-store's reader (lazy; no code from the
/// pickle is executed). A `state_dict` / `model` top-level key is unwrapped.
fn read_torch(path: &Path) -> Result<BTreeMap<String, TensorEntry>> {
    use burn_store::pytorch::PytorchReader;
    let bad = |msg: String| WeightsError::Format { path: path.to_path_buf(), msg };
    if !path.is_file() {
        return Err(WeightsError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let reader = PytorchReader::new(path)
        .or_else(|first| {
            ["state_dict", "model"].iter().find_map(|k| PytorchReader::with_top_level_key(path, k).ok()).ok_or(first)
        })
        .map_err(|e| bad(format!("not a readable PyTorch checkpoint: {e}")))?;
    Ok(reader
        .into_tensors()
        .into_iter()
        .map(|(name, snap)| {
            let shape = snap.shape.to_vec();
            (
                name.clone(),
                TensorEntry {
                    name,
                    shape,
                    dtype: StDtype::F32,
                    file: path.to_path_buf(),
                    offset: 0,
                    len: 0,
                    torch: Some(TorchTensor(Rc::new(snap))),
                },
            )
        })
        .collect())
}

fn glob_prefix(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(p) => name.starts_with(p),
        None => name == pattern,
    }
}

/// Prefix renaming rules from a checkpoint's layout to our module tree.
#[derive(Debug, Clone, Default)]
pub struct Remap {
    /// `(from_prefix, to_prefix)`, first match wins.
    pub prefixes: Vec<(String, String)>,
    /// Exact names or `prefix*` patterns of checkpoint tensors we deliberately ignore
    /// (e.g. rotary `inv_freq` buffers).
    pub drop: Vec<String>,
}

impl Remap {
    pub fn none() -> Remap {
        Remap::default()
    }
    pub fn prefix(mut self, from: &str, to: &str) -> Remap {
        self.prefixes.push((from.into(), to.into()));
        self
    }
    pub fn drop(mut self, pattern: &str) -> Remap {
        self.drop.push(pattern.into());
        self
    }
    pub fn apply(&self, name: &str) -> String {
        for (from, to) in &self.prefixes {
            if let Some(rest) = name.strip_prefix(from.as_str()) {
                return format!("{to}{rest}");
            }
        }
        name.to_string()
    }
}

/// Apply every tensor of `ck` to `module` (names already in our layout, PyTorch
/// orientation). Fails, listing all names, if any module tensor is missing, any checkpoint
/// tensor is unused (unless `allow_unused`), or any shape differs. Loaded parameters take
/// the float dtype `dtype` (f32 on CPU; bf16/f16 for GPUs).
pub fn apply_checkpoint<B: Backend, M: ModuleSnapshot<B>>(
    module: M,
    ck: &Checkpoint,
    dtype: DType,
    allow_unused: bool,
) -> Result<M> {
    apply_checkpoint_keeping(module, ck, dtype, allow_unused, &|_| false)
}

/// [`apply_checkpoint`], except that module tensors for which `keep_init(name)` holds may
/// be absent from the checkpoint: they keep the module's current values. For parameters a
/// checkpoint layout cannot have (POPEN's additions on a released PixelLM); the caller
/// reports them.
pub fn apply_checkpoint_keeping<B: Backend, M: ModuleSnapshot<B>>(
    mut module: M,
    ck: &Checkpoint,
    dtype: DType,
    allow_unused: bool,
    keep_init: &dyn Fn(&str) -> bool,
) -> Result<M> {
    let snapshots: Vec<TensorSnapshot> = ck
        .tensors
        .values()
        .map(|t| {
            let t2 = t.clone();
            let shape = t.shape.clone();
            let f = Rc::new(move || -> std::result::Result<TensorData, TensorSnapshotError> {
                let v = t2.read_f32().map_err(|e| TensorSnapshotError::IoError(e.to_string()))?;
                Ok(TensorData::new(v, t2.shape.clone()).convert_dtype(dtype))
            });
            TensorSnapshot::from_closure(
                f,
                dtype,
                shape.into(),
                t.name.split('.').map(String::from).collect(),
                vec![],
                ParamId::new(),
            )
        })
        .collect();
    let res = module.apply(snapshots, None, Some(Box::new(PyTorchToBurnAdapter)), true);
    let mut problems = Vec::new();
    for (path, _) in res.missing.iter().filter(|(p, _)| !keep_init(p)) {
        // Name what the checkpoint should hold (PyTorch names), not burn's.
        let torch = path
            .strip_suffix(".gamma")
            .map(|p| format!("{p}.weight"))
            .or_else(|| path.strip_suffix(".beta").map(|p| format!("{p}.bias")))
            .unwrap_or_else(|| path.clone());
        problems.push(format!("missing {torch}"));
    }
    for e in &res.errors {
        problems.push(e.to_string());
    }
    if !allow_unused {
        // burn-store finds a norm's `weight`/`bias` under burn's `gamma`/`beta` but still
        // lists the PyTorch name as unused; those were applied.
        let applied: std::collections::HashSet<&str> = res.applied.iter().map(String::as_str).collect();
        let norm_alias = |u: &str| {
            let alt = if let Some(p) = u.strip_suffix(".weight") {
                format!("{p}.gamma")
            } else if let Some(p) = u.strip_suffix(".bias") {
                format!("{p}.beta")
            } else {
                return false;
            };
            applied.contains(alt.as_str())
        };
        for u in res.unused.iter().filter(|u| !norm_alias(u)) {
            problems.push(format!("unexpected {u} (the model has no such tensor)"));
        }
    }
    if problems.is_empty() {
        Ok(module)
    } else {
        Err(WeightsError::Mismatch { source_desc: ck.source.clone(), problems })
    }
}

/// Open `path` (file or folder), remap, and apply strictly. See [`apply_checkpoint`].
pub fn load<B: Backend, M: ModuleSnapshot<B>>(module: M, path: impl AsRef<Path>, remap: &Remap) -> Result<M> {
    let ck = Checkpoint::open(path)?.remapped(remap);
    apply_checkpoint(module, &ck, DType::F32, false)
}

/// The module's tensors by name in PyTorch layout (Linear weights `[out, in]`, norms
/// `weight`/`bias`), as f32 row-major data.
pub fn named_tensors<B: Backend, M: ModuleSnapshot<B>>(module: &M) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    module
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .filter_map(|s| {
            let name = s.full_path();
            let data = s.to_data().ok()?.convert::<f32>();
            let shape: Vec<usize> = data.shape.to_vec();
            Some((name, shape, data.into_vec::<f32>().ok()?))
        })
        .collect()
}

/// Write named f32 tensors as one safetensors file, atomically (temp file, fsync, rename).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut sorted: Vec<&(String, Vec<usize>, Vec<f32>)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).expect("strings"));
    }
    let mut off = 0usize;
    for (name, shape, data) in &sorted {
        let n = data.len() * 4;
        header
            .insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}));
        off += n;
    }
    let mut h = serde_json::to_vec(&header).expect("json");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    popen_core::shard::atomic_write_with(path, |w| {
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        for (_, _, data) in &sorted {
            for v in data.iter() {
                w.write_all(&v.to_le_bytes())?;
            }
        }
        Ok(())
    })
    .map_err(|e| WeightsError::Io { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) })
}

/// Save a module as a PyTorch-layout safetensors file (atomic).
pub fn save<B: Backend, M: ModuleSnapshot<B>>(
    module: &M,
    path: impl AsRef<Path>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    write_safetensors(path.as_ref(), &named_tensors(module), metadata)
}

/// Count of parameters by top-level name, for `popen inspect`-style summaries.
pub fn param_counts<B: Backend, M: ModuleSnapshot<B>>(module: &M) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for s in module.collect(None, None, true) {
        let top = s.full_path().split('.').next().unwrap_or_default().to_string();
        *out.entry(top).or_insert(0) += s.shape.iter().product::<usize>();
    }
    out
}

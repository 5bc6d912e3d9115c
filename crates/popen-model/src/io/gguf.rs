//! GGUF reader: the llama.cpp checkpoint format, in pure Rust (no burn, no mmap).
//!
//! [`GgufFile::open`] parses the header of a little-endian GGUF v2/v3 file — magic, version,
//! tensor count, metadata key/value pairs of every GGUF value type (including nested arrays)
//! into [`MetaValue`], and the tensor infos — and keeps only the path and the offsets: tensor
//! data is read lazily, with a seek and a read, by [`GgufFile::tensor_bytes`] and
//! [`GgufFile::tensor_f32`] (which dequantizes F32, F16, BF16, Q8_0, Q4_0 and Q4_1).
//!
//! Hostile or truncated files never panic: every length and count read from the file is checked
//! against the bytes that remain before anything is allocated for it, every tensor's extent is
//! checked against the file size at open time, and each failure is a [`GgufError`] that names
//! the file and what is wrong.
//!
//! For LLaMA checkpoints, [`llama_hf_name`] maps llama.cpp tensor names to Hugging Face
//! `LlamaForCausalLM` names, and [`unpermute_qk`] undoes the row permutation that llama.cpp's
//! `convert_hf_to_gguf.py` applies to the Q and K projections; [`GgufFile::llama_tensor_hf`]
//! does both.
//!
//! Checked against llama.cpp's own Python reader (PyPI `gguf`, see
//! `tools/reference/gguf_fixture.py`) on SmolLM2-135M-Instruct Q4_1 in `tests/gguf.rs`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// `GGUF` as the first four bytes.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data-section alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays accepted (guards the recursion on hostile files).
const MAX_ARRAY_DEPTH: usize = 16;
/// Most elements reserved up front for one metadata array; larger arrays grow as they are read.
const MAX_PREALLOC: usize = 1 << 16;

/// Everything that can go wrong reading a GGUF file. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: I/O error: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file: bad magic {found:02x?} (expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3 little-endian{hint})")]
    UnsupportedVersion { path: PathBuf, version: u32, hint: &'static str },
    #[error(
        "{path}: truncated header: reading {what} needs {need} bytes at offset {offset}, \
         but the file is {file_len} bytes"
    )]
    Truncated { path: PathBuf, what: String, offset: u64, need: u64, file_len: u64 },
    #[error(
        "{path}: tensor '{name}' (offset {start}, {size} bytes) extends past end of file \
         ({file_len} bytes)"
    )]
    TensorPastEnd { path: PathBuf, name: String, start: u64, size: u64, file_len: u64 },
    #[error("{path}: tensor '{tensor}' has unknown ggml type id {type_id}")]
    UnknownType { path: PathBuf, tensor: String, type_id: u32 },
    #[error(
        "{path}: tensor '{tensor}' has ggml type {type_name} (id {type_id}), which tensor_f32 \
         does not dequantize (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)"
    )]
    UnsupportedType { path: PathBuf, tensor: String, type_name: &'static str, type_id: u32 },
    #[error("{path}: no tensor named '{name}'")]
    NoSuchTensor { path: PathBuf, name: String },
    #[error("{path}: metadata key '{key}': {msg}")]
    Metadata { path: PathBuf, key: String, msg: String },
    #[error("{path}: invalid GGUF: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("bad shape: {0}")]
    Shape(String),
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// One metadata value. GGUF value type ids: 0 U8, 1 I8, 2 U16, 3 I16, 4 U32, 5 I32, 6 F32,
/// 7 Bool, 8 String, 9 Array, 10 U64, 11 I64, 12 F64.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Elements all have the array's declared element type (which may itself be Array).
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "UINT8",
            MetaValue::I8(_) => "INT8",
            MetaValue::U16(_) => "UINT16",
            MetaValue::I16(_) => "INT16",
            MetaValue::U32(_) => "UINT32",
            MetaValue::I32(_) => "INT32",
            MetaValue::F32(_) => "FLOAT32",
            MetaValue::Bool(_) => "BOOL",
            MetaValue::String(_) => "STRING",
            MetaValue::Array(_) => "ARRAY",
            MetaValue::U64(_) => "UINT64",
            MetaValue::I64(_) => "INT64",
            MetaValue::F64(_) => "FLOAT64",
        }
    }

    /// Any integer type with a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type whose value fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v as i64),
            MetaValue::I16(v) => Some(v as i64),
            MetaValue::I32(v) => Some(v as i64),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// F32 or F64 (narrowed).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

macro_rules! ggml_types {
    ($( $variant:ident = $id:literal, $name:literal, $block:literal, $bytes:literal; )*) => {
        /// ggml tensor types (ids from ggml.h), with their block sizes (elements) and block
        /// byte sizes from gguf-py's `GGML_QUANT_SIZES`.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum GgmlType { $( $variant ),* }

        impl GgmlType {
            pub fn from_id(id: u32) -> Option<Self> {
                match id { $( $id => Some(GgmlType::$variant), )* _ => None }
            }
            pub fn id(self) -> u32 {
                match self { $( GgmlType::$variant => $id ),* }
            }
            /// ggml's name, e.g. "Q4_1".
            pub fn name(self) -> &'static str {
                match self { $( GgmlType::$variant => $name ),* }
            }
            /// Elements per block.
            pub fn block_size(self) -> u64 {
                match self { $( GgmlType::$variant => $block ),* }
            }
            /// Bytes per block.
            pub fn type_size(self) -> u64 {
                match self { $( GgmlType::$variant => $bytes ),* }
            }
        }
    };
}

ggml_types! {
    F32 = 0, "F32", 1, 4;
    F16 = 1, "F16", 1, 2;
    Q4_0 = 2, "Q4_0", 32, 18;
    Q4_1 = 3, "Q4_1", 32, 20;
    Q5_0 = 6, "Q5_0", 32, 22;
    Q5_1 = 7, "Q5_1", 32, 24;
    Q8_0 = 8, "Q8_0", 32, 34;
    Q8_1 = 9, "Q8_1", 32, 40;
    Q2_K = 10, "Q2_K", 256, 84;
    Q3_K = 11, "Q3_K", 256, 110;
    Q4_K = 12, "Q4_K", 256, 144;
    Q5_K = 13, "Q5_K", 256, 176;
    Q6_K = 14, "Q6_K", 256, 210;
    Q8_K = 15, "Q8_K", 256, 292;
    IQ2_XXS = 16, "IQ2_XXS", 256, 66;
    IQ2_XS = 17, "IQ2_XS", 256, 74;
    IQ3_XXS = 18, "IQ3_XXS", 256, 98;
    IQ1_S = 19, "IQ1_S", 256, 50;
    IQ4_NL = 20, "IQ4_NL", 32, 18;
    IQ3_S = 21, "IQ3_S", 256, 110;
    IQ2_S = 22, "IQ2_S", 256, 82;
    IQ4_XS = 23, "IQ4_XS", 256, 136;
    I8 = 24, "I8", 1, 1;
    I16 = 25, "I16", 1, 2;
    I32 = 26, "I32", 1, 4;
    I64 = 27, "I64", 1, 8;
    F64 = 28, "F64", 1, 8;
    IQ1_M = 29, "IQ1_M", 256, 56;
    BF16 = 30, "BF16", 1, 2;
    TQ1_0 = 34, "TQ1_0", 256, 54;
    TQ2_0 = 35, "TQ2_0", 256, 66;
    MXFP4 = 39, "MXFP4", 32, 17;
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` (ne0) varies fastest. The row-major (PyTorch)
    /// shape is this reversed, see [`TensorInfo::shape`].
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the tensor's data in the file (data section start + the
    /// relative offset stored in the header).
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

impl TensorInfo {
    /// Element count.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Row-major shape (GGUF dims reversed), as PyTorch / Hugging Face write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF header; tensor data stays on disk until asked for.
#[derive(Debug, Clone)]
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    file_len: u64,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

/// Bounds-checked little-endian reader over the header.
struct HeaderReader<'a> {
    r: BufReader<File>,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl HeaderReader<'_> {
    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    fn truncated(&self, what: &str, need: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            offset: self.pos,
            need,
            file_len: self.len,
        }
    }

    fn invalid(&self, msg: impl Into<String>) -> GgufError {
        GgufError::Invalid { path: self.path.to_path_buf(), msg: msg.into() }
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.remaining() {
            return Err(self.truncated(what, n));
        }
        let mut buf = vec![0u8; n as usize];
        self.fill(&mut buf)?;
        Ok(buf)
    }

    /// Reads exactly `buf.len()` bytes (the caller has checked they remain).
    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        self.r.read_exact(buf).map_err(|source| GgufError::Io { path: self.path.to_path_buf(), source })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        if N as u64 > self.remaining() {
            return Err(self.truncated(what, N as u64));
        }
        let mut buf = [0u8; N];
        self.fill(&mut buf)?;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(&format!("{what} (string length)"))?;
        let bytes = self.bytes(len, what)?;
        String::from_utf8(bytes).map_err(|e| self.invalid(format!("{what}: invalid UTF-8: {e}")))
    }

    /// Smallest encoding of one value of GGUF value type `t` (for bounding counts).
    fn min_size(t: u32) -> u64 {
        match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            _ => 1,
        }
    }

    fn value(&mut self, t: u32, key: &str, depth: usize) -> Result<MetaValue> {
        let what = format!("metadata value of '{key}'");
        Ok(match t {
            0 => MetaValue::U8(u8::from_le_bytes(self.array(&what)?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array(&what)?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => {
                let [b] = self.array::<1>(&what)?;
                match b {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => return Err(self.invalid(format!("{what}: bool byte {b} is not 0 or 1"))),
                }
            }
            8 => MetaValue::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.invalid(format!("{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let et = self.u32(&format!("{what} (array element type)"))?;
                if et > 12 {
                    return Err(self.invalid(format!("{what}: unknown array element type {et}")));
                }
                let n = self.u64(&format!("{what} (array length)"))?;
                let min = Self::min_size(et);
                let need = n.saturating_mul(min);
                if need > self.remaining() {
                    return Err(
                        self.truncated(&format!("{what}: array of {n} elements (at least {min} bytes each)"), need)
                    );
                }
                let mut v = Vec::with_capacity((n as usize).min(MAX_PREALLOC));
                for _ in 0..n {
                    v.push(self.value(et, key, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(&what)?)),
            t => return Err(self.invalid(format!("{what}: unknown value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Parse the header of a GGUF v2/v3 little-endian file. Reads no tensor data, but checks
    /// that every tensor lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let io = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut r = HeaderReader { r: BufReader::with_capacity(1 << 16, file), pos: 0, len: file_len, path };

        let magic: [u8; 4] = if file_len >= 4 {
            r.array("magic")?
        } else {
            return Err(GgufError::BadMagic { path: path.to_path_buf(), found: r.bytes(file_len, "magic")? });
        };
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { path: path.to_path_buf(), found: magic.to_vec() });
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
                "; this looks like a big-endian file"
            } else if version == 1 {
                "; v1 used 32-bit counts"
            } else {
                ""
            };
            return Err(GgufError::UnsupportedVersion { path: path.to_path_buf(), version, hint });
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata key/value count")?;
        // Each KV takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor info at
        // least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset).
        let need = n_kv.saturating_mul(13);
        if need > r.remaining() {
            let what = format!("{n_kv} metadata entries (at least 13 bytes each)");
            return Err(r.truncated(&what, need));
        }
        let need = n_tensors.saturating_mul(24);
        if need > r.remaining() {
            let what = format!("{n_tensors} tensor infos (at least 24 bytes each)");
            return Err(r.truncated(&what, need));
        }

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let t = r.u32(&format!("value type of '{key}'"))?;
            let value = r.value(t, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(r.invalid(format!("duplicate metadata key '{key}'")));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(GgufError::Metadata {
                        path: path.to_path_buf(),
                        key: "general.alignment".into(),
                        msg: format!("{v:?} is not a positive power of two"),
                    })
                }
            },
        };

        let mut raw = Vec::with_capacity((n_tensors as usize).min(MAX_PREALLOC));
        for i in 0..n_tensors {
            let name = r.string(&format!("name of tensor #{i}"))?;
            let n_dims = r.u32(&format!("n_dims of tensor '{name}'"))?;
            if n_dims as usize > MAX_DIMS {
                return Err(r.invalid(format!("tensor '{name}' has {n_dims} dimensions (at most {MAX_DIMS})")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(r.u64(&format!("dimension {d} of tensor '{name}'"))?);
            }
            let type_id = r.u32(&format!("type of tensor '{name}'"))?;
            let rel = r.u64(&format!("offset of tensor '{name}'"))?;
            raw.push((name, dims, type_id, rel));
        }
        let data_offset = r.pos.div_ceil(alignment) * alignment;

        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::with_capacity(raw.len());
        for (name, dims, type_id, rel) in raw {
            let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                type_id,
            })?;
            let n = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| r.invalid(format!("tensor '{name}': dims {dims:?} overflow")))?;
            let ne0 = dims.first().copied().unwrap_or(1);
            if !ne0.is_multiple_of(ggml_type.block_size()) {
                return Err(r.invalid(format!(
                    "tensor '{name}': first dimension {ne0} is not a multiple of the {} block \
                     size {}",
                    ggml_type.name(),
                    ggml_type.block_size()
                )));
            }
            let size = (n / ggml_type.block_size())
                .checked_mul(ggml_type.type_size())
                .ok_or_else(|| r.invalid(format!("tensor '{name}': byte size overflows")))?;
            if !rel.is_multiple_of(alignment) {
                return Err(
                    r.invalid(format!("tensor '{name}': offset {rel} is not a multiple of the alignment {alignment}"))
                );
            }
            let start = data_offset.checked_add(rel);
            if start.and_then(|s| s.checked_add(size)).is_none_or(|end| end > file_len) {
                return Err(GgufError::TensorPastEnd {
                    path: path.to_path_buf(),
                    name,
                    start: start.unwrap_or(u64::MAX),
                    size,
                    file_len,
                });
            }
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(r.invalid(format!("duplicate tensor name '{name}'")));
            }
            tensors.push(TensorInfo { name, dims, ggml_type, offset: data_offset + rel, size });
        }

        Ok(GgufFile { path: path.to_path_buf(), version, file_len, alignment, data_offset, metadata, tensors, by_name })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Data-section alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset where the tensor data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    fn meta(&self, key: &str) -> Result<&MetaValue> {
        self.metadata.get(key).ok_or_else(|| GgufError::Metadata {
            path: self.path.clone(),
            key: key.into(),
            msg: "missing".into(),
        })
    }

    fn wrong_type(&self, key: &str, want: &str, v: &MetaValue) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.into(),
            msg: format!("expected {want}, found {}", v.type_name()),
        }
    }

    /// A STRING value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.meta(key)?;
        v.as_str().ok_or_else(|| self.wrong_type(key, "STRING", v))
    }

    /// Any integer type, as u64 (negative values are an error).
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.meta(key)?;
        v.as_u64().ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    /// A FLOAT32 (or FLOAT64, narrowed) value.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.meta(key)?;
        v.as_f32().ok_or_else(|| self.wrong_type(key, "FLOAT32", v))
    }

    /// An ARRAY of STRING (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.meta(key)?;
        v.as_array()
            .and_then(|a| a.iter().map(MetaValue::as_str).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.wrong_type(key, "ARRAY of STRING", v))
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    fn info_or_err(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_info(name).ok_or_else(|| GgufError::NoSuchTensor { path: self.path.clone(), name: name.into() })
    }

    /// The tensor's raw bytes as stored (any type), read from disk now.
    pub fn tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.info_or_err(name)?;
        let io = |source| GgufError::Io { path: self.path.clone(), source };
        let mut f = File::open(&self.path).map_err(io)?;
        // Guard against the file having shrunk since open().
        let len = f.metadata().map_err(io)?.len();
        if info.offset + info.size > len {
            return Err(GgufError::TensorPastEnd {
                path: self.path.clone(),
                name: name.into(),
                start: info.offset,
                size: info.size,
                file_len: len,
            });
        }
        f.seek(SeekFrom::Start(info.offset)).map_err(io)?;
        let mut buf = vec![0u8; info.size as usize];
        f.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }

    /// Read and dequantize a tensor to f32. Returns the row-major shape (GGUF dims reversed,
    /// as PyTorch writes it) and the values in that order. Supports F32, F16, BF16, Q8_0, Q4_0
    /// and Q4_1; other types are a [`GgufError::UnsupportedType`].
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.info_or_err(name)?;
        let t = info.ggml_type;
        if !matches!(
            t,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1
        ) {
            return Err(GgufError::UnsupportedType {
                path: self.path.clone(),
                tensor: name.into(),
                type_name: t.name(),
                type_id: t.id(),
            });
        }
        let bytes = self.tensor_bytes(name)?;
        Ok((info.shape(), dequantize(t, &bytes, info.n_elements() as usize)))
    }

    /// Read a tensor of a llama.cpp LLaMA checkpoint as its Hugging Face `LlamaForCausalLM`
    /// counterpart: the HF name ([`llama_hf_name`]), the row-major shape, and the values, with
    /// the Q/K row permutation undone ([`unpermute_qk`], Q with
    /// `<arch>.attention.head_count`, K with `<arch>.attention.head_count_kv`, `<arch>` being
    /// `general.architecture`).
    pub fn llama_tensor_hf(&self, gguf_name: &str) -> Result<(String, Vec<usize>, Vec<f32>)> {
        let hf = llama_hf_name(gguf_name).ok_or_else(|| GgufError::Invalid {
            path: self.path.clone(),
            msg: format!("tensor '{gguf_name}' has no Hugging Face LLaMA name"),
        })?;
        let (shape, data) = self.tensor_f32(gguf_name)?;
        let head_key = if gguf_name.ends_with(".attn_q.weight") {
            Some("head_count")
        } else if gguf_name.ends_with(".attn_k.weight") {
            Some("head_count_kv")
        } else {
            None
        };
        let data = match head_key {
            None => data,
            Some(k) => {
                let arch = self.get_str("general.architecture")?;
                let n_head = self.get_u64(&format!("{arch}.attention.{k}"))? as usize;
                let row_len = shape.last().copied().unwrap_or(1);
                unpermute_qk(&data, n_head, row_len)?
            }
        };
        Ok((hf, shape, data))
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantize `n` elements of type `t` from `bytes` (whose length the caller has checked
/// matches; the chunking below never indexes past it in any case).
fn dequantize(t: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    match t {
        GgmlType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::BF16 => {
            out.extend(bytes.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
        }
        // Block: f16 d, 32 x i8 q; x = q * d.
        GgmlType::Q8_0 => {
            for blk in bytes.chunks_exact(34) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        // Block: f16 d, 16 bytes; element j < 16 is the low nibble of byte j, element 16 + j
        // the high nibble; x = (q - 8) * d.
        GgmlType::Q4_0 => {
            for blk in bytes.chunks_exact(18) {
                let d = f16_at(blk, 0);
                let qs = &blk[2..];
                out.extend(qs.iter().map(|&b| ((b & 0x0f) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&b| ((b >> 4) as i32 - 8) as f32 * d));
            }
        }
        // Block: f16 d, f16 m, 16 bytes (nibbles as Q4_0); x = q * d + m.
        GgmlType::Q4_1 => {
            for blk in bytes.chunks_exact(20) {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                let qs = &blk[4..];
                out.extend(qs.iter().map(|&b| d * (b & 0x0f) as f32 + m));
                out.extend(qs.iter().map(|&b| d * (b >> 4) as f32 + m));
            }
        }
        _ => unreachable!("dequantize called with unsupported type {}", t.name()),
    }
    debug_assert_eq!(out.len(), n);
    out
}

/// Hugging Face `LlamaForCausalLM` parameter name for a llama.cpp GGUF tensor name, or `None`
/// for names with no counterpart (e.g. `rope_freqs.weight`).
///
/// | GGUF                          | Hugging Face                                    |
/// |-------------------------------|-------------------------------------------------|
/// | `token_embd.weight`           | `model.embed_tokens.weight`                     |
/// | `output_norm.weight`          | `model.norm.weight`                             |
/// | `output.weight`               | `lm_head.weight`                                |
/// | `blk.N.attn_norm.weight`      | `model.layers.N.input_layernorm.weight`         |
/// | `blk.N.attn_{q,k,v}.weight`   | `model.layers.N.self_attn.{q,k,v}_proj.weight`  |
/// | `blk.N.attn_output.weight`    | `model.layers.N.self_attn.o_proj.weight`        |
/// | `blk.N.ffn_norm.weight`       | `model.layers.N.post_attention_layernorm.weight`|
/// | `blk.N.ffn_{gate,up,down}.weight` | `model.layers.N.mlp.{gate,up,down}_proj.weight` |
///
/// `.bias` suffixes map the same way. Note that the GGUF `attn_q`/`attn_k` rows are permuted
/// relative to Hugging Face; see [`unpermute_qk`].
pub fn llama_hf_name(gguf_name: &str) -> Option<String> {
    let (stem, suffix) = gguf_name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let top = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(format!("{t}.{suffix}"));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undo llama.cpp's Q/K row permutation.
///
/// `convert_hf_to_gguf.py` (`LlamaModel.permute`) stores the Hugging Face `q_proj` / `k_proj`
/// weight `w` (row-major `[dim, row_len]`, `dim` = output features) as
///
/// ```text
/// w.reshape(n_head, 2, dim // n_head // 2, row_len).swapaxes(1, 2).reshape(dim, row_len)
/// ```
///
/// so that each head's two rotary halves (HF's `rotate_half` layout) become interleaved pairs
/// (llama.cpp's "normal" RoPE layout). Within head `h` (head dim `hd = dim / n_head`,
/// `half = hd / 2`), GGUF row `h*hd + 2*i + j` is HF row `h*hd + j*half + i`. The inverse
/// applied here is
///
/// ```text
/// w.reshape(n_head, dim // n_head // 2, 2, row_len).swapaxes(1, 2).reshape(dim, row_len)
/// ```
///
/// `n_head` is `llama.attention.head_count` for Q and `llama.attention.head_count_kv` for K
/// (convert passes the KV head count for K when it differs). Biases (`row_len` 1) work too.
/// `w.len()` must be a multiple of `row_len` and the row count a multiple of `2 * n_head`.
pub fn unpermute_qk(w: &[f32], n_head: usize, row_len: usize) -> Result<Vec<f32>> {
    if row_len == 0 || n_head == 0 || !w.len().is_multiple_of(row_len) {
        return Err(GgufError::Shape(format!(
            "unpermute_qk: {} values are not whole rows of {row_len} (n_head {n_head})",
            w.len()
        )));
    }
    let dim = w.len() / row_len;
    if !dim.is_multiple_of(2 * n_head) {
        return Err(GgufError::Shape(format!(
            "unpermute_qk: {dim} rows are not a multiple of 2 * n_head = {}",
            2 * n_head
        )));
    }
    let hd = dim / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * row_len;
                let dst = (h * hd + j * half + i) * row_len;
                out[dst..dst + row_len].copy_from_slice(&w[src..src + row_len]);
            }
        }
    }
    Ok(out)
}

use std::path::PathBuf;

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Every error names where it happened: the file, and where known the record (row) and
/// the field (column).
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", fmt_shard(path, *row, column.as_deref(), message))]
    Shard { path: PathBuf, row: Option<usize>, column: Option<String>, message: String },
    #[error("invalid mask: {0}")]
    Mask(String),
    #[error("invalid image{}: {message}", context.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Image { context: Option<String>, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn fmt_shard(path: &std::path::Path, row: Option<usize>, column: Option<&str>, message: &str) -> String {
    let mut s = path.display().to_string();
    if let Some(r) = row {
        s.push_str(&format!(", row {r}"));
    }
    if let Some(c) = column {
        s.push_str(&format!(", column '{c}'"));
    }
    s.push_str(": ");
    s.push_str(message);
    s
}

impl CoreError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io { path: path.into(), source }
    }

    pub fn shard(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        CoreError::Shard { path: path.into(), row: None, column: None, message: message.into() }
    }

    pub fn field(path: impl Into<PathBuf>, row: usize, column: impl Into<String>, message: impl Into<String>) -> Self {
        CoreError::Shard { path: path.into(), row: Some(row), column: Some(column.into()), message: message.into() }
    }
}

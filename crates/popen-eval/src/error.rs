use std::path::PathBuf;

pub type Result<T, E = EvalError> = std::result::Result<T, E>;

/// Every error names what it is about: the file, the sample id, the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Core(#[from] popen_core::CoreError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// A record that cannot be scored (size mismatch, corrupt mask), by sample id.
    #[error("sample '{id}': {message}")]
    Sample { id: String, message: String },
    /// The predictions do not cover the ground truth one to one.
    #[error("{0}")]
    Ids(String),
    #[error("{0}")]
    Invalid(String),
}

impl EvalError {
    pub fn sample(id: impl Into<String>, message: impl Into<String>) -> Self {
        EvalError::Sample { id: id.into(), message: message.into() }
    }

    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        EvalError::File { path: path.into(), message: message.into() }
    }
}

//! Errors of the weights layer. Each names the file (and tensor) and says what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(transparent)]
    Io(#[from] ollm_io::IoError),

    #[error("{path}: not a valid safetensors file: {detail} (the file is corrupt or truncated; re-download it)")]
    Header { path: PathBuf, detail: String },

    #[error("{path}: tensor '{name}' has dtype {dtype}, which ollm does not read (supported: BF16, F16, F32)")]
    UnsupportedDType { path: PathBuf, name: String, dtype: String },

    #[error("{path}: {detail}")]
    Index { path: PathBuf, detail: String },

    #[error("tensor '{name}' is missing from {location} (is this the right checkpoint for the config?)")]
    Missing { name: String, location: String },

    #[error(
        "{path}: tensor '{name}' has shape {got:?}, but the config implies {want:?} (config.json and weights disagree)"
    )]
    Shape { path: PathBuf, name: String, got: Vec<usize>, want: Vec<usize> },

    #[error(
        "{dir}: no model.safetensors or model.safetensors.index.json found (is this a Hugging Face model directory?)"
    )]
    NoWeights { dir: PathBuf },

    #[error("{path}: {detail}")]
    Format { path: PathBuf, detail: String },

    #[error("cannot write {path}: {source} (check free disk space and permissions)")]
    Write { path: PathBuf, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, WeightsError>;

//! Errors that stop a batch job (a bad line or a failed request does not: it goes to the errors file).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{path}: {detail}")]
    Io { path: PathBuf, detail: String },

    #[error(
        "{path} is being written by another ollm batch (pid {holder}); wait for it to finish or give another --out/--errors"
    )]
    Locked { path: PathBuf, holder: String },

    #[error("cannot start the engine: {0}")]
    Engine(String),
}

impl BatchError {
    pub fn io(path: &std::path::Path, what: &str, e: &std::io::Error) -> Self {
        BatchError::Io { path: path.to_path_buf(), detail: format!("cannot {what}: {e}") }
    }
}

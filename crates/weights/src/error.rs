//! Errors of the weights layer. Each names the file (and tensor) and says what to do.

use std::borrow::Cow;
use std::path::PathBuf;

/// `s` with control characters (newlines, escapes, NULs …) written as escapes, so a name or key
/// read from a corrupt or hostile file cannot break a message over several lines or drive the
/// terminal. Messages print their file-derived parts through it.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(transparent)]
    Io(#[from] ollm_io::IoError),

    #[error(
        "{}: not a valid safetensors file: {} (the file is corrupt or truncated; re-download it)",
        .path.display(),
        escape_controls(.detail)
    )]
    Header { path: PathBuf, detail: String },

    #[error(
        "{}: tensor '{}' has dtype {dtype}, which ollm does not read (supported: BF16, F16, F32)",
        .path.display(),
        escape_controls(.name)
    )]
    UnsupportedDType { path: PathBuf, name: String, dtype: String },

    #[error("{}: {}", .path.display(), escape_controls(.detail))]
    Index { path: PathBuf, detail: String },

    #[error(
        "tensor '{}' is missing from {location} (is this the right checkpoint for the config?)",
        escape_controls(.name)
    )]
    Missing { name: String, location: String },

    #[error(
        "{}: tensor '{}' has shape {got:?}, but the config implies {want:?} (config.json and weights disagree)",
        .path.display(),
        escape_controls(.name)
    )]
    Shape { path: PathBuf, name: String, got: Vec<usize>, want: Vec<usize> },

    #[error(
        "{dir}: no model.safetensors or model.safetensors.index.json found (is this a Hugging Face model directory?)"
    )]
    NoWeights { dir: PathBuf },

    #[error("{}: {}", .path.display(), escape_controls(.detail))]
    Format { path: PathBuf, detail: String },

    #[error("cannot write {path}: {source} (check free disk space and permissions)")]
    Write { path: PathBuf, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, WeightsError>;

//! The one error type of the ops layer. Variants name the op and the mismatching numbers.

use crate::DType;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },

    #[error("{op}: unsupported dtype {dtype} ({detail})")]
    DType { op: &'static str, dtype: DType, detail: &'static str },

    #[error("{op}: tensor lives on backend '{found}', expected '{expected}'")]
    WrongBackend { op: &'static str, expected: &'static str, found: &'static str },

    #[error("host tensor has {got} bytes, but shape {shape:?} of {dtype} needs {want}")]
    HostBytes { shape: Vec<usize>, dtype: DType, got: usize, want: usize },

    #[error("{0}")]
    Backend(String),
}

pub type Result<T> = std::result::Result<T, OpsError>;

/// Shorthand for a shape error.
pub(crate) fn shape_err<T>(op: &'static str, detail: impl Into<String>) -> Result<T> {
    Err(OpsError::Shape { op, detail: detail.into() })
}

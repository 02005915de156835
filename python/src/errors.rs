//! Engine and CLI errors as Python exceptions: `FileNotFoundError` for a missing model,
//! `ValueError` for a bad argument or input, `MemoryError` for a plan that does not fit the
//! budgets, `RuntimeError` otherwise; each carries the CLI's one-line message.

use ollm_cli::errors::{ErrorKind, kind, one_line};
use pyo3::PyErr;
use pyo3::exceptions::{PyFileNotFoundError, PyMemoryError, PyRuntimeError, PyValueError};

/// The Python exception for an error of the engine or the CLI's loading code.
pub fn to_py(e: &anyhow::Error) -> PyErr {
    let msg = one_line(e);
    match kind(e) {
        ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
        ErrorKind::InvalidInput => PyValueError::new_err(msg),
        ErrorKind::OutOfMemory => PyMemoryError::new_err(msg),
        ErrorKind::Other => PyRuntimeError::new_err(msg),
    }
}

/// `ValueError(msg)`: an argument the caller can fix.
pub fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

/// Maps any error the engine crates return (through anyhow, keeping its chain).
pub fn engine<E: Into<anyhow::Error>>(e: E) -> PyErr {
    to_py(&e.into())
}

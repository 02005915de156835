//! The one error type of the ops layer. Variants name the op and the mismatching numbers.

use crate::DType;
use crate::bytes::{gib, human};

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

    /// An allocation that does not fit: `what` asked for `requested_bytes` while
    /// `in_use_bytes` (the context's `context_bytes` included) of `budget_bytes` were taken.
    #[error("{}", oom_text(.what, .requested_bytes, .in_use_bytes, .context_bytes, .budget_bytes, .limit))]
    OutOfMemory {
        what: String,
        requested_bytes: u64,
        in_use_bytes: u64,
        context_bytes: u64,
        budget_bytes: u64,
        limit: MemoryLimit,
    },

    /// A model needs an extension trait (MoE or Gated DeltaNet ops) the backend lacks.
    #[error("backend {backend} does not implement the {ops} ops; run this model on a backend that does (cpu or cuda)")]
    Unsupported { backend: String, ops: &'static str },

    #[error("{0}")]
    Backend(String),
}

/// Which limit an [`OpsError::OutOfMemory`] ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    /// The backend's own budget (`--vram-budget`, else the whole device): `budget_bytes` is it.
    Budget,
    /// The driver refused although the budget had room (another process holds memory):
    /// `budget_bytes` is the device's total and `in_use_bytes` what the driver reported taken.
    Device,
}

/// The one-line message of [`OpsError::OutOfMemory`].
fn oom_text(what: &str, requested: &u64, in_use: &u64, context: &u64, budget: &u64, limit: &MemoryLimit) -> String {
    let b = |x: &u64| usize::try_from(*x).unwrap_or(usize::MAX);
    match limit {
        MemoryLimit::Budget => format!(
            "VRAM budget {} exceeded: {} in use (CUDA context {}) + {} requested for {what}; raise --vram-budget, or use a shorter context or a smaller model",
            gib(b(budget)),
            gib(b(in_use)),
            gib(b(context)),
            human(b(requested)),
        ),
        MemoryLimit::Device => format!(
            "cuda alloc of {} for {what} failed: the device is out of memory ({} free of {}; another process may hold the rest, or lower --vram-budget to fail earlier)",
            human(b(requested)),
            human(b(budget).saturating_sub(b(in_use))),
            gib(b(budget)),
        ),
    }
}

pub type Result<T> = std::result::Result<T, OpsError>;

/// Shorthand for a shape error.
pub(crate) fn shape_err<T>(op: &'static str, detail: impl Into<String>) -> Result<T> {
    Err(OpsError::Shape { op, detail: detail.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_refusal_says_what_was_free() {
        let e = OpsError::OutOfMemory {
            what: "weights [4096, 4096] BF16".into(),
            requested_bytes: 32 << 20,
            in_use_bytes: 79 << 30,
            context_bytes: 1 << 29,
            budget_bytes: 80 << 30,
            limit: MemoryLimit::Device,
        };
        assert_eq!(
            e.to_string(),
            "cuda alloc of 32.0 MiB for weights [4096, 4096] BF16 failed: the device is out of memory (1.00 GiB free of 80.00 GiB; another process may hold the rest, or lower --vram-budget to fail earlier)"
        );
    }

    #[test]
    fn a_missing_extension_names_the_backend_and_the_ops() {
        let e = OpsError::Unsupported { backend: "npu:0".into(), ops: "MoE" };
        assert_eq!(
            e.to_string(),
            "backend npu:0 does not implement the MoE ops; run this model on a backend that does (cpu or cuda)"
        );
    }
}

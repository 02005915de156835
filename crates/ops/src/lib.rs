//! ollm-ops: math on buffers. Knows nothing of models, files or requests.
//!
//! A [`Tensor`] is a shape plus [`Storage`] that lives on one backend. Model code calls the
//! [`Backend`] trait only (its roles: [`Compute`], [`Memory`], [`CopyQueue`], and the extension
//! traits [`MoeOps`] and [`DeltaNetOps`]); the CPU backend ([`cpu::CpuBackend`]) is always
//! present and is the oracle that every other backend is tested against.

pub mod backend;
pub mod bytes;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod host;
pub mod mxfp4;
pub mod tensor;

pub use backend::{
    AttnGeometry, AttnParams, Backend, Compute, CopyQueue, DeltaForm, DeltaNetOps, DeltaRule, ExpertAct,
    ExpertMatrixRef, FusedOps, GROUPED_PIECE_ROUTES, HeadSlice, KvBlockSpan, Memory, MemoryKind, MemoryStats, MoeOps,
    NormKind, RopeTable, RoutedExpert, RouterMode, StepGraphs, TreeMask, experts_by_expert, grouped_scratch_bytes,
    run_experts,
};
pub use dtype::DType;
pub use error::{MemoryLimit, OpsError, Result};
pub use host::{HostBuffer, Marker};
pub use tensor::{CpuStorage, HostTensor, Storage, Tensor};

/// A switch read from the environment: `name=1` turns it on, `name=0` off, anything else (or
/// nothing) leaves `default`. The measured paths default on (the GPU's fused kernels, graphs and
/// PDL, the CPU's spinning threads), the slower ones off.
pub(crate) fn env_switch(name: &str, default: bool) -> bool {
    match std::env::var(name).as_deref().map(str::trim) {
        Ok("1") => true,
        Ok("0") => false,
        _ => default,
    }
}

//! The backend traits, one per role, and [`Backend`], which joins them.
//!
//! * [`Compute`]: the math every family's forward needs;
//! * [`MoeOps`] and [`DeltaNetOps`]: extension traits for the ops of one kind of layer, which a
//!   backend may implement (models reach them with [`Backend::moe`] and [`Backend::deltanet`]);
//! * [`FusedOps`]: op sequences of a decode step as one kernel where a backend fuses them (the
//!   composed ops otherwise);
//! * [`StepGraphs`]: decode steps captured once and replayed, which a device backend may offer
//!   ([`Backend::step_graphs`]);
//! * [`Memory`]: allocations, uploads, read-back and the memory figures ([`MemoryStats`]);
//! * [`CopyQueue`]: copies on a second queue and the markers that order them against compute.
//!
//! Model code takes one `&dyn Backend` and calls the role methods on it directly (a trait
//! object's supertrait methods need no import). Measuring (bandwidths, op benches) is not a
//! backend's business: it lives with the tools that report it and times through these roles.

mod checks;
mod compute;
mod copy_queue;
mod deltanet;
mod fused;
mod graphs;
mod memory;
mod moe;
mod tree;

use std::any::Any;
use std::fmt;

pub(crate) use checks::{
    delta_dims, gated_norm_dims, mxfp4_dims, mxfp4_matmul_dims, router_dims, rows_dims, slice_dims, swiglu_dims,
    transpose_dims,
};
pub use compute::{AttnGeometry, AttnParams, Compute, HeadSlice, NormKind, RopeTable};
pub(crate) use copy_queue::foreign_marker;
pub use copy_queue::{CopyQueue, KvBlockSpan};
pub use deltanet::{DeltaForm, DeltaNetOps, DeltaRule};
pub use fused::{
    FusedOps, Linear, Norm, matmul_add_composed, matmul_swiglu_composed, norm_qkv_composed, norm_swiglu_composed,
    rope_write_kv_composed,
};
pub use graphs::StepGraphs;
pub use memory::{Memory, MemoryKind, MemoryStats};
pub use moe::{
    ExpertAct, ExpertMatrixRef, GROUPED_PIECE_ROUTES, MoeOps, RoutedExpert, RouterMode, experts_by_expert,
    grouped_scratch_bytes, run_experts,
};
pub use tree::TreeMask;

use crate::{OpsError, Result};

/// A whole backend: every role, a name, and the extension traits it implements. Implemented by
/// the CPU backend (the reference) and device backends.
pub trait Backend: Compute + FusedOps + Memory + CopyQueue + fmt::Debug {
    /// Short name for messages ("cpu", "cuda:0").
    fn name(&self) -> String;

    /// The MoE ops, when this backend implements them.
    fn moe_ops(&self) -> Option<&dyn MoeOps> {
        None
    }

    /// The Gated DeltaNet ops, when this backend implements them.
    fn deltanet_ops(&self) -> Option<&dyn DeltaNetOps> {
        None
    }

    /// Decode-step graphs, when this backend offers them and they are on.
    fn step_graphs(&self) -> Option<&dyn StepGraphs> {
        None
    }

    /// The backend as `Any`, for tools that need one backend's own API (the ops bench downcasts
    /// to the CUDA backend for event timers and cuBLAS). Model code never uses it.
    fn as_any(&self) -> &dyn Any;

    /// The MoE ops, or [`OpsError::Unsupported`] naming this backend.
    fn moe(&self) -> Result<&dyn MoeOps> {
        self.moe_ops().ok_or_else(|| OpsError::Unsupported { backend: self.name(), ops: "MoE" })
    }

    /// The Gated DeltaNet ops, or [`OpsError::Unsupported`] naming this backend.
    fn deltanet(&self) -> Result<&dyn DeltaNetOps> {
        self.deltanet_ops().ok_or_else(|| OpsError::Unsupported { backend: self.name(), ops: "Gated DeltaNet" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;

    #[test]
    fn the_cpu_backend_has_both_extensions_and_untracked_memory() {
        let be: &dyn Backend = &CpuBackend::new();
        assert!(be.moe().is_ok() && be.deltanet().is_ok());
        assert_eq!(be.memory_kind(), MemoryKind::Host);
        let s = be.memory_stats();
        assert_eq!((s.budget_bytes, s.peak_bytes, s.in_use_bytes), (None, None, 0));
    }
}

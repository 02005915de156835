//! The tensors of a Qwen3-Next checkpoint (models.md §4.2): every name, shape and role, once.

use crate::common::experts::ExpertNames;

/// Where a layer's routed experts are named: one tensor per expert and matrix,
/// `mlp.experts.{e}.{gate,up,down}_proj.weight`, already in nn.Linear layout; no biases.
pub const EXPERTS: ExpertNames = ExpertNames {
    prefix: "mlp.experts.",
    mxfp4: None,
    dense: None,
    per_expert: Some(["gate_proj.weight", "up_proj.weight", "down_proj.weight"]),
};

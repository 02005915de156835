//! Blocks shared by the families, written once: RoPE tables, attention, the gated MLP, the
//! forward's tiling and scratch, the tensor-table machinery and the experts' sources.

pub mod attention;
pub mod experts;
pub mod forward;
pub mod graphed;
pub mod mlp;
pub mod moe;
pub mod rope;
pub mod tensors;
pub mod weights;

//! Blocks shared by the families, written once: RoPE tables, attention, the gated MLP.

pub mod attention;
pub mod experts;
pub mod forward;
pub mod mlp;
pub mod moe;
pub mod rope;
pub mod tensors;
pub mod weights;

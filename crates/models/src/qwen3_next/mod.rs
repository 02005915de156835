//! Qwen3-Next (`Qwen3NextForCausalLM`): Gated DeltaNet and gated attention layers, a sparse MoE
//! with a shared expert (models.md §4).

pub mod config;
pub mod forward;

pub use config::{Mixer, Qwen3NextConfig};
pub use forward::{Qwen3Next, scratch_bytes};

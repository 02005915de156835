//! Llama-3.x (`LlamaForCausalLM`, models.md §2): GQA, explicit head_dim, default and llama3
//! RoPE, optional attention/MLP biases, tied or untied embeddings.

mod config;
mod forward;
pub mod names;

pub use config::LlamaConfig;
pub use forward::{Llama, scratch_bytes};

//! Checkpoint file formats.

pub mod safetensors;
pub mod gguf;

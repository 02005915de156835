//! Checkpoint file formats.

pub mod gguf;
pub mod safetensors;
pub mod safetensors_writer;

//! Checkpoint file formats.

pub mod safetensors;

//! Checkpoint file formats.

pub mod gguf;
pub mod mxfp4;
pub mod safetensors;
pub mod safetensors_writer;

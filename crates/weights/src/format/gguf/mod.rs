//! GGUF: reading llama.cpp's single-file format, dequantising its blocks, and importing a llama
//! GGUF into a Hugging Face model directory (config.json, tokenizer files, model.safetensors).
//! File facts: models.md §7.

pub mod ggml_type;
mod kquant;
pub mod metadata;
pub mod quant;
pub mod reader;
pub mod writer;

pub use ggml_type::GgmlType;
pub use metadata::{MetaValue, Metadata, ValueType};
pub use reader::{GgufFile, TensorInfo};

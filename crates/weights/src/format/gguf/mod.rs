//! GGUF: reading llama.cpp's single-file format, dequantising its blocks, and importing a llama
//! GGUF into a Hugging Face model directory (config.json, tokenizer files, model.safetensors).
//! File facts: docs/models.md §7.

pub mod config;
pub mod ggml_type;
pub mod import;
mod kquant;
pub mod metadata;
pub mod names;
pub mod quant;
pub mod reader;
pub mod rope_scaling;
pub mod tokenizer;
pub mod writer;

pub use ggml_type::GgmlType;
pub use import::{ImportSummary, import_gguf};
pub use metadata::{MetaValue, Metadata, ValueType};
pub use reader::{GgufFile, TensorInfo};

//! ollm-weights: named tensors on disk. Knows names, dtypes, shapes and byte ranges; knows
//! nothing of architectures.
//!
//! A [`Catalog`] indexes every tensor of a checkpoint (one safetensors file or a sharded set)
//! from the headers alone; [`Catalog::read`] fetches one tensor's bytes with a positioned read.

pub mod catalog;
pub mod error;
pub mod format;
pub mod staging;
pub mod synth;

pub use catalog::{Catalog, TensorEntry};
pub use error::{Result, WeightsError};

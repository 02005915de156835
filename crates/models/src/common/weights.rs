//! Loading named tensors with the shapes a config implies onto a backend.

use ollm_ops::{Backend, Tensor};
use ollm_weights::Catalog;

use crate::Result;

/// Borrows a catalog and a backend; each call reads one tensor and uploads it.
#[derive(Debug, Clone, Copy)]
pub struct Loader<'a> {
    pub catalog: &'a Catalog,
    pub backend: &'a dyn Backend,
}

impl Loader<'_> {
    /// A required tensor; a missing name or a wrong shape is an error naming both.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let entry = self.catalog.require(name, shape)?;
        Ok(self.backend.upload(&self.catalog.read(entry)?)?)
    }

    /// A required tensor converted to f32 on the way (small parameters that kernels read in
    /// f32: GPT-OSS's sinks and router, Qwen3-Next's gates and short convolution).
    pub fn tensor_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let values = self.catalog.read(self.catalog.require(name, shape)?)?.to_f32_vec()?;
        Ok(self.backend.upload_f32(shape.to_vec(), &values)?)
    }

    /// A tensor that is present only when a config flag says so.
    pub fn tensor_if(&self, present: bool, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if present { self.tensor(name, shape).map(Some) } else { Ok(None) }
    }
}

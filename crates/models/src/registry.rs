//! Architecture string → model constructor.

use std::path::Path;
use std::sync::Arc;

use ollm_ops::Backend;
use ollm_weights::Catalog;

use crate::config::RawConfig;
use crate::llama3::{Llama, LlamaConfig};
use crate::{CausalLm, ModelError, Result};

/// Architectures this build can run.
pub const SUPPORTED: &[&str] = &["LlamaForCausalLM"];

/// Loads the model in a Hugging Face directory (config.json + safetensors) onto `backend`.
/// The config is parsed and checked before any weight is read.
pub fn load_model(dir: &Path, backend: Arc<dyn Backend>) -> Result<Arc<dyn CausalLm>> {
    let raw = RawConfig::read(dir)?;
    let arch = raw.architecture()?;
    match arch.as_str() {
        "LlamaForCausalLM" | "llama" => {
            let cfg = LlamaConfig::from_raw(&raw)?;
            let catalog = Catalog::open_dir(dir)?;
            Ok(Arc::new(Llama::load(cfg, arch, &catalog, backend)?))
        }
        other => Err(ModelError::Unsupported {
            path: raw.path.clone(),
            field: "architectures".into(),
            value: other.to_string(),
            supported: SUPPORTED.join(", "),
        }),
    }
}

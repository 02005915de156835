//! Turning `--model` and `--device` into a loaded model, tokenizer and defaults.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ollm_engine::{ChatModel, GenerationConfig};
use ollm_models::{CausalLm, load_model};
use ollm_ops::Backend;
use ollm_ops::cpu::CpuBackend;
use ollm_tokenizer::{ChatTemplate, Tokenizer};

use crate::commands::{DeviceArg, ModelArgs};

/// Everything a command needs from a model directory.
pub struct Loaded {
    pub dir: PathBuf,
    pub model: Arc<dyn CausalLm>,
    pub generation: GenerationConfig,
    pub load_time: Duration,
    /// The backend's name ("cpu", "cuda:0 (…)").
    pub model_backend_name: String,
    /// The backend the model lives on.
    pub backend: Arc<dyn Backend>,
}

/// A model directory's tokenizer and chat template.
pub struct Text {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
}

/// The directory `--model` names.
pub fn model_dir(spec: &str) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(spec);
    if !dir.exists() {
        if crate::demo::is_demo_name(spec) {
            return crate::demo::ensure_demo();
        }
        if crate::hub::is_hub_id(spec) {
            return crate::hub::ensure_model(spec, None);
        }
        bail!(
            "model directory {spec} does not exist (give a Hugging Face model directory with config.json and *.safetensors, a hub id ORG/NAME, or smollm2-135m for the demo model)"
        );
    }
    if !dir.is_dir() {
        bail!("--model {spec} is a file; give the directory that holds config.json and the weights");
    }
    Ok(dir)
}

/// The compute backend for `--device`: `cuda` must find a usable GPU; `auto` takes one when it
/// can and says in one line on stderr which device it chose.
pub fn backend(device: DeviceArg) -> anyhow::Result<Arc<dyn Backend>> {
    match device {
        DeviceArg::Cpu => Ok(Arc::new(CpuBackend::new())),
        DeviceArg::Cuda => {
            let dev = ollm_ops::cuda::probe(0).context("--device cuda")?;
            Ok(Arc::new(ollm_ops::cuda::CudaBackend::new(dev)))
        }
        DeviceArg::Auto => match ollm_ops::cuda::probe(0) {
            Ok(dev) => {
                let b = ollm_ops::cuda::CudaBackend::new(dev);
                eprintln!("[ollm] device: {}", b.name());
                Ok(Arc::new(b))
            }
            Err(_) => {
                eprintln!("[ollm] device: cpu (no usable GPU; --device cuda says why)");
                Ok(Arc::new(CpuBackend::new()))
            }
        },
    }
}

pub fn load_text(dir: &std::path::Path) -> anyhow::Result<Text> {
    let tokenizer = Tokenizer::from_dir(dir)?;
    let template = ChatTemplate::from_dir(dir)?;
    Ok(Text { tokenizer, template })
}

/// Loads the model (config first, so a bad config fails before any weight is read).
pub fn load(args: &ModelArgs) -> anyhow::Result<Loaded> {
    let dir = model_dir(&args.model)?;
    let backend = backend(args.device)?;
    let generation = GenerationConfig::from_dir(&dir)?;
    let t0 = Instant::now();
    let model_backend_name = backend.name();
    let model = load_model(&dir, backend.clone()).with_context(|| format!("loading {}", dir.display()))?;
    Ok(Loaded { dir, model, generation, load_time: t0.elapsed(), model_backend_name, backend })
}

impl Loaded {
    /// The model with its tokenizer, template, eos ids and default sampling, for the front ends.
    pub fn chat_model(&self, text: Text) -> ChatModel {
        ChatModel {
            model: self.model.clone(),
            eos_token_ids: self.eos_ids(&text),
            default_sampling: self.generation.default_sampling(),
            tokenizer: text.tokenizer,
            template: text.template,
        }
    }

    /// Eos ids from config.json, generation_config.json and the chat template's eos token.
    pub fn eos_ids(&self, text: &Text) -> Vec<u32> {
        let mut ids = self.model.info().eos_token_ids.clone();
        ids.extend(&self.generation.eos_token_ids);
        if let Some(id) = text.template.as_ref().and_then(|t| text.tokenizer.token_to_id(&t.eos_token)) {
            ids.push(id);
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

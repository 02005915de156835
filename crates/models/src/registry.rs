//! Architecture string → model constructor.

use std::path::Path;
use std::sync::Arc;

use ollm_ops::Backend;
use ollm_weights::Catalog;

use crate::config::RawConfig;
use crate::gpt_oss::{GptOss, GptOssConfig};
use crate::llama3::{Llama, LlamaConfig};
use crate::qwen3_next::{Qwen3Next, Qwen3NextConfig};
use crate::{CausalLm, ModelError, Result};
use ollm_residency::plan::Placement;

/// Architectures this build can run.
pub const SUPPORTED: &[&str] = &["LlamaForCausalLM", "GptOssForCausalLM", "Qwen3NextForCausalLM"];

/// Loads the model in a Hugging Face directory (config.json + safetensors) onto `backend`.
/// The config is parsed and checked before any weight is read.
pub fn load_model(dir: &Path, backend: Arc<dyn Backend>) -> Result<Arc<dyn CausalLm>> {
    load_model_placed(dir, backend, None)
}

/// Like [`load_model`], with the decoder layers placed as `placement` says (None: all resident).
pub fn load_model_placed(
    dir: &Path,
    backend: Arc<dyn Backend>,
    placement: Option<&Placement>,
) -> Result<Arc<dyn CausalLm>> {
    let raw = RawConfig::read(dir)?;
    // OLLM_ALLOW_HEADERS_ONLY=1 runs one anyway (every weight zero): to measure the device
    // memory of a shape larger than the disk, never its speed or its output.
    if raw.bool_or(crate::synth::HEADERS_ONLY_KEY, false)? && std::env::var_os("OLLM_ALLOW_HEADERS_ONLY").is_none() {
        return Err(raw.err(
            crate::synth::HEADERS_ONLY_KEY,
            "this model was written by `ollm synth --headers-only`: it has no weights; only `ollm plan` reads it (synth without --headers-only writes one that runs)",
        ));
    }
    let arch = raw.architecture()?;
    match arch.as_str() {
        "LlamaForCausalLM" | "llama" => {
            let cfg = LlamaConfig::from_raw(&raw)?;
            let catalog = Catalog::open_dir(dir)?;
            let all = Placement::resident(cfg.n_layers);
            Ok(Arc::new(Llama::load_placed(cfg, arch, &catalog, backend, placement.unwrap_or(&all))?))
        }
        "GptOssForCausalLM" | "gpt_oss" => {
            let cfg = GptOssConfig::from_raw(&raw)?;
            let catalog = Catalog::open_dir(dir)?;
            let all = Placement::resident(cfg.n_layers);
            Ok(Arc::new(GptOss::load_placed(cfg, arch, &catalog, backend, placement.unwrap_or(&all))?))
        }
        "Qwen3NextForCausalLM" | "qwen3_next" => {
            let cfg = Qwen3NextConfig::from_raw(&raw)?;
            let catalog = Catalog::open_dir(dir)?;
            let all = Placement::resident(cfg.n_layers);
            Ok(Arc::new(Qwen3Next::load_placed(cfg, arch, &catalog, backend, placement.unwrap_or(&all))?))
        }
        other => Err(unsupported(&raw, other)),
    }
}

fn unsupported(raw: &RawConfig, arch: &str) -> ModelError {
    ModelError::Unsupported {
        path: raw.path.clone(),
        field: "architectures".into(),
        value: arch.to_string(),
        supported: SUPPORTED.join(", "),
    }
}

/// What the planner needs to know about a model directory, from config.json and the
/// safetensors headers alone (no weight is read).
#[derive(Debug, Clone)]
pub struct ModelBytes {
    pub architecture: String,
    /// Bytes of each decoder layer (`model.layers.{l}.*`).
    pub layer_bytes: Vec<u64>,
    /// Every other tensor (embedding, head, final norm).
    pub resident_bytes: u64,
    /// KV elements per position, K and V, of every layer (multiply by the cache's element size).
    pub kv_elems_per_position: u64,
    /// Of those, the sliding-window layers' (a cache of about a window each): elements per
    /// position, how many layers, the window.
    pub sliding_kv: Option<(u64, usize, usize)>,
    pub n_layers: usize,
    /// Layers that keep a KV cache (Qwen3-Next's DeltaNet layers keep a fixed state instead).
    pub kv_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
    /// MoE models: the experts (not in `layer_bytes`).
    pub experts: Option<ollm_residency::plan::ExpertBytes>,
    /// Query heads × head dim (the attention output width).
    pub q_dim: usize,
    /// Layer layouts that stream apart (see `PlanInput::slot_groups`).
    pub layer_groups: usize,
}

/// Reads a model directory's sizes for planning.
pub fn model_bytes(dir: &Path) -> Result<ModelBytes> {
    let raw = RawConfig::read(dir)?;
    let arch = raw.architecture()?;
    // (layers, hidden, intermediate, vocab, max positions, kv width, q width, experts (E, k))
    let mut sliding = None;
    let mut kv_layers = 0;
    let mut layer_groups = 1;
    let mut moe_layers = None;
    let (n_layers, h, i, v, max_positions, kvd, q_dim, moe) = match arch.as_str() {
        "LlamaForCausalLM" | "llama" => {
            let c = LlamaConfig::from_raw(&raw)?;
            let kvd = c.n_kv_heads * c.head_dim;
            (
                c.n_layers,
                c.hidden_size,
                c.intermediate_size,
                c.vocab_size,
                c.max_positions,
                kvd,
                c.n_heads * c.head_dim,
                None,
            )
        }
        "GptOssForCausalLM" | "gpt_oss" => {
            let c = GptOssConfig::from_raw(&raw)?;
            let kvd = c.n_kv_heads * c.head_dim;
            let moe = Some((c.n_experts, c.experts_per_token));
            let n_sliding = (0..c.n_layers).filter(|&l| c.window(l).is_some()).count();
            sliding = (n_sliding > 0).then_some(((2 * n_sliding * kvd) as u64, n_sliding, c.sliding_window));
            (
                c.n_layers,
                c.hidden_size,
                c.intermediate_size,
                c.vocab_size,
                c.max_positions,
                kvd,
                c.n_heads * c.head_dim,
                moe,
            )
        }
        "Qwen3NextForCausalLM" | "qwen3_next" => {
            let c = Qwen3NextConfig::from_raw(&raw)?;
            let kvd = c.n_kv_heads * c.head_dim;
            // Only the full-attention layers keep a KV cache: spread their share over all layers.
            kv_layers = c.attention_layers();
            layer_groups = (0..c.n_layers).map(|l| c.layout(l)).collect::<std::collections::BTreeSet<_>>().len();
            moe_layers = Some(c.moe_layers().len());
            (
                c.n_layers,
                c.hidden_size,
                c.moe_intermediate_size.max(c.intermediate_size),
                c.vocab_size,
                c.max_positions,
                kvd,
                c.n_heads * c.head_dim,
                (c.n_experts > 0).then_some((c.n_experts, c.experts_per_token)),
            )
        }
        other => return Err(unsupported(&raw, other)),
    };
    let catalog = Catalog::open_dir(dir)?;
    let mut layer_bytes = vec![0u64; n_layers];
    let mut resident_bytes = 0u64;
    let mut expert_bytes = 0u64;
    for e in catalog.entries() {
        let layer = e
            .name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&l| l < n_layers);
        match layer {
            Some(_) if moe.is_some() && e.name.contains(".mlp.experts.") => expert_bytes += e.len_bytes,
            Some(l) => layer_bytes[l] += e.len_bytes,
            None => resident_bytes += e.len_bytes,
        }
    }
    let experts = moe.map(|(per_layer, k)| {
        let layers = moe_layers.unwrap_or(n_layers);
        let count = layers * per_layer;
        ollm_residency::plan::ExpertBytes {
            count,
            per_layer,
            unit: expert_bytes / count.max(1) as u64,
            per_token: layers * k,
        }
    });
    Ok(ModelBytes {
        architecture: arch,
        layer_bytes,
        resident_bytes,
        kv_elems_per_position: (2 * if kv_layers > 0 { kv_layers } else { n_layers } * kvd) as u64,
        sliding_kv: sliding,
        n_layers,
        kv_layers: if kv_layers > 0 { kv_layers } else { n_layers },
        hidden_size: h,
        intermediate_size: i,
        vocab_size: v,
        max_positions,
        experts,
        q_dim,
        layer_groups,
    })
}

/// The checkpoint files of `dir` and, for each of `layers`, where its tensors are in them
/// (every `model.layers.{l}.*` tensor, by suffix): what the streamer reads for those layers.
pub fn layer_parts(
    dir: &Path,
    layers: &[usize],
) -> Result<(Vec<std::path::PathBuf>, Vec<Vec<ollm_residency::stream::Part>>)> {
    let catalog = Catalog::open_dir(dir)?;
    let parts = layers
        .iter()
        .map(|l| {
            let prefix = format!("model.layers.{l}.");
            let mut parts: Vec<ollm_residency::stream::Part> = catalog
                .entries()
                .filter_map(|e| {
                    e.name.strip_prefix(&prefix).map(|suffix| ollm_residency::stream::Part {
                        suffix: suffix.to_string(),
                        file: e.file,
                        offset: e.offset_bytes,
                        len: e.len_bytes,
                    })
                })
                .collect();
            parts.sort_by_key(|p| (p.file, p.offset));
            if parts.is_empty() {
                return Err(ModelError::Stream(format!("{}: no tensors of layer {l}", dir.display())));
            }
            Ok(parts)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((catalog.file_paths(), parts))
}

/// Device bytes of the activations a forward of `rows` rows of the model in `dir` allocates at
/// most, as the family's forward counts them (`scratch_bytes` of each family), plus the expert
/// cache's unpacked matrices for a MoE model.
pub fn scratch_bytes(dir: &Path, rows: usize) -> Result<u64> {
    let raw = RawConfig::read(dir)?;
    let arch = raw.architecture()?;
    let experts = |layers: &[usize], n_experts: usize, hi: (usize, usize)| -> Result<u64> {
        if layers.is_empty() {
            return Ok(0);
        }
        let catalog = Catalog::open_dir(dir)?;
        let sources = crate::common::experts::expert_sources(&catalog, layers, n_experts, hi)?;
        Ok(ollm_residency::experts::work_bytes(&sources, hi))
    };
    match arch.as_str() {
        "LlamaForCausalLM" | "llama" => Ok(crate::llama3::scratch_bytes(&LlamaConfig::from_raw(&raw)?, rows)),
        "GptOssForCausalLM" | "gpt_oss" => {
            let c = GptOssConfig::from_raw(&raw)?;
            let layers: Vec<usize> = (0..c.n_layers).collect();
            Ok(crate::gpt_oss::scratch_bytes(&c, rows)
                + experts(&layers, c.n_experts, (c.hidden_size, c.intermediate_size))?)
        }
        "Qwen3NextForCausalLM" | "qwen3_next" => {
            let c = Qwen3NextConfig::from_raw(&raw)?;
            let hi = (c.hidden_size, c.moe_intermediate_size);
            Ok(crate::qwen3_next::scratch_bytes(&c, rows) + experts(&c.moe_layers(), c.n_experts, hi)?)
        }
        other => Err(unsupported(&raw, other)),
    }
}

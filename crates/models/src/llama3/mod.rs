//! Llama-3.x (`LlamaForCausalLM`, docs/models.md §2): GQA, explicit head_dim, default and llama3
//! RoPE, optional attention/MLP biases, tied or untied embeddings; and the dense Qwen2/Qwen3
//! checkpoints, which are this forward with q/k/v biases or per-head q/k norms (§8).

mod config;
mod forward;
pub mod tensors;

pub use config::{LlamaConfig, Variant};
pub use forward::{Llama, scratch_bytes};

/// The registry's entry for this family.
pub const FAMILY: crate::registry::Family = with_names(&["LlamaForCausalLM", "llama"]);
/// Qwen2 dense checkpoints (Qwen2.5): the Llama forward with q/k/v biases.
pub const QWEN2_FAMILY: crate::registry::Family = with_names(&["Qwen2ForCausalLM", "qwen2"]);
/// Qwen3 dense checkpoints: the Llama forward with per-head q/k norms.
pub const QWEN3_FAMILY: crate::registry::Family = with_names(&["Qwen3ForCausalLM", "qwen3"]);

/// The Llama forward's registry entry under the architecture names `architectures` (the config
/// picks its [`Variant`] from the same name).
const fn with_names(architectures: &'static [&'static str]) -> crate::registry::Family {
    crate::registry::Family {
        architectures,
        load: |raw, arch, catalog, backend, placement| {
            let cfg = LlamaConfig::from_raw(raw)?;
            Ok(std::sync::Arc::new(Llama::load_placed(cfg, arch, catalog, backend, placement)?))
        },
        dims,
        scratch_bytes: |raw, rows, seqs| Ok(scratch_bytes(&LlamaConfig::from_raw(raw)?, rows, seqs)),
        expert_work_bytes: |_, _| Ok(0),
        role: |suffix| crate::common::tensors::role_of(&tensors::LAYER, None, suffix),
        uses: |name| crate::common::tensors::is_used(&tensors::GLOBAL, &tensors::LAYER, None, name),
    }
}

fn dims(raw: &crate::config::RawConfig) -> crate::Result<crate::registry::Dims> {
    Ok(dims_of(&LlamaConfig::from_raw(raw)?))
}

/// The config's sizes, as the registry and the model's info see them.
pub(crate) fn dims_of(c: &LlamaConfig) -> crate::registry::Dims {
    crate::registry::Dims {
        n_layers: c.n_layers,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        vocab_size: c.vocab_size,
        max_positions: c.max_positions,
        kv_dim: c.n_kv_heads * c.head_dim,
        q_dim: c.n_heads * c.head_dim,
        kv_layers: c.n_layers,
        sliding_kv: None,
        moe: None,
        layer_groups: 1,
    }
}

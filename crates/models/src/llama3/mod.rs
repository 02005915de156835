//! Llama-3.x (`LlamaForCausalLM`, docs/models.md §2): GQA, explicit head_dim, default and llama3
//! RoPE, optional attention/MLP biases, tied or untied embeddings.

mod config;
mod forward;
pub mod tensors;

pub use config::LlamaConfig;
pub use forward::{Llama, scratch_bytes};

/// The registry's entry for this family.
pub const FAMILY: crate::registry::Family = crate::registry::Family {
    architectures: &["LlamaForCausalLM", "llama"],
    load: |raw, arch, catalog, backend, placement| {
        let cfg = LlamaConfig::from_raw(raw)?;
        Ok(std::sync::Arc::new(Llama::load_placed(cfg, arch, catalog, backend, placement)?))
    },
    dims,
    scratch_bytes: |raw, rows, seqs| Ok(scratch_bytes(&LlamaConfig::from_raw(raw)?, rows, seqs)),
    expert_work_bytes: |_, _| Ok(0),
    role: |suffix| crate::common::tensors::role_of(&tensors::LAYER, None, suffix),
};

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

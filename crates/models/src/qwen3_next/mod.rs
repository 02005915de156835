//! Qwen3-Next (`Qwen3NextForCausalLM`): Gated DeltaNet and gated attention layers, a sparse MoE
//! with a shared expert (docs/models.md §4).

pub mod config;
pub mod forward;
pub mod tensors;

pub use config::{Mixer, Qwen3NextConfig};
pub use forward::{Qwen3Next, scratch_bytes};

/// The registry's entry for this family.
pub const FAMILY: crate::registry::Family = crate::registry::Family {
    architectures: &["Qwen3NextForCausalLM", "qwen3_next"],
    load: |raw, arch, catalog, backend, placement| {
        let cfg = Qwen3NextConfig::from_raw(raw)?;
        Ok(std::sync::Arc::new(Qwen3Next::load_placed(cfg, arch, catalog, backend, placement)?))
    },
    dims,
    scratch_bytes: |raw, rows, seqs| Ok(scratch_bytes(&Qwen3NextConfig::from_raw(raw)?, rows, seqs)),
    expert_work_bytes: |raw, catalog| {
        let c = Qwen3NextConfig::from_raw(raw)?;
        let hi = (c.hidden_size, c.moe_intermediate_size);
        crate::registry::expert_work_bytes(catalog, &tensors::EXPERTS, &c.moe_layers(), c.n_experts, hi)
    },
    role: |suffix| crate::common::tensors::role_of(&tensors::LAYER, Some(tensors::EXPERTS.prefix), suffix),
    uses: |name| {
        crate::common::tensors::is_used(&tensors::GLOBAL, &tensors::LAYER, Some(tensors::EXPERTS.prefix), name)
    },
};

fn dims(raw: &crate::config::RawConfig) -> crate::Result<crate::registry::Dims> {
    Ok(dims_of(&Qwen3NextConfig::from_raw(raw)?))
}

/// The config's sizes, as the registry and the model's info see them.
pub(crate) fn dims_of(c: &Qwen3NextConfig) -> crate::registry::Dims {
    // Only the full-attention layers keep a KV cache.
    let attention = c.attention_layers();
    crate::registry::Dims {
        n_layers: c.n_layers,
        hidden_size: c.hidden_size,
        intermediate_size: c.moe_intermediate_size.max(c.intermediate_size),
        vocab_size: c.vocab_size,
        max_positions: c.max_positions,
        kv_dim: c.n_kv_heads * c.head_dim,
        q_dim: c.n_heads * c.head_dim,
        kv_layers: attention,
        sliding_kv: None,
        moe: (c.n_experts > 0).then_some((c.n_experts, c.experts_per_token, c.moe_layers().len())),
        layer_groups: (0..c.n_layers).map(|l| c.layout(l)).collect::<std::collections::BTreeSet<_>>().len(),
    }
}

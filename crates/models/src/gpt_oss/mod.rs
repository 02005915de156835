//! GPT-OSS (`GptOssForCausalLM`, docs/models.md §3): attention with per-head sinks, sliding-window
//! layers alternating with full ones, q/k/v/o biases, YaRN RoPE; a top-k MoE whose experts
//! (MXFP4 or dense) go through the expert cache.

mod config;
mod forward;
pub mod tensors;

pub use config::{GptOssConfig, LayerKind, SWIGLU_ALPHA};
pub use forward::{EXPERT_ROWS, GptOss, MOE_CHUNK, scratch_bytes};

/// The registry's entry for this family.
pub const FAMILY: crate::registry::Family = crate::registry::Family {
    architectures: &["GptOssForCausalLM", "gpt_oss"],
    load: |raw, arch, catalog, backend, placement| {
        let cfg = GptOssConfig::from_raw(raw)?;
        Ok(std::sync::Arc::new(GptOss::load_placed(cfg, arch, catalog, backend, placement)?))
    },
    dims,
    scratch_bytes: |raw, rows, seqs| Ok(scratch_bytes(&GptOssConfig::from_raw(raw)?, rows, seqs)),
    expert_work_bytes: |raw, catalog| {
        let c = GptOssConfig::from_raw(raw)?;
        let layers: Vec<usize> = (0..c.n_layers).collect();
        let hi = (c.hidden_size, c.intermediate_size);
        crate::registry::expert_work_bytes(catalog, &tensors::EXPERTS, &layers, c.n_experts, hi)
    },
    role: |suffix| crate::common::tensors::role_of(&tensors::LAYER, Some(tensors::EXPERTS.prefix), suffix),
    uses: |name| {
        crate::common::tensors::is_used(&tensors::GLOBAL, &tensors::LAYER, Some(tensors::EXPERTS.prefix), name)
    },
};

fn dims(raw: &crate::config::RawConfig) -> crate::Result<crate::registry::Dims> {
    Ok(dims_of(&GptOssConfig::from_raw(raw)?))
}

/// The config's sizes, as the registry and the model's info see them.
pub(crate) fn dims_of(c: &GptOssConfig) -> crate::registry::Dims {
    let kvd = c.n_kv_heads * c.head_dim;
    let n_sliding = c.sliding_layers();
    crate::registry::Dims {
        n_layers: c.n_layers,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        vocab_size: c.vocab_size,
        max_positions: c.max_positions,
        kv_dim: kvd,
        q_dim: c.n_heads * c.head_dim,
        kv_layers: c.n_layers,
        sliding_kv: (n_sliding > 0).then_some(((2 * n_sliding * kvd) as u64, n_sliding, c.sliding_window)),
        moe: Some((c.n_experts, c.experts_per_token, c.n_layers)),
        layer_groups: 1,
    }
}

//! Gemma 3 text (`Gemma3ForCausalLM`, docs/models.md §8.2): sliding-window layers with a local
//! RoPE between full ones with a global (optionally linearly scaled) RoPE, per-head q/k norms,
//! zero-centred pre- and post-norms around attention and MLP, a GELU(tanh) gated MLP, embeddings
//! scaled by √hidden, `query_pre_attn_scalar`, optional final logit softcapping, a tied head; and
//! the text part of `Gemma3ForConditionalGeneration` checkpoints ([`WRAPPER`]).

mod conditional;
mod config;
mod forward;
pub mod tensors;

pub use conditional::WRAPPER;
pub use config::{Gemma3Config, LayerKind};
pub use forward::{Gemma3, scratch_bytes};

/// The registry's entry for this family.
pub const FAMILY: crate::registry::Family = crate::registry::Family {
    architectures: &["Gemma3ForCausalLM", "gemma3_text"],
    load: |raw, arch, catalog, backend, placement| {
        let cfg = Gemma3Config::from_raw(raw)?;
        Ok(std::sync::Arc::new(Gemma3::load_placed(cfg, arch, catalog, backend, placement)?))
    },
    dims,
    scratch_bytes: |raw, rows, seqs| Ok(scratch_bytes(&Gemma3Config::from_raw(raw)?, rows, seqs)),
    expert_work_bytes: |_, _| Ok(0),
    role: |suffix| crate::common::tensors::role_of(&tensors::LAYER, None, suffix),
    uses: |name| crate::common::tensors::is_used(&tensors::GLOBAL, &tensors::LAYER, None, name),
};

fn dims(raw: &crate::config::RawConfig) -> crate::Result<crate::registry::Dims> {
    Ok(dims_of(&Gemma3Config::from_raw(raw)?))
}

/// The config's sizes, as the registry and the model's info see them.
pub(crate) fn dims_of(c: &Gemma3Config) -> crate::registry::Dims {
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
        moe: None,
        layer_groups: 1,
    }
}

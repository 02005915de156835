//! Qwen3-Next config.json keys (docs/models.md §4.1).

use crate::Result;
use crate::common::rope::RopeScaling;
use crate::config::RawConfig;

/// The token mixer of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mixer {
    /// Gated DeltaNet (linear attention with a fixed-size state).
    Linear,
    /// Gated full attention with a KV cache.
    Full,
}

/// The hyper-parameters of a Qwen3-Next checkpoint.
#[derive(Debug, Clone)]
pub struct Qwen3NextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub mixers: Vec<Mixer>,
    pub rms_norm_eps: f32,
    pub max_positions: usize,
    pub tie_word_embeddings: bool,
    // Gated full attention.
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Rotated dims per head (head_dim · partial_rotary_factor).
    pub rotary_dims: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    // Gated DeltaNet.
    pub linear_k_heads: usize,
    pub linear_v_heads: usize,
    pub linear_k_dim: usize,
    pub linear_v_dim: usize,
    pub conv_kernel: usize,
    // MLPs.
    pub n_experts: usize,
    pub experts_per_token: usize,
    pub norm_topk_prob: bool,
    pub moe_intermediate_size: usize,
    pub shared_intermediate_size: usize,
    /// Width of the dense MLP of layers that are not MoE.
    pub intermediate_size: usize,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl Qwen3NextConfig {
    pub fn from_raw(c: &RawConfig) -> Result<Self> {
        let hidden_size = c.usize("hidden_size")?;
        let n_layers = c.usize("num_hidden_layers")?;
        let (n_heads, n_kv_heads) = c.attention_heads()?;
        let head_dim = c.head_dim(hidden_size, n_heads)?;
        let mixers = match c.get("layer_types") {
            Some(v) => {
                let list = v.as_array().ok_or_else(|| c.err("layer_types", "expected a list of strings"))?;
                if list.len() != n_layers {
                    return Err(c.err("layer_types", format!("{} entries for {n_layers} layers", list.len())));
                }
                list.iter()
                    .map(|t| match t.as_str() {
                        Some("linear_attention") => Ok(Mixer::Linear),
                        Some("full_attention") => Ok(Mixer::Full),
                        _ => Err(c.err("layer_types", format!("{t} is not 'linear_attention' or 'full_attention'"))),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            None => {
                let every = c.opt_usize("full_attention_interval")?.unwrap_or(4);
                if every == 0 {
                    return Err(c.err("full_attention_interval", "must be positive"));
                }
                (0..n_layers).map(|i| if (i + 1) % every == 0 { Mixer::Full } else { Mixer::Linear }).collect()
            }
        };
        let max_positions = c.max_positions()?;
        let (rope_theta, rope_scaling) = c.rope(10_000.0, max_positions)?;
        let factor = match c.get("rope_parameters").and_then(|p| p.get("partial_rotary_factor")) {
            Some(v) => v.as_f64().ok_or_else(|| c.err("rope_parameters.partial_rotary_factor", "expected a number"))?,
            None => c.opt_f64("partial_rotary_factor")?.unwrap_or(0.25),
        };
        let rotary_dims = (head_dim as f64 * factor) as usize;
        if rotary_dims == 0 || !rotary_dims.is_multiple_of(2) || rotary_dims > head_dim {
            return Err(c.err(
                "partial_rotary_factor",
                format!(
                    "{factor} of head_dim {head_dim} gives {rotary_dims} rotary dims; it must be even and positive"
                ),
            ));
        }
        let linear_k_heads = c.usize("linear_num_key_heads")?;
        let linear_v_heads = c.usize("linear_num_value_heads")?;
        if linear_k_heads == 0 || linear_v_heads % linear_k_heads != 0 {
            return Err(c.err(
                "linear_num_value_heads",
                format!("{linear_v_heads} is not a multiple of linear_num_key_heads {linear_k_heads}"),
            ));
        }
        let n_experts = c.opt_usize("num_experts")?.unwrap_or(0);
        let experts_per_token = c.opt_usize("num_experts_per_tok")?.unwrap_or(0);
        if n_experts > 0 && (experts_per_token == 0 || experts_per_token > n_experts) {
            return Err(c.err(
                "num_experts_per_tok",
                format!("{experts_per_token} must be between 1 and num_experts ({n_experts})"),
            ));
        }
        let mlp_only_layers = match c.get("mlp_only_layers") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .ok_or_else(|| c.err("mlp_only_layers", "expected a list of layer indices"))?
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| c.err("mlp_only_layers", format!("{x} is not an index")))
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let cfg = Self {
            vocab_size: c.usize("vocab_size")?,
            hidden_size,
            n_layers,
            mixers,
            rms_norm_eps: c.rms_norm_eps(1e-6)?,
            max_positions,
            tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
            n_heads,
            n_kv_heads,
            head_dim,
            rotary_dims,
            rope_theta,
            rope_scaling,
            linear_k_heads,
            linear_v_heads,
            linear_k_dim: c.usize("linear_key_head_dim")?,
            linear_v_dim: c.usize("linear_value_head_dim")?,
            conv_kernel: c.opt_usize("linear_conv_kernel_dim")?.unwrap_or(4),
            n_experts,
            experts_per_token,
            norm_topk_prob: c.bool_or("norm_topk_prob", true)?,
            moe_intermediate_size: c.opt_usize("moe_intermediate_size")?.unwrap_or(0),
            shared_intermediate_size: c.opt_usize("shared_expert_intermediate_size")?.unwrap_or(0),
            intermediate_size: c.opt_usize("intermediate_size")?.unwrap_or(0),
            decoder_sparse_step: c.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1),
            mlp_only_layers,
            bos_token_id: c.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: c.token_ids("eos_token_id")?,
        };
        for (field, v) in [
            ("vocab_size", cfg.vocab_size),
            ("hidden_size", hidden_size),
            ("num_hidden_layers", n_layers),
            ("linear_key_head_dim", cfg.linear_k_dim),
            ("linear_value_head_dim", cfg.linear_v_dim),
            ("linear_conv_kernel_dim", cfg.conv_kernel),
        ] {
            if v == 0 {
                return Err(c.err(field, "must be positive"));
            }
        }
        if (0..n_layers).any(|l| cfg.is_moe(l)) && (cfg.moe_intermediate_size == 0) {
            return Err(c.err("moe_intermediate_size", "must be positive for MoE layers"));
        }
        if (0..n_layers).any(|l| !cfg.is_moe(l)) && cfg.intermediate_size == 0 {
            return Err(c.err("intermediate_size", "must be positive for dense MLP layers (mlp_only_layers)"));
        }
        Ok(cfg)
    }

    /// Whether layer `l`'s MLP is the sparse MoE (else a dense MLP of `intermediate_size`).
    pub fn is_moe(&self, l: usize) -> bool {
        !self.mlp_only_layers.contains(&l) && self.n_experts > 0 && (l + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// The MoE layers, in order.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.n_layers).filter(|&l| self.is_moe(l)).collect()
    }

    /// How many layers are gated full attention (they keep a KV cache).
    pub fn attention_layers(&self) -> usize {
        self.mixers.iter().filter(|m| **m == Mixer::Full).count()
    }

    /// Layer `l`'s tensor layout (mixer × MLP kind), 0..4: layers of one layout stream through
    /// the same slots.
    pub fn layout(&self, l: usize) -> usize {
        2 * usize::from(self.mixers[l] == Mixer::Full) + usize::from(self.is_moe(l))
    }

    /// Value heads per key head (r).
    pub fn v_per_k(&self) -> usize {
        self.linear_v_heads / self.linear_k_heads
    }

    /// Channels of the short convolution: all q, all k, all v (2·Nk·dk + Nv·dv).
    pub fn conv_channels(&self) -> usize {
        2 * self.linear_k_heads * self.linear_k_dim + self.linear_v_heads * self.linear_v_dim
    }
}

//! Llama config.json keys (docs/models.md §2.1), and the dense Qwen variants that share the
//! Llama forward (§8): Qwen2 (q/k/v biases, o_proj without) and Qwen3 (q/k RMSNorm per head).

use crate::Result;
use crate::common::rope::RopeScaling;
use crate::config::RawConfig;

/// Which checkpoint layout of the Llama forward a config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `LlamaForCausalLM`: `attention_bias` covers q, k, v and o.
    Llama,
    /// `Qwen2ForCausalLM`: q, k and v always carry biases, o_proj none.
    Qwen2,
    /// `Qwen3ForCausalLM`: per-head RMSNorm of q and k before RoPE; `attention_bias` as Llama.
    Qwen3,
}

impl Variant {
    /// The variant an architecture string names (Llama for any other).
    pub fn of(architecture: &str) -> Self {
        match architecture {
            "Qwen2ForCausalLM" | "qwen2" => Variant::Qwen2,
            "Qwen3ForCausalLM" | "qwen3" => Variant::Qwen3,
            _ => Variant::Llama,
        }
    }
}

/// The hyper-parameters of a Llama checkpoint.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub variant: Variant,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub max_positions: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Biases on q, k and v.
    pub attention_bias: bool,
    /// A bias on o_proj (Llama and Qwen3: `attention_bias`; Qwen2: never).
    pub o_bias: bool,
    /// Per-head RMSNorm of q and k (`self_attn.{q,k}_norm.weight`, `[head_dim]`) before RoPE.
    pub qk_norm: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    pub fn from_raw(c: &RawConfig) -> Result<Self> {
        let variant = Variant::of(&c.architecture()?);
        // Qwen configs carry sliding-window keys; only the switched-off form is the Llama forward.
        if variant != Variant::Llama && c.bool_or("use_sliding_window", false)? {
            return Err(c.err(
                "use_sliding_window",
                "true is not supported for Qwen2/Qwen3 (every layer full attention); set it to false",
            ));
        }
        let hidden_size = c.usize("hidden_size")?;
        let (n_heads, n_kv_heads) = c.attention_heads()?;
        if let Some(act) = c.get("hidden_act").and_then(|v| v.as_str())
            && act != "silu"
        {
            return Err(c.err("hidden_act", format!("'{act}' is not supported (only silu)")));
        }
        let head_dim = c.head_dim(hidden_size, n_heads)?;
        if head_dim % 2 != 0 {
            return Err(c.err("head_dim", format!("{head_dim} must be even for RoPE")));
        }
        let max_positions = c.max_positions()?;
        let (rope_theta, rope_scaling) = c.rope(10000.0, max_positions)?;
        let attention_bias = match variant {
            Variant::Qwen2 => true,
            Variant::Llama | Variant::Qwen3 => c.bool_or("attention_bias", false)?,
        };
        let cfg = Self {
            variant,
            vocab_size: c.usize("vocab_size")?,
            hidden_size,
            intermediate_size: c.usize("intermediate_size")?,
            n_layers: c.usize("num_hidden_layers")?,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps: c.rms_norm_eps(1e-6)?,
            max_positions,
            rope_theta,
            rope_scaling,
            attention_bias,
            o_bias: attention_bias && variant != Variant::Qwen2,
            qk_norm: variant == Variant::Qwen3,
            mlp_bias: c.bool_or("mlp_bias", false)?,
            tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
            bos_token_id: c.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: c.token_ids("eos_token_id")?,
        };
        for (field, v) in
            [("vocab_size", cfg.vocab_size), ("hidden_size", hidden_size), ("num_hidden_layers", cfg.n_layers)]
        {
            if v == 0 {
                return Err(c.err(field, "must be positive"));
            }
        }
        Ok(cfg)
    }
}

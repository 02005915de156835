//! GPT-OSS config.json keys (docs/models.md §3.1).

use crate::Result;
use crate::common::rope::RopeScaling;
use crate::config::RawConfig;

/// Attention span of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Sees the last `sliding_window` positions (itself included).
    Sliding,
    Full,
}

/// The hyper-parameters of a GPT-OSS checkpoint.
#[derive(Debug, Clone)]
pub struct GptOssConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width I of each expert.
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_experts: usize,
    pub experts_per_token: usize,
    pub sliding_window: usize,
    pub layer_kinds: Vec<LayerKind>,
    pub rms_norm_eps: f32,
    pub max_positions: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    /// The SwiGLU clamp (`swiglu_limit`, 7.0); alpha is fixed at [`SWIGLU_ALPHA`].
    pub swiglu_limit: f32,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The expert activation's sigmoid slope, hard-coded in transformers (docs/models.md §3.3).
pub const SWIGLU_ALPHA: f32 = 1.702;

impl GptOssConfig {
    pub fn from_raw(c: &RawConfig) -> Result<Self> {
        let hidden_size = c.usize("hidden_size")?;
        let n_layers = c.usize("num_hidden_layers")?;
        let (n_heads, n_kv_heads) = c.attention_heads()?;
        let head_dim = c.head_dim(hidden_size, n_heads)?;
        if head_dim % 2 != 0 {
            return Err(c.err("head_dim", format!("{head_dim} must be even for RoPE")));
        }
        let n_experts = match c.opt_usize("num_local_experts")? {
            Some(e) => e,
            None => c.usize("num_experts")?,
        };
        let experts_per_token = match c.opt_usize("num_experts_per_tok")? {
            Some(k) => k,
            None => c.usize("experts_per_token")?,
        };
        if experts_per_token == 0 || experts_per_token > n_experts {
            return Err(c.err(
                "num_experts_per_tok",
                format!("{experts_per_token} must be between 1 and num_local_experts ({n_experts})"),
            ));
        }
        let sliding_window = c.opt_usize("sliding_window")?.unwrap_or(128);
        if sliding_window == 0 || sliding_window > (1 << 30) {
            return Err(c.err("sliding_window", format!("{sliding_window} must be between 1 and 2^30")));
        }
        let layer_kinds = match c.get("layer_types") {
            None => (0..n_layers).map(|i| if i % 2 == 0 { LayerKind::Sliding } else { LayerKind::Full }).collect(),
            Some(v) => {
                let list = v.as_array().ok_or_else(|| c.err("layer_types", "expected a list of strings"))?;
                if list.len() != n_layers {
                    return Err(c.err("layer_types", format!("{} entries for {n_layers} layers", list.len())));
                }
                list.iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(LayerKind::Sliding),
                        Some("full_attention" | "attention") => Ok(LayerKind::Full),
                        _ => Err(c.err("layer_types", format!("{t} is not 'sliding_attention' or 'full_attention'"))),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let max_positions = c.max_positions()?;
        let (rope_theta, rope_scaling) = c.rope(150_000.0, max_positions)?;
        let cfg = Self {
            vocab_size: c.usize("vocab_size")?,
            hidden_size,
            intermediate_size: c.usize("intermediate_size")?,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            n_experts,
            experts_per_token,
            sliding_window,
            layer_kinds,
            rms_norm_eps: c.rms_norm_eps(1e-5)?,
            max_positions,
            rope_theta,
            rope_scaling,
            attention_bias: c.bool_or("attention_bias", true)?,
            tie_word_embeddings: c.bool_or("tie_word_embeddings", false)?,
            swiglu_limit: c.opt_f64("swiglu_limit")?.unwrap_or(7.0) as f32,
            bos_token_id: c.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: c.token_ids("eos_token_id")?,
        };
        for (field, v) in [
            ("vocab_size", cfg.vocab_size),
            ("hidden_size", hidden_size),
            ("num_hidden_layers", n_layers),
            ("intermediate_size", cfg.intermediate_size),
        ] {
            if v == 0 {
                return Err(c.err(field, "must be positive"));
            }
        }
        Ok(cfg)
    }

    /// The window of layer `l` (None: full causal).
    pub fn window(&self, l: usize) -> Option<usize> {
        (self.layer_kinds.get(l) == Some(&LayerKind::Sliding)).then_some(self.sliding_window)
    }

    /// How many layers attend over a sliding window (the model's info and the planner count them).
    pub fn sliding_layers(&self) -> usize {
        (0..self.n_layers).filter(|&l| self.window(l).is_some()).count()
    }
}

//! Gemma 3 config.json keys (docs/models.md §8.2), in both spellings: the hub's
//! (`rope_theta`, `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`) and
//! transformers 5's (`rope_parameters` per layer type, `layer_types`).

use serde_json::Value;

use crate::common::rope::RopeScaling;
use crate::config::RawConfig;
use crate::{ModelError, Result};

/// The attention of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Sees the last `sliding_window` positions (itself included), local RoPE.
    Sliding,
    /// Full causal attention, global RoPE.
    Full,
}

/// The hyper-parameters of a Gemma 3 text checkpoint.
#[derive(Debug, Clone)]
pub struct Gemma3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub max_positions: usize,
    /// RoPE of the full-attention layers (θ and scaling).
    pub rope_global: (f64, RopeScaling),
    /// RoPE of the sliding-window layers.
    pub rope_local: (f64, RopeScaling),
    pub sliding_window: usize,
    pub layer_kinds: Vec<LayerKind>,
    /// q·k is scaled by `query_pre_attn_scalar^-1/2` (not head_dim's).
    pub query_pre_attn_scalar: f64,
    /// `cap · tanh(logits / cap)` on the final logits when set.
    pub final_logit_softcapping: Option<f32>,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl Gemma3Config {
    pub fn from_raw(c: &RawConfig) -> Result<Self> {
        let hidden_size = c.usize("hidden_size")?;
        let n_layers = c.usize("num_hidden_layers")?;
        let (n_heads, n_kv_heads) = c.attention_heads()?;
        let act = c.get("hidden_activation").or_else(|| c.get("hidden_act")).and_then(|v| v.as_str());
        if let Some(act) = act
            && act != "gelu_pytorch_tanh"
        {
            return Err(c.err("hidden_activation", format!("'{act}' is not supported (only gelu_pytorch_tanh)")));
        }
        if c.opt_f64("attn_logit_softcapping")?.is_some() {
            return Err(c.err(
                "attn_logit_softcapping",
                "attention softcapping is not supported (Gemma 3 checkpoints leave it null); set it to null",
            ));
        }
        if c.bool_or("use_bidirectional_attention", false)? {
            return Err(c.err("use_bidirectional_attention", "only causal attention is supported; set it to false"));
        }
        let head_dim = c.opt_usize("head_dim")?.unwrap_or(256);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(c.err("head_dim", format!("{head_dim} must be positive and even for RoPE")));
        }
        let sliding_window = c.opt_usize("sliding_window")?.unwrap_or(4096);
        if sliding_window == 0 {
            return Err(c.err("sliding_window", "must be positive"));
        }
        let layer_kinds = layer_kinds(c, n_layers)?;
        let max_positions = c.max_positions()?;
        let (rope_global, rope_local) = ropes(c, max_positions)?;
        let query_pre_attn_scalar = c.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0);
        if !(query_pre_attn_scalar > 0.0 && query_pre_attn_scalar.is_finite()) {
            return Err(c.err("query_pre_attn_scalar", format!("{query_pre_attn_scalar} must be a positive number")));
        }
        let final_logit_softcapping = match c.opt_f64("final_logit_softcapping")? {
            Some(v) if !(v > 0.0 && v.is_finite()) => {
                return Err(c.err("final_logit_softcapping", format!("{v} must be a positive number or null")));
            }
            v => v.map(|v| v as f32),
        };
        let cfg = Self {
            vocab_size: c.usize("vocab_size")?,
            hidden_size,
            intermediate_size: c.usize("intermediate_size")?,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps: c.rms_norm_eps(1e-6)?,
            max_positions,
            rope_global,
            rope_local,
            sliding_window,
            layer_kinds,
            query_pre_attn_scalar,
            final_logit_softcapping,
            attention_bias: c.bool_or("attention_bias", false)?,
            tie_word_embeddings: c.bool_or("tie_word_embeddings", true)?,
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

    /// How many layers attend over a sliding window.
    pub fn sliding_layers(&self) -> usize {
        self.layer_kinds.iter().filter(|k| **k == LayerKind::Sliding).count()
    }
}

/// `layer_types`, else every `sliding_window_pattern`-th layer (default 6) full, the others sliding.
fn layer_kinds(c: &RawConfig, n_layers: usize) -> Result<Vec<LayerKind>> {
    if let Some(v) = c.get("layer_types") {
        let list = v.as_array().ok_or_else(|| c.err("layer_types", "expected a list of strings"))?;
        if list.len() != n_layers {
            return Err(c.err("layer_types", format!("{} entries for {n_layers} layers", list.len())));
        }
        return list
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(LayerKind::Sliding),
                Some("full_attention") => Ok(LayerKind::Full),
                _ => Err(c.err("layer_types", format!("{t} is not 'sliding_attention' or 'full_attention'"))),
            })
            .collect();
    }
    let pattern = c.opt_usize("sliding_window_pattern")?.unwrap_or(6);
    if pattern == 0 {
        return Err(c.err("sliding_window_pattern", "must be positive"));
    }
    Ok((0..n_layers).map(|i| if (i + 1) % pattern == 0 { LayerKind::Full } else { LayerKind::Sliding }).collect())
}

/// (global, local) RoPE. transformers 5 writes `rope_parameters: {full_attention: {..},
/// sliding_attention: {..}}`; hub configs have `rope_theta` + `rope_scaling` (the global layers')
/// and `rope_local_base_freq` (the local layers', unscaled).
fn ropes(c: &RawConfig, max_positions: usize) -> Result<((f64, RopeScaling), (f64, RopeScaling))> {
    let per_type = c
        .get("rope_parameters")
        .and_then(Value::as_object)
        .filter(|m| m.contains_key("full_attention") || m.contains_key("sliding_attention"));
    match per_type {
        Some(m) => {
            // Each layer type's dict read as a one-dict config, so the shared rules apply to it.
            let sub = |key: &str, theta: f64| -> Result<(f64, RopeScaling)> {
                let mut json = serde_json::Map::new();
                if let Some(d) = m.get(key) {
                    json.insert("rope_parameters".into(), d.clone());
                }
                let one = RawConfig { path: c.path.clone(), json, section: c.section.clone() };
                let named = |field: String| field.replace("rope_parameters", &format!("rope_parameters.{key}"));
                one.rope(theta, max_positions).map_err(|e| match e {
                    ModelError::Config { path, field, detail } => {
                        ModelError::Config { path, field: named(field), detail }
                    }
                    ModelError::Unsupported { path, field, value, supported } => {
                        ModelError::Unsupported { path, field: named(field), value, supported }
                    }
                    e => e,
                })
            };
            Ok((sub("full_attention", 1_000_000.0)?, sub("sliding_attention", 10_000.0)?))
        }
        None => {
            let global = c.rope(1_000_000.0, max_positions)?;
            let local = c.opt_f64("rope_local_base_freq")?.unwrap_or(10_000.0);
            if !(local > 0.0 && local.is_finite()) {
                return Err(c.err("rope_local_base_freq", format!("{local} must be a positive finite number")));
            }
            Ok((global, (local, RopeScaling::Default)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: serde_json::Value) -> Result<Gemma3Config> {
        let mut v = serde_json::json!({
            "architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
            "vocab_size": 300, "max_position_embeddings": 256, "sliding_window": 8,
        });
        if let (Some(m), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            m.extend(e);
        }
        Gemma3Config::from_raw(&RawConfig::parse("config.json".into(), &v.to_string())?)
    }

    /// The hub spelling and transformers 5's give the same layers and RoPE.
    #[test]
    fn both_spellings_agree() {
        let hub = parse(serde_json::json!({
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window_pattern": 6,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        }))
        .expect("hub");
        let v5 = parse(serde_json::json!({
            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention",
                            "sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        }))
        .expect("v5");
        for c in [&hub, &v5] {
            assert_eq!(c.window(5), None);
            assert_eq!((c.window(0), c.window(6), c.sliding_layers()), (Some(8), Some(8), 6));
            assert_eq!(c.rope_global, (1e6, RopeScaling::Linear { factor: 8.0 }));
            assert_eq!(c.rope_local, (1e4, RopeScaling::Default));
        }
    }

    #[test]
    fn unsupported_or_absurd_values_are_refused_naming_the_field() {
        for (extra, field) in [
            (serde_json::json!({"attn_logit_softcapping": 50.0}), "attn_logit_softcapping"),
            (serde_json::json!({"final_logit_softcapping": -1.0}), "final_logit_softcapping"),
            (serde_json::json!({"rope_local_base_freq": 0.0}), "rope_local_base_freq"),
            (serde_json::json!({"hidden_activation": "relu"}), "hidden_activation"),
            (
                serde_json::json!({"rope_parameters": {"full_attention": {"rope_theta": -1.0}}}),
                "rope_parameters.full_attention.rope_theta",
            ),
        ] {
            let e = parse(extra).expect_err(field).to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}

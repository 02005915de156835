//! The hyper-parameters of a GGUF file, checked, and the HF config.json they become
//! (docs/models.md §2.1 keys; §7.1 GGUF keys, under the architecture's prefix: `llama.`,
//! `qwen2.`, `qwen3.` or `gemma3.`).

use serde_json::{Map, Value, json};

use super::metadata::Metadata;
use super::names::Arch;
use super::rope_scaling::Llama3Scaling;
use super::tokenizer::SpecialIds;
use crate::Result;

/// RoPE base when `rope.freq_base` is absent (llama.cpp's and HF's default for Llama).
const DEFAULT_ROPE_THETA: f64 = 10000.0;
/// Llama's RMSNorm epsilon when the file does not say (HF LlamaConfig's default).
const DEFAULT_RMS_NORM_EPS: f64 = 1e-6;

/// Most context positions accepted: 2^24, the bound ollm-models puts on max_position_embeddings
/// (RoPE angles come from the position as an f32, exact only up to 2^24).
const MAX_CONTEXT_LENGTH: usize = 1 << 24;

/// Gemma 3's local (sliding-window) RoPE base: llama.cpp and transformers both fix it at 10⁴
/// (GGUF files do not record it).
const GEMMA3_LOCAL_ROPE_THETA: f64 = 10000.0;
/// Gemma 3's layer pattern: every sixth layer full, the others sliding (llama.cpp fixes it too).
const GEMMA3_SLIDING_WINDOW_PATTERN: usize = 6;

/// The shapes of a llama-like model, from metadata. Counts, not bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaDims {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Gemma 3: `attention.sliding_window`.
    pub sliding_window: Option<usize>,
    /// Gemma 3: `rope.scaling.factor` when `rope.scaling.type` is linear (the global layers').
    pub rope_linear_factor: Option<f64>,
    /// Gemma 3: `final_logit_softcapping`, when the file has it.
    pub final_logit_softcapping: Option<f64>,
}

impl LlamaDims {
    /// Reads `llama.*`; `n_tokens` (the tokenizer's vocabulary) stands in for a missing
    /// `llama.vocab_size`.
    pub fn from_metadata(meta: &Metadata, n_tokens: usize) -> Result<Self> {
        Self::from_metadata_for(meta, Arch::Llama, n_tokens)
    }

    /// Reads `<arch>.*` (see [`LlamaDims::from_metadata`]).
    pub fn from_metadata_for(meta: &Metadata, arch: Arch, n_tokens: usize) -> Result<Self> {
        let prefix = arch.prefix();
        let k = |name: &str| format!("{prefix}.{name}");
        let hidden_size = meta.count(&k("embedding_length"))?;
        let n_heads = meta.count(&k("attention.head_count"))?;
        let n_kv_heads = meta.opt_count(&k("attention.head_count_kv"))?.unwrap_or(n_heads);
        if n_heads % n_kv_heads != 0 {
            return Err(
                meta.err(&k("attention.head_count_kv"), format!("{n_kv_heads} does not divide head_count {n_heads}"))
            );
        }
        let head_dim = head_dim(meta, prefix, hidden_size, n_heads)?;
        let vocab_size = meta.opt_count(&k("vocab_size"))?.unwrap_or(n_tokens);
        if n_tokens > vocab_size {
            return Err(
                meta.err(&k("vocab_size"), format!("{vocab_size} is smaller than the tokenizer's {n_tokens} tokens"))
            );
        }
        let context_length = meta.count(&k("context_length"))?;
        if context_length > MAX_CONTEXT_LENGTH {
            return Err(meta.err(
                &k("context_length"),
                format!("{context_length} is more than 2^24 = {MAX_CONTEXT_LENGTH} positions (corrupt file?)"),
            ));
        }
        // Zero, negative or non-finite values give NaN logits; refuse them here, naming the key.
        let positive = |key: String, default: f64| -> Result<f64> {
            let v = meta.opt_f64(&key)?.unwrap_or(default);
            if v > 0.0 && v.is_finite() && (v as f32) > 0.0 {
                Ok(v)
            } else {
                Err(meta.err(&key, format!("{v} must be a positive finite number (corrupt file?)")))
            }
        };
        let gemma = arch == Arch::Gemma3;
        let sliding_window = match meta.opt_count(&k("attention.sliding_window"))? {
            Some(0) => return Err(meta.err(&k("attention.sliding_window"), "must be positive (corrupt file?)")),
            w => w.filter(|_| gemma),
        };
        let rope_linear_factor = match meta.opt_str(&k("rope.scaling.type"))? {
            Some("linear") if gemma => Some(positive(k("rope.scaling.factor"), 1.0)?),
            Some("none") | None => None,
            Some(other) => {
                return Err(meta.err(&k("rope.scaling.type"), format!("'{other}' cannot be imported for {prefix}")));
            }
        };
        let final_logit_softcapping = match meta.opt_f64(&k("final_logit_softcapping"))? {
            Some(_) if gemma => Some(positive(k("final_logit_softcapping"), 1.0)?),
            _ => None,
        };
        Ok(Self {
            arch,
            sliding_window,
            rope_linear_factor,
            final_logit_softcapping,
            hidden_size,
            intermediate_size: meta.count(&k("feed_forward_length"))?,
            n_layers: meta.count(&k("block_count"))?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            context_length,
            rms_norm_eps: positive(k("attention.layer_norm_rms_epsilon"), DEFAULT_RMS_NORM_EPS)?,
            rope_theta: positive(k("rope.freq_base"), DEFAULT_ROPE_THETA)?,
        })
    }

    /// The HF shape `[out, in]` (or `[n]`) each llama weight must have; `None` for other names.
    /// `module` is the HF name without `model.layers.{l}.` / `model.` and without the suffix.
    pub fn expected_shape(&self, module: &str, is_bias: bool) -> Option<Vec<usize>> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim);
        let shape = match module {
            "embed_tokens" | "lm_head" => vec![v, h],
            "norm" | "input_layernorm" | "post_attention_layernorm" => vec![h],
            "pre_feedforward_layernorm" | "post_feedforward_layernorm" if self.arch == Arch::Gemma3 => vec![h],
            "self_attn.q_norm" | "self_attn.k_norm" if matches!(self.arch, Arch::Qwen3 | Arch::Gemma3) => {
                vec![self.head_dim]
            }
            "self_attn.q_proj" => vec![q, h],
            "self_attn.k_proj" | "self_attn.v_proj" => vec![kv, h],
            "self_attn.o_proj" => vec![h, q],
            "mlp.gate_proj" | "mlp.up_proj" => vec![i, h],
            "mlp.down_proj" => vec![h, i],
            _ => return None,
        };
        Some(if is_bias { vec![shape[0]] } else { shape })
    }
}

/// `attention.key_length` if present, else `rope.dimension_count`, else H/nh. When both keys
/// are present they must agree: a llama rotates every dimension of a head.
fn head_dim(meta: &Metadata, prefix: &str, hidden_size: usize, n_heads: usize) -> Result<usize> {
    let k = |name: &str| format!("{prefix}.{name}");
    let key_length = meta.opt_count(&k("attention.key_length"))?;
    let rope_dims = meta.opt_count(&k("rope.dimension_count"))?;
    let head_dim = match (key_length, rope_dims) {
        (Some(key), Some(r)) if key != r => {
            return Err(meta.err(
                &k("rope.dimension_count"),
                format!(
                    "{r} differs from attention.key_length {key}; partial rotary embeddings are not llama (unsupported)"
                ),
            ));
        }
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) if hidden_size.is_multiple_of(n_heads) => hidden_size / n_heads,
        (None, None) => {
            return Err(meta
                .err(&k("attention.head_count"), format!("{n_heads} does not divide embedding_length {hidden_size}")));
        }
    };
    if let Some(v) = meta.opt_count(&k("attention.value_length"))?.filter(|&v| v != head_dim) {
        return Err(
            meta.err(&k("attention.value_length"), format!("{v} differs from the head size {head_dim} (unsupported)"))
        );
    }
    if head_dim % 2 != 0 {
        return Err(meta.err(&k("rope.dimension_count"), format!("head size {head_dim} is odd; RoPE needs pairs")));
    }
    Ok(head_dim)
}

/// What config.json needs beyond the dims.
#[derive(Clone, Debug)]
pub struct ConfigExtras<'a> {
    pub special: &'a SpecialIds,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub rope_scaling: Option<&'a Llama3Scaling>,
}

/// config.json in the hub-era spelling (top-level `rope_theta` + `rope_scaling`, `torch_dtype`),
/// which both transformers 4.x and 5.x read.
pub fn config_json(d: &LlamaDims, x: &ConfigExtras<'_>) -> Value {
    let rope_scaling = x.rope_scaling.map_or(Value::Null, |s| {
        json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        })
    });
    let mut c = Map::new();
    let (architecture, model_type) = match d.arch {
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Arch::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Arch::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
    };
    c.insert("architectures".into(), json!([architecture]));
    c.insert("model_type".into(), json!(model_type));
    c.insert("vocab_size".into(), json!(d.vocab_size));
    c.insert("hidden_size".into(), json!(d.hidden_size));
    c.insert("intermediate_size".into(), json!(d.intermediate_size));
    c.insert("num_hidden_layers".into(), json!(d.n_layers));
    c.insert("num_attention_heads".into(), json!(d.n_heads));
    c.insert("num_key_value_heads".into(), json!(d.n_kv_heads));
    c.insert("head_dim".into(), json!(d.head_dim));
    c.insert("rms_norm_eps".into(), json!(d.rms_norm_eps));
    c.insert("rope_theta".into(), json!(d.rope_theta));
    c.insert("max_position_embeddings".into(), json!(d.context_length));
    match d.arch {
        Arch::Gemma3 => {
            c.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            let linear = d.rope_linear_factor.map(|f| json!({"rope_type": "linear", "factor": f}));
            c.insert("rope_scaling".into(), linear.unwrap_or(Value::Null));
            c.insert("rope_local_base_freq".into(), json!(GEMMA3_LOCAL_ROPE_THETA));
            c.insert("sliding_window".into(), json!(d.sliding_window));
            c.insert("sliding_window_pattern".into(), json!(GEMMA3_SLIDING_WINDOW_PATTERN));
            c.insert("query_pre_attn_scalar".into(), json!(gemma3_query_pre_attn_scalar(d)));
            c.insert("final_logit_softcapping".into(), json!(d.final_logit_softcapping));
            c.insert("attn_logit_softcapping".into(), Value::Null);
            c.insert("attention_bias".into(), json!(x.attention_bias));
        }
        Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => {
            c.insert("hidden_act".into(), json!("silu"));
            c.insert("rope_scaling".into(), rope_scaling);
            if d.arch != Arch::Qwen2 {
                c.insert("attention_bias".into(), json!(x.attention_bias));
            }
            if d.arch == Arch::Llama {
                c.insert("mlp_bias".into(), json!(x.mlp_bias));
            } else {
                c.insert("use_sliding_window".into(), json!(false));
            }
        }
    }
    c.insert("tie_word_embeddings".into(), json!(x.tie_word_embeddings));
    let ids = [("bos_token_id", x.special.bos), ("eos_token_id", x.special.eos), ("pad_token_id", x.special.pad)];
    for (key, id) in ids {
        if let Some(id) = id {
            c.insert(key.into(), json!(id));
        }
    }
    c.insert("torch_dtype".into(), json!("bfloat16"));
    Value::Object(c)
}

/// Gemma 3 scales q·k by `query_pre_attn_scalar^-1/2`, which GGUF files do not record: the
/// head size for every release but the 27B (62 layers of 5,376), whose scalar is hidden/heads
/// (168), as llama.cpp decides.
fn gemma3_query_pre_attn_scalar(d: &LlamaDims) -> usize {
    if d.n_layers == 62 && d.hidden_size == 5376 { d.hidden_size / d.n_heads } else { d.head_dim }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::super::metadata::MetaValue;
    use super::*;

    fn meta(pairs: &[(&str, MetaValue)]) -> Metadata {
        let mut m = BTreeMap::new();
        for (k, v) in [
            ("llama.embedding_length", MetaValue::U32(64)),
            ("llama.feed_forward_length", MetaValue::U32(96)),
            ("llama.block_count", MetaValue::U32(2)),
            ("llama.attention.head_count", MetaValue::U32(4)),
            ("llama.context_length", MetaValue::U32(256)),
        ] {
            m.insert(k.to_string(), v);
        }
        for (k, v) in pairs {
            m.insert(k.to_string(), v.clone());
        }
        Metadata::new(Path::new("c.gguf"), m)
    }

    #[test]
    fn defaults_and_derived_values() {
        let d = LlamaDims::from_metadata(&meta(&[]), 100).expect("dims");
        assert_eq!((d.n_kv_heads, d.head_dim, d.vocab_size), (4, 16, 100));
        assert_eq!((d.rope_theta, d.rms_norm_eps), (10000.0, 1e-6));
        assert_eq!(d.expected_shape("self_attn.o_proj", false), Some(vec![64, 64]));
        assert_eq!(d.expected_shape("mlp.down_proj", false), Some(vec![64, 96]));
        assert_eq!(d.expected_shape("self_attn.q_proj", true), Some(vec![64]));
    }

    #[test]
    fn explicit_head_dim_and_gqa() {
        let m = meta(&[
            ("llama.attention.head_count_kv", MetaValue::U32(2)),
            ("llama.rope.dimension_count", MetaValue::U32(32)),
            ("llama.rope.freq_base", MetaValue::F32(500000.0)),
            ("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5)),
            ("llama.vocab_size", MetaValue::U32(128)),
        ]);
        let d = LlamaDims::from_metadata(&m, 100).expect("dims");
        assert_eq!((d.head_dim, d.vocab_size, d.rope_theta, d.rms_norm_eps), (32, 128, 500000.0, 1e-5));
        assert_eq!(d.expected_shape("self_attn.k_proj", false), Some(vec![64, 64]));
        let special = SpecialIds { bos: Some(1), eos: Some(2), ..Default::default() };
        let x = ConfigExtras {
            special: &special,
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            rope_scaling: None,
        };
        let c = config_json(&d, &x);
        assert_eq!(c["head_dim"], json!(32));
        assert_eq!(c["rms_norm_eps"], json!(1e-5));
        assert_eq!(c["rope_scaling"], Value::Null);
        assert_eq!((c["bos_token_id"].clone(), c["eos_token_id"].clone()), (json!(1), json!(2)));
        assert!(c.get("pad_token_id").is_none());
    }

    #[test]
    fn inconsistent_metadata_is_rejected() {
        let bad_kv = meta(&[("llama.attention.head_count_kv", MetaValue::U32(3))]);
        assert!(LlamaDims::from_metadata(&bad_kv, 10).expect_err("gqa").to_string().contains("does not divide"));
        let partial = meta(&[
            ("llama.attention.key_length", MetaValue::U32(16)),
            ("llama.rope.dimension_count", MetaValue::U32(8)),
        ]);
        assert!(LlamaDims::from_metadata(&partial, 10).expect_err("partial").to_string().contains("partial rotary"));
        let small_vocab = meta(&[("llama.vocab_size", MetaValue::U32(5))]);
        assert!(LlamaDims::from_metadata(&small_vocab, 10).is_err());
        let mut no_ctx = meta(&[]);
        no_ctx = Metadata::new(
            Path::new("c.gguf"),
            no_ctx.iter().filter(|(k, _)| *k != "llama.context_length").map(|(k, v)| (k.clone(), v.clone())).collect(),
        );
        assert!(LlamaDims::from_metadata(&no_ctx, 10).expect_err("ctx").to_string().contains("context_length"));
    }

    /// A freq_base or epsilon of 0 or below once imported into a model with all-NaN logits; a
    /// context of 2^62 once sized RoPE tables past any memory.
    #[test]
    fn hostile_numbers_are_refused_naming_the_key() {
        for (key, v, needle) in [
            ("llama.rope.freq_base", MetaValue::F32(0.0), "positive"),
            ("llama.rope.freq_base", MetaValue::F32(-1.0), "positive"),
            ("llama.rope.freq_base", MetaValue::F32(f32::NAN), "positive"),
            ("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(-1.0), "positive"),
            ("llama.attention.layer_norm_rms_epsilon", MetaValue::F64(1e-60), "positive"),
            ("llama.context_length", MetaValue::U64(1 << 62), "2^24"),
            ("llama.context_length", MetaValue::U32(1_000_000_000), "2^24"),
        ] {
            let err = LlamaDims::from_metadata(&meta(&[(key, v.clone())]), 10).expect_err(key).to_string();
            assert!(err.contains(&format!("'{key}'")) && err.contains(needle) && !err.contains('\n'), "{err}");
        }
    }
}

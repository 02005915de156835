//! The text part of `Gemma3ForConditionalGeneration` checkpoints (gemma-3-4b-it, gemma-3-12b-it):
//! the Gemma 3 text model with its settings under `text_config` and its tensors under
//! `language_model.model.` / `language_model.lm_head.` (transformers before 4.52, and what
//! transformers 5 writes again) or `model.language_model.` / `lm_head.` (4.52 up to 5). The vision
//! tower (`vision_tower.`, `model.vision_tower.`) and the projector (`multi_modal_projector.`,
//! `model.multi_modal_projector.`) are not the text model's: they are dropped by name with every
//! other tensor the family does not read.

use serde_json::{Map, Value, json};

/// The registry's entry: the wrapper and the family that runs its text part.
pub const WRAPPER: crate::registry::Wrapper = crate::registry::Wrapper {
    architectures: &["Gemma3ForConditionalGeneration", "gemma3"],
    family: &super::FAMILY,
    section: "text_config",
    text_defaults,
    from_top,
    renames: &[
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("model.language_model.", "model."),
    ],
};

/// transformers' `Gemma3TextConfig` defaults for the fields a `text_config` may omit (hub
/// configs give only what differs: gemma-3-4b-it lists six fields). The RoPE and layer-type
/// defaults are the family's own (`rope_theta` 1e6, `rope_local_base_freq` 1e4, every sixth
/// layer full).
fn text_defaults() -> Map<String, Value> {
    let v = json!({
        "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "attention_bias": false,
        "query_pre_attn_scalar": 256, "sliding_window": 4096,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// What the whole model decides over `text_config`: whether the head is the embedding (the
/// top-level `tie_word_embeddings`, true when absent: transformers ties by it and ignores the
/// text config's), the final logit softcapping (none: transformers' `Gemma3ForConditionalGeneration`
/// head applies none, whatever `text_config.final_logit_softcapping` says; the golden case
/// gemma3_mm_v452 sets it to 3.0 and matches transformers only without it) and the token ids it
/// lists (gemma-3-4b-it's `eos_token_id` [1, 106] ends a chat turn too).
fn from_top() -> Vec<(&'static str, Option<Value>)> {
    vec![
        ("tie_word_embeddings", Some(Value::Bool(true))),
        ("final_logit_softcapping", Some(Value::Null)),
        ("eos_token_id", None),
        ("bos_token_id", None),
        ("pad_token_id", None),
    ]
}

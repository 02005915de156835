//! Tensor names of a Llama checkpoint (models.md §2.2).

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// `model.layers.{l}.{suffix}`
pub fn layer(l: usize, suffix: &str) -> String {
    format!("model.layers.{l}.{suffix}")
}

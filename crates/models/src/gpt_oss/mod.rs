//! GPT-OSS (`GptOssForCausalLM`, models.md §3): attention with per-head sinks, sliding-window
//! layers alternating with full ones, q/k/v/o biases, YaRN RoPE; a top-k MoE whose experts
//! (MXFP4 or dense) go through the expert cache.

mod config;
mod forward;

pub use config::{GptOssConfig, LayerKind, SWIGLU_ALPHA};
pub use forward::{EXPERT_ROWS, GptOss, MOE_CHUNK, scratch_bytes};

//! Helpers the model integration tests share.

use std::path::{Path, PathBuf};

use ollm_models::synth::{Like, plan_gemma3, plan_llama, write_plan};

/// The GPU tests' gate, shared with ollm-ops's tests: CUDA device 0, or one SKIPPED line
/// saying what is missing (a failure under `OLLM_REQUIRE_GPU`).
#[allow(dead_code)]
#[path = "../../../ops/tests/common/gpu.rs"]
pub mod gpu;

/// A golden fixture's directory: next to the sources, or under the current directory when the
/// test binary was built elsewhere (the GPU machine runs it from the repository root).
#[allow(dead_code)]
pub fn golden_dir(case: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden").join(case);
    if built.exists() { built } else { PathBuf::from("fixtures/golden").join(case) }
}

/// The batched-forward script (batched.rs, batched_cuda.rs).
#[allow(dead_code)]
pub mod batch;

#[allow(dead_code)]
pub mod tree;

/// A synthesised Llama (random weights) small enough for CPU tests: 6 layers, hidden 64,
/// 4 query and 2 KV heads of 16 dims, a 300-token vocabulary.
#[allow(dead_code)]
pub fn tiny_model(dir: &Path) {
    let mut config = Like::Llama32_1B.config();
    for (k, v) in [("hidden_size", 64), ("intermediate_size", 160), ("num_attention_heads", 4), ("head_dim", 16)] {
        config[k] = v.into();
    }
    config["num_key_value_heads"] = 2.into();
    config["vocab_size"] = 300.into();
    let plan = plan_llama(config, Some(6)).expect("plan");
    write_plan(&plan, dir, 3, &mut |_, _| {}).expect("write");
}

/// A synthesised GPT-OSS (random weights, MXFP4 experts) small enough for CPU tests: 4 layers
/// alternating sliding (window `window`) and full attention, hidden 64, 8 query and 2 KV heads
/// of 16 dims, 8 experts (top 2), a 300-token vocabulary, a 4096-position context.
#[allow(dead_code)]
pub fn tiny_gpt_oss(dir: &Path, window: usize) {
    let mut config = Like::GptOss20B.config();
    for (k, v) in [
        ("hidden_size", 64),
        ("intermediate_size", 64),
        ("num_attention_heads", 8),
        ("num_key_value_heads", 2),
        ("head_dim", 16),
        ("num_local_experts", 8),
        ("num_experts_per_tok", 2),
        ("vocab_size", 300),
        ("max_position_embeddings", 4096),
        ("sliding_window", window),
    ] {
        config[k] = v.into();
    }
    let plan = ollm_models::synth::plan_gpt_oss(config, Some(4)).expect("plan");
    write_plan(&plan, dir, 5, &mut |_, _| {}).expect("write");
}

/// A synthesised Qwen3-Next (random weights) small enough for CPU tests: 8 layers (DeltaNet,
/// DeltaNet, DeltaNet, attention, twice), hidden 64, DeltaNet 2 key heads and 4 value heads of
/// 16 dims, attention 4 query and 2 KV heads of 32 dims, 8 experts (top 2) of 32, a 300-token
/// vocabulary, a 4096-position context.
#[allow(dead_code)]
pub fn tiny_qwen3_next(dir: &Path) {
    let mut config = Like::Qwen3Next80B.config();
    for (k, v) in [
        ("hidden_size", 64),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 2),
        ("head_dim", 32),
        ("linear_num_key_heads", 2),
        ("linear_num_value_heads", 4),
        ("linear_key_head_dim", 16),
        ("linear_value_head_dim", 16),
        ("num_experts", 8),
        ("num_experts_per_tok", 2),
        ("moe_intermediate_size", 32),
        ("shared_expert_intermediate_size", 32),
        ("vocab_size", 300),
        ("max_position_embeddings", 4096),
    ] {
        config[k] = v.into();
    }
    let plan = ollm_models::synth::plan_qwen3_next(config, Some(8)).expect("plan");
    write_plan(&plan, dir, 9, &mut |_, _| {}).expect("write");
}

/// A synthesised dense Qwen (`Qwen2ForCausalLM`: q/k/v biases; `Qwen3ForCausalLM`: q/k norms)
/// small enough for CPU tests: 3 layers, hidden 64, 4 query and 2 KV heads of 16 dims, a
/// 300-token vocabulary, a 4096-position context.
#[allow(dead_code)]
pub fn tiny_qwen(dir: &Path, architecture: &str) {
    let config = serde_json::json!({
        "architectures": [architecture], "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 300, "max_position_embeddings": 4096, "rope_theta": 1000000.0,
        "tie_word_embeddings": true, "use_sliding_window": false, "eos_token_id": 2,
    });
    let plan = plan_llama(config, None).expect("plan");
    write_plan(&plan, dir, 11, &mut |_, _| {}).expect("write");
}

/// A synthesised Gemma 3 text model small enough for CPU tests: 4 layers (sliding, sliding,
/// full, sliding; window `window`), hidden 64, 4 query and 1 KV head of 32 dims, a 300-token
/// vocabulary, a 4096-position context, final logit softcapping 30.
#[allow(dead_code)]
pub fn tiny_gemma3(dir: &Path, window: usize) {
    let config = serde_json::json!({
        "architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
        "vocab_size": 300, "max_position_embeddings": 4096, "sliding_window": window,
        "sliding_window_pattern": 3, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "query_pre_attn_scalar": 32,
        "final_logit_softcapping": 30.0, "eos_token_id": 1,
    });
    let plan = plan_gemma3(config, None).expect("plan");
    write_plan(&plan, dir, 13, &mut |_, _| {}).expect("write");
}

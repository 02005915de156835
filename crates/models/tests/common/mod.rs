//! Helpers the model integration tests share.

use std::path::Path;

use ollm_models::synth::{Like, plan_llama, write_plan};

/// A synthesised Llama (random weights) small enough for CPU tests: 6 layers, hidden 64,
/// 4 query and 2 KV heads of 16 dims, a 300-token vocabulary.
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

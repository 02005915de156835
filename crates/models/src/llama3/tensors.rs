//! The tensors of a Llama checkpoint (docs/models.md §2.2): every name, shape and role, once.
//! Loading, the streamed parts, `synth` and the byte counts read this table.

use ollm_weights::synth::Init;

use super::config::LlamaConfig;
use crate::common::tensors::{Dtype, Role, TensorSpec, always};

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

pub const INPUT_NORM: &str = "input_layernorm.weight";
pub const Q: &str = "self_attn.q_proj.weight";
pub const K: &str = "self_attn.k_proj.weight";
pub const V: &str = "self_attn.v_proj.weight";
pub const O: &str = "self_attn.o_proj.weight";
pub const POST_NORM: &str = "post_attention_layernorm.weight";
pub const GATE: &str = "mlp.gate_proj.weight";
pub const UP: &str = "mlp.up_proj.weight";
pub const DOWN: &str = "mlp.down_proj.weight";
pub const Q_BIAS: &str = "self_attn.q_proj.bias";
pub const K_BIAS: &str = "self_attn.k_proj.bias";
pub const V_BIAS: &str = "self_attn.v_proj.bias";
pub const O_BIAS: &str = "self_attn.o_proj.bias";
pub const GATE_BIAS: &str = "mlp.gate_proj.bias";
pub const UP_BIAS: &str = "mlp.up_proj.bias";
pub const DOWN_BIAS: &str = "mlp.down_proj.bias";
pub const Q_NORM: &str = "self_attn.q_norm.weight";
pub const K_NORM: &str = "self_attn.k_norm.weight";

/// Uniform(a) has standard deviation a/√3; 0.02·√3 gives the usual 0.02 initialisation.
const W: Init = Init::Uniform(0.02 * 1.732_050_8);

const fn row(
    name: &'static str,
    shape: fn(&LlamaConfig) -> Vec<usize>,
    when: fn(&LlamaConfig, usize) -> bool,
    init: Init,
) -> TensorSpec<LlamaConfig> {
    TensorSpec {
        name,
        shape,
        dtype: Dtype::Stored,
        when,
        optional: false,
        role: Role::Streamed,
        init,
        per_expert: false,
    }
}

fn h(c: &LlamaConfig) -> usize {
    c.hidden_size
}
fn qd(c: &LlamaConfig) -> usize {
    c.n_heads * c.head_dim
}
fn kvd(c: &LlamaConfig) -> usize {
    c.n_kv_heads * c.head_dim
}
fn attn_bias(c: &LlamaConfig, _: usize) -> bool {
    c.attention_bias
}
fn o_bias(c: &LlamaConfig, _: usize) -> bool {
    c.o_bias
}
fn qk_norm(c: &LlamaConfig, _: usize) -> bool {
    c.qk_norm
}
fn mlp_bias(c: &LlamaConfig, _: usize) -> bool {
    c.mlp_bias
}

/// The tensors outside the decoder layers, in file order. The head is read when the file has
/// it (an untied config whose file lacks it is tied too, docs/models.md §0); `synth` writes it for
/// untied configs.
pub const GLOBAL: [TensorSpec<LlamaConfig>; 3] = [
    TensorSpec {
        name: EMBED,
        shape: |c| vec![c.vocab_size, h(c)],
        dtype: Dtype::Stored,
        when: always,
        optional: false,
        role: Role::Resident,
        init: W,
        per_expert: false,
    },
    TensorSpec {
        name: FINAL_NORM,
        shape: |c| vec![h(c)],
        dtype: Dtype::Stored,
        when: always,
        optional: false,
        role: Role::Resident,
        init: Init::Const(1.0),
        per_expert: false,
    },
    TensorSpec {
        name: LM_HEAD,
        shape: |c| vec![c.vocab_size, h(c)],
        dtype: Dtype::Stored,
        when: |c, _| !c.tie_word_embeddings,
        optional: true,
        role: Role::Resident,
        init: W,
        per_expert: false,
    },
];

/// The tensors of each decoder layer (after `model.layers.{l}.`), in file order; all stream
/// with their layer.
pub const LAYER: [TensorSpec<LlamaConfig>; 18] = [
    row(INPUT_NORM, |c| vec![h(c)], always, Init::Const(1.0)),
    row(Q, |c| vec![qd(c), h(c)], always, W),
    row(K, |c| vec![kvd(c), h(c)], always, W),
    row(V, |c| vec![kvd(c), h(c)], always, W),
    row(O, |c| vec![h(c), qd(c)], always, W),
    row(POST_NORM, |c| vec![h(c)], always, Init::Const(1.0)),
    row(GATE, |c| vec![c.intermediate_size, h(c)], always, W),
    row(UP, |c| vec![c.intermediate_size, h(c)], always, W),
    row(DOWN, |c| vec![h(c), c.intermediate_size], always, W),
    row(Q_BIAS, |c| vec![qd(c)], attn_bias, W),
    row(K_BIAS, |c| vec![kvd(c)], attn_bias, W),
    row(V_BIAS, |c| vec![kvd(c)], attn_bias, W),
    row(O_BIAS, |c| vec![h(c)], o_bias, W),
    row(GATE_BIAS, |c| vec![c.intermediate_size], mlp_bias, W),
    row(UP_BIAS, |c| vec![c.intermediate_size], mlp_bias, W),
    row(DOWN_BIAS, |c| vec![h(c)], mlp_bias, W),
    row(Q_NORM, |c| vec![c.head_dim], qk_norm, Init::Const(1.0)),
    row(K_NORM, |c| vec![c.head_dim], qk_norm, Init::Const(1.0)),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tensors::{streamed, synth_groups};
    use crate::config::RawConfig;

    fn config(biases: bool, tied: bool) -> LlamaConfig {
        let text = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
            "max_position_embeddings": 128, "attention_bias": biases, "mlp_bias": biases,
            "tie_word_embeddings": tied,
        });
        LlamaConfig::from_raw(&RawConfig::parse("test".into(), &text.to_string()).expect("parse")).expect("config")
    }

    /// The table decides what streams and what `synth` writes: biases only where the config has
    /// them, the head only when untied.
    #[test]
    fn streamed_parts_and_synth_follow_the_config() {
        let plain = config(false, true);
        assert_eq!(streamed(&LAYER, &plain, 1), vec![INPUT_NORM, Q, K, V, O, POST_NORM, GATE, UP, DOWN]);
        let biased = config(true, false);
        let names = streamed(&LAYER, &biased, 0);
        assert_eq!(names.len(), 16);
        assert!(names.contains(&O_BIAS) && names.contains(&DOWN_BIAS));
        let groups = synth_groups(&biased, 2, (&GLOBAL[..1], &LAYER, &GLOBAL[1..]), None);
        assert_eq!(groups.len(), 4);
        assert_eq!(groups[1].len(), 16);
        let q = &groups[2][1].planned;
        assert_eq!((q.name.as_str(), q.shape.as_slice()), ("model.layers.1.self_attn.q_proj.weight", &[64, 64][..]));
        let last: Vec<&str> = groups[3].iter().map(|t| t.planned.name.as_str()).collect();
        assert_eq!(last, vec![FINAL_NORM, LM_HEAD]);
        let tied = synth_groups(&plain, 2, (&GLOBAL[..1], &LAYER, &GLOBAL[1..]), None);
        assert_eq!(tied[3].len(), 1, "a tied head is not written");
    }
}

//! The tensors of a GPT-OSS checkpoint (docs/models.md §3.2): every name, shape and role, once.
//! Loading, the streamed parts, the expert cache's sources, `synth` and the byte counts read it.

use ollm_weights::synth::Init;

use super::config::GptOssConfig;
use crate::common::experts::ExpertNames;
use crate::common::tensors::{Dtype, Role, TensorSpec, always};

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

pub const INPUT_NORM: &str = "input_layernorm.weight";
pub const Q: &str = "self_attn.q_proj.weight";
pub const Q_BIAS: &str = "self_attn.q_proj.bias";
pub const K: &str = "self_attn.k_proj.weight";
pub const K_BIAS: &str = "self_attn.k_proj.bias";
pub const V: &str = "self_attn.v_proj.weight";
pub const V_BIAS: &str = "self_attn.v_proj.bias";
pub const O: &str = "self_attn.o_proj.weight";
pub const O_BIAS: &str = "self_attn.o_proj.bias";
pub const SINKS: &str = "self_attn.sinks";
pub const POST_NORM: &str = "post_attention_layernorm.weight";
pub const ROUTER: &str = "mlp.router.weight";
pub const ROUTER_BIAS: &str = "mlp.router.bias";

/// Where a layer's experts are named (`mlp.experts.{part}`), and their parts in the expert
/// cache's slot order: MXFP4 (the release checkpoints) or dense (as transformers saves them).
pub const EXPERTS: ExpertNames = ExpertNames {
    prefix: "mlp.experts.",
    mxfp4: Some([
        "gate_up_proj_blocks",
        "gate_up_proj_scales",
        "down_proj_blocks",
        "down_proj_scales",
        "gate_up_proj_bias",
        "down_proj_bias",
    ]),
    dense: Some(["gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"]),
    per_expert: None,
};
const GATE_UP_BLOCKS: &str = "mlp.experts.gate_up_proj_blocks";
const GATE_UP_SCALES: &str = "mlp.experts.gate_up_proj_scales";
const GATE_UP_BIAS: &str = "mlp.experts.gate_up_proj_bias";
const DOWN_BLOCKS: &str = "mlp.experts.down_proj_blocks";
const DOWN_SCALES: &str = "mlp.experts.down_proj_scales";
const DOWN_BIAS: &str = "mlp.experts.down_proj_bias";

/// Uniform(a) has standard deviation a/√3; 0.02·√3 gives the usual 0.02 initialisation.
const W: Init = Init::Uniform(0.02 * 1.732_050_8);

const fn row(
    name: &'static str,
    shape: fn(&GptOssConfig) -> Vec<usize>,
    (dtype, role): (Dtype, Role),
    when: fn(&GptOssConfig, usize) -> bool,
    init: Init,
) -> TensorSpec<GptOssConfig> {
    TensorSpec { name, shape, dtype, when, optional: false, role, init, per_expert: false }
}

const STREAMED: (Dtype, Role) = (Dtype::Stored, Role::Streamed);
/// Sinks and router stay on the device in f32 (a few hundred KiB a layer): f32 router logits
/// keep expert choices with an f32 reference where a bf16 product would flip them.
const RESIDENT_F32: (Dtype, Role) = (Dtype::F32, Role::Resident);

fn h(c: &GptOssConfig) -> usize {
    c.hidden_size
}
fn qd(c: &GptOssConfig) -> usize {
    c.n_heads * c.head_dim
}
fn kvd(c: &GptOssConfig) -> usize {
    c.n_kv_heads * c.head_dim
}
fn biased(c: &GptOssConfig, _: usize) -> bool {
    c.attention_bias
}

/// The tensors outside the decoder layers, in file order. The head is read when the file has it.
pub const GLOBAL: [TensorSpec<GptOssConfig>; 3] = [
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
        when: always,
        optional: true,
        role: Role::Resident,
        init: W,
        per_expert: false,
    },
];

/// The tensors of each decoder layer (after `model.layers.{l}.`), in file order, the experts
/// as `synth` writes them (MXFP4: random FP4 codes under one scale, 2^-7, so expert weights have
/// a spread like the others' 0.02).
pub const LAYER: [TensorSpec<GptOssConfig>; 19] = [
    row(INPUT_NORM, |c| vec![h(c)], STREAMED, always, Init::Const(1.0)),
    row(Q, |c| vec![qd(c), h(c)], STREAMED, always, W),
    row(Q_BIAS, |c| vec![qd(c)], STREAMED, biased, W),
    row(K, |c| vec![kvd(c), h(c)], STREAMED, always, W),
    row(K_BIAS, |c| vec![kvd(c)], STREAMED, biased, W),
    row(V, |c| vec![kvd(c), h(c)], STREAMED, always, W),
    row(V_BIAS, |c| vec![kvd(c)], STREAMED, biased, W),
    row(O, |c| vec![h(c), qd(c)], STREAMED, always, W),
    row(O_BIAS, |c| vec![h(c)], STREAMED, biased, W),
    row(SINKS, |c| vec![c.n_heads], RESIDENT_F32, always, W),
    row(POST_NORM, |c| vec![h(c)], STREAMED, always, Init::Const(1.0)),
    row(ROUTER, |c| vec![c.n_experts, h(c)], RESIDENT_F32, always, W),
    row(ROUTER_BIAS, |c| vec![c.n_experts], RESIDENT_F32, always, W),
    row(
        GATE_UP_BLOCKS,
        |c| vec![c.n_experts, 2 * c.intermediate_size, h(c) / 32, 16],
        (Dtype::U8, Role::Expert),
        always,
        Init::RandomBytes,
    ),
    row(
        GATE_UP_SCALES,
        |c| vec![c.n_experts, 2 * c.intermediate_size, h(c) / 32],
        (Dtype::U8, Role::Expert),
        always,
        Init::Byte(120),
    ),
    row(GATE_UP_BIAS, |c| vec![c.n_experts, 2 * c.intermediate_size], (Dtype::Stored, Role::Expert), always, W),
    row(
        DOWN_BLOCKS,
        |c| vec![c.n_experts, h(c), c.intermediate_size / 32, 16],
        (Dtype::U8, Role::Expert),
        always,
        Init::RandomBytes,
    ),
    row(
        DOWN_SCALES,
        |c| vec![c.n_experts, h(c), c.intermediate_size / 32],
        (Dtype::U8, Role::Expert),
        always,
        Init::Byte(120),
    ),
    row(DOWN_BIAS, |c| vec![c.n_experts, h(c)], (Dtype::Stored, Role::Expert), always, W),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::tensors::role_of;

    /// The planner's byte counts follow the table: sinks and router stay resident, experts go to
    /// the expert cache, the rest (a tensor the table does not know included) streams.
    #[test]
    fn layer_tensors_count_where_they_live() {
        let role = |suffix| role_of(&LAYER, Some(EXPERTS.prefix), suffix);
        assert_eq!(role(SINKS), Role::Resident);
        assert_eq!(role(ROUTER_BIAS), Role::Resident);
        assert_eq!(role(GATE_UP_BLOCKS), Role::Expert);
        assert_eq!(role("mlp.experts.gate_up_proj"), Role::Expert, "dense experts too");
        assert_eq!(role(Q), Role::Streamed);
        assert_eq!(role("self_attn.rotary_emb.inv_freq"), Role::Streamed);
    }

    /// synth writes the released config's list of modules kept in bf16, named from this table.
    #[test]
    fn the_synth_config_keeps_the_released_bf16_module_list() {
        let config = crate::synth::Like::GptOss20B.config();
        assert_eq!(
            config["quantization_config"]["modules_to_not_convert"],
            serde_json::json!([
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head"
            ])
        );
    }
}

//! The tensors of a Qwen3-Next checkpoint (docs/models.md §4.2): every name, shape and role, once.
//! Loading, the streamed parts, the expert cache's names, `synth` and the byte counts read it.

use ollm_weights::synth::Init;

use super::config::{Mixer, Qwen3NextConfig};
use crate::common::experts::ExpertNames;
use crate::common::tensors::{Dtype, Role, TensorSpec, always};

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

pub const INPUT_NORM: &str = "input_layernorm.weight";
pub const POST_NORM: &str = "post_attention_layernorm.weight";
pub const Q: &str = "self_attn.q_proj.weight";
pub const K: &str = "self_attn.k_proj.weight";
pub const V: &str = "self_attn.v_proj.weight";
pub const O: &str = "self_attn.o_proj.weight";
pub const Q_NORM: &str = "self_attn.q_norm.weight";
pub const K_NORM: &str = "self_attn.k_norm.weight";
pub const QKVZ: &str = "linear_attn.in_proj_qkvz.weight";
pub const BA: &str = "linear_attn.in_proj_ba.weight";
pub const CONV: &str = "linear_attn.conv1d.weight";
pub const DT_BIAS: &str = "linear_attn.dt_bias";
pub const A_LOG: &str = "linear_attn.A_log";
pub const LIN_NORM: &str = "linear_attn.norm.weight";
pub const LIN_OUT: &str = "linear_attn.out_proj.weight";
pub const ROUTER: &str = "mlp.gate.weight";
pub const SHARED_GATE_PROJ: &str = "mlp.shared_expert.gate_proj.weight";
pub const SHARED_UP_PROJ: &str = "mlp.shared_expert.up_proj.weight";
pub const SHARED_DOWN_PROJ: &str = "mlp.shared_expert.down_proj.weight";
pub const SHARED_GATE: &str = "mlp.shared_expert_gate.weight";
pub const DENSE_GATE: &str = "mlp.gate_proj.weight";
pub const DENSE_UP: &str = "mlp.up_proj.weight";
pub const DENSE_DOWN: &str = "mlp.down_proj.weight";

const EXPERT_GATE: &str = "gate_proj.weight";
const EXPERT_UP: &str = "up_proj.weight";
const EXPERT_DOWN: &str = "down_proj.weight";

/// Where a layer's routed experts are named: one tensor per expert and matrix,
/// `mlp.experts.{e}.{gate,up,down}_proj.weight`, already in nn.Linear layout; no biases.
pub const EXPERTS: ExpertNames = ExpertNames {
    prefix: "mlp.experts.",
    mxfp4: None,
    dense: None,
    per_expert: Some([EXPERT_GATE, EXPERT_UP, EXPERT_DOWN]),
};

/// Uniform(a) has standard deviation a/√3; 0.02·√3 gives the usual 0.02 initialisation.
const W: Init = Init::Uniform(0.02 * 1.732_050_8);

const fn row(
    name: &'static str,
    shape: fn(&Qwen3NextConfig) -> Vec<usize>,
    (dtype, role): (Dtype, Role),
    when: fn(&Qwen3NextConfig, usize) -> bool,
    init: Init,
) -> TensorSpec<Qwen3NextConfig> {
    TensorSpec { name, shape, dtype, when, optional: false, role, init, per_expert: false }
}

const fn expert(name: &'static str, shape: fn(&Qwen3NextConfig) -> Vec<usize>) -> TensorSpec<Qwen3NextConfig> {
    TensorSpec {
        name,
        shape,
        dtype: Dtype::Stored,
        when: moe,
        optional: false,
        role: Role::Expert,
        init: W,
        per_expert: true,
    }
}

const STREAMED: (Dtype, Role) = (Dtype::Stored, Role::Streamed);
/// The DeltaNet layers' small constants stay on the device in f32.
const RESIDENT_F32: (Dtype, Role) = (Dtype::F32, Role::Resident);

fn h(c: &Qwen3NextConfig) -> usize {
    c.hidden_size
}
fn full(c: &Qwen3NextConfig, l: usize) -> bool {
    c.mixers.get(l) == Some(&Mixer::Full)
}
fn linear(c: &Qwen3NextConfig, l: usize) -> bool {
    c.mixers.get(l) == Some(&Mixer::Linear)
}
fn moe(c: &Qwen3NextConfig, l: usize) -> bool {
    c.is_moe(l)
}
fn dense(c: &Qwen3NextConfig, l: usize) -> bool {
    !c.is_moe(l)
}
fn nv_dv(c: &Qwen3NextConfig) -> usize {
    c.linear_v_heads * c.linear_v_dim
}

const fn global(
    name: &'static str,
    shape: fn(&Qwen3NextConfig) -> Vec<usize>,
    init: Init,
) -> TensorSpec<Qwen3NextConfig> {
    TensorSpec {
        name,
        shape,
        dtype: Dtype::Stored,
        when: always,
        optional: false,
        role: Role::Resident,
        init,
        per_expert: false,
    }
}

/// The tensors outside the decoder layers, in file order. The head is required unless the
/// embeddings are tied, and read when the file has it even then.
pub const GLOBAL: [TensorSpec<Qwen3NextConfig>; 3] = [
    global(EMBED, |c| vec![c.vocab_size, h(c)], W),
    global(FINAL_NORM, |c| vec![h(c)], Init::Const(0.0)),
    global(LM_HEAD, |c| vec![c.vocab_size, h(c)], W),
];

/// The tensors of each decoder layer (after `model.layers.{l}.`), in file order: the norms,
/// gated attention or Gated DeltaNet, then the MoE (router, routed experts, shared expert and
/// its gate) or a dense MLP. Norms are zero-centred (`synth` writes 0).
pub const LAYER: [TensorSpec<Qwen3NextConfig>; 26] = [
    row(INPUT_NORM, |c| vec![h(c)], STREAMED, always, Init::Const(0.0)),
    row(POST_NORM, |c| vec![h(c)], STREAMED, always, Init::Const(0.0)),
    row(Q, |c| vec![c.n_heads * 2 * c.head_dim, h(c)], STREAMED, full, W),
    row(K, |c| vec![c.n_kv_heads * c.head_dim, h(c)], STREAMED, full, W),
    row(V, |c| vec![c.n_kv_heads * c.head_dim, h(c)], STREAMED, full, W),
    row(O, |c| vec![h(c), c.n_heads * c.head_dim], STREAMED, full, W),
    row(Q_NORM, |c| vec![c.head_dim], STREAMED, full, Init::Const(0.0)),
    row(K_NORM, |c| vec![c.head_dim], STREAMED, full, Init::Const(0.0)),
    row(QKVZ, |c| vec![2 * c.linear_k_heads * c.linear_k_dim + 2 * nv_dv(c), h(c)], STREAMED, linear, W),
    row(BA, |c| vec![2 * c.linear_v_heads, h(c)], STREAMED, linear, W),
    row(CONV, |c| vec![c.conv_channels(), 1, c.conv_kernel], RESIDENT_F32, linear, Init::Uniform(0.5)),
    row(DT_BIAS, |c| vec![c.linear_v_heads], RESIDENT_F32, linear, Init::Const(1.0)),
    row(A_LOG, |c| vec![c.linear_v_heads], RESIDENT_F32, linear, Init::Uniform(1.0)),
    row(LIN_NORM, |c| vec![c.linear_v_dim], STREAMED, linear, Init::Const(1.0)),
    row(LIN_OUT, |c| vec![h(c), nv_dv(c)], STREAMED, linear, W),
    row(ROUTER, |c| vec![c.n_experts, h(c)], STREAMED, moe, W),
    expert(EXPERT_GATE, |c| vec![c.moe_intermediate_size, h(c)]),
    expert(EXPERT_UP, |c| vec![c.moe_intermediate_size, h(c)]),
    expert(EXPERT_DOWN, |c| vec![h(c), c.moe_intermediate_size]),
    row(SHARED_GATE_PROJ, |c| vec![c.shared_intermediate_size, h(c)], STREAMED, moe, W),
    row(SHARED_UP_PROJ, |c| vec![c.shared_intermediate_size, h(c)], STREAMED, moe, W),
    row(SHARED_DOWN_PROJ, |c| vec![h(c), c.shared_intermediate_size], STREAMED, moe, W),
    row(SHARED_GATE, |c| vec![1, h(c)], STREAMED, moe, W),
    row(DENSE_GATE, |c| vec![c.intermediate_size, h(c)], STREAMED, dense, W),
    row(DENSE_UP, |c| vec![c.intermediate_size, h(c)], STREAMED, dense, W),
    row(DENSE_DOWN, |c| vec![h(c), c.intermediate_size], STREAMED, dense, W),
];

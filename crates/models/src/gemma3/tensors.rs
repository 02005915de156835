//! The tensors of a Gemma 3 text checkpoint (docs/models.md §8.2): every name, shape and role,
//! once. Loading, the streamed parts, `synth` and the byte counts read this table.

use ollm_weights::synth::Init;

use super::config::Gemma3Config;
use crate::common::tensors::{Dtype, Role, TensorSpec, always};

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

pub const INPUT_NORM: &str = "input_layernorm.weight";
pub const Q: &str = "self_attn.q_proj.weight";
pub const K: &str = "self_attn.k_proj.weight";
pub const V: &str = "self_attn.v_proj.weight";
pub const O: &str = "self_attn.o_proj.weight";
pub const Q_NORM: &str = "self_attn.q_norm.weight";
pub const K_NORM: &str = "self_attn.k_norm.weight";
pub const POST_ATTN_NORM: &str = "post_attention_layernorm.weight";
pub const PRE_MLP_NORM: &str = "pre_feedforward_layernorm.weight";
pub const POST_MLP_NORM: &str = "post_feedforward_layernorm.weight";
pub const GATE: &str = "mlp.gate_proj.weight";
pub const UP: &str = "mlp.up_proj.weight";
pub const DOWN: &str = "mlp.down_proj.weight";
pub const Q_BIAS: &str = "self_attn.q_proj.bias";
pub const K_BIAS: &str = "self_attn.k_proj.bias";
pub const V_BIAS: &str = "self_attn.v_proj.bias";
pub const O_BIAS: &str = "self_attn.o_proj.bias";

/// Uniform(a) has standard deviation a/√3; 0.02·√3 gives the usual 0.02 initialisation.
const W: Init = Init::Uniform(0.02 * 1.732_050_8);
/// Zero-centred norms: the stored weight w scales by 1 + w, so 0 is the identity.
const NORM: Init = Init::Const(0.0);

const fn row(
    name: &'static str,
    shape: fn(&Gemma3Config) -> Vec<usize>,
    when: fn(&Gemma3Config, usize) -> bool,
    init: Init,
) -> TensorSpec<Gemma3Config> {
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

const fn global(
    name: &'static str,
    shape: fn(&Gemma3Config) -> Vec<usize>,
    init: Init,
    optional: bool,
) -> TensorSpec<Gemma3Config> {
    TensorSpec {
        name,
        shape,
        dtype: Dtype::Stored,
        when: if optional { |c, _| !c.tie_word_embeddings } else { always },
        optional,
        role: Role::Resident,
        init,
        per_expert: false,
    }
}

fn h(c: &Gemma3Config) -> usize {
    c.hidden_size
}
fn qd(c: &Gemma3Config) -> usize {
    c.n_heads * c.head_dim
}
fn kvd(c: &Gemma3Config) -> usize {
    c.n_kv_heads * c.head_dim
}
fn bias(c: &Gemma3Config, _: usize) -> bool {
    c.attention_bias
}

/// The tensors outside the decoder layers, in file order. The head is read when the file has it
/// (Gemma 3 ties it to the embedding).
pub const GLOBAL: [TensorSpec<Gemma3Config>; 3] = [
    global(EMBED, |c| vec![c.vocab_size, h(c)], W, false),
    global(FINAL_NORM, |c| vec![h(c)], NORM, false),
    global(LM_HEAD, |c| vec![c.vocab_size, h(c)], W, true),
];

/// The tensors of each decoder layer (after `model.layers.{l}.`); all stream with their layer.
pub const LAYER: [TensorSpec<Gemma3Config>; 17] = [
    row(INPUT_NORM, |c| vec![h(c)], always, NORM),
    row(Q, |c| vec![qd(c), h(c)], always, W),
    row(K, |c| vec![kvd(c), h(c)], always, W),
    row(V, |c| vec![kvd(c), h(c)], always, W),
    row(O, |c| vec![h(c), qd(c)], always, W),
    row(Q_NORM, |c| vec![c.head_dim], always, NORM),
    row(K_NORM, |c| vec![c.head_dim], always, NORM),
    row(POST_ATTN_NORM, |c| vec![h(c)], always, NORM),
    row(PRE_MLP_NORM, |c| vec![h(c)], always, NORM),
    row(POST_MLP_NORM, |c| vec![h(c)], always, NORM),
    row(GATE, |c| vec![c.intermediate_size, h(c)], always, W),
    row(UP, |c| vec![c.intermediate_size, h(c)], always, W),
    row(DOWN, |c| vec![h(c), c.intermediate_size], always, W),
    row(Q_BIAS, |c| vec![qd(c)], bias, W),
    row(K_BIAS, |c| vec![kvd(c)], bias, W),
    row(V_BIAS, |c| vec![kvd(c)], bias, W),
    row(O_BIAS, |c| vec![h(c)], bias, W),
];

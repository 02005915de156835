//! Qwen3-Next's forward (models.md §4): zero-centred norms; per layer either Gated DeltaNet
//! (a fixed-size state per sequence: the convolution's last inputs and the delta rule's matrix
//! per value head) or gated full attention (q/k norms, partial RoPE, a sigmoid output gate, a KV
//! cache); then the sparse MoE with a gated shared expert, or a dense MLP.
//!
//! Decoder layers are resident or streamed ([`PlacedLayers`], DeltaNet and attention layers in
//! separate groups); the DeltaNet layers' f32 constants stay resident; routed experts go through
//! the [`ExpertCache`]; the attention layers' KV cache may live off the device. A prompt runs in
//! tiles of [`PREFILL_TILE`] rows per layer (the DeltaNet state carries across tiles), so its
//! activations stay bounded whatever its length.

use std::sync::Arc;

use ollm_kv::{FixedShape, KvShape, SeqState};
use ollm_ops::{AttnParams, Backend, DeltaForm, DeltaRule, HeadSlice, NormKind, RouterMode, Tensor};
use ollm_weights::Catalog;

use super::config::{Mixer, Qwen3NextConfig};
use crate::common::attention::append_and_attend;
use crate::common::forward::{each_piece, pieces};
use crate::common::mlp::{MlpScratch, MlpWeights, gated_mlp};
use crate::common::moe::Routed;
use crate::common::rope::RopeTables;
use crate::common::weights::Loader;
use crate::experts::{ExpertCache, ExpertStats, ExpertWeights};
use crate::plan::Placement;
use crate::stream::{LayerTensors, PlacedLayers, StreamStats};
use crate::trace::TraceSink;
use crate::{CausalLm, LogitsWanted, ModelInfo, Result};

const EMBED: &str = "model.embed_tokens.weight";
const FINAL_NORM: &str = "model.norm.weight";
const LM_HEAD: &str = "lm_head.weight";
/// The L2 norm's eps inside the square root (models.md §4.5).
const L2_EPS: f32 = 1e-6;
/// Rows of one mixer tile of a prompt (DeltaNet or attention).
pub const PREFILL_TILE: usize = 1024;
/// Rows routed together: each expert is moved at most once per this many prompt tokens (the
/// planner counts GPT-OSS's chunk of the same size).
pub const MOE_CHUNK: usize = crate::gpt_oss::MOE_CHUNK;

fn layer_name(l: usize, suffix: &str) -> String {
    format!("model.layers.{l}.{suffix}")
}

/// Gated DeltaNet weights of one layer (streamable, bf16).
#[derive(Debug)]
struct LinearAttn {
    qkvz: Tensor,
    ba: Tensor,
    norm: Tensor,
    out: Tensor,
}

/// A DeltaNet layer's small f32 constants, resident: the conv kernel, dt_bias and A_log.
#[derive(Debug)]
struct DeltaConsts {
    conv: Tensor,
    dt_bias: Tensor,
    a_log: Tensor,
}

/// Gated full-attention weights of one layer.
#[derive(Debug)]
struct FullAttn {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    q_norm: Tensor,
    k_norm: Tensor,
}

#[derive(Debug)]
enum MixerWeights {
    Linear(Box<LinearAttn>),
    Full(Box<FullAttn>),
}

/// The sparse MoE of one layer: router and the gated shared expert (the routed experts live in
/// the model's expert cache).
#[derive(Debug)]
struct Moe {
    router: Tensor,
    shared: MlpWeights,
    shared_gate: Tensor,
}

#[derive(Debug)]
enum Mlp {
    Dense(Box<MlpWeights>),
    Moe(Box<Moe>),
}

#[derive(Debug)]
struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    mixer: MixerWeights,
    mlp: Mlp,
}

const INPUT_NORM: &str = "input_layernorm.weight";
const POST_NORM: &str = "post_attention_layernorm.weight";
const QKVZ: &str = "linear_attn.in_proj_qkvz.weight";
const BA: &str = "linear_attn.in_proj_ba.weight";
const LIN_NORM: &str = "linear_attn.norm.weight";
const LIN_OUT: &str = "linear_attn.out_proj.weight";
const Q: &str = "self_attn.q_proj.weight";
const K: &str = "self_attn.k_proj.weight";
const V: &str = "self_attn.v_proj.weight";
const O: &str = "self_attn.o_proj.weight";
const Q_NORM: &str = "self_attn.q_norm.weight";
const K_NORM: &str = "self_attn.k_norm.weight";
const ROUTER: &str = "mlp.gate.weight";
const SHARED_GATE: &str = "mlp.shared_expert_gate.weight";
const SHARED_PARTS: [&str; 3] =
    ["mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight", "mlp.shared_expert.down_proj.weight"];
const DENSE_PARTS: [&str; 3] = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"];

fn mlp_weights(ld: &Loader<'_>, prefix: &str, h: usize, i: usize) -> Result<MlpWeights> {
    Ok(MlpWeights {
        gate: ld.tensor(&format!("{prefix}.gate_proj.weight"), &[i, h])?,
        up: ld.tensor(&format!("{prefix}.up_proj.weight"), &[i, h])?,
        down: ld.tensor(&format!("{prefix}.down_proj.weight"), &[h, i])?,
        gate_bias: None,
        up_bias: None,
        down_bias: None,
    })
}

impl Layer {
    fn load(ld: &Loader<'_>, c: &Qwen3NextConfig, l: usize) -> Result<Self> {
        let h = c.hidden_size;
        let t = |suffix: &str, shape: &[usize]| ld.tensor(&layer_name(l, suffix), shape);
        let mixer = match c.mixers[l] {
            Mixer::Linear => {
                let (nk, dk, nv, dv) = (c.linear_k_heads, c.linear_k_dim, c.linear_v_heads, c.linear_v_dim);
                MixerWeights::Linear(Box::new(LinearAttn {
                    qkvz: t(QKVZ, &[2 * nk * dk + 2 * nv * dv, h])?,
                    ba: t(BA, &[2 * nv, h])?,
                    norm: t(LIN_NORM, &[dv])?,
                    out: t(LIN_OUT, &[h, nv * dv])?,
                }))
            }
            Mixer::Full => {
                let (nh, nkv, d) = (c.n_heads, c.n_kv_heads, c.head_dim);
                MixerWeights::Full(Box::new(FullAttn {
                    q: t(Q, &[nh * 2 * d, h])?,
                    k: t(K, &[nkv * d, h])?,
                    v: t(V, &[nkv * d, h])?,
                    o: t(O, &[h, nh * d])?,
                    q_norm: t(Q_NORM, &[d])?,
                    k_norm: t(K_NORM, &[d])?,
                }))
            }
        };
        let mlp = if c.is_moe(l) {
            let (e, is) = (c.n_experts, c.shared_intermediate_size);
            Mlp::Moe(Box::new(Moe {
                router: t(ROUTER, &[e, h])?,
                shared: mlp_weights(ld, &layer_name(l, "mlp.shared_expert"), h, is)?,
                shared_gate: t(SHARED_GATE, &[1, h])?,
            }))
        } else {
            Mlp::Dense(Box::new(mlp_weights(ld, &layer_name(l, "mlp"), h, c.intermediate_size)?))
        };
        Ok(Self { input_norm: t(INPUT_NORM, &[h])?, post_norm: t(POST_NORM, &[h])?, mixer, mlp })
    }
}

impl LayerTensors for Layer {
    fn suffixes(&self) -> Vec<&'static str> {
        let mut v = vec![INPUT_NORM, POST_NORM];
        match self.mixer {
            MixerWeights::Linear(_) => v.extend([QKVZ, BA, LIN_NORM, LIN_OUT]),
            MixerWeights::Full(_) => v.extend([Q, K, V, O, Q_NORM, K_NORM]),
        }
        match self.mlp {
            Mlp::Moe(_) => v.extend([ROUTER, SHARED_GATE].into_iter().chain(SHARED_PARTS)),
            Mlp::Dense(_) => v.extend(DENSE_PARTS),
        }
        v
    }

    fn tensor_mut(&mut self, suffix: &str) -> Option<&mut Tensor> {
        match (suffix, &mut self.mixer, &mut self.mlp) {
            (INPUT_NORM, ..) => Some(&mut self.input_norm),
            (POST_NORM, ..) => Some(&mut self.post_norm),
            (QKVZ, MixerWeights::Linear(w), _) => Some(&mut w.qkvz),
            (BA, MixerWeights::Linear(w), _) => Some(&mut w.ba),
            (LIN_NORM, MixerWeights::Linear(w), _) => Some(&mut w.norm),
            (LIN_OUT, MixerWeights::Linear(w), _) => Some(&mut w.out),
            (Q, MixerWeights::Full(w), _) => Some(&mut w.q),
            (K, MixerWeights::Full(w), _) => Some(&mut w.k),
            (V, MixerWeights::Full(w), _) => Some(&mut w.v),
            (O, MixerWeights::Full(w), _) => Some(&mut w.o),
            (Q_NORM, MixerWeights::Full(w), _) => Some(&mut w.q_norm),
            (K_NORM, MixerWeights::Full(w), _) => Some(&mut w.k_norm),
            (ROUTER, _, Mlp::Moe(m)) => Some(&mut m.router),
            (SHARED_GATE, _, Mlp::Moe(m)) => Some(&mut m.shared_gate),
            (s, _, Mlp::Moe(m)) => s.strip_prefix("mlp.shared_expert.").and_then(|p| mlp_part_mut(&mut m.shared, p)),
            (s, _, Mlp::Dense(w)) => s.strip_prefix("mlp.").and_then(|p| mlp_part_mut(w, p)),
        }
    }
}

/// `gate_proj.weight` / `up_proj.weight` / `down_proj.weight` of an MLP.
fn mlp_part_mut<'a>(w: &'a mut MlpWeights, part: &str) -> Option<&'a mut Tensor> {
    match part {
        "gate_proj.weight" => Some(&mut w.gate),
        "up_proj.weight" => Some(&mut w.up),
        "down_proj.weight" => Some(&mut w.down),
        _ => None,
    }
}

/// A loaded Qwen3-Next model. Owns its weights; holds no per-sequence state.
#[derive(Debug)]
pub struct Qwen3Next {
    cfg: Qwen3NextConfig,
    info: ModelInfo,
    backend: Arc<dyn Backend>,
    embed: Tensor,
    /// The decoder layers, resident or streamed.
    layers: PlacedLayers<Layer>,
    /// Per layer: the DeltaNet constants (None for attention layers).
    consts: Vec<Option<DeltaConsts>>,
    /// The routed experts of every MoE layer.
    experts: Option<ExpertCache>,
    final_norm: Tensor,
    lm_head: Option<Tensor>,
    rope: RopeTables,
    /// Per layer: its index among the attention layers (KV cache) or among the DeltaNet layers
    /// (fixed state).
    slot: Vec<usize>,
    kv_offload: Option<ollm_kv::KvOffload>,
}

impl Qwen3Next {
    /// Loads with `placement` (layers resident or streamed, the KV cache on the device or off
    /// it, experts resident unless `placement.experts` says otherwise).
    pub fn load_placed(
        cfg: Qwen3NextConfig,
        architecture: String,
        catalog: &Catalog,
        backend: Arc<dyn Backend>,
        placement: &Placement,
    ) -> Result<Self> {
        let ld = Loader { catalog, backend: backend.as_ref() };
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = ld.tensor(EMBED, &[v, h])?;
        let layers = PlacedLayers::load_grouped(
            &backend,
            catalog,
            placement,
            cfg.n_layers,
            |l| cfg.layout(l),
            |l| Layer::load(&ld, &cfg, l),
        )?;
        let consts = (0..cfg.n_layers)
            .map(|l| {
                let f = |suffix: &str, shape: &[usize]| ld.tensor_f32(&layer_name(l, suffix), shape);
                let nv = cfg.linear_v_heads;
                Ok(match cfg.mixers[l] {
                    Mixer::Full => None,
                    Mixer::Linear => Some(DeltaConsts {
                        conv: f("linear_attn.conv1d.weight", &[cfg.conv_channels(), 1, cfg.conv_kernel])?,
                        dt_bias: f("linear_attn.dt_bias", &[nv])?,
                        a_log: f("linear_attn.A_log", &[nv])?,
                    }),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let moe_layers = cfg.moe_layers();
        let experts = match moe_layers.is_empty() {
            true => None,
            false => Some(ExpertCache::new(
                backend.clone(),
                catalog,
                &moe_layers,
                cfg.n_experts,
                (h, cfg.moe_intermediate_size),
                placement.experts.as_ref(),
            )?),
        };
        let final_norm = ld.tensor(FINAL_NORM, &[h])?;
        let lm_head = ld.tensor_if(!cfg.tie_word_embeddings || catalog.contains(LM_HEAD), LM_HEAD, &[v, h])?;
        let rope =
            RopeTables::new(backend.as_ref(), cfg.rope_theta, cfg.rotary_dims, &cfg.rope_scaling, cfg.max_positions)?;
        let mut counts = [0usize; 2];
        let slot = cfg
            .mixers
            .iter()
            .map(|m| {
                let c = &mut counts[usize::from(*m == Mixer::Linear)];
                *c += 1;
                *c - 1
            })
            .collect();
        let weight_bytes = catalog.total_bytes();
        let (all_experts, routed) = experts.as_ref().map_or((0, 0), |x| {
            let s = x.stats();
            (s.expert_bytes * s.experts as u64, s.expert_bytes * (moe_layers.len() * cfg.experts_per_token) as u64)
        });
        let n_full = cfg.attention_layers();
        let kv_elem = backend.kv_dtype().size_bytes();
        let info = ModelInfo {
            architecture,
            vocab_size: v,
            hidden_size: h,
            n_layers: cfg.n_layers,
            max_positions: cfg.max_positions,
            weight_bytes,
            // A separate head is read whole, the embedding one row; a tied one is read whole.
            weight_bytes_per_token: weight_bytes - all_experts + routed
                - if lm_head.is_some() { embed.size_bytes() as u64 } else { 0 },
            kv_bytes_per_position: (2 * n_full * cfg.n_kv_heads * cfg.head_dim * kv_elem) as u64,
            sliding_kv: None,
            eos_token_ids: cfg.eos_token_ids.clone(),
            bos_token_id: cfg.bos_token_id,
            fingerprint: catalog.fingerprint(format!("{cfg:?}").as_bytes())?,
        };
        let kv_offload = placement.kv.clone();
        Ok(Self { cfg, info, backend, embed, layers, consts, experts, final_norm, lm_head, rope, slot, kv_offload })
    }

    pub fn config(&self) -> &Qwen3NextConfig {
        &self.cfg
    }

    /// `y = GatedDeltaNet(a)` for T rows, from and into the layer's fixed state
    /// (models.md §4.5); the chunked form for more than one row.
    fn deltanet(&self, (w, dc): (&LinearAttn, &DeltaConsts), a: &Tensor, state: &mut [Tensor]) -> Result<Tensor> {
        let be = self.backend.as_ref();
        let c = &self.cfg;
        let t = a.shape()[0];
        let (nk, dk, nv, dv, r) = (c.linear_k_heads, c.linear_k_dim, c.linear_v_heads, c.linear_v_dim, c.v_per_k());
        let ch = c.conv_channels();
        let mut p = be.zeros(vec![t, w.qkvz.shape()[0]])?;
        be.matmul(a, &w.qkvz, None, &mut p)?;
        let mut ba = be.zeros(vec![t, 2 * nv])?;
        be.matmul(a, &w.ba, None, &mut ba)?;
        // Per key head g: [q (dk) | k (dk) | v (r·dv) | z (r·dv)] into the convolution's
        // channel order [all q | all k | all v], and z apart.
        let group = 2 * dk + 2 * r * dv;
        let cut = |offset, width, out_offset| HeadSlice { heads: nk, stride: group, offset, width, out_offset };
        let mut u = be.zeros(vec![t, ch])?;
        be.slice_heads(&p, cut(0, dk, 0), &mut u)?;
        be.slice_heads(&p, cut(dk, dk, nk * dk), &mut u)?;
        be.slice_heads(&p, cut(2 * dk, r * dv, 2 * nk * dk), &mut u)?;
        let mut z = be.zeros(vec![t, nv, dv])?;
        be.slice_heads(&p, cut(2 * dk + r * dv, r * dv, 0), &mut z)?;
        let ba_cut = |offset| HeadSlice { heads: nk, stride: 2 * r, offset, width: r, out_offset: 0 };
        let (mut b, mut alpha) = (be.zeros(vec![t, nv])?, be.zeros(vec![t, nv])?);
        be.slice_heads(&ba, ba_cut(0), &mut b)?;
        be.slice_heads(&ba, ba_cut(r), &mut alpha)?;
        let (conv_state, rest) =
            state.split_first_mut().ok_or_else(|| ollm_ops::OpsError::Backend("no conv state".into()))?;
        let mut conv = be.zeros(vec![t, ch])?;
        be.causal_conv1d(&u, &dc.conv, conv_state, &mut conv)?;
        let whole = |offset, width| HeadSlice { heads: 1, stride: ch, offset, width, out_offset: 0 };
        let (mut q, mut k, mut v) =
            (be.zeros(vec![t, nk, dk])?, be.zeros(vec![t, nk, dk])?, be.zeros(vec![t, nv, dv])?);
        be.slice_heads(&conv, whole(0, nk * dk), &mut q)?;
        be.slice_heads(&conv, whole(nk * dk, nk * dk), &mut k)?;
        be.slice_heads(&conv, whole(2 * nk * dk, nv * dv), &mut v)?;
        be.l2_norm(&mut q, L2_EPS, (dk as f32).powf(-0.5))?;
        be.l2_norm(&mut k, L2_EPS, 1.0)?;
        let (mut g, mut beta) = (be.zeros(vec![t, nv])?, be.zeros(vec![t, nv])?);
        be.deltanet_gates(&alpha, &b, &dc.a_log, &dc.dt_bias, &mut g, &mut beta)?;
        let form = if t == 1 { DeltaForm::Recurrent } else { DeltaForm::Chunked };
        let s = rest.first_mut().ok_or_else(|| ollm_ops::OpsError::Backend("no recurrent state".into()))?;
        let mut o = be.zeros(vec![t, nv, dv])?;
        be.delta_rule(DeltaRule { q: &q, k: &k, v: &v, g: &g, beta: &beta }, s, &mut o, form)?;
        let mut normed = be.zeros(vec![t, nv, dv])?;
        be.gated_rms_norm(&o, &z, &w.norm, c.rms_norm_eps, &mut normed)?;
        let mut y = be.zeros(vec![t, c.hidden_size])?;
        be.matmul(&normed, &w.out, None, &mut y)?;
        Ok(y)
    }

    /// `y = GatedAttention(a)` for T rows at positions `pos0..` (models.md §4.4).
    fn attention(&self, l: usize, w: &FullAttn, a: &Tensor, kv: &mut ollm_kv::LayerKv, pos0: usize) -> Result<Tensor> {
        let be = self.backend.as_ref();
        let c = &self.cfg;
        let t = a.shape()[0];
        let (nh, nkv, d) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let mut qg = be.zeros(vec![t, nh * 2 * d])?;
        be.matmul(a, &w.q, None, &mut qg)?;
        // Per head [q (d) | gate (d)].
        let half = |offset| HeadSlice { heads: nh, stride: 2 * d, offset, width: d, out_offset: 0 };
        let (mut q_raw, mut gate) = (be.zeros(vec![t, nh, d])?, be.zeros(vec![t, nh * d])?);
        be.slice_heads(&qg, half(0), &mut q_raw)?;
        be.slice_heads(&qg, half(d), &mut gate)?;
        let (mut k_raw, mut v) = (be.zeros(vec![t, nkv, d])?, be.zeros(vec![t, nkv, d])?);
        be.matmul(a, &w.k, None, &mut k_raw)?;
        be.matmul(a, &w.v, None, &mut v)?;
        let (mut q, mut k) = (be.zeros(vec![t, nh, d])?, be.zeros(vec![t, nkv, d])?);
        be.rms_norm(&q_raw, &w.q_norm, c.rms_norm_eps, NormKind::ZeroCentered, &mut q)?;
        be.rms_norm(&k_raw, &w.k_norm, c.rms_norm_eps, NormKind::ZeroCentered, &mut k)?;
        let rope = self.rope.covering(be, pos0 + t)?;
        be.rope(&mut q, &rope, pos0)?;
        be.rope(&mut k, &rope, pos0)?;
        let params = AttnParams { scale: (d as f32).powf(-0.5), window: None, sinks: None };
        let mut ctx = be.zeros(vec![t, nh, d])?;
        append_and_attend(be, kv, (&k, &v), &q, (l, pos0), &params, &mut ctx)?;
        let mut o = be.zeros(vec![t, nh * d])?;
        be.slice_heads(&ctx, HeadSlice { heads: 1, stride: nh * d, offset: 0, width: nh * d, out_offset: 0 }, &mut o)?;
        be.sigmoid_mul(&mut o, &gate)?;
        let mut y = be.zeros(vec![t, c.hidden_size])?;
        be.matmul(&o, &w.o, None, &mut y)?;
        Ok(y)
    }

    /// `y = MoE(b)`: routed experts (softmax over all, top-k, renormalised) plus the shared
    /// expert scaled by σ(b·w_sg) (models.md §4.6).
    fn moe(&self, l: usize, m: &Moe, b: &Tensor) -> Result<Tensor> {
        let be = self.backend.as_ref();
        let c = &self.cfg;
        let (t, h) = (b.shape()[0], c.hidden_size);
        let mut logits = be.zeros(vec![t, c.n_experts])?;
        be.matmul(b, &m.router, None, &mut logits)?;
        let k = c.experts_per_token;
        let mode = RouterMode::TopKOfSoftmax { norm_topk_prob: c.norm_topk_prob };
        let (ids, weights) = be.router_topk(&logits, k, mode)?;
        let routed = Routed::new(&ids, &weights, k, c.n_experts);
        let rows = &routed.rows;
        let mut acc = be.zeros(vec![t, h])?;
        let cache = self.experts.as_ref().ok_or_else(|| ollm_ops::OpsError::Backend("internal: no experts".into()))?;
        let rows_of = |e: u32| routed.count(e);
        cache.run_layer(l, &routed.used, &rows_of, &mut |e, w: &ExpertWeights<'_>| {
            let (rs, ws) = &rows[e as usize];
            let mut x = be.zeros(vec![rs.len(), h])?;
            be.gather_rows(b, rs, &mut x)?;
            let mut s = MlpScratch::new(be, rs.len(), h, c.moe_intermediate_size)?;
            let up = w.up.ok_or_else(|| ollm_ops::OpsError::Backend("internal: a fused gate_up expert".into()))?;
            w.gate_up.matmul(be, &x, None, &mut s.gate)?;
            up.matmul(be, &x, None, &mut s.up)?;
            be.silu_mul(&s.gate, &s.up, &mut s.act)?;
            w.down.matmul(be, &s.act, None, &mut s.out)?;
            be.scatter_add_rows(&s.out, rs, ws, &mut acc)?;
            Ok(())
        })?;
        let mut s = MlpScratch::new(be, t, h, c.shared_intermediate_size)?;
        gated_mlp(be, &m.shared, b, &mut s)?;
        let mut sg = be.zeros(vec![t, 1])?;
        be.matmul(b, &m.shared_gate, None, &mut sg)?;
        be.sigmoid_mul(&mut s.out, &sg)?;
        be.add_assign(&mut acc, &s.out)?;
        Ok(acc)
    }
}

impl CausalLm for Qwen3Next {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    fn expert_stats(&self) -> Option<ExpertStats> {
        self.experts.as_ref().map(ExpertCache::stats)
    }

    fn stream_stats(&self) -> Option<StreamStats> {
        self.layers.stream_stats()
    }

    fn new_state(&self) -> Result<SeqState> {
        let c = &self.cfg;
        let be = self.backend.as_ref();
        let full = c.attention_layers();
        let shapes = vec![KvShape::full(c.n_kv_heads, c.head_dim); full];
        let fixed = FixedShape {
            tensors: vec![
                vec![c.conv_kernel - 1, c.conv_channels()],
                vec![c.linear_v_heads, c.linear_k_dim, c.linear_v_dim],
            ],
        };
        let linear = c.n_layers - full;
        let state = SeqState::placed(be, shapes, c.max_positions, self.kv_offload.as_ref())?;
        Ok(state.with_fixed(be, vec![fixed; linear])?)
    }

    fn forward(
        &self,
        ids: &[u32],
        state: &mut SeqState,
        wanted: LogitsWanted,
        trace: Option<&dyn TraceSink>,
    ) -> Result<Vec<f32>> {
        let be = self.backend.as_ref();
        let c = &self.cfg;
        let (t, h, eps) = (ids.len(), c.hidden_size, c.rms_norm_eps);
        let (pos0, mut x) =
            crate::common::forward::begin(be, ids, state, &self.embed, (c.vocab_size, c.max_positions), trace)?;
        let tiles = pieces(t, PREFILL_TILE);
        let chunks = pieces(t, MOE_CHUNK);
        for l in 0..self.layers.len() {
            let full = self.cfg.mixers[l] == Mixer::Full;
            let i = self.slot[l];
            if full {
                state.acquire(be, i)?;
            }
            self.layers.with_layer(l, |layer| {
                each_piece(be, &mut x, &tiles, &mut |xt, start| {
                    let n = xt.shape()[0];
                    let mut normed = be.zeros(vec![n, h])?;
                    be.rms_norm(xt, &layer.input_norm, eps, NormKind::ZeroCentered, &mut normed)?;
                    let y = match (&layer.mixer, &self.consts[l]) {
                        (MixerWeights::Linear(w), Some(dc)) => self.deltanet((w, dc), &normed, state.fixed_mut(i))?,
                        (MixerWeights::Full(w), _) => {
                            let kv = state.layer_for(be, i, pos0 + start, n)?;
                            self.attention(l, w, &normed, kv, pos0 + start)?
                        }
                        (MixerWeights::Linear(_), None) => {
                            return Err(ollm_ops::OpsError::Backend(format!(
                                "internal: layer {l} has no DeltaNet constants"
                            ))
                            .into());
                        }
                    };
                    Ok(be.add_assign(xt, &y)?)
                })?;
                each_piece(be, &mut x, &chunks, &mut |xc, _| {
                    let n = xc.shape()[0];
                    let mut normed = be.zeros(vec![n, h])?;
                    be.rms_norm(xc, &layer.post_norm, eps, NormKind::ZeroCentered, &mut normed)?;
                    let y = match &layer.mlp {
                        Mlp::Moe(m) => self.moe(l, m, &normed)?,
                        Mlp::Dense(w) => {
                            let mut s = MlpScratch::new(be, n, h, c.intermediate_size)?;
                            gated_mlp(be, w, &normed, &mut s)?;
                            s.out
                        }
                    };
                    Ok(be.add_assign(xc, &y)?)
                })
            })?;
            if full {
                state.release(be, i)?;
            }
            if let Some(tr) = trace {
                tr.record(Some(l), "layer_out", &x);
            }
        }
        state.advance(t);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        crate::common::forward::logits(be, &x, wanted, (&self.final_norm, eps, NormKind::ZeroCentered), head, trace)
    }
}

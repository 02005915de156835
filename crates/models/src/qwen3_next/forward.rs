//! Qwen3-Next's forward (docs/models.md §4): zero-centred norms; per layer either Gated DeltaNet
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
use ollm_ops::{
    AttnParams, Backend, DeltaForm, DeltaRule, ExpertAct, HeadSlice, NormKind, RouterMode, Tensor, run_experts,
};
use ollm_weights::Catalog;

use super::config::{Mixer, Qwen3NextConfig};
use super::tensors::*;
use crate::common::attention::{AttnDims, SegBufs, append_and_attend, copy_outer_rows, write_outer_rows};
use crate::common::experts::expert_sources;
use crate::common::forward::{
    PREFILL_TILE, PerSize, Pieces, SegSets, Segment, alloc_all, batch_stream_shapes, f32_bytes, piece_sizes,
    seg_set_rows, segments,
};
use crate::common::mlp::{MlpScratch, MlpWeights, gated_mlp};
use crate::common::moe::{Routed, routed_refs};
use crate::common::rope::RopeTables;
use crate::common::tensors::{TableLoader, streamed};
use crate::common::weights::Loader;
use crate::trace::TraceSink;
use crate::{BatchSeq, CausalLm, InfoParts, LogitsWanted, ModelInfo, Result};
use ollm_residency::experts::{ExpertCache, ExpertStats, ExpertWeights, PACKED_MAX_ROWS};
use ollm_residency::plan::Placement;
use ollm_residency::stream::{LayerTensors, PlacedLayers, StreamStats};

/// The L2 norm's eps inside the square root (docs/models.md §4.5).
const L2_EPS: f32 = 1e-6;
/// Rows routed together: each expert is moved at most once per this many prompt tokens (the
/// planner counts GPT-OSS's chunk of the same size).
pub const MOE_CHUNK: usize = crate::gpt_oss::MOE_CHUNK;

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
    /// The names of its tensors (what a streamed copy refills).
    names: Vec<&'static str>,
}

impl Layer {
    fn load(ld: &TableLoader<'_, Qwen3NextConfig>, l: usize) -> Result<Self> {
        let c = ld.cfg;
        let t = |name: &str| ld.require(&LAYER, name, Some(l));
        let mixer = match c.mixers[l] {
            Mixer::Linear => MixerWeights::Linear(Box::new(LinearAttn {
                qkvz: t(QKVZ)?,
                ba: t(BA)?,
                norm: t(LIN_NORM)?,
                out: t(LIN_OUT)?,
            })),
            Mixer::Full => MixerWeights::Full(Box::new(FullAttn {
                q: t(Q)?,
                k: t(K)?,
                v: t(V)?,
                o: t(O)?,
                q_norm: t(Q_NORM)?,
                k_norm: t(K_NORM)?,
            })),
        };
        let mlp_weights = |[gate, up, down]: [&'static str; 3]| -> Result<MlpWeights> {
            Ok(MlpWeights {
                gate: t(gate)?,
                up: t(up)?,
                down: t(down)?,
                gate_bias: None,
                up_bias: None,
                down_bias: None,
            })
        };
        let mlp = if c.is_moe(l) {
            Mlp::Moe(Box::new(Moe {
                router: t(ROUTER)?,
                shared: mlp_weights([SHARED_GATE_PROJ, SHARED_UP_PROJ, SHARED_DOWN_PROJ])?,
                shared_gate: t(SHARED_GATE)?,
            }))
        } else {
            Mlp::Dense(Box::new(mlp_weights([DENSE_GATE, DENSE_UP, DENSE_DOWN])?))
        };
        Ok(Self { input_norm: t(INPUT_NORM)?, post_norm: t(POST_NORM)?, mixer, mlp, names: streamed(&LAYER, c, l) })
    }
}

impl LayerTensors for Layer {
    fn suffixes(&self) -> Vec<&'static str> {
        self.names.clone()
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
            (SHARED_GATE_PROJ, _, Mlp::Moe(m)) => Some(&mut m.shared.gate),
            (SHARED_UP_PROJ, _, Mlp::Moe(m)) => Some(&mut m.shared.up),
            (SHARED_DOWN_PROJ, _, Mlp::Moe(m)) => Some(&mut m.shared.down),
            (DENSE_GATE, _, Mlp::Dense(w)) => Some(&mut w.gate),
            (DENSE_UP, _, Mlp::Dense(w)) => Some(&mut w.up),
            (DENSE_DOWN, _, Mlp::Dense(w)) => Some(&mut w.down),
            _ => None,
        }
    }
}

/// Shapes of a DeltaNet tile of `n` rows (docs/models.md §4.5): the projections p and ba, the
/// convolution's input u and output, z, b, alpha, q, k, v, the gates g and beta, the rule's
/// output o, its norm and the out-projection y.
fn delta_shapes(c: &Qwen3NextConfig, n: usize) -> Vec<Vec<usize>> {
    let (nk, dk, nv, dv, ch) = (c.linear_k_heads, c.linear_k_dim, c.linear_v_heads, c.linear_v_dim, c.conv_channels());
    vec![
        vec![n, 2 * nk * dk + 2 * nv * dv],
        vec![n, 2 * nv],
        vec![n, ch],
        vec![n, nv, dv],
        vec![n, nv],
        vec![n, nv],
        vec![n, ch],
        vec![n, nk, dk],
        vec![n, nk, dk],
        vec![n, nv, dv],
        vec![n, nv],
        vec![n, nv],
        vec![n, nv, dv],
        vec![n, nv, dv],
        vec![n, c.hidden_size],
    ]
}

/// Shapes of one sequence's share of a DeltaNet tile that holds several (its `n` rows of what
/// runs against its own state): the convolution's input and output, q, k, v, g, beta and the
/// rule's output.
fn delta_seg_shapes(c: &Qwen3NextConfig, n: usize) -> Vec<Vec<usize>> {
    let (nk, dk, nv, dv, ch) = (c.linear_k_heads, c.linear_k_dim, c.linear_v_heads, c.linear_v_dim, c.conv_channels());
    vec![
        vec![n, ch],
        vec![n, ch],
        vec![n, nk, dk],
        vec![n, nk, dk],
        vec![n, nv, dv],
        vec![n, nv],
        vec![n, nv],
        vec![n, nv, dv],
    ]
}

/// The gated-attention layers' heads, for the segment buffers of a batched tile.
fn attn_dims(c: &Qwen3NextConfig) -> AttnDims {
    AttnDims { hidden: c.hidden_size, n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim }
}

/// Shapes of a gated-attention tile of `n` rows (docs/models.md §4.4): q with its gate, q and the
/// gate apart, k and v before their norms, q and k after, the attention's output, it gated, y.
fn attn_shapes(c: &Qwen3NextConfig, n: usize) -> Vec<Vec<usize>> {
    let (nh, nkv, d) = (c.n_heads, c.n_kv_heads, c.head_dim);
    vec![
        vec![n, nh * 2 * d],
        vec![n, nh, d],
        vec![n, nh * d],
        vec![n, nkv, d],
        vec![n, nkv, d],
        vec![n, nh, d],
        vec![n, nkv, d],
        vec![n, nh, d],
        vec![n, nh * d],
        vec![n, c.hidden_size],
    ]
}

/// A DeltaNet tile's activations ([`delta_shapes`]).
struct DeltaScratch {
    p: Tensor,
    ba: Tensor,
    u: Tensor,
    z: Tensor,
    b: Tensor,
    alpha: Tensor,
    conv: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    o: Tensor,
    normed: Tensor,
    y: Tensor,
}

/// A gated-attention tile's activations ([`attn_shapes`]).
struct AttnScratch {
    qg: Tensor,
    q_raw: Tensor,
    gate: Tensor,
    k_raw: Tensor,
    v: Tensor,
    q: Tensor,
    k: Tensor,
    ctx: Tensor,
    o: Tensor,
    y: Tensor,
}

/// The activations of one mixer tile of `n` rows, reused by every layer: the normed rows and
/// a set for each mixer kind the model has.
struct TileScratch {
    normed: Tensor,
    delta: Option<DeltaScratch>,
    attn: Option<AttnScratch>,
}

fn internal(what: &str) -> crate::ModelError {
    ollm_ops::OpsError::Backend(format!("internal: {what}")).into()
}

impl TileScratch {
    fn shapes(c: &Qwen3NextConfig, n: usize) -> Vec<Vec<usize>> {
        let mut v = vec![vec![n, c.hidden_size]];
        if c.mixers.contains(&Mixer::Linear) {
            v.extend(delta_shapes(c, n));
        }
        if c.mixers.contains(&Mixer::Full) {
            v.extend(attn_shapes(c, n));
        }
        v
    }

    fn new(be: &dyn Backend, c: &Qwen3NextConfig, n: usize) -> Result<Self> {
        let delta = match c.mixers.contains(&Mixer::Linear) {
            false => None,
            true => {
                let [p, ba, u, z, b, alpha, conv, q, k, v, g, beta, o, normed, y] =
                    alloc_all(be, delta_shapes(c, n))?.try_into().map_err(|_| internal("DeltaNet scratch"))?;
                Some(DeltaScratch { p, ba, u, z, b, alpha, conv, q, k, v, g, beta, o, normed, y })
            }
        };
        let attn = match c.mixers.contains(&Mixer::Full) {
            false => None,
            true => {
                let [qg, q_raw, gate, k_raw, v, q, k, ctx, o, y] =
                    alloc_all(be, attn_shapes(c, n))?.try_into().map_err(|_| internal("attention scratch"))?;
                Some(AttnScratch { qg, q_raw, gate, k_raw, v, q, k, ctx, o, y })
            }
        };
        Ok(Self { normed: be.zeros(vec![n, c.hidden_size])?, delta, attn })
    }
}

/// The activations of one MLP chunk of `n` rows reused by every layer: the normed rows, the
/// router logits, the shared expert's (or a dense MLP's) activations and its gate.
struct ChunkScratch {
    normed: Tensor,
    logits: Option<Tensor>,
    shared: Option<(MlpScratch, Tensor)>,
    dense: Option<MlpScratch>,
}

/// Whether some layer's MLP is the MoE, and whether some layer's is dense.
fn mlp_kinds(c: &Qwen3NextConfig) -> (bool, bool) {
    let moe = !c.moe_layers().is_empty();
    (moe, (0..c.n_layers).any(|l| !c.is_moe(l)))
}

impl ChunkScratch {
    /// The shapes [`ChunkScratch::new`] allocates, and what each MoE layer allocates besides:
    /// the weighted sum of the experts' outputs and the activations of the largest expert call.
    fn shapes(c: &Qwen3NextConfig, n: usize) -> Vec<Vec<usize>> {
        let (moe, dense) = mlp_kinds(c);
        let h = c.hidden_size;
        let mut v = vec![vec![n, h]];
        if moe {
            v.push(vec![n, c.n_experts]);
            v.extend(MlpScratch::shapes(n, h, c.shared_intermediate_size));
            v.push(vec![n, 1]);
            v.push(vec![n, h]);
            v.push(vec![n, h]);
            v.extend(MlpScratch::shapes(n, h, c.moe_intermediate_size));
        }
        if dense {
            v.extend(MlpScratch::shapes(n, h, c.intermediate_size));
        }
        v
    }

    fn new(be: &dyn Backend, c: &Qwen3NextConfig, n: usize) -> Result<Self> {
        let (moe, dense) = mlp_kinds(c);
        let h = c.hidden_size;
        Ok(Self {
            normed: be.zeros(vec![n, h])?,
            logits: if moe { Some(be.zeros(vec![n, c.n_experts])?) } else { None },
            shared: match moe {
                true => Some((MlpScratch::new(be, n, h, c.shared_intermediate_size)?, be.zeros(vec![n, 1])?)),
                false => None,
            },
            dense: if dense { Some(MlpScratch::new(be, n, h, c.intermediate_size)?) } else { None },
        })
    }
}

/// Device bytes of the activations a forward of `t` rows in `seqs` sequences allocates at most
/// (each sequence's last row's logits wanted): the residual stream, the tiles' and chunks'
/// buffers, their scratch sets, what a MoE layer holds at once besides, and for several
/// sequences their segments' buffers (DeltaNet's and attention's). The experts' weights belong
/// to the expert cache.
pub fn scratch_bytes(c: &Qwen3NextConfig, t: usize, seqs: usize) -> u64 {
    let h = c.hidden_size;
    let mut shapes = batch_stream_shapes(t, seqs, h, c.vocab_size);
    let seg = seg_set_rows(t, seqs);
    if c.mixers.contains(&Mixer::Linear) {
        shapes.extend(delta_seg_shapes(c, seg));
    }
    if c.mixers.contains(&Mixer::Full) {
        shapes.extend(SegBufs::shapes(seg, &attn_dims(c)));
    }
    shapes.extend(Pieces::shapes(t, PREFILL_TILE, h));
    shapes.extend(Pieces::shapes(t, MOE_CHUNK, h));
    for n in piece_sizes(t, PREFILL_TILE) {
        shapes.extend(TileScratch::shapes(c, n));
    }
    for n in piece_sizes(t, MOE_CHUNK) {
        shapes.extend(ChunkScratch::shapes(c, n));
    }
    // A grouped expert call's scratch (backends with grouped kernels; counted for all).
    f32_bytes(&shapes) + ollm_ops::grouped_scratch_bytes(h, c.moe_intermediate_size)
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
        let ld = TableLoader { ld: Loader { catalog, backend: backend.as_ref() }, cfg: &cfg };
        let h = cfg.hidden_size;
        let embed = ld.require(&GLOBAL, EMBED, None)?;
        let layers = PlacedLayers::load_grouped(
            &backend,
            catalog,
            placement,
            cfg.n_layers,
            |l| cfg.layout(l),
            |l| Layer::load(&ld, l),
        )?;
        let consts = (0..cfg.n_layers)
            .map(|l| {
                let f = |name| ld.require(&LAYER, name, Some(l));
                Ok(match cfg.mixers[l] {
                    Mixer::Full => None,
                    Mixer::Linear => Some(DeltaConsts { conv: f(CONV)?, dt_bias: f(DT_BIAS)?, a_log: f(A_LOG)? }),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let moe_layers = cfg.moe_layers();
        let experts = match moe_layers.is_empty() {
            true => None,
            false => Some(ExpertCache::new(
                backend.clone(),
                expert_sources(
                    catalog,
                    &super::tensors::EXPERTS,
                    &moe_layers,
                    cfg.n_experts,
                    (h, cfg.moe_intermediate_size),
                )?,
                &moe_layers,
                cfg.n_experts,
                (h, cfg.moe_intermediate_size),
                placement.experts.as_ref(),
            )?),
        };
        let final_norm = ld.require(&GLOBAL, FINAL_NORM, None)?;
        let lm_head = match !cfg.tie_word_embeddings || catalog.contains(LM_HEAD) {
            true => Some(ld.require(&GLOBAL, LM_HEAD, None)?),
            false => None,
        };
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
        let (all_experts, routed) = experts.as_ref().map_or((0, 0), |x| {
            let s = x.stats();
            (s.expert_bytes * s.experts as u64, s.expert_bytes * (moe_layers.len() * cfg.experts_per_token) as u64)
        });
        // A separate head is read whole, the embedding one row; a tied one is read whole.
        let info = ModelInfo::new(
            &super::dims_of(&cfg),
            InfoParts {
                architecture,
                catalog,
                kv_elem_bytes: backend.kv_dtype().size_bytes() as u64,
                untied_embed_bytes: lm_head.as_ref().map(|_| embed.size_bytes() as u64),
                experts: (all_experts, routed),
                eos_token_ids: cfg.eos_token_ids.clone(),
                bos_token_id: cfg.bos_token_id,
                config_text: format!("{cfg:?}"),
            },
        )?;
        let kv_offload = placement.kv.clone();
        Ok(Self { cfg, info, backend, embed, layers, consts, experts, final_norm, lm_head, rope, slot, kv_offload })
    }

    pub fn config(&self) -> &Qwen3NextConfig {
        &self.cfg
    }

    /// `s.y = GatedDeltaNet(a)` for the rows of a tile that holds the segments `segs` of the
    /// batch's sequences (docs/models.md §4.5): projections, slices, norms and gates over every
    /// row; the convolution and the delta rule per segment, from and into its sequence's fixed
    /// state of DeltaNet slot `i` (the recurrent form for one row, the chunked form for more).
    /// One segment runs on the tile's buffers themselves.
    fn deltanet(
        &self,
        (w, dc): (&LinearAttn, &DeltaConsts),
        a: &Tensor,
        (segs, items, i): (&[Segment], &mut [BatchSeq<'_>], usize),
        (s, bufs): (&mut DeltaScratch, &mut SegSets),
    ) -> Result<()> {
        let be = self.backend.as_ref();
        let dn = be.deltanet()?;
        let c = &self.cfg;
        let (nk, dk, dv, r) = (c.linear_k_heads, c.linear_k_dim, c.linear_v_dim, c.v_per_k());
        let nv = c.linear_v_heads;
        let ch = c.conv_channels();
        be.matmul(a, &w.qkvz, None, &mut s.p)?;
        be.matmul(a, &w.ba, None, &mut s.ba)?;
        // Per key head g: [q (dk) | k (dk) | v (r·dv) | z (r·dv)] into the convolution's
        // channel order [all q | all k | all v], and z apart.
        let group = 2 * dk + 2 * r * dv;
        let cut = |offset, width, out_offset| HeadSlice { heads: nk, stride: group, offset, width, out_offset };
        be.slice_heads(&s.p, cut(0, dk, 0), &mut s.u)?;
        be.slice_heads(&s.p, cut(dk, dk, nk * dk), &mut s.u)?;
        be.slice_heads(&s.p, cut(2 * dk, r * dv, 2 * nk * dk), &mut s.u)?;
        be.slice_heads(&s.p, cut(2 * dk + r * dv, r * dv, 0), &mut s.z)?;
        let ba_cut = |offset| HeadSlice { heads: nk, stride: 2 * r, offset, width: r, out_offset: 0 };
        be.slice_heads(&s.ba, ba_cut(0), &mut s.b)?;
        be.slice_heads(&s.ba, ba_cut(r), &mut s.alpha)?;
        let no_conv = || ollm_ops::OpsError::Backend("no conv state".into());
        let no_rule = || ollm_ops::OpsError::Backend("no recurrent state".into());
        let one = match segs {
            [seg] => Some(seg.seq),
            _ => None,
        };
        match one {
            Some(q) => {
                let conv_state = items[q].state.fixed_mut(i).first_mut().ok_or_else(no_conv)?;
                dn.causal_conv1d(&s.u, &dc.conv, conv_state, &mut s.conv)?;
            }
            None => {
                for seg in segs {
                    let [u, out, ..] = bufs.get(be, seg.n, |n| delta_seg_shapes(c, n))? else {
                        return Err(internal("DeltaNet segment scratch"));
                    };
                    copy_outer_rows(be, &s.u, seg.row, seg.n, u)?;
                    let conv_state = items[seg.seq].state.fixed_mut(i).first_mut().ok_or_else(no_conv)?;
                    dn.causal_conv1d(u, &dc.conv, conv_state, out)?;
                    write_outer_rows(be, out, &mut s.conv, seg.row)?;
                }
            }
        }
        let whole = |offset, width| HeadSlice { heads: 1, stride: ch, offset, width, out_offset: 0 };
        be.slice_heads(&s.conv, whole(0, nk * dk), &mut s.q)?;
        be.slice_heads(&s.conv, whole(nk * dk, nk * dk), &mut s.k)?;
        be.slice_heads(&s.conv, whole(2 * nk * dk, nv * dv), &mut s.v)?;
        dn.l2_norm(&mut s.q, L2_EPS, (dk as f32).powf(-0.5))?;
        dn.l2_norm(&mut s.k, L2_EPS, 1.0)?;
        dn.deltanet_gates(&s.alpha, &s.b, &dc.a_log, &dc.dt_bias, &mut s.g, &mut s.beta)?;
        let form = |t: usize| if t == 1 { DeltaForm::Recurrent } else { DeltaForm::Chunked };
        match one {
            Some(q) => {
                let st = items[q].state.fixed_mut(i).get_mut(1).ok_or_else(no_rule)?;
                let rule = DeltaRule { q: &s.q, k: &s.k, v: &s.v, g: &s.g, beta: &s.beta };
                dn.delta_rule(rule, st, &mut s.o, form(a.shape()[0]))?;
            }
            None => {
                for seg in segs {
                    let [_, _, q, k, v, g, beta, o] = bufs.get(be, seg.n, |n| delta_seg_shapes(c, n))? else {
                        return Err(internal("DeltaNet segment scratch"));
                    };
                    for (from, to) in [(&s.q, &mut *q), (&s.k, &mut *k), (&s.v, &mut *v), (&s.g, &mut *g)] {
                        copy_outer_rows(be, from, seg.row, seg.n, to)?;
                    }
                    copy_outer_rows(be, &s.beta, seg.row, seg.n, beta)?;
                    let st = items[seg.seq].state.fixed_mut(i).get_mut(1).ok_or_else(no_rule)?;
                    let rule = DeltaRule { q, k, v, g, beta };
                    dn.delta_rule(rule, st, o, form(seg.n))?;
                    write_outer_rows(be, o, &mut s.o, seg.row)?;
                }
            }
        }
        dn.gated_rms_norm(&s.o, &s.z, &w.norm, c.rms_norm_eps, &mut s.normed)?;
        be.matmul(&s.normed, &w.out, None, &mut s.y)?;
        Ok(())
    }

    /// `s.y = GatedAttention(a)` for the rows of a tile that holds the segments `segs` of the
    /// batch's sequences (docs/models.md §4.4): projections, slices, norms, the gate and the
    /// output over every row; rotation, cache append and attention per segment, at its
    /// positions against its sequence's cache of attention slot `i`.
    fn attention(
        &self,
        (l, w): (usize, &FullAttn),
        a: &Tensor,
        (segs, items, i): (&[Segment], &mut [BatchSeq<'_>], usize),
        (s, bufs): (&mut AttnScratch, &mut SegBufs),
    ) -> Result<()> {
        let be = self.backend.as_ref();
        let c = &self.cfg;
        let (nh, d) = (c.n_heads, c.head_dim);
        be.matmul(a, &w.q, None, &mut s.qg)?;
        // Per head [q (d) | gate (d)].
        let half = |offset| HeadSlice { heads: nh, stride: 2 * d, offset, width: d, out_offset: 0 };
        be.slice_heads(&s.qg, half(0), &mut s.q_raw)?;
        be.slice_heads(&s.qg, half(d), &mut s.gate)?;
        be.matmul(a, &w.k, None, &mut s.k_raw)?;
        be.matmul(a, &w.v, None, &mut s.v)?;
        be.rms_norm(&s.q_raw, &w.q_norm, c.rms_norm_eps, NormKind::ZeroCentered, &mut s.q)?;
        be.rms_norm(&s.k_raw, &w.k_norm, c.rms_norm_eps, NormKind::ZeroCentered, &mut s.k)?;
        let end = segs.iter().map(|g| g.pos0 + g.n).max().unwrap_or(0);
        let rope = self.rope.covering(be, end)?;
        let params = AttnParams { scale: (d as f32).powf(-0.5), window: None, sinks: None, origin: 0 };
        if let [seg] = segs {
            be.rope(&mut s.q, &rope, seg.pos0)?;
            be.rope(&mut s.k, &rope, seg.pos0)?;
            let kv = items[seg.seq].state.layer_for(be, i, seg.pos0, seg.n)?;
            append_and_attend(be, kv, (&s.k, &s.v), &s.q, (l, seg.pos0), &params, &mut s.ctx)?;
        } else {
            for seg in segs {
                let [q, k, v, ctx] = bufs.get(be, seg.n, &attn_dims(c))?;
                copy_outer_rows(be, &s.q, seg.row, seg.n, q)?;
                copy_outer_rows(be, &s.k, seg.row, seg.n, k)?;
                copy_outer_rows(be, &s.v, seg.row, seg.n, v)?;
                be.rope(q, &rope, seg.pos0)?;
                be.rope(k, &rope, seg.pos0)?;
                let kv = items[seg.seq].state.layer_for(be, i, seg.pos0, seg.n)?;
                append_and_attend(be, kv, (k, v), q, (l, seg.pos0), &params, ctx)?;
                write_outer_rows(be, ctx, &mut s.ctx, seg.row)?;
            }
        }
        let all = HeadSlice { heads: 1, stride: nh * d, offset: 0, width: nh * d, out_offset: 0 };
        be.slice_heads(&s.ctx, all, &mut s.o)?;
        be.sigmoid_mul(&mut s.o, &s.gate)?;
        be.matmul(&s.o, &w.o, None, &mut s.y)?;
        Ok(())
    }

    /// `y = MoE(b)`: routed experts (softmax over all, top-k, renormalised) plus the shared
    /// expert scaled by σ(b·w_sg) (docs/models.md §4.6).
    /// The sum is a fresh zeroed tensor (the experts' outputs are added into it); the router
    /// logits and the shared expert's activations are the chunk's scratch.
    fn moe(
        &self,
        (l, m): (usize, &Moe),
        b: &Tensor,
        logits: &mut Tensor,
        (shared, sg): (&mut MlpScratch, &mut Tensor),
    ) -> Result<Tensor> {
        let be = self.backend.as_ref();
        let moe = be.moe()?;
        let c = &self.cfg;
        let (t, h) = (b.shape()[0], c.hidden_size);
        be.matmul(b, &m.router, None, logits)?;
        let k = c.experts_per_token;
        let mode = RouterMode::TopKOfSoftmax { norm_topk_prob: c.norm_topk_prob };
        let (ids, weights) = moe.router_topk(logits, k, mode)?;
        let routed = Routed::new(&ids, &weights, k, c.n_experts);
        let rows = &routed.rows;
        let mut acc = be.zeros(vec![t, h])?;
        let cache = self.experts.as_ref().ok_or_else(|| internal("no experts"))?;
        if t > PACKED_MAX_ROWS && moe.has_grouped_experts() && cache.groups_as_stored() {
            // A prompt: each group of resident experts in a few grouped launches.
            cache.run_layer_grouped::<crate::ModelError>(l, &routed.used, &mut |group| {
                let refs = routed_refs(group, rows);
                run_experts(be, b, &refs, ExpertAct::SiluMul, &mut acc, t)?;
                Ok(())
            })?;
        } else {
            self.experts_one_by_one(l, (b, &routed), cache, &mut acc)?;
        }
        gated_mlp(be, &m.shared, b, shared)?;
        be.matmul(b, &m.shared_gate, None, sg)?;
        be.sigmoid_mul(&mut shared.out, sg)?;
        be.add_assign(&mut acc, &shared.out)?;
        Ok(acc)
    }

    /// `acc += Σ_e w · expert_e(b)` one expert at a time (decode; backends without grouped
    /// kernels).
    fn experts_one_by_one(
        &self,
        l: usize,
        (b, routed): (&Tensor, &Routed),
        cache: &ExpertCache,
        acc: &mut Tensor,
    ) -> Result<()> {
        let be = self.backend.as_ref();
        let moe = be.moe()?;
        let c = &self.cfg;
        let h = c.hidden_size;
        let rows = &routed.rows;
        let rows_of = |e: u32| routed.count(e);
        // One expert call's rows and activations, kept while the next call has as many rows.
        let mut scratch: Option<(Tensor, MlpScratch)> = None;
        cache.run_layer::<crate::ModelError>(l, &routed.used, &rows_of, &mut |e, w: &ExpertWeights<'_>| {
            let (rs, ws) = &rows[e as usize];
            let (x, s) = match scratch.take() {
                Some(xs) if xs.0.shape()[0] == rs.len() => scratch.insert(xs),
                _ => scratch
                    .insert((be.zeros(vec![rs.len(), h])?, MlpScratch::new(be, rs.len(), h, c.moe_intermediate_size)?)),
            };
            moe.gather_rows(b, rs, x)?;
            let up = w.up.ok_or_else(|| internal("a fused gate_up expert"))?;
            w.gate_up.matmul(be, x, None, &mut s.gate)?;
            up.matmul(be, x, None, &mut s.up)?;
            be.silu_mul(&s.gate, &s.up, &mut s.act)?;
            w.down.matmul(be, &s.act, None, &mut s.out)?;
            moe.scatter_add_rows(&s.out, rs, ws, acc)?;
            Ok(())
        })?;
        Ok(())
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
        let mut items = [BatchSeq::new(ids, state, wanted)];
        Ok(self.run(&mut items, trace)?.pop().unwrap_or_default())
    }

    fn forward_batch(&self, items: &mut [BatchSeq<'_>]) -> Result<Vec<Vec<f32>>> {
        let why = "its Gated DeltaNet layers keep one recurrent state per sequence, not one per branch";
        crate::refuse_trees(items, &self.info.architecture, why)?;
        self.run(items, None)
    }
}

impl Qwen3Next {
    /// [`Self::run_layers`] on the backend's compute threads
    /// ([`on_compute_threads`](crate::common::forward::on_compute_threads)).
    fn run(&self, items: &mut [BatchSeq<'_>], trace: Option<&dyn TraceSink>) -> Result<Vec<Vec<f32>>> {
        let streamed = self.layers.stream_stats().is_some();
        crate::common::forward::on_compute_threads(self.backend.as_ref(), streamed, || self.run_layers(items, trace))
    }

    /// The forward of every item's rows in one pass over the layers: the mixers per sequence
    /// segment of each tile where they hold state (DeltaNet's convolution and rule, attention's
    /// cache), everything else and the MoE over every row (a routed expert is moved and run once
    /// per chunk for the whole batch).
    fn run_layers(&self, items: &mut [BatchSeq<'_>], trace: Option<&dyn TraceSink>) -> Result<Vec<Vec<f32>>> {
        let be = self.backend.as_ref();
        let c = &self.cfg;
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        let (spans, mut x) =
            crate::common::forward::begin_batch(be, items, &self.embed, (c.vocab_size, c.max_positions))?;
        if let Some(tr) = trace {
            tr.record(None, "embed", &x);
        }
        let t = x.shape()[0];
        let mut tiles = Pieces::new(be, t, PREFILL_TILE, h)?;
        let mut chunks = Pieces::new(be, t, MOE_CHUNK, h)?;
        let mut tile_bufs = PerSize::new(&piece_sizes(t, PREFILL_TILE), |n| TileScratch::new(be, c, n))?;
        let mut chunk_bufs = PerSize::new(&piece_sizes(t, MOE_CHUNK), |n| ChunkScratch::new(be, c, n))?;
        let (mut delta_segs, mut attn_segs) = (SegSets::default(), SegBufs::default());
        for l in 0..self.layers.len() {
            let full = self.cfg.mixers[l] == Mixer::Full;
            let i = self.slot[l];
            if full {
                for it in items.iter_mut() {
                    it.state.acquire(be, i)?;
                }
            }
            self.layers.with_layer(l, |layer| {
                tiles.each(be, &mut x, &mut |xt, start| {
                    let n = xt.shape()[0];
                    let segs = segments(&spans, start, n);
                    let s = tile_bufs.get(n)?;
                    be.rms_norm(xt, &layer.input_norm, eps, NormKind::ZeroCentered, &mut s.normed)?;
                    let seqs = (&segs[..], &mut *items, i);
                    let y = match (&layer.mixer, &self.consts[l], &mut s.delta, &mut s.attn) {
                        (MixerWeights::Linear(w), Some(dc), Some(d), _) => {
                            self.deltanet((w, dc), &s.normed, seqs, (d, &mut delta_segs))?;
                            &d.y
                        }
                        (MixerWeights::Full(w), _, _, Some(a)) => {
                            self.attention((l, w), &s.normed, seqs, (a, &mut attn_segs))?;
                            &a.y
                        }
                        _ => return Err(internal(&format!("layer {l} has no DeltaNet constants or scratch"))),
                    };
                    Ok(be.add_assign(xt, y)?)
                })?;
                chunks.each(be, &mut x, &mut |xc, _| {
                    let n = xc.shape()[0];
                    let s = chunk_bufs.get(n)?;
                    be.rms_norm(xc, &layer.post_norm, eps, NormKind::ZeroCentered, &mut s.normed)?;
                    match (&layer.mlp, &mut s.logits, &mut s.shared, &mut s.dense) {
                        (Mlp::Moe(m), Some(logits), Some((shared, sg)), _) => {
                            let y = self.moe((l, m), &s.normed, logits, (shared, sg))?;
                            Ok(be.add_assign(xc, &y)?)
                        }
                        (Mlp::Dense(w), _, _, Some(d)) => {
                            gated_mlp(be, w, &s.normed, d)?;
                            Ok(be.add_assign(xc, &d.out)?)
                        }
                        _ => Err(internal(&format!("layer {l} has no MLP scratch"))),
                    }
                })
            })?;
            if full {
                for it in items.iter_mut() {
                    it.state.release(be, i)?;
                }
            }
            if let Some(tr) = trace {
                tr.record(Some(l), "layer_out", &x);
            }
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let norm = (&self.final_norm, eps, NormKind::ZeroCentered);
        crate::common::forward::finish_batch(be, &x, (&spans, items), norm, head, trace)
    }
}

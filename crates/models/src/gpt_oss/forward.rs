//! The GPT-OSS model: weights on a backend and the forward pass of docs/models.md §3.3. Attention
//! and router weights are per-layer tensors (resident or streamed like Llama's layers); the
//! experts go through an [`ExpertCache`].

use std::sync::Arc;

use ollm_kv::{KvShape, SeqState};
use ollm_ops::{Backend, ExpertAct, NormKind, RouterMode, Tensor, run_experts};
use ollm_weights::Catalog;

use super::config::{GptOssConfig, SWIGLU_ALPHA};
use super::tensors::*;
use crate::common::attention::{AttnCall, AttnDims, AttnScratch, AttnWeights, SegBufs, batched_self_attention};
use crate::common::experts::expert_sources;
use crate::common::forward::{
    PREFILL_TILE, PerSize, Pieces, Segment, batch_stream_shapes, f32_bytes, piece_sizes, seg_set_rows, segments,
};
use crate::common::moe::{Routed, routed_refs};
use crate::common::rope::RopeTables;
use crate::common::tensors::{TableLoader, streamed};
use crate::common::weights::Loader;
use crate::trace::TraceSink;
use crate::{BatchSeq, CausalLm, InfoParts, LogitsWanted, ModelInfo, Result};
use ollm_residency::experts::{ExpertCache, ExpertStats, ExpertWeights, PACKED_MAX_ROWS};
use ollm_residency::plan::Placement;
use ollm_residency::stream::{LayerTensors, PlacedLayers, StreamStats};

/// Rows routed together: each expert is moved at most once per this many prompt tokens.
pub const MOE_CHUNK: usize = 8192;
/// Rows one expert multiplies at a time (bounds the expert activations).
pub const EXPERT_ROWS: usize = 1024;

/// One decoder layer's weights, the experts, the sinks and the router aside.
#[derive(Debug)]
pub struct Layer {
    input_norm: Tensor,
    attn: AttnWeights,
    post_attn_norm: Tensor,
    /// The names of its tensors (what a streamed copy refills).
    names: Vec<&'static str>,
}

impl Layer {
    fn load(ld: &TableLoader<'_, GptOssConfig>, l: usize) -> Result<Self> {
        let t = |name| ld.require(&LAYER, name, Some(l));
        let opt = |name| ld.get(&LAYER, name, Some(l));
        Ok(Layer {
            input_norm: t(INPUT_NORM)?,
            attn: AttnWeights {
                q: t(Q)?,
                k: t(K)?,
                v: t(V)?,
                o: t(O)?,
                q_bias: opt(Q_BIAS)?,
                k_bias: opt(K_BIAS)?,
                v_bias: opt(V_BIAS)?,
                o_bias: opt(O_BIAS)?,
            },
            post_attn_norm: t(POST_NORM)?,
            names: streamed(&LAYER, ld.cfg, l),
        })
    }
}

impl LayerTensors for Layer {
    fn suffixes(&self) -> Vec<&'static str> {
        self.names.clone()
    }

    fn tensor_mut(&mut self, suffix: &str) -> Option<&mut Tensor> {
        match suffix {
            INPUT_NORM => Some(&mut self.input_norm),
            Q => Some(&mut self.attn.q),
            K => Some(&mut self.attn.k),
            V => Some(&mut self.attn.v),
            O => Some(&mut self.attn.o),
            Q_BIAS => self.attn.q_bias.as_mut(),
            K_BIAS => self.attn.k_bias.as_mut(),
            V_BIAS => self.attn.v_bias.as_mut(),
            O_BIAS => self.attn.o_bias.as_mut(),
            POST_NORM => Some(&mut self.post_attn_norm),
            _ => None,
        }
    }
}

/// A loaded GPT-OSS model. Owns its weights; holds no per-sequence state.
#[derive(Debug)]
pub struct GptOss {
    cfg: GptOssConfig,
    info: ModelInfo,
    backend: Arc<dyn Backend>,
    embed: Tensor,
    /// The decoder layers, resident or streamed.
    layers: PlacedLayers<Layer>,
    experts: ExpertCache,
    /// Per layer: the sink logits `[n_heads]`, f32.
    sinks: Vec<Tensor>,
    /// Per layer: the router `[E, H]` and its bias `[E]`, f32.
    routers: Vec<(Tensor, Tensor)>,
    final_norm: Tensor,
    lm_head: Option<Tensor>,
    rope: RopeTables,
    kv_offload: Option<ollm_kv::KvOffload>,
}

/// The activations of one expert call of `n` rows.
struct ExpertScratch {
    n: usize,
    x: Tensor,
    gate_up: Tensor,
    act: Tensor,
    y: Tensor,
}

impl ExpertScratch {
    /// Shapes of x, gate_up, act and y.
    fn shapes(n: usize, h: usize, i: usize) -> Vec<Vec<usize>> {
        vec![vec![n, h], vec![n, 2 * i], vec![n, i], vec![n, h]]
    }

    fn new(be: &dyn Backend, n: usize, h: usize, i: usize) -> Result<Self> {
        let [x, gate_up, act, y] = crate::common::forward::alloc_all(be, Self::shapes(n, h, i))?
            .try_into()
            .map_err(|_| ollm_ops::OpsError::Backend("internal: expert scratch".into()))?;
        Ok(Self { n, x, gate_up, act, y })
    }
}

/// Activations of one attention tile of `n` rows, reused by every layer.
struct TileScratch {
    normed: Tensor,
    attn: AttnScratch,
}

impl TileScratch {
    fn shapes(cfg: &GptOssConfig, n: usize) -> Vec<Vec<usize>> {
        let mut v = vec![vec![n, cfg.hidden_size]];
        v.extend(AttnScratch::shapes(n, &dims(cfg)));
        v
    }

    fn new(be: &dyn Backend, cfg: &GptOssConfig, n: usize) -> Result<Self> {
        Ok(Self { normed: be.zeros(vec![n, cfg.hidden_size])?, attn: AttnScratch::new(be, n, &dims(cfg))? })
    }
}

fn dims(cfg: &GptOssConfig) -> AttnDims {
    AttnDims { hidden: cfg.hidden_size, n_heads: cfg.n_heads, n_kv_heads: cfg.n_kv_heads, head_dim: cfg.head_dim }
}

/// Shapes of a MoE chunk of `c` rows: the normed rows and the router logits (reused by every
/// layer), and what each layer's MoE allocates for it: the weighted sum of the experts' outputs
/// (zeroed by its allocation) and the activations of the largest expert call.
fn chunk_shapes(cfg: &GptOssConfig, c: usize) -> Vec<Vec<usize>> {
    let h = cfg.hidden_size;
    let mut v = vec![vec![c, h], vec![c, cfg.n_experts], vec![c, h]];
    v.extend(ExpertScratch::shapes(EXPERT_ROWS.min(c), h, cfg.intermediate_size));
    v
}

/// Device bytes of the activations a forward of `t` rows in `seqs` sequences allocates at most
/// (each sequence's last row's logits wanted): the residual stream, the tiles' and chunks'
/// buffers, a scratch set per tile length, what a MoE chunk holds at once, and for several
/// sequences their segments' buffers. The experts' unpacked matrices belong to the expert cache.
pub fn scratch_bytes(cfg: &GptOssConfig, t: usize, seqs: usize) -> u64 {
    let h = cfg.hidden_size;
    let mut shapes = batch_stream_shapes(t, seqs, h, cfg.vocab_size);
    shapes.extend(SegBufs::shapes(seg_set_rows(t, seqs), &dims(cfg)));
    shapes.extend(Pieces::shapes(t, PREFILL_TILE, h));
    shapes.extend(Pieces::shapes(t, MOE_CHUNK, h));
    for n in piece_sizes(t, PREFILL_TILE) {
        shapes.extend(TileScratch::shapes(cfg, n));
    }
    for c in piece_sizes(t, MOE_CHUNK) {
        shapes.extend(chunk_shapes(cfg, c));
    }
    // A grouped expert call's scratch (backends with grouped kernels; counted for all).
    f32_bytes(&shapes) + ollm_ops::grouped_scratch_bytes(h, cfg.intermediate_size)
}

impl GptOss {
    /// Loads with `placement` (layers resident or streamed; experts resident unless
    /// `placement.experts` says otherwise).
    pub fn load_placed(
        cfg: GptOssConfig,
        architecture: String,
        catalog: &Catalog,
        backend: Arc<dyn Backend>,
        placement: &Placement,
    ) -> Result<Self> {
        let ld = TableLoader { ld: Loader { catalog, backend: backend.as_ref() }, cfg: &cfg };
        let h = cfg.hidden_size;
        let embed = ld.require(&GLOBAL, EMBED, None)?;
        let layers = PlacedLayers::load(&backend, catalog, placement, cfg.n_layers, |l| Layer::load(&ld, l))?;
        let moe_layers: Vec<usize> = (0..cfg.n_layers).collect();
        let sources = expert_sources(catalog, &EXPERTS, &moe_layers, cfg.n_experts, (h, cfg.intermediate_size))?;
        let experts = ExpertCache::new(
            backend.clone(),
            sources,
            &moe_layers,
            cfg.n_experts,
            (h, cfg.intermediate_size),
            placement.experts.as_ref(),
        )?;
        let t = |name, l| ld.require(&LAYER, name, Some(l));
        let sinks = (0..cfg.n_layers).map(|l| t(SINKS, l)).collect::<Result<Vec<_>>>()?;
        let routers = (0..cfg.n_layers).map(|l| Ok((t(ROUTER, l)?, t(ROUTER_BIAS, l)?))).collect::<Result<Vec<_>>>()?;
        let final_norm = ld.require(&GLOBAL, FINAL_NORM, None)?;
        let lm_head = ld.get(&GLOBAL, LM_HEAD, None)?;
        let rope =
            RopeTables::new(backend.as_ref(), cfg.rope_theta, cfg.head_dim, &cfg.rope_scaling, cfg.max_positions)?;
        let expert_stats = experts.stats();
        let all_experts = expert_stats.expert_bytes * expert_stats.experts as u64;
        let routed = expert_stats.expert_bytes * (cfg.n_layers * cfg.experts_per_token) as u64;
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
        Ok(Self { cfg, info, backend, embed, layers, experts, sinks, routers, final_norm, lm_head, rope, kv_offload })
    }

    pub fn config(&self) -> &GptOssConfig {
        &self.cfg
    }

    /// `x += Attn(RMS(x))` for the rows of one tile of layer `l`, which holds the segments
    /// `segs` of the batch's sequences (each attends over its own cache: its own window base,
    /// the layer's sinks).
    fn attention_block(
        &self,
        (l, layer): (usize, &Layer),
        x: &mut Tensor,
        (segs, items): (&[Segment], &mut [BatchSeq<'_>]),
        (normed, attn, bufs): (&mut Tensor, &mut AttnScratch, &mut SegBufs),
        trace: Option<&dyn TraceSink>,
    ) -> Result<()> {
        let be = self.backend.as_ref();
        be.rms_norm(x, &layer.input_norm, self.cfg.rms_norm_eps, NormKind::Oss, normed)?;
        let scale = (self.cfg.head_dim as f32).powf(-0.5);
        let end = segs.iter().map(|g| g.pos0 + g.n).max().unwrap_or(0);
        let rope = self.rope.covering(be, end)?;
        let call =
            AttnCall { layer: l, pos0: 0, rope: &rope, scale, window: self.cfg.window(l), sinks: self.sinks.get(l) };
        let seqs = (segs, items, l);
        batched_self_attention(be, &layer.attn, normed, seqs, &call, (attn, bufs, &dims(&self.cfg)), trace)?;
        be.add_assign(x, &attn.out)?;
        Ok(())
    }

    /// `x += MoE(RMS(x))` for the rows of one chunk (docs/models.md §3.3): route every row, then
    /// run each chosen expert once over all the rows that chose it, the weighted outputs summed
    /// in f32.
    fn moe_block(
        &self,
        (l, layer): (usize, &Layer),
        x: &mut Tensor,
        (normed, logits): (&mut Tensor, &mut Tensor),
    ) -> Result<()> {
        let be = self.backend.as_ref();
        let moe = be.moe()?;
        let (c, h) = (x.shape()[0], self.cfg.hidden_size);
        let (n_e, k) = (self.cfg.n_experts, self.cfg.experts_per_token);
        be.rms_norm(x, &layer.post_attn_norm, self.cfg.rms_norm_eps, NormKind::Oss, normed)?;
        let (router, router_bias) = &self.routers[l];
        be.matmul(normed, router, Some(router_bias), logits)?;
        let (ids, weights) = moe.router_topk(logits, k, RouterMode::SoftmaxOfTopK)?;
        let routed = Routed::new(&ids, &weights, k, n_e);
        let rows = &routed.rows;
        let mut acc = be.zeros(vec![c, h])?;
        let inter = self.cfg.intermediate_size;
        let limit = self.cfg.swiglu_limit;
        if c > PACKED_MAX_ROWS && moe.has_grouped_experts() && self.experts.groups_as_stored() {
            // A prompt: each group of resident experts in a few grouped launches.
            let act = ExpertAct::ClampedSwiglu { limit, alpha: SWIGLU_ALPHA };
            self.experts.run_layer_grouped::<crate::ModelError>(l, &routed.used, &mut |group| {
                let refs = routed_refs(group, rows);
                run_experts(be, normed, &refs, act, &mut acc, EXPERT_ROWS)?;
                Ok(())
            })?;
            be.add_assign(x, &acc)?;
            return Ok(());
        }
        let mut scratch: Option<ExpertScratch> = None;
        let rows_of = |e: u32| routed.count(e);
        self.experts.run_layer::<crate::ModelError>(l, &routed.used, &rows_of, &mut |e, w: &ExpertWeights<'_>| {
            let (rs, wv) = &rows[e as usize];
            for (sub, sub_w) in rs.chunks(EXPERT_ROWS).zip(wv.chunks(EXPERT_ROWS)) {
                let s = match scratch.take() {
                    Some(s) if s.n == sub.len() => scratch.insert(s),
                    _ => scratch.insert(ExpertScratch::new(be, sub.len(), h, inter)?),
                };
                moe.gather_rows(normed, sub, &mut s.x)?;
                w.gate_up.matmul(be, &s.x, w.gate_up_bias, &mut s.gate_up)?;
                moe.clamped_swiglu(&s.gate_up, limit, SWIGLU_ALPHA, &mut s.act)?;
                w.down.matmul(be, &s.act, w.down_bias, &mut s.y)?;
                moe.scatter_add_rows(&s.y, sub, sub_w, &mut acc)?;
            }
            Ok(())
        })?;
        be.add_assign(x, &acc)?;
        Ok(())
    }

    /// Decode: guesses layer `l + 1`'s experts from this layer's output (normed with this
    /// layer's post-attention norm, then the next layer's router) and queues their copies, so
    /// they run during the next layer's attention. The next layer routes exactly as ever; a
    /// wrong guess costs only bus time.
    fn prefetch_next(
        &self,
        (l, layer): (usize, &Layer),
        x: &Tensor,
        (normed, logits): (&mut Tensor, &mut Tensor),
    ) -> Result<()> {
        let Some((router, router_bias)) = self.routers.get(l + 1) else { return Ok(()) };
        let be = self.backend.as_ref();
        be.rms_norm(x, &layer.post_attn_norm, self.cfg.rms_norm_eps, NormKind::Oss, normed)?;
        be.matmul(normed, router, Some(router_bias), logits)?;
        let (ids, _) = be.moe()?.router_topk(logits, self.cfg.experts_per_token, RouterMode::SoftmaxOfTopK)?;
        let mut guess: Vec<u32> = Vec::with_capacity(ids.len());
        for e in ids {
            if !guess.contains(&e) {
                guess.push(e);
            }
        }
        self.experts.prefetch(l + 1, &guess)?;
        Ok(())
    }

    /// The experts' counters.
    pub fn expert_stats(&self) -> ExpertStats {
        self.experts.stats()
    }
}

impl CausalLm for GptOss {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    fn stream_stats(&self) -> Option<StreamStats> {
        self.layers.stream_stats()
    }

    fn expert_stats(&self) -> Option<ExpertStats> {
        Some(self.experts.stats())
    }

    fn set_expert_prefetch(&self, on: bool) -> bool {
        self.experts.set_prefetch(on);
        true
    }

    fn new_state(&self) -> Result<SeqState> {
        let shapes = (0..self.cfg.n_layers)
            .map(|l| KvShape { window: self.cfg.window(l), ..KvShape::full(self.cfg.n_kv_heads, self.cfg.head_dim) })
            .collect();
        Ok(SeqState::placed(self.backend.as_ref(), shapes, self.cfg.max_positions, self.kv_offload.as_ref())?)
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
        self.run(items, None)
    }

    /// Trees go through the shared attention ([`crate::common::attention`]).
    fn supports_tree(&self) -> bool {
        true
    }
}

impl GptOss {
    /// [`Self::run_layers`] on the backend's compute threads
    /// ([`on_compute_threads`](crate::common::forward::on_compute_threads)).
    fn run(&self, items: &mut [BatchSeq<'_>], trace: Option<&dyn TraceSink>) -> Result<Vec<Vec<f32>>> {
        let streamed = self.layers.stream_stats().is_some();
        crate::common::forward::on_compute_threads(self.backend.as_ref(), streamed, || self.run_layers(items, trace))
    }

    /// The forward of every item's rows in one pass over the layers: attention per sequence
    /// segment of each tile, the MoE routed over every row of a chunk (all items' rows), so a
    /// chosen expert is moved and run once per chunk for the whole batch.
    fn run_layers(&self, items: &mut [BatchSeq<'_>], trace: Option<&dyn TraceSink>) -> Result<Vec<Vec<f32>>> {
        let be = self.backend.as_ref();
        let (h, eps) = (self.cfg.hidden_size, self.cfg.rms_norm_eps);
        let limits = (self.cfg.vocab_size, self.cfg.max_positions);
        let (spans, mut x) = crate::common::forward::begin_batch(be, items, &self.embed, limits)?;
        if let Some(tr) = trace {
            tr.record(None, "embed", &x);
        }
        let t = x.shape()[0];
        let mut tiles = Pieces::new(be, t, PREFILL_TILE, h)?;
        let mut chunks = Pieces::new(be, t, MOE_CHUNK, h)?;
        let mut attn_bufs = PerSize::new(&piece_sizes(t, PREFILL_TILE), |n| TileScratch::new(be, &self.cfg, n))?;
        let n_e = self.cfg.n_experts;
        let mut moe_bufs =
            PerSize::new(&piece_sizes(t, MOE_CHUNK), |n| Ok((be.zeros(vec![n, h])?, be.zeros(vec![n, n_e])?)))?;
        let mut seg_bufs = SegBufs::default();
        let one = tiles.is_single();
        for l in 0..self.layers.len() {
            for it in items.iter_mut() {
                it.state.acquire(be, l)?;
            }
            let run = |layer: &Layer| -> Result<()> {
                tiles.each(be, &mut x, &mut |xt, start| {
                    let n = xt.shape()[0];
                    let segs = segments(&spans, start, n);
                    let TileScratch { normed, attn } = attn_bufs.get(n)?;
                    let bufs = (normed, attn, &mut seg_bufs);
                    self.attention_block((l, layer), xt, (&segs, items), bufs, trace.filter(|_| one))
                })?;
                chunks.each(be, &mut x, &mut |xc, _| {
                    let (normed, logits) = moe_bufs.get(xc.shape()[0])?;
                    self.moe_block((l, layer), xc, (normed, logits))?;
                    if xc.shape()[0] <= PACKED_MAX_ROWS && self.experts.prefetch_enabled() {
                        self.prefetch_next((l, layer), xc, (normed, logits))?;
                    }
                    Ok(())
                })?;
                if let Some(tr) = trace {
                    tr.record(Some(l), "layer_out", &x);
                }
                Ok(())
            };
            self.layers.with_layer(l, run)?;
            for it in items.iter_mut() {
                it.state.release(be, l)?;
            }
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let norm = (&self.final_norm, eps, NormKind::Oss);
        crate::common::forward::finish_batch(be, &x, (&spans, items), norm, head, trace)
    }
}

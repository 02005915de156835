//! The Llama model: weights on a backend and the forward pass of docs/models.md §2.3.

use std::sync::Arc;

use ollm_kv::{KvShape, SeqState};
use ollm_ops::{Backend, NormKind, Tensor};
use ollm_weights::Catalog;

use super::config::LlamaConfig;
use super::tensors::*;
use crate::common::attention::{
    AttnCall, AttnDims, AttnScratch, AttnWeights, QkNorm, SegBufs, batched_self_attention_qk, fused_self_attention_add,
};
use crate::common::forward::{
    PREFILL_TILE, PerSize, Pieces, Segment, batch_stream_shapes, f32_bytes, piece_sizes, seg_set_rows, segments,
};
use crate::common::graphed::{self, StepKey};
use crate::common::mlp::{MlpScratch, MlpWeights, norm_gated_mlp_add};
use crate::common::rope::RopeTables;
use crate::common::tensors::{TableLoader, streamed};
use crate::common::weights::Loader;
use crate::trace::TraceSink;
use crate::{BatchSeq, CausalLm, InfoParts, LogitsWanted, ModelInfo, Result};
use ollm_residency::plan::Placement;
use ollm_residency::stream::{LayerTensors, PlacedLayers, StreamStats};

/// One decoder layer's weights.
#[derive(Debug)]
pub struct Layer {
    input_norm: Tensor,
    attn: AttnWeights,
    post_attn_norm: Tensor,
    mlp: MlpWeights,
    /// Qwen3's per-head q and k norms, `[head_dim]` each.
    qk_norm: Option<(Tensor, Tensor)>,
    /// The names of its tensors (what a streamed copy refills).
    names: Vec<&'static str>,
}

impl Layer {
    /// Reads layer `l` with the shapes `cfg` implies.
    fn load(ld: &TableLoader<'_, LlamaConfig>, l: usize) -> Result<Self> {
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
            mlp: MlpWeights {
                gate: t(GATE)?,
                up: t(UP)?,
                down: t(DOWN)?,
                gate_bias: opt(GATE_BIAS)?,
                up_bias: opt(UP_BIAS)?,
                down_bias: opt(DOWN_BIAS)?,
            },
            qk_norm: match (opt(Q_NORM)?, opt(K_NORM)?) {
                (Some(q), Some(k)) => Some((q, k)),
                _ => None,
            },
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
            GATE => Some(&mut self.mlp.gate),
            UP => Some(&mut self.mlp.up),
            DOWN => Some(&mut self.mlp.down),
            GATE_BIAS => self.mlp.gate_bias.as_mut(),
            UP_BIAS => self.mlp.up_bias.as_mut(),
            DOWN_BIAS => self.mlp.down_bias.as_mut(),
            Q_NORM => self.qk_norm.as_mut().map(|(q, _)| q),
            K_NORM => self.qk_norm.as_mut().map(|(_, k)| k),
            _ => None,
        }
    }
}

/// Activations of one tile of `n` rows, reused by every layer.
struct Scratch {
    normed: Tensor,
    attn: AttnScratch,
    mlp: MlpScratch,
}

impl Scratch {
    fn new(be: &dyn Backend, cfg: &LlamaConfig, n: usize) -> Result<Self> {
        Ok(Self {
            normed: be.zeros(vec![n, cfg.hidden_size])?,
            attn: AttnScratch::new(be, n, &dims(cfg))?,
            mlp: MlpScratch::new(be, n, cfg.hidden_size, cfg.intermediate_size)?,
        })
    }

    /// The shapes [`Scratch::new`] allocates.
    fn shapes(cfg: &LlamaConfig, n: usize) -> Vec<Vec<usize>> {
        let mut v = vec![vec![n, cfg.hidden_size]];
        v.extend(AttnScratch::shapes(n, &dims(cfg)));
        v.extend(MlpScratch::shapes(n, cfg.hidden_size, cfg.intermediate_size));
        v
    }
}

fn dims(cfg: &LlamaConfig) -> AttnDims {
    AttnDims { hidden: cfg.hidden_size, n_heads: cfg.n_heads, n_kv_heads: cfg.n_kv_heads, head_dim: cfg.head_dim }
}

/// Device bytes of the activations a forward of `t` rows in `seqs` sequences allocates (each
/// sequence's last row's logits wanted): the residual stream, the tiles' buffers, one scratch
/// set per tile length, and for several sequences their segments' buffers.
pub fn scratch_bytes(cfg: &LlamaConfig, t: usize, seqs: usize) -> u64 {
    let mut shapes = batch_stream_shapes(t, seqs, cfg.hidden_size, cfg.vocab_size);
    shapes.extend(Pieces::shapes(t, PREFILL_TILE, cfg.hidden_size));
    for n in piece_sizes(t, PREFILL_TILE) {
        shapes.extend(Scratch::shapes(cfg, n));
    }
    shapes.extend(SegBufs::shapes(seg_set_rows(t, seqs), &dims(cfg)));
    f32_bytes(&shapes)
}

/// A loaded Llama model. Owns its weights on the backend; holds no per-sequence state.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    info: ModelInfo,
    backend: Arc<dyn Backend>,
    embed: Tensor,
    /// The decoder layers, resident or streamed.
    layers: PlacedLayers<Layer>,
    final_norm: Tensor,
    /// None when the embeddings are tied (the head is `embed`).
    lm_head: Option<Tensor>,
    rope: RopeTables,
    /// Some: each sequence's KV cache lives off the device.
    kv_offload: Option<ollm_kv::KvOffload>,
    /// This load's identity in decode-graph keys ([`graphed::model_id`]).
    graph_id: u64,
}

impl Llama {
    /// Reads every tensor named by the config, checking shapes, onto `backend`.
    pub fn load(cfg: LlamaConfig, architecture: String, catalog: &Catalog, backend: Arc<dyn Backend>) -> Result<Self> {
        let all = Placement::resident(cfg.n_layers);
        Self::load_placed(cfg, architecture, catalog, backend, &all)
    }

    /// Loads with `placement`: resident layers onto `backend`, the others streamed through
    /// `placement.slots` device slots from pinned RAM or the disk.
    pub fn load_placed(
        cfg: LlamaConfig,
        architecture: String,
        catalog: &Catalog,
        backend: Arc<dyn Backend>,
        placement: &Placement,
    ) -> Result<Self> {
        let ld = TableLoader { ld: Loader { catalog, backend: backend.as_ref() }, cfg: &cfg };
        let embed = ld.require(&GLOBAL, EMBED, None)?;
        let layers = PlacedLayers::load(&backend, catalog, placement, cfg.n_layers, |l| Layer::load(&ld, l))?;
        let final_norm = ld.require(&GLOBAL, FINAL_NORM, None)?;
        // Tied checkpoints have no lm_head; an untied config whose file lacks it is tied too (§0).
        let lm_head = ld.get(&GLOBAL, LM_HEAD, None)?;
        let rope =
            RopeTables::new(backend.as_ref(), cfg.rope_theta, cfg.head_dim, &cfg.rope_scaling, cfg.max_positions)?;
        let info = ModelInfo::new(
            &super::dims_of(&cfg),
            InfoParts {
                architecture,
                catalog,
                kv_elem_bytes: backend.kv_dtype().size_bytes() as u64,
                untied_embed_bytes: lm_head.as_ref().map(|_| embed.size_bytes() as u64),
                experts: (0, 0),
                eos_token_ids: cfg.eos_token_ids.clone(),
                bos_token_id: cfg.bos_token_id,
                config_text: format!("{cfg:?}"),
            },
        )?;
        let kv_offload = placement.kv.clone();
        let graph_id = graphed::model_id();
        Ok(Self { cfg, info, backend, embed, layers, final_norm, lm_head, rope, kv_offload, graph_id })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// `x = x + Attn(RMS(x)); x = x + MLP(RMS(x))` for decoder layer `l`, x the rows of one
    /// tile, which holds the segments `segs` of the batch's sequences.
    fn layer_forward(
        &self,
        (l, layer): (usize, &Layer),
        x: &mut Tensor,
        (segs, items): (&[Segment], &mut [BatchSeq<'_>]),
        (s, bufs): (&mut Scratch, &mut SegBufs),
        trace: Option<&dyn TraceSink>,
    ) -> Result<()> {
        let be = self.backend.as_ref();
        let eps = self.cfg.rms_norm_eps;
        let scale = (self.cfg.head_dim as f32).powf(-0.5);
        let end = segs.iter().map(|g| g.pos0 + g.n).max().unwrap_or(0);
        let rope = self.rope.covering(be, end)?;
        let call = AttnCall { layer: l, pos0: 0, rope: &rope, scale, window: None, sinks: None };
        let qk = layer.qk_norm.as_ref().map(|(q, k)| QkNorm { q, k, eps, kind: NormKind::Llama });
        let norm = (&layer.input_norm, eps, NormKind::Llama);
        let attn = (&layer.attn, qk.as_ref());
        // One sequence's rows: the fused launches (the same ops); else norm, attention, add.
        if !fused_self_attention_add(be, attn, norm, x, (segs, items, l), &call, (&mut s.attn, &mut s.normed), trace)? {
            be.rms_norm(x, &layer.input_norm, eps, NormKind::Llama, &mut s.normed)?;
            batched_self_attention_qk(
                be,
                attn,
                &s.normed,
                (segs, items, l),
                &call,
                (&mut s.attn, bufs, &dims(&self.cfg)),
                trace,
            )?;
            be.add_assign(x, &s.attn.out)?;
        }
        let norm = (&layer.post_attn_norm, eps, NormKind::Llama);
        norm_gated_mlp_add(be, &layer.mlp, norm, (&mut s.normed, &mut s.mlp), x)?;
        if let Some(tr) = trace {
            tr.record(Some(l), "layer_out", x);
        }
        Ok(())
    }
}

impl CausalLm for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    fn stream_stats(&self) -> Option<StreamStats> {
        self.layers.stream_stats()
    }

    fn new_state(&self) -> Result<SeqState> {
        let shape = KvShape::full(self.cfg.n_kv_heads, self.cfg.head_dim);
        let shapes = vec![shape; self.cfg.n_layers];
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

impl Llama {
    /// [`Self::run_layers`] on the backend's compute threads
    /// ([`on_compute_threads`](crate::common::forward::on_compute_threads)).
    fn run(&self, items: &mut [BatchSeq<'_>], trace: Option<&dyn TraceSink>) -> Result<Vec<Vec<f32>>> {
        let streamed = self.layers.stream_stats().is_some();
        crate::common::forward::on_compute_threads(self.backend.as_ref(), streamed, || self.run_layers(items, trace))
    }

    /// The forward of every item's rows: a one-token decode step of a resident model as a
    /// replayed device graph where the backend has them ([`graphed`]), else [`run_plain`](Self::run_plain).
    fn run_layers(&self, items: &mut [BatchSeq<'_>], trace: Option<&dyn TraceSink>) -> Result<Vec<Vec<f32>>> {
        let be = self.backend.as_ref();
        let resident = self.layers.stream_stats().is_none() && self.kv_offload.is_none();
        let Some(g) = graphed::eligible(be, items, (self.cfg.vocab_size, resident, trace.is_some())) else {
            return self.run_plain(items, trace);
        };
        // Room for the step first, so that the captured launches see the caches and the RoPE
        // table they will keep using.
        let pos = items[0].state.len();
        items[0].state.reserve(be, pos + 1)?;
        let rope = self.rope.covering(be, pos + 1)?;
        let key = StepKey::new(g, self.graph_id, 1)
            .tensor(&rope.cos)
            .tensor(&rope.sin)
            .caches(items[0].state, self.cfg.n_layers)
            .finish();
        graphed::decode_step(g, key, items, &mut |items| self.run_plain(items, None))
    }

    /// The forward of every item's rows in one pass over the layers.
    fn run_plain(&self, items: &mut [BatchSeq<'_>], trace: Option<&dyn TraceSink>) -> Result<Vec<Vec<f32>>> {
        let be = self.backend.as_ref();
        let eps = self.cfg.rms_norm_eps;
        let limits = (self.cfg.vocab_size, self.cfg.max_positions);
        let (spans, mut x) = crate::common::forward::begin_batch(be, items, &self.embed, limits)?;
        if let Some(tr) = trace {
            tr.record(None, "embed", &x);
        }
        let t = x.shape()[0];
        // Layer-major: every layer sees every row of every item (its weights are used once per
        // call), in tiles of at most PREFILL_TILE rows so activations stay bounded; the residual
        // stream x holds all rows.
        let mut tiles = Pieces::new(be, t, PREFILL_TILE, self.cfg.hidden_size)?;
        let mut scratch = PerSize::new(&piece_sizes(t, PREFILL_TILE), |n| Scratch::new(be, &self.cfg, n))?;
        let mut bufs = SegBufs::default();
        let one = tiles.is_single();
        for l in 0..self.layers.len() {
            for it in items.iter_mut() {
                it.state.acquire(be, l)?;
            }
            let run = |layer: &Layer| -> Result<()> {
                tiles.each(be, &mut x, &mut |xt, start| {
                    let n = xt.shape()[0];
                    let segs = segments(&spans, start, n);
                    let s = scratch.get(n)?;
                    self.layer_forward((l, layer), xt, (&segs, items), (s, &mut bufs), trace.filter(|_| one))
                })?;
                if let Some(tr) = trace.filter(|_| !one) {
                    tr.record(Some(l), "layer_out", &x);
                }
                Ok(())
            };
            self.layers.with_layer(l, run)?;
            for it in items.iter_mut() {
                it.state.release(be, l)?;
            }
        }
        // logits = RMS(x[rows]) · W_lmᵀ: [rows, V]
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let norm = (&self.final_norm, eps, NormKind::Llama);
        crate::common::forward::finish_batch(be, &x, (&spans, items), norm, head, trace)
    }
}

//! The Gemma 3 model: weights on a backend and the forward pass of docs/models.md §8.2.

use std::sync::Arc;

use ollm_kv::{KvShape, SeqState};
use ollm_ops::{Backend, NormKind, Tensor};
use ollm_weights::Catalog;

use super::config::Gemma3Config;
use super::tensors::*;
use crate::common::attention::{
    AttnCall, AttnDims, AttnScratch, AttnWeights, QkNorm, SegBufs, batched_self_attention_qk,
};
use crate::common::forward::{
    PREFILL_TILE, PerSize, Pieces, Segment, batch_stream_shapes, f32_bytes, piece_sizes, seg_set_rows, segments,
};
use crate::common::mlp::{MlpScratch, MlpWeights};
use crate::common::rope::RopeTables;
use crate::common::tensors::{TableLoader, streamed};
use crate::common::weights::Loader;
use crate::trace::TraceSink;
use crate::{BatchSeq, CausalLm, InfoParts, LogitsWanted, ModelInfo, Result};
use ollm_residency::plan::Placement;
use ollm_residency::stream::{LayerTensors, PlacedLayers, StreamStats};

/// Every Gemma 3 norm is zero-centred: `(1 + w) ⊙ r(x)`.
const NORM: NormKind = NormKind::ZeroCentered;

/// One decoder layer's weights.
#[derive(Debug)]
pub struct Layer {
    input_norm: Tensor,
    attn: AttnWeights,
    q_norm: Tensor,
    k_norm: Tensor,
    post_attn_norm: Tensor,
    pre_mlp_norm: Tensor,
    post_mlp_norm: Tensor,
    mlp: MlpWeights,
    /// The names of its tensors (what a streamed copy refills).
    names: Vec<&'static str>,
}

impl Layer {
    fn load(ld: &TableLoader<'_, Gemma3Config>, l: usize) -> Result<Self> {
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
            q_norm: t(Q_NORM)?,
            k_norm: t(K_NORM)?,
            post_attn_norm: t(POST_ATTN_NORM)?,
            pre_mlp_norm: t(PRE_MLP_NORM)?,
            post_mlp_norm: t(POST_MLP_NORM)?,
            mlp: MlpWeights {
                gate: t(GATE)?,
                up: t(UP)?,
                down: t(DOWN)?,
                gate_bias: None,
                up_bias: None,
                down_bias: None,
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
            Q_NORM => Some(&mut self.q_norm),
            K_NORM => Some(&mut self.k_norm),
            POST_ATTN_NORM => Some(&mut self.post_attn_norm),
            PRE_MLP_NORM => Some(&mut self.pre_mlp_norm),
            POST_MLP_NORM => Some(&mut self.post_mlp_norm),
            GATE => Some(&mut self.mlp.gate),
            UP => Some(&mut self.mlp.up),
            DOWN => Some(&mut self.mlp.down),
            _ => None,
        }
    }
}

/// Activations of one tile of `n` rows, reused by every layer.
struct Scratch {
    normed: Tensor,
    /// `[n, H]`: a block's output after its post-norm.
    post: Tensor,
    attn: AttnScratch,
    mlp: MlpScratch,
}

impl Scratch {
    fn new(be: &dyn Backend, cfg: &Gemma3Config, n: usize) -> Result<Self> {
        Ok(Self {
            normed: be.zeros(vec![n, cfg.hidden_size])?,
            post: be.zeros(vec![n, cfg.hidden_size])?,
            attn: AttnScratch::new(be, n, &dims(cfg))?,
            mlp: MlpScratch::new(be, n, cfg.hidden_size, cfg.intermediate_size)?,
        })
    }

    /// The shapes [`Scratch::new`] allocates.
    fn shapes(cfg: &Gemma3Config, n: usize) -> Vec<Vec<usize>> {
        let mut v = vec![vec![n, cfg.hidden_size], vec![n, cfg.hidden_size]];
        v.extend(AttnScratch::shapes(n, &dims(cfg)));
        v.extend(MlpScratch::shapes(n, cfg.hidden_size, cfg.intermediate_size));
        v
    }
}

fn dims(cfg: &Gemma3Config) -> AttnDims {
    AttnDims { hidden: cfg.hidden_size, n_heads: cfg.n_heads, n_kv_heads: cfg.n_kv_heads, head_dim: cfg.head_dim }
}

/// Device bytes of the activations a forward of `t` rows of `seqs` sequences allocates (each
/// sequence's last row's logits wanted).
pub fn scratch_bytes(cfg: &Gemma3Config, t: usize, seqs: usize) -> u64 {
    let mut shapes = batch_stream_shapes(t, seqs, cfg.hidden_size, cfg.vocab_size);
    shapes.extend(Pieces::shapes(t, PREFILL_TILE, cfg.hidden_size));
    for n in piece_sizes(t, PREFILL_TILE) {
        shapes.extend(Scratch::shapes(cfg, n));
    }
    shapes.extend(SegBufs::shapes(seg_set_rows(t, seqs), &dims(cfg)));
    f32_bytes(&shapes)
}

/// A loaded Gemma 3 text model. Owns its weights on the backend; holds no per-sequence state.
#[derive(Debug)]
pub struct Gemma3 {
    cfg: Gemma3Config,
    info: ModelInfo,
    backend: Arc<dyn Backend>,
    embed: Tensor,
    layers: PlacedLayers<Layer>,
    final_norm: Tensor,
    /// None when the embeddings are tied (the head is `embed`).
    lm_head: Option<Tensor>,
    /// RoPE of the full-attention layers.
    rope_global: RopeTables,
    /// RoPE of the sliding-window layers.
    rope_local: RopeTables,
    /// Some: each sequence's KV cache lives off the device.
    kv_offload: Option<ollm_kv::KvOffload>,
}

impl Gemma3 {
    /// Loads with `placement`: resident layers onto `backend`, the others streamed.
    pub fn load_placed(
        cfg: Gemma3Config,
        architecture: String,
        catalog: &Catalog,
        backend: Arc<dyn Backend>,
        placement: &Placement,
    ) -> Result<Self> {
        let ld = TableLoader { ld: Loader { catalog, backend: backend.as_ref() }, cfg: &cfg };
        let embed = ld.require(&GLOBAL, EMBED, None)?;
        let layers = PlacedLayers::load(&backend, catalog, placement, cfg.n_layers, |l| Layer::load(&ld, l))?;
        let final_norm = ld.require(&GLOBAL, FINAL_NORM, None)?;
        let lm_head = ld.get(&GLOBAL, LM_HEAD, None)?;
        let table = |(theta, scaling): &(f64, crate::common::rope::RopeScaling)| {
            RopeTables::new(backend.as_ref(), *theta, cfg.head_dim, scaling, cfg.max_positions)
        };
        let (rope_global, rope_local) = (table(&cfg.rope_global)?, table(&cfg.rope_local)?);
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
        Ok(Self { cfg, info, backend, embed, layers, final_norm, lm_head, rope_global, rope_local, kv_offload })
    }

    pub fn config(&self) -> &Gemma3Config {
        &self.cfg
    }

    /// `x = x + N(Attn(N(x))); x = x + N(MLP(N(x)))` for decoder layer `l` (each block between
    /// a pre- and a post-norm), x the rows of one tile holding the segments `segs`.
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
        let scale = self.cfg.query_pre_attn_scalar.powf(-0.5) as f32;
        let window = self.cfg.window(l);
        let tables = if window.is_some() { &self.rope_local } else { &self.rope_global };
        be.rms_norm(x, &layer.input_norm, eps, NORM, &mut s.normed)?;
        let end = segs.iter().map(|g| g.pos0 + g.n).max().unwrap_or(0);
        let rope = tables.covering(be, end)?;
        let call = AttnCall { layer: l, pos0: 0, rope: &rope, scale, window, sinks: None };
        let qk = QkNorm { q: &layer.q_norm, k: &layer.k_norm, eps, kind: NORM };
        batched_self_attention_qk(
            be,
            (&layer.attn, Some(&qk)),
            &s.normed,
            (segs, items, l),
            &call,
            (&mut s.attn, bufs, &dims(&self.cfg)),
            trace,
        )?;
        be.rms_norm(&s.attn.out, &layer.post_attn_norm, eps, NORM, &mut s.post)?;
        be.add_assign(x, &s.post)?;
        be.rms_norm(x, &layer.pre_mlp_norm, eps, NORM, &mut s.normed)?;
        // down(gelu_tanh(gate(x)) ⊙ up(x))
        let (w, m) = (&layer.mlp, &mut s.mlp);
        be.matmul_many(&s.normed, &[(&w.gate, None), (&w.up, None)], &mut [&mut m.gate, &mut m.up])?;
        be.gelu_tanh_mul(&m.gate, &m.up, &mut m.act)?;
        be.matmul(&m.act, &w.down, None, &mut m.out)?;
        be.rms_norm(&m.out, &layer.post_mlp_norm, eps, NORM, &mut s.post)?;
        be.add_assign(x, &s.post)?;
        if let Some(tr) = trace {
            tr.record(Some(l), "layer_out", x);
        }
        Ok(())
    }

    /// [`Self::run_layers`] on the backend's compute threads
    /// ([`on_compute_threads`](crate::common::forward::on_compute_threads)).
    fn run(&self, items: &mut [BatchSeq<'_>], trace: Option<&dyn TraceSink>) -> Result<Vec<Vec<f32>>> {
        let streamed = self.layers.stream_stats().is_some();
        crate::common::forward::on_compute_threads(self.backend.as_ref(), streamed, || self.run_layers(items, trace))
    }

    /// The forward of every item's rows in one pass over the layers.
    fn run_layers(&self, items: &mut [BatchSeq<'_>], trace: Option<&dyn TraceSink>) -> Result<Vec<Vec<f32>>> {
        let be = self.backend.as_ref();
        let eps = self.cfg.rms_norm_eps;
        let limits = (self.cfg.vocab_size, self.cfg.max_positions);
        let (spans, mut x) = crate::common::forward::begin_batch(be, items, &self.embed, limits)?;
        // Embeddings scaled by √hidden (transformers: an f32 scalar from the Python float).
        be.scale(&mut x, (self.cfg.hidden_size as f64).sqrt() as f32)?;
        if let Some(tr) = trace {
            tr.record(None, "embed", &x);
        }
        let t = x.shape()[0];
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
        // logits = cap·tanh(N(x[rows]) · W_lmᵀ / cap): [rows, V]
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let norm = (&self.final_norm, eps, NORM);
        let mut out = crate::common::forward::finish_batch(be, &x, (&spans, items), norm, head, trace)?;
        if let Some(cap) = self.cfg.final_logit_softcapping {
            // The logits are on the host by now: the CPU twin of the backend's softcap.
            for v in &mut out {
                ollm_ops::cpu::softcap(v, cap);
            }
        }
        Ok(out)
    }
}

impl CausalLm for Gemma3 {
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

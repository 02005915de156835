//! The GPT-OSS model: weights on a backend and the forward pass of models.md §3.3. Attention
//! and router weights are per-layer tensors (resident or streamed like Llama's layers); the
//! experts go through an [`ExpertCache`].

use std::sync::Arc;

use ollm_kv::{KvShape, SeqState};
use ollm_ops::{Backend, NormKind, RouterMode, Tensor};
use ollm_weights::Catalog;

use super::config::{GptOssConfig, SWIGLU_ALPHA};
use crate::common::attention::{AttnCall, AttnDims, AttnScratch, AttnWeights, self_attention};
use crate::common::forward::{each_piece, pieces};
use crate::common::moe::Routed;
use crate::common::rope::RopeTables;
use crate::common::weights::Loader;
use crate::experts::{ExpertCache, ExpertStats, ExpertWeights};
use crate::plan::Placement;
use crate::stream::{LayerTensors, PlacedLayers, StreamStats};
use crate::trace::TraceSink;
use crate::{CausalLm, LogitsWanted, ModelInfo, Result, SlidingKv};

const EMBED: &str = "model.embed_tokens.weight";
const FINAL_NORM: &str = "model.norm.weight";
const LM_HEAD: &str = "lm_head.weight";

fn layer_name(l: usize, suffix: &str) -> String {
    format!("model.layers.{l}.{suffix}")
}

/// Rows of one attention tile (as for Llama).
pub const PREFILL_TILE: usize = 1024;
/// Rows routed together: each expert is moved at most once per this many prompt tokens.
pub const MOE_CHUNK: usize = 8192;
/// Rows one expert multiplies at a time (bounds the expert activations).
pub const EXPERT_ROWS: usize = 1024;

/// One decoder layer's weights, the experts aside.
#[derive(Debug)]
pub struct Layer {
    input_norm: Tensor,
    attn: AttnWeights,
    post_attn_norm: Tensor,
}

/// Suffixes (after `model.layers.{l}.`) of a layer's tensors other than the experts, the sinks
/// and the router, which stay on the device in f32 (a few hundred KiB a layer): f32 router
/// logits keep expert choices with an f32 reference where a bf16 product would flip them.
const SUFFIXES: [&str; 9] = [
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.bias",
];
const O_BIAS: &str = "self_attn.o_proj.bias";

impl Layer {
    fn load(ld: &Loader<'_>, cfg: &GptOssConfig, l: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let (qd, kvd) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        let ab = cfg.attention_bias;
        let n = |s: &str| layer_name(l, s);
        Ok(Layer {
            input_norm: ld.tensor(&n("input_layernorm.weight"), &[h])?,
            attn: AttnWeights {
                q: ld.tensor(&n("self_attn.q_proj.weight"), &[qd, h])?,
                k: ld.tensor(&n("self_attn.k_proj.weight"), &[kvd, h])?,
                v: ld.tensor(&n("self_attn.v_proj.weight"), &[kvd, h])?,
                o: ld.tensor(&n("self_attn.o_proj.weight"), &[h, qd])?,
                q_bias: ld.tensor_if(ab, &n("self_attn.q_proj.bias"), &[qd])?,
                k_bias: ld.tensor_if(ab, &n("self_attn.k_proj.bias"), &[kvd])?,
                v_bias: ld.tensor_if(ab, &n("self_attn.v_proj.bias"), &[kvd])?,
                o_bias: ld.tensor_if(ab, &n(O_BIAS), &[h])?,
            },
            post_attn_norm: ld.tensor(&n("post_attention_layernorm.weight"), &[h])?,
        })
    }
}

impl LayerTensors for Layer {
    fn suffixes(&self) -> Vec<&'static str> {
        let biased = self.attn.q_bias.is_some();
        let mut v: Vec<&'static str> =
            SUFFIXES.iter().copied().filter(|s| biased || !s.ends_with("proj.bias")).collect();
        if self.attn.o_bias.is_some() {
            v.push(O_BIAS);
        }
        v
    }

    fn tensor_mut(&mut self, suffix: &str) -> Option<&mut Tensor> {
        match suffix {
            "input_layernorm.weight" => Some(&mut self.input_norm),
            "self_attn.q_proj.weight" => Some(&mut self.attn.q),
            "self_attn.k_proj.weight" => Some(&mut self.attn.k),
            "self_attn.v_proj.weight" => Some(&mut self.attn.v),
            "self_attn.o_proj.weight" => Some(&mut self.attn.o),
            "self_attn.q_proj.bias" => self.attn.q_bias.as_mut(),
            "self_attn.k_proj.bias" => self.attn.k_bias.as_mut(),
            "self_attn.v_proj.bias" => self.attn.v_bias.as_mut(),
            "self_attn.o_proj.bias" => self.attn.o_bias.as_mut(),
            "post_attention_layernorm.weight" => Some(&mut self.post_attn_norm),
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
    fn new(be: &dyn Backend, n: usize, h: usize, i: usize) -> Result<Self> {
        Ok(Self {
            n,
            x: be.zeros(vec![n, h])?,
            gate_up: be.zeros(vec![n, 2 * i])?,
            act: be.zeros(vec![n, i])?,
            y: be.zeros(vec![n, h])?,
        })
    }
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
        let ld = Loader { catalog, backend: backend.as_ref() };
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = ld.tensor(EMBED, &[v, h])?;
        let layers = PlacedLayers::load(&backend, catalog, placement, cfg.n_layers, |l| Layer::load(&ld, &cfg, l))?;
        let experts = ExpertCache::new(
            backend.clone(),
            catalog,
            &(0..cfg.n_layers).collect::<Vec<_>>(),
            cfg.n_experts,
            (h, cfg.intermediate_size),
            placement.experts.as_ref(),
        )?;
        let f32_tensor = |l: usize, suffix: &str, shape: Vec<usize>| ld.tensor_f32(&layer_name(l, suffix), &shape);
        let (nh, e) = (cfg.n_heads, cfg.n_experts);
        let sinks =
            (0..cfg.n_layers).map(|l| f32_tensor(l, "self_attn.sinks", vec![nh])).collect::<Result<Vec<_>>>()?;
        let routers = (0..cfg.n_layers)
            .map(|l| Ok((f32_tensor(l, "mlp.router.weight", vec![e, h])?, f32_tensor(l, "mlp.router.bias", vec![e])?)))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = ld.tensor(FINAL_NORM, &[h])?;
        let lm_head = ld.tensor_if(catalog.contains(LM_HEAD), LM_HEAD, &[v, h])?;
        let rope =
            RopeTables::new(backend.as_ref(), cfg.rope_theta, cfg.head_dim, &cfg.rope_scaling, cfg.max_positions)?;
        let weight_bytes = catalog.total_bytes();
        let expert_stats = experts.stats();
        let all_experts = expert_stats.expert_bytes * expert_stats.experts as u64;
        let routed = expert_stats.expert_bytes * (cfg.n_layers * cfg.experts_per_token) as u64;
        let embed_bytes = embed.size_bytes() as u64;
        let dense = weight_bytes - all_experts;
        let kvd = cfg.n_kv_heads * cfg.head_dim;
        let kv_elem = backend.kv_dtype().size_bytes();
        let n_sliding = (0..cfg.n_layers).filter(|&l| cfg.window(l).is_some()).count();
        let info = ModelInfo {
            architecture,
            vocab_size: v,
            hidden_size: h,
            n_layers: cfg.n_layers,
            max_positions: cfg.max_positions,
            weight_bytes,
            weight_bytes_per_token: routed + if lm_head.is_some() { dense - embed_bytes } else { dense },
            kv_bytes_per_position: (2 * (cfg.n_layers - n_sliding) * kvd * kv_elem) as u64,
            sliding_kv: (n_sliding > 0).then(|| SlidingKv {
                bytes_per_position: (2 * n_sliding * kvd * kv_elem) as u64,
                window: cfg.sliding_window,
            }),
            eos_token_ids: cfg.eos_token_ids.clone(),
            bos_token_id: cfg.bos_token_id,
            fingerprint: catalog.fingerprint(format!("{cfg:?}").as_bytes())?,
        };
        let kv_offload = placement.kv.clone();
        Ok(Self { cfg, info, backend, embed, layers, experts, sinks, routers, final_norm, lm_head, rope, kv_offload })
    }

    pub fn config(&self) -> &GptOssConfig {
        &self.cfg
    }

    fn dims(&self) -> AttnDims {
        AttnDims {
            hidden: self.cfg.hidden_size,
            n_heads: self.cfg.n_heads,
            n_kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// `x += Attn(RMS(x))` for the rows of one tile of layer `l` at positions `pos0..`.
    fn attention_block(
        &self,
        (l, layer): (usize, &Layer),
        x: &mut Tensor,
        pos0: usize,
        state: &mut SeqState,
        (normed, attn): (&mut Tensor, &mut AttnScratch),
        trace: Option<&dyn TraceSink>,
    ) -> Result<()> {
        let be = self.backend.as_ref();
        be.rms_norm(x, &layer.input_norm, self.cfg.rms_norm_eps, NormKind::Oss, normed)?;
        let scale = (self.cfg.head_dim as f32).powf(-0.5);
        let rope = self.rope.covering(be, pos0 + normed.shape()[0])?;
        let call =
            AttnCall { layer: l, pos0, rope: &rope, scale, window: self.cfg.window(l), sinks: self.sinks.get(l) };
        let kv = state.layer_for(be, l, pos0, normed.shape()[0])?;
        self_attention(be, &layer.attn, normed, kv, &call, attn, trace)?;
        be.add_assign(x, &attn.out)?;
        Ok(())
    }

    /// `x += MoE(RMS(x))` for the rows of one chunk (models.md §3.3): route every row, then
    /// run each chosen expert once over all the rows that chose it, the weighted outputs summed
    /// in f32.
    fn moe_block(&self, l: usize, layer: &Layer, x: &mut Tensor, normed: &mut Tensor) -> Result<()> {
        let be = self.backend.as_ref();
        let (c, h) = (x.shape()[0], self.cfg.hidden_size);
        let (n_e, k) = (self.cfg.n_experts, self.cfg.experts_per_token);
        be.rms_norm(x, &layer.post_attn_norm, self.cfg.rms_norm_eps, NormKind::Oss, normed)?;
        let mut logits = be.zeros(vec![c, n_e])?;
        let (router, router_bias) = &self.routers[l];
        be.matmul(normed, router, Some(router_bias), &mut logits)?;
        let (ids, weights) = be.router_topk(&logits, k, RouterMode::SoftmaxOfTopK)?;
        let routed = Routed::new(&ids, &weights, k, n_e);
        let rows = &routed.rows;
        let mut acc = be.zeros(vec![c, h])?;
        let mut scratch: Option<ExpertScratch> = None;
        let inter = self.cfg.intermediate_size;
        let limit = self.cfg.swiglu_limit;
        let rows_of = |e: u32| routed.count(e);
        self.experts.run_layer(l, &routed.used, &rows_of, &mut |e, w: &ExpertWeights<'_>| {
            let (rs, wv) = &rows[e as usize];
            for (sub, sub_w) in rs.chunks(EXPERT_ROWS).zip(wv.chunks(EXPERT_ROWS)) {
                let s = match scratch.take() {
                    Some(s) if s.n == sub.len() => scratch.insert(s),
                    _ => scratch.insert(ExpertScratch::new(be, sub.len(), h, inter)?),
                };
                be.gather_rows(normed, sub, &mut s.x)?;
                w.gate_up.matmul(be, &s.x, w.gate_up_bias, &mut s.gate_up)?;
                be.clamped_swiglu(&s.gate_up, limit, SWIGLU_ALPHA, &mut s.act)?;
                w.down.matmul(be, &s.act, w.down_bias, &mut s.y)?;
                be.scatter_add_rows(&s.y, sub, sub_w, &mut acc)?;
            }
            Ok(())
        })?;
        be.add_assign(x, &acc)?;
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
        let be = self.backend.as_ref();
        let (t, h, eps) = (ids.len(), self.cfg.hidden_size, self.cfg.rms_norm_eps);
        let limits = (self.cfg.vocab_size, self.cfg.max_positions);
        let (pos0, mut x) = crate::common::forward::begin(be, ids, state, &self.embed, limits, trace)?;
        let tiles = pieces(t, PREFILL_TILE);
        let chunks = pieces(t, MOE_CHUNK);
        let dims = self.dims();
        // Scratch for full-size pieces; a shorter last piece gets its own.
        let mut attn_bufs: Vec<(Tensor, AttnScratch)> = Vec::new();
        let mut moe_bufs: Vec<Tensor> = Vec::new();
        for l in 0..self.layers.len() {
            state.acquire(be, l)?;
            let run = |layer: &Layer| -> Result<()> {
                let one = tiles.len() == 1;
                each_piece(be, &mut x, &tiles, &mut |xt, start| {
                    let n = xt.shape()[0];
                    let i = match attn_bufs.iter().position(|(b, _)| b.shape()[0] == n) {
                        Some(i) => i,
                        None => {
                            attn_bufs.push((be.zeros(vec![n, h])?, AttnScratch::new(be, n, &dims)?));
                            attn_bufs.len() - 1
                        }
                    };
                    let (normed, attn) = &mut attn_bufs[i];
                    self.attention_block((l, layer), xt, pos0 + start, state, (normed, attn), trace.filter(|_| one))
                })?;
                each_piece(be, &mut x, &chunks, &mut |xc, _| {
                    let n = xc.shape()[0];
                    let i = match moe_bufs.iter().position(|b| b.shape()[0] == n) {
                        Some(i) => i,
                        None => {
                            moe_bufs.push(be.zeros(vec![n, h])?);
                            moe_bufs.len() - 1
                        }
                    };
                    self.moe_block(l, layer, xc, &mut moe_bufs[i])
                })?;
                if let Some(tr) = trace {
                    tr.record(Some(l), "layer_out", &x);
                }
                Ok(())
            };
            self.layers.with_layer(l, run)?;
            state.release(be, l)?;
        }
        state.advance(t);

        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        crate::common::forward::logits(be, &x, wanted, (&self.final_norm, eps, NormKind::Oss), head, trace)
    }
}

//! The Llama model: weights on a backend and the forward pass of models.md §2.3.

use std::sync::Arc;

use ollm_kv::{KvShape, SeqState};
use ollm_ops::{Backend, NormKind, Tensor};
use ollm_weights::Catalog;

use super::config::LlamaConfig;
use super::names;
use crate::common::attention::{AttnCall, AttnDims, AttnScratch, AttnWeights, self_attention};
use crate::common::mlp::{MlpScratch, MlpWeights, gated_mlp};
use crate::common::rope::RopeTables;
use crate::common::weights::Loader;
use crate::plan::Placement;
use crate::stream::{LayerTensors, PlacedLayers, StreamStats};
use crate::trace::TraceSink;
use crate::{CausalLm, LogitsWanted, ModelInfo, Result};

/// One decoder layer's weights.
#[derive(Debug)]
pub struct Layer {
    input_norm: Tensor,
    attn: AttnWeights,
    post_attn_norm: Tensor,
    mlp: MlpWeights,
}

impl Layer {
    /// Reads layer `l` with the shapes `cfg` implies.
    fn load(ld: &Loader<'_>, cfg: &LlamaConfig, l: usize) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
        let n = |s: &str| names::layer(l, s);
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
                o_bias: ld.tensor_if(ab, &n("self_attn.o_proj.bias"), &[h])?,
            },
            post_attn_norm: ld.tensor(&n("post_attention_layernorm.weight"), &[h])?,
            mlp: MlpWeights {
                gate: ld.tensor(&n("mlp.gate_proj.weight"), &[i, h])?,
                up: ld.tensor(&n("mlp.up_proj.weight"), &[i, h])?,
                down: ld.tensor(&n("mlp.down_proj.weight"), &[h, i])?,
                gate_bias: ld.tensor_if(mb, &n("mlp.gate_proj.bias"), &[i])?,
                up_bias: ld.tensor_if(mb, &n("mlp.up_proj.bias"), &[i])?,
                down_bias: ld.tensor_if(mb, &n("mlp.down_proj.bias"), &[h])?,
            },
        })
    }
}

impl LayerTensors for Layer {
    fn suffixes(&self) -> Vec<&'static str> {
        let mut v = vec![
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ];
        let optional = [
            ("self_attn.q_proj.bias", self.attn.q_bias.is_some()),
            ("self_attn.k_proj.bias", self.attn.k_bias.is_some()),
            ("self_attn.v_proj.bias", self.attn.v_bias.is_some()),
            ("self_attn.o_proj.bias", self.attn.o_bias.is_some()),
            ("mlp.gate_proj.bias", self.mlp.gate_bias.is_some()),
            ("mlp.up_proj.bias", self.mlp.up_bias.is_some()),
            ("mlp.down_proj.bias", self.mlp.down_bias.is_some()),
        ];
        v.extend(optional.into_iter().filter(|(_, present)| *present).map(|(s, _)| s));
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
            "mlp.gate_proj.weight" => Some(&mut self.mlp.gate),
            "mlp.up_proj.weight" => Some(&mut self.mlp.up),
            "mlp.down_proj.weight" => Some(&mut self.mlp.down),
            "mlp.gate_proj.bias" => self.mlp.gate_bias.as_mut(),
            "mlp.up_proj.bias" => self.mlp.up_bias.as_mut(),
            "mlp.down_proj.bias" => self.mlp.down_bias.as_mut(),
            _ => None,
        }
    }
}

/// Rows of one prefill tile: larger prompts run layer by layer in tiles of this many tokens.
pub const PREFILL_TILE: usize = 1024;

/// Activations for one tile of `n` tokens; `x` (the tile's rows of the residual stream) exists
/// only when the input is split into tiles, otherwise the layer works on the stream itself.
struct TileScratch {
    x: Option<Tensor>,
    normed: Tensor,
    attn: AttnScratch,
    mlp: MlpScratch,
}

impl TileScratch {
    fn new(m: &Llama, n: usize, tiled: bool) -> Result<Self> {
        let be = m.backend.as_ref();
        let h = m.cfg.hidden_size;
        Ok(Self {
            x: if tiled { Some(be.zeros(vec![n, h])?) } else { None },
            normed: be.zeros(vec![n, h])?,
            attn: AttnScratch::new(be, n, &m.dims())?,
            mlp: MlpScratch::new(be, n, h, m.cfg.intermediate_size)?,
        })
    }
}

/// Activations of one forward, reused by every layer.
struct Scratch<'a> {
    x: &'a mut Tensor,
    normed: &'a mut Tensor,
    attn: &'a mut AttnScratch,
    mlp: &'a mut MlpScratch,
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
        let ld = Loader { catalog, backend: backend.as_ref() };
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let kvd = cfg.n_kv_heads * cfg.head_dim;
        let embed = ld.tensor(names::EMBED, &[v, h])?;
        let layers = PlacedLayers::load(&backend, catalog, placement, cfg.n_layers, |l| Layer::load(&ld, &cfg, l))?;
        let final_norm = ld.tensor(names::FINAL_NORM, &[h])?;
        // Tied checkpoints have no lm_head; an untied config whose file lacks it is tied too (§0).
        let lm_head = ld.tensor_if(catalog.contains(names::LM_HEAD), names::LM_HEAD, &[v, h])?;
        let rope =
            RopeTables::new(backend.as_ref(), cfg.rope_theta, cfg.head_dim, &cfg.rope_scaling, cfg.max_positions)?;
        let embed_bytes = embed.size_bytes() as u64;
        let weight_bytes = catalog.total_bytes();
        let kv_elem_bytes = backend.kv_dtype().size_bytes() as u64;
        let info = ModelInfo {
            architecture,
            vocab_size: v,
            hidden_size: h,
            n_layers: cfg.n_layers,
            max_positions: cfg.max_positions,
            weight_bytes,
            weight_bytes_per_token: if lm_head.is_some() { weight_bytes - embed_bytes } else { weight_bytes },
            kv_bytes_per_position: (2 * cfg.n_layers * kvd) as u64 * kv_elem_bytes,
            sliding_kv: None,
            eos_token_ids: cfg.eos_token_ids.clone(),
            bos_token_id: cfg.bos_token_id,
            fingerprint: catalog.fingerprint(format!("{cfg:?}").as_bytes())?,
        };
        let kv_offload = placement.kv.clone();
        Ok(Self { cfg, info, backend, embed, layers, final_norm, lm_head, rope, kv_offload })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// `x = x + Attn(RMS(x)); x = x + MLP(RMS(x))` for decoder layer `l`.
    fn layer_forward(
        &self,
        l: usize,
        layer: &Layer,
        pos0: usize,
        state: &mut SeqState,
        s: &mut Scratch<'_>,
        trace: Option<&dyn TraceSink>,
    ) -> Result<()> {
        let be = self.backend.as_ref();
        let eps = self.cfg.rms_norm_eps;
        let scale = (self.cfg.head_dim as f32).powf(-0.5);
        be.rms_norm(s.x, &layer.input_norm, eps, NormKind::Llama, s.normed)?;
        let rope = self.rope.covering(be, pos0 + s.normed.shape()[0])?;
        let call = AttnCall { layer: l, pos0, rope: &rope, scale, window: None, sinks: None };
        let kv = state.layer_for(be, l, pos0, s.normed.shape()[0])?;
        self_attention(be, &layer.attn, s.normed, kv, &call, s.attn, trace)?;
        be.add_assign(s.x, &s.attn.out)?;
        be.rms_norm(s.x, &layer.post_attn_norm, eps, NormKind::Llama, s.normed)?;
        gated_mlp(be, &layer.mlp, s.normed, s.mlp)?;
        be.add_assign(s.x, &s.mlp.out)?;
        if let Some(tr) = trace {
            tr.record(Some(l), "layer_out", s.x);
        }
        Ok(())
    }

    fn dims(&self) -> AttnDims {
        AttnDims {
            hidden: self.cfg.hidden_size,
            n_heads: self.cfg.n_heads,
            n_kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
        }
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
        let be = self.backend.as_ref();
        let (t, eps) = (ids.len(), self.cfg.rms_norm_eps);
        let limits = (self.cfg.vocab_size, self.cfg.max_positions);
        let (pos0, mut x) = crate::common::forward::begin(be, ids, state, &self.embed, limits, trace)?;
        // Layer-major: every layer sees the whole input (its weights are used once per call),
        // in token tiles of at most PREFILL_TILE rows so activations stay bounded; the residual
        // stream x holds all T rows.
        let tiles: Vec<(usize, usize)> = (0..t).step_by(PREFILL_TILE).map(|a| (a, PREFILL_TILE.min(t - a))).collect();
        let tiled = tiles.len() > 1;
        let mut full = TileScratch::new(self, tiles[0].1, tiled)?;
        let mut tail = match tiles.last() {
            Some(&(_, n)) if n != tiles[0].1 => Some(TileScratch::new(self, n, tiled)?),
            _ => None,
        };
        for l in 0..self.layers.len() {
            state.acquire(be, l)?;
            let run = |layer: &Layer| -> Result<()> {
                for &(start, n) in &tiles {
                    let sc = match &mut tail {
                        Some(tail_sc) if n != tiles[0].1 => tail_sc,
                        _ => &mut full,
                    };
                    let Some(xt) = sc.x.as_mut() else {
                        // One tile: the layer works on the whole stream in place.
                        let mut s = Scratch { x: &mut x, normed: &mut sc.normed, attn: &mut sc.attn, mlp: &mut sc.mlp };
                        return self.layer_forward(l, layer, pos0, state, &mut s, trace);
                    };
                    be.copy_rows(&x, start..start + n, xt)?;
                    let mut s = Scratch { x: xt, normed: &mut sc.normed, attn: &mut sc.attn, mlp: &mut sc.mlp };
                    self.layer_forward(l, layer, pos0 + start, state, &mut s, None)?;
                    be.write_rows(xt, &mut x, start)?;
                }
                if let Some(tr) = trace {
                    tr.record(Some(l), "layer_out", &x);
                }
                Ok(())
            };
            self.layers.with_layer(l, run)?;
            state.release(be, l)?;
        }
        state.advance(t);

        // logits = RMS(x[rows]) · W_lmᵀ: [rows, V]
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        crate::common::forward::logits(be, &x, wanted, (&self.final_norm, eps, NormKind::Llama), head, trace)
    }
}

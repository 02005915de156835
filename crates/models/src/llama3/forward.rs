//! The Llama model: weights on a backend and the forward pass of models.md §2.3.

use std::sync::Arc;

use ollm_kv::{KvShape, SeqState};
use ollm_ops::{Backend, NormKind, RopeTable, Tensor};
use ollm_weights::Catalog;

use super::config::LlamaConfig;
use super::names;
use crate::common::attention::{AttnCall, AttnDims, AttnScratch, AttnWeights, self_attention};
use crate::common::mlp::{MlpScratch, MlpWeights, gated_mlp};
use crate::common::rope::upload_table;
use crate::common::weights::Loader;
use crate::trace::TraceSink;
use crate::{CausalLm, LogitsWanted, ModelError, ModelInfo, Result};

/// One decoder layer's weights.
#[derive(Debug)]
struct Layer {
    input_norm: Tensor,
    attn: AttnWeights,
    post_attn_norm: Tensor,
    mlp: MlpWeights,
}

/// A loaded Llama model. Owns its weights on the backend; holds no per-sequence state.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    info: ModelInfo,
    backend: Arc<dyn Backend>,
    embed: Tensor,
    layers: Vec<Layer>,
    final_norm: Tensor,
    /// None when the embeddings are tied (the head is `embed`).
    lm_head: Option<Tensor>,
    rope: RopeTable,
}

impl Llama {
    /// Reads every tensor named by the config, checking shapes, onto `backend`.
    pub fn load(cfg: LlamaConfig, architecture: String, catalog: &Catalog, backend: Arc<dyn Backend>) -> Result<Self> {
        let ld = Loader { catalog, backend: backend.as_ref() };
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
        let embed = ld.tensor(names::EMBED, &[v, h])?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let n = |s: &str| names::layer(l, s);
            layers.push(Layer {
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
                    sinks: None,
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
            });
        }
        let final_norm = ld.tensor(names::FINAL_NORM, &[h])?;
        // Tied checkpoints have no lm_head; an untied config whose file lacks it is tied too (§0).
        let lm_head = ld.tensor_if(catalog.contains(names::LM_HEAD), names::LM_HEAD, &[v, h])?;
        let rope = upload_table(backend.as_ref(), cfg.rope_theta, cfg.head_dim, &cfg.rope_scaling, cfg.max_positions)?;
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
            eos_token_ids: cfg.eos_token_ids.clone(),
            bos_token_id: cfg.bos_token_id,
        };
        Ok(Self { cfg, info, backend, embed, layers, final_norm, lm_head, rope })
    }

    pub fn config(&self) -> &LlamaConfig {
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
}

impl CausalLm for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn new_state(&self) -> Result<SeqState> {
        let shape = KvShape { n_kv_heads: self.cfg.n_kv_heads, head_dim: self.cfg.head_dim };
        Ok(SeqState::new(self.backend.as_ref(), vec![shape; self.cfg.n_layers], self.cfg.max_positions)?)
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
        if t == 0 {
            return Err(ModelError::EmptyInput);
        }
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(ModelError::TokenOutOfRange { id, vocab: self.cfg.vocab_size });
        }
        let pos0 = state.len();
        if pos0 + t > self.cfg.max_positions {
            return Err(ModelError::ContextOverflow { needed: pos0 + t, max: self.cfg.max_positions });
        }
        state.reserve(be, pos0 + t)?;

        // x = E[ids]: [T, H]
        let mut x = be.zeros(vec![t, h])?;
        be.embedding(&self.embed, ids, &mut x)?;
        if let Some(tr) = trace {
            tr.record(None, "embed", &x);
        }
        let dims = self.dims();
        let mut normed = be.zeros(vec![t, h])?;
        let mut attn = AttnScratch::new(be, t, &dims)?;
        let mut mlp = MlpScratch::new(be, t, h, self.cfg.intermediate_size)?;
        let scale = (self.cfg.head_dim as f32).powf(-0.5);

        for (l, layer) in self.layers.iter().enumerate() {
            // x = x + Attn(RMS(x))
            be.rms_norm(&x, &layer.input_norm, eps, NormKind::Llama, &mut normed)?;
            let call = AttnCall { layer: l, pos0, rope: &self.rope, scale, window: None };
            self_attention(be, &layer.attn, &normed, state.layer_mut(l), &call, &mut attn, trace)?;
            be.add_assign(&mut x, &attn.out)?;
            // x = x + MLP(RMS(x))
            be.rms_norm(&x, &layer.post_attn_norm, eps, NormKind::Llama, &mut normed)?;
            gated_mlp(be, &layer.mlp, &normed, &mut mlp)?;
            be.add_assign(&mut x, &mlp.out)?;
            if let Some(tr) = trace {
                tr.record(Some(l), "layer_out", &x);
            }
        }
        state.advance(t);

        // logits = RMS(x[rows]) · W_lmᵀ: [rows, V]
        let rows = match wanted {
            LogitsWanted::Last => t - 1..t,
            LogitsWanted::All => 0..t,
        };
        let mut last = be.zeros(vec![rows.len(), h])?;
        be.copy_rows(&x, rows.clone(), &mut last)?;
        let mut last_normed = be.zeros(vec![rows.len(), h])?;
        be.rms_norm(&last, &self.final_norm, eps, NormKind::Llama, &mut last_normed)?;
        if let Some(tr) = trace {
            tr.record(None, "final_norm", &last_normed);
        }
        let mut logits = be.zeros(vec![rows.len(), self.cfg.vocab_size])?;
        be.matmul(&last_normed, self.lm_head.as_ref().unwrap_or(&self.embed), None, &mut logits)?;
        Ok(be.to_host_f32(&logits)?)
    }
}

//! Self-attention with RoPE and a KV cache: projections, rotation, cache append, causal
//! attention (optional window and sinks), output projection.

use ollm_kv::LayerKv;
use ollm_ops::{AttnParams, Backend, RopeTable, Tensor};

use crate::Result;
use crate::trace::TraceSink;

/// Head layout of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub hidden: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Weights of one attention layer (nn.Linear layout `[out, in]`).
#[derive(Debug)]
pub struct AttnWeights {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub q_bias: Option<Tensor>,
    pub k_bias: Option<Tensor>,
    pub v_bias: Option<Tensor>,
    pub o_bias: Option<Tensor>,
}

/// Activations of one attention call, sized for T tokens.
#[derive(Debug)]
pub struct AttnScratch {
    /// `[T, n_heads, d]`
    pub q: Tensor,
    /// `[T, n_kv, d]`
    pub k: Tensor,
    pub v: Tensor,
    /// `[T, n_heads, d]`
    pub ctx: Tensor,
    /// `[T, hidden]`: the layer's output (after o_proj).
    pub out: Tensor,
}

impl AttnScratch {
    /// Shapes of q, k, v, ctx and out.
    pub fn shapes(t: usize, d: &AttnDims) -> Vec<Vec<usize>> {
        vec![
            vec![t, d.n_heads, d.head_dim],
            vec![t, d.n_kv_heads, d.head_dim],
            vec![t, d.n_kv_heads, d.head_dim],
            vec![t, d.n_heads, d.head_dim],
            vec![t, d.hidden],
        ]
    }

    pub fn new(backend: &dyn Backend, t: usize, d: &AttnDims) -> Result<Self> {
        let [q, k, v, ctx, out] = crate::common::forward::alloc_all(backend, Self::shapes(t, d))?
            .try_into()
            .map_err(|_| ollm_ops::OpsError::Backend("internal: attention scratch".into()))?;
        Ok(Self { q, k, v, ctx, out })
    }
}

/// Per-call settings that differ between layers and families.
#[derive(Debug)]
pub struct AttnCall<'a> {
    pub layer: usize,
    pub pos0: usize,
    pub rope: &'a RopeTable,
    pub scale: f32,
    pub window: Option<usize>,
    /// Per-query-head sink logits `[n_heads]` f32 (GPT-OSS).
    pub sinks: Option<&'a Tensor>,
}

/// `s.out = Attn(a)`; a `[T, hidden]` (already normed). Appends this call's K/V to `kv`
/// at positions `pos0..pos0+T` (rows from `kv.base`).
pub fn self_attention(
    backend: &dyn Backend,
    w: &AttnWeights,
    a: &Tensor,
    kv: &mut LayerKv,
    call: &AttnCall<'_>,
    s: &mut AttnScratch,
    trace: Option<&dyn TraceSink>,
) -> Result<()> {
    // [T, H] -> q [T, nh, d], k/v [T, nkv, d]
    backend.matmul(a, &w.q, w.q_bias.as_ref(), &mut s.q)?;
    backend.matmul(a, &w.k, w.k_bias.as_ref(), &mut s.k)?;
    backend.matmul(a, &w.v, w.v_bias.as_ref(), &mut s.v)?;
    backend.rope(&mut s.q, call.rope, call.pos0)?;
    backend.rope(&mut s.k, call.rope, call.pos0)?;
    if let Some(t) = trace {
        t.record(Some(call.layer), "q_rope", &s.q);
        t.record(Some(call.layer), "k_rope", &s.k);
    }
    let params = AttnParams { scale: call.scale, window: call.window, sinks: call.sinks };
    append_and_attend(backend, kv, (&s.k, &s.v), &s.q, (call.layer, call.pos0), &params, &mut s.ctx)?;
    // [T, nh, d] -> [T, H]
    backend.matmul(&s.ctx, &w.o, w.o_bias.as_ref(), &mut s.out)?;
    Ok(())
}

/// Appends post-RoPE keys and values `[T, nkv, d]` to `kv` at positions `pos0..` and attends q
/// `[T, nh, d]` over the cache into ctx. Rows are shifted by the cache's base (a sliding-window
/// layer's dropped front): scores of rotated keys depend only on the rows' order, so attention
/// runs at the shifted positions too.
pub fn append_and_attend(
    backend: &dyn Backend,
    kv: &mut LayerKv,
    (k, v): (&Tensor, &Tensor),
    q: &Tensor,
    (layer, pos0): (usize, usize),
    params: &AttnParams<'_>,
    ctx: &mut Tensor,
) -> Result<()> {
    let row0 = pos0.checked_sub(kv.base).ok_or_else(|| {
        ollm_ops::OpsError::Backend(format!("layer {layer}: position {pos0} before its cache's base {}", kv.base))
    })?;
    backend.write_kv(&mut kv.k, k, row0)?;
    backend.write_kv(&mut kv.v, v, row0)?;
    backend.attention(q, &kv.k, &kv.v, row0, params, ctx)?;
    Ok(())
}

//! Self-attention with RoPE and a KV cache: projections, rotation, cache append, causal
//! attention (optional window and sinks), output projection. A sequence whose new tokens form
//! a tree ([`BatchSeq::tree`]) is rotated at its nodes' positions (`pos0 + depth`) and attends
//! through [`Compute::tree_attention`](ollm_ops::Compute::tree_attention) instead.

use ollm_kv::LayerKv;
use ollm_ops::{AttnParams, Backend, NormKind, RopeTable, Tensor, TreeMask};

use crate::common::forward::{SegSets, Segment};
use crate::trace::TraceSink;
use crate::{BatchSeq, Result};

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
#[derive(Debug, Clone, Copy)]
pub struct AttnCall<'a> {
    pub layer: usize,
    pub pos0: usize,
    pub rope: &'a RopeTable,
    pub scale: f32,
    pub window: Option<usize>,
    /// Per-query-head sink logits `[n_heads]` f32 (GPT-OSS).
    pub sinks: Option<&'a Tensor>,
}

/// RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3): weights `[head_dim]`,
/// shared by every head.
#[derive(Debug, Clone, Copy)]
pub struct QkNorm<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub eps: f32,
    pub kind: NormKind,
}

/// The projections of a `[T, hidden]`: q `[T, nh, d]`, k and v `[T, nkv, d]` into `s`, q and k
/// normed per head when `qk` says so. The norms read the raw projections from buffers the call
/// does not need yet (q from ctx, k from v), so no extra scratch is allocated.
fn project_qkv(
    backend: &dyn Backend,
    w: &AttnWeights,
    a: &Tensor,
    s: &mut AttnScratch,
    qk: Option<&QkNorm<'_>>,
) -> Result<()> {
    let (q, k, v) = ((&w.q, w.q_bias.as_ref()), (&w.k, w.k_bias.as_ref()), (&w.v, w.v_bias.as_ref()));
    match qk {
        // One call for the three (one parallel region on the CPU).
        None => backend.matmul_many(a, &[q, k, v], &mut [&mut s.q, &mut s.k, &mut s.v])?,
        Some(n) => {
            // ctx has q's shape and v has k's: both are written later in the call.
            backend.matmul_many(a, &[q, k], &mut [&mut s.ctx, &mut s.v])?;
            backend.rms_norm(&s.ctx, n.q, n.eps, n.kind, &mut s.q)?;
            backend.rms_norm(&s.v, n.k, n.eps, n.kind, &mut s.k)?;
            backend.matmul(a, v.0, v.1, &mut s.v)?;
        }
    }
    Ok(())
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
    self_attention_qk(backend, (w, None), a, kv, call, s, trace)
}

/// [`self_attention`] with q and k normed per head before RoPE when `qk` is Some.
pub fn self_attention_qk(
    backend: &dyn Backend,
    (w, qk): (&AttnWeights, Option<&QkNorm<'_>>),
    a: &Tensor,
    kv: &mut LayerKv,
    call: &AttnCall<'_>,
    s: &mut AttnScratch,
    trace: Option<&dyn TraceSink>,
) -> Result<()> {
    // [T, H] -> q [T, nh, d], k/v [T, nkv, d]
    project_qkv(backend, w, a, s, qk)?;
    backend.rope(&mut s.q, call.rope, call.pos0)?;
    backend.rope(&mut s.k, call.rope, call.pos0)?;
    if let Some(t) = trace {
        t.record(Some(call.layer), "q_rope", &s.q);
        t.record(Some(call.layer), "k_rope", &s.k);
    }
    let params = AttnParams { scale: call.scale, window: call.window, sinks: call.sinks, origin: 0 };
    append_and_attend(backend, kv, (&s.k, &s.v), &s.q, (call.layer, call.pos0), &params, &mut s.ctx)?;
    // [T, nh, d] -> [T, H]
    backend.matmul(&s.ctx, &w.o, w.o_bias.as_ref(), &mut s.out)?;
    Ok(())
}

/// Appends post-RoPE keys and values `[T, nkv, d]` to `kv` at positions `pos0..` and attends q
/// `[T, nh, d]` over the cache into ctx. Rows are shifted by the cache's base (a sliding-window
/// layer's dropped front): scores of rotated keys depend only on the rows' order, so attention
/// runs at the shifted positions too. When the base is a shared prefix's end, attention also
/// covers the prefix's positions.
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
    let params = &AttnParams { scale: params.scale, window: params.window, sinks: params.sinks, origin: kv.base };
    match &kv.prefix {
        // Positions 0..base sit in a shared prefix: attend over it and the own rows.
        // (a sliding-window layer's prefix holds only its tail: `rows()` positions before base).
        Some(pre) => {
            backend.attention_prefixed(q, (pre.k(), pre.v(), pre.rows()), (&kv.k, &kv.v), row0, params, ctx)?
        }
        None => backend.attention(q, &kv.k, &kv.v, row0, params, ctx)?,
    }
    Ok(())
}

/// Rotates x `[T, heads, d]` at positions `pos0..pos0 + T`, or, for the nodes of a tree, at
/// `pos0 + depth(i)`: the table's rows for those positions gathered into one of T rows.
pub fn rope_at(
    backend: &dyn Backend,
    x: &mut Tensor,
    rope: &RopeTable,
    pos0: usize,
    tree: Option<&TreeMask>,
) -> Result<()> {
    let Some(tree) = tree else {
        backend.rope(x, rope, pos0)?;
        return Ok(());
    };
    // cos, sin [P, R/2] -> [T, R/2], row i = position pos0 + depth(i).
    let rows: Vec<u32> = tree.depths().iter().map(|&d| (pos0 + d) as u32).collect();
    let half = rope.cos.shape()[1];
    let mut cos = backend.zeros(vec![rows.len(), half])?;
    let mut sin = backend.zeros(vec![rows.len(), half])?;
    backend.embedding(&rope.cos, &rows, &mut cos)?;
    backend.embedding(&rope.sin, &rows, &mut sin)?;
    backend.rope(x, &RopeTable { cos, sin, rotary_dims: rope.rotary_dims }, 0)?;
    Ok(())
}

/// [`append_and_attend`] for the nodes of a tree (None: a chain, [`append_and_attend`]
/// itself): their keys and values go to the rows of positions `pos0..pos0 + T` in node order,
/// and each node attends to the cache before `pos0` and to its ancestors.
#[allow(clippy::too_many_arguments)]
pub fn append_and_attend_tree(
    backend: &dyn Backend,
    kv: &mut LayerKv,
    (k, v): (&Tensor, &Tensor),
    q: &Tensor,
    (layer, pos0): (usize, usize),
    params: &AttnParams<'_>,
    tree: Option<&TreeMask>,
    ctx: &mut Tensor,
) -> Result<()> {
    let Some(tree) = tree else {
        return append_and_attend(backend, kv, (k, v), q, (layer, pos0), params, ctx);
    };
    if kv.prefix.is_some() {
        // Tree attention reads the own cache only; the speculator drafts chains for such states.
        return Err(ollm_ops::OpsError::Backend(format!(
            "layer {layer}: a tree of tokens over a shared prefix's cache is not supported; verify a chain"
        ))
        .into());
    }
    let row0 = pos0.checked_sub(kv.base).ok_or_else(|| {
        ollm_ops::OpsError::Backend(format!("layer {layer}: position {pos0} before its cache's base {}", kv.base))
    })?;
    backend.write_kv(&mut kv.k, k, row0)?;
    backend.write_kv(&mut kv.v, v, row0)?;
    let params = &AttnParams { scale: params.scale, window: params.window, sinks: params.sinks, origin: kv.base };
    backend.tree_attention(q, &kv.k, &kv.v, row0, tree, params, ctx)?;
    Ok(())
}

/// Copies rows `row..row + n` (the first dimension) of `src` into `out`, whatever the trailing
/// dimensions (the backend's row ops count rows of the last dimension).
pub fn copy_outer_rows(backend: &dyn Backend, src: &Tensor, row: usize, n: usize, out: &mut Tensor) -> Result<()> {
    let f = per_outer_row(src);
    backend.copy_rows(src, row * f..(row + n) * f, out)?;
    Ok(())
}

/// Writes `src` into rows `row..` (the first dimension) of `dst`.
pub fn write_outer_rows(backend: &dyn Backend, src: &Tensor, dst: &mut Tensor, row: usize) -> Result<()> {
    backend.write_rows(src, dst, row * per_outer_row(dst))?;
    Ok(())
}

/// Last-dimension rows per first-dimension row.
fn per_outer_row(t: &Tensor) -> usize {
    let s = t.shape();
    match (s.first(), s.last()) {
        (Some(&outer), Some(&last)) if outer > 0 && last > 0 => t.numel() / outer / last,
        _ => 1,
    }
}

/// Buffers of one sequence's rows inside a tile that holds several: q, k, v and ctx of `n`
/// rows, one set per row count, made when first needed and kept for the forward (see
/// [`SegSets`] for the bound on what they hold).
#[derive(Debug, Default)]
pub struct SegBufs(SegSets);

impl SegBufs {
    /// The set for `n` rows of these dims.
    pub fn get(&mut self, backend: &dyn Backend, n: usize, d: &AttnDims) -> Result<&mut [Tensor; 4]> {
        let set = self.0.get(backend, n, |n| AttnScratch::shapes(n, d)[..4].to_vec())?;
        <&mut [Tensor; 4]>::try_from(set)
            .map_err(|_| ollm_ops::OpsError::Backend("internal: segment scratch".into()).into())
    }

    /// Shapes of the set for `n` rows (what the planner counts).
    pub fn shapes(n: usize, d: &AttnDims) -> Vec<Vec<usize>> {
        AttnScratch::shapes(n, d)[..4].to_vec()
    }
}

/// [`self_attention`] over a tile that holds the rows of several sequences (`segs`, against
/// `items`' caches of layer slot `kv_idx`): one matmul per projection over all rows; rotation,
/// cache append and attention per segment, each at its own positions against its own cache.
/// With one segment it is [`self_attention`] itself. `call.pos0` is ignored (each segment has its
/// own); `call.rope` must cover every segment's positions.
pub fn batched_self_attention(
    backend: &dyn Backend,
    w: &AttnWeights,
    a: &Tensor,
    (segs, items, kv_idx): (&[Segment], &mut [BatchSeq<'_>], usize),
    call: &AttnCall<'_>,
    (s, bufs, dims): (&mut AttnScratch, &mut SegBufs, &AttnDims),
    trace: Option<&dyn TraceSink>,
) -> Result<()> {
    batched_self_attention_qk(backend, (w, None), a, (segs, items, kv_idx), call, (s, bufs, dims), trace)
}

/// The tree of `seg`'s sequence, if it has one: a tree is never cut by a tile (its rows are one
/// segment).
fn tree_of<'a>(seg: &Segment, items: &[BatchSeq<'a>]) -> Result<Option<&'a TreeMask>> {
    match items[seg.seq].tree {
        Some(t) if t.len() != seg.n => Err(ollm_ops::OpsError::Backend(format!(
            "a tree of {} nodes split across tiles ({} rows here); verify at most {} nodes",
            t.len(),
            seg.n,
            crate::common::forward::PREFILL_TILE
        ))
        .into()),
        t => Ok(t),
    }
}

/// `x += Attn(RMSNorm(x))` with the launches a decode step needs fused
/// ([`ollm_ops::FusedOps`]): the norm and the three projections, RoPE and the KV append, the
/// attention, and the output projection with the residual add as its epilogue. The ops are
/// the plain path's (`rms_norm`, [`batched_self_attention_qk`], `add_assign`) in the same
/// order, so every backend's result is the same bits either way. Only for a tile of one
/// sequence's rows that are not a tree, without per-head q/k norms: returns false without
/// doing anything for other tiles (the caller runs the plain path). `s.out` and `normed` are
/// scratch (a fused launch may leave them as they were).
#[allow(clippy::too_many_arguments)]
pub fn fused_self_attention_add(
    backend: &dyn Backend,
    (w, qk): (&AttnWeights, Option<&QkNorm<'_>>),
    norm: ollm_ops::backend::Norm<'_>,
    x: &mut Tensor,
    (segs, items, kv_idx): (&[Segment], &mut [BatchSeq<'_>], usize),
    call: &AttnCall<'_>,
    (s, normed): (&mut AttnScratch, &mut Tensor),
    trace: Option<&dyn TraceSink>,
) -> Result<bool> {
    let ([seg], None) = (segs, qk) else { return Ok(false) };
    if items[seg.seq].tree.is_some() {
        return Ok(false);
    }
    let weights = [(&w.q, w.q_bias.as_ref()), (&w.k, w.k_bias.as_ref()), (&w.v, w.v_bias.as_ref())];
    backend.norm_matmul_qkv(x, norm, weights, normed, [&mut s.q, &mut s.k, &mut s.v])?;
    let kv = items[seg.seq].state.layer_for(backend, kv_idx, seg.pos0, seg.n)?;
    let row0 = seg.pos0.checked_sub(kv.base).ok_or_else(|| {
        ollm_ops::OpsError::Backend(format!(
            "layer {}: position {} before its cache's base {}",
            call.layer, seg.pos0, kv.base
        ))
    })?;
    backend.rope_write_kv((&mut s.q, &mut s.k, &s.v), (call.rope, seg.pos0), (&mut kv.k, &mut kv.v), row0)?;
    if let Some(t) = trace {
        t.record(Some(call.layer), "q_rope", &s.q);
        t.record(Some(call.layer), "k_rope", &s.k);
    }
    let params = AttnParams { scale: call.scale, window: call.window, sinks: call.sinks, origin: kv.base };
    match &kv.prefix {
        Some(pre) => backend.attention_prefixed(
            &s.q,
            (pre.k(), pre.v(), pre.len()),
            (&kv.k, &kv.v),
            row0,
            &params,
            &mut s.ctx,
        )?,
        None => backend.attention(&s.q, &kv.k, &kv.v, row0, &params, &mut s.ctx)?,
    }
    backend.matmul_add(&s.ctx, (&w.o, w.o_bias.as_ref()), &mut s.out, x)?;
    Ok(true)
}

/// [`batched_self_attention`] with q and k normed per head before RoPE when `qk` is Some.
pub fn batched_self_attention_qk(
    backend: &dyn Backend,
    (w, qk): (&AttnWeights, Option<&QkNorm<'_>>),
    a: &Tensor,
    (segs, items, kv_idx): (&[Segment], &mut [BatchSeq<'_>], usize),
    call: &AttnCall<'_>,
    (s, bufs, dims): (&mut AttnScratch, &mut SegBufs, &AttnDims),
    trace: Option<&dyn TraceSink>,
) -> Result<()> {
    if let [seg] = segs
        && items[seg.seq].tree.is_none()
    {
        let kv = items[seg.seq].state.layer_for(backend, kv_idx, seg.pos0, seg.n)?;
        let call = AttnCall { pos0: seg.pos0, ..*call };
        return self_attention_qk(backend, (w, qk), a, kv, &call, s, trace);
    }
    if let [seg] = segs {
        // One sequence whose rows are a tree: the tile's buffers are its own.
        let tree = tree_of(seg, items)?;
        project_qkv(backend, w, a, s, qk)?;
        rope_at(backend, &mut s.q, call.rope, seg.pos0, tree)?;
        rope_at(backend, &mut s.k, call.rope, seg.pos0, tree)?;
        if let Some(t) = trace {
            t.record(Some(call.layer), "q_rope", &s.q);
            t.record(Some(call.layer), "k_rope", &s.k);
        }
        let params = AttnParams { scale: call.scale, window: call.window, sinks: call.sinks, origin: 0 };
        let kv = items[seg.seq].state.layer_for(backend, kv_idx, seg.pos0, seg.n)?;
        append_and_attend_tree(backend, kv, (&s.k, &s.v), &s.q, (call.layer, seg.pos0), &params, tree, &mut s.ctx)?;
        backend.matmul(&s.ctx, &w.o, w.o_bias.as_ref(), &mut s.out)?;
        return Ok(());
    }
    // The per-head norms act on each row alone, so they run over the whole tile.
    project_qkv(backend, w, a, s, qk)?;
    let params = AttnParams { scale: call.scale, window: call.window, sinks: call.sinks, origin: 0 };
    for seg in segs {
        let [q, k, v, ctx] = bufs.get(backend, seg.n, dims)?;
        copy_outer_rows(backend, &s.q, seg.row, seg.n, q)?;
        copy_outer_rows(backend, &s.k, seg.row, seg.n, k)?;
        copy_outer_rows(backend, &s.v, seg.row, seg.n, v)?;
        let tree = tree_of(seg, items)?;
        rope_at(backend, q, call.rope, seg.pos0, tree)?;
        rope_at(backend, k, call.rope, seg.pos0, tree)?;
        let kv = items[seg.seq].state.layer_for(backend, kv_idx, seg.pos0, seg.n)?;
        append_and_attend_tree(backend, kv, (k, v), q, (call.layer, seg.pos0), &params, tree, ctx)?;
        write_outer_rows(backend, ctx, &mut s.ctx, seg.row)?;
    }
    backend.matmul(&s.ctx, &w.o, w.o_bias.as_ref(), &mut s.out)?;
    Ok(())
}

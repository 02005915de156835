//! [`Compute`]: the math every model family's forward needs, and the types its calls take.
//!
//! Every op writes into a caller-provided output so that scratch buffers are allocated once per
//! forward, not once per op. Activations use the backend's activation dtype (f32 on the CPU);
//! weights keep the dtype they were stored in. Ops are queued on the compute queue in program
//! order (a device backend returns before the work is done).

use crate::{DType, OpsError, Result, Tensor, TreeMask};

/// Which RMSNorm formula (docs/models.md §1.1). In f32 mode Llama and Oss agree; they differ only in
/// where a bf16 backend rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// `w ⊙ bf16(r(x))` (Llama).
    Llama,
    /// `bf16(w ⊙ r(x))` (GPT-OSS).
    Oss,
    /// `bf16((1 + w) ⊙ r(x))` (Qwen3-Next zero-centred norms).
    ZeroCentered,
}

/// Which columns [`Compute::slice_heads`] copies: for each of `heads` groups of `stride`
/// source columns, `width` columns from `offset` within the group go to out's columns
/// `out_offset + h·width ..`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadSlice {
    pub heads: usize,
    pub stride: usize,
    pub offset: usize,
    pub width: usize,
    pub out_offset: usize,
}

/// Precomputed RoPE tables `[max_positions, rotary_dims / 2]`, already multiplied by the
/// attention factor m (docs/models.md §1.2), resident on the backend.
#[derive(Debug)]
pub struct RopeTable {
    pub cos: Tensor,
    pub sin: Tensor,
    /// R: the leading dims of each head that rotate (halves layout); the rest pass through.
    pub rotary_dims: usize,
}

impl RopeTable {
    pub fn max_positions(&self) -> usize {
        self.cos.shape()[0]
    }
}

/// Head layout and positions of one attention call: q `[T, n_heads, d]`, caches `[n_kv, cap, d]`.
#[derive(Debug, Clone, Copy)]
pub struct AttnGeometry {
    pub n_heads: usize,
    pub n_kv: usize,
    pub d: usize,
    /// Capacity (positions) of the caches.
    pub cap: usize,
    /// Absolute position of the first query.
    pub pos0: usize,
}

impl AttnGeometry {
    /// Checks the shapes of one attention call (q, out `[T, n_heads, d]`; k, v `[n_kv, cap, d]`;
    /// sinks `[n_heads]`) and returns its geometry. Every backend validates through here.
    pub fn of(q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, pos0: usize, sinks: Option<&Tensor>) -> Result<Self> {
        let err = |detail: String| Err(OpsError::Shape { op: "attention", detail });
        let (&[t, n_heads, d], &[n_kv, cap, dk]) = (q.shape(), k.shape()) else {
            return err(format!("q {:?}, k {:?}", q.shape(), k.shape()));
        };
        if dk != d || v.shape() != k.shape() || out.shape() != q.shape() || n_kv == 0 || n_heads % n_kv != 0 {
            return err(format!("q {:?}, k {:?}, v {:?}, out {:?}", q.shape(), k.shape(), v.shape(), out.shape()));
        }
        if pos0 + t > cap {
            return err(format!("{} positions exceed the cache capacity {cap}", pos0 + t));
        }
        if let Some(s) = sinks.filter(|s| s.numel() != n_heads || s.dtype() != DType::F32) {
            return err(format!("sinks {:?} {} for {n_heads} heads (f32 expected)", s.shape(), s.dtype()));
        }
        Ok(Self { n_heads, n_kv, d, cap, pos0 })
    }
}

impl AttnGeometry {
    /// [`of`](Self::of) for a [`Compute::tree_attention`] call: q's rows are the tree's nodes.
    pub fn of_tree(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        pos0: usize,
        tree: &TreeMask,
        sinks: Option<&Tensor>,
    ) -> Result<Self> {
        if q.shape().first() != Some(&tree.len()) {
            return Err(OpsError::Shape {
                op: "tree_attention",
                detail: format!("q {:?} for a tree of {} nodes", q.shape(), tree.len()),
            });
        }
        Self::of(q, k, v, out, pos0, sinks)
    }

    /// Checks the shapes of an attention call over a shared prefix and the sequence's own rows
    /// ([`Compute::attention_prefixed`]): the prefix caches hold at least `p` positions and
    /// have the own caches' heads and width. Returns the prefix's geometry (its `pos0` 0) and
    /// the own rows' (queries at own row `pos0`).
    pub fn of_prefixed(
        q: &Tensor,
        (pk, pv, p): (&Tensor, &Tensor, usize),
        (k, v): (&Tensor, &Tensor),
        out: &Tensor,
        pos0: usize,
        sinks: Option<&Tensor>,
    ) -> Result<(Self, Self)> {
        let g = Self::of(q, k, v, out, pos0, sinks)?;
        match pk.shape() {
            &[n_kv, cap, d] if n_kv == g.n_kv && d == g.d && p <= cap && pv.shape() == pk.shape() => {
                Ok((Self { cap, pos0: 0, ..g }, g))
            }
            _ => Err(OpsError::Shape {
                op: "attention_prefixed",
                detail: format!("prefix {:?} of {p} positions beside own rows {:?}", pk.shape(), k.shape()),
            }),
        }
    }
}

/// Per-layer attention settings.
#[derive(Debug)]
pub struct AttnParams<'a> {
    /// Multiplies q·k (d^-0.5 in all three families).
    pub scale: f32,
    /// Sliding window W: key j is visible from query i iff `i - W < j <= i`. None = full causal.
    pub window: Option<usize>,
    /// One logit per query head that joins the softmax normalisation only (GPT-OSS), `[n_heads]`
    /// f32 (from [`Memory::upload_f32`](crate::Memory::upload_f32)) on every backend.
    pub sinks: Option<&'a Tensor>,
    /// The position of the cache's row 0 (a sliding-window or offloaded cache's base; 0 for a
    /// whole cache). The CPU backend aligns a short call's key splits and tiles to positions, so a
    /// row's result does not depend on where its cache starts; other backends may ignore it.
    pub origin: usize,
}

/// The math every family needs: embedding, matmuls, norms, RoPE, KV writes, attention,
/// activations, residual adds and row copies. Implemented by the CPU backend (the reference)
/// and every device backend.
pub trait Compute: Send + Sync {
    /// `out[t, :] = table[ids[t], :]`; table `[V, H]`, out `[T, H]`.
    fn embedding(&self, table: &Tensor, ids: &[u32], out: &mut Tensor) -> Result<()>;

    /// `out = x · wᵀ (+ bias)`; x `[T, in]`, w `[out, in]` (nn.Linear layout), out `[T, out]`.
    fn matmul(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, out: &mut Tensor) -> Result<()>;

    /// `outs[i] = x · ws[i].0ᵀ (+ ws[i].1)` for every i: several weights against one input (q, k
    /// and v; gate and up), each as [`matmul`](Self::matmul) computes it. The CPU runs them in one
    /// parallel region; a device backend (the default) calls `matmul` for each.
    fn matmul_many(&self, x: &Tensor, ws: &[(&Tensor, Option<&Tensor>)], outs: &mut [&mut Tensor]) -> Result<()> {
        if ws.len() != outs.len() {
            return Err(OpsError::Shape {
                op: "matmul_many",
                detail: format!("{} weights for {} outputs", ws.len(), outs.len()),
            });
        }
        for ((w, bias), out) in ws.iter().zip(outs.iter_mut()) {
            self.matmul(x, w, *bias, out)?;
        }
        Ok(())
    }

    /// Runs `step` (the ops of one forward) where this backend's ops run best; a device backend
    /// (the default) runs it in place. The CPU runs it on a thread of its pool: each op's parallel
    /// region then forks and joins among threads that are awake, where from outside the pool every
    /// region wakes a worker and then the caller (15–50 µs a region on a 2-core VM, against about
    /// 1 µs inside; a decode step has hundreds). A step that waits for work queued on the pool
    /// (a streamer's copies into its slots) must stay outside it, or it waits for itself.
    fn run_step(&self, step: &mut (dyn FnMut() + Send)) {
        step()
    }

    /// RMSNorm over the last axis of x `[.., n]` with weight `[n]`.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32, kind: NormKind, out: &mut Tensor) -> Result<()>;

    /// Rotates x `[T, heads, d]` in place (halves layout) for positions `pos0..pos0+T`.
    fn rope(&self, x: &mut Tensor, table: &RopeTable, pos0: usize) -> Result<()>;

    /// Writes new keys or values `[T, n_kv, d]` (activations) into a cache `[n_kv, capacity, d]`
    /// (from [`Memory::kv_zeros`](crate::Memory::kv_zeros), rounded to its dtype) at `pos0..pos0+T`.
    fn write_kv(&self, cache: &mut Tensor, new: &Tensor, pos0: usize) -> Result<()>;

    /// Causal attention of queries q `[T, n_heads, d]` at positions `pos0..pos0+T` over the
    /// first `pos0 + T` positions of the caches k, v `[n_kv, capacity, d]`; GQA maps query head
    /// h to kv head `h / (n_heads / n_kv)`. out `[T, n_heads, d]`.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos0: usize,
        params: &AttnParams<'_>,
        out: &mut Tensor,
    ) -> Result<()>;

    /// Attention of the nodes of a tree of new tokens (see [`TreeMask`]): q `[T, n_heads, d]`,
    /// T = `tree.len()`, their keys and values already written at cache rows `pos0..pos0+T`.
    /// Node i sits at position `pos0 + depth(i)` and sees the rows before `pos0` and its
    /// ancestors' rows (itself included); a window W hides keys at positions `<= p - W`; sinks
    /// as in [`attention`](Self::attention). out `[T, n_heads, d]`.
    #[allow(clippy::too_many_arguments)]
    fn tree_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos0: usize,
        tree: &TreeMask,
        params: &AttnParams<'_>,
        out: &mut Tensor,
    ) -> Result<()>;

    /// [`attention`](Self::attention) of a sequence whose first `p` positions sit in a shared
    /// prefix's caches `prefix = (k, v, p)` (`[n_kv, ≥ p, d]`, positions `0..p`, held once for
    /// every sequence that starts with them) and the rest in its own caches k, v (row `r` holds
    /// position `p + r`): queries at own rows `pos0..pos0 + T` (positions `p + pos0..`) see every
    /// prefix position and own rows up to their own. Equal to attention over the two caches
    /// joined (the CPU merges the two sources' online-softmax partials). With `params.origin`
    /// the position of the own rows' first (`b`), the prefix's `p` rows are positions
    /// `b - p..b`: a sliding-window layer's prefix holds only the tail its window still sees,
    /// and the joined cache's row 0 is position `b - p` (the CPU lays a short call's grid there).
    #[allow(clippy::too_many_arguments)]
    fn attention_prefixed(
        &self,
        q: &Tensor,
        prefix: (&Tensor, &Tensor, usize),
        own: (&Tensor, &Tensor),
        pos0: usize,
        params: &AttnParams<'_>,
        out: &mut Tensor,
    ) -> Result<()>;

    /// `out = silu(gate) ⊙ up`, all `[T, n]`.
    fn silu_mul(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()>;

    /// `x += y`, same shape (residual add).
    fn add_assign(&self, x: &mut Tensor, y: &Tensor) -> Result<()>;

    /// `out [b, a] = srcᵀ` for src `[a, b]` of any dtype (GPT-OSS dense experts are stored
    /// `[in, out]`; matmul takes `[out, in]`).
    fn transpose(&self, src: &Tensor, out: &mut Tensor) -> Result<()>;

    /// Head-grouped columns copied out (Qwen3-Next's projection splits, docs/models.md §4.4-4.5):
    /// see [`HeadSlice`]. src `[T, heads·stride]`, out `[T, out_cols]` (columns it does not
    /// name are left as they are).
    fn slice_heads(&self, src: &Tensor, s: HeadSlice, out: &mut Tensor) -> Result<()>;

    /// `x ← x ⊙ σ(gate)`; gate has x's shape, or `[T, 1]` for one gate per row.
    fn sigmoid_mul(&self, x: &mut Tensor, gate: &Tensor) -> Result<()>;

    /// Copies rows `src[rows]` of a `[T, n]` tensor into `out` `[rows.len(), n]`.
    fn copy_rows(&self, src: &Tensor, rows: std::ops::Range<usize>, out: &mut Tensor) -> Result<()>;

    /// The reverse of `copy_rows`: writes `src` `[r, n]` into rows `row0..row0 + r` of `dst`
    /// `[T, n]`.
    fn write_rows(&self, src: &Tensor, dst: &mut Tensor, row0: usize) -> Result<()>;

    /// `out = gelu_tanh(gate) ⊙ up`, all `[T, n]` (Gemma's gated MLP, docs/models.md §8):
    /// `gelu_tanh(a) = a/2 · (1 + tanh(√(2/π) · (a + 0.044715·a³)))`.
    fn gelu_tanh_mul(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()>;

    /// `x ← s · x` (Gemma's embeddings scaled by √hidden).
    fn scale(&self, x: &mut Tensor, s: f32) -> Result<()>;

    /// `x ← cap · tanh(x / cap)` (Gemma's logit softcapping); `cap` > 0.
    fn softcap(&self, x: &mut Tensor, cap: f32) -> Result<()>;
}

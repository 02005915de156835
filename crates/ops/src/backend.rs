//! The Backend trait: exactly the ops the model families need, nothing more.
//!
//! Every op writes into a caller-provided output so that scratch buffers are allocated once per
//! forward, not once per op. Activations use the backend's activation dtype (f32 on the CPU);
//! weights keep the dtype they were stored in.

use std::fmt;

use crate::{DType, HostBuffer, HostTensor, Marker, OpsError, Result, Tensor};

/// Which RMSNorm formula (models.md §1.1). In f32 mode Llama and Oss agree; they differ only in
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

/// How a MoE router turns one token's logits `[E]` into k expert ids and weights. Both modes
/// choose the k largest logits, sorted descending, ties broken by the lower expert index (softmax
/// is monotonic, so these are also the k largest probabilities); they differ in the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterMode {
    /// GPT-OSS (models.md §3.3): softmax over the k selected logits only.
    SoftmaxOfTopK,
    /// Qwen3-Next (models.md §4.6): the selected experts' probabilities from a softmax over all
    /// E logits, divided by their sum when `norm_topk_prob`.
    TopKOfSoftmax { norm_topk_prob: bool },
}

/// Which columns [`Backend::slice_heads`] copies: for each of `heads` groups of `stride`
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

/// The inputs of one [`Backend::delta_rule`] call.
#[derive(Clone, Copy, Debug)]
pub struct DeltaRule<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub g: &'a Tensor,
    pub beta: &'a Tensor,
}

/// How [`Backend::delta_rule`] walks the steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaForm {
    /// One step after another (the definition; decode).
    Recurrent,
    /// Chunks of 64 steps in matrix form (prefill).
    Chunked,
}

/// Checks a [`Backend::slice_heads`] call and returns `(T, out_cols)`.
pub(crate) fn slice_dims(src: &Tensor, s: &HeadSlice, out: &Tensor) -> Result<(usize, usize)> {
    let n = s.heads * s.stride;
    let t = src.numel().checked_div(n).unwrap_or(0);
    let out_cols = out.numel().checked_div(t.max(1)).unwrap_or(0);
    if n == 0
        || src.numel() != t * n
        || s.offset + s.width > s.stride
        || s.out_offset + s.heads * s.width > out_cols
        || out.numel() != t * out_cols
    {
        return Err(OpsError::Shape {
            op: "slice_heads",
            detail: format!("{s:?} from {:?} into {:?}", src.shape(), out.shape()),
        });
    }
    Ok((t, out_cols))
}

/// Checks a [`Backend::delta_rule`] call and returns its dimensions `(t, nk, dk, nv, dv)`.
pub(crate) fn delta_dims(
    x: &DeltaRule<'_>,
    state: &Tensor,
    out: &Tensor,
) -> Result<(usize, usize, usize, usize, usize)> {
    let bad = || OpsError::Shape {
        op: "delta_rule",
        detail: format!(
            "q {:?}, k {:?}, v {:?}, g {:?}, beta {:?}, state {:?}, out {:?}",
            x.q.shape(),
            x.k.shape(),
            x.v.shape(),
            x.g.shape(),
            x.beta.shape(),
            state.shape(),
            out.shape()
        ),
    };
    let (&[t, nk, dk], &[t2, nv, dv], &[nv2, dk2, dv2]) = (x.q.shape(), x.v.shape(), state.shape()) else {
        return Err(bad());
    };
    let ok = x.k.shape() == x.q.shape()
        && t2 == t
        && (nv2, dk2, dv2) == (nv, dk, dv)
        && nk > 0
        && nv % nk == 0
        && x.g.numel() == t * nv
        && x.beta.numel() == t * nv
        && out.shape() == x.v.shape();
    if ok { Ok((t, nk, dk, nv, dv)) } else { Err(bad()) }
}

/// Checks a router call (logits `[T, E]`, `1 <= k <= E`) and returns `(T, E)`. Every backend
/// validates through here.
pub(crate) fn router_dims(logits: &Tensor, k: usize) -> Result<(usize, usize)> {
    match *logits.shape() {
        [t, e] if (1..=e).contains(&k) => Ok((t, e)),
        _ => Err(OpsError::Shape {
            op: "router_topk",
            detail: format!("logits {:?} must be [T, E] with 1 <= k <= E, k = {k}", logits.shape()),
        }),
    }
}

/// Checks a clamped SwiGLU call (gate_up `[.., 2I]`, out `[.., I]`, the same leading dims) and
/// returns I. Every backend validates through here.
pub(crate) fn swiglu_dims(gate_up: &Tensor, out: &Tensor) -> Result<usize> {
    let (gu, o) = (gate_up.shape(), out.shape());
    match (gu.split_last(), o.split_last()) {
        (Some((&two_i, lead)), Some((&i, lead_out))) if i > 0 && two_i == 2 * i && lead == lead_out => Ok(i),
        _ => Err(OpsError::Shape {
            op: "clamped_swiglu",
            detail: format!("gate_up {gu:?} must be [.., 2I] for out {o:?} [.., I]"),
        }),
    }
}

/// Checks a gated RMSNorm call (x, z, out `[.., n]`, w `[n]`) and returns n. Every backend
/// validates through here.
pub(crate) fn gated_norm_dims(x: &Tensor, z: &Tensor, w: &Tensor, out: &Tensor) -> Result<usize> {
    let n = x.shape().last().copied().unwrap_or(0);
    if n == 0 || w.numel() != n || z.shape() != x.shape() || out.shape() != x.shape() {
        return Err(OpsError::Shape {
            op: "gated_rms_norm",
            detail: format!("x {:?}, z {:?}, w {:?}, out {:?}", x.shape(), z.shape(), w.shape(), out.shape()),
        });
    }
    Ok(n)
}

/// Checks an MXFP4 dequantisation (blocks `rows·cols/2` bytes, scales `rows·cols/32` bytes,
/// both U8; out `[rows, cols]` BF16) and returns `(rows, cols)`. Every backend validates
/// through here.
pub(crate) fn mxfp4_dims(blocks: &Tensor, scales: &Tensor, out: &Tensor) -> Result<(usize, usize)> {
    let op = "dequant_mxfp4";
    let (&[rows, cols], DType::BF16) = (out.shape(), out.dtype()) else {
        return Err(OpsError::Shape {
            op,
            detail: format!("out {:?} {} must be [rows, cols] BF16", out.shape(), out.dtype()),
        });
    };
    if blocks.dtype() != DType::U8 || scales.dtype() != DType::U8 {
        return Err(OpsError::DType { op, dtype: blocks.dtype(), detail: "blocks and scales are U8" });
    }
    crate::mxfp4::check(blocks.numel(), scales.numel(), rows, cols)
        .map_err(|e| OpsError::Shape { op, detail: e.to_string() })?;
    Ok((rows, cols))
}

/// Checks an MXFP4 matmul (x `[T, k]`, blocks `[n, ..]` U8 of `n·k/2` bytes, scales `n·k/32`,
/// bias `[n]`, out `[T, n]`) and returns `(t, n, k)`.
pub(crate) fn mxfp4_matmul_dims(
    x: &Tensor,
    blocks: &Tensor,
    scales: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<(usize, usize, usize)> {
    let op = "matmul_mxfp4";
    if blocks.dtype() != DType::U8 || scales.dtype() != DType::U8 {
        return Err(OpsError::DType { op, dtype: blocks.dtype(), detail: "blocks and scales are U8" });
    }
    let n = blocks.shape().first().copied().unwrap_or(0);
    let k = scales.numel().checked_div(n).unwrap_or(0) * 32;
    let t = x.numel().checked_div(k).unwrap_or(0);
    let bad_bias = bias.is_some_and(|b| b.numel() != n);
    if n == 0 || k == 0 || blocks.numel() * 2 != n * k || x.numel() != t * k || out.numel() != t * n || bad_bias {
        let b = bias.map(|b| b.shape().to_vec());
        return Err(OpsError::Shape {
            op,
            detail: format!(
                "x {:?} · blocks {:?} (scales {:?}, bias {b:?}) -> out {:?}",
                x.shape(),
                blocks.shape(),
                scales.shape(),
                out.shape()
            ),
        });
    }
    Ok((t, n, k))
}

/// Checks a transpose (src `[a, b]`, out `[b, a]`, one dtype) and returns `(a, b)`.
pub(crate) fn transpose_dims(src: &Tensor, out: &Tensor) -> Result<(usize, usize)> {
    match (src.shape(), out.shape()) {
        (&[a, b], &[b2, a2]) if a == a2 && b == b2 && src.dtype() == out.dtype() => Ok((a, b)),
        _ => Err(OpsError::Shape {
            op: "transpose",
            detail: format!("src {:?} {} into out {:?} {}", src.shape(), src.dtype(), out.shape(), out.dtype()),
        }),
    }
}

/// Checks a row gather or scatter: `table` `[T, n]` (the side indexed by `rows`), `packed`
/// `[rows.len(), n]`, every row index below T, and (scatter) one weight per row, no row twice.
/// Returns `(T, n)`.
pub(crate) fn rows_dims(
    op: &'static str,
    table: &Tensor,
    packed: &Tensor,
    rows: &[u32],
    weights: Option<&[f32]>,
) -> Result<(usize, usize)> {
    let n = table.shape().last().copied().unwrap_or(0);
    let t = table.numel() / n.max(1);
    let bad = |detail: String| Err(OpsError::Shape { op, detail });
    if n == 0 || packed.numel() != rows.len() * n || packed.shape().last() != Some(&n) {
        return bad(format!("{} rows of {:?} against {:?}", rows.len(), table.shape(), packed.shape()));
    }
    if let Some(&r) = rows.iter().find(|&&r| r as usize >= t) {
        return bad(format!("row {r} of a [{t}, {n}] tensor"));
    }
    if let Some(w) = weights {
        if w.len() != rows.len() {
            return bad(format!("{} weights for {} rows", w.len(), rows.len()));
        }
        let mut seen = vec![false; t];
        if let Some(&r) = rows.iter().find(|&&r| std::mem::replace(&mut seen[r as usize], true)) {
            return bad(format!("row {r} appears twice"));
        }
    }
    Ok((t, n))
}

/// Precomputed RoPE tables `[max_positions, rotary_dims / 2]`, already multiplied by the
/// attention factor m (models.md §1.2), resident on the backend.
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

/// Per-layer attention settings.
#[derive(Debug)]
pub struct AttnParams<'a> {
    /// Multiplies q·k (d^-0.5 in all three families).
    pub scale: f32,
    /// Sliding window W: key j is visible from query i iff `i - W < j <= i`. None = full causal.
    pub window: Option<usize>,
    /// One logit per query head that joins the softmax normalisation only (GPT-OSS), `[n_heads]`
    /// f32 (from [`Backend::upload_f32`]) on every backend.
    pub sinks: Option<&'a Tensor>,
}

/// The math a model forward needs. Implemented by the CPU backend (reference) and device backends.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Short name for messages ("cpu", "cuda:0").
    fn name(&self) -> String;

    /// Moves checkpoint bytes onto the backend, keeping their dtype.
    fn upload(&self, host: &HostTensor) -> Result<Tensor>;

    /// Uploads f32 values (tables, biases that must stay exact).
    fn upload_f32(&self, shape: Vec<usize>, data: &[f32]) -> Result<Tensor>;

    /// A zeroed activation tensor in the backend's activation dtype.
    fn zeros(&self, shape: Vec<usize>) -> Result<Tensor>;

    /// A zeroed KV cache `[n_kv, capacity, d]` in [`Backend::kv_dtype`]. Only
    /// [`Backend::write_kv`], [`Backend::attention`] and [`Backend::grow_kv`] need to read it.
    fn kv_zeros(&self, shape: Vec<usize>) -> Result<Tensor>;

    /// Element type of the KV cache: f32 on the CPU (the oracle keeps full precision), bf16 on
    /// GPUs (the model dtype, models.md §2.4).
    fn kv_dtype(&self) -> DType;

    /// Reads any tensor back as f32.
    fn to_host_f32(&self, t: &Tensor) -> Result<Vec<f32>>;

    /// `out[t, :] = table[ids[t], :]`; table `[V, H]`, out `[T, H]`.
    fn embedding(&self, table: &Tensor, ids: &[u32], out: &mut Tensor) -> Result<()>;

    /// `out = x · wᵀ (+ bias)`; x `[T, in]`, w `[out, in]` (nn.Linear layout), out `[T, out]`.
    fn matmul(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, out: &mut Tensor) -> Result<()>;

    /// RMSNorm over the last axis of x `[.., n]` with weight `[n]`.
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32, kind: NormKind, out: &mut Tensor) -> Result<()>;

    /// Rotates x `[T, heads, d]` in place (halves layout) for positions `pos0..pos0+T`.
    fn rope(&self, x: &mut Tensor, table: &RopeTable, pos0: usize) -> Result<()>;

    /// Writes new keys or values `[T, n_kv, d]` (activations) into a cache `[n_kv, capacity, d]`
    /// (from [`Backend::kv_zeros`], rounded to its dtype) at `pos0..pos0+T`.
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

    /// `out = silu(gate) ⊙ up`, all `[T, n]`.
    fn silu_mul(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()>;

    /// GPT-OSS clamped SwiGLU (models.md §3.3): gate_up `[T, 2I]` holds gate in the even and
    /// up in the odd columns; `out[T, I] = (clamp(up, ±limit) + 1) ⊙ g ⊙ σ(alpha·g)` with
    /// `g = min(gate, limit)` (upper clamp only).
    fn clamped_swiglu(&self, gate_up: &Tensor, limit: f32, alpha: f32, out: &mut Tensor) -> Result<()>;

    /// Router top-k of logits `[T, E]` (f32 activations; `1 <= k <= E`): expert ids `[T, k]`
    /// and their weights `[T, k]`, on the host (the engine decides from them which experts to
    /// load). See [`RouterMode`] for the order and the weights. The CUDA backend takes
    /// `E <= 1024`.
    fn router_topk(&self, logits: &Tensor, k: usize, mode: RouterMode) -> Result<(Vec<u32>, Vec<f32>)>;

    /// A zeroed tensor of any dtype, for weights that are filled on the backend: device slots
    /// that copies refill ([`Backend::copy_to_device_async`]) and dequantised experts.
    fn alloc(&self, shape: Vec<usize>, dtype: DType) -> Result<Tensor>;

    /// MXFP4 to bf16, bit-exact (models.md §3.4): blocks (U8, `rows·cols/2` bytes: byte j of a
    /// 32-element group holds element 2j in its low nibble, 2j+1 in its high one) and scales
    /// (U8, `rows·cols/32`, E8M0) into out `[rows, cols]` BF16 (from [`Backend::alloc`]).
    fn dequant_mxfp4(&self, blocks: &Tensor, scales: &Tensor, out: &mut Tensor) -> Result<()>;

    /// `out = x · Wᵀ (+ bias)` with W `[n, k]` in MXFP4 as [`Backend::dequant_mxfp4`] takes it
    /// (`n` = blocks' first dimension), read packed: for a few rows of x (decode) this reads
    /// 4.25 bits a weight instead of unpacking to bf16 first. x `[T, k]`, out `[T, n]`.
    fn matmul_mxfp4(
        &self,
        x: &Tensor,
        blocks: &Tensor,
        scales: &Tensor,
        bias: Option<&Tensor>,
        out: &mut Tensor,
    ) -> Result<()>;

    /// `out [b, a] = srcᵀ` for src `[a, b]` of any dtype (GPT-OSS dense experts are stored
    /// `[in, out]`; matmul takes `[out, in]`).
    fn transpose(&self, src: &Tensor, out: &mut Tensor) -> Result<()>;

    /// `out[i, :] = src[rows[i], :]`; src `[T, n]`, out `[rows.len(), n]`, f32 activations.
    fn gather_rows(&self, src: &Tensor, rows: &[u32], out: &mut Tensor) -> Result<()>;

    /// `dst[rows[i], :] += weights[i] · src[i, :]`; src `[rows.len(), n]`, dst `[T, n]`, f32
    /// activations; no row may appear twice (one expert sees a token once).
    fn scatter_add_rows(&self, src: &Tensor, rows: &[u32], weights: &[f32], dst: &mut Tensor) -> Result<()>;

    /// Qwen3-Next gated RMSNorm (models.md §1.1, Gated-RMS): `out = w ⊙ r(x) ⊙ silu(z)` over the
    /// last axis, `r(x) = x · rsqrt(mean(x²) + eps)`; x, z, out `[.., n]`, plain weight w `[n]`.
    fn gated_rms_norm(&self, x: &Tensor, z: &Tensor, w: &Tensor, eps: f32, out: &mut Tensor) -> Result<()>;

    /// `x += y`, same shape (residual add).
    fn add_assign(&self, x: &mut Tensor, y: &Tensor) -> Result<()>;

    /// Head-grouped columns copied out (Qwen3-Next's projection splits, models.md §4.4-4.5):
    /// see [`HeadSlice`]. src `[T, heads·stride]`, out `[T, out_cols]` (columns it does not
    /// name are left as they are).
    fn slice_heads(&self, src: &Tensor, s: HeadSlice, out: &mut Tensor) -> Result<()>;

    /// `x ← x · scale / sqrt(Σx² + eps)` over the last axis (Gated DeltaNet's q and k).
    fn l2_norm(&self, x: &mut Tensor, eps: f32, scale: f32) -> Result<()>;

    /// `x ← x ⊙ σ(gate)`; gate has x's shape, or `[T, 1]` for one gate per row.
    fn sigmoid_mul(&self, x: &mut Tensor, gate: &Tensor) -> Result<()>;

    /// Gated DeltaNet's gates per value head: `g = −exp(a_log) · softplus(a + dt_bias)` and
    /// `beta = σ(b)`. a, b, g, beta `[T, nv]`; a_log, dt_bias `[nv]`.
    fn deltanet_gates(
        &self,
        a: &Tensor,
        b: &Tensor,
        a_log: &Tensor,
        dt_bias: &Tensor,
        g: &mut Tensor,
        beta: &mut Tensor,
    ) -> Result<()>;

    /// Causal depthwise convolution then SiLU over x `[T, C]` with w `[C, 1, K]` (or `[C, K]`):
    /// `out[t, c] = silu(Σ_j w[c, j] · u[t + j][c])` for `u = [state; x]`; `state` `[K − 1, C]`
    /// f32 holds the inputs before x and is replaced by the last K − 1.
    fn causal_conv1d(&self, x: &Tensor, w: &Tensor, state: &mut Tensor, out: &mut Tensor) -> Result<()>;

    /// The gated delta rule (models.md §4.5) over T steps from `state` `[nv, dk, dv]` f32
    /// (updated): q, k `[T, nk, dk]` (L2-normalised, q scaled), v `[T, nv, dv]`, g and beta
    /// `[T, nv]`; out `[T, nv, dv]`. Value head n reads key head n / (nv / nk). Both forms give
    /// the same result up to rounding.
    fn delta_rule(&self, x: DeltaRule<'_>, state: &mut Tensor, out: &mut Tensor, form: DeltaForm) -> Result<()>;

    /// Copies rows `src[rows]` of a `[T, n]` tensor into `out` `[rows.len(), n]`.
    fn copy_rows(&self, src: &Tensor, rows: std::ops::Range<usize>, out: &mut Tensor) -> Result<()>;

    /// The reverse of `copy_rows`: writes `src` `[r, n]` into rows `row0..row0 + r` of `dst`
    /// `[T, n]`.
    fn write_rows(&self, src: &Tensor, dst: &mut Tensor, row0: usize) -> Result<()>;

    /// Best-of-5 memory bandwidth in bytes/s over a buffer of about `bytes`: a multithreaded
    /// streaming read on the CPU, a device-to-device copy (bytes read + written) on a GPU. The
    /// bound that decode speed is compared with.
    fn measure_bandwidth(&self, bytes: usize) -> Result<f64>;

    /// A KV cache `[n_kv, new_cap, d]` holding rows `keep` of `cache` (`[n_kv, cap, d]`) at rows
    /// `0 .. keep.len()`: growing keeps `0 .. len`; a sliding-window layer drops its front.
    fn grow_kv(&self, cache: &Tensor, keep: std::ops::Range<usize>, new_cap: usize) -> Result<Tensor>;

    // ---- Streaming: copies on a second queue, ordered against compute by markers ----
    //
    // A device backend has two queues: compute (every op above) and copy. Nothing orders one
    // against the other except these markers, so copies overlap compute. The caller (the weight
    // streamer) keeps it correct:
    // * compute reading a tensor that a copy wrote: `compute_wait(&copy_marker()?)` in between;
    // * a copy overwriting a tensor that compute reads or writes: `copy_wait(&compute_marker()?)`
    //   first. That includes a tensor just made by `zeros`/`upload`/`kv_zeros`: its allocation
    //   and fill are queued on the compute queue;
    // * dropping a tensor a copy may still be writing (its memory is freed on the compute
    //   queue): `compute_wait(&copy_marker()?)` or `host_wait` first;
    // * rewriting host bytes a queued copy reads: `host_wait(&copy_marker()?)` first.
    // These methods may be called from another host thread while compute runs on this one.

    /// `bytes` (rounded up to 4096) of host memory for staging and cached layers: page-locked on
    /// a device backend, so copies from it are asynchronous DMA. Not counted in the VRAM budget.
    fn host_alloc(&self, bytes: usize) -> Result<HostBuffer>;

    /// Queues a copy of `src[offset .. offset + dst.size_bytes()]` (dst's raw little-endian
    /// elements, any dtype) into `dst` on the copy queue; the CPU backend copies immediately.
    /// Range and size errors are [`OpsError::Shape`]. Ordering: see the notes above.
    fn copy_to_device_async(&self, src: &HostBuffer, offset: usize, dst: &mut Tensor) -> Result<()>;

    /// A marker after every copy queued so far on the copy queue.
    fn copy_marker(&self) -> Result<Marker>;

    /// A marker after all compute queued so far (the compute queue).
    fn compute_marker(&self) -> Result<Marker>;

    /// Compute queued after this call waits (on the device; the host does not block) for `m`.
    fn compute_wait(&self, m: &Marker) -> Result<()>;

    /// Copies queued after this call wait (on the device) for `m`.
    fn copy_wait(&self, m: &Marker) -> Result<()>;

    /// Blocks the calling host thread until `m` has passed.
    fn host_wait(&self, m: &Marker) -> Result<()>;

    /// Queues on the copy queue a copy of positions `span.pos .. span.pos + span.n` of every
    /// head of the KV cache `cache` `[n_kv, cap, d]` into the host block at `span` (see
    /// [`KvBlockSpan`]); the CPU backend copies immediately. The caller orders it after the
    /// compute that wrote those positions (`copy_wait`) and reads the host bytes only after a
    /// later `copy_marker` has passed (`host_wait`).
    fn kv_to_host_async(&self, cache: &Tensor, dst: &mut HostBuffer, span: KvBlockSpan) -> Result<()>;

    /// The reverse of [`kv_to_host_async`](Self::kv_to_host_async): host block rows into cache
    /// positions, on the copy queue (compute that reads them waits on a later `copy_marker`).
    fn kv_from_host_async(&self, src: &HostBuffer, cache: &mut Tensor, span: KvBlockSpan) -> Result<()>;

    /// Best-of-5 host-to-device bandwidth in bytes/s from a [`HostBuffer`] of about `bytes` into
    /// a device tensor: pinned asynchronous copies on the copy queue timed with events on a
    /// GPU, a memcpy on the CPU. The bound that streaming from the RAM tier is compared with.
    fn measure_host_to_device(&self, bytes: usize) -> Result<f64>;
}

/// Where some positions of a KV cache `[n_kv, cap, d]` sit in a host block: the block holds
/// `block` positions of every head, laid out `[n_kv, block, d]` in the cache's dtype
/// (little-endian) from byte `offset` of a [`HostBuffer`]; cache positions `pos .. pos + n` are
/// block rows `row .. row + n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBlockSpan {
    pub offset: usize,
    pub block: usize,
    pub row: usize,
    pub pos: usize,
    pub n: usize,
}

impl KvBlockSpan {
    /// Checks the span against a cache of `shape` with `elem`-byte elements and a host buffer of
    /// `host_len` bytes; returns `(n_kv, cap, d)`.
    pub fn check(
        &self,
        op: &'static str,
        shape: &[usize],
        elem: usize,
        host_len: usize,
    ) -> Result<(usize, usize, usize)> {
        let &[n_kv, cap, d] = shape else {
            return Err(OpsError::Shape { op, detail: format!("cache {shape:?} is not [n_kv, cap, d]") });
        };
        let host_end =
            n_kv.checked_mul(self.block).and_then(|x| x.checked_mul(d * elem)).and_then(|x| x.checked_add(self.offset));
        if self.pos + self.n > cap || self.row + self.n > self.block || host_end.is_none_or(|e| e > host_len) {
            return Err(OpsError::Shape {
                op,
                detail: format!("{self:?} against cache {shape:?} and a host buffer of {host_len} B"),
            });
        }
        Ok((n_kv, cap, d))
    }
}

/// The error for a marker made by another backend.
pub(crate) fn foreign_marker(op: &'static str, expected: &'static str, m: &Marker) -> OpsError {
    OpsError::WrongBackend { op, expected, found: m.backend_name() }
}

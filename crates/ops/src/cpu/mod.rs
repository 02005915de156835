//! The CPU backend: f32 math over bf16/f16/f32 storage, multithreaded with rayon.
//!
//! It is the reference every device backend is checked against, and what runs in CI and on
//! machines without a GPU. Each op lives in its own file as a plain function over slices; this
//! file only unpacks tensors and checks shapes.

mod attention;
mod busy;
pub mod deltanet;
mod elementwise;
mod hugepages;
#[cfg(unix)]
pub use hugepages::HugePageAlloc;
pub mod kernels;
mod kv;
mod matmul;
mod moe;
mod norm;
mod rope;
mod transfer;
mod tree_attention;

pub use attention::{Geometry as AttnGeometry, KvElem, attention, attention_prefixed, attention_prefixed_at};
pub use elementwise::{embedding, gelu_tanh_mul, silu_mul, softcap};
pub use kernels::{KERNELS_ENV, Kernels, Tier, tier_from_env};
pub use matmul::{
    Dims as MatmulDims, Job as MatmulJob, Precision, matmul, matmul_many_with, matmul_with, set_decode_runs,
};
pub use moe::{clamped_swiglu, router_topk};
pub use norm::{gated_rms_norm, rms_norm};
pub use rope::rope;
pub use transfer::fill_from_le_bytes;
pub use tree_attention::tree_attention;

use std::ops::Range;

use half::{bf16, f16};

use crate::backend::{
    AttnParams, Backend, Compute, CopyQueue, DeltaForm, DeltaNetOps, DeltaRule, HeadSlice, KvBlockSpan, Memory,
    MemoryKind, MemoryStats, MoeOps, NormKind, RopeTable, RouterMode, delta_dims, foreign_marker, gated_norm_dims,
    mxfp4_dims, mxfp4_matmul_dims, router_dims, rows_dims, slice_dims, swiglu_dims, transpose_dims,
};
use crate::error::{Result, shape_err};
use crate::{CpuStorage, DType, HostBuffer, HostTensor, Marker, OpsError, Storage, Tensor, TreeMask};
use kv::{kv_dtype_err, kv_rows_from_host, kv_rows_to_host, regrow, write_kv_rows};

/// The CPU backend. Threads come from rayon's global pool; kernels from [`Kernels::active`].
/// Its settings are the matmul [`Precision`] and the KV cache's dtype, which follows it: f32
/// with exact activations (the oracle), bf16 with bf16 activations (half the bytes attention
/// reads per token; [`with_kv_dtype`](Self::with_kv_dtype) sets it apart, for benchmarks).
#[derive(Debug, Clone, Copy)]
pub struct CpuBackend {
    precision: Precision,
    kv_dtype: DType,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::with_precision(Precision::default())
    }
}

impl CpuBackend {
    /// f32 activations and an f32 KV cache ([`Precision::Exact`]): the oracle every backend is
    /// checked against.
    pub fn new() -> Self {
        Self::with_precision(Precision::Exact)
    }

    /// With the given matmul precision ([`Precision::Bf16Activations`] is what `ollm` runs with)
    /// and the KV dtype that goes with it (bf16 for bf16 activations, else f32).
    pub fn with_precision(precision: Precision) -> Self {
        let kv_dtype = match precision {
            Precision::Bf16Activations => DType::BF16,
            Precision::Exact => DType::F32,
        };
        Self { precision, kv_dtype }
    }

    /// The same backend with its KV cache in `dtype` (f32 or bf16; any other is refused).
    pub fn with_kv_dtype(self, dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 | DType::BF16 => Ok(Self { kv_dtype: dtype, ..self }),
            other => {
                Err(OpsError::DType { op: "with_kv_dtype", dtype: other, detail: "the CPU KV cache is f32 or bf16" })
            }
        }
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The kernel tier, the precision where it changes anything, and the KV dtype (for logs and
    /// `ollm bench`).
    pub fn describe(&self) -> String {
        let kern = Kernels::active();
        let bf16 = kern.has_bf16_dot() && self.precision == Precision::Bf16Activations;
        format!(
            "{} kernels{}, {} KV",
            kern.tier(),
            if bf16 { ", bf16 activations" } else { ", f32 activations" },
            self.kv_dtype.to_string().to_lowercase()
        )
    }
}

/// Widens any CPU storage into f32 (weights such as norms and biases are small).
pub fn storage_to_f32(s: &CpuStorage) -> Vec<f32> {
    match s {
        CpuStorage::F32(v) => v.clone(),
        CpuStorage::F16(v) => v.iter().map(|x| f16::to_f32(*x)).collect(),
        CpuStorage::BF16(v) => v.iter().map(|x| bf16::to_f32(*x)).collect(),
        CpuStorage::U8(v) => v.iter().map(|&x| f32::from(x)).collect(),
    }
}

/// Why packed weights cannot multiply: they are dequantised first.
const PACKED: &str = "packed weights are dequantised (Backend::dequant_mxfp4) before a matmul";

fn last_dim(t: &Tensor) -> usize {
    t.shape().last().copied().unwrap_or(1)
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        "cpu".to_string()
    }

    fn moe_ops(&self) -> Option<&dyn MoeOps> {
        Some(self)
    }

    fn deltanet_ops(&self) -> Option<&dyn DeltaNetOps> {
        Some(self)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Compute for CpuBackend {
    /// On a thread of rayon's pool (in place when already on one), the pool's other threads
    /// spinning through the step ([`busy::run`]).
    fn run_step(&self, step: &mut (dyn FnMut() + Send)) {
        if rayon::current_thread_index().is_some() {
            busy::run(step);
        } else {
            rayon::scope(|_| busy::run(step));
        }
    }

    fn embedding(&self, table: &Tensor, ids: &[u32], out: &mut Tensor) -> Result<()> {
        let (&[vocab, hidden], &[t, h2]) = (table.shape(), out.shape()) else {
            return shape_err("embedding", format!("table {:?}, out {:?}", table.shape(), out.shape()));
        };
        if hidden != h2 || t != ids.len() {
            return shape_err(
                "embedding",
                format!("table {:?}, out {:?}, {} ids", table.shape(), out.shape(), ids.len()),
            );
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return shape_err("embedding", format!("token id {bad} is outside the vocabulary of {vocab}"));
        }
        elementwise::embedding(table.cpu("embedding")?, hidden, ids, out.cpu_f32_mut("embedding")?);
        Ok(())
    }

    fn matmul(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, out: &mut Tensor) -> Result<()> {
        self.matmul_many(x, &[(w, bias)], &mut [out])
    }

    fn matmul_many(&self, x: &Tensor, ws: &[(&Tensor, Option<&Tensor>)], outs: &mut [&mut Tensor]) -> Result<()> {
        if ws.len() != outs.len() {
            return shape_err("matmul_many", format!("{} weights for {} outputs", ws.len(), outs.len()));
        }
        let Some(&(w0, _)) = ws.first() else { return Ok(()) };
        // Every weight has the same `in` (k): x and out may carry any shape whose trailing
        // elements form rows of `in` and `out` (e.g. attention output [T, heads, d] against
        // o_proj [H, heads·d]).
        let k = w0.shape().last().copied().unwrap_or(0);
        let t = x.numel() / k.max(1);
        let mut biases = Vec::with_capacity(ws.len());
        for ((w, bias), out) in ws.iter().zip(outs.iter()) {
            let &[n, wk] = w.shape() else {
                return shape_err("matmul", format!("weight must be 2-D [out, in], got {:?}", w.shape()));
            };
            if w.dtype() == DType::U8 {
                return Err(OpsError::DType { op: "matmul", dtype: DType::U8, detail: PACKED });
            }
            if k == 0 || wk != k || x.numel() != t * k || out.numel() != t * n {
                return shape_err("matmul", format!("x {:?} · w{:?}ᵀ -> out {:?}", x.shape(), w.shape(), out.shape()));
            }
            biases.push(match bias {
                Some(b) if b.numel() != n => {
                    return shape_err("matmul", format!("bias {:?} for {n} outputs", b.shape()));
                }
                Some(b) => Some(storage_to_f32(b.cpu("matmul")?)),
                None => None,
            });
        }
        let x = x.cpu_f32("matmul")?;
        let mut jobs = Vec::with_capacity(ws.len());
        for (((w, _), out), bias) in ws.iter().zip(outs.iter_mut()).zip(&biases) {
            let n = w.shape()[0];
            jobs.push(MatmulJob { w: w.cpu("matmul")?, n, bias: bias.as_deref(), out: out.cpu_f32_mut("matmul")? });
        }
        matmul_many_with(Kernels::active(), self.precision, x, (t, k), &mut jobs);
        Ok(())
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32, kind: NormKind, out: &mut Tensor) -> Result<()> {
        let n = last_dim(x);
        if w.numel() != n || out.shape() != x.shape() {
            return shape_err("rms_norm", format!("x {:?}, w {:?}, out {:?}", x.shape(), w.shape(), out.shape()));
        }
        let w = storage_to_f32(w.cpu("rms_norm")?);
        rms_norm(x.cpu_f32("rms_norm")?, &w, eps, kind, out.cpu_f32_mut("rms_norm")?);
        Ok(())
    }

    fn rope(&self, x: &mut Tensor, table: &RopeTable, pos0: usize) -> Result<()> {
        let &[t, heads, d] = x.shape() else {
            return shape_err("rope", format!("x must be [T, heads, d], got {:?}", x.shape()));
        };
        let r = table.rotary_dims;
        if r > d || !r.is_multiple_of(2) || table.cos.shape() != [table.max_positions(), r / 2] {
            return shape_err("rope", format!("rotary dims {r}, head dim {d}, table {:?}", table.cos.shape()));
        }
        if pos0 + t > table.max_positions() {
            return shape_err(
                "rope",
                format!("positions up to {} exceed the table's {}", pos0 + t, table.max_positions()),
            );
        }
        let (cos, sin) = (table.cos.cpu_f32("rope")?, table.sin.cpu_f32("rope")?);
        rope(x.cpu_f32_mut("rope")?, heads, d, r, cos, sin, pos0);
        Ok(())
    }

    fn write_kv(&self, cache: &mut Tensor, new: &Tensor, pos0: usize) -> Result<()> {
        let (&[n_kv, cap, d], &[t, n_kv2, d2]) = (cache.shape(), new.shape()) else {
            return shape_err("write_kv", format!("cache {:?}, new {:?}", cache.shape(), new.shape()));
        };
        if n_kv != n_kv2 || d != d2 || pos0 + t > cap {
            return shape_err(
                "write_kv",
                format!("cache {:?}, new {:?} at position {pos0}", cache.shape(), new.shape()),
            );
        }
        let src = new.cpu_f32("write_kv")?;
        match cache.cpu_mut("write_kv")? {
            CpuStorage::F32(dst) => write_kv_rows(src, dst, (t, n_kv, d), cap, pos0),
            CpuStorage::BF16(dst) => write_kv_rows(src, dst, (t, n_kv, d), cap, pos0),
            other => return Err(kv_dtype_err("write_kv", other.dtype())),
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos0: usize,
        params: &AttnParams<'_>,
        out: &mut Tensor,
    ) -> Result<()> {
        let geo = AttnGeometry::of(q, k, v, out, pos0, params.sinks)?;
        let sinks = params.sinks.map(|s| s.cpu("attention").map(storage_to_f32)).transpose()?;
        let (q, out) = (q.cpu_f32("attention")?, out.cpu_f32_mut("attention")?);
        let (scale, window, sinks) = (params.scale, params.window, sinks.as_deref());
        match (k.cpu("attention")?, v.cpu("attention")?) {
            (CpuStorage::F32(k), CpuStorage::F32(v)) => attention::attention_masked(
                Kernels::active(),
                q,
                (k, v, &geo),
                (scale, window, sinks),
                None,
                params.origin,
                out,
            ),
            (CpuStorage::BF16(k), CpuStorage::BF16(v)) => attention::attention_masked(
                Kernels::active(),
                q,
                (k, v, &geo),
                (scale, window, sinks),
                None,
                params.origin,
                out,
            ),
            (k, _) => return Err(kv_dtype_err("attention", k.dtype())),
        }
        Ok(())
    }

    fn tree_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos0: usize,
        tree: &TreeMask,
        params: &AttnParams<'_>,
        out: &mut Tensor,
    ) -> Result<()> {
        let geo = AttnGeometry::of_tree(q, k, v, out, pos0, tree, params.sinks)?;
        let op = "tree_attention";
        let sinks = params.sinks.map(|s| s.cpu(op).map(storage_to_f32)).transpose()?;
        let (q, out) = (q.cpu_f32(op)?, out.cpu_f32_mut(op)?);
        let (scale, window, sinks) = (params.scale, params.window, sinks.as_deref());
        match (k.cpu(op)?, v.cpu(op)?) {
            (CpuStorage::F32(k), CpuStorage::F32(v)) => {
                tree_attention::tree_attention_at(q, (k, v, &geo), tree, (scale, window, sinks), params.origin, out)
            }
            (CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                tree_attention::tree_attention_at(q, (k, v, &geo), tree, (scale, window, sinks), params.origin, out)
            }
            (k, _) => return Err(kv_dtype_err(op, k.dtype())),
        }
        Ok(())
    }

    fn attention_prefixed(
        &self,
        q: &Tensor,
        prefix: (&Tensor, &Tensor, usize),
        (k, v): (&Tensor, &Tensor),
        pos0: usize,
        params: &AttnParams<'_>,
        out: &mut Tensor,
    ) -> Result<()> {
        let (pg, g) = AttnGeometry::of_prefixed(q, prefix, (k, v), out, pos0, params.sinks)?;
        let op = "attention_prefixed";
        let sinks = params.sinks.map(|s| s.cpu(op).map(storage_to_f32)).transpose()?;
        let (q, out) = (q.cpu_f32(op)?, out.cpu_f32_mut(op)?);
        let (ps, geo) = ((params.scale, params.window, sinks.as_deref()), (&pg, &g));
        // The prefix's rows are the positions just before the own rows' first (params.origin).
        let origin = params.origin.saturating_sub(prefix.2);
        match (prefix.0.cpu(op)?, prefix.1.cpu(op)?, k.cpu(op)?, v.cpu(op)?) {
            (CpuStorage::F32(pk), CpuStorage::F32(pv), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                attention_prefixed_at(q, (pk, pv, prefix.2), (k, v), geo, ps, origin, out)
            }
            (CpuStorage::BF16(pk), CpuStorage::BF16(pv), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                attention_prefixed_at(q, (pk, pv, prefix.2), (k, v), geo, ps, origin, out)
            }
            (pk, _, k, _) => {
                let dtype = if matches!(pk, CpuStorage::F32(_) | CpuStorage::BF16(_)) { k.dtype() } else { pk.dtype() };
                return Err(kv_dtype_err(op, dtype));
            }
        }
        Ok(())
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()> {
        if gate.shape() != up.shape() || out.shape() != gate.shape() {
            return shape_err(
                "silu_mul",
                format!("gate {:?}, up {:?}, out {:?}", gate.shape(), up.shape(), out.shape()),
            );
        }
        elementwise::silu_mul(gate.cpu_f32("silu_mul")?, up.cpu_f32("silu_mul")?, out.cpu_f32_mut("silu_mul")?);
        Ok(())
    }

    fn add_assign(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        if x.shape() != y.shape() {
            return shape_err("add_assign", format!("x {:?}, y {:?}", x.shape(), y.shape()));
        }
        elementwise::add_assign(x.cpu_f32_mut("add_assign")?, y.cpu_f32("add_assign")?);
        Ok(())
    }

    fn transpose(&self, src: &Tensor, out: &mut Tensor) -> Result<()> {
        let (a, b) = transpose_dims(src, out)?;
        fn t<T: Copy + Send + Sync>(src: &[T], a: usize, b: usize, out: &mut [T]) {
            elementwise::transpose(src, a, b, out)
        }
        let op = "transpose";
        match (src.cpu(op)?, out.cpu_mut(op)?) {
            (CpuStorage::F32(s), CpuStorage::F32(o)) => t(s, a, b, o),
            (CpuStorage::F16(s), CpuStorage::F16(o)) => t(s, a, b, o),
            (CpuStorage::BF16(s), CpuStorage::BF16(o)) => t(s, a, b, o),
            (CpuStorage::U8(s), CpuStorage::U8(o)) => t(s, a, b, o),
            _ => return Err(OpsError::DType { op, dtype: src.dtype(), detail: "src and out share a dtype" }),
        }
        Ok(())
    }

    fn slice_heads(&self, src: &Tensor, s: HeadSlice, out: &mut Tensor) -> Result<()> {
        let (t, cols) = slice_dims(src, &s, out)?;
        let x = src.cpu_f32("slice_heads")?;
        let o = out.cpu_f32_mut("slice_heads")?;
        let n = s.heads * s.stride;
        for r in 0..t {
            for h in 0..s.heads {
                let from = &x[r * n + h * s.stride + s.offset..][..s.width];
                o[r * cols + s.out_offset + h * s.width..][..s.width].copy_from_slice(from);
            }
        }
        Ok(())
    }

    fn sigmoid_mul(&self, x: &mut Tensor, gate: &Tensor) -> Result<()> {
        let (n, per_row) = (x.numel(), gate.numel());
        let rows = match last_dim(x) {
            0 => 0,
            d => n / d,
        };
        if per_row != n && per_row != rows {
            return shape_err("sigmoid_mul", format!("x {:?}, gate {:?}", x.shape(), gate.shape()));
        }
        let g = gate.cpu_f32("sigmoid_mul")?;
        let d = if per_row == n { 1 } else { n / rows.max(1) };
        for (i, v) in x.cpu_f32_mut("sigmoid_mul")?.iter_mut().enumerate() {
            let z = if per_row == n { g[i] } else { g[i / d] };
            *v *= 1.0 / (1.0 + (-z).exp());
        }
        Ok(())
    }

    fn copy_rows(&self, src: &Tensor, rows: Range<usize>, out: &mut Tensor) -> Result<()> {
        let n = last_dim(src);
        let t = src.numel() / n.max(1);
        if rows.end > t || out.numel() != rows.len() * n {
            return shape_err("copy_rows", format!("rows {rows:?} of {:?} into {:?}", src.shape(), out.shape()));
        }
        let s = &src.cpu_f32("copy_rows")?[rows.start * n..rows.end * n];
        out.cpu_f32_mut("copy_rows")?.copy_from_slice(s);
        Ok(())
    }

    fn write_rows(&self, src: &Tensor, dst: &mut Tensor, row0: usize) -> Result<()> {
        let n = last_dim(dst);
        let (r, t) = (src.numel() / n.max(1), dst.numel() / n.max(1));
        if last_dim(src) != n || row0 + r > t {
            return shape_err("write_rows", format!("{:?} at row {row0} of {:?}", src.shape(), dst.shape()));
        }
        let s = src.cpu_f32("write_rows")?;
        dst.cpu_f32_mut("write_rows")?[row0 * n..(row0 + r) * n].copy_from_slice(s);
        Ok(())
    }

    fn gelu_tanh_mul(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()> {
        if gate.shape() != up.shape() || out.shape() != gate.shape() {
            return shape_err(
                "gelu_tanh_mul",
                format!("gate {:?}, up {:?}, out {:?}", gate.shape(), up.shape(), out.shape()),
            );
        }
        let op = "gelu_tanh_mul";
        elementwise::gelu_tanh_mul(gate.cpu_f32(op)?, up.cpu_f32(op)?, out.cpu_f32_mut(op)?);
        Ok(())
    }

    fn scale(&self, x: &mut Tensor, s: f32) -> Result<()> {
        elementwise::scale(x.cpu_f32_mut("scale")?, s);
        Ok(())
    }

    fn softcap(&self, x: &mut Tensor, cap: f32) -> Result<()> {
        if !(cap > 0.0 && cap.is_finite()) {
            return shape_err("softcap", format!("cap {cap} must be a positive finite number"));
        }
        elementwise::softcap(x.cpu_f32_mut("softcap")?, cap);
        Ok(())
    }
}

impl MoeOps for CpuBackend {
    fn router_topk(&self, logits: &Tensor, k: usize, mode: RouterMode) -> Result<(Vec<u32>, Vec<f32>)> {
        let (t, e) = router_dims(logits, k)?;
        let (mut ids, mut weights) = (vec![0u32; t * k], vec![0.0f32; t * k]);
        moe::router_topk(logits.cpu_f32("router_topk")?, e, k, mode, &mut ids, &mut weights);
        Ok((ids, weights))
    }

    fn gather_rows(&self, src: &Tensor, rows: &[u32], out: &mut Tensor) -> Result<()> {
        let (_, n) = rows_dims("gather_rows", src, out, rows, None)?;
        let s = src.cpu_f32("gather_rows")?;
        for (o, &r) in out.cpu_f32_mut("gather_rows")?.chunks_exact_mut(n).zip(rows) {
            o.copy_from_slice(&s[r as usize * n..][..n]);
        }
        Ok(())
    }

    fn scatter_add_rows(&self, src: &Tensor, rows: &[u32], weights: &[f32], dst: &mut Tensor) -> Result<()> {
        let (_, n) = rows_dims("scatter_add_rows", dst, src, rows, Some(weights))?;
        let s = src.cpu_f32("scatter_add_rows")?;
        let d = dst.cpu_f32_mut("scatter_add_rows")?;
        for ((row, &r), &w) in s.chunks_exact(n).zip(rows).zip(weights) {
            for (o, &v) in d[r as usize * n..][..n].iter_mut().zip(row) {
                *o += w * v;
            }
        }
        Ok(())
    }

    fn clamped_swiglu(&self, gate_up: &Tensor, limit: f32, alpha: f32, out: &mut Tensor) -> Result<()> {
        let inter = swiglu_dims(gate_up, out)?;
        let op = "clamped_swiglu";
        moe::clamped_swiglu(gate_up.cpu_f32(op)?, inter, limit, alpha, out.cpu_f32_mut(op)?);
        Ok(())
    }

    fn dequant_mxfp4(&self, blocks: &Tensor, scales: &Tensor, out: &mut Tensor) -> Result<()> {
        let (rows, cols) = mxfp4_dims(blocks, scales, out)?;
        let op = "dequant_mxfp4";
        let (CpuStorage::U8(b), CpuStorage::U8(s)) = (blocks.cpu(op)?, scales.cpu(op)?) else {
            return Err(OpsError::DType { op, dtype: blocks.dtype(), detail: "blocks and scales are U8" });
        };
        let CpuStorage::BF16(o) = out.cpu_mut(op)? else {
            return Err(OpsError::DType { op, dtype: DType::F32, detail: "out is BF16" });
        };
        crate::mxfp4::dequantize_into(b, s, rows, cols, o).map_err(|e| OpsError::Shape { op, detail: e.to_string() })
    }

    fn matmul_mxfp4(
        &self,
        x: &Tensor,
        blocks: &Tensor,
        scales: &Tensor,
        bias: Option<&Tensor>,
        out: &mut Tensor,
    ) -> Result<()> {
        let (_, n, k) = mxfp4_matmul_dims(x, blocks, scales, bias, out)?;
        let mut w = self.alloc(vec![n, k], DType::BF16)?;
        self.dequant_mxfp4(blocks, scales, &mut w)?;
        self.matmul(x, &w, bias, out)
    }

    /// The CPU has no grouped kernel ([`MoeOps::grouped_experts`] says `Ok(false)`, and
    /// `run_experts` runs the per-expert loop), but takes experts in groups as stored: the loop
    /// computes the same numbers from packed MXFP4 (`matmul_mxfp4` unpacks to bf16 first, as the
    /// expert cache's unpack does), so the grouped expert-cache path runs, and is tested, here.
    fn has_grouped_experts(&self) -> bool {
        true
    }
}

impl DeltaNetOps for CpuBackend {
    fn l2_norm(&self, x: &mut Tensor, eps: f32, scale: f32) -> Result<()> {
        let d = last_dim(x);
        deltanet::l2_norm_rows(x.cpu_f32_mut("l2_norm")?, d.max(1), eps, scale);
        Ok(())
    }

    fn deltanet_gates(
        &self,
        a: &Tensor,
        b: &Tensor,
        a_log: &Tensor,
        dt_bias: &Tensor,
        g: &mut Tensor,
        beta: &mut Tensor,
    ) -> Result<()> {
        let nv = a_log.numel();
        let n = a.numel();
        if nv == 0
            || dt_bias.numel() != nv
            || !n.is_multiple_of(nv)
            || b.numel() != n
            || g.numel() != n
            || beta.numel() != n
        {
            return shape_err(
                "deltanet_gates",
                format!(
                    "a {:?}, b {:?}, a_log {:?}, dt_bias {:?}",
                    a.shape(),
                    b.shape(),
                    a_log.shape(),
                    dt_bias.shape()
                ),
            );
        }
        let op = "deltanet_gates";
        let (al, db) = (storage_to_f32(a_log.cpu(op)?), storage_to_f32(dt_bias.cpu(op)?));
        deltanet::gates(a.cpu_f32(op)?, b.cpu_f32(op)?, &al, &db, g.cpu_f32_mut(op)?, beta.cpu_f32_mut(op)?);
        Ok(())
    }

    fn causal_conv1d(&self, x: &Tensor, w: &Tensor, state: &mut Tensor, out: &mut Tensor) -> Result<()> {
        let ch = w.shape().first().copied().unwrap_or(0);
        let k = w.numel().checked_div(ch).unwrap_or(0);
        if ch == 0
            || k == 0
            || !x.numel().is_multiple_of(ch)
            || out.numel() != x.numel()
            || state.numel() != (k - 1) * ch
        {
            return shape_err(
                "causal_conv1d",
                format!("x {:?}, w {:?}, state {:?}, out {:?}", x.shape(), w.shape(), state.shape(), out.shape()),
            );
        }
        let op = "causal_conv1d";
        let wf = storage_to_f32(w.cpu(op)?);
        deltanet::causal_conv1d(x.cpu_f32(op)?, ch, &wf, k, state.cpu_f32_mut(op)?, out.cpu_f32_mut(op)?);
        Ok(())
    }

    fn delta_rule(&self, x: DeltaRule<'_>, state: &mut Tensor, out: &mut Tensor, form: DeltaForm) -> Result<()> {
        let (t, nk, dk, nv, dv) = delta_dims(&x, state, out)?;
        let op = "delta_rule";
        let d = deltanet::DeltaDims { t, nk, dk, nv, dv };
        let inputs = deltanet::DeltaInputs {
            q: x.q.cpu_f32(op)?,
            k: x.k.cpu_f32(op)?,
            v: x.v.cpu_f32(op)?,
            g: x.g.cpu_f32(op)?,
            beta: x.beta.cpu_f32(op)?,
        };
        let (s, o) = (state.cpu_f32_mut(op)?, out.cpu_f32_mut(op)?);
        match form {
            DeltaForm::Recurrent => deltanet::delta_rule_recurrent(d, &inputs, s, o),
            DeltaForm::Chunked => deltanet::delta_rule_chunked(d, &inputs, s, o),
        }
        Ok(())
    }

    fn gated_rms_norm(&self, x: &Tensor, z: &Tensor, w: &Tensor, eps: f32, out: &mut Tensor) -> Result<()> {
        gated_norm_dims(x, z, w, out)?;
        let op = "gated_rms_norm";
        let w = storage_to_f32(w.cpu(op)?);
        gated_rms_norm(x.cpu_f32(op)?, z.cpu_f32(op)?, &w, eps, out.cpu_f32_mut(op)?);
        Ok(())
    }
}

impl Memory for CpuBackend {
    /// Into memory advised for huge pages ([`hugepages`]): decode streams it every token.
    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        host.validate()?;
        fn decode<T, const N: usize>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
            let mut v = hugepages::with_capacity(bytes.len() / N);
            v.extend(bytes.chunks_exact(N).map(|c| {
                let mut raw = [0u8; N];
                raw.copy_from_slice(c);
                f(raw)
            }));
            v
        }
        let b = &host.bytes;
        let storage = match host.dtype {
            DType::F32 => CpuStorage::F32(decode(b, f32::from_le_bytes)),
            DType::F16 => CpuStorage::F16(decode(b, |r| f16::from_bits(u16::from_le_bytes(r)))),
            DType::BF16 => CpuStorage::BF16(decode(b, |r| bf16::from_bits(u16::from_le_bytes(r)))),
            DType::U8 => CpuStorage::U8(decode(b, |[r]: [u8; 1]| r)),
        };
        Tensor::new(host.shape.clone(), Storage::Cpu(storage))
    }

    fn upload_f32(&self, shape: Vec<usize>, data: &[f32]) -> Result<Tensor> {
        Tensor::from_f32(shape, data.to_vec())
    }

    fn zeros(&self, shape: Vec<usize>) -> Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_f32(shape, vec![0.0; n])
    }

    fn kv_zeros(&self, shape: Vec<usize>) -> Result<Tensor> {
        self.alloc(shape, self.kv_dtype)
    }

    fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    fn alloc(&self, shape: Vec<usize>, dtype: DType) -> Result<Tensor> {
        let n = shape.iter().product();
        // Huge pages where large (KV caches, streamed layers' slots): see `hugepages`.
        let s = match dtype {
            DType::F32 => CpuStorage::F32(hugepages::filled(n, 0.0)),
            DType::F16 => CpuStorage::F16(hugepages::filled(n, f16::ZERO)),
            DType::BF16 => CpuStorage::BF16(hugepages::filled(n, bf16::ZERO)),
            DType::U8 => CpuStorage::U8(hugepages::filled(n, 0)),
        };
        Tensor::new(shape, Storage::Cpu(s))
    }

    fn to_host_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        Ok(storage_to_f32(t.cpu("to_host_f32")?))
    }

    fn grow_kv(&self, cache: &Tensor, keep: std::ops::Range<usize>, new_cap: usize) -> Result<Tensor> {
        let &[n_kv, cap, d] = cache.shape() else {
            return shape_err("grow_kv", format!("cache {:?}", cache.shape()));
        };
        if keep.end > cap || keep.len() > new_cap {
            return shape_err("grow_kv", format!("keep positions {keep:?} of {cap} in {new_cap}"));
        }
        let dims = (n_kv, cap, d);
        let storage = match cache.cpu("grow_kv")? {
            CpuStorage::F32(src) => CpuStorage::F32(regrow(src, 0.0, dims, keep, new_cap)),
            CpuStorage::BF16(src) => CpuStorage::BF16(regrow(src, bf16::ZERO, dims, keep, new_cap)),
            other => return Err(kv_dtype_err("grow_kv", other.dtype())),
        };
        Tensor::new(vec![n_kv, new_cap, d], Storage::Cpu(storage))
    }

    fn host_alloc(&self, bytes: usize) -> Result<HostBuffer> {
        HostBuffer::heap(bytes)
    }

    fn memory_kind(&self) -> MemoryKind {
        MemoryKind::Host
    }

    /// Untracked: the CPU's tensors are ordinary heap memory, so no budget, no peak, zeros.
    fn memory_stats(&self) -> MemoryStats {
        MemoryStats::default()
    }
}

impl CopyQueue for CpuBackend {
    fn copy_to_device_async(&self, src: &HostBuffer, offset: usize, dst: &mut Tensor) -> Result<()> {
        let op = "copy_to_device_async";
        let range = src.range(offset, dst.size_bytes(), op)?;
        transfer::fill_from_le_bytes(dst.cpu_mut(op)?, &src.as_slice()[range]);
        Ok(())
    }

    fn kv_to_host_async(&self, cache: &Tensor, dst: &mut HostBuffer, span: KvBlockSpan) -> Result<()> {
        let op = "kv_to_host_async";
        let dims = span.check(op, cache.shape(), cache.dtype().size_bytes(), dst.len())?;
        match cache.cpu(op)? {
            CpuStorage::F32(src) => kv_rows_to_host(src, dst.as_mut_slice(), dims, span),
            CpuStorage::BF16(src) => kv_rows_to_host(src, dst.as_mut_slice(), dims, span),
            other => return Err(kv_dtype_err(op, other.dtype())),
        }
        Ok(())
    }

    fn kv_from_host_async(&self, src: &HostBuffer, cache: &mut Tensor, span: KvBlockSpan) -> Result<()> {
        let op = "kv_from_host_async";
        let dims = span.check(op, cache.shape(), cache.dtype().size_bytes(), src.len())?;
        match cache.cpu_mut(op)? {
            CpuStorage::F32(dst) => kv_rows_from_host(src.as_slice(), dst, dims, span),
            CpuStorage::BF16(dst) => kv_rows_from_host(src.as_slice(), dst, dims, span),
            other => return Err(kv_dtype_err(op, other.dtype())),
        }
        Ok(())
    }

    fn copy_marker(&self) -> Result<Marker> {
        Ok(Marker::host())
    }

    fn compute_marker(&self) -> Result<Marker> {
        Ok(Marker::host())
    }

    fn compute_wait(&self, m: &Marker) -> Result<()> {
        host_marker(m, "compute_wait")
    }

    fn copy_wait(&self, m: &Marker) -> Result<()> {
        host_marker(m, "copy_wait")
    }

    fn host_wait(&self, m: &Marker) -> Result<()> {
        host_marker(m, "host_wait")
    }
}

/// Every CPU marker has passed when it is made; a device's marker is an error here.
fn host_marker(m: &Marker, op: &'static str) -> Result<()> {
    if m.backend_name() == "cpu" { Ok(()) } else { Err(foreign_marker(op, "cpu", m)) }
}

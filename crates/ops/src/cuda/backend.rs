//! The CUDA implementation of the [`Backend`] traits: f32 activations, weights in their stored
//! dtype (bf16, f16 or f32), a bf16 KV cache, every op a kernel from `kernels/` (or cuBLAS)
//! checked against its CPU twin. Every allocation goes through the device's VRAM account.
//!
//! Not yet here (they come with the CUDA issue): the tuned GEMV and flash/split-K attention.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use half::bf16;

use super::elementwise::KvGeometry;
use super::transfer::KvDirection;
use super::{
    CudaDevice, CudaStorage, DeviceBuf, attention, deltanet, elementwise, flash, gemv, matmul, moe, moe_grouped,
    rmsnorm, rope, transfer, tree_attention,
};
use crate::backend::Linear;
use crate::backend::{
    AttnParams, Backend, Compute, CopyQueue, DeltaForm, DeltaNetOps, DeltaRule, ExpertAct, FusedOps, HeadSlice,
    KvBlockSpan, Memory, MemoryKind, MemoryStats, MoeOps, Norm, NormKind, RopeTable, RoutedExpert, RouterMode,
    StepGraphs, delta_dims, gated_norm_dims, matmul_add_composed, matmul_swiglu_composed, mxfp4_dims,
    mxfp4_matmul_dims, norm_qkv_composed, norm_swiglu_composed, rope_write_kv_composed, router_dims, rows_dims,
    slice_dims, swiglu_dims, transpose_dims,
};
use crate::error::shape_err;
use crate::{
    AttnGeometry, CpuStorage, DType, HostBuffer, HostTensor, Marker, OpsError, Result, Storage, Tensor, TreeMask,
};
use cudarc::driver::{DevicePtr, DevicePtrMut};

/// Owns the open device; tensors it creates live on that device.
#[derive(Debug)]
pub struct CudaBackend {
    dev: Arc<CudaDevice>,
    /// Whether models may run one-token decode steps as CUDA graphs ([`StepGraphs`]): on
    /// when `OLLM_CUDA_GRAPHS=1` at the backend's making (opt-in until measured on a GPU: written
    /// 2026-12-05 without one); [`set_step_graphs`](Self::set_step_graphs).
    graphs: std::sync::atomic::AtomicBool,
    /// Whether the fused decode kernels of [`FusedOps`] run (`OLLM_CUDA_FUSED=1`); off, each
    /// method runs its composed form. Opt-in until the kernels have run on a GPU (written
    /// 2026-12-05 without one); [`set_fused_ops`](Self::set_fused_ops).
    fused: std::sync::atomic::AtomicBool,
    /// Whether MoE prompts run through the grouped expert kernels (`OLLM_MOE_GROUPED=1`); opt-in
    /// for the same reason; [`set_grouped_experts`](Self::set_grouped_experts).
    grouped: std::sync::atomic::AtomicBool,
}

fn cuda<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CudaStorage> {
    match t.storage() {
        Storage::Cuda(s) => Ok(s),
        other => Err(OpsError::WrongBackend { op, expected: "cuda", found: other.backend_name() }),
    }
}

fn cuda_mut<'a>(t: &'a mut Tensor, op: &'static str) -> Result<&'a mut CudaStorage> {
    match t.storage_mut() {
        Storage::Cuda(s) => Ok(s),
        other => Err(OpsError::WrongBackend { op, expected: "cuda", found: other.backend_name() }),
    }
}

fn f32s<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CudaSlice<f32>> {
    match cuda(t, op)? {
        CudaStorage::F32(s) => Ok(s),
        s => Err(OpsError::DType { op, dtype: s.dtype(), detail: "expected an f32 activation" }),
    }
}

fn f32s_mut<'a>(t: &'a mut Tensor, op: &'static str) -> Result<&'a mut CudaSlice<f32>> {
    match cuda_mut(t, op)? {
        CudaStorage::F32(s) => Ok(s),
        s => Err(OpsError::DType { op, dtype: s.dtype(), detail: "expected an f32 activation" }),
    }
}

const KV_DETAIL: &str = "the CUDA KV cache is bf16; create it with Backend::kv_zeros";

fn kv<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CudaSlice<bf16>> {
    match cuda(t, op)? {
        CudaStorage::BF16(s) => Ok(s),
        s => Err(OpsError::DType { op, dtype: s.dtype(), detail: KV_DETAIL }),
    }
}

fn kv_mut<'a>(t: &'a mut Tensor, op: &'static str) -> Result<&'a mut CudaSlice<bf16>> {
    match cuda_mut(t, op)? {
        CudaStorage::BF16(s) => Ok(s),
        s => Err(OpsError::DType { op, dtype: s.dtype(), detail: KV_DETAIL }),
    }
}

impl CudaBackend {
    pub fn new(dev: CudaDevice) -> Self {
        use std::sync::atomic::AtomicBool;
        Self {
            dev: Arc::new(dev),
            // Measured on an H100, 2026-12-05: fused kernels and decode graphs lift 8B-shaped
            // decode from 65.8% to 82.6% of its bound (on by default); grouped MoE prefill is
            // slower than the per-expert loop on the GPT-OSS shape (off by default).
            graphs: AtomicBool::new(crate::env_switch("OLLM_CUDA_GRAPHS", true)),
            fused: AtomicBool::new(crate::env_switch("OLLM_CUDA_FUSED", true)),
            grouped: AtomicBool::new(crate::env_switch("OLLM_MOE_GROUPED", false)),
        }
    }

    /// Turns the fused decode kernels on or off (the `OLLM_CUDA_FUSED` default; parity tests
    /// turn them on).
    pub fn set_fused_ops(&self, on: bool) {
        self.fused.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn fused_on(&self) -> bool {
        self.fused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turns the grouped MoE kernels on or off (the `OLLM_MOE_GROUPED` default; parity tests
    /// turn them on).
    pub fn set_grouped_experts(&self, on: bool) {
        self.grouped.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Turns decode-step graphs on or off (the `OLLM_CUDA_GRAPHS` default, for tests that run
    /// both ways); off drops the graphs kept.
    pub fn set_step_graphs(&self, on: bool) {
        self.graphs.store(on, std::sync::atomic::Ordering::Relaxed);
        if !on {
            self.dev.clear_step_graphs();
        }
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// An error when a decode step is being captured: `op` takes its positions (or reads the
    /// host) in a way a replay could not change, so the step runs plainly instead (graph.rs).
    fn not_captured(&self, op: &str) -> Result<()> {
        match self.dev.graphs.capturing_step() {
            Some(_) => Err(OpsError::Backend(format!("cuda step graph: {op} cannot be captured"))),
            None => Ok(()),
        }
    }

    fn tensor(&self, shape: Vec<usize>, s: CudaStorage) -> Result<Tensor> {
        Tensor::new(shape, Storage::Cuda(s))
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!("cuda:{} ({})", self.dev.info.ordinal, self.dev.info.name)
    }

    fn step_graphs(&self) -> Option<&dyn StepGraphs> {
        self.graphs.load(std::sync::atomic::Ordering::Relaxed).then_some(self as &dyn StepGraphs)
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

impl Compute for CudaBackend {
    fn embedding(&self, table: &Tensor, ids: &[u32], out: &mut Tensor) -> Result<()> {
        let &[vocab, hidden] = table.shape() else {
            return shape_err("embedding", format!("table {:?}", table.shape()));
        };
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return shape_err("embedding", format!("token id {bad} is outside the vocabulary of {vocab}"));
        }
        if let Some(step) = self.dev.graphs.capturing_step() {
            // A captured decode step reads its ids from the step buffer (graph.rs).
            let out = f32s_mut(out, "embedding")?;
            return elementwise::embedding_step(&self.dev, cuda(table, "embedding")?, step, ids.len(), hidden, out);
        }
        let ids_d = self.dev.upload(ids, "token ids")?;
        elementwise::embedding(&self.dev, cuda(table, "embedding")?, &ids_d, hidden, f32s_mut(out, "embedding")?)
    }

    fn matmul(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, out: &mut Tensor) -> Result<()> {
        let &[n, k] = w.shape() else {
            return shape_err("matmul", format!("weight must be 2-D [out, in], got {:?}", w.shape()));
        };
        if let Some(b) = bias.filter(|b| b.numel() != n) {
            return shape_err("matmul", format!("bias {:?} for {n} outputs", b.shape()));
        }
        let bias = bias.map(|b| cuda(b, "matmul")).transpose()?;
        matmul::matmul(&self.dev, f32s(x, "matmul")?, cuda(w, "matmul")?, n, k, bias, f32s_mut(out, "matmul")?)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32, kind: NormKind, out: &mut Tensor) -> Result<()> {
        let n = w.numel();
        rmsnorm::rms_norm(
            &self.dev,
            f32s(x, "rms_norm")?,
            cuda(w, "rms_norm")?,
            n,
            eps,
            kind,
            f32s_mut(out, "rms_norm")?,
        )
    }

    fn rope(&self, x: &mut Tensor, table: &RopeTable, pos0: usize) -> Result<()> {
        let &[_, heads, d] = x.shape() else {
            return shape_err("rope", format!("x must be [T, heads, d], got {:?}", x.shape()));
        };
        let (cos, sin) = (f32s(&table.cos, "rope")?, f32s(&table.sin, "rope")?);
        rope::rope(&self.dev, f32s_mut(x, "rope")?, heads, d, table.rotary_dims, cos, sin, pos0)
    }

    fn write_kv(&self, cache: &mut Tensor, new: &Tensor, pos0: usize) -> Result<()> {
        let &[n_kv, cap, d] = cache.shape() else {
            return shape_err("write_kv", format!("cache {:?}", cache.shape()));
        };
        elementwise::write_kv(
            &self.dev,
            kv_mut(cache, "write_kv")?,
            f32s(new, "write_kv")?,
            KvGeometry { n_kv, cap, d },
            pos0,
        )
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos0: usize,
        p: &AttnParams<'_>,
        out: &mut Tensor,
    ) -> Result<()> {
        let g = AttnGeometry::of(q, k, v, out, pos0, p.sinks)?;
        let sinks = p.sinks.map(|s| f32s(s, "attention")).transpose()?;
        let (qd, kd, vd) = (f32s(q, "attention")?, kv(k, "attention")?, kv(v, "attention")?);
        let od = f32s_mut(out, "attention")?;
        // Few queries: split over the context; many: flash (tensor cores); other head dims or
        // shapes: the reference kernel.
        let fast = if q.shape()[0] <= flash::DECODE_MAX_T {
            flash::decode_attention(&self.dev, qd, kd, vd, g, p.scale, p.window, sinks, od)?
        } else {
            // Only the split decode kernel reads its positions from a captured step's buffer.
            self.not_captured("prefill attention")?;
            flash::flash_prefill(&self.dev, qd, kd, vd, g, p.scale, p.window, sinks, od)?
        };
        if fast {
            return Ok(());
        }
        self.not_captured("the reference attention kernel")?;
        attention::attention(&self.dev, qd, kd, vd, g, p.scale, p.window, sinks, od)
    }

    fn tree_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pos0: usize,
        tree: &TreeMask,
        p: &AttnParams<'_>,
        out: &mut Tensor,
    ) -> Result<()> {
        self.not_captured("tree attention")?;
        let g = AttnGeometry::of_tree(q, k, v, out, pos0, tree, p.sinks)?;
        let sinks = p.sinks.map(|s| f32s(s, "tree_attention")).transpose()?;
        let (qd, kd, vd) = (f32s(q, "tree_attention")?, kv(k, "tree_attention")?, kv(v, "tree_attention")?);
        let od = f32s_mut(out, "tree_attention")?;
        tree_attention::tree_attention(&self.dev, qd, kd, vd, g, tree, p.scale, p.window, sinks, od)
    }

    /// The prefix's `p` rows and the own rows up to the last query's, joined per head into
    /// one temporary cache `[n_kv, p + pos0 + T, d]` (device-to-device copies), then the usual
    /// kernels at positions `p + pos0..`: the CPU's two-source merge gives the same result. The
    /// copy costs one pass over the keys per call (a kernel reading both caches would not);
    /// the memory it saves is the shared prefix held once, not once per sequence.
    fn attention_prefixed(
        &self,
        q: &Tensor,
        (pk, pv, p): (&Tensor, &Tensor, usize),
        (k, v): (&Tensor, &Tensor),
        pos0: usize,
        params: &AttnParams<'_>,
        out: &mut Tensor,
    ) -> Result<()> {
        self.not_captured("attention over a shared prefix")?;
        let (pg, g) = AttnGeometry::of_prefixed(q, (pk, pv, p), (k, v), out, pos0, params.sinks)?;
        let rows = pos0 + q.shape()[0];
        let cap = p + rows;
        let shape = vec![g.n_kv, cap, g.d];
        let join = |pre: &Tensor, own: &Tensor| -> Result<Tensor> {
            let (a, b) = (kv(pre, "attention_prefixed")?, kv(own, "attention_prefixed")?);
            let what = format!("a joined KV cache {shape:?}");
            let mut dst = self.dev.alloc_zeros::<bf16>(g.n_kv * cap * g.d, &what)?;
            for h in 0..g.n_kv {
                let from = a.slice(h * pg.cap * g.d..(h * pg.cap + p) * g.d);
                let mut to = dst.slice_mut(h * cap * g.d..(h * cap + p) * g.d);
                self.dev.stream.memcpy_dtod(&from, &mut to).map_err(super::driver_err("attention_prefixed"))?;
                let from = b.slice(h * g.cap * g.d..(h * g.cap + rows) * g.d);
                let mut to = dst.slice_mut((h * cap + p) * g.d..(h + 1) * cap * g.d);
                self.dev.stream.memcpy_dtod(&from, &mut to).map_err(super::driver_err("attention_prefixed"))?;
            }
            self.tensor(shape.clone(), CudaStorage::BF16(dst))
        };
        let (jk, jv) = (join(pk, k)?, join(pv, v)?);
        self.attention(q, &jk, &jv, p + pos0, params, out)
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()> {
        elementwise::silu_mul(&self.dev, f32s(gate, "silu_mul")?, f32s(up, "silu_mul")?, f32s_mut(out, "silu_mul")?)
    }

    fn add_assign(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        elementwise::add_assign(&self.dev, f32s_mut(x, "add_assign")?, f32s(y, "add_assign")?)
    }

    fn transpose(&self, src: &Tensor, out: &mut Tensor) -> Result<()> {
        let (a, b) = transpose_dims(src, out)?;
        moe::transpose(&self.dev, cuda(src, "transpose")?, cuda_mut(out, "transpose")?, a, b)
    }

    fn slice_heads(&self, src: &Tensor, s: HeadSlice, out: &mut Tensor) -> Result<()> {
        let (t, cols) = slice_dims(src, &s, out)?;
        let op = "slice_heads";
        deltanet::slice_heads(&self.dev, f32s(src, op)?, s, t, cols, f32s_mut(out, op)?)
    }

    fn sigmoid_mul(&self, x: &mut Tensor, gate: &Tensor) -> Result<()> {
        let per = x.numel().checked_div(gate.numel()).unwrap_or(0);
        let d = x.shape().last().copied().unwrap_or(0);
        if per != 1 && per != d {
            return shape_err("sigmoid_mul", format!("x {:?}, gate {:?}", x.shape(), gate.shape()));
        }
        deltanet::sigmoid_mul(&self.dev, f32s_mut(x, "sigmoid_mul")?, f32s(gate, "sigmoid_mul")?, per)
    }

    fn copy_rows(&self, src: &Tensor, rows: Range<usize>, out: &mut Tensor) -> Result<()> {
        let n = src.shape().last().copied().unwrap_or(1);
        let t = src.numel() / n.max(1);
        if rows.end > t || out.numel() != rows.len() * n {
            return shape_err("copy_rows", format!("rows {rows:?} of {:?} into {:?}", src.shape(), out.shape()));
        }
        let s = f32s(src, "copy_rows")?;
        let view = s.slice(rows.start * n..rows.end * n);
        self.dev.stream.memcpy_dtod(&view, f32s_mut(out, "copy_rows")?).map_err(super::driver_err("copy_rows"))
    }

    fn write_rows(&self, src: &Tensor, dst: &mut Tensor, row0: usize) -> Result<()> {
        let n = dst.shape().last().copied().unwrap_or(1);
        let (r, t) = (src.numel() / n.max(1), dst.numel() / n.max(1));
        if src.shape().last() != Some(&n) || row0 + r > t {
            return shape_err("write_rows", format!("{:?} at row {row0} of {:?}", src.shape(), dst.shape()));
        }
        let s = f32s(src, "write_rows")?;
        let d = f32s_mut(dst, "write_rows")?;
        let mut view = d.slice_mut(row0 * n..(row0 + r) * n);
        self.dev.stream.memcpy_dtod(s, &mut view).map_err(super::driver_err("write_rows"))
    }

    fn gelu_tanh_mul(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()> {
        if gate.shape() != up.shape() || out.shape() != gate.shape() {
            return shape_err(
                "gelu_tanh_mul",
                format!("gate {:?}, up {:?}, out {:?}", gate.shape(), up.shape(), out.shape()),
            );
        }
        let op = "gelu_tanh_mul";
        elementwise::gelu_tanh_mul(&self.dev, f32s(gate, op)?, f32s(up, op)?, f32s_mut(out, op)?)
    }

    fn scale(&self, x: &mut Tensor, s: f32) -> Result<()> {
        elementwise::scale(&self.dev, f32s_mut(x, "scale")?, s)
    }

    fn softcap(&self, x: &mut Tensor, cap: f32) -> Result<()> {
        if !(cap > 0.0 && cap.is_finite()) {
            return shape_err("softcap", format!("cap {cap} must be a positive finite number"));
        }
        elementwise::softcap(&self.dev, f32s_mut(x, "softcap")?, cap)
    }
}

/// One-launch forms for decode-shaped calls (a few rows, 16-bit weights, no bias: the GEMV's
/// shapes); everything else runs composed.
impl FusedOps for CudaBackend {
    fn matmul_add(
        &self,
        x: &Tensor,
        (w, bias): (&Tensor, Option<&Tensor>),
        tmp: &mut Tensor,
        acc: &mut Tensor,
    ) -> Result<()> {
        let op = "matmul_add";
        if !self.fused_on() {
            return matmul_add_composed(self, x, (w, bias), tmp, acc);
        }
        let (&[n, k], None) = (w.shape(), bias) else {
            return matmul_add_composed(self, x, (w, bias), tmp, acc);
        };
        let t = x.numel() / k.max(1);
        if !gemv::covers(t, k) || acc.numel() != t * n {
            return matmul_add_composed(self, x, (w, bias), tmp, acc);
        }
        match cuda(w, op)? {
            CudaStorage::BF16(w) => gemv::gemv_add(&self.dev, f32s(x, op)?, w, n, k, f32s_mut(acc, op)?),
            CudaStorage::F16(w) => gemv::gemv_add(&self.dev, f32s(x, op)?, w, n, k, f32s_mut(acc, op)?),
            _ => matmul_add_composed(self, x, (w, bias), tmp, acc),
        }
    }

    fn matmul_swiglu(
        &self,
        x: &Tensor,
        ((gate, gb), (up, ub)): (Linear<'_>, Linear<'_>),
        scratch: (&mut Tensor, &mut Tensor),
        out: &mut Tensor,
    ) -> Result<()> {
        let op = "matmul_swiglu";
        let weights = ((gate, gb), (up, ub));
        if !self.fused_on() {
            return matmul_swiglu_composed(self, x, weights, scratch, out);
        }
        let (&[n, k], None, None) = (gate.shape(), gb, ub) else {
            return matmul_swiglu_composed(self, x, weights, scratch, out);
        };
        let t = x.numel() / k.max(1);
        if !gemv::covers(t, k) || up.shape() != gate.shape() || out.numel() != t * n {
            return matmul_swiglu_composed(self, x, weights, scratch, out);
        }
        match (cuda(gate, op)?, cuda(up, op)?) {
            (CudaStorage::BF16(g), CudaStorage::BF16(u)) => {
                gemv::gemv_swiglu(&self.dev, f32s(x, op)?, (g, u), n, k, f32s_mut(out, op)?)
            }
            (CudaStorage::F16(g), CudaStorage::F16(u)) => {
                gemv::gemv_swiglu(&self.dev, f32s(x, op)?, (g, u), n, k, f32s_mut(out, op)?)
            }
            _ => matmul_swiglu_composed(self, x, weights, scratch, out),
        }
    }

    fn norm_matmul_qkv(
        &self,
        x: &Tensor,
        (nw, eps, kind): Norm<'_>,
        weights: [Linear<'_>; 3],
        normed: &mut Tensor,
        [qo, ko, vo]: [&mut Tensor; 3],
    ) -> Result<()> {
        let op = "norm_matmul_qkv";
        if !self.fused_on() {
            return norm_qkv_composed(self, x, (nw, eps, kind), weights, normed, [qo, ko, vo]);
        }
        let [(wq, None), (wk, None), (wv, None)] = weights else {
            return norm_qkv_composed(self, x, (nw, eps, kind), weights, normed, [qo, ko, vo]);
        };
        let (&[nq, k], &[nk, k2], &[nv, k3]) = (wq.shape(), wk.shape(), wv.shape()) else {
            return norm_qkv_composed(self, x, (nw, eps, kind), weights, normed, [qo, ko, vo]);
        };
        let t = x.numel() / k.max(1);
        let shapes_fit = k2 == k
            && k3 == k
            && gemv::covers(t, k)
            && x.numel() == t * k
            && nw.numel() == k
            && qo.numel() == t * nq
            && ko.numel() == t * nk
            && vo.numel() == t * nv;
        let nws = cuda(nw, op)?;
        if !shapes_fit || matches!(nws, CudaStorage::U8(_)) {
            return norm_qkv_composed(self, x, (nw, eps, kind), weights, normed, [qo, ko, vo]);
        }
        let offset = if kind == NormKind::ZeroCentered { 1.0f32 } else { 0.0 };
        let norm = (nws, eps, offset);
        let xd = f32s(x, op)?;
        match (cuda(wq, op)?, cuda(wk, op)?, cuda(wv, op)?) {
            (CudaStorage::BF16(a), CudaStorage::BF16(b), CudaStorage::BF16(c)) => {
                let outs =
                    [(&**a, nq, f32s_mut(qo, op)?), (&**b, nk, f32s_mut(ko, op)?), (&**c, nv, f32s_mut(vo, op)?)];
                gemv::gemv_norm_qkv(&self.dev, xd, norm, k, outs)
            }
            (CudaStorage::F16(a), CudaStorage::F16(b), CudaStorage::F16(c)) => {
                let outs =
                    [(&**a, nq, f32s_mut(qo, op)?), (&**b, nk, f32s_mut(ko, op)?), (&**c, nv, f32s_mut(vo, op)?)];
                gemv::gemv_norm_qkv(&self.dev, xd, norm, k, outs)
            }
            _ => norm_qkv_composed(self, x, (nw, eps, kind), weights, normed, [qo, ko, vo]),
        }
    }

    fn norm_matmul_swiglu(
        &self,
        x: &Tensor,
        (nw, eps, kind): Norm<'_>,
        ((gate, gb), (up, ub)): (Linear<'_>, Linear<'_>),
        scratch: (&mut Tensor, &mut Tensor, &mut Tensor),
        out: &mut Tensor,
    ) -> Result<()> {
        let op = "norm_matmul_swiglu";
        let weights = ((gate, gb), (up, ub));
        if !self.fused_on() {
            return norm_swiglu_composed(self, x, (nw, eps, kind), weights, scratch, out);
        }
        let (&[n, k], None, None) = (gate.shape(), gb, ub) else {
            return norm_swiglu_composed(self, x, (nw, eps, kind), weights, scratch, out);
        };
        let t = x.numel() / k.max(1);
        let nws = cuda(nw, op)?;
        if !gemv::covers(t, k)
            || x.numel() != t * k
            || nw.numel() != k
            || up.shape() != gate.shape()
            || out.numel() != t * n
            || matches!(nws, CudaStorage::U8(_))
        {
            return norm_swiglu_composed(self, x, (nw, eps, kind), weights, scratch, out);
        }
        let norm = (nws, eps, if kind == NormKind::ZeroCentered { 1.0f32 } else { 0.0 });
        match (cuda(gate, op)?, cuda(up, op)?) {
            (CudaStorage::BF16(g), CudaStorage::BF16(u)) => {
                gemv::gemv_norm_swiglu(&self.dev, f32s(x, op)?, norm, (g, u), (n, k), f32s_mut(out, op)?)
            }
            (CudaStorage::F16(g), CudaStorage::F16(u)) => {
                gemv::gemv_norm_swiglu(&self.dev, f32s(x, op)?, norm, (g, u), (n, k), f32s_mut(out, op)?)
            }
            _ => norm_swiglu_composed(self, x, (nw, eps, kind), weights, scratch, out),
        }
    }

    fn rope_write_kv(
        &self,
        (q, k, v): (&mut Tensor, &mut Tensor, &Tensor),
        (table, pos0): (&RopeTable, usize),
        (kc, vc): (&mut Tensor, &mut Tensor),
        row0: usize,
    ) -> Result<()> {
        let op = "rope_write_kv";
        if !self.fused_on() {
            return rope_write_kv_composed(self, (q, k, v), (table, pos0), (kc, vc), row0);
        }
        let (&[t, nh, d], &[tk, nkv, dk], &[nkv_c, cap, dc]) = (q.shape(), k.shape(), kc.shape()) else {
            return rope_write_kv_composed(self, (q, k, v), (table, pos0), (kc, vc), row0);
        };
        if tk != t || dk != d || nkv_c != nkv || dc != d || v.shape() != k.shape() || vc.shape() != kc.shape() {
            return rope_write_kv_composed(self, (q, k, v), (table, pos0), (kc, vc), row0);
        }
        let (cos, sin) = (f32s(&table.cos, op)?, f32s(&table.sin, op)?);
        let bufs = rope::RopeKv {
            q: f32s_mut(q, op)?,
            k: f32s_mut(k, op)?,
            v: f32s(v, op)?,
            k_cache: kv_mut(kc, op)?,
            v_cache: kv_mut(vc, op)?,
        };
        rope::rope_write_kv(&self.dev, bufs, (nh, nkv, d, table.rotary_dims, cap), (cos, sin), (pos0, row0))
    }
}

impl StepGraphs for CudaBackend {
    fn buffer_addr(&self, t: &Tensor) -> Option<u64> {
        let Storage::Cuda(s) = t.storage() else { return None };
        let st = &self.dev.stream;
        Some(match s {
            CudaStorage::F32(b) => b.device_ptr(st).0,
            CudaStorage::F16(b) => b.device_ptr(st).0,
            CudaStorage::BF16(b) => b.device_ptr(st).0,
            CudaStorage::U8(b) => b.device_ptr(st).0,
        })
    }

    fn replay_step(&self, key: u64, ids: &[u32], pos: usize) -> Result<Option<Vec<f32>>> {
        self.dev.replay_step(key, ids, pos)
    }

    fn begin_step_capture(&self, key: u64, ids: &[u32], pos: usize) -> Result<()> {
        self.dev.begin_step_capture(key, ids, pos)
    }

    fn end_step_capture(&self) -> bool {
        self.dev.end_step_capture()
    }
}

impl MoeOps for CudaBackend {
    fn router_topk(&self, logits: &Tensor, k: usize, mode: RouterMode) -> Result<(Vec<u32>, Vec<f32>)> {
        self.not_captured("router top-k (read back to the host)")?;
        let (t, e) = router_dims(logits, k)?;
        if t == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let logits = f32s(logits, "router_topk")?;
        let n = t * k;
        let run = |buf: &mut DeviceBuf<f32>| -> Result<(Vec<u32>, Vec<f32>)> {
            moe::router_topk(&self.dev, logits, e, k, mode, buf)?;
            // A D2H copy into pageable memory returns once the data has arrived.
            let host = self.dev.stream.clone_dtoh(&buf.slice(..2 * n)).map_err(super::driver_err("router_topk"))?;
            moe::unpack_router_output(&host, n)
        };
        // SAFETY: the kernel writes all 2·n elements (weights, then ids) before the copy reads them.
        unsafe { self.dev.with_scratch32(2 * n, "router top-k output", run) }
    }

    fn gather_rows(&self, src: &Tensor, rows: &[u32], out: &mut Tensor) -> Result<()> {
        let (_, n) = rows_dims("gather_rows", src, out, rows, None)?;
        if rows.is_empty() {
            return Ok(());
        }
        let rows_d = self.dev.upload(rows, "gather rows")?;
        moe::gather_rows(&self.dev, f32s(src, "gather_rows")?, &rows_d, n, f32s_mut(out, "gather_rows")?)
    }

    fn scatter_add_rows(&self, src: &Tensor, rows: &[u32], weights: &[f32], dst: &mut Tensor) -> Result<()> {
        let (_, n) = rows_dims("scatter_add_rows", dst, src, rows, Some(weights))?;
        if rows.is_empty() {
            return Ok(());
        }
        let rows_d = self.dev.upload(rows, "scatter rows")?;
        let w_d = self.dev.upload(weights, "scatter weights")?;
        let op = "scatter_add_rows";
        moe::scatter_add_rows(&self.dev, f32s(src, op)?, &rows_d, &w_d, n, f32s_mut(dst, op)?)
    }

    fn clamped_swiglu(&self, gate_up: &Tensor, limit: f32, alpha: f32, out: &mut Tensor) -> Result<()> {
        let inter = swiglu_dims(gate_up, out)?;
        let op = "clamped_swiglu";
        moe::clamped_swiglu(&self.dev, f32s(gate_up, op)?, inter, limit, alpha, f32s_mut(out, op)?)
    }

    fn dequant_mxfp4(&self, blocks: &Tensor, scales: &Tensor, out: &mut Tensor) -> Result<()> {
        mxfp4_dims(blocks, scales, out)?;
        let op = "dequant_mxfp4";
        let (CudaStorage::U8(b), CudaStorage::U8(s)) = (cuda(blocks, op)?, cuda(scales, op)?) else {
            return Err(OpsError::DType { op, dtype: blocks.dtype(), detail: "blocks and scales are U8" });
        };
        let CudaStorage::BF16(o) = cuda_mut(out, op)? else {
            return Err(OpsError::DType { op, dtype: DType::F32, detail: "out is BF16" });
        };
        moe::dequant_mxfp4(&self.dev, b, s, o)
    }

    fn matmul_mxfp4(
        &self,
        x: &Tensor,
        blocks: &Tensor,
        scales: &Tensor,
        bias: Option<&Tensor>,
        out: &mut Tensor,
    ) -> Result<()> {
        let (t, n, k) = mxfp4_matmul_dims(x, blocks, scales, bias, out)?;
        let op = "matmul_mxfp4";
        if t > moe::GEMV_MXFP4_MAX_T {
            // Many rows: compute-bound, so unpack once and take the GEMM path.
            let mut w = self.alloc(vec![n, k], DType::BF16)?;
            self.dequant_mxfp4(blocks, scales, &mut w)?;
            return self.matmul(x, &w, bias, out);
        }
        let (CudaStorage::U8(b), CudaStorage::U8(s)) = (cuda(blocks, op)?, cuda(scales, op)?) else {
            return Err(OpsError::DType { op, dtype: blocks.dtype(), detail: "blocks and scales are U8" });
        };
        let y = f32s_mut(out, op)?;
        moe::gemv_mxfp4(&self.dev, f32s(x, op)?, b, s, n, y)?;
        match bias {
            Some(bias) => elementwise::add_bias(&self.dev, y, cuda(bias, op)?, n),
            None => Ok(()),
        }
    }

    fn grouped_experts(
        &self,
        x: &Tensor,
        experts: &[RoutedExpert<'_>],
        act: ExpertAct,
        acc: &mut Tensor,
    ) -> Result<bool> {
        let op = "grouped_experts";
        let h = x.shape().last().copied().unwrap_or(0);
        if acc.shape() != x.shape() {
            return shape_err(op, format!("x {:?}, acc {:?}", x.shape(), acc.shape()));
        }
        moe_grouped::grouped_experts(&self.dev, f32s(x, op)?, h, experts, act, f32s_mut(acc, op)?)
    }

    fn has_grouped_experts(&self) -> bool {
        self.grouped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl DeltaNetOps for CudaBackend {
    fn l2_norm(&self, x: &mut Tensor, eps: f32, scale: f32) -> Result<()> {
        let d = x.shape().last().copied().unwrap_or(0);
        deltanet::l2_norm(&self.dev, f32s_mut(x, "l2_norm")?, d, eps, scale)
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
        let op = "deltanet_gates";
        let (a_log, dt_bias) = (f32s(a_log, op)?, f32s(dt_bias, op)?);
        deltanet::gates(
            &self.dev,
            (f32s(a, op)?, f32s(b, op)?),
            (a_log, dt_bias),
            f32s_mut(g, op)?,
            f32s_mut(beta, op)?,
        )
    }

    fn causal_conv1d(&self, x: &Tensor, w: &Tensor, state: &mut Tensor, out: &mut Tensor) -> Result<()> {
        let op = "causal_conv1d";
        let ch = w.shape().first().copied().unwrap_or(0);
        let k = w.numel().checked_div(ch).unwrap_or(0);
        deltanet::causal_conv1d(&self.dev, f32s(x, op)?, f32s(w, op)?, k, f32s_mut(state, op)?, f32s_mut(out, op)?)
    }

    fn delta_rule(&self, x: DeltaRule<'_>, state: &mut Tensor, out: &mut Tensor, form: DeltaForm) -> Result<()> {
        let dims = delta_dims(&x, state, out)?;
        let op = "delta_rule";
        let slices = deltanet::DeltaSlices {
            q: f32s(x.q, op)?,
            k: f32s(x.k, op)?,
            v: f32s(x.v, op)?,
            g: f32s(x.g, op)?,
            beta: f32s(x.beta, op)?,
        };
        deltanet::delta_rule(&self.dev, slices, dims, f32s_mut(state, op)?, f32s_mut(out, op)?, form)
    }

    fn gated_rms_norm(&self, x: &Tensor, z: &Tensor, w: &Tensor, eps: f32, out: &mut Tensor) -> Result<()> {
        let n = gated_norm_dims(x, z, w, out)?;
        let op = "gated_rms_norm";
        rmsnorm::gated_rms_norm(&self.dev, f32s(x, op)?, f32s(z, op)?, cuda(w, op)?, n, eps, f32s_mut(out, op)?)
    }
}

impl Memory for CudaBackend {
    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        let what = "an uploaded tensor";
        let s = match host.to_cpu_storage()? {
            CpuStorage::F32(v) => CudaStorage::F32(self.dev.upload(&v, what)?),
            CpuStorage::F16(v) => CudaStorage::F16(self.dev.upload(&v, what)?),
            CpuStorage::BF16(v) => CudaStorage::BF16(self.dev.upload(&v, what)?),
            CpuStorage::U8(v) => CudaStorage::U8(self.dev.upload(&v, what)?),
        };
        self.tensor(host.shape.clone(), s)
    }

    fn upload_f32(&self, shape: Vec<usize>, data: &[f32]) -> Result<Tensor> {
        let s = self.dev.upload(data, "an uploaded f32 tensor")?;
        self.tensor(shape, CudaStorage::F32(s))
    }

    fn zeros(&self, shape: Vec<usize>) -> Result<Tensor> {
        let n = shape.iter().product::<usize>();
        if n == 0 {
            return shape_err("zeros", format!("empty shape {shape:?}"));
        }
        let s = self.dev.alloc_zeros::<f32>(n, &format!("activations {shape:?}"))?;
        self.tensor(shape, CudaStorage::F32(s))
    }

    fn kv_zeros(&self, shape: Vec<usize>) -> Result<Tensor> {
        let n = shape.iter().product::<usize>();
        if n == 0 {
            return shape_err("kv_zeros", format!("empty shape {shape:?}"));
        }
        let s = self.dev.alloc_zeros::<bf16>(n, &format!("a KV cache {shape:?}"))?;
        self.tensor(shape, CudaStorage::BF16(s))
    }

    fn kv_dtype(&self) -> DType {
        DType::BF16
    }

    fn alloc(&self, shape: Vec<usize>, dtype: DType) -> Result<Tensor> {
        let n = shape.iter().product::<usize>();
        let what = format!("weights {shape:?} {dtype}");
        let s = match dtype {
            DType::F32 => CudaStorage::F32(self.dev.alloc_zeros(n, &what)?),
            DType::F16 => CudaStorage::F16(self.dev.alloc_zeros(n, &what)?),
            DType::BF16 => CudaStorage::BF16(self.dev.alloc_zeros(n, &what)?),
            DType::U8 => CudaStorage::U8(self.dev.alloc_zeros(n, &what)?),
        };
        self.tensor(shape, s)
    }

    fn to_host_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        let st = &self.dev.stream;
        let err = super::driver_err("to_host_f32");
        if self.dev.graphs.capturing_step().is_some() {
            // A captured decode step ends at its read-back (graph.rs): the graph runs once here.
            let CudaStorage::F32(s) = cuda(t, "to_host_f32")? else {
                return Err(OpsError::Backend("cuda step graph: a captured step reads back f32 only".into()));
            };
            self.dev.finish_step_capture((s.device_ptr(st).0, s.len()))?;
        }
        Ok(match cuda(t, "to_host_f32")? {
            CudaStorage::F32(s) => st.clone_dtoh(&**s).map_err(err)?,
            CudaStorage::F16(s) => st.clone_dtoh(&**s).map_err(err)?.iter().map(|v| v.to_f32()).collect(),
            CudaStorage::BF16(s) => st.clone_dtoh(&**s).map_err(err)?.iter().map(|v| v.to_f32()).collect(),
            CudaStorage::U8(s) => st.clone_dtoh(&**s).map_err(err)?.iter().map(|&v| f32::from(v)).collect(),
        })
    }

    fn grow_kv(&self, cache: &Tensor, keep: std::ops::Range<usize>, new_cap: usize) -> Result<Tensor> {
        self.not_captured("growing a KV cache")?;
        let &[n_kv, cap, d] = cache.shape() else {
            return shape_err("grow_kv", format!("cache {:?}", cache.shape()));
        };
        let len = keep.len();
        if keep.end > cap || len > new_cap {
            return shape_err("grow_kv", format!("keep positions {keep:?} of {cap} in {new_cap}"));
        }
        let src = kv(cache, "grow_kv")?;
        let shape = vec![n_kv, new_cap, d];
        let mut dst = self.dev.alloc_zeros::<bf16>(n_kv * new_cap * d, &format!("a KV cache {shape:?}"))?;
        for h in 0..n_kv {
            let from = src.slice((h * cap + keep.start) * d..(h * cap + keep.end) * d);
            let mut to = dst.slice_mut(h * new_cap * d..(h * new_cap + len) * d);
            self.dev.stream.memcpy_dtod(&from, &mut to).map_err(super::driver_err("grow_kv"))?;
        }
        self.tensor(shape, CudaStorage::BF16(dst))
    }

    fn host_alloc(&self, bytes: usize) -> Result<HostBuffer> {
        transfer::alloc_pinned(&self.dev, bytes)
    }

    fn memory_kind(&self) -> MemoryKind {
        MemoryKind::Device
    }

    fn memory_stats(&self) -> MemoryStats {
        let (v, b) = (self.dev.vram(), |x: usize| x as u64);
        MemoryStats {
            budget_bytes: Some(b(v.budget_bytes())),
            total_bytes: Some(b(v.total_bytes())),
            overhead_bytes: b(v.context_bytes()),
            in_use_bytes: b(v.used_bytes()),
            peak_bytes: Some(b(v.peak_used_bytes())),
            pinned_bytes: b(self.dev.pinned_bytes()),
            peak_pinned_bytes: b(self.dev.peak_pinned_bytes()),
        }
    }
}

impl CopyQueue for CudaBackend {
    fn copy_to_device_async(&self, src: &HostBuffer, offset: usize, dst: &mut Tensor) -> Result<()> {
        transfer::copy_to_device(&self.dev, src, offset, cuda_mut(dst, "copy_to_device_async")?)
    }

    fn kv_to_host_async(&self, cache: &Tensor, dst: &mut HostBuffer, span: KvBlockSpan) -> Result<()> {
        let op = "kv_to_host_async";
        let g = span.check(op, cache.shape(), 2, dst.len())?;
        let ptr = kv(cache, op)?.device_ptr(&self.dev.copy_stream).0;
        // SAFETY: span checked against both; the cache and the host buffer outlive the copy by
        // the streaming contract (a pinned buffer's drop waits for the copy stream).
        unsafe {
            transfer::queue_kv_copy(&self.dev, ptr, dst.as_mut_slice().as_mut_ptr(), g, span, KvDirection::ToHost)
        }
    }

    fn kv_from_host_async(&self, src: &HostBuffer, cache: &mut Tensor, span: KvBlockSpan) -> Result<()> {
        let op = "kv_from_host_async";
        let g = span.check(op, cache.shape(), 2, src.len())?;
        let ptr = kv_mut(cache, op)?.device_ptr_mut(&self.dev.copy_stream).0;
        // SAFETY: as in kv_to_host_async; the host bytes are only read.
        unsafe {
            transfer::queue_kv_copy(&self.dev, ptr, src.as_slice().as_ptr().cast_mut(), g, span, KvDirection::FromHost)
        }
    }

    fn copy_marker(&self) -> Result<Marker> {
        transfer::marker(&self.dev.copy_stream, "copy_marker")
    }

    fn compute_marker(&self) -> Result<Marker> {
        transfer::marker(&self.dev.stream, "compute_marker")
    }

    fn compute_wait(&self, m: &Marker) -> Result<()> {
        let op = "compute_wait";
        self.dev.stream.wait(transfer::event(m, op)?).map_err(super::driver_err(op))
    }

    fn copy_wait(&self, m: &Marker) -> Result<()> {
        let op = "copy_wait";
        self.dev.copy_stream.wait(transfer::event(m, op)?).map_err(super::driver_err(op))
    }

    fn host_wait(&self, m: &Marker) -> Result<()> {
        let op = "host_wait";
        transfer::event(m, op)?.synchronize().map_err(super::driver_err(op))
    }
}

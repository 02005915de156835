//! The CUDA implementation of the [`Backend`] trait: f32 activations, weights in their stored
//! dtype (bf16 kernels so far), every op a kernel from `kernels/` checked against its CPU twin.
//!
//! Not yet here (they come with the CUDA issue): biases and f16/f32 weights in matmul, the tuned
//! GEMV, cuBLAS for prefill, flash/split-K attention, and the VRAM budget allocator.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use half::{bf16, f16};

use super::elementwise::KvGeometry;
use super::{CudaDevice, attention, elementwise, matmul, rmsnorm, rope};
use crate::backend::{AttnParams, Backend, NormKind, RopeTable};
use crate::error::shape_err;
use crate::{AttnGeometry, CpuStorage, DType, HostTensor, OpsError, Result, Storage, Tensor};

/// Elements of a device tensor.
#[derive(Debug)]
pub enum CudaStorage {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
}

impl CudaStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CudaStorage::F32(_) => DType::F32,
            CudaStorage::F16(_) => DType::F16,
            CudaStorage::BF16(_) => DType::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CudaStorage::F32(s) => s.len(),
            CudaStorage::F16(s) => s.len(),
            CudaStorage::BF16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Owns the open device; tensors it creates live on that device.
#[derive(Debug)]
pub struct CudaBackend {
    dev: Arc<CudaDevice>,
}

fn drv(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> OpsError {
    super::driver_err(op)
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

fn bf16s<'a>(t: &'a Tensor, op: &'static str) -> Result<&'a CudaSlice<bf16>> {
    match cuda(t, op)? {
        CudaStorage::BF16(s) => Ok(s),
        s => Err(OpsError::DType { op, dtype: s.dtype(), detail: "the CUDA backend takes bf16 weights so far" }),
    }
}

impl CudaBackend {
    pub fn new(dev: CudaDevice) -> Self {
        Self { dev: Arc::new(dev) }
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    fn tensor(&self, shape: Vec<usize>, s: CudaStorage) -> Result<Tensor> {
        Tensor::new(shape, Storage::Cuda(s))
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!("cuda:{} ({})", self.dev.info.ordinal, self.dev.info.name)
    }

    fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        let st = &self.dev.stream;
        let s = match host.to_cpu_storage()? {
            CpuStorage::F32(v) => CudaStorage::F32(st.clone_htod(&v).map_err(drv("upload"))?),
            CpuStorage::F16(v) => CudaStorage::F16(st.clone_htod(&v).map_err(drv("upload"))?),
            CpuStorage::BF16(v) => CudaStorage::BF16(st.clone_htod(&v).map_err(drv("upload"))?),
        };
        self.tensor(host.shape.clone(), s)
    }

    fn upload_f32(&self, shape: Vec<usize>, data: &[f32]) -> Result<Tensor> {
        let s = self.dev.stream.clone_htod(data).map_err(drv("upload_f32"))?;
        self.tensor(shape, CudaStorage::F32(s))
    }

    fn zeros(&self, shape: Vec<usize>) -> Result<Tensor> {
        let n = shape.iter().product::<usize>();
        if n == 0 {
            return shape_err("zeros", format!("empty shape {shape:?}"));
        }
        let s = self.dev.stream.alloc_zeros::<f32>(n).map_err(drv("zeros"))?;
        self.tensor(shape, CudaStorage::F32(s))
    }

    fn to_host_f32(&self, t: &Tensor) -> Result<Vec<f32>> {
        let st = &self.dev.stream;
        Ok(match cuda(t, "to_host_f32")? {
            CudaStorage::F32(s) => st.clone_dtoh(s).map_err(drv("to_host_f32"))?,
            CudaStorage::F16(s) => st.clone_dtoh(s).map_err(drv("to_host_f32"))?.iter().map(|v| v.to_f32()).collect(),
            CudaStorage::BF16(s) => st.clone_dtoh(s).map_err(drv("to_host_f32"))?.iter().map(|v| v.to_f32()).collect(),
        })
    }

    fn embedding(&self, table: &Tensor, ids: &[u32], out: &mut Tensor) -> Result<()> {
        let &[vocab, hidden] = table.shape() else {
            return shape_err("embedding", format!("table {:?}", table.shape()));
        };
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return shape_err("embedding", format!("token id {bad} is outside the vocabulary of {vocab}"));
        }
        let ids_d = self.dev.stream.clone_htod(ids).map_err(drv("embedding"))?;
        elementwise::embedding(&self.dev, bf16s(table, "embedding")?, &ids_d, hidden, f32s_mut(out, "embedding")?)
    }

    fn matmul(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, out: &mut Tensor) -> Result<()> {
        let &[n, k] = w.shape() else {
            return shape_err("matmul", format!("weight must be 2-D [out, in], got {:?}", w.shape()));
        };
        if bias.is_some() {
            return Err(OpsError::Backend("cuda matmul: biases are not supported yet; use --device cpu".into()));
        }
        matmul::matmul(&self.dev, f32s(x, "matmul")?, bf16s(w, "matmul")?, n, k, f32s_mut(out, "matmul")?)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32, kind: NormKind, out: &mut Tensor) -> Result<()> {
        let n = w.numel();
        rmsnorm::rms_norm(
            &self.dev,
            f32s(x, "rms_norm")?,
            bf16s(w, "rms_norm")?,
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
            f32s_mut(cache, "write_kv")?,
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
        let (qd, kd, vd) = (f32s(q, "attention")?, f32s(k, "attention")?, f32s(v, "attention")?);
        attention::attention(&self.dev, qd, kd, vd, g, p.scale, p.window, sinks, f32s_mut(out, "attention")?)
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor, out: &mut Tensor) -> Result<()> {
        elementwise::silu_mul(&self.dev, f32s(gate, "silu_mul")?, f32s(up, "silu_mul")?, f32s_mut(out, "silu_mul")?)
    }

    fn add_assign(&self, x: &mut Tensor, y: &Tensor) -> Result<()> {
        elementwise::add_assign(&self.dev, f32s_mut(x, "add_assign")?, f32s(y, "add_assign")?)
    }

    fn copy_rows(&self, src: &Tensor, rows: Range<usize>, out: &mut Tensor) -> Result<()> {
        let n = src.shape().last().copied().unwrap_or(1);
        let t = src.numel() / n.max(1);
        if rows.end > t || out.numel() != rows.len() * n {
            return shape_err("copy_rows", format!("rows {rows:?} of {:?} into {:?}", src.shape(), out.shape()));
        }
        let s = f32s(src, "copy_rows")?;
        let view = s.slice(rows.start * n..rows.end * n);
        self.dev.stream.memcpy_dtod(&view, f32s_mut(out, "copy_rows")?).map_err(drv("copy_rows"))
    }

    fn measure_bandwidth(&self, bytes: usize) -> Result<f64> {
        let n = (bytes / 8).max(1 << 20);
        let st = &self.dev.stream;
        let src = st.alloc_zeros::<f32>(n).map_err(drv("measure_bandwidth"))?;
        let mut dst = st.alloc_zeros::<f32>(n).map_err(drv("measure_bandwidth"))?;
        let mut best = 0.0f64;
        // One warm-up copy, then five timed ones; each moves n floats in and n out.
        for i in 0..6 {
            st.synchronize().map_err(drv("measure_bandwidth"))?;
            let t = std::time::Instant::now();
            st.memcpy_dtod(&src, &mut dst).map_err(drv("measure_bandwidth"))?;
            st.synchronize().map_err(drv("measure_bandwidth"))?;
            if i > 0 {
                best = best.max((2 * n * 4) as f64 / t.elapsed().as_secs_f64());
            }
        }
        Ok(best)
    }

    fn grow_kv(&self, cache: &Tensor, len: usize, new_cap: usize) -> Result<Tensor> {
        let &[n_kv, cap, d] = cache.shape() else {
            return shape_err("grow_kv", format!("cache {:?}", cache.shape()));
        };
        if len > cap || len > new_cap {
            return shape_err("grow_kv", format!("keep {len} of {cap} positions in {new_cap}"));
        }
        let src = f32s(cache, "grow_kv")?;
        let mut dst = self.dev.stream.alloc_zeros::<f32>(n_kv * new_cap * d).map_err(drv("grow_kv"))?;
        for h in 0..n_kv {
            let from = src.slice(h * cap * d..(h * cap + len) * d);
            let mut to = dst.slice_mut(h * new_cap * d..(h * new_cap + len) * d);
            self.dev.stream.memcpy_dtod(&from, &mut to).map_err(drv("grow_kv"))?;
        }
        self.tensor(vec![n_kv, new_cap, d], CudaStorage::F32(dst))
    }
}

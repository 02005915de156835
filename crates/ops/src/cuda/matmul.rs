//! `out = x · wᵀ (+ bias)`: the small-T kernel of `kernels/matmul.cu` for decode-sized inputs,
//! cuBLAS for prefill.
//!
//! * T ≤ 8 with bf16/f16 weights and k % 8 == 0: the tuned GEMV of `gemv.rs`;
//! * other T < [`CUBLAS_MIN_ROWS`]: one warp per output element, weights widened on the fly;
//! * T ≥ [`CUBLAS_MIN_ROWS`]: x is narrowed to the weight dtype (bf16 or f16, round to nearest
//!   even) into the device's scratch buffer, then `cublasGemmEx` with fp32 accumulation and an
//!   f32 output; f32 weights take SGEMM numerics with x unchanged.
//!
//! A bias `[n]` (any dtype) is added by a separate kernel after either path.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::cublas::gemm_xwt;
use super::{CudaDevice, CudaStorage, convert, driver_err, elementwise, gemv, shape};
use crate::{DType, OpsError, Result};

/// Why packed weights cannot multiply: they are dequantised first.
const PACKED: &str = "packed weights are dequantised (Backend::dequant_mxfp4) before a matmul";

/// The kernel file's source text.
pub const SOURCE: &str = include_str!("../../kernels/matmul.cu");

/// Rows of x at and above which the matmul goes to cuBLAS.
pub const CUBLAS_MIN_ROWS: usize = 16;

/// Rows of x `[t, k]` in `x.len()` elements, or a shape error.
fn rows(x: &CudaSlice<f32>, w: &CudaStorage, n: usize, k: usize, out: &CudaSlice<f32>) -> Result<usize> {
    let t = x.len().checked_div(k).unwrap_or(0);
    if k == 0 || n == 0 || t == 0 || x.len() != t * k || w.len() != n * k || out.len() != t * n {
        return Err(shape("cuda matmul", format!("x {}, w {} ([{n}, {k}]), out {}", x.len(), w.len(), out.len())));
    }
    Ok(t)
}

/// `out = x · wᵀ (+ bias)`; x `[t, k]` f32, w `[n, k]` bf16/f16/f32, bias `[n]` any dtype,
/// out `[t, n]` f32. Picks the path by t (see the module doc).
pub fn matmul(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    w: &CudaStorage,
    n: usize,
    k: usize,
    bias: Option<&CudaStorage>,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let t = rows(x, w, n, k, out)?;
    if w.dtype() == DType::U8 {
        return Err(OpsError::DType { op: "cuda matmul", dtype: DType::U8, detail: PACKED });
    }
    // A few rows with 16-bit weights: the tuned GEMV; other small shapes: the simple kernel;
    // many rows: cuBLAS.
    match w {
        CudaStorage::BF16(w16) if gemv::covers(t, k) => gemv::gemv(dev, x, w16, n, k, out)?,
        CudaStorage::F16(w16) if gemv::covers(t, k) => gemv::gemv(dev, x, w16, n, k, out)?,
        _ if t < CUBLAS_MIN_ROWS => matmul_small(dev, x, w, n, k, out)?,
        _ => matmul_cublas(dev, x, w, n, k, out)?,
    }
    match bias {
        Some(b) => elementwise::add_bias(dev, out, b, n),
        None => Ok(()),
    }
}

/// The warp-per-output kernel, for any t (used for t < [`CUBLAS_MIN_ROWS`]; t < 65536).
pub fn matmul_small(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    w: &CudaStorage,
    n: usize,
    k: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let t = rows(x, w, n, k, out)?;
    if t > 65_535 {
        return Err(shape("cuda matmul", format!("{t} rows exceed the small kernel's grid (65535)")));
    }
    let func = dev.function("matmul", SOURCE, &format!("matmul_f32_{}w", w.kernel_suffix()))?;
    let (n_i32, k_i32) = (n as i32, k as i32);
    let cfg =
        LaunchConfig { grid_dim: (n.div_ceil(8) as u32, t as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut l = dev.stream.launch_builder(&func);
    l.arg(x);
    w.push_arg(&mut l);
    l.arg(out).arg(&n_i32).arg(&k_i32);
    // SAFETY: sizes checked above; each warp writes one element of out.
    unsafe { l.launch(cfg) }.map_err(driver_err("matmul"))?;
    Ok(())
}

/// The cuBLAS path, for any t: x narrowed to the weight dtype (bf16/f16), then GemmEx with an
/// f32 output and fp32 accumulation; f32 weights multiply x as it is.
pub fn matmul_cublas(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    w: &CudaStorage,
    n: usize,
    k: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let t = rows(x, w, n, k, out)?;
    match w {
        CudaStorage::F32(w) => gemm_xwt(dev, x, w, DType::F32, out, DType::F32, t, n, k),
        CudaStorage::BF16(w) => dev.with_scratch16(t * k, |xs| {
            convert::f32_to_16bit(dev, x, xs, DType::BF16)?;
            gemm_xwt(dev, &**xs, &**w, DType::BF16, out, DType::F32, t, n, k)
        }),
        CudaStorage::F16(w) => dev.with_scratch16(t * k, |xs| {
            convert::f32_to_16bit(dev, x, xs, DType::F16)?;
            gemm_xwt(dev, &**xs, &**w, DType::F16, out, DType::F32, t, n, k)
        }),
        CudaStorage::U8(_) => Err(OpsError::DType { op: "cuda matmul", dtype: DType::U8, detail: PACKED }),
    }
}

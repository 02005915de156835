//! cuBLAS: one handle per device, bound to the device's stream, with a workspace taken from the
//! VRAM account (so cuBLAS does not allocate behind the budget's back), and the one GEMM shape
//! the models need: `out = x · wᵀ` with fp32 accumulation.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

use super::{CudaDevice, DeviceBuf, shape};
use crate::{DType, OpsError, Result};

/// Workspace bytes for cuBLAS: NVIDIA recommends 32 MiB on Hopper and newer, 4 MiB before.
pub(crate) fn workspace_bytes(compute_capability: (i32, i32)) -> usize {
    if compute_capability.0 >= 9 { 32 << 20 } else { 4 << 20 }
}

/// Owns the handle and the workspace it was given; the handle is declared first so that it is
/// destroyed before its workspace is freed.
#[derive(Debug)]
pub(crate) struct Blas {
    handle: CudaBlas,
    stream: Arc<CudaStream>,
    workspace: Option<DeviceBuf<u8>>,
}

impl Blas {
    /// A handle bound to `stream`, with cuBLAS's own default workspace until
    /// [`Blas::set_workspace`] gives it one from the VRAM account.
    pub(crate) fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let handle = CudaBlas::new(stream.clone()).map_err(|e| {
            OpsError::Backend(format!(
                "cuBLAS could not create a handle ({e}); check that libcublas matches the driver, or run with --device cpu"
            ))
        })?;
        Ok(Self { handle, stream, workspace: None })
    }

    /// Makes cuBLAS use `workspace` (already accounted) for its scratch.
    pub(crate) fn set_workspace(&mut self, workspace: DeviceBuf<u8>) -> Result<()> {
        {
            let (ptr, _record) = workspace.device_ptr(&self.stream);
            // SAFETY: the handle is valid; the workspace is kept in self (dropped after the
            // handle) and holds workspace.len() bytes.
            unsafe { sys::cublasSetWorkspace_v2(*self.handle.handle(), ptr as *mut c_void, workspace.len()) }
                .result()
                .map_err(|e| {
                    OpsError::Backend(format!("cuBLAS: setting a {} B workspace failed: {e}", workspace.len()))
                })?;
        }
        self.workspace = Some(workspace);
        Ok(())
    }
}

fn cuda_type(d: DType) -> sys::cudaDataType {
    match d {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::U8 => sys::cudaDataType::CUDA_R_8U,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
    }
}

/// Row-major `out[t, n] = x[t, k] · w[n, k]ᵀ` (nn.Linear layout), fp32 accumulation
/// (`CUBLAS_COMPUTE_32F`, default algorithm). x and w are read as `in_dtype`, out is written as
/// `out_dtype`: bf16 or f16 inputs with an f32 or same-type output, or f32 throughout (SGEMM
/// numerics). `x` may be longer than `t·k` (a reused scratch buffer).
///
/// cuBLAS is column-major, and a row-major `[r, c]` matrix is a column-major `[c, r]` one, so
/// this asks for `outᵀ [n, t] = w [n, k] · xᵀ [k, t]`: transa = T (w is column-major `[k, n]`,
/// lda = k), transb = N (x is column-major `[k, t]`, ldb = k), m = n, n = t, k = k, ldc = n.
#[allow(clippy::too_many_arguments)]
pub fn gemm_xwt<X: DeviceRepr, W: DeviceRepr, O: DeviceRepr>(
    dev: &CudaDevice,
    x: &CudaSlice<X>,
    w: &CudaSlice<W>,
    in_dtype: DType,
    out: &mut CudaSlice<O>,
    out_dtype: DType,
    t: usize,
    n: usize,
    k: usize,
) -> Result<()> {
    let sizes_ok = size_of::<X>() == in_dtype.size_bytes()
        && size_of::<W>() == in_dtype.size_bytes()
        && size_of::<O>() == out_dtype.size_bytes();
    let types_ok = match in_dtype {
        DType::F32 => out_dtype == DType::F32,
        DType::F16 | DType::BF16 => out_dtype == DType::F32 || out_dtype == in_dtype,
        DType::U8 => false,
    };
    if !sizes_ok || !types_ok {
        return Err(OpsError::Backend(format!(
            "cuBLAS gemm: unsupported types ({in_dtype} inputs, {out_dtype} output)"
        )));
    }
    let fits = |v: usize| c_int::try_from(v).is_ok();
    if t == 0
        || n == 0
        || k == 0
        || x.len() < t * k
        || w.len() != n * k
        || out.len() != t * n
        || ![t, n, k].map(fits).iter().all(|&f| f)
    {
        return Err(shape(
            "cuBLAS gemm",
            format!("x {} ([{t}, {k}]), w {} ([{n}, {k}]), out {}", x.len(), w.len(), out.len()),
        ));
    }
    let (ti, ni, ki) = (t as c_int, n as c_int, k as c_int);
    let (alpha, beta) = (1.0f32, 0.0f32);
    let blas = dev.blas.lock().map_err(|_| OpsError::Backend("cuBLAS handle lock poisoned".into()))?;
    // cuBLAS runs in the calling thread's current context, which cudarc does not set here.
    dev.ctx.bind_to_thread().map_err(|e| OpsError::Backend(format!("cuBLAS gemm: binding the context: {e}")))?;
    let stream = &dev.stream;
    let (wp, _rw) = w.device_ptr(stream);
    let (xp, _rx) = x.device_ptr(stream);
    let (op, _ro) = out.device_ptr_mut(stream);
    // SAFETY: the pointers are live device buffers of the sizes checked above; alpha and beta
    // are host f32 values as CUBLAS_COMPUTE_32F expects in the default (host) pointer mode.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle.handle(),
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            ni,
            ti,
            ki,
            (&alpha as *const f32).cast(),
            wp as *const c_void,
            cuda_type(in_dtype),
            ki,
            xp as *const c_void,
            cuda_type(in_dtype),
            ki,
            (&beta as *const f32).cast(),
            op as *mut c_void,
            cuda_type(out_dtype),
            ni,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| OpsError::Backend(format!("cuBLAS gemm [{t}, {k}]·[{n}, {k}]ᵀ ({in_dtype} in, {out_dtype} out): {e}")))
}

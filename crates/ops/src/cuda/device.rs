//! Finding a usable CUDA device without ever panicking.
//!
//! cudarc panics when a library it needs cannot be loaded, so every library is checked for
//! first, and context creation runs under `catch_unwind` as a last guard.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

use super::nvrtc_cache::KernelCache;
use crate::{OpsError, Result};

/// What the driver reports about the chosen device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_bytes: usize,
    pub free_bytes: usize,
}

/// An open device: its context, the stream work is queued on, the kernel cache and the modules
/// loaded from it (one per kernel file, loaded on first use).
#[derive(Debug)]
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub info: DeviceInfo,
    pub kernels: KernelCache,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl CudaDevice {
    /// Kernel `func` of the kernel file `file` (its source text `source`), compiling and loading
    /// the file on first use.
    pub fn function(&self, file: &'static str, source: &str, func: &str) -> Result<CudaFunction> {
        let err = |e: cudarc::driver::DriverError| unavailable(format!("{file}.cu: {func}: {e}"));
        let module = {
            let mut modules = self.modules.lock().map_err(|_| unavailable("kernel module cache poisoned"))?;
            match modules.get(file) {
                Some(m) => m.clone(),
                None => {
                    let m = self.ctx.load_module(self.kernels.ptx(file, source)?).map_err(err)?;
                    modules.insert(file, m.clone());
                    m
                }
            }
        };
        module.load_function(func).map_err(err)
    }
}

fn unavailable(detail: impl Into<String>) -> OpsError {
    OpsError::Backend(detail.into())
}

/// Opens device `ordinal`, or explains in one line what is missing and how to provide it.
pub fn probe(ordinal: usize) -> Result<CudaDevice> {
    // SAFETY: these only try to dlopen the library; nothing is called through it yet.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(unavailable(
            "no CUDA driver found (libcuda.so): install the NVIDIA driver, or run with --device cpu",
        ));
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(unavailable(
            "NVRTC not found (libnvrtc.so): install the CUDA toolkit and add its lib64 to LD_LIBRARY_PATH, or run with --device cpu",
        ));
    }
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(unavailable(
            "cuBLAS not found (libcublas.so): install the CUDA toolkit and add its lib64 to LD_LIBRARY_PATH, or run with --device cpu",
        ));
    }
    let ctx = catch_unwind(AssertUnwindSafe(|| CudaContext::new(ordinal)))
        .map_err(|_| {
            unavailable("the CUDA driver could not be initialised (library load failed); run with --device cpu")
        })?
        .map_err(|e| {
            unavailable(format!(
                "cannot open CUDA device {ordinal}: {e} (check nvidia-smi; --device cpu runs without a GPU)"
            ))
        })?;
    let err = |what: &str, e: cudarc::driver::DriverError| unavailable(format!("CUDA device {ordinal}: {what}: {e}"));
    let (free_bytes, total_bytes) = ctx.mem_get_info().map_err(|e| err("memory info", e))?;
    let info = DeviceInfo {
        ordinal,
        name: ctx.name().map_err(|e| err("name", e))?,
        compute_capability: ctx.compute_capability().map_err(|e| err("compute capability", e))?,
        total_bytes,
        free_bytes,
    };
    let kernels = KernelCache::new(info.compute_capability)?;
    let stream = ctx.default_stream();
    Ok(CudaDevice { ctx, stream, info, kernels, modules: Mutex::new(HashMap::new()) })
}

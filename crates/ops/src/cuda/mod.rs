//! The CUDA backend (feature `cuda`, on by default): cudarc with libraries loaded at run time,
//! so the project builds and tests on machines with no CUDA at all.
//!
//! [`probe`] finds a usable device (or says in one line what is missing, never panicking),
//! every allocation goes through the device's [`VramAccount`] (hard budget, driver-measured
//! peak), [`KernelCache`] compiles `kernels/*.cu` with NVRTC once and keeps the PTX on disk,
//! each kernel file has a launcher here of the same name checked against its CPU twin in
//! `tests/parity_cuda_vs_cpu.rs`, and [`CudaBackend`] implements the `Backend` traits with them.
//! [`ComputeTimer`] and [`cublas::gemm_xwt`] are the entry points benches outside the crate
//! time the device with.
//! Streamed weights are copied from pinned host memory on a second stream (`transfer`),
//! ordered against compute by event markers only.

pub mod attention;
mod backend;
pub mod convert;
pub mod cublas;
pub mod deltanet;
mod device;
pub mod elementwise;
pub mod flash;
pub mod flash_sm90;
pub mod gemv;
pub mod graph;
pub mod matmul;
pub mod moe;
pub mod moe_grouped;
mod nvrtc_cache;
mod pdl;
pub mod rmsnorm;
pub mod rope;
mod storage;
mod timer;
pub(crate) mod transfer;
pub mod tree_attention;
pub mod vram;

use cudarc::driver::LaunchConfig;

pub use backend::CudaBackend;
pub use device::{CudaDevice, DeviceInfo, probe};
pub use nvrtc_cache::KernelCache;
pub use storage::CudaStorage;
pub use timer::ComputeTimer;
pub use transfer::PinnedAccount;
pub use vram::{DeviceBuf, VramAccount};

use crate::OpsError;

/// A driver error as an ops error naming the op.
pub(crate) fn driver_err(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> OpsError {
    move |e| OpsError::Backend(format!("cuda {op}: {e}"))
}

/// A 1-D launch for grid-stride loops over `n` elements: 256 threads a block, at most 4096 blocks.
pub(crate) fn grid_stride(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 4096) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// A shape error for a CUDA op.
pub(crate) fn shape(op: &'static str, detail: String) -> OpsError {
    OpsError::Shape { op, detail }
}

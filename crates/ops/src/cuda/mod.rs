//! The CUDA backend (feature `cuda`, on by default): cudarc with libraries loaded at run time,
//! so the project builds and tests on machines with no CUDA at all.
//!
//! Only the foundation is here so far: [`probe`] finds a usable device (or says in one line what
//! is missing, never panicking), [`KernelCache`] compiles `kernels/*.cu` with NVRTC once and keeps
//! the PTX on disk, and the first kernel (RMSNorm) is checked against its CPU twin in
//! `tests/parity_cuda_vs_cpu.rs`. The `Backend` implementation comes with the CUDA issue.

mod device;
mod nvrtc_cache;
pub mod rmsnorm;

pub use device::{probe, CudaDevice, DeviceInfo};
pub use nvrtc_cache::KernelCache;

//! Programmatic dependent launch (Hopper and later), on by default on sm_90+ (`OLLM_CUDA_PDL=0` turns it off): a decode
//! step's hot kernels (the GEMV family, the fused RoPE + KV append, split decode attention and
//! its combine) are launched with the programmatic-stream-serialization attribute, so the GPU
//! may start launching one while the kernel before it finishes its last wave. Each of those
//! kernels opens with `pdl_sync()` (kernels/*.cu): `griddepcontrol.wait` (wait for the kernel
//! before it to complete and its writes to be visible) then `griddepcontrol.launch_dependents`;
//! both are no-ops for a plain launch and before sm_90, so the kernels are the same either way.
//! cudarc's `LaunchArgs` has no launch attributes, so these launches pass their arguments raw
//! through `cuLaunchKernelEx`. Off (the default), the launchers use cudarc's ordinary launch.

use std::ffi::c_void;

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, sys};

use super::{CudaDevice, driver_err};
use crate::Result;

/// One kernel argument of a raw launch.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

impl Arg {
    /// A device buffer's address.
    pub(crate) fn buf<T: DeviceRepr>(dev: &CudaDevice, s: &CudaSlice<T>) -> Arg {
        Arg::Ptr(s.device_ptr(&dev.stream).0)
    }
}

/// Whether programmatic dependent launches run on a device of compute capability `cc`: they need
/// 9.0 or later (elsewhere the plain launches run); on by default, `OLLM_CUDA_PDL=0` turns them off.
pub(crate) fn wanted(cc: (i32, i32)) -> bool {
    cc.0 >= 9 && crate::env_switch("OLLM_CUDA_PDL", true)
}

/// Launches `func` on the compute stream with the programmatic-stream-serialization attribute.
///
/// # Safety
/// As cudarc's `LaunchArgs::launch`: `args` must match the kernel's parameters in order and
/// type (pointers 8 bytes, `int` and `float` 4), the buffers must outlive the kernel (stream
/// order), and the kernel must open with `pdl_sync()` before it reads or writes memory another
/// kernel touches.
pub(crate) unsafe fn launch(dev: &CudaDevice, func: &CudaFunction, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    let err = driver_err("programmatic dependent launch");
    dev.ctx.bind_to_thread().map_err(&err)?;
    // Each argument in an 8-byte slot (little-endian: a 4-byte parameter reads the low half);
    // the slots do not move while the pointers to them are in use.
    let mut slots: Vec<u64> = args
        .iter()
        .map(|a| match *a {
            Arg::Ptr(p) => p,
            Arg::I32(v) => u64::from(v as u32),
            Arg::F32(v) => u64::from(v.to_bits()),
        })
        .collect();
    let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| (s as *mut u64).cast::<c_void>()).collect();
    // SAFETY: a zeroed attribute is a valid plain-data value; the fields are set below.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: dev.stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: the caller's contract; `config`, `attr`, `slots` and `params` live until the call
    // returns (the driver copies the parameters at launch).
    unsafe { sys::cuLaunchKernelEx(&config, func.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
        .result()
        .map_err(err)
}

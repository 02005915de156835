//! Helpers the GPU test binaries share: seeded random data ([`seed`]), dtype rounding, and the
//! gate that finds the device or says why there is none ([`gpu`]). Each binary uses a subset.
#![allow(dead_code)]

pub mod gpu;
pub mod seed;

use half::{bf16, f16};
use ollm_ops::DType;
use ollm_ops::cuda::CudaDevice;

#[allow(unused_imports)] // not every binary draws random data
pub use seed::random;

/// `v` rounded to `dtype` and back (what a tensor of that dtype holds).
pub fn rounded(v: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => v.to_vec(),
        DType::F16 => v.iter().map(|x| f16::from_f32(*x).to_f32()).collect(),
        DType::BF16 => v.iter().map(|x| bf16::from_f32(*x).to_f32()).collect(),
        DType::U8 => panic!("U8 holds packed bytes, not numbers"),
    }
}

/// Little-endian bytes of `v` stored as `dtype`.
pub fn le_bytes(dtype: DType, v: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
        DType::BF16 => v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
        DType::U8 => panic!("U8 holds packed bytes, not numbers"),
    }
}

/// The device, or None after one SKIPPED line; a panic naming what is missing under
/// `OLLM_REQUIRE_GPU` ([`gpu::gpu_or_skip`]).
pub fn device() -> Option<CudaDevice> {
    gpu::gpu_or_skip()
}

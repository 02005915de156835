//! Helpers the GPU test binaries share: fresh random data, dtype rounding, and the gate that
//! finds the device or says why there is none ([`gpu`]). Each binary uses a subset.
#![allow(dead_code)]

pub mod gpu;

use half::{bf16, f16};
use ollm_ops::DType;
use ollm_ops::cuda::CudaDevice;

/// Fresh pseudo-random values in [-scale, scale), seeded by the clock so every run differs.
pub fn random(n: usize, scale: f32) -> Vec<f32> {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    let mut s = (clock ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

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

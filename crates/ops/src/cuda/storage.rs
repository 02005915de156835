//! Elements of a device tensor: one accounted buffer ([`DeviceBuf`]) per stored dtype.

use cudarc::driver::{LaunchArgs, PushKernelArg};
use half::{bf16, f16};

use super::DeviceBuf;
use crate::DType;

/// Elements of a device tensor. Every variant's bytes count in its device's VRAM account and
/// return to it when the storage drops.
#[derive(Debug)]
pub enum CudaStorage {
    F32(DeviceBuf<f32>),
    F16(DeviceBuf<f16>),
    BF16(DeviceBuf<bf16>),
    /// Packed quantised weights (MXFP4 blocks and scales).
    U8(DeviceBuf<u8>),
}

impl CudaStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CudaStorage::F32(_) => DType::F32,
            CudaStorage::F16(_) => DType::F16,
            CudaStorage::BF16(_) => DType::BF16,
            CudaStorage::U8(_) => DType::U8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CudaStorage::F32(s) => s.len(),
            CudaStorage::F16(s) => s.len(),
            CudaStorage::BF16(s) => s.len(),
            CudaStorage::U8(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CudaStorage {
    /// The kernel-name suffix of this dtype (`bf16`, `f16`, `f32`), as used by the kernel files.
    pub(crate) fn kernel_suffix(&self) -> &'static str {
        match self {
            CudaStorage::F32(_) => "f32",
            CudaStorage::F16(_) => "f16",
            CudaStorage::BF16(_) => "bf16",
            CudaStorage::U8(_) => "u8",
        }
    }

    /// Pushes the buffer's device pointer as the next kernel argument.
    pub(crate) fn push_arg<'a>(&'a self, l: &mut LaunchArgs<'a>) {
        match self {
            CudaStorage::F32(b) => l.arg(&**b),
            CudaStorage::F16(b) => l.arg(&**b),
            CudaStorage::BF16(b) => l.arg(&**b),
            CudaStorage::U8(b) => l.arg(&**b),
        };
    }
}

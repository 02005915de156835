//! Tensors: a shape plus storage owned by one backend.
//!
//! Shapes are row-major, slowest axis first (`[tokens, heads, head_dim]`). A tensor owns its
//! storage; reshaping changes only the shape. There is deliberately no `Clone`: copying a large
//! device tensor can fail for lack of memory, so copies go through a backend call.

use half::{bf16, f16};

use crate::DType;
use crate::error::{OpsError, Result};

/// Elements of a CPU tensor.
#[derive(Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    U8(Vec<u8>),
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::U8(_) => DType::U8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a tensor's elements live.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaStorage),
}

impl Storage {
    pub fn backend_name(&self) -> &'static str {
        match self {
            Storage::Cpu(_) => "cpu",
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => "cuda",
        }
    }

    fn len(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.len(),
        }
    }

    fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.dtype(),
        }
    }
}

/// A shaped, typed buffer on one backend.
#[derive(Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// Wraps storage; fails if the element count does not match the shape.
    pub fn new(shape: Vec<usize>, storage: Storage) -> Result<Self> {
        let n: usize = shape.iter().product();
        let len = storage.len();
        if n != len {
            return Err(OpsError::Shape {
                op: "Tensor::new",
                detail: format!("shape {shape:?} has {n} elements, storage has {len}"),
            });
        }
        Ok(Self { shape, storage })
    }

    /// A CPU f32 tensor from a vector.
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        Self::new(shape, Storage::Cpu(CpuStorage::F32(data)))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }

    /// Size of the storage in bytes.
    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype().size_bytes()
    }

    /// Changes the shape, keeping the element order. The element count must not change.
    pub fn reshape(&mut self, shape: Vec<usize>) -> Result<()> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(OpsError::Shape {
                op: "reshape",
                detail: format!("{:?} -> {shape:?} changes the element count", self.shape),
            });
        }
        self.shape = shape;
        Ok(())
    }

    /// The CPU storage, or an error naming the op if the tensor lives on another backend.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn cpu(&self, op: &'static str) -> Result<&CpuStorage> {
        match &self.storage {
            Storage::Cpu(s) => Ok(s),
            #[cfg(feature = "cuda")]
            other => Err(OpsError::WrongBackend { op, expected: "cpu", found: other.backend_name() }),
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn cpu_mut(&mut self, op: &'static str) -> Result<&mut CpuStorage> {
        match &mut self.storage {
            Storage::Cpu(s) => Ok(s),
            #[cfg(feature = "cuda")]
            other => Err(OpsError::WrongBackend { op, expected: "cpu", found: other.backend_name() }),
        }
    }

    /// The elements of a CPU f32 tensor.
    pub fn cpu_f32(&self, op: &'static str) -> Result<&[f32]> {
        match self.cpu(op)? {
            CpuStorage::F32(v) => Ok(v),
            s => Err(OpsError::DType { op, dtype: s.dtype(), detail: "expected an f32 activation" }),
        }
    }

    pub fn cpu_f32_mut(&mut self, op: &'static str) -> Result<&mut [f32]> {
        match self.cpu_mut(op)? {
            CpuStorage::F32(v) => Ok(v),
            s => Err(OpsError::DType { op, dtype: s.dtype(), detail: "expected an f32 activation" }),
        }
    }
}

/// Little-endian tensor bytes on the host, as read from a checkpoint, before upload.
#[derive(Debug)]
pub struct HostTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl HostTensor {
    /// Checks that the byte count matches shape × dtype.
    pub fn validate(&self) -> Result<()> {
        let want = self.shape.iter().product::<usize>() * self.dtype.size_bytes();
        if want != self.bytes.len() {
            return Err(OpsError::HostBytes {
                shape: self.shape.clone(),
                dtype: self.dtype,
                got: self.bytes.len(),
                want,
            });
        }
        Ok(())
    }

    /// Decodes the bytes into CPU storage of the same dtype.
    pub fn to_cpu_storage(&self) -> Result<CpuStorage> {
        self.validate()?;
        let b = &self.bytes;
        Ok(match self.dtype {
            DType::F32 => {
                CpuStorage::F32(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            DType::F16 => {
                CpuStorage::F16(b.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect())
            }
            DType::BF16 => {
                CpuStorage::BF16(b.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect())
            }
            DType::U8 => CpuStorage::U8(b.clone()),
        })
    }

    /// Every element widened to f32 (exact for every dtype; a U8 byte becomes its value).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(match self.to_cpu_storage()? {
            CpuStorage::F32(v) => v,
            CpuStorage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            CpuStorage::U8(v) => v.iter().map(|&x| f32::from(x)).collect(),
        })
    }
}

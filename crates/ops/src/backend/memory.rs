//! [`Memory`]: where tensors come from (allocation, uploads, read-back, KV caches, host staging
//! memory) and how much of the backend's memory they take ([`MemoryStats`]).

use crate::{DType, HostBuffer, HostTensor, Result, Tensor};

/// Whether a backend's tensors live in host RAM or in memory of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    /// Host RAM (the CPU backend): an "upload" is a decode and a copy is a memcpy.
    Host,
    /// A device's own memory (a GPU's VRAM), reached from the host through the copy queue.
    Device,
}

/// A backend's memory figures, for budgets, plans and `--stats` lines. Every figure is bytes.
///
/// The CPU backend does not track its allocations (they are ordinary heap memory): it reports
/// no budget, no total, no peak and zeros.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// The hard limit every allocation is checked against, `overhead_bytes` included
    /// (`--vram-budget`, else the whole device); None when there is none.
    pub budget_bytes: Option<u64>,
    /// The device's capacity; None on the host.
    pub total_bytes: Option<u64>,
    /// What the device took before any tensor (the CUDA context, the cuBLAS handle; on a shared
    /// GPU also other processes' memory).
    pub overhead_bytes: u64,
    /// Held by live tensors, scratch buffers and workspaces made through the backend, the
    /// overhead not included.
    pub in_use_bytes: u64,
    /// The most memory in use at once as the driver saw it, the overhead included; None when
    /// the backend does not measure it.
    pub peak_bytes: Option<u64>,
    /// Page-locked host bytes held by live [`HostBuffer`]s (host RAM, not in the budget), and
    /// the most held at once.
    pub pinned_bytes: u64,
    pub peak_pinned_bytes: u64,
}

/// Allocation and movement of whole tensors. Allocations are fallible: a device backend refuses
/// one that would pass its budget with [`OpsError::OutOfMemory`](crate::OpsError::OutOfMemory).
pub trait Memory: Send + Sync {
    /// Moves checkpoint bytes onto the backend, keeping their dtype.
    fn upload(&self, host: &HostTensor) -> Result<Tensor>;

    /// Uploads f32 values (tables, biases that must stay exact).
    fn upload_f32(&self, shape: Vec<usize>, data: &[f32]) -> Result<Tensor>;

    /// A zeroed activation tensor in the backend's activation dtype.
    fn zeros(&self, shape: Vec<usize>) -> Result<Tensor>;

    /// A zeroed KV cache `[n_kv, capacity, d]` in [`Memory::kv_dtype`]. Only
    /// [`Compute::write_kv`](crate::Compute::write_kv),
    /// [`Compute::attention`](crate::Compute::attention) and [`Memory::grow_kv`] need to read it.
    fn kv_zeros(&self, shape: Vec<usize>) -> Result<Tensor>;

    /// Element type of the KV cache: bf16 on GPUs (the model dtype, docs/models.md §2.4); on the
    /// CPU bf16 with bf16 activations (half the bytes attention reads) and f32 with exact ones
    /// (the oracle keeps full precision).
    fn kv_dtype(&self) -> DType;

    /// A zeroed tensor of any dtype, for weights that are filled on the backend: device slots
    /// that copies refill
    /// ([`CopyQueue::copy_to_device_async`](crate::CopyQueue::copy_to_device_async)) and
    /// dequantised experts.
    fn alloc(&self, shape: Vec<usize>, dtype: DType) -> Result<Tensor>;

    /// Reads any tensor back as f32.
    fn to_host_f32(&self, t: &Tensor) -> Result<Vec<f32>>;

    /// A KV cache `[n_kv, new_cap, d]` holding rows `keep` of `cache` (`[n_kv, cap, d]`) at rows
    /// `0 .. keep.len()`: growing keeps `0 .. len`; a sliding-window layer drops its front.
    fn grow_kv(&self, cache: &Tensor, keep: std::ops::Range<usize>, new_cap: usize) -> Result<Tensor>;

    /// `bytes` (rounded up to 4096) of host memory for staging and cached layers: page-locked on
    /// a device backend, so copies from it are asynchronous DMA. Not counted in the VRAM budget.
    fn host_alloc(&self, bytes: usize) -> Result<HostBuffer>;

    /// Where this backend's tensors live.
    fn memory_kind(&self) -> MemoryKind;

    /// Budget, overhead, bytes in use and the peak, now.
    fn memory_stats(&self) -> MemoryStats;
}

//! Device-memory accounting with a hard byte budget (`--vram-budget`).
//!
//! Every byte the CUDA backend allocates (uploads, activations, scratch, KV caches, the cuBLAS
//! workspace) is reserved here first and released when its [`DeviceBuf`] drops. A reservation
//! fails, with one line naming what asked and how to fix it, when
//!
//! ```text
//! CUDA context + tracked bytes + requested > budget
//! ```
//!
//! The context overhead is `total − free` read right after the context was created (on a shared
//! GPU it also counts other processes' memory). Besides the tracked bytes, the account keeps the
//! driver's view: the lowest free-memory reading sampled after every allocation, so the peak it
//! reports includes what the driver, the module loader and cuBLAS took on their own.
//!
//! [`VramAccount`] holds only numbers (no CUDA calls), so its arithmetic is unit-tested on any
//! machine; [`CudaDevice::alloc_zeros`](super::CudaDevice::alloc_zeros) and friends do the
//! allocating and the sampling.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;

use crate::error::MemoryLimit;
use crate::{OpsError, Result};

pub use crate::bytes::{gib, human};

/// The budget rule as a pure function: Ok when `context + in_use + requested <= budget`,
/// else the one-line error the user sees. `in_use` is the tracked bytes, without the context.
pub fn check_budget(budget: usize, context: usize, in_use: usize, requested: usize, what: &str) -> Result<()> {
    let after = context.saturating_add(in_use).saturating_add(requested);
    if after <= budget {
        return Ok(());
    }
    Err(OpsError::OutOfMemory {
        what: what.to_string(),
        requested_bytes: requested as u64,
        in_use_bytes: context.saturating_add(in_use) as u64,
        context_bytes: context as u64,
        budget_bytes: budget as u64,
        limit: MemoryLimit::Budget,
    })
}

/// Byte counts of one device: budget, context overhead, tracked allocations and the driver's
/// free-memory low-water mark. Shared (`Arc`) by the device and every [`DeviceBuf`] it made.
///
/// Invariant: `used` is the sum of the sizes of the live `DeviceBuf`s (plus reservations whose
/// allocation is in flight); it never exceeds `budget − context` through [`VramAccount::reserve`].
#[derive(Debug)]
pub struct VramAccount {
    total_bytes: usize,
    /// `total − free` right after context creation.
    context_bytes: usize,
    budget_bytes: AtomicUsize,
    used_bytes: AtomicUsize,
    /// Lowest free-memory reading seen (starts at the reading after context creation).
    min_free_bytes: AtomicUsize,
    /// While a decode step is captured into a graph (`graph.rs`): the device addresses of the
    /// buffers allocated during the capture and not freed inside it. Those allocations belong to
    /// the graph, which makes them again at each replay, so a replay frees them after use.
    capture: Mutex<Option<Vec<u64>>>,
}

impl VramAccount {
    /// A fresh account for a device of `total_bytes` of which `free_bytes` were free right after
    /// the context was created. The budget starts at the whole device.
    pub fn new(total_bytes: usize, free_bytes: usize) -> Self {
        let free_bytes = free_bytes.min(total_bytes);
        Self {
            total_bytes,
            context_bytes: total_bytes - free_bytes,
            budget_bytes: AtomicUsize::new(total_bytes),
            used_bytes: AtomicUsize::new(0),
            min_free_bytes: AtomicUsize::new(free_bytes),
            capture: Mutex::new(None),
        }
    }

    /// Whether a step graph is being captured (allocations then become graph memory nodes).
    pub fn is_capturing(&self) -> bool {
        self.capture.lock().is_ok_and(|c| c.is_some())
    }

    /// Starts (Some) or ends (None) the list of a capture's allocations; returns the list ended.
    pub(crate) fn set_capture(&self, list: Option<Vec<u64>>) -> Option<Vec<u64>> {
        match self.capture.lock() {
            Ok(mut c) => std::mem::replace(&mut *c, list),
            Err(_) => None,
        }
    }

    /// Notes an allocation at `addr` made during a capture.
    pub(crate) fn note_capture_alloc(&self, addr: u64) {
        if let Ok(mut c) = self.capture.lock()
            && let Some(list) = c.as_mut()
        {
            list.push(addr);
        }
    }

    /// Notes that the buffer at `addr` was freed inside the capture (the graph frees it itself).
    fn note_capture_free(&self, addr: u64) {
        if let Ok(mut c) = self.capture.lock()
            && let Some(list) = c.as_mut()
        {
            list.retain(|&a| a != addr);
        }
    }

    /// Sets the hard budget. Fails if the context and what is already allocated exceed it.
    pub fn set_budget(&self, budget_bytes: usize) -> Result<()> {
        let in_use = self.used_bytes();
        if self.context_bytes + in_use > budget_bytes {
            return Err(OpsError::Backend(format!(
                "--vram-budget {} is below what this device already uses: {} (CUDA context {}); raise --vram-budget",
                gib(budget_bytes),
                gib(self.context_bytes + in_use),
                gib(self.context_bytes),
            )));
        }
        self.budget_bytes.store(budget_bytes, Ordering::Relaxed);
        Ok(())
    }

    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes.load(Ordering::Relaxed)
    }

    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    pub fn context_bytes(&self) -> usize {
        self.context_bytes
    }

    /// Bytes held by live allocations made through the account.
    pub fn used_bytes(&self) -> usize {
        self.used_bytes.load(Ordering::Relaxed)
    }

    /// Peak device memory in use as the driver saw it: `total − lowest free reading`, the CUDA
    /// context included.
    pub fn peak_used_bytes(&self) -> usize {
        self.total_bytes.saturating_sub(self.min_free_bytes.load(Ordering::Relaxed))
    }

    /// Reserves `bytes` for `what`, or fails without reserving anything.
    pub fn reserve(&self, bytes: usize, what: &str) -> Result<()> {
        let budget = self.budget_bytes();
        let mut cur = self.used_bytes.load(Ordering::Relaxed);
        loop {
            check_budget(budget, self.context_bytes, cur, bytes, what)?;
            match self.used_bytes.compare_exchange_weak(cur, cur + bytes, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// Returns bytes reserved earlier.
    pub fn release(&self, bytes: usize) {
        // Saturating: a release can never take the count below zero, even if misused.
        let _ = self.used_bytes.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| Some(u.saturating_sub(bytes)));
    }

    /// Records a free-memory reading from the driver (cuMemGetInfo).
    pub fn note_free(&self, free_bytes: usize) {
        self.min_free_bytes.fetch_min(free_bytes, Ordering::Relaxed);
    }
}

/// A device buffer whose bytes are counted in a [`VramAccount`]; dropping it frees the memory
/// (stream-ordered) and returns the bytes to the account. Derefs to the `CudaSlice` it owns.
pub struct DeviceBuf<T> {
    slice: CudaSlice<T>,
    bytes: usize,
    account: Arc<VramAccount>,
}

impl<T> DeviceBuf<T> {
    /// Wraps a slice whose `bytes` the caller has already reserved in `account`.
    pub(crate) fn new(slice: CudaSlice<T>, bytes: usize, account: Arc<VramAccount>) -> Self {
        Self { slice, bytes, account }
    }

    /// Bytes this buffer holds in the account.
    pub fn size_bytes(&self) -> usize {
        self.bytes
    }
}

impl<T> Deref for DeviceBuf<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DerefMut for DeviceBuf<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> Drop for DeviceBuf<T> {
    fn drop(&mut self) {
        if self.account.is_capturing() {
            use cudarc::driver::DevicePtr;
            // With event tracking off (device.rs) this records nothing on the stream.
            let (addr, _sync) = self.slice.device_ptr(self.slice.stream());
            self.account.note_capture_free(addr);
        }
        self.account.release(self.bytes);
    }
}

impl<T> fmt::Debug for DeviceBuf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceBuf({} elements, {})", self.slice.len(), human(self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: usize = 1 << 30;
    const M: usize = 1 << 20;

    #[test]
    fn budget_rule_counts_context_tracked_and_requested() {
        assert!(check_budget(8 * G, G / 2, 7 * G, G / 2, "x").is_ok(), "exactly at the budget fits");
        let e =
            check_budget(8 * G, G / 2, 7 * G + 400 * M, 256 * M, "KV cache [8, 4096, 128]").expect_err("over budget");
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert_eq!(
            msg,
            "VRAM budget 8.00 GiB exceeded: 7.89 GiB in use (CUDA context 0.50 GiB) + 256.0 MiB requested for KV cache [8, 4096, 128]; raise --vram-budget, or use a shorter context or a smaller model"
        );
        let OpsError::OutOfMemory { what, requested_bytes, in_use_bytes, context_bytes, budget_bytes, limit } = e
        else {
            panic!("not a typed out-of-memory error: {e:?}");
        };
        assert_eq!(what, "KV cache [8, 4096, 128]");
        assert_eq!((requested_bytes, budget_bytes, context_bytes), (256 * M as u64, 8 * G as u64, G as u64 / 2));
        assert_eq!((in_use_bytes, limit), ((7 * G + 400 * M + G / 2) as u64, MemoryLimit::Budget));
        // Huge requests do not overflow the arithmetic.
        assert!(check_budget(8 * G, G, G, usize::MAX, "x").is_err());
    }

    #[test]
    fn reserve_and_release_track_bytes_and_enforce_the_budget() {
        let a = VramAccount::new(80 * G, 79 * G);
        assert_eq!(a.context_bytes(), G);
        assert_eq!(a.budget_bytes(), 80 * G, "default budget is the whole device");
        a.set_budget(4 * G).expect("above the context");
        a.reserve(2 * G, "weights").expect("fits");
        a.reserve(G, "kv").expect("fits exactly");
        assert_eq!(a.used_bytes(), 3 * G);
        assert!(a.reserve(1, "one more byte").is_err());
        assert_eq!(a.used_bytes(), 3 * G, "a failed reservation reserves nothing");
        a.release(G);
        a.reserve(M, "scratch").expect("fits after a release");
        assert!(a.set_budget(2 * G).is_err(), "a budget below what is in use is refused");
        assert_eq!(a.budget_bytes(), 4 * G);
        a.release(usize::MAX);
        assert_eq!(a.used_bytes(), 0, "releases saturate at zero");
    }

    #[test]
    fn peak_comes_from_the_lowest_free_reading() {
        let a = VramAccount::new(80 * G, 79 * G);
        assert_eq!(a.peak_used_bytes(), G, "the context alone");
        a.note_free(70 * G);
        a.note_free(75 * G);
        assert_eq!(a.peak_used_bytes(), 10 * G, "a later, higher reading does not lower the peak");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(100), "100 B");
        assert_eq!(human(12 * 1024), "12.0 KiB");
        assert_eq!(human(256 * M), "256.0 MiB");
        assert_eq!(human(3 * G / 2), "1.50 GiB");
        assert_eq!(gib(G / 2), "0.50 GiB");
    }
}

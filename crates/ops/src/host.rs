//! Host memory that a backend copies from asynchronously, and markers that order its queues.
//!
//! The weight streamer (docs/architecture.md §1) reads layers with O_DIRECT into a [`HostBuffer`],
//! queues the host-to-device copy on the backend's copy stream, and orders copies against
//! compute with [`Marker`]s; see [`CopyQueue`](crate::CopyQueue).

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::Range;
use std::ptr::NonNull;

use crate::{OpsError, Result};

/// Alignment and length granule of every [`HostBuffer`]: O_DIRECT needs both on the logical
/// block size, and 4096 covers every device in use.
pub const HOST_ALIGN: usize = 4096;

/// `bytes` rounded up to a multiple of [`HOST_ALIGN`], or None on overflow.
pub fn round_up_to_page(bytes: usize) -> Option<usize> {
    bytes.checked_next_multiple_of(HOST_ALIGN)
}

/// Who frees a buffer's memory.
enum Owner {
    /// Nothing to free (an empty buffer).
    None,
    /// The Rust heap, with this layout.
    Heap(Layout),
    /// Page-locked memory of a CUDA device; its own `Drop` waits for pending copies and frees it.
    #[cfg(feature = "cuda")]
    Pinned(crate::cuda::transfer::PinnedAlloc),
}

/// Host memory the device can copy from asynchronously: page-locked (cuMemHostAlloc) on CUDA
/// backends, 4096-byte-aligned heap memory on the CPU backend. The address is 4096-aligned and
/// the length a multiple of 4096 (O_DIRECT reads go straight into it). Starts zeroed.
///
/// Owns its memory; dropping it frees the memory (a pinned buffer first waits for the copies
/// still queued from it). Writing into a range while a copy from it is queued races with the
/// copy: wait for a [`CopyQueue::copy_marker`](crate::CopyQueue::copy_marker) taken after the copy
/// first.
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
    pinned: bool,
    owner: Owner,
}

// SAFETY: the buffer owns its memory exclusively (no aliasing handle exists outside it), shared
// access only reads through `&self`, and writes need `&mut self`; the pinned owner's handles
// (context, stream) are themselves Send + Sync.
unsafe impl Send for HostBuffer {}
// SAFETY: see Send.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// `bytes` rounded up to 4096 of zeroed, 4096-aligned heap memory (the CPU backend's
    /// [`Memory::host_alloc`](crate::Memory::host_alloc)).
    pub fn heap(bytes: usize) -> Result<Self> {
        let len = rounded(bytes, "host_alloc")?;
        if len == 0 {
            return Ok(Self::empty(false));
        }
        let layout = Layout::from_size_align(len, HOST_ALIGN).map_err(|_| too_large(bytes, "host_alloc"))?;
        // SAFETY: the layout has a non-zero size (len > 0 above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            OpsError::Backend(format!(
                "host_alloc: cannot allocate {} of host memory (out of memory); lower --ram-budget",
                size_text(len)
            ))
        })?;
        Ok(Self { ptr, len, pinned: false, owner: Owner::Heap(layout) })
    }

    /// A zero-length buffer (nothing allocated); `pinned` says which backend made it.
    pub(crate) fn empty(pinned: bool) -> Self {
        // A dangling but aligned, non-null address: valid for zero-length slices.
        let ptr = NonNull::new(std::ptr::without_provenance_mut(HOST_ALIGN)).unwrap_or(NonNull::dangling());
        Self { ptr, len: 0, pinned, owner: Owner::None }
    }

    /// Wraps page-locked memory: `ptr` is 4096-aligned, `len` bytes, zeroed, kept alive and
    /// finally freed by `alloc`.
    #[cfg(feature = "cuda")]
    pub(crate) fn pinned(ptr: NonNull<u8>, len: usize, alloc: crate::cuda::transfer::PinnedAlloc) -> Self {
        debug_assert!((ptr.as_ptr() as usize).is_multiple_of(HOST_ALIGN) && len.is_multiple_of(HOST_ALIGN));
        Self { ptr, len, pinned: true, owner: Owner::Pinned(alloc) }
    }

    /// The pinned allocation behind this buffer, if it is one.
    #[cfg(feature = "cuda")]
    pub(crate) fn pinned_alloc(&self) -> Option<&crate::cuda::transfer::PinnedAlloc> {
        match &self.owner {
            Owner::Pinned(a) => Some(a),
            _ => None,
        }
    }

    /// Length in bytes, a multiple of 4096.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed at allocation) bytes while self
        // lives, and no &mut to them exists while &self is borrowed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Page-locked (a CUDA backend's buffer): copies from it are true asynchronous DMA.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// `offset .. offset + bytes` if it lies inside the buffer, else the shape error of `op`.
    pub fn range(&self, offset: usize, bytes: usize, op: &'static str) -> Result<Range<usize>> {
        match offset.checked_add(bytes) {
            Some(end) if end <= self.len => Ok(offset..end),
            _ => Err(OpsError::Shape {
                op,
                detail: format!("bytes {offset} + {bytes} lie outside the host buffer of {} bytes", self.len),
            }),
        }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if let Owner::Heap(layout) = self.owner {
            // SAFETY: ptr came from alloc_zeroed with exactly this layout and is freed once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
        // A pinned owner frees its memory in its own Drop, which runs after this one.
    }
}

impl fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.pinned { "pinned" } else { "heap" };
        write!(f, "HostBuffer({kind}, {})", size_text(self.len))
    }
}

/// `bytes` rounded up to the page, or the one-line error of `op`.
pub(crate) fn rounded(bytes: usize, op: &str) -> Result<usize> {
    round_up_to_page(bytes).filter(|&b| b <= isize::MAX as usize).ok_or_else(|| too_large(bytes, op))
}

fn too_large(bytes: usize, op: &str) -> OpsError {
    OpsError::Backend(format!("{op}: {bytes} bytes is larger than any host allocation can be"))
}

/// `512.0 MiB`-style text for messages (host sizes are MiB to GiB).
pub(crate) fn size_text(bytes: usize) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    const GIB: f64 = (1u64 << 30) as f64;
    let b = bytes as f64;
    if b >= GIB { format!("{:.2} GiB", b / GIB) } else { format!("{:.1} MiB", b / MIB) }
}

/// An opaque point in a backend's queue of work: a CUDA event on CUDA backends, nothing on the
/// CPU backend (whose work is done when its call returns). Markers are only meaningful to the
/// backend that made them; giving one to another backend is an error.
pub struct Marker {
    pub(crate) kind: MarkerKind,
}

pub(crate) enum MarkerKind {
    /// The CPU backend's marker: already passed when made.
    Host,
    /// An event recorded on one of the device's streams.
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaEvent),
}

impl Marker {
    pub(crate) fn host() -> Self {
        Self { kind: MarkerKind::Host }
    }

    /// Which backend made it ("cpu", "cuda"), for error messages.
    pub fn backend_name(&self) -> &'static str {
        match self.kind {
            MarkerKind::Host => "cpu",
            #[cfg(feature = "cuda")]
            MarkerKind::Cuda(_) => "cuda",
        }
    }
}

impl fmt::Debug for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Marker({})", self.backend_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_buffers_are_aligned_rounded_and_zeroed() {
        for (ask, want) in [(1, 4096), (4096, 4096), (4097, 8192), (3 * 4096 + 5, 4 * 4096)] {
            let mut b = HostBuffer::heap(ask).expect("small allocation");
            assert_eq!(b.len(), want, "{ask} bytes round up to whole pages");
            assert!((b.as_slice().as_ptr() as usize).is_multiple_of(HOST_ALIGN), "4096-aligned");
            assert!(!b.is_pinned() && !b.is_empty());
            assert!(b.as_slice().iter().all(|&x| x == 0), "starts zeroed");
            b.as_mut_slice()[want - 1] = 7;
            assert_eq!(b.as_slice()[want - 1], 7);
        }
        let empty = HostBuffer::heap(0).expect("empty");
        assert!(empty.is_empty() && empty.as_slice().is_empty());
    }

    #[test]
    fn impossible_sizes_are_one_line_errors() {
        let e = HostBuffer::heap(usize::MAX).expect_err("cannot round up");
        assert!(matches!(e, OpsError::Backend(_)) && !e.to_string().contains('\n'), "{e}");
        let e = HostBuffer::heap(usize::MAX / 2 + 1).expect_err("past isize::MAX");
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn ranges_are_checked_without_overflow() {
        let b = HostBuffer::heap(8192).expect("alloc");
        assert_eq!(b.range(100, 8092, "t").expect("fits exactly"), 100..8192);
        assert!(matches!(b.range(100, 8093, "t"), Err(OpsError::Shape { op: "t", .. })));
        assert!(matches!(b.range(usize::MAX, 2, "t"), Err(OpsError::Shape { .. })));
        assert!(matches!(b.range(8193, 0, "t"), Err(OpsError::Shape { .. })));
    }

    #[test]
    fn buffers_and_markers_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<HostBuffer>();
        send_sync::<Marker>();
    }
}

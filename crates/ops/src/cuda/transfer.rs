//! Streaming on a CUDA device: page-locked host buffers, asynchronous host-to-device copies on
//! the device's copy stream, and event markers that order the copy stream against the compute
//! stream.
//!
//! The two streams are ordered by markers only (no implicit per-buffer events: see the note on
//! event tracking in [`probe`](super::probe)), so a copy overlaps whatever compute is queued.
//! Pinned bytes are host RAM, not VRAM: they are counted in the device's [`PinnedAccount`], never
//! in its VRAM account.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaEvent, CudaStream, DevicePtrMut, result};
use rayon::prelude::*;

use super::{CudaDevice, CudaStorage, DeviceBuf, driver_err};
use crate::backend::foreign_marker;
use crate::host::{self, HOST_ALIGN, HostBuffer, Marker, MarkerKind, size_text};
use crate::{OpsError, Result};

/// Page-locked host bytes of one device: live and the peak of live, for stats.
#[derive(Debug, Default)]
pub struct PinnedAccount {
    live_bytes: AtomicUsize,
    peak_bytes: AtomicUsize,
}

impl PinnedAccount {
    /// Bytes held by live pinned buffers.
    pub fn live_bytes(&self) -> usize {
        self.live_bytes.load(Ordering::Relaxed)
    }

    /// The most bytes ever held at once.
    pub fn peak_bytes(&self) -> usize {
        self.peak_bytes.load(Ordering::Relaxed)
    }

    fn add(&self, bytes: usize) {
        let now = self.live_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.peak_bytes.fetch_max(now, Ordering::AcqRel);
    }

    fn release(&self, bytes: usize) {
        let _ = self.live_bytes.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |b| Some(b.saturating_sub(bytes)));
    }
}

/// One cuMemHostAlloc allocation, owned by the [`HostBuffer`] made from it. Dropping it waits
/// for the copy stream (the only stream that reads pinned buffers), so no queued copy reads
/// freed memory, then frees the memory and returns its bytes to the account.
pub(crate) struct PinnedAlloc {
    base: *mut c_void,
    bytes: usize,
    copy_stream: Arc<CudaStream>,
    account: Arc<PinnedAccount>,
}

// SAFETY: `base` is owned by this value alone and only passed to cuMemFreeHost once, in Drop;
// the stream and account handles are Send + Sync.
unsafe impl Send for PinnedAlloc {}
// SAFETY: see Send; &PinnedAlloc gives no access to the memory.
unsafe impl Sync for PinnedAlloc {}

impl Drop for PinnedAlloc {
    fn drop(&mut self) {
        let ctx = self.copy_stream.context();
        ctx.record_err(self.copy_stream.synchronize());
        ctx.record_err(ctx.bind_to_thread());
        // SAFETY: base came from cuMemHostAlloc and is freed exactly once; no copy still reads it.
        ctx.record_err(unsafe { result::free_host(self.base) });
        self.account.release(self.bytes);
    }
}

/// `bytes` rounded up to 4096 of zeroed page-locked host memory, 4096-aligned.
pub(crate) fn alloc_pinned(dev: &CudaDevice, bytes: usize) -> Result<HostBuffer> {
    let len = host::rounded(bytes, "host_alloc")?;
    if len == 0 {
        return Ok(HostBuffer::empty(true));
    }
    dev.ctx.bind_to_thread().map_err(driver_err("host_alloc"))?;
    let fail = |n: usize, e: cudarc::driver::DriverError| {
        OpsError::Backend(format!(
            "cuda host_alloc: cannot pin {} of host memory ({e}; {} already pinned); lower --ram-budget or free host RAM",
            size_text(n),
            size_text(dev.pinned.live_bytes())
        ))
    };
    // SAFETY: the context is current; the memory is zeroed below before anyone reads it.
    let alloc = |n: usize| unsafe { result::malloc_host(n, 0) }.map_err(|e| fail(n, e));
    // cuMemHostAlloc returns page-aligned memory in practice, but does not promise it; if it is
    // not, allocate one page more and start at the first aligned address.
    let mut base = alloc(len)?;
    let mut bytes = len;
    if !(base as usize).is_multiple_of(HOST_ALIGN) {
        // SAFETY: base came from cuMemHostAlloc just above and nothing uses it.
        unsafe { result::free_host(base) }.map_err(driver_err("host_alloc"))?;
        bytes = len + HOST_ALIGN;
        base = alloc(bytes)?;
    }
    let skip = (base as usize).next_multiple_of(HOST_ALIGN) - base as usize;
    // Own the allocation before anything else can fail, so that it is freed on every path.
    let owner = PinnedAlloc { base, bytes, copy_stream: dev.copy_stream.clone(), account: dev.pinned.clone() };
    dev.pinned.add(bytes);
    let start = base as usize + skip;
    // Zero it (the pages are the kernel's zeroed pages in practice; this makes it a promise),
    // in parallel: the RAM tier can be tens of GiB.
    (0..len.div_ceil(1 << 24)).into_par_iter().for_each(|i| {
        let off = i << 24;
        // SAFETY: [start + off, start + off + n) lies inside the allocation, and the chunks
        // are disjoint; raw writes create no reference to the not-yet-initialised bytes.
        unsafe { std::ptr::write_bytes((start + off) as *mut u8, 0, (len - off).min(1 << 24)) };
    });
    let ptr = NonNull::new(start as *mut u8).ok_or_else(|| OpsError::Backend("cuMemHostAlloc returned null".into()))?;
    Ok(HostBuffer::pinned(ptr, len, owner))
}

/// Queues a copy of `src[offset .. offset + bytes]` into `dst` (exactly `bytes` long) on the
/// copy stream.
pub(crate) fn copy_to_device(dev: &CudaDevice, src: &HostBuffer, offset: usize, dst: &mut CudaStorage) -> Result<()> {
    let op = "copy_to_device_async";
    let bytes = dst.len() * dst.dtype().size_bytes();
    let range = src.range(offset, bytes, op)?;
    if bytes == 0 {
        return Ok(());
    }
    let stream = &dev.copy_stream;
    // A pinned buffer's Drop waits for its own device's copy stream only.
    if src.pinned_alloc().is_some_and(|a| !Arc::ptr_eq(&a.copy_stream, stream)) {
        return Err(OpsError::Backend(format!("{op}: the host buffer was allocated by another CUDA backend")));
    }
    let ptr = match dst {
        CudaStorage::F32(b) => device_ptr(b, stream),
        CudaStorage::F16(b) => device_ptr(b, stream),
        CudaStorage::BF16(b) => device_ptr(b, stream),
        CudaStorage::U8(b) => device_ptr(b, stream),
    };
    // SAFETY: ptr is a live device allocation of exactly `bytes` bytes, the source range was
    // checked above. The host bytes stay valid until the copy has passed: a pinned buffer's
    // Drop waits for the copy stream, and a pageable source is staged before this returns.
    // Keeping dst allocated until then is the caller's part (Backend's streaming notes).
    unsafe { queue_htod(dev, &src.as_slice()[range], ptr, op) }
}

/// Which way a KV block copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KvDirection {
    ToHost,
    FromHost,
}

/// Queues the KV block copy of `span` between the bf16 cache at `cache` (`[n_kv, cap, d]`) and
/// the host bytes `host` on the copy stream: one 2-D copy, a row per head.
///
/// # Safety
/// `cache` must address `n_kv * cap * d` bf16 elements and `host` the buffer the span was
/// checked against, both staying allocated (and the host bytes unchanged, or unread, as the
/// direction requires) until the copy has passed.
pub(crate) unsafe fn queue_kv_copy(
    dev: &CudaDevice,
    cache: CUdeviceptr,
    host: *mut u8,
    geometry: (usize, usize, usize),
    span: crate::KvBlockSpan,
    dir: KvDirection,
) -> Result<()> {
    use cudarc::driver::sys::{CUDA_MEMCPY2D, CUmemorytype, cuMemcpy2DAsync_v2};
    let op = "kv block copy";
    let (n_kv, cap, d) = geometry;
    if span.n == 0 {
        return Ok(());
    }
    let e = 2usize; // bf16
    let dev_at = cache + ((span.pos * d * e) as u64);
    // SAFETY: inside the host buffer (checked by KvBlockSpan::check).
    let host_at = unsafe { host.add(span.offset + span.row * d * e) };
    let (dev_pitch, host_pitch) = (cap * d * e, span.block * d * e);
    let (device, host) = (CUmemorytype::CU_MEMORYTYPE_DEVICE, CUmemorytype::CU_MEMORYTYPE_HOST);
    let null = std::ptr::null_mut();
    // Every field set: the memory-type enums have no zero value, so the struct cannot be zeroed.
    let mut c = CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: device,
        srcHost: std::ptr::null(),
        srcDevice: 0,
        srcArray: null,
        srcPitch: 0,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: device,
        dstHost: null.cast(),
        dstDevice: 0,
        dstArray: null,
        dstPitch: 0,
        WidthInBytes: 0,
        Height: 0,
    };
    match dir {
        KvDirection::ToHost => {
            c.srcDevice = dev_at;
            c.srcPitch = dev_pitch;
            c.dstMemoryType = host;
            c.dstHost = host_at.cast();
            c.dstPitch = host_pitch;
        }
        KvDirection::FromHost => {
            c.srcMemoryType = host;
            c.srcHost = host_at.cast();
            c.srcPitch = host_pitch;
            c.dstDevice = dev_at;
            c.dstPitch = dev_pitch;
        }
    }
    c.WidthInBytes = span.n * d * e;
    c.Height = n_kv;
    dev.ctx.bind_to_thread().map_err(driver_err(op))?;
    // SAFETY: both sides hold n_kv rows of WidthInBytes at their pitches (the caller's
    // obligations); the stream belongs to the context bound above.
    let r = unsafe { cuMemcpy2DAsync_v2(&c, dev.copy_stream.cu_stream()) };
    r.result().map_err(driver_err(op))
}

/// The raw address of a device buffer (no events: tracking is off on this context).
fn device_ptr<T>(b: &mut DeviceBuf<T>, stream: &CudaStream) -> CUdeviceptr {
    let (ptr, _no_event) = b.device_ptr_mut(stream);
    ptr
}

/// cuMemcpyHtoDAsync of `host` to `dst` on the copy stream, from whichever thread calls.
///
/// # Safety
/// `dst` must address at least `host.len()` bytes of device memory that stays allocated, and
/// `host` must stay valid and unchanged, until the copy has passed.
unsafe fn queue_htod(dev: &CudaDevice, host: &[u8], dst: CUdeviceptr, op: &'static str) -> Result<()> {
    dev.ctx.bind_to_thread().map_err(driver_err(op))?;
    // SAFETY: forwarded to the caller; the stream belongs to the context bound above.
    unsafe { result::memcpy_htod_async(dst, host, dev.copy_stream.cu_stream()) }.map_err(driver_err(op))
}

/// A marker after everything queued so far on `stream`.
pub(crate) fn marker(stream: &CudaStream, op: &'static str) -> Result<Marker> {
    let event = stream.record_event(None).map_err(driver_err(op))?;
    Ok(Marker { kind: MarkerKind::Cuda(event) })
}

/// The event of a CUDA marker, or the error for another backend's marker.
pub(crate) fn event<'a>(m: &'a Marker, op: &'static str) -> Result<&'a CudaEvent> {
    match &m.kind {
        MarkerKind::Cuda(e) => Ok(e),
        MarkerKind::Host => Err(foreign_marker(op, "cuda", m)),
    }
}

#[cfg(test)]
mod tests {
    use super::PinnedAccount;

    #[test]
    fn pinned_account_tracks_live_and_peak_bytes() {
        let a = PinnedAccount::default();
        a.add(3 << 20);
        a.add(1 << 20);
        a.release(3 << 20);
        assert_eq!((a.live_bytes(), a.peak_bytes()), (1 << 20, 4 << 20));
        a.release(usize::MAX);
        assert_eq!(a.live_bytes(), 0, "releases saturate at zero");
    }
}

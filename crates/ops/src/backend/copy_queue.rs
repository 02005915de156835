//! [`CopyQueue`]: copies on a second queue, ordered against compute by markers.
//!
//! A device backend has two queues: compute (every op of [`Compute`](crate::Compute) and the
//! extension traits, and every allocation, fill and free of [`Memory`](crate::Memory)) and copy.
//! Nothing orders one against the other except these markers, so copies overlap compute. The
//! caller (the weight streamer) keeps it correct:
//! * compute reading a tensor that a copy wrote: `compute_wait(&copy_marker()?)` in between;
//! * a copy overwriting a tensor that compute reads or writes: `copy_wait(&compute_marker()?)`
//!   first. That includes a tensor just made by `zeros`/`upload`/`kv_zeros`: its allocation
//!   and fill are queued on the compute queue;
//! * dropping a tensor a copy may still be writing (its memory is freed on the compute
//!   queue): `compute_wait(&copy_marker()?)` or `host_wait` first;
//! * rewriting host bytes a queued copy reads: `host_wait(&copy_marker()?)` first.
//!
//! These methods may be called from another host thread while compute runs on this one. The
//! CPU backend copies immediately and its markers have always passed.

use crate::{HostBuffer, Marker, OpsError, Result, Tensor};

/// Asynchronous copies between host buffers and tensors, and the markers that order them.
pub trait CopyQueue: Send + Sync {
    /// Queues a copy of `src[offset .. offset + dst.size_bytes()]` (dst's raw little-endian
    /// elements, any dtype) into `dst` on the copy queue; the CPU backend copies immediately.
    /// Range and size errors are [`OpsError::Shape`]. Ordering: see the module notes.
    fn copy_to_device_async(&self, src: &HostBuffer, offset: usize, dst: &mut Tensor) -> Result<()>;

    /// Queues on the copy queue a copy of positions `span.pos .. span.pos + span.n` of every
    /// head of the KV cache `cache` `[n_kv, cap, d]` into the host block at `span` (see
    /// [`KvBlockSpan`]); the CPU backend copies immediately. The caller orders it after the
    /// compute that wrote those positions (`copy_wait`) and reads the host bytes only after a
    /// later `copy_marker` has passed (`host_wait`).
    fn kv_to_host_async(&self, cache: &Tensor, dst: &mut HostBuffer, span: KvBlockSpan) -> Result<()>;

    /// The reverse of [`kv_to_host_async`](Self::kv_to_host_async): host block rows into cache
    /// positions, on the copy queue (compute that reads them waits on a later `copy_marker`).
    fn kv_from_host_async(&self, src: &HostBuffer, cache: &mut Tensor, span: KvBlockSpan) -> Result<()>;

    /// A marker after every copy queued so far on the copy queue.
    fn copy_marker(&self) -> Result<Marker>;

    /// A marker after all compute queued so far (the compute queue).
    fn compute_marker(&self) -> Result<Marker>;

    /// Compute queued after this call waits (on the device; the host does not block) for `m`.
    fn compute_wait(&self, m: &Marker) -> Result<()>;

    /// Copies queued after this call wait (on the device) for `m`.
    fn copy_wait(&self, m: &Marker) -> Result<()>;

    /// Blocks the calling host thread until `m` has passed.
    fn host_wait(&self, m: &Marker) -> Result<()>;
}

/// Where some positions of a KV cache `[n_kv, cap, d]` sit in a host block: the block holds
/// `block` positions of every head, laid out `[n_kv, block, d]` in the cache's dtype
/// (little-endian) from byte `offset` of a [`HostBuffer`]; cache positions `pos .. pos + n` are
/// block rows `row .. row + n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBlockSpan {
    pub offset: usize,
    pub block: usize,
    pub row: usize,
    pub pos: usize,
    pub n: usize,
}

impl KvBlockSpan {
    /// Checks the span against a cache of `shape` with `elem`-byte elements and a host buffer of
    /// `host_len` bytes; returns `(n_kv, cap, d)`.
    pub fn check(
        &self,
        op: &'static str,
        shape: &[usize],
        elem: usize,
        host_len: usize,
    ) -> Result<(usize, usize, usize)> {
        let &[n_kv, cap, d] = shape else {
            return Err(OpsError::Shape { op, detail: format!("cache {shape:?} is not [n_kv, cap, d]") });
        };
        let host_end =
            n_kv.checked_mul(self.block).and_then(|x| x.checked_mul(d * elem)).and_then(|x| x.checked_add(self.offset));
        if self.pos + self.n > cap || self.row + self.n > self.block || host_end.is_none_or(|e| e > host_len) {
            return Err(OpsError::Shape {
                op,
                detail: format!("{self:?} against cache {shape:?} and a host buffer of {host_len} B"),
            });
        }
        Ok((n_kv, cap, d))
    }
}

/// The error for a marker made by another backend.
pub(crate) fn foreign_marker(op: &'static str, expected: &'static str, m: &Marker) -> OpsError {
    OpsError::WrongBackend { op, expected, found: m.backend_name() }
}

//! Decode steps as CUDA graphs: one step's launches captured once, then replayed each token.
//!
//! A caller (a model's one-token decode) begins a capture with the step's token ids, its
//! position and a key naming everything the step's launches bake in (weights, KV caches,
//! tables); then runs its ordinary forward. While capturing, the ops that take a position
//! (RoPE, the KV write, decode attention) launch their `_step` kernels, which add `step[0]` of
//! the device step buffer to the position they were given, and the embedding reads its ids from
//! `step[1..]`. The step ends at its first read-back ([`Memory::to_host_f32`](crate::Memory)):
//! there the capture is instantiated and launched, and the read-back returns its logits. A
//! replay writes `[pos − captured pos, ids..]` into the step buffer (one small copy), launches
//! the graph and reads the logits back from the same address.
//!
//! What a graph stays right for is recorded as [`Limit`]s while it is captured: the rows its
//! caches and tables hold, and each decode attention's split plan (the chunk must equal the one
//! the plain path would choose at the replay's position, so that the logits are the same bit
//! for bit; the grid is sized for a context bucket, the next power of two, and slices past the
//! keys add exact zeros). A replay outside them drops the graph and the caller captures again.
//!
//! Allocations inside the capture are graph memory nodes. Those the step frees itself are
//! freed by the graph; those it leaves to its caller (the residual stream, the logits) are
//! listed by the VRAM account while capturing and freed after each replay's read-back. Graph
//! memory comes from the driver's graph pool, which the VRAM account does not see (a decode
//! step's activations: a few MB at most).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, result};

use super::{CudaDevice, DeviceBuf, driver_err};
use crate::{OpsError, Result};

/// Rows (token ids) a captured step may take.
pub const MAX_STEP_ROWS: usize = 8;

/// Captured steps kept at once (several sequences decoding in turn each have their own).
const MAX_GRAPHS: usize = 4;

/// What a captured step's launches stay right for, as a function of the replay's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// The step's rows `pos..pos + t` fit `n` rows (a KV cache's or a RoPE table's).
    Rows(usize),
    /// A decode attention launch: the plain path's split plan at the replay's span (the query
    /// span, at most the window) has this chunk and at most `splits` slices.
    Split { chunk: usize, splits: usize, window: Option<usize>, slots: usize, other_blocks: usize },
}

impl Limit {
    fn holds(&self, pos: usize, t: usize) -> bool {
        match *self {
            Limit::Rows(n) => pos + t <= n,
            Limit::Split { chunk, splits, window, slots, other_blocks } => {
                let span = window.map_or(pos + t, |w| (pos + t).min(w));
                let plan = super::flash::split_plan(span, slots, other_blocks);
                plan.chunk == chunk && plan.splits <= splits
            }
        }
    }
}

/// A step being captured.
#[derive(Debug)]
struct Capture {
    key: u64,
    pos: usize,
    t: usize,
    limits: Vec<Limit>,
}

/// A captured step: its graph, where it was captured, what it stays right for, the device
/// buffers it leaves allocated (freed after each replay) and its output (address, f32 count).
struct Step {
    key: u64,
    pos: usize,
    t: usize,
    limits: Vec<Limit>,
    graph: CudaGraph,
    escaped: Vec<u64>,
    out: (u64, usize),
}

#[derive(Default)]
struct Inner {
    /// `[pos − captured pos, ids..]`, `1 + MAX_STEP_ROWS` u32; made once, never moved.
    step_buf: Option<DeviceBuf<u32>>,
    capture: Option<Capture>,
    steps: Vec<Step>,
}

/// The captured steps of one device and the step buffer their kernels read. Owned by the
/// [`CudaDevice`]; every graph call holds its lock (graphs are not thread safe).
#[derive(Default)]
pub struct StepGraphCache {
    inner: Mutex<Inner>,
    /// Steps captured and replays run, since the device was opened.
    captures: AtomicU64,
    replays: AtomicU64,
}

// SAFETY: the CUDA graph handles inside are only touched with the mutex held, and the context
// is bound to the calling thread by every cudarc call that uses them.
unsafe impl Send for StepGraphCache {}
// SAFETY: as above; all access goes through the mutex.
unsafe impl Sync for StepGraphCache {}

impl std::fmt::Debug for StepGraphCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        write!(f, "StepGraphCache({} graphs, capturing: {})", g.steps.len(), g.capture.is_some())
    }
}

fn graph_err(detail: String) -> OpsError {
    OpsError::Backend(format!("cuda step graph: {detail}"))
}

impl StepGraphCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The step buffer's device address while a step is being captured (the `_step` kernels'
    /// last argument), else None (the plain kernels run).
    pub(crate) fn capturing_step(&self) -> Option<u64> {
        let g = self.lock();
        g.capture.as_ref()?;
        use cudarc::driver::DevicePtr;
        g.step_buf.as_ref().map(|b| b.device_ptr(b.stream()).0)
    }

    /// Records what the step being captured stays right for.
    pub(crate) fn note_limit(&self, limit: Limit) {
        if let Some(c) = self.lock().capture.as_mut() {
            c.limits.push(limit);
        }
    }

    /// Writes `[delta, ids..]` into the step buffer (made on first use) in stream order.
    fn write_step(dev: &CudaDevice, g: &mut Inner, delta: i64, ids: &[u32]) -> Result<()> {
        if ids.is_empty() || ids.len() > MAX_STEP_ROWS {
            return Err(graph_err(format!("{} ids in one step (1..={MAX_STEP_ROWS} can be captured)", ids.len())));
        }
        let delta = i32::try_from(delta).map_err(|_| graph_err(format!("position shift {delta} out of range")))?;
        if g.step_buf.is_none() {
            g.step_buf = Some(dev.alloc_zeros::<u32>(1 + MAX_STEP_ROWS, "the decode step buffer")?);
        }
        let mut host = vec![delta as u32];
        host.extend_from_slice(ids);
        let buf = g.step_buf.as_mut().ok_or_else(|| graph_err("step buffer missing".into()))?;
        let mut view = buf.slice_mut(..host.len());
        dev.stream.memcpy_htod(&host, &mut view).map_err(driver_err("step buffer write"))
    }
}

impl CudaDevice {
    /// Starts capturing a decode step of `ids` at position `pos` under `key` (see the module
    /// doc). Every launch until the step's read-back goes into the graph.
    pub fn begin_step_capture(&self, key: u64, ids: &[u32], pos: usize) -> Result<()> {
        let mut g = self.graphs.lock();
        if g.capture.is_some() {
            return Err(graph_err("a capture is already under way".into()));
        }
        StepGraphCache::write_step(self, &mut g, 0, ids)?;
        self.vram().set_capture(Some(Vec::new()));
        if let Err(e) = self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) {
            self.vram().set_capture(None);
            return Err(driver_err("begin capture")(e));
        }
        g.capture = Some(Capture { key, pos, t: ids.len(), limits: Vec::new() });
        Ok(())
    }

    /// Ends the capture at the step's read-back of `out` (address, f32 count): instantiates
    /// the graph, launches it once and keeps it. The caller then reads `out` back.
    pub(crate) fn finish_step_capture(&self, out: (u64, usize)) -> Result<()> {
        let mut g = self.graphs.lock();
        let Some(c) = g.capture.take() else { return Ok(()) };
        let ended = self.stream.end_capture(CUgraphInstantiate_flags(0));
        let escaped = self.vram().set_capture(None).unwrap_or_default();
        let graph =
            ended.map_err(driver_err("end capture"))?.ok_or_else(|| graph_err("the captured step is empty".into()))?;
        graph.launch().map_err(driver_err("graph launch"))?;
        g.steps.retain(|s| s.key != c.key);
        if g.steps.len() >= MAX_GRAPHS {
            g.steps.remove(0);
        }
        g.steps.push(Step { key: c.key, pos: c.pos, t: c.t, limits: c.limits, graph, escaped, out });
        self.graphs.captures.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Ends a capture the step did not finish (an op that cannot be captured, an error):
    /// discards it. Returns whether the step had finished as a graph (no capture was left).
    pub fn end_step_capture(&self) -> bool {
        let mut g = self.graphs.lock();
        if g.capture.take().is_none() {
            return true;
        }
        // Dropping the partial graph; its error, if any, says only that the capture broke.
        let _ = self.stream.end_capture(CUgraphInstantiate_flags(0));
        self.vram().set_capture(None);
        false
    }

    /// Replays the step kept under `key` for `ids` at `pos` and returns its output read back,
    /// or None when there is none for that key, row count and position (it is dropped; capture
    /// again).
    pub fn replay_step(&self, key: u64, ids: &[u32], pos: usize) -> Result<Option<Vec<f32>>> {
        let mut g = self.graphs.lock();
        let Some(i) = g.steps.iter().position(|s| s.key == key) else { return Ok(None) };
        let s = &g.steps[i];
        if s.t != ids.len() || !s.limits.iter().all(|l| l.holds(pos, s.t)) {
            g.steps.remove(i);
            return Ok(None);
        }
        let delta = pos as i64 - s.pos as i64;
        StepGraphCache::write_step(self, &mut g, delta, ids)?;
        let s = &g.steps[i];
        s.graph.launch().map_err(driver_err("graph replay"))?;
        let (addr, len) = s.out;
        let mut host = vec![0f32; len];
        // SAFETY: `addr` holds `len` f32 written by the graph just launched (the graph makes
        // its allocations at the same addresses every launch); the copy is waited for below.
        unsafe { result::memcpy_dtoh_async(&mut host, addr, self.stream.cu_stream()) }
            .map_err(driver_err("graph read-back"))?;
        self.stream.synchronize().map_err(driver_err("graph read-back"))?;
        for &a in &s.escaped {
            // SAFETY: a graph allocation of this launch that the step left to its caller; freed
            // once, in stream order after the read-back, before the next launch makes it again.
            unsafe { result::free_async(a, self.stream.cu_stream()) }.map_err(driver_err("graph free"))?;
        }
        self.graphs.replays.fetch_add(1, Ordering::Relaxed);
        Ok(Some(host))
    }

    /// Runs `f`'s ops as a captured step launches them — the `_step` kernels, reading the
    /// position shift `shift` and `ids` from the step buffer — but eagerly, with no graph:
    /// the direct check that each `_step` kernel at position p equals its plain form at
    /// p + shift (tests/parity_cuda_vs_cpu.rs). `f` must not read back to the host.
    #[doc(hidden)]
    pub fn run_as_step<R>(&self, shift: i64, ids: &[u32], f: impl FnOnce() -> Result<R>) -> Result<R> {
        {
            let mut g = self.graphs.lock();
            if g.capture.is_some() {
                return Err(graph_err("a capture is already under way".into()));
            }
            StepGraphCache::write_step(self, &mut g, shift, ids)?;
            g.capture = Some(Capture { key: 0, pos: 0, t: ids.len(), limits: Vec::new() });
        }
        let r = f();
        self.graphs.lock().capture = None;
        r
    }

    /// Decode steps captured and replayed so far on this device: `(captures, replays)`.
    pub fn step_graph_counts(&self) -> (u64, u64) {
        (self.graphs.captures.load(Ordering::Relaxed), self.graphs.replays.load(Ordering::Relaxed))
    }

    /// Drops every captured step (their caches or weights are about to go).
    pub fn clear_step_graphs(&self) {
        self.graphs.lock().steps.clear();
    }
}

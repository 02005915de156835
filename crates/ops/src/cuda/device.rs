//! Finding a usable CUDA device without ever panicking, and allocating on it.
//!
//! cudarc panics when a library it needs cannot be loaded, so every library is checked for
//! first, and context creation runs under `catch_unwind` as a last guard. All device memory is
//! allocated through [`CudaDevice::alloc_zeros`], [`CudaDevice::upload`] or
//! [`CudaDevice::alloc_uninit`], which reserve it in the device's [`VramAccount`] first.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use super::cublas::{Blas, workspace_bytes};
use super::nvrtc_cache::KernelCache;
use super::transfer::PinnedAccount;
use super::vram::{DeviceBuf, VramAccount, human};
use crate::error::MemoryLimit;
use crate::{OpsError, Result};

/// What the driver reports about the chosen device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_bytes: usize,
    /// Free right after the context (and the cuBLAS handle) were created.
    pub free_bytes: usize,
}

/// An open device: its context, the stream compute is queued on, the stream streamed weights
/// are copied on, the VRAM account every allocation goes through, the account of pinned host
/// bytes, the cuBLAS handle (bound to the compute stream), reusable scratch buffers, the kernel
/// cache and the modules loaded from it (one per kernel file, loaded on first use).
///
/// Shared by several host threads (a streamer queues copies while the main thread computes):
/// every driver call binds the context to the calling thread first.
#[derive(Debug)]
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    /// The compute stream: every op, allocation, fill and free, in program order.
    pub stream: Arc<CudaStream>,
    /// Host-to-device copies of streamed weights; ordered against `stream` only by markers.
    pub copy_stream: Arc<CudaStream>,
    pub info: DeviceInfo,
    pub kernels: KernelCache,
    vram: Arc<VramAccount>,
    pub(crate) pinned: Arc<PinnedAccount>,
    pub(crate) blas: Mutex<Blas>,
    /// Narrowed activations for cuBLAS (bf16 or f16 bits), grown on demand, kept for reuse.
    scratch16: Mutex<Option<DeviceBuf<u16>>>,
    /// f32 partial results (split-context attention), grown on demand, kept for reuse.
    scratch32: Mutex<Option<DeviceBuf<f32>>>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Captured decode steps and the step buffer their kernels read (`graph.rs`).
    pub(crate) graphs: super::graph::StepGraphCache,
    /// Programmatic dependent launches for the decode kernels (on by default on sm_90+, off with `OLLM_CUDA_PDL=0`;
    /// `pdl.rs`); [`CudaDevice::set_programmatic_launch`].
    pdl: std::sync::atomic::AtomicBool,
}

/// Reserves `len` elements of `T` for `what` in `account`, then allocates them with `alloc`,
/// samples the driver's free memory, and wraps the slice so that dropping it releases the bytes.
fn tracked<T>(
    ctx: &CudaContext,
    account: &Arc<VramAccount>,
    len: usize,
    what: &str,
    alloc: impl FnOnce() -> std::result::Result<CudaSlice<T>, cudarc::driver::DriverError>,
) -> Result<DeviceBuf<T>> {
    let bytes = len.checked_mul(size_of::<T>()).ok_or_else(|| {
        OpsError::Backend(format!("cuda alloc for {what}: {len} elements overflow the address space"))
    })?;
    account.reserve(bytes, what)?;
    match alloc() {
        Ok(slice) => {
            if account.is_capturing() {
                // A graph memory node: no driver reading now (the graph's pool is not the
                // device's free memory), but the graph must know to free it after a replay.
                use cudarc::driver::DevicePtr;
                account.note_capture_alloc(slice.device_ptr(slice.stream()).0);
            } else if let Ok((free, _)) = ctx.mem_get_info() {
                account.note_free(free);
            }
            Ok(DeviceBuf::new(slice, bytes, account.clone()))
        }
        Err(e) => {
            account.release(bytes);
            let free = ctx.mem_get_info().ok().map(|(f, _)| f);
            if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                let total = account.total_bytes();
                return Err(OpsError::OutOfMemory {
                    what: what.to_string(),
                    requested_bytes: bytes as u64,
                    in_use_bytes: total.saturating_sub(free.unwrap_or(0)) as u64,
                    context_bytes: account.context_bytes() as u64,
                    budget_bytes: total as u64,
                    limit: MemoryLimit::Device,
                });
            }
            let free = free.map_or_else(|| "unknown".to_string(), human);
            Err(OpsError::Backend(format!(
                "cuda alloc of {} for {what} failed: {e} ({free} free on the device; another process may hold the rest, or lower --vram-budget to fail earlier)",
                human(bytes)
            )))
        }
    }
}

/// Grows the scratch buffer in `slot` to at least `len` elements and runs `f` with it.
///
/// # Safety
/// `f` must write every element before reading it (the contents are undefined).
unsafe fn with_scratch<T: DeviceRepr, R>(
    dev: &CudaDevice,
    slot: &Mutex<Option<DeviceBuf<T>>>,
    len: usize,
    what: &str,
    f: impl FnOnce(&mut DeviceBuf<T>) -> Result<R>,
) -> Result<R> {
    let mut guard = slot.lock().map_err(|_| unavailable("scratch buffer lock poisoned"))?;
    if guard.as_ref().is_none_or(|b| b.len() < len) {
        // Free the old buffer before reserving the larger one.
        *guard = None;
        // SAFETY: forwarded to the caller.
        *guard = Some(unsafe { dev.alloc_uninit::<T>(len, what) }?);
    }
    match guard.as_mut() {
        Some(buf) => f(buf),
        None => Err(unavailable("scratch buffer missing")),
    }
}

impl CudaDevice {
    /// `len` zeroed elements for `what` (named in the error if the budget is exceeded).
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize, what: &str) -> Result<DeviceBuf<T>> {
        tracked(&self.ctx, &self.vram, len, what, || self.stream.alloc_zeros::<T>(len))
    }

    /// A copy of `host` on the device.
    pub fn upload<T: DeviceRepr>(&self, host: &[T], what: &str) -> Result<DeviceBuf<T>> {
        if self.vram.is_capturing() {
            // A copy from pageable host memory cannot be replayed: the step is not capturable.
            return Err(unavailable(format!("cuda upload of {what} inside a captured decode step")));
        }
        tracked(&self.ctx, &self.vram, host.len(), what, || self.stream.clone_htod(host))
    }

    /// `len` elements whose contents are undefined until written.
    ///
    /// # Safety
    /// The caller must write every element before any kernel or copy reads it.
    pub unsafe fn alloc_uninit<T: DeviceRepr>(&self, len: usize, what: &str) -> Result<DeviceBuf<T>> {
        // SAFETY: forwarded to the caller.
        tracked(&self.ctx, &self.vram, len, what, || unsafe { self.stream.alloc::<T>(len) })
    }

    /// The VRAM account: budget, context overhead, tracked and peak bytes.
    /// Turns programmatic dependent launches of the decode kernels on or off (the
    /// `OLLM_CUDA_PDL` default; on only takes on sm_90 and later). Returns whether they are on.
    pub fn set_programmatic_launch(&self, on: bool) -> bool {
        let on = on && self.info.compute_capability.0 >= 9;
        self.pdl.store(on, std::sync::atomic::Ordering::Relaxed);
        on
    }

    /// Whether the decode kernels are launched programmatically dependent (`pdl.rs`).
    pub(crate) fn pdl(&self) -> bool {
        self.pdl.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn vram(&self) -> &VramAccount {
        &self.vram
    }

    /// Sets the hard VRAM budget (`--vram-budget`), counting the CUDA context.
    pub fn set_vram_budget(&self, bytes: usize) -> Result<()> {
        self.vram.set_budget(bytes)
    }

    /// Bytes held by live allocations made through this device.
    pub fn used_bytes(&self) -> usize {
        self.vram.used_bytes()
    }

    /// Peak device memory in use as the driver reported it (total − lowest free reading, sampled
    /// after every allocation), the CUDA context included.
    pub fn peak_used_bytes(&self) -> usize {
        self.vram.peak_used_bytes()
    }

    /// Page-locked host bytes held by live [`HostBuffer`](crate::HostBuffer)s of this device
    /// (host RAM, not counted in the VRAM account).
    pub fn pinned_bytes(&self) -> usize {
        self.pinned.live_bytes()
    }

    /// The most page-locked host bytes held at once.
    pub fn peak_pinned_bytes(&self) -> usize {
        self.pinned.peak_bytes()
    }

    /// Runs `f` with the 16-bit scratch buffer, grown to at least `len` elements first. The
    /// buffer is kept for the next call (its bytes stay in the account); work is stream-ordered,
    /// so reusing it across calls is safe.
    pub(crate) fn with_scratch16<R>(&self, len: usize, f: impl FnOnce(&mut DeviceBuf<u16>) -> Result<R>) -> Result<R> {
        // SAFETY: the scratch is written (converted activations) before every read.
        unsafe { with_scratch(self, &self.scratch16, len, "activation scratch for cuBLAS", f) }
    }

    /// Runs `f` with the f32 scratch buffer (at least `len` elements), kept like
    /// [`with_scratch16`](Self::with_scratch16)'s.
    ///
    /// # Safety
    /// `f` must write every element it reads.
    pub(crate) unsafe fn with_scratch32<R>(
        &self,
        len: usize,
        what: &str,
        f: impl FnOnce(&mut DeviceBuf<f32>) -> Result<R>,
    ) -> Result<R> {
        // SAFETY: forwarded to the caller.
        unsafe { with_scratch(self, &self.scratch32, len, what, f) }
    }

    /// Kernel `func` of the kernel file `file` (its source text `source`), compiling and loading
    /// the file on first use.
    pub fn function(&self, file: &'static str, source: &str, func: &str) -> Result<CudaFunction> {
        let module = self.module(file, source, None)?;
        module.load_function(func).map_err(|e| unavailable(format!("{file}.cu: {func}: {e}")))
    }

    /// As [`CudaDevice::function`] for a file compiled for `arch` (e.g. `sm_90a`) instead of the
    /// device's own architecture; `file` must always be asked for with the same `arch`.
    pub fn function_for_arch(
        &self,
        file: &'static str,
        source: &str,
        func: &str,
        arch: &'static str,
    ) -> Result<CudaFunction> {
        let module = self.module(file, source, Some(arch))?;
        module.load_function(func).map_err(|e| unavailable(format!("{file}.cu ({arch}): {func}: {e}")))
    }
}

/// Every kernel file the backend launches from, by the name [`CudaDevice::function`] knows it.
pub(crate) const KERNEL_FILES: &[(&str, &str)] = &[
    ("attention", super::attention::SOURCE),
    ("convert", super::convert::SOURCE),
    ("decode_attn", super::flash::DECODE_SOURCE),
    ("deltanet", super::deltanet::SOURCE),
    ("elementwise", super::elementwise::SOURCE),
    ("flash_attn", super::flash::FLASH_SOURCE),
    ("gemv", super::gemv::SOURCE),
    ("matmul", super::matmul::SOURCE),
    ("moe", super::moe::SOURCE),
    ("rmsnorm", super::rmsnorm::SOURCE),
    ("rope", super::rope::SOURCE),
];

impl CudaDevice {
    /// Compiles (where the disk cache lacks them) and loads every kernel file now, in parallel,
    /// so that the first prompt does not pay for it. Returns how many files NVRTC compiled and
    /// the seconds it all took.
    pub fn warm_kernels(&self) -> Result<(usize, f64)> {
        let started = std::time::Instant::now();
        let results: Vec<Result<bool>> = std::thread::scope(|s| {
            let mut handles: Vec<_> = KERNEL_FILES
                .iter()
                .map(|&(file, source)| {
                    s.spawn(move || -> Result<bool> {
                        let cached = self.kernels.is_cached(file, source);
                        self.module(file, source, None)?;
                        Ok(!cached)
                    })
                })
                .collect();
            // The Hopper-only file, compiled for its own architecture where it will run.
            if super::flash_sm90::sm90_available(self) {
                handles.push(s.spawn(move || -> Result<bool> {
                    let (file, source, arch) =
                        ("flash_attn_sm90", super::flash_sm90::SM90_SOURCE, super::flash_sm90::SM90_ARCH);
                    let cached = self.kernels.is_cached_for_arch(file, source, arch);
                    self.module(file, source, Some(arch))?;
                    Ok(!cached)
                }));
            }
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(unavailable("a kernel compile thread panicked"))))
                .collect()
        });
        let mut compiled = 0;
        for r in results {
            compiled += usize::from(r?);
        }
        Ok((compiled, started.elapsed().as_secs_f64()))
    }

    /// The loaded module of kernel file `file` (for `arch`, else the device's architecture),
    /// compiling and loading it on first use.
    fn module(&self, file: &'static str, source: &str, arch: Option<&str>) -> Result<Arc<cudarc::driver::CudaModule>> {
        if let Some(m) = self.modules.lock().map_err(|_| unavailable("kernel module cache poisoned"))?.get(file) {
            return Ok(m.clone());
        }
        // Compiled and loaded outside the lock, so files compile in parallel; a racing twin
        // loses nothing but the time.
        let m = self
            .ctx
            .load_module(match arch {
                Some(a) => self.kernels.ptx_for_arch(file, source, a)?,
                None => self.kernels.ptx(file, source)?,
            })
            .map_err(|e| unavailable(format!("{file}.cu: loading the module: {e}")))?;
        let mut modules = self.modules.lock().map_err(|_| unavailable("kernel module cache poisoned"))?;
        Ok(modules.entry(file).or_insert(m).clone())
    }
}

fn unavailable(detail: impl Into<String>) -> OpsError {
    OpsError::Backend(detail.into())
}

/// Opens device `ordinal`, or explains in one line what is missing and how to provide it.
pub fn probe(ordinal: usize) -> Result<CudaDevice> {
    // SAFETY: these only try to dlopen the library; nothing is called through it yet.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(unavailable(
            "no CUDA driver found (libcuda.so): install the NVIDIA driver, or run with --device cpu",
        ));
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(unavailable(
            "NVRTC not found (libnvrtc.so): install the CUDA toolkit and add its lib64 to LD_LIBRARY_PATH, or run with --device cpu",
        ));
    }
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(unavailable(
            "cuBLAS not found (libcublas.so): install the CUDA toolkit and add its lib64 to LD_LIBRARY_PATH, or run with --device cpu",
        ));
    }
    let ctx = catch_unwind(AssertUnwindSafe(|| CudaContext::new(ordinal)))
        .map_err(|_| {
            unavailable("the CUDA driver could not be initialised (library load failed); run with --device cpu")
        })?
        .map_err(|e| {
            unavailable(format!(
                "cannot open CUDA device {ordinal}: {e} (check nvidia-smi; --device cpu runs without a GPU)"
            ))
        })?;
    // Event tracking, off. cudarc 0.19 gives every CudaSlice a read and a write event, used
    // once a context has a second stream while tracking is on (its default): every kernel
    // argument, memcpy and memset then makes its stream wait for the buffer's last write (and,
    // when it writes, its last read) and re-records the event after, and a drop waits for both.
    // The copy stream would then wait for the compute that last touched a destination, and
    // compute for the copy that last wrote an input: per-buffer waits, decided by which host
    // thread happened to enqueue first, on top of the markers the streamer orders with, and two
    // more driver calls per buffer argument of every launch (thousands per decoded token). It
    // would not serialise the streams wholesale, but it would hide a missing marker (a test of
    // the markers could not fail). With tracking off no slice carries events, and ordering is
    // exactly: program order on each stream (all ops, allocations, fills and frees are queued
    // on `stream`, which is all the single-stream paths ever relied on; tracking was inactive
    // for them anyway) and the markers between the two streams (the caller's obligations are
    // listed with Backend's streaming methods).
    // SAFETY: called before any slice or stream exists on this context object, so no slice
    // was created with tracking; cross-stream ordering is the streaming methods' contract.
    unsafe { ctx.disable_event_tracking() };
    let err = |what: &str, e: cudarc::driver::DriverError| unavailable(format!("CUDA device {ordinal}: {what}: {e}"));
    let name = ctx.name().map_err(|e| err("name", e))?;
    let compute_capability = ctx.compute_capability().map_err(|e| err("compute capability", e))?;
    let kernels = KernelCache::new(compute_capability)?;
    // A stream of its own, not the legacy default stream: only such a stream can be captured
    // into a CUDA graph (graph.rs). Like the copy stream it is non-blocking, so the two are
    // ordered by the markers alone, as before.
    let stream = ctx.new_stream().map_err(|e| err("compute stream", e))?;
    // A non-blocking stream: it does not synchronise with the legacy default `stream`.
    let copy_stream = ctx.new_stream().map_err(|e| err("copy stream", e))?;
    // The cuBLAS handle first, without its workspace, so that what it takes for itself counts
    // as context overhead; then the reading every budget check starts from.
    let mut blas = catch_unwind(AssertUnwindSafe(|| Blas::new(stream.clone()))).map_err(|_| {
        unavailable("cuBLAS could not be loaded (libcublas.so): install the CUDA toolkit and add its lib64 to LD_LIBRARY_PATH, or run with --device cpu")
    })??;
    let (free_bytes, total_bytes) = ctx.mem_get_info().map_err(|e| err("memory info", e))?;
    let info = DeviceInfo { ordinal, name, compute_capability, total_bytes, free_bytes };
    let vram = Arc::new(VramAccount::new(total_bytes, free_bytes));
    let ws_bytes = workspace_bytes(compute_capability);
    let workspace = tracked(&ctx, &vram, ws_bytes, "the cuBLAS workspace", || stream.alloc_zeros::<u8>(ws_bytes))?;
    blas.set_workspace(workspace)?;
    Ok(CudaDevice {
        ctx,
        stream,
        copy_stream,
        info,
        kernels,
        vram,
        pinned: Arc::new(PinnedAccount::default()),
        blas: Mutex::new(blas),
        scratch16: Mutex::new(None),
        scratch32: Mutex::new(None),
        modules: Mutex::new(HashMap::new()),
        graphs: super::graph::StepGraphCache::default(),
        pdl: std::sync::atomic::AtomicBool::new(super::pdl::wanted(compute_capability)),
    })
}

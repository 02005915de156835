//! Streaming decoder layers through a few device slots (docs/architecture.md §3).
//!
//! Layers the planner did not make resident live in pinned RAM (read once at load) or stay on
//! disk (read every pass with O_DIRECT into pinned staging buffers). A streamer thread walks the
//! streamed layers in order, endlessly: for job `j` (streamed layer `j mod n`, device slot
//! `j mod k`) it first gets the bytes (a disk read, overlapping everything else), then makes the
//! copy stream wait on the device until the compute of job `j − k`, the slot's previous user,
//! is done, queues the host-to-device copies and hands the compute side a marker. The compute
//! side waits on that marker on the device only, runs the layer, and returns a marker that frees
//! the slot. The host never blocks on the GPU except when the disk itself is the bottleneck.
//!
//! Slots start out holding the first `k` streamed layers, so the first pass needs no copy for
//! them, and the thread runs ahead into the next pass while the current one finishes: the reads
//! for the next token start as soon as a slot frees up.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use ollm_io::direct::{ALIGN, AlignedBuf, DirectFile, READERS, aligned_span};
use ollm_ops::{Backend, HostBuffer, Marker, OpsError, Tensor};

use crate::{ResidencyError, Result};

/// A layer whose tensors can be refilled by name (the suffix after `model.layers.{l}.`).
pub trait LayerTensors: Send + 'static {
    fn tensor_mut(&mut self, suffix: &str) -> Option<&mut Tensor>;

    /// The suffixes of the tensors this layer holds: what a streamed copy refills.
    fn suffixes(&self) -> Vec<&'static str>;
}

/// Where a decoder layer's weights are when it runs.
enum LayerHome<L> {
    Resident(Box<L>),
    /// Its group's stream and its position among that group's streamed layers.
    Streamed(usize, usize),
}

/// A model's decoder layers placed as a [`crate::plan::Placement`] says: resident on the
/// backend, or streamed through device slots from pinned RAM or the disk. Layers of different
/// shapes (Qwen3-Next's DeltaNet and attention layers) stream in separate groups, each with
/// its own `placement.slots` slots and streamer thread.
pub struct PlacedLayers<L: LayerTensors> {
    homes: Vec<LayerHome<L>>,
    streams: Vec<Option<LayerStream<L>>>,
}

impl<L: LayerTensors> std::fmt::Debug for PlacedLayers<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlacedLayers").field("layers", &self.homes.len()).field("streams", &self.streams).finish()
    }
}

impl<L: LayerTensors> PlacedLayers<L> {
    /// Loads `n_layers` layers of one shape with `load(l)`: see [`PlacedLayers::load_grouped`].
    pub fn load<E: From<ResidencyError>>(
        backend: &Arc<dyn Backend>,
        catalog: &ollm_weights::Catalog,
        placement: &crate::plan::Placement,
        n_layers: usize,
        load: impl FnMut(usize) -> std::result::Result<L, E>,
    ) -> std::result::Result<Self, E> {
        Self::load_grouped(backend, catalog, placement, n_layers, |_| 0, load)
    }

    /// Loads `n_layers` layers with `load(l)`: those `placement` keeps on the device, and per
    /// group (`group(l)`: layers of one group share a tensor layout) the first `placement.slots`
    /// streamed ones into that group's slots, which start out holding them. A group streams
    /// when it has more streamed layers than slots; otherwise its layers are simply resident.
    pub fn load_grouped<E: From<ResidencyError>>(
        backend: &Arc<dyn Backend>,
        catalog: &ollm_weights::Catalog,
        placement: &crate::plan::Placement,
        n_layers: usize,
        group: impl Fn(usize) -> usize,
        mut load: impl FnMut(usize) -> std::result::Result<L, E>,
    ) -> std::result::Result<Self, E> {
        if placement.tiers.len() != n_layers {
            return Err(ResidencyError::Stream(format!(
                "the placement covers {} layers, the model has {n_layers}",
                placement.tiers.len()
            ))
            .into());
        }
        let n_groups = (0..n_layers).map(|l| group(l) + 1).max().unwrap_or(0);
        let streamed: Vec<Vec<usize>> = (0..n_groups)
            .map(|g| {
                (0..n_layers).filter(|&l| group(l) == g && placement.tiers[l] != crate::plan::Tier::Vram).collect()
            })
            .collect();
        let k = placement.slots;
        let streaming = |g: usize| k > 0 && streamed[g].len() > k;
        let mut homes = Vec::with_capacity(n_layers);
        let mut slots: Vec<Vec<L>> = (0..n_groups).map(|_| Vec::new()).collect();
        for l in 0..n_layers {
            let g = group(l);
            match streamed[g].iter().position(|&s| s == l) {
                Some(pos) if streaming(g) => {
                    if pos < k {
                        slots[g].push(load(l)?);
                    }
                    homes.push(LayerHome::Streamed(g, pos));
                }
                _ => homes.push(LayerHome::Resident(Box::new(load(l)?))),
            }
        }
        let mut streams = Vec::with_capacity(n_groups);
        for (g, slots) in slots.into_iter().enumerate() {
            if !streaming(g) {
                streams.push(None);
                continue;
            }
            let suffixes = slots.first().map(L::suffixes).unwrap_or_default();
            let specs = streamed_layers(catalog, &streamed[g], &suffixes, &placement.tiers)?;
            let files = catalog.file_paths();
            let stream = LayerStream::new(backend.clone(), files, specs, slots, placement.staging_buffers)?;
            streams.push(Some(stream));
        }
        Ok(Self { homes, streams })
    }

    pub fn len(&self) -> usize {
        self.homes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.homes.is_empty()
    }

    /// Runs `f` on layer `l` once its weights are on the device. Layers must be asked for in
    /// order, as [`LayerStream::with_layer`] says.
    pub fn with_layer<R, E: From<ResidencyError>>(
        &self,
        l: usize,
        f: impl FnOnce(&L) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        match self.homes.get(l) {
            Some(LayerHome::Resident(layer)) => f(layer),
            Some(LayerHome::Streamed(g, i)) => match self.streams.get(*g) {
                Some(Some(stream)) => stream.with_layer(*i, f),
                _ => Err(ResidencyError::Stream(format!("layer {l} is streamed but no streamer runs")).into()),
            },
            None => Err(ResidencyError::Stream(format!("layer {l} of {}", self.homes.len())).into()),
        }
    }

    /// Weight-streaming counters, summed over the groups, when some layers are streamed.
    pub fn stream_stats(&self) -> Option<StreamStats> {
        self.streams.iter().flatten().map(LayerStream::stats).reduce(|a, b| StreamStats {
            disk_bytes: a.disk_bytes + b.disk_bytes,
            read_bytes: a.read_bytes + b.read_bytes,
            disk_secs: a.disk_secs + b.disk_secs,
            copy_bytes: a.copy_bytes + b.copy_bytes,
            wait_secs: a.wait_secs + b.wait_secs,
            layers_streamed: a.layers_streamed + b.layers_streamed,
            pinned_bytes: a.pinned_bytes + b.pinned_bytes,
            ram_layers: a.ram_layers + b.ram_layers,
            disk_layers: a.disk_layers + b.disk_layers,
            slots: a.slots + b.slots,
        })
    }
}

/// Where one tensor of a streamed layer is in the checkpoint.
#[derive(Debug, Clone)]
pub struct Part {
    pub suffix: String,
    /// Index into the stream's file list.
    pub file: usize,
    pub offset: u64,
    pub len: u64,
}

/// How a streamed layer's parts are read: each run of its tensors that lie together in a file
/// (gaps of at most [`MERGE_GAP`] bytes between them are read too) is one aligned span read as a
/// whole, at a given position of the buffer. Files written by the `safetensors` library order
/// tensors by dtype, then by name, so one layer's tensors can sit far apart in a file (f32 norms
/// beside the other layers' f32 norms, bf16 matrices elsewhere): reading from its first byte to
/// its last would read most of the file.
#[derive(Debug, Clone)]
struct ReadPlan {
    /// (file, aligned span start, span end, buffer position)
    spans: Vec<(usize, u64, u64, usize)>,
    /// Buffer offset of each part's first byte.
    part_offsets: Vec<usize>,
    /// Buffer bytes needed.
    buf_bytes: usize,
}

/// Bytes between two of a layer's tensors in one file that are read rather than skipped: one
/// more request (≈50 µs on an NVMe drive) costs about as much as reading this much at 2-3 GB/s.
const MERGE_GAP: u64 = 128 << 10;

fn read_plan(parts: &[Part]) -> ReadPlan {
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by_key(|&i| (parts[i].file, parts[i].offset));
    // Aligned (file, start, end) runs, in file and offset order.
    let mut runs: Vec<(usize, u64, u64)> = Vec::new();
    for &i in &order {
        let p = &parts[i];
        let (start, end) = aligned_span(p.offset, p.len as usize);
        match runs.last_mut() {
            Some(r) if r.0 == p.file && start <= r.2.saturating_add(MERGE_GAP) => r.2 = r.2.max(end),
            _ => runs.push((p.file, start, end)),
        }
    }
    let mut spans = Vec::with_capacity(runs.len());
    let mut pos = 0usize;
    for (file, start, end) in runs {
        spans.push((file, start, end, pos));
        pos += (end - start) as usize;
    }
    let part_offsets = parts
        .iter()
        .map(|p| {
            let inside = |s: &&(usize, u64, u64, usize)| s.0 == p.file && s.1 <= p.offset && p.offset + p.len <= s.2;
            let &(_, start, _, at) = spans.iter().find(inside).unwrap_or(&(0, 0, 0, 0));
            at + (p.offset - start) as usize
        })
        .collect();
    ReadPlan { spans, part_offsets, buf_bytes: pos.max(ALIGN) }
}

/// Reads a layer's spans into `buf` (4096-aligned), each with [`READERS`] parallel readers.
fn read_layer(files: &[DirectFile], plan: &ReadPlan, buf: &mut [u8]) -> Result<()> {
    for &(file, start, end, at) in &plan.spans {
        files[file].read_span_parallel(start, end, &mut buf[at..], READERS)?;
    }
    Ok(())
}

/// Bytes and time of one [`read_pass`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadPass {
    /// Bytes of the layers' tensors (what the streamer counts).
    pub bytes: u64,
    /// Bytes actually read: the aligned spans around them.
    pub span_bytes: u64,
    pub secs: f64,
    /// False where the filesystem refused O_DIRECT (the page cache was involved).
    pub direct: bool,
}

impl ReadPass {
    /// Tensor bytes per second.
    pub fn bytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.secs.max(1e-9)
    }
}

/// Reads `layers` (each a layer's parts in `files`) once, one after another, exactly as the
/// streamer reads a disk-tier layer (aligned spans, [`READERS`] readers, O_DIRECT), and times
/// it: the disk bound of one pass, measured on the bytes the streamer moves.
pub fn read_pass(files: &[PathBuf], layers: &[Vec<Part>]) -> Result<ReadPass> {
    let files: Vec<DirectFile> = files.iter().map(|p| DirectFile::open(p)).collect::<std::result::Result<_, _>>()?;
    let plans: Vec<ReadPlan> = layers.iter().map(|l| read_plan(l)).collect();
    let mut buf = AlignedBuf::new(plans.iter().map(|p| p.buf_bytes).max().unwrap_or(ALIGN));
    let started = Instant::now();
    for plan in &plans {
        read_layer(&files, plan, buf.as_mut_slice())?;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(ReadPass {
        bytes: layers.iter().flatten().map(|p| p.len).sum(),
        span_bytes: plans.iter().flat_map(|p| &p.spans).map(|&(_, s, e, _)| e - s).sum(),
        secs,
        direct: files.iter().all(DirectFile::is_direct),
    })
}

/// Where a streamed layer's bytes wait between uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Home {
    /// Pinned host memory, read once at load.
    Ram,
    /// The checkpoint, read every pass.
    Disk,
}

/// One streamed layer as given to [`LayerStream::new`].
#[derive(Debug, Clone)]
pub struct StreamedLayer {
    /// The decoder layer index (for messages).
    pub layer: usize,
    pub parts: Vec<Part>,
    pub home: Home,
}

/// The streamed layers' specs: for each of `streamed` (decoder layer indices, in compute order),
/// where its tensors named by `suffixes` are in the catalog, at home in RAM or on disk as
/// `tiers` says. Streamed layers share one slot layout, so every one must match the first's
/// shapes and dtypes.
pub fn streamed_layers(
    catalog: &ollm_weights::Catalog,
    streamed: &[usize],
    suffixes: &[&str],
    tiers: &[crate::plan::Tier],
) -> Result<Vec<StreamedLayer>> {
    let name = |l: usize, s: &str| format!("model.layers.{l}.{s}");
    let mut specs = Vec::with_capacity(streamed.len());
    for &l in streamed {
        let mut parts = Vec::with_capacity(suffixes.len());
        for s in suffixes {
            let n = name(l, s);
            let entry = catalog.get(&n).ok_or_else(|| ResidencyError::Stream(format!("tensor {n} missing")))?;
            let first = catalog.get(&name(streamed[0], s));
            if first.map(|f| (&f.shape, f.dtype)) != Some((&entry.shape, entry.dtype)) {
                return Err(ResidencyError::Stream(format!(
                    "{n} differs in shape or dtype from layer {}'s; streamed layers must match",
                    streamed[0]
                )));
            }
            parts.push(Part {
                suffix: (*s).to_string(),
                file: entry.file,
                offset: entry.offset_bytes,
                len: entry.len_bytes,
            });
        }
        let home = if tiers.get(l) == Some(&crate::plan::Tier::Ram) { Home::Ram } else { Home::Disk };
        specs.push(StreamedLayer { layer: l, parts, home });
    }
    Ok(specs)
}

struct Streamed {
    layer: usize,
    parts: Vec<Part>,
    plan: ReadPlan,
    /// Some for layers kept in pinned RAM.
    ram: Option<HostBuffer>,
}

/// Counters the streamer and the compute side update (bytes and nanoseconds).
#[derive(Debug, Default)]
pub struct StreamCounters {
    /// Tensor bytes of the layers read from disk.
    pub disk_bytes: AtomicU64,
    /// Bytes those reads moved: the aligned runs around the tensors (see `ReadPlan`).
    pub read_bytes: AtomicU64,
    pub disk_nanos: AtomicU64,
    pub copy_bytes: AtomicU64,
    /// Time the compute side spent blocked waiting for a layer's bytes.
    pub wait_nanos: AtomicU64,
    pub layers_streamed: AtomicU64,
}

/// A snapshot of [`StreamCounters`], plus the fixed sizes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamStats {
    /// Tensor bytes of the layers read from disk.
    pub disk_bytes: u64,
    /// Bytes those reads moved (aligned runs around the tensors, small gaps included).
    pub read_bytes: u64,
    pub disk_secs: f64,
    pub copy_bytes: u64,
    pub wait_secs: f64,
    pub layers_streamed: u64,
    /// Pinned host bytes: cached layers plus staging buffers.
    pub pinned_bytes: u64,
    pub ram_layers: usize,
    pub disk_layers: usize,
    pub slots: usize,
}

struct MainSide {
    job: u64,
    ready_rx: Receiver<Result<(u64, Marker)>>,
    done_tx: Option<Sender<Marker>>,
}

/// The device slots and the thread that fills them.
pub struct LayerStream<L: LayerTensors> {
    backend: Arc<dyn Backend>,
    slots: Arc<Vec<Mutex<L>>>,
    n: usize,
    main: Mutex<MainSide>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<StreamCounters>,
    pinned_bytes: u64,
    ram_layers: usize,
    disk_layers: usize,
}

impl<L: LayerTensors> std::fmt::Debug for LayerStream<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerStream").field("streamed", &self.n).field("slots", &self.slots.len()).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| ResidencyError::Stream("a streaming lock was poisoned by an earlier panic".into()))
}

impl<L: LayerTensors> LayerStream<L> {
    /// Starts streaming `layers` (in compute order) through `slots`, which must already hold the
    /// first `slots.len()` of them. Layers at home in RAM are read into pinned memory now; disk
    /// layers get `staging` pinned buffers (at least 2 when any layer is on disk).
    pub fn new(
        backend: Arc<dyn Backend>,
        files: Vec<PathBuf>,
        layers: Vec<StreamedLayer>,
        slots: Vec<L>,
        staging: usize,
    ) -> Result<Self> {
        let (n, k) = (layers.len(), slots.len());
        if k == 0 || n <= k {
            return Err(ResidencyError::Stream(format!("{n} streamed layers need more than {k} slots' worth")));
        }
        let files: Vec<DirectFile> =
            files.iter().map(|p| DirectFile::open(p)).collect::<std::result::Result<_, _>>()?;
        let mut pinned = 0u64;
        let mut streamed = Vec::with_capacity(n);
        for l in layers {
            let plan = read_plan(&l.parts);
            let ram = match l.home {
                Home::Ram => {
                    let mut buf = backend.host_alloc(plan.buf_bytes)?;
                    read_layer(&files, &plan, buf.as_mut_slice())?;
                    pinned += buf.len() as u64;
                    Some(buf)
                }
                Home::Disk => None,
            };
            streamed.push(Streamed { layer: l.layer, parts: l.parts, plan, ram });
        }
        let ram_layers = streamed.iter().filter(|s| s.ram.is_some()).count();
        let disk_layers = n - ram_layers;
        let staging_bytes = streamed.iter().filter(|s| s.ram.is_none()).map(|s| s.plan.buf_bytes).max().unwrap_or(0);
        let staging: Vec<HostBuffer> = if disk_layers == 0 {
            Vec::new()
        } else {
            (0..staging.max(2)).map(|_| backend.host_alloc(staging_bytes)).collect::<std::result::Result<_, _>>()?
        };
        pinned += staging.iter().map(|b| b.len() as u64).sum::<u64>();

        let slots = Arc::new(slots.into_iter().map(Mutex::new).collect::<Vec<_>>());
        let counters = Arc::new(StreamCounters::default());
        let (ready_tx, ready_rx) = channel();
        let (done_tx, done_rx) = channel();
        let worker = Worker {
            backend: backend.clone(),
            slots: slots.clone(),
            layers: streamed,
            files,
            staging,
            counters: counters.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("ollm-streamer".into())
            .spawn(move || worker.run(k as u64, ready_tx, done_rx))
            .map_err(|e| ResidencyError::Stream(format!("cannot start the streamer thread: {e}")))?;
        Ok(Self {
            backend,
            slots,
            n,
            main: Mutex::new(MainSide { job: 0, ready_rx, done_tx: Some(done_tx) }),
            thread: Some(thread),
            counters,
            pinned_bytes: pinned,
            ram_layers,
            disk_layers,
        })
    }

    /// Number of streamed layers.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Runs `f` on streamed layer `idx` (its position among the streamed layers) once its
    /// weights are in a slot. Calls must come in order 0, 1, …, n−1, 0, …; a pass cut short by
    /// an error is caught up on the next call (the skipped layers are received and released).
    pub fn with_layer<R, E: From<ResidencyError>>(
        &self,
        idx: usize,
        f: impl FnOnce(&L) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        let mut main = lock(&self.main)?;
        let mut f = Some(f);
        loop {
            if let Some(r) = self.next_job(&mut main, idx, &mut f)? {
                return r;
            }
        }
    }

    /// Runs the next job: waits for its slot's bytes, calls `f` if the job is streamed layer
    /// `idx` (Some with its result), and releases the slot.
    fn next_job<T>(&self, main: &mut MainSide, idx: usize, f: &mut Option<impl FnOnce(&L) -> T>) -> Result<Option<T>> {
        let k = self.slots.len() as u64;
        let job = main.job;
        if job >= k {
            let started = Instant::now();
            let got = main.ready_rx.recv().map_err(|_| ResidencyError::Stream("the streamer thread stopped".into()))?;
            self.counters.wait_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let (j, marker) = got?;
            if j != job {
                return Err(ResidencyError::Stream(format!("streamer delivered job {j}, expected {job}")));
            }
            self.backend.compute_wait(&marker)?;
        }
        let slot = lock(&self.slots[(job % k) as usize])?;
        let result = if (job % self.n as u64) as usize == idx { f.take().map(|f| f(&slot)) } else { None };
        drop(slot);
        let done = self.backend.compute_marker()?;
        main.job += 1;
        if let Some(tx) = &main.done_tx {
            // A closed channel means the thread is gone; the next receive reports it.
            let _ = tx.send(done);
        }
        Ok(result)
    }

    pub fn stats(&self) -> StreamStats {
        let c = &self.counters;
        StreamStats {
            disk_bytes: c.disk_bytes.load(Ordering::Relaxed),
            read_bytes: c.read_bytes.load(Ordering::Relaxed),
            disk_secs: c.disk_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            copy_bytes: c.copy_bytes.load(Ordering::Relaxed),
            wait_secs: c.wait_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            layers_streamed: c.layers_streamed.load(Ordering::Relaxed),
            pinned_bytes: self.pinned_bytes,
            ram_layers: self.ram_layers,
            disk_layers: self.disk_layers,
            slots: self.slots.len(),
        }
    }
}

impl<L: LayerTensors> Drop for LayerStream<L> {
    fn drop(&mut self) {
        // Closing the done channel ends the thread at its next wait for a slot.
        if let Ok(mut main) = self.main.lock() {
            main.done_tx = None;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Copies into the slots may still be in flight; the slots' memory is freed on the
        // compute stream, so make it wait for them.
        if let Ok(m) = self.backend.copy_marker() {
            let _ = self.backend.compute_wait(&m);
        }
    }
}

struct Worker<L: LayerTensors> {
    backend: Arc<dyn Backend>,
    slots: Arc<Vec<Mutex<L>>>,
    layers: Vec<Streamed>,
    files: Vec<DirectFile>,
    staging: Vec<HostBuffer>,
    counters: Arc<StreamCounters>,
}

impl<L: LayerTensors> Worker<L> {
    fn run(mut self, first_job: u64, ready: Sender<Result<(u64, Marker)>>, done: Receiver<Marker>) {
        let mut staging_free: Vec<Option<Marker>> = (0..self.staging.len()).map(|_| None).collect();
        let mut job = first_job;
        loop {
            match self.step(job, &mut staging_free, &done) {
                Ok(Some(marker)) => {
                    if ready.send(Ok((job, marker))).is_err() {
                        return;
                    }
                }
                Ok(None) => return, // the compute side hung up
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            }
            job += 1;
        }
    }

    /// Job `job`: bytes in, wait for the slot, queue the copies. None when the compute side is gone.
    fn step(
        &mut self,
        job: u64,
        staging_free: &mut [Option<Marker>],
        done: &Receiver<Marker>,
    ) -> Result<Option<Marker>> {
        let (n, k) = (self.layers.len() as u64, self.slots.len() as u64);
        let li = (job % n) as usize;
        let be = self.backend.clone();
        let st = if self.layers[li].ram.is_none() {
            let st = (job as usize) % self.staging.len();
            if let Some(m) = staging_free[st].take() {
                be.host_wait(&m)?;
            }
            let started = Instant::now();
            let layer = &self.layers[li];
            read_layer(&self.files, &layer.plan, self.staging[st].as_mut_slice())
                .map_err(|e| ResidencyError::Stream(format!("reading layer {} for streaming: {e}", layer.layer)))?;
            let c = &self.counters;
            c.disk_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            c.disk_bytes.fetch_add(layer.parts.iter().map(|p| p.len).sum(), Ordering::Relaxed);
            c.read_bytes.fetch_add(layer.plan.spans.iter().map(|&(_, s, e, _)| e - s).sum(), Ordering::Relaxed);
            Some(st)
        } else {
            None
        };
        // The slot's previous user is job − k: wait (on the device) until its compute is done.
        let Ok(prev) = done.recv() else { return Ok(None) };
        be.copy_wait(&prev)?;
        let layer = &self.layers[li];
        let src = match (&layer.ram, st) {
            (Some(buf), _) => buf,
            (None, Some(st)) => &self.staging[st],
            (None, None) => return Err(ResidencyError::Stream("internal: no bytes for a streamed layer".into())),
        };
        {
            let mut slot = lock(&self.slots[(job % k) as usize])?;
            for (p, &off) in layer.parts.iter().zip(&layer.plan.part_offsets) {
                let dst = slot.tensor_mut(&p.suffix).ok_or_else(|| {
                    ResidencyError::Stream(format!("layer {}: the slot has no tensor '{}'", layer.layer, p.suffix))
                })?;
                be.copy_to_device_async(src, off, dst).map_err(|e: OpsError| {
                    ResidencyError::Stream(format!("layer {} tensor {}: {e}", layer.layer, p.suffix))
                })?;
            }
        }
        let bytes: u64 = layer.parts.iter().map(|p| p.len).sum();
        self.counters.copy_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.counters.layers_streamed.fetch_add(1, Ordering::Relaxed);
        if let Some(st) = st {
            staging_free[st] = Some(be.copy_marker()?);
        }
        Ok(Some(be.copy_marker()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_plans_cover_every_part() {
        let parts = vec![
            Part { suffix: "a".into(), file: 0, offset: 5000, len: 100 },
            Part { suffix: "b".into(), file: 0, offset: 5100, len: 9000 },
            Part { suffix: "c".into(), file: 1, offset: 10, len: 3 },
        ];
        let plan = read_plan(&parts);
        assert_eq!(plan.spans, vec![(0, 4096, 16384, 0), (1, 0, 4096, 12288)]);
        assert_eq!(plan.part_offsets, vec![5000 - 4096, 5100 - 4096, 12288 + 10]);
        assert_eq!(plan.buf_bytes, 16384);
    }

    /// A layer whose tensors lie far apart in a file (as the safetensors library writes them,
    /// by dtype then name) reads each run, not the span from its first byte to its last; runs
    /// closer than MERGE_GAP are read as one.
    #[test]
    fn read_plans_read_each_run_of_a_layer() {
        let mb = 1u64 << 20;
        let parts = vec![
            Part { suffix: "norm".into(), file: 0, offset: 300 * mb + 8, len: 256 },
            Part { suffix: "q".into(), file: 0, offset: 10 * mb, len: 2 * mb },
            Part { suffix: "k".into(), file: 0, offset: 12 * mb + 64 * 1024, len: mb },
            Part { suffix: "bias".into(), file: 1, offset: 0, len: 64 },
        ];
        let plan = read_plan(&parts);
        assert_eq!(
            plan.spans,
            vec![
                (0, 10 * mb, 13 * mb + 64 * 1024, 0),
                (0, 300 * mb, 300 * mb + 4096, (3 * mb + 64 * 1024) as usize),
                (1, 0, 4096, (3 * mb + 64 * 1024) as usize + 4096),
            ]
        );
        let read: u64 = plan.spans.iter().map(|&(_, s, e, _)| e - s).sum();
        let tensors: u64 = parts.iter().map(|p| p.len).sum();
        assert!(read < tensors + 3 * 4096 + 64 * 1024, "read {read} for {tensors} tensor bytes");
        let (norm_at, q_at, k_at, bias_at) =
            (plan.part_offsets[0], plan.part_offsets[1], plan.part_offsets[2], plan.part_offsets[3]);
        assert_eq!((q_at, k_at), (0, (2 * mb + 64 * 1024) as usize));
        assert_eq!(norm_at, (3 * mb + 64 * 1024) as usize + 8);
        assert_eq!(bias_at, (3 * mb + 64 * 1024) as usize + 4096);
        assert_eq!(plan.buf_bytes, (3 * mb + 64 * 1024) as usize + 2 * 4096);
    }

    #[test]
    fn read_pass_counts_the_tensor_bytes_and_the_aligned_spans_around_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files: Vec<PathBuf> = (0..2).map(|f| dir.path().join(format!("s{f}.bin"))).collect();
        for (f, p) in files.iter().enumerate() {
            std::fs::write(p, (0..40_000u32).map(|i| (i * 31 + f as u32 * 7) as u8).collect::<Vec<u8>>())
                .expect("write shard");
        }
        let part = |suffix: &str, file, offset, len| Part { suffix: suffix.into(), file, offset, len };
        let layers = vec![
            vec![part("a", 0, 123, 5000), part("b", 0, 5123, 9000), part("c", 1, 77, 10)],
            vec![part("a", 0, 20_000, 5000), part("b", 1, 30_001, 9000)],
        ];
        let pass = read_pass(&files, &layers).expect("read pass");
        assert_eq!(pass.bytes, 5000 + 9000 + 10 + 5000 + 9000);
        // Layer 0: [0, 16384) of file 0 and [0, 4096) of file 1; layer 1: [16384, 28672) of
        // file 0 and [28672, 40960) of file 1.
        assert_eq!(pass.span_bytes, 16384 + 4096 + 12288 + 12288);
        assert!(pass.secs > 0.0 && pass.bytes_per_s() > 0.0);
        let missing = [dir.path().join("absent.bin")];
        assert!(read_pass(&missing, &layers).is_err(), "a missing shard is an error");
    }
}

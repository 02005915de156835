//! The expert cache (docs/architecture.md §3): a MoE layer's expert weights stay as the checkpoint
//! stores them — packed MXFP4 or dense — in pinned RAM or on disk, and a forward moves onto the
//! device only the experts its router picked, into a fixed set of device slots kept by LRU
//! across tokens. Just before use, an expert is unpacked on the device into one shared pair of
//! bf16 matrices in nn.Linear layout (dequantised, or transposed for dense checkpoints).
//!
//! Copies run on the backend's copy queue: while expert i computes, the copies of the next
//! few experts are already queued, each into a slot whose previous expert's compute has passed
//! (`copy_wait`), and compute waits for a slot's copy on the device only (`compute_wait`).
//! When every expert fits in the slots, they are all loaded once and the cache never misses.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use std::path::PathBuf;

use ollm_io::direct::{ALIGN, DirectFile, READ_CHUNK, READERS, aligned_span, read_spans_parallel};
use ollm_ops::{Backend, DType, HostBuffer, HostTensor, Marker, OpsError, Tensor};

use crate::{ResidencyError, Result};

/// How a checkpoint stores its experts (docs/models.md §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertFormat {
    /// `*_blocks` / `*_scales` U8 (the release checkpoints), dequantised to bf16 before use.
    Mxfp4,
    /// Qwen3-Next's hub layout (docs/models.md §4.2): `experts.{e}.{gate,up,down}_proj.weight`, one
    /// bf16 tensor per expert and matrix, already in nn.Linear layout; no biases.
    PerExpert,
    /// `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]` (as transformers saves them), transposed
    /// to `[out, in]` before use.
    Dense,
}

/// Where each expert's parts are in the checkpoint files, and what a slot holds: the family's
/// tensor names turned into spans (see `ollm_models::common::experts`).
#[derive(Debug, Clone)]
pub struct ExpertSources {
    pub format: ExpertFormat,
    /// The checkpoint files `Source::at` indexes.
    pub files: Vec<PathBuf>,
    /// Per part, in slot order (the two matrices' parts, then the gate_up and down biases):
    /// one expert's shape and dtype.
    pub parts: Vec<(Vec<usize>, DType)>,
    /// `[layer][part]`, layers as the cache's `layer_ids`.
    pub layers: Vec<Vec<Source>>,
}

/// Where the experts that do not stay on the device wait, and how many device slots they share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertPlacement {
    /// Device slots, each one expert (at least 1).
    pub slots: usize,
    /// Per decoder layer: its experts live in pinned RAM (true) or are read from disk (false).
    pub ram_layers: Vec<bool>,
}

/// Experts whose call has at most this many rows use their MXFP4 matrices packed
/// (`MoeOps::matmul_mxfp4`: decode reads 4.25 bits a weight); more rows unpack to bf16
/// once and take the GEMM path.
pub const PACKED_MAX_ROWS: usize = 8;

/// An expert read from disk goes in pieces of this many bytes over [`EXPERT_READERS`] threads.
const EXPERT_READ_PIECE: usize = 512 << 10;
const EXPERT_READERS: usize = 8;

/// One expert matrix in nn.Linear layout: unpacked (bf16) or MXFP4 blocks and scales.
#[derive(Debug, Clone, Copy)]
pub enum ExpertMatrix<'a> {
    Dense(&'a Tensor),
    Mxfp4 { blocks: &'a Tensor, scales: &'a Tensor },
}

impl<'a> ExpertMatrix<'a> {
    /// The same matrix as the ops' grouped expert calls take it.
    pub fn as_ops(&self) -> ollm_ops::ExpertMatrixRef<'a> {
        match *self {
            ExpertMatrix::Dense(w) => ollm_ops::ExpertMatrixRef::Dense(w),
            ExpertMatrix::Mxfp4 { blocks, scales } => ollm_ops::ExpertMatrixRef::Mxfp4 { blocks, scales },
        }
    }

    /// `out = x · Wᵀ (+ bias)`.
    pub fn matmul(
        &self,
        be: &dyn Backend,
        x: &Tensor,
        bias: Option<&Tensor>,
        out: &mut Tensor,
    ) -> std::result::Result<(), OpsError> {
        match *self {
            ExpertMatrix::Dense(w) => be.matmul(x, w, bias, out),
            ExpertMatrix::Mxfp4 { blocks, scales } => be.moe()?.matmul_mxfp4(x, blocks, scales, bias, out),
        }
    }
}

/// The matrices and biases one expert computes with.
#[derive(Debug)]
pub struct ExpertWeights<'a> {
    /// `[2I, H]`, gate and up rows interleaved (GPT-OSS); or the gate `[I, H]` alone when `up`
    /// is given (Qwen3-Next).
    pub gate_up: ExpertMatrix<'a>,
    pub up: Option<ExpertMatrix<'a>>,
    /// `[H, I]`
    pub down: ExpertMatrix<'a>,
    pub gate_up_bias: Option<&'a Tensor>,
    pub down_bias: Option<&'a Tensor>,
}

/// The experts of one group that [`ExpertCache::run_layer_grouped`] hands over: ids and weights.
pub type ExpertGroup<'a> = [(u32, ExpertWeights<'a>)];

/// Counters of the cache (expert loads are per layer per forward).
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    ram_loads: AtomicU64,
    disk_loads: AtomicU64,
    copy_bytes: AtomicU64,
    disk_bytes: AtomicU64,
    disk_nanos: AtomicU64,
    prefetched: AtomicU64,
    prefetch_used: AtomicU64,
}

/// A snapshot of the cache's counters and sizes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExpertStats {
    /// Expert uses served by a device slot.
    pub hits: u64,
    /// Expert uses that copied the expert from pinned RAM or read it from disk first.
    pub ram_loads: u64,
    pub disk_loads: u64,
    pub copy_bytes: u64,
    pub disk_bytes: u64,
    pub disk_secs: f64,
    pub slots: usize,
    /// Experts in all (layers × experts per layer).
    pub experts: usize,
    /// Bytes of one expert as stored.
    pub expert_bytes: u64,
    /// Pinned host bytes: experts kept in RAM plus disk staging.
    pub pinned_bytes: u64,
    /// Experts copied ahead by [`ExpertCache::prefetch`] (counted in the loads too), and how many
    /// of them a forward then used (counted as hits).
    pub prefetched: u64,
    pub prefetch_used: u64,
}

impl ExpertStats {
    /// Uses served from a slot over all uses (1 when nothing was used yet).
    pub fn hit_rate(&self) -> f64 {
        let uses = self.hits + self.ram_loads + self.disk_loads;
        if uses == 0 { 1.0 } else { self.hits as f64 / uses as f64 }
    }
}

/// Where one part of each of one layer's experts is in the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Bytes of one expert's part.
    pub len: u64,
    /// Per expert: (file, byte offset).
    pub at: Vec<(usize, u64)>,
}

/// One device slot: an expert's parts, which expert (`layer · E + e`) they hold, and when the
/// last compute that read them passes.
#[derive(Debug)]
struct Slot {
    parts: Vec<Tensor>,
    owner: Option<usize>,
    last_use: u64,
    free: Option<Marker>,
    /// The marker a prefetched copy into this slot passes, until a compute has waited for it.
    ready: Option<Marker>,
    /// Filled by a prefetch and not used since.
    prefetched: bool,
}

/// A pinned buffer for disk reads and the marker after the copies that read it.
#[derive(Debug)]
struct Staging {
    buf: HostBuffer,
    free: Option<Marker>,
}

#[derive(Debug)]
struct State {
    slots: Vec<Slot>,
    owner_of: HashMap<usize, usize>,
    tick: u64,
    staging: Vec<Staging>,
    next_staging: usize,
}

/// The unpacked matrices of the expert being computed, shared by all (None when the format
/// needs no unpacking).
#[derive(Debug)]
struct Work {
    gate_up: Option<Tensor>,
    down: Option<Tensor>,
}

/// The unpacked matrices one expert computes with, shared by all (`gate_up [2I, H]` and
/// `down [H, I]` in nn.Linear layout), for experts stored as `format` with parts of `dtypes`:
/// none when the format needs no unpacking.
fn work_shapes(format: ExpertFormat, (h, i): (usize, usize), dtypes: &[DType]) -> Vec<(Vec<usize>, DType)> {
    let dtype = |p: usize| {
        if format == ExpertFormat::Mxfp4 { DType::BF16 } else { dtypes.get(p).copied().unwrap_or(DType::BF16) }
    };
    match format {
        ExpertFormat::PerExpert => Vec::new(),
        _ => vec![(vec![2 * i, h], dtype(0)), (vec![h, i], dtype(1))],
    }
}

/// Device bytes of the unpacked matrices an [`ExpertCache`] of these experts allocates.
pub fn work_bytes(sources: &ExpertSources, (h, i): (usize, usize)) -> u64 {
    let dtypes: Vec<DType> = sources.parts.iter().map(|(_, d)| *d).collect();
    work_shapes(sources.format, (h, i), &dtypes)
        .iter()
        .map(|(s, d)| (s.iter().product::<usize>() * d.size_bytes()) as u64)
        .sum()
}

/// Copies queued ahead of the expert being computed.
const LOOKAHEAD: usize = 4;

/// The expert weights of every MoE layer of a model, and the device slots they go through.
pub struct ExpertCache {
    backend: Arc<dyn Backend>,
    format: ExpertFormat,
    n_experts: usize,
    /// `[layer][part]`
    sources: Vec<Vec<Source>>,
    /// Per layer, when its experts live in pinned RAM: the buffer and where each part's expert 0 is.
    ram: Vec<Option<(HostBuffer, Vec<Vec<usize>>)>>,
    /// The decoder layer of each row of `sources`.
    layer_ids: Vec<usize>,
    files: Vec<DirectFile>,
    expert_bytes: u64,
    pinned_bytes: u64,
    state: Mutex<State>,
    work: Mutex<Work>,
    counters: Counters,
    /// Whether the model prefetches the next layer's likely experts in decode (off by default).
    prefetch_on: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ExpertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertCache").field("format", &self.format).field("layers", &self.sources.len()).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| ResidencyError::Stream("an expert-cache lock was poisoned by an earlier panic".into()))
}

impl ExpertCache {
    /// The experts of the decoder layers `layer_ids` (`n_experts` each, hidden size `h`, width
    /// `i`) at `sources`. `placement` None: every expert is loaded onto the device now.
    /// Otherwise `placement.slots` device slots, the layers' experts read into pinned RAM now or
    /// left on disk as `ram_layers` says (indexed like `layer_ids`).
    pub fn new(
        backend: Arc<dyn Backend>,
        sources: ExpertSources,
        layer_ids: &[usize],
        n_experts: usize,
        (h, i): (usize, usize),
        placement: Option<&ExpertPlacement>,
    ) -> Result<Self> {
        let layers = layer_ids.len();
        let ExpertSources { format, files: paths, parts, layers: sources } = sources;
        if sources.len() != layers || sources.iter().any(|r| r.len() != parts.len()) {
            return Err(ResidencyError::Stream(format!(
                "expert cache: sources for {} layers of {} parts each, expected {layers} of {}",
                sources.len(),
                sources.first().map_or(0, Vec::len),
                parts.len()
            )));
        }
        let (shapes, dtypes): (Vec<Vec<usize>>, Vec<DType>) = parts.into_iter().unzip();
        let expert_bytes: u64 = sources.first().map_or(0, |r| r.iter().map(|s| s.len).sum());
        let total = layers * n_experts;
        let slot_count = placement.map_or(total, |p| p.slots.clamp(1, total.max(1)));
        let resident = slot_count >= total;

        let alloc_slot = |owner: Option<usize>| -> Result<Slot> {
            let parts = shapes
                .iter()
                .zip(&dtypes)
                .map(|(s, &d)| backend.alloc(s.clone(), d))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(Slot { parts, owner, last_use: 0, free: None, ready: None, prefetched: false })
        };
        let mut slots = Vec::with_capacity(slot_count);
        let mut owner_of = HashMap::new();
        let files: Vec<DirectFile> =
            paths.iter().map(|p| DirectFile::open(p)).collect::<std::result::Result<_, _>>()?;
        let mut ram = (0..layers).map(|_| None).collect::<Vec<_>>();
        let mut staging = Vec::new();
        let mut pinned_bytes = 0u64;
        if resident {
            // Every expert gets its own slot, filled from the checkpoint now.
            let readers: Vec<ollm_io::ReadFile> =
                paths.iter().map(|p| ollm_io::ReadFile::open(p)).collect::<std::result::Result<_, _>>()?;
            for (l, row) in sources.iter().enumerate() {
                for e in 0..n_experts {
                    let mut slot = alloc_slot(Some(l * n_experts + e))?;
                    for (p, (src, shape)) in row.iter().zip(&shapes).enumerate() {
                        let (file, offset) = src.at[e];
                        let bytes = readers[file].read_vec_at(offset, src.len as usize)?;
                        let host = HostTensor { dtype: dtypes[p], shape: shape.clone(), bytes };
                        slot.parts[p] = backend.upload(&host)?;
                    }
                    owner_of.insert(l * n_experts + e, slots.len());
                    slots.push(slot);
                }
            }
        } else {
            let placement = placement.ok_or_else(|| ResidencyError::Stream("internal: no expert placement".into()))?;
            for _ in 0..slot_count {
                slots.push(alloc_slot(None)?);
            }
            for (l, row) in sources.iter().enumerate() {
                if !placement.ram_layers.get(l).copied().unwrap_or(false) {
                    continue;
                }
                // Each part of each expert at an aligned position of one buffer; where experts lie
                // back to back in one file, in one read.
                let mut reads: Vec<(usize, u64, u64)> = Vec::new();
                let mut positions = Vec::with_capacity(row.len());
                let mut at = 0usize;
                for s in row {
                    let mut pos = Vec::with_capacity(n_experts);
                    let contiguous = s.at.windows(2).all(|w| w[1] == (w[0].0, w[0].1 + s.len));
                    if contiguous {
                        let (file, first) = s.at[0];
                        let (start, end) = aligned_span(first, (s.len * n_experts as u64) as usize);
                        pos.extend((0..n_experts).map(|e| at + (first - start) as usize + e * s.len as usize));
                        reads.push((file, start, end));
                        at += (end - start) as usize;
                    } else {
                        for &(file, offset) in &s.at {
                            let (start, end) = aligned_span(offset, s.len as usize);
                            pos.push(at + (offset - start) as usize);
                            reads.push((file, start, end));
                            at += (end - start) as usize;
                        }
                    }
                    positions.push(pos);
                }
                let mut buf = backend.host_alloc(at)?;
                // One parallel read over all the spans: per-expert spans of a few MiB each would
                // otherwise go one request at a time.
                read_spans_parallel(&files, &reads, buf.as_mut_slice(), READ_CHUNK, READERS)?;
                pinned_bytes += buf.len() as u64;
                ram[l] = Some((buf, positions));
            }
            if placement.ram_layers.iter().take(layers).any(|r| !r) || placement.ram_layers.len() < layers {
                // One expert's parts, each at an aligned position with room for its span.
                let bytes: usize = sources[0].iter().map(|s| s.len as usize + 2 * ALIGN).sum();
                for _ in 0..2 {
                    let buf = backend.host_alloc(bytes)?;
                    pinned_bytes += buf.len() as u64;
                    staging.push(Staging { buf, free: None });
                }
            }
        }
        let work = match work_shapes(format, (h, i), &dtypes).as_slice() {
            [(gate_up, g), (down, d)] => Work {
                gate_up: Some(backend.alloc(gate_up.clone(), *g)?),
                down: Some(backend.alloc(down.clone(), *d)?),
            },
            _ => Work { gate_up: None, down: None },
        };
        Ok(Self {
            backend,
            format,
            n_experts,
            sources,
            ram,
            layer_ids: layer_ids.to_vec(),
            files,
            expert_bytes,
            pinned_bytes,
            state: Mutex::new(State { slots, owner_of, tick: 0, staging, next_staging: 0 }),
            work: Mutex::new(work),
            counters: Counters::default(),
            prefetch_on: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Runs `f` for each of `experts` (distinct ids of layer `l`, in the given order) with that
    /// expert's weights on the device, moving in the ones no slot holds.
    pub fn run_layer<E: From<ResidencyError> + From<OpsError>>(
        &self,
        l: usize,
        experts: &[u32],
        rows: &dyn Fn(u32) -> usize,
        f: &mut dyn FnMut(u32, &ExpertWeights<'_>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let be = self.backend.as_ref();
        let Some(l) = self.layer_ids.iter().position(|&x| x == l) else {
            return Err(ResidencyError::Stream(format!("expert cache: layer {l} has no experts here")).into());
        };
        if let Some(&e) = experts.iter().find(|&&e| e as usize >= self.n_experts) {
            return Err(ResidencyError::Stream(format!("expert cache: expert {e} of {}", self.n_experts)).into());
        }
        let mut st = lock(&self.state)?;
        let mut work = lock(&self.work)?;
        let keys: Vec<usize> = experts.iter().map(|&e| l * self.n_experts + e as usize).collect();
        // Slots holding an expert this call still has to compute are not evicted if avoidable.
        let mut needed = vec![false; st.slots.len()];
        for k in &keys {
            if let Some(&s) = st.owner_of.get(k) {
                needed[s] = true;
            }
        }
        let mut pending: VecDeque<(usize, Option<Marker>)> = VecDeque::new();
        let mut queued = 0;
        for &e in experts {
            while queued < keys.len() && pending.len() < LOOKAHEAD {
                let force = pending.is_empty();
                match self.place(&mut st, &mut needed, keys[queued], force)? {
                    Some(p) => {
                        pending.push_back(p);
                        queued += 1;
                    }
                    None => break,
                }
            }
            let (slot, ready) = pending
                .pop_front()
                .ok_or_else(|| ResidencyError::Stream(format!("expert cache: no slot for expert {e}")))?;
            if let Some(m) = &ready {
                be.compute_wait(m)?;
            }
            st.tick += 1;
            let tick = st.tick;
            let s = &mut st.slots[slot];
            s.last_use = tick;
            needed[slot] = false;
            let packed = self.format == ExpertFormat::Mxfp4 && rows(e) <= PACKED_MAX_ROWS;
            if !packed {
                self.unpack(s, &mut work)?;
            }
            let p = &st.slots[slot].parts;
            let w = match (self.format, packed, &work.gate_up, &work.down) {
                (ExpertFormat::PerExpert, ..) => ExpertWeights {
                    gate_up: ExpertMatrix::Dense(&p[0]),
                    up: Some(ExpertMatrix::Dense(&p[1])),
                    down: ExpertMatrix::Dense(&p[2]),
                    gate_up_bias: None,
                    down_bias: None,
                },
                (_, true, ..) => ExpertWeights {
                    gate_up: ExpertMatrix::Mxfp4 { blocks: &p[0], scales: &p[1] },
                    up: None,
                    down: ExpertMatrix::Mxfp4 { blocks: &p[2], scales: &p[3] },
                    gate_up_bias: Some(&p[4]),
                    down_bias: Some(&p[5]),
                },
                (_, false, Some(gate_up), Some(down)) => ExpertWeights {
                    gate_up: ExpertMatrix::Dense(gate_up),
                    up: None,
                    down: ExpertMatrix::Dense(down),
                    gate_up_bias: Some(&p[p.len() - 2]),
                    down_bias: Some(&p[p.len() - 1]),
                },
                _ => return Err(ResidencyError::Stream("internal: no unpacked expert".into()).into()),
            };
            let done = f(e, &w);
            // The slot's bytes have been read (by the unpack or the packed matmuls): a copy
            // may refill it once the compute queued so far has run (also after an error).
            st.slots[slot].free = Some(be.compute_marker()?);
            done?;
        }
        Ok(())
    }

    /// Whether a model should call [`ExpertCache::prefetch`] in decode (off until
    /// [`ExpertCache::set_prefetch`]: on random-weight models the guesses are mostly wrong).
    pub fn prefetch_enabled(&self) -> bool {
        self.prefetch_on.load(Ordering::Relaxed)
    }

    pub fn set_prefetch(&self, on: bool) {
        self.prefetch_on.store(on, Ordering::Relaxed);
    }

    /// Queues copies of those of `experts` (ids of layer `l`, likeliest first, distinct) that no
    /// slot holds, each into the least recently used slot, without waiting: a guess at the
    /// next layer's experts made before its attention runs, so their copies overlap it. The
    /// forward that then routes exactly finds the right guesses resident (waiting for their
    /// copies on the device) and copies the rest; a wrong guess only costs bus time and an
    /// eviction, never a different result. Does nothing when every expert is resident. Returns
    /// how many copies it queued.
    pub fn prefetch(&self, l: usize, experts: &[u32]) -> Result<usize> {
        let Some(l) = self.layer_ids.iter().position(|&x| x == l) else {
            return Err(ResidencyError::Stream(format!("expert cache: layer {l} has no experts here")));
        };
        let mut st = lock(&self.state)?;
        if st.slots.len() >= self.sources.len() * self.n_experts {
            return Ok(0);
        }
        let keys: Vec<usize> = experts
            .iter()
            .filter(|&&e| (e as usize) < self.n_experts)
            .map(|&e| l * self.n_experts + e as usize)
            .collect();
        // The guesses already resident are kept; the others take the least recently used slots.
        let mut needed = vec![false; st.slots.len()];
        for k in &keys {
            if let Some(&s) = st.owner_of.get(k) {
                needed[s] = true;
            }
        }
        let mut queued = 0;
        for &key in &keys {
            if st.owner_of.contains_key(&key) {
                continue;
            }
            let Some((slot, ready)) = self.place(&mut st, &mut needed, key, false)? else { break };
            st.tick += 1;
            let tick = st.tick;
            let s = &mut st.slots[slot];
            s.last_use = tick;
            s.ready = ready;
            s.prefetched = true;
            queued += 1;
        }
        self.counters.prefetched.fetch_add(queued as u64, Ordering::Relaxed);
        Ok(queued)
    }

    /// Whether [`ExpertCache::run_layer_grouped`] can hand these experts over as stored (MXFP4
    /// or per-expert bf16); dense `[E, H, 2I]` checkpoints need a transpose per expert first.
    pub fn groups_as_stored(&self) -> bool {
        self.format != ExpertFormat::Dense
    }

    /// Runs `f` over groups of `experts` (distinct ids of layer `l`, in the given order), each
    /// group's experts all on the device together, as stored (MXFP4 packed, never unpacked):
    /// for a grouped kernel that takes a whole group in one launch. A group is every expert
    /// when the slots hold all of them, else at most half the slots, and the next group's copies
    /// are queued before `f` runs on this one, so they overlap its compute. Errors on dense
    /// checkpoints ([`ExpertCache::groups_as_stored`]).
    pub fn run_layer_grouped<E: From<ResidencyError> + From<OpsError>>(
        &self,
        l: usize,
        experts: &[u32],
        f: &mut dyn FnMut(&ExpertGroup<'_>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let be = self.backend.as_ref();
        if !self.groups_as_stored() {
            return Err(ResidencyError::Stream("expert cache: dense experts are not grouped".into()).into());
        }
        let Some(l) = self.layer_ids.iter().position(|&x| x == l) else {
            return Err(ResidencyError::Stream(format!("expert cache: layer {l} has no experts here")).into());
        };
        if let Some(&e) = experts.iter().find(|&&e| e as usize >= self.n_experts) {
            return Err(ResidencyError::Stream(format!("expert cache: expert {e} of {}", self.n_experts)).into());
        }
        let mut st = lock(&self.state)?;
        let total = self.sources.len() * self.n_experts;
        let group = if st.slots.len() >= total { experts.len() } else { (st.slots.len() / 2).max(1) };
        let keys: Vec<usize> = experts.iter().map(|&e| l * self.n_experts + e as usize).collect();
        let mut needed = vec![false; st.slots.len()];
        for k in &keys {
            if let Some(&s) = st.owner_of.get(k) {
                needed[s] = true;
            }
        }
        let groups: Vec<&[usize]> = keys.chunks(group.max(1)).collect();
        // Slots of the group about to run (and their copies' markers), then of the next one.
        let mut current: Vec<(usize, Option<Marker>)> = Vec::new();
        for &key in groups.first().copied().unwrap_or(&[]) {
            let p = self.place(&mut st, &mut needed, key, true)?;
            current.push(p.ok_or_else(|| ResidencyError::Stream("expert cache: no slot for an expert".into()))?);
        }
        for (gi, ids) in experts.chunks(group.max(1)).enumerate() {
            // Queue what the next group needs where a slot is free now; the rest after this
            // group's compute frees its slots.
            let next_keys = groups.get(gi + 1).copied().unwrap_or(&[]);
            let mut next: Vec<(usize, Option<Marker>)> = Vec::with_capacity(next_keys.len());
            for &key in next_keys {
                match self.place(&mut st, &mut needed, key, false)? {
                    Some(p) => next.push(p),
                    None => break,
                }
            }
            for (slot, ready) in &current {
                if let Some(m) = ready {
                    be.compute_wait(m)?;
                }
                st.tick += 1;
                let tick = st.tick;
                st.slots[*slot].last_use = tick;
            }
            let done = {
                let ws: Vec<(u32, ExpertWeights<'_>)> = ids
                    .iter()
                    .zip(&current)
                    .map(|(&e, &(slot, _))| (e, self.stored_weights(&st.slots[slot].parts)))
                    .collect();
                f(&ws)
            };
            // The group's slots have been read once the compute queued so far has run.
            for &(slot, _) in &current {
                st.slots[slot].free = Some(be.compute_marker()?);
                needed[slot] = false;
            }
            done?;
            for &key in &next_keys[next.len()..] {
                let p = self.place(&mut st, &mut needed, key, true)?;
                next.push(p.ok_or_else(|| ResidencyError::Stream("expert cache: no slot for an expert".into()))?);
            }
            current = next;
        }
        Ok(())
    }

    /// An expert's weights as its slot holds them (MXFP4 packed, or per-expert bf16).
    fn stored_weights<'a>(&self, p: &'a [Tensor]) -> ExpertWeights<'a> {
        match self.format {
            ExpertFormat::PerExpert => ExpertWeights {
                gate_up: ExpertMatrix::Dense(&p[0]),
                up: Some(ExpertMatrix::Dense(&p[1])),
                down: ExpertMatrix::Dense(&p[2]),
                gate_up_bias: None,
                down_bias: None,
            },
            _ => ExpertWeights {
                gate_up: ExpertMatrix::Mxfp4 { blocks: &p[0], scales: &p[1] },
                up: None,
                down: ExpertMatrix::Mxfp4 { blocks: &p[2], scales: &p[3] },
                gate_up_bias: Some(&p[4]),
                down_bias: Some(&p[5]),
            },
        }
    }

    /// A slot holding expert `key` and the marker its copy passes (None on a hit). Without a
    /// free slot, None unless `force`, which then evicts the least recently used slot even if
    /// this call needs it later.
    fn place(
        &self,
        st: &mut State,
        needed: &mut [bool],
        key: usize,
        force: bool,
    ) -> Result<Option<(usize, Option<Marker>)>> {
        if let Some(&s) = st.owner_of.get(&key) {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            let slot = &mut st.slots[s];
            if std::mem::take(&mut slot.prefetched) {
                self.counters.prefetch_used.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(Some((s, slot.ready.take())));
        }
        let victim = (0..st.slots.len())
            .filter(|&s| !needed[s] || force)
            .min_by_key(|&s| (needed[s], st.slots[s].owner.is_some(), st.slots[s].last_use));
        let Some(victim) = victim else { return Ok(None) };
        if let Some(old) = st.slots[victim].owner.take() {
            st.owner_of.remove(&old);
        }
        // A prefetch nobody used: the new copy follows its copy on the copy queue.
        st.slots[victim].ready = None;
        st.slots[victim].prefetched = false;
        let be = self.backend.as_ref();
        if let Some(m) = st.slots[victim].free.take() {
            be.copy_wait(&m)?;
        }
        let (l, e) = (key / self.n_experts, key % self.n_experts);
        let parts = &self.sources[l];
        match &self.ram[l] {
            Some((buf, positions)) => {
                for (pos, dst) in positions.iter().zip(st.slots[victim].parts.iter_mut()) {
                    be.copy_to_device_async(buf, pos[e], dst)?;
                }
                self.counters.ram_loads.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                let n = st.staging.len();
                if n == 0 {
                    return Err(ResidencyError::Stream(format!("expert cache: layer {l} has no home for its experts")));
                }
                let which = st.next_staging % n;
                st.next_staging += 1;
                let State { staging, slots, .. } = &mut *st;
                let sb = &mut staging[which];
                if let Some(m) = sb.free.take() {
                    be.host_wait(&m)?;
                }
                let started = Instant::now();
                let mut at = 0usize;
                let mut offsets = Vec::with_capacity(parts.len());
                let mut spans = Vec::with_capacity(parts.len());
                for src in parts {
                    let (file, offset) = src.at[e];
                    let (start, end) = aligned_span(offset, src.len as usize);
                    spans.push((file, start, end));
                    offsets.push(at + (offset - start) as usize);
                    at += (end - start) as usize;
                }
                // All parts at once, in pieces over several readers: one part per read kept a
                // single request in flight and reached about 60% of the disk's rate.
                read_spans_parallel(&self.files, &spans, sb.buf.as_mut_slice(), EXPERT_READ_PIECE, EXPERT_READERS)
                    .map_err(|err| ResidencyError::Stream(format!("reading layer {l} expert {e}: {err}")))?;
                let c = &self.counters;
                c.disk_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                c.disk_bytes.fetch_add(self.expert_bytes, Ordering::Relaxed);
                c.disk_loads.fetch_add(1, Ordering::Relaxed);
                for (&off, dst) in offsets.iter().zip(slots[victim].parts.iter_mut()) {
                    be.copy_to_device_async(&sb.buf, off, dst)?;
                }
                sb.free = Some(be.copy_marker()?);
            }
        }
        self.counters.copy_bytes.fetch_add(self.expert_bytes, Ordering::Relaxed);
        let ready = be.copy_marker()?;
        let slot = &mut st.slots[victim];
        slot.owner = Some(key);
        st.owner_of.insert(key, victim);
        needed[victim] = true;
        Ok(Some((victim, Some(ready))))
    }

    /// The slot's matrices into `work` in nn.Linear layout.
    fn unpack(&self, slot: &Slot, work: &mut Work) -> Result<()> {
        let be = self.backend.as_ref();
        let p = &slot.parts;
        match self.format {
            ExpertFormat::Mxfp4 | ExpertFormat::Dense => {
                let (Some(gate_up), Some(down)) = (work.gate_up.as_mut(), work.down.as_mut()) else {
                    return Err(ResidencyError::Stream("internal: no unpack buffers".into()));
                };
                if self.format == ExpertFormat::Mxfp4 {
                    let moe = be.moe()?;
                    moe.dequant_mxfp4(&p[0], &p[1], gate_up)?;
                    moe.dequant_mxfp4(&p[2], &p[3], down)?;
                } else {
                    be.transpose(&p[0], gate_up)?;
                    be.transpose(&p[1], down)?;
                }
            }
            ExpertFormat::PerExpert => {}
        }
        Ok(())
    }

    pub fn stats(&self) -> ExpertStats {
        let c = &self.counters;
        let slots = self.state.lock().map_or(0, |s| s.slots.len());
        ExpertStats {
            hits: c.hits.load(Ordering::Relaxed),
            ram_loads: c.ram_loads.load(Ordering::Relaxed),
            disk_loads: c.disk_loads.load(Ordering::Relaxed),
            copy_bytes: c.copy_bytes.load(Ordering::Relaxed),
            disk_bytes: c.disk_bytes.load(Ordering::Relaxed),
            disk_secs: c.disk_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            slots,
            experts: self.sources.len() * self.n_experts,
            expert_bytes: self.expert_bytes,
            pinned_bytes: self.pinned_bytes,
            prefetched: c.prefetched.load(Ordering::Relaxed),
            prefetch_used: c.prefetch_used.load(Ordering::Relaxed),
        }
    }
}

impl Drop for ExpertCache {
    fn drop(&mut self) {
        // Copies into the slots may still be in flight; their memory is freed on the compute
        // queue, so make it wait for them.
        if let Ok(m) = self.backend.copy_marker() {
            let _ = self.backend.compute_wait(&m);
        }
    }
}

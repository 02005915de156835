//! The KV cache off the GPU (docs/architecture.md §4): per layer, append-only blocks of positions in
//! pinned host RAM, spilled to a file on disk beyond a RAM budget, and two device windows that
//! layers take turns in.
//!
//! A forward over positions `pos0 .. pos0 + t` walks the layers in order. Layer `l` computes in
//! window `l % 2`, which holds its positions `0 .. pos0` (copied in from the blocks on the copy
//! queue) and receives the new ones from the attention itself. When the layer's compute is
//! queued, [`Offload::release`] queues the copy of the new positions out to the layer's blocks
//! and then the copy of layer `l + 2`'s blocks into the same window, so the next layer but one
//! loads while the next computes. Nothing already in a block is rewritten: a decode step moves
//! one position out per layer.
//!
//! A sliding-window layer loads only the blocks its window still sees, into its window from row
//! 0 ([`LayerKv::base`] says which position that is), and frees blocks older than its window
//! and [`KEEP_BACK`](crate::KEEP_BACK) (but none the prefix store has yet to take).
//!
//! A prefix shared by several sequences ([`SharedPrefix`](crate::SharedPrefix)) keeps its blocks
//! once ([`HostPrefix`]): an attached sequence's first blocks are references to them
//! (`Block::Shared`), loaded into its window like its own, never written, spilled or counted in
//! its RAM budget.
//!
//! A block holds `block` positions of one layer, K then V, each laid out `[n_kv, block, d]` in
//! the backend's KV dtype. Full blocks beyond the RAM budget move to the spill file (O_DIRECT,
//! aligned); loading a spilled block reads it into a pinned staging buffer first, on the calling
//! thread, while the device computes what was queued before.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ollm_io::direct::{ALIGN, DirectFile};
use ollm_ops::{Backend, HostBuffer, KvBlockSpan, Marker, OpsError, Result};

use crate::{HostPrefix, KvShape, LayerKv};

/// Where the KV cache lives and how it is cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvOffload {
    /// Positions per block.
    pub block: usize,
    /// Pinned host bytes the blocks may take; full blocks beyond it go to the spill file.
    pub ram_bytes: u64,
    /// Directory of the spill file (created if missing).
    pub spill_dir: PathBuf,
    /// Positions the device windows are allocated for up front (the planned context), so they
    /// never grow mid-run (a grown window briefly coexists with the old one on the device).
    pub window_positions: usize,
}

/// What the offloaded cache holds now, for stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OffloadStats {
    pub ram_blocks: usize,
    pub disk_blocks: usize,
    /// Blocks that are a shared prefix's (held once for every sequence attached to it; not in
    /// `ram_blocks`).
    pub shared_blocks: usize,
    pub block_bytes: usize,
    /// Bytes copied into the windows and out of them so far.
    pub loaded_bytes: u64,
    pub stored_bytes: u64,
    /// Bytes written to and read from the spill file so far.
    pub spilled_bytes: u64,
    pub unspilled_bytes: u64,
}

enum Block {
    Ram(HostBuffer),
    /// Byte offset in the spill file.
    Disk(u64),
    /// Freed: older than a sliding-window layer's window.
    Dropped,
    /// A shared prefix's block (read-only; held once for every sequence attached to it).
    Shared(Arc<HostBuffer>),
}

impl Block {
    /// The block's bytes when they are in RAM (its own or a shared prefix's).
    fn in_ram(&self) -> Option<&HostBuffer> {
        match self {
            Block::Ram(buf) => Some(buf),
            Block::Shared(buf) => Some(buf),
            Block::Disk(_) | Block::Dropped => None,
        }
    }
}

struct Spill {
    file: DirectFile,
    next: u64,
}

/// The offloaded KV of one sequence.
pub(crate) struct Offload {
    shape: KvShape,
    n_layers: usize,
    /// Per layer, its sliding window (None: full attention).
    windows_of: Vec<Option<usize>>,
    cfg: KvOffload,
    /// Bytes of one layer's block (K and V), a multiple of [`ALIGN`].
    block_bytes: usize,
    /// Bytes of K's half (V starts here).
    half_bytes: usize,
    /// Per layer, blocks in position order.
    blocks: Vec<Vec<Block>>,
    /// Pinned buffers of spilled blocks, for the next new block.
    free: Vec<HostBuffer>,
    windows: [LayerKv; 2],
    capacity: usize,
    /// Which layer each window holds (loaded or loading), and the copy marker after its load.
    held: [Option<usize>; 2],
    ready: [Option<Marker>; 2],
    /// Positions of the forward in flight: `pos0` valid in the blocks, `t` being added.
    pos0: usize,
    t: usize,
    spill: Option<Spill>,
    spill_path: PathBuf,
    /// Pinned staging for spilled blocks and the copy marker after each one's last use.
    staging: Vec<(HostBuffer, Option<Marker>)>,
    next_staging: usize,
    stats: OffloadStats,
}

impl std::fmt::Debug for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offload").field("layers", &self.n_layers).field("stats", &self.stats()).finish()
    }
}

fn err(detail: String) -> OpsError {
    OpsError::Backend(detail)
}

impl Offload {
    pub(crate) fn new(
        backend: &dyn Backend,
        shape: KvShape,
        windows_of: Vec<Option<usize>>,
        capacity: usize,
        cfg: KvOffload,
    ) -> Result<Self> {
        let n_layers = windows_of.len();
        if cfg.block == 0 || n_layers == 0 {
            return Err(err("the offloaded KV cache needs a block of at least one position and one layer".into()));
        }
        let elem = backend.kv_dtype().size_bytes();
        let half_bytes = shape.n_kv_heads * cfg.block * shape.head_dim * elem;
        let block_bytes = (2 * half_bytes).next_multiple_of(ALIGN);
        std::fs::create_dir_all(&cfg.spill_dir)
            .map_err(|e| err(format!("{}: cannot create the KV spill directory: {e}", cfg.spill_dir.display())))?;
        let spill_path = cfg.spill_dir.join(format!("kv-{}-{}.spill", std::process::id(), unique()));
        let window = || -> Result<LayerKv> {
            let dims = vec![shape.n_kv_heads, capacity, shape.head_dim];
            Ok(LayerKv { k: backend.kv_zeros(dims.clone())?, v: backend.kv_zeros(dims)?, base: 0, prefix: None })
        };
        Ok(Self {
            shape,
            n_layers,
            windows_of,
            cfg,
            block_bytes,
            half_bytes,
            blocks: (0..n_layers).map(|_| Vec::new()).collect(),
            free: Vec::new(),
            windows: [window()?, window()?],
            capacity,
            held: [None, None],
            ready: [None, None],
            pos0: 0,
            t: 0,
            spill: None,
            spill_path,
            staging: Vec::new(),
            next_staging: 0,
            stats: OffloadStats { block_bytes, ..OffloadStats::default() },
        })
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn block(&self) -> usize {
        self.cfg.block
    }

    /// Calls `f` with every layer's block `bi` (each `block_bytes`): blocks in RAM as they are,
    /// spilled ones read into fresh buffers first.
    pub(crate) fn with_block<E: From<OpsError>>(
        &mut self,
        backend: &dyn Backend,
        bi: usize,
        f: impl FnOnce(&[&[u8]]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        // The block's last copy out of a window must have landed.
        backend.host_wait(&backend.copy_marker()?)?;
        let mut read = Vec::new();
        for l in 0..self.n_layers {
            match self.blocks[l].get(bi) {
                Some(Block::Ram(_) | Block::Shared(_)) => {}
                Some(Block::Disk(off)) => {
                    let mut buf = backend.host_alloc(self.block_bytes)?;
                    read_spilled(&self.spill, *off, self.block_bytes, &mut buf)?;
                    read.push(buf);
                }
                Some(Block::Dropped) => {
                    return Err(err(format!("block {bi} of sliding-window layer {l} was dropped")).into());
                }
                None => return Err(err(format!("internal: layer {l} has no block {bi}")).into()),
            }
        }
        let mut read = read.iter();
        let mut views = Vec::with_capacity(self.n_layers);
        for l in 0..self.n_layers {
            let buf = match &self.blocks[l][bi] {
                Block::Ram(buf) => buf,
                Block::Shared(buf) => buf.as_ref(),
                Block::Disk(_) | Block::Dropped => {
                    read.next().ok_or_else(|| err("internal: spilled block count".into()))?
                }
            };
            views.push(&buf.as_slice()[..self.block_bytes]);
        }
        f(&views)
    }

    /// A block buffer per layer, for [`push_block`](Self::push_block).
    pub(crate) fn take_buffers(&mut self, backend: &dyn Backend) -> Result<Vec<HostBuffer>> {
        (0..self.n_layers).map(|_| self.block_buffer(backend)).collect()
    }

    pub(crate) fn return_buffers(&mut self, bufs: Vec<HostBuffer>) {
        self.free.extend(bufs);
    }

    /// Makes block `bi` of every layer from filled buffers of
    /// [`take_buffers`](Self::take_buffers).
    pub(crate) fn push_block(&mut self, backend: &dyn Backend, bi: usize, bufs: Vec<HostBuffer>) -> Result<()> {
        if self.blocks.iter().any(|b| b.len() < bi) {
            return Err(err(format!("internal: block {bi} imported before the ones ahead of it")));
        }
        // A replaced block may still be the source of a queued copy.
        backend.host_wait(&backend.copy_marker()?)?;
        for (l, buf) in bufs.into_iter().enumerate() {
            if bi < self.blocks[l].len() {
                if let Block::Ram(old) = std::mem::replace(&mut self.blocks[l][bi], Block::Ram(buf)) {
                    self.free.push(old);
                }
            } else {
                self.blocks[l].push(Block::Ram(buf));
            }
        }
        Ok(())
    }

    /// Device windows large enough for `needed` positions (their contents are reloaded per
    /// layer anyway).
    pub(crate) fn reserve(&mut self, backend: &dyn Backend, needed: usize, new_cap: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        // Queued copies may still touch the old windows; their memory is freed on the compute
        // queue, so make it wait for the copy queue first.
        backend.compute_wait(&backend.copy_marker()?)?;
        let dims = vec![self.shape.n_kv_heads, new_cap, self.shape.head_dim];
        for w in &mut self.windows {
            w.k = backend.kv_zeros(dims.clone())?;
            w.v = backend.kv_zeros(dims.clone())?;
        }
        self.held = [None, None];
        self.ready = [None, None];
        self.capacity = new_cap;
        Ok(())
    }

    /// Starts a forward over positions `pos0 .. pos0 + t`: frees sliding-window layers' blocks
    /// that neither the window, [`KEEP_BACK`](crate::KEEP_BACK) nor the prefix store (`retain`
    /// on) wants, spills what the RAM budget no longer holds and queues the loads of layers 0
    /// and 1.
    pub(crate) fn begin(&mut self, backend: &dyn Backend, pos0: usize, t: usize, retain: usize) -> Result<()> {
        self.pos0 = pos0;
        self.t = t;
        self.drop_old(backend, retain)?;
        self.spill_over_budget(backend)?;
        // The windows may still be in use by the previous forward's last layers.
        backend.copy_wait(&backend.compute_marker()?)?;
        self.held = [None, None];
        for l in 0..self.n_layers.min(2) {
            self.load(backend, l)?;
        }
        Ok(())
    }

    /// The window of layer `l`, holding its positions `0 .. pos0` once compute waits for it.
    pub(crate) fn acquire(&mut self, backend: &dyn Backend, l: usize) -> Result<&mut LayerKv> {
        let w = l % 2;
        if self.held[w] != Some(l) {
            backend.copy_wait(&backend.compute_marker()?)?;
            self.load(backend, l)?;
        }
        if let Some(m) = &self.ready[w] {
            backend.compute_wait(m)?;
        }
        Ok(&mut self.windows[w])
    }

    /// Layer `l`'s compute is queued: copy its new positions out to its blocks, then start
    /// loading layer `l + 2` into the same window.
    pub(crate) fn release(&mut self, backend: &dyn Backend, l: usize) -> Result<()> {
        let w = l % 2;
        backend.copy_wait(&backend.compute_marker()?)?;
        self.store(backend, l, w)?;
        self.held[w] = None;
        if l + 2 < self.n_layers {
            self.load(backend, l + 2)?;
        }
        Ok(())
    }

    /// The first block a sliding-window layer's window sees in this forward (0 for the others).
    fn first_block(&self, l: usize) -> usize {
        self.windows_of[l].map_or(0, |w| self.pos0.saturating_sub(w.saturating_sub(1)) / self.cfg.block)
    }

    /// Frees sliding-window layers' blocks before their window less
    /// [`KEEP_BACK`](crate::KEEP_BACK), and before `retain`.
    fn drop_old(&mut self, backend: &dyn Backend, retain: usize) -> Result<()> {
        let b = self.cfg.block;
        let mut waited = false;
        for l in 0..self.n_layers {
            let Some(w) = self.windows_of[l] else { continue };
            let keep = self.pos0.saturating_sub(w.saturating_sub(1) + crate::KEEP_BACK).min(retain);
            for bi in 0..(keep / b).min(self.blocks[l].len()) {
                if matches!(self.blocks[l][bi], Block::Dropped) {
                    continue;
                }
                if !waited {
                    // A freed buffer may still be the source of a queued copy.
                    backend.host_wait(&backend.copy_marker()?)?;
                    waited = true;
                }
                if let Block::Ram(buf) = std::mem::replace(&mut self.blocks[l][bi], Block::Dropped) {
                    self.free.push(buf);
                }
            }
        }
        Ok(())
    }

    /// Makes every layer's blocks `0..p / block` (positions `0..p`, a whole number of blocks,
    /// all written) a [`HostPrefix`] and points this cache's blocks at it: RAM blocks move into
    /// it, spilled ones are read back first (a shared block stays in RAM), dropped ones stay
    /// dropped.
    pub(crate) fn share(&mut self, backend: &dyn Backend, p: usize) -> Result<HostPrefix> {
        let b = self.cfg.block;
        if !p.is_multiple_of(b) || self.blocks.iter().any(|bl| bl.len() < p / b) {
            return Err(err(format!(
                "an offloaded cache shares whole blocks of {b} positions it holds, not {p} positions"
            )));
        }
        // The blocks' last copies out of the windows must have landed.
        backend.host_wait(&backend.copy_marker()?)?;
        let mut out = Vec::with_capacity(self.n_layers);
        for l in 0..self.n_layers {
            let mut layer = Vec::with_capacity(p / b);
            for bi in 0..p / b {
                let shared = match &self.blocks[l][bi] {
                    Block::Shared(buf) => Some(buf.clone()),
                    Block::Dropped => None,
                    Block::Disk(off) => {
                        let off = *off;
                        let mut buf = backend.host_alloc(self.block_bytes)?;
                        read_spilled(&self.spill, off, self.block_bytes, &mut buf)?;
                        Some(Arc::new(buf))
                    }
                    Block::Ram(_) => match std::mem::replace(&mut self.blocks[l][bi], Block::Dropped) {
                        Block::Ram(buf) => Some(Arc::new(buf)),
                        _ => return Err(err("internal: a RAM block changed kind".into())),
                    },
                };
                if let Some(buf) = &shared {
                    self.blocks[l][bi] = Block::Shared(buf.clone());
                }
                layer.push(shared);
            }
            out.push(layer);
        }
        Ok(HostPrefix { block: b, block_bytes: self.block_bytes, blocks: out })
    }

    /// Points an empty cache's first blocks at a shared prefix's (its own blocks are given
    /// up). Fails when the prefix was cut in other blocks or for other layers.
    pub(crate) fn attach(&mut self, backend: &dyn Backend, host: &HostPrefix) -> Result<()> {
        if host.block != self.cfg.block || host.block_bytes != self.block_bytes || host.blocks.len() != self.n_layers {
            return Err(err(format!(
                "a shared prefix of {} layers in blocks of {} positions ({} B) does not fit an offloaded cache of {} layers in blocks of {} ({} B)",
                host.blocks.len(),
                host.block,
                host.block_bytes,
                self.n_layers,
                self.cfg.block,
                self.block_bytes
            )));
        }
        // A given-up buffer may still be the target of a queued copy.
        backend.host_wait(&backend.copy_marker()?)?;
        for (mine, theirs) in self.blocks.iter_mut().zip(&host.blocks) {
            for blk in mine.drain(..) {
                if let Block::Ram(buf) = blk {
                    self.free.push(buf);
                }
            }
            mine.extend(theirs.iter().map(|t| t.as_ref().map_or(Block::Dropped, |buf| Block::Shared(buf.clone()))));
        }
        Ok(())
    }

    /// The first position layer `l` still holds (after its dropped blocks).
    pub(crate) fn first_kept(&self, l: usize) -> usize {
        self.blocks[l].iter().take_while(|b| matches!(b, Block::Dropped)).count() * self.cfg.block
    }

    /// The sequence starts over: layers with dropped blocks or a shared prefix's give up all
    /// their blocks (a shared one is let go of, never written).
    pub(crate) fn forget_dropped(&mut self) {
        for blocks in &mut self.blocks {
            if blocks.iter().any(|b| matches!(b, Block::Dropped | Block::Shared(_))) {
                for b in blocks.drain(..) {
                    if let Block::Ram(buf) = b {
                        self.free.push(buf);
                    }
                }
            }
        }
    }

    /// Queues the copy of positions `pos0 .. pos0 + t` of window `w` into layer `l`'s blocks.
    fn store(&mut self, backend: &dyn Backend, l: usize, w: usize) -> Result<()> {
        let b = self.cfg.block;
        let base = self.windows[w].base;
        let (mut pos, end) = (self.pos0, self.pos0 + self.t);
        while pos < end {
            let bi = pos / b;
            while self.blocks[l].len() <= bi {
                let buf = self.block_buffer(backend)?;
                self.blocks[l].push(Block::Ram(buf));
            }
            let row = pos - bi * b;
            let n = (b - row).min(end - pos);
            if let Block::Disk(off) = self.blocks[l][bi] {
                // Positions were dropped back into a spilled block (SeqState::truncate): it
                // comes back to RAM to take the new ones.
                self.unspill(backend, l, bi, off)?;
            }
            let Block::Ram(buf) = &mut self.blocks[l][bi] else {
                return Err(err(format!("internal: layer {l} block {bi} is not in RAM or is a shared prefix's")));
            };
            let win = &self.windows[w];
            let span = KvBlockSpan { offset: 0, block: b, row, pos: pos - base, n };
            backend.kv_to_host_async(&win.k, buf, span)?;
            backend.kv_to_host_async(&win.v, buf, KvBlockSpan { offset: self.half_bytes, ..span })?;
            self.stats.stored_bytes += (2 * n * self.row_bytes(backend)) as u64;
            pos += n;
        }
        Ok(())
    }

    fn unspill(&mut self, backend: &dyn Backend, l: usize, bi: usize, off: u64) -> Result<()> {
        let mut buf = self.block_buffer(backend)?;
        read_spilled(&self.spill, off, self.block_bytes, &mut buf)?;
        self.blocks[l][bi] = Block::Ram(buf);
        Ok(())
    }

    /// A pinned buffer for a new block: a spilled block's, else a fresh one.
    fn block_buffer(&mut self, backend: &dyn Backend) -> Result<HostBuffer> {
        match self.free.pop() {
            Some(buf) => Ok(buf),
            None => backend.host_alloc(self.block_bytes),
        }
    }

    fn row_bytes(&self, backend: &dyn Backend) -> usize {
        self.shape.n_kv_heads * self.shape.head_dim * backend.kv_dtype().size_bytes()
    }

    /// Queues the copy of layer `l`'s positions `0 .. pos0` (a sliding-window layer: from its
    /// first block that its window sees) into its window (`l % 2`).
    fn load(&mut self, backend: &dyn Backend, l: usize) -> Result<()> {
        let w = l % 2;
        let b = self.cfg.block;
        let valid = self.pos0;
        let first = self.first_block(l);
        self.windows[w].base = first * b;
        for bi in first..valid.div_ceil(b) {
            let n = b.min(valid - bi * b);
            let span = KvBlockSpan { offset: 0, block: b, row: 0, pos: (bi - first) * b, n };
            let v_span = KvBlockSpan { offset: self.half_bytes, ..span };
            match self.blocks[l].get(bi) {
                Some(blk @ (Block::Ram(_) | Block::Shared(_))) => {
                    let buf = blk.in_ram().ok_or_else(|| err("internal: block kind".into()))?;
                    let win = &mut self.windows[w];
                    backend.kv_from_host_async(buf, &mut win.k, span)?;
                    backend.kv_from_host_async(buf, &mut win.v, v_span)?;
                }
                Some(Block::Disk(off)) => {
                    let off = *off;
                    let s = self.staging_buffer(backend)?;
                    let (buf, used) = &mut self.staging[s];
                    read_spilled(&self.spill, off, self.block_bytes, buf)?;
                    let win = &mut self.windows[w];
                    backend.kv_from_host_async(buf, &mut win.k, span)?;
                    backend.kv_from_host_async(buf, &mut win.v, v_span)?;
                    *used = Some(backend.copy_marker()?);
                    self.stats.unspilled_bytes += self.block_bytes as u64;
                }
                Some(Block::Dropped) | None => {
                    return Err(err(format!("internal: layer {l} has no block {bi} for position {}", bi * b)));
                }
            }
            self.stats.loaded_bytes += (2 * n * self.row_bytes(backend)) as u64;
        }
        self.held[w] = Some(l);
        self.ready[w] = Some(backend.copy_marker()?);
        Ok(())
    }

    /// A staging buffer no queued copy still reads (two in rotation).
    fn staging_buffer(&mut self, backend: &dyn Backend) -> Result<usize> {
        if self.staging.len() < 2 {
            self.staging.push((backend.host_alloc(self.block_bytes)?, None));
            return Ok(self.staging.len() - 1);
        }
        let s = self.next_staging;
        self.next_staging = (s + 1) % self.staging.len();
        if let Some(m) = self.staging[s].1.take() {
            backend.host_wait(&m)?;
        }
        Ok(s)
    }

    /// Moves full blocks to the spill file, oldest positions first, until the blocks in RAM fit
    /// the budget. The blocks' last copies out of the windows must have passed first.
    fn spill_over_budget(&mut self, backend: &dyn Backend) -> Result<()> {
        let in_ram = |s: &Self| s.blocks.iter().flatten().filter(|b| matches!(b, Block::Ram(_))).count();
        let budget_blocks = (self.cfg.ram_bytes / self.block_bytes as u64) as usize;
        if in_ram(self) <= budget_blocks {
            return Ok(());
        }
        backend.host_wait(&backend.copy_marker()?)?;
        let full = self.pos0 / self.cfg.block;
        let mut excess = in_ram(self) - budget_blocks;
        'outer: for bi in 0..full {
            for l in 0..self.n_layers {
                if excess == 0 {
                    break 'outer;
                }
                if !matches!(self.blocks[l].get(bi), Some(Block::Ram(_))) {
                    continue;
                }
                if self.spill.is_none() {
                    let file = DirectFile::create(&self.spill_path).map_err(|e| err(e.to_string()))?;
                    self.spill = Some(Spill { file, next: 0 });
                }
                let spill = self.spill.as_mut().ok_or_else(|| err("internal: no spill file".into()))?;
                let off = spill.next;
                let Some(Block::Ram(buf)) = self.blocks[l].get(bi) else { continue };
                spill.file.write_at(off, &buf.as_slice()[..self.block_bytes]).map_err(|e| err(e.to_string()))?;
                spill.next += self.block_bytes as u64;
                if let Block::Ram(buf) = std::mem::replace(&mut self.blocks[l][bi], Block::Disk(off)) {
                    self.free.push(buf);
                }
                self.stats.spilled_bytes += self.block_bytes as u64;
                excess -= 1;
            }
        }
        // Spilled blocks' buffers serve new blocks; beyond what the next forward can use, free
        // them so the budget holds.
        let keep = (self.n_layers * (self.t.div_ceil(self.cfg.block) + 1)).min(budget_blocks.max(self.n_layers));
        self.free.truncate(keep);
        Ok(())
    }

    pub(crate) fn stats(&self) -> OffloadStats {
        let mut s = self.stats;
        s.ram_blocks = self.blocks.iter().flatten().filter(|b| matches!(b, Block::Ram(_))).count();
        s.disk_blocks = self.blocks.iter().flatten().filter(|b| matches!(b, Block::Disk(_))).count();
        s.shared_blocks = self.blocks.iter().flatten().filter(|b| matches!(b, Block::Shared(_))).count();
        s
    }

    /// Bytes held on the device (the two windows) and in pinned RAM (blocks, free and staging).
    pub(crate) fn device_bytes(&self) -> usize {
        self.windows.iter().map(|w| w.k.size_bytes() + w.v.size_bytes()).sum()
    }

    pub(crate) fn host_bytes(&self) -> usize {
        let ram = self.stats().ram_blocks + self.free.len() + self.staging.len();
        ram * self.block_bytes
    }

    pub(crate) fn window(&mut self, l: usize) -> &mut LayerKv {
        &mut self.windows[l % 2]
    }

    pub(crate) fn spill_path(&self) -> &Path {
        &self.spill_path
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        if self.spill.take().is_some() {
            let _ = std::fs::remove_file(&self.spill_path);
        }
    }
}

/// Reads the spilled block at `off` into `buf`.
fn read_spilled(spill: &Option<Spill>, off: u64, len: usize, buf: &mut HostBuffer) -> Result<()> {
    let spill = spill.as_ref().ok_or_else(|| err("internal: a spilled block with no spill file".into()))?;
    spill.file.read_into(off, len, buf.as_mut_slice()).map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// A number unique within this process, for spill and temporary file names.
pub(crate) fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

//! ollm-kv: per-sequence decode state. Knows layers, heads and positions; knows nothing of
//! models.
//!
//! A [`SeqState`] is owned by the engine's session and passed into a model's forward; models
//! never keep per-sequence state themselves, so one loaded model can serve many sequences.
//! Every layer's K/V lives either on the compute backend, growing by doubling, or off it
//! ([`KvOffload`]): in blocks in pinned RAM and a spill file, with two device windows the layers
//! take turns in (see [`offload`]). A model brackets each layer's use of its cache with
//! [`SeqState::acquire`] and [`SeqState::release`]; both are free when the cache is on the device.
//!
//! A sliding-window layer ([`KvShape::window`]) keeps only the positions its window can still
//! see, plus [`KEEP_BACK`] for rewinds: its rows start at [`LayerKv::base`], and the model
//! writes and attends at positions shifted by it (attention over post-RoPE keys does not depend
//! on where the rows start). Positions the prefix store has not taken yet are kept
//! ([`SeqState::retain_from`]).
//!
//! Recurrent layers (Qwen3-Next's Gated DeltaNet) keep fixed-size state instead of a cache
//! ([`FixedShape`], [`SeqState::with_fixed`]). The persistent prefix store ([`prefix`]) moves a
//! state in whole blocks of positions ([`SeqState::export_block`], [`SeqState::import_block`])
//! plus, for recurrent layers, a snapshot of the fixed state at a block's end.

pub mod offload;
pub mod prefix;
pub mod shared;

use ollm_ops::{Backend, DType, HostBuffer, KvBlockSpan, OpsError, Result, Tensor};

pub use offload::{KvOffload, OffloadStats};
pub use prefix::{PrefixCache, PrefixConfig, Restored, Stored};
pub use shared::{HostPrefix, PrefixLayer, PrefixRows, SharedPrefix, held_bytes, held_bytes_split};

use std::sync::Arc;

/// Positions per prefix-store block when the cache lives on the device (an offloaded cache uses
/// its own block, so imported blocks drop straight into it).
pub const DEVICE_PREFIX_BLOCK: usize = 256;

/// Fixed-size state of one recurrent layer: f32 tensors a forward updates in place (Gated
/// DeltaNet: the causal conv's last inputs and the delta rule's matrix per head).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedShape {
    pub tensors: Vec<Vec<usize>>,
}

impl FixedShape {
    fn elems(&self) -> usize {
        self.tensors.iter().map(|d| d.iter().product::<usize>()).sum()
    }
}

/// How a state's positions are cut for the prefix store: blocks of `block` positions; per KV
/// layer a block is `layer_bytes` (K's `[n_kv, block, d]` in the KV dtype `kv_dtype`, V's at
/// `half_bytes`, zero padding to a multiple of 4096 so the bytes go to disk with O_DIRECT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    pub block: usize,
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// The KV cache's element type (`Backend::kv_dtype`), and its size.
    pub kv_dtype: DType,
    pub elem_bytes: usize,
    pub half_bytes: usize,
    pub layer_bytes: usize,
    /// Bytes of a snapshot of the fixed state (0 without recurrent layers).
    pub fixed_bytes: usize,
}

/// Shape of one attention layer's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Some(w): a sliding-window layer; a query sees only the last `w` positions (itself
    /// included), so the cache keeps about that many.
    pub window: Option<usize>,
}

impl KvShape {
    /// A layer that attends over every earlier position.
    pub fn full(n_kv_heads: usize, head_dim: usize) -> Self {
        Self { n_kv_heads, head_dim, window: None }
    }

    /// Whether two layers' rows are alike (same heads and width; windows may differ).
    fn same_rows(&self, other: &KvShape) -> bool {
        (self.n_kv_heads, self.head_dim) == (other.n_kv_heads, other.head_dim)
    }
}

/// Positions a sliding-window layer keeps beyond its window, so that dropping a short tail
/// (a chat turn re-rendered, a stop sequence) does not force a recompute. Also the slack it
/// grows by, so that dropping its front happens once per this many decoded tokens.
pub const KEEP_BACK: usize = 512;

/// Device positions a sliding-window layer of window `w` holds at most when forwards add up to
/// `tile` positions per call of [`SeqState::layer_for`] (nothing pinned for the prefix store).
pub fn window_positions(w: usize, tile: usize) -> usize {
    w.saturating_sub(1) + 2 * KEEP_BACK + tile
}

/// K and V of one attention layer, each `[n_kv_heads, capacity, head_dim]` in the backend's
/// KV dtype (`Backend::kv_dtype`: bf16 on CUDA; on the CPU bf16 with bf16 activations, f32 with
/// exact ones). Row `r` holds position
/// `base + r`; rows are valid up to the sequence's `SeqState::len`. `base` is 0 except in
/// sliding-window layers and in a state attached to a shared prefix, so write and attend at
/// `pos - base`.
#[derive(Debug)]
pub struct LayerKv {
    pub k: Tensor,
    pub v: Tensor,
    pub base: usize,
    /// Some: positions `0..base` sit in a shared prefix's caches (see [`shared`]); attention
    /// runs over them and these rows (`Compute::attention_prefixed`).
    pub prefix: Option<PrefixLayer>,
}

impl LayerKv {
    fn zeros(backend: &dyn Backend, s: &KvShape, capacity: usize) -> Result<Self> {
        let dims = vec![s.n_kv_heads, capacity, s.head_dim];
        Ok(Self { k: backend.kv_zeros(dims.clone())?, v: backend.kv_zeros(dims)?, base: 0, prefix: None })
    }

    fn capacity(&self) -> usize {
        self.k.shape()[1]
    }

    /// Room for positions `pos .. pos + n` in a sliding-window layer whose rows hold positions
    /// `base .. pos`: drops the front the window no longer sees (keeping [`KEEP_BACK`] more and
    /// every position from `retain`), growing when that is not enough.
    fn slide(
        &mut self,
        backend: &dyn Backend,
        w: usize,
        (pos, n): (usize, usize),
        (retain, max_positions): (usize, usize),
    ) -> Result<()> {
        let cap = self.capacity();
        if pos < self.base || pos + n - self.base <= cap {
            return Ok(());
        }
        let seen = pos.saturating_sub(w.saturating_sub(1) + KEEP_BACK);
        let base = seen.min(retain).max(self.base);
        let need = pos - base + n;
        // Pinned positions grow the cache by doubling, as a full layer's; else it stays near a
        // window's size.
        let new_cap = match need <= cap {
            true => cap,
            false if base < seen => (need + KEEP_BACK).max(2 * cap),
            false => need + KEEP_BACK,
        }
        .min(max_positions.max(need));
        let keep = base - self.base..pos - self.base;
        self.k = backend.grow_kv(&self.k, keep.clone(), new_cap)?;
        self.v = backend.grow_kv(&self.v, keep, new_cap)?;
        if base > self.base {
            // The window has moved past a shared prefix's end: no query sees its tail any more.
            self.prefix = None;
        }
        self.base = base;
        Ok(())
    }

    /// The first position this layer still holds: a shared prefix's first row when it is
    /// attached to one, else its own rows' base.
    fn first_position(&self) -> usize {
        self.prefix.as_ref().map_or(self.base, PrefixLayer::start)
    }
}

/// Everything one sequence carries between forwards.
#[derive(Debug)]
pub struct SeqState {
    layers: Vec<LayerKv>,
    /// Some when the cache lives off the device (then `layers` is empty).
    offload: Option<offload::Offload>,
    shapes: Vec<KvShape>,
    /// Positions already written to every layer's cache.
    len: usize,
    /// Capacity (positions) of every layer's cache.
    capacity: usize,
    /// The model's context limit; the cache never grows past it.
    max_positions: usize,
    /// Recurrent layers' fixed state (empty for attention-only models).
    fixed: Vec<Vec<Tensor>>,
    fixed_shapes: Vec<FixedShape>,
    /// Sliding-window layers keep every position from here (those the prefix store still
    /// wants); `usize::MAX` without a prefix store.
    retain_from: usize,
    /// The fixed state belongs to a sequence that was dropped ([`truncate`](Self::truncate) to
    /// 0): the next forward zeroes it first.
    fixed_stale: bool,
    /// Some: positions `0..P` live in this shared prefix (every layer's rows start at `P`).
    shared: Option<Arc<SharedPrefix>>,
}

/// Initial capacity in positions; the cache doubles as needed.
const INITIAL_CAPACITY: usize = 256;

/// The capacity a cache of `capacity` positions grows to when it must hold `needed`: double,
/// or `needed` if that is more, capped at the model's context (`max_positions`, or `needed`
/// past it). What [`SeqState::reserve`] allocates.
pub fn grown_capacity(capacity: usize, needed: usize, max_positions: usize) -> usize {
    needed.max(capacity * 2).min(max_positions.max(needed))
}

/// Positions a device KV cache holds once a sequence has grown, a few positions at a time
/// (decoding), to `context`: the initial capacity doubled by [`grown_capacity`] until it holds
/// them. What the planner budgets for a context.
pub fn kv_capacity(context: usize, max_positions: usize) -> usize {
    let mut cap = INITIAL_CAPACITY.min(max_positions.max(1));
    while cap < context {
        cap = grown_capacity(cap, cap + 1, max_positions.max(context));
    }
    cap
}

impl SeqState {
    /// An empty state for a model with these attention layers.
    pub fn new(backend: &dyn Backend, shapes: Vec<KvShape>, max_positions: usize) -> Result<Self> {
        let capacity = INITIAL_CAPACITY.min(max_positions.max(1));
        let layers = shapes.iter().map(|s| LayerKv::zeros(backend, s, capacity)).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            offload: None,
            shapes,
            len: 0,
            capacity,
            max_positions,
            fixed: Vec::new(),
            fixed_shapes: Vec::new(),
            retain_from: usize::MAX,
            fixed_stale: false,
            shared: None,
        })
    }

    /// An empty state whose cache lives in host blocks and a spill file as `cfg` says, every
    /// layer of one row shape. The device holds two windows of `capacity` positions; a
    /// sliding-window layer loads only the blocks its window still sees and frees older ones.
    pub fn offloaded(
        backend: &dyn Backend,
        shapes: Vec<KvShape>,
        max_positions: usize,
        capacity: usize,
        cfg: KvOffload,
    ) -> Result<Self> {
        let shape = *shapes.first().ok_or_else(|| ollm_ops::OpsError::Backend("a KV cache with no layers".into()))?;
        if shapes.iter().any(|s| !s.same_rows(&shape)) {
            return Err(ollm_ops::OpsError::Backend("an offloaded KV cache needs every layer of one shape".into()));
        }
        let capacity = capacity.clamp(1, max_positions.max(1));
        let windows = shapes.iter().map(|s| s.window).collect();
        let off = offload::Offload::new(backend, shape, windows, capacity, cfg)?;
        Ok(Self {
            layers: Vec::new(),
            offload: Some(off),
            shapes,
            len: 0,
            capacity,
            max_positions,
            fixed: Vec::new(),
            fixed_shapes: Vec::new(),
            retain_from: usize::MAX,
            fixed_stale: false,
            shared: None,
        })
    }

    /// An empty state on the device, or offloaded as `offload` says (its device windows sized
    /// for `window_positions`, at least 256).
    pub fn placed(
        backend: &dyn Backend,
        shapes: Vec<KvShape>,
        max_positions: usize,
        offload: Option<&KvOffload>,
    ) -> Result<Self> {
        match offload {
            Some(cfg) => Self::offloaded(backend, shapes, max_positions, cfg.window_positions.max(256), cfg.clone()),
            None => Self::new(backend, shapes, max_positions),
        }
    }

    /// Starts a forward of `t` positions: an offloaded cache queues the loads of the first
    /// layers. Call after [`reserve`](Self::reserve).
    pub fn begin(&mut self, backend: &dyn Backend, t: usize) -> Result<()> {
        let pos0 = self.len;
        if self.fixed_stale {
            self.restore_fixed(backend, &vec![0; self.fixed_bytes()])?;
        }
        match &mut self.offload {
            Some(o) => o.begin(backend, pos0, t, self.retain_from),
            None => Ok(()),
        }
    }

    /// Makes layer `idx`'s cache ready for compute (an offloaded cache: compute waits for its
    /// window to be loaded). Then [`layer_mut`](Self::layer_mut) gives it.
    pub fn acquire(&mut self, backend: &dyn Backend, idx: usize) -> Result<()> {
        match &mut self.offload {
            Some(o) => o.acquire(backend, idx).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Layer `idx`'s compute of this forward is queued: an offloaded cache copies the new
    /// positions out and starts loading a later layer into the window.
    pub fn release(&mut self, backend: &dyn Backend, idx: usize) -> Result<()> {
        match &mut self.offload {
            Some(o) => o.release(backend, idx),
            None => Ok(()),
        }
    }

    /// Whether the cache lives off the device.
    pub fn is_offloaded(&self) -> bool {
        self.offload.is_some()
    }

    /// Blocks, bytes moved and spilled, when offloaded.
    pub fn offload_stats(&self) -> Option<OffloadStats> {
        self.offload.as_ref().map(offload::Offload::stats)
    }

    /// Pinned host bytes of an offloaded cache (blocks, spare and staging buffers).
    pub fn host_bytes(&self) -> usize {
        self.offload.as_ref().map_or(0, offload::Offload::host_bytes)
    }

    /// The spill file of an offloaded cache (it exists once a block has been spilled).
    pub fn spill_path(&self) -> Option<&std::path::Path> {
        self.offload.as_ref().map(offload::Offload::spill_path)
    }

    /// Positions cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Makes room for `needed` positions in every layer (amortised doubling, capped at the
    /// model's context). The caller has already checked `needed <= max_positions`.
    pub fn reserve(&mut self, backend: &dyn Backend, needed: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        // Attached to a shared prefix of P positions, the own rows double (not the positions);
        // an offloaded cache's windows hold the prefix's positions too.
        let p = if self.offload.is_some() { 0 } else { self.shared_len() };
        let new_cap = p + grown_capacity(self.capacity - p, needed - p, self.max_positions - p);
        if let Some(o) = &mut self.offload {
            o.reserve(backend, needed, new_cap)?;
            self.capacity = o.capacity();
            return Ok(());
        }
        // The own caches hold positions P.. .
        for (layer, shape) in self.layers.iter_mut().zip(&self.shapes) {
            if shape.window.is_none() {
                layer.k = backend.grow_kv(&layer.k, 0..self.len - p, new_cap - p)?;
                layer.v = backend.grow_kv(&layer.v, 0..self.len - p, new_cap - p)?;
            }
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// The cache of attention layer `idx`, ready to take positions `pos .. pos + n` (a
    /// sliding-window layer on the device drops its front or grows first). Write and attend at
    /// positions less [`LayerKv::base`]. An offloaded cache gives the window layer `idx` was
    /// last acquired in.
    pub fn layer_for(&mut self, backend: &dyn Backend, idx: usize, pos: usize, n: usize) -> Result<&mut LayerKv> {
        if let Some(o) = &mut self.offload {
            return Ok(o.window(idx));
        }
        let kv = &mut self.layers[idx];
        if let Some(w) = self.shapes[idx].window {
            kv.slide(backend, w, (pos, n), (self.retain_from, self.max_positions))?;
        }
        Ok(kv)
    }

    /// The cache of attention layer `idx` as it stands (see [`layer_for`](Self::layer_for)).
    pub fn layer_mut(&mut self, idx: usize) -> &mut LayerKv {
        match &mut self.offload {
            Some(o) => o.window(idx),
            None => &mut self.layers[idx],
        }
    }

    /// Sliding-window layers keep every position from `pos` on, for the prefix store to take
    /// (`usize::MAX`: keep only what the windows see).
    pub fn retain_from(&mut self, pos: usize) {
        self.retain_from = pos;
    }

    /// The position sliding-window layers keep everything from (see
    /// [`retain_from`](Self::retain_from)).
    pub fn retained_from(&self) -> usize {
        self.retain_from
    }

    /// The shortest length [`truncate`](Self::truncate) can go back to: a sliding-window layer
    /// that dropped its front needs a window's worth of positions before the end; a state
    /// attached to a shared prefix keeps the whole prefix (it never writes there).
    pub fn min_len(&self) -> usize {
        let first_kept: Vec<usize> = match &self.offload {
            Some(o) => (0..self.shapes.len()).map(|l| o.first_kept(l)).collect(),
            None => self.layers.iter().map(LayerKv::first_position).collect(),
        };
        self.shapes
            .iter()
            .zip(first_kept)
            .filter_map(|(s, first)| s.window.filter(|_| first > 0).map(|w| first + w - 1))
            .max()
            .unwrap_or(0)
            .max(self.shared_len())
    }

    /// Marks `n` more positions as written (after every layer has appended them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Forgets positions from `len` on (e.g. to drop a generated tail); the bytes stay allocated.
    /// A `len` below [`min_len`](Self::min_len) forgets everything (the windows lack what it
    /// would need; a shared prefix is let go of, never written).
    pub fn truncate(&mut self, len: usize) {
        let len = if len < self.min_len() { 0 } else { len };
        self.len = self.len.min(len);
        if self.len == 0 {
            self.detach();
            // A recurrent layer's state cannot step back: start the next sequence from zero.
            self.fixed_stale = self.has_fixed();
            for kv in &mut self.layers {
                kv.base = 0;
            }
            if let Some(o) = &mut self.offload {
                o.forget_dropped();
            }
        }
    }

    /// Device bytes held by the caches of this state alone: a shared prefix it is attached to
    /// is not counted ([`held_bytes`] counts each prefix once over many states;
    /// [`SharedPrefix::size_bytes`] gives its own).
    pub fn size_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.k.size_bytes() + l.v.size_bytes()).sum::<usize>()
            + self.offload.as_ref().map_or(0, offload::Offload::device_bytes)
    }

    pub fn shapes(&self) -> &[KvShape] {
        &self.shapes
    }

    /// Adds zeroed fixed state for recurrent layers (indexed apart from the attention layers).
    pub fn with_fixed(mut self, backend: &dyn Backend, shapes: Vec<FixedShape>) -> Result<Self> {
        self.fixed = shapes
            .iter()
            .map(|s| s.tensors.iter().map(|d| backend.upload_f32(d.clone(), &vec![0.0; d.iter().product()])).collect())
            .collect::<Result<Vec<_>>>()?;
        self.fixed_shapes = shapes;
        Ok(self)
    }

    /// The fixed state of recurrent layer `idx`.
    pub fn fixed_mut(&mut self, idx: usize) -> &mut [Tensor] {
        &mut self.fixed[idx]
    }

    pub fn has_fixed(&self) -> bool {
        !self.fixed.is_empty()
    }

    /// The fixed state of every recurrent layer as little-endian f32 bytes, in layer then
    /// tensor order (empty without recurrent layers).
    pub fn snapshot_fixed(&self, backend: &dyn Backend) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.fixed_bytes());
        for t in self.fixed.iter().flatten() {
            out.extend(backend.to_host_f32(t)?.iter().flat_map(|x| x.to_le_bytes()));
        }
        Ok(out)
    }

    /// Replaces the fixed state with a [`snapshot_fixed`](Self::snapshot_fixed).
    pub fn restore_fixed(&mut self, backend: &dyn Backend, bytes: &[u8]) -> Result<()> {
        if bytes.len() != self.fixed_bytes() {
            return Err(OpsError::Backend(format!(
                "a fixed-state snapshot of {} B for a state of {} B",
                bytes.len(),
                self.fixed_bytes()
            )));
        }
        let mut rest = bytes;
        self.fixed_stale = false;
        for (layer, shape) in self.fixed.iter_mut().zip(&self.fixed_shapes) {
            for (t, dims) in layer.iter_mut().zip(&shape.tensors) {
                let n = dims.iter().product::<usize>() * 4;
                let (mine, tail) = rest.split_at(n);
                let vals: Vec<f32> =
                    mine.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                *t = backend.upload_f32(dims.clone(), &vals)?;
                rest = tail;
            }
        }
        Ok(())
    }

    /// Bytes of a fixed-state snapshot.
    pub fn fixed_bytes(&self) -> usize {
        self.fixed_shapes.iter().map(FixedShape::elems).sum::<usize>() * 4
    }

    /// Positions held in a shared prefix (0 when not attached).
    pub fn shared_len(&self) -> usize {
        self.shared.as_ref().map_or(0, |s| s.len)
    }

    /// The shared prefix this state is attached to.
    pub fn shared_prefix(&self) -> Option<&Arc<SharedPrefix>> {
        self.shared.as_ref()
    }

    /// Whether this state can hold its first positions in a shared prefix: any state with
    /// attention layers (on the device or offloaded, full or sliding-window, with or without
    /// recurrent state; see [`shared`]).
    pub fn can_share(&self) -> bool {
        !self.shapes.is_empty()
    }

    /// What a shared prefix's length is a multiple of for this state: the offloaded cache's
    /// block (it shares whole blocks), else [`DEVICE_PREFIX_BLOCK`] (a prefix-store block never
    /// straddles the prefix's end).
    pub fn share_block(&self) -> usize {
        self.offload.as_ref().map_or(DEVICE_PREFIX_BLOCK, offload::Offload::block)
    }

    /// Whether [`share_prefix`](Self::share_prefix) of `p` positions needs the state to stop at
    /// `p` (or near it): recurrent state is only at `len`, and a sliding-window layer drops
    /// positions a window at `p` sees once it has gone [`KEEP_BACK`] past.
    pub fn shares_only_near_the_end(&self) -> bool {
        self.has_fixed() || self.shapes.iter().any(|s| s.window.is_some())
    }

    /// Moves positions `0..p` (already written) into a new [`SharedPrefix`] and attaches this
    /// state to it: its own caches keep positions `p..` (same capacity in positions). Other
    /// states that start with the same tokens [`attach`](Self::attach) to the result.
    ///
    /// What the prefix holds: a full-attention layer's positions `0..p`; a sliding-window
    /// layer's last `window - 1` of them (from the position the prefix store still wants, if
    /// earlier: [`retain_from`](Self::retain_from)); an offloaded cache's first `p / block`
    /// blocks (`p` a whole number of blocks); the recurrent layers' state, which must be at `p`
    /// (the state is at `p`: [`len`](Self::len) is `p`).
    ///
    /// Fails when the state holds fewer than `p` positions, a sliding-window layer no longer
    /// holds one its window sees from `p`, or the state is already attached (to a prefix of
    /// another length; of length `p`, that prefix is returned).
    pub fn share_prefix(&mut self, backend: &dyn Backend, p: usize) -> Result<Arc<SharedPrefix>> {
        if let Some(s) = &self.shared {
            return match s.len == p {
                true => Ok(s.clone()),
                false => Err(OpsError::Backend(format!(
                    "a state attached to a shared prefix of {} positions cannot share one of {p}",
                    s.len
                ))),
            };
        }
        if !self.can_share() || p == 0 || p > self.len {
            return Err(OpsError::Backend(format!("cannot share {p} positions of a state of {}", self.len)));
        }
        if self.has_fixed() && p != self.len {
            return Err(OpsError::Backend(format!(
                "cannot share {p} positions of a state with recurrent layers at position {}: share them when the state is at {p}",
                self.len
            )));
        }
        let fixed = self.snapshot_fixed(backend)?;
        if let Some(o) = &mut self.offload {
            let host = o.share(backend, p)?;
            let shared = Arc::new(SharedPrefix { layers: Vec::new(), host: Some(host), fixed, len: p });
            self.shared = Some(shared.clone());
            return Ok(shared);
        }
        // The prefix's rows per layer: a sliding-window layer's from the first position its
        // window sees from p on (or the store still wants).
        let mut rows = Vec::with_capacity(self.layers.len());
        for (l, (kv, shape)) in self.layers.iter().zip(&self.shapes).enumerate() {
            let start = match shape.window {
                None => 0,
                Some(w) => {
                    let seen = p.saturating_sub(w.saturating_sub(1));
                    if kv.base > seen {
                        return Err(OpsError::Backend(format!(
                            "sliding-window layer {l} keeps positions from {} but position {p} still sees {seen}: share a prefix before the window moves past it",
                            kv.base
                        )));
                    }
                    seen.min(self.retain_from).max(kv.base)
                }
            };
            let keep = start - kv.base..p - kv.base;
            let (k, v) = (backend.grow_kv(&kv.k, keep.clone(), p - start)?, backend.grow_kv(&kv.v, keep, p - start)?);
            rows.push(PrefixRows { k, v, start });
        }
        let shared = Arc::new(SharedPrefix { layers: rows, host: None, fixed, len: p });
        for (l, kv) in self.layers.iter_mut().enumerate() {
            // Own rows keep the capacity in positions they had (a full layer's from position 0).
            let cap = (kv.capacity() + kv.base).saturating_sub(p).max(self.len - p).max(1);
            kv.k = backend.grow_kv(&kv.k, p - kv.base..self.len - kv.base, cap)?;
            kv.v = backend.grow_kv(&kv.v, p - kv.base..self.len - kv.base, cap)?;
            kv.base = p;
            kv.prefix = Some(PrefixLayer { shared: shared.clone(), layer: l });
        }
        self.shared = Some(shared.clone());
        Ok(shared)
    }

    /// Attaches an empty state to `shared`: it then holds positions `0..shared.len()` without
    /// a copy of their KV, its own caches (made anew, [`INITIAL_CAPACITY`] rows) taking
    /// positions from there; an offloaded cache's first blocks point at the prefix's; a
    /// recurrent model's state is the prefix's snapshot, copied in. Fails unless the state is
    /// empty and its layers, placement (device or offloaded) and recurrent state match the
    /// prefix's.
    pub fn attach(&mut self, backend: &dyn Backend, shared: Arc<SharedPrefix>) -> Result<()> {
        let p = shared.len;
        let fits = match (&self.offload, &shared.host) {
            (Some(_), Some(_)) => true,
            (None, None) => {
                shared.layers.len() == self.layers.len()
                    && shared.layers.iter().zip(&self.shapes).all(|(r, s)| {
                        r.k.shape() == [s.n_kv_heads, p - r.start, s.head_dim] && (s.window.is_some() || r.start == 0)
                    })
            }
            _ => false,
        };
        if self.len != 0
            || !self.can_share()
            || !fits
            || shared.fixed.len() != self.fixed_bytes()
            || p == 0
            || p >= self.max_positions
        {
            return Err(OpsError::Backend(format!(
                "cannot attach a shared prefix of {p} positions to a state of {} positions (it must be empty, of the same layers and recurrent state, and placed alike: on the device or offloaded)",
                self.len
            )));
        }
        match (&mut self.offload, &shared.host) {
            (Some(o), Some(host)) => o.attach(backend, host)?,
            _ => {
                let rows = INITIAL_CAPACITY.min(self.max_positions - p);
                for (l, (kv, s)) in self.layers.iter_mut().zip(&self.shapes).enumerate() {
                    *kv = LayerKv::zeros(backend, s, rows)?;
                    kv.base = p;
                    kv.prefix = Some(PrefixLayer { shared: shared.clone(), layer: l });
                }
                self.capacity = p + rows;
            }
        }
        self.len = p;
        let fixed = self.has_fixed().then(|| shared.clone());
        self.shared = Some(shared);
        if let Some(shared) = fixed
            && let Err(e) = self.restore_fixed(backend, &shared.fixed)
        {
            // Not attached after all: the next sequence starts from nothing.
            self.truncate(0);
            return Err(e);
        }
        Ok(())
    }

    /// Lets go of a shared prefix (the state is empty): the own caches' rows start at 0 again
    /// (an offloaded cache gives up the prefix's blocks in [`truncate`](Self::truncate)).
    fn detach(&mut self) {
        if let Some(s) = self.shared.take() {
            if self.offload.is_none() {
                self.capacity -= s.len;
            }
            for kv in &mut self.layers {
                kv.base = 0;
                kv.prefix = None;
            }
        }
    }

    /// How this state's positions are cut into prefix-store blocks.
    pub fn block_layout(&self, backend: &dyn Backend) -> Result<BlockLayout> {
        let shape = *self.shapes.first().ok_or_else(|| OpsError::Backend("a KV cache with no layers".into()))?;
        if self.shapes.iter().any(|s| !s.same_rows(&shape)) {
            return Err(OpsError::Backend("the prefix store needs every attention layer of one shape".into()));
        }
        let block = self.offload.as_ref().map_or(DEVICE_PREFIX_BLOCK, offload::Offload::block);
        let kv_dtype = backend.kv_dtype();
        let elem_bytes = kv_dtype.size_bytes();
        let half_bytes = shape.n_kv_heads * block * shape.head_dim * elem_bytes;
        Ok(BlockLayout {
            block,
            n_layers: self.shapes.len(),
            n_kv_heads: shape.n_kv_heads,
            head_dim: shape.head_dim,
            kv_dtype,
            elem_bytes,
            half_bytes,
            layer_bytes: (2 * half_bytes).next_multiple_of(ollm_io::direct::ALIGN),
            fixed_bytes: self.fixed_bytes(),
        })
    }

    /// Calls `f` with every attention layer's copy of block `bi` (positions `bi * block ..`,
    /// all already written), each [`BlockLayout::layer_bytes`] long and 4096-aligned.
    pub fn export_block<E: From<OpsError>>(
        &mut self,
        backend: &dyn Backend,
        bi: usize,
        f: impl FnOnce(&[&[u8]]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let lay = self.block_layout(backend)?;
        if (bi + 1) * lay.block > self.len {
            return Err(OpsError::Backend(format!("block {bi} is not complete ({} positions cached)", self.len)).into());
        }
        if let Some(o) = &mut self.offload {
            return o.with_block(backend, bi, f);
        }
        // The cache was written by compute; copy the block's rows out once it has run.
        backend.copy_wait(&backend.compute_marker()?)?;
        let mut staging = backend.host_alloc(lay.n_layers * lay.layer_bytes)?;
        let p = self.shared_len();
        if bi * lay.block < p && (bi + 1) * lay.block > p {
            return Err(OpsError::Backend(format!(
                "block {bi} straddles the end of the shared prefix at position {p}: share prefixes in whole blocks of {}",
                lay.block
            ))
            .into());
        }
        for (l, kv) in self.layers.iter().enumerate() {
            // A block of the shared prefix comes from its caches (rows from its start).
            if let Some(pre) = kv.prefix.as_ref().filter(|_| bi * lay.block < p) {
                let Some(pos) = (bi * lay.block).checked_sub(pre.start()) else {
                    return Err(OpsError::Backend(format!(
                        "block {bi} of sliding-window layer {l} is not in the shared prefix (it holds positions from {})",
                        pre.start()
                    ))
                    .into());
                };
                let span = KvBlockSpan { offset: l * lay.layer_bytes, block: lay.block, row: 0, pos, n: lay.block };
                backend.kv_to_host_async(pre.k(), &mut staging, span)?;
                backend.kv_to_host_async(
                    pre.v(),
                    &mut staging,
                    KvBlockSpan { offset: span.offset + lay.half_bytes, ..span },
                )?;
                continue;
            }
            let Some(pos) = (bi * lay.block).checked_sub(kv.base) else {
                return Err(OpsError::Backend(format!(
                    "block {bi} of sliding-window layer {l} was dropped (it keeps positions from {})",
                    kv.base
                ))
                .into());
            };
            let span = KvBlockSpan { offset: l * lay.layer_bytes, block: lay.block, row: 0, pos, n: lay.block };
            backend.kv_to_host_async(&kv.k, &mut staging, span)?;
            backend.kv_to_host_async(
                &kv.v,
                &mut staging,
                KvBlockSpan { offset: span.offset + lay.half_bytes, ..span },
            )?;
        }
        backend.host_wait(&backend.copy_marker()?)?;
        let views: Vec<&[u8]> = staging.as_slice().chunks(lay.layer_bytes).collect();
        f(&views)
    }

    /// Appends one block of positions at `len()` (a multiple of the block): `fill` writes every
    /// attention layer's block as [`export_block`](Self::export_block) gave it. If `fill` fails
    /// the state is unchanged.
    pub fn import_block<E: From<OpsError>>(
        &mut self,
        backend: &dyn Backend,
        fill: impl FnOnce(&mut [&mut [u8]]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let mut bufs = self.block_buffers(backend)?;
        let lb = self.block_layout(backend)?.layer_bytes;
        let filled = {
            let mut views: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b.as_mut_slice()[..lb]).collect();
            fill(&mut views)
        };
        match filled {
            Ok(()) => Ok(self.push_block(backend, bufs)?),
            Err(e) => {
                self.return_buffers(bufs);
                Err(e)
            }
        }
    }

    /// Host buffers for one block of every attention layer, each at least
    /// [`BlockLayout::layer_bytes`]: fill them (on any thread) and hand them to
    /// [`push_block`](Self::push_block), or back with [`return_buffers`](Self::return_buffers).
    pub fn block_buffers(&mut self, backend: &dyn Backend) -> Result<Vec<HostBuffer>> {
        let lay = self.block_layout(backend)?;
        match &mut self.offload {
            Some(o) => o.take_buffers(backend),
            None => (0..lay.n_layers).map(|_| backend.host_alloc(lay.layer_bytes)).collect(),
        }
    }

    /// Buffers from [`block_buffers`](Self::block_buffers) that were not pushed.
    pub fn return_buffers(&mut self, bufs: Vec<HostBuffer>) {
        if let Some(o) = &mut self.offload {
            o.return_buffers(bufs);
        }
    }

    /// Appends one block of positions at `len()` (a multiple of the block) from filled
    /// [`block_buffers`](Self::block_buffers).
    pub fn push_block(&mut self, backend: &dyn Backend, bufs: Vec<HostBuffer>) -> Result<()> {
        let lay = self.block_layout(backend)?;
        if !self.len.is_multiple_of(lay.block)
            || self.len + lay.block > self.max_positions
            || bufs.len() != lay.n_layers
        {
            return Err(OpsError::Backend(format!(
                "cannot import a block of {} positions at position {} (context {})",
                lay.block, self.len, self.max_positions
            )));
        }
        if let Some(o) = &mut self.offload {
            o.push_block(backend, self.len / lay.block, bufs)?;
            self.len += lay.block;
            self.retain_from = self.retain_from.max(self.len);
            return Ok(());
        }
        self.reserve(backend, self.len + lay.block)?;
        // Imported positions are in the prefix store already.
        self.retain_from = self.retain_from.max(self.len + lay.block);
        for l in 0..self.layers.len() {
            self.layer_for(backend, l, self.len, lay.block)?;
        }
        backend.copy_wait(&backend.compute_marker()?)?;
        for (kv, buf) in self.layers.iter_mut().zip(&bufs) {
            let pos = self.len - kv.base;
            let span = KvBlockSpan { offset: 0, block: lay.block, row: 0, pos, n: lay.block };
            backend.kv_from_host_async(buf, &mut kv.k, span)?;
            backend.kv_from_host_async(buf, &mut kv.v, KvBlockSpan { offset: lay.half_bytes, ..span })?;
        }
        let copied = backend.copy_marker()?;
        backend.compute_wait(&copied)?;
        backend.host_wait(&copied)?;
        self.len += lay.block;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_capacity_follows_the_doubling() {
        assert_eq!(kv_capacity(100, 131072), 256);
        assert_eq!(kv_capacity(8192, 131072), 8192);
        assert_eq!(kv_capacity(8193, 131072), 16384);
        assert_eq!(kv_capacity(100_000, 131072), 131072);
        assert_eq!(kv_capacity(300, 300), 300);
    }

    /// A bf16 cache (the CLI's CPU default) holds half the bytes of an f32 one, and the block
    /// layout the prefix store and the offload use says so.
    #[test]
    fn size_bytes_and_block_layout_follow_the_kv_dtype() {
        use ollm_ops::cpu::{CpuBackend, Precision};
        let (f, b) = (CpuBackend::new(), CpuBackend::with_precision(Precision::Bf16Activations));
        let shapes = vec![KvShape::full(2, 8); 3];
        let sf = SeqState::new(&f, shapes.clone(), 4096).expect("f32 state");
        let sb = SeqState::new(&b, shapes, 4096).expect("bf16 state");
        // 3 layers × K and V × [2, 256, 8].
        assert_eq!(sf.size_bytes(), 3 * 2 * 2 * 256 * 8 * 4);
        assert_eq!(sb.size_bytes() * 2, sf.size_bytes());
        let (lf, lb) = (sf.block_layout(&f).expect("layout"), sb.block_layout(&b).expect("layout"));
        assert_eq!((lf.kv_dtype, lb.kv_dtype), (DType::F32, DType::BF16));
        assert_eq!((lf.half_bytes, lb.half_bytes), (2 * 256 * 8 * 4, 2 * 256 * 8 * 2));
    }

    /// The planner's figure is what the store allocates when a sequence grows a token at a time.
    #[test]
    fn a_cache_grown_token_by_token_reaches_kv_capacity() {
        let be = ollm_ops::cpu::CpuBackend::new();
        let mut st = SeqState::new(&be, vec![KvShape::full(1, 2)], 3000).expect("state");
        for needed in 1..=2100 {
            st.reserve(&be, needed).expect("reserve");
            assert_eq!(st.capacity, kv_capacity(needed, 3000), "at {needed}");
        }
    }
}

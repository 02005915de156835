//! ollm-kv: per-sequence decode state. Knows layers, heads and positions; knows nothing of
//! models.
//!
//! A [`SeqState`] is owned by the engine's session and passed into a model's forward; models
//! never keep per-sequence state themselves, so one loaded model can serve many sequences.
//! Every layer's K/V lives either on the compute backend, growing by doubling, or off it
//! ([`KvOffload`]): in blocks in pinned RAM and a spill file, with two device windows the layers
//! take turns in (see [`offload`]). A model brackets each layer's use of its cache with
//! [`SeqState::acquire`] and [`SeqState::release`]; both are free when the cache is on the device.

pub mod offload;

use ollm_ops::{Backend, Result, Tensor};

pub use offload::{KvOffload, OffloadStats};

/// Shape of one attention layer's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// K and V of one attention layer, each `[n_kv_heads, capacity, head_dim]` in the backend's
/// KV dtype (`Backend::kv_dtype`: f32 on the CPU, bf16 on CUDA), valid for the sequence's first
/// `SeqState::len` positions.
#[derive(Debug)]
pub struct LayerKv {
    pub k: Tensor,
    pub v: Tensor,
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
}

/// Initial capacity in positions; the cache doubles as needed.
const INITIAL_CAPACITY: usize = 256;

impl SeqState {
    /// An empty state for a model with these attention layers.
    pub fn new(backend: &dyn Backend, shapes: Vec<KvShape>, max_positions: usize) -> Result<Self> {
        let capacity = INITIAL_CAPACITY.min(max_positions.max(1));
        let layers = shapes
            .iter()
            .map(|s| {
                Ok(LayerKv {
                    k: backend.kv_zeros(vec![s.n_kv_heads, capacity, s.head_dim])?,
                    v: backend.kv_zeros(vec![s.n_kv_heads, capacity, s.head_dim])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, offload: None, shapes, len: 0, capacity, max_positions })
    }

    /// An empty state whose cache lives in host blocks and a spill file as `cfg` says, every
    /// layer of one shape. The device holds two windows of `capacity` positions.
    pub fn offloaded(
        backend: &dyn Backend,
        shapes: Vec<KvShape>,
        max_positions: usize,
        capacity: usize,
        cfg: KvOffload,
    ) -> Result<Self> {
        let shape = *shapes.first().ok_or_else(|| ollm_ops::OpsError::Backend("a KV cache with no layers".into()))?;
        if shapes.iter().any(|s| *s != shape) {
            return Err(ollm_ops::OpsError::Backend("an offloaded KV cache needs every layer of one shape".into()));
        }
        let capacity = capacity.clamp(1, max_positions.max(1));
        let off = offload::Offload::new(backend, shape, shapes.len(), capacity, cfg)?;
        Ok(Self { layers: Vec::new(), offload: Some(off), shapes, len: 0, capacity, max_positions })
    }

    /// Starts a forward of `t` positions: an offloaded cache queues the loads of the first
    /// layers. Call after [`reserve`](Self::reserve).
    pub fn begin(&mut self, backend: &dyn Backend, t: usize) -> Result<()> {
        let pos0 = self.len;
        match &mut self.offload {
            Some(o) => o.begin(backend, pos0, t),
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
        let new_cap = needed.max(self.capacity * 2).min(self.max_positions.max(needed));
        if let Some(o) = &mut self.offload {
            o.reserve(backend, needed, new_cap)?;
            self.capacity = o.capacity();
            return Ok(());
        }
        for layer in &mut self.layers {
            layer.k = backend.grow_kv(&layer.k, self.len, new_cap)?;
            layer.v = backend.grow_kv(&layer.v, self.len, new_cap)?;
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// The cache of attention layer `idx`.
    /// An offloaded cache gives the window layer `idx` was last acquired in.
    pub fn layer_mut(&mut self, idx: usize) -> &mut LayerKv {
        match &mut self.offload {
            Some(o) => o.window(idx),
            None => &mut self.layers[idx],
        }
    }

    /// Marks `n` more positions as written (after every layer has appended them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Forgets positions from `len` on (e.g. to drop a generated tail); the bytes stay allocated.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Device bytes held by the caches.
    pub fn size_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.k.size_bytes() + l.v.size_bytes()).sum::<usize>()
            + self.offload.as_ref().map_or(0, offload::Offload::device_bytes)
    }

    pub fn shapes(&self) -> &[KvShape] {
        &self.shapes
    }
}

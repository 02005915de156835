//! ollm-kv: per-sequence decode state. Knows layers, heads and positions; knows nothing of
//! models.
//!
//! A [`SeqState`] is owned by the engine's session and passed into a model's forward; models
//! never keep per-sequence state themselves, so one loaded model can serve many sequences.
//! Today every layer's K/V lives on the compute backend and grows by doubling; spilling to host
//! memory and disk comes with the KV-store work behind the same type.

use ollm_ops::{Backend, Result, Tensor};

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
        Ok(Self { layers, shapes, len: 0, capacity, max_positions })
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
        for layer in &mut self.layers {
            layer.k = backend.grow_kv(&layer.k, self.len, new_cap)?;
            layer.v = backend.grow_kv(&layer.v, self.len, new_cap)?;
        }
        self.capacity = new_cap;
        Ok(())
    }

    /// The cache of attention layer `idx`.
    pub fn layer_mut(&mut self, idx: usize) -> &mut LayerKv {
        &mut self.layers[idx]
    }

    /// Marks `n` more positions as written (after every layer has appended them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Forgets positions from `len` on (e.g. to drop a generated tail); the bytes stay allocated.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held by the caches.
    pub fn size_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.k.size_bytes() + l.v.size_bytes()).sum()
    }

    pub fn shapes(&self) -> &[KvShape] {
        &self.shapes
    }
}

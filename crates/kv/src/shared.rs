//! A prefix's KV held once for every sequence that starts with it ([`SharedPrefix`]).
//!
//! When several sequences begin with the same tokens (one document and many questions, or one
//! system prompt), the K/V of those positions are the same in each. A [`SeqState`](crate::SeqState)
//! attached to a shared prefix of `P` positions keeps only positions `P..` in its own caches
//! (each attention layer's rows start at [`LayerKv::base`](crate::LayerKv::base) `= P`), and its
//! layers point at the prefix's caches ([`LayerKv::prefix`](crate::LayerKv::prefix)); attention
//! runs over both (`Compute::attention_prefixed`). The prefix is read-only once made: a
//! sequence that goes back before `P` lets go of it and never writes to it.
//!
//! Every kind of state shares:
//! - a full-attention layer on the device holds positions `0..P` in the prefix;
//! - a sliding-window layer on the device holds in the prefix only the positions its window can
//!   still see from `P` on (the last `window - 1`, or more when the prefix store still wants
//!   them: [`PrefixLayer::start`]); its own rows start at `P` and slide over [prefix tail + own
//!   rows], and once its window has moved past the whole prefix it lets go of the tail;
//! - an offloaded cache ([`KvOffload`](crate::KvOffload)) holds the prefix's blocks in pinned
//!   RAM once ([`HostPrefix`]): each attached sequence's block list points at them, and its
//!   device window loads them as it loads its own (so attention is the private path's, bit for
//!   bit);
//! - a recurrent layer's state after `P` is small and changes every token: the prefix keeps a
//!   snapshot of it at `P`, copied into each sequence when it attaches.

use std::sync::Arc;

use ollm_ops::{HostBuffer, Tensor};

/// K and V of the positions `0..len` every sequence attached to it starts with, held once, as
/// the states that made it keep their caches: on the device per attention layer
/// ([`PrefixRows`]), or in pinned host blocks for offloaded caches ([`HostPrefix`]); plus a
/// recurrent model's fixed state at `len`. Owned through an `Arc` by every state attached to
/// it; nothing writes to it after [`SeqState::share_prefix`](crate::SeqState::share_prefix)
/// made it.
#[derive(Debug)]
pub struct SharedPrefix {
    /// Per attention layer (empty when the prefix is held in host blocks).
    pub(crate) layers: Vec<PrefixRows>,
    pub(crate) host: Option<HostPrefix>,
    /// The recurrent layers' fixed state at position `len`
    /// ([`SeqState::snapshot_fixed`](crate::SeqState::snapshot_fixed) bytes; empty without).
    pub(crate) fixed: Vec<u8>,
    pub(crate) len: usize,
}

/// One attention layer's rows of a prefix on the device: K and V `[n_kv, len - start, d]` in the
/// KV dtype, row `r` holding position `start + r`. `start` is 0 for a full-attention layer.
#[derive(Debug)]
pub struct PrefixRows {
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
    pub(crate) start: usize,
}

/// A prefix's blocks in pinned host RAM, as an offloaded cache cuts them (see
/// [`offload`](crate::offload)): per layer, blocks `0..len / block` (None: a sliding-window
/// layer had dropped it, no sequence attached at `len` can see it).
#[derive(Debug)]
pub struct HostPrefix {
    pub(crate) block: usize,
    pub(crate) block_bytes: usize,
    pub(crate) blocks: Vec<Vec<Option<Arc<HostBuffer>>>>,
}

impl SharedPrefix {
    /// Positions it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Device bytes of its caches (held once, however many states are attached).
    pub fn size_bytes(&self) -> usize {
        self.layers.iter().map(|r| r.k.size_bytes() + r.v.size_bytes()).sum()
    }

    /// Pinned host bytes of its blocks (an offloaded cache's prefix; held once) and of its
    /// fixed-state snapshot.
    pub fn host_bytes(&self) -> usize {
        let blocks = self.host.as_ref().map_or(0, |h| h.blocks.iter().flatten().flatten().count() * h.block_bytes);
        blocks + self.fixed.len()
    }

    /// Whether its KV is held in host blocks (made by an offloaded cache).
    pub fn is_offloaded(&self) -> bool {
        self.host.is_some()
    }
}

/// One attention layer's share of a [`SharedPrefix`] held on the device, as a
/// [`LayerKv`](crate::LayerKv) sees it.
#[derive(Debug, Clone)]
pub struct PrefixLayer {
    pub(crate) shared: Arc<SharedPrefix>,
    pub(crate) layer: usize,
}

impl PrefixLayer {
    fn rows_of(&self) -> &PrefixRows {
        &self.shared.layers[self.layer]
    }

    /// K `[n_kv, rows, d]`.
    pub fn k(&self) -> &Tensor {
        &self.rows_of().k
    }

    /// V `[n_kv, rows, d]`.
    pub fn v(&self) -> &Tensor {
        &self.rows_of().v
    }

    /// The prefix's end: positions before it are the prefix's, the own rows start there.
    pub fn len(&self) -> usize {
        self.shared.len
    }

    pub fn is_empty(&self) -> bool {
        self.shared.len == 0
    }

    /// The first position it holds (0 but for a sliding-window layer, which holds only what
    /// its window can still see from [`len`](Self::len) on).
    pub fn start(&self) -> usize {
        self.rows_of().start
    }

    /// Positions it holds: `start()..len()`, at rows `0..rows()` of [`k`](Self::k) and
    /// [`v`](Self::v).
    pub fn rows(&self) -> usize {
        self.shared.len - self.rows_of().start
    }
}

/// Bytes the caches of these states hold together, on the device and in pinned host RAM: each
/// state's own caches, and each shared prefix once however many of them are attached to it.
/// Returns (device bytes, host bytes).
pub fn held_bytes_split<'a>(states: impl IntoIterator<Item = &'a crate::SeqState>) -> (usize, usize) {
    let mut seen: Vec<*const SharedPrefix> = Vec::new();
    let (mut device, mut host) = (0, 0);
    for s in states {
        device += s.size_bytes();
        host += s.host_bytes();
        if let Some(p) = s.shared_prefix() {
            let ptr = Arc::as_ptr(p);
            if !seen.contains(&ptr) {
                seen.push(ptr);
                device += p.size_bytes();
                host += p.host_bytes();
            }
        }
    }
    (device, host)
}

/// Device bytes the caches of these states hold together: each state's own caches, and each
/// shared prefix once however many of them are attached to it ([`held_bytes_split`]'s first).
pub fn held_bytes<'a>(states: impl IntoIterator<Item = &'a crate::SeqState>) -> usize {
    held_bytes_split(states).0
}

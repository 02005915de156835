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
//! Only states whose every attention layer keeps every position, on the device, without
//! recurrent state, share ([`SeqState::can_share`](crate::SeqState::can_share)): a
//! sliding-window layer drops its front per sequence, an offloaded cache moves in blocks of its
//! own, and a recurrent layer's state at `P` would need its own copy; those states keep private
//! copies, as before.

use std::sync::Arc;

use ollm_ops::Tensor;

/// K and V of positions `0..len` of every attention layer, each `[n_kv, len, d]` in the KV
/// dtype, on the backend the sequences compute on. Owned through an `Arc` by every state
/// attached to it; nothing writes to it after [`SeqState::share_prefix`](crate::SeqState::share_prefix)
/// made it.
#[derive(Debug)]
pub struct SharedPrefix {
    pub(crate) layers: Vec<(Tensor, Tensor)>,
    pub(crate) len: usize,
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
        self.layers.iter().map(|(k, v)| k.size_bytes() + v.size_bytes()).sum()
    }
}

/// One attention layer's share of a [`SharedPrefix`], as a [`LayerKv`](crate::LayerKv) sees it.
#[derive(Debug, Clone)]
pub struct PrefixLayer {
    pub(crate) shared: Arc<SharedPrefix>,
    pub(crate) layer: usize,
}

impl PrefixLayer {
    /// K `[n_kv, len, d]`.
    pub fn k(&self) -> &Tensor {
        &self.shared.layers[self.layer].0
    }

    /// V `[n_kv, len, d]`.
    pub fn v(&self) -> &Tensor {
        &self.shared.layers[self.layer].1
    }

    /// Positions `0..len` it holds.
    pub fn len(&self) -> usize {
        self.shared.len
    }

    pub fn is_empty(&self) -> bool {
        self.shared.len == 0
    }
}

/// Device bytes the caches of these states hold together: each state's own caches, and each
/// shared prefix once however many of them are attached to it.
pub fn held_bytes<'a>(states: impl IntoIterator<Item = &'a crate::SeqState>) -> usize {
    let mut seen: Vec<*const SharedPrefix> = Vec::new();
    let mut total = 0;
    for s in states {
        total += s.size_bytes();
        if let Some(p) = s.shared_prefix() {
            let ptr = Arc::as_ptr(p);
            if !seen.contains(&ptr) {
                seen.push(ptr);
                total += p.size_bytes();
            }
        }
    }
    total
}

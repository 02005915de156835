//! One-token decode steps replayed as device graphs ([`StepGraphs`]), for every family whose
//! step can be captured: a family asks [`eligible`] whether this forward qualifies, names what
//! its launches bake in ([`StepKey`]) and hands its ordinary forward to [`decode_step`]. The
//! forward itself does not change: the backend records it once and replays it for the next
//! tokens (docs/architecture.md, "Decode graphs").

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use ollm_kv::SeqState;
use ollm_ops::{Backend, StepGraphs, Tensor};

use crate::{BatchSeq, LogitsWanted, Result};

/// A fresh identity for a loaded model (part of every key, so that a graph never outlives the
/// weights it was captured with, even when another model's land at the same addresses).
pub fn model_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The step graphs for a forward of `items`, when it can run as one: the backend offers them,
/// one sequence of one token inside the vocabulary (`vocab`: a replay checks no id) whose last
/// logits are wanted, no tree and no trace, every layer resident (`resident`), and the KV cache
/// on the device, the sequence's own (no shared prefix) and with no recurrent state. Everything
/// else runs plainly.
pub fn eligible<'b>(
    be: &'b dyn Backend,
    items: &[BatchSeq<'_>],
    (vocab, resident, traced): (usize, bool, bool),
) -> Option<&'b dyn StepGraphs> {
    let [it] = items else { return None };
    let plain = it.ids.len() != 1
        || it.ids.iter().any(|&id| id as usize >= vocab)
        || it.wanted != LogitsWanted::Last
        || it.tree.is_some()
        || traced
        || !resident
        || it.state.is_offloaded()
        || it.state.shared_len() != 0
        || it.state.has_fixed()
        || it.state.len() + 1 > it.state.max_positions();
    if plain { None } else { be.step_graphs() }
}

/// What a captured step's launches bake in, hashed: the model, its tables' and every KV
/// cache's addresses and shapes, the step's row count.
pub struct StepKey<'g> {
    g: &'g dyn StepGraphs,
    h: std::collections::hash_map::DefaultHasher,
}

impl std::fmt::Debug for StepKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StepKey({:#x})", self.h.finish())
    }
}

impl<'g> StepKey<'g> {
    pub fn new(g: &'g dyn StepGraphs, model: u64, rows: usize) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (model, rows).hash(&mut h);
        Self { g, h }
    }

    /// Adds a tensor: its buffer's address and its shape.
    pub fn tensor(&mut self, t: &Tensor) -> &mut Self {
        (self.g.buffer_addr(t), t.shape()).hash(&mut self.h);
        self
    }

    /// Adds every attention layer's K and V caches of `state` (`layers` of them).
    pub fn caches(&mut self, state: &mut SeqState, layers: usize) -> &mut Self {
        for l in 0..layers {
            let kv = state.layer_mut(l);
            (self.g.buffer_addr(&kv.k), kv.k.shape(), self.g.buffer_addr(&kv.v), kv.base).hash(&mut self.h);
        }
        self
    }

    pub fn finish(&self) -> u64 {
        self.h.finish()
    }
}

/// A family's ordinary forward of a batch (one item here): logits per item.
pub type StepForward<'f> = dyn FnMut(&mut [BatchSeq<'_>]) -> Result<Vec<Vec<f32>>> + 'f;

/// Runs `forward` (the family's ordinary forward of the one item of `items`) as the step kept
/// under `key`: replayed when the backend has it for this position, else captured (and run)
/// now. The caller has already made room for the step (the KV cache reserved, the RoPE table
/// grown to cover it) and built `key` from the result. A step the backend could not capture
/// runs plainly; so does any step after an error inside the capture (nothing of it ran).
pub fn decode_step(
    g: &dyn StepGraphs,
    key: u64,
    items: &mut [BatchSeq<'_>],
    forward: &mut StepForward<'_>,
) -> Result<Vec<Vec<f32>>> {
    let (ids, pos) = match items {
        [it] => (it.ids.to_vec(), it.state.len()),
        _ => return forward(items),
    };
    if let Some(logits) = g.replay_step(key, &ids, pos)? {
        items[0].state.advance(ids.len());
        return Ok(vec![logits]);
    }
    if g.begin_step_capture(key, &ids, pos).is_err() {
        return forward(items);
    }
    let out = forward(items);
    let kept = g.end_step_capture();
    match out {
        Ok(out) if kept => Ok(out),
        _ => {
            // Nothing ran (or the graph failed): forget the step's bookkeeping and run plainly.
            items[0].state.truncate(pos);
            forward(items)
        }
    }
}

//! A session: one sequence's tokens and decode state over a shared model.

use std::sync::Arc;

use ollm_kv::{PrefixCache, PrefixConfig, Restored, SharedPrefix, Stored};
use ollm_models::{BatchSeq, CausalLm, LogitsWanted, SeqState, TraceSink, TreeMask};

use crate::{EngineError, Result};

/// Prompt tokens per forward during prefill. The model runs a call layer by layer in small
/// tiles, so a call bounds only the residual stream (tokens × hidden × 4 bytes); each call reads
/// every weight once, so fewer calls mean fewer passes over streamed weights.
pub const DEFAULT_PREFILL_CHUNK: usize = 16384;

/// A point a session can return to after a speculative verification forward
/// ([`Session::checkpoint`], [`Session::roll_back`]).
#[derive(Debug)]
pub struct Checkpoint {
    len: usize,
    /// A recurrent model's fixed state at `len` ([`SeqState::snapshot_fixed`]).
    fixed: Option<Vec<u8>>,
}

/// Owns one sequence's state (KV cache) and its tokens; borrows the model through an `Arc`.
#[derive(Debug)]
pub struct Session {
    model: Arc<dyn CausalLm>,
    state: SeqState,
    tokens: Vec<u32>,
    prefill_chunk: usize,
    prefix: Option<PrefixCache>,
    /// Fixed-state snapshots taken at block ends during prefill (recurrent models with a prefix
    /// cache), by position, for the entries stored next.
    snapshots: Vec<(usize, Vec<u8>)>,
}

impl Session {
    pub fn new(model: Arc<dyn CausalLm>) -> Result<Self> {
        let state = model.new_state()?;
        Ok(Self {
            model,
            state,
            tokens: Vec::new(),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            prefix: None,
            snapshots: Vec::new(),
        })
    }

    /// Keeps prompt prefixes in the persistent cache `cfg` names: [`prefill`](Self::prefill) of
    /// a fresh session loads the longest stored prefix, [`store_prefix`](Self::store_prefix)
    /// adds the prompt's blocks.
    pub fn with_prefix_cache(mut self, cfg: &PrefixConfig) -> Result<Self> {
        let layout = self.state.block_layout(self.model.backend()).map_err(ollm_models::ModelError::from)?;
        self.prefix = Some(PrefixCache::open(cfg, self.model.info().fingerprint, layout)?);
        // Sliding-window layers keep what the store has yet to take.
        self.state.retain_from(self.state.len());
        Ok(self)
    }

    /// The prefix cache, when one is attached.
    pub fn prefix_cache(&self) -> Option<&PrefixCache> {
        self.prefix.as_ref()
    }

    pub fn with_prefill_chunk(mut self, tokens: usize) -> Self {
        self.prefill_chunk = tokens.max(1);
        self
    }

    pub fn model(&self) -> &Arc<dyn CausalLm> {
        &self.model
    }

    /// Every token fed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Feeds `ids` in chunks and returns the logits after the last one.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        Ok(self.prefill_cached(ids)?.0)
    }

    /// Like [`prefill`](Self::prefill); a fresh session with a prefix cache first loads the
    /// longest stored prefix of `ids` (always leaving one token to compute) and says what it
    /// loaded.
    pub fn prefill_cached(&mut self, ids: &[u32]) -> Result<(Vec<f32>, Option<Restored>)> {
        let done = self.prefill_unless(ids, &|| false)?;
        Ok(done.unwrap_or_default())
    }

    /// Like [`prefill_cached`](Self::prefill_cached), asking `cancelled` between chunks (a
    /// server's client may have gone away); `Ok(None)` when it said stop. The chunks fed by
    /// then stay in the session, so a caller may go on from there or
    /// [`rewind`](Self::rewind).
    pub fn prefill_unless(
        &mut self,
        ids: &[u32],
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Option<(Vec<f32>, Option<Restored>)>> {
        let restored = self.restore_prefix(ids)?;
        let start = restored.as_ref().map_or(0, |r: &Restored| r.tokens);
        let mut logits = Vec::new();
        for (i, chunk) in ids[start..].chunks(self.prefill_chunk).enumerate() {
            if i > 0 && cancelled() {
                return Ok(None);
            }
            logits = self.forward(chunk, LogitsWanted::Last, None)?;
            self.commit(chunk)?;
        }
        Ok(Some((logits, restored)))
    }

    /// A fresh session with a prefix cache loads the longest stored prefix of `ids` (always
    /// leaving one token to compute) and says what it loaded; otherwise None.
    pub fn restore_prefix(&mut self, ids: &[u32]) -> Result<Option<Restored>> {
        if !self.tokens.is_empty() {
            return Ok(None);
        }
        let Some(cache) = &self.prefix else { return Ok(None) };
        let r = cache.restore(self.model.backend(), &mut self.state, ids)?;
        self.tokens.extend_from_slice(&ids[..r.tokens]);
        Ok(Some(r))
    }

    /// Prompt tokens per forward during prefill.
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    /// This sequence's share of a batched forward ([`CausalLm::forward_batch`]); after the
    /// forward, [`commit`](Self::commit) the same ids and [`check_logits`](Self::check_logits)
    /// what came back, or [`forward_failed`](Self::forward_failed) when it failed.
    pub fn batch_item<'a>(&'a mut self, ids: &'a [u32], wanted: LogitsWanted) -> BatchSeq<'a> {
        BatchSeq::new(ids, &mut self.state, wanted)
    }

    /// Records `ids` as fed (the state took them in a forward).
    pub fn commit(&mut self, ids: &[u32]) -> Result<()> {
        self.tokens.extend_from_slice(ids);
        self.snapshot_if_block_end()
    }

    /// Whether the model keeps a recurrent state (which cannot step back).
    pub fn has_recurrent_state(&self) -> bool {
        self.state.has_fixed()
    }

    /// After a failed forward: a recurrent state may have taken part of it, so the sequence
    /// starts over.
    pub fn forward_failed(&mut self) {
        if self.state.has_fixed() {
            self.reset();
        }
    }

    /// Next-token logits that are NaN or infinite are an error naming the position (the last
    /// fed): a sampler would turn them into tokens that mean nothing. The sequence keeps its
    /// tokens, but a recurrent state starts over.
    pub fn check_logits(&mut self, logits: &[f32]) -> Result<()> {
        if let Some((token, &value)) = logits.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            let position = self.tokens.len().saturating_sub(1);
            if self.state.has_fixed() {
                self.reset();
            }
            return Err(EngineError::NonFiniteLogits { position, token, value });
        }
        Ok(())
    }

    /// A recurrent model's fixed state at a block end, kept for the prefix entry ending there.
    fn snapshot_if_block_end(&mut self) -> Result<()> {
        let Some(cache) = &self.prefix else { return Ok(()) };
        let pos = self.state.len();
        if self.state.has_fixed() && pos.is_multiple_of(cache.layout().block) {
            let snap = self.state.snapshot_fixed(self.model.backend()).map_err(ollm_models::ModelError::from)?;
            self.snapshots.push((pos, snap));
        }
        Ok(())
    }

    /// Stores the full blocks of the tokens fed so far that the prefix cache lacks (None
    /// without a cache). Call it once the answer has started: writing is not on the path to the
    /// first token.
    pub fn store_prefix(&mut self) -> Result<Option<Stored>> {
        let Some(cache) = &self.prefix else { return Ok(None) };
        let stored = cache.store(self.model.backend(), &mut self.state, &self.tokens, &self.snapshots);
        // Stored or not, sliding-window layers stop keeping these positions for the store.
        let block = cache.layout().block;
        self.state.retain_from(self.tokens.len() / block * block);
        self.snapshots.clear();
        Ok(Some(stored?))
    }

    /// One forward. A recurrent model's state may have taken part of a forward that failed, so
    /// then the sequence starts over. Next-token logits that are NaN or infinite are an error
    /// naming the position: a sampler would turn them into tokens that mean nothing.
    fn forward(&mut self, ids: &[u32], wanted: LogitsWanted, trace: Option<&dyn TraceSink>) -> Result<Vec<f32>> {
        let position = self.state.len() + ids.len().saturating_sub(1);
        let out = self.model.forward(ids, &mut self.state, wanted, trace);
        if out.is_err() && self.state.has_fixed() {
            self.reset();
        }
        let logits = out?;
        if matches!(wanted, LogitsWanted::Last)
            && let Some((token, &value)) = logits.iter().enumerate().find(|(_, v)| !v.is_finite())
        {
            // The state took these ids but the tokens will not record them: a recurrent state
            // cannot be rewound, so it starts over.
            if self.state.has_fixed() {
                self.reset();
            }
            return Err(EngineError::NonFiniteLogits { position, token, value });
        }
        Ok(logits)
    }

    /// Feeds `ids` in one forward and returns the logits of every position, `[ids.len(), vocab]`.
    pub fn score(&mut self, ids: &[u32], trace: Option<&dyn TraceSink>) -> Result<Vec<f32>> {
        let logits = self.forward(ids, LogitsWanted::All, trace)?;
        self.tokens.extend_from_slice(ids);
        Ok(logits)
    }

    /// Feeds each session its `feeds` ids in one batched forward of their shared model
    /// ([`CausalLm::forward_batch`]) and returns every position's logits per session, as
    /// [`score`](Self::score) would: a scheduler's speculative verification of many sequences
    /// in one pass over the weights. On an error, recurrent states start over.
    pub fn score_batch(sessions: &mut [&mut Session], feeds: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Self::score_batch_trees(sessions, feeds, &vec![None; feeds.len()])
    }

    /// [`score_batch`](Self::score_batch) where a feed may be the nodes of a tree (`trees[i]`
    /// Some, one node per id; the model must [`support trees`](CausalLm::supports_tree)): each
    /// node's row is the logits after its own path. Every fed id takes a cache position, in
    /// order; keep a path by rolling back to where it stops being a prefix of the feed.
    pub fn score_batch_trees(
        sessions: &mut [&mut Session],
        feeds: &[Vec<u32>],
        trees: &[Option<&TreeMask>],
    ) -> Result<Vec<Vec<f32>>> {
        let Some(model) = sessions.first().map(|s| s.model.clone()) else { return Ok(Vec::new()) };
        if sessions.len() != feeds.len()
            || trees.len() != feeds.len()
            || sessions.iter().any(|s| !Arc::ptr_eq(&s.model, &model))
        {
            return Err(EngineError::Batch { sessions: sessions.len(), feeds: feeds.len() });
        }
        let mut items: Vec<BatchSeq<'_>> = sessions
            .iter_mut()
            .zip(feeds)
            .zip(trees)
            .map(|((s, ids), &tree)| BatchSeq { tree, ..BatchSeq::new(ids, &mut s.state, LogitsWanted::All) })
            .collect();
        let out = model.forward_batch(&mut items);
        drop(items);
        match out {
            Ok(logits) => {
                for (s, ids) in sessions.iter_mut().zip(feeds) {
                    s.tokens.extend_from_slice(ids);
                }
                Ok(logits)
            }
            Err(e) => {
                for s in sessions.iter_mut().filter(|s| s.state.has_fixed()) {
                    s.reset();
                }
                Err(e.into())
            }
        }
    }

    /// Feeds the nodes of a tree in one forward ([`score_batch_trees`](Self::score_batch_trees)
    /// for this session alone) and returns every node's logits, `[ids.len(), vocab]`.
    pub fn score_tree(&mut self, ids: &[u32], tree: &TreeMask) -> Result<Vec<f32>> {
        let feeds = [ids.to_vec()];
        let mut out = Self::score_batch_trees(&mut [self], &feeds, &[Some(tree)])?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Feeds one token and returns the next-token logits.
    pub fn step(&mut self, id: u32) -> Result<Vec<f32>> {
        let logits = self.forward(&[id], LogitsWanted::Last, None)?;
        self.tokens.push(id);
        Ok(logits)
    }

    /// Keeps the longest common prefix of the tokens fed so far and `ids`, leaving at least one
    /// token of `ids` to feed, and drops the rest; returns how many were kept. Feeding
    /// `ids[kept..]` next gives what feeding `ids` to a fresh session would. A recurrent model's
    /// state cannot step back, so it keeps everything or nothing; sliding-window layers step
    /// back only as far as what they kept ([`SeqState::min_len`]).
    pub fn rewind(&mut self, ids: &[u32]) -> usize {
        let common = self.tokens.iter().zip(ids).take_while(|(a, b)| a == b).count().min(ids.len().saturating_sub(1));
        if common < self.tokens.len() && (self.state.has_fixed() || common < self.state.min_len()) {
            self.reset();
            return 0;
        }
        self.state.truncate(common);
        self.tokens.truncate(common);
        if let Some(cache) = &self.prefix {
            // The blocks from the kept tokens' last full one on are the store's again.
            let block = cache.layout().block;
            self.state.retain_from(self.state.retained_from().min(common / block * block));
        }
        self.snapshots.retain(|(pos, _)| *pos <= common);
        common
    }

    /// Where a speculative verification forward starts: the length now and, for a recurrent
    /// model, a copy of its fixed state (the one part of a state that cannot step back).
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let fixed = match self.state.has_fixed() {
            true => Some(self.state.snapshot_fixed(self.model.backend()).map_err(ollm_models::ModelError::from)?),
            false => None,
        };
        Ok(Checkpoint { len: self.tokens.len(), fixed })
    }

    /// A checkpoint for a forward whose every token will be kept (no drafts): no state copy.
    pub fn checkpoint_keeping_all(&self) -> Checkpoint {
        Checkpoint { len: self.tokens.len(), fixed: None }
    }

    /// Keeps the first `keep` tokens fed since `cp` and forgets the rest (rejected draft
    /// tokens). Returns how many of the kept tokens the state still holds: all of them when the
    /// state is KV only (a truncation, wherever the KV lives). A recurrent state cannot step
    /// back, so unless nothing is dropped it returns to `cp`'s fixed state and length and
    /// returns 0: the caller feeds the kept tokens again with its next forward.
    pub fn roll_back(&mut self, cp: &Checkpoint, keep: usize) -> Result<usize> {
        let target = cp.len + keep;
        if target >= self.tokens.len() {
            return Ok(self.tokens.len() - cp.len);
        }
        let (len, held) = match &cp.fixed {
            None => (target, keep),
            Some(_) => (cp.len, 0),
        };
        if len < self.state.min_len() {
            // Never the case for a verification forward: windows keep KEEP_BACK positions more.
            return Err(EngineError::RollBack { to: len, min: self.state.min_len() });
        }
        self.state.truncate(len);
        self.tokens.truncate(len);
        self.snapshots.retain(|(pos, _)| *pos <= len);
        if let Some(bytes) = &cp.fixed {
            self.state.restore_fixed(self.model.backend(), bytes).map_err(ollm_models::ModelError::from)?;
        }
        Ok(held)
    }

    /// Whether this session's state can hold its first positions in a shared prefix
    /// ([`SeqState::can_share`]).
    pub fn can_share(&self) -> bool {
        self.state.can_share()
    }

    /// The sequence's state (for memory figures: [`ollm_kv::held_bytes`]).
    pub fn state(&self) -> &SeqState {
        &self.state
    }

    /// Moves the first `p` positions this session holds into a shared prefix (it stays
    /// attached to it) for other sessions starting with the same tokens to
    /// [`attach_prefix`](Self::attach_prefix).
    pub fn share_prefix(&mut self, p: usize) -> Result<Arc<SharedPrefix>> {
        Ok(self.state.share_prefix(self.model.backend(), p).map_err(ollm_models::ModelError::from)?)
    }

    /// Points an empty session at `shared`, whose positions hold the first `shared.len()` of
    /// `ids`: those count as fed, with no compute and no copy.
    pub fn attach_prefix(&mut self, shared: Arc<SharedPrefix>, ids: &[u32]) -> Result<()> {
        let p = shared.len();
        if !self.tokens.is_empty() || ids.len() < p {
            return Err(EngineError::Step(format!(
                "a shared prefix of {p} positions attaches to an empty session of a prompt at least as long"
            )));
        }
        self.state.attach(self.model.backend(), shared).map_err(ollm_models::ModelError::from)?;
        self.tokens.extend_from_slice(&ids[..p]);
        Ok(())
    }

    /// Drops every token; the cache memory is kept for reuse.
    pub fn reset(&mut self) {
        self.state.truncate(0);
        if self.prefix.is_some() {
            self.state.retain_from(0);
        }
        self.tokens.clear();
        self.snapshots.clear();
    }
}

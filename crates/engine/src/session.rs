//! A session: one sequence's tokens and decode state over a shared model.

use std::sync::Arc;

use ollm_models::{CausalLm, LogitsWanted, SeqState, TraceSink};

use crate::Result;

/// Prompt tokens per forward during prefill. The model runs a call layer by layer in small
/// tiles, so a call bounds only the residual stream (tokens × hidden × 4 bytes); each call reads
/// every weight once, so fewer calls mean fewer passes over streamed weights.
pub const DEFAULT_PREFILL_CHUNK: usize = 16384;

/// Owns one sequence's state (KV cache) and its tokens; borrows the model through an `Arc`.
#[derive(Debug)]
pub struct Session {
    model: Arc<dyn CausalLm>,
    state: SeqState,
    tokens: Vec<u32>,
    prefill_chunk: usize,
}

impl Session {
    pub fn new(model: Arc<dyn CausalLm>) -> Result<Self> {
        let state = model.new_state()?;
        Ok(Self { model, state, tokens: Vec::new(), prefill_chunk: DEFAULT_PREFILL_CHUNK })
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
        let mut logits = Vec::new();
        for chunk in ids.chunks(self.prefill_chunk) {
            logits = self.model.forward(chunk, &mut self.state, LogitsWanted::Last, None)?;
            self.tokens.extend_from_slice(chunk);
        }
        Ok(logits)
    }

    /// Feeds `ids` in one forward and returns the logits of every position, `[ids.len(), vocab]`.
    pub fn score(&mut self, ids: &[u32], trace: Option<&dyn TraceSink>) -> Result<Vec<f32>> {
        let logits = self.model.forward(ids, &mut self.state, LogitsWanted::All, trace)?;
        self.tokens.extend_from_slice(ids);
        Ok(logits)
    }

    /// Feeds one token and returns the next-token logits.
    pub fn step(&mut self, id: u32) -> Result<Vec<f32>> {
        let logits = self.model.forward(&[id], &mut self.state, LogitsWanted::Last, None)?;
        self.tokens.push(id);
        Ok(logits)
    }

    /// Drops every token; the cache memory is kept for reuse.
    pub fn reset(&mut self) {
        self.state.truncate(0);
        self.tokens.clear();
    }
}

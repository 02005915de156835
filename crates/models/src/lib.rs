//! ollm-models: the model families. Each family is config parsing, a registry of tensor names
//! and a straight-line forward pass written against the ops [`Backend`](ollm_ops::Backend).
//! No I/O policy, no device checks, no per-sequence state: the state ([`SeqState`]) is passed in,
//! and where weights live and when they move is `ollm_residency`'s (a model takes a
//! [`Placement`](ollm_residency::plan::Placement) and hands the streamer and the expert cache
//! its layers and spans).

pub mod common;
pub mod config;
pub mod error;
pub mod gemma3;
pub mod gpt_oss;
pub mod llama3;
pub mod qwen3_next;
pub mod registry;
pub mod synth;
pub mod trace;

pub use error::{ModelError, Result};
pub use ollm_kv::SeqState;
pub use ollm_ops::TreeMask;
pub use registry::{load_model, load_model_placed};
pub use trace::TraceSink;

/// Facts about a loaded model that callers above need.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The architecture string from config.json (`LlamaForCausalLM`).
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    /// The context limit (`max_position_embeddings`).
    pub max_positions: usize,
    /// Bytes of all weights as stored.
    pub weight_bytes: u64,
    /// Weight bytes one decoded token reads (every matrix once; one embedding row is ignored,
    /// but a tied embedding is read whole as the output head).
    pub weight_bytes_per_token: u64,
    /// KV-cache bytes read per cached position by one decode step (K and V of every layer that
    /// attends over the whole context).
    pub kv_bytes_per_position: u64,
    /// Sliding-window layers' K and V (they read at most a window of positions).
    pub sliding_kv: Option<SlidingKv>,
    /// Token ids that end generation, from config.json (generation_config.json may add more).
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// Identity of the weights and config ([`ollm_weights::Catalog::fingerprint`]): the prefix
    /// cache keeps entries under it.
    pub fingerprint: u128,
}

/// The sliding-window layers' share of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlidingKv {
    /// K and V bytes per position, over all sliding-window layers.
    pub bytes_per_position: u64,
    pub window: usize,
}

/// What a loaded model adds to its config's [`registry::Dims`] to make its [`ModelInfo`].
#[derive(Debug)]
pub(crate) struct InfoParts<'a> {
    pub architecture: String,
    pub catalog: &'a ollm_weights::Catalog,
    /// The backend's KV element size.
    pub kv_elem_bytes: u64,
    /// With a separate head: the embedding's bytes (a token reads one row of it, the head
    /// whole); None when the head is the embedding (read whole).
    pub untied_embed_bytes: Option<u64>,
    /// Bytes of every expert, and of the experts one token routes to (0, 0 without experts).
    pub experts: (u64, u64),
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// The parsed config, printed: the fingerprint covers it.
    pub config_text: String,
}

impl ModelInfo {
    /// Every family's info, built one way: sizes from `d`, bytes from the catalog.
    pub(crate) fn new(d: &registry::Dims, p: InfoParts<'_>) -> Result<Self> {
        let weight_bytes = p.catalog.total_bytes();
        let (all_experts, routed) = p.experts;
        let kv_elem = p.kv_elem_bytes;
        let sliding_layers = d.sliding_kv.map_or(0, |(_, n, _)| n);
        Ok(Self {
            architecture: p.architecture,
            vocab_size: d.vocab_size,
            hidden_size: d.hidden_size,
            n_layers: d.n_layers,
            max_positions: d.max_positions,
            weight_bytes,
            weight_bytes_per_token: weight_bytes - all_experts + routed - p.untied_embed_bytes.unwrap_or(0),
            kv_bytes_per_position: 2u64
                .saturating_mul(d.kv_layers.saturating_sub(sliding_layers) as u64)
                .saturating_mul(d.kv_dim as u64)
                .saturating_mul(kv_elem),
            sliding_kv: d
                .sliding_kv
                .map(|(elems, _, window)| SlidingKv { bytes_per_position: elems * kv_elem, window }),
            eos_token_ids: p.eos_token_ids,
            bos_token_id: p.bos_token_id,
            fingerprint: p.catalog.fingerprint(p.config_text.as_bytes())?,
        })
    }

    /// KV bytes one decode step reads at context `ctx`.
    pub fn kv_read_bytes(&self, ctx: usize) -> u64 {
        let sliding = self.sliding_kv.map_or(0, |s| s.bytes_per_position.saturating_mul(ctx.min(s.window) as u64));
        self.kv_bytes_per_position.saturating_mul(ctx as u64).saturating_add(sliding)
    }
}

/// Which rows of logits a forward returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// Only the last position (generation).
    Last,
    /// Every position (scoring, perplexity, golden tests).
    All,
}

/// One sequence's share of a batched forward ([`CausalLm::forward_batch`]).
#[derive(Debug)]
pub struct BatchSeq<'a> {
    pub ids: &'a [u32],
    pub state: &'a mut SeqState,
    pub wanted: LogitsWanted,
    /// Some: the ids are the nodes of a tree ([`TreeMask`], one node per id), not a chain —
    /// each attends to the cached positions and its own ancestors, at position `len + depth`.
    /// Their rows still take the cache positions `len..len + ids.len()` in order: keep a
    /// path by truncating to where it stops being a prefix of the ids. Only where
    /// [`CausalLm::supports_tree`].
    pub tree: Option<&'a TreeMask>,
}

impl<'a> BatchSeq<'a> {
    /// A chain of `ids` (no tree).
    pub fn new(ids: &'a [u32], state: &'a mut SeqState, wanted: LogitsWanted) -> Self {
        Self { ids, state, wanted, tree: None }
    }
}

/// The error for a model that takes no trees, when an item has one.
pub(crate) fn refuse_trees(items: &[BatchSeq<'_>], architecture: &str, why: &'static str) -> Result<()> {
    match items.iter().any(|it| it.tree.is_some()) {
        true => Err(ModelError::TreeUnsupported { architecture: architecture.to_string(), why }),
        false => Ok(()),
    }
}

/// A causal language model. `forward` runs `ids` at positions `state.len()..` and appends them
/// to `state`.
pub trait CausalLm: Send + Sync + std::fmt::Debug {
    fn info(&self) -> &ModelInfo;

    /// The backend the model computes on (the one its states live on).
    fn backend(&self) -> &dyn ollm_ops::Backend;

    /// A fresh, empty per-sequence state.
    fn new_state(&self) -> Result<SeqState>;

    /// Returns f32 logits, `[rows, vocab]` row-major, rows per `wanted`.
    fn forward(
        &self,
        ids: &[u32],
        state: &mut SeqState,
        wanted: LogitsWanted,
        trace: Option<&dyn TraceSink>,
    ) -> Result<Vec<f32>>;

    /// Runs several sequences in one pass over the weights: each item's `ids` at its state's
    /// positions, its logits rows per its `wanted`, one `Vec` per item in order. Every weight
    /// matrix multiplies the rows of all items at once (a streamed layer is read once for the
    /// whole batch); attention runs per item against its own KV cache. On an error the states
    /// have not advanced (a recurrent state may have taken part of the step: start it over).
    ///
    /// The default runs the items one after another (correct, not faster) and takes no tree;
    /// the families override it.
    fn forward_batch(&self, items: &mut [BatchSeq<'_>]) -> Result<Vec<Vec<f32>>> {
        refuse_trees(items, &self.info().architecture, "it runs one sequence at a time")?;
        items.iter_mut().map(|it| self.forward(it.ids, it.state, it.wanted, None)).collect()
    }

    /// Whether [`forward_batch`](Self::forward_batch) takes items with a tree
    /// ([`BatchSeq::tree`]): several candidate continuations verified in one forward. A model
    /// whose state has one value per sequence (a recurrent layer) cannot.
    fn supports_tree(&self) -> bool {
        false
    }

    /// Weight-streaming counters, when some decoder layers are streamed.
    fn stream_stats(&self) -> Option<ollm_residency::stream::StreamStats> {
        None
    }

    /// Expert-cache counters, for MoE models.
    fn expert_stats(&self) -> Option<ollm_residency::experts::ExpertStats> {
        None
    }

    /// Turns on (or off) the decode prefetch of the next MoE layer's likely experts
    /// ([`ollm_residency::experts::ExpertCache::prefetch`]); false when the model has none.
    /// Never changes the results, only which experts are resident when.
    fn set_expert_prefetch(&self, on: bool) -> bool {
        let _ = on;
        false
    }
}

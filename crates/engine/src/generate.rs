//! The generation loop: prefill, then sample → stream → stop checks → decode, one token at a time.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ollm_tokenizer::Tokenizer;

use ollm_kv::{Restored, Stored};

use crate::decoding::{Decoding, Next};
use crate::grammar::Grammar;
use crate::harmony::HarmonyMarkers;
use crate::logprobs::TokenLogprob;
use crate::speculative::{SpecStats, SpeculateParams, Speculator};
use crate::{EngineError, Result, SamplingParams, Session};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end generation (not emitted).
    pub eos_token_ids: Vec<u32>,
    /// Strings that end generation (not emitted; matched in the answer only).
    pub stop: Vec<String>,
    /// Some: the model writes harmony messages (GPT-OSS, after a chat prompt); the answer
    /// channel becomes the text and the others the reasoning.
    pub harmony: Option<HarmonyMarkers>,
    /// Asked between prefill chunks whether the answer is still wanted; once it says no the
    /// generation ends as [`FinishReason::Cancelled`] without a token. (During decode,
    /// `on_token` returning `Break` cancels.)
    pub cancel: Option<CancelCheck>,
    /// Some: the output is constrained to this grammar (a JSON schema, say): each step's logits
    /// are masked to the tokens it allows and the sequence ends when it is complete. Cloned
    /// fresh for each sequence.
    pub grammar: Option<Grammar>,
    /// Some: speculative decoding (drafts verified several per target forward); the output is
    /// plain greedy decoding's under greedy sampling, and has its distribution otherwise.
    pub speculate: Option<SpeculateParams>,
    /// Some(k): each generated token carries its log-probability and its k most likely
    /// alternatives (k ≤ [`MAX_TOP_LOGPROBS`](crate::logprobs::MAX_TOP_LOGPROBS)), streamed in
    /// [`TokenEvent::logprob`] and kept in [`Generation::logprobs`]: the model's raw
    /// distribution (see [`logprobs`](crate::logprobs)). Speculation is then off for the
    /// sequence (a verified token has no row of its own here).
    pub logprobs: Option<usize>,
}

/// A question the caller answers between prefill chunks: true = stop (a server's client has
/// disconnected). Cheap to clone; shares the closure.
#[derive(Clone)]
pub struct CancelCheck(Arc<dyn Fn() -> bool + Send + Sync>);

impl CancelCheck {
    pub fn new(cancelled: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(cancelled))
    }

    pub fn cancelled(&self) -> bool {
        (self.0)()
    }
}

impl std::fmt::Debug for CancelCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CancelCheck")
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// An eos token was sampled.
    Eos,
    /// A stop string appeared.
    Stop,
    /// The model's context is full.
    ContextFull,
    /// The caller asked to stop.
    Cancelled,
    /// The grammar of [`GenerateParams::grammar`] is complete and allows nothing more.
    GrammarComplete,
}

impl FinishReason {
    /// OpenAI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length | FinishReason::ContextFull => "length",
            FinishReason::Eos | FinishReason::Stop | FinishReason::GrammarComplete => "stop",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// One streamed event: a sampled token and the text it completed (may be empty while a
/// character or a possible stop string is incomplete, or for a harmony marker), or the
/// reasoning text it completed.
#[derive(Debug)]
pub struct TokenEvent<'a> {
    pub id: u32,
    pub text: &'a str,
    pub reasoning: &'a str,
    /// The token's log-probability, when [`GenerateParams::logprobs`] asks for it (None on the
    /// last event, which only releases held-back text).
    pub logprob: Option<&'a TokenLogprob>,
    /// With speculative decoding, the counts so far (the token may come from a pass that
    /// verified several).
    pub speculation: Option<SpecStats>,
}

/// Timings and counts of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Prompt tokens the session already held from the previous generation
    /// ([`generate_reusing`]); neither computed nor loaded.
    pub reused_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt tokens in the session when generation ended: all of them, unless it was cancelled
    /// while the prompt was being read.
    pub prompt_fed: usize,
    pub prefill: Duration,
    pub decode: Duration,
    /// What the prefix cache did, when the session has one.
    pub prefix: Option<PrefixReport>,
    /// With a grammar: the time spent computing token masks (part of `decode`) and how many.
    pub grammar_masks: Option<(Duration, usize)>,
    /// Target passes and acceptance, with speculative decoding.
    pub speculation: Option<SpecStats>,
}

/// The prefix cache's part in one generation.
#[derive(Debug, Clone, Default)]
pub struct PrefixReport {
    /// Loaded instead of computed (None when the session already held tokens).
    pub restored: Option<Restored>,
    /// Written after the first token (None when storing failed).
    pub stored: Option<Stored>,
    /// Why storing failed (a full disk, say); the generation itself went on.
    pub store_error: Option<String>,
}

impl GenerationStats {
    /// Prompt tokens fed (not already held) per second of prefill.
    pub fn prefill_tok_per_s(&self) -> f64 {
        (self.prompt_tokens - self.reused_tokens) as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Decode rate over the tokens that needed a forward after the first sampled one.
    pub fn decode_tok_per_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// The outcome of [`generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// Sampled ids, excluding a final eos.
    pub ids: Vec<u32>,
    /// The emitted text (stop strings excluded): with harmony, the final channel only.
    pub text: String,
    /// Harmony's other channels (analysis, commentary), empty otherwise.
    pub reasoning: String,
    /// One per id when [`GenerateParams::logprobs`] asks for them, empty otherwise.
    pub logprobs: Vec<TokenLogprob>,
    pub finish: FinishReason,
    pub stats: GenerationStats,
}

/// Stores the prompt's blocks in the session's prefix cache, if it has one; a failure (a full
/// disk) is reported in the stats, not raised. Returns the time it took.
pub(crate) fn store_prefix(session: &mut Session, stats: &mut GenerationStats) -> Duration {
    let Some(report) = stats.prefix.as_mut() else { return Duration::ZERO };
    let t = Instant::now();
    match session.store_prefix() {
        Ok(stored) => report.stored = stored,
        Err(e) => {
            tracing::warn!("prompt not stored in the prefix cache: {e}");
            report.store_error = Some(e.to_string());
        }
    }
    t.elapsed()
}

/// Generates for the whole of `prompt` in a session that may hold an earlier sequence: the
/// longest common prefix of the two stays (the same document with a new question, the
/// conversation so far), the rest is dropped, and only the new part is computed
/// ([`Session::rewind`]). `stats.prompt_tokens` counts the whole prompt.
pub fn generate_reusing(
    session: &mut Session,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    on_token: &mut dyn FnMut(TokenEvent<'_>) -> ControlFlow<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let kept = session.rewind(prompt);
    let mut g = generate(session, tokenizer, &prompt[kept..], params, on_token)?;
    g.stats.prompt_tokens = prompt.len();
    g.stats.reused_tokens = kept;
    g.stats.prompt_fed += kept;
    Ok(g)
}

/// Runs `prompt` through the session and generates. `on_token` sees every token as it is
/// produced and may return `ControlFlow::Break` to cancel.
pub fn generate(
    session: &mut Session,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    on_token: &mut dyn FnMut(TokenEvent<'_>) -> ControlFlow<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let context = session.model().info().max_positions;
    if session.len() + prompt.len() > context {
        return Err(EngineError::PromptTooLong { prompt: session.len() + prompt.len(), context });
    }
    // A speculative round keeps the grammar (drafts cut at the first forbidden token, verified
    // rows masked); it gives no logprobs, so a sequence that asks for them decodes plainly.
    let speculate = params.speculate.as_ref().filter(|_| params.logprobs.is_none());
    let mut speculator = speculate.map(|s| Speculator::new(s, &params.sampling)).transpose()?;
    // Tokens a speculative round verified, to emit before the next round.
    let mut verified = std::collections::VecDeque::new();
    let mut stats = GenerationStats { prompt_tokens: prompt.len(), ..Default::default() };

    let t0 = Instant::now();
    let cancelled = || params.cancel.as_ref().is_some_and(CancelCheck::cancelled);
    let prefilled = session.prefill_unless(prompt, &cancelled)?;
    stats.prefill = t0.elapsed();
    let Some((mut logits, restored)) = prefilled else {
        let finish = FinishReason::Cancelled;
        stats.prompt_fed = session.len();
        return Ok(Generation {
            ids: Vec::new(),
            text: String::new(),
            reasoning: String::new(),
            logprobs: Vec::new(),
            finish,
            stats,
        });
    };
    if session.prefix_cache().is_some() {
        stats.prefix = Some(PrefixReport { restored, ..PrefixReport::default() });
    }
    stats.prompt_fed = prompt.len();
    let mut store_time = Duration::ZERO;

    let t1 = Instant::now();
    // Positions before the first generated token: the context is full once `fed` and the
    // tokens generated reach it (with speculation the session may hold drafts beyond them).
    let fed = session.len();
    let mut dec = Decoding::new(params)?;
    let mut stored = false;
    let finish = loop {
        dec.set_speculation(speculator.as_ref().map(|s| *s.stats()));
        let full = fed + dec.ids().len() + 1 > context;
        let next = match verified.pop_front() {
            Some(id) => dec.accept(tokenizer, id, full, on_token)?,
            None => dec.advance(tokenizer, &mut logits, session.tokens(), full, on_token)?,
        };
        if !stored && !dec.ids().is_empty() {
            // The first token is out: now write the prompt's new blocks.
            store_time = store_prefix(session, &mut stats);
            stored = true;
        }
        match (next, &mut speculator) {
            (Next::Finished(f), _) => break f,
            (Next::Feed(id), None) => logits = session.step(id)?,
            (Next::Feed(id), Some(s)) if verified.is_empty() => {
                // Drafts beyond the tokens left would be wasted rows.
                let limit = params.max_new_tokens.saturating_sub(dec.ids().len() + 1);
                let (sampler, grammar) = dec.speculation_parts();
                verified.extend(s.step(session, id, limit, sampler, grammar)?);
            }
            (Next::Feed(_), Some(_)) => {} // verified with the tokens after it
        }
    };
    stats.grammar_masks = dec.grammar().map(crate::grammar::Grammar::mask_stats);
    dec.set_speculation(speculator.as_ref().map(|s| *s.stats()));
    let crate::decoding::Output { ids, text, reasoning, logprobs } = dec.finish(tokenizer, finish, on_token)?;
    if ids.is_empty() {
        store_time = store_prefix(session, &mut stats);
    }
    stats.decode = t1.elapsed().saturating_sub(store_time);
    stats.generated_tokens = ids.len();
    stats.speculation = speculator.as_ref().map(|s| *s.stats());
    Ok(Generation { ids, text, reasoning, logprobs, finish, stats })
}

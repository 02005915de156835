//! The generation loop: prefill, then sample → stream → stop checks → decode, one token at a time.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ollm_tokenizer::{StreamDecoder, Tokenizer};

use ollm_kv::{Restored, Stored};

use crate::harmony::{Channel, HarmonyMarkers, HarmonySplitter, Routed};
use crate::speculative::{SpecStats, SpeculateParams, Speculator};
use crate::stop::{StopMatcher, StopOutcome};
use crate::{EngineError, Result, Sampler, SamplingParams, Session};

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
    /// Some: speculative decoding (drafts verified several per target forward); the output is
    /// plain greedy decoding's under greedy sampling, and has its distribution otherwise.
    pub speculate: Option<SpeculateParams>,
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
}

impl FinishReason {
    /// OpenAI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length | FinishReason::ContextFull => "length",
            FinishReason::Eos | FinishReason::Stop => "stop",
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
    pub prefill: Duration,
    pub decode: Duration,
    /// What the prefix cache did, when the session has one.
    pub prefix: Option<PrefixReport>,
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
    pub finish: FinishReason,
    pub stats: GenerationStats,
}

/// Stores the prompt's blocks in the session's prefix cache, if it has one; a failure (a full
/// disk) is reported in the stats, not raised. Returns the time it took.
fn store_prefix(session: &mut Session, stats: &mut GenerationStats) -> Duration {
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
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let mut speculator = params.speculate.as_ref().map(|s| Speculator::new(s, &params.sampling)).transpose()?;
    // Tokens a speculative round verified, to emit before the next round.
    let mut verified = std::collections::VecDeque::new();
    let mut stats = GenerationStats { prompt_tokens: prompt.len(), ..Default::default() };

    let t0 = Instant::now();
    let cancelled = || params.cancel.as_ref().is_some_and(CancelCheck::cancelled);
    let prefilled = session.prefill_unless(prompt, &cancelled)?;
    stats.prefill = t0.elapsed();
    let Some((mut logits, restored)) = prefilled else {
        let finish = FinishReason::Cancelled;
        return Ok(Generation { ids: Vec::new(), text: String::new(), reasoning: String::new(), finish, stats });
    };
    if session.prefix_cache().is_some() {
        stats.prefix = Some(PrefixReport { restored, ..PrefixReport::default() });
    }
    let mut store_time = Duration::ZERO;

    let t1 = Instant::now();
    // Positions before the first generated token: a plain decode has fed `fed + ids.len() - 1`
    // when it is about to feed the last token (the context is full once that reaches it).
    let fed = session.len();
    let mut decoder = StreamDecoder::new();
    let mut thoughts = StreamDecoder::new();
    let mut splitter = params.harmony.map(HarmonySplitter::new);
    let mut stops = StopMatcher::new(params.stop.clone());
    let (mut ids, mut text, mut reasoning) = (Vec::new(), String::new(), String::new());
    let finish = loop {
        if ids.len() >= params.max_new_tokens {
            break FinishReason::Length;
        }
        let id = match verified.pop_front() {
            Some(id) => id,
            None => sampler.sample(&mut logits, session.tokens()),
        };
        if params.eos_token_ids.contains(&id) {
            break FinishReason::Eos;
        }
        ids.push(id);
        let routed = match &mut splitter {
            Some(s) => s.push(tokenizer, id)?,
            None => Routed::Text(Channel::Final),
        };
        let answer = |decoder: &mut StreamDecoder, ids: &[u32]| -> Result<String> {
            let mut s = String::new();
            for &id in ids {
                s.push_str(&decoder.push(tokenizer, id)?.unwrap_or_default());
            }
            Ok(s)
        };
        let (emit, thought, stopped) = match routed {
            Routed::Header => (String::new(), String::new(), false),
            Routed::Replay(ids) => match stops.push(&answer(&mut decoder, &ids)?) {
                StopOutcome::Continue(s) => (s, String::new(), false),
                StopOutcome::Stopped(s) => (s, String::new(), true),
            },
            Routed::Text(Channel::Reasoning) => {
                (String::new(), thoughts.push(tokenizer, id)?.unwrap_or_default(), false)
            }
            Routed::Text(Channel::Final) => match stops.push(&decoder.push(tokenizer, id)?.unwrap_or_default()) {
                StopOutcome::Continue(s) => (s, String::new(), false),
                StopOutcome::Stopped(s) => (s, String::new(), true),
            },
        };
        text.push_str(&emit);
        reasoning.push_str(&thought);
        let speculation = speculator.as_ref().map(|s| *s.stats());
        let flow = on_token(TokenEvent { id, text: &emit, reasoning: &thought, speculation });
        if ids.len() == 1 {
            // The first token is out: now write the prompt's new blocks.
            store_time = store_prefix(session, &mut stats);
        }
        if stopped {
            break FinishReason::Stop;
        }
        if flow.is_break() {
            break FinishReason::Cancelled;
        }
        if ids.len() >= params.max_new_tokens {
            break FinishReason::Length;
        }
        if fed + ids.len() > context {
            break FinishReason::ContextFull;
        }
        match &mut speculator {
            None => logits = session.step(id)?,
            Some(s) if verified.is_empty() => {
                // Drafts beyond the tokens left would be wasted rows.
                let limit = params.max_new_tokens - ids.len() - 1;
                verified.extend(s.step(session, id, limit, &mut sampler)?);
            }
            Some(_) => {} // `id` was verified with the tokens after it
        }
    };
    // Release text held back by the detokeniser or a partial stop-string match.
    if finish != FinishReason::Stop {
        let tail = decoder.flush(tokenizer)?.unwrap_or_default();
        let mut rest = match stops.push(&tail) {
            StopOutcome::Continue(s) | StopOutcome::Stopped(s) => s,
        };
        rest.push_str(&stops.finish());
        let thought = thoughts.flush(tokenizer)?.unwrap_or_default();
        if !rest.is_empty() || !thought.is_empty() {
            text.push_str(&rest);
            reasoning.push_str(&thought);
            let speculation = speculator.as_ref().map(|s| *s.stats());
            let _ =
                on_token(TokenEvent { id: *ids.last().unwrap_or(&0), text: &rest, reasoning: &thought, speculation });
        }
    }
    if ids.is_empty() {
        store_time = store_prefix(session, &mut stats);
    }
    stats.decode = t1.elapsed().saturating_sub(store_time);
    stats.generated_tokens = ids.len();
    stats.speculation = speculator.as_ref().map(|s| *s.stats());
    Ok(Generation { ids, text, reasoning, finish, stats })
}

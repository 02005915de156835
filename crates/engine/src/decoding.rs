//! One sequence's generation after its prompt: the grammar mask, the sampler, eos, stop
//! strings, harmony routing and the streamed text, fed one row of logits at a time. The one-sequence loop
//! ([`generate`](crate::generate)) and the batch scheduler ([`scheduler`](crate::scheduler))
//! both drive it, so a sequence produces the same tokens and text whichever runs it.

use std::ops::ControlFlow;

use ollm_tokenizer::{StreamDecoder, Tokenizer};

use crate::grammar::Grammar;
use crate::harmony::{Channel, HarmonySplitter, Routed};
use crate::logprobs::TokenLogprob;
use crate::speculative::SpecStats;
use crate::stop::{StopMatcher, StopOutcome};
use crate::{FinishReason, GenerateParams, Result, Sampler, TokenEvent};

/// What to do after a row of logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Feed this token and bring its logits.
    Feed(u32),
    /// Generation ended.
    Finished(FinishReason),
}

/// The generation state of one sequence.
#[derive(Debug)]
pub struct Decoding {
    sampler: Sampler,
    /// Some: each step's logits are masked to the tokens this grammar allows.
    grammar: Option<Grammar>,
    decoder: StreamDecoder,
    thoughts: StreamDecoder,
    splitter: Option<HarmonySplitter>,
    stops: StopMatcher,
    max_new_tokens: usize,
    eos: Vec<u32>,
    ids: Vec<u32>,
    text: String,
    reasoning: String,
    /// Speculative decoding's counts so far, passed on with each token.
    speculation: Option<SpecStats>,
    /// Some(k): each sampled token's log-probability and its k most likely alternatives are
    /// kept (and streamed).
    want_logprobs: Option<usize>,
    logprobs: Vec<TokenLogprob>,
    /// Scratch: the raw logits row, kept before the penalty and the mask change it.
    raw: Vec<f32>,
}

/// What a finished sequence produced.
#[derive(Debug)]
pub struct Output {
    pub ids: Vec<u32>,
    pub text: String,
    pub reasoning: String,
    /// One per id when asked for ([`GenerateParams::logprobs`]), empty otherwise.
    pub logprobs: Vec<TokenLogprob>,
}

impl Decoding {
    pub fn new(params: &GenerateParams) -> Result<Self> {
        Ok(Self {
            sampler: Sampler::new(params.sampling.clone())?,
            grammar: params.grammar.clone(),
            decoder: StreamDecoder::new(),
            thoughts: StreamDecoder::new(),
            splitter: params.harmony.map(HarmonySplitter::new),
            stops: StopMatcher::new(params.stop.clone()),
            max_new_tokens: params.max_new_tokens,
            eos: params.eos_token_ids.clone(),
            ids: Vec::new(),
            text: String::new(),
            reasoning: String::new(),
            speculation: None,
            want_logprobs: params.logprobs,
            logprobs: Vec::new(),
            raw: Vec::new(),
        })
    }

    /// The sampler (a speculative round samples with it too).
    pub fn sampler_mut(&mut self) -> &mut Sampler {
        &mut self.sampler
    }

    /// Speculative decoding's counts, carried by the tokens streamed from now on.
    pub fn set_speculation(&mut self, s: Option<SpecStats>) {
        self.speculation = s;
    }

    /// Tokens sampled so far (a final eos excluded).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Whether the next token may be `token`: false only when a grammar forbids it.
    pub fn allows(&mut self, token: u32) -> Result<bool> {
        match &mut self.grammar {
            Some(g) => Ok(g.allows(token)?),
            None => Ok(true),
        }
    }

    /// How many leading tokens of `drafted` the grammar allows in a row (all of them without a
    /// grammar), the grammar itself left where it is. Speculative decoding cuts its draft to
    /// this length before verification, so a token the grammar forbids is never verified;
    /// [`advance`](Self::advance) then masks and accepts each verified token as usual.
    pub fn allowed_prefix(&mut self, drafted: &[u32]) -> Result<usize> {
        match &mut self.grammar {
            Some(g) => Ok(g.allowed_prefix(drafted)?),
            None => Ok(drafted.len()),
        }
    }

    /// The sampler and the grammar, for a speculative round (which samples with the one and
    /// masks with a copy of the other).
    pub fn speculation_parts(&mut self) -> (&mut Sampler, Option<&Grammar>) {
        (&mut self.sampler, self.grammar.as_ref())
    }

    /// The grammar, when the output is constrained (its mask statistics, say).
    pub fn grammar(&self) -> Option<&Grammar> {
        self.grammar.as_ref()
    }

    /// Samples the next token from `logits` (`history`: every token the sequence holds), streams
    /// what it completes to `on_token`, and says whether to feed it. `context_full`: the
    /// sequence holds as many positions as the model has, so nothing more can be fed.
    pub fn advance(
        &mut self,
        tok: &Tokenizer,
        logits: &mut [f32],
        history: &[u32],
        context_full: bool,
        on_token: &mut dyn FnMut(TokenEvent<'_>) -> ControlFlow<()>,
    ) -> Result<Next> {
        if self.ids.len() >= self.max_new_tokens {
            return Ok(Next::Finished(FinishReason::Length));
        }
        if self.want_logprobs.is_some() {
            self.raw.clear();
            self.raw.extend_from_slice(logits);
        }
        if let Some(g) = &mut self.grammar {
            g.apply(logits)?;
        }
        let id = self.sampler.sample(logits, history);
        let logprob = self.want_logprobs.map(|k| TokenLogprob::from_logits(&self.raw, id, k));
        self.take(tok, id, logprob, context_full, on_token)
    }

    /// Whether each token's log-probability is asked for (speculative rounds do not give them,
    /// so a sequence that wants them decodes plainly).
    pub fn wants_logprobs(&self) -> bool {
        self.want_logprobs.is_some()
    }

    /// Takes `id` as the next token without sampling (a speculative round verified it): the
    /// same checks and streaming as [`advance`](Self::advance).
    pub fn accept(
        &mut self,
        tok: &Tokenizer,
        id: u32,
        context_full: bool,
        on_token: &mut dyn FnMut(TokenEvent<'_>) -> ControlFlow<()>,
    ) -> Result<Next> {
        if self.ids.len() >= self.max_new_tokens {
            return Ok(Next::Finished(FinishReason::Length));
        }
        self.take(tok, id, None, context_full, on_token)
    }

    fn take(
        &mut self,
        tok: &Tokenizer,
        id: u32,
        logprob: Option<TokenLogprob>,
        context_full: bool,
        on_token: &mut dyn FnMut(TokenEvent<'_>) -> ControlFlow<()>,
    ) -> Result<Next> {
        if self.eos.contains(&id) {
            return Ok(Next::Finished(FinishReason::Eos));
        }
        if let Some(g) = &mut self.grammar {
            g.accept(id)?;
        }
        self.ids.push(id);
        let routed = match &mut self.splitter {
            Some(s) => s.push(tok, id)?,
            None => Routed::Text(Channel::Final),
        };
        let (emit, thought, stopped) = match routed {
            Routed::Header => (String::new(), String::new(), false),
            Routed::Replay(ids) => {
                let mut s = String::new();
                for id in ids {
                    s.push_str(&self.decoder.push(tok, id)?.unwrap_or_default());
                }
                self.stop_check(&s)
            }
            Routed::Text(Channel::Reasoning) => {
                (String::new(), self.thoughts.push(tok, id)?.unwrap_or_default(), false)
            }
            Routed::Text(Channel::Final) => {
                let piece = self.decoder.push(tok, id)?.unwrap_or_default();
                self.stop_check(&piece)
            }
        };
        self.text.push_str(&emit);
        self.reasoning.push_str(&thought);
        let has_logprob = logprob.is_some();
        self.logprobs.extend(logprob);
        let flow = on_token(TokenEvent {
            id,
            text: &emit,
            reasoning: &thought,
            logprob: if has_logprob { self.logprobs.last() } else { None },
            speculation: self.speculation,
        });
        Ok(if stopped {
            Next::Finished(FinishReason::Stop)
        } else if flow.is_break() {
            Next::Finished(FinishReason::Cancelled)
        } else if self.grammar.as_ref().is_some_and(Grammar::is_finished) {
            Next::Finished(FinishReason::GrammarComplete)
        } else if self.ids.len() >= self.max_new_tokens {
            Next::Finished(FinishReason::Length)
        } else if context_full {
            Next::Finished(FinishReason::ContextFull)
        } else {
            Next::Feed(id)
        })
    }

    fn stop_check(&mut self, piece: &str) -> (String, String, bool) {
        match self.stops.push(piece) {
            StopOutcome::Continue(s) => (s, String::new(), false),
            StopOutcome::Stopped(s) => (s, String::new(), true),
        }
    }

    /// Ends the sequence: releases text held back by the detokeniser or a partial stop-string
    /// match (except after a stop) to `on_token`, and returns what the sequence produced.
    pub fn finish(
        mut self,
        tok: &Tokenizer,
        finish: FinishReason,
        on_token: &mut dyn FnMut(TokenEvent<'_>) -> ControlFlow<()>,
    ) -> Result<Output> {
        if finish != FinishReason::Stop {
            let tail = self.decoder.flush(tok)?.unwrap_or_default();
            let mut rest = match self.stops.push(&tail) {
                StopOutcome::Continue(s) | StopOutcome::Stopped(s) => s,
            };
            rest.push_str(&self.stops.finish());
            let thought = self.thoughts.flush(tok)?.unwrap_or_default();
            if !rest.is_empty() || !thought.is_empty() {
                self.text.push_str(&rest);
                self.reasoning.push_str(&thought);
                let speculation = self.speculation;
                let _ = on_token(TokenEvent {
                    id: *self.ids.last().unwrap_or(&0),
                    text: &rest,
                    reasoning: &thought,
                    logprob: None,
                    speculation,
                });
            }
        }
        Ok(Output { ids: self.ids, text: self.text, reasoning: self.reasoning, logprobs: self.logprobs })
    }
}

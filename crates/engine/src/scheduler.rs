//! Continuous batching: many sequences share each pass over the model's weights. Sequences join
//! and leave between steps; a step feeds every decoding sequence its next token and, within a
//! per-step token budget, chunks of the prompts still being read, so a long prompt never stalls
//! the others. Each sequence keeps its own [`Session`] (KV cache, prefix-cache entry, recurrent
//! state) and its own [`Decoding`] (sampler, stop strings), so its tokens and text are those it
//! gets alone. One thread drives a scheduler; requests arrive through [`Scheduler::submit`] or
//! a channel ([`Scheduler::serve`]).

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use ollm_models::{BatchSeq, CausalLm, LogitsWanted};
use ollm_tokenizer::Tokenizer;

use crate::decoding::{Decoding, Next};
use crate::generate::{CancelCheck, FinishReason, GenerateParams, Generation, GenerationStats, PrefixReport};
use crate::speculative::Speculator;
use crate::{EngineError, Result, Session, TokenEvent};

/// Where a request's tokens and end go. Called on the scheduler's thread.
pub trait Sink: Send {
    /// A sampled token and the text it completed; `Break` cancels the request.
    fn token(&mut self, ev: TokenEvent<'_>) -> ControlFlow<()>;
    /// The request ended (its last call).
    fn done(&mut self, result: Result<Generation>);
}

/// One generation: the prompt's token ids, its parameters and where its output goes.
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    pub sink: Box<dyn Sink>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").field("prompt_tokens", &self.prompt.len()).finish_non_exhaustive()
    }
}

/// How many sequences run together and how much a step feeds.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences in one step at most (each holds a session, so also the KV caches kept).
    pub max_batch: usize,
    /// Tokens one step feeds at most: a token for each decoding sequence first, then chunks of
    /// prompts in arrival order. At least `max_batch`.
    pub step_tokens: usize,
}

/// Counters over the scheduler's life.
#[derive(Debug, Clone, Default)]
pub struct SchedulerStats {
    /// Forward passes run.
    pub steps: u64,
    /// Sequence rows fed over all steps (prompt and decode tokens).
    pub tokens_fed: u64,
    /// Decode tokens fed (one per decoding sequence per step).
    pub decode_tokens: u64,
    /// The most sequences one step held.
    pub max_seqs_in_step: usize,
    /// Steps in which every sequence was decoding (no prompt rows), their tokens and the time
    /// their forwards took: the decode rate at the batch size, free of prefill.
    pub decode_steps: u64,
    pub decode_step_tokens: u64,
    pub decode_step_time: Duration,
    pub completed: u64,
    pub cancelled: u64,
    pub failed: u64,
}

/// A sequence being generated.
struct Running {
    session: Session,
    prompt: Vec<u32>,
    params: GenerateParams,
    sink: Box<dyn Sink>,
    dec: Decoding,
    /// Prompt tokens already in the session (kept, restored or fed).
    fed: usize,
    /// The sampled token to feed next (decoding); None while the prompt is being read.
    feed: Option<u32>,
    stats: GenerationStats,
    started: Instant,
    decode_start: Option<Instant>,
    store_time: Duration,
    stored: bool,
    /// Speculative decoding for this sequence (its verification forwards run alone).
    speculator: Option<Speculator>,
}

impl Running {
    /// Whether its next token goes through a speculative round rather than the batch.
    fn speculates(&self) -> bool {
        self.speculator.is_some() && self.feed.is_some()
    }

    fn cancelled(&self) -> bool {
        self.params.cancel.as_ref().is_some_and(CancelCheck::cancelled)
    }
}

/// The continuous-batching scheduler.
pub struct Scheduler {
    model: Arc<dyn CausalLm>,
    tokenizer: Arc<Tokenizer>,
    cfg: SchedulerConfig,
    /// Makes the session of a new sequence (prefix cache, prefill chunk).
    new_session: Box<dyn FnMut() -> Result<Session> + Send>,
    /// Sessions not running, holding their last sequence (reused when a prompt shares its
    /// start: a document asked several questions).
    idle: Vec<Session>,
    waiting: VecDeque<Request>,
    running: Vec<Running>,
    stats: SchedulerStats,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("cfg", &self.cfg)
            .field("waiting", &self.waiting.len())
            .field("running", &self.running.len())
            .finish_non_exhaustive()
    }
}

impl Scheduler {
    /// A scheduler over `model`; `new_session` makes each sequence's session (at most
    /// `cfg.max_batch` are made).
    pub fn new(
        model: Arc<dyn CausalLm>,
        tokenizer: Arc<Tokenizer>,
        cfg: SchedulerConfig,
        new_session: Box<dyn FnMut() -> Result<Session> + Send>,
    ) -> Self {
        let max_batch = cfg.max_batch.max(1);
        let cfg = SchedulerConfig { max_batch, step_tokens: cfg.step_tokens.max(max_batch) };
        Self {
            model,
            tokenizer,
            cfg,
            new_session,
            idle: Vec::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: SchedulerStats::default(),
        }
    }

    pub fn config(&self) -> SchedulerConfig {
        self.cfg
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// Queues a request (it starts at a step when a place is free, first come first served).
    pub fn submit(&mut self, req: Request) {
        self.waiting.push_back(req);
    }

    /// Requests queued and not started.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences being generated.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Runs steps until every request submitted has ended.
    pub fn run_until_idle(&mut self) {
        while !self.is_idle() {
            self.step();
        }
    }

    /// Takes requests from `requests` (blocking while idle) and runs them, until the channel
    /// closes and the last request has ended.
    pub fn serve(&mut self, requests: &Receiver<Request>) {
        loop {
            if self.is_idle() {
                match requests.recv() {
                    Ok(r) => self.submit(r),
                    Err(_) => return,
                }
            }
            while let Ok(r) = requests.try_recv() {
                self.submit(r);
            }
            self.step();
        }
    }

    /// One step: admits waiting requests into free places, ends cancelled sequences, runs one
    /// batched forward over the scheduled rows and moves each sequence on. Returns whether a
    /// forward ran.
    pub fn step(&mut self) -> bool {
        self.admit();
        self.drop_cancelled();
        if self.running.is_empty() {
            return false;
        }
        // Decode tokens first, then prompt chunks in arrival order, within the step's budget.
        let mut budget = self.cfg.step_tokens;
        let mut plan: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for (i, r) in self.running.iter().enumerate() {
            if r.feed.is_some() && !r.speculates() {
                plan.push((i, 0..1));
                budget = budget.saturating_sub(1);
            }
        }
        for (i, r) in self.running.iter().enumerate() {
            if r.feed.is_none() && budget > 0 {
                let n = (r.prompt.len() - r.fed).min(r.session.prefill_chunk()).min(budget);
                if n > 0 {
                    plan.push((i, r.fed..r.fed + n));
                    budget -= n;
                }
            }
        }
        let mut ended = self.speculative_rounds();
        if plan.is_empty() {
            self.end_all(ended);
            return true;
        }
        plan.sort_by_key(|(i, _)| *i);
        let decode_only = plan.iter().all(|(i, _)| self.running[*i].feed.is_some());
        let t = Instant::now();
        let results = self.forward(&plan);
        if decode_only {
            self.stats.decode_steps += 1;
            self.stats.decode_step_tokens += plan.len() as u64;
            self.stats.decode_step_time += t.elapsed();
        }
        self.stats.steps += 1;
        self.stats.max_seqs_in_step = self.stats.max_seqs_in_step.max(plan.len());
        // Move each sequence on; those that end leave (indices from the back stay valid).
        for ((i, range), result) in plan.into_iter().zip(results) {
            let r = &mut self.running[i];
            let decoding = r.feed.is_some();
            let fed: Vec<u32> = match r.feed.take() {
                Some(id) => vec![id],
                None => r.prompt[range.clone()].to_vec(),
            };
            self.stats.tokens_fed += fed.len() as u64;
            if decoding {
                self.stats.decode_tokens += 1;
            }
            let outcome = result.and_then(|mut logits| {
                r.session.commit(&fed)?;
                if !decoding {
                    r.fed = range.end;
                    if r.fed < r.prompt.len() {
                        return Ok(None);
                    }
                    r.stats.prefill = r.started.elapsed();
                    r.decode_start = Some(Instant::now());
                }
                r.session.check_logits(&logits)?;
                Self::advance(r, &self.tokenizer, &mut logits, self.model.info().max_positions)
            });
            match outcome {
                Ok(None) => {}
                Ok(Some(Next::Feed(id))) => r.feed = Some(id),
                Ok(Some(Next::Finished(f))) => ended.push((i, Ok(f))),
                Err(e) => ended.push((i, Err(e))),
            }
        }
        self.end_all(ended);
        true
    }

    /// Ends the sequences at these indices (each once, any order).
    fn end_all(&mut self, mut ended: Vec<(usize, Result<FinishReason>)>) {
        ended.sort_by_key(|(i, _)| *i);
        for (i, end) in ended.into_iter().rev() {
            let r = self.running.remove(i);
            self.end(r, end);
        }
    }

    /// One speculative round for each decoding sequence that speculates: drafts verified in one
    /// forward of its own, every verified token taken in turn. Returns those that ended.
    fn speculative_rounds(&mut self) -> Vec<(usize, Result<FinishReason>)> {
        let context = self.model.info().max_positions;
        let mut ended = Vec::new();
        for (i, r) in self.running.iter_mut().enumerate() {
            if !r.speculates() {
                continue;
            }
            let (Some(pending), Some(spec)) = (r.feed.take(), r.speculator.as_mut()) else { continue };
            let limit = r.params.max_new_tokens.saturating_sub(r.dec.ids().len() + 1);
            let (sampler, grammar) = r.dec.speculation_parts();
            let tokens = match spec.step(&mut r.session, pending, limit, sampler, grammar) {
                Ok(t) => t,
                Err(e) => {
                    ended.push((i, Err(e)));
                    continue;
                }
            };
            self.stats.steps += 1;
            let last = tokens.len().saturating_sub(1);
            for (j, id) in tokens.into_iter().enumerate() {
                r.dec.set_speculation(r.speculator.as_ref().map(|s| *s.stats()));
                let full = r.prompt.len() + r.dec.ids().len() + 1 > context;
                let sink = &mut r.sink;
                match r.dec.accept(&self.tokenizer, id, full, &mut |ev| sink.token(ev)) {
                    Ok(Next::Feed(id)) if j == last => r.feed = Some(id),
                    Ok(Next::Feed(_)) => {}
                    Ok(Next::Finished(f)) => {
                        ended.push((i, Ok(f)));
                        break;
                    }
                    Err(e) => {
                        ended.push((i, Err(e)));
                        break;
                    }
                }
            }
        }
        ended
    }

    /// Samples a sequence's next token from `logits`; stores its prompt's prefix blocks once
    /// the first token is out.
    fn advance(r: &mut Running, tok: &Tokenizer, logits: &mut [f32], context: usize) -> Result<Option<Next>> {
        // Full once the prompt and the tokens generated reach the context (a speculating
        // session may hold drafts beyond them).
        let full = r.prompt.len() + r.dec.ids().len() + 1 > context;
        r.dec.set_speculation(r.speculator.as_ref().map(|s| *s.stats()));
        let sink = &mut r.sink;
        let next = r.dec.advance(tok, logits, r.session.tokens(), full, &mut |ev| sink.token(ev))?;
        if !r.stored && !r.dec.ids().is_empty() {
            r.store_time = store_prefix(&mut r.session, &mut r.stats);
            r.stored = true;
        }
        Ok(Some(next))
    }

    /// Runs the planned rows in one batched forward; when it fails and the model has no
    /// recurrent state, each sequence again alone, so one bad sequence fails alone.
    fn forward(&mut self, plan: &[(usize, std::ops::Range<usize>)]) -> Vec<Result<Vec<f32>>> {
        let batched = self.forward_some(plan);
        match batched {
            Ok(all) => all.into_iter().map(Ok).collect(),
            Err(e) if plan.len() > 1 && !self.running[plan[0].0].session.has_recurrent_state() => {
                tracing::warn!("a batched step failed ({e}); running its {} sequences one by one", plan.len());
                plan.iter()
                    .map(|p| self.forward_some(std::slice::from_ref(p)).map(|mut v| v.pop().unwrap_or_default()))
                    .collect()
            }
            Err(e) => {
                let msg = e.to_string();
                for (i, _) in plan {
                    self.running[*i].session.forward_failed();
                }
                plan.iter().map(|_| Err(EngineError::Step(msg.clone()))).collect()
            }
        }
    }

    fn forward_some(&mut self, plan: &[(usize, std::ops::Range<usize>)]) -> Result<Vec<Vec<f32>>> {
        let mut want = plan.iter().map(|(i, _)| *i).peekable();
        let mut items: Vec<BatchSeq<'_>> = Vec::with_capacity(plan.len());
        let mut ranges = plan.iter().map(|(_, r)| r.clone());
        for (i, r) in self.running.iter_mut().enumerate() {
            if want.peek() != Some(&i) {
                continue;
            }
            want.next();
            let range = ranges.next().unwrap_or(0..0);
            let Running { session, prompt, feed, .. } = r;
            let ids: &[u32] = match feed {
                Some(id) => std::slice::from_ref(id),
                None => &prompt[range],
            };
            items.push(session.batch_item(ids, LogitsWanted::Last));
        }
        let out = self.model.forward_batch(&mut items);
        if out.is_err() {
            drop(items);
            for (i, _) in plan {
                self.running[*i].session.forward_failed();
            }
        }
        Ok(out?)
    }

    /// Starts waiting requests while places are free.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_batch {
            let Some(req) = self.waiting.pop_front() else { return };
            match self.start(req) {
                Ok(r) => self.running.push(r),
                Err((mut sink, e)) => {
                    self.stats.failed += 1;
                    sink.done(Err(e));
                }
            }
        }
    }

    /// A session for `prompt`: the idle one sharing its longest start, a new one while fewer
    /// than `max_batch` exist, else any idle one (rewound to nothing).
    fn session_for(&mut self, prompt: &[u32]) -> Result<Session> {
        let shared = |s: &Session| s.tokens().iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let best = (0..self.idle.len()).max_by_key(|&i| shared(&self.idle[i]));
        match best {
            Some(i) if shared(&self.idle[i]) > 0 || self.idle.len() + self.running.len() >= self.cfg.max_batch => {
                Ok(self.idle.swap_remove(i))
            }
            _ => (self.new_session)(),
        }
    }

    fn start(&mut self, req: Request) -> std::result::Result<Running, (Box<dyn Sink>, EngineError)> {
        let Request { prompt, params, sink } = req;
        if prompt.is_empty() {
            return Err((sink, EngineError::EmptyPrompt));
        }
        let context = self.model.info().max_positions;
        if prompt.len() > context {
            return Err((sink, EngineError::PromptTooLong { prompt: prompt.len(), context }));
        }
        let mut session = match self.session_for(&prompt) {
            Ok(s) => s,
            Err(e) => return Err((sink, e)),
        };
        let kept = session.rewind(&prompt);
        let restored = match session.restore_prefix(&prompt) {
            Ok(r) => r,
            Err(e) => {
                self.idle.push(session);
                return Err((sink, e));
            }
        };
        // With logprobs, decoding is plain (see `generate`).
        let speculate = params.speculate.as_ref().filter(|_| params.logprobs.is_none());
        let speculator = match speculate.map(|p| Speculator::new(p, &params.sampling)).transpose() {
            Ok(s) => s,
            Err(e) => {
                self.idle.push(session);
                return Err((sink, e));
            }
        };
        let dec = match Decoding::new(&params) {
            Ok(d) => d,
            Err(e) => {
                self.idle.push(session);
                return Err((sink, e));
            }
        };
        let mut stats = GenerationStats { prompt_tokens: prompt.len(), reused_tokens: kept, ..Default::default() };
        if session.prefix_cache().is_some() {
            stats.prefix = Some(PrefixReport { restored: restored.clone(), ..PrefixReport::default() });
        }
        let fed = kept + restored.map_or(0, |r| r.tokens);
        Ok(Running {
            session,
            prompt,
            params,
            sink,
            dec,
            fed,
            feed: None,
            stats,
            started: Instant::now(),
            decode_start: None,
            store_time: Duration::ZERO,
            stored: false,
            speculator,
        })
    }

    /// Ends sequences whose caller stopped waiting.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].cancelled() {
                let r = self.running.remove(i);
                self.end(r, Ok(FinishReason::Cancelled));
            } else {
                i += 1;
            }
        }
    }

    /// Finishes a sequence: flushes its text, tells its sink, keeps its session for reuse.
    fn end(&mut self, r: Running, how: Result<FinishReason>) {
        let Running {
            mut session, sink, mut dec, mut stats, decode_start, store_time, stored, fed, speculator, ..
        } = r;
        stats.speculation = speculator.as_ref().map(|s| *s.stats());
        dec.set_speculation(stats.speculation);
        stats.prompt_fed = fed;
        let mut sink = sink;
        let result = how.and_then(|finish| {
            let crate::decoding::Output { ids, text, reasoning, logprobs } =
                dec.finish(&self.tokenizer, finish, &mut |ev| sink.token(ev))?;
            let mut store_time = store_time;
            if !stored && decode_start.is_some() {
                store_time = store_prefix(&mut session, &mut stats);
            }
            stats.decode = decode_start.map_or(Duration::ZERO, |t| t.elapsed().saturating_sub(store_time));
            stats.generated_tokens = ids.len();
            Ok(Generation { ids, text, reasoning, logprobs, finish, stats })
        });
        match &result {
            Ok(g) if g.finish == FinishReason::Cancelled => self.stats.cancelled += 1,
            Ok(_) => self.stats.completed += 1,
            Err(_) => self.stats.failed += 1,
        }
        sink.done(result);
        self.idle.push(session);
    }
}

/// Stores the prompt's blocks in the session's prefix cache (see [`crate::generate`]).
fn store_prefix(session: &mut Session, stats: &mut GenerationStats) -> Duration {
    crate::generate::store_prefix(session, stats)
}

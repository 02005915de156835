//! Continuous batching: many sequences share each pass over the model's weights. Sequences join
//! and leave between steps; a step feeds every decoding sequence its next token and, within a
//! per-step token budget, chunks of the prompts still being read, so a long prompt never stalls
//! the others. Each sequence keeps its own [`Session`] (KV cache, prefix-cache entry, recurrent
//! state) and its own [`Decoding`] (sampler, stop strings), so its tokens and text are those it
//! gets alone. One thread drives a scheduler; requests arrive through [`Scheduler::submit`] or
//! a channel ([`Scheduler::serve`]).
//!
//! Sequences whose prompts begin with the same tokens (one document and many questions, one
//! system prompt) hold that prefix's KV once ([`ollm_kv::SharedPrefix`]): a sequence admitted
//! beside a running one whose prompt shares at least [`SHARE_BLOCK`] leading tokens waits (its
//! prompt rows take no step budget) until that one has fed them, then attaches to the prefix,
//! in whole blocks of [`SHARE_BLOCK`] (of the offloaded cache's block when the KV is
//! offloaded), and feeds only the rest; a prefix already shared is attached at once. A running
//! sequence with recurrent state or sliding windows that others wait on stops a prompt chunk at
//! the shared prefix's end (its state must be there when it shares); one already past it is not
//! waited on.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ollm_kv::SharedPrefix;
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

/// Positions a shared prefix is cut to a multiple of (the device cache's prefix-store block, so
/// a stored block never straddles a shared prefix's end); also the shortest prefix shared.
pub const SHARE_BLOCK: usize = ollm_kv::DEVICE_PREFIX_BLOCK;

/// The least length a multiple of both [`SHARE_BLOCK`] and a state's
/// [`share_block`](ollm_kv::SeqState::share_block) (an offloaded cache's block).
fn share_unit(block: usize) -> usize {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let block = block.max(1);
    block / gcd(block, SHARE_BLOCK) * SHARE_BLOCK
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
    /// Sequences that attached to a shared prefix, and the prompt positions they got from it
    /// without computing or holding them.
    pub shared_attached: u64,
    pub shared_positions: u64,
    /// The most KV-cache bytes the sessions held at once after a step, on the device and in
    /// pinned host RAM (each shared prefix once: [`ollm_kv::held_bytes_split`]), and at that
    /// point what they would hold with every prefix copied into each attached sequence.
    pub peak_kv_bytes: u64,
    pub peak_kv_unshared_bytes: u64,
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
    /// Some(P): the prompt's first P tokens are another running sequence's too; this one
    /// feeds nothing until that one holds them, then attaches to them shared.
    share_wait: Option<usize>,
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
    /// Whether sequences share the KV of common prompt prefixes (default on).
    share: bool,
    /// Prefixes shared so far, by their tokens (alive while a session holds them).
    shared: Vec<(Vec<u32>, Weak<SharedPrefix>)>,
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
            share: true,
            shared: Vec::new(),
        }
    }

    /// With `false`, every sequence keeps its whole prompt's KV privately (for comparison).
    pub fn with_prefix_sharing(mut self, share: bool) -> Self {
        self.share = share;
        self
    }

    /// KV-cache bytes (device and pinned host) the sessions (running and idle) hold now, each
    /// shared prefix once; and what they would hold with each attached sequence's prefix a
    /// private copy.
    pub fn kv_bytes(&self) -> (u64, u64) {
        let states = || self.running.iter().map(|r| r.session.state()).chain(self.idle.iter().map(|s| s.state()));
        let (device, host) = ollm_kv::held_bytes_split(states());
        let unshared: usize = states()
            .map(|s| {
                let prefix = s.shared_prefix().map_or(0, |p| p.size_bytes() + p.host_bytes());
                s.size_bytes() + s.host_bytes() + prefix
            })
            .sum();
        ((device + host) as u64, unshared as u64)
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
        self.attach_waiting();
        // Decode tokens first, then prompt chunks in arrival order, within the step's budget.
        let mut budget = self.cfg.step_tokens;
        let mut plan: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for (i, r) in self.running.iter().enumerate() {
            if r.feed.is_some() && !r.speculates() {
                plan.push((i, 0..1));
                budget = budget.saturating_sub(1);
            }
        }
        let stops = self.share_stops();
        for (i, r) in self.running.iter().enumerate() {
            if r.feed.is_none() && r.share_wait.is_none() && budget > 0 {
                let n = (r.prompt.len() - r.fed).min(r.session.prefill_chunk()).min(budget);
                let n = stops[i].map_or(n, |stop| n.min(stop - r.fed));
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
        let (held, unshared) = self.kv_bytes();
        if held > self.stats.peak_kv_bytes {
            (self.stats.peak_kv_bytes, self.stats.peak_kv_unshared_bytes) = (held, unshared);
        }
        true
    }

    /// The shared prefix already made whose tokens start `prompt` (leaving a token to feed),
    /// the longest.
    fn known_prefix(&mut self, prompt: &[u32]) -> Option<Arc<SharedPrefix>> {
        self.shared.retain(|(_, w)| w.strong_count() > 0);
        self.shared
            .iter()
            .filter(|(t, _)| t.len() < prompt.len() && prompt.starts_with(t))
            .max_by_key(|(t, _)| t.len())
            .and_then(|(_, w)| w.upgrade())
    }

    /// Positions of `prompt` a sequence could share with running sequence `j`'s prompt: their
    /// common start, leaving a token of `prompt` to feed, in whole [`SHARE_BLOCK`]s (or
    /// offloaded blocks: [`SeqState::share_block`](ollm_kv::SeqState::share_block)); 0 when
    /// `j` waits itself or cannot share, or when its recurrent state or sliding windows have
    /// gone past that point unshared.
    fn shareable_with(&self, prompt: &[u32], j: usize) -> usize {
        let d = &self.running[j];
        if d.share_wait.is_some() || !d.session.can_share() {
            return 0;
        }
        let unit = share_unit(d.session.state().share_block());
        let common = d.prompt.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
        let p = common / unit * unit;
        let state = d.session.state();
        if state.shares_only_near_the_end() && state.shared_prefix().is_none() && d.session.len() > p {
            return 0;
        }
        p
    }

    /// Per running sequence, where its next prompt chunk must stop: the end of the prefix a
    /// waiting sequence will share with it, when its recurrent state or sliding windows must
    /// be there when it shares.
    fn share_stops(&self) -> Vec<Option<usize>> {
        (0..self.running.len())
            .map(|j| {
                let d = &self.running[j];
                if !d.session.state().shares_only_near_the_end() || d.session.state().shared_prefix().is_some() {
                    return None;
                }
                self.running
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| r.share_wait.filter(|&p| i != j && p > d.fed).map(|p| (p, &r.prompt)))
                    .filter(|&(p, prompt)| self.shareable_with(prompt, j) >= p)
                    .map(|(p, _)| p)
                    .min()
            })
            .collect()
    }

    /// Attaches each waiting sequence to its prefix once a running sequence holds it (sharing
    /// that sequence's first positions), or lets it prefill alone when none will.
    fn attach_waiting(&mut self) {
        for i in 0..self.running.len() {
            let Some(p) = self.running[i].share_wait else { continue };
            let prompt = self.running[i].prompt.clone();
            let shared = match self.known_prefix(&prompt[..p + 1]).filter(|s| s.len() == p) {
                Some(s) => Some(s),
                None => {
                    let donor = (0..self.running.len()).find(|&j| {
                        j != i
                            && self.shareable_with(&prompt, j) >= p
                            && self.running[j].session.len() >= p
                            && self.running[j].session.tokens()[..p] == prompt[..p]
                    });
                    let pending = (0..self.running.len()).any(|j| j != i && self.shareable_with(&prompt, j) >= p);
                    match donor {
                        Some(j) => {
                            let d = &mut self.running[j].session;
                            // A donor attached to a shorter prefix shares that one.
                            let got = match d.state().shared_prefix() {
                                Some(s) => Ok(s.clone()),
                                None => d.share_prefix(p),
                            };
                            match got {
                                Ok(s) => {
                                    self.shared.push((prompt[..s.len()].to_vec(), Arc::downgrade(&s)));
                                    Some(s)
                                }
                                Err(e) => {
                                    tracing::warn!("sharing a prompt prefix failed ({e}); prefilling alone");
                                    self.running[i].share_wait = None;
                                    continue;
                                }
                            }
                        }
                        None if pending => continue,
                        None => None,
                    }
                }
            };
            let r = &mut self.running[i];
            r.share_wait = None;
            if let Some(s) = shared {
                Self::attach(r, s, &mut self.stats);
            }
        }
    }

    /// Attaches an empty running sequence to `shared` (its prompt starts with its tokens).
    fn attach(r: &mut Running, shared: Arc<SharedPrefix>, stats: &mut SchedulerStats) {
        let p = shared.len();
        match r.session.attach_prefix(shared, &r.prompt) {
            Ok(()) => {
                r.fed = p;
                stats.shared_attached += 1;
                stats.shared_positions += p as u64;
            }
            Err(e) => tracing::warn!("attaching a shared prefix failed ({e}); prefilling alone"),
        }
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
        let mut kept = session.rewind(&prompt);
        // A prefix already shared is attached now; one a running sequence's prompt also starts
        // with, once that sequence holds it (the prompt then waits; nothing is restored).
        let mut share_wait = None;
        let mut attach_now = None;
        if self.share && session.can_share() {
            match self.known_prefix(&prompt) {
                Some(s) if s.len() > kept => attach_now = Some(s),
                _ => {
                    let best = (0..self.running.len()).map(|j| self.shareable_with(&prompt, j)).max().unwrap_or(0);
                    if best >= SHARE_BLOCK && best > kept {
                        share_wait = Some(best);
                    }
                }
            }
            if (attach_now.is_some() || share_wait.is_some()) && kept > 0 {
                session.reset();
                kept = 0;
            }
        }
        let restored =
            if attach_now.is_some() || share_wait.is_some() { Ok(None) } else { session.restore_prefix(&prompt) };
        let restored = match restored {
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
        let mut running = Running {
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
            share_wait,
        };
        if let Some(s) = attach_now {
            Self::attach(&mut running, s, &mut self.stats);
        }
        Ok(running)
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

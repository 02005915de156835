//! The engine worker: one thread that owns the engine's scheduler and runs queued jobs, up to
//! `--max-batch` at once (first come first served), streaming each job's text back over its
//! own channel.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use ollm_engine::{
    CancelCheck, FinishReason, GenerateParams, Generation, Request, Scheduler, Sink, TokenEvent, TokenLogprob,
};
use tokio::sync::mpsc::UnboundedSender;

use crate::error::{ApiError, ServerError};

/// One generation request, ready to run: token ids and parameters already validated.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// Where the worker sends the job's text and its end; dropped receiver = cancel.
    pub events: UnboundedSender<JobEvent>,
}

/// What the worker tells a handler about its job.
#[derive(Debug)]
pub enum JobEvent {
    /// More generated text (never empty).
    Text(String),
    /// More reasoning (a harmony model's analysis or commentary channel; never empty).
    Reasoning(String),
    /// A generated token's log-probability (when asked for), sent before the text it completed.
    Logprob(TokenLogprob),
    /// The job ended.
    Done(JobOutcome),
    /// The engine failed on this job.
    Failed(String),
}

/// How a job ended.
#[derive(Debug, Clone, Copy)]
pub struct JobOutcome {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Counters shown by GET /health.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Jobs queued and not yet taken by the worker.
    pub waiting: AtomicUsize,
    pub completed: AtomicUsize,
    /// Jobs whose client went away (before or during generation).
    pub cancelled: AtomicUsize,
    pub failed: AtomicUsize,
    /// The most requests one engine step has run together so far.
    pub most_in_step: AtomicUsize,
}

/// The sending side of the FIFO; cheap to clone into every handler.
#[derive(Debug, Clone)]
pub struct JobQueue {
    sender: SyncSender<Job>,
    pub stats: Arc<QueueStats>,
}

impl JobQueue {
    /// Starts the worker thread that owns `scheduler` (up to its `max_batch` jobs at once).
    pub fn start(scheduler: Scheduler, capacity: usize) -> Result<Self, ServerError> {
        let (sender, receiver) = sync_channel(capacity.max(1));
        let stats = Arc::new(QueueStats::default());
        let worker_stats = stats.clone();
        std::thread::Builder::new()
            .name("ollm-engine".into())
            .spawn(move || worker(scheduler, receiver, &worker_stats))
            .map_err(|e| ServerError::Worker(e.to_string()))?;
        Ok(Self { sender, stats })
    }

    /// Queues a job; a full queue is a 503 rather than an unbounded wait.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        match self.sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                let waiting = self.stats.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
                Err(ApiError::busy(waiting))
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(ApiError::internal("the engine worker has stopped; restart the server"))
            }
        }
    }
}

/// Runs jobs until every sender is gone: each job joins the scheduler's running sequences at
/// the next step where a place is free.
fn worker(mut sched: Scheduler, jobs: Receiver<Job>, stats: &Arc<QueueStats>) {
    let max_batch = sched.config().max_batch;
    loop {
        // Block only while nothing runs; otherwise take what has arrived, as many as have a
        // place (the rest stay queued, where --queue bounds them), and step.
        if sched.is_idle() {
            match jobs.recv() {
                Ok(job) => take(&mut sched, job, stats),
                Err(_) => return,
            }
        }
        while sched.running() + sched.waiting() < max_batch {
            match jobs.try_recv() {
                Ok(job) => take(&mut sched, job, stats),
                Err(_) => break,
            }
        }
        sched.step();
        stats.most_in_step.store(sched.stats().max_seqs_in_step, Ordering::SeqCst);
    }
}

/// Hands a received job to the scheduler, unless its client has already gone.
fn take(sched: &mut Scheduler, job: Job, stats: &Arc<QueueStats>) {
    stats.waiting.fetch_sub(1, Ordering::SeqCst);
    if job.events.is_closed() {
        // The line first, then the count: a watcher of /health then finds the line written.
        eprintln!(
            "[ollm] cancelled a prompt during prefill (0 of {} tokens fed): the client disconnected while it waited",
            job.prompt.len()
        );
        stats.cancelled.fetch_add(1, Ordering::SeqCst);
        return;
    }
    // A client that goes away during prefill stops it at the next step.
    let watched = job.events.clone();
    let params = GenerateParams { cancel: Some(CancelCheck::new(move || watched.is_closed())), ..job.params };
    let sink = Stream { events: job.events, stats: stats.clone() };
    sched.submit(Request { prompt: job.prompt, params, sink: Box::new(sink) });
}

/// Streams a job's text to its handler and counts how it ended.
struct Stream {
    events: UnboundedSender<JobEvent>,
    stats: Arc<QueueStats>,
}

impl Sink for Stream {
    fn token(&mut self, ev: TokenEvent<'_>) -> ControlFlow<()> {
        let mut gone = self.events.is_closed();
        if let Some(lp) = ev.logprob {
            gone |= self.events.send(JobEvent::Logprob(lp.clone())).is_err();
        }
        if !ev.reasoning.is_empty() {
            gone |= self.events.send(JobEvent::Reasoning(ev.reasoning.to_string())).is_err();
        }
        if !ev.text.is_empty() {
            gone |= self.events.send(JobEvent::Text(ev.text.to_string())).is_err();
        }
        if gone { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    }

    fn done(&mut self, result: ollm_engine::Result<Generation>) {
        let stats = &self.stats;
        match result {
            Ok(g) if g.finish == FinishReason::Cancelled => {
                // The line first, then the count (see `take`).
                if g.stats.generated_tokens == 0 {
                    eprintln!(
                        "[ollm] cancelled a prompt during prefill ({} of {} tokens fed): the client disconnected",
                        g.stats.prompt_fed, g.stats.prompt_tokens
                    );
                } else {
                    eprintln!(
                        "[ollm] cancelled a generation after {} tokens: the client disconnected",
                        g.stats.generated_tokens
                    );
                }
                stats.cancelled.fetch_add(1, Ordering::SeqCst);
            }
            Ok(g) => {
                stats.completed.fetch_add(1, Ordering::SeqCst);
                let outcome = JobOutcome {
                    finish: g.finish,
                    prompt_tokens: g.stats.prompt_tokens,
                    completion_tokens: g.stats.generated_tokens,
                };
                let _ = self.events.send(JobEvent::Done(outcome));
            }
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::SeqCst);
                let _ = self.events.send(JobEvent::Failed(e.to_string()));
            }
        }
    }
}

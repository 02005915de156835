//! The engine worker: one thread that owns the model's session and runs queued jobs one at a
//! time, first come first served, streaming each job's text back over its own channel.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use ollm_engine::{CancelCheck, FinishReason, GenerateParams, Session, generate_reusing};
use ollm_tokenizer::Tokenizer;
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
}

/// The sending side of the FIFO; cheap to clone into every handler.
#[derive(Debug, Clone)]
pub struct JobQueue {
    sender: SyncSender<Job>,
    pub stats: Arc<QueueStats>,
}

impl JobQueue {
    /// Starts the worker thread that owns `session` (one sequence at a time).
    pub fn start(session: Session, tokenizer: Arc<Tokenizer>, capacity: usize) -> Result<Self, ServerError> {
        let (sender, receiver) = sync_channel(capacity.max(1));
        let stats = Arc::new(QueueStats::default());
        let worker_stats = stats.clone();
        std::thread::Builder::new()
            .name("ollm-engine".into())
            .spawn(move || worker(session, &tokenizer, receiver, &worker_stats))
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

/// Runs jobs until every sender is gone.
fn worker(mut session: Session, tokenizer: &Tokenizer, jobs: Receiver<Job>, stats: &QueueStats) {
    while let Ok(job) = jobs.recv() {
        stats.waiting.fetch_sub(1, Ordering::SeqCst);
        if job.events.is_closed() {
            stats.cancelled.fetch_add(1, Ordering::SeqCst);
            tracing::info!("skipped a queued request whose client went away");
            continue;
        }
        let events = &job.events;
        // A client that goes away during prefill stops it at the next chunk.
        let watched = job.events.clone();
        let params = GenerateParams { cancel: Some(CancelCheck::new(move || watched.is_closed())), ..job.params };
        // The session keeps what this prompt shares with the last one (a document, a system
        // prompt) and computes the rest.
        let result = generate_reusing(&mut session, tokenizer, &job.prompt, &params, &mut |ev| {
            let mut gone = events.is_closed();
            if !ev.reasoning.is_empty() {
                gone |= events.send(JobEvent::Reasoning(ev.reasoning.to_string())).is_err();
            }
            if !ev.text.is_empty() {
                gone |= events.send(JobEvent::Text(ev.text.to_string())).is_err();
            }
            if gone { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        });
        match result {
            Ok(g) if g.finish == FinishReason::Cancelled => {
                stats.cancelled.fetch_add(1, Ordering::SeqCst);
                if g.stats.generated_tokens == 0 {
                    eprintln!(
                        "[ollm] cancelled a prompt during prefill ({} of {} tokens fed): the client disconnected",
                        session.len(),
                        g.stats.prompt_tokens
                    );
                } else {
                    eprintln!(
                        "[ollm] cancelled a generation after {} tokens: the client disconnected",
                        g.stats.generated_tokens
                    );
                }
            }
            Ok(g) => {
                stats.completed.fetch_add(1, Ordering::SeqCst);
                let outcome = JobOutcome {
                    finish: g.finish,
                    prompt_tokens: g.stats.prompt_tokens,
                    completion_tokens: g.stats.generated_tokens,
                };
                let _ = events.send(JobEvent::Done(outcome));
            }
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::SeqCst);
                let _ = events.send(JobEvent::Failed(e.to_string()));
            }
        }
    }
}

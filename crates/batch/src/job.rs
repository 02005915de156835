//! Running a batch: skip the ids already in the results file, report bad and duplicate lines to
//! the errors file, then generate the remaining requests, up to `max_batch` at a time through
//! the engine's scheduler (started in input order), and append each result as soon as it is
//! done.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::path::PathBuf;

use std::sync::mpsc;

use ollm_engine::{ChatModel, GenerateParams, Generation, GrammarCompiler, Request, Scheduler, SchedulerConfig, Sink};
use serde_json::{Value, json};

use crate::BatchError;
use crate::lock::JobLocks;
use crate::reader::{BatchRequest, Input, LineError, id_key, read_requests};
use crate::shard::{Shard, fnv1a};
use crate::writer::JsonlLog;

/// Where the job reads and writes, and its defaults.
#[derive(Debug, Clone)]
pub struct JobOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    pub errors: PathBuf,
    /// `max_tokens` of lines that give none.
    pub default_max_tokens: usize,
    /// Run only this shard's ids ([`Shard::owns`]); `output` and `errors` are then the shard's
    /// own files.
    pub shard: Option<Shard>,
    /// Requests generated together (one pass over the weights per step for all of them).
    pub max_batch: usize,
    /// Tokens one step feeds at most (decode tokens, then prompt chunks).
    pub step_tokens: usize,
    /// Requests whose prompts start alike hold that prefix's KV once (the scheduler's
    /// prefix sharing; `false` keeps a private copy per request).
    pub share_prefixes: bool,
}

/// What the caller hears while the job runs (to draw a progress bar).
#[derive(Debug)]
pub enum Progress<'a> {
    /// Work is about to start: `pending` requests to run, `already_done` skipped.
    Planned { pending: usize, already_done: usize, torn_bytes: u64 },
    /// A line or request went to the errors file.
    Error(&'a LineError),
    /// One request finished and its result is on disk.
    Finished { id: &'a str, completion_tokens: usize },
}

/// Totals of one run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct JobSummary {
    pub already_done: usize,
    pub completed: usize,
    pub failed: usize,
    pub invalid_lines: usize,
    pub duplicate_ids: usize,
    /// Requests left to the other shards.
    pub other_shards: usize,
    /// Requests that attached to a prefix another one computed, and the most KV-cache bytes
    /// the job held at once (each shared prefix once) beside what it would have held with
    /// every prefix copied per request.
    pub shared_attached: u64,
    pub peak_kv_bytes: u64,
    pub peak_kv_unshared_bytes: u64,
}

/// Runs the job described by `opts`, whose files `locks` holds ([`JobLocks::acquire`], so no
/// other process writes them); bad lines and failed requests are reported, not fatal.
pub fn run_job(
    m: &ChatModel,
    opts: &JobOptions,
    locks: &JobLocks,
    on: &mut dyn FnMut(Progress<'_>),
) -> Result<JobSummary, BatchError> {
    if !locks.cover(opts) {
        return Err(BatchError::Io {
            path: opts.output.clone(),
            detail: "run_job was given the locks of other files; take JobLocks::acquire(opts)".into(),
        });
    }
    let (requests, bad_lines) = read_requests(&opts.input)?;
    let (mut out, recovered) = JsonlLog::resume(&opts.output)?;
    let mut errors = JsonlLog::create(&opts.errors)?;
    let mut summary = JobSummary::default();

    let report = |errors: &mut JsonlLog, e: &LineError, on: &mut dyn FnMut(Progress<'_>)| -> Result<(), BatchError> {
        errors.append(&json!({"line": e.line, "id": e.id, "error": e.message}))?;
        on(Progress::Error(e));
        Ok(())
    };
    // A bad line goes to the shard of its id, or to shard 0 when it has none.
    let ours = |e: &LineError| match (opts.shard, e.id.as_ref().and_then(id_key)) {
        (None, _) => true,
        (Some(s), Some(key)) => s.owns(&key),
        (Some(s), None) => s.index == 0,
    };
    for e in bad_lines.iter().filter(|e| ours(e)) {
        report(&mut errors, e, on)?;
        summary.invalid_lines += 1;
    }

    let mut seen = HashSet::new();
    let mut pending = Vec::new();
    for r in requests {
        let key = id_key(&r.id).unwrap_or_default();
        if opts.shard.is_some_and(|s| !s.owns(&key)) {
            summary.other_shards += 1;
        } else if !seen.insert(key.clone()) {
            summary.duplicate_ids += 1;
            let e = LineError {
                line: r.line,
                id: Some(r.id.clone()),
                message: format!("line {}: duplicate id {key}; skipped (ids must be unique)", r.line),
            };
            report(&mut errors, &e, on)?;
        } else if recovered.done.contains(&key) {
            summary.already_done += 1;
        } else {
            pending.push((key, r));
        }
    }
    on(Progress::Planned {
        pending: pending.len(),
        already_done: summary.already_done,
        torn_bytes: recovered.torn_bytes,
    });

    // Every pending request goes to the scheduler at once (prompts are token ids: small); up to
    // max_batch run together, and each result is appended (with an fsync) as soon as it ends.
    let (tx, rx) = mpsc::channel::<(usize, Result<Generation, String>)>();
    let mut sched = scheduler(m, opts)?;
    let grammars = std::sync::OnceLock::new();
    for (index, (_, r)) in pending.iter().enumerate() {
        let tx = tx.clone();
        match prepare(m, r, opts.default_max_tokens, &grammars) {
            Ok((prompt, params)) => sched.submit(Request { prompt, params, sink: Box::new(Ended { index, tx }) }),
            Err(message) => {
                let _ = tx.send((index, Err(message)));
            }
        }
    }
    drop(tx);
    loop {
        for (index, result) in rx.try_iter() {
            let (key, r) = &pending[index];
            match result {
                Ok(g) => {
                    out.append(&result_line(m, &grammars, r, &g))?;
                    summary.completed += 1;
                    on(Progress::Finished { id: key, completion_tokens: g.stats.generated_tokens });
                }
                Err(message) => {
                    summary.failed += 1;
                    let e = LineError {
                        line: r.line,
                        id: Some(r.id.clone()),
                        message: format!("line {}: {message}", r.line),
                    };
                    report(&mut errors, &e, on)?;
                }
            }
        }
        if sched.is_idle() {
            break;
        }
        sched.step();
        let st = sched.stats();
        summary.shared_attached = st.shared_attached;
        (summary.peak_kv_bytes, summary.peak_kv_unshared_bytes) = (st.peak_kv_bytes, st.peak_kv_unshared_bytes);
    }
    Ok(summary)
}

/// The scheduler a job runs on: `opts.max_batch` sequences at once, each with its own session.
fn scheduler(m: &ChatModel, opts: &JobOptions) -> Result<Scheduler, BatchError> {
    let model = m.model.clone();
    let prefix = m.prefix.clone();
    let cfg = SchedulerConfig { max_batch: opts.max_batch.max(1), step_tokens: opts.step_tokens };
    let tokenizer = std::sync::Arc::new(m.tokenizer.clone());
    let new_session = move || ollm_engine::session_with_prefix(model.clone(), prefix.as_ref());
    Ok(Scheduler::new(m.model.clone(), tokenizer, cfg, Box::new(new_session)).with_prefix_sharing(opts.share_prefixes))
}

/// Hands a finished request back to the job's loop.
struct Ended {
    index: usize,
    tx: mpsc::Sender<(usize, Result<Generation, String>)>,
}

impl Sink for Ended {
    fn token(&mut self, _: ollm_engine::TokenEvent<'_>) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }

    fn done(&mut self, result: ollm_engine::Result<Generation>) {
        let _ = self.tx.send((self.index, result.map_err(|e| e.to_string())));
    }
}

/// A request's prompt ids and parameters, or why it cannot run.
/// `grammars`: the vocabulary made ready for constrained decoding, built by the first request
/// with a `response_format`.
fn prepare(
    m: &ChatModel,
    r: &BatchRequest,
    default_max: usize,
    grammars: &std::sync::OnceLock<Result<GrammarCompiler, String>>,
) -> Result<(Vec<u32>, GenerateParams), String> {
    let prompt = match &r.input {
        Input::Prompt(p) => m.tokenizer.encode_prompt(p).map_err(|e| e.to_string())?,
        Input::Messages(msgs) => {
            let template =
                m.template.as_ref().ok_or("the model has no chat template; give 'prompt' instead of 'messages'")?;
            match &r.tools {
                None => m.tokenizer.encode_chat(template, msgs),
                Some((tools, _)) if template.supports_tools() => {
                    let sent: Vec<Value> = tools
                        .iter()
                        .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}))
                        .collect();
                    m.tokenizer.encode_chat_with_tools(template, msgs, Some(&Value::Array(sent)))
                }
                Some((tools, choice)) => {
                    m.tokenizer.encode_chat(template, &ollm_engine::tools::with_fallback_prompt(msgs, tools, choice))
                }
            }
            .map_err(|e| e.to_string())?
        }
    };
    let mut sampling = m.default_sampling.clone();
    if let Some(t) = r.temperature {
        sampling.temperature = t;
    }
    if let Some(p) = r.top_p {
        sampling.top_p = p;
    }
    if r.top_k.is_some() {
        sampling.top_k = r.top_k;
    }
    let tool_grammar = r.tools.as_ref().and_then(|(t, c)| ollm_engine::tools::call_grammar(t, c));
    let (spec, field) = match (&tool_grammar, &r.response_format) {
        (Some(g), _) => (Some(g), "tools"),
        (None, f) => (f.as_ref(), "response_format"),
    };
    let grammar = match spec {
        None => None,
        Some(spec) => {
            let compiler = grammars
                .get_or_init(|| compiler(m))
                .as_ref()
                .map_err(|e| format!("line {}: '{field}': {e}", r.line))?;
            Some(compiler.compile(spec).map_err(|e| format!("line {}: '{field}': {e}", r.line))?)
        }
    };
    // The same id gets the same seed on every run, so a resumed job gives the same text.
    sampling.seed = r.seed.unwrap_or_else(|| fnv1a(id_key(&r.id).unwrap_or_default().as_bytes()));
    let params = GenerateParams {
        max_new_tokens: r.max_tokens.unwrap_or(default_max),
        sampling,
        eos_token_ids: m.eos_token_ids.clone(),
        stop: r.stop.clone(),
        harmony: matches!(r.input, Input::Messages(_))
            .then(|| ollm_engine::HarmonyMarkers::from_tokenizer(&m.tokenizer))
            .flatten(),
        cancel: None,
        grammar,
        speculate: m.speculate.clone(),
        logprobs: r.logprobs,
    };
    Ok((prompt, params))
}

/// The result line of a finished request.
fn result_line(m: &ChatModel, grammars: &Grammars, r: &BatchRequest, g: &Generation) -> Value {
    let usage = json!({
        "prompt_tokens": g.stats.prompt_tokens,
        "completion_tokens": g.stats.generated_tokens,
        "total_tokens": g.stats.prompt_tokens + g.stats.generated_tokens,
    });
    let mut line = json!({"id": r.id, "text": g.text, "finish_reason": g.finish.as_str(), "usage": usage});
    let call = r.tools.as_ref().and_then(|(tools, _)| ollm_engine::tools::parse_call(&g.text, tools));
    if let Some(call) = call {
        // As the chat API answers a call: the function and its arguments as a JSON string.
        line["tool_calls"] =
            json!([{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}]);
        if matches!(
            g.finish,
            ollm_engine::FinishReason::Eos
                | ollm_engine::FinishReason::Stop
                | ollm_engine::FinishReason::GrammarComplete
        ) {
            line["finish_reason"] = json!("tool_calls");
        }
    }
    if !g.reasoning.is_empty() {
        line["reasoning"] = json!(g.reasoning);
    }
    if r.logprobs.is_some() {
        line["logprobs"] = logprobs_json(m, grammars, &g.logprobs);
    }
    line
}

/// Each token's `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}` (the chat
/// API's `logprobs.content`); -9999.0 stands for -inf, as in OpenAI's API.
fn logprobs_json(m: &ChatModel, grammars: &Grammars, tokens: &[ollm_engine::TokenLogprob]) -> Value {
    let vocab = grammars.get_or_init(|| compiler(m)).as_ref().ok();
    let entry = |id: u32, lp: f32| {
        let bytes = match vocab {
            Some(c) => c.token_bytes(id),
            None => m.tokenizer.decode(&[id], false).unwrap_or_default().into_bytes(),
        };
        let lp = if lp.is_finite() { lp } else { -9999.0 };
        json!({"token": String::from_utf8_lossy(&bytes), "logprob": lp, "bytes": bytes})
    };
    tokens
        .iter()
        .map(|t| {
            let mut e = entry(t.id, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect()
}

type Grammars = std::sync::OnceLock<Result<GrammarCompiler, String>>;

fn compiler(m: &ChatModel) -> Result<GrammarCompiler, String> {
    GrammarCompiler::new(&m.tokenizer, &m.eos_token_ids, m.model.info().vocab_size).map_err(|e| e.to_string())
}

//! Streaming responses: a relay task turns a job's events into server-sent events in OpenAI's
//! chunk format (`data: {...}` … `data: [DONE]`). When the client goes away the response body,
//! and with it the relay's output channel, is dropped; the relay then drops the job's receiver,
//! which cancels the generation at the worker's next token.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, Sse};
use ollm_engine::{CallPiece, CallStream, TokenLogprob};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::error::ApiError;
use crate::logprobs;
use crate::openai_types::{ChatCompletionChunk, ChunkChoice, Delta, TextChoice, TextCompletion, Usage};
use crate::queue::JobEvent;
use crate::request::{RequestRules, ToolsAsked};
use crate::routes;

/// Which API's chunk shape to stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    Chat,
    Text,
}

/// What every chunk of one response repeats.
#[derive(Debug, Clone)]
pub struct StreamMeta {
    pub kind: ChunkKind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    /// The served model's tokenizer (token texts for logprobs).
    pub rules: Arc<RequestRules>,
    /// Tools the answer may call: a call streams as `delta.tool_calls` pieces.
    pub tools: Option<ToolsAsked>,
}

pub type EventStream = Sse<UnboundedReceiverStream<Result<Event, Infallible>>>;

/// Starts the relay over the jobs of a request's choices (`n` of them, choice i from `jobs[i]`)
/// and returns the SSE response body.
pub fn stream_response(meta: StreamMeta, jobs: Vec<UnboundedReceiver<JobEvent>>) -> EventStream {
    let (tx, rx) = unbounded_channel();
    tokio::spawn(relay(meta, jobs, tx));
    Sse::new(UnboundedReceiverStream::new(rx))
}

/// One channel of `(choice, event)` from the jobs of all choices; `None` = that job's worker
/// dropped it. A forwarder ends (dropping its job's receiver: a cancel) when the merged
/// receiver goes.
fn merge(jobs: Vec<UnboundedReceiver<JobEvent>>) -> UnboundedReceiver<(usize, Option<JobEvent>)> {
    let (tx, rx) = unbounded_channel();
    for (i, mut job) in jobs.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = job.recv() => ev,
                    () = tx.closed() => return,
                };
                let last = matches!(ev, None | Some(JobEvent::Done(_) | JobEvent::Failed(_)));
                if tx.send((i, ev)).is_err() || last {
                    return;
                }
            }
        });
    }
    rx
}

/// What the relay keeps per choice: logprobs of tokens whose text has not been sent yet, and
/// (completions) the characters sent so far, for `text_offset`.
#[derive(Default)]
struct ChoiceState {
    logprobs: Vec<TokenLogprob>,
    offset: usize,
    /// With tools: Some once the answer is known to be a call (it opens with `{`, or a call
    /// was forced), followed as it streams.
    call: Option<CallStream>,
    /// With tools: the answer is known to be text.
    text: bool,
}

impl ChoiceState {
    fn take_logprobs(&mut self, meta: &StreamMeta) -> Option<Value> {
        if self.logprobs.is_empty() {
            return None;
        }
        let tokens = std::mem::take(&mut self.logprobs);
        Some(match meta.kind {
            ChunkKind::Chat => logprobs::chat(&meta.rules, &tokens),
            ChunkKind::Text => logprobs::text(&meta.rules, &tokens, &mut self.offset),
        })
    }
}

async fn relay(
    meta: StreamMeta,
    jobs: Vec<UnboundedReceiver<JobEvent>>,
    out: UnboundedSender<Result<Event, Infallible>>,
) {
    let n = jobs.len();
    let mut job = merge(jobs);
    let mut choices: Vec<ChoiceState> = (0..n).map(|_| ChoiceState::default()).collect();
    if meta.kind == ChunkKind::Chat {
        for i in 0..n {
            let first = Delta { role: Some("assistant"), content: Some(String::new()), ..Delta::default() };
            if !send(&out, &chat_chunk(&meta, i, first, None, None, None)) {
                return;
            }
        }
    }
    let (mut done, mut prompt_tokens, mut completion_tokens) = (0, 0, 0);
    while done < n {
        let event = tokio::select! {
            ev = job.recv() => ev,
            () = out.closed() => return,
        };
        let Some((i, Some(event))) = event else {
            // The worker dropped a job without a word: report it rather than hang.
            let err = ApiError::internal("the engine dropped the request");
            send_raw(&out, &err.body_json());
            break;
        };
        let c = &mut choices[i];
        let ok = match event {
            JobEvent::Logprob(lp) => {
                c.logprobs.push(lp);
                true
            }
            JobEvent::Text(text) if meta.tools.is_some() && !c.text => {
                let forced = meta.tools.as_ref().is_some_and(|t| t.forced);
                if c.call.is_none() && (forced || text.starts_with('{')) {
                    c.call = Some(CallStream::default());
                }
                let lps = c.take_logprobs(&meta);
                match &mut c.call {
                    Some(call) => {
                        let piece = call.push(&text);
                        send_call_piece(&meta, &out, i, piece, lps)
                    }
                    None => {
                        c.text = true;
                        let delta = Delta { content: Some(text), ..Delta::default() };
                        send(&out, &chat_chunk(&meta, i, delta, None, None, lps))
                    }
                }
            }
            JobEvent::Text(text) => {
                let lps = c.take_logprobs(&meta);
                match meta.kind {
                    ChunkKind::Chat => {
                        let delta = Delta { content: Some(text), ..Delta::default() };
                        send(&out, &chat_chunk(&meta, i, delta, None, None, lps))
                    }
                    ChunkKind::Text => {
                        if lps.is_none() {
                            c.offset += text.chars().count();
                        }
                        send(&out, &text_chunk(&meta, i, text, None, None, lps))
                    }
                }
            }
            JobEvent::Reasoning(text) => {
                let delta = Delta { reasoning_content: Some(text), ..Delta::default() };
                meta.kind != ChunkKind::Chat || send(&out, &chat_chunk(&meta, i, delta, None, None, None))
            }
            JobEvent::Done(outcome) => {
                done += 1;
                prompt_tokens = outcome.prompt_tokens;
                completion_tokens += outcome.completion_tokens;
                let mut reason = Some(outcome.finish.as_str());
                let lps = c.take_logprobs(&meta);
                if let Some(call) = c.call.take() {
                    let started = call.started();
                    let rest = call.finish();
                    if started && routes::ended_naturally(outcome.finish) {
                        reason = Some("tool_calls");
                    }
                    let ok = match (started, rest.is_empty()) {
                        (_, true) => true,
                        (true, false) => {
                            let piece = CallPiece { name: None, arguments: rest };
                            send_call_piece(&meta, &out, i, piece, None)
                        }
                        (false, false) => {
                            let delta = Delta { content: Some(rest), ..Delta::default() };
                            send(&out, &chat_chunk(&meta, i, delta, None, None, None))
                        }
                    };
                    if !ok {
                        return;
                    }
                }
                match meta.kind {
                    ChunkKind::Chat => send(&out, &chat_chunk(&meta, i, Delta::default(), reason, None, lps)),
                    ChunkKind::Text => send(&out, &text_chunk(&meta, i, String::new(), reason, None, lps)),
                }
            }
            JobEvent::Failed(message) => {
                send_raw(&out, &ApiError::internal(message).body_json());
                break;
            }
        };
        if !ok {
            return;
        }
    }
    if done == n && meta.include_usage {
        // The prompt once, the completions of every choice.
        let usage = Some(Usage::new(prompt_tokens, completion_tokens));
        match meta.kind {
            ChunkKind::Chat => send(
                &out,
                &ChatCompletionChunk {
                    choices: Vec::new(),
                    ..chat_chunk(&meta, 0, Delta::default(), None, usage, None)
                },
            ),
            ChunkKind::Text => send(
                &out,
                &TextCompletion { choices: Vec::new(), ..text_chunk(&meta, 0, String::new(), None, usage, None) },
            ),
        };
    }
    send_raw(&out, "[DONE]");
}

/// A chunk with a piece of choice `i`'s tool call: its id, type and name the first time, then
/// pieces of the arguments (nothing when the piece is empty and has no logprobs).
fn send_call_piece(
    meta: &StreamMeta,
    out: &UnboundedSender<Result<Event, Infallible>>,
    i: usize,
    piece: CallPiece,
    lps: Option<Value>,
) -> bool {
    let call = match piece.name {
        Some(name) => json!([{"index": 0, "id": routes::call_id(), "type": "function",
                              "function": {"name": name, "arguments": piece.arguments}}]),
        None if !piece.arguments.is_empty() => json!([{"index": 0, "function": {"arguments": piece.arguments}}]),
        None if lps.is_some() => return send(out, &chat_chunk(meta, i, Delta::default(), None, None, lps)),
        None => return true,
    };
    let delta = Delta { tool_calls: Some(call), ..Delta::default() };
    send(out, &chat_chunk(meta, i, delta, None, None, lps))
}

fn chat_chunk(
    meta: &StreamMeta,
    index: usize,
    delta: Delta,
    finish_reason: Option<&'static str>,
    usage: Option<Usage>,
    logprobs: Option<Value>,
) -> ChatCompletionChunk {
    ChatCompletionChunk {
        id: meta.id.clone(),
        object: "chat.completion.chunk",
        created: meta.created,
        model: meta.model.clone(),
        choices: vec![ChunkChoice { index: index as u32, delta, finish_reason, logprobs }],
        usage,
    }
}

fn text_chunk(
    meta: &StreamMeta,
    index: usize,
    text: String,
    finish_reason: Option<&'static str>,
    usage: Option<Usage>,
    logprobs: Option<Value>,
) -> TextCompletion {
    TextCompletion {
        id: meta.id.clone(),
        object: "text_completion",
        created: meta.created,
        model: meta.model.clone(),
        choices: vec![TextChoice { index: index as u32, text, finish_reason, logprobs }],
        usage,
    }
}

/// Sends one JSON chunk; false once the client is gone.
fn send<T: Serialize>(out: &UnboundedSender<Result<Event, Infallible>>, chunk: &T) -> bool {
    match serde_json::to_string(chunk) {
        Ok(json) => send_raw(out, &json),
        Err(e) => send_raw(out, &ApiError::internal(format!("cannot encode a chunk: {e}")).body_json()),
    }
}

fn send_raw(out: &UnboundedSender<Result<Event, Infallible>>, data: &str) -> bool {
    out.send(Ok(Event::default().data(data))).is_ok()
}

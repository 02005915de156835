//! Streaming responses: a relay task turns a job's events into server-sent events in OpenAI's
//! chunk format (`data: {...}` … `data: [DONE]`). When the client goes away the response body,
//! and with it the relay's output channel, is dropped; the relay then drops the job's receiver,
//! which cancels the generation at the worker's next token.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use serde::Serialize;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::error::ApiError;
use crate::openai_types::{ChatCompletionChunk, ChunkChoice, Delta, TextChoice, TextCompletion, Usage};
use crate::queue::{JobEvent, JobOutcome};

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
}

pub type EventStream = Sse<UnboundedReceiverStream<Result<Event, Infallible>>>;

/// Starts the relay and returns the SSE response body.
pub fn stream_response(meta: StreamMeta, job: UnboundedReceiver<JobEvent>) -> EventStream {
    let (tx, rx) = unbounded_channel();
    tokio::spawn(relay(meta, job, tx));
    Sse::new(UnboundedReceiverStream::new(rx))
}

async fn relay(
    meta: StreamMeta,
    mut job: UnboundedReceiver<JobEvent>,
    out: UnboundedSender<Result<Event, Infallible>>,
) {
    if meta.kind == ChunkKind::Chat {
        let first = Delta { role: Some("assistant"), content: Some(String::new()), reasoning_content: None };
        if !send(&out, &chat_chunk(&meta, first, None, None)) {
            return;
        }
    }
    loop {
        let event = tokio::select! {
            ev = job.recv() => ev,
            () = out.closed() => return,
        };
        let Some(event) = event else {
            // The worker dropped the job without a word: report it rather than hang.
            let err = ApiError::internal("the engine dropped the request");
            send_raw(&out, &err.body_json());
            break;
        };
        match event {
            JobEvent::Text(text) => {
                let ok = match meta.kind {
                    ChunkKind::Chat => {
                        let delta = Delta { role: None, content: Some(text), reasoning_content: None };
                        send(&out, &chat_chunk(&meta, delta, None, None))
                    }
                    ChunkKind::Text => send(&out, &text_chunk(&meta, text, None, None)),
                };
                if !ok {
                    return;
                }
            }
            JobEvent::Reasoning(text) => {
                let delta = Delta { role: None, content: None, reasoning_content: Some(text) };
                if meta.kind == ChunkKind::Chat && !send(&out, &chat_chunk(&meta, delta, None, None)) {
                    return;
                }
            }
            JobEvent::Done(outcome) => {
                finish(&meta, &out, outcome);
                break;
            }
            JobEvent::Failed(message) => {
                send_raw(&out, &ApiError::internal(message).body_json());
                break;
            }
        }
    }
    send_raw(&out, "[DONE]");
}

/// The chunk carrying `finish_reason`, then (if asked) the usage chunk.
fn finish(meta: &StreamMeta, out: &UnboundedSender<Result<Event, Infallible>>, o: JobOutcome) {
    let reason = Some(o.finish.as_str());
    let usage = Usage::new(o.prompt_tokens, o.completion_tokens);
    match meta.kind {
        ChunkKind::Chat => {
            send(out, &chat_chunk(meta, Delta::default(), reason, None));
            if meta.include_usage {
                send(
                    out,
                    &ChatCompletionChunk {
                        choices: Vec::new(),
                        ..chat_chunk(meta, Delta::default(), None, Some(usage))
                    },
                );
            }
        }
        ChunkKind::Text => {
            send(out, &text_chunk(meta, String::new(), reason, None));
            if meta.include_usage {
                send(
                    out,
                    &TextCompletion { choices: Vec::new(), ..text_chunk(meta, String::new(), None, Some(usage)) },
                );
            }
        }
    }
}

fn chat_chunk(
    meta: &StreamMeta,
    delta: Delta,
    finish_reason: Option<&'static str>,
    usage: Option<Usage>,
) -> ChatCompletionChunk {
    ChatCompletionChunk {
        id: meta.id.clone(),
        object: "chat.completion.chunk",
        created: meta.created,
        model: meta.model.clone(),
        choices: vec![ChunkChoice { index: 0, delta, finish_reason, logprobs: None }],
        usage,
    }
}

fn text_chunk(
    meta: &StreamMeta,
    text: String,
    finish_reason: Option<&'static str>,
    usage: Option<Usage>,
) -> TextCompletion {
    TextCompletion {
        id: meta.id.clone(),
        object: "text_completion",
        created: meta.created,
        model: meta.model.clone(),
        choices: vec![TextChoice { index: 0, text, finish_reason, logprobs: None }],
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

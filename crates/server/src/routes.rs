//! The HTTP surface: GET /health, GET /v1/models, POST /v1/completions and
//! /v1/chat/completions, the bearer-token check, and OpenAI-shaped errors for everything else
//! (bad JSON, oversized bodies, unknown paths).

use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ollm_engine::{FinishReason, TokenLogprob, tools};
use serde_json::json;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio_stream::StreamExt;

use crate::error::ApiError;
use crate::logprobs;
use crate::openai_types::{
    ChatChoice, ChatCompletion, ChatMessageOut, ModelList, ModelObject, TextChoice, TextCompletion, Usage, now_secs,
};
use crate::queue::{Job, JobEvent, JobOutcome};
use crate::request::{Prepared, chat_request, completion_request};
use crate::sse::{ChunkKind, StreamMeta, stream_response};
use crate::state::AppState;

/// An oversized body is still read (and dropped) up to this many times the limit, so the client
/// gets its 413 instead of a broken pipe; beyond that the connection is cut.
const DRAIN_FACTOR: usize = 8;

pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .merge(v1)
        .fallback(unknown_path)
        .method_not_allowed_fallback(wrong_method)
        // Bodies are read by `read_body`, which applies --max-body-bytes itself.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// With `--api-key`, every /v1 request needs `Authorization: Bearer <key>`: exactly that, no
/// whitespace around the key, compared in constant time.
async fn require_key(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        if !given.is_some_and(|g| same_key(g, key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// `given == key` in time that depends on the lengths only, not on where they first differ.
fn same_key(given: &[u8], key: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != key.len());
    for (i, &k) in key.iter().enumerate() {
        diff |= k ^ given.get(i).copied().unwrap_or(!k);
    }
    std::hint::black_box(diff) == 0
}

async fn health(State(s): State<AppState>) -> Json<serde_json::Value> {
    let st = &s.queue.stats;
    Json(json!({
        "status": "ok",
        "model": &*s.rules.model_id,
        "waiting": st.waiting.load(Ordering::SeqCst),
        "completed": st.completed.load(Ordering::SeqCst),
        "cancelled": st.cancelled.load(Ordering::SeqCst),
        "failed": st.failed.load(Ordering::SeqCst),
        "most_in_step": st.most_in_step.load(Ordering::SeqCst),
    }))
}

async fn models(State(s): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![ModelObject {
            id: s.rules.model_id.to_string(),
            object: "model",
            created: now_secs(),
            owned_by: "ollm",
        }],
    })
}

async fn completions(State(s): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let (model, prepared) = completion_request(&s.rules, &read_body(body, s.max_body_bytes).await?)?;
    respond(&s, prepared, ChunkKind::Text, &model).await
}

async fn chat_completions(State(s): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let (model, prepared) = chat_request(&s.rules, &read_body(body, s.max_body_bytes).await?)?;
    respond(&s, prepared, ChunkKind::Chat, &model).await
}

/// Reads the body, at most `limit` bytes of it; a larger body is a 413 with an OpenAI body.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut kept = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("Cannot read the request body: {e}"), None))?;
        total = total.saturating_add(chunk.len());
        if total <= limit {
            kept.extend_from_slice(&chunk);
        } else if total > limit.saturating_mul(DRAIN_FACTOR) {
            break;
        }
    }
    if total > limit {
        return Err(ApiError::invalid(
            format!(
                "The request body is too large: {}{total} bytes, the limit is {limit} (--max-body-bytes)",
                if total > limit.saturating_mul(DRAIN_FACTOR) { "over " } else { "" }
            ),
            None,
        )
        .with_status(StatusCode::PAYLOAD_TOO_LARGE));
    }
    Ok(Bytes::from(kept))
}

/// Queues the jobs (one per choice: `n` sequences the scheduler runs together), then answers
/// with one JSON body or an SSE stream.
async fn respond(s: &AppState, p: Prepared, kind: ChunkKind, model: &str) -> Result<Response, ApiError> {
    let mut jobs = Vec::with_capacity(p.n);
    for i in 0..p.n {
        let (tx, rx) = unbounded_channel();
        let mut params = p.params.clone();
        params.sampling.seed = choice_seed(p.params.sampling.seed, i);
        // A refusal (a full queue) drops the receivers of the choices already queued: they cancel.
        s.queue.submit(Job { prompt: p.prompt.clone(), params, events: tx })?;
        jobs.push(rx);
    }
    let meta = StreamMeta {
        kind,
        id: response_id(kind),
        created: now_secs(),
        model: model.to_string(),
        include_usage: p.include_usage,
        rules: s.rules.clone(),
        tools: p.tools.clone(),
    };
    if p.stream {
        return Ok(stream_response(meta, jobs).into_response());
    }
    let mut done = Vec::with_capacity(jobs.len());
    for rx in &mut jobs {
        done.push(collect(rx).await?);
    }
    // The prompt is counted once, whatever n.
    let prompt_tokens = done.first().map_or(0, |c| c.outcome.prompt_tokens);
    let usage = Usage::new(prompt_tokens, done.iter().map(|c| c.outcome.completion_tokens).sum());
    let response = match kind {
        ChunkKind::Chat => Json(ChatCompletion {
            id: meta.id,
            object: "chat.completion",
            created: meta.created,
            model: meta.model,
            choices: done
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    let call = p.tools.as_ref().and_then(|t| tools::parse_call(&c.text, &t.tools));
                    let finish_reason = match &call {
                        Some(_) if ended_naturally(c.outcome.finish) => "tool_calls",
                        _ => c.outcome.finish.as_str(),
                    };
                    ChatChoice {
                        index: i as u32,
                        logprobs: p.params.logprobs.map(|_| logprobs::chat(&s.rules, &c.logprobs)),
                        message: ChatMessageOut {
                            role: "assistant",
                            tool_calls: call.as_ref().map(|call| {
                                json!([{"id": call_id(), "type": "function",
                                        "function": {"name": call.name, "arguments": call.arguments}}])
                            }),
                            content: if call.is_some() { None } else { Some(c.text) },
                            reasoning_content: (!c.reasoning.is_empty()).then_some(c.reasoning),
                        },
                        finish_reason,
                    }
                })
                .collect(),
            usage,
        })
        .into_response(),
        ChunkKind::Text => Json(TextCompletion {
            id: meta.id,
            object: "text_completion",
            created: meta.created,
            model: meta.model,
            choices: done
                .into_iter()
                .enumerate()
                .map(|(i, c)| TextChoice {
                    index: i as u32,
                    logprobs: p.params.logprobs.map(|_| logprobs::text(&s.rules, &c.logprobs, &mut 0)),
                    text: c.text,
                    finish_reason: Some(c.outcome.finish.as_str()),
                })
                .collect(),
            usage: Some(usage),
        })
        .into_response(),
    };
    Ok(response)
}

/// The generation ended by itself (not cut by a limit or a cancel): a call in it is whole.
pub(crate) fn ended_naturally(f: FinishReason) -> bool {
    matches!(f, FinishReason::Eos | FinishReason::Stop | FinishReason::GrammarComplete)
}

/// A fresh tool-call id (`call_` and 24 hex digits).
pub(crate) fn call_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("call_{:016x}{:08x}", choice_seed(now_secs() ^ 0x5eed, n as usize), n as u32)
}

/// The seed of choice `i`: the request's seed for the first, a value mixed from it and `i`
/// (splitmix64) for the others, so every choice is reproducible and they differ.
pub(crate) fn choice_seed(seed: u64, i: usize) -> u64 {
    if i == 0 {
        return seed;
    }
    let mut z = seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One choice's whole answer.
struct Collected {
    text: String,
    reasoning: String,
    logprobs: Vec<TokenLogprob>,
    outcome: JobOutcome,
}

/// Waits for a whole generation. If the client disconnects, this future is dropped with `rx`,
/// which cancels the job.
async fn collect(rx: &mut UnboundedReceiver<JobEvent>) -> Result<Collected, ApiError> {
    let (mut text, mut reasoning, mut logprobs) = (String::new(), String::new(), Vec::new());
    while let Some(event) = rx.recv().await {
        match event {
            JobEvent::Text(t) => text.push_str(&t),
            JobEvent::Reasoning(t) => reasoning.push_str(&t),
            JobEvent::Logprob(lp) => logprobs.push(lp),
            JobEvent::Done(outcome) => return Ok(Collected { text, reasoning, logprobs, outcome }),
            JobEvent::Failed(message) => return Err(ApiError::internal(message)),
        }
    }
    Err(ApiError::internal("the engine dropped the request"))
}

fn response_id(kind: ChunkKind) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = if kind == ChunkKind::Chat { "chatcmpl" } else { "cmpl" };
    format!("{prefix}-{:x}{n:06}", now_secs())
}

async fn unknown_path(req: Request) -> ApiError {
    ApiError::invalid(
        format!("Unknown path {}; this server has GET /v1/models, POST /v1/completions, POST /v1/chat/completions and GET /health", req.uri().path()),
        None,
    )
    .with_status(StatusCode::NOT_FOUND)
    .with_code("unknown_url")
}

async fn wrong_method(req: Request) -> ApiError {
    ApiError::invalid(format!("{} is not allowed on {}", req.method(), req.uri().path()), None)
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

#[cfg(test)]
mod tests {
    use super::same_key;

    #[test]
    fn keys_match_exactly_without_trimming() {
        assert!(same_key(b"sekrit", b"sekrit"));
        for given in [&b"sekrit "[..], b" sekrit", b"sekri", b"sekritt", b"Sekrit", b""] {
            assert!(!same_key(given, b"sekrit"), "{:?}", String::from_utf8_lossy(given));
        }
    }
}

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
use serde_json::json;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio_stream::StreamExt;

use crate::error::ApiError;
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

/// Queues the job, then answers with one JSON body or an SSE stream.
async fn respond(s: &AppState, p: Prepared, kind: ChunkKind, model: &str) -> Result<Response, ApiError> {
    let (tx, mut rx) = unbounded_channel();
    s.queue.submit(Job { prompt: p.prompt, params: p.params, events: tx })?;
    let meta = StreamMeta {
        kind,
        id: response_id(kind),
        created: now_secs(),
        model: model.to_string(),
        include_usage: p.include_usage,
    };
    if p.stream {
        return Ok(stream_response(meta, rx).into_response());
    }
    let (text, reasoning, outcome) = collect(&mut rx).await?;
    let usage = Usage::new(outcome.prompt_tokens, outcome.completion_tokens);
    let finish_reason = outcome.finish.as_str();
    let response = match kind {
        ChunkKind::Chat => Json(ChatCompletion {
            id: meta.id,
            object: "chat.completion",
            created: meta.created,
            model: meta.model,
            choices: vec![ChatChoice {
                index: 0,
                message: ChatMessageOut {
                    role: "assistant",
                    content: text,
                    reasoning_content: (!reasoning.is_empty()).then_some(reasoning),
                },
                finish_reason,
                logprobs: None,
            }],
            usage,
        })
        .into_response(),
        ChunkKind::Text => Json(TextCompletion {
            id: meta.id,
            object: "text_completion",
            created: meta.created,
            model: meta.model,
            choices: vec![TextChoice { index: 0, text, finish_reason: Some(finish_reason), logprobs: None }],
            usage: Some(usage),
        })
        .into_response(),
    };
    Ok(response)
}

/// Waits for the whole generation. If the client disconnects, this future is dropped with `rx`,
/// which cancels the job.
async fn collect(rx: &mut UnboundedReceiver<JobEvent>) -> Result<(String, String, JobOutcome), ApiError> {
    let (mut text, mut reasoning) = (String::new(), String::new());
    while let Some(event) = rx.recv().await {
        match event {
            JobEvent::Text(t) => text.push_str(&t),
            JobEvent::Reasoning(t) => reasoning.push_str(&t),
            JobEvent::Done(outcome) => return Ok((text, reasoning, outcome)),
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

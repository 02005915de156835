//! ollm-server: an OpenAI-compatible HTTP server over the engine.
//!
//! One worker thread owns the model's session and runs one generation at a time; HTTP handlers
//! tokenize and validate a request, queue it (first come, first served) and relay the tokens the
//! worker streams back. A handler that goes away (the client disconnected) drops its receiver,
//! and the worker cancels that generation at its next token.

mod error;
mod logprobs;
mod openai_types;
mod queue;
mod request;
#[cfg(test)]
mod request_fuzz;
mod routes;
mod sse;
mod state;

use std::net::SocketAddr;

use ollm_engine::ChatModel;

pub use error::ServerError;
pub use request::response_format_spec;

/// Everything the server serves: the model, how to talk to it, and the id clients name.
#[derive(Debug)]
pub struct ServedModel {
    /// The id clients name in `model` (the model directory's name or the `--model` string).
    pub id: String,
    pub chat: ChatModel,
}

/// Where to listen and the limits on requests.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// Requests must carry `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for (also capped by the context).
    pub max_tokens_cap: usize,
    /// Requests waiting for the engine beyond the one running; more get 503.
    pub queue_capacity: usize,
    /// Most prompt tokens a request may bring; None = the model's context.
    pub max_prompt_tokens: Option<usize>,
    /// Prompt tokens per forward during prefill. Between chunks the worker checks that the
    /// client is still there, so smaller chunks stop an abandoned prompt sooner; larger ones
    /// pass over streamed weights fewer times.
    pub prefill_chunk: usize,
    /// Requests generated together: each step feeds a token to every running request (and
    /// prompt chunks, at most `prefill_chunk` tokens a step) in one pass over the weights.
    pub max_batch: usize,
}

/// The server's default prefill chunk: an abandoned prompt is dropped after at most this many
/// more tokens.
pub const SERVER_PREFILL_CHUNK: usize = 2048;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            max_body_bytes: 1 << 20,
            max_tokens_cap: 4096,
            queue_capacity: 64,
            max_prompt_tokens: None,
            prefill_chunk: SERVER_PREFILL_CHUNK,
            max_batch: 1,
        }
    }
}

/// Serves until Ctrl-C (or SIGTERM). Prints `listening on http://ADDR` to stderr once bound, so a
/// caller that asked for port 0 learns the real port.
pub fn serve(model: ServedModel, config: ServerConfig) -> Result<(), ServerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ServerError::Runtime(e.to_string()))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(|e| ServerError::Bind { addr: config.addr, detail: e.to_string() })?;
        let local =
            listener.local_addr().map_err(|e| ServerError::Bind { addr: config.addr, detail: e.to_string() })?;
        let state = state::AppState::start(model, &config)?;
        let app = routes::router(state);
        eprintln!("[ollm] listening on http://{local}");
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| ServerError::Io(e.to_string()))
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    eprintln!("[ollm] shutting down");
}

//! `ollm serve`: the OpenAI-compatible HTTP server (ollm-server) over one loaded model.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use anyhow::{Context, bail};
use clap::Args;
use ollm_server::{ServedModel, ServerConfig, serve};

use super::ModelArgs;
use crate::loaded::{BatchWanted, load_text, load_with};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub spec: crate::speculation::SpecArgs,
    /// Address to listen on. The default serves this machine only; 0.0.0.0 opens it to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 = any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long, env = "OLLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest max_tokens a request may ask for (never above the model's context).
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_cap: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Requests that may wait for the engine; more are refused with 503.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Most prompt tokens a request may bring; a longer prompt is a 400. Default: the model's context.
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Prompt tokens per forward during prefill. Between chunks the server checks that the client
    /// is still there: smaller chunks drop an abandoned prompt sooner, larger ones pass over
    /// streamed weights fewer times.
    #[arg(long, default_value_t = ollm_server::SERVER_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// Requests generated together: each step feeds one token to each of up to N running
    /// requests in one pass over the weights; a new request joins at the next step (default: what
    /// the memory budgets allow for the planned context, at most 64).
    #[arg(long, value_name = "N")]
    pub max_batch: Option<usize>,
}

pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    if a.max_tokens_cap == 0 {
        bail!("--max-tokens-cap must be at least 1");
    }
    if a.max_prompt_tokens == Some(0) {
        bail!("--max-prompt-tokens must be at least 1");
    }
    if a.prefill_chunk == 0 || a.prefill_chunk > ollm_engine::session::DEFAULT_PREFILL_CHUNK {
        bail!(
            "--prefill-chunk must be between 1 and {} (the planner sizes activations for a chunk of at most that)",
            ollm_engine::session::DEFAULT_PREFILL_CHUNK
        );
    }
    super::batch::check_batch_flags(a.max_batch, a.prefill_chunk)?;
    let addr = resolve(&a.host, a.port)?;
    let wanted = BatchWanted { max_batch: a.max_batch, step_tokens: a.prefill_chunk };
    let loaded = load_with(&a.model, Some(wanted), a.spec.draft_bytes()?)?;
    let text = load_text(&loaded.dir)?;
    let speculate = a.spec.params(&loaded, &text.tokenizer)?;
    let id = served_id(&a.model.model);
    eprintln!("[ollm] serving {id} ({}, loaded in {:.2} s)", loaded.dir.display(), loaded.load_time.as_secs_f64());
    let max_batch = a.max_batch.unwrap_or_else(|| loaded.default_max_batch());
    eprintln!("[ollm] up to {max_batch} requests generate together (--max-batch)");
    let model = ServedModel { id, chat: ollm_engine::ChatModel { speculate, ..loaded.chat_model(text) } };
    let config = ServerConfig {
        addr,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        max_body_bytes: a.max_body_bytes,
        max_tokens_cap: a.max_tokens_cap,
        queue_capacity: a.queue,
        max_prompt_tokens: a.max_prompt_tokens,
        prefill_chunk: a.prefill_chunk,
        max_batch,
    };
    serve(model, config)?;
    Ok(())
}

/// The model id clients name: a directory's own name, else the `--model` string (a hub id or
/// the demo name).
fn served_id(spec: &str) -> String {
    let p = Path::new(spec);
    let own_name = p.canonicalize().ok().and_then(|c| c.file_name().and_then(|n| n.to_str()).map(str::to_string));
    own_name.unwrap_or_else(|| spec.to_string())
}

fn resolve(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("--host {host}: not an address or a resolvable name; use e.g. 127.0.0.1"))?
        .next()
        .with_context(|| format!("--host {host}: resolves to no address"))
}

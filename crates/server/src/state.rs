//! The state every handler shares: the rules requests are checked against (the served model's
//! tokenizer, template and the limits), and the job queue in front of the engine worker.

use std::sync::Arc;

use ollm_engine::{Scheduler, SchedulerConfig};

use crate::error::ServerError;
use crate::queue::JobQueue;
use crate::request::RequestRules;
use crate::{ServedModel, ServerConfig};

/// Owns (through `Arc`s) what handlers read; the model itself belongs to the worker thread.
#[derive(Debug, Clone)]
pub struct AppState {
    pub rules: Arc<RequestRules>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    pub api_key: Option<Arc<str>>,
    pub queue: JobQueue,
}

impl AppState {
    /// Starts the engine worker and gathers the shared state.
    pub fn start(served: ServedModel, config: &ServerConfig) -> Result<Self, ServerError> {
        let m = served.chat;
        let context_tokens = m.model.info().max_positions;
        let harmony = ollm_engine::HarmonyMarkers::from_tokenizer(&m.tokenizer);
        let tokenizer = Arc::new(m.tokenizer);
        let (model, prefix, chunk) = (m.model.clone(), m.prefix.clone(), config.prefill_chunk);
        let new_session =
            move || Ok(ollm_engine::session_with_prefix(model.clone(), prefix.as_ref())?.with_prefill_chunk(chunk));
        let sched_cfg = SchedulerConfig { max_batch: config.max_batch, step_tokens: config.prefill_chunk };
        let sched = Scheduler::new(m.model.clone(), tokenizer.clone(), sched_cfg, Box::new(new_session));
        let queue = JobQueue::start(sched, config.queue_capacity)?;
        let rules = RequestRules {
            model_id: served.id.into(),
            tokenizer,
            template: m.template,
            eos_token_ids: m.eos_token_ids,
            harmony,
            default_sampling: m.default_sampling,
            context_tokens,
            max_tokens_cap: config.max_tokens_cap.min(context_tokens),
            max_prompt_tokens: config.max_prompt_tokens.map_or(context_tokens, |n| n.min(context_tokens)),
            grammars: std::sync::OnceLock::new(),
            speculate: m.speculate,
        };
        Ok(Self {
            rules: Arc::new(rules),
            max_body_bytes: config.max_body_bytes,
            api_key: config.api_key.as_deref().map(Arc::from),
            queue,
        })
    }
}

//! The state every handler shares: the served model's tokenizer and template, the limits, and
//! the job queue in front of the engine worker.

use std::sync::Arc;

use ollm_engine::SamplingParams;
use ollm_tokenizer::{ChatTemplate, Tokenizer};

use crate::error::ServerError;
use crate::queue::JobQueue;
use crate::{ServedModel, ServerConfig};

/// Owns (through `Arc`s) what handlers read; the model itself belongs to the worker thread.
#[derive(Debug, Clone)]
pub struct AppState {
    pub model_id: Arc<str>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<Arc<ChatTemplate>>,
    pub eos_token_ids: Arc<[u32]>,
    /// Some for a harmony model (GPT-OSS): chat answers carry the final channel as content and
    /// the others as `reasoning_content`.
    pub harmony: Option<ollm_engine::HarmonyMarkers>,
    pub default_sampling: SamplingParams,
    /// The model's context, in tokens (prompt + completion).
    pub context_tokens: usize,
    pub max_tokens_cap: usize,
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
        let session = m.session().map_err(|e| ServerError::Worker(e.to_string()))?;
        let harmony = ollm_engine::HarmonyMarkers::from_tokenizer(&m.tokenizer);
        let tokenizer = Arc::new(m.tokenizer);
        let queue = JobQueue::start(session, tokenizer.clone(), config.queue_capacity)?;
        Ok(Self {
            model_id: served.id.into(),
            tokenizer,
            template: m.template.map(Arc::new),
            eos_token_ids: m.eos_token_ids.into(),
            harmony,
            default_sampling: m.default_sampling,
            context_tokens,
            max_tokens_cap: config.max_tokens_cap.min(context_tokens),
            max_body_bytes: config.max_body_bytes,
            api_key: config.api_key.as_deref().map(Arc::from),
            queue,
        })
    }
}

//! A loaded model together with what it takes to talk to it.

use std::sync::Arc;

use ollm_models::CausalLm;
use ollm_tokenizer::{ChatTemplate, Tokenizer};

use crate::{Result, SamplingParams, Session};

/// Owns the tokenizer and chat template of a model and shares the model itself: everything a
/// front end (server, batch, chat) needs to turn requests into generations.
#[derive(Debug)]
pub struct ChatModel {
    pub model: Arc<dyn CausalLm>,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// Token ids that end a generation (config.json, generation_config.json, the template's eos).
    pub eos_token_ids: Vec<u32>,
    /// Sampling for parameters a request leaves out (the model's generation_config.json).
    pub default_sampling: SamplingParams,
    /// The persistent prefix cache sessions use, if any.
    pub prefix: Option<ollm_kv::PrefixConfig>,
    /// Speculative decoding for every generation (`--speculate`), if any.
    pub speculate: Option<crate::SpeculateParams>,
}

impl ChatModel {
    /// A fresh session over the model, with the prefix cache when one is configured.
    pub fn session(&self) -> Result<Session> {
        session_with_prefix(self.model.clone(), self.prefix.as_ref())
    }
}

/// A fresh session over `model`, keeping prefixes in `prefix` when given.
pub fn session_with_prefix(model: Arc<dyn CausalLm>, prefix: Option<&ollm_kv::PrefixConfig>) -> Result<Session> {
    let session = Session::new(model)?;
    match prefix {
        Some(cfg) => session.with_prefix_cache(cfg),
        None => Ok(session),
    }
}

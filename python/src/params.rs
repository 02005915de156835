//! The keyword arguments of `generate`, `stream` and `chat` turned into the engine's
//! [`GenerateParams`], over the model's defaults (generation_config.json) as `ollm run` does.

use ollm_engine::{ChatModel, GenerateParams, HarmonyMarkers, SamplingParams};
use pyo3::PyResult;

use crate::errors::value_error;

/// What a caller may set; None keeps the model's default.
#[derive(Debug, Clone, Default)]
pub struct Knobs {
    pub max_new_tokens: i64,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl Knobs {
    /// The engine's parameters; `harmony` for a chat prompt of a harmony model. Numbers out of
    /// range are `ValueError`s naming the argument (the sampler checks the rest).
    pub fn params(&self, m: &ChatModel, harmony: Option<HarmonyMarkers>) -> PyResult<GenerateParams> {
        let max_new_tokens = usize::try_from(self.max_new_tokens).map_err(|_| {
            value_error(format!("max_new_tokens = {}: give a number of at least 0", self.max_new_tokens))
        })?;
        let mut sampling: SamplingParams = m.default_sampling.clone();
        if let Some(t) = self.temperature {
            sampling.temperature = t;
        }
        if let Some(k) = self.top_k {
            let k = usize::try_from(k)
                .map_err(|_| value_error(format!("top_k = {k}: give a number of at least 0 (0 = no limit)")))?;
            sampling.top_k = (k > 0).then_some(k);
        }
        if let Some(p) = self.top_p {
            sampling.top_p = p;
        }
        if let Some(p) = self.min_p {
            sampling.min_p = p;
        }
        if let Some(p) = self.repetition_penalty {
            sampling.repetition_penalty = p;
        }
        sampling.seed = self.seed.unwrap_or_else(random_seed);
        // A bad value fails here, before any work, as a ValueError naming it.
        sampling.validate().map_err(crate::errors::engine)?;
        Ok(GenerateParams {
            max_new_tokens,
            sampling,
            eos_token_ids: if self.ignore_eos { Vec::new() } else { m.eos_token_ids.clone() },
            stop: self.stop.clone(),
            harmony,
            cancel: None,
            speculate: None,
            logprobs: None,
            grammar: None,
        })
    }
}

/// A seed for sampling when none is given (as `ollm run` picks one).
fn random_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

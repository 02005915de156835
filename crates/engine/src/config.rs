//! generation_config.json: extra eos ids and default sampling of a model directory.

use std::path::Path;

use serde_json::Value;

use crate::{EngineError, Result, SamplingParams};

/// Generation defaults shipped with a model. Every field is optional in the file.
#[derive(Debug, Clone, Default)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl GenerationConfig {
    /// Reads `<dir>/generation_config.json`; a missing file gives the empty config.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let err = |detail: String| EngineError::Config { path: path.clone(), detail };
        let text = std::fs::read_to_string(&path).map_err(|e| err(format!("cannot read: {e}")))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let ids = |key: &str| -> Result<Vec<u32>> {
            ollm_models::config::token_ids(v.get(key))
                .ok_or_else(|| err(format!("field '{key}': expected a token id or a list of token ids")))
        };
        let f = |key: &str| v.get(key).and_then(Value::as_f64).map(|x| x as f32);
        Ok(Self {
            eos_token_ids: ids("eos_token_id")?,
            bos_token_id: ids("bos_token_id")?.first().copied(),
            do_sample: v.get("do_sample").and_then(Value::as_bool),
            temperature: f("temperature"),
            top_k: v.get("top_k").and_then(Value::as_u64).map(|k| k as usize),
            top_p: f("top_p"),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
        })
    }

    /// The model's default sampling: greedy unless the file asks for sampling.
    pub fn default_sampling(&self) -> SamplingParams {
        let mut p = SamplingParams::greedy();
        if self.do_sample == Some(true) {
            p.temperature = self.temperature.unwrap_or(1.0);
            p.top_k = self.top_k.filter(|&k| k > 0);
            p.top_p = self.top_p.unwrap_or(1.0);
            p.min_p = self.min_p.unwrap_or(0.0);
        }
        p.repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        p
    }
}

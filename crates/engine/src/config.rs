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

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ollm-gencfg-{}-{}", std::process::id(), text.len()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("generation_config.json"), text).expect("write");
        dir
    }

    #[test]
    fn reads_eos_lists_and_sampling_defaults() {
        let dir = dir_with(
            r#"{"eos_token_id": [128001, 128009], "bos_token_id": 128000, "do_sample": true,
            "temperature": 0.6, "top_p": 0.9}"#,
        );
        let g = GenerationConfig::from_dir(&dir).expect("parses");
        assert_eq!(g.eos_token_ids, vec![128001, 128009]);
        assert_eq!(g.bos_token_id, Some(128000));
        let s = g.default_sampling();
        assert_eq!((s.temperature, s.top_p, s.top_k), (0.6, 0.9, None));
        // Without do_sample the default is greedy.
        let dir2 = dir_with(r#"{"eos_token_id": 2, "temperature": 0.6}"#);
        assert_eq!(GenerationConfig::from_dir(&dir2).expect("parses").default_sampling().temperature, 0.0);
        let bad = dir_with(r#"{"eos_token_id": "two"}"#);
        let e = GenerationConfig::from_dir(&bad).expect_err("bad eos").to_string();
        assert!(e.contains("generation_config.json") && e.contains("eos_token_id"), "{e}");
        for d in [dir, dir2, bad] {
            std::fs::remove_dir_all(d).ok();
        }
    }
}

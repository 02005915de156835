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
        // A field of the wrong type is an error naming it, not a silent default: a sampling
        // setting that is ignored changes every answer without a word.
        let typed = |key: &str, want: &str| err(format!("field '{key}': expected {want}, found {}", v[key]));
        let present = |key: &str| v.get(key).filter(|x| !x.is_null());
        let f = |key: &str| -> Result<Option<f32>> {
            match present(key) {
                None => Ok(None),
                Some(x) => match x.as_f64() {
                    Some(n) if n.is_finite() && n >= 0.0 && (n as f32).is_finite() => Ok(Some(n as f32)),
                    _ => Err(typed(key, "a finite number of at least 0")),
                },
            }
        };
        let do_sample = match present("do_sample") {
            None => None,
            Some(x) => Some(x.as_bool().ok_or_else(|| typed("do_sample", "true or false"))?),
        };
        let top_k = match present("top_k") {
            None => None,
            Some(x) => Some(x.as_u64().ok_or_else(|| typed("top_k", "a non-negative integer"))? as usize),
        };
        Ok(Self {
            eos_token_ids: ids("eos_token_id")?,
            bos_token_id: ids("bos_token_id")?.first().copied(),
            do_sample,
            temperature: f("temperature")?,
            top_k,
            top_p: f("top_p")?,
            min_p: f("min_p")?,
            repetition_penalty: f("repetition_penalty")?,
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

    /// Wrong types were once ignored (a string temperature meant greedy decoding).
    #[test]
    fn wrong_types_are_errors_naming_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (text, field) in [
            (r#"{"temperature": "0.7", "do_sample": true}"#, "temperature"),
            (r#"{"do_sample": "yes"}"#, "do_sample"),
            (r#"{"top_k": 2.5}"#, "top_k"),
            (r#"{"top_k": -1}"#, "top_k"),
            (r#"{"top_p": [0.9]}"#, "top_p"),
            (r#"{"min_p": -0.5}"#, "min_p"),
            (r#"{"repetition_penalty": 1e300}"#, "repetition_penalty"),
        ] {
            std::fs::write(dir.path().join("generation_config.json"), text).expect("write");
            let e = GenerationConfig::from_dir(dir.path()).expect_err(text).to_string();
            assert!(e.contains(&format!("field '{field}'")) && e.contains("expected") && !e.contains('\n'), "{e}");
        }
        std::fs::write(dir.path().join("generation_config.json"), r#"{"temperature": null, "top_k": 0}"#).expect("w");
        let g = GenerationConfig::from_dir(dir.path()).expect("null is absent");
        assert_eq!((g.temperature, g.top_k), (None, Some(0)));
    }
}

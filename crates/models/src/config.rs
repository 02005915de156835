//! Reading config.json: typed accessors that name the file and field in every error, and the
//! rules shared by all families (models.md §0): both RoPE spellings, head_dim, eos lists.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::common::rope::RopeScaling;
use crate::{ModelError, Result};

/// A parsed config.json with its path, for error messages.
#[derive(Debug, Clone)]
pub struct RawConfig {
    pub path: PathBuf,
    pub json: Map<String, Value>,
}

impl RawConfig {
    /// Reads `<dir>/config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Config {
            path: path.clone(),
            field: "(file)".into(),
            detail: format!("cannot read: {e} (is --model a Hugging Face model directory?)"),
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: PathBuf, text: &str) -> Result<Self> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(json)) => Ok(Self { path, json }),
            Ok(_) => Err(ModelError::Config { path, field: "(file)".into(), detail: "not a JSON object".into() }),
            Err(e) => Err(ModelError::Config { path, field: "(file)".into(), detail: format!("invalid JSON: {e}") }),
        }
    }

    pub fn err(&self, field: &str, detail: impl Into<String>) -> ModelError {
        ModelError::Config { path: self.path.clone(), field: field.into(), detail: detail.into() }
    }

    /// The value of `key`, treating JSON null as absent.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.err(key, "missing (required)"))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                None => Err(self.err(key, format!("expected a non-negative integer, found {v}"))),
            },
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    /// A token id field that may be an integer or a list of integers (`eos_token_id`).
    pub fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        token_ids(self.get(key)).ok_or_else(|| self.err(key, "expected a token id or a list of token ids"))
    }

    /// The architecture: `architectures[0]`, else `model_type`.
    pub fn architecture(&self) -> Result<String> {
        if let Some(a) = self.get("architectures").and_then(|v| v.as_array()).and_then(|a| a.first()) {
            return a
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| self.err("architectures", "expected a list of strings"));
        }
        match self.get("model_type").and_then(|v| v.as_str()) {
            Some(t) => Ok(t.to_string()),
            None => Err(self.err("architectures", "missing, and no 'model_type' either")),
        }
    }

    /// `(num_attention_heads, num_key_value_heads)`, the second defaulting to the first and
    /// dividing it (GQA).
    pub fn attention_heads(&self) -> Result<(usize, usize)> {
        let n_heads = self.usize("num_attention_heads")?;
        let n_kv_heads = self.opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
        if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(
                self.err("num_key_value_heads", format!("{n_kv_heads} does not divide num_attention_heads {n_heads}"))
            );
        }
        Ok((n_heads, n_kv_heads))
    }

    /// `head_dim` if present and non-null, else `hidden / heads`.
    pub fn head_dim(&self, hidden: usize, n_heads: usize) -> Result<usize> {
        match self.opt_usize("head_dim")? {
            Some(d) => Ok(d),
            None if n_heads > 0 && hidden.is_multiple_of(n_heads) => Ok(hidden / n_heads),
            None => {
                Err(self
                    .err("head_dim", format!("missing, and hidden_size {hidden} is not divisible by {n_heads} heads")))
            }
        }
    }

    /// RoPE parameters in either spelling (models.md §0): the rope dict (`rope_parameters`,
    /// else `rope_scaling`), then top-level keys, then the family default θ.
    pub fn rope(&self, default_theta: f64, max_positions: usize) -> Result<(f64, RopeScaling)> {
        let (dict_key, dict) = match (self.get("rope_parameters"), self.get("rope_scaling")) {
            (Some(d), _) => ("rope_parameters", Some(d)),
            (None, Some(d)) => ("rope_scaling", Some(d)),
            (None, None) => ("rope_parameters", None),
        };
        let dict = match dict {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(other) => return Err(self.err(dict_key, format!("expected an object, found {other}"))),
        };
        let num = |key: &str| -> Result<Option<f64>> {
            match dict.and_then(|m| m.get(key)).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| self.err(&format!("{dict_key}.{key}"), format!("expected a number, found {v}"))),
            }
        };
        let theta = match num("rope_theta")? {
            Some(t) => t,
            None => self.opt_f64("rope_theta")?.unwrap_or(default_theta),
        };
        let rope_type = dict
            .and_then(|m| m.get("rope_type").or_else(|| m.get("type")))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let need = |key: &str| -> Result<f64> {
            num(key)?
                .ok_or_else(|| self.err(&format!("{dict_key}.{key}"), format!("required for rope_type '{rope_type}'")))
        };
        let original =
            || -> Result<f64> { Ok(num("original_max_position_embeddings")?.unwrap_or(max_positions as f64)) };
        let scaling = match rope_type {
            "default" => RopeScaling::Default,
            "llama3" => RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_positions: original()?,
            },
            "yarn" => RopeScaling::Yarn {
                factor: need("factor")?,
                original_max_positions: original()?,
                beta_fast: num("beta_fast")?.unwrap_or(32.0),
                beta_slow: num("beta_slow")?.unwrap_or(1.0),
                truncate: dict.and_then(|m| m.get("truncate")).and_then(|v| v.as_bool()).unwrap_or(true),
                attention_factor: num("attention_factor")?,
                mscale: num("mscale")?,
                mscale_all_dim: num("mscale_all_dim")?,
            },
            other => {
                return Err(ModelError::Unsupported {
                    path: self.path.clone(),
                    field: format!("{dict_key}.rope_type"),
                    value: other.to_string(),
                    supported: "default, llama3, yarn".into(),
                });
            }
        };
        Ok((theta, scaling))
    }
}

/// An id or a list of ids.
pub fn token_ids(v: Option<&Value>) -> Option<Vec<u32>> {
    match v {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]),
        Some(Value::Array(a)) => a.iter().map(|x| x.as_u64().map(|n| n as u32)).collect(),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> RawConfig {
        RawConfig::parse(PathBuf::from("config.json"), text).expect("parses")
    }

    #[test]
    fn both_rope_spellings_agree() {
        let v5 = cfg(r#"{"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#);
        let hub = cfg(r#"{"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#);
        let a = v5.rope(10000.0, 131072).expect("v5");
        let b = hub.rope(10000.0, 131072).expect("hub");
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert_eq!(a.0, 500000.0);
        let plain = cfg("{}").rope(10000.0, 2048).expect("defaults");
        assert_eq!(plain.0, 10000.0);
        assert!(matches!(plain.1, RopeScaling::Default));
    }

    #[test]
    fn unsupported_rope_type_names_the_field() {
        let e = cfg(r#"{"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}"#).rope(1e4, 10).expect_err("rejects");
        let msg = e.to_string();
        assert!(msg.contains("rope_scaling.rope_type") && msg.contains("dynamic") && msg.contains("llama3"), "{msg}");
    }

    #[test]
    fn eos_may_be_a_list_and_head_dim_falls_back() {
        let c = cfg(r#"{"eos_token_id": [128001, 128009], "head_dim": null}"#);
        assert_eq!(c.token_ids("eos_token_id").expect("ids"), vec![128001, 128009]);
        assert_eq!(c.head_dim(4096, 32).expect("head_dim"), 128);
        assert!(cfg(r#"{"hidden_size": "big"}"#).usize("hidden_size").is_err());
    }
}

//! Reading config.json: typed accessors that name the file and field in every error, and the
//! rules shared by all families (docs/models.md §0): both RoPE spellings, head_dim, eos lists.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::common::rope::RopeScaling;
use crate::{ModelError, Result};

/// Most positions a config may declare: 2^24 (16 Mi). RoPE angles are computed from the position
/// as an f32, which holds every integer only up to 2^24, so positions past it would share
/// angles; the longest published contexts (10 M tokens) are below it. A larger value is a corrupt
/// or hostile file, and is refused before anything is sized by it.
pub const MAX_POSITIONS: usize = 1 << 24;

/// Largest integer size or count a config may give (hidden sizes, vocabularies, heads, layers,
/// experts): 2^20. The largest real ones are a quarter of it (a 262,144-token vocabulary), and
/// products of three such fields still fit in 64 bits, so shape arithmetic cannot overflow.
pub const MAX_DIM: usize = 1 << 20;

/// The fix every rejected numeric field suggests.
const FIX: &str = "the file is corrupt or hand-edited; restore the checkpoint's original config.json";

/// A parsed config.json with its path, for error messages.
#[derive(Debug, Clone)]
pub struct RawConfig {
    pub path: PathBuf,
    pub json: Map<String, Value>,
    /// Where these keys sit in the file, for messages: "" at the top, "text_config." for the
    /// text settings of a multimodal checkpoint ([`RawConfig::nested`]).
    pub section: String,
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
            Ok(Value::Object(json)) => Ok(Self { path, json, section: String::new() }),
            Ok(_) => Err(ModelError::Config { path, field: "(file)".into(), detail: "not a JSON object".into() }),
            Err(e) => Err(ModelError::Config { path, field: "(file)".into(), detail: format!("invalid JSON: {e}") }),
        }
    }

    pub fn err(&self, field: &str, detail: impl Into<String>) -> ModelError {
        ModelError::Config { path: self.path.clone(), field: self.field(field), detail: detail.into() }
    }

    /// `key` as the file spells its place (`text_config.rope_theta` in a nested section).
    pub fn field(&self, key: &str) -> String {
        format!("{}{key}", self.section)
    }

    /// The settings under `key` (a multimodal checkpoint's `text_config`) as a config of their
    /// own: `defaults` (the nested config class's, for the fields it may omit), then the
    /// section's own keys, then each of `from_top` that the whole model decides (its top-level
    /// value, else the given default; none: left as it is). Its errors name `key.field`.
    pub fn nested(&self, key: &str, defaults: Map<String, Value>, from_top: &[(&str, Option<Value>)]) -> Result<Self> {
        let section = match self.json.get(key) {
            Some(Value::Object(m)) => m,
            None | Some(Value::Null) => return Err(self.err(key, "missing (required for this architecture)")),
            Some(other) => return Err(self.err(key, format!("expected an object, found {other}"))),
        };
        let mut json = defaults;
        for (k, v) in section {
            json.insert(k.clone(), v.clone());
        }
        for (k, default) in from_top {
            if let Some(v) = self.get(k).cloned().or_else(|| default.clone()) {
                json.insert((*k).to_string(), v);
            }
        }
        Ok(Self { path: self.path.clone(), json, section: format!("{}{key}.", self.section) })
    }

    /// The value of `key`, treating JSON null as absent.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.err(key, "missing (required)"))
    }

    /// A size or count: a non-negative integer of at most [`MAX_DIM`].
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= MAX_DIM as u64 => Ok(Some(n as usize)),
                Some(n) => {
                    Err(self.err(key, format!("{n} is larger than 2^20 = {MAX_DIM}, more than any model has ({FIX})")))
                }
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

    /// `max_position_embeddings`: between 1 and [`MAX_POSITIONS`].
    pub fn max_positions(&self) -> Result<usize> {
        let key = "max_position_embeddings";
        let n = match self.get(key) {
            None => return Err(self.err(key, "missing (required)")),
            Some(v) => {
                v.as_u64().ok_or_else(|| self.err(key, format!("expected a non-negative integer, found {v}")))?
            }
        };
        if n == 0 || n > MAX_POSITIONS as u64 {
            return Err(self.err(key, format!("{n} must be between 1 and 2^24 = {MAX_POSITIONS} positions ({FIX})")));
        }
        Ok(n as usize)
    }

    /// `rms_norm_eps`, else `default`: a positive finite number (0 or less gives NaN logits).
    pub fn rms_norm_eps(&self, default: f64) -> Result<f32> {
        let eps = self.opt_f64("rms_norm_eps")?.unwrap_or(default);
        // Checked as the f32 the kernels use: 1e-50 is positive but becomes 0.
        positive(f64::from(eps as f32)).map_err(|_| {
            self.err("rms_norm_eps", format!("{eps} must be a positive finite number in f32 range ({FIX})"))
        })?;
        Ok(eps as f32)
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

    /// RoPE parameters in either spelling (docs/models.md §0): the rope dict (`rope_parameters`,
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
            Some(t) => {
                positive(t).map_err(|d| self.err(&format!("{dict_key}.rope_theta"), d))?;
                t
            }
            None => {
                let t = self.opt_f64("rope_theta")?.unwrap_or(default_theta);
                positive(t).map_err(|d| self.err("rope_theta", d))?;
                t
            }
        };
        let rope_type = dict
            .and_then(|m| m.get("rope_type").or_else(|| m.get("type")))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        // Every scaling number is a positive finite value: 0 or a negative one gives NaN angles.
        let pos = |key: &str| -> Result<Option<f64>> {
            let v = num(key)?;
            if let Some(v) = v {
                positive(v).map_err(|d| self.err(&format!("{dict_key}.{key}"), d))?;
            }
            Ok(v)
        };
        let nonneg = |key: &str| -> Result<Option<f64>> {
            match num(key)? {
                Some(v) if !(v >= 0.0 && v.is_finite()) => Err(self
                    .err(&format!("{dict_key}.{key}"), format!("{v} must be a finite number of at least 0 ({FIX})"))),
                v => Ok(v),
            }
        };
        let need = |key: &str| -> Result<f64> {
            pos(key)?
                .ok_or_else(|| self.err(&format!("{dict_key}.{key}"), format!("required for rope_type '{rope_type}'")))
        };
        let original =
            || -> Result<f64> { Ok(pos("original_max_position_embeddings")?.unwrap_or(max_positions as f64)) };
        let scaling = match rope_type {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: need("factor")? },
            "llama3" => {
                let (low_freq_factor, high_freq_factor) = (need("low_freq_factor")?, need("high_freq_factor")?);
                if high_freq_factor <= low_freq_factor {
                    return Err(self.err(
                        &format!("{dict_key}.high_freq_factor"),
                        format!("{high_freq_factor} must exceed low_freq_factor {low_freq_factor} ({FIX})"),
                    ));
                }
                RopeScaling::Llama3 {
                    factor: need("factor")?,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_positions: original()?,
                }
            }
            "yarn" => RopeScaling::Yarn {
                factor: need("factor")?,
                original_max_positions: original()?,
                beta_fast: pos("beta_fast")?.unwrap_or(32.0),
                beta_slow: pos("beta_slow")?.unwrap_or(1.0),
                truncate: dict.and_then(|m| m.get("truncate")).and_then(|v| v.as_bool()).unwrap_or(true),
                attention_factor: pos("attention_factor")?,
                // DeepSeek-style mscale may be 0 (no correction); only its sign and finiteness matter.
                mscale: nonneg("mscale")?,
                mscale_all_dim: nonneg("mscale_all_dim")?,
            },
            other => {
                return Err(ModelError::Unsupported {
                    path: self.path.clone(),
                    field: self.field(&format!("{dict_key}.rope_type")),
                    value: other.to_string(),
                    supported: "default, linear, llama3, yarn".into(),
                });
            }
        };
        Ok((theta, scaling))
    }
}

/// `Ok` for a positive finite number, else the detail of the error naming it.
fn positive(v: f64) -> std::result::Result<(), String> {
    if v > 0.0 && v.is_finite() { Ok(()) } else { Err(format!("{v} must be a positive finite number ({FIX})")) }
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

    /// Values that once gave all-NaN logits, or sized tables by a hostile context, are one-line
    /// errors naming the field.
    #[test]
    fn hostile_numbers_are_refused_naming_the_field() {
        let llama3 = |factor: &str| {
            format!(
                r#"{{"rope_scaling": {{"rope_type": "llama3", "factor": {factor}, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
            )
        };
        let cases: Vec<(String, &str)> = vec![
            (r#"{"rope_theta": 0}"#.into(), "rope_theta"),
            (r#"{"rope_theta": -1}"#.into(), "rope_theta"),
            (r#"{"rope_parameters": {"rope_theta": 0.0}}"#.into(), "rope_parameters.rope_theta"),
            (llama3("0"), "rope_scaling.factor"),
            (llama3("-2"), "rope_scaling.factor"),
            (
                r#"{"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4}}"#
                    .into(),
                "rope_scaling.high_freq_factor",
            ),
            (r#"{"rope_scaling": {"rope_type": "yarn", "factor": 0}}"#.into(), "rope_scaling.factor"),
            (
                r#"{"rope_scaling": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": -1}}"#.into(),
                "rope_scaling.original_max_position_embeddings",
            ),
        ];
        for (text, field) in cases {
            let msg = cfg(&text).rope(1e4, 4096).expect_err(&text).to_string();
            assert!(msg.contains(&format!("'{field}'")) && msg.contains("positive") || msg.contains("exceed"), "{msg}");
            assert!(msg.contains(&format!("'{field}'")) && !msg.contains('\n'), "{msg}");
        }
        for eps in ["-1", "0", "1e-50"] {
            let msg = cfg(&format!(r#"{{"rms_norm_eps": {eps}}}"#)).rms_norm_eps(1e-6).expect_err(eps).to_string();
            assert!(msg.contains("'rms_norm_eps'") && msg.contains("positive"), "{msg}");
        }
        assert_eq!(cfg("{}").rms_norm_eps(1e-5).expect("default"), 1e-5);
        for n in ["0", "1000000000", "4611686018427387904"] {
            let msg = cfg(&format!(r#"{{"max_position_embeddings": {n}}}"#)).max_positions().expect_err(n).to_string();
            assert!(msg.contains("'max_position_embeddings'") && msg.contains("2^24"), "{msg}");
        }
        assert_eq!(cfg(r#"{"max_position_embeddings": 131072}"#).max_positions().expect("sane"), 131072);
        // Sizes whose products overflowed the shape arithmetic.
        let msg =
            cfg(r#"{"num_attention_heads": 4611686018427387904}"#).usize("num_attention_heads").expect_err("huge");
        assert!(msg.to_string().contains("'num_attention_heads'") && msg.to_string().contains("2^20"), "{msg}");
    }

    #[test]
    fn eos_may_be_a_list_and_head_dim_falls_back() {
        let c = cfg(r#"{"eos_token_id": [128001, 128009], "head_dim": null}"#);
        assert_eq!(c.token_ids("eos_token_id").expect("ids"), vec![128001, 128009]);
        assert_eq!(c.head_dim(4096, 32).expect("head_dim"), 128);
        assert!(cfg(r#"{"hidden_size": "big"}"#).usize("hidden_size").is_err());
    }
}

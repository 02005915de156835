//! The keyword arguments of `generate`, `stream` and `chat`, read once into [`Options`] and
//! turned into the engine's [`GenerateParams`] over the model's defaults
//! (generation_config.json) as `ollm run` does. Speculation and structured output go through
//! the CLI's and the engine's own parsers, so a bad value says what the CLI would.

use std::str::FromStr;

use ollm_cli::speculation::{Method, SpecArgs, parse_method};
use ollm_engine::{DraftTokens, GenerateParams, Grammar, GrammarSpec, HarmonyMarkers, SamplingParams};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::errors::value_error;
use crate::llm::Shared;

/// The keywords every generating call takes besides `max_new_tokens` (in the order the stubs
/// list them), for the message about an unknown one.
const KEYWORDS: &str = "temperature, top_p, top_k, min_p, repetition_penalty, seed, stop, ignore_eos, speculate, \
                        draft_tokens, json_schema, grammar, response_format";

/// What the output must match, and the keyword that asked for it (for messages).
#[derive(Debug, Clone)]
pub struct Structure {
    pub spec: GrammarSpec,
    pub keyword: &'static str,
}

/// What a caller may set; None keeps the model's default. Built once per call from its
/// keyword arguments ([`Options::from_kwargs`]).
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub max_new_tokens: i64,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// `speculate=` and `draft_tokens=`, as `--speculate` and `--draft-tokens` parse them.
    pub spec: SpecArgs,
    /// `json_schema=`, `grammar=` or `response_format=` (at most one).
    pub structure: Option<Structure>,
}

/// `v` as a `T`, or a `TypeError` naming the keyword and what it takes.
fn extract<'py, T: FromPyObjectOwned<'py>>(v: &Bound<'py, PyAny>, name: &str, what: &str) -> PyResult<T> {
    v.extract::<T>().map_err(|_| PyTypeError::new_err(format!("{name}: expected {what}")))
}

/// `v` (None, or not None) as an optional `T`.
fn optional<'py, T: FromPyObjectOwned<'py>>(v: &Bound<'py, PyAny>, name: &str, what: &str) -> PyResult<Option<T>> {
    if v.is_none() { Ok(None) } else { extract(v, name, what).map(Some) }
}

/// `stop=`: a string or a list of strings.
fn stops(v: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if v.is_none() {
        Ok(Vec::new())
    } else if v.is_instance_of::<PyString>() {
        Ok(vec![v.extract()?])
    } else {
        extract(v, "stop", "a string or a list of strings")
    }
}

/// A JSON value given as a Python object (dict, list, bool...) or, with `text_ok`, as a JSON
/// string; read through Python's `json` module so any JSON-able object works.
fn json_value(v: &Bound<'_, PyAny>, name: &str, text_ok: bool) -> PyResult<serde_json::Value> {
    let text: String = if text_ok && v.is_instance_of::<PyString>() {
        v.extract()?
    } else {
        let json = v.py().import("json")?;
        json.call_method1("dumps", (v,))
            .and_then(|s| s.extract())
            .map_err(|e| PyTypeError::new_err(format!("{name}: not JSON-serialisable ({e}); give a dict")))?
    };
    serde_json::from_str(&text).map_err(|e| value_error(format!("{name}: not JSON ({e}); give a JSON schema")))
}

impl Options {
    /// Reads the keyword arguments of `call` (its name, for messages). An unknown keyword or a
    /// value of the wrong type is a `TypeError`; a value the CLI would refuse a `ValueError`
    /// with the CLI's message.
    pub fn from_kwargs(call: &str, max_new_tokens: i64, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut o = Options { max_new_tokens, ..Options::default() };
        let mut draft_tokens = None;
        let Some(kwargs) = kwargs else { return Ok(o) };
        for (key, v) in kwargs.iter() {
            let key: String = key.extract()?;
            let structure = |spec, keyword| Some(Structure { spec, keyword });
            match key.as_str() {
                "temperature" => o.temperature = optional(&v, "temperature", "a float")?,
                "top_p" => o.top_p = optional(&v, "top_p", "a float")?,
                "top_k" => o.top_k = optional(&v, "top_k", "an int")?,
                "min_p" => o.min_p = optional(&v, "min_p", "a float")?,
                "repetition_penalty" => o.repetition_penalty = optional(&v, "repetition_penalty", "a float")?,
                "seed" => o.seed = optional(&v, "seed", "an int of at least 0")?,
                "stop" => o.stop = stops(&v)?,
                "ignore_eos" => o.ignore_eos = extract(&v, "ignore_eos", "a bool")?,
                "speculate" => {
                    let s: Option<String> = optional(&v, "speculate", "\"ngram\" or \"draft:MODEL\"")?;
                    o.spec.speculate =
                        s.map(|s| parse_method(&s).map_err(|e| value_error(format!("speculate: {e}")))).transpose()?;
                }
                "draft_tokens" => draft_tokens = (!v.is_none()).then(|| v.clone()),
                "json_schema" if !v.is_none() => {
                    let schema = json_value(&v, "json_schema", true)?;
                    o.set_structure(structure(GrammarSpec::JsonSchema(schema), "json_schema"))?;
                }
                "grammar" if !v.is_none() => {
                    let lark: String = extract(&v, "grammar", "a string (a grammar in llguidance's Lark syntax)")?;
                    o.set_structure(structure(GrammarSpec::Lark(lark), "grammar"))?;
                }
                "response_format" if !v.is_none() => {
                    let format = json_value(&v, "response_format", false)?;
                    let spec = ollm_server::response_format_spec(&format).map_err(value_error)?;
                    o.set_structure(spec.and_then(|s| structure(s, "response_format")))?;
                }
                "json_schema" | "grammar" | "response_format" => {}
                _ => {
                    return Err(PyTypeError::new_err(format!(
                        "{call}() got an unexpected keyword argument '{key}' (it takes {KEYWORDS})"
                    )));
                }
            }
        }
        if let Some(v) = draft_tokens {
            if o.spec.speculate.is_none() {
                return Err(value_error("draft_tokens needs speculate=\"ngram\" or speculate=\"draft:MODEL\""));
            }
            // An int or "auto", read as `--draft-tokens` reads its value.
            let text = if v.is_instance_of::<PyString>() {
                v.extract::<String>()?
            } else {
                extract::<i64>(&v, "draft_tokens", "an int or \"auto\"")?.to_string()
            };
            let k = DraftTokens::from_str(&text).map_err(|e| value_error(format!("draft_tokens: {e}")))?;
            o.spec.draft_tokens = Some(k);
        }
        Ok(o)
    }

    fn set_structure(&mut self, s: Option<Structure>) -> PyResult<()> {
        if let (Some(old), Some(new)) = (&self.structure, &s) {
            return Err(value_error(format!(
                "{} and {} both constrain the output: give one of json_schema, grammar and response_format",
                old.keyword, new.keyword
            )));
        }
        if s.is_some() {
            self.structure = s;
        }
        Ok(())
    }

    /// The engine's parameters; `harmony` for a chat prompt of a harmony model. Numbers out of
    /// range are `ValueError`s naming the argument (the sampler checks the rest); a grammar or
    /// schema the library cannot compile is a `ValueError` naming the keyword; a draft model
    /// is loaded on first use and kept ([`Shared::speculation`]).
    pub fn params(&self, shared: &Shared, harmony: Option<HarmonyMarkers>) -> PyResult<GenerateParams> {
        let m = &shared.chat;
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
            speculate: shared.speculation(&self.spec)?,
            logprobs: None,
            grammar: self.grammar(shared)?,
        })
    }

    /// The compiled grammar of `json_schema=`, `grammar=` or `response_format=`.
    fn grammar(&self, shared: &Shared) -> PyResult<Option<Grammar>> {
        let Some(s) = &self.structure else { return Ok(None) };
        let compiled = shared.grammar_compiler()?.compile(&s.spec);
        compiled.map(Some).map_err(|e| value_error(format!("{}: {e}", s.keyword).replace('\n', " ")))
    }
}

/// Whether `spec` names a draft model (loaded beside the target).
pub fn draft_name(spec: &SpecArgs) -> Option<&str> {
    match &spec.speculate {
        Some(Method::Draft(m)) => Some(m),
        _ => None,
    }
}

/// A seed for sampling when none is given (as `ollm run` picks one).
fn random_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

//! Turning an OpenAI request body into an engine job: the model check, the prompt's token ids
//! (through the chat template for chat), and validated sampling and length parameters. Every
//! rejection names the field at fault.

use std::sync::Arc;

use ollm_engine::tools::{self, Tool, ToolChoice, ToolError};
use ollm_engine::{
    EngineError, GenerateParams, Grammar, GrammarCompiler, GrammarSpec, HarmonyMarkers, MAX_TOP_LOGPROBS,
    SamplingParams,
};
use ollm_tokenizer::{ChatMessage, ChatTemplate, Tokenizer, TokenizerError};
use serde_json::Value;

use crate::error::ApiError;
use crate::openai_types::{ChatMessageIn, ChatRequest, CompletionRequest, SamplingFields};

/// Most choices (`n`) one request may ask for.
const MAX_CHOICES: usize = 16;
/// Most stop strings a request may give (OpenAI's limit).
const MAX_STOPS: usize = 4;
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// OpenAI request fields ollm does not implement, each with the value that asks for nothing
/// (the API's default), which is accepted: a client may send a default explicitly. Any other
/// value, a wrong type included, is a 400 naming the field, so nothing a client asks for is
/// silently ignored. `null` is always accepted.
const UNSUPPORTED: [(&str, &str); 8] = [
    ("echo", "false"),
    ("suffix", "\"\""),
    ("best_of", "1"),
    ("presence_penalty", "0"),
    ("frequency_penalty", "0"),
    ("logit_bias", "{}"),
    ("functions", "[]"),
    ("function_call", "\"none\""),
];

/// Everything a request is checked against: the served model's id, tokenizer and template, and
/// the server's limits. Needs no engine, so requests can be validated (and fuzzed) without a
/// model.
#[derive(Debug)]
pub struct RequestRules {
    pub model_id: Arc<str>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub eos_token_ids: Vec<u32>,
    /// Some for a harmony model (GPT-OSS): chat answers carry the final channel as content and
    /// the others as `reasoning_content`.
    pub harmony: Option<HarmonyMarkers>,
    pub default_sampling: SamplingParams,
    /// The model's context, in tokens (prompt + completion).
    pub context_tokens: usize,
    /// Largest `max_tokens` a request may ask for (at most the context).
    pub max_tokens_cap: usize,
    /// Most prompt tokens a request may bring (at most the context).
    pub max_prompt_tokens: usize,
    /// The tokenizer's vocabulary made ready for constrained decoding, built by the first request
    /// with a `response_format` that needs it (an error says why it cannot be).
    pub grammars: std::sync::OnceLock<Result<GrammarCompiler, String>>,
    /// Speculative decoding for every request (`--speculate`), if any.
    pub speculate: Option<ollm_engine::SpeculateParams>,
}

impl RequestRules {
    fn built_compiler(&self) -> &Result<GrammarCompiler, String> {
        self.grammars.get_or_init(|| {
            GrammarCompiler::new(&self.tokenizer, &self.eos_token_ids, self.tokenizer.vocab_size())
                .map_err(|e| e.to_string())
        })
    }

    /// The grammar compiler (built on first use), when this tokenizer has one: it also knows
    /// each token's exact bytes.
    pub(crate) fn grammar_compiler_if_available(&self) -> Option<&GrammarCompiler> {
        self.built_compiler().as_ref().ok()
    }

    /// The grammar compiler, built on first use.
    fn grammar_compiler(&self) -> Result<&GrammarCompiler, ApiError> {
        self.grammar_compiler_for("response_format")
    }

    /// The grammar compiler; an error names `field`, the request field that needs it.
    fn grammar_compiler_for(&self, field: &str) -> Result<&GrammarCompiler, ApiError> {
        self.built_compiler()
            .as_ref()
            .map_err(|e| ApiError::invalid(format!("'{field}' cannot be used with this model: {e}"), Some(field)))
    }
}

/// The tools a request's answer may call.
#[derive(Debug, Clone)]
pub struct ToolsAsked {
    pub tools: Arc<Vec<Tool>>,
    /// `required` or a named function: the answer is a call (otherwise it may be text).
    pub forced: bool,
}

/// A request ready for the queue.
#[derive(Debug)]
pub struct Prepared {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// Choices to generate (`n`), each its own sequence with its own seed.
    pub n: usize,
    /// Tools the answer may call (chat, `tool_choice` not `none`).
    pub tools: Option<ToolsAsked>,
    pub stream: bool,
    pub include_usage: bool,
}

/// A POST /v1/chat/completions body, checked and tokenized: the model it names and the job.
pub fn chat_request(rules: &RequestRules, bytes: &[u8]) -> Result<(String, Prepared), ApiError> {
    let (req, sampling): (ChatRequest, _) = parse_body(bytes)?;
    check_model(rules, &req.model)?;
    let tool_err = |e: ToolError| ApiError::invalid(format!("{e}"), Some(&e.field));
    let tools = match req.tools.as_ref().filter(|v| !v.is_null()) {
        None => Vec::new(),
        Some(v) => tools::parse_tools(v).map_err(tool_err)?,
    };
    let choice = tools::parse_tool_choice(req.tool_choice.as_ref(), &tools).map_err(tool_err)?;
    let asked = (!tools.is_empty()).then_some((tools, choice));
    let prompt = chat_prompt(rules, &req.messages, asked.as_ref().map(|(t, c)| (&req.tools, &t[..], c)))?;
    let top = top_count(req.top_logprobs, "top_logprobs")?;
    let logprobs = match (req.logprobs, top) {
        (Some(true), top) => Some(top.unwrap_or(0)),
        (_, None | Some(0)) => None,
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "'top_logprobs' needs 'logprobs': true; send both or neither",
                Some("top_logprobs"),
            ));
        }
    };
    let tool_grammar = asked.as_ref().and_then(|(t, c)| tools::call_grammar(t, c));
    let mut prepared = prepare(rules, prompt, sampling, true, logprobs, tool_grammar)?;
    prepared.tools = asked.filter(|(_, c)| *c != ToolChoice::None).map(|(tools, choice)| ToolsAsked {
        tools: Arc::new(tools),
        forced: matches!(choice, ToolChoice::Required | ToolChoice::Named(_)),
    });
    Ok((req.model, prepared))
}

/// A POST /v1/completions body, checked and tokenized: the model it names and the job.
pub fn completion_request(rules: &RequestRules, bytes: &[u8]) -> Result<(String, Prepared), ApiError> {
    let (req, sampling): (CompletionRequest, _) = parse_body(bytes)?;
    check_model(rules, &req.model)?;
    for field in ["tools", "tool_choice"] {
        if req.rest.get(field).is_some_and(|v| !v.is_null()) {
            return Err(ApiError::invalid(
                format!("'{field}' is not supported by /v1/completions; use /v1/chat/completions"),
                Some(field),
            ));
        }
    }
    let prompt = completion_prompt(rules, &req.prompt)?;
    let logprobs = top_count(req.logprobs.and_then(|l| l.count()), "logprobs")?;
    Ok((req.model, prepare(rules, prompt, sampling, false, logprobs, None)?))
}

/// A count of alternatives per token (`top_logprobs` of chat, `logprobs` of completions):
/// at most [`MAX_TOP_LOGPROBS`].
fn top_count(asked: Option<u64>, field: &str) -> Result<Option<usize>, ApiError> {
    match asked {
        Some(k) if k > MAX_TOP_LOGPROBS as u64 => Err(ApiError::invalid(
            format!("'{field}' = {k} is too large; give at most {MAX_TOP_LOGPROBS}"),
            Some(field),
        )),
        k => Ok(k.map(|k| k as usize)),
    }
}

/// Parses a JSON body into the endpoint's fields and the shared sampling fields; a 400 names
/// the field at fault.
fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<(T, SamplingFields), ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid(
            format!("The request body is not valid JSON: {e}; send a JSON object as in OpenAI's API reference"),
            None,
        )
    })?;
    let Some(fields) = value.as_object() else {
        return Err(ApiError::invalid("The request body must be a JSON object", None));
    };
    for (name, default) in UNSUPPORTED {
        if let Some(v) = fields.get(name)
            && !v.is_null()
            && !same_value(&serde_json::from_str(default).unwrap_or(Value::Null), v)
        {
            return Err(ApiError::invalid(
                format!("'{name}' is not supported by this server; leave it out (or send its default, {default})"),
                Some(name),
            ));
        }
    }
    Ok((typed(&value)?, typed(&value)?))
}

/// JSON equality where numbers compare by value (`0` and `0.0` are the same penalty).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn typed<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::invalid(format!("The request body does not match the API: {inner}"), None)
        } else {
            ApiError::invalid(format!("'{path}': {inner}"), Some(&path))
        }
    })
}

fn check_model(rules: &RequestRules, model: &str) -> Result<(), ApiError> {
    if model == &*rules.model_id { Ok(()) } else { Err(ApiError::model_not_found(model, &rules.model_id)) }
}

/// The chat prompt: messages rendered by the model's chat template, opening the assistant turn.
/// `tools`: the request's `tools` as sent, read, and its `tool_choice`: given to a template that
/// renders tools, otherwise described in the system message ([`tools::with_fallback_prompt`]).
fn chat_prompt(
    rules: &RequestRules,
    messages: &[ChatMessageIn],
    tools: Option<(&Option<Value>, &[Tool], &ToolChoice)>,
) -> Result<Vec<u32>, ApiError> {
    let Some(template) = &rules.template else {
        return Err(ApiError::invalid(
            "This model has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); use /v1/completions",
            Some("messages"),
        ));
    };
    if messages.is_empty() {
        return Err(ApiError::invalid("'messages' is empty; give at least one message", Some("messages")));
    }
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid(
                format!("messages[{i}].role is '{}'; use one of {}", m.role.escape_debug(), ROLES.join(", ")),
                Some(&format!("messages[{i}].role")),
            ));
        }
        let mut turn = ChatMessage::new(&m.role, &message_text(&m.content, i)?);
        if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_null()) {
            if m.role != "assistant" || !calls.is_array() {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_calls belongs to an assistant message and is a list of calls"),
                    Some(&format!("messages[{i}].tool_calls")),
                ));
            }
            turn.tool_calls = Some(calls.clone());
        }
        turn.tool_call_id.clone_from(&m.tool_call_id);
        turns.push(turn);
    }
    let (native, at) = match tools {
        Some((sent, _, _)) if template.supports_tools() => (sent.as_ref(), "tools"),
        Some((_, list, choice)) => {
            turns = tools::with_fallback_prompt(&turns, list, choice);
            (None, "messages")
        }
        None => (None, "messages"),
    };
    let ids = rules.tokenizer.encode_chat_with_tools(template, &turns, native).map_err(|e| match e {
        TokenizerError::Template { .. } => {
            ApiError::invalid(format!("The chat template rejected the {at}: {e}"), Some(at))
        }
        other => ApiError::invalid(format!("cannot tokenize the messages: {other}"), Some("messages")),
    })?;
    check_length(rules, ids, "messages")
}

/// A message's content: a string, a list of text parts, or null.
fn message_text(content: &Value, i: usize) -> Result<String, ApiError> {
    let bad = || {
        ApiError::invalid(
            format!("messages[{i}].content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts"),
            Some(&format!("messages[{i}].content")),
        )
    };
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(t)) => Ok(t),
                _ => Err(bad()),
            })
            .collect(),
        _ => Err(bad()),
    }
}

/// The completions prompt: a string or a list of exactly one string; BOS is added as the
/// tokenizer's post-processor says. This is raw text for the model, so special tokens spelled
/// in it are read as special tokens (as llama.cpp reads a raw prompt); chat messages are not.
fn completion_prompt(rules: &RequestRules, prompt: &Value) -> Result<Vec<u32>, ApiError> {
    let text = match prompt {
        Value::String(s) => s.as_str(),
        Value::Array(list) if list.len() == 1 && list[0].is_string() => list[0].as_str().unwrap_or_default(),
        Value::Array(list) if list.len() > 1 => {
            return Err(ApiError::invalid(
                "'prompt' lists several prompts; send one prompt per request",
                Some("prompt"),
            ));
        }
        _ => return Err(ApiError::invalid("'prompt' must be a string", Some("prompt"))),
    };
    let ids = rules
        .tokenizer
        .encode_prompt(text)
        .map_err(|e| ApiError::invalid(format!("cannot tokenize the prompt: {e}"), Some("prompt")))?;
    check_length(rules, ids, "prompt")
}

/// Rejects an empty prompt, one that leaves no room in the context and one longer than
/// --max-prompt-tokens.
fn check_length(rules: &RequestRules, ids: Vec<u32>, param: &str) -> Result<Vec<u32>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid(format!("the {param} is empty; give some text"), Some(param)));
    }
    if ids.len() >= rules.context_tokens {
        return Err(ApiError::invalid(
            format!(
                "This model's maximum context length is {} tokens, but the {param} has {} tokens; shorten the {param}",
                rules.context_tokens,
                ids.len()
            ),
            Some(param),
        )
        .with_code("context_length_exceeded"));
    }
    if ids.len() > rules.max_prompt_tokens {
        return Err(ApiError::invalid(
            format!(
                "This server accepts at most {} prompt tokens (--max-prompt-tokens), but the {param} has {} tokens; shorten the {param}",
                rules.max_prompt_tokens,
                ids.len()
            ),
            Some(param),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(ids)
}

/// Validates the sampling fields against the server's limits and the room left in the context.
/// The generation a request asks for; `chat`: its prompt came through the chat template (a
/// harmony model's answer is then split into content and reasoning).
/// `logprobs`: Some(k) = each token's log-probability with k alternatives.
fn prepare(
    rules: &RequestRules,
    prompt: Vec<u32>,
    f: SamplingFields,
    chat: bool,
    logprobs: Option<usize>,
    tool_grammar: Option<GrammarSpec>,
) -> Result<Prepared, ApiError> {
    let n = match f.n {
        None => 1,
        Some(n) if (1..=MAX_CHOICES as u64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(format!("n = {n} is invalid: give 1 to {MAX_CHOICES} choices"), Some("n")));
        }
    };
    let (max_name, asked) = match (f.max_tokens, f.max_completion_tokens) {
        (Some(m), _) => ("max_tokens", Some(m)),
        (None, Some(m)) => ("max_completion_tokens", Some(m)),
        (None, None) => ("max_tokens", None),
    };
    let cap = rules.max_tokens_cap;
    let max_new_tokens = match asked {
        Some(0) => return Err(ApiError::invalid(format!("{max_name} must be at least 1"), Some(max_name))),
        Some(m) if m > cap as u64 => {
            return Err(ApiError::invalid(
                format!(
                    "{max_name} = {m} is above this server's limit of {cap} (--max-tokens-cap; the context is {} tokens)",
                    rules.context_tokens
                ),
                Some(max_name),
            ));
        }
        Some(m) => m as usize,
        None => cap,
    };
    let max_new_tokens = max_new_tokens.min(rules.context_tokens.saturating_sub(prompt.len()));

    let mut sampling = rules.default_sampling.clone();
    if let Some(t) = f.temperature {
        sampling.temperature = t;
    }
    if let Some(p) = f.top_p {
        sampling.top_p = p;
    }
    sampling.seed = f.seed.unwrap_or_else(random_seed);
    sampling.validate().map_err(|e| match e {
        EngineError::Sampling { name, value, expected } => {
            ApiError::invalid(format!("{name} = {value} is invalid: use {expected}"), Some(name))
        }
        other => ApiError::invalid(other.to_string(), None),
    })?;

    let stop = f.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            format!("'stop' has {} strings; give at most {MAX_STOPS}", stop.len()),
            Some("stop"),
        ));
    }
    let include_usage = f.stream_options.is_some_and(|o| o.include_usage);
    let grammar = match tool_grammar {
        None => response_grammar(rules, f.response_format.as_ref())?,
        Some(spec) => {
            if response_grammar(rules, f.response_format.as_ref())?.is_some() {
                return Err(ApiError::invalid(
                    "'response_format' cannot be combined with tools that may be called; leave one out (or send tool_choice \"none\")",
                    Some("response_format"),
                ));
            }
            let compiled = rules.grammar_compiler_for("tools")?.compile(&spec);
            Some(compiled.map_err(|e| {
                ApiError::invalid(
                    format!("'tools': a tool's parameters cannot be compiled: {e}; simplify or fix the schema")
                        .replace('\n', " "),
                    Some("tools"),
                )
            })?)
        }
    };
    Ok(Prepared {
        prompt,
        params: GenerateParams {
            max_new_tokens,
            sampling,
            eos_token_ids: rules.eos_token_ids.clone(),
            stop,
            harmony: rules.harmony.filter(|_| chat),
            // The worker asks the job's channel.
            cancel: None,
            grammar,
            speculate: rules.speculate.clone(),
            logprobs,
        },
        n,
        tools: None,
        stream: f.stream,
        include_usage,
    })
}

/// The grammar `response_format` asks for: none for `text`, any JSON object for
/// `json_object`, the schema of `json_schema` (compiled now, so a schema the library cannot
/// compile is a 400 naming it).
fn response_grammar(rules: &RequestRules, format: Option<&Value>) -> Result<Option<Grammar>, ApiError> {
    let Some(spec) = response_spec(format)? else { return Ok(None) };
    let compiler = rules.grammar_compiler()?;
    compiler.compile(&spec).map(Some).map_err(|e| {
        let at = if matches!(spec, GrammarSpec::JsonSchema(_)) { "response_format.json_schema.schema" } else { FIELD };
        ApiError::invalid(format!("'{at}': {e}; simplify the schema or fix it").replace('\n', " "), Some(FIELD))
    })
}

/// The field [`response_spec`] reads.
const FIELD: &str = "response_format";

/// What `response_format` asks for, before compiling: none for `text` (or null), any JSON
/// object for `json_object`, the schema of `json_schema`; a wrong form is a 400 naming it.
fn response_spec(format: Option<&Value>) -> Result<Option<GrammarSpec>, ApiError> {
    let bad = |msg: String| ApiError::invalid(msg, Some(FIELD));
    let Some(format) = format.filter(|v| !v.is_null()) else { return Ok(None) };
    let spec = match format.get("type").and_then(Value::as_str) {
        Some("text") => return Ok(None),
        Some("json_object") => GrammarSpec::JsonObject,
        Some("json_schema") => {
            let Some(schema) = format.get("json_schema").and_then(|j| j.get("schema")) else {
                return Err(bad(
                    "'response_format.json_schema.schema' is missing; give {\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}".into(),
                ));
            };
            if !schema.is_object() && !schema.is_boolean() {
                return Err(bad("'response_format.json_schema.schema' must be a JSON schema (an object)".into()));
            }
            GrammarSpec::JsonSchema(schema.clone())
        }
        _ => {
            return Err(bad(format!(
                "'response_format.type' is {}; use \"text\", \"json_object\" or \"json_schema\"",
                format.get("type").map_or("missing".to_string(), Value::to_string)
            )));
        }
    };
    Ok(Some(spec))
}

/// The grammar an OpenAI-style `response_format` value asks for (None for `text`), as the
/// server reads it; for other front ends (the Python package). Err: the server's one-line
/// message saying what is wrong and the form to give.
pub fn response_format_spec(format: &Value) -> Result<Option<GrammarSpec>, String> {
    response_spec(Some(format)).map_err(|e| e.message)
}

fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

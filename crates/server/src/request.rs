//! Turning an OpenAI request body into an engine job: the model check, the prompt's token ids
//! (through the chat template for chat), and validated sampling and length parameters. Every
//! rejection names the field at fault.

use ollm_engine::{EngineError, GenerateParams};
use ollm_tokenizer::{ChatMessage, TokenizerError};
use serde_json::Value;

use crate::error::ApiError;
use crate::openai_types::{ChatMessageIn, SamplingFields};
use crate::state::AppState;

/// Most stop strings a request may give (OpenAI's limit).
const MAX_STOPS: usize = 4;
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// A request ready for the queue.
#[derive(Debug)]
pub struct Prepared {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    pub stream: bool,
    pub include_usage: bool,
}

/// Parses a JSON body into the endpoint's fields and the shared sampling fields; a 400 names
/// the field at fault.
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<(T, SamplingFields), ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid(
            format!("The request body is not valid JSON: {e}; send a JSON object as in OpenAI's API reference"),
            None,
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid("The request body must be a JSON object", None));
    }
    Ok((typed(&value)?, typed(&value)?))
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

pub fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model == &*state.model_id { Ok(()) } else { Err(ApiError::model_not_found(model, &state.model_id)) }
}

/// The chat prompt: messages rendered by the model's chat template, opening the assistant turn.
pub fn chat_prompt(state: &AppState, messages: &[ChatMessageIn]) -> Result<Vec<u32>, ApiError> {
    let Some(template) = &state.template else {
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
                format!("messages[{i}].role is '{}'; use one of {}", m.role, ROLES.join(", ")),
                Some(&format!("messages[{i}].role")),
            ));
        }
        turns.push(ChatMessage::new(&m.role, &message_text(&m.content, i)?));
    }
    let ids = state.tokenizer.encode_chat(template, &turns).map_err(|e| match e {
        TokenizerError::Template { .. } => {
            ApiError::invalid(format!("The chat template rejected the messages: {e}"), Some("messages"))
        }
        other => ApiError::invalid(format!("cannot tokenize the messages: {other}"), Some("messages")),
    })?;
    check_length(state, ids, "messages")
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
/// tokenizer's post-processor says.
pub fn completion_prompt(state: &AppState, prompt: &Value) -> Result<Vec<u32>, ApiError> {
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
    let ids = state
        .tokenizer
        .encode_prompt(text)
        .map_err(|e| ApiError::invalid(format!("cannot tokenize the prompt: {e}"), Some("prompt")))?;
    check_length(state, ids, "prompt")
}

/// Rejects an empty prompt and one that leaves no room in the context.
fn check_length(state: &AppState, ids: Vec<u32>, param: &str) -> Result<Vec<u32>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid(format!("the {param} is empty; give some text"), Some(param)));
    }
    if ids.len() >= state.context_tokens {
        return Err(ApiError::invalid(
            format!(
                "This model's maximum context length is {} tokens, but the {param} has {} tokens; shorten the {param}",
                state.context_tokens,
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
pub fn prepare(state: &AppState, prompt: Vec<u32>, f: SamplingFields, chat: bool) -> Result<Prepared, ApiError> {
    if let Some(n) = f.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid(format!("n = {n}: only n = 1 is supported; send several requests"), Some("n")));
    }
    let (max_name, asked) = match (f.max_tokens, f.max_completion_tokens) {
        (Some(m), _) => ("max_tokens", Some(m)),
        (None, Some(m)) => ("max_completion_tokens", Some(m)),
        (None, None) => ("max_tokens", None),
    };
    let cap = state.max_tokens_cap;
    let max_new_tokens = match asked {
        Some(0) => return Err(ApiError::invalid(format!("{max_name} must be at least 1"), Some(max_name))),
        Some(m) if m > cap as u64 => {
            return Err(ApiError::invalid(
                format!(
                    "{max_name} = {m} is above this server's limit of {cap} (--max-tokens-cap; the context is {} tokens)",
                    state.context_tokens
                ),
                Some(max_name),
            ));
        }
        Some(m) => m as usize,
        None => cap,
    };
    let max_new_tokens = max_new_tokens.min(state.context_tokens.saturating_sub(prompt.len()));

    let mut sampling = state.default_sampling.clone();
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
    Ok(Prepared {
        prompt,
        params: GenerateParams {
            max_new_tokens,
            sampling,
            eos_token_ids: state.eos_token_ids.to_vec(),
            stop,
            harmony: state.harmony.filter(|_| chat),
        },
        stream: f.stream,
        include_usage,
    })
}

fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

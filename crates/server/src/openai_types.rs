//! The request and response bodies of OpenAI's completions and chat-completions APIs (the
//! subset ollm implements). Unknown request fields are ignored, as OpenAI's clients send many.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and length fields shared by both endpoints (read from the same body as the
/// endpoint's own fields).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub max_tokens: Option<u64>,
    /// The chat API's newer name for `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`; read by
    /// [`crate::request`] (kept as JSON so that each wrong part is named).
    pub response_format: Option<Value>,
}

/// POST /v1/completions.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    /// A string, or a list holding exactly one string.
    pub prompt: Value,
    /// Each token's log-probability with this many alternatives (0 = the token's alone);
    /// `false` (what some clients send for "none") is accepted too.
    pub logprobs: Option<CountOrFlag>,
    /// The other fields (to refuse the chat-only ones by name).
    #[serde(flatten)]
    pub rest: serde_json::Map<String, Value>,
}

/// A number, or a boolean where clients send one (`true` = 0 alternatives, `false` = off).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum CountOrFlag {
    Count(u64),
    Flag(bool),
}

impl CountOrFlag {
    pub fn count(self) -> Option<u64> {
        match self {
            CountOrFlag::Count(k) => Some(k),
            CountOrFlag::Flag(true) => Some(0),
            CountOrFlag::Flag(false) => None,
        }
    }
}

/// One message of POST /v1/chat/completions.
#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    /// A string, a list of `{"type": "text", "text": ...}` parts, or null.
    #[serde(default)]
    pub content: Value,
    /// An assistant turn's calls: `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    pub tool_calls: Option<Value>,
    /// A `tool` turn: the call it answers.
    pub tool_call_id: Option<String>,
}

/// POST /v1/chat/completions.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    /// true: each token's log-probability in `choices[].logprobs.content`.
    pub logprobs: Option<bool>,
    /// Alternatives listed per token (needs `logprobs`).
    pub top_logprobs: Option<u64>,
    /// `[{"type": "function", "function": {"name", "description", "parameters"}}]`; read by
    /// [`crate::request`] (kept as JSON so that each wrong part is named).
    pub tools: Option<Value>,
    /// `"auto" | "none" | "required" | {"type": "function", "function": {"name"}}`.
    pub tool_choice: Option<Value>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

#[derive(Debug, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    /// null when the answer is a tool call.
    pub content: Option<String>,
    /// `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// A harmony model's analysis (the name vLLM and llama.cpp use).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessageOut,
    pub finish_reason: &'static str,
    pub logprobs: Option<Value>,
}

/// `chat.completion`.
#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Pieces of a tool call: `[{"index", "id", "type", "function": {"name", "arguments"}}]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<Value>,
}

/// `chat.completion.chunk`.
#[derive(Debug, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize)]
pub struct TextChoice {
    pub index: u32,
    pub text: String,
    pub finish_reason: Option<&'static str>,
    pub logprobs: Option<Value>,
}

/// `text_completion` (also each streamed chunk of the completions API).
#[derive(Debug, Serialize)]
pub struct TextCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<TextChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Serialize)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

/// GET /v1/models.
#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

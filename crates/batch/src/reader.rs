//! Reading the input JSONL: one request per line, validated field by field. A bad line becomes a
//! [`LineError`] with its 1-based line number; blank lines are ignored.

use std::path::Path;

use ollm_tokenizer::ChatMessage;
use serde::Deserialize;
use serde_json::Value;

use crate::BatchError;

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Raw text (BOS added as the tokenizer says).
    Prompt(String),
    /// A conversation, rendered through the model's chat template.
    Messages(Vec<ChatMessage>),
}

/// One valid input line.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRequest {
    /// 1-based line number in the input file.
    pub line: usize,
    /// The id as given (a string or an integer), echoed in the result.
    pub id: Value,
    pub input: Input,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// `response_format` (as the OpenAI API spells it): the output is constrained to JSON.
    pub response_format: Option<ollm_engine::GrammarSpec>,
    /// Some(k): each token's log-probability with k alternatives (`"logprobs": true` with
    /// `"top_logprobs": k`, or `"logprobs": k`).
    pub logprobs: Option<usize>,
    /// `tools` and `tool_choice` (as the OpenAI API spells them; with `messages` only).
    pub tools: Option<(Vec<ollm_engine::Tool>, ollm_engine::ToolChoice)>,
}

/// A line that could not be used, or a request that failed.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub id: Option<Value>,
    pub message: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Logprobs {
    On(bool),
    Top(usize),
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    id: Value,
    prompt: Option<String>,
    messages: Option<Vec<RawMessage>>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    seed: Option<u64>,
    stop: Option<Stop>,
    response_format: Option<Value>,
    logprobs: Option<Logprobs>,
    top_logprobs: Option<usize>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
}

/// The key an id is known by: the string itself, or an integer's digits.
pub fn id_key(id: &Value) -> Option<String> {
    match id {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

/// Parses one line; `Ok(None)` for a blank line.
pub fn parse_line(line: usize, text: &str) -> Result<Option<BatchRequest>, LineError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let err = |id: Option<Value>, message: String| LineError { line, id, message };
    let value: Value = serde_json::from_str(text)
        .map_err(|e| err(None, format!("line {line}: not valid JSON ({e}); each line must be one JSON object")))?;
    let id = value.get("id").cloned();
    let raw: RawRequest = serde_json::from_value(value).map_err(|e| {
        err(id, format!("line {line}: {e} (expected {{\"id\": ..., \"prompt\": \"...\"}} or {{\"id\": ..., \"messages\": [...]}})"))
    })?;
    if id_key(&raw.id).is_none() {
        return Err(err(Some(raw.id), format!("line {line}: 'id' must be a non-empty string or an integer")));
    }
    let input = match (raw.prompt, raw.messages) {
        (Some(p), None) => Input::Prompt(p),
        (None, Some(m)) if !m.is_empty() => {
            Input::Messages(m.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect())
        }
        (None, Some(_)) => {
            return Err(err(Some(raw.id), format!("line {line}: 'messages' is empty; give at least one message")));
        }
        (Some(_), Some(_)) => {
            return Err(err(Some(raw.id), format!("line {line}: give either 'prompt' or 'messages', not both")));
        }
        (None, None) => return Err(err(Some(raw.id), format!("line {line}: missing 'prompt' or 'messages'"))),
    };
    if raw.max_tokens == Some(0) {
        return Err(err(Some(raw.id), format!("line {line}: 'max_tokens' must be at least 1")));
    }
    let stop = match raw.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let response_format = match raw.response_format.as_ref().filter(|v| !v.is_null()) {
        None => None,
        Some(f) => response_format(f).map_err(|m| err(Some(raw.id.clone()), format!("line {line}: {m}")))?,
    };
    let logprobs = match (raw.logprobs, raw.top_logprobs) {
        (Some(Logprobs::On(true)), top) => Some(top.unwrap_or(0)),
        (Some(Logprobs::Top(k)), None) => Some(k),
        (None | Some(Logprobs::On(false)), None | Some(0)) => None,
        (_, Some(_)) => {
            return Err(err(
                Some(raw.id),
                format!("line {line}: 'top_logprobs' needs 'logprobs': true (or give 'logprobs': k alone)"),
            ));
        }
    };
    if let Some(k) = logprobs.filter(|&k| k > ollm_engine::MAX_TOP_LOGPROBS) {
        return Err(err(
            Some(raw.id),
            format!("line {line}: {k} alternatives per token asked; give at most {}", ollm_engine::MAX_TOP_LOGPROBS),
        ));
    }
    let tools = match raw.tools.as_ref().filter(|v| !v.is_null()) {
        None => None,
        Some(_) if matches!(input, Input::Prompt(_)) => {
            return Err(err(Some(raw.id), format!("line {line}: 'tools' needs 'messages' (a chat), not 'prompt'")));
        }
        Some(v) => {
            let read = ollm_engine::tools::parse_tools(v).and_then(|t| {
                let c = ollm_engine::tools::parse_tool_choice(raw.tool_choice.as_ref(), &t)?;
                Ok((t, c))
            });
            Some(read.map_err(|e| err(Some(raw.id.clone()), format!("line {line}: {e}")))?)
        }
    };
    if tools.as_ref().is_some_and(|(_, c)| *c != ollm_engine::ToolChoice::None) && response_format.is_some() {
        return Err(err(
            Some(raw.id),
            format!("line {line}: 'response_format' cannot be combined with tools that may be called; leave one out"),
        ));
    }
    Ok(Some(BatchRequest {
        line,
        id: raw.id,
        input,
        max_tokens: raw.max_tokens,
        temperature: raw.temperature,
        top_p: raw.top_p,
        top_k: raw.top_k,
        seed: raw.seed,
        stop,
        response_format,
        logprobs,
        tools,
    }))
}

/// The grammar an OpenAI `response_format` asks for: none for `text`, any JSON object for
/// `json_object`, the schema of `json_schema`.
fn response_format(f: &Value) -> Result<Option<ollm_engine::GrammarSpec>, String> {
    use ollm_engine::GrammarSpec;
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(GrammarSpec::JsonObject)),
        Some("json_schema") => match f.get("json_schema").and_then(|j| j.get("schema")) {
            Some(s) if s.is_object() || s.is_boolean() => Ok(Some(GrammarSpec::JsonSchema(s.clone()))),
            _ => Err("'response_format.json_schema.schema' is missing or not a JSON schema object; give {\"type\": \"json_schema\", \"json_schema\": {\"schema\": {...}}}".into()),
        },
        _ => Err("'response_format.type' must be \"text\", \"json_object\" or \"json_schema\"".into()),
    }
}

/// Reads every line of `path`: the valid requests in order, and the bad lines.
pub fn read_requests(path: &Path) -> Result<(Vec<BatchRequest>, Vec<LineError>), BatchError> {
    let text = std::fs::read_to_string(path).map_err(|e| BatchError::io(path, "read the input file", &e))?;
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        match parse_line(i + 1, line) {
            Ok(Some(r)) => ok.push(r),
            Ok(None) => {}
            Err(e) => bad.push(e),
        }
    }
    Ok((ok, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_lines_parse_and_bad_ones_name_the_line_and_field() {
        let r = parse_line(3, r#"{"id": 7, "prompt": "hi", "max_tokens": 5, "stop": "x"}"#).expect("ok").expect("some");
        assert_eq!(r.line, 3);
        assert_eq!(id_key(&r.id).as_deref(), Some("7"));
        assert_eq!(r.stop, vec!["x".to_string()]);
        let m = parse_line(1, r#"{"id": "a", "messages": [{"role": "user", "content": "hi"}]}"#)
            .expect("ok")
            .expect("some");
        assert!(matches!(m.input, Input::Messages(ref v) if v.len() == 1));
        assert_eq!(parse_line(2, "   ").expect("blank"), None);

        let e = parse_line(4, "{not json").expect_err("bad");
        assert!(e.message.starts_with("line 4: not valid JSON"), "{}", e.message);
        let e = parse_line(5, r#"{"id": "b", "prompt": "x", "max_token": 3}"#).expect_err("typo");
        assert!(e.message.contains("max_token"), "{}", e.message);
        assert_eq!(e.id, Some(Value::from("b")));
        let e = parse_line(6, r#"{"id": "c"}"#).expect_err("no input");
        assert!(e.message.contains("prompt"), "{}", e.message);
        let e = parse_line(7, r#"{"id": 1.5, "prompt": "x"}"#).expect_err("bad id");
        assert!(e.message.contains("'id'"), "{}", e.message);
    }

    #[test]
    fn response_format_is_read_per_line_and_a_wrong_form_names_it() {
        let r = parse_line(1, r#"{"id": 1, "prompt": "x", "response_format": {"type": "json_object"}}"#)
            .expect("valid")
            .expect("a request");
        assert_eq!(r.response_format, Some(ollm_engine::GrammarSpec::JsonObject));
        let schema = serde_json::json!({"type": "integer"});
        let line = serde_json::json!({"id": 2, "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}});
        let r = parse_line(2, &line.to_string()).expect("valid").expect("a request");
        assert_eq!(r.response_format, Some(ollm_engine::GrammarSpec::JsonSchema(schema)));
        let r = parse_line(3, r#"{"id": 3, "prompt": "x", "response_format": {"type": "text"}}"#).expect("valid");
        assert_eq!(r.expect("a request").response_format, None);
        for (bad, names) in [
            (r#"{"id": 4, "prompt": "x", "response_format": {"type": "yaml"}}"#, "response_format.type"),
            (
                r#"{"id": 4, "prompt": "x", "response_format": {"type": "json_schema"}}"#,
                "response_format.json_schema.schema",
            ),
        ] {
            let e = parse_line(4, bad).expect_err(bad);
            assert!(e.message.starts_with("line 4: ") && e.message.contains(names), "{}", e.message);
        }
    }
}

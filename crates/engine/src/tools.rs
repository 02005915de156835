//! Tool calls (OpenAI's `tools` / `tool_choice`): the tool definitions, the grammar that makes a
//! call's arguments valid against the tool's `parameters` schema, and reading a call back out of
//! the generated text.
//!
//! Whatever the model, a call is written as one compact JSON object with the name first:
//! `{"name":"get_weather","arguments":{"city":"Paris"}}` (the shape of Hermes/Qwen tool calls,
//! without their tags). With `tool_choice` `required` or a named function the output is
//! constrained to exactly that (a JSON schema whose `arguments` is the tool's `parameters`); with
//! `auto` to a Lark grammar admitting either such a call or text that does not open with `{`;
//! with `none` the tools are described but nothing is constrained. One call per answer
//! (parallel calls are not generated).
//!
//! A model whose chat template renders tools gets them through the template (`tools`, and
//! messages with `tool_calls` / `tool_call_id`); for one whose template has no tools (SmolLM2)
//! [`fallback_system_prompt`] describes them and the JSON to answer with.

use ollm_tokenizer::ChatMessage;
use serde_json::{Value, json};

use crate::grammar::GrammarSpec;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema for the arguments (an object schema; `{"type": "object"}` when not given).
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides: text or a call.
    Auto,
    /// No call: text only (the tools are still described).
    None,
    /// A call to any of the tools.
    Required,
    /// A call to this tool.
    Named(String),
}

/// A call read from the output: `arguments` is a JSON string, as OpenAI's API carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// A wrong `tools` or `tool_choice`: the field at fault (`tools[1].function.name`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{field}' {message}")]
pub struct ToolError {
    pub field: String,
    pub message: String,
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> ToolError {
    ToolError { field: field.into(), message: message.into() }
}

/// Reads OpenAI's `tools`: `[{"type": "function", "function": {"name", "description",
/// "parameters"}}]`. Names are `[A-Za-z0-9_-]{1,64}` and unique.
pub fn parse_tools(v: &Value) -> Result<Vec<Tool>, ToolError> {
    let Some(list) = v.as_array() else {
        return Err(bad("tools", "must be a list of {\"type\": \"function\", \"function\": {...}}"));
    };
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad(format!("tools[{i}].type"), "must be \"function\" (the only kind of tool)"));
        }
        let Some(f) = t.get("function").filter(|f| f.is_object()) else {
            return Err(bad(format!("tools[{i}].function"), "is missing; give {\"name\": ..., \"parameters\": {...}}"));
        };
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if name.is_empty() || name.len() > 64 || !name.chars().all(valid) {
            return Err(bad(format!("tools[{i}].function.name"), "must be 1 to 64 of a-z, A-Z, 0-9, _ and -"));
        }
        if tools.iter().any(|t| t.name == name) {
            return Err(bad(format!("tools[{i}].function.name"), format!("repeats '{name}'; give each tool once")));
        }
        let at = || format!("tools[{i}].function.parameters");
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object"}),
            // Arguments are an object: a schema that does not say so is read as saying it.
            Some(Value::Object(p)) => match p.get("type") {
                None => {
                    let mut p = p.clone();
                    p.insert("type".into(), json!("object"));
                    Value::Object(p)
                }
                Some(t) if t == "object" => Value::Object(p.clone()),
                Some(t) => {
                    return Err(bad(at(), format!("has type {t}; the arguments are an object (\"type\": \"object\")")));
                }
            },
            Some(_) => return Err(bad(at(), "must be a JSON schema (an object)")),
        };
        let description = f.get("description").and_then(Value::as_str).map(str::to_string);
        tools.push(Tool { name: name.to_string(), description, parameters });
    }
    Ok(tools)
}

/// Reads `tool_choice` (`"auto"` when absent and there are tools).
pub fn parse_tool_choice(v: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, ToolError> {
    const FIELD: &str = "tool_choice";
    let choice = match v {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    FIELD,
                    format!("is '{}'; use \"auto\", \"none\", \"required\" or a function", other.escape_debug()),
                ));
            }
        },
        Some(o) => match (o.get("type").and_then(Value::as_str), o.pointer("/function/name").and_then(Value::as_str)) {
            (Some("function"), Some(name)) => ToolChoice::Named(name.to_string()),
            _ => return Err(bad(FIELD, "must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}")),
        },
    };
    match &choice {
        ToolChoice::Named(name) if !tools.iter().any(|t| &t.name == name) => {
            Err(bad("tool_choice.function.name", format!("is '{}', which is not in 'tools'", name.escape_debug())))
        }
        ToolChoice::Required | ToolChoice::Named(_) if tools.is_empty() => {
            Err(bad(FIELD, "asks for a call but 'tools' is empty; give the tools"))
        }
        _ => Ok(choice),
    }
}

/// The JSON schema of one call to `tool`: `{"name": <its name>, "arguments": <its parameters>}`,
/// the name first.
fn call_schema(tool: &Tool) -> Value {
    json!({
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": false,
    })
}

/// The grammar the output is constrained to (None: unconstrained, for `none` or no tools).
pub fn call_grammar(tools: &[Tool], choice: &ToolChoice) -> Option<GrammarSpec> {
    let calls = |only: Option<&str>| {
        let schemas: Vec<Value> = tools.iter().filter(|t| only.is_none_or(|n| n == t.name)).map(call_schema).collect();
        if schemas.len() == 1 { schemas.into_iter().next().unwrap_or_default() } else { json!({"anyOf": schemas}) }
    };
    match choice {
        _ if tools.is_empty() => None,
        ToolChoice::None => None,
        ToolChoice::Required => Some(GrammarSpec::JsonSchema(calls(None))),
        ToolChoice::Named(n) => Some(GrammarSpec::JsonSchema(calls(Some(n)))),
        ToolChoice::Auto => {
            let mut schema = calls(None);
            if let Some(o) = schema.as_object_mut() {
                o.insert("x-guidance".into(), json!({"whitespace_flexible": false}));
            }
            // A call, or text whose first character is not `{` (so the two never overlap).
            Some(GrammarSpec::Lark(format!("start: call | TEXT\ncall: %json {schema}\nTEXT: /[^{{][\\s\\S]*/\n")))
        }
    }
}

/// The system prompt that describes the tools to a model whose template cannot: their
/// definitions and the JSON to answer with.
pub fn fallback_system_prompt(tools: &[Tool], choice: &ToolChoice) -> String {
    let mut s = String::from("Functions:\n");
    for t in tools {
        let mut def = json!({"name": t.name, "parameters": t.parameters});
        if let Some(d) = &t.description {
            def["description"] = json!(d);
        }
        s.push_str(&def.to_string());
        s.push('\n');
    }
    s.push_str(match choice {
        ToolChoice::None => "Answer in text; call no function.",
        ToolChoice::Required | ToolChoice::Named(_) => "Call one: answer only {\"name\":...,\"arguments\":{...}}.",
        ToolChoice::Auto => "To call one, answer only {\"name\":...,\"arguments\":{...}}.",
    });
    s
}

/// The conversation for a template without tools: the tool description joined to the system
/// message (or opening the conversation as one); a `tool` turn becomes a `user` turn saying
/// which call it answers, and an assistant turn's calls are written into its content as the JSON
/// the model is asked to write.
pub fn with_fallback_prompt(messages: &[ChatMessage], tools: &[Tool], choice: &ToolChoice) -> Vec<ChatMessage> {
    let prompt = fallback_system_prompt(tools, choice);
    let mut out: Vec<ChatMessage> = messages.iter().map(without_tool_fields).collect();
    match out.first_mut() {
        Some(m) if m.role == "system" || m.role == "developer" => m.content = format!("{}\n\n{prompt}", m.content),
        _ => out.insert(0, ChatMessage::new("system", &prompt)),
    }
    out
}

/// A turn written as plain text: a `tool` turn as a user turn naming the call it answers, an
/// assistant turn's calls appended to its content as the JSON the model is asked to write.
fn without_tool_fields(m: &ChatMessage) -> ChatMessage {
    if m.role == "tool" {
        let id = m.tool_call_id.as_deref().unwrap_or_default();
        return ChatMessage::new("user", &format!("Result of function call {id}: {}", m.content));
    }
    let mut text = m.content.clone();
    for c in m.tool_calls.as_ref().and_then(Value::as_array).into_iter().flatten() {
        let name = c.pointer("/function/name").cloned().unwrap_or_default();
        let args = c.pointer("/function/arguments").and_then(Value::as_str).unwrap_or("{}");
        let args: Value = serde_json::from_str(args).unwrap_or(Value::String(args.to_string()));
        text.push_str(&json!({"name": name, "arguments": args}).to_string());
    }
    ChatMessage::new(&m.role, &text)
}

/// The call in `text`, when it is one (a JSON object with a known `name` and object
/// `arguments`).
pub fn parse_call(text: &str, tools: &[Tool]) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(text).ok()?;
    let name = v.get("name")?.as_str()?;
    let args = v.get("arguments").filter(|a| a.is_object())?;
    tools.iter().any(|t| t.name == name).then(|| ToolCall { name: name.to_string(), arguments: args.to_string() })
}

/// Follows a call as its text streams in (compact JSON, the name first): says the name once
/// `{"name":"…","arguments":` is complete, then hands out the arguments piece by piece,
/// holding back the object's closing `}`.
#[derive(Debug, Default)]
pub struct CallStream {
    buffer: String,
    name_sent: bool,
}

/// What a piece of streamed call text gave.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CallPiece {
    /// The function's name, the first time it is known.
    pub name: Option<String>,
    /// More of the arguments' JSON (may be empty).
    pub arguments: String,
}

impl CallStream {
    pub fn push(&mut self, text: &str) -> CallPiece {
        self.buffer.push_str(text);
        let mut piece = CallPiece::default();
        if !self.name_sent {
            let Some(rest) = self.buffer.strip_prefix("{\"name\":") else { return piece };
            let mut de = serde_json::Deserializer::from_str(rest).into_iter::<String>();
            let Some(Ok(name)) = de.next() else { return piece };
            let after = &rest[de.byte_offset()..];
            let Some(args) = after.strip_prefix(",\"arguments\":") else { return piece };
            self.name_sent = true;
            piece.name = Some(name);
            self.buffer = args.to_string();
        }
        // Keep the last character back: it may be the call's closing brace.
        let keep = self.buffer.char_indices().last().map_or(0, |(i, _)| i);
        piece.arguments = self.buffer[..keep].to_string();
        self.buffer.drain(..keep);
        piece
    }

    /// Whether the name has been read (the text is a call, streamed as one).
    pub fn started(&self) -> bool {
        self.name_sent
    }

    /// The held-back end: nothing when it is the call's closing brace.
    pub fn finish(self) -> String {
        if self.name_sent && self.buffer == "}" { String::new() } else { self.buffer }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Tool> {
        parse_tools(&json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "now"}},
        ]))
        .expect("valid tools")
    }

    #[test]
    fn tools_and_choices_are_read_and_wrong_ones_name_the_field() {
        let t = tools();
        assert_eq!(t[1].parameters, json!({"type": "object"}));
        assert_eq!(parse_tool_choice(None, &t), Ok(ToolChoice::Auto));
        let named = json!({"type": "function", "function": {"name": "now"}});
        assert_eq!(parse_tool_choice(Some(&named), &t), Ok(ToolChoice::Named("now".into())));
        let e = parse_tool_choice(Some(&json!({"type": "function", "function": {"name": "x"}})), &t).expect_err("x");
        assert_eq!(e.field, "tool_choice.function.name");
        let e = parse_tools(&json!([{"type": "function", "function": {"name": "a b"}}])).expect_err("bad name");
        assert_eq!(e.field, "tools[0].function.name");
        let e = parse_tools(&json!([{"type": "retrieval"}])).expect_err("bad type");
        assert_eq!(e.field, "tools[0].type");
        let e = parse_tools(&json!([{"type": "function", "function": {"name": "f", "parameters": 3}}])).expect_err("p");
        assert_eq!(e.field, "tools[0].function.parameters");
        let e =
            parse_tools(&json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]));
        assert_eq!(e.expect_err("not an object").field, "tools[0].function.parameters");
        let t =
            parse_tools(&json!([{"type": "function", "function": {"name": "f", "parameters": {"properties": {}}}}]));
        assert_eq!(t.expect("typeless")[0].parameters, json!({"properties": {}, "type": "object"}));
    }

    #[test]
    fn a_call_streams_as_name_then_argument_pieces_and_reads_back() {
        let text = r#"{"name":"get_weather","arguments":{"city":"Paris"}}"#;
        let want = parse_call(text, &tools()).expect("a call");
        assert_eq!(want, ToolCall { name: "get_weather".into(), arguments: r#"{"city":"Paris"}"#.into() });
        for cut in 1..text.len() {
            let mut s = CallStream::default();
            let (mut name, mut args) = (None, String::new());
            for part in [&text[..cut], &text[cut..]] {
                let p = s.push(part);
                name = name.or(p.name);
                args.push_str(&p.arguments);
            }
            args.push_str(&s.finish());
            assert_eq!((name.as_deref(), args.as_str()), (Some("get_weather"), want.arguments.as_str()), "cut {cut}");
        }
        assert_eq!(parse_call("Hello", &tools()), None);
        // A conversation for a template without tools: the description opens it as a system
        // turn; an earlier call and its result are written as text.
        let mut asked = ChatMessage::new("assistant", "");
        asked.tool_calls = Some(json!([{"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]));
        let mut answer = ChatMessage::new("tool", "sunny");
        answer.tool_call_id = Some("c1".into());
        let turns =
            with_fallback_prompt(&[ChatMessage::new("user", "Weather?"), asked, answer], &tools(), &ToolChoice::Auto);
        assert_eq!(turns.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(), ["system", "user", "assistant", "user"]);
        assert!(turns[0].content.starts_with("Functions:\n{\"name\":\"get_weather\""), "{}", turns[0].content);
        assert_eq!(turns[2].content, text);
        assert_eq!(turns[3].content, "Result of function call c1: sunny");
        assert!(turns.iter().all(|m| m.tool_calls.is_none() && m.tool_call_id.is_none()));
        assert_eq!(parse_call(r#"{"name":"other","arguments":{}}"#, &tools()), None);
    }
}

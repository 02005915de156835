//! Hugging Face chat templates rendered with minijinja.
//!
//! Templates come from `tokenizer_config.json` (`chat_template`: a string, or a list of named
//! templates), a `chat_template.jinja` file or a `chat_template.json` (`{"chat_template": …}`, as
//! multimodal checkpoints ship it). They are Jinja written for Python, so string
//! methods (`.strip()`, `.startswith()` …) go through minijinja-contrib's pycompat layer, and the
//! environment uses HF's settings (trim_blocks, lstrip_blocks, `raise_exception`).
//!
//! A template is a program from the model's author, so it runs under limits: a fuel budget
//! (minijinja instructions; an endless or exponential loop stops with an error) and a bound on
//! the rendered prompt's size. Both are far above what real templates use.
//!
//! Not bounded: the size of strings a template builds along the way. minijinja has no memory
//! limit, and one instruction can make a large string (`'s' * n` up to 100 MB, `a ~ a` without
//! limit, a macro's captured output), so a template that doubles such a string in a loop or a
//! recursive macro can exhaust memory within its fuel. Closing that needs a renderer with a
//! memory limit (out of process, or in minijinja itself).

use std::io::Write;
use std::path::Path;

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde::Serialize;
use serde_json::Value;

use crate::{Result, TokenizerError};

/// minijinja instructions one render may run. Real templates spend about a hundred per message
/// (the harmony template, the longest we ship, renders 40,000 messages within this budget),
/// while an endless loop stops within about a second.
pub const TEMPLATE_FUEL: u64 = 5_000_000;
/// Largest rendered prompt: 64 MiB of text is more tokens than any context ollm accepts (2^24
/// positions at ~4 bytes a token).
pub const MAX_RENDER_BYTES: usize = 64 << 20;

/// One chat turn.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls, as OpenAI's API writes them (`[{"id", "type": "function",
    /// "function": {"name", "arguments"}}]`), for templates that render tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// A `tool` turn's answer to this call id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string(), tool_calls: None, tool_call_id: None }
    }
}

/// A compiled chat template plus the special-token strings it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source_name: String,
    /// The template reads a `tools` variable (renders tool definitions itself).
    tools: bool,
    pub bos_token: String,
    pub eos_token: String,
}

/// `"<s>"` or `{"content": "<s>", ...}` (AddedToken form).
fn token_string(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(m)) => m.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Finds the template of a model directory; `Ok(None)` if it has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path)
                .map_err(|e| TokenizerError::Load { path: cfg_path.clone(), detail: e.to_string() })?;
            serde_json::from_str(&text)
                .map_err(|e| TokenizerError::Load { path: cfg_path.clone(), detail: format!("invalid JSON: {e}") })?
        } else {
            Value::Null
        };
        let (bos, eos) = (token_string(cfg.get("bos_token")), token_string(cfg.get("eos_token")));
        let jinja_path = dir.join("chat_template.jinja");
        let json_path = dir.join("chat_template.json");
        let (source, name) = if jinja_path.exists() {
            let s = std::fs::read_to_string(&jinja_path)
                .map_err(|e| TokenizerError::Load { path: jinja_path.clone(), detail: e.to_string() })?;
            (s, jinja_path.display().to_string())
        } else if json_path.exists() {
            // Multimodal checkpoints (gemma-3-*-it) keep the processor's template here.
            let load = |detail: String| TokenizerError::Load { path: json_path.clone(), detail };
            let text = std::fs::read_to_string(&json_path).map_err(|e| load(e.to_string()))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| load(format!("invalid JSON: {e}")))?;
            match v.get("chat_template") {
                Some(Value::String(s)) => (s.clone(), json_path.display().to_string()),
                _ => return Err(load("no 'chat_template' string; fix or remove the file".into())),
            }
        } else {
            match cfg.get("chat_template") {
                Some(Value::String(s)) => (s.clone(), cfg_path.display().to_string()),
                Some(Value::Array(list)) => {
                    let named = |n: &str| list.iter().find(|t| t.get("name").and_then(|v| v.as_str()) == Some(n));
                    match named("default").and_then(|t| t.get("template")).and_then(|t| t.as_str()) {
                        Some(s) => (s.to_string(), format!("{} (default)", cfg_path.display())),
                        None => {
                            return Err(TokenizerError::Load {
                                path: cfg_path,
                                detail: "chat_template is a list without a 'default' entry".into(),
                            });
                        }
                    }
                }
                _ => return Ok(None),
            }
        };
        Self::new(&source, &name, bos, eos).map(Some)
    }

    /// Compiles a template source.
    pub fn new(source: &str, source_name: &str, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String { strftime_now(&fmt) });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TokenizerError::Template { source_name: source_name.to_string(), detail: e.to_string() })?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| TokenizerError::Template { source_name: source_name.to_string(), detail: e.to_string() })?;
        let tools = tmpl.undeclared_variables(false).contains("tools");
        Ok(Self { env, source_name: source_name.to_string(), tools, bos_token, eos_token })
    }

    /// Whether the template renders tool definitions (reads a `tools` variable); when it does not,
    /// a caller describes the tools in a message of its own.
    pub fn supports_tools(&self) -> bool {
        self.tools
    }

    /// Renders the conversation; `add_generation_prompt` opens the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Renders the conversation with `tools` (OpenAI's `tools` list) given to the template as
    /// `tools`; None leaves the variable undefined, as transformers does.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| self.err(e))?;
        let mut out = Bounded { bytes: Vec::new(), limit: MAX_RENDER_BYTES, overflowed: false };
        let base = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        };
        let ctx = match tools {
            Some(t) => context! { tools => t, ..base },
            None => base,
        };
        match tmpl.render_captured_to(ctx, &mut out) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {
                return Err(self.limit(format!(
                    "ran more than {TEMPLATE_FUEL} instructions (an endless loop?); the template is broken or hostile: fix or replace chat_template.jinja or tokenizer_config.json's chat_template"
                )));
            }
            Err(_) if out.overflowed => {
                return Err(self.limit(format!(
                    "rendered more than {MAX_RENDER_BYTES} bytes; the template is broken or hostile, or the conversation is too long"
                )));
            }
            Err(e) => return Err(self.err(e)),
        }
        String::from_utf8(out.bytes).map_err(|e| self.limit(format!("rendered invalid UTF-8 ({e})")))
    }

    fn err(&self, e: JinjaError) -> TokenizerError {
        self.limit(e.to_string())
    }

    /// A template error; control characters (a message from `raise_exception`, say) escaped so
    /// it stays one line.
    fn limit(&self, detail: String) -> TokenizerError {
        let mut one_line = String::with_capacity(detail.len());
        for c in detail.chars() {
            if c.is_control() {
                one_line.extend(c.escape_debug());
            } else {
                one_line.push(c);
            }
        }
        TokenizerError::Template { source_name: self.source_name.clone(), detail: one_line }
    }
}

/// The render's output, refusing to grow past `limit` bytes (and saying it refused).
struct Bounded {
    bytes: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("the rendered prompt is too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Today's date for templates that print it (`strftime_now("%d %b %Y")`); supports %d %m %b %B %Y.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    fmt.replace("%d", &format!("{d:02}"))
        .replace("%m", &format!("{m:02}"))
        .replace("%b", &month[..3])
        .replace("%B", month)
        .replace("%Y", &y.to_string())
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}\
{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_python_string_methods() {
        let t = ChatTemplate::new(CHATML, "test", String::new(), String::new()).expect("compiles");
        let out = t.render(&[ChatMessage::new("user", "  hi there \n")], true).expect("renders");
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "t", String::new(), String::new())
            .expect("compiles");
        let e = t.render(&[], false).expect_err("raises");
        assert!(e.to_string().contains("roles must alternate"), "{e}");
    }

    #[test]
    fn template_sources_jinja_file_and_named_list() {
        let dir = std::env::temp_dir().join(format!("ollm-tmpl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let cfg = r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ bos_token }}D{{ eos_token }}"}]}"#;
        std::fs::write(dir.join("tokenizer_config.json"), cfg).expect("write");
        let t = ChatTemplate::from_dir(&dir).expect("loads").expect("present");
        assert_eq!(t.render(&[], false).expect("renders"), "<s>D</s>");
        // chat_template.json (multimodal checkpoints) wins over tokenizer_config.json ...
        std::fs::write(dir.join("chat_template.json"), r#"{"chat_template": "M{{ messages[0].content }}"}"#)
            .expect("write");
        let t = ChatTemplate::from_dir(&dir).expect("loads").expect("present");
        assert_eq!(t.render(&[ChatMessage::new("user", "x")], false).expect("renders"), "Mx");
        // ... and a chat_template.json without the string is an error naming the file.
        std::fs::write(dir.join("chat_template.json"), r#"{"template": "M"}"#).expect("write");
        let Err(e) = ChatTemplate::from_dir(&dir) else { panic!("a chat_template.json without the string is refused") };
        let e = e.to_string();
        assert!(e.contains("chat_template.json") && e.contains("'chat_template'"), "{e}");
        // chat_template.jinja wins over both.
        std::fs::write(dir.join("chat_template.jinja"), "J{{ messages[0].content }}").expect("write");
        let t = ChatTemplate::from_dir(&dir).expect("loads").expect("present");
        assert_eq!(t.render(&[ChatMessage::new("user", "x")], false).expect("renders"), "Jx");
        std::fs::remove_dir_all(&dir).ok();
        let none = std::env::temp_dir().join(format!("ollm-tmpl-none-{}", std::process::id()));
        std::fs::create_dir_all(&none).expect("dir");
        assert!(ChatTemplate::from_dir(&none).expect("no error").is_none());
        std::fs::remove_dir_all(&none).ok();
    }

    /// Templates that never end or grow exponentially stop with a one-line error: an endless
    /// loop and exponential recursion run out of fuel; output past the bound stops at the bound.
    #[test]
    fn hostile_templates_stop_at_the_limits() {
        let render = |src: &str| {
            let t = ChatTemplate::new(src, "hostile", String::new(), String::new()).expect("compiles");
            t.render(&[ChatMessage::new("user", "hi")], true).expect_err(src).to_string()
        };
        // 2^60 calls, each doubling the output of the one above.
        let doubling = "{% macro d(n) %}{% if n == 0 %}ab{% else %}{{ d(n - 1) }}{{ d(n - 1) }}{% endif %}{% endmacro %}{{ d(60) }}";
        let e = render(doubling);
        assert!(e.contains("instructions") && !e.contains('\n'), "{e}");
        let endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        assert!(render(endless).contains("instructions"));
        // 100,000 × 1,000 bytes: 100 MB of output from few instructions.
        let wide = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}";
        let e = render(wide);
        assert!(e.contains("rendered more than") && !e.contains('\n'), "{e}");
        let multi_line = render("{{ raise_exception('line one\nline two') }}");
        assert!(multi_line.contains("line one\\nline two") && !multi_line.contains('\n'), "{multi_line}");
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}

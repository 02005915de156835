//! Hugging Face chat templates rendered with minijinja.
//!
//! Templates come from `tokenizer_config.json` (`chat_template`: a string, or a list of named
//! templates) or a `chat_template.jinja` file. They are Jinja written for Python, so string
//! methods (`.strip()`, `.startswith()` …) go through minijinja-contrib's pycompat layer, and the
//! environment uses HF's settings (trim_blocks, lstrip_blocks, `raise_exception`).

use std::path::Path;

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde::Serialize;
use serde_json::Value;

use crate::{Result, TokenizerError};

/// One chat turn.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

/// A compiled chat template plus the special-token strings it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source_name: String,
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
        let (source, name) = if jinja_path.exists() {
            let s = std::fs::read_to_string(&jinja_path)
                .map_err(|e| TokenizerError::Load { path: jinja_path.clone(), detail: e.to_string() })?;
            (s, jinja_path.display().to_string())
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
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String { strftime_now(&fmt) });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TokenizerError::Template { source_name: source_name.to_string(), detail: e.to_string() })?;
        Ok(Self { env, source_name: source_name.to_string(), bos_token, eos_token })
    }

    /// Renders the conversation; `add_generation_prompt` opens the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| self.err(e))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| self.err(e))
    }

    fn err(&self, e: JinjaError) -> TokenizerError {
        TokenizerError::Template { source_name: self.source_name.clone(), detail: e.to_string() }
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
        // chat_template.jinja wins over tokenizer_config.json.
        std::fs::write(dir.join("chat_template.jinja"), "J{{ messages[0].content }}").expect("write");
        let t = ChatTemplate::from_dir(&dir).expect("loads").expect("present");
        assert_eq!(t.render(&[ChatMessage::new("user", "x")], false).expect("renders"), "Jx");
        std::fs::remove_dir_all(&dir).ok();
        let none = std::env::temp_dir().join(format!("ollm-tmpl-none-{}", std::process::id()));
        std::fs::create_dir_all(&none).expect("dir");
        assert!(ChatTemplate::from_dir(&none).expect("no error").is_none());
        std::fs::remove_dir_all(&none).ok();
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}

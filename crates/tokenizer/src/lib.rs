//! ollm-tokenizer: text ↔ ids through tokenizer.json (the `tokenizers` crate), chat templates
//! through minijinja with Python-compatible string methods, and streaming detokenisation.

mod chat_template;
mod stream;
pub mod tiktoken;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use stream::StreamDecoder;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {detail}")]
    Load { path: PathBuf, detail: String },

    #[error("chat template ({source_name}): {detail}")]
    Template { source_name: String, detail: String },

    #[error("tokenizer: {0}")]
    Codec(String),
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// A loaded tokenizer.json. Cheap to share by reference across threads.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` reading special tokens as plain text; made the first time a chat message spells one.
    plain: OnceLock<tokenizers::Tokenizer>,
    /// The text of every special added token (`<|im_end|>`, `</s>` …), longest first.
    specials: Vec<String>,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `<dir>/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(TokenizerError::Load {
                path: path.to_path_buf(),
                detail: "not found (the model directory needs a tokenizer.json; ollm import-gguf writes one)".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.to_path_buf(), detail: format!("cannot parse: {e}") })?;
        let mut specials: Vec<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content)
            .collect();
        specials.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        Ok(Self { inner, plain: OnceLock::new(), specials, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Encodes text; `add_special` applies the post-processor (e.g. prepends BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| TokenizerError::Codec(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids of a plain prompt: the post-processor adds what the model expects (e.g. BOS).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, true)
    }

    /// Ids of a conversation rendered by `template` with the assistant's turn opened. The template
    /// writes every special token itself, so none are added (as transformers'
    /// `apply_chat_template` does). A message's content is text: a special token spelled inside
    /// it (`<|im_end|>` in a user message) is encoded as the characters it is made of, never as
    /// the control token, so a message cannot forge a turn of another role. A raw prompt
    /// ([`encode_prompt`](Self::encode_prompt)) still reads special tokens, as llama.cpp does.
    pub fn encode_chat(&self, template: &ChatTemplate, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.encode_chat_with_tools(template, messages, None)
    }

    /// [`encode_chat`](Self::encode_chat) with OpenAI's `tools` list given to the template
    /// ([`ChatTemplate::render_with_tools`]).
    pub fn encode_chat_with_tools(
        &self,
        template: &ChatTemplate,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>> {
        if !messages.iter().any(|m| self.specials.iter().any(|s| m.content.contains(s.as_str()))) {
            return self.encode(&template.render_with_tools(messages, tools, true)?, false);
        }
        let mut masks = ContentSpecials::new();
        let masked: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage { content: masks.mask(&m.content, &self.specials), ..m.clone() })
            .collect();
        let (text, spans) = masks.unmask(&template.render_with_tools(&masked, tools, true)?)?;
        let enc = self.inner.encode(text.as_str(), false).map_err(|e| TokenizerError::Codec(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len());
        for (&id, &(start, end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            // A special token matched where a message spelled it: encode its text as text.
            if spans.iter().any(|&(s, e)| start <= s && e <= end) {
                let plain = self.plain.get_or_init(|| {
                    let mut t = self.inner.clone();
                    t.set_encode_special_tokens(true);
                    t
                });
                let piece = plain.encode(&text[start..end], false).map_err(|e| TokenizerError::Codec(e.to_string()))?;
                ids.extend_from_slice(piece.get_ids());
            } else {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text; `skip_special` drops special tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Special tokens spelled inside message contents, swapped for markers while the template runs
/// so that afterwards it is known which occurrences the template wrote and which came from a
/// message. A marker is a private-use character, a per-call nonce and an index; it has no
/// whitespace, so `strip`/`trim` in a template act on the content as they would on the original.
struct ContentSpecials {
    prefix: String,
    spelled: Vec<String>,
}

const MARK_OPEN: char = '\u{E000}';
const MARK_CLOSE: char = '\u{E001}';

impl ContentSpecials {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let nonce = std::collections::hash_map::RandomState::new().build_hasher().finish();
        Self { prefix: format!("{MARK_OPEN}{nonce:016x}:"), spelled: Vec::new() }
    }

    /// `content` with every special token it spells replaced by a marker (longest match first).
    fn mask(&mut self, content: &str, specials: &[String]) -> String {
        let mut out = String::with_capacity(content.len());
        let mut rest = content;
        'scan: while !rest.is_empty() {
            for s in specials {
                if rest.starts_with(s.as_str()) {
                    out.push_str(&format!("{}{}{MARK_CLOSE}", self.prefix, self.spelled.len()));
                    self.spelled.push(s.clone());
                    rest = &rest[s.len()..];
                    continue 'scan;
                }
            }
            let mut chars = rest.chars();
            if let Some(c) = chars.next() {
                out.push(c);
            }
            rest = chars.as_str();
        }
        out
    }

    /// The rendered text with the markers turned back into the special tokens' text, and the
    /// byte ranges where they now stand.
    fn unmask(&self, rendered: &str) -> Result<(String, Vec<(usize, usize)>)> {
        let mut text = String::with_capacity(rendered.len());
        let mut spans = Vec::new();
        let mut rest = rendered;
        while let Some(at) = rest.find(self.prefix.as_str()) {
            text.push_str(&rest[..at]);
            let after = &rest[at + self.prefix.len()..];
            let index = after
                .find(MARK_CLOSE)
                .and_then(|end| Some((after[..end].parse::<usize>().ok()?, end)))
                .and_then(|(i, end)| Some((self.spelled.get(i)?, end)));
            let Some((special, end)) = index else {
                return Err(TokenizerError::Codec(
                    "the chat template cut apart a special token spelled inside a message; remove it from the message"
                        .into(),
                ));
            };
            spans.push((text.len(), text.len() + special.len()));
            text.push_str(special);
            rest = &after[end + MARK_CLOSE.len_utf8()..];
        }
        text.push_str(rest);
        Ok((text, spans))
    }
}

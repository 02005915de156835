//! ollm-tokenizer: text ↔ ids through tokenizer.json (the `tokenizers` crate), chat templates
//! through minijinja with Python-compatible string methods, and streaming detokenisation.

mod chat_template;
mod stream;
pub mod tiktoken;

use std::path::{Path, PathBuf};

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
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
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
        Ok(Self { inner, path: path.to_path_buf() })
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
    /// `apply_chat_template` does).
    pub fn encode_chat(&self, template: &ChatTemplate, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.encode(&template.render(messages, true)?, false)
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

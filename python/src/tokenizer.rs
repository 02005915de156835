//! `ollm_rs.Tokenizer`: the model's tokenizer.json and chat template.

use std::sync::Arc;

use ollm_tokenizer::ChatMessage;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::errors::{engine, value_error};
use crate::llm::Shared;

/// Chat messages from Python: a list of {"role": str, "content": str} dicts.
pub fn messages(v: &Bound<'_, PyAny>) -> PyResult<Vec<ChatMessage>> {
    if v.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "messages: expected a list of {\"role\": ..., \"content\": ...} dicts, not a string",
        ));
    }
    let mut out = Vec::new();
    for (i, m) in v.try_iter()?.enumerate() {
        let m = m?;
        let d = m
            .cast::<PyDict>()
            .map_err(|_| PyTypeError::new_err(format!("messages[{i}]: expected a dict with 'role' and 'content'")))?;
        let field = |key: &str| -> PyResult<String> {
            match d.get_item(key)? {
                Some(x) => {
                    x.extract::<String>().map_err(|_| value_error(format!("messages[{i}]['{key}']: expected a string")))
                }
                None => Err(value_error(format!("messages[{i}] has no '{key}'"))),
            }
        };
        out.push(ChatMessage::new(&field("role")?, &field("content")?));
    }
    if out.is_empty() {
        return Err(value_error("messages is empty: give at least one message"));
    }
    Ok(out)
}

/// The tokenizer of an LLM (its tokenizer.json) and its chat template.
#[pyclass(module = "ollm_rs", name = "Tokenizer", frozen)]
pub struct PyTokenizer {
    shared: Arc<Shared>,
}

impl PyTokenizer {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[pymethods]
impl PyTokenizer {
    /// Token ids of `text`; `add_special_tokens` applies the model's post-processor (a BOS
    /// token for models that want one), as generate() does for a prompt.
    #[pyo3(signature = (text, add_special_tokens = true))]
    fn encode(&self, py: Python<'_>, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let tok = &self.shared.chat.tokenizer;
        py.detach(|| tok.encode(text, add_special_tokens)).map_err(engine)
    }

    /// The text of `ids`; `skip_special_tokens` drops tokens such as `<|im_end|>`.
    #[pyo3(signature = (ids, skip_special_tokens = false))]
    fn decode(&self, py: Python<'_>, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        let tok = &self.shared.chat.tokenizer;
        let vocab = tok.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(value_error(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        py.detach(|| tok.decode(&ids, skip_special_tokens)).map_err(engine)
    }

    /// Renders `messages` (a list of {"role", "content"} dicts) with the model's chat template;
    /// `add_generation_prompt` opens the assistant's turn. With `tokenize` the token ids are
    /// returned instead of the text (a special token spelled inside a message is encoded as
    /// plain text, as chat() does).
    #[pyo3(signature = (messages, add_generation_prompt = true, tokenize = false))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
        tokenize: bool,
    ) -> PyResult<Py<PyAny>> {
        let msgs = self::messages(messages)?;
        let s = &self.shared;
        if tokenize && add_generation_prompt {
            return Ok(s.encode_chat(&msgs)?.into_pyobject(py)?.into_any().unbind());
        }
        let Some(template) = &s.chat.template else {
            return Err(value_error(format!(
                "{} has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja)",
                s.loaded.dir.display()
            )));
        };
        let text = template.render(&msgs, add_generation_prompt).map_err(engine)?;
        if tokenize {
            let ids = s.chat.tokenizer.encode(&text, false).map_err(engine)?;
            return Ok(ids.into_pyobject(py)?.into_any().unbind());
        }
        Ok(text.into_pyobject(py)?.into_any().unbind())
    }

    /// The id of a token's text (`"<|im_end|>"`), or None.
    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.shared.chat.tokenizer.token_to_id(token)
    }

    /// The text of a token id, or None.
    fn id_to_token(&self, id: u32) -> Option<String> {
        self.shared.chat.tokenizer.id_to_token(id)
    }

    /// Vocabulary size, added tokens included.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.shared.chat.tokenizer.vocab_size()
    }

    /// Token ids that end a generation (config.json, generation_config.json, the template's eos).
    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.shared.chat.eos_token_ids.clone()
    }

    /// Whether the model has a chat template (chat() and apply_chat_template() need one).
    #[getter]
    fn has_chat_template(&self) -> bool {
        self.shared.chat.template.is_some()
    }

    fn __repr__(&self) -> String {
        format!("Tokenizer(path={:?}, vocab_size={})", self.shared.chat.tokenizer.path(), self.vocab_size())
    }
}

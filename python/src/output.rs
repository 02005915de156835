//! What a generation returns to Python: [`RequestOutput`] with its [`Usage`] and [`Stats`].

use ollm_engine::Generation;
use pyo3::prelude::*;

/// Token counts of one generation.
#[pyclass(module = "ollm_rs", get_all, frozen)]
#[derive(Debug, Clone)]
pub struct Usage {
    /// Tokens of the prompt (the chat template's included).
    pub prompt_tokens: usize,
    /// Tokens generated (a final end-of-sequence token not counted).
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[pymethods]
impl Usage {
    fn __repr__(&self) -> String {
        format!(
            "Usage(prompt_tokens={}, completion_tokens={}, total_tokens={})",
            self.prompt_tokens, self.completion_tokens, self.total_tokens
        )
    }
}

/// Timings of one generation.
#[pyclass(module = "ollm_rs", get_all, frozen)]
#[derive(Debug, Clone)]
pub struct Stats {
    /// Seconds spent on the prompt (time to the first token's logits).
    pub prefill_s: f64,
    /// Seconds spent generating after that.
    pub decode_s: f64,
    /// Prompt tokens computed per second of prefill.
    pub prefill_tok_per_s: f64,
    /// Generated tokens per second of decode.
    pub decode_tok_per_s: f64,
    /// Prompt tokens kept from the previous generation on the same session (not computed).
    pub reused_tokens: usize,
    /// With `speculate=`: verification passes of the model (None without speculation).
    pub target_passes: Option<usize>,
    /// With `speculate=`: tokens drafted, and those the model kept.
    pub drafted_tokens: Option<usize>,
    pub accepted_tokens: Option<usize>,
    /// With `speculate=`: tokens each verification pass produced (1.0 = no gain).
    pub tokens_per_pass: Option<f64>,
}

#[pymethods]
impl Stats {
    fn __repr__(&self) -> String {
        format!(
            "Stats(prefill_s={:.3}, decode_s={:.3}, prefill_tok_per_s={:.1}, decode_tok_per_s={:.1}, reused_tokens={}{})",
            self.prefill_s,
            self.decode_s,
            self.prefill_tok_per_s,
            self.decode_tok_per_s,
            self.reused_tokens,
            self.tokens_per_pass.map_or(String::new(), |t| format!(", tokens_per_pass={t:.2}"))
        )
    }
}

/// The result of one prompt.
#[pyclass(module = "ollm_rs", get_all, frozen)]
#[derive(Debug, Clone)]
pub struct RequestOutput {
    /// The generated text (stop strings excluded; for harmony models the final answer only).
    pub text: String,
    /// A harmony model's reasoning (analysis and commentary channels); empty otherwise.
    pub reasoning: String,
    /// The generated token ids (a final end-of-sequence token excluded).
    pub token_ids: Vec<u32>,
    /// "stop" (end of sequence or a stop string), "length" (max_new_tokens or the context is
    /// full) or "cancelled".
    pub finish_reason: String,
    pub usage: Usage,
    pub stats: Stats,
}

#[pymethods]
impl RequestOutput {
    fn __repr__(&self) -> String {
        format!(
            "RequestOutput(text={:?}, finish_reason={:?}, usage={})",
            self.text,
            self.finish_reason,
            self.usage.__repr__()
        )
    }
}

impl From<Generation> for RequestOutput {
    fn from(g: Generation) -> Self {
        let s = &g.stats;
        let usage = Usage {
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.generated_tokens,
            total_tokens: s.prompt_tokens + s.generated_tokens,
        };
        let stats = Stats {
            prefill_s: s.prefill.as_secs_f64(),
            decode_s: s.decode.as_secs_f64(),
            prefill_tok_per_s: s.prefill_tok_per_s(),
            decode_tok_per_s: s.decode_tok_per_s(),
            reused_tokens: s.reused_tokens,
            target_passes: s.speculation.map(|x| x.passes),
            drafted_tokens: s.speculation.map(|x| x.drafted),
            accepted_tokens: s.speculation.map(|x| x.accepted),
            tokens_per_pass: s.speculation.map(|x| x.tokens_per_pass()),
        };
        Self {
            text: g.text,
            reasoning: g.reasoning,
            token_ids: g.ids,
            finish_reason: g.finish.as_str().into(),
            usage,
            stats,
        }
    }
}

//! Token log-probabilities in OpenAI's two shapes: the chat API's
//! `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": null}`
//! and the completions API's legacy `{tokens, token_logprobs, top_logprobs: [{token: logprob}],
//! text_offset}`. The values come from the engine ([`ollm_engine::logprobs`]: the model's raw
//! distribution); a token the model gives no chance gets -9999.0, as OpenAI writes it (JSON
//! has no -inf).

use ollm_engine::TokenLogprob;
use serde_json::{Map, Value, json};

use crate::request::RequestRules;

/// OpenAI's stand-in for a log-probability of -inf.
const VERY_UNLIKELY: f32 = -9999.0;

fn finite(lp: f32) -> f64 {
    f64::from(if lp.is_finite() { lp } else { VERY_UNLIKELY })
}

/// A token's text and exact bytes (a piece of a UTF-8 character has the replacement character
/// as its text and its own bytes in `bytes`).
fn piece(rules: &RequestRules, id: u32) -> (String, Vec<u8>) {
    let bytes = match rules.grammar_compiler_if_available() {
        Some(c) => c.token_bytes(id),
        None => rules.tokenizer.decode(&[id], false).unwrap_or_default().into_bytes(),
    };
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// The chat API's `logprobs` object for these tokens.
pub fn chat(rules: &RequestRules, tokens: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let (token, bytes) = piece(rules, id);
        json!({"token": token, "logprob": finite(lp), "bytes": bytes})
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(t.id, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// The completions API's `logprobs` object for these tokens; `offset`: characters of the
/// completion before the first of them (updated past them).
pub fn text(rules: &RequestRules, tokens: &[TokenLogprob], offset: &mut usize) -> Value {
    let (mut strings, mut values, mut tops, mut offsets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t in tokens {
        let (token, _) = piece(rules, t.id);
        offsets.push(*offset);
        *offset += token.chars().count();
        strings.push(token);
        values.push(finite(t.logprob));
        let mut top = Map::new();
        for &(id, lp) in &t.top {
            // Two ids with the same text share a key: the more likely (listed first) stays.
            top.entry(piece(rules, id).0).or_insert_with(|| json!(finite(lp)));
        }
        tops.push(Value::Object(top));
    }
    json!({"tokens": strings, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets})
}

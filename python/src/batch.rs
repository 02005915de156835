//! Many prompts in one call: [`generate_many`] is the one place `LLM.generate(list)` reaches
//! the engine.
//!
//! Today the prompts run one after another, each on a session taken from the model's pool (so
//! a prompt that starts like the previous one reuses its KV cache). When the engine's batched
//! scheduler lands (many sequences per weight pass), this function switches to it; its contract
//! stays: the outputs, in the prompts' order, equal what each prompt generates alone (greedy),
//! which `tests/test_generate.py` checks.

use std::ops::ControlFlow;

use ollm_engine::{CancelCheck, GenerateParams, Generation, TokenEvent, generate_reusing};

use crate::llm::Shared;

/// Generates for every prompt (token ids) with `params`. `on_token(i, event)` sees prompt
/// `i`'s tokens as they come and may return `Break` to cancel that generation; `cancel` is
/// asked between prefill chunks, between tokens and between prompts, and once it says true the
/// running generation ends as cancelled and the prompts not started are skipped (fewer outputs
/// than prompts: the caller raises). The first error ends the call.
pub fn generate_many(
    shared: &Shared,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    cancel: &CancelCheck,
    on_token: &mut dyn FnMut(usize, TokenEvent<'_>) -> ControlFlow<()>,
) -> anyhow::Result<Vec<Generation>> {
    let params = GenerateParams { cancel: Some(cancel.clone()), ..params.clone() };
    let mut out = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        if cancel.cancelled() {
            break;
        }
        let mut session = shared.take_session()?;
        let g = generate_reusing(&mut session, &shared.chat.tokenizer, prompt, &params, &mut |ev| {
            if cancel.cancelled() {
                return ControlFlow::Break(());
            }
            on_token(i, ev)
        });
        shared.return_session(session);
        out.push(g?);
    }
    Ok(out)
}

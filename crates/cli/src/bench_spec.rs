//! `ollm bench --model DIR --speculate METHOD`: speculative against plain greedy decoding in the
//! same run, window by window: each window generates the same answer to the prompt twice (plain,
//! then speculative; the session keeps the prompt, so each computes only its answer) and prints
//! both decode rates, their ratio, tokens per target pass and the share of drafts kept, and
//! whether the two answers are the same tokens (greedy speculation must give plain's).

use std::ops::ControlFlow;
use std::path::Path;

use anyhow::{Context, bail};
use ollm_engine::{GenerateParams, Generation, SamplingParams, generate_reusing};
use ollm_tokenizer::ChatMessage;

use crate::commands::ModelArgs;
use crate::commands::bench::DecodeBenchArgs;
use crate::loaded::load_text;

/// One window's two runs.
struct Window {
    plain: f64,
    fast: f64,
    per_pass: f64,
    acceptance: f64,
    draft_tokens: usize,
    tokens: usize,
    same: bool,
}

pub fn run(model: &ModelArgs, a: &DecodeBenchArgs) -> anyhow::Result<()> {
    let loaded = a.spec.load(model)?;
    let text = load_text(&loaded.dir)?;
    let prompt = match &a.prompt_file {
        Some(path) => document_prompt(path, a.chat, &text)?,
        None => {
            let vocab = loaded.model.info().vocab_size;
            (0..a.prompt_tokens).map(|i| ((7 * i * i + 3 * i + 1) % vocab) as u32).collect()
        }
    };
    let plain = GenerateParams {
        max_new_tokens: a.tokens,
        sampling: SamplingParams::greedy(),
        eos_token_ids: loaded.eos_ids(&text),
        stop: Vec::new(),
        harmony: None,
        cancel: None,
        speculate: None,
        logprobs: None,
        grammar: None,
    };
    let spec = GenerateParams { speculate: a.spec.params(&loaded, &text.tokenizer)?, ..plain.clone() };
    let mut session = loaded.session()?;
    let mut quiet = |_: ollm_engine::TokenEvent<'_>| ControlFlow::Continue(());
    // The prompt's prefill, and a first answer that warms caches and thread pools (untimed).
    let warm = generate_reusing(&mut session, &text.tokenizer, &prompt, &plain, &mut quiet)?;
    println!(
        "prompt          {} tokens ({}), prefill {:.1} tok/s; answers of at most {} tokens, greedy",
        prompt.len(),
        a.prompt_file.as_ref().map_or("synthetic".into(), |p| p.display().to_string()),
        warm.stats.prefill_tok_per_s(),
        a.tokens
    );
    let mut windows = Vec::with_capacity(a.repeats);
    let mut answer = String::new();
    for w in 1..=a.repeats {
        let p = generate_reusing(&mut session, &text.tokenizer, &prompt, &plain, &mut quiet)?;
        let s = generate_reusing(&mut session, &text.tokenizer, &prompt, &spec, &mut quiet)?;
        let win = window(&p, &s)?;
        println!(
            "window {w}        plain {:.2} tok/s | speculative {:.2} tok/s ({:.2}x) | {:.2} tokens per target pass, {:.0}% of drafts kept, {} drafted in the last pass | {} tokens, same as plain: {}",
            win.plain,
            win.fast,
            win.fast / win.plain,
            win.per_pass,
            100.0 * win.acceptance,
            win.draft_tokens,
            win.tokens,
            if win.same { "yes" } else { "NO" }
        );
        answer = p.text;
        windows.push(win);
    }
    let best = |f: fn(&Window) -> f64| windows.iter().map(f).fold(0.0, f64::max);
    let (plain_best, fast_best) = (best(|w| w.plain), best(|w| w.fast));
    println!(
        "decode          plain {plain_best:.2} tok/s, speculative {fast_best:.2} tok/s (best of {} windows): {:.2}x",
        windows.len(),
        fast_best / plain_best
    );
    println!("answer          {:?}", answer.chars().take(160).collect::<String>());
    if windows.iter().any(|w| !w.same) {
        bail!("speculative greedy decoding gave other tokens than plain greedy decoding");
    }
    Ok(())
}

fn window(plain: &Generation, fast: &Generation) -> anyhow::Result<Window> {
    let s = fast.stats.speculation.context("the speculative run kept no speculation stats")?;
    Ok(Window {
        plain: plain.stats.decode_tok_per_s(),
        fast: fast.stats.decode_tok_per_s(),
        per_pass: s.tokens_per_pass(),
        acceptance: s.acceptance(),
        draft_tokens: s.draft_tokens,
        tokens: fast.ids.len(),
        same: plain.ids == fast.ids,
    })
}

/// The prompt file's text, as a user message in the chat template with `chat`.
fn document_prompt(path: &Path, chat: bool, text: &crate::loaded::Text) -> anyhow::Result<Vec<u32>> {
    let body = std::fs::read_to_string(path).with_context(|| format!("--prompt-file {}", path.display()))?;
    if !chat {
        return Ok(text.tokenizer.encode_prompt(&body)?);
    }
    let Some(template) = &text.template else {
        bail!("--chat: the model has no chat template; run without --chat");
    };
    Ok(text.tokenizer.encode_chat(template, &[ChatMessage::new("user", &body)])?)
}

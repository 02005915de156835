//! `ollm chat`: a multi-turn conversation in the terminal through the model's chat template.
//! Lines come from standard input (a terminal or a pipe); `/reset` forgets the conversation,
//! `/exit` or end of input leaves.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;

use anyhow::{Context, bail};
use clap::Args;
use ollm_engine::{EngineError, GenerateParams, generate_reusing};
use ollm_tokenizer::ChatMessage;

use super::ModelArgs;
use crate::loaded::load_text;

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub spec: crate::speculation::SpecArgs,
    /// A system message that opens the conversation (kept across /reset).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, short = 'n', default_value_t = 512)]
    pub max_new_tokens: usize,
    /// 0 = greedy. Default: the model's generation_config.json.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed of the sampler (each reply uses the next seed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: ChatArgs) -> anyhow::Result<()> {
    let loaded = a.spec.load(&a.model)?;
    let text = load_text(&loaded.dir)?;
    let Some(template) = &text.template else {
        bail!(
            "{} has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); use `ollm run` for plain text",
            loaded.dir.display()
        );
    };
    let mut sampling = loaded.generation.default_sampling();
    if let Some(t) = a.temperature {
        sampling.temperature = t;
    }
    if let Some(p) = a.top_p {
        sampling.top_p = p;
    }
    sampling.validate()?;
    let mut params = GenerateParams {
        max_new_tokens: a.max_new_tokens,
        sampling,
        eos_token_ids: loaded.eos_ids(&text),
        stop: Vec::new(),
        harmony: ollm_engine::HarmonyMarkers::from_tokenizer(&text.tokenizer),
        cancel: None,
        grammar: None,
        speculate: a.spec.params(&loaded, &text.tokenizer)?,
        logprobs: None,
    };

    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("[ollm] chatting with {} — /reset forgets the conversation, /exit leaves", loaded.dir.display());
    }
    let opening: Vec<ChatMessage> = a.system.iter().map(|s| ChatMessage::new("system", s)).collect();
    let mut history = opening.clone();
    let mut session = loaded.session()?;
    let stdout = std::io::stdout();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading standard input")?;
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history = opening.clone();
                eprintln!("[ollm] conversation cleared");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", input));
        let ids = text.tokenizer.encode_chat(template, &history)?;
        let mut out = stdout.lock();
        // The conversation so far stays in the session; only the new turn is computed.
        let mut thinking = super::run::Reasoning::new();
        let result = generate_reusing(&mut session, &text.tokenizer, &ids, &params, &mut |ev| {
            thinking.show(ev.reasoning, ev.text);
            if out.write_all(ev.text.as_bytes()).and_then(|()| out.flush()).is_err() {
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        });
        writeln!(out).ok();
        out.flush().ok();
        params.sampling.seed = params.sampling.seed.wrapping_add(1);
        match result {
            Ok(g) => {
                if let Some(report) = &g.stats.prefix {
                    let lines = loaded.prefix_lines(report, g.stats.prompt_tokens, g.stats.prefill);
                    lines.iter().filter(|l| l.starts_with("warning:")).for_each(|l| eprintln!("{l}"));
                }
                if let Some(s) = &g.stats.speculation {
                    eprintln!(
                        "[ollm] decode {:.1} tok/s{}",
                        g.stats.decode_tok_per_s(),
                        crate::speculation::describe(s)
                    );
                }
                history.push(ChatMessage::new("assistant", g.text.trim()))
            }
            Err(EngineError::PromptTooLong { prompt, context }) => {
                history.pop();
                eprintln!(
                    "[ollm] the conversation is {prompt} tokens, more than the model's context of {context}; type /reset to start over"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

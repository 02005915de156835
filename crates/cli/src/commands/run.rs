//! `ollm run`: generate text, streamed to stdout; a stats line goes to stderr.

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use ollm_engine::{GenerateParams, GrammarCompiler, GrammarSpec, generate};
use ollm_tokenizer::ChatMessage;

use super::ModelArgs;
use crate::loaded::load_text;
use crate::prompt::read_prompt;
use ollm_ops::bytes::gib;

use crate::resources::{human_bytes, peak_rss_bytes};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub spec: crate::speculation::SpecArgs,
    /// The prompt text.
    #[arg(long, short = 'p')]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 = greedy; otherwise sample at this temperature. Default: the model's generation_config.json.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub min_p: Option<f32>,
    /// > 1 discourages repeating tokens already in the text.
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler; the same seed gives the same text. Default: chosen at random and printed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print a line per generated token on stderr: time, and for streamed layers the bytes read
    /// from disk and copied, their rates, and the time compute waited for weights; with
    /// --speculate, the target passes so far, tokens per pass and drafts kept.
    #[arg(long)]
    pub stats: bool,
    /// Constrain the output to JSON valid against the JSON schema in FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "grammar")]
    pub json_schema: Option<PathBuf>,
    /// Constrain the output to the grammar in FILE, in llguidance's Lark syntax
    /// (`start: ...`; a JSON schema inside with `%json { ... }`).
    #[arg(long, value_name = "FILE")]
    pub grammar: Option<PathBuf>,
}

/// The grammar --json-schema or --grammar asks for, compiled for this tokenizer.
fn grammar_arg(
    a: &RunArgs,
    tokenizer: &ollm_tokenizer::Tokenizer,
    eos: &[u32],
    vocab: usize,
) -> anyhow::Result<Option<ollm_engine::Grammar>> {
    let (path, flag) = match (&a.json_schema, &a.grammar) {
        (Some(p), _) => (p, "--json-schema"),
        (None, Some(p)) => (p, "--grammar"),
        (None, None) => return Ok(None),
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("{flag} {}: cannot read", path.display()))?;
    let spec = if a.json_schema.is_some() {
        let schema = serde_json::from_str(&text)
            .with_context(|| format!("{flag} {}: not JSON; give a JSON schema", path.display()))?;
        GrammarSpec::JsonSchema(schema)
    } else {
        GrammarSpec::Lark(text)
    };
    let compiler = GrammarCompiler::new(tokenizer, eos, vocab)?;
    let grammar = compiler.compile(&spec).with_context(|| format!("{flag} {}", path.display()))?;
    Ok(Some(grammar))
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let prompt = read_prompt(a.prompt.clone(), a.prompt_file.clone())?;
    let loaded = a.spec.load(&a.model)?;
    let text = load_text(&loaded.dir)?;
    let ids = if a.chat {
        let Some(template) = &text.template else {
            bail!(
                "{} has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); run without --chat",
                loaded.dir.display()
            );
        };
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage::new("system", s));
        }
        messages.push(ChatMessage::new("user", &prompt));
        text.tokenizer.encode_chat(template, &messages)?
    } else {
        text.tokenizer.encode_prompt(&prompt)?
    };

    let mut sampling = loaded.generation.default_sampling();
    if let Some(t) = a.temperature {
        sampling.temperature = t;
    }
    if a.top_k.is_some() {
        sampling.top_k = a.top_k;
    }
    if let Some(p) = a.top_p {
        sampling.top_p = p;
    }
    if let Some(p) = a.min_p {
        sampling.min_p = p;
    }
    if let Some(p) = a.repetition_penalty {
        sampling.repetition_penalty = p;
    }
    sampling.seed = a.seed.unwrap_or_else(random_seed);
    let eos = loaded.eos_ids(&text);
    let grammar = grammar_arg(&a, &text.tokenizer, &eos, loaded.model.info().vocab_size)?;
    let params = GenerateParams {
        max_new_tokens: a.max_new_tokens,
        sampling,
        eos_token_ids: eos,
        stop: a.stop.clone(),
        harmony: if a.chat { ollm_engine::HarmonyMarkers::from_tokenizer(&text.tokenizer) } else { None },
        cancel: None,
        grammar,
        speculate: a.spec.params(&loaded, &text.tokenizer)?,
        logprobs: None,
    };

    let mut session = loaded.session()?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_err = None;
    let mut per_token = TokenStats::new(a.stats, loaded.model.as_ref());
    let mut thinking = Reasoning::new();
    let generation = generate(&mut session, &text.tokenizer, &ids, &params, &mut |ev| {
        per_token.token(loaded.model.as_ref(), ev.speculation.as_ref());
        thinking.show(ev.reasoning, ev.text);
        if let Err(e) = out.write_all(ev.text.as_bytes()).and_then(|()| out.flush()) {
            write_err = Some(e);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = write_err
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(e).context("writing to standard output");
    }
    writeln!(out).ok();
    drop(out);

    let s = &generation.stats;
    let peak = peak_rss_bytes().map_or_else(|| "n/a".into(), human_bytes);
    let vram = loaded.peak_vram_bytes().map_or(String::new(), |b| format!(" | peak VRAM {} (driver)", gib(b)));
    let seed =
        if params.sampling.temperature > 0.0 { format!(", seed {}", params.sampling.seed) } else { String::new() };
    let spec = s.speculation.as_ref().map_or(String::new(), crate::speculation::describe);
    eprintln!(
        "[ollm] prompt {} tok, prefill {:.1} tok/s | {} tok generated, decode {:.1} tok/s{spec} | finish {} | load {:.2} s | peak RSS {}{}{}",
        s.prompt_tokens,
        s.prefill_tok_per_s(),
        s.generated_tokens,
        s.decode_tok_per_s(),
        generation.finish.as_str(),
        loaded.load_time.as_secs_f64(),
        peak,
        vram,
        seed
    );
    if let Some((time, masks)) = s.grammar_masks {
        eprintln!(
            "[ollm] grammar: {masks} token masks, {:.3} ms each ({:.1}% of decode)",
            time.as_secs_f64() * 1e3 / masks.max(1) as f64,
            100.0 * time.as_secs_f64() / s.decode.as_secs_f64().max(1e-9)
        );
    }
    if let Some(report) = &s.prefix {
        for line in loaded.prefix_lines(report, s.prompt_tokens, s.prefill) {
            eprintln!("{line}");
        }
    }
    if let Some(line) = loaded.stream_line() {
        eprintln!("{line}");
    }
    if let Some(line) = loaded.expert_line() {
        eprintln!("{line}");
    }
    Ok(())
}

/// A harmony model's reasoning, shown on standard error (dimmed on a terminal) as it comes, so
/// that standard output carries the answer alone.
pub(crate) struct Reasoning {
    open: bool,
    tty: bool,
}

impl Reasoning {
    pub fn new() -> Self {
        Self { open: false, tty: std::io::stderr().is_terminal() }
    }

    /// Shows one event's reasoning; answer text closes an open reasoning block.
    pub fn show(&mut self, reasoning: &str, text: &str) {
        let (dim, plain) = if self.tty { ("\x1b[2m", "\x1b[0m") } else { ("", "") };
        if !reasoning.is_empty() {
            if !self.open {
                eprint!("{dim}[thinking] ");
                self.open = true;
            }
            eprint!("{dim}{reasoning}{plain}");
        } else if !text.is_empty() && self.open {
            eprintln!("{plain}");
            self.open = false;
        }
    }
}

fn random_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// `--stats`: one stderr line per generated token (the first includes the prefill).
struct TokenStats {
    on: bool,
    n: usize,
    last: std::time::Instant,
    prev: Option<ollm_residency::stream::StreamStats>,
}

impl TokenStats {
    fn new(on: bool, model: &dyn ollm_models::CausalLm) -> Self {
        Self { on, n: 0, last: std::time::Instant::now(), prev: model.stream_stats() }
    }

    fn token(&mut self, model: &dyn ollm_models::CausalLm, spec: Option<&ollm_engine::SpecStats>) {
        if !self.on {
            return;
        }
        let secs = self.last.elapsed().as_secs_f64();
        self.last = std::time::Instant::now();
        self.n += 1;
        let mut line = format!("[ollm] token {}: {:.3} s", self.n, secs);
        if let Some(s) = spec {
            line += &format!(" | after {} target passes{}", s.passes, crate::speculation::describe(s));
        }
        if let (Some(now), Some(prev)) = (model.stream_stats(), self.prev) {
            let (disk, copy) = (now.disk_bytes - prev.disk_bytes, now.copy_bytes - prev.copy_bytes);
            let disk_s = now.disk_secs - prev.disk_secs;
            let wait = now.wait_secs - prev.wait_secs;
            let rate = |b: u64, s: f64| if s > 0.0 { b as f64 / s / 1e9 } else { 0.0 };
            line += &format!(
                " | disk {} ({:.2} GB/s while reading) | copied {} ({:.1} GB/s over the token) | waited {:.3} s for weights, computed {:.3} s",
                human_bytes(disk),
                rate(disk, disk_s),
                human_bytes(copy),
                rate(copy, secs),
                wait,
                (secs - wait).max(0.0)
            );
            self.prev = Some(now);
        }
        eprintln!("{line}");
    }
}

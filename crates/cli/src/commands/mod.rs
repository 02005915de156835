//! Subcommands, one file each.

pub mod batch;
pub mod bench;
pub mod chat;
pub mod import_gguf;
pub mod logits;
pub mod perplexity;
pub mod pull;
pub mod run;
pub mod serve;

use clap::{Args, Subcommand, ValueEnum};

/// Every subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt.
    Run(run::RunArgs),
    /// Write the logits of every position of a token list to a .npy file.
    Logits(logits::LogitsArgs),
    /// Perplexity of a text file.
    Perplexity(perplexity::PerplexityArgs),
    /// Convert a llama-architecture GGUF file into a Hugging Face model directory (bf16).
    ImportGguf(import_gguf::ImportGgufArgs),
    /// Measure decode speed against the memory-bandwidth bound of this machine.
    Bench(bench::BenchArgs),
    /// Serve an OpenAI-compatible HTTP API (completions, chat completions, streaming).
    Serve(serve::ServeArgs),
    /// Chat with the model in the terminal.
    Chat(chat::ChatArgs),
    /// Run one request per line of a JSONL file; resumable.
    Batch(batch::BatchArgs),
    /// Download a safetensors model from the Hugging Face hub.
    Pull(pull::PullArgs),
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Run(a) => run::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::ImportGguf(a) => import_gguf::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Batch(a) => batch::run(a),
        Command::Pull(a) => pull::run(a),
    }
}

/// Where the math runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum DeviceArg {
    /// The GPU when one is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// Arguments every computing command takes.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A Hugging Face model directory (config.json, *.safetensors, tokenizer.json), a hub id
    /// ORG/NAME (downloaded on first use), or `smollm2-135m` for the demo model.
    #[arg(long, short = 'm')]
    pub model: String,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
}

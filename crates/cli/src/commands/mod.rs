//! Subcommands, one file each.

mod logits;
mod perplexity;
mod run;

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
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Run(a) => run::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Perplexity(a) => perplexity::run(a),
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
    /// A Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long, short = 'm')]
    pub model: String,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
}

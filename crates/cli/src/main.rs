//! The `ollm` binary. Parses arguments, wires the crates together, prints errors as one line.

use std::process::ExitCode;

use clap::Parser;

use ollm_cli::commands::{self, Command};

/// Tensors on 2 MiB boundaries, so huge pages back all of each (`ollm_ops::cpu::HugePageAlloc`).
#[cfg(unix)]
#[global_allocator]
static ALLOC: ollm_ops::cpu::HugePageAlloc = ollm_ops::cpu::HugePageAlloc;

/// Run large-context LLMs in full precision on little memory.
#[derive(Debug, Parser)]
#[command(name = "ollm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("OLLM_LOG"))
        .without_time()
        .init();
    let cli = Cli::parse();
    match commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the outermost context first, then each cause.
            eprintln!("error: {}", ollm_cli::errors::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

//! `ollm synth`: write a random-weight model with a real model's config, tensor names and
//! shapes, for benchmarks that should not need a 16 GB download.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ollm_models::synth::{Like, synth};

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// The model to imitate: llama-3.1-8b, llama-3.2-1b or llama-3.2-3b.
    #[arg(long, value_parser = Like::parse)]
    pub like: Like,
    /// The directory to create (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Fewer decoder layers than the real model (for quick tests and per-layer figures).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Seed of the pseudo-random weights (the same seed writes the same bytes).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: SynthArgs) -> anyhow::Result<()> {
    let bar = ProgressBar::new(0).with_message("writing weights");
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let mut total_bytes = 0;
    synth(a.like, a.layers, &a.out, a.seed, &mut |done, total| {
        total_bytes = total;
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("writing {}", a.out.display()))?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "[ollm] wrote {} ({:.2} GB of bf16 weights) in {secs:.1} s ({:.2} GB/s)",
        a.out.display(),
        total_bytes as f64 / 1e9,
        total_bytes as f64 / 1e9 / secs.max(1e-9)
    );
    Ok(())
}

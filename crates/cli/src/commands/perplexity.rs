//! `ollm perplexity`: exp(mean negative log-likelihood) of a text, in windows of `--context`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use ollm_engine::Session;

use super::ModelArgs;
use crate::loaded::{load, load_text};

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score.
    #[arg(long)]
    pub file: PathBuf,
    /// Tokens per window (each window starts with an empty cache). Default: min(model context, 512).
    #[arg(long)]
    pub context: Option<usize>,
}

/// Negative log-likelihood of `next` under `logits` (log-softmax in f64).
pub fn nll(logits: &[f32], next: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    lse - logits[next as usize] as f64
}

pub fn run(a: PerplexityArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("cannot read --file {}", a.file.display()))?;
    // Measurements: f32 activations on the CPU unless --cpu-activations says otherwise.
    let mut model = a.model.clone();
    model.cpu_activations = Some(model.cpu_activations.unwrap_or(ollm_ops::cpu::Precision::Exact));
    let loaded = load(&model)?;
    let tok = load_text(&loaded.dir)?.tokenizer;
    let ids = tok.encode(&text, true)?;
    let info = loaded.model.info();
    let ctx = a.context.unwrap_or(info.max_positions.min(512));
    if ctx < 2 || ctx > info.max_positions {
        bail!("--context {ctx} must be between 2 and the model's context of {}", info.max_positions);
    }
    if ids.len() < 2 {
        bail!("{}: needs at least 2 tokens to score, found {}", a.file.display(), ids.len());
    }
    let vocab = info.vocab_size;
    let (mut total, mut count) = (0.0f64, 0usize);
    let mut session = Session::new(loaded.model.clone())?;
    for window in ids.chunks(ctx).filter(|w| w.len() >= 2) {
        session.reset();
        let logits = session.score(window, None)?;
        for (pos, &next) in window.iter().enumerate().skip(1) {
            total += nll(&logits[(pos - 1) * vocab..pos * vocab], next);
            count += 1;
        }
    }
    let ppl = (total / count as f64).exp();
    println!("{ppl:.4}");
    eprintln!("[ollm] perplexity {ppl:.4} over {count} predicted tokens ({} tokens, windows of {ctx})", ids.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::nll;

    #[test]
    fn uniform_logits_give_log_vocab() {
        let v = nll(&[0.5; 8], 3);
        assert!((v - 8f64.ln()).abs() < 1e-12, "{v}");
    }
}

//! `ollm logits`: the logits of every position of a token list, as float32 `[positions, vocab]`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use ollm_engine::Session;

use super::ModelArgs;
use crate::loaded::load;
use crate::npy;

#[derive(Debug, Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Token ids separated by whitespace or commas.
    #[arg(long)]
    pub tokens_file: PathBuf,
    /// Output .npy file.
    #[arg(long)]
    pub out: PathBuf,
}

/// Parses `1 2, 3\n4` into ids, naming the file and the bad entry on error.
pub fn parse_token_ids(text: &str, origin: &str) -> anyhow::Result<Vec<u32>> {
    let ids = text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(i, s)| s.parse::<u32>().with_context(|| format!("{origin}: entry {} ('{s}') is not a token id", i + 1)))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    if ids.is_empty() {
        bail!("{origin}: no token ids found (write ids separated by spaces, newlines or commas)");
    }
    Ok(ids)
}

pub fn run(a: LogitsArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.tokens_file)
        .with_context(|| format!("cannot read --tokens-file {}", a.tokens_file.display()))?;
    let ids = parse_token_ids(&text, &a.tokens_file.display().to_string())?;
    // Measurements: f32 activations on the CPU unless --cpu-activations says otherwise.
    let mut model = a.model.clone();
    model.cpu_activations = Some(model.cpu_activations.unwrap_or(ollm_ops::cpu::Precision::Exact));
    let loaded = load(&model)?;
    let info = loaded.model.info();
    if ids.len() > info.max_positions {
        bail!("{} tokens exceed the model's context of {} positions", ids.len(), info.max_positions);
    }
    let vocab = info.vocab_size;
    let mut session = Session::new(loaded.model.clone())?;
    let logits = session.score(&ids, None)?;
    npy::write_f32(&a.out, &[ids.len(), vocab], &logits)?;
    eprintln!("[ollm] wrote {} ({} positions x {} vocab, float32)", a.out.display(), ids.len(), vocab);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mixed_separators_and_names_bad_entries() {
        assert_eq!(parse_token_ids("1 2,3\n 4,\t5", "f").expect("ids"), vec![1, 2, 3, 4, 5]);
        let e = parse_token_ids("1 x 3", "ids.txt").expect_err("bad");
        assert!(format!("{e:#}").contains("ids.txt: entry 2 ('x')"), "{e:#}");
        assert!(parse_token_ids(" , ", "f").is_err());
    }
}

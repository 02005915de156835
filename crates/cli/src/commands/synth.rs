//! `ollm synth`: write a random-weight model with a real model's config, tensor names and
//! shapes, for benchmarks that should not need a 16 GB download.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ollm_models::synth::{Like, harmony_tokenizer_from_tiktoken, plan_like_config, synth_headers, write_plan};

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// The model to imitate: llama-3.1-8b, llama-3.2-1b, llama-3.2-3b, gpt-oss-20b or
    /// qwen3-next-80b.
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
    /// gpt-oss-20b: the real tokenizer (o200k_harmony) built from OpenAI's o200k_base vocabulary
    /// in FILE (o200k_base.tiktoken) instead of a byte-level stand-in.
    #[arg(long, value_name = "FILE")]
    pub tiktoken: Option<PathBuf>,
    /// Write the safetensors headers only, their data left as sparse holes (no disk space):
    /// a model `ollm plan` reads like the real one (e.g. all 48 layers of Qwen3-Next-80B on a
    /// small disk), which the other commands refuse to run.
    #[arg(long, conflicts_with = "tiktoken")]
    pub headers_only: bool,
    /// For tests (hidden): change a field of the imitated config.json, KEY=VALUE with VALUE as
    /// JSON (repeatable), e.g. `--set hidden_size=64` for a model of a few megabytes in the
    /// real family's tensor names and tokenizer.
    #[arg(long = "set", value_name = "KEY=VALUE", hide = true, conflicts_with = "headers_only")]
    pub set: Vec<String>,
}

/// `--set KEY=VALUE`: VALUE read as JSON (a bare word is a string).
fn config_change(kv: &str) -> anyhow::Result<(String, serde_json::Value)> {
    let Some((key, value)) = kv.split_once('=').filter(|(k, _)| !k.is_empty()) else {
        anyhow::bail!("--set '{kv}': expected KEY=VALUE, e.g. hidden_size=64");
    };
    let value = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
    Ok((key.to_string(), value))
}

pub fn run(a: SynthArgs) -> anyhow::Result<()> {
    if a.headers_only {
        synth_headers(a.like, a.layers, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
        eprintln!("[ollm] wrote {} (headers only: for `ollm plan`, not to run)", a.out.display());
        return Ok(());
    }
    // Read and convert the vocabulary first: a bad file should not cost a model's worth of writes.
    let tokenizer = match &a.tiktoken {
        Some(_) if a.like != Like::GptOss20B => {
            anyhow::bail!("--tiktoken gives GPT-OSS's o200k_harmony tokenizer; use it with --like gpt-oss-20b")
        }
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {} (OpenAI's o200k_base.tiktoken)", path.display()))?;
            Some(harmony_tokenizer_from_tiktoken(&text, &path.display().to_string())?)
        }
        None => None,
    };
    let bar = ProgressBar::new(0).with_message("writing weights");
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let mut total_bytes = 0;
    let mut config = a.like.config();
    for kv in &a.set {
        let (key, value) = config_change(kv)?;
        config[key] = value;
    }
    let plan = plan_like_config(a.like, config, a.layers)?;
    write_plan(&plan, &a.out, a.seed, &mut |done, total| {
        total_bytes = total;
        bar.set_length(total);
        bar.set_position(done);
    })
    .with_context(|| format!("writing {}", a.out.display()))?;
    bar.finish_and_clear();
    if let Some(json) = tokenizer {
        let path = a.out.join("tokenizer.json");
        std::fs::write(&path, json.to_string()).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("[ollm] tokenizer: o200k_harmony from {}", a.tiktoken.as_deref().unwrap_or(path.as_path()).display());
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "[ollm] wrote {} ({:.2} GB of bf16 weights) in {secs:.1} s ({:.2} GB/s)",
        a.out.display(),
        total_bytes as f64 / 1e9,
        total_bytes as f64 / 1e9 / secs.max(1e-9)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_changes_read_json_values_and_name_a_missing_key() {
        let (k, v) = config_change("hidden_size=64").expect("a number");
        assert_eq!((k.as_str(), v), ("hidden_size", serde_json::json!(64)));
        let (_, v) = config_change("layer_types=[\"full_attention\"]").expect("a list");
        assert_eq!(v, serde_json::json!(["full_attention"]));
        let (_, v) = config_change("model_type=gpt_oss").expect("a bare word");
        assert_eq!(v, serde_json::json!("gpt_oss"));
        for bad in ["=3", "hidden_size"] {
            let e = config_change(bad).expect_err(bad).to_string();
            assert!(e.contains("KEY=VALUE") && !e.contains('\n'), "{e}");
        }
    }
}

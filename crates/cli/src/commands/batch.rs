//! `ollm batch IN.jsonl --out OUT.jsonl`: one request per input line, results appended durably
//! as they finish; a re-run skips the ids already in OUT.jsonl.

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ollm_batch::{JobLocks, JobOptions, Progress, run_job};

use super::ModelArgs;
use crate::loaded::{load, load_text};

#[derive(Debug, Args)]
pub struct BatchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Input: one JSON object per line, {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]},
    /// with optional max_tokens, temperature, top_p, top_k, seed, stop.
    pub input: PathBuf,
    /// Results, one JSON object per line; appended to, so a re-run resumes.
    #[arg(long)]
    pub out: PathBuf,
    /// Bad lines and failed requests (default: OUT with .errors.jsonl).
    #[arg(long)]
    pub errors: Option<PathBuf>,
    /// max_tokens of lines that give none.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
}

pub fn run(a: BatchArgs) -> anyhow::Result<()> {
    if !a.input.is_file() {
        anyhow::bail!("input file {} does not exist; give a JSONL file with one request per line", a.input.display());
    }
    let errors = a.errors.clone().unwrap_or_else(|| {
        let stem = a.out.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
        a.out.with_file_name(format!("{stem}.errors.jsonl"))
    });
    let opts = JobOptions {
        input: a.input.clone(),
        output: a.out.clone(),
        errors: errors.clone(),
        default_max_tokens: a.max_tokens,
    };
    // Before the model loads: a second batch on the same files refuses at once.
    let locks = JobLocks::acquire(&opts)?;
    let loaded = load(&a.model)?;
    let text = load_text(&loaded.dir)?;
    let model = loaded.chat_model(text);

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} requests  {per_sec}  ETA {eta}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut tokens = 0usize;
    let summary = run_job(&model, &opts, &locks, &mut |p| match p {
        Progress::Planned { pending, already_done, torn_bytes } => {
            if torn_bytes > 0 {
                bar.suspend(|| eprintln!("[ollm] cut a torn last line ({torn_bytes} bytes) from {}", a.out.display()));
            }
            if already_done > 0 {
                bar.suspend(|| eprintln!("[ollm] resuming: {already_done} requests already done, {pending} to go"));
            }
            bar.set_length(pending as u64);
        }
        Progress::Error(e) => bar.suspend(|| eprintln!("[ollm] skipped: {}", e.message)),
        Progress::Finished { completion_tokens, .. } => {
            tokens += completion_tokens;
            bar.set_message(format!("{tokens} tokens"));
            bar.inc(1);
        }
    })?;
    bar.finish_and_clear();
    eprintln!(
        "[ollm] batch: {} completed, {} already done, {} failed, {} invalid lines, {} duplicate ids; results in {}{}",
        summary.completed,
        summary.already_done,
        summary.failed,
        summary.invalid_lines,
        summary.duplicate_ids,
        a.out.display(),
        if summary.failed + summary.invalid_lines + summary.duplicate_ids > 0 {
            format!(", errors in {}", errors.display())
        } else {
            String::new()
        }
    );
    Ok(())
}

//! `ollm batch IN.jsonl --out OUT.jsonl`: one request per input line, results appended durably
//! as they finish; a re-run skips the ids already in OUT.jsonl.

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ollm_batch::{JobLocks, JobOptions, Progress, Shard, merge, run_job};

use super::ModelArgs;
use crate::loaded::{BatchWanted, load_text, load_with};

#[derive(Debug, Args)]
pub struct BatchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub spec: crate::speculation::SpecArgs,
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
    /// Run shard I of N (0 <= I < N): the requests whose id hashes to I, so N machines split one
    /// job; results go to OUT with `.shard-I-of-N` before its extension (errors likewise).
    /// Join the parts with `ollm merge-batch`.
    #[arg(long, value_name = "I/N", value_parser = Shard::parse)]
    pub shard: Option<Shard>,
    /// Requests generated together: each step of the model feeds one token to each of up to N
    /// sequences in one pass over the weights (default: what the memory budgets allow for the
    /// planned context, at most 64; `ollm plan --max-batch` shows it).
    #[arg(long, value_name = "N")]
    pub max_batch: Option<usize>,
    /// Tokens one step feeds at most: a decode token per running request, then prompt chunks.
    #[arg(long, default_value_t = ollm_server::SERVER_PREFILL_CHUNK)]
    pub step_tokens: usize,
    /// Keep each request's whole prompt KV private, even when requests start with the same
    /// tokens (by default they hold a common prefix once: one document, many questions).
    #[arg(long)]
    pub no_share_prefix: bool,
}

/// `ollm merge-batch OUT PART...`: join the results of a sharded batch.
#[derive(Debug, Args)]
pub struct MergeBatchArgs {
    /// The merged results (a new file).
    pub out: PathBuf,
    /// The shards' results files.
    #[arg(required = true)]
    pub parts: Vec<PathBuf>,
    /// The job's input: results follow its order, and its ids that no part holds are reported.
    #[arg(long)]
    pub input: Option<PathBuf>,
}

/// Joins the parts; fails (after writing OUT) when ids are missing or held by several parts.
pub fn merge_run(a: MergeBatchArgs) -> anyhow::Result<()> {
    let r = merge(&a.out, &a.parts, a.input.as_deref())?;
    let list = |ids: &[String]| {
        let shown: Vec<&str> = ids.iter().take(10).map(String::as_str).collect();
        format!("{}{}", shown.join(", "), if ids.len() > 10 { ", …" } else { "" })
    };
    for (file, line) in &r.unreadable {
        eprintln!("[ollm] {}: line {line} is not a result with an id; skipped", file.display());
    }
    let dup: Vec<String> = r.duplicated.iter().map(|(k, n)| format!("{k} ({n}×)")).collect();
    eprintln!(
        "[ollm] merge-batch: {} results in {}; {} missing, {} duplicated",
        r.written,
        a.out.display(),
        r.missing.len(),
        r.duplicated.len()
    );
    if !r.missing.is_empty() || !r.duplicated.is_empty() {
        anyhow::bail!(
            "the parts do not hold every id exactly once (missing: {}; duplicated, first kept: {}); re-run the shards that own the missing ids",
            if r.missing.is_empty() { "none".into() } else { list(&r.missing) },
            if dup.is_empty() { "none".into() } else { list(&dup) }
        );
    }
    Ok(())
}

pub fn run(a: BatchArgs) -> anyhow::Result<()> {
    if !a.input.is_file() {
        anyhow::bail!("input file {} does not exist; give a JSONL file with one request per line", a.input.display());
    }
    let errors = a.errors.clone().unwrap_or_else(|| {
        let stem = a.out.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
        a.out.with_file_name(format!("{stem}.errors.jsonl"))
    });
    // A shard writes its own files, so shards never share one.
    let (out, errors) = match a.shard {
        Some(s) => (s.path_for(&a.out), s.path_for(&errors)),
        None => (a.out.clone(), errors),
    };
    let opts = JobOptions {
        input: a.input.clone(),
        output: out.clone(),
        errors: errors.clone(),
        default_max_tokens: a.max_tokens,
        shard: a.shard,
        max_batch: 1,
        step_tokens: a.step_tokens,
        share_prefixes: !a.no_share_prefix,
    };
    check_batch_flags(a.max_batch, a.step_tokens)?;
    // Before the model loads: a second batch on the same files refuses at once.
    let locks = JobLocks::acquire(&opts)?;
    let wanted = BatchWanted { max_batch: a.max_batch, step_tokens: a.step_tokens };
    let loaded = load_with(&a.model, Some(wanted), a.spec.draft_bytes()?)?;
    let text = load_text(&loaded.dir)?;
    let max_batch = a.max_batch.unwrap_or_else(|| loaded.default_max_batch());
    let opts = JobOptions { max_batch, ..opts };
    eprintln!("[ollm] batch: up to {max_batch} requests at a time");
    let speculate = a.spec.params(&loaded, &text.tokenizer)?;
    let model = ollm_engine::ChatModel { speculate, ..loaded.chat_model(text) };

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} requests  {per_sec}  ETA {eta}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut tokens = 0usize;
    let summary = run_job(&model, &opts, &locks, &mut |p| match p {
        Progress::Planned { pending, already_done, torn_bytes } => {
            if torn_bytes > 0 {
                bar.suspend(|| eprintln!("[ollm] cut a torn last line ({torn_bytes} bytes) from {}", out.display()));
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
    if summary.peak_kv_bytes > 0 {
        eprintln!(
            "[ollm] batch: KV cache peak {} held ({} without prefix sharing); {} requests attached to a shared prefix",
            crate::resources::human_bytes(summary.peak_kv_bytes),
            crate::resources::human_bytes(summary.peak_kv_unshared_bytes),
            summary.shared_attached
        );
    }
    eprintln!(
        "[ollm] batch: {} completed, {} already done, {} failed, {} invalid lines, {} duplicate ids{}; results in {}{}",
        summary.completed,
        summary.already_done,
        summary.failed,
        summary.invalid_lines,
        summary.duplicate_ids,
        a.shard.map_or_else(String::new, |s| format!(
            " (shard {} of {}; {} requests left to the other shards)",
            s.index, s.count, summary.other_shards
        )),
        out.display(),
        if summary.failed + summary.invalid_lines + summary.duplicate_ids > 0 {
            format!(", errors in {}", errors.display())
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `--max-batch` and `--step-tokens` within what the engine is sized for.
pub fn check_batch_flags(max_batch: Option<usize>, step_tokens: usize) -> anyhow::Result<()> {
    if let Some(n) = max_batch
        && !(1..=crate::loaded::MAX_BATCH).contains(&n)
    {
        anyhow::bail!("--max-batch must be between 1 and {} (got {n})", crate::loaded::MAX_BATCH);
    }
    let most = ollm_engine::session::DEFAULT_PREFILL_CHUNK;
    if step_tokens == 0 || step_tokens > most {
        anyhow::bail!(
            "--step-tokens/--prefill-chunk must be between 1 and {most} (the planner sizes activations for a step of at most that)"
        );
    }
    Ok(())
}

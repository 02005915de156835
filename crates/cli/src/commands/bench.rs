//! `ollm bench`: decode speed against the memory-bandwidth bound measured in the same run, and
//! `ollm bench ops`: the GPU ops that bound LLM speed against HBM bandwidth and cuBLAS's GEMM
//! rate measured in the same run (the logic is `ollm_ops::cuda::bench`).
//!
//! Decoding one token reads every weight the token touches once, so on a CPU the best possible
//! rate is (memory bandwidth) / (weight bytes read per token + KV bytes read). The bench asks the
//! backend for its measured bandwidth (`Backend::measure_bandwidth`), then times greedy decoding, and
//! prints the achieved rate, the bound and their ratio.

use std::path::PathBuf;
use std::time::Instant;

use ollm_models::plan::{Tier, tier_bytes, token_time};
use ollm_models::registry::model_bytes;

use crate::planning::{calibrate, describe, largest_weights_file};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ollm_engine::Session;
use ollm_engine::sampling::argmax;
use ollm_ops::cuda::bench::{OpsBenchConfig, OpsBenchReport, run_ops_bench};
use ollm_ops::cuda::vram::gib;

use super::{DeviceArg, ModelArgs, parse_device};
use crate::loaded::{Chosen, backend, load};
use crate::resources::human_bytes;

/// `ollm bench --model DIR` (decode speed) or `ollm bench ops` (GPU ops). `--model` is
/// required unless the `ops` subcommand is given (clap detects an optional flattened group only
/// when it has no nested flatten, hence the model and the decode options side by side).
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: Option<BenchWhat>,
    #[command(flatten)]
    pub model: Option<ModelArgs>,
    #[command(flatten)]
    pub decode: DecodeBenchArgs,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Time the GPU ops that bound LLM speed (decode and prefill matmul, prefill and decode
    /// attention at 32K) against HBM bandwidth and cuBLAS's bf16 GEMM rate measured in the same
    /// run. Needs a CUDA GPU.
    Ops(OpsArgs),
}

#[derive(Debug, Args)]
pub struct OpsArgs {
    /// The GPU: cuda or cuda:N.
    #[arg(long, value_name = "DEVICE", default_value = "cuda", value_parser = parse_device)]
    pub device: DeviceArg,
    /// Most GPU memory to use, CUDA context included (e.g. 8GiB, 512MiB).
    #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_size)]
    pub vram_budget: Option<u64>,
    /// Timed runs per op; the median is reported.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// An op whose runs would take longer than this gets fewer runs (at least 3), said in the table.
    #[arg(long, default_value_t = 60.0)]
    pub max_row_seconds: f64,
    /// Prompt length of the prefill attention row and context of the decode attention row.
    #[arg(long, default_value_t = 32768)]
    pub attn_tokens: usize,
    /// Also write the rows as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

/// Options of `ollm bench --model DIR`: decode tok/s against the memory-bandwidth bound.
#[derive(Debug, Args)]
pub struct DecodeBenchArgs {
    /// Prompt tokens before decoding starts.
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    /// Tokens to decode (timed).
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Timed decode windows of --tokens each; the best is reported (like the bandwidth, so a
    /// busy machine biases neither side of the ratio).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Size of the buffer streamed to measure memory bandwidth, MiB.
    #[arg(long, default_value_t = 1024)]
    pub bandwidth_mib: usize,
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    match (a.what, a.model) {
        (Some(BenchWhat::Ops(o)), _) => run_ops(o),
        (None, Some(m)) => run_decode(&m, a.decode),
        (None, None) => bail!("give --model DIR for the decode bench, or run `ollm bench ops` for the GPU ops"),
    }
}

fn run_decode(model: &ModelArgs, a: DecodeBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.tokens >= 2 && a.prompt_tokens >= 1, "--tokens must be >= 2 and --prompt-tokens >= 1");
    let loaded = load(model)?;
    let bandwidth = loaded.backend.measure_bandwidth(a.bandwidth_mib * 1024 * 1024)?;
    let info = loaded.model.info().clone();
    anyhow::ensure!(
        a.repeats >= 1 && a.prompt_tokens + 1 + a.tokens * a.repeats <= info.max_positions,
        "--repeats must be >= 1 and --prompt-tokens + --tokens x --repeats must fit the model's context of {}",
        info.max_positions
    );
    // A fixed, varied prompt (ids spread over the vocabulary).
    let prompt: Vec<u32> = (0..a.prompt_tokens).map(|i| ((7 * i * i + 3 * i + 1) % info.vocab_size) as u32).collect();
    let mut session = Session::new(loaded.model.clone())?;
    let mut logits = session.prefill(&prompt)?;
    // One untimed step warms caches and thread pools.
    logits = session.step(argmax(&logits))?;
    let mut windows = Vec::with_capacity(a.repeats);
    for _ in 0..a.repeats {
        let t = Instant::now();
        for _ in 0..a.tokens {
            logits = session.step(argmax(&logits))?;
        }
        windows.push(a.tokens as f64 / t.elapsed().as_secs_f64());
    }
    let tok_s = windows.iter().copied().fold(0.0, f64::max);
    // Bytes read per decoded token at the mean context of the timed steps.
    let mean_ctx = a.prompt_tokens + 1 + a.tokens * a.repeats / 2;
    let bytes = info.weight_bytes_per_token + info.kv_bytes_per_position * mean_ctx as u64;
    let bound = bandwidth / bytes as f64;
    println!(
        "model           {} ({} layers, {} weights)",
        loaded.dir.display(),
        info.n_layers,
        human_bytes(info.weight_bytes)
    );
    println!("device          {}", loaded.model_backend_name);
    if let Some(peak) = loaded.peak_vram_bytes() {
        println!("peak VRAM       {} (driver, CUDA context included)", gib(peak));
    }
    println!("threads         {}", rayon::current_num_threads());
    println!(
        "memory bw       {:.2} GB/s (measured on the device, best of 5 over {} MiB)",
        bandwidth / 1e9,
        a.bandwidth_mib
    );
    println!(
        "bytes/token     {} (weights {} + KV at context {mean_ctx})",
        human_bytes(bytes),
        human_bytes(info.weight_bytes_per_token)
    );
    let all: Vec<String> = windows.iter().map(|w| format!("{w:.1}")).collect();
    println!(
        "decode          {tok_s:.2} tok/s (best of {} windows of {} tokens: {})",
        a.repeats,
        a.tokens,
        all.join(", ")
    );
    let streamed = loaded.plan.as_ref().filter(|p| p.tiers.iter().any(|t| *t != Tier::Vram));
    let Some(plan) = streamed else {
        println!("bound           {bound:.2} tok/s (bandwidth / bytes per token)");
        println!("ratio           {:.1}% of the bound", 100.0 * tok_s / bound);
        return Ok(());
    };
    // Streaming: the bound is the slowest tier, each measured now on this machine.
    let (bw, _) = calibrate(loaded.backend.as_ref(), &largest_weights_file(&loaded.dir)?, true)?;
    let mb = model_bytes(&loaded.dir)?;
    let kv = info.kv_bytes_per_position * mean_ctx as u64;
    let t = token_time(&plan.tiers, &mb.layer_bytes, mb.resident_bytes + kv, bw);
    let per_token = 1.0 / tok_s;
    let disk = tier_bytes(&plan.tiers, &mb.layer_bytes, Tier::Disk);
    let copied = disk + tier_bytes(&plan.tiers, &mb.layer_bytes, Tier::Ram);
    println!("placement       {}", describe(plan));
    println!(
        "tiers           disk {:.2} GB/s (O_DIRECT, 4 readers), host→device {:.1} GB/s (pinned), device {:.0} GB/s",
        bw.disk / 1e9,
        bw.host_to_device / 1e9,
        bw.device / 1e9
    );
    println!(
        "bound           {:.3} s/token = slowest of disk {} / {:.2} GB/s = {:.3} s, copies {} / {:.1} GB/s = {:.3} s, compute {:.3} s",
        t.bound_s(),
        human_bytes(disk),
        bw.disk / 1e9,
        t.disk_s,
        human_bytes(copied),
        bw.host_to_device / 1e9,
        t.copy_s,
        t.compute_s
    );
    println!("time/token      {per_token:.3} s ({tok_s:.3} tok/s)");
    println!("ratio           {:.2} × the bound (1.00 = at the bound)", per_token / t.bound_s());
    if let Some(line) = loaded.stream_line() {
        println!("{line}");
    }
    Ok(())
}

fn run_ops(a: OpsArgs) -> anyhow::Result<()> {
    let DeviceArg::Cuda(n) = a.device else {
        bail!("--device {:?}: ollm bench ops runs on a GPU; give cuda or cuda:N", a.device);
    };
    anyhow::ensure!(a.runs >= 1 && a.attn_tokens >= 1, "--runs and --attn-tokens must be >= 1");
    anyhow::ensure!(a.max_row_seconds > 0.0, "--max-row-seconds must be > 0");
    let Chosen { cuda, .. } = backend(DeviceArg::Cuda(n), a.vram_budget).context("ollm bench ops needs a CUDA GPU")?;
    let Some(be) = cuda else { bail!("ollm bench ops needs a CUDA GPU") };
    let cfg = OpsBenchConfig {
        runs: a.runs,
        max_row_seconds: a.max_row_seconds,
        attn_tokens: a.attn_tokens,
        ..OpsBenchConfig::default()
    };
    let report = run_ops_bench(&be, &cfg, &mut |what| eprintln!("[ollm] measuring {what}"))?;
    print!("{}", report.table());
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report_json(&report))?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing --json {}", path.display()))?;
    }
    Ok(())
}

/// The report as JSON: device, date, both bounds, and one object per row.
fn report_json(r: &OpsBenchReport) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = r
        .rows
        .iter()
        .map(|row| {
            serde_json::json!({
                "op": row.op,
                "shape": row.shape,
                "runs": row.runs,
                "calls_per_run": row.calls_per_run,
                "median_ms": row.median_ms,
                "achieved": row.achieved,
                "bound": row.bound,
                "unit": row.unit,
                "bound_name": row.bound_name,
                "percent_of_bound": row.percent_of_bound(),
                "error": row.error,
            })
        })
        .collect();
    serde_json::json!({
        "device": r.device,
        "date": r.date,
        "hbm_gb_per_s": r.hbm_bytes_per_s / 1e9,
        "gemm_tflop_per_s": r.gemm_flops_per_s / 1e12,
        "peak_vram_bytes": r.peak_vram_bytes,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Top {
        Bench(BenchArgs),
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let mut v = vec!["ollm", "bench"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| match c.cmd {
            Top::Bench(b) => b,
        })
    }

    #[test]
    fn decode_bench_and_ops_parse_as_a_user_expects() {
        let b = parse(&["--model", "m", "--tokens", "4"]).expect("decode bench");
        assert!(b.what.is_none() && b.model.as_ref().is_some_and(|m| m.model == "m") && b.decode.tokens == 4);
        let b = parse(&["ops", "--runs", "3", "--device", "cuda:1"]).expect("ops");
        let Some(BenchWhat::Ops(o)) = b.what else { panic!("ops expected") };
        assert_eq!((o.runs, o.device), (3, DeviceArg::Cuda(1)));
        assert!(b.model.is_none());
        let e = parse(&[]).expect_err("neither");
        assert!(e.to_string().contains("--model"), "{e}");
        assert!(parse(&["--model", "m", "ops"]).is_err(), "decode options and ops do not mix");
        assert!(parse(&["ops", "--model", "m"]).is_err());
    }

    #[test]
    fn json_report_has_every_row_and_both_bounds() {
        use ollm_ops::cuda::bench::BenchRow;
        let row = BenchRow {
            op: "decode attention (backend)".into(),
            shape: "1 token at context 32768".into(),
            runs: 20,
            calls_per_run: 10,
            median_ms: 0.1,
            achieved: 1340.0,
            bound: 2680.0,
            unit: "GB/s",
            bound_name: "HBM copy",
            error: None,
        };
        let r = OpsBenchReport {
            device: "cuda:0 (x)".into(),
            date: "2026-11-24".into(),
            hbm_bytes_per_s: 2.68e12,
            gemm_flops_per_s: 7.5e14,
            rows: vec![row],
            peak_vram_bytes: 1 << 30,
        };
        let j = report_json(&r);
        assert_eq!(j["hbm_gb_per_s"], 2680.0);
        assert_eq!(j["gemm_tflop_per_s"], 750.0);
        assert_eq!(j["rows"][0]["percent_of_bound"], 50.0);
        assert_eq!(j["rows"][0]["error"], serde_json::Value::Null);
    }
}

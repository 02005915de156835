//! `ollm bench`: decode speed against the memory-bandwidth bound measured in the same run, and
//! `ollm bench ops`: the GPU ops that bound LLM speed against HBM bandwidth and cuBLAS's GEMM
//! rate measured in the same run (the logic is `crate::bench_ops`).
//!
//! Decoding one token reads every weight the token touches once, so on a CPU the best possible
//! rate is (memory bandwidth) / (weight bytes read per token + KV bytes read). The bench measures
//! the backend's bandwidth (`ollm_residency::measure::memory_bandwidth`), then times greedy decoding, and
//! prints the achieved rate, the bound and their ratio.

use std::path::PathBuf;
use std::time::Instant;

use ollm_models::registry::{layer_parts, model_bytes};
use ollm_residency::plan::{Bandwidths, Tier, tier_bytes, token_time};
use ollm_residency::stream::read_pass;

use crate::planning::describe;
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ollm_engine::Session;
use ollm_engine::sampling::argmax;
use ollm_ops::bytes::gib;
use ollm_ops::cpu::CpuBackend;
use ollm_ops::cuda::CudaBackend;

use super::{DeviceArg, ModelArgs, parse_device};
use crate::bench_ops::{OpsBenchConfig, OpsBenchReport, gemm_rate, run_ops_bench};
use crate::loaded::{Chosen, backend, load};
use crate::resources::human_bytes;
use ollm_residency::measure::{HostReader, Read, host_to_device_bandwidth, memory_bandwidth};

/// MiB read after each decode step on the host (a few ms at tens of GB/s; far past the caches).
const INTERLEAVED_READ_MIB: usize = 256;

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
    /// Size of the buffer streamed to measure memory bandwidth, MiB (a streamed model's
    /// host-to-device test uses at most 256 of them, to fit beside the model).
    #[arg(long, default_value_t = 1024)]
    pub bandwidth_mib: usize,
    /// Tokens of a question appended to the --prompt-tokens prompt, drawn from
    /// --question-seed: with --prefix-cache, a second run with another seed shares the prompt
    /// and asks something new (the prefix-cache benchmark).
    #[arg(long, default_value_t = 0)]
    pub question_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub question_seed: u64,
    /// Questions asked of the prompt one after another in this process (seeds --question-seed,
    /// +1, ...): each later one keeps the prompt in memory and computes only its question.
    #[arg(long, default_value_t = 1)]
    pub questions: usize,
    /// Speculative decoding against plain decoding, window by window in the same run
    /// (`crate::bench_spec`): each window answers the prompt twice, greedy.
    #[command(flatten)]
    pub spec: crate::speculation::SpecArgs,
    /// With --speculate: the prompt is this file's text (a document and a question about it)
    /// instead of --prompt-tokens synthetic tokens.
    #[arg(long, value_name = "PATH", requires = "speculate")]
    pub prompt_file: Option<PathBuf>,
    /// With --prompt-file: wrap the text as a user message in the model's chat template.
    #[arg(long, requires = "prompt_file")]
    pub chat: bool,
    /// Batch sizes (e.g. 1,4,16,64): generate --requests requests through the batching scheduler
    /// at each size, decode tok/s against the memory and compute bounds measured in the same run.
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub batch: Vec<usize>,
    /// Tokens one step of the --batch bench feeds at most (a decode token per sequence, then
    /// prompt chunks).
    #[arg(long, default_value_t = ollm_server::SERVER_PREFILL_CHUNK)]
    pub step_tokens: usize,
    /// Requests of the --batch bench at each batch size (0: as many as the batch size).
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Verification pass cost: time one forward of k new tokens (k = 1,4,16,64,256 ...) after a
    /// --prompt-tokens context, each against k = 1 (the cost of a speculative target pass).
    #[arg(long, value_delimiter = ',', value_name = "K,...")]
    pub pass_cost: Vec<usize>,
    /// Long context: prefill --long-prefill tokens (timed), fill the cache to N positions, then
    /// time --tokens decode steps there and one layer's attention alone, with the KV in f32 and
    /// in bf16 on the CPU (`--cpu-kv` picks one), each against the memory-bandwidth bound
    /// measured in the same run. The model must hold N + --tokens + 1 positions.
    #[arg(long, value_name = "N")]
    pub long_context: Option<usize>,
    /// Prompt tokens of the --long-context prefill.
    #[arg(long, default_value_t = 8192, requires = "long_context")]
    pub long_prefill: usize,
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    match (a.what, a.model) {
        (Some(BenchWhat::Ops(o)), _) => run_ops(o),
        (None, Some(m)) if a.decode.long_context.is_some() => {
            let d = &a.decode;
            let b = super::bench_long::LongBench {
                context: d.long_context.unwrap_or_default(),
                prefill: d.long_prefill,
                tokens: d.tokens,
                bandwidth_mib: d.bandwidth_mib,
            };
            super::bench_long::run(&m, &b)
        }
        (None, Some(m)) if !a.decode.pass_cost.is_empty() => {
            super::bench_batch::pass_cost(&m, &a.decode.pass_cost, a.decode.prompt_tokens, a.decode.repeats)
        }
        (None, Some(m)) if !a.decode.batch.is_empty() => {
            let d = a.decode;
            let b = super::bench_batch::BatchBench {
                sizes: d.batch,
                requests: d.requests,
                prompt_tokens: d.prompt_tokens,
                tokens: d.tokens,
                bandwidth_mib: d.bandwidth_mib,
                step_tokens: d.step_tokens,
            };
            super::bench_batch::run(&m, &b)
        }
        (None, Some(m)) => run_decode(&m, a.decode),
        (None, None) => bail!("give --model DIR for the decode bench, or run `ollm bench ops` for the GPU ops"),
    }
}

fn run_decode(model: &ModelArgs, a: DecodeBenchArgs) -> anyhow::Result<()> {
    if a.spec.speculate.is_some() {
        return crate::bench_spec::run(model, &a);
    }
    anyhow::ensure!(a.tokens >= 2 && a.prompt_tokens >= 1, "--tokens must be >= 2 and --prompt-tokens >= 1");
    // The KV cache is planned for the whole run (prompt, warm-up step and every window).
    let mut model = model.clone();
    let needed = a.prompt_tokens + a.question_tokens + 1 + a.tokens * a.repeats;
    model.max_context = Some(model.max_context.unwrap_or(0).max(needed));
    let loaded = load(&model)?;
    let streamed = loaded.plan.clone().filter(|p| p.experts.is_some() || p.tiers.iter().any(|t| *t != Tier::Vram));
    // Measured right after loading, before any activation exists; a streamed model runs in a
    // tight budget, so its tests stay small.
    let mib = if streamed.is_some() { a.bandwidth_mib.min(256) } else { a.bandwidth_mib };
    let bandwidth = memory_bandwidth(loaded.backend.as_ref(), mib * 1024 * 1024)?;
    let gemm = match (loaded.backend.as_any().downcast_ref::<CudaBackend>(), &streamed) {
        (Some(c), Some(_)) => Some(gemm_rate(c, 4096, 10)?),
        _ => None,
    };
    let info = loaded.model.info().clone();
    anyhow::ensure!(
        a.repeats >= 1 && needed <= info.max_positions,
        "--repeats must be >= 1 and --prompt-tokens + --question-tokens + --tokens x --repeats must fit the model's context of {}",
        info.max_positions
    );
    // A fixed, varied prompt (ids spread over the vocabulary), then the question.
    let mut prompt: Vec<u32> =
        (0..a.prompt_tokens).map(|i| ((7 * i * i + 3 * i + 1) % info.vocab_size) as u32).collect();
    let doc_len = prompt.len();
    prompt.extend(question(a.question_seed, a.question_tokens, info.vocab_size));
    let mut session = loaded.session()?;
    let t = Instant::now();
    let (mut logits, restored) = session.prefill_cached(&prompt)?;
    let first = argmax(&logits);
    let prefill_s = t.elapsed().as_secs_f64();
    let (prefill_expert_copies, prefill_expert_disk) =
        loaded.model.expert_stats().map_or((0, 0), |s| (s.copy_bytes, s.disk_bytes));
    // One untimed step warms caches and thread pools; then the prompt's blocks are stored.
    logits = session.step(first)?;
    if session.prefix_cache().is_some() {
        prefix_lines(&mut session, restored.as_ref(), prompt.len(), prefill_s)?;
    }
    for q in 1..a.questions {
        // Another question of the same prompt, in the same session.
        let mut next = prompt[..doc_len].to_vec();
        next.extend(question(a.question_seed + q as u64, a.question_tokens, info.vocab_size));
        let kept = session.rewind(&next);
        let t = Instant::now();
        let l = session.prefill(&next[kept..])?;
        let first = argmax(&l);
        let ttft = t.elapsed().as_secs_f64();
        println!(
            "question {}      kept {kept} of {} prompt tokens in memory, computed {}; time to first token {ttft:.3} s = {:.1}% of the first question's",
            q + 1,
            next.len(),
            next.len() - kept,
            100.0 * ttft / prefill_s
        );
        logits = session.step(first)?;
    }
    let reused = restored.map_or(0, |r| r.tokens);
    if let Some(plan) = streamed {
        let bounds = Measured {
            device: bandwidth,
            gemm,
            prefill_s,
            computed: prompt.len() - reused,
            reused,
            expert_copies: prefill_expert_copies,
            expert_disk: prefill_expert_disk,
        };
        return streaming_bench(&loaded, &plan, &mut session, logits, &a, bounds);
    }
    // On the host a read of memory follows every decode step, timed apart from it: a shared
    // machine's rate moves within seconds (37 or 67 GB/s on the CI VM as its neighbours come and
    // go), so each window's bound is the bandwidth measured at the same moments as its steps.
    let reader = match loaded.backend.memory_kind() {
        ollm_ops::MemoryKind::Host => Some(HostReader::new(loaded.backend.as_ref(), INTERLEAVED_READ_MIB << 20)?),
        ollm_ops::MemoryKind::Device => None,
    };
    let mut windows = Vec::with_capacity(a.repeats);
    let mut window_rates = Vec::with_capacity(a.repeats);
    for _ in 0..a.repeats {
        let (mut step_s, mut read) = (0.0, Read::default());
        for _ in 0..a.tokens {
            let t = Instant::now();
            logits = session.step(argmax(&logits))?;
            step_s += t.elapsed().as_secs_f64();
            if let Some(r) = &reader {
                let one = r.read();
                (read.bytes, read.secs) = (read.bytes + one.bytes, read.secs + one.secs);
            }
        }
        windows.push(a.tokens as f64 / step_s);
        window_rates.push(read.rate());
    }
    let tok_s = windows.iter().copied().fold(0.0, f64::max);
    print_header(&loaded, &a, bandwidth);
    if let Some(cpu) = loaded.backend.as_any().downcast_ref::<CpuBackend>() {
        prefill_line_cpu(cpu, &info, prompt.len() - reused, prefill_s)?;
    }
    // Bytes read per decoded token at the mean context of the timed steps.
    let mean_ctx = prompt.len() + 1 + a.tokens * a.repeats / 2;
    let bytes = info.weight_bytes_per_token + info.kv_read_bytes(mean_ctx);
    let bound = bandwidth / bytes as f64;
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
    if reader.is_some() {
        // Each window against the bandwidth read between its own steps.
        let mut ratios: Vec<f64> = windows.iter().zip(&window_rates).map(|(w, r)| w * bytes as f64 / r).collect();
        let cells: Vec<String> = windows
            .iter()
            .zip(&window_rates)
            .zip(&ratios)
            .map(|((w, r), q)| format!("{w:.1} tok/s at {:.1} GB/s = {:.1}%", r / 1e9, 100.0 * q))
            .collect();
        println!("windows         {} (each against the memory read between its steps)", cells.join("; "));
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        let best = ratios.last().copied().unwrap_or(0.0);
        println!("bound           {bound:.2} tok/s (bandwidth measured before the windows / bytes per token)");
        println!(
            "ratio           {:.1}% of the bound read between the steps (median of {} windows; best {:.1}%)",
            100.0 * median,
            ratios.len(),
            100.0 * best
        );
    } else {
        println!("bound           {bound:.2} tok/s (bandwidth / bytes per token)");
        println!("ratio           {:.1}% of the bound", 100.0 * tok_s / bound);
    }
    if let Some(peak) = loaded.peak_vram_bytes() {
        println!("peak VRAM       {} (driver, CUDA context included)", gib(peak));
    }
    Ok(())
}

/// The CPU's prefill against its matmul bound: the prompt's matmul FLOPs (2 per weight per
/// token, the output head for one token; attention left out) at the rate this backend's matmul
/// reaches on a Llama-shaped [512, 2048] · [2048, 2048]ᵀ bf16 problem, measured now.
fn prefill_line_cpu(cpu: &CpuBackend, info: &ollm_models::ModelInfo, tokens: usize, secs: f64) -> anyhow::Result<()> {
    use ollm_ops::{Compute, DType, Memory};
    let (t, k, n) = (512usize, 2048usize, 2048usize);
    let x = cpu.upload_f32(vec![t, k], &vec![0.01f32; t * k])?;
    let w = cpu.alloc(vec![n, k], DType::BF16)?;
    let mut out = cpu.zeros(vec![t, n])?;
    cpu.matmul(&x, &w, None, &mut out)?;
    let reps = 5;
    let start = Instant::now();
    for _ in 0..reps {
        cpu.matmul(&x, &w, None, &mut out)?;
    }
    let rate = 2.0 * (t * k * n * reps) as f64 / start.elapsed().as_secs_f64();
    // bf16 weights: 2 bytes each; the output head (vocab × hidden) runs for the last token only.
    let head = (info.vocab_size * info.hidden_size) as f64;
    let params = info.weight_bytes_per_token as f64 / 2.0;
    let flops = 2.0 * ((params - head).max(0.0) * tokens as f64 + head);
    let bound = flops / rate;
    println!("cpu kernels     {}", cpu.describe());
    println!("matmul rate     {:.1} GFLOP/s (bf16 weights, [512, 2048] · [2048, 2048]ᵀ, measured now)", rate / 1e9);
    println!(
        "prefill         {tokens} tokens in {secs:.3} s = {:.1} tok/s; bound {bound:.3} s at the matmul rate ({:.1}% of it; attention not counted)",
        tokens as f64 / secs,
        100.0 * bound / secs
    );
    Ok(())
}

/// What `run_decode` measured before the streaming bench's windows.
struct Measured {
    /// Device memory bandwidth, bytes/s.
    device: f64,
    /// cuBLAS bf16 GEMM rate, FLOP/s (GPU only).
    gemm: Option<f64>,
    /// Time of the prompt's prefill (to the first token's logits).
    prefill_s: f64,
    /// Prompt tokens the prefill computed, and those it loaded from the prefix cache first.
    computed: usize,
    reused: usize,
    /// Bytes of experts the prefill copied to the device (MoE models with an expert cache),
    /// and read from disk first.
    expert_copies: u64,
    expert_disk: u64,
}

/// `n` question tokens drawn from `seed` (xorshift), spread over the vocabulary.
fn question(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

/// The prefix cache's figures: what the prefill loaded against a direct read of the same
/// entries measured right after (the load's bound), then the time to store the prompt.
fn prefix_lines(
    session: &mut Session,
    restored: Option<&ollm_kv::Restored>,
    prompt: usize,
    ttft: f64,
) -> anyhow::Result<()> {
    let cache = session.prefix_cache().context("internal: no prefix cache")?;
    if let Some(r) = restored.filter(|r| r.blocks > 0) {
        let first = std::fs::read_dir(cache.dir())?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("000000-")));
        let disk = match first {
            Some(p) => ollm_io::direct::measure_read_bandwidth(&p, u64::MAX, ollm_io::direct::READERS)?.0,
            None => f64::NAN,
        };
        let bound = r.bytes as f64 / disk;
        println!(
            "prefix cache    loaded {} of {prompt} prompt tokens ({} blocks, {}) in {:.3} s = {:.2} GB/s; bound {bound:.3} s at the entries' direct-read rate {:.2} GB/s → {:.2} × the bound",
            r.tokens,
            r.blocks,
            human_bytes(r.bytes),
            r.elapsed.as_secs_f64(),
            r.bytes as f64 / r.elapsed.as_secs_f64() / 1e9,
            disk / 1e9,
            r.elapsed.as_secs_f64() / bound
        );
        for line in &r.rejected {
            println!("                {line}");
        }
    }
    println!("time to first   {ttft:.3} s (prefix load + prefill of the rest + first token)");
    let stored = session.store_prefix()?.context("internal: no prefix cache")?;
    println!(
        "prefix store    {} new blocks ({}) in {:.3} s = {:.2} GB/s, {} already there, {} evicted",
        stored.blocks,
        human_bytes(stored.bytes),
        stored.elapsed.as_secs_f64(),
        stored.bytes as f64 / stored.elapsed.as_secs_f64() / 1e9,
        stored.present,
        stored.evicted
    );
    Ok(())
}

fn print_header(loaded: &crate::loaded::Loaded, a: &DecodeBenchArgs, bandwidth: f64) {
    let info = loaded.model.info();
    println!(
        "model           {} ({} layers, {} weights)",
        loaded.dir.display(),
        info.n_layers,
        human_bytes(info.weight_bytes)
    );
    println!("device          {}", loaded.model_backend_name);
    println!("threads         {}", rayon::current_num_threads());
    println!(
        "memory bw       {:.2} GB/s (measured on the device, best of {} over {} MiB)",
        bandwidth / 1e9,
        ollm_residency::measure::bandwidth_runs(loaded.backend.as_ref()),
        a.bandwidth_mib
    );
}

/// Waits until the streamer has stopped reading ahead (no layer passed for 300 ms, at most
/// 10 s), so a bound measurement does not share the disk or the copy engine with it.
fn settle(loaded: &crate::loaded::Loaded) {
    let passed = || loaded.model.stream_stats().map_or(0, |s| s.layers_streamed);
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let mut last = passed();
    while Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let now = passed();
        if now == last {
            return;
        }
        last = now;
    }
}

/// Decode of a streamed model against the slowest tier, with the bound measured between the
/// timed windows: after each window (once the streamer is idle) one O_DIRECT pass over exactly
/// the disk-tier layers' spans, read the way the streamer reads them, and a pinned
/// host-to-device copy test. Each window is compared with the measurements right after it, so
/// a disk whose speed drifts during the run biases neither side of the ratio.
fn streaming_bench(
    loaded: &crate::loaded::Loaded,
    plan: &ollm_residency::plan::Plan,
    session: &mut Session,
    mut logits: Vec<f32>,
    a: &DecodeBenchArgs,
    m: Measured,
) -> anyhow::Result<()> {
    let device_bw = m.device;
    let info = loaded.model.info().clone();
    let mb = model_bytes(&loaded.dir)?;
    let disk_layers: Vec<usize> = (0..plan.tiers.len()).filter(|&l| plan.tiers[l] == Tier::Disk).collect();
    let (files, parts) = layer_parts(&loaded.dir, &disk_layers)?;
    let disk = tier_bytes(&plan.tiers, &mb.layer_bytes, Tier::Disk);
    let copied = disk + tier_bytes(&plan.tiers, &mb.layer_bytes, Tier::Ram);
    // Small enough to fit beside the model in a tight budget, large enough to amortise.
    let h2d_test = (a.bandwidth_mib * 1024 * 1024).min(256 << 20);
    print_header(loaded, a, device_bw);
    println!("placement       {}", describe(plan, loaded.backend.memory_kind()));
    if plan.kv.is_some() {
        println!(
            "KV cache        off the device: {} per position copied in every token (counted in the copies below)",
            human_bytes(info.kv_bytes_per_position)
        );
    }
    println!(
        "per token       disk {} over {} layers, copies {}, device reads {} + KV",
        human_bytes(disk),
        disk_layers.len(),
        human_bytes(copied),
        human_bytes(mb.resident_bytes + tier_bytes(&plan.tiers, &mb.layer_bytes, Tier::Vram))
    );
    println!(
        "{:>6} {:>11} {:>12} {:>12} {:>11} {:>7}",
        "window", "s/token", "disk GB/s", "h2d GB/s", "bound s", "ratio"
    );
    if let Some(e) = &mb.experts {
        println!(
            "experts         {} of {} per token ({} each); {} device slots; the bound counts the copies and reads each window made",
            e.per_token,
            e.count,
            human_bytes(e.unit),
            plan.experts.as_ref().map_or(e.count, |x| x.slots)
        );
    }
    // Experts read from disk are bounded by the disk's direct-read rate, measured once.
    let expert_disk_bw = match plan.experts.as_ref().filter(|e| e.ram_layers.iter().any(|r| !r)) {
        Some(_) => {
            let f = crate::planning::largest_weights_file(&loaded.dir)?;
            Some(ollm_io::direct::measure_read_bandwidth(&f, 1 << 30, ollm_io::direct::READERS)?.0)
        }
        None => None,
    };
    let mut ratios = Vec::with_capacity(a.repeats);
    let mut first_bw = None;
    for r in 0..a.repeats {
        let before = loaded.model.expert_stats();
        let t = Instant::now();
        for _ in 0..a.tokens {
            logits = session.step(argmax(&logits))?;
        }
        let per_token = t.elapsed().as_secs_f64() / a.tokens as f64;
        let after = loaded.model.expert_stats();
        settle(loaded);
        let pass = if parts.is_empty() { None } else { Some(read_pass(&files, &parts)?) };
        if let Some(p) = pass.filter(|p| !p.direct) {
            eprintln!(
                "[ollm] note: the filesystem refused O_DIRECT; the disk figure includes the page cache ({} B)",
                p.bytes
            );
        }
        let h2d = host_to_device_bandwidth(loaded.backend.as_ref(), h2d_test)?;
        let bw = Bandwidths {
            device: device_bw,
            host_to_device: h2d,
            disk: pass.map_or(f64::INFINITY, |p| p.bytes_per_s()),
        };
        let ctx = m.computed + m.reused + 1 + a.tokens * (r + 1) - a.tokens / 2;
        let kv = info.kv_read_bytes(ctx);
        let mut bound = token_time(&plan.tiers, &mb.layer_bytes, mb.resident_bytes + kv, bw);
        if let Some(k) = plan.kv {
            // An offloaded cache comes over every token as well: from pinned RAM up to its
            // budget, from the spill file beyond it.
            let in_ram = kv.min(k.ram_bytes);
            bound.copy_s += kv as f64 / bw.host_to_device;
            bound.disk_s += (kv - in_ram) as f64 / bw.disk;
        }
        if let (Some(b), Some(e), Some(x)) = (before, after, &mb.experts) {
            // Routed experts read on the device; those a slot did not hold copied (from RAM
            // or, read from disk first, through staging).
            let n = a.tokens as f64;
            bound.compute_s += x.per_token as f64 * x.unit as f64 / bw.device;
            // Prefetched copies no forward used (`--expert-prefetch`) are bus time the exact
            // routing would not have spent: they count against the run, not in its bound.
            let (prefetched, prefetch_used) = (e.prefetched - b.prefetched, e.prefetch_used - b.prefetch_used);
            let wasted = (prefetched - prefetch_used) * e.expert_bytes;
            let needed_copy = (e.copy_bytes - b.copy_bytes).saturating_sub(wasted);
            bound.copy_s += needed_copy as f64 / n / bw.host_to_device;
            if let Some(d) = expert_disk_bw {
                bound.disk_s += (e.disk_bytes - b.disk_bytes) as f64 / n / d;
            }
            let uses = (e.hits + e.ram_loads + e.disk_loads) - (b.hits + b.ram_loads + b.disk_loads) - prefetched;
            println!(
                "{:>6} experts: hit rate {:.1}% ({} uses; per token {} copied to the device, {} of it read from disk first)",
                "",
                100.0 * (e.hits - b.hits - prefetch_used) as f64 / uses.max(1) as f64,
                uses,
                human_bytes(needed_copy / a.tokens as u64),
                human_bytes((e.disk_bytes - b.disk_bytes) / a.tokens as u64),
            );
            if prefetched > 0 {
                println!(
                    "{:>6} prefetch: {prefetched} experts copied ahead, {prefetch_used} of them used ({:.1}%); {} per token wasted",
                    "",
                    100.0 * prefetch_used as f64 / prefetched as f64,
                    human_bytes(wasted / a.tokens as u64),
                );
            }
        }
        let ratio = per_token / bound.bound_s();
        ratios.push(ratio);
        first_bw.get_or_insert(bw);
        let disk_col = pass.map_or_else(|| "-".to_string(), |p| format!("{:.2}", p.bytes_per_s() / 1e9));
        println!(
            "{:>6} {per_token:>11.3} {disk_col:>12} {:>12.1} {:>11.3} {ratio:>6.2}×",
            r + 1,
            h2d / 1e9,
            bound.bound_s()
        );
    }
    prefill_line(&m, plan, &mb, &info, &first_bw, expert_disk_bw);
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "ratio           median {:.2} × the bound, worst {:.2} × over {} windows of {} tokens (bound = slowest of disk, copies, compute; 1.00 = at the bound)",
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
        a.repeats,
        a.tokens
    );
    if let Some(peak) = loaded.peak_vram_bytes() {
        println!("peak VRAM       {} (driver, CUDA context included)", gib(peak));
    }
    if let Some(line) = loaded.stream_line() {
        println!("{line}");
    }
    if let Some(line) = loaded.expert_line() {
        println!("{line}");
    }
    Ok(())
}

/// The prompt's prefill against its bound: every layer's weights moved once (disk and copies
/// at the first window's measured rates) or the matmul and attention FLOPs at cuBLAS's GEMM
/// rate, whichever is slower. Attention FLOPs count the causal half of QKᵀ and PV over the
/// computed tokens, plus all of it over positions loaded from the prefix cache (a
/// sliding-window layer: over its window), with heads × head dim = `q_dim`.
fn prefill_line(
    m: &Measured,
    plan: &ollm_residency::plan::Plan,
    mb: &ollm_models::registry::ModelBytes,
    info: &ollm_models::ModelInfo,
    bw: &Option<Bandwidths>,
    expert_disk_bw: Option<f64>,
) {
    let Some(bw) = bw else { return };
    let t = m.computed;
    let tok_s = t as f64 / m.prefill_s;
    let mut once = token_time(&plan.tiers, &mb.layer_bytes, mb.resident_bytes, *bw);
    once.copy_s += m.expert_copies as f64 / bw.host_to_device;
    // Experts read from disk go at the disk's measured direct-read rate (`bw.disk` is the
    // layers' pass, infinite when no layer is on disk).
    once.disk_s += m.expert_disk as f64 / expert_disk_bw.unwrap_or(bw.disk);
    // Parameters a token multiplies: the layers' (bf16) and, for MoE, its k experts per layer
    // (gate_up and down, 3·H·I each).
    let expert_params = mb.experts.map_or(0.0, |e| (e.per_token * 3 * mb.hidden_size * mb.intermediate_size) as f64);
    let params: f64 = mb.layer_bytes.iter().sum::<u64>() as f64 / 2.0 + expert_params;
    let (tf, r) = (t as f64, m.reused as f64);
    let (sliding, window) = mb.sliding_kv.map_or((0, 0), |(_, layers, w)| (layers, w));
    let q = mb.q_dim as f64;
    let full_attn = 2.0 * tf * (tf + 2.0 * r) * q * (info.n_layers - sliding) as f64;
    let sliding_attn = 4.0 * tf * (window as f64).min(tf + r) * q * sliding as f64;
    let flops = 2.0 * params * tf + full_attn + sliding_attn;
    let compute = m.gemm.map(|g| flops / g);
    let bound = once.disk_s.max(once.copy_s).max(compute.unwrap_or(0.0));
    println!(
        "prefill         {t} tokens in {:.3} s = {tok_s:.0} tok/s; bound {bound:.3} s = slowest of disk {:.3} s, copies {:.3} s, compute {} ({:.1} TFLOP at {}) → {:.2} × the bound",
        m.prefill_s,
        once.disk_s,
        once.copy_s,
        compute.map_or_else(|| "n/a".into(), |c| format!("{c:.3} s")),
        flops / 1e12,
        m.gemm.map_or_else(|| "no GPU".into(), |g| format!("{:.0} TFLOP/s cuBLAS bf16", g / 1e12)),
        m.prefill_s / bound.max(1e-12)
    );
}

fn run_ops(a: OpsArgs) -> anyhow::Result<()> {
    let DeviceArg::Cuda(n) = a.device else {
        bail!("--device {:?}: ollm bench ops runs on a GPU; give cuda or cuda:N", a.device);
    };
    anyhow::ensure!(a.runs >= 1 && a.attn_tokens >= 1, "--runs and --attn-tokens must be >= 1");
    anyhow::ensure!(a.max_row_seconds > 0.0, "--max-row-seconds must be > 0");
    let Chosen { backend } =
        backend(DeviceArg::Cuda(n), a.vram_budget, Default::default()).context("ollm bench ops needs a CUDA GPU")?;
    let Some(be) = backend.as_any().downcast_ref::<CudaBackend>() else { bail!("ollm bench ops needs a CUDA GPU") };
    let cfg = OpsBenchConfig {
        runs: a.runs,
        max_row_seconds: a.max_row_seconds,
        attn_tokens: a.attn_tokens,
        ..OpsBenchConfig::default()
    };
    let report = run_ops_bench(be, &cfg, &mut |what| eprintln!("[ollm] measuring {what}"))?;
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
        let b = parse(&["--model", "m", "--speculate", "ngram", "--draft-tokens", "8", "--prompt-file", "d.txt"])
            .expect("speculative bench");
        let spec = &b.decode.spec;
        assert_eq!(spec.speculate, Some(crate::speculation::Method::Ngram));
        assert_eq!(spec.draft_tokens, Some(ollm_engine::DraftTokens::Fixed(8)));
        assert!(parse(&["--model", "m", "--draft-tokens", "8"]).is_err(), "--draft-tokens needs --speculate");
        assert!(parse(&["--model", "m", "--prompt-file", "d.txt"]).is_err(), "--prompt-file needs --speculate");
    }

    #[test]
    fn json_report_has_every_row_and_both_bounds() {
        use crate::bench_ops::BenchRow;
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

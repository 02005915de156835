//! `ollm bench --model DIR --batch 1,4,16,64`: generation through the continuous-batching
//! scheduler at several batch sizes, each against the bounds measured in the same run.
//!
//! A step feeds one token to each of B sequences and reads every weight once, plus each
//! sequence's KV: the memory bound is B × bandwidth / (weight bytes + B × KV bytes) tokens/s.
//! Each token costs about two FLOPs per weight (the matmuls; attention's share is left out, it
//! is small at these contexts): the compute bound is the backend's measured matmul rate over
//! that. A batch can beat batch 1 by up to the ratio of the two.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ollm_engine::{GenerateParams, Generation, Request, SamplingParams, Scheduler, SchedulerConfig, Sink, TokenEvent};
use ollm_models::registry::model_bytes;
use ollm_ops::{Backend, DType, HostTensor};
use ollm_residency::measure::{host_to_device_bandwidth, memory_bandwidth};
use ollm_residency::plan::{Bandwidths, Tier, token_time};

use super::ModelArgs;
use crate::loaded::{BatchWanted, load_for_batch};

use crate::resources::human_bytes;

/// What the batch bench runs.
#[derive(Debug, Clone)]
pub struct BatchBench {
    pub sizes: Vec<usize>,
    /// Requests per batch size; 0: as many as the batch size.
    pub requests: usize,
    pub prompt_tokens: usize,
    pub tokens: usize,
    pub bandwidth_mib: usize,
    /// Tokens a step feeds at most (decode tokens, then prompt chunks).
    pub step_tokens: usize,
}

/// Counts a request's generated tokens.
struct Count(Arc<AtomicU64>);

impl Sink for Count {
    fn token(&mut self, _: TokenEvent<'_>) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }

    fn done(&mut self, result: ollm_engine::Result<Generation>) {
        match result {
            Ok(g) => {
                self.0.fetch_add(g.stats.generated_tokens as u64, Ordering::SeqCst);
            }
            Err(e) => eprintln!("[ollm] bench request failed: {e}"),
        }
    }
}

/// The backend's matmul rate (FLOP/s): `[m, k] × [n, k]ᵀ` over random bf16 weights, best of 3.
fn matmul_rate(be: &dyn Backend, m: usize, k: usize, n: usize) -> anyhow::Result<f64> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let w_bytes: Vec<u8> = (0..n * k).flat_map(|_| ((next().to_bits() >> 16) as u16).to_le_bytes()).collect();
    let w = be.upload(&HostTensor { dtype: DType::BF16, shape: vec![n, k], bytes: w_bytes })?;
    let xs: Vec<f32> = (0..m * k).map(|_| next()).collect();
    let a = be.upload_f32(vec![m, k], &xs)?;
    let mut out = be.zeros(vec![m, n])?;
    be.matmul(&a, &w, None, &mut out)?;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        be.matmul(&a, &w, None, &mut out)?;
        be.to_host_f32(&out)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best)
}

pub fn run(model: &ModelArgs, b: &BatchBench) -> anyhow::Result<()> {
    anyhow::ensure!(
        !b.sizes.is_empty() && b.sizes.iter().all(|&s| (1..=crate::loaded::MAX_BATCH).contains(&s)),
        "--batch takes sizes between 1 and {}",
        crate::loaded::MAX_BATCH
    );
    anyhow::ensure!(b.tokens >= 2 && b.prompt_tokens >= 1, "--tokens must be >= 2 and --prompt-tokens >= 1");
    let mut model = model.clone();
    let ctx = b.prompt_tokens + b.tokens + 1;
    model.max_context = Some(model.max_context.unwrap_or(0).max(ctx));
    let most = *b.sizes.iter().max().unwrap_or(&1);
    let wanted = BatchWanted { max_batch: Some(most), step_tokens: b.step_tokens };
    let loaded = load_for_batch(&model, Some(wanted))?;
    let be = loaded.backend.as_ref();
    let info = loaded.model.info().clone();
    let bw = measure_bounds(&loaded, b.bandwidth_mib)?;
    let h = info.hidden_size;
    let flops = matmul_rate(be, 256, h.max(256), (4 * h).max(1024))?;
    let mb = model_bytes(&loaded.dir)?;
    println!(
        "model           {} ({} layers, {} weights)",
        loaded.dir.display(),
        info.n_layers,
        human_bytes(info.weight_bytes)
    );
    println!("device          {}", loaded.model_backend_name);
    println!("threads         {}", rayon::current_num_threads());
    if let Some(p) = &loaded.plan {
        println!(
            "plan            {} (planned for batch {})",
            crate::planning::describe(p, loaded.backend.memory_kind()),
            p.batch
        );
    }
    let runs = ollm_residency::measure::bandwidth_runs(loaded.backend.as_ref());
    println!("memory bw       {:.2} GB/s (measured, best of {runs} over {} MiB)", bw.device / 1e9, b.bandwidth_mib);
    if loaded.plan.as_ref().is_some_and(streams) {
        println!("host→device     {:.2} GB/s (pinned, measured)", bw.host_to_device / 1e9);
        println!("disk            {:.2} GB/s (O_DIRECT read of the largest weights file, measured)", bw.disk / 1e9);
    }
    println!("matmul rate     {:.1} GFLOP/s (measured: [256, {h}] x [{}, {h}] bf16)", flops / 1e9, (4 * h).max(1024));
    let per_size = |size: usize| if b.requests == 0 { size } else { b.requests };
    println!(
        "requests        {} of {} prompt tokens, {} generated tokens each (greedy, eos ignored)",
        if b.requests == 0 { "as many as the batch".to_string() } else { b.requests.to_string() },
        b.prompt_tokens,
        b.tokens
    );
    println!();
    println!("batch  decode tok/s  end-to-end tok/s  memory bound  compute bound  decode / min bound  vs batch 1");
    let mut first = None;
    let mut experts = Vec::new();
    for &size in &b.sizes {
        let m = loaded.model.clone();
        let prefix = loaded.prefix.clone();
        let new_session = move || ollm_engine::session_with_prefix(m.clone(), prefix.as_ref());
        let cfg = SchedulerConfig { max_batch: size, step_tokens: b.step_tokens };
        let tok = Arc::new(crate::loaded::load_text(&loaded.dir)?.tokenizer);
        let mut sched = Scheduler::new(loaded.model.clone(), tok, cfg, Box::new(new_session));
        let generated = Arc::new(AtomicU64::new(0));
        for r in 0..per_size(size) {
            let prompt: Vec<u32> =
                (0..b.prompt_tokens).map(|i| ((7 * i * i + 3 * i + 1 + 9973 * r) % info.vocab_size) as u32).collect();
            let params = GenerateParams {
                max_new_tokens: b.tokens,
                sampling: SamplingParams::greedy(),
                eos_token_ids: Vec::new(),
                stop: Vec::new(),
                harmony: None,
                cancel: None,
                grammar: None,
                speculate: None,
                logprobs: None,
            };
            sched.submit(Request { prompt, params, sink: Box::new(Count(generated.clone())) });
        }
        let experts_before = loaded.model.expert_stats();
        let t = Instant::now();
        sched.run_until_idle();
        let wall = t.elapsed().as_secs_f64();
        let st = sched.stats();
        let decode = st.decode_step_tokens as f64 / st.decode_step_time.as_secs_f64().max(1e-9);
        let e2e = generated.load(Ordering::SeqCst) as f64 / wall;
        // Bounds at the mean context of the decode steps: a step reads every weight once
        // (streamed layers copied, disk layers read) and each sequence's KV; each token costs
        // two FLOPs per weight it reads.
        let mean_ctx = b.prompt_tokens + b.tokens / 2;
        let kv = size as u64 * info.kv_read_bytes(mean_ctx);
        let step = step_bound(&loaded, &mb, kv, bw);
        let mem_bound = size as f64 / step;
        let compute_bound = flops / info.weight_bytes_per_token as f64;
        let bound = mem_bound.min(compute_bound);
        let base = *first.get_or_insert(decode);
        if let (Some(a), Some(z)) = (experts_before, loaded.model.expert_stats()) {
            let uses = (z.hits + z.ram_loads + z.disk_loads) - (a.hits + a.ram_loads + a.disk_loads);
            let n = generated.load(Ordering::SeqCst).max(1);
            experts.push(format!(
                "batch {size}: experts moved {} per generated token ({} from disk), hit rate {:.1}% over {uses} uses",
                human_bytes((z.copy_bytes - a.copy_bytes) / n),
                human_bytes((z.disk_bytes - a.disk_bytes) / n),
                100.0 * (z.hits - a.hits) as f64 / uses.max(1) as f64
            ));
        }
        println!(
            "{size:>5}  {decode:>12.1}  {e2e:>16.1}  {mem_bound:>12.1}  {compute_bound:>13.1}  {:>17.1}%  {:>9.2}x",
            100.0 * decode / bound,
            decode / base
        );
    }
    for line in &experts {
        println!("{line}");
    }
    println!("(decode tok/s: tokens of the steps where every sequence was decoding, over those steps' time;");
    println!(" end-to-end: every generated token over the whole run, prefill included)");
    if let Some(peak) = loaded.peak_vram_bytes() {
        println!("peak VRAM       {} (driver, CUDA context included)", ollm_ops::bytes::gib(peak));
    }
    Ok(())
}

/// Whether a plan streams layers, experts or the KV cache.
fn streams(p: &ollm_residency::plan::Plan) -> bool {
    p.kv.is_some() || p.experts.is_some() || p.tiers.iter().any(|t| *t != Tier::Vram)
}

/// The device's bandwidth, and where the plan streams, the pinned host-to-device rate and the
/// disk's direct-read rate (else infinite: no such tier).
fn measure_bounds(loaded: &crate::loaded::Loaded, mib: usize) -> anyhow::Result<Bandwidths> {
    let be = loaded.backend.as_ref();
    let streamed = loaded.plan.as_ref().is_some_and(streams);
    let mib = if streamed { mib.min(256) } else { mib };
    let device = memory_bandwidth(be, mib * 1024 * 1024)?;
    if !streamed {
        return Ok(Bandwidths { device, host_to_device: f64::INFINITY, disk: f64::INFINITY });
    }
    let host_to_device = host_to_device_bandwidth(be, 256 << 20)?;
    let f = crate::planning::largest_weights_file(&loaded.dir)?;
    let disk = ollm_io::direct::measure_read_bandwidth(&f, 1 << 30, ollm_io::direct::READERS)?.0;
    Ok(Bandwidths { device, host_to_device, disk })
}

/// Seconds a step needs at least: every weight read once from device memory, the streamed
/// layers copied and the disk ones read, concurrently; `kv` bytes of KV read on the device, or
/// copied too when the plan keeps the cache off the device.
fn step_bound(loaded: &crate::loaded::Loaded, mb: &ollm_models::registry::ModelBytes, kv: u64, bw: Bandwidths) -> f64 {
    let all_vram = vec![Tier::Vram; mb.layer_bytes.len()];
    let tiers = loaded.plan.as_ref().map_or(&all_vram, |p| &p.tiers);
    let mut t = token_time(tiers, &mb.layer_bytes, mb.resident_bytes + kv, bw);
    if loaded.plan.as_ref().is_some_and(|p| p.kv.is_some()) {
        t.copy_s += kv as f64 / bw.host_to_device;
    }
    t.bound_s()
}

/// `ollm bench --pass-cost 1,4,16,64,256`: the time of one forward over k new tokens (what a
/// speculative verification costs) at a context of --prompt-tokens, for each k, against k = 1.
/// A streamed model reads its weights once per forward whatever k is.
pub fn pass_cost(model: &ModelArgs, ks: &[usize], prompt_tokens: usize, repeats: usize) -> anyhow::Result<()> {
    let most = *ks.iter().max().unwrap_or(&1);
    let mut model = model.clone();
    model.max_context = Some(model.max_context.unwrap_or(0).max(prompt_tokens + most + 1));
    let loaded =
        load_for_batch(&model, Some(BatchWanted { max_batch: Some(1), step_tokens: prompt_tokens.max(most) }))?;
    let info = loaded.model.info().clone();
    println!("model           {} ({} layers)", loaded.dir.display(), info.n_layers);
    println!("device          {}", loaded.model_backend_name);
    if let Some(p) = &loaded.plan {
        println!("plan            {}", crate::planning::describe(p, loaded.backend.memory_kind()));
    }
    let prompt: Vec<u32> = (0..prompt_tokens).map(|i| ((7 * i * i + 3 * i + 1) % info.vocab_size) as u32).collect();
    let mut session = loaded.session()?;
    session.prefill(&prompt)?;
    println!(
        "context         {prompt_tokens} tokens, then one forward of k tokens (all k rows' logits), best of {repeats}"
    );
    println!();
    println!("    k  pass (s)  vs k = 1");
    let mut first = None;
    for &k in ks {
        let ids: Vec<u32> = (0..k).map(|i| ((31 * i + 17) % info.vocab_size) as u32).collect();
        let mut best = f64::MAX;
        for _ in 0..repeats.max(1) {
            let t = Instant::now();
            session.score(&ids, None)?;
            best = best.min(t.elapsed().as_secs_f64());
            session.rewind(&prompt);
        }
        let base = *first.get_or_insert(best);
        println!("{k:>5}  {best:>8.4}  {:>7.2}x", best / base);
    }
    Ok(())
}

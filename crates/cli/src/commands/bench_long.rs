//! `ollm bench --long-context N`: prefill and decode at long context, with the KV cache in
//! each dtype the device keeps (the CPU: f32 and bf16), against the memory-bandwidth bound
//! measured in the same run.
//!
//! For each KV dtype: load the model, measure the memory bandwidth, prefill `--long-prefill`
//! synthetic tokens (timed: tokens/s, the flash-form attention never holds a `T × T` matrix),
//! then fill the cache to `N` positions with copies of the prefilled blocks
//! ([`SeqState::export_block`] / [`SeqState::import_block`]: attention's cost does not depend
//! on the values, and computing 32K positions would take longer than the whole bench), time
//! `--tokens` decode steps there, and time one layer's attention op alone over an `N`-position
//! cache. Each is printed against its bound: bandwidth / (weights + KV bytes per token) for the
//! step, bandwidth / (one layer's K and V bytes) for the attention op.

use std::time::Instant;

use anyhow::{Context, ensure};
use ollm_engine::sampling::argmax;
use ollm_models::{LogitsWanted, SeqState};
use ollm_ops::{AttnParams, Backend, DType};
use ollm_residency::measure::memory_bandwidth;

use super::{DeviceArg, ModelArgs};
use crate::loaded::load;
use crate::resources::human_bytes;

/// What `--long-context` runs.
#[derive(Debug, Clone)]
pub struct LongBench {
    /// Positions in the cache when decode is timed.
    pub context: usize,
    /// Prompt tokens of the timed prefill.
    pub prefill: usize,
    /// Decode steps timed at `context`.
    pub tokens: usize,
    /// Buffer streamed to measure the memory bandwidth, MiB.
    pub bandwidth_mib: usize,
}

/// Runs the bench for every KV dtype: on the CPU f32 then bf16 (unless `--cpu-kv` names one),
/// elsewhere the device's own.
pub fn run(model: &ModelArgs, b: &LongBench) -> anyhow::Result<()> {
    ensure!(b.prefill >= 1 && b.tokens >= 1, "--long-prefill and --tokens must be >= 1");
    ensure!(b.context >= b.prefill, "--long-context {} must be at least --long-prefill {}", b.context, b.prefill);
    let kvs: Vec<Option<DType>> = match (model.device, model.cpu_kv) {
        (_, Some(kv)) => vec![Some(kv)],
        (DeviceArg::Cpu, None) => vec![Some(DType::F32), Some(DType::BF16)],
        _ => vec![None],
    };
    for kv in kvs {
        let mut m = model.clone();
        m.cpu_kv = kv;
        m.max_context = Some(b.context + b.tokens + 1);
        one(&m, b)?;
    }
    Ok(())
}

/// One KV dtype's figures.
fn one(model: &ModelArgs, b: &LongBench) -> anyhow::Result<()> {
    let loaded = load(model)?;
    let (lm, be) = (&loaded.model, loaded.backend.as_ref());
    let info = lm.info().clone();
    let needed = b.context + b.tokens + 1;
    ensure!(
        needed <= info.max_positions,
        "{} holds {} positions (max_position_embeddings) and --long-context {} needs {needed}: give a copy of it whose config.json raises max_position_embeddings (scripts/bench_cpu_llama.sh makes one), or a smaller --long-context",
        loaded.dir.display(),
        info.max_positions,
        b.context
    );
    let bw = memory_bandwidth(be, b.bandwidth_mib * 1024 * 1024)?;
    println!(
        "model           {} ({} layers, {} weights)",
        loaded.dir.display(),
        info.n_layers,
        human_bytes(info.weight_bytes)
    );
    println!("device          {}", loaded.model_backend_name);
    let kv_name = be.kv_dtype().to_string().to_lowercase();
    println!("KV dtype        {kv_name} ({} per position)", human_bytes(info.kv_bytes_per_position));
    println!("threads         {}", rayon::current_num_threads());
    let runs = ollm_residency::measure::bandwidth_runs(be);
    println!("memory bw       {:.2} GB/s (best of {runs} over {} MiB, measured now)", bw / 1e9, b.bandwidth_mib);

    // Prefill, timed.
    let prompt: Vec<u32> = (0..b.prefill).map(|i| ((7 * i * i + 3 * i + 1) % info.vocab_size) as u32).collect();
    let mut state = lm.new_state()?;
    let t = Instant::now();
    let logits = lm.forward(&prompt, &mut state, LogitsWanted::Last, None)?;
    let prefill_s = t.elapsed().as_secs_f64();
    println!(
        "prefill         {} tokens in {prefill_s:.2} s = {:.1} tok/s (flash-form attention: no T×T matrix)",
        b.prefill,
        b.prefill as f64 / prefill_s
    );

    // Fill to the context with copies of the prefilled blocks, then time decode there.
    let filled = fill(be, &mut state, b.context).context("filling the cache to --long-context")?;
    let mut next = argmax(&logits);
    let mut step = |state: &mut SeqState| -> anyhow::Result<()> {
        let l = lm.forward(&[next], state, LogitsWanted::Last, None)?;
        next = argmax(&l);
        Ok(())
    };
    step(&mut state)?; // warm-up
    let t = Instant::now();
    for _ in 0..b.tokens {
        step(&mut state)?;
    }
    let per_token = t.elapsed().as_secs_f64() / b.tokens as f64;
    let ctx = filled + 1 + b.tokens / 2;
    let kv_bytes = info.kv_read_bytes(ctx);
    let bytes = info.weight_bytes_per_token + kv_bytes;
    let bound = bytes as f64 / bw;
    println!(
        "decode          {:.2} ms/token at context {filled}..{} ({} steps); bound {:.2} ms = (weights {} + KV {}) / bandwidth → {:.1}% of it",
        1e3 * per_token,
        filled + 1 + b.tokens,
        b.tokens,
        1e3 * bound,
        human_bytes(info.weight_bytes_per_token),
        human_bytes(kv_bytes),
        100.0 * bound / per_token
    );
    let shape = *state.shapes().first().context("the model has no attention layers")?;
    // Query heads as a Llama-shaped model has them: hidden / head_dim.
    let heads = (info.hidden_size / shape.head_dim.max(1), shape.n_kv_heads, shape.head_dim);
    attention_line(be, heads, filled, bw)?;
    println!();
    Ok(())
}

/// Appends copies of the state's full blocks (cycling over them) until the next block would
/// pass `context`; returns the length reached.
fn fill(be: &dyn Backend, state: &mut SeqState, context: usize) -> anyhow::Result<usize> {
    let block = state.block_layout(be)?.block;
    let have = state.len() / block;
    ensure!(have > 0, "the prefill must hold at least one block of {block} positions");
    let mut bi = 0;
    while state.len() + block <= context {
        let mut copy: Vec<Vec<u8>> = Vec::new();
        state.export_block(be, bi % have, |views: &[&[u8]]| -> ollm_ops::Result<()> {
            copy = views.iter().map(|v| v.to_vec()).collect();
            Ok(())
        })?;
        state.import_block(be, |views: &mut [&mut [u8]]| -> ollm_ops::Result<()> {
            for (to, from) in views.iter_mut().zip(&copy) {
                to.copy_from_slice(from);
            }
            Ok(())
        })?;
        bi += 1;
    }
    Ok(state.len())
}

/// One decode step's attention op alone, for one layer at `ctx` positions, against reading that
/// layer's K and V once at the measured bandwidth (median of 9 runs after a warm-up).
fn attention_line(be: &dyn Backend, (nh, nkv, d): (usize, usize, usize), ctx: usize, bw: f64) -> anyhow::Result<()> {
    let mut k = be.kv_zeros(vec![nkv, ctx, d])?;
    let mut v = be.kv_zeros(vec![nkv, ctx, d])?;
    let rows: Vec<f32> = (0..ctx * nkv * d).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
    let new = be.upload_f32(vec![ctx, nkv, d], &rows)?;
    be.write_kv(&mut k, &new, 0)?;
    be.write_kv(&mut v, &new, 0)?;
    let q = be.upload_f32(vec![1, nh, d], &rows[..nh * d])?;
    let mut out = be.zeros(vec![1, nh, d])?;
    let params = AttnParams { scale: 1.0 / (d as f32).sqrt(), window: None, sinks: None, origin: 0 };
    let mut times = Vec::with_capacity(9);
    for i in 0..10 {
        let t = Instant::now();
        be.attention(&q, &k, &v, ctx - 1, &params, &mut out)?;
        be.host_wait(&be.compute_marker()?)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    let bytes = 2 * k.size_bytes();
    let bound = bytes as f64 / bw;
    println!(
        "attention       {:.3} ms per layer at context {ctx} ({} of K and V); bound {:.3} ms at the bandwidth → {:.1}% of it ({:.2} GB/s)",
        1e3 * secs,
        human_bytes(bytes as u64),
        1e3 * bound,
        100.0 * bound / secs,
        bytes as f64 / secs / 1e9
    );
    Ok(())
}

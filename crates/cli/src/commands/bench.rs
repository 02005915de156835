//! `ollm bench`: decode speed against the memory-bandwidth bound measured in the same run.
//!
//! Decoding one token reads every weight the token touches once, so on a CPU the best possible
//! rate is (memory bandwidth) / (weight bytes read per token + KV bytes read). The bench asks the
//! backend for its measured bandwidth (`Backend::measure_bandwidth`), then times greedy decoding, and
//! prints the achieved rate, the bound and their ratio.

use std::time::Instant;

use clap::Args;
use ollm_engine::Session;
use ollm_engine::sampling::argmax;

use super::ModelArgs;
use crate::loaded::load;
use crate::resources::human_bytes;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    anyhow::ensure!(a.tokens >= 2 && a.prompt_tokens >= 1, "--tokens must be >= 2 and --prompt-tokens >= 1");
    let loaded = load(&a.model)?;
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
    println!("bound           {bound:.2} tok/s (bandwidth / bytes per token)");
    println!("ratio           {:.1}% of the bound", 100.0 * tok_s / bound);
    Ok(())
}

//! `ollm plan`: where each decoder layer would live under the given budgets, the predicted peak
//! VRAM and pinned RAM, and the predicted time per token from measured tier bandwidths; the
//! largest batch of sequences that fits the budgets, or the plan for `--max-batch N` sequences
//! decoded together. Reads only config.json and the safetensors headers; a plan that cannot fit
//! fails with the smallest VRAM budget that would.

use clap::Args;
use ollm_residency::plan::Tier;

use crate::commands::ModelArgs;
use crate::loaded::{backend, model_dir};
use crate::planning::{Budgets, calibrate, choose_batch, describe, device_memory, largest_weights_file, make_plan};
use crate::resources::human_bytes;

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub spec: crate::speculation::SpecArgs,
    /// Positions (prompt + generated tokens) the run must hold; overrides --max-context.
    #[arg(long, value_name = "N")]
    pub context: Option<usize>,
    /// Measure the tier bandwidths again instead of using the cached figures.
    #[arg(long)]
    pub recalibrate: bool,
    /// Plan for N sequences decoded together (each with --context positions of KV cache, and
    /// the activations of N rows per step). Default: plan for one, and print the largest batch
    /// that fits the budgets.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_batch: Option<u64>,
}

pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    let dir = model_dir(&a.model.model)?;
    // The CPU settings `ollm run` takes by default, so the plan counts the KV bytes it will hold.
    let chosen =
        backend(a.model.device, a.model.vram_budget, a.model.cpu_choice(ollm_ops::cpu::Precision::Bf16Activations))?;
    let draft = a.spec.draft_bytes()?;
    let budgets = Budgets {
        max_context: a.context.or(a.model.max_context),
        max_batch: a.max_batch.map(|n| n as usize),
        draft,
        ..a.model.budgets()
    };
    // Fail on an impossible plan before spending time on calibration.
    make_plan(&dir, &chosen, &budgets, None)?;
    let (bw, cached) = calibrate(chosen.backend.as_ref(), &largest_weights_file(&dir)?, a.recalibrate)?;
    let (p, input) = make_plan(&dir, &chosen, &budgets, Some(bw))?;

    let n = p.tiers.len();
    let weights: u64 = input.layer_bytes.iter().sum::<u64>() + input.resident_bytes;
    println!("model        {} ({n} decoder layers, {} of weights)", dir.display(), human_bytes(weights));
    println!("device       {}", chosen.backend.name());
    let vram_budget =
        if input.vram_budget == u64::MAX { "unlimited".to_string() } else { human_bytes(input.vram_budget) };
    let memory = chosen.backend.memory_kind();
    let host = memory == ollm_ops::MemoryKind::Host;
    let device_budget = if host {
        format!("memory {vram_budget}")
    } else {
        format!("VRAM {vram_budget} (CUDA context {} measured)", human_bytes(input.context_overhead_bytes))
    };
    println!(
        "budgets      {device_budget}, pinned RAM {}, context {} positions",
        human_bytes(input.ram_budget),
        input.context
    );
    if let Some(d) = draft {
        let kv_elem = chosen.backend.kv_dtype().size_bytes() as u64;
        println!(
            "draft        {} resident for speculative decoding ({} of weights + KV), taken off the VRAM budget",
            human_bytes(d.device_bytes(input.context, kv_elem)),
            human_bytes(d.weight_bytes)
        );
    }
    if p.batch > 1 {
        println!("batch        {} sequences decoded together (--max-batch)", p.batch);
    } else {
        let (fit, _, _) = choose_batch(&dir, &chosen, &budgets, Some(bw))?;
        println!(
            "max batch    {fit} sequences of {} positions fit these budgets (KV caches on the device or in pinned RAM; at most {}); --max-batch N plans for N",
            input.context,
            ollm_residency::plan::MAX_BATCH
        );
    }
    println!("placement    {}", describe(&p, memory));
    for tier in [Tier::Vram, Tier::Ram, Tier::Disk] {
        let layers: Vec<String> =
            p.tiers.iter().enumerate().filter(|(_, t)| **t == tier).map(|(i, _)| i.to_string()).collect();
        if !layers.is_empty() {
            // On the CPU the device's memory is RAM, so the pinned tier needs its own name.
            let name = match (host, tier) {
                (true, Tier::Vram) => "ram".to_string(),
                (true, Tier::Ram) => "pinned ram".to_string(),
                _ => tier.to_string(),
            };
            println!("  {:<10} {}", name, layers.join(" "));
        }
    }
    println!(
        "peak {:<7} {} predicted (context {}, resident weights {}, KV {}, activations {}, slots {})",
        device_memory(memory),
        human_bytes(p.vram_bytes),
        human_bytes(input.context_overhead_bytes),
        human_bytes(input.resident_bytes + layer_bytes(&p.tiers, &input.layer_bytes, Tier::Vram)),
        human_bytes(p.kv_bytes),
        human_bytes(input.activation_bytes),
        human_bytes(p.slots as u64 * p.slot_bytes * input.slot_groups.max(1) as u64)
    );
    if let (Some(e), Some(x)) = (&input.experts, &p.experts) {
        let in_ram = x.ram_layers.iter().filter(|r| **r).count();
        println!(
            "experts      {} device slots of {} experts ({} each; {:.1} per MoE layer), {in_ram} of {} layers' experts in pinned RAM, the rest read from disk",
            x.slots,
            e.count,
            human_bytes(e.unit),
            x.slots as f64 / x.ram_layers.len().max(1) as f64,
            x.ram_layers.len()
        );
    } else if let Some(e) = &input.experts {
        println!("experts      all {} on the device ({} each)", e.count, human_bytes(e.unit));
    }
    println!("pinned RAM   {} predicted ({} staging buffers)", human_bytes(p.ram_bytes), p.staging_buffers);
    println!(
        "bandwidths   device {:.0} GB/s, host→device {:.1} GB/s, disk {:.2} GB/s ({})",
        bw.device / 1e9,
        bw.host_to_device / 1e9,
        bw.disk / 1e9,
        if cached { "cached calibration; --recalibrate measures again" } else { "measured now" }
    );
    let t = p.per_token;
    if p.batch > 1 {
        println!(
            "per step     {:.3} s predicted for {} tokens, {:.1} tokens/s (bound by the slowest: compute {:.3} s, copies {:.3} s, disk {:.3} s)",
            t.bound_s(),
            p.batch,
            p.batch as f64 / t.bound_s(),
            t.compute_s,
            t.copy_s,
            t.disk_s
        );
        return Ok(());
    }
    println!(
        "per token    {:.3} s predicted (bound by the slowest: compute {:.3} s, copies {:.3} s, disk {:.3} s)",
        t.bound_s(),
        t.compute_s,
        t.copy_s,
        t.disk_s
    );
    Ok(())
}

fn layer_bytes(tiers: &[Tier], bytes: &[u64], tier: Tier) -> u64 {
    tiers.iter().zip(bytes).filter(|(t, _)| **t == tier).map(|(_, b)| *b).sum()
}

//! From `--vram-budget`, `--ram-budget`, `--offload-layers-to-cpu` and `--max-context` to a
//! placement of the decoder layers (models::plan), and the tier bandwidths `ollm plan` and
//! `ollm bench` predict with (measured once per device and disk, cached).

use std::path::{Path, PathBuf};

use anyhow::Context;
use ollm_models::plan::{Bandwidths, Plan, PlanInput, Tier, plan};
use ollm_models::registry::{ModelBytes, model_bytes};
use ollm_ops::Backend;
use serde_json::{Value, json};

use crate::loaded::Chosen;

/// Device slots streamed layers rotate through.
pub const SLOTS: usize = 2;
/// Tokens per prefill call (the engine's chunk): the residual stream holds this many rows.
pub const PREFILL_CHUNK: usize = ollm_engine::session::DEFAULT_PREFILL_CHUNK;

/// The knobs, as the commands take them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Budgets {
    pub vram: Option<u64>,
    pub ram: Option<u64>,
    pub offload_layers_to_cpu: Option<usize>,
    pub expert_slots: Option<usize>,
    pub max_context: Option<usize>,
    /// Some(true): the KV cache off the device whatever fits.
    pub kv_offload: Option<bool>,
    /// A prefix cache is on: sliding-window layers keep a prompt's positions until it stores
    /// them, so they are planned like the other layers.
    pub prefix_cache: bool,
}

/// Positions the KV cache will be sized for: the cache starts at 256 and doubles (capped at the
/// model's context), so a context of N reserves the next step of that sequence.
pub fn kv_capacity(context: usize, max_positions: usize) -> usize {
    let mut cap = 256usize.min(max_positions.max(1));
    while cap < context {
        cap = (cap * 2).min(max_positions.max(context));
    }
    cap
}

/// Device bytes of one forward's activations for `t` tokens (f32), the cuBLAS narrowing scratch
/// and the last row's logits.
pub fn activation_bytes(m: &ModelBytes, t: usize, n_heads_dims: usize) -> u64 {
    let (h, i, v) = (m.hidden_size as u64, m.intermediate_size as u64, m.vocab_size as u64);
    let t = t as u64;
    4 * t * (4 * h + n_heads_dims as u64 + 3 * i) + 2 * t * i.max(h) + 4 * v
}

/// Half of MemAvailable (Linux), else 0: layers that do not fit stream from disk.
pub fn default_ram_budget() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024 / 2)
}

/// The planner's input for `dir` on the chosen backend (bandwidths left at 1 B/s when unknown).
pub fn plan_input(dir: &Path, chosen: &Chosen, b: &Budgets, bw: Option<Bandwidths>) -> anyhow::Result<PlanInput> {
    let m = model_bytes(dir)?;
    let n = m.layer_bytes.len();
    let stats = chosen.backend.memory_stats();
    let (vram, context_overhead) = match stats.budget_bytes {
        Some(budget) => (budget, stats.overhead_bytes),
        None => (b.vram.unwrap_or(u64::MAX), 0),
    };
    let context = b.max_context.unwrap_or(m.max_positions.min(8192)).clamp(1, m.max_positions);
    let kv_elem = chosen.backend.kv_dtype().size_bytes() as u64;
    // Sliding-window layers hold a window and a prefill tile (unless a prefix cache pins more).
    let (mut kv_full_elems, mut n_sliding, mut sliding_elems) = (m.kv_elems_per_position, 0, 0);
    if let Some((per_pos, layers, w)) = m.sliding_kv.filter(|_| !b.prefix_cache) {
        kv_full_elems -= per_pos;
        n_sliding = layers;
        let held = ollm_kv::window_positions(w, ollm_models::gpt_oss::PREFILL_TILE).min(context);
        sliding_elems = per_pos * held as u64;
    }
    // One prefill tile's scratch (q, k, v and the attention output counted as four q-sized rows,
    // an overestimate), plus the residual stream of a whole prefill call.
    let tile = ollm_models::llama3::PREFILL_TILE.min(context);
    let mut act = activation_bytes(&m, tile, (4 * m.q_dim.max(m.hidden_size)).max(m.mixer_row_floats))
        + 4 * (m.hidden_size * PREFILL_CHUNK.min(context)) as u64;
    if m.experts.is_some() {
        // A routed chunk's normed rows, sum and copy, one expert call's rows, and the two
        // unpacked bf16 matrices.
        let (h, i) = (m.hidden_size as u64, m.intermediate_size as u64);
        let chunk = ollm_models::gpt_oss::MOE_CHUNK.min(PREFILL_CHUNK).min(context) as u64;
        let rows = ollm_models::gpt_oss::EXPERT_ROWS.min(context) as u64;
        act += 4 * 3 * chunk * h + 4 * rows * (2 * h + 3 * i) + 2 * 3 * h * i;
    }
    Ok(PlanInput {
        layer_bytes: m.layer_bytes.clone(),
        resident_bytes: m.resident_bytes,
        kv_bytes_per_position: kv_full_elems * kv_elem,
        kv_full_layers: m.kv_layers - n_sliding,
        kv_sliding_bytes: sliding_elems * kv_elem,
        context: kv_capacity(context, m.max_positions),
        activation_bytes: act,
        context_overhead_bytes: context_overhead,
        vram_budget: vram,
        ram_budget: b.ram.unwrap_or_else(default_ram_budget),
        max_resident_layers: b.offload_layers_to_cpu.map(|k| n.saturating_sub(k)),
        slots: SLOTS,
        slot_groups: m.layer_groups,
        bandwidth: bw.unwrap_or(Bandwidths { device: 1.0, host_to_device: 1.0, disk: 1.0 }),
        kv_offload: b.kv_offload,
        experts: m.experts,
        max_expert_slots: b.expert_slots,
    })
}

/// The plan for `dir`, or the planner's one-line reason it cannot fit.
pub fn make_plan(
    dir: &Path,
    chosen: &Chosen,
    b: &Budgets,
    bw: Option<Bandwidths>,
) -> anyhow::Result<(Plan, PlanInput)> {
    let input = plan_input(dir, chosen, b, bw)?;
    let p = plan(&input).with_context(|| format!("planning {}", dir.display()))?;
    Ok((p, input))
}

/// `8 in VRAM, 24 in pinned RAM, 0 from disk (2 slots of 416.0 MiB)`, and where the KV goes
/// when it is off the device.
pub fn describe(p: &Plan) -> String {
    let count = |t: Tier| p.tiers.iter().filter(|x| **x == t).count();
    let kv = p.kv.map_or(String::new(), |k| {
        format!(
            "; KV cache off the device: blocks of {} positions in up to {} of pinned RAM, then a spill file, 2 windows of {}",
            k.block,
            crate::resources::human_bytes(k.ram_bytes),
            crate::resources::human_bytes(k.window_bytes)
        )
    });
    let experts = p.experts.as_ref().map_or(String::new(), |e| {
        let ram = e.ram_layers.iter().filter(|r| **r).count();
        format!(
            "; experts through {} device slots, {} layers' experts in pinned RAM, {} read from disk",
            e.slots,
            ram,
            e.ram_layers.len() - ram
        )
    });
    format!(
        "{} layers in VRAM, {} in pinned RAM, {} read from disk per pass ({} slots of {}){kv}{experts}",
        count(Tier::Vram),
        count(Tier::Ram),
        count(Tier::Disk),
        p.slots,
        crate::resources::human_bytes(p.slot_bytes)
    )
}

/// The directory an offloaded KV cache spills into: `--kv-cache-dir`, or a fresh temporary
/// directory that is removed when the returned guard drops and on Ctrl-C.
pub fn kv_spill_dir(given: Option<&Path>) -> anyhow::Result<(PathBuf, Option<TempKvDir>)> {
    if let Some(d) = given {
        std::fs::create_dir_all(d).with_context(|| format!("--kv-cache-dir {}: cannot create it", d.display()))?;
        return Ok((d.to_path_buf(), None));
    }
    let dir = std::env::temp_dir().join(format!("ollm-kv-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create the KV spill directory (give --kv-cache-dir)", dir.display()))?;
    let on_interrupt = dir.clone();
    // Best effort: another handler (the server's) may own Ctrl-C already; the guard still
    // removes the directory on every normal exit.
    let _ = ctrlc::set_handler(move || {
        let _ = std::fs::remove_dir_all(&on_interrupt);
        eprintln!();
        std::process::exit(130);
    });
    Ok((dir.clone(), Some(TempKvDir(dir))))
}

/// Removes a temporary KV spill directory when dropped.
#[derive(Debug)]
pub struct TempKvDir(PathBuf);

impl Drop for TempKvDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Measured tier bandwidths for this backend and the disk holding `weights`, from
/// `<cache>/calibration.json` when present (unless `fresh`), else measured now and stored.
pub fn calibrate(backend: &dyn Backend, weights: &Path, fresh: bool) -> anyhow::Result<(Bandwidths, bool)> {
    let key = format!("{} | disk {}", backend.name(), disk_key(weights));
    let path = crate::demo::cache_root().ok().map(|r| r.join("calibration.json"));
    let mut all: Value = path
        .as_deref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({}));
    if !fresh
        && let Some(e) = all.get(&key)
        && let (Some(d), Some(h), Some(k)) = (e["device"].as_f64(), e["host_to_device"].as_f64(), e["disk"].as_f64())
    {
        return Ok((Bandwidths { device: d, host_to_device: h, disk: k }, true));
    }
    eprintln!("[ollm] calibrating: device memory, host→device copies, O_DIRECT disk reads (a few seconds)");
    let device = crate::measure::memory_bandwidth(backend, 1 << 30)?;
    let host_to_device = crate::measure::host_to_device_bandwidth(backend, 1 << 30)?;
    let (disk, direct) = ollm_io::direct::measure_read_bandwidth(weights, 2 << 30, ollm_io::direct::READERS)
        .with_context(|| format!("measuring disk reads on {}", weights.display()))?;
    if !direct {
        eprintln!("[ollm] note: {} refuses O_DIRECT; the disk figure includes the page cache", weights.display());
    }
    let bw = Bandwidths { device, host_to_device, disk };
    all[key] = json!({"device": device, "host_to_device": host_to_device, "disk": disk, "o_direct": direct});
    if let Some(p) = path {
        // Best effort: a cache that cannot be written only costs a re-measurement.
        if let Some(parent) = p.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(&p, serde_json::to_string_pretty(&all).unwrap_or_default());
    }
    Ok((bw, false))
}

/// The largest safetensors file of a model directory (the disk calibration reads it).
pub fn largest_weights_file(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let len = p.metadata().map(|m| m.len()).unwrap_or(0);
            if best.as_ref().is_none_or(|(l, _)| len > *l) {
                best = Some((len, p));
            }
        }
    }
    best.map(|(_, p)| p).with_context(|| format!("no .safetensors file in {}", dir.display()))
}

#[cfg(unix)]
fn disk_key(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    p.metadata().map_or_else(|_| "unknown".into(), |m| format!("dev {}", m.dev()))
}

#[cfg(not(unix))]
fn disk_key(p: &Path) -> String {
    p.parent().map_or_else(|| "unknown".into(), |d| d.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::kv_capacity;

    #[test]
    fn kv_capacity_follows_the_doubling() {
        assert_eq!(kv_capacity(100, 131072), 256);
        assert_eq!(kv_capacity(8192, 131072), 8192);
        assert_eq!(kv_capacity(8193, 131072), 16384);
        assert_eq!(kv_capacity(100_000, 131072), 131072);
        assert_eq!(kv_capacity(300, 300), 300);
    }
}

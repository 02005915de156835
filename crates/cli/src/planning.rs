//! From `--vram-budget`, `--ram-budget`, `--offload-layers-to-cpu` and `--max-context` to a
//! placement of the decoder layers (`ollm_residency::plan`), and the tier bandwidths `ollm plan`
//! and `ollm bench` predict with (`ollm_residency::calibrate`, cached under the ollm home).

use std::path::{Path, PathBuf};

use anyhow::Context;
use ollm_models::registry::{ModelBytes, model_bytes};
use ollm_ops::{Backend, MemoryKind};
use ollm_residency::plan::{Bandwidths, MAX_BATCH, Plan, PlanInput, Tier, plan};

use crate::loaded::Chosen;

/// Device slots streamed layers rotate through.
pub const SLOTS: usize = 2;
/// Tokens per prefill call (the engine's chunk): the residual stream holds this many rows.
pub const PREFILL_CHUNK: usize = ollm_engine::session::DEFAULT_PREFILL_CHUNK;
/// Rows of one prefill tile (every family's).
const PREFILL_TILE: usize = ollm_models::common::forward::PREFILL_TILE;

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
    /// A draft model for speculative decoding (`--speculate draft:MODEL`): resident beside the
    /// target, so its weights and KV cache come off the VRAM budget.
    pub draft: Option<DraftBytes>,
    /// `--max-batch N`: sequences decoded together (None: one).
    pub max_batch: Option<usize>,
    /// Tokens one batched step feeds at most (the scheduler's step budget). None: a prefill
    /// chunk beside a decode token of each other sequence.
    pub step_tokens: Option<usize>,
}

/// A draft model's device memory: every weight, and a KV cache for the planned context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftBytes {
    pub weight_bytes: u64,
    pub kv_elems_per_position: u64,
    pub max_positions: usize,
}

impl DraftBytes {
    /// From the draft's config.json and safetensors headers.
    pub fn of(dir: &Path) -> anyhow::Result<Self> {
        let m = model_bytes(dir)?;
        let experts = m.experts.as_ref().map_or(0, |e| e.unit * e.count as u64);
        Ok(Self {
            weight_bytes: m.layer_bytes.iter().sum::<u64>() + m.resident_bytes + experts,
            kv_elems_per_position: m.kv_elems_per_position,
            max_positions: m.max_positions,
        })
    }

    /// Device bytes for a context of `context` positions and KV elements of `kv_elem` bytes.
    pub fn device_bytes(&self, context: usize, kv_elem: u64) -> u64 {
        let positions = ollm_kv::kv_capacity(context.min(self.max_positions), self.max_positions) as u64;
        self.weight_bytes + self.kv_elems_per_position.saturating_mul(kv_elem).saturating_mul(positions)
    }
}

/// Device bytes of the backend's own scratch in a forward: the cuBLAS path narrows a matmul's
/// input to bf16, at most a tile of rows as wide as the widest of hidden and intermediate size.
pub fn backend_scratch_bytes(m: &ModelBytes, tile: usize) -> u64 {
    2 * tile as u64 * m.intermediate_size.max(m.hidden_size) as u64
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

/// Device bytes of the partials the split-context decode attention keeps (a step's rows of
/// at most 4 queries, every query head, a split per 256 keys of the context, `d + 2` floats
/// each, `d + 2 <= 2d`): a buffer the backend keeps between calls.
pub fn decode_partials_bytes(m: &ModelBytes, context: usize) -> u64 {
    4 * 4 * 2 * m.q_dim as u64 * context.div_ceil(256).max(1) as u64
}

/// Device bytes of the activations of the largest step of a batch of `batch` sequences of
/// `context` positions: any step of at most `step_tokens` rows when given (the scheduler's
/// budget), else of a prefill chunk (PREFILL_CHUNK rows at most) beside one decode row of each
/// other sequence; each sequence's last logits wanted (the activations its forward allocates, as
/// the family counts them from the shapes it allocates, at the row count where they are
/// largest: `ModelBytes::step_scratch_bytes`), the backend's narrowing scratch and its decode
/// attention partials. One sequence without `step_tokens`: a prefill call alone.
pub fn activation_bytes(
    m: &ModelBytes,
    context: usize,
    batch: usize,
    step_tokens: Option<usize>,
) -> anyhow::Result<u64> {
    let batch = batch.max(1);
    let rows = step_tokens.unwrap_or(PREFILL_CHUNK.min(context) + batch - 1).max(batch);
    Ok(m.step_scratch_bytes(rows, batch)?
        + backend_scratch_bytes(m, PREFILL_TILE.min(rows))
        + decode_partials_bytes(m, context))
}

/// The planner's input for `dir` on the chosen backend (bandwidths left at 1 B/s when unknown).
pub fn plan_input(dir: &Path, chosen: &Chosen, b: &Budgets, bw: Option<Bandwidths>) -> anyhow::Result<PlanInput> {
    plan_input_of(&model_bytes(dir)?, chosen, b, bw)
}

/// Positions per sequence the plan holds: `--max-context`, else the model's context, at most
/// 8192.
fn planned_context(m: &ModelBytes, b: &Budgets) -> usize {
    b.max_context.unwrap_or(m.max_positions.min(8192)).clamp(1, m.max_positions)
}

/// [`plan_input`] from the model's sizes.
fn plan_input_of(m: &ModelBytes, chosen: &Chosen, b: &Budgets, bw: Option<Bandwidths>) -> anyhow::Result<PlanInput> {
    let n = m.layer_bytes.len();
    let stats = chosen.backend.memory_stats();
    let (vram, context_overhead) = match stats.budget_bytes {
        Some(budget) => (budget, stats.overhead_bytes),
        None => (b.vram.unwrap_or(u64::MAX), 0),
    };
    // On the CPU the "device" is RAM, so a pinned tier would only copy RAM into RAM. A dense
    // model given only --ram-budget keeps the decoder layers that fit in it (in order) and reads
    // the rest from disk every pass through the streamer's slots (which come on top, like the
    // GPU's staging buffers); --offload-layers-to-cpu and --vram-budget keep their meaning.
    let host = chosen.backend.memory_kind() == MemoryKind::Host;
    let cpu_layer_budget = match (host, b.ram) {
        (true, Some(ram)) if b.vram.is_none() && b.offload_layers_to_cpu.is_none() && m.experts.is_none() => Some(ram),
        _ => None,
    };
    let fitting = |budget: u64| {
        let mut sum = 0u64;
        m.layer_bytes
            .iter()
            .take_while(|&&bytes| {
                sum = sum.saturating_add(bytes);
                sum <= budget
            })
            .count()
    };
    let context = planned_context(m, b);
    let kv_elem = chosen.backend.kv_dtype().size_bytes() as u64;
    let vram = vram.saturating_sub(b.draft.map_or(0, |d| d.device_bytes(context, kv_elem)));
    // Sliding-window layers hold a window and a prefill tile (unless a prefix cache pins more).
    let (mut kv_full_elems, mut n_sliding, mut sliding_elems) = (m.kv_elems_per_position, 0, 0);
    if let Some((per_pos, layers, w)) = m.sliding_kv.filter(|_| !b.prefix_cache) {
        kv_full_elems = kv_full_elems.saturating_sub(per_pos);
        n_sliding = layers;
        let held = ollm_kv::window_positions(w, PREFILL_TILE).min(context);
        sliding_elems = per_pos.saturating_mul(held as u64);
    }
    let max_batch = b.max_batch.unwrap_or(1).max(1);
    let act = activation_bytes(m, context, max_batch, b.step_tokens)?;
    Ok(PlanInput {
        layer_bytes: m.layer_bytes.clone(),
        resident_bytes: m.resident_bytes,
        kv_bytes_per_position: kv_full_elems.saturating_mul(kv_elem),
        kv_full_layers: m.kv_layers - n_sliding,
        kv_sliding_bytes: sliding_elems.saturating_mul(kv_elem),
        context: ollm_kv::kv_capacity(context, m.max_positions),
        max_batch,
        activation_bytes: act,
        context_overhead_bytes: context_overhead,
        vram_budget: vram,
        ram_budget: if cpu_layer_budget.is_some() { 0 } else { b.ram.unwrap_or_else(default_ram_budget) },
        max_resident_layers: match cpu_layer_budget {
            Some(ram) => Some(fitting(ram)),
            None => b.offload_layers_to_cpu.map(|k| n.saturating_sub(k)),
        },
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

/// The largest batch (at most `--max-batch` when given, else [`MAX_BATCH`]) of sequences of the
/// planned context that fits the budgets (`ollm_residency::plan::choose_batch`: every
/// sequence's KV cache on the device or in pinned RAM), its plan and the planner's input for it.
pub fn choose_batch(
    dir: &Path,
    chosen: &Chosen,
    b: &Budgets,
    bw: Option<Bandwidths>,
) -> anyhow::Result<(usize, Plan, PlanInput)> {
    let m = model_bytes(dir)?;
    let limit = b.max_batch.unwrap_or(MAX_BATCH).max(1);
    let input = plan_input_of(&m, chosen, &Budgets { max_batch: Some(1), ..*b }, bw)?;
    let context = planned_context(&m, b);
    let acts =
        (1..=limit).map(|n| activation_bytes(&m, context, n, b.step_tokens)).collect::<anyhow::Result<Vec<u64>>>()?;
    let act = |n: usize| acts.get(n.saturating_sub(1)).copied().unwrap_or(u64::MAX);
    let (n, p) = ollm_residency::plan::choose_batch(&input, limit, &act)
        .with_context(|| format!("planning {}", dir.display()))?;
    Ok((n, p, PlanInput { max_batch: n, activation_bytes: act(n), ..input }))
}

/// What the plan's output calls the device's memory: RAM on the CPU, VRAM on a GPU.
pub fn device_memory(memory: MemoryKind) -> &'static str {
    if memory == MemoryKind::Host { "RAM" } else { "VRAM" }
}

/// `8 in VRAM, 24 in pinned RAM, 0 from disk (2 slots of 416.0 MiB)`, and where the KV goes
/// when it is off the device. On the CPU (`memory` Host) the device's memory is RAM, and the
/// layers there are said to be in RAM.
pub fn describe(p: &Plan, memory: MemoryKind) -> String {
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
        "{} layers in {}, {} in pinned RAM, {} read from disk per pass ({} slots of {}){kv}{experts}",
        count(Tier::Vram),
        device_memory(memory),
        count(Tier::Ram),
        count(Tier::Disk),
        p.slots,
        crate::resources::human_bytes(p.slot_bytes)
    )
}

/// The directory an offloaded KV cache spills into: `--kv-cache-dir`, or a fresh temporary
/// directory that is removed when the returned guard drops and, with `cleanup_on_interrupt`,
/// on Ctrl-C (a handler that then exits the process).
pub fn kv_spill_dir(given: Option<&Path>, cleanup_on_interrupt: bool) -> anyhow::Result<(PathBuf, Option<TempKvDir>)> {
    if let Some(d) = given {
        std::fs::create_dir_all(d).with_context(|| format!("--kv-cache-dir {}: cannot create it", d.display()))?;
        return Ok((d.to_path_buf(), None));
    }
    // One directory per loaded model: a process (the Python package) may load several.
    static LOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ollm-kv-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create the KV spill directory (give --kv-cache-dir)", dir.display()))?;
    if !cleanup_on_interrupt {
        return Ok((dir.clone(), Some(TempKvDir(dir))));
    }
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
    let path = crate::demo::cache_root().ok().map(|r| r.join("calibration.json"));
    Ok(ollm_residency::calibrate::calibrate(backend, weights, path.as_deref(), fresh)?)
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

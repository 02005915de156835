//! The placement planner (docs/architecture.md §2): which decoder layers stay resident in VRAM, which
//! are cached in pinned RAM, which stream from disk every token; how many prefetch slots; and the
//! time per token that placement predicts from measured tier bandwidths. A plan that cannot fit
//! fails before anything loads, naming the smallest budget that would.

use std::fmt;

/// Where a decoder layer's weights live between uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Resident on the device for the whole run.
    Vram,
    /// Cached in pinned host memory, copied into a device slot each time it is used.
    Ram,
    /// Read from the checkpoint (O_DIRECT) into pinned staging, then copied, each time.
    Disk,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Vram => "vram",
            Tier::Ram => "ram",
            Tier::Disk => "disk",
        })
    }
}

/// Bytes per second of each tier, measured (see `calibrate`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bandwidths {
    /// Device memory (a device-to-device copy, bytes read + written).
    pub device: f64,
    /// Pinned host to device.
    pub host_to_device: f64,
    /// O_DIRECT reads from the checkpoint's disk.
    pub disk: f64,
}

/// What the planner needs to know about a model, a run and a machine.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// Bytes of each decoder layer's weights, as stored.
    pub layer_bytes: Vec<u64>,
    /// Weights that stay on the device whatever happens (embedding, head, final norm).
    pub resident_bytes: u64,
    /// KV-cache bytes per position of the layers that keep every position.
    pub kv_bytes_per_position: u64,
    /// How many layers those are (each offloaded window holds one of them).
    pub kv_full_layers: usize,
    /// Sliding-window layers' caches, whatever the context (they keep about a window).
    pub kv_sliding_bytes: u64,
    /// Positions the run must hold (prompt + generated tokens), per sequence.
    pub context: usize,
    /// Sequences decoded together (`--max-batch`; 1: one at a time): the plan holds the KV
    /// cache of this many sequences, each of `context` positions, and a step's time covers all
    /// of them. [`choose_batch`] finds the largest that fits.
    pub max_batch: usize,
    /// Peak activation scratch on the device (the prefill chunk decides it, and the rows of
    /// `max_batch` sequences that decode beside it).
    pub activation_bytes: u64,
    /// The CUDA context and library overhead, measured at start-up (or estimated before it).
    pub context_overhead_bytes: u64,
    /// `--vram-budget`: every device byte, the context included.
    pub vram_budget: u64,
    /// `--ram-budget`: pinned host bytes for cached layers (disk staging comes on top).
    pub ram_budget: u64,
    /// `--offload-layers-to-cpu N`: at most this many layers on the device (oLLM's knob).
    pub max_resident_layers: Option<usize>,
    /// Prefetch slots for streamed layers (2 = double buffering).
    pub slots: usize,
    /// Layer layouts that stream apart, each through its own `slots` (Qwen3-Next: DeltaNet and
    /// attention layers; 1 elsewhere).
    pub slot_groups: usize,
    pub bandwidth: Bandwidths,
    /// Where the KV cache goes: None decides (on the device when the budget holds it beside the
    /// smallest streaming setup, else off it), Some(true) off the device, Some(false) on it.
    pub kv_offload: Option<bool>,
    /// MoE models: the experts, which go through an expert cache instead of the layer tiers
    /// (`layer_bytes` and `resident_bytes` leave them out).
    pub experts: Option<ExpertBytes>,
    /// `--expert-slots N`: at most this many experts on the device.
    pub max_expert_slots: Option<usize>,
}

/// The experts of a MoE model, as the planner sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertBytes {
    /// Experts in all (layers × experts per layer).
    pub count: usize,
    /// Experts per layer.
    pub per_layer: usize,
    /// Bytes of one expert as stored (packed MXFP4 or dense), biases included.
    pub unit: u64,
    /// Experts one decoded token routes to (layers × k).
    pub per_token: usize,
}

impl ExpertBytes {
    /// Experts a step of `batch` sequences (one token each) uses, each once for the step:
    /// with uniform routing each of a layer's experts is chosen by some token with probability
    /// 1 − (1 − k/E)^batch. One sequence: `per_token`.
    pub fn per_step(&self, batch: usize) -> f64 {
        if batch <= 1 {
            return self.per_token as f64;
        }
        let layers = (self.count / self.per_layer.max(1)).max(1) as f64;
        let e = self.per_layer.max(1) as f64;
        let k = (self.per_token as f64 / layers).min(e);
        layers * e * (1.0 - (1.0 - k / e).powi(batch as i32))
    }

    /// Device slots a layer's compute needs at the least: its k experts, twice over, so copies
    /// of the next ones overlap the current one's compute.
    pub fn min_slots(&self) -> usize {
        (2 * self.per_token / (self.count / self.per_layer.max(1)).max(1)).clamp(1, self.count.max(1))
    }
}

/// VRAM left unused beside expert slots: they fill the budget otherwise.
pub const EXPERT_MARGIN: u64 = 256 << 20;

/// Positions per block of an offloaded KV cache.
pub const KV_BLOCK: usize = 1024;

/// The largest batch [`choose_batch`] considers.
pub const MAX_BATCH: usize = 64;

/// The placement and what it predicts.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub tiers: Vec<Tier>,
    /// Sequences it holds the KV cache and activations of ([`PlanInput::max_batch`]).
    pub batch: usize,
    /// The KV cache of all of them, wherever it lives.
    pub kv_bytes: u64,
    /// Device slots streamed layers rotate through (0 when every layer is resident).
    pub slots: usize,
    pub slot_bytes: u64,
    /// Pinned staging buffers for disk reads (0 without disk layers), each `slot_bytes`.
    pub staging_buffers: usize,
    pub vram_bytes: u64,
    pub ram_bytes: u64,
    pub per_token: TokenTime,
    /// Some when the KV cache lives off the device: its pinned RAM (beyond it, blocks spill).
    pub kv: Option<KvPlan>,
    /// MoE models whose experts do not all stay on the device: the expert cache's slots and
    /// which layers' experts wait in pinned RAM.
    pub experts: Option<crate::experts::ExpertPlacement>,
}

/// An offloaded KV cache, per sequence (a batch has one per sequence): two device windows of
/// `window_bytes` each, blocks of `block` positions in up to `ram_bytes` of pinned RAM, the rest
/// in a spill file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvPlan {
    pub block: usize,
    pub ram_bytes: u64,
    pub window_bytes: u64,
    /// Positions each window holds (the planned context).
    pub window_positions: usize,
}

impl Plan {
    /// What the loader needs from the plan; an offloaded KV cache spills into `spill_dir`.
    pub fn placement(&self, spill_dir: &std::path::Path) -> Placement {
        Placement {
            tiers: self.tiers.clone(),
            slots: self.slots,
            staging_buffers: self.staging_buffers,
            kv: self.kv.map(|k| ollm_kv::KvOffload {
                block: k.block,
                ram_bytes: k.ram_bytes,
                spill_dir: spill_dir.to_path_buf(),
                window_positions: k.window_positions,
            }),
            experts: self.experts.clone(),
        }
    }
}

/// Where each decoder layer goes and how many device slots and staging buffers streaming uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub tiers: Vec<Tier>,
    pub slots: usize,
    pub staging_buffers: usize,
    /// Some: the KV cache of each sequence lives off the device (see `ollm_kv::offload`).
    pub kv: Option<ollm_kv::KvOffload>,
    /// MoE models: device slots for experts and where the others wait (None: all resident).
    pub experts: Option<crate::experts::ExpertPlacement>,
}

impl Placement {
    /// Every layer resident on the device.
    pub fn resident(n_layers: usize) -> Self {
        Self { tiers: vec![Tier::Vram; n_layers], slots: 0, staging_buffers: 0, kv: None, experts: None }
    }
}

/// Seconds per decoded token (a step of the batch: one token of each sequence), by what bounds
/// it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenTime {
    /// Reading every weight and the KV cache once from device memory.
    pub compute_s: f64,
    /// Host-to-device copies of every streamed layer.
    pub copy_s: f64,
    /// Disk reads of the disk-tier layers.
    pub disk_s: f64,
}

impl TokenTime {
    /// The pipeline runs the three concurrently: the slowest sets the pace.
    pub fn bound_s(&self) -> f64 {
        self.compute_s.max(self.copy_s).max(self.disk_s)
    }
}

/// Why no plan exists, with the smallest budget that would give one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "the model does not fit in --vram-budget {budget}: the device needs at least {need} (CUDA context {context}, resident weights {resident}, KV cache {kv} for {batch}{positions} positions, activations {act}, {slots} layer slots of {slot}); raise --vram-budget to {need}{batch:#}"
    )]
    Vram {
        budget: Bytes,
        need: Bytes,
        context: Bytes,
        resident: Bytes,
        kv: Bytes,
        batch: Batch,
        positions: usize,
        act: Bytes,
        slots: usize,
        slot: Bytes,
    },
    #[error("the model has no decoder layers to place")]
    NoLayers,
}

/// The sequences a failed plan held: `16 sequences of ` before the positions (nothing for one),
/// and with `{:#}` the advice that goes with them (`, shorten --context or lower --max-batch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch(pub usize);

impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (f.alternate(), self.0 > 1) {
            (false, true) => write!(f, "{} sequences of ", self.0),
            (false, false) => Ok(()),
            (true, true) => f.write_str(", shorten --context or lower --max-batch"),
            (true, false) => f.write_str(" or shorten --context"),
        }
    }
}

/// A byte count printed in GiB (two decimals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} GiB", self.0 as f64 / (1u64 << 30) as f64)
    }
}

/// Chooses a placement: every layer on the device if it fits; otherwise `slots` device slots for
/// streamed layers, as many resident layers as the rest of the VRAM budget holds (spread evenly
/// through the stack, so copies overlap the resident layers' compute), pinned RAM for as many of
/// the others as `ram_budget` holds, and the disk for the rest (read through staging buffers,
/// which are pinned memory outside `ram_budget`).
pub fn plan(input: &PlanInput) -> Result<Plan, PlanError> {
    let n = input.layer_bytes.len();
    if n == 0 {
        return Err(PlanError::NoLayers);
    }
    // Saturating here and below: byte counts derive from a config, and a figure too large for
    // u64 must fail the budget check, not wrap into a small one.
    let batch = input.max_batch.max(1);
    let kv_full = input.kv_bytes_per_position.saturating_mul(input.context as u64);
    let kv_all = kv_full.saturating_add(input.kv_sliding_bytes).saturating_mul(batch as u64);
    // Offloaded, the device holds two windows of one full layer's cache each, per sequence.
    let kv_windows = kv_full.div_ceil(input.kv_full_layers.max(1) as u64).saturating_mul(2 * batch as u64);
    let slot_bytes = input.layer_bytes.iter().copied().max().unwrap_or(0);
    // Every group streams through its own slots (sized, conservatively, for the largest layer):
    // one slot of each group together.
    let groups = input.slot_groups.max(1);
    let slot_set = groups as u64 * slot_bytes;
    let expert_min = input.experts.map_or(0, |e| e.min_slots() as u64 * e.unit);
    let base = input.context_overhead_bytes + input.resident_bytes + input.activation_bytes + expert_min;
    let kv_offloaded = match input.kv_offload {
        Some(off) => off,
        None => {
            base.saturating_add(kv_all).saturating_add(input.slots.max(1) as u64 * slot_set) > input.vram_budget
                && kv_windows < kv_all
        }
    };
    let kv = if kv_offloaded { kv_windows } else { kv_all };
    let fixed = base.saturating_add(kv);
    let all: u64 = input.layer_bytes.iter().sum();
    let cap = input.max_resident_layers.unwrap_or(n).min(n);

    let (resident, slots) = if cap == n && fixed.saturating_add(all) <= input.vram_budget {
        (n, 0)
    } else {
        let slots = input.slots.max(1);
        let need = fixed.saturating_add(slots as u64 * slot_set);
        if need > input.vram_budget {
            return Err(PlanError::Vram {
                budget: Bytes(input.vram_budget),
                need: Bytes(need),
                context: Bytes(input.context_overhead_bytes),
                resident: Bytes(input.resident_bytes),
                kv: Bytes(kv),
                batch: Batch(batch),
                positions: input.context,
                act: Bytes(input.activation_bytes),
                slots: groups * slots,
                slot: Bytes(slot_bytes),
            });
        }
        let room = input.vram_budget - need;
        // Layers are near-equal in size: count how many of the largest fit.
        let fit = room.checked_div(slot_bytes).map_or(n, |f| f as usize);
        (fit.min(cap).min(n - 1), slots)
    };

    let mut tiers = vec![Tier::Disk; n];
    for i in spread(resident, n) {
        tiers[i] = Tier::Vram;
    }
    // Pinned RAM caches as many streamed layers as `ram_budget` holds; the staging buffers of
    // disk reads come on top of it (so `--ram-budget 0` means: every streamed layer from disk).
    let mut ram_left = input.ram_budget;
    for (i, tier) in tiers.iter_mut().enumerate() {
        if *tier == Tier::Disk && input.layer_bytes[i] <= ram_left {
            *tier = Tier::Ram;
            ram_left -= input.layer_bytes[i];
        }
    }
    let disk_count = tiers.iter().filter(|t| **t == Tier::Disk).count();
    let staging_buffers = if disk_count > 0 { slots.max(2) } else { 0 };

    let vram_layers = tier_bytes(&tiers, &input.layer_bytes, Tier::Vram);
    let mut ram_bytes = tier_bytes(&tiers, &input.layer_bytes, Tier::Ram);
    let mut vram_bytes = fixed + vram_layers + slots as u64 * slot_set;
    let mut per_token = token_time(&tiers, &input.layer_bytes, input.resident_bytes + kv_all, input.bandwidth);
    // Experts: the VRAM left over becomes expert slots (all of them: no cache needed); pinned
    // RAM left after the layers holds whole layers' experts, the disk the rest.
    let experts = match input.experts {
        None => None,
        Some(e) => {
            // A margin for what the estimate above misses (allocator rounding, small buffers).
            let room = input.vram_budget.saturating_sub(vram_bytes).saturating_sub(EXPERT_MARGIN);
            let extra = room.checked_div(e.unit).map_or(0, |x| x as usize);
            let cap = input.max_expert_slots.unwrap_or(e.count).clamp(1, e.count);
            let slots_e = (e.min_slots() + extra).min(cap);
            vram_bytes = vram_bytes + slots_e as u64 * e.unit - expert_min;
            let layers_e = e.count / e.per_layer.max(1);
            let layer_experts = e.per_layer as u64 * e.unit;
            let mut ram_layers = vec![false; layers_e];
            for r in ram_layers.iter_mut() {
                if layer_experts <= ram_left {
                    *r = true;
                    ram_left -= layer_experts;
                }
            }
            let in_ram = ram_layers.iter().filter(|r| **r).count();
            ram_bytes += in_ram as u64 * layer_experts;
            // Per step: the routed experts' packed bytes are read on the device, each expert
            // once for the batch ([`ExpertBytes::per_step`]); those no slot holds (uniform
            // routing: 1 − slots/count of them) are copied, and read from disk where their
            // layer's experts are not in RAM.
            let routed = e.per_step(batch) * e.unit as f64;
            let miss = 1.0 - slots_e as f64 / e.count.max(1) as f64;
            let disk_share = (layers_e - in_ram) as f64 / layers_e.max(1) as f64;
            per_token.compute_s += routed / input.bandwidth.device;
            per_token.copy_s += routed * miss / input.bandwidth.host_to_device;
            per_token.disk_s += routed * miss * disk_share / input.bandwidth.disk;
            if in_ram < layers_e {
                ram_bytes += 2 * e.unit;
            }
            (slots_e < e.count).then_some(crate::experts::ExpertPlacement { slots: slots_e, ram_layers })
        }
    };
    // An offloaded cache's blocks come over every token too: from RAM what the budget left
    // after the layers holds, from the spill file the rest.
    // Each sequence's cache takes an equal share of that RAM.
    let kv_plan = kv_offloaded.then_some(KvPlan {
        block: KV_BLOCK,
        ram_bytes: ram_left / batch as u64,
        window_bytes: kv_windows / 2 / batch as u64,
        window_positions: input.context,
    });
    let kv_ram = kv_plan.map_or(0, |k| k.ram_bytes.saturating_mul(batch as u64).min(kv_all));
    if kv_offloaded {
        per_token.copy_s += kv_all as f64 / input.bandwidth.host_to_device;
        per_token.disk_s += (kv_all - kv_ram) as f64 / input.bandwidth.disk;
    }
    Ok(Plan {
        tiers,
        batch,
        kv_bytes: kv_all,
        slots,
        slot_bytes,
        staging_buffers,
        vram_bytes,
        ram_bytes: ram_bytes + staging_buffers as u64 * slot_set + kv_ram,
        per_token,
        kv: kv_plan,
        experts,
    })
}

/// The largest batch of at most `limit` sequences (each of `input.context` positions) that fits
/// the budgets, and its plan: the plan succeeds (the device holds its KV share and activations)
/// and every sequence's KV cache stays on the device or in pinned RAM (none spills to disk,
/// which would make each step read it back). `activation(n)` gives the activation bytes of a
/// step of `n` sequences. A single sequence that plans is always chosen; one that does not gives
/// its error.
pub fn choose_batch(
    input: &PlanInput,
    limit: usize,
    activation: &dyn Fn(usize) -> u64,
) -> Result<(usize, Plan), PlanError> {
    let with = |n: usize| PlanInput { max_batch: n, activation_bytes: activation(n), ..input.clone() };
    for n in (2..=limit.max(1)).rev() {
        if let Ok(p) = plan(&with(n)) {
            let held = p.kv.map_or(u64::MAX, |k| k.ram_bytes.saturating_mul(n as u64));
            if held >= p.kv_bytes {
                return Ok((n, p));
            }
        }
    }
    plan(&with(1)).map(|p| (1, p))
}

/// Bytes of the layers placed in `tier`.
pub fn tier_bytes(tiers: &[Tier], layer_bytes: &[u64], tier: Tier) -> u64 {
    tiers.iter().zip(layer_bytes).filter(|(t, _)| **t == tier).map(|(_, b)| *b).sum()
}

/// The time per decoded token a placement predicts: every weight and the KV cache (`other_bytes`
/// besides the layers) read once from device memory, the streamed layers copied, the disk layers
/// read.
pub fn token_time(tiers: &[Tier], layer_bytes: &[u64], other_bytes: u64, bw: Bandwidths) -> TokenTime {
    let (ram, disk) = (tier_bytes(tiers, layer_bytes, Tier::Ram), tier_bytes(tiers, layer_bytes, Tier::Disk));
    let all: u64 = layer_bytes.iter().sum();
    TokenTime {
        compute_s: (all + other_bytes) as f64 / bw.device,
        copy_s: (ram + disk) as f64 / bw.host_to_device,
        disk_s: disk as f64 / bw.disk,
    }
}

/// `k` of `n` indices spread evenly (0, n/k, 2n/k, ...).
fn spread(k: usize, n: usize) -> Vec<usize> {
    (0..k).map(|j| j * n / k.max(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    /// A config whose KV figure does not fit u64 (sizes from a hostile file) is refused for the
    /// budget, not wrapped into a small cache that fits.
    #[test]
    fn a_kv_cache_beyond_u64_is_refused_not_wrapped() {
        let mut input = llama8b(8 * GIB, 0, 1 << 24);
        input.kv_bytes_per_position = u64::MAX / 3;
        input.kv_full_layers = 1;
        assert!(matches!(plan(&input), Err(PlanError::Vram { .. })), "{:?}", plan(&input));
        input.kv_offload = Some(true);
        assert!(matches!(plan(&input), Err(PlanError::Vram { .. })), "{:?}", plan(&input));
    }

    /// Llama-3.1-8B in bf16: 32 layers of 436 MiB (218,112,000 params), embed + head 2 × 1002 MiB.
    fn llama8b(vram: u64, ram: u64, context: usize) -> PlanInput {
        PlanInput {
            layer_bytes: vec![436_224_000; 32],
            resident_bytes: 2 * 1_050_673_152 + 8192,
            kv_bytes_per_position: 128 * 1024,
            kv_full_layers: 32,
            kv_sliding_bytes: 0,
            context,
            activation_bytes: 200 * MIB,
            context_overhead_bytes: 600 * MIB,
            vram_budget: vram,
            ram_budget: ram,
            max_resident_layers: None,
            slots: 2,
            slot_groups: 1,
            bandwidth: Bandwidths { device: 2.9e12, host_to_device: 55e9, disk: 1.1e9 },
            max_batch: 1,
            kv_offload: None,
            experts: None,
            max_expert_slots: None,
        }
    }

    /// GPT-OSS-20B with MXFP4 experts: 24 layers of 53 MiB (attention, router), 768 experts of
    /// 12.7 MiB, embedding + head 2 × 1.08 GiB.
    fn gpt_oss_20b(vram: u64, ram: u64) -> PlanInput {
        let unit = 2 * 2880 * (2880 / 2 + 2880 / 32) + 2880 * (2880 / 2 + 2880 / 32) + 2 * (2 * 2880 + 2880);
        PlanInput {
            layer_bytes: vec![55_000_000; 24],
            resident_bytes: 2 * 201_088 * 2880 * 2,
            kv_bytes_per_position: 12 * 2048,
            kv_full_layers: 12,
            kv_sliding_bytes: 12 * 2048 * 2175,
            experts: Some(ExpertBytes { count: 768, per_layer: 32, unit: unit as u64, per_token: 96 }),
            ..llama8b(vram, ram, 16384)
        }
    }

    #[test]
    fn moe_experts_fill_the_vram_left_and_wait_in_ram() {
        let p = plan(&gpt_oss_20b(8 * GIB, 64 * GIB)).expect("plan");
        assert!(p.tiers.iter().all(|t| *t == Tier::Vram), "attention layers first: {:?}", p.tiers);
        let e = p.experts.clone().expect("experts do not all fit in 8 GiB");
        let input = gpt_oss_20b(8 * GIB, 64 * GIB);
        let unit = input.experts.expect("experts").unit;
        assert!(e.slots > 100 && e.slots < 768, "{}", e.slots);
        assert!(p.vram_bytes + EXPERT_MARGIN <= 8 * GIB, "{}", p.vram_bytes);
        assert!(p.vram_bytes + EXPERT_MARGIN + unit > 8 * GIB, "the budget is used: {}", p.vram_bytes);
        assert!(e.ram_layers.iter().all(|r| *r));
        // Copies: the routed experts that miss, 1 − slots/768 of 96 per token.
        let miss = 1.0 - e.slots as f64 / 768.0;
        assert!((p.per_token.copy_s - 96.0 * unit as f64 * miss / 55e9).abs() < 1e-9, "{:?}", p.per_token);
        // No RAM: from disk, through two staging buffers.
        let d = plan(&gpt_oss_20b(8 * GIB, 0)).expect("plan");
        assert!(d.experts.expect("cache").ram_layers.iter().all(|r| !r));
        assert!(d.per_token.disk_s > 0.2, "{:?}", d.per_token);
        // A big card holds every expert: no cache, unless --expert-slots asks for one.
        assert!(plan(&gpt_oss_20b(80 * GIB, 0)).expect("plan").experts.is_none());
        let capped = plan(&PlanInput { max_expert_slots: Some(5), ..gpt_oss_20b(80 * GIB, 0) }).expect("plan");
        assert_eq!(capped.experts.map(|e| e.slots), Some(5));
    }

    #[test]
    fn everything_resident_when_it_fits() {
        let p = plan(&llama8b(80 * GIB, 0, 8192)).expect("plan");
        assert!(p.tiers.iter().all(|t| *t == Tier::Vram));
        assert_eq!((p.slots, p.staging_buffers, p.ram_bytes), (0, 0, 0));
        assert_eq!(p.per_token.copy_s, 0.0);
    }

    #[test]
    fn eight_gib_streams_the_rest_from_ram_or_disk() {
        let with_ram = plan(&llama8b(8 * GIB, 64 * GIB, 8192)).expect("plan");
        let vram = with_ram.tiers.iter().filter(|t| **t == Tier::Vram).count();
        // 8 GiB − (0.59 context + 1.96 weights + 1 KV + 0.2 act + 2 slots × 0.41) leaves room for 8 layers.
        assert_eq!(vram, 8, "{:?}", with_ram.tiers);
        assert!(with_ram.vram_bytes <= 8 * GIB);
        assert!(with_ram.tiers.iter().all(|t| *t != Tier::Disk));
        assert_eq!(with_ram.staging_buffers, 0);
        // Resident layers are spread through the stack, not bunched at the start.
        assert_eq!(with_ram.tiers[0], Tier::Vram);
        assert_eq!(with_ram.tiers[4], Tier::Vram);
        assert_eq!(with_ram.tiers[28], Tier::Vram);
        let copy = 24.0 * 436_224_000.0 / 55e9;
        assert!((with_ram.per_token.copy_s - copy).abs() < 1e-9);
        assert_eq!(with_ram.per_token.bound_s(), with_ram.per_token.copy_s);

        let no_ram = plan(&llama8b(8 * GIB, 0, 8192)).expect("plan");
        assert_eq!(no_ram.tiers.iter().filter(|t| **t == Tier::Disk).count(), 24);
        assert_eq!(no_ram.staging_buffers, 2);
        assert_eq!(no_ram.per_token.bound_s(), no_ram.per_token.disk_s);

        // Half the streamed layers fit in RAM; the disk half adds two staging buffers.
        let some = plan(&llama8b(8 * GIB, 12 * 436_224_000 + 1000, 8192)).expect("plan");
        assert_eq!(some.tiers.iter().filter(|t| **t == Tier::Ram).count(), 12);
        assert_eq!(some.tiers.iter().filter(|t| **t == Tier::Disk).count(), 12);
        assert_eq!(some.staging_buffers, 2);
        assert_eq!(some.ram_bytes, 14 * 436_224_000);
    }

    #[test]
    fn a_100k_context_moves_the_kv_cache_off_the_device() {
        // 100K positions of KV are 12.2 GiB: more than the budget, so the cache goes to pinned
        // RAM with two one-layer windows on the device, and its bytes count per token.
        let p = plan(&llama8b(8 * GIB, 64 * GIB, 102_400)).expect("plan");
        let kv = p.kv.expect("offloaded");
        assert_eq!(kv.window_bytes, 102_400 * 128 * 1024 / 32);
        assert!(p.vram_bytes <= 8 * GIB);
        let weights_ram = tier_bytes(&p.tiers, &[436_224_000; 32], Tier::Ram);
        assert_eq!(kv.ram_bytes, 64 * GIB - weights_ram);
        let kv_all = 102_400.0 * 128.0 * 1024.0;
        let copy = ((32 - p.tiers.iter().filter(|t| **t == Tier::Vram).count()) as f64 * 436_224_000.0 + kv_all) / 55e9;
        assert!((p.per_token.copy_s - copy).abs() < 1e-9, "{:?}", p.per_token);
        // 8K fits on the device; forcing it off still plans.
        assert!(plan(&llama8b(8 * GIB, 64 * GIB, 8192)).expect("plan").kv.is_none());
        let forced = plan(&PlanInput { kv_offload: Some(true), ..llama8b(8 * GIB, 0, 8192) }).expect("plan");
        assert_eq!(forced.kv.map(|k| k.ram_bytes), Some(0));
        assert!(forced.per_token.disk_s > plan(&llama8b(8 * GIB, 0, 8192)).expect("plan").per_token.disk_s);
    }

    #[test]
    fn offload_knob_caps_resident_layers() {
        let mut input = llama8b(80 * GIB, 64 * GIB, 8192);
        input.max_resident_layers = Some(20);
        let p = plan(&input).expect("plan");
        assert_eq!(p.tiers.iter().filter(|t| **t == Tier::Vram).count(), 20);
        assert_eq!(p.tiers.iter().filter(|t| **t == Tier::Ram).count(), 12);
        assert_eq!(p.slots, 2);
    }

    #[test]
    fn too_small_a_budget_names_the_smallest_that_fits() {
        let err = plan(&llama8b(3 * GIB, 0, 8192)).expect_err("3 GiB");
        let PlanError::Vram { need, .. } = err.clone() else { panic!("{err:?}") };
        assert!(err.to_string().contains("raise --vram-budget to"), "{err}");
        assert!(err.to_string().contains(" GiB for 8192 positions, activations"), "{err}");
        assert!(err.to_string().ends_with(" or shorten --context") && !err.to_string().contains("batch"), "{err}");
        // That budget does plan (every layer streamed).
        let p = plan(&llama8b(need.0, 0, 8192)).expect("the named budget fits");
        assert!(p.tiers.iter().all(|t| *t == Tier::Disk));
        assert!(p.vram_bytes <= need.0);
        assert_eq!(plan(&PlanInput { layer_bytes: vec![], ..llama8b(GIB, 0, 1) }), Err(PlanError::NoLayers));
    }

    /// A batch of N sequences holds N caches of the planned context: on the device when
    /// they fit (N − 1 more caches than one sequence), else off it with two windows per sequence
    /// on the device and each sequence's share of the pinned RAM; a step reads every cache.
    #[test]
    fn a_batch_holds_every_sequences_kv_cache() {
        let one = plan(&llama8b(80 * GIB, 0, 8192)).expect("plan");
        let four = plan(&PlanInput { max_batch: 4, ..llama8b(80 * GIB, 0, 8192) }).expect("plan");
        let kv = 8192 * 128 * 1024;
        assert_eq!((one.batch, one.kv_bytes), (1, kv));
        assert_eq!((four.batch, four.kv_bytes), (4, 4 * kv));
        assert_eq!(four.vram_bytes - one.vram_bytes, 3 * kv);
        assert!(four.kv.is_none() && four.tiers.iter().all(|t| *t == Tier::Vram));
        let read = |p: &Plan| p.per_token.compute_s * 2.9e12;
        assert!((read(&four) - read(&one) - 3.0 * kv as f64).abs() < 1e3, "{} {}", read(&four), read(&one));

        // 16 sequences of 8K do not fit 8 GiB beside the weights: the caches go off the device.
        let p = plan(&PlanInput { max_batch: 16, ..llama8b(8 * GIB, 64 * GIB, 8192) }).expect("plan");
        let k = p.kv.expect("offloaded");
        assert_eq!(k.window_bytes, kv / 32, "a window holds one layer of one sequence");
        let weights_ram = tier_bytes(&p.tiers, &[436_224_000; 32], Tier::Ram);
        assert_eq!(k.ram_bytes, (64 * GIB - weights_ram) / 16, "each sequence's share");
        assert!(p.vram_bytes <= 8 * GIB);
        let single = plan(&PlanInput { kv_offload: Some(true), ..llama8b(8 * GIB, 64 * GIB, 8192) }).expect("plan");
        // Beside the resident layers, the device holds 15 more sequences' two windows.
        let beside = |q: &Plan| q.vram_bytes - tier_bytes(&q.tiers, &[436_224_000; 32], Tier::Vram);
        assert_eq!(beside(&p) - beside(&single), 15 * 2 * kv / 32);
        // The error names the batch.
        let err = plan(&PlanInput { max_batch: 64, kv_offload: Some(false), ..llama8b(8 * GIB, 0, 8192) })
            .expect_err("64 caches of 1 GiB on an 8 GiB device");
        assert!(
            err.to_string().contains("for 64 sequences of 8192 positions")
                && err.to_string().contains("lower --max-batch"),
            "{err}"
        );
    }

    /// The largest batch whose caches stay on the device or in pinned RAM: one more would
    /// spill to disk or not plan; a short context fits the limit; a budget that holds no
    /// sequence gives the single sequence's error.
    #[test]
    fn choose_batch_takes_the_largest_batch_that_fits() {
        // Activations: 200 MiB plus 2 MiB per sequence.
        let act = |n: usize| 200 * MIB + 2 * MIB * n as u64;
        let input = llama8b(8 * GIB, 64 * GIB, 8192);
        let (n, p) = choose_batch(&input, MAX_BATCH, &act).expect("a batch");
        assert!(n > 1 && n < MAX_BATCH, "{n}");
        assert_eq!(p.batch, n);
        assert_eq!(p, plan(&PlanInput { max_batch: n, activation_bytes: act(n), ..input.clone() }).expect("plan"));
        let k = p.kv.expect("offloaded");
        assert!(k.ram_bytes * n as u64 >= p.kv_bytes, "the caches fit the RAM: {k:?}");
        let next = plan(&PlanInput { max_batch: n + 1, activation_bytes: act(n + 1), ..input.clone() });
        assert!(!next.is_ok_and(|q| q.kv.is_none_or(|k| k.ram_bytes * (n as u64 + 1) >= q.kv_bytes)), "{n} + 1 fits");
        // Some 50 GiB of RAM left after the streamed layers holds about 50 caches of 1 GiB.
        assert!((40..=60).contains(&n), "{n}");

        let short = llama8b(8 * GIB, 64 * GIB, 512);
        assert_eq!(choose_batch(&short, MAX_BATCH, &act).expect("plan").0, MAX_BATCH);
        assert_eq!(choose_batch(&short, 7, &act).expect("plan").0, 7);
        // Everything on an 80 GiB card: the caches stay on the device, beside the weights.
        let (big, bp) = choose_batch(&llama8b(80 * GIB, 0, 8192), MAX_BATCH, &act).expect("plan");
        assert!(bp.kv.is_none() || bp.kv.is_some_and(|k| k.ram_bytes * big as u64 >= bp.kv_bytes));
        assert!(big >= 50, "{big}");

        let err = choose_batch(&llama8b(3 * GIB, 0, 8192), MAX_BATCH, &act).expect_err("3 GiB");
        assert_eq!(Err(err), plan(&PlanInput { activation_bytes: act(1), ..llama8b(3 * GIB, 0, 8192) }));
    }

    /// A MoE step reads each routed expert once for the batch: 16 GPT-OSS-20B tokens use
    /// about 677 of 768 experts (1 − (7/8)^16 of each layer's), not 16 × 96.
    #[test]
    fn a_moe_batch_reads_each_expert_once_per_step() {
        let e = gpt_oss_20b(8 * GIB, 0).experts.expect("experts");
        assert_eq!(e.per_step(1), 96.0);
        let sixteen = e.per_step(16);
        assert!((sixteen - 768.0 * (1.0 - 0.875f64.powi(16))).abs() < 1e-6, "{sixteen}");
        assert!(e.per_step(64) <= 768.0 && e.per_step(64) > 767.0);
        let one = plan(&gpt_oss_20b(8 * GIB, 64 * GIB)).expect("plan");
        let batch = plan(&PlanInput { max_batch: 16, ..gpt_oss_20b(8 * GIB, 64 * GIB) }).expect("plan");
        let miss = |p: &Plan| 1.0 - p.experts.as_ref().map_or(768, |x| x.slots) as f64 / 768.0;
        let unit = e.unit as f64;
        assert!((one.per_token.copy_s - 96.0 * unit * miss(&one) / 55e9).abs() < 1e-9);
        let kv_copy = batch.kv.map_or(0.0, |_| batch.kv_bytes as f64 / 55e9);
        let copy = sixteen * unit * miss(&batch) / 55e9 + kv_copy;
        assert!((batch.per_token.copy_s - copy).abs() < 1e-9, "{:?} vs {copy}", batch.per_token);
    }

    /// Layer layouts that stream apart each take their own slots: a second group costs the
    /// device `slots` more slots, that many fewer resident layers.
    #[test]
    fn each_streaming_group_has_its_own_slots() {
        let one = plan(&llama8b(8 * GIB, 64 * GIB, 8192)).expect("plan");
        let two = plan(&PlanInput { slot_groups: 2, ..llama8b(8 * GIB, 64 * GIB, 8192) }).expect("plan");
        let resident = |p: &Plan| p.tiers.iter().filter(|t| **t == Tier::Vram).count();
        assert!(one.slots > 0 && two.slots == one.slots);
        assert_eq!(resident(&two) + two.slots, resident(&one), "{} vs {}", resident(&two), resident(&one));
        assert!(two.vram_bytes <= 8 * GIB);
    }
}

//! Turning `--model`, `--device` and `--vram-budget` into a loaded model, tokenizer and defaults.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ollm_engine::{ChatModel, GenerationConfig, PrefixReport, Session};
use ollm_models::{CausalLm, load_model_placed};
use ollm_ops::bytes::gib;
use ollm_ops::cpu::{CpuBackend, Precision};
use ollm_ops::cuda::{CudaBackend, CudaDevice};
use ollm_ops::{Backend, MemoryKind};
use ollm_residency::plan::{Plan, Tier};
use ollm_tokenizer::{ChatTemplate, Tokenizer};

use crate::commands::{DeviceArg, ModelArgs};
use crate::progress::note;

/// Everything a command needs from a model directory.
pub struct Loaded {
    pub dir: PathBuf,
    pub model: Arc<dyn CausalLm>,
    pub generation: GenerationConfig,
    pub load_time: Duration,
    /// The backend's name ("cpu", "cuda:0 (…)").
    pub model_backend_name: String,
    /// The backend the model lives on (its memory figures: `backend.memory_stats()`).
    pub backend: Arc<dyn Backend>,
    /// The placement of the decoder layers, when the planner ran (a GPU, or budgets given).
    pub plan: Option<Plan>,
    /// The temporary directory an offloaded KV cache spills into, removed on drop.
    pub kv_temp_dir: Option<crate::planning::TempKvDir>,
    /// The persistent prefix cache (`--prefix-cache`).
    pub prefix: Option<ollm_kv::PrefixConfig>,
}

/// A model directory's tokenizer and chat template.
pub struct Text {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
}

/// The directory `--model` names.
pub fn model_dir(spec: &str) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(spec);
    if !dir.exists() {
        if crate::demo::is_demo_name(spec) {
            return crate::demo::ensure_demo();
        }
        if crate::gemma3_demo::is_name(spec) {
            return crate::gemma3_demo::ensure();
        }
        if crate::hub::is_hub_id(spec) {
            return crate::hub::ensure_model(spec, None);
        }
        return Err(crate::errors::ModelNotFound { spec: spec.to_string() }.into());
    }
    if !dir.is_dir() {
        bail!("--model {spec} is a file; give the directory that holds config.json and the weights");
    }
    Ok(dir)
}

/// The backend `--device` chose. Its memory figures (budget, context overhead, peak) come from
/// [`Memory::memory_stats`](ollm_ops::Memory::memory_stats).
pub struct Chosen {
    pub backend: Arc<dyn Backend>,
}

impl Chosen {
    /// Whether the backend has memory of its own (a GPU), which the planner must fit.
    pub fn is_device(&self) -> bool {
        self.backend.memory_kind() == MemoryKind::Device
    }
}

/// Applies `--vram-budget` to an opened device.
fn with_budget(dev: CudaDevice, vram_budget: Option<u64>) -> anyhow::Result<Arc<CudaBackend>> {
    if let Some(budget) = vram_budget {
        let budget = usize::try_from(budget).unwrap_or(usize::MAX);
        let total = dev.info.total_bytes;
        if budget > total {
            eprintln!(
                "[ollm] --vram-budget {} exceeds cuda:{}'s {}; the device is the limit",
                gib(budget),
                dev.info.ordinal,
                gib(total)
            );
        }
        dev.set_vram_budget(budget)?;
    }
    Ok(Arc::new(CudaBackend::new(dev)))
}

/// The compute backend for `--device`: `cuda[:N]` must find a usable GPU; `auto` takes GPU 0
/// when it can and says in one line on stderr which device it chose. `--vram-budget` bounds
/// the GPU's memory (ignored on the CPU).
pub fn backend(device: DeviceArg, vram_budget: Option<u64>, cpu: CpuChoice) -> anyhow::Result<Chosen> {
    let cuda = |b: Arc<CudaBackend>| -> anyhow::Result<Chosen> {
        // Every kernel compiled and loaded now: a first run pays it here, not in its prompt.
        let (compiled, secs) = b.device().warm_kernels()?;
        if compiled > 0 {
            note(&format!("[ollm] compiled {compiled} CUDA kernel files in {secs:.1} s (once; cached for later runs)"));
        }
        Ok(Chosen { backend: b })
    };
    match device {
        DeviceArg::Cpu => Ok(Chosen { backend: cpu_backend(cpu)? }),
        DeviceArg::Cuda(n) => {
            let dev = ollm_ops::cuda::probe(n).with_context(|| format!("--device cuda:{n}"))?;
            cuda(with_budget(dev, vram_budget)?)
        }
        DeviceArg::Auto => match ollm_ops::cuda::probe(0) {
            Ok(dev) => {
                let b = with_budget(dev, vram_budget)?;
                let budget = vram_budget
                    .map_or(String::new(), |_| format!(", VRAM budget {}", gib(b.device().vram().budget_bytes())));
                note(&format!("[ollm] device: {}{budget}", b.name()));
                cuda(b)
            }
            Err(_) => {
                note("[ollm] device: cpu (no usable GPU; --device cuda says why)");
                Ok(Chosen { backend: cpu_backend(cpu)? })
            }
        },
    }
}

/// How the CPU backend runs: `--cpu-activations` and `--cpu-kv` (None: the KV dtype that goes
/// with the precision, see [`CpuBackend::with_precision`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuChoice {
    pub precision: Precision,
    pub kv: Option<ollm_ops::DType>,
}

/// The CPU backend `ollm` runs: the best kernels the CPU has (or the tier `OLLM_CPU_KERNELS`
/// names; an unknown name is an error here) at the precision `--cpu-activations` chose (bf16
/// activations are like the GPU's bf16 math and llama.cpp's BF16 path), with its KV cache in
/// the dtype `--cpu-kv` chose.
fn cpu_backend(cpu: CpuChoice) -> anyhow::Result<Arc<CpuBackend>> {
    ollm_ops::cpu::tier_from_env()?;
    let be = CpuBackend::with_precision(cpu.precision);
    Ok(Arc::new(match cpu.kv {
        Some(dtype) => be.with_kv_dtype(dtype)?,
        None => be,
    }))
}

pub fn load_text(dir: &std::path::Path) -> anyhow::Result<Text> {
    let tokenizer = Tokenizer::from_dir(dir)?;
    let template = ChatTemplate::from_dir(dir)?;
    Ok(Text { tokenizer, template })
}

/// Loads the model (config first, so a bad config fails before any weight is read). A temporary
/// KV spill directory is also removed on Ctrl-C, which then ends the process.
pub fn load(args: &ModelArgs) -> anyhow::Result<Loaded> {
    load_with(args, None, None)
}

/// [`load`] for a host process that owns Ctrl-C (the Python package): no signal handler is
/// installed; a temporary KV spill directory is removed when the [`Loaded`] drops.
pub fn load_embedded(args: &ModelArgs) -> anyhow::Result<Loaded> {
    load_inner(args, None, None, false)
}

/// How a command that runs many sequences together (`batch`, `serve`, `bench --batch`) wants
/// its plan: `max_batch` sequences (None: the largest that fits the budgets, at most
/// [`MAX_BATCH`]) and steps of at most `step_tokens` tokens.
#[derive(Debug, Clone, Copy)]
pub struct BatchWanted {
    pub max_batch: Option<usize>,
    pub step_tokens: usize,
}

/// [`load`] planned for a batch: the plan reserves the KV of every sequence and the
/// activations of a step ([`Loaded::default_max_batch`] then says how many).
pub fn load_for_batch(args: &ModelArgs, batch: Option<BatchWanted>) -> anyhow::Result<Loaded> {
    load_with(args, batch, None)
}

/// Loads the model leaving room on the device for a draft model of `draft` bytes
/// (`--speculate draft:MODEL`, which [`SpecArgs::params`](crate::speculation::SpecArgs::params)
/// loads next).
pub fn load_with_draft(args: &ModelArgs, draft: Option<crate::planning::DraftBytes>) -> anyhow::Result<Loaded> {
    load_with(args, None, draft)
}

/// [`load`] with a batch plan ([`load_for_batch`]) and room for a draft model
/// ([`load_with_draft`]).
pub fn load_with(
    args: &ModelArgs,
    batch: Option<BatchWanted>,
    draft: Option<crate::planning::DraftBytes>,
) -> anyhow::Result<Loaded> {
    load_inner(args, batch, draft, true)
}

fn load_inner(
    args: &ModelArgs,
    batch: Option<BatchWanted>,
    draft: Option<crate::planning::DraftBytes>,
    cleanup_on_interrupt: bool,
) -> anyhow::Result<Loaded> {
    let dir = model_dir(&args.model)?;
    let chosen = backend(args.device, args.vram_budget, args.cpu_choice(Precision::Bf16Activations))?;
    let generation = GenerationConfig::from_dir(&dir)?;
    // On a GPU, or when a budget is given, the planner decides where each layer lives; it fails
    // here, before any weight is read, if the model cannot fit.
    let mut budgets = crate::planning::Budgets { draft, ..args.budgets() };
    if let Some(b) = batch {
        budgets.max_batch = b.max_batch;
        budgets.step_tokens = Some(b.step_tokens);
    }
    let wants_plan = chosen.is_device()
        || budgets.vram.is_some()
        || budgets.ram.is_some()
        || budgets.offload_layers_to_cpu.is_some()
        || budgets.expert_slots.is_some();
    let plan = match (wants_plan, batch) {
        (false, _) => None,
        // A batch of a size the user chose must fit (the planner says so, naming --max-batch).
        (true, None) | (true, Some(BatchWanted { max_batch: Some(_), .. })) => {
            Some(crate::planning::make_plan(&dir, &chosen, &budgets, None)?.0)
        }
        (true, Some(BatchWanted { max_batch: None, .. })) => {
            Some(crate::planning::choose_batch(&dir, &chosen, &budgets, None)?.1)
        }
    };
    let spill = match plan.as_ref().and_then(|p| p.kv) {
        Some(_) => Some(crate::planning::kv_spill_dir(args.kv_cache_dir.as_deref(), cleanup_on_interrupt)?),
        None => None,
    };
    let placement = plan
        .as_ref()
        .filter(|p| p.kv.is_some() || p.experts.is_some() || p.tiers.iter().any(|t| *t != Tier::Vram))
        .map(|p| p.placement(spill.as_ref().map_or(Path::new("."), |(d, _)| d.as_path())));
    if let (Some(p), Some(_)) = (&plan, &placement) {
        note(&format!("[ollm] streaming: {}", crate::planning::describe(p, chosen.backend.memory_kind())));
    }
    let Chosen { backend } = chosen;
    let t0 = Instant::now();
    let model_backend_name = backend.name();
    let model = load_model_placed(&dir, backend.clone(), placement.as_ref())
        .with_context(|| format!("loading {}", dir.display()))?;
    if args.expert_prefetch && !model.set_expert_prefetch(true) {
        note("[ollm] --expert-prefetch: this model has no expert prefetch; ignored");
    }
    let kv_temp_dir = spill.and_then(|(_, guard)| guard);
    Ok(Loaded {
        dir,
        model,
        generation,
        load_time: t0.elapsed(),
        model_backend_name,
        backend,
        plan,
        kv_temp_dir,
        prefix: args.prefix_config(),
    })
}

/// The most sequences `--max-batch` takes.
pub const MAX_BATCH: usize = 64;

impl Loaded {
    /// Sequences generated together when `--max-batch` is not given: what the plan sized
    /// ([`load_for_batch`]), or 16 where nothing plans memory (the CPU without budgets: each
    /// sequence's KV grows as it is used).
    pub fn default_max_batch(&self) -> usize {
        self.plan.as_ref().map_or(16, |p| p.batch.max(1))
    }

    /// A fresh session over the model, with the prefix cache when one is configured.
    pub fn session(&self) -> anyhow::Result<Session> {
        Ok(ollm_engine::session_with_prefix(self.model.clone(), self.prefix.as_ref())?)
    }

    /// What the prefix cache did in one generation, as lines for standard error: rejected
    /// entries and a failed store as warnings, then one summary line. `ttft` is the time to
    /// the first token.
    pub fn prefix_lines(&self, report: &PrefixReport, prompt_tokens: usize, ttft: Duration) -> Vec<String> {
        prefix_lines(report, prompt_tokens, ttft)
    }

    /// One line of weight-streaming figures, when layers are streamed.
    pub fn stream_line(&self) -> Option<String> {
        let s = self.model.stream_stats()?;
        let rate = |bytes: u64, secs: f64| if secs > 0.0 { bytes as f64 / secs / 1e9 } else { 0.0 };
        Some(format!(
            "[ollm] streaming: {} layers passed through {} slots | disk {} read at {:.2} GB/s ({} layers) | copies {} | pinned RAM {} ({} layers cached) | compute waited {:.2} s for weights",
            s.layers_streamed,
            s.slots,
            crate::resources::human_bytes(s.disk_bytes),
            rate(s.disk_bytes, s.disk_secs),
            s.disk_layers,
            crate::resources::human_bytes(s.copy_bytes),
            crate::resources::human_bytes(s.pinned_bytes),
            s.ram_layers,
            s.wait_secs,
        ))
    }

    /// The expert cache's counters, for MoE models (`--stats`).
    pub fn expert_line(&self) -> Option<String> {
        let s = self.model.expert_stats()?;
        let uses = s.hits + s.ram_loads + s.disk_loads;
        let hb = crate::resources::human_bytes;
        Some(format!(
            "[ollm] experts: {} slots for {} experts of {} | {uses} uses, hit rate {:.1}% ({} hits, {} copied from pinned RAM, {} read from disk) | copies {} | disk {} | pinned RAM {}",
            s.slots,
            s.experts,
            hb(s.expert_bytes),
            100.0 * s.hit_rate(),
            s.hits,
            s.ram_loads,
            s.disk_loads,
            hb(s.copy_bytes),
            hb(s.disk_bytes),
            hb(s.pinned_bytes),
        ))
    }

    /// Peak GPU memory as the driver reported it (CUDA context included), when on a GPU.
    pub fn peak_vram_bytes(&self) -> Option<usize> {
        self.backend.memory_stats().peak_bytes.map(|b| usize::try_from(b).unwrap_or(usize::MAX))
    }

    /// The model with its tokenizer, template, eos ids and default sampling, for the front ends.
    pub fn chat_model(&self, text: Text) -> ChatModel {
        ChatModel {
            model: self.model.clone(),
            eos_token_ids: self.eos_ids(&text),
            default_sampling: self.generation.default_sampling(),
            tokenizer: text.tokenizer,
            template: text.template,
            prefix: self.prefix.clone(),
            speculate: None,
        }
    }

    /// Eos ids from config.json, generation_config.json and the chat template's eos token.
    pub fn eos_ids(&self, text: &Text) -> Vec<u32> {
        let mut ids = self.model.info().eos_token_ids.clone();
        ids.extend(&self.generation.eos_token_ids);
        if let Some(id) = text.template.as_ref().and_then(|t| text.tokenizer.token_to_id(&t.eos_token)) {
            ids.push(id);
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// [`Loaded::prefix_lines`]: the warnings, then the summary line, its parts joined by "; ".
fn prefix_lines(report: &PrefixReport, prompt_tokens: usize, ttft: Duration) -> Vec<String> {
    let mut lines = Vec::new();
    let mut parts = Vec::new();
    if let Some(r) = &report.restored {
        lines.extend(r.rejected.iter().map(|l| format!("warning: {l}")));
        let rate = r.bytes as f64 / r.elapsed.as_secs_f64().max(1e-9) / 1e9;
        parts.push(format!(
            "loaded {} of {prompt_tokens} prompt tokens ({} blocks, {} at {rate:.2} GB/s) in {:.2} s",
            r.tokens,
            r.blocks,
            crate::resources::human_bytes(r.bytes),
            r.elapsed.as_secs_f64()
        ));
    }
    parts.push(format!("first token after {:.2} s", ttft.as_secs_f64()));
    if let Some(s) = &report.stored {
        lines.extend(s.rejected.iter().map(|l| format!("warning: {l}")));
        parts.push(format!(
            "stored {} new blocks ({}) in {:.2} s, {} already there, {} evicted",
            s.blocks,
            crate::resources::human_bytes(s.bytes),
            s.elapsed.as_secs_f64(),
            s.present,
            s.evicted
        ));
    }
    if let Some(e) = &report.store_error {
        lines.push(format!("warning: prompt not stored: {e}"));
    }
    lines.push(format!("[ollm] prefix cache: {}", parts.join("; ")));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_summary_has_no_dangling_separator() {
        let failed = PrefixReport {
            restored: Some(ollm_kv::Restored::default()),
            stored: None,
            store_error: Some("the disk is full".into()),
        };
        let lines = prefix_lines(&failed, 10, Duration::from_millis(1500));
        assert_eq!(lines[0], "warning: prompt not stored: the disk is full");
        let summary = lines.last().expect("summary");
        assert!(summary.ends_with("; first token after 1.50 s"), "{summary}");
        assert!(summary.starts_with("[ollm] prefix cache: loaded 0 of 10 prompt tokens"), "{summary}");
        let stored = PrefixReport { stored: Some(ollm_kv::Stored::default()), ..PrefixReport::default() };
        let summary = prefix_lines(&stored, 10, Duration::ZERO).pop().expect("summary");
        assert_eq!(
            summary,
            "[ollm] prefix cache: first token after 0.00 s; stored 0 new blocks (0 B) in 0.00 s, 0 already there, 0 evicted"
        );
    }
}

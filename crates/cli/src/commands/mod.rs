//! Subcommands, one file each.

pub mod batch;
pub mod bench;
pub mod bench_batch;
pub mod bench_long;
pub mod chat;
pub mod import_gguf;
pub mod logits;
pub mod perplexity;
pub mod plan;
pub mod pull;
pub mod run;
pub mod serve;
pub mod synth;

use clap::{Args, Subcommand};

/// Every subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt.
    Run(run::RunArgs),
    /// Write the logits of every position of a token list to a .npy file.
    Logits(logits::LogitsArgs),
    /// Perplexity of a text file.
    Perplexity(perplexity::PerplexityArgs),
    /// Convert a llama-architecture GGUF file into a Hugging Face model directory (bf16).
    ImportGguf(import_gguf::ImportGgufArgs),
    /// Measure decode speed against the memory-bandwidth bound of this machine (`--model DIR`),
    /// or GPU ops against peaks measured in the same run (`ollm bench ops`).
    Bench(bench::BenchArgs),
    /// Serve an OpenAI-compatible HTTP API (completions, chat completions, streaming).
    Serve(serve::ServeArgs),
    /// Chat with the model in the terminal.
    Chat(chat::ChatArgs),
    /// Run one request per line of a JSONL file; resumable; `--shard I/N` runs one shard of it.
    Batch(batch::BatchArgs),
    /// Join the results of a sharded batch, reporting missing and duplicated ids.
    MergeBatch(batch::MergeBatchArgs),
    /// Download a safetensors model from the Hugging Face hub.
    Pull(pull::PullArgs),
    /// Write a random-weight model shaped like a real one (for benchmarks).
    Synth(synth::SynthArgs),
    /// Show where each layer would live (VRAM, pinned RAM, disk) and the predicted time per token.
    Plan(plan::PlanArgs),
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Run(a) => run::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::ImportGguf(a) => import_gguf::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Batch(a) => batch::run(a),
        Command::MergeBatch(a) => batch::merge_run(a),
        Command::Pull(a) => pull::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Plan(a) => plan::run(a),
    }
}

/// Where the math runs: `auto`, `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceArg {
    /// The GPU when one is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

/// `--device` values: `auto`, `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<DeviceArg, String> {
    let hint = "expected auto, cpu, cuda or cuda:N (N the device number, as nvidia-smi lists it)";
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(DeviceArg::Auto),
        "cpu" => Ok(DeviceArg::Cpu),
        "cuda" => Ok(DeviceArg::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(DeviceArg::Cuda(n)),
            _ => Err(format!("'{s}': {hint}")),
        },
    }
}

/// Arguments every computing command takes.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A Hugging Face model directory (config.json, *.safetensors, tokenizer.json), a hub id
    /// ORG/NAME (downloaded on first use), or `smollm2-135m` or `gemma3-270m` for a demo model.
    #[arg(long, short = 'm')]
    pub model: String,
    /// Compute device: auto (the GPU when one is usable, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, value_name = "DEVICE", default_value = "auto", value_parser = parse_device)]
    pub device: DeviceArg,
    /// Most GPU memory to use, CUDA context included (e.g. 8GiB, 8G, 7.5GiB, 512MiB; K/M/G/T
    /// and KiB..TiB are binary, KB..TB decimal). Going over it is an error, not a crash.
    /// Default: the whole device. Ignored on the CPU.
    #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_size)]
    pub vram_budget: Option<u64>,
    /// CPU only: the activations bf16 weights meet in a matmul. bf16 (rounded once per matmul,
    /// bf16 dot products where the CPU has AVX512-BF16) or f32 (exact). Default: bf16, except for
    /// `ollm logits` and `ollm perplexity` (f32).
    #[arg(long, value_name = "f32|bf16", value_parser = parse_cpu_activations)]
    pub cpu_activations: Option<ollm_ops::cpu::Precision>,
    /// CPU only: the KV cache's dtype, f32 or bf16. Default: bf16 with bf16 activations (half
    /// the bytes attention reads per token), f32 with f32 activations.
    #[arg(long, value_name = "f32|bf16", value_parser = parse_cpu_kv)]
    pub cpu_kv: Option<ollm_ops::DType>,
    /// Pinned host memory for decoder layers that do not fit the VRAM budget; the rest are
    /// read from disk every token (0 = all of them), through two pinned staging buffers of one
    /// layer each that come on top. Default: half of the available RAM.
    #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_size_or_zero)]
    pub ram_budget: Option<u64>,
    /// Keep N fewer decoder layers on the device than would fit (oLLM's offload_layers_to_cpu):
    /// they stream from pinned RAM (or disk, past --ram-budget).
    #[arg(long, value_name = "N")]
    pub offload_layers_to_cpu: Option<usize>,
    /// MoE models: at most N experts on the device at once (an LRU cache of slots; the others
    /// wait in pinned RAM or on disk). Default: as many as the VRAM budget leaves room for.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub expert_slots: Option<u64>,
    /// MoE models (GPT-OSS): in decode, guess the next layer's experts from this layer's output
    /// and copy them ahead, during the next layer's attention. Never changes the results; a
    /// wrong guess costs bus time (`bench` reports how many guesses were used).
    #[arg(long)]
    pub expert_prefetch: bool,
    /// Positions (prompt + generated) to reserve the KV cache for when planning what fits.
    /// Default: the model's context, at most 8192.
    #[arg(long, value_name = "N")]
    pub max_context: Option<usize>,
    /// Keep the KV cache off the GPU (blocks in pinned RAM, past --ram-budget in a spill file),
    /// with two one-layer windows on the device. Default: only when --max-context does not fit
    /// the VRAM budget otherwise.
    #[arg(long)]
    pub kv_offload: bool,
    /// Where an offloaded KV cache spills (O_DIRECT files, removed when the run ends). Default:
    /// a temporary directory, removed at exit and on Ctrl-C.
    #[arg(long, value_name = "DIR")]
    pub kv_cache_dir: Option<std::path::PathBuf>,
    /// Keep prompts' KV blocks in DIR across runs: a later prompt that starts the same way (the
    /// same long document, a new question) loads them instead of recomputing them. Entries are
    /// keyed by the model's identity and the tokens; a corrupt one is reported and recomputed.
    #[arg(long, value_name = "DIR")]
    pub prefix_cache: Option<std::path::PathBuf>,
    /// Most disk the prefix cache may take (all models in DIR together); the least recently
    /// used entries go first.
    #[arg(long, value_name = "SIZE", default_value = "32GiB", value_parser = crate::units::parse_size)]
    pub prefix_cache_max: u64,
}

impl ModelArgs {
    /// The CPU backend's settings: `--cpu-activations` (bf16 unless `default` says otherwise)
    /// and `--cpu-kv`.
    pub fn cpu_choice(&self, default: ollm_ops::cpu::Precision) -> crate::loaded::CpuChoice {
        crate::loaded::CpuChoice { precision: self.cpu_activations.unwrap_or(default), kv: self.cpu_kv }
    }

    pub fn budgets(&self) -> crate::planning::Budgets {
        crate::planning::Budgets {
            vram: self.vram_budget,
            ram: self.ram_budget,
            offload_layers_to_cpu: self.offload_layers_to_cpu,
            expert_slots: self.expert_slots.map(|n| n as usize),
            max_context: self.max_context,
            kv_offload: self.kv_offload.then_some(true),
            prefix_cache: self.prefix_cache.is_some(),
            draft: None,
            max_batch: None,
            step_tokens: None,
        }
    }

    /// The persistent prefix cache, when `--prefix-cache` names one.
    pub fn prefix_config(&self) -> Option<ollm_kv::PrefixConfig> {
        self.prefix_cache
            .as_ref()
            .map(|dir| ollm_kv::PrefixConfig { dir: dir.clone(), max_bytes: self.prefix_cache_max })
    }
}

/// `--cpu-kv`: f32 or bf16.
fn parse_cpu_kv(s: &str) -> Result<ollm_ops::DType, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" => Ok(ollm_ops::DType::F32),
        "bf16" => Ok(ollm_ops::DType::BF16),
        _ => Err(format!("--cpu-kv {s}: give f32 or bf16")),
    }
}

/// `--cpu-activations`: f32 or bf16.
fn parse_cpu_activations(s: &str) -> Result<ollm_ops::cpu::Precision, String> {
    match s {
        "f32" => Ok(ollm_ops::cpu::Precision::Exact),
        "bf16" => Ok(ollm_ops::cpu::Precision::Bf16Activations),
        _ => Err(format!("--cpu-activations {s}: give f32 or bf16")),
    }
}

#[cfg(test)]
mod tests {
    use super::{DeviceArg, parse_cpu_activations, parse_cpu_kv, parse_device};
    use ollm_ops::cpu::Precision;

    #[test]
    fn cpu_activation_spellings() {
        assert_eq!(parse_cpu_activations("f32"), Ok(Precision::Exact));
        assert_eq!(parse_cpu_activations("bf16"), Ok(Precision::Bf16Activations));
        let e = parse_cpu_activations("fp8").expect_err("fp8");
        assert!(e.contains("--cpu-activations fp8") && e.contains("f32 or bf16"), "{e}");
        assert_eq!(parse_cpu_kv("BF16"), Ok(ollm_ops::DType::BF16));
        let e = parse_cpu_kv("f16").expect_err("f16");
        assert!(e.contains("--cpu-kv f16") && e.contains("f32 or bf16"), "{e}");
    }

    #[test]
    fn device_spellings() {
        assert_eq!(parse_device("auto"), Ok(DeviceArg::Auto));
        assert_eq!(parse_device("cpu"), Ok(DeviceArg::Cpu));
        assert_eq!(parse_device("cuda"), Ok(DeviceArg::Cuda(0)));
        assert_eq!(parse_device("cuda:3"), Ok(DeviceArg::Cuda(3)));
        assert_eq!(parse_device("CUDA:1"), Ok(DeviceArg::Cuda(1)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "cuda1", ""] {
            let e = parse_device(bad).expect_err(bad);
            assert!(e.contains("cuda:N") && !e.contains('\n'), "{bad}: {e}");
        }
    }
}

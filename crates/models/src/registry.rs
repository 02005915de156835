//! Architecture string → model family: one table ([`FAMILIES`]) that loading, the planner's
//! sizes and the activation counts all look up.

use std::path::Path;
use std::sync::Arc;

use ollm_ops::Backend;
use ollm_weights::Catalog;

use ollm_residency::plan::Placement;

use crate::common::tensors::Role;
use crate::config::RawConfig;
use crate::{CausalLm, ModelError, Result};

/// A family's loader: its config, the architecture string, the checkpoint, the backend and the
/// placement of its layers.
pub type LoadFn = fn(&RawConfig, String, &Catalog, Arc<dyn Backend>, &Placement) -> Result<Arc<dyn CausalLm>>;

/// One model family, as the registry knows it: the architecture names it answers to, how to
/// load it, and what the planner needs from its config. Adding a family is a folder under
/// `models/src` with one of these, and a line in [`FAMILIES`].
#[derive(Debug)]
pub struct Family {
    /// `architectures[0]` of config.json (and the `model_type` spelling).
    pub architectures: &'static [&'static str],
    /// Loads the model with `placement`.
    pub load: LoadFn,
    /// The config's sizes for the planner.
    pub dims: fn(&RawConfig) -> Result<Dims>,
    /// Device bytes of the activations of a forward of `rows` rows in `seqs` sequences (the
    /// family's `scratch_bytes`; one sequence: a plain forward).
    pub scratch_bytes: fn(&RawConfig, usize, usize) -> Result<u64>,
    /// Device bytes of the expert cache's unpack buffers (0 without experts).
    pub expert_work_bytes: fn(&RawConfig, &Catalog) -> Result<u64>,
    /// The role of a layer tensor (its name after `model.layers.{l}.`) in the family's table:
    /// whether it streams with its layer, stays resident, or is an expert's.
    pub role: fn(&str) -> Role,
    /// Whether a checkpoint tensor (its whole name) is one the family reads; the others are
    /// dropped from the catalog before anything counts or reads them.
    pub uses: fn(&str) -> bool,
}

/// A checkpoint that keeps a family's language model beside other towers (a vision encoder and
/// its projector): the text settings nested in a section of config.json, the text tensors under
/// other names. The family runs the text part; the other towers are dropped by name.
#[derive(Debug)]
pub struct Wrapper {
    /// `architectures[0]` of config.json (and the `model_type` spelling).
    pub architectures: &'static [&'static str],
    /// The family that runs the text part.
    pub family: &'static Family,
    /// The config.json key of the text settings (`text_config`).
    pub section: &'static str,
    /// The text config class's defaults for the fields the section may omit.
    pub text_defaults: fn() -> serde_json::Map<String, serde_json::Value>,
    /// Keys the top level decides over the section: (key, default when the top level lacks it).
    pub from_top: fn() -> Vec<(&'static str, Option<serde_json::Value>)>,
    /// Checkpoint name prefix → the family's (one pair per spelling a writer used).
    pub renames: &'static [(&'static str, &'static str)],
}

/// The wrapped checkpoints this build runs the text part of.
pub const WRAPPERS: [&Wrapper; 1] = [&crate::gemma3::WRAPPER];

/// A model directory's config, read as the family that runs it sees it.
#[derive(Debug)]
struct Resolved {
    family: &'static Family,
    /// The architecture config.json names.
    arch: String,
    /// The family's config: the file's, or a wrapper's text section.
    raw: RawConfig,
    wrapper: Option<&'static Wrapper>,
}

/// Reads `dir`'s config.json and finds its family (through a wrapper for a multimodal
/// checkpoint: its text section, with the defaults filled in).
fn resolve(dir: &Path) -> Result<Resolved> {
    let raw = RawConfig::read(dir)?;
    let arch = raw.architecture()?;
    if let Some(w) = WRAPPERS.iter().find(|w| w.architectures.contains(&arch.as_str())) {
        let text = raw.nested(w.section, (w.text_defaults)(), &(w.from_top)())?;
        return Ok(Resolved { family: w.family, arch, raw: text, wrapper: Some(w) });
    }
    let (family, arch) = family(&raw)?;
    Ok(Resolved { family, arch, raw, wrapper: None })
}

/// `dir`'s checkpoint without the tensors the family does not read (a wrapper's text tensors
/// renamed to the family's names first).
fn open_catalog(dir: &Path, r: &Resolved) -> Result<Catalog> {
    let (family, mut catalog) = (r.family, Catalog::open_dir(dir)?);
    if let Some(w) = r.wrapper {
        catalog.rename_prefixes(w.renames)?;
    }
    let dropped = catalog.retain(family.uses);
    if !dropped.is_empty() {
        tracing::debug!("{}: {} tensors the model does not use are skipped", dir.display(), dropped.len());
    }
    Ok(catalog)
}

/// The families this build can run.
pub const FAMILIES: [&Family; 6] = [
    &crate::llama3::FAMILY,
    &crate::gpt_oss::FAMILY,
    &crate::qwen3_next::FAMILY,
    &crate::llama3::QWEN2_FAMILY,
    &crate::llama3::QWEN3_FAMILY,
    &crate::gemma3::FAMILY,
];

/// Architectures this build can run (each family's and wrapper's first spelling).
pub fn supported() -> Vec<&'static str> {
    let wrapped = WRAPPERS.iter().filter_map(|w| w.architectures.first().copied());
    FAMILIES.iter().filter_map(|f| f.architectures.first().copied()).chain(wrapped).collect()
}

/// The family of `raw`'s architecture.
fn family(raw: &RawConfig) -> Result<(&'static Family, String)> {
    let arch = raw.architecture()?;
    match FAMILIES.iter().find(|f| f.architectures.contains(&arch.as_str())) {
        Some(f) => Ok((f, arch)),
        None => Err(unsupported(raw, &arch)),
    }
}

/// Loads the model in a Hugging Face directory (config.json + safetensors) onto `backend`.
/// The config is parsed and checked before any weight is read.
pub fn load_model(dir: &Path, backend: Arc<dyn Backend>) -> Result<Arc<dyn CausalLm>> {
    load_model_placed(dir, backend, None)
}

/// Like [`load_model`], with the decoder layers placed as `placement` says (None: all resident).
pub fn load_model_placed(
    dir: &Path,
    backend: Arc<dyn Backend>,
    placement: Option<&Placement>,
) -> Result<Arc<dyn CausalLm>> {
    let r = resolve(dir)?;
    let raw = &r.raw;
    // OLLM_ALLOW_HEADERS_ONLY=1 runs one anyway (every weight zero): to measure the device
    // memory of a shape larger than the disk, never its speed or its output.
    if raw.bool_or(crate::synth::HEADERS_ONLY_KEY, false)? && std::env::var_os("OLLM_ALLOW_HEADERS_ONLY").is_none() {
        return Err(raw.err(
            crate::synth::HEADERS_ONLY_KEY,
            "this model was written by `ollm synth --headers-only`: it has no weights; only `ollm plan` reads it (synth without --headers-only writes one that runs)",
        ));
    }
    // The config is checked before the catalog is opened.
    let n_layers = (r.family.dims)(raw)?.n_layers;
    let catalog = open_catalog(dir, &r)?;
    let all = Placement::resident(n_layers);
    (r.family.load)(raw, r.arch.clone(), &catalog, backend, placement.unwrap_or(&all))
}

fn unsupported(raw: &RawConfig, arch: &str) -> ModelError {
    ModelError::Unsupported {
        path: raw.path.clone(),
        field: "architectures".into(),
        value: arch.to_string(),
        supported: supported().join(", "),
    }
}

/// What the planner needs to know about a model directory, from config.json and the
/// safetensors headers alone (no weight is read).
#[derive(Debug, Clone)]
pub struct ModelBytes {
    pub architecture: String,
    /// The config, for [`ModelBytes::scratch_bytes`].
    raw: RawConfig,
    family: &'static Family,
    /// The expert cache's unpack buffers.
    expert_work_bytes: u64,
    /// Bytes of each decoder layer (`model.layers.{l}.*`).
    pub layer_bytes: Vec<u64>,
    /// Every other tensor (embedding, head, final norm).
    pub resident_bytes: u64,
    /// KV elements per position, K and V, of every layer (multiply by the cache's element size).
    pub kv_elems_per_position: u64,
    /// Of those, the sliding-window layers' (a cache of about a window each): elements per
    /// position, how many layers, the window.
    pub sliding_kv: Option<(u64, usize, usize)>,
    pub n_layers: usize,
    /// Layers that keep a KV cache (Qwen3-Next's DeltaNet layers keep a fixed state instead).
    pub kv_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
    /// MoE models: the experts (not in `layer_bytes`).
    pub experts: Option<ollm_residency::plan::ExpertBytes>,
    /// Query heads × head dim (the attention output width).
    pub q_dim: usize,
    /// Layer layouts that stream apart (see `PlanInput::slot_groups`).
    pub layer_groups: usize,
}

/// A family's config as the planner sees it (see [`ModelBytes`]).
#[derive(Debug, Clone)]
pub struct Dims {
    pub n_layers: usize,
    pub hidden_size: usize,
    /// The widest MLP (a MoE family: the larger of its expert and dense widths).
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
    /// KV heads × head dim of an attention layer.
    pub kv_dim: usize,
    /// Query heads × head dim.
    pub q_dim: usize,
    /// Layers that keep a KV cache.
    pub kv_layers: usize,
    /// Sliding-window layers: K and V elements per position over all of them, how many, the window.
    pub sliding_kv: Option<(u64, usize, usize)>,
    /// MoE: experts per layer, experts per token, how many layers have experts.
    pub moe: Option<(usize, usize, usize)>,
    /// Layer layouts that stream apart.
    pub layer_groups: usize,
}

/// Reads a model directory's sizes for planning.
pub fn model_bytes(dir: &Path) -> Result<ModelBytes> {
    let r = resolve(dir)?;
    let d = (r.family.dims)(&r.raw)?;
    let (n_layers, moe) = (d.n_layers, d.moe);
    let catalog = open_catalog(dir, &r)?;
    let Resolved { family, arch, raw, .. } = r;
    let mut layer_bytes = vec![0u64; n_layers];
    let mut resident_bytes = 0u64;
    let mut expert_bytes = 0u64;
    for e in catalog.entries() {
        let layer = e
            .name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(n, suffix)| Some((n.parse::<usize>().ok()?, suffix)))
            .filter(|&(l, _)| l < n_layers);
        match layer.map(|(l, suffix)| (l, (family.role)(suffix))) {
            Some((_, Role::Expert)) if moe.is_some() => expert_bytes += e.len_bytes,
            Some((_, Role::Resident)) | None => resident_bytes += e.len_bytes,
            Some((l, _)) => layer_bytes[l] += e.len_bytes,
        }
    }
    let experts = moe.map(|(per_layer, k, layers)| {
        let count = layers * per_layer;
        ollm_residency::plan::ExpertBytes {
            count,
            per_layer,
            unit: expert_bytes / count.max(1) as u64,
            per_token: layers * k,
        }
    });
    Ok(ModelBytes {
        architecture: arch,
        expert_work_bytes: (family.expert_work_bytes)(&raw, &catalog)?,
        raw,
        family,
        layer_bytes,
        resident_bytes,
        // Saturating: sizes come from the config (each at most 2^20), so a product can pass u64;
        // a saturated figure makes the plan refuse the budget instead of wrapping.
        kv_elems_per_position: 2u64.saturating_mul(d.kv_layers as u64).saturating_mul(d.kv_dim as u64),
        sliding_kv: d.sliding_kv,
        n_layers,
        kv_layers: d.kv_layers,
        hidden_size: d.hidden_size,
        intermediate_size: d.intermediate_size,
        vocab_size: d.vocab_size,
        max_positions: d.max_positions,
        experts,
        q_dim: d.q_dim,
        layer_groups: d.layer_groups,
    })
}

/// The checkpoint files of `dir` and, for each of `layers`, where its tensors are in them
/// (every `model.layers.{l}.*` tensor the family reads, by suffix): what the streamer reads for
/// those layers.
pub fn layer_parts(
    dir: &Path,
    layers: &[usize],
) -> Result<(Vec<std::path::PathBuf>, Vec<Vec<ollm_residency::stream::Part>>)> {
    let catalog = open_catalog(dir, &resolve(dir)?)?;
    let parts = layers
        .iter()
        .map(|l| {
            let prefix = format!("model.layers.{l}.");
            let mut parts: Vec<ollm_residency::stream::Part> = catalog
                .entries()
                .filter_map(|e| {
                    e.name.strip_prefix(&prefix).map(|suffix| ollm_residency::stream::Part {
                        suffix: suffix.to_string(),
                        file: e.file,
                        offset: e.offset_bytes,
                        len: e.len_bytes,
                    })
                })
                .collect();
            parts.sort_by_key(|p| (p.file, p.offset));
            if parts.is_empty() {
                return Err(ModelError::Stream(format!("{}: no tensors of layer {l}", dir.display())));
            }
            Ok(parts)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((catalog.file_paths(), parts))
}

impl ModelBytes {
    /// Device bytes of the activations a forward of `rows` rows allocates at most, as the
    /// family's forward counts them from the shapes it allocates, plus the expert cache's
    /// unpacked matrices for a MoE model.
    pub fn scratch_bytes(&self, rows: usize) -> Result<u64> {
        self.batch_scratch_bytes(rows, 1)
    }

    /// [`scratch_bytes`](Self::scratch_bytes) of a batched forward of `rows` rows in `seqs`
    /// sequences (each wanting its last row's logits): the segments' buffers and a logits row
    /// per sequence besides.
    pub fn batch_scratch_bytes(&self, rows: usize, seqs: usize) -> Result<u64> {
        Ok((self.family.scratch_bytes)(&self.raw, rows, seqs)? + self.expert_work_bytes)
    }

    /// Device bytes of the activations of the largest step of at most `rows` rows over at most
    /// `seqs` sequences: the most [`batch_scratch_bytes`](Self::batch_scratch_bytes) over every
    /// row count a step can take (not only `rows`: a step a row short of two tiles holds a scratch
    /// set per tile length, one of exactly two tiles only one; see
    /// [`peak_row_counts`](crate::common::forward::peak_row_counts)). What the planner reserves.
    pub fn step_scratch_bytes(&self, rows: usize, seqs: usize) -> Result<u64> {
        let chunks = [crate::common::forward::PREFILL_TILE, crate::gpt_oss::MOE_CHUNK];
        let mut most = 0;
        for t in crate::common::forward::peak_row_counts(rows.max(1), &chunks) {
            most = most.max(self.batch_scratch_bytes(t, seqs.clamp(1, t))?);
        }
        Ok(most)
    }
}

/// The expert cache's unpack buffers for the experts of `layers` in `catalog` (0 without any).
pub fn expert_work_bytes(
    catalog: &Catalog,
    names: &crate::common::experts::ExpertNames,
    layers: &[usize],
    n_experts: usize,
    hi: (usize, usize),
) -> Result<u64> {
    if layers.is_empty() {
        return Ok(0);
    }
    let sources = crate::common::experts::expert_sources(catalog, names, layers, n_experts, hi)?;
    Ok(ollm_residency::experts::work_bytes(&sources, hi))
}

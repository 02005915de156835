//! `import_gguf`: a llama, qwen2, qwen3 or gemma3 GGUF file → a Hugging Face model directory (config.json,
//! generation_config.json, tokenizer.json, tokenizer_config.json, model.safetensors in bf16).
//!
//! Everything that can fail on the input (architecture, metadata, names, shapes, ggml types,
//! tokenizer, rope_freqs) is checked before the first byte is written. Outputs go to a staging
//! directory next to `out_dir` that is renamed into place at the end, so an interrupted import
//! never leaves a directory that looks like a complete model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::bf16;
use ollm_ops::DType;
use rayon::prelude::*;

use super::config::{ConfigExtras, LlamaDims, config_json};
use super::names::{Arch, Permute, hf_target_for, unpermute_rows};
use super::quant;
use super::reader::{GgufFile, TensorInfo};
use super::rope_scaling::{Llama3Scaling, fit_llama3};
use super::tokenizer::{special_ids, tokenizer_files};
use crate::format::safetensors_writer::{PlannedTensor, SafetensorsWriter};
use crate::staging::{Staging, check_out_dir, write_json};
use crate::{Result, WeightsError};

/// Bytes of GGUF tensor data converted per step (one progress report each).
const CHUNK_BYTES: u64 = 16 * 1024 * 1024;
/// `original_max_position_embeddings` when the file does not record it (Llama-3.x's value; only
/// ratios to it affect the frequencies, see rope_scaling.rs).
const LLAMA3_ORIGINAL_CONTEXT: u64 = 8192;

/// What an import produced.
#[derive(Clone, Debug)]
pub struct ImportSummary {
    pub out_dir: PathBuf,
    /// Tensors written to model.safetensors.
    pub n_tensors: usize,
    /// GGUF tensors read, by ggml type name.
    pub ggml_type_counts: BTreeMap<String, usize>,
    /// GGUF tensor bytes converted (the progress total).
    pub source_bytes: u64,
    pub safetensors_bytes: u64,
    pub tie_word_embeddings: bool,
    pub rope_scaling: Option<Llama3Scaling>,
    /// `tokenizer.ggml.pre`.
    pub pre_tokenizer: String,
}

/// One GGUF tensor and where it goes.
struct PlanItem<'a> {
    src: &'a TensorInfo,
    out: PlannedTensor,
    /// Heads to un-permute the rows over (q: head_count, k: head_count_kv).
    unpermute_heads: Option<usize>,
    /// Added to every weight before rounding: -1 for Gemma's norms, which llama.cpp's converter
    /// stores as `1 + w` (the HF checkpoint holds w; the model scales by 1 + w).
    shift: f32,
}

fn format_err(path: &Path, detail: impl Into<String>) -> WeightsError {
    WeightsError::Format { path: path.to_path_buf(), detail: detail.into() }
}

/// Imports the GGUF `gguf` (architecture llama, qwen2, qwen3 or gemma3) into the new directory `out_dir` (which must not exist, or be
/// empty). `progress(done, total)` is called with GGUF tensor bytes converted so far.
pub fn import_gguf(gguf: &Path, out_dir: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<ImportSummary> {
    check_out_dir(out_dir)?;
    let file = GgufFile::open(gguf)?;
    let meta = file.metadata();
    let arch_name = meta.str("general.architecture")?;
    let arch = Arch::parse(arch_name).ok_or_else(|| {
        meta.err("general.architecture", format!("'{arch_name}' cannot be imported (supported: {})", Arch::SUPPORTED))
    })?;
    let n_tokens = meta.opt_str_array("tokenizer.ggml.tokens")?.map_or(0, |t| t.len());
    let dims = LlamaDims::from_metadata_for(meta, arch, n_tokens)?;
    let tok = tokenizer_files(meta, Some(dims.context_length as u64))?;
    let special = special_ids(meta, dims.vocab_size)?;
    let plan = plan_tensors(&file, &dims)?;
    let rope_scaling = rope_scaling(&file, &dims)?;

    let names: Vec<&str> = plan.iter().map(|p| p.out.name.as_str()).collect();
    let tie_word_embeddings = !names.contains(&"lm_head.weight");
    let extras = ConfigExtras {
        special: &special,
        tie_word_embeddings,
        attention_bias: names.iter().any(|n| n.ends_with("self_attn.q_proj.bias")),
        mlp_bias: names.iter().any(|n| n.ends_with("mlp.gate_proj.bias")),
        rope_scaling: rope_scaling.as_ref(),
    };
    let config = config_json(&dims, &extras);

    let staging = Staging::create(out_dir, "import")?;
    write_json(&staging.path().join("config.json"), &config)?;
    write_json(&staging.path().join("generation_config.json"), &tok.generation_config_json)?;
    write_json(&staging.path().join("tokenizer.json"), &tok.tokenizer_json)?;
    write_json(&staging.path().join("tokenizer_config.json"), &tok.tokenizer_config_json)?;
    let weights_path = staging.path().join("model.safetensors");
    let source_bytes = write_weights(&file, &plan, &weights_path, progress)?;
    let safetensors_bytes = std::fs::metadata(&weights_path)
        .map_err(|source| WeightsError::Write { path: weights_path.clone(), source })?
        .len();
    staging.commit(out_dir)?;

    let mut ggml_type_counts = BTreeMap::new();
    for t in file.tensors() {
        *ggml_type_counts.entry(t.ggml_type.name().to_string()).or_insert(0) += 1;
    }
    Ok(ImportSummary {
        out_dir: out_dir.to_path_buf(),
        n_tensors: plan.len(),
        ggml_type_counts,
        source_bytes,
        safetensors_bytes,
        tie_word_embeddings,
        rope_scaling,
        pre_tokenizer: meta.opt_str("tokenizer.ggml.pre")?.unwrap_or_default().to_string(),
    })
}

/// Maps and checks every tensor; the plan is sorted by HF name (the safetensors data order).
fn plan_tensors<'a>(file: &'a GgufFile, dims: &LlamaDims) -> Result<Vec<PlanItem<'a>>> {
    let path = file.path();
    let mut plan = Vec::new();
    let arch = dims.arch;
    for t in file.tensors() {
        if arch == Arch::Llama && t.name == "rope_freqs.weight" {
            continue;
        }
        let target = hf_target_for(arch, &t.name).ok_or_else(|| {
            format_err(
                path,
                format!(
                    "tensor '{}' has no place in a Hugging Face {} model (a variant ollm does not import?)",
                    t.name,
                    arch.prefix()
                ),
            )
        })?;
        if let Some(l) = target.layer.filter(|&l| l >= dims.n_layers) {
            return Err(format_err(
                path,
                format!("tensor '{}' is for layer {l}, but {}.block_count is {}", t.name, arch.prefix(), dims.n_layers),
            ));
        }
        if !quant::is_supported(t.ggml_type) {
            return Err(format_err(
                path,
                format!("tensor '{}': {}", t.name, quant::QuantError::Unsupported(t.ggml_type)),
            ));
        }
        let (module, is_bias) = hf_module(&target.name);
        let want = dims.expected_shape(module, is_bias);
        if want.as_deref() != Some(t.shape().as_slice()) {
            return Err(WeightsError::Shape {
                path: path.to_path_buf(),
                name: t.name.clone(),
                got: t.shape(),
                want: want.unwrap_or_default(),
            });
        }
        let unpermute_heads = match target.permute {
            Permute::None => None,
            Permute::Query => Some(dims.n_heads),
            Permute::Key => Some(dims.n_kv_heads),
        };
        let shift = if arch == Arch::Gemma3 && target.name.ends_with("norm.weight") { -1.0 } else { 0.0 };
        let out = PlannedTensor { name: target.name, dtype: DType::BF16, shape: t.shape() };
        plan.push(PlanItem { src: t, out, unpermute_heads, shift });
    }
    plan.sort_by(|a, b| a.out.name.cmp(&b.out.name));
    // Names are checked as they are made: a hostile block count must not build a list of
    // billions of names first (the first missing one ends the check).
    let present = |name: &str| -> Result<()> {
        match plan.binary_search_by(|p| p.out.name.as_str().cmp(name)) {
            Ok(_) => Ok(()),
            Err(_) => Err(WeightsError::Missing { name: name.to_string(), location: path.display().to_string() }),
        }
    };
    present("model.embed_tokens.weight")?;
    present("model.norm.weight")?;
    let mut modules = vec![
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    if matches!(arch, Arch::Qwen3 | Arch::Gemma3) {
        modules.extend(["self_attn.q_norm", "self_attn.k_norm"]);
    }
    if arch == Arch::Gemma3 {
        modules.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
    }
    for l in 0..dims.n_layers {
        for m in &modules {
            present(&format!("model.layers.{l}.{m}.weight"))?;
        }
        if arch == Arch::Qwen2 {
            for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] {
                present(&format!("model.layers.{l}.{m}.bias"))?;
            }
        }
    }
    Ok(plan)
}

/// `model.layers.3.mlp.up_proj.weight` → (`mlp.up_proj`, false); `lm_head.weight` → (`lm_head`, false).
fn hf_module(hf_name: &str) -> (&str, bool) {
    let (stem, suffix) = hf_name.rsplit_once('.').unwrap_or((hf_name, ""));
    let module = if let Some(rest) = stem.strip_prefix("model.layers.") {
        rest.split_once('.').map_or(rest, |(_, m)| m)
    } else {
        stem.strip_prefix("model.").unwrap_or(stem)
    };
    (module, suffix == "bias")
}

/// llama3 rope scaling from `rope_freqs.weight`, if the file has that tensor.
fn rope_scaling(file: &GgufFile, dims: &LlamaDims) -> Result<Option<Llama3Scaling>> {
    if dims.arch != Arch::Llama {
        return Ok(None);
    }
    let Some(t) = file.tensor("rope_freqs.weight") else { return Ok(None) };
    let rho = file.read_f32(t)?;
    let original =
        file.metadata().opt_u64("llama.rope.scaling.original_context_length")?.unwrap_or(LLAMA3_ORIGINAL_CONTEXT);
    fit_llama3(&rho, dims.rope_theta, dims.head_dim, original)
        .map_err(|detail| format_err(file.path(), format!("tensor 'rope_freqs.weight' {detail}")))
}

/// Converts every planned tensor to bf16 into `path`, chunk by chunk. Returns GGUF bytes read.
fn write_weights(
    file: &GgufFile,
    plan: &[PlanItem<'_>],
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let planned: Vec<PlannedTensor> = plan.iter().map(|p| p.out.clone()).collect();
    let mut writer = SafetensorsWriter::create(path, &planned)?;
    let total: u64 = plan.iter().map(|p| p.src.len_bytes).sum();
    let mut done = 0u64;
    progress(done, total);
    for item in plan {
        let t = item.src;
        let (n_rows, row_bytes) = (t.n_rows(), t.row_bytes());
        let rows_per_chunk = (CHUNK_BYTES / row_bytes).max(1);
        // q/k rows move between heads, so those tensors are read whole (still quantised).
        let whole = match item.unpermute_heads {
            Some(n_heads) => {
                let raw = file.read_rows(t, 0, n_rows)?;
                let moved = unpermute_rows(&raw, row_bytes as usize, n_heads).ok_or_else(|| {
                    format_err(
                        file.path(),
                        format!("tensor '{}': {n_rows} rows do not split into {n_heads} heads of even size", t.name),
                    )
                })?;
                Some(moved)
            }
            None => None,
        };
        let mut first_row = 0;
        while first_row < n_rows {
            let n = rows_per_chunk.min(n_rows - first_row);
            let raw = match &whole {
                Some(all) => all[(first_row * row_bytes) as usize..((first_row + n) * row_bytes) as usize].to_vec(),
                None => file.read_rows(t, first_row, n)?,
            };
            writer.write(&rows_to_bf16(file, t, &raw, item.shift)?)?;
            first_row += n;
            done += n * row_bytes;
            progress(done, total);
        }
    }
    writer.finish()?;
    Ok(total)
}

/// Dequantises whole rows in parallel, adds `shift` and rounds each weight to bf16 (nearest,
/// ties to even).
fn rows_to_bf16(file: &GgufFile, t: &TensorInfo, raw: &[u8], shift: f32) -> Result<Vec<u8>> {
    let (row_len, row_bytes) = (t.row_len() as usize, t.row_bytes() as usize);
    let mut out = vec![0u8; raw.len() / row_bytes * row_len * 2];
    raw.par_chunks(row_bytes).zip(out.par_chunks_mut(row_len * 2)).try_for_each_init(
        || vec![0f32; row_len],
        |row_f32, (src, dst)| {
            file.dequantize(t, src, row_f32)?;
            for (v, o) in row_f32.iter().zip(dst.chunks_exact_mut(2)) {
                let v = if shift == 0.0 { *v } else { *v + shift };
                o.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
            }
            Ok::<(), WeightsError>(())
        },
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_module_strips_layer_and_suffix() {
        assert_eq!(hf_module("model.layers.3.mlp.up_proj.weight"), ("mlp.up_proj", false));
        assert_eq!(hf_module("model.layers.0.self_attn.q_proj.bias"), ("self_attn.q_proj", true));
        assert_eq!(hf_module("model.embed_tokens.weight"), ("embed_tokens", false));
        assert_eq!(hf_module("model.norm.weight"), ("norm", false));
        assert_eq!(hf_module("lm_head.weight"), ("lm_head", false));
    }

    #[test]
    fn out_dir_must_be_new_or_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(check_out_dir(&dir.path().join("new")).is_ok());
        assert!(check_out_dir(dir.path()).is_ok(), "empty");
        std::fs::write(dir.path().join("x"), b"x").expect("write");
        assert!(check_out_dir(dir.path()).expect_err("non-empty").to_string().contains("not an empty directory"));
    }
}

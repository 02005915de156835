//! A MoE checkpoint's experts as the expert cache takes them: the storage format detected from
//! the tensor names, each part's shape and dtype checked, and every expert's bytes located
//! ([`ExpertSources`]).

use ollm_ops::DType;
use ollm_residency::experts::{ExpertFormat, ExpertSources, Source};
use ollm_weights::Catalog;

use crate::{ModelError, Result};

/// Tensor suffixes after `model.layers.{l}.mlp.experts.`, in slot order: the two matrices'
/// parts, then the gate_up and down biases.
fn parts(format: ExpertFormat) -> &'static [&'static str] {
    match format {
        ExpertFormat::Mxfp4 => &[
            "gate_up_proj_blocks",
            "gate_up_proj_scales",
            "down_proj_blocks",
            "down_proj_scales",
            "gate_up_proj_bias",
            "down_proj_bias",
        ],
        ExpertFormat::Dense => &["gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"],
        ExpertFormat::PerExpert => &["gate_proj.weight", "up_proj.weight", "down_proj.weight"],
    }
}

/// One expert's shape of each part, for hidden size H and expert width I.
fn part_shapes(format: ExpertFormat, h: usize, i: usize) -> Vec<Vec<usize>> {
    match format {
        ExpertFormat::Mxfp4 => {
            vec![
                vec![2 * i, h / 32, 16],
                vec![2 * i, h / 32],
                vec![h, i / 32, 16],
                vec![h, i / 32],
                vec![2 * i],
                vec![h],
            ]
        }
        ExpertFormat::Dense => vec![vec![h, 2 * i], vec![i, h], vec![2 * i], vec![h]],
        ExpertFormat::PerExpert => vec![vec![i, h], vec![i, h], vec![h, i]],
    }
}

/// The format of layer `l`'s experts in `catalog`.
pub fn detect(catalog: &Catalog, l: usize) -> ExpertFormat {
    if catalog.contains(&part_name(l, "gate_up_proj_blocks")) {
        ExpertFormat::Mxfp4
    } else if catalog.contains(&part_name(l, "0.gate_proj.weight")) {
        ExpertFormat::PerExpert
    } else {
        ExpertFormat::Dense
    }
}

/// Tensor name of an expert part.
pub fn part_name(l: usize, suffix: &str) -> String {
    format!("model.layers.{l}.mlp.experts.{suffix}")
}

/// Tensor name of part `suffix` of expert `e` of layer `l`.
fn name(format: ExpertFormat, l: usize, e: usize, suffix: &str) -> String {
    match format {
        ExpertFormat::PerExpert => part_name(l, &format!("{e}.{suffix}")),
        _ => part_name(l, suffix),
    }
}

/// The experts of the decoder layers `layer_ids` (`n_experts` each, hidden size `h`, width `i`)
/// in `catalog`: every part's shape and dtype checked (the same in every layer), and where each
/// expert's bytes are.
pub fn expert_sources(
    catalog: &Catalog,
    layer_ids: &[usize],
    n_experts: usize,
    (h, i): (usize, usize),
) -> Result<ExpertSources> {
    let format = detect(catalog, layer_ids.first().copied().unwrap_or(0));
    if format == ExpertFormat::Mxfp4 && (h % 32 != 0 || i % 32 != 0) {
        return Err(ModelError::Stream(format!(
            "MXFP4 experts need hidden_size ({h}) and intermediate_size ({i}) divisible by 32"
        )));
    }
    let shapes = part_shapes(format, h, i);
    let mut layers = Vec::with_capacity(layer_ids.len());
    let mut dtypes: Vec<DType> = Vec::new();
    for (row_i, &l) in layer_ids.iter().enumerate() {
        let mut row = Vec::with_capacity(shapes.len());
        for (p, (suffix, shape)) in parts(format).iter().zip(&shapes).enumerate() {
            let per_expert = format == ExpertFormat::PerExpert;
            let mut want = if per_expert { Vec::new() } else { vec![n_experts] };
            want.extend_from_slice(shape);
            let mut at = Vec::with_capacity(n_experts);
            let mut len = 0;
            for e in 0..if per_expert { n_experts } else { 1 } {
                let name = name(format, l, e, suffix);
                let entry = catalog.require(&name, &want)?;
                let packed = p < 4 && format == ExpertFormat::Mxfp4;
                if packed != (entry.dtype == DType::U8) {
                    return Err(ModelError::Stream(format!(
                        "{name}: dtype {} does not fit {format:?} experts",
                        entry.dtype
                    )));
                }
                if row_i == 0 && e == 0 {
                    dtypes.push(entry.dtype);
                } else if dtypes[p] != entry.dtype {
                    return Err(ModelError::Stream(format!(
                        "{name}: dtype {} differs from the first expert's",
                        entry.dtype
                    )));
                }
                if per_expert {
                    len = entry.len_bytes;
                    at.push((entry.file, entry.offset_bytes));
                } else {
                    len = entry.len_bytes / n_experts as u64;
                    at.extend((0..n_experts as u64).map(|x| (entry.file, entry.offset_bytes + x * len)));
                }
            }
            row.push(Source { len, at });
        }
        layers.push(row);
    }
    Ok(ExpertSources { format, files: catalog.file_paths(), parts: shapes.into_iter().zip(dtypes).collect(), layers })
}

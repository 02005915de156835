//! A MoE checkpoint's experts as the expert cache takes them: the storage format detected from
//! the family's expert names ([`ExpertNames`]), each part's shape and dtype checked, and every
//! expert's bytes located ([`ExpertSources`]).

use ollm_ops::DType;
use ollm_residency::experts::{ExpertFormat, ExpertSources, Source};
use ollm_weights::Catalog;

use crate::{ModelError, Result};

/// How a family names its experts: the prefix after `model.layers.{l}.` and, per storage
/// format it may come in, the parts in slot order (the two matrices' parts, then the gate_up and
/// down biases). The family's `tensors.rs` gives it.
#[derive(Debug, Clone, Copy)]
pub struct ExpertNames {
    pub prefix: &'static str,
    /// `*_blocks` / `*_scales` U8 and the biases.
    pub mxfp4: Option<[&'static str; 6]>,
    /// `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]` and the biases.
    pub dense: Option<[&'static str; 4]>,
    /// One tensor per expert and matrix, `{prefix}{e}.{part}`: gate, up, down.
    pub per_expert: Option<[&'static str; 3]>,
}

impl ExpertNames {
    /// The parts of `format`, in slot order (none when the family has no such format).
    fn parts(&self, format: ExpertFormat) -> &[&'static str] {
        match format {
            ExpertFormat::Mxfp4 => self.mxfp4.as_ref().map_or(&[][..], |p| &p[..]),
            ExpertFormat::Dense => self.dense.as_ref().map_or(&[][..], |p| &p[..]),
            ExpertFormat::PerExpert => self.per_expert.as_ref().map_or(&[][..], |p| &p[..]),
        }
    }

    /// The format of layer `l`'s experts in `catalog`: MXFP4 when its first part is there, else
    /// per-expert when expert 0's first part is, else dense.
    pub fn detect(&self, catalog: &Catalog, l: usize) -> ExpertFormat {
        let has = |suffix: &str| catalog.contains(&self.name_of(l, suffix));
        if self.mxfp4.is_some_and(|p| has(p[0])) {
            ExpertFormat::Mxfp4
        } else if self.per_expert.is_some_and(|p| has(&format!("0.{}", p[0]))) {
            ExpertFormat::PerExpert
        } else {
            ExpertFormat::Dense
        }
    }

    /// Tensor name of an expert part.
    pub fn name_of(&self, l: usize, suffix: &str) -> String {
        format!("model.layers.{l}.{}{suffix}", self.prefix)
    }

    /// Tensor name of part `suffix` of expert `e` of layer `l`.
    fn name(&self, format: ExpertFormat, l: usize, e: usize, suffix: &str) -> String {
        match format {
            ExpertFormat::PerExpert => self.name_of(l, &format!("{e}.{suffix}")),
            _ => self.name_of(l, suffix),
        }
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

/// The experts of the decoder layers `layer_ids` (`n_experts` each, hidden size `h`, width `i`)
/// in `catalog`: every part's shape and dtype checked (the same in every layer), and where each
/// expert's bytes are.
pub fn expert_sources(
    catalog: &Catalog,
    names: &ExpertNames,
    layer_ids: &[usize],
    n_experts: usize,
    (h, i): (usize, usize),
) -> Result<ExpertSources> {
    let format = names.detect(catalog, layer_ids.first().copied().unwrap_or(0));
    let parts = names.parts(format);
    if parts.is_empty() {
        return Err(ModelError::Stream(format!(
            "layer {}: no experts named {}… in a format this family stores ({:?})",
            layer_ids.first().copied().unwrap_or(0),
            names.name_of(layer_ids.first().copied().unwrap_or(0), ""),
            format
        )));
    }
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
        for (p, (suffix, shape)) in parts.iter().zip(&shapes).enumerate() {
            let per_expert = format == ExpertFormat::PerExpert;
            let mut want = if per_expert { Vec::new() } else { vec![n_experts] };
            want.extend_from_slice(shape);
            let mut at = Vec::with_capacity(n_experts);
            let mut len = 0;
            for e in 0..if per_expert { n_experts } else { 1 } {
                let name = names.name(format, l, e, suffix);
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

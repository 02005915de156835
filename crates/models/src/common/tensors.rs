//! A family's tensor table: one row per tensor a checkpoint of that family holds (its name, the
//! shape its config implies, the dtype the forward wants it in, when it is present, and where it
//! lives), from which loading, the streamed parts, `synth`'s plans and the byte counts are all
//! derived. Each family keeps its table, and so its tensor names, in its own `tensors.rs`.

use ollm_ops::{DType, Tensor};
use ollm_weights::synth::Init;

use crate::common::weights::Loader;
use crate::{ModelError, Result};

/// Where a tensor lives while the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// On the device for the whole run (embedding, head, final norm; small f32 constants).
    Resident,
    /// Part of its decoder layer: resident or streamed as the placement says.
    Streamed,
    /// A MoE expert weight: moved by the expert cache.
    Expert,
}

/// The dtype the forward reads a tensor in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// As the checkpoint stores it (bf16, f16 or f32; `synth` writes bf16).
    Stored,
    /// Converted to f32 on load (small parameters kernels read in f32; `synth` writes bf16).
    F32,
    /// Bytes (packed MXFP4 blocks and scales).
    U8,
}

/// One tensor of a family's table; `C` is the family's config.
#[derive(Debug)]
pub struct TensorSpec<C> {
    /// The name after `model.layers.{l}.` for a layer's tensor, else the whole name.
    pub name: &'static str,
    /// Its shape, from the config.
    pub shape: fn(&C) -> Vec<usize>,
    pub dtype: Dtype,
    /// Whether the config says decoder layer `l` (0 for a global tensor) has it.
    pub when: fn(&C, usize) -> bool,
    /// True when it is loaded only if the file has it, whatever the config says (a head that
    /// may be tied to the embedding); `when` then says only whether `synth` writes it.
    pub optional: bool,
    pub role: Role,
    /// How `synth` fills it.
    pub init: Init,
    /// One tensor per expert, named `{experts prefix}{e}.{name}` (an `Expert` row).
    pub per_expert: bool,
}

/// `model.layers.{l}.{suffix}`
pub fn layer_name(l: usize, suffix: &str) -> String {
    format!("model.layers.{l}.{suffix}")
}

/// Every tensor, always.
pub fn always<C>(_: &C, _: usize) -> bool {
    true
}

/// The row of `table` named `name`.
pub fn spec<'a, C>(table: &'a [TensorSpec<C>], name: &str) -> Result<&'a TensorSpec<C>> {
    table
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| ModelError::Stream(format!("internal: no tensor '{name}' in the family's table")))
}

/// Loads tensors of one family's table onto a backend, shapes and presence from `cfg`.
#[derive(Debug, Clone, Copy)]
pub struct TableLoader<'a, C> {
    pub ld: Loader<'a>,
    pub cfg: &'a C,
}

impl<C> TableLoader<'_, C> {
    /// The tensor of `table` named `name` (of decoder layer `l`, or global when `l` is None):
    /// None when the config says it is absent or, for an optional one, the file lacks it.
    pub fn get(&self, table: &[TensorSpec<C>], name: &str, l: Option<usize>) -> Result<Option<Tensor>> {
        let s = spec(table, name)?;
        let full = l.map_or_else(|| name.to_string(), |l| layer_name(l, name));
        let present = if s.optional { self.ld.catalog.contains(&full) } else { (s.when)(self.cfg, l.unwrap_or(0)) };
        if !present {
            return Ok(None);
        }
        self.require(table, name, l).map(Some)
    }

    /// The tensor of `table` named `name`, which must be in the file (a missing one is the
    /// catalog's error naming it).
    pub fn require(&self, table: &[TensorSpec<C>], name: &str, l: Option<usize>) -> Result<Tensor> {
        let s = spec(table, name)?;
        let full = l.map_or_else(|| name.to_string(), |l| layer_name(l, name));
        let shape = (s.shape)(self.cfg);
        match s.dtype {
            Dtype::F32 => self.ld.tensor_f32(&full, &shape),
            Dtype::Stored | Dtype::U8 => self.ld.tensor(&full, &shape),
        }
    }
}

/// The names of `table`'s streamed tensors that decoder layer `l` has under `cfg`: what a
/// streamed copy of the layer refills.
pub fn streamed<C>(table: &[TensorSpec<C>], cfg: &C, l: usize) -> Vec<&'static str> {
    table.iter().filter(|s| s.role == Role::Streamed && (s.when)(cfg, l)).map(|s| s.name).collect()
}

/// The role of a decoder layer's tensor named `suffix` (after `model.layers.{l}.`): an expert's
/// when it is under the family's experts prefix, else its row's, else (a tensor the table does
/// not know) it goes with its layer.
pub fn role_of<C>(table: &[TensorSpec<C>], experts_prefix: Option<&str>, suffix: &str) -> Role {
    if experts_prefix.is_some_and(|p| suffix.starts_with(p)) {
        return Role::Expert;
    }
    table.iter().find(|s| s.name == suffix).map_or(Role::Streamed, |s| s.role)
}

/// Whether the family whose tables are `globals` and `layer` (experts under `experts_prefix`)
/// reads a checkpoint tensor named `name`: a global row's name, or `model.layers.{l}.{suffix}`
/// with `suffix` a layer row's name or under the experts prefix. Anything else (`mtp.*`, a
/// vision tower, a tensor of another variant) is not the model's.
pub fn is_used<C>(
    globals: &[TensorSpec<C>],
    layer: &[TensorSpec<C>],
    experts_prefix: Option<&str>,
    name: &str,
) -> bool {
    if globals.iter().any(|s| s.name == name) {
        return true;
    }
    let Some(suffix) = name.strip_prefix("model.layers.").and_then(|rest| rest.split_once('.')).map(|(_, s)| s) else {
        return false;
    };
    experts_prefix.is_some_and(|p| suffix.starts_with(p)) || layer.iter().any(|s| s.name == suffix)
}

/// The `synth` dtype of a row: bf16, or bytes for packed tensors.
pub fn synth_dtype<C>(s: &TensorSpec<C>) -> DType {
    if s.dtype == Dtype::U8 { DType::U8 } else { DType::BF16 }
}

/// A family's table in `synth`'s order: the globals before the layers, each layer's rows,
/// the globals after.
pub type SynthOrder<'a, C> = (&'a [TensorSpec<C>], &'a [TensorSpec<C>], &'a [TensorSpec<C>]);

/// `synth`'s tensors of a family, one group per shard unit: the `first` globals, each decoder
/// layer's rows present under `cfg`, then the `last` globals present under it (optional rows
/// only where the config says so).
/// Per-expert rows are written `n` times, expert by expert, as `{prefix}{e}.{name}` where
/// `experts` is `Some((prefix, n))`.
pub fn synth_groups<C>(
    cfg: &C,
    n_layers: usize,
    (first, layer, last): SynthOrder<'_, C>,
    experts: Option<(&str, usize)>,
) -> Vec<Vec<ollm_weights::synth::SynthTensor>> {
    use ollm_weights::format::safetensors_writer::PlannedTensor;
    use ollm_weights::synth::SynthTensor;
    let t = |name: String, s: &TensorSpec<C>| SynthTensor {
        planned: PlannedTensor { name, dtype: synth_dtype(s), shape: (s.shape)(cfg) },
        init: s.init,
    };
    let globals = |rows: &[TensorSpec<C>]| -> Vec<SynthTensor> {
        rows.iter().filter(|s| (s.when)(cfg, 0)).map(|s| t(s.name.to_string(), s)).collect()
    };
    let mut groups = vec![globals(first)];
    for l in 0..n_layers {
        let rows: Vec<&TensorSpec<C>> = layer.iter().filter(|s| (s.when)(cfg, l)).collect();
        let mut g = Vec::new();
        let mut i = 0;
        while i < rows.len() {
            match experts.filter(|_| rows[i].per_expert) {
                Some((prefix, n)) => {
                    // A run of per-expert rows: every part of expert 0, then of expert 1, ...
                    let run: Vec<&TensorSpec<C>> = rows[i..].iter().take_while(|s| s.per_expert).copied().collect();
                    for e in 0..n {
                        g.extend(run.iter().map(|s| t(layer_name(l, &format!("{prefix}{e}.{}", s.name)), s)));
                    }
                    i += run.len();
                }
                None => {
                    g.push(t(layer_name(l, rows[i].name), rows[i]));
                    i += 1;
                }
            }
        }
        groups.push(g);
    }
    groups.push(globals(last));
    groups
}

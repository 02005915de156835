//! Small element-wise ops: embedding gather, SiLU·mul.

use half::{bf16, f16};

use crate::CpuStorage;

/// `out[t, :] = table[ids[t], :]`, widened to f32. Ids are checked by the caller.
pub fn embedding(table: &CpuStorage, hidden: usize, ids: &[u32], out: &mut [f32]) {
    for (row, &id) in out.chunks_exact_mut(hidden).zip(ids) {
        let start = id as usize * hidden;
        match table {
            CpuStorage::F32(v) => row.copy_from_slice(&v[start..start + hidden]),
            CpuStorage::F16(v) => row.iter_mut().zip(&v[start..start + hidden]).for_each(|(o, x)| *o = f16::to_f32(*x)),
            CpuStorage::BF16(v) => {
                row.iter_mut().zip(&v[start..start + hidden]).for_each(|(o, x)| *o = bf16::to_f32(*x))
            }
        }
    }
}

/// `silu(a) = a · σ(a)`.
#[inline]
pub fn silu(a: f32) -> f32 {
    a / (1.0 + (-a).exp())
}

/// `out = silu(gate) ⊙ up`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(*g) * u;
    }
}

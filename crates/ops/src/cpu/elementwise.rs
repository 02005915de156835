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
            // Packed bytes are rejected by the backend before this; a byte reads as its value.
            CpuStorage::U8(v) => row.iter_mut().zip(&v[start..start + hidden]).for_each(|(o, x)| *o = f32::from(*x)),
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

/// Rows of a transpose tile: each parallel task writes this many output rows.
const TRANSPOSE_ROWS: usize = 64;

/// `out [b, a] = srcᵀ` for src `[a, b]` row-major.
pub fn transpose<T: Copy + Send + Sync>(src: &[T], a: usize, b: usize, out: &mut [T]) {
    use rayon::prelude::*;
    out.par_chunks_mut(TRANSPOSE_ROWS * a.max(1)).enumerate().for_each(|(blk, chunk)| {
        for (i, row) in chunk.chunks_exact_mut(a).enumerate() {
            let j = blk * TRANSPOSE_ROWS + i;
            for (r, o) in row.iter_mut().enumerate() {
                *o = src[r * b + j];
            }
        }
    });
}

//! Small element-wise ops: embedding gather, SiLU·mul, GELU(tanh)·mul, scaling, softcapping.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::CpuStorage;

/// Elements per parallel task of the element-wise ops: a decode step's rows are one task (run in
/// place), a prefill's are spread over the threads.
const PAR_ELEMS: usize = 1 << 14;

/// `out[i] = f(a[i], b[i])`, in tasks of [`PAR_ELEMS`].
fn zip_map(a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    out.par_chunks_mut(PAR_ELEMS).zip(a.par_chunks(PAR_ELEMS)).zip(b.par_chunks(PAR_ELEMS)).for_each(|((o, a), b)| {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = f(*a, *b);
        }
    });
}

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
    zip_map(gate, up, out, |g, u| silu(g) * u);
}

/// `gelu_tanh(a) = a/2 · (1 + tanh(√(2/π) · (a + 0.044715·a³)))` (PyTorch's
/// `gelu(approximate="tanh")`).
#[inline]
pub fn gelu_tanh(a: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * a * (1.0 + (SQRT_2_OVER_PI * (a + 0.044_715 * a * a * a)).tanh())
}

/// `out = gelu_tanh(gate) ⊙ up`.
pub fn gelu_tanh_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    zip_map(gate, up, out, |g, u| gelu_tanh(g) * u);
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(PAR_ELEMS).zip(y.par_chunks(PAR_ELEMS)).for_each(|(x, y)| {
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
    });
}

/// `x ← s · x`.
pub fn scale(x: &mut [f32], s: f32) {
    x.iter_mut().for_each(|v| *v *= s);
}

/// `x ← cap · tanh(x / cap)`.
pub fn softcap(x: &mut [f32], cap: f32) {
    x.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Values of PyTorch's `gelu(approximate="tanh")` and of `30·tanh(x/30)` at a few points.
    #[test]
    fn gelu_tanh_and_softcap_match_their_formulas() {
        for (a, want) in [(0.0, 0.0), (1.0, 0.841_192), (-1.0, -0.158_808), (3.0, 2.996_363), (-4.0, -7.1e-5)] {
            assert!((gelu_tanh(a) - want).abs() < 2e-6, "gelu_tanh({a}) = {} (want {want})", gelu_tanh(a));
        }
        let mut out = [0.0; 2];
        gelu_tanh_mul(&[1.0, -1.0], &[2.0, 3.0], &mut out);
        assert_eq!(out, [2.0 * gelu_tanh(1.0), 3.0 * gelu_tanh(-1.0)]);
        let mut x = [0.0, 30.0, -300.0, 1e-3];
        softcap(&mut x, 30.0);
        assert_eq!(x[0], 0.0);
        assert!((x[1] - 30.0 * 1f32.tanh()).abs() < 1e-5 && (x[2] + 30.0).abs() < 1e-4 && (x[3] - 1e-3).abs() < 1e-9);
        let mut y = [1.0, -2.0];
        scale(&mut y, 25.298_222);
        assert_eq!(y, [25.298_222, -50.596_443]);
    }
}

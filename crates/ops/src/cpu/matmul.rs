//! `out[T, N] = x[T, K] · w[N, K]ᵀ (+ bias)`: f32 activations against weights stored in
//! bf16, f16 or f32.
//!
//! Two paths, both multithreaded over blocks of weight rows:
//! * few tokens (decode): a dot product per weight row that widens bf16 on the fly, so each
//!   weight byte is read once from memory (the decode bound is weight bytes / bandwidth);
//! * many tokens (prefill): each block of rows is widened to f32 once and multiplied with all
//!   tokens by the `gemm` crate, so the cost is FLOP-bound rather than conversion-bound.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::CpuStorage;

/// Tokens at or above which the blocked GEMM path is used.
const GEMM_MIN_TOKENS: usize = 4;
/// Weight rows per parallel task in the GEMM path (`ROWS × K` f32 stays in L2 for K ≤ 4096).
const GEMM_BLOCK_ROWS: usize = 64;
/// Weight rows per parallel task in the dot-product path.
const DOT_BLOCK_ROWS: usize = 32;

/// Computes `out = x · wᵀ (+ bias)`. x `[t, k]`, w `[n, k]`, out `[t, n]`; shapes checked by the caller.
pub fn matmul(x: &[f32], t: usize, k: usize, w: &CpuStorage, n: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    if t >= GEMM_MIN_TOKENS {
        matmul_gemm(x, t, k, w, n, out);
    } else {
        matmul_dot(x, t, k, w, n, out);
    }
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(n) {
            row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
    }
}

/// Decode path: out is filled in blocks of weight rows; each block computes every token.
fn matmul_dot(x: &[f32], t: usize, k: usize, w: &CpuStorage, n: usize, out: &mut [f32]) {
    let dot = Dot::detect();
    let row_dot = |xv: &[f32], r: usize| match w {
        CpuStorage::BF16(v) => dot.bf16(xv, &v[r * k..][..k]),
        CpuStorage::F32(v) => dot.f32(xv, &v[r * k..][..k]),
        CpuStorage::F16(v) => v[r * k..][..k].iter().zip(xv).map(|(a, b)| a.to_f32() * b).sum(),
        // Packed bytes are rejected by the backend before this; a byte reads as its value.
        CpuStorage::U8(v) => v[r * k..][..k].iter().zip(xv).map(|(a, b)| f32::from(*a) * b).sum(),
    };
    if t == 1 {
        // One token (decode): out is one row, so tasks can own slices of it directly.
        out[..n].par_chunks_mut(DOT_BLOCK_ROWS).enumerate().for_each(|(blk, chunk)| {
            for (i, o) in chunk.iter_mut().enumerate() {
                *o = row_dot(x, blk * DOT_BLOCK_ROWS + i);
            }
        });
        return;
    }
    // Work on a [n, t] transposed result so that each task owns contiguous memory.
    let mut tmp = vec![0.0f32; n * t];
    tmp.par_chunks_mut(DOT_BLOCK_ROWS * t).enumerate().for_each(|(blk, chunk)| {
        let r0 = blk * DOT_BLOCK_ROWS;
        for (i, outs) in chunk.chunks_exact_mut(t).enumerate() {
            let r = r0 + i;
            for (ti, o) in outs.iter_mut().enumerate() {
                *o = row_dot(&x[ti * k..][..k], r);
            }
        }
    });
    for r in 0..n {
        for ti in 0..t {
            out[ti * n + r] = tmp[r * t + ti];
        }
    }
}

/// A raw pointer to `out` that parallel tasks share; each task writes disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint column ranges of one buffer that outlives the parallel scope.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Taking `self` by value makes closures capture the whole (Send) wrapper, not its field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Prefill path: widen a block of rows to f32, then one GEMM per block.
fn matmul_gemm(x: &[f32], t: usize, k: usize, w: &CpuStorage, n: usize, out: &mut [f32]) {
    assert!(out.len() >= t * n && x.len() >= t * k, "matmul_gemm: shapes checked by the caller");
    let out_ptr = OutPtr(out.as_mut_ptr());
    let n_blocks = n.div_ceil(GEMM_BLOCK_ROWS);
    (0..n_blocks).into_par_iter().for_each_init(Vec::new, |buf: &mut Vec<f32>, blk| {
        let r0 = blk * GEMM_BLOCK_ROWS;
        let rows = GEMM_BLOCK_ROWS.min(n - r0);
        buf.clear();
        let src = r0 * k..(r0 + rows) * k;
        match w {
            CpuStorage::F32(v) => buf.extend_from_slice(&v[src]),
            CpuStorage::BF16(v) => buf.extend(v[src].iter().map(|e| bf16::to_f32(*e))),
            CpuStorage::F16(v) => buf.extend(v[src].iter().map(|e| f16::to_f32(*e))),
            CpuStorage::U8(v) => buf.extend(v[src].iter().map(|&e| f32::from(e))),
        }
        // dst[ti, j] = out[ti * n + r0 + j]; lhs = x [t, k] row-major; rhs[kk, j] = buf[j * k + kk].
        // SAFETY: the pointers cover t×k (x), rows×k (buf) and the t×rows window of out that this
        // task alone writes; strides describe those row-major layouts.
        unsafe {
            gemm::gemm(
                t,
                rows,
                k,
                out_ptr.get().add(r0),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                buf.as_ptr(),
                k as isize,
                1,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
}

/// Dot products with the best instruction set found at run time.
#[derive(Clone, Copy)]
struct Dot {
    #[cfg(target_arch = "x86_64")]
    avx2_fma: bool,
}

impl Dot {
    fn detect() -> Self {
        Self {
            #[cfg(target_arch = "x86_64")]
            avx2_fma: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        }
    }

    #[inline]
    fn bf16(self, x: &[f32], w: &[bf16]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2_fma {
            // SAFETY: the CPU supports AVX2 and FMA (checked in `detect`).
            return unsafe { dot_bf16_avx2(x, w) };
        }
        dot_bf16_lanes::<false>(x, w)
    }

    #[inline]
    fn f32(self, x: &[f32], w: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2_fma {
            // SAFETY: as above.
            return unsafe { dot_f32_avx2(x, w) };
        }
        dot_f32_lanes::<false>(x, w)
    }
}

const LANES: usize = 16;

/// bf16 → f32 is a 16-bit shift, so the loop below vectorises into loads, shifts and FMAs.
#[inline(always)]
fn dot_bf16_lanes<const FMA: bool>(x: &[f32], w: &[bf16]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let body = x.len() / LANES * LANES;
    for (xc, wc) in x[..body].chunks_exact(LANES).zip(w[..body].chunks_exact(LANES)) {
        for i in 0..LANES {
            let wv = f32::from_bits((wc[i].to_bits() as u32) << 16);
            acc[i] = if FMA { wv.mul_add(xc[i], acc[i]) } else { acc[i] + wv * xc[i] };
        }
    }
    let tail: f32 = x[body..].iter().zip(&w[body..]).map(|(a, b)| a * b.to_f32()).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn dot_f32_lanes<const FMA: bool>(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let body = x.len() / LANES * LANES;
    for (xc, wc) in x[..body].chunks_exact(LANES).zip(w[..body].chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] = if FMA { wc[i].mul_add(xc[i], acc[i]) } else { acc[i] + wc[i] * xc[i] };
        }
    }
    let tail: f32 = x[body..].iter().zip(&w[body..]).map(|(a, b)| a * b).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(x: &[f32], w: &[bf16]) -> f32 {
    dot_bf16_lanes::<true>(x, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(x: &[f32], w: &[f32]) -> f32 {
    dot_f32_lanes::<true>(x, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn naive(x: &[f32], t: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; t * n];
        for ti in 0..t {
            for r in 0..n {
                out[ti * n + r] = (0..k).map(|i| x[ti * k + i] as f64 * w[r * k + i] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    /// Both paths, every weight dtype, odd sizes (tails, partial blocks) against an f64 loop.
    #[test]
    fn matches_naive_for_every_path_and_dtype() {
        for &(t, k, n) in &[(1, 37, 70), (1, 576, 1000), (3, 64, 33), (4, 100, 129), (17, 96, 65)] {
            let x = noise(t * k, 1 + t as u64);
            let wf = noise(n * k, 7 + n as u64);
            let wb: Vec<bf16> = wf.iter().map(|v| bf16::from_f32(*v)).collect();
            let wh: Vec<f16> = wf.iter().map(|v| f16::from_f32(*v)).collect();
            let cases = [
                (CpuStorage::F32(wf.clone()), wf.clone()),
                (CpuStorage::BF16(wb.clone()), wb.iter().map(|v| v.to_f32()).collect()),
                (CpuStorage::F16(wh.clone()), wh.iter().map(|v| v.to_f32()).collect()),
            ];
            for (storage, exact) in cases {
                let want = naive(&x, t, k, &exact, n);
                let mut got = vec![f32::NAN; t * n];
                matmul(&x, t, k, &storage, n, None, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "t={t} k={k} n={n} {:?} [{i}]: {g} vs {w}",
                        storage.dtype()
                    );
                }
            }
        }
    }

    #[test]
    fn bias_is_added_per_output() {
        let x = [1.0f32, 2.0];
        let w = CpuStorage::F32(vec![1.0, 0.0, 0.0, 1.0]);
        let mut out = [0.0f32; 2];
        matmul(&x, 1, 2, &w, 2, Some(&[0.5, -0.5]), &mut out);
        assert_eq!(out, [1.5, 1.5]);
    }
}

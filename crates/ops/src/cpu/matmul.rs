//! `out[T, N] = x[T, K] · w[N, K]ᵀ (+ bias)`: f32 activations against weights stored in
//! bf16, f16 or f32, through the kernels of one tier ([`super::kernels`]).
//!
//! The work is split over rayon tasks of (a block of weight rows, a chunk of tokens), so that
//! decode (one token) is split over output rows and prefill over both:
//! * few tokens (decode, batched decode of up to [`WIDEN_MIN_TOKENS`]−1 sequences): bf16 rows are
//!   widened on the fly, so each weight byte is read once from memory (the decode bound is
//!   weight bytes / bandwidth); the rows of all the call's weights go out in guided runs (long,
//!   then shorter) through [`super::busy::parallel_parts`], so each thread reads long sequential
//!   stretches and no thread sleeps between a step's regions;
//! * more tokens: each task widens its block of rows to f32 once (kept while it moves on to the
//!   next token chunk of the same block) and runs the f32 micro-kernels over it;
//! * bf16 activations (`Precision::Bf16Activations` on a CPU with AVX512-BF16): the input is
//!   rounded to bf16 once per matmul and every token count runs `vdpbf16ps` on the bf16 rows.
//!
//! The portable tier keeps the previous code: a dot product per row for few tokens, and the
//! `gemm` crate on widened 64-row blocks for many.

use std::sync::atomic::{AtomicBool, Ordering};

use half::{bf16, f16};
use rayon::prelude::*;

use super::kernels::{Kernels, Tier, dot_portable};
use crate::CpuStorage;

/// Tokens at or above which weight blocks are widened to f32 once and reused (f32 tiers).
const WIDEN_MIN_TOKENS: usize = 4;
/// Weight rows per task when there are few tokens (decode): small tasks balance the threads.
const DOT_BLOCK_ROWS: usize = 32;
/// Weight rows per task for many tokens (`ROWS × K` f32 stays in L2 for K ≤ 4096).
const GEMM_BLOCK_ROWS: usize = 64;
/// Tokens per task for many tokens: the x chunk (`64 × K`) stays in L2 while the rows stream.
const TOKEN_CHUNK: usize = 64;

/// Whether a matmul may round its f32 activations to bf16 (for bf16 dot products).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 activations everywhere: the oracle, and what the golden tests hold to 1e-4.
    #[default]
    Exact,
    /// bf16 weights meet bf16-rounded activations where the CPU has bf16 dot products
    /// (AVX512-BF16); elsewhere as `Exact`. Each product is exact and sums are f32, so the only
    /// error is the activation rounding: |Δ| ≤ 2⁻⁸ · Σ|xᵢ·wᵢ| per output.
    Bf16Activations,
}

/// `t` tokens of `k` inputs against `n` weight rows.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub t: usize,
    pub k: usize,
    pub n: usize,
}

/// Computes `out = x · wᵀ (+ bias)` with f32 activations on the process's kernels.
/// x `[t, k]`, w `[n, k]`, out `[t, n]`; shapes checked by the caller.
pub fn matmul(x: &[f32], t: usize, k: usize, w: &CpuStorage, n: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    matmul_with(Kernels::active(), Precision::Exact, x, Dims { t, k, n }, w, bias, out);
}

/// [`matmul`] on the given kernels and precision.
pub fn matmul_with(
    kern: &Kernels,
    precision: Precision,
    x: &[f32],
    d: Dims,
    w: &CpuStorage,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    matmul_many_with(kern, precision, x, (d.t, d.k), &mut [Job { w, n: d.n, bias, out }]);
}

/// One weight of [`matmul_many_with`]: `out[t, n] = x · wᵀ (+ bias)`, w `[n, k]`.
pub struct Job<'a> {
    pub w: &'a CpuStorage,
    pub n: usize,
    pub bias: Option<&'a [f32]>,
    pub out: &'a mut [f32],
}

/// Several weights against one input `x [t, k]` (q, k and v; gate and up): on the SIMD tiers in
/// one parallel region (a decode step's regions are short, so each one saved is a fork and a join
/// saved), with x rounded to bf16 once for all of them. Every output element is computed exactly
/// as [`matmul_with`] computes it for its weight alone.
pub fn matmul_many_with(kern: &Kernels, precision: Precision, x: &[f32], (t, k): (usize, usize), jobs: &mut [Job<'_>]) {
    for j in jobs.iter() {
        assert!(j.out.len() >= t * j.n && x.len() >= t * k, "matmul: shapes checked by the caller");
    }
    if t > 0 {
        if kern.tier() == Tier::Portable {
            for j in jobs.iter_mut().filter(|j| j.n > 0) {
                if t >= WIDEN_MIN_TOKENS {
                    matmul_gemm(x, t, k, j.w, j.n, j.out);
                } else {
                    matmul_dot(x, t, k, j.w, j.n, j.out);
                }
            }
        } else {
            matmul_tiled(kern, precision, x, (t, k), jobs);
        }
    }
    for j in jobs.iter_mut() {
        if let Some(b) = j.bias {
            for row in j.out[..t * j.n].chunks_exact_mut(j.n) {
                row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
            }
        }
    }
}

/// SIMD tiers: tasks of (weight, row block, token chunk) over every job; each calls one panel.
fn matmul_tiled(kern: &Kernels, precision: Precision, x: &[f32], (t, k): (usize, usize), jobs: &mut [Job<'_>]) {
    // x rounded to bf16 once, when bf16 dot products will use it.
    let bf16_dot = kern.bf16_bf16.is_some() && precision == Precision::Bf16Activations;
    let xb: Option<Vec<bf16>> = match jobs.iter().any(|j| matches!(j.w, CpuStorage::BF16(_))) && bf16_dot {
        true => {
            // Rounded to nearest even, 16 tokens per task (a prefill's input is MBs).
            let mut xb = vec![bf16::ZERO; t * k];
            xb.par_chunks_mut(16 * k).zip(x[..t * k].par_chunks(16 * k)).for_each(|(o, i)| {
                o.iter_mut().zip(i).for_each(|(o, i)| *o = bf16::from_f32(*i));
            });
            Some(xb)
        }
        false => None,
    };
    let outs: Vec<OutPtr> = jobs.iter_mut().map(|j| OutPtr(j.out.as_mut_ptr())).collect();
    let jobs: &[Job<'_>] = jobs;
    let tiles = Tiles { kern, x, xb: xb.as_deref(), t, k, jobs, outs: &outs };
    if t < WIDEN_MIN_TOKENS && decode_runs() {
        // Few tokens (decode): the weights stream once, so the jobs' rows (one after another) go
        // out in runs, long first and shorter towards the end (guided): few jumps in each
        // thread's stream, and an even finish.
        let total: usize = jobs.iter().map(|j| j.n).sum();
        let bounds = guided_bounds(total, rayon::current_num_threads());
        super::busy::parallel_parts(bounds.len() - 1, |p| {
            let (mut buf, mut widened) = init();
            let (r0, r1) = (bounds[p], bounds[p + 1]);
            let mut base = 0;
            for (ji, job) in jobs.iter().enumerate() {
                let (a, b) = (r0.max(base), r1.min(base + job.n));
                if a < b {
                    tiles.run(ji, a - base, b - a, 0, t, (&mut buf, &mut widened));
                }
                base += job.n;
            }
        });
        return;
    }
    let block_rows = if t >= WIDEN_MIN_TOKENS { GEMM_BLOCK_ROWS } else { DOT_BLOCK_ROWS };
    let n_chunks = t.div_ceil(TOKEN_CHUNK);
    // Each job's tasks follow the previous job's: `first[i]` is job i's first task.
    let mut first = Vec::with_capacity(jobs.len() + 1);
    let mut total = 0;
    for j in jobs.iter() {
        first.push(total);
        total += j.n.div_ceil(block_rows) * n_chunks;
    }
    first.push(total);
    (0..total).into_par_iter().for_each_init(init, |(buf, widened), task| {
        let ji = first.partition_point(|&f| f <= task) - 1;
        let (n, task) = (jobs[ji].n, task - first[ji]);
        let (blk, chunk) = (task / n_chunks, task % n_chunks);
        let (r0, t0) = (blk * block_rows, chunk * TOKEN_CHUNK);
        tiles.run(ji, r0, block_rows.min(n - r0), t0, TOKEN_CHUNK.min(t - t0), (buf, widened));
    });
}

/// State per worker: the widened rows of the (job, block) it last widened.
fn init() -> (Vec<f32>, (usize, usize)) {
    (Vec::new(), (usize::MAX, usize::MAX))
}

/// Runs of rows start at multiples of this many rows, and are no shorter.
const PART_ALIGN_ROWS: usize = 16;

/// Boundaries of guided runs over `total` rows for `threads` threads: each run is the rows
/// left over twice the threads, at least [`PART_ALIGN_ROWS`].
fn guided_bounds(total: usize, threads: usize) -> Vec<usize> {
    let mut bounds = vec![0];
    let mut at = 0;
    while at < total {
        let run = ((total - at) / (2 * threads.max(1))).next_multiple_of(PART_ALIGN_ROWS).max(PART_ALIGN_ROWS);
        at = (at + run).min(total);
        bounds.push(at);
    }
    bounds
}

/// Whether few-token matmuls take guided runs (the default) or the many-token tasks of
/// [`DOT_BLOCK_ROWS`] rows; the kernel lab flips it to compare the two in one process.
static DECODE_RUNS: AtomicBool = AtomicBool::new(true);

fn decode_runs() -> bool {
    DECODE_RUNS.load(Ordering::Relaxed)
}

/// Sets how few-token matmuls split their rows (see [`DECODE_RUNS`]); for the kernel lab's A/B.
#[doc(hidden)]
pub fn set_decode_runs(on: bool) {
    DECODE_RUNS.store(on, Ordering::Relaxed)
}

/// One matmul region's operands, shared by its tasks.
struct Tiles<'a> {
    kern: &'a Kernels,
    x: &'a [f32],
    /// x rounded to bf16, when bf16 dot products take it.
    xb: Option<&'a [bf16]>,
    t: usize,
    k: usize,
    jobs: &'a [Job<'a>],
    outs: &'a [OutPtr],
}

impl Tiles<'_> {
    /// Rows `r0..r0 + rows` of job `ji` against tokens `t0..t0 + tt`: one panel call.
    fn run(
        &self,
        ji: usize,
        r0: usize,
        rows: usize,
        t0: usize,
        tt: usize,
        (buf, widened): (&mut Vec<f32>, &mut (usize, usize)),
    ) {
        let (job, k, kern) = (&self.jobs[ji], self.k, self.kern);
        let (w, n) = (job.w, job.n);
        let src = r0 * k..(r0 + rows) * k;
        let xs = &self.x[t0 * k..(t0 + tt) * k];
        let o = self.outs[ji].get().wrapping_add(t0 * n + r0);
        // SAFETY (every panel call): xs holds tt·k and the weight slices rows·k elements; this
        // task alone writes out[(t0 + ti)·n + r0 + j] for ti < tt, j < rows, inside its job's out
        // (t·n); the kernels were built for a tier this CPU supports.
        match (w, self.xb, kern.bf16_bf16) {
            (CpuStorage::BF16(v), Some(xb), Some(dot)) => unsafe {
                dot(&xb[t0 * k..(t0 + tt) * k], tt, k, &v[src], rows, o, n)
            },
            (CpuStorage::F32(v), ..) => unsafe { (kern.f32_f32)(xs, tt, k, &v[src], rows, o, n) },
            (CpuStorage::BF16(v), ..) if self.t < WIDEN_MIN_TOKENS => unsafe {
                (kern.f32_bf16)(xs, tt, k, &v[src], rows, o, n)
            },
            _ => {
                // Widened once per (job, row block) and reused across token chunks.
                if *widened != (ji, r0) {
                    widen_into(w, src.clone(), buf);
                    *widened = (ji, r0);
                }
                unsafe { (kern.f32_f32)(xs, tt, k, buf, rows, o, n) }
            }
        }
    }
}

/// Widens `w[range]` into `buf` as f32 (packed bytes read as their values).
fn widen_into(w: &CpuStorage, range: std::ops::Range<usize>, buf: &mut Vec<f32>) {
    buf.clear();
    match w {
        CpuStorage::F32(v) => buf.extend_from_slice(&v[range]),
        CpuStorage::BF16(v) => buf.extend(v[range].iter().map(|e| bf16::to_f32(*e))),
        CpuStorage::F16(v) => buf.extend(v[range].iter().map(|e| f16::to_f32(*e))),
        CpuStorage::U8(v) => buf.extend(v[range].iter().map(|&e| f32::from(e))),
    }
}

/// Portable decode path: out is filled in blocks of weight rows; each block computes every token.
fn matmul_dot(x: &[f32], t: usize, k: usize, w: &CpuStorage, n: usize, out: &mut [f32]) {
    let row_dot = |xv: &[f32], r: usize| match w {
        CpuStorage::BF16(v) => dot_portable(xv, &v[r * k..][..k]),
        CpuStorage::F32(v) => dot_portable(xv, &v[r * k..][..k]),
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

/// Portable prefill path: widen a block of rows to f32, then one GEMM per block.
fn matmul_gemm(x: &[f32], t: usize, k: usize, w: &CpuStorage, n: usize, out: &mut [f32]) {
    let out_ptr = OutPtr(out.as_mut_ptr());
    let n_blocks = n.div_ceil(GEMM_BLOCK_ROWS);
    (0..n_blocks).into_par_iter().for_each_init(Vec::new, |buf: &mut Vec<f32>, blk| {
        let r0 = blk * GEMM_BLOCK_ROWS;
        let rows = GEMM_BLOCK_ROWS.min(n - r0);
        widen_into(w, r0 * k..(r0 + rows) * k, buf);
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

    /// Shapes that hit every path: one token, a few (batched decode), a widened block, several
    /// token chunks; K with and without SIMD tails; row counts with partial tiles and blocks.
    const SHAPES: [(usize, usize, usize); 8] =
        [(1, 37, 70), (1, 576, 1000), (3, 64, 33), (4, 100, 129), (17, 96, 65), (5, 33, 7), (64, 40, 9), (130, 48, 70)];

    /// Every path, every weight dtype, odd sizes (tails, partial blocks) against an f64 loop, on
    /// the process's kernels and on each tier this CPU runs.
    #[test]
    fn matches_naive_for_every_path_and_dtype() {
        let tiers: Vec<Option<Tier>> = std::iter::once(None).chain(Tier::supported().into_iter().map(Some)).collect();
        for tier in tiers {
            for &(t, k, n) in &SHAPES {
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
                    match tier.and_then(Kernels::for_tier) {
                        None => matmul(&x, t, k, &storage, n, None, &mut got),
                        Some(kern) => {
                            matmul_with(&kern, Precision::Exact, &x, Dims { t, k, n }, &storage, None, &mut got)
                        }
                    }
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{tier:?} t={t} k={k} n={n} {:?} [{i}]: {g} vs {w}",
                            storage.dtype()
                        );
                    }
                }
            }
        }
    }

    /// bf16 activations (bf16 dot products) against the f32 twin: rounding x to bf16 changes
    /// each product by at most 2⁻⁹ relative, so |Δ| ≤ 2⁻⁸ · Σ|xᵢ·wᵢ| (2⁻⁸ leaves room for f32
    /// summation). On a CPU without bf16 dot products the precision falls back to exact f32.
    #[test]
    fn bf16_activations_stay_within_the_stated_tolerance_of_the_f32_twin() {
        for tier in Tier::supported() {
            let Some(kern) = Kernels::for_tier(tier) else { continue };
            for &(t, k, n) in &SHAPES {
                let x = noise(t * k, 3 + t as u64);
                let wb: Vec<bf16> = noise(n * k, 5 + k as u64).iter().map(|v| bf16::from_f32(*v)).collect();
                let wf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
                let mut got = vec![f32::NAN; t * n];
                let storage = CpuStorage::BF16(wb);
                matmul_with(&kern, Precision::Bf16Activations, &x, Dims { t, k, n }, &storage, None, &mut got);
                let mut twin = vec![f32::NAN; t * n];
                let portable = Kernels::portable();
                matmul_with(&portable, Precision::Exact, &x, Dims { t, k, n }, &storage, None, &mut twin);
                let mut worst = 0.0f32;
                for ti in 0..t {
                    for r in 0..n {
                        let mag: f32 = (0..k).map(|i| (x[ti * k + i] * wf[r * k + i]).abs()).sum();
                        let (g, w) = (got[ti * n + r], twin[ti * n + r]);
                        let bound = if kern.has_bf16_dot() { mag / 256.0 + 1e-6 } else { 1e-4 * (1.0 + w.abs()) };
                        assert!((g - w).abs() <= bound, "{tier} t={t} k={k} n={n} [{ti},{r}]: {g} vs {w}");
                        worst = worst.max((g - w).abs() / mag.max(1e-6));
                    }
                }
                if kern.has_bf16_dot() {
                    // The rounding is really applied (the test would not notice an f32 path).
                    assert!(worst > 0.0, "{tier}: bf16 activations gave f32-exact results");
                }
            }
        }
    }

    /// Several weights in one call (inside a step) give, bit for bit, what each gives alone
    /// (outside one): on every tier, both precisions, weights of different dtypes and row counts,
    /// decode and prefill token counts.
    #[test]
    fn many_weights_in_one_call_equal_each_weight_alone() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().expect("a pool of 2");
        for tier in Tier::supported() {
            let Some(kern) = Kernels::for_tier(tier) else { continue };
            for precision in [Precision::Exact, Precision::Bf16Activations] {
                for (t, k) in [(1, 96), (3, 33), (4, 64), (70, 48)] {
                    let x = noise(t * k, 11 + t as u64);
                    let bf = |n: usize, seed| {
                        CpuStorage::BF16(noise(n * k, seed).iter().map(|v| bf16::from_f32(*v)).collect())
                    };
                    let ws = [bf(70, 1), CpuStorage::F32(noise(9 * k, 2)), bf(33, 3), bf(1, 4), bf(300, 6)];
                    let ns = [70, 9, 33, 1, 300];
                    let biases: Vec<Vec<f32>> = ns.iter().map(|&n| noise(n, 5 + n as u64)).collect();
                    let alone: Vec<Vec<f32>> = (0..ws.len())
                        .map(|i| {
                            let mut out = vec![f32::NAN; t * ns[i]];
                            let d = Dims { t, k, n: ns[i] };
                            matmul_with(&kern, precision, &x, d, &ws[i], Some(&biases[i]), &mut out);
                            out
                        })
                        .collect();
                    let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| vec![f32::NAN; t * n]).collect();
                    let mut jobs: Vec<Job<'_>> = ws
                        .iter()
                        .zip(outs.iter_mut())
                        .zip(&biases)
                        .zip(ns)
                        .map(|(((w, out), b), n)| Job { w, n, bias: Some(b), out })
                        .collect();
                    // Inside a step, where few tokens go through the spinning helpers.
                    pool.install(|| {
                        super::super::busy::run(&mut || matmul_many_with(&kern, precision, &x, (t, k), &mut jobs))
                    });
                    for (i, (got, want)) in outs.iter().zip(&alone).enumerate() {
                        let same = got.iter().zip(want).all(|(g, w)| g.to_bits() == w.to_bits());
                        assert!(same, "{tier} {precision:?} t={t} k={k} weight {i}: {got:?} vs {want:?}");
                    }
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

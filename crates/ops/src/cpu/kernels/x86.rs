//! x86-64 panels: AVX2+FMA, AVX-512F/BW and AVX512-BF16.
//!
//! Every panel walks its output in micro-tiles of `MR` tokens × `NR` weight rows. A micro-tile
//! keeps `MR·NR` vector accumulators along K (the dot-product form: no packing of either
//! operand, and each weight vector loaded once serves `MR` tokens), then reduces each
//! accumulator horizontally once at the end. Tails along K are masked loads (AVX-512) or a
//! scalar loop (AVX2); tails of tokens or rows take a smaller micro-tile.
//!
//! Register budget: AVX-512 has 32 vector registers, so 4×4 accumulators + 4 weight vectors + 1
//! activation vector fit; AVX2 has 16, so its tile is 2×4.

use std::arch::x86_64::*;

use half::bf16;

/// Dispatches `(mr, nr)` (each 1..=4) to the const-generic micro-kernel `$micro`.
macro_rules! dispatch {
    ($micro:ident, $mr:expr, $nr:expr, $($arg:expr),*) => {
        match ($mr, $nr) {
            (1, 1) => $micro::<1, 1>($($arg),*),
            (1, 2) => $micro::<1, 2>($($arg),*),
            (1, 3) => $micro::<1, 3>($($arg),*),
            (1, _) => $micro::<1, 4>($($arg),*),
            (2, 1) => $micro::<2, 1>($($arg),*),
            (2, 2) => $micro::<2, 2>($($arg),*),
            (2, 3) => $micro::<2, 3>($($arg),*),
            (2, _) => $micro::<2, 4>($($arg),*),
            (3, 1) => $micro::<3, 1>($($arg),*),
            (3, 2) => $micro::<3, 2>($($arg),*),
            (3, 3) => $micro::<3, 3>($($arg),*),
            (3, _) => $micro::<3, 4>($($arg),*),
            (_, 1) => $micro::<4, 1>($($arg),*),
            (_, 2) => $micro::<4, 2>($($arg),*),
            (_, 3) => $micro::<4, 3>($($arg),*),
            (_, _) => $micro::<4, 4>($($arg),*),
        }
    };
}

/// The shortest weight rows (bytes) that a decode panel (all tokens in one micro-tile) reads one
/// row per tile. Measured on the 2-core CI VM (2026-12-05): SmolLM2-135M's decode went from 82 to
/// 98–106 tok/s against 4 rows per tile (4 interleaved streams 1,152 bytes long, which the hardware
/// prefetcher does not follow; software prefetches of the next tile's rows gained only 9%, and lost
/// 15–20% on a 1B model's 4 KiB rows). Shorter rows — attention's keys, 128 bytes — keep 4 rows per
/// tile, which loads the queries once for 4 keys (10% faster there). The tiling changes no sum:
/// each output has its own accumulator over K in the same order.
const DECODE_MIN_ROW_BYTES: usize = 512;

/// A safe-signature panel (see `super::Panel`) over the micro-kernel `$micro`, tiles of at most
/// `$mr` tokens × 4 rows, compiled for `$feat`.
macro_rules! panel {
    ($name:ident, $feat:literal, $micro:ident, $x:ty, $w:ty, $mr:literal) => {
        /// # Safety
        /// As `super::Panel`; the CPU supports the panel's target features.
        pub(super) unsafe fn $name(x: &[$x], t: usize, k: usize, w: &[$w], rows: usize, out: *mut f32, ldo: usize) {
            assert!(x.len() >= t * k && w.len() >= rows * k, "panel: operands shorter than t·k / rows·k");
            // SAFETY: the lengths are checked above; out and the CPU features are the caller's contract.
            unsafe { inner(x.as_ptr(), t, k, w.as_ptr(), rows, out, ldo) }

            #[target_feature(enable = $feat)]
            unsafe fn inner(x: *const $x, t: usize, k: usize, w: *const $w, rows: usize, out: *mut f32, ldo: usize) {
                // Decode (every token in one micro-tile) streams each weight row once: one row per
                // tile, so each thread reads one sequential stream (see DECODE_MIN_ROW_BYTES).
                let streamed = t <= $mr && k * std::mem::size_of::<$w>() >= DECODE_MIN_ROW_BYTES;
                let max_nr = if streamed { 1 } else { 4 };
                let mut j = 0;
                while j < rows {
                    let nr = (rows - j).min(max_nr);
                    let mut ti = 0;
                    while ti < t {
                        let mr = (t - ti).min($mr);
                        // SAFETY: ti < t and j < rows, so the tile's operands and outputs are in range.
                        unsafe {
                            let (xp, wp, op) = (x.add(ti * k), w.add(j * k), out.add(ti * ldo + j));
                            dispatch!($micro, mr, nr, xp, wp, k, op, ldo);
                        }
                        ti += mr;
                    }
                    j += nr;
                }
            }
        }
    };
}

panel!(avx512_f32, "avx512f,avx512bw", micro512_f32w, f32, f32, 4);
panel!(avx512_bf16, "avx512f,avx512bw", micro512_bf16w, f32, bf16, 4);
panel!(avx512bf16_bf16, "avx512f,avx512bw,avx512bf16", micro512_dpbf16, bf16, bf16, 4);
panel!(avx2_f32, "avx2,fma", micro256_f32w, f32, f32, 2);
panel!(avx2_bf16, "avx2,fma", micro256_bf16w, f32, bf16, 2);

/// The mask of the first `n` (< 16) lanes.
#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// 16 bf16 at `p` (the first `n` of them when masked), widened to f32.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn load_bf16x16(p: *const bf16, mask: Option<__mmask16>) -> __m512 {
    // SAFETY: the caller guarantees 16 readable elements, or `mask` lanes readable.
    let raw = unsafe {
        match mask {
            None => _mm256_loadu_si256(p.cast()),
            Some(m) => _mm256_maskz_loadu_epi16(m, p.cast()),
        }
    };
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
}

/// 16 f32 at `p` (the first lanes of `mask`).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn load_f32x16(p: *const f32, mask: Option<__mmask16>) -> __m512 {
    // SAFETY: as `load_bf16x16`.
    unsafe {
        match mask {
            None => _mm512_loadu_ps(p),
            Some(m) => _mm512_maskz_loadu_ps(m, p),
        }
    }
}

/// The AVX-512 f32 micro-kernel over a weight loader; `$name` is generated per weight type.
macro_rules! micro512 {
    ($name:ident, $w:ty, $load:ident) => {
        /// `MR` tokens × `NR` weight rows over all of K; see the module doc.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        unsafe fn $name<const MR: usize, const NR: usize>(
            x: *const f32,
            w: *const $w,
            k: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            let mut acc = [[_mm512_setzero_ps(); NR]; MR];
            let mut wv = [_mm512_setzero_ps(); NR];
            let mut i = 0;
            // SAFETY (whole body): rows of x and w hold k elements; loads stay below k (masked
            // tail); out is valid at m·ldo + j (caller).
            while i + 16 <= k {
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = unsafe { $load(w.add(j * k + i), None) };
                }
                for (m, row) in acc.iter_mut().enumerate() {
                    let xv = unsafe { load_f32x16(x.add(m * k + i), None) };
                    for (a, v) in row.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(xv, *v, *a);
                    }
                }
                i += 16;
            }
            if i < k {
                let mask = Some(mask16(k - i));
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = unsafe { $load(w.add(j * k + i), mask) };
                }
                for (m, row) in acc.iter_mut().enumerate() {
                    let xv = unsafe { load_f32x16(x.add(m * k + i), mask) };
                    for (a, v) in row.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(xv, *v, *a);
                    }
                }
            }
            for (m, row) in acc.iter().enumerate() {
                for (j, a) in row.iter().enumerate() {
                    unsafe { *out.add(m * ldo + j) = _mm512_reduce_add_ps(*a) };
                }
            }
        }
    };
}

micro512!(micro512_f32w, f32, load_f32x16);
micro512!(micro512_bf16w, bf16, load_bf16x16);

/// 32 bf16 at `p` (the first `n` < 32 of them when masked; the rest read as zero).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn load_bf16x32(p: *const bf16, mask: Option<__mmask32>) -> __m512bh {
    // SAFETY: the caller guarantees 32 readable elements, or `mask` lanes readable.
    let raw = unsafe {
        match mask {
            None => _mm512_loadu_epi16(p.cast()),
            Some(m) => _mm512_maskz_loadu_epi16(m, p.cast()),
        }
    };
    // SAFETY: __m512i and __m512bh are both 64 plain bytes.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(raw) }
}

/// `MR` bf16 tokens × `NR` bf16 weight rows: `vdpbf16ps` multiplies 32 pairs exactly and adds
/// them into 16 f32 sums, so only the rounding of the activations to bf16 differs from f32 math.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn micro512_dpbf16<const MR: usize, const NR: usize>(
    x: *const bf16,
    w: *const bf16,
    k: usize,
    out: *mut f32,
    ldo: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    // SAFETY: __m512bh is plain bytes; all-zero is a valid value.
    let mut wv: [__m512bh; NR] = unsafe { std::mem::zeroed() };
    let mut i = 0;
    // SAFETY (whole body): as in `micro512!`.
    while i + 32 <= k {
        for (j, v) in wv.iter_mut().enumerate() {
            *v = unsafe { load_bf16x32(w.add(j * k + i), None) };
        }
        for (m, row) in acc.iter_mut().enumerate() {
            let xv = unsafe { load_bf16x32(x.add(m * k + i), None) };
            for (a, v) in row.iter_mut().zip(&wv) {
                *a = _mm512_dpbf16_ps(*a, xv, *v);
            }
        }
        i += 32;
    }
    if i < k {
        let mask = Some(((1u64 << (k - i)) - 1) as __mmask32);
        for (j, v) in wv.iter_mut().enumerate() {
            *v = unsafe { load_bf16x32(w.add(j * k + i), mask) };
        }
        for (m, row) in acc.iter_mut().enumerate() {
            let xv = unsafe { load_bf16x32(x.add(m * k + i), mask) };
            for (a, v) in row.iter_mut().zip(&wv) {
                *a = _mm512_dpbf16_ps(*a, xv, *v);
            }
        }
    }
    for (m, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            unsafe { *out.add(m * ldo + j) = _mm512_reduce_add_ps(*a) };
        }
    }
}

/// Sum of the 8 lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// 8 bf16 at `p`, widened to f32.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load_bf16x8(p: *const bf16) -> __m256 {
    // SAFETY: the caller guarantees 8 readable elements.
    let raw = unsafe { _mm_loadu_si128(p.cast()) };
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
}

/// 8 f32 at `p`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn load_f32x8(p: *const f32) -> __m256 {
    // SAFETY: the caller guarantees 8 readable elements.
    unsafe { _mm256_loadu_ps(p) }
}

/// The AVX2 micro-kernel over a weight loader; K's tail (< 8) is a scalar loop.
macro_rules! micro256 {
    ($name:ident, $w:ty, $load:ident) => {
        /// `MR` tokens × `NR` weight rows over all of K; see the module doc.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn $name<const MR: usize, const NR: usize>(
            x: *const f32,
            w: *const $w,
            k: usize,
            out: *mut f32,
            ldo: usize,
        ) {
            use super::Widen;
            let mut acc = [[_mm256_setzero_ps(); NR]; MR];
            let mut wv = [_mm256_setzero_ps(); NR];
            let body = k / 8 * 8;
            let mut i = 0;
            // SAFETY (whole body): as in `micro512!`, with the tail read element by element.
            while i < body {
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = unsafe { $load(w.add(j * k + i)) };
                }
                for (m, row) in acc.iter_mut().enumerate() {
                    let xv = unsafe { load_f32x8(x.add(m * k + i)) };
                    for (a, v) in row.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xv, *v, *a);
                    }
                }
                i += 8;
            }
            for (m, row) in acc.iter().enumerate() {
                for (j, a) in row.iter().enumerate() {
                    let mut s = hsum256(*a);
                    for ii in body..k {
                        s += unsafe { *x.add(m * k + ii) * (*w.add(j * k + ii)).widen() };
                    }
                    unsafe { *out.add(m * ldo + j) = s };
                }
            }
        }
    };
}

micro256!(micro256_f32w, f32, load_f32x8);
micro256!(micro256_bf16w, bf16, load_bf16x8);

/// `exp_sub` compiled for AVX-512 (the portable body vectorises to 16 lanes).
pub(super) fn exp_sub_avx512(v: &mut [f32], m: f32) -> f32 {
    #[target_feature(enable = "avx512f,avx512bw")]
    fn inner(v: &mut [f32], m: f32) -> f32 {
        super::exp_sub_body(v, m)
    }
    // SAFETY: only reachable through a `Kernels` of an AVX-512 tier, built after detection.
    unsafe { inner(v, m) }
}

/// `exp_sub` compiled for AVX2 + FMA.
pub(super) fn exp_sub_avx2(v: &mut [f32], m: f32) -> f32 {
    #[target_feature(enable = "avx2,fma")]
    fn inner(v: &mut [f32], m: f32) -> f32 {
        super::exp_sub_body(v, m)
    }
    // SAFETY: only reachable through a `Kernels` of the AVX2 tier or above, built after detection.
    unsafe { inner(v, m) }
}

/// `pv_rows` for AVX-512 (see [`pv512!`]).
pub(super) fn pv_rows_avx512(p: &[f32], kb: usize, v: &[f32], d: usize, o: &mut [f32]) {
    pv_rows_512_f32(p, kb, v, d, o)
}

/// `pv_rows` compiled for AVX2 + FMA.
pub(super) fn pv_rows_avx2(p: &[f32], kb: usize, v: &[f32], d: usize, o: &mut [f32]) {
    #[target_feature(enable = "avx2,fma")]
    fn inner(p: &[f32], kb: usize, v: &[f32], d: usize, o: &mut [f32]) {
        super::pv_rows_body(p, kb, v, d, o)
    }
    // SAFETY: as `exp_sub_avx2`.
    unsafe { inner(p, kb, v, d, o) }
}

/// `pv_rows_bf16` for AVX-512 (bf16 values widened in registers; see [`pv512!`]).
pub(super) fn pv_rows_bf16_avx512(p: &[f32], kb: usize, v: &[bf16], d: usize, o: &mut [f32]) {
    pv_rows_512_bf16(p, kb, v, d, o)
}

/// `o[r] += Σⱼ p[r·kb + j] · v[j]` over values loaded by `$load`: keys outer, up to 4 rows inner,
/// each row's slice of up to 64 columns of `o` held in registers across all `kb` keys, so each
/// value vector is loaded (and widened) once for the rows rather than once per row. Each element
/// of each row sums exactly as `pv_rows_body` does (keys in order, a multiply then an add, a zero
/// weight skipped), so the results are bit for bit the same. A width `d` that is not a multiple of
/// 16 takes `pv_rows_body`.
macro_rules! pv512 {
    ($name:ident, $tile:ident, $v:ty, $load:ident) => {
        fn $name(p: &[f32], kb: usize, v: &[$v], d: usize, o: &mut [f32]) {
            #[target_feature(enable = "avx512f,avx512bw")]
            fn body(p: &[f32], kb: usize, v: &[$v], d: usize, o: &mut [f32]) {
                super::pv_rows_body(p, kb, v, d, o)
            }
            let rows = o.len() / d.max(1);
            if d == 0 || !d.is_multiple_of(16) || p.len() < rows * kb || v.len() < kb * d {
                // SAFETY: only reachable through a `Kernels` of an AVX-512 tier, built after detection.
                return unsafe { body(p, kb, v, d, o) };
            }
            // SAFETY: as above; the lengths are checked above.
            unsafe { inner(p.as_ptr(), kb, v.as_ptr(), d, o.as_mut_ptr(), rows) }

            #[target_feature(enable = "avx512f,avx512bw")]
            unsafe fn inner(p: *const f32, kb: usize, v: *const $v, d: usize, o: *mut f32, rows: usize) {
                let mut r0 = 0;
                while r0 < rows {
                    let nr = (rows - r0).min(4);
                    let mut c = 0;
                    while c < d {
                        let nv = ((d - c) / 16).min(4);
                        // SAFETY: rows r0..r0 + nr of p (kb each) and o (d each), and columns
                        // c..c + 16·nv of every value row, are in range.
                        unsafe {
                            let (pp, vp, op) = (p.add(r0 * kb), v.add(c), o.add(r0 * d + c));
                            dispatch!($tile, nr, nv, pp, kb, vp, d, op);
                        }
                        c += 16 * nv;
                    }
                    r0 += nr;
                }
            }
        }

        /// `NR` rows × `NV` vectors of 16 columns over all `kb` keys.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        unsafe fn $tile<const NR: usize, const NV: usize>(
            p: *const f32,
            kb: usize,
            v: *const $v,
            d: usize,
            o: *mut f32,
        ) {
            let mut acc = [[_mm512_setzero_ps(); NV]; NR];
            // SAFETY (whole body): the caller's ranges (rows of p and o, NV·16 columns of v's rows).
            for (r, row) in acc.iter_mut().enumerate() {
                for (x, a) in row.iter_mut().enumerate() {
                    *a = unsafe { _mm512_loadu_ps(o.add(r * d + 16 * x)) };
                }
            }
            let mut vv = [_mm512_setzero_ps(); NV];
            for j in 0..kb {
                for (x, w) in vv.iter_mut().enumerate() {
                    *w = unsafe { $load(v.add(j * d + 16 * x), None) };
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let pj = unsafe { *p.add(r * kb + j) };
                    if pj != 0.0 {
                        let pb = _mm512_set1_ps(pj);
                        for (a, w) in row.iter_mut().zip(&vv) {
                            *a = _mm512_add_ps(*a, _mm512_mul_ps(pb, *w));
                        }
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (x, a) in row.iter().enumerate() {
                    unsafe { _mm512_storeu_ps(o.add(r * d + 16 * x), *a) };
                }
            }
        }
    };
}

pv512!(pv_rows_512_f32, pv_tile_f32, f32, load_f32x16);
pv512!(pv_rows_512_bf16, pv_tile_bf16, bf16, load_bf16x16);

/// `pv_rows_bf16` compiled for AVX2 + FMA.
pub(super) fn pv_rows_bf16_avx2(p: &[f32], kb: usize, v: &[bf16], d: usize, o: &mut [f32]) {
    #[target_feature(enable = "avx2,fma")]
    fn inner(p: &[f32], kb: usize, v: &[bf16], d: usize, o: &mut [f32]) {
        super::pv_rows_body(p, kb, v, d, o)
    }
    // SAFETY: as `exp_sub_avx2`.
    unsafe { inner(p, kb, v, d, o) }
}

// Decode-shaped matmul: out[t, n] = sum_k x[t, k] · w[n, k] for a few rows of x (T ≤ 8), weights
// in nn.Linear layout read once, straight from HBM. CPU twin: src/cpu/matmul.rs.
//
// Memory-bound: each weight byte is used T times. One block of 128 threads per output row n (a
// warp per row left a long last wave: 89% against 95% of copy bandwidth at 14336×4096 on an
// H100); each thread reads 16 bytes (8 weights) per step and has UNROLL steps' loads in flight
// before it uses any; the four warps' partial sums meet in shared memory. x (f32, small) comes
// through L1. Needs K % 8 == 0 (the launcher falls back to matmul.cu otherwise).
// Launch: grid N, block 128; entry gemv_{bf16,f16}_t{TT} for T ≤ TT, and the fused forms of a
// decode step: gemv_add_* (out += x·wᵀ, the residual add as the epilogue) and gemv_swiglu_*
// (out = silu(x·gateᵀ) ⊙ (x·upᵀ), both weights read in one launch), and gemv_norm_qkv_* (the
// RMSNorm of x folded into the Q, K and V projections: one launch, grid nq + nk + nv, each block
// recomputes the rows' rms and norms x as it reads it). CPU twins: the plain ops composed
// (src/backend/fused.rs). gemv_norm_swiglu_* folds the MLP's RMSNorm into gemv_swiglu the same
// way.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define UNROLL 4

// Programmatic dependent launch (src/cuda/pdl.rs, OLLM_CUDA_PDL=1): wait for the kernel before
// this one to finish and its writes to show, then let the next one start launching. No-ops for
// a plain launch and before sm_90.
__device__ __forceinline__ void pdl_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void widen(uint4 raw, float* f, const __nv_bfloat16*) {
    unsigned u[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(u[i] << 16);
        f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ void widen(uint4 raw, float* f, const __half*) {
    const __half2* p = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 v = __half22float2(p[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

// Eight norm weights from element 8c as floats (exact widening, as rmsnorm.cu's to_f32).
__device__ __forceinline__ void load8(const __nv_bfloat16* p, int c, float* f) {
    widen(__ldg(reinterpret_cast<const uint4*>(p) + c), f, p);
}
__device__ __forceinline__ void load8(const __half* p, int c, float* f) {
    widen(__ldg(reinterpret_cast<const uint4*>(p) + c), f, p);
}
__device__ __forceinline__ void load8(const float* p, int c, float* f) {
    float4 a = __ldg(reinterpret_cast<const float4*>(p) + 2 * c), b = __ldg(reinterpret_cast<const float4*>(p) + 2 * c + 1);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

// No norm: x is used as it is.
struct NoNorm {};

// RMSNorm of x's rows on the fly: x[t, i] is used as (offset + w[i]) * (x[t, i] * rinv[t]),
// the expression rmsnorm.cu writes, so the products equal the norm's output then the GEMV.
template <typename NW>
struct RowNorm {
    const NW* w;
    const float* rinv;  // [T], in shared memory
    float offset;
};

__device__ __forceinline__ void norm_chunk(const NoNorm&, int, float*) {}
template <typename NW>
__device__ __forceinline__ void norm_chunk(const RowNorm<NW>& nm, int c, float* nf) {
    load8(nm.w, c, nf);
}
__device__ __forceinline__ void norm_apply(const NoNorm&, int, const float*, float4&, float4&) {}
template <typename NW>
__device__ __forceinline__ void norm_apply(const RowNorm<NW>& nm, int t, const float* nf, float4& a, float4& b) {
    const float r = nm.rinv[t], o = nm.offset;
    a.x = (o + nf[0]) * (a.x * r);
    a.y = (o + nf[1]) * (a.y * r);
    a.z = (o + nf[2]) * (a.z * r);
    a.w = (o + nf[3]) * (a.w * r);
    b.x = (o + nf[4]) * (b.x * r);
    b.y = (o + nf[5]) * (b.y * r);
    b.z = (o + nf[6]) * (b.z * r);
    b.w = (o + nf[7]) * (b.w * r);
}

// The dot products of x's rows with weight row n, summed over the block: acc[t] for t < T.
// Every entry (plain, add, swiglu, norm_qkv) sums in this one order, so their products are
// equal bits.
template <typename W, int TT, typename NM = NoNorm>
__device__ __forceinline__ void gemv_row(const float* __restrict__ x, const W* __restrict__ w, int T, int k,
                                         int n, float (&part)[4][TT], float* sums, const NM& nm = NM()) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)n * k);
    const int chunks = k / 8;
    float acc[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) acc[t] = 0.f;
    for (int c0 = threadIdx.x; c0 < chunks; c0 += 128 * UNROLL) {
        uint4 raw[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int c = c0 + u * 128;
            raw[u] = c < chunks ? __ldcs(wr + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int c = c0 + u * 128;
            if (c >= chunks) break;
            float wf[8], nf[8];
            widen(raw[u], wf, w);
            norm_chunk(nm, c, nf);
#pragma unroll
            for (int t = 0; t < TT; t++) {
                if (t < T) {
                    const float4* xr = reinterpret_cast<const float4*>(x + (size_t)t * k) + 2 * c;
                    float4 a = __ldg(xr), b = __ldg(xr + 1);
                    norm_apply(nm, t, nf, a, b);
                    acc[t] += a.x * wf[0] + a.y * wf[1] + a.z * wf[2] + a.w * wf[3] + b.x * wf[4] + b.y * wf[5] +
                              b.z * wf[6] + b.w * wf[7];
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TT; t++) {
        float a = acc[t];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
        if (lane == 0) part[warp][t] = a;
    }
    __syncthreads();
    if (threadIdx.x < T) {
        int t = threadIdx.x;
        float sum = 0.f;
#pragma unroll
        for (int tt = 0; tt < TT; tt++)
            if (tt == t) sum = part[0][tt] + part[1][tt] + part[2][tt] + part[3][tt];
        sums[t] = sum;
    }
}

// Epilogues: MODE 0 stores, 1 adds into out (a residual add), 2 is SwiGLU with w2 the up
// weights: out = silu(x·w) ⊙ (x·w2), silu written as silu_mul_f32 writes it (elementwise.cu).
template <typename W, int TT, int MODE>
__device__ __forceinline__ void gemv_body(const float* __restrict__ x, const W* __restrict__ w,
                                          const W* __restrict__ w2, float* __restrict__ out, int T, int n_out,
                                          int k) {
    __shared__ float part[4][TT];
    __shared__ float sums[TT], sums2[TT];
    pdl_sync();
    const int n = blockIdx.x;
    gemv_row<W, TT>(x, w, T, k, n, part, sums);
    if (MODE == 2) {
        __syncthreads();  // part is reused
        gemv_row<W, TT>(x, w2, T, k, n, part, sums2);
    }
    if (threadIdx.x < T) {
        int t = threadIdx.x;
        float* o = out + (size_t)t * n_out + n;
        if (MODE == 0) *o = sums[t];
        if (MODE == 1) *o += sums[t];
        if (MODE == 2) {
            float g = sums[t];
            *o = g / (1.f + expf(-g)) * sums2[t];
        }
    }
}

#define GEMV_ENTRY(NAME, W, TT)                                                                           \
    extern "C" __global__ void __launch_bounds__(128) gemv_##NAME##_t##TT(const float* x, const W* w,    \
                                                                            float* out, int T, int n_out, \
                                                                            int k) {                      \
        gemv_body<W, TT, 0>(x, w, w, out, T, n_out, k);                                                   \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) gemv_add_##NAME##_t##TT(                            \
        const float* x, const W* w, float* out, int T, int n_out, int k) {                                \
        gemv_body<W, TT, 1>(x, w, w, out, T, n_out, k);                                                   \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(128) gemv_swiglu_##NAME##_t##TT(                         \
        const float* x, const W* w, const W* w2, float* out, int T, int n_out, int k) {                   \
        gemv_body<W, TT, 2>(x, w, w2, out, T, n_out, k);                                                  \
    }

GEMV_ENTRY(bf16, __nv_bfloat16, 1)
GEMV_ENTRY(bf16, __nv_bfloat16, 2)
GEMV_ENTRY(bf16, __nv_bfloat16, 4)
GEMV_ENTRY(bf16, __nv_bfloat16, 8)
GEMV_ENTRY(f16, __half, 1)
GEMV_ENTRY(f16, __half, 2)
GEMV_ENTRY(f16, __half, 4)
GEMV_ENTRY(f16, __half, 8)

// rsqrt(mean(x^2) + eps) of row xr [n] as rmsnorm.cu's block_inv_rms computes it with its
// 256 threads, from this kernel's 128: thread i holds the strided sums of threads i and
// i + 128, the eight warps' sums meet in red [8] in the same order. The same in every thread.
__device__ __forceinline__ float inv_rms_256(const float* __restrict__ xr, int n, float eps, float* red) {
    float s0 = 0.f, s1 = 0.f;
    for (int i = threadIdx.x; i < n; i += 256) {
        float v = xr[i];
        s0 += v * v;
    }
    for (int i = threadIdx.x + 128; i < n; i += 256) {
        float v = xr[i];
        s1 += v * v;
    }
    for (int o = 16; o > 0; o >>= 1) {
        s0 += __shfl_xor_sync(0xffffffffu, s0, o);
        s1 += __shfl_xor_sync(0xffffffffu, s1, o);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        red[warp] = s0;
        red[warp + 4] = s1;
    }
    __syncthreads();
    float ss = lane < 8 ? red[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    __syncthreads();  // red is reused by the next row
    return rsqrtf(ss / (float)n + eps);
}

// q = RMSNorm(x)·wqᵀ, k = ·wkᵀ, v = ·wvᵀ: block b < nq is row b of wq, then wk's rows, then
// wv's. x [T, kd], norm weight nw [kd], outputs [T, nq], [T, nk], [T, nv].
template <typename W, typename NW, int TT>
__device__ __forceinline__ void norm_qkv_body(const float* __restrict__ x, const NW* __restrict__ nw, float eps,
                                              float offset, const W* __restrict__ wq, const W* __restrict__ wk,
                                              const W* __restrict__ wv, float* __restrict__ q, float* __restrict__ k,
                                              float* __restrict__ v, int T, int nq, int nk, int nv, int kd) {
    __shared__ float part[4][TT];
    pdl_sync();
    __shared__ float sums[TT], rinv[TT], red[8];
    for (int t = 0; t < T; t++) {
        float r = inv_rms_256(x + (size_t)t * kd, kd, eps, red);
        if (threadIdx.x == 0) rinv[t] = r;
    }
    __syncthreads();
    int n = blockIdx.x, n_out = nq;
    const W* w = wq;
    float* out = q;
    if (n >= nq + nk) {
        n -= nq + nk, n_out = nv, w = wv, out = v;
    } else if (n >= nq) {
        n -= nq, n_out = nk, w = wk, out = k;
    }
    RowNorm<NW> nm{nw, rinv, offset};
    gemv_row<W, TT, RowNorm<NW>>(x, w, T, kd, n, part, sums, nm);
    if (threadIdx.x < T) out[(size_t)threadIdx.x * n_out + n] = sums[threadIdx.x];
}

// out = silu(RMSNorm(x)·gateᵀ) ⊙ (RMSNorm(x)·upᵀ): the MLP's norm folded into gemv_swiglu.
template <typename W, typename NW, int TT>
__device__ __forceinline__ void norm_swiglu_body(const float* __restrict__ x, const NW* __restrict__ nw, float eps,
                                                 float offset, const W* __restrict__ wg, const W* __restrict__ wu,
                                                 float* __restrict__ out, int T, int n_out, int kd) {
    __shared__ float part[4][TT];
    pdl_sync();
    __shared__ float sums[TT], sums2[TT], rinv[TT], red[8];
    for (int t = 0; t < T; t++) {
        float r = inv_rms_256(x + (size_t)t * kd, kd, eps, red);
        if (threadIdx.x == 0) rinv[t] = r;
    }
    __syncthreads();
    const int n = blockIdx.x;
    RowNorm<NW> nm{nw, rinv, offset};
    gemv_row<W, TT, RowNorm<NW>>(x, wg, T, kd, n, part, sums, nm);
    __syncthreads();  // part is reused
    gemv_row<W, TT, RowNorm<NW>>(x, wu, T, kd, n, part, sums2, nm);
    if (threadIdx.x < T) {
        int t = threadIdx.x;
        float g = sums[t];
        out[(size_t)t * n_out + n] = g / (1.f + expf(-g)) * sums2[t];
    }
}

#define NORM_QKV_ENTRY(NAME, W, NWNAME, NW, TT)                                                                \
    extern "C" __global__ void __launch_bounds__(128) gemv_norm_qkv_##NAME##_##NWNAME##w_t##TT(                 \
        const float* x, const NW* nw, float eps, float offset, const W* wq, const W* wk, const W* wv, float* q, \
        float* k, float* v, int T, int nq, int nk, int nv, int kd) {                                           \
        norm_qkv_body<W, NW, TT>(x, nw, eps, offset, wq, wk, wv, q, k, v, T, nq, nk, nv, kd);                  \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(128) gemv_norm_swiglu_##NAME##_##NWNAME##w_t##TT(              \
        const float* x, const NW* nw, float eps, float offset, const W* wg, const W* wu, float* out, int T,     \
        int n_out, int kd) {                                                                                   \
        norm_swiglu_body<W, NW, TT>(x, nw, eps, offset, wg, wu, out, T, n_out, kd);                            \
    }
#define NORM_QKV_ENTRIES(NAME, W, TT)                          \
    NORM_QKV_ENTRY(NAME, W, bf16, __nv_bfloat16, TT)           \
    NORM_QKV_ENTRY(NAME, W, f16, __half, TT)                   \
    NORM_QKV_ENTRY(NAME, W, f32, float, TT)

NORM_QKV_ENTRIES(bf16, __nv_bfloat16, 1)
NORM_QKV_ENTRIES(bf16, __nv_bfloat16, 8)
NORM_QKV_ENTRIES(f16, __half, 1)
NORM_QKV_ENTRIES(f16, __half, 8)

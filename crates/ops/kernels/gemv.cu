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
// (out = silu(x·gateᵀ) ⊙ (x·upᵀ), both weights read in one launch). CPU twins: the plain ops
// composed (src/backend/fused.rs).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define UNROLL 4

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

// The dot products of x's rows with weight row n, summed over the block: acc[t] for t < T.
// Every entry (plain, add, swiglu) sums in this one order, so their products are equal bits.
template <typename W, int TT>
__device__ __forceinline__ void gemv_row(const float* __restrict__ x, const W* __restrict__ w, int T, int k,
                                         int n, float (&part)[4][TT], float* sums) {
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
            float wf[8];
            widen(raw[u], wf, w);
#pragma unroll
            for (int t = 0; t < TT; t++) {
                if (t < T) {
                    const float4* xr = reinterpret_cast<const float4*>(x + (size_t)t * k) + 2 * c;
                    float4 a = __ldg(xr), b = __ldg(xr + 1);
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

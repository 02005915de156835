// Mixture-of-experts kernels, f32 activations (CPU twins in src/cpu/moe.rs).
#include "common.cuh"

// GPT-OSS clamped SwiGLU (docs/models.md §3.3). gate_up [rows, 2I]: gate in the even columns, up in
// the odd ones; out [rows, I]; total = rows * I.
//   g = min(gate, limit); u = clamp(up, -limit, limit); out = (u + 1) * (g * sigmoid(alpha * g))
// The clamps are comparisons, so a NaN passes through as in torch.clamp. Grid-stride, any launch.
extern "C" __global__ void clamped_swiglu_f32(const float* __restrict__ gate_up, float* __restrict__ out,
                                              long long total, float limit, float alpha) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        float g = gate_up[2 * i];
        float u = gate_up[2 * i + 1];
        g = g > limit ? limit : g;
        u = u > limit ? limit : (u < -limit ? -limit : u);
        float glu = g / (1.f + expf(-alpha * g));
        out[i] = (u + 1.f) * glu;
    }
}

// Router top-k over logits [t, e] f32, 1 <= k <= e <= 1024.
//
// Experts are taken in k rounds of warp argmax over those not yet chosen: the larger logit wins,
// then the lower index (NaN ranks as -inf), so both backends pick bit-identical ids. Lane l owns
// experts l, l + 32, l + 64, ... and marks the chosen ones in a bit mask (bit j = expert l + 32j,
// hence e <= 1024). After a butterfly every lane holds the same winner.
//
// Weights (mode): 0 = softmax over the k chosen logits (GPT-OSS); 1 = the chosen probabilities of
// a softmax over all e (Qwen3-Next); 2 = the same divided by their sum (norm_topk_prob). Lane 0
// forms them in the CPU twin's order; only the sum over all e (mode 1, 2) is a warp reduction.
//
// out [2, t, k]: out[0] = weights, out[1] = ids as floats (exact below 2^24).
// Launch: blockDim.x = 32 * warps, one warp per token, grid = ceil(t / warps).
__device__ __forceinline__ bool expert_beats(float a, int ia, float b, int ib) {
    return a > b || (a == b && ia < ib);
}

__device__ __forceinline__ float rank_key(float v) { return v != v ? __int_as_float(0xff800000) : v; }

extern "C" __global__ void router_topk_f32(const float* __restrict__ logits, float* __restrict__ out, int t, int e,
                                           int k, int mode) {
    const float neg_inf = __int_as_float(0xff800000);
    int lane = threadIdx.x % 32;
    int token = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (token >= t) return;  // the whole warp leaves together
    const float* row = logits + (size_t)token * e;
    float* weights = out + (size_t)token * k;
    float* ids = out + (size_t)t * k + (size_t)token * k;

    // Max and sum over all e for the softmax of modes 1 and 2 (fmaxf skips NaN, like the CPU's max).
    float m = neg_inf, total = 0.f;
    if (mode != 0) {
        for (int j = lane; j < e; j += 32) m = fmaxf(m, row[j]);
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        for (int j = lane; j < e; j += 32) total += expf(row[j] - m);
        for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
    }

    unsigned int chosen = 0;  // bit j: expert lane + 32j is taken
    for (int r = 0; r < k; ++r) {
        float best = neg_inf;
        int best_i = 0x7fffffff;  // loses to every real expert, -inf ones included
        for (int j = 0, x = lane; x < e; ++j, x += 32) {
            float v = rank_key(row[x]);
            if (!((chosen >> j) & 1u) && expert_beats(v, x, best, best_i)) {
                best = v;
                best_i = x;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
            if (expert_beats(ov, oi, best, best_i)) {
                best = ov;
                best_i = oi;
            }
        }
        if (best_i % 32 == lane) chosen |= 1u << (best_i / 32);
        if (lane == 0) {
            ids[r] = (float)best_i;
            weights[r] = row[best_i];  // the raw logit; turned into a weight below
        }
    }

    if (lane != 0) return;
    if (mode == 0) {
        float top = weights[0];
        float sum = 0.f;
        for (int r = 0; r < k; ++r) {
            float w = expf(weights[r] - top);
            weights[r] = w;
            sum += w;
        }
        for (int r = 0; r < k; ++r) weights[r] /= sum;
    } else {
        for (int r = 0; r < k; ++r) weights[r] = expf(weights[r] - m) / total;
        if (mode == 2) {
            float sum = 0.f;
            for (int r = 0; r < k; ++r) sum += weights[r];
            for (int r = 0; r < k; ++r) weights[r] /= sum;
        }
    }
}

// MXFP4 (docs/models.md §3.4): a 32-element group is 16 block bytes (element 2j in the low nibble of
// byte j, 2j+1 in the high one) and one E8M0 scale, 2^(s-127), with s = 0 the subnormal 2^-127.
// e2m1 gives code c times the scale in f32, exactly (two significant bits times a power of two;
// bf16 holds it exactly too). A zero code stays a signed zero whatever the scale (ldexp
// semantics; 0 · 2^128 would be NaN).
__device__ __forceinline__ float e2m1(unsigned int c, float scale) {
    unsigned int e = (c >> 1) & 3u, m = c & 1u;
    unsigned int mag = e ? (((e + 126u) << 23) | (m << 22)) : (m ? (126u << 23) : 0u);
    float v = __uint_as_float(((c & 8u) << 28) | mag);
    return mag == 0u ? v : v * scale;
}

__device__ __forceinline__ float e8m0(unsigned int s) {
    return __uint_as_float(s == 0 ? 0x00400000u : s << 23);
}

// MXFP4 -> bf16, bit-exact with the CPU twin (src/mxfp4.rs). One thread per 4 block bytes (8
// outputs, one 16-byte store), so neighbouring threads read and write neighbouring words.
// out holds groups * 32 bf16 values. Grid-stride over groups * 4 words.
extern "C" __global__ void dequant_mxfp4_bf16(const unsigned int* __restrict__ blocks,
                                              const unsigned char* __restrict__ scales, uint4* __restrict__ out,
                                              long long groups) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < groups * 4;
         i += (long long)gridDim.x * blockDim.x) {
        float scale = e8m0(scales[i >> 2]);
        unsigned int v = blocks[i];
        unsigned int p[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            unsigned int byte = (v >> (8 * j)) & 255u;
            unsigned int lo = __bfloat16_as_ushort(__float2bfloat16_rn(e2m1(byte & 15u, scale)));
            unsigned int hi = __bfloat16_as_ushort(__float2bfloat16_rn(e2m1(byte >> 4, scale)));
            p[j] = lo | (hi << 16);
        }
        out[i] = make_uint4(p[0], p[1], p[2], p[3]);
    }
}

// Decode-shaped matmul straight from MXFP4: out[t, n] = sum_k x[t, k] · W[n, k] for T <= TT rows
// of x, W as blocks [N, K/32, 16] and scales [N, K/32] (dequant_mxfp4_bf16's layout). Reads the
// packed bytes once (4.25 bits a weight) instead of writing and reading a bf16 copy. A warp per
// output row (K/32 · 17 bytes), four rows per 128-thread block; lane i takes groups i, i+32, ...
// and the warp's sums meet by shuffles. x (f32, small) comes through L1. CPU twin: dequantise,
// then matmul (src/cpu/mod.rs).
template <int TT>
__device__ __forceinline__ void gemv_mxfp4_body(const float* __restrict__ x, const uint4* __restrict__ blocks,
                                                const unsigned char* __restrict__ scales, float* __restrict__ out,
                                                int T, int n_out, int groups) {
    const int lane = threadIdx.x % 32;
    const int n = blockIdx.x * 4 + threadIdx.x / 32;
    if (n >= n_out) return;  // the whole warp leaves together
    const uint4* br = blocks + (size_t)n * groups;
    const unsigned char* sr = scales + (size_t)n * groups;
    const size_t k = (size_t)groups * 32;
    float acc[TT];
#pragma unroll
    for (int t = 0; t < TT; ++t) acc[t] = 0.f;
    for (int g = lane; g < groups; g += 32) {
        uint4 b = __ldcs(br + g);
        float scale = e8m0(sr[g]);
        unsigned int w4[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) {  // block bytes 4q .. 4q+3: elements 8q .. 8q+7 of the group
            float wf[8];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                unsigned int byte = (w4[q] >> (8 * j)) & 255u;
                wf[2 * j] = e2m1(byte & 15u, scale);
                wf[2 * j + 1] = e2m1(byte >> 4, scale);
            }
#pragma unroll
            for (int t = 0; t < TT; ++t) {
                if (t < T) {
                    const float4* xr = reinterpret_cast<const float4*>(x + t * k + (size_t)g * 32 + q * 8);
                    float4 a = __ldg(xr), c = __ldg(xr + 1);
                    acc[t] += a.x * wf[0] + a.y * wf[1] + a.z * wf[2] + a.w * wf[3] + c.x * wf[4] + c.y * wf[5] +
                              c.z * wf[6] + c.w * wf[7];
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TT; ++t) {
        float a = acc[t];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
        if (lane == 0 && t < T) out[(size_t)t * n_out + n] = a;
    }
}

#define GEMV_MXFP4(TT)                                                                                       \
    extern "C" __global__ void gemv_mxfp4_t##TT(const float* __restrict__ x, const uint4* __restrict__ blocks, \
                                                const unsigned char* __restrict__ scales, float* __restrict__ out, \
                                                int T, int n_out, int groups) {                              \
        gemv_mxfp4_body<TT>(x, blocks, scales, out, T, n_out, groups);                                       \
    }
GEMV_MXFP4(1)
GEMV_MXFP4(2)
GEMV_MXFP4(4)
GEMV_MXFP4(8)

// out [b, a] = src [a, b] transposed, elements of 2 or 4 bytes moved as raw bits. 32x32 tiles
// through shared memory (one padding column against bank conflicts); block (32, 8), grid
// (ceil(b/32), ceil(a/32)).
#define TRANSPOSE_KERNEL(NAME, T)                                                                       \
    extern "C" __global__ void NAME(const T* __restrict__ src, T* __restrict__ out, int a, int b) {     \
        __shared__ T tile[32][33];                                                                      \
        int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;                                                 \
        for (int i = threadIdx.y; i < 32; i += 8) {                                                     \
            int r = r0 + i, c = c0 + threadIdx.x;                                                       \
            if (r < a && c < b) tile[i][threadIdx.x] = src[(size_t)r * b + c];                          \
        }                                                                                               \
        __syncthreads();                                                                                \
        for (int i = threadIdx.y; i < 32; i += 8) {                                                     \
            int c = c0 + i, r = r0 + threadIdx.x;                                                       \
            if (c < b && r < a) out[(size_t)c * a + r] = tile[threadIdx.x][i];                          \
        }                                                                                               \
    }
TRANSPOSE_KERNEL(transpose_u8, unsigned char)
TRANSPOSE_KERNEL(transpose_u16, unsigned short)
TRANSPOSE_KERNEL(transpose_u32, unsigned int)

// out[i, :] = src[rows[i], :] for i < r, rows of n f32. Grid-stride over r * n.
extern "C" __global__ void gather_rows_f32(const float* __restrict__ src, const unsigned int* __restrict__ rows,
                                           float* __restrict__ out, long long r, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < r * n; i += (long long)gridDim.x * blockDim.x) {
        out[i] = src[(long long)rows[i / n] * n + i % n];
    }
}

// dst[rows[i], :] += w[i] * src[i, :] for i < r; no row twice, so no two threads add to one
// element. Grid-stride over r * n.
extern "C" __global__ void scatter_add_rows_f32(const float* __restrict__ src, const unsigned int* __restrict__ rows,
                                                const float* __restrict__ w, float* __restrict__ dst, long long r,
                                                long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < r * n; i += (long long)gridDim.x * blockDim.x) {
        long long row = i / n;
        dst[(long long)rows[row] * n + i % n] += w[row] * src[i];
    }
}

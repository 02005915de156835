// Mixture-of-experts kernels, f32 activations (CPU twins in src/cpu/moe.rs).
#include "common.cuh"

// GPT-OSS clamped SwiGLU (models.md §3.3). gate_up [rows, 2I]: gate in the even columns, up in
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

// MXFP4 -> bf16 (models.md §3.4), bit-exact with the CPU twin (src/mxfp4.rs). One thread per
// 32-element group: 16 block bytes (element 2j in the low nibble of byte j, 2j+1 in the high one)
// and one E8M0 scale, 2^(s-127), with s = 0 the subnormal 2^-127. A zero code stays a signed
// zero whatever the scale (ldexp semantics). out holds groups * 32 bf16 values. Grid-stride.
__device__ __forceinline__ unsigned int mxfp4_pair(unsigned int byte, float scale) {
    const float fp4[16] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
    float lo = fp4[byte & 15u], hi = fp4[byte >> 4];
    lo = lo == 0.f ? lo : lo * scale;
    hi = hi == 0.f ? hi : hi * scale;
    unsigned int l = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    unsigned int h = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
    return l | (h << 16);
}

extern "C" __global__ void dequant_mxfp4_bf16(const uint4* __restrict__ blocks, const unsigned char* __restrict__ scales,
                                              uint4* __restrict__ out, long long groups) {
    for (long long g = blockIdx.x * (long long)blockDim.x + threadIdx.x; g < groups; g += (long long)gridDim.x * blockDim.x) {
        unsigned int s = scales[g];
        float scale = __uint_as_float(s == 0 ? 0x00400000u : s << 23);
        uint4 b = blocks[g];
        unsigned int w[4] = {b.x, b.y, b.z, b.w};
        for (int q = 0; q < 4; ++q) {  // 4 bytes in, 8 bf16 (16 bytes) out
            unsigned int v = w[q];
            out[g * 4 + q] = make_uint4(mxfp4_pair(v & 255u, scale), mxfp4_pair((v >> 8) & 255u, scale),
                                        mxfp4_pair((v >> 16) & 255u, scale), mxfp4_pair(v >> 24, scale));
        }
    }
}

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

// Causal attention, GQA, optional sliding window and per-head sinks (CPU twin:
// src/cpu/attention.rs). q and out are f32, the KV cache is bf16 (docs/models.md §2.4), all math is
// f32. A correct reference kernel, not the fast one: one block per (query token, head); each
// warp walks a strided share of the keys with an online softmax, each lane holding d/32
// elements of q and of the accumulator; the warps' states are merged at the end.
// q, out [T, n_heads, d]; k, v [n_kv, cap, d]; d <= 256; blockDim = 32 * warps (<= 4).
#include <cuda_bf16.h>
#define MAX_PER_LANE 8
#define MAX_WARPS 4
// NVRTC has no math.h: -infinity spelled out.
#define NEG_INF __int_as_float(0xff800000)

extern "C" __global__ void attention_bf16kv(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                            const __nv_bfloat16* __restrict__ v, float* __restrict__ out,
                                            int n_heads, int n_kv, int d, int cap, int pos0,
                                            float scale, int window, const float* __restrict__ sinks,
                                            int has_sinks) {
    int qi = blockIdx.x;
    int ti = qi / n_heads, h = qi % n_heads;
    int kvh = h / (n_heads / n_kv);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
    int p = pos0 + ti;
    int lo = window > 0 ? max(0, p - window + 1) : 0;

    float qr[MAX_PER_LANE], acc[MAX_PER_LANE];
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; e++) {
        int c = e * 32 + lane;
        qr[e] = c < d ? q[(size_t)qi * d + c] : 0.f;
        acc[e] = 0.f;
    }
    const __nv_bfloat16* kb = k + (size_t)kvh * cap * d;
    const __nv_bfloat16* vb = v + (size_t)kvh * cap * d;
    float m = NEG_INF, l = 0.f;
    for (int j = lo + warp; j <= p; j += n_warps) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; e++) {
            int c = e * 32 + lane;
            if (c < d) s += qr[e] * __bfloat162float(kb[(size_t)j * d + c]);
        }
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        s *= scale;
        float mn = fmaxf(m, s);
        float corr = expf(m - mn);  // 0 on the first key (m = -inf)
        float pj = expf(s - mn);
        l = l * corr + pj;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; e++) {
            int c = e * 32 + lane;
            if (c < d) acc[e] = acc[e] * corr + pj * __bfloat162float(vb[(size_t)j * d + c]);
        }
        m = mn;
    }

    __shared__ float sm_m[MAX_WARPS], sm_l[MAX_WARPS];
    __shared__ float sm_acc[MAX_WARPS][MAX_PER_LANE * 32];
    if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; e++) sm_acc[warp][e * 32 + lane] = acc[e];
    __syncthreads();
    if (warp != 0) return;
    float mx = has_sinks ? sinks[h] : NEG_INF;
    for (int w = 0; w < n_warps; w++) mx = fmaxf(mx, sm_m[w]);
    float denom = has_sinks ? expf(sinks[h] - mx) : 0.f;
    float o[MAX_PER_LANE];
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; e++) o[e] = 0.f;
    for (int w = 0; w < n_warps; w++) {
        float f = sm_m[w] == NEG_INF ? 0.f : expf(sm_m[w] - mx);
        denom += sm_l[w] * f;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; e++) o[e] += sm_acc[w][e * 32 + lane] * f;
    }
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; e++) {
        int c = e * 32 + lane;
        if (c < d) out[(size_t)qi * d + c] = o[e] / denom;
    }
}

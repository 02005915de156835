// Attention of a tree of new tokens over the KV cache (speculative decoding's tree verification;
// CPU twin: src/cpu/tree_attention.rs). The same form as attention.cu, the reference kernel:
// one block per (node, head), each warp walks a strided share of the keys with an online
// softmax, each lane holding d/32 elements of q and of the accumulator, the warps' states merged
// at the end. What differs is which keys a query sees: node t sits at position
// p = pos0 + depth[t]; it sees cache rows j < pos0 with j > p - window, and the tree's rows
// pos0 + a of its ancestors a (bit a of row t of `bits`, itself included) with
// depth[t] - depth[a] < window.
// q, out [T, n_heads, d] f32; k, v [n_kv, cap, d] bf16, the tree at rows pos0..pos0+T;
// depth [T] int; bits [T, words] u32; d <= 256; blockDim = 32 * warps (<= 4).
#include <cuda_bf16.h>
#define MAX_PER_LANE 8
#define MAX_WARPS 4
// NVRTC has no math.h: -infinity spelled out.
#define NEG_INF __int_as_float(0xff800000)

extern "C" __global__ void tree_attention_bf16kv(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                                 const __nv_bfloat16* __restrict__ v, float* __restrict__ out,
                                                 int n_heads, int n_kv, int d, int cap, int pos0, int t_nodes,
                                                 float scale, int window, const float* __restrict__ sinks,
                                                 int has_sinks, const int* __restrict__ depth,
                                                 const unsigned int* __restrict__ bits, int words) {
    int qi = blockIdx.x;
    int ti = qi / n_heads, h = qi % n_heads;
    int kvh = h / (n_heads / n_kv);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
    int dt = depth[ti];
    int p = pos0 + dt;
    int lo = window > 0 ? max(0, p - window + 1) : 0;
    const unsigned int* mine = bits + (size_t)ti * words;

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
    // Rows lo..pos0 are the cached prefix, pos0..pos0+T the tree (every warp-uniform test).
    for (int j = min(lo, pos0) + warp; j < pos0 + t_nodes; j += n_warps) {
        if (j < pos0) {
            if (j < lo) continue;
        } else {
            int a = j - pos0;
            if (((mine[a >> 5] >> (a & 31)) & 1u) == 0u) continue;
            if (window > 0 && dt - depth[a] >= window) continue;
        }
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

// Decode attention, split over the context (flash-decoding): a few query tokens against a long
// bf16 KV cache, with the whole GPU reading K and V once. CPU twin: src/cpu/attention.rs.
//
// q   [T, n_heads, D] f32, queries at positions pos0..pos0+T (causal: query t sees keys
//     lo..pos0+t, lo = pos0+t-W+1 with a sliding window W, else 0)
// k,v [n_kv, cap, D] bf16
// Pass 1 (decode_split_d{D}_g{GB}): grid (n_splits, n_kv · (G / GB), T), block 128. A block takes
//   GB query heads that share one kv head, so each K/V row is read once for all of them, and
//   one slice of `chunk` keys. D/8 lanes hold one key's row (16-byte loads), so a warp covers
//   256/D keys per step; U steps' loads are issued before any is used. The launcher sizes the
//   split so the grid is about one wave of resident blocks. Each block writes its
//   partial (max m, sum l, unnormalised o[D]) for each of its heads, in base-2 units.
// Pass 2 (decode_combine): grid T · n_heads, block D; merges the n_splits partials and the
//   optional sink logit, and writes out [T, n_heads, D] f32.
#include <cuda_bf16.h>

// Programmatic dependent launch (src/cuda/pdl.rs, OLLM_CUDA_PDL=1): wait for the kernel before
// this one to finish and its writes to show, then let the next one start launching. No-ops for
// a plain launch and before sm_90.
__device__ __forceinline__ void pdl_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

#define NEG_INF __int_as_float(0xff800000)
#define LOG2E 1.4426950408889634f
#define NWARPS 4

__device__ __forceinline__ void bf16x8(uint4 raw, float* f) {
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 v = __bfloat1622float2(p[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

template <int D, int GB, int U>
__device__ __forceinline__ void split_body(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                           const __nv_bfloat16* __restrict__ v, float* __restrict__ partials,
                                           int n_heads, int n_kv, int cap,
                                           int pos0, float scale, int window, int chunk) {
    pdl_sync();
    constexpr int LPK = D / 8;        // lanes per key
    constexpr int KPW = 32 / LPK;     // keys per warp step
    constexpr int GROUPS = NWARPS * KPW;
    __shared__ float sm_ml[GROUPS][GB][2];
    __shared__ float sm_o[GROUPS][GB][D];

    const int split = blockIdx.x, n_splits = gridDim.x, t = blockIdx.z;
    // partials: o [T·n_heads·n_splits][D], then (m, l) [T·n_heads·n_splits][2].
    float* part_o = partials;
    float* part_ml = partials + (size_t)gridDim.z * n_heads * n_splits * D;
    const int G = n_heads / n_kv, per_kv = G / GB;
    const int kvh = blockIdx.y / per_kv, h0 = kvh * G + (blockIdx.y % per_kv) * GB;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int sub = lane / LPK, part = lane % LPK;
    const int grp = warp * KPW + sub;

    const int p = pos0 + t;
    const int lo = window > 0 ? max(0, p - window + 1) : 0;
    const int c0 = lo + split * chunk, c1 = min(p + 1, c0 + chunk);

    const float c2 = scale * LOG2E;
    float qv[GB][8], acc[GB][8], m[GB], l[GB];
#pragma unroll
    for (int g = 0; g < GB; g++) {
        const float4* src = reinterpret_cast<const float4*>(q + ((size_t)t * n_heads + h0 + g) * D + part * 8);
        float4 a = src[0], b = src[1];
        qv[g][0] = a.x * c2; qv[g][1] = a.y * c2; qv[g][2] = a.z * c2; qv[g][3] = a.w * c2;
        qv[g][4] = b.x * c2; qv[g][5] = b.y * c2; qv[g][6] = b.z * c2; qv[g][7] = b.w * c2;
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] = 0.f;
        m[g] = NEG_INF;
        l[g] = 0.f;
    }

    const uint4* kb = reinterpret_cast<const uint4*>(k + (size_t)kvh * cap * D) + part;
    const uint4* vb = reinterpret_cast<const uint4*>(v + (size_t)kvh * cap * D) + part;
    constexpr int STEP = NWARPS * KPW;
    // Warp-uniform loop bounds: every lane reaches the shuffles (a lane past the end gets -inf).
    for (int jw = c0 + warp * KPW; jw < c1; jw += STEP * U) {
        const int j0 = jw + sub;
        uint4 kr[U], vr[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int j = j0 + u * STEP;
            bool ok = j < c1;
            kr[u] = ok ? __ldg(kb + (size_t)j * LPK) : make_uint4(0, 0, 0, 0);
            vr[u] = ok ? __ldg(vb + (size_t)j * LPK) : make_uint4(0, 0, 0, 0);
        }
        float s[U][GB];
#pragma unroll
        for (int u = 0; u < U; u++) {
            float kf[8];
            bf16x8(kr[u], kf);
#pragma unroll
            for (int g = 0; g < GB; g++) {
                float d = 0.f;
#pragma unroll
                for (int e = 0; e < 8; e++) d = fmaf(qv[g][e], kf[e], d);
#pragma unroll
                for (int o = LPK / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                s[u][g] = j0 + u * STEP < c1 ? d : NEG_INF;
            }
        }
#pragma unroll
        for (int g = 0; g < GB; g++) {
            float mx = m[g];
#pragma unroll
            for (int u = 0; u < U; u++) mx = fmaxf(mx, s[u][g]);
            // A lane whose keys are all past the end keeps m = -inf and adds nothing.
            float corr = exp2f(m[g] - (mx == NEG_INF ? 0.f : mx));
            m[g] = mx;
            l[g] *= corr;
#pragma unroll
            for (int e = 0; e < 8; e++) acc[g][e] *= corr;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            float vf[8];
            bf16x8(vr[u], vf);
#pragma unroll
            for (int g = 0; g < GB; g++) {
                float pe = exp2f(s[u][g] - (m[g] == NEG_INF ? 0.f : m[g]));
                l[g] += pe;
#pragma unroll
                for (int e = 0; e < 8; e++) acc[g][e] = fmaf(pe, vf[e], acc[g][e]);
            }
        }
    }

    // Merge the block's key groups through shared memory.
#pragma unroll
    for (int g = 0; g < GB; g++) {
        if (part == 0) {
            sm_ml[grp][g][0] = m[g];
            sm_ml[grp][g][1] = l[g];
        }
#pragma unroll
        for (int e = 0; e < 8; e++) sm_o[grp][g][part * 8 + e] = acc[g][e];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < GB * D; i += NWARPS * 32) {
        int g = i / D, dim = i % D;
        float mx = NEG_INF;
        for (int r = 0; r < GROUPS; r++) mx = fmaxf(mx, sm_ml[r][g][0]);
        float o = 0.f, ls = 0.f;
        if (mx != NEG_INF) {
            for (int r = 0; r < GROUPS; r++) {
                float f = exp2f(sm_ml[r][g][0] - mx);  // 0 for groups that saw no key
                o += sm_o[r][g][dim] * f;
                ls += sm_ml[r][g][1] * f;
            }
        }
        size_t row = ((size_t)t * n_heads + h0 + g) * n_splits + split;
        part_o[row * D + dim] = o;
        if (dim == 0) {
            part_ml[row * 2] = mx;
            part_ml[row * 2 + 1] = ls;
        }
    }
}

#define SPLIT_ENTRY_U(D, GB, U, NAME)                                                                       \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32) NAME(                                         \
        const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v, float* part, int n_heads, int n_kv, \
        int cap, int pos0, float scale, int window, int chunk) {                                             \
        split_body<D, GB, U>(q, k, v, part, n_heads, n_kv, cap, pos0, scale, window, chunk);                 \
    }

// Eight keys' loads in flight per lane where the registers allow it (measured on an H100,
// d=128, 4 heads a block: 76% of copy bandwidth against 71% with four).
#define SPLIT_ENTRY(D, GB) SPLIT_ENTRY_U(D, GB, ((GB) <= 4 ? 8 : 4), decode_split_d##D##_g##GB)

// The same inside a captured decode step (src/cuda/graph.rs): queries at pos0 + step[0]. The grid
// is sized for the longest context the graph serves; slices past the keys write empty partials
// (m = -inf, l = 0), which the combine adds as exact zeros.
#define SPLIT_STEP_ENTRY_U(D, GB, U, NAME)                                                                  \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32) NAME(                                         \
        const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v, float* part, int n_heads, int n_kv, \
        int cap, int pos0, float scale, int window, int chunk, const int* step) {                            \
        split_body<D, GB, U>(q, k, v, part, n_heads, n_kv, cap, pos0 + step[0], scale, window, chunk);       \
    }

#define SPLIT_STEP_ENTRY(D, GB) SPLIT_STEP_ENTRY_U(D, GB, ((GB) <= 4 ? 8 : 4), decode_split_step_d##D##_g##GB)

#define SPLIT_ENTRIES(D)                                                                                    \
    SPLIT_ENTRY(D, 1) SPLIT_ENTRY(D, 2) SPLIT_ENTRY(D, 3) SPLIT_ENTRY(D, 4) SPLIT_ENTRY(D, 6) SPLIT_ENTRY(D, 8) \
    SPLIT_STEP_ENTRY(D, 1) SPLIT_STEP_ENTRY(D, 2) SPLIT_STEP_ENTRY(D, 3) SPLIT_STEP_ENTRY(D, 4)            \
    SPLIT_STEP_ENTRY(D, 6) SPLIT_STEP_ENTRY(D, 8)

SPLIT_ENTRIES(16)
SPLIT_ENTRIES(32)
SPLIT_ENTRIES(64)
SPLIT_ENTRIES(128)
SPLIT_ENTRIES(256)

// Pass 2: one block per (token, head), one thread per dim.
extern "C" __global__ void decode_combine(const float* __restrict__ part, float* __restrict__ out, int n_heads,
                                          int d, int n_splits, const float* __restrict__ sinks, int has_sinks) {
    pdl_sync();
    const int row = blockIdx.x, h = row % n_heads, dim = threadIdx.x;
    const float* part_o = part;
    const float* part_ml = part + (size_t)gridDim.x * n_splits * d;
    const float* ml = part_ml + (size_t)row * n_splits * 2;
    float mx = has_sinks ? sinks[h] * LOG2E : NEG_INF;
    for (int s = 0; s < n_splits; s++) mx = fmaxf(mx, ml[2 * s]);
    float o = 0.f, denom = has_sinks ? exp2f(sinks[h] * LOG2E - mx) : 0.f;
    for (int s = 0; s < n_splits; s++) {
        float f = ml[2 * s] == NEG_INF ? 0.f : exp2f(ml[2 * s] - mx);
        denom += ml[2 * s + 1] * f;
        o += part_o[((size_t)row * n_splits + s) * d + dim] * f;
    }
    out[(size_t)row * d + dim] = o / denom;
}

// Prefill attention, flash style: bf16 tensor cores (mma.sync m16n8k16), fp32 accumulation and
// softmax, the T×T score matrix never stored. CPU twin: src/cpu/attention.rs.
//
// q   [T, n_heads, D] f32 (rounded to bf16 as it is loaded), queries at positions pos0..pos0+T
// k,v [n_kv, cap, D] bf16 (the KV cache), keys 0..pos0+T
// out [T, n_heads, D] f32
// Causal; optional sliding window W (key j visible from query p iff p - W < j <= p); optional
// per-head sinks (one logit per head that joins the softmax denominator only); GQA maps query
// head h to kv head h / (n_heads / n_kv).
//
// A block owns BM = 64·MT query rows of one head; each of its 4 warps owns 16·MT of them. Key
// tiles of BN (32 or 64) rows stream through shared memory, two stages deep (cp.async), while the
// warps compute S = Q·Kᵀ and O += P·V from ldmatrix fragments. P is rounded to bf16 for the
// second product; the row sums use the unrounded values. Shared-memory rows are 16-byte chunks
// XOR-swizzled by (row & 7) so ldmatrix's 8-row reads hit 8 different bank groups (D ≥ 64).
// Launch: grid (n_heads, ceil(T / BM)), block 128, dynamic shared memory (BM + 4·BN)·D·2 bytes.
// Entry points flash_prefill_d{D}_m{MT}_n{BN}.
#include <cuda_bf16.h>

#define NEG_INF __int_as_float(0xff800000)
#define LOG2E 1.4426950408889634f
#define NWARPS 4

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
    int n = valid ? 16 : 0;  // 0 bytes read: the chunk is zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// d[4] += a[4] · b[2] (16×16 bf16 by 16×8 bf16 into 16×8 f32).
__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// Byte offset of 16-byte chunk `c` of row `r` in a swizzled tile with D/8 chunks per row.
template <int D>
__device__ __forceinline__ unsigned swz(int r, int c) {
    return (unsigned)((r * (D / 8) + (c ^ (r & 7))) * 16);
}

template <int D, int MT, int BN>
__device__ __forceinline__ void flash_body(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                           const __nv_bfloat16* __restrict__ v, float* __restrict__ out, int T,
                                           int n_heads, int n_kv, int cap, int pos0, float scale, int window,
                                           const float* __restrict__ sinks, int has_sinks) {
    constexpr int BM = NWARPS * 16 * MT;
    constexpr int CH = D / 8;  // 16-byte chunks per row
    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* qs = smem;                    // [BM][D]
    unsigned char* ks = qs + BM * D * 2;         // [2][BN][D]
    unsigned char* vs = ks + 2 * BN * D * 2;     // [2][BN][D]

    const int h = blockIdx.x;
    const int mb = gridDim.y - 1 - blockIdx.y;  // the longest rows first
    const int r0 = mb * BM;
    const int kvh = h / (n_heads / n_kv);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int kv_len = pos0 + T;
    const __nv_bfloat16* kb = k + (size_t)kvh * cap * D;
    const __nv_bfloat16* vb = v + (size_t)kvh * cap * D;

    const int hi_blk = min(pos0 + r0 + BM - 1, kv_len - 1);
    const int lo_blk = window > 0 ? max(0, pos0 + r0 - window + 1) : 0;
    const int t_lo = lo_blk / BN, t_hi = hi_blk / BN;

    auto load_kv = [&](int tile, int stage) {
        int n0 = tile * BN;
        unsigned kd = smem_u32(ks + stage * BN * D * 2), vd = smem_u32(vs + stage * BN * D * 2);
        for (int i = tid; i < BN * CH; i += NWARPS * 32) {
            int r = i / CH, c = i % CH;
            bool ok = n0 + r < kv_len;
            size_t off = ok ? ((size_t)(n0 + r) * D + c * 8) : 0;
            cp_async16(kd + swz<D>(r, c), kb + off, ok);
            cp_async16(vd + swz<D>(r, c), vb + off, ok);
        }
        asm volatile("cp.async.commit_group;\n" ::);
    };

    load_kv(t_lo, 0);

    // Q tile: f32 → bf16 into shared memory (rows past T are zeros).
    for (int i = tid; i < BM * CH; i += NWARPS * 32) {
        int r = i / CH, c = i % CH;
        int t = r0 + r;
        uint4 packed = make_uint4(0, 0, 0, 0);
        if (t < T) {
            const float4* src = reinterpret_cast<const float4*>(q + ((size_t)t * n_heads + h) * D + c * 8);
            float4 a = src[0], b = src[1];
            packed = make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
        }
        *reinterpret_cast<uint4*>(qs + swz<D>(r, c)) = packed;
    }

    float o[MT][D / 8][4];
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
        m[mt][0] = m[mt][1] = NEG_INF;
        l[mt][0] = l[mt][1] = 0.f;
    }
    const float c2 = scale * LOG2E;
    const int g = lane / 4, cq = lane % 4;
    const int wrow0 = warp * 16 * MT;  // first row of this warp inside the block
    // ldmatrix row/chunk roles of this lane: matrix mi = lane / 8, row r8 = lane % 8.
    const int mi = lane / 8, r8 = lane % 8;

    for (int tile = t_lo; tile <= t_hi; tile++) {
        const int stage = (tile - t_lo) & 1;
        asm volatile("cp.async.wait_group 0;\n" ::);
        __syncthreads();
        if (tile < t_hi) load_kv(tile + 1, stage ^ 1);
        const unsigned kst = smem_u32(ks + stage * BN * D * 2), vst = smem_u32(vs + stage * BN * D * 2);
        const unsigned qst = smem_u32(qs);
        const int n0 = tile * BN;

        // S = Q · Kᵀ
        float s[MT][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int nt = 0; nt < BN / 8; nt++) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                int row = wrow0 + mt * 16 + r8 + (mi & 1) * 8;
                ldsm_x4(qst + swz<D>(row, 2 * kk + (mi >> 1)), a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
            }
#pragma unroll
            for (int np = 0; np < BN / 16; np++) {
                unsigned b0, b1, b2, b3;
                int key = np * 16 + r8 + (mi >> 1) * 8;
                ldsm_x4(kst + swz<D>(key, 2 * kk + (mi & 1)), b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_bf16(s[mt][2 * np], a[mt], b0, b1);
                    mma_bf16(s[mt][2 * np + 1], a[mt], b2, b3);
                }
            }
        }

        // Mask where some (row, key) of this tile may be invisible.
        const bool need_mask = (n0 + BN - 1 > pos0 + r0) || (window > 0 && n0 <= pos0 + r0 + BM - 1 - window);
        if (need_mask) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int rh = 0; rh < 2; rh++) {
                    int p = pos0 + r0 + wrow0 + mt * 16 + g + rh * 8;
                    int lo = window > 0 ? p - window + 1 : 0;
#pragma unroll
                    for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            int j = n0 + nt * 8 + cq * 2 + e;
                            if (j > p || j < lo) s[mt][nt][rh * 2 + e] = NEG_INF;
                        }
                }
        }

        // Online softmax (base 2), then P (bf16) · V.
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
#pragma unroll
            for (int rh = 0; rh < 2; rh++) {
                float mx = m[mt][rh];
#pragma unroll
                for (int nt = 0; nt < BN / 8; nt++) mx = fmaxf(mx, fmaxf(s[mt][nt][rh * 2], s[mt][nt][rh * 2 + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float mc = mx == NEG_INF ? 0.f : mx * c2;
                const float corr = exp2f(m[mt][rh] * c2 - mc);
                m[mt][rh] = mx;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float pe = exp2f(s[mt][nt][rh * 2 + e] * c2 - mc);
                        s[mt][nt][rh * 2 + e] = pe;
                        sum += pe;
                    }
                l[mt][rh] = l[mt][rh] * corr + sum;
#pragma unroll
                for (int dt = 0; dt < D / 8; dt++) {
                    o[mt][dt][rh * 2] *= corr;
                    o[mt][dt][rh * 2 + 1] *= corr;
                }
            }
        }
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                a[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                unsigned b0, b1, b2, b3;
                int key = kk * 16 + r8 + (mi & 1) * 8;
                ldsm_x4_t(vst + swz<D>(key, 2 * dp + (mi >> 1)), b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_bf16(o[mt][2 * dp], a[mt], b0, b1);
                    mma_bf16(o[mt][2 * dp + 1], a[mt], b2, b3);
                }
            }
        }
    }

    // Normalise (sinks join the denominator) and store.
    const float sink2 = has_sinks ? sinks[h] * LOG2E : NEG_INF;
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int rh = 0; rh < 2; rh++) {
            int t = r0 + wrow0 + mt * 16 + g + rh * 8;
            float lsum = l[mt][rh];
            lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
            lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
            float mc = m[mt][rh] * c2;
            float mf = fmaxf(mc, sink2);
            float f = exp2f(mc - mf);
            float denom = lsum * f + (has_sinks ? exp2f(sink2 - mf) : 0.f);
            float inv = f / denom;
            if (t < T) {
                float* dst = out + ((size_t)t * n_heads + h) * D + cq * 2;
#pragma unroll
                for (int dt = 0; dt < D / 8; dt++)
                    *reinterpret_cast<float2*>(dst + dt * 8) =
                        make_float2(o[mt][dt][rh * 2] * inv, o[mt][dt][rh * 2 + 1] * inv);
            }
        }
}

#define FLASH_ENTRY(D, MT, BN)                                                                                 \
    extern "C" __global__ void __launch_bounds__(NWARPS * 32) flash_prefill_d##D##_m##MT##_n##BN(              \
        const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v, float* out, int T, int n_heads,       \
        int n_kv, int cap, int pos0, float scale, int window, const float* sinks, int has_sinks) {             \
        flash_body<D, MT, BN>(q, k, v, out, T, n_heads, n_kv, cap, pos0, scale, window, sinks, has_sinks);        \
    }

FLASH_ENTRY(64, 1, 64)
FLASH_ENTRY(64, 2, 64)
FLASH_ENTRY(128, 1, 64)
FLASH_ENTRY(128, 2, 32)
FLASH_ENTRY(128, 1, 32)

// Grouped MoE expert GEMMs for prefill (issue 27 point 3; launcher src/cuda/moe_grouped.rs, CPU
// twin: the per-expert loop of backend::moe::grouped_experts_by_expert).
//
// One call covers a "piece" of routes: every (token, expert) pair the router chose, sorted by
// expert, then token, so each expert's rows are one contiguous range of positions p. The host
// cuts those ranges into tiles of at most BM rows (`tiles[i] = (expert slot, first position,
// rows, 0)`), so no tile straddles two experts, and uploads the tile list, the token of each
// position and a table of device pointers per expert (`ptrs[8·e + j]`, see PTR_* below).
//
//   gate_up: act[p, j] = act(x[tok[p]] · Wg[2j]ᵀ + b[2j], x[tok[p]] · Wg[2j+1]ᵀ + b[2j+1])  bf16
//   down:    y[p, n]   = act[p] · Wd[n]ᵀ + bd[n]                                          f32
//   combine: acc[tok, n] += w[p] · y[p, n] for each position p of the token, in position order
//
// so a token's experts are added in ascending expert order, as the per-expert loop does. The
// x rows are rounded to bf16 as they are loaded (what the cuBLAS path does to x), the gate/up
// pair's activation is computed in f32 from the f32 accumulators and rounded to bf16 once (what
// the cuBLAS path does to the down projection's input), fp32 accumulation throughout.
//
// The matmul: tiles of BM = 64 rows by BN = 128 output columns, K in steps of BK = 32 (one MXFP4
// group), 8 warps as 2 × 4, each 32 × 32 of the tile as 2 × 4 mma.sync m16n8k16 (bf16 in, f32
// out). Both operands sit k-contiguous in shared memory, rows padded to 40 halves (80 bytes),
// so the fragment loads of a warp (8 rows × 4 words) fall in 32 different banks. The next
// k-step's global loads go to registers before this step's mma, and to the other of two shared
// buffers after, one barrier a step. MXFP4 weights are unpacked in the loader (e2m1 × 2^(s-127),
// exact in bf16), so an expert's packed bytes are read once per tile and never written back
// unpacked. Weight formats (template WF):
//   0: MXFP4 blocks [N, K/32, 16] + scales [N, K/32]      (GPT-OSS, gate/up interleaved rows)
//   1: bf16 [N, K]                                          (interleaved rows, or the down matrix)
//   2: bf16 gate [N/2, K] and up [N/2, K], read as rows 2j = gate j, 2j+1 = up j (Qwen3-Next)
// In an m16n8 accumulator fragment a thread holds columns 2c and 2c+1 of a row, so the gate/up
// pair of an output element is in one thread: the activation needs no shuffle.
#include "common.cuh"

#define BM 64
#define BN 128
#define BK 32
#define LDS 40  // halves per shared row: BK + 8 of padding (80 bytes, a multiple of 16)
#define THREADS 256

// Per expert, 8 device pointers (unused ones 0).
#define PTR_GATE 0        // gate_up (WF 0, 1) or gate (WF 2): blocks or bf16
#define PTR_GATE_SCALES 1 // WF 0
#define PTR_UP 2          // WF 2
#define PTR_DOWN 4        // blocks or bf16
#define PTR_DOWN_SCALES 5
#define PTR_GATE_BIAS 6   // [2I] (bias_kind: 0 none, 1 f32, 2 bf16)
#define PTR_DOWN_BIAS 7   // [H]

// e2m1 code c times the scale, exact in f32 (see moe.cu: the same helper, bit for bit).
__device__ __forceinline__ float g_e2m1(unsigned int c, float scale) {
    unsigned int e = (c >> 1) & 3u, m = c & 1u;
    unsigned int mag = e ? (((e + 126u) << 23) | (m << 22)) : (m ? (126u << 23) : 0u);
    float v = __uint_as_float(((c & 8u) << 28) | mag);
    return mag == 0u ? v : v * scale;
}

__device__ __forceinline__ float g_e8m0(unsigned int s) { return __uint_as_float(s == 0 ? 0x00400000u : s << 23); }

__device__ __forceinline__ unsigned g_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

__device__ __forceinline__ void g_mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float bias_at(const void* b, int kind, int i) {
    if (kind == 1) return reinterpret_cast<const float*>(b)[i];
    if (kind == 2) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(b)[i]);
    return 0.f;
}

// Row r = tid / 4 of the A tile, halves 8·(tid % 4) .. +8: from f32 x rows gathered by token
// (gate_up) or from bf16 act rows at consecutive positions (down).
template <bool GATHER>
__device__ __forceinline__ uint4 load_a(const void* a_src, const unsigned* __restrict__ tok, int pos0, int rows, int k,
                                        int k0, int tid) {
    int r = tid >> 2, c = (tid & 3) * 8;
    if (r >= rows) return make_uint4(0, 0, 0, 0);
    if (GATHER) {
        const float* x = reinterpret_cast<const float*>(a_src) + (size_t)tok[pos0 + r] * k + k0 + c;
        float4 p = __ldg(reinterpret_cast<const float4*>(x));
        float4 q = __ldg(reinterpret_cast<const float4*>(x) + 1);
        return make_uint4(g_pack(p.x, p.y), g_pack(p.z, p.w), g_pack(q.x, q.y), g_pack(q.z, q.w));
    } else {
        const __nv_bfloat16* a = reinterpret_cast<const __nv_bfloat16*>(a_src) + (size_t)(pos0 + r) * k + k0 + c;
        return __ldg(reinterpret_cast<const uint4*>(a));
    }
}

// Row r = tid / 2 of the W tile (output column n0 + r), halves 16·(tid % 2) .. +16, of k-step kt.
template <int WF>
__device__ __forceinline__ void load_w(const unsigned long long* __restrict__ p, int slot_w, int slot_s, int n_out,
                                       int k, int n0, int kt, int tid, uint4* out) {
    int r = tid >> 1, h = tid & 1, n = n0 + r;
    if (n >= n_out) {
        out[0] = out[1] = make_uint4(0, 0, 0, 0);
        return;
    }
    if (WF == 0) {
        int groups = k / 32;
        const unsigned char* blocks = reinterpret_cast<const unsigned char*>(p[slot_w]);
        const unsigned char* scales = reinterpret_cast<const unsigned char*>(p[slot_s]);
        size_t g = (size_t)n * groups + kt;
        uint2 b = __ldg(reinterpret_cast<const uint2*>(blocks + g * 16 + 8 * h));
        float scale = g_e8m0(scales[g]);
        unsigned w[2] = {b.x, b.y};
        unsigned o[8];
#pragma unroll
        for (int q = 0; q < 2; ++q) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                unsigned byte = (w[q] >> (8 * j)) & 255u;
                o[4 * q + j] = g_pack(g_e2m1(byte & 15u, scale), g_e2m1(byte >> 4, scale));
            }
        }
        out[0] = make_uint4(o[0], o[1], o[2], o[3]);
        out[1] = make_uint4(o[4], o[5], o[6], o[7]);
    } else {
        const __nv_bfloat16* w;
        size_t row;
        if (WF == 2) {
            w = reinterpret_cast<const __nv_bfloat16*>(p[(n & 1) ? PTR_UP : slot_w]);
            row = (size_t)(n >> 1);
        } else {
            w = reinterpret_cast<const __nv_bfloat16*>(p[slot_w]);
            row = (size_t)n;
        }
        const uint4* src = reinterpret_cast<const uint4*>(w + row * k + kt * BK + 16 * h);
        out[0] = __ldg(src);
        out[1] = __ldg(src + 1);
    }
}

// The main loop of one tile: acc[mt][nt][4] = A (rows of the tile) · W (columns n0..n0+BN)ᵀ.
template <bool GATHER, int WF>
__device__ __forceinline__ void tile_gemm(const void* a_src, const unsigned* __restrict__ tok,
                                          const unsigned long long* __restrict__ p, int slot_w, int slot_s, int pos0,
                                          int rows, int n_out, int k, int n0, float (&acc)[2][4][4]) {
    __shared__ __align__(16) __nv_bfloat16 as[2][BM][LDS];
    __shared__ __align__(16) __nv_bfloat16 ws[2][BN][LDS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

    const int steps = k / BK;
    uint4 ra = load_a<GATHER>(a_src, tok, pos0, rows, k, 0, tid);
    uint4 rw[2];
    load_w<WF>(p, slot_w, slot_s, n_out, k, n0, 0, tid, rw);
    *reinterpret_cast<uint4*>(&as[0][tid >> 2][(tid & 3) * 8]) = ra;
    *reinterpret_cast<uint4*>(&ws[0][tid >> 1][(tid & 1) * 16]) = rw[0];
    *reinterpret_cast<uint4*>(&ws[0][tid >> 1][(tid & 1) * 16 + 8]) = rw[1];
    __syncthreads();
    for (int kt = 0; kt < steps; ++kt) {
        const int cur = kt & 1;
        const bool more = kt + 1 < steps;
        if (more) {
            ra = load_a<GATHER>(a_src, tok, pos0, rows, k, (kt + 1) * BK, tid);
            load_w<WF>(p, slot_w, slot_s, n_out, k, n0, kt + 1, tid, rw);
        }
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
            const int kk = ks * 16 + 2 * t4;
            unsigned a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const int r = wm * 32 + mt * 16 + g;
                a[mt][0] = *reinterpret_cast<const unsigned*>(&as[cur][r][kk]);
                a[mt][1] = *reinterpret_cast<const unsigned*>(&as[cur][r + 8][kk]);
                a[mt][2] = *reinterpret_cast<const unsigned*>(&as[cur][r][kk + 8]);
                a[mt][3] = *reinterpret_cast<const unsigned*>(&as[cur][r + 8][kk + 8]);
            }
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int n = wn * 32 + nt * 8 + g;
                unsigned b0 = *reinterpret_cast<const unsigned*>(&ws[cur][n][kk]);
                unsigned b1 = *reinterpret_cast<const unsigned*>(&ws[cur][n][kk + 8]);
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) g_mma(acc[mt][nt], a[mt], b0, b1);
            }
        }
        if (more) {
            const int nxt = cur ^ 1;
            *reinterpret_cast<uint4*>(&as[nxt][tid >> 2][(tid & 3) * 8]) = ra;
            *reinterpret_cast<uint4*>(&ws[nxt][tid >> 1][(tid & 1) * 16]) = rw[0];
            *reinterpret_cast<uint4*>(&ws[nxt][tid >> 1][(tid & 1) * 16 + 8]) = rw[1];
        }
        __syncthreads();
    }
}

// act_kind 0: GPT-OSS clamped SwiGLU (moe.cu clamped_swiglu_f32, same expressions);
// 1: silu(gate) · up (elementwise.cu silu_mul_f32, same expression).
__device__ __forceinline__ float expert_act(float gate, float up, int act_kind, float limit, float alpha) {
    if (act_kind == 0) {
        float gg = gate > limit ? limit : gate;
        float u = up > limit ? limit : (up < -limit ? -limit : up);
        float glu = gg / (1.f + expf(-alpha * gg));
        return (u + 1.f) * glu;
    }
    return gate / (1.f + expf(-gate)) * up;
}

// Grid (ceil(2I / BN), tiles), block 256. x [T, H] f32; tok [positions]; act [positions, I] bf16.
template <int WF>
__device__ __forceinline__ void gate_up_body(const float* __restrict__ x, const unsigned* __restrict__ tok,
                                             const int4* __restrict__ tiles, const unsigned long long* __restrict__ ptrs,
                                             __nv_bfloat16* __restrict__ act, int h, int inter, int bias_kind,
                                             int act_kind, float limit, float alpha) {
    const int4 tile = tiles[blockIdx.y];
    const unsigned long long* p = ptrs + 8 * tile.x;
    const int n_out = 2 * inter, n0 = blockIdx.x * BN;
    float acc[2][4][4];
    tile_gemm<true, WF>(x, tok, p, PTR_GATE, PTR_GATE_SCALES, tile.y, tile.z, n_out, h, n0, acc);
    const void* bias = reinterpret_cast<const void*>(p[PTR_GATE_BIAS]);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int col = n0 + wn * 32 + nt * 8 + 2 * t4;
            if (col >= n_out) continue;
            const float b0 = bias_at(bias, bias_kind, col), b1 = bias_at(bias, bias_kind, col + 1);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = wm * 32 + mt * 16 + g + 8 * half;
                if (r >= tile.z) continue;
                float v = expert_act(acc[mt][nt][2 * half] + b0, acc[mt][nt][2 * half + 1] + b1, act_kind, limit, alpha);
                act[(size_t)(tile.y + r) * inter + (col >> 1)] = __float2bfloat16_rn(v);
            }
        }
}

// Grid (ceil(H / BN), tiles), block 256. act [positions, I] bf16; y [positions, H] f32.
template <int WF>
__device__ __forceinline__ void down_body(const __nv_bfloat16* __restrict__ act, const int4* __restrict__ tiles,
                                          const unsigned long long* __restrict__ ptrs, float* __restrict__ y, int h,
                                          int inter, int bias_kind) {
    const int4 tile = tiles[blockIdx.y];
    const unsigned long long* p = ptrs + 8 * tile.x;
    const int n0 = blockIdx.x * BN;
    float acc[2][4][4];
    tile_gemm<false, WF>(act, nullptr, p, PTR_DOWN, PTR_DOWN_SCALES, tile.y, tile.z, h, inter, n0, acc);
    const void* bias = reinterpret_cast<const void*>(p[PTR_DOWN_BIAS]);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp >> 2, wn = warp & 3, g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int col = n0 + wn * 32 + nt * 8 + 2 * t4;
            if (col >= h) continue;
            const float b0 = bias_at(bias, bias_kind, col), b1 = bias_at(bias, bias_kind, col + 1);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = wm * 32 + mt * 16 + g + 8 * half;
                if (r >= tile.z) continue;
                float2 v = make_float2(acc[mt][nt][2 * half] + b0, acc[mt][nt][2 * half + 1] + b1);
                *reinterpret_cast<float2*>(y + (size_t)(tile.y + r) * h + col) = v;
            }
        }
}

#define GATE_UP_KERNEL(NAME, WF)                                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                                   \
        const float* __restrict__ x, const unsigned* __restrict__ tok, const int4* __restrict__ tiles,           \
        const unsigned long long* __restrict__ ptrs, __nv_bfloat16* __restrict__ act, int h, int inter,         \
        int bias_kind, int act_kind, float limit, float alpha) {                                                  \
        gate_up_body<WF>(x, tok, tiles, ptrs, act, h, inter, bias_kind, act_kind, limit, alpha);                 \
    }
GATE_UP_KERNEL(grouped_gate_up_mxfp4, 0)
GATE_UP_KERNEL(grouped_gate_up_bf16, 1)
GATE_UP_KERNEL(grouped_gate_up_bf16x2, 2)

#define DOWN_KERNEL(NAME, WF)                                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                         \
        NAME(const __nv_bfloat16* __restrict__ act, const int4* __restrict__ tiles,                               \
             const unsigned long long* __restrict__ ptrs, float* __restrict__ y, int h, int inter, int bias_kind) { \
        down_body<WF>(act, tiles, ptrs, y, h, inter, bias_kind);                                                  \
    }
DOWN_KERNEL(grouped_down_mxfp4, 0)
DOWN_KERNEL(grouped_down_bf16, 1)

// acc[tok_rows[u], n] += w[p] · y[p, n] for the positions p = tok_pos[tok_start[u] .. tok_start[u+1]]
// of each token u < n_tok of the piece, in that (ascending expert) order. A token is one thread's
// column, so no two threads add to one element. Grid-stride over n_tok · h.
extern "C" __global__ void grouped_combine(const float* __restrict__ y, const float* __restrict__ w,
                                           const unsigned* __restrict__ tok_rows, const unsigned* __restrict__ tok_start,
                                           const unsigned* __restrict__ tok_pos, float* __restrict__ acc, int n_tok,
                                           int h) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (long long)n_tok * h;
         i += (long long)gridDim.x * blockDim.x) {
        int u = (int)(i / h), n = (int)(i % h);
        float* dst = acc + (size_t)tok_rows[u] * h + n;
        float s = *dst;
        for (unsigned q = tok_start[u]; q < tok_start[u + 1]; ++q) {
            unsigned p = tok_pos[q];
            s += w[p] * y[(size_t)p * h + n];
        }
        *dst = s;
    }
}

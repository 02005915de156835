// Prefill attention for Hopper (sm_90a): wgmma tensor-core instructions fed from shared memory
// by a producer warpgroup, the same maths as flash_attn.cu (its fallback and parity reference).
// CPU twin: src/cpu/attention.rs. Launcher: src/cuda/flash_sm90.rs. History: NOTES.md.
//
// q   [T, n_heads, D] f32 (rounded to bf16 as it is loaded), queries at positions pos0..pos0+T
// k,v [n_kv, cap, D] bf16 (the KV cache), keys 0..pos0+T
// out [T, n_heads, D] f32
// Causal; optional sliding window W (key j visible from query p iff p - W < j <= p); optional
// per-head sinks (one logit per head that joins the softmax denominator only); GQA maps query
// head h to kv head h / (n_heads / n_kv).
//
// A block of three warpgroups owns BM = 128 query rows of one head. Warpgroup 0 is the
// producer: it copies key/value tiles of BN rows into a ring of STAGES shared-memory slots
// (cp.async, 16-byte chunks) and signals each full slot on an mbarrier; warpgroups 1 and 2 are
// consumers of 64 query rows each. A consumer computes S = Q·Kᵀ with wgmma m64nBNk16 (Q and K
// both from shared memory through matrix descriptors), masks only where a tile crosses the
// diagonal or the window edge, runs the online softmax in registers (base 2, the scale folded
// into one multiply), rounds P to bf16 in registers and accumulates O += P·V with wgmma
// m64nDk16 (P from registers as the A operand, V through a transposed descriptor), then frees
// the slot on a second mbarrier. With REGS the producer gives registers back (setmaxnreg) so
// the consumers can hold S, P and O without spilling; with PINGPONG the two consumers take
// turns at the tensor cores (FlashAttention-3's schedule).
//
// Shared memory holds every tile as column blocks of 64 elements (128 bytes a row), rows in
// order, the 16-byte chunk c of row r stored at chunk c ^ (r & 7): the 128-byte swizzle that
// wgmma's descriptors name (layout type 1); each tile starts on a 1024-byte boundary.
// Launch: grid (n_heads, ceil(T / 128)), block 384, dynamic shared memory
// (2·64·D + 2·STAGES·BN·D)·2 + 1024 bytes (the 1024 aligns the base).
// Entry points flash90_d{D}_n{BN}_s{STAGES}_r{REGS}_p{PINGPONG}.
#include <cuda_bf16.h>

#define NEG_INF __int_as_float(0xff800000)
#define LOG2E 1.4426950408889634f

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
    int n = valid ? 16 : 0;  // 0 bytes read: the chunk is zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}

__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Spins until the phase with this parity of barrier `bar` has completed. With WATCHDOG it
// traps after 2^28 tries (each try_wait may suspend the thread a while: seconds to minutes in
// all), so a protocol bug fails the launch instead of hanging it. Only the producer watches
// (the check costs the consumers registers): it also waits for the consumers' last releases,
// so a consumer stuck on any barrier leaves the producer a release that never comes.
template <bool WATCHDOG>
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    for (unsigned tries = 0;; tries++) {
        unsigned done;
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n"
            "}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
        if (done) return;
        if (WATCHDOG && tries > (1u << 28)) __trap();
    }
}

// Makes this thread's generic-proxy shared-memory writes visible to wgmma (the async proxy).
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// Named barrier `id` over the `n` threads that reach it.
__device__ __forceinline__ void bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
// Counts this thread in on named barrier `id` (of `n` threads) without waiting.
__device__ __forceinline__ void bar_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }

// wgmma matrix descriptor of a 128-byte-swizzled tile at shared address `addr`: `lbo` and `sbo`
// are the leading and stride byte offsets (see the layout note above each use).
__device__ __forceinline__ unsigned long long gmma_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    unsigned long long d = 0;
    d |= (unsigned long long)((addr & 0x3FFFF) >> 4);
    d |= (unsigned long long)((lbo & 0x3FFFF) >> 4) << 16;
    d |= (unsigned long long)((sbo & 0x3FFFF) >> 4) << 32;
    d |= 1ull << 62;  // 128-byte swizzle
    return d;
}

// Byte offset of element (r, c) (c a multiple of 8: a 16-byte chunk) in a swizzled tile of
// `rows` rows: column block c / 64, row r, chunk (c % 64) / 8 swizzled by r & 7.
__device__ __forceinline__ unsigned swz128(int rows, int r, int c) {
    return (unsigned)((c >> 6) * rows * 128 + r * 128 + ((((c & 63) >> 3) ^ (r & 7)) << 4));
}

// Generated by scripts/kernels/gen_wgmma.py: one wrapper per wgmma shape, accumulators as
// "+f" operands (the compiler must not touch them between issue and wait).
// d[0..32) (+)= A·B, m64n64k16: A and B from shared memory (descriptors, both K-major).
__device__ __forceinline__ void wgmma_ss_n64(float* d, unsigned long long da, unsigned long long db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(acc));
}

// d[0..64) (+)= A·B, m64n128k16: A and B from shared memory (descriptors, both K-major).
__device__ __forceinline__ void wgmma_ss_n128(float* d, unsigned long long da, unsigned long long db, int acc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(acc));
}

// d[0..32) += A·B, m64n64k16: A (bf16 pairs) from registers, B from shared memory, MN-major.
__device__ __forceinline__ void wgmma_rs_n64(float* d, const unsigned* a, unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

// d[0..64) += A·B, m64n128k16: A (bf16 pairs) from registers, B from shared memory, MN-major.
__device__ __forceinline__ void wgmma_rs_n128(float* d, const unsigned* a, unsigned long long db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}


template <int D, int BN, int STAGES, bool REGS, bool PINGPONG>
__device__ __forceinline__ void flash90_body(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                             const __nv_bfloat16* __restrict__ v, float* __restrict__ out, int T,
                                             int n_heads, int n_kv, int cap, int pos0, float scale, int window,
                                             const float* __restrict__ sinks, int has_sinks) {
    constexpr int BM = 128;                 // query rows a block (two consumers of 64)
    constexpr int Q_BYTES = 64 * D * 2;     // one consumer's Q tile
    constexpr int KV_BYTES = BN * D * 2;    // one K or V tile
    constexpr int CH = D / 8;               // 16-byte chunks a row
    static_assert(D % 64 == 0 && BN % 64 == 0, "tiles are whole 64-element column blocks");
    extern __shared__ unsigned char smem_raw[];
    __shared__ __align__(8) unsigned long long full_bar[STAGES], empty_bar[STAGES];

    const unsigned base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const unsigned qs = base;                        // [2][Q_BYTES]
    const unsigned ks = qs + 2 * Q_BYTES;            // [STAGES][KV_BYTES]
    const unsigned vs = ks + STAGES * KV_BYTES;      // [STAGES][KV_BYTES]
    unsigned char* smem_gen = smem_raw + (base - smem_u32(smem_raw));  // generic pointer to `base`

    const int h = blockIdx.x;
    const int mb = gridDim.y - 1 - blockIdx.y;  // the longest rows first
    const int r0 = mb * BM;
    const int kvh = h / (n_heads / n_kv);
    const int tid = threadIdx.x, wg = tid / 128, wtid = tid % 128;
    const int kv_len = pos0 + T;

    const int hi_blk = min(pos0 + r0 + BM - 1, kv_len - 1);
    const int lo_blk = window > 0 ? max(0, pos0 + r0 - window + 1) : 0;
    const int t_lo = lo_blk / BN, n_tiles = hi_blk / BN - t_lo + 1;

    if (tid == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(smem_u32(&full_bar[s]), 128);  // every producer thread, once its copies landed
            mbar_init(smem_u32(&empty_bar[s]), 8);   // lane 0 of each consumer warp, once it is done
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        // Producer: tile it goes to slot it % STAGES once the consumers freed that slot's last use.
        if (REGS) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        const __nv_bfloat16* kb = k + (size_t)kvh * cap * D;
        const __nv_bfloat16* vb = v + (size_t)kvh * cap * D;
        for (int it = 0; it < n_tiles; it++) {
            const int stage = it % STAGES;
            if (it >= STAGES) mbar_wait<true>(smem_u32(&empty_bar[stage]), ((it / STAGES) & 1) ^ 1);
            const int n0 = (t_lo + it) * BN;
            const unsigned kd = ks + stage * KV_BYTES, vd = vs + stage * KV_BYTES;
            for (int i = wtid; i < BN * CH; i += 128) {
                const int r = i / CH, c = (i % CH) * 8;
                const bool ok = n0 + r < kv_len;
                const size_t off = ok ? ((size_t)(n0 + r) * D + c) : 0;
                cp_async16(kd + swz128(BN, r, c), kb + off, ok);
                cp_async16(vd + swz128(BN, r, c), vb + off, ok);
            }
            asm volatile("cp.async.commit_group;\n" ::: "memory");
            // This thread's copies landed: make them visible to wgmma, then count in.
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
            fence_async_smem();
            mbar_arrive(smem_u32(&full_bar[stage]));
        }
        // Drain: the consumers' releases of the last tiles (the watchdog's view of them).
        for (int it = max(0, n_tiles - STAGES); it < n_tiles; it++)
            mbar_wait<true>(smem_u32(&empty_bar[it % STAGES]), (it / STAGES) & 1);
        return;
    }

    // Consumer cw: query rows r0 + 64·cw .. +63; warp w of it owns 16 of them.
    if (REGS) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int cw = wg - 1;
    const int warp = wtid / 32, lane = tid % 32;
    const int g = lane / 4, cq = lane % 4;
    const int row0 = r0 + 64 * cw;  // first query row (index into T) of this consumer
    const unsigned qd = qs + cw * Q_BYTES;

    // Q tile: f32 → bf16 into shared memory (rows past T are zeros), then visible to wgmma.
    for (int i = wtid; i < 64 * CH; i += 128) {
        const int r = i / CH, c = (i % CH) * 8;
        const int t = row0 + r;
        uint4 packed = make_uint4(0, 0, 0, 0);
        if (t < T) {
            const float4* src = reinterpret_cast<const float4*>(q + ((size_t)t * n_heads + h) * D + c);
            const float4 a = src[0], b = src[1];
            packed = make_uint4(pack_bf16(a.x, a.y), pack_bf16(a.z, a.w), pack_bf16(b.x, b.y), pack_bf16(b.z, b.w));
        }
        *reinterpret_cast<uint4*>(smem_gen + (qd - base) + swz128(64, r, c)) = packed;
    }
    fence_async_smem();
    bar_sync(1 + cw, 128);
    // PINGPONG: the consumers take turns issuing S = Q·Kᵀ (named barriers 3 + cw, each met by
    // one consumer's sync and the other's arrive), so one's softmax runs while the other's
    // products hold the tensor cores. Consumer 1 lets consumer 0 go first.
    if (PINGPONG && cw == 1) bar_arrive(3, 256);

    float o[D / 2];  // O accumulator fragment: D/8 column groups × 4
#pragma unroll
    for (int i = 0; i < D / 2; i++) o[i] = 0.f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    const float c2 = scale * LOG2E;
    // Positions of this thread's two rows, and of the consumer's first and last rows.
    const int p_row[2] = {pos0 + row0 + 16 * warp + g, pos0 + row0 + 16 * warp + g + 8};
    const int p_first = pos0 + row0, p_last = pos0 + row0 + 63;

    for (int it = 0; it < n_tiles; it++) {
        const int stage = it % STAGES;
        const int n0 = (t_lo + it) * BN;
        mbar_wait<false>(smem_u32(&full_bar[stage]), (it / STAGES) & 1);
        const unsigned kst = ks + stage * KV_BYTES, vst = vs + stage * KV_BYTES;

        // S = Q · Kᵀ: K-major A (Q, 64 rows) and B (K, BN rows); a k-step of 16 moves 32 bytes
        // inside a 128-byte row, every 4 steps the next column block. SBO = 8 rows = 1024 bytes.
        float s[BN / 2];
        if (PINGPONG) bar_sync(3 + cw, 256);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const unsigned koff = (kk % 4) * 32;
            const unsigned long long da = gmma_desc(qd + (kk / 4) * 64 * 128 + koff, 16, 1024);
            const unsigned long long db = gmma_desc(kst + (kk / 4) * BN * 128 + koff, 16, 1024);
            if constexpr (BN == 128)
                wgmma_ss_n128(s, da, db, kk > 0);
            else
                wgmma_ss_n64(s, da, db, kk > 0);
        }
        wg_commit();
        // The other consumer's turn (consumer 1 skips its last: consumer 0 syncs n_tiles times).
        if (PINGPONG && (cw == 0 || it + 1 < n_tiles)) bar_arrive(4 - cw, 256);
        wg_wait0();

        // Mask where some (row, key) of this tile may be invisible to this consumer's rows.
        const bool need_mask = (n0 + BN - 1 > p_first) || (window > 0 && n0 <= p_last - window);
        if (need_mask) {
#pragma unroll
            for (int rh = 0; rh < 2; rh++) {
                const int p = p_row[rh];
                const int lo = window > 0 ? p - window + 1 : 0;
#pragma unroll
                for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int j = n0 + nt * 8 + cq * 2 + e;
                        if (j > p || j < lo) s[nt * 4 + rh * 2 + e] = NEG_INF;
                    }
            }
        }

        // Online softmax (base 2) of this thread's two rows; P rounded to bf16 as wgmma's A.
#pragma unroll
        for (int rh = 0; rh < 2; rh++) {
            float mx = m[rh];
#pragma unroll
            for (int nt = 0; nt < BN / 8; nt++) mx = fmaxf(mx, fmaxf(s[nt * 4 + rh * 2], s[nt * 4 + rh * 2 + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float mc = mx == NEG_INF ? 0.f : mx * c2;
            const float corr = exp2f(m[rh] * c2 - mc);
            m[rh] = mx;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float pe = exp2f(s[nt * 4 + rh * 2 + e] * c2 - mc);
                    s[nt * 4 + rh * 2 + e] = pe;
                    sum += pe;
                }
            l[rh] = l[rh] * corr + sum;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                o[dt * 4 + rh * 2] *= corr;
                o[dt * 4 + rh * 2 + 1] *= corr;
            }
        }
        unsigned pa[BN / 16][4];
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            pa[kk][0] = pack_bf16(s[(2 * kk) * 4 + 0], s[(2 * kk) * 4 + 1]);
            pa[kk][1] = pack_bf16(s[(2 * kk) * 4 + 2], s[(2 * kk) * 4 + 3]);
            pa[kk][2] = pack_bf16(s[(2 * kk + 1) * 4 + 0], s[(2 * kk + 1) * 4 + 1]);
            pa[kk][3] = pack_bf16(s[(2 * kk + 1) * 4 + 2], s[(2 * kk + 1) * 4 + 3]);
        }

        // O += P · V: V is MN-major (D contiguous): 8 keys of 128 bytes = one 1024-byte atom
        // (SBO), the next 64 columns of D one column block further (LBO = BN·128 bytes); a
        // k-step of 16 keys moves 16 rows = 2048 bytes.
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            const unsigned long long db = gmma_desc(vst + kk * 16 * 128, BN * 128, 1024);
            if constexpr (D == 128)
                wgmma_rs_n128(o, pa[kk], db);
            else
                wgmma_rs_n64(o, pa[kk], db);
        }
        wg_commit();
        wg_wait0();
        if (lane == 0) mbar_arrive(smem_u32(&empty_bar[stage]));
    }

    // Normalise (sinks join the denominator) and store.
    const float sink2 = has_sinks ? sinks[h] * LOG2E : NEG_INF;
#pragma unroll
    for (int rh = 0; rh < 2; rh++) {
        const int t = row0 + 16 * warp + g + rh * 8;
        float lsum = l[rh];
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
        lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
        const float mc = m[rh] * c2;
        const float mf = fmaxf(mc, sink2);
        const float f = exp2f(mc - mf);
        const float denom = lsum * f + (has_sinks ? exp2f(sink2 - mf) : 0.f);
        const float inv = f / denom;
        if (t < T) {
            float* dst = out + ((size_t)t * n_heads + h) * D + cq * 2;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++)
                *reinterpret_cast<float2*>(dst + dt * 8) = make_float2(o[dt * 4 + rh * 2] * inv, o[dt * 4 + rh * 2 + 1] * inv);
        }
    }
}

// Diagnostic: the two wgmma products alone, one warpgroup, no softmax, so a wrong descriptor or
// fragment layout shows in the product it breaks. q [64, D] f32 (rounded to bf16), k, v
// [BN, D] bf16; writes s_out [64, BN] = Q·Kᵀ (f32) and o_out [64, D] = bf16(S)·V.
// Launch: grid 1, block 128, dynamic shared memory (64·D + 2·BN·D)·2 + 1024 bytes.
// Entry points flash90_probe_d{D}_n{BN}.
template <int D, int BN>
__device__ __forceinline__ void probe_body(const float* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                           const __nv_bfloat16* __restrict__ v, float* __restrict__ s_out,
                                           float* __restrict__ o_out) {
    extern __shared__ unsigned char smem_raw[];
    const unsigned base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    unsigned char* gen = smem_raw + (base - smem_u32(smem_raw));
    const unsigned qd = base, kd = qd + 64 * D * 2, vd = kd + BN * D * 2;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, cq = lane % 4;
    for (int i = tid; i < 64 * D / 8; i += 128) {
        const int r = i / (D / 8), c = (i % (D / 8)) * 8;
        const float* src = q + r * D + c;
        *reinterpret_cast<uint4*>(gen + swz128(64, r, c)) =
            make_uint4(pack_bf16(src[0], src[1]), pack_bf16(src[2], src[3]), pack_bf16(src[4], src[5]),
                       pack_bf16(src[6], src[7]));
    }
    for (int i = tid; i < BN * D / 8; i += 128) {
        const int r = i / (D / 8), c = (i % (D / 8)) * 8;
        *reinterpret_cast<uint4*>(gen + (kd - base) + swz128(BN, r, c)) = *reinterpret_cast<const uint4*>(k + r * D + c);
        *reinterpret_cast<uint4*>(gen + (vd - base) + swz128(BN, r, c)) = *reinterpret_cast<const uint4*>(v + r * D + c);
    }
    fence_async_smem();
    __syncthreads();
    float s[BN / 2];
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const unsigned long long da = gmma_desc(qd + (kk / 4) * 64 * 128 + (kk % 4) * 32, 16, 1024);
        const unsigned long long db = gmma_desc(kd + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024);
        if constexpr (BN == 128)
            wgmma_ss_n128(s, da, db, kk > 0);
        else
            wgmma_ss_n64(s, da, db, kk > 0);
    }
    wg_commit();
    wg_wait0();
#pragma unroll
    for (int nt = 0; nt < BN / 8; nt++)
#pragma unroll
        for (int rh = 0; rh < 2; rh++) {
            const int r = 16 * warp + g + 8 * rh;
            *reinterpret_cast<float2*>(s_out + r * BN + nt * 8 + cq * 2) = make_float2(s[nt * 4 + rh * 2], s[nt * 4 + rh * 2 + 1]);
        }
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) o[i] = 0.f;
    unsigned pa[BN / 16][4];
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
        pa[kk][0] = pack_bf16(s[(2 * kk) * 4 + 0], s[(2 * kk) * 4 + 1]);
        pa[kk][1] = pack_bf16(s[(2 * kk) * 4 + 2], s[(2 * kk) * 4 + 3]);
        pa[kk][2] = pack_bf16(s[(2 * kk + 1) * 4 + 0], s[(2 * kk + 1) * 4 + 1]);
        pa[kk][3] = pack_bf16(s[(2 * kk + 1) * 4 + 2], s[(2 * kk + 1) * 4 + 3]);
    }
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; kk++) {
        const unsigned long long db = gmma_desc(vd + kk * 16 * 128, BN * 128, 1024);
        if constexpr (D == 128)
            wgmma_rs_n128(o, pa[kk], db);
        else
            wgmma_rs_n64(o, pa[kk], db);
    }
    wg_commit();
    wg_wait0();
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++)
#pragma unroll
        for (int rh = 0; rh < 2; rh++) {
            const int r = 16 * warp + g + 8 * rh;
            *reinterpret_cast<float2*>(o_out + r * D + dt * 8 + cq * 2) = make_float2(o[dt * 4 + rh * 2], o[dt * 4 + rh * 2 + 1]);
        }
}

#define PROBE_ENTRY(D, BN)                                                                                   \
    extern "C" __global__ void __launch_bounds__(128, 1) flash90_probe_d##D##_n##BN(                          \
        const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v, float* s_out, float* o_out) {        \
        probe_body<D, BN>(q, k, v, s_out, o_out);                                                             \
    }

PROBE_ENTRY(128, 128)
PROBE_ENTRY(128, 64)
PROBE_ENTRY(64, 128)
PROBE_ENTRY(64, 64)

#define FLASH90_ENTRY(D, BN, ST, R, P)                                                                        \
    extern "C" __global__ void __launch_bounds__(384, 1) flash90_d##D##_n##BN##_s##ST##_r##R##_p##P(          \
        const float* q, const __nv_bfloat16* k, const __nv_bfloat16* v, float* out, int T, int n_heads,       \
        int n_kv, int cap, int pos0, float scale, int window, const float* sinks, int has_sinks) {             \
        flash90_body<D, BN, ST, R, P>(q, k, v, out, T, n_heads, n_kv, cap, pos0, scale, window, sinks, has_sinks); \
    }

FLASH90_ENTRY(128, 128, 2, 1, 0)
FLASH90_ENTRY(128, 128, 2, 1, 1)
FLASH90_ENTRY(128, 128, 2, 0, 0)
FLASH90_ENTRY(128, 64, 3, 1, 0)
FLASH90_ENTRY(128, 64, 3, 1, 1)
FLASH90_ENTRY(64, 128, 3, 1, 0)
FLASH90_ENTRY(64, 128, 3, 1, 1)
FLASH90_ENTRY(64, 128, 2, 1, 0)
FLASH90_ENTRY(64, 64, 3, 1, 0)

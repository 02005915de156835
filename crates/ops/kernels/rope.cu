// RoPE, halves layout (docs/models.md §1.2), in place on x [T, heads, d]; the first r dims rotate.
// cos/sin [positions, r/2] f32 (already times the attention factor). One thread per pair.
__device__ __forceinline__ void rope_body(float* __restrict__ x, const float* __restrict__ cos_t,
                                          const float* __restrict__ sin_t, int t, int heads, int d, int r, int pos0) {
    int half = r / 2;
    long long total = (long long)t * heads * half;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        int i = (int)(idx % half);
        long long th = idx / half;  // token * heads + head
        int ti = (int)(th / heads);
        float* head = x + th * d;
        float c = cos_t[(size_t)(pos0 + ti) * half + i];
        float s = sin_t[(size_t)(pos0 + ti) * half + i];
        float a = head[i], b = head[i + half];
        head[i] = a * c - b * s;
        head[i + half] = b * c + a * s;
    }
}

extern "C" __global__ void rope_f32(float* __restrict__ x, const float* __restrict__ cos_t,
                                    const float* __restrict__ sin_t, int t, int heads, int d, int r, int pos0) {
    rope_body(x, cos_t, sin_t, t, heads, d, r, pos0);
}

// The same inside a captured decode step (src/cuda/graph.rs): the positions are pos0 + step[0],
// step[0] the replay's shift from the position the step was captured at.
extern "C" __global__ void rope_f32_step(float* __restrict__ x, const float* __restrict__ cos_t,
                                         const float* __restrict__ sin_t, int t, int heads, int d, int r, int pos0,
                                         const int* __restrict__ step) {
    rope_body(x, cos_t, sin_t, t, heads, d, r, pos0 + step[0]);
}

// RoPE of q and k and the KV append in one launch (a decode step's rope, rope, write_kv,
// write_kv): q [T, nh, d] and k [T, nkv, d] rotate in place at positions pos0.., and k and v
// [T, nkv, d] go to the bf16 caches [nkv, cap, d] at rows row0.. (rounded to nearest even, as
// write_kv_bf16). One thread per q pair, per k pair or unrotated k dim, and per v element;
// each rotation is rope_body's expression, so the bits equal the composed ops'. CPU twin: the
// ops composed (src/backend/fused.rs).
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

__device__ __forceinline__ void rope_write_kv_body(float* __restrict__ q, float* __restrict__ k,
                                                   const float* __restrict__ v, const float* __restrict__ cos_t,
                                                   const float* __restrict__ sin_t, __nv_bfloat16* __restrict__ kc,
                                                   __nv_bfloat16* __restrict__ vc, int t, int nh, int nkv, int d,
                                                   int r, int cap, int pos0, int row0) {
    pdl_sync();
    const int half = r / 2, kper = d - half;
    const long long nq = (long long)t * nh * half, nk = (long long)t * nkv * kper, nv = (long long)t * nkv * d;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < nq + nk + nv;
         idx += (long long)gridDim.x * blockDim.x) {
        if (idx < nq) {
            int i = (int)(idx % half);
            long long th = idx / half;
            int ti = (int)(th / nh);
            float* head = q + th * d;
            float c = cos_t[(size_t)(pos0 + ti) * half + i];
            float s = sin_t[(size_t)(pos0 + ti) * half + i];
            float a = head[i], b = head[i + half];
            head[i] = a * c - b * s;
            head[i + half] = b * c + a * s;
        } else if (idx < nq + nk) {
            long long j0 = idx - nq;
            int j = (int)(j0 % kper);
            long long th = j0 / kper;  // token * nkv + head
            int ti = (int)(th / nkv), h = (int)(th % nkv);
            float* head = k + th * d;
            __nv_bfloat16* row = kc + ((size_t)h * cap + row0 + ti) * d;
            if (j < half) {
                float c = cos_t[(size_t)(pos0 + ti) * half + j];
                float s = sin_t[(size_t)(pos0 + ti) * half + j];
                float a = head[j], b = head[j + half];
                float ra = a * c - b * s, rb = b * c + a * s;
                head[j] = ra;
                head[j + half] = rb;
                row[j] = __float2bfloat16_rn(ra);
                row[j + half] = __float2bfloat16_rn(rb);
            } else {
                row[j + half] = __float2bfloat16_rn(head[j + half]);  // dims r..d pass through
            }
        } else {
            long long i = idx - nq - nk;
            int c = (int)(i % d);
            int h = (int)((i / d) % nkv);
            int ti = (int)(i / ((long long)d * nkv));
            vc[((size_t)h * cap + row0 + ti) * d + c] = __float2bfloat16_rn(v[i]);
        }
    }
}

extern "C" __global__ void rope_write_kv_f32(float* __restrict__ q, float* __restrict__ k,
                                             const float* __restrict__ v, const float* __restrict__ cos_t,
                                             const float* __restrict__ sin_t, __nv_bfloat16* __restrict__ kc,
                                             __nv_bfloat16* __restrict__ vc, int t, int nh, int nkv, int d, int r,
                                             int cap, int pos0, int row0) {
    rope_write_kv_body(q, k, v, cos_t, sin_t, kc, vc, t, nh, nkv, d, r, cap, pos0, row0);
}

// Inside a captured decode step (src/cuda/graph.rs): positions pos0 + step[0], rows row0 + step[0].
extern "C" __global__ void rope_write_kv_f32_step(float* __restrict__ q, float* __restrict__ k,
                                                  const float* __restrict__ v, const float* __restrict__ cos_t,
                                                  const float* __restrict__ sin_t, __nv_bfloat16* __restrict__ kc,
                                                  __nv_bfloat16* __restrict__ vc, int t, int nh, int nkv, int d,
                                                  int r, int cap, int pos0, int row0, const int* __restrict__ step) {
    rope_write_kv_body(q, k, v, cos_t, sin_t, kc, vc, t, nh, nkv, d, r, cap, pos0 + step[0], row0 + step[0]);
}

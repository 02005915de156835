// Small element-wise kernels, f32 activations (CPU twins in src/cpu/elementwise.rs and mod.rs).
#include "common.cuh"

// out[t, :] = table[ids[t], :]; grid (T), block any. table [V, H] (bf16, f16 or f32), out [T, H] f32.
template <typename W>
__device__ void embedding_rows(const W* __restrict__ table, const unsigned int* __restrict__ ids,
                               float* __restrict__ out, int hidden) {
    const W* src = table + (size_t)ids[blockIdx.x] * hidden;
    float* dst = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = to_f32(src[i]);
}

extern "C" __global__ void embedding_bf16(const __nv_bfloat16* __restrict__ table, const unsigned int* __restrict__ ids,
                                          float* __restrict__ out, int hidden) {
    embedding_rows(table, ids, out, hidden);
}

extern "C" __global__ void embedding_f16(const __half* __restrict__ table, const unsigned int* __restrict__ ids,
                                         float* __restrict__ out, int hidden) {
    embedding_rows(table, ids, out, hidden);
}

extern "C" __global__ void embedding_f32(const float* __restrict__ table, const unsigned int* __restrict__ ids,
                                         float* __restrict__ out, int hidden) {
    embedding_rows(table, ids, out, hidden);
}

// out = silu(gate) * up, n elements.
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                        float* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g / (1.f + expf(-g)) * up[i];
    }
}

// out = gelu_tanh(gate) * up, n elements: gelu_tanh(a) = a/2 (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3))).
extern "C" __global__ void gelu_tanh_mul_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                             float* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = 0.5f * g * (1.f + tanhf(0.7978846f * (g + 0.044715f * g * g * g))) * up[i];
    }
}

// x *= s, n elements.
extern "C" __global__ void scale_f32(float* __restrict__ x, float s, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        x[i] *= s;
    }
}

// x = cap * tanh(x / cap), n elements.
extern "C" __global__ void softcap_f32(float* __restrict__ x, float cap, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        x[i] = cap * tanhf(x[i] / cap);
    }
}

// x += y, n elements.
extern "C" __global__ void add_assign_f32(float* __restrict__ x, const float* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        x[i] += y[i];
    }
}

// out[t, j] += bias[j] for out [T, n] f32 (total = T * n elements), bias [n] in its stored dtype.
template <typename B>
__device__ void add_bias_rows(float* __restrict__ out, const B* __restrict__ bias, int n, long long total) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        out[i] += to_f32(bias[i % n]);
    }
}

extern "C" __global__ void add_bias_f32(float* __restrict__ out, const float* __restrict__ bias, int n, long long total) {
    add_bias_rows(out, bias, n, total);
}

extern "C" __global__ void add_bias_bf16(float* __restrict__ out, const __nv_bfloat16* __restrict__ bias, int n,
                                         long long total) {
    add_bias_rows(out, bias, n, total);
}

extern "C" __global__ void add_bias_f16(float* __restrict__ out, const __half* __restrict__ bias, int n, long long total) {
    add_bias_rows(out, bias, n, total);
}

// cache [n_kv, cap, d] bf16 at positions pos0..pos0+T  <-  src [T, n_kv, d] f32, rounded to
// nearest even (the KV cache is in the model dtype, docs/models.md §2.4).
__device__ __forceinline__ void write_kv_body(__nv_bfloat16* __restrict__ cache, const float* __restrict__ src,
                                              int t, int n_kv, int cap, int d, int pos0) {
    long long total = (long long)t * n_kv * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        int c = (int)(i % d);
        int h = (int)((i / d) % n_kv);
        int ti = (int)(i / ((long long)d * n_kv));
        cache[((size_t)h * cap + pos0 + ti) * d + c] = __float2bfloat16_rn(src[i]);
    }
}

extern "C" __global__ void write_kv_bf16(__nv_bfloat16* __restrict__ cache, const float* __restrict__ src,
                                         int t, int n_kv, int cap, int d, int pos0) {
    write_kv_body(cache, src, t, n_kv, cap, d, pos0);
}

// The same inside a captured decode step (src/cuda/graph.rs): at positions pos0 + step[0].
extern "C" __global__ void write_kv_bf16_step(__nv_bfloat16* __restrict__ cache, const float* __restrict__ src,
                                              int t, int n_kv, int cap, int d, int pos0,
                                              const int* __restrict__ step) {
    write_kv_body(cache, src, t, n_kv, cap, d, pos0 + step[0]);
}

// Small element-wise kernels, f32 activations (CPU twins in src/cpu/elementwise.rs and mod.rs).
#include <cuda_bf16.h>

// out[t, :] = table[ids[t], :]; grid (T), block any. table [V, H] bf16, out [T, H] f32.
extern "C" __global__ void embedding_bf16(const __nv_bfloat16* __restrict__ table,
                                          const unsigned int* __restrict__ ids,
                                          float* __restrict__ out, int hidden) {
    const __nv_bfloat16* src = table + (size_t)ids[blockIdx.x] * hidden;
    float* dst = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = __bfloat162float(src[i]);
}

// out = silu(gate) * up, n elements.
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                        float* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g / (1.f + expf(-g)) * up[i];
    }
}

// x += y, n elements.
extern "C" __global__ void add_assign_f32(float* __restrict__ x, const float* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        x[i] += y[i];
    }
}

// cache [n_kv, cap, d] at positions pos0..pos0+T  <-  src [T, n_kv, d].
extern "C" __global__ void write_kv_f32(float* __restrict__ cache, const float* __restrict__ src,
                                        int t, int n_kv, int cap, int d, int pos0) {
    long long total = (long long)t * n_kv * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        int c = (int)(i % d);
        int h = (int)((i / d) % n_kv);
        int ti = (int)(i / ((long long)d * n_kv));
        cache[((size_t)h * cap + pos0 + ti) * d + c] = src[i];
    }
}

// out[t, n] = sum_k x[t, k] * w[n, k]: f32 activations against weights in nn.Linear layout
// stored as bf16, f16 or f32, f32 accumulation. The small-T path (T < 16 rows; cuBLAS takes
// the rest, src/cuda/matmul.rs): one warp per output element, lanes stride over k.
// Launch: grid (ceil(N / 8), T), block 256 (8 warps).
#include "common.cuh"

template <typename W>
__device__ void matmul_rows(const float* __restrict__ x, const W* __restrict__ w, float* __restrict__ out,
                            int n_out, int k) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int n = blockIdx.x * (blockDim.x / 32) + warp;
    int t = blockIdx.y;
    if (n >= n_out) return;
    const float* xr = x + (size_t)t * k;
    const W* wr = w + (size_t)n * k;
    float acc = 0.f;
    for (int i = lane; i < k; i += 32) acc += xr[i] * to_f32(wr[i]);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[(size_t)t * n_out + n] = acc;
}

extern "C" __global__ void matmul_f32_bf16w(const float* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                            float* __restrict__ out, int n_out, int k) {
    matmul_rows(x, w, out, n_out, k);
}

extern "C" __global__ void matmul_f32_f16w(const float* __restrict__ x, const __half* __restrict__ w,
                                           float* __restrict__ out, int n_out, int k) {
    matmul_rows(x, w, out, n_out, k);
}

extern "C" __global__ void matmul_f32_f32w(const float* __restrict__ x, const float* __restrict__ w,
                                           float* __restrict__ out, int n_out, int k) {
    matmul_rows(x, w, out, n_out, k);
}

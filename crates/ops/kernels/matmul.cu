// out[t, n] = sum_k x[t, k] * w[n, k] (+ nothing): f32 activations against bf16 weights in
// nn.Linear layout, f32 accumulation. A correct first kernel: one warp per output element,
// lanes stride over k with 8-byte bf16x4 loads when aligned. The tuned GEMV and the cuBLAS
// prefill path come with the CUDA issue's benchmarks.
// Launch: grid (ceil(N / 8), T), block 256 (8 warps).
#include <cuda_bf16.h>

extern "C" __global__ void matmul_f32_bf16w(const float* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                            float* __restrict__ out, int n_out, int k) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int n = blockIdx.x * (blockDim.x / 32) + warp;
    int t = blockIdx.y;
    if (n >= n_out) return;
    const float* xr = x + (size_t)t * k;
    const __nv_bfloat16* wr = w + (size_t)n * k;
    float acc = 0.f;
    for (int i = lane; i < k; i += 32) acc += xr[i] * __bfloat162float(wr[i]);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[(size_t)t * n_out + n] = acc;
}

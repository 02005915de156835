// Narrowing f32 activations for the cuBLAS prefill path (src/cuda/matmul.rs): round to nearest
// even, like half::bf16::from_f32 / half::f16::from_f32 on the CPU. n elements, grid-stride.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        y[i] = __float2bfloat16_rn(x[i]);
    }
}

extern "C" __global__ void f32_to_f16(const float* __restrict__ x, __half* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        y[i] = __float2half_rn(x[i]);
    }
}

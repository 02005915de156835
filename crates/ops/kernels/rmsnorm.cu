// RMSNorm over the last axis (docs/models.md §1.1), f32 activations, weight stored as bf16, f16 or
// f32, f32 math (CPU twins in src/cpu/norm.rs).
//   rmsnorm:       out[r, i] = (offset + w[i]) * (x[r, i] * rsqrt(mean_i(x[r, i]^2) + eps))
//                  offset = 1 for zero-centred norms (Qwen3-Next), 0 otherwise.
//   gated_rmsnorm: out[r, i] = (w[i] * (x[r, i] * rsqrt(...))) * silu(z[r, i])   (Qwen3-Next Gated-RMS)
// Launch: one block per row, blockDim.x a multiple of 32 (<= 1024).
#include "common.cuh"

// rsqrt(mean(x^2) + eps) of the block's row xr [n], the same in every thread. Call once per
// kernel: its shared partials are not guarded against a second call.
__device__ float block_inv_rms(const float* __restrict__ xr, int n, float eps) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i];
        ss += v * v;
    }
    // Warp reduce, then one partial per warp through shared memory.
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    __shared__ float partial[32];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        int nwarps = blockDim.x / 32;
        ss = lane < nwarps ? partial[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) partial[0] = ss;
    }
    __syncthreads();
    return rsqrtf(partial[0] / (float)n + eps);
}

template <typename W>
__device__ void rmsnorm_row(const float* __restrict__ x, const W* __restrict__ w, float* __restrict__ out,
                            int n, float eps, float offset) {
    const float* xr = x + (size_t)blockIdx.x * n;
    float* orow = out + (size_t)blockIdx.x * n;
    float r = block_inv_rms(xr, n, eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        orow[i] = (offset + to_f32(w[i])) * (xr[i] * r);
    }
}

extern "C" __global__ void rmsnorm_f32_bf16w(const float* __restrict__ x, const __nv_bfloat16* __restrict__ w,
                                             float* __restrict__ out, int n, float eps, float offset) {
    rmsnorm_row(x, w, out, n, eps, offset);
}

extern "C" __global__ void rmsnorm_f32_f16w(const float* __restrict__ x, const __half* __restrict__ w,
                                            float* __restrict__ out, int n, float eps, float offset) {
    rmsnorm_row(x, w, out, n, eps, offset);
}

extern "C" __global__ void rmsnorm_f32_f32w(const float* __restrict__ x, const float* __restrict__ w,
                                            float* __restrict__ out, int n, float eps, float offset) {
    rmsnorm_row(x, w, out, n, eps, offset);
}

template <typename W>
__device__ void gated_rmsnorm_row(const float* __restrict__ x, const float* __restrict__ z, const W* __restrict__ w,
                                  float* __restrict__ out, int n, float eps) {
    size_t base = (size_t)blockIdx.x * n;
    float r = block_inv_rms(x + base, n, eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float zv = z[base + i];
        float silu = zv / (1.f + expf(-zv));
        out[base + i] = to_f32(w[i]) * (x[base + i] * r) * silu;
    }
}

extern "C" __global__ void gated_rmsnorm_f32_bf16w(const float* __restrict__ x, const float* __restrict__ z,
                                                   const __nv_bfloat16* __restrict__ w, float* __restrict__ out,
                                                   int n, float eps) {
    gated_rmsnorm_row(x, z, w, out, n, eps);
}

extern "C" __global__ void gated_rmsnorm_f32_f16w(const float* __restrict__ x, const float* __restrict__ z,
                                                  const __half* __restrict__ w, float* __restrict__ out, int n,
                                                  float eps) {
    gated_rmsnorm_row(x, z, w, out, n, eps);
}

extern "C" __global__ void gated_rmsnorm_f32_f32w(const float* __restrict__ x, const float* __restrict__ z,
                                                  const float* __restrict__ w, float* __restrict__ out, int n,
                                                  float eps) {
    gated_rmsnorm_row(x, z, w, out, n, eps);
}

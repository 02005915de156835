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

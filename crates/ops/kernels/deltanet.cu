// Qwen3-Next's Gated DeltaNet pieces (models.md §4.5), f32. CPU twins: src/cpu/deltanet.rs and
// the slice/gate ops in src/cpu/mod.rs.

// out[r, out_offset + h*width + j] = src[r, h*stride + offset + j] for rows r < T, heads h,
// j < width. Grid-stride over T*heads*width.
extern "C" __global__ void slice_heads_f32(const float* __restrict__ src, float* __restrict__ out, long long rows,
                                           int heads, int stride, int offset, int width, int out_cols,
                                           int out_offset) {
    long long per_row = (long long)heads * width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < rows * per_row;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / per_row;
        int rem = (int)(i - r * per_row);
        int h = rem / width, j = rem - h * width;
        out[r * out_cols + out_offset + h * width + j] = src[r * (long long)heads * stride + h * stride + offset + j];
    }
}

// x[row] <- x[row] * scale / sqrt(sum(x^2) + eps), one block of 128 threads per row of d.
extern "C" __global__ void l2_norm_f32(float* __restrict__ x, int d, float eps, float scale) {
    __shared__ float part[4];
    float* row = x + (size_t)blockIdx.x * d;
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += row[i] * row[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
    __syncthreads();
    float total = part[0] + part[1] + part[2] + part[3];
    float f = scale / sqrtf(total + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) row[i] *= f;
}

// x[i] *= sigmoid(gate[i / per]) (per = 1: elementwise; per = row length: one gate per row).
extern "C" __global__ void sigmoid_mul_f32(float* __restrict__ x, const float* __restrict__ gate, long long n, int per) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float z = gate[i / per];
        x[i] *= 1.f / (1.f + expf(-z));
    }
}

// g = -exp(a_log[h]) * softplus(a + dt_bias[h]), beta = sigmoid(b), over [T, nv].
extern "C" __global__ void deltanet_gates_f32(const float* __restrict__ a, const float* __restrict__ b,
                                              const float* __restrict__ a_log, const float* __restrict__ dt_bias,
                                              float* __restrict__ g, float* __restrict__ beta, long long n, int nv) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        int h = (int)(i % nv);
        float x = a[i] + dt_bias[h];
        float sp = x > 20.f ? x : log1pf(expf(x));
        g[i] = -expf(a_log[h]) * sp;
        beta[i] = 1.f / (1.f + expf(-b[i]));
    }
}

// Causal depthwise conv + SiLU, one thread per channel walking the T rows with the last K-1
// inputs in registers (K <= 8): out[t, c] = silu(sum_j w[c, j] * u[t + j][c]) for
// u = [state; x]; then state takes the last K-1 rows of u. x, out [T, C]; w [C, K]; state [K-1, C].
extern "C" __global__ void causal_conv1d_f32(const float* __restrict__ x, const float* __restrict__ w,
                                             float* __restrict__ state, float* __restrict__ out, int T, int C,
                                             int K) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float win[8];  // the last K-1 inputs, oldest first
    float wc[8];
    for (int j = 0; j < K; ++j) wc[j] = w[(size_t)c * K + j];
    for (int j = 0; j < K - 1; ++j) win[j] = state[(size_t)j * C + c];
    for (int t = 0; t < T; ++t) {
        float cur = x[(size_t)t * C + c];
        float acc = wc[K - 1] * cur;
        for (int j = 0; j < K - 1; ++j) acc += wc[j] * win[j];
        out[(size_t)t * C + c] = acc / (1.f + expf(-acc));
        for (int j = 0; j + 1 < K - 1; ++j) win[j] = win[j + 1];
        if (K > 1) win[K - 2] = cur;
    }
    for (int j = 0; j < K - 1; ++j) state[(size_t)j * C + c] = win[j];
}

// The gated delta rule, step by step (models.md §4.5), one block per value head n with dv
// threads: thread j owns column j of the head's state S [dk, dv] (f32, in global memory, read
// into shared memory for the call). Per step: S <- e^g S; u_j = sum_i S[i][j] k_i;
// d_j = beta (v_j - u_j); S[i][j] += k_i d_j; o_j = sum_i S[i][j] q_i. q, k [T, nk, dk] (value
// head n reads key head n / (nv / nk)), v, out [T, nv, dv], g, beta [T, nv]. Dynamic shared
// memory: dk*dv floats for S plus 2*dk for the step's q and k.
extern "C" __global__ void delta_rule_recurrent_f32(const float* __restrict__ q, const float* __restrict__ k,
                                                    const float* __restrict__ v, const float* __restrict__ g,
                                                    const float* __restrict__ beta, float* __restrict__ state,
                                                    float* __restrict__ out, int T, int nk, int dk, int nv, int dv) {
    extern __shared__ float sm[];
    float* S = sm;            // [dk][dv]
    float* qs = sm + dk * dv; // [dk]
    float* ks = qs + dk;      // [dk]
    const int n = blockIdx.x, j = threadIdx.x;
    const int kh = n / (nv / nk);
    float* Sg = state + (size_t)n * dk * dv;
    for (int i = j; i < dk * dv; i += blockDim.x) S[i] = Sg[i];
    __syncthreads();
    for (int t = 0; t < T; ++t) {
        for (int i = j; i < dk; i += blockDim.x) {
            qs[i] = q[((size_t)t * nk + kh) * dk + i];
            ks[i] = k[((size_t)t * nk + kh) * dk + i];
        }
        __syncthreads();
        if (j < dv) {
            float decay = expf(g[(size_t)t * nv + n]), b = beta[(size_t)t * nv + n];
            float u = 0.f;
            for (int i = 0; i < dk; ++i) {
                float s = S[i * dv + j] * decay;
                S[i * dv + j] = s;
                u += s * ks[i];
            }
            float d = b * (v[((size_t)t * nv + n) * dv + j] - u);
            float o = 0.f;
            for (int i = 0; i < dk; ++i) {
                float s = S[i * dv + j] + ks[i] * d;
                S[i * dv + j] = s;
                o += s * qs[i];
            }
            out[((size_t)t * nv + n) * dv + j] = o;
        }
        __syncthreads();
    }
    for (int i = j; i < dk * dv; i += blockDim.x) Sg[i] = S[i];
}

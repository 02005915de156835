// Qwen3-Next's Gated DeltaNet pieces (docs/models.md §4.5), f32. CPU twins: src/cpu/deltanet.rs and
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

// The gated delta rule, step by step (docs/models.md §4.5), one block per value head n with dv
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

// The chunked delta rule (docs/models.md §4.5; CPU twin delta_rule_chunked), chunks of C <= 64 steps.
// The state's columns evolve independently, so block (n, y) owns value head n's columns
// [y*W, y*W+W) (W = 32) and walks the chunks in order. Per chunk, with γ the inclusive
// cumulative log-decay and D_ts = e^(γ_t − γ_s):
//   A_ts = β_t (k_t·k_s) D_ts (s < t); U = (I + A)⁻¹ diag(β) V; Wm = (I + A)⁻¹ diag(β e^γ) K
//   (forward substitution, one thread per column: a column only needs its own earlier rows);
//   Vn = U − Wm S; O = diag(e^γ) Q S + (QKᵀ ⊙ D) Vn; S ← e^(γ_last) S + (diag(e^(γ_last−γ)) K)ᵀ Vn.
// Key-sized rows (Qc, Kc, Wm) are padded to dk+1 floats so a warp reading one column across
// rows hits distinct banks. Dynamic shared memory: dk*W + 3*C*(dk+1) + C*W + C*C + 2*C floats.
#define DR_C 64
#define DR_W 32
extern "C" __global__ void delta_rule_chunked_f32(const float* __restrict__ q, const float* __restrict__ k,
                                                  const float* __restrict__ v, const float* __restrict__ g,
                                                  const float* __restrict__ beta, float* __restrict__ state,
                                                  float* __restrict__ out, int T, int nk, int dk, int nv, int dv) {
    extern __shared__ float sm[];
    const int kp = dk + 1;
    float* S = sm;                     // [dk][W]
    float* Qc = S + dk * DR_W;         // [C][kp]
    float* Kc = Qc + DR_C * kp;        // [C][kp]
    float* Wm = Kc + DR_C * kp;        // [C][kp]
    float* U = Wm + DR_C * kp;         // [C][W]: U, then Vn
    float* A = U + DR_C * DR_W;        // [C][C]: A, then QKᵀ ⊙ D
    float* gam = A + DR_C * DR_C;      // [C]
    float* bet = gam + DR_C;           // [C]
    const int n = blockIdx.x, col0 = blockIdx.y * DR_W, tid = threadIdx.x, nt = blockDim.x;
    const int kh = n / (nv / nk);
    const int width = min(DR_W, dv - col0);
    float* Sg = state + (size_t)n * dk * dv;
    for (int x = tid; x < dk * DR_W; x += nt) {
        int i = x / DR_W, j = x % DR_W;
        S[x] = j < width ? Sg[(size_t)i * dv + col0 + j] : 0.f;
    }
    for (int c0 = 0; c0 < T; c0 += DR_C) {
        const int c = min(DR_C, T - c0);
        __syncthreads();
        for (int x = tid; x < c * dk; x += nt) {
            int t = x / dk, i = x % dk;
            size_t src = ((size_t)(c0 + t) * nk + kh) * dk + i;
            Qc[t * kp + i] = q[src];
            Kc[t * kp + i] = k[src];
        }
        for (int x = tid; x < c * DR_W; x += nt) {
            int t = x / DR_W, j = x % DR_W;
            U[x] = j < width ? v[((size_t)(c0 + t) * nv + n) * dv + col0 + j] * beta[(size_t)(c0 + t) * nv + n] : 0.f;
        }
        if (tid < c) bet[tid] = beta[(size_t)(c0 + tid) * nv + n];
        if (tid == 0) {
            float acc = 0.f;
            for (int t = 0; t < c; ++t) {
                acc += g[(size_t)(c0 + t) * nv + n];
                gam[t] = acc;
            }
        }
        __syncthreads();
        for (int x = tid; x < c * dk; x += nt) {
            int t = x / dk, i = x % dk;
            Wm[t * kp + i] = bet[t] * expf(gam[t]) * Kc[t * kp + i];
        }
        for (int x = tid; x < c * c; x += nt) {
            int t = x / c, s = x % c;
            float a = 0.f;
            if (s < t) {
                for (int i = 0; i < dk; ++i) a += Kc[t * kp + i] * Kc[s * kp + i];
                a *= bet[t] * expf(gam[t] - gam[s]);
            }
            A[t * DR_C + s] = a;
        }
        __syncthreads();
        // Forward substitution, a thread per column of [Wm | U].
        for (int col = tid; col < dk + DR_W; col += nt) {
            float* base = col < dk ? Wm + col : U + (col - dk);
            const int stride = col < dk ? kp : DR_W;
            for (int t = 1; t < c; ++t) {
                float x = base[t * stride];
                for (int s = 0; s < t; ++s) x -= A[t * DR_C + s] * base[s * stride];
                base[t * stride] = x;
            }
        }
        __syncthreads();
        // Vn = U − Wm S, in place.
        for (int x = tid; x < c * DR_W; x += nt) {
            int t = x / DR_W, j = x % DR_W;
            float acc = U[x];
            for (int i = 0; i < dk; ++i) acc -= Wm[t * kp + i] * S[i * DR_W + j];
            U[x] = acc;
        }
        // (QKᵀ ⊙ D), lower triangle with the diagonal, into A.
        for (int x = tid; x < c * c; x += nt) {
            int t = x / c, s = x % c;
            float p = 0.f;
            if (s <= t) {
                for (int i = 0; i < dk; ++i) p += Qc[t * kp + i] * Kc[s * kp + i];
                p *= expf(gam[t] - gam[s]);
            }
            A[t * DR_C + s] = p;
        }
        __syncthreads();
        for (int x = tid; x < c * DR_W; x += nt) {
            int t = x / DR_W, j = x % DR_W;
            if (j >= width) continue;
            float inter = 0.f;
            for (int i = 0; i < dk; ++i) inter += Qc[t * kp + i] * S[i * DR_W + j];
            float acc = expf(gam[t]) * inter;
            for (int s = 0; s <= t; ++s) acc += A[t * DR_C + s] * U[s * DR_W + j];
            out[((size_t)(c0 + t) * nv + n) * dv + col0 + j] = acc;
        }
        const float last = gam[c - 1], el = expf(last);
        if (tid < c) bet[tid] = expf(last - gam[tid]);  // β is spent: bet now holds e^(γ_last − γ_s)
        __syncthreads();
        for (int x = tid; x < dk * DR_W; x += nt) {
            int i = x / DR_W, j = x % DR_W;
            float acc = el * S[x];
            for (int s = 0; s < c; ++s) acc += bet[s] * Kc[s * kp + i] * U[s * DR_W + j];
            S[x] = acc;
        }
    }
    __syncthreads();
    for (int x = tid; x < dk * DR_W; x += nt) {
        int i = x / DR_W, j = x % DR_W;
        if (j < width) Sg[(size_t)i * dv + col0 + j] = S[x];
    }
}

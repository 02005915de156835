#!/usr/bin/env python3
"""Checks and times the hand-written attention and GEMV kernels of crates/ops/kernels on a GPU,
straight from their .cu sources (CuPy's NVRTC), against PyTorch references in fp32/fp64.

Used while tuning (it needs no Rust build); `ollm bench ops` reports the same figures from the
engine itself. Run on the GPU machine from the repository root:
    python3 scripts/kernels/check_kernels.py [flash|decode|gemv ...]
"""
import math, sys, os
import torch, cupy

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
INC = os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/include"
dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = False


def module(name):
    src = open(os.path.join(ROOT, "crates/ops/kernels", name)).read()
    return cupy.RawModule(code=src, options=("-std=c++17", f"-I{INC}"), backend="nvrtc")


def ptr(t):
    return cupy.uint64(t.data_ptr())


def timed(fn, reps=20, warm=3, rounds=5):
    """Seconds per call: `reps` calls queued back to back between two events (so host launch
    latency stays hidden), median of `rounds` such batches."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record(); b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / reps)
    times.sort()
    return times[len(times) // 2]


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output (unwritten?)"
    return ((a - b).norm() / b.norm()).item()


def ref_attention(q, k, v, pos0, scale, window, sinks):
    """q [T,H,D] f32 (already bf16-rounded), k,v [n_kv,cap,D] -> [T,H,D], in float64."""
    T, H, D = q.shape
    n_kv = k.shape[0]
    G = H // n_kv
    L = pos0 + T
    kk = k[:, :L].double().repeat_interleave(G, 0)  # [H, L, D]
    vv = v[:, :L].double().repeat_interleave(G, 0)
    s = torch.einsum("thd,hld->htl", q.double(), kk) * scale
    p = torch.arange(T, device=dev)[:, None] + pos0
    j = torch.arange(L, device=dev)[None, :]
    vis = j <= p
    if window:
        vis &= j > p - window
    s = s.masked_fill(~vis[None], float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[:, None, None].expand(H, T, 1)], dim=2)
    a = torch.softmax(s, dim=2)[:, :, :L]
    return torch.einsum("htl,hld->thd", a, vv)


def bandwidth():
    n = 1 << 28  # 1 GiB
    src = torch.randn(n // 4, device=dev); dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), reps=10)
    return 2 * n / t


def gemm_peak():
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t = timed(lambda: a @ b, reps=10)
    return 2 * 8192**3 / t


FLASH_VARIANTS = {128: ["d128_m1_n64", "d128_m2_n32", "d128_m1_n32"], 64: ["d64_m1_n64", "d64_m2_n64"]}


def flash_launch(mod, name, q, k, v, out, pos0, scale, window, sinks):
    T, H, D = q.shape
    n_kv, cap, _ = k.shape
    mt, bn = int(name.split("_m")[1][0]), int(name.split("_n")[1])
    bm = 64 * mt
    f = mod.get_function("flash_prefill_" + name)
    smem = (bm + 4 * bn) * D * 2
    f.max_dynamic_shared_size_bytes = smem
    s = sinks if sinks is not None else q
    f((H, (T + bm - 1) // bm), (128,), (ptr(q), ptr(k), ptr(v), ptr(out), cupy.int32(T), cupy.int32(H),
       cupy.int32(n_kv), cupy.int32(cap), cupy.int32(pos0), cupy.float32(scale), cupy.int32(window or 0),
       ptr(s), cupy.int32(sinks is not None)), shared_mem=smem)


def flash():
    mod = module("flash_attn.cu")
    rows = []
    for D, names in FLASH_VARIANTS.items():
        for name in names:
            for (T, pos0, H, n_kv, window, with_sinks) in [(300, 0, 8, 2, 0, False), (200, 77, 4, 4, 0, True),
                                                              (333, 21, 6, 2, 37, True), (64, 0, 2, 1, 0, False)]:
                cap = pos0 + T + 5
                q = torch.randn(T, H, D, device=dev)
                k = torch.randn(n_kv, cap, D, device=dev).bfloat16()
                v = torch.randn(n_kv, cap, D, device=dev).bfloat16()
                sinks = torch.randn(H, device=dev) if with_sinks else None
                out = torch.full((T, H, D), float("nan"), device=dev)
                scale = D ** -0.5
                flash_launch(mod, name, q, k, v, out, pos0, scale, window, sinks)
                torch.cuda.synchronize()
                ref = ref_attention(q.bfloat16().float(), k.float(), v.float(), pos0, scale, window, sinks)
                e = rel(out, ref)
                ok = e < 1e-2
                print(f"flash {name} T={T} pos0={pos0} H={H}/{n_kv} W={window} sinks={with_sinks}: rel {e:.2e} {'ok' if ok else 'FAIL'}")
    # Speed: 32K causal, 32/8 heads, d=128.
    T, H, n_kv, D = 32768, 32, 8, 128
    q = torch.randn(T, H, D, device=dev)
    k = torch.randn(n_kv, T, D, device=dev).bfloat16()
    v = torch.randn(n_kv, T, D, device=dev).bfloat16()
    out = torch.empty(T, H, D, device=dev)
    flops = 4 * T * T * D * H / 2
    for name in FLASH_VARIANTS[128]:
        t = timed(lambda: flash_launch(mod, name, q, k, v, out, 0, D ** -0.5, 0, None), reps=5, warm=1)
        rows.append((f"flash {name} T=32768", t, flops / t / 1e12, "TFLOP/s"))
    # torch's own flash (bf16) for context
    qt = q.bfloat16().transpose(0, 1)[None]
    kt = k[None]; vt = v[None]
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    t = timed(fn, reps=5, warm=1)
    rows.append(("torch sdpa bf16 T=32768", t, flops / t / 1e12, "TFLOP/s"))
    return rows


def decode_launch(mod, q, k, v, out, pos0, scale, window, sinks, chunk=None, n_sm=132, suffix=""):
    T, H, D = q.shape
    n_kv, cap, _ = k.shape
    G = H // n_kv
    gb = max(x for x in (1, 2, 3, 4, 6, 8) if G % x == 0)
    groups = n_kv * (G // gb)
    span = min(pos0 + T, window) if window else pos0 + T
    if chunk is None:
        want = max(1, (2 * n_sm + groups * T - 1) // (groups * T))  # about one wave at 2 blocks per SM
        chunk = max(256, -(-span // want))
        chunk = -(-chunk // 64) * 64
    n_splits = -(-span // chunk)
    part = torch.empty(T * H * n_splits * (D + 2), device=dev)
    f = mod.get_function(f"decode_split_d{D}_g{gb}{suffix}")
    f((n_splits, groups, T), (128,), (ptr(q), ptr(k), ptr(v), ptr(part), cupy.int32(H), cupy.int32(n_kv),
       cupy.int32(cap), cupy.int32(pos0), cupy.float32(scale), cupy.int32(window or 0), cupy.int32(chunk)))
    c = mod.get_function("decode_combine")
    s = sinks if sinks is not None else q
    c((T * H,), (D,), (ptr(part), ptr(out), cupy.int32(H), cupy.int32(D), cupy.int32(n_splits), ptr(s),
       cupy.int32(sinks is not None)))
    return n_splits


def decode():
    mod = module("decode_attn.cu")
    rows = []
    for (T, pos0, H, n_kv, D, window, with_sinks) in [(1, 4999, 8, 2, 128, 0, False), (1, 700, 9, 3, 64, 0, True),
                                                      (3, 1000, 32, 4, 64, 128, True), (1, 300, 16, 2, 256, 0, False),
                                                      (2, 50, 4, 4, 32, 0, False), (1, 20, 4, 1, 16, 0, True)]:
        cap = pos0 + T + 3
        q = torch.randn(T, H, D, device=dev)
        k = torch.randn(n_kv, cap, D, device=dev).bfloat16()
        v = torch.randn(n_kv, cap, D, device=dev).bfloat16()
        sinks = torch.randn(H, device=dev) if with_sinks else None
        out = torch.full((T, H, D), float("nan"), device=dev)
        decode_launch(mod, q, k, v, out, pos0, D ** -0.5, window, sinks)
        torch.cuda.synchronize()
        e = rel(out, ref_attention(q, k.float(), v.float(), pos0, D ** -0.5, window, sinks))
        print(f"decode T={T} pos0={pos0} H={H}/{n_kv} D={D} W={window} sinks={with_sinks}: rel {e:.2e} {'ok' if e < 1e-5 else 'FAIL'}")
    L, H, n_kv, D = 32768, 32, 8, 128
    q = torch.randn(1, H, D, device=dev)
    ks = [torch.randn(n_kv, L, D, device=dev).bfloat16() for _ in range(4)]
    vs = [torch.randn(n_kv, L, D, device=dev).bfloat16() for _ in range(4)]
    out = torch.empty(1, H, D, device=dev)
    for chunk, suffix in ((None, ""), (512, ""), (2048, "")):
        i = [0]
        def step():
            i[0] = (i[0] + 1) % 4
            return decode_launch(mod, q, ks[i[0]], vs[i[0]], out, L - 1, D ** -0.5, 0, None, chunk, suffix=suffix)
        t = timed(step, reps=40)
        rows.append((f"decode{suffix} attn ctx=32768 splits={step()}", t, 2 * n_kv * L * D * 2 / t / 1e9, "GB/s"))
    return rows


def gemv_launch(mod, x, w, out, variant="gemv"):
    T, K = x.shape
    N = w.shape[0]
    tt = next(t for t in (1, 2, 4, 8) if t >= T)
    f = mod.get_function(f"{variant}_{'bf16' if w.dtype == torch.bfloat16 else 'f16'}_t{tt}")
    f((N,), (128,), (ptr(x), ptr(w), ptr(out), cupy.int32(T), cupy.int32(N), cupy.int32(K)))


def gemv():
    mod = module("gemv.cu")
    rows = []
    for (T, N, K, dt) in [(1, 1000, 4096, torch.bfloat16), (3, 333, 576, torch.bfloat16), (8, 130, 1536, torch.float16),
                          (5, 77, 8, torch.bfloat16)]:
        x = torch.randn(T, K, device=dev); w = torch.randn(N, K, device=dev).to(dt)
        for variant in ("gemv",):
            out = torch.full((T, N), float("nan"), device=dev)
            gemv_launch(mod, x, w, out, variant); torch.cuda.synchronize()
            e = rel(out, x.double() @ w.double().T)
            print(f"{variant} T={T} N={N} K={K} {dt}: rel {e:.2e} {'ok' if e < 1e-5 else 'FAIL'}")
    N, K = 14336, 4096
    for variant in ("gemv",):
        for (n, k) in ((N, K), (K, N)):
            ws = [torch.randn(n, k, device=dev).bfloat16() for _ in range(8)]
            x = torch.randn(1, k, device=dev); out = torch.empty(1, n, device=dev)
            i = [0]
            def step():
                i[0] = (i[0] + 1) % 8
                gemv_launch(mod, x, ws[i[0]], out, variant)
            t = timed(step, reps=40)
            rows.append((f"{variant} 1x{k} . {n}x{k}", t, (n * k * 2 + k * 4 + n * 4) / t / 1e9, "GB/s"))
    return rows


if __name__ == "__main__":
    which = sys.argv[1:] or ["gemv", "decode", "flash"]
    print(torch.cuda.get_device_name(), torch.__version__)
    bw, peak = bandwidth(), gemm_peak()
    rows = []
    for w in which:
        rows += globals()[w]()
    print(f"\nbounds: d2d copy {bw / 1e9:.0f} GB/s, cuBLAS bf16 8192^3 {peak / 1e12:.0f} TFLOP/s")
    for name, t, fig, unit in rows:
        bound = bw / 1e9 if unit == "GB/s" else peak / 1e12
        print(f"{name:45s} {t * 1e6:10.1f} us {fig:9.1f} {unit:8s} {100 * fig / bound:5.1f}% of bound")

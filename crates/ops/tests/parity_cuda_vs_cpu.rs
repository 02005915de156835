//! Every CUDA kernel against its CPU twin on random inputs, outputs poisoned before each run.
//! The inputs come from a seed printed by a failing test; `OLLM_TEST_SEED=<seed>` draws them
//! again (tests/common/seed.rs). On a machine without a usable GPU each test checks that
//! probing fails with one clear line and prints SKIPPED, or fails under `OLLM_REQUIRE_GPU`
//! (tests/common/gpu.rs).
//!
//! Tolerances (‖gpu − cpu‖ / ‖cpu‖ unless said otherwise):
//! * copies and conversions (embedding, add, write_kv, f32→bf16/f16): exact;
//! * f32 math on the same inputs (small-T matmul, SGEMM, rmsnorm, rope, silu, attention with
//!   bf16-valued K/V): 1e-5, only the summation order differs;
//! * cuBLAS with bf16/f16 weights against the CPU fed the same narrowed activations: 1e-4
//!   (summation order and tensor-core accumulation only);
//! * the same against the CPU on the raw f32 activations: 4e-3 for bf16 (x rounded to 8
//!   mantissa bits: about 2⁻⁹/√3 ≈ 1.1e-3 relative per element) and 1e-3 for f16 (11 bits);
//! * flash prefill attention against the CPU on the same bf16-rounded q: 1e-2 — the kernel
//!   also rounds the softmax probabilities to bf16 before P·V (measured ≈1.2e-3 on an H100);
//!   the same for the wgmma kernel (compute capability 9.0), against the CPU and against the
//!   mma.sync kernel (both round P, at different points of the online softmax);
//! * tree attention (its own reference-form kernel): 1e-5, as attention;
//! * split-context decode attention and the GEMV: 1e-5 (f32 math, only the order differs);
//! * the fused decode ops (GEMV + residual add, gate/up GEMV + SiLU·mul, RMSNorm + Q/K/V,
//!   RMSNorm + gate/up, RoPE + KV append) against the CPU's composed ops: 1e-5 as the GEMV
//!   (bf16 caches: 4e-3, bf16 rounding); against the CUDA backend's own composed ops: exact
//!   (the fused kernels sum as the plain kernels do); the `_step` kernels against their plain
//!   forms at the shifted position: exact;
//! * clamped SwiGLU: 1e-6 (f32 math, only `expf` against Rust's `exp` differs); gated RMSNorm:
//!   1e-5 like rmsnorm;
//! * router top-k: expert ids exact (both backends compare the same f32 logits), weights within
//!   2e-6 absolute (they are ≤ 1; `expf` and the order of the sum over all E differ, a few ulp).

#![cfg(feature = "cuda")]

mod common;

use std::cmp::Ordering;

use common::{device, le_bytes, random, rounded};
use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use ollm_ops::cpu::{self, CpuBackend};
use ollm_ops::cuda::{self, CudaBackend, CudaDevice, CudaStorage};
use ollm_ops::{
    Backend, Compute, CpuStorage, DType, FusedOps, HostTensor, Memory, MoeOps, NormKind, RouterMode, Tensor,
};

/// ‖a − b‖ / ‖b‖
/// The tolerance of the backend's matmul against the CPU twin for `t` rows of 16-bit weights
/// `wt`: the GEMV and small-T kernels keep x in f32 (1e-5); from `CUBLAS_MIN_ROWS` rows, x is
/// narrowed to the weight dtype before cuBLAS (see `cuda::matmul`), so the error is that
/// rounding's: about 2^-9 relative for bf16, 2^-12 for f16.
fn matmul_tolerance(wt: DType, t: usize) -> f64 {
    match (t >= cuda::matmul::CUBLAS_MIN_ROWS, wt) {
        (false, _) => 1e-5,
        (true, DType::BF16) => 5e-3,
        (true, _) => 1e-3,
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn backend() -> Option<CudaBackend> {
    // The fused decode and grouped MoE kernels are opt-in in the engine; their parity is tested
    // always.
    device().map(CudaBackend::new).inspect(|b| {
        b.set_fused_ops(true);
        b.set_grouped_experts(true);
    })
}

fn up<T: cudarc::driver::DeviceRepr>(dev: &CudaDevice, v: &[T]) -> CudaSlice<T> {
    dev.stream.clone_htod(v).expect("upload")
}

/// A device buffer of n NaNs, so unwritten outputs show.
fn poisoned(dev: &CudaDevice, n: usize) -> CudaSlice<f32> {
    up(dev, &vec![f32::NAN; n])
}

fn down(dev: &CudaDevice, s: &CudaSlice<f32>) -> Vec<f32> {
    let v = dev.stream.clone_dtoh(s).expect("download");
    assert!(v.iter().all(|x| x.is_finite()), "unwritten or non-finite outputs");
    v
}

fn bf16s(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|x| bf16::from_f32(*x)).collect()
}

/// Host bytes of `v` stored as `dtype`.
fn host(dtype: DType, shape: Vec<usize>, v: &[f32]) -> HostTensor {
    HostTensor { dtype, shape, bytes: le_bytes(dtype, v) }
}

/// Device storage of `v` as `dtype`.
fn stored(dev: &CudaDevice, dtype: DType, v: &[f32]) -> CudaStorage {
    match dtype {
        DType::F32 => CudaStorage::F32(dev.upload(v, "test").expect("upload")),
        DType::F16 => {
            CudaStorage::F16(dev.upload(&v.iter().map(|x| f16::from_f32(*x)).collect::<Vec<_>>(), "test").expect("up"))
        }
        DType::BF16 => CudaStorage::BF16(dev.upload(&bf16s(v), "test").expect("upload")),
        DType::U8 => panic!("U8 holds packed bytes, not numbers"),
    }
}

fn cpu_storage(dtype: DType, v: &[f32]) -> CpuStorage {
    match dtype {
        DType::F32 => CpuStorage::F32(v.to_vec()),
        DType::F16 => CpuStorage::F16(v.iter().map(|x| f16::from_f32(*x)).collect()),
        DType::BF16 => CpuStorage::BF16(bf16s(v)),
        DType::U8 => panic!("U8 holds packed bytes, not numbers"),
    }
}

const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

#[test]
fn elementwise_ops_match_cpu() {
    let Some(dev) = device() else { return };
    // embedding, every table dtype
    let (vocab, hidden) = (300, 96);
    let ids: Vec<u32> = random(11, 1.0).iter().map(|x| ((x.abs() * 1e4) as u32) % vocab as u32).collect();
    for dtype in DTYPES {
        let table = random(vocab * hidden, 1.0);
        let mut want = vec![0.0; ids.len() * hidden];
        cpu::embedding(&cpu_storage(dtype, &table), hidden, &ids, &mut want);
        let mut out = poisoned(&dev, want.len());
        cuda::elementwise::embedding(&dev, &stored(&dev, dtype, &table), &up(&dev, &ids), hidden, &mut out)
            .expect("embedding");
        assert_eq!(down(&dev, &out), want, "embedding ({dtype}) is a copy: exact");
    }
    // silu_mul
    let (g, u) = (random(5000, 6.0), random(5000, 2.0));
    let mut want = vec![0.0; 5000];
    cpu::silu_mul(&g, &u, &mut want);
    let mut out = poisoned(&dev, 5000);
    cuda::elementwise::silu_mul(&dev, &up(&dev, &g), &up(&dev, &u), &mut out).expect("silu_mul");
    let e = rel_err(&down(&dev, &out), &want);
    assert!(e < 1e-6, "silu_mul rel err {e:e}");
    // gelu_tanh_mul (Gemma's MLP): tanhf vs Rust's tanh, a few ulp
    let (g, u) = (random(5000, 6.0), random(5000, 2.0));
    let mut want = vec![0.0; 5000];
    cpu::gelu_tanh_mul(&g, &u, &mut want);
    let mut out = poisoned(&dev, 5000);
    cuda::elementwise::gelu_tanh_mul(&dev, &up(&dev, &g), &up(&dev, &u), &mut out).expect("gelu_tanh_mul");
    let e = rel_err(&down(&dev, &out), &want);
    assert!(e < 1e-6, "gelu_tanh_mul rel err {e:e}");
    // scale (Gemma's embedding scale √hidden): one f32 multiply, exact
    let x = random(1234, 3.0);
    let want: Vec<f32> = x.iter().map(|v| v * 25.298_222).collect();
    let mut xd = up(&dev, &x);
    cuda::elementwise::scale(&dev, &mut xd, 25.298_222).expect("scale");
    assert_eq!(down(&dev, &xd), want, "scale is exact");
    // softcap (Gemma's logit softcapping at 30), inputs well past the cap
    let x = random(4321, 120.0);
    let mut want = x.clone();
    cpu::softcap(&mut want, 30.0);
    let mut xd = up(&dev, &x);
    cuda::elementwise::softcap(&dev, &mut xd, 30.0).expect("softcap");
    let e = rel_err(&down(&dev, &xd), &want);
    assert!(e < 1e-6, "softcap rel err {e:e}");
    // add_assign
    let (x, y) = (random(777, 1.0), random(777, 1.0));
    let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
    let mut xd = up(&dev, &x);
    cuda::elementwise::add_assign(&dev, &mut xd, &up(&dev, &y)).expect("add");
    assert_eq!(down(&dev, &xd), want, "add is exact");
    // add_bias, every bias dtype: out [7, 45] += b [45]
    for dtype in DTYPES {
        let (t, n) = (7, 45);
        let (x, b) = (random(t * n, 1.0), random(n, 1.0));
        let bq = rounded(&b, dtype);
        let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + bq[i % n]).collect();
        let mut xd = up(&dev, &x);
        cuda::elementwise::add_bias(&dev, &mut xd, &stored(&dev, dtype, &b), n).expect("add_bias");
        assert_eq!(down(&dev, &xd), want, "add_bias ({dtype}) is exact");
    }
    // write_kv: [T=3, n_kv=2, d=4] f32 into a bf16 cache [2, 8, 4] at position 5, rounded to
    // nearest even; the rest stays as it was.
    let (t, n_kv, cap, d, pos0) = (3, 2, 8, 4, 5);
    let src = random(t * n_kv * d, 1.0);
    let before = bf16s(&random(n_kv * cap * d, 1.0));
    let mut want = before.clone();
    for ti in 0..t {
        for h in 0..n_kv {
            for c in 0..d {
                want[(h * cap + pos0 + ti) * d + c] = bf16::from_f32(src[(ti * n_kv + h) * d + c]);
            }
        }
    }
    let mut cache = up(&dev, &before);
    let g = cuda::elementwise::KvGeometry { n_kv, cap, d };
    cuda::elementwise::write_kv(&dev, &mut cache, &up(&dev, &src), g, pos0).expect("write_kv");
    let got = dev.stream.clone_dtoh(&cache).expect("download");
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "write_kv: bf16 bits differ");
    assert!(cuda::elementwise::write_kv(&dev, &mut cache, &up(&dev, &src), g, 6).is_err(), "past the capacity");
}

#[test]
fn narrowing_matches_half_bit_for_bit() {
    let Some(dev) = device() else { return };
    // Random values over a wide range plus the rounding edge cases.
    let mut x = random(10_000, 300.0);
    x.extend([0.0, -0.0, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, 65504.0, 1e-8, -7.5e-6]);
    for dtype in [DType::BF16, DType::F16] {
        let mut y = up(&dev, &vec![0xffffu16; x.len()]);
        cuda::convert::f32_to_16bit(&dev, &up(&dev, &x), &mut y, dtype).expect("convert");
        let got = dev.stream.clone_dtoh(&y).expect("download");
        let want: Vec<u16> = match dtype {
            DType::BF16 => x.iter().map(|v| bf16::from_f32(*v).to_bits()).collect(),
            _ => x.iter().map(|v| f16::from_f32(*v).to_bits()).collect(),
        };
        let bad = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(bad.is_none(), "{dtype}: element {bad:?} of {:?} differs", bad.map(|i| x[i]));
    }
}

/// The CPU twin of `out = x · wᵀ (+ b)` with w stored as `dtype`.
fn cpu_matmul(x: &[f32], t: usize, k: usize, w: &[f32], n: usize, dtype: DType, bias: Option<&[f32]>) -> Vec<f32> {
    let mut want = vec![0.0; t * n];
    cpu::matmul(x, t, k, &cpu_storage(dtype, w), n, bias, &mut want);
    want
}

#[test]
fn small_t_matmul_matches_cpu_for_every_weight_dtype() {
    let Some(dev) = device() else { return };
    for dtype in DTYPES {
        for &(t, k, n) in &[(1usize, 576usize, 1536usize), (3, 100, 33), (15, 256, 520), (17, 64, 9)] {
            let (x, w) = (random(t * k, 1.0), random(n * k, 0.2));
            let want = cpu_matmul(&x, t, k, &w, n, dtype, None);
            let mut out = poisoned(&dev, t * n);
            cuda::matmul::matmul_small(&dev, &up(&dev, &x), &stored(&dev, dtype, &w), n, k, &mut out).expect("matmul");
            let e = rel_err(&down(&dev, &out), &want);
            assert!(e < 1e-5, "small matmul {dtype} t={t} k={k} n={n}: rel err {e:e}");
        }
    }
}

#[test]
fn cublas_matmul_matches_cpu_for_every_weight_dtype() {
    let Some(dev) = device() else { return };
    for dtype in DTYPES {
        for &(t, k, n) in
            &[(64usize, 576usize, 1536usize), (17, 100, 33), (16, 4096, 257), (3, 128, 64), (200, 96, 1000)]
        {
            let (x, w) = (random(t * k, 1.0), random(n * k, 0.2));
            let mut out = poisoned(&dev, t * n);
            cuda::matmul::matmul_cublas(&dev, &up(&dev, &x), &stored(&dev, dtype, &w), n, k, &mut out).expect("matmul");
            let got = down(&dev, &out);
            // Against the CPU fed what cuBLAS multiplies: x narrowed to the weight dtype.
            let same_inputs = rel_err(&got, &cpu_matmul(&rounded(&x, dtype), t, k, &w, n, dtype, None));
            let raw = rel_err(&got, &cpu_matmul(&x, t, k, &w, n, dtype, None));
            let (tol_same, tol_raw) = match dtype {
                DType::BF16 => (1e-4, 4e-3),
                DType::F16 => (1e-4, 1e-3),
                DType::F32 | DType::U8 => (1e-5, 1e-5),
            };
            eprintln!(
                "cublas {dtype} t={t} k={k} n={n}: rel err {same_inputs:.2e} (same inputs), {raw:.2e} (raw f32 x)"
            );
            assert!(same_inputs < tol_same, "cublas {dtype} t={t} k={k} n={n}: rel err {same_inputs:e}");
            assert!(raw < tol_raw, "cublas {dtype} t={t} k={k} n={n}: rel err {raw:e} against raw f32");
        }
    }
}

/// Backend::matmul dispatches on T (kernel below 16 rows, cuBLAS from 16) and adds biases of
/// any dtype; checked through both backends' trait with the same stored tensors.
#[test]
fn backend_matmul_with_bias_matches_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    for (wt, bt) in
        [(DType::BF16, DType::F32), (DType::BF16, DType::BF16), (DType::F16, DType::F16), (DType::F32, DType::F32)]
    {
        for &t in &[1usize, 15, 16, 40] {
            let (k, n) = (192, 72);
            let x = random(t * k, 1.0);
            let w = host(wt, vec![n, k], &random(n * k, 0.2));
            let b = host(bt, vec![n], &random(n, 1.0));
            let mut want = cpu.zeros(vec![t, n]).expect("cpu out");
            let xc = cpu.upload_f32(vec![t, k], &x).expect("x");
            let (wc, bc) = (cpu.upload(&w).expect("w"), cpu.upload(&b).expect("b"));
            cpu.matmul(&xc, &wc, Some(&bc), &mut want).expect("cpu matmul");
            let want = cpu.to_host_f32(&want).expect("want");

            let mut out = gpu.upload_f32(vec![t, n], &vec![f32::NAN; t * n]).expect("poisoned");
            let xg = gpu.upload_f32(vec![t, k], &x).expect("x");
            let (wg, bg) = (gpu.upload(&w).expect("w"), gpu.upload(&b).expect("b"));
            gpu.matmul(&xg, &wg, Some(&bg), &mut out).expect("gpu matmul");
            let got = gpu.to_host_f32(&out).expect("got");
            assert!(got.iter().all(|v| v.is_finite()), "unwritten outputs");
            let e = rel_err(&got, &want);
            let tol = if t >= cuda::matmul::CUBLAS_MIN_ROWS && wt != DType::F32 { 4e-3 } else { 1e-5 };
            eprintln!("backend matmul w {wt} bias {bt} t={t}: rel err {e:.2e}");
            assert!(e < tol, "backend matmul w {wt} bias {bt} t={t}: rel err {e:e} (tolerance {tol:e})");
        }
    }
    // A bias of the wrong length is a shape error, not a crash.
    let x = gpu.upload_f32(vec![2, 8], &random(16, 1.0)).expect("x");
    let w = gpu.upload(&host(DType::BF16, vec![4, 8], &random(32, 1.0))).expect("w");
    let b = gpu.upload_f32(vec![5], &random(5, 1.0)).expect("b");
    let mut out = gpu.zeros(vec![2, 4]).expect("out");
    assert!(gpu.matmul(&x, &w, Some(&b), &mut out).is_err());
}

#[test]
fn rope_matches_cpu() {
    let Some(dev) = device() else { return };
    for &(t, heads, d, r, pos0) in
        &[(5usize, 4usize, 64usize, 64usize, 0usize), (3, 2, 256, 64, 17), (1, 8, 128, 128, 99)]
    {
        let positions = 128;
        let (cos, sin) = (random(positions * r / 2, 1.0), random(positions * r / 2, 1.0));
        let x = random(t * heads * d, 2.0);
        let mut want = x.clone();
        cpu::rope(&mut want, heads, d, r, &cos, &sin, pos0);
        let mut xd = up(&dev, &x);
        cuda::rope::rope(&dev, &mut xd, heads, d, r, &up(&dev, &cos), &up(&dev, &sin), pos0).expect("rope");
        let e = rel_err(&down(&dev, &xd), &want);
        assert!(e < 1e-6, "rope t={t} d={d} r={r}: rel err {e:e}");
    }
}

#[test]
fn attention_matches_cpu() {
    let Some(dev) = device() else { return };
    // (T, n_heads, n_kv, d, cap, pos0, window, sinks)
    let cases = [
        (7usize, 4usize, 2usize, 64usize, 16usize, 0usize, None, false),
        (1, 8, 2, 128, 300, 250, None, false),
        (5, 4, 1, 64, 40, 20, Some(4usize), true),
        (3, 2, 2, 256, 9, 6, None, true),
    ];
    for (t, nh, nkv, d, cap, pos0, window, with_sinks) in cases {
        let q = random(t * nh * d, 1.0);
        // The cache is bf16 on the GPU: the CPU twin gets the same (bf16-valued) numbers.
        let k = rounded(&random(nkv * cap * d, 1.0), DType::BF16);
        let v = rounded(&random(nkv * cap * d, 1.0), DType::BF16);
        let sinks = random(nh, 2.0);
        let scale = (d as f32).powf(-0.5);
        let geo = cpu::AttnGeometry { n_heads: nh, n_kv: nkv, d, cap, pos0 };
        let mut want = vec![0.0; q.len()];
        cpu::attention(&q, &k, &v, &geo, scale, window, with_sinks.then_some(&sinks[..]), &mut want);
        let g = cuda::attention::AttnGeometry { n_heads: nh, n_kv: nkv, d, cap, pos0 };
        let sinks_d = up(&dev, &sinks);
        let mut out = poisoned(&dev, q.len());
        let s = with_sinks.then_some(&sinks_d);
        let (kd, vd) = (up(&dev, &bf16s(&k)), up(&dev, &bf16s(&v)));
        cuda::attention::attention(&dev, &up(&dev, &q), &kd, &vd, g, scale, window, s, &mut out).expect("attention");
        let e = rel_err(&down(&dev, &out), &want);
        assert!(e < 1e-5, "attention t={t} d={d} pos0={pos0} window={window:?}: rel err {e:e}");
        eprintln!(
            "attention t={t} nh={nh} nkv={nkv} d={d} pos0={pos0} window={window:?} sinks={with_sinks}: rel err {e:.2e}"
        );
    }
}

/// Tree attention (speculative decoding's tree verification) against its CPU twin on random
/// trees drawn from the printed seed: node i's parent is one of the nodes before it or none;
/// more than 32 nodes take a second word of ancestor bits. 1e-5, as the reference attention.
#[test]
fn tree_attention_matches_cpu() {
    let Some(dev) = device() else { return };
    // (nodes, n_heads, n_kv, d, pos0, window, sinks)
    let cases = [
        (7usize, 4usize, 2usize, 64usize, 0usize, None, false),
        (12, 8, 2, 128, 250, None, true),
        (40, 4, 1, 64, 30, Some(6usize), true),
        (5, 2, 2, 256, 9, Some(12), false),
    ];
    for (t, nh, nkv, d, pos0, window, with_sinks) in cases {
        let draws = random(t, 1.0);
        let parents: Vec<Option<usize>> = draws
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.abs() * (i + 1) as f32) as usize).min(i).checked_sub(1))
            .collect();
        let tree = ollm_ops::TreeMask::new(&parents).expect("parents come first");
        let cap = pos0 + t + 3;
        let q = random(t * nh * d, 1.0);
        // The cache is bf16 on the GPU: the CPU twin gets the same (bf16-valued) numbers.
        let k = rounded(&random(nkv * cap * d, 1.0), DType::BF16);
        let v = rounded(&random(nkv * cap * d, 1.0), DType::BF16);
        let sinks = random(nh, 2.0);
        let scale = (d as f32).powf(-0.5);
        let geo = cpu::AttnGeometry { n_heads: nh, n_kv: nkv, d, cap, pos0 };
        let s_cpu = with_sinks.then_some(&sinks[..]);
        let mut want = vec![0.0; q.len()];
        cpu::tree_attention(&q, &k, &v, &geo, &tree, scale, window, s_cpu, &mut want);
        let g = cuda::attention::AttnGeometry { n_heads: nh, n_kv: nkv, d, cap, pos0 };
        let sinks_d = up(&dev, &sinks);
        let mut out = poisoned(&dev, q.len());
        let s = with_sinks.then_some(&sinks_d);
        let (kd, vd) = (up(&dev, &bf16s(&k)), up(&dev, &bf16s(&v)));
        cuda::tree_attention::tree_attention(&dev, &up(&dev, &q), &kd, &vd, g, &tree, scale, window, s, &mut out)
            .expect("tree attention");
        let e = rel_err(&down(&dev, &out), &want);
        eprintln!("tree attention {parents:?} nh={nh} nkv={nkv} d={d} pos0={pos0} window={window:?}: rel err {e:.2e}");
        assert!(e < 1e-5, "tree attention t={t} d={d} pos0={pos0} window={window:?}: rel err {e:e}");
    }
}

#[test]
fn gemv_matches_cpu() {
    let Some(dev) = device() else { return };
    for dtype in [DType::BF16, DType::F16] {
        for &(t, k, n) in &[(1usize, 576usize, 1536usize), (3, 4096, 100), (8, 64, 33), (5, 8, 7), (2, 14336, 40)] {
            let (x, w) = (random(t * k, 1.0), random(n * k, 0.2));
            let want = cpu_matmul(&x, t, k, &w, n, dtype, None);
            let mut out = poisoned(&dev, t * n);
            let xd = up(&dev, &x);
            match stored(&dev, dtype, &w) {
                CudaStorage::BF16(wd) => cuda::gemv::gemv(&dev, &xd, &wd, n, k, &mut out),
                CudaStorage::F16(wd) => cuda::gemv::gemv(&dev, &xd, &wd, n, k, &mut out),
                CudaStorage::F32(_) | CudaStorage::U8(_) => panic!("stored() gave f32 for {dtype}"),
            }
            .expect("gemv");
            let e = rel_err(&down(&dev, &out), &want);
            assert!(e < 1e-5, "gemv {dtype} t={t} k={k} n={n}: rel err {e:e}");
        }
    }
}

/// One attention case for the fast kernels: (T, n_heads, n_kv, d, pos0, window, sinks).
type AttnCase = (usize, usize, usize, usize, usize, Option<usize>, bool);

/// A fast attention launcher: (q, k, v, geometry, scale, sinks, out) → whether it covered the case.
type AttnLaunch<'a> = &'a dyn Fn(
    &CudaSlice<f32>,
    &CudaSlice<bf16>,
    &CudaSlice<bf16>,
    cuda::attention::AttnGeometry,
    f32,
    Option<&CudaSlice<f32>>,
    &mut CudaSlice<f32>,
) -> bool;

/// Runs `launch` (a fast attention launcher) on fresh random inputs against the CPU twin fed
/// the same bf16 K/V (and q rounded to bf16 when `round_q`); returns the relative error.
fn fast_attention_err(dev: &CudaDevice, case: AttnCase, round_q: bool, launch: AttnLaunch<'_>) -> f64 {
    let (t, nh, nkv, d, pos0, window, with_sinks) = case;
    let cap = pos0 + t + 3;
    let q = random(t * nh * d, 1.0);
    let k = rounded(&random(nkv * cap * d, 1.0), DType::BF16);
    let v = rounded(&random(nkv * cap * d, 1.0), DType::BF16);
    let sinks = random(nh, 2.0);
    let scale = (d as f32).powf(-0.5);
    let geo = cpu::AttnGeometry { n_heads: nh, n_kv: nkv, d, cap, pos0 };
    let q_cpu = if round_q { rounded(&q, DType::BF16) } else { q.clone() };
    let mut want = vec![0.0; q.len()];
    cpu::attention(&q_cpu, &k, &v, &geo, scale, window, with_sinks.then_some(&sinks[..]), &mut want);
    let g = cuda::attention::AttnGeometry { n_heads: nh, n_kv: nkv, d, cap, pos0 };
    let sinks_d = up(dev, &sinks);
    let mut out = poisoned(dev, q.len());
    let (kd, vd) = (up(dev, &bf16s(&k)), up(dev, &bf16s(&v)));
    assert!(launch(&up(dev, &q), &kd, &vd, g, scale, with_sinks.then_some(&sinks_d), &mut out), "{case:?} not covered");
    rel_err(&down(dev, &out), &want)
}

#[test]
fn flash_prefill_matches_cpu() {
    let Some(dev) = device() else { return };
    let cases: [AttnCase; 7] = [
        (300, 8, 2, 128, 0, None, false),
        (200, 4, 4, 128, 77, None, true),
        (333, 6, 2, 128, 21, Some(37), true),
        (64, 2, 1, 64, 0, None, false),
        (129, 9, 3, 64, 5, None, false),
        (257, 4, 2, 64, 300, Some(100), true),
        (5, 4, 2, 128, 0, None, false),
    ];
    for case in cases {
        let e = fast_attention_err(&dev, case, true, &|q, k, v, g, scale, s, out| {
            cuda::flash::flash_prefill(&dev, q, k, v, g, scale, case.5, s, out).expect("flash")
        });
        eprintln!("flash {case:?}: rel err {e:.2e}");
        assert!(e < 1e-2, "flash {case:?}: rel err {e:e}");
        let e = fast_attention_err(&dev, case, true, &|q, k, v, g, scale, s, out| {
            cuda::flash::flash_prefill_mma(&dev, q, k, v, g, scale, case.5, s, out).expect("mma flash")
        });
        eprintln!("flash (mma.sync) {case:?}: rel err {e:.2e}");
        assert!(e < 1e-2, "flash (mma.sync) {case:?}: rel err {e:e}");
    }
}

/// The wgmma kernel (compute capability 9.0 only), every compiled variant, against the CPU twin
/// and against the mma.sync kernel on the same inputs: T not a multiple of the 128-row block or
/// of the key tile, a prefix (pos0 > 0), windows narrower and wider than a tile, sinks, GQA
/// groups of 1 to 4, rings that wrap many times (T = 1100: 9 to 18 key tiles).
#[test]
fn flash_prefill_sm90_matches_cpu_and_the_mma_kernel() {
    let Some(dev) = device() else { return };
    if dev.info.compute_capability != (9, 0) {
        eprintln!(
            "SKIPPED: {}: the wgmma kernel needs compute capability 9.0 (this device: {}.{})",
            common::gpu::test_name(),
            dev.info.compute_capability.0,
            dev.info.compute_capability.1
        );
        return;
    }
    let cases: [AttnCase; 10] = [
        (300, 8, 2, 128, 0, None, false),
        (200, 4, 4, 128, 77, None, true),
        (333, 6, 2, 128, 21, Some(37), true),
        (1100, 4, 1, 128, 200, None, false),
        (1100, 4, 2, 128, 0, Some(300), true),
        (5, 4, 2, 128, 0, None, false),
        (64, 2, 1, 64, 0, None, false),
        (129, 9, 3, 64, 5, None, false),
        (257, 4, 2, 64, 300, Some(100), true),
        (1100, 8, 2, 64, 3, None, true),
    ];
    for case in cases {
        for var in cuda::flash_sm90::SM90_VARIANTS.iter().filter(|v| v.d == case.3) {
            let [(cpu_rel, cpu_max), (mma_rel, mma_max)] =
                attention_vs_cpu_and_mma(&dev, case, &|q, k, v, g, scale, s, out| {
                    cuda::flash_sm90::flash_prefill_sm90(&dev, q, k, v, g, scale, case.5, s, out, Some(*var))
                        .expect("sm90 flash")
                });
            eprintln!(
                "sm90 {} {case:?}: vs cpu rel {cpu_rel:.2e} max {cpu_max:.2e}; vs mma rel {mma_rel:.2e} max {mma_max:.2e}",
                var.entry()
            );
            assert!(cpu_rel < 1e-2, "sm90 {} {case:?}: rel err {cpu_rel:e} against the CPU", var.entry());
            assert!(mma_rel < 1e-2, "sm90 {} {case:?}: rel err {mma_rel:e} against the mma kernel", var.entry());
        }
    }
}

/// The wgmma products alone (the kernel's diagnostic entry points): S = bf16(Q)·Kᵀ against an
/// f64 CPU product (1e-5: f32 accumulation of exact bf16 products), O = bf16(S)·V against the
/// CPU fed the GPU's own S rounded to bf16 (1e-5). The first wrong element is printed, so a
/// broken descriptor shows which operand and which rows or columns it scrambles.
#[test]
fn flash_sm90_wgmma_products_match_cpu() {
    let Some(dev) = device() else { return };
    if dev.info.compute_capability != (9, 0) {
        eprintln!("SKIPPED: {}: wgmma needs compute capability 9.0", common::gpu::test_name());
        return;
    }
    for (d, bn) in [(128, 128), (128, 64), (64, 128), (64, 64)] {
        let q = rounded(&random(64 * d, 1.0), DType::BF16);
        let k = rounded(&random(bn * d, 1.0), DType::BF16);
        let v = rounded(&random(bn * d, 1.0), DType::BF16);
        let (mut s_d, mut o_d) = (poisoned(&dev, 64 * bn), poisoned(&dev, 64 * d));
        cuda::flash_sm90::wgmma_probe(
            &dev,
            d,
            bn,
            &up(&dev, &q),
            &up(&dev, &bf16s(&k)),
            &up(&dev, &bf16s(&v)),
            &mut s_d,
            &mut o_d,
        )
        .expect("wgmma probe");
        let (s, o) = (down(&dev, &s_d), down(&dev, &o_d));
        let s_want: Vec<f32> = (0..64 * bn)
            .map(|i| {
                (0..d).map(|c| f64::from(q[(i / bn) * d + c]) * f64::from(k[(i % bn) * d + c])).sum::<f64>() as f32
            })
            .collect();
        let p = rounded(&s, DType::BF16);
        let o_want: Vec<f32> = (0..64 * d)
            .map(|i| (0..bn).map(|j| f64::from(p[(i / d) * bn + j]) * f64::from(v[j * d + i % d])).sum::<f64>() as f32)
            .collect();
        let first_bad = |got: &[f32], want: &[f32], cols: usize| {
            got.iter()
                .zip(want)
                .position(|(a, b)| (a - b).abs() > 1e-3 * (1.0 + b.abs()))
                .map(|i| (i / cols, i % cols, got[i], want[i]))
        };
        let (es, eo) = (rel_err(&s, &s_want), rel_err(&o, &o_want));
        eprintln!(
            "wgmma d {d} bn {bn}: S rel err {es:.2e} (first bad (row, col, got, want) {:?}); O rel err {eo:.2e} (first bad {:?})",
            first_bad(&s, &s_want, bn),
            first_bad(&o, &o_want, d)
        );
        assert!(es < 1e-5, "wgmma Q·Kᵀ d {d} bn {bn}: rel err {es:e}");
        assert!(eo < 1e-5, "wgmma P·V d {d} bn {bn}: rel err {eo:e}");
    }
}

/// Runs `launch` and the mma.sync kernel on the same fresh random inputs (q rounded to bf16 for
/// the CPU, as both kernels round it); returns (relative error, max abs error) of `launch`'s
/// output against the CPU twin and against the mma kernel.
fn attention_vs_cpu_and_mma(dev: &CudaDevice, case: AttnCase, launch: AttnLaunch<'_>) -> [(f64, f64); 2] {
    let (t, nh, nkv, d, pos0, window, with_sinks) = case;
    let cap = pos0 + t + 3;
    let q = random(t * nh * d, 1.0);
    let k = rounded(&random(nkv * cap * d, 1.0), DType::BF16);
    let v = rounded(&random(nkv * cap * d, 1.0), DType::BF16);
    let sinks = random(nh, 2.0);
    let scale = (d as f32).powf(-0.5);
    let geo = cpu::AttnGeometry { n_heads: nh, n_kv: nkv, d, cap, pos0 };
    let mut want = vec![0.0; q.len()];
    cpu::attention(&rounded(&q, DType::BF16), &k, &v, &geo, scale, window, with_sinks.then_some(&sinks[..]), &mut want);
    let g = cuda::attention::AttnGeometry { n_heads: nh, n_kv: nkv, d, cap, pos0 };
    let sinks_d = up(dev, &sinks);
    let s = with_sinks.then_some(&sinks_d);
    let (qd, kd, vd) = (up(dev, &q), up(dev, &bf16s(&k)), up(dev, &bf16s(&v)));
    let mut out = poisoned(dev, q.len());
    assert!(launch(&qd, &kd, &vd, g, scale, s, &mut out), "{case:?} not covered");
    let got = down(dev, &out);
    let mut mma_out = poisoned(dev, q.len());
    let covered =
        cuda::flash::flash_prefill_mma(dev, &qd, &kd, &vd, g, scale, window, s, &mut mma_out).expect("mma flash");
    assert!(covered, "{case:?} not covered by the mma kernel");
    let mma = down(dev, &mma_out);
    let max_abs = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs())).fold(0.0, f64::max);
    [(rel_err(&got, &want), max_abs(&got, &want)), (rel_err(&got, &mma), max_abs(&got, &mma))]
}

#[test]
fn decode_attention_matches_cpu() {
    let Some(dev) = device() else { return };
    let cases: [AttnCase; 8] = [
        (1, 32, 8, 128, 4999, None, false),
        (1, 9, 3, 64, 700, None, true),
        (3, 32, 4, 64, 1000, Some(128), true),
        (1, 16, 2, 256, 300, None, false),
        (2, 4, 4, 32, 50, None, false),
        (1, 4, 1, 16, 20, None, true),
        (4, 24, 2, 128, 2, None, false),
        (1, 64, 8, 64, 9000, Some(128), true),
    ];
    for case in cases {
        let e = fast_attention_err(&dev, case, false, &|q, k, v, g, scale, s, out| {
            cuda::flash::decode_attention(&dev, q, k, v, g, scale, case.5, s, out).expect("decode attention")
        });
        eprintln!("decode {case:?}: rel err {e:.2e}");
        assert!(e < 1e-5, "decode {case:?}: rel err {e:e}");
    }
}

/// The KV path through the Backend trait: a bf16 cache from kv_zeros, written, grown and
/// attended over, against the CPU backend's f32 cache fed bf16-valued keys and values. A
/// sliding-window run drops the cache's front (`grow_kv` over a later range) and attends at
/// positions shifted by as much, against the CPU's whole cache.
#[test]
fn bf16_kv_cache_through_the_backend_matches_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    assert_eq!(gpu.kv_dtype(), DType::BF16);
    assert_eq!(cpu.kv_dtype(), DType::F32);
    let (nh, nkv, d) = (8, 2, 64);
    let (cap0, t1, t2) = (16, 10, 9);
    let run = |be: &dyn Backend, ks: &[Vec<f32>], vs: &[Vec<f32>], q: &[f32], window: Option<usize>, drop: usize| {
        let mut k = be.kv_zeros(vec![nkv, cap0, d]).expect("k");
        let mut v = be.kv_zeros(vec![nkv, cap0, d]).expect("v");
        let mut pos = 0;
        for (kn, vn) in ks.iter().zip(vs) {
            let t = kn.len() / (nkv * d);
            if pos + t > cap0 {
                k = be.grow_kv(&k, 0..pos, 2 * cap0).expect("grow k");
                v = be.grow_kv(&v, 0..pos, 2 * cap0).expect("grow v");
            }
            be.write_kv(&mut k, &be.upload_f32(vec![t, nkv, d], kn).expect("kn"), pos).expect("write k");
            be.write_kv(&mut v, &be.upload_f32(vec![t, nkv, d], vn).expect("vn"), pos).expect("write v");
            pos += t;
        }
        if drop > 0 {
            k = be.grow_kv(&k, drop..pos, pos - drop).expect("drop k");
            v = be.grow_kv(&v, drop..pos, pos - drop).expect("drop v");
        }
        let tq = q.len() / (nh * d);
        let qt = be.upload_f32(vec![tq, nh, d], q).expect("q");
        let mut out = be.upload_f32(vec![tq, nh, d], &vec![f32::NAN; q.len()]).expect("out");
        let p = ollm_ops::AttnParams { scale: (d as f32).powf(-0.5), window, sinks: None, origin: 0 };
        be.attention(&qt, &k, &v, pos - drop - tq, &p, &mut out).expect("attention");
        be.to_host_f32(&out).expect("out")
    };
    let ks = [random(t1 * nkv * d, 1.0), random(t2 * nkv * d, 1.0)];
    let vs = [random(t1 * nkv * d, 1.0), random(t2 * nkv * d, 1.0)];
    let round = |x: &[Vec<f32>]| x.iter().map(|v| rounded(v, DType::BF16)).collect::<Vec<_>>();
    // 9 queries take the flash kernel (bf16 q and P), 2 the split-context one (f32 math). With a
    // window of 6 the first of 9 queries (position 10) sees keys 5.., so 5 rows can go.
    for (tq, tol) in [(t2, 1e-2), (2, 1e-5)] {
        for (window, drop) in [(None, 0), (Some(6), 5)] {
            let q = random(tq * nh * d, 1.0);
            let got = run(&gpu, &ks, &vs, &q, window, drop);
            assert!(got.iter().all(|v| v.is_finite()), "unwritten outputs");
            let want = run(&cpu, &round(&ks), &round(&vs), &q, window, 0);
            let e = rel_err(&got, &want);
            eprintln!(
                "bf16 KV cache through the backend (write, grow, drop {drop}, attend {tq} queries): rel err {e:.2e}"
            );
            assert!(e < tol, "bf16 KV cache, {tq} queries, drop {drop}: rel err {e:e}");
        }
    }
    // An f32 tensor is not a CUDA KV cache: a dtype error, not a crash.
    let mut f32_cache = gpu.zeros(vec![nkv, cap0, d]).expect("zeros");
    let new = gpu.upload_f32(vec![1, nkv, d], &random(nkv * d, 1.0)).expect("new");
    let err = gpu.write_kv(&mut f32_cache, &new, 0).expect_err("f32 cache");
    assert!(err.to_string().contains("kv_zeros"), "{err}");
}

/// Attention over a shared prefix's cache and the sequence's own (`attention_prefixed`): the
/// GPU joins the two caches and runs its kernels, the CPU merges the two sources' partials;
/// both against the CPU's plain attention over one cache holding both. Decode (2 queries,
/// split-context kernel, 1e-5) and a prefill across nothing but own rows (9 queries, flash,
/// 1e-2 as above), with and without sinks.
#[test]
fn prefixed_attention_matches_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    let (nh, nkv, d, p, own) = (8, 2, 64, 300, 40);
    let (pk, pv) = (rounded(&random(nkv * p * d, 1.0), DType::BF16), rounded(&random(nkv * p * d, 1.0), DType::BF16));
    let (ok, ov) =
        (rounded(&random(nkv * own * d, 1.0), DType::BF16), rounded(&random(nkv * own * d, 1.0), DType::BF16));
    // The CPU's one cache: per head, the prefix's rows then the own rows.
    let join = |a: &[f32], b: &[f32]| -> Vec<f32> {
        (0..nkv)
            .flat_map(|h| a[h * p * d..(h + 1) * p * d].iter().chain(&b[h * own * d..(h + 1) * own * d]).copied())
            .collect()
    };
    let (jk, jv) = (join(&pk, &ok), join(&pv, &ov));
    let cache = |be: &dyn Backend, x: &[f32], rows: usize| -> Tensor {
        let mut c = be.kv_zeros(vec![nkv, rows, d]).expect("cache");
        let t: Vec<f32> = (0..rows)
            .flat_map(|r| (0..nkv).flat_map(move |h| (h * rows + r) * d..(h * rows + r + 1) * d))
            .map(|i| x[i])
            .collect();
        be.write_kv(&mut c, &be.upload_f32(vec![rows, nkv, d], &t).expect("rows"), 0).expect("write");
        c
    };
    let sinks = random(nh, 2.0);
    for (tq, tol) in [(2usize, 1e-5), (9, 1e-2)] {
        for with_sinks in [false, true] {
            let q = random(tq * nh * d, 1.0);
            let pos0 = own - tq;
            let run_prefixed = |be: &dyn Backend| -> Vec<f32> {
                let (pkt, pvt) = (cache(be, &pk, p), cache(be, &pv, p));
                let (okt, ovt) = (cache(be, &ok, own), cache(be, &ov, own));
                let st = be.upload_f32(vec![nh], &sinks).expect("sinks");
                let params = ollm_ops::AttnParams {
                    scale: (d as f32).powf(-0.5),
                    window: None,
                    sinks: with_sinks.then_some(&st),
                    origin: 0,
                };
                let qt = be.upload_f32(vec![tq, nh, d], &q).expect("q");
                let mut out = be.upload_f32(vec![tq, nh, d], &vec![f32::NAN; q.len()]).expect("out");
                be.attention_prefixed(&qt, (&pkt, &pvt, p), (&okt, &ovt), pos0, &params, &mut out).expect("prefixed");
                be.to_host_f32(&out).expect("out")
            };
            let st = cpu.upload_f32(vec![nh], &sinks).expect("sinks");
            let params = ollm_ops::AttnParams {
                scale: (d as f32).powf(-0.5),
                window: None,
                sinks: with_sinks.then_some(&st),
                origin: 0,
            };
            let qt = cpu.upload_f32(vec![tq, nh, d], &q).expect("q");
            let mut out = cpu.upload_f32(vec![tq, nh, d], &vec![f32::NAN; q.len()]).expect("out");
            let (kt, vt) = (cache(&cpu, &jk, p + own), cache(&cpu, &jv, p + own));
            cpu.attention(&qt, &kt, &vt, p + pos0, &params, &mut out).expect("attention");
            let want = cpu.to_host_f32(&out).expect("want");
            let on_cpu = rel_err(&run_prefixed(&cpu), &want);
            let on_gpu = rel_err(&run_prefixed(&gpu), &want);
            eprintln!("prefixed attention, {tq} queries, sinks {with_sinks}: cpu {on_cpu:.2e}, gpu {on_gpu:.2e}");
            assert!(on_cpu < 1e-5, "CPU two-source merge: rel err {on_cpu:e}");
            assert!(on_gpu < tol, "GPU joined caches, {tq} queries: rel err {on_gpu:e}");
        }
    }
}

/// A sliding-window layer's shared prefix tail (`attention_prefixed` with `origin` the own
/// rows' first position; the prefix holds only the `window - 1` positions before them): the GPU
/// joins tail and own rows and runs its kernels, against the CPU's attention over a private
/// window cache holding the same positions. Decode (2 queries, 1e-5) and a 9-query prefill
/// (1e-2), with and without sinks.
#[test]
fn prefixed_attention_over_a_window_tail_matches_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    let (nh, nkv, d, window, base, own) = (8, 2, 64, 100, 700, 40);
    let tail = window - 1;
    let kv = |n: usize| rounded(&random(n, 1.0), DType::BF16);
    // Per head, positions base - tail .. base + own (the tail's rows, then the own rows).
    let (k, v) = (kv(nkv * (tail + own) * d), kv(nkv * (tail + own) * d));
    let rows_of = |x: &[f32], from: usize, rows: usize| -> Vec<f32> {
        (0..nkv).flat_map(|h| x[(h * (tail + own) + from) * d..(h * (tail + own) + from + rows) * d].to_vec()).collect()
    };
    let cache = |be: &dyn Backend, x: &[f32], rows: usize| -> Tensor {
        let mut c = be.kv_zeros(vec![nkv, rows, d]).expect("cache");
        let t: Vec<f32> = (0..rows)
            .flat_map(|r| (0..nkv).flat_map(move |h| (h * rows + r) * d..(h * rows + r + 1) * d))
            .map(|i| x[i])
            .collect();
        be.write_kv(&mut c, &be.upload_f32(vec![rows, nkv, d], &t).expect("rows"), 0).expect("write");
        c
    };
    let sinks = random(nh, 2.0);
    for (tq, tol) in [(2usize, 1e-5), (9, 1e-2)] {
        for with_sinks in [false, true] {
            let q = random(tq * nh * d, 1.0);
            let run = |be: &dyn Backend, prefixed: bool| -> Vec<f32> {
                let st = be.upload_f32(vec![nh], &sinks).expect("sinks");
                let origin = if prefixed { base } else { base - tail };
                let params = ollm_ops::AttnParams {
                    scale: (d as f32).powf(-0.5),
                    window: Some(window),
                    sinks: with_sinks.then_some(&st),
                    origin,
                };
                let qt = be.upload_f32(vec![tq, nh, d], &q).expect("q");
                let mut out = be.upload_f32(vec![tq, nh, d], &vec![f32::NAN; q.len()]).expect("out");
                if prefixed {
                    let (pk, pv) = (cache(be, &rows_of(&k, 0, tail), tail), cache(be, &rows_of(&v, 0, tail), tail));
                    let (ok, ov) = (cache(be, &rows_of(&k, tail, own), own), cache(be, &rows_of(&v, tail, own), own));
                    be.attention_prefixed(&qt, (&pk, &pv, tail), (&ok, &ov), own - tq, &params, &mut out)
                        .expect("prefixed");
                } else {
                    let (kc, vc) = (cache(be, &k, tail + own), cache(be, &v, tail + own));
                    be.attention(&qt, &kc, &vc, tail + own - tq, &params, &mut out).expect("attention");
                }
                be.to_host_f32(&out).expect("out")
            };
            let want = run(&cpu, false);
            let (on_cpu, on_gpu) = (rel_err(&run(&cpu, true), &want), rel_err(&run(&gpu, true), &want));
            eprintln!(
                "window-tail prefixed attention, {tq} queries, sinks {with_sinks}: cpu {on_cpu:.2e}, gpu {on_gpu:.2e}"
            );
            assert!(on_cpu == 0.0, "CPU: not bit for bit the private window cache (rel err {on_cpu:e})");
            assert!(on_gpu < tol, "GPU joined tail and own rows, {tq} queries: rel err {on_gpu:e}");
        }
    }
}

#[test]
fn rmsnorm_matches_cpu_for_every_weight_dtype() {
    let Some(dev) = device() else { return };
    eprintln!("device: {} (sm_{}{})", dev.info.name, dev.info.compute_capability.0, dev.info.compute_capability.1);
    for dtype in DTYPES {
        for &(rows, n) in &[(1usize, 576usize), (7, 4096), (33, 2880), (5, 100)] {
            for kind in [NormKind::Llama, NormKind::ZeroCentered] {
                let x = random(rows * n, 3.0);
                let w: Vec<f32> = random(n, 1.0).iter().map(|v| 1.0 + v * 0.2).collect();
                let mut want = vec![0.0f32; rows * n];
                cpu::rms_norm(&x, &rounded(&w, dtype), 1e-5, kind, &mut want);
                let mut outd = poisoned(&dev, rows * n);
                cuda::rmsnorm::rms_norm(&dev, &up(&dev, &x), &stored(&dev, dtype, &w), n, 1e-5, kind, &mut outd)
                    .expect("launch");
                let e = rel_err(&down(&dev, &outd), &want);
                // f32 math on both sides; only the summation order differs.
                assert!(e < 1e-5, "{dtype} rows={rows} n={n} {kind:?}: relative error {e:e}");
            }
        }
        eprintln!("rmsnorm {dtype} weights: within 1e-5");
    }
}

/// Every allocation is counted; going over the budget is a one-line error naming what asked,
/// and nothing is allocated or counted for it.
#[test]
fn vram_budget_is_enforced_and_counted() {
    let Some(gpu) = backend() else { return };
    let dev = gpu.device();
    let base = dev.used_bytes();
    assert!(base >= 4 << 20, "the cuBLAS workspace is counted ({base} B)");
    let t = gpu.zeros(vec![1024, 1024]).expect("4 MiB");
    assert_eq!(dev.used_bytes(), base + (4 << 20));
    let kv = gpu.kv_zeros(vec![8, 1024, 128]).expect("2 MiB bf16 cache");
    assert_eq!(dev.used_bytes(), base + (6 << 20));
    drop(t);
    drop(kv);
    assert_eq!(dev.used_bytes(), base, "dropping a tensor returns its bytes");
    let v = dev.vram();
    assert!(v.peak_used_bytes() >= v.context_bytes(), "the driver's peak includes the context");
    assert_eq!(v.budget_bytes(), v.total_bytes(), "default budget: the whole device");

    // A budget 64 MiB above what is in use now: 32 MiB fits, 128 MiB does not.
    let budget = v.context_bytes() + dev.used_bytes() + (64 << 20);
    dev.set_vram_budget(budget).expect("set budget");
    let fits = gpu.zeros(vec![8 << 20]).expect("32 MiB fits");
    let before = dev.used_bytes();
    let err = gpu.kv_zeros(vec![8, 32768, 128]).expect_err("128 MiB KV cache over the budget");
    let msg = err.to_string();
    eprintln!("over-budget error: {msg}");
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.starts_with("VRAM budget") && msg.contains("KV cache") && msg.contains("--vram-budget"), "{msg}");
    assert_eq!(dev.used_bytes(), before, "a refused allocation is not counted");
    drop(fits);
    assert!(dev.set_vram_budget(v.context_bytes() / 2).is_err(), "a budget below the context is refused");
    dev.set_vram_budget(v.total_bytes()).expect("reset");
}

/// Uploads keep their dtype and values (through the accounted allocation path).
#[test]
fn uploads_round_trip() {
    let Some(gpu) = backend() else { return };
    for dtype in DTYPES {
        let v = random(1000, 4.0);
        let t: Tensor = gpu.upload(&host(dtype, vec![10, 100], &v)).expect("upload");
        assert_eq!(t.dtype(), dtype);
        assert_eq!(gpu.to_host_f32(&t).expect("down"), rounded(&v, dtype), "{dtype}");
    }
}

#[test]
fn clamped_swiglu_matches_cpu() {
    let Some(dev) = device() else { return };
    let (limit, alpha) = (7.0, 1.702);
    for &(t, inter) in &[(1usize, 2880usize), (13, 720), (5, 100)] {
        // Scale 12: about 40% of the values lie beyond ±7.
        let gu = random(t * 2 * inter, 12.0);
        let (gates, ups) = (gu.iter().step_by(2), gu.iter().skip(1).step_by(2));
        assert!(gates.clone().any(|v| *v > limit) && gates.clone().any(|v| *v < -limit), "gates must pass ±limit");
        assert!(ups.clone().any(|v| *v > limit) && ups.clone().any(|v| *v < -limit), "ups must hit both clamps");
        let mut want = vec![0.0; t * inter];
        cpu::clamped_swiglu(&gu, inter, limit, alpha, &mut want);
        let mut out = poisoned(&dev, t * inter);
        cuda::moe::clamped_swiglu(&dev, &up(&dev, &gu), inter, limit, alpha, &mut out).expect("clamped_swiglu");
        let e = rel_err(&down(&dev, &out), &want);
        eprintln!("clamped swiglu t={t} I={inter}: rel err {e:.2e}");
        assert!(e < 1e-6, "clamped swiglu t={t} I={inter}: rel err {e:e}");
    }
}

const ROUTER_MODES: [RouterMode; 3] = [
    RouterMode::SoftmaxOfTopK,
    RouterMode::TopKOfSoftmax { norm_topk_prob: false },
    RouterMode::TopKOfSoftmax { norm_topk_prob: true },
];

/// Runs the router launcher (output poisoned first) against the CPU twin: ids must be equal,
/// weights within 2e-6. Returns the ids.
fn router_matches_cpu(dev: &CudaDevice, logits: &[f32], e: usize, k: usize, mode: RouterMode) -> Vec<u32> {
    let t = logits.len() / e;
    let (mut want_ids, mut want_w) = (vec![0u32; t * k], vec![0.0f32; t * k]);
    cpu::router_topk(logits, e, k, mode, &mut want_ids, &mut want_w);
    let mut out = poisoned(dev, 2 * t * k);
    cuda::moe::router_topk(dev, &up(dev, logits), e, k, mode, &mut out).expect("router_topk");
    let (ids, w) = cuda::moe::unpack_router_output(&down(dev, &out), t * k).expect("whole expert ids");
    assert_eq!(ids, want_ids, "router t={t} E={e} k={k} {mode:?}: expert ids differ");
    let max_diff = w.iter().zip(&want_w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(max_diff <= 2e-6, "router t={t} E={e} k={k} {mode:?}: weights differ by {max_diff:e}");
    ids
}

#[test]
fn router_topk_matches_cpu() {
    let Some(dev) = device() else { return };
    // (T, E, k): the two release shapes (Qwen3-Next 512/10, GPT-OSS 32/4) and odd ones; 33
    // tokens leave the last block of four warps partly empty.
    for &(t, e, k) in &[(7usize, 512usize, 10usize), (33, 512, 10), (9, 32, 4), (1, 32, 4), (5, 128, 16), (3, 1000, 3)]
    {
        for mode in ROUTER_MODES {
            let logits = random(t * e, 4.0);
            router_matches_cpu(&dev, &logits, e, k, mode);
        }
        eprintln!("router top-k t={t} E={e} k={k}: ids equal, weights within 2e-6 in every mode");
    }
}

#[test]
fn router_ties_go_to_the_lower_index_on_both_backends() {
    let Some(dev) = device() else { return };
    for &(t, e, k) in &[(6usize, 512usize, 10usize), (6, 32, 4)] {
        // Multiples of 1/2 in [-2, 2]: nine values over E experts, so the top k is full of exact ties.
        let mut logits: Vec<f32> = random(t * e, 2.0).iter().map(|v| (v * 2.0).round() / 2.0).collect();
        // Token 0: all equal, so the experts are 0..k in order.
        logits[..e].fill(1.0);
        for mode in ROUTER_MODES {
            let ids = router_matches_cpu(&dev, &logits, e, k, mode);
            assert_eq!(ids[..k], (0..k as u32).collect::<Vec<_>>(), "equal logits: the lowest indices");
            // Independently: a stable sort by descending logit keeps tied experts in index order.
            for (row, got) in logits.chunks(e).zip(ids.chunks(k)) {
                let mut order: Vec<u32> = (0..e as u32).collect();
                // partial_cmp, not total_cmp: -0.0 and 0.0 are a tie, as in the kernel.
                order.sort_by(|&a, &b| row[b as usize].partial_cmp(&row[a as usize]).unwrap_or(Ordering::Equal));
                assert_eq!(got, &order[..k], "{mode:?}: ties must go to the lower index");
            }
        }
        eprintln!("router ties t={t} E={e} k={k}: the lower index wins on both backends");
    }
}

#[test]
fn gated_rmsnorm_matches_cpu_for_every_weight_dtype() {
    let Some(dev) = device() else { return };
    for dtype in DTYPES {
        // Qwen3-Next normalises each value head (dv = 128) of every token.
        for &(rows, n) in &[(1usize, 128usize), (3 * 32, 128), (7, 4096), (5, 100)] {
            let (x, z) = (random(rows * n, 3.0), random(rows * n, 6.0));
            let w: Vec<f32> = random(n, 1.0).iter().map(|v| 1.0 + v * 0.2).collect();
            let mut want = vec![0.0f32; rows * n];
            cpu::gated_rms_norm(&x, &z, &rounded(&w, dtype), 1e-6, &mut want);
            let mut out = poisoned(&dev, rows * n);
            let wd = stored(&dev, dtype, &w);
            cuda::rmsnorm::gated_rms_norm(&dev, &up(&dev, &x), &up(&dev, &z), &wd, n, 1e-6, &mut out).expect("launch");
            let e = rel_err(&down(&dev, &out), &want);
            assert!(e < 1e-5, "gated rmsnorm {dtype} rows={rows} n={n}: relative error {e:e}");
        }
        eprintln!("gated rmsnorm {dtype} weights: within 1e-5");
    }
}

/// The three MoE-family ops through the Backend trait (tensors, shape checks, the router's
/// scratch and read-back), against the CPU backend; bad shapes are errors, not crashes.
#[test]
fn moe_ops_through_the_backend_match_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    // Router: [T=6, E=512], k=10, every mode.
    let (t, e, k) = (6, 512, 10);
    let logits = random(t * e, 4.0);
    let (lc, lg) =
        (cpu.upload_f32(vec![t, e], &logits).expect("logits"), gpu.upload_f32(vec![t, e], &logits).expect("logits"));
    for mode in ROUTER_MODES {
        let (want_ids, want_w) = cpu.router_topk(&lc, k, mode).expect("cpu router");
        let (ids, w) = gpu.router_topk(&lg, k, mode).expect("gpu router");
        assert_eq!(ids, want_ids, "{mode:?}");
        let max_diff = w.iter().zip(&want_w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(max_diff <= 2e-6, "{mode:?}: weights differ by {max_diff:e}");
    }
    for bad_k in [0, e + 1] {
        assert!(gpu.router_topk(&lg, bad_k, RouterMode::SoftmaxOfTopK).is_err(), "k = {bad_k}");
        assert!(cpu.router_topk(&lc, bad_k, RouterMode::SoftmaxOfTopK).is_err(), "k = {bad_k}");
    }
    let too_many = gpu.upload_f32(vec![1, 2048], &random(2048, 1.0)).expect("2048 experts");
    let err = gpu.router_topk(&too_many, 4, RouterMode::SoftmaxOfTopK).expect_err("E = 2048");
    assert!(err.to_string().contains("1024"), "{err}");

    // Clamped SwiGLU: gate_up [T=4, 2·96] -> [4, 96].
    let gu = random(4 * 192, 12.0);
    let run_swiglu = |be: &dyn Backend| {
        let x = be.upload_f32(vec![4, 192], &gu).expect("gate_up");
        let mut out = be.upload_f32(vec![4, 96], &[f32::NAN; 4 * 96]).expect("out");
        be.moe().expect("MoE ops").clamped_swiglu(&x, 7.0, 1.702, &mut out).expect("clamped_swiglu");
        let mut wrong = be.zeros(vec![4, 95]).expect("wrong out");
        assert!(
            be.moe().expect("MoE ops").clamped_swiglu(&x, 7.0, 1.702, &mut wrong).is_err(),
            "[4, 192] into [4, 95]"
        );
        be.to_host_f32(&out).expect("out")
    };
    let e_swiglu = rel_err(&run_swiglu(&gpu), &run_swiglu(&cpu));
    assert!(e_swiglu < 1e-6, "clamped swiglu through the backend: rel err {e_swiglu:e}");

    // Gated RMSNorm: x, z [2, 32, 128] with a bf16 weight [128].
    let (x, z) = (random(2 * 32 * 128, 3.0), random(2 * 32 * 128, 6.0));
    let w = host(DType::BF16, vec![128], &random(128, 1.0).iter().map(|v| 1.0 + 0.2 * v).collect::<Vec<_>>());
    let run_norm = |be: &dyn Backend| {
        let (xt, zt) =
            (be.upload_f32(vec![2, 32, 128], &x).expect("x"), be.upload_f32(vec![2, 32, 128], &z).expect("z"));
        let wt = be.upload(&w).expect("w");
        let mut out = be.upload_f32(vec![2, 32, 128], &vec![f32::NAN; x.len()]).expect("out");
        be.deltanet().expect("DeltaNet ops").gated_rms_norm(&xt, &zt, &wt, 1e-6, &mut out).expect("gated_rms_norm");
        assert!(
            be.deltanet()
                .expect("DeltaNet ops")
                .gated_rms_norm(&xt, &xt, &be.zeros(vec![64]).expect("w"), 1e-6, &mut out)
                .is_err(),
            "w [64]"
        );
        be.to_host_f32(&out).expect("out")
    };
    let e_norm = rel_err(&run_norm(&gpu), &run_norm(&cpu));
    assert!(e_norm < 1e-5, "gated rmsnorm through the backend: rel err {e_norm:e}");
}

/// The raw bits of a tensor's elements, read back through its backend's `copy`-free path: bf16
/// tensors as f32 values (exact), so bit equality of bf16 is equality of these.
fn values(be: &dyn Backend, t: &Tensor) -> Vec<f32> {
    be.to_host_f32(t).expect("read back")
}

/// MXFP4 dequantisation is bit-exact with the CPU (every byte value and scale occurs, 0 and 255
/// included); transposes of every element size match exactly, on shapes that are not multiples
/// of the 32×32 tile; gathers and weighted scatter-adds of rows match to f32 rounding.
#[test]
fn expert_data_movement_matches_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    let mut seed = 0x9e37_79b9_u32;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    // MXFP4: 300 rows of 96 columns (3 groups a row).
    let (rows, cols) = (300usize, 96usize);
    let blocks: Vec<u8> = (0..rows * cols / 2).map(|_| next() as u8).collect();
    let mut scales: Vec<u8> = (0..rows * cols / 32).map(|_| 110 + (next() % 30) as u8).collect();
    scales[0] = 0;
    scales[1] = 255;
    scales[2] = 127;
    let host = |dtype, shape: Vec<usize>, bytes: Vec<u8>| HostTensor { dtype, shape, bytes };
    let mut outs = Vec::new();
    for be in [&cpu as &dyn Backend, &gpu] {
        let b = be.upload(&host(DType::U8, vec![rows, cols / 32, 16], blocks.clone())).expect("blocks");
        let s = be.upload(&host(DType::U8, vec![rows, cols / 32], scales.clone())).expect("scales");
        let mut out = be.alloc(vec![rows, cols], DType::BF16).expect("out");
        be.moe().expect("MoE ops").dequant_mxfp4(&b, &s, &mut out).expect("dequant");
        outs.push(values(be, &out));
    }
    let same = outs[0].iter().zip(&outs[1]).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
    assert!(same, "MXFP4 dequantisation differs between the CPU and the GPU");
    // A wrong out dtype is refused in one line.
    let b = gpu.upload(&host(DType::U8, vec![16], vec![0; 16])).expect("b");
    let s = gpu.upload(&host(DType::U8, vec![1], vec![127])).expect("s");
    let mut f = gpu.zeros(vec![1, 32]).expect("f32 out");
    let err = gpu.dequant_mxfp4(&b, &s, &mut f).expect_err("f32 out refused").to_string();
    assert!(err.contains("dequant_mxfp4") && !err.contains('\n'), "{err}");

    // Transposes: u8, bf16, f32.
    for (a, bdim) in [(1usize, 1usize), (33, 70), (64, 32), (129, 5)] {
        for dtype in [DType::U8, DType::BF16, DType::F32] {
            let bytes: Vec<u8> = (0..a * bdim * dtype.size_bytes()).map(|_| next() as u8).collect();
            // Keep f32/bf16 bit patterns finite: clear the top exponent bit of each element.
            let bytes: Vec<u8> = bytes
                .chunks(dtype.size_bytes())
                .flat_map(|c| {
                    let mut c = c.to_vec();
                    if dtype != DType::U8 {
                        *c.last_mut().expect("byte") &= 0x3f;
                    }
                    c
                })
                .collect();
            let mut got = Vec::new();
            for be in [&cpu as &dyn Backend, &gpu] {
                let src = be.upload(&host(dtype, vec![a, bdim], bytes.clone())).expect("src");
                let mut out = be.alloc(vec![bdim, a], dtype).expect("out");
                be.transpose(&src, &mut out).expect("transpose");
                got.push(values(be, &out));
            }
            assert_eq!(got[0], got[1], "transpose {dtype} [{a}, {bdim}]");
            // And the CPU is a transpose.
            let src: Vec<f32> =
                cpu.to_host_f32(&cpu.upload(&host(dtype, vec![a, bdim], bytes.clone())).expect("s")).expect("v");
            assert!((0..a).all(|r| (0..bdim).all(|c| got[0][c * a + r] == src[r * bdim + c])));
        }
    }

    // Gather / scatter-add of rows.
    let (t, n) = (37usize, 200usize);
    let table = random(t * n, 1.0);
    let rows: Vec<u32> = vec![5, 0, 36, 17, 9, 22, 1];
    let weights: Vec<f32> = (0..rows.len()).map(|i| 0.25 + i as f32 * 0.1).collect();
    let packed = random(rows.len() * n, 1.0);
    let mut got = Vec::new();
    for be in [&cpu as &dyn Backend, &gpu] {
        let src = be.upload_f32(vec![t, n], &table).expect("table");
        let mut g = be.zeros(vec![rows.len(), n]).expect("gathered");
        be.moe().expect("MoE ops").gather_rows(&src, &rows, &mut g).expect("gather");
        let mut dst = be.upload_f32(vec![t, n], &table).expect("dst");
        let p = be.upload_f32(vec![rows.len(), n], &packed).expect("packed");
        be.moe().expect("MoE ops").scatter_add_rows(&p, &rows, &weights, &mut dst).expect("scatter");
        got.push((values(be, &g), values(be, &dst)));
    }
    assert_eq!(got[0].0, got[1].0, "gather_rows");
    assert!(rel_err(&got[1].1, &got[0].1) < 1e-6, "scatter_add_rows");
    for (i, &r) in rows.iter().enumerate() {
        assert_eq!(&got[0].0[i * n..(i + 1) * n], &table[r as usize * n..(r as usize + 1) * n]);
    }
    // A repeated row is refused, not raced.
    let p = gpu.upload_f32(vec![2, n], &packed[..2 * n]).expect("p");
    let mut dst = gpu.zeros(vec![t, n]).expect("dst");
    let err = gpu.scatter_add_rows(&p, &[3, 3], &[1.0, 1.0], &mut dst).expect_err("repeat refused").to_string();
    assert!(err.contains("twice"), "{err}");
}

/// `matmul_mxfp4` reads MXFP4 weights packed on the GPU (a fused decode kernel for ≤ 8 rows,
/// unpack + GEMM beyond) and matches the CPU's unpack + matmul on fresh random codes, scales
/// and inputs, with and without a bias; the GPT-OSS-20B expert shapes (5760 × 2880 gate_up,
/// 2880 × 2880 down) and an odd row count.
#[test]
fn mxfp4_matmul_matches_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    let mut seed = 0x51ed_270b_u32;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    for (n, k) in [(5760usize, 2880usize), (2880, 2880), (77, 64)] {
        let blocks: Vec<u8> = (0..n * k / 2).map(|_| next() as u8).collect();
        let scales: Vec<u8> = (0..n * k / 32).map(|_| 118 + (next() % 12) as u8).collect();
        let bias = random(n, 1.0);
        let host = |shape: Vec<usize>, bytes: Vec<u8>| HostTensor { dtype: DType::U8, shape, bytes };
        for t in [1usize, 3, 8, 9] {
            let x = random(t * k, 1.0);
            for with_bias in [false, true] {
                let mut outs = Vec::new();
                for be in [&cpu as &dyn Backend, &gpu] {
                    let b = be.upload(&host(vec![n, k / 32, 16], blocks.clone())).expect("blocks");
                    let s = be.upload(&host(vec![n, k / 32], scales.clone())).expect("scales");
                    let bt = be.upload_f32(vec![n], &bias).expect("bias");
                    let xt = be.upload_f32(vec![t, k], &x).expect("x");
                    let mut out = be.upload_f32(vec![t, n], &vec![f32::NAN; t * n]).expect("out");
                    be.moe()
                        .expect("MoE ops")
                        .matmul_mxfp4(&xt, &b, &s, with_bias.then_some(&bt), &mut out)
                        .expect("matmul_mxfp4");
                    outs.push(be.to_host_f32(&out).expect("out"));
                }
                assert!(outs[1].iter().all(|v| v.is_finite()), "unwritten outputs");
                let e = rel_err(&outs[1], &outs[0]);
                eprintln!("matmul_mxfp4 [{t}, {k}] · [{n}, {k}]ᵀ, bias {with_bias}: rel err {e:.2e}");
                // The fused kernel sums in f32 like the CPU; 9 rows take cuBLAS (bf16 x).
                let tol = if t <= 8 { 1e-5 } else { 4e-3 };
                assert!(e < tol, "matmul_mxfp4 t={t} n={n} k={k}: rel err {e:e} (tolerance {tol:e})");
            }
        }
    }
    // A row count that does not divide the scales is one clear error.
    let b = gpu.upload(&HostTensor { dtype: DType::U8, shape: vec![3, 16], bytes: vec![0; 48] }).expect("b");
    let s = gpu.upload(&HostTensor { dtype: DType::U8, shape: vec![2], bytes: vec![127; 2] }).expect("s");
    let x = gpu.zeros(vec![1, 32]).expect("x");
    let mut out = gpu.zeros(vec![1, 3]).expect("out");
    let err = gpu.matmul_mxfp4(&x, &b, &s, None, &mut out).expect_err("bad shapes").to_string();
    assert!(err.contains("matmul_mxfp4") && !err.contains('\n'), "{err}");
}

/// Qwen3-Next's Gated DeltaNet ops on the GPU against their CPU twins on fresh random data:
/// head slices, the L2 norm, sigmoid gates (elementwise and per row), the decay/β gates, the
/// short convolution carried across two calls, and the delta rule (the GPU's step-by-step
/// kernel against the CPU's recurrent and chunked forms) at the 80B's head sizes (dk = dv =
/// 128, two value heads per key head) over 150 steps from a non-zero state, then one more step.
#[test]
fn gated_deltanet_ops_match_cpu() {
    use ollm_ops::{DeltaForm, DeltaRule, HeadSlice};
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    let both = |f: &dyn Fn(&dyn Backend) -> Vec<Vec<f32>>| (f(&cpu), f(&gpu));
    let check = |name: &str, (c, g): (Vec<Vec<f32>>, Vec<Vec<f32>>), tol: f64| {
        for (i, (c, g)) in c.iter().zip(&g).enumerate() {
            assert!(g.iter().all(|v| v.is_finite()), "{name}: output {i} not finite");
            let e = rel_err(g, c);
            eprintln!("{name} output {i}: rel err {e:.2e}");
            assert!(e < tol, "{name} output {i}: rel err {e:e}");
        }
    };
    let up = |be: &dyn Backend, shape: Vec<usize>, v: &[f32]| be.upload_f32(shape, v).expect("upload");
    let host = |be: &dyn Backend, t: &Tensor| be.to_host_f32(t).expect("download");

    // Head slices: qkvz of 7 rows, 2 groups of 2·16 + 2·2·16 columns, into a conv row.
    let p = random(7 * 2 * 96, 1.0);
    check(
        "slice_heads",
        both(&|be| {
            let src = up(be, vec![7, 192], &p);
            let mut out = up(be, vec![7, 128], &vec![0.0; 7 * 128]);
            for (offset, width, out_offset) in [(0, 16, 0), (16, 16, 32), (32, 32, 64)] {
                let s = HeadSlice { heads: 2, stride: 96, offset, width, out_offset };
                be.slice_heads(&src, s, &mut out).expect("slice");
            }
            vec![host(be, &out)]
        }),
        1e-7,
    );
    // L2 norm and sigmoid gates.
    let (x, gate, rowg) = (random(9 * 128, 1.0), random(9 * 128, 3.0), random(9, 3.0));
    check(
        "l2_norm + sigmoid_mul",
        both(&|be| {
            let mut a = up(be, vec![9, 128], &x);
            be.deltanet().expect("DeltaNet ops").l2_norm(&mut a, 1e-6, 0.125).expect("l2");
            let mut b = up(be, vec![9, 128], &x);
            be.sigmoid_mul(&mut b, &up(be, vec![9, 128], &gate)).expect("gate");
            let mut c = up(be, vec![9, 128], &x);
            be.sigmoid_mul(&mut c, &up(be, vec![9, 1], &rowg)).expect("row gate");
            vec![host(be, &a), host(be, &b), host(be, &c)]
        }),
        1e-6,
    );
    // Gates over [150, 32].
    let (a, b, a_log, dt) = (random(150 * 32, 3.0), random(150 * 32, 3.0), random(32, 1.0), random(32, 1.0));
    let gates = |be: &dyn Backend| {
        let (mut g, mut beta) = (up(be, vec![150, 32], &vec![0.0; 4800]), up(be, vec![150, 32], &vec![0.0; 4800]));
        let (at, bt) = (up(be, vec![150, 32], &a), up(be, vec![150, 32], &b));
        be.deltanet()
            .expect("DeltaNet ops")
            .deltanet_gates(&at, &bt, &up(be, vec![32], &a_log), &up(be, vec![32], &dt), &mut g, &mut beta)
            .expect("gates");
        (g, beta)
    };
    check(
        "deltanet_gates",
        both(&|be| {
            let (g, beta) = gates(be);
            vec![host(be, &g), host(be, &beta)]
        }),
        1e-6,
    );
    // The short convolution: 100 rows then 1, the state carried.
    let (ch, kc) = (300, 4);
    let (cx, cw, cs) = (random(101 * ch, 1.0), random(ch * kc, 1.0), random((kc - 1) * ch, 1.0));
    check(
        "causal_conv1d",
        both(&|be| {
            let w = up(be, vec![ch, 1, kc], &cw);
            let mut state = up(be, vec![kc - 1, ch], &cs);
            let mut o1 = up(be, vec![100, ch], &vec![0.0; 100 * ch]);
            be.deltanet()
                .expect("DeltaNet ops")
                .causal_conv1d(&up(be, vec![100, ch], &cx[..100 * ch]), &w, &mut state, &mut o1)
                .expect("conv");
            let mut o2 = up(be, vec![1, ch], &vec![0.0; ch]);
            be.deltanet()
                .expect("DeltaNet ops")
                .causal_conv1d(&up(be, vec![1, ch], &cx[100 * ch..]), &w, &mut state, &mut o2)
                .expect("conv step");
            vec![host(be, &o1), host(be, &o2), host(be, &state)]
        }),
        1e-6,
    );
    // The delta rule at dk = dv = 128, nk = 2, nv = 4, and at dk = 48, dv = 40 (state columns
    // not a multiple of the chunked kernel's 32): 150 steps (two full chunks and a partial
    // one), then 1; each GPU form against each CPU form.
    for (t, nk, dk, nv, dv) in [(150, 2, 128, 4, 128), (150, 1, 48, 2, 40)] {
        let (mut q, mut k) = (random(t * nk * dk, 1.0), random(t * nk * dk, 1.0));
        let norm = |x: &mut [f32], s: f32| {
            for r in x.chunks_mut(dk) {
                let n = r.iter().map(|v| v * v).sum::<f32>().sqrt();
                r.iter_mut().for_each(|v| *v *= s / n);
            }
        };
        norm(&mut q, (dk as f32).powf(-0.5));
        norm(&mut k, 1.0);
        let (v, s0) = (random(t * nv * dv, 1.0), random(nv * dk * dv, 0.3));
        let (a, b) = (random(t * nv, 3.0), random(t * nv, 3.0));
        let (a_log, dt) = (random(nv, 1.0), random(nv, 1.0));
        let run = |be: &dyn Backend, form: DeltaForm| {
            let (mut g, mut beta) = (up(be, vec![t, nv], &vec![0.0; t * nv]), up(be, vec![t, nv], &vec![0.0; t * nv]));
            let (at, bt) = (up(be, vec![t, nv], &a), up(be, vec![t, nv], &b));
            be.deltanet()
                .expect("DeltaNet ops")
                .deltanet_gates(&at, &bt, &up(be, vec![nv], &a_log), &up(be, vec![nv], &dt), &mut g, &mut beta)
                .expect("gates");
            let (g, beta) = (host(be, &g), host(be, &beta));
            let mut state = up(be, vec![nv, dk, dv], &s0);
            let mut outs = Vec::new();
            for (t0, t1, form) in [(0, t - 1, form), (t - 1, t, DeltaForm::Recurrent)] {
                let n = t1 - t0;
                let x = DeltaRule {
                    q: &up(be, vec![n, nk, dk], &q[t0 * nk * dk..t1 * nk * dk]),
                    k: &up(be, vec![n, nk, dk], &k[t0 * nk * dk..t1 * nk * dk]),
                    v: &up(be, vec![n, nv, dv], &v[t0 * nv * dv..t1 * nv * dv]),
                    g: &up(be, vec![n, nv], &g[t0 * nv..t1 * nv]),
                    beta: &up(be, vec![n, nv], &beta[t0 * nv..t1 * nv]),
                };
                let mut out = up(be, vec![n, nv, dv], &vec![f32::NAN; n * nv * dv]);
                be.deltanet().expect("DeltaNet ops").delta_rule(x, &mut state, &mut out, form).expect("delta rule");
                outs.push(host(be, &out));
            }
            outs.push(host(be, &state));
            outs
        };
        for cpu_form in [DeltaForm::Recurrent, DeltaForm::Chunked] {
            for gpu_form in [DeltaForm::Recurrent, DeltaForm::Chunked] {
                check(
                    &format!("delta_rule dk {dk} dv {dv} (CPU {cpu_form:?}, GPU {gpu_form:?})"),
                    (run(&cpu, cpu_form), run(&gpu, gpu_form)),
                    1e-4,
                );
            }
        }
    }
}

/// The fused decode ops (`FusedOps`: the residual add as the GEMV's epilogue, gate/up with
/// SiLU·mul in one launch) against the CPU backend's composed ops, and bit for bit against the
/// CUDA backend's own composed ops; shapes the GEMV does not cover (16 rows, a bias) fall back
/// to the composed form.
#[test]
fn fused_decode_ops_match_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    for wt in [DType::BF16, DType::F16] {
        for &(t, k, n, biased) in &[
            (1usize, 576usize, 1536usize, false),
            (3, 64, 40, false),
            (8, 256, 72, false),
            (16, 64, 24, false),
            (2, 64, 24, true),
        ] {
            let (x, acc0) = (random(t * k, 1.0), random(t * n, 1.0));
            let (wg, wu) = (host(wt, vec![n, k], &random(n * k, 0.2)), host(wt, vec![n, k], &random(n * k, 0.2)));
            let bias = host(DType::F32, vec![n], &random(n, 1.0));
            // The same calls on either backend.
            let run = |be: &dyn Backend| -> (Vec<f32>, Vec<f32>) {
                let xt = be.upload_f32(vec![t, k], &x).expect("x");
                let (g, u, b) =
                    (be.upload(&wg).expect("gate"), be.upload(&wu).expect("up"), be.upload(&bias).expect("bias"));
                let b = biased.then_some(&b);
                let (mut s1, mut s2) = (be.zeros(vec![t, n]).expect("g"), be.zeros(vec![t, n]).expect("u"));
                let mut out = be.upload_f32(vec![t, n], &vec![f32::NAN; t * n]).expect("out");
                be.matmul_swiglu(&xt, ((&g, b), (&u, None)), (&mut s1, &mut s2), &mut out).expect("swiglu");
                // acc [T, n] += x · gateᵀ
                let mut acc = be.upload_f32(vec![t, n], &acc0).expect("acc");
                be.matmul_add(&xt, (&g, b), &mut s1, &mut acc).expect("matmul_add");
                (be.to_host_f32(&out).expect("out"), be.to_host_f32(&acc).expect("acc"))
            };
            let (want_sw, want_add) = run(&cpu);
            let (got_sw, got_add) = run(&gpu);
            let case = format!("{wt} t={t} k={k} n={n} bias={biased}");
            assert!(got_sw.iter().chain(&got_add).all(|v| v.is_finite()), "{case}: unwritten outputs");
            let (e_sw, e_add) = (rel_err(&got_sw, &want_sw), rel_err(&got_add, &want_add));
            eprintln!("fused {case}: swiglu rel err {e_sw:.2e}, matmul_add rel err {e_add:.2e}");
            let tol = matmul_tolerance(wt, t);
            assert!(
                e_sw < tol && e_add < tol,
                "fused {case}: swiglu {e_sw:e}, matmul_add {e_add:e} (tolerance {tol:e})"
            );
            // The CUDA backend's composed ops give the same bits.
            let xt = gpu.upload_f32(vec![t, k], &x).expect("x");
            let (g, u, b) =
                (gpu.upload(&wg).expect("gate"), gpu.upload(&wu).expect("up"), gpu.upload(&bias).expect("bias"));
            let b = biased.then_some(&b);
            let (mut s1, mut s2, mut out) = (
                gpu.zeros(vec![t, n]).expect("g"),
                gpu.zeros(vec![t, n]).expect("u"),
                gpu.zeros(vec![t, n]).expect("o"),
            );
            ollm_ops::backend::matmul_swiglu_composed(&gpu, &xt, ((&g, b), (&u, None)), (&mut s1, &mut s2), &mut out)
                .expect("composed swiglu");
            let mut acc = gpu.upload_f32(vec![t, n], &acc0).expect("acc");
            ollm_ops::backend::matmul_add_composed(&gpu, &xt, (&g, b), &mut s1, &mut acc).expect("composed add");
            let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same(&gpu.to_host_f32(&out).expect("o"), &got_sw), "{case}: fused swiglu differs from composed");
            assert!(same(&gpu.to_host_f32(&acc).expect("a"), &got_add), "{case}: fused add differs from composed");
        }
    }
}

/// The attention block's norm and projections in one launch (`norm_matmul_qkv`) against the
/// CPU's composed ops (rms_norm, three matmuls), and bit for bit against the CUDA backend's own
/// composed ops (its rms over 256 threads is recomputed in the same order by the GEMV's 128);
/// a bias or 16 rows fall back to the composed form.
#[test]
fn fused_norm_qkv_matches_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    let cases = [
        // (t, hidden, nq, nk, nv, bias)
        (1usize, 576usize, 576usize, 192usize, 192usize, false),
        (3, 64, 64, 32, 32, false),
        (8, 1000, 128, 64, 64, false),
        (16, 64, 64, 32, 32, false),
        (2, 64, 64, 32, 32, true),
    ];
    for wt in [DType::BF16, DType::F16] {
        for nt in [DType::F32, DType::BF16, DType::F16] {
            for kind in [NormKind::Llama, NormKind::ZeroCentered] {
                for &(t, h, nq, nk, nv, biased) in &cases {
                    let x = random(t * h, 2.0);
                    let nw = host(nt, vec![h], &random(h, 1.0));
                    let ws: Vec<HostTensor> =
                        [nq, nk, nv].iter().map(|&n| host(wt, vec![n, h], &random(n * h, 0.2))).collect();
                    let bias = host(DType::F32, vec![nk], &random(nk, 1.0));
                    // fused: whether to call the fused op or the composed one.
                    let run = |be: &dyn Backend, fused: bool| -> Vec<Vec<f32>> {
                        let xt = be.upload_f32(vec![t, h], &x).expect("x");
                        let nwt = be.upload(&nw).expect("norm");
                        let w: Vec<Tensor> = ws.iter().map(|w| be.upload(w).expect("w")).collect();
                        let b = be.upload(&bias).expect("bias");
                        let b = biased.then_some(&b);
                        let mut normed = be.zeros(vec![t, h]).expect("normed");
                        let mut outs: Vec<Tensor> = [nq, nk, nv]
                            .iter()
                            .map(|&n| be.upload_f32(vec![t, n], &vec![f32::NAN; t * n]).expect("out"))
                            .collect();
                        let [qo, ko, vo] = &mut outs[..] else { unreachable!() };
                        let weights = [(&w[0], None), (&w[1], b), (&w[2], None)];
                        let norm = (&nwt, 1e-5, kind);
                        if fused {
                            be.norm_matmul_qkv(&xt, norm, weights, &mut normed, [qo, ko, vo]).expect("fused");
                        } else {
                            ollm_ops::backend::norm_qkv_composed(be, &xt, norm, weights, &mut normed, [qo, ko, vo])
                                .expect("composed");
                        }
                        outs.iter().map(|o| be.to_host_f32(o).expect("down")).collect()
                    };
                    let want = run(&cpu, true);
                    let got = run(&gpu, true);
                    let composed = run(&gpu, false);
                    let case = format!("{wt} norm {nt} {kind:?} t={t} h={h} q/k/v={nq}/{nk}/{nv} bias={biased}");
                    for (i, name) in ["q", "k", "v"].iter().enumerate() {
                        assert!(got[i].iter().all(|v| v.is_finite()), "{case}: {name} unwritten");
                        let e = rel_err(&got[i], &want[i]);
                        let tol = matmul_tolerance(wt, t);
                        assert!(e < tol, "norm_qkv {case}: {name} rel err {e:e} (tolerance {tol:e})");
                        let same = got[i].iter().zip(&composed[i]).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "norm_qkv {case}: {name} differs from CUDA's composed ops");
                    }
                }
            }
        }
    }
    eprintln!("norm_qkv: {} cases within 1e-5 of the CPU, bit-equal to the composed ops", 2 * 3 * 2 * cases.len());
}

/// A RoPE table `[positions, r/2]` of angles `p · θᵢ` on `be`.
fn rope_table(be: &dyn Backend, positions: usize, r: usize) -> ollm_ops::RopeTable {
    let half = r / 2;
    let ang = |p: usize, i: usize| p as f32 * 10000f32.powf(-(2.0 * i as f32) / r as f32);
    let cos: Vec<f32> = (0..positions * half).map(|j| ang(j / half, j % half).cos()).collect();
    let sin: Vec<f32> = (0..positions * half).map(|j| ang(j / half, j % half).sin()).collect();
    ollm_ops::RopeTable {
        cos: be.upload_f32(vec![positions, half], &cos).expect("cos"),
        sin: be.upload_f32(vec![positions, half], &sin).expect("sin"),
        rotary_dims: r,
    }
}

/// RoPE of q and k and the KV append in one launch (`rope_write_kv`) against the CPU's
/// composed ops (q and k within 1e-5; the bf16 caches within bf16 rounding of the CPU's f32
/// cache), and bit for bit against the CUDA backend's composed ops (rope, rope, write_kv ×2).
#[test]
fn fused_rope_write_kv_matches_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    // (t, nh, nkv, d, r, cap, pos0, row0)
    let cases = [
        (1usize, 9usize, 3usize, 64usize, 64usize, 40usize, 17usize, 17usize),
        (3, 4, 2, 128, 64, 16, 5, 2),
        (1, 32, 8, 128, 128, 300, 260, 260),
        (2, 2, 2, 32, 16, 8, 0, 6),
    ];
    for &(t, nh, nkv, d, r, cap, pos0, row0) in &cases {
        let (q0, k0, v0) = (random(t * nh * d, 1.0), random(t * nkv * d, 1.0), random(t * nkv * d, 1.0));
        let (kc0, vc0) = (random(nkv * cap * d, 1.0), random(nkv * cap * d, 1.0));
        let run = |be: &dyn Backend, fused: bool| -> Vec<Vec<f32>> {
            let table = rope_table(be, pos0 + t + 3, r);
            let mut q = be.upload_f32(vec![t, nh, d], &q0).expect("q");
            let mut k = be.upload_f32(vec![t, nkv, d], &k0).expect("k");
            let v = be.upload_f32(vec![t, nkv, d], &v0).expect("v");
            let mut kc = be.kv_zeros(vec![nkv, cap, d]).expect("kc");
            let mut vc = be.kv_zeros(vec![nkv, cap, d]).expect("vc");
            // Fill the caches with old rows, which the call must leave alone.
            be.write_kv(&mut kc, &be.upload_f32(vec![cap, nkv, d], &kc0).expect("kc0"), 0).expect("fill k");
            be.write_kv(&mut vc, &be.upload_f32(vec![cap, nkv, d], &vc0).expect("vc0"), 0).expect("fill v");
            if fused {
                be.rope_write_kv((&mut q, &mut k, &v), (&table, pos0), (&mut kc, &mut vc), row0).expect("fused");
            } else {
                ollm_ops::backend::rope_write_kv_composed(
                    be,
                    (&mut q, &mut k, &v),
                    (&table, pos0),
                    (&mut kc, &mut vc),
                    row0,
                )
                .expect("composed");
            }
            [&q, &k, &kc, &vc].iter().map(|x| be.to_host_f32(x).expect("down")).collect()
        };
        let want = run(&cpu, true);
        let got = run(&gpu, true);
        let composed = run(&gpu, false);
        let case = format!("t={t} heads {nh}/{nkv} d={d} r={r} cap={cap} pos0={pos0} row0={row0}");
        for (i, (name, tol)) in [("q", 1e-5), ("k", 1e-5), ("k cache", 4e-3), ("v cache", 4e-3)].iter().enumerate() {
            let e = rel_err(&got[i], &want[i]);
            assert!(e < *tol, "rope_write_kv {case}: {name} rel err {e:e}");
            let same = got[i].iter().zip(&composed[i]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "rope_write_kv {case}: {name} differs from CUDA's composed ops");
        }
        eprintln!("rope_write_kv {case}: ok");
    }
}

/// The `_step` kernels a captured decode step launches (RoPE, the KV write, split decode
/// attention, the fused RoPE + KV write, the embedding), run eagerly through
/// `CudaDevice::run_as_step` with a position shift s: each at position p must equal its plain
/// form at p + s bit for bit. Shifts stay inside what a graph captured at p serves (its rows
/// and its decode attention's split plan).
#[test]
fn step_kernels_match_plain_forms_with_the_shift() {
    let Some(gpu) = backend() else { return };
    let (nh, nkv, d, r, cap, vocab) = (8usize, 2usize, 64usize, 64usize, 512usize, 50usize);
    let table = rope_table(&gpu, cap, r);
    let keys = random(cap * nkv * d, 1.0);
    let vals = random(cap * nkv * d, 1.0);
    let emb = host(DType::BF16, vec![vocab, 16], &random(vocab * 16, 1.0));
    let emb = gpu.upload(&emb).expect("embedding table");
    let same = |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    // (t, p, shift): p + t and p + s + t in one power-of-two bucket of 256-key slices.
    for &(t, p, s) in &[(1usize, 20usize, 100usize), (1, 300, 0), (1, 300, 150), (3, 260, 200), (2, 40, 7)] {
        let case = format!("t={t} p={p} shift={s}");
        let q0 = random(t * nh * d, 1.0);
        let (k0, v0) = (random(t * nkv * d, 1.0), random(t * nkv * d, 1.0));
        let ids: Vec<u32> = (0..t as u32).map(|i| (7 * i + 3) % vocab as u32).collect();
        // Both ways: `step` runs the ops at p through run_as_step, else plainly at p + s.
        let run = |step: bool| -> Vec<Vec<f32>> {
            let at = if step { p } else { p + s };
            let mut q = gpu.upload_f32(vec![t, nh, d], &q0).expect("q");
            let mut q2 = gpu.upload_f32(vec![t, nh, d], &q0).expect("q2");
            let mut k = gpu.upload_f32(vec![t, nkv, d], &k0).expect("k");
            let v = gpu.upload_f32(vec![t, nkv, d], &v0).expect("v");
            let mut kc = gpu.kv_zeros(vec![nkv, cap, d]).expect("kc");
            let mut vc = gpu.kv_zeros(vec![nkv, cap, d]).expect("vc");
            gpu.write_kv(&mut kc, &gpu.upload_f32(vec![cap, nkv, d], &keys).expect("keys"), 0).expect("fill k");
            gpu.write_kv(&mut vc, &gpu.upload_f32(vec![cap, nkv, d], &vals).expect("vals"), 0).expect("fill v");
            let (mut kc2, mut vc2) =
                (gpu.kv_zeros(vec![nkv, cap, d]).expect("kc2"), gpu.kv_zeros(vec![nkv, cap, d]).expect("vc2"));
            let mut ctx = gpu.upload_f32(vec![t, nh, d], &vec![f32::NAN; t * nh * d]).expect("ctx");
            let mut x = gpu.upload_f32(vec![t, 16], &vec![f32::NAN; t * 16]).expect("x");
            let plain_ids: Vec<u32> = ids.iter().map(|i| (i + 1) % vocab as u32).collect();
            let mut ops = || -> ollm_ops::Result<()> {
                // In step mode the ids come from the step buffer, not from this argument.
                gpu.embedding(&emb, if step { &plain_ids } else { &ids }, &mut x)?;
                gpu.rope(&mut q, &table, at)?;
                gpu.write_kv(&mut kc, &k, at)?;
                gpu.write_kv(&mut vc, &v, at)?;
                let params = ollm_ops::AttnParams { scale: 0.125, window: None, sinks: None, origin: 0 };
                gpu.attention(&q, &kc, &vc, at, &params, &mut ctx)?;
                gpu.rope_write_kv((&mut q2, &mut k, &v), (&table, at), (&mut kc2, &mut vc2), at)
            };
            if step {
                gpu.device().run_as_step(s as i64, &ids, ops).expect("step kernels");
            } else {
                ops().expect("plain kernels");
            }
            [&x, &q, &kc, &vc, &ctx, &q2, &k, &kc2, &vc2].iter().map(|x| gpu.to_host_f32(x).expect("down")).collect()
        };
        let (stepped, plain) = (run(true), run(false));
        let names = [
            "embedding",
            "rope",
            "write_kv k",
            "write_kv v",
            "decode attention",
            "rope_write_kv q",
            "rope_write_kv k",
            "rope_write_kv k cache",
            "rope_write_kv v cache",
        ];
        for (i, name) in names.iter().enumerate() {
            assert!(plain[i].iter().all(|v| v.is_finite()), "{case}: {name} unwritten");
            assert!(
                same(&stepped[i], &plain[i]),
                "{case}: the _step form of {name} differs from the plain one at p + shift"
            );
        }
        eprintln!("step kernels {case}: equal to the plain forms");
    }
}

/// The MLP's norm folded into the gate/up launch (`norm_matmul_swiglu`) against the CPU's
/// composed ops (rms_norm, two matmuls, silu_mul) and bit for bit against CUDA's composed ops;
/// a bias or 16 rows fall back to the composed form.
#[test]
fn fused_norm_swiglu_matches_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    let cases = [
        (1usize, 576usize, 1536usize, false),
        (3, 64, 40, false),
        (8, 256, 72, false),
        (16, 64, 24, false),
        (2, 64, 24, true),
    ];
    for wt in [DType::BF16, DType::F16] {
        for nt in [DType::F32, DType::BF16] {
            for kind in [NormKind::Llama, NormKind::ZeroCentered] {
                for &(t, h, n, biased) in &cases {
                    let x = random(t * h, 2.0);
                    let nw = host(nt, vec![h], &random(h, 1.0));
                    let (wg, wu) =
                        (host(wt, vec![n, h], &random(n * h, 0.2)), host(wt, vec![n, h], &random(n * h, 0.2)));
                    let bias = host(DType::F32, vec![n], &random(n, 1.0));
                    let run = |be: &dyn Backend, fused: bool| -> Vec<f32> {
                        let xt = be.upload_f32(vec![t, h], &x).expect("x");
                        let nwt = be.upload(&nw).expect("norm");
                        let (g, u, b) =
                            (be.upload(&wg).expect("g"), be.upload(&wu).expect("u"), be.upload(&bias).expect("b"));
                        let b = biased.then_some(&b);
                        let mut normed = be.zeros(vec![t, h]).expect("normed");
                        let (mut s1, mut s2) = (be.zeros(vec![t, n]).expect("g"), be.zeros(vec![t, n]).expect("u"));
                        let mut out = be.upload_f32(vec![t, n], &vec![f32::NAN; t * n]).expect("out");
                        let (norm, weights) = ((&nwt, 1e-5, kind), ((&g, None), (&u, b)));
                        let scratch = (&mut normed, &mut s1, &mut s2);
                        if fused {
                            be.norm_matmul_swiglu(&xt, norm, weights, scratch, &mut out).expect("fused");
                        } else {
                            ollm_ops::backend::norm_swiglu_composed(be, &xt, norm, weights, scratch, &mut out)
                                .expect("composed");
                        }
                        be.to_host_f32(&out).expect("down")
                    };
                    let (want, got, composed) = (run(&cpu, true), run(&gpu, true), run(&gpu, false));
                    let case = format!("{wt} norm {nt} {kind:?} t={t} h={h} n={n} bias={biased}");
                    assert!(got.iter().all(|v| v.is_finite()), "{case}: unwritten");
                    let e = rel_err(&got, &want);
                    let tol = matmul_tolerance(wt, t);
                    assert!(e < tol, "norm_swiglu {case}: rel err {e:e} (tolerance {tol:e})");
                    assert!(
                        got.iter().zip(&composed).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "norm_swiglu {case}: differs from CUDA's composed ops"
                    );
                }
            }
        }
    }
}

/// How a grouped-experts case routes its tokens.
#[derive(Debug, Clone, Copy)]
enum Routing {
    /// k distinct experts per token, uniformly.
    Uniform,
    /// Expert 0 takes most tokens, the last expert none.
    Skewed,
    /// k = 1 and every token goes to expert 1 (the others have 0 rows).
    AllToOne,
}

/// Per expert, its rows (ascending) and weights, for `t` tokens choosing `k` of `e` experts;
/// every seventh token (3, 10, ...) is routed nowhere (as if its experts ran in another group),
/// so its acc row must stay as it was.
fn route_for_test(t: usize, e: usize, k: usize, routing: Routing) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut per: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); e];
    let scores = random(t * e, 1.0);
    let ws = random(t * k, 0.5);
    for tok in (0..t).filter(|tok| tok % 7 != 3) {
        let mut order: Vec<usize> = (0..e).collect();
        let score = |x: usize| match routing {
            Routing::Uniform => scores[tok * e + x],
            Routing::Skewed if x == 0 => 0.9 + scores[tok * e] * 0.2,
            Routing::Skewed if x == e - 1 => -2.0,
            Routing::Skewed => scores[tok * e + x],
            Routing::AllToOne => f32::from(x == 1),
        };
        order.sort_by(|&a, &b| score(b).partial_cmp(&score(a)).unwrap_or(Ordering::Equal));
        for (j, &x) in order.iter().take(k).enumerate() {
            per[x].0.push(tok as u32);
            per[x].1.push(0.5 + ws[tok * k + j]);
        }
    }
    per
}

/// One expert's weights on a backend, in the layout the expert cache's slots hold.
struct TestExpert {
    gate_up: Vec<Tensor>,
    up: Option<Tensor>,
    down: Vec<Tensor>,
    gate_up_bias: Option<Tensor>,
    down_bias: Option<Tensor>,
}

/// Weight formats of a grouped-experts case.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ExpertFormat {
    /// GPT-OSS: MXFP4 interleaved gate_up [2I, H] and down [H, I], biases of `bias` dtype.
    Mxfp4(DType),
    /// Interleaved gate_up, bf16 (GPT-OSS's dense checkpoints), biases of `bias` dtype.
    Bf16(DType),
    /// Qwen3-Next: separate bf16 gate and up [I, H], down [H, I], no biases.
    Bf16Pair,
}

/// Random experts as host tensors (the same bytes go to both backends).
fn random_experts(e: usize, h: usize, inter: usize, format: ExpertFormat) -> Vec<Vec<Option<HostTensor>>> {
    let codes = |n: usize, k: usize| -> [HostTensor; 2] {
        let b = random(n * k / 2, 1.0).iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
        // Scales 2^-4 .. 2^-1 keep the products near 1.
        let s = random(n * k / 32, 1.0).iter().map(|v| (123.0 + (v + 1.0) * 1.99) as u8).collect();
        [
            HostTensor { dtype: DType::U8, shape: vec![n, k / 32, 16], bytes: b },
            HostTensor { dtype: DType::U8, shape: vec![n, k / 32], bytes: s },
        ]
    };
    let dense = |n: usize, k: usize| host(DType::BF16, vec![n, k], &random(n * k, 1.0 / (k as f32).sqrt()));
    (0..e)
        .map(|_| match format {
            ExpertFormat::Mxfp4(bias) => {
                let [gb, gs] = codes(2 * inter, h);
                let [db, ds] = codes(h, inter);
                vec![
                    Some(gb),
                    Some(gs),
                    None,
                    Some(db),
                    Some(ds),
                    Some(host(bias, vec![2 * inter], &random(2 * inter, 0.5))),
                    Some(host(bias, vec![h], &random(h, 0.5))),
                ]
            }
            ExpertFormat::Bf16(bias) => vec![
                Some(dense(2 * inter, h)),
                None,
                None,
                Some(dense(h, inter)),
                None,
                Some(host(bias, vec![2 * inter], &random(2 * inter, 0.5))),
                Some(host(bias, vec![h], &random(h, 0.5))),
            ],
            ExpertFormat::Bf16Pair => {
                vec![Some(dense(inter, h)), None, Some(dense(inter, h)), Some(dense(h, inter)), None, None, None]
            }
        })
        .collect()
}

fn upload_expert(be: &dyn Backend, parts: &[Option<HostTensor>]) -> TestExpert {
    let up = |i: usize| parts[i].as_ref().map(|p| be.upload(p).expect("expert part"));
    TestExpert {
        gate_up: [up(0), up(1)].into_iter().flatten().collect(),
        up: up(2),
        down: [up(3), up(4)].into_iter().flatten().collect(),
        gate_up_bias: up(5),
        down_bias: up(6),
    }
}

fn matrix_ref(parts: &[Tensor]) -> ollm_ops::ExpertMatrixRef<'_> {
    match parts {
        [blocks, scales] => ollm_ops::ExpertMatrixRef::Mxfp4 { blocks, scales },
        [w] => ollm_ops::ExpertMatrixRef::Dense(w),
        _ => panic!("an expert matrix is one tensor or blocks and scales"),
    }
}

/// The grouped MoE expert kernels (issue 27 point 3: two grouped GEMMs and a combine per piece of
/// routes) against the per-expert loop on the CPU and on the GPU itself (gather, GEMMs,
/// activation, scatter-add), on fresh random weights and inputs from the printed seed: MXFP4 and
/// bf16 GPT-OSS experts (clamped SwiGLU, f32 and bf16 biases) and bf16 Qwen3-Next experts
/// (SiLU, separate gate and up); uniform and skewed routing, experts with 0 rows, one expert
/// with all routed rows, rows routed nowhere left unchanged, tiles cut at 64 rows and partial
/// output tiles (H = 160, 2I = 192), and 2,500 tokens (2,143 routed) × 2 = 4,286 routes, more
/// than one piece of at most 4,096.
#[test]
fn grouped_experts_match_cpu() {
    let Some(gpu) = backend() else { return };
    let cpu = CpuBackend::new();
    let (h, inter, e) = (160usize, 96usize, 6usize);
    let cases = [
        (ExpertFormat::Mxfp4(DType::BF16), Routing::Uniform, 150, 2),
        (ExpertFormat::Mxfp4(DType::F32), Routing::Skewed, 300, 3),
        (ExpertFormat::Mxfp4(DType::BF16), Routing::AllToOne, 130, 1),
        (ExpertFormat::Mxfp4(DType::BF16), Routing::Uniform, 2500, 2),
        (ExpertFormat::Bf16(DType::BF16), Routing::Skewed, 200, 2),
        (ExpertFormat::Bf16Pair, Routing::Uniform, 180, 4),
        (ExpertFormat::Bf16Pair, Routing::AllToOne, 70, 1),
    ];
    let mut several_pieces = false;
    for (format, routing, t, k) in cases {
        let routes = route_for_test(t, e, k, routing);
        several_pieces |= routes.iter().map(|(r, _)| r.len()).sum::<usize>() > ollm_ops::GROUPED_PIECE_ROUTES;
        let weights = random_experts(e, h, inter, format);
        let x = random(t * h, 1.0);
        let acc0 = random(t * h, 1.0);
        let act = match format {
            ExpertFormat::Bf16Pair => ollm_ops::ExpertAct::SiluMul,
            _ => ollm_ops::ExpertAct::ClampedSwiglu { limit: 7.0, alpha: 1.702 },
        };
        // (CPU loop, GPU loop, GPU grouped)
        let mut outs = Vec::new();
        for (be, grouped) in [(&cpu as &dyn Backend, false), (&gpu, false), (&gpu, true)] {
            let experts: Vec<TestExpert> = weights.iter().map(|w| upload_expert(be, w)).collect();
            let refs: Vec<ollm_ops::RoutedExpert<'_>> = experts
                .iter()
                .zip(&routes)
                .map(|(w, (rows, ws))| ollm_ops::RoutedExpert {
                    gate_up: matrix_ref(&w.gate_up),
                    up: w.up.as_ref().map(ollm_ops::ExpertMatrixRef::Dense),
                    down: matrix_ref(&w.down),
                    gate_up_bias: w.gate_up_bias.as_ref(),
                    down_bias: w.down_bias.as_ref(),
                    rows,
                    weights: ws,
                })
                .collect();
            let xt = be.upload_f32(vec![t, h], &x).expect("x");
            let mut acc = be.upload_f32(vec![t, h], &acc0).expect("acc");
            if grouped {
                let ran = be.moe().expect("MoE ops").grouped_experts(&xt, &refs, act, &mut acc).expect("grouped");
                assert!(ran, "{format:?}: the CUDA backend has grouped kernels for these experts");
            } else {
                ollm_ops::experts_by_expert(be, &xt, &refs, act, &mut acc, 1024).expect("per-expert loop");
            }
            outs.push(be.to_host_f32(&acc).expect("acc"));
        }
        assert!(outs[2].iter().all(|v| v.is_finite()), "{format:?} {routing:?}: non-finite outputs");
        let vs_cpu = rel_err(&outs[2], &outs[0]);
        let vs_loop = rel_err(&outs[2], &outs[1]);
        let loop_vs_cpu = rel_err(&outs[1], &outs[0]);
        eprintln!(
            "grouped experts {format:?} {routing:?} t={t} k={k}: rel err {vs_cpu:.2e} vs CPU, {vs_loop:.2e} vs the \
             GPU loop (GPU loop vs CPU {loop_vs_cpu:.2e})"
        );
        // Both GPU paths round x and the activation to bf16; the CPU keeps f32 activations.
        assert!(vs_cpu < 5e-3, "{format:?} {routing:?}: rel err {vs_cpu:e} against the CPU (tolerance 5e-3)");
        assert!(vs_loop < 1e-3, "{format:?} {routing:?}: rel err {vs_loop:e} against the GPU loop (tolerance 1e-3)");
        // Only the routed rows changed.
        let touched: std::collections::HashSet<u32> = routes.iter().flat_map(|(r, _)| r.iter().copied()).collect();
        assert!(touched.len() < t, "some rows are left unrouted");
        for row in (0..t as u32).filter(|r| !touched.contains(r)) {
            let r = row as usize;
            assert_eq!(&outs[2][r * h..(r + 1) * h], &acc0[r * h..(r + 1) * h], "row {row} was not routed");
        }
    }
    assert!(several_pieces, "one case spans more than one piece of routes");
    // f32 expert weights have no grouped kernel: the call says so and leaves acc alone.
    let w = gpu.upload_f32(vec![2 * 32, 32], &random(2 * 32 * 32, 1.0)).expect("w");
    let d = gpu.upload_f32(vec![32, 32], &random(32 * 32, 1.0)).expect("d");
    let rows = [0u32];
    let one = ollm_ops::RoutedExpert {
        gate_up: ollm_ops::ExpertMatrixRef::Dense(&w),
        up: None,
        down: ollm_ops::ExpertMatrixRef::Dense(&d),
        gate_up_bias: None,
        down_bias: None,
        rows: &rows,
        weights: &[1.0],
    };
    let x = gpu.upload_f32(vec![1, 32], &random(32, 1.0)).expect("x");
    let mut acc = gpu.zeros(vec![1, 32]).expect("acc");
    let act = ollm_ops::ExpertAct::ClampedSwiglu { limit: 7.0, alpha: 1.702 };
    assert!(!gpu.grouped_experts(&x, &[one], act, &mut acc).expect("f32 experts"), "f32 experts are not grouped");
    assert!(gpu.to_host_f32(&acc).expect("acc").iter().all(|&v| v == 0.0));
}

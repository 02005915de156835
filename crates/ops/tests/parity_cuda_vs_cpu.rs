//! Every CUDA kernel against its CPU twin on fresh random inputs, outputs poisoned before each
//! run. On a machine without a usable GPU the test checks that probing fails with a clear
//! one-line message (no panic) and skips the kernels.

#![cfg(feature = "cuda")]

use cudarc::driver::CudaSlice;
use half::bf16;
use ollm_ops::cuda::{self, CudaDevice, probe};
use ollm_ops::{NormKind, cpu};

/// Fresh pseudo-random values in [-scale, scale), seeded by the clock so every run differs.
fn random(n: usize, scale: f32) -> Vec<f32> {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    let mut s = (clock ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// ‖a − b‖ / ‖b‖
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The device, or None after checking that the failure is one clear line (no panic).
fn device() -> Option<CudaDevice> {
    match probe(0) {
        Ok(d) => Some(d),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n') && msg.contains("--device cpu"), "{msg}");
            eprintln!("SKIPPED: no usable CUDA device ({msg})");
            None
        }
    }
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

#[test]
fn elementwise_ops_match_cpu() {
    let Some(dev) = device() else { return };
    // embedding
    let (vocab, hidden) = (300, 96);
    let table = bf16s(&random(vocab * hidden, 1.0));
    let ids: Vec<u32> = random(11, 1.0).iter().map(|x| ((x.abs() * 1e4) as u32) % vocab as u32).collect();
    let mut want = vec![0.0; ids.len() * hidden];
    cpu::embedding(&ollm_ops::CpuStorage::BF16(table.clone()), hidden, &ids, &mut want);
    let mut out = poisoned(&dev, want.len());
    cuda::elementwise::embedding(&dev, &up(&dev, &table), &up(&dev, &ids), hidden, &mut out).expect("embedding");
    assert_eq!(down(&dev, &out), want, "embedding is a copy: exact");
    // silu_mul
    let (g, u) = (random(5000, 6.0), random(5000, 2.0));
    let mut want = vec![0.0; 5000];
    cpu::silu_mul(&g, &u, &mut want);
    let mut out = poisoned(&dev, 5000);
    cuda::elementwise::silu_mul(&dev, &up(&dev, &g), &up(&dev, &u), &mut out).expect("silu_mul");
    let e = rel_err(&down(&dev, &out), &want);
    assert!(e < 1e-6, "silu_mul rel err {e:e}");
    // add_assign
    let (x, y) = (random(777, 1.0), random(777, 1.0));
    let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
    let mut xd = up(&dev, &x);
    cuda::elementwise::add_assign(&dev, &mut xd, &up(&dev, &y)).expect("add");
    assert_eq!(down(&dev, &xd), want, "add is exact");
    // write_kv: [T=3, n_kv=2, d=4] into [2, 8, 4] at position 5; the rest stays as it was.
    let (t, n_kv, cap, d, pos0) = (3, 2, 8, 4, 5);
    let src = random(t * n_kv * d, 1.0);
    let before = random(n_kv * cap * d, 1.0);
    let mut want = before.clone();
    for ti in 0..t {
        for h in 0..n_kv {
            for c in 0..d {
                want[(h * cap + pos0 + ti) * d + c] = src[(ti * n_kv + h) * d + c];
            }
        }
    }
    let mut cache = up(&dev, &before);
    let g = cuda::elementwise::KvGeometry { n_kv, cap, d };
    cuda::elementwise::write_kv(&dev, &mut cache, &up(&dev, &src), g, pos0).expect("write_kv");
    assert_eq!(down(&dev, &cache), want);
    assert!(cuda::elementwise::write_kv(&dev, &mut cache, &up(&dev, &src), g, 6).is_err(), "past the capacity");
}

#[test]
fn matmul_matches_cpu() {
    let Some(dev) = device() else { return };
    for &(t, k, n) in &[(1usize, 576usize, 1536usize), (3, 100, 33), (17, 256, 520)] {
        let x = random(t * k, 1.0);
        let w = bf16s(&random(n * k, 0.2));
        let mut want = vec![0.0; t * n];
        cpu::matmul(&x, t, k, &ollm_ops::CpuStorage::BF16(w.clone()), n, None, &mut want);
        let mut out = poisoned(&dev, t * n);
        cuda::matmul::matmul(&dev, &up(&dev, &x), &up(&dev, &w), n, k, &mut out).expect("matmul");
        let e = rel_err(&down(&dev, &out), &want);
        assert!(e < 1e-5, "matmul t={t} k={k} n={n}: rel err {e:e}");
    }
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
        let k = random(nkv * cap * d, 1.0);
        let v = random(nkv * cap * d, 1.0);
        let sinks = random(nh, 2.0);
        let scale = (d as f32).powf(-0.5);
        let geo = cpu::AttnGeometry { n_heads: nh, n_kv: nkv, d, cap, pos0 };
        let mut want = vec![0.0; q.len()];
        cpu::attention(&q, &k, &v, &geo, scale, window, with_sinks.then_some(&sinks[..]), &mut want);
        let g = cuda::attention::AttnGeometry { n_heads: nh, n_kv: nkv, d, cap, pos0 };
        let sinks_d = up(&dev, &sinks);
        let mut out = poisoned(&dev, q.len());
        let s = with_sinks.then_some(&sinks_d);
        cuda::attention::attention(&dev, &up(&dev, &q), &up(&dev, &k), &up(&dev, &v), g, scale, window, s, &mut out)
            .expect("attention");
        let e = rel_err(&down(&dev, &out), &want);
        assert!(e < 1e-5, "attention t={t} d={d} pos0={pos0} window={window:?}: rel err {e:e}");
        eprintln!(
            "attention t={t} nh={nh} nkv={nkv} d={d} pos0={pos0} window={window:?} sinks={with_sinks}: rel err {e:.2e}"
        );
    }
}

#[test]
fn rmsnorm_matches_cpu() {
    let Some(dev) = device() else { return };
    eprintln!("device: {} (sm_{}{})", dev.info.name, dev.info.compute_capability.0, dev.info.compute_capability.1);
    for &(rows, n) in &[(1usize, 576usize), (7, 4096), (33, 2880), (5, 100)] {
        for kind in [NormKind::Llama, NormKind::ZeroCentered] {
            let x = random(rows * n, 3.0);
            let w: Vec<bf16> = random(n, 1.0).iter().map(|v| bf16::from_f32(1.0 + v * 0.2)).collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let mut want = vec![0.0f32; rows * n];
            cpu::rms_norm(&x, &wf, 1e-5, kind, &mut want);

            let xd = dev.stream.clone_htod(&x).expect("upload x");
            let wd = dev.stream.clone_htod(&w).expect("upload w");
            let mut outd = dev.stream.clone_htod(&vec![f32::NAN; rows * n]).expect("poisoned out");
            ollm_ops::cuda::rmsnorm::rms_norm(&dev, &xd, &wd, n, 1e-5, kind, &mut outd).expect("launch");
            let got = dev.stream.clone_dtoh(&outd).expect("download");
            assert!(got.iter().all(|v| v.is_finite()), "rows={rows} n={n}: unwritten or NaN outputs");
            let e = rel_err(&got, &want);
            // f32 math on both sides; only the summation order differs.
            assert!(e < 1e-5, "rows={rows} n={n} {kind:?}: relative error {e:e}");
            eprintln!("rmsnorm rows={rows} n={n} {kind:?}: rel err {e:.2e}");
        }
    }
}

//! Every CUDA kernel against its CPU twin on fresh random inputs, outputs poisoned before each
//! run. On a machine without a usable GPU the test checks that probing fails with a clear
//! one-line message (no panic) and skips the kernels.

#![cfg(feature = "cuda")]

use half::bf16;
use ollm_ops::cpu;
use ollm_ops::cuda::probe;
use ollm_ops::NormKind;

/// Fresh pseudo-random values in [-scale, scale), seeded by the clock so every run differs.
fn random(n: usize, scale: f32) -> Vec<f32> {
    let mut s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1;
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

#[test]
fn rmsnorm_matches_cpu() {
    let dev = match probe(0) {
        Ok(d) => d,
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n') && msg.contains("--device cpu"), "{msg}");
            eprintln!("SKIPPED: no usable CUDA device ({msg})");
            return;
        }
    };
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

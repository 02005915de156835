//! Kernel lab for the CPU matmul: every tier this CPU runs, on decode-, batch- and prefill-shaped
//! problems, printing GFLOP/s (and GB/s of weights for the bandwidth-bound shapes).
//!
//! `cargo run --release -p ollm-ops --example cpu_matmul_tiers [K N]` (default: SmolLM2's
//! 576 → 1536 and Llama-3.2-1B's 2048 → 8192). Threads: rayon's pool (`RAYON_NUM_THREADS`).

use std::time::Instant;

use half::bf16;
use ollm_ops::CpuStorage;
use ollm_ops::cpu::{Kernels, MatmulDims, Precision, Tier, matmul_with};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let shapes: Vec<(usize, usize)> = match args.as_slice() {
        [k, n] => vec![(*k, *n)],
        _ => vec![(576, 1536), (2048, 8192)],
    };
    println!("threads {}", rayon::current_num_threads());
    for (k, n) in shapes {
        let w =
            CpuStorage::BF16((0..n * k).map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5)).collect());
        for t in [1usize, 8, 64, 512] {
            let x: Vec<f32> = (0..t * k).map(|i| ((i * 104_729) % 997) as f32 / 997.0 - 0.5).collect();
            let mut out = vec![0.0f32; t * n];
            for tier in Tier::supported() {
                let Some(kern) = Kernels::for_tier(tier) else { continue };
                let precisions: &[Precision] = if kern.has_bf16_dot() {
                    &[Precision::Exact, Precision::Bf16Activations]
                } else {
                    &[Precision::Exact]
                };
                for &p in precisions {
                    let d = MatmulDims { t, k, n };
                    matmul_with(&kern, p, &x, d, &w, None, &mut out);
                    let reps = (2e9 / (2.0 * (t * k * n) as f64)).clamp(3.0, 2000.0) as usize;
                    let start = Instant::now();
                    for _ in 0..reps {
                        matmul_with(&kern, p, &x, d, &w, None, &mut out);
                    }
                    let s = start.elapsed().as_secs_f64() / reps as f64;
                    let gflops = 2.0 * (t * k * n) as f64 / s / 1e9;
                    let gbs = (2 * k * n) as f64 / s / 1e9;
                    println!(
                        "K {k:5} N {n:5} T {t:4} {tier:11} {p:?}: {:8.1} µs {gflops:7.1} GFLOP/s {gbs:6.1} GB/s of weights",
                        s * 1e6
                    );
                }
            }
        }
    }
}

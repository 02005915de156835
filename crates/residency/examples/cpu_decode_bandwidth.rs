//! Kernel lab for the CPU decode bound: one token through Llama-3.2-1B-shaped weights (16 layers
//! of q, k, v, o, gate, up, down in bf16, 1.95 GB, far past the caches), one matmul per weight as
//! a forward calls them, against a streaming read of a buffer as large — interleaved round by
//! round, so a noisy neighbour hits all alike. Two copies of the weights: as the backend allocates
//! them (`Memory::alloc` under [`HugePageAlloc`]: 2 MiB-aligned, advised huge) and advised huge at
//! wherever the C allocator put them (the placement before the aligned allocator). Prints GB/s.
//!
//! `cargo run --release -p ollm-residency --example cpu_decode_bandwidth [ROUNDS | read]`; threads:
//! rayon's pool (`RAYON_NUM_THREADS`). `read` prints only the memory read (best of 3 over 1 GiB).

use std::time::Instant;

use half::bf16;
use ollm_ops::cpu::{CpuBackend, HugePageAlloc, Kernels, MatmulJob, Precision, matmul_many_with};
use ollm_ops::{CpuStorage, DType, Memory, Storage};
use ollm_residency::measure::HostReader;
use rayon::prelude::*;

#[global_allocator]
static ALLOC: HugePageAlloc = HugePageAlloc;

const HUGE: usize = 2 << 20;

/// `n` zeroes whose whole 2 MiB pages are advised huge before the first write, wherever malloc
/// placed them.
fn advised_unaligned(n: usize) -> Vec<bf16> {
    let mut v: Vec<bf16> = Vec::with_capacity(n);
    let (start, len) = (v.as_mut_ptr() as usize, n * 2);
    let (first, end) = (start.next_multiple_of(HUGE), (start + len) / HUGE * HUGE);
    if end > first {
        // SAFETY: advice on whole pages inside this vector's own allocation; contents unchanged.
        unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
    }
    v.resize(n, bf16::ZERO);
    v
}

/// Llama-3.2-1B's hidden size, KV width, MLP width, layers and vocabulary.
const H: usize = 2048;
const KV: usize = 512;
const INTER: usize = 8192;
const LAYERS: usize = 16;
const VOCAB: usize = 128_256;
/// A layer's weights (rows, columns): q, k, v, o, gate, up, down.
const SHAPES: [(usize, usize); 7] = [(H, H), (KV, H), (KV, H), (H, H), (INTER, H), (INTER, H), (H, INTER)];

/// Deterministic values, different per layer `l`.
fn fill(w: &mut [bf16], l: usize) {
    w.par_iter_mut().enumerate().for_each(|(i, v)| *v = bf16::from_f32(((i + l) % 13) as f32 * 0.01))
}

/// An `[n, k]` bf16 weight as the backend allocates it (`Memory::alloc` under [`HugePageAlloc`]).
fn backend_weight(be: &CpuBackend, n: usize, k: usize, l: usize) -> CpuStorage {
    let mut t = be.alloc(vec![n, k], DType::BF16).expect("alloc");
    let Storage::Cpu(CpuStorage::BF16(w)) = t.storage_mut() else { unreachable!() };
    let mut w = std::mem::take(w);
    fill(&mut w, l);
    CpuStorage::BF16(w)
}

fn main() {
    let arg = std::env::args().nth(1);
    if arg.as_deref() == Some("read") {
        // Only the read, best of 3 over 1 GiB: what scripts/bench_cpu_llama.sh takes around each
        // llama.cpp run, which cannot read memory between its own steps as `ollm bench` does.
        let reader = HostReader::new(&CpuBackend::new(), 1 << 30).expect("read buffer");
        let best = (0..3).map(|_| reader.read().rate() / 1e9).fold(0.0, f64::max);
        println!("read {best:.1} GB/s");
        return;
    }
    if arg.as_deref() == Some("sched") {
        return sched(std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(12));
    }
    let rounds: usize = arg.and_then(|a| a.parse().ok()).unwrap_or(5);
    let (shapes, layers, inter) = (SHAPES, LAYERS, INTER);
    let kern = Kernels::active();
    let be = CpuBackend::new();
    let aligned: Vec<Vec<CpuStorage>> =
        (0..layers).map(|l| shapes.iter().map(|&(n, k)| backend_weight(&be, n, k, l)).collect()).collect();
    let unaligned: Vec<Vec<CpuStorage>> = (0..layers)
        .map(|l| {
            shapes
                .iter()
                .map(|&(n, k)| {
                    let mut w = advised_unaligned(n * k);
                    fill(&mut w, l);
                    CpuStorage::BF16(w)
                })
                .collect()
        })
        .collect();
    let bytes: usize = layers * shapes.iter().map(|(n, k)| n * k * 2).sum::<usize>();
    // The read `ollm bench` rates decode windows against (one contiguous share a thread).
    let reader = HostReader::new(&be, bytes).expect("read buffer");
    println!("threads {}, kernels {}, weights {:.2} GB", rayon::current_num_threads(), kern.tier(), bytes as f64 / 1e9);
    let x: Vec<f32> = (0..inter).map(|i| (i % 11) as f32 * 0.1 - 0.5).collect();
    let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(n, _)| vec![0.0; n]).collect();
    let mut forward = |weights: &[Vec<CpuStorage>]| {
        let t = Instant::now();
        for layer in weights {
            for (i, w) in layer.iter().enumerate() {
                let (n, k) = shapes[i];
                let mut jobs = [MatmulJob { w, n, bias: None, out: &mut outs[i] }];
                matmul_many_with(kern, Precision::Bf16Activations, &x[..k], (1, k), &mut jobs);
            }
        }
        bytes as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    let best = |v: Vec<f64>| v.into_iter().fold(0.0, f64::max);
    for r in 0..rounds {
        let a = best((0..3).map(|_| forward(&aligned)).collect());
        let u = best((0..3).map(|_| forward(&unaligned)).collect());
        let m = best((0..3).map(|_| reader.read().rate() / 1e9).collect());
        println!(
            "round {r}: decode matmuls {a:.1} GB/s aligned ({:.0}% of the read), {u:.1} GB/s unaligned ({:.0}%) | read {m:.1} GB/s",
            100.0 * a / m,
            100.0 * u / m
        );
    }
}

/// A decode step as the llama forward issues it (q/k/v in one region, o, gate/up in one, down;
/// then the tied head, 128,256 rows), inside `run_step`, alternating the two schedules of
/// few-token matmuls round by round: contiguous runs of rows per thread, and 32-row tasks.
fn sched(rounds: usize) {
    use ollm_ops::Compute;
    let (shapes, h, inter, layers, vocab) = (SHAPES, H, INTER, LAYERS, VOCAB);
    let be = CpuBackend::new();
    let kern = Kernels::active();
    let ws: Vec<Vec<CpuStorage>> =
        (0..layers).map(|l| shapes.iter().map(|&(n, k)| backend_weight(&be, n, k, l)).collect()).collect();
    let head = backend_weight(&be, vocab, h, 99);
    let bytes = (layers * shapes.iter().map(|(n, k)| n * k * 2).sum::<usize>() + vocab * h * 2) as f64;
    let reader = HostReader::new(&be, 1 << 30).expect("read buffer");
    let x: Vec<f32> = (0..inter).map(|i| (i % 11) as f32 * 0.1 - 0.5).collect();
    let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(n, _)| vec![0.0; n]).collect();
    let mut logits = vec![0.0f32; vocab];
    let groups: [&[usize]; 4] = [&[0, 1, 2], &[3], &[4, 5], &[6]];
    let p = Precision::Bf16Activations;
    println!(
        "threads {}, kernels {}, weights {:.2} GB a token",
        rayon::current_num_threads(),
        kern.tier(),
        bytes / 1e9
    );
    for r in 0..rounds {
        let mut line = format!("round {r}:");
        for parts in [true, false] {
            ollm_ops::cpu::set_decode_runs(parts);
            let mut best = 0.0f64;
            for _ in 0..3 {
                let t = Instant::now();
                be.run_step(&mut || {
                    for layer in &ws {
                        for g in groups {
                            let k = shapes[g[0]].1;
                            let mut jobs: Vec<MatmulJob> = Vec::new();
                            for (i, o) in outs.iter_mut().enumerate().filter(|(i, _)| g.contains(i)) {
                                jobs.push(MatmulJob { w: &layer[i], n: shapes[i].0, bias: None, out: o });
                            }
                            matmul_many_with(kern, p, &x[..k], (1, k), &mut jobs);
                        }
                    }
                    let mut jobs = [MatmulJob { w: &head, n: vocab, bias: None, out: &mut logits }];
                    matmul_many_with(kern, p, &x[..h], (1, h), &mut jobs);
                });
                best = best.max(bytes / t.elapsed().as_secs_f64() / 1e9);
            }
            line += &format!(" {} {best:.1} GB/s", if parts { "runs" } else { "tasks" });
        }
        let m = (0..3).map(|_| reader.read().rate() / 1e9).fold(0.0, f64::max);
        println!("{line} | read {m:.1} GB/s");
    }
}

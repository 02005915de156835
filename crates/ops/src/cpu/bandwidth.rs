//! Memory read bandwidth of this machine, the bound of CPU decoding.

use std::time::Instant;

use rayon::prelude::*;

/// Best-of-5 read bandwidth in bytes/s: every thread sums its share of a buffer far larger
/// than the caches.
pub fn measure_read_bandwidth(bytes: usize) -> f64 {
    let n = (bytes / 4).max(1 << 16);
    let buf: Vec<f32> = (0..n).into_par_iter().map(|i| (i % 7) as f32).collect();
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let s: f32 = buf.par_chunks(1 << 16).map(lane_sum).sum();
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((n * 4) as f64 / secs);
    }
    best
}

/// Sum with 16 independent accumulators, so the loop vectorises and memory, not the adder
/// chain, is the limit.
fn lane_sum(c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    for w in c.chunks_exact(16) {
        for i in 0..16 {
            acc[i] += w[i];
        }
    }
    acc.iter().sum()
}

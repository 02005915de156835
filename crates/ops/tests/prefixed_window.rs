//! Attention over a sliding-window layer's shared prefix tail (`Compute::attention_prefixed`
//! with `AttnParams::origin` the own rows' first position): the prefix holds only the last
//! `window - 1` positions before the own rows, and each query row is bit for bit the row a
//! private window cache gives, wherever that cache's front was dropped (CPU; the CUDA twin is in
//! `parity_cuda_vs_cpu.rs`). Inputs from a printed seed (`OLLM_TEST_SEED` draws them again).

#[path = "common/seed.rs"]
mod seed;

use ollm_ops::cpu::{CpuBackend, Precision};
use ollm_ops::{AttnParams, Backend, Compute, Memory, Tensor};

const NH: usize = 4;
const NKV: usize = 2;
const D: usize = 32;

/// A KV cache `[NKV, rows, D]` holding `x` (`[positions, NKV, D]`, token-major) from `first`.
fn cache(be: &dyn Backend, x: &[f32], first: usize, rows: usize) -> Tensor {
    let mut c = be.kv_zeros(vec![NKV, rows, D]).expect("cache");
    let t = &x[first * NKV * D..(first + rows) * NKV * D];
    be.write_kv(&mut c, &be.upload_f32(vec![rows, NKV, D], t).expect("rows"), 0).expect("write");
    c
}

#[test]
fn a_window_tail_prefix_gives_the_private_window_cache_rows_bit_for_bit() {
    let (base, own) = (700, 40);
    let total = base + own;
    let (k, v) = (seed::random(total * NKV * D, 1.0), seed::random(total * NKV * D, 1.0));
    let sinks = seed::random(NH, 2.0);
    for precision in [Precision::Exact, Precision::Bf16Activations] {
        let be = CpuBackend::with_precision(precision);
        let st = be.upload_f32(vec![NH], &sinks).expect("sinks");
        for window in [24, 100] {
            let tail = window - 1;
            for tq in [1, 7, 40] {
                for with_sinks in [false, true] {
                    let q = be.upload_f32(vec![tq, NH, D], &seed::random(tq * NH * D, 1.0)).expect("q");
                    let params = |origin| AttnParams {
                        scale: (D as f32).powf(-0.5),
                        window: Some(window),
                        sinks: with_sinks.then_some(&st),
                        origin,
                    };
                    let run = |f: &dyn Fn(&mut Tensor)| -> Vec<f32> {
                        let mut out = be.upload_f32(vec![tq, NH, D], &vec![f32::NAN; tq * NH * D]).expect("out");
                        f(&mut out);
                        be.to_host_f32(&out).expect("out")
                    };
                    // The shared tail (positions base - tail .. base) and the own rows.
                    let got = run(&|out| {
                        let (pk, pv) = (cache(&be, &k, base - tail, tail), cache(&be, &v, base - tail, tail));
                        let (ok, ov) = (cache(&be, &k, base, own), cache(&be, &v, base, own));
                        be.attention_prefixed(&q, (&pk, &pv, tail), (&ok, &ov), own - tq, &params(base), out)
                            .expect("prefixed");
                    });
                    // Private window caches whose rows start at several positions before the
                    // tail (a dropped front, KEEP_BACK kept) and at 0.
                    for first in [0, base - tail - 37, base - tail] {
                        let rows = total - first;
                        let want = run(&|out| {
                            let (kc, vc) = (cache(&be, &k, first, rows), cache(&be, &v, first, rows));
                            be.attention(&q, &kc, &vc, rows - tq, &params(first), out).expect("private");
                        });
                        let what = format!("{precision:?}, window {window}, {tq} queries, sinks {with_sinks}");
                        assert!(got == want, "{what}: not bit for bit the private cache from position {first}");
                    }
                }
            }
        }
    }
}

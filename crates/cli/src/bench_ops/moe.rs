//! The grouped MoE rows of `bench ops` (issue 27 point 3): one GPT-OSS-20B-shaped prompt chunk's
//! experts (32 MXFP4 experts, H = I = 2880, 8,192 tokens each routed to 4 of them, 1,024 rows an
//! expert) through `MoeOps::grouped_experts`, and through the per-expert loop it replaces
//! (`experts_by_expert`: gather, unpack to bf16, cuBLAS, SwiGLU, cuBLAS, scatter per expert) in
//! the same run, both against the cuBLAS GEMM rate.

use ollm_ops::cuda::CudaBackend;
use ollm_ops::{
    DType, ExpertAct, ExpertMatrixRef, HostTensor, Memory, MoeOps, Result, RoutedExpert, Tensor, experts_by_expert,
};

use super::{BenchRow, Bounds, OpsBenchConfig, Work, measured, random_f32, time_op};

const EXPERTS: usize = 32;
const HIDDEN: usize = 2880;
const INTER: usize = 2880;
const TOKENS: usize = 8192;
const TOP_K: usize = 4;

/// One expert's parts as the expert cache holds them: gate_up blocks and scales, down blocks
/// and scales, the two biases.
type Parts = [Tensor; 6];

fn mxfp4(be: &CudaBackend, n: usize, k: usize, seed: u64) -> Result<[Tensor; 2]> {
    let codes = random_f32(n * k / 2, seed, 1.0).iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
    let scales = random_f32(n * k / 32, seed + 1, 1.0).iter().map(|v| (120.0 + (v + 1.0) * 2.0) as u8).collect();
    Ok([
        be.upload(&HostTensor { dtype: DType::U8, shape: vec![n, k / 32, 16], bytes: codes })?,
        be.upload(&HostTensor { dtype: DType::U8, shape: vec![n, k / 32], bytes: scales })?,
    ])
}

fn experts(be: &CudaBackend) -> Result<Vec<Parts>> {
    (0..EXPERTS as u64)
        .map(|e| {
            let [gb, gs] = mxfp4(be, 2 * INTER, HIDDEN, 100 + 4 * e)?;
            let [db, ds] = mxfp4(be, HIDDEN, INTER, 102 + 4 * e)?;
            let gbias = be.upload_f32(vec![2 * INTER], &random_f32(2 * INTER, 300 + e, 0.1))?;
            let dbias = be.upload_f32(vec![HIDDEN], &random_f32(HIDDEN, 400 + e, 0.1))?;
            Ok([gb, gs, db, ds, gbias, dbias])
        })
        .collect()
}

/// Per expert its rows and weights: token t takes experts (13t + t/32 + 8j) mod 32, j < 4, so
/// every expert gets 1,024 rows.
fn routes() -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut per = vec![(Vec::new(), Vec::new()); EXPERTS];
    for t in 0..TOKENS {
        for j in 0..TOP_K {
            let e = (13 * t + t / 32 + 8 * j) % EXPERTS;
            per[e].0.push(t as u32);
            per[e].1.push(0.25);
        }
    }
    per
}

/// The grouped call and the per-expert loop on the same experts and routes.
pub(super) fn grouped_moe_rows(
    be: &CudaBackend,
    cfg: &OpsBenchConfig,
    b: &Bounds,
    progress: &mut dyn FnMut(&str),
) -> Vec<BenchRow> {
    let shape = format!("{TOKENS} tokens × top-{TOP_K} of {EXPERTS} MXFP4 experts, H {HIDDEN}, I {INTER}");
    let flops = 2.0 * (TOKENS * TOP_K) as f64 * (3 * INTER * HIDDEN) as f64;
    let mut rows = Vec::new();
    for (name, grouped) in [("MoE prefill chunk, grouped", true), ("MoE prefill chunk, per-expert loop", false)] {
        progress(&format!("{name}: {shape}"));
        let timing = (|| {
            let parts = experts(be)?;
            let routes = routes();
            let refs: Vec<RoutedExpert<'_>> = parts
                .iter()
                .zip(&routes)
                .map(|(p, (rows, weights))| RoutedExpert {
                    gate_up: ExpertMatrixRef::Mxfp4 { blocks: &p[0], scales: &p[1] },
                    up: None,
                    down: ExpertMatrixRef::Mxfp4 { blocks: &p[2], scales: &p[3] },
                    gate_up_bias: Some(&p[4]),
                    down_bias: Some(&p[5]),
                    rows,
                    weights,
                })
                .collect();
            let x = be.upload_f32(vec![TOKENS, HIDDEN], &random_f32(TOKENS * HIDDEN, 500, 1.0))?;
            let mut acc = be.zeros(vec![TOKENS, HIDDEN])?;
            let act = ExpertAct::ClampedSwiglu { limit: 7.0, alpha: 1.702 };
            time_op(be, cfg, |_| {
                if grouped {
                    if !be.grouped_experts(&x, &refs, act, &mut acc)? {
                        return Err(ollm_ops::OpsError::Backend("no grouped kernel for MXFP4 experts".into()));
                    }
                    Ok(())
                } else {
                    experts_by_expert(be, &x, &refs, act, &mut acc, 1024)
                }
            })
        })()
        .map_err(|e| e.to_string());
        rows.push(measured(name, shape.clone(), timing, Work::Flops(flops), b));
    }
    rows
}

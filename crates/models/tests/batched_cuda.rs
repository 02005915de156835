//! batched.rs on the CUDA backend: the same script (mixed lengths, a prompt across tiles,
//! joins, leaves, KV on the device and spilled), each step one batched forward on the GPU,
//! against each sequence run alone on the CPU backend. Skips, saying why, without a usable GPU
//! (fails under `OLLM_REQUIRE_GPU`: tests/common/mod.rs).
//!
//! Tolerance: the golden tests' bf16 bounds (docs/models.md §6.3; golden_logits_cuda.rs,
//! golden_gpt_oss_cuda.rs, golden_qwen3_next_cuda.rs), 5e-2 absolute for Llama and 0.1 for the
//! MoE families on logits within ±4, taken here relative to each logits row's largest logit (the
//! synthesised models' logits are not scaled like the fixtures'): 1.25e-2 and 2.5e-2 of it. The
//! GPU keeps the KV cache in bf16 and narrows matmul inputs of 16 rows or more to bf16. As the
//! MoE golden tests report rather than gate the tokens where bf16 rounding flips an expert
//! choice (a near-tie of the router), the MoE cases allow 2 of the script's 57 rows per case
//! beyond the bound, each printed; Llama allows none.

mod common;

use std::sync::Arc;

use common::batch::{Tolerance, check_family, script};
use ollm_ops::Backend;
use ollm_ops::cpu::CpuBackend;
use ollm_ops::cuda::CudaBackend;

const DENSE: Tolerance = Tolerance { rel: 5e-2 / 4.0, outliers: 0 };
const MOE: Tolerance = Tolerance { rel: 0.1 / 4.0, outliers: 2 };

/// The CPU reference and the GPU backend, or None after the skip line.
fn backends() -> Option<(Arc<dyn Backend>, Arc<dyn Backend>)> {
    let dev = common::gpu::gpu_or_skip()?;
    Some((Arc::new(CpuBackend::new()), Arc::new(CudaBackend::new(dev))))
}

#[test]
fn batched_logits_on_the_gpu_equal_alone_for_llama() {
    let Some(be) = backends() else { return };
    check_family("llama (GPU)", common::tiny_model, be, &script(), DENSE);
}

#[test]
fn batched_logits_on_the_gpu_equal_alone_for_gpt_oss() {
    let Some(be) = backends() else { return };
    check_family("gpt-oss (GPU)", |d| common::tiny_gpt_oss(d, 32), be, &script(), MOE);
}

#[test]
fn batched_logits_on_the_gpu_equal_alone_for_qwen3_next() {
    let Some(be) = backends() else { return };
    check_family("qwen3-next (GPU)", common::tiny_qwen3_next, be, &script(), MOE);
}

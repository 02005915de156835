//! tree.rs on the CUDA backend: one forward over a tree of tokens on the GPU (its tree
//! attention kernel, KV on the device and spilled) against each root-to-leaf path run alone on
//! the CPU backend. Skips, saying why, without a usable GPU (fails under `OLLM_REQUIRE_GPU`:
//! tests/common/mod.rs).
//!
//! Tolerance: batched_cuda.rs's, from the golden tests' bf16 bounds (docs/models.md §6.3):
//! 1.25e-2 of each logits row's largest logit for the dense families, 2.5e-2 for GPT-OSS with up
//! to 2 rows beyond it, each printed (bf16 rounding may flip a near-tied router choice).

mod common;

use std::sync::Arc;

use common::tree::{Tolerance, check_family};
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
fn tree_logits_on_the_gpu_equal_each_path_alone_for_llama_and_qwen3() {
    let Some(be) = backends() else { return };
    check_family("llama (GPU)", common::tiny_model, be.clone(), DENSE);
    check_family("qwen3 (GPU)", |d| common::tiny_qwen(d, "Qwen3ForCausalLM"), be, DENSE);
}

#[test]
fn tree_logits_on_the_gpu_equal_each_path_alone_for_gemma3_across_a_window_edge() {
    let Some(be) = backends() else { return };
    check_family("gemma3, window 3 (GPU)", |d| common::tiny_gemma3(d, 3), be, DENSE);
}

#[test]
fn tree_logits_on_the_gpu_equal_each_path_alone_for_gpt_oss() {
    let Some(be) = backends() else { return };
    check_family("gpt-oss, window 2 (GPU)", |d| common::tiny_gpt_oss(d, 2), be, MOE);
}

//! Every kernel file compiles with NVRTC and defines each entry point its launcher asks for
//! (launchers build some names from the dtype, e.g. `matmul_f32_{bf16,f16,f32}w`). Needs NVRTC
//! and the CUDA headers, not a GPU, so it also runs on a build machine that has them
//! (`pip install nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cuda-crt`, then CUDA_HOME and
//! LD_LIBRARY_PATH pointing into it). Without them it prints SKIPPED, saying what is missing,
//! or fails under `OLLM_REQUIRE_GPU` (tests/common/gpu.rs).

#![cfg(feature = "cuda")]

mod common;

use common::gpu::skip_or_fail;
use ollm_ops::cuda::{self, KernelCache};

/// (file, source, entry points)
fn kernel_files() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    vec![
        ("attention", cuda::attention::SOURCE, vec!["attention_bf16kv"]),
        ("convert", cuda::convert::SOURCE, vec!["f32_to_bf16", "f32_to_f16"]),
        (
            "elementwise",
            cuda::elementwise::SOURCE,
            vec![
                "embedding_bf16",
                "embedding_f16",
                "embedding_f32",
                "silu_mul_f32",
                "add_assign_f32",
                "add_bias_f32",
                "add_bias_bf16",
                "add_bias_f16",
                "write_kv_bf16",
                "write_kv_bf16_step",
            ],
        ),
        ("matmul", cuda::matmul::SOURCE, vec!["matmul_f32_bf16w", "matmul_f32_f16w", "matmul_f32_f32w"]),
        (
            "rmsnorm",
            cuda::rmsnorm::SOURCE,
            vec![
                "rmsnorm_f32_bf16w",
                "rmsnorm_f32_f16w",
                "rmsnorm_f32_f32w",
                "gated_rmsnorm_f32_bf16w",
                "gated_rmsnorm_f32_f16w",
                "gated_rmsnorm_f32_f32w",
            ],
        ),
        (
            "moe",
            cuda::moe::SOURCE,
            vec![
                "clamped_swiglu_f32",
                "router_topk_f32",
                "dequant_mxfp4_bf16",
                "transpose_u8",
                "transpose_u16",
                "transpose_u32",
                "gather_rows_f32",
                "scatter_add_rows_f32",
            ],
        ),
        (
            "moe_grouped",
            cuda::moe_grouped::SOURCE,
            vec![
                "grouped_gate_up_mxfp4",
                "grouped_gate_up_bf16",
                "grouped_gate_up_bf16x2",
                "grouped_down_mxfp4",
                "grouped_down_bf16",
                "grouped_combine",
            ],
        ),
        ("rope", cuda::rope::SOURCE, vec!["rope_f32", "rope_f32_step", "rope_write_kv_f32", "rope_write_kv_f32_step"]),
        ("tree_attention", cuda::tree_attention::SOURCE, vec!["tree_attention_bf16kv"]),
        (
            "gemv",
            cuda::gemv::SOURCE,
            vec![
                "gemv_bf16_t1",
                "gemv_bf16_t2",
                "gemv_bf16_t4",
                "gemv_bf16_t8",
                "gemv_f16_t1",
                "gemv_f16_t2",
                "gemv_f16_t4",
                "gemv_f16_t8",
                "gemv_add_bf16_t1",
                "gemv_add_bf16_t2",
                "gemv_add_bf16_t4",
                "gemv_add_bf16_t8",
                "gemv_add_f16_t1",
                "gemv_add_f16_t2",
                "gemv_add_f16_t4",
                "gemv_add_f16_t8",
                "gemv_swiglu_bf16_t1",
                "gemv_swiglu_bf16_t2",
                "gemv_swiglu_bf16_t4",
                "gemv_swiglu_bf16_t8",
                "gemv_swiglu_f16_t1",
                "gemv_swiglu_f16_t2",
                "gemv_swiglu_f16_t4",
                "gemv_swiglu_f16_t8",
                "gemv_norm_qkv_bf16_bf16w_t1",
                "gemv_norm_qkv_bf16_f16w_t1",
                "gemv_norm_qkv_bf16_f32w_t1",
                "gemv_norm_qkv_bf16_bf16w_t8",
                "gemv_norm_qkv_bf16_f16w_t8",
                "gemv_norm_qkv_bf16_f32w_t8",
                "gemv_norm_qkv_f16_bf16w_t1",
                "gemv_norm_qkv_f16_f16w_t1",
                "gemv_norm_qkv_f16_f32w_t1",
                "gemv_norm_qkv_f16_bf16w_t8",
                "gemv_norm_qkv_f16_f16w_t8",
                "gemv_norm_qkv_f16_f32w_t8",
                "gemv_norm_swiglu_bf16_bf16w_t1",
                "gemv_norm_swiglu_bf16_bf16w_t8",
                "gemv_norm_swiglu_bf16_f16w_t1",
                "gemv_norm_swiglu_bf16_f16w_t8",
                "gemv_norm_swiglu_bf16_f32w_t1",
                "gemv_norm_swiglu_bf16_f32w_t8",
                "gemv_norm_swiglu_f16_bf16w_t1",
                "gemv_norm_swiglu_f16_bf16w_t8",
                "gemv_norm_swiglu_f16_f16w_t1",
                "gemv_norm_swiglu_f16_f16w_t8",
                "gemv_norm_swiglu_f16_f32w_t1",
                "gemv_norm_swiglu_f16_f32w_t8",
            ],
        ),
        (
            "flash_attn",
            cuda::flash::FLASH_SOURCE,
            vec![
                "flash_prefill_d64_m1_n64",
                "flash_prefill_d64_m2_n64",
                "flash_prefill_d128_m1_n64",
                "flash_prefill_d128_m2_n32",
                "flash_prefill_d128_m1_n32",
            ],
        ),
        (
            "decode_attn",
            cuda::flash::DECODE_SOURCE,
            vec![
                "decode_combine",
                "decode_split_d16_g1",
                "decode_split_d16_g2",
                "decode_split_d16_g3",
                "decode_split_d16_g4",
                "decode_split_d16_g6",
                "decode_split_d16_g8",
                "decode_split_d32_g1",
                "decode_split_d32_g2",
                "decode_split_d32_g3",
                "decode_split_d32_g4",
                "decode_split_d32_g6",
                "decode_split_d32_g8",
                "decode_split_d64_g1",
                "decode_split_d64_g2",
                "decode_split_d64_g3",
                "decode_split_d64_g4",
                "decode_split_d64_g6",
                "decode_split_d64_g8",
                "decode_split_d128_g1",
                "decode_split_d128_g2",
                "decode_split_d128_g3",
                "decode_split_d128_g4",
                "decode_split_d128_g6",
                "decode_split_d128_g8",
                "decode_split_d256_g1",
                "decode_split_d256_g2",
                "decode_split_d256_g3",
                "decode_split_d256_g4",
                "decode_split_d256_g6",
                "decode_split_d256_g8",
                "decode_split_step_d16_g1",
                "decode_split_step_d16_g2",
                "decode_split_step_d16_g3",
                "decode_split_step_d16_g4",
                "decode_split_step_d16_g6",
                "decode_split_step_d16_g8",
                "decode_split_step_d32_g1",
                "decode_split_step_d32_g2",
                "decode_split_step_d32_g3",
                "decode_split_step_d32_g4",
                "decode_split_step_d32_g6",
                "decode_split_step_d32_g8",
                "decode_split_step_d64_g1",
                "decode_split_step_d64_g2",
                "decode_split_step_d64_g3",
                "decode_split_step_d64_g4",
                "decode_split_step_d64_g6",
                "decode_split_step_d64_g8",
                "decode_split_step_d128_g1",
                "decode_split_step_d128_g2",
                "decode_split_step_d128_g3",
                "decode_split_step_d128_g4",
                "decode_split_step_d128_g6",
                "decode_split_step_d128_g8",
                "decode_split_step_d256_g1",
                "decode_split_step_d256_g2",
                "decode_split_step_d256_g3",
                "decode_split_step_d256_g4",
                "decode_split_step_d256_g6",
                "decode_split_step_d256_g8",
            ],
        ),
    ]
}

#[test]
fn every_kernel_file_compiles_with_its_entry_points() {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        skip_or_fail(
            "no NVRTC",
            "libnvrtc.so not found: install the CUDA toolkit (or pip install nvidia-cuda-nvrtc) and add its lib to LD_LIBRARY_PATH",
        );
        return;
    }
    for cc in [(8, 0), (9, 0)] {
        let cache = match KernelCache::new(cc) {
            Ok(c) => c,
            Err(e) => {
                skip_or_fail("NVRTC cannot compile", &e.to_string());
                return;
            }
        };
        for (file, source, entries) in kernel_files() {
            let ptx = cache.compile(file, source).unwrap_or_else(|e| panic!("sm_{}{}: {e}", cc.0, cc.1)).to_src();
            for entry in entries {
                assert!(
                    ptx.contains(&format!(".entry {entry}(")),
                    "{file}.cu (sm_{}{}) has no entry point {entry}",
                    cc.0,
                    cc.1
                );
            }
        }
        eprintln!("all kernel files compile for sm_{}{}", cc.0, cc.1);
    }
    // The Hopper file compiles for its own architecture only (wgmma, setmaxnreg: sm_90a).
    let cache = KernelCache::new((9, 0)).expect("NVRTC compiled the other files just above");
    let arch = cuda::flash_sm90::SM90_ARCH;
    let ptx = cache
        .compile_for_arch("flash_attn_sm90", cuda::flash_sm90::SM90_SOURCE, arch)
        .unwrap_or_else(|e| panic!("{arch}: {e}"))
        .to_src();
    let probes =
        ["flash90_probe_d128_n128", "flash90_probe_d128_n64", "flash90_probe_d64_n128", "flash90_probe_d64_n64"];
    for entry in cuda::flash_sm90::SM90_VARIANTS.iter().map(|v| v.entry()).chain(probes.map(String::from)) {
        assert!(ptx.contains(&format!(".entry {entry}(")), "flash_attn_sm90.cu ({arch}) has no entry point {entry}");
    }
    assert!(ptx.contains("wgmma.mma_async"), "flash_attn_sm90.cu ({arch}) issues no wgmma");
    eprintln!("flash_attn_sm90 compiles for {arch} with {} entry points", cuda::flash_sm90::SM90_VARIANTS.len());
}

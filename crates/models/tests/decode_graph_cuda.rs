//! Decode steps replayed as CUDA graphs (ollm-ops `cuda/graph.rs`) give the plain launches'
//! logits bit for bit: the synthesised Llama decodes the same tokens twice on one GPU backend,
//! graphs on, then off, and every step's logits must be identical f32 bits. The run crosses
//! what makes a graph be captured again (the first step, the KV cache growing past 256
//! positions, the attention's context bucket doubling), and the graphs must have been used:
//! the backend's replay count is checked. Skips, saying why, without a usable GPU (fails under
//! `OLLM_REQUIRE_GPU`: tests/common/mod.rs).

mod common;

use std::sync::Arc;

use ollm_models::{LogitsWanted, load_model};
use ollm_ops::Backend;
use ollm_ops::cuda::CudaBackend;

/// Prompt rows, then one-token steps: the cache (256 positions at first) grows during decode.
const PROMPT: usize = 240;
const STEPS: usize = 48;

/// Every step's logits for a fixed token script, with graphs on or off.
fn decode(be: &Arc<CudaBackend>, dir: &std::path::Path, graphs: bool) -> Vec<Vec<f32>> {
    be.set_step_graphs(graphs);
    let dyn_be: Arc<dyn Backend> = be.clone();
    let model = load_model(dir, dyn_be).expect("loads on the GPU");
    let vocab = model.info().vocab_size as u32;
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| (i * 37 + 11) % vocab).collect();
    let mut state = model.new_state().expect("state");
    model.forward(&prompt, &mut state, LogitsWanted::Last, None).expect("prefill");
    (0..STEPS as u32)
        .map(|i| model.forward(&[(i * 53 + 7) % vocab], &mut state, LogitsWanted::Last, None).expect("decode step"))
        .collect()
}

#[test]
fn graph_replayed_decode_equals_plain_launches_bit_for_bit() {
    let Some(dev) = common::gpu::gpu_or_skip() else { return };
    let be = Arc::new(CudaBackend::new(dev));
    be.set_fused_ops(true); // the layer the engine runs with OLLM_CUDA_FUSED=1
    let dir = tempfile::tempdir().expect("tempdir");
    common::tiny_model(dir.path());

    let graphed = decode(&be, dir.path(), true);
    let (captures, replays) = be.device().step_graph_counts();
    eprintln!("graphs on: {captures} captures, {replays} replays over {STEPS} steps");
    assert!(replays as usize >= STEPS - 6, "the graphs were not used: {captures} captures, {replays} replays");
    assert!(captures >= 2, "the KV growth at 256 positions should have forced a second capture");

    let plain = decode(&be, dir.path(), false);
    assert_eq!(be.device().step_graph_counts(), (captures, replays), "graphs ran while turned off");
    for (i, (a, b)) in graphed.iter().zip(&plain).enumerate() {
        assert_eq!(a.len(), b.len(), "step {i}: logits lengths differ");
        let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        assert_eq!(differ, 0, "step {i} (position {}): {differ} logits differ from the plain launches", PROMPT + i);
    }
}

/// Programmatic dependent launches (`OLLM_CUDA_PDL=1`, ops `cuda/pdl.rs`) change only when the
/// decode kernels may start, not what they compute: with them on, the logits of plain launches
/// and of replayed graphs equal those of plain launches without them, bit for bit. (Before
/// sm_90 they cannot be turned on, and the test compares plain launches with themselves.)
#[test]
fn programmatic_dependent_launches_keep_the_logits() {
    let Some(dev) = common::gpu::gpu_or_skip() else { return };
    let be = Arc::new(CudaBackend::new(dev));
    be.set_fused_ops(true); // the layer the engine runs with OLLM_CUDA_FUSED=1
    let dir = tempfile::tempdir().expect("tempdir");
    common::tiny_model(dir.path());

    be.device().set_programmatic_launch(false);
    let want = decode(&be, dir.path(), false);
    let on = be.device().set_programmatic_launch(true);
    eprintln!("programmatic dependent launches: {}", if on { "on" } else { "not available (before sm_90)" });
    for graphs in [false, true] {
        let got = decode(&be, dir.path(), graphs);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let differ = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
            assert_eq!(differ, 0, "graphs {graphs}, step {i}: {differ} logits differ without programmatic launches");
        }
    }
}

//! The KV cache off the device gives the same logits as the cache on it: a synthesised model
//! (random weights, 6 layers) with its cache in blocks of 16 positions, every full block spilled
//! to disk (RAM budget 0) or kept in RAM, alone and together with streamed layers, through a
//! tiled 2100-token prefill, a short prefill and decode steps, and a truncation back into a
//! spilled block. On the CPU always; on the GPU too when one is usable.

mod common;

use common::tiny_model;
use std::sync::Arc;

use ollm_kv::KvOffload;
use ollm_models::{CausalLm, LogitsWanted, SeqState, load_model_placed};
use ollm_ops::Backend;
use ollm_ops::cpu::CpuBackend;
use ollm_residency::plan::{Placement, Tier};

/// A 2100-token prefill (tiled), then 40 more tokens (crossing blocks), then 5 decode steps,
/// then a truncation to position 2090 (inside a spilled block) and 3 steps from there.
fn run(model: &Arc<dyn CausalLm>) -> (Vec<f32>, SeqState) {
    let mut state = model.new_state().expect("state");
    let long: Vec<u32> = (0..2100u32).map(|i| (i * 37 + 11) % 300).collect();
    let mut out = model.forward(&long, &mut state, LogitsWanted::Last, None).expect("long prefill");
    let more: Vec<u32> = (0..40u32).map(|i| (i * 13 + 5) % 300).collect();
    out.extend(model.forward(&more, &mut state, LogitsWanted::All, None).expect("prefill"));
    for id in [11u32, 299, 4, 60, 128] {
        out.extend(model.forward(&[id], &mut state, LogitsWanted::Last, None).expect("decode"));
    }
    state.truncate(2090);
    for id in [7u32, 8, 9] {
        out.extend(model.forward(&[id], &mut state, LogitsWanted::Last, None).expect("after truncate"));
    }
    (out, state)
}

fn check(backend: Arc<dyn Backend>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("m");
    tiny_model(&model_dir);
    let resident = load_model_placed(&model_dir, backend.clone(), None).expect("resident");
    let (want, _) = run(&resident);
    assert!(want.iter().all(|v| v.is_finite()));
    let spill_dir = dir.path().join("spill");
    let kv = |ram_bytes| Some(KvOffload { block: 16, ram_bytes, spill_dir: spill_dir.clone(), window_positions: 0 });
    use Tier::{Disk, Ram, Vram};
    let cases = [
        ("KV spilled, layers resident", Placement { kv: kv(0), ..Placement::resident(6) }),
        ("KV in RAM, layers resident", Placement { kv: kv(u64::MAX), ..Placement::resident(6) }),
        (
            "KV partly spilled, layers streamed",
            Placement {
                tiers: vec![Vram, Disk, Ram, Disk, Disk, Ram],
                slots: 2,
                staging_buffers: 2,
                kv: kv(1 << 20),
                experts: None,
            },
        ),
    ];
    for (name, placement) in cases {
        let model = load_model_placed(&model_dir, backend.clone(), Some(&placement)).expect(name);
        let (got, state) = run(&model);
        let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(max == 0.0 && got.len() == want.len(), "{name}: offloaded logits differ (max |Δ| {max:e})");
        let stats = state.offload_stats().expect("offloaded");
        // 2140 positions in blocks of 16, per layer: 134 blocks of 6 layers.
        assert_eq!(stats.ram_blocks + stats.disk_blocks, 6 * 2148usize.div_ceil(16), "{name}: {stats:?}");
        if placement.kv.as_ref().is_some_and(|k| k.ram_bytes == 0) {
            // Only blocks written since the last forward's start can still be in RAM.
            assert!(stats.disk_blocks >= 6 * 130 && stats.spilled_bytes > 0, "{name}: {stats:?}");
            assert!(stats.unspilled_bytes > 0, "{name}: spilled blocks were read back: {stats:?}");
        }
        if placement.kv.as_ref().is_some_and(|k| k.ram_bytes == u64::MAX) {
            assert_eq!((stats.disk_blocks, stats.spilled_bytes), (0, 0), "{name}: {stats:?}");
        }
        let spill = state.spill_path().expect("path").to_path_buf();
        assert_eq!(spill.exists(), stats.spilled_bytes > 0, "{name}");
        drop(state);
        assert!(!spill.exists(), "{name}: the spill file is removed with the sequence");
    }
}

#[test]
fn offloaded_kv_equals_device_kv_on_the_cpu() {
    check(Arc::new(CpuBackend::new()));
}

/// The same with the CLI's CPU setting: bf16 activations and a bf16 KV cache (offloaded blocks
/// and spill files at 2 bytes an element).
#[test]
fn offloaded_bf16_kv_equals_device_kv_on_the_cpu() {
    let be = CpuBackend::with_precision(ollm_ops::cpu::Precision::Bf16Activations);
    assert_eq!(ollm_ops::Memory::kv_dtype(&be), ollm_ops::DType::BF16);
    check(Arc::new(be));
}

#[test]
fn offloaded_kv_equals_device_kv_on_the_gpu() {
    if let Some(dev) = common::gpu::gpu_or_skip() {
        check(Arc::new(ollm_ops::cuda::CudaBackend::new(dev)));
    }
}

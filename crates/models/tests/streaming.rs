//! Streamed execution gives the same logits as fully resident execution: a synthesised model
//! (random weights, 6 layers) run with every placement mix — resident layers, layers cached in
//! pinned RAM, layers read from disk every pass, one or two device slots — against the same model
//! all resident, through a prefill and several decode steps (so the streamer wraps around into
//! the next pass). On the CPU always; on the GPU too when one is usable.

mod common;

use common::tiny_model;
use std::path::Path;
use std::sync::Arc;

use ollm_models::{CausalLm, LogitsWanted, load_model_placed};
use ollm_ops::Backend;
use ollm_ops::cpu::CpuBackend;
use ollm_residency::plan::{Placement, Tier};

/// Prefill of 9 tokens, then 7 single-token steps: every step's logits, concatenated.
fn run(model: &Arc<dyn CausalLm>) -> Vec<f32> {
    let mut state = model.new_state().expect("state");
    let mut out =
        model.forward(&[1, 7, 42, 9, 250, 3, 77, 18, 5], &mut state, LogitsWanted::All, None).expect("prefill");
    for id in [11u32, 299, 4, 60, 128, 2, 33] {
        out.extend(model.forward(&[id], &mut state, LogitsWanted::Last, None).expect("decode"));
    }
    out
}

/// A prompt longer than a prefill tile (the forward runs it layer by layer in tiles).
fn long_prompt() -> Vec<u32> {
    (0..2100u32).map(|i| (i * 37 + 11) % 300).collect()
}

fn placements() -> Vec<(&'static str, Placement)> {
    use Tier::{Disk, Ram, Vram};
    vec![
        (
            "mixed, 2 slots",
            Placement {
                tiers: vec![Vram, Disk, Ram, Disk, Disk, Ram],
                slots: 2,
                staging_buffers: 2,
                kv: None,
                experts: None,
            },
        ),
        ("all disk, 1 slot", Placement { tiers: vec![Disk; 6], slots: 1, staging_buffers: 2, kv: None, experts: None }),
        ("all ram, 2 slots", Placement { tiers: vec![Ram; 6], slots: 2, staging_buffers: 0, kv: None, experts: None }),
        (
            "disk, 3 slots, 3 staging",
            Placement {
                tiers: vec![Vram, Disk, Disk, Disk, Disk, Vram],
                slots: 3,
                staging_buffers: 3,
                kv: None,
                experts: None,
            },
        ),
    ]
}

fn check(backend: Arc<dyn Backend>, exact: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("m");
    tiny_model(&model_dir);
    let resident = load_model_placed(&model_dir, backend.clone(), None).expect("resident");
    assert!(resident.stream_stats().is_none());
    let want = run(&resident);
    assert!(want.iter().all(|v| v.is_finite()));
    for (name, placement) in placements() {
        let streamed = load_model_placed(&model_dir, backend.clone(), Some(&placement)).expect(name);
        // Layer-major tiled prefill, streamed vs resident.
        let mut s1 = resident.new_state().expect("state");
        let mut s2 = streamed.new_state().expect("state");
        let a = resident.forward(&long_prompt(), &mut s1, LogitsWanted::Last, None).expect("long resident");
        let b = streamed.forward(&long_prompt(), &mut s2, LogitsWanted::Last, None).expect("long streamed");
        let max = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(max == 0.0, "{name}: tiled prefill streamed vs resident: max |Δ| {max:e}");
        // Twice: the second pass starts from layers the streamer already prefetched.
        for round in 0..2 {
            let got = run(&streamed);
            let max = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            if exact {
                assert_eq!(got, want, "{name}, round {round}: streamed logits differ (max |Δ| {max:e})");
            } else {
                // The same kernels on the same bytes: only atomics-free reductions, so equal too.
                assert!(max == 0.0, "{name}, round {round}: max |Δ| {max:e}");
            }
        }
        let stats = streamed.stream_stats().expect("streaming");
        let streamed_layers = placement.tiers.iter().filter(|t| **t != Tier::Vram).count();
        assert_eq!(stats.ram_layers + stats.disk_layers, streamed_layers, "{name}");
        // 1 long prefill + 2 rounds × 8 forwards, each streaming every streamed layer; the first
        // k come preloaded and the thread may run ahead by up to k more.
        let passes = 17 * streamed_layers as u64;
        let k = placement.slots as u64;
        assert!(stats.layers_streamed + k >= passes && stats.layers_streamed <= passes, "{name}: {stats:?}");
        if stats.disk_layers > 0 {
            assert!(stats.disk_bytes > 0, "{name}: {stats:?}");
        }
        eprintln!("{name}: {stats:?}");
    }
}

#[test]
fn streamed_logits_equal_resident_logits_on_the_cpu() {
    check(Arc::new(CpuBackend::new()), true);
}

#[test]
fn streamed_logits_equal_resident_logits_on_the_gpu() {
    if let Some(dev) = common::gpu::gpu_or_skip() {
        check(Arc::new(ollm_ops::cuda::CudaBackend::new(dev)), false);
    }
}

/// The tiled (layer-major) path computes what the untiled one does: a 2100-token prompt in one
/// call against the same prompt fed in calls of at most 1000 tokens (each below a tile).
#[test]
fn tiled_prefill_matches_untiled_prefill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("m");
    tiny_model(&model_dir);
    let model = load_model_placed(&model_dir, Arc::new(CpuBackend::new()), None).expect("load");
    let ids = long_prompt();
    let mut one = model.new_state().expect("state");
    let tiled = model.forward(&ids, &mut one, LogitsWanted::All, None).expect("tiled");
    let mut pieces = model.new_state().expect("state");
    let mut untiled = Vec::new();
    for chunk in ids.chunks(1000) {
        untiled.extend(model.forward(chunk, &mut pieces, LogitsWanted::All, None).expect("piece"));
    }
    assert_eq!(tiled.len(), untiled.len());
    let max = tiled.iter().zip(&untiled).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = untiled.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(max <= 1e-5 * scale.max(1.0), "max |Δ| {max:e} (logits up to {scale})");
    // And decoding continues identically from either state.
    let a = model.forward(&[5], &mut one, LogitsWanted::Last, None).expect("next");
    let b = model.forward(&[5], &mut pieces, LogitsWanted::Last, None).expect("next");
    let max = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(max <= 1e-5 * scale.max(1.0), "after prefill: max |Δ| {max:e}");
}

/// The golden fixtures (2 layers each), streamed from disk and from pinned RAM through one slot,
/// against transformers' fp32 logits and against the same model all resident.
fn golden_fixtures_streamed(backend: Arc<dyn Backend>, tol_abs: f32) {
    use ollm_weights::Catalog;
    for case in ["llama3_tied", "headdim_untied"] {
        let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden").join(case);
        let dir = if built.exists() { built } else { Path::new("fixtures/golden").join(case) };
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"))
                .expect("json");
        let ids: Vec<u32> =
            meta["input_ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
        let cat = Catalog::open_files(&[dir.join("reference.safetensors")]).expect("reference");
        let want = cat.read(cat.get("logits_f32").expect("logits")).expect("read").to_f32_vec().expect("f32");
        let resident = load_model_placed(&dir, backend.clone(), None).expect("resident");
        let mut s = resident.new_state().expect("state");
        let base = resident.forward(&ids, &mut s, LogitsWanted::All, None).expect("resident forward");
        let placement =
            Placement { tiers: vec![Tier::Disk, Tier::Ram], slots: 1, staging_buffers: 2, kv: None, experts: None };
        let streamed = load_model_placed(&dir, backend.clone(), Some(&placement)).expect("streamed");
        for round in 0..3 {
            let mut s = streamed.new_state().expect("state");
            let got = streamed.forward(&ids, &mut s, LogitsWanted::All, None).expect("streamed forward");
            assert_eq!(got, base, "{case} round {round}: streamed differs from resident");
            let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d <= tol_abs, "{case}: streamed logits differ from transformers by {d}");
        }
        let stats = streamed.stream_stats().expect("streaming");
        assert_eq!((stats.disk_layers, stats.ram_layers, stats.slots), (1, 1, 1));
    }
}

#[test]
fn golden_fixtures_streamed_on_the_cpu() {
    // The CPU golden tolerance (f32 math, docs/models.md).
    golden_fixtures_streamed(Arc::new(CpuBackend::new()), 1e-4);
}

#[test]
fn golden_fixtures_streamed_on_the_gpu() {
    if let Some(dev) = common::gpu::gpu_or_skip() {
        // The GPU golden tolerance (bf16 KV and bf16 activations in cuBLAS; golden_logits_cuda.rs).
        golden_fixtures_streamed(Arc::new(ollm_ops::cuda::CudaBackend::new(dev)), 5e-2);
    }
}

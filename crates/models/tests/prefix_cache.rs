//! A prompt whose prefix comes from the persistent prefix cache gives the logits of a cold run:
//! a synthesised model (random weights, 6 layers), a 600-token document and two questions. The
//! first run (document + question 1) stores the document's blocks; the second (document +
//! question 2) loads them and computes the rest. Fed in block-sized forwards, the cold and the
//! reused run do the same arithmetic, so their logits are equal bit for bit; fed in one forward,
//! they agree to rounding. With the cache on the device and off it (every block spilled), on the
//! CPU always and on the GPU when one is usable. A corrupted entry is reported and the answer is
//! still the cold one.

mod common;

use common::{tiny_model, tiny_qwen3_next};
use std::sync::Arc;

use ollm_kv::{KvOffload, PrefixCache, PrefixConfig};
use ollm_models::{CausalLm, LogitsWanted, SeqState, load_model_placed};
use ollm_ops::Backend;
use ollm_ops::cpu::CpuBackend;
use ollm_residency::plan::Placement;

fn ids(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + seed * 101 + 11) % 300).collect()
}

/// Feeds `tokens` from the state's position on, in forwards of `chunk`; the last logits.
fn feed(model: &Arc<dyn CausalLm>, state: &mut SeqState, tokens: &[u32], chunk: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for c in tokens[state.len()..].chunks(chunk) {
        out = model.forward(c, state, LogitsWanted::Last, None).expect("forward");
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

fn check(backend: Arc<dyn Backend>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("m");
    tiny_model(&model_dir);
    let doc = ids(600, 1);
    let ask = |q: &[u32]| [doc.as_slice(), q].concat();
    let (first, second) = (ask(&ids(37, 2)), ask(&ids(45, 3)));
    let spill = dir.path().join("spill");
    let offloaded = Placement {
        kv: Some(KvOffload { block: 16, ram_bytes: 0, spill_dir: spill.clone(), window_positions: 0 }),
        ..Placement::resident(6)
    };
    for (name, placement) in [("KV on the device", None), ("KV offloaded and spilled", Some(offloaded))] {
        let model = load_model_placed(&model_dir, backend.clone(), placement.as_ref()).expect(name);
        let be = model.backend();
        let cfg = PrefixConfig { dir: dir.path().join(format!("pc-{}", placement.is_some())), max_bytes: u64::MAX };
        let open = |state: &SeqState| {
            PrefixCache::open(&cfg, model.info().fingerprint, state.block_layout(be).expect("layout")).expect("open")
        };
        let fresh = || model.new_state().expect("state");
        let block = fresh().block_layout(be).expect("layout").block;

        // Run 1 stores the document's blocks (and the block the question starts in).
        let mut s1 = fresh();
        feed(&model, &mut s1, &first, block);
        let cache = open(&s1);
        let stored = cache.store(be, &mut s1, &first, &[]).expect("store");
        assert_eq!(stored.blocks, first.len() / block, "{name}");

        for chunk in [block, 4096] {
            let mut cold = fresh();
            let want = feed(&model, &mut cold, &second, chunk);
            let mut warm = fresh();
            let r = cache.restore(be, &mut warm, &second).expect("restore");
            assert_eq!(r.tokens, doc.len() / block * block, "{name}: every block inside the document is reused");
            let got = feed(&model, &mut warm, &second, chunk);
            let d = max_diff(&got, &want);
            if chunk == block {
                assert!(d == 0.0, "{name}: reused logits differ from the cold run's (max |Δ| {d:e})");
            } else {
                assert!(d < 2e-3, "{name}, one forward: reused logits differ from the cold run's (max |Δ| {d:e})");
            }
        }

        // A flipped byte in the middle of the reused blocks: reported, the rest recomputed, the
        // same logits as the cold run.
        let keys = cache.chain(&second[..doc.len() / block * block]);
        let bad = keys.len() / 2;
        let path = cache.entry_path(bad, keys[bad]);
        let mut bytes = std::fs::read(&path).expect("entry");
        let at = bytes.len() - 100;
        bytes[at] ^= 0x10;
        std::fs::write(&path, bytes).expect("corrupt");
        let mut cold = fresh();
        let want = feed(&model, &mut cold, &second, block);
        let mut warm = fresh();
        let r = cache.restore(be, &mut warm, &second).expect("restore");
        assert_eq!((r.blocks, r.rejected.len()), (bad, 1), "{name}: {:?}", r.rejected);
        assert_eq!(max_diff(&feed(&model, &mut warm, &second, block), &want), 0.0, "{name}: after a corrupt entry");
    }
}

/// Qwen3-Next: a reused prefix needs its DeltaNet state at the prefix's end too. Run 1 takes a
/// snapshot of the fixed state at every block end (as a session's prefill does) and stores them
/// with the blocks; run 2 restores the blocks and the last snapshot and computes the rest.
/// Without the snapshots nothing is reused (a recurrent model cannot resume from KV alone).
fn check_recurrent(backend: Arc<dyn Backend>, exact: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("m");
    tiny_qwen3_next(&model_dir);
    let model = load_model_placed(&model_dir, backend, None).expect("model");
    let be = model.backend();
    let doc = ids(600, 1);
    let ask = |q: &[u32]| [doc.as_slice(), q].concat();
    let (first, second) = (ask(&ids(37, 2)), ask(&ids(45, 3)));
    let fresh = || model.new_state().expect("state");
    let block = fresh().block_layout(be).expect("layout").block;
    let open = |name: &str, state: &SeqState| {
        let cfg = PrefixConfig { dir: dir.path().join(name), max_bytes: u64::MAX };
        PrefixCache::open(&cfg, model.info().fingerprint, state.block_layout(be).expect("layout")).expect("open")
    };

    let mut s1 = fresh();
    let mut snapshots = Vec::new();
    for c in first.chunks(block) {
        model.forward(c, &mut s1, LogitsWanted::Last, None).expect("forward");
        if s1.len() % block == 0 {
            snapshots.push((s1.len(), s1.snapshot_fixed(be).expect("snapshot")));
        }
    }
    let bare = open("bare", &s1);
    bare.store(be, &mut s1, &first, &[]).expect("store without snapshots");
    assert_eq!(bare.restore(be, &mut fresh(), &second).expect("restore").tokens, 0, "no snapshot, no reuse");
    let cache = open("snap", &s1);
    let stored = cache.store(be, &mut s1, &first, &snapshots).expect("store");
    assert_eq!(stored.blocks, first.len() / block);

    let mut cold = fresh();
    let want = feed(&model, &mut cold, &second, block);
    let mut warm = fresh();
    let r = cache.restore(be, &mut warm, &second).expect("restore");
    assert_eq!(r.tokens, doc.len() / block * block, "every block inside the document is reused");
    let got = feed(&model, &mut warm, &second, block);
    let d = max_diff(&got, &want);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!("qwen3-next reused prefix vs cold: max |Δ| {d:e} (largest logit {scale})");
    if exact {
        assert!(d == 0.0, "reused logits differ from the cold run's (max |Δ| {d:e})");
    } else {
        assert!(d <= 1e-3 * scale, "reused logits differ from the cold run's (max |Δ| {d:e})");
    }
}

#[test]
fn a_recurrent_model_resumes_from_a_stored_prefix_on_the_cpu() {
    check_recurrent(Arc::new(CpuBackend::new()), true);
}

#[test]
fn a_recurrent_model_resumes_from_a_stored_prefix_on_the_gpu() {
    if let Some(dev) = common::gpu::gpu_or_skip() {
        check_recurrent(Arc::new(ollm_ops::cuda::CudaBackend::new(dev)), false);
    }
}

#[test]
fn reused_prefix_gives_the_cold_logits_on_the_cpu() {
    check(Arc::new(CpuBackend::new()));
}

/// With a bf16 KV cache (the CLI's CPU setting): stored and restored at 2 bytes an element.
#[test]
fn reused_prefix_gives_the_cold_logits_with_a_bf16_cache_on_the_cpu() {
    check(Arc::new(CpuBackend::with_precision(ollm_ops::cpu::Precision::Bf16Activations)));
}

#[test]
fn reused_prefix_gives_the_cold_logits_on_the_gpu() {
    if let Some(dev) = common::gpu::gpu_or_skip() {
        check(Arc::new(ollm_ops::cuda::CudaBackend::new(dev)));
    }
}

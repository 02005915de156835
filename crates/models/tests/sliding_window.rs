//! Sliding-window layers keep only their window (plus `KEEP_BACK`) and give the logits of a
//! cache that keeps every position. A synthesised GPT-OSS (window 8, layers 0 and 2 sliding)
//! takes a 2,600-token prompt in forwards of 300 and then 700 single tokens; the same state
//! pinned to keep everything (`retain_from(0)`, as with a prefix store) is the reference. On
//! the device (CPU backend) the sliding layers drop their front as they go; offloaded, they
//! load only the blocks their window sees and free older ones. Either way the logits are equal
//! bit for bit, and stepping back further than a window kept forgets the whole sequence.

mod common;

use std::sync::Arc;

use common::tiny_gpt_oss;
use ollm_kv::{KEEP_BACK, KvOffload, window_positions};
use ollm_models::{CausalLm, LogitsWanted, SeqState, load_model_placed};
use ollm_ops::cpu::CpuBackend;
use ollm_residency::plan::Placement;

const WINDOW: usize = 8;
const PROMPT: usize = 2600;
const CHUNK: usize = 300;
const STEPS: usize = 700;

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 61 + 7) % 300).collect()
}

/// Every logit row this run produces: the prompt's forwards' last rows, then each step's.
fn run(model: &Arc<dyn CausalLm>, state: &mut SeqState) -> Vec<Vec<f32>> {
    let all = ids(PROMPT + STEPS);
    let mut out = Vec::new();
    for c in all[..PROMPT].chunks(CHUNK) {
        out.push(model.forward(c, state, LogitsWanted::Last, None).expect("prefill"));
    }
    for &id in &all[PROMPT..] {
        out.push(model.forward(&[id], state, LogitsWanted::Last, None).expect("decode"));
    }
    out
}

/// Logits equal bit for bit (the CPU), or within `tol` with the same top token (the GPU, whose
/// attention tiles keys from row 0: other rows, other rounding).
fn same(g: &[f32], w: &[f32], tol: f32) -> bool {
    let argmax = |v: &[f32]| v.iter().enumerate().fold(0, |b, (i, &x)| if x > v[b] { i } else { b });
    match tol {
        0.0 => g == w,
        _ => argmax(g) == argmax(w) && g.iter().zip(w).all(|(a, b)| (a - b).abs() <= tol),
    }
}

#[test]
fn sliding_layers_keep_their_window_and_the_logits_of_a_whole_cache() {
    check(Arc::new(CpuBackend::new()), 0.0);
}

/// With a bf16 KV cache (the CLI's CPU setting).
#[test]
fn sliding_layers_keep_their_window_with_a_bf16_cache() {
    check(Arc::new(CpuBackend::with_precision(ollm_ops::cpu::Precision::Bf16Activations)), 0.0);
}

#[test]
fn sliding_layers_keep_their_window_on_the_gpu() {
    if let Some(dev) = common::gpu::gpu_or_skip() {
        check(Arc::new(ollm_ops::cuda::CudaBackend::new(dev)), 2e-2);
    }
}

fn check(backend: Arc<dyn ollm_ops::Backend>, tol: f32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("m");
    tiny_gpt_oss(&model_dir, WINDOW);
    let spill = dir.path().join("spill");
    let offloaded = Placement {
        kv: Some(KvOffload { block: 64, ram_bytes: 1 << 20, spill_dir: spill, window_positions: 0 }),
        ..Placement::resident(4)
    };
    for (name, placement) in [("KV on the device", None), ("KV offloaded", Some(offloaded))] {
        let model = load_model_placed(&model_dir, backend.clone(), placement.as_ref()).expect(name);
        let mut whole = model.new_state().expect("state");
        whole.retain_from(0);
        let want = run(&model, &mut whole);
        let mut windowed = model.new_state().expect("state");
        let got = run(&model, &mut windowed);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(same(g, w, tol), "{name}: logits of forward {i} differ from the whole cache's");
        }
        let len = PROMPT + STEPS;
        let floor = windowed.min_len();
        eprintln!("{name}: {len} positions, sliding layers can step back to {floor}");
        // Kept: at least the window and KEEP_BACK, at most a window's whole cache (or, offloaded,
        // that plus a block).
        assert!(
            floor >= len - window_positions(WINDOW, CHUNK) - 64 && floor <= len - KEEP_BACK,
            "{name}: min_len {floor}"
        );
        assert_eq!(whole.min_len(), 0, "{name}: a pinned state keeps everything");
        match windowed.offload_stats() {
            None => {
                // Sliding layers (0, 2) hold a bounded window from a moving base; full ones all.
                for l in [0, 2] {
                    let kv = windowed.layer_mut(l);
                    let cap = kv.k.shape()[1];
                    assert!(kv.base > 0 && cap <= window_positions(WINDOW, CHUNK), "{name}: layer {l}: {cap} rows");
                    assert_eq!(whole.layer_mut(l).base, 0);
                }
                assert!(windowed.size_bytes() < whole.size_bytes() * 3 / 4, "{name}: sliding layers freed nothing");
            }
            Some(s) => {
                // Full layers keep 54 blocks each; sliding ones a window's worth (+ KEEP_BACK).
                let all_blocks = 4 * len.div_ceil(64);
                let kept = s.ram_blocks + s.disk_blocks;
                let pinned = whole.offload_stats().expect("offloaded");
                eprintln!("{name}: {kept} blocks kept of {all_blocks}");
                assert_eq!(pinned.ram_blocks + pinned.disk_blocks, all_blocks);
                assert!(kept <= 2 * len.div_ceil(64) + 2 * (KEEP_BACK + WINDOW + 128).div_ceil(64), "{name}: {kept}");
                // Each forward at pos0 loads the full layers' pos0 positions and the sliding
                // layers' last blocks only (K and V rows of 2 heads × 16 f32).
                let pos0s = (0..PROMPT).step_by(CHUNK).chain(PROMPT..len);
                let row = 2 * 16 * model.backend().kv_dtype().size_bytes();
                let most: usize = pos0s.map(|p| 2 * p + 2 * (p.min(WINDOW - 1 + 63))).sum::<usize>() * 2 * row;
                assert!(s.loaded_bytes as usize <= most, "{name}: loaded {} B > {most} B", s.loaded_bytes);
            }
        }
        // Stepping back within what the windows kept continues like the whole cache; further
        // back forgets everything.
        let back = len - KEEP_BACK / 2;
        windowed.truncate(back);
        whole.truncate(back);
        assert_eq!(windowed.len(), back);
        let next = [5u32, 9, 11];
        let a = model.forward(&next, &mut windowed, LogitsWanted::Last, None).expect("after truncate");
        let b = model.forward(&next, &mut whole, LogitsWanted::Last, None).expect("after truncate");
        assert!(same(&a, &b, tol), "{name}: logits after stepping back differ");
        windowed.truncate(windowed.min_len() - 1);
        assert_eq!(windowed.len(), 0, "{name}: stepping back past the window must forget everything");
        let fresh = model.forward(&next, &mut windowed, LogitsWanted::Last, None).expect("fresh");
        let mut new = model.new_state().expect("state");
        let again = model.forward(&next, &mut new, LogitsWanted::Last, None).expect("new");
        assert!(same(&fresh, &again, tol), "{name}: restart");
    }
}

/// With a prefix store, sliding layers keep the positions it has yet to take (the session pins
/// them), so storing after a long prompt works; a restored prefix continues like a cold run,
/// and once stored the sliding layers shrink back to their window.
#[test]
fn a_prefix_store_takes_sliding_layers_blocks_and_gives_them_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("m");
    tiny_gpt_oss(&model_dir, WINDOW);
    let model = load_model_placed(&model_dir, Arc::new(CpuBackend::new()), None).expect("model");
    let be = model.backend();
    let tokens = ids(PROMPT);
    let (doc, rest) = tokens.split_at(2048);
    let feed = |state: &mut SeqState, ids: &[u32]| {
        let mut out = Vec::new();
        for c in ids.chunks(256) {
            out = model.forward(c, state, LogitsWanted::Last, None).expect("forward");
        }
        out
    };
    let mut s1 = model.new_state().expect("state");
    s1.retain_from(0);
    feed(&mut s1, doc);
    let cfg = ollm_kv::PrefixConfig { dir: dir.path().join("pc"), max_bytes: u64::MAX };
    let cache =
        ollm_kv::PrefixCache::open(&cfg, model.info().fingerprint, s1.block_layout(be).expect("layout")).expect("open");
    let stored = cache.store(be, &mut s1, doc, &[]).expect("store: the pinned sliding layers kept every block");
    assert_eq!(stored.blocks, doc.len() / 256);
    // Stored: the pin moves on and the sliding layers drop what they no longer need.
    s1.retain_from(doc.len());
    let pinned_rows = s1.layer_mut(0).k.shape()[1];
    feed(&mut s1, rest);
    let rows = s1.layer_mut(0).k.shape()[1];
    assert!(s1.layer_mut(0).base > 0, "the sliding layer kept its front after the store");
    eprintln!("sliding layer 0: {pinned_rows} rows while pinned, {rows} after");

    let mut cold = model.new_state().expect("state");
    let want = feed(&mut cold, &tokens);
    let mut warm = model.new_state().expect("state");
    let r = cache.restore(be, &mut warm, &tokens).expect("restore");
    assert_eq!(r.tokens, doc.len());
    let got = feed(&mut warm, rest);
    assert!(got == want, "logits after a restored prefix differ from the cold run's");
    assert!(warm.layer_mut(0).base > 0, "an imported prefix is stored already: nothing pinned");
}

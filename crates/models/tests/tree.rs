//! Tree verification: one forward over the nodes of a tree of tokens (several candidate
//! continuations, speculative decoding's SpecExec/Sequoia-style verification) gives each node
//! the logits of running its root-to-node path alone after the same prefix. Every family that
//! takes trees (Llama, Qwen2, Qwen3, Gemma 3 with its sliding windows, GPT-OSS with sinks and
//! windows), with the KV cache on the device and spilled to disk in blocks of 16 positions,
//! trees whose window edge falls inside them and prefixes long enough for the sliding layers to
//! drop their front. After the tree the cache keeps a chain prefix of its nodes by truncation:
//! the next token's logits equal the path run's. Qwen3-Next refuses trees. CPU, within 1e-5 of
//! each logits row's scale.

mod common;

use std::path::Path;
use std::sync::Arc;

use ollm_kv::KvOffload;
use ollm_models::{BatchSeq, CausalLm, LogitsWanted, ModelError, SeqState, TreeMask, load_model_placed};
use ollm_ops::Backend;
use ollm_ops::cpu::CpuBackend;
use ollm_residency::plan::Placement;

const REL: f32 = 1e-5;

fn ids(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + salt * 101 + 11) % 300).collect()
}

/// Nodes 0-3 a chain (the first candidate), 4-6 a second branch from node 0, 7 a third from
/// the root token's own row, 8 a second root: 9 nodes, depth up to 3.
fn tree() -> (Vec<u32>, TreeMask) {
    let parents = [None, Some(0), Some(1), Some(2), Some(0), Some(4), Some(5), Some(0), None];
    let tokens = vec![17, 23, 5, 99, 42, 7, 250, 3, 64];
    (tokens, TreeMask::new(&parents).expect("parents come first"))
}

/// Feeds `prefix` in forwards of at most `chunk`.
fn prefill(model: &Arc<dyn CausalLm>, st: &mut SeqState, prefix: &[u32], chunk: usize) {
    for c in prefix.chunks(chunk) {
        model.forward(c, st, LogitsWanted::Last, None).expect("prefill");
    }
}

fn assert_rows_close(want: &[f32], got: &[f32], vocab: usize, what: &str) -> f32 {
    assert_eq!(want.len(), got.len(), "{what}: length");
    let mut worst_rel = 0f32;
    for (r, (w, g)) in want.chunks(vocab).zip(got.chunks(vocab)).enumerate() {
        let scale = w.iter().fold(1f32, |m, v| m.max(v.abs()));
        let worst = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= REL * scale, "{what}: row {r} differs by {worst} (scale {scale})");
        worst_rel = worst_rel.max(worst / scale);
    }
    worst_rel
}

/// One tree forward after `prefix` against each leaf's path alone, then a truncation to the
/// first chain and one more token, on `model`.
fn check_model(model: &Arc<dyn CausalLm>, prefix: &[u32], chunk: usize, what: &str) {
    let vocab = model.info().vocab_size;
    let (tokens, mask) = tree();
    let mut st = model.new_state().expect("state");
    prefill(model, &mut st, prefix, chunk);
    let mut items = [BatchSeq { tree: Some(&mask), ..BatchSeq::new(&tokens, &mut st, LogitsWanted::All) }];
    let got = model.forward_batch(&mut items).expect("tree forward").pop().expect("one item");
    assert_eq!(got.len(), tokens.len() * vocab);
    assert_eq!(st.len(), prefix.len() + tokens.len(), "every node takes a cache row");
    let mut worst = 0f32;
    for leaf in mask.leaves() {
        let path = mask.path(leaf);
        let path_ids: Vec<u32> = path.iter().map(|&i| tokens[i]).collect();
        let mut alone = model.new_state().expect("state");
        prefill(model, &mut alone, prefix, chunk);
        let want = model.forward(&path_ids, &mut alone, LogitsWanted::All, None).expect("path alone");
        let mine: Vec<f32> = path.iter().flat_map(|&i| got[i * vocab..(i + 1) * vocab].to_vec()).collect();
        worst = worst.max(assert_rows_close(&want, &mine, vocab, &format!("{what}, leaf {leaf} (path {path:?})")));
    }
    // Keep nodes 0..=2 (a chain prefix of the nodes, so a truncation) and feed the next token:
    // the logits of the path 0, 1, 2 run alone and then that token.
    assert!(mask.is_chain_prefix(2));
    st.truncate(prefix.len() + 3);
    let next = model.forward(&[11], &mut st, LogitsWanted::Last, None).expect("after truncation");
    let mut alone = model.new_state().expect("state");
    prefill(model, &mut alone, prefix, chunk);
    model.forward(&tokens[..3], &mut alone, LogitsWanted::Last, None).expect("chain alone");
    let want = model.forward(&[11], &mut alone, LogitsWanted::Last, None).expect("next alone");
    worst = worst.max(assert_rows_close(&want, &next, vocab, &format!("{what}, after keeping a chain")));
    println!("{what}: every path equal (worst |Δ| {worst:.2e} of the scale)");
}

/// `check_model` for the family `write` makes, KV on the device and spilled, after a short
/// prefix (40 positions: the tree crosses a 16-position block edge) and a long one fed in
/// pieces (1,100: sliding layers drop their front first).
fn check_family(name: &str, write: impl Fn(&Path)) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("m");
    write(&model_dir);
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let resident = load_model_placed(&model_dir, be.clone(), None).expect("load");
    assert!(resident.supports_tree(), "{name} takes trees");
    let offloaded = Placement {
        kv: Some(KvOffload { block: 16, ram_bytes: 0, spill_dir: dir.path().join("spill"), window_positions: 0 }),
        ..Placement::resident(resident.info().n_layers)
    };
    let spilled = load_model_placed(&model_dir, be, Some(&offloaded)).expect("load offloaded");
    for (case, model) in [("KV on the device", &resident), ("KV spilled to disk", &spilled)] {
        check_model(model, &ids(40, 1), 64, &format!("{name}, {case}, prefix 40"));
        check_model(model, &ids(1100, 2), 100, &format!("{name}, {case}, prefix 1100"));
    }
}

#[test]
fn tree_logits_equal_each_path_alone_for_llama() {
    check_family("llama", common::tiny_model);
}

#[test]
fn tree_logits_equal_each_path_alone_for_qwen2_and_qwen3() {
    check_family("qwen2", |d| common::tiny_qwen(d, "Qwen2ForCausalLM"));
    check_family("qwen3", |d| common::tiny_qwen(d, "Qwen3ForCausalLM"));
}

/// Window 3: the deeper nodes' windows end inside the tree itself (a node at depth 3 no longer
/// sees the root token's row).
#[test]
fn tree_logits_equal_each_path_alone_for_gemma3_across_a_window_edge() {
    check_family("gemma3, window 3", |d| common::tiny_gemma3(d, 3));
}

/// Sinks on every layer; window 2 (the edge inside the tree) and 32.
#[test]
fn tree_logits_equal_each_path_alone_for_gpt_oss() {
    check_family("gpt-oss, window 2", |d| common::tiny_gpt_oss(d, 2));
    check_family("gpt-oss, window 32", |d| common::tiny_gpt_oss(d, 32));
}

/// Qwen3-Next's recurrent layers keep one state per sequence: a tree is refused with an error
/// naming the reason, and the state is untouched.
#[test]
fn qwen3_next_refuses_a_tree() {
    let dir = tempfile::tempdir().expect("tempdir");
    common::tiny_qwen3_next(dir.path());
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let model = load_model_placed(dir.path(), be, None).expect("load");
    assert!(!model.supports_tree());
    let (tokens, mask) = tree();
    let mut st = model.new_state().expect("state");
    let mut items = [BatchSeq { tree: Some(&mask), ..BatchSeq::new(&tokens, &mut st, LogitsWanted::All) }];
    let err = model.forward_batch(&mut items).expect_err("a tree");
    assert!(matches!(err, ModelError::TreeUnsupported { .. }), "{err}");
    assert!(err.to_string().contains("recurrent state"), "{err}");
    assert_eq!(st.len(), 0);
}

/// A tree whose node count differs from the ids is refused before any state changes.
#[test]
fn a_tree_of_the_wrong_size_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    common::tiny_model(dir.path());
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let model = load_model_placed(dir.path(), be, None).expect("load");
    let mask = TreeMask::chain(3);
    let mut st = model.new_state().expect("state");
    let mut items = [BatchSeq { tree: Some(&mask), ..BatchSeq::new(&[1, 2], &mut st, LogitsWanted::All) }];
    let err = model.forward_batch(&mut items).expect_err("sizes differ");
    assert!(matches!(err, ModelError::TreeShape { nodes: 3, ids: 2 }), "{err}");
    assert_eq!(st.len(), 0);
}

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

use std::sync::Arc;

use common::tree::{Tolerance, check_family, tree};
use ollm_models::{BatchSeq, LogitsWanted, ModelError, TreeMask, load_model_placed};
use ollm_ops::Backend;
use ollm_ops::cpu::CpuBackend;

const EXACT: Tolerance = Tolerance { rel: 1e-5, outliers: 0 };

fn cpu() -> (Arc<dyn Backend>, Arc<dyn Backend>) {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    (be.clone(), be)
}

#[test]
fn tree_logits_equal_each_path_alone_for_llama() {
    check_family("llama", common::tiny_model, cpu(), EXACT);
}

#[test]
fn tree_logits_equal_each_path_alone_for_qwen2_and_qwen3() {
    check_family("qwen2", |d| common::tiny_qwen(d, "Qwen2ForCausalLM"), cpu(), EXACT);
    check_family("qwen3", |d| common::tiny_qwen(d, "Qwen3ForCausalLM"), cpu(), EXACT);
}

/// Window 3: the deeper nodes' windows end inside the tree itself (a node at depth 3 no longer
/// sees the root token's row).
#[test]
fn tree_logits_equal_each_path_alone_for_gemma3_across_a_window_edge() {
    check_family("gemma3, window 3", |d| common::tiny_gemma3(d, 3), cpu(), EXACT);
}

/// Sinks on every layer; window 2 (the edge inside the tree) and 32.
#[test]
fn tree_logits_equal_each_path_alone_for_gpt_oss() {
    check_family("gpt-oss, window 2", |d| common::tiny_gpt_oss(d, 2), cpu(), EXACT);
    check_family("gpt-oss, window 32", |d| common::tiny_gpt_oss(d, 32), cpu(), EXACT);
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

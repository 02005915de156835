//! The tree-verification check shared by tree.rs (CPU) and tree_cuda.rs (GPU): one forward
//! over a tree of tokens against each root-to-leaf path run alone on a reference backend, with
//! the KV cache on the device and spilled, then a truncation to the first chain.

use std::path::Path;
use std::sync::Arc;

use ollm_kv::KvOffload;
use ollm_models::{BatchSeq, CausalLm, LogitsWanted, SeqState, TreeMask, load_model_placed};
use ollm_ops::Backend;
use ollm_residency::plan::Placement;

pub fn ids(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + salt * 101 + 11) % 300).collect()
}

/// Nodes 0-3 a chain (the first candidate), 4-6 a second branch from node 0, 7 a third from
/// the root token's own row, 8 a second root: 9 nodes, depth up to 3.
pub fn tree() -> (Vec<u32>, TreeMask) {
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

/// How close a tree's rows must be to the paths run alone: within `rel` of each row's scale
/// (its largest magnitude, at least 1), except at most `outliers` rows of a family's checks,
/// each printed.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub rel: f32,
    pub outliers: usize,
}

/// Compares rows; returns the worst difference over the scale among rows within `rel`, and
/// pushes the others onto `beyond`.
fn rows_close(want: &[f32], got: &[f32], vocab: usize, (rel, what): (f32, &str), beyond: &mut Vec<String>) -> f32 {
    assert_eq!(want.len(), got.len(), "{what}: length");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: not finite");
    let mut worst_rel = 0f32;
    for (r, (w, g)) in want.chunks(vocab).zip(got.chunks(vocab)).enumerate() {
        let scale = w.iter().fold(1f32, |m, v| m.max(v.abs()));
        let worst = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if worst <= rel * scale {
            worst_rel = worst_rel.max(worst / scale);
        } else {
            println!("{what}: row {r} differs by {worst} (scale {scale})");
            beyond.push(format!("{what}: row {r}"));
        }
    }
    worst_rel
}

/// One tree forward after `prefix` on `model` against each leaf's path alone on `reference`,
/// then a truncation to the first chain and one more token.
fn check_model(
    (reference, model): (&Arc<dyn CausalLm>, &Arc<dyn CausalLm>),
    (prefix, chunk): (&[u32], usize),
    (rel, what): (f32, &str),
    beyond: &mut Vec<String>,
) {
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
        let mut alone = reference.new_state().expect("state");
        prefill(reference, &mut alone, prefix, chunk);
        let want = reference.forward(&path_ids, &mut alone, LogitsWanted::All, None).expect("path alone");
        let mine: Vec<f32> = path.iter().flat_map(|&i| got[i * vocab..(i + 1) * vocab].to_vec()).collect();
        let name = format!("{what}, leaf {leaf} (path {path:?})");
        worst = worst.max(rows_close(&want, &mine, vocab, (rel, &name), beyond));
    }
    // Keep nodes 0..=2 (a chain prefix of the nodes, so a truncation) and feed the next token:
    // the logits of the path 0, 1, 2 run alone and then that token.
    assert!(mask.is_chain_prefix(2));
    st.truncate(prefix.len() + 3);
    let next = model.forward(&[11], &mut st, LogitsWanted::Last, None).expect("after truncation");
    let mut alone = reference.new_state().expect("state");
    prefill(reference, &mut alone, prefix, chunk);
    reference.forward(&tokens[..3], &mut alone, LogitsWanted::Last, None).expect("chain alone");
    let want = reference.forward(&[11], &mut alone, LogitsWanted::Last, None).expect("next alone");
    let name = format!("{what}, after keeping a chain");
    worst = worst.max(rows_close(&want, &next, vocab, (rel, &name), beyond));
    println!("{what}: every path equal (worst |Δ| {worst:.2e} of the scale)");
}

/// `check_model` for the family `write` makes, KV on the device and spilled, after a short
/// prefix (40 positions: the tree crosses a 16-position block edge) and a long one fed in
/// pieces (1,100: sliding layers drop their front first).
pub fn check_family(
    name: &str,
    write: impl Fn(&Path),
    (reference, be): (Arc<dyn Backend>, Arc<dyn Backend>),
    tol: Tolerance,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("m");
    write(&model_dir);
    let want = load_model_placed(&model_dir, reference, None).expect("load the reference");
    let resident = load_model_placed(&model_dir, be.clone(), None).expect("load");
    assert!(resident.supports_tree(), "{name} takes trees");
    let offloaded = Placement {
        kv: Some(KvOffload { block: 16, ram_bytes: 0, spill_dir: dir.path().join("spill"), window_positions: 0 }),
        ..Placement::resident(resident.info().n_layers)
    };
    let spilled = load_model_placed(&model_dir, be, Some(&offloaded)).expect("load offloaded");
    let mut beyond = Vec::new();
    for (case, model) in [("KV on the device", &resident), ("KV spilled to disk", &spilled)] {
        let what = format!("{name}, {case}, prefix 40");
        check_model((&want, model), (&ids(40, 1), 64), (tol.rel, &what), &mut beyond);
        let what = format!("{name}, {case}, prefix 1100");
        check_model((&want, model), (&ids(1100, 2), 100), (tol.rel, &what), &mut beyond);
    }
    assert!(
        beyond.len() <= tol.outliers,
        "{name}: {} rows beyond {} of their scale (at most {} allowed): {}",
        beyond.len(),
        tol.rel,
        tol.outliers,
        beyond.join("; ")
    );
}

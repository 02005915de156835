//! The batched-forward script shared by batched.rs (CPU) and batched_cuda.rs (GPU): steps of
//! sequences that join, decode together and leave, run once sequence by sequence and once as
//! batched forwards, with the logits of each compared.

use std::path::Path;
use std::sync::Arc;

use ollm_kv::KvOffload;
use ollm_models::{BatchSeq, CausalLm, LogitsWanted, SeqState, load_model_placed};
use ollm_residency::plan::Placement;

/// One step of a script: which sequences run, with which ids and which logits.
pub type Step = Vec<(usize, Vec<u32>, LogitsWanted)>;

/// Logits per step, per item of the step.
pub type Logits = Vec<Vec<Vec<f32>>>;

pub fn ids(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + salt * 101 + 11) % 300).collect()
}

/// Five sequences: 0–2 prefill together (1,100, 17 and 1 tokens), then decode; 3 joins in step
/// 2 with a 40-token prompt (all its logits wanted); 1 leaves after step 2 (cancelled); 4 joins
/// in step 4; the rest decode to the end.
pub fn script() -> Vec<Step> {
    use LogitsWanted::{All, Last};
    vec![
        vec![(0, ids(1100, 0), Last), (1, ids(17, 1), Last), (2, ids(1, 2), Last)],
        vec![(0, vec![5], Last), (1, vec![6], Last), (2, vec![7], Last), (3, ids(40, 3), All)],
        vec![(0, vec![8], Last), (2, vec![9], Last), (3, vec![10], Last)],
        vec![(2, vec![11], Last), (4, ids(3, 4), Last), (0, vec![12], Last), (3, vec![13], Last)],
        vec![(0, vec![14], Last), (2, vec![15], Last), (3, vec![16], Last), (4, vec![17], Last)],
    ]
}

/// Sequences a script names (one more than the largest id).
fn seq_count(steps: &[Step]) -> usize {
    steps.iter().flatten().map(|(s, _, _)| s + 1).max().unwrap_or(0)
}

/// Each sequence's logits per step, run alone.
pub fn alone(model: &Arc<dyn CausalLm>, steps: &[Step]) -> Logits {
    let mut states: Vec<Option<SeqState>> = (0..seq_count(steps)).map(|_| None).collect();
    let mut out = Vec::new();
    for step in steps {
        let mut row = Vec::new();
        for (seq, ids, wanted) in step {
            let st = states[*seq].get_or_insert_with(|| model.new_state().expect("state"));
            row.push(model.forward(ids, st, *wanted, None).expect("forward alone"));
        }
        out.push(row);
    }
    out
}

/// The same steps, each one batched forward.
pub fn together(model: &Arc<dyn CausalLm>, steps: &[Step]) -> Logits {
    let n = seq_count(steps);
    let mut states: Vec<Option<SeqState>> = (0..n).map(|_| None).collect();
    let mut out = Vec::new();
    for step in steps {
        for (seq, _, _) in step {
            if states[*seq].is_none() {
                states[*seq] = Some(model.new_state().expect("state"));
            }
        }
        // Borrow the states of this step's sequences, in the step's order.
        let mut by_seq: Vec<Option<&mut SeqState>> = states
            .iter_mut()
            .enumerate()
            .map(|(i, s)| s.as_mut().filter(|_| step.iter().any(|(q, _, _)| *q == i)))
            .collect();
        let mut items: Vec<BatchSeq<'_>> = step
            .iter()
            .map(|(seq, ids, wanted)| {
                BatchSeq::new(ids, by_seq[*seq].take().expect("each sequence once per step"), *wanted)
            })
            .collect();
        out.push(model.forward_batch(&mut items).expect("forward batch"));
    }
    out
}

/// Asserts `got` equals `want` row by row (rows of `vocab` logits) within `rel` of each row's
/// logit scale (its largest magnitude, at least 1), except at most `outliers` rows, which are
/// printed; returns the worst difference over the scale among the rows within it.
pub fn assert_close(want: &Logits, got: &Logits, (vocab, rel, outliers): (usize, f32, usize), what: &str) -> f32 {
    let mut worst_rel = 0f32;
    let mut beyond = Vec::new();
    assert_eq!(want.len(), got.len(), "{what}: step count");
    for (s, (w_step, g_step)) in want.iter().zip(got).enumerate() {
        assert_eq!(w_step.len(), g_step.len(), "{what}: step {s} item count");
        for (i, (w, g)) in w_step.iter().zip(g_step).enumerate() {
            assert_eq!(w.len(), g.len(), "{what}: step {s} item {i} logits length");
            assert!(g.iter().all(|v| v.is_finite()), "{what}: step {s} item {i} not finite");
            for (r, (w, g)) in w.chunks(vocab).zip(g.chunks(vocab)).enumerate() {
                let scale = w.iter().fold(1f32, |m, v| m.max(v.abs()));
                let worst = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                if worst <= rel * scale {
                    worst_rel = worst_rel.max(worst / scale);
                } else {
                    beyond.push(format!("step {s} item {i} row {r}: {worst} (scale {scale})"));
                }
            }
        }
    }
    if !beyond.is_empty() {
        println!("{what}: rows beyond {rel} of their scale: {}", beyond.join("; "));
    }
    assert!(
        beyond.len() <= outliers,
        "{what}: batched logits differ beyond {rel} of the scale at {} rows (at most {outliers} allowed): {}",
        beyond.len(),
        beyond.join("; ")
    );
    worst_rel
}

/// How closely a batched run must follow the sequences alone: within `rel` of each logits row's
/// scale, except at most `outliers` rows of the script.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub rel: f32,
    pub outliers: usize,
}

/// Runs `steps` alone on `reference` and batched on `model` for the family `write` makes, with
/// the KV cache on the device and spilled to disk in blocks; asserts they agree within `tol`.
pub fn check_family(
    name: &str,
    write: impl Fn(&Path),
    (reference, backend): (Arc<dyn ollm_ops::Backend>, Arc<dyn ollm_ops::Backend>),
    steps: &[Step],
    tol: Tolerance,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("m");
    write(&model_dir);
    let spill = dir.path().join("spill");
    let offloaded = |n_layers: usize| Placement {
        kv: Some(KvOffload { block: 16, ram_bytes: 0, spill_dir: spill.clone(), window_positions: 0 }),
        ..Placement::resident(n_layers)
    };
    let want = alone(&load_model_placed(&model_dir, reference, None).expect("load the reference"), steps);
    let resident = load_model_placed(&model_dir, backend.clone(), None).expect("load");
    let (n_layers, vocab) = (resident.info().n_layers, resident.info().vocab_size);
    for (case, model) in [
        ("KV on the device", resident.clone()),
        (
            "KV spilled to disk",
            load_model_placed(&model_dir, backend.clone(), Some(&offloaded(n_layers))).expect("load offloaded"),
        ),
    ] {
        let got = together(&model, steps);
        let worst = assert_close(&want, &got, (vocab, tol.rel, tol.outliers), &format!("{name}, {case}"));
        println!("{name}, {case}: {} steps equal (worst |Δ| {worst:.2e} of the scale)", steps.len());
    }
}

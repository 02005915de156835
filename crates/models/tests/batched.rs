//! A batched forward gives each sequence the logits it gets alone: for every family, sequences
//! of mixed lengths prefill together (one longer than a prefill tile, so tiles hold parts of
//! several sequences), then decode together while others join (a prompt prefilled in the same
//! step as the others' decode tokens) and leave, with the KV cache on the device and offloaded
//! (spilled to disk in blocks). On the CPU the two agree within 1e-5 (relative to the logits'
//! scale): the rows of a matmul do not depend on each other.

mod common;

use std::path::Path;
use std::sync::Arc;

use ollm_kv::KvOffload;
use ollm_models::{BatchSeq, CausalLm, LogitsWanted, SeqState, load_model_placed};
use ollm_ops::Backend;
use ollm_ops::cpu::CpuBackend;
use ollm_residency::plan::Placement;

/// One step of the script: which sequences run, with which ids and which logits.
type Step = Vec<(usize, Vec<u32>, LogitsWanted)>;

fn ids(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + salt * 101 + 11) % 300).collect()
}

/// Five sequences: 0–2 prefill together (1,100, 17 and 1 tokens), then decode; 3 joins in step
/// 2 with a 40-token prompt (all its logits wanted); 1 leaves after step 2 (cancelled); 4 joins
/// in step 4; the rest decode to the end.
fn script() -> Vec<Step> {
    use LogitsWanted::{All, Last};
    vec![
        vec![(0, ids(1100, 0), Last), (1, ids(17, 1), Last), (2, ids(1, 2), Last)],
        vec![(0, vec![5], Last), (1, vec![6], Last), (2, vec![7], Last), (3, ids(40, 3), All)],
        vec![(0, vec![8], Last), (2, vec![9], Last), (3, vec![10], Last)],
        vec![(2, vec![11], Last), (4, ids(3, 4), Last), (0, vec![12], Last), (3, vec![13], Last)],
        vec![(0, vec![14], Last), (2, vec![15], Last), (3, vec![16], Last), (4, vec![17], Last)],
    ]
}

/// Each sequence's logits per step, run alone.
fn alone(model: &Arc<dyn CausalLm>, steps: &[Step]) -> Vec<Vec<Vec<f32>>> {
    let mut states: Vec<Option<SeqState>> = (0..5).map(|_| None).collect();
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
fn together(model: &Arc<dyn CausalLm>, steps: &[Step]) -> Vec<Vec<Vec<f32>>> {
    let mut states: Vec<Option<SeqState>> = (0..5).map(|_| None).collect();
    let mut out = Vec::new();
    for step in steps {
        for (seq, _, _) in step {
            if states[*seq].is_none() {
                states[*seq] = Some(model.new_state().expect("state"));
            }
        }
        // Borrow the states of this step's sequences, in the step's order.
        let mut picked: Vec<(usize, &mut SeqState)> =
            states.iter_mut().enumerate().filter_map(|(i, s)| s.as_mut().map(|s| (i, s))).collect();
        picked.retain(|(i, _)| step.iter().any(|(s, _, _)| s == i));
        let mut by_seq: Vec<Option<&mut SeqState>> = (0..5).map(|_| None).collect();
        for (i, s) in picked {
            by_seq[i] = Some(s);
        }
        let mut items: Vec<BatchSeq<'_>> = step
            .iter()
            .map(|(seq, ids, wanted)| BatchSeq {
                ids,
                state: by_seq[*seq].take().expect("each sequence once per step"),
                wanted: *wanted,
            })
            .collect();
        out.push(model.forward_batch(&mut items).expect("forward batch"));
    }
    out
}

fn check_family(name: &str, write: impl Fn(&Path), backend: Arc<dyn Backend>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("m");
    write(&model_dir);
    let steps = script();
    let spill = dir.path().join("spill");
    let offloaded = |n_layers: usize| Placement {
        kv: Some(KvOffload { block: 16, ram_bytes: 0, spill_dir: spill.clone(), window_positions: 0 }),
        ..Placement::resident(n_layers)
    };
    let resident = load_model_placed(&model_dir, backend.clone(), None).expect("load");
    let n_layers = resident.info().n_layers;
    let want = alone(&resident, &steps);
    for (case, model) in [
        ("KV on the device", resident.clone()),
        (
            "KV spilled to disk",
            load_model_placed(&model_dir, backend.clone(), Some(&offloaded(n_layers))).expect("load offloaded"),
        ),
    ] {
        let got = together(&model, &steps);
        for (s, (w_step, g_step)) in want.iter().zip(&got).enumerate() {
            assert_eq!(w_step.len(), g_step.len(), "{name}, {case}: step {s} item count");
            for (i, (w, g)) in w_step.iter().zip(g_step).enumerate() {
                assert_eq!(w.len(), g.len(), "{name}, {case}: step {s} item {i} logits length");
                let scale = w.iter().fold(1f32, |m, v| m.max(v.abs()));
                let worst = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(
                    worst <= 1e-5 * scale,
                    "{name}, {case}: step {s} item {i}: batched logits differ by {worst} (scale {scale})"
                );
                assert!(g.iter().all(|v| v.is_finite()), "{name}, {case}: step {s} item {i} not finite");
            }
        }
        println!("{name}, {case}: {} steps equal", steps.len());
    }
}

#[test]
fn batched_logits_equal_alone_for_llama() {
    check_family("llama", common::tiny_model, Arc::new(CpuBackend::new()));
}

#[test]
fn batched_logits_equal_alone_for_gpt_oss() {
    check_family("gpt-oss", |d| common::tiny_gpt_oss(d, 32), Arc::new(CpuBackend::new()));
}

#[test]
fn batched_logits_equal_alone_for_qwen3_next() {
    check_family("qwen3-next", common::tiny_qwen3_next, Arc::new(CpuBackend::new()));
}

#[test]
fn batched_logits_equal_alone_for_qwen2_and_qwen3() {
    check_family("qwen2", |d| common::tiny_qwen(d, "Qwen2ForCausalLM"), Arc::new(CpuBackend::new()));
    check_family("qwen3", |d| common::tiny_qwen(d, "Qwen3ForCausalLM"), Arc::new(CpuBackend::new()));
}

#[test]
fn batched_logits_equal_alone_for_gemma3() {
    check_family("gemma3", |d| common::tiny_gemma3(d, 32), Arc::new(CpuBackend::new()));
}

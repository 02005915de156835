//! A batched forward gives each sequence the logits it gets alone: for every family, sequences
//! of mixed lengths prefill together (one longer than a prefill tile, so tiles hold parts of
//! several sequences), then decode together while others join (a prompt prefilled in the same
//! step as the others' decode tokens) and leave, with the KV cache on the device and offloaded
//! (spilled to disk in blocks). On the CPU the two agree within 1e-5 (relative to the logits'
//! scale): the rows of a matmul do not depend on each other. A MoE model moves each expert a
//! decode step of many sequences routes to once for the step, not once per sequence.

mod common;

use std::sync::Arc;

use common::batch::{Step, Tolerance, check_family, ids, script};
use ollm_models::{BatchSeq, CausalLm, LogitsWanted, SeqState, load_model_placed};
use ollm_ops::Backend;
use ollm_ops::cpu::CpuBackend;
use ollm_residency::experts::ExpertPlacement;
use ollm_residency::plan::Placement;

const REL: f32 = 1e-5;
/// Every row within 1e-5 of its scale on the CPU.
const EXACT: Tolerance = Tolerance { rel: REL, outliers: 0 };

fn cpu() -> (Arc<dyn Backend>, Arc<dyn Backend>) {
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    (be.clone(), be)
}

#[test]
fn batched_logits_equal_alone_for_llama() {
    check_family("llama", common::tiny_model, cpu(), &script(), EXACT);
}

#[test]
fn batched_logits_equal_alone_for_gpt_oss() {
    check_family("gpt-oss", |d| common::tiny_gpt_oss(d, 32), cpu(), &script(), EXACT);
}

/// A 2-position window, shorter than every prompt but the 1-token one: each sequence's sliding
/// layers drop their own front (their cache's base moves per sequence), and a prompt's rows
/// attend only over their own window inside the batch's tiles.
#[test]
fn batched_logits_equal_alone_for_gpt_oss_with_a_window_shorter_than_the_prompts() {
    check_family("gpt-oss, window 2", |d| common::tiny_gpt_oss(d, 2), cpu(), &script(), EXACT);
}

#[test]
fn batched_logits_equal_alone_for_qwen3_next() {
    check_family("qwen3-next", common::tiny_qwen3_next, cpu(), &script(), EXACT);
}

/// Qwen3-Next with prefills and decodes in the same steps, the prompts first in the batch: the
/// DeltaNet of one step runs the chunked form for the prompts' segments and the recurrent form
/// for the decode rows, each against its own sequence's state; then all decode together.
#[test]
fn qwen3_next_prefills_and_decodes_in_one_step() {
    use LogitsWanted::{All, Last};
    let steps: Vec<Step> = vec![
        vec![(0, ids(70, 5), Last)],
        vec![(1, ids(130, 6), All), (0, vec![3], Last), (2, ids(2, 7), Last)],
        vec![(2, vec![4], Last), (3, ids(65, 8), Last), (1, vec![5], Last), (0, vec![6], Last)],
        vec![(0, vec![7], Last), (1, vec![8], Last), (2, vec![9], Last), (3, vec![10], Last)],
    ];
    check_family("qwen3-next, mixed steps", common::tiny_qwen3_next, cpu(), &steps, EXACT);
}

/// Expert uses (slot hits and moves into a slot) of `model` so far.
fn expert_uses(model: &Arc<dyn CausalLm>) -> (u64, u64) {
    let s = model.expert_stats().expect("a MoE model");
    (s.hits + s.ram_loads + s.disk_loads, s.ram_loads + s.disk_loads)
}

/// A decode step of 16 sequences through an expert cache of 2 slots: batched, each (layer,
/// expert) some row routes to is used once for the step — at most every expert once — where the
/// sequences one by one use 16 × layers × k, moving most of them; the logits stay those alone.
fn experts_move_once_per_step(name: &str, write: impl Fn(&std::path::Path), n_experts: usize, k: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path());
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let resident = load_model_placed(dir.path(), be.clone(), None).expect("load");
    let (n_layers, experts) = (resident.info().n_layers, resident.expert_stats().expect("MoE").experts);
    let moe_layers = experts / n_experts;
    let placement = Placement {
        experts: Some(ExpertPlacement { slots: 2, ram_layers: vec![true; moe_layers] }),
        ..Placement::resident(n_layers)
    };
    let load = || load_model_placed(dir.path(), be.clone(), Some(&placement)).expect("load with 2 expert slots");
    let (one_by_one, batched) = (load(), load());
    let prompts: Vec<Vec<u32>> = (0..16).map(|s| ids(5 + s, s as u32)).collect();
    let mut alone_states: Vec<SeqState> = (0..16).map(|_| one_by_one.new_state().expect("state")).collect();
    let mut batch_states: Vec<SeqState> = (0..16).map(|_| batched.new_state().expect("state")).collect();
    for (p, (a, b)) in prompts.iter().zip(alone_states.iter_mut().zip(&mut batch_states)) {
        one_by_one.forward(p, a, LogitsWanted::Last, None).expect("prefill");
        batched.forward(p, b, LogitsWanted::Last, None).expect("prefill");
    }
    let next: Vec<u32> = (0..16).map(|s| 20 + 7 * s).collect();

    let before = expert_uses(&one_by_one);
    let want: Vec<Vec<f32>> = next
        .iter()
        .zip(&mut alone_states)
        .map(|(id, st)| one_by_one.forward(&[*id], st, LogitsWanted::Last, None).expect("decode alone"))
        .collect();
    let after = expert_uses(&one_by_one);
    let (alone_uses, alone_moves) = (after.0 - before.0, after.1 - before.1);

    let before = expert_uses(&batched);
    let steps: Vec<[u32; 1]> = next.iter().map(|&id| [id]).collect();
    let mut items: Vec<BatchSeq<'_>> =
        steps.iter().zip(&mut batch_states).map(|(ids, state)| BatchSeq::new(ids, state, LogitsWanted::Last)).collect();
    let got = batched.forward_batch(&mut items).expect("decode batched");
    let after = expert_uses(&batched);
    let (batch_uses, batch_moves) = (after.0 - before.0, after.1 - before.1);

    println!(
        "{name}: 16-sequence decode step: batched {batch_uses} expert uses, {batch_moves} moves; one by one {alone_uses} uses, {alone_moves} moves"
    );
    assert_eq!(alone_uses, (16 * moe_layers * k) as u64, "{name}: one by one, every token uses k experts per layer");
    assert!(batch_uses <= experts as u64, "{name}: batched, an expert used twice in one step: {batch_uses}");
    assert!(batch_uses >= (moe_layers * k) as u64, "{name}: batched, too few uses: {batch_uses}");
    assert!(batch_moves <= batch_uses, "{name}");
    assert!(alone_moves > 2 * batch_moves, "{name}: moves {alone_moves} one by one vs {batch_moves} batched");
    common::batch::assert_close(&vec![want], &vec![got], (300, REL, 0), name);
}

#[test]
fn gpt_oss_moves_each_expert_once_per_batched_decode_step() {
    experts_move_once_per_step("gpt-oss", |d| common::tiny_gpt_oss(d, 32), 8, 2);
}

#[test]
fn qwen3_next_moves_each_expert_once_per_batched_decode_step() {
    experts_move_once_per_step("qwen3-next", common::tiny_qwen3_next, 8, 2);
}

/// The planner's activation count of a batched forward: one sequence's is the plain forward's;
/// 16 sequences of one row each add 15 logits rows and the segments' q, k, v and ctx buffers.
#[test]
fn batched_scratch_counts_a_logits_row_and_segment_buffers_per_sequence() {
    type Write<'a> = &'a dyn Fn(&std::path::Path);
    let writers: [(&str, Write<'_>); 5] = [
        ("llama", &common::tiny_model),
        ("gpt-oss", &|d| common::tiny_gpt_oss(d, 32)),
        ("qwen3-next", &common::tiny_qwen3_next),
        ("qwen3", &|d| common::tiny_qwen(d, "Qwen3ForCausalLM")),
        ("gemma3", &|d| common::tiny_gemma3(d, 32)),
    ];
    for (name, write) in writers {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path());
        let m = ollm_models::registry::model_bytes(dir.path()).expect("sizes");
        let bytes = |rows, seqs| m.batch_scratch_bytes(rows, seqs).expect("scratch");
        assert_eq!(bytes(1100, 1), m.scratch_bytes(1100).expect("scratch"), "{name}");
        let extra = bytes(16, 16) - bytes(16, 1);
        let least = 4 * (15 * m.vocab_size + 16 * 2 * m.q_dim) as u64;
        assert!(extra >= least, "{name}: 16 sequences add {extra} bytes, fewer than {least}");
        assert!(bytes(64, 64) > bytes(16, 16), "{name}");
    }
}

#[test]
fn batched_logits_equal_alone_for_qwen2_and_qwen3() {
    check_family("qwen2", |d| common::tiny_qwen(d, "Qwen2ForCausalLM"), cpu(), &script(), EXACT);
    check_family("qwen3", |d| common::tiny_qwen(d, "Qwen3ForCausalLM"), cpu(), &script(), EXACT);
}

#[test]
fn batched_logits_equal_alone_for_gemma3() {
    check_family("gemma3", |d| common::tiny_gemma3(d, 32), cpu(), &script(), EXACT);
}

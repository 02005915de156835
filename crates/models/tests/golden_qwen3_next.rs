//! Qwen3-Next against transformers 5.17 (f32 math on the same bf16 weights; docs/models.md §4),
//! recorded by scripts/make_golden_qwen3_next.py into fixtures/golden/qwen3_next{,_mlp_only}:
//! three Gated DeltaNet layers and one gated-attention layer, a 150-token prompt (the chunked
//! delta rule over 3 chunks of 64), an 8-expert top-2 MoE with a shared expert (and, in the
//! second case, a dense MLP layer). The recurrent form is checked by feeding the last 50
//! tokens one at a time after a 100-token prefill; the carried state by one 50-token call
//! after it; both forms against each other by their logits at the same positions.
//!
//! Tolerance: 1e-4 absolute on logits (the generator's independent f32 implementation agrees
//! with transformers to 2.3e-5).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ollm_models::{LogitsWanted, load_model};
use ollm_ops::cpu::CpuBackend;
use ollm_weights::Catalog;

const TOL_ABS: f32 = 1e-4;
const CASES: [&str; 2] = ["qwen3_next", "qwen3_next_mlp_only"];

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden").join(case)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best }) as u32
}

#[test]
fn prompt_stepwise_and_continued_logits_match_transformers() {
    for case in CASES {
        let dir = case_dir(case);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"))
                .expect("json");
        let ids = |key: &str| -> Vec<u32> {
            meta[key].as_array().expect(key).iter().map(|v| v.as_u64().expect("id") as u32).collect()
        };
        let (input, greedy) = (ids("input_ids"), ids("greedy_ids"));
        let p = meta["prefill_len_for_stepwise"].as_u64().expect("prefill") as usize;
        let cat = Catalog::open_files(&[dir.join("reference.safetensors")]).expect("reference.safetensors");
        let read = |name: &str| cat.read(cat.get(name).expect(name)).expect("read").to_f32_vec().expect("f32");
        let model = load_model(&dir, Arc::new(CpuBackend::new())).expect("model loads");
        let v = model.info().vocab_size;

        // One forward over the prompt: the chunked form.
        let mut state = model.new_state().expect("state");
        let all = model.forward(&input, &mut state, LogitsWanted::All, None).expect("forward");
        let want = read("logits_f32");
        let d = max_abs_diff(&all, &want);
        eprintln!("{case}: prompt of {} tokens, max |Δlogit| = {d:.2e}", input.len());
        assert!(d <= TOL_ABS, "{case}: prompt max |Δlogit| {d} > {TOL_ABS}");
        let next = model.forward(&greedy[..1], &mut state, LogitsWanted::Last, None).expect("decode");
        let d = max_abs_diff(&next, &read("decode_last_logits_f32"));
        assert!(d <= TOL_ABS, "{case}: decode after the prompt max |Δlogit| {d}");

        // Prefill 100, then one token at a time: the recurrent form from the carried state.
        let mut state = model.new_state().expect("state");
        model.forward(&input[..p], &mut state, LogitsWanted::Last, None).expect("prefill");
        let mut steps = Vec::new();
        for &id in &input[p..] {
            steps.extend(model.forward(&[id], &mut state, LogitsWanted::Last, None).expect("step"));
        }
        let d = max_abs_diff(&steps, &read("stepwise_logits_f32"));
        let forms = max_abs_diff(&steps, &all[p * v..]);
        eprintln!("{case}: token by token after {p}: max |Δlogit| = {d:.2e}; against the chunked form {forms:.2e}");
        assert!(d <= TOL_ABS && forms <= TOL_ABS, "{case}: stepwise {d}, forms {forms}");

        // Prefill 100, then the rest in one call: the chunked form from the carried state.
        let mut state = model.new_state().expect("state");
        model.forward(&input[..p], &mut state, LogitsWanted::Last, None).expect("prefill");
        let rest = model.forward(&input[p..], &mut state, LogitsWanted::All, None).expect("rest");
        let d = max_abs_diff(&rest, &read("continued_prefill_logits_f32"));
        assert!(d <= TOL_ABS, "{case}: continued prefill max |Δlogit| {d}");

        // Greedy continuation.
        let mut state = model.new_state().expect("state");
        let mut logits = model.forward(&input, &mut state, LogitsWanted::Last, None).expect("forward");
        let mut got = Vec::new();
        for _ in 0..greedy.len() {
            let id = argmax(&logits);
            got.push(id);
            logits = model.forward(&[id], &mut state, LogitsWanted::Last, None).expect("step");
        }
        assert_eq!(got, greedy, "{case}: greedy continuation");
    }
}

/// Routed experts through 3 device slots (layers 0 and 2's from pinned RAM, 1 and 3's read from
/// disk) give the resident model's logits bit for bit, and the counters add up.
#[test]
fn experts_through_a_few_slots_give_the_resident_logits() {
    use ollm_residency::experts::ExpertPlacement;
    use ollm_residency::plan::Placement;
    let dir = case_dir("qwen3_next");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"))
            .expect("json");
    let input: Vec<u32> =
        meta["input_ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
    let run = |placement: Option<&Placement>| {
        let model = ollm_models::load_model_placed(&dir, Arc::new(CpuBackend::new()), placement).expect("model");
        let mut state = model.new_state().expect("state");
        let mut out = model.forward(&input[..100], &mut state, LogitsWanted::All, None).expect("prefill");
        for &id in &input[100..106] {
            out.extend(model.forward(&[id], &mut state, LogitsWanted::Last, None).expect("step"));
        }
        (out, model.expert_stats().expect("experts"))
    };
    let (want, all) = run(None);
    assert_eq!(all.slots, all.experts, "resident: a slot per expert");
    let placed = Placement {
        experts: Some(ExpertPlacement { slots: 3, ram_layers: vec![true, false, true, false] }),
        ..Placement::resident(4)
    };
    let (got, s) = run(Some(&placed));
    assert!(got == want, "experts through 3 slots change the logits");
    assert_eq!(s.slots, 3);
    assert!(s.ram_loads > 0 && s.disk_loads > 0, "{s:?}");
    assert_eq!(s.hits + s.ram_loads + s.disk_loads, all.hits, "every use counted once: {s:?} vs {all:?}");
}

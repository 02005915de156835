//! Golden tests: the dense forwards on the CPU backend against transformers (fp32 math on the
//! same bf16 weights): Llama recorded by scripts/make_golden_llama.py (transformers 5.17), Qwen2,
//! Qwen3, Gemma 3 and the text part of two Gemma3ForConditionalGeneration checkpoints (both
//! tensor spellings, a vision tower beside) by scripts/make_golden_dense.py (transformers 5.25;
//! the Gemma prompts are longer than their sliding window), into fixtures/golden/.
//!
//! Tolerance: 1e-4 absolute on logits (their std is ≈ 1). f32 math on bf16 weights agrees with
//! torch's f32 path to ~2e-6 in practice; 1e-4 leaves room for summation order only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ollm_models::{CausalLm, LogitsWanted, load_model};
use ollm_ops::cpu::CpuBackend;
use ollm_weights::Catalog;

const TOL_ABS: f32 = 1e-4;
const CASES: [&str; 8] = [
    "llama3_tied",
    "headdim_untied",
    "qwen2_biased",
    "qwen3_qknorm",
    "gemma3_v5",
    "gemma3_hub",
    "gemma3_mm",
    "gemma3_mm_v452",
];

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden").join(case)
}

struct Reference {
    input_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    logits: Vec<f32>,
    decode_last: Vec<f32>,
}

fn reference(case: &str) -> Reference {
    let dir = case_dir(case);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"))
            .expect("json");
    let ids = |key: &str| -> Vec<u32> {
        meta[key].as_array().expect(key).iter().map(|v| v.as_u64().expect("id") as u32).collect()
    };
    let cat = Catalog::open_files(&[dir.join("reference.safetensors")]).expect("reference.safetensors");
    let read = |name: &str| cat.read(cat.get(name).expect(name)).expect("read").to_f32_vec().expect("f32");
    Reference {
        input_ids: ids("input_ids"),
        greedy_ids: ids("greedy_ids"),
        logits: read("logits_f32"),
        decode_last: read("decode_last_logits_f32"),
    }
}

fn load(case: &str) -> Arc<dyn CausalLm> {
    load_model(&case_dir(case), Arc::new(CpuBackend::new())).expect("model loads")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn prompt_logits_match_transformers() {
    for case in CASES {
        let r = reference(case);
        let model = load(case);
        let mut state = model.new_state().expect("state");
        let got = model.forward(&r.input_ids, &mut state, LogitsWanted::All, None).expect("forward");
        let d = max_abs_diff(&got, &r.logits);
        eprintln!("{case}: max |Δlogit| = {d:.2e} over {} positions", r.input_ids.len());
        assert!(d <= TOL_ABS, "{case}: max |Δlogit| {d} > {TOL_ABS}");
    }
}

/// Feeding the prompt one token at a time through the KV cache gives the full-forward logits at
/// every position, and the last one matches transformers' cached decode.
#[test]
fn token_by_token_decode_reproduces_prompt_logits() {
    for case in CASES {
        let r = reference(case);
        let model = load(case);
        let vocab = model.info().vocab_size;
        let mut state = model.new_state().expect("state");
        for (pos, &id) in r.input_ids.iter().enumerate() {
            let step = model.forward(&[id], &mut state, LogitsWanted::Last, None).expect("decode");
            let d = max_abs_diff(&step, &r.logits[pos * vocab..(pos + 1) * vocab]);
            assert!(d <= TOL_ABS, "{case}: position {pos}: decode vs reference prompt logits differ by {d}");
        }
        assert_eq!(state.len(), r.input_ids.len());
        // transformers' prefill(T-1) + decode(1) path.
        let mut state = model.new_state().expect("state");
        let (head, last) = r.input_ids.split_at(r.input_ids.len() - 1);
        model.forward(head, &mut state, LogitsWanted::Last, None).expect("prefill");
        let got = model.forward(last, &mut state, LogitsWanted::Last, None).expect("decode");
        let d = max_abs_diff(&got, &r.decode_last);
        assert!(d <= TOL_ABS, "{case}: decode_last differs by {d}");
    }
}

/// Greedy continuation (argmax through the KV cache) equals transformers' generate(), and two
/// runs agree exactly.
#[test]
fn greedy_generation_matches_and_is_deterministic() {
    for case in CASES {
        let r = reference(case);
        let model = load(case);
        let run = || {
            let mut state = model.new_state().expect("state");
            let mut logits = model.forward(&r.input_ids, &mut state, LogitsWanted::Last, None).expect("prefill");
            let mut out = Vec::new();
            for _ in 0..r.greedy_ids.len() {
                let next = argmax(&logits);
                out.push(next);
                logits = model.forward(&[next], &mut state, LogitsWanted::Last, None).expect("decode");
            }
            out
        };
        let first = run();
        assert_eq!(first, r.greedy_ids, "{case}: greedy ids differ from transformers");
        assert_eq!(first, run(), "{case}: greedy generation is not deterministic");
    }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best }) as u32
}

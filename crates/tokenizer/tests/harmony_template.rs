//! The chat template published with openai/gpt-oss (fixtures/harmony/chat_template.jinja)
//! renders as transformers 5.17 renders it (scripts/make_harmony_renders.py), macros,
//! namespaces, `strftime_now` and all. The current date is the one thing that differs between
//! runs, so both sides have it replaced before comparing.

use std::path::{Path, PathBuf};

use ollm_tokenizer::{ChatMessage, ChatTemplate};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/harmony")
}

/// `text` with the date after "Current date: " replaced by a placeholder.
fn undated(text: &str) -> String {
    const KEY: &str = "Current date: ";
    match text.find(KEY) {
        Some(i) => {
            let start = i + KEY.len();
            let end = text[start..].find('\n').map_or(text.len(), |n| start + n);
            format!("{}DATE{}", &text[..start], &text[end..])
        }
        None => text.to_string(),
    }
}

#[test]
fn the_official_gpt_oss_template_renders_like_transformers() {
    let source = std::fs::read_to_string(dir().join("chat_template.jinja")).expect("template");
    let tmpl = ChatTemplate::new(&source, "chat_template.jinja", "<|startoftext|>".into(), "<|return|>".into())
        .expect("the template compiles");
    let renders: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("renders.json")).expect("renders.json"))
            .expect("json");
    let cases = renders["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 3);
    for case in cases {
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().expect("role"), m["content"].as_str().expect("content")))
            .collect();
        let gen_prompt = case["add_generation_prompt"].as_bool().expect("flag");
        let got = tmpl.render(&messages, gen_prompt).expect("renders");
        let want = case["rendered"].as_str().expect("rendered");
        assert!(got.contains("Current date: 20"), "strftime_now gave no date: {got}");
        assert_eq!(undated(&got), undated(want), "{}", case["name"]);
    }
    // The template refuses channel tags inside a message's content, with its own message.
    let bad = [ChatMessage::new("user", "x"), ChatMessage::new("assistant", "<|channel|>final<|message|>y")];
    let err = tmpl.render(&bad, true).expect_err("tags in content").to_string();
    assert!(err.contains("thinking"), "{err}");
}

/// The fuel budget (`TEMPLATE_FUEL`) leaves room for long conversations with the longest
/// template we ship: 2,000 messages render.
#[test]
fn a_long_conversation_renders_within_the_fuel() {
    let source = std::fs::read_to_string(dir().join("chat_template.jinja")).expect("template");
    let tmpl = ChatTemplate::new(&source, "chat_template.jinja", String::new(), String::new()).expect("compiles");
    let messages: Vec<ChatMessage> = (0..2000)
        .map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, &format!("message {i}")))
        .collect();
    let text = tmpl.render(&messages, true).expect("2,000 messages fit the fuel");
    assert!(text.contains("message 1999"));
}

//! `ollm serve` on the demo model (SmolLM2-135M) with the official `openai` Python client: forced
//! tool calls validate against the tool's parameters and reassemble when streamed, `auto`/`none`,
//! a conversation with a tool result, bad tools and schemas as 400s, logprobs, `n` choices
//! (openai_demo_test.py). Skips, saying why, when Python, `openai`/`jsonschema` or the demo
//! model is missing.

mod common;

use std::process::Command;

use common::{Server, demo_model};

#[test]
fn tools_logprobs_and_choices_work_with_the_openai_client_on_the_demo_model() {
    match Command::new("python3").args(["-c", "import openai, jsonschema"]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIPPED: the openai or jsonschema package is not installed (python3 -m pip install openai jsonschema): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED: no python3 ({e})");
            return;
        }
    }
    let Some(dir) = demo_model() else { return };
    let s = Server::start(dir, &[]);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_demo_test.py");
    let o = Command::new("python3")
        .arg(&script)
        .arg(s.base.as_str())
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .expect("python3 runs");
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "the openai demo checks failed:\n{out}\nserver log:\n{}", s.log_text());
    assert!(out.contains("openai demo checks passed"), "{out}");
}

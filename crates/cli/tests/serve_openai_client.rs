//! `ollm serve` with the official `openai` Python client (installed by .ci/run): chat, streaming,
//! stop sequences, seeds, concurrency and bad requests, against the tiny fixture on 127.0.0.1.
//! Skips, saying why, when Python or the `openai` package is missing.

mod common;

use std::process::Command;

use common::{Server, fixture};

#[test]
fn the_openai_python_client_works_against_the_server() {
    match Command::new("python3").args(["-c", "import openai"]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIPPED: the openai package is not installed (python3 -m pip install openai): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED: no python3 ({e})");
            return;
        }
    }
    let s = Server::start(
        &fixture("llama3_tied"),
        &["--api-key", "test-key", "--max-body-bytes", "65536", "--max-tokens-cap", "128"],
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client_test.py");
    let o = Command::new("python3")
        .arg(&script)
        .args([s.base.as_str(), "llama3_tied", "test-key"])
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .expect("python3 runs");
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "the openai client checks failed:\n{out}\nserver log:\n{}", s.log_text());
    assert!(out.contains("openai client checks passed"), "{out}");
}

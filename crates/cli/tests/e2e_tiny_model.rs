//! End-to-end runs of the `ollm` binary on the tiny golden models, and every kind of bad input:
//! each must exit non-zero with one `error:` line that names the problem, and never panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ollm_weights::Catalog;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden").join(case)
}

fn ollm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ollm")).args(args).output().expect("the ollm binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A copy of a golden model directory that a test may damage.
fn copy_model(case: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(case)).expect("fixture") {
        let p = entry.expect("entry").path();
        std::fs::copy(&p, dir.path().join(p.file_name().expect("name"))).expect("copy");
    }
    dir
}

/// Asserts a clean failure: non-zero exit, exactly one stderr line starting `error:` that
/// contains every `needle`, and no panic.
fn assert_fails_with(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    // `--device auto` names the device it chose on a line of its own; everything else is the error.
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("[ollm] device:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "error line lacks '{n}': {err}");
    }
}

/// `ollm logits` on the CPU.
fn logits_cmd(model: &Path, tokens_file: &Path, out: &Path) -> Output {
    let path = |p: &Path| p.to_str().expect("utf8").to_string();
    let (m, t, o) = (path(model), path(tokens_file), path(out));
    ollm(&["logits", "-m", &m, "--tokens-file", &t, "--out", &o, "--device", "cpu"])
}

fn run_greedy(model: &Path, extra: &[&str]) -> Output {
    let mut args =
        vec!["run", "--model", model.to_str().expect("utf8"), "--temperature", "0", "-n", "12", "--device", "cpu"];
    args.extend_from_slice(extra);
    ollm(&args)
}

#[test]
fn run_streams_only_text_to_stdout_and_is_deterministic() {
    let m = fixture("llama3_tied");
    let a = run_greedy(&m, &["--prompt", "Hello world"]);
    assert!(a.status.success(), "{}", stderr(&a));
    let b = run_greedy(&m, &["--prompt", "Hello world"]);
    assert_eq!(a.stdout, b.stdout, "greedy output must be reproducible");
    assert!(!a.stdout.is_empty());
    let err = stderr(&a);
    assert!(err.contains("prompt 4 tok") && err.contains("decode") && err.contains("peak RSS"), "{err}");
    assert!(!String::from_utf8_lossy(&a.stdout).contains("[ollm]"), "stats leaked into stdout");
}

#[test]
fn sampling_with_a_seed_is_reproducible_and_seeds_differ() {
    let m = fixture("headdim_untied");
    let go = |seed: &str| {
        let o = ollm(&[
            "run",
            "-m",
            m.to_str().expect("utf8"),
            "-p",
            "abc",
            "-n",
            "24",
            "--temperature",
            "1.5",
            "--seed",
            seed,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        o.stdout
    };
    assert_eq!(go("5"), go("5"));
    assert_ne!(go("5"), go("6"));
}

#[test]
fn prompt_from_file_and_stdin_and_chat() {
    let m = fixture("llama3_tied");
    let dir = tempfile::tempdir().expect("tempdir");
    let pf = dir.path().join("p.txt");
    std::fs::write(&pf, "Hello world").expect("write");
    let from_file = run_greedy(&m, &["--prompt-file", pf.to_str().expect("utf8")]);
    let from_arg = run_greedy(&m, &["--prompt", "Hello world"]);
    assert_eq!(from_file.stdout, from_arg.stdout);

    let mut child = Command::new(env!("CARGO_BIN_EXE_ollm"))
        .args(["run", "-m", m.to_str().expect("utf8"), "--temperature", "0", "-n", "12"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    use std::io::Write;
    child.stdin.take().expect("stdin").write_all(b"Hello world").expect("write stdin");
    let from_stdin = child.wait_with_output().expect("wait");
    assert_eq!(from_stdin.stdout, from_arg.stdout);

    let chat = run_greedy(&m, &["--chat", "--prompt", "  Hello there!  "]);
    assert!(chat.status.success(), "{}", stderr(&chat));
    // The rendered chat prompt has 51 tokens (recorded by the fixture script).
    assert!(stderr(&chat).contains("prompt 51 tok"), "{}", stderr(&chat));
}

#[test]
fn stop_strings_end_generation_without_being_printed() {
    let m = fixture("llama3_tied");
    let model = m.to_str().expect("utf8");
    let go = |extra: &[&str]| {
        let mut args = vec!["run", "-m", model, "-p", "Once upon a time", "--temperature", "0", "-n", "40"];
        args.extend_from_slice(extra);
        ollm(&args)
    };
    let full = go(&[]);
    let text = String::from_utf8_lossy(&full.stdout).into_owned();
    // Stop at a piece of the greedy output itself.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 8, "{text:?}");
    let stop: String = chars[3..5].iter().collect();
    let cut = go(&["--stop", &stop]);
    let cut_text = String::from_utf8_lossy(&cut.stdout).into_owned();
    let expect = &text[..text.find(&stop).expect("stop occurs")];
    assert_eq!(cut_text.trim_end_matches('\n'), expect, "stop {stop:?}");
    assert!(stderr(&cut).contains("finish stop"), "{}", stderr(&cut));
}

#[test]
fn logits_command_writes_npy_matching_the_reference() {
    let m = fixture("headdim_untied");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("reference.json")).expect("json")).expect("parse");
    let ids: Vec<String> = meta["input_ids"].as_array().expect("ids").iter().map(|v| v.to_string()).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let tf = dir.path().join("ids.txt");
    std::fs::write(&tf, ids.join(", ")).expect("write");
    let out = dir.path().join("l.npy");
    let o = logits_cmd(&m, &tf, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).expect("npy");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = String::from_utf8_lossy(&bytes[10..10 + hlen]);
    assert!(header.contains(&format!("'shape': ({}, 320)", ids.len())), "{header}");
    let got: Vec<f32> =
        bytes[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect();
    let cat = Catalog::open_files(&[m.join("reference.safetensors")]).expect("reference");
    let want = cat.read(cat.get("logits_f32").expect("logits")).expect("read").to_f32_vec().expect("f32");
    let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(d < 1e-4, "max |Δ| {d}");
}

#[test]
fn perplexity_is_finite_and_bounded_by_vocab() {
    let m = fixture("llama3_tied");
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("t.txt");
    std::fs::write(&f, "The quick brown fox jumps over the lazy dog. ".repeat(8)).expect("write");
    let o =
        ollm(&["perplexity", "-m", m.to_str().expect("utf8"), "--file", f.to_str().expect("utf8"), "--context", "64"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ppl: f64 = String::from_utf8_lossy(&o.stdout).trim().parse().expect("a number on stdout");
    // A random model is near-uniform: perplexity is finite, above 1 and in the vocab's range.
    assert!(ppl > 1.0 && ppl < 2.0 * 320.0, "{ppl}");
}

// ---- bad input -------------------------------------------------------------------------

#[test]
fn missing_model_directory() {
    assert_fails_with(
        &run_greedy(Path::new("/nonexistent/model"), &["-p", "hi"]),
        &["/nonexistent/model", "does not exist"],
    );
}

#[test]
fn missing_weights_and_missing_tokenizer() {
    let d = copy_model("llama3_tied");
    std::fs::remove_file(d.path().join("model.safetensors")).expect("rm");
    assert_fails_with(&run_greedy(d.path(), &["-p", "hi"]), &["model.safetensors"]);
    let d = copy_model("llama3_tied");
    std::fs::remove_file(d.path().join("tokenizer.json")).expect("rm");
    assert_fails_with(&run_greedy(d.path(), &["-p", "hi"]), &["tokenizer.json", "not found"]);
}

#[test]
fn truncated_safetensors() {
    let d = copy_model("llama3_tied");
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).expect("read");
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).expect("truncate");
    assert_fails_with(&run_greedy(d.path(), &["-p", "hi"]), &["model.safetensors", "truncated"]);
}

#[test]
fn corrupt_safetensors_header() {
    let d = copy_model("llama3_tied");
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).expect("read");
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&p, &bytes).expect("write");
    assert_fails_with(&run_greedy(d.path(), &["-p", "hi"]), &["model.safetensors", "header"]);
    std::fs::write(&p, b"abc").expect("write");
    assert_fails_with(&run_greedy(d.path(), &["-p", "hi"]), &["model.safetensors"]);
}

/// Rewrites the header of a safetensors file through `edit`, keeping the data section.
fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(path).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).expect("json");
    edit(&mut header);
    let text = serde_json::to_vec(&header).expect("json");
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).expect("write");
}

#[test]
fn header_that_lies_about_offsets() {
    let d = copy_model("llama3_tied");
    let p = d.path().join("model.safetensors");
    // Point a tensor past the end of the file (shape and size still agree).
    edit_header(&p, |h| {
        let t = h["model.norm.weight"].as_object_mut().expect("tensor");
        t.insert("data_offsets".into(), serde_json::json!([10_000_000, 10_000_128]));
    });
    assert_fails_with(&run_greedy(d.path(), &["-p", "hi"]), &["model.safetensors", "model.norm.weight"]);
    // Offsets that do not hold the declared shape.
    let d = copy_model("llama3_tied");
    let p = d.path().join("model.safetensors");
    edit_header(&p, |h| {
        let t = h["model.norm.weight"].as_object_mut().expect("tensor");
        t.insert("shape".into(), serde_json::json!([65]));
    });
    assert_fails_with(&run_greedy(d.path(), &["-p", "hi"]), &["model.norm.weight", "do not hold shape"]);
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).expect("json")).expect("write");
}

#[test]
fn unsupported_architecture_and_rope_type() {
    let d = copy_model("llama3_tied");
    edit_config(d.path(), |v| v["architectures"] = serde_json::json!(["MambaForCausalLM"]));
    assert_fails_with(&run_greedy(d.path(), &["-p", "hi"]), &["config.json", "MambaForCausalLM", "LlamaForCausalLM"]);
    let d = copy_model("llama3_tied");
    edit_config(d.path(), |v| v["rope_scaling"]["rope_type"] = serde_json::json!("longrope"));
    assert_fails_with(&run_greedy(d.path(), &["-p", "hi"]), &["config.json", "rope_scaling.rope_type", "longrope"]);
}

#[test]
fn tensor_with_the_wrong_shape() {
    let d = copy_model("llama3_tied");
    edit_config(d.path(), |v| v["intermediate_size"] = serde_json::json!(96));
    assert_fails_with(&run_greedy(d.path(), &["-p", "hi"]), &["mlp.gate_proj.weight", "[128, 64]", "[96, 64]"]);
}

#[test]
fn bad_config_json() {
    let d = copy_model("llama3_tied");
    std::fs::write(d.path().join("config.json"), "{ not json").expect("write");
    assert_fails_with(&run_greedy(d.path(), &["-p", "hi"]), &["config.json", "invalid JSON"]);
    let d = copy_model("llama3_tied");
    edit_config(d.path(), |v| v["hidden_size"] = serde_json::json!("wide"));
    assert_fails_with(&run_greedy(d.path(), &["-p", "hi"]), &["config.json", "hidden_size"]);
}

#[test]
fn prompt_longer_than_the_context() {
    let long = "word ".repeat(400);
    assert_fails_with(&run_greedy(&fixture("llama3_tied"), &["-p", &long]), &["context is 256", "shorten the prompt"]);
}

#[test]
fn empty_prompt_and_no_prompt() {
    assert_fails_with(&run_greedy(&fixture("llama3_tied"), &["-p", "   "]), &["prompt is empty"]);
    let o = Command::new(env!("CARGO_BIN_EXE_ollm"))
        .args(["run", "-m", fixture("llama3_tied").to_str().expect("utf8")])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("runs");
    assert_fails_with(&o, &["prompt is empty"]);
}

#[test]
fn bad_tokens_file_and_bad_sampling_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tf = dir.path().join("ids.txt");
    std::fs::write(&tf, "1 2 banana").expect("write");
    let m = fixture("llama3_tied");
    let o = logits_cmd(&m, &tf, &dir.path().join("x.npy"));
    assert_fails_with(&o, &["ids.txt", "entry 3", "banana"]);
    std::fs::write(&tf, "1 2 999").expect("write");
    let o = logits_cmd(&m, &tf, &dir.path().join("x.npy"));
    assert_fails_with(&o, &["999", "vocabulary of 320"]);
    assert_fails_with(&run_greedy(&m, &["-p", "hi", "--top-p", "2"]), &["top_p"]);
}

/// A clap usage error: exit 2, the first line names the flag and the value, no panic.
fn assert_usage_error(o: &Output, flag: &str, value: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let first = err.lines().next().unwrap_or_default();
    assert!(first.starts_with("error: ") && first.contains(flag) && first.contains(value), "{err}");
}

#[test]
fn bad_vram_budget_and_device_values() {
    let m = fixture("llama3_tied");
    let m = m.to_str().expect("utf8");
    for bad in ["8XB", "-1G", "0", "lots"] {
        let o = ollm(&["run", "-m", m, "-p", "Hi", &format!("--vram-budget={bad}")]);
        assert_usage_error(&o, "--vram-budget", bad);
    }
    for bad in ["gpu", "cuda:x", "cuda:"] {
        let o = ollm(&["run", "-m", m, "-p", "Hi", "--device", bad]);
        assert_usage_error(&o, "--device", bad);
    }
    // A device that does not exist (or no driver at all): one line naming the flag.
    let o = ollm(&["run", "-m", m, "-p", "Hi", "--device", "cuda:97", "--vram-budget", "7.5GiB"]);
    assert_fails_with(&o, &["--device cuda:97"]);
    // The budget is a GPU setting: on the CPU it is accepted and ignored.
    let o = run_greedy(&fixture("llama3_tied"), &["--prompt", "Hello", "--vram-budget", "512M"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("peak VRAM"), "no VRAM figure on the CPU");
}

/// `ollm bench ops` needs a GPU: without one it fails with one line saying so; with one it
/// prints the table (small attention sizes and one run, to stay quick).
#[test]
fn bench_ops_without_a_gpu_is_one_line() {
    let o = ollm(&["bench", "ops", "--runs", "1", "--attn-tokens", "256", "--max-row-seconds", "5"]);
    if o.status.success() {
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("decode matmul") && out.contains("of bound"), "{out}");
    } else {
        assert_fails_with(&o, &["ollm bench ops needs a CUDA GPU"]);
    }
}

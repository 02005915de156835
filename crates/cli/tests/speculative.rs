//! `--speculate` through the binary on synthesised models (random weights, the real Llama-3
//! tokenizer's shape): greedy text equals plain greedy text with n-gram drafts and with a draft
//! model, the stats line carries tokens per target pass, a draft with another tokenizer is refused
//! in one line, `ollm plan` counts the draft model, and `ollm bench --speculate` compares both
//! decoders window by window on a document.

use std::path::Path;
use std::process::{Command, Output};

use ollm_models::synth::{Like, plan_llama, plan_qwen3_next, write_plan};

fn ollm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ollm")).args(args).output().expect("the ollm binary runs")
}

/// Llama-3.2-1B's config shrunk to `layers` layers of width 64, with a head of its own.
fn tiny_llama(dir: &Path, layers: usize, seed: u64) {
    let mut config = Like::Llama32_1B.config();
    for (k, v) in [("hidden_size", 64), ("intermediate_size", 96), ("num_attention_heads", 4), ("head_dim", 16)] {
        config[k] = v.into();
    }
    config["num_key_value_heads"] = 2.into();
    config["tie_word_embeddings"] = false.into();
    write_plan(&plan_llama(config, Some(layers)).expect("plan"), dir, seed, &mut |_, _| {}).expect("write");
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn speculative_runs_print_plain_greedy_text_and_their_pass_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (target, draft, other) = (dir.path().join("t"), dir.path().join("d"), dir.path().join("q"));
    tiny_llama(&target, 3, 1);
    tiny_llama(&draft, 1, 1);
    let (m, d) = (target.to_str().expect("utf8"), draft.to_str().expect("utf8"));
    let prompt = "the cat sat on the mat, the cat sat on the mat, the cat sat on the";
    let run = |extra: &[&str]| {
        let mut args =
            vec!["run", "--model", m, "--device", "cpu", "--temperature", "0", "-n", "24", "--prompt", prompt];
        args.extend_from_slice(extra);
        ollm(&args)
    };
    let plain = run(&[]);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let draft_arg = format!("draft:{d}");
    for extra in [
        &["--speculate", "ngram"][..],
        &["--speculate", "ngram", "--draft-tokens", "3"],
        &["--speculate", &draft_arg, "--draft-tokens", "4"],
    ] {
        let o = run(extra);
        let err = stderr(&o);
        assert!(o.status.success(), "{extra:?}: {err}");
        assert_eq!(o.stdout, plain.stdout, "{extra:?}: speculative text differs from plain greedy text");
        assert!(err.contains("tokens per target pass") && err.contains("drafts kept"), "{extra:?}: {err}");
    }
    // --stats: a line per token, with the passes so far.
    let o = run(&["--speculate", "ngram", "--stats"]);
    let err = stderr(&o);
    assert!(err.lines().filter(|l| l.starts_with("[ollm] token ")).all(|l| l.contains("target passes")), "{err}");

    // A draft with another tokenizer (Qwen's) is refused in one line.
    let mut config = Like::Qwen3Next80B.config();
    for (k, v) in [
        ("hidden_size", 64),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 2),
        ("head_dim", 32),
        ("linear_num_key_heads", 2),
        ("linear_num_value_heads", 4),
        ("linear_key_head_dim", 16),
        ("linear_value_head_dim", 16),
        ("num_experts", 8),
        ("num_experts_per_tok", 2),
        ("moe_intermediate_size", 32),
        ("shared_expert_intermediate_size", 32),
    ] {
        config[k] = v.into();
    }
    write_plan(&plan_qwen3_next(config, Some(4)).expect("plan"), &other, 1, &mut |_, _| {}).expect("write");
    let o = run(&["--speculate", &format!("draft:{}", other.display())]);
    let err = stderr(&o);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("vocabulary differs") && err.contains("tokenizer"), "{err}");
    let o = run(&["--draft-tokens", "4"]);
    assert!(!o.status.success() && stderr(&o).contains("--speculate"), "{}", stderr(&o));

    // The planner counts the draft model.
    let home = dir.path().join("home");
    let plan = |extra: &[&str]| {
        let mut args =
            vec!["plan", "--model", m, "--device", "cpu", "--offload-layers-to-cpu", "3", "--ram-budget", "0"];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_ollm")).args(&args).env("OLLM_HOME", &home).output().expect("runs")
    };
    let o = plan(&["--speculate", &draft_arg]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(text.contains("draft ") && text.contains("taken off the VRAM budget"), "{text}");

    // The bench: speculative and plain in the same run, window by window, on a document.
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/speculative/question.txt");
    let o = ollm(&[
        "bench",
        "--model",
        m,
        "--device",
        "cpu",
        "--speculate",
        "ngram",
        "--prompt-file",
        doc.to_str().expect("utf8"),
        "--tokens",
        "12",
        "--repeats",
        "2",
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    let windows: Vec<&str> = text.lines().filter(|l| l.starts_with("window ")).collect();
    assert_eq!(windows.len(), 2, "{text}");
    assert!(windows.iter().all(|l| l.contains("tokens per target pass") && l.contains("same as plain: yes")), "{text}");
}

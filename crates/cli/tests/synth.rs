//! `ollm synth`: a random-weight model in a real model's shapes must load and run like any model
//! directory (config, tokenizer, chat template, sharded weights), and bad arguments must fail
//! cleanly without touching existing files.

use std::path::Path;
use std::process::{Command, Output};

use ollm_models::synth::{Like, SynthPlan, plan_llama, write_plan};
use ollm_weights::Catalog;

fn ollm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ollm")).args(args).output().expect("the ollm binary runs")
}

/// Llama-3.2-1B's config shrunk to 2 layers of width 64 (the vocabulary stays real: 128256).
fn tiny_plan() -> SynthPlan {
    tiny_plan_layers(2)
}

fn tiny_plan_layers(layers: usize) -> SynthPlan {
    let mut config = Like::Llama32_1B.config();
    for (k, v) in [("hidden_size", 64), ("intermediate_size", 96), ("num_attention_heads", 4), ("head_dim", 16)] {
        config[k] = v.into();
    }
    config["num_key_value_heads"] = 2.into();
    plan_llama(config, Some(layers)).expect("plan")
}

#[test]
fn a_synthesised_model_loads_tokenizes_and_generates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("tiny");
    let plan = tiny_plan();
    let mut last = (0, 0);
    write_plan(&plan, &out, 1, &mut |d, t| last = (d, t)).expect("write");
    assert_eq!(last.0, last.1);
    assert_eq!(last.1, plan.total_bytes());
    let cat = Catalog::open_dir(&out).expect("catalog");
    assert_eq!(cat.total_bytes(), plan.total_bytes());
    assert!(cat.contains("model.layers.1.mlp.down_proj.weight"));
    // No staging directory is left beside the output.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
    assert_eq!(leftovers.len(), 1);

    let m = out.to_str().expect("utf8");
    let run = ollm(&["run", "--model", m, "--device", "cpu", "--temperature", "0", "-n", "5", "--prompt", "Hello"]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("5 tok generated") || err.contains("finish stop"), "{err}");
    let chat = ollm(&["run", "--model", m, "--device", "cpu", "--chat", "-n", "3", "--prompt", "Hi there"]);
    let err = String::from_utf8_lossy(&chat.stderr);
    assert!(chat.status.success(), "{err}");
    // The chat template put the Llama-3 header tokens around the prompt: a byte-level tokenizer
    // would give "Hi there" 8 tokens; the template adds bos, two headers and eot.
    let prompt_tokens: usize = err
        .split("prompt ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("stats line names the prompt length");
    assert!(prompt_tokens > 8 + 4, "{err}");
}

#[test]
fn bad_synth_arguments_fail_cleanly() {
    let o = ollm(&["synth", "--like", "llama-9b", "--out", "/nonexistent/x"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("llama-3.1-8b") && err.contains("--like"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let keep = dir.path().join("notes.txt");
    std::fs::write(&keep, "mine").expect("write");
    let o = ollm(&["synth", "--like", "llama-3.2-1b", "--layers", "1", "--out", dir.path().to_str().expect("utf8")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("not an empty directory"), "{err}");
    assert_eq!(std::fs::read_to_string(&keep).expect("kept"), "mine");
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1, "nothing added");
    assert!(!Path::new("/nonexistent/x").exists());
}

#[test]
fn streamed_runs_match_resident_runs_and_plans_explain_themselves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("tiny4");
    write_plan(&tiny_plan_layers(4), &out, 2, &mut |_, _| {}).expect("write");
    let m = out.to_str().expect("utf8");
    let home = dir.path().join("home");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--model", m, "--device", "cpu", "--temperature", "0", "-n", "6", "--prompt", "abc"];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_ollm")).args(&args).env("OLLM_HOME", &home).output().expect("runs")
    };
    let resident = run(&[]);
    assert!(resident.status.success(), "{}", String::from_utf8_lossy(&resident.stderr));
    // All four layers off the "device": two from pinned RAM, two from disk.
    for extra in [&["--offload-layers-to-cpu", "4", "--ram-budget", "0"][..], &["--offload-layers-to-cpu", "3"][..]] {
        let streamed = run(extra);
        let err = String::from_utf8_lossy(&streamed.stderr);
        assert!(streamed.status.success(), "{extra:?}: {err}");
        assert_eq!(streamed.stdout, resident.stdout, "{extra:?}: streamed text differs");
        assert!(err.contains("[ollm] streaming:") && err.contains("layers passed through 2 slots"), "{err}");
    }

    // The KV cache off the device (every full block spilled, here none is full) with streamed
    // layers: the same text, and nothing left in the spill directory.
    let kv_dir = dir.path().join("kv");
    let kv_dir_arg = kv_dir.to_str().expect("utf8");
    let o = run(&["--kv-offload", "--ram-budget", "0", "--offload-layers-to-cpu", "3", "--kv-cache-dir", kv_dir_arg]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("KV cache off the device"), "{err}");
    assert_eq!(o.stdout, resident.stdout, "offloaded KV changed the text");
    assert_eq!(std::fs::read_dir(&kv_dir).expect("kv dir").count(), 0, "spill files are removed");

    // --stats: one line per generated token with the streamed bytes.
    let o = run(&["--offload-layers-to-cpu", "4", "--ram-budget", "0", "--stats"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.stdout, resident.stdout);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("[ollm] token ")).collect();
    assert_eq!(lines.len(), 6, "{err}");
    assert!(lines.iter().all(|l| l.contains("disk ") && l.contains("waited")), "{err}");

    // An impossible budget fails before loading, naming the budget that would fit.
    let o = Command::new(env!("CARGO_BIN_EXE_ollm"))
        .args(["plan", "--model", m, "--device", "cpu", "--vram-budget", "1MiB"])
        .env("OLLM_HOME", &home)
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error:") && lines[0].contains("raise --vram-budget to"), "{err}");

    // A plan that fits prints the placement and a prediction from measured bandwidths.
    let o = Command::new(env!("CARGO_BIN_EXE_ollm"))
        .args(["plan", "--model", m, "--device", "cpu", "--offload-layers-to-cpu", "4", "--ram-budget", "0"])
        .env("OLLM_HOME", &home)
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("0 layers in RAM, 0 in pinned RAM, 4 read from disk"), "{text}");
    assert!(text.contains("per token") && text.contains("disk"), "{text}");
    assert!(home.join("calibration.json").exists(), "calibration is cached");

    // On the CPU, --ram-budget alone bounds the decoder layers kept in RAM: none fit in 0 bytes,
    // so all four are read from disk every pass, with the resident text.
    let o = Command::new(env!("CARGO_BIN_EXE_ollm"))
        .args(["plan", "--model", m, "--device", "cpu", "--ram-budget", "0"])
        .env("OLLM_HOME", &home)
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("0 layers in RAM, 0 in pinned RAM, 4 read from disk"), "{text}");
    let o = run(&["--ram-budget", "0", "--stats"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(o.stdout, resident.stdout, "layers streamed on the CPU changed the text");
    assert!(err.lines().any(|l| l.starts_with("[ollm] token ") && l.contains("disk ")), "{err}");

    // The streaming bench: a row per window against the bound measured after it.
    let o = Command::new(env!("CARGO_BIN_EXE_ollm"))
        .args(["bench", "--model", m, "--device", "cpu", "--offload-layers-to-cpu", "4", "--ram-budget", "0"])
        .args(["--prompt-tokens", "3", "--tokens", "2", "--repeats", "2"])
        .env("OLLM_HOME", &home)
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<&str> = text.lines().filter(|l| l.trim_start().starts_with(['1', '2']) && l.ends_with('×')).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(text.contains("disk 4 layers") || text.contains("over 4 layers"), "{text}");
    assert!(text.contains("prefill         3 tokens"), "{text}");
}

#[test]
fn a_prompt_sharing_a_stored_prefix_loads_it_and_answers_like_a_cold_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("tiny4");
    write_plan(&tiny_plan_layers(4), &out, 2, &mut |_, _| {}).expect("write");
    let m = out.to_str().expect("utf8");
    let home = dir.path().join("home");
    let cache = dir.path().join("prefix");
    let cache_arg = cache.to_str().expect("utf8");
    // A document of a few hundred tokens, then a question.
    let doc: String = (0..160).map(|i| format!("clause {i} binds party {} to term {}. ", i % 7, i * 13 % 50)).collect();
    let run = |question: &str, extra: &[&str]| {
        let prompt = format!("{doc}Question: {question}");
        let mut args =
            vec!["run", "--model", m, "--device", "cpu", "--temperature", "0", "-n", "5", "--prompt", &prompt];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_ollm")).args(&args).env("OLLM_HOME", &home).output().expect("runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (_, err) = run("who pays?", &["--prefix-cache", cache_arg]);
    let summary = err.lines().find(|l| l.starts_with("[ollm] prefix cache:")).unwrap_or_else(|| panic!("{err}"));
    assert!(
        summary.contains(" loaded 0 of ") && summary.contains("stored ") && !summary.contains("stored 0 new"),
        "{err}"
    );

    let (cold, _) = run("when does it end?", &[]);
    let (warm, err) = run("when does it end?", &["--prefix-cache", cache_arg]);
    let summary = err.lines().find(|l| l.starts_with("[ollm] prefix cache:")).unwrap_or_else(|| panic!("{err}"));
    let loaded: usize = summary
        .split(" loaded ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    assert!(loaded >= 512, "the document's blocks are loaded: {summary}");
    assert_eq!(warm, cold, "the reused prefix changed the answer");

    // A corrupted entry is reported in one line and recomputed; the answer stays the same.
    let model_dir = std::fs::read_dir(&cache).expect("cache").flatten().next().expect("model dir").path();
    let entry = std::fs::read_dir(&model_dir)
        .expect("entries")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("000001-")))
        .expect("entry 1");
    let mut bytes = std::fs::read(&entry).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&entry, bytes).expect("write");
    let (again, err) = run("when does it end?", &["--prefix-cache", cache_arg]);
    assert_eq!(again, cold);
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: prefix cache:")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains("000001-") && warnings[0].contains("recomputed"), "{err}");
    assert!(err.contains(" loaded 256 of "), "block 0 is still used: {err}");
}

/// GPT-OSS-20B's config shrunk to width 64 (experts 8, top-2; the o200k vocabulary stays).
fn tiny_gpt_oss() -> SynthPlan {
    let mut config = Like::GptOss20B.config();
    for (k, v) in [
        ("hidden_size", 64),
        ("intermediate_size", 64),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 2),
        ("head_dim", 16),
        ("num_local_experts", 8),
        ("num_experts_per_tok", 2),
        ("experts_per_token", 2),
        ("sliding_window", 4),
    ] {
        config[k] = v.into();
    }
    ollm_models::synth::plan_gpt_oss(config, Some(2)).expect("plan")
}

/// A GPT-OSS-shaped model runs through `ollm run`: the harmony chat format wraps the prompt,
/// generation stops at <|return|> or the token limit, `--stats` reports the expert cache, and
/// experts through 3 device slots (pinned RAM or disk) give the text of all-resident experts.
#[test]
fn a_gpt_oss_model_runs_with_the_harmony_format_and_cached_experts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("oss");
    write_plan(&tiny_gpt_oss(), &out, 3, &mut |_, _| {}).expect("write");
    let m = out.to_str().expect("utf8");
    let home = dir.path().join("home");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--model", m, "--device", "cpu", "--temperature", "0", "-n", "6"];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_ollm")).args(&args).env("OLLM_HOME", &home).output().expect("runs")
    };
    let chat = run(&["--chat", "--prompt", "Hi"]);
    let err = String::from_utf8_lossy(&chat.stderr);
    assert!(chat.status.success(), "{err}");
    // "Hi" is 2 byte tokens; the harmony system header and the user/assistant framing add more.
    let prompt_tokens: usize = err
        .split("prompt ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("stats line names the prompt length");
    assert!(prompt_tokens > 100, "{err}");
    assert!(err.contains("[ollm] experts: 16 slots for 16 experts"), "{err}");
    // With the real o200k_harmony tokenizer (built from OpenAI's vocabulary when
    // OLLM_O200K_BASE names it, as in CI) the same chat runs; BPE makes the prompt shorter.
    if let Some(base) = std::env::var_os("OLLM_O200K_BASE") {
        let byte_level = std::fs::read(out.join("tokenizer.json")).expect("tokenizer.json");
        let text = std::fs::read_to_string(&base).expect("o200k_base.tiktoken");
        let json = ollm_models::synth::harmony_tokenizer_from_tiktoken(&text, "o200k_base").expect("o200k_harmony");
        std::fs::write(out.join("tokenizer.json"), json.to_string()).expect("write");
        let real = run(&["--chat", "--prompt", "Hi"]);
        let err = String::from_utf8_lossy(&real.stderr);
        assert!(real.status.success(), "{err}");
        let n: usize =
            err.split("prompt ").nth(1).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok()).expect("n");
        assert!(
            (20..prompt_tokens / 2).contains(&n),
            "o200k_harmony prompt of {n} tokens (byte-level {prompt_tokens}): {err}"
        );
        std::fs::write(out.join("tokenizer.json"), byte_level).expect("restore");
    }

    let resident = run(&["--prompt", "abcdef"]);
    assert!(resident.status.success(), "{}", String::from_utf8_lossy(&resident.stderr));
    for extra in [&["--expert-slots", "3"][..], &["--expert-slots", "3", "--ram-budget", "0"][..]] {
        let mut args = vec!["--prompt", "abcdef"];
        args.extend_from_slice(extra);
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{extra:?}: {err}");
        assert_eq!(o.stdout, resident.stdout, "{extra:?}: cached experts change the text");
        assert!(err.contains("experts through 3 device slots"), "{err}");
        let from = if extra.len() > 2 { "read from disk" } else { "copied from pinned RAM" };
        let line = err.lines().find(|l| l.starts_with("[ollm] experts:")).expect("experts line");
        assert!(line.contains("3 slots for 16 experts") && !line.contains(&format!(" 0 {from}")), "{line}");
    }
}

/// A Qwen3-Next-shaped model (`synth --like qwen3-next-80b`, shrunk: 4 layers = 3 Gated
/// DeltaNet + 1 gated attention, 8 experts top 2) runs through `ollm run --chat` on the CPU with
/// the ChatML template: the prompt has the template's length and the generation runs to its
/// token limit.
#[test]
fn a_qwen3_next_model_runs_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("qwen");
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
        ("max_position_embeddings", 4096),
    ] {
        config[k] = v.into();
    }
    let plan = ollm_models::synth::plan_qwen3_next(config, Some(4)).expect("plan");
    write_plan(&plan, &out, 4, &mut |_, _| {}).expect("write");
    let m = out.to_str().expect("utf8");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--model", m, "--device", "cpu", "--temperature", "0", "-n", "8"];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_ollm"))
            .args(&args)
            .env("OLLM_HOME", dir.path().join("home"))
            .output()
            .expect("runs")
    };
    let chat = run(&["--chat", "--prompt", "Hello"]);
    let err = String::from_utf8_lossy(&chat.stderr);
    assert!(chat.status.success(), "{err}");
    // "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n": 3 specials + 21 bytes.
    assert!(err.contains("prompt 24 tok"), "{err}");
    assert!(err.contains("8 tok generated"), "{err}");
}

/// `ollm plan` sizes the batch: without `--max-batch` it plans one sequence and names the
/// largest batch whose KV caches fit the budgets (Llama-3.1-8B, 8 GiB of VRAM, 64 GiB of RAM,
/// 8K positions: some 2 GiB of f32 KV per sequence on the CPU backend, so between 2 and 63;
/// 512 positions: the limit, 64); with `--max-batch 16` it plans 16 caches and a step of 16
/// tokens.
#[test]
fn plan_sizes_the_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("l8");
    let m = model.to_str().expect("utf8");
    let home = dir.path().join("home");
    let synth = ollm(&["synth", "--like", "llama-3.1-8b", "--out", m, "--headers-only"]);
    assert!(synth.status.success(), "{}", String::from_utf8_lossy(&synth.stderr));
    let plan = |extra: &[&str]| {
        let mut args = vec!["plan", "--model", m, "--device", "cpu", "--vram-budget", "8GiB", "--ram-budget", "64GiB"];
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_ollm")).args(&args).env("OLLM_HOME", &home).output().expect("runs");
        assert!(o.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let fit = |text: &str| -> usize {
        let line = text.lines().find(|l| l.starts_with("max batch")).unwrap_or_else(|| panic!("{text}"));
        line.split_whitespace().nth(2).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    };
    let one = plan(&[]);
    let n = fit(&one);
    assert!((2..64).contains(&n), "{one}");
    assert!(one.contains("sequences of 8192 positions fit") && one.contains("per token"), "{one}");
    assert_eq!(fit(&plan(&["--context", "512"])), 64);

    let sixteen = plan(&["--max-batch", "16"]);
    assert!(sixteen.contains("batch        16 sequences decoded together"), "{sixteen}");
    assert!(sixteen.contains("per step") && sixteen.contains("for 16 tokens"), "{sixteen}");
    assert!(!sixteen.contains("max batch"), "{sixteen}");
    // 16 caches of 8K do not fit beside the weights in 8 GiB: they live off the device.
    assert!(sixteen.contains("KV cache off the device"), "{sixteen}");
}

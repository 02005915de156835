//! Absurd config values of the Qwen2, Qwen3 and Gemma 3 families (and of a
//! Gemma3ForConditionalGeneration's nested `text_config`) are refused at load with a one-line
//! error naming the field as the file spells it; the largest context accepted (2^24 positions)
//! loads and runs without sizing anything by it (RoPE tables and KV caches grow with use).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ollm_models::{LogitsWanted, load_model};
use ollm_ops::cpu::CpuBackend;
use serde_json::{Value, json};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden").join(case)
}

/// A copy of `case` whose config has `edit` applied (in `text_config` when `nested`).
fn edited(case: &str, nested: bool, edit: &dyn Fn(&mut Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(fixture(case).join("model.safetensors"), tmp.path().join("model.safetensors")).expect("copy");
    let mut c: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(case).join("config.json")).expect("read")).expect("json");
    edit(if nested { &mut c["text_config"] } else { &mut c });
    std::fs::write(tmp.path().join("config.json"), c.to_string()).expect("write");
    tmp
}

fn set(key: &'static str, v: Value) -> impl Fn(&mut Value) {
    move |c: &mut Value| {
        let mut at = c;
        let mut parts = key.split('.').peekable();
        while let Some(p) = parts.next() {
            if parts.peek().is_none() {
                at[p] = v.clone();
                return;
            }
            at = &mut at[p];
        }
    }
}

#[test]
fn absurd_values_are_refused_naming_the_field() {
    let cases: [(&str, bool, &str); 5] = [
        ("qwen2_biased", false, ""),
        ("qwen3_qknorm", false, ""),
        ("gemma3_v5", false, ""),
        ("gemma3_hub", false, ""),
        ("gemma3_mm", true, "text_config."),
    ];
    for (case, nested, section) in cases {
        let mut edits: Vec<(&str, Value)> = vec![
            ("max_position_embeddings", json!(1u64 << 62)),
            ("max_position_embeddings", json!(0)),
            ("rms_norm_eps", json!(-1e-6)),
            ("hidden_size", json!(1u64 << 40)),
            ("num_hidden_layers", json!(-3)),
        ];
        match case {
            "gemma3_v5" => edits.push(("rope_parameters.full_attention.rope_theta", json!(0.0))),
            "gemma3_hub" => {
                edits.push(("rope_theta", json!(-1.0)));
                edits.push(("rope_local_base_freq", json!(0)));
            }
            "gemma3_mm" => {
                edits.push(("rope_theta", json!(-1.0)));
                edits.push(("rope_local_base_freq", json!(0)));
                edits.push(("rope_scaling.factor", json!(0)));
                edits.push(("query_pre_attn_scalar", json!(-256)));
            }
            _ => edits.push(("rope_parameters.rope_theta", json!(0))),
        }
        for (key, v) in edits {
            let dir = edited(case, nested, &set(key, v.clone()));
            let e = match load_model(dir.path(), Arc::new(CpuBackend::new())) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{case}: {key} = {v} loads"),
            };
            let field = format!("'{section}{key}'");
            assert!(e.contains(&field) && !e.contains('\n'), "{case} {key}={v}: {e}");
        }
    }
    // A multimodal config without its text section says which section is missing.
    let dir = edited("gemma3_mm", false, &|c: &mut Value| {
        c.as_object_mut().map(|m| m.remove("text_config"));
    });
    let e = load_model(dir.path(), Arc::new(CpuBackend::new())).expect_err("no text_config").to_string();
    assert!(e.contains("'text_config'") && e.contains("missing"), "{e}");
}

/// 2^24 positions (the most accepted) costs nothing until used: loading and a short forward
/// take well under a second's worth of a 2^24-position table (which would be ≥ 0.5 GiB of RoPE
/// angles for these head sizes, and seconds to fill).
#[test]
fn the_largest_context_is_not_allocated_up_front() {
    for (case, nested) in [("qwen2_biased", false), ("qwen3_qknorm", false), ("gemma3_v5", false), ("gemma3_mm", true)]
    {
        let dir = edited(case, nested, &set("max_position_embeddings", json!(1u64 << 24)));
        let t = Instant::now();
        let m = load_model(dir.path(), Arc::new(CpuBackend::new())).expect("loads");
        assert_eq!(m.info().max_positions, 1 << 24, "{case}");
        let mut st = m.new_state().expect("state");
        let logits = m.forward(&[2, 3, 4, 5], &mut st, LogitsWanted::Last, None).expect("forward");
        assert!(logits.iter().all(|x| x.is_finite()), "{case}");
        let secs = t.elapsed().as_secs_f64();
        assert!(secs < 5.0, "{case}: load + forward took {secs:.1} s (a table sized by the context?)");
    }
}

//! The text part of `Gemma3ForConditionalGeneration` checkpoints (fixtures gemma3_mm: the names
//! transformers 5 writes, `language_model.model.*`, a tied head, a text_config listing only
//! non-defaults; gemma3_mm_v452: transformers 4.52's `model.language_model.*` + `lm_head.*`, an
//! untied head). The vision tower and projector are counted nowhere: the plan's bytes, the
//! model's weight bytes, the bytes per token, the fingerprint and the logits are those of the
//! same text weights saved as a `Gemma3ForCausalLM` with the config spelled out in full.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ollm_models::registry::model_bytes;
use ollm_models::{CausalLm, LogitsWanted, load_model, load_model_placed};
use ollm_ops::cpu::CpuBackend;
use ollm_residency::plan::{Placement, Tier};
use ollm_weights::Catalog;
use ollm_weights::format::safetensors_writer::{PlannedTensor, SafetensorsWriter};
use serde_json::json;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden").join(case)
}

/// The text config each fixture means, written out as a plain `Gemma3ForCausalLM` config with
/// transformers' `Gemma3TextConfig` defaults spelled out by hand (8 query and 4 KV heads,
/// 131072 positions, query_pre_attn_scalar 256, the default RoPE bases).
fn text_config(case: &str) -> serde_json::Value {
    match case {
        "gemma3_mm" => json!({
            "architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8,
            "vocab_size": 320, "max_position_embeddings": 131072, "sliding_window": 8,
            "sliding_window_pattern": 2, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "query_pre_attn_scalar": 256,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": true, "bos_token_id": 2, "eos_token_id": [1, 106],
            "pad_token_id": 0,
        }),
        _ => {
            let full: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(fixture(case).join("config.json")).expect("config"))
                    .expect("json");
            let mut t = full["text_config"].clone();
            t["architectures"] = json!(["Gemma3ForCausalLM"]);
            t["tie_word_embeddings"] = full["tie_word_embeddings"].clone();
            // transformers' Gemma3ForConditionalGeneration head applies no softcapping.
            t["final_logit_softcapping"] = serde_json::Value::Null;
            t
        }
    }
}

/// `case`'s text weights renamed to `model.*` / `lm_head.*` in a `Gemma3ForCausalLM` directory.
fn text_only(case: &str, dir: &Path) {
    std::fs::write(dir.join("config.json"), text_config(case).to_string()).expect("config");
    let cat = Catalog::open_dir(&fixture(case)).expect("catalog");
    let text: Vec<(String, &ollm_weights::catalog::TensorEntry)> = cat
        .entries()
        .filter_map(|e| {
            let n = &e.name;
            let renamed = n
                .strip_prefix("language_model.model.")
                .or_else(|| n.strip_prefix("model.language_model."))
                .map(|r| format!("model.{r}"))
                .or_else(|| n.strip_prefix("language_model.lm_head.").map(|r| format!("lm_head.{r}")))
                .or_else(|| n.starts_with("lm_head.").then(|| n.clone()))?;
            Some((renamed, e))
        })
        .collect();
    let planned: Vec<PlannedTensor> = text
        .iter()
        .map(|(name, e)| PlannedTensor { name: name.clone(), dtype: e.dtype, shape: e.shape.clone() })
        .collect();
    let mut w = SafetensorsWriter::create(&dir.join("model.safetensors"), &planned).expect("writer");
    for (_, e) in &text {
        w.write(&cat.read(e).expect("read").bytes).expect("write");
    }
    w.finish().expect("finish");
}

#[test]
fn vision_tower_and_projector_are_counted_nowhere() {
    for case in ["gemma3_mm", "gemma3_mm_v452"] {
        let all = Catalog::open_dir(&fixture(case)).expect("catalog");
        let vision: u64 = all
            .entries()
            .filter(|e| e.name.contains("vision_tower.") || e.name.contains("multi_modal_projector."))
            .map(|e| e.len_bytes)
            .sum();
        assert!(vision > 0, "{case}: the fixture has a vision tower");
        let tmp = tempfile::tempdir().expect("tempdir");
        text_only(case, tmp.path());
        let (mm, plain) = (model_bytes(&fixture(case)).expect("bytes"), model_bytes(tmp.path()).expect("bytes"));
        assert_eq!((mm.resident_bytes, &mm.layer_bytes), (plain.resident_bytes, &plain.layer_bytes), "{case}");
        let counted = mm.resident_bytes + mm.layer_bytes.iter().sum::<u64>();
        assert_eq!(counted + vision, all.total_bytes(), "{case}: every text tensor counted, no vision one");
        let a = load_model(&fixture(case), Arc::new(CpuBackend::new())).expect("multimodal checkpoint loads");
        let b = load_model(tmp.path(), Arc::new(CpuBackend::new())).expect("text-only checkpoint loads");
        let (ia, ib) = (a.info(), b.info());
        assert_eq!(ia.architecture, "Gemma3ForConditionalGeneration");
        assert_eq!(
            (ia.weight_bytes, ia.weight_bytes_per_token, ia.fingerprint, ia.max_positions, &ia.eos_token_ids),
            (ib.weight_bytes, ib.weight_bytes_per_token, ib.fingerprint, ib.max_positions, &ib.eos_token_ids),
            "{case}: weight bytes, bytes per token, fingerprint, context, eos"
        );
        let ids = [2u32, 5, 9, 14, 100, 7, 3, 11, 60, 61];
        let run = |m: &Arc<dyn CausalLm>| {
            let mut st = m.new_state().expect("state");
            m.forward(&ids, &mut st, LogitsWanted::All, None).expect("forward")
        };
        assert_eq!(run(&a), run(&b), "{case}: logits");
    }
}

/// A checkpoint with both spellings of one text tensor is refused, naming both.
#[test]
fn both_spellings_of_one_tensor_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("gemma3_mm").join(f), tmp.path().join(f)).expect("copy");
    }
    let cat = Catalog::open_dir(tmp.path()).expect("catalog");
    let norm = cat.get("language_model.model.norm.weight").expect("final norm");
    let planned = [PlannedTensor {
        name: "model.language_model.norm.weight".into(),
        dtype: norm.dtype,
        shape: norm.shape.clone(),
    }];
    let mut w = SafetensorsWriter::create(&tmp.path().join("extra.safetensors"), &planned).expect("writer");
    w.write(&cat.read(norm).expect("read").bytes).expect("write");
    w.finish().expect("finish");
    let mut map = serde_json::Map::new();
    for e in cat.entries() {
        map.insert(e.name.clone(), "model.safetensors".into());
    }
    map.insert("model.language_model.norm.weight".into(), "extra.safetensors".into());
    let index = json!({"metadata": {}, "weight_map": map});
    std::fs::write(tmp.path().join("model.safetensors.index.json"), index.to_string()).expect("index");
    let e = load_model(tmp.path(), Arc::new(CpuBackend::new())).expect_err("two spellings").to_string();
    assert!(e.contains("language_model.model.norm.weight") && e.contains("model.language_model.norm.weight"), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

/// Every decoder layer streamed from disk: the streamer finds the renamed tensors in the file,
/// reads the layers' own bytes (plus alignment) and gives the resident logits.
#[test]
fn text_layers_stream_from_a_multimodal_checkpoint() {
    for case in ["gemma3_mm", "gemma3_mm_v452"] {
        let be = Arc::new(CpuBackend::new());
        let resident = load_model_placed(&fixture(case), be.clone(), None).expect("resident");
        let n = resident.info().n_layers;
        let placement = Placement { tiers: vec![Tier::Disk; n], slots: 1, staging_buffers: 2, kv: None, experts: None };
        let streamed = load_model_placed(&fixture(case), be, Some(&placement)).expect("streamed");
        let run = |m: &Arc<dyn CausalLm>| {
            let mut st = m.new_state().expect("state");
            let mut out =
                m.forward(&[2, 40, 41, 42, 7, 9, 11, 13, 17, 19], &mut st, LogitsWanted::All, None).expect("prefill");
            out.extend(m.forward(&[23], &mut st, LogitsWanted::Last, None).expect("decode"));
            out
        };
        assert_eq!(run(&streamed), run(&resident), "{case}: streamed logits");
        let s = streamed.stream_stats().expect("stats");
        let smallest = model_bytes(&fixture(case)).expect("bytes").layer_bytes.into_iter().min().expect("layers");
        assert!(s.disk_bytes >= n as u64 * smallest, "{case}: {s:?}");
        // A layer's tensors lie together in these files (sorted by name): one read each, at most
        // an alignment block (4 KiB) past each end.
        let slack = s.disk_bytes.div_ceil(smallest) * 2 * 4096;
        assert!(
            s.read_bytes >= s.disk_bytes && s.read_bytes - s.disk_bytes <= slack,
            "{case}: read {} bytes for {} tensor bytes: {s:?}",
            s.read_bytes,
            s.disk_bytes
        );
    }
}

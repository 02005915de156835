//! Tensors a checkpoint carries that the model does not read (Qwen3-Next's `mtp.*`, a
//! multimodal checkpoint's vision tower, a tensor of another variant inside a decoder layer)
//! are skipped by name: the planner's byte counts, the model's weight bytes, the bytes per
//! token and the fingerprint are those of the same checkpoint without them, and the logits
//! are unchanged.

use std::path::Path;
use std::sync::Arc;

use ollm_models::registry::model_bytes;
use ollm_models::{CausalLm, LogitsWanted, load_model};
use ollm_ops::DType;
use ollm_ops::cpu::CpuBackend;
use ollm_weights::format::safetensors_writer::{PlannedTensor, SafetensorsWriter};

fn fixture(case: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden").join(case)
}

/// `case`'s checkpoint as two shards: its own file and one of tensors no family reads.
fn with_extras(case: &str, dir: &Path) {
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture(case).join(f), dir.join(f)).expect("copy");
    }
    let extras = [
        ("mtp.layers.0.mlp.gate_proj.weight", vec![64, 64]),
        ("mtp.fc.weight", vec![64, 128]),
        ("vision_tower.vision_model.embeddings.patch_embedding.weight", vec![32, 48]),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", vec![8]),
    ];
    let planned: Vec<PlannedTensor> = extras
        .iter()
        .map(|(name, shape)| PlannedTensor { name: name.to_string(), dtype: DType::BF16, shape: shape.clone() })
        .collect();
    let mut w = SafetensorsWriter::create(&dir.join("extra.safetensors"), &planned).expect("writer");
    for (_, shape) in &extras {
        w.write(&vec![0x3f; shape.iter().product::<usize>() * 2]).expect("write");
    }
    w.finish().expect("finish");
    let cat = ollm_weights::Catalog::open_dir(&fixture(case)).expect("catalog");
    let mut map = serde_json::Map::new();
    for e in cat.entries() {
        map.insert(e.name.clone(), "model.safetensors".into());
    }
    for (name, _) in &extras {
        map.insert(name.to_string(), "extra.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
}

#[test]
fn tensors_the_model_does_not_read_are_counted_nowhere() {
    for case in ["qwen3_qknorm", "gemma3_v5", "llama3_tied", "qwen3_next", "gpt_oss_mxfp4"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        with_extras(case, tmp.path());
        let clean = model_bytes(&fixture(case)).expect("bytes");
        let extra = model_bytes(tmp.path()).expect("bytes with extras");
        assert_eq!(extra.resident_bytes, clean.resident_bytes, "{case}: resident bytes");
        assert_eq!(extra.layer_bytes, clean.layer_bytes, "{case}: layer bytes");
        let a = load_model(&fixture(case), Arc::new(CpuBackend::new())).expect("load");
        let b = load_model(tmp.path(), Arc::new(CpuBackend::new())).expect("load with extras");
        let (ia, ib) = (a.info(), b.info());
        assert_eq!(
            (ib.weight_bytes, ib.weight_bytes_per_token, ib.fingerprint),
            (ia.weight_bytes, ia.weight_bytes_per_token, ia.fingerprint),
            "{case}: weight bytes, bytes per token and fingerprint"
        );
        let ids = [1u32, 5, 9, 14];
        let run = |m: &Arc<dyn CausalLm>| {
            let mut st = m.new_state().expect("state");
            m.forward(&ids, &mut st, LogitsWanted::All, None).expect("forward")
        };
        assert_eq!(run(&b), run(&a), "{case}: logits");
    }
}

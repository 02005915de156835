//! A checkpoint split into shards behind model.safetensors.index.json, with tensors stored as
//! F32 and F16 beside BF16, gives the same logits as the single bf16 file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use ollm_models::{LogitsWanted, load_model};
use ollm_ops::cpu::CpuBackend;
use ollm_weights::Catalog;

fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden").join(case)
}

/// (name, dtype, shape, little-endian bytes)
type Raw = (String, &'static str, Vec<usize>, Vec<u8>);

/// Writes a safetensors file by hand: u64 header length, JSON header, data.
fn write_safetensors(path: &Path, tensors: &[Raw]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend_from_slice(bytes);
    }
    let h = serde_json::to_vec(&header).expect("json");
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(path, out).expect("write");
}

fn logits(dir: &Path, ids: &[u32]) -> Vec<f32> {
    let model = load_model(dir, Arc::new(CpuBackend::new())).expect("loads");
    let mut state = model.new_state().expect("state");
    model.forward(ids, &mut state, LogitsWanted::All, None).expect("forward")
}

#[test]
fn sharded_mixed_dtype_checkpoint_gives_the_same_logits() {
    let src = golden("headdim_untied");
    let cat = Catalog::open_dir(&src).expect("catalog");
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    // Norms widened to F32 (exact); the layer-1 q_proj narrowed to F16; the rest stays BF16.
    let mut shards: [Vec<Raw>; 2] = [Vec::new(), Vec::new()];
    let mut weight_map = BTreeMap::new();
    for (i, e) in cat.entries().enumerate() {
        let values = cat.read(e).expect("read").to_f32_vec().expect("f32");
        let (dtype, bytes): (&str, Vec<u8>) = if e.name.contains("norm") {
            ("F32", values.iter().flat_map(|v| v.to_le_bytes()).collect())
        } else if e.name == "model.layers.1.self_attn.q_proj.weight" {
            ("F16", values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect())
        } else {
            ("BF16", values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect())
        };
        let shard = i % 2;
        weight_map.insert(e.name.clone(), format!("model-0000{}-of-00002.safetensors", shard + 1));
        shards[shard].push((e.name.clone(), dtype, e.shape.clone(), bytes));
    }
    for (i, s) in shards.iter().enumerate() {
        write_safetensors(&dir.path().join(format!("model-0000{}-of-00002.safetensors", i + 1)), s);
    }
    let index = serde_json::json!({"metadata": {"total_size": cat.total_bytes()}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).expect("index");

    let sharded = Catalog::open_dir(dir.path()).expect("sharded catalog");
    assert_eq!(sharded.entries().count(), cat.entries().count());
    assert!(sharded.entries().any(|e| e.dtype == ollm_ops::DType::F16));
    assert!(sharded.entries().any(|e| e.dtype == ollm_ops::DType::F32));

    let ids: Vec<u32> = (0..16).map(|i| (7 * i * i + 3 * i + 1) % 320).collect();
    let want = logits(&src, &ids);
    let got = logits(dir.path(), &ids);
    let d = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    // F16 holds the bf16 values of this matrix exactly unless one is below f16's normal range,
    // so the difference is rounding of tiny weights only.
    assert!(d < 1e-3, "max |Δlogit| {d}");

    // An index naming a tensor its shard does not hold is an error that names both.
    let bad = serde_json::json!({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors", "nope.weight": "model-00002-of-00002.safetensors"}});
    std::fs::write(dir.path().join("model.safetensors.index.json"), bad.to_string()).expect("index");
    let err = Catalog::open_dir(dir.path()).expect_err("inconsistent index").to_string();
    assert!(err.contains("nope.weight") || err.contains("model.norm.weight"), "{err}");
}

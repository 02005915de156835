//! A streamed layer reads only its own tensors, even where the checkpoint's writer scattered
//! them: a Llama-shaped checkpoint laid out as the `safetensors` library writes files (tensors
//! sorted by dtype, then by name: every layer's f32 norms together at the front, the bf16
//! matrices after them) in two shards, streamed from disk. The bytes read per layer are within
//! 3% of the layer's tensor bytes (reading each layer from its first byte to its last would read
//! most of each shard), and the logits equal the resident model's.

use std::path::Path;
use std::sync::Arc;

use half::bf16;
use ollm_models::synth::{Like, plan_llama};
use ollm_models::{CausalLm, LogitsWanted, load_model_placed};
use ollm_ops::DType;
use ollm_ops::cpu::CpuBackend;
use ollm_residency::plan::{Placement, Tier};
use ollm_weights::format::safetensors_writer::{PlannedTensor, SafetensorsWriter};

const LAYERS: usize = 4;

/// Deterministic small values: norms near 1, the rest within ±0.05.
fn values(name: &str, n: usize) -> Vec<f32> {
    let mut x = name.bytes().fold(0x9e37_79b9u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let u = (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
            if name.ends_with("norm.weight") { 1.0 + 0.2 * u } else { 0.1 * u }
        })
        .collect()
}

fn write_like_python(dir: &Path) {
    let mut config = Like::Llama32_1B.config();
    for (k, v) in [("hidden_size", 256), ("intermediate_size", 768), ("num_attention_heads", 4), ("head_dim", 64)] {
        config[k] = v.into();
    }
    config["num_key_value_heads"] = 2.into();
    config["vocab_size"] = 300.into();
    let plan = plan_llama(config.clone(), Some(LAYERS)).expect("plan");
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(dir.join("config.json"), plan.config.to_string()).expect("config");
    let mut tensors: Vec<PlannedTensor> = plan
        .shards
        .iter()
        .flatten()
        .map(|t| {
            let f32_norm = t.planned.name.ends_with("norm.weight");
            PlannedTensor { dtype: if f32_norm { DType::F32 } else { DType::BF16 }, ..t.planned.clone() }
        })
        .collect();
    // The safetensors library's order: larger dtypes first, then by name.
    tensors.sort_by(|a, b| (b.dtype.size_bytes(), &a.name).cmp(&(a.dtype.size_bytes(), &b.name)));
    // Two shards: the f32 tensors and the first half of the bf16 ones, then the rest.
    let cut = tensors.len() / 2;
    let mut map = serde_json::Map::new();
    for (i, shard) in [&tensors[..cut], &tensors[cut..]].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let mut w = SafetensorsWriter::create(&dir.join(&file), shard).expect("writer");
        for t in shard {
            let v = values(&t.name, t.shape.iter().product());
            let bytes: Vec<u8> = match t.dtype {
                DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                _ => v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
            };
            w.write(&bytes).expect("write");
            map.insert(t.name.clone(), file.clone().into());
        }
        w.finish().expect("finish");
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
}

fn run(model: &Arc<dyn CausalLm>) -> Vec<f32> {
    let mut state = model.new_state().expect("state");
    let mut out = model.forward(&[1, 7, 42, 9, 250, 3], &mut state, LogitsWanted::All, None).expect("prefill");
    for id in [11u32, 299, 4] {
        out.extend(model.forward(&[id], &mut state, LogitsWanted::Last, None).expect("decode"));
    }
    out
}

#[test]
fn streamed_layers_read_their_own_runs_only() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_like_python(tmp.path());
    let be = Arc::new(CpuBackend::new());
    let resident = load_model_placed(tmp.path(), be.clone(), None).expect("resident");
    let placement =
        Placement { tiers: vec![Tier::Disk; LAYERS], slots: 1, staging_buffers: 2, kv: None, experts: None };
    let streamed = load_model_placed(tmp.path(), be, Some(&placement)).expect("streamed");
    assert_eq!(run(&streamed), run(&resident), "streamed logits differ from resident ones");
    let s = streamed.stream_stats().expect("stats");
    assert!(s.layers_streamed >= LAYERS as u64 && s.disk_bytes > 0, "{s:?}");
    let ratio = s.read_bytes as f64 / s.disk_bytes as f64;
    eprintln!("read {} bytes for {} tensor bytes ({ratio:.4}×)", s.read_bytes, s.disk_bytes);
    assert!((1.0..1.03).contains(&ratio), "read {ratio:.3}× the layers' tensor bytes: {s:?}");
}

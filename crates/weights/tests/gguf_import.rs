//! GGUF import end to end: a tiny llama GGUF written here (always runs), and a real file named
//! by `OLLM_TEST_GGUF` (SmolLM2-135M-Instruct.Q4_1.gguf; skipped without the variable).

use std::path::Path;

use half::{bf16, f16};
use ollm_weights::Catalog;
use ollm_weights::format::gguf::quant::{quantize_q4_0, quantize_q4_1, quantize_q8_0};
use ollm_weights::format::gguf::rope_scaling::{Llama3Scaling, llama3_ratios};
use ollm_weights::format::gguf::writer::GgufWriter;
use ollm_weights::format::gguf::{GgmlType, MetaValue, ValueType, import_gguf};
use serde_json::{Value, json};

// Tiny model: H = 64, 4 query heads and 2 kv heads of d = 16, I = 96, V = 16, one layer.
const H: usize = 64;
const NH: usize = 4;
const NKV: usize = 2;
const D: usize = 16;
const I: usize = 96;
const V: usize = 16;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect()
}

/// Rows of `row_len` where every element of row r is `r` (exact in every format used here).
fn row_index_matrix(n_rows: usize, row_len: usize) -> Vec<f32> {
    (0..n_rows).flat_map(|r| std::iter::repeat_n(r as f32, row_len)).collect()
}

/// llama.cpp's converter permutation (docs/models.md §7.2): GGUF row h·d + 2i + c = HF row h·d + c·(d/2) + i.
fn converter_permute(hf: &[f32], row_len: usize, n_heads: usize) -> Vec<f32> {
    let n_rows = hf.len() / row_len;
    let d = n_rows / n_heads;
    let mut out = vec![0.0; hf.len()];
    for h in 0..n_heads {
        for i in 0..d / 2 {
            for c in 0..2 {
                let (g, s) = (h * d + 2 * i + c, h * d + c * (d / 2) + i);
                out[g * row_len..(g + 1) * row_len].copy_from_slice(&hf[s * row_len..(s + 1) * row_len]);
            }
        }
    }
    out
}

fn strs(items: &[&str]) -> MetaValue {
    MetaValue::Array {
        elem_type: ValueType::String,
        items: items.iter().map(|s| MetaValue::String(s.to_string())).collect(),
    }
}

/// The tiny llama GGUF; callers may add tensors (rope_freqs, odd types) before writing it.
fn tiny_llama(arch: &str, rope_theta: f32) -> GgufWriter {
    let mut w = GgufWriter::new();
    let tokens = ["<s>", "</s>", "a", "b", "c", "d", "e", "f", "g", "h", "Ġ", "ab", "Ġa", "1", "2", "<user>"];
    let types: Vec<MetaValue> = (0..V)
        .map(|i| {
            MetaValue::I32(match i {
                0 | 1 => 3,
                15 => 4,
                _ => 1,
            })
        })
        .collect();
    w.kv("general.architecture", MetaValue::String(arch.into()))
        .kv("llama.context_length", MetaValue::U32(256))
        .kv("llama.embedding_length", MetaValue::U32(H as u32))
        .kv("llama.feed_forward_length", MetaValue::U32(I as u32))
        .kv("llama.block_count", MetaValue::U32(1))
        .kv("llama.attention.head_count", MetaValue::U32(NH as u32))
        .kv("llama.attention.head_count_kv", MetaValue::U32(NKV as u32))
        .kv("llama.rope.freq_base", MetaValue::F32(rope_theta))
        .kv("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(1e-5))
        .kv("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", MetaValue::String("smollm".into()))
        .kv("tokenizer.ggml.tokens", strs(&tokens))
        .kv("tokenizer.ggml.token_type", MetaValue::Array { elem_type: ValueType::I32, items: types })
        .kv("tokenizer.ggml.merges", strs(&["a b", "Ġ a"]))
        .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(0))
        .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(1))
        .kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(true))
        .kv("tokenizer.chat_template", MetaValue::String("{{ messages }}".into()));

    let embd: Vec<f32> = (0..V * H).map(|i| ((i % 29) as f32 - 14.0) / 16.0).collect();
    let q = converter_permute(&row_index_matrix(NH * D, H), H, NH);
    let k = converter_permute(&row_index_matrix(NKV * D, H), H, NKV);
    let v = row_index_matrix(NKV * D, H);
    let o: Vec<f32> = (0..H * H).map(|i| i as f32 / 64.0).collect();
    let gate = vec![0.5f32; I * H];
    let down: Vec<f32> = (0..H * I).map(|i| (i % 7) as f32).collect();
    let norm: Vec<f32> = (0..H).map(|i| 1.0 + i as f32 / 128.0).collect();
    let q8 = |x: &[f32]| quantize_q8_0(x).expect("q8_0");
    w.tensor("token_embd.weight", &[H as u64, V as u64], GgmlType::Q8_0, q8(&embd))
        .tensor("blk.0.attn_norm.weight", &[H as u64], GgmlType::F32, f32_bytes(&norm))
        .tensor("blk.0.attn_q.weight", &[H as u64, (NH * D) as u64], GgmlType::Q4_1, quantize_q4_1(&q).expect("q4_1"))
        .tensor("blk.0.attn_k.weight", &[H as u64, (NKV * D) as u64], GgmlType::Q4_0, quantize_q4_0(&k).expect("q4_0"))
        .tensor("blk.0.attn_v.weight", &[H as u64, (NKV * D) as u64], GgmlType::F16, f16_bytes(&v))
        .tensor("blk.0.attn_output.weight", &[(NH * D) as u64, H as u64], GgmlType::BF16, bf16_bytes(&o))
        .tensor("blk.0.ffn_norm.weight", &[H as u64], GgmlType::F32, f32_bytes(&norm))
        .tensor("blk.0.ffn_gate.weight", &[H as u64, I as u64], GgmlType::Q8_0, q8(&gate))
        .tensor("blk.0.ffn_up.weight", &[H as u64, I as u64], GgmlType::Q8_0, q8(&gate))
        .tensor("blk.0.ffn_down.weight", &[I as u64, H as u64], GgmlType::Q8_0, q8(&down))
        .tensor("output_norm.weight", &[H as u64], GgmlType::F32, f32_bytes(&norm));
    w
}

fn write(dir: &Path, w: &GgufWriter) -> std::path::PathBuf {
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, w.to_bytes()).expect("write gguf");
    path
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read json")).expect("valid json")
}

/// A tensor of the imported checkpoint as f32 (it is stored as bf16).
fn tensor_f32(cat: &Catalog, name: &str) -> Vec<f32> {
    let t = cat.read(cat.get(name).unwrap_or_else(|| panic!("{name} missing"))).expect("read");
    t.bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
}

#[test]
fn tiny_gguf_imports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = write(dir.path(), &tiny_llama("llama", 10000.0));
    let out = dir.path().join("model");
    let mut reports = Vec::new();
    let summary = import_gguf(&gguf, &out, &mut |done, total| reports.push((done, total))).expect("import");
    assert_eq!(summary.n_tensors, 11);
    assert!(summary.tie_word_embeddings);
    assert_eq!(summary.ggml_type_counts.get("Q8_0"), Some(&4));
    let (last_done, total) = *reports.last().expect("progress");
    assert_eq!((last_done, reports[0].0), (total, 0));

    let cfg = read_json(&out.join("config.json"));
    for (key, want) in [
        ("architectures", json!(["LlamaForCausalLM"])),
        ("model_type", json!("llama")),
        ("hidden_size", json!(H)),
        ("intermediate_size", json!(I)),
        ("num_hidden_layers", json!(1)),
        ("num_attention_heads", json!(NH)),
        ("num_key_value_heads", json!(NKV)),
        ("head_dim", json!(D)),
        ("vocab_size", json!(V)),
        ("rms_norm_eps", json!(1e-5)),
        ("rope_theta", json!(10000.0)),
        ("rope_scaling", Value::Null),
        ("max_position_embeddings", json!(256)),
        ("tie_word_embeddings", json!(true)),
        ("bos_token_id", json!(0)),
        ("eos_token_id", json!(1)),
        ("torch_dtype", json!("bfloat16")),
    ] {
        assert_eq!(cfg[key], want, "config.json {key}");
    }
    let tok = read_json(&out.join("tokenizer.json"));
    assert_eq!(tok["model"]["vocab"]["Ġa"], json!(12));
    assert_eq!(tok["added_tokens"].as_array().map(Vec::len), Some(3));
    let tok_cfg = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(
        (tok_cfg["chat_template"].clone(), tok_cfg["bos_token"].clone()),
        (json!("{{ messages }}"), json!("<s>"))
    );
    assert_eq!(read_json(&out.join("generation_config.json")), json!({"bos_token_id": 0, "eos_token_id": 1}));

    let cat = Catalog::open_dir(&out).expect("safetensors");
    assert_eq!(cat.entries().count(), 11);
    assert!(cat.get("lm_head.weight").is_none());
    assert_eq!(cat.get("model.layers.0.mlp.down_proj.weight").expect("down").shape, vec![H, I]);
    // q and k rows come back in HF order: row r holds the value r everywhere.
    for (name, n_rows) in
        [("model.layers.0.self_attn.q_proj.weight", NH * D), ("model.layers.0.self_attn.k_proj.weight", NKV * D)]
    {
        assert_eq!(tensor_f32(&cat, name), row_index_matrix(n_rows, H), "{name}");
    }
    assert_eq!(tensor_f32(&cat, "model.layers.0.self_attn.v_proj.weight"), row_index_matrix(NKV * D, H));
    let o = tensor_f32(&cat, "model.layers.0.self_attn.o_proj.weight");
    assert_eq!((o[0], o[65], o[H * H - 1]), (0.0, 65.0 / 64.0, bf16::from_f32(4095.0 / 64.0).to_f32()));
    assert_eq!(tensor_f32(&cat, "model.layers.0.mlp.gate_proj.weight"), vec![0.5; I * H]);
    let norm = tensor_f32(&cat, "model.norm.weight");
    assert_eq!((norm[0], norm[63]), (1.0, bf16::from_f32(1.0 + 63.0 / 128.0).to_f32()));
    // Staging directories are gone.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("ls")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn rope_freqs_become_llama3_scaling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let want = Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let rho: Vec<f32> = llama3_ratios(500000.0, D, &want).iter().map(|&r| r as f32).collect();
    let mut w = tiny_llama("llama", 500000.0);
    w.tensor("rope_freqs.weight", &[(D / 2) as u64], GgmlType::F32, f32_bytes(&rho));
    let out = dir.path().join("model");
    let summary = import_gguf(&write(dir.path(), &w), &out, &mut |_, _| {}).expect("import");
    assert_eq!(summary.rope_scaling, Some(want));
    assert_eq!(summary.n_tensors, 11, "rope_freqs is not a weight");
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(
        cfg["rope_scaling"],
        json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    );

    // Linear-style factors (all 4) cannot be llama3.
    let mut w = tiny_llama("llama", 500000.0);
    w.tensor("rope_freqs.weight", &[(D / 2) as u64], GgmlType::F32, f32_bytes(&[4.0; D / 2]));
    let out = dir.path().join("linear");
    let err = import_gguf(&write(dir.path(), &w), &out, &mut |_, _| {}).expect_err("linear").to_string();
    assert!(err.contains("rope_freqs") && err.contains("cannot be expressed"), "{err}");
    assert!(!out.exists());
}

#[test]
fn bad_inputs_fail_before_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("model");
    let cases: Vec<(GgufWriter, &str)> = vec![
        (tiny_llama("gpt2", 10000.0), "'gpt2' cannot be imported"),
        (
            {
                let mut w = tiny_llama("llama", 10000.0);
                w.tensor("output.weight", &[256, V as u64], GgmlType::IQ2_XXS, vec![0; 66 * V]);
                w
            },
            "IQ2_XXS (type 16)",
        ),
        (
            {
                let mut w = tiny_llama("llama", 10000.0);
                w.tensor("blk.0.attn_qkv.weight", &[H as u64], GgmlType::F32, f32_bytes(&[0.0; H]));
                w
            },
            "blk.0.attn_qkv.weight",
        ),
        (
            {
                let mut w = tiny_llama("llama", 10000.0);
                w.tensor(
                    "output.weight",
                    &[H as u64, (V + 1) as u64],
                    GgmlType::F32,
                    f32_bytes(&vec![0.0; H * (V + 1)]),
                );
                w
            },
            "shape [17, 64]",
        ),
    ];
    for (w, needle) in cases {
        let err = import_gguf(&write(dir.path(), &w), &out, &mut |_, _| {}).expect_err(needle).to_string();
        assert!(err.contains(needle), "want {needle:?} in: {err}");
        assert!(!out.exists(), "nothing written for {needle}");
    }
    // An existing non-empty output directory is refused.
    std::fs::create_dir_all(out.join("x")).expect("mkdir");
    let err = import_gguf(&write(dir.path(), &tiny_llama("llama", 1e4)), &out, &mut |_, _| {}).expect_err("exists");
    assert!(err.to_string().contains("not an empty directory"), "{err}");
}

/// Values recorded with gguf-py 0.19 from SmolLM2-135M-Instruct.Q4_1.gguf: dequantised, q/k rows
/// un-permuted, rounded to bf16 by torch (round to nearest even). Written as exact decimals.
#[allow(clippy::excessive_precision)]
const SMOLLM2_VALUES: &[(&str, usize, &[f32])] = &[
    ("model.embed_tokens.weight", 0, &[-0.1064453125, 0.032958984375, 0.048095703125, -0.0228271484375]),
    ("model.embed_tokens.weight", 49151 * 576 + 573, &[0.12890625, -0.1201171875, -0.041748046875]),
    ("model.embed_tokens.weight", 1234 * 576 + 100, &[-0.50390625, -0.015869140625, 0.1865234375]),
    ("model.layers.0.self_attn.q_proj.weight", 576, &[-0.1591796875, 0.3984375, -0.0198974609375, -1.2734375]),
    (
        "model.layers.0.self_attn.q_proj.weight",
        33 * 576 + 570,
        &[-0.0264892578125, 0.030517578125, -0.08349609375, 0.14453125, -0.08349609375, 0.030517578125],
    ),
    ("model.layers.29.self_attn.k_proj.weight", 5 * 576, &[0.0322265625, -0.2431640625, 0.0322265625, -0.029052734375]),
    ("model.layers.29.self_attn.k_proj.weight", 100 * 576 + 10, &[-0.07666015625, 0.059814453125, 0.0142822265625]),
    ("model.layers.7.mlp.down_proj.weight", 100 * 1536 + 200, &[0.06689453125, 0.009765625, -0.04736328125]),
    ("model.layers.0.input_layernorm.weight", 0, &[0.01397705078125, 0.0238037109375, -0.019775390625, -0.0302734375]),
    ("model.norm.weight", 0, &[1.7578125, 1.8203125, 1.78125]),
];

#[test]
fn smollm2_gguf_imports() {
    let Some(gguf) = std::env::var_os("OLLM_TEST_GGUF") else {
        eprintln!("skipped: set OLLM_TEST_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf to run the real-file import check");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("smollm2");
    let summary = import_gguf(Path::new(&gguf), &out, &mut |_, _| {}).expect("import");
    assert_eq!(summary.pre_tokenizer, "smollm");
    assert_eq!((summary.ggml_type_counts.get("Q4_1"), summary.ggml_type_counts.get("Q8_0")), (Some(&210), Some(&1)));

    let cfg = read_json(&out.join("config.json"));
    for (key, want) in [
        ("hidden_size", json!(576)),
        ("intermediate_size", json!(1536)),
        ("num_hidden_layers", json!(30)),
        ("num_attention_heads", json!(9)),
        ("num_key_value_heads", json!(3)),
        ("head_dim", json!(64)),
        ("vocab_size", json!(49152)),
        ("rms_norm_eps", json!(1e-5)),
        ("rope_theta", json!(100000.0)),
        ("max_position_embeddings", json!(8192)),
        ("tie_word_embeddings", json!(true)),
        ("bos_token_id", json!(1)),
        ("eos_token_id", json!(2)),
    ] {
        assert_eq!(cfg[key], want, "config.json {key}");
    }
    let tok = read_json(&out.join("tokenizer.json"));
    assert_eq!(tok["model"]["vocab"].as_object().map(|v| v.len()), Some(49152));
    assert_eq!(tok["model"]["merges"].as_array().map(Vec::len), Some(48900));
    assert_eq!(tok["added_tokens"].as_array().map(Vec::len), Some(17));
    assert_eq!(read_json(&out.join("tokenizer_config.json"))["eos_token"], json!("<|im_end|>"));

    let cat = Catalog::open_dir(&out).expect("safetensors");
    assert_eq!(cat.entries().count(), 272);
    assert_eq!(cat.get("model.embed_tokens.weight").expect("embd").shape, vec![49152, 576]);
    assert_eq!(cat.get("model.layers.0.self_attn.k_proj.weight").expect("k").shape, vec![192, 576]);
    assert_eq!(cat.get("model.layers.0.mlp.down_proj.weight").expect("down").shape, vec![576, 1536]);
    for &(name, at, want) in SMOLLM2_VALUES {
        let got = tensor_f32(&cat, name);
        assert_eq!(&got[at..at + want.len()], want, "{name} at {at}");
    }
}

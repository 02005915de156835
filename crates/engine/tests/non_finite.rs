//! A forward whose logits are NaN or infinite stops generation with an error naming the
//! position, instead of sampling tokens from them. A synthesised model (random weights) whose
//! final norm is overwritten with NaN, on the CPU.

use std::ops::ControlFlow;
use std::sync::Arc;

use ollm_engine::{EngineError, GenerateParams, SamplingParams, Session, generate};
use ollm_models::load_model;
use ollm_models::synth::{Like, plan_llama, write_plan};
use ollm_ops::cpu::CpuBackend;
use ollm_tokenizer::Tokenizer;

/// bf16 NaN (0x7FC0), little endian.
const BF16_NAN: [u8; 2] = [0xC0, 0x7F];

/// Overwrites every value of bf16 tensor `name` in `<dir>/model.safetensors` with `value`.
fn overwrite_bf16(dir: &std::path::Path, name: &str, value: [u8; 2]) {
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let offsets = &header[name]["data_offsets"];
    let (start, end) = (offsets[0].as_u64().expect("start") as usize, offsets[1].as_u64().expect("end") as usize);
    for pair in bytes[8 + n + start..8 + n + end].chunks_exact_mut(2) {
        pair.copy_from_slice(&value);
    }
    std::fs::write(&path, bytes).expect("write");
}

#[test]
fn nan_logits_stop_generation_naming_the_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Like::Llama32_1B.config();
    for (k, v) in [("hidden_size", 64), ("intermediate_size", 96), ("num_attention_heads", 4), ("head_dim", 16)] {
        config[k] = v.into();
    }
    config["num_key_value_heads"] = 2.into();
    write_plan(&plan_llama(config, Some(1)).expect("plan"), dir.path(), 2, &mut |_, _| {}).expect("write");
    let tok = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    let params = GenerateParams {
        max_new_tokens: 4,
        sampling: SamplingParams::greedy(),
        eos_token_ids: Vec::new(),
        stop: Vec::new(),
        harmony: None,
        cancel: None,
        grammar: None,
        speculate: None,
        logprobs: None,
    };
    let prompt: Vec<u32> = (0..5).map(|i| 100 + i).collect();
    let run = |model| {
        let mut session = Session::new(model).expect("session");
        let mut emitted = 0;
        let out = generate(&mut session, &tok, &prompt, &params, &mut |_| {
            emitted += 1;
            ControlFlow::Continue(())
        });
        (out, emitted)
    };
    let (ok, emitted) = run(load_model(dir.path(), Arc::new(CpuBackend::new())).expect("load"));
    assert_eq!((ok.expect("healthy model generates").ids.len(), emitted), (4, 4));

    overwrite_bf16(dir.path(), "model.norm.weight", BF16_NAN);
    let (out, emitted) = run(load_model(dir.path(), Arc::new(CpuBackend::new())).expect("load"));
    let err = out.expect_err("NaN logits");
    assert!(matches!(err, EngineError::NonFiniteLogits { position: 4, .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("position 4") && msg.contains("NaN") && !msg.contains('\n'), "{msg}");
    assert_eq!(emitted, 0, "no token may come from NaN logits");
}

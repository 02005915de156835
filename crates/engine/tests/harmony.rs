//! A harmony model's output (GPT-OSS) splits into the answer and the reasoning: a scripted
//! model writes an analysis message, a commentary message with a recipient and a constraint,
//! and a final one, token by token through the o200k_harmony special tokens (the synthetic
//! harmony tokenizer has them at their real ids); `generate` returns the final channel as the
//! text and the rest as the reasoning, stop strings apply to the answer only, and without
//! harmony the same tokens are plain text.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use ollm_engine::{GenerateParams, HarmonyMarkers, SamplingParams, Session, generate};
use ollm_kv::{KvShape, SeqState};
use ollm_models::{CausalLm, LogitsWanted, ModelInfo, Result, TraceSink};
use ollm_ops::Backend;
use ollm_ops::cpu::CpuBackend;
use ollm_tokenizer::Tokenizer;

/// Emits `script` one token per forward (the argmax of a one-hot row), whatever it is fed.
#[derive(Debug)]
struct Scripted {
    info: ModelInfo,
    backend: CpuBackend,
    script: Vec<u32>,
    next: Mutex<usize>,
}

impl CausalLm for Scripted {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn backend(&self) -> &dyn Backend {
        &self.backend
    }

    fn new_state(&self) -> Result<SeqState> {
        Ok(SeqState::new(&self.backend, vec![KvShape::full(1, 1)], self.info.max_positions)?)
    }

    fn forward(
        &self,
        ids: &[u32],
        state: &mut SeqState,
        _: LogitsWanted,
        _: Option<&dyn TraceSink>,
    ) -> Result<Vec<f32>> {
        state.advance(ids.len());
        let mut next = self.next.lock().expect("lock");
        let mut row = vec![0.0; self.info.vocab_size];
        row[self.script[(*next).min(self.script.len() - 1)] as usize] = 1.0;
        *next += 1;
        Ok(row)
    }
}

fn tokenizer(dir: &std::path::Path) -> Tokenizer {
    let (tok, config, _) = ollm_models::synth::harmony_tokenizer_files();
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).expect("write");
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).expect("write");
    Tokenizer::from_dir(dir).expect("tokenizer")
}

fn model(script: Vec<u32>, vocab: usize) -> Arc<dyn CausalLm> {
    let info = ModelInfo {
        architecture: "Scripted".into(),
        vocab_size: vocab,
        hidden_size: 1,
        n_layers: 1,
        max_positions: 4096,
        weight_bytes: 0,
        weight_bytes_per_token: 0,
        kv_bytes_per_position: 0,
        sliding_kv: None,
        eos_token_ids: Vec::new(),
        bos_token_id: None,
        fingerprint: 0,
    };
    Arc::new(Scripted { info, backend: CpuBackend::new(), script, next: Mutex::new(0) })
}

#[test]
fn harmony_output_splits_into_answer_and_reasoning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tok = tokenizer(dir.path());
    let markers = HarmonyMarkers::from_tokenizer(&tok).expect("o200k_harmony markers");
    assert_eq!((markers.start, markers.end, markers.message, markers.ret), (200006, 200007, 200008, 200002));
    let written = "<|channel|>analysis<|message|>User says hi — größer.<|end|>\
        <|start|>assistant to=functions.lookup<|channel|>commentary <|constrain|>json<|message|>{\"q\":1}<|call|>\
        <|start|>assistant<|channel|>final<|message|>Hello — wörld! STOP here<|return|>";
    let script = tok.encode(written, false).expect("encode");
    assert!(script.contains(&markers.channel) && script.contains(&markers.constrain), "markers are single tokens");
    let run = |harmony: Option<HarmonyMarkers>, stop: Vec<String>| {
        let mut session = Session::new(model(script.clone(), tok.vocab_size())).expect("session");
        let params = GenerateParams {
            max_new_tokens: script.len(),
            sampling: SamplingParams::greedy(),
            eos_token_ids: vec![markers.ret],
            stop,
            harmony,
            cancel: None,
            grammar: None,
            speculate: None,
            logprobs: None,
        };
        let (mut streamed, mut thought) = (String::new(), String::new());
        let prompt = tok.encode("<|start|>user<|message|>hi<|end|><|start|>assistant", false).expect("prompt");
        let g = generate(&mut session, &tok, &prompt, &params, &mut |ev| {
            streamed.push_str(ev.text);
            thought.push_str(ev.reasoning);
            ControlFlow::Continue(())
        })
        .expect("generate");
        assert_eq!((streamed, thought), (g.text.clone(), g.reasoning.clone()), "streamed = returned");
        g
    };
    let g = run(Some(markers), Vec::new());
    assert_eq!(g.text, "Hello — wörld! STOP here");
    assert_eq!(g.reasoning, "User says hi — größer.{\"q\":1}");
    // A stop string is looked for in the answer only ("STOP" is not in the reasoning).
    let g = run(Some(markers), vec!["STOP".into(), "hi".into()]);
    assert_eq!(g.text, "Hello — wörld! ");
    assert_eq!(g.reasoning, "User says hi — größer.{\"q\":1}");
    // A model that never writes a header: after 64 tokens they all turn out to be the answer.
    let plain: String = (0..80).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let plain_ids = tok.encode(&plain, false).expect("encode");
    let mut session = Session::new(model(plain_ids.clone(), tok.vocab_size())).expect("session");
    let params = GenerateParams {
        max_new_tokens: plain_ids.len(),
        sampling: SamplingParams::greedy(),
        eos_token_ids: vec![markers.ret],
        stop: Vec::new(),
        harmony: Some(markers),
        cancel: None,
        grammar: None,
        speculate: None,
        logprobs: None,
    };
    let prompt = tok.encode("<|start|>assistant", false).expect("prompt");
    let g = generate(&mut session, &tok, &prompt, &params, &mut |_| ControlFlow::Continue(())).expect("generate");
    assert_eq!(g.text, plain, "no header: every token is answer text, none lost");
    // Without harmony (a plain completion) every token is text.
    let g = run(None, Vec::new());
    assert!(g.text.starts_with("<|channel|>analysis<|message|>User says hi") && g.reasoning.is_empty(), "{}", g.text);
}

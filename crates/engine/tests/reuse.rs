//! A session that keeps what a new prompt shares with the last one generates what a fresh
//! session would, and says how much it kept; a persistent prefix cache does the same across
//! sessions. A synthesised model (random weights, 4 layers), greedy decoding, on the CPU.

use std::ops::ControlFlow;
use std::sync::Arc;

use ollm_engine::{GenerateParams, SamplingParams, Session, generate, generate_reusing};
use ollm_kv::PrefixConfig;
use ollm_models::synth::{Like, plan_llama, write_plan};
use ollm_models::{CausalLm, load_model};
use ollm_ops::cpu::CpuBackend;
use ollm_tokenizer::Tokenizer;

fn tiny(dir: &std::path::Path) -> (Arc<dyn CausalLm>, Tokenizer) {
    let mut config = Like::Llama32_1B.config();
    for (k, v) in [("hidden_size", 64), ("intermediate_size", 96), ("num_attention_heads", 4), ("head_dim", 16)] {
        config[k] = v.into();
    }
    config["num_key_value_heads"] = 2.into();
    write_plan(&plan_llama(config, Some(4)).expect("plan"), dir, 2, &mut |_, _| {}).expect("write");
    let model = load_model(dir, Arc::new(CpuBackend::new())).expect("load");
    (model, Tokenizer::from_dir(dir).expect("tokenizer"))
}

#[test]
fn a_session_keeps_the_shared_prefix_and_answers_like_a_fresh_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, tok) = tiny(dir.path());
    let params = GenerateParams {
        max_new_tokens: 6,
        sampling: SamplingParams::greedy(),
        eos_token_ids: Vec::new(),
        stop: Vec::new(),
        harmony: None,
        cancel: None,
        grammar: None,
        speculate: None,
        logprobs: None,
    };
    let doc: Vec<u32> = (0..700u32).map(|i| (i * 7919 + 13) % 120_000).collect();
    let ask = |q: u32| [doc.clone(), (0..20).map(|i| 500 + q * 40 + i).collect()].concat();
    let run = |session: &mut Session, prompt: &[u32], reuse: bool| {
        let mut none = |_: ollm_engine::TokenEvent<'_>| ControlFlow::Continue(());
        if reuse {
            generate_reusing(session, &tok, prompt, &params, &mut none).expect("generate")
        } else {
            generate(session, &tok, prompt, &params, &mut none).expect("generate")
        }
    };
    let fresh = |p: &[u32]| run(&mut Session::new(model.clone()).expect("session"), p, false).ids;
    let mut s = Session::new(model.clone()).expect("session");
    let first = run(&mut s, &ask(1), true);
    assert_eq!(first.stats.reused_tokens, 0);
    let second = run(&mut s, &ask(2), true);
    assert_eq!((second.stats.reused_tokens, second.stats.prompt_tokens), (doc.len(), doc.len() + 20));
    assert_eq!(second.ids, fresh(&ask(2)), "kept prefix changed the answer");
    // The same prompt again keeps all but its last token.
    let again = run(&mut s, &ask(2), true);
    assert_eq!(again.stats.reused_tokens, doc.len() + 19);
    assert_eq!(again.ids, second.ids);
    // Nothing shared: it starts over.
    let other: Vec<u32> = (0..30).map(|i| 900 + i).collect();
    let o = run(&mut s, &other, true);
    assert_eq!(o.stats.reused_tokens, 0);
    assert_eq!(o.ids, fresh(&other));

    // Across sessions through the persistent prefix cache: the second session loads the
    // document's blocks (256 positions each on the device), stores nothing new, same answer.
    let cfg = PrefixConfig { dir: dir.path().join("prefix"), max_bytes: u64::MAX };
    let cached = || Session::new(model.clone()).expect("session").with_prefix_cache(&cfg).expect("cache");
    let g1 = run(&mut cached(), &ask(1), false);
    let p1 = g1.stats.prefix.expect("report");
    assert_eq!(p1.restored.expect("restore ran").tokens, 0);
    assert_eq!(p1.stored.expect("stored").blocks, 2);
    let g2 = run(&mut cached(), &ask(2), false);
    let p2 = g2.stats.prefix.expect("report");
    assert_eq!(p2.restored.expect("restore ran").tokens, 512);
    assert_eq!(p2.stored.expect("stored").present, 2);
    assert_eq!(g2.ids, second.ids);
}

/// A recurrent model (Qwen3-Next's Gated DeltaNet) cannot step back: a prompt that shares only
/// part of the last one makes the session start over, and it must start from a zero state (not
/// from the last sequence's), giving a fresh session's logits exactly.
#[test]
fn a_recurrent_model_starts_over_from_a_zero_state() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden/qwen3_next");
    let model = load_model(&dir, Arc::new(CpuBackend::new())).expect("qwen3-next fixture");
    let first: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 300).collect();
    let second: Vec<u32> = [&first[..10], &(0..30).map(|i| (i * 11 + 5) % 300).collect::<Vec<_>>()[..]].concat();
    let mut session = Session::new(model.clone()).expect("session");
    session.prefill(&first).expect("first");
    let kept = session.rewind(&second);
    assert_eq!(kept, 0, "a recurrent state keeps all or nothing");
    let got = session.prefill(&second).expect("second");
    let want = Session::new(model).expect("fresh").prefill(&second).expect("fresh");
    assert!(got == want, "the second prompt saw the first one's state");
}

#[test]
fn a_cancelled_prefill_stops_between_chunks_without_a_token() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, tok) = tiny(dir.path());
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    // The caller goes away after the second chunk.
    let cancel = ollm_engine::CancelCheck::new(move || counter.fetch_add(1, Ordering::SeqCst) >= 1);
    let params = GenerateParams {
        max_new_tokens: 4,
        sampling: SamplingParams::greedy(),
        eos_token_ids: Vec::new(),
        stop: Vec::new(),
        harmony: None,
        cancel: Some(cancel),
        grammar: None,
        speculate: None,
        logprobs: None,
    };
    let prompt: Vec<u32> = (0..100u32).map(|i| 300 + i).collect();
    let mut session = Session::new(model.clone()).expect("session").with_prefill_chunk(16);
    let mut tokens = 0;
    let g = generate(&mut session, &tok, &prompt, &params, &mut |_| {
        tokens += 1;
        ControlFlow::Continue(())
    })
    .expect("generate");
    assert_eq!(g.finish, ollm_engine::FinishReason::Cancelled);
    assert!(g.ids.is_empty() && tokens == 0, "tokens came after a cancelled prefill");
    // Chunk 1, a check (go on), chunk 2, a check (stop): 32 of the 100 prompt tokens were fed.
    assert_eq!((session.len(), asked.load(Ordering::SeqCst)), (32, 2));
    // The session goes on from there: the same prompt keeps what was fed.
    let again = GenerateParams { cancel: None, ..params };
    let g = generate_reusing(&mut session, &tok, &prompt, &again, &mut |_| ControlFlow::Continue(())).expect("again");
    assert_eq!((g.stats.reused_tokens, g.ids.len()), (32, 4));
}

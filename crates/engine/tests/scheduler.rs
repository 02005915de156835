//! The continuous-batching scheduler gives every request what it gets alone: a synthesised
//! Llama (random weights) on the CPU, 12 requests of mixed prompt lengths (3 to 300 tokens) with
//! greedy and seeded sampling, run through `generate` one by one and through the scheduler at
//! batch 1, 3 and 8 (greedy ones give the same tokens) with a small per-step token budget (prompts are read in chunks alongside
//! the others' decode steps). Also: a request cancelled mid-generation leaves without touching
//! the rest; a prompt longer than the context fails alone; the streamed text joins to the
//! result's text.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use ollm_engine::{
    FinishReason, GenerateParams, Generation, Request, SamplingParams, Scheduler, SchedulerConfig, SchedulerStats,
    Session, Sink, TokenEvent, generate,
};
use ollm_models::synth::{Like, plan_gemma3, plan_llama, plan_qwen3_next, write_plan};
use ollm_models::{CausalLm, load_model};
use ollm_ops::cpu::CpuBackend;
use ollm_tokenizer::Tokenizer;

fn tiny(dir: &std::path::Path) -> (Arc<dyn CausalLm>, Arc<Tokenizer>) {
    let mut config = Like::Llama32_1B.config();
    for (k, v) in [("hidden_size", 64), ("intermediate_size", 96), ("num_attention_heads", 4), ("head_dim", 16)] {
        config[k] = v.into();
    }
    config["num_key_value_heads"] = 2.into();
    config["max_position_embeddings"] = 512.into();
    write_plan(&plan_llama(config, Some(4)).expect("plan"), dir, 2, &mut |_, _| {}).expect("write");
    let model = load_model(dir, Arc::new(CpuBackend::new())).expect("load");
    (model, Arc::new(Tokenizer::from_dir(dir).expect("tokenizer")))
}

fn requests() -> Vec<(Vec<u32>, GenerateParams)> {
    (0..12u32)
        .map(|r| {
            let len = [3, 300, 17, 64, 5, 129, 40, 1, 250, 33, 8, 90][r as usize];
            let prompt: Vec<u32> = (0..len).map(|i| (i * 7919 + r * 104_729 + 13) % 4000 + 100).collect();
            let sampling = if r % 3 == 1 {
                SamplingParams { temperature: 0.8, top_p: 0.9, seed: 1000 + u64::from(r), ..SamplingParams::greedy() }
            } else {
                SamplingParams::greedy()
            };
            let params = GenerateParams {
                max_new_tokens: 12 + (r as usize % 5) * 3,
                sampling,
                eos_token_ids: Vec::new(),
                stop: Vec::new(),
                harmony: None,
                cancel: None,
                grammar: None,
                speculate: None,
                // Every fourth request asks for logprobs (one greedy, one sampled, one greedy).
                logprobs: (r % 4 == 0).then_some(3),
            };
            (prompt, params)
        })
        .collect()
}

type Ended = HashMap<usize, (Result<Generation, String>, String)>;
type Results = Arc<Mutex<Ended>>;

/// Collects one request's streamed text and its end.
struct Collect {
    key: usize,
    streamed: String,
    /// Cancel (return Break) after this many tokens.
    cancel_after: Option<usize>,
    tokens: usize,
    out: Results,
}

impl Sink for Collect {
    fn token(&mut self, ev: TokenEvent<'_>) -> ControlFlow<()> {
        self.streamed.push_str(ev.text);
        self.tokens += 1;
        if self.cancel_after.is_some_and(|n| self.tokens >= n) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    fn done(&mut self, result: ollm_engine::Result<Generation>) {
        let streamed = std::mem::take(&mut self.streamed);
        self.out.lock().expect("lock").insert(self.key, (result.map_err(|e| e.to_string()), streamed));
    }
}

fn alone(model: &Arc<dyn CausalLm>, tok: &Tokenizer) -> Vec<Generation> {
    requests()
        .iter()
        .map(|(prompt, params)| {
            let mut s = Session::new(model.clone()).expect("session");
            generate(&mut s, tok, prompt, params, &mut |_| ControlFlow::Continue(())).expect("alone")
        })
        .collect()
}

fn scheduled(
    model: &Arc<dyn CausalLm>,
    tok: &Arc<Tokenizer>,
    max_batch: usize,
    extra: Vec<(usize, Vec<u32>, Option<usize>)>,
) -> (Ended, ollm_engine::SchedulerStats) {
    let m = model.clone();
    let cfg = SchedulerConfig { max_batch, step_tokens: 48 };
    let mut sched = Scheduler::new(model.clone(), tok.clone(), cfg, Box::new(move || Session::new(m.clone())));
    let out: Results = Arc::default();
    let mut all: Vec<(usize, Vec<u32>, GenerateParams, Option<usize>)> =
        requests().into_iter().enumerate().map(|(i, (p, g))| (i, p, g, None)).collect();
    for (key, prompt, cancel_after) in extra {
        all.push((key, prompt, requests()[0].1.clone(), cancel_after));
    }
    for (key, prompt, params, cancel_after) in all {
        let sink = Collect { key, streamed: String::new(), cancel_after, tokens: 0, out: out.clone() };
        sched.submit(Request { prompt, params, sink: Box::new(sink) });
    }
    sched.run_until_idle();
    let stats = sched.stats().clone();
    let got = std::mem::take(&mut *out.lock().expect("lock"));
    (got, stats)
}

/// Logprobs, when asked for: one per token, ≤ 0, top lists sorted; a greedy token is the top
/// one, and the values match those of the request run alone (to float noise of batching).
fn check_logprobs(g: &Generation, alone: &Generation, greedy: bool, what: &str) {
    if alone.logprobs.is_empty() {
        assert!(g.logprobs.is_empty(), "{what}: logprobs nobody asked for");
        return;
    }
    assert_eq!(g.logprobs.len(), g.ids.len(), "{what}: one logprob per token");
    for (t, &id) in g.logprobs.iter().zip(&g.ids) {
        assert_eq!(t.id, id);
        assert!(t.logprob <= 0.0, "{what}: logprob {} > 0", t.logprob);
        assert_eq!(t.top.len(), 3, "{what}: three alternatives");
        assert!(t.top.windows(2).all(|w| w[0].1 >= w[1].1), "{what}: top list not sorted: {:?}", t.top);
        assert!(t.logprob <= t.top[0].1 + 1e-6, "{what}: the token beats the top of the list");
        if greedy {
            assert_eq!(t.top[0].0, id, "{what}: a greedy token is the most likely one");
        }
    }
    if greedy {
        for (a, b) in g.logprobs.iter().zip(&alone.logprobs) {
            assert!((a.logprob - b.logprob).abs() < 1e-3, "{what}: {} vs {} alone", a.logprob, b.logprob);
        }
    }
}

#[test]
fn every_request_gets_what_it_gets_alone_at_any_batch_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, tok) = tiny(dir.path());
    let want = alone(&model, &tok);
    for max_batch in [1, 3, 8] {
        let long: Vec<u32> = (0..600u32).map(|i| i % 1000 + 10).collect();
        let extra = vec![(100, long, None), (101, requests()[0].0.clone(), Some(4))];
        let (got, stats) = scheduled(&model, &tok, max_batch, extra);
        assert_eq!(got.len(), 14, "batch {max_batch}: every request ended");
        for (i, w) in want.iter().enumerate() {
            let (g, streamed) = &got[&i];
            let g = g.as_ref().unwrap_or_else(|e| panic!("batch {max_batch}, request {i} failed: {e}"));
            if i % 3 != 1 {
                // Greedy: the same tokens. (Sampling from a random model's nearly flat
                // distribution turns differences in the last bits of the logits into other
                // tokens, so sampled requests are held to their length and seed alone.)
                assert_eq!(g.ids, w.ids, "batch {max_batch}, request {i}: tokens differ from alone");
                assert_eq!(g.text, w.text, "batch {max_batch}, request {i}: text differs");
            } else {
                assert_eq!(g.ids.len(), w.ids.len(), "batch {max_batch}, request {i}: length differs");
            }
            assert_eq!(g.finish, w.finish, "batch {max_batch}, request {i}: finish differs");
            check_logprobs(g, w, i % 3 != 1, &format!("batch {max_batch}, request {i}"));
            assert_eq!(streamed, &g.text, "batch {max_batch}, request {i}: streamed pieces join to the text");
            assert_eq!(g.stats.prompt_tokens, requests()[i].0.len());
        }
        let (too_long, _) = &got[&100];
        let e = too_long.as_ref().expect_err("a 600-token prompt in a 512 context fails");
        assert!(e.contains("context is 512"), "{e}");
        let (cancelled, _) = &got[&101];
        let c = cancelled.as_ref().expect("cancel is not an error");
        assert_eq!(c.finish, FinishReason::Cancelled);
        assert_eq!(c.ids.len(), 4, "cancelled at its fourth token");
        assert_eq!(c.ids[..], want[0].ids[..4], "the cancelled request's tokens before it left");
        assert!(stats.max_seqs_in_step <= max_batch, "batch {max_batch}: a step held {}", stats.max_seqs_in_step);
        if max_batch > 1 {
            assert!(stats.max_seqs_in_step > 1, "batch {max_batch}: no step ran more than one sequence");
        }
        println!(
            "batch {max_batch}: {} steps, {} tokens fed ({} decode), at most {} sequences a step",
            stats.steps, stats.tokens_fed, stats.decode_tokens, stats.max_seqs_in_step
        );
    }
}

#[test]
fn speculating_requests_beside_plain_ones_give_plain_greedy_tokens() {
    // Prompts that repeat themselves, so prompt lookup drafts; every other request speculates
    // (its verification forwards run alone), the others share the batched steps.
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, tok) = tiny(dir.path());
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|r| {
            let phrase: Vec<u32> = (0..7).map(|i| (i * 331 + r * 977 + 5) % 4000 + 100).collect();
            phrase.iter().cycle().take(40 + r as usize * 9).copied().collect()
        })
        .collect();
    let plain = GenerateParams {
        max_new_tokens: 24,
        sampling: SamplingParams::greedy(),
        eos_token_ids: Vec::new(),
        stop: Vec::new(),
        harmony: None,
        cancel: None,
        speculate: None,
        logprobs: None,
        grammar: None,
    };
    let want: Vec<Generation> = prompts
        .iter()
        .map(|p| {
            let mut s = Session::new(model.clone()).expect("session");
            generate(&mut s, &tok, p, &plain, &mut |_| ControlFlow::Continue(())).expect("alone")
        })
        .collect();
    let m = model.clone();
    let cfg = SchedulerConfig { max_batch: 4, step_tokens: 32 };
    let mut sched = Scheduler::new(model.clone(), tok.clone(), cfg, Box::new(move || Session::new(m.clone())));
    let out: Results = Arc::default();
    for (key, prompt) in prompts.iter().enumerate() {
        let speculate = (key % 2 == 0).then(|| {
            ollm_engine::SpeculateParams::new(ollm_engine::Speculate::Ngram, ollm_engine::DraftTokens::Fixed(4))
        });
        let params = GenerateParams { speculate, ..plain.clone() };
        let sink = Collect { key, streamed: String::new(), cancel_after: None, tokens: 0, out: out.clone() };
        sched.submit(Request { prompt: prompt.clone(), params, sink: Box::new(sink) });
    }
    sched.run_until_idle();
    let got = std::mem::take(&mut *out.lock().expect("lock"));
    for (i, w) in want.iter().enumerate() {
        let (g, streamed) = &got[&i];
        let g = g.as_ref().unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!(g.ids, w.ids, "request {i} (speculating: {}): tokens differ from plain greedy", i % 2 == 0);
        assert_eq!(&g.text, streamed, "request {i}: streamed pieces join to the text");
        if i % 2 == 0 {
            let s = g.stats.speculation.expect("speculation stats");
            assert!(s.tokens_per_pass() > 1.0, "request {i}: prompt lookup never drafted a kept token: {s:?}");
        } else {
            assert!(g.stats.speculation.is_none());
        }
    }
}

/// Five requests over one 300-token document with different questions, admitted together:
/// the first prefills the document, the others wait for it, attach to its first 256 positions
/// (one shared block) and feed only the rest. Each gets the tokens it gets alone, and the
/// sessions hold the prefix once: fewer KV bytes at the peak than with sharing off, whose
/// sequences each hold it.
#[test]
fn sequences_over_one_document_share_its_prefix_and_get_what_they_get_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (model, tok) = tiny(dir.path());
    let (on, off) = share_one_document(&model, &tok, 300, 64);
    // 4 layers × K and V × 2 heads × 16 dims × 4 bytes per position: the 4 attached sequences'
    // 256 shared positions are held once, not 4 more times.
    let per_position = 4 * 2 * 2 * 16 * 4;
    assert!(on.peak_kv_bytes + 3 * 256 * per_position <= off.peak_kv_bytes, "{on:?} vs {off:?}");
}

/// The same over a Gemma 3 with a 64-position sliding window (3 layers of 4 slide) and over a
/// Qwen3-Next (DeltaNet state; 2 attention layers of 8): the donor's prompt chunks stop at the
/// shared prefix's end (its windows and state must be there when it shares), each attached
/// sequence gets its copy of the state there, and every sequence's tokens are those it gets
/// alone.
#[test]
fn windowed_and_recurrent_models_share_a_document_prefix_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gemma = dir.path().join("gemma3");
    let config = serde_json::json!({
        "architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
        "vocab_size": 128256, "max_position_embeddings": 4096, "sliding_window": 64,
        "sliding_window_pattern": 4, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": 32, "final_logit_softcapping": 30.0, "eos_token_id": 1,
    });
    write_plan(&plan_gemma3(config, None).expect("plan"), &gemma, 13, &mut |_, _| {}).expect("write");
    let next = dir.path().join("qwen3-next");
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
        ("num_experts", 4),
        ("num_experts_per_tok", 2),
        ("moe_intermediate_size", 32),
        ("shared_expert_intermediate_size", 32),
        ("max_position_embeddings", 4096),
    ] {
        config[k] = v.into();
    }
    write_plan(&plan_qwen3_next(config, Some(8)).expect("plan"), &next, 9, &mut |_, _| {}).expect("write");
    for d in [gemma, next] {
        let model = load_model(&d, Arc::new(CpuBackend::new())).expect("load");
        let tok = Arc::new(Tokenizer::from_dir(&d).expect("tokenizer"));
        // The donor's 96-token chunks would pass 256 at 288 unless stopped there.
        let (on, off) = share_one_document(&model, &tok, 300, 96);
        assert!(on.peak_kv_bytes < off.peak_kv_bytes, "{}: {on:?} vs {off:?}", d.display());
    }
}

/// Runs five requests over one document of `doc_len` tokens (then 5, 8, .. question tokens)
/// through the scheduler with sharing on and off (batch 5, `step_tokens` a step); asserts each
/// gets the tokens it gets alone and that four attached to the first 256 positions. Returns
/// the stats with sharing on and off.
fn share_one_document(
    model: &Arc<dyn CausalLm>,
    tok: &Arc<Tokenizer>,
    doc_len: u32,
    step_tokens: usize,
) -> (SchedulerStats, SchedulerStats) {
    let doc: Vec<u32> = (0..doc_len).map(|i| (i * 31 + 7) % 4000 + 100).collect();
    let prompts: Vec<Vec<u32>> = (0..5u32)
        .map(|q| doc.iter().copied().chain((0..5 + 3 * q).map(|i| (i * 17 + q * 911) % 4000 + 100)).collect())
        .collect();
    let params = GenerateParams { max_new_tokens: 8, ..requests()[0].1.clone() };
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut s = Session::new(model.clone()).expect("session");
            generate(&mut s, tok, p, &params, &mut |_| ControlFlow::Continue(())).expect("alone").ids
        })
        .collect();
    let run = |share: bool| {
        let m = model.clone();
        let cfg = SchedulerConfig { max_batch: 5, step_tokens };
        let mut sched = Scheduler::new(model.clone(), tok.clone(), cfg, Box::new(move || Session::new(m.clone())))
            .with_prefix_sharing(share);
        let out: Results = Arc::default();
        for (key, prompt) in prompts.iter().enumerate() {
            let sink = Collect { key, streamed: String::new(), cancel_after: None, tokens: 0, out: out.clone() };
            sched.submit(Request { prompt: prompt.clone(), params: params.clone(), sink: Box::new(sink) });
        }
        sched.run_until_idle();
        let got = std::mem::take(&mut *out.lock().expect("lock"));
        let ids: Vec<Vec<u32>> = (0..prompts.len())
            .map(|k| got[&k].0.as_ref().map(|g| g.ids.clone()).unwrap_or_else(|e| panic!("request {k}: {e}")))
            .collect();
        (ids, sched.stats().clone())
    };
    let (shared_ids, on) = run(true);
    let (private_ids, off) = run(false);
    assert_eq!(shared_ids, want, "sharing changed the tokens");
    assert_eq!(private_ids, want);
    assert_eq!((on.shared_attached, on.shared_positions), (4, 4 * 256), "{on:?}");
    assert_eq!(off.shared_attached, 0);
    assert!(on.peak_kv_unshared_bytes > on.peak_kv_bytes, "{on:?}");
    eprintln!("peak KV held: {} B shared, {} B private", on.peak_kv_bytes, off.peak_kv_bytes);
    (on, off)
}

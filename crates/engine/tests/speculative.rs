//! Speculative decoding on synthesised models (random weights) of every family, on the CPU:
//! greedy output equals plain greedy output token for token (n-gram drafts, a smaller random
//! draft model, the target as its own draft), with the KV cache on the device, spilled to disk
//! in blocks of 16, and in sliding windows past their front; eos and stop strings inside an
//! accepted run; the prefix cache; a recurrent state rolled back; a refused draft; sampling
//! frequencies of speculative and plain decoding (chi-square).

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use ollm_engine::{
    DraftModel, DraftTokens, GenerateParams, Generation, SamplingParams, Session, Speculate, SpeculateParams, generate,
};
use ollm_kv::{KvOffload, PrefixConfig};
use ollm_models::synth::{Like, plan_gpt_oss, plan_llama, plan_qwen3_next, write_plan};
use ollm_models::{CausalLm, load_model, load_model_placed};
use ollm_ops::cpu::CpuBackend;
use ollm_residency::plan::Placement;
use ollm_tokenizer::Tokenizer;

const VOCAB: u32 = 300;

/// Writes a synthesised model of a family: directory, layers, seed.
type Write = fn(&Path, usize, u64);

fn llama(dir: &Path, layers: usize, seed: u64) {
    let mut config = Like::Llama32_1B.config();
    for (k, v) in [("hidden_size", 64), ("intermediate_size", 96), ("num_attention_heads", 4), ("head_dim", 16)] {
        config[k] = v.into();
    }
    config["num_key_value_heads"] = 2.into();
    config["vocab_size"] = VOCAB.into();
    // A head of its own: a tied one makes a random model repeat its last token forever.
    config["tie_word_embeddings"] = false.into();
    write_plan(&plan_llama(config, Some(layers)).expect("plan"), dir, seed, &mut |_, _| {}).expect("write");
}

/// GPT-OSS with sliding-window layers (window 16) between full ones.
fn gpt_oss(dir: &Path, layers: usize, seed: u64) {
    let mut config = Like::GptOss20B.config();
    for (k, v) in [
        ("hidden_size", 64),
        ("intermediate_size", 64),
        ("num_attention_heads", 8),
        ("num_key_value_heads", 2),
        ("head_dim", 16),
        ("num_local_experts", 8),
        ("num_experts_per_tok", 2),
        ("vocab_size", VOCAB as usize),
        ("max_position_embeddings", 4096),
        ("sliding_window", 16),
    ] {
        config[k] = v.into();
    }
    write_plan(&plan_gpt_oss(config, Some(layers)).expect("plan"), dir, seed, &mut |_, _| {}).expect("write");
}

/// Qwen3-Next: DeltaNet (recurrent) layers and attention layers.
fn qwen3_next(dir: &Path, layers: usize, seed: u64) {
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
        ("num_experts", 8),
        ("num_experts_per_tok", 2),
        ("moe_intermediate_size", 32),
        ("shared_expert_intermediate_size", 32),
        ("vocab_size", VOCAB as usize),
        ("max_position_embeddings", 4096),
    ] {
        config[k] = v.into();
    }
    write_plan(&plan_qwen3_next(config, Some(layers)).expect("plan"), dir, seed, &mut |_, _| {}).expect("write");
}

fn load(dir: &Path) -> (Arc<dyn CausalLm>, Tokenizer) {
    (load_model(dir, Arc::new(CpuBackend::new())).expect("load"), Tokenizer::from_dir(dir).expect("tokenizer"))
}

fn params(max_new_tokens: usize, speculate: Option<SpeculateParams>) -> GenerateParams {
    GenerateParams {
        max_new_tokens,
        sampling: SamplingParams::greedy(),
        eos_token_ids: Vec::new(),
        stop: Vec::new(),
        harmony: None,
        cancel: None,
        speculate,
        logprobs: None,
        grammar: None,
    }
}

fn ngram(k: DraftTokens) -> Option<SpeculateParams> {
    Some(SpeculateParams::new(Speculate::Ngram, k))
}

fn drafted_by(draft: &Arc<dyn CausalLm>, tok: &Tokenizer, k: DraftTokens) -> Option<SpeculateParams> {
    let model = DraftModel::new(draft.clone(), tok, tok).expect("same tokenizer");
    Some(SpeculateParams::new(Speculate::Draft(Arc::new(model)), k))
}

/// [`drafted_by`] drafting chains only (no sibling candidates).
fn drafted_by_chain(draft: &Arc<dyn CausalLm>, tok: &Tokenizer, k: DraftTokens) -> Option<SpeculateParams> {
    drafted_by(draft, tok, k).map(|p| SpeculateParams { trees: false, ..p })
}

fn run(session: &mut Session, tok: &Tokenizer, prompt: &[u32], p: &GenerateParams) -> Generation {
    generate(session, tok, prompt, p, &mut |_| ControlFlow::Continue(())).expect("generate")
}

/// A prompt that repeats itself, so that prompt lookup finds continuations.
fn prompt(len: usize) -> Vec<u32> {
    let phrase: Vec<u32> = (0..37u32).map(|i| (i * 53 + 11) % VOCAB).collect();
    phrase.iter().copied().cycle().take(len).collect()
}

/// Plain greedy and speculative greedy give the same tokens; the speculation both kept and
/// rejected drafts (so both paths of the rollback ran). Returns the speculative counts.
fn same_as_plain(
    model: &Arc<dyn CausalLm>,
    tok: &Tokenizer,
    prompt: &[u32],
    n: usize,
    spec: Option<SpeculateParams>,
    what: &str,
) -> ollm_engine::SpecStats {
    let plain = run(&mut Session::new(model.clone()).expect("session"), tok, prompt, &params(n, None));
    let fast = run(&mut Session::new(model.clone()).expect("session"), tok, prompt, &params(n, spec));
    assert_eq!(fast.ids, plain.ids, "{what}: speculative greedy differs from plain greedy");
    assert_eq!(fast.finish, plain.finish, "{what}");
    let s = fast.stats.speculation.expect("speculation stats");
    assert!(s.passes > 0 && s.passes < n, "{what}: {s:?}");
    s
}

#[test]
fn greedy_speculation_equals_plain_greedy_on_every_family() {
    let dir = tempfile::tempdir().expect("tempdir");
    let families: [(&str, Write); 3] = [("llama", llama), ("gpt-oss", gpt_oss), ("qwen3-next", qwen3_next)];
    let mut ngram_accepted = 0;
    for (name, write) in families {
        let (target_dir, draft_dir) = (dir.path().join(name), dir.path().join(format!("{name}-draft")));
        write(&target_dir, 4, 3);
        write(&draft_dir, 2, 17);
        let (model, tok) = load(&target_dir);
        let (draft, _) = load(&draft_dir);
        let p = prompt(300);
        let s = same_as_plain(&model, &tok, &p, 60, ngram(DraftTokens::Fixed(6)), &format!("{name} ngram"));
        assert!(s.drafted > 0, "{name} ngram: {s:?}");
        ngram_accepted += s.accepted;
        let s = same_as_plain(&model, &tok, &p, 40, drafted_by(&draft, &tok, DraftTokens::Fixed(4)), name);
        assert!(s.drafted > 0 && s.accepted < s.drafted, "{name} random draft: {s:?}");
        // The target as its own draft, drafting chains: every draft kept, a bonus token per pass.
        let s = same_as_plain(&model, &tok, &p, 40, drafted_by_chain(&model, &tok, DraftTokens::Fixed(4)), name);
        assert_eq!(s.accepted, s.drafted, "{name} self draft: {s:?}");
        assert!(s.tokens_per_pass() > 4.0, "{name} self draft: {s:?}");
        let s = same_as_plain(&model, &tok, &p, 60, ngram(DraftTokens::Auto), &format!("{name} auto"));
        assert!(s.drafted > 0, "{name} auto: {s:?}");
    }
    assert!(ngram_accepted > 0, "no family's output repeated itself: the n-gram drafts were never kept");
}

/// Drafts as trees (a draft model's chain with sibling candidates near the root, the n-gram
/// lookup's several continuations): speculative greedy output equals plain greedy on every
/// family; Llama and GPT-OSS verify trees in one forward (every pass with the draft model
/// branches), Qwen3-Next falls back to chains. Some kept path runs through a later sibling, so
/// its tail rides along in the next forward (`branch_refed`). Tokens per pass are counted
/// right: the generation is the first token plus, per pass, the kept drafts and the target's.
#[test]
fn tree_speculation_equals_plain_greedy_and_counts_tokens_per_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    let families: [(&str, Write, bool); 3] =
        [("llama", llama, true), ("gpt-oss", gpt_oss, true), ("qwen3-next", qwen3_next, false)];
    let mut branch_refed = 0;
    for (name, write, trees) in families {
        let (target_dir, draft_dir) = (dir.path().join(name), dir.path().join(format!("{name}-draft")));
        write(&target_dir, 4, 3);
        // The draft: the target's first layer alone (the same seed writes the same tensors), so
        // its runner-up candidates are sometimes the target's choice.
        write(&draft_dir, 1, 3);
        let (model, tok) = load(&target_dir);
        let (draft, _) = load(&draft_dir);
        assert_eq!(model.supports_tree(), trees, "{name}");
        let p = prompt(300);
        for (what, spec, n) in [
            ("shallow draft", drafted_by(&draft, &tok, DraftTokens::Fixed(9)), 50),
            ("self draft", drafted_by(&model, &tok, DraftTokens::Fixed(9)), 50),
            ("ngram", ngram(DraftTokens::Fixed(12)), 60),
        ] {
            let what = format!("{name} {what}");
            let plain = run(&mut Session::new(model.clone()).expect("session"), &tok, &p, &params(n, None));
            let fast = run(&mut Session::new(model.clone()).expect("session"), &tok, &p, &params(n, spec));
            assert_eq!(fast.ids, plain.ids, "{what}: speculative greedy differs from plain greedy");
            let s = fast.stats.speculation.expect("speculation stats");
            assert_eq!(fast.ids.len(), 1 + s.passes + s.accepted, "{what}: {s:?}");
            assert!(s.passes < n, "{what}: {s:?}");
            if what.ends_with("draft") {
                // Every pass branches but the last few, drafting fewer than 3 (the tokens left).
                let ok = if trees { s.tree_passes + 3 >= s.passes } else { s.tree_passes == 0 };
                assert!(ok, "{what}: {s:?}");
            }
            if what.ends_with("self draft") {
                // Alternates: 3 at the root beside a chain of 6, all of which is kept.
                assert!(s.tokens_per_pass() > if trees { 6.0 } else { 9.0 }, "{what}: {s:?}");
            }
            branch_refed += s.branch_refed;
            println!("{what}: {s:?}");
        }
    }
    println!("kept paths through a later sibling: {branch_refed} tokens fed again");
}

/// A drafter that knows the greedy continuation (`truth`, the whole sequence) and hides it in
/// a later branch: the root's first child is a wrong token with a wrong child, the second child
/// starts the right `depth` tokens. Every pass keeps a path that left the verified rows' order.
#[derive(Debug)]
struct SecondBranch {
    truth: Vec<u32>,
    depth: usize,
}

impl ollm_engine::speculative::Drafter for SecondBranch {
    fn draft(&mut self, _: &[u32], _: usize) -> ollm_engine::Result<ollm_engine::speculative::Draft> {
        Ok(ollm_engine::speculative::Draft::default())
    }

    fn draft_tree(&mut self, context: &[u32], k: usize) -> ollm_engine::Result<ollm_engine::speculative::Draft> {
        let right: Vec<u32> =
            self.truth.iter().skip(context.len()).take(self.depth.min(k.saturating_sub(2))).copied().collect();
        let Some(&first) = right.first() else { return Ok(ollm_engine::speculative::Draft::default()) };
        let wrong = (first + 1) % VOCAB;
        let mut tokens = vec![wrong, (wrong + 1) % VOCAB];
        let mut parents = vec![None, Some(0)];
        for (i, &t) in right.iter().enumerate() {
            tokens.push(t);
            parents.push(if i == 0 { None } else { Some(1 + i) });
        }
        Ok(ollm_engine::speculative::Draft { tokens, probs: Vec::new(), parents })
    }
}

/// `n` greedy tokens after `prompt`, the first from the prefill, the rest from `spec`'s rounds.
fn greedy_rounds(spec: &mut ollm_engine::Speculator, model: Arc<dyn CausalLm>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut session = Session::new(model).expect("session");
    let logits = session.prefill(prompt).expect("prefill");
    let mut pending = ollm_engine::sampling::argmax(&logits);
    let mut sampler = ollm_engine::Sampler::new(SamplingParams::greedy()).expect("greedy");
    let mut out = vec![pending];
    while out.len() < n {
        let got = spec.step(&mut session, pending, n - out.len(), &mut sampler, None).expect("round");
        pending = *got.last().expect("a token");
        out.extend(got);
    }
    out.truncate(n);
    out
}

/// Kept paths that run through a later sibling: their rows are not where the path's positions
/// are, so the cache is truncated to the pending token and the path is fed again with the next
/// forward. The tokens equal plain greedy decoding on Llama with the KV spilled to disk in
/// blocks of 16 and on GPT-OSS whose sliding windows dropped their front, and each pass keeps
/// the whole hidden path.
#[test]
fn paths_through_a_later_branch_ride_along_in_the_next_forward() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = dir.path().join("spill");
    let kv = |layers| Placement {
        kv: Some(KvOffload { block: 16, ram_bytes: 0, spill_dir: spill.clone(), window_positions: 0 }),
        ..Placement::resident(layers)
    };
    let backend = || -> Arc<dyn ollm_ops::Backend> { Arc::new(CpuBackend::new()) };
    let (ld, gd) = (dir.path().join("llama"), dir.path().join("gpt-oss"));
    llama(&ld, 3, 3);
    gpt_oss(&gd, 3, 5);
    let tok = Tokenizer::from_dir(&ld).expect("tokenizer");
    let cases = [
        ("llama, KV spilled", load_model_placed(&ld, backend(), Some(&kv(3))).expect("llama"), prompt(100)),
        ("gpt-oss, sliding windows", load_model_placed(&gd, backend(), None).expect("gpt-oss"), prompt(1200)),
    ];
    for (what, model, p) in cases {
        let n = 40;
        let plain = run(&mut Session::new(model.clone()).expect("session"), &tok, &p, &params(n, None));
        let truth: Vec<u32> = p.iter().chain(&plain.ids).copied().collect();
        let mut spec =
            ollm_engine::Speculator::with_drafter(Box::new(SecondBranch { truth, depth: 3 }), DraftTokens::Fixed(5));
        let out = greedy_rounds(&mut spec, model.clone(), &p, n);
        assert_eq!(out, plain.ids, "{what}");
        let s = *spec.stats();
        // Every kept draft was in the second branch (fed again); the hidden path was kept whole
        // (3 tokens) but in the last rounds, where fewer tokens were left to draft.
        assert!(s.tree_passes > 5 && s.branch_refed == s.accepted, "{what}: {s:?}");
        assert!(s.accepted >= 3 * (s.tree_passes - 2), "{what}: {s:?}");
        println!("{what}: {s:?}");
    }
}

/// Drafts a token that is never the target's (the truth's next token plus one).
#[derive(Debug)]
struct AlwaysWrong {
    truth: Vec<u32>,
}

impl ollm_engine::speculative::Drafter for AlwaysWrong {
    fn draft(&mut self, context: &[u32], k: usize) -> ollm_engine::Result<ollm_engine::speculative::Draft> {
        let next = self.truth.get(context.len()).map_or(0, |t| (t + 1) % VOCAB);
        Ok(ollm_engine::speculative::Draft::chain(vec![next; k.min(4)], Vec::new()))
    }
}

/// A recurrent model whose every draft is rejected is restored to each round's start, so the
/// kept tokens ride along again; the backlog stays bounded (a round past the bound drafts nothing
/// and feeds it all) and the tokens are plain greedy's.
#[test]
fn a_recurrent_models_backlog_stays_bounded_when_every_draft_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    qwen3_next(dir.path(), 2, 11);
    let (model, tok) = load(dir.path());
    let p = prompt(30);
    let n = 80;
    let plain = run(&mut Session::new(model.clone()).expect("session"), &tok, &p, &params(n, None));
    let truth: Vec<u32> = p.iter().chain(&plain.ids).copied().collect();
    let mut spec = ollm_engine::Speculator::with_drafter(Box::new(AlwaysWrong { truth }), DraftTokens::Fixed(4));
    let out = greedy_rounds(&mut spec, model, &p, n);
    assert_eq!(out, plain.ids);
    let s = *spec.stats();
    assert_eq!(s.accepted, 0, "{s:?}");
    // Unbounded, round r re-feeds r tokens (about n²/2 in all); bounded, at most 32 a round.
    assert!(s.refed <= 32 * s.passes, "{s:?}");
    assert!(s.refed < n * n / 4, "the backlog grew without bound: {s:?}");
}

/// Rejected positions leave the KV cache when it lives in blocks of 16 positions, spilled to
/// disk (RAM budget 0): verification forwards cross block ends and rollbacks reach back into
/// spilled blocks. Sliding-window layers (GPT-OSS, window 16) roll back after a 1,200-token
/// prompt that made them drop their front, on the device and offloaded.
#[test]
fn rollback_across_blocks_spilled_kv_and_sliding_windows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spill = dir.path().join("spill");
    let kv = |layers| Placement {
        kv: Some(KvOffload { block: 16, ram_bytes: 0, spill_dir: spill.clone(), window_positions: 0 }),
        ..Placement::resident(layers)
    };
    let backend = || -> Arc<dyn ollm_ops::Backend> { Arc::new(CpuBackend::new()) };
    let ld = dir.path().join("llama");
    llama(&ld, 4, 3);
    let tok = Tokenizer::from_dir(&ld).expect("tokenizer");
    let dd = dir.path().join("draft");
    llama(&dd, 1, 23);
    let (draft, _) = load(&dd);
    let spilled = load_model_placed(&ld, backend(), Some(&kv(4))).expect("offloaded");
    assert!(spilled.new_state().expect("state").is_offloaded());
    let s = same_as_plain(&spilled, &tok, &prompt(100), 60, ngram(DraftTokens::Fixed(8)), "llama, KV spilled");
    assert!(s.accepted > 0, "{s:?}");
    let spec = drafted_by(&draft, &tok, DraftTokens::Fixed(8));
    let s = same_as_plain(&spilled, &tok, &prompt(100), 60, spec, "llama, KV spilled, draft model");
    assert!(s.accepted < s.drafted, "{s:?}");

    let gd = dir.path().join("gpt-oss");
    gpt_oss(&gd, 4, 5);
    let dd = dir.path().join("gpt-oss-draft");
    gpt_oss(&dd, 1, 29);
    let (draft, _) = load(&dd);
    let long = prompt(1200);
    for placement in [None, Some(kv(4))] {
        let model = load_model_placed(&gd, backend(), placement.as_ref()).expect("gpt-oss");
        let what = format!("gpt-oss sliding windows, offloaded: {}", placement.is_some());
        let spec = drafted_by(&draft, &tok, DraftTokens::Fixed(8));
        let s = same_as_plain(&model, &tok, &long, 40, spec, &what);
        assert!(s.accepted < s.drafted, "{what}: {s:?}");
    }
}

/// Qwen3-Next's recurrent state after a rejection equals the state of a run that never saw the
/// rejected tokens: the fixed state returns to the checkpoint and the kept tokens are fed again
/// with the next forward, which then gives the logits of a run that fed only kept tokens.
#[test]
fn a_recurrent_state_after_a_rejection_is_the_state_without_the_rejected_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    qwen3_next(dir.path(), 4, 9);
    let (model, _) = load(dir.path());
    let p = prompt(50);
    let mut spec = Session::new(model.clone()).expect("session");
    spec.prefill(&p).expect("prefill");
    let before = spec.checkpoint().expect("checkpoint");
    // Fed: pending 7, then drafts 8 9 10; keep 7 and 8, reject 9 and 10.
    spec.score(&[7, 8, 9, 10], None).expect("verification");
    let held = spec.roll_back(&before, 2).expect("roll back");
    assert_eq!(held, 0, "a recurrent state holds none of the kept tokens after a restore");
    assert_eq!(spec.tokens(), &p[..]);
    let got = spec.score(&[7, 8, 11], None).expect("next forward");

    let mut plain = Session::new(model.clone()).expect("session");
    plain.prefill(&p).expect("prefill");
    let want = plain.score(&[7, 8, 11], None).expect("forward");
    assert!(got == want, "logits after the rollback differ from a run without the rejected tokens");
    // Keeping every fed token needs no restore.
    let cp = spec.checkpoint().expect("checkpoint");
    spec.score(&[1, 2], None).expect("forward");
    assert_eq!(spec.roll_back(&cp, 2).expect("keep all"), 2);
    assert_eq!(spec.len(), p.len() + 5);

    // A KV-only model keeps the kept tokens in place.
    let ld = dir.path().join("llama");
    llama(&ld, 2, 4);
    let (llama, _) = load(&ld);
    let mut spec = Session::new(llama.clone()).expect("session");
    spec.prefill(&p).expect("prefill");
    let cp = spec.checkpoint().expect("checkpoint");
    spec.score(&[7, 8, 9, 10], None).expect("verification");
    assert_eq!(spec.roll_back(&cp, 2).expect("roll back"), 2);
    let got = spec.score(&[11], None).expect("next");
    let mut plain = Session::new(llama).expect("session");
    plain.prefill(&p).expect("prefill");
    plain.score(&[7, 8], None).expect("forward");
    let want = plain.score(&[11], None).expect("forward");
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff < 1e-5, "logits after a KV rollback differ by {diff}");
}

/// An eos or a stop string inside an accepted run ends the generation at the same token as plain
/// decoding does (the target as its own draft accepts every draft, so the end falls mid-run).
#[test]
fn eos_and_stop_inside_an_accepted_run_end_at_the_right_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    llama(dir.path(), 4, 3);
    let (model, tok) = load(dir.path());
    let p = prompt(80);
    let plain = run(&mut Session::new(model.clone()).expect("session"), &tok, &p, &params(30, None));
    // The first token that did not occur before, somewhere past the first pass.
    let at = (2..plain.ids.len()).find(|&i| !plain.ids[..i].contains(&plain.ids[i])).expect("a new token");
    let eos = plain.ids[at];
    let stop = tok.decode(&plain.ids[at..at + 1], false).expect("decode");
    let cases = [
        ("eos", GenerateParams { eos_token_ids: vec![eos], ..params(30, None) }),
        ("stop", GenerateParams { stop: vec![stop.clone()], ..params(30, None) }),
    ];
    for (what, plain_params) in cases {
        let want = run(&mut Session::new(model.clone()).expect("session"), &tok, &p, &plain_params);
        let spec = GenerateParams { speculate: drafted_by(&model, &tok, DraftTokens::Fixed(8)), ..plain_params };
        let got = run(&mut Session::new(model.clone()).expect("session"), &tok, &p, &spec);
        assert_eq!((&got.ids, &got.text, got.finish), (&want.ids, &want.text, want.finish), "{what}");
        assert!(got.ids.len() <= at + 1 && got.finish != ollm_engine::FinishReason::Length, "{what}: {got:?}");
    }
}

/// The prefix cache stores the prompt's blocks only: a speculative run stores what a plain one
/// does, and a later session that loads them answers as a fresh one does.
#[test]
fn the_prefix_cache_stores_no_drafted_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let md = dir.path().join("m");
    llama(&md, 4, 3);
    let (model, tok) = load(&md);
    let cfg = |name: &str| PrefixConfig { dir: dir.path().join(name), max_bytes: u64::MAX };
    let cached =
        |name: &str| Session::new(model.clone()).expect("session").with_prefix_cache(&cfg(name)).expect("cache");
    // 520 tokens: two full blocks of 256, and 8 positions into the third, which the drafts fill.
    let p = prompt(520);
    let spec = params(40, drafted_by(&model, &tok, DraftTokens::Fixed(8)));
    let plain = run(&mut cached("plain"), &tok, &p, &params(40, None));
    let fast = run(&mut cached("spec"), &tok, &p, &spec);
    assert_eq!(fast.ids, plain.ids);
    let stored = |g: &Generation| g.stats.prefix.as_ref().and_then(|r| r.stored.clone()).expect("stored").blocks;
    assert_eq!(stored(&fast), stored(&plain));
    assert_eq!(stored(&fast), 2);
    // The prompt plus the answer: the cache gives back the prompt's two blocks, not a third.
    let longer = [p.clone(), fast.ids.clone(), vec![1, 2, 3]].concat();
    let again = run(&mut cached("spec"), &tok, &longer, &params(10, None));
    assert_eq!(again.stats.prefix.as_ref().and_then(|r| r.restored.clone()).expect("restored").tokens, 512);
    let fresh = run(&mut Session::new(model.clone()).expect("session"), &tok, &longer, &params(10, None));
    assert_eq!(again.ids, fresh.ids);
}

#[test]
fn a_draft_with_another_vocabulary_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ld, qd) = (dir.path().join("llama"), dir.path().join("qwen"));
    llama(&ld, 2, 3);
    qwen3_next(&qd, 2, 3);
    let (_, llama_tok) = load(&ld);
    let (qwen, qwen_tok) = load(&qd);
    let e = DraftModel::new(qwen.clone(), &qwen_tok, &llama_tok).expect_err("another tokenizer");
    let msg = e.to_string();
    assert!(msg.contains("vocabulary") && msg.contains("tokenizer") && !msg.contains('\n'), "{msg}");
    assert!(DraftModel::new(qwen, &qwen_tok, &qwen_tok).is_ok());
}

/// Two-sample chi-square of two count tables over the same categories, bins with fewer than 10
/// counts in both pooled into one; returns (statistic, degrees of freedom).
fn two_sample_chi_square(a: &[usize], b: &[usize]) -> (f64, usize) {
    let (na, nb) = (a.iter().sum::<usize>() as f64, b.iter().sum::<usize>() as f64);
    let (mut bins, mut pool) = (Vec::new(), (0, 0));
    for (&x, &y) in a.iter().zip(b) {
        if x + y < 10 {
            pool = (pool.0 + x, pool.1 + y);
        } else {
            bins.push((x, y));
        }
    }
    if pool.0 + pool.1 > 0 {
        bins.push(pool);
    }
    let (ka, kb) = ((nb / na).sqrt(), (na / nb).sqrt());
    let stat = bins.iter().map(|&(x, y)| (ka * x as f64 - kb * y as f64).powi(2) / (x + y) as f64).sum();
    (stat, bins.len() - 1)
}

/// Chi-square's 0.1 % critical value for `df` degrees of freedom (Wilson-Hilferty: 16.55 for 3,
/// 29.76 for 10, 73.49 for 40, where the tables say 16.27, 29.59, 73.40).
fn critical(df: usize) -> f64 {
    let (k, z) = (df as f64, 3.0902);
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

/// Sampling at temperature 1 (top-k 5): the second and third generated tokens of 1,500 seeds
/// have the same frequencies with speculation (a random draft model, 3 drafts per pass, so the
/// rejection and the residual draws both run) as without. Fixed seeds, so the test is
/// deterministic; the threshold is chi-square's 0.1 % critical value for the degrees of freedom,
/// and the draft model's own frequencies (what emitting drafts unchecked would give) fail it.
#[test]
fn speculative_sampling_keeps_the_targets_token_frequencies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (td, dd) = (dir.path().join("t"), dir.path().join("d"));
    // The draft: the target's first layer alone (the same seed writes the same tensors), so its
    // top-5 overlaps the target's and drafts are both kept and rejected.
    llama(&td, 2, 3);
    llama(&dd, 1, 3);
    let (model, tok) = load(&td);
    let (draft, _) = load(&dd);
    let p: Vec<u32> = (0..12u32).map(|i| (i * 31 + 7) % VOCAB).collect();
    let sampled = |seed: u64, spec: Option<SpeculateParams>| {
        let sampling = SamplingParams { temperature: 1.0, top_k: Some(5), seed, ..SamplingParams::greedy() };
        let g = run(
            &mut Session::new(model.clone()).expect("session"),
            &tok,
            &p,
            &GenerateParams { sampling, ..params(3, spec) },
        );
        g.ids
    };
    let n = 1500u64;
    let checked = drafted_by(&draft, &tok, DraftTokens::Fixed(3));
    let spec = || checked.clone();
    let (mut plain, mut fast, mut draft_only) =
        (vec![[0usize; VOCAB as usize]; 2], vec![[0usize; VOCAB as usize]; 2], vec![[0usize; VOCAB as usize]; 2]);
    let mut accepted = 0;
    let mut drafted = 0;
    for seed in 0..n {
        let a = sampled(seed, None);
        let sampling = SamplingParams { temperature: 1.0, top_k: Some(5), seed, ..SamplingParams::greedy() };
        let g = run(
            &mut Session::new(model.clone()).expect("session"),
            &tok,
            &p,
            &GenerateParams {
                sampling: SamplingParams { seed: 1_000_000 + seed, ..sampling.clone() },
                ..params(3, spec())
            },
        );
        let st = g.stats.speculation.expect("stats");
        accepted += st.accepted;
        drafted += st.drafted;
        // What the draft model alone samples (the distribution a broken scheme would give).
        let c = run(
            &mut Session::new(draft.clone()).expect("session"),
            &tok,
            &p,
            &GenerateParams { sampling, ..params(3, None) },
        );
        for pos in 0..2 {
            plain[pos][a[pos + 1] as usize] += 1;
            fast[pos][g.ids[pos + 1] as usize] += 1;
            draft_only[pos][c.ids[pos + 1] as usize] += 1;
        }
    }
    assert!(accepted > 0 && accepted < drafted, "{accepted} of {drafted} drafts kept");
    eprintln!("{accepted} of {drafted} drafts kept");
    for pos in 0..2 {
        let (stat, df) = two_sample_chi_square(&plain[pos], &fast[pos]);
        eprintln!("token {}: chi-square {stat:.1}, {df} df, critical {:.1}", pos + 2, critical(df));
        assert!(df >= 1 && stat < critical(df), "token {}: chi-square {stat:.1} with {df} df", pos + 2);
        let (stat, df) = two_sample_chi_square(&plain[pos], &draft_only[pos]);
        assert!(stat > critical(df), "token {}: the draft's own frequencies pass too ({stat:.1}, {df} df)", pos + 2);
    }
}

/// A scheduler's round for two sequences: each proposes, one batched forward verifies both
/// (`Session::score_batch_trees`: the n-gram drafts may branch), each accepts; the tokens equal
/// each sequence's own rounds.
#[test]
fn a_batched_verification_of_two_sequences_gives_their_own_rounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    llama(dir.path(), 3, 3);
    let (model, _) = load(dir.path());
    let spec = SpeculateParams::new(Speculate::Ngram, DraftTokens::Fixed(4));
    let prompts = [prompt(60), prompt(90)[7..].to_vec()];
    let start = |p: &[u32]| {
        let mut s = Session::new(model.clone()).expect("session");
        let logits = s.prefill(p).expect("prefill");
        (s, ollm_engine::sampling::argmax(&logits))
    };
    let sampler = || ollm_engine::Sampler::new(SamplingParams::greedy()).expect("greedy");
    // Alone: twelve rounds each.
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let (mut s, mut pending) = start(p);
            let (mut sp, mut sm) =
                (ollm_engine::Speculator::new(&spec, &SamplingParams::greedy()).expect("spec"), sampler());
            let mut out = Vec::new();
            for _ in 0..12 {
                let got = sp.step(&mut s, pending, 8, &mut sm, None).expect("round");
                pending = *got.last().expect("a token");
                out.extend(got);
            }
            out
        })
        .collect();
    // Together: twelve batched rounds.
    let (mut a, pa) = start(&prompts[0]);
    let (mut b, pb) = start(&prompts[1]);
    let mut pending = [pa, pb];
    let mut specs: Vec<_> =
        (0..2).map(|_| ollm_engine::Speculator::new(&spec, &SamplingParams::greedy()).expect("spec")).collect();
    let mut samplers = [sampler(), sampler()];
    let mut together = vec![Vec::new(), Vec::new()];
    for _ in 0..12 {
        let proposals =
            [specs[0].propose(&a, pending[0], 8).expect("a"), specs[1].propose(&b, pending[1], 8).expect("b")];
        let feeds: Vec<Vec<u32>> = proposals.iter().map(|p| p.feed.clone()).collect();
        let trees: Vec<_> = proposals.iter().map(|p| p.tree.as_ref()).collect();
        let mut logits =
            Session::score_batch_trees(&mut [&mut a, &mut b], &feeds, &trees).expect("batched verification");
        let [pa, pb] = proposals;
        let ga = specs[0].accept(&mut a, pa, &mut logits[0], &mut samplers[0]).expect("accept a");
        let gb = specs[1].accept(&mut b, pb, &mut logits[1], &mut samplers[1]).expect("accept b");
        pending = [*ga.last().expect("a token"), *gb.last().expect("a token")];
        together[0].extend(ga);
        together[1].extend(gb);
    }
    assert_eq!(together, alone);
    assert!(specs.iter().any(|s| s.stats().accepted > 0), "no draft was kept: the rounds did not speculate");
}

#[test]
fn constrained_greedy_speculation_equals_plain_constrained_greedy() {
    // A grammar the prompt's own text satisfies (drafts pass the cut and are verified against
    // masked rows) and a JSON schema (most drafts are cut): either way the tokens are those of
    // plain constrained greedy decoding, and the output matches the grammar.
    let dir = tempfile::tempdir().expect("tempdir");
    llama(dir.path(), 2, 21);
    let (model, tok) = load(dir.path());
    let compiler = ollm_engine::GrammarCompiler::new(&tok, &[], VOCAB as usize).expect("vocabulary");
    let text_prompt = tok.encode(&"the cat sat on the mat and ".repeat(6), false).expect("encode");
    let schema = serde_json::json!({"type": "object", "properties": {"a": {"enum": ["the cat", "sat"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "n"], "additionalProperties": false});
    for (spec, check) in [
        (ollm_engine::GrammarSpec::Regex("[a-z ]{0,60}".into()), "letters"),
        (ollm_engine::GrammarSpec::JsonSchema(schema), "json"),
    ] {
        let grammar = Some(compiler.compile(&spec).expect("compiles"));
        let plain = GenerateParams { grammar: grammar.clone(), ..params(48, None) };
        let want = run(&mut Session::new(model.clone()).expect("session"), &tok, &text_prompt, &plain);
        for k in [DraftTokens::Fixed(4), DraftTokens::Fixed(8)] {
            let spec_params = GenerateParams { grammar: grammar.clone(), ..params(48, ngram(k)) };
            let got = run(&mut Session::new(model.clone()).expect("session"), &tok, &text_prompt, &spec_params);
            assert_eq!(got.ids, want.ids, "{check}, {k:?}: speculation changed constrained greedy output");
            assert_eq!((got.text.as_str(), got.finish), (want.text.as_str(), want.finish), "{check}");
            let s = got.stats.speculation.expect("speculation ran");
            if check == "letters" {
                assert!(s.drafted > 0, "{check}: every draft was cut ({s:?})");
                assert!(got.text.chars().all(|c| c.is_ascii_lowercase() || c == ' '), "{:?}", got.text);
            } else {
                let v: serde_json::Value = serde_json::from_str(&got.text).expect("JSON");
                assert!(v["n"].as_u64().is_some_and(|n| n <= 99), "{v}");
            }
            println!(
                "{check} {k:?}: {} tokens in {} passes, {} of {} drafts kept",
                got.ids.len(),
                s.passes,
                s.accepted,
                s.drafted
            );
        }
    }
}

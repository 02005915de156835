//! Sequences that begin with the same tokens hold that prefix's KV once (`SeqState::share_prefix`
//! and `attach`): their logits equal those of private caches (CPU, within 1e-5 of each row's
//! scale, single and batched forwards; bit for bit against a private cache fed in the same
//! chunks), the prefix's bytes are counted once however many sequences are attached, and a
//! sequence's rollback or rewind never writes to the shared part. Every family shares: full and
//! sliding-window layers (Gemma 3, GPT-OSS: across the window's edge and after the window has
//! moved past the whole prefix), recurrent state (Qwen3-Next: a copy of the state at the
//! prefix's end per sequence), on the device and offloaded (the prefix's host blocks held once,
//! spilled ones read back).

mod common;

use std::sync::Arc;

use common::batch::{Logits, assert_close, ids};
use ollm_kv::{KvOffload, held_bytes, held_bytes_split};
use ollm_models::{BatchSeq, CausalLm, LogitsWanted, SeqState, load_model_placed};
use ollm_ops::Backend;
use ollm_ops::cpu::CpuBackend;
use ollm_residency::plan::Placement;

const REL: f32 = 1e-5;
/// The shared prefix: two prefix-store blocks of the device cache.
const P: usize = 512;

fn load(write: impl Fn(&std::path::Path)) -> (tempfile::TempDir, Arc<dyn CausalLm>) {
    load_placed(write, None)
}

/// Offloaded KV: blocks of this many positions (P is a whole number of them), none kept in RAM
/// (every full block spills, so sharing reads spilled blocks back).
const OFF_BLOCK: usize = 64;

/// The model with its layers resident and, given `offload = Some(n_layers)`, its KV cache
/// offloaded in blocks of [`OFF_BLOCK`] and spilled.
fn load_placed(write: impl Fn(&std::path::Path), offload: Option<usize>) -> (tempfile::TempDir, Arc<dyn CausalLm>) {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path());
    let placement = offload.map(|n| Placement {
        kv: Some(KvOffload {
            block: OFF_BLOCK,
            ram_bytes: 0,
            spill_dir: dir.path().join("spill"),
            window_positions: 0,
        }),
        ..Placement::resident(n)
    });
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let model: Arc<dyn CausalLm> = load_model_placed(dir.path(), be, placement.as_ref()).expect("load");
    (dir, model)
}

/// A document of 600 tokens and three questions; each sequence is document + question.
fn prompts() -> (Vec<u32>, Vec<Vec<u32>>) {
    (ids(600, 1), vec![ids(7, 2), ids(30, 3), ids(1, 4)])
}

/// Each sequence alone on a private cache: the whole prompt, then 3 decoded tokens.
fn private(model: &Arc<dyn CausalLm>) -> Logits {
    let (doc, qs) = prompts();
    let mut out = Vec::new();
    for q in &qs {
        let mut st = model.new_state().expect("state");
        let prompt: Vec<u32> = doc.iter().chain(q).copied().collect();
        let mut row = vec![model.forward(&prompt, &mut st, LogitsWanted::Last, None).expect("prefill")];
        for t in 0..3 {
            row.push(model.forward(&[t + 5], &mut st, LogitsWanted::Last, None).expect("decode"));
        }
        out.push(row);
    }
    out
}

/// How much of the document the first sequence prefills before sharing P positions: P + 20,
/// but P for a recurrent model (its state must be at the prefix's end when shared).
fn first_prefill(st: &SeqState) -> usize {
    if st.has_fixed() { P } else { P + 20 }
}

/// Each sequence alone on a private cache fed in the chunks the shared run feeds it: the
/// document's first part (the first sequence's prefill, P for the others), the rest of its
/// prompt, then 3 decoded tokens; the logits of all but the first chunk.
fn private_chunked(model: &Arc<dyn CausalLm>) -> Logits {
    let (doc, qs) = prompts();
    let mut out = Vec::new();
    for (i, q) in qs.iter().enumerate() {
        let mut st = model.new_state().expect("state");
        let first = if i == 0 { first_prefill(&st) } else { P };
        model.forward(&doc[..first], &mut st, LogitsWanted::Last, None).expect("first part");
        let rest: Vec<u32> = doc[first..].iter().chain(q).copied().collect();
        let mut row = vec![model.forward(&rest, &mut st, LogitsWanted::Last, None).expect("rest")];
        for t in 0..3 {
            row.push(model.forward(&[t + 5], &mut st, LogitsWanted::Last, None).expect("decode"));
        }
        out.push(row);
    }
    out
}

/// The first sequence prefills the document and shares its first P positions; the others
/// attach and feed only the rest. `batched`: the rests and every decode step go through one
/// batched forward each (the first sequence's part too); else one sequence at a time.
fn shared(model: &Arc<dyn CausalLm>, batched: bool) -> (Logits, Vec<SeqState>) {
    let be = model.backend();
    let (doc, qs) = prompts();
    let mut states: Vec<SeqState> = (0..qs.len()).map(|_| model.new_state().expect("state")).collect();
    model.forward(&doc[..first_prefill(&states[0])], &mut states[0], LogitsWanted::Last, None).expect("first prefill");
    let pre = states[0].share_prefix(be, P).expect("share");
    for st in &mut states[1..] {
        st.attach(be, pre.clone()).expect("attach");
        assert_eq!(st.len(), P);
    }
    let rests: Vec<Vec<u32>> =
        qs.iter().enumerate().map(|(i, q)| doc[states[i].len()..].iter().chain(q).copied().collect()).collect();
    let mut out: Logits = vec![Vec::new(); qs.len()];
    let feeds: Vec<Vec<Vec<u32>>> = std::iter::once(rests).chain((0..3).map(|t| vec![vec![t + 5]; qs.len()])).collect();
    for feed in feeds {
        if batched {
            let mut items: Vec<BatchSeq<'_>> =
                states.iter_mut().zip(&feed).map(|(st, ids)| BatchSeq::new(ids, st, LogitsWanted::Last)).collect();
            for (i, l) in model.forward_batch(&mut items).expect("batch").into_iter().enumerate() {
                out[i].push(l);
            }
        } else {
            for (i, (st, ids)) in states.iter_mut().zip(&feed).enumerate() {
                out[i].push(model.forward(ids, st, LogitsWanted::Last, None).expect("forward"));
            }
        }
    }
    (out, states)
}

fn check_family(name: &str, write: impl Fn(&std::path::Path)) {
    check_family_placed(name, write, None);
}

/// [`check_family`] with the KV cache on the device (`offload` None) or offloaded and spilled
/// (`Some(n_layers)`): shared logits within 1e-5 of the private ones fed whole, and one
/// sequence at a time bit for bit those of a private cache fed in the same chunks.
fn check_family_placed(name: &str, write: impl Fn(&std::path::Path), offload: Option<usize>) {
    let (_dir, model) = load_placed(write, offload);
    let vocab = model.info().vocab_size;
    let want = private(&model);
    let chunked = private_chunked(&model);
    for batched in [false, true] {
        let (got, states) = shared(&model, batched);
        let what = format!("{name}, offloaded {}, shared prefix, batched {batched}", offload.is_some());
        let worst = assert_close(&want, &got, (vocab, REL, 0), &what);
        eprintln!("{what}: worst {worst:.2e} of the scale");
        assert!(states.iter().all(|s| s.shared_len() == P), "{what}");
        assert!(states.iter().all(|s| s.is_offloaded() == offload.is_some()), "{what}");
        if !batched {
            assert_eq!(got, chunked, "{what}: not bit for bit the private cache fed in the same chunks");
        }
    }
}

#[test]
fn logits_over_a_shared_prefix_equal_private_caches_for_llama() {
    check_family("llama", common::tiny_model);
}

#[test]
fn logits_over_a_shared_prefix_equal_private_caches_for_qwen2_and_qwen3() {
    check_family("qwen2", |d| common::tiny_qwen(d, "Qwen2ForCausalLM"));
    check_family("qwen3", |d| common::tiny_qwen(d, "Qwen3ForCausalLM"));
}

/// N sequences attached to a P-position prefix hold P positions once: the prefix's bytes are
/// P positions' worth, each state's own caches hold none of them, and `held_bytes` counts the
/// prefix once; private caches hold it N times.
#[test]
fn a_shared_prefix_is_held_once() {
    let (_dir, model) = load(common::tiny_model);
    let be = model.backend();
    let (_, states) = shared(&model, true);
    let pre = states[0].shared_prefix().expect("attached").clone();
    // 6 layers × (K + V) × 2 KV heads × 16 dims × 4 bytes (f32 on the CPU) per position.
    let per_position = 6 * 2 * 2 * 16 * 4;
    assert_eq!(pre.size_bytes(), P * per_position);
    assert_eq!(pre.len(), P);
    let own: usize = states.iter().map(SeqState::size_bytes).sum();
    assert_eq!(held_bytes(&states), own + P * per_position, "the prefix counted once");
    for s in &states {
        assert!(s.size_bytes() < s.len() * per_position, "own caches hold positions from P on only");
    }
    // The same sequences on private caches hold the prefix once each.
    for s in &states[1..] {
        assert_eq!(s.size_bytes(), 256 * per_position, "an attached state's own caches start at 256 rows");
    }
    // The same sequences on private caches hold the prefix once each.
    let private_bytes: usize = states
        .iter()
        .map(|s| {
            let mut p = model.new_state().expect("state");
            p.reserve(be, s.len()).expect("reserve");
            p.size_bytes()
        })
        .sum();
    assert!(private_bytes >= states.len() * P * per_position, "{private_bytes}");
}

/// A rollback (speculative decoding drops a tail) and a rewind below the prefix never write to
/// the shared caches: their values stay as they were, the others attached to them still get
/// the private logits, and going below P lets go of the prefix (empty state, detached).
#[test]
fn rollback_and_rewind_never_touch_the_shared_part() {
    let (_dir, model) = load(common::tiny_model);
    let be = model.backend();
    let (doc, _) = prompts();
    let (_, mut states) = shared(&model, false);
    let pre = states[1].shared_prefix().expect("attached").clone();
    let snapshot = |st: &mut SeqState| -> Vec<f32> {
        let kv = st.layer_mut(0);
        let pl = kv.prefix.as_ref().expect("prefix layer");
        be.to_host_f32(pl.k()).expect("k").into_iter().chain(be.to_host_f32(pl.v()).expect("v")).collect()
    };
    let before = snapshot(&mut states[2]);
    // Roll sequence 1 back by two tokens and feed two others; it stays attached.
    let len = states[1].len();
    states[1].truncate(len - 2);
    assert_eq!((states[1].len(), states[1].shared_len()), (len - 2, P));
    let again = model.forward(&[40, 41], &mut states[1], LogitsWanted::Last, None).expect("refeed");
    // The same tokens on a private cache.
    let mut private = model.new_state().expect("state");
    let mut tokens: Vec<u32> = doc.iter().chain(&prompts().1[1]).copied().collect();
    tokens.extend([5, 6]);
    tokens.truncate(len - 2);
    tokens.extend([40, 41]);
    let want = model.forward(&tokens, &mut private, LogitsWanted::Last, None).expect("private");
    assert_close(&vec![vec![want]], &vec![vec![again]], (model.info().vocab_size, REL, 0), "after a rollback");
    // Going below the prefix forgets everything and lets go of it (the state and its 6 layers
    // held a reference each).
    let refs = Arc::strong_count(&pre);
    states[1].truncate(P - 1);
    assert_eq!((states[1].len(), states[1].shared_len()), (0, 0));
    assert!(states[1].shared_prefix().is_none());
    assert_eq!(states[1].min_len(), 0);
    // The prefix is the same bytes, still held by the others.
    assert_eq!(snapshot(&mut states[2]), before, "the shared caches changed");
    assert_eq!(Arc::strong_count(&pre), refs - 7, "sequence 1 let go; 0 and 2 hold it");
    // The detached state works as a fresh one.
    let fresh = model.forward(&doc[..9], &mut states[1], LogitsWanted::Last, None).expect("fresh");
    let mut p2 = model.new_state().expect("state");
    let want = model.forward(&doc[..9], &mut p2, LogitsWanted::Last, None).expect("private");
    assert_close(&vec![vec![want]], &vec![vec![fresh]], (model.info().vocab_size, REL, 0), "after detaching");
}

/// Offloaded caches share too: the prefix's blocks are held once in RAM (spilled ones read
/// back), each attached sequence's window loads them as its own.
#[test]
fn logits_over_a_shared_offloaded_prefix_equal_private_offloaded_caches() {
    check_family_placed("llama", common::tiny_model, Some(6));
}

/// Sliding-window layers share the tail of the prefix their window still sees. Window 32: the
/// rest's first rows straddle the prefix's end, later ones see none of it; window 160: the
/// decode steps still see the prefix's tail.
#[test]
fn logits_over_a_shared_prefix_equal_private_caches_for_gemma3() {
    for w in [32, 160] {
        check_family(&format!("gemma3 window {w}"), |d| common::tiny_gemma3(d, w));
    }
    check_family_placed("gemma3 window 32", |d| common::tiny_gemma3(d, 32), Some(4));
}

/// GPT-OSS: sliding and full layers alternate, with sinks.
#[test]
fn logits_over_a_shared_prefix_equal_private_caches_for_gpt_oss() {
    for w in [32, 160] {
        check_family(&format!("gpt-oss window {w}"), |d| common::tiny_gpt_oss(d, w));
    }
    check_family_placed("gpt-oss window 32", |d| common::tiny_gpt_oss(d, 32), Some(4));
}

/// Qwen3-Next: the attention layers' KV is shared, each attached sequence starts from its own
/// copy of the DeltaNet state at the prefix's end.
#[test]
fn logits_over_a_shared_prefix_equal_private_caches_for_qwen3_next() {
    check_family("qwen3-next", common::tiny_qwen3_next);
    check_family_placed("qwen3-next", common::tiny_qwen3_next, Some(8));
}

/// A recurrent state past the prefix's end no longer has the state at it: sharing is refused
/// in one line naming both positions, and the state is unchanged (it goes on as before).
#[test]
fn a_recurrent_state_shares_only_at_the_prefix_end() {
    let (_dir, model) = load(common::tiny_qwen3_next);
    let (doc, _) = prompts();
    let mut st = model.new_state().expect("state");
    model.forward(&doc[..P + 20], &mut st, LogitsWanted::Last, None).expect("prefill");
    let err = st.share_prefix(model.backend(), P).expect_err("past the end");
    assert!(err.to_string().contains(&format!("at position {}", P + 20)), "{err}");
    assert_eq!((st.len(), st.shared_len()), (P + 20, 0));
    let mut private = model.new_state().expect("state");
    let want = model.forward(&doc[..P + 21], &mut private, LogitsWanted::Last, None).expect("private");
    let got = model.forward(&doc[P + 20..P + 21], &mut st, LogitsWanted::Last, None).expect("on");
    assert_close(&vec![vec![want]], &vec![vec![got]], (model.info().vocab_size, REL, 0), "after a refused share");
}

/// A sliding-window layer's own rows slide over [prefix tail + own rows]; once its window has
/// moved past the whole prefix it lets go of the tail (full layers stay attached), and the
/// logits still equal a private cache's fed in the same chunks, bit for bit, at every chunk.
#[test]
fn a_window_that_moved_past_the_prefix_lets_go_of_its_tail() {
    let (_dir, model) = load(|d| common::tiny_gpt_oss(d, 32));
    let be = model.backend();
    let doc = ids(P + 1200, 1);
    let mut donor = model.new_state().expect("state");
    model.forward(&doc[..P], &mut donor, LogitsWanted::Last, None).expect("donor");
    let pre = donor.share_prefix(be, P).expect("share");
    let (mut st, mut private) = (model.new_state().expect("state"), model.new_state().expect("state"));
    st.attach(be, pre).expect("attach");
    model.forward(&doc[..P], &mut private, LogitsWanted::Last, None).expect("private prefix");
    let windowed: Vec<usize> = (0..st.shapes().len()).filter(|&l| st.shapes()[l].window.is_some()).collect();
    assert!(!windowed.is_empty() && windowed.len() < st.shapes().len());
    for chunk in doc[P..].chunks(100) {
        let got = model.forward(chunk, &mut st, LogitsWanted::All, None).expect("attached");
        let want = model.forward(chunk, &mut private, LogitsWanted::All, None).expect("private");
        assert!(got == want, "at position {}: not bit for bit", st.len());
    }
    for l in 0..st.shapes().len() {
        let attached = st.layer_mut(l).prefix.is_some();
        assert_eq!(attached, !windowed.contains(&l), "layer {l}");
    }
    assert_eq!(st.shared_len(), P);
    // The window layers moved on: a rewind may go back to a window before the end only.
    assert!(st.min_len() > P, "{}", st.min_len());
}

/// What a shared prefix holds once: a full-attention layer's P positions, a sliding-window
/// layer's last window - 1 (on the device); an offloaded cache's P / block blocks per layer, in
/// RAM, which no attached sequence counts as its own (`shared_blocks`, `held_bytes_split`).
#[test]
fn a_shared_prefix_holds_window_tails_and_offloaded_blocks_once() {
    // GPT-OSS, window 32: layers 0 and 2 slide. 2 KV heads × 16 dims × 4 bytes, K and V.
    let row = 2 * 2 * 16 * 4;
    let (_dir, model) = load(|d| common::tiny_gpt_oss(d, 32));
    let (_, states) = shared(&model, true);
    let pre = states[0].shared_prefix().expect("attached");
    assert_eq!(pre.size_bytes(), 2 * P * row + 2 * 31 * row, "two full layers' P rows, two windows' 31");
    assert_eq!(pre.host_bytes(), 0);
    // Offloaded llama: 6 layers × 8 blocks of 64 positions, each K and V of 2 heads × 16 dims.
    let (_dir, model) = load_placed(common::tiny_model, Some(6));
    let (_, states) = shared(&model, true);
    let pre = states[0].shared_prefix().expect("attached").clone();
    let block_bytes = (OFF_BLOCK * row).next_multiple_of(4096);
    assert_eq!(pre.host_bytes(), 6 * (P / OFF_BLOCK) * block_bytes);
    assert_eq!(pre.size_bytes(), 0);
    for s in &states {
        let st = s.offload_stats().expect("offloaded");
        assert_eq!(st.shared_blocks, 6 * P / OFF_BLOCK, "every attached cache points at the prefix's blocks");
    }
    let (device, host) = held_bytes_split(&states);
    let own_host: usize = states.iter().map(SeqState::host_bytes).sum();
    assert_eq!(host, own_host + pre.host_bytes(), "the prefix's blocks counted once");
    assert_eq!(device, held_bytes(&states));
}

/// The README's figure: KV bytes held by 16 sequences over one 1,536-token document, each then
/// a 20-token question and 16 decoded tokens, with private caches and with the document shared,
/// for two synthesised models whose attention layers have real shapes (tiny hidden and MLP
/// sizes; KV bytes depend only on the attention layers): Gemma 3 1B's (26 layers, 1 KV head of
/// 256, window 512 on 5 layers of 6) and GPT-OSS 20B's (24 layers, 8 KV heads of 64, window 128
/// on every other layer). f32 KV (the CPU backend's exact mode; bf16 halves every figure).
/// Every private sequence has the same length, so one is run and counted 16 times. A
/// measurement (minutes on two cores), run with `cargo test -p ollm-models --test shared_prefix
/// -- --ignored --nocapture`; the held-once accounting itself is checked by the tests above.
#[test]
#[ignore = "measurement for the README: minutes on a small CPU"]
fn kv_bytes_for_16_sequences_over_one_document_private_and_shared() {
    const DOC: usize = 1536;
    let gemma = |d: &std::path::Path| {
        let config = serde_json::json!({
            "architectures": ["Gemma3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
            "vocab_size": 300, "max_position_embeddings": 4096, "sliding_window": 512,
            "sliding_window_pattern": 6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "query_pre_attn_scalar": 256, "final_logit_softcapping": 30.0, "eos_token_id": 1,
        });
        let plan = ollm_models::synth::plan_gemma3(config, None).expect("plan");
        ollm_models::synth::write_plan(&plan, d, 13, &mut |_, _| {}).expect("write");
    };
    let gpt_oss = |d: &std::path::Path| {
        let mut config = ollm_models::synth::Like::GptOss20B.config();
        for (k, v) in [
            ("hidden_size", 64),
            ("intermediate_size", 64),
            ("num_local_experts", 4),
            ("num_experts_per_tok", 2),
            ("vocab_size", 300),
            ("max_position_embeddings", 4096),
        ] {
            config[k] = v.into();
        }
        let plan = ollm_models::synth::plan_gpt_oss(config, None).expect("plan");
        ollm_models::synth::write_plan(&plan, d, 5, &mut |_, _| {}).expect("write");
    };
    type Write<'a> = &'a dyn Fn(&std::path::Path);
    let models: [(&str, Write<'_>); 2] = [("Gemma 3 1B shape", &gemma), ("GPT-OSS 20B shape", &gpt_oss)];
    for (name, write) in models {
        let (_dir, model) = load(write);
        let be = model.backend();
        let doc = ids(DOC, 1);
        let question = |i: u32| ids(20, 10 + i);
        let decode = |st: &mut SeqState| {
            for t in 0..16 {
                model.forward(&[t + 5], st, LogitsWanted::Last, None).expect("decode");
            }
        };
        let mut private = model.new_state().expect("state");
        let prompt: Vec<u32> = doc.iter().copied().chain(question(0)).collect();
        model.forward(&prompt, &mut private, LogitsWanted::Last, None).expect("private prompt");
        decode(&mut private);
        let private_bytes = 16 * private.size_bytes();
        let mut states: Vec<SeqState> = (0..16).map(|_| model.new_state().expect("state")).collect();
        model.forward(&doc, &mut states[0], LogitsWanted::Last, None).expect("document");
        let pre = states[0].share_prefix(be, DOC).expect("share");
        for st in &mut states[1..] {
            st.attach(be, pre.clone()).expect("attach");
        }
        for (i, st) in states.iter_mut().enumerate() {
            model.forward(&question(i as u32), st, LogitsWanted::Last, None).expect("question");
            decode(st);
        }
        let shared_bytes = held_bytes(&states);
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        println!(
            "{name}: 16 sequences over a {DOC}-token document: private {:.1} MiB, shared {:.1} MiB (prefix {:.1} MiB held once), {:.1}x less",
            mib(private_bytes),
            mib(shared_bytes),
            mib(pre.size_bytes()),
            private_bytes as f64 / shared_bytes as f64
        );
        assert!(shared_bytes * 4 < private_bytes, "{name}: {shared_bytes} vs {private_bytes}");
    }
}

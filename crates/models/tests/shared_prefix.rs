//! Sequences that begin with the same tokens hold that prefix's KV once (`SeqState::share_prefix`
//! and `attach`): their logits equal those of private caches (CPU, within 1e-5 of each row's
//! scale, single and batched forwards), the prefix's bytes are counted once however many
//! sequences are attached, and a sequence's rollback or rewind never writes to the shared part.
//! Families whose states cannot share (sliding windows, recurrent state) keep private copies.

mod common;

use std::sync::Arc;

use common::batch::{Logits, assert_close, ids};
use ollm_kv::held_bytes;
use ollm_models::{BatchSeq, CausalLm, LogitsWanted, SeqState, load_model};
use ollm_ops::Backend;
use ollm_ops::cpu::CpuBackend;

const REL: f32 = 1e-5;
/// The shared prefix: two prefix-store blocks of the device cache.
const P: usize = 512;

fn load(write: impl Fn(&std::path::Path)) -> (tempfile::TempDir, Arc<dyn CausalLm>) {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path());
    let be: Arc<dyn Backend> = Arc::new(CpuBackend::new());
    let model: Arc<dyn CausalLm> = load_model(dir.path(), be).expect("load");
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

/// The first sequence prefills the document and shares its first P positions; the others
/// attach and feed only the rest. `batched`: the rests and every decode step go through one
/// batched forward each (the first sequence's part too); else one sequence at a time.
fn shared(model: &Arc<dyn CausalLm>, batched: bool) -> (Logits, Vec<SeqState>) {
    let be = model.backend();
    let (doc, qs) = prompts();
    let mut states: Vec<SeqState> = (0..qs.len()).map(|_| model.new_state().expect("state")).collect();
    model.forward(&doc[..P + 20], &mut states[0], LogitsWanted::Last, None).expect("first prefill");
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
    let (_dir, model) = load(write);
    let vocab = model.info().vocab_size;
    let want = private(&model);
    for batched in [false, true] {
        let (got, states) = shared(&model, batched);
        let what = format!("{name}, shared prefix, batched {batched}");
        let worst = assert_close(&want, &got, (vocab, REL, 0), &what);
        eprintln!("{what}: worst {worst:.2e} of the scale");
        assert!(states.iter().all(|s| s.shared_len() == P), "{what}");
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

/// States with sliding-window layers or recurrent state cannot share: `share_prefix` says so
/// and they keep private copies.
#[test]
fn families_that_cannot_share_keep_private_caches() {
    type Write<'a> = &'a dyn Fn(&std::path::Path);
    let writers: [(&str, Write<'_>); 3] = [
        ("gpt-oss (sliding layers)", &|d| common::tiny_gpt_oss(d, 32)),
        ("gemma3 (sliding layers)", &|d| common::tiny_gemma3(d, 32)),
        ("qwen3-next (recurrent state)", &common::tiny_qwen3_next),
    ];
    for (name, write) in writers {
        let (_dir, model) = load(write);
        let mut st = model.new_state().expect("state");
        assert!(!st.can_share(), "{name}");
        model.forward(&ids(20, 1), &mut st, LogitsWanted::Last, None).expect("prefill");
        let err = st.share_prefix(model.backend(), 16).expect_err(name);
        assert!(err.to_string().contains("private copies"), "{name}: {err}");
    }
}

//! GPT-OSS against transformers 5.17 (f32 math on the same bf16 weights; docs/models.md §6), for a
//! checkpoint with dense bf16 experts and one with MXFP4 experts, recorded by
//! scripts/make_golden_gpt_oss.py into fixtures/golden/gpt_oss_{dense,mxfp4}. The fixtures
//! exercise sinks, a sliding window of 4 over 24 tokens, YaRN, biases, and the ±7 SwiGLU clamp
//! (hit ~2,850 times); their router margins (≥ 1.5e-3) keep f32 summation order from flipping
//! an expert choice.
//!
//! Tolerance: 1e-4 absolute on logits, as for Llama (the doc-derived reference agrees to 3e-6).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ollm_models::gpt_oss::{GptOss, GptOssConfig};
use ollm_models::{CausalLm, LogitsWanted, load_model};
use ollm_ops::cpu::CpuBackend;
use ollm_residency::experts::ExpertPlacement;
use ollm_residency::plan::{Placement, Tier};
use ollm_weights::Catalog;

const TOL_ABS: f32 = 1e-4;
const CASES: [&str; 2] = ["gpt_oss_dense", "gpt_oss_mxfp4"];

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden").join(case)
}

struct Reference {
    input_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    logits: Vec<f32>,
    decode_last: Vec<f32>,
}

fn reference(case: &str) -> Reference {
    let dir = case_dir(case);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"))
            .expect("json");
    let ids = |key: &str| -> Vec<u32> {
        meta[key].as_array().expect(key).iter().map(|v| v.as_u64().expect("id") as u32).collect()
    };
    let cat = Catalog::open_files(&[dir.join("reference.safetensors")]).expect("reference.safetensors");
    let read = |name: &str| cat.read(cat.get(name).expect(name)).expect("read").to_f32_vec().expect("f32");
    Reference {
        input_ids: ids("input_ids"),
        greedy_ids: ids("greedy_ids"),
        logits: read("logits_f32"),
        decode_last: read("decode_last_logits_f32"),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best }) as u32
}

/// The model with `placement` (layers and experts), on the CPU.
fn load_placed(case: &str, placement: &Placement) -> GptOss {
    let dir = case_dir(case);
    let raw = ollm_models::config::RawConfig::read(&dir).expect("config");
    let cfg = GptOssConfig::from_raw(&raw).expect("gpt-oss config");
    let catalog = Catalog::open_dir(&dir).expect("catalog");
    GptOss::load_placed(cfg, "GptOssForCausalLM".into(), &catalog, Arc::new(CpuBackend::new()), placement)
        .expect("model loads")
}

#[test]
fn prompt_and_decode_logits_match_transformers() {
    for case in CASES {
        let r = reference(case);
        let model = load_model(&case_dir(case), Arc::new(CpuBackend::new())).expect("model loads");
        let mut state = model.new_state().expect("state");
        let got = model.forward(&r.input_ids, &mut state, LogitsWanted::All, None).expect("forward");
        let d = max_abs_diff(&got, &r.logits);
        eprintln!("{case}: max |Δlogit| = {d:.2e} over {} positions", r.input_ids.len());
        assert!(d <= TOL_ABS, "{case}: max |Δlogit| {d} > {TOL_ABS}");

        // Token by token through the cache (the sliding window moves past its 4 positions).
        let vocab = model.info().vocab_size;
        let mut state = model.new_state().expect("state");
        for (pos, &id) in r.input_ids.iter().enumerate() {
            let step = model.forward(&[id], &mut state, LogitsWanted::Last, None).expect("decode");
            let d = max_abs_diff(&step, &r.logits[pos * vocab..(pos + 1) * vocab]);
            assert!(d <= TOL_ABS, "{case}: position {pos}: decode differs by {d}");
        }
        let d = max_abs_diff(&got[(r.input_ids.len() - 1) * vocab..], &r.decode_last);
        assert!(d <= TOL_ABS, "{case}: decode_last differs by {d}");

        // Greedy continuation through the cache.
        let mut logits =
            model.forward(&r.greedy_ids[..0], &mut model.new_state().expect("s"), LogitsWanted::Last, None);
        assert!(logits.is_err(), "an empty input is an error");
        let mut state = model.new_state().expect("state");
        logits = Ok(model.forward(&r.input_ids, &mut state, LogitsWanted::Last, None).expect("prefill"));
        let mut out = Vec::new();
        for _ in 0..r.greedy_ids.len() {
            let next = argmax(logits.as_ref().expect("logits"));
            out.push(next);
            logits = Ok(model.forward(&[next], &mut state, LogitsWanted::Last, None).expect("decode"));
        }
        assert_eq!(out, r.greedy_ids, "{case}: greedy ids differ from transformers");
    }
}

/// Experts through 3 device slots (from RAM for some layers, from the disk for the others) and
/// layers streamed through one slot give the resident model's logits bit for bit; the cache
/// counts its hits and loads.
#[test]
fn streamed_experts_and_layers_match_resident() {
    use Tier::{Disk, Ram, Vram};
    for case in CASES {
        let r = reference(case);
        let resident = load_placed(case, &Placement::resident(4));
        let want = resident.forward(&r.input_ids, &mut resident.new_state().expect("s"), LogitsWanted::All, None);
        let want = want.expect("resident forward");
        let placement = Placement {
            tiers: vec![Vram, Disk, Ram, Disk],
            slots: 1,
            staging_buffers: 2,
            kv: None,
            experts: Some(ExpertPlacement { slots: 3, ram_layers: vec![true, false, true, false] }),
        };
        let model = load_placed(case, &placement);
        let got = model.forward(&r.input_ids, &mut model.new_state().expect("s"), LogitsWanted::All, None);
        assert_eq!(got.expect("streamed forward"), want, "{case}: streamed experts change the logits");
        let s = model.expert_stats();
        assert_eq!(s.slots, 3);
        assert!(s.ram_loads > 0 && s.disk_loads > 0, "{s:?}");
        // Decode: each token routes 2 experts per layer; the counts add up.
        let mut state = model.new_state().expect("s");
        let before = model.expert_stats();
        for &id in &r.input_ids[..6] {
            model.forward(&[id], &mut state, LogitsWanted::Last, None).expect("decode");
        }
        let after = model.expert_stats();
        let uses = |s: &ollm_residency::experts::ExpertStats| s.hits + s.ram_loads + s.disk_loads;
        assert_eq!(uses(&after) - uses(&before), 6 * 4 * 2, "{after:?}");
        assert_eq!(
            after.copy_bytes - before.copy_bytes,
            (after.ram_loads + after.disk_loads - before.ram_loads - before.disk_loads) * s.expert_bytes
        );
        // All resident: every use is a hit.
        let rs = resident.expert_stats();
        assert_eq!((rs.ram_loads, rs.disk_loads, rs.slots), (0, 0, 32));
        assert!(rs.hits > 0 && rs.hit_rate() == 1.0);
    }
}

/// Decode with the next layer's likely experts prefetched (issue 27 point 4) gives the logits of
/// decode without, bit for bit, with experts through 3 slots from RAM and disk: the prefetch only
/// changes what is resident when. The cache counts the prefetches; every use is still counted
/// once (a prefetched copy counts as a load, its use as a hit).
#[test]
fn prefetched_experts_leave_decode_unchanged() {
    use Tier::{Disk, Ram, Vram};
    for case in CASES {
        let r = reference(case);
        let placement = Placement {
            tiers: vec![Vram, Disk, Ram, Disk],
            slots: 1,
            staging_buffers: 2,
            kv: None,
            experts: Some(ExpertPlacement { slots: 3, ram_layers: vec![true, false, true, false] }),
        };
        let mut runs = Vec::new();
        for on in [false, true] {
            let model = load_placed(case, &placement);
            assert!(model.set_expert_prefetch(on), "GPT-OSS prefetches");
            let mut state = model.new_state().expect("state");
            let mut logits = vec![model.forward(&r.input_ids[..12], &mut state, LogitsWanted::Last, None).expect("p")];
            for &id in &r.input_ids[12..] {
                logits.push(model.forward(&[id], &mut state, LogitsWanted::Last, None).expect("decode"));
            }
            runs.push((logits, model.expert_stats()));
        }
        assert_eq!(runs[0].0, runs[1].0, "{case}: the prefetch changed the decode logits");
        let (off, on) = (runs[0].1, runs[1].1);
        assert_eq!((off.prefetched, off.prefetch_used), (0, 0));
        assert!(on.prefetched > 0 && on.prefetch_used <= on.prefetched, "{on:?}");
        let uses = |s: &ollm_residency::experts::ExpertStats| s.hits + s.ram_loads + s.disk_loads;
        assert_eq!(uses(&on) - on.prefetched, uses(&off), "{on:?} against {off:?}");
        eprintln!(
            "{case}: {} prefetched, {} used; hit rate {:.2} against {:.2}",
            on.prefetched,
            on.prefetch_used,
            on.hit_rate(),
            off.hit_rate()
        );
    }
}

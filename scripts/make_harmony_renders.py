"""Renders fixtures/harmony/chat_template.jinja (the chat template published with
openai/gpt-oss-20b and -120b) with transformers' own Jinja setup, for conversations the Rust
template engine must render identically. Writes fixtures/harmony/renders.json.

Run with transformers 5.17 (the project's reference): python scripts/make_harmony_renders.py
"""

import json
import pathlib

import transformers
from transformers.utils.chat_template_utils import _compile_jinja_template

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIR = ROOT / "fixtures" / "harmony"

CASES = [
    {"name": "one user turn", "messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": True},
    {
        "name": "system, earlier answers, a new question",
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And 3+3?\nThanks — ünïcode too."},
        ],
        "add_generation_prompt": True,
    },
    {
        "name": "a developer message, no generation prompt",
        "messages": [
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": "Say ok."},
            {"role": "assistant", "content": "ok"},
        ],
        "add_generation_prompt": False,
    },
]


def main() -> None:
    assert transformers.__version__ == "5.17.0", transformers.__version__
    template = _compile_jinja_template((DIR / "chat_template.jinja").read_text())
    out = []
    for case in CASES:
        text = template.render(messages=case["messages"], add_generation_prompt=case["add_generation_prompt"])
        out.append({**case, "rendered": text})
    (DIR / "renders.json").write_text(json.dumps({"transformers": transformers.__version__, "cases": out}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(out)} renders")


if __name__ == "__main__":
    main()

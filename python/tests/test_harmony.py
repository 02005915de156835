"""chat() on a harmony model (GPT-OSS) returns the final channel as text and the analysis channel
as reasoning.

The model is a tiny random-weight GPT-OSS written by `ollm synth` (the real family's tensor names,
config and harmony chat template, shrunk to width 64 with 2 layers; a byte-level tokenizer with
o200k_harmony's special tokens at their real ids). Its weights are random, so a grammar forces
its output to exactly one harmony text; what is checked is how chat() splits that text.
"""

import subprocess

import pytest

import ollm_rs

# GPT-OSS-20B's config with these changes (as crates/cli/tests/synth.rs shrinks it).
SHRINK = {
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "experts_per_token": 2,
    "sliding_window": 4,
}

# llguidance's Lark syntax: <|name|> is the special token of that name, "..." is text.
HARMONY = (
    'start: <|channel|> "analysis" <|message|> "thinking" <|end|> '
    '<|start|> "assistant" <|channel|> "final" <|message|> "Answer" <|return|>'
)
HARMONY_TEXT = "<|channel|>analysis<|message|>thinking<|end|><|start|>assistant<|channel|>final<|message|>Answer"


@pytest.fixture(scope="module")
def gpt_oss(ollm_bin, tmp_path_factory):
    out = tmp_path_factory.mktemp("harmony") / "gpt-oss-tiny"
    sets = [a for k, v in SHRINK.items() for a in ("--set", f"{k}={v}")]
    cmd = [str(ollm_bin), "synth", "--like", "gpt-oss-20b", "--layers", "2", "--seed", "3", "--out", str(out), *sets]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return ollm_rs.LLM(str(out), device="cpu")


def test_chat_returns_harmony_reasoning_apart_from_the_answer(gpt_oss):
    messages = [{"role": "user", "content": "Hi"}]
    out = gpt_oss.chat(messages, max_new_tokens=64, temperature=0, grammar=HARMONY)
    assert out.text == "Answer", out
    assert out.reasoning == "thinking", out
    assert out.finish_reason == "stop"
    # The model did write the whole harmony text (the final <|return|> ends it and is not kept).
    assert gpt_oss.tokenizer.decode(out.token_ids) == HARMONY_TEXT
    # The prompt went through the harmony template (its system header makes it long).
    assert out.usage.prompt_tokens > 100


def test_the_split_is_chats_own(gpt_oss):
    # The same tokens after a plain prompt are not read as harmony: nothing goes to reasoning.
    plain = gpt_oss.generate(["Hi"], max_new_tokens=64, temperature=0, grammar=HARMONY)[0]
    assert gpt_oss.tokenizer.decode(plain.token_ids) == HARMONY_TEXT
    assert plain.reasoning == "" and "thinking" in plain.text and "Answer" in plain.text
    # A stream of messages splits as chat() does: its pieces are the answer only.
    stream = gpt_oss.stream([{"role": "user", "content": "Hi"}], max_new_tokens=64, temperature=0, grammar=HARMONY)
    assert "".join(stream) == "Answer"
    assert stream.output.reasoning == "thinking"

"""Generation through ollm_rs equals the CLI's; streaming, lists and chat agree with it."""

import os
import subprocess

PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"


def cli(ollm_bin, *args):
    out = subprocess.run(
        [str(ollm_bin), "run", "--model", "smollm2-135m", "--device", "cpu", "--temperature", "0", *args],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_greedy_text_equals_the_cli(llm, ollm_bin):
    got = llm.generate([PROMPT], max_new_tokens=24, temperature=0)
    assert len(got) == 1
    out = got[0]
    # `ollm run` prints the text and a newline.
    assert cli(ollm_bin, "-p", PROMPT, "-n", "24") == out.text + "\n"
    assert len(out.token_ids) == out.usage.completion_tokens > 0
    assert out.usage.prompt_tokens == len(llm.tokenizer.encode(PROMPT))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert llm.tokenizer.decode(out.token_ids) == out.text
    assert out.finish_reason in ("stop", "length")
    assert out.stats.decode_s > 0 and out.stats.prefill_s > 0


def test_chat_equals_the_cli_and_applies_the_template(llm, ollm_bin):
    messages = [{"role": "user", "content": QUESTION}]
    out = llm.chat(messages, max_new_tokens=24, temperature=0)
    assert cli(ollm_bin, "--chat", "-p", QUESTION, "-n", "24") == out.text + "\n"
    assert "Paris" in out.text
    rendered = llm.tokenizer.apply_chat_template(messages)
    assert "<|im_start|>user\n" + QUESTION in rendered and rendered.endswith("<|im_start|>assistant\n")
    ids = llm.tokenizer.apply_chat_template(messages, tokenize=True)
    assert out.usage.prompt_tokens == len(ids)
    assert out.reasoning == ""


def test_streamed_pieces_join_to_the_same_text(llm):
    whole = llm.generate(PROMPT, max_new_tokens=32, temperature=0)[0]
    stream = llm.stream(PROMPT, max_new_tokens=32, temperature=0)
    pieces = list(stream)
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == whole.text
    assert stream.output.token_ids == whole.token_ids
    # A chat conversation streams too.
    chat = llm.chat([{"role": "user", "content": QUESTION}], max_new_tokens=16, temperature=0)
    assert "".join(llm.stream([{"role": "user", "content": QUESTION}], max_new_tokens=16, temperature=0)) == chat.text


def test_a_list_generated_together_equals_each_alone(llm):
    prompts = [PROMPT, "def fibonacci(n):", "Once upon a time", PROMPT + " Paris. The capital of Italy is"]
    together = llm.generate(prompts, max_new_tokens=20, temperature=0)
    assert len(together) == len(prompts)
    for p, t in zip(prompts, together):
        alone = llm.generate([p], max_new_tokens=20, temperature=0)[0]
        assert (t.text, t.token_ids, t.finish_reason) == (alone.text, alone.token_ids, alone.finish_reason), p
    assert len({t.text for t in together}) == len(prompts)


def test_stop_strings_and_seeds(llm):
    full = llm.generate(PROMPT, max_new_tokens=24, temperature=0)[0].text
    word = full.split()[1]
    cut = llm.generate(PROMPT, max_new_tokens=24, temperature=0, stop=[word])[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(word)]
    a = llm.generate(PROMPT, max_new_tokens=16, temperature=0.9, seed=7)[0]
    b = llm.generate(PROMPT, max_new_tokens=16, temperature=0.9, seed=7)[0]
    assert a.token_ids == b.token_ids
    capped = llm.generate(PROMPT, max_new_tokens=3, ignore_eos=True, temperature=0)[0]
    assert capped.finish_reason == "length" and len(capped.token_ids) == 3


def test_info_plan_and_tokenizer(llm):
    info = llm.info
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["context"] == 8192 and info["n_layers"] == 30
    assert 250e6 < info["weight_bytes"] < 300e6
    assert info["device"] == "cpu"
    assert isinstance(info["model_dir"], str) and info["model_dir"].endswith("smollm2-135m-instruct")
    plan = llm.plan()
    assert plan["tiers"] == ["vram"] * 30 and plan["layers"]["vram"] == list(range(30))
    assert plan["layers"]["disk"] == [] and plan["kv_offload"] is None and not plan["streamed"]
    assert "30 layers in RAM, 0 in pinned RAM" in plan["description"]
    tok = llm.tokenizer
    ids = tok.encode("Hello, world!")
    assert tok.decode(ids) == "Hello, world!"
    assert tok.token_to_id("<|im_end|>") in tok.eos_token_ids
    assert tok.vocab_size == 49152 and tok.has_chat_template

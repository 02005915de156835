"""Speculative decoding and structured output as keyword arguments of generate, stream and chat."""

import json

import jsonschema
import pytest

# Text that repeats: prompt lookup (ngram) finds its continuation in the prompt, so drafts are kept.
REPEAT = "one two three four five six seven eight nine ten. " * 4 + "one two three"
PROMPT = "The capital of France is"

# One nested schema: an object in an object, an array of strings; bounded so it ends in time.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "address", "tags"],
    "additionalProperties": False,
}


def test_ngram_speculation_keeps_the_greedy_text_with_more_than_one_token_per_pass(llm):
    plain = llm.generate([REPEAT], max_new_tokens=32, temperature=0)[0]
    spec = llm.generate([REPEAT], max_new_tokens=32, temperature=0, speculate="ngram", draft_tokens=4)[0]
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    assert plain.stats.tokens_per_pass is None and plain.stats.target_passes is None
    s = spec.stats
    assert s.target_passes > 0 and s.accepted_tokens > 0 and s.drafted_tokens >= s.accepted_tokens
    assert s.tokens_per_pass > 1.0, s
    # "auto" and the other calls take it too.
    auto = llm.generate([REPEAT], max_new_tokens=32, temperature=0, speculate="ngram", draft_tokens="auto")[0]
    assert auto.text == plain.text and auto.stats.tokens_per_pass > 1.0
    assert "".join(llm.stream(REPEAT, max_new_tokens=32, temperature=0, speculate="ngram")) == plain.text
    messages = [{"role": "user", "content": REPEAT}]
    assert (
        llm.chat(messages, max_new_tokens=16, temperature=0, speculate="ngram").text
        == llm.chat(messages, max_new_tokens=16, temperature=0).text
    )


def test_a_list_speculates_through_the_scheduler(llm):
    alone = [llm.generate([p], max_new_tokens=24, temperature=0)[0].text for p in (REPEAT, PROMPT)]
    both = llm.generate([REPEAT, PROMPT], max_new_tokens=24, temperature=0, speculate="ngram")
    assert [o.text for o in both] == alone
    assert both[0].stats.tokens_per_pass > 1.0


def test_json_schema_output_parses_and_validates(llm):
    prompt = "A person and their address, as JSON:"
    for schema in (SCHEMA, json.dumps(SCHEMA)):
        out = llm.generate([prompt], max_new_tokens=160, temperature=0, json_schema=schema)[0]
        assert out.finish_reason == "stop", out
        jsonschema.validate(json.loads(out.text), SCHEMA)
    # OpenAI's response_format, chat and a list (the scheduler) give JSON of the schema too.
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    out = llm.chat([{"role": "user", "content": prompt}], max_new_tokens=160, temperature=0, response_format=fmt)
    jsonschema.validate(json.loads(out.text), SCHEMA)
    for out in llm.generate([prompt, "JSON:"], max_new_tokens=160, temperature=0, json_schema=SCHEMA):
        jsonschema.validate(json.loads(out.text), SCHEMA)
    # With a grammar, speculation is not used (decoding is plain) and the output still obeys it.
    spec = llm.generate([prompt], max_new_tokens=160, temperature=0, json_schema=SCHEMA, speculate="ngram")[0]
    jsonschema.validate(json.loads(spec.text), SCHEMA)
    # {"type": "text"} constrains nothing.
    free = llm.generate([PROMPT], max_new_tokens=12, temperature=0, response_format={"type": "text"})[0]
    assert free.text == llm.generate([PROMPT], max_new_tokens=12, temperature=0)[0].text


def test_a_lark_grammar_constrains_the_text(llm):
    out = llm.generate([PROMPT], max_new_tokens=16, temperature=0, grammar='start: " Paris" | " Lyon" | " Nice"')[0]
    assert out.text in (" Paris", " Lyon", " Nice") and out.finish_reason == "stop"
    got = "".join(llm.stream(PROMPT, max_new_tokens=16, temperature=0, grammar='start: /[0-9]{3}/'))
    assert len(got) == 3 and got.isdigit(), got


def one_line(e):
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "kwargs, names",
    [
        ({"grammar": "start: ("}, "grammar:"),
        ({"json_schema": {"$ref": "#/nowhere"}}, "json_schema:"),
        ({"json_schema": "{not json"}, "json_schema: not JSON"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
        ({"json_schema": {"type": "object"}, "grammar": "start: \"x\""}, "give one of"),
        ({"speculate": "mtp"}, "expected ngram or draft:MODEL"),
        ({"speculate": "draft:"}, "expected ngram or draft:MODEL"),
        ({"speculate": "ngram", "draft_tokens": 0}, "draft_tokens: '0': expected auto or a number"),
        ({"speculate": "ngram", "draft_tokens": "many"}, "draft_tokens: 'many'"),
        ({"draft_tokens": 4}, "draft_tokens needs speculate"),
    ],
)
def test_bad_options_are_value_errors_with_one_line(llm, kwargs, names):
    for call in (
        lambda: llm.generate(["hi"], max_new_tokens=4, **kwargs),
        lambda: llm.generate(["hi", "ho"], max_new_tokens=4, **kwargs),
        lambda: llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=4, **kwargs),
        lambda: llm.stream("hi", max_new_tokens=4, **kwargs),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert names in one_line(e), one_line(e)


def test_a_missing_draft_model_is_file_not_found(llm, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        llm.generate(["hi"], max_new_tokens=4, speculate=f"draft:{tmp_path / 'nothing'}")
    assert "draft:" in one_line(e)


def test_unknown_keywords_and_wrong_types_are_type_errors(llm):
    with pytest.raises(TypeError) as e:
        llm.generate(["hi"], max_new_tokens=4, speculation="ngram")
    assert "'speculation'" in str(e.value) and "speculate" in str(e.value)
    with pytest.raises(TypeError):
        llm.generate(["hi"], max_new_tokens=4, grammar=3)
    with pytest.raises(TypeError):
        llm.generate(["hi"], max_new_tokens=4, speculate="ngram", draft_tokens=2.5)

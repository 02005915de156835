"""Checks `ollm serve` with the official `openai` Python client.

Usage: python3 openai_client_test.py BASE_URL MODEL_ID API_KEY
(run by crates/cli/tests/serve_openai_client.rs against the tiny fixture served on 127.0.0.1).
Exits non-zero with a message naming the failed check.
"""

import concurrent.futures
import json
import sys
import urllib.error
import urllib.request

import jsonschema
import openai

BASE, MODEL, KEY = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=60)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def chat(content, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def expect_error(exc_type, fn, code=None, status=None):
    try:
        fn()
    except exc_type as e:
        if code is not None:
            check(getattr(e, "code", None) == code, f"{exc_type.__name__}: code {getattr(e, 'code', None)!r} != {code!r}")
        if status is not None:
            check(e.status_code == status, f"{exc_type.__name__}: status {e.status_code} != {status}")
        return e
    check(False, f"expected {exc_type.__name__}")


# Models.
ids = [m.id for m in client.models.list().data]
check(ids == [MODEL], f"models {ids}")

# Plain chat with usage.
r = chat("Hello there!", max_tokens=16)
check(r.object == "chat.completion", r.object)
text = r.choices[0].message.content
check(isinstance(text, str), "content is a string")
check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "usage adds up")
check(r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason)

# Streaming gives the same text.
pieces, finish = [], None
for chunk in chat("Hello there!", max_tokens=16, stream=True):
    check(chunk.object == "chat.completion.chunk", chunk.object)
    if chunk.choices:
        d = chunk.choices[0].delta
        if d.content:
            pieces.append(d.content)
        finish = chunk.choices[0].finish_reason or finish
check("".join(pieces) == text, f"stream {''.join(pieces)!r} != plain {text!r}")
check(finish == r.choices[0].finish_reason, "stream finish reason")

# Completions, plain and streamed, with a seed.
c = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0)
full = c.choices[0].text
check(len(full) > 8, f"completion {full!r}")
streamed = "".join(
    ch.choices[0].text
    for ch in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0, stream=True)
    if ch.choices
)
check(streamed == full, f"streamed completion {streamed!r} != {full!r}")
s1 = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=1.5, seed=5).choices[0].text
s2 = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=1.5, seed=5).choices[0].text
check(s1 == s2, "same seed, same text")

# Stop sequences.
stop = full[3:5]
cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0, stop=[stop])
check(cut.choices[0].text == full[: full.index(stop)], f"stop {stop!r}: {cut.choices[0].text!r}")
check(cut.choices[0].finish_reason == "stop", cut.choices[0].finish_reason)
chat_stop = text[2:4] if len(text) > 4 else None
if chat_stop:
    rs = chat("Hello there!", max_tokens=16, stop=chat_stop)
    check(rs.choices[0].message.content == text[: text.index(chat_stop)], "chat stop")

# Concurrency: 12 requests at once, each answered with its own text.
prompts = [f"Question {i}: what comes next?" for i in range(12)]
alone = [chat(p, max_tokens=20).choices[0].message.content for p in prompts]
with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
    together = list(pool.map(lambda p: chat(p, max_tokens=20).choices[0].message.content, prompts))
check(alone == together, "concurrent replies differ from sequential ones")
with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    streams = list(pool.map(lambda p: "".join(c.choices[0].delta.content or "" for c in chat(p, max_tokens=20, stream=True) if c.choices), prompts[:8]))
check(streams == alone[:8], "concurrent streams differ from sequential replies")

# Bad requests.
expect_error(openai.NotFoundError, lambda: client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]), code="model_not_found")
expect_error(openai.BadRequestError, lambda: chat("word " * 400), code="context_length_exceeded")
expect_error(openai.BadRequestError, lambda: chat("hi", max_tokens=10**6))
expect_error(openai.BadRequestError, lambda: chat("hi", top_p=7))
bad_key = openai.OpenAI(base_url=BASE + "/v1", api_key="wrong", max_retries=0)
expect_error(openai.AuthenticationError, lambda: bad_key.models.list(), code="invalid_api_key")


def raw_post(body):
    """POST raw bytes (the client library cannot send malformed JSON); (status, parsed body)."""
    req = urllib.request.Request(
        BASE + "/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


status, body = raw_post(b'{"model": "x", "messages": [')
check(status == 400 and body["error"]["type"] == "invalid_request_error", f"malformed JSON: {status} {body}")
status, body = raw_post(b'{"model": "' + MODEL.encode() + b'", "messages": "' + b"x" * 100_000 + b'"}')
check(status == 413 and "message" in body["error"], f"oversized body: {status} {body}")

# Structured output: response_format json_schema constrains what any model writes (this one has
# random weights), so each answer parses and validates; several schemas and prompts, greedy and
# sampled. Strings, arrays and integers are bounded so an answer ends within max_tokens.
SCHEMAS = [
    {  # nested objects, an enum, bounded integers, an optional field
        "type": "object",
        "properties": {
            "verdict": {"enum": ["ok", "suspicious", "bad"]},
            "score": {"type": "integer", "minimum": 0, "maximum": 10},
            "who": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 6}, "admin": {"type": "boolean"}},
                "required": ["name", "admin"],
                "additionalProperties": False,
            },
            "note": {"type": "string", "maxLength": 5},
        },
        "required": ["verdict", "score", "who"],
        "additionalProperties": False,
    },
    {  # an array with bounds, of objects with enums
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": -5, "maximum": 5}},
                    "required": ["kind", "n"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"enum": [1, 2, 3, "x", None, True]}, "minItems": 2, "maxItems": 4},
]
for i, schema in enumerate(SCHEMAS):
    for prompt, temperature in [("Review this log file.", 0), ("Give me the answer as JSON.", 1.0)]:
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            temperature=temperature,
            seed=11,
            max_tokens=128,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}},
        )
        out = r.choices[0].message.content
        check(r.choices[0].finish_reason == "stop", f"schema {i}: finish {r.choices[0].finish_reason} for {out!r}")
        try:
            jsonschema.validate(json.loads(out), schema)
        except (ValueError, jsonschema.ValidationError) as e:
            check(False, f"schema {i}, {prompt!r}: {out!r} is not valid: {e}")
        # Streamed, the same request gives the same text.
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompt}],
                temperature=temperature,
                seed=11,
                max_tokens=128,
                stream=True,
                response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}},
            )
            if c.choices
        )
        check(streamed == out, f"schema {i}: streamed {streamed!r} != {out!r}")

# json_object: any JSON object, which parses (bounded by max_tokens: the answer may be cut, so
# only its opening is checked when it is).
r = chat("Answer in JSON.", max_tokens=128, response_format={"type": "json_object"})
out = r.choices[0].message.content
check(out.startswith("{"), f"json_object: {out!r}")
if r.choices[0].finish_reason == "stop":
    check(isinstance(json.loads(out), dict), f"json_object: {out!r}")

# A schema the library cannot compile is a 400 naming it.
e = expect_error(
    openai.BadRequestError,
    lambda: chat("hi", response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"$ref": "#/nowhere"}}}),
    status=400,
)
check("response_format.json_schema.schema" in str(e), f"invalid schema error: {e}")

# Logprobs (chat): one entry per generated token, each <= 0 with its top list sorted (most likely
# first); under greedy decoding the token is the top one. Streamed, the same entries arrive.
r = chat("Hello there!", max_tokens=8, logprobs=True, top_logprobs=3)
lp = r.choices[0].logprobs.content
check(len(lp) == r.usage.completion_tokens, f"{len(lp)} logprobs for {r.usage.completion_tokens} tokens")
for t in lp:
    check(t.logprob <= 0, f"logprob {t.logprob} > 0")
    check(len(t.top_logprobs) == 3, f"top_logprobs {t.top_logprobs}")
    tops = [x.logprob for x in t.top_logprobs]
    check(tops == sorted(tops, reverse=True), f"top list not sorted: {tops}")
    check(t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob, f"greedy token not the top: {t}")
    check(isinstance(t.bytes, list) and all(0 <= b < 256 for b in t.bytes), f"bytes {t.bytes}")
streamed_lp = []
for chunk in chat("Hello there!", max_tokens=8, logprobs=True, top_logprobs=3, stream=True):
    if chunk.choices and chunk.choices[0].logprobs is not None:
        streamed_lp.extend(chunk.choices[0].logprobs.content)
check([(t.token, t.logprob) for t in streamed_lp] == [(t.token, t.logprob) for t in lp], "streamed logprobs differ")
check(chat("Hello there!", max_tokens=4).choices[0].logprobs is None, "logprobs nobody asked for")

# Logprobs (completions): the legacy shape, with text_offset counting characters.
r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2)
l = r.choices[0].logprobs
check(len(l.tokens) == len(l.token_logprobs) == len(l.top_logprobs) == len(l.text_offset) == r.usage.completion_tokens, f"{l}")
check(all(v <= 0 for v in l.token_logprobs), f"{l.token_logprobs}")
check(all(1 <= len(d) <= 2 and all(v <= 0 for v in d.values()) for d in l.top_logprobs), f"{l.top_logprobs}")
check(l.text_offset == sorted(l.text_offset) and l.text_offset[0] == 0, f"{l.text_offset}")
expect_error(openai.BadRequestError, lambda: chat("hi", top_logprobs=3), status=400)
e = expect_error(openai.BadRequestError, lambda: chat("hi", logprobs=True, top_logprobs=21), status=400)
check("top_logprobs" in str(e), f"{e}")

# n = 3 with sampling: three choices, the prompt counted once in usage; the same seed gives the
# same three; greedy gives three equal ones; streamed, each index reassembles to its choice.
one = chat("Tell me a story.", max_tokens=8)
r = chat("Tell me a story.", max_tokens=8, n=3, temperature=1.0, seed=5)
check([c.index for c in r.choices] == [0, 1, 2], f"indexes {[c.index for c in r.choices]}")
check(r.usage.prompt_tokens == one.usage.prompt_tokens, f"prompt counted {r.usage.prompt_tokens} vs {one.usage.prompt_tokens}")
texts = [c.message.content for c in r.choices]
check(len(set(texts)) > 1, f"three sampled choices are all equal: {texts}")
again = chat("Tell me a story.", max_tokens=8, n=3, temperature=1.0, seed=5)
check([c.message.content for c in again.choices] == texts, "the same seed gives other choices")
check(r.usage.completion_tokens == again.usage.completion_tokens, "usage differs between equal runs")
lens = chat("Tell me a story.", max_tokens=8, n=3, temperature=1.0, seed=5, logprobs=True)
check(r.usage.completion_tokens == sum(len(c.logprobs.content) for c in lens.choices), "completion tokens are the sum of the choices'")
g = chat("Tell me a story.", max_tokens=8, n=3)
check(len({c.message.content for c in g.choices}) == 1 and g.choices[0].message.content == one.choices[0].message.content, "greedy choices differ")
parts = {0: "", 1: "", 2: ""}
usage = None
for chunk in chat("Tell me a story.", max_tokens=8, n=3, temperature=1.0, seed=5, stream=True, stream_options={"include_usage": True}):
    for c in chunk.choices:
        parts[c.index] += c.delta.content or ""
    if chunk.usage is not None:
        usage = chunk.usage
check([parts[i] for i in range(3)] == texts, f"streamed choices {parts} != {texts}")
check(usage is not None and usage.prompt_tokens == one.usage.prompt_tokens and usage.completion_tokens == r.usage.completion_tokens, f"streamed usage {usage}")
expect_error(openai.BadRequestError, lambda: chat("hi", n=0), status=400)

# A bad tool, a tool_choice naming no tool and tool parameters the library cannot compile are
# 400s naming the field; /v1/completions has no tools. (Tool calls themselves are checked on the
# demo model by openai_demo_test.py: this fixture's 320-token vocabulary leaves no room in its
# 256-token context for tool definitions.)
for tools, choice, field in [
    ([{"type": "function", "function": {"name": "bad name"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f"}}], {"type": "function", "function": {"name": "g"}}, "tool_choice.function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}], "required", "tools"),
    ([], "required", "tool_choice"),
]:
    kw = {"tools": tools} if choice is None else {"tools": tools, "tool_choice": choice}
    e = expect_error(openai.BadRequestError, lambda: chat("x", max_tokens=4, **kw), status=400)
    check(e.body.get("param") == field, f"bad tools: param {e.body.get('param')!r} != {field!r}: {e}")
e = expect_error(
    openai.BadRequestError,
    lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"tools": [{"type": "function", "function": {"name": "f"}}]}),
    status=400,
)
check("chat/completions" in str(e), f"{e}")

# Still serving after all that.
check(chat("Hello there!", max_tokens=16).choices[0].message.content == text, "the server still answers the same")
print("openai client checks passed")

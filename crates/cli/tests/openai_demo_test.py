"""Checks tool calls, logprobs and several choices of `ollm serve` on the demo model (SmolLM2-135M)
with the official `openai` Python client.

Usage: python3 openai_demo_test.py BASE_URL
(run by crates/cli/tests/serve_openai_demo.rs). Exits non-zero with a message naming the failed check.
"""

import json
import sys

import jsonschema
import openai

BASE = sys.argv[1]
client = openai.OpenAI(base_url=BASE + "/v1", api_key="none", max_retries=0, timeout=300)
MODEL = client.models.list().data[0].id


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def chat(messages, **kw):
    kw.setdefault("temperature", 0)
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TICKET = {
    "type": "function",
    "function": {
        "name": "open_ticket",
        "description": "Files an incident",
        "parameters": {
            "type": "object",
            "properties": {
                "severity": {"enum": ["low", "high"]},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
            },
            "required": ["severity", "tags"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TICKET]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

# A forced call (required, or a named function), greedy and sampled: the answer is a call whose
# arguments validate against the tool's parameters; streamed, its pieces reassemble to the same call.
for prompt, choice in [
    ("What's the weather in Paris for the next 3 days?", "required"),
    ("The database is down since noon.", "required"),
    ("Weather in Oslo tomorrow?", {"type": "function", "function": {"name": "get_weather"}}),
    ("The disk is full.", {"type": "function", "function": {"name": "open_ticket"}}),
]:
    for temperature in (0, 1.0):
        kw = dict(tools=TOOLS, tool_choice=choice, max_tokens=96, temperature=temperature, seed=7)
        r = chat(prompt, **kw)
        c = r.choices[0]
        check(c.finish_reason == "tool_calls", f"{prompt!r}: finish {c.finish_reason}, content {c.message.content!r}")
        check(c.message.content is None and len(c.message.tool_calls) == 1, f"{prompt!r}: {c.message}")
        call = c.message.tool_calls[0]
        check(call.type == "function" and call.id.startswith("call_"), f"{call}")
        if isinstance(choice, dict):
            check(call.function.name == choice["function"]["name"], f"named {choice}: called {call.function.name}")
        try:
            jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
        except (KeyError, ValueError, jsonschema.ValidationError) as e:
            check(False, f"{prompt!r}: {call.function} is not a valid call: {e}")
        name, args, ids, finish, pieces = None, "", set(), None, 0
        for chunk in chat(prompt, stream=True, **kw):
            for ch in chunk.choices:
                check(ch.delta.content in (None, ""), f"a forced call streamed content {ch.delta.content!r}")
                for tc in ch.delta.tool_calls or []:
                    check(tc.index == 0, f"tool call index {tc.index}")
                    pieces += 1
                    if tc.id:
                        ids.add(tc.id)
                        check(tc.type == "function", f"{tc}")
                    if tc.function.name:
                        check(name is None, "the name came twice")
                        name = tc.function.name
                    args += tc.function.arguments or ""
                finish = ch.finish_reason or finish
        check(
            (name, args, finish, len(ids)) == (call.function.name, call.function.arguments, "tool_calls", 1),
            f"streamed call {name} {args!r} {finish} {ids} != {call.function}",
        )
        check(pieces > 2, f"the call came in {pieces} pieces, not streamed")

# auto: text or a call, either one well formed; none: text only.
r = chat("What's the weather in Paris for the next 3 days?", tools=TOOLS, tool_choice="auto", max_tokens=64)
c = r.choices[0]
if c.message.tool_calls:
    check(c.finish_reason == "tool_calls" and c.message.content is None, f"{c}")
    jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), PARAMS[c.message.tool_calls[0].function.name])
else:
    check(isinstance(c.message.content, str) and not c.message.content.startswith("{"), f"auto text: {c.message}")
r = chat("What's the weather in Paris?", tools=TOOLS, tool_choice="none", max_tokens=24)
check(r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls", f"{r.choices[0]}")

# A conversation carrying an earlier call and its result is accepted and answered.
first = chat("Weather in Paris for 2 days?", tools=TOOLS, tool_choice="required", max_tokens=96).choices[0].message
call = first.tool_calls[0]
history = [
    {"role": "user", "content": "Weather in Paris for 2 days?"},
    {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny, 21C"})},
]
r = chat(history, tools=TOOLS, tool_choice="none", max_tokens=32)
check(isinstance(r.choices[0].message.content, str) and r.choices[0].message.content, f"{r.choices[0]}")

# A bad tool and a schema the library cannot compile are 400s naming the field.
for tools, choice, field in [
    ([{"type": "function", "function": {"name": "no spaces"}}], "auto", "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}], "required", "tools"),
]:
    try:
        chat("hi", tools=tools, tool_choice=choice, max_tokens=4)
        check(False, f"{tools} was accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.body.get("param") == field, f"{e.body}")
try:
    chat("hi", max_tokens=4, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    check(False, "an invalid schema was accepted")
except openai.BadRequestError as e:
    check("response_format" in str(e), f"{e}")

# Logprobs: <= 0, top lists sorted, the greedy token first; a trained model puts most of its
# mass on its choice, so the tokens are not all near-uniform.
r = chat("What is the capital of France?", max_tokens=12, logprobs=True, top_logprobs=5)
lp = r.choices[0].logprobs.content
check(len(lp) == r.usage.completion_tokens, f"{len(lp)} logprobs for {r.usage.completion_tokens} tokens")
for t in lp:
    tops = [x.logprob for x in t.top_logprobs]
    check(t.logprob <= 0 and len(tops) == 5 and tops == sorted(tops, reverse=True), f"{t}")
    check(t.top_logprobs[0].token == t.token, f"greedy token not the top one: {t}")
check(max(t.logprob for t in lp) > -0.5, f"no confident token: {[t.logprob for t in lp]}")
check(b"".join(bytes(t.bytes) for t in lp).decode("utf-8", "replace") == r.choices[0].message.content, "the bytes make the text")

# n = 3 with sampling: three choices, the prompt counted once.
one = chat("Write a short poem about the sea.", max_tokens=16)
r = chat("Write a short poem about the sea.", max_tokens=16, n=3, temperature=1.0, seed=3, logprobs=True)
check(len(r.choices) == 3 and r.usage.prompt_tokens == one.usage.prompt_tokens, f"{r.usage} vs {one.usage}")
check(r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices), f"{r.usage}")
check(len({c.message.content for c in r.choices}) > 1, f"three equal samples: {[c.message.content for c in r.choices]}")
print("openai demo checks passed")

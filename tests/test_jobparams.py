"""What a job carries besides its text (p2pgpu.core.jobparams) and how it
travels in a REQUEST body (p2pgpu.core.jobs): the params' own checks, the
body map, the kind rules, the input-token bound, and every way a body can be
malformed, oversized, forged or smuggle what a provider must not run.

Round trips are Hypothesis properties: any ``JobParams`` survives its JSON,
and any job with params survives ``make_request``/``decode_request`` whole,
with one body per job (the body hash is unique). Legacy jobs (no params)
keep their bodies byte for byte.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pgpu.core import jobs
from p2pgpu.core.codec import Tag, pack, sign_object
from p2pgpu.core.jobparams import (
    LOAD_TIME_OPTIONS,
    MAX_IMAGES,
    MAX_PARAMS_BYTES,
    MAX_TOOLS,
    SAMPLING_OPTIONS,
    JobParams,
    MessageExtra,
    ToolCall,
    parse_options,
)
from p2pgpu.core.jobs import (
    EMBED_INPUT_OVERHEAD_TOKENS,
    IMAGE_TOKENS,
    MAX_BODY,
    Prices,
    body_hash,
    check_job_params,
    decode_request,
    encode_body,
    job_cost,
    make_request,
    prompt_token_bound,
)
from p2pgpu.core.kv import MemoryStore
from p2pgpu.core.ledger import Ledger
from p2pgpu.errors import MalformedInput
from p2pgpu.testing.ledger import START_MS, key_for, make_genesis

alice, bob = key_for("alice"), key_for("bob")
GENESIS = make_genesis(allocation=10**12)
NET_ID = GENESIS.network_id
PRICES = Prices(1_000_000, 2_000_000)
JOB_ID = bytes(range(16))
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(64))).decode()
CHAT = (("system", "be brief"), ("user", "what is in the picture?"))
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather now",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]


def request(*, params: JobParams = JobParams(), prompt: str | None = None, messages=None, inputs=None,
            max_tokens: int | None = None):
    """A signed request and its body, with a hold that covers it."""
    if prompt is None and messages is None and inputs is None:
        prompt = "why is the sky blue?"
    max_tokens = max_tokens if max_tokens is not None else (len(inputs) if inputs is not None else 50)
    bound = prompt_token_bound(prompt, messages, params=params, inputs=inputs)
    ledger = Ledger(MemoryStore(), GENESIS)
    hold = ledger.hold(alice, bob.public_key, job_cost(PRICES, bound, max_tokens), START_MS + 600_000, JOB_ID,
                       START_MS)
    return hold, make_request(alice, NET_ID, START_MS, job_id=JOB_ID, model="llama3.2", hold=hold, prices=PRICES,
                              max_prompt_tokens=bound, max_tokens=max_tokens, credit_window=8, prompt=prompt,
                              messages=messages, params=params, inputs=inputs)


def forged(body: bytes, kind: str, *, max_tokens: int = 50):
    """A request that alice really signed over ``body`` (its hash), however
    the body is made: what a consumer who bypasses ``make_request`` sends."""
    ledger = Ledger(MemoryStore(), GENESIS)
    hold = ledger.hold(alice, bob.public_key, 10**9, START_MS + 600_000, JOB_ID, START_MS)
    signed = sign_object(alice, Tag.JOB_REQUEST, NET_ID, START_MS, [
        JOB_ID, "llama3.2:latest", kind, body_hash(body), 1000, max_tokens, PRICES.price_in, PRICES.price_out, 8,
        hold.wire,
    ])
    return signed.wire


def refused(body: bytes, kind: str, match: str, **kw) -> None:
    with pytest.raises(MalformedInput, match=match):
        decode_request(forged(body, kind, **kw), body, NET_ID)


# ------------------------------------------------------------------ strategies

_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=12) \
    | st.floats(allow_nan=False, allow_infinity=False, width=64)
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)


def _option(name: str):
    kind, lo, hi = SAMPLING_OPTIONS[name]
    if kind == "int":
        return st.integers(int(lo), int(hi))
    return st.floats(lo, hi, allow_nan=False)


options = st.builds(
    lambda chosen, stop: tuple(sorted(chosen + ([("stop", tuple(stop))] if stop else []))),
    st.lists(st.sampled_from(sorted(SAMPLING_OPTIONS)), unique=True, max_size=4).flatmap(
        lambda names: st.tuples(*[st.tuples(st.just(n), _option(n)) for n in names]).map(list)),
    st.lists(st.text(min_size=1, max_size=8), max_size=3),
)
images = st.lists(st.binary(min_size=1, max_size=48).map(lambda b: base64.b64encode(b).decode()), max_size=2)
tool_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=16)
tools = st.lists(st.builds(lambda name, parameters: {"type": "function", "function": {
    "name": name, "parameters": parameters}}, tool_names, json_objects), min_size=1, max_size=3)
extras = st.builds(
    MessageExtra,
    images=images.map(tuple),
    tool_calls=st.lists(st.builds(ToolCall.of, tool_names, json_objects), max_size=2).map(tuple),
    tool_name=st.none() | tool_names,
    thinking=st.none() | st.text(max_size=20),
).filter(lambda e: not e.empty)


def _params(draw, *, kind: str, messages: int = 0) -> JobParams:
    if kind == "embed":
        return JobParams(truncate=draw(st.none() | st.booleans()),
                         dimensions=draw(st.none() | st.integers(1, 8192)))
    fields: dict = {
        "options": draw(options),
        "format": draw(st.none() | st.just("json") | json_objects.map(json.dumps)),
        "think": draw(st.none() | st.booleans() | st.sampled_from(("low", "medium", "high"))),
    }
    if fields["format"] not in (None, "json"):
        fields["format"] = JobParams.from_wire({"format": json.loads(fields["format"])}).format
    if kind == "generate":
        fields["images"] = tuple(draw(images))
    else:
        tools_value = draw(st.none() | tools)
        if tools_value is not None:
            fields["tools_json"] = JobParams.from_wire({"tools": tools_value}).tools_json
        indexes = draw(st.lists(st.integers(0, messages - 1), unique=True, max_size=2)) if messages else []
        fields["message_extras"] = tuple((i, draw(extras)) for i in sorted(indexes))
    return JobParams(**fields)


@st.composite
def any_params(draw) -> JobParams:
    return _params(draw, kind=draw(st.sampled_from(("generate", "chat", "embed"))), messages=3)


@st.composite
def jobs_with_params(draw):
    kind = draw(st.sampled_from(("generate", "chat", "embed")))
    if kind == "generate":
        return dict(prompt=draw(st.text(max_size=40)), params=_params(draw, kind=kind))
    if kind == "chat":
        messages = tuple(draw(st.lists(st.tuples(st.sampled_from(jobs.CHAT_ROLES), st.text(max_size=20)),
                                       min_size=1, max_size=4)))
        return dict(messages=messages, params=_params(draw, kind=kind, messages=len(messages)))
    inputs = tuple(draw(st.lists(st.text(max_size=20), min_size=1, max_size=5)))
    return dict(inputs=inputs, params=_params(draw, kind=kind))


# ------------------------------------------------------------------ properties


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_params())
def test_params_round_trip_through_their_json(params: JobParams):
    assert JobParams.from_json(params.to_json()) == params
    assert JobParams.from_json(params.to_json()).to_json() == params.to_json()  # one text per value
    assert JobParams.from_wire(json.loads(params.to_json())) == params


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs_with_params())
def test_jobs_with_params_round_trip_through_a_signed_request(job: dict):
    _, (signed, body) = request(**job)
    decoded = decode_request(signed.wire, body, NET_ID)
    assert decoded.params == job["params"]
    assert decoded.prompt == job.get("prompt")
    assert decoded.messages == job.get("messages")
    assert decoded.inputs == job.get("inputs")
    assert decoded.kind == ("embed" if "inputs" in job else "chat" if "messages" in job else "generate")
    # one encoding per job: the body the decoder would make is the body
    assert encode_body(decoded.kind, decoded.prompt, decoded.messages, decoded.params, decoded.inputs) == body


# ------------------------------------------------------------------ the body


def test_jobs_without_params_keep_their_bodies_byte_for_byte():
    assert encode_body("generate", "hi", None) == pack("hi")
    assert encode_body("chat", None, CHAT) == pack([list(m) for m in CHAT])
    _, (signed, body) = request(prompt="hi")
    assert body == pack("hi") and decode_request(signed.wire, body, NET_ID).params == JobParams()


def test_a_body_with_params_is_a_sorted_map_with_the_params_json():
    params = JobParams(options=(("temperature", 0.5),), format="json")
    body = encode_body("generate", "hi", None, params)
    assert body == pack({"params": params.to_json(), "prompt": "hi"})
    assert encode_body("chat", None, CHAT, params) == pack({"messages": [list(m) for m in CHAT],
                                                             "params": params.to_json()})
    assert encode_body("embed", None, None, JobParams(), ["a", "b"]) == pack({"input": ["a", "b"]})
    assert encode_body("embed", None, None, JobParams(dimensions=8), ["a"]) == pack(
        {"input": ["a"], "params": '{"dimensions":8}'})


def test_a_chat_carries_tool_results_images_and_earlier_tool_calls():
    params = JobParams.from_wire({
        "tools": TOOLS, "think": "high",
        "message_extras": [[1, {"images": [PNG]}],
                           [2, {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}],
                                "thinking": "I should look it up"}],
                           [3, {"tool_name": "get_weather"}]],
    })
    messages = (*CHAT, ("assistant", ""), ("tool", '{"temp": -3}'))
    _, (signed, body) = request(messages=messages, params=params)
    decoded = decode_request(signed.wire, body, NET_ID)
    assert decoded.messages == messages and decoded.params == params
    assert decoded.params.extra_for(2).tool_calls[0].arguments == {"city": "Oslo"}


@pytest.mark.parametrize("value,kind,match", [
    ({"prompt": "hi", "params": "{}"}, "generate", "empty params"),
    ({"prompt": "hi"}, "generate", "plain body"),
    ({"messages": [["user", "hi"]]}, "chat", "plain body"),
    ({"prompt": "hi", "params": '{"think":true}', "suffix": "x"}, "generate", "unknown field 'suffix'"),
    ({"messages": [["user", "hi"]], "params": '{"think":true}', "tools": "[]"}, "chat", "unknown field 'tools'"),
    ({"input": ["a"], "prompt": "x"}, "embed", "unknown field 'prompt'"),
    ({"params": '{"think":true}'}, "generate", "needs 'prompt'"),
    (["a"], "embed", "is a map"),
    ({"input": []}, "embed", "at least one"),
    ({"input": ["a", 3]}, "embed", r"input\[1\]"),
    ({"input": ["a"] * (jobs.MAX_EMBED_INPUTS + 1)}, "embed", "input"),
    ({"prompt": 7, "params": '{"think":true}'}, "generate", "prompt"),
    ({"params": '{"think": true}', "prompt": "hi"}, "generate", "canonical"),  # spaces in the JSON
    ({"prompt": "hi", "params": '{"think":true}'}, "generate", "canonical"),  # keys out of order
    ({"params": '{"options":{"temperature":1}}', "prompt": "hi"}, "generate", "canonical"),  # 1 is 1.0
    ({"params": '{"bogus":1}', "prompt": "hi"}, "generate", "unknown field 'bogus'"),
    ({"params": '{"options":{"num_ctx":32768}}', "prompt": "hi"}, "generate", "load-time"),
    ({"params": '{"options":{"num_gpu":0}}', "prompt": "hi"}, "generate", "load-time"),
    ({"params": '{"options":{"num_predict":99999}}', "prompt": "hi"}, "generate", "num_predict"),
    ({"params": '{"options":{"temperature":9}}', "prompt": "hi"}, "generate", "temperature"),
    ({"params": '{"images":["@@@@"]}', "prompt": "hi"}, "generate", "not base64"),
    ({"params": '{"images":["AB=C"]}', "prompt": "hi"}, "generate", "not base64"),
    ({"params": '{"think":"max"}', "prompt": "hi"}, "generate", "think"),
    ({"params": "[1,2]", "prompt": "hi"}, "generate", "expected an object"),
    ({"params": "not json", "prompt": "hi"}, "generate", "not valid JSON"),
    ({"params": "[" * 40 + "]" * 40, "prompt": "hi"}, "generate", "deeper"),
    ({"params": 5, "prompt": "hi"}, "generate", "job params"),
])
def test_malformed_bodies_are_refused_naming_the_field(value, kind, match):
    refused(pack(value), kind, match)


def test_messages_are_checked_field_by_field():
    refused(pack([["user", "hi"], ["robot", "beep"]]), "chat", r"messages\[1\]\.role")
    refused(pack([["user", "hi"], ["user"]]), "chat", r"messages\[1\]")
    refused(pack([["user", 5]]), "chat", r"messages\[0\]\.content")
    refused(pack([["tool", "{}"]] * (jobs.MAX_MESSAGES + 1)), "chat", "messages")


@pytest.mark.parametrize("kind,params,messages,match", [
    ("generate", {"message_extras": [[0, {"images": [PNG]}]]}, 0, "message_extras are for chat"),
    ("generate", {"tools": TOOLS}, 0, "tools need a chat"),
    ("generate", {"truncate": True}, 0, "embed"),
    ("chat", {"images": [PNG]}, 2, "images are for a prompt"),
    ("chat", {"message_extras": [[2, {"images": [PNG]}]]}, 2, r"message_extras\[2\]"),
    ("chat", {"dimensions": 64}, 2, "embed"),
    ("embed", {"think": True}, 0, "only truncate and dimensions"),
    ("embed", {"options": {"seed": 1}}, 0, "only truncate and dimensions"),
])
def test_params_must_fit_the_kind_of_job(kind, params, messages, match):
    value = JobParams.from_wire(params)
    with pytest.raises(MalformedInput, match=match):
        check_job_params(kind, value, messages)
    body = pack({"generate": {"params": value.to_json(), "prompt": "hi"},
                 "chat": {"messages": [list(m) for m in CHAT], "params": value.to_json()},
                 "embed": {"input": ["a"], "params": value.to_json()}}[kind])
    refused(body, kind, match, max_tokens=1 if kind == "embed" else 50)


def test_an_embed_job_asks_one_token_per_input():
    refused(pack({"input": ["a", "b"]}), "embed", "number of inputs", max_tokens=3)
    _, (signed, body) = request(inputs=("a", "b"))
    decoded = decode_request(signed.wire, body, NET_ID)
    assert decoded.kind == "embed" and decoded.inputs == ("a", "b") and decoded.max_tokens == 2
    with pytest.raises(MalformedInput, match="number of inputs"):
        request(inputs=("a", "b"), max_tokens=5)


def test_a_forged_body_does_not_match_its_signed_hash():
    params = JobParams(options=(("seed", 1),))
    _, (signed, body) = request(params=params)
    swapped = encode_body("generate", "why is the sky blue?", None, JobParams(options=(("seed", 2),)))
    with pytest.raises(MalformedInput, match="signed hash"):
        decode_request(signed.wire, swapped, NET_ID)
    with pytest.raises(MalformedInput, match="signed hash"):  # params stripped off
        decode_request(signed.wire, pack("why is the sky blue?"), NET_ID)


def test_oversized_params_and_bodies_are_refused():
    huge = "A" * (jobs.MAX_BODY)  # valid base64 alphabet, one image far over its limit
    with pytest.raises(MalformedInput, match="base64 characters exceeds"):
        JobParams.from_wire({"images": [huge[:300_000]]})
    with pytest.raises(MalformedInput, match="images"):
        JobParams.from_wire({"images": [PNG] * (MAX_IMAGES + 1)})
    with pytest.raises(MalformedInput, match="tools"):
        JobParams.from_wire({"tools": TOOLS * (MAX_TOOLS + 1)})
    with pytest.raises(MalformedInput, match="exceeds"):
        JobParams.from_json(json.dumps({"format": {"description": "x" * MAX_PARAMS_BYTES}}))
    with pytest.raises(MalformedInput, match="exceeds"):
        request(prompt="x" * (MAX_BODY - 100), params=JobParams.from_wire({"format": {"d": "x" * 200}}))
    refused(pack({"params": '{"think":true}', "prompt": "x" * MAX_BODY}), "generate", "exceeds")


def test_load_time_options_never_travel():
    kept, dropped = parse_options({"temperature": 0.2, "num_ctx": 8192, "num_gpu": 1})
    assert kept == (("temperature", 0.2),) and dropped == ("num_ctx", "num_gpu")
    for name in sorted(LOAD_TIME_OPTIONS):
        with pytest.raises(MalformedInput, match="load-time"):
            JobParams.from_wire({"options": {name: 1}})
        with pytest.raises(MalformedInput, match="not supported"):
            JobParams(options=((name, 1),))


def test_option_values_are_in_their_checked_form():
    with pytest.raises(MalformedInput, match="checked form"):
        JobParams(options=(("temperature", 1),))  # 1.0 is its form: the JSON must be one text
    with pytest.raises(MalformedInput, match="checked form"):
        JobParams(options=(("stop", ["a"]),))
    assert JobParams(options=(("temperature", 1.0),)).to_json() == '{"options":{"temperature":1.0}}'


# ------------------------------------------------------------------ the bound


def test_the_input_bound_counts_images_tools_and_earlier_calls():
    plain = prompt_token_bound("look", None)
    with_images = prompt_token_bound("look", None, params=JobParams(images=(PNG, PNG)))
    assert with_images == plain + 2 * IMAGE_TOKENS
    tools_params = JobParams.from_wire({"tools": TOOLS, "format": {"type": "object"}})
    chat = prompt_token_bound(None, CHAT)
    assert prompt_token_bound(None, CHAT, params=tools_params) == chat + len(tools_params.tools_json.encode()) + len(
        tools_params.format.encode())
    call = JobParams.from_wire({"message_extras": [[1, {"images": [PNG], "tool_calls": [
        {"name": "f", "arguments": {"a": 1}}], "thinking": "hmm"}]]})
    assert prompt_token_bound(None, CHAT, params=call) == chat + IMAGE_TOKENS + len("f") + len('{"a":1}') + \
        jobs.TOOL_CALL_OVERHEAD_TOKENS + len("hmm")
    assert prompt_token_bound(inputs=("ab", "é")) == 2 + 2 + 2 * EMBED_INPUT_OVERHEAD_TOKENS
    assert prompt_token_bound("look", None, params=JobParams()) == plain  # legacy jobs: unchanged

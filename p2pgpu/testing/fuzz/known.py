"""Findings we know of and have reported, but that are not fixed yet, and
the ones fixed since (kept as regression inputs).

Each entry is a finding's signature (``Finding.signature``: target, kind,
exception type, the p2pgpu function that raised) with the smallest input we
know that makes it, in the target's own input form (or a function that
makes it from the corpus). ``tests/test_fuzz.py`` checks both ways:

- the short pass finds nothing outside this list, so the list cannot grow
  silently: a new finding fails the test until it is fixed or added here
  (with its reproducer and a note);
- every reproducer still makes its finding, so a fixed bug fails the test
  too, saying which entry to delete: the list never keeps an entry that no
  longer protects anything.

Move an entry to ``FIXED_FINDINGS`` in the commit that fixes it: from then
on its reproducer must stay handled (``tests/test_fuzz.py``). Several
entries share one root cause; the notes say which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["KnownFinding", "KNOWN_FINDINGS", "KNOWN_SIGNATURES", "FIXED_FINDINGS"]


@dataclass(frozen=True)
class KnownFinding:
    signature: str
    input: Any  # the reproducer, as the target's ``generate`` would make it, or a function making it
    note: str
    bound_s: float | None = None  # a slow finding: the reproducer takes longer than this (5 times it here)

    def make(self) -> Any:
        return self.input() if callable(self.input) else self.input


# Root causes (file:line as of the run that found them; a signature names the function).
#
# J (fixed: encode_body and the stop option refuse a lone surrogate as MalformedInput).
#
# J. A lone surrogate in the text of a submitted job (a "\ud800" escape in a
#    client's JSON: the prompt, a message, the system prompt, an input to
#    embed, a stop sequence) passes the local API's and the gateway's checks
#    and reaches the msgpack packer in p2pgpu/core/jobs.py:433 and :436
#    (encode_body, through submission.work_of): UnicodeEncodeError, not
#    MalformedInput. The API answers 500 (for a stop sequence already at
#    p2pgpu/api.py:646, _submit_request, measuring params.to_json() as
#    UTF-8); each gateway surface raises it out of prompt_bound
#    (p2pgpu/gateway/jobs.py, which catches MalformedInput only), so out of
#    its handler. Not reachable from peers: msgpack strings are strict UTF-8.
#
# Fixed since the first full pass (FIXED_FINDINGS keeps their inputs):
#
# A. p2pgpu/core/jobparams.py:148 (_json_size) and :119 (parse_json_value)
#    called ``text.encode()`` on JSON whose strings may hold a lone surrogate
#    (a "\ud800" escape): UnicodeEncodeError. From peers: a REQUEST body's
#    params (provider side) and a TOKENS frame's tool call (consumer side,
#    through output_refusal -> ToolCall.of); also every gateway surface and
#    the local API's "params".
# B. p2pgpu/core/jobparams.py:177 (_check_option): math.isfinite() of an
#    integer too large for a float (a 400-digit "temperature"): OverflowError.
# C. p2pgpu/core/genesis.py:107 (Genesis.from_json) caught JSONDecodeError
#    only: deep nesting raised RecursionError, 4,301 digits ValueError.
# D. p2pgpu/api.py:560 (_json_object) did not catch RecursionError: a body
#    of 5,000 "[" was a 500.
# E. p2pgpu/gateway/ollama_api.py:94 (_options): int() of num_predict NaN
#    (ValueError) or Infinity (OverflowError).
# F. p2pgpu/gateway/ollama_api.py:166 (_messages): ``role not in ROLES`` (a
#    frozenset) with a list as role: TypeError.
# G. p2pgpu/gateway/openai_api.py:173 and :180 (_messages): tool_calls that
#    is a number, a list as tool_call_id: TypeError.
# H. p2pgpu/gateway/openai_api.py:222 (_response_format): json_schema that
#    is not an object: AttributeError.
# I. p2pgpu/core/identity.py:40 (public_key_from_peer_id) base58-decoded a
#    string of any length, and base58 decoding is quadratic (64 KB: 2 s):
#    genesis allocation keys, the local API's "to" and "account".

_SURROGATE_FORMAT = '{"format":{"\\ud800":1}}'  # JSON text: the escape, not the character
_HUGE = 10**400


def _request_with_params() -> tuple[bytes, bytes]:
    """A signed request whose body carries ``_SURROGATE_FORMAT`` as params (A)."""
    from p2pgpu.core.codec import pack
    from p2pgpu.core.jobs import body_hash
    from p2pgpu.testing.fuzz.corpus import corpus
    from p2pgpu.testing.fuzz.targets import _with_body_hash

    c = corpus()
    wire, _ = c.requests[0]  # a generate job
    body = pack({"params": _SURROGATE_FORMAT, "prompt": "why is the sky blue?"})
    return _with_body_hash(c, wire, body_hash(body)), body


def _tool_call_with_surrogate() -> tuple[int, tuple]:
    """A whole chat job whose tool-call frame names an argument "\\ud800" (A)."""
    import msgpack

    from p2pgpu.core import jobs
    from p2pgpu.core.codec import pack
    from p2pgpu.testing.fuzz.corpus import corpus

    index, script = corpus().consumer_scripts[1]
    steps = []
    for frame in script:
        value = msgpack.unpackb(frame, raw=False)
        if value[0] == jobs.TOKENS and value[6:] == [jobs.TOOL_CALL]:
            value[3] = '{"name":"weather","arguments":{"\\ud800":1}}'
            frame = pack(value)
        steps.append(("frame", frame))
    return index, tuple(steps)


def _genesis_with_key(key: str) -> str:
    import json

    from p2pgpu.testing.fuzz.corpus import corpus

    genesis = json.loads(corpus().genesis_texts[0])
    genesis["allocations"][key] = 1
    return json.dumps(genesis)


def _submit(body: bytes) -> tuple[str, bytes, bytes, bool]:
    return "POST", b"/v1/submit", body, True


_OLLAMA = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]}
_OPENAI = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]}

KNOWN_FINDINGS: tuple[KnownFinding, ...] = ()


KNOWN_SIGNATURES = frozenset(k.signature for k in KNOWN_FINDINGS)


FIXED_FINDINGS: tuple[KnownFinding, ...] = (
    # --- from peers
    KnownFinding("jobs.decode_request: untyped UnicodeEncodeError at p2pgpu/core/jobparams.py:_json_size",
                 _request_with_params, "A: a consumer's REQUEST body broke the provider's decoder"),
    KnownFinding("jobs.decode_body: untyped UnicodeEncodeError at p2pgpu/core/jobparams.py:_json_size",
                 ("generate", bytes.fromhex("82a6706172616d73b77b22666f726d6174223a7b225c7564383030223a317d7d"
                                            "a670726f6d7074a26869")), "A"),
    KnownFinding("jobs.ConsumerSession: untyped UnicodeEncodeError at p2pgpu/core/jobparams.py:_json_size",
                 _tool_call_with_surrogate, "A: a provider's TOKENS frame (tool call) broke the consumer's session"),
    # --- job params as a peer sends them (msgpack strings hold no lone surrogate; JSON escapes do)
    KnownFinding("jobparams.JobParams.from_json: untyped UnicodeEncodeError at p2pgpu/core/jobparams.py:_json_size",
                 _SURROGATE_FORMAT, "A"),
    KnownFinding("jobparams.JobParams.from_json: untyped UnicodeEncodeError at p2pgpu/core/jobparams.py:parse_json_value",
                 '{"message_extras":[[0,{"tool_calls":[{"name":"f","arguments":"\\ud800"}]}]]}',
                 "A: a tool call's arguments as a JSON string holding an escaped lone surrogate"),
    KnownFinding("jobparams.JobParams.from_json: untyped OverflowError at p2pgpu/core/jobparams.py:_check_option",
                 '{"options":{"temperature":1' + "0" * 400 + "}}", "B"),
    # --- genesis files
    KnownFinding("genesis.Genesis.from_json: untyped RecursionError at p2pgpu/core/genesis.py:from_json",
                 "[" * 5000, "C"),
    KnownFinding("genesis.Genesis.from_json: untyped ValueError at p2pgpu/core/genesis.py:from_json",
                 "1" * 5000, "C"),
    KnownFinding("genesis.Genesis.from_json: slow", lambda: _genesis_with_key("z" * 32_768),
                 "I: one 32 KiB allocation key: 0.5 s (64 KiB: 2.8 s)", bound_s=0.1),
    # --- the local API
    KnownFinding("api: check 'status 500' RecursionError at p2pgpu/api.py:_json_object",
                 ("POST", b"/v1/send", b"[" * 5000, True), "D"),
    KnownFinding("api: check 'status 500' UnicodeEncodeError at p2pgpu/core/jobparams.py:_json_size",
                 _submit(b'{"model":"m","prompt":"hi","params":{"format":{"\\ud800":1}}}'), "A"),
    # --- the gateway
    KnownFinding("gateway.ollama.chat_request: untyped TypeError at p2pgpu/gateway/ollama_api.py:_messages",
                 {"model": "m", "messages": [{"role": []}]}, "F"),
    KnownFinding("gateway.ollama.chat_request: untyped UnicodeEncodeError at p2pgpu/core/jobparams.py:_json_size",
                 {**_OLLAMA, "format": {"\ud800": 1}}, "A"),
    KnownFinding("gateway.ollama.chat_request: untyped UnicodeEncodeError at p2pgpu/core/jobparams.py:parse_json_value",
                 {"model": "m", "messages": [{"role": "assistant", "tool_calls": [
                     {"function": {"name": "f", "arguments": "\ud800"}}]}]}, "A"),
    KnownFinding("gateway.ollama.chat_request: untyped OverflowError at p2pgpu/core/jobparams.py:_check_option",
                 {**_OLLAMA, "options": {"temperature": _HUGE}}, "B"),
    KnownFinding("gateway.ollama.chat_request: untyped ValueError at p2pgpu/gateway/ollama_api.py:_options",
                 {**_OLLAMA, "options": {"num_predict": float("nan")}}, "E"),
    KnownFinding("gateway.ollama.chat_request: untyped OverflowError at p2pgpu/gateway/ollama_api.py:_options",
                 {**_OLLAMA, "options": {"num_predict": float("inf")}}, "E"),
    KnownFinding("gateway.ollama.generate_request: untyped UnicodeEncodeError at p2pgpu/core/jobparams.py:_json_size",
                 {"model": "m", "prompt": "hi", "format": {"\ud800": 1}}, "A"),
    KnownFinding("gateway.ollama.generate_request: untyped OverflowError at p2pgpu/core/jobparams.py:_check_option",
                 {"model": "m", "prompt": "hi", "options": {"top_p": _HUGE}}, "B"),
    KnownFinding("gateway.ollama.generate_request: untyped ValueError at p2pgpu/gateway/ollama_api.py:_options",
                 {"model": "m", "prompt": "hi", "options": {"num_predict": float("nan")}}, "E"),
    KnownFinding("gateway.ollama.generate_request: untyped OverflowError at p2pgpu/gateway/ollama_api.py:_options",
                 {"model": "m", "prompt": "hi", "options": {"num_predict": float("-inf")}}, "E"),
    KnownFinding("gateway.openai.chat_request: untyped TypeError at p2pgpu/gateway/openai_api.py:_messages",
                 {"model": "m", "messages": [{"role": "assistant", "tool_calls": 1}]}, "G (also: tool_call_id [])"),
    KnownFinding("gateway.openai.chat_request: untyped AttributeError at p2pgpu/gateway/openai_api.py:_response_format",
                 {**_OPENAI, "response_format": {"type": "json_schema", "json_schema": "x"}}, "H"),
    KnownFinding("gateway.openai.chat_request: untyped UnicodeEncodeError at p2pgpu/core/jobparams.py:_json_size",
                 {**_OPENAI, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"\ud800": 1}}}]},
                 "A"),
    KnownFinding("gateway.openai.chat_request: untyped UnicodeEncodeError at p2pgpu/core/jobparams.py:parse_json_value",
                 {"model": "m", "messages": [{"role": "assistant", "tool_calls": [
                     {"function": {"name": "f", "arguments": "\ud800"}}]}]}, "A"),
    KnownFinding("gateway.openai.chat_request: untyped OverflowError at p2pgpu/core/jobparams.py:_check_option",
                 {**_OPENAI, "temperature": _HUGE}, "B"),
    KnownFinding("gateway.openai.completion_request: untyped OverflowError at p2pgpu/core/jobparams.py:_check_option",
                 {"model": "m", "prompt": "hi", "presence_penalty": -_HUGE}, "B"),
    # --- J: a lone surrogate in a submitted job's text
    KnownFinding("api: check 'status 500' UnicodeEncodeError at p2pgpu/core/jobs.py:encode_body",
                 _submit(b'{"model":"m","prompt":"\\ud800"}'), "J"),
    KnownFinding("api: check 'status 500' UnicodeEncodeError at p2pgpu/api.py:_submit_request",
                 _submit(b'{"model":"m","prompt":"hi","params":{"options":{"stop":"\\ud800"}}}'), "J"),
    KnownFinding("gateway.ollama.chat_request: untyped UnicodeEncodeError at p2pgpu/core/jobs.py:encode_body",
                 {"model": "m", "messages": [{"role": "user", "content": "\ud800"}]}, "J"),
    KnownFinding("gateway.ollama.generate_request: untyped UnicodeEncodeError at p2pgpu/core/jobs.py:encode_body",
                 {"model": "m", "prompt": "\ud800"}, "J"),
    KnownFinding("gateway.openai.chat_request: untyped UnicodeEncodeError at p2pgpu/core/jobs.py:encode_body",
                 {"model": "m", "messages": [{"role": "user", "content": "\ud800"}]}, "J"),
    KnownFinding("gateway.openai.completion_request: untyped UnicodeEncodeError at p2pgpu/core/jobs.py:encode_body",
                 {"model": "m", "prompt": "\ud800"}, "J"),
)

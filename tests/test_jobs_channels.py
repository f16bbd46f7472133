"""Output channels on the job stream (p2pgpu.core.jobs): content, thinking,
tool calls and embeddings in TOKENS frames, between two pure sessions.

Content frames stay the six-element frames they always were; a channel is a
seventh element. Both sides hash every channel into the receipt's output
hash by one rule (content as before, anything else marked and framed), the
consumer refuses a frame whose channel does not fit the job, and an
embedding costs one output token.
"""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest

from p2pgpu.core import jobs
from p2pgpu.core.codec import pack, unpack
from p2pgpu.core.jobparams import JobParams
from p2pgpu.core.jobs import (
    CONTENT,
    EMBEDDING,
    THINKING,
    TOOL_CALL,
    Completed,
    ConsumerSession,
    Deliver,
    LocalProtocolError,
    Prices,
    ProtocolViolation,
    ProviderSession,
    ProviderState,
    RequestReceived,
    Send,
    SessionConfig,
    decode_frame,
    decode_receipt,
    encode_frame,
    job_cost,
    make_request,
    output_hash,
    output_hash_of,
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
CONFIG = SessionConfig(voucher_every=1)
CALL = '{"name":"get_weather","arguments":{"city":"Oslo"}}'


def vector(*values: float) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


class Pair:
    """alice and bob's sessions of one job, joined without loss: every
    ``Send`` goes straight to the other side."""

    def __init__(self, *, max_tokens: int = 20, **job) -> None:
        if not job:
            job = {"prompt": "hi"}
        if "inputs" in job:
            max_tokens = len(job["inputs"])
        bound = prompt_token_bound(job.get("prompt"), job.get("messages"), params=job.get("params", JobParams()),
                                   inputs=job.get("inputs"))
        ledger = Ledger(MemoryStore(), GENESIS)
        hold = ledger.hold(alice, bob.public_key, job_cost(PRICES, bound, max_tokens), START_MS + 600_000, JOB_ID,
                           START_MS)
        signed, body = make_request(alice, NET_ID, START_MS, job_id=JOB_ID, model="m", hold=hold, prices=PRICES,
                                    max_prompt_tokens=bound, max_tokens=max_tokens, credit_window=64, **job)
        self.c = ConsumerSession(alice, NET_ID, signed, body, CONFIG)
        self.p = ProviderSession(bob, NET_ID, CONFIG)
        self.c_actions: list = []
        self.frames: list[list] = []  # what went from bob to alice, as raw arrays
        self._to_p(self.c.start(START_MS))
        self._to_c(self.p.accept(START_MS))

    def _to_p(self, actions) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._to_c(self.p.receive(action.data, START_MS))

    def _to_c(self, actions) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.frames.append(unpack(action.data, max_size=1 << 20))
                replies = self.c.receive(action.data, START_MS)
                self.c_actions += replies
                self._to_p(replies)
            elif isinstance(action, RequestReceived):
                pass

    def tokens(self, text: str, count: int = 1, channel: int = CONTENT) -> None:
        self._to_c(self.p.tokens(START_MS, text, count, channel))

    def finish(self, prompt_tokens: int = 5) -> Completed:
        self._to_c(self.p.finished(START_MS, prompt_tokens, self.p.sent))
        (done,) = [a for a in self.c_actions if isinstance(a, Completed)]
        return done

    def delivered(self) -> list[tuple[str, int, int]]:
        return [(a.text, a.count, a.channel) for a in self.c_actions if isinstance(a, Deliver)]


def test_content_frames_are_unchanged_and_other_channels_add_one_element():
    pair = Pair()
    pair.tokens("Let me think", 1, THINKING)
    pair.tokens("Hello", 1)
    pair.tokens(" world", 2)
    tokens = [f for f in pair.frames if f[0] == jobs.TOKENS]
    assert tokens[0][2:] == [0, "Let me think", 1, 1, THINKING]
    assert tokens[1][2:] == [1, "Hello", 1, 2]  # six elements: what every older peer sent and reads
    assert pair.delivered() == [("Let me think", 1, THINKING), ("Hello", 1, CONTENT), (" world", 2, CONTENT)]
    done = pair.finish()
    assert done.receipt.output_tokens == 4
    assert done.paid == job_cost(PRICES, 5, 4)  # thinking tokens are output tokens, paid as such


def test_a_content_only_job_hashes_exactly_as_before():
    pair = Pair()
    for text in ("The ", "sky ", "is ", "blue."):
        pair.tokens(text)
    done = pair.finish()
    assert done.receipt.output_hash == output_hash("The sky is blue.")
    assert output_hash_of([(CONTENT, "The sky "), (CONTENT, "is blue.")]) == output_hash("The sky is blue.")


def test_the_output_hash_marks_and_frames_every_other_channel():
    pair = Pair(messages=(("user", "weather in Oslo?"),),
                params=JobParams.from_wire({"tools": [{"type": "function", "function": {"name": "get_weather"}}]}))
    pair.tokens("hmm", 1, THINKING)
    pair.tokens(CALL, 1, TOOL_CALL)
    pair.tokens("ok")
    done = pair.finish()
    expected = hashlib.blake2b(
        b"\xff\x01" + (3).to_bytes(4, "big") + b"hmm" + b"\xff\x02" + len(CALL).to_bytes(4, "big") + CALL.encode()
        + b"ok", digest_size=32).digest()
    assert done.receipt.output_hash == expected == output_hash_of([(THINKING, "hmm"), (TOOL_CALL, CALL),
                                                                   (CONTENT, "ok")])
    # the same texts on other channels, or split otherwise, hash differently
    assert output_hash_of([(CONTENT, "hmm"), (TOOL_CALL, CALL), (CONTENT, "ok")]) != expected
    assert output_hash_of([(THINKING, "hm"), (THINKING, "m"), (TOOL_CALL, CALL), (CONTENT, "ok")]) != expected


def test_an_embed_job_delivers_one_vector_per_input_billed_as_one_token_each():
    pair = Pair(inputs=("first text", "second"))
    pair.tokens(vector(0.5, -0.25), 1, EMBEDDING)
    pair.tokens(vector(1.0, 0.0), 1, EMBEDDING)
    with pytest.raises(LocalProtocolError, match="max_tokens"):  # one vector per input, no more
        pair.p.tokens(START_MS, vector(1.0), 1, EMBEDDING)
    done = pair.finish(prompt_tokens=6)
    assert [channel for _, _, channel in pair.delivered()] == [EMBEDDING, EMBEDDING]
    assert done.receipt.output_tokens == 2 and done.paid == job_cost(PRICES, 6, 2)
    assert done.receipt.output_hash == output_hash_of([(EMBEDDING, vector(0.5, -0.25)), (EMBEDDING, vector(1.0, 0.0))])


@pytest.mark.parametrize("job,text,count,channel,match", [
    ({"prompt": "hi"}, vector(1.0), 1, EMBEDDING, "no embedding output"),
    ({"inputs": ("a", "b")}, "words", 1, CONTENT, "no content output"),
    ({"inputs": ("a", "b")}, vector(1.0), 2, EMBEDDING, "one token"),
    ({"inputs": ("a", "b")}, "not base64!", 1, EMBEDDING, "not base64"),
    ({"inputs": ("a", "b")}, base64.b64encode(b"abc").decode(), 1, EMBEDDING, "float32"),
    ({"prompt": "hi"}, "get_weather(Oslo)", 1, TOOL_CALL, "not valid JSON"),
    ({"prompt": "hi"}, '{"name":"f"}', 1, TOOL_CALL, "name"),
    ({"prompt": "hi"}, '{"name":"f","arguments":[1]}', 1, TOOL_CALL, "JSON object"),
    ({"prompt": "hi"}, '{"name": "f", "arguments": {}}', 1, TOOL_CALL, "canonical"),
])
def test_a_frame_that_does_not_fit_the_job_is_refused_on_both_sides(job, text, count, channel, match):
    pair = Pair(**job)
    with pytest.raises(LocalProtocolError, match=match):
        pair.p.tokens(START_MS, text, count, channel)
    frame = pack([jobs.TOKENS, JOB_ID, 0, text, count, count] + ([channel] if channel else []))
    before = pair.c.snapshot()
    with pytest.raises(ProtocolViolation, match=match):
        pair.c.receive(frame, START_MS)
    assert pair.c.snapshot() == before


def test_the_channel_element_is_checked_on_decode():
    base = [jobs.TOKENS, JOB_ID, 0, "x", 1, 1]
    assert decode_frame(pack(base)).args == (0, "x", 1, 1, CONTENT)
    assert decode_frame(pack(base + [THINKING])).args == (0, "x", 1, 1, THINKING)
    for bad in (0, 4, -1, "thinking", True):  # content is sent without the element: one encoding per frame
        with pytest.raises(MalformedInput, match="channel"):
            decode_frame(pack(base + [bad]))
    with pytest.raises(MalformedInput):
        decode_frame(pack(base + [THINKING, 0]))


def test_frames_buffered_while_paused_keep_their_channels():
    pair = Pair()
    pair.p.state = ProviderState.PAUSED  # as after a full credit window
    pair.p.tokens(START_MS, "deep thought", 1, THINKING)
    pair.p.tokens(START_MS, "answer", 1)
    assert pair.p.buffer == (("deep thought", 1, THINKING), ("answer", 1, CONTENT))
    actions = pair.p._resume_if_paused()[1]
    sent = [decode_frame(a.data).args for a in actions if isinstance(a, Send)]
    assert sent == [(0, "deep thought", 1, 1, THINKING), (1, "answer", 1, 2, CONTENT)]


def test_encode_frame_round_trips_a_receipt_over_channels():
    pair = Pair()
    pair.tokens("a", 1, THINKING)
    pair.tokens("b")
    receipt_frames = [f for f in pair.frames if f[0] == jobs.RECEIPT]
    assert not receipt_frames
    pair._to_c(pair.p.finished(START_MS, 3, 2))
    (frame,) = [f for f in pair.frames if f[0] == jobs.RECEIPT]
    receipt = decode_receipt(decode_frame(encode_frame(*frame)).args[0], NET_ID)
    assert receipt.output_hash == output_hash_of([(THINKING, "a"), (CONTENT, "b")])

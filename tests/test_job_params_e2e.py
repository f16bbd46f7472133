"""Jobs with params end to end over real libp2p streams (p2pgpu.jobrunner):
consumer API shape -> signed REQUEST -> provider -> the official ollama
client -> the Ollama stand-in -> TOKENS on their channels -> receipt and pay.

Two real hosts on 127.0.0.1 with their ledgers and replicators (the
helpers of ``test_jobrunner``), and real nodes (``LocalNetwork``) for the
consumer's events. What reached "Ollama" is read from the stand-in's
record of the requests it received; every wait is on a condition under a
deadline.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio
from test_jobrunner import DEADLINE, PRICES, Pair, _peer, now_ms, provider

from p2pgpu.api import SubmitRequest
from p2pgpu.core import jobs
from p2pgpu.core.codec import Tag, pack, sign_object
from p2pgpu.core.jobparams import JobParams
from p2pgpu.core.jobs import CONTENT, EMBEDDING, REQUEST, THINKING, TOOL_CALL, body_hash, job_cost, output_hash_of
from p2pgpu.core.protocols import JOB_PROTOCOL
from p2pgpu.errors import P2PGPUError
from p2pgpu.testing.nodes import LocalNetwork, collect, live
from p2pgpu.testing.ollama_standin import expected_completion, expected_embedding, serve_standin
from p2pgpu.testing.waiting import wait_until

MODEL = "llama3.2:1b"
QWEN3 = "qwen3:0.6b"  # a thinking model
EMBED = "nomic-embed-text:latest"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@asynccontextmanager
async def pair(**standin_kw) -> AsyncIterator[Pair]:
    """alice (consumer) and bob (provider) connected; bob serves ``MODEL``
    and ``EMBED`` from one stand-in."""
    async with AsyncExitStack() as stack:
        standin = await stack.enter_async_context(serve_standin([MODEL, QWEN3, EMBED], **standin_kw))
        nursery = await stack.enter_async_context(trio.open_nursery())
        alice = await _peer(stack, nursery, "alice")
        bob, service = await provider(stack, nursery, standin)
        await alice.host.connect(bob.host.listen_addrs()[0])
        yield Pair(alice, bob, service, standin)


def floats(text: str) -> list[float]:
    data = base64.b64decode(text, validate=True)
    return list(struct.unpack(f"<{len(data) // 4}f", data))


def as_float32(values: list[float]) -> list[float]:
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


def bodies(standin, path: str) -> list[dict]:
    return [r.body for r in standin.requests if r.path == path]


async def test_an_embedding_job_delivers_its_vectors_and_pays_one_token_each():
    texts = ["the sky is blue", "peer to peer"]
    async with pair() as p:
        seen: list[tuple[str, int, int]] = []
        with trio.fail_after(DEADLINE):
            result = await p.job(model=EMBED, prompt=None, inputs=texts, max_tokens=2,
                                 params=JobParams(dimensions=64),
                                 on_tokens=lambda text, count, channel: seen.append((text, count, channel)))
        assert result.status == "completed", result.reason
        assert [(count, channel) for _, count, channel in seen] == [(1, EMBEDDING), (1, EMBEDDING)]
        for (text, _, _), source in zip(seen, texts):
            assert floats(text) == as_float32(expected_embedding(EMBED, source, 64))
        assert result.text == "" and result.tokens == 2  # no content: the vectors are not the answer's text
        (body,) = bodies(p.standin, "/api/embed")
        assert body["input"] == texts and body["dimensions"] == 64 and "options" not in body
        receipt = result.receipt
        assert receipt.output_tokens == 2 and receipt.prompt_eval_count > 0
        assert result.cost == job_cost(PRICES, receipt.prompt_eval_count, 2)
        await wait_until(p.agree, timeout=DEADLINE)
        assert p.service.claims  # bob was paid from the hold


async def test_thinking_arrives_on_its_channel_before_the_answer_and_is_paid_for():
    async with pair() as p:
        seen: list[tuple[str, int, int]] = []
        with trio.fail_after(DEADLINE):
            result = await p.job(model=QWEN3, prompt=None, messages=[("user", "why is the sky blue?")],
                                 params=JobParams(think=True), max_tokens=300,
                                 on_tokens=lambda text, count, channel: seen.append((text, count, channel)))
        assert result.status == "completed", result.reason
        expected = expected_completion(QWEN3, [{"role": "user", "content": "why is the sky blue?"}],
                                       num_predict=300, think=True)
        assert expected.thinking and expected.tokens
        assert [t for t, _, c in seen if c == THINKING] == list(expected.thinking)
        assert [t for t, _, c in seen if c == CONTENT] == list(expected.tokens)
        assert result.text == expected.text  # the answer is the content alone
        receipt = result.receipt  # it matched what alice received on both channels, or she would have refused it
        assert receipt.output_tokens == result.tokens == len(expected.thinking) + len(expected.tokens)
        assert receipt.output_hash == output_hash_of([(c, t) for t, _, c in seen])
        assert result.cost == job_cost(PRICES, receipt.prompt_eval_count, result.tokens)


async def test_a_tool_call_arrives_whole_on_its_channel_counted_with_its_tokens():
    async with pair() as p:
        messages = [("user", "what is the weather in Oslo?")]
        seen: list[tuple[str, int, int]] = []
        with trio.fail_after(DEADLINE):
            result = await p.job(prompt=None, messages=messages, max_tokens=64,
                                 params=JobParams.from_wire({"tools": TOOLS}),
                                 on_tokens=lambda text, count, channel: seen.append((text, count, channel)))
        assert result.status == "completed", result.reason
        expected = expected_completion(MODEL, [{"role": "user", "content": messages[0][1]}], num_predict=64,
                                       tools=TOOLS)
        calls = [json.loads(t) for t, _, c in seen if c == TOOL_CALL]
        assert calls == [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                         for c in expected.tool_calls]
        assert calls and calls[0]["name"] == "get_weather"
        # a call's tokens are decoded unstreamed: it is counted with them, so every token Ollama decoded is paid
        assert result.tokens == expected.eval_count == result.receipt.eval_count == result.receipt.output_tokens
        assert [count for _, count, c in seen if c == TOOL_CALL] == [expected.eval_count - len(expected.tokens)]
        assert result.cost == job_cost(PRICES, result.receipt.prompt_eval_count, expected.eval_count)


async def test_sampling_options_reach_ollama_and_nothing_load_time_does():
    async with pair() as p:
        params = JobParams.from_wire({"options": {"seed": 42, "temperature": 0.7, "top_k": 20, "stop": ["\n\n"]}})
        with trio.fail_after(DEADLINE):
            result = await p.job(params=params, max_tokens=12)
        assert result.status == "completed", result.reason
        (body,) = bodies(p.standin, "/api/generate")
        assert body["options"] == {"seed": 42, "temperature": 0.7, "top_k": 20, "stop": ["\n\n"], "num_predict": 12}
        assert result.receipt.output_tokens == result.tokens > 0


async def test_a_chat_with_a_tool_result_and_earlier_call_reaches_ollama_whole():
    async with pair() as p:
        params = JobParams.from_wire({
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "properties": {"city": {"type": "string"}}}}}],
            "format": "json",
            "message_extras": [[1, {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}],
                               [2, {"tool_name": "get_weather"}]],
        })
        messages = [("user", "weather in Oslo?"), ("assistant", ""), ("tool", '{"temp": -3}')]
        with trio.fail_after(DEADLINE):
            result = await p.job(prompt=None, messages=messages, params=params, max_tokens=16)
        assert result.status == "completed", result.reason
        (body,) = bodies(p.standin, "/api/chat")
        sent = body["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
        assert sent[1]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
        assert sent[2]["tool_name"] == "get_weather" and sent[2]["content"] == '{"temp": -3}'
        assert body["format"] == "json" and body["tools"][0]["function"]["name"] == "get_weather"
        assert body["options"] == {"num_predict": 16}


async def test_a_forged_request_never_reaches_ollama():
    """alice signs a body the honest codec would never make (a load-time
    option smuggled into its params): bob refuses it as he decodes it and
    ends the stream; the stand-in is never asked to generate."""
    async with pair() as p:
        hold = (await p.alice.rep.append(lambda lg: lg.hold(
            p.alice.key, p.bob.key.public_key, 10**6, now_ms() + 60_000, bytes(16), now_ms())))[0]
        body = pack({"params": '{"options":{"num_ctx":131072}}', "prompt": "hi"})
        signed = sign_object(p.alice.key, Tag.JOB_REQUEST, p.alice.ledger.network_id, now_ms(), [
            bytes(16), MODEL, "generate", body_hash(body), 100, 10, PRICES.price_in, PRICES.price_out, 8,
            hold.wire])
        stream = await p.alice.host.open_stream(p.bob.host.peer_id, JOB_PROTOCOL)
        await stream.send_frame(jobs.encode_frame(REQUEST, bytes(16), signed.wire, body, []))
        with trio.fail_after(DEADLINE):
            try:
                reply = await stream.receive_frame()
            except (P2PGPUError, trio.BrokenResourceError):
                reply = None
        assert reply is None  # no ACCEPT, no REJECT: a peer's malformed frame ends the stream
        assert not [r for r in p.standin.requests if r.path in ("/api/generate", "/api/chat")]
        await stream.reset()


# ------------------------------------------------------------------ through a node


def settled(net) -> bool:
    hashes = {n.ledger.state_hash() for n in net.nodes}
    return len(hashes) == 1 and all(n.ledger.account(k.public_key).held == 0 for n in net.nodes for k in net.keys)


async def test_a_nodes_events_carry_channels_and_the_done_figures(tmp_path):
    async with serve_standin(models=(MODEL, QWEN3, EMBED), tokens_per_second=None) as standin, \
            trio.open_nursery() as nursery:
        net = LocalNetwork(tmp_path, 2)
        await net.start(nursery, 0, standin.host)
        consumer = await net.start(nursery, 1)
        await wait_until(lambda: live(consumer))

        events = await collect(consumer, SubmitRequest(model=EMBED, inputs=("a", "b", "c"), max_tokens=3,
                                                       params=JobParams(dimensions=16)))
        tokens = [e for e in events if e["type"] == "token"]
        assert [set(e) for e in tokens] == [{"type", "text", "channel"}] * 3
        assert all(e["channel"] == "embedding" for e in tokens)
        assert [floats(e["text"]) for e in tokens] == [as_float32(expected_embedding(EMBED, t, 16)) for t in "abc"]
        done = events[-1]
        assert done["type"] == "done" and done["done_reason"] == "stop" and done["eval_count"] == done["tokens"] == 3
        assert set(done["durations_ns"]) == {"total", "load", "prompt_eval", "eval"}
        assert done["durations_ns"]["total"] > 0

        events = await collect(consumer, SubmitRequest(
            model=MODEL, prompt="why is the sky blue?", system="be brief", max_tokens=6,
            params=JobParams.from_wire({"options": {"seed": 9}})))
        tokens = [e for e in events if e["type"] == "token"]
        assert tokens and all(set(e) == {"type", "text"} for e in tokens)  # content: as it always was
        done = events[-1]
        assert done["done_reason"] == "length" and done["eval_count"] == 6
        assert done["durations_ns"]["eval"] > 0
        (body,) = bodies(standin, "/api/chat")  # prompt + system: a chat
        assert body["options"] == {"seed": 9, "num_predict": 6}
        assert body["messages"][0] == {"role": "system", "content": "be brief"}
        record = consumer.job(done["job_id"])
        assert record["text"] == "".join(e["text"] for e in tokens)

        events = await collect(consumer, SubmitRequest(model=QWEN3, messages=(("user", "why?"),), max_tokens=200,
                                                       params=JobParams(think=True)))
        tokens = [e for e in events if e["type"] == "token"]
        thinking = [e["text"] for e in tokens if e.get("channel") == "thinking"]
        answer = [e["text"] for e in tokens if "channel" not in e]
        assert thinking and answer and len(thinking) + len(answer) == len(tokens)
        assert tokens.index(next(e for e in tokens if "channel" not in e)) == len(thinking)  # thoughts first
        assert consumer.job(events[-1]["job_id"])["text"] == "".join(answer)  # the record keeps the answer
        assert events[-1]["eval_count"] == len(tokens)

        await wait_until(lambda: settled(net), timeout=30)
        for node in net.nodes:
            node.stop()


async def test_a_vector_too_long_for_a_frame_fails_the_job_and_costs_nothing():
    """A model whose vectors are too long for one TOKENS frame (here: more
    than 12288 float32 values) fails the job on the provider with a reason;
    the consumer pays nothing, as for any failure before the first token."""
    class Wide:
        def __init__(self, inner) -> None:
            self.inner = inner
            self.host = inner.host

        async def models(self):
            return await self.inner.models()

        def stream(self, request):
            return self.inner.stream(request)

        async def embed(self, model, inputs, *, truncate=None, dimensions=None):
            result = await self.inner.embed(model, inputs, truncate=truncate, dimensions=dimensions)
            return type(result)([v * 20 for v in result.vectors], result.prompt_eval_count,
                                result.total_duration_ns, result.load_duration_ns)

    async with pair() as p:
        p.service.backend = Wide(p.service.backend)
        with trio.fail_after(DEADLINE):
            result = await p.job(model=EMBED, prompt=None, inputs=["x"], max_tokens=1)
        assert result.status == "failed" and "does not fit a tokens frame" in result.reason
        assert result.cost == 0 and result.tokens == 0


async def test_a_job_ollama_refuses_fails_with_its_reason_and_does_not_make_the_backend_suspect():
    suspicions: list[Exception] = []
    async with AsyncExitStack() as stack:
        standin = await stack.enter_async_context(serve_standin([MODEL]))
        nursery = await stack.enter_async_context(trio.open_nursery())
        alice = await _peer(stack, nursery, "alice")
        bob, service = await provider(stack, nursery, standin, on_backend_failure=suspicions.append)
        await alice.host.connect(bob.host.listen_addrs()[0])
        with trio.fail_after(DEADLINE):
            result = await Pair(alice, bob, service, standin).job(params=JobParams(think=True))
        assert result.status == "failed" and "does not support thinking" in result.reason
        assert result.cost == 0 and result.retryable
        assert suspicions == []


async def test_a_request_the_backend_cannot_run_fails_cleanly():
    """The wire allows up to 2^24 output tokens, the executor 131072: the
    provider fails the job with a reason (and a waiver) instead of
    breaking, and serves the next one."""
    async with pair() as p:
        with trio.fail_after(DEADLINE):
            result = await p.job(max_tokens=200_000)
            assert result.status == "failed" and "not runnable here" in result.reason and result.cost == 0
            assert (await p.job(max_tokens=5)).status == "completed"

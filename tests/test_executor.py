"""The execution edge against the Ollama stand-in, over real HTTP through the
official client: streamed chat and generate, final metrics, every error the
client can raise translated once, cancellation that reaches the server, and
concurrency. Waiting is on the stand-in's conditions under a deadline, never
a sleep."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio

from p2pgpu.errors import ExecutionFailed, MalformedInput
from p2pgpu.executor import (
    DEFAULT_KEEP_ALIVE_S,
    MAX_KEEP_ALIVE_S,
    Busy,
    Chunk,
    Finished,
    GenerationRequest,
    Message,
    ModelNotFound,
    OllamaBackend,
    clamp_keep_alive,
)
from p2pgpu.testing.ollama_standin import (
    RUNNER_ERROR,
    SERVER_BUSY,
    OllamaStandin,
    Outcome,
    serve_standin,
)

LLAMA = "llama3.2:1b"
QWEN = "qwen2.5:0.5b"
HELLO = (Message("user", "Say hello to the network."),)
HELLO_WIRE = [{"role": "user", "content": "Say hello to the network."}]
DEADLINE = 10


@pytest.fixture
async def standin() -> AsyncIterator[OllamaStandin]:
    async with serve_standin([LLAMA, QWEN], tokens_per_second=2000) as standin:
        yield standin


def chat(max_tokens: int = 64, **fields) -> GenerationRequest:
    return GenerationRequest(model=LLAMA, max_tokens=max_tokens, messages=HELLO, **fields)


async def run(backend: OllamaBackend, request: GenerationRequest) -> tuple[list[Chunk], Finished]:
    events = []
    async with backend.stream(request) as stream:
        async for event in stream:
            events.append(event)
    *chunks, final = events
    assert all(isinstance(chunk, Chunk) for chunk in chunks)
    assert isinstance(final, Finished)
    return chunks, final


def assert_matches(chunks: list[Chunk], final: Finished, completion) -> None:
    assert [chunk.text for chunk in chunks] == list(completion.tokens)
    assert all(chunk.tokens == 1 for chunk in chunks)
    assert final.prompt_eval_count == completion.prompt_eval_count
    assert final.eval_count == completion.eval_count == sum(chunk.tokens for chunk in chunks)
    assert final.done_reason == completion.done_reason
    assert final.total_duration_ns > 0 and final.eval_duration_ns > 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the request ----------------------------------------------------------------


def test_requests_are_validated() -> None:
    with pytest.raises(MalformedInput, match="exactly one"):
        GenerationRequest(model=LLAMA, max_tokens=5)
    with pytest.raises(MalformedInput, match="exactly one"):
        GenerationRequest(model=LLAMA, max_tokens=5, messages=HELLO, prompt="x")
    for bad in (0, -1, True, 10**9, 1.5):
        with pytest.raises(MalformedInput, match="max_tokens"):
            chat(max_tokens=bad)
    for bad in (-0.1, float("nan"), float("inf"), 2.5, True):
        with pytest.raises(MalformedInput, match="temperature"):
            chat(temperature=bad)
    with pytest.raises(MalformedInput, match="seed"):
        chat(seed=2**64)
    with pytest.raises(MalformedInput, match="model"):
        GenerationRequest(model=" ", max_tokens=5, prompt="x")
    with pytest.raises(MalformedInput, match="role"):
        Message("robot", "x")
    assert Message("tool", "x").role == "tool"  # a tool's result


def test_options_are_a_whitelist_and_keep_alive_is_clamped() -> None:
    assert chat(max_tokens=7).options() == {"num_predict": 7}
    assert chat(max_tokens=7, seed=3, temperature=0).options() == {
        "num_predict": 7,
        "seed": 3,
        "temperature": 0.0,
    }
    assert clamp_keep_alive(None) == DEFAULT_KEEP_ALIVE_S
    assert clamp_keep_alive(-1) == MAX_KEEP_ALIVE_S  # no "forever" on a shared box
    assert clamp_keep_alive(float("inf")) == MAX_KEEP_ALIVE_S
    assert clamp_keep_alive(0) == 0.0
    assert clamp_keep_alive(60) == 60.0


# -- streaming ------------------------------------------------------------------


async def test_streamed_chat_yields_the_expected_tokens_and_metrics(standin: OllamaStandin) -> None:
    backend = OllamaBackend(standin.host, keep_alive_s=-1)
    chunks, final = await run(backend, chat(max_tokens=1000, seed=42, temperature=0.5))
    assert_matches(chunks, final, standin.expected_completion(LLAMA, HELLO_WIRE, seed=42))
    assert final.done_reason == "stop"
    body = standin.requests[-1].body
    # Only whitelisted options, and keep_alive clamped, reach Ollama.
    assert body["options"] == {"num_predict": 1000, "seed": 42, "temperature": 0.5}
    assert body["keep_alive"] == MAX_KEEP_ALIVE_S
    assert standin.generations[-1].outcome is Outcome.COMPLETED


async def test_streamed_generate_with_and_without_system(standin: OllamaStandin) -> None:
    backend = OllamaBackend(standin.host)
    prompt = "Why is the sky blue?"
    chunks, final = await run(backend, GenerationRequest(model=QWEN, max_tokens=100, prompt=prompt, seed=3))
    assert_matches(chunks, final, standin.expected_completion(QWEN, prompt, seed=3))
    assert standin.requests[-1].path == "/api/generate"

    with_system = GenerationRequest(model=QWEN, max_tokens=100, prompt="hi", system="Be brief.")
    chunks, final = await run(backend, with_system)
    as_messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert_matches(chunks, final, standin.expected_completion(QWEN, as_messages))

    # A chat's system prompt goes first, as a system message.
    chunks, final = await run(
        backend, GenerationRequest(model=QWEN, max_tokens=100, messages=(Message("user", "hi"),), system="Be brief.")
    )
    assert_matches(chunks, final, standin.expected_completion(QWEN, as_messages))


async def test_max_tokens_stops_with_done_reason_length(standin: OllamaStandin) -> None:
    chunks, final = await run(OllamaBackend(standin.host), chat(max_tokens=5))
    completion = standin.expected_completion(LLAMA, HELLO_WIRE, num_predict=5)
    assert_matches(chunks, final, completion)
    assert (final.done_reason, final.eval_count, len(chunks)) == ("length", 5, 5)


async def test_five_concurrent_streams_complete() -> None:
    async with serve_standin([LLAMA], tokens_per_second=500, parallel=5) as standin:
        backend = OllamaBackend(standin.host)
        results: dict[int, tuple[list[Chunk], Finished]] = {}

        async def one(index: int) -> None:
            request = GenerationRequest(model=LLAMA, max_tokens=20, prompt=f"job {index}")
            results[index] = await run(backend, request)

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                for index in range(5):
                    nursery.start_soon(one, index)
    assert sorted(results) == list(range(5))
    for index, (chunks, final) in results.items():
        assert_matches(chunks, final, standin.expected_completion(LLAMA, f"job {index}", num_predict=20))
    assert standin.completed_generations == 5 and standin.active_generations == 0


# -- errors -----------------------------------------------------------------------


async def test_unknown_model_is_model_not_found(standin: OllamaStandin) -> None:
    backend = OllamaBackend(standin.host)
    with pytest.raises(ModelNotFound, match="nope") as raised:
        await run(backend, GenerationRequest(model="nope", max_tokens=5, prompt="x"))
    assert raised.value.model == "nope"
    assert isinstance(raised.value, ExecutionFailed)


async def test_server_down_is_a_clear_execution_failure() -> None:
    host = f"http://127.0.0.1:{free_port()}"
    backend = OllamaBackend(host)
    with pytest.raises(ExecutionFailed, match=f"Ollama at {host} is not reachable") as raised:
        await run(backend, chat())
    assert "OLLAMA_HOST" in str(raised.value)
    # The non-streaming path (ConnectionError) says the same.
    with pytest.raises(ExecutionFailed, match=f"Ollama at {host} is not reachable"):
        await backend.models()


async def test_503_is_busy(standin: OllamaStandin) -> None:
    standin.fail_next(503, SERVER_BUSY)
    backend = OllamaBackend(standin.host)
    with pytest.raises(Busy, match="busy"):
        await run(backend, chat())
    # Only that request failed.
    chunks, final = await run(backend, chat(max_tokens=1000))
    assert_matches(chunks, final, standin.expected_completion(LLAMA, HELLO_WIRE))


async def test_other_http_errors_carry_status_and_message(standin: OllamaStandin) -> None:
    standin.fail_next(500, "out of memory")
    with pytest.raises(ExecutionFailed, match="HTTP 500.*out of memory") as raised:
        await run(OllamaBackend(standin.host), chat())
    assert not isinstance(raised.value, (Busy, ModelNotFound))


async def test_runner_failure_mid_stream_comes_after_the_chunks(standin: OllamaStandin) -> None:
    standin.fail_next_generation(after_tokens=3)
    received: list[Chunk] = []
    with pytest.raises(ExecutionFailed, match="mid-stream") as raised:
        async with OllamaBackend(standin.host).stream(chat()) as stream:
            async for event in stream:
                received.append(event)
    assert RUNNER_ERROR in str(raised.value)
    assert [chunk.text for chunk in received] == list(standin.expected_completion(LLAMA, HELLO_WIRE).tokens[:3])
    assert standin.generations[-1].outcome is Outcome.FAILED


async def test_a_stalled_stream_times_out() -> None:
    async with serve_standin([LLAMA], first_token_delay=DEADLINE * 3) as standin:
        backend = OllamaBackend(standin.host, read_timeout_s=0.2)
        with trio.fail_after(DEADLINE):
            with pytest.raises(ExecutionFailed, match="timed out"):
                await run(backend, chat())
            await standin.wait_until(lambda: standin.active_generations == 0)


# -- cancellation -------------------------------------------------------------------


async def test_leaving_the_stream_early_stops_the_generation() -> None:
    async with serve_standin([LLAMA], tokens_per_second=50, default_length=100_000) as standin:
        received = 0
        async with OllamaBackend(standin.host).stream(chat(max_tokens=100_000)) as stream:
            async for _ in stream:
                received += 1
                if received == 5:
                    break
        with trio.fail_after(DEADLINE):
            await standin.wait_until(
                lambda: standin.cancelled_generations == 1 and standin.active_generations == 0
            )
    record = standin.generations[-1]
    assert record.outcome is Outcome.CANCELLED
    assert 5 <= record.tokens_sent < 100_000


async def test_cancelling_the_caller_stops_the_generation() -> None:
    async with serve_standin([LLAMA], tokens_per_second=50, default_length=100_000) as standin:
        received = 0
        with trio.CancelScope() as scope:
            async with OllamaBackend(standin.host).stream(chat(max_tokens=100_000)) as stream:
                async for _ in stream:
                    received += 1
                    if received == 5:
                        scope.cancel()  # the next checkpoint raises Cancelled inside the stream
        assert scope.cancelled_caught and received == 5
        with trio.fail_after(DEADLINE):
            await standin.wait_until(
                lambda: standin.cancelled_generations == 1 and standin.active_generations == 0
            )
    assert standin.generations[-1].outcome is Outcome.CANCELLED


async def test_cancel_before_the_first_token_stops_the_queued_request() -> None:
    async with serve_standin([LLAMA], first_token_delay=DEADLINE * 3) as standin:
        async with trio.open_nursery() as nursery:

            async def consume() -> None:
                await run(OllamaBackend(standin.host), chat())

            nursery.start_soon(consume)
            with trio.fail_after(DEADLINE):
                await standin.wait_until(lambda: standin.active_generations == 1)
            nursery.cancel_scope.cancel()
        with trio.fail_after(DEADLINE):
            await standin.wait_until(lambda: standin.active_generations == 0)
    assert standin.generations[-1].outcome is Outcome.CANCELLED

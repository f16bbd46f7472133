"""The Ollama stand-in, driven the way the rest of p2pgpu drives Ollama.

Everything that can go through the official ``ollama.AsyncClient`` does, so a
difference between the stand-in and what the client expects of a real Ollama
fails here first; raw ``httpx`` is used only for what the client cannot send
(bad JSON, HEAD, a missing ``stream`` field). The pure part (replies,
embeddings, names, durations) gets property tests.

Timing is only ever checked as a lower bound that pacing guarantees (tokens are
never early), never as an upper bound: the suite runs on loaded 2-core boxes.
Waiting is always on a condition under a generous deadline, never a sleep.
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime, timedelta, timezone

import httpx
import ollama
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.testing.ollama_standin import (
    DEFAULT_NUM_PREDICT,
    EMBEDDING_LENGTH,
    IMAGE_TOKENS,
    RUNNER_ERROR,
    SERVER_BUSY,
    THINK_LEVELS,
    THINKING_TOKENS,
    VERSION,
    OllamaStandin,
    Outcome,
    count_prompt_tokens,
    embedding_length,
    expected_completion,
    expected_embedding,
    expected_tokens,
    expected_tool_call,
    json_tokens,
    model_card,
    normalize_model_name,
    parse_keep_alive,
    serve_standin,
    value_for_schema,
)

LLAMA = "llama3.2:1b"
QWEN = "qwen2.5:0.5b"
EMBEDDER = "nomic-embed-text"
MODELS = (LLAMA, QWEN, EMBEDDER)
HELLO = [{"role": "user", "content": "Say hello to the network."}]

# Generous: a loaded CI box can stall for seconds; a hang still fails.
DEADLINE = 30


@pytest.fixture
async def standin() -> AsyncIterator[OllamaStandin]:
    async with serve_standin(MODELS, tokens_per_second=2000) as standin:
        yield standin


@pytest.fixture
async def client(standin: OllamaStandin) -> AsyncIterator[ollama.AsyncClient]:
    client = ollama.AsyncClient(host=standin.host)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def http(standin: OllamaStandin) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=standin.host) as http:
        yield http


async def wait_for(standin: OllamaStandin, predicate) -> None:
    with trio.fail_after(DEADLINE):
        await standin.wait_until(predicate)


# -- the pure part ------------------------------------------------------------


@settings(deadline=None)  # a loaded box must not fail a pure test
@given(
    model=st.sampled_from(MODELS),
    prompt=st.text(max_size=40),
    seed=st.none() | st.integers(-5, 2**31),
    shorter=st.integers(1, 40),
    longer=st.integers(1, 40),
)
def test_reply_is_a_pure_function_and_num_predict_cuts_a_prefix(
    model: str, prompt: str, seed: int | None, shorter: int, longer: int
) -> None:
    shorter, longer = sorted((shorter, longer))
    long_reply = expected_tokens(model, prompt, seed, longer, default_length=40)
    assert long_reply == expected_tokens(model, prompt, seed, longer, default_length=40)
    assert expected_tokens(model, prompt, seed, shorter, default_length=40) == long_reply[:shorter]
    assert len(long_reply) == longer
    assert all(token for token in long_reply)


def test_reply_length_and_done_reason() -> None:
    assert expected_completion(LLAMA, "hi").done_reason == "stop"
    assert expected_completion(LLAMA, "hi").eval_count == DEFAULT_NUM_PREDICT
    assert expected_completion(LLAMA, "hi", num_predict=5).done_reason == "length"
    assert expected_completion(LLAMA, "hi", num_predict=5).eval_count == 5
    # Zero and negative num_predict mean "no cap" in Ollama.
    for unlimited in (0, -1, -2, DEFAULT_NUM_PREDICT + 1):
        completion = expected_completion(LLAMA, "hi", num_predict=unlimited)
        assert (completion.done_reason, completion.eval_count) == ("stop", DEFAULT_NUM_PREDICT)


def test_reply_depends_on_model_prompt_and_seed_but_not_name_spelling() -> None:
    base = expected_tokens(LLAMA, "hello")
    assert expected_tokens("LLAMA3.2:1B", "hello") == base
    assert expected_tokens(QWEN, "hello") != base
    assert expected_tokens(LLAMA, "hello!") != base
    assert expected_tokens(LLAMA, "hello", seed=7) != base
    assert expected_tokens(LLAMA, "hello", seed=-1) == base  # -1 is Ollama's "no seed"
    # Ollama renders a generate prompt as the chat of that one user message
    assert expected_tokens(LLAMA, HELLO) == expected_tokens(LLAMA, "Say hello to the network.")
    assert expected_tokens(LLAMA, [{"role": "system", "content": "terse"}, *HELLO]) != expected_tokens(LLAMA, HELLO)


def test_prompt_token_count() -> None:
    assert count_prompt_tokens("one two  three") == 3
    assert count_prompt_tokens("") == 1
    assert count_prompt_tokens(HELLO) == len("user: Say hello to the network.".split())


@settings(deadline=None)
@given(st.from_regex(r"[A-Za-z][A-Za-z0-9.\-]{0,12}(:[A-Za-z0-9.]{1,6})?", fullmatch=True))
def test_model_names_normalise_idempotently(name: str) -> None:
    normal = normalize_model_name(name)
    assert normal == normalize_model_name(normal) == normalize_model_name(name.upper())
    assert ":" in normal and normal == normal.lower()


def test_model_name_examples() -> None:
    assert normalize_model_name("llama3.2") == "llama3.2:latest"
    assert normalize_model_name("Llama3.2:1B") == "llama3.2:1b"
    assert normalize_model_name("registry.ollama.ai/library/llama3.2") == "llama3.2:latest"
    assert normalize_model_name("hf.co/org/model") == "hf.co/org/model:latest"
    card = model_card("qwen2.5:0.5b")
    assert (card.parameter_size, card.family, len(card.digest)) == ("0.5B", "qwen", 64)
    assert model_card(EMBEDDER).capabilities == ("embedding",)


@settings(deadline=None)
@given(
    model=st.sampled_from(MODELS),
    text=st.text(max_size=30),
    dimensions=st.none() | st.integers(1, EMBEDDING_LENGTH),
)
def test_embeddings_are_unit_length_and_deterministic(
    model: str, text: str, dimensions: int | None
) -> None:
    vector = expected_embedding(model, text, dimensions)
    assert len(vector) == (dimensions or EMBEDDING_LENGTH)
    assert math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0, rel_tol=1e-9)
    assert vector == expected_embedding(model, text, dimensions)


def test_keep_alive_parsing() -> None:
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(0) == 0.0
    assert parse_keep_alive("0") == 0.0
    assert parse_keep_alive(30) == 30.0
    assert parse_keep_alive("5m") == 300.0
    assert parse_keep_alive("1h30m") == 5400.0
    assert parse_keep_alive("1.5s") == 1.5
    assert parse_keep_alive(-1) == math.inf
    assert parse_keep_alive("-1m") == math.inf
    for bad in ("5", "5x", "", "m", True, [1]):
        with pytest.raises(ValueError):
            parse_keep_alive(bad)


# -- discovery: /, version, tags, show, ps ------------------------------------


async def test_root_version_and_head(http: httpx.AsyncClient) -> None:
    root = await http.get("/")
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert root.headers["content-type"].startswith("text/plain")
    head = await http.head("/")
    assert (head.status_code, head.content) == (200, b"")
    version = await http.get("/api/version")
    assert version.json() == {"version": VERSION}
    assert (await http.head("/api/version")).status_code == 200
    assert (await http.head("/api/tags")).status_code == 200


async def test_unknown_routes_and_methods_answer_like_gin(http: httpx.AsyncClient) -> None:
    missing = await http.get("/api/nothing")
    assert (missing.status_code, missing.text) == (404, "404 page not found")
    wrong = await http.get("/api/chat")
    assert (wrong.status_code, wrong.text) == (405, "405 method not allowed")


async def test_tags_list_every_model_with_name_and_model(
    client: ollama.AsyncClient, http: httpx.AsyncClient
) -> None:
    listed = await client.list()
    assert [model.model for model in listed.models] == [
        LLAMA,
        QWEN,
        "nomic-embed-text:latest",
    ]
    raw = (await http.get("/api/tags")).json()["models"]
    for entry in raw:
        assert entry["name"] == entry["model"]
        assert entry["size"] > 0 and len(entry["digest"]) == 64
        assert entry["modified_at"].endswith("Z")
        assert set(entry["details"]) >= {"format", "family", "parameter_size", "quantization_level"}
    # newest first
    stamps = [model.modified_at for model in listed.models]
    assert stamps == sorted(stamps, reverse=True)


async def test_show_describes_a_model_and_404s_an_unknown_one(
    client: ollama.AsyncClient, http: httpx.AsyncClient
) -> None:
    shown = await client.show("LLAMA3.2:1b")
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] > 0
    assert "completion" in (shown.capabilities or [])
    assert shown.details is not None and shown.details.parameter_size == "1B"
    assert (await client.show(EMBEDDER)).capabilities == ["embedding"]

    with pytest.raises(ollama.ResponseError) as raised:
        await client.show("nope")
    assert (raised.value.status_code, raised.value.error) == (404, "model 'nope' not found")
    # The legacy "name" field still works.
    legacy = await http.post("/api/show", json={"name": QWEN})
    assert legacy.status_code == 200 and "model_info" in legacy.json()
    missing = await http.post("/api/show", json={})
    assert (missing.status_code, missing.json()) == (400, {"error": "model is required"})


async def test_ps_lists_a_model_once_it_has_been_used(
    standin: OllamaStandin, client: ollama.AsyncClient, http: httpx.AsyncClient
) -> None:
    assert (await client.ps()).models == []
    await client.generate(model=QWEN, prompt="warm up")
    running = (await client.ps()).models
    assert [model.model for model in running] == [QWEN]
    expires = running[0].expires_at
    assert expires is not None and expires.tzinfo is not None
    now = datetime.now(timezone.utc)
    assert now + timedelta(minutes=4) < expires <= now + timedelta(minutes=5, seconds=1)
    assert (await http.get("/api/ps")).json()["models"][0]["expires_at"].endswith("Z")
    assert standin.warm_models == (QWEN,)

    # keep_alive < 0: loaded "forever"; keep_alive 0: unloaded after the request.
    await client.generate(model=QWEN, prompt="stay", keep_alive=-1)
    forever = (await client.ps()).models[0].expires_at
    assert forever is not None and forever > now + timedelta(days=365 * 100)
    await client.generate(model=QWEN, prompt="leave", keep_alive=0)
    assert (await client.ps()).models == []


async def test_empty_prompt_loads_and_keep_alive_zero_unloads(
    standin: OllamaStandin, client: ollama.AsyncClient
) -> None:
    loaded = await client.generate(model=LLAMA, prompt="")
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    chat_loaded = await client.chat(model=QWEN, messages=[])
    assert (chat_loaded.done_reason, chat_loaded.message.content) == ("load", "")
    assert {model.model for model in (await client.ps()).models} == {LLAMA, QWEN}

    unloaded = await client.generate(model=LLAMA, prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    chat_unloaded = await client.chat(model=QWEN, messages=[], keep_alive=0)
    assert chat_unloaded.done_reason == "unload"
    assert (await client.ps()).models == []
    assert standin.generations == ()  # loading is not a generation


# -- generation ---------------------------------------------------------------


def assert_final_metrics(final, completion) -> None:
    assert final.done is True
    assert final.done_reason == completion.done_reason
    assert final.eval_count == completion.eval_count
    assert final.prompt_eval_count == completion.prompt_eval_count
    durations = (final.load_duration, final.prompt_eval_duration, final.eval_duration)
    assert all(isinstance(d, int) and d > 0 for d in (*durations, final.total_duration))
    # Measured on one clock; a few ns of slack for rounding each to whole ns.
    assert final.total_duration + 4 >= sum(durations)


async def test_streamed_chat_yields_the_expected_tokens_one_per_chunk(
    standin: OllamaStandin, client: ollama.AsyncClient
) -> None:
    parts = [part async for part in await client.chat(model=LLAMA, messages=HELLO, stream=True)]
    completion = expected_completion(LLAMA, HELLO)
    assert [part.message.content for part in parts[:-1]] == list(completion.tokens)
    assert all(not part.done and part.message.role == "assistant" for part in parts[:-1])
    final = parts[-1]
    assert final.message.content == "" and final.message.role == "assistant"
    assert final.model == LLAMA
    assert_final_metrics(final, completion)
    record = standin.generations[-1]
    assert (record.endpoint, record.outcome, record.tokens_sent) == (
        "chat",
        Outcome.COMPLETED,
        completion.eval_count,
    )


async def test_non_streamed_chat_returns_the_whole_reply(client: ollama.AsyncClient) -> None:
    reply = await client.chat(model=QWEN, messages=HELLO, options={"seed": 42})
    completion = expected_completion(QWEN, HELLO, seed=42)
    assert reply.message.content == completion.text
    assert_final_metrics(reply, completion)


async def test_streamed_and_non_streamed_generate(
    standin: OllamaStandin, client: ollama.AsyncClient
) -> None:
    prompt = "Why is the sky blue?"
    completion = standin.expected_completion(LLAMA, prompt, seed=3)
    parts = [
        part
        async for part in await client.generate(
            model=LLAMA, prompt=prompt, options={"seed": 3}, stream=True
        )
    ]
    assert [part.response for part in parts[:-1]] == list(completion.tokens)
    assert parts[-1].response == ""
    assert parts[-1].context  # generate's final chunk carries context
    assert_final_metrics(parts[-1], completion)

    whole = await client.generate(model=LLAMA, prompt=prompt, options={"seed": 3})
    assert whole.response == completion.text
    assert_final_metrics(whole, completion)
    raw = await client.generate(model=LLAMA, prompt=prompt, options={"seed": 3}, raw=True)
    assert raw.response == completion.text and raw.context is None


async def test_generate_with_system_reads_it_as_a_system_message(
    client: ollama.AsyncClient,
) -> None:
    reply = await client.generate(model=LLAMA, prompt="hi", system="Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert reply.response == expected_completion(LLAMA, messages).text


async def test_num_predict_caps_the_reply_with_done_reason_length(
    client: ollama.AsyncClient,
) -> None:
    parts = [
        part
        async for part in await client.chat(
            model=LLAMA, messages=HELLO, options={"num_predict": 5}, stream=True
        )
    ]
    assert [part.message.content for part in parts[:-1]] == expected_tokens(LLAMA, HELLO, None, 5)
    assert (parts[-1].done_reason, parts[-1].eval_count) == ("length", 5)
    reply = await client.generate(model=LLAMA, prompt="count", options={"num_predict": 3})
    assert (reply.done_reason, reply.eval_count) == ("length", 3)


async def test_model_names_are_normalised_and_echoed_as_given() -> None:
    async with serve_standin(["Mistral"], tokens_per_second=None) as standin:
        assert standin.models == ("mistral:latest",)
        client = ollama.AsyncClient(host=standin.host)
        try:
            replies = [
                await client.generate(model=name, prompt="same", options={"num_predict": 4})
                for name in ("mistral", "MISTRAL:latest", "mistral:latest")
            ]
        finally:
            await client.close()
    assert len({reply.response for reply in replies}) == 1
    assert replies[0].response == expected_completion("mistral", "same", num_predict=4).text
    assert [reply.model for reply in replies] == ["mistral", "MISTRAL:latest", "mistral:latest"]


async def test_streaming_wire_format(standin: OllamaStandin, http: httpx.AsyncClient) -> None:
    # No "stream" field: Ollama streams by default.
    body = {"model": LLAMA, "prompt": "wire", "options": {"num_predict": 6}}
    async with http.stream("POST", "/api/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        raw = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert raw.endswith(b"\n") and b"\n\n" not in raw
    lines = raw.decode().splitlines()
    assert len(lines) == 7
    assert [ollama.GenerateResponse.model_validate_json(line).done for line in lines] == [
        *[False] * 6,
        True,
    ]
    # The client always says what it wants, explicitly.
    assert standin.requests[-1].body == body


async def test_non_streamed_wire_format(http: httpx.AsyncClient) -> None:
    body = {"model": LLAMA, "messages": HELLO, "stream": False, "options": {"num_predict": 2}}
    response = await http.post("/api/chat", json=body)
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    reply = response.json()
    assert reply["message"] == {
        "role": "assistant",
        "content": "".join(expected_tokens(LLAMA, HELLO, None, 2)),
    }
    assert reply["done"] is True and reply["done_reason"] == "length"


# -- errors -------------------------------------------------------------------


async def test_unknown_model_is_a_404_response_error(client: ollama.AsyncClient) -> None:
    calls = [
        lambda: client.chat(model="nope", messages=HELLO),
        lambda: client.generate(model="nope", prompt="x"),
        lambda: client.embed(model="nope", input="x"),
    ]
    for call in calls:
        with pytest.raises(ollama.ResponseError) as raised:
            await call()
        assert (raised.value.status_code, raised.value.error) == (404, "model 'nope' not found")
    # Streaming: the error surfaces on the first iteration.
    with pytest.raises(ollama.ResponseError) as raised:
        async for _ in await client.chat(model="nope:7b", messages=HELLO, stream=True):
            pass
    assert (raised.value.status_code, raised.value.error) == (404, "model 'nope:7b' not found")


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"", "missing request body"),
        (b"  \n", "missing request body"),
        (b"{bad", "invalid character 'b' looking for beginning of value"),
        (b'{"model": "x"', "unexpected EOF"),
        (b"[1, 2]", "json: cannot unmarshal array into Go value of type api.ChatRequest"),
        (b"{}", "model is required"),
        (b'{"messages": []}', "model is required"),
        (
            b'{"model": 7}',
            "json: cannot unmarshal number into Go struct field ChatRequest.model of type string",
        ),
        (b'{"model": "llama3.2:1b", "keep_alive": "soon"}', 'time: invalid duration "soon"'),
    ],
)
async def test_bad_requests_are_400s(http: httpx.AsyncClient, content: bytes, error: str) -> None:
    response = await http.post("/api/chat", content=content)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.json() == {"error": error}


async def test_requests_a_model_cannot_serve(http: httpx.AsyncClient) -> None:
    think = await http.post("/api/chat", json={"model": LLAMA, "messages": HELLO, "think": True})
    assert (think.status_code, think.json()["error"]) == (
        400,
        '"llama3.2:1b" does not support thinking',
    )
    embed_only = await http.post("/api/generate", json={"model": EMBEDDER, "prompt": "x"})
    assert (embed_only.status_code, embed_only.json()["error"]) == (
        400,
        '"nomic-embed-text" does not support generate',
    )
    bad_option = await http.post(
        "/api/generate", json={"model": LLAMA, "prompt": "x", "options": {"num_predict": "ten"}}
    )
    assert (bad_option.status_code, bad_option.json()["error"]) == (
        500,
        'option "num_predict" must be of type integer',
    )


async def test_fail_next_answers_one_request_with_a_status(
    standin: OllamaStandin, client: ollama.AsyncClient
) -> None:
    standin.fail_next(503, SERVER_BUSY)
    with pytest.raises(ollama.ResponseError) as raised:
        async for _ in await client.chat(model=LLAMA, messages=HELLO, stream=True):
            pass
    assert (raised.value.status_code, raised.value.error) == (503, SERVER_BUSY)
    # Only one request fails.
    reply = await client.chat(model=LLAMA, messages=HELLO)
    assert reply.message.content == expected_completion(LLAMA, HELLO).text
    assert standin.generations[-1].outcome is Outcome.COMPLETED


async def test_runner_failure_mid_stream_is_an_error_line(
    standin: OllamaStandin, client: ollama.AsyncClient
) -> None:
    standin.fail_next_generation(after_tokens=3)
    received = []
    with pytest.raises(ollama.ResponseError) as raised:
        async for part in await client.chat(model=LLAMA, messages=HELLO, stream=True):
            received.append(part.message.content)
    assert raised.value.status_code == -1  # an error line after a 200
    assert raised.value.error == RUNNER_ERROR
    assert received == expected_tokens(LLAMA, HELLO)[:3]
    assert standin.generations[-1].outcome is Outcome.FAILED

    # Not streaming, or before any token, it is a plain 500.
    standin.fail_next_generation(after_tokens=3, message="boom")
    with pytest.raises(ollama.ResponseError) as raised:
        await client.generate(model=LLAMA, prompt="x")
    assert (raised.value.status_code, raised.value.error) == (500, "boom")
    standin.fail_next_generation(after_tokens=0, message="no start")
    with pytest.raises(ollama.ResponseError) as raised:
        async for _ in await client.generate(model=LLAMA, prompt="x", stream=True):
            pass
    assert (raised.value.status_code, raised.value.error) == (500, "no start")


# -- cancellation, stopping, pacing ------------------------------------------


async def test_client_disconnect_stops_the_generation() -> None:
    async with serve_standin([LLAMA], tokens_per_second=50, default_length=100_000) as standin:
        client = ollama.AsyncClient(host=standin.host)
        try:
            stream = await client.chat(model=LLAMA, messages=HELLO, stream=True)
            async with aclosing(stream):
                received = 0
                async for _ in stream:
                    received += 1
                    if received == 3:
                        break
            await wait_for(
                standin,
                lambda: standin.cancelled_generations == 1 and standin.active_generations == 0,
            )
        finally:
            await client.close()
    record = standin.generations[-1]
    assert record.outcome is Outcome.CANCELLED
    assert 3 <= record.tokens_sent < 100_000


async def test_client_giving_up_on_a_non_streamed_reply_stops_it() -> None:
    async with serve_standin([LLAMA], tokens_per_second=50, default_length=100_000) as standin:
        client = ollama.AsyncClient(host=standin.host)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.generate, LLAMA, "never mind")
                await wait_for(standin, lambda: standin.active_generations == 1)
                nursery.cancel_scope.cancel()
            await wait_for(standin, lambda: standin.active_generations == 0)
        finally:
            await client.close()
    assert standin.generations[-1].outcome is Outcome.CANCELLED


async def test_stop_mid_stream_drops_the_connection_and_frees_the_port() -> None:
    async with serve_standin([LLAMA], tokens_per_second=50, default_length=100_000) as standin:
        port = standin.port
        client = ollama.AsyncClient(host=standin.host)
        try:
            stream = await client.generate(model=LLAMA, prompt="long", stream=True)
            async with aclosing(stream):
                with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                    async for _ in stream:
                        await standin.stop()
            assert standin.generations[-1].outcome is Outcome.ABORTED
            with pytest.raises(ConnectionError):
                await client.list()
        finally:
            await client.close()
    # Nothing holds the port: a new stand-in can take it.
    async with serve_standin([LLAMA], port=port) as again:
        assert again.port == port


async def test_stop_before_the_first_token_drops_the_connection_too() -> None:
    async with serve_standin([LLAMA], first_token_delay=DEADLINE * 2) as standin:
        client = ollama.AsyncClient(host=standin.host)
        failures: list[BaseException] = []

        async def ask() -> None:
            try:
                async for _ in await client.chat(model=LLAMA, messages=HELLO, stream=True):
                    pass
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                failures.append(exc)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await wait_for(standin, lambda: standin.active_generations == 1)
                await standin.stop()
        finally:
            await client.close()
    assert len(failures) == 1
    assert standin.count(Outcome.ABORTED) == 1


async def test_token_rate_is_honoured_at_least() -> None:
    # 20 tokens at 200 tok/s cannot arrive in less than 0.1 s: deadlines are
    # absolute and never early. No upper bound: the box may be loaded.
    async with serve_standin([LLAMA], tokens_per_second=200) as standin:
        client = ollama.AsyncClient(host=standin.host)
        try:
            started = trio.current_time()
            parts = [
                part
                async for part in await client.generate(
                    model=LLAMA, prompt="pace", options={"num_predict": 20}, stream=True
                )
            ]
            elapsed = trio.current_time() - started
        finally:
            await client.close()
    assert len(parts) == 21
    assert elapsed >= 0.099
    final = parts[-1]
    assert final.eval_duration >= 0.0999e9
    assert final.eval_count / final.eval_duration * 1e9 <= 200 * 1.001


async def test_first_token_delay_holds_back_the_headers_and_counts_as_prefill() -> None:
    async with serve_standin([LLAMA], tokens_per_second=None, first_token_delay=0.2) as standin:
        async with httpx.AsyncClient(base_url=standin.host) as http:
            started = trio.current_time()
            body = {"model": LLAMA, "prompt": "slow start", "options": {"num_predict": 2}}
            async with http.stream("POST", "/api/generate", json=body) as response:
                # Like Ollama, nothing (not even the status line) before the first token.
                assert trio.current_time() - started >= 0.199
                lines = [line async for line in response.aiter_lines()]
    final = ollama.GenerateResponse.model_validate_json(lines[-1])
    assert final.prompt_eval_duration >= 0.199e9


async def test_cold_load_is_paid_once() -> None:
    async with serve_standin([LLAMA], tokens_per_second=None, load_seconds=0.5) as standin:
        client = ollama.AsyncClient(host=standin.host)
        try:
            cold = await client.generate(model=LLAMA, prompt="first")
            assert standin.warm_models == (LLAMA,)
            warm = await client.generate(model=LLAMA, prompt="second")
        finally:
            await client.close()
    assert cold.load_duration >= 0.499e9
    assert warm.load_duration < 0.5e9


async def test_one_parallel_slot_queues_the_second_request() -> None:
    # Ten tokens at 100 tok/s is 0.1 s each; with one slot the second request
    # waits for the first, so one of them spans at least 0.2 s.
    async with serve_standin([LLAMA], tokens_per_second=100, parallel=1) as standin:
        client = ollama.AsyncClient(host=standin.host)
        replies = []

        async def ask(prompt: str) -> None:
            replies.append(
                await client.generate(model=LLAMA, prompt=prompt, options={"num_predict": 10})
            )

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, "one")
                nursery.start_soon(ask, "two")
        finally:
            await client.close()
    assert max(reply.total_duration for reply in replies) >= 0.1999e9
    assert all(reply.eval_duration >= 0.0999e9 for reply in replies)


# -- embeddings ---------------------------------------------------------------


async def test_embed_returns_deterministic_unit_vectors(
    client: ollama.AsyncClient, http: httpx.AsyncClient
) -> None:
    reply = await client.embed(model=EMBEDDER, input=["first text", "second"])
    assert [list(vector) for vector in reply.embeddings] == [
        expected_embedding(EMBEDDER, "first text"),
        expected_embedding(EMBEDDER, "second"),
    ]
    assert reply.prompt_eval_count == 3
    assert reply.total_duration and reply.load_duration
    short = await client.embed(model=EMBEDDER, input="x", dimensions=16)
    assert len(short.embeddings[0]) == 16
    assert (await client.embed(model=EMBEDDER, input=[])).embeddings == []
    legacy = await client.embeddings(model=EMBEDDER, prompt="first text")
    assert list(legacy.embedding) == expected_embedding(EMBEDDER, "first text")
    bad = await http.post("/api/embed", json={"model": EMBEDDER, "input": [1]})
    assert (bad.status_code, bad.json()) == (400, {"error": "invalid input type"})


# -- the command line ---------------------------------------------------------


async def test_command_line_serves_until_sigterm() -> None:
    command = [
        sys.executable, "-m", "p2pgpu.testing.ollama_standin", "--port", "0",
        "--model", LLAMA, "--model", QWEN, "--tokens-per-second", "500",
    ]  # fmt: skip
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    pid = process.pid
    try:
        assert process.stdout is not None
        output = b""
        with trio.fail_after(DEADLINE * 2):
            while b"\n" not in output:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, "the stand-in exited before listening"
                output += chunk
        line = output.decode().splitlines()[0]
        host = line.split()[-1]
        assert line.startswith("ollama stand-in listening on http://127.0.0.1:")

        client = ollama.AsyncClient(host=host)
        try:
            assert [model.model for model in (await client.list()).models] == [LLAMA, QWEN]
            reply = await client.generate(model=QWEN, prompt="from a process")
            assert reply.response == expected_completion(QWEN, "from a process").text
        finally:
            await client.close()

        os.kill(pid, signal.SIGTERM)
        with trio.fail_after(DEADLINE):
            returncode = await process.wait()
        assert returncode == 0
    finally:
        if process.returncode is None:
            os.kill(pid, signal.SIGKILL)
            with trio.CancelScope(shield=True):
                await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


# -- capabilities, tools, format, options, images, thinking -------------------
#
# The rest of the Ollama API: each feature through the official client, and
# through raw HTTP where the client would change the request (it drops the
# JSON-schema keywords its Tool model does not know).

QWEN3 = "qwen3:0.6b"  # thinks
GPT_OSS = "gpt-oss:20b"  # thinks, and takes a level
LLAVA = "llava:7b"  # sees
GEMMA = "gemma2:2b"  # no tools
MINILM = "all-minilm:latest"  # 384-dimensional embeddings
ZOO = (LLAMA, QWEN, QWEN3, GPT_OSS, LLAVA, GEMMA, EMBEDDER, MINILM)
PNG = b"\x89PNG\r\n\x1a\n not really an image"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "description": "How many days"},
            },
            "required": ["city", "unit"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}, "precise": {"type": "boolean"}},
            "required": ["zone", "precise"],
        },
    },
}
# A schema the ollama client would strip (nested properties, bounds, $ref):
# it goes over raw HTTP and through the openai client.
BOOKING = {
    "type": "function",
    "function": {
        "name": "book_table",
        "parameters": {
            "type": "object",
            "$defs": {
                "guest": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "minLength": 3, "maxLength": 12},
                        "vip": {"type": "boolean"},
                    },
                    "required": ["name", "vip"],
                    "additionalProperties": False,
                }
            },
            "properties": {
                "party": {"type": "integer", "minimum": 1, "maximum": 12},
                "when": {"type": "string", "format": "date-time"},
                "guests": {"type": "array", "items": {"$ref": "#/$defs/guest"}, "minItems": 1},
                "seating": {"enum": ["inside", "terrace", 7]},
                "deposit": {"type": "number", "exclusiveMinimum": 0, "maximum": 50},
                "notes": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "contact": {
                    "type": "object",
                    "properties": {"phone": {"type": "string"}, "sms": {"const": True}},
                    "required": ["phone", "sms"],
                },
            },
            "required": ["party", "when", "guests", "seating", "deposit", "contact"],
            "additionalProperties": False,
        },
    },
}


def _json_type(value, kind: str) -> bool:
    if kind == "integer":
        return type(value) is int or (type(value) is float and value.is_integer())
    if kind == "number":
        return type(value) in (int, float)
    return {
        "string": str, "boolean": bool, "object": dict, "array": list, "null": type(None)
    }[kind] is type(value)  # fmt: skip


def _same(a, b) -> bool:
    return a == b and (type(a) is bool) == (type(b) is bool)


def schema_errors(value, schema, root=None, path: str = "$") -> list[str]:
    """A minimal JSON-schema checker (``jsonschema`` is not a dependency):
    the keywords the stand-in's generator claims to honour."""
    root = schema if root is None else root
    if schema is True:
        return []
    if schema is False:
        return [f"{path}: false schema"]
    errors: list[str] = []
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#").split("/")[1:]:
            target = target[part]
        errors += schema_errors(value, target, root, path)
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_json_type(value, kind) for kind in kinds):
            return [*errors, f"{path}: {value!r} is not of type {schema['type']}"]
    if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "const" in schema and not _same(value, schema["const"]):
        errors.append(f"{path}: {value!r} is not {schema['const']!r}")
    for part in schema.get("allOf", []):
        errors += schema_errors(value, part, root, path)
    if "anyOf" in schema and all(schema_errors(value, s, root, path) for s in schema["anyOf"]):
        errors.append(f"{path}: matches no anyOf")
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not schema_errors(value, s, root, path)]
        if len(matching) != 1:
            errors.append(f"{path}: matches {len(matching)} of oneOf")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{path}: {name} missing" for name in schema.get("required", []) if name not in value]
        for name, item in value.items():
            if name in properties:
                errors += schema_errors(item, properties[name], root, f"{path}.{name}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: {name} not allowed")
        if len(value) < schema.get("minProperties", 0):
            errors.append(f"{path}: too few properties")
    if isinstance(value, list):
        prefix = schema.get("prefixItems", [])
        for index, item in enumerate(value):
            sub = prefix[index] if index < len(prefix) else schema.get("items", True)
            errors += schema_errors(item, sub, root, f"{path}[{index}]")
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", math.inf):
            errors.append(f"{path}: {len(value)} items")
        if schema.get("uniqueItems") and len({repr(item) for item in value}) != len(value):
            errors.append(f"{path}: items not unique")
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get(
        "maxLength", math.inf
    ):
        errors.append(f"{path}: length {len(value)}")
    if type(value) in (int, float):
        for keyword, holds in (
            ("minimum", lambda bound: value >= bound),
            ("maximum", lambda bound: value <= bound),
            ("exclusiveMinimum", lambda bound: value > bound),
            ("exclusiveMaximum", lambda bound: value < bound),
            ("multipleOf", lambda step: (value / step) == int(value / step)),
        ):
            if keyword in schema and not holds(schema[keyword]):
                errors.append(f"{path}: {value} fails {keyword} {schema[keyword]}")
    return errors


def assert_valid(value, schema) -> None:
    assert schema_errors(value, schema) == [], (value, schema)


def _leaf_schemas() -> st.SearchStrategy:
    def bounded_integer(low: int, span: int, step: int | None) -> dict:
        schema = {"type": "integer", "minimum": low, "maximum": low + span + (step or 0)}
        return schema if step is None else {**schema, "multipleOf": step}

    def sized_string(least: int, extra: int) -> dict:
        return {"type": "string", "minLength": least, "maxLength": least + extra}

    return st.one_of(
        st.just({"type": "string"}),
        st.builds(sized_string, st.integers(0, 30), st.integers(0, 10)),
        st.sampled_from([{"type": "string", "format": f} for f in ("date-time", "email", "uuid", "uri")]),
        st.just({"type": "integer"}),
        st.builds(bounded_integer, st.integers(-50, 50), st.integers(0, 20), st.none() | st.integers(1, 7)),
        st.builds(
            lambda low, span: {"type": "number", "exclusiveMinimum": low, "maximum": low + span},
            st.integers(-50, 50), st.integers(1, 20),
        ),
        st.just({"type": "number"}),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.builds(
            lambda options: {"enum": options},
            st.lists(st.integers() | st.text(max_size=5), min_size=1, max_size=4),
        ),
        st.builds(lambda value: {"const": value}, st.integers() | st.booleans() | st.text(max_size=5)),
        st.just({"type": ["string", "null"]}),
    )  # fmt: skip


def _schemas() -> st.SearchStrategy:
    names = st.text("abcdefgh", min_size=1, max_size=5)

    def extend(children: st.SearchStrategy) -> st.SearchStrategy:
        objects = st.dictionaries(names, children, max_size=4).flatmap(
            lambda props: st.builds(
                lambda required, closed: {
                    "type": "object",
                    "properties": props,
                    "required": required,
                    **({"additionalProperties": False} if closed else {}),
                },
                st.lists(st.sampled_from(sorted(props)), unique=True) if props else st.just([]),
                st.booleans(),
            )
        )
        arrays = st.builds(
            lambda items, least, extra: {"type": "array", "items": items, "minItems": least, "maxItems": least + extra},
            children, st.integers(0, 3), st.integers(0, 3),
        )  # fmt: skip
        optional = st.builds(lambda child: {"anyOf": [child, {"type": "null"}]}, children)
        return st.one_of(objects, arrays, optional)

    return st.recursive(_leaf_schemas(), extend, max_leaves=12)


@settings(deadline=None, max_examples=300)
@given(schema=_schemas(), key=st.text(max_size=8))
def test_generated_values_validate_against_their_schema(schema: dict, key: str) -> None:
    value = value_for_schema(schema, key)
    assert_valid(value, schema)
    assert value == value_for_schema(schema, key)  # a pure function of (schema, key)


def test_generated_values_follow_refs_and_composition() -> None:
    parameters = BOOKING["function"]["parameters"]
    values = [value_for_schema(parameters, str(i)) for i in range(40)]
    for value in values:
        assert_valid(value, parameters)
    assert len({json.dumps(value, sort_keys=True) for value in values}) > 30
    # optional properties come and go; required ones are always there
    assert {"notes" in value for value in values} == {True, False}
    pydantic_style = {
        "$defs": {"Pet": {"properties": {"name": {"title": "Name", "type": "string"}}, "required": ["name"],
                          "title": "Pet", "type": "object"}},
        "properties": {"pets": {"items": {"$ref": "#/$defs/Pet"}, "title": "Pets", "type": "array",
                                "uniqueItems": True},
                       "owner": {"allOf": [{"$ref": "#/$defs/Pet"}], "description": "who"}},
        "required": ["pets", "owner"], "title": "Household", "type": "object",
    }  # fmt: skip
    for i in range(20):
        assert_valid(value_for_schema(pydantic_style, str(i)), pydantic_style)


@settings(deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
))  # fmt: skip
def test_json_tokens_join_to_the_text(value) -> None:
    text = json.dumps(value, ensure_ascii=False)
    tokens = json_tokens(text)
    assert "".join(tokens) == text and all(tokens)


def test_capabilities_follow_the_name() -> None:
    assert model_card(LLAMA).capabilities == ("completion", "tools")
    assert model_card(QWEN).capabilities == ("completion", "tools")
    assert model_card(QWEN3).capabilities == ("completion", "tools", "thinking")
    assert model_card("deepseek-r1:7b").capabilities == ("completion", "tools", "thinking")
    assert model_card(GPT_OSS).capabilities == ("completion", "tools", "thinking")
    assert model_card(LLAVA).capabilities == ("completion", "vision")
    assert model_card("gemma3:4b").capabilities == ("completion", "vision")
    assert model_card("qwen2.5vl:3b").capabilities == ("completion", "vision", "tools")
    assert model_card(GEMMA).capabilities == ("completion",)
    assert model_card("qwen2.5-coder:1.5b").capabilities == ("completion", "tools", "insert")
    for embedder in (EMBEDDER, MINILM, "mxbai-embed-large", "bge-m3"):
        assert model_card(embedder).capabilities == ("embedding",)
    assert [embedding_length(m) for m in (EMBEDDER, MINILM, "mxbai-embed-large", LLAMA)] == [
        768, 384, 1024, EMBEDDING_LENGTH,
    ]  # fmt: skip


def test_stop_sequences_and_temperature_zero() -> None:
    whole = expected_completion(LLAMA, "tell me", seed=5)
    cut_at = whole.text.index(whole.tokens[10].strip(), len("".join(whole.tokens[:10])))
    stop = whole.text[cut_at : cut_at + 6]  # may span two tokens
    stopped = expected_completion(LLAMA, "tell me", seed=5, stop=[stop, "never said"])
    assert stopped.text == whole.text[: whole.text.index(stop)]
    assert stopped.done_reason == "stop"
    assert 10 < stopped.eval_count <= 12 and stopped.eval_count < whole.eval_count
    # num_predict before the stop sequence: a plain cut
    assert expected_completion(LLAMA, "tell me", seed=5, num_predict=3, stop=[stop]).tokens == whole.tokens[:3]
    # temperature 0 is greedy: the seed does not matter
    greedy = expected_completion(LLAMA, "tell me", seed=5, temperature=0)
    assert greedy == expected_completion(LLAMA, "tell me", temperature=0) == expected_completion(LLAMA, "tell me")
    assert greedy != whole
    assert expected_completion(LLAMA, "tell me", seed=5, temperature=0.7) == whole


@pytest.fixture
async def zoo() -> AsyncIterator[OllamaStandin]:
    async with serve_standin(ZOO, tokens_per_second=2000) as standin:
        yield standin


@pytest.fixture
async def zoo_client(zoo: OllamaStandin) -> AsyncIterator[ollama.AsyncClient]:
    client = ollama.AsyncClient(host=zoo.host)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def zoo_http(zoo: OllamaStandin) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=zoo.host) as http:
        yield http


async def test_show_reports_capabilities(zoo_client: ollama.AsyncClient) -> None:
    assert (await zoo_client.show(QWEN3)).capabilities == ["completion", "tools", "thinking"]
    assert (await zoo_client.show(LLAVA)).capabilities == ["completion", "vision"]
    shown = await zoo_client.show(MINILM)
    assert shown.modelinfo is not None and shown.modelinfo["bert.embedding_length"] == 384


async def test_a_tool_call_is_streamed_as_one_chunk_before_the_final_one(
    zoo: OllamaStandin, zoo_client: ollama.AsyncClient
) -> None:
    messages = [{"role": "user", "content": "What is the time in Lima? Use get_time."}]
    stream = await zoo_client.chat(model=LLAMA, messages=messages, tools=[WEATHER, CLOCK], stream=True)
    parts = [part async for part in stream]
    *chunks, final = parts
    assert [part.message.content for part in chunks] == [""]
    (call,) = chunks[0].message.tool_calls
    assert call.function.name == "get_time"  # named in the message
    assert_valid(dict(call.function.arguments), CLOCK["function"]["parameters"])
    expected = expected_completion(LLAMA, messages, tools=[WEATHER, CLOCK])
    assert expected.tool_calls == (expected_tool_call(LLAMA, messages, [WEATHER, CLOCK]),)
    assert {"name": call.function.name, "arguments": dict(call.function.arguments)} == {
        k: v for k, v in expected.tool_calls[0]["function"].items() if k != "index"
    }
    assert (final.done, final.done_reason, final.message.content) == (True, "stop", "")
    assert final.eval_count == expected.eval_count == len(
        json_tokens(json.dumps({"name": "get_time", "arguments": call.function.arguments}))
    )
    assert final.prompt_eval_count == expected.prompt_eval_count > count_prompt_tokens(messages)
    assert zoo.generations[-1].tokens_sent == expected.eval_count


async def test_tool_choice_is_deterministic_and_arguments_always_validate(
    zoo_client: ollama.AsyncClient,
) -> None:
    chosen = set()
    for index in range(12):
        messages = [{"role": "user", "content": f"question {index}"}]
        reply = await zoo_client.chat(model=QWEN, messages=messages, tools=[WEATHER, CLOCK], think=False)
        (call,) = reply.message.tool_calls
        tool = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
        assert_valid(dict(call.function.arguments), tool["function"]["parameters"])
        assert call.function.name == expected_tool_call(QWEN, messages, [WEATHER, CLOCK])["function"]["name"]
        chosen.add(call.function.name)
    assert chosen == {"get_weather", "get_time"}  # drawn, not fixed


async def test_a_tool_result_gets_an_ordinary_answer(zoo_client: ollama.AsyncClient) -> None:
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    first = await zoo_client.chat(model=LLAMA, messages=ask, tools=[WEATHER])
    (call,) = first.message.tool_calls
    conversation = [
        *ask,
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": call.function.name, "arguments": dict(call.function.arguments)}}
        ]},
        {"role": "tool", "content": "Sunny, 21 degrees", "tool_name": "get_weather"},
    ]  # fmt: skip
    answer = await zoo_client.chat(model=LLAMA, messages=conversation, tools=[WEATHER], options={"num_predict": 12})
    expected = expected_completion(LLAMA, conversation, num_predict=12, tools=[WEATHER])
    assert answer.message.tool_calls is None
    assert answer.message.content == expected.text and expected.tool_calls == ()
    # the tool's result is part of what the model answers
    other = [*conversation[:-1], {**conversation[-1], "content": "Rain"}]
    assert expected_completion(LLAMA, other, num_predict=12).text != expected.text


async def test_nested_tool_schemas_over_raw_http(zoo_http: httpx.AsyncClient) -> None:
    parameters = BOOKING["function"]["parameters"]
    for index in range(8):
        messages = [{"role": "user", "content": f"book a table for tonight, take {index}"}]
        body = {"model": LLAMA, "messages": messages, "tools": [BOOKING], "stream": False}
        reply = (await zoo_http.post("/api/chat", json=body)).json()
        (call,) = reply["message"]["tool_calls"]
        assert call["function"]["index"] == 0 and call["function"]["name"] == "book_table"
        assert_valid(call["function"]["arguments"], parameters)
        assert call == expected_tool_call(LLAMA, messages, [BOOKING])


async def test_num_predict_cutting_a_tool_call_leaves_its_text(zoo_client: ollama.AsyncClient) -> None:
    messages = [{"role": "user", "content": "weather?"}]
    parts = [part async for part in await zoo_client.chat(
        model=LLAMA, messages=messages, tools=[WEATHER], options={"num_predict": 8}, stream=True)]  # fmt: skip
    (final,) = parts  # nothing went out before the end
    expected = expected_completion(LLAMA, messages, num_predict=8, tools=[WEATHER])
    assert final.message.content == expected.tail == expected.text == '{"name": "get_weather"'
    assert (final.done_reason, final.eval_count, final.message.tool_calls) == ("length", 8, None)


async def test_models_without_tools_refuse_them(zoo_http: httpx.AsyncClient) -> None:
    body = {"model": GEMMA, "messages": HELLO, "tools": [WEATHER]}
    refused = await zoo_http.post("/api/chat", json=body)
    assert (refused.status_code, refused.json()) == (
        400, {"error": "registry.ollama.ai/library/gemma2:2b does not support tools"},
    )  # fmt: skip
    embedder = await zoo_http.post("/api/chat", json={**body, "model": EMBEDDER})
    assert embedder.json() == {"error": '"nomic-embed-text" does not support chat'}
    # an empty tools list asks for nothing
    ok = await zoo_http.post("/api/chat", json={**body, "tools": [], "stream": False})
    assert ok.status_code == 200
    bad = await zoo_http.post("/api/chat", json={**body, "model": LLAMA, "tools": [1]})
    assert bad.json() == {
        "error": "json: cannot unmarshal number into Go struct field ChatRequest.tools of type api.Tool"
    }


async def test_format_json_and_schema_replies_parse_and_validate(
    zoo: OllamaStandin, zoo_client: ollama.AsyncClient
) -> None:
    stream = await zoo_client.generate(model=LLAMA, prompt="a record", format="json", stream=True)
    parts = [part async for part in stream]
    text = "".join(part.response for part in parts[:-1])
    assert isinstance(json.loads(text), dict)
    expected = expected_completion(LLAMA, "a record", format="json")
    assert [part.response for part in parts[:-1]] == list(expected.tokens)
    assert (parts[-1].done_reason, parts[-1].eval_count) == ("stop", len(json_tokens(text)))

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 2},
        },
        "required": ["name", "age", "tags"],
    }
    for prompt in ("alice", "bob", "carol"):
        reply = await zoo_client.chat(model=QWEN, messages=[{"role": "user", "content": prompt}], format=schema)
        assert_valid(json.loads(reply.message.content), schema)
        assert reply.message.content == expected_completion(QWEN, prompt, format=schema).text
    # num_predict cuts the JSON, as it would cut a real model's
    cut = await zoo_client.generate(model=LLAMA, prompt="a record", format="json", options={"num_predict": 3})
    assert cut.done_reason == "length" and cut.response == "".join(expected.tokens[:3])


async def test_a_format_ollama_cannot_use_is_a_500(zoo_http: httpx.AsyncClient) -> None:
    bad = await zoo_http.post("/api/generate", json={"model": LLAMA, "prompt": "x", "format": "xml"})
    assert (bad.status_code, bad.json()) == (
        500, {"error": 'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object'},
    )  # fmt: skip
    for unset in (None, ""):
        fine = await zoo_http.post(
            "/api/generate", json={"model": LLAMA, "prompt": "x", "format": unset, "stream": False}
        )
        assert fine.json()["response"] == expected_completion(LLAMA, "x").text


async def test_stop_options_and_sampling_options(zoo_client: ollama.AsyncClient) -> None:
    whole = expected_completion(LLAMA, HELLO, seed=9)
    stop = whole.tokens[20].strip()
    parts = [part async for part in await zoo_client.chat(
        model=LLAMA, messages=HELLO, options={"seed": 9, "stop": [stop]}, stream=True)]  # fmt: skip
    expected = expected_completion(LLAMA, HELLO, seed=9, stop=[stop])
    assert [part.message.content for part in parts[:-1]] == list(expected.tokens)
    assert "".join(expected.tokens) == whole.text[: whole.text.index(stop)]
    assert (parts[-1].done_reason, parts[-1].eval_count) == ("stop", expected.eval_count)
    # sampling options are accepted and change nothing but through seed/temperature
    sampled = await zoo_client.chat(model=LLAMA, messages=HELLO, options={
        "seed": 9, "temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "typical_p": 1.0,
        "repeat_penalty": 1.1, "repeat_last_n": 64, "presence_penalty": 0.5, "frequency_penalty": 0.5,
        "mirostat": 2,  # unknown to Ollama 0.12.6: ignored
    })  # fmt: skip
    assert sampled.message.content == whole.text
    greedy = await zoo_client.generate(model=LLAMA, prompt="x", options={"seed": 9, "temperature": 0})
    assert greedy.response == expected_completion(LLAMA, "x").text


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"temperature": "hot"}, 'option "temperature" must be of type float32'),
        ({"top_k": True}, 'option "top_k" must be of type integer'),
        ({"stop": "\n"}, 'option "stop" must be of type array'),
        ({"stop": ["a", 1]}, 'option "stop" must be of an array of strings'),
        ({"use_mmap": 1}, 'option "use_mmap" must be of type boolean'),
    ],
)
async def test_options_of_the_wrong_type_are_500s_as_in_ollama(
    zoo_http: httpx.AsyncClient, options: dict, error: str
) -> None:
    response = await zoo_http.post("/api/chat", json={"model": LLAMA, "messages": HELLO, "options": options})
    assert (response.status_code, response.json()) == (500, {"error": error})
    not_an_object = await zoo_http.post("/api/chat", json={"model": LLAMA, "messages": HELLO, "options": 3})
    assert not_an_object.status_code == 400


async def test_a_vision_model_sees_images(zoo_client: ollama.AsyncClient) -> None:
    reply = await zoo_client.generate(model=LLAVA, prompt="What is this?", images=[PNG])
    expected = expected_completion(LLAVA, "What is this?", images=[PNG])
    assert reply.response == expected.text and reply.response.startswith("I see 1 image. ")
    assert reply.prompt_eval_count == expected.prompt_eval_count == 3 + IMAGE_TOKENS
    # other images, another answer; chat takes them on a message
    other = await zoo_client.generate(model=LLAVA, prompt="What is this?", images=[PNG + b"!"])
    assert other.response != reply.response
    messages = [{"role": "user", "content": "And these?", "images": [PNG, PNG]}]
    chat = await zoo_client.chat(model=LLAVA, messages=messages)
    wire = [{**messages[0], "images": [base64.b64encode(PNG).decode()] * 2}]
    assert chat.message.content == expected_completion(LLAVA, wire).text
    assert chat.message.content.startswith("I see 2 images. ")
    assert chat.prompt_eval_count == count_prompt_tokens(messages) + 2 * IMAGE_TOKENS


async def test_a_model_without_vision_ignores_images_as_ollama_does(zoo_client: ollama.AsyncClient) -> None:
    reply = await zoo_client.generate(model=LLAMA, prompt="What is this?", images=[PNG])
    assert reply.response == expected_completion(LLAMA, "What is this?").text
    assert reply.prompt_eval_count == 3


@pytest.mark.parametrize(
    ("image", "offset"),
    [("abc", 0), ("ab!d", 2), ("YQ=", 3), ("YQ==YQ==", 4), ("Y===", 1), ("éé==", 0)],
)
async def test_images_must_be_base64_as_go_decodes_it(
    zoo_http: httpx.AsyncClient, image: str, offset: int
) -> None:
    body = {"model": LLAVA, "prompt": "x", "images": ["YWJj", image]}
    refused = await zoo_http.post("/api/generate", json=body)
    assert (refused.status_code, refused.json()) == (
        400, {"error": f"illegal base64 data at input byte {offset}"},
    )  # fmt: skip
    chat = {"model": LLAVA, "messages": [{"role": "user", "content": "x", "images": [image]}]}
    assert (await zoo_http.post("/api/chat", json=chat)).status_code == 400
    fine = {"model": LLAVA, "prompt": "x", "images": ["YQ==", "YWJj\nZGVm"], "stream": False}
    assert (await zoo_http.post("/api/generate", json=fine)).status_code == 200


async def test_thinking_streams_before_content(zoo: OllamaStandin, zoo_client: ollama.AsyncClient) -> None:
    # A thinking model thinks unless told not to (Ollama 0.12.6).
    parts = [part async for part in await zoo_client.chat(model=QWEN3, messages=HELLO, stream=True)]
    expected = expected_completion(QWEN3, HELLO)
    thinking = [part.message.thinking for part in parts if part.message.thinking]
    content = [part.message.content for part in parts[:-1] if part.message.content]
    assert thinking == list(expected.thinking) and len(thinking) == THINKING_TOKENS["medium"]
    assert content == list(expected.tokens)
    first_content = next(i for i, part in enumerate(parts) if part.message.content)
    assert all(not part.message.content for part in parts[:first_content])
    assert parts[-1].eval_count == len(thinking) + len(content) == expected.eval_count
    assert expected_completion(QWEN3, HELLO, think=True) == expected

    quiet = await zoo_client.chat(model=QWEN3, messages=HELLO, think=False)
    assert quiet.message.thinking is None and quiet.message.content == expected.text

    whole = await zoo_client.generate(model=QWEN3, prompt="Say hello to the network.")
    assert (whole.thinking, whole.response) == (expected.thinking_text, expected.text)


@pytest.mark.parametrize("level", THINK_LEVELS)
async def test_think_levels_on_a_model_that_takes_them(zoo_client: ollama.AsyncClient, level: str) -> None:
    parts = [part async for part in await zoo_client.generate(model=GPT_OSS, prompt="plan", think=level, stream=True)]
    thinking = [part.thinking for part in parts if part.thinking]
    assert len(thinking) == THINKING_TOKENS[level]
    assert thinking == list(expected_completion(GPT_OSS, "plan", think=level).thinking)
    assert "".join(part.response for part in parts) == expected_completion(GPT_OSS, "plan").text


async def test_think_refusals(zoo_http: httpx.AsyncClient) -> None:
    async def error(path: str, **fields) -> tuple[int, str]:
        body = {"model": QWEN3, "messages": HELLO, "prompt": "x", **fields}
        response = await zoo_http.post(path, json=body)
        return response.status_code, response.json()["error"]

    level = (400, 'think value "high" is not supported for this model')
    assert await error("/api/chat", think="high") == level
    assert await error("/api/generate", think="high") == level
    assert await error("/api/generate", model=LLAMA, think="low") == (
        400, 'think value "low" is not supported for this model'
    )  # fmt: skip
    assert await error("/api/chat", model=LLAMA, think="low") == (
        400, '"llama3.2:1b" does not support thinking'
    )  # fmt: skip
    assert await error("/api/chat", think="max") == (
        400, 'invalid think value: "max" (must be "high", "medium", "low", true, or false)'
    )  # fmt: skip
    assert await error("/api/chat", think=1) == (
        400, 'think must be a boolean or string ("high", "medium", "low", true, or false)'
    )  # fmt: skip


async def test_embeddings_per_model_dimensions_and_truncation(
    zoo_client: ollama.AsyncClient, zoo_http: httpx.AsyncClient
) -> None:
    small = await zoo_client.embed(model=MINILM, input="a short text")
    assert len(small.embeddings[0]) == 384 == embedding_length(MINILM)
    assert list(small.embeddings[0]) == expected_embedding(MINILM, "a short text")
    cut = await zoo_client.embed(model=MINILM, input="a short text", dimensions=8)
    assert list(cut.embeddings[0]) == expected_embedding(MINILM, "a short text", 8)
    assert math.isclose(sum(v * v for v in cut.embeddings[0]), 1.0)
    # an input longer than the context (options.num_ctx here) is cut to it...
    long = "one two three four five six"
    truncated = await zoo_client.embed(model=EMBEDDER, input=[long, "two words"], options={"num_ctx": 4})
    assert [list(v) for v in truncated.embeddings] == [
        expected_embedding(EMBEDDER, "one two three four"), expected_embedding(EMBEDDER, "two words"),
    ]  # fmt: skip
    assert truncated.prompt_eval_count == 4 + 2
    # ... or refused when truncate is false
    body = {"model": EMBEDDER, "input": long, "options": {"num_ctx": 4}, "truncate": False}
    refused = await zoo_http.post("/api/embed", json=body)
    assert (refused.status_code, refused.json()) == (400, {"error": "input exceeds maximum context length"})
    bad = await zoo_http.post("/api/embed", json={"model": EMBEDDER, "input": "x", "options": {"num_ctx": "big"}})
    assert (bad.status_code, bad.json()) == (500, {"error": 'option "num_ctx" must be of type integer'})

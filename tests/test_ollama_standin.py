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
    RUNNER_ERROR,
    SERVER_BUSY,
    VERSION,
    OllamaStandin,
    Outcome,
    count_prompt_tokens,
    expected_completion,
    expected_embedding,
    expected_tokens,
    model_card,
    normalize_model_name,
    parse_keep_alive,
    serve_standin,
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

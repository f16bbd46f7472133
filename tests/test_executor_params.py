"""A job's params through the execution edge (p2pgpu.executor): what the
official client sends the Ollama stand-in for them, the output channels it
yields, embeddings, and the guarantees that hold whatever a consumer asks
(no load-time option reaches Ollama; an image is never read from the
provider's disk). Real HTTP to the stand-in; its record of the requests it
received says what reached "Ollama"."""

from __future__ import annotations

import base64
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ollama import ChatResponse, GenerateResponse
from ollama import Message as OllamaMessage

from p2pgpu.core.jobparams import JobParams, MessageExtra, ToolCall
from p2pgpu.core.jobs import CONTENT, THINKING, TOOL_CALL
from p2pgpu.errors import ExecutionFailed, MalformedInput
from p2pgpu.executor import (
    Chunk,
    EmbedResult,
    Finished,
    GenerationRequest,
    Message,
    ModelNotFound,
    OllamaBackend,
    Refused,
    _chunks,
)
from p2pgpu.testing.ollama_standin import OllamaStandin, expected_embedding, serve_standin

LLAMA = "llama3.2:1b"
QWEN3 = "qwen3:0.6b"  # a thinking model
VISION = "llava:7b"
EMBED = "nomic-embed-text:latest"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(40))).decode()
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather now",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture
async def standin() -> AsyncIterator[OllamaStandin]:
    async with serve_standin([LLAMA, QWEN3, VISION, EMBED], tokens_per_second=None) as standin:
        yield standin


async def run(backend: OllamaBackend, request: GenerationRequest) -> tuple[list[Chunk], Finished]:
    events = []
    async with backend.stream(request) as stream:
        async for event in stream:
            events.append(event)
    *chunks, final = events
    assert isinstance(final, Finished)
    return chunks, final


def sent(standin: OllamaStandin, path: str) -> dict:
    (body,) = [r.body for r in standin.requests if r.path == path]
    return body


# -- the request ----------------------------------------------------------------


def test_options_merge_the_sampling_params_and_keep_num_predict_the_jobs():
    params = JobParams.from_wire({"options": {"temperature": 0.3, "top_p": 0.9, "seed": 1, "stop": ["END"]}})
    request = GenerationRequest(model=LLAMA, max_tokens=9, prompt="x", params=params)
    assert request.options() == {"temperature": 0.3, "top_p": 0.9, "seed": 1, "stop": ["END"], "num_predict": 9}
    # the older fields win over the same options in params
    request = GenerationRequest(model=LLAMA, max_tokens=9, prompt="x", params=params, seed=5, temperature=0)
    assert request.options()["seed"] == 5 and request.options()["temperature"] == 0.0


def test_no_load_time_option_can_reach_ollama_even_from_forged_params():
    params = JobParams(options=(("temperature", 0.5),))
    # params that skipped every check (built around the constructor): the whitelist still holds
    object.__setattr__(params, "options", (("num_ctx", 131072), ("num_gpu", 0), ("num_predict", 10**6),
                                           ("temperature", 0.5)))
    request = GenerationRequest(model=LLAMA, max_tokens=7, prompt="x", params=params)
    assert request.options() == {"temperature": 0.5, "num_predict": 7}


def test_params_must_fit_the_request():
    with pytest.raises(MalformedInput, match="images are for a prompt"):
        GenerationRequest(model=LLAMA, max_tokens=5, messages=(Message("user", "x"),), params=JobParams(images=(PNG,)))
    with pytest.raises(MalformedInput, match=r"message_extras\[3\]"):
        GenerationRequest(model=LLAMA, max_tokens=5, messages=(Message("user", "x"),),
                          params=JobParams(message_extras=((3, MessageExtra(thinking="t")),)))
    with pytest.raises(MalformedInput, match="tools need a chat"):
        GenerationRequest(model=LLAMA, max_tokens=5, prompt="x", params=JobParams.from_wire({"tools": TOOLS}))
    with pytest.raises(MalformedInput, match="params"):
        GenerationRequest(model=LLAMA, max_tokens=5, prompt="x", params={"think": True})  # type: ignore[arg-type]


# -- channels -------------------------------------------------------------------


def test_each_part_of_a_stream_becomes_channelled_chunks():
    part = ChatResponse(model=LLAMA, done=False, message=OllamaMessage(
        role="assistant", content="", thinking="let me see",
        tool_calls=[OllamaMessage.ToolCall(function=OllamaMessage.ToolCall.Function(
            name="get_weather", arguments={"city": "Oslo", "days": 2}))]))
    assert _chunks(part, chat=True) == [
        Chunk("let me see", 1, THINKING),
        Chunk('{"name":"get_weather","arguments":{"city":"Oslo","days":2}}', 1, TOOL_CALL),
    ]
    part = ChatResponse(model=LLAMA, done=False, message=OllamaMessage(role="assistant", content="Hi"))
    assert _chunks(part, chat=True) == [Chunk("Hi", 1, CONTENT)]
    part = GenerateResponse(model=LLAMA, done=False, response="", thinking="hmm")
    assert _chunks(part, chat=False) == [Chunk("hmm", 1, THINKING)]
    assert _chunks(GenerateResponse(model=LLAMA, done=True, response=""), chat=False) == []
    too_big = ChatResponse(model=LLAMA, done=False, message=OllamaMessage(role="assistant", tool_calls=[
        OllamaMessage.ToolCall(function=OllamaMessage.ToolCall.Function(name="f", arguments={"a": "x" * 40_000}))]))
    with pytest.raises(ValueError, match="tool call 'f'"):  # becomes ExecutionFailed in the stream
        _chunks(too_big, chat=True)


# -- against the stand-in -------------------------------------------------------


async def test_a_chat_sends_tools_format_and_every_messages_extras(standin: OllamaStandin) -> None:
    params = JobParams.from_wire({
        "tools": TOOLS, "format": {"type": "object", "properties": {"temp": {"type": "number"}}},
        "options": {"seed": 3},
        "message_extras": [[1, {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}],
                                "thinking": "I need the weather"}],
                           [2, {"tool_name": "get_weather"}]],
    })
    request = GenerationRequest(model=LLAMA, max_tokens=8, system="be brief", params=params, messages=(
        Message("user", "weather in Oslo?"), Message("assistant", ""), Message("tool", '{"temp": -3}')))
    await run(OllamaBackend(standin.host), request)
    body = sent(standin, "/api/chat")
    assert body["format"] == {"type": "object", "properties": {"temp": {"type": "number"}}}
    assert body["tools"][0]["function"]["name"] == "get_weather"
    assert body["options"] == {"seed": 3, "num_predict": 8}
    system, user, assistant, tool = body["messages"]  # extras name messages without the system prompt
    assert system == {"role": "system", "content": "be brief"} and user["content"] == "weather in Oslo?"
    assert assistant["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    assert assistant["thinking"] == "I need the weather"
    assert tool == {"role": "tool", "content": '{"temp": -3}', "tool_name": "get_weather"}


async def test_images_travel_as_the_consumers_bytes(standin: OllamaStandin) -> None:
    backend = OllamaBackend(standin.host)
    await run(backend, GenerationRequest(model=VISION, max_tokens=4, prompt="what is this?",
                                         params=JobParams(images=(PNG,), format="json")))
    body = sent(standin, "/api/generate")
    assert body["images"] == [PNG] and body["format"] == "json"
    await run(backend, GenerationRequest(model=VISION, max_tokens=4, messages=(Message("user", "and this?"),),
                                         params=JobParams(message_extras=((0, MessageExtra(images=(PNG,))),))))
    assert sent(standin, "/api/chat")["messages"][0]["images"] == [PNG]


async def test_an_image_that_names_a_file_is_never_read_from_the_providers_disk(
        standin: OllamaStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client reads a string image that names an existing file as that
    file. "QUFB" is valid base64 and, here, also a file of the provider's:
    what Ollama gets must be the consumer's base64, not the file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "QUFB").write_bytes(b"the provider's private file")
    params = JobParams(message_extras=((0, MessageExtra(images=("QUFB",))),))
    await run(OllamaBackend(standin.host), GenerationRequest(
        model=VISION, max_tokens=3, messages=(Message("user", "describe"),), params=params))
    assert sent(standin, "/api/chat")["messages"][0]["images"] == ["QUFB"]


async def test_a_thinking_model_streams_its_thoughts_on_their_own_channel(standin: OllamaStandin) -> None:
    chunks, final = await run(OllamaBackend(standin.host), GenerationRequest(
        model=QWEN3, max_tokens=400, messages=(Message("user", "why is the sky blue?"),),
        params=JobParams(think=True)))
    assert sent(standin, "/api/chat")["think"] is True
    channels = [chunk.channel for chunk in chunks]
    assert THINKING in channels and CONTENT in channels
    assert channels == sorted(channels, key=lambda c: c != THINKING)  # thoughts first, then the answer
    assert final.eval_count == sum(chunk.tokens for chunk in chunks)


async def test_embed_returns_one_vector_per_input(standin: OllamaStandin) -> None:
    backend = OllamaBackend(standin.host)
    result = await backend.embed(EMBED, ["first", "second"], truncate=True, dimensions=32)
    assert isinstance(result, EmbedResult)
    assert result.vectors == [expected_embedding(EMBED, "first", 32), expected_embedding(EMBED, "second", 32)]
    assert result.prompt_eval_count > 0 and result.total_duration_ns > 0
    body = sent(standin, "/api/embed")
    assert body["input"] == ["first", "second"] and body["dimensions"] == 32 and body["truncate"] is True
    with pytest.raises(ModelNotFound):
        await backend.embed("nothing-here:1b", ["x"])


async def test_embed_failures_are_translated_once() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ExecutionFailed, match="not reachable"):
        await OllamaBackend(f"http://127.0.0.1:{port}").embed(EMBED, ["x"])


def test_tool_calls_from_the_wire_are_canonical_and_keep_their_order():
    call = ToolCall.of("f", '{"b": 1, "a": [1.5, "x"]}')
    assert call.arguments_json == '{"b":1,"a":[1.5,"x"]}'  # the model's order: no spaces, not sorted


async def test_a_request_ollama_refuses_is_the_jobs_problem_not_the_backends(standin: OllamaStandin) -> None:
    with pytest.raises(Refused, match="does not support thinking"):
        await run(OllamaBackend(standin.host), GenerationRequest(
            model=LLAMA, max_tokens=5, prompt="hi", params=JobParams(think=True)))

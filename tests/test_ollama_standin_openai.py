"""The stand-in's OpenAI-compatible routes (``/v1``), driven by the official
``openai`` client under trio, and compared token for token with the native
routes: Ollama serves both from one handler, so the same request must get
the same reply. Raw ``httpx`` checks what the client hides (SSE framing,
``[DONE]``, error bodies). No sleeps; every wait is on a condition."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator

import httpx
import ollama
import openai
import pytest
import trio
from test_ollama_standin import BOOKING, CLOCK, DEADLINE, PNG, WEATHER, assert_valid

from p2pgpu.testing.ollama_standin import (
    RUNNER_ERROR,
    SERVER_BUSY,
    OllamaStandin,
    Outcome,
    expected_completion,
    expected_embedding,
    expected_tool_call,
    serve_standin,
)

LLAMA = "llama3.2:1b"
QWEN3 = "qwen3:0.6b"
LLAVA = "llava:7b"
EMBEDDER = "nomic-embed-text"
MODELS = (LLAMA, QWEN3, LLAVA, EMBEDDER)
HELLO = [{"role": "user", "content": "Say hello to the network."}]


@pytest.fixture
async def standin() -> AsyncIterator[OllamaStandin]:
    async with serve_standin(MODELS, tokens_per_second=2000) as standin:
        yield standin


@pytest.fixture
async def client(standin: OllamaStandin) -> AsyncIterator[openai.AsyncOpenAI]:
    # No retries: a fault the test injects must reach it, once.
    async with openai.AsyncOpenAI(
        base_url=standin.host + "/v1", api_key="ignored", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def native(standin: OllamaStandin) -> AsyncIterator[ollama.AsyncClient]:
    client = ollama.AsyncClient(host=standin.host)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def http(standin: OllamaStandin) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=standin.host) as http:
        yield http


def sse_events(raw: bytes) -> list[str]:
    text = raw.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events), events
    return [event[len("data: ") :] for event in events]


# -- chat completions ---------------------------------------------------------


async def test_a_chat_completion_is_the_native_reply(
    client: openai.AsyncOpenAI, native: ollama.AsyncClient
) -> None:
    reply = await client.chat.completions.create(
        model=LLAMA, messages=HELLO, max_tokens=7, seed=4, stop=["never"]
    )
    expected = expected_completion(LLAMA, HELLO, seed=4, num_predict=7, stop=["never"])
    assert re.fullmatch(r"chatcmpl-\d+", reply.id)
    assert (reply.object, reply.model, reply.system_fingerprint) == (
        "chat.completion", LLAMA, "fp_ollama",
    )  # fmt: skip
    (choice,) = reply.choices
    assert (choice.message.role, choice.message.content) == ("assistant", expected.text)
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        expected.prompt_eval_count, 7,
    )  # fmt: skip
    assert reply.usage.total_tokens == expected.prompt_eval_count + 7
    # The native route, same request (the /v1 route adds temperature and
    # top_p 1.0, which leave the text as it is).
    same = await native.chat(model=LLAMA, messages=HELLO, options={"seed": 4, "num_predict": 7, "stop": ["never"]})
    assert same.message.content == choice.message.content


async def test_a_streamed_chat_completion_and_its_usage(
    standin: OllamaStandin, client: openai.AsyncOpenAI
) -> None:
    stream = await client.chat.completions.create(
        model=LLAMA, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    expected = expected_completion(LLAMA, HELLO)
    *tokens, last, usage = chunks
    assert [chunk.choices[0].delta.content for chunk in tokens] == list(expected.tokens)
    assert all(chunk.choices[0].finish_reason is None for chunk in tokens)
    assert (last.choices[0].delta.content, last.choices[0].finish_reason) == ("", "stop")
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == expected.eval_count
    assert len({chunk.id for chunk in chunks}) == 1
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert standin.generations[-1].outcome is Outcome.COMPLETED
    assert standin.generations[-1].endpoint == "chat"


async def test_streaming_wire_format(standin: OllamaStandin, http: httpx.AsyncClient) -> None:
    body = {"model": LLAMA, "messages": HELLO, "stream": True, "max_tokens": 3}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        raw = b"".join([part async for part in response.aiter_bytes()])
    events = sse_events(raw)
    assert len(events) == 3 + 1 + 1 and events[-1] == "[DONE]"  # no usage asked for
    chunks = [json.loads(event) for event in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [
        {"role": "assistant", "content": token} for token in expected_completion(LLAMA, HELLO, num_predict=3).tokens
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]
    # stream defaults to false on /v1: one object
    whole = await http.post("/v1/chat/completions", json={**body, "stream": None})
    assert whole.headers["content-type"] == "application/json"
    assert whole.json()["object"] == "chat.completion"
    assert standin.requests[-1].path == "/v1/chat/completions"


async def test_temperature_zero_is_greedy_on_both_routes(
    client: openai.AsyncOpenAI, native: ollama.AsyncClient
) -> None:
    reply = await client.chat.completions.create(model=LLAMA, messages=HELLO, seed=11, temperature=0)
    assert reply.choices[0].message.content == expected_completion(LLAMA, HELLO).text
    seeded = await client.chat.completions.create(model=LLAMA, messages=HELLO, seed=11, temperature=0.5)
    assert seeded.choices[0].message.content == expected_completion(LLAMA, HELLO, seed=11).text
    assert seeded.choices[0].message.content == (
        await native.chat(model=LLAMA, messages=HELLO, options={"seed": 11, "temperature": 0.5})
    ).message.content


# -- tools --------------------------------------------------------------------


async def test_tool_calls_in_openai_shape(client: openai.AsyncOpenAI, http: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": "What is the weather in Lima?"}]
    reply = await client.chat.completions.create(model=LLAMA, messages=messages, tools=[WEATHER, CLOCK])
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == ""
    (call,) = choice.message.tool_calls or []
    assert re.fullmatch(r"call_[a-z0-9]{8}", call.id) and call.type == "function"
    arguments = json.loads(call.function.arguments)  # JSON text, keys sorted as Go writes them
    assert call.function.arguments == json.dumps(arguments, sort_keys=True, separators=(",", ":"))
    assert_valid(arguments, WEATHER["function"]["parameters"])
    expected = expected_tool_call(LLAMA, messages, [WEATHER, CLOCK])
    assert {"name": call.function.name, "arguments": arguments} == {
        "name": expected["function"]["name"], "arguments": expected["function"]["arguments"],
    }  # fmt: skip
    # the native route makes the same call
    body = {"model": LLAMA, "messages": messages, "tools": [WEATHER, CLOCK], "stream": False}
    same = (await http.post("/api/chat", json=body)).json()
    assert same["message"]["tool_calls"] == [expected]


async def test_streamed_tool_calls_and_nested_schemas(client: openai.AsyncOpenAI) -> None:
    parameters = BOOKING["function"]["parameters"]
    for index in range(4):
        messages = [{"role": "user", "content": f"book_table for four, try {index}"}]
        stream = await client.chat.completions.create(model=LLAMA, messages=messages, tools=[BOOKING], stream=True)
        chunks = [chunk async for chunk in stream]
        *calls, last = chunks
        (call,) = [c for chunk in calls for c in (chunk.choices[0].delta.tool_calls or [])]
        assert call.index == 0 and call.function.name == "book_table"
        assert_valid(json.loads(call.function.arguments), parameters)
        expected = expected_tool_call(LLAMA, messages, [BOOKING])
        assert json.loads(call.function.arguments) == expected["function"]["arguments"]
        assert last.choices[0].finish_reason == "tool_calls"


async def test_a_tool_result_continues_the_conversation(
    client: openai.AsyncOpenAI, native: ollama.AsyncClient
) -> None:
    messages: list = [{"role": "user", "content": "get_time in Tokyo"}]
    first = await client.chat.completions.create(model=LLAMA, messages=messages, tools=[CLOCK])
    (call,) = first.choices[0].message.tool_calls or []
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}
        ]},
        {"role": "tool", "tool_call_id": call.id, "content": "09:30"},
    ]  # fmt: skip
    answer = await client.chat.completions.create(model=LLAMA, messages=messages, tools=[CLOCK], max_tokens=10)
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.tool_calls is None
    # What Ollama's middleware makes of it: the tool's name found by its call id.
    native_messages = [
        messages[0],
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_time", "arguments": json.loads(call.function.arguments)}}
        ]},
        {"role": "tool", "content": "09:30", "tool_name": "get_time"},
    ]  # fmt: skip
    expected = expected_completion(LLAMA, native_messages, num_predict=10, tools=[CLOCK])
    assert answer.choices[0].message.content == expected.text
    same = await native.chat(model=LLAMA, messages=native_messages, tools=[CLOCK], options={"num_predict": 10})
    assert same.message.content == expected.text


# -- response_format, images, reasoning ---------------------------------------


async def test_response_format_is_format(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=LLAMA, messages=HELLO, response_format={"type": "json_object"}
    )
    content = reply.choices[0].message.content or ""
    assert isinstance(json.loads(content), dict)
    assert content == expected_completion(LLAMA, HELLO, format="json").text
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}, "score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["answer", "score"],
        "additionalProperties": False,
    }
    stream = await client.chat.completions.create(
        model=LLAMA, messages=HELLO, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
    )  # fmt: skip
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert_valid(json.loads(text), schema)
    assert text == expected_completion(LLAMA, HELLO, format=schema).text


async def test_image_parts_become_messages_of_their_own(
    client: openai.AsyncOpenAI, native: ollama.AsyncClient
) -> None:
    data = base64.b64encode(PNG).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
    ]}]  # fmt: skip
    reply = await client.chat.completions.create(model=LLAVA, messages=messages)
    split = [
        {"role": "user", "content": "What is this?"},
        {"role": "user", "content": "", "images": [data]},
    ]
    expected = expected_completion(LLAVA, split)
    assert reply.choices[0].message.content == expected.text
    assert expected.text.startswith("I see 1 image. ")
    assert (await native.chat(model=LLAVA, messages=split)).message.content == expected.text
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(model=LLAVA, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])  # fmt: skip
    assert raised.value.body == {
        "message": "invalid image input", "type": "invalid_request_error", "param": None, "code": None,
    }  # fmt: skip


async def test_reasoning_of_a_thinking_model(client: openai.AsyncOpenAI, http: httpx.AsyncClient) -> None:
    reply = await client.chat.completions.create(model=QWEN3, messages=HELLO)
    expected = expected_completion(QWEN3, HELLO)
    message = reply.choices[0].message
    assert message.content == expected.text
    assert (message.model_extra or {}).get("reasoning") == expected.thinking_text
    assert reply.usage is not None and reply.usage.completion_tokens == expected.eval_count
    quiet = await client.chat.completions.create(model=QWEN3, messages=HELLO, reasoning_effort="none")
    assert "reasoning" not in (quiet.choices[0].message.model_extra or {})
    body = {"model": QWEN3, "messages": HELLO, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = sse_events(b"".join([part async for part in response.aiter_bytes()]))
    deltas = [json.loads(event)["choices"][0]["delta"] for event in events[:-1]]
    assert [d["reasoning"] for d in deltas if "reasoning" in d] == list(expected.thinking)
    # Ollama 0.12.6 takes effort levels from gpt-oss only
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(model=QWEN3, messages=HELLO, reasoning_effort="high")
    assert raised.value.body == {
        "message": 'think value "high" is not supported for this model', "type": "api_error",
        "param": None, "code": None,
    }  # fmt: skip


# -- completions, models, embeddings -------------------------------------------


async def test_completions_are_generate(
    client: openai.AsyncOpenAI, native: ollama.AsyncClient
) -> None:
    reply = await client.completions.create(model=LLAMA, prompt="Why is the sky blue?", max_tokens=9, seed=2)
    expected = expected_completion(LLAMA, "Why is the sky blue?", seed=2, num_predict=9)
    assert re.fullmatch(r"cmpl-\d+", reply.id) and reply.object == "text_completion"
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (expected.text, "length")
    assert reply.usage is not None and reply.usage.completion_tokens == 9
    same = await native.generate(model=LLAMA, prompt="Why is the sky blue?", options={"seed": 2, "num_predict": 9})
    assert same.response == expected.text
    stream = await client.completions.create(
        model=LLAMA, prompt="Why is the sky blue?", seed=2, stream=True, stop=["sky"],
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    stopped = expected_completion(LLAMA, "Why is the sky blue?", seed=2, stop=["sky"])
    assert "".join(c.choices[0].text for c in chunks if c.choices) == stopped.text
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == stopped.eval_count


async def test_models_are_listed_and_retrieved(
    standin: OllamaStandin, client: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    listed = await client.models.list()
    assert [model.id for model in listed.data] == [LLAMA, QWEN3, LLAVA, "nomic-embed-text:latest"]
    assert {(model.object, model.owned_by) for model in listed.data} == {("model", "library")}
    one = await client.models.retrieve("LLAMA3.2:1b")
    assert (one.id, one.owned_by) == ("LLAMA3.2:1b", "library")  # echoed as asked
    assert one.created == listed.data[0].created
    with pytest.raises(openai.NotFoundError) as raised:
        await client.models.retrieve("nope")
    assert raised.value.body == {
        "message": "model 'nope' not found", "type": "api_error", "param": None, "code": None,
    }  # fmt: skip
    assert (await http.post("/v1/models")).status_code == 405
    assert (await http.get("/v1/nothing")).text == "404 page not found"


async def test_embeddings(client: openai.AsyncOpenAI, http: httpx.AsyncClient) -> None:
    reply = await client.embeddings.create(model=EMBEDDER, input=["first text", "second"], dimensions=32)
    assert [item.embedding for item in reply.data] == [
        expected_embedding(EMBEDDER, "first text", 32), expected_embedding(EMBEDDER, "second", 32),
    ]  # fmt: skip
    assert [item.index for item in reply.data] == [0, 1] and reply.model == EMBEDDER
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (3, 3)
    full = await client.embeddings.create(model=EMBEDDER, input="one")
    assert len(full.data[0].embedding) == 768
    for bad in ([], None):
        response = await http.post("/v1/embeddings", json={"model": EMBEDDER, "input": bad})
        assert (response.status_code, response.json()["error"]["type"]) == (400, "invalid_request_error")
        assert response.json()["error"]["message"] == "invalid input"


# -- errors and faults --------------------------------------------------------


async def test_errors_are_openai_shaped(client: openai.AsyncOpenAI, http: httpx.AsyncClient) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="nope", messages=HELLO)
    # The native handler's 404 passes through the middleware's writer, which
    # always says api_error.
    assert missing.value.body == {
        "message": "model 'nope' not found", "type": "api_error", "param": None, "code": None,
    }  # fmt: skip
    empty = await http.post("/v1/chat/completions", json={"model": LLAMA, "messages": []})
    assert (empty.status_code, empty.json()["error"]) == (400, {
        "message": "[] is too short - 'messages'", "type": "invalid_request_error", "param": None, "code": None,
    })  # fmt: skip
    typed = await http.post("/v1/chat/completions", json={"model": LLAMA, "messages": HELLO, "max_tokens": "ten"})
    assert typed.json()["error"]["message"] == (
        "json: cannot unmarshal string into Go struct field ChatCompletionRequest.max_tokens of type int"
    )
    assert (await http.post("/v1/completions", content=b"")).json()["error"]["message"] == "EOF"
    odd = await http.post("/v1/chat/completions", json={"model": LLAMA, "messages": [{"role": "user", "content": 5}]})
    assert (odd.status_code, odd.json()["error"]["message"]) == (400, "invalid message content type: float64")
    assert odd.json()["error"]["type"] == "invalid_request_error"
    stop = await http.post("/v1/completions", json={"model": LLAMA, "prompt": "x", "stop": ["a", 1]})
    assert stop.json()["error"]["message"] == "invalid type for 'stop' field: float64"
    no_tools = await http.post("/v1/chat/completions", json={"model": LLAVA, "messages": HELLO, "tools": [WEATHER]})
    assert (no_tools.status_code, no_tools.json()["error"]["message"]) == (
        400, "registry.ollama.ai/library/llava:7b does not support tools",
    )  # fmt: skip


async def test_faults_reach_the_v1_routes(
    standin: OllamaStandin, client: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    standin.fail_next(503, SERVER_BUSY)
    with pytest.raises(openai.APIStatusError) as busy:
        await client.chat.completions.create(model=LLAMA, messages=HELLO)
    assert busy.value.status_code == 503 and busy.value.body["message"] == SERVER_BUSY

    standin.fail_next_generation(after_tokens=2, message="boom")
    with pytest.raises(openai.InternalServerError) as crashed:
        await client.chat.completions.create(model=LLAMA, messages=HELLO)
    assert crashed.value.body == {"message": "boom", "type": "api_error", "param": None, "code": None}

    # Mid-stream: the middleware turns the error line into an empty chunk and
    # the stream just ends, without [DONE], as with a real Ollama.
    standin.fail_next_generation(after_tokens=3)
    body = {"model": LLAMA, "messages": HELLO, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = sse_events(b"".join([part async for part in response.aiter_bytes()]))
    assert "[DONE]" not in events and len(events) == 4
    contents = [json.loads(event)["choices"][0]["delta"]["content"] for event in events]
    assert contents == [*expected_completion(LLAMA, HELLO).tokens[:3], ""]
    record = standin.generations[-1]
    assert (record.outcome, record.tokens_sent) == (Outcome.FAILED, 3)
    assert RUNNER_ERROR  # the default message never reaches an OpenAI client


async def test_a_client_leaving_a_v1_stream_stops_the_generation() -> None:
    async with serve_standin([LLAMA], tokens_per_second=50, default_length=100_000) as standin:
        async with openai.AsyncOpenAI(base_url=standin.host + "/v1", api_key="x", max_retries=0) as client:
            stream = await client.chat.completions.create(model=LLAMA, messages=HELLO, stream=True)
            received = 0
            async for _ in stream:
                received += 1
                if received == 3:
                    break
            await stream.close()
            with trio.fail_after(DEADLINE):
                await standin.wait_until(lambda: standin.cancelled_generations == 1)
    assert 3 <= standin.generations[-1].tokens_sent < 100_000

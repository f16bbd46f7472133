"""``POST /v1/submit`` over real HTTP, ``ApiClient.submit`` and ``p2pgpu submit``.

The view's ``submit`` is a scripted async generator (``SubmitView``): the
test lists the events it yields, an exception to raise at some point, or
``HANG`` to wait there until the job is closed. The generator records how
it ended, so a test can see the API close it when the client goes away.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from p2pgpu.testing.fake_view import BOB, CAROL, TOKEN, FakeNodeView
from test_api import HTTP_TIMEOUT, assert_error, auth
from test_cli_api import Node, running_node

from p2pgpu.api import MAX_PROMPT_BYTES, NodeView, SubmitRequest, create_app, serve_api
from p2pgpu.api_client import ApiClient
from p2pgpu.core.jobparams import JobParams
from p2pgpu.cli import cli
from p2pgpu.errors import ExecutionFailed, InsufficientFunds, MalformedInput

HANG = object()  # in a script: wait here until the job is closed

PROVIDER = {"type": "provider", "provider": BOB, "attempt": 1, "price_in": 500_000, "price_out": 1_500_000}
RETRY = {"type": "retry", "provider": BOB, "reason": "provider went away"}
PROVIDER_2 = {"type": "provider", "provider": CAROL, "attempt": 2, "price_in": 400_000, "price_out": 1_000_000}
DONE = {
    "type": "done",
    "job_id": "ab" * 16,
    "provider": CAROL,
    "tokens": 3,
    "prompt_tokens": 7,
    "cost": 250_000,
    "tokens_per_s": 42.25,
    "ttft_s": 0.5,
    "release": "cd" * 32,
}
TOKENS = [{"type": "token", "text": text} for text in ("Hello", ", ", "world\x1b[2J")]
SCRIPT = [PROVIDER, RETRY, PROVIDER_2, *TOKENS, DONE]


class SubmitView(FakeNodeView):
    """``FakeNodeView`` plus a scripted ``submit``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script: list[Any] = list(SCRIPT)
        self.requests: list[SubmitRequest] = []
        self.ended: list[str] = []  # how each generator ended: "finished" or the exception's name
        self.ended_event: trio.Event | None = trio.Event() if self.on_trio_thread else None

    async def submit(self, request: SubmitRequest) -> AsyncIterator[dict[str, Any]]:
        try:
            self._enter("submit", request)
            self.requests.append(request)
            for step in self.script:
                if step is HANG:
                    await trio.sleep_forever()
                elif isinstance(step, BaseException):
                    raise step
                else:
                    await trio.sleep(0)
                    yield step
            self.ended.append("finished")
        except BaseException as exc:
            self.ended.append(type(exc).__name__)
            raise
        finally:
            if self.ended_event is not None:
                self.ended_event.set()


def _check_protocol(view: SubmitView) -> NodeView:
    return view  # the type checker confirms the fake fits the seam


@asynccontextmanager
async def serving(view: Any) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """The real API over a fake view: a client with the token, one without."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_api, create_app(view, TOKEN))
        url = f"http://127.0.0.1:{port}"
        async with (
            httpx.AsyncClient(base_url=url, headers=auth(), timeout=HTTP_TIMEOUT, trust_env=False) as client,
            httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT, trust_env=False) as bare,
        ):
            yield client, bare
        nursery.cancel_scope.cancel()


@pytest.fixture
async def served() -> AsyncIterator[tuple[SubmitView, httpx.AsyncClient, httpx.AsyncClient]]:
    view = SubmitView()
    async with serving(view) as (client, bare):
        yield view, client, bare


async def stream(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[httpx.Response, list[dict[str, Any]]]:
    async with client.stream("POST", "/v1/submit", json=body) as response:
        lines = [json.loads(line) async for line in response.aiter_lines() if line]
    return response, lines


BODY = {"model": "llama3.2:3b", "prompt": "Say hello"}


# ------------------------------------------------------------------ the API


async def test_events_stream_in_order(served):
    view, client, _ = served
    response, events = await stream(client, {**BODY, "max_tokens": 64, "max_price": 1_000_000, "retry": False})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert events == SCRIPT
    assert view.requests == [
        SubmitRequest(model="llama3.2:3b", prompt="Say hello", max_tokens=64, max_price=1_000_000, retry=False)
    ]
    with trio.fail_after(HTTP_TIMEOUT):
        await view.ended_event.wait()
    assert view.ended == ["GeneratorExit"]  # closed by the API after its final event


async def test_each_event_is_sent_as_it_comes(served):
    view, client, _ = served
    view.script = [PROVIDER, TOKENS[0], HANG]
    async with client.stream("POST", "/v1/submit", json=BODY) as response:
        lines = response.aiter_lines()
        assert json.loads(await anext(lines)) == PROVIDER
        assert json.loads(await anext(lines)) == TOKENS[0]  # while the view still waits


async def test_messages_system_and_coins_reach_the_view(served):
    view, client, _ = served
    body = {
        "model": "m",
        "messages": [["user", "hi"], ["assistant", "hello"], ["user", "more"]],
        "system": "be brief",
        "max_price_coins": "0.5",
    }
    response, events = await stream(client, body)
    assert response.status_code == 200 and events[-1] == DONE
    assert view.requests == [
        SubmitRequest(
            model="m",
            messages=(("user", "hi"), ("assistant", "hello"), ("user", "more")),
            system="be brief",
            max_price=500_000,
        )
    ]


@pytest.mark.parametrize(
    ("error", "status"),
    [(InsufficientFunds("spendable 1 coins, the job may cost 2"), 409), (MalformedInput("unknown model x"), 422)],
)
async def test_an_error_before_the_first_event_is_an_ordinary_error_answer(served, error, status):
    view, client, _ = served
    view.fail_next = error
    response = await client.post("/v1/submit", json=BODY)
    assert assert_error(response, status, type(error).__name__) == str(error)


async def test_an_unexpected_error_before_the_first_event_is_a_500(served):
    view, client, _ = served
    view.script = [RuntimeError("bug")]
    assert_error(await client.post("/v1/submit", json=BODY), 500, "InternalError")


async def test_an_error_mid_stream_is_the_last_line(served):
    view, client, _ = served
    view.script = [PROVIDER, TOKENS[0], ExecutionFailed("the provider's GPU fell over"), TOKENS[1]]
    response, events = await stream(client, BODY)
    assert response.status_code == 200
    assert events == [
        PROVIDER,
        TOKENS[0],
        {"type": "error", "error": "the provider's GPU fell over", "kind": "ExecutionFailed"},
    ]


async def test_a_bug_mid_stream_is_an_internal_error_line(served):
    view, client, _ = served
    view.script = [PROVIDER, ZeroDivisionError("secret detail")]
    _, events = await stream(client, BODY)
    assert events[-1]["kind"] == "InternalError" and "secret" not in events[-1]["error"]


async def test_a_stream_that_ends_without_a_result_gets_an_error_line(served):
    view, client, _ = served
    view.script = [PROVIDER, TOKENS[0]]
    _, events = await stream(client, BODY)
    assert events[:2] == [PROVIDER, TOKENS[0]]
    assert events[2]["type"] == "error" and len(events) == 3


async def test_a_client_that_goes_away_closes_the_job(served):
    view, client, _ = served
    view.script = [PROVIDER, TOKENS[0], HANG]
    async with client.stream("POST", "/v1/submit", json=BODY) as response:
        lines = response.aiter_lines()
        assert json.loads(await anext(lines)) == PROVIDER
        assert json.loads(await anext(lines)) == TOKENS[0]
    assert view.ended_event is not None
    with trio.fail_after(HTTP_TIMEOUT):
        await view.ended_event.wait()
    assert view.ended in (["Cancelled"], ["GeneratorExit"])


async def test_submit_needs_the_token(served):
    view, _, bare = served
    assert_error(await bare.post("/v1/submit", json=BODY), 401, "Unauthorized")
    assert view.requests == []


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"prompt": "hi"}, "model"),
        ({"model": "", "prompt": "hi"}, "model"),
        ({"model": "m"}, "exactly one"),
        ({"model": "m", "prompt": "hi", "messages": [["user", "hi"]]}, "exactly one"),
        ({"model": "m", "prompt": 5}, "prompt"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "prompt": " \n\t "}, "only whitespace"),
        ({"model": "m", "messages": [["system", " "], ["user", "\n"]]}, "no text to answer"),
        ({"model": "m", "messages": [["assistant", "I was saying"]]}, "no text to answer"),
        ({"model": "m", "messages": [["robot", "hi"]]}, "role"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "[role, content]"),
        ({"model": "m", "messages": [["user"]]}, "[role, content]"),
        ({**BODY, "max_tokens": 0}, "max_tokens"),
        ({**BODY, "max_tokens": 131_073}, "max_tokens"),
        ({**BODY, "max_tokens": True}, "max_tokens"),
        ({**BODY, "max_price": -1}, "max_price"),
        ({**BODY, "max_price": 1.5}, "max_price"),
        ({**BODY, "max_price": 1, "max_price_coins": "1"}, "at most one"),
        ({**BODY, "max_price_coins": "lots"}, "coin amount"),
        ({**BODY, "retry": "yes"}, "retry"),
        ({**BODY, "system": 3}, "system"),
        ({**BODY, "temperature": 0.5}, "unknown field"),
        ({"model": "m", "prompt": "x" * (MAX_PROMPT_BYTES + 1)}, "at most"),
        ({"model": "m", "messages": [["user", "é" * (MAX_PROMPT_BYTES // 2 + 1)]]}, "at most"),
    ],
)
async def test_bad_bodies_are_malformed(served, body, fragment):
    view, client, _ = served
    assert fragment in assert_error(await client.post("/v1/submit", json=body), 422, "MalformedInput")
    assert view.requests == []


async def test_a_prompt_of_the_largest_size_is_accepted(served):
    view, client, _ = served
    response, events = await stream(client, {"model": "m", "prompt": "x" * MAX_PROMPT_BYTES})
    assert response.status_code == 200 and events[-1] == DONE


# ------------------------------------------------------- client and the CLI


@pytest.fixture
def node(tmp_path) -> Iterator[Node]:
    with running_node(tmp_path, SubmitView()) as running:
        yield running


def test_the_client_yields_the_events(node):
    with ApiClient.from_data_dir(node.data_dir) as client:
        assert list(client.submit("m", "hi", max_price=5, retry=False)) == SCRIPT
        node.view.fail_next = InsufficientFunds("not enough")
        with pytest.raises(InsufficientFunds, match="not enough"):
            list(client.submit("m", "hi"))
        with pytest.raises(MalformedInput):
            list(client.submit("m", "hi", max_tokens=0))
    assert node.view.requests[0] == SubmitRequest(model="m", prompt="hi", max_price=5, retry=False)


def test_cli_prints_tokens_and_a_summary(node):
    result = node("submit", "--model", "llama3.2:3b", "--max-price", "0.5", "--max-tokens", "10", "Say hello")
    assert result.stdout == "Hello, world\\u001b[2J\n"  # the escape sequence is defused
    assert result.stderr.splitlines()[-1] == (
        f"provider {CAROL}, 3 tokens, 42.2 tok/s, cost 0.25 coins (after 1 retry)"
    )
    assert f"provider {BOB} failed (provider went away); trying the next provider" in result.stderr
    assert node.view.requests == [
        SubmitRequest(model="llama3.2:3b", prompt="Say hello", max_tokens=10, max_price=500_000)
    ]


def test_cli_failover_that_continues_the_answer_keeps_one_answer_on_stdout(node):
    continued = {**RETRY, "tokens_delivered": 2, "continues": True}
    node.view.script = [PROVIDER, TOKENS[0], TOKENS[1], continued, PROVIDER_2, TOKENS[2], DONE]
    result = node("submit", "--model", "m", "Say hello")
    assert result.stdout == "Hello, world\\u001b[2J\n"  # the fragment and its continuation: one answer
    assert f"provider {BOB} failed (provider went away) after 2 tokens; the next provider continues the answer" \
        in result.stderr
    assert "Hello" not in result.stderr


def test_cli_reads_the_prompt_from_stdin_and_passes_options(node):
    node.view.script = [TOKENS[0], {**DONE, "tokens_per_s": None}]
    result = node.runner.invoke(
        cli, ["submit", "--model", "m", "--system", "terse", "--no-retry", "-"], input="from stdin\n"
    )
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout == "Hello\n"
    assert result.stderr == f"provider {CAROL}, 3 tokens, ? tok/s, cost 0.25 coins\n"
    assert node.view.requests == [SubmitRequest(model="m", prompt="from stdin\n", system="terse", retry=False)]


def test_cli_messages_file(node, tmp_path):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]))
    node("submit", "--model", "m", "--messages", str(chat))
    assert node.view.requests[0].messages == (("system", "s"), ("user", "u"))
    assert node.view.requests[0].prompt is None


def test_cli_json_prints_one_event_per_line(node):
    result = node("submit", "--model", "m", "--json", "hi")
    assert [json.loads(line) for line in result.stdout.splitlines()] == SCRIPT
    assert result.stderr == ""


def test_cli_a_final_error_exits_1(node):
    node.view.script = [TOKENS[0], ExecutionFailed("no provider serves m")]
    result = node.fails("submit", "--model", "m", "hi")
    assert result.stdout == "Hello\n"
    assert result.stderr == "error: no provider serves m\n"
    result = node.runner.invoke(cli, ["submit", "--model", "m", "--json", "hi"])
    assert result.exit_code == 1
    assert json.loads(result.stdout.splitlines()[-1])["kind"] == "ExecutionFailed"
    # stderr says it as every --json error is said: one object of a stable shape
    assert json.loads(result.stderr) == {"error": {"code": "execution_failed", "message": "no provider serves m",
                                                   "exit_code": 1}}


def test_cli_an_error_before_the_stream_exits_1(node):
    node.view.fail_next = InsufficientFunds("spendable 0 coins")
    assert node.fails("submit", "--model", "m", "hi").stderr == "error: spendable 0 coins\n"


def test_cli_needs_a_prompt_or_messages(node, tmp_path):
    node.fails("submit", "--model", "m", code=2)
    chat = tmp_path / "chat.json"
    chat.write_text("[]")
    node.fails("submit", "--model", "m", "--messages", str(chat), "hi", code=2)
    assert "not valid JSON" not in node.fails("submit", "--model", "m", "--messages", str(chat)).stderr
    chat.write_text("{")
    assert "not valid JSON" in node.fails("submit", "--model", "m", "--messages", str(chat)).stderr
    assert node.view.requests == []


def test_cli_submit_to_a_stopped_node(tmp_path):
    stopped = Node(tmp_path, SubmitView())
    assert "not running" in stopped.fails("submit", "--model", "m", "hi", code=3).stderr


# ------------------------------------------------------- params and embeddings

PNG = "iVBORw0KGgo="
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


async def test_params_reach_the_view_checked_and_in_their_one_form(served):
    view, client, _ = served
    params = {"options": {"temperature": 0.5, "seed": 3, "stop": ["\n\n"]}, "format": {"type": "object"},
              "tools": [TOOL], "think": "low",
              "message_extras": [[1, {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}],
                                 [2, {"tool_name": "get_weather"}], [3, {"images": [PNG]}]]}
    messages = [["user", "weather?"], ["assistant", ""], ["tool", '{"temp": 3}'], ["user", "and this?"]]
    response, events = await stream(client, {"model": "m", "messages": messages, "params": params})
    assert response.status_code == 200 and events[-1] == DONE
    (request,) = view.requests
    assert request.params == JobParams.from_wire(params) and request.params.to_wire() == params
    assert request.messages[2] == ("tool", '{"temp": 3}') and request.inputs is None


async def test_an_embedding_job_takes_input_and_counts_one_token_per_text(served):
    view, client, _ = served
    response, events = await stream(client, {"model": "nomic-embed-text", "input": ["a", "b", "c"],
                                             "params": {"dimensions": 64}})
    assert response.status_code == 200
    (request,) = view.requests
    assert request.inputs == ("a", "b", "c") and request.max_tokens == 3
    assert request.params == JobParams(dimensions=64) and request.prompt is None and request.messages is None


async def test_a_prompt_of_only_images_is_something_to_answer(served):
    view, client, _ = served
    response, _ = await stream(client, {"model": "m", "messages": [["user", ""]],
                                        "params": {"message_extras": [[0, {"images": [PNG]}]]}})
    assert response.status_code == 200 and view.requests[0].params.extra_for(0).images == (PNG,)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({**BODY, "params": []}, '"params": job params: expected an object'),
        ({**BODY, "params": {"temperature": 0.5}}, "\"params\": job params: unknown field 'temperature'"),
        ({**BODY, "params": {"options": {"num_ctx": 65536}}}, '"params": option num_ctx is a load-time option'),
        ({**BODY, "params": {"options": {"num_gpu": 0}}}, "load-time"),
        ({**BODY, "params": {"options": {"num_predict": 5}}}, "num_predict"),
        ({**BODY, "params": {"options": {"temperature": 3}}}, "option temperature"),
        ({**BODY, "params": {"options": {"top_k": 1.5}}}, "option top_k"),
        ({**BODY, "params": {"format": "yaml"}}, '"params": format'),
        ({**BODY, "params": {"format": {"type": "object", "d": "x" * 20_000}}}, "format"),
        ({**BODY, "params": {"tools": [{"type": "retrieval"}]}}, "tools[0]"),
        ({**BODY, "params": {"tools": [TOOL]}}, "tools need a chat"),
        ({**BODY, "params": {"think": "very"}}, "think"),
        ({**BODY, "params": {"images": ["not base64!"]}}, "not base64"),
        ({**BODY, "params": {"images": [PNG] * 9}}, "images"),
        ({**BODY, "params": {"message_extras": [[0, {"images": [PNG]}]]}}, "message_extras are for chat"),
        ({**BODY, "params": {"dimensions": 3}}, "embed"),
        ({"model": "m", "messages": [["user", "hi"]], "params": {"images": [PNG]}}, "images are for a prompt"),
        ({"model": "m", "messages": [["user", "hi"]], "params": {"message_extras": [[1, {"thinking": "x"}]]}},
         "message_extras[1]"),
        ({"model": "m", "messages": [["user", "hi"]], "params": {"message_extras": [[0, {"colour": 1}]]}},
         "unknown field 'colour'"),
        ({"model": "m", "messages": [["user", "hi"]], "params": {"message_extras": [[0, {}]]}}, "carry something"),
        ({"model": "m", "messages": [["assistant", "x"]], "params": {"message_extras": [
            [0, {"tool_calls": [{"name": "f", "arguments": "[1]"}]}]]}}, "JSON object"),
        ({"model": "m", "input": []}, '"input" must be a non-empty array'),
        ({"model": "m", "input": "one text"}, '"input" must be a non-empty array'),
        ({"model": "m", "input": ["a", 1]}, '"input"'),
        ({"model": "m", "input": ["a"] * 1025}, "at most 1024"),
        ({"model": "m", "input": ["a"], "prompt": "x"}, "exactly one"),
        ({"model": "m", "input": ["a"], "system": "s"}, '"system"'),
        ({"model": "m", "input": ["a", "b"], "max_tokens": 5}, "number of inputs (2)"),
        ({"model": "m", "input": ["a"], "params": {"think": True}}, "only truncate and dimensions"),
        ({"model": "m", "input": ["é" * (MAX_PROMPT_BYTES // 2 + 1)]}, "at most"),
        ({"model": "m", "prompt": "x" * (MAX_PROMPT_BYTES - 10), "params": {"think": True}}, "at most"),
    ],
)
async def test_bad_params_and_inputs_are_malformed_naming_the_field(served, body, fragment):
    view, client, _ = served
    assert fragment in assert_error(await client.post("/v1/submit", json=body), 422, "MalformedInput")
    assert view.requests == []

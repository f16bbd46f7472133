"""The gateway (issue 11) driven by the real ``ollama`` and ``openai`` clients.

Real nodes (libp2p on 127.0.0.1, LevelDB), real Ollama stand-ins behind the
providers, and the consumer node's own gateway listener: every request
below is a paid job on the network, and its output is compared token for
token with what the stand-in says for the same request.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import jsonschema
import ollama
import openai
import pytest
import trio

from p2pgpu.config import GatewayConfig
from p2pgpu.core.jobs import Prices, job_cost
from p2pgpu.gateway import Gateway, serve_gateway
from p2pgpu.node import Node
from p2pgpu.testing.nodes import LocalNetwork, live
from p2pgpu.testing.ollama_standin import (
    OllamaStandin, expected_completion, expected_embedding, expected_tool_call, serve_standin,
)
from p2pgpu.testing.waiting import wait_until

MODEL = "llama3.2:1b"
EMBED = "nomic-embed-text:latest"
TIMEOUT = 60.0


@dataclass
class Setup:
    net: LocalNetwork
    standins: list[OllamaStandin]
    providers: list[Node]
    consumer: Node
    nursery: trio.Nursery

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.consumer.gateway_port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.consumer.token}"}

    def ollama(self, **kwargs) -> ollama.AsyncClient:
        return ollama.AsyncClient(host=self.url, headers=self.auth, timeout=TIMEOUT, **kwargs)

    def openai(self, url: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=(url or self.url) + "/v1", api_key=self.consumer.token, max_retries=0,
                                  timeout=TIMEOUT)

    async def gateway(self, **config) -> str:
        """Another gateway on the consumer node, with its own settings."""
        gateway = Gateway(self.consumer, self.consumer.token, self.consumer.key.peer_id,
                          GatewayConfig(listen="127.0.0.1:0", **config))
        port = await self.nursery.start(serve_gateway, gateway)
        return f"http://127.0.0.1:{port}"

    def balances(self, node: Node) -> dict[str, int]:
        """Each account's coins as ``node`` sees them: spendable, held and
        on their way in (a hold still open is still its owner's)."""
        return {k.peer_id: node.ledger.account(k.public_key).total for k in self.net.keys}

    def settled(self) -> bool:
        """Every running node has the same ledger, and no coin is held."""
        running = [n for i, n in enumerate(self.net.nodes) if not self.net.ended[i].is_set()]
        hashes = {n.ledger.state_hash() for n in running}
        return len(hashes) == 1 and all(
            n.ledger.account(k.public_key).held == 0 for n in running for k in self.net.keys)


@contextlib.asynccontextmanager
async def network(tmp_path, *, providers: int = 1, models=(MODEL,), tokens_per_second=None) -> AsyncIterator[Setup]:
    async with contextlib.AsyncExitStack() as stack:
        standins = [await stack.enter_async_context(serve_standin(models=models, tokens_per_second=tokens_per_second))
                    for _ in range(providers)]
        nursery = await stack.enter_async_context(trio.open_nursery())
        net = LocalNetwork(tmp_path, providers + 1)
        nodes = [await net.start(nursery, i, s.host) for i, s in enumerate(standins)]
        consumer = await net.start(nursery, providers)
        await wait_until(lambda: len(live(consumer)) == providers, what="every provider's offer")
        yield Setup(net, standins, nodes, consumer, nursery)
        await net.stop_all()
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------ the Ollama surface


async def test_ollama_chat_and_generate_stream_the_stand_ins_tokens_and_say_who_served_and_at_what_cost(tmp_path):
    async with network(tmp_path) as s:
        client = s.ollama()
        messages = [{"role": "user", "content": "why is the sky blue?"}]
        chunks = [c async for c in await client.chat(MODEL, messages=messages, stream=True,
                                                     options={"num_predict": 12, "seed": 7, "num_ctx": 8192})]
        expected = expected_completion(MODEL, messages, seed=7, num_predict=12)
        assert [c.message.content for c in chunks[:-1]] == list(expected.tokens)  # token for token
        straight = await ollama.AsyncClient(host=s.standins[0].host).chat(
            MODEL, messages=messages, stream=True, options={"num_predict": 12, "seed": 7})
        assert [c.message.content async for c in straight][:-1] == [c.message.content for c in chunks[:-1]]
        final = chunks[-1]
        assert final.done and final.done_reason == "length" and final.message.content == ""
        assert final.eval_count == 12 and final.prompt_eval_count == expected.prompt_eval_count
        assert final.total_duration > 0 and final.eval_duration > 0

        whole = await client.generate(MODEL, prompt="hello", options={"num_predict": 9}, stream=False)
        assert whole.response == expected_completion(MODEL, "hello", num_predict=9).text and whole.done
        assert whole.eval_count == 9

        async with httpx.AsyncClient(base_url=s.url, headers=s.auth, timeout=TIMEOUT) as http:
            answer = await http.post("/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False,
                                                            "options": {"num_predict": 3}})
            assert answer.status_code == 200
            assert answer.headers["x-p2pgpu-provider"] == s.providers[0].key.peer_id
            summary = answer.json()["p2pgpu"]
            assert int(answer.headers["x-p2pgpu-cost-units"]) == summary["cost"] > 0
            record = s.consumer.job(summary["job_id"])  # the job in `p2pgpu jobs`, with who served it and its cost
            assert record["status"] == "completed" and record["cost"] == summary["cost"]
            assert record["provider"] == summary["provider"] == s.providers[0].key.peer_id
            lines = []
            async with http.stream("POST", "/api/chat", json={"model": MODEL, "messages": messages,
                                                              "options": {"num_predict": 4}}) as streamed:
                assert streamed.headers["content-type"].startswith("application/x-ndjson")
                assert streamed.headers["x-p2pgpu-job-id"]
                async for line in streamed.aiter_lines():
                    assert line  # no blank lines: the ollama client would choke on one
                    lines.append(json.loads(line))
            assert lines[-1]["done"] is True and len(lines) == 5


async def test_listings_show_the_networks_models_with_their_best_price(tmp_path):
    async with network(tmp_path, providers=2) as s:
        client = s.ollama()
        tags = await client.list()
        assert [m.model for m in tags.models] == [MODEL]
        async with httpx.AsyncClient(base_url=s.url, headers=s.auth, timeout=TIMEOUT) as http:
            raw = (await http.get("/api/tags")).json()["models"][0]
            assert raw["name"] == MODEL and raw["p2pgpu"]["providers"] == 2 and raw["p2pgpu"]["price_out"] > 0
            assert (await http.get("/api/version")).json()["version"]
            assert (await http.get("/")).text == "Ollama is running"
            assert (await http.post("/api/pull", json={"model": MODEL})).status_code == 501
        shown = await client.show(MODEL)
        assert "completion" in shown.capabilities and shown.modelinfo == {}
        assert (await client.ps()).models == []

        models = await s.openai().models.list()
        assert [m.id for m in models.data] == [MODEL]
        assert (await s.openai().models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.NotFoundError):
            await s.openai().models.retrieve("nope:1b")


async def test_an_unknown_model_is_a_404_listing_what_the_network_offers(tmp_path):
    async with network(tmp_path) as s:
        with pytest.raises(ollama.ResponseError) as refused:
            await s.ollama().chat("qwen9:404b", messages=[{"role": "user", "content": "x"}])
        assert refused.value.status_code == 404 and MODEL in refused.value.error
        with pytest.raises(openai.NotFoundError) as not_found:
            await s.openai().chat.completions.create(model="qwen9:404b", messages=[{"role": "user", "content": "x"}])
        assert MODEL in str(not_found.value) and not_found.value.body["code"] == "model_not_found"


# ------------------------------------------------------------ the OpenAI surface


async def test_openai_chat_streams_with_a_usage_chunk_before_done_and_whole_answers_carry_usage(tmp_path):
    async with network(tmp_path) as s:
        client = s.openai()
        messages = [{"role": "user", "content": "tell me a story"}]
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=3,
                                                      stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        expected = expected_completion(MODEL, messages, seed=3, num_predict=10)
        texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert texts == list(expected.tokens)
        direct = openai.AsyncOpenAI(base_url=s.standins[0].host + "/v1", api_key="unused", max_retries=0)
        straight = await direct.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, seed=3,
                                                        stream=True)
        assert [c.choices[0].delta.content async for c in straight
                if c.choices and c.choices[0].delta.content] == texts  # what the stand-in sends, chunk for chunk
        assert chunks[-2].choices[0].finish_reason == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
        assert chunks[-1].usage.prompt_tokens == expected.prompt_eval_count

        whole = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=3)
        assert whole.choices[0].message.content == expected_completion(MODEL, messages, seed=3, num_predict=6).text
        assert whole.usage.completion_tokens == 6 and whole.choices[0].finish_reason == "length"
        assert whole.id.startswith("chatcmpl-")

        completion = await client.completions.create(model=MODEL, prompt="once upon", max_tokens=5)
        assert completion.choices[0].text == expected_completion(MODEL, "once upon", num_predict=5).text
        streamed = await client.completions.create(model=MODEL, prompt="once upon", max_tokens=5, stream=True)
        assert "".join([c.choices[0].text async for c in streamed if c.choices]) == completion.choices[0].text


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"), ({"logit_bias": {"50256": -100}}, "logit_bias"), ({"logprobs": True}, "logprobs"),
    ({"tool_choice": "required"}, "tool_choice"), ({"frobnicate": 1}, "frobnicate"),
])
async def test_unsupported_openai_parameters_are_400s_naming_the_parameter(tmp_path, extra, param):
    async with network(tmp_path) as s:
        async with httpx.AsyncClient(base_url=s.url, headers=s.auth, timeout=TIMEOUT) as http:
            answer = await http.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "x"}], **extra})
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert error["param"] == param and param in error["message"] and error["type"] == "invalid_request_error"
        assert s.consumer.jobs(None, 10) == []  # refused before any job


# ------------------------------------------------------------ who may spend, and how much


async def test_a_missing_or_wrong_token_is_refused_on_both_surfaces_and_tokenless_loopback_works(tmp_path):
    async with network(tmp_path) as s:
        with pytest.raises(ollama.ResponseError) as refused:
            await ollama.AsyncClient(host=s.url).list()
        assert refused.value.status_code == 401 and "api.token" in refused.value.error
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        async with httpx.AsyncClient(base_url=s.url, timeout=TIMEOUT) as http:
            assert (await http.get("/api/version")).status_code == 200  # says only that a server is here
            assert (await http.post("/api/chat", json={"model": MODEL})).status_code == 401
            web_page = await http.get("/api/tags", headers={**s.auth, "Origin": "https://evil.example"})
            assert web_page.status_code == 403

        open_url = await s.gateway(token=False)
        answer = await ollama.AsyncClient(host=open_url).generate(MODEL, prompt="hi", options={"num_predict": 2})
        assert answer.response == expected_completion(MODEL, "hi", num_predict=2).text
    with pytest.raises(Exception, match="loopback"):
        GatewayConfig(listen="0.0.0.0:11435").address()
    with pytest.raises(Exception, match="token"):
        GatewayConfig(listen="0.0.0.0:11435", allow_remote=True, token=False).address()
    assert GatewayConfig(listen="0.0.0.0:11435", allow_remote=True).address() == ("0.0.0.0", 11435)


async def test_the_spending_limit_is_a_429_naming_the_limit_and_insufficient_funds_a_402(tmp_path):
    async with network(tmp_path) as s:
        prices = Prices(s.net.config(0, (), "x").price_in, s.net.config(0, (), "x").price_out)
        one_job = job_cost(prices, 200, 50)
        url = await s.gateway(limit_request=one_job * 4, limit_hour=one_job * 4)
        client = ollama.AsyncClient(host=url, headers=s.auth)
        with pytest.raises(ollama.ResponseError) as too_big:  # the cheapest worst case passes the per-request limit
            await client.generate(MODEL, prompt="hi", options={"num_predict": 100_000})
        assert too_big.value.status_code == 429 and "per request" in too_big.value.error
        with pytest.raises(ollama.ResponseError) as hourly:
            for _ in range(50):
                await client.generate(MODEL, prompt="hi", options={"num_predict": 50})
        assert hourly.value.status_code == 429 and "per hour" in hourly.value.error
        spent = sum(j["cost"] for j in s.consumer.jobs("consumer", 100))
        assert 0 < spent <= one_job * 4
        with pytest.raises(openai.RateLimitError, match="per hour"):
            await s.openai(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                        max_tokens=50)

        async with httpx.AsyncClient(base_url=s.url, headers={**s.auth, "X-P2PGPU-Max-Price": "nonsense"}) as http:
            answer = await http.post("/api/generate", json={"model": MODEL, "prompt": "hi"})
            assert answer.status_code == 400 and "X-P2PGPU-Max-Price" in answer.json()["error"]
        async with httpx.AsyncClient(base_url=s.url, headers=s.auth, timeout=TIMEOUT) as http:
            body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 50}}
            cheap = await http.post("/api/generate", json=body, headers={"X-P2PGPU-Max-Price": "0.000001"})
            assert cheap.status_code == 400 and "costs more than the limit" in cheap.json()["error"]  # its own bound
            bounded = await http.post("/api/generate", json=body, headers={"X-P2PGPU-Max-Price": "0.01"})
            assert bounded.status_code == 200 and 0 < int(bounded.headers["x-p2pgpu-cost-units"]) <= 10_000

        spendable = s.consumer.ledger.spendable(s.consumer.key.public_key)
        await s.consumer.send(s.net.keys[0].peer_id, spendable - 5, "drain")
        with pytest.raises(ollama.ResponseError) as broke:
            await s.ollama().generate(MODEL, prompt="hi", options={"num_predict": 50})
        assert broke.value.status_code == 402 and "coins" in broke.value.error
        with pytest.raises(openai.APIStatusError) as openai_broke:
            await s.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert openai_broke.value.status_code == 402 and openai_broke.value.body["code"] == "insufficient_funds"


@pytest.mark.parametrize("path, body, status, words", [
    ("/api/chat", b"{not json", 400, "not valid JSON"),
    ("/api/chat", b"", 400, "missing request body"),
    ("/api/chat", b'{"messages": []}', 400, "model is required"),
    ("/api/chat", b'{"model": "llama3.2:1b", "messages": [{"role": "wizard", "content": "x"}]}', 400, "role"),
    ("/api/chat", b'{"model": "llama3.2:1b", "messages": "hi"}', 400, "messages"),
    ("/api/generate", b'{"model": "llama3.2:1b", "prompt": "x", "options": {"temperature": "hot"}}', 400,
     "temperature"),
    ("/api/generate", b'{"model": "llama3.2:1b", "prompt": "x", "options": {"mirror": 1}}', 400, "mirror"),
    ("/api/generate", b'{"model": "llama3.2:1b", "prompt": "x", "images": ["not base64!"]}', 400, "base64"),
    ("/api/generate", b'{"model": "llama3.2:1b", "prompt": "x", "format": 7}', 400, "format"),
    ("/api/generate", b'{"model": "llama3.2:1b", "prompt": "x", "raw": true}', 400, "raw"),
    ("/api/generate", b'{"model": "llama3.2:1b", "prompt": "x", "think": "maximal"}', 400, "think"),
    ("/api/chat", b'{"model": "llama3.2:1b", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web"}]}',
     400, "tools"),
    ("/api/embed", b'{"model": "llama3.2:1b", "input": []}', 400, "input"),
    ("/v1/chat/completions", b'{"model": "llama3.2:1b", "messages": []}', 400, "too short"),
    ("/v1/chat/completions", b'{"model": "llama3.2:1b", "messages": [{"role": "user", "content": "x"}], '
                             b'"max_tokens": -3}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "llama3.2:1b", "prompt": ["a", "b"]}', 400, "prompt"),
    ("/v1/embeddings", b'{"model": "llama3.2:1b", "input": [[1, 2, 3]]}', 400, "input"),
    ("/v1/chat/completions", b'{"model": "llama3.2:1b", "messages": [{"role": "user", "content": [{"type": '
                             b'"image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}', 400, "data URI"),
])
async def test_malformed_requests_get_a_clear_error_and_nothing_is_spent(tmp_path, path, body, status, words):
    async with network(tmp_path) as s:
        before = s.consumer.ledger.state_hash()
        async with httpx.AsyncClient(base_url=s.url, headers=s.auth, timeout=TIMEOUT) as http:
            answer = await http.post(path, content=body)
            assert answer.status_code == status
            error = answer.json()["error"]
            message = error["message"] if isinstance(error, dict) else error
            assert words.lower() in message.lower(), message
            huge = await http.post(path, content=b"x" * (9 * 1024 * 1024))
            assert huge.status_code == 413
            assert (await http.get("/api/tags")).status_code == 200  # still serving
        assert s.consumer.jobs(None, 10) == [] and s.consumer.ledger.state_hash() == before


# ------------------------------------------------------------ failures mid-stream


async def test_a_client_that_disconnects_mid_stream_pays_only_for_the_tokens_delivered(tmp_path):
    async with network(tmp_path, tokens_per_second=40) as s:
        before = s.balances(s.consumer)
        async with httpx.AsyncClient(base_url=s.url, headers=s.auth, timeout=TIMEOUT) as http:
            async with http.stream("POST", "/api/generate", json={"model": MODEL, "prompt": "a long one",
                                                                  "options": {"num_predict": 400}}) as streamed:
                job_id = streamed.headers["x-p2pgpu-job-id"]
                seen = 0
                async for _line in streamed.aiter_lines():
                    seen += 1
                    if seen == 5:
                        running = (await http.get("/api/ps")).json()["models"]
                        assert [m["p2pgpu"]["job_id"] for m in running] == [job_id]
                        break  # leaving the block closes the connection mid-stream
        await s.standins[0].wait_until(lambda: s.standins[0].cancelled_generations == 1)
        await wait_until(lambda: s.consumer.job(job_id)["status"] == "cancelled", timeout=TIMEOUT)
        record = s.consumer.job(job_id)
        assert 5 <= record["tokens_out"] < 400
        await wait_until(s.settled, timeout=TIMEOUT)
        provider = s.providers[0].key.peer_id
        for node in s.net.nodes:
            after = s.balances(node)
            paid = before[s.consumer.key.peer_id] - after[s.consumer.key.peer_id]
            earned = after[provider] - before[provider]
            assert paid == earned == record["cost"] > 0
        prices = Prices(s.net.config(0, (), "x").price_in, s.net.config(0, (), "x").price_out)
        assert record["cost"] == job_cost(prices, record["tokens_in"] or 0, record["tokens_out"])


async def test_the_openai_client_closing_its_stream_cancels_the_job(tmp_path):
    async with network(tmp_path, tokens_per_second=40) as s:
        stream = await s.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a long one"}], max_tokens=400, stream=True)
        received = 0
        async for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if received == 5:
                break
        await stream.close()
        await s.standins[0].wait_until(lambda: s.standins[0].cancelled_generations == 1)
        (job,) = s.consumer.jobs("consumer", 10)
        await wait_until(lambda: s.consumer.job(job["id"])["status"] == "cancelled", timeout=TIMEOUT)
        record = s.consumer.job(job["id"])
        assert 5 <= record["tokens_out"] < 400 and record["cost"] > 0
        await wait_until(s.settled, timeout=TIMEOUT)


async def test_a_provider_killed_mid_stream_and_the_clients_stream_still_completes_paid_once(tmp_path):
    async with network(tmp_path, providers=2, tokens_per_second=30) as s:
        before = s.balances(s.consumer)
        client = s.openai()
        messages = [{"role": "user", "content": "keep going"}]
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, stream=True,
                                                      stream_options={"include_usage": True})
        texts: list[str] = []
        killed = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                texts.append(chunk.choices[0].delta.content)
                if len(texts) == 5 and killed is None:
                    serving = next(i for i, p in enumerate(s.providers)
                                   if any(j["status"] == "running" for j in p.jobs("provider", 5)))
                    killed = serving
                    s.net.crash(serving)
            last = chunk
        assert "".join(texts) == expected_completion(MODEL, messages, num_predict=30).text  # one whole answer
        assert last.usage.completion_tokens == 30
        survivors = [n for i, n in enumerate(s.net.nodes) if i != killed]
        crashed = s.providers[killed].key.peer_id

        def paid_once(node: Node) -> bool:
            after = s.balances(node)
            paid = before[s.consumer.key.peer_id] - after[s.consumer.key.peer_id]
            earned = sum(after[p.key.peer_id] - before[p.key.peer_id] for p in s.providers)
            return paid == earned > 0

        # The dead provider never claimed: the one that finished the answer is
        # paid for its part, and the consumer's loss is exactly that gain.
        await wait_until(lambda: all(paid_once(n) for n in survivors)
                         and len({n.ledger.state_hash() for n in survivors}) == 1, timeout=TIMEOUT)
        for node in survivors:
            assert s.balances(node)[crashed] == before[crashed]
            total, minted = node.ledger.conservation()
            assert total == minted


# ------------------------------------------------------------ what a job can carry

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "required": ["city", "unit"], "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "description": "how many days ahead"}}}}}
# (The official ollama client, which the provider's executor uses, keeps only a
# property's type, description, enum and items: a tool's minimum or pattern
# never reaches Ollama. Structured output keeps the whole schema.)
SCHEMA = {"type": "object", "required": ["name", "age", "tags"], "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}}


async def test_tool_calls_come_back_on_both_surfaces_and_the_tools_result_is_answered(tmp_path):
    async with network(tmp_path) as s:
        messages = [{"role": "user", "content": "use get_weather: is it raining in Paris?"}]
        expected = expected_tool_call(MODEL, messages, [WEATHER])
        assert expected is not None
        answer = await s.ollama().chat(MODEL, messages=messages, tools=[WEATHER], options={"num_predict": 200})
        (call,) = answer.message.tool_calls
        assert call.function.name == "get_weather" and answer.done_reason == "stop"
        assert dict(call.function.arguments) == expected["function"]["arguments"]
        jsonschema.validate(dict(call.function.arguments), WEATHER["function"]["parameters"])

        followup = [*messages, {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": dict(call.function.arguments)}}]},
            {"role": "tool", "content": "light rain, 12 degrees", "tool_name": "get_weather"}]
        result = await s.ollama().chat(MODEL, messages=followup, tools=[WEATHER], options={"num_predict": 8})
        assert not result.message.tool_calls
        assert result.message.content == expected_completion(MODEL, followup, num_predict=8, tools=[WEATHER]).text

        client = s.openai()
        whole = await client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=200)
        assert whole.choices[0].finish_reason == "tool_calls"
        (openai_call,) = whole.choices[0].message.tool_calls
        assert openai_call.type == "function" and openai_call.id
        assert json.loads(openai_call.function.arguments) == expected["function"]["arguments"]
        streamed = await client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                                        max_tokens=200, stream=True)
        chunks = [c async for c in streamed]
        calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
        assert [json.loads(t.function.arguments) for t in calls] == [expected["function"]["arguments"]]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # the assistant's call and the tool's answer, OpenAI-style, reach the model as Ollama's shapes
        reply = await client.chat.completions.create(model=MODEL, max_tokens=8, tools=[WEATHER], messages=[
            *messages, {"role": "assistant", "content": None, "tool_calls": [openai_call.model_dump()]},
            {"role": "tool", "tool_call_id": openai_call.id, "content": "light rain, 12 degrees"}])
        assert reply.choices[0].message.content == result.message.content


async def test_structured_output_matches_its_json_schema_streamed_token_for_token(tmp_path):
    async with network(tmp_path) as s:
        messages = [{"role": "user", "content": "describe a person"}]
        expected = expected_completion(MODEL, messages, num_predict=300, format=SCHEMA)
        chunks = [c async for c in await s.ollama().chat(MODEL, messages=messages, format=SCHEMA, stream=True,
                                                         options={"num_predict": 300})]
        assert [c.message.content for c in chunks[:-1]] == list(expected.tokens)
        jsonschema.validate(json.loads("".join(expected.tokens)), SCHEMA)

        answer = await s.openai().chat.completions.create(
            model=MODEL, messages=messages, max_tokens=300,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
        jsonschema.validate(json.loads(answer.choices[0].message.content), SCHEMA)
        assert answer.choices[0].message.content == expected.text
        loose = await s.ollama().generate(MODEL, prompt="a json object please", format="json",
                                          options={"num_predict": 300, "temperature": 0.2, "top_k": 20})
        assert isinstance(json.loads(loose.response), dict)


async def test_thinking_and_sampling_options_reach_the_provider_and_come_back(tmp_path):
    thinker = "qwen3:0.6b"
    async with network(tmp_path, models=(thinker,)) as s:
        messages = [{"role": "user", "content": "think first"}]
        expected = expected_completion(thinker, messages, num_predict=20, think=True, seed=5, stop=["zzz"])
        answer = await s.ollama().chat(thinker, messages=messages, think=True,
                                       options={"num_predict": 20, "seed": 5, "stop": ["zzz"]})
        assert answer.message.content == expected.text
        assert answer.message.thinking == "".join(expected.thinking) != ""
        (request,) = [r.body for r in s.standins[0].requests if r.path == "/api/chat"]
        assert request["think"] is True and request["options"]["seed"] == 5 and request["options"]["stop"] == ["zzz"]
        plain = await s.openai().chat.completions.create(model=thinker, messages=messages, max_tokens=20, seed=5,
                                                        stop=["zzz"], temperature=0.7, top_p=0.9)
        assert plain.choices[0].message.content == expected_completion(
            thinker, messages, num_predict=20, seed=5, stop=["zzz"], temperature=0.7).text
        with pytest.raises(openai.APIStatusError, match="think value"):  # levels are gpt-oss's: the provider says so
            await s.openai().chat.completions.create(model=thinker, messages=messages, max_tokens=20,
                                                     reasoning_effort="high")


PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


async def test_images_reach_a_vision_model_on_both_surfaces_and_an_oversized_one_is_refused(tmp_path):
    vision = "llava:7b"
    async with network(tmp_path, models=(vision,)) as s:
        generated = await s.ollama().generate(vision, prompt="what is this?", images=[PIXEL, PIXEL],
                                              options={"num_predict": 12})
        expected = expected_completion(vision, "what is this?", num_predict=12, images=[PIXEL, PIXEL])
        assert generated.response == expected.text and generated.response.startswith("I see 2 images")
        messages = [{"role": "user", "content": "and this?", "images": [PIXEL]}]
        chat = await s.ollama().chat(vision, messages=messages, options={"num_predict": 12})
        assert chat.message.content == expected_completion(vision, messages, num_predict=12).text

        seen = await s.openai().chat.completions.create(model=vision, max_tokens=12, messages=[{"role": "user", "content": [
            {"type": "text", "text": "and this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}}]}])
        assert seen.choices[0].message.content == chat.message.content  # the same request in OpenAI's shape
        (sent,) = [r.body for r in s.standins[0].requests if r.path == "/api/chat"][-1:]
        assert sent["messages"][-1]["images"] == [PIXEL]

        with pytest.raises(ollama.ResponseError) as too_big:
            await s.ollama().generate(vision, prompt="x", images=["A" * (300 * 1024)])
        assert too_big.value.status_code == 400 and "image" in too_big.value.error


async def test_embeddings_on_both_surfaces_are_the_providers_vectors(tmp_path):
    async with network(tmp_path, models=(MODEL, EMBED)) as s:
        answer = await s.ollama().embed(EMBED, input=["first text", "second text"])
        assert len(answer.embeddings) == 2 and len(answer.embeddings[0]) == 768
        for got, text in zip(answer.embeddings, ["first text", "second text"]):
            assert got == pytest.approx(expected_embedding(EMBED, text), abs=1e-6)
        assert answer.prompt_eval_count > 0
        assert "embedding" in (await s.ollama().show(EMBED)).capabilities
        legacy = await s.ollama().embeddings(EMBED, prompt="first text")  # the deprecated /api/embeddings
        assert list(legacy.embedding) == pytest.approx(expected_embedding(EMBED, "first text"), abs=1e-6)

        vectors = await s.openai().embeddings.create(model=EMBED, input=["first text"], dimensions=256)
        assert len(vectors.data) == 1 and len(vectors.data[0].embedding) == 256
        assert vectors.data[0].embedding == pytest.approx(expected_embedding(EMBED, "first text", 256), abs=1e-6)
        assert vectors.usage.prompt_tokens > 0
        jobs = s.consumer.jobs("consumer", 10)
        assert all(j["status"] == "completed" and j["cost"] > 0 for j in jobs) and len(jobs) == 3

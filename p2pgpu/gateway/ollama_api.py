"""The gateway's Ollama surface: Ollama's HTTP API over the network's providers.

Any tool that talks to Ollama (the ``ollama`` client, LangChain's
``ChatOllama``, Open WebUI) can point at the gateway instead: each
``/api/chat``, ``/api/generate`` or ``/api/embed`` runs as a paid job on the
best provider with a free slot, streamed back as Ollama streams (NDJSON, one
object per line, the final one with ``done``, ``done_reason`` and the
counts and durations in ns). The shapes follow
``shared/reference/ollama-api.md``; where the gateway differs, it is because
a paid network job is not a local model:

- ``num_predict`` becomes the job's ``max_tokens`` (a job needs a bound for
  its hold: ``GatewayConfig.default_max_tokens`` when none is given, as
  Ollama's "until the context ends" has no price); load-time options
  (``num_ctx``...) and ``keep_alive`` belong to the provider and are dropped.
- ``/api/tags`` lists the models the network offers *now*, each with a
  ``p2pgpu`` field: how many providers, the best price, free slots.
  ``/api/ps`` lists this node's running jobs (role, peer, tokens so far).
- The final object carries ``p2pgpu``: the job id, who served it (every
  provider, when one failed and the next continued) and what it cost; the
  response headers say the same (``X-P2PGPU-*``).
- ``/api/embeddings`` (deprecated, one prompt) is served too, by the same
  embedding job as ``/api/embed``.
- Model management (pull, push, create, copy, delete, blobs) is answered
  501: models come from the providers.
- ``suffix``, ``template``, ``raw``, ``context`` and ``logprobs`` are
  refused with 400 (a provider's template is its own; no logprobs cross the
  network).

Errors are ``{"error": "..."}`` with Ollama's statuses: 400 bad request,
401 token, 402 not enough coins, 404 unknown model (the message lists the
models the network offers), 429 spending limit, 502 every provider failed,
503 the queue timed out. After the first byte, an error is the stream's
last line, as Ollama does it.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from p2pgpu import __version__
from p2pgpu.api import MAX_TOKENS_LIMIT, SubmitRequest
from p2pgpu.core.jobparams import JobParams, MessageExtra, ToolCall, parse_options
from p2pgpu.core.offers import normalize_model_name
from p2pgpu.errors import MalformedInput
from p2pgpu.gateway.catalog import NetworkModel, capabilities_of, digest_of
from p2pgpu.core.jobs import CHAT_ROLES
from p2pgpu.gateway.jobs import (
    GatewayError, GatewayJob, error_of_event, job_params, prompt_bound, tool_call_of, vector_of,
)
from p2pgpu.gateway.server import (
    Gateway, Handler, JobResponse, client_price_cap, endpoint, job_summary, json_response, read_json,
)

__all__ = ["routes", "error_response", "OLLAMA_API_VERSION"]

OLLAMA_API_VERSION = "0.12.0"
"""The Ollama release whose API this surface follows; ``/api/version`` says it
(clients compare it to enable features) with the p2pgpu version beside it."""
NDJSON = "application/x-ndjson"


def error_response(error: GatewayError) -> Response:
    return json_response({"error": error.message}, error.status, error.headers)


def _bad(message: str) -> GatewayError:
    return GatewayError(400, message, "invalid_request")


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ------------------------------------------------------------ requests


def _options(body: dict[str, Any], default_max_tokens: int) -> tuple[int, tuple[tuple[str, Any], ...]]:
    options = body.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise _bad("options must be an object")
    options = dict(options)
    num_predict = options.pop("num_predict", None)
    max_tokens = default_max_tokens
    if num_predict is not None:
        if isinstance(num_predict, bool) or not isinstance(num_predict, (int, float)) or (
                isinstance(num_predict, float) and not num_predict.is_integer()):  # NaN and infinities too
            raise _bad("option num_predict must be an integer")
        num_predict = int(num_predict)
        if num_predict > 0:
            max_tokens = min(int(num_predict), MAX_TOKENS_LIMIT)
    try:
        sampling, _dropped = parse_options(options)
    except MalformedInput as exc:
        raise _bad(str(exc)) from None
    return max_tokens, sampling


def _think(value: Any) -> bool | str | None:
    if value is None or isinstance(value, bool) or value in ("low", "medium", "high"):
        return value
    raise _bad('think must be true, false, "low", "medium" or "high"')


def _refuse_unsupported(body: dict[str, Any], *names: str) -> None:
    for name in names:
        if body.get(name) not in (None, "", False, [], 0):
            raise _bad(f"{name} is not supported by the p2pgpu gateway")


def _model_name(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model is required")
    return model


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false")
    return stream


def _params(body: dict[str, Any], sampling: tuple[tuple[str, Any], ...], *, images: Any = (),
            extras: list[tuple[int, MessageExtra]] | tuple = ()) -> JobParams:
    """The request's ``JobParams``, checked (400 naming the field)."""
    fmt = body.get("format")
    if fmt not in (None, "") and fmt != "json" and not isinstance(fmt, dict):
        raise _bad('format must be "json" or a JSON schema object')
    return job_params(options={name: list(v) if isinstance(v, tuple) else v for name, v in sampling},
                      format=fmt or None, tools=body.get("tools"), think=_think(body.get("think")),
                      images=images, extras=extras)


def _messages(raw: Any) -> tuple[tuple[tuple[str, str], ...], list[tuple[int, MessageExtra]]]:
    if not isinstance(raw, list):
        raise _bad("messages must be a list")
    pairs: list[tuple[str, str]] = []
    extras: list[tuple[int, MessageExtra]] = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _bad(f"messages[{index}] must be an object")
        role, content = message.get("role"), message.get("content") or ""
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise _bad(f"messages[{index}]: role must be one of {list(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise _bad(f"messages[{index}]: content must be a string")
        pairs.append((role, content))
        try:
            calls = []
            raw_calls = message.get("tool_calls") or []
            if not isinstance(raw_calls, list):
                raise _bad(f"messages[{index}].tool_calls must be a list")
            for call in raw_calls:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    raise _bad(f"messages[{index}].tool_calls: each call needs a function")
                calls.append(ToolCall.of(function.get("name"), function.get("arguments") or {}))
            extra = MessageExtra.from_wire({
                **({"images": message["images"]} if message.get("images") else {}),
                **({"tool_calls": [c.to_wire() for c in calls]} if calls else {}),
                **({"tool_name": message["tool_name"]} if message.get("tool_name") else {}),
                **({"thinking": message["thinking"]} if message.get("thinking") else {}),
            }, f"messages[{index}]")
        except MalformedInput as exc:
            raise _bad(str(exc)) from None
        if not extra.empty:
            extras.append((index, extra))
    return tuple(pairs), extras


def chat_request(body: Any, default_max_tokens: int) -> tuple[SubmitRequest, bool]:
    """``/api/chat``'s body as a ``SubmitRequest`` (and whether to stream)."""
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    model = _model_name(body)
    stream = _stream(body)
    _refuse_unsupported(body, "logprobs", "top_logprobs")
    messages, extras = _messages(body.get("messages", []))
    max_tokens, sampling = _options(body, default_max_tokens)
    params = _params(body, sampling, extras=extras)
    return SubmitRequest(model=model, messages=messages, max_tokens=max_tokens, params=params), stream


def generate_request(body: Any, default_max_tokens: int) -> tuple[SubmitRequest, bool]:
    """``/api/generate``'s body as a ``SubmitRequest`` (and whether to stream)."""
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    model = _model_name(body)
    stream = _stream(body)
    _refuse_unsupported(body, "suffix", "template", "raw", "context", "logprobs", "top_logprobs")
    prompt, system = body.get("prompt") or "", body.get("system")
    if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
        raise _bad("prompt and system must be strings")
    images = body.get("images") or []
    max_tokens, sampling = _options(body, default_max_tokens)
    params = _params(body, sampling, images=images)
    return SubmitRequest(model=model, prompt=prompt, system=system or None, max_tokens=max_tokens,
                         params=params), stream


# ------------------------------------------------------------ responses


class _Output:
    """What a job delivered, by channel (for non-streamed answers)."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.thinking: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.embeddings: list[list[float]] = []

    def add(self, event: dict[str, Any]) -> None:
        channel = event.get("channel")
        if channel is None:
            self.content.append(event["text"])
        elif channel == "thinking":
            self.thinking.append(event["text"])
        elif channel == "tool_call":
            self.tool_calls.append(tool_call_of(event["text"]))
        elif channel == "embedding":
            self.embeddings.append(vector_of(event["text"]))


def _metrics(job: GatewayJob, started_ns: int) -> dict[str, Any]:
    done = job.final or {}
    durations = done.get("durations_ns") or {}
    return {
        "done_reason": done.get("done_reason") or "stop",
        "total_duration": time.monotonic_ns() - started_ns,
        "load_duration": int(durations.get("load", 0)),
        "prompt_eval_count": int(done.get("prompt_tokens") or 0),
        "prompt_eval_duration": int(durations.get("prompt_eval", 0)),
        "eval_count": int(done.get("eval_count", done.get("tokens", 0)) or 0),
        "eval_duration": int(durations.get("eval", 0)),
    }


def _line(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def _piece(chat: bool, event: dict[str, Any]) -> dict[str, Any]:
    channel, text = event.get("channel"), event["text"]
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        if channel is None:
            message["content"] = text
        elif channel == "thinking":
            message["thinking"] = text
        elif channel == "tool_call":
            message["tool_calls"] = [tool_call_of(text)]
        return {"message": message}
    if channel == "thinking":
        return {"response": "", "thinking": text}
    return {"response": text if channel is None else ""}


def _producer(model: str, chat: bool, stream: bool, started_ns: int):
    async def produce(job: GatewayJob) -> AsyncIterator[bytes]:
        output = _Output()
        async for event in job.events():
            kind = event["type"]
            if kind == "token":
                if stream:
                    yield _line({"model": model, "created_at": _now_rfc3339(), **_piece(chat, event), "done": False})
                else:
                    output.add(event)
            elif kind == "done":
                final: dict[str, Any] = {"model": model, "created_at": _now_rfc3339()}
                if chat:
                    message: dict[str, Any] = {"role": "assistant", "content": "".join(output.content)}
                    if output.thinking:
                        message["thinking"] = "".join(output.thinking)
                    if output.tool_calls:
                        message["tool_calls"] = output.tool_calls
                    final["message"] = message
                else:
                    final["response"] = "".join(output.content)
                    if output.thinking:
                        final["thinking"] = "".join(output.thinking)
                await job.settled.wait()
                final.update(done=True, **_metrics(job, started_ns), p2pgpu=job_summary(job))
                yield _line(final) if stream else json.dumps(final, ensure_ascii=False).encode()
            elif kind == "error":
                if stream:
                    yield _line({"error": str(event.get("error", "the job failed"))})
                else:
                    raise error_of_event(event)
    return produce


# ------------------------------------------------------------ handlers


class _Handlers:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(self, request: Request) -> Response:
        return json_response({"version": OLLAMA_API_VERSION, "p2pgpu": __version__})

    async def tags(self, request: Request) -> Response:
        return json_response({"models": [_model_entry(m) for m in self.gateway.models()]})

    async def show(self, request: Request) -> Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise _bad("request body must be a JSON object")
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _bad("model is required")
        model = self.gateway.require_model(name)
        entry = _model_entry(model)
        return json_response({
            "modelfile": f"# {model.name}, served by {model.providers} p2pgpu provider(s)\nFROM {model.name}\n",
            "parameters": "", "template": "{{ .Prompt }}", "details": entry["details"], "model_info": {},
            "capabilities": capabilities_of(model.name), "modified_at": entry["modified_at"],
            "p2pgpu": model.info(),
        })

    async def ps(self, request: Request) -> Response:
        view = self.gateway.view
        running = [j for j in view.jobs(None, 1000) if j["status"] in ("queued", "running")]
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
        return json_response({"models": [{
            "name": j["model"], "model": j["model"], "size": 0, "size_vram": 0, "digest": digest_of(j["model"]),
            "details": _details(j["model"]), "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "context_length": 0,
            "p2pgpu": {"job_id": j["id"], "role": j["role"], "status": j["status"], "peer": j["peer"],
                       "tokens_out": j["tokens_out"], "cost": j["cost"]},
        } for j in running]})

    async def chat(self, request: Request) -> Response:
        return await self._generation(request, chat=True)

    async def generate(self, request: Request) -> Response:
        return await self._generation(request, chat=False)

    async def _generation(self, request: Request, *, chat: bool) -> Response:
        started = time.monotonic_ns()
        body = await read_json(request)
        default = self.gateway.config.default_max_tokens
        submit, stream = chat_request(body, default) if chat else generate_request(body, default)
        model = self.gateway.require_model(submit.model)
        empty = not submit.messages if chat else not submit.prompt
        if empty:  # Ollama loads the model and answers at once; here there is nothing to load
            answer: dict[str, Any] = {"model": submit.model, "created_at": _now_rfc3339()}
            answer.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
            answer.update(done=True, done_reason="load")
            return json_response(answer)
        job = self.gateway.job(submit, model, client_cap=client_price_cap(request), prompt_tokens=prompt_bound(submit))
        await job.start()
        return JobResponse(job, _producer(submit.model, chat, stream, started), media_type=NDJSON if stream
                           else "application/json; charset=utf-8", stream=stream, error=error_response)

    async def embed(self, request: Request) -> Response:
        return await self._embedding(request, legacy=False)

    async def embeddings(self, request: Request) -> Response:
        """The deprecated ``/api/embeddings`` (one ``prompt``, one
        ``embedding``), which the ``ollama`` client's ``embeddings`` still
        calls. Served by the same embedding job; the vector is the
        provider's ``/api/embed`` one (normalised)."""
        return await self._embedding(request, legacy=True)

    async def _embedding(self, request: Request, *, legacy: bool) -> Response:
        started = time.monotonic_ns()
        body = await read_json(request)
        if not isinstance(body, dict):
            raise _bad("request body must be a JSON object")
        name = _model_name(body)
        if legacy:
            if not isinstance(body.get("prompt"), str) or not body["prompt"]:
                raise _bad("prompt must be a non-empty string")
            inputs = [body["prompt"]]
        else:
            raw = body.get("input")
            inputs = [raw] if isinstance(raw, str) else raw
            if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
                raise _bad("input must be a string or a non-empty list of strings")
        try:
            params = JobParams(truncate=body.get("truncate"), dimensions=body.get("dimensions"))
        except MalformedInput as exc:
            raise _bad(str(exc)) from None
        model = self.gateway.require_model(name)
        submit = SubmitRequest(model=name, inputs=tuple(inputs), max_tokens=len(inputs), params=params)
        job = self.gateway.job(submit, model, client_cap=client_price_cap(request), prompt_tokens=prompt_bound(submit))
        await job.start()

        async def produce(job: GatewayJob) -> AsyncIterator[bytes]:
            output = _Output()
            async for event in job.events():
                if event["type"] == "token":
                    output.add(event)
                elif event["type"] == "error":
                    raise error_of_event(event)
            await job.settled.wait()
            if legacy:
                yield json.dumps({"embedding": output.embeddings[0] if output.embeddings else [],
                                  "p2pgpu": job_summary(job)}).encode()
                return
            done = job.final or {}
            yield json.dumps({
                "model": name, "embeddings": output.embeddings,
                "total_duration": time.monotonic_ns() - started,
                "load_duration": int((done.get("durations_ns") or {}).get("load", 0)),
                "prompt_eval_count": int(done.get("prompt_tokens") or 0), "p2pgpu": job_summary(job),
            }).encode()

        return JobResponse(job, produce, media_type="application/json; charset=utf-8", stream=False,
                           error=error_response)

    async def unsupported(self, request: Request) -> Response:
        return error_response(GatewayError(
            501, f"{request.url.path} is not available through the p2pgpu gateway: models come from the "
                 "network's providers (see /api/tags)", "not_implemented"))


def _details(name: str) -> dict[str, Any]:
    family = normalize_model_name(name).split(":")[0].split("/")[-1]
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
            "parameter_size": "", "quantization_level": ""}


def _model_entry(model: NetworkModel) -> dict[str, Any]:
    return {
        "name": model.name, "model": model.name,
        "modified_at": _now_rfc3339(), "size": 0, "digest": digest_of(model.name),
        "details": _details(model.name), "p2pgpu": model.info(),
    }


def _endpoint(handler: Handler) -> Handler:
    return endpoint(handler, error_response)


def routes(gateway: Gateway) -> list[Route]:
    h = _Handlers(gateway)
    return [
        Route("/", _endpoint(h.root), methods=["GET", "HEAD"]),
        Route("/api/version", _endpoint(h.version), methods=["GET", "HEAD"]),
        Route("/api/tags", _endpoint(h.tags), methods=["GET", "HEAD"]),
        Route("/api/show", _endpoint(h.show), methods=["POST"]),
        Route("/api/ps", _endpoint(h.ps), methods=["GET"]),
        Route("/api/chat", _endpoint(h.chat), methods=["POST"]),
        Route("/api/generate", _endpoint(h.generate), methods=["POST"]),
        Route("/api/embed", _endpoint(h.embed), methods=["POST"]),
        Route("/api/embeddings", _endpoint(h.embeddings), methods=["POST"]),
        *[Route(path, _endpoint(h.unsupported), methods=["POST", "DELETE", "HEAD", "GET"])
          for path in ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs/{digest}")],
    ]

"""The gateway's OpenAI surface: ``/v1/chat/completions`` and friends.

For tools built on the ``openai`` client (LiteLLM, editors' assistants, most
agent frameworks): ``base_url="http://127.0.0.1:11435/v1"`` and the node's
API token as ``api_key``. Each request runs as a paid job exactly as on the
Ollama surface (``ollama_api``), in OpenAI's shapes: SSE ``data:`` chunks
ending in ``data: [DONE]``, ``stream_options.include_usage`` adding the
usage chunk (``"choices": []``) before it, ``usage`` on whole answers, tool
calls with ids and their arguments as JSON text, ``finish_reason``
``stop``/``length``/``tool_calls``. It is a separate listener from the
node's own API, whose routes also start with ``/v1``.

What OpenAI defines but a network of Ollama providers cannot honour is
refused with a 400 naming the parameter (``n`` > 1, ``logit_bias``,
``logprobs``, ``tool_choice`` other than auto/none, ``echo``, ``best_of``
> 1, audio output...), never silently ignored; so is any parameter this
surface does not know. Thinking comes back as ``reasoning`` (as Ollama's own
``/v1`` sends it); ``reasoning_effort`` asks for it.

Errors are ``{"error": {"message", "type", "param", "code"}}``:
``invalid_request_error`` (400, 404 with code ``model_not_found`` listing
the network's models), ``authentication_error`` (401), ``insufficient_funds``
(402), ``rate_limit_error`` with code ``spending_limit`` (429, naming the
limit), ``api_error`` otherwise.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from p2pgpu.api import MAX_TOKENS_LIMIT, SubmitRequest
from p2pgpu.core.jobparams import JobParams, MessageExtra, ToolCall, parse_options
from p2pgpu.errors import MalformedInput
from p2pgpu.gateway.jobs import (
    GatewayError, GatewayJob, error_of_event, job_params, prompt_bound, tool_call_of, vector_of,
)
from p2pgpu.gateway.server import Gateway, Handler, JobResponse, client_price_cap, endpoint, job_summary, json_response, read_json

__all__ = ["routes", "error_response"]

SSE = "text/event-stream"
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def error_response(error: GatewayError) -> Response:
    return json_response({"error": {
        "message": error.message, "type": _TYPES.get(error.status, "api_error"), "param": error.param,
        "code": error.code,
    }}, error.status, error.headers)


def _bad(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, "invalid_request", param=param)


# ------------------------------------------------------------ requests

_CHAT_FIELDS = frozenset({
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "seed", "stop", "frequency_penalty", "presence_penalty", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "reasoning_effort", "n", "logit_bias", "logprobs", "top_logprobs", "user", "metadata",
    "store", "service_tier", "modalities", "audio", "prediction", "functions", "function_call", "top_k",
    "repeat_penalty", "min_p",
})
_COMPLETION_FIELDS = frozenset({
    "model", "prompt", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop",
    "frequency_penalty", "presence_penalty", "n", "logit_bias", "logprobs", "echo", "best_of", "suffix", "user",
})


def _check_fields(body: Any, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    for name in body:
        if name not in allowed:
            raise _bad(f"Unrecognized request argument supplied: {name}", name)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("you must provide a model parameter", "model")
    return body


def _refuse(body: dict[str, Any], name: str, ok: Any = (None,), why: str = "") -> None:
    if body.get(name) not in ok:
        raise _bad(f"{name} is not supported by the p2pgpu gateway{why}", name)


def _common(body: dict[str, Any], default_max_tokens: int) -> tuple[int, dict[str, Any], bool, bool]:
    """max_tokens, sampling options, stream, include_usage."""
    _refuse(body, "n", (None, 1), ": one choice per request")
    _refuse(body, "logit_bias", (None, {}))
    _refuse(body, "logprobs", (None, False, 0))
    _refuse(body, "top_logprobs", (None, 0))
    max_tokens = default_max_tokens
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _bad(f"{name} must be a positive integer", name)
            max_tokens = min(value, MAX_TOKENS_LIMIT)
    options: dict[str, Any] = {}
    for name in ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "top_k", "repeat_penalty",
                 "min_p"):
        if body.get(name) is not None:
            options[name] = body[name]
    if body.get("stop") is not None:
        options["stop"] = body["stop"]
    try:
        parse_options(options)
    except MalformedInput as exc:
        raise _bad(str(exc).replace("option ", "", 1), next((n for n in options if n in str(exc)), None)) from None
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    include_usage = bool(stream_options.get("include_usage"))
    return max_tokens, options, stream, include_usage


def _content(value: Any, index: int) -> tuple[str, list[str]]:
    """A message's content: text, and the base64 of any data-URI images."""
    if value is None:
        return "", []
    if isinstance(value, str):
        return value, []
    if not isinstance(value, list):
        raise _bad(f"messages[{index}].content must be a string or a list of parts", f"messages[{index}].content")
    texts, images = [], []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
                raise _bad("images must be data URIs (data:image/png;base64,...): providers fetch nothing",
                           f"messages[{index}].content")
            images.append(url.split(";base64,", 1)[1])
        else:
            raise _bad(f"messages[{index}].content: unsupported part type {str(kind)[:40]!r}",
                       f"messages[{index}].content")
    return "".join(texts), images


def _messages(raw: Any) -> tuple[tuple[tuple[str, str], ...], list[tuple[int, MessageExtra]]]:
    if not isinstance(raw, list) or not raw:
        raise _bad("[] is too short - 'messages'", "messages")
    pairs: list[tuple[str, str]] = []
    extras: list[tuple[int, MessageExtra]] = []
    call_names: dict[str, str] = {}
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _bad(f"messages[{index}] must be an object", "messages")
        role = message.get("role")
        if not isinstance(role, str):
            raise _bad(f"messages[{index}].role must be a string", "messages")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise _bad(f"messages[{index}].role must be system, developer, user, assistant or tool", "messages")
        text, images = _content(message.get("content"), index)
        calls = []
        try:
            raw_calls = message.get("tool_calls") or []
            if not isinstance(raw_calls, list):
                raise _bad(f"messages[{index}].tool_calls must be a list", "messages")
            for call in raw_calls:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise _bad(f"messages[{index}].tool_calls: each call needs function.name", "messages")
                calls.append(ToolCall.of(function["name"], function.get("arguments") or "{}"))
                if isinstance(call.get("id"), str):
                    call_names[call["id"]] = function["name"]
            call_id = message.get("tool_call_id")
            tool_name = call_names.get(call_id) if role == "tool" and isinstance(call_id, str) else None
            extra = MessageExtra.from_wire({
                **({"images": images} if images else {}),
                **({"tool_calls": [c.to_wire() for c in calls]} if calls else {}),
                **({"tool_name": tool_name} if tool_name else {}),
            }, f"messages[{index}]")
        except MalformedInput as exc:
            raise _bad(str(exc), "messages") from None
        pairs.append((role, text))
        if not extra.empty:
            extras.append((index, extra))
    return tuple(pairs), extras


def _response_format(value: Any) -> Any:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _bad("response_format.json_schema.schema must be a JSON schema object", "response_format")
        return schema
    raise _bad("response_format.type must be text, json_object or json_schema", "response_format")


def _reasoning(value: Any) -> bool | str | None:
    if value is None:
        return None
    if value in ("low", "medium", "high"):
        return value
    if value in ("none", "minimal"):
        return False
    raise _bad("reasoning_effort must be none, minimal, low, medium or high", "reasoning_effort")


def chat_request(body: Any, default_max_tokens: int) -> tuple[SubmitRequest, bool, bool]:
    body = _check_fields(body, _CHAT_FIELDS)
    max_tokens, options, stream, include_usage = _common(body, default_max_tokens)
    for name in ("functions", "function_call", "audio", "prediction"):
        _refuse(body, name)
    _refuse(body, "modalities", (None, ["text"]))
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "auto", "none"):
        raise _bad("tool_choice must be auto or none: a provider's model decides whether to call a tool",
                   "tool_choice")
    tools = None if tool_choice == "none" else body.get("tools")
    messages, extras = _messages(body.get("messages"))
    params = job_params(options=options, format=_response_format(body.get("response_format")), tools=tools,
                        think=_reasoning(body.get("reasoning_effort")), extras=extras)
    return (SubmitRequest(model=body["model"], messages=messages, max_tokens=max_tokens, params=params),
            stream, include_usage)


def completion_request(body: Any, default_max_tokens: int) -> tuple[SubmitRequest, bool, bool]:
    body = _check_fields(body, _COMPLETION_FIELDS)
    max_tokens, options, stream, include_usage = _common(body, default_max_tokens)
    _refuse(body, "echo", (None, False))
    _refuse(body, "best_of", (None, 1))
    _refuse(body, "suffix", (None, ""))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt must be a string (one prompt per request)", "prompt")
    return (SubmitRequest(model=body["model"], prompt=prompt, max_tokens=max_tokens, params=job_params(options=options)),
            stream, include_usage)


# ------------------------------------------------------------ responses


def _sse(value: Any) -> bytes:
    return b"data: " + json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _usage(job: GatewayJob) -> dict[str, int]:
    done = job.final or {}
    prompt = int(done.get("prompt_tokens") or 0)
    completion = int(done.get("eval_count", done.get("tokens", 0)) or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(job: GatewayJob, tool_calls: int) -> str:
    if tool_calls:
        return "tool_calls"
    return "length" if (job.final or {}).get("done_reason") == "length" else "stop"


def _openai_call(text: str, index: int, job: GatewayJob) -> dict[str, Any]:
    call = tool_call_of(text)["function"]
    return {"index": index, "id": f"call_{(job.job_id or 'x')[:12]}_{index}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}


def _chat_producer(model: str, stream: bool, include_usage: bool, chat: bool):
    created = int(time.time())

    async def produce(job: GatewayJob) -> AsyncIterator[bytes]:
        ident = ("chatcmpl-" if chat else "cmpl-") + (job.job_id or "0")
        head = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": model, "system_fingerprint": "fp_p2pgpu"}
        content: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        async for event in job.events():
            kind = event["type"]
            if kind == "token":
                channel, text = event.get("channel"), event["text"]
                if channel == "tool_call":
                    calls.append(_openai_call(text, len(calls), job))
                elif channel == "thinking":
                    reasoning.append(text)
                elif channel is None:
                    content.append(text)
                if not stream or channel == "embedding":
                    continue
                if chat:
                    delta: dict[str, Any] = {"role": "assistant"}
                    if channel == "tool_call":
                        delta["tool_calls"] = [calls[-1]]
                    elif channel == "thinking":
                        delta.update(content="", reasoning=text)
                    else:
                        delta["content"] = text
                    yield _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                elif channel is None:
                    yield _sse({**head, "choices": [{"index": 0, "text": text, "finish_reason": None}]})
            elif kind == "done":
                await job.settled.wait()
                finish = _finish_reason(job, len(calls))
                if stream:
                    last: dict[str, Any] = {"index": 0, "finish_reason": finish}
                    last.update({"delta": {}} if chat else {"text": ""})
                    yield _sse({**head, "choices": [last], "p2pgpu": job_summary(job)})
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(job)})
                    yield b"data: [DONE]\n\n"
                    continue
                if chat:
                    message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
                    if reasoning:
                        message["reasoning"] = "".join(reasoning)
                    if calls:
                        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
                    choice = {"index": 0, "message": message, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": "".join(content), "finish_reason": finish}
                yield json.dumps({**head, "object": "chat.completion" if chat else "text_completion",
                                  "choices": [choice], "usage": _usage(job), "p2pgpu": job_summary(job)}).encode()
            elif kind == "error":
                error = error_of_event(event)
                if not stream:
                    raise error
                yield _sse({"error": {"message": error.message, "type": "api_error", "param": None,
                                      "code": error.code}})
    return produce


# ------------------------------------------------------------ handlers


class _Handlers:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def _run(self, request: Request, submit: SubmitRequest, stream: bool, include_usage: bool,
                   chat: bool) -> Response:
        model = self.gateway.require_model(submit.model)
        job = self.gateway.job(submit, model, client_cap=client_price_cap(request), prompt_tokens=prompt_bound(submit))
        await job.start()
        return JobResponse(job, _chat_producer(submit.model, stream, include_usage, chat),
                           media_type=SSE if stream else "application/json", stream=stream, error=error_response)

    async def chat(self, request: Request) -> Response:
        submit, stream, usage = chat_request(await read_json(request), self.gateway.config.default_max_tokens)
        return await self._run(request, submit, stream, usage, chat=True)

    async def completions(self, request: Request) -> Response:
        submit, stream, usage = completion_request(await read_json(request), self.gateway.config.default_max_tokens)
        return await self._run(request, submit, stream, usage, chat=False)

    async def models(self, request: Request) -> Response:
        return json_response({"object": "list", "data": [_model(m.name, m.info()) for m in self.gateway.models()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        model = self.gateway.require_model(name)
        return json_response(_model(model.name, model.info()))

    async def embeddings(self, request: Request) -> Response:
        body = _check_fields(await read_json(request), frozenset({"model", "input", "dimensions", "encoding_format",
                                                                  "user"}))
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) and t for t in inputs):
            raise _bad("input must be a non-empty string or a list of them (token arrays are not supported)", "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _bad("encoding_format must be float or base64", "encoding_format")
        try:
            params = JobParams(dimensions=body.get("dimensions"))
        except MalformedInput as exc:
            raise _bad(str(exc), "dimensions") from None
        name = body["model"]
        model = self.gateway.require_model(name)
        submit = SubmitRequest(model=name, inputs=tuple(inputs), max_tokens=len(inputs), params=params)
        job = self.gateway.job(submit, model, client_cap=client_price_cap(request), prompt_tokens=prompt_bound(submit))
        await job.start()

        async def produce(job: GatewayJob) -> AsyncIterator[bytes]:
            vectors: list[Any] = []
            async for event in job.events():
                if event["type"] == "token" and event.get("channel") == "embedding":
                    vector = vector_of(event["text"])
                    vectors.append(vector if encoding == "float"
                                   else base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode())
                elif event["type"] == "error":
                    raise error_of_event(event)
            await job.settled.wait()
            prompt = int((job.final or {}).get("prompt_tokens") or 0)
            yield json.dumps({
                "object": "list", "model": name,
                "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt}, "p2pgpu": job_summary(job),
            }).encode()

        return JobResponse(job, produce, media_type="application/json", stream=False, error=error_response)


def _model(name: str, info: dict[str, Any]) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "p2pgpu", "p2pgpu": info}


def _endpoint(handler: Handler) -> Handler:
    return endpoint(handler, error_response)


def routes(gateway: Gateway) -> list[Route]:
    h = _Handlers(gateway)
    return [
        Route("/v1/chat/completions", _endpoint(h.chat), methods=["POST"]),
        Route("/v1/completions", _endpoint(h.completions), methods=["POST"]),
        Route("/v1/models", _endpoint(h.models), methods=["GET"]),
        Route("/v1/models/{model:path}", _endpoint(h.model), methods=["GET"]),
        Route("/v1/embeddings", _endpoint(h.embeddings), methods=["POST"]),
    ]

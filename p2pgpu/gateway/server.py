"""The gateway's shared parts: its configuration and state, and the request
and response helpers both surfaces use (``ollama_api``, ``openai_api``).

``Gateway`` holds the node's view, the spending budget
(``p2pgpu.core.spending``: it applies to every request, token or not) and
the nursery the jobs' pumps run in; ``GatewayConfig`` says where it listens
and who may call (enforced by ``p2pgpu.gateway.app``). ``JobResponse``
sends a started ``GatewayJob`` streamed or whole, watching for the client
going away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, Final

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from p2pgpu.api import NodeView, SubmitRequest
from p2pgpu.core.spending import SpendingBudget, SpendingLimits
from p2pgpu.core.units import format_coins, parse_coins
from p2pgpu.errors import MalformedInput
from p2pgpu.gateway.catalog import NetworkModel, cheapest_worst_case, find_model, network_models
from p2pgpu.gateway.jobs import GatewayError, GatewayJob
from p2pgpu.config import DEFAULT_GATEWAY_LISTEN, GatewayConfig

log = logging.getLogger(__name__)

__all__ = ["GatewayConfig", "Gateway", "GatewayError", "JobResponse", "endpoint", "read_json", "client_price_cap",
           "job_headers", "job_summary", "json_response", "DEFAULT_GATEWAY_LISTEN", "MAX_PRICE_HEADER"]

MAX_GATEWAY_BODY: Final = 8 * 1024 * 1024  # images travel base64 in JSON
MAX_PRICE_HEADER: Final = "X-P2PGPU-Max-Price"
"""A request's own price bound, in coins (decimal text): ``X-P2PGPU-Max-Price: 0.01``."""


class Gateway:
    """The gateway's state: the node's view, the spending budget, the
    nursery its jobs' pumps run in (set by ``serve_gateway``), and the app."""

    def __init__(self, view: NodeView, token: str, me: str, config: GatewayConfig = GatewayConfig(),
                 now_ms: Callable[[], int] | None = None) -> None:
        """``me``: this node's peer id (its own offer is not a candidate)."""
        self.view, self.config, self.me = view, config, me
        self.budget = SpendingBudget(SpendingLimits(config.limit_request, config.limit_hour))
        self.now_ms = now_ms or (lambda: int(time.time() * 1000))
        self.token_digest = hashlib.sha256(token.encode()).digest() if config.token else None
        self.nursery: trio.Nursery | None = None  # set by ``p2pgpu.gateway.app.serve_gateway``

    # ------------------------------------------------------------ shared by both surfaces

    def models(self) -> list[NetworkModel]:
        return network_models(self.view, self.me)

    def require_model(self, name: str) -> NetworkModel:
        """The network's ``name``, or a 404 that lists what it offers."""
        models = self.models()
        model = find_model(models, name)
        if model is None:
            offered = ", ".join(m.name for m in models) or "none right now"
            raise GatewayError(404, f"model '{name}' not found; the network offers: {offered}", "model_not_found",
                               param="model")
        return model

    def job(self, request: SubmitRequest, model: NetworkModel, *, client_cap: int | None,
            prompt_tokens: int) -> GatewayJob:
        """A job for ``request`` on ``model`` (from ``require_model``), its
        spending bounded (``GatewayJob``)."""
        assert self.nursery is not None, "the gateway is not serving"
        return GatewayJob(self.view, self.budget, self.nursery, self.now_ms, request, client_cap=client_cap,
                          needed=cheapest_worst_case(model, prompt_tokens, request.max_tokens))

# ------------------------------------------------------------ request helpers


async def read_json(request: Request) -> Any:
    """The body as JSON, at most ``MAX_GATEWAY_BODY`` bytes (a declared
    length over it is refused before reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_GATEWAY_BODY:
        raise GatewayError(413, f"request body is larger than {MAX_GATEWAY_BODY} bytes", "payload_too_large")
    chunks, size = [], 0
    async with aclosing(request.stream()) as stream:
        async for chunk in stream:
            size += len(chunk)
            if size > MAX_GATEWAY_BODY:
                raise GatewayError(413, f"request body is larger than {MAX_GATEWAY_BODY} bytes", "payload_too_large")
            chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise GatewayError(400, "missing request body", "invalid_request")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise GatewayError(400, f"request body is not valid JSON: {str(exc)[:120]}", "invalid_request") from None


def client_price_cap(request: Request) -> int | None:
    """The ``X-P2PGPU-Max-Price`` header in base units, or None."""
    value = request.headers.get(MAX_PRICE_HEADER)
    if value is None:
        return None
    try:
        cap = parse_coins(value.strip())
    except MalformedInput as exc:
        raise GatewayError(400, f"{MAX_PRICE_HEADER}: {exc} (coins, e.g. 0.01)", "invalid_request",
                           param=MAX_PRICE_HEADER) from None
    if cap <= 0:
        raise GatewayError(400, f"{MAX_PRICE_HEADER} must be more than 0 coins", "invalid_request",
                           param=MAX_PRICE_HEADER)
    return cap


def job_headers(job: GatewayJob, *, final: bool) -> dict[str, str]:
    """Who serves the request and at what price; with ``final``, what it cost."""
    headers = {"Cache-Control": "no-store"}
    if job.job_id:
        headers["X-P2PGPU-Job-Id"] = job.job_id
    if job.provider:
        headers["X-P2PGPU-Provider"] = job.provider
    if job.price_in is not None and job.price_out is not None:
        headers["X-P2PGPU-Price-In"] = format_coins(job.price_in)
        headers["X-P2PGPU-Price-Out"] = format_coins(job.price_out)
    if final:
        cost = job_cost_of(job)
        if cost is not None:
            headers["X-P2PGPU-Cost"] = format_coins(cost)
            headers["X-P2PGPU-Cost-Units"] = str(cost)
        if job.providers:
            headers["X-P2PGPU-Providers"] = ",".join(job.providers)
    return headers


def job_cost_of(job: GatewayJob) -> int | None:
    if job.final is not None and job.final.get("type") == "done" and isinstance(job.final.get("cost"), int):
        return job.final["cost"]
    return job.cost


def job_summary(job: GatewayJob) -> dict[str, Any]:
    """The ``p2pgpu`` field of a final chunk: who served it and what it cost."""
    cost = job_cost_of(job)
    return {
        "job_id": job.job_id,
        "provider": job.provider,
        "providers": job.providers,
        "cost": cost,
        "cost_coins": None if cost is None else format_coins(cost),
    }


# ------------------------------------------------------------ responses


class JobResponse(Response):
    """The ASGI answer for a started ``GatewayJob``: ``produce`` makes the
    body, streamed (``stream=True``: pieces as they come, headers first) or
    whole (headers once the job ended, so they can say its cost; ``produce``
    raising ``GatewayError`` then becomes ``error``'s answer). Either way
    a task watches for the client going away and then abandons the job."""

    def __init__(self, job: GatewayJob, produce: Callable[[GatewayJob], AsyncIterator[bytes]], *,
                 media_type: str, stream: bool, error: Callable[[GatewayError], Response]) -> None:
        super().__init__(status_code=200, media_type=media_type)
        self.job, self.produce, self.stream, self.error = job, produce, stream, error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                log.debug("gateway: client of job %s went away", self.job.job_id)
                self.job.abandon()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                if self.stream:
                    await self._start(send, final=False)
                    async for piece in self.produce(self.job):
                        await send({"type": "http.response.body", "body": piece, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                else:
                    try:
                        pieces = [piece async for piece in self.produce(self.job)]
                    except GatewayError as exc:  # the job failed after its first token: nothing was sent yet
                        exc.headers = {**job_headers(self.job, final=True), **(exc.headers or {})}
                        await self.error(exc)(scope, receive, send)
                        return
                    await self._start(send, final=True)
                    await send({"type": "http.response.body", "body": b"".join(pieces), "more_body": False})
            finally:
                nursery.cancel_scope.cancel()

    async def _start(self, send: Send, *, final: bool) -> None:
        headers = [(b"content-type", self.media_type.encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in job_headers(self.job, final=final).items()]
        await send({"type": "http.response.start", "status": self.status_code, "headers": headers})


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(value, status_code=status, headers=headers)


Handler = Callable[[Request], Awaitable[Response]]


def endpoint(handler: Handler, error_response: Callable[[GatewayError], Response]) -> Handler:
    """``handler`` with each ``GatewayError`` answered in the surface's
    shape, and anything unexpected logged and answered 500 (the gateway
    keeps serving; no traceback reaches the client)."""

    async def answer(request: Request) -> Response:
        try:
            return await handler(request)
        except GatewayError as exc:
            return error_response(exc)
        except Exception:
            log.exception("gateway: %s %s failed", request.method, request.url.path)
            return error_response(GatewayError(500, "internal error in the gateway; the node's log has the details",
                                               "internal_error"))

    return answer

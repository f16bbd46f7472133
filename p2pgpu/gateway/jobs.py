"""One gateway request's job: spending reservation, submission, events, settling.

Theory of operation
-------------------
Both surfaces (``ollama_api``, ``openai_api``) turn a request into a
``SubmitRequest`` and hand it to a ``GatewayJob``, which runs it exactly as
``p2pgpu submit`` does (``NodeView.submit``: the same ranking, failover and
waiting in line) with three additions:

1. **The spending limit** (``p2pgpu.core.spending``): the job's
   ``max_price`` is the reservation, never more; a limit that leaves too
   little for the cheapest provider is refused up front with
   ``LimitReached`` (429), naming the limit.
2. **Nothing is sent before the job really started.** ``start`` reads the
   node's events until the first token (or the end), so every failure that
   happens before the first token (no funds, no provider, all providers
   failed, the queue timed out) is an ordinary HTTP status with the
   surface's error body, as Ollama answers; and the response headers can
   name the provider that is streaming.
3. **The job outlives the HTTP exchange only as long as it must.** The
   node's events are read by a pump task in the gateway's own nursery, not
   by the HTTP handler. When the client goes away (``abandon``), the pump
   cancels the job through the node (``cancel_job``: the provider stops and
   is paid for the tokens delivered, nothing more), waits for the job's
   record, and settles the reservation with what the job really cost. A
   request that ends normally settles with its final event's cost.

Errors before the first token are ``GatewayError`` (a status, a message, a
machine word for the surfaces' error bodies); after it, the final event is
an ``error`` event the surface writes in its own stream shape.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

import trio

from p2pgpu.api import NodeView, SubmitRequest
from p2pgpu.core.jobparams import JobParams
from p2pgpu.core.submission import work_of
from p2pgpu.core.spending import LimitReached, Reservation, SpendingBudget
from p2pgpu.errors import ExecutionFailed, InsufficientFunds, JobStateConflict, MalformedInput, P2PGPUError, UnknownJob

log = logging.getLogger(__name__)

__all__ = ["GatewayError", "GatewayJob", "status_of_kind", "error_of_event", "job_params", "prompt_bound", "tool_call_of", "vector_of"]

FINAL = frozenset({"done", "error"})


@dataclass
class GatewayError(Exception):
    """A request refused or failed before anything was streamed."""

    status: int
    message: str
    code: str  # a machine word: "unauthorized", "model_not_found", "insufficient_funds", "spending_limit"...
    param: str | None = None  # OpenAI's ``param``: the request field at fault
    headers: dict[str, str] | None = None

    def __str__(self) -> str:
        return self.message


_KIND_STATUS = {
    "InsufficientFunds": (402, "insufficient_funds"),
    "QueueTimeout": (503, "queue_timeout"),
    "Cancelled": (499, "cancelled"),
    "MalformedInput": (400, "invalid_request"),
    "ExecutionFailed": (502, "execution_failed"),
}


def status_of_kind(kind: str | None) -> tuple[int, str]:
    """HTTP status and machine word for a final error event's ``kind``."""
    return _KIND_STATUS.get(kind or "", (502, "execution_failed"))


def error_of_event(event: dict[str, Any]) -> GatewayError:
    """A final ``error`` event as the ``GatewayError`` a whole answer becomes."""
    status, code = status_of_kind(event.get("kind"))
    return GatewayError(status, str(event.get("error", "the job failed")), code)


def error_of(exc: P2PGPUError) -> GatewayError:
    if isinstance(exc, LimitReached):
        headers = None if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
        return GatewayError(429, str(exc), "spending_limit", headers=headers)
    if isinstance(exc, InsufficientFunds):
        return GatewayError(402, str(exc), "insufficient_funds")
    if isinstance(exc, MalformedInput):
        return GatewayError(400, str(exc), "invalid_request")
    if isinstance(exc, ExecutionFailed):  # raised before any attempt: no offer fits the request (model, price)
        return GatewayError(400, str(exc), "no_provider")
    status, code = status_of_kind(type(exc).__name__)
    return GatewayError(status, str(exc), code)


def job_params(*, options: dict[str, Any] | None = None, format: Any = None, tools: Any = None,
               think: Any = None, images: Any = (), extras: Any = ()) -> JobParams:
    """A request's ``JobParams`` from what either surface parsed out of it,
    checked by ``JobParams`` itself (a 400 naming the field)."""
    wire: dict[str, Any] = {}
    for name, value in (("options", options), ("format", format), ("tools", tools), ("images", images)):
        if value:
            wire[name] = value
    if think is not None:
        wire["think"] = think
    if extras:
        wire["message_extras"] = [[index, extra.to_wire()] for index, extra in extras]
    try:
        return JobParams.from_wire(wire)
    except MalformedInput as exc:
        raise GatewayError(400, str(exc), "invalid_request") from None


def prompt_bound(request: SubmitRequest) -> int:
    """An upper bound on the request's input tokens, as its hold will count
    them (the same ``Work`` the node builds); 400 when the request's params
    do not fit a job."""
    try:
        work = work_of(request.prompt, request.messages, request.system, request.max_tokens, None,
                       params=request.params, inputs=request.inputs)
    except MalformedInput as exc:
        raise GatewayError(400, str(exc), "invalid_request") from None
    return work.prompt_tokens_bound


def tool_call_of(text: str) -> dict[str, Any]:
    """A tool-call token's text (``{"name", "arguments"}``) as Ollama's ``tool_calls`` item."""
    call = json.loads(text)
    return {"function": {"name": call["name"], "arguments": call.get("arguments", {})}}


def vector_of(text: str) -> list[float]:
    """An embedding token's text (base64 of little-endian float32) as floats."""
    raw = base64.b64decode(text)
    return [float(x) for x in struct.unpack(f"<{len(raw) // 4}f", raw)]



class GatewayJob:
    """One request's job (module docstring). ``start`` once; then iterate
    ``events`` to the final event; ``abandon`` if the client went away."""

    def __init__(self, view: NodeView, budget: SpendingBudget, nursery: trio.Nursery, now_ms: Callable[[], int],
                 request: SubmitRequest, *, client_cap: int | None = None, needed: int | None = None) -> None:
        """``client_cap``: the client's own price bound (base units);
        ``needed``: the cheapest provider's worst case for this request,
        or None when nobody serves it (then the node's own error says why)."""
        self.view, self.budget, self.nursery, self.now_ms = view, budget, nursery, now_ms
        self.request = request
        self.client_cap = client_cap
        self._needed = needed
        self.job_id: str | None = None
        self.provider: str | None = None
        self.providers: list[str] = []  # every provider that streamed part of the answer, in order
        self.price_in: int | None = None
        self.price_out: int | None = None
        self.final: dict[str, Any] | None = None
        self.cost: int | None = None  # once settled
        self.reservation: Reservation | None = None
        self._send, self._receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._buffer: list[dict[str, Any]] = []
        self._scope = trio.CancelScope()
        self._abandoned = False
        self.settled = trio.Event()

    # ------------------------------------------------------------ request side

    async def start(self) -> None:
        """Reserve, submit, and read events up to the first token or the
        end. ``GatewayError`` when the job fails before any token."""
        try:
            self.reservation = self.budget.reserve(self.now_ms(), self.client_cap)
            if self._needed is not None and (
                    refusal := self.budget.refusal_for(self.reservation, self._needed, self.now_ms())):
                raise refusal
            events = self.view.submit(replace(self.request, max_price=self.reservation.amount))
            first = await anext(events)
        except P2PGPUError as exc:
            self._settle(0)
            raise error_of(exc) from None
        except StopAsyncIteration:
            self._settle(0)
            raise GatewayError(500, "the node's submit ended without an event", "internal_error") from None
        except BaseException:
            self._settle(0)
            raise
        self._note(first)
        self._buffer.append(first)
        self.nursery.start_soon(self._pump, events)
        try:
            while not any(e["type"] == "token" or e["type"] in FINAL for e in self._buffer):
                event = await self._receive.receive()
                self._buffer.append(event)
        except BaseException:  # the request was cancelled while the job waited in line: stop the job too
            self.abandon()
            raise
        final = self._buffer[-1]
        if final["type"] == "error" and not any(e["type"] == "token" for e in self._buffer):
            await self.settled.wait()
            raise error_of_event(final)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every event from the first token to the final one (inclusive);
        the final event is also ``self.final``."""
        buffered, self._buffer = self._buffer, []
        for event in buffered:
            if event["type"] in ("token", "done", "error", "retry"):
                yield event
            if event["type"] in FINAL:
                return
        async for event in self._receive:
            yield event
            if event["type"] in FINAL:
                return

    def abandon(self) -> None:
        """The client went away: stop the job (it pays for tokens delivered)."""
        if self.final is None and not self._abandoned:
            self._abandoned = True
            self.nursery.start_soon(self._stop)

    # ------------------------------------------------------------ pump side

    def _note(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if event.get("job_id"):
            self.job_id = event["job_id"]
        if kind == "provider":
            self.provider = event.get("provider")
            self.price_in, self.price_out = event.get("price_in"), event.get("price_out")
        elif kind == "token" and self.provider and (not self.providers or self.providers[-1] != self.provider):
            self.providers.append(self.provider)
        elif kind in FINAL:
            self.final = event

    async def _pump(self, events: AsyncIterator[dict[str, Any]]) -> None:
        """Read the node's events into the channel until the final one; then
        settle. Runs in the gateway's nursery: it must never raise."""
        try:
            with self._scope:
                async with aclosing(events):  # type: ignore[type-var]
                    async for event in events:
                        self._note(event)
                        self._send.send_nowait(event)
                        if event["type"] in FINAL:
                            break
        except Exception:  # noqa: BLE001 - one request's failure must not stop the gateway
            log.exception("gateway: job %s failed", self.job_id)
            if self.final is None:
                self.final = {"type": "error", "error": "internal error in the gateway", "kind": "InternalError"}
                self._send.send_nowait(self.final)
        finally:
            self._send.close()
        self._settle_final()

    async def _stop(self) -> None:
        if self.job_id is not None:
            try:
                await self.view.cancel_job(self.job_id)
            except (JobStateConflict, UnknownJob):
                pass  # it ended meanwhile: the pump reads its final event
            except P2PGPUError as exc:
                log.info("gateway: cancelling job %s: %s", self.job_id, exc)
                self._scope.cancel()
        else:
            self._scope.cancel()  # nothing ran yet: closing the node's generator stops the job

    def _settle_final(self) -> None:
        if self.final is not None and self.final.get("type") == "done" and isinstance(self.final.get("cost"), int):
            self._settle(self.final["cost"])
            return
        if self.job_id is None:
            self._settle(0)
            return
        # The node ends a job's record before it sends the final event, so
        # the record says what the job cost; one still running (it should
        # not be) counts its whole reservation: never less than the truth.
        try:
            info = self.view.job(self.job_id)
        except P2PGPUError:
            info = None
        final = info is not None and info["status"] not in ("queued", "running")
        self._settle(info["cost"] if final else self.reservation.amount if self.reservation else 0)

    def _settle(self, cost: int) -> None:
        if self.reservation is not None and self.cost is None:
            self.cost = cost
            self.budget.settle(self.reservation, cost, self.now_ms())
        self.settled.set()

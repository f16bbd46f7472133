"""The execution edge: the node's local Ollama, through the official client.

The node never reaches a model any other way (DESIGN §6), so the Ollama
stand-in in tests and a real Ollama take exactly the same path. This module
translates the client's exceptions once, at the edge (``_failure``): a refused
connection, a timeout or an HTTP error all become ``ExecutionFailed`` with a
message a person can act on; an unknown model is ``ModelNotFound`` and a full
Ollama is ``Busy``.

Streaming (``OllamaBackend.stream``) is an async context manager around an
async iterator, so leaving the block, early or by cancellation, always closes
the HTTP stream and its connection: Ollama sees the disconnect and stops decoding.
What a consumer asks for is normalised here: ``num_predict`` (the job's
``max_tokens``) and the *sampling* options of ``JobParams`` reach Ollama,
never load-time options such as ``num_ctx`` or ``num_gpu`` (each new value
reloads the model, reference §4 "reload thrash"), and ``keep_alive`` is the
operator's, clamped. The rest of a job's params (format, tools, thinking,
images, earlier tool calls) go to the client's own arguments; images as
bytes, never as strings, because the client reads a string that names an
existing file as that file, and a consumer must not make a provider send
its own files to the model.

The stream is channelled: a ``Chunk`` is content, thinking, or one tool call
(``channel``, the job protocol's output channels). ``embed`` runs an
embedding job in one call (``/api/embed``); its vectors are not streamed.
"""

from __future__ import annotations

import base64
import logging
import math
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Protocol

import httpx
import ollama
import trio

from p2pgpu.core.jobparams import SAMPLING_OPTIONS, JobParams, ToolCall, canonical_json
from p2pgpu.core.jobs import CHAT_ROLES as _JOB_CHAT_ROLES
from p2pgpu.core.jobs import CONTENT, THINKING, TOOL_CALL, check_job_params
from p2pgpu.errors import ExecutionFailed, MalformedInput

log = logging.getLogger(__name__)

DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"

MAX_TOKENS_LIMIT: Final = 131_072
"""The largest ``max_tokens`` a request may ask for."""
MAX_TEMPERATURE: Final = 2.0
DEFAULT_KEEP_ALIVE_S: Final = 300.0
"""Ollama's own default (5 minutes)."""
MAX_KEEP_ALIVE_S: Final = 3600.0
"""``keep_alive`` is clamped to [0, this]: no "loaded forever" on a shared box."""
DEFAULT_READ_TIMEOUT_S: Final = 300.0
"""Longest wait for the next streamed chunk; covers a cold load (Ollama's own
load timeout is 5 minutes)."""
_CLEANUP_S: Final = 5.0
CHAT_ROLES: Final = frozenset(_JOB_CHAT_ROLES)


def default_ollama_host() -> str:
    """``OLLAMA_HOST`` as the official client reads it, else Ollama's default."""
    return os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_HOST


class ModelNotFound(ExecutionFailed):
    """The local Ollama does not serve the requested model."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(message)
        self.model = model


class Busy(ExecutionFailed):
    """Ollama answered 503: its queue is full. Retrying later may work."""


class Refused(ExecutionFailed):
    """Ollama answered 400: it refused the request as the consumer made it
    (thinking or tools asked of a model without them, an embedding of a
    chat model...). The job's problem, not the backend's."""


@dataclass(frozen=True, slots=True)
class LocalModel:
    name: str
    size_bytes: int | None
    warm: bool  # loaded in memory right now (from /api/ps): first token comes fast


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message: ``role`` is system, user, assistant or tool (a
    tool's result). What else it carries (images, tool calls...) is in the
    request's ``params.message_extras``, by its index."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in CHAT_ROLES:
            raise MalformedInput(f"message role must be one of {sorted(CHAT_ROLES)}, not {self.role!r}")
        if not isinstance(self.content, str):
            raise MalformedInput("message content must be a string")


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One inference job: chat ``messages`` or a generate ``prompt`` (exactly
    one), an optional ``system`` prompt, and what else the consumer asked
    for: ``params`` (checked already; its ``message_extras`` name
    ``messages`` by index, a ``system`` prompt not counted), or the older
    ``seed``/``temperature``, which win over the same options in ``params``.
    Raises ``MalformedInput`` when a value is out of range."""

    model: str
    max_tokens: int
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None
    system: str | None = None
    seed: int | None = None
    temperature: float | None = None
    params: JobParams = JobParams()

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise MalformedInput("model must be a non-empty string")
        if (self.messages is None) == (self.prompt is None):
            raise MalformedInput("give exactly one of messages (chat) or prompt (generate)")
        if self.messages is not None and not (
            isinstance(self.messages, tuple) and all(isinstance(m, Message) for m in self.messages)
        ):
            raise MalformedInput("messages must be a tuple of Message")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise MalformedInput("prompt must be a string")
        if self.system is not None and not isinstance(self.system, str):
            raise MalformedInput("system must be a string")
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise MalformedInput(f"max_tokens must be an integer in 1..{MAX_TOKENS_LIMIT}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**63):
            raise MalformedInput("seed must be a 64-bit integer")
        if self.temperature is not None and (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or not 0.0 <= self.temperature <= MAX_TEMPERATURE
        ):
            raise MalformedInput(f"temperature must be a number in 0..{MAX_TEMPERATURE}")
        if not isinstance(self.params, JobParams):
            raise MalformedInput("params must be a JobParams")
        check_job_params("chat" if self.messages is not None else "generate", self.params,
                         0 if self.messages is None else len(self.messages))

    def options(self) -> dict[str, Any]:
        """The Ollama ``options``: built from a whitelist (the sampling
        options, then ``num_predict`` last, so nothing overrides the job's
        length), so no load-time option (``num_ctx``, ``num_gpu``...) can
        ever reach Ollama from here, whatever ``params`` hold."""
        options: dict[str, Any] = {
            name: value for name, value in self.params.option_map.items() if name in _SAMPLING or name == "stop"
        }
        if self.seed is not None:
            options["seed"] = self.seed
        if self.temperature is not None:
            options["temperature"] = float(self.temperature)
        options["num_predict"] = self.max_tokens
        return options

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages as the client's ``chat`` takes them, each with its
        extras (images as bytes: see the module docstring)."""
        assert self.messages is not None
        messages: list[dict[str, Any]] = []
        for index, message in enumerate(self.messages):
            item: dict[str, Any] = {"role": message.role, "content": message.content}
            extra = self.params.extra_for(index)
            if extra is not None:
                if extra.images:
                    item["images"] = [base64.b64decode(image) for image in extra.images]
                if extra.tool_calls:
                    item["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}}
                                          for c in extra.tool_calls]
                if extra.tool_name is not None:
                    item["tool_name"] = extra.tool_name
                if extra.thinking is not None:
                    item["thinking"] = extra.thinking
            messages.append(item)
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        return messages

    def extra_arguments(self) -> dict[str, Any]:
        """``format``, ``tools``, ``think`` and (generate) ``images`` for the
        client's call, only those the job sets (the client sends no field
        that is None, so Ollama's defaults hold)."""
        params = self.params
        out: dict[str, Any] = {}
        if params.format is not None:
            out["format"] = params.format_value
        if params.tools_json is not None and self.messages is not None:
            out["tools"] = params.tools
        if params.think is not None:
            out["think"] = params.think
        if params.images and self.prompt is not None:
            out["images"] = [base64.b64decode(image) for image in params.images]
        return out


_SAMPLING: Final = frozenset(SAMPLING_OPTIONS)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Streamed text; ``tokens`` is 1 per non-empty chunk (Ollama streams one
    token a chunk), the count to meter by when no final chunk arrives.
    ``channel``: ``CONTENT`` (``message.content``/``response``),
    ``THINKING`` (``thinking``) or ``TOOL_CALL`` (one call of
    ``message.tool_calls``, as the canonical JSON ``{"arguments": {...},
    "name": ...}``)."""

    text: str
    tokens: int
    channel: int = CONTENT


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """What ``/api/embed`` answered: one vector per input, in order, and
    Ollama's counts (``prompt_eval_count``: the input tokens)."""

    vectors: list[list[float]]
    prompt_eval_count: int
    total_duration_ns: int
    load_duration_ns: int


@dataclass(frozen=True, slots=True)
class Finished:
    """The final chunk's metrics; fields Ollama omitted (omitempty) are 0/""."""

    prompt_eval_count: int
    eval_count: int
    total_duration_ns: int
    load_duration_ns: int
    prompt_eval_duration_ns: int
    eval_duration_ns: int
    done_reason: str


Event = Chunk | Finished


def clamp_keep_alive(seconds: float | None) -> float:
    """``keep_alive`` in [0, ``MAX_KEEP_ALIVE_S``]: ``None`` or NaN is the
    default, negative ("forever") or infinite is the maximum."""
    if seconds is None or math.isnan(seconds):
        return DEFAULT_KEEP_ALIVE_S
    if seconds < 0:
        return MAX_KEEP_ALIVE_S
    return min(float(seconds), MAX_KEEP_ALIVE_S)


class Backend(Protocol):
    """The seam between a provider and whatever runs its models: the real
    ``OllamaBackend`` here, a scripted source in a simulator or a test.

    ``models`` lists what is served (``ExecutionFailed`` when it cannot
    tell); ``stream`` is an async context manager yielding an async
    iterator of ``Chunk`` and, last, ``Finished``; leaving the block, early
    or by cancellation, stops the generation. ``embed`` returns one vector
    per input (cancelling it abandons the request). Failures are
    ``ExecutionFailed`` (``ModelNotFound``, ``Busy``), raised before the
    first event or while iterating.
    """

    @property
    def host(self) -> str: ...

    async def models(self) -> list[LocalModel]: ...

    def stream(self, request: GenerationRequest) -> AbstractAsyncContextManager[AsyncIterator[Event]]: ...

    async def embed(self, model: str, inputs: list[str], *, truncate: bool | None = None,
                    dimensions: int | None = None) -> EmbedResult: ...


class OllamaBackend:
    """The local Ollama, as the provider side of a node sees it (a ``Backend``)."""

    def __init__(
        self,
        host: str | None = None,
        *,
        timeout_s: float = 10.0,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        keep_alive_s: float | None = DEFAULT_KEEP_ALIVE_S,
    ) -> None:
        self.host = host or default_ollama_host()
        self._timeout_s = timeout_s
        self._read_timeout_s = read_timeout_s
        self.keep_alive_s = clamp_keep_alive(keep_alive_s)
        self._clients: dict[bool, ollama.AsyncClient] = {}
        self._clients_token: object = None

    def _client(self, *, streaming: bool = False) -> ollama.AsyncClient:
        """The backend's client for this trio run, made once and kept.

        Building an ``ollama.AsyncClient`` costs 30–40 ms of CPU (httpx loads
        the CA bundle into a fresh SSL context every time, even for plain
        http), which was most of the time a job took to its first token, and
        a new TCP connection per call on top. So the backend keeps two
        pooled clients (inventory calls with the short timeout, streams with
        the long read timeout). httpx clients belong to the event loop that
        first used them, so a client is rebuilt when the trio run changes.
        """
        token = trio.lowlevel.current_trio_token()
        if self._clients_token is not token:
            self._clients = {}
            self._clients_token = token
        client = self._clients.get(streaming)
        if client is None:
            timeout = httpx.Timeout(self._timeout_s, read=self._read_timeout_s) if streaming else self._timeout_s
            client = self._clients[streaming] = ollama.AsyncClient(host=self.host, timeout=timeout)
        return client

    async def aclose(self) -> None:
        """Close the pooled connections (the node calls this on shutdown)."""
        clients, self._clients = self._clients, {}
        with trio.CancelScope(shield=True, deadline=trio.current_time() + _CLEANUP_S):
            for client in clients.values():
                await client.close()

    async def models(self) -> list[LocalModel]:
        """Every model this Ollama serves (``/api/tags``), marked warm when
        ``/api/ps`` lists it as loaded. Raises ``ExecutionFailed``."""
        client = self._client()
        try:
            tags = await client.list()
            loaded = await client.ps()
        except _CLIENT_ERRORS as exc:
            raise self._failure(exc) from exc
        warm = {m.model for m in loaded.models if m.model}
        # sizes arrive as pydantic ByteSize; the wire wants plain ints
        return [LocalModel(m.model, None if m.size is None else int(m.size), m.model in warm) for m in tags.models if m.model]

    @asynccontextmanager
    async def stream(self, request: GenerationRequest) -> AsyncIterator[AsyncIterator[Event]]:
        """Run ``request`` streamed; yields an async iterator of ``Chunk``s,
        then one ``Finished``::

            async with backend.stream(request) as events:
                async for event in events:
                    ...

        Iteration raises ``ExecutionFailed`` (``ModelNotFound``, ``Busy``),
        after any chunks already delivered. Leaving the block, early or by
        cancellation, closes the HTTP stream, so Ollama stops generating."""
        events = self._events(self._client(streaming=True), request)
        try:
            yield events
        finally:
            # Shielded, but bounded: closing must happen even when the caller
            # was cancelled, or the generation goes on. Closing a response
            # before its end closes its connection (httpx cannot reuse it),
            # so Ollama sees the disconnect and stops decoding.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + _CLEANUP_S):
                await events.aclose()

    async def embed(self, model: str, inputs: list[str], *, truncate: bool | None = None,
                    dimensions: int | None = None) -> EmbedResult:
        """Embed ``inputs`` (``/api/embed``): one vector per input, in order.
        Raises ``ExecutionFailed`` (``ModelNotFound``, ``Busy``), also when
        Ollama answers a number of vectors other than the inputs'."""
        client = self._client(streaming=True)  # a cold load may take minutes: the long read timeout
        try:
            response = await client.embed(model=model, input=list(inputs), truncate=truncate,
                                          keep_alive=self.keep_alive_s, dimensions=dimensions)
        except _CLIENT_ERRORS as exc:
            raise self._failure(exc, model) from exc
        vectors = [list(vector) for vector in response.embeddings]
        if len(vectors) != len(inputs):
            raise ExecutionFailed(f"Ollama at {self.host} answered {len(vectors)} embeddings for "
                                  f"{len(inputs)} inputs running {model!r}")
        return EmbedResult(vectors, response.prompt_eval_count or 0, response.total_duration or 0,
                           response.load_duration or 0)

    async def _events(self, client: ollama.AsyncClient, request: GenerationRequest) -> AsyncIterator[Event]:
        chat = request.messages is not None
        try:
            extra = request.extra_arguments()
            if request.messages is not None:
                parts: AsyncIterator[Any] = await client.chat(
                    model=request.model,
                    messages=request.chat_messages(),
                    options=request.options(),
                    keep_alive=self.keep_alive_s,
                    stream=True,
                    **extra,
                )
            else:
                parts = await client.generate(
                    model=request.model,
                    prompt=request.prompt,
                    system=request.system,
                    options=request.options(),
                    keep_alive=self.keep_alive_s,
                    stream=True,
                    **extra,
                )
            final = None
            async with aclosing(parts):  # type: ignore[type-var]
                async for part in parts:
                    for chunk in _chunks(part, chat):
                        yield chunk
                    if part.done:
                        # Read on to the end of the body (it ends here) rather
                        # than break: the client's line iterators then finish
                        # instead of being left to the garbage collector.
                        final = _finished(part)
        except _CLIENT_ERRORS as exc:
            raise self._failure(exc, request.model) from exc
        if final is None:
            raise ExecutionFailed(
                f"Ollama at {self.host} ended the stream for {request.model!r} without a final chunk"
            )
        yield final

    def _failure(self, exc: BaseException, model: str | None = None) -> ExecutionFailed:
        """The one translation of client exceptions into ``ExecutionFailed``."""
        where = f"Ollama at {self.host}"
        if isinstance(exc, ollama.ResponseError):
            status, error = exc.status_code, exc.error
            if status == 404 and model is not None:
                return ModelNotFound(
                    model, f"{where} does not serve model {model!r} ({error}); pull it or pick another"
                )
            if status == 503:
                return Busy(f"{where} is busy, try again later: {error}")
            if status == 400:
                return Refused(f"{where} refused the request{_on(model)}: {error}")
            if status == -1:
                return ExecutionFailed(f"{where} failed mid-stream{_on(model)}: {error}")
            return ExecutionFailed(f"{where} answered HTTP {status}{_on(model)}: {error}")
        if isinstance(exc, (ConnectionError, httpx.ConnectError)):
            return ExecutionFailed(
                f"{where} is not reachable: connection refused "
                "(is Ollama running? set OLLAMA_HOST or --ollama-host)"
            )
        if isinstance(exc, httpx.TimeoutException):
            return ExecutionFailed(
                f"{where} timed out{_on(model)} ({type(exc).__name__}); a cold model load "
                "can take minutes, check `ollama ps` and the server log"
            )
        if isinstance(exc, httpx.HTTPError):
            return ExecutionFailed(f"{where} dropped the connection{_on(model)}: {_describe(exc)}")
        # ValueError: a line that is not JSON or not the shape the client expects
        return ExecutionFailed(f"{where} sent a reply the client cannot read{_on(model)}: {_describe(exc)}")


# httpx.HTTPError covers connect/read/protocol errors and timeouts; ValueError
# covers undecodable lines (JSONDecodeError, pydantic's ValidationError).
_CLIENT_ERRORS: Final = (ConnectionError, httpx.HTTPError, ollama.ResponseError, ValueError)


def _chunks(part: Any, chat: bool) -> list[Chunk]:
    """The channelled chunks of one streamed part: thinking, then content,
    then each tool call (Ollama sends a call whole, in one part)."""
    if chat:
        message = part.message
        thinking, content, calls = message.thinking, message.content, message.tool_calls or ()
    else:
        thinking, content, calls = part.thinking, part.response, ()
    chunks = []
    if thinking:
        chunks.append(Chunk(thinking, 1, THINKING))
    if content:
        chunks.append(Chunk(content, 1, CONTENT))
    for call in calls:
        try:
            tool_call = ToolCall.of(call.function.name, dict(call.function.arguments or {}))
        except MalformedInput as exc:  # a call the job protocol cannot carry (its bounds)
            raise ValueError(f"tool call {str(call.function.name)[:64]!r}: {exc}") from None
        chunks.append(Chunk(canonical_json(tool_call.to_wire()), 1, TOOL_CALL))
    return chunks


def _finished(part: Any) -> Finished:
    return Finished(
        prompt_eval_count=part.prompt_eval_count or 0,
        eval_count=part.eval_count or 0,
        total_duration_ns=part.total_duration or 0,
        load_duration_ns=part.load_duration or 0,
        prompt_eval_duration_ns=part.prompt_eval_duration or 0,
        eval_duration_ns=part.eval_duration or 0,
        done_reason=part.done_reason or "",
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _on(model: str | None) -> str:
    return "" if model is None else f" running {model!r}"


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__

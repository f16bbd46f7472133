"""The node's local HTTP API (DESIGN §7): JSON over HTTP on 127.0.0.1 only.

An edge. The daemon owns the node's state and hands this module a
``NodeView``, a narrow read/act interface; the API turns HTTP requests into
calls on it and its answers (or ``P2PGPUError``\\ s) into JSON. Nothing here
knows about libp2p or the ledger's storage, so the API is tested against a
fake view with real HTTP (``tests/test_api.py``) and the daemon against the
view without HTTP.

Who may call it
---------------
Every request, on every path (unknown ones included, so a prober learns
nothing), must carry ``Authorization: Bearer <token>`` with the token from the
data dir's ``api.token`` (mode 0600), as bitcoind's cookie file works: being
able to read the file *is* the permission. Binding 127.0.0.1 alone is not
enough, since any local user, or a web page in a local browser, can reach a
loopback port. The presented token is hashed with SHA-256 and the digest
compared with ``hmac.compare_digest`` against the digest of the real one, so
the comparison always looks at 32 bytes whatever was sent: it leaks neither
the token's bytes nor its length through timing. A browser cannot attach an
``Authorization`` header cross-origin without a CORS preflight, which this
API never answers, so the token also stops drive-by requests from web pages.

Routes (all JSON; amounts are integer base units, see ``p2pgpu.core.units``)::

    GET  /v1/ping                 {"ok": true}: "is my token right and the node up?"
    GET  /v1/status               StatusInfo
    GET  /v1/peers                {"peers": [PeerInfo, ...]}
    GET  /v1/offers[?model=M]     {"offers": [OfferInfo, ...]}
    GET  /v1/wallet[?account=P]   WalletInfo
    POST /v1/send                 {"to": P, "amount": N | "coins": "1.5", "memo"?: S} -> TransferResult
    POST /v1/faucet               {"to": P, "amount": N | "coins": "1.5"}              -> TransferResult
    POST /v1/submit               {"model": M, "prompt": S | "messages": [[role, content], ...],
                                   "system"?: S, "max_tokens"?: N, "max_price"?: N | "max_price_coins"?: "1.5",
                                   "retry"?: bool}
                                  -> 200 application/x-ndjson: one event per line (see ``NodeView.submit``)
    GET  /v1/jobs[?role=R&limit=N]  {"jobs": [JobInfo, ...]}: this node's jobs, newest first; R is
                                  "consumer" or "provider"; N from 1 to MAX_JOBS_LISTED (default 100)
    GET  /v1/jobs/{id}            JobDetail: one job with its answer text; {id} is a job id or a
                                  unique prefix of one (at least 4 hex digits)
    POST /v1/jobs/{id}/cancel     (empty body or {}) -> JobInfo, once the job stopped (or after
                                  ``NodeView.cancel_job``'s own wait)

A node only has its own jobs (those it submitted and those it served), so
``/v1/jobs`` can only ever show those; it takes no account or peer to look
up, and refuses query parameters it does not know.

``/v1/submit`` streams. The view's first event is awaited before anything is
sent, so an error the view raises before it (``InsufficientFunds``, an
unknown model...) is an ordinary error answer with the status below. Once
the 200 has gone out, an error becomes the stream's last line,
``{"type": "error", "error": <message>, "kind": <name>}``. A client that
disconnects closes the view's generator (it sees ``Cancelled`` or
``GeneratorExit``), so the node can cancel the job. Its body may be up to
``MAX_SUBMIT_BODY``; the prompt text (prompt, messages or embedding inputs,
system and the params' JSON together) up to ``MAX_PROMPT_BYTES`` of UTF-8.

Status codes. Every error body is ``{"error": <message>, "type": <name>}``,
where ``type`` is the ``P2PGPUError`` subclass's name when the view raised
one (so a client can re-raise the same class) and a fixed word otherwise:

    200  success
    400  BadRequest: the body is empty, not UTF-8 or not JSON;
         any other P2PGPUError from the view (ConfigError, ExecutionFailed...),
         under its own type name
    401  Unauthorized: token missing, malformed or wrong (+ WWW-Authenticate: Bearer)
    404  NotFound: no such route; UnknownJob: no job of this node has that id
    405  MethodNotAllowed (+ Allow)
    409  LedgerRuleViolation and its subclass InsufficientFunds: the request
         was well-formed but the ledger's rules refuse it (overspending; a
         faucet request to a node without the faucet key, since only that
         key may MINT); JobStateConflict: cancelling a job that already ended
    413  PayloadTooLarge: a body over 64 KiB (2 MiB for /v1/submit), refused before it is read
    422  MalformedInput and subclasses: JSON of the wrong shape, unknown
         fields, a bad peer id, an amount that is not a positive integer,
         a job id that is not hex, an id prefix matching several jobs
         (AmbiguousJobId)
    500  InternalError: the view raised something unexpected; logged here
         with its traceback, answered with a generic message (no traceback
         ever reaches the client) and the server keeps serving

Concurrency: the view's plain methods are called on the trio thread, between
awaits, never from a worker thread, so the daemon can answer them from its
in-memory state without locks; they must be quick (no disk scans of the
whole ledger). ``send``, ``faucet`` and ``cancel_job`` are async and may take
as long as the ledger write (or the job's stop) takes.

Where the daemon says it listens: ``write_api_address`` puts
``http://127.0.0.1:PORT`` into ``<data dir>/api.addr`` once the port is
known; ``remove_api_address`` takes it away on shutdown; the CLI reads it
with ``read_api_address``. A file left behind by a crash is harmless: the
client then finds the port closed and says the node is not running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from hmac import compare_digest
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypedDict

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from p2pgpu.core.identity import public_key_from_peer_id
from p2pgpu.core.jobparams import JobParams
from p2pgpu.core.jobs import CHAT_ROLES, MAX_EMBED_INPUTS, check_job_params
from p2pgpu.core.units import parse_coins
from p2pgpu.datadir import DataDir
from p2pgpu.httpserve import bind_tcp, serve_asgi
from p2pgpu.errors import (
    ConfigError,
    JobStateConflict,
    LedgerRuleViolation,
    MalformedInput,
    P2PGPUError,
    UnknownJob,
)

__all__ = [
    "API_ADDRESS_FILE",
    "LOOPBACK",
    "MAX_BODY",
    "MAX_PROMPT_BYTES",
    "MAX_SUBMIT_BODY",
    "MAX_TOKENS_LIMIT",
    "HistoryItem",
    "JobAttempt",
    "JobDetail",
    "JobInfo",
    "MAX_JOBS_LISTED",
    "NetworkInfo",
    "NodeView",
    "OfferGpu",
    "OfferInfo",
    "OfferModel",
    "PeerInfo",
    "StatusInfo",
    "SubmitRequest",
    "TransferResult",
    "WalletInfo",
    "api_address_path",
    "api_url",
    "create_app",
    "read_api_address",
    "remove_api_address",
    "serve_api",
    "status_for",
    "write_api_address",
]

logger = logging.getLogger(__name__)

LOOPBACK: Final = "127.0.0.1"
MAX_BODY: Final = 64 * 1024
MAX_PROMPT_BYTES: Final = 512 * 1024  # prompt, messages and system together, UTF-8
MAX_SUBMIT_BODY: Final = 4 * MAX_PROMPT_BYTES  # room for JSON's escapes
MAX_TOKENS_LIMIT: Final = 131_072
MAX_JOBS_LISTED: Final = 10_000
DEFAULT_JOBS_LISTED: Final = 100
JOB_ROLES: Final = frozenset({"consumer", "provider"})
_JOB_REF = re.compile(r"[0-9a-fA-F]{4,32}")
_LIMIT = re.compile(r"[0-9]{1,6}")
ROLES: Final = frozenset(CHAT_ROLES)  # system, user, assistant, tool (a tool's result)
API_ADDRESS_FILE: Final = "api.addr"
# How long a stopping server may take to finish the requests in flight before
# they are cut off. Local requests are short; `send` is one ledger write.
SHUTDOWN_GRACE_S: Final = 2.0

# ----------------------------------------------------------------- the view


class NetworkInfo(TypedDict):
    id: str  # the network id, hex
    name: str


class StatusInfo(TypedDict):
    """``GET /v1/status``: one node at a glance. Amounts in base units, for
    this node's own account. A view may add keys of its own (diagnostics
    such as a state hash or replication counters): the API passes them
    through unchanged and the CLI shows them with ``--json`` only."""

    version: str  # p2pgpu version of the daemon
    peer_id: str
    network: NetworkInfo
    listen_addrs: list[str]  # multiaddrs the libp2p host listens on
    peers: int  # peers connected now
    offers_seen: int  # live (unexpired) offers known
    role: Literal["provider", "consumer", "both"]
    faucet: bool  # this node holds the network's faucet key
    balance: int
    held: int
    pending_in: int
    spendable: int
    entries: int  # entries on this node's own chain
    frozen: list[str]  # peer ids of the accounts this replica has frozen (forked chains)
    uptime_s: float


class PeerInfo(TypedDict):
    """One item of ``GET /v1/peers``: a peer this node knows of."""

    peer_id: str
    addrs: list[str]  # multiaddrs known for it
    connected: bool
    since_s: float | None  # seconds since connected (or last seen if not); None if never
    bootstrap: bool  # one of the configured bootstrap peers


class OfferModel(TypedDict):
    name: str
    warm: bool  # loaded in GPU memory now: no load time before the first token


class OfferGpu(TypedDict):
    name: str | None
    vram_total: int | None  # bytes; None where the provider's probe could not tell
    vram_free: int | None  # bytes
    util: int | None  # percent, 0..100


class OfferInfo(TypedDict):
    """One item of ``GET /v1/offers``: a provider's latest unexpired offer."""

    provider: str  # peer id
    models: list[OfferModel]
    gpus: list[OfferGpu]
    price_in: int  # base units per million prompt tokens
    price_out: int  # base units per million generated tokens
    slots_free: int
    slots_total: int
    expires_in_s: float
    cpu: bool  # runs on the CPU (no usable GPU); expect it to be slow


class HistoryItem(TypedDict):
    """One ledger entry touching the account, as the wallet shows it."""

    id: str  # entry id, hex
    seq: int  # its sequence number on its author's chain
    kind: str  # "mint", "send", "receive", "hold", "claim", "release"
    timestamp_ms: int
    counterparty: str | None  # peer id of the other side; None for a mint
    amount: int  # base units, always >= 0; `direction` gives the sign
    memo: str
    direction: Literal["in", "out"]  # in: coins came to the account; out: left it


class WalletInfo(TypedDict):
    """``GET /v1/wallet``. An account the node has never seen is all zeros
    with an empty history, not an error: a fresh account is exactly that."""

    account: str  # peer id
    balance: int
    held: int  # locked in holds for jobs in flight
    pending_in: int  # sent to it, not yet received
    spendable: int  # what a send or a hold may use now
    frozen: bool
    history: list[HistoryItem]  # newest first; the view may cap its length


class TransferResult(TypedDict):
    """What ``send`` and ``faucet`` answer once the entry is in the ledger."""

    entry_id: str  # hex
    amount: int
    to: str


class JobAttempt(TypedDict):
    """One provider a consumer's job was sent to."""

    provider: str  # peer id
    started_ms: int
    outcome: str  # "" while it runs; "completed", "busy" (turned away: not a failure), or why it failed
    hold_id: str | None  # hex
    release: str | None  # the hold: "released", "pending"; None before it ended
    paid: int | None  # our last voucher for the hold; once released, what the ledger paid the provider from it


class JobInfo(TypedDict):
    """One item of ``GET /v1/jobs``: a job this node submitted (role
    "consumer") or served (role "provider"). Times are Unix ms; amounts
    base units."""

    id: str  # the job id, 32 hex digits (both sides know the job by it)
    role: Literal["consumer", "provider"]
    status: Literal["queued", "running", "completed", "failed", "cancelled", "rejected"]
    model: str
    consumer: str  # peer id
    provider: str | None  # peer id; None while a consumer's job waits for its first provider
    peer: str | None  # the other side: the provider of our job, or the consumer we served
    created_ms: int
    started_ms: int | None
    first_token_ms: int | None
    ended_ms: int | None
    age_s: float
    tokens_in: int | None  # prompt tokens, as the provider's Ollama counted them
    tokens_out: int  # tokens received and paid for (consumer) or sent (provider)
    cost: int  # what the consumer pays: the attempts' ``paid``, summed (provider: what it claimed)
    hold_id: str | None  # the (last) hold, hex
    release: str | None  # what became of that hold (see JobAttempt)
    reason: str  # why it failed, was rejected or cancelled; "" otherwise
    attempts: list[JobAttempt]  # consumer: the providers tried, in order


class JobDetail(JobInfo):
    """``GET /v1/jobs/{id}``: the job and its answer text."""

    text: str  # the answer (consumer: as delivered; a provider keeps none), at most 64 Ki characters
    text_cut: bool  # the answer was longer than what is kept


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """An inference job as ``POST /v1/submit`` hands it to the view, checked:
    exactly one of ``prompt``, ``messages`` and ``inputs``; roles among
    ``ROLES``; ``max_tokens`` in 1..``MAX_TOKENS_LIMIT``; ``max_price`` >= 0;
    ``params`` within their bounds and fit for the job (``JobParams``,
    ``p2pgpu.core.jobs.check_job_params``; their message indexes name
    ``messages`` as given, before ``system`` is put first).

    ``inputs`` makes it an embedding job: one vector per text, each billed
    as one output token, so ``max_tokens`` is ``len(inputs)``; no
    ``system``, and params only ``truncate``/``dimensions``."""

    model: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content); role in ROLES
    system: str | None = None
    max_tokens: int = 256
    max_price: int | None = None  # base units for the whole job
    retry: bool = True  # fail over to the next provider
    params: JobParams = JobParams()  # options, format, tools, images, think...
    inputs: tuple[str, ...] | None = None  # an embedding job's texts


class NodeView(Protocol):
    """What the local API needs from the running node.

    Plain methods are called on the trio thread and must return quickly
    (they read in-memory state). They return JSON-able values: only dict,
    list, str, int, float, bool and None, no NaN. Errors a user can fix are
    raised as ``P2PGPUError`` subclasses; see the module docstring for the
    status each becomes. Peer ids are already checked by the API (they parse
    as ed25519 peer ids) before ``wallet``, ``send`` or ``faucet`` see them,
    and amounts are positive integers.
    """

    def status(self) -> StatusInfo: ...

    def peers(self) -> list[PeerInfo]: ...

    def offers(self, model: str | None) -> list[OfferInfo]:
        """Live offers, best first in the node's own ranking; only those
        serving ``model`` when it is given."""
        ...

    def wallet(self, account: str | None) -> WalletInfo:
        """``account`` is a peer id; None means this node's own account."""
        ...

    async def send(self, to: str, amount: int, memo: str) -> TransferResult:
        """Append a SEND to this node's chain and publish it.
        ``InsufficientFunds``, ``LedgerRuleViolation``, ``MalformedInput``."""
        ...

    async def faucet(self, to: str, amount: int) -> TransferResult:
        """Mint ``amount`` for ``to``; only on the node holding the faucet key,
        else a ``LedgerRuleViolation`` that says so (409: only that key may
        MINT; another ``P2PGPUError`` would become a 400)."""
        ...

    def submit(self, request: SubmitRequest) -> AsyncIterator[dict[str, Any]]:
        """Run a job; an async generator of JSON-able event dicts, in order:

        at most one ``{"type": "queued", "position", "job_id"}`` (every
        provider was full: the job waits in line, ``position`` 1 being next);
        zero or more of ``{"type": "provider", "provider", "attempt",
        "job_id", "price_in", "price_out"}``, ``{"type": "token", "text"}`` and
        ``{"type": "retry", "provider", "reason"}``; then exactly one of
        ``{"type": "done", "job_id", "provider", "tokens", "prompt_tokens",
        "cost", "tokens_per_s", "ttft_s", "release", "done_reason",
        "eval_count", "durations_ns"}`` or ``{"type": "error", "error",
        "kind"}``. A ``P2PGPUError`` raised before the first event becomes an
        ordinary error answer. The API closes the generator when the client
        goes away (``Cancelled`` or ``GeneratorExit`` inside it).

        A token event that is not the answer's text says so:
        ``{"type": "token", "text", "channel"}`` with ``channel`` one of
        "thinking", "tool_call" (``text``: the JSON ``{"name", "arguments"}``
        of one call) and "embedding" (``text``: base64 of the vector's
        little-endian float32 values, one event per input, in order); the
        answer's text has no ``channel``. In "done", ``done_reason`` is
        "length" when the output tokens reached ``max_tokens`` (an embedding
        job: always "stop"), else "stop"; ``eval_count`` counts every output
        token delivered (``tokens``, under Ollama's name), and
        ``durations_ns`` is ``{"total", "load", "prompt_eval", "eval"}`` from
        the last provider's receipt (zeros without one)."""
        ...

    def jobs(self, role: str | None, limit: int) -> list[JobInfo]:
        """This node's own jobs, newest first: only ``role``'s ("consumer"
        or "provider") when given, at most ``limit`` (already checked)."""
        ...

    def job(self, job_id: str) -> JobDetail:
        """One of this node's jobs; ``job_id`` is 4 to 32 hex digits (checked),
        the id or the start of it. ``UnknownJob`` (404) if none matches,
        ``AmbiguousJobId`` (422) if several do."""
        ...

    async def cancel_job(self, job_id: str) -> JobInfo:
        """Stop one of this node's jobs (``job_id`` as for ``job``) and
        answer its record once it stopped (or after a short wait, still
        running). A cancelled job is paid for the tokens delivered.
        ``JobStateConflict`` (409) if it already ended."""
        ...


# ---------------------------------------------------------------- responses


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "type": kind}, status_code=status, headers=headers)


def status_for(error: P2PGPUError) -> int:
    """The HTTP status of an error the view raised (table in the module docstring)."""
    if isinstance(error, MalformedInput):
        return 422
    if isinstance(error, (LedgerRuleViolation, JobStateConflict)):  # InsufficientFunds included
        return 409
    if isinstance(error, UnknownJob):
        return 404
    return 400


class _Refusal(Exception):
    """A request this module refuses before the view sees it."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def _endpoint(handler: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler so that every way it can end becomes a JSON response.

    Rendering the JSON happens inside the ``try`` too: a view that returns
    something JSON cannot hold (a bug) gets the same logged 500 as one that
    raises. Cancellation is a ``BaseException`` and passes through.
    """

    async def endpoint(request: Request) -> Response:
        try:
            answer = await handler(request)
            return answer if isinstance(answer, Response) else JSONResponse(answer)
        except _Refusal as refusal:
            return _error(refusal.status, str(refusal), refusal.kind)
        except P2PGPUError as exc:
            logger.debug("%s %s refused: %s", request.method, request.url.path, exc)
            return _error(status_for(exc), str(exc), type(exc).__name__)
        except Exception:
            logger.exception("local API: %s %s failed", request.method, request.url.path)
            return _error(500, "internal error in the node; its log has the details", "InternalError")

    return endpoint


# ------------------------------------------------------------------- inputs


def _query(request: Request, name: str) -> str | None:
    """An optional query parameter; empty counts as absent, twice is refused."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise MalformedInput(f"query parameter {name!r} is given {len(values)} times")
    return values[0] if values and values[0] else None


def _peer_id(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise MalformedInput(f"{where}: expected a peer id string, got {_json_type(value)}")
    try:
        public_key_from_peer_id(value)
    except MalformedInput as exc:
        raise MalformedInput(f"{where}: {exc}") from None
    return value


def _job_ref(request: Request) -> str:
    """The ``{id}`` of a job route: a job id or a prefix of one."""
    ref = request.path_params["job_id"]
    if not _JOB_REF.fullmatch(ref):
        raise MalformedInput(f"{ref[:80]!r} is not a job id: expected 4 to 32 hex digits (an id or the start of one)")
    return ref.lower()


def _only_query(request: Request, allowed: frozenset[str]) -> None:
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise MalformedInput(
            f"unknown query parameter(s) {', '.join(map(repr, unknown))}; expected {sorted(allowed)}"
        )


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


async def _read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request body, refusing more than ``limit`` bytes.

    A declared Content-Length over the limit is refused before anything is
    read; a chunked body is counted as it arrives and refused as soon as it
    passes the limit, so a client can never make the node buffer more.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Refusal(413, f"request body is larger than {limit} bytes", "PayloadTooLarge")
    chunks: list[bytes] = []
    size = 0
    async with aclosing(request.stream()) as stream:  # closed now, not by the GC, when we stop early
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                raise _Refusal(413, f"request body is larger than {limit} bytes", "PayloadTooLarge")
            chunks.append(chunk)
    return b"".join(chunks)


async def _json_object(request: Request, allowed: frozenset[str], limit: int = MAX_BODY) -> dict[str, Any]:
    """The body as a JSON object with no fields outside ``allowed``.

    Unknown fields are refused rather than ignored: a typo such as
    ``"ammount"`` must not turn into a request that means something else.
    """
    raw = await _read_body(request, limit)
    if not raw.strip():
        raise _Refusal(400, "expected a JSON object in the request body", "BadRequest")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and ints beyond Python's digit limit.
        raise _Refusal(400, f"request body is not valid JSON: {exc}", "BadRequest") from None
    if not isinstance(body, dict):
        raise MalformedInput(f"the request body must be a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise MalformedInput(f"unknown field(s) {', '.join(map(repr, unknown))}; expected {sorted(allowed)}")
    return body


def _amount(body: dict[str, Any]) -> int:
    """``amount`` (integer base units) or ``coins`` (decimal text), exactly one;
    always more than zero."""
    if ("amount" in body) == ("coins" in body):
        raise MalformedInput('give exactly one of "amount" (integer base units) or "coins" (text like "12.5")')
    if "amount" in body:
        amount = body["amount"]
        if type(amount) is not int:  # bool is an int subclass; 1.0 is not an amount
            raise MalformedInput(f'"amount" must be an integer number of base units, got {_json_type(amount)}')
    else:
        amount = parse_coins(body["coins"])
    if amount <= 0:
        raise MalformedInput("the amount must be more than zero")
    return amount


def _submit_request(body: dict[str, Any]) -> SubmitRequest:
    """``POST /v1/submit``'s body as a checked ``SubmitRequest``."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise MalformedInput(f'"model" must be a non-empty string, got {_json_type(model)}')
    if sum(field in body for field in ("prompt", "messages", "input")) != 1:
        raise MalformedInput('give exactly one of "prompt" (text) or "messages" ([[role, content], ...]), '
                             'or "input" (texts to embed)')
    params = _submit_params(body.get("params"))
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    inputs: tuple[str, ...] | None = None
    if "prompt" in body:
        prompt = body["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise MalformedInput(f'"prompt" must be a non-empty string, got {_json_type(prompt)}')
        if not prompt.strip() and not params.images:
            raise MalformedInput('"prompt" is only whitespace: there is nothing to answer')
        size = len(prompt.encode("utf-8", "surrogatepass"))
        kind = "generate"
    elif "messages" in body:
        raw = body["messages"]
        if not isinstance(raw, list) or not raw:
            raise MalformedInput(f'"messages" must be a non-empty array of [role, content], got {_json_type(raw)}')
        pairs = []
        for index, item in enumerate(raw):
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(part, str) for part in item)):
                raise MalformedInput(f'"messages"[{index}] must be [role, content], two strings')
            role, content = item
            if role not in ROLES:
                raise MalformedInput(f'"messages"[{index}]: role {role!r} is not one of {sorted(ROLES)}')
            pairs.append((role, content))
        messages = tuple(pairs)
        with_images = {index for index, extra in params.message_extras if extra.images}
        if not any(content.strip() or index in with_images
                   for index, (role, content) in enumerate(messages) if role != "assistant"):
            raise MalformedInput('"messages" has no text to answer: every system and user message is empty')
        size = sum(len(content.encode("utf-8", "surrogatepass")) for _, content in messages)
        kind = "chat"
    else:
        raw = body["input"]
        if not isinstance(raw, list) or not raw or not all(isinstance(text, str) for text in raw):
            raise MalformedInput(f'"input" must be a non-empty array of strings, got {_json_type(raw)}')
        if len(raw) > MAX_EMBED_INPUTS:
            raise MalformedInput(f'"input" has {len(raw)} texts; at most {MAX_EMBED_INPUTS} are allowed')
        inputs = tuple(raw)
        size = sum(len(text.encode("utf-8", "surrogatepass")) for text in inputs)
        kind = "embed"
    try:
        check_job_params(kind, params, len(messages or ()))
    except MalformedInput as exc:
        raise MalformedInput(f'"params": {exc}') from None
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise MalformedInput(f'"system" must be a string, got {_json_type(system)}')
    if system is not None and inputs is not None:
        raise MalformedInput('"system" is for prompts and messages; an embedding job ("input") has none')
    size += len(system.encode("utf-8", "surrogatepass")) if system else 0
    size += 0 if params.empty else len(params.to_json().encode("utf-8"))
    if size > MAX_PROMPT_BYTES:
        raise MalformedInput(f"the prompt is {size} bytes; at most {MAX_PROMPT_BYTES} bytes are allowed")
    max_tokens = body.get("max_tokens", 256 if inputs is None else len(inputs))
    if type(max_tokens) is not int or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise MalformedInput(f'"max_tokens" must be an integer from 1 to {MAX_TOKENS_LIMIT}')
    if inputs is not None and max_tokens != len(inputs):
        raise MalformedInput(f'"max_tokens" of an embedding job is its number of inputs ({len(inputs)}): '
                             "one vector each; leave it out")
    if "max_price" in body and "max_price_coins" in body:
        raise MalformedInput('give at most one of "max_price" (base units) or "max_price_coins" (text like "0.5")')
    max_price = body.get("max_price")
    if "max_price_coins" in body:
        max_price = parse_coins(body["max_price_coins"])
    elif max_price is not None and (type(max_price) is not int or max_price < 0):
        raise MalformedInput('"max_price" must be a non-negative integer number of base units')
    retry = body.get("retry", True)
    if not isinstance(retry, bool):
        raise MalformedInput(f'"retry" must be true or false, got {_json_type(retry)}')
    return SubmitRequest(
        model=model,
        prompt=prompt,
        messages=messages,
        system=system,
        max_tokens=max_tokens,
        max_price=max_price,
        retry=retry,
        params=params,
        inputs=inputs,
    )


def _submit_params(value: Any) -> JobParams:
    """``"params"``: the ``JobParams.to_wire`` shape, every field checked
    (``MalformedInput`` naming it); absent or null is no params."""
    if value is None:
        return JobParams()
    try:
        return JobParams.from_wire(value)
    except MalformedInput as exc:
        raise MalformedInput(f'"params": {exc}') from None


_FINAL_EVENTS: Final = frozenset({"done", "error"})
_INTERNAL_MESSAGE: Final = "internal error in the node; its log has the details"


def _error_event(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, P2PGPUError):
        return {"type": "error", "error": str(exc), "kind": type(exc).__name__}
    logger.error("local API: POST /v1/submit failed while streaming", exc_info=exc)
    return {"type": "error", "error": _INTERNAL_MESSAGE, "kind": "InternalError"}


def _event_line(event: Any) -> bytes:
    """One NDJSON line; ``TypeError``/``ValueError`` for an event JSON cannot hold."""
    if not isinstance(event, dict):
        raise TypeError(f"the view yielded {type(event).__name__}, not an event dict")
    return (json.dumps(event, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")


class _SubmitStream(Response):
    """The ASGI answer to a checked ``POST /v1/submit``: an NDJSON stream, or
    an error answer when the view fails before its first event.

    The whole exchange, first event included, runs beside a task watching
    for ``http.disconnect``; when the client goes away it cancels the
    exchange, and the generator is closed on the way out whatever happened.
    """

    media_type = "application/x-ndjson"

    def __init__(self, view: NodeView, request: SubmitRequest) -> None:
        super().__init__(status_code=200, media_type=self.media_type)
        self._view = view
        self._request = request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            events = self._view.submit(self._request)
        except P2PGPUError as exc:  # a view that checks before returning its generator
            await _error(status_for(exc), str(exc), type(exc).__name__)(scope, receive, send)
            return
        async with aclosing(events):  # type: ignore[type-var]
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    logger.debug("local API: the client of POST /v1/submit went away; closing the job")
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                await self._exchange(events, scope, receive, send)
                nursery.cancel_scope.cancel()

    async def _exchange(self, events: AsyncIterator[dict[str, Any]], scope: Scope, receive: Receive, send: Send) -> None:
        try:
            first = await anext(events)
            line = _event_line(first)
        except StopAsyncIteration:
            line = _event_line(_error_event(RuntimeError("the view's submit ended without an event")))
        except P2PGPUError as exc:
            logger.debug("POST /v1/submit refused: %s", exc)
            await _error(status_for(exc), str(exc), type(exc).__name__)(scope, receive, send)
            return
        except Exception:
            logger.exception("local API: POST /v1/submit failed")
            await _error(500, _INTERNAL_MESSAGE, "InternalError")(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-store")],
            }
        )
        while True:
            await send({"type": "http.response.body", "body": line, "more_body": True})
            if json.loads(line).get("type") in _FINAL_EVENTS:
                break
            try:
                line = _event_line(await anext(events))
            except StopAsyncIteration:
                line = _event_line(_error_event(RuntimeError("the view's submit ended without a done or error event")))
            except Exception as exc:
                line = _event_line(_error_event(exc))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# ---------------------------------------------------------------- handlers


class _Handlers:
    """The route handlers, bound to one view."""

    _SEND_FIELDS = frozenset({"to", "amount", "coins", "memo"})
    _FAUCET_FIELDS = frozenset({"to", "amount", "coins"})
    _SUBMIT_FIELDS = frozenset(
        {"model", "prompt", "messages", "input", "system", "max_tokens", "max_price", "max_price_coins", "retry",
         "params"}
    )

    def __init__(self, view: NodeView) -> None:
        self.view = view

    async def ping(self, request: Request) -> dict[str, Any]:
        return {"ok": True}

    async def status(self, request: Request) -> Any:
        return self.view.status()

    async def peers(self, request: Request) -> dict[str, Any]:
        return {"peers": self.view.peers()}

    async def offers(self, request: Request) -> dict[str, Any]:
        return {"offers": self.view.offers(_query(request, "model"))}

    async def wallet(self, request: Request) -> Any:
        account = _query(request, "account")
        return self.view.wallet(None if account is None else _peer_id(account, "account"))

    async def send(self, request: Request) -> Any:
        body = await _json_object(request, self._SEND_FIELDS)
        to = _peer_id(body.get("to"), '"to"')
        amount = _amount(body)
        memo = body.get("memo", "")
        if not isinstance(memo, str):
            raise MalformedInput(f'"memo" must be a string, got {_json_type(memo)}')
        return await self.view.send(to, amount, memo)

    async def faucet(self, request: Request) -> Any:
        body = await _json_object(request, self._FAUCET_FIELDS)
        to = _peer_id(body.get("to"), '"to"')
        return await self.view.faucet(to, _amount(body))

    async def submit(self, request: Request) -> Response:
        body = await _json_object(request, self._SUBMIT_FIELDS, MAX_SUBMIT_BODY)
        return _SubmitStream(self.view, _submit_request(body))

    _JOBS_QUERY = frozenset({"role", "limit"})

    async def jobs(self, request: Request) -> dict[str, Any]:
        _only_query(request, self._JOBS_QUERY)  # no account, no peer: only this node's own jobs exist
        role = _query(request, "role")
        if role is not None and role not in JOB_ROLES:
            raise MalformedInput(f"role must be one of {sorted(JOB_ROLES)}, not {role[:40]!r}")
        text = _query(request, "limit")
        limit = DEFAULT_JOBS_LISTED
        if text is not None:
            if not _LIMIT.fullmatch(text) or not 1 <= int(text) <= MAX_JOBS_LISTED:
                raise MalformedInput(f"limit must be an integer from 1 to {MAX_JOBS_LISTED}, not {text[:40]!r}")
            limit = int(text)
        return {"jobs": self.view.jobs(role, limit)}

    async def job(self, request: Request) -> Any:
        _only_query(request, frozenset())
        return self.view.job(_job_ref(request))

    async def cancel_job(self, request: Request) -> Any:
        ref = _job_ref(request)
        if (await _read_body(request)).strip() not in (b"", b"{}"):
            raise MalformedInput("cancel takes no fields: send an empty body or {}")
        return await self.view.cancel_job(ref)


# ----------------------------------------------------------- authentication


class _BearerAuth:
    """ASGI middleware: nothing reaches routing without the right token.

    It sits outside the router so that unknown paths and wrong methods get a
    401 too: without the token, the API tells nothing, not even which routes
    exist.
    """

    def __init__(self, app: ASGIApp, token_digest: bytes) -> None:
        self.app = app
        self._digest = token_digest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            # No websockets here; closing before accept makes the server
            # answer the upgrade with 403.
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        presented = [value for name, value in scope["headers"] if name == b"authorization"]
        scheme, _, credentials = presented[0].partition(b" ") if len(presented) == 1 else (b"", b"", b"")
        credentials = credentials.strip()
        if scheme.lower() != b"bearer" or not credentials:
            response = _error(
                401,
                "this API needs `Authorization: Bearer <token>`, the token being the contents "
                "of api.token in the node's data dir",
                "Unauthorized",
                {"WWW-Authenticate": 'Bearer realm="p2pgpu"'},
            )
        elif not compare_digest(hashlib.sha256(credentials).digest(), self._digest):
            response = _error(
                401,
                "wrong API token (it must match api.token in the running node's data dir)",
                "Unauthorized",
                {"WWW-Authenticate": 'Bearer realm="p2pgpu", error="invalid_token"'},
            )
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


_TOKEN_SHAPE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: sendable in a header as is


def create_app(view: NodeView, token: str) -> Starlette:
    """The API as an ASGI app serving ``view``; every request needs ``token``.

    ``ConfigError`` for an empty token or one that cannot travel in an HTTP
    header: an empty token would let ``Bearer `` through, so it is refused
    here rather than trusted to the caller.
    """
    if not isinstance(token, str) or not _TOKEN_SHAPE.fullmatch(token):
        raise ConfigError("the API token must be a non-empty string of visible ASCII characters")
    handlers = _Handlers(view)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kinds = {404: "NotFound", 405: "MethodNotAllowed"}
        messages = {
            404: f"no such route: {request.method} {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }
        message = messages.get(exc.status_code, exc.detail)
        return _error(exc.status_code, message, kinds.get(exc.status_code, "HTTPError"), exc.headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Only reached for a bug outside the handlers (they catch their own);
        # Starlette logs it through the server after this answer is sent.
        return _error(500, "internal error in the node; its log has the details", "InternalError")

    app = Starlette(
        routes=[
            Route("/v1/ping", _endpoint(handlers.ping), methods=["GET"]),
            Route("/v1/status", _endpoint(handlers.status), methods=["GET"]),
            Route("/v1/peers", _endpoint(handlers.peers), methods=["GET"]),
            Route("/v1/offers", _endpoint(handlers.offers), methods=["GET"]),
            Route("/v1/wallet", _endpoint(handlers.wallet), methods=["GET"]),
            Route("/v1/send", _endpoint(handlers.send), methods=["POST"]),
            Route("/v1/faucet", _endpoint(handlers.faucet), methods=["POST"]),
            Route("/v1/submit", _endpoint(handlers.submit), methods=["POST"]),
            Route("/v1/jobs", _endpoint(handlers.jobs), methods=["GET"]),
            Route("/v1/jobs/{job_id}", _endpoint(handlers.job), methods=["GET"]),
            Route("/v1/jobs/{job_id}/cancel", _endpoint(handlers.cancel_job), methods=["POST"]),
        ],
        middleware=[Middleware(_BearerAuth, token_digest=hashlib.sha256(token.encode("ascii")).digest())],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )
    # "/v1/status/" is a 404, not a redirect: redirects only invite clients
    # to re-send the token somewhere else.
    app.router.redirect_slashes = False
    return app


# ------------------------------------------------------------------ serving


def _bind(port: int) -> int:
    """A TCP socket bound to 127.0.0.1:``port``, as a bare descriptor
    (``p2pgpu.httpserve.bind_tcp``: a taken port is our own ``AddressInUse``)."""
    return bind_tcp(LOOPBACK, port, what="API",
                    hint="is another node running? pick another with --api-port, or 0 for any free port")


async def serve_api(
    app: ASGIApp,
    port: int = 0,
    *,
    host: str = LOOPBACK,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on 127.0.0.1:``port`` until cancelled.

    ``port=0`` picks a free port; ``task_status.started`` reports the port
    actually bound (``port = await nursery.start(serve_api, app, port)``;
    ``port`` is positional so that ``nursery.start`` can pass it). ``host``
    exists only to be refused: anything but ``127.0.0.1`` is a
    ``ConfigError``, so no configuration mistake can put the API on a
    network interface. A port that cannot be bound is a ``ConfigError`` too.
    Cancelling the surrounding scope stops the server gracefully
    (``p2pgpu.httpserve.serve_asgi``).
    """
    if host != LOOPBACK:
        raise ConfigError(f"the local API listens on {LOOPBACK} only, not {host!r}")
    if type(port) is not int or not 0 <= port <= 65535:
        raise ConfigError(f"API port must be an integer from 0 to 65535, got {port!r}")
    # Bound before any task starts, so a taken port raises ConfigError
    # itself rather than inside a nursery's exception group.
    fd = _bind(port)
    await serve_asgi(app, fd, logger=logger, name="local API", grace_s=SHUTDOWN_GRACE_S, task_status=task_status)


# ------------------------------------------------------- the address file

_ADDRESS = re.compile(r"http://127\.0\.0\.1:([0-9]{1,5})")
_MAX_ADDRESS_FILE = 256


def api_url(port: int) -> str:
    """``http://127.0.0.1:PORT``: the one spelling of the API's address."""
    return f"http://{LOOPBACK}:{port}"


def api_address_path(data_dir: DataDir) -> Path:
    return data_dir.path / API_ADDRESS_FILE


def write_api_address(data_dir: DataDir, port: int) -> Path:
    """Record where the API listens, for the CLI; returns the file's path.

    Written to a temporary file and renamed into place, so a CLI reading it
    at that moment sees the old address or the new one, never half of one.
    """
    if type(port) is not int or not 1 <= port <= 65535:
        raise ConfigError(f"API port must be an integer from 1 to 65535, got {port!r}")
    path = api_address_path(data_dir)
    data = f"{api_url(port)}\n".encode("ascii")
    try:
        fd, temp = tempfile.mkstemp(dir=data_dir.path, prefix=f".{API_ADDRESS_FILE}.")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temp, path)
    except OSError as exc:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def read_api_address(data_dir: DataDir) -> str | None:
    """The recorded API URL, or None when there is no ``api.addr``.

    Only ``http://127.0.0.1:PORT`` is accepted (anything else is a
    ``ConfigError``): the client sends the bearer token to this address, so
    a file that pointed anywhere else would hand the token to whoever is
    listening there.
    """
    path = api_address_path(data_dir)
    try:
        with open(path, "rb") as file:
            raw = file.read(_MAX_ADDRESS_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    text = raw.decode("ascii", errors="replace").strip()
    match = _ADDRESS.fullmatch(text) if len(raw) <= _MAX_ADDRESS_FILE else None
    if match is None or not 1 <= int(match.group(1)) <= 65535:
        raise ConfigError(
            f"{path} does not hold a local API address (expected {api_url(0)[:-1]}PORT); "
            "delete it and restart the node"
        )
    return api_url(int(match.group(1)))


def remove_api_address(data_dir: DataDir, port: int | None = None) -> bool:
    """Delete ``api.addr``; True if it was there and is now gone.

    With ``port``, only a file naming that port is deleted, so a node
    shutting down never removes the address another node wrote since. A
    file that cannot be parsed is left for the operator.
    """
    path = api_address_path(data_dir)
    if port is not None:
        try:
            current = read_api_address(data_dir)
        except ConfigError:
            return False
        if current != api_url(port):
            return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot remove {path}: {exc.strerror or exc}") from exc
    return True


"""An Ollama stand-in: the real Ollama HTTP API over deterministic fake models.

Why it exists
-------------
No model weights can be fetched where p2pgpu is built and tested, yet every
node, test, benchmark and demo talks to Ollama through the official ``ollama``
client. This module is the one stand-in the project allows: a small Starlette
app, served by hypercorn's trio worker on 127.0.0.1, that speaks the same HTTP
API as Ollama (the project's reference is ``shared/reference/ollama-api.md``),
so the code under test cannot tell it from a real server, except that its
models say deterministic nonsense at a configured rate.

What it guarantees
------------------
- **Wire fidelity.** The endpoints ``/``, ``/api/version``, ``/api/tags``,
  ``/api/show``, ``/api/ps``, ``/api/generate``, ``/api/chat``,
  ``/api/embed`` and ``/api/embeddings`` answer as Ollama does: the same
  fields, NDJSON streaming with one object per line and no blank lines,
  ``stream`` defaulting to true, errors as ``{"error": ...}`` with Ollama's
  statuses and messages (400 bad body, 404 ``model 'x' not found``...). A
  streamed reply sends nothing, not even headers, until its first token, as
  Ollama does, so an error before the first token is a plain status + JSON and
  an error after it is a final ``{"error": ...}`` line under status 200.
- **Determinism.** The reply is a pure function of (model, prompt or messages,
  ``options.seed``, ``options.num_predict``): words drawn from a fixed
  vocabulary by a hash-seeded counter, one token per streamed chunk.
  ``expected_completion`` / ``expected_tokens`` compute it without a server,
  so a test can compare what a job delivered with what the model "said". A
  shorter ``num_predict`` yields a prefix of the longer reply. A chat ending
  in a partial assistant message (a prefill) is continued as greedy decoding
  would continue it: the rest of the answer that message began
  (``split_prefill``), so an answer cut short and continued elsewhere reads
  as the one whole answer.
- **Honest timing.** Tokens are paced against absolute deadlines on trio's
  clock (token *k* is due ``(k+1)/rate`` after decoding starts), so the rate
  holds on average and never runs early; the durations in the final chunk are
  measured on the same clock, so ``eval_count / eval_duration`` never exceeds
  the configured rate. Like Ollama (``OLLAMA_NUM_PARALLEL`` defaults to 1),
  each model decodes ``parallel`` requests at a time; queued time shows only in
  ``total_duration``. A model is "warm" (listed by ``/api/ps``) once used,
  until its ``keep_alive`` runs out.
- **Cancellation.** A client that disconnects stops its generation at once;
  the stand-in records it (``cancelled_generations``, ``generations``), and
  ``wait_until`` lets a test wait for that without sleeping. A generation that
  ends normally is recorded just before its last write, so a client holding
  the final chunk can already see the record.
- **Fault injection that a real Ollama could produce:** ``fail_next`` (an error
  status before the first byte, e.g. 503 busy), ``fail_next_generation`` (the
  runner dies after N tokens: an error line mid-stream, or a 500 when not
  streaming), ``first_token_delay`` and ``load_seconds`` (slow prefill, cold
  load), and ``stop`` (the server goes away mid-stream: connections drop
  without a final chunk and the port closes).

Not modelled: the OpenAI-compatible ``/v1`` routes, model management
(pull/push/create/copy/delete), ``format``/``tools``/``images``/``stop``
options (accepted and ignored), and the deprecated ``context`` input.

Theory of operation
-------------------
The pure part (names, cards, token streams, embeddings, Go-style durations) is
at the top and does no I/O. ``OllamaStandin`` builds the Starlette app and
keeps the state a real server keeps (loaded models and their expiry, per-model
decode slots) plus what tests want to see (finished generations, recorded
requests). Request handlers validate in Ollama's order and either answer
directly or return a ``_GenerationResponse``, an ASGI callable that runs the
whole generation inside its own cancel scope next to a task watching for the
client's ``http.disconnect``. ``stop()`` cancels those scopes and then
triggers hypercorn's shutdown, so nothing outlives the server.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import re
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from hashlib import blake2b, sha256
from typing import Any, Final

import click
import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

# The one rule for model identity, shared with offers and ranking (and
# re-exported here, where tests have always found it).
from p2pgpu.core.offers import normalize_model_name

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_NUM_PREDICT",
    "DEFAULT_TOKENS_PER_SECOND",
    "EMBEDDING_LENGTH",
    "HISTORY_LIMIT",
    "RUNNER_ERROR",
    "SERVER_BUSY",
    "VERSION",
    "Completion",
    "GenerationRecord",
    "ModelCard",
    "OllamaStandin",
    "Outcome",
    "Prompt",
    "RecordedRequest",
    "count_prompt_tokens",
    "expected_completion",
    "expected_embedding",
    "expected_tokens",
    "main",
    "model_card",
    "normalize_model_name",
    "parse_keep_alive",
    "render_prompt",
    "split_prefill",
    "serve_standin",
]

VERSION: Final = "0.12.6"
"""The Ollama version the stand-in claims in ``/api/version``."""

DEFAULT_MODELS: Final = ("llama3.2:1b",)
DEFAULT_TOKENS_PER_SECOND: Final = 100.0
DEFAULT_NUM_PREDICT: Final = 64
"""Length of a reply that ends on its own (``done_reason`` ``stop``)."""
DEFAULT_KEEP_ALIVE: Final = 300.0
"""Ollama's default ``keep_alive``: five minutes."""
DEFAULT_NUM_CTX: Final = 4096
EMBEDDING_LENGTH: Final = 768
HISTORY_LIMIT: Final = 10_000
"""How many generation records and requests a stand-in keeps (the newest);
bounded so a long benchmark or demo does not grow without end."""

SERVER_BUSY: Final = "server busy, please try again.  maximum pending requests exceeded"
"""Ollama's 503 message (the two spaces are Ollama's)."""
RUNNER_ERROR: Final = "an error was encountered while running the model: unexpected EOF"
"""Default message of ``fail_next_generation``: what a crashed runner reports."""

# Go's time.Duration tops out at 2**63-1 ns (about 292 years); Ollama uses it
# for a negative keep_alive ("keep loaded forever").
_FOREVER: Final = (2**63 - 1) / 1e9

_VOCABULARY: Final = (
    "the", "a", "model", "token", "stream", "peer", "network", "node", "ledger",
    "signal", "river", "light", "stone", "quiet", "bright", "market", "offer",
    "price", "voucher", "job", "answer", "question", "north", "south", "green",
    "blue", "small", "large", "fast", "slow", "open", "closed", "paper", "garden",
    "engine", "window", "morning", "evening", "winter", "summer", "city",
    "forest", "ocean", "cloud", "bridge", "road", "house", "story", "number",
    "letter", "music", "color", "shadow", "mirror", "clock", "field", "hill",
    "valley", "lamp", "key", "door", "path", "seed", "harbor",
)  # fmt: skip
_PUNCTUATION: Final = (".", ",")


# ---------------------------------------------------------------------------
# The pure part: names, cards, replies, embeddings, durations.
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What the stand-in says about one model in tags, show and ps.

    Derived from the name alone (``model_card``) so two stand-ins agree.
    """

    name: str
    family: str
    parameter_size: str
    quantization_level: str
    size: int
    digest: str
    capabilities: tuple[str, ...]
    context_length: int
    embedding_length: int

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }

    def model_info(self) -> dict[str, Any]:
        arch = self.family
        return {
            "general.architecture": arch,
            "general.basename": self.name.split(":", 1)[0],
            "general.parameter_count": _parameter_count(self.parameter_size),
            "general.quantization_version": 2,
            f"{arch}.context_length": self.context_length,
            f"{arch}.embedding_length": self.embedding_length,
        }


_SIZE_TAG = re.compile(r"(\d+(?:\.\d+)?)([bm])\b")


def _parameter_count(parameter_size: str) -> int:
    scale = 1e9 if parameter_size.endswith("B") else 1e6
    return int(float(parameter_size[:-1]) * scale)


def model_card(name: str) -> ModelCard:
    """The card of a model, from its name: family from the leading letters,
    parameter size from a tag such as ``1b`` or ``0.5b`` (else 1B), and an
    ``embedding``-only capability for names containing ``embed``."""
    name = normalize_model_name(name)
    base, _, tag = name.rpartition(":")
    family = re.sub(r"[^a-z].*", "", base.rsplit("/", 1)[-1]) or "llama"
    size_match = _SIZE_TAG.search(tag)
    parameter_size = (
        f"{size_match.group(1)}{size_match.group(2).upper()}" if size_match else "1B"
    )
    embedding = "embed" in base
    return ModelCard(
        name=name,
        family="bert" if embedding else family,
        parameter_size=parameter_size,
        quantization_level="F16" if embedding else "Q4_K_M",
        # Q4_K_M is about 4.8 bits a weight, F16 is 16.
        size=int(_parameter_count(parameter_size) * (2.0 if embedding else 0.6)),
        digest=sha256(name.encode()).hexdigest(),
        capabilities=("embedding",) if embedding else ("completion", "tools"),
        context_length=8192 if embedding else 131072,
        embedding_length=EMBEDDING_LENGTH,
    )


Prompt = str | Sequence[Mapping[str, Any]]
"""A generate prompt (``str``) or a chat's messages (``{"role", "content"}``)."""


def render_prompt(prompt: Prompt) -> str:
    """The text the fake model "reads": the prompt itself, or each message as
    ``role: content`` on its own line (a stand-in for a chat template)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role') or ''}: {m.get('content') or ''}" for m in prompt)


def split_prefill(prompt: Prompt) -> tuple[Prompt, str]:
    """``(conversation, prefix)``: a chat whose last message is a non-empty
    assistant message asks the model to *continue* that message (Ollama
    renders the template up to it and leaves it open); anything else has
    no prefix."""
    if isinstance(prompt, str) or not prompt or prompt[-1].get("role") != "assistant":
        return prompt, ""
    prefix = prompt[-1].get("content") or ""
    return (prompt[:-1], prefix) if prefix else (prompt, "")


def count_prompt_tokens(prompt: Prompt) -> int:
    """``prompt_eval_count``: whitespace-separated words of the rendered prompt,
    at least 1 (a real prompt always has at least a BOS token)."""
    return max(1, len(render_prompt(prompt).split()))


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole reply as the stand-in will produce it."""

    tokens: tuple[str, ...]
    done_reason: str
    prompt_eval_count: int

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def eval_count(self) -> int:
        return len(self.tokens)


def _reply_length(num_predict: int | None, default_length: int) -> tuple[int, str]:
    # Ollama stops for length when numPredict > 0 and that many tokens are out;
    # zero and negative values (-1 infinite, -2 fill context) mean no cap.
    if num_predict is not None and 0 < num_predict <= default_length:
        return num_predict, "length"
    return default_length, "stop"


def _conversation(prompt: Prompt) -> str:
    """What the reply depends on. A chat of one user message is the same
    conversation as a generate request of that text: Ollama renders a
    generate prompt through the model's template as exactly that chat, so
    a real model answers both alike."""
    if not isinstance(prompt, str) and len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0].get("content") or ""
    return render_prompt(prompt)


def _token_stream(model: str, prompt: Prompt, seed: int | None) -> Iterator[str]:
    material = json.dumps(
        [normalize_model_name(model), _conversation(prompt), -1 if seed is None else seed],
        ensure_ascii=False,
    )
    key = blake2b(material.encode(), digest_size=16, person=b"p2pgpu-standin").digest()
    previous: str | None = None
    index = 0
    while True:
        draw = int.from_bytes(blake2b(key + index.to_bytes(8, "big"), digest_size=8).digest())
        index += 1
        if previous not in (None, *_PUNCTUATION) and (draw >> 40) % 8 == 0:
            token = _PUNCTUATION[(draw >> 48) & 1]
        else:
            word = _VOCABULARY[draw % len(_VOCABULARY)]
            if previous in (None, "."):
                word = word.capitalize()
            token = word if previous is None else " " + word
        previous = token.strip()
        yield token


def _reply_stream(model: str, prompt: Prompt, seed: int | None) -> Iterator[str]:
    """The reply's tokens. A prefill continues the way greedy decoding
    would: when the prefix is a token-exact start of what the model says
    to the conversation before it, the reply is the rest of that answer
    (so an answer cut short and continued reads as the whole answer);
    any other prefix leads to a reply drawn for the whole chat."""
    conversation, prefix = split_prefill(prompt)
    if not prefix:
        return _token_stream(model, prompt, seed)
    stream = _token_stream(model, conversation, seed)
    said = ""
    while len(said) < len(prefix) and prefix.startswith(said):  # every token is non-empty: bounded
        said += next(stream)
    return stream if said == prefix else _token_stream(model, prompt, seed)


def expected_completion(
    model: str,
    prompt: Prompt,
    seed: int | None = None,
    num_predict: int | None = None,
    *,
    default_length: int = DEFAULT_NUM_PREDICT,
) -> Completion:
    """The reply a stand-in gives, computed without one.

    ``prompt`` is the generate ``prompt``, or the chat ``messages``. A generate
    request with a ``system`` field reads as the messages
    ``[{"role": "system", ...}, {"role": "user", "content": prompt}]``.
    ``seed`` ``None`` and ``-1`` are the same (Ollama's "no seed").
    ``default_length`` must match the stand-in's (``OllamaStandin.default_length``).
    """
    count, done_reason = _reply_length(num_predict, default_length)
    stream = _reply_stream(model, prompt, seed)
    return Completion(
        tokens=tuple(next(stream) for _ in range(count)),
        done_reason=done_reason,
        prompt_eval_count=count_prompt_tokens(prompt),
    )


def expected_tokens(
    model: str,
    prompt: Prompt,
    seed: int | None = None,
    num_predict: int | None = None,
    *,
    default_length: int = DEFAULT_NUM_PREDICT,
) -> list[str]:
    """The streamed chunks' texts, in order: one token each."""
    return list(
        expected_completion(model, prompt, seed, num_predict, default_length=default_length).tokens
    )


def expected_embedding(model: str, text: str, dimensions: int | None = None) -> list[float]:
    """The L2-normalised vector ``/api/embed`` returns for one input.

    ``dimensions`` below ``EMBEDDING_LENGTH`` truncates and re-normalises, as
    Ollama does.
    """
    key = blake2b(
        json.dumps([normalize_model_name(model), text], ensure_ascii=False).encode(),
        digest_size=16,
        person=b"p2pgpu-embed",
    ).digest()
    values: list[float] = []
    for block in range(EMBEDDING_LENGTH // 4):
        digest = blake2b(key + block.to_bytes(4, "big"), digest_size=16).digest()
        for offset in range(0, 16, 4):
            values.append(int.from_bytes(digest[offset : offset + 4]) / 2**31 - 1.0)
    if dimensions is not None and 0 < dimensions < len(values):
        values = values[:dimensions]
    norm = max(math.sqrt(sum(v * v for v in values)), 1e-12)
    return [v / norm for v in values]


def _token_id(text: str) -> int:
    return int.from_bytes(blake2b(text.encode(), digest_size=4).digest()) % 128_000


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_DURATION_UNITS: Final = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}  # fmt: skip


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's ``keep_alive`` in seconds: a number of seconds or a Go duration
    string (``"5m"``, ``"1h30m"``, ``"0"``); negative means forever (``inf``);
    ``None`` means "not given". Raises ``ValueError`` with Ollama's message."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    if isinstance(value, str):
        seconds = _parse_go_duration(value)
    else:
        seconds = float(value)
    return math.inf if seconds < 0 else seconds


def _parse_go_duration(text: str) -> float:
    rest, sign = text, 1.0
    if rest[:1] in ("+", "-"):
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f'time: invalid duration "{text}"')
    total, position = 0.0, 0
    while position < len(rest):
        match = _GO_DURATION_PART.match(rest, position)
        if match is None:
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(match.group(1)) * _GO_DURATION_UNITS[match.group(2)]
        position = match.end()
    return sign * total


def _rfc3339(wall: float) -> str:
    moment = datetime.fromtimestamp(wall, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float) -> int:
    # Metrics are omitempty in Ollama: a zero would vanish from the reply.
    return max(1, round(seconds * 1e9))


# ---------------------------------------------------------------------------
# Records a test can inspect.
# ---------------------------------------------------------------------------


class Outcome(enum.Enum):
    """How a generation ended."""

    COMPLETED = "completed"  # the final chunk (or whole reply) was sent
    CANCELLED = "cancelled"  # the client went away first
    ABORTED = "aborted"  # the stand-in was stopped under it
    FAILED = "failed"  # an injected runner failure ended it


@dataclass(frozen=True, slots=True)
class GenerationRecord:
    """One finished ``/api/generate`` or ``/api/chat`` generation."""

    endpoint: str  # "generate" or "chat"
    model: str  # normalised name
    outcome: Outcome
    tokens_generated: int  # tokens decoded (paced) before it ended
    tokens_sent: int  # token chunks written to the client (streaming only)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """A request as received: ``body`` is the parsed JSON, or ``None``."""

    method: str
    path: str
    body: Any


# ---------------------------------------------------------------------------
# Request parsing that answers like Ollama's Go handlers.
# ---------------------------------------------------------------------------


class _Refusal(Exception):
    """A request Ollama answers with an error status before any reply; the
    status and message are Ollama's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> Response:
        return _error(self.status, self.message)


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


_STRING = ((str,), "string")
_BOOL = ((bool,), "bool")
_OBJECT = ((dict,), "map[string]interface {}")

_GENERATE_FIELDS: Final = {
    "model": _STRING, "prompt": _STRING, "suffix": _STRING, "system": _STRING,
    "template": _STRING, "raw": _BOOL, "stream": _BOOL, "options": _OBJECT,
    "images": ((list,), "[]api.ImageData"), "context": ((list,), "[]int"),
}  # fmt: skip
_CHAT_FIELDS: Final = {
    "model": _STRING, "messages": ((list,), "[]api.Message"), "stream": _BOOL,
    "options": _OBJECT, "tools": ((list,), "api.Tools"),
}  # fmt: skip
_SHOW_FIELDS: Final = {"model": _STRING, "name": _STRING, "verbose": _BOOL}
_EMBED_FIELDS: Final = {
    "model": _STRING, "truncate": _BOOL, "options": _OBJECT, "dimensions": ((int,), "int"),
}  # fmt: skip
_EMBEDDINGS_FIELDS: Final = {"model": _STRING, "prompt": _STRING, "options": _OBJECT}


_FieldTypes = Mapping[str, tuple[tuple[type, ...], str]]


def _decode_body(raw: bytes, struct: str, fields: _FieldTypes) -> dict[str, Any]:
    """Parse a request body as Go's ``ShouldBindJSON`` into ``api.<struct>``
    would, refusing it with Go's messages (close enough to match on)."""
    if not raw.strip():
        raise _Refusal(400, "missing request body")
    try:
        text = raw.decode()
        body = json.loads(text)
    except UnicodeDecodeError as exc:
        raise _Refusal(400, "invalid character in string literal") from exc
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip()):
            raise _Refusal(400, "unexpected EOF") from exc
        where = text[exc.pos]
        raise _Refusal(400, f"invalid character '{where}' looking for beginning of value") from exc
    if body is None:  # Go decodes null into the zero struct without complaint
        return {}
    if not isinstance(body, dict):
        kind = _json_kind(body)
        raise _Refusal(400, f"json: cannot unmarshal {kind} into Go value of type api.{struct}")
    for name, (types, go_type) in fields.items():
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise _Refusal(400, _unmarshal_error(value, f"{struct}.{name}", go_type))
    return body


def _unmarshal_error(value: Any, where: str, go_type: str) -> str:
    kind = _json_kind(value)
    return f"json: cannot unmarshal {kind} into Go struct field {where} of type {go_type}"


def _check_messages(messages: list[Any]) -> list[dict[str, Any]]:
    for message in messages:
        if not isinstance(message, dict):
            kind = _json_kind(message)
            raise _Refusal(400, f"json: cannot unmarshal {kind} into Go value of type api.Message")
        for name in ("role", "content"):
            value = message.get(name)
            if value is not None and not isinstance(value, str):
                where = f"ChatRequest.messages.{name}"
                raise _Refusal(400, _unmarshal_error(value, where, "string"))
    return messages


def _int_option(options: Mapping[str, Any], key: str) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # Ollama's Options.FromMap; the scheduler turns it into a 500.
        raise _Refusal(500, f'option "{key}" must be of type integer')
    return int(value)


def _keep_alive(body: Mapping[str, Any]) -> float | None:
    try:
        return parse_keep_alive(body.get("keep_alive"))
    except ValueError as exc:  # part of decoding the body in Go: a 400
        raise _Refusal(400, str(exc)) from exc


def _think_requested(think: Any) -> bool:
    # api.ThinkValue: a bool, or a level string ("high"...) that counts as true.
    return think is True or (isinstance(think, str) and think != "")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _json_response(value: Any, status: int = 200) -> Response:
    return Response(_dumps(value), status_code=status, media_type="application/json; charset=utf-8")


def _error(status: int, message: str) -> Response:
    return _json_response({"error": message}, status)


# ---------------------------------------------------------------------------
# The server.
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fault:
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class _RunnerFault:
    after_tokens: int
    message: str


@dataclass(frozen=True, slots=True)
class _Job:
    """A validated generate/chat request, ready to run."""

    endpoint: str
    requested_model: str  # echoed back as given, like Ollama
    card: ModelCard
    prompt: Prompt  # what the model reads (see expected_completion)
    seed: int | None
    length: int
    done_reason: str
    stream: bool
    keep_alive: float | None
    with_context: bool  # generate's final "context" (not for chat, nor raw)
    fault: _RunnerFault | None
    started: float  # trio clock at request receipt

    def chunk(self, content: str, **extra: Any) -> dict[str, Any]:
        reply: dict[str, Any] = {"model": self.requested_model, "created_at": _rfc3339(time.time())}
        if self.endpoint == "chat":
            reply["message"] = {"role": "assistant", "content": content}
        else:
            reply["response"] = content
        reply["done"] = False
        reply.update(extra)
        return reply


@dataclass(eq=False, slots=True)
class _Run:
    """Mutable state of one generation while it runs."""

    job: _Job
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    tokens_generated: int = 0
    tokens_sent: int = 0
    response_started: bool = False
    response_complete: bool = False
    client_gone: bool = False
    aborted: bool = False
    finished: bool = False


@dataclass(slots=True)
class _Loaded:
    keep_alive: float
    in_use: int = 0
    expires_at: float | None = None  # wall clock; None while in use

    def expired(self, now: float) -> bool:
        return self.in_use == 0 and self.expires_at is not None and self.expires_at <= now


class _GenerationResponse(Response):
    """An ASGI response that *is* the generation: Starlette calls it with the
    raw ``receive``/``send``, so it can watch for the client leaving and
    decide when (and whether) the status line goes out."""

    def __init__(self, standin: OllamaStandin, job: _Job) -> None:
        self._standin = standin
        self._job = job
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._standin._run_generation(self._job, receive, send)


class OllamaStandin:
    """One stand-in Ollama server and what it has seen.

    Build it with ``serve_standin`` (an async context manager), or construct
    it and ``await nursery.start(standin.run)`` in your own nursery.

    Settings that may be changed while it serves: ``tokens_per_second``
    (``None`` for unpaced), ``first_token_delay`` (seconds of prefill before
    the first token) and ``load_seconds`` (cold-load time of a model that is
    not warm). ``default_length`` and ``parallel`` are fixed.
    """

    def __init__(
        self,
        models: Iterable[str] = DEFAULT_MODELS,
        *,
        tokens_per_second: float | None = DEFAULT_TOKENS_PER_SECOND,
        default_length: int = DEFAULT_NUM_PREDICT,
        first_token_delay: float = 0.0,
        load_seconds: float = 0.0,
        parallel: int = 1,
    ) -> None:
        if tokens_per_second is not None and not tokens_per_second > 0:
            raise ValueError("tokens_per_second must be positive, or None for unpaced")
        if default_length < 1 or parallel < 1:
            raise ValueError("default_length and parallel must be at least 1")
        self.tokens_per_second = tokens_per_second
        self.default_length = default_length
        self.first_token_delay = first_token_delay
        self.load_seconds = load_seconds
        self.parallel = parallel

        cards = [model_card(name) for name in models]
        self._cards: dict[str, ModelCard] = {card.name: card for card in cards}
        if not self._cards:
            raise ValueError("a stand-in needs at least one model")
        # Listed newest first, in the order given.
        created = time.time()
        self._modified_at = {name: created - i for i, name in enumerate(self._cards)}
        self._slots = {name: trio.Semaphore(parallel) for name in self._cards}
        self._load_locks = {name: trio.Lock() for name in self._cards}
        self._loaded: dict[str, _Loaded] = {}

        self._faults: deque[_Fault] = deque()
        self._runner_faults: deque[_RunnerFault] = deque()
        self._active: set[_Run] = set()
        self._outcomes: Counter[Outcome] = Counter()
        self._history: deque[GenerationRecord] = deque(maxlen=HISTORY_LIMIT)
        self._requests: deque[RecordedRequest] = deque(maxlen=HISTORY_LIMIT)
        self._changed = trio.Event()

        self._url: str | None = None
        self._stopping = False
        self._shutdown = trio.Event()
        self._stopped = trio.Event()
        self.app = self._build_app()

    # -- where it listens ---------------------------------------------------

    @property
    def host(self) -> str:
        """``http://127.0.0.1:PORT``, for ``ollama.AsyncClient(host=...)``."""
        if self._url is None:
            raise RuntimeError("the stand-in is not serving")
        return self._url

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._cards)

    # -- what it has seen ---------------------------------------------------

    @property
    def active_generations(self) -> int:
        """Generations running now (queued for a slot included)."""
        return len(self._active)

    @property
    def generations(self) -> tuple[GenerationRecord, ...]:
        """Finished generations, oldest first (the last ``HISTORY_LIMIT``)."""
        return tuple(self._history)

    @property
    def cancelled_generations(self) -> int:
        """Generations stopped because their client went away."""
        return self.count(Outcome.CANCELLED)

    @property
    def completed_generations(self) -> int:
        return self.count(Outcome.COMPLETED)

    def count(self, outcome: Outcome) -> int:
        """Generations that ended with ``outcome``, over the stand-in's life."""
        return self._outcomes[outcome]

    @property
    def requests(self) -> tuple[RecordedRequest, ...]:
        """Requests to known routes, oldest first (the last ``HISTORY_LIMIT``)."""
        return tuple(self._requests)

    @property
    def warm_models(self) -> tuple[str, ...]:
        """Models ``/api/ps`` lists now."""
        self._expire()
        return tuple(self._loaded)

    def expected_completion(
        self, model: str, prompt: Prompt, seed: int | None = None, num_predict: int | None = None
    ) -> Completion:
        """``expected_completion`` with this stand-in's ``default_length``."""
        return expected_completion(
            model, prompt, seed, num_predict, default_length=self.default_length
        )

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; it is re-checked whenever a
        generation starts, streams a token or ends, or a model loads or
        unloads. Wrap it in ``trio.fail_after`` for a deadline."""
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- faults -------------------------------------------------------------

    def fail_next(self, status: int, message: str) -> None:
        """Answer the next inference request (generate, chat, embed) with
        ``status`` and ``{"error": message}`` before any byte of a reply, as
        Ollama does for scheduler errors (e.g. ``503``, ``SERVER_BUSY``).
        Calls queue up, one request each."""
        self._faults.append(_Fault(status, message))

    def fail_next_generation(self, *, after_tokens: int, message: str = RUNNER_ERROR) -> None:
        """Make the runner of the next generate/chat die after ``after_tokens``
        tokens. Streaming, with tokens already out, that is a final
        ``{"error": message}`` line under status 200 (the client raises
        ``ResponseError`` with ``status_code`` -1); otherwise a 500 with the
        error as JSON, as Ollama answers when nothing was written yet."""
        self._runner_faults.append(_RunnerFault(after_tokens, message))

    # -- life cycle ---------------------------------------------------------

    async def run(
        self,
        port: int = 0,
        *,
        task_status: trio.TaskStatus[OllamaStandin] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on 127.0.0.1:``port`` (0 picks a free port) until ``stop()``
        or until cancelled; ``task_status.started`` reports the stand-in once
        it listens, with ``host`` set to the real port. A stand-in serves once:
        after it stops, start a new one (on the same port if need be)."""
        config = hypercorn.config.Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger(f"{__name__}.hypercorn")
        config.include_server_header = False
        # Go's http.Server keeps idle connections open; so does Ollama.
        config.keep_alive_timeout = 3600
        config.graceful_timeout = 2.0
        try:
            async with trio.open_nursery() as nursery:
                serve = partial(
                    hypercorn.trio.serve, self.app, config, shutdown_trigger=self._shutdown.wait
                )
                binds = await nursery.start(serve)
                self._url = binds[0]
                logger.info(
                    "ollama stand-in listening on %s, models %s", self._url, ", ".join(self._cards)
                )
                task_status.started(self)
        finally:
            if self._url is not None:
                logger.info("ollama stand-in on %s stopped", self._url)
            self._url = None
            self._stopping = True
            self._stopped.set()

    async def stop(self) -> None:
        """Go away as a killed Ollama does: every generation in flight loses
        its connection without a final chunk (the client's httpx raises
        ``RemoteProtocolError``), then the port closes and later connections
        are refused. A request still waiting for its first token gets a status
        line and then the same drop, which the client sees the same way.
        Returns once the port is closed; safe to call twice."""
        self._begin_stop()
        await self._stopped.wait()

    def _begin_stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            for run in list(self._active):
                run.aborted = True
                run.cancel_scope.cancel()
        self._shutdown.set()

    # -- the app ------------------------------------------------------------

    def _build_app(self) -> Starlette:
        async def not_found(request: Request, exc: Exception) -> Response:
            return PlainTextResponse("404 page not found", status_code=404)

        async def not_allowed(request: Request, exc: Exception) -> Response:
            return PlainTextResponse("405 method not allowed", status_code=405)

        routes = [
            Route("/", self._root, methods=["GET", "HEAD"]),
            Route("/api/version", self._version, methods=["GET", "HEAD"]),
            Route("/api/tags", self._tags, methods=["GET", "HEAD"]),
            Route("/api/show", self._show, methods=["POST"]),
            Route("/api/ps", self._ps, methods=["GET"]),
            Route("/api/generate", self._generate, methods=["POST"]),
            Route("/api/chat", self._chat, methods=["POST"]),
            Route("/api/embed", self._embed, methods=["POST"]),
            Route("/api/embeddings", self._embeddings, methods=["POST"]),
        ]
        return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})

    def _record(self, request: Request, body: Any = None) -> None:
        self._requests.append(RecordedRequest(request.method, request.url.path, body))

    async def _read(self, request: Request, struct: str, fields: _FieldTypes) -> dict[str, Any]:
        raw = await request.body()
        try:
            parsed: Any = json.loads(raw) if raw.strip() else None
        except ValueError:
            parsed = None
        self._record(request, parsed)
        return _decode_body(raw, struct, fields)

    async def _root(self, request: Request) -> Response:
        self._record(request)
        return PlainTextResponse("Ollama is running")

    async def _version(self, request: Request) -> Response:
        self._record(request)
        return _json_response({"version": VERSION})

    async def _tags(self, request: Request) -> Response:
        self._record(request)
        models = [
            {
                "name": card.name,
                "model": card.name,
                "modified_at": _rfc3339(self._modified_at[card.name]),
                "size": card.size,
                "digest": card.digest,
                "details": card.details(),
            }
            for card in self._cards.values()
        ]
        return _json_response({"models": models})

    def _model(self, body: Mapping[str, Any]) -> tuple[str, ModelCard]:
        """The model a request names, as given (Ollama echoes it) and its card."""
        requested = body.get("model") or ""
        if not requested:
            raise _Refusal(400, "model is required")
        card = self._cards.get(normalize_model_name(requested))
        if card is None:
            raise _Refusal(404, f"model '{requested}' not found")
        return requested, card

    def _take_fault(self) -> None:
        if self._faults:
            fault = self._faults.popleft()
            raise _Refusal(fault.status, fault.message)

    async def _show(self, request: Request) -> Response:
        try:
            body = await self._read(request, "ShowRequest", _SHOW_FIELDS)
            if not body.get("model") and body.get("name"):  # the legacy field
                body["model"] = body["name"]
            _, card = self._model(body)
        except _Refusal as refusal:
            return refusal.response()
        return _json_response(
            {
                "modelfile": (
                    '# Modelfile generated by "ollama show"\n'
                    "# To build a new Modelfile based on this, replace FROM with:\n"
                    f"# FROM {card.name}\n\nFROM {card.name}\nTEMPLATE {{{{ .Prompt }}}}\n"
                ),
                "parameters": f"num_ctx                        {DEFAULT_NUM_CTX}",
                "template": "{{ .Prompt }}",
                "details": card.details(),
                "model_info": card.model_info(),
                "capabilities": list(card.capabilities),
                "modified_at": _rfc3339(self._modified_at[card.name]),
            }
        )

    async def _ps(self, request: Request) -> Response:
        self._record(request)
        self._expire()
        now = time.time()
        models = []
        for name, loaded in self._loaded.items():
            card = self._cards[name]
            expires = loaded.expires_at
            if expires is None:  # in use: the clock starts when the last request ends
                expires = now + min(loaded.keep_alive, _FOREVER)
            models.append(
                {
                    "name": name,
                    "model": name,
                    "size": card.size,
                    "size_vram": card.size,
                    "digest": card.digest,
                    "details": card.details(),
                    "expires_at": _rfc3339(expires),
                    "context_length": DEFAULT_NUM_CTX,
                }
            )
        models.sort(key=lambda model: model["expires_at"], reverse=True)
        return _json_response({"models": models})

    async def _generate(self, request: Request) -> Response:
        started = trio.current_time()
        try:
            body = await self._read(request, "GenerateRequest", _GENERATE_FIELDS)
            prompt: str = body.get("prompt") or ""
            system = body.get("system")
            read: Prompt = (
                [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
                if system
                else prompt
            )
            return await self._complete("generate", body, read if prompt else None, started)
        except _Refusal as refusal:
            return refusal.response()

    async def _chat(self, request: Request) -> Response:
        started = trio.current_time()
        try:
            body = await self._read(request, "ChatRequest", _CHAT_FIELDS)
            messages = _check_messages(body.get("messages") or [])
            return await self._complete("chat", body, messages or None, started)
        except _Refusal as refusal:
            return refusal.response()

    async def _complete(
        self, endpoint: str, body: Mapping[str, Any], prompt: Prompt | None, started: float
    ) -> Response:
        """What generate and chat share, in Ollama's order of checks.
        ``prompt`` ``None`` (empty prompt, no messages) only loads or unloads."""
        keep_alive = _keep_alive(body)
        requested, card = self._model(body)
        if prompt is None and keep_alive == 0:
            self._unload(card.name)
            return _json_response(self._done_without_reply(endpoint, requested, "unload"))
        if _think_requested(body.get("think")) and "thinking" not in card.capabilities:
            raise _Refusal(400, f'"{requested}" does not support thinking')
        if "completion" not in card.capabilities:
            raise _Refusal(400, f'"{requested}" does not support {endpoint}')
        self._take_fault()
        options = body.get("options") or {}
        seed, num_predict = _int_option(options, "seed"), _int_option(options, "num_predict")
        if prompt is None:
            await self._load_and_release(card, keep_alive)
            return _json_response(self._done_without_reply(endpoint, requested, "load"))
        length, done_reason = _reply_length(num_predict, self.default_length)
        job = _Job(
            endpoint=endpoint,
            requested_model=requested,
            card=card,
            prompt=prompt,
            seed=seed,
            length=length,
            done_reason=done_reason,
            stream=body.get("stream") is not False,  # absent means true
            keep_alive=keep_alive,
            with_context=endpoint == "generate" and not body.get("raw"),
            fault=self._runner_faults.popleft() if self._runner_faults else None,
            started=started,
        )
        return _GenerationResponse(self, job)

    @staticmethod
    def _done_without_reply(endpoint: str, requested: str, reason: str) -> dict[str, Any]:
        reply: dict[str, Any] = {"model": requested, "created_at": _rfc3339(time.time())}
        if endpoint == "chat":
            reply["message"] = {"role": "assistant", "content": ""}
        else:
            reply["response"] = ""
        reply.update(done=True, done_reason=reason)
        return reply

    async def _embed(self, request: Request) -> Response:
        started = trio.current_time()
        try:
            body = await self._read(request, "EmbedRequest", _EMBED_FIELDS)
            keep_alive = _keep_alive(body)
            if not body.get("model"):
                raise _Refusal(400, "model is required")
            given = body.get("input")
            if isinstance(given, str):
                texts = [given] if given else []
            elif isinstance(given, list) and all(isinstance(text, str) for text in given):
                texts = given
            elif given is None:
                texts = []
            else:
                raise _Refusal(400, "invalid input type")
            requested, card = self._model(body)
            self._take_fault()
        except _Refusal as refusal:
            return refusal.response()
        await self._load_and_release(card, keep_alive)
        loaded = trio.current_time()
        if not texts:
            return _json_response({"model": requested, "embeddings": []})
        dimensions = body.get("dimensions")
        return _json_response(
            {
                "model": requested,
                "embeddings": [expected_embedding(card.name, text, dimensions) for text in texts],
                "total_duration": _ns(trio.current_time() - started),
                "load_duration": _ns(loaded - started),
                "prompt_eval_count": sum(count_prompt_tokens(text) for text in texts),
            }
        )

    async def _embeddings(self, request: Request) -> Response:
        """The legacy single-input endpoint the client's ``embeddings()`` uses."""
        try:
            body = await self._read(request, "EmbeddingRequest", _EMBEDDINGS_FIELDS)
            keep_alive = _keep_alive(body)
            _, card = self._model(body)
            self._take_fault()
        except _Refusal as refusal:
            return refusal.response()
        await self._load_and_release(card, keep_alive)
        prompt = body.get("prompt") or ""
        embedding = expected_embedding(card.name, prompt) if prompt else []
        return _json_response({"embedding": embedding})

    # -- warm models --------------------------------------------------------

    def _expire(self) -> None:
        now = time.time()
        for name in [name for name, loaded in self._loaded.items() if loaded.expired(now)]:
            del self._loaded[name]
            self._notify()

    def _unload(self, name: str) -> None:
        loaded = self._loaded.get(name)
        if loaded is not None and loaded.in_use == 0:
            del self._loaded[name]
            self._notify()
        elif loaded is not None:
            loaded.keep_alive = 0.0

    async def _acquire_model(self, card: ModelCard, keep_alive: float | None) -> None:
        """Make ``card`` warm (paying ``load_seconds`` if it was cold) and mark
        it in use, so it cannot expire under a request."""
        self._expire()
        if card.name not in self._loaded:
            async with self._load_locks[card.name]:
                self._expire()
                if card.name not in self._loaded:
                    if self.load_seconds > 0:
                        await trio.sleep(self.load_seconds)
                    self._loaded[card.name] = _Loaded(keep_alive=DEFAULT_KEEP_ALIVE)
                    self._notify()
        loaded = self._loaded[card.name]
        loaded.in_use += 1
        loaded.expires_at = None
        if keep_alive is not None:  # unset keeps the model's current value
            loaded.keep_alive = keep_alive

    def _release_model(self, card: ModelCard) -> None:
        loaded = self._loaded[card.name]
        loaded.in_use -= 1
        if loaded.in_use == 0:
            if loaded.keep_alive == 0:
                del self._loaded[card.name]
            else:
                loaded.expires_at = time.time() + min(loaded.keep_alive, _FOREVER)
            self._notify()

    async def _load_and_release(self, card: ModelCard, keep_alive: float | None) -> None:
        await self._acquire_model(card, keep_alive)
        self._release_model(card)

    # -- running a generation -----------------------------------------------

    async def _run_generation(self, job: _Job, receive: Receive, send: Send) -> None:
        run = _Run(job)
        self._active.add(run)
        self._notify()
        outcome = Outcome.ABORTED  # unless _decode returns, or the client left
        try:
            with run.cancel_scope:
                if self._stopping:
                    run.aborted = True
                    run.cancel_scope.cancel()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_disconnect, run, receive)
                    outcome = await self._decode(run, send)
                    nursery.cancel_scope.cancel()
            if run.client_gone:
                outcome = Outcome.CANCELLED
            elif run.aborted:
                outcome = Outcome.ABORTED
                if not run.response_started:
                    # A status line and then nothing: the client sees the
                    # connection drop mid-reply, as when Ollama is killed.
                    await self._start_response(run, send, 200)
        finally:
            self._finish(run, outcome)

    def _finish(self, run: _Run, outcome: Outcome) -> None:
        """Record how ``run`` ended, once. A reply's last write calls it just
        before writing, so a client holding the final chunk (or error line)
        can rely on the record being there."""
        if run.finished:
            return
        run.finished = True
        self._active.discard(run)
        self._outcomes[outcome] += 1
        self._history.append(
            GenerationRecord(
                endpoint=run.job.endpoint,
                model=run.job.card.name,
                outcome=outcome,
                tokens_generated=run.tokens_generated,
                tokens_sent=run.tokens_sent,
            )
        )
        logger.debug("%s on %s ended: %s", run.job.endpoint, run.job.card.name, outcome.value)
        self._notify()

    @staticmethod
    async def _watch_disconnect(run: _Run, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not run.response_complete:
                    run.client_gone = True
                    run.cancel_scope.cancel()
                return

    async def _decode(self, run: _Run, send: Send) -> Outcome:
        job = run.job
        # Drawn lazily: a long reply costs nothing up front.
        token_stream = _reply_stream(job.card.name, job.prompt, job.seed)
        tokens: list[str] = []
        fail_at = job.fault.after_tokens if job.fault is not None else None
        await self._acquire_model(job.card, job.keep_alive)
        loaded = trio.current_time()
        try:
            async with self._slots[job.card.name]:
                slot = trio.current_time()
                if self.first_token_delay > 0:
                    await trio.sleep(self.first_token_delay)
                decode_start = trio.current_time()
                for index in range(job.length):
                    if index == fail_at:
                        return await self._fail(run, send)
                    rate = self.tokens_per_second
                    if rate is None:
                        await trio.lowlevel.checkpoint()
                    else:
                        await trio.sleep_until(decode_start + (index + 1) / rate)
                    token = next(token_stream)
                    tokens.append(token)
                    run.tokens_generated += 1
                    if job.stream:
                        await self._send_line(run, send, job.chunk(token))
                        run.tokens_sent += 1
                        self._notify()
                if fail_at is not None and fail_at >= len(tokens):
                    return await self._fail(run, send)
                decode_end = trio.current_time()
        finally:
            self._release_model(job.card)

        final = job.chunk("" if job.stream else "".join(tokens))
        final["done"] = True
        final["done_reason"] = job.done_reason
        if job.with_context:
            words = render_prompt(job.prompt).split() + [token.strip() for token in tokens]
            final["context"] = [_token_id(word) for word in words]
        final.update(
            total_duration=_ns(trio.current_time() - job.started),
            load_duration=_ns(loaded - job.started),
            prompt_eval_count=count_prompt_tokens(job.prompt),
            prompt_eval_duration=_ns(decode_start - slot),
            eval_count=len(tokens),
            eval_duration=_ns(decode_end - decode_start),
        )
        self._finish(run, Outcome.COMPLETED)
        if job.stream:
            await self._send_line(run, send, final, last=True)
        else:
            await self._send_whole(run, send, 200, final)
        return Outcome.COMPLETED

    async def _fail(self, run: _Run, send: Send) -> Outcome:
        assert run.job.fault is not None
        error = {"error": run.job.fault.message}
        self._finish(run, Outcome.FAILED)
        if run.job.stream and run.response_started:
            await self._send_line(run, send, error, last=True)
        else:
            await self._send_whole(run, send, 500, error)
        return Outcome.FAILED

    @staticmethod
    async def _start_response(
        run: _Run, send: Send, status: int, length: int | None = None
    ) -> None:
        streaming = run.job.stream and status == 200
        media = b"application/x-ndjson" if streaming else b"application/json; charset=utf-8"
        headers = [(b"content-type", media)]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        run.response_started = True
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def _send_line(self, run: _Run, send: Send, value: Any, *, last: bool = False) -> None:
        if not run.response_started:
            await self._start_response(run, send, 200)
        run.response_complete = last
        line = _dumps(value) + b"\n"
        await send({"type": "http.response.body", "body": line, "more_body": not last})

    async def _send_whole(self, run: _Run, send: Send, status: int, value: Any) -> None:
        body = _dumps(value)
        run.response_complete = True
        await self._start_response(run, send, status, len(body))
        await send({"type": "http.response.body", "body": body, "more_body": False})


# ---------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------


@contextmanager
def _single_exceptions_unwrapped() -> Iterator[None]:
    """Let an exception from the ``async with`` body leave as itself rather
    than inside the ExceptionGroup our nursery wraps it in."""
    try:
        yield
    except BaseExceptionGroup as group:
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            raise
    else:
        return
    # Raised outside the except block so the group does not become its context.
    raise inner


@asynccontextmanager
async def serve_standin(
    models: Iterable[str] = DEFAULT_MODELS,
    *,
    port: int = 0,
    tokens_per_second: float | None = DEFAULT_TOKENS_PER_SECOND,
    default_length: int = DEFAULT_NUM_PREDICT,
    first_token_delay: float = 0.0,
    load_seconds: float = 0.0,
    parallel: int = 1,
) -> AsyncIterator[OllamaStandin]:
    """Serve a stand-in on 127.0.0.1 for the duration of the block.

    ``port=0`` picks a free port; ``standin.host`` is the URL to give the
    client. Leaving the block stops it as ``stop()`` does and frees the port.
    """
    standin = OllamaStandin(
        models,
        tokens_per_second=tokens_per_second,
        default_length=default_length,
        first_token_delay=first_token_delay,
        load_seconds=load_seconds,
        parallel=parallel,
    )
    with _single_exceptions_unwrapped():
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(standin.run, port))
            try:
                yield standin
            finally:
                standin._begin_stop()


async def _serve_until_signalled(port: int, settings: Mapping[str, Any]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with serve_standin(port=port, **settings) as standin:
            print(f"ollama stand-in listening on {standin.host}", flush=True)
            async for signum in signals:
                logger.info("%s received, stopping", signal.Signals(signum).name)
                break


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--port", type=click.IntRange(0, 65535), default=11434, show_default=True,
    help="Port on 127.0.0.1; 0 picks a free one.",
)  # fmt: skip
@click.option(
    "--model", "models", multiple=True, metavar="NAME",
    help=f"A model to serve (repeatable). [default: {', '.join(DEFAULT_MODELS)}]",
)  # fmt: skip
@click.option(
    "--tokens-per-second", type=click.FloatRange(min=0), default=DEFAULT_TOKENS_PER_SECOND,
    show_default=True, help="Decode rate of each request; 0 for unpaced.",
)  # fmt: skip
@click.option(
    "--default-length", type=click.IntRange(min=1), default=DEFAULT_NUM_PREDICT,
    show_default=True, help="Tokens in a reply that ends on its own.",
)  # fmt: skip
@click.option(
    "--first-token-delay", type=click.FloatRange(min=0), default=0.0, show_default=True,
    help="Seconds of prefill before the first token.",
)  # fmt: skip
@click.option(
    "--load-seconds", type=click.FloatRange(min=0), default=0.0, show_default=True,
    help="Seconds to load a model that is not warm.",
)  # fmt: skip
@click.option(
    "--parallel", type=click.IntRange(min=1), default=1, show_default=True,
    help="Requests each model decodes at once (OLLAMA_NUM_PARALLEL).",
)  # fmt: skip
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG.")
def _command(
    port: int,
    models: tuple[str, ...],
    tokens_per_second: float,
    default_length: int,
    first_token_delay: float,
    load_seconds: float,
    parallel: int,
    verbose: bool,
) -> None:
    """Serve the Ollama HTTP API over deterministic fake models until
    SIGINT or SIGTERM. Prints one line with the URL once listening."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = {
        "models": models or DEFAULT_MODELS,
        "tokens_per_second": tokens_per_second or None,
        "default_length": default_length,
        "first_token_delay": first_token_delay,
        "load_seconds": load_seconds,
        "parallel": parallel,
    }
    try:
        trio.run(_serve_until_signalled, port, settings)
    except KeyboardInterrupt:  # a signal before the handler was installed
        pass
    except OSError as exc:
        raise click.ClickException(f"cannot listen on 127.0.0.1:{port}: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    try:
        _command.main(
            args=list(argv) if argv is not None else None,
            prog_name="python -m p2pgpu.testing.ollama_standin",
            standalone_mode=False,
        )
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

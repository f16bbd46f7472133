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
  ``/api/embed`` and ``/api/embeddings`` answer as Ollama (0.12.6, ``VERSION``)
  does: the same fields, NDJSON streaming with one object per line and no
  blank lines, ``stream`` defaulting to true, errors as ``{"error": ...}``
  with Ollama's statuses and messages, checked in Ollama's order (400 bad
  body, 404 ``model 'x' not found``, 500 for an option of the wrong type,
  as ``Options.FromMap`` reports it...). A streamed reply sends nothing, not
  even headers, until its first token, as Ollama does, so an error before
  the first token is a plain status + JSON and an error after it is a final
  ``{"error": ...}`` line under status 200.
- **The OpenAI-compatible routes** Ollama serves: ``POST
  /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
  ``GET /v1/models`` and ``GET /v1/models/{id}``, translated as Ollama's
  middleware translates them (``max_tokens`` is ``num_predict``, an absent
  ``temperature``/``top_p`` is 1.0, ``response_format`` is ``format``,
  ``reasoning_effort`` is ``think``, each text or image part of a message is
  a message of its own) and run by the same code as the native routes, so
  the same request gets token for token the same reply. ``stream`` defaults
  to false; streaming is SSE (``data: {...}``, a final chunk with
  ``finish_reason``, a ``"choices": []`` usage chunk with
  ``stream_options.include_usage``, then ``data: [DONE]``); tool calls have
  an ``id``, ``type: "function"`` and ``arguments`` as JSON text, with
  ``finish_reason`` ``tool_calls``. Errors are ``{"error": {"message",
  "type", "param", "code"}}``: typed by status when the middleware refuses
  the body, ``api_error`` (status kept) when the handler behind it does, as
  in Ollama. A runner failure mid-stream ends the SSE stream after an empty
  chunk, without ``[DONE]`` (what Ollama's middleware makes of the error
  line). ``Authorization`` is ignored.
- **Determinism.** The reply is a pure function of the request: model,
  prompt or messages (with their images, tool calls and tool results),
  ``options.seed`` (ignored at ``options.temperature`` 0: greedy decoding
  is the seedless reply), ``options.num_predict``, ``options.stop``,
  ``think``, ``format`` and ``tools``. No other option changes the text:
  ``top_k``, ``top_p``, ``min_p``, ``typical_p``, ``repeat_penalty``,
  ``repeat_last_n``, ``presence_penalty``, ``frequency_penalty``... are
  type-checked and accepted. Words come from a fixed vocabulary by a
  hash-seeded counter, one token per streamed chunk. ``expected_completion``
  (thinking, content, tool calls, counts), ``expected_tokens``,
  ``expected_tool_call`` and ``expected_embedding`` compute it without a
  server, so a test can compare what a job delivered with what the model
  "said". A shorter ``num_predict`` yields a prefix of the longer reply. A
  chat ending in a partial assistant message (a prefill) is continued as
  greedy decoding would continue it: the rest of the answer that message
  began (``split_prefill``), so an answer cut short and continued elsewhere
  reads as the one whole answer.
- **What a reply is made of.** In order, each token paced and counted in
  ``eval_count``:

  - *thinking* (``message.thinking`` / generate's ``thinking`` chunks): a
    thinking model thinks ``THINKING_TOKENS[level]`` tokens (8, 16, 32 for
    low, medium, high) unless ``think`` is false; an unset ``think`` means
    true on such a model, as in Ollama 0.12.6. Levels are taken only by
    gpt-oss models; others answer 400 ``think value "high" is not supported
    for this model``, and a model without thinking answers 400 ``"x" does
    not support thinking`` to ``think: true`` (Ollama 0.12.6's rules).
  - *a tool call*, when a chat offers ``tools`` and ends in a user message:
    the tool whose name the user's message contains (the first such), else
    one drawn from the conversation, with arguments that validate against
    its ``parameters`` schema (``value_for_schema``), sent as one chunk with
    ``message.tool_calls`` = ``[{"function": {"index": 0, "name",
    "arguments": {...}}}]`` once its JSON text (``json_tokens``, counted as
    tokens) is decoded, then the final chunk, ``done_reason`` ``stop``. A
    ``num_predict`` that cuts the call short leaves its JSON so far as the
    final chunk's content, as Ollama's tool parser does. A chat ending in a
    ``tool`` message (a tool's result) gets an ordinary answer.
  - *content*: for ``format`` ``"json"`` a JSON object, for a schema JSON
    that validates against it (same generator), streamed token by token so
    the chunks join to the JSON text; else words, ``default_length`` of them
    when nothing cuts the reply (a vision model that was shown images with
    the message it answers begins ``I see N image(s).``). ``options.stop``
    ends the content before the first occurrence of any stop sequence
    (``done_reason`` ``stop``); text that may begin one is held back and
    goes out with the next token, as Ollama's runner does. Stop sequences
    apply to the content only.

  ``num_predict`` caps all of it (``done_reason`` ``length``, a JSON reply
  cut short included). A prefill (a chat ending in a partial assistant
  message) skips thinking and tool calls: the model goes on with the
  message it began. ``prompt_eval_count`` counts the prompt's words,
  ``IMAGE_TOKENS`` (256) per image a vision model is shown, and the tokens
  of the offered tools' JSON.
- **Capabilities, from the name** (``model_card``, reported by
  ``/api/show``): a name containing ``embed``, ``minilm`` or ``bge`` is an
  embedding model and only that (chat/generate on it: 400 ``"x" does not
  support chat``/``generate``). Every other model has ``completion``, plus
  ``vision`` (llava, vision, moondream, gemma3, minicpm-v, ``-vl``/``vl``),
  ``tools`` unless the name contains gemma, llava, moondream, tinyllama,
  codellama, llama2, phi3, minicpm-v or vision, ``insert`` (coder,
  codellama, codegemma, starcoder, codestral: generate's ``suffix``) and
  ``thinking`` (qwen3, deepseek-r1, gpt-oss, magistral, cogito, names with
  ``reasoning`` or ``think``). So ``llama3.2``: completion, tools;
  ``qwen3``: completion, tools, thinking; ``llava``: completion, vision.
  Tools offered to a model without them: 400
  ``registry.ollama.ai/library/<model> does not support tools``, Ollama's
  scheduler's words. Images given to a model without vision are ignored,
  as Ollama ignores them (no error, no image tokens); images must be base64
  that Go decodes (else 400 ``illegal base64 data at input byte N``).
- **Embeddings** are L2-normalised, deterministic per (model, text), and
  ``embedding_length(model)`` long: 384 for names containing ``minilm``,
  1024 for ``large``, ``mxbai`` or ``bge-m3``, else 768
  (``EMBEDDING_LENGTH``). ``dimensions`` below that truncates and
  re-normalises; an input longer than the context (``options.num_ctx``,
  default 4096, at most the model's) is cut to it, or refused with 400
  ``input exceeds maximum context length`` when ``truncate`` is false;
  ``prompt_eval_count`` counts the words embedded.
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
  without a final chunk and the port closes). They apply to the ``/v1``
  routes alike.

Not modelled: model management (pull/push/create/copy/delete), the
deprecated ``context`` input, ``template`` overrides, ``logprobs``, the
``pattern`` keyword of JSON schemas, more than one tool call per reply,
and content before a tool call (real models sometimes talk first).

Theory of operation
-------------------
The pure part (names, cards, token streams, embeddings, Go-style durations) is
at the top and does no I/O. ``OllamaStandin`` builds the Starlette app and
keeps the state a real server keeps (loaded models and their expiry, per-model
decode slots) plus what tests want to see (finished generations, recorded
requests). Request handlers validate in Ollama's order and either answer
directly or return a ``_GenerationResponse``, an ASGI callable that runs the
whole generation inside its own cancel scope next to a task watching for the
client's ``http.disconnect``. A ``_Decoder`` produces the reply one token at
a time (the same one ``expected_completion`` runs without a server), and a
``_Wire`` puts it on the wire: NDJSON for the native routes, SSE or one
object for ``/v1``, whose handlers only translate the request (as Ollama's
middleware does) and then run the native handler's code. ``stop()`` cancels those scopes and then
triggers hypercorn's shutdown, so nothing outlives the server.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import logging
import math
import re
import signal
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from hashlib import blake2b, sha256
from itertools import chain, islice
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
    "IMAGE_TOKENS",
    "RUNNER_ERROR",
    "SERVER_BUSY",
    "THINKING_TOKENS",
    "THINK_LEVELS",
    "VERSION",
    "Completion",
    "GenerationRecord",
    "ModelCard",
    "OllamaStandin",
    "Outcome",
    "Prompt",
    "RecordedRequest",
    "count_prompt_tokens",
    "embedding_length",
    "expected_completion",
    "expected_embedding",
    "expected_tokens",
    "expected_tool_call",
    "json_tokens",
    "main",
    "model_card",
    "normalize_model_name",
    "parse_keep_alive",
    "render_prompt",
    "split_prefill",
    "serve_standin",
    "value_for_schema",
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
"""Vector length of most models (``embedding_length`` gives a model's)."""
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


# The capability rule: a model's capabilities follow from its name alone, as
# the real models of those names have them (``/api/show``). Only the base
# name (before the tag, after any namespace) is matched.
_EMBEDDING_NAMES: Final = re.compile(r"embed|minilm|bge")
_VISION_NAMES: Final = re.compile(r"llava|vision|moondream|gemma3|minicpm-v|-vl|vl$")
_THINKING_NAMES: Final = re.compile(r"qwen3|deepseek-r1|gpt-oss|magistral|reasoning|cogito|think")
_NO_TOOLS_NAMES: Final = re.compile(
    r"gemma|llava|moondream|tinyllama|codellama|llama2|phi3|minicpm-v|vision"
)
_INSERT_NAMES: Final = re.compile(r"coder|codellama|codegemma|starcoder|codestral")
_HARMONY_NAMES: Final = re.compile(r"gpt-oss")
"""Models whose ``think`` may be a level (``"low"``...): Ollama 0.12.6 takes
levels only from gpt-oss (the "harmony" parser)."""


def _embedding_length(base: str) -> int:
    if "minilm" in base:
        return 384
    if re.search(r"large|mxbai|bge-m3", base):
        return 1024
    return EMBEDDING_LENGTH


def model_card(name: str) -> ModelCard:
    """The card of a model, from its name: family from the leading letters,
    parameter size from a tag such as ``1b`` or ``0.5b`` (else 1B), and
    capabilities by the rule the module docstring gives (``embedding`` alone
    for names containing ``embed``, ``minilm`` or ``bge``)."""
    name = normalize_model_name(name)
    base, _, tag = name.rpartition(":")
    short = base.rsplit("/", 1)[-1]
    family = re.sub(r"[^a-z].*", "", short) or "llama"
    size_match = _SIZE_TAG.search(tag)
    parameter_size = (
        f"{size_match.group(1)}{size_match.group(2).upper()}" if size_match else "1B"
    )
    embedding = _EMBEDDING_NAMES.search(short) is not None
    if embedding:
        capabilities: tuple[str, ...] = ("embedding",)
    else:
        capabilities = ("completion",)
        if _VISION_NAMES.search(short):
            capabilities += ("vision",)
        if not _NO_TOOLS_NAMES.search(short):
            capabilities += ("tools",)
        if _INSERT_NAMES.search(short):
            capabilities += ("insert",)
        if _THINKING_NAMES.search(short):
            capabilities += ("thinking",)
    return ModelCard(
        name=name,
        family="bert" if embedding else family,
        parameter_size=parameter_size,
        quantization_level="F16" if embedding else "Q4_K_M",
        # Q4_K_M is about 4.8 bits a weight, F16 is 16.
        size=int(_parameter_count(parameter_size) * (2.0 if embedding else 0.6)),
        digest=sha256(name.encode()).hexdigest(),
        capabilities=capabilities,
        context_length=8192 if embedding else 131072,
        embedding_length=_embedding_length(short),
    )


def embedding_length(model: str) -> int:
    """The length of a model's vectors (``/api/embed`` without
    ``dimensions``): 384 for names containing ``minilm``, 1024 for
    ``large``, ``mxbai`` or ``bge-m3``, else ``EMBEDDING_LENGTH`` (768)."""
    return model_card(model).embedding_length


def _full_name(model: str) -> str:
    """How Ollama's scheduler names a model in its errors:
    ``registry.ollama.ai/library/llama3.2:1b``."""
    name = normalize_model_name(model)
    parts = name.split("/")
    if len(parts) == 1:
        return f"registry.ollama.ai/library/{name}"
    if len(parts) == 2:
        return f"registry.ollama.ai/{name}"
    return name


def _namespace(model: str) -> str:
    """The namespace of a name (``library`` for ``llama3.2``): the OpenAI
    routes' ``owned_by``."""
    parts = normalize_model_name(model).split("/")
    return "library" if len(parts) == 1 else parts[-2]


Prompt = str | Sequence[Mapping[str, Any]]
"""A generate prompt (``str``) or a chat's messages: ``{"role", "content"}``,
each optionally with ``images`` (base64 text or bytes), ``tool_calls``
(``[{"function": {"name", "arguments"}}]``), ``tool_name`` and ``thinking``."""

IMAGE_TOKENS: Final = 256
"""Prompt tokens each image costs a vision model (in ``prompt_eval_count``)."""
THINKING_TOKENS: Final = {"low": 8, "medium": 16, "high": 32}
"""Tokens a thinking model thinks before it answers, by level; ``think:
true`` (and, on a thinking model, no ``think`` at all) is ``"medium"``."""
THINK_LEVELS: Final = ("low", "medium", "high")


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _render_message(message: Mapping[str, Any]) -> str:
    role = message.get("role") or ""
    if message.get("tool_name"):
        role = f"{role} ({message['tool_name']})"
    text = f"{role}: {message.get('content') or ''}"
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            text += f" [{function.get('name') or ''} {_compact(function.get('arguments') or {})}]"
    return text


def render_prompt(prompt: Prompt) -> str:
    """The text the fake model "reads": the prompt itself, or each message as
    ``role: content`` on its own line (a stand-in for a chat template). A
    tool result reads ``tool (name): content``, and an assistant's tool
    calls follow its content as ``[name {arguments}]``."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(_render_message(m) for m in prompt)


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
    """``prompt_eval_count`` of a text-only prompt: whitespace-separated words
    of the rendered prompt, at least 1 (a real prompt always has at least a
    BOS token). Images and tool definitions add to it (``expected_completion``
    counts those too)."""
    return max(1, len(render_prompt(prompt).split()))


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole reply as the stand-in will produce it.

    ``tokens`` are the streamed content chunks' texts, in order: one token
    each, except that text a stop sequence may begin with is held back and
    goes out with the next token (as Ollama's runner does). ``thinking`` are
    the thinking chunks' texts, streamed before any content; ``tool_calls``
    the calls of the one tool-call chunk, in Ollama's shape
    (``{"function": {"index", "name", "arguments"}}``); ``tail`` the content
    of the final chunk, empty unless ``num_predict`` cut a tool call short
    (then its JSON so far, as Ollama's tool parser hands it back).
    ``eval_count`` counts every token decoded: thinking, content (also any a
    stop sequence removed) and a tool call's JSON.
    """

    tokens: tuple[str, ...]
    done_reason: str
    prompt_eval_count: int
    thinking: tuple[str, ...] = ()
    tool_calls: tuple[dict[str, Any], ...] = ()
    tail: str = ""
    eval_count: int = -1  # -1: len(thinking) + len(tokens)

    def __post_init__(self) -> None:
        if self.eval_count < 0:
            object.__setattr__(self, "eval_count", len(self.thinking) + len(self.tokens))

    @property
    def text(self) -> str:
        """The content, as a reply that is not streamed carries it."""
        return "".join(self.tokens) + self.tail

    @property
    def thinking_text(self) -> str:
        return "".join(self.thinking)


def _conversation(prompt: Prompt) -> str:
    """What the reply depends on. A chat of one user message is the same
    conversation as a generate request of that text: Ollama renders a
    generate prompt through the model's template as exactly that chat, so
    a real model answers both alike."""
    if not isinstance(prompt, str) and len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0].get("content") or ""
    return render_prompt(prompt)


def _key(material: Any, person: bytes) -> bytes:
    text = json.dumps(material, ensure_ascii=False)
    return blake2b(text.encode(), digest_size=16, person=person).digest()


def _words(key: bytes) -> Iterator[str]:
    """Sentences of vocabulary words and punctuation, one token at a time."""
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


def _token_stream(
    model: str, prompt: Prompt, seed: int | None, images: Sequence[str] = ()
) -> Iterator[str]:
    material: list[Any] = [
        normalize_model_name(model), _conversation(prompt), -1 if seed is None else seed
    ]
    if images:  # only then, so text-only replies stay what they always were
        material.append(list(images))
    return _words(_key(material, b"p2pgpu-standin"))


# -- what a request asks of the model -----------------------------------------


@dataclass(frozen=True, slots=True)
class _Ask:
    """Everything a reply is a pure function of."""

    model: str  # normalised
    prompt: Prompt  # images already dropped for a model without vision
    images: tuple[str, ...]  # digests of a generate request's images (vision only)
    seed: int | None  # None: no seed, or temperature 0 (greedy)
    think: str | None  # a level, or None: no thinking
    format: Any  # None, "json", or a JSON schema (a mapping)
    tools: tuple[Mapping[str, Any], ...]  # chat only
    stop: tuple[str, ...]
    default_length: int


def _image_digest(image: Any) -> str:
    data = image if isinstance(image, (bytes, bytearray)) else _b64decode(str(image))
    return sha256(bytes(data)).hexdigest()[:16]


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=False)
    except (binascii.Error, ValueError):
        return text.encode()


def _without_images(prompt: Prompt) -> Prompt:
    if isinstance(prompt, str) or not any(m.get("images") for m in prompt):
        return prompt
    return [{k: v for k, v in m.items() if k != "images"} for m in prompt]


def _message_images(prompt: Prompt) -> list[str]:
    if isinstance(prompt, str):
        return []
    return [_image_digest(image) for m in prompt for image in (m.get("images") or ())]


def _think_level(card: ModelCard, think: Any) -> str | None:
    """The level a model thinks at: a thinking model thinks unless told
    ``false`` (Ollama 0.12.6 turns an unset ``think`` into ``true`` for it)."""
    if "thinking" not in card.capabilities or think is False:
        return None
    return think if think in THINK_LEVELS else "medium"


def _format_of(value: Any) -> Any:
    """``None`` (no format), ``"json"``, or a schema; anything else is
    refused before a request gets this far."""
    if value is None or value == "":
        return None
    return value


def _make_ask(
    card: ModelCard,
    prompt: Prompt,
    *,
    seed: int | None = None,
    temperature: float | None = None,
    think: Any = None,
    format: Any = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    stop: Sequence[str] | None = None,
    images: Sequence[Any] = (),
    default_length: int = DEFAULT_NUM_PREDICT,
) -> _Ask:
    vision = "vision" in card.capabilities
    return _Ask(
        model=card.name,
        prompt=prompt if vision else _without_images(prompt),
        images=tuple(_image_digest(image) for image in images) if vision else (),
        seed=None if temperature == 0 else seed,
        think=_think_level(card, think),
        format=_format_of(format),
        tools=tuple(tools or ()) if not isinstance(prompt, str) else (),
        stop=tuple(stop or ()),
        default_length=default_length,
    )


def _prompt_eval_count(ask: _Ask) -> int:
    count = count_prompt_tokens(ask.prompt)
    count += IMAGE_TOKENS * (len(ask.images) + len(_message_images(ask.prompt)))
    if ask.tools:  # the tools are rendered into the prompt
        count += len(json_tokens(_compact([_as_ollama_tool(tool) for tool in ask.tools])))
    return count


def _as_ollama_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    """A tool as Ollama's ``api.Tool`` keeps it (and its template renders
    it): what any client sends for the same tool reads the same."""
    function = tool.get("function")
    function = function if isinstance(function, Mapping) else {}
    parameters = function.get("parameters")
    parameters = parameters if isinstance(parameters, Mapping) else {}
    properties = parameters.get("properties")
    kept: dict[str, Any] = {}
    for name, prop in (properties if isinstance(properties, Mapping) else {}).items():
        if isinstance(prop, Mapping):
            kept[name] = {
                k: prop[k]
                for k in ("anyOf", "type", "items", "description", "enum")
                if prop.get(k) not in (None, "", [])
            }
    shaped: dict[str, Any] = {"type": parameters.get("type") or "object"}
    for k in ("$defs", "items"):
        if parameters.get(k) is not None:
            shaped[k] = parameters[k]
    shaped["required"] = list(parameters.get("required") or [])
    shaped["properties"] = kept
    return {
        "type": tool.get("type") or "function",
        "function": {
            "name": function.get("name") or "",
            "description": function.get("description") or "",
            "parameters": shaped,
        },
    }


# -- JSON: format replies and tool arguments ----------------------------------

_JSON_TOKEN: Final = re.compile(r"\s*(?:\w+|\S)")
_MAX_SCHEMA_DEPTH: Final = 24


def json_tokens(text: str) -> list[str]:
    """How the stand-in splits JSON text (a ``format`` reply, a tool call)
    into tokens: a run of word characters or one other character, each with
    the whitespace before it. Joined, they are ``text``."""
    tokens = _JSON_TOKEN.findall(text)
    rest = text[sum(len(token) for token in tokens) :]
    if rest:  # trailing whitespace
        tokens.append(rest)
    return tokens


class _Draws:
    """Deterministic numbers for one place in a generated value."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._count = 0

    def next(self) -> int:
        digest = blake2b(self._key + self._count.to_bytes(4, "big"), digest_size=8).digest()
        self._count += 1
        return int.from_bytes(digest)

    def below(self, bound: int) -> int:
        return self.next() % bound if bound > 0 else 0

    def child(self, name: str) -> _Draws:
        return _Draws(blake2b(self._key + b"/" + name.encode(), digest_size=16).digest())

    def word(self) -> str:
        return _VOCABULARY[self.below(len(_VOCABULARY))]


def _string_format(kind: str, draws: _Draws) -> str | None:
    month, day = 1 + draws.below(12), 1 + draws.below(28)
    hour, minute = draws.below(24), draws.below(60)
    values = {
        "date-time": f"2024-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:00Z",
        "date": f"2024-{month:02d}-{day:02d}",
        "time": f"{hour:02d}:{minute:02d}:00Z",
        "email": f"{draws.word()}@example.com",
        "hostname": f"{draws.word()}.example.com",
        "ipv4": f"192.0.2.{1 + draws.below(254)}",
        "ipv6": f"2001:db8::{1 + draws.below(65534):x}",
        "uri": f"https://example.com/{draws.word()}",
        "url": f"https://example.com/{draws.word()}",
        "uuid": str(uuid.UUID(int=draws.next() << 64 | draws.next(), version=4)),
    }
    return values.get(kind)


class _SchemaValues:
    """Values that validate against a JSON schema (draft 4 to 2020-12: the
    keywords a model's output would be constrained by)."""

    def __init__(self, root: Any) -> None:
        self._root = root if isinstance(root, Mapping) else {}

    def _lookup(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}
        node: Any = self._root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return {}
        return node

    def _resolve(self, schema: Any) -> Any:
        for _ in range(_MAX_SCHEMA_DEPTH):
            if not (isinstance(schema, Mapping) and isinstance(schema.get("$ref"), str)):
                break
            target = self._lookup(schema["$ref"])
            siblings = {k: v for k, v in schema.items() if k != "$ref"}
            if isinstance(target, Mapping):
                schema = {**target, **siblings}
            else:
                schema = target if not siblings else siblings
        if isinstance(schema, Mapping) and isinstance(schema.get("allOf"), list):
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self._resolve(part)
                if not isinstance(part, Mapping):
                    continue
                for name, value in part.items():
                    if name == "properties" and isinstance(value, Mapping):
                        merged["properties"] = {**value, **(merged.get("properties") or {})}
                    elif name == "required" and isinstance(value, list):
                        merged["required"] = [*(merged.get("required") or []), *value]
                    else:
                        merged.setdefault(name, value)
            schema = merged
        return schema

    def value(self, schema: Any, draws: _Draws, depth: int = 0, *, free: bool = False) -> Any:
        schema = self._resolve(schema)
        if schema is True or not isinstance(schema, Mapping):
            schema = {}
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[draws.below(len(enum))]
        for keyword in ("anyOf", "oneOf"):
            options = schema.get(keyword)
            if isinstance(options, list) and options:
                rest = {k: v for k, v in schema.items() if k != keyword}
                chosen = self._resolve(options[0])
                merged = {**rest, **chosen} if isinstance(chosen, Mapping) else rest
                return self.value(merged, draws, depth + 1, free=free)
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"] or ["null"]
            kind = kinds[0]
        if not isinstance(kind, str):
            kind = self._infer(schema)
        if depth > _MAX_SCHEMA_DEPTH:
            least = {"object": {}, "array": [], "string": "", "null": None, "boolean": False}
            return least.get(kind, 0)
        method = getattr(self, f"_{kind}", None)
        return method(schema, draws, depth, free) if method is not None else draws.word()

    @staticmethod
    def _infer(schema: Mapping[str, Any]) -> str:
        if any(k in schema for k in ("properties", "required", "additionalProperties")):
            return "object"
        if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
            return "array"
        if any(k in schema for k in ("minimum", "maximum", "multipleOf", "exclusiveMinimum")):
            return "number"
        return "string"

    def _object(self, schema: Mapping[str, Any], draws: _Draws, depth: int, free: bool) -> Any:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, Mapping) else {}
        required = [name for name in schema.get("required") or () if isinstance(name, str)]
        closed = schema.get("additionalProperties") is False
        if free and not properties and not required and not closed:
            return _free_object(draws)
        out: dict[str, Any] = {}
        for name, sub in properties.items():
            if name in required or draws.below(2) == 0:  # optional ones by a coin
                out[name] = self.value(sub, draws.child(name), depth + 1)
        extra = schema.get("additionalProperties")
        for name in required:
            if name not in out:
                sub = extra if isinstance(extra, Mapping) else {}
                out[name] = self.value(sub, draws.child(name), depth + 1)
        least = schema.get("minProperties")
        for name, sub in properties.items():
            if not isinstance(least, int) or len(out) >= least:
                break
            if name not in out:
                out[name] = self.value(sub, draws.child(name), depth + 1)
        return out

    def _array(self, schema: Mapping[str, Any], draws: _Draws, depth: int, free: bool) -> Any:
        least = schema.get("minItems") if isinstance(schema.get("minItems"), int) else 0
        most = schema.get("maxItems") if isinstance(schema.get("maxItems"), int) else None
        low = least if most is not None and most < 1 else max(least, 1)
        high = max(low, 3) if most is None else max(min(most, max(low, 3)), low)
        count = low + draws.below(high - low + 1)
        items = schema.get("items")
        prefix = schema.get("prefixItems")
        if isinstance(items, list):  # the tuple form of drafts 4 to 7
            prefix, items = items, schema.get("additionalItems", {})
        prefix = prefix if isinstance(prefix, list) else []
        if items is None:
            items = {}
        unique = schema.get("uniqueItems") is True
        values: list[Any] = []
        seen: set[str] = set()
        attempt = 0
        while len(values) < count and attempt < count + 16:
            index = len(values)
            sub = prefix[index] if index < len(prefix) else items
            if sub is False:
                break
            place = draws.child(f"{index}.{attempt}" if attempt else str(index))
            value = self.value(sub, place, depth + 1)
            attempt += 1
            marker = _compact(value)
            if unique and marker in seen:
                continue
            seen.add(marker)
            values.append(value)
        return values

    def _string(self, schema: Mapping[str, Any], draws: _Draws, depth: int, free: bool) -> Any:
        kind = schema.get("format")
        text = _string_format(kind, draws) if isinstance(kind, str) else None
        if text is None:
            text = " ".join(draws.word() for _ in range(1 + draws.below(3)))
        least = schema.get("minLength") if isinstance(schema.get("minLength"), int) else 0
        most = schema.get("maxLength") if isinstance(schema.get("maxLength"), int) else None
        while len(text) < least:
            text += " " + draws.word()
        if most is not None and len(text) > most:
            text = text[:most]
            if len(text.rstrip()) >= least:
                text = text.rstrip()
        return text

    def _integer(self, schema: Mapping[str, Any], draws: _Draws, depth: int, free: bool) -> Any:
        low, high = _bounds(schema, integral=True)
        step = schema.get("multipleOf")
        if isinstance(step, int) and not isinstance(step, bool) and step > 0:
            first, last = -(-low // step), high // step
            return step * (first + draws.below(last - first + 1)) if first <= last else step * first
        return low + draws.below(high - low + 1) if low <= high else low

    def _number(self, schema: Mapping[str, Any], draws: _Draws, depth: int, free: bool) -> Any:
        step = schema.get("multipleOf")
        if isinstance(step, (int, float)) and not isinstance(step, bool) and step > 0:
            low, high = _bounds(schema, integral=False)
            first, last = math.ceil(low / step), math.floor(high / step)
            for k in (first + draws.below(max(1, last - first + 1)), first, 0):
                value = k * step
                if low <= value <= high and (value / step) == int(value / step):
                    return value
            return 0
        low, high = _bounds(schema, integral=False)
        if low > high:
            return low
        value = round(low + (high - low) * draws.below(1001) / 1000, 2)
        if not _within(schema, value):
            value = (low + high) / 2
        return value

    @staticmethod
    def _boolean(schema: Mapping[str, Any], draws: _Draws, depth: int, free: bool) -> Any:
        return draws.below(2) == 1

    @staticmethod
    def _null(schema: Mapping[str, Any], draws: _Draws, depth: int, free: bool) -> Any:
        return None


def _number_keyword(schema: Mapping[str, Any], name: str) -> float | None:
    value = schema.get(name)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _bounds(schema: Mapping[str, Any], *, integral: bool) -> tuple[Any, Any]:
    low, high = _number_keyword(schema, "minimum"), _number_keyword(schema, "maximum")
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    nudge = 1 if integral else 0.01
    if ex_low is True and low is not None:  # draft 4: a flag on minimum
        low = low + nudge if integral else low
    elif _number_keyword(schema, "exclusiveMinimum") is not None:
        low = max(low if low is not None else -math.inf, ex_low + nudge)
    if ex_high is True and high is not None:
        high = high - nudge if integral else high
    elif _number_keyword(schema, "exclusiveMaximum") is not None:
        high = min(high if high is not None else math.inf, ex_high - nudge)
    if low is None and high is None:
        low, high = 0, 100
    elif low is None:
        low = high - 100
    elif high is None:
        high = low + 100
    if integral:
        return math.ceil(low), math.floor(high)
    return low, high


def _within(schema: Mapping[str, Any], value: float) -> bool:
    checks = [
        ("minimum", lambda bound: value >= bound),
        ("maximum", lambda bound: value <= bound),
        ("exclusiveMinimum", lambda bound: value > bound),
        ("exclusiveMaximum", lambda bound: value < bound),
    ]
    for name, holds in checks:
        bound = _number_keyword(schema, name)
        if bound is not None and not holds(bound):
            return False
    if schema.get("exclusiveMinimum") is True and value == _number_keyword(schema, "minimum"):
        return False
    if schema.get("exclusiveMaximum") is True and value == _number_keyword(schema, "maximum"):
        return False
    return True


def _free_object(draws: _Draws) -> dict[str, Any]:
    """A small object of the model's choosing (``format: "json"``)."""
    out: dict[str, Any] = {}
    for index in range(2 + draws.below(2)):
        name = draws.word()
        while name in out:
            name += "_" + draws.word()
        kind = (draws.below(3) + index) % 3
        if kind == 0:
            out[name] = " ".join(draws.word() for _ in range(1 + draws.below(3)))
        elif kind == 1:
            out[name] = draws.below(101)
        else:
            out[name] = draws.below(2) == 1
    return out


def value_for_schema(schema: Any, key: str | bytes = b"") -> Any:
    """A JSON value that validates against ``schema``, drawn deterministically
    from ``key``: what the stand-in's models produce for a ``format`` schema
    and for tool arguments. Understands ``type`` (one or a list),
    ``properties``/``required`` (optional properties go in or not by a draw),
    ``items``/``prefixItems``/``minItems``/``maxItems``/``uniqueItems``,
    ``enum``, ``const``, ``anyOf``/``oneOf`` (the first), ``allOf``,
    ``$ref`` into ``$defs``/``definitions``, string ``minLength``/
    ``maxLength``/``format`` (date-time, date, email, uri, uuid...), and
    number bounds and ``multipleOf``. ``pattern`` is not honoured."""
    seed = key if isinstance(key, bytes) else key.encode()
    return _SchemaValues(schema).value(schema, _Draws(blake2b(seed, digest_size=16).digest()))


def _format_value(ask: _Ask, conversation: Prompt) -> Any:
    key = _key(
        [ask.model, _conversation(conversation), -1 if ask.seed is None else ask.seed, "format"],
        b"p2pgpu-format",
    )
    draws = _Draws(key)
    if ask.format == "json":
        return _free_object(draws)
    return _SchemaValues(ask.format).value(ask.format, draws, free=True)


def _tool_name(tool: Mapping[str, Any]) -> str:
    function = tool.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    return name if isinstance(name, str) else ""


def _sorted_keys(value: Any) -> Any:
    # Ollama decodes the arguments into a Go map and encodes them again:
    # keys come out sorted, at every depth.
    if isinstance(value, Mapping):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


def _tool_call(ask: _Ask) -> tuple[dict[str, Any], str] | None:
    """The tool call a chat ending in a user message gets when it offers
    tools: ``(call, text)``, the call in Ollama's shape and the JSON text the
    model "said". The tool is the first whose name the user's message
    contains, else one drawn from the conversation."""
    prompt = ask.prompt
    if not ask.tools or isinstance(prompt, str) or not prompt or prompt[-1].get("role") != "user":
        return None
    seed = -1 if ask.seed is None else ask.seed
    draws = _Draws(_key([ask.model, _conversation(prompt), seed, "tools"], b"p2pgpu-tools"))
    said = (prompt[-1].get("content") or "").lower()
    named = [tool for tool in ask.tools if _tool_name(tool) and _tool_name(tool).lower() in said]
    tool = named[0] if named else ask.tools[draws.below(len(ask.tools))]
    name = _tool_name(tool)
    function = tool.get("function")
    parameters = function.get("parameters") if isinstance(function, Mapping) else None
    if not isinstance(parameters, Mapping):
        parameters = {"type": "object", "properties": {}}
    arguments = _SchemaValues(parameters).value(parameters, draws.child(name))
    if not isinstance(arguments, dict):
        arguments = {}
    text = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    call = {"function": {"index": 0, "name": name, "arguments": _sorted_keys(arguments)}}
    return call, text


# -- the reply, one token at a time -------------------------------------------


def _mention(ask: _Ask, conversation: Prompt) -> list[str]:
    """A vision model says how many images it was shown with the message
    it answers."""
    if isinstance(conversation, str):
        count = len(ask.images)
    elif conversation and conversation[-1].get("role") == "user":
        count = len(conversation[-1].get("images") or ()) + len(ask.images)
    else:
        count = 0
    if not count:
        return []
    return ["I", " see", f" {count}", " image" if count == 1 else " images", ". "]


def _answer(ask: _Ask, conversation: Prompt) -> Iterator[str]:
    """What the model says to ``conversation``, without thinking: JSON for
    a ``format``, else words (after a vision model's ``_mention``)."""
    if ask.format is not None:
        return iter(json_tokens(json.dumps(_format_value(ask, conversation), ensure_ascii=False)))
    images = (*ask.images, *_message_images(conversation))
    words = _token_stream(ask.model, conversation, ask.seed, images)
    return chain(_mention(ask, conversation), words)


def _content_tokens(ask: _Ask) -> Iterator[str]:
    """The answer's tokens. A prefill continues the way greedy decoding
    would: when the prefix is a token-exact start of what the model says
    to the conversation before it, the reply is the rest of that answer
    (so an answer cut short and continued reads as the whole answer);
    any other prefix leads to a reply drawn for the whole chat. A word
    answer ends on its own after ``default_length`` tokens, JSON when it
    is whole."""
    conversation, prefix = split_prefill(ask.prompt)
    stream = _answer(ask, ask.prompt)
    if prefix:
        attempt = _answer(ask, conversation)
        said = ""
        while len(said) < len(prefix) and prefix.startswith(said):  # tokens are non-empty
            token = next(attempt, None)
            if token is None:
                break
            said += token
        if said == prefix:
            stream = attempt
    return stream if ask.format is not None else islice(stream, ask.default_length)


_Emit = tuple[str, Any, int]
"""What goes out after a token: (field, value, tokens it carries); field is
``thinking``, ``content`` or ``tool_calls``."""


class _Decoder:
    """Decodes a reply one token at a time, and says what Ollama streams
    after each: thinking first, then content (held back while it may be the
    start of a stop sequence), or a tool call's JSON, which goes out as one
    ``tool_calls`` chunk once whole."""

    def __init__(self, ask: _Ask) -> None:
        _, prefix = split_prefill(ask.prompt)
        thinking: Iterable[str] = ()
        if ask.think is not None and not prefix:
            key = _key(
                [ask.model, _conversation(ask.prompt), -1 if ask.seed is None else ask.seed],
                b"p2pgpu-think",
            )
            thinking = islice(_words(key), THINKING_TOKENS[ask.think])
        tool = _tool_call(ask)
        self._call, self._call_text = tool if tool is not None else (None, "")
        main: Iterable[tuple[str, str]]
        if self._call is not None:
            main = (("tool", token) for token in json_tokens(self._call_text))
        else:
            main = (("content", token) for token in _content_tokens(ask))
        self._parts = chain((("thinking", token) for token in thinking), main)
        self._next = next(self._parts, None)
        self._stops = ask.stop
        self.decoded = 0
        self.stopped = False  # a stop sequence ended it
        self._pending = ""
        self._pending_tokens = 0
        self._said = ""  # the tool call's JSON so far
        self._said_tokens = 0

    @property
    def exhausted(self) -> bool:
        """The model has nothing more to say (it would emit EOS next)."""
        return self._next is None

    @property
    def tail(self) -> str:
        """Content for the final chunk: a tool call cut short, as text."""
        return self._said if self._said != self._call_text else ""

    def step(self) -> list[_Emit]:
        assert self._next is not None and not self.stopped
        kind, token = self._next
        self._next = next(self._parts, None)
        self.decoded += 1
        if kind == "thinking":
            return [("thinking", token, 1)]
        if kind == "tool":
            self._said += token
            self._said_tokens += 1
            if self._said == self._call_text:
                return [("tool_calls", [self._call], self._said_tokens)]
            return []
        self._pending += token
        self._pending_tokens += 1
        if self._stops:
            found = [i for i in (self._pending.find(stop) for stop in self._stops) if i >= 0]
            if found:
                self.stopped = True
                self._next = None
                text, count = self._pending[: min(found)], self._pending_tokens
                self._pending, self._pending_tokens = "", 0
                return [("content", text, count)] if text else []
            if any(
                self._pending.endswith(stop[:cut])
                for stop in self._stops
                for cut in range(1, len(stop))
            ):
                return []
        return self.flush()

    def flush(self) -> list[_Emit]:
        """Content held back, once nothing more can complete a stop sequence."""
        if not self._pending:
            return []
        emit = [("content", self._pending, self._pending_tokens)]
        self._pending, self._pending_tokens = "", 0
        return emit


def _cap(num_predict: int | None) -> int | None:
    # Ollama stops for length when numPredict > 0 and that many tokens are out;
    # zero and negative values (-1 infinite, -2 fill context) mean no cap.
    return num_predict if num_predict is not None and num_predict > 0 else None


def _ended(decoder: _Decoder, cap: int | None) -> str | None:
    """Why the reply ends before the next token, if it does: a stop
    sequence, then ``num_predict``, then the model's own end (checked in
    that order, as Ollama's runner does)."""
    if decoder.stopped:
        return "stop"
    if cap is not None and decoder.decoded >= cap:
        return "length"
    if decoder.exhausted:
        return "stop"
    return None


def _simulate(ask: _Ask, num_predict: int | None) -> Completion:
    decoder = _Decoder(ask)
    cap = _cap(num_predict)
    out: dict[str, list[Any]] = {"thinking": [], "content": [], "tool_calls": []}
    while (reason := _ended(decoder, cap)) is None:
        for name, value, _ in decoder.step():
            out[name].extend(value if name == "tool_calls" else [value])
    for name, value, _ in decoder.flush():
        out[name].append(value)
    return Completion(
        tokens=tuple(out["content"]),
        done_reason=reason,
        prompt_eval_count=_prompt_eval_count(ask),
        thinking=tuple(out["thinking"]),
        tool_calls=tuple(out["tool_calls"]),
        tail=decoder.tail,
        eval_count=decoder.decoded,
    )


def expected_completion(
    model: str,
    prompt: Prompt,
    seed: int | None = None,
    num_predict: int | None = None,
    *,
    default_length: int = DEFAULT_NUM_PREDICT,
    think: bool | str | None = None,
    format: Any = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    stop: Sequence[str] | None = None,
    temperature: float | None = None,
    images: Sequence[str | bytes] = (),
) -> Completion:
    """The reply a stand-in gives, computed without one.

    ``prompt`` is the generate ``prompt``, or the chat ``messages``. A generate
    request with a ``system`` field reads as the messages
    ``[{"role": "system", ...}, {"role": "user", "content": prompt}]``.
    ``seed`` ``None`` and ``-1`` are the same (Ollama's "no seed"), and
    ``temperature`` 0 ignores the seed (greedy: the no-seed reply).
    ``default_length`` must match the stand-in's (``OllamaStandin.default_length``).
    The rest are the request's fields as sent: ``think`` (``None`` when not
    sent), ``format``, ``tools`` (chat only), ``options.stop``, and a
    generate request's ``images`` (base64 text or bytes; a chat's images are
    in its messages). What the model cannot do (think, see) it does not;
    the stand-in would refuse what Ollama refuses, this does not check.
    """
    ask = _make_ask(
        model_card(model),
        prompt,
        seed=seed,
        temperature=temperature,
        think=think,
        format=format,
        tools=tools,
        stop=stop,
        images=images,
        default_length=default_length,
    )
    return _simulate(ask, num_predict)


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


def expected_tool_call(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]],
    seed: int | None = None,
    *,
    temperature: float | None = None,
) -> dict[str, Any] | None:
    """The tool call (``{"function": {"index": 0, "name", "arguments"}}``)
    a chat of ``messages`` offering ``tools`` gets, or ``None`` when it gets
    none (its last message is not the user's, or no tools)."""
    ask = _make_ask(model_card(model), messages, seed=seed, temperature=temperature, tools=tools)
    call = _tool_call(ask)
    return call[0] if call is not None else None


def expected_embedding(model: str, text: str, dimensions: int | None = None) -> list[float]:
    """The L2-normalised vector ``/api/embed`` returns for one input: as long
    as the model's ``embedding_length`` (768 unless the name says otherwise).

    ``dimensions`` below that truncates and re-normalises, as Ollama does.
    """
    key = blake2b(
        json.dumps([normalize_model_name(model), text], ensure_ascii=False).encode(),
        digest_size=16,
        person=b"p2pgpu-embed",
    ).digest()
    values: list[float] = []
    for block in range(embedding_length(model) // 4):
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

    endpoint: str  # "generate" or "chat" (also for /v1/completions, /v1/chat/completions)
    model: str  # normalised name
    outcome: Outcome
    tokens_generated: int  # tokens decoded (paced) before it ended
    tokens_sent: int  # tokens whose text went out in chunks (streaming only)


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
_INT = ((int,), "int")
_FLOAT64 = ((int, float), "float64")
_FLOAT32 = ((int, float), "float32")

_GENERATE_FIELDS: Final = {
    "model": _STRING, "prompt": _STRING, "suffix": _STRING, "system": _STRING,
    "template": _STRING, "raw": _BOOL, "stream": _BOOL, "options": _OBJECT,
    "images": ((list,), "[]api.ImageData"), "context": ((list,), "[]int"),
    "truncate": _BOOL, "shift": _BOOL,
}  # fmt: skip
_CHAT_FIELDS: Final = {
    "model": _STRING, "messages": ((list,), "[]api.Message"), "stream": _BOOL,
    "options": _OBJECT, "tools": ((list,), "api.Tools"), "truncate": _BOOL, "shift": _BOOL,
}  # fmt: skip
_SHOW_FIELDS: Final = {"model": _STRING, "name": _STRING, "verbose": _BOOL}
_EMBED_FIELDS: Final = {
    "model": _STRING, "truncate": _BOOL, "options": _OBJECT, "dimensions": _INT,
}  # fmt: skip
_EMBEDDINGS_FIELDS: Final = {"model": _STRING, "prompt": _STRING, "options": _OBJECT}
_OPENAI_CHAT_FIELDS: Final = {
    "model": _STRING, "messages": ((list,), "[]openai.Message"), "stream": _BOOL,
    "stream_options": ((dict,), "openai.StreamOptions"), "max_tokens": _INT, "seed": _INT,
    "temperature": _FLOAT64, "frequency_penalty": _FLOAT64, "presence_penalty": _FLOAT64,
    "top_p": _FLOAT64, "response_format": ((dict,), "openai.ResponseFormat"),
    "tools": ((list,), "[]api.Tool"), "reasoning": ((dict,), "openai.Reasoning"),
    "reasoning_effort": _STRING,
}  # fmt: skip
_OPENAI_COMPLETION_FIELDS: Final = {
    "model": _STRING, "prompt": _STRING, "frequency_penalty": _FLOAT32, "max_tokens": _INT,
    "presence_penalty": _FLOAT32, "seed": _INT, "stream": _BOOL,
    "stream_options": ((dict,), "openai.StreamOptions"), "temperature": _FLOAT32,
    "top_p": _FLOAT32, "suffix": _STRING,
}  # fmt: skip
_OPENAI_EMBED_FIELDS: Final = {"model": _STRING, "dimensions": _INT}


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
        package = struct.split(".", 1)[0] if "." in struct else "api"
        name = struct.rsplit(".", 1)[-1]
        raise _Refusal(400, f"json: cannot unmarshal {kind} into Go value of type {package}.{name}")
    _check_fields(body, struct.rsplit(".", 1)[-1], fields)
    return body


def _check_fields(body: Mapping[str, Any], where: str, fields: _FieldTypes) -> None:
    for name, (types, go_type) in fields.items():
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise _Refusal(400, _unmarshal_error(value, f"{where}.{name}", go_type))


def _unmarshal_error(value: Any, where: str, go_type: str) -> str:
    kind = _json_kind(value)
    if kind == "number" and go_type in ("int", "[]int"):  # a fraction for an int
        kind = f"number {json.dumps(value)}"
    return f"json: cannot unmarshal {kind} into Go struct field {where} of type {go_type}"


def _go_type(value: Any) -> str:
    """``%T`` of a value Go decoded into ``any``."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    return "map[string]interface {}"


_BASE64_ALPHABET: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
)


def _base64_error_at(text: str) -> int | None:
    """Where Go's ``base64.StdEncoding`` finds ``text`` corrupt (the byte
    offset its ``CorruptInputError`` reports), or ``None`` when it decodes.
    Newlines are skipped, padding is required, as in Go."""
    src = text.encode()
    end, at = len(src), 0
    newline = (0x0A, 0x0D)
    while True:
        have = 0
        while have < 4:
            if at == end:
                return None if have == 0 else at - have
            byte = src[at]
            at += 1
            if byte in _BASE64_ALPHABET:
                have += 1
                continue
            if byte in newline:
                continue
            if byte != ord("=") or have < 2:
                return at - 1
            if have == 2:  # "==" expected, the first is read
                while at < end and src[at] in newline:
                    at += 1
                if at == end:
                    return end
                if src[at] != ord("="):
                    return at - 1
                at += 1
            while at < end and src[at] in newline:
                at += 1
            return at if at < end else None


def _check_images(images: Any, where: str) -> list[str]:
    """``[]api.ImageData``: base64 text that Go's decoder accepts."""
    if images is None:
        return []
    if not isinstance(images, list):
        raise _Refusal(400, _unmarshal_error(images, where, "[]api.ImageData"))
    for image in images:
        if image is None:
            continue
        if not isinstance(image, str):
            raise _Refusal(400, _unmarshal_error(image, where, "api.ImageData"))
        offset = _base64_error_at(image)
        if offset is not None:
            raise _Refusal(400, f"illegal base64 data at input byte {offset}")
    return [image for image in images if image is not None]


def _check_tool_calls(calls: Any, where: str) -> None:
    if calls is None:
        return
    if not isinstance(calls, list):
        raise _Refusal(400, _unmarshal_error(calls, where, "[]api.ToolCall"))
    for call in calls:
        if not isinstance(call, dict):
            raise _Refusal(400, _unmarshal_error(call, where, "api.ToolCall"))
        function = call.get("function")
        if function is None:
            continue
        if not isinstance(function, dict):
            error = _unmarshal_error(function, f"{where}.function", "api.ToolCallFunction")
            raise _Refusal(400, error)
        _check_fields(
            function,
            f"{where}.function",
            {
                "name": _STRING,
                "index": _INT,
                "arguments": ((dict,), "api.ToolCallFunctionArguments"),
            },
        )


def _check_messages(messages: list[Any]) -> list[dict[str, Any]]:
    for message in messages:
        if not isinstance(message, dict):
            kind = _json_kind(message)
            raise _Refusal(400, f"json: cannot unmarshal {kind} into Go value of type api.Message")
        for name in ("role", "content", "thinking", "tool_name"):
            value = message.get(name)
            if value is not None and not isinstance(value, str):
                where = f"ChatRequest.messages.{name}"
                raise _Refusal(400, _unmarshal_error(value, where, "string"))
        _check_images(message.get("images"), "ChatRequest.messages.images")
        _check_tool_calls(message.get("tool_calls"), "ChatRequest.messages.tool_calls")
    return messages


def _check_tools(tools: Any, struct: str = "ChatRequest") -> list[dict[str, Any]]:
    """``api.Tools``, as far as Go's decoder checks it."""
    where = f"{struct}.tools"
    if tools is None:
        return []
    for tool in tools:
        if not isinstance(tool, dict):
            raise _Refusal(400, _unmarshal_error(tool, where, "api.Tool"))
        _check_fields(tool, where, {"type": _STRING, "function": ((dict,), "api.ToolFunction")})
        function = tool.get("function") or {}
        _check_fields(
            function,
            f"{where}.function",
            {
                "name": _STRING,
                "description": _STRING,
                "parameters": ((dict,), "api.ToolFunctionParameters"),
            },
        )
        parameters = function.get("parameters") or {}
        place = f"{where}.function.parameters"
        _check_fields(
            parameters,
            place,
            {
                "type": _STRING,
                "required": ((list,), "[]string"),
                "properties": ((dict,), "map[string]api.ToolProperty"),
            },
        )
        for name in parameters.get("required") or ():
            if not isinstance(name, str):
                raise _Refusal(400, _unmarshal_error(name, f"{place}.required", "string"))
        for prop in (parameters.get("properties") or {}).values():
            if prop is None:
                continue
            if not isinstance(prop, dict):
                error = _unmarshal_error(prop, f"{place}.properties", "api.ToolProperty")
                raise _Refusal(400, error)
            kind = prop.get("type")
            if kind is not None and not isinstance(kind, str) and not (
                isinstance(kind, list) and all(isinstance(k, str) for k in kind)
            ):
                # api.PropertyType: a string, else a list of strings
                if isinstance(kind, list):
                    bad, go_type = next(k for k in kind if not isinstance(k, str)), "string"
                else:
                    bad, go_type = kind, "[]string"
                error = f"json: cannot unmarshal {_json_kind(bad)} into Go value of type {go_type}"
                raise _Refusal(400, error)
    return tools


def _check_think(body: Mapping[str, Any]) -> None:
    """``api.ThinkValue``'s own decoding: a bool or a level."""
    think = body.get("think")
    if think is None or isinstance(think, bool):
        return
    if isinstance(think, str):
        if think not in THINK_LEVELS:
            raise _Refusal(
                400,
                f"invalid think value: {json.dumps(think, ensure_ascii=False)} "
                '(must be "high", "medium", "low", true, or false)',
            )
        return
    raise _Refusal(
        400, 'think must be a boolean or string ("high", "medium", "low", true, or false)'
    )


def _check_format(value: Any) -> None:
    """What the runner makes of ``format`` (a 500, as Ollama reports it)."""
    if value is None or value in ("", "json") or isinstance(value, dict):
        return
    raw = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    raise _Refusal(
        500,
        f'invalid format: {json.dumps(raw, ensure_ascii=False)}; '
        'expected "json" or a valid JSON Schema object',
    )


_OPTION_KINDS: Final = {
    **dict.fromkeys(
        ("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch",
         "num_gpu", "main_gpu", "num_thread"),
        "integer",
    ),
    **dict.fromkeys(
        ("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
         "frequency_penalty"),
        "float32",
    ),
    "stop": "array",
    "use_mmap": "boolean",
}  # fmt: skip
"""Ollama 0.12.6's ``api.Options`` (and ``api.Runner``), by JSON name; others
are ignored, as Ollama ignores them (with a warning in its log)."""


@dataclass(frozen=True, slots=True)
class _Options:
    seed: int | None = None
    num_predict: int | None = None
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    num_ctx: int | None = None


def _parse_options(options: Mapping[str, Any]) -> _Options:
    """Ollama's ``Options.FromMap``: a value of the wrong type is an error,
    which the scheduler answers with a 500. Numbers are JSON numbers to Go:
    an integer option takes ``2.7`` as 2."""
    values: dict[str, Any] = {}
    for key, value in options.items():
        kind = _OPTION_KINDS.get(key)
        if kind is None or value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind == "integer":
            if not number:
                raise _Refusal(500, f'option "{key}" must be of type integer')
            values[key] = int(value)
        elif kind == "float32":
            if not number:
                raise _Refusal(500, f'option "{key}" must be of type float32')
            values[key] = float(value)
        elif kind == "array":
            if not isinstance(value, list):
                raise _Refusal(500, f'option "{key}" must be of type array')
            if not all(isinstance(item, str) for item in value):
                raise _Refusal(500, f'option "{key}" must be of an array of strings')
            values[key] = tuple(value)
        elif not isinstance(value, bool):
            raise _Refusal(500, f'option "{key}" must be of type boolean')
    return _Options(
        seed=values.get("seed"),
        num_predict=values.get("num_predict"),
        temperature=values.get("temperature"),
        stop=values.get("stop", ()),
        num_ctx=values.get("num_ctx"),
    )


def _keep_alive(body: Mapping[str, Any]) -> float | None:
    try:
        return parse_keep_alive(body.get("keep_alive"))
    except ValueError as exc:  # part of decoding the body in Go: a 400
        raise _Refusal(400, str(exc)) from exc


def _think_requested(think: Any) -> bool:
    # api.ThinkValue.Bool(): true, or a level, means thinking.
    return think is True or think in THINK_LEVELS


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _json_response(value: Any, status: int = 200) -> Response:
    return Response(_dumps(value), status_code=status, media_type="application/json; charset=utf-8")


def _error(status: int, message: str) -> Response:
    return _json_response({"error": message}, status)


_OPENAI_ERROR_TYPES: Final = {400: "invalid_request_error", 404: "not_found_error"}
_JSON_HEADER: Final = {"content-type": "application/json"}


def _openai_error_body(status: int, message: str, *, typed: bool) -> bytes:
    error_type = _OPENAI_ERROR_TYPES.get(status, "api_error") if typed else "api_error"
    error = {"message": message, "type": error_type, "param": None, "code": None}
    return _dumps({"error": error})


def _openai_error(status: int, message: str, *, typed: bool = False) -> Response:
    """An error on a ``/v1`` route. Ollama's middleware refuses a request it
    cannot translate with a type that follows the status (``typed``); an
    error from the native handler behind it passes through the middleware's
    writer, which always says ``api_error`` (status unchanged)."""
    if typed:
        body = _openai_error_body(status, message, typed=True)
        return Response(body, status_code=status, media_type="application/json; charset=utf-8")
    body = _openai_error_body(status, message, typed=False) + b"\n"
    return Response(body, status_code=status, headers=_JSON_HEADER)


class _OpenAIRefusal(_Refusal):
    """A ``/v1`` request Ollama's OpenAI middleware refuses itself."""

    def response(self) -> Response:
        return _openai_error(self.status, self.message, typed=True)


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _check_stream_options(body: Mapping[str, Any], struct: str) -> None:
    options = body.get("stream_options")
    if isinstance(options, dict):
        _check_fields(options, f"{struct}.stream_options", {"include_usage": _BOOL})


def _from_openai_tool_calls(calls: Any) -> list[dict[str, Any]]:
    """OpenAI tool calls (``arguments`` as JSON text) as Ollama's."""
    out = []
    for call in calls or ():
        function = call.get("function") if isinstance(call, dict) else None
        function = function if isinstance(function, dict) else {}
        arguments = function.get("arguments")
        try:
            decoded = json.loads(arguments) if isinstance(arguments, str) else None
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict) and decoded is not None:
            decoded = None
        if decoded is None and arguments != "null":
            raise _OpenAIRefusal(400, "invalid tool call arguments")
        out.append({"function": {"name": function.get("name") or "", "arguments": decoded or {}}})
    return out


_DATA_URI_PREFIXES: Final = tuple(
    f"data:image/{kind};base64," for kind in ("jpeg", "jpg", "png", "webp")
)


def _from_openai_image(part: Mapping[str, Any]) -> str:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise _OpenAIRefusal(400, "invalid message format")
    for prefix in ("data:;base64,", *_DATA_URI_PREFIXES):
        if url.startswith(prefix):
            data = url[len(prefix) :]
            break
    else:
        raise _OpenAIRefusal(400, "invalid image input")
    if _base64_error_at(data) is not None:
        raise _OpenAIRefusal(400, "invalid message format")
    return data


def _from_openai_messages(given: list[Any]) -> list[dict[str, Any]]:
    """Ollama's ``openai.FromChatRequest`` for the messages: each text or
    image part of a message becomes a message of its own."""
    where = "ChatCompletionRequest.messages"
    ids: dict[Any, str] = {}  # tool call id -> the tool's name
    for message in given:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                ids[call.get("id")] = call["function"].get("name") or ""
    messages: list[dict[str, Any]] = []
    for message in given:
        if not isinstance(message, dict):
            raise _OpenAIRefusal(400, _unmarshal_error(message, where, "openai.Message"))
        _check_fields(
            message,
            where,
            {
                "role": _STRING, "name": _STRING, "tool_call_id": _STRING, "reasoning": _STRING,
                "tool_calls": ((list,), "[]openai.ToolCall"),
            },
        )  # fmt: skip
        role = message.get("role") or ""
        tool_name = ""
        if role.lower() == "tool":
            tool_name = message.get("name") or ids.get(message.get("tool_call_id"), "") or ""
        reasoning = message.get("reasoning") or ""
        content = message.get("content")
        given_calls = message.get("tool_calls")
        extras: dict[str, Any] = {}
        if reasoning:
            extras["thinking"] = reasoning
        if tool_name:
            extras["tool_name"] = tool_name
        if isinstance(content, str):
            calls = _from_openai_tool_calls(given_calls)
            if calls:
                extras["tool_calls"] = calls
            messages.append({"role": role, "content": content, **extras})
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise _OpenAIRefusal(400, "invalid message format")
                if part.get("type") == "text":
                    if not isinstance(part.get("text"), str):
                        raise _OpenAIRefusal(400, "invalid message format")
                    messages.append({"role": role, "content": part["text"]})
                elif part.get("type") == "image_url":
                    image = _from_openai_image(part)
                    messages.append({"role": role, "content": "", "images": [image]})
                else:
                    raise _OpenAIRefusal(400, "invalid message format")
            if messages and given_calls:
                calls = _from_openai_tool_calls(given_calls)
                messages[-1].update(tool_calls=calls, **extras)
        else:
            if given_calls is None:  # content may be missing only beside tool calls
                raise _OpenAIRefusal(400, f"invalid message content type: {_go_type(content)}")
            calls = _from_openai_tool_calls(given_calls)
            thinking = {"thinking": reasoning} if reasoning else {}
            messages.append({"role": role, "content": "", **thinking, "tool_calls": calls})
    return messages


def _openai_options(body: Mapping[str, Any], *, chat: bool) -> dict[str, Any]:
    options: dict[str, Any] = {}
    stop = body.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list):
        if not chat:
            for item in stop:
                if not isinstance(item, str):
                    raise _OpenAIRefusal(400, f"invalid type for 'stop' field: {_go_type(item)}")
        options["stop"] = [item for item in stop if isinstance(item, str)]
    if body.get("max_tokens") is not None:
        options["num_predict"] = body["max_tokens"]
    temperature = body.get("temperature")
    options["temperature"] = 1.0 if temperature is None else temperature
    if body.get("seed") is not None:
        options["seed"] = body["seed"]
    if chat:
        for name in ("frequency_penalty", "presence_penalty"):
            if body.get(name) is not None:
                options[name] = body[name]
        options["top_p"] = 1.0 if body.get("top_p") is None else body["top_p"]
    else:
        options["frequency_penalty"] = body.get("frequency_penalty") or 0.0
        options["presence_penalty"] = body.get("presence_penalty") or 0.0
        options["top_p"] = body.get("top_p") or 1.0
    return options


def _from_openai_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """Ollama's ``openai.FromChatRequest``: the native chat request a
    ``/v1/chat/completions`` body becomes (``_OpenAIRefusal`` if it cannot)."""
    _check_stream_options(body, "ChatCompletionRequest")
    given = body.get("messages") or []
    if not given:
        raise _OpenAIRefusal(400, "[] is too short - 'messages'")
    tools = body.get("tools")
    try:
        _check_tools(tools, "ChatCompletionRequest")
    except _Refusal as refusal:
        raise _OpenAIRefusal(refusal.status, refusal.message) from refusal
    messages = _from_openai_messages(given)
    native: dict[str, Any] = {
        "model": body.get("model") or "",
        "messages": messages,
        "options": _openai_options(body, chat=True),
        "stream": body.get("stream") is True,
    }
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        kind = str(response_format.get("type") or "").strip().lower()
        schema = response_format.get("json_schema")
        if kind == "json_object":
            native["format"] = "json"
        elif kind == "json_schema" and isinstance(schema, dict):
            if schema.get("schema") is not None:
                native["format"] = schema["schema"]
    if tools:
        native["tools"] = tools
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict):
        effort = reasoning.get("effort")
    else:
        effort = body.get("reasoning_effort")
    if effort:
        if effort not in ("high", "medium", "low", "none"):
            raise _OpenAIRefusal(
                400,
                f"invalid reasoning value: '{effort}' "
                '(must be "high", "medium", "low", or "none")',
            )
        native["think"] = False if effort == "none" else effort
    return native


def _from_openai_completion(body: Mapping[str, Any]) -> dict[str, Any]:
    """Ollama's ``openai.FromCompleteRequest``: the native generate request
    a ``/v1/completions`` body becomes."""
    _check_stream_options(body, "CompletionRequest")
    return {
        "model": body.get("model") or "",
        "prompt": body.get("prompt") or "",
        "options": _openai_options(body, chat=False),
        "stream": body.get("stream") is True,
        "suffix": body.get("suffix") or "",
    }



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

    endpoint: str  # "generate" or "chat": the native handler that runs it
    requested_model: str  # echoed back as given, like Ollama
    card: ModelCard
    ask: _Ask  # what the reply is a function of
    cap: int | None  # num_predict, when it caps the reply
    prompt_eval_count: int
    stream: bool
    keep_alive: float | None
    with_context: bool  # generate's final "context" (not for chat, nor raw)
    fault: _RunnerFault | None
    started: float  # trio clock at request receipt
    wire: _Wire


@dataclass(slots=True)
class _Summary:
    """How a generation ended, for its final chunk or whole reply."""

    done_reason: str
    content: str  # streamed: the final chunk's content; whole: all of it
    thinking: str  # whole replies only
    tool_calls: list[dict[str, Any]]  # whole replies only
    metrics: dict[str, int]
    context: list[int] | None = None


class _Wire:
    """How one API puts a generation's chunks on the wire."""

    stream_media = b"application/x-ndjson"
    json_media = b"application/json; charset=utf-8"

    def __init__(self, endpoint: str, model: str) -> None:
        self.endpoint = endpoint
        self.model = model

    def chunk(self, name: str, value: Any) -> bytes:
        """One streamed chunk: ``name`` is thinking, content or tool_calls."""
        raise NotImplementedError

    def final(self, summary: _Summary) -> bytes:
        """What a stream ends with."""
        raise NotImplementedError

    def whole(self, summary: _Summary) -> bytes:
        """A reply that is not streamed."""
        raise NotImplementedError

    def error_line(self, message: str) -> bytes:
        """What ends a stream an error cut short."""
        raise NotImplementedError

    def error_body(self, status: int, message: str) -> bytes:
        raise NotImplementedError

    def refusal(self, refusal: _Refusal) -> Response:
        return refusal.response()

    def done_without_reply(self, reason: str, stream: bool) -> Response:
        """Loading (``load``) or unloading (``unload``): one object."""
        raise NotImplementedError


class _NativeWire(_Wire):
    """``/api/generate`` and ``/api/chat``: NDJSON."""

    def _reply(
        self, content: str = "", thinking: str = "", tool_calls: list[Any] | None = None
    ) -> dict[str, Any]:
        reply: dict[str, Any] = {"model": self.model, "created_at": _rfc3339(time.time())}
        if self.endpoint == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            reply["message"] = message
        else:
            reply["response"] = content
            if thinking:
                reply["thinking"] = thinking
        reply["done"] = False
        return reply

    def _final(self, summary: _Summary) -> dict[str, Any]:
        final = self._reply(summary.content, summary.thinking, summary.tool_calls)
        final["done"] = True
        final["done_reason"] = summary.done_reason
        if summary.context is not None:
            final["context"] = summary.context
        final.update(summary.metrics)
        return final

    def chunk(self, name: str, value: Any) -> bytes:
        return _dumps(self._reply(**{name: value})) + b"\n"

    def final(self, summary: _Summary) -> bytes:
        return _dumps(self._final(summary)) + b"\n"

    def whole(self, summary: _Summary) -> bytes:
        return _dumps(self._final(summary))

    def error_line(self, message: str) -> bytes:
        return _dumps({"error": message}) + b"\n"

    def error_body(self, status: int, message: str) -> bytes:
        return _dumps({"error": message})

    def done_without_reply(self, reason: str, stream: bool) -> Response:
        reply = self._reply()
        reply.update(done=True, done_reason=reason)
        return _json_response(reply)


def _sse(value: Any) -> bytes:
    return b"data: " + _dumps(value) + b"\n\n"


_SSE_DONE: Final = b"data: [DONE]\n\n"


def _usage(summary: _Summary) -> dict[str, int]:
    prompt = summary.metrics.get("prompt_eval_count", 0)
    completion = summary.metrics.get("eval_count", 0)
    total = prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


class _OpenAIWire(_Wire):
    """The ``/v1`` routes: what Ollama's OpenAI middleware makes of the
    native handler's chunks (SSE when streaming, ``data: [DONE]`` last)."""

    stream_media = b"text/event-stream"
    json_media = b"application/json"

    def __init__(self, endpoint: str, model: str, reply_id: str, include_usage: bool) -> None:
        super().__init__(endpoint, model)
        self.reply_id = reply_id
        self.include_usage = include_usage
        self.tool_call_sent = False

    def refusal(self, refusal: _Refusal) -> Response:
        return refusal.response() if isinstance(refusal, _OpenAIRefusal) else _openai_error(
            refusal.status, refusal.message
        )

    def error_line(self, message: str) -> bytes:
        # The middleware reads the error line as a chunk with nothing in it,
        # and the stream ends there, without [DONE].
        return self.chunk("content", "", model="")

    def error_body(self, status: int, message: str) -> bytes:
        return _openai_error_body(status, message, typed=False) + b"\n"


class _OpenAIChatWire(_OpenAIWire):
    def _message(
        self, content: str = "", thinking: str = "", tool_calls: list[Any] | None = None
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["reasoning"] = thinking
        if tool_calls:
            message["tool_calls"] = [_openai_tool_call(self.reply_id, call) for call in tool_calls]
        return message

    def _chunk(
        self, delta: dict[str, Any], finish_reason: str | None, model: str
    ) -> dict[str, Any]:
        return {
            "id": self.reply_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    def chunk(self, name: str, value: Any, *, model: str | None = None) -> bytes:
        if name == "tool_calls":
            self.tool_call_sent = True
        delta = self._message(**{name: value})
        return _sse(self._chunk(delta, None, self.model if model is None else model))

    def final(self, summary: _Summary) -> bytes:
        reason = "tool_calls" if self.tool_call_sent else summary.done_reason
        chunk = self._chunk(self._message(summary.content), reason, self.model)
        out = _sse(chunk)
        if self.include_usage:
            chunk["choices"] = []
            chunk["usage"] = _usage(summary)
            out += _sse(chunk)
        return out + _SSE_DONE

    def whole(self, summary: _Summary) -> bytes:
        reason = "tool_calls" if summary.tool_calls else summary.done_reason
        reply = {
            "id": self.reply_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [
                {
                    "index": 0,
                    "message": self._message(summary.content, summary.thinking, summary.tool_calls),
                    "finish_reason": reason or None,
                }
            ],
            "usage": _usage(summary),
        }
        return _dumps(reply) + b"\n"


class _OpenAICompletionWire(_OpenAIWire):
    def _chunk(self, text: str, finish_reason: str | None, model: str) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.reply_id,
            "object": "text_completion",
            "created": int(time.time()),
            "choices": [{"text": text, "index": 0, "finish_reason": finish_reason}],
            "model": model,
            "system_fingerprint": "fp_ollama",
        }
        if self.include_usage:  # Ollama's middleware puts a zero usage on every chunk
            chunk["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return chunk

    def chunk(self, name: str, value: Any, *, model: str | None = None) -> bytes:
        text = value if name == "content" else ""  # thinking: a chunk without text
        return _sse(self._chunk(text, None, self.model if model is None else model))

    def final(self, summary: _Summary) -> bytes:
        chunk = self._chunk(summary.content, summary.done_reason or None, self.model)
        out = _sse(chunk)
        if self.include_usage:
            chunk["choices"] = []
            chunk["usage"] = _usage(summary)
            out += _sse(chunk)
        return out + _SSE_DONE

    def whole(self, summary: _Summary) -> bytes:
        reply = {
            "id": self.reply_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [
                {"text": summary.content, "index": 0, "finish_reason": summary.done_reason or None}
            ],
            "usage": _usage(summary),
        }
        return _dumps(reply) + b"\n"

    def done_without_reply(self, reason: str, stream: bool) -> Response:
        summary = _Summary(reason, "", "", [], {})
        if stream:
            return Response(self.final(summary), headers={"content-type": "text/event-stream"})
        return Response(self.whole(summary), headers={"content-type": "application/json"})


_CALL_ID_LETTERS: Final = "abcdefghijklmnopqrstuvwxyz0123456789"


def _openai_tool_call(reply_id: str, call: Mapping[str, Any]) -> dict[str, Any]:
    """A native tool call in OpenAI's shape: ``arguments`` as JSON text (Go
    encodes the map: keys sorted), and an ``id`` like Ollama's ``call_``
    plus eight letters or digits (drawn from the call, not at random)."""
    function = call.get("function") or {}
    arguments = _compact(function.get("arguments") or {})
    material = f"{reply_id}\n{function.get('name')}\n{arguments}".encode()
    digest = blake2b(material, digest_size=8).digest()
    letters = "".join(_CALL_ID_LETTERS[byte % len(_CALL_ID_LETTERS)] for byte in digest)
    return {
        "id": f"call_{letters}",
        "index": function.get("index", 0),
        "type": "function",
        "function": {"name": function.get("name") or "", "arguments": arguments},
    }



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
        self._openai_replies = 0

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
        self,
        model: str,
        prompt: Prompt,
        seed: int | None = None,
        num_predict: int | None = None,
        **request: Any,
    ) -> Completion:
        """``expected_completion`` with this stand-in's ``default_length``
        (``request``: its keyword arguments, ``think``, ``format``...)."""
        return expected_completion(
            model, prompt, seed, num_predict, default_length=self.default_length, **request
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
            Route("/v1/chat/completions", self._openai_chat, methods=["POST"]),
            Route("/v1/completions", self._openai_completion, methods=["POST"]),
            Route("/v1/embeddings", self._openai_embeddings, methods=["POST"]),
            Route("/v1/models", self._openai_models, methods=["GET"]),
            Route("/v1/models/{model}", self._openai_retrieve, methods=["GET"]),
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
        except _Refusal as refusal:
            return refusal.response()
        wire = _NativeWire("generate", body.get("model") or "")
        return await self._run_generate(body, started, wire)

    async def _chat(self, request: Request) -> Response:
        started = trio.current_time()
        try:
            body = await self._read(request, "ChatRequest", _CHAT_FIELDS)
        except _Refusal as refusal:
            return refusal.response()
        wire = _NativeWire("chat", body.get("model") or "")
        return await self._run_chat(body, started, wire)

    async def _run_generate(self, body: dict[str, Any], started: float, wire: _Wire) -> Response:
        """Ollama's GenerateHandler, in its order of checks."""
        try:
            _check_think(body)
            images = _check_images(body.get("images"), "GenerateRequest.images")
            keep_alive = _keep_alive(body)
            requested, card = self._model(body)
            prompt: str = body.get("prompt") or ""
            if not prompt and keep_alive == 0:
                self._unload(card.name)
                return wire.done_without_reply("unload", body.get("stream") is not False)
            system = body.get("system") or ""
            if body.get("raw") and (body.get("template") or system or body.get("context")):
                raise _Refusal(400, "raw mode does not support template, system, or context")
            think = body.get("think")
            if isinstance(think, str) and not _HARMONY_NAMES.search(card.name):
                raise _Refusal(400, f'think value "{think}" is not supported for this model')
            suffix = body.get("suffix") or ""
            if "thinking" not in card.capabilities and _think_requested(think):
                raise _Refusal(400, f'"{requested}" does not support thinking')
            wanted = ["completion", *(["insert"] if suffix else [])]
            options = self._schedule(requested, card, "generate", wanted, body)
            if not prompt:
                await self._load_and_release(card, keep_alive)
                return wire.done_without_reply("load", body.get("stream") is not False)
            read: Prompt = prompt
            if suffix:  # fill-in-the-middle, as codellama's template puts it
                read = f"<PRE> {prompt} <SUF>{suffix} <MID>"
            elif system:
                read = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
            _check_format(body.get("format"))
            job = self._job(
                "generate", requested, card, read, body, options, keep_alive, started, wire,
                images=images, with_context=not body.get("raw"),
            )  # fmt: skip
        except _Refusal as refusal:
            return wire.refusal(refusal)
        return _GenerationResponse(self, job)

    async def _run_chat(self, body: dict[str, Any], started: float, wire: _Wire) -> Response:
        """Ollama's ChatHandler, in its order of checks."""
        try:
            _check_think(body)
            messages = _check_messages(body.get("messages") or [])
            tools = _check_tools(body.get("tools"))
            keep_alive = _keep_alive(body)
            requested, card = self._model(body)
            if not messages and keep_alive == 0:
                self._unload(card.name)
                return wire.done_without_reply("unload", body.get("stream") is not False)
            think = body.get("think")
            if "thinking" not in card.capabilities and _think_requested(think):
                raise _Refusal(400, f'"{requested}" does not support thinking')
            wanted = ["completion", *(["tools"] if tools else [])]
            options = self._schedule(requested, card, "chat", wanted, body)
            if not messages:
                await self._load_and_release(card, keep_alive)
                return wire.done_without_reply("load", body.get("stream") is not False)
            if isinstance(think, str) and not _HARMONY_NAMES.search(card.name):
                raise _Refusal(400, f'think value "{think}" is not supported for this model')
            _check_format(body.get("format"))
            job = self._job(
                "chat", requested, card, messages, body, options, keep_alive, started, wire,
                tools=tools,
            )  # fmt: skip
        except _Refusal as refusal:
            return wire.refusal(refusal)
        return _GenerationResponse(self, job)

    def _schedule(
        self,
        requested: str,
        card: ModelCard,
        endpoint: str,
        wanted: Sequence[str],
        body: Mapping[str, Any],
    ) -> _Options:
        """Ollama's scheduleRunner before it waits for a runner: the model
        must have what the request needs, the options must decode, then the
        scheduler may refuse (``fail_next``)."""
        missing = [capability for capability in wanted if capability not in card.capabilities]
        if "completion" in missing:
            raise _Refusal(400, f'"{requested}" does not support {endpoint}')
        if missing:
            raise _Refusal(400, f"{_full_name(card.name)} does not support " + "\n".join(missing))
        options = _parse_options(body.get("options") or {})
        self._take_fault()
        return options

    def _job(
        self,
        endpoint: str,
        requested: str,
        card: ModelCard,
        read: Prompt,
        body: Mapping[str, Any],
        options: _Options,
        keep_alive: float | None,
        started: float,
        wire: _Wire,
        *,
        images: Sequence[str] = (),
        tools: Sequence[Mapping[str, Any]] = (),
        with_context: bool = False,
    ) -> _Job:
        ask = _make_ask(
            card,
            read,
            seed=options.seed,
            temperature=options.temperature,
            think=body.get("think"),
            format=body.get("format"),
            tools=tools,
            stop=options.stop,
            images=images,
            default_length=self.default_length,
        )
        return _Job(
            endpoint=endpoint,
            requested_model=requested,
            card=card,
            ask=ask,
            cap=_cap(options.num_predict),
            prompt_eval_count=_prompt_eval_count(ask),
            stream=body.get("stream") is not False,  # absent means true
            keep_alive=keep_alive,
            with_context=with_context,
            fault=self._runner_faults.popleft() if self._runner_faults else None,
            started=started,
            wire=wire,
        )

    async def _embed_reply(self, body: Mapping[str, Any], started: float) -> dict[str, Any]:
        """Ollama's EmbedHandler; raises ``_Refusal``."""
        keep_alive = _keep_alive(body)
        if not body.get("model"):
            raise _Refusal(400, "model is required")
        given = body.get("input")
        if isinstance(given, str):
            texts = [given] if given else []
        elif isinstance(given, list) and all(isinstance(text, str) for text in given):
            texts = list(given)
        elif given is None:
            texts = []
        else:
            raise _Refusal(400, "invalid input type")
        requested, card = self._model(body)
        options = _parse_options(body.get("options") or {})
        self._take_fault()
        await self._load_and_release(card, keep_alive)
        loaded = trio.current_time()
        if not texts:
            return {"model": requested, "embeddings": []}
        # Inputs longer than the context are cut to it, or refused.
        context = min(
            options.num_ctx if options.num_ctx and options.num_ctx > 0 else DEFAULT_NUM_CTX,
            card.context_length,
        )
        truncate = body.get("truncate") is not False
        counted = 0
        for index, text in enumerate(texts):
            words = text.split()
            if len(words) > context:
                if not truncate:
                    raise _Refusal(400, "input exceeds maximum context length")
                texts[index] = " ".join(words[:context])
            counted += min(count_prompt_tokens(text), context)
        dimensions = body.get("dimensions")
        return {
            "model": requested,
            "embeddings": [expected_embedding(card.name, text, dimensions) for text in texts],
            "total_duration": _ns(trio.current_time() - started),
            "load_duration": _ns(loaded - started),
            "prompt_eval_count": counted,
        }

    async def _embed(self, request: Request) -> Response:
        started = trio.current_time()
        try:
            body = await self._read(request, "EmbedRequest", _EMBED_FIELDS)
            return _json_response(await self._embed_reply(body, started))
        except _Refusal as refusal:
            return refusal.response()

    # -- the OpenAI-compatible routes ---------------------------------------

    async def _read_openai(
        self, request: Request, struct: str, fields: _FieldTypes
    ) -> dict[str, Any]:
        """Decode a ``/v1`` body as Ollama's middleware binds it; its errors
        are OpenAI-shaped and typed by status."""
        try:
            return await self._read(request, struct, fields)
        except _Refusal as refusal:
            message = "EOF" if refusal.message == "missing request body" else refusal.message
            raise _OpenAIRefusal(refusal.status, message) from refusal

    def _reply_id(self, prefix: str) -> str:
        self._openai_replies += 1
        return f"{prefix}-{self._openai_replies % 999}"

    async def _openai_chat(self, request: Request) -> Response:
        started = trio.current_time()
        try:
            body = await self._read_openai(
                request, "openai.ChatCompletionRequest", _OPENAI_CHAT_FIELDS
            )
            native = _from_openai_chat(body)
        except _Refusal as refusal:  # the middleware's own refusal
            return _openai_error(refusal.status, refusal.message, typed=True)
        wire = _OpenAIChatWire(
            "chat", native.get("model") or "", self._reply_id("chatcmpl"), _include_usage(body)
        )
        return await self._run_chat(native, started, wire)

    async def _openai_completion(self, request: Request) -> Response:
        started = trio.current_time()
        try:
            body = await self._read_openai(
                request, "openai.CompletionRequest", _OPENAI_COMPLETION_FIELDS
            )
            native = _from_openai_completion(body)
        except _Refusal as refusal:  # the middleware's own refusal
            return _openai_error(refusal.status, refusal.message, typed=True)
        wire = _OpenAICompletionWire(
            "generate", native.get("model") or "", self._reply_id("cmpl"), _include_usage(body)
        )
        return await self._run_generate(native, started, wire)

    async def _openai_embeddings(self, request: Request) -> Response:
        started = trio.current_time()
        try:
            body = await self._read_openai(request, "openai.EmbedRequest", _OPENAI_EMBED_FIELDS)
            given = body.get("input")
            if given == "":
                given = [""]
            if given is None or given == []:
                raise _OpenAIRefusal(400, "invalid input")
            model = body.get("model") or ""
            native = {"model": model, "input": given, "dimensions": body.get("dimensions")}
            reply = await self._embed_reply(native, started)
        except _Refusal as refusal:
            if isinstance(refusal, _OpenAIRefusal):
                return refusal.response()
            return _openai_error(refusal.status, refusal.message)
        data = [
            {"object": "embedding", "embedding": vector, "index": index}
            for index, vector in enumerate(reply["embeddings"])
        ]
        tokens = reply.get("prompt_eval_count", 0)
        listed = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return Response(_dumps(listed) + b"\n", headers=_JSON_HEADER)

    def _openai_model(self, name: str, card: ModelCard) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": int(self._modified_at[card.name]),
            "owned_by": _namespace(name),
        }

    async def _openai_models(self, request: Request) -> Response:
        self._record(request)
        listed = {
            "object": "list",
            "data": [self._openai_model(card.name, card) for card in self._cards.values()],
        }
        return Response(_dumps(listed) + b"\n", headers=_JSON_HEADER)

    async def _openai_retrieve(self, request: Request) -> Response:
        self._record(request)
        name = request.path_params["model"]
        card = self._cards.get(normalize_model_name(name))
        if card is None:
            return _openai_error(404, f"model '{name}' not found")
        return Response(_dumps(self._openai_model(name, card)) + b"\n", headers=_JSON_HEADER)

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
        # Decoded lazily: a long reply costs nothing up front.
        decoder = _Decoder(job.ask)
        said: dict[str, list[Any]] = {"thinking": [], "content": [], "tool_calls": []}
        fail_at = job.fault.after_tokens if job.fault is not None else None
        await self._acquire_model(job.card, job.keep_alive)
        loaded = trio.current_time()
        try:
            async with self._slots[job.card.name]:
                slot = trio.current_time()
                if self.first_token_delay > 0:
                    await trio.sleep(self.first_token_delay)
                decode_start = trio.current_time()
                while (done_reason := _ended(decoder, job.cap)) is None:
                    index = decoder.decoded
                    if index == fail_at:
                        return await self._fail(run, send)
                    rate = self.tokens_per_second
                    if rate is None:
                        await trio.lowlevel.checkpoint()
                    else:
                        await trio.sleep_until(decode_start + (index + 1) / rate)
                    emits = decoder.step()
                    run.tokens_generated += 1
                    await self._emit(run, send, emits, said)
                if fail_at is not None and fail_at >= decoder.decoded:
                    return await self._fail(run, send)
                await self._emit(run, send, decoder.flush(), said)
                decode_end = trio.current_time()
        finally:
            self._release_model(job.card)

        context = None
        if job.with_context:
            words = render_prompt(job.ask.prompt).split() + [t.strip() for t in said["content"]]
            context = [_token_id(word) for word in words]
        metrics = {
            "total_duration": _ns(trio.current_time() - job.started),
            "load_duration": _ns(loaded - job.started),
            "prompt_eval_count": job.prompt_eval_count,
            "prompt_eval_duration": _ns(decode_start - slot),
            "eval_count": decoder.decoded,
            "eval_duration": _ns(decode_end - decode_start),
        }
        self._finish(run, Outcome.COMPLETED)
        if job.stream:
            summary = _Summary(done_reason, decoder.tail, "", [], metrics, context)
            await self._send(run, send, job.wire.final(summary), last=True)
        else:
            content = "".join(said["content"]) + decoder.tail
            thinking = "".join(said["thinking"])
            summary = _Summary(done_reason, content, thinking, said["tool_calls"], metrics, context)
            await self._send_whole(run, send, 200, job.wire.whole(summary))
        return Outcome.COMPLETED

    async def _emit(
        self, run: _Run, send: Send, emits: list[_Emit], said: dict[str, list[Any]]
    ) -> None:
        for name, value, tokens in emits:
            if name == "tool_calls":
                said[name].extend(value)
            else:
                said[name].append(value)
            if run.job.stream:
                await self._send(run, send, run.job.wire.chunk(name, value))
                run.tokens_sent += tokens
                self._notify()

    async def _fail(self, run: _Run, send: Send) -> Outcome:
        assert run.job.fault is not None
        message = run.job.fault.message
        self._finish(run, Outcome.FAILED)
        if run.job.stream and run.response_started:
            await self._send(run, send, run.job.wire.error_line(message), last=True)
        else:
            await self._send_whole(run, send, 500, run.job.wire.error_body(500, message))
        return Outcome.FAILED

    @staticmethod
    async def _start_response(
        run: _Run, send: Send, status: int, length: int | None = None
    ) -> None:
        streaming = run.job.stream and status == 200
        wire = run.job.wire
        headers = [(b"content-type", wire.stream_media if streaming else wire.json_media)]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        run.response_started = True
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def _send(self, run: _Run, send: Send, data: bytes, *, last: bool = False) -> None:
        if not run.response_started:
            await self._start_response(run, send, 200)
        run.response_complete = last
        await send({"type": "http.response.body", "body": data, "more_body": not last})

    async def _send_whole(self, run: _Run, send: Send, status: int, body: bytes) -> None:
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

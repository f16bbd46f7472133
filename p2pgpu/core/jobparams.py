"""What a job may carry besides its prompt: sampling options, output format,
tools, images, thinking, embedding settings. Checked and bounded here, once.

Theory of operation
-------------------
The tools people point at a node (the ``ollama`` and ``openai`` clients,
LangChain, Open WebUI) send far more than a prompt. Everything beyond the
prompt or the chat messages travels in one ``JobParams`` value, inside the
job's body (so the consumer's signature covers it through the body hash) as
one JSON text (``to_json``/``from_json``): JSON because tool schemas, JSON
schemas and tool-call arguments are JSON already, and floats (temperature)
have no place in the canonical msgpack of signed objects. A job without any
of it has ``JobParams()`` (``empty``), and its body is exactly the body of a
job before this existed, so old peers and old records are unchanged.

Both sides run the same checks: the consumer before it signs (a bad value is
the user's error, with the field named), the provider when it decodes (a
forged value is the peer's). Every field has a hard bound, so a REQUEST can
not make a provider parse or forward an unbounded structure:

- ``options``: *sampling* options only (``SAMPLING_OPTIONS``, each with its
  range). Load-time options (``num_ctx``, ``num_gpu``...) reload the model on
  every new value (reference §4 "reload thrash") and belong to the provider:
  ``parse_options`` drops them with the names it dropped, refusing only
  options nobody knows. ``num_predict`` is not an option here: it is the
  job's ``max_tokens``, which the money rules bound.
- ``format``: ``"json"`` or a JSON schema (an object, at most
  ``MAX_SCHEMA_BYTES`` of JSON, nesting at most ``MAX_JSON_DEPTH``).
- ``tools``: a list of at most ``MAX_TOOLS`` function tools, at most
  ``MAX_TOOLS_BYTES`` of JSON in all.
- ``images``: base64 strings for a generate prompt, each at most
  ``MAX_IMAGE_B64_CHARS`` (the body limit of the job protocol bounds the
  total); chat messages carry theirs in ``message_extras``.
- ``message_extras``: per chat message (by index), what a plain
  ``(role, content)`` pair cannot say: its images, the tool calls an
  assistant made, the tool a ``tool`` message answers, an assistant's
  thinking. Kept beside the messages, not in them, so every rule that reads
  messages as pairs (pricing bounds, failover continuation) is unchanged.
- ``think``: ``True``/``False`` or an effort ``"low" | "medium" | "high"``.
- ``truncate``/``dimensions``: for embedding jobs.

Pure module: no I/O, no clock.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any, Final

from p2pgpu.errors import MalformedInput

__all__ = [
    "JobParams", "ToolCall", "MessageExtra", "parse_options", "canonical_json", "parse_json_value",
    "SAMPLING_OPTIONS", "LOAD_TIME_OPTIONS", "THINK_LEVELS",
    "MAX_PARAMS_BYTES", "MAX_SCHEMA_BYTES", "MAX_TOOLS", "MAX_TOOLS_BYTES", "MAX_IMAGES", "MAX_IMAGE_B64_CHARS",
    "MAX_STOP", "MAX_STOP_CHARS", "MAX_JSON_DEPTH", "MAX_TOOL_CALLS", "MAX_TOOL_NAME_CHARS", "MAX_EMBED_DIMENSIONS",
]

MAX_PARAMS_BYTES: Final = 448 * 1024  # the whole params JSON; the job body (512 KiB) bounds it again
MAX_SCHEMA_BYTES: Final = 16 * 1024
MAX_TOOLS: Final = 64
MAX_TOOLS_BYTES: Final = 64 * 1024
MAX_IMAGES: Final = 8  # per job, over the prompt and every message together
MAX_IMAGE_B64_CHARS: Final = 256 * 1024
MAX_STOP: Final = 16
MAX_STOP_CHARS: Final = 256
MAX_JSON_DEPTH: Final = 32
MAX_TOOL_CALLS: Final = 32  # on one assistant message
MAX_TOOL_NAME_CHARS: Final = 128
MAX_TOOL_ARGUMENTS_BYTES: Final = 32 * 1024
MAX_THINKING_CHARS: Final = 256 * 1024
MAX_EMBED_DIMENSIONS: Final = 8192

THINK_LEVELS: Final = ("low", "medium", "high")

_INT, _FLOAT = "int", "float"
SAMPLING_OPTIONS: Final[dict[str, tuple[str, float, float]]] = {
    # name: (type, lowest, highest); floats accept ints, ints do not accept floats
    "temperature": (_FLOAT, 0.0, 2.0),
    "top_p": (_FLOAT, 0.0, 1.0),
    "min_p": (_FLOAT, 0.0, 1.0),
    "typical_p": (_FLOAT, 0.0, 1.0),
    "top_k": (_INT, 0, 1000),
    "seed": (_INT, -(2**63), 2**63 - 1),
    "repeat_penalty": (_FLOAT, 0.0, 10.0),
    "repeat_last_n": (_INT, -1, 32768),
    "presence_penalty": (_FLOAT, -2.0, 2.0),
    "frequency_penalty": (_FLOAT, -2.0, 2.0),
}
"""Options that change how tokens are drawn, never what is loaded; ``stop``
(a list of strings) is the one more."""

LOAD_TIME_OPTIONS: Final = frozenset({
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "numa", "low_vram", "f16_kv", "vocab_only",
    "use_mmap", "use_mlock", "num_keep", "logits_all", "embedding_only", "rope_frequency_base",
    "rope_frequency_scale", "num_gqa", "penalize_newline", "mirostat", "mirostat_eta", "mirostat_tau", "tfs_z",
})
"""Options a consumer may send (clients do: Open WebUI sends ``num_ctx``) but
only the provider decides: dropped by ``parse_options``, never carried."""


def canonical_json(value: Any) -> str:
    """One text per parsed JSON value: no spaces, no NaN, and the keys in
    the order they came. Not sorted: the order of a schema's properties is
    the order a model writes them in (Ollama's grammar follows it), and a
    tool's JSON is rendered into the model's prompt as given, so sorting
    would change what the provider's model does."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _utf8_size(text: str, name: str) -> int:
    """Bytes of ``text`` as UTF-8; a lone surrogate (JSON's ``"\\ud800"``
    escape makes one) is not text and is refused."""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        raise MalformedInput(f"{name}: holds a lone surrogate, which is not text") from None


def parse_json_value(text: str, name: str, max_bytes: int) -> Any:
    """Parse ``text`` as JSON within ``max_bytes`` and ``MAX_JSON_DEPTH``;
    strings must be text (no lone surrogates, escaped or not)."""
    if not isinstance(text, str):
        raise MalformedInput(f"{name}: expected JSON text")
    size = _utf8_size(text, name)
    if size > max_bytes:
        raise MalformedInput(f"{name}: {size} bytes of JSON exceeds {max_bytes}")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MalformedInput(f"{name}: not valid JSON ({str(exc)[:80]})") from None
    _check_depth(value, name)
    _utf8_size(canonical_json(value), name)
    return value


def _check_depth(value: Any, name: str) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise MalformedInput(f"{name}: JSON nested deeper than {MAX_JSON_DEPTH}")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise MalformedInput(f"{name}: numbers must be finite")


def _json_size(value: Any, name: str, max_bytes: int) -> str:
    try:
        text = canonical_json(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise MalformedInput(f"{name}: not a JSON value ({str(exc)[:80]})") from None
    size = _utf8_size(text, name)
    if size > max_bytes:
        raise MalformedInput(f"{name}: {size} bytes of JSON exceeds {max_bytes}")
    _check_depth(value, name)
    return text


# ------------------------------------------------------------------ options


def _check_option(name: str, value: Any) -> float | int | tuple[str, ...]:
    if name == "stop":
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise MalformedInput("option stop: expected a string or a list of strings")
        if len(stops) > MAX_STOP:
            raise MalformedInput(f"option stop: {len(stops)} sequences exceeds {MAX_STOP}")
        for s in stops:
            if not s or len(s) > MAX_STOP_CHARS:
                raise MalformedInput(f"option stop: each sequence must be 1 to {MAX_STOP_CHARS} characters")
            _utf8_size(s, "option stop")
        return tuple(stops)
    kind, lo, hi = SAMPLING_OPTIONS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedInput(f"option {name}: expected a number, got {type(value).__name__}")
    if kind == _INT:
        if isinstance(value, float):
            if not value.is_integer():
                raise MalformedInput(f"option {name}: expected an integer, got {value}")
            value = int(value)
    else:
        try:
            value = float(value)
        except OverflowError:  # an integer past a float's range
            raise MalformedInput(f"option {name}: must be finite") from None
        if not math.isfinite(value):
            raise MalformedInput(f"option {name}: must be finite")
    if not lo <= value <= hi:
        raise MalformedInput(f"option {name}: {value} is outside [{lo:g}, {hi:g}]")
    return value


def parse_options(options: Any) -> tuple[tuple[tuple[str, Any], ...], tuple[str, ...]]:
    """Check a client's ``options`` object: returns (the sampling options,
    sorted by name, as ``JobParams.options`` holds them; the load-time
    options it dropped). ``num_predict`` is not handled here (the caller
    makes it ``max_tokens``) and is refused if left in. ``MalformedInput``
    names the first option it refuses."""
    if options is None:
        return (), ()
    if not isinstance(options, dict):
        raise MalformedInput("options: expected an object")
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    for name, value in options.items():
        if not isinstance(name, str):
            raise MalformedInput("options: names must be strings")
        if name in LOAD_TIME_OPTIONS:
            dropped.append(name)
        elif name == "stop" or name in SAMPLING_OPTIONS:
            if value is not None:
                kept[name] = _check_option(name, value)
        else:
            raise MalformedInput(f"option {name[:64]!r} is not supported (sampling options: "
                                 f"{', '.join(sorted([*SAMPLING_OPTIONS, 'stop']))})")
    return tuple(sorted(kept.items())), tuple(sorted(dropped))


# ------------------------------------------------------------------ values


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call a model made: a function ``name`` and its ``arguments`` as
    canonical JSON text of an object (Ollama sends an object, OpenAI a
    string of JSON; both convert from this)."""

    name: str
    arguments_json: str = "{}"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 1 <= len(self.name) <= MAX_TOOL_NAME_CHARS:
            raise MalformedInput(f"tool call name must be 1 to {MAX_TOOL_NAME_CHARS} characters")
        arguments = parse_json_value(self.arguments_json, "tool call arguments", MAX_TOOL_ARGUMENTS_BYTES)
        if not isinstance(arguments, dict):
            raise MalformedInput("tool call arguments must be a JSON object")
        if canonical_json(arguments) != self.arguments_json:  # equal values, one text (build with ``of``)
            raise MalformedInput("tool call arguments are not canonical JSON")

    @property
    def arguments(self) -> dict[str, Any]:
        return json.loads(self.arguments_json)

    @classmethod
    def of(cls, name: str, arguments: Any) -> ToolCall:
        """From a name and an arguments object (or JSON text of one)."""
        if isinstance(arguments, str):
            arguments = parse_json_value(arguments, "tool call arguments", MAX_TOOL_ARGUMENTS_BYTES)
        if not isinstance(arguments, dict):
            raise MalformedInput("tool call arguments must be a JSON object")
        return cls(name, _json_size(arguments, "tool call arguments", MAX_TOOL_ARGUMENTS_BYTES))

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


@dataclass(frozen=True, slots=True)
class MessageExtra:
    """What one chat message carries besides its role and text."""

    images: tuple[str, ...] = ()  # base64
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's calls
    tool_name: str | None = None  # a tool message: which tool's result it is
    thinking: str | None = None  # an assistant's thinking

    @property
    def empty(self) -> bool:
        return not self.images and not self.tool_calls and self.tool_name is None and self.thinking is None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.images:
            out["images"] = list(self.images)
        if self.tool_calls:
            out["tool_calls"] = [c.to_wire() for c in self.tool_calls]
        if self.tool_name is not None:
            out["tool_name"] = self.tool_name
        if self.thinking is not None:
            out["thinking"] = self.thinking
        return out

    @classmethod
    def from_wire(cls, value: Any, name: str) -> MessageExtra:
        if not isinstance(value, dict):
            raise MalformedInput(f"{name}: expected an object")
        unknown = set(value) - {"images", "tool_calls", "tool_name", "thinking"}
        if unknown:
            raise MalformedInput(f"{name}: unknown field {sorted(unknown)[0][:40]!r}")
        images = _images(value.get("images", []), f"{name}.images")
        calls_raw = value.get("tool_calls", [])
        if not isinstance(calls_raw, list) or len(calls_raw) > MAX_TOOL_CALLS:
            raise MalformedInput(f"{name}.tool_calls: expected a list of at most {MAX_TOOL_CALLS}")
        calls = []
        for call in calls_raw:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise MalformedInput(f"{name}.tool_calls: each call needs a name")
            calls.append(ToolCall.of(call["name"], call.get("arguments", {})))
        tool_name = value.get("tool_name")
        if tool_name is not None and (not isinstance(tool_name, str) or len(tool_name) > MAX_TOOL_NAME_CHARS):
            raise MalformedInput(f"{name}.tool_name: expected a string of at most {MAX_TOOL_NAME_CHARS} characters")
        thinking = value.get("thinking")
        if thinking is not None and (not isinstance(thinking, str) or len(thinking) > MAX_THINKING_CHARS):
            raise MalformedInput(f"{name}.thinking: expected a string of at most {MAX_THINKING_CHARS} characters")
        return cls(images, tuple(calls), tool_name, thinking)


def _images(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise MalformedInput(f"{name}: expected a list of base64 strings")
    if len(value) > MAX_IMAGES:
        raise MalformedInput(f"{name}: {len(value)} images exceeds {MAX_IMAGES}")
    for image in value:
        if not isinstance(image, str) or not image:
            raise MalformedInput(f"{name}: each image must be a non-empty base64 string")
        if len(image) > MAX_IMAGE_B64_CHARS:
            raise MalformedInput(f"{name}: an image of {len(image)} base64 characters exceeds {MAX_IMAGE_B64_CHARS}")
        try:
            # Decoded, not only its alphabet checked: "=" inside or bad padding
            # would reach the provider's client, which would fail on it.
            base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedInput(f"{name}: an image is not base64") from None
    return tuple(value)


@dataclass(frozen=True, slots=True)
class JobParams:
    """Everything a job carries besides its prompt or messages (module
    docstring). Build with keyword arguments or ``from_wire``; every
    constructor checks, so a ``JobParams`` that exists is within bounds."""

    options: tuple[tuple[str, Any], ...] = ()  # sampling options, sorted by name (see ``parse_options``)
    format: str | None = None  # None, "json", or canonical JSON text of a schema object
    tools_json: str | None = None  # canonical JSON text of the tools list
    think: bool | str | None = None
    images: tuple[str, ...] = ()  # base64, for a generate prompt
    message_extras: tuple[tuple[int, MessageExtra], ...] = ()  # (message index, extra), increasing index
    truncate: bool | None = None  # embed
    dimensions: int | None = None  # embed

    def __post_init__(self) -> None:
        names = [name for name, _ in self.options]
        if names != sorted(set(names)):
            raise MalformedInput("options must be sorted by name, each once")
        for name, value in self.options:
            if name != "stop" and name not in SAMPLING_OPTIONS:
                raise MalformedInput(f"option {name[:64]!r} is not supported")
            checked = _check_option(name, value)
            # the type too: 1 == 1.0, but they are different JSON texts, and
            # the job body must have one encoding
            if checked != value or type(checked) is not type(value):
                raise MalformedInput(f"option {name}: not in its checked form")
        if self.format is not None and self.format != "json":
            schema = parse_json_value(self.format, "format", MAX_SCHEMA_BYTES)
            if not isinstance(schema, dict):
                raise MalformedInput('format: expected "json" or a JSON schema object')
            if canonical_json(schema) != self.format:  # equal params have one JSON text (``from_wire`` makes it)
                raise MalformedInput("format: not canonical JSON")
        if self.tools_json is not None:
            tools = parse_json_value(self.tools_json, "tools", MAX_TOOLS_BYTES)
            _check_tools(tools)
            if canonical_json(tools) != self.tools_json:
                raise MalformedInput("tools: not canonical JSON")
        if self.think is not None and not isinstance(self.think, bool) and self.think not in THINK_LEVELS:
            raise MalformedInput(f"think: expected true, false or one of {THINK_LEVELS}")
        _images(self.images, "images")
        last = -1
        count = len(self.images)
        for index, extra in self.message_extras:
            if not isinstance(index, int) or isinstance(index, bool) or index <= last:
                raise MalformedInput("message extras must have increasing message indexes")
            if not isinstance(extra, MessageExtra) or extra.empty:
                raise MalformedInput("each message extra must carry something")
            last = index
            count += len(extra.images)
        if count > MAX_IMAGES:
            raise MalformedInput(f"images: {count} in one job exceeds {MAX_IMAGES}")
        if self.truncate is not None and not isinstance(self.truncate, bool):
            raise MalformedInput("truncate: expected true or false")
        if self.dimensions is not None and (
            isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
            or not 1 <= self.dimensions <= MAX_EMBED_DIMENSIONS
        ):
            raise MalformedInput(f"dimensions: expected an integer in 1..{MAX_EMBED_DIMENSIONS}")

    # ------------------------------------------------------------ views

    @property
    def empty(self) -> bool:
        return self == _EMPTY

    @property
    def option_map(self) -> dict[str, Any]:
        """The options as Ollama's ``options`` object wants them (``stop`` a list)."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in self.options}

    @property
    def format_value(self) -> str | dict[str, Any] | None:
        """``"json"``, a schema object, or None."""
        if self.format is None or self.format == "json":
            return self.format
        return json.loads(self.format)

    @property
    def tools(self) -> list[dict[str, Any]]:
        return [] if self.tools_json is None else json.loads(self.tools_json)

    def extra_for(self, index: int) -> MessageExtra | None:
        for i, extra in self.message_extras:
            if i == index:
                return extra
        return None

    # ------------------------------------------------------------ wire

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able object, only the fields that are set."""
        out: dict[str, Any] = {}
        if self.options:
            out["options"] = self.option_map
        if self.format is not None:
            out["format"] = self.format_value
        if self.tools_json is not None:
            out["tools"] = self.tools
        if self.think is not None:
            out["think"] = self.think
        if self.images:
            out["images"] = list(self.images)
        if self.message_extras:
            out["message_extras"] = [[index, extra.to_wire()] for index, extra in self.message_extras]
        if self.truncate is not None:
            out["truncate"] = self.truncate
        if self.dimensions is not None:
            out["dimensions"] = self.dimensions
        return out

    def to_json(self) -> str:
        return canonical_json(self.to_wire())

    @classmethod
    def from_json(cls, text: str) -> JobParams:
        """Parse and check the params JSON of a job body (``MalformedInput``)."""
        return cls.from_wire(parse_json_value(text, "job params", MAX_PARAMS_BYTES))

    @classmethod
    def from_wire(cls, value: Any) -> JobParams:
        if not isinstance(value, dict):
            raise MalformedInput("job params: expected an object")
        known = {"options", "format", "tools", "think", "images", "message_extras", "truncate", "dimensions"}
        unknown = set(value) - known
        if unknown:
            raise MalformedInput(f"job params: unknown field {sorted(unknown)[0][:40]!r}")
        options, dropped = parse_options(value.get("options"))
        if dropped:
            raise MalformedInput(f"option {dropped[0]} is a load-time option; only the provider sets it")
        fmt = value.get("format")
        if fmt is not None and fmt != "json":
            if not isinstance(fmt, dict):
                raise MalformedInput('format: expected "json" or a JSON schema object')
            fmt = _json_size(fmt, "format", MAX_SCHEMA_BYTES)
        tools = value.get("tools")
        tools_json = None
        if tools is not None:
            _check_tools(tools)
            tools_json = _json_size(tools, "tools", MAX_TOOLS_BYTES)
        extras_raw = value.get("message_extras", [])
        if not isinstance(extras_raw, list):
            raise MalformedInput("message_extras: expected a list of [index, extra]")
        extras = []
        for item in extras_raw:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], int) or isinstance(item[0], bool):
                raise MalformedInput("message_extras: each item must be [index, extra]")
            extras.append((item[0], MessageExtra.from_wire(item[1], f"message_extras[{item[0]}]")))
        return cls(options=options, format=fmt, tools_json=tools_json, think=value.get("think"),
                   images=_images(value.get("images", []), "images"), message_extras=tuple(extras),
                   truncate=value.get("truncate"), dimensions=value.get("dimensions"))


def _check_tools(tools: Any) -> None:
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise MalformedInput(f"tools: expected a list of at most {MAX_TOOLS} tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise MalformedInput(f"tools[{i}]: expected a function tool")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise MalformedInput(f"tools[{i}]: a function tool needs function.name")
        if len(function["name"]) > MAX_TOOL_NAME_CHARS:
            raise MalformedInput(f"tools[{i}]: name longer than {MAX_TOOL_NAME_CHARS} characters")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise MalformedInput(f"tools[{i}]: function.parameters must be a JSON schema object")


_EMPTY: Final = JobParams()

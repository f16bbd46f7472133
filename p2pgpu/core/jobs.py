"""Job sessions on ``/p2pgpu/job/1.0.0``: pure state machines, both sides.

Theory of operation
-------------------
One job is one stream between a consumer C and a provider P (DESIGN §4).
Each side is a sans-IO state machine (h11/aioquic style, STYLE.md): the edge
reads the clock, moves frames and carries out *actions*; the session never
touches a socket, a model or a clock. It is driven by three inputs:

- ``receive(frame, now_ms)``: a frame from the peer,
- API calls (consumer: ``start``/``cancel``; provider: ``accept``/``reject``/
  ``tokens``/``finished``/``failed``/``cancel``), each taking ``now_ms``,
- ``on_timer(now_ms)``, to be called once ``now_ms >= next_deadline()``.

Every input returns a list of small frozen actions: ``Send`` (bytes for the
peer), ``Deliver`` (tokens for the user), ``Pause``/``Resume``/
``StopGeneration`` (for the provider's executor), ``Claim`` (the voucher the
provider should CLAIM), ``ReleaseHold`` (consumer: take the hold back),
``RequestReceived`` (provider: decide, then ``accept``/``reject``),
``Completed`` and ``Failed``. Each session has ONE transition table,
``(state, event) -> (handler, allowed next states)``; a pair missing from it
is a protocol error (``ProtocolViolation`` for the peer's frames,
``LocalProtocolError`` for our own API misuse). Handlers check everything
before they change anything, so an input that raises leaves the session
exactly as it was (the edge logs it and, for a peer's frame, closes the
stream and calls ``connection_lost``).

The exchange::

    C: REQUEST (signed; embeds C's HOLD entry naming P)       -> P
    P: ACCEPT | REJECT(code, text, waiver of the hold)         -> C
    P: TOKENS(seq, text, count, total[, channel]) ...          -> C
    C: VOUCHER(cumulative, signed for the hold) ...            -> P
    P: RECEIPT (signed: counts, durations, output hash, cost)  -> C
    C: VOUCHER(final = job_cost(prompt, delivered))            -> P; P CLAIMs it
    either side, any time before the receipt: CANCEL(code, text)
    P, when the backend fails: ERROR(code, text, waiver if nothing was sent)

Design choices, and why
-----------------------
- **The prompt is outside the signature.** ``sign_object`` caps a signed
  object at 16 KiB, far below a real chat history. The signed request carries
  BLAKE2b-256 of the body (prompt or messages); the body rides in the same
  REQUEST frame (up to ``MAX_BODY``) and P checks the hash. The signature
  still binds C to exactly that prompt.
- **A job carries what Ollama's clients send.** Sampling options, output
  format, tools, images, thinking and embedding settings travel as one
  ``JobParams`` (``p2pgpu.core.jobparams``) inside the body, so the hash,
  hence the signature, covers them; ``check_job_params`` says which fit
  which kind. A job without them has its body of old, byte for byte. Kind
  ``embed`` turns texts into vectors, one per input.
- **Output comes on channels.** A TOKENS frame's optional last element says
  what its text is: content (the element left out, so such frames are as
  they always were), thinking, one tool call (canonical JSON), or one
  embedding (base64 of little-endian float32, billed as one token). The
  receipt's output hash covers every channel (``hash_output``), and the
  consumer checks each frame's channel fits the job (``output_refusal``).
- **Money is priced by one function**, ``job_cost``: ceil((price_in * in +
  price_out * out) / 1e6), one rounding over the sum, integer only. It is
  monotonic in both counts, so cumulative vouchers never go down.
- **Streaming vouchers price output tokens only** (``job_cost(p, 0, n)``):
  Ollama reports ``prompt_eval_count`` only at the end. The final voucher,
  sent after the receipt, adds the input tokens, bounded by the request's
  ``max_prompt_tokens`` so a provider cannot inflate it past the hold.
- **C pays for what it received, never for what P says it sent.** Output
  tokens are counted from TOKENS frames (``seq`` catches a lost frame,
  ``total`` must equal the running sum and stay within ``max_tokens``). So
  the last voucher is always ``job_cost`` of tokens actually delivered, and
  P can claim nothing above it (the ledger refuses a CLAIM above the voucher
  or hold: a voucher is signed by C only).
- **P derives coverage from the amount** (``covered_tokens``), not from a
  field C could lie about: ``n`` output tokens are covered iff
  ``job_cost(p, 0, n) <= amount``. P pauses once ``sent - covered`` reaches
  the request's ``credit_window`` (tokens produced meanwhile are buffered in
  the session, so the window is exact whatever the executor's lag), resumes
  when a voucher catches up, and stops after ``pause_grace_ms``.
- **A provider counts only vouchers it has kept** (``durable_vouchers``,
  set by a provider that stores them: the node). A voucher lives only in
  memory until the edge has written it to disk, so a crash would lose it
  and, with it, the pay for everything it covered. So each new voucher
  becomes a ``KeepVoucher`` action, the edge calls ``voucher_kept`` once it
  is durable, and the window counts from the newest *kept* voucher: a
  provider never serves more than one window past what it can still claim
  after a crash. The ``Claim`` still names the newest voucher (a CLAIM is
  durable itself), and a consumer that paid is never stopped as unpaid
  because our disk was slow: the pause grace is counted from what it sent.
- **No PAUSE frame.** Pausing is P's local business; C sees a quiet stream,
  and its stall deadline covers a P that never resumes.
- **A stop is reported by the backend.** After ``StopGeneration`` the
  executor still calls ``finished`` (Ollama reports whatever counts it has);
  P then signs a receipt for the tokens it *sent* (buffered ones are
  dropped), so cancel from either side pays exactly the delivered tokens.
  After a CANCEL the consumer sends no streaming voucher, and takes no
  TOKENS frame that starts past what could be in flight: after ours, one
  credit window past our vouchers; after the provider's, none at all. A
  provider that streams on regardless is a protocol violation, not paid.
- **Deadlines** (consumer): first token (covers accept as well), stalled
  stream, and receipt after a cancel; each ends in ``Failed``. Provider:
  pause grace and settle (waiting for the final voucher; on expiry it claims
  the last one it has).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, NamedTuple

from p2pgpu.core.codec import (
    ID_SIZE,
    MAX_INT,
    MAX_SIGNED_SIZE,
    Signed,
    Tag,
    check_bytes,
    check_int,
    check_list,
    check_str,
    decode_signed,
    pack,
    sign_object,
    unpack,
)
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.jobparams import JobParams, ToolCall, canonical_json, parse_json_value
from p2pgpu.core.units import format_coins
from p2pgpu.core.ledger import HOLD, MAX_AMOUNT, Entry, Hold, decode_entry, make_voucher, make_waiver, parse_waiver
from p2pgpu.core.offers import MAX_MODEL_NAME_CHARS, MAX_PRICE, normalize_model_name
from p2pgpu.errors import MalformedInput, P2PGPUError, PeerMisbehaved

log = logging.getLogger(__name__)

__all__ = [
    "Prices", "job_cost", "prompt_token_bound", "admission_refusal", "covered_tokens", "output_hash",
    "output_hash_of", "JobRequest", "Receipt", "make_request", "decode_request", "make_receipt", "decode_receipt",
    "encode_body", "check_job_params", "hash_output", "output_refusal", "KINDS", "CHAT_ROLES", "CHANNEL_NAMES",
    "CONTENT", "THINKING", "TOOL_CALL", "EMBEDDING",
    "ConsumerSession", "ProviderSession", "ConsumerState", "ProviderState", "SessionConfig",
    "Send", "Deliver", "Pause", "Resume", "StopGeneration", "Claim", "KeepVoucher", "ReleaseHold",
    "RequestReceived", "Completed", "Failed",
    "ProtocolViolation", "LocalProtocolError",
]

# ------------------------------------------------------------------ limits

JOB_ID_SIZE = 16
MAX_JOB_FRAME = 1024 * 1024  # = protocols.MAX_FRAME; the framing layer enforces it first
MAX_BODY = 512 * 1024  # prompt or packed chat messages
MAX_MESSAGES = 1024
MAX_ROLE_CHARS = 32
MAX_TOKENS_TEXT = 64 * 1024  # characters in one TOKENS frame
MAX_TOKENS_PER_FRAME = 4096
MAX_JOB_TOKENS = 1 << 24
MAX_REASON_CHARS = 256
MAX_WIRE = 4096  # an embedded signed object (hold entry, voucher, waiver)
MAX_REQUEST_CONTEXT = 8  # the consumer's own recent entries a REQUEST may carry before its hold
MILLION = 1_000_000

MAX_EMBED_INPUTS = 1024  # texts in one embed job (one vector, one TOKENS frame, each)

KINDS = ("generate", "chat", "embed")
CHAT_ROLES = ("system", "user", "assistant", "tool")  # "tool": a tool's result, answering an assistant's call

# Output channels: the optional 7th element of a TOKENS frame (absent = CONTENT).
CONTENT, THINKING, TOOL_CALL, EMBEDDING = range(4)
CHANNEL_NAMES = {CONTENT: "content", THINKING: "thinking", TOOL_CALL: "tool_call", EMBEDDING: "embedding"}

# Frame types (first element of every frame's array).
REQUEST, ACCEPT, REJECT, TOKENS, VOUCHER, CANCEL, RECEIPT, ERROR = range(1, 9)
FRAME_NAMES = {1: "request", 2: "accept", 3: "reject", 4: "tokens", 5: "voucher", 6: "cancel", 7: "receipt", 8: "error"}

# Reason codes for REJECT / CANCEL / ERROR.
R_OTHER, R_BUSY, R_PRICE, R_MODEL, R_HOLD, R_USER, R_UNPAID, R_BACKEND, R_TIMEOUT, R_WINDOW = range(10)
REASON_NAMES = {
    0: "other", 1: "busy", 2: "price", 3: "model", 4: "hold",
    5: "user", 6: "unpaid", 7: "backend", 8: "timeout", 9: "window",
}

# Receipt status.
DONE, CANCELLED = 0, 1


class ProtocolViolation(PeerMisbehaved):
    """The peer sent a well-formed frame that is wrong here: another job's
    id, a frame this state does not allow, a sequence gap, a bad count."""


class LocalProtocolError(P2PGPUError):
    """Our own side called the session API out of turn (a bug in the edge)."""


# ------------------------------------------------------------------ pricing


class Prices(NamedTuple):
    """Base units per million input and output tokens (as in an offer)."""

    price_in: int
    price_out: int


PROMPT_TEMPLATE_TOKENS = 64  # margin for the chat template Ollama wraps around the text
MESSAGE_OVERHEAD_TOKENS = 4  # role markers per chat message
IMAGE_TOKENS = 768  # the margin per image (see ``prompt_token_bound``)
TOOL_CALL_OVERHEAD_TOKENS = 8  # the markers a template puts around one earlier tool call
EMBED_INPUT_OVERHEAD_TOKENS = 8  # BOS/EOS and the like, per embedded text

_NO_PARAMS = JobParams()


def prompt_token_bound(prompt: str | None = None, messages=None, *, params: JobParams = _NO_PARAMS,
                       inputs: Iterable[str] | None = None) -> int:
    """An upper bound on a job's input tokens, known before it runs (the
    hold must cover it, and the final voucher pays at most this many).

    Text: every token is at least one byte, plus the template's margin and a
    few tokens per chat message. What ``params`` add to the prompt counts the
    same way, byte for byte: the tools' and the schema's JSON (templates and
    the format grammar put them in front of the model), earlier tool calls,
    tool names and thinking. An image is counted as ``IMAGE_TOKENS`` (768):
    more than the 256 to 576 tokens the common vision encoders (gemma3,
    llava) give an image, but not a true bound, since some encoders scale
    with resolution; a provider serving one is paid for at most 768 tokens
    an image, and the consumer never pays more than this bound. An embed
    job's bound is its texts' bytes plus ``EMBED_INPUT_OVERHEAD_TOKENS``
    each (no chat template is applied)."""
    if inputs is not None:
        return sum(len(text.encode()) + EMBED_INPUT_OVERHEAD_TOKENS for text in inputs)
    if prompt is not None:
        bound = len(prompt.encode()) + PROMPT_TEMPLATE_TOKENS
    else:
        bound = sum(len(content.encode()) + MESSAGE_OVERHEAD_TOKENS for _, content in messages or ()) + PROMPT_TEMPLATE_TOKENS
    return bound if params.empty else bound + _params_token_bound(params)


def _params_token_bound(params: JobParams) -> int:
    tokens = IMAGE_TOKENS * len(params.images)
    if params.tools_json is not None:
        tokens += len(params.tools_json.encode())
    if params.format is not None:
        tokens += len(params.format.encode())
    for _, extra in params.message_extras:
        tokens += IMAGE_TOKENS * len(extra.images)
        for call in extra.tool_calls:
            tokens += len(call.name.encode()) + len(call.arguments_json.encode()) + TOOL_CALL_OVERHEAD_TOKENS
        tokens += len((extra.tool_name or "").encode()) + len((extra.thinking or "").encode())
    return tokens


def admission_refusal(request: "JobRequest", *, served_models: set[str], prices: Prices,
                      active: int, slots: int, max_credit_window: int = MAX_JOB_TOKENS,
                      debt: str | None = None) -> tuple[int, str] | None:
    """Why a provider must refuse ``request`` before touching its ledger:
    (reason code, text), or None when it may go on to check the hold.

    The checks a provider makes from its own state alone: the model is
    served, the request pays at least the advertised prices, it asks for no
    more credit than we give (``max_credit_window``), its consumer owes us
    nothing (``debt``: why it does, ``p2pgpu.core.trust.Debtors``), and a
    slot is free (advertised slots are real: that is the node's admission
    control).
    """
    if request.model not in served_models:
        return R_MODEL, f"model {request.model} is not served here"
    if request.prices.price_in < prices.price_in or request.prices.price_out < prices.price_out:
        return R_PRICE, (f"prices below ours ({format_coins(prices.price_in)}/{format_coins(prices.price_out)} "
                         "coins per million tokens in/out)")
    if request.credit_window > max_credit_window:
        return R_WINDOW, (f"credit window of {request.credit_window} tokens exceeds ours of {max_credit_window}: "
                          "pay with vouchers at least that often")
    if debt is not None:
        return R_UNPAID, debt
    if active >= slots:
        return R_BUSY, "no free slot"
    return None


def job_cost(prices: Prices, in_tokens: int, out_tokens: int) -> int:
    """What a job of these token counts costs, in integer base units, rounded
    up: ``ceil((price_in*in + price_out*out) / 1e6)``. The one formula both
    sides use for vouchers, receipts and holds."""
    for value, name in ((in_tokens, "input tokens"), (out_tokens, "output tokens"),
                        (prices.price_in, "input price"), (prices.price_out, "output price")):
        check_int(value, name)
    return -(-(prices.price_in * in_tokens + prices.price_out * out_tokens) // MILLION)


def covered_tokens(prices: Prices, amount: int) -> int:
    """The most output tokens ``amount`` pays for: the largest ``n`` with
    ``job_cost(prices, 0, n) <= amount`` (unbounded when output is free)."""
    if prices.price_out == 0:
        return MAX_INT
    return amount * MILLION // prices.price_out


def output_hash(text: str) -> bytes:
    """BLAKE2b-256 of the UTF-8 output text, as the receipt names it (a job
    whose every frame is content; ``output_hash_of`` for any job)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=32).digest()


CHANNEL_MARK = b"\xff"  # never a byte of UTF-8 text: marks a non-content frame in the hashed stream


def hash_output(digest: Any, text: str, channel: int = CONTENT) -> None:
    """Feed one TOKENS frame's output to a receipt's BLAKE2b-256 ``digest``.

    Content is fed as its UTF-8 bytes, exactly as before channels existed,
    so a content-only job hashes as it always did. Any other frame is fed
    as ``0xFF, channel (1 byte), length of the text in bytes (4, big
    endian), the text``: 0xFF never occurs in UTF-8, so the hashed bytes
    say unambiguously which text came on which channel and where each
    non-content frame ends."""
    data = text.encode("utf-8")
    if channel != CONTENT:
        digest.update(CHANNEL_MARK + bytes((channel,)) + len(data).to_bytes(4, "big"))
    digest.update(data)


def output_hash_of(frames: Iterable[tuple[int, str]]) -> bytes:
    """The receipt's output hash of ``(channel, text)`` frames, in order."""
    digest = hashlib.blake2b(digest_size=32)
    for channel, text in frames:
        hash_output(digest, text, channel)
    return digest.digest()


def output_refusal(kind: str, channel: int, text: str, count: int) -> str | None:
    """Why one TOKENS frame cannot belong to a job of ``kind``, or None.

    An embed job's output is only vectors (``EMBEDDING``, count 1, the
    base64 of little-endian float32 values), and no other job has any; a
    tool call is the canonical JSON ``{"arguments": {...}, "name": ...}`` of
    one call (what ``canonical_json(ToolCall.to_wire())`` gives), so the
    consumer hands its user a call it has checked."""
    if channel not in CHANNEL_NAMES:
        return f"unknown output channel {channel}"
    if (kind == "embed") != (channel == EMBEDDING):
        return f"a {kind} job has no {CHANNEL_NAMES[channel]} output"
    if channel == EMBEDDING:
        if count != 1:
            return "an embedding is billed as one token"
        try:
            vector = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return "an embedding is not base64"
        if not vector or len(vector) % 4:
            return "an embedding is not a whole number of float32 values"
    elif channel == TOOL_CALL:
        try:
            value = parse_json_value(text, "tool call", MAX_TOKENS_TEXT * 4)
            if not isinstance(value, dict) or set(value) != {"name", "arguments"}:
                return 'a tool call is {"name": ..., "arguments": {...}}'
            call = ToolCall.of(value["name"], value["arguments"])
        except MalformedInput as exc:
            return str(exc)
        if canonical_json(call.to_wire()) != text:
            return "a tool call is not in its canonical JSON form"
    return None


def body_hash(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=32).digest()


# ------------------------------------------------------------------ signed objects


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A decoded, verified job request (consumer's signature checked)."""

    signed: Signed
    job_id: bytes
    model: str
    kind: str
    prompt: str | None  # kind "generate"
    messages: tuple[tuple[str, str], ...] | None  # kind "chat": (role, content)
    max_prompt_tokens: int
    max_tokens: int
    prices: Prices
    credit_window: int
    hold: Entry
    params: JobParams = _NO_PARAMS  # everything besides the text (``p2pgpu.core.jobparams``), checked for the kind
    inputs: tuple[str, ...] | None = None  # kind "embed": the texts, one vector each

    @property
    def consumer(self) -> bytes:
        return self.signed.signer

    @property
    def hold_id(self) -> bytes:
        return self.hold.id

    @property
    def max_cost(self) -> int:
        return job_cost(self.prices, self.max_prompt_tokens, self.max_tokens)


def encode_body(kind: str, prompt: str | None, messages, params: JobParams = _NO_PARAMS,
                inputs: Iterable[str] | None = None) -> bytes:
    """A REQUEST's body as it travels; ``MalformedInput`` when the parts do
    not make a job of ``kind`` or the body does not fit ``MAX_BODY``.

    One encoding per job, so one body hash: a generate or chat job without
    params has its body of old, the prompt as a msgpack string or the
    messages as an array of ``[role, content]``; any other job's body is a
    map with sorted keys, ``{"prompt": ...}``, ``{"messages": [...]}`` or
    ``{"input": [text, ...]}`` (embed), plus ``"params"``, the params'
    canonical JSON text, when there are any."""
    if not isinstance(params, JobParams):
        raise MalformedInput("job params must be a JobParams")
    if kind == "generate":
        if not isinstance(prompt, str) or messages is not None or inputs is not None:
            raise MalformedInput("a generate job has a prompt and no messages")
        field, value = "prompt", prompt
    elif kind == "chat":
        if prompt is not None or messages is None or inputs is not None:
            raise MalformedInput("a chat job has messages and no prompt")
        field, value = "messages", [[role, content] for role, content in messages]
    elif kind == "embed":
        if prompt is not None or messages is not None or inputs is None:
            raise MalformedInput("an embed job has inputs and neither prompt nor messages")
        field, value = "input", list(inputs)
    else:
        raise MalformedInput(f"job kind must be one of {KINDS}, not {kind!r}")
    try:
        if params.empty and kind != "embed":
            body = pack(value)
        else:
            fields = {field: value} if params.empty else {field: value, "params": params.to_json()}
            body = pack(dict(sorted(fields.items())))
    except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800" escape) is not text
        raise MalformedInput(f"the job's {field} holds a lone surrogate, which is not text") from None
    if len(body) > MAX_BODY:
        raise MalformedInput(f"job body of {len(body)} bytes exceeds {MAX_BODY}")
    return body


_BODY_FIELD = {"generate": "prompt", "chat": "messages", "embed": "input"}


def _decode_body(kind: str, body: bytes):
    """(prompt, messages, params, inputs) of a body (``encode_body``), every
    part checked; ``MalformedInput`` names the part it refuses."""
    value = unpack(body, max_size=MAX_BODY, what="job body")
    field = _BODY_FIELD[kind]
    params = _NO_PARAMS
    if isinstance(value, dict):
        unknown = sorted(str(key)[:40] for key in value if key not in (field, "params"))
        if unknown:
            raise MalformedInput(f"job body: unknown field {unknown[0]!r} in a {kind} job")
        if field not in value:
            raise MalformedInput(f"job body: a {kind} job needs {field!r}")
        if "params" in value:
            params = JobParams.from_json(check_str(value["params"], "job params", MAX_BODY))
            if params.empty:
                raise MalformedInput("job body: empty params are left out")
        elif kind != "embed":
            raise MalformedInput(f"job body: a {kind} job without params has its plain body, not a map")
        value = value[field]
    elif kind == "embed":
        raise MalformedInput("job body: an embed job's body is a map with 'input'")
    prompt = messages = inputs = None
    if kind == "generate":
        prompt = check_str(value, "prompt", MAX_BODY)
    elif kind == "chat":
        check_list(value, "messages", max_len=MAX_MESSAGES)
        pairs = []
        for index, item in enumerate(value):
            check_list(item, f"messages[{index}]", length=2)
            role = check_str(item[0], f"messages[{index}].role", MAX_ROLE_CHARS)
            if role not in CHAT_ROLES:
                raise MalformedInput(f"messages[{index}].role: {role!r} is not one of {CHAT_ROLES}")
            pairs.append((role, check_str(item[1], f"messages[{index}].content", MAX_BODY)))
        messages = tuple(pairs)
    else:
        check_list(value, "input", max_len=MAX_EMBED_INPUTS)
        if not value:
            raise MalformedInput("input: an embed job embeds at least one text")
        inputs = tuple(check_str(text, f"input[{index}]", MAX_BODY) for index, text in enumerate(value))
    check_job_params(kind, params, 0 if messages is None else len(messages))
    if encode_body(kind, prompt, messages, params, inputs) != body:
        raise MalformedInput("job body is not canonical msgpack")
    return prompt, messages, params, inputs


def check_job_params(kind: str, params: JobParams, message_count: int = 0) -> None:
    """Whether ``params`` (checked on their own already) fit a job of
    ``kind`` with ``message_count`` chat messages: ``MalformedInput``
    naming the field if not. Both sides ask, the consumer before it signs
    and the provider as it decodes.

    A generate prompt's images are ``images``; a chat message's are in its
    ``message_extras`` entry, whose index must name one of the messages.
    Tools need a chat (Ollama's generate has none). An embed job takes only
    ``truncate`` and ``dimensions``, which nothing else takes."""
    if kind == "embed":
        if replace(params, truncate=None, dimensions=None) != _NO_PARAMS:
            raise MalformedInput("job params: an embed job takes only truncate and dimensions")
        return
    if params.truncate is not None or params.dimensions is not None:
        raise MalformedInput("job params: truncate and dimensions are for embed jobs only")
    if kind == "generate":
        if params.message_extras:
            raise MalformedInput("job params: message_extras are for chat jobs (a prompt's images go in images)")
        if params.tools_json is not None:
            raise MalformedInput("job params: tools need a chat job (messages), not a prompt")
        return
    if params.images:
        raise MalformedInput("job params: images are for a prompt; a chat message's images go in message_extras")
    for index, _ in params.message_extras:
        if index >= message_count:
            raise MalformedInput(f"message_extras[{index}]: the job has {message_count} messages")


def make_request(
    key: NodeKey,
    network_id: bytes,
    now_ms: int,
    *,
    job_id: bytes,
    model: str,
    hold: Entry,
    prices: Prices,
    max_prompt_tokens: int,
    max_tokens: int,
    credit_window: int,
    prompt: str | None = None,
    messages=None,
    params: JobParams = _NO_PARAMS,
    inputs: Iterable[str] | None = None,
) -> tuple[Signed, bytes]:
    """Sign a job request; returns (signed request, body bytes). The kind
    follows from what is given: ``inputs`` (embed: ``max_tokens`` must be
    their number, one vector each), ``messages`` (chat) or ``prompt``
    (generate); ``params`` must fit it (``check_job_params``)."""
    kind = "embed" if inputs is not None else "chat" if messages is not None else "generate"
    body = encode_body(kind, prompt, messages, params, inputs)
    signed = sign_object(key, Tag.JOB_REQUEST, network_id, now_ms, [
        job_id, normalize_model_name(model), kind, body_hash(body), max_prompt_tokens, max_tokens,
        prices.price_in, prices.price_out, credit_window, hold.wire,
    ])
    decode_request(signed.wire, body, network_id)  # the author gets the same checks as the reader
    return signed, body


def decode_request(wire: bytes, body: bytes, network_id: bytes) -> JobRequest:
    """Decode and verify a job request and its body. Checks the hold is the
    requester's HOLD for this job and covers the job's maximum cost; whether
    P is the hold's provider is the provider session's business."""
    signed = decode_signed(wire, network_id=network_id, tags=(Tag.JOB_REQUEST,))
    fields = check_list(list(signed.fields), "request fields", length=10)
    job_id, model, kind, bhash, max_prompt, max_tokens, price_in, price_out, window, hold_wire = fields
    check_bytes(job_id, "job id", size=JOB_ID_SIZE)
    check_str(model, "model", MAX_MODEL_NAME_CHARS)
    if not model or normalize_model_name(model) != model:
        raise MalformedInput(f"model name {model!r} is not normalized")
    if kind not in KINDS:
        raise MalformedInput(f"job kind must be one of {KINDS}")
    check_bytes(bhash, "body hash", size=32)
    check_int(max_prompt, "max prompt tokens", 0, MAX_JOB_TOKENS)
    check_int(max_tokens, "max tokens", 1, MAX_JOB_TOKENS)
    prices = Prices(check_int(price_in, "input price", 0, MAX_PRICE), check_int(price_out, "output price", 0, MAX_PRICE))
    check_int(window, "credit window", 1, MAX_JOB_TOKENS)
    check_bytes(hold_wire, "hold", max_size=MAX_WIRE)
    check_bytes(body, "job body", max_size=MAX_BODY)
    if body_hash(body) != bhash:
        raise MalformedInput("job body does not match the signed hash")
    prompt, messages, params, inputs = _decode_body(kind, body)
    if inputs is not None and max_tokens != len(inputs):
        raise MalformedInput(f"max tokens: an embed job's is its number of inputs ({len(inputs)}), not {max_tokens}")
    hold = decode_entry(hold_wire, network_id)
    if hold.kind != HOLD or hold.author != signed.signer:
        raise MalformedInput("embedded entry is not the requester's HOLD")
    body_h: Hold = hold.body  # type: ignore[assignment]
    if body_h.job_id != job_id:
        raise MalformedInput("the hold is for another job")
    request = JobRequest(signed, job_id, model, kind, prompt, messages, max_prompt, max_tokens, prices, window, hold,
                         params, inputs)
    if request.max_cost > body_h.amount:
        raise MalformedInput(f"hold of {format_coins(body_h.amount)} coins does not cover the job's maximum cost "
                             f"of {format_coins(request.max_cost)} coins")
    return request


@dataclass(frozen=True, slots=True)
class Receipt:
    """A provider's signed account of one job."""

    signed: Signed
    job_id: bytes
    hold_id: bytes
    status: int  # DONE or CANCELLED
    prompt_eval_count: int
    eval_count: int
    output_tokens: int  # tokens actually sent in TOKENS frames
    durations_ns: tuple[int, int, int, int]  # total, load, prompt_eval, eval (Ollama's)
    output_hash: bytes
    cost: int


def make_receipt(key, network_id, now_ms, *, job_id, hold_id, status, prompt_eval_count, eval_count,
                 output_tokens, durations_ns, out_hash, cost) -> Signed:
    return sign_object(key, Tag.JOB_RECEIPT, network_id, now_ms, [
        job_id, hold_id, status, prompt_eval_count, eval_count, output_tokens, list(durations_ns), out_hash, cost,
    ])


def decode_receipt(wire: bytes, network_id: bytes) -> Receipt:
    signed = decode_signed(wire, network_id=network_id, tags=(Tag.JOB_RECEIPT,))
    fields = check_list(list(signed.fields), "receipt fields", length=9)
    job_id, hold_id, status, pec, ec, out, durations, ohash, cost = fields
    check_list(durations, "durations", length=4)
    return Receipt(
        signed, check_bytes(job_id, "job id", size=JOB_ID_SIZE), check_bytes(hold_id, "hold id", size=ID_SIZE),
        check_int(status, "status", DONE, CANCELLED), check_int(pec, "prompt eval count", 0, MAX_JOB_TOKENS),
        check_int(ec, "eval count", 0, MAX_JOB_TOKENS), check_int(out, "output tokens", 0, MAX_JOB_TOKENS),
        tuple(check_int(d, "duration") for d in durations),  # type: ignore[arg-type]
        check_bytes(ohash, "output hash", size=32), check_int(cost, "cost", 0, MAX_AMOUNT),
    )


# ------------------------------------------------------------------ frames
# Unsigned frames: positional arrays [type, job_id, ...]. REQUEST carries the
# signed request and the body; RECEIPT/VOUCHER/REJECT carry signed wires.

_FRAME_LEN = {REQUEST: 5, ACCEPT: 2, REJECT: 5, TOKENS: 6, VOUCHER: 3, CANCEL: 4, RECEIPT: 3, ERROR: 5}
# TOKENS may carry a 7th element, its output channel (1..3); decoded frames always have it in ``args``.


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame; ``args`` are the fields after type and job id,
    shape-checked (signed parts are decoded by the session)."""

    type: int
    job_id: bytes
    args: tuple


def encode_frame(type_: int, job_id: bytes, *args: Any) -> bytes:
    return pack([type_, job_id, *args])


def decode_frame(data: bytes) -> Frame:
    """Decode one job frame with hard limits; every malformed input raises a
    ``MalformedInput`` subclass."""
    value = unpack(data, max_size=MAX_JOB_FRAME, what="job frame")
    check_list(value, "job frame", max_len=8)
    if len(value) < 2:
        raise MalformedInput("job frame: expected at least 2 items")
    type_ = check_int(value[0], "frame type", 0, 255)
    if type_ not in _FRAME_LEN:
        raise MalformedInput(f"unknown job frame type {type_}")
    if type_ == TOKENS and len(value) == _FRAME_LEN[TOKENS] + 1:
        pass  # TOKENS with its optional channel
    else:
        check_list(value, f"{FRAME_NAMES[type_]} frame", length=_FRAME_LEN[type_])
    job_id = check_bytes(value[1], "job id", size=JOB_ID_SIZE)
    a = value[2:]
    if type_ == REQUEST:
        check_bytes(a[0], "request", max_size=MAX_SIGNED_SIZE)
        check_bytes(a[1], "job body", max_size=MAX_BODY)
        check_list(a[2], "request context", max_len=MAX_REQUEST_CONTEXT)
        for wire in a[2]:
            check_bytes(wire, "context entry", max_size=MAX_WIRE)
        a = [a[0], a[1], tuple(a[2])]
    elif type_ == REJECT or type_ == ERROR:
        check_int(a[0], "reason code", 0, 255)
        check_str(a[1], "reason", MAX_REASON_CHARS)
        check_bytes(a[2], "waiver", max_size=MAX_WIRE)
    elif type_ == TOKENS:
        check_int(a[0], "seq", 0, MAX_JOB_TOKENS)
        check_str(a[1], "text", MAX_TOKENS_TEXT)
        check_int(a[2], "count", 1, MAX_TOKENS_PER_FRAME)
        check_int(a[3], "total", 1, MAX_JOB_TOKENS)
        if len(a) == 4:
            a = [*a, CONTENT]
        else:  # content is sent without the element: one encoding per frame
            check_int(a[4], "channel", THINKING, max(CHANNEL_NAMES))
    elif type_ == VOUCHER or type_ == RECEIPT:
        check_bytes(a[0], FRAME_NAMES[type_], max_size=MAX_WIRE)
    elif type_ == CANCEL:
        check_int(a[0], "reason code", 0, 255)
        check_str(a[1], "reason", MAX_REASON_CHARS)
    return Frame(type_, job_id, tuple(a))


# ------------------------------------------------------------------ actions


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the job stream, as one frame."""
    data: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """Consumer: hand these tokens to the user; ``channel`` says what they
    are (``CONTENT``, ``THINKING``, ``TOOL_CALL`` or ``EMBEDDING``)."""
    text: str
    count: int
    channel: int = CONTENT


@dataclass(frozen=True, slots=True)
class Pause:
    """Provider: stop pulling from the model stream for now (credit window full)."""


@dataclass(frozen=True, slots=True)
class Resume:
    """Provider: go on generating (a voucher caught up)."""


@dataclass(frozen=True, slots=True)
class StopGeneration:
    """Provider: abort generation, then call ``finished`` with Ollama's counts."""
    reason: str


@dataclass(frozen=True, slots=True)
class Claim:
    """Provider: append a CLAIM of ``hold_id`` with this voucher (the last, largest one)."""
    hold_id: bytes
    voucher: Signed
    amount: int


@dataclass(frozen=True, slots=True)
class KeepVoucher:
    """Provider (``durable_vouchers``): make this voucher durable, then call
    ``voucher_kept(now, amount)``. Only the newest matters: an edge still
    writing one may skip to the newest that came meanwhile."""
    voucher: Signed
    amount: int


@dataclass(frozen=True, slots=True)
class ReleaseHold:
    """Consumer: the job is over; release ``hold_id`` (with ``waiver`` when the
    provider gave one, else after the provider's CLAIM or the hold's expiry).
    ``paid`` is the last voucher's amount."""
    hold_id: bytes
    waiver: bytes | None
    paid: int


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """Provider: a valid request arrived; check it against the offer, slots
    and the ledger replica, then call ``accept`` or ``reject``. ``context``:
    entries the consumer sent along (unchecked: the ledger checks them)."""
    request: JobRequest
    context: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Completed:
    """Consumer: the job ran to its end; ``paid`` (the final voucher) equals
    ``job_cost`` of the delivered tokens and the reported prompt tokens."""
    receipt: Receipt
    paid: int


@dataclass(frozen=True, slots=True)
class Failed:
    """Consumer: the job ended without completing. ``retryable`` says whether
    another provider is worth trying (false only when our user cancelled);
    ``receipt`` is there when the provider sent one for a cancelled job;
    ``code`` is the provider's reason code when it rejected or failed the
    job (``R_BUSY``: full, try again later), else None; ``rejected``: the
    provider turned the job away before running it (its REJECT frame)."""
    reason: str
    retryable: bool
    receipt: Receipt | None = None
    paid: int = 0
    code: int | None = None
    rejected: bool = False


Action = (Send | Deliver | Pause | Resume | StopGeneration | Claim | KeepVoucher | ReleaseHold | RequestReceived
          | Completed | Failed)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Timing of a session, in milliseconds."""

    first_token_ms: int = 30_000  # consumer: start -> first TOKENS frame
    stall_ms: int = 15_000  # consumer: longest gap between frames while streaming
    receipt_ms: int = 10_000  # consumer: cancel -> receipt
    pause_grace_ms: int = 10_000  # provider: paused this long -> stop
    settle_ms: int = 10_000  # provider: receipt -> final voucher
    request_wait_ms: int = 60_000  # provider: stream opened -> request (a consumer keeps one ready ahead of need)
    voucher_every: int | None = None  # consumer: tokens per voucher; default half the credit window
    durable_vouchers: bool = False  # provider: count the window from vouchers the edge kept (KeepVoucher)


# ------------------------------------------------------------------ machinery

TIMER = "timer"


class _Machine:
    """Table dispatch shared by both sessions. ``_TABLE`` maps (state, event)
    to (handler name, allowed next states); handlers return (next, actions)
    and must not mutate before they have validated."""

    _TABLE: dict
    _REMOTE_EVENTS: frozenset
    state: Enum

    def _dispatch(self, event, *args) -> list[Action]:
        entry = self._TABLE.get((self.state, event))
        if entry is None:
            name = FRAME_NAMES.get(event, event)  # type: ignore[call-overload]
            if event in self._REMOTE_EVENTS:
                raise ProtocolViolation(f"{name} frame is not allowed in state {self.state.name}")
            raise LocalProtocolError(f"{name} is not allowed in state {self.state.name}")
        handler, allowed = entry
        next_state, actions = getattr(self, handler)(*args)
        assert next_state in allowed, (self.state, event, next_state)
        if next_state is not self.state:
            log.debug("job %s: %s -> %s on %s", self.job_id.hex()[:8], self.state.name, next_state.name, event)
        self.state = next_state
        return actions

    job_id: bytes

    def _frame(self, data: bytes) -> Frame:
        frame = decode_frame(data)
        if frame.job_id != self.job_id:
            raise ProtocolViolation("frame names another job")
        return frame


# ------------------------------------------------------------------ consumer


class ConsumerState(Enum):
    IDLE = "idle"
    REQUESTED = "requested"  # request sent, no answer yet
    ACCEPTED = "accepted"  # accepted, no token yet
    STREAMING = "streaming"
    CLOSING = "closing"  # we or P cancelled; waiting for the receipt
    DONE = "done"  # Completed or Failed emitted


_C = ConsumerState
_C_LIVE = (_C.REQUESTED, _C.ACCEPTED, _C.STREAMING)

# Events: frame types (remote), "start", "cancel", "lost", TIMER (local).
_CONSUMER_TABLE: dict = {
    (_C.IDLE, "start"): ("_start", {_C.REQUESTED}),
    (_C.REQUESTED, ACCEPT): ("_on_accept", {_C.ACCEPTED}),
    (_C.REQUESTED, REJECT): ("_on_reject", {_C.DONE}),
    (_C.ACCEPTED, TOKENS): ("_on_tokens", {_C.STREAMING}),
    (_C.STREAMING, TOKENS): ("_on_tokens", {_C.STREAMING}),
    (_C.CLOSING, TOKENS): ("_on_tokens", {_C.CLOSING}),  # in flight when we cancelled: count, don't deliver
    (_C.ACCEPTED, RECEIPT): ("_on_receipt", {_C.DONE}),  # zero output tokens
    (_C.STREAMING, RECEIPT): ("_on_receipt", {_C.DONE}),
    (_C.CLOSING, RECEIPT): ("_on_receipt", {_C.DONE}),
    (_C.ACCEPTED, CANCEL): ("_on_cancel", {_C.CLOSING}),
    (_C.STREAMING, CANCEL): ("_on_cancel", {_C.CLOSING}),
    (_C.CLOSING, CANCEL): ("_on_cancel", {_C.CLOSING}),  # both cancelled at once
    (_C.ACCEPTED, ERROR): ("_on_error", {_C.DONE}),
    (_C.STREAMING, ERROR): ("_on_error", {_C.DONE}),
    (_C.CLOSING, ERROR): ("_on_error", {_C.DONE}),
    **{(s, "cancel"): ("_cancel", {_C.CLOSING, _C.DONE}) for s in _C_LIVE},
    **{(s, "lost"): ("_lost", {_C.DONE}) for s in (*_C_LIVE, _C.CLOSING)},
    **{(s, TIMER): ("_timer", {s, _C.DONE}) for s in (*_C_LIVE, _C.CLOSING)},
}


class ConsumerSession(_Machine):
    """The consumer's side of one job.

    Build it with the signed request (``make_request``); ``start`` sends it.
    Outputs end with exactly one ``Completed`` or ``Failed``, always preceded
    by one ``ReleaseHold`` hint: with the provider's waiver when it gave one
    (release at once), else release after its CLAIM or the hold's expiry.
    """

    _TABLE = _CONSUMER_TABLE
    _REMOTE_EVENTS = frozenset(FRAME_NAMES)

    def __init__(self, key: NodeKey, network_id: bytes, request: Signed, body: bytes,
                 config: SessionConfig = SessionConfig(), context: tuple[bytes, ...] = ()) -> None:
        self.key = key
        self.network_id = network_id
        self.request = decode_request(request.wire, body, network_id)
        if self.request.consumer != key.public_key:
            raise LocalProtocolError("the request is not signed by this consumer")
        if len(context) > MAX_REQUEST_CONTEXT:
            raise LocalProtocolError(f"a request carries at most {MAX_REQUEST_CONTEXT} context entries")
        self._request_frame = encode_frame(REQUEST, self.request.job_id, request.wire, body, list(context))
        self.job_id = self.request.job_id
        self.hold_id = self.request.hold_id
        self.provider: bytes = self.request.hold.body.provider  # type: ignore[union-attr]
        self.prices = self.request.prices
        self.config = config
        self.voucher_every = config.voucher_every or max(1, self.request.credit_window // 2)
        self.state = _C.IDLE
        self.received = 0  # output tokens received
        self.next_seq = 0
        self.paid = 0  # amount of the last voucher sent
        self.paid_tokens = 0  # output tokens the last streaming voucher priced
        self.last_voucher: Signed | None = None
        self._hash = hashlib.blake2b(digest_size=32)
        self.deadline: int | None = None
        self.cancel_reason: str | None = None
        self._retry_after_cancel = False
        self.closing_limit: int | None = None  # once CLOSING: no TOKENS frame may start at or past this many tokens

    # --- inputs
    def start(self, now_ms: int) -> list[Action]:
        return self._dispatch("start", now_ms)

    def cancel(self, now_ms: int, reason: str = "cancelled by the user") -> list[Action]:
        return self._dispatch("cancel", now_ms, reason)

    def connection_lost(self, now_ms: int) -> list[Action]:
        """The stream ended or broke (or the edge gave up on a bad frame)."""
        if self.state in (_C.IDLE, _C.DONE):
            return []
        return self._dispatch("lost", now_ms)

    def receive(self, data: bytes, now_ms: int) -> list[Action]:
        frame = self._frame(data)
        return self._dispatch(frame.type, frame, now_ms)

    def next_deadline(self) -> int | None:
        return self.deadline

    def on_timer(self, now_ms: int) -> list[Action]:
        if self.deadline is None or now_ms < self.deadline:
            return []
        return self._dispatch(TIMER, now_ms)

    def snapshot(self) -> tuple:
        """Everything that changes, for tests that check a refused input changed nothing."""
        return (self.state, self.received, self.next_seq, self.paid, self.paid_tokens,
                self._hash.digest(), self.deadline, self.cancel_reason, self.closing_limit)

    # --- helpers
    def _close(self, limit: int) -> None:
        """The job is being cancelled: no more streaming vouchers, and no
        TOKENS frame may start at or past ``limit`` output tokens (what an
        honest provider can still have in flight), so a provider that
        streams on after a CANCEL is caught instead of paid."""
        self.closing_limit = limit if self.closing_limit is None else min(self.closing_limit, limit)

    def _voucher(self, amount: int, now_ms: int) -> list[Action]:
        if amount <= self.paid:
            return []
        self.last_voucher = make_voucher(self.key, self.network_id, self.hold_id, amount, now_ms)
        self.paid = amount
        return [Send(encode_frame(VOUCHER, self.job_id, self.last_voucher.wire))]

    def _end(self, outcome: Action, waiver: bytes | None = None) -> tuple[ConsumerState, list[Action]]:
        self.deadline = None
        return _C.DONE, [ReleaseHold(self.hold_id, waiver, self.paid), outcome]

    # --- handlers
    def _start(self, now_ms):
        self.deadline = now_ms + self.config.first_token_ms
        log.info("job %s: requesting %s", self.job_id.hex()[:8], self.request.model)
        return _C.REQUESTED, [Send(self._request_frame)]

    def _on_accept(self, frame, now_ms):
        return _C.ACCEPTED, []

    def _check_waiver(self, raw: bytes) -> bytes | None:
        if not raw:
            return None
        waiver = parse_waiver(raw, self.network_id)
        waiver.verify()
        if waiver.signer != self.provider or waiver.fields[0] != self.hold_id:
            raise ProtocolViolation("waiver is not the provider's waiver of this hold")
        return raw

    def _on_reject(self, frame, now_ms):
        code, text, raw = frame.args
        waiver = self._check_waiver(raw)
        reason = f"rejected ({REASON_NAMES.get(code, code)}): {text}"
        return self._end(Failed(reason, retryable=True, code=code, rejected=True), waiver)

    def _on_tokens(self, frame, now_ms):
        seq, text, count, total, channel = frame.args
        if seq != self.next_seq:
            raise ProtocolViolation(f"tokens frame {seq} where {self.next_seq} was due")
        if total != self.received + count:
            raise ProtocolViolation(f"running total {total} does not match {self.received} + {count}")
        if total > self.request.max_tokens:
            raise ProtocolViolation(f"{total} output tokens exceed the request's {self.request.max_tokens}")
        refusal = output_refusal(self.request.kind, channel, text, count)
        if refusal is not None:
            raise ProtocolViolation(f"tokens frame {seq}: {refusal}")
        if self.closing_limit is not None and total - count >= self.closing_limit:
            raise ProtocolViolation(f"tokens frame {seq} comes past what could be in flight when the job was cancelled")
        self.next_seq += 1
        self.received = total
        hash_output(self._hash, text, channel)
        actions: list[Action] = []
        if self.state is _C.CLOSING:
            next_state = _C.CLOSING
        else:
            next_state = _C.STREAMING
            self.deadline = now_ms + self.config.stall_ms
            actions.append(Deliver(text, count, channel))
        if next_state is _C.STREAMING and self.received - self.paid_tokens >= self.voucher_every:
            self.paid_tokens = self.received
            actions += self._voucher(job_cost(self.prices, 0, self.received), now_ms)
        return next_state, actions

    def _on_receipt(self, frame, now_ms):
        receipt = decode_receipt(frame.args[0], self.network_id)
        if receipt.signed.signer != self.provider:
            raise ProtocolViolation("receipt is not signed by the provider")
        if receipt.job_id != self.job_id or receipt.hold_id != self.hold_id:
            raise ProtocolViolation("receipt is for another job or hold")
        if receipt.output_tokens != self.received or receipt.output_hash != self._hash.digest():
            raise ProtocolViolation("receipt does not match the tokens received")
        # Pay for what arrived; input tokens as reported, capped by the request.
        in_tokens = min(receipt.prompt_eval_count, self.request.max_prompt_tokens)
        actions = self._voucher(job_cost(self.prices, in_tokens, self.received), now_ms)
        if self.cancel_reason is not None:
            outcome: Action = Failed(self.cancel_reason, retryable=self._retry_after_cancel, receipt=receipt, paid=self.paid)
        elif receipt.status != DONE:
            outcome = Failed("provider stopped the job", retryable=True, receipt=receipt, paid=self.paid)
        else:
            log.info("job %s: completed, %d tokens, paid %s coins", self.job_id.hex()[:8], self.received, format_coins(self.paid))
            outcome = Completed(receipt, self.paid)
        state, end = self._end(outcome)
        return state, actions + end

    def _cancel(self, now_ms, reason):
        actions: list[Action] = [Send(encode_frame(CANCEL, self.job_id, R_USER, reason[:MAX_REASON_CHARS]))]
        if self.state is _C.REQUESTED:  # nothing ran: no receipt will come
            state, end = self._end(Failed(reason, retryable=False))
            return state, actions + end
        self.cancel_reason, self._retry_after_cancel = reason, False
        # In flight: what P sent before our CANCEL, at most a credit window past our vouchers.
        self._close(covered_tokens(self.prices, self.paid) + self.request.credit_window)
        self.deadline = now_ms + self.config.receipt_ms
        return _C.CLOSING, actions

    def _on_cancel(self, frame, now_ms):
        code, text = frame.args
        if self.cancel_reason is None:
            self.cancel_reason = f"cancelled by the provider ({REASON_NAMES.get(code, code)}): {text}"
            self._retry_after_cancel = True
        self._close(self.received)  # P sends no TOKENS after its own CANCEL
        self.deadline = now_ms + self.config.receipt_ms
        return _C.CLOSING, []

    def _on_error(self, frame, now_ms):
        code, text, raw = frame.args
        waiver = self._check_waiver(raw)
        return self._end(Failed(f"provider failed ({REASON_NAMES.get(code, code)}): {text}", retryable=True,
                                paid=self.paid, code=code), waiver)

    def _lost(self, now_ms):
        retryable = self._retry_after_cancel if self.cancel_reason is not None else True
        return self._end(Failed("connection lost", retryable=retryable, paid=self.paid))

    def _timer(self, now_ms):
        if self.state is _C.CLOSING:
            return self._end(Failed(f"{self.cancel_reason} (no receipt)", retryable=self._retry_after_cancel, paid=self.paid))
        what = "stalled stream" if self.state is _C.STREAMING else "no first token"
        log.info("job %s: %s", self.job_id.hex()[:8], what)
        state, end = self._end(Failed(f"timeout: {what}", retryable=True, paid=self.paid))
        return state, [Send(encode_frame(CANCEL, self.job_id, R_TIMEOUT, what))] + end


# ------------------------------------------------------------------ provider


class ProviderState(Enum):
    WAITING = "waiting"  # no request yet
    DECIDING = "deciding"  # request valid, RequestReceived emitted
    RUNNING = "running"  # accepted, generating
    PAUSED = "paused"  # credit window full
    STOPPING = "stopping"  # StopGeneration emitted, waiting for ``finished``
    SETTLING = "settling"  # receipt sent, waiting for the final voucher
    DONE = "done"


_P = ProviderState
_P_GEN = (_P.RUNNING, _P.PAUSED)

_PROVIDER_TABLE: dict = {
    (_P.WAITING, "open"): ("_open", {_P.WAITING}),
    (_P.WAITING, TIMER): ("_request_overdue", {_P.DONE}),  # an idle stream: end it, say nothing
    (_P.WAITING, REQUEST): ("_on_request", {_P.DECIDING}),
    (_P.DECIDING, "accept"): ("_accept", {_P.RUNNING}),
    (_P.DECIDING, "reject"): ("_reject", {_P.DONE}),
    (_P.DECIDING, CANCEL): ("_on_cancel_early", {_P.DONE}),
    (_P.RUNNING, "tokens"): ("_tokens", {_P.RUNNING, _P.PAUSED}),
    (_P.PAUSED, "tokens"): ("_tokens", {_P.PAUSED}),  # already pulled from the model: buffered
    (_P.STOPPING, "tokens"): ("_drop_tokens", {_P.STOPPING}),  # generated after the stop: never sent
    (_P.RUNNING, VOUCHER): ("_on_voucher", {_P.RUNNING}),
    (_P.PAUSED, VOUCHER): ("_on_voucher", {_P.RUNNING, _P.PAUSED}),
    (_P.STOPPING, VOUCHER): ("_on_voucher", {_P.STOPPING}),
    (_P.SETTLING, VOUCHER): ("_on_voucher", {_P.SETTLING, _P.DONE}),
    (_P.DONE, VOUCHER): ("_ignore", {_P.DONE}),  # a late final voucher after we gave up waiting
    (_P.RUNNING, "kept"): ("_on_kept", {_P.RUNNING}),
    (_P.PAUSED, "kept"): ("_on_kept", {_P.RUNNING, _P.PAUSED}),
    (_P.STOPPING, "kept"): ("_on_kept", {_P.STOPPING}),
    (_P.SETTLING, "kept"): ("_on_kept", {_P.SETTLING}),
    (_P.DONE, "kept"): ("_on_kept", {_P.DONE}),  # written after the job ended: nothing changes
    **{(s, CANCEL): ("_on_cancel", {_P.STOPPING}) for s in _P_GEN},
    (_P.STOPPING, CANCEL): ("_ignore", {_P.STOPPING}),  # we stopped too
    (_P.SETTLING, CANCEL): ("_ignore", {_P.SETTLING}),  # crossed our receipt
    (_P.DONE, CANCEL): ("_ignore", {_P.DONE}),
    **{(s, "cancel"): ("_cancel", {_P.STOPPING}) for s in _P_GEN},
    **{(s, "finished"): ("_finished", {_P.SETTLING, _P.DONE}) for s in (*_P_GEN, _P.STOPPING)},
    **{(s, "failed"): ("_failed", {_P.DONE}) for s in (*_P_GEN, _P.STOPPING)},
    **{(s, "lost"): ("_lost", {_P.DONE}) for s in (_P.DECIDING, *_P_GEN, _P.STOPPING, _P.SETTLING)},
    (_P.PAUSED, TIMER): ("_timer", {_P.PAUSED, _P.STOPPING}),
    (_P.SETTLING, TIMER): ("_timer", {_P.SETTLING, _P.DONE}),
}


class ProviderSession(_Machine):
    """The provider's side of one job.

    ``receive`` the REQUEST; after ``RequestReceived`` check it against the
    offer and ledger and call ``accept``/``reject``. Feed model output with
    ``tokens`` and end with ``finished`` (always, also after
    ``StopGeneration``) or ``failed``. Ends with at most one ``Claim``.
    With ``config.durable_vouchers``, answer each ``KeepVoucher`` with
    ``voucher_kept`` once the voucher is on disk.
    """

    _TABLE = _PROVIDER_TABLE
    _REMOTE_EVENTS = frozenset(FRAME_NAMES)

    def __init__(self, key: NodeKey, network_id: bytes, config: SessionConfig = SessionConfig()) -> None:
        self.key = key
        self.network_id = network_id
        self.config = config
        self.state = _P.WAITING
        self.job_id = b""
        self.request: JobRequest | None = None
        self.sent = 0  # output tokens sent
        self.seq = 0
        self.buffer: tuple[tuple[str, int, int], ...] = ()  # (text, count, channel) produced while paused
        self.paid = 0  # the newest voucher's amount (what we claim)
        self.kept = 0  # the newest voucher the edge made durable (what a crash leaves us); the window counts from it
        self.voucher: Signed | None = None
        self.deadline: int | None = None
        self.stop_reason: int | None = None
        self.cancelled = False
        self.final_cost = 0
        self._hash = hashlib.blake2b(digest_size=32)

    # --- inputs
    def receive(self, data: bytes, now_ms: int) -> list[Action]:
        frame = decode_frame(data)
        if self.state is _P.WAITING:
            if frame.type != REQUEST:
                raise ProtocolViolation(f"{FRAME_NAMES[frame.type]} frame before the request")
        elif frame.job_id != self.job_id:
            raise ProtocolViolation("frame names another job")
        return self._dispatch(frame.type, frame, now_ms)

    def open(self, now_ms: int) -> list[Action]:
        """The stream is open: the request must come within ``request_wait_ms``.
        A consumer may open a stream ahead of its next job, so waiting is
        normal; waiting for ever would let idle streams pile up."""
        return self._dispatch("open", now_ms)

    def accept(self, now_ms: int) -> list[Action]:
        return self._dispatch("accept", now_ms)

    def reject(self, now_ms: int, code: int, text: str) -> list[Action]:
        return self._dispatch("reject", now_ms, code, text)

    def tokens(self, now_ms: int, text: str, count: int = 1, channel: int = CONTENT) -> list[Action]:
        """Model output: ``count`` tokens of ``text`` (one Ollama stream
        chunk) on output ``channel`` (an embedding: one vector, count 1)."""
        return self._dispatch("tokens", now_ms, text, count, channel)

    def finished(self, now_ms: int, prompt_eval_count: int, eval_count: int,
                 durations_ns: tuple[int, int, int, int] = (0, 0, 0, 0)) -> list[Action]:
        return self._dispatch("finished", now_ms, prompt_eval_count, eval_count, durations_ns)

    def failed(self, now_ms: int, reason: str) -> list[Action]:
        return self._dispatch("failed", now_ms, reason)

    def cancel(self, now_ms: int, reason: str, code: int = R_OTHER) -> list[Action]:
        return self._dispatch("cancel", now_ms, code, reason)

    def connection_lost(self, now_ms: int) -> list[Action]:
        if self.state in (_P.WAITING, _P.DONE):
            return []
        return self._dispatch("lost", now_ms)

    def voucher_kept(self, now_ms: int, amount: int) -> list[Action]:
        """The voucher of ``amount`` (from a ``KeepVoucher``) is durable now."""
        return self._dispatch("kept", now_ms, amount)

    def next_deadline(self) -> int | None:
        return self.deadline

    def on_timer(self, now_ms: int) -> list[Action]:
        if self.deadline is None or now_ms < self.deadline:
            return []
        return self._dispatch(TIMER, now_ms)

    def snapshot(self) -> tuple:
        return (self.state, self.job_id, self.sent, self.seq, self.buffer, self.paid, self.kept,
                self.deadline, self.stop_reason, self.cancelled, self._hash.digest())

    # --- helpers
    @property
    def unpaid_tokens(self) -> int:
        """Output tokens sent beyond what the newest voucher pays for (0 when
        paid up): what this consumer owes us if the job ends now."""
        if self.request is None:
            return 0
        return max(0, self.sent - covered_tokens(self.request.prices, self.paid))

    @property
    def covered(self) -> int:
        """Output tokens the kept vouchers pay for: what we may send is this plus the window."""
        assert self.request is not None
        return covered_tokens(self.request.prices, self.kept)

    def _window_full(self, amount: int | None = None) -> bool:
        """Whether we have sent a whole window past ``amount`` (default: the kept voucher)."""
        assert self.request is not None
        covered = self.covered if amount is None else covered_tokens(self.request.prices, amount)
        return self.sent - covered >= self.request.credit_window

    def _send_tokens(self, text: str, count: int, channel: int) -> Send:
        assert self.request is not None
        if self.sent + count > self.request.max_tokens:
            raise LocalProtocolError(f"{self.sent + count} tokens exceed the request's max_tokens")
        self.sent += count
        hash_output(self._hash, text, channel)
        if channel == CONTENT:  # content frames are as they were before channels
            frame = encode_frame(TOKENS, self.job_id, self.seq, text, count, self.sent)
        else:
            frame = encode_frame(TOKENS, self.job_id, self.seq, text, count, self.sent, channel)
        self.seq += 1
        return Send(frame)

    def _claim(self) -> list[Action]:
        if self.voucher is None or self.request is None:
            return []
        log.info("job %s: claiming %s coins", self.job_id.hex()[:8], format_coins(self.paid))
        return [Claim(self.request.hold_id, self.voucher, self.paid)]

    def _waiver(self, reason: str, now_ms: int) -> bytes:
        assert self.request is not None
        return make_waiver(self.key, self.network_id, self.request.hold_id, reason, now_ms).wire

    def _stop(self, now_ms: int, reason: str) -> tuple[ProviderState, list[Action]]:
        self.buffer = ()
        self.deadline = None
        return _P.STOPPING, [StopGeneration(reason)]

    # --- handlers
    def _on_request(self, frame, now_ms):
        wire, body, context = frame.args
        request = decode_request(wire, body, self.network_id)
        hold: Hold = request.hold.body  # type: ignore[assignment]
        if request.job_id != frame.job_id:
            raise ProtocolViolation("frame and request name different jobs")
        if hold.provider != self.key.public_key:
            raise ProtocolViolation("the hold names another provider")
        if hold.expiry_ms <= now_ms:
            raise ProtocolViolation("the hold has expired")
        self.request, self.job_id = request, request.job_id
        self.deadline = None
        return _P.DECIDING, [RequestReceived(request, context)]

    def _open(self, now_ms):
        self.deadline = now_ms + self.config.request_wait_ms
        return _P.WAITING, []

    def _request_overdue(self, now_ms):
        self.deadline = None
        return _P.DONE, []

    def _accept(self, now_ms):
        log.info("job %s: accepted", self.job_id.hex()[:8])
        return _P.RUNNING, [Send(encode_frame(ACCEPT, self.job_id))]

    def _reject(self, now_ms, code, text):
        check_int(code, "reason code", 0, 255)
        text = text[:MAX_REASON_CHARS]
        return _P.DONE, [Send(encode_frame(REJECT, self.job_id, code, text, self._waiver(text, now_ms)))]

    def _on_cancel_early(self, frame, now_ms):
        return _P.DONE, []

    def _tokens(self, now_ms, text, count, channel):
        check_str(text, "text", MAX_TOKENS_TEXT)
        check_int(count, "count", 1, MAX_TOKENS_PER_FRAME)
        check_int(channel, "channel", CONTENT, max(CHANNEL_NAMES))
        assert self.request is not None
        refusal = output_refusal(self.request.kind, channel, text, count)
        if refusal is not None:
            raise LocalProtocolError(refusal)
        if self.state is _P.PAUSED:
            if self.sent + sum(c for _, c, _ in self.buffer) + count > self.request.max_tokens:
                raise LocalProtocolError("tokens exceed the request's max_tokens")
            self.buffer += ((text, count, channel),)
            return _P.PAUSED, []
        actions: list[Action] = [self._send_tokens(text, count, channel)]
        if self._window_full():
            self.deadline = now_ms + self.config.pause_grace_ms
            log.info("job %s: credit window full, pausing", self.job_id.hex()[:8])
            return _P.PAUSED, actions + [Pause()]
        return _P.RUNNING, actions

    def _drop_tokens(self, now_ms, text, count, channel):
        return _P.STOPPING, []

    def _on_voucher(self, frame, now_ms):
        assert self.request is not None
        voucher = decode_signed(frame.args[0], network_id=self.network_id, tags=(Tag.VOUCHER,))
        fields = check_list(list(voucher.fields), "voucher fields", length=2)
        check_bytes(fields[0], "voucher hold id", size=ID_SIZE)
        amount = check_int(fields[1], "voucher amount", 1, MAX_AMOUNT)
        if voucher.signer != self.request.consumer or fields[0] != self.request.hold_id:
            raise ProtocolViolation("voucher is not the consumer's voucher for this hold")
        if amount <= self.paid:
            raise ProtocolViolation(f"voucher of {amount} does not exceed the previous {self.paid}")
        if amount > self.request.hold.body.amount:  # type: ignore[union-attr]
            raise ProtocolViolation("voucher exceeds the hold")
        self.voucher, self.paid = voucher, amount
        if self.state is _P.SETTLING and amount >= self.final_cost:
            self.deadline = None
            return _P.DONE, self._claim()  # the CLAIM is durable: nothing to keep
        if self.config.durable_vouchers:
            return self.state, [KeepVoucher(voucher, amount)]
        self.kept = amount
        return self._resume_if_paused()

    def _on_kept(self, now_ms, amount):
        check_int(amount, "kept amount", 1, MAX_AMOUNT)
        if amount > self.paid:
            raise LocalProtocolError(f"no voucher of {amount} was received (the newest is {self.paid})")
        self.kept = max(self.kept, amount)
        return self._resume_if_paused()

    def _resume_if_paused(self) -> tuple[ProviderState, list[Action]]:
        if self.state is not _P.PAUSED:
            return self.state, []
        actions: list[Action] = []
        # Flush what was produced while paused, as far as the window allows.
        while self.buffer and not self._window_full():
            (text, count, channel), self.buffer = self.buffer[0], self.buffer[1:]
            actions.append(self._send_tokens(text, count, channel))
        if self._window_full():
            return _P.PAUSED, actions
        self.deadline = None
        return _P.RUNNING, actions + [Resume()]

    def _on_cancel(self, frame, now_ms):
        self.cancelled = True
        return self._stop(now_ms, "cancelled by the consumer")

    def _cancel(self, now_ms, code, reason):
        self.cancelled = True
        state, actions = self._stop(now_ms, reason)
        return state, [Send(encode_frame(CANCEL, self.job_id, code, reason[:MAX_REASON_CHARS]))] + actions

    def _finished(self, now_ms, prompt_eval_count, eval_count, durations_ns):
        assert self.request is not None
        check_int(prompt_eval_count, "prompt eval count", 0, MAX_JOB_TOKENS)
        check_int(eval_count, "eval count", 0, MAX_JOB_TOKENS)
        durations = tuple(check_int(d, "duration") for d in durations_ns)
        if len(durations) != 4:
            raise LocalProtocolError("durations are (total, load, prompt_eval, eval)")
        actions: list[Action] = []
        if self.state is _P.PAUSED and self.buffer:
            # The model is done but the consumer has not paid for the rest: stop here.
            self.buffer, self.cancelled = (), True
        in_tokens = min(prompt_eval_count, self.request.max_prompt_tokens)
        self.final_cost = job_cost(self.request.prices, in_tokens, self.sent)
        status = CANCELLED if self.cancelled else DONE
        receipt = make_receipt(
            self.key, self.network_id, now_ms, job_id=self.job_id, hold_id=self.request.hold_id,
            status=status, prompt_eval_count=prompt_eval_count, eval_count=eval_count,
            output_tokens=self.sent, durations_ns=durations, out_hash=self._hash.digest(), cost=self.final_cost,
        )
        actions.append(Send(encode_frame(RECEIPT, self.job_id, receipt.wire)))
        if self.paid >= self.final_cost:  # nothing more to wait for
            self.deadline = None
            return _P.DONE, actions + self._claim()
        self.deadline = now_ms + self.config.settle_ms
        return _P.SETTLING, actions

    def _failed(self, now_ms, reason):
        waiver = self._waiver(reason, now_ms) if self.voucher is None else b""
        frame = encode_frame(ERROR, self.job_id, R_BACKEND, reason[:MAX_REASON_CHARS], waiver)
        self.deadline = None
        return _P.DONE, [Send(frame)] + self._claim()

    def _lost(self, now_ms):
        self.deadline = None
        actions: list[Action] = []
        if self.state in _P_GEN:
            actions.append(StopGeneration("connection lost"))
        return _P.DONE, actions + self._claim()

    def _timer(self, now_ms):
        if self.state is _P.PAUSED and not self._window_full(self.paid):
            # The consumer paid; only our keeping of its voucher is behind.
            self.deadline = now_ms + self.config.pause_grace_ms
            return _P.PAUSED, []
        if self.state is _P.PAUSED:
            self.cancelled = True
            state, actions = self._stop(now_ms, "unpaid")
            log.info("job %s: consumer stopped paying, stopping", self.job_id.hex()[:8])
            return state, [Send(encode_frame(CANCEL, self.job_id, R_UNPAID, "credit window exceeded"))] + actions
        self.deadline = None
        return _P.DONE, self._claim()

    def _ignore(self, frame, now_ms):
        return self.state, []

"""Signed GPU offers and withdrawals, and the offer book every node keeps
(DESIGN §4 "Offers"; the wire is written out in docs/protocol-offers.md).

Theory of operation
-------------------
A provider publishes a signed **offer** on every heartbeat (about 10 s) with a
short TTL (about 30 s), and a signed **withdrawal** when it shuts down. Offers
are not a log: each one replaces the provider's previous one, so all a peer
needs is the newest valid message per provider. Liveness is the heartbeat: a
provider that stops announcing drops out of every book within its TTL.

Which message is "newest" is one total order per provider, the **order key**::

    offer       (seq, 0, BLAKE2b-256(wire))
    withdrawal  (seq, 1, b"")

compared lexicographically. A book accepts a message iff its key is greater
than the greatest key it has accepted from that provider (the provider's
*high mark*). So:

- a higher ``seq`` always wins; a replay, a duplicate or an older offer is
  refused (``SeqNotNewer``) and therefore not forwarded;
- a withdrawal with seq ``s`` removes the provider's offers with seq ``<= s``
  (it beats an offer of the same seq), and from then on every offer with seq
  ``<= s`` is refused: a replayed old offer cannot resurrect a provider that
  left. A replayed old withdrawal cannot kill a newer offer either, because
  the newer offer's key is greater. A provider that restarts simply publishes
  with a higher seq (``next_seq`` derives seqs from the clock, so nothing has
  to be persisted);
- two *different* messages with one key are impossible except for an
  equivocating provider (two offers signed with the same seq). The wire-hash
  tie-break still picks the same winner in every book, so books converge
  whatever order gossip delivers in. Two withdrawals of one seq have the same
  effect, so the second is refused as a duplicate.

Since the final state is "the message with the greatest key, unless it is a
withdrawal", replicas that saw the same valid messages hold the same offer.

How long a high mark is remembered
----------------------------------
The book must keep a provider's high mark after the offer is gone (withdrawn
or expired), or a replay of an older, still-unexpired offer would be accepted
again. It keeps it until ``forget_at = max(timestamp_ms) + max_ttl_ms`` over
the provider's accepted messages. Any offer the provider signed *before* its
newest message has ``timestamp <= that timestamp`` and so expires by
``forget_at``: after that the expiry check refuses it anyway. This relies on
the provider's timestamps not going backwards as its seq grows (``next_seq``
and a sane clock give that); if they do, an older offer can be accepted once
more, until its own expiry. The bound is computed from signed values only, so
every book forgets at the same moment.

Withdrawals older than ``max_ttl_ms`` (``timestamp + max_ttl_ms <= now``)
are refused as expired: every offer they could remove has expired anyway.

Memory bounds
-------------
At most ``max_providers`` offers and ``max_tombstones`` remembered high marks
of providers without an offer. A new provider's offer arriving at a full book
first makes the book drop expired offers; if it is still full, the offer that
expires first (ties: smaller provider key) is evicted to make room, unless the
new offer would expire first itself, in which case it is refused with
``BookFull`` (valid, just not kept). At the tombstone bound, the tombstone
that would be forgotten soonest goes; the only cost is that a replayed older
offer of that provider can be accepted once more and live until its own
expiry (at most ``max_ttl_ms``). Convergence is guaranteed only while neither
bound is reached.

Checks run cheapest first (size, shape, network, fields, times, seq, then the
signature), so a message with several faults is refused for the first one.

Pure module: no I/O; time is always the ``now_ms`` parameter.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple, Sequence

from p2pgpu import __version__
from p2pgpu.core.codec import (
    MAX_INT,
    MAX_TIMESTAMP_MS,
    NETWORK_ID_SIZE,
    Signed,
    Tag,
    check_bytes,
    check_int,
    check_list,
    check_str,
    decode_signed,
    sign_object,
)
from p2pgpu.core.hardware import HardwareReport
from p2pgpu.core.identity import NodeKey, peer_id_from_public_key
from p2pgpu.core.protocols import MAX_GOSSIP_MESSAGE
from p2pgpu.errors import ConfigError, MalformedInput, Oversized, P2PGPUError

__all__ = [
    "BookFull",
    "DEFAULT_AGENT",
    "DEFAULT_MAX_SKEW_MS",
    "DEFAULT_MAX_TTL_MS",
    "Expired",
    "FutureTimestamp",
    "MAX_ADDRS",
    "MAX_ADDR_CHARS",
    "MAX_AGENT_CHARS",
    "MAX_MODELS",
    "MAX_MODEL_NAME_CHARS",
    "MAX_OFFER_SIZE",
    "MAX_PRICE",
    "MAX_SEQ",
    "MAX_SLOTS",
    "ModelOffer",
    "Offer",
    "OfferBook",
    "OfferMessage",
    "SeqNotNewer",
    "StaleOffer",
    "TtlTooLong",
    "Withdrawal",
    "decode_offer_message",
    "make_offer",
    "make_withdrawal",
    "next_seq",
    "normalize_model_name",
    "order_key",
]

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------ limits

MAX_OFFER_SIZE = 8 * 1024
"""Largest offer or withdrawal on the wire (the ``[payload, signature]`` bytes).

A realistic offer (8 GPUs, 50 models, 4 addresses) is about 3.5 KB. Every node
pays for every gossip byte every 10 s per provider, so the cap sits well below
``MAX_GOSSIP_MESSAGE``."""
assert MAX_OFFER_SIZE < MAX_GOSSIP_MESSAGE

MAX_SEQ = 2**62
MAX_PRICE = 2**62  # base units per million tokens; sums stay inside int64
MAX_SLOTS = 1024
MAX_MODELS = 256
MAX_MODEL_NAME_CHARS = 128
MAX_ADDRS = 8
MAX_ADDR_CHARS = 256
MAX_AGENT_CHARS = 64

DEFAULT_MAX_SKEW_MS = 60_000
"""How far a message's timestamp may be ahead of our clock (same as the ledger)."""
DEFAULT_MAX_TTL_MS = 120_000
"""Longest lifetime (expiry - timestamp) an offer may ask for: four heartbeats
of the default 30 s TTL. A longer one would keep a dead provider listed."""

DEFAULT_AGENT = f"p2pgpu/{__version__}"

OFFER_FIELDS = 11
WITHDRAWAL_FIELDS = 1
_TAGS = (Tag.OFFER, Tag.WITHDRAWAL)
_OFFER_RANK, _WITHDRAWAL_RANK = 0, 1


# ------------------------------------------------------------------ errors


class StaleOffer(MalformedInput):
    """A well-formed offer or withdrawal that is not acceptable at this time or
    in this order. The subclasses say which; each is the sender's (or the
    gossip path's) business, never ours: log at DEBUG and drop."""


class Expired(StaleOffer):
    """An offer whose expiry is not after our clock, or a withdrawal older than
    ``max_ttl_ms`` (every offer it could remove has expired too)."""


class FutureTimestamp(StaleOffer):
    """Stamped further ahead of our clock than ``max_skew_ms``: a broken clock,
    or an attempt to pre-sign offers that outlive the TTL rule."""


class TtlTooLong(StaleOffer):
    """``expiry - timestamp`` exceeds ``max_ttl_ms``: the offer would keep the
    provider listed long after it stopped heartbeating."""


class SeqNotNewer(StaleOffer):
    """Not newer than what this book already accepted from the provider: a
    replay, a duplicate, an older heartbeat overtaken by a newer one, or an
    offer withdrawn by a withdrawal with a seq at least as high."""


class BookFull(P2PGPUError):
    """A valid offer from a new provider did not fit into a full book because
    every stored offer outlives it. Not the sender's fault: it may still be
    forwarded (``check`` passed)."""


# ------------------------------------------------------------------ model names


def normalize_model_name(name: str) -> str:
    """Ollama's model identity: lower case, ``:latest`` when no tag is given,
    and ``registry.ollama.ai/`` and ``library/`` dropped (Ollama treats
    ``registry.ollama.ai/library/llama3.2`` and ``llama3.2`` as one model).

    The one definition: offers, ranking, jobs and the Ollama stand-in all use
    it, so a name a user types, the name a provider's Ollama lists and the
    name in an offer meet.
    """
    name = name.strip().lower()
    for prefix in ("registry.ollama.ai/", "library/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    if name and ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


def _check_text(value: Any, what: str, max_chars: int, *, allow_empty: bool = True) -> str:
    # Peer strings end up in terminal tables and logs: printable only, so an
    # escape sequence in a model name cannot repaint an operator's screen.
    check_str(value, what, max_chars)
    if not allow_empty and not value:
        raise MalformedInput(f"{what}: must not be empty")
    if not value.isprintable():
        raise MalformedInput(f"{what}: contains control or unprintable characters")
    return value


def _check_bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise MalformedInput(f"{what}: expected a boolean, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------ values


@dataclass(frozen=True, slots=True)
class ModelOffer:
    """One model a provider's Ollama serves.

    ``warm`` means loaded right now (``/api/ps``): the first token comes
    without a load delay. ``size_bytes`` is the model's size on disk from
    ``/api/tags`` (None if unknown): a rough guide to how much VRAM it needs.
    ``key`` is the normalised name (``normalize_model_name``) used for matching.
    Validates itself on construction with the checks applied to a peer's input.
    """

    name: str
    warm: bool = False
    size_bytes: int | None = None
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_text(self.name, "model name", MAX_MODEL_NAME_CHARS, allow_empty=False)
        if any(c.isspace() for c in self.name):
            raise MalformedInput(f"model name {self.name!r}: contains whitespace")
        _check_bool(self.warm, f"model {self.name!r} warm flag")
        if self.size_bytes is not None:
            check_int(self.size_bytes, f"model {self.name!r} size", 0, MAX_INT)
        key = normalize_model_name(self.name)
        if not key:
            raise MalformedInput(f"model name {self.name!r}: names no model")
        object.__setattr__(self, "key", key)

    def to_wire(self) -> list[Any]:
        return [self.name, self.warm, self.size_bytes]

    @classmethod
    def from_wire(cls, value: Any) -> ModelOffer:
        check_list(value, "model entry", length=3)
        return cls(value[0], value[1], value[2])


@dataclass(frozen=True, slots=True)
class Offer:
    """A decoded, validated offer. Build it with ``decode_offer_message`` (or
    through an ``OfferBook``), never by hand: ``signed`` keeps the exact bytes
    that were signed, which are what gets stored and forwarded.

    Prices are integer base units per million input / output tokens.
    ``slots_free`` of ``slots_total`` is how many more jobs the provider will
    take at once right now (its own admission control, DESIGN §6).
    """

    signed: Signed
    provider: bytes  # 32-byte ed25519 public key: the signer
    seq: int
    timestamp_ms: int
    expiry_ms: int
    hardware: HardwareReport
    models: tuple[ModelOffer, ...]
    price_in: int
    price_out: int
    slots_free: int
    slots_total: int
    addrs: tuple[str, ...]
    cpu: bool
    agent: str
    model_keys: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_keys", frozenset(m.key for m in self.models))

    @property
    def peer_id(self) -> str:
        """The provider's libp2p peer id (``12D3KooW...``), its ledger account."""
        return peer_id_from_public_key(self.provider)

    @property
    def ttl_ms(self) -> int:
        return self.expiry_ms - self.timestamp_ms

    @property
    def wire(self) -> bytes:
        """The bytes to store and forward, exactly as signed."""
        return self.signed.wire

    def is_live(self, now_ms: int) -> bool:
        return now_ms < self.expiry_ms

    def serves(self, model_name: str) -> bool:
        """Whether the provider lists ``model_name``, compared the way Ollama
        compares names (``normalize_model_name``): ``Llama3`` matches
        ``llama3:latest``."""
        return normalize_model_name(model_name) in self.model_keys

    def __repr__(self) -> str:
        return (
            f"Offer({self.peer_id[-8:]}#{self.seq} out={self.price_out} "
            f"slots={self.slots_free}/{self.slots_total} models={len(self.models)})"
        )


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """A decoded, validated withdrawal: the provider's offers with
    ``seq <= self.seq`` are gone, and stay gone."""

    signed: Signed
    provider: bytes
    seq: int
    timestamp_ms: int

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.provider)

    @property
    def wire(self) -> bytes:
        return self.signed.wire

    def __repr__(self) -> str:
        return f"Withdrawal({self.peer_id[-8:]}#{self.seq})"


OfferMessage = Offer | Withdrawal


def order_key(message: OfferMessage) -> tuple[int, int, bytes]:
    """The per-provider total order (module docstring): greater is newer."""
    if type(message) is Withdrawal:
        return (message.seq, _WITHDRAWAL_RANK, b"")
    return (message.seq, _OFFER_RANK, hashlib.blake2b(message.signed.wire, digest_size=32).digest())


def next_seq(previous: int | None, now_ms: int) -> int:
    """A provider's next seq: the clock, but always above the last one used.

    Clock-derived seqs survive a restart with nothing persisted (the new offer
    outranks every offer and the withdrawal of the previous run), and keep seq
    and timestamp growing together, which is what lets books forget old high
    marks safely (module docstring)."""
    return max(now_ms, 0 if previous is None else previous + 1)


# ------------------------------------------------------------------ field checks


class _OfferFields(NamedTuple):
    seq: int
    expiry_ms: int
    hardware: HardwareReport
    models: tuple[ModelOffer, ...]
    price_in: int
    price_out: int
    slots_free: int
    slots_total: int
    addrs: tuple[str, ...]
    cpu: bool
    agent: str


def _parse_offer_fields(fields: Sequence[Any], timestamp_ms: int) -> _OfferFields:
    """Shape checks of an offer's fields, shared by the decoder and
    ``make_offer`` (which runs them on the wire form it is about to sign, so
    it can never sign what a peer would refuse). Raises MalformedInput."""
    if len(fields) != OFFER_FIELDS:
        raise MalformedInput(f"offer: expected {OFFER_FIELDS} fields after the header, got {len(fields)}")
    seq, expiry_ms, hardware, models, price_in, price_out, slots_free, slots_total, addrs, cpu, agent = fields
    check_int(seq, "offer seq", 1, MAX_SEQ)
    check_int(expiry_ms, "offer expiry", 0, MAX_TIMESTAMP_MS)
    if expiry_ms <= timestamp_ms:
        raise MalformedInput(f"offer expiry {expiry_ms} is not after its timestamp {timestamp_ms}")
    report = HardwareReport.from_wire(hardware)
    check_list(models, "offer models", max_len=MAX_MODELS)
    model_offers = tuple(ModelOffer.from_wire(m) for m in models)
    if len({m.key for m in model_offers}) != len(model_offers):
        raise MalformedInput("offer models: a model is listed twice (names compared as Ollama does)")
    check_int(price_in, "input price", 0, MAX_PRICE)
    check_int(price_out, "output price", 0, MAX_PRICE)
    check_int(slots_free, "free slots", 0, MAX_SLOTS)
    check_int(slots_total, "total slots", 0, MAX_SLOTS)
    if slots_free > slots_total:
        raise MalformedInput(f"free slots {slots_free} exceed total slots {slots_total}")
    check_list(addrs, "offer addresses", max_len=MAX_ADDRS)
    for addr in addrs:
        _check_text(addr, "address", MAX_ADDR_CHARS, allow_empty=False)
        # A multiaddr is ASCII, starts with "/" and has no spaces. Parsing it
        # properly is the network edge's job when it dials.
        if not addr.startswith("/") or not addr.isascii() or " " in addr:
            raise MalformedInput(f"address {addr!r} is not a multiaddr")
    _check_bool(cpu, "cpu flag")
    _check_text(agent, "agent", MAX_AGENT_CHARS)
    return _OfferFields(
        seq, expiry_ms, report, model_offers, price_in, price_out, slots_free, slots_total,
        tuple(addrs), cpu, agent,
    )


def _parse_offer(signed: Signed) -> Offer:
    f = _parse_offer_fields(signed.fields, signed.timestamp_ms)
    return Offer(
        signed, signed.signer, f.seq, signed.timestamp_ms, f.expiry_ms, f.hardware, f.models,
        f.price_in, f.price_out, f.slots_free, f.slots_total, f.addrs, f.cpu, f.agent,
    )


def _parse_withdrawal(signed: Signed) -> Withdrawal:
    if len(signed.fields) != WITHDRAWAL_FIELDS:
        raise MalformedInput(
            f"withdrawal: expected {WITHDRAWAL_FIELDS} field after the header, got {len(signed.fields)}"
        )
    seq = check_int(signed.fields[0], "withdrawal seq", 1, MAX_SEQ)
    return Withdrawal(signed, signed.signer, seq, signed.timestamp_ms)


def _who(message: OfferMessage) -> str:
    kind = "offer" if type(message) is Offer else "withdrawal"
    return f"{kind} from {message.peer_id} seq {message.seq}"


def _check_times(message: OfferMessage, now_ms: int, max_skew_ms: int, max_ttl_ms: int) -> None:
    if type(message) is Offer and message.ttl_ms > max_ttl_ms:
        raise TtlTooLong(f"{_who(message)}: lifetime {message.ttl_ms} ms exceeds the limit of {max_ttl_ms} ms")
    if message.timestamp_ms > now_ms + max_skew_ms:
        raise FutureTimestamp(
            f"{_who(message)}: stamped {message.timestamp_ms - now_ms} ms ahead of our clock "
            f"(limit {max_skew_ms} ms)"
        )
    if type(message) is Offer:
        if message.expiry_ms <= now_ms:
            raise Expired(f"{_who(message)}: expired {now_ms - message.expiry_ms} ms ago")
    elif message.timestamp_ms + max_ttl_ms <= now_ms:
        raise Expired(
            f"{_who(message)}: {now_ms - message.timestamp_ms} ms old, older than the "
            f"longest offer lifetime ({max_ttl_ms} ms), so there is nothing left for it to withdraw"
        )


def _decode_unverified(
    wire: bytes, network_id: bytes, now_ms: int, max_skew_ms: int, max_ttl_ms: int
) -> OfferMessage:
    signed = decode_signed(wire, network_id=network_id, tags=_TAGS, max_size=MAX_OFFER_SIZE, verify=False)
    message: OfferMessage = _parse_offer(signed) if signed.tag == Tag.OFFER else _parse_withdrawal(signed)
    _check_times(message, now_ms, max_skew_ms, max_ttl_ms)
    return message


def decode_offer_message(
    wire: bytes,
    network_id: bytes,
    now_ms: int,
    *,
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
    max_ttl_ms: int = DEFAULT_MAX_TTL_MS,
) -> OfferMessage:
    """Decode and fully check one offer or withdrawal from an untrusted peer,
    on its own (no book: ``OfferBook.check`` adds the seq rule).

    Raises, cheapest check first: ``Oversized`` (over ``MAX_OFFER_SIZE``),
    ``Truncated``, ``MalformedInput`` / ``NonCanonical`` (shape, types, field
    limits), ``UnknownType`` (another tag, unknown version), ``WrongNetwork``,
    ``TtlTooLong``, ``FutureTimestamp``, ``Expired``, then ``BadSignature``.
    """
    message = _decode_unverified(wire, network_id, now_ms, max_skew_ms, max_ttl_ms)
    message.signed.verify()
    return message


# ------------------------------------------------------------------ making


def _sign_checked(key: NodeKey, tag: int, network_id: bytes, now_ms: int, fields: list[Any]) -> Signed:
    signed = sign_object(key, tag, network_id, now_ms, fields)
    if len(signed.wire) > MAX_OFFER_SIZE:
        raise Oversized(
            f"{Tag.NAMES[tag]}: {len(signed.wire)} bytes exceeds the limit of {MAX_OFFER_SIZE}; "
            "list fewer models or addresses"
        )
    return signed


def make_offer(
    key: NodeKey,
    network_id: bytes,
    now_ms: int,
    *,
    seq: int,
    ttl_ms: int,
    hardware: HardwareReport,
    models: Iterable[ModelOffer],
    price_in: int,
    price_out: int,
    slots_free: int,
    slots_total: int,
    addrs: Iterable[str],
    cpu: bool = False,
    agent: str = DEFAULT_AGENT,
    max_ttl_ms: int = DEFAULT_MAX_TTL_MS,
) -> Signed:
    """Sign an offer stamped ``now_ms`` that expires at ``now_ms + ttl_ms``.

    Runs the decoder's own field checks on the exact values it signs and
    refuses (MalformedInput, Oversized, TtlTooLong) anything a peer with the
    default limits would reject, so a bad offer fails here, loudly, instead
    of vanishing in every peer's validator.
    """
    check_bytes(network_id, "network id", size=NETWORK_ID_SIZE)
    check_int(now_ms, "timestamp", 0, MAX_TIMESTAMP_MS)
    check_int(ttl_ms, "ttl", 1, MAX_TIMESTAMP_MS)
    if ttl_ms > max_ttl_ms:
        raise TtlTooLong(f"offer ttl {ttl_ms} ms exceeds the limit of {max_ttl_ms} ms")
    if type(hardware) is not HardwareReport:
        raise MalformedInput(f"hardware: expected a HardwareReport, got {type(hardware).__name__}")
    models = list(models)
    if not all(type(m) is ModelOffer for m in models):
        raise MalformedInput("models: expected ModelOffer values")
    fields = [
        seq, now_ms + ttl_ms, hardware.to_wire(), [m.to_wire() for m in models],
        price_in, price_out, slots_free, slots_total, list(addrs), cpu, agent,
    ]
    _parse_offer_fields(fields, now_ms)
    return _sign_checked(key, Tag.OFFER, network_id, now_ms, fields)


def make_withdrawal(key: NodeKey, network_id: bytes, now_ms: int, seq: int) -> Signed:
    """Sign a withdrawal of every offer of ours with seq ``<= seq``.

    Use a seq above the last offer's (``next_seq``) so that the withdrawal
    also outranks any offer still in flight, and publish a higher seq after
    a restart."""
    check_bytes(network_id, "network id", size=NETWORK_ID_SIZE)
    check_int(now_ms, "timestamp", 0, MAX_TIMESTAMP_MS)
    check_int(seq, "withdrawal seq", 1, MAX_SEQ)
    return _sign_checked(key, Tag.WITHDRAWAL, network_id, now_ms, [seq])


# ------------------------------------------------------------------ the book


class _Live(NamedTuple):
    offer: Offer
    key: tuple[int, int, bytes]
    forget_at: int


class _Tombstone(NamedTuple):
    key: tuple[int, int, bytes]
    forget_at: int


class OfferBook:
    """The newest valid offer per provider, and the high marks that keep
    replays out. Pure and single-threaded; the node feeds it gossip.

    ``check`` is what the gossip topic validator calls: it has no side
    effects, and a message it passes is exactly one worth forwarding (a
    duplicate of the stored offer is refused, so it is not forwarded again).
    ``accept`` is ``check`` plus storing; a validator may call it directly.

    Expired offers stay stored until ``expire`` removes them, but every
    query that takes ``now_ms`` ignores them, so results do not depend on
    when housekeeping last ran. See the module docstring for the ordering
    rule and the memory bounds.
    """

    def __init__(
        self,
        network_id: bytes,
        *,
        max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
        max_ttl_ms: int = DEFAULT_MAX_TTL_MS,
        max_providers: int = 10_000,
        max_tombstones: int | None = None,
    ) -> None:
        if type(network_id) is not bytes or len(network_id) != NETWORK_ID_SIZE:
            raise ConfigError(f"a network id is {NETWORK_ID_SIZE} bytes")
        for name, value in (("max_skew_ms", max_skew_ms), ("max_ttl_ms", max_ttl_ms), ("max_providers", max_providers)):
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if max_tombstones is None:
            max_tombstones = max_providers
        if type(max_tombstones) is not int or max_tombstones < 0:
            raise ConfigError(f"max_tombstones must be a non-negative integer, got {max_tombstones!r}")
        self.network_id = network_id
        self.max_skew_ms = max_skew_ms
        self.max_ttl_ms = max_ttl_ms
        self.max_providers = max_providers
        self.max_tombstones = max_tombstones
        self._offers: dict[bytes, _Live] = {}
        self._tombstones: dict[bytes, _Tombstone] = {}
        # Lazy-deletion heaps: entries whose record has changed are skipped
        # when popped, and the heaps are rebuilt when stale entries pile up.
        self._expiry_heap: list[tuple[int, bytes, tuple[int, int, bytes]]] = []
        self._forget_heap: list[tuple[int, bytes, tuple[int, int, bytes]]] = []

    def __len__(self) -> int:
        """Offers stored, expired ones not yet removed by ``expire`` included."""
        return len(self._offers)

    def __contains__(self, provider: object) -> bool:
        return provider in self._offers

    # --------------------------------------------------------------- queries

    def get(self, provider: bytes, now_ms: int | None = None) -> Offer | None:
        """The provider's stored offer; with ``now_ms``, only if still live."""
        live = self._offers.get(provider)
        if live is None or (now_ms is not None and not live.offer.is_live(now_ms)):
            return None
        return live.offer

    def live(self, now_ms: int, model: str | None = None) -> list[Offer]:
        """Unexpired offers, optionally only those serving ``model`` (Ollama
        name rules), cheapest output price first, then cheapest input price,
        then provider key: the same order on every node."""
        key = None if model is None else normalize_model_name(model)
        found = [
            live.offer
            for live in self._offers.values()
            if now_ms < live.offer.expiry_ms and (key is None or key in live.offer.model_keys)
        ]
        found.sort(key=lambda o: (o.price_out, o.price_in, o.provider))
        return found

    def models(self, now_ms: int) -> dict[str, int]:
        """Normalised model name -> number of live providers serving it, by
        name: what the network offers, for "unknown model" errors."""
        counts: dict[str, int] = {}
        for live in self._offers.values():
            if now_ms < live.offer.expiry_ms:
                for name in live.offer.model_keys:
                    counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items()))

    def high_seq(self, provider: bytes, now_ms: int) -> int | None:
        """The highest seq this book remembers accepting from ``provider``."""
        record = self._record(provider, now_ms)
        return None if record is None else record.key[0]

    # --------------------------------------------------------------- input

    def check(self, wire: bytes, now_ms: int) -> OfferMessage:
        """Fully validate one gossip message against this book, changing
        nothing. Raises what ``decode_offer_message`` raises, and
        ``SeqNotNewer`` for a message not newer than the provider's high mark
        (the signature is checked last, so replays cost no verification)."""
        return self._check(wire, now_ms)[0]

    def accept(self, wire: bytes, now_ms: int) -> OfferMessage:
        """``check``, then store: an offer replaces the provider's older one;
        a withdrawal removes it and leaves a tombstone so older offers stay
        refused. Raises what ``check`` raises, and ``BookFull`` (nothing
        changed) when a new provider's offer does not fit."""
        message, key = self._check(wire, now_ms)
        provider = message.provider
        previous = self._record(provider, now_ms)
        forget_at = message.timestamp_ms + self.max_ttl_ms
        if previous is not None:
            forget_at = max(forget_at, previous.forget_at)
        if type(message) is Offer:
            if provider not in self._offers and len(self._offers) >= self.max_providers:
                self._make_room(message, now_ms)
            self._tombstones.pop(provider, None)
            self._offers[provider] = _Live(message, key, forget_at)
            self._push_expiry((message.expiry_ms, provider, key))
        else:
            if self._offers.pop(provider, None) is not None:
                logger.debug("%s withdrew its offer", message.peer_id)
            self._bury(provider, key, forget_at, now_ms)
        return message

    def expire(self, now_ms: int) -> list[bytes]:
        """Drop expired offers (returned, earliest expiry first) and forget
        high marks that no longer protect anything."""
        removed: list[bytes] = []
        heap = self._expiry_heap
        while heap and heap[0][0] <= now_ms:
            _, provider, key = heapq.heappop(heap)
            live = self._offers.get(provider)
            if live is None or live.key != key:
                continue  # superseded or withdrawn since it was pushed
            del self._offers[provider]
            removed.append(provider)
            self._bury(provider, key, live.forget_at, now_ms)
        heap = self._forget_heap
        while heap and heap[0][0] <= now_ms:
            forget_at, provider, key = heapq.heappop(heap)
            tomb = self._tombstones.get(provider)
            if tomb is not None and tomb.key == key and tomb.forget_at == forget_at:
                del self._tombstones[provider]
        if removed:
            logger.debug("%d offers expired", len(removed))
        return removed

    # --------------------------------------------------------------- internals

    def _record(self, provider: bytes, now_ms: int) -> _Live | _Tombstone | None:
        """The provider's high mark, if it still protects anything."""
        record: _Live | _Tombstone | None = self._offers.get(provider) or self._tombstones.get(provider)
        if record is None or record.forget_at <= now_ms:
            return None
        return record

    def _check(self, wire: bytes, now_ms: int) -> tuple[OfferMessage, tuple[int, int, bytes]]:
        message = _decode_unverified(wire, self.network_id, now_ms, self.max_skew_ms, self.max_ttl_ms)
        key = order_key(message)
        record = self._record(message.provider, now_ms)
        if record is not None and key <= record.key:
            raise SeqNotNewer(f"{_who(message)}: {_why_not_newer(key, record.key)}")
        message.signed.verify()
        return message, key

    def _make_room(self, offer: Offer, now_ms: int) -> None:
        self.expire(now_ms)
        if len(self._offers) < self.max_providers:
            return
        heap = self._expiry_heap
        while True:  # the earliest-expiring live offer; the heap holds every live one
            expiry, provider, key = heap[0]
            live = self._offers.get(provider)
            if live is not None and live.key == key:
                break
            heapq.heappop(heap)
        if (offer.expiry_ms, offer.provider) < (expiry, provider):
            raise BookFull(
                f"{_who(offer)}: the book holds {self.max_providers} providers and every one "
                "expires later than this offer"
            )
        heapq.heappop(heap)
        del self._offers[provider]
        logger.debug("offer book full: evicted %s", peer_id_from_public_key(provider))
        self._bury(provider, key, live.forget_at, now_ms)

    def _bury(self, provider: bytes, key: tuple[int, int, bytes], forget_at: int, now_ms: int) -> None:
        """Remember a high mark for a provider with no stored offer."""
        if forget_at <= now_ms or self.max_tombstones == 0:
            self._tombstones.pop(provider, None)
            return
        self._tombstones[provider] = _Tombstone(key, forget_at)
        self._push_forget((forget_at, provider, key))
        heap = self._forget_heap
        while len(self._tombstones) > self.max_tombstones:
            old_forget_at, old_provider, old_key = heapq.heappop(heap)
            tomb = self._tombstones.get(old_provider)
            if tomb is not None and tomb.key == old_key and tomb.forget_at == old_forget_at:
                del self._tombstones[old_provider]

    def _push_expiry(self, item: tuple[int, bytes, tuple[int, int, bytes]]) -> None:
        heapq.heappush(self._expiry_heap, item)
        if len(self._expiry_heap) > 2 * len(self._offers) + 64:
            # Superseded entries pile up (a heartbeat every 10 s, a TTL of
            # 30 s) when expire() runs rarely: rebuild from the live records.
            self._expiry_heap = [(v.offer.expiry_ms, p, v.key) for p, v in self._offers.items()]
            heapq.heapify(self._expiry_heap)

    def _push_forget(self, item: tuple[int, bytes, tuple[int, int, bytes]]) -> None:
        heapq.heappush(self._forget_heap, item)
        if len(self._forget_heap) > 2 * len(self._tombstones) + 64:
            self._forget_heap = [(t.forget_at, p, t.key) for p, t in self._tombstones.items()]
            heapq.heapify(self._forget_heap)


def _why_not_newer(key: tuple[int, int, bytes], high: tuple[int, int, bytes]) -> str:
    seq, rank, _ = key
    high_seq, high_rank, _ = high
    if key == high:
        return "a duplicate of the message already accepted"
    if seq < high_seq:
        held = "withdrawal" if high_rank == _WITHDRAWAL_RANK else "offer"
        return f"older than the {held} with seq {high_seq} already accepted"
    if high_rank == _WITHDRAWAL_RANK:
        return f"seq {seq} was withdrawn"
    # same seq, both offers: the provider signed two offers with one seq
    return (
        f"another offer with the same seq was accepted and wins the tie-break "
        f"(the provider signed two offers with seq {seq})"
    )

"""Ledger replication, sans-IO: gossip announcements, anti-entropy messages,
and the planner that decides what a peer lacks (DESIGN §5 "Replication").

Theory of operation
-------------------
Two mechanisms move ledger entries between nodes; both only ever carry entry
wires exactly as their authors signed them (DESIGN §3), so every receiver
checks every signature itself and nothing here needs to be trusted.

**Gossip** (``ledger_topic``): an *announcement* is a msgpack array of 1 to
``MAX_ANNOUNCE_ENTRIES`` entry wires. A node announces its own entries after
the commit that made them durable, entries it learned outside gossip while
they are fresh, and, when it detects a fork, the *fork proof*: the two
conflicting entries as one announcement sorted by entry id. Because gossip
message ids are content hashes, every node that detects the same fork
publishes the same bytes, so the proof crosses each link about once.

**Anti-entropy** (``LEDGER_SYNC_PROTOCOL``): pull-only request/response on a
stream of length-prefixed frames (``p2pgpu.core.framing``)::

    requester                                   responder
    HEADS(more=True) ... HEADS(more=False)  ->
                                            <-  ENTRIES ... ENTRIES  END
    or
    FETCH(ids)                              ->
                                            <-  ENTRIES ... ENTRIES  END

A summary item is ``[author, max_seq, tips]``: the author's highest sequence
number and the ids of its branch heads (one, unless the author forked). Ids
and not only numbers, because two branches at one sequence number are
exactly what a fork is: a summary of numbers alone cannot tell "same chain"
from "conflicting chain", so a node holding one branch would never be sent
the other. ``plan`` turns the requester's summary into per-author starting
points, and ``EntryStream`` merges the chains from there in (timestamp,
author, seq) order, so that the entries a RECEIVE or CLAIM names nearly always
arrive before it. The responder also learns from the summary whether the
requester holds entries *it* lacks (``Plan.peer_has_more``), and pulls them
back itself: every node only ever applies what it asked for, and one session
per direction reconciles a pair.

**State machines**: ``SyncRequester`` and ``SyncResponder`` check every
frame against the table ``_TRANSITIONS`` and the hard limits of
``SyncLimits``, and raise typed errors (``MalformedInput`` family for frames
that do not decode, ``UnexpectedMessage`` and ``LimitExceeded`` for a peer
that breaks the protocol). The edge (``p2pgpu.replication``) moves the bytes,
resets the stream on any error, and applies entries to the ledger.

The exact byte layout of every message is in docs/protocol-ledger.md.
Pure module: no trio, no libp2p; the clock is never read here.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from p2pgpu.core.codec import ID_SIZE, check_bytes, check_int, check_list, check_str, pack, unpack
from p2pgpu.core.identity import PUBLIC_KEY_SIZE
from p2pgpu.core.ledger import MAX_ENTRY_SIZE, MAX_SEQ
from p2pgpu.core.protocols import MAX_FRAME, MAX_GOSSIP_MESSAGE
from p2pgpu.errors import MalformedInput, Oversized, P2PGPUError, PeerMisbehaved, UnknownType

__all__ = [
    "MSG_HEADS",
    "MSG_ENTRIES",
    "MSG_END",
    "MSG_FETCH",
    "MSG_ERROR",
    "ERR_BUSY",
    "ERR_BAD_REQUEST",
    "ERR_INTERNAL",
    "MAX_ANNOUNCE_ENTRIES",
    "MAX_HEADS_PER_FRAME",
    "MAX_TIPS",
    "MAX_WIRES_PER_FRAME",
    "MAX_ENTRIES_FRAME_BYTES",
    "MAX_FETCH_IDS",
    "SyncLimits",
    "HeadInfo",
    "LocalHead",
    "Heads",
    "Entries",
    "End",
    "Fetch",
    "Refusal",
    "Message",
    "SyncRequest",
    "FetchRequest",
    "SyncError",
    "UnexpectedMessage",
    "LimitExceeded",
    "SyncTimeout",
    "SyncRefused",
    "encode_message",
    "decode_message",
    "encode_announcement",
    "decode_announcement",
    "pack_announcements",
    "fork_proof",
    "LedgerView",
    "local_summary",
    "summary_frames",
    "Plan",
    "plan",
    "EntryStream",
    "entry_frames",
    "order_wires",
    "SyncRequester",
    "SyncResponder",
]

# ---------------------------------------------------------------- the format

MSG_HEADS = 1  # [1, more, [[author, max_seq, [tip_id, ...]], ...]]
MSG_ENTRIES = 2  # [2, [wire, ...]]
MSG_END = 3  # [3, sent, truncated]
MSG_FETCH = 4  # [4, [id, ...]]
MSG_ERROR = 5  # [5, code, reason]
MESSAGE_NAMES = {1: "heads", 2: "entries", 3: "end", 4: "fetch", 5: "error"}

ERR_BUSY = 1  # the responder serves too many sessions (or one with us) now: retry later
ERR_BAD_REQUEST = 2  # the request broke the protocol; the responder resets after saying so
ERR_INTERNAL = 3  # the responder failed on its own side
ERROR_NAMES = {1: "busy", 2: "bad request", 3: "internal"}
MAX_ERROR_REASON = 256

MAX_HEADS_PER_FRAME = 8192
"""Summary items per HEADS frame. The largest item (16 tips) is 580 bytes, so
even a frame of fork-heavy items stays far below ``MAX_FRAME``; ordinary items
are 77 bytes (630 KiB per full frame)."""
MAX_TIPS = 16
"""Branch heads reported per author. An author with more (a key that forked
many times) is reported with its 16 smallest tip ids; the difference still
shows and the responder sends every branch."""
MAX_WIRES_PER_FRAME = 512
MAX_ENTRIES_FRAME_BYTES = MAX_FRAME - 1024
"""An ENTRIES frame holds at most 512 wires and at most this many bytes of
them, so that the frame (with its msgpack headers) never passes ``MAX_FRAME``."""
MAX_FETCH_IDS = 1024
MAX_ANNOUNCE_ENTRIES = 64
"""Entries per gossip announcement. Each unknown entry costs every node a
signature check inside the topic validator, which runs on the event loop:
64 checks are ~4 ms, which bounds the stall one message can cause."""


@dataclass(frozen=True, slots=True)
class SyncLimits:
    """Hard limits on what a peer may make us receive in one session.

    Both sides enforce them; a responder never sends more than
    ``max_session_entries`` (it ends with ``truncated=True`` and the
    requester simply asks again), so an honest peer never trips them.
    """

    max_summary_authors: int = 100_000
    max_request_frames: int = 64
    max_session_entries: int = 100_000
    max_session_frames: int = 4096
    max_fetch_ids: int = MAX_FETCH_IDS

    def __post_init__(self) -> None:
        if min(self.max_summary_authors, self.max_request_frames, self.max_session_entries,
               self.max_session_frames, self.max_fetch_ids) < 1:
            raise ValueError("every sync limit must be at least 1")
        if self.max_fetch_ids > MAX_FETCH_IDS:
            raise ValueError(f"max_fetch_ids cannot exceed the protocol's {MAX_FETCH_IDS}")


# ---------------------------------------------------------------- errors


class SyncError(PeerMisbehaved):
    """A sync peer broke the protocol (wrong message now, limit passed,
    counts that do not add up). The session is over; reset the stream."""


class UnexpectedMessage(SyncError):
    """A message that the protocol does not allow in the current state."""


class LimitExceeded(SyncError):
    """The peer sent more than ``SyncLimits`` allows."""


class SyncTimeout(SyncError):
    """The peer let a frame (or the whole session) wait past its deadline.
    Maybe only slow, but a session cannot hold a slot for ever."""


class SyncRefused(P2PGPUError):
    """The responder declined with an ERROR message (busy, or our request was
    bad). Not misbehaviour on its part: ``code`` says which."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"sync refused ({ERROR_NAMES.get(code, code)}): {reason}")
        self.code = code
        self.reason = reason


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class HeadInfo:
    """One summary item: ``author``'s highest seq and its branch heads' ids."""

    author: bytes
    seq: int
    tips: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class LocalHead:
    """What we know of one of our own chains. ``fork_seq`` is the lowest seq
    at which the chain has two entries (None for an unforked chain)."""

    seq: int
    tips: tuple[bytes, ...]
    fork_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Heads:
    items: tuple[HeadInfo, ...]
    more: bool


@dataclass(frozen=True, slots=True)
class Entries:
    wires: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class End:
    sent: int
    truncated: bool


@dataclass(frozen=True, slots=True)
class Fetch:
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Refusal:
    code: int
    reason: str


Message = Heads | Entries | End | Fetch | Refusal


def encode_message(message: Message) -> bytes:
    """Frame payload for ``message``. Raises ``Oversized`` for a message we
    would refuse to receive ourselves."""
    if isinstance(message, Heads):
        if len(message.items) > MAX_HEADS_PER_FRAME:
            raise Oversized(f"{len(message.items)} summary items exceed {MAX_HEADS_PER_FRAME} per frame")
        value: list = [MSG_HEADS, bool(message.more), [[h.author, h.seq, list(h.tips)] for h in message.items]]
    elif isinstance(message, Entries):
        value = [MSG_ENTRIES, list(message.wires)]
    elif isinstance(message, End):
        value = [MSG_END, message.sent, bool(message.truncated)]
    elif isinstance(message, Fetch):
        value = [MSG_FETCH, list(message.ids)]
    elif isinstance(message, Refusal):
        value = [MSG_ERROR, message.code, message.reason[:MAX_ERROR_REASON]]
    else:
        raise TypeError(f"not a sync message: {type(message).__name__}")
    data = pack(value)
    if len(data) > MAX_FRAME:
        raise Oversized(f"{MESSAGE_NAMES[value[0]]} message of {len(data)} bytes exceeds {MAX_FRAME}")
    return data


def _check_bool(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise MalformedInput(f"{name}: expected a boolean, got {type(value).__name__}")
    return value


def _check_ids(value: Any, name: str, max_len: int) -> tuple[bytes, ...]:
    check_list(value, name, max_len=max_len)
    for item in value:
        check_bytes(item, name[:-1] if name.endswith("s") else name, size=ID_SIZE)
    return tuple(value)


def decode_message(data: bytes, max_size: int = MAX_FRAME) -> Message:
    """Decode one frame payload. Raises ``Oversized``, ``Truncated``,
    ``MalformedInput`` (wrong shape, types or ranges) or ``UnknownType``
    (a message type this version does not know)."""
    value = unpack(data, max_size=max_size, what="sync message")
    check_list(value, "sync message")
    if not value:
        raise MalformedInput("sync message: empty array")
    kind = check_int(value[0], "message type", 0, 255)
    if kind == MSG_HEADS:
        check_list(value, "heads message", length=3)
        more = _check_bool(value[1], "more")
        raw_items = check_list(value[2], "summary", max_len=MAX_HEADS_PER_FRAME)
        items = []
        for raw in raw_items:
            check_list(raw, "summary item", length=3)
            author = check_bytes(raw[0], "author", size=PUBLIC_KEY_SIZE)
            seq = check_int(raw[1], "seq", 1, MAX_SEQ)
            tips = _check_ids(raw[2], "tips", MAX_TIPS)
            if not tips:
                raise MalformedInput("tips: an author with entries has at least one branch head")
            if len(set(tips)) != len(tips):
                raise MalformedInput("tips: duplicate branch head")
            items.append(HeadInfo(author, seq, tips))
        return Heads(tuple(items), more)
    if kind == MSG_ENTRIES:
        check_list(value, "entries message", length=2)
        wires = check_list(value[1], "wires", max_len=MAX_WIRES_PER_FRAME)
        if not wires:
            raise MalformedInput("wires: an entries message carries at least one entry")
        for wire in wires:
            check_bytes(wire, "wire", max_size=MAX_ENTRY_SIZE)
        return Entries(tuple(wires))
    if kind == MSG_END:
        check_list(value, "end message", length=3)
        return End(check_int(value[1], "sent"), _check_bool(value[2], "truncated"))
    if kind == MSG_FETCH:
        check_list(value, "fetch message", length=2)
        ids = _check_ids(value[1], "ids", MAX_FETCH_IDS)
        if not ids:
            raise MalformedInput("ids: a fetch names at least one entry")
        return Fetch(ids)
    if kind == MSG_ERROR:
        check_list(value, "error message", length=3)
        return Refusal(check_int(value[1], "error code", 0, 255), check_str(value[2], "reason", MAX_ERROR_REASON))
    raise UnknownType(f"unknown sync message type {kind}")


# ---------------------------------------------------------------- gossip


def encode_announcement(wires: Sequence[bytes]) -> bytes:
    """One gossip message carrying ``wires`` (see ``decode_announcement``)."""
    if not 1 <= len(wires) <= MAX_ANNOUNCE_ENTRIES:
        raise Oversized(f"an announcement carries 1 to {MAX_ANNOUNCE_ENTRIES} entries, not {len(wires)}")
    data = pack(list(wires))
    if len(data) > MAX_GOSSIP_MESSAGE:
        raise Oversized(f"announcement of {len(data)} bytes exceeds {MAX_GOSSIP_MESSAGE}")
    return data


def decode_announcement(data: bytes) -> list[bytes]:
    """The entry wires in a gossip announcement: a canonical msgpack array of
    1..64 distinct byte strings of at most 4 KiB each.

    Only the envelope is checked here; the caller decodes each entry (and
    refuses the whole message if any entry is malformed or forged, so that a
    message carrying a forgery is never forwarded). Canonical bytes matter
    because gossip deduplicates by content hash: a re-encoding of the same
    entries would otherwise travel again as a "new" message.
    """
    value = unpack(data, max_size=MAX_GOSSIP_MESSAGE, what="announcement")
    check_list(value, "announcement", max_len=MAX_ANNOUNCE_ENTRIES)
    if not value:
        raise MalformedInput("announcement: no entries")
    for wire in value:
        check_bytes(wire, "announced entry", max_size=MAX_ENTRY_SIZE)
    if len(set(value)) != len(value):
        raise MalformedInput("announcement: the same entry twice")
    if pack(value) != data:
        raise MalformedInput("announcement: not in canonical msgpack form")
    return value


def pack_announcements(wires: Iterable[bytes]) -> list[bytes]:
    """Split ``wires`` (in order, duplicates dropped) into as few announcements
    as the entry-count and size limits allow."""
    out: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    seen: set[bytes] = set()
    budget = MAX_GOSSIP_MESSAGE - 16  # array header
    for wire in wires:
        if wire in seen:
            continue
        seen.add(wire)
        item = len(wire) + 5  # bin32 header at most
        if batch and (len(batch) >= MAX_ANNOUNCE_ENTRIES or size + item > budget):
            out.append(encode_announcement(batch))
            batch, size = [], 0
        batch.append(wire)
        size += item
    if batch:
        out.append(encode_announcement(batch))
    return out


def fork_proof(entries: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The announcement proving a fork: the conflicting entries, given as
    (id, wire) pairs, sorted by id. Every node that detects the same fork
    builds the same bytes, so gossip carries the proof only once per link."""
    chosen = sorted(set(entries))[:MAX_ANNOUNCE_ENTRIES]
    return encode_announcement([wire for _, wire in chosen])


# ---------------------------------------------------------------- summaries


class LedgerView(Protocol):
    """What the planner reads from a ledger (``p2pgpu.core.ledger.Ledger``)."""

    def heads(self) -> dict[bytes, int]: ...

    def head(self, public_key: bytes) -> tuple[int, bytes] | None: ...

    def frozen(self) -> dict[bytes, str]: ...

    def chain(self, author: bytes, from_seq: int = 1, limit: int = 1000) -> list[bytes]: ...

    def has_entry(self, entry_id: bytes) -> bool: ...

    def get_wire(self, entry_id: bytes) -> bytes | None: ...


class _Peeked:
    __slots__ = ("author", "timestamp_ms", "seq", "id", "prev")

    def __init__(self, wire: bytes) -> None:
        # Our own stored bytes: already validated, so a plain unpack is safe.
        payload = msgpack.unpackb(wire, raw=False)[0]
        fields = msgpack.unpackb(payload, raw=False)
        self.author: bytes = fields[3]
        self.timestamp_ms: int = fields[4]
        self.seq: int = fields[5]
        self.prev: bytes = fields[6]
        self.id = hashlib.blake2b(payload, digest_size=ID_SIZE).digest()


def _forked_head(ledger: LedgerView, author: bytes, seq: int) -> LocalHead:
    """Tips and first fork point of a forked chain, by walking all of it.
    Forks freeze the author, so such chains are few and stop growing on
    honest nodes; the walk is the price of not trusting a cached answer."""
    children: set[bytes] = set()
    ids: list[tuple[int, bytes]] = []
    per_seq: dict[int, int] = {}
    for wire in ledger.chain(author, 1, MAX_SEQ):
        peek = _Peeked(wire)
        ids.append((peek.seq, peek.id))
        children.add(peek.prev)
        per_seq[peek.seq] = per_seq.get(peek.seq, 0) + 1
    tips = tuple(sorted(i for _, i in ids if i not in children))[:MAX_TIPS]
    forks = [s for s, n in per_seq.items() if n > 1]
    return LocalHead(seq, tips, min(forks) if forks else None)


def local_summary(ledger: LedgerView) -> dict[bytes, LocalHead]:
    """Our heads: author -> LocalHead, for every author with entries."""
    forked = {a for a, why in ledger.frozen().items() if why == "fork"}
    out: dict[bytes, LocalHead] = {}
    for author, seq in ledger.heads().items():
        if author in forked:
            out[author] = _forked_head(ledger, author, seq)
            continue
        head = ledger.head(author)
        if head is None:  # pragma: no cover - heads() lists only chains with entries
            continue
        out[author] = LocalHead(seq, (head[1],))
    return out


def summary_frames(summary: dict[bytes, LocalHead], per_frame: int = MAX_HEADS_PER_FRAME) -> list[bytes]:
    """HEADS frames for ``summary``, authors in ascending order (the
    responder requires it: it is how duplicates are refused cheaply)."""
    items = [HeadInfo(a, h.seq, h.tips) for a, h in sorted(summary.items())]
    frames = []
    for start in range(0, max(len(items), 1), per_frame):
        chunk = items[start : start + per_frame]
        frames.append(encode_message(Heads(tuple(chunk), more=start + per_frame < len(items))))
    return frames


@dataclass(frozen=True, slots=True)
class Plan:
    """What to send a peer: ``ranges`` lists (author, first seq) in author
    order; ``peer_has_more`` says the peer holds entries we lack."""

    ranges: tuple[tuple[bytes, int], ...]
    peer_has_more: bool


def plan(ledger: LedgerView, local: dict[bytes, LocalHead], remote: dict[bytes, HeadInfo]) -> Plan:
    """Decide, per author, from which seq on the peer lacks our entries.

    Hash chains make this cheap: a branch head's id pins its whole chain.

    - the peer does not know the author: everything;
    - same branch heads: nothing;
    - the peer's heads are all entries we hold: on an unforked chain they
      are ancestors of ours, so send what follows the peer's max seq; on a
      forked chain, also every branch from the first fork point;
    - the peer holds a head we lack: it is ahead of us, or on another branch.
      We cannot tell which without a round trip, so send from
      min(our seq, its seq) (and from the fork point if we forked): if it
      is ahead, that is one duplicate; if it branched, the first entry it
      gets conflicts with its own and it fetches the parents it lacks by id.
    """
    ranges: list[tuple[bytes, int]] = []
    for author in sorted(local):
        mine = local[author]
        theirs = remote.get(author)
        if theirs is None:
            ranges.append((author, 1))
            continue
        if set(theirs.tips) == set(mine.tips):
            continue
        if all(ledger.has_entry(t) for t in theirs.tips):
            start = theirs.seq + 1
        else:
            start = min(mine.seq, theirs.seq)
        if mine.fork_seq is not None:
            start = min(start, mine.fork_seq)
        if start <= mine.seq:
            ranges.append((author, max(start, 1)))
    peer_has_more = False
    for author, theirs in remote.items():
        mine = local.get(author)
        if mine is None or theirs.seq > mine.seq:
            peer_has_more = True
            break
        if set(theirs.tips) != set(mine.tips) and not all(ledger.has_entry(t) for t in theirs.tips):
            peer_has_more = True
            break
    return Plan(tuple(ranges), peer_has_more)


# ---------------------------------------------------------------- sending


class _Cursor:
    """Pages through one author's chain from ``next_seq``. Entries at the
    page boundary's seq (several only on a forked chain) are remembered so
    the next page, which starts at that seq again, skips them."""

    __slots__ = ("author", "next_seq", "skip", "done")

    def __init__(self, author: bytes, from_seq: int) -> None:
        self.author = author
        self.next_seq = from_seq
        self.skip: set[bytes] = set()
        self.done = False

    def page(self, ledger: LedgerView, size: int) -> list[tuple[_Peeked, bytes]]:
        if self.done:
            return []
        want = size + len(self.skip)
        wires = ledger.chain(self.author, self.next_seq, want)
        if len(wires) < want:
            self.done = True
        out = []
        for wire in wires:
            peek = _Peeked(wire)
            if peek.seq == self.next_seq and peek.id in self.skip:
                continue
            out.append((peek, wire))
        if not self.done and out:
            last = out[-1][0].seq
            boundary = {p.id for p, _ in out if p.seq == last}
            self.skip = (self.skip | boundary) if last == self.next_seq else boundary
            self.next_seq = last
        elif not self.done:
            self.done = True  # a page of nothing but skipped entries: only forks of one seq left
        return out


class EntryStream:
    """The wires of ``ranges`` merged in (timestamp, author, seq) order,
    at most ``budget`` of them; iterate it.

    Chains are read a page at a time, so a large catch-up never holds the
    whole ledger in memory and the stream may be consumed across awaits
    (each page is a fresh ``ledger.chain`` call). After iteration,
    ``sent`` is the count and ``truncated`` says the budget cut it short.

    Along one chain timestamps never decrease, so each author's entries come
    sorted and the merge is exact; on a forked chain each branch is sorted
    but the branches interleave by seq, so the order there is only "nearly"
    sorted (a parent always still precedes its child).
    """

    def __init__(self, ledger: LedgerView, ranges: Iterable[tuple[bytes, int]], budget: int) -> None:
        self._ledger = ledger
        self._cursors = [_Cursor(a, s) for a, s in ranges]
        self._budget = budget
        # Pages shrink as authors multiply, bounding the first round's reads.
        self._page = max(16, min(4096, 262_144 // max(1, len(self._cursors))))
        self.sent = 0
        self.truncated = False

    def __iter__(self) -> Iterator[bytes]:
        heap: list[tuple[int, bytes, int, bytes, int]] = []
        buffers: list[list[tuple[_Peeked, bytes]]] = []
        for index, cursor in enumerate(self._cursors):
            page = cursor.page(self._ledger, self._page)
            page.reverse()  # pop() from the end
            buffers.append(page)
            if page:
                peek, wire = page[-1]
                heap.append((peek.timestamp_ms, cursor.author, peek.seq, peek.id, index))
        heapq.heapify(heap)
        while heap:
            if self.sent >= self._budget:
                self.truncated = True
                return
            _, _, _, _, index = heapq.heappop(heap)
            buffer = buffers[index]
            _, wire = buffer.pop()
            self.sent += 1
            yield wire
            if not buffer:
                buffer.extend(reversed(self._cursors[index].page(self._ledger, self._page)))
            if buffer:
                peek, _ = buffer[-1]
                heapq.heappush(heap, (peek.timestamp_ms, self._cursors[index].author, peek.seq, peek.id, index))


def order_wires(wires: Iterable[bytes]) -> list[bytes]:
    """Stored wires sorted by (timestamp, author, seq, id): the order a
    responder sends fetched entries in."""

    def key(wire: bytes) -> tuple[int, bytes, int, bytes]:
        peek = _Peeked(wire)
        return peek.timestamp_ms, peek.author, peek.seq, peek.id

    return sorted(wires, key=key)


def entry_frames(wires: Iterable[bytes], max_wires: int = MAX_WIRES_PER_FRAME,
                 max_bytes: int = MAX_ENTRIES_FRAME_BYTES) -> Iterator[bytes]:
    """ENTRIES frame payloads for ``wires``: each at most ``max_wires`` wires
    and ``max_bytes`` of them. Lazy, so it streams an ``EntryStream``."""
    batch: list[bytes] = []
    size = 0
    for wire in wires:
        item = len(wire) + 5
        if batch and (len(batch) >= max_wires or size + item > max_bytes):
            yield encode_message(Entries(tuple(batch)))
            batch, size = [], 0
        batch.append(wire)
        size += item
    if batch:
        yield encode_message(Entries(tuple(batch)))


# ---------------------------------------------------------------- sessions

# (role, state, message type) -> next state. Everything not listed is
# ``UnexpectedMessage``. A HEADS with more=False moves "heads" to "planned"
# (see SyncResponder.receive); that is the only data-dependent edge.
_TRANSITIONS: dict[tuple[str, str, int], str] = {
    ("responder", "idle", MSG_HEADS): "heads",
    ("responder", "heads", MSG_HEADS): "heads",
    ("responder", "idle", MSG_FETCH): "planned",
    ("requester", "waiting", MSG_ENTRIES): "waiting",
    ("requester", "waiting", MSG_END): "done",
    ("requester", "waiting", MSG_ERROR): "done",
}


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """A complete summary from a requester: author -> its HeadInfo."""

    summary: dict[bytes, HeadInfo] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FetchRequest:
    ids: tuple[bytes, ...]


class SyncResponder:
    """The responder's side of one session: feed it the requester's frames
    until it returns the request (``SyncRequest`` or ``FetchRequest``).

    Enforces: HEADS chunks strictly ascending by author across frames (so
    no author twice), at most ``max_summary_authors`` items and
    ``max_request_frames`` frames, at most ``max_fetch_ids`` ids.
    """

    role = "responder"

    def __init__(self, limits: SyncLimits = SyncLimits()) -> None:
        self.limits = limits
        self.state = "idle"
        self._frames = 0
        self._summary: dict[bytes, HeadInfo] = {}
        self._last_author = b""

    def receive(self, data: bytes) -> SyncRequest | FetchRequest | None:
        message = decode_message(data)
        kind = _kind(message)
        next_state = _TRANSITIONS.get((self.role, self.state, kind))
        if next_state is None:
            raise UnexpectedMessage(f"{MESSAGE_NAMES[kind]} is not allowed from a requester in state {self.state}")
        self._frames += 1
        if self._frames > self.limits.max_request_frames:
            raise LimitExceeded(f"request spans more than {self.limits.max_request_frames} frames")
        self.state = next_state
        if isinstance(message, Fetch):
            if len(message.ids) > self.limits.max_fetch_ids:
                raise LimitExceeded(f"fetch of {len(message.ids)} ids exceeds {self.limits.max_fetch_ids}")
            return FetchRequest(message.ids)
        assert isinstance(message, Heads)
        if len(self._summary) + len(message.items) > self.limits.max_summary_authors:
            raise LimitExceeded(f"summary of more than {self.limits.max_summary_authors} authors")
        for item in message.items:
            if item.author <= self._last_author:
                raise MalformedInput("summary: authors must be strictly ascending")
            self._last_author = item.author
            self._summary[item.author] = item
        if message.more:
            return None
        self.state = "planned"
        return SyncRequest(self._summary)


class SyncRequester:
    """The requester's side: after sending a request, feed it the
    responder's frames; it returns ``Entries`` until the ``End``.

    Enforces: at most ``max_session_entries`` entries in at most
    ``max_session_frames`` frames (``max_entries`` lowers the first for a
    fetch), and an END whose count matches what arrived. A refusal raises
    ``SyncRefused``.
    """

    role = "requester"

    def __init__(self, limits: SyncLimits = SyncLimits(), max_entries: int | None = None) -> None:
        self.limits = limits
        self.max_entries = limits.max_session_entries if max_entries is None else max_entries
        self.state = "waiting"
        self.frames = 0
        self.entries = 0
        self.end: End | None = None

    def receive(self, data: bytes) -> Entries | End:
        message = decode_message(data)
        kind = _kind(message)
        next_state = _TRANSITIONS.get((self.role, self.state, kind))
        if next_state is None:
            raise UnexpectedMessage(f"{MESSAGE_NAMES[kind]} is not allowed from a responder in state {self.state}")
        self.state = next_state
        if isinstance(message, Refusal):
            raise SyncRefused(message.code, message.reason)
        self.frames += 1
        if self.frames > self.limits.max_session_frames:
            raise LimitExceeded(f"more than {self.limits.max_session_frames} frames in one session")
        if isinstance(message, End):
            if message.sent != self.entries:
                raise UnexpectedMessage(f"end says {message.sent} entries were sent, {self.entries} arrived")
            self.end = message
            return message
        assert isinstance(message, Entries)
        self.entries += len(message.wires)
        if self.entries > self.max_entries:
            raise LimitExceeded(f"more than {self.max_entries} entries in one session")
        return message


def _kind(message: Message) -> int:
    return {Heads: MSG_HEADS, Entries: MSG_ENTRIES, End: MSG_END, Fetch: MSG_FETCH, Refusal: MSG_ERROR}[type(message)]

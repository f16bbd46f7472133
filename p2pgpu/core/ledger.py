"""The ledger: a block lattice of per-account hash chains (DESIGN §5).

Theory of operation
-------------------
Every account (an ed25519 public key = a libp2p peer id) owns one chain of
signed entries. Only the owner can append, so moving coins needs no consensus:
a replica only has to check each entry against its *own chain prefix* and the
few entries it *names* (the send a RECEIVE takes in, the hold a CLAIM draws
on...). Because validity depends on nothing else, replicas holding the same
entries accept the same entries whatever order they arrived in.

Two kinds of state are kept, both pure functions of the set of valid entries:

- **Branch state** (``vbalance`` in each entry's index record): the spendable
  balance along the entry's own chain. Validity of the next entry is checked
  against it, so it must depend only on the chain prefix and named entries.
- **Settled state** (``a`` records: balance, held, pending_in): what the
  account really owns once cross-chain facts are folded in: a hold's payout to
  the provider, its refund to the consumer, a claim voided by a release.
  Conservation holds exactly on it:
  ``sum(balance + held + pending_in) == minted`` (genesis allocations + MINTs).

For honest accounts the two agree. They differ only when an account forks its
own chain (two entries at one sequence number: both branches are kept, every
replica marks the author frozen, and anything it double-spent shows as a
negative settled balance: the *fork loss*) or when a late CLAIM collides with
a RELEASE on time alone (the release wins; see ``settle_hold``).

Entry payload (positional, see ``p2pgpu.core.codec``)::

    [ENTRY, 1, network_id, author, timestamp_ms, seq, prev, kind, body]

Bodies by kind (all amounts integer base units)::

    MINT     [amount, memo]                  faucet only
    SEND     [to, amount, memo]              debits now; pending until received
    RECEIVE  [send_id]                       recipient takes a SEND in
    HOLD     [provider, amount, expiry_ms, job_id]     escrow for one job
    CLAIM    [hold_id, voucher]              provider redeems the consumer's voucher
    RELEASE  [hold_id, basis, ref]           consumer takes back what was not paid

The storage layout (one-byte prefixes, big-endian integers so scans are
ordered) and every rule are written out in docs/ledger.md.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import msgpack

from p2pgpu.core.codec import (
    ID_SIZE,
    MAX_INT,
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
from p2pgpu.core.genesis import Genesis
from p2pgpu.core.identity import PUBLIC_KEY_SIZE, NodeKey, verify_signature
from p2pgpu.core.kv import KeyValueStore, Overlay
from p2pgpu.core.units import format_coins
from p2pgpu.errors import (
    BadSignature,
    ConfigError,
    InsufficientFunds,
    LedgerRuleViolation,
    MalformedInput,
    P2PGPUError,
)

# ------------------------------------------------------------------ the format

MINT, SEND, RECEIVE, HOLD, CLAIM, RELEASE = 1, 2, 3, 4, 5, 6
KIND_NAMES = {MINT: "mint", SEND: "send", RECEIVE: "receive", HOLD: "hold", CLAIM: "claim", RELEASE: "release"}

# How a RELEASE proves the consumer may take its hold back (DESIGN §5 rule 3/4).
BASIS_CLAIM = 1  # ref = the provider's CLAIM entry id: refund = hold - claimed
BASIS_PROVIDER_ENTRY = 2  # ref = a provider entry stamped after expiry, no claim before it
BASIS_WAIVER = 3  # ref = the provider's signed waiver of the hold
BASIS_TIMEOUT = 4  # ref = b"": stamped after expiry + grace; provider vanished
BASIS_NAMES = {1: "claim", 2: "provider-entry", 3: "waiver", 4: "timeout"}

MAX_MEMO = 256
MAX_JOB_ID = 32
MAX_AMOUNT = 2**62  # per entry; keeps every sum far inside msgpack's int64
MAX_ENTRY_SIZE = 4096
MAX_SEQ = 2**62

_SEQ = struct.Struct(">Q")
# An ``e`` key in one C call: prefix, author (32 bytes), seq, id (32 bytes).
# ("32s" would pad or cut a wrong-sized value, so only pass checked ones.)
_ENTRY_KEY = struct.Struct(">c32sQ32s")
_tuple_new = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (about half the cost)


def _load(raw: bytes):
    """Decode one of our own stored records (trusted bytes: no limits needed)."""
    return msgpack.unpackb(raw, raw=False)
GENESIS_VBALANCE_KEY = b"g"


# Typed entry bodies. NamedTuples rather than frozen dataclasses, like
# ``Entry`` and ``Signed``: equally immutable, and half the cost to build
# (0.3 vs 0.6 us), which counts because one is built for every entry, local
# or received. (Being tuples, two bodies of different kinds never compare
# equal: their field types differ.)


class Mint(NamedTuple):
    amount: int
    memo: str


class Send(NamedTuple):
    to: bytes
    amount: int
    memo: str


class Receive(NamedTuple):
    send_id: bytes


class Hold(NamedTuple):
    provider: bytes
    amount: int
    expiry_ms: int
    job_id: bytes


class Claim(NamedTuple):
    hold_id: bytes
    voucher: Signed  # decoded, signature checked by the ledger when validating

    @property
    def amount(self) -> int:
        return self.voucher.fields[1]


class Release(NamedTuple):
    hold_id: bytes
    basis: int
    ref: bytes


Body = Mint | Send | Receive | Hold | Claim | Release


class Entry(NamedTuple):
    """One decoded ledger entry. ``signed.payload`` is the exact signed bytes.
    (A NamedTuple for the same reason as ``Signed``: built once per entry.)"""

    signed: Signed
    seq: int
    prev: bytes
    kind: int
    body: Body

    @property
    def id(self) -> bytes:
        return self.signed.id

    @property
    def author(self) -> bytes:
        return self.signed.signer

    @property
    def timestamp_ms(self) -> int:
        return self.signed.timestamp_ms

    @property
    def wire(self) -> bytes:
        return self.signed.wire

    def __repr__(self) -> str:
        return f"Entry({KIND_NAMES.get(self.kind)} {self.signed.signer.hex()[:8]}#{self.seq} {self.signed.id.hex()[:8]})"


def _parse_voucher(raw: bytes, network_id: bytes) -> Signed:
    voucher = decode_signed(raw, network_id=network_id, tags=(Tag.VOUCHER,), verify=False)
    check_list(list(voucher.fields), "voucher fields", length=2)
    check_bytes(voucher.fields[0], "voucher hold id", size=ID_SIZE)
    check_int(voucher.fields[1], "voucher amount", 1, MAX_AMOUNT)
    return voucher


def parse_waiver(raw: bytes, network_id: bytes) -> Signed:
    """Decode a provider's waiver ``[hold_id, reason]`` (signature unchecked)."""
    waiver = decode_signed(raw, network_id=network_id, tags=(Tag.WAIVER,), verify=False)
    check_list(list(waiver.fields), "waiver fields", length=2)
    check_bytes(waiver.fields[0], "waiver hold id", size=ID_SIZE)
    check_str(waiver.fields[1], "waiver reason", MAX_MEMO)
    return waiver


def parse_entry(signed: Signed) -> Entry:
    """Check an entry's shape (not its rules) and type its body.

    Raises MalformedInput; the signature is not checked here.
    """
    if signed.tag != Tag.ENTRY:
        raise MalformedInput("not a ledger entry")
    fields = signed.fields
    if len(fields) != 4:
        raise MalformedInput(f"entry: expected 4 fields after the header, got {len(fields)}")
    seq, prev, kind, body = fields
    check_int(seq, "seq", 1, MAX_SEQ)
    check_bytes(prev, "prev", size=0 if seq == 1 else ID_SIZE)
    check_int(kind, "kind", 0, 255)
    check_list(body, "body")
    net = signed.network_id
    if kind == MINT:
        check_list(body, "mint body", length=2)
        typed: Body = Mint(check_int(body[0], "amount", 1, MAX_AMOUNT), check_str(body[1], "memo", MAX_MEMO))
    elif kind == SEND:
        check_list(body, "send body", length=3)
        typed = Send(
            check_bytes(body[0], "to", size=PUBLIC_KEY_SIZE),
            check_int(body[1], "amount", 1, MAX_AMOUNT),
            check_str(body[2], "memo", MAX_MEMO),
        )
    elif kind == RECEIVE:
        check_list(body, "receive body", length=1)
        typed = Receive(check_bytes(body[0], "send id", size=ID_SIZE))
    elif kind == HOLD:
        check_list(body, "hold body", length=4)
        typed = Hold(
            check_bytes(body[0], "provider", size=PUBLIC_KEY_SIZE),
            check_int(body[1], "amount", 1, MAX_AMOUNT),
            check_int(body[2], "expiry", 0, MAX_INT),
            check_bytes(body[3], "job id", max_size=MAX_JOB_ID),
        )
    elif kind == CLAIM:
        check_list(body, "claim body", length=2)
        hold_id = check_bytes(body[0], "hold id", size=ID_SIZE)
        typed = Claim(hold_id, _parse_voucher(check_bytes(body[1], "voucher", max_size=1024), net))
    elif kind == RELEASE:
        check_list(body, "release body", length=3)
        basis = check_int(body[1], "basis", 1, 4)
        ref = body[2]
        if basis in (BASIS_CLAIM, BASIS_PROVIDER_ENTRY):
            check_bytes(ref, "release ref", size=ID_SIZE)
        elif basis == BASIS_WAIVER:
            parse_waiver(check_bytes(ref, "waiver", max_size=1024), net)
        else:
            check_bytes(ref, "release ref", size=0)
        typed = Release(check_bytes(body[0], "hold id", size=ID_SIZE), basis, ref)
    else:
        raise MalformedInput(f"unknown entry kind {kind}")
    return Entry(signed=signed, seq=seq, prev=prev, kind=kind, body=typed)


def _body_fields(body: Body) -> tuple[int, list]:
    """(kind, positional fields) of a typed body, with the field checks
    ``parse_entry`` applies to a peer's entry."""
    if type(body) is Send:
        to, amount, memo = body.to, body.amount, body.memo
        # inline form of the checks below: sends are the hot path of local appends
        if (
            type(to) is bytes and len(to) == PUBLIC_KEY_SIZE
            and type(amount) is int and 1 <= amount <= MAX_AMOUNT
            and type(memo) is str and len(memo) <= MAX_MEMO
        ):
            return SEND, [to, amount, memo]
        check_bytes(to, "to", size=PUBLIC_KEY_SIZE)
        check_int(amount, "amount", 1, MAX_AMOUNT)
        check_str(memo, "memo", MAX_MEMO)
    if isinstance(body, Receive):
        return RECEIVE, [check_bytes(body.send_id, "send id", size=ID_SIZE)]
    if isinstance(body, Hold):
        return HOLD, [
            check_bytes(body.provider, "provider", size=PUBLIC_KEY_SIZE),
            check_int(body.amount, "amount", 1, MAX_AMOUNT),
            check_int(body.expiry_ms, "expiry", 0, MAX_INT),
            check_bytes(body.job_id, "job id", max_size=MAX_JOB_ID),
        ]
    if isinstance(body, Claim):
        return CLAIM, [check_bytes(body.hold_id, "hold id", size=ID_SIZE), body.voucher.wire]
    if isinstance(body, Release):
        check_int(body.basis, "basis", 1, 4)
        if body.basis == BASIS_WAIVER:
            check_bytes(body.ref, "waiver", max_size=1024)
        else:
            check_bytes(body.ref, "release ref", size=ID_SIZE if body.basis in (BASIS_CLAIM, BASIS_PROVIDER_ENTRY) else 0)
        return RELEASE, [check_bytes(body.hold_id, "hold id", size=ID_SIZE), body.basis, body.ref]
    if isinstance(body, Mint):
        return MINT, [check_int(body.amount, "amount", 1, MAX_AMOUNT), check_str(body.memo, "memo", MAX_MEMO)]
    raise MalformedInput(f"not an entry body: {type(body).__name__}")


def decode_entry(wire: bytes, network_id: bytes, *, verify: bool = True) -> Entry:
    """Decode an entry from the wire: typed errors for every malformed input."""
    signed = decode_signed(wire, network_id=network_id, tags=(Tag.ENTRY,), max_size=MAX_ENTRY_SIZE, verify=verify)
    return parse_entry(signed)


def make_voucher(key: NodeKey, network_id: bytes, hold_id: bytes, amount: int, now_ms: int) -> Signed:
    """A consumer's signed promise: "I owe the hold's provider ``amount`` in total"."""
    return sign_object(key, Tag.VOUCHER, network_id, now_ms, [hold_id, amount])


def make_waiver(key: NodeKey, network_id: bytes, hold_id: bytes, reason: str, now_ms: int) -> Signed:
    """A provider's signed statement that it will never claim ``hold_id``."""
    return sign_object(key, Tag.WAIVER, network_id, now_ms, [hold_id, reason[:MAX_MEMO]])


def settle_hold(hold_amount: int, claims: dict[bytes, int], releases: list[tuple[bytes, int, bytes]]) -> tuple[int, int]:
    """(payout to provider, refund to consumer) for one hold, order-independent.

    ``claims`` maps claim entry id -> claimed amount; ``releases`` lists
    (release entry id, basis, ref). An honest provider claims at most once and
    an honest consumer releases at most once, so normally each has 0 or 1 item.

    - No release yet: the provider is paid its (largest) claim; nothing is
      refunded yet.
    - Released: the release with the smallest id decides (several exist only
      if the consumer forked). A release naming a claim pays exactly that claim
      and refunds the rest. Any other basis pays nothing: a waiver or a
      post-expiry provider entry proves no valid claim can exist on that
      branch, and a timeout release *wins* over a claim that surfaces late
      (DESIGN §5 rule 3): the claim is void, every replica computes the same.
    """
    if releases:
        _, basis, ref = min(releases)
        payout = claims[ref] if basis == BASIS_CLAIM else 0
        return payout, hold_amount - payout
    return (max(claims.values()) if claims else 0), 0


VerifyMany = Callable[[list[tuple[bytes, bytes, bytes]]], list[bool]]
"""Checks many (public key, message, signature) triples; one bool each."""


def signature_items(decoded: list["Entry | P2PGPUError"]) -> list[tuple[bytes, bytes, bytes]]:
    """(public key, message, signature) of each decoded Entry, for a VerifyMany."""
    return [(e.signed.signer, e.signed.payload, e.signed.signature) for e in decoded if isinstance(e, Entry)]


def verify_sequentially(items: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
    """The default ``VerifyMany``: one signature after another, this thread."""
    out = []
    for public_key, message, signature in items:
        try:
            verify_signature(public_key, message, signature)
            out.append(True)
        except BadSignature:
            out.append(False)
    return out


# -------------------------------------------------------------- derived state


class IndexRecord(NamedTuple):
    """What the ledger remembers about every applied entry (key ``i`` + id).

    ``facts`` keeps what later entries need to know about this one, so that
    checking a RECEIVE or CLAIM never has to decode the entry it names:
    SEND -> (to, amount); HOLD -> (provider, amount, expiry_ms);
    CLAIM -> (hold_id, amount); other kinds -> ().
    """

    author: bytes
    seq: int
    kind: int
    timestamp_ms: int
    vbalance: int  # spendable balance on this entry's branch after it
    prev: bytes
    facts: tuple = ()

    @classmethod
    def unpack(cls, raw: bytes) -> "IndexRecord":
        return cls(*_load(raw))


@dataclass(frozen=True, slots=True)
class AccountState:
    """Settled view of one account, as the wallet shows it."""

    public_key: bytes
    balance: int  # spendable now (negative only after a fork loss / voided claim)
    held: int  # locked in open holds, not yet paid out or refunded
    pending_in: int  # sent to this account, not yet taken in by a RECEIVE
    entries: int
    frozen: str | None  # None, "fork" or "equivocation"
    head_seq: int

    @property
    def total(self) -> int:
        return self.balance + self.held + self.pending_in


@dataclass(frozen=True, slots=True)
class StatementLine:
    """One line of an account's statement, read from one of its own entries:
    what moved, to or from whom, and which way."""

    entry_id: bytes
    seq: int
    kind: str
    timestamp_ms: int
    counterparty: bytes | None  # public key; None for a mint
    amount: int
    memo: str
    direction: str  # "in" or "out"


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What became of one offered entry.

    ``status`` is "applied", "duplicate" or "waiting". ``applied`` lists every
    entry that took effect, in order: this one and any parked entries it
    unblocked. A waiting entry names the entry it needs in ``missing`` (None
    when it only waits for our clock to catch up with its timestamp).
    """

    status: str
    entry_id: bytes
    applied: tuple[Entry, ...] = ()
    missing: bytes | None = None
    forks: tuple[bytes, ...] = ()


class PendingCommit:
    """A batch handed over by ``Ledger.begin_commit``: ``write()`` (blocking,
    thread-safe with respect to the ledger's reads), then ``finish()`` on the
    ledger's thread, which returns how many entries it acknowledges."""

    __slots__ = ("write", "_end", "entries")

    def __init__(self, write: Callable[[], None], end: Callable[[], None], entries: int) -> None:
        self.write, self._end, self.entries = write, end, entries

    def finish(self) -> int:
        self._end()
        return self.entries


class _Waiting(Exception):
    """Internal: the entry names something we do not have yet."""

    def __init__(self, missing: bytes | None) -> None:
        self.missing = missing


class Unchecked:
    """Bounded parking area for entries whose predecessor or named entry is
    missing (Nano's "unchecked" store). Entries are signature-checked before
    they are parked, so forgeries cannot fill it; when full, the oldest goes.
    In memory only: after a restart, anti-entropy sync fetches them again.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_id: OrderedDict[bytes, tuple[Entry, bytes | None]] = OrderedDict()
        self._by_missing: dict[bytes | None, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def park(self, entry: Entry, missing: bytes | None) -> None:
        if entry.id in self._by_id:
            return
        while len(self._by_id) >= self.capacity:
            old_id, (_, old_missing) = self._by_id.popitem(last=False)
            self._by_missing[old_missing].discard(old_id)
        self._by_id[entry.id] = (entry, missing)
        self._by_missing.setdefault(missing, set()).add(entry.id)

    def take(self, missing: bytes | None) -> list[Entry]:
        ids = self._by_missing.pop(missing, set())
        out = [self._by_id.pop(i)[0] for i in ids if i in self._by_id]
        out.sort(key=lambda e: (e.author, e.seq, e.id))
        return out

    def discard(self, entry_id: bytes) -> None:
        """Forget one parked entry (if it is parked)."""
        item = self._by_id.pop(entry_id, None)
        if item is not None:
            waiting = self._by_missing.get(item[1])
            if waiting is not None:
                waiting.discard(entry_id)
                if not waiting:
                    del self._by_missing[item[1]]

    def missing_ids(self) -> set[bytes]:
        return {m for m, ids in self._by_missing.items() if m is not None and ids}


# Key prefixes (see docs/ledger.md). One byte each.
P_ENTRY = b"e"  # e + author + seq8 + id  -> wire
P_INDEX = b"i"  # i + id                  -> IndexRecord
P_ACCOUNT = b"a"  # a + author              -> [balance, held, pending_in, entries, [tip ids]]
P_FROZEN = b"z"  # z + author              -> reason
P_PENDING = b"p"  # p + to + send_id        -> amount  (sent, not received)
P_RECEIVED = b"r"  # r + send_id             -> [[receive_id, author, seq], ...]
P_CLAIMS = b"c"  # c + hold_id             -> [[claim_id, author, seq, amount], ...]
P_RELEASES = b"l"  # l + hold_id             -> [[release_id, author, seq, basis, ref], ...]
P_SETTLED = b"s"  # s + hold_id             -> [payout, refund]
P_META = b"m"  # m + name                -> value
K_MINTED = b"mminted"
K_NETWORK = b"mnetwork"
K_SCHEMA = b"mschema"
K_REBUILDING = b"mrebuilding"
SCHEMA_VERSION = 1
DERIVED_PREFIXES = (P_INDEX, P_ACCOUNT, P_FROZEN, P_PENDING, P_RECEIVED, P_CLAIMS, P_RELEASES, P_SETTLED, K_MINTED)
STATE_PREFIXES = (P_ACCOUNT, P_FROZEN, P_SETTLED, K_MINTED)

FROZEN_FORK = "fork"
FROZEN_EQUIVOCATION = "equivocation"


class Ledger:
    """Validates and applies entries against a ``KeyValueStore``.

    Entries from peers go through ``offer``; the node's own through
    ``append`` (and its helpers ``send``, ``hold``...). Both stage changes in
    an overlay; ``commit`` writes them in one synced batch. An entry is
    *acknowledged* (may be gossiped, reported to a user) only after the commit
    that contains it returns.

    Time is a parameter (``now_ms``) everywhere; the ledger never reads a clock.
    """

    def __init__(self, store: KeyValueStore, genesis: Genesis, *, max_unchecked: int = 10_000) -> None:
        self.genesis = genesis
        self.network_id = genesis.network_id
        self.params = genesis.params
        self._kv = Overlay(store)
        self._tips: dict[bytes, dict[bytes, IndexRecord]] = {}
        self._accounts: dict[bytes, list] = {}
        self._dirty_accounts: set[bytes] = set()
        self._frozen: dict[bytes, str] = {}
        self._forked: set[bytes] = set()
        self._minted = 0
        self.unchecked = Unchecked(max_unchecked)
        self._future: list[Entry] = []
        self._allocations = dict(genesis.allocations)
        self._uncommitted = 0
        self._open()

    # ------------------------------------------------------------- lifecycle

    def _open(self) -> None:
        network = self._kv.get(K_NETWORK)
        if network is None:
            self._initialise_genesis()
            self._kv.put(K_NETWORK, self.network_id)
            self._kv.put(K_SCHEMA, pack(SCHEMA_VERSION))
            self.commit()
            return
        if network != self.network_id:
            raise ConfigError(
                f"this ledger belongs to network {network.hex()[:16]}, not {self.network_id.hex()[:16]}"
                " (wrong genesis file or data dir)"
            )
        if self._kv.get(K_REBUILDING) is not None:
            self.rebuild()  # a rebuild was interrupted: derived state is partial
            return
        self._load_flags()

    def _load_flags(self) -> None:
        for key, value in self._kv.scan(P_FROZEN):
            self._frozen[key[1:]] = value.decode()
            if value.decode() == FROZEN_FORK:
                self._forked.add(key[1:])
        raw = self._kv.get(K_MINTED)
        self._minted = _load(raw) if raw else 0

    def _initialise_genesis(self) -> None:
        for public_key, amount in self.genesis.allocations:
            self._accounts[public_key] = [amount, 0, 0, 0, []]
            self._dirty_accounts.add(public_key)
        self._minted = self.genesis.total_allocated
        self._kv.put(K_MINTED, pack(self._minted))

    def _stage_accounts(self) -> None:
        """Account records change many times per group; pack each once."""
        put, accounts = self._kv.put, self._accounts
        for public_key in self._dirty_accounts:
            put(P_ACCOUNT + public_key, pack(accounts[public_key]))
        self._dirty_accounts.clear()

    def commit(self) -> int:
        """Durably write everything staged (one synced batch). Returns the
        number of entries acknowledged by this commit."""
        self._stage_accounts()
        self._kv.flush(sync=True)
        acknowledged, self._uncommitted = self._uncommitted, 0
        return acknowledged

    def begin_commit(self) -> "PendingCommit":
        """``commit`` in two halves, so the fsync can overlap the next
        entries: stage everything made so far as one batch and return it;
        run its ``write`` (on another thread, if the store allows concurrent
        reads), then ``finish`` it, which acknowledges its entries. Entries
        made meanwhile go into the next batch and are read back as usual.
        Nothing is acknowledged before its batch is durable, and batches
        reach the store in order, one at a time."""
        self._stage_accounts()
        write = self._kv.begin_flush()
        acknowledged, self._uncommitted = self._uncommitted, 0
        return PendingCommit(write, self._kv.end_flush, acknowledged)

    @property
    def uncommitted(self) -> int:
        return self._uncommitted

    def close(self) -> None:
        self.commit()
        self._kv.store.close()

    # ------------------------------------------------------------- reading

    def _index(self, entry_id: bytes) -> IndexRecord | None:
        raw = self._kv.get(P_INDEX + entry_id)
        return IndexRecord.unpack(raw) if raw is not None else None

    def _tips_of(self, author: bytes) -> dict[bytes, IndexRecord]:
        """Branch heads of ``author`` (one unless it forked), with records."""
        tips = self._tips.get(author)
        if tips is None:
            tips = {}
            for tip_id in self._account(author)[4]:
                record = self._index(tip_id)
                assert record is not None, "tip without index record"
                tips[tip_id] = record
            self._tips[author] = tips
        return tips

    def _account(self, author: bytes) -> list:
        """The cached, mutable settled record: [balance, held, pending_in,
        entries, tip ids]. Mark it dirty after changing it."""
        record = self._accounts.get(author)
        if record is None:
            raw = self._kv.get(P_ACCOUNT + author)
            record = list(_load(raw)) if raw is not None else [0, 0, 0, 0, []]
            self._accounts[author] = record
        return record

    def _list(self, key: bytes) -> list[list]:
        raw = self._kv.get(key)
        return _load(raw) if raw is not None else []

    def get_entry(self, entry_id: bytes) -> Entry | None:
        """A stored (applied) entry by id."""
        record = self._index(entry_id)
        if record is None:
            return None
        wire = self._kv.get(P_ENTRY + record.author + _SEQ.pack(record.seq) + entry_id)
        assert wire is not None, "index record without entry"
        return decode_entry(wire, self.network_id, verify=False)

    def get_wire(self, entry_id: bytes) -> bytes | None:
        record = self._index(entry_id)
        if record is None:
            return None
        return self._kv.get(P_ENTRY + record.author + _SEQ.pack(record.seq) + entry_id)

    def has_entry(self, entry_id: bytes) -> bool:
        return self._kv.get(P_INDEX + entry_id) is not None

    def account(self, public_key: bytes) -> AccountState:
        balance, held, pending_in, entries, _ = self._account(public_key)
        tips = self._tips_of(public_key)
        return AccountState(
            public_key=public_key,
            balance=balance,
            held=held,
            pending_in=pending_in,
            entries=entries,
            frozen=self._frozen.get(public_key),
            head_seq=max((r.seq for r in tips.values()), default=0),
        )

    def accounts(self) -> Iterator[AccountState]:
        self._stage_accounts()
        for key, _ in list(self._kv.scan(P_ACCOUNT)):
            yield self.account(key[1:])

    @property
    def minted(self) -> int:
        return self._minted

    def head(self, public_key: bytes) -> tuple[int, bytes] | None:
        """(seq, id) of the account's chain head; None for an empty chain.
        A forked account has several heads; this returns the highest."""
        tips = self._tips_of(public_key)
        if not tips:
            return None
        entry_id, record = max(tips.items(), key=lambda item: (item[1].seq, item[0]))
        return record.seq, entry_id

    def spendable(self, public_key: bytes) -> int:
        """What the account's next entry may spend: its head's branch balance."""
        head = self.head(public_key)
        if head is None:
            return self._allocations.get(public_key, 0)
        return self._tips_of(public_key)[head[1]].vbalance

    def heads(self) -> dict[bytes, int]:
        """Highest sequence number per account with entries (sync summaries)."""
        self._stage_accounts()
        out: dict[bytes, int] = {}
        for key, _ in list(self._kv.scan(P_ACCOUNT)):
            head = self.head(key[1:])
            if head is not None:
                out[key[1:]] = head[0]
        return out

    def chain(self, author: bytes, from_seq: int = 1, limit: int = 1000) -> list[bytes]:
        """Wires of ``author``'s entries with seq >= from_seq, in order (all
        branches of a forked chain), at most ``limit``."""
        out: list[bytes] = []
        for key, wire in self._kv.scan(P_ENTRY + author):
            seq = _SEQ.unpack_from(key, 1 + PUBLIC_KEY_SIZE)[0]
            if seq < from_seq:
                continue
            out.append(wire)
            if len(out) >= limit:
                break
        return out

    def history(self, public_key: bytes, last: int | None = None) -> list[Entry]:
        """The account's own entries in chain order; only the ``last`` few
        (by sequence number) when given, without reading the rest."""
        head = self.head(public_key)
        from_seq = 1 if last is None or head is None else max(1, head[0] - last + 1)
        return [decode_entry(w, self.network_id, verify=False) for w in self.chain(public_key, from_seq, 10**9)]

    def statement(self, public_key: bytes, last: int | None = None) -> list[StatementLine]:
        """The account's statement, newest first (only the ``last`` few
        entries when given). A RELEASE shows what came back as settled so
        far; a RECEIVE shows the send it took in."""
        lines = []
        for entry in reversed(self.history(public_key, last)):
            body = entry.body
            counterparty, amount, memo, direction = None, 0, "", "out"
            if isinstance(body, Mint):
                amount, memo, direction = body.amount, body.memo, "in"
            elif isinstance(body, Send):
                counterparty, amount, memo = body.to, body.amount, body.memo
            elif isinstance(body, Receive):
                direction = "in"
                sent = self.get_entry(body.send_id)
                if sent is not None:
                    counterparty, amount, memo = sent.author, sent.body.amount, sent.body.memo  # type: ignore[union-attr]
            elif isinstance(body, Hold):
                counterparty, amount = body.provider, body.amount
            elif isinstance(body, Claim):
                counterparty, amount, direction = body.voucher.signer, body.amount, "in"
            elif isinstance(body, Release):
                direction = "in"
                settled = self.hold_status(body.hold_id)
                amount = settled[1] if settled else 0
                hold = self._index(body.hold_id)
                counterparty = hold.facts[0] if hold is not None else None
            lines.append(StatementLine(entry.id, entry.seq, KIND_NAMES[entry.kind], entry.timestamp_ms,
                                       counterparty, amount, memo, direction))
        return lines

    def receivable(self, public_key: bytes) -> list[tuple[bytes, int]]:
        """(send id, amount) of sends to this account not yet received."""
        prefix = P_PENDING + public_key
        return [(key[len(prefix) :], _load(v)) for key, v in self._kv.scan(prefix)]

    def can_take_in(self, public_key: bytes) -> bool:
        """Whether the account's owner should RECEIVE now: sends to it wait
        and its chain is not frozen (a frozen chain's new entries are
        refused everywhere, so appending one would only fail)."""
        return bool(self.receivable(public_key)) and self.account(public_key).frozen is None

    def hold_status(self, hold_id: bytes) -> tuple[int, int] | None:
        """(payout, refund) applied so far for a hold; None if never settled."""
        raw = self._kv.get(P_SETTLED + hold_id)
        return tuple(_load(raw)) if raw else None  # type: ignore[return-value]

    def claims_of(self, hold_id: bytes) -> dict[bytes, int]:
        return {claim_id: amount for claim_id, _, _, amount in self._list(P_CLAIMS + hold_id)}

    def releases_of(self, hold_id: bytes) -> list[tuple[bytes, int, bytes]]:
        return [(release_id, basis, ref) for release_id, _, _, basis, ref in self._list(P_RELEASES + hold_id)]

    def frozen(self) -> dict[bytes, str]:
        return dict(self._frozen)

    def state_hash(self) -> bytes:
        """BLAKE2b over all derived state that matters: equal on two replicas
        exactly when they hold the same valid entries."""
        self._stage_accounts()
        digest = hashlib.blake2b(digest_size=32)
        for prefix in STATE_PREFIXES:
            for key, value in self._kv.scan(prefix):
                digest.update(_SEQ.pack(len(key)) + key + _SEQ.pack(len(value)) + value)
        return digest.digest()

    def conservation(self) -> tuple[int, int]:
        """(sum of balance + held + pending_in over all accounts, minted).
        The ledger's invariant is that the two are equal."""
        self._stage_accounts()
        total = 0
        for _, value in self._kv.scan(P_ACCOUNT):
            balance, held, pending_in, _, _ = _load(value)
            total += balance + held + pending_in
        return total, self._minted

    # ------------------------------------------------------------- offering

    def offer(self, wire: bytes, now_ms: int) -> ApplyResult:
        """Validate and apply an entry received from a peer.

        Raises a ``MalformedInput``/``WrongNetwork``/``BadSignature``/
        ``LedgerRuleViolation`` subclass for an entry that is invalid now and
        forever; nothing is stored then. An entry that needs something we lack
        is parked and reported as "waiting".
        """
        entry = decode_entry(wire, self.network_id, verify=False)
        return self.offer_entry(entry, now_ms)

    def offer_batch(self, wires: list[bytes], now_ms: int, verify_many: "VerifyMany | None" = None) -> list[ApplyResult | P2PGPUError]:
        """Offer many entries at once (sync replies, catch-up).

        Signatures are checked up front by ``verify_many``, which the edge may
        spread over threads (``p2pgpu.verify``); the rules then run in order on
        this thread. Returns, per wire, its ``ApplyResult`` or the error that
        rejected it. Nothing is committed: the caller commits once per batch.
        """
        decoded = self.decode_batch(wires)
        return self.apply_checked(decoded, (verify_many or verify_sequentially)(signature_items(decoded)), now_ms)

    def decode_batch(self, wires: list[bytes]) -> list[Entry | P2PGPUError]:
        """Decode each wire (signatures unchecked): an Entry or the error."""
        decoded: list[Entry | P2PGPUError] = []
        for wire in wires:
            try:
                decoded.append(decode_entry(wire, self.network_id, verify=False))
            except P2PGPUError as exc:
                decoded.append(exc)
        return decoded

    def apply_checked(
        self, decoded: list[Entry | P2PGPUError], verdicts: list[bool], now_ms: int
    ) -> list[ApplyResult | P2PGPUError]:
        """Apply decoded entries whose signatures ``verdicts`` vouch for, one
        verdict per Entry in ``decoded`` (as ``signature_items`` lists them)."""
        results: list[ApplyResult | P2PGPUError] = []
        verdict = iter(verdicts)
        for item in decoded:
            if isinstance(item, P2PGPUError):
                results.append(item)
            elif not next(verdict):
                results.append(BadSignature("signature does not verify"))
            else:
                try:
                    results.append(self.offer_entry(item, now_ms, verified=True))
                except P2PGPUError as exc:
                    results.append(exc)
        return results

    def offer_entry(self, entry: Entry, now_ms: int, *, verified: bool = False) -> ApplyResult:
        """``offer`` for a decoded entry. ``verified=True`` skips the signature
        check: only for entries whose signature this process already checked
        (e.g. by a parallel verifier, or our own stored entries on rebuild)."""
        if entry.signed.network_id != self.network_id:
            raise MalformedInput("entry belongs to another network")
        try:
            forked = self._apply(entry, now_ms, verify=not verified)
        except _Waiting as waiting:
            return ApplyResult("waiting", entry.id, missing=waiting.missing)
        if forked is None:
            return ApplyResult("duplicate", entry.id)
        applied, forks = self._cascade(entry, now_ms, forked)
        return ApplyResult("applied", entry.id, applied=applied, forks=forks)

    def _cascade(self, first: Entry, now_ms: int, forked: bool) -> tuple[tuple[Entry, ...], tuple[bytes, ...]]:
        """Apply parked entries that ``first`` (and what it unblocks) needed."""
        applied = [first]
        forks = [first.author] if forked else []
        if not len(self.unchecked):
            return tuple(applied), tuple(forks)
        queue = [first.id]
        while queue:
            for waiting in self.unchecked.take(queue.pop()):
                try:
                    was_forked = self._apply(waiting, now_ms, verify=False)
                except _Waiting:
                    continue  # parked again on its next missing piece
                except P2PGPUError:
                    continue  # invalid after all: dropped
                if was_forked is None:
                    continue
                applied.append(waiting)
                queue.append(waiting.id)
                if was_forked:
                    forks.append(waiting.author)
        return tuple(applied), tuple(forks)

    def tick(self, now_ms: int) -> list[Entry]:
        """Retry entries parked for a future timestamp; returns those applied."""
        limit = now_ms + self.params.max_clock_skew_ms
        ready = [e for e in self._future if e.timestamp_ms <= limit]
        if not ready:
            return []
        self._future = [e for e in self._future if e.timestamp_ms > limit]
        applied: list[Entry] = []
        for entry in ready:
            try:
                result = self.offer_entry(entry, now_ms, verified=True)
            except P2PGPUError:
                continue
            applied.extend(result.applied)
        return applied

    # ------------------------------------------------------------- validation

    def _park(self, entry: Entry, missing: bytes | None, verify: bool) -> _Waiting:
        if verify:
            entry.signed.verify()  # never park a forgery
        if missing is None:
            if all(e.id != entry.id for e in self._future):
                self._future.append(entry)
                del self._future[: max(0, len(self._future) - self.unchecked.capacity)]
        else:
            self.unchecked.park(entry, missing)
        return _Waiting(missing)

    def _apply(self, entry: Entry, now_ms: int, verify: bool) -> bool | None:
        """Validate ``entry`` fully, then stage its effects.

        Two steps: *link* the entry into its author's chain (here: duplicate,
        clock, parent, fork), then *admit* it (``_admit_<kind>``: the kind's
        rules, the branch balance, the signature, then staging). Local
        ``append`` builds its entry on its own chain's head, where the link
        holds by construction, and goes straight to the second step.

        Returns None for a duplicate, else whether the entry forked its
        author's chain. Raises ``_Waiting`` or a typed error; nothing is
        staged unless every check passed.
        """
        signed = entry.signed
        author, timestamp = signed.signer, signed.timestamp_ms
        seq, prev = entry.seq, entry.prev
        tips = self._tips.get(author)
        if tips is None:
            tips = self._tips_of(author)
        # A child of a current tip cannot be stored yet (else the parent would
        # not be a tip), so the common case skips the duplicate lookup.
        extends_only_tip = len(tips) == 1 and prev in tips
        if not extends_only_tip and self._kv.get(P_INDEX + signed.id) is not None:
            return None
        if timestamp > now_ms + self.params.max_clock_skew_ms:
            raise self._park(entry, None, verify)

        # --- link into the author's chain: seq = parent + 1, prev = parent id
        if seq == 1:
            parent_vbalance, parent_ts = self._allocations.get(author, 0), 0
            fork_possible = bool(tips)
        else:
            parent = tips.get(prev)
            fork_possible = not extends_only_tip
            if parent is None:
                parent = self._index(prev)
                if parent is None:
                    raise self._park(entry, prev, verify)
            if parent.author != author or parent.seq != seq - 1:
                raise LedgerRuleViolation("prev does not name the author's entry at seq - 1")
            parent_vbalance, parent_ts = parent.vbalance, parent.timestamp_ms
        if timestamp < parent_ts:
            raise LedgerRuleViolation("timestamp is earlier than the previous entry's")
        forks = fork_possible and any(True for _ in self._kv.scan(P_ENTRY + author + _SEQ.pack(seq)))

        _ADMIT[entry.kind](self, entry, tips, parent_vbalance, verify)
        if forks:
            self._freeze(author, FROZEN_FORK)
            self._forked.add(author)
        return forks

    def _freeze(self, author: bytes, reason: str) -> None:
        if self._frozen.get(author) == FROZEN_FORK:
            return
        if reason == FROZEN_FORK or author not in self._frozen:
            self._frozen[author] = reason
            self._kv.put(P_FROZEN + author, reason.encode())

    def _on_branch(self, author: bytes, seq: int, entry_id: bytes, head_id: bytes, head_seq: int) -> bool:
        """Is (seq, entry_id) an ancestor-or-self of head on author's chain?
        Trivially yes for an unforked chain; forked chains are walked."""
        if seq > head_seq:
            return False
        if author not in self._forked:
            return True
        current, current_seq = head_id, head_seq
        while current_seq > seq:
            record = self._index(current)
            if record is None:
                return False
            current, current_seq = record.prev, record.seq - 1
        return current == entry_id

    def _named(self, entry: Entry, named_id: bytes, kind: int, verify: bool) -> IndexRecord:
        """The index record of an entry that ``entry`` names; parks ``entry``
        if we do not have it yet."""
        record = self._index(named_id)
        if record is None:
            raise self._park(entry, named_id, verify)
        if record.kind != kind:
            raise LedgerRuleViolation(f"{KIND_NAMES[entry.kind]} names an entry that is not a {KIND_NAMES[kind]}")
        return record

    # --- the rules of each kind -------------------------------------------
    # ``_admit_<kind>`` checks a linked entry against its kind's rules, then
    # calls ``_enter`` (the branch balance, the signature, and the writes
    # every entry makes), then stages the kind's own effects. Every check
    # runs before ``_enter``'s first write, and nothing after it raises, so a
    # rejected entry stages nothing. Linked means: the entry's parent is the
    # author's entry at ``seq - 1`` (or it is the first) with branch balance
    # ``parent_vbalance``, its timestamp is not earlier than the parent's, and
    # ``tips`` are the author's current heads (``_apply`` checks this for a
    # peer's entry; ``append`` builds its entry that way).

    def _enter(
        self, entry: Entry, tips: dict[bytes, IndexRecord], parent_vbalance: int, delta: int, facts: tuple, verify: bool
    ) -> list:
        """The checks every entry ends with, then the writes every entry makes.

        The branch balance after the entry (the parent's plus ``delta``) must
        be in [0, MAX_AMOUNT]; the signature is checked (if ``verify``) last,
        after every cheaper rule. Then the entry and its index record (with
        ``facts``) are staged, the entry replaces its parent among ``tips``,
        and the author's account record counts it. Returns that account
        record, for the kind's own effects.
        """
        kind = entry.kind
        vbalance = parent_vbalance + delta
        if vbalance < 0:
            raise InsufficientFunds(f"{KIND_NAMES[kind]} needs {format_coins(-delta)} coins but only "
                                    f"{format_coins(parent_vbalance)} are spendable")
        if vbalance > MAX_AMOUNT:
            raise LedgerRuleViolation("balance would exceed the ledger's maximum")
        signed = entry.signed
        if verify:
            signed.verify()

        # --- everything checked: stage the effects (nothing raises past here)
        author, entry_id, seq, prev = signed.signer, signed.id, entry.seq, entry.prev
        record = _tuple_new(IndexRecord, (author, seq, kind, signed.timestamp_ms, vbalance, prev, facts))
        put = self._kv.put
        put(_ENTRY_KEY.pack(P_ENTRY, author, seq, entry_id), signed.wire)  # author and id: 32 bytes, checked
        put(P_INDEX + entry_id, pack(record))
        tips.pop(prev, None)
        tips[entry_id] = record
        account = self._accounts.get(author) or self._account(author)
        account[3] += 1
        account[4] = [entry_id] if len(tips) == 1 else sorted(tips)  # canonical: replicas must agree byte for byte
        self._dirty_accounts.add(author)
        self._uncommitted += 1
        return account

    def _admit_mint(self, entry: Entry, tips: dict[bytes, IndexRecord], parent_vbalance: int, verify: bool) -> None:
        amount = entry.body.amount  # type: ignore[union-attr]
        if entry.signed.signer != self.genesis.faucet:
            raise LedgerRuleViolation("only the faucet key may mint")

        account = self._enter(entry, tips, parent_vbalance, amount, (), verify)
        account[0] += amount
        self._minted += amount
        self._kv.put(K_MINTED, pack(self._minted))

    def _admit_send(self, entry: Entry, tips: dict[bytes, IndexRecord], parent_vbalance: int, verify: bool) -> None:
        body: Send = entry.body  # type: ignore[assignment]
        to, amount = body.to, body.amount
        if to == entry.signed.signer:
            raise LedgerRuleViolation("an account cannot send to itself")

        account = self._enter(entry, tips, parent_vbalance, -amount, (to, amount), verify)
        account[0] -= amount
        recipient = self._accounts.get(to) or self._account(to)
        recipient[2] += amount
        self._dirty_accounts.add(to)
        self._kv.put(P_PENDING + to + entry.signed.id, pack(amount))

    def _admit_receive(self, entry: Entry, tips: dict[bytes, IndexRecord], parent_vbalance: int, verify: bool) -> None:
        send_id = entry.body.send_id  # type: ignore[union-attr]
        author = entry.signed.signer
        send = self._named(entry, send_id, SEND, verify)
        to, amount = send.facts
        if to != author:
            raise LedgerRuleViolation("receive names a send addressed to someone else")
        receives = self._list(P_RECEIVED + send_id)
        for receive_id, _, receive_seq in receives:
            if self._on_branch(author, receive_seq, receive_id, entry.prev, entry.seq - 1):
                raise LedgerRuleViolation("this send was already received")

        account = self._enter(entry, tips, parent_vbalance, amount, (), verify)
        receives.append([entry.signed.id, author, entry.seq])
        self._kv.put(P_RECEIVED + send_id, pack(receives))
        if len(receives) == 1:  # a forked recipient may receive once per branch; it is credited once
            account[0] += amount
            account[2] -= amount
            self._kv.delete(P_PENDING + author + send_id)

    def _admit_hold(self, entry: Entry, tips: dict[bytes, IndexRecord], parent_vbalance: int, verify: bool) -> None:
        body: Hold = entry.body  # type: ignore[assignment]
        timestamp = entry.signed.timestamp_ms
        if body.provider == entry.signed.signer:
            raise LedgerRuleViolation("a hold's provider must be another account")
        if body.expiry_ms <= timestamp:
            raise LedgerRuleViolation("hold expires before it is made")
        if body.expiry_ms - timestamp > self.params.max_hold_ms:
            raise LedgerRuleViolation(f"hold lasts longer than {self.params.max_hold_ms} ms")

        account = self._enter(entry, tips, parent_vbalance, -body.amount, (body.provider, body.amount, body.expiry_ms), verify)
        account[0] -= body.amount
        account[1] += body.amount

    def _admit_claim(self, entry: Entry, tips: dict[bytes, IndexRecord], parent_vbalance: int, verify: bool) -> None:
        body: Claim = entry.body  # type: ignore[assignment]
        hold = self._named(entry, body.hold_id, HOLD, verify)
        provider, hold_amount, expiry_ms = hold.facts
        voucher = body.voucher
        if provider != entry.author:
            raise LedgerRuleViolation("only the hold's provider may claim it")
        if voucher.signer != hold.author:
            raise LedgerRuleViolation("voucher is not signed by the hold's consumer")
        if voucher.fields[0] != body.hold_id:
            raise LedgerRuleViolation("voucher is for another hold")
        if body.amount > hold_amount:
            raise LedgerRuleViolation(
                f"claim of {format_coins(body.amount)} coins exceeds the hold of {format_coins(hold_amount)}")
        if entry.timestamp_ms > expiry_ms:
            raise LedgerRuleViolation("claim is stamped after the hold expired")
        claims = self._list(P_CLAIMS + body.hold_id)
        for claim_id, claim_author, claim_seq, _ in claims:
            if claim_author == entry.author and self._on_branch(entry.author, claim_seq, claim_id, entry.prev, entry.seq - 1):
                raise LedgerRuleViolation("this hold was already claimed")
        try:
            voucher.verify()
        except BadSignature as exc:
            raise BadSignature("voucher signature does not verify") from exc

        self._enter(entry, tips, parent_vbalance, body.amount, (body.hold_id, body.amount), verify)
        claims.append([entry.id, entry.author, entry.seq, body.amount])
        self._kv.put(P_CLAIMS + body.hold_id, pack(claims))
        self._resettle(body.hold_id, hold)

    def _admit_release(self, entry: Entry, tips: dict[bytes, IndexRecord], parent_vbalance: int, verify: bool) -> None:
        body: Release = entry.body  # type: ignore[assignment]
        hold = self._index(body.hold_id)
        if hold is None or hold.kind != HOLD or hold.author != entry.author:
            raise LedgerRuleViolation("release names no hold of this account")
        if not self._on_branch(entry.author, hold.seq, body.hold_id, entry.prev, entry.seq - 1):
            raise LedgerRuleViolation("release names a hold on another branch")
        provider, hold_amount, expiry_ms = hold.facts
        releases = self._list(P_RELEASES + body.hold_id)
        for release_id, _, release_seq, _, _ in releases:
            if self._on_branch(entry.author, release_seq, release_id, entry.prev, entry.seq - 1):
                raise LedgerRuleViolation("this hold was already released")
        refund = hold_amount
        if body.basis == BASIS_CLAIM:
            claim = self._named(entry, body.ref, CLAIM, verify)
            claimed_hold, claimed = claim.facts
            if claimed_hold != body.hold_id:
                raise LedgerRuleViolation("release names a claim of another hold")
            refund = hold_amount - claimed
        elif body.basis == BASIS_PROVIDER_ENTRY:
            record = self._index(body.ref)
            if record is None:
                raise self._park(entry, body.ref, verify)
            if record.author != provider:
                raise LedgerRuleViolation("release names an entry not written by the hold's provider")
            if record.timestamp_ms <= expiry_ms:
                raise LedgerRuleViolation("the provider entry named is not after the hold's expiry")
            for claim_id, claim_author, claim_seq, _ in self._list(P_CLAIMS + body.hold_id):
                if claim_author == provider and self._on_branch(provider, claim_seq, claim_id, body.ref, record.seq):
                    raise LedgerRuleViolation("the provider claimed this hold; release against the claim")
        elif body.basis == BASIS_WAIVER:
            waiver = parse_waiver(body.ref, self.network_id)
            if waiver.signer != provider or waiver.fields[0] != body.hold_id:
                raise LedgerRuleViolation("waiver is not the hold's provider's waiver of this hold")
            try:
                waiver.verify()
            except BadSignature as exc:
                raise BadSignature("waiver signature does not verify") from exc
        elif entry.timestamp_ms <= expiry_ms + self.params.release_grace_ms:  # BASIS_TIMEOUT
            raise LedgerRuleViolation("a release on time alone must wait for expiry plus the grace period")

        self._enter(entry, tips, parent_vbalance, refund, (), verify)
        releases.append([entry.id, entry.author, entry.seq, body.basis, body.ref])
        self._kv.put(P_RELEASES + body.hold_id, pack(releases))
        self._resettle(body.hold_id, hold)

    def _resettle(self, hold_id: bytes, hold: IndexRecord) -> None:
        """Recompute one hold's payout/refund from every claim and release of
        it, and move the difference from what was applied before."""
        provider, hold_amount, _ = hold.facts
        claims = self.claims_of(hold_id)
        releases = self.releases_of(hold_id)
        payout, refund = settle_hold(hold_amount, claims, releases)
        raw = self._kv.get(P_SETTLED + hold_id)
        old_payout, old_refund = _load(raw) if raw else (0, 0)
        d_payout, d_refund = payout - old_payout, refund - old_refund
        provider_account = self._account(provider)
        consumer_account = self._account(hold.author)
        provider_account[0] += d_payout
        consumer_account[1] -= d_payout + d_refund
        consumer_account[0] += d_refund
        self._dirty_accounts.update((provider, hold.author))
        self._kv.put(P_SETTLED + hold_id, pack([payout, refund]))
        if claims and any(basis == BASIS_WAIVER for _, basis, _ in releases):
            # The provider waived the hold and also claimed it: two signatures
            # of its own that contradict each other (DESIGN §5 rule 4).
            self._freeze(provider, FROZEN_EQUIVOCATION)

    # ------------------------------------------------------------- authoring

    def append(self, key: NodeKey, body: Body, now_ms: int) -> Entry:
        """Create, sign and apply the node's own next entry (staged; call
        ``commit`` before acknowledging it). Raises ``InsufficientFunds``,
        ``LedgerRuleViolation`` or ``MalformedInput`` without changing anything.

        ``body`` is typed, so nothing is re-parsed from the signed bytes; its
        fields get the same checks as a peer's entry. The entry is built on
        the chain's only head, so it is linked by construction (what
        ``_apply`` checks for a peer's entry): its seq and prev are the
        head's, its timestamp is not earlier than the head's, it cannot be a
        duplicate (its parent would not be a head) nor a fork. It then gets
        its kind's rules (``_admit_<kind>``) like every other entry.
        """
        kind, fields = _body_fields(body)
        author = key.public_key
        if author in self._forked:
            raise LedgerRuleViolation("this account's chain is frozen by a fork")
        tips = self._tips.get(author)
        if tips is None:
            tips = self._tips_of(author)
        if tips:
            ((prev, head),) = tips.items()  # an unforked chain has one head
            seq, parent_vbalance = head.seq + 1, head.vbalance
            timestamp = now_ms if now_ms >= head.timestamp_ms else head.timestamp_ms
        else:
            seq, prev, timestamp, parent_vbalance = 1, b"", now_ms, self._allocations.get(author, 0)
        signed = sign_object(key, Tag.ENTRY, self.network_id, timestamp, (seq, prev, kind, fields))
        if len(signed.wire) > MAX_ENTRY_SIZE:
            raise MalformedInput(f"entry of {len(signed.wire)} bytes exceeds {MAX_ENTRY_SIZE}")
        entry = _tuple_new(Entry, (signed, seq, prev, kind, body))
        try:
            _ADMIT[kind](self, entry, tips, parent_vbalance, False)
        except _Waiting as waiting:
            # Our own entry must not wait: take it back out of the parking area.
            self.unchecked.discard(entry.id)
            raise LedgerRuleViolation(
                f"{KIND_NAMES[kind]} names an entry this node does not have"
                + (f" ({waiting.missing.hex()[:16]})" if waiting.missing else "")
            ) from None
        if self.unchecked._by_id:  # rather than len(): no Python-level call on the hot path
            self._cascade(entry, now_ms, False)
        return entry

    def mint(self, key: NodeKey, amount: int, now_ms: int, memo: str = "") -> Entry:
        return self.append(key, Mint(amount, memo), now_ms)

    def send(self, key: NodeKey, to: bytes, amount: int, now_ms: int, memo: str = "") -> Entry:
        return self.append(key, Send(to, amount, memo), now_ms)

    def receive(self, key: NodeKey, send_id: bytes, now_ms: int) -> Entry:
        return self.append(key, Receive(send_id), now_ms)

    def hold(self, key: NodeKey, provider: bytes, amount: int, expiry_ms: int, job_id: bytes, now_ms: int) -> Entry:
        return self.append(key, Hold(provider, amount, expiry_ms, job_id), now_ms)

    def claim(self, key: NodeKey, hold_id: bytes, voucher: Signed, now_ms: int) -> Entry:
        return self.append(key, Claim(hold_id, _parse_voucher(voucher.wire, self.network_id)), now_ms)

    def release(self, key: NodeKey, hold_id: bytes, basis: int, ref: bytes, now_ms: int) -> Entry:
        return self.append(key, Release(hold_id, basis, ref), now_ms)

    def receive_all(self, key: NodeKey, now_ms: int) -> list[Entry]:
        """Take in every pending send to this account (the daemon does this
        as sends arrive, so coins sent to a node become spendable)."""
        return [self.receive(key, send_id, now_ms) for send_id, _ in self.receivable(key.public_key)]

    # ------------------------------------------------------------- rebuild

    def rebuild(self) -> None:
        """Throw away all derived state and replay every stored entry.

        The result must equal what incremental application produced (property
        11; the tests compare state hashes). A marker key makes an interrupted
        rebuild restart on the next open instead of leaving partial state.
        """
        self.commit()
        self._kv.put(K_REBUILDING, b"1")
        self._kv.flush(sync=True)
        wires = [wire for _, wire in self._kv.scan(P_ENTRY)]
        for prefix in DERIVED_PREFIXES:
            for key, _ in list(self._kv.scan(prefix)):
                self._kv.delete(key)
        self._tips.clear()
        self._accounts.clear()
        self._dirty_accounts.clear()
        self._frozen.clear()
        self._forked.clear()
        self._initialise_genesis()
        saved, self.unchecked = self.unchecked, Unchecked(max(len(wires), 1))
        for i, wire in enumerate(wires):
            entry = decode_entry(wire, self.network_id, verify=False)
            self.offer_entry(entry, MAX_INT, verified=True)
            if i % 1000 == 999:
                self._stage_accounts()
                self._kv.flush(sync=False)
        self.unchecked = saved
        self._uncommitted = 0
        self._stage_accounts()
        self._kv.delete(K_REBUILDING)
        self._kv.flush(sync=True)


# kind -> its rules; see the note above ``Ledger._enter``
_ADMIT = {
    MINT: Ledger._admit_mint,
    SEND: Ledger._admit_send,
    RECEIVE: Ledger._admit_receive,
    HOLD: Ledger._admit_hold,
    CLAIM: Ledger._admit_claim,
    RELEASE: Ledger._admit_release,
}

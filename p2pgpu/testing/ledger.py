"""Factories and a scenario simulator for ledger tests and benchmarks.

``LedgerSim`` plays a small network of honest and dishonest accounts against
one authoritative ("world") ledger and records every entry it accepted, in
the order it was made. Tests then deliver those wires to fresh replicas in
other orders, with duplicates, partitions and forgeries, and compare state.

Operations are small tuples of integers so Hypothesis can generate and shrink
them (see ``operations()``); an operation that would be invalid at that point
(insufficient funds, nothing to receive) is skipped, so every generated
scenario is a legal history, including the legal-but-hostile parts: forks,
waivers followed by claims, and claims that surface after a timeout release.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from p2pgpu.core.codec import Tag, sign_object
from p2pgpu.core.genesis import Genesis, LedgerParams
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.kv import KeyValueStore, MemoryStore
from p2pgpu.core.ledger import (
    BASIS_CLAIM,
    BASIS_PROVIDER_ENTRY,
    BASIS_TIMEOUT,
    BASIS_WAIVER,
    SEND,
    Entry,
    Ledger,
    make_voucher,
    make_waiver,
    parse_entry,
)
from p2pgpu.errors import P2PGPUError

START_MS = 1_700_000_000_000
SIM_PARAMS = LedgerParams(max_clock_skew_ms=60_000, release_grace_ms=20_000, max_hold_ms=600_000)

NAMES = ("alice", "bob", "carol", "dave", "erin")


def key_for(name: str) -> NodeKey:
    """Deterministic test keys: ``key_for("alice")`` is the same everywhere."""
    seed = (name.encode() * 32)[:32]
    return NodeKey(seed)


def make_genesis(
    names: tuple[str, ...] = NAMES[:3],
    allocation: int = 1_000,
    faucet: str = "faucet",
    params: LedgerParams = SIM_PARAMS,
    name: str = "testnet",
) -> Genesis:
    return Genesis(
        name=name,
        created_ms=START_MS,
        faucet=key_for(faucet).public_key,
        allocations=tuple(sorted((key_for(n).public_key, allocation) for n in names)),
        params=params,
    )


@dataclass
class OpenHold:
    entry: Entry
    consumer: int
    provider: int
    amount: int
    expiry_ms: int
    claim: Entry | None = None
    released: bool = False


# (op code, actor, target, amount, flag)
Operation = tuple[int, int, int, int, int]
OP_MINT, OP_SEND, OP_RECEIVE, OP_HOLD, OP_CLAIM, OP_RELEASE, OP_WAIT, OP_FORK, OP_LATE_CLAIM, OP_WAIVE_THEN_CLAIM = range(10)


def operations(max_size: int = 30, hostile: bool = True):
    """Hypothesis strategy for a scenario. ``hostile=False`` leaves out forks,
    late claims and equivocation. (Hypothesis is a test dependency, so it is
    imported here, not at module level.)"""
    from hypothesis import strategies as st

    top = OP_WAIVE_THEN_CLAIM if hostile else OP_WAIT
    return st.lists(
        st.tuples(
            st.integers(0, top),
            st.integers(0, len(NAMES)),
            st.integers(0, len(NAMES)),
            st.integers(1, 400),
            st.integers(0, 3),
        ),
        max_size=max_size,
    )


@dataclass
class LedgerSim:
    store: KeyValueStore = field(default_factory=MemoryStore)
    genesis: Genesis = field(default_factory=make_genesis)

    def __post_init__(self) -> None:
        self.keys = [key_for(n) for n in NAMES] + [key_for("faucet")]
        self.faucet_index = len(self.keys) - 1
        self.world = Ledger(self.store, self.genesis)
        self.now = START_MS
        self.wires: list[bytes] = []
        self.holds: list[OpenHold] = []

    # every accepted entry, in creation order
    def _record(self, entry: Entry) -> Entry:
        self.wires.append(entry.wire)
        return entry

    def _try(self, fn):
        try:
            return self._record(fn())
        except P2PGPUError:
            return None

    def run(self, ops: list[Operation]) -> list[bytes]:
        for op in ops:
            self.step(op)
        self.world.commit()
        return self.wires

    def step(self, op: Operation) -> None:
        code, actor, target, amount, flag = op
        self.now += 7
        world, keys, now = self.world, self.keys, self.now
        key = keys[actor]
        other = keys[target] if target != actor else keys[(target + 1) % len(keys)]
        if code == OP_MINT:
            self._try(lambda: world.mint(keys[self.faucet_index], amount * 10, now, "drip"))
        elif code == OP_SEND:
            self._try(lambda: world.send(key, other.public_key, amount, now))
        elif code == OP_RECEIVE:
            pending = world.receivable(key.public_key)
            if pending:
                send_id = pending[flag % len(pending)][0]
                self._try(lambda: world.receive(key, send_id, now))
        elif code == OP_HOLD:
            provider = keys.index(other)
            entry = self._try(lambda: world.hold(key, other.public_key, amount, now + 5_000, b"job", now))
            if entry is not None:
                self.holds.append(OpenHold(entry, actor, provider, amount, now + 5_000))
        elif code == OP_CLAIM:
            hold = self._pick_hold(amount, lambda h: h.claim is None and not h.released and now <= h.expiry_ms)
            if hold is not None:
                paid = 1 + (amount * 7) % hold.amount
                voucher = make_voucher(keys[hold.consumer], world.network_id, hold.entry.id, paid, now)
                hold.claim = self._try(lambda: world.claim(keys[hold.provider], hold.entry.id, voucher, now))
        elif code == OP_RELEASE:
            hold = self._pick_hold(amount, lambda h: not h.released)
            if hold is not None:
                self._release(hold, flag)
        elif code == OP_WAIT:
            self.now += amount * 50
        elif code == OP_FORK:
            self._fork(actor, other, amount)
        elif code == OP_LATE_CLAIM:
            self._late_claim(amount)
        elif code == OP_WAIVE_THEN_CLAIM:
            self._waive_then_claim(amount)

    def _pick_hold(self, selector: int, predicate) -> OpenHold | None:
        candidates = [h for h in self.holds if predicate(h)]
        return candidates[selector % len(candidates)] if candidates else None

    def _release(self, hold: OpenHold, flag: int) -> None:
        world, keys = self.world, self.keys
        consumer = keys[hold.consumer]
        if hold.claim is not None:
            entry = self._try(lambda: world.release(consumer, hold.entry.id, BASIS_CLAIM, hold.claim.id, self.now))
        elif flag == 0:
            waiver = make_waiver(keys[hold.provider], world.network_id, hold.entry.id, "declined", self.now)
            entry = self._try(lambda: world.release(consumer, hold.entry.id, BASIS_WAIVER, waiver.wire, self.now))
        elif flag == 1 and self.now > hold.expiry_ms:
            # the provider wrote something after expiry without claiming
            marker = self._try(lambda: world.send(keys[hold.provider], consumer.public_key, 1, self.now))
            if marker is None:
                return
            entry = self._try(lambda: world.release(consumer, hold.entry.id, BASIS_PROVIDER_ENTRY, marker.id, self.now))
        else:
            self.now = max(self.now, hold.expiry_ms + self.genesis.params.release_grace_ms + 1)
            entry = self._try(lambda: world.release(consumer, hold.entry.id, BASIS_TIMEOUT, b"", self.now))
        if entry is not None:
            hold.released = True

    def _fork(self, actor: int, other: NodeKey, amount: int) -> None:
        """Sign a SEND that conflicts with the actor's current head."""
        world = self.world
        key = self.keys[actor]
        head = world.head(key.public_key)
        if head is None or world.frozen().get(key.public_key):
            return
        head_entry = world.get_entry(head[1])
        assert head_entry is not None
        signed = sign_object(
            key, Tag.ENTRY, world.network_id, max(self.now, head_entry.timestamp_ms),
            [head_entry.seq, head_entry.prev, SEND, [other.public_key, amount, "double"]],
        )
        entry = parse_entry(signed)
        try:
            result = world.offer_entry(entry, self.now)
        except P2PGPUError:
            return
        if result.status == "applied":
            self.wires.append(entry.wire)

    def _late_claim(self, selector: int) -> None:
        """Release on time alone, then let the provider's backdated claim surface."""
        hold = self._pick_hold(selector, lambda h: h.claim is None and not h.released)
        if hold is None:
            return
        world, keys = self.world, self.keys
        provider = keys[hold.provider]
        head = world.head(provider.public_key)
        if head is not None and world.get_entry(head[1]).timestamp_ms > hold.expiry_ms:  # type: ignore[union-attr]
            return
        self._release(hold, flag=3)
        if not hold.released:
            return
        voucher = make_voucher(keys[hold.consumer], world.network_id, hold.entry.id, hold.amount, hold.expiry_ms)
        hold.claim = self._try(lambda: world.claim(provider, hold.entry.id, voucher, hold.expiry_ms))

    def _waive_then_claim(self, selector: int) -> None:
        """The provider waives a hold (consumer releases with it) and then
        claims it anyway: equivocation the ledger must catch."""
        hold = self._pick_hold(selector, lambda h: h.claim is None and not h.released and self.now <= h.expiry_ms)
        if hold is None:
            return
        self._release(hold, flag=0)
        if not hold.released:
            return
        voucher = make_voucher(self.keys[hold.consumer], self.world.network_id, hold.entry.id, hold.amount, self.now)
        hold.claim = self._try(lambda: self.world.claim(self.keys[hold.provider], hold.entry.id, voucher, self.now))


def replay(wires: list[bytes], store: KeyValueStore, genesis: Genesis, now_ms: int | None = None) -> Ledger:
    """A fresh replica that was offered ``wires`` in the given order."""
    ledger = Ledger(store, genesis)
    now = now_ms if now_ms is not None else START_MS + 10**9
    for wire in wires:
        ledger.offer(wire, now)
    ledger.commit()
    return ledger

"""Every replication decision a node makes, sans-IO (DESIGN §5 "Replication", §8).

Theory of operation
-------------------
``ReplicationPolicy`` decides; ``p2pgpu.replication.LedgerReplicator`` (trio
and libp2p) and the simulator (``p2pgpu.testing.sim``) only move bytes and
time. The edge tells the policy what happened (an *event*: a method call
with the clock ``now_ms``) and carries out what it returns (*actions*,
frozen dataclasses below); in between it sleeps until ``next_deadline()``
and then calls ``poll(now_ms)``. Nothing here reads a clock, awaits or
touches a socket; randomness comes from the ``random.Random`` the caller
passes in, so a seeded simulator replays every choice.

``now_ms`` is a monotonic clock in milliseconds (the edge uses trio's), used
only for timers; ``committed`` also takes ``wall_ms``, the ledger's clock,
because freshness compares it with entries' timestamps. Peers are whatever
hashable ids the caller uses (libp2p peer id strings, the simulator's ints).

The decisions, one place each:

==============================  ==========================================  ===========================
event                           rule                                        actions
==============================  ==========================================  ===========================
``track`` (an ``ApplyResult``)  applied: stage for acknowledgement; a fork:  (none; ``staged`` decides)
                                build its proof; waiting: want the missing
                                id (hint: the peer it came from)
``staged(source, durable)``     durable, or ``gossip_commit_entries``       ``Commit`` now, or arm the
                                staged, or a sync with                      group-commit timer
                                ``sync_commit_entries``: commit now;
                                gossip/tick/lazy offers: within
                                ``commit_interval_ms``; a sync: at its end
``committed``                   acknowledge; queue own and offered          ``Acknowledge``; arm the
                                entries, synced/ticked ones while fresh,    announce timer (linger)
                                and fork proofs (proofs first)
``peers_changed``               a new peer: pull from it                    ``StartSync(CONNECTED)``
``pull_ended``                  learned something: ask every other peer to  ``Commit`` if staged;
                                sync (its responder pulls back); asked for  ``StartSync(PROPAGATE /
                                another round meanwhile: go again           AGAIN)``
``served(peer_has_more)``       pull back from the requester, at most once  ``StartSync(PULL_BACK)``
                                per ``pull_back_interval_ms`` (deferred,    now or at the deadline
                                never dropped)
``admit`` / ``serve_ended``     2 sessions per peer, ``max_serving`` in all ``Admission``
``poll`` (timers)               group commit; ledger tick; due pull-backs;  ``Commit``, ``Tick``,
                                periodic pull from a random peer; fetch     ``StartSync``, ``FetchIds``,
                                what parked entries wait for; publish       ``Publish``
                                paced by a token bucket
``fetch_ended``                 the fetch round is over: the next may start (none)
==============================  ==========================================  ===========================

A pull (``sync_with``) with one peer runs at a time; a request for another
while one runs is remembered (``again``) and served by one more session.
Wanted ids wait ``fetch_delay_ms`` (they usually arrive by gossip), then go
to the peer that sent the waiting entry, later to random peers, at most
``fetch_tries`` times, one fetch round at a time; an id we hold, or that no
parked entry waits for any more, is dropped. Announcements are never dropped
by batching: a batch that does not fit one message goes back to the front.
"""

from __future__ import annotations

import logging
import math
import random
from collections import OrderedDict, deque
from collections.abc import Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Generic, Protocol, TypeVar, Union

from p2pgpu.core.ledger import ApplyResult, Entry, decode_entry
from p2pgpu.core.sync import MAX_ANNOUNCE_ENTRIES, MAX_FETCH_IDS, decode_announcement, fork_proof, pack_announcements
from p2pgpu.errors import ConfigError

__all__ = [
    "Source",
    "SyncReason",
    "Admission",
    "PullOutcome",
    "SessionNext",
    "ReplicationConfig",
    "Commit",
    "Acknowledge",
    "Publish",
    "StartSync",
    "FetchIds",
    "Tick",
    "Action",
    "ReplicaView",
    "ReplicationPolicy",
    "FollowUp",
    "fetch_batches",
]

logger = logging.getLogger(__name__)

P = TypeVar("P", bound=Hashable)


class Source(Enum):
    """Where an applied entry came from; decides whether it is announced."""

    LOCAL = "local"  # our own key signed it (``append``)
    OFFERED = "offered"  # handed in outside the network (a job's hold)
    GOSSIP = "gossip"  # the ledger topic: gossipsub already forwarded it
    SYNC = "sync"  # an anti-entropy session or fetch we started
    TICK = "tick"  # parked until its timestamp was no longer in the future


ANNOUNCED_ALWAYS = frozenset({Source.LOCAL, Source.OFFERED})
ANNOUNCED_WHILE_FRESH = frozenset({Source.SYNC, Source.TICK})


class SyncReason(Enum):
    """Why a pull was started (for logs and simulator traces)."""

    CONNECTED = "connected"
    PERIODIC = "periodic"
    PULL_BACK = "pull-back"
    PROPAGATE = "propagate"
    AGAIN = "again"


class Admission(Enum):
    SERVE = "serve"
    BUSY = "busy"


class PullOutcome(Enum):
    COMPLETED = "completed"
    FAILED = "failed"


class SessionNext(Enum):
    """After one sync session: run another (truncated, or asked for again) or stop."""

    AGAIN = "again"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class ReplicationConfig:
    """The knobs. Times in milliseconds, rates per second.

    The announce pacing stays under receivers' per-origin gossip limit
    (``GossipConfig.rate_per_second``, 10/s, burst 50): a message they drop
    for rate costs everyone a later sync instead.
    """

    sync_interval_ms: int = 10_000
    sync_jitter: float = 0.2  # periodic pulls every interval * U(1 - j, 1 + j): nodes do not sync in step
    commit_interval_ms: int = 20
    gossip_commit_entries: int = 256
    sync_commit_entries: int = 2048  # one synced write per ~4 frames of a catch-up
    fresh_window_ms: int = 120_000
    announce_linger_ms: int = 50
    announce_rate: float = 8.0
    announce_burst: float = 16.0
    announce_batch: int = MAX_ANNOUNCE_ENTRIES
    announce_backlog: int = 100_000
    proof_backlog: int = 1024
    fetch_delay_ms: int = 500
    fetch_tries: int = 3
    max_fetch_ids: int = MAX_FETCH_IDS
    pull_back_interval_ms: int = 1000  # a summary that lies about having more cannot make us loop
    max_sessions_per_sync: int = 64
    max_follow_up_rounds: int = 32
    tick_interval_ms: int = 1000
    max_serving: int = 8
    max_serving_per_peer: int = 2  # a peer's sync and its fetcher may ask at the same time

    def __post_init__(self) -> None:
        positive = ("sync_interval_ms", "commit_interval_ms", "gossip_commit_entries", "sync_commit_entries",
                    "announce_batch", "announce_backlog", "proof_backlog", "fetch_tries", "max_fetch_ids",
                    "max_sessions_per_sync", "tick_interval_ms", "max_serving", "max_serving_per_peer")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"replication: {name} must be at least 1")
        for name in ("fresh_window_ms", "announce_linger_ms", "fetch_delay_ms", "pull_back_interval_ms",
                     "max_follow_up_rounds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"replication: {name} must not be negative")
        if not 0 <= self.sync_jitter < 1:
            raise ConfigError("replication: sync_jitter must be in [0, 1)")
        if self.announce_rate <= 0 or self.announce_burst < 1:
            raise ConfigError("replication: announce_rate must be positive and announce_burst at least 1")
        if self.announce_batch > MAX_ANNOUNCE_ENTRIES or self.max_fetch_ids > MAX_FETCH_IDS:
            raise ConfigError("replication: a batch larger than the protocol allows")


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Commit:
    """Commit the ledger (a synced write), then report ``committed``."""


@dataclass(frozen=True, slots=True)
class Acknowledge:
    """These entries are durable: count them, tell listeners (``on_applied``)."""

    entries: tuple[tuple[Entry, Source], ...]


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish ``data`` (an announcement) on the ledger topic."""

    data: bytes
    entries: int
    fork_proof: bool


@dataclass(frozen=True, slots=True)
class StartSync(Generic[P]):
    """Pull from ``peer`` in the background; report ``pull_ended`` when done."""

    peer: P
    reason: SyncReason


@dataclass(frozen=True, slots=True)
class FetchIds(Generic[P]):
    """Fetch ``ids`` from ``peer`` by id; report ``fetch_ended`` when done."""

    peer: P
    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Tick:
    """Call ``ledger.tick`` (entries stamped ahead of our clock), then ``ticked``."""


Action = Union[Commit, Acknowledge, Publish, StartSync, FetchIds, Tick]


# ---------------------------------------------------------------- what the policy reads


class ParkedView(Protocol):
    def missing_ids(self) -> Collection[bytes]: ...


class ReplicaView(Protocol):
    """The read-only ledger facts the policy needs (``Ledger`` has them all)."""

    @property
    def network_id(self) -> bytes: ...

    @property
    def uncommitted(self) -> int: ...

    @property
    def unchecked(self) -> ParkedView: ...

    def has_entry(self, entry_id: bytes) -> bool: ...

    def chain(self, author: bytes, from_seq: int = 1, limit: int = 1000) -> list[bytes]: ...


@dataclass(frozen=True, slots=True)
class _Wanted(Generic[P]):
    since_ms: int  # when wanted, or last asked for
    hint: P | None  # the peer whose entry waits for it: it holds it
    attempts: int


def fetch_batches(ids: Iterable[bytes], size: int = MAX_FETCH_IDS) -> list[tuple[bytes, ...]]:
    """``ids`` without repeats, in order, in requests of at most ``size``."""
    unique = list(dict.fromkeys(ids))
    return [tuple(unique[i : i + size]) for i in range(0, len(unique), size)]


class FollowUp:
    """After a sync, what its entries still wait for is fetched from the same
    peer, which applied them and so holds what they name: round after round,
    each one step back along a branch we did not know, never the same id
    twice, at most ``max_follow_up_rounds`` rounds."""

    def __init__(self, view: ReplicaView, config: ReplicationConfig) -> None:
        self._view, self._config = view, config
        self.rounds = 0
        self._asked: set[bytes] = set()

    def next_batches(self, missing: Iterable[bytes]) -> list[tuple[bytes, ...]]:
        """The fetch requests of the next round; empty when done."""
        if self.rounds >= self._config.max_follow_up_rounds:
            return []
        ids = [m for m in dict.fromkeys(missing) if m not in self._asked and not self._view.has_entry(m)]
        if not ids:
            return []
        self.rounds += 1
        self._asked.update(ids)
        return fetch_batches(ids, self._config.max_fetch_ids)


class ReplicationPolicy(Generic[P]):
    """The replicator's state machine (module docstring). One per node
    incarnation; single-threaded: call it from one thread (the event loop)."""

    def __init__(self, view: ReplicaView, config: ReplicationConfig = ReplicationConfig(), *,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self._view = view
        self._rng = rng if rng is not None else random.Random()
        self._started = False
        self._peers: tuple[P, ...] = ()
        self._known: frozenset[P] = frozenset()
        # commits
        self._unacked: list[tuple[Entry, Source]] = []
        self._proofs: list[bytes] = []
        self._commit_at: int | None = None
        # announcements
        self._wires: deque[bytes] = deque(maxlen=config.announce_backlog)
        self._messages: deque[bytes] = deque(maxlen=config.proof_backlog)
        self._announce_at: int | None = None
        self._tokens = float(config.announce_burst)
        self._tokens_at: int | None = None
        # anti-entropy
        self._pulling: set[P] = set()
        self._again: set[P] = set()
        self._pull_back_due: dict[P, int] = {}
        self._last_pull_back: dict[P, int] = {}
        self._periodic_at: int | None = None
        self._tick_at: int | None = None
        # fetching what parked entries wait for, ordered by since_ms
        self._wanted: OrderedDict[bytes, _Wanted[P]] = OrderedDict()
        self._fetching = 0
        # serving
        self._serving: dict[P, int] = {}
        self.forked_authors: set[bytes] = set()

    # ------------------------------------------------------------ inspection

    @property
    def started(self) -> bool:
        return self._started

    @property
    def peers(self) -> tuple[P, ...]:
        return self._peers

    def wanted(self) -> dict[bytes, tuple[int, P | None, int]]:
        """Missing ids we mean to fetch: id -> (since_ms, hint, attempts)."""
        return {k: (w.since_ms, w.hint, w.attempts) for k, w in self._wanted.items()}

    def pulling(self) -> frozenset[P]:
        return frozenset(self._pulling)

    def pending_announcements(self) -> int:
        return len(self._wires) + len(self._messages)

    def has_staged(self) -> bool:
        """Something applied (or a proof) that no commit acknowledged yet."""
        return bool(self._unacked or self._proofs or self._view.uncommitted)

    def idle(self) -> bool:
        """Nothing staged, queued, wanted or running (for a simulator's quiescence)."""
        return not (self.has_staged() or self._wires or self._messages or self._wanted or self._pulling
                    or self._fetching or self._pull_back_due)

    def next_deadline(self) -> int | None:
        """When ``poll`` next has something to do (None: only an event can give it work)."""
        times = [t for t in (self._commit_at, self._announce_at, self._tick_at, self._periodic_at) if t is not None]
        if self._pull_back_due:
            times.append(min(self._pull_back_due.values()))
        fetch_at = self._fetch_at()
        if fetch_at is not None:
            times.append(fetch_at)
        return min(times) if times else None

    # ------------------------------------------------------------ lifecycle

    def start(self, now_ms: int) -> None:
        """Background work begins (the edge's ``run``): periodic and
        on-connect pulls, pull-backs, ticks. Without it the policy still
        stages, commits and announces, as for a tool that only syncs once."""
        self._started = True
        self._periodic_at = now_ms + self._sync_gap()
        self._tick_at = now_ms + self.config.tick_interval_ms
        if (self._wires or self._messages) and self._announce_at is None:
            self._announce_at = now_ms + self.config.announce_linger_ms

    def stop(self) -> None:
        self._started = False
        self._periodic_at = self._tick_at = None
        self._pull_back_due.clear()

    def peers_changed(self, now_ms: int, peers: Sequence[P]) -> list[Action]:
        """The connected peers now (in a stable order). Pull from each new one."""
        new = [p for p in peers if p not in self._known]
        self._peers = tuple(peers)
        self._known = frozenset(self._peers)
        return [a for peer in new for a in self._want_sync(peer, SyncReason.CONNECTED)]

    # ------------------------------------------------------------ staging and commits

    def track(self, now_ms: int, result: ApplyResult, source: Source, hint: P | None = None) -> None:
        """What one offer to the ledger did, until the commit acknowledges it."""
        if result.status == "applied":
            self._unacked.extend((entry, source) for entry in result.applied)
            if result.forks:
                self._on_forks(result)
        elif result.status == "waiting" and result.missing is not None:
            self._want(now_ms, result.missing, hint)

    def stage(self, entries: Iterable[Entry], source: Source) -> None:
        """Entries applied other than through ``track`` (a local append)."""
        self._unacked.extend((entry, source) for entry in entries)

    def ticked(self, now_ms: int, entries: Sequence[Entry]) -> list[Action]:
        """``ledger.tick`` applied these (``Tick``)."""
        self.stage(entries, Source.TICK)
        return self.staged(now_ms, Source.TICK)

    def settle(self) -> list[Action]:
        """An exchange (a fetch, a pull, the node stopping) is over: commit
        whatever it staged."""
        return [Commit()] if self.has_staged() else []

    def staged(self, now_ms: int, source: Source, *, durable: bool = False) -> list[Action]:
        """Entries from ``source`` were just staged: commit now or later?
        ``durable``: the caller returns only once they are durable."""
        if durable:
            return [Commit()]
        uncommitted = self._view.uncommitted
        if source is Source.SYNC:  # a session commits in large groups and at its end
            return [Commit()] if uncommitted >= self.config.sync_commit_entries else []
        if uncommitted >= self.config.gossip_commit_entries:
            return [Commit()]
        if self.has_staged() and self._commit_at is None:
            self._commit_at = now_ms + self.config.commit_interval_ms
        return []

    def committed(self, now_ms: int, wall_ms: int) -> list[Action]:
        """The ledger committed: acknowledge what was staged, whoever staged
        it, and queue what is to be announced (docs/protocol-ledger.md §1)."""
        self._commit_at = None
        acked, self._unacked = self._unacked, []
        proofs, self._proofs = self._proofs, []
        fresh_after = wall_ms - self.config.fresh_window_ms
        for entry, source in acked:
            if source in ANNOUNCED_ALWAYS or (source in ANNOUNCED_WHILE_FRESH and entry.timestamp_ms >= fresh_after):
                self._wires.append(entry.wire)
        self._messages.extend(proofs)
        if (self._wires or self._messages) and self._announce_at is None:
            # Linger: what commits next rides along, and the entry that woke
            # us (a job's HOLD) reaches its provider inside the job request
            # first, so the provider is not busy checking the announcement
            # while it decides on the job.
            self._announce_at = now_ms + self.config.announce_linger_ms
        return [Acknowledge(tuple(acked))] if acked else []

    def _on_forks(self, result: ApplyResult) -> None:
        """A proof for every entry that forked its author's chain: all the
        entries at that (author, seq), announced after the commit."""
        forked = set(result.forks)
        self.forked_authors.update(forked)
        for entry in result.applied:
            if entry.author not in forked:
                continue
            siblings = []
            for wire in self._view.chain(entry.author, entry.seq, 64):
                other = decode_entry(wire, self._view.network_id, verify=False)
                if other.seq != entry.seq:
                    break
                siblings.append((other.id, wire))
            if len(siblings) > 1:
                self._proofs.append(fork_proof(siblings))
                logger.info("fork: %s has %d entries at seq %d; announcing the proof",
                            entry.author.hex()[:16], len(siblings), entry.seq)

    # ------------------------------------------------------------ anti-entropy

    def _want_sync(self, peer: P, reason: SyncReason) -> list[Action]:
        """A background pull from ``peer``, coalesced with a running one
        (which then goes round once more)."""
        if not self._started:
            return []
        if peer in self._pulling:
            self._again.add(peer)
            return []
        self._pulling.add(peer)
        return [StartSync(peer, reason)]

    def pull_started(self, peer: P) -> None:
        """A pull from ``peer`` began (``StartSync`` or a direct call)."""
        self._pulling.add(peer)

    def session_starting(self, peer: P) -> None:
        """This session answers every request for a pull made so far."""
        self._again.discard(peer)

    def session_ended(self, peer: P, truncated: bool, sessions: int) -> SessionNext:
        if sessions >= self.config.max_sessions_per_sync:
            return SessionNext.DONE
        return SessionNext.AGAIN if truncated or peer in self._again else SessionNext.DONE

    def follow_up(self) -> FollowUp:
        return FollowUp(self._view, self.config)

    def pull_ended(self, now_ms: int, peer: P, outcome: PullOutcome, applied: int) -> list[Action]:
        """A pull is over. Commit what it staged; if it taught us something,
        ask every other peer for a sync: gossip does not carry old entries
        and sync is pull-only, but its responder sees that we hold more and
        pulls them back, so news spreads hop by hop and stops where nobody
        learns anything. A failed pull drops a pending "again": the next
        periodic pull retries, rather than a loop against a failing peer."""
        self._pulling.discard(peer)
        out = self.settle()
        again = peer in self._again
        self._again.discard(peer)
        if outcome is PullOutcome.COMPLETED:
            if applied:
                for other in self._peers:
                    if other != peer:
                        out.extend(self._want_sync(other, SyncReason.PROPAGATE))
            if again:
                out.extend(self._want_sync(peer, SyncReason.AGAIN))
        return out

    def served(self, now_ms: int, peer: P, peer_has_more: bool) -> list[Action]:
        """We answered ``peer``'s sync request. If it holds entries we lack,
        pull them back: at once, or when ``pull_back_interval_ms`` since the
        last pull-back from it has passed (deferred, not dropped)."""
        if not peer_has_more or not self._started or peer in self._pull_back_due:
            return []
        due = self._last_pull_back.get(peer, -math.inf) + self.config.pull_back_interval_ms
        if due <= now_ms:
            self._last_pull_back[peer] = now_ms
            return self._want_sync(peer, SyncReason.PULL_BACK)
        self._pull_back_due[peer] = int(due)
        return []

    def admit(self, peer: P) -> Admission:
        """A sync or fetch request arrived: serve it or answer busy."""
        if (self._serving.get(peer, 0) >= self.config.max_serving_per_peer
                or sum(self._serving.values()) >= self.config.max_serving):
            return Admission.BUSY
        self._serving[peer] = self._serving.get(peer, 0) + 1
        return Admission.SERVE

    def serve_ended(self, peer: P) -> None:
        left = self._serving.get(peer, 0) - 1
        if left > 0:
            self._serving[peer] = left
        else:
            self._serving.pop(peer, None)

    # ------------------------------------------------------------ fetching by id

    def _want(self, now_ms: int, entry_id: bytes, hint: P | None) -> None:
        if entry_id not in self._wanted and not self._view.has_entry(entry_id):
            self._wanted[entry_id] = _Wanted(now_ms, hint, 0)

    def _fetch_at(self) -> int | None:
        if self._fetching or not self._wanted or not self._peers:
            return None
        return next(iter(self._wanted.values())).since_ms + self.config.fetch_delay_ms

    def fetch_ended(self, now_ms: int, peer: P) -> None:
        """One ``FetchIds`` is over (whatever its outcome)."""
        self._fetching = max(0, self._fetching - 1)

    def _fetch_round(self, now_ms: int) -> list[Action]:
        """What parked entries still wait for after the grace period (it
        usually arrives by gossip meanwhile): from the peer that sent the
        waiting entry first, then from random peers."""
        at = self._fetch_at()
        if at is None or at > now_ms:
            return []
        delay, config = self.config.fetch_delay_ms, self.config
        still_missing = self._view.unchecked.missing_ids()
        peers = set(self._peers)
        drop: list[bytes] = []
        by_peer: dict[P, list[bytes]] = {}
        for entry_id, wanted in self._wanted.items():
            if wanted.since_ms + delay > now_ms:
                break  # ordered by since_ms: the rest are not due
            if (wanted.attempts >= config.fetch_tries or entry_id not in still_missing
                    or self._view.has_entry(entry_id)):
                drop.append(entry_id)
                continue
            peer = (wanted.hint if wanted.attempts == 0 and wanted.hint in peers
                    else self._peers[self._rng.randrange(len(self._peers))])
            ids = by_peer.setdefault(peer, [])
            if len(ids) < config.max_fetch_ids:  # else: the next round
                ids.append(entry_id)
        for entry_id in drop:
            del self._wanted[entry_id]
        for ids in by_peer.values():
            for entry_id in ids:
                wanted = self._wanted.pop(entry_id)
                self._wanted[entry_id] = _Wanted(now_ms, wanted.hint, wanted.attempts + 1)
        self._fetching = len(by_peer)
        return [FetchIds(peer, tuple(ids)) for peer, ids in by_peer.items()]

    # ------------------------------------------------------------ timers

    def poll(self, now_ms: int) -> list[Action]:
        """Whatever is due at ``now_ms``."""
        out: list[Action] = []
        if self._commit_at is not None and self._commit_at <= now_ms:
            self._commit_at = None
            if self.has_staged():
                out.append(Commit())
        if self._tick_at is not None and self._tick_at <= now_ms:
            self._tick_at = now_ms + self.config.tick_interval_ms
            out.append(Tick())
        for peer, due in list(self._pull_back_due.items()):
            if due <= now_ms:
                del self._pull_back_due[peer]
                self._last_pull_back[peer] = now_ms
                out.extend(self._want_sync(peer, SyncReason.PULL_BACK))
        if self._periodic_at is not None and self._periodic_at <= now_ms:
            self._periodic_at = now_ms + self._sync_gap()
            if self._peers:
                out.extend(self._want_sync(self._rng.choice(self._peers), SyncReason.PERIODIC))
        out.extend(self._fetch_round(now_ms))
        out.extend(self._announce(now_ms))
        return out

    def _sync_gap(self) -> int:
        jitter = self.config.sync_jitter
        return max(1, round(self.config.sync_interval_ms * self._rng.uniform(1 - jitter, 1 + jitter)))

    # ------------------------------------------------------------ announcing

    def _announce(self, now_ms: int) -> list[Action]:
        """Publish what commits queued, fork proofs first, as many messages
        as the token bucket allows; the rest when the next token is due."""
        if self._announce_at is None or self._announce_at > now_ms:
            return []
        config = self.config
        if self._tokens_at is not None:
            self._tokens = min(config.announce_burst,
                               self._tokens + (now_ms - self._tokens_at) * config.announce_rate / 1000)
        self._tokens_at = now_ms
        out: list[Action] = []
        while (self._messages or self._wires) and self._tokens >= 1:
            self._tokens -= 1
            out.append(self._next_message())
        if self._messages or self._wires:
            self._announce_at = now_ms + max(1, math.ceil((1 - self._tokens) * 1000 / config.announce_rate))
        else:
            self._announce_at = None
        return out

    def _next_message(self) -> Publish:
        if self._messages:
            return Publish(self._messages.popleft(), 0, True)
        batch: list[bytes] = []
        while self._wires and len(batch) < self.config.announce_batch:
            batch.append(self._wires.popleft())
        first, *rest = pack_announcements(batch)
        if not rest:
            return Publish(first, len(set(batch)), False)
        for extra in reversed(rest):  # did not fit: back to the front, in order
            self._wires.extendleft(reversed(decode_announcement(extra)))
        return Publish(first, len(decode_announcement(first)), False)

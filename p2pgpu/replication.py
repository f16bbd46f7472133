"""Ledger replication between nodes: the trio/libp2p edge of ``p2pgpu.core.sync``.

Theory of operation
-------------------
``LedgerReplicator`` joins one ``Ledger`` to one ``P2PHost``. Everything it
does with the ledger runs on the trio thread (the ledger is not thread-safe);
only Ed25519 verification goes to worker threads (libsodium releases the GIL).

Entries arrive four ways and leave one way:

============  ==============================================  ==================
source        path                                             announced after
                                                               its commit?
============  ==============================================  ==================
local         ``append(fn)``: our own key signs                always
offered       ``offer(wires)``: handed to us outside the        always
              network (e.g. a hold embedded in a job request)
gossip        the ledger topic; the topic validator checked    no: gossipsub already
              shape, network and signatures before delivery    forwarded the message
sync / fetch  anti-entropy sessions we start                   if fresh (stamped
                                                               within
                                                               ``fresh_window_ms``)
============  ==============================================  ==================

and, from any source, a **fork proof** (the entries that share one (author,
seq), as one announcement sorted by id) as soon as the fork is detected.
Nothing is announced, and ``on_applied`` does not hear of it, before the
commit that made it durable: the *acknowledgement point* of docs/ledger.md §6.
Commits are grouped: gossip applies are committed every ``commit_interval_s``
or every 256 entries, whichever comes first; local appends and offers commit
at once; sync sessions every 2048 entries and at their end. A commit
acknowledges whatever was staged, whichever task staged it.

Why gossip-delivered entries are not re-announced: the gossip layer has
already forwarded that very message to our mesh, so re-publishing would
either be dropped as a duplicate (same bytes, same content-hash id) or send
every entry around a second time under another packing. Entries learned by
sync are re-announced while fresh so that a healed partition converges at
gossip speed rather than at the next periodic sync of every node.

Anti-entropy is pull-only: a node asks for what it lacks and applies only
answers to its own questions. Each node pulls from every newly connected peer
and from a random peer every ``sync_interval_s``; a responder that sees in the
request that the requester holds entries it lacks pulls them back at once, so
one session reconciles both directions. A pull is a pipeline of three tasks:
the reader decodes frames, a verifier task checks chunk k+1's signatures in
worker threads while the applier applies chunk k on the trio thread.

Entries that wait for something we lack (``ApplyResult.missing``) are
fetched by id, from the session's peer right after a sync, and after a short
grace period (it usually arrives by gossip anyway) from the gossip origin or
a random peer otherwise.

Misbehaviour: any frame that does not decode, any limit passed, any invalid
entry in a session ends the session with a typed error and a stream reset;
valid entries already applied stay (they are valid whoever sent them), and
invalid ones never touch the ledger.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import trio

from p2pgpu.core.ledger import ApplyResult, Entry, Ledger, decode_entry, signature_items
from p2pgpu.core.protocols import LEDGER_SYNC_PROTOCOL, ledger_topic, network_tag
from p2pgpu.core.sync import (
    ERR_BAD_REQUEST,
    ERR_BUSY,
    MAX_FETCH_IDS,
    End,
    Entries,
    EntryStream,
    Fetch,
    FetchRequest,
    LocalHead,
    Refusal,
    SyncError,
    SyncLimits,
    SyncRefused,
    SyncRequester,
    SyncResponder,
    SyncTimeout,
    UnexpectedMessage,
    decode_announcement,
    encode_message,
    entry_frames,
    fork_proof,
    local_summary,
    order_wires,
    pack_announcements,
    plan,
    summary_frames,
)
from p2pgpu.errors import BadSignature, ConfigError, MalformedInput, P2PGPUError, PeerMisbehaved, Truncated
from p2pgpu.net import FrameStream, GossipMessage, P2PHost, PublishRejected
from p2pgpu.verify import ThreadedVerifier

__all__ = ["LedgerReplicator", "SyncStats"]

logger = logging.getLogger(__name__)

LOCAL, OFFERED, GOSSIP, SYNC, TICK = "local", "offered", "gossip", "sync", "tick"
_COUNTED_AS = {LOCAL: "applied_local", OFFERED: "applied_offered", GOSSIP: "applied_gossip",
               SYNC: "applied_sync", TICK: "applied_tick"}

GOSSIP_COMMIT_ENTRIES = 256
INLINE_VERIFY_MAX = 4  # signatures checked on the trio thread (~70 us each) rather than in the pool
"""Commit gossip applies at once when this many are staged (else on the timer)."""
SYNC_COMMIT_ENTRIES = 2048
"""A catch-up commits every this many entries: one synced write per ~4 frames."""
MAX_FOLLOW_UP_ROUNDS = 32
"""Fetch rounds after a sync, each one step back along a divergent branch."""
MAX_SESSIONS_PER_SYNC = 64
"""``sync_with`` repeats a truncated session at most this often."""
_VALIDATED_CACHE = 512
_ANNOUNCE_BACKLOG = 100_000


@dataclass(frozen=True, slots=True)
class SyncStats:
    """What one ``sync_with`` (or ``fetch_from``) did.

    ``received`` counts wires that arrived; ``applied`` the entries that took
    effect (including parked entries they unblocked); ``rejected`` invalid
    ones (nonzero only when the session then failed); ``sessions`` the
    request/response exchanges, follow-up fetches included.
    """

    peer_id: str
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    waiting: int = 0
    rejected: int = 0
    fetched: int = 0
    sessions: int = 0
    truncated: bool = False
    seconds: float = 0.0

    @property
    def entries_per_s(self) -> float:
        return self.applied / self.seconds if self.seconds > 0 else 0.0


class _Tally:
    """Mutable counts of one session, frozen into ``SyncStats`` at the end."""

    def __init__(self) -> None:
        self.received = self.applied = self.duplicates = self.waiting = self.rejected = 0
        self.fetched = self.sessions = 0
        self.truncated = False
        self.missing: set[bytes] = set()


class _TokenBucket:
    """Our own publish pacing, kept under the receivers' per-origin limit
    (``GossipConfig.rate_per_second``, 10/s with a burst of 50 by default):
    a message they drop for rate costs everyone a later sync instead."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.last = burst, trio.current_time()

    async def take(self) -> None:
        while True:
            now = trio.current_time()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await trio.sleep((1 - self.tokens) / self.rate)


@asynccontextmanager
async def _single_errors() -> AsyncIterator[None]:
    """Nurseries wrap errors in groups; callers of ``sync_with`` should be
    able to write ``except SyncError``. A group of one is unwrapped."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        non_cancel = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        if len(non_cancel) == 1:
            raise non_cancel[0] from None
        raise


@contextmanager
def _deadline(seconds: float, what: str) -> Iterator[None]:
    """``trio.fail_after`` that raises our typed ``SyncTimeout``."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise SyncTimeout(f"{what} took longer than {seconds} s") from None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


class LedgerReplicator:
    """Keeps ``ledger`` in step with the peers of ``host`` (DESIGN §5).

    ``run()`` does the background work (gossip, serving sync, periodic and
    on-connect sync, fetching missing entries, ``ledger.tick``); the other
    methods also work without it (a tool or a benchmark can ``sync_with``
    a peer and stop). Call ``close()`` once done (``run()`` does it on exit)
    to stop the verifier threads.

    ``now_ms`` is the clock (milliseconds since the epoch): the ledger never
    reads one, and tests pass their own.
    """

    def __init__(
        self,
        host: P2PHost,
        ledger: Ledger,
        *,
        network_id: bytes,
        now_ms: Callable[[], int],
        sync_interval_s: float = 10.0,
        commit_interval_s: float = 0.02,
        on_applied: Callable[[list[Entry]], None] | None = None,
        limits: SyncLimits = SyncLimits(),
        verify_threads: int = 2,
        fresh_window_ms: int = 120_000,
        announce_rate: float = 8.0,
        announce_burst: float = 16.0,
        announce_delay_s: float = 0.05,
        frame_timeout_s: float = 30.0,
        session_timeout_s: float = 600.0,
        max_serving: int = 8,
        peer_poll_s: float = 0.25,
        fetch_delay_s: float = 0.5,
        tick_interval_s: float = 1.0,
    ) -> None:
        if network_id != ledger.network_id:
            raise ConfigError("the replicator's network id is not its ledger's")
        self.host = host
        self.ledger = ledger
        self.network_id = network_id
        self.topic = ledger_topic(network_tag(network_id))
        self.now_ms = now_ms
        self.sync_interval_s = sync_interval_s
        self.commit_interval_s = commit_interval_s
        self.on_applied = on_applied
        self.limits = limits
        self.fresh_window_ms = fresh_window_ms
        self.frame_timeout_s = frame_timeout_s
        self.session_timeout_s = session_timeout_s
        self.max_serving = max_serving
        self.peer_poll_s = peer_poll_s
        self.fetch_delay_s = fetch_delay_s
        self.tick_interval_s = tick_interval_s
        self._verifier = ThreadedVerifier(threads=verify_threads)
        self._announce_rate, self._announce_burst = announce_rate, announce_burst
        self.announce_delay_s = announce_delay_s
        # entries applied but not yet committed, with where they came from
        self._unacked: list[tuple[Entry, str]] = []
        self._proofs: list[bytes] = []  # fork proofs waiting for the commit
        self._announce_wires: deque[bytes] = deque(maxlen=_ANNOUNCE_BACKLOG)
        self._announce_messages: deque[bytes] = deque(maxlen=1024)
        self._announce_wakeup = trio.Event()
        self._commit_due = trio.Event()
        self._validated: OrderedDict[bytes, list[Entry]] = OrderedDict()
        self._wanted: dict[bytes, tuple[float, str | None, int]] = {}  # id -> (since, hint peer, attempts)
        self._pull_locks: dict[str, trio.Lock] = {}
        self._serving: dict[str, int] = {}
        self._last_pull_back: dict[str, float] = {}
        self._pull_back_pending: set[str] = set()
        self._again: set[str] = set()  # peers to pull from once more when the running pull ends
        self._forked_authors: set[bytes] = set()
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._counters = dict.fromkeys(
            ("announced_entries", "announcements", "fork_proofs_announced", "applied_local",
             "applied_offered", "applied_gossip", "applied_sync", "applied_tick", "rejected",
             "gossip_messages", "gossip_rejected", "sync_sessions", "sync_failed", "sync_served",
             "fetch_served", "serve_failed", "fetched"), 0)

    # ------------------------------------------------------------ status

    def stats(self) -> dict[str, int]:
        """Counters for ``p2pgpu status``: entries announced, applied by
        source, rejected, sessions, and ``forks_seen`` (authors found forked)."""
        out = dict(self._counters)
        out["forks_seen"] = len(self._forked_authors)
        out["unchecked"] = len(self.ledger.unchecked)
        return out

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Replicate until cancelled. Started (``task_status.started()``) once
        subscribed and serving, so a test can connect peers right after."""
        self.host.set_topic_validator(self.topic, self._validate)
        subscription = await self.host.subscribe(self.topic)
        self.serve_requests()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_gossip, subscription)
                nursery.start_soon(self._committer)
                nursery.start_soon(self._announcer)
                nursery.start_soon(self._watch_peers)
                nursery.start_soon(self._periodic_sync)
                nursery.start_soon(self._fetcher)
                nursery.start_soon(self._ticker)
                task_status.started()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                try:
                    self.host.remove_stream_handler(LEDGER_SYNC_PROTOCOL)
                    self.host.set_topic_validator(self.topic, None)
                except Exception:  # noqa: BLE001 - the host may already be closed
                    pass
                try:
                    await subscription.aclose()
                except Exception:  # noqa: BLE001
                    pass
                if self._unacked or self.ledger.uncommitted:
                    self._commit()
            self.close()

    def serve_requests(self) -> None:
        """Answer peers' sync and fetch requests (``run`` does this; a node
        that only serves, such as a benchmark's, can call it alone)."""
        self.host.set_stream_handler(LEDGER_SYNC_PROTOCOL, self._serve)

    def close(self) -> None:
        """Stop the verifier threads. Idempotent."""
        if not self._closed:
            self._closed = True
            self._verifier.close()

    # ------------------------------------------------------------ acknowledgement

    def _track(self, result: ApplyResult, source: str, hint: str | None = None) -> None:
        """Remember what an offer did until the commit acknowledges it."""
        if result.status == "applied":
            for entry in result.applied:
                self._unacked.append((entry, source))
            if result.forks:
                self._on_forks(result)
        elif result.status == "waiting" and result.missing is not None:
            if not self.ledger.has_entry(result.missing) and result.missing not in self._wanted:
                self._wanted[result.missing] = (trio.current_time(), hint, 0)

    def _on_forks(self, result: ApplyResult) -> None:
        """Queue a fork proof for every entry that forked its author's chain."""
        forked = set(result.forks)
        self._forked_authors.update(forked)
        for entry in result.applied:
            if entry.author not in forked:
                continue
            siblings = []
            for wire in self.ledger.chain(entry.author, entry.seq, 64):
                other = decode_entry(wire, self.network_id, verify=False)
                if other.seq != entry.seq:
                    break
                siblings.append((other.id, wire))
            if len(siblings) > 1:
                self._proofs.append(fork_proof(siblings))
                logger.info("fork: %s has %d entries at seq %d; announcing the proof",
                            entry.author.hex()[:16], len(siblings), entry.seq)

    def _commit(self) -> None:
        """Commit everything staged, then acknowledge it: count, announce,
        tell ``on_applied``. Synchronous, so no other task runs in between."""
        self.ledger.commit()
        acked, self._unacked = self._unacked, []
        proofs, self._proofs = self._proofs, []
        if not acked and not proofs:
            return
        now = self.now_ms()
        fresh_after = now - self.fresh_window_ms
        for entry, source in acked:
            self._counters[_COUNTED_AS[source]] += 1
            if source in (LOCAL, OFFERED) or (source in (SYNC, TICK) and entry.timestamp_ms >= fresh_after):
                self._announce_wires.append(entry.wire)
        self._announce_messages.extend(proofs)
        if self._announce_wires or self._announce_messages:
            self._announce_wakeup.set()
        if acked and self.on_applied is not None:
            try:
                self.on_applied([entry for entry, _ in acked])
            except Exception:  # noqa: BLE001 - a listener must not stop replication
                logger.warning("on_applied raised", exc_info=True)

    async def _committer(self) -> None:
        """Group commit for gossip: at most ``commit_interval_s`` after the
        first staged entry."""
        while True:
            await self._commit_due.wait()
            await trio.sleep(self.commit_interval_s)
            self._commit_due = trio.Event()
            if self._unacked or self._proofs or self.ledger.uncommitted:
                self._commit()

    def _commit_soon(self) -> None:
        if self.ledger.uncommitted >= GOSSIP_COMMIT_ENTRIES:
            self._commit()
        elif self._unacked or self._proofs or self.ledger.uncommitted:
            self._commit_due.set()

    # ------------------------------------------------------------ local entries

    async def append(self, fn: Callable[[Ledger], Entry | list[Entry]]) -> list[Entry]:
        """Run a local append (``lambda ledger: ledger.send(key, to, 5, now)``),
        commit it durably, announce it, and return the acknowledged entries.

        The ledger's typed errors (``InsufficientFunds``, ``LedgerRuleViolation``,
        ``MalformedInput``) propagate unchanged; a refused append changed
        nothing. ``fn`` runs on the trio thread and must not await.
        """
        await trio.lowlevel.checkpoint()
        made = fn(self.ledger)
        entries = [made] if isinstance(made, Entry) else list(made)
        self._unacked.extend((entry, LOCAL) for entry in entries)
        self._commit()
        return entries

    async def offer(self, wires: Iterable[bytes], *, durable: bool = True) -> list[ApplyResult | P2PGPUError]:
        """Apply entries handed to us outside the network (a hold embedded in
        a job request, a wallet import), commit, and announce what was new.
        Returns per wire its ``ApplyResult`` or the error that refused it.

        ``durable=False`` returns before the commit, leaving it to the next
        group commit (``commit_interval_s``), as gossip applies do: for a
        peer's entry that we only need to know about (a job's hold, which
        the consumer has made durable and anyone can fetch again) a fsync on
        the path to the job's first token buys nothing."""
        decoded = self.ledger.decode_batch(list(wires))
        # An entry whose id we hold is a duplicate whatever its signature
        # says (the ledger changes nothing for it), so only the others need
        # their signatures checked.
        new = [d for d in decoded if isinstance(d, Entry) and not self.ledger.has_entry(d.id)]
        checked = dict(zip(map(id, new), await self._verify(signature_items(new))))
        verdicts = [checked.get(id(d), True) for d in decoded if isinstance(d, Entry)]
        results = self.ledger.apply_checked(decoded, verdicts, self.now_ms())
        for result in results:
            if isinstance(result, ApplyResult):
                self._track(result, OFFERED)
            else:
                self._counters["rejected"] += 1
        if durable:
            self._commit()
        else:
            self._commit_soon()
        return results

    async def _verify(self, items: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
        if not items:
            return []
        if len(items) <= INLINE_VERIFY_MAX:  # a thread hop costs more than a few checks
            return self._verifier(items)  # type: ignore[arg-type]
        pending = self._verifier.submit(items)
        return await trio.to_thread.run_sync(pending.result)

    # ------------------------------------------------------------ gossip

    def _check_announcement(self, data: bytes) -> list[Entry]:
        """Envelope, every entry's shape and network, and the signature of
        every entry we do not hold yet. Raises the first typed error."""
        wires = decode_announcement(data)
        entries = [decode_entry(wire, self.network_id, verify=False) for wire in wires]
        unknown = [e for e in entries if not self.ledger.has_entry(e.id)]
        if unknown:
            verdicts = self._verifier(signature_items(unknown))  # type: ignore[arg-type]
            if not all(verdicts):
                raise BadSignature("an announced entry's signature does not verify")
        return entries

    def _validate(self, origin: str, data: bytes) -> bool:
        """Topic validator: runs before delivery *and* forwarding, so what it
        refuses stops here. Entries that merely wait for a predecessor pass:
        they are well-formed and signed by their author; rule checks need
        state and happen on delivery."""
        try:
            entries = self._check_announcement(data)
        except P2PGPUError as exc:
            self._counters["gossip_rejected"] += 1
            logger.debug("refused an announcement from %s: %s: %s", origin, type(exc).__name__, exc)
            return False
        if origin != self.host.peer_id:
            self._validated[data] = entries
            while len(self._validated) > _VALIDATED_CACHE:
                self._validated.popitem(last=False)
        return True

    async def _receive_gossip(self, subscription: Any) -> None:
        async for message in subscription:
            self._on_gossip(message)
            await trio.lowlevel.checkpoint()

    def _on_gossip(self, message: GossipMessage) -> None:
        if message.from_peer_id == self.host.peer_id:
            return  # our own announcement, delivered back to us
        self._counters["gossip_messages"] += 1
        entries = self._validated.pop(message.data, None)
        if entries is None:  # evicted from the cache: check again
            try:
                entries = self._check_announcement(message.data)
            except P2PGPUError:
                self._counters["gossip_rejected"] += 1
                return
        now = self.now_ms()
        for entry in entries:
            try:
                result = self.ledger.offer_entry(entry, now, verified=True)
            except P2PGPUError as exc:
                self._counters["rejected"] += 1
                logger.debug("gossiped entry %r refused: %s", entry, exc)
                continue
            self._track(result, GOSSIP, hint=message.from_peer_id)
        self._commit_soon()

    async def _announcer(self) -> None:
        """Publish what commits queued, paced by a token bucket; whatever
        queued up meanwhile leaves packed into as few messages as fit."""
        bucket = _TokenBucket(self._announce_rate, self._announce_burst)
        while True:
            await self._announce_wakeup.wait()
            # Linger a moment: what commits next rides along, and the entry
            # that woke us (a job's HOLD) reaches its provider inside the job
            # request first, so the provider's loop is not busy checking the
            # announcement while it decides on the job.
            await trio.sleep(self.announce_delay_s)
            self._announce_wakeup = trio.Event()
            while self._announce_messages or self._announce_wires:
                await bucket.take()
                if self._announce_messages:
                    data, entries, proof = self._announce_messages.popleft(), 0, True
                else:
                    batch: list[bytes] = []
                    while self._announce_wires and len(batch) < 64:
                        batch.append(self._announce_wires.popleft())
                    first, *rest = pack_announcements(batch)
                    for extra in reversed(rest):  # did not fit: back to the front
                        self._announce_wires.extendleft(reversed(decode_announcement(extra)))
                    data, entries, proof = first, len(decode_announcement(first)), False
                try:
                    await self.host.publish(self.topic, data)
                except (PublishRejected, MalformedInput) as exc:
                    logger.warning("could not announce ledger entries: %s", exc)
                    continue
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                self._counters["announcements"] += 1
                self._counters["announced_entries"] += entries
                if proof:
                    self._counters["fork_proofs_announced"] += 1

    # ------------------------------------------------------------ anti-entropy: requester

    def _lock_for(self, peer_id: str) -> trio.Lock:
        lock = self._pull_locks.get(peer_id)
        if lock is None:
            lock = self._pull_locks[peer_id] = trio.Lock()
        return lock

    async def sync_with(self, peer_id: str) -> SyncStats:
        """Pull everything ``peer_id`` has that we lack, verify and apply it.

        Repeats while the responder truncates at its session limit (or while
        something asked for another pull from this peer meanwhile), then
        fetches by id whatever the new entries still wait for. Waits for an
        ongoing session with the same peer first (one at a time per peer).
        If entries arrived, every other peer is asked to sync with us next
        (``_propagate``). Raises ``SyncError``/``MalformedInput`` (and resets
        the stream) when the peer misbehaves, ``SyncRefused`` when it
        declines, and the host's ``PeerUnreachable``/``ProtocolNotSupported``/
        ``StreamAborted``.
        """
        started = time.perf_counter()
        tally = _Tally()
        async with self._lock_for(peer_id):
            try:
                for _ in range(MAX_SESSIONS_PER_SYNC):
                    self._again.discard(peer_id)
                    truncated = await self._pull(peer_id, tally)
                    if not truncated and peer_id not in self._again:
                        break
                await self._follow_up(peer_id, tally)
            except Exception:
                self._counters["sync_failed"] += 1
                raise
            finally:
                if self._unacked or self.ledger.uncommitted:
                    self._commit()
        self._counters["sync_sessions"] += 1
        if tally.applied:
            self._propagate(peer_id)
        return self._stats(peer_id, tally, started)

    async def fetch_from(self, peer_id: str, ids: Iterable[bytes], *, follow_up: bool = False) -> SyncStats:
        """Fetch specific entries by id (at most 1024 per request; more are
        split) and apply them. ``follow_up``: then fetch from the same peer
        what those entries wait for, a few rounds deep (for a peer that is
        the author of the chain we lack a piece of)."""
        started = time.perf_counter()
        tally = _Tally()
        wanted = list(dict.fromkeys(ids))
        try:
            for start in range(0, len(wanted), MAX_FETCH_IDS):
                await self._fetch(peer_id, wanted[start : start + MAX_FETCH_IDS], tally)
            if follow_up:
                await self._follow_up(peer_id, tally)
        finally:
            if self._unacked or self.ledger.uncommitted:
                self._commit()
        return self._stats(peer_id, tally, started)

    def _stats(self, peer_id: str, tally: _Tally, started: float) -> SyncStats:
        return SyncStats(peer_id, tally.received, tally.applied, tally.duplicates, tally.waiting,
                         tally.rejected, tally.fetched, tally.sessions, tally.truncated,
                         time.perf_counter() - started)

    async def _pull(self, peer_id: str, tally: _Tally) -> bool:
        """One sync session. Returns whether the responder truncated it."""
        summary: dict[bytes, LocalHead] = local_summary(self.ledger)
        stream = await self.host.open_stream(peer_id, LEDGER_SYNC_PROTOCOL)
        async with stream:
            with _deadline(self.session_timeout_s, "a sync session"):
                for frame in summary_frames(summary):
                    await stream.send_frame(frame)
                end = await self._receive_entries(stream, SyncRequester(self.limits), tally, None)
        tally.sessions += 1
        tally.truncated = end.truncated
        return end.truncated

    async def _fetch(self, peer_id: str, ids: list[bytes], tally: _Tally) -> None:
        stream = await self.host.open_stream(peer_id, LEDGER_SYNC_PROTOCOL)
        async with stream:
            with _deadline(self.session_timeout_s, "a fetch session"):
                await stream.send_frame(encode_message(Fetch(tuple(ids))))
                before = tally.received
                await self._receive_entries(stream, SyncRequester(self.limits, max_entries=len(ids)),
                                            tally, set(ids))
        tally.sessions += 1
        tally.fetched += tally.received - before
        self._counters["fetched"] += tally.received - before

    async def _follow_up(self, peer_id: str, tally: _Tally) -> None:
        """Fetch what this session's entries wait for from the same peer,
        which has applied them and so holds what they name."""
        asked: set[bytes] = set()
        for _ in range(MAX_FOLLOW_UP_ROUNDS):
            missing = [m for m in tally.missing if m not in asked and not self.ledger.has_entry(m)]
            tally.missing.clear()
            if not missing:
                return
            asked.update(missing)
            for start in range(0, len(missing), MAX_FETCH_IDS):
                await self._fetch(peer_id, missing[start : start + MAX_FETCH_IDS], tally)

    async def _receive_entries(self, stream: FrameStream, requester: SyncRequester, tally: _Tally,
                               expected_ids: set[bytes] | None) -> End:
        """Read ENTRIES frames to the END through a three-stage pipeline:
        reader (decode, trio thread) -> verifier (worker threads) -> applier
        (rules and commits, trio thread). Each stage holds at most two chunks,
        so memory stays bounded however much the peer sends."""
        decoded_send, decoded_recv = trio.open_memory_channel[tuple[list, list]](2)
        verified_send, verified_recv = trio.open_memory_channel[tuple[list, list[bool]]](1)
        end: list[End] = []

        async def reader() -> None:
            async with decoded_send:
                while True:
                    with _deadline(self.frame_timeout_s, "waiting for the responder's next frame"):
                        data = await stream.receive_frame()
                    if data is None:
                        raise Truncated("the responder closed the stream before END")
                    message = requester.receive(data)
                    if isinstance(message, End):
                        end.append(message)
                        return
                    assert isinstance(message, Entries)
                    tally.received += len(message.wires)
                    decoded = self.ledger.decode_batch(list(message.wires))
                    if expected_ids is not None:
                        for item in decoded:
                            if isinstance(item, Entry) and item.id not in expected_ids:
                                raise UnexpectedMessage("the responder sent an entry we did not ask for")
                    items = signature_items(decoded)
                    await decoded_send.send((decoded, items))

        async def verifier() -> None:
            async with decoded_recv, verified_send:
                async for decoded, items in decoded_recv:
                    verdicts = await self._verify(items)
                    await verified_send.send((decoded, verdicts))

        async with _single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                nursery.start_soon(verifier)
                async with verified_recv:
                    async for decoded, verdicts in verified_recv:
                        self._apply_chunk(decoded, verdicts, tally, stream.remote_peer_id)
        if not end:  # pragma: no cover - the reader either found END or raised
            raise Truncated("session ended without END")
        return end[0]

    def _apply_chunk(self, decoded: list, verdicts: list[bool], tally: _Tally, peer_id: str) -> None:
        results = self.ledger.apply_checked(decoded, verdicts, self.now_ms())
        bad: P2PGPUError | None = None
        for result in results:
            if isinstance(result, P2PGPUError):
                tally.rejected += 1
                self._counters["rejected"] += 1
                bad = bad or result
                continue
            self._track(result, SYNC, hint=peer_id)
            if result.status == "applied":
                tally.applied += len(result.applied)
            elif result.status == "duplicate":
                tally.duplicates += 1
            else:
                tally.waiting += 1
                if result.missing is not None:
                    tally.missing.add(result.missing)
        if self.ledger.uncommitted >= SYNC_COMMIT_ENTRIES:
            self._commit()
        if bad is not None:
            # An honest responder only sends entries it applied, and validity
            # is the same on every replica: this peer is lying.
            raise SyncError(f"peer sent an invalid entry: {type(bad).__name__}: {bad}")

    # ------------------------------------------------------------ anti-entropy: responder

    async def _serve(self, stream: FrameStream) -> None:
        """Stream handler for ``LEDGER_SYNC_PROTOCOL``: one request, one answer.
        Errors propagate to the host's wrapper, which resets the stream."""
        peer = stream.remote_peer_id
        # Two per peer: its sync and its fetcher may ask at the same time.
        if self._serving.get(peer, 0) >= 2 or sum(self._serving.values()) >= self.max_serving:
            await stream.send_frame(encode_message(Refusal(ERR_BUSY, "try again later")))
            return
        self._serving[peer] = self._serving.get(peer, 0) + 1
        try:
            with _deadline(self.session_timeout_s, "serving a sync session"):
                await self._answer(stream, peer)
        except (MalformedInput, SyncError) as exc:
            self._counters["serve_failed"] += 1
            with trio.move_on_after(1):
                try:
                    await stream.send_frame(encode_message(Refusal(ERR_BAD_REQUEST, str(exc))))
                except P2PGPUError:
                    pass
            raise
        except BaseException:
            self._counters["serve_failed"] += 1
            raise
        finally:
            self._serving[peer] -= 1
            if not self._serving[peer]:
                del self._serving[peer]

    async def _answer(self, stream: FrameStream, peer: str) -> None:
        responder = SyncResponder(self.limits)
        request = None
        while request is None:
            with _deadline(self.frame_timeout_s, "waiting for the request"):
                data = await stream.receive_frame()
            if data is None:
                raise Truncated("the requester closed the stream before its request was complete")
            request = responder.receive(data)
        if isinstance(request, FetchRequest):
            wires = order_wires(w for w in map(self.ledger.get_wire, request.ids) if w is not None)
            for frame in entry_frames(wires):
                await stream.send_frame(frame)
            await stream.send_frame(encode_message(End(len(wires), False)))
            self._counters["fetch_served"] += 1
            return
        local = local_summary(self.ledger)
        decided = plan(self.ledger, local, request.summary)
        entries = EntryStream(self.ledger, decided.ranges, self.limits.max_session_entries)
        for frame in entry_frames(entries):
            await stream.send_frame(frame)
        await stream.send_frame(encode_message(End(entries.sent, entries.truncated)))
        self._counters["sync_served"] += 1
        if decided.peer_has_more:
            self._pull_back(peer)

    def _pull_back(self, peer: str) -> None:
        """The requester holds entries we lack: pull them now. At most one
        such pull per peer per second (a summary that lies about having more
        cannot make us loop); one asked for sooner is deferred, not dropped."""
        if self._nursery is None or peer in self._pull_back_pending:
            return
        wait = self._last_pull_back.get(peer, -math.inf) + 1.0 - trio.current_time()
        self._pull_back_pending.add(peer)
        self._nursery.start_soon(self._pull_back_after, peer, max(0.0, wait))

    async def _pull_back_after(self, peer: str, delay: float) -> None:
        await trio.sleep(delay)
        self._pull_back_pending.discard(peer)
        self._last_pull_back[peer] = trio.current_time()
        self._want_sync(peer)

    def _propagate(self, source: str) -> None:
        """We just learned entries by sync. Gossip will not carry old ones
        (only fresh ones are re-announced), and pull-only sync means we
        cannot push; so ask every other peer for a sync: its responder side
        sees that we hold more and pulls back. Each node pulls the news once
        and passes the question on, so it spreads hop by hop and stops where
        nobody learns anything new."""
        for peer in self.host.peers():
            if peer != source:
                self._want_sync(peer)

    def _want_sync(self, peer: str) -> None:
        """Schedule a background pull from ``peer``, coalesced with any
        running one (which then goes round once more)."""
        if self._nursery is None:
            return
        if self._lock_for(peer).locked():
            self._again.add(peer)
            return
        self._nursery.start_soon(self._sync_quietly, peer)

    # ------------------------------------------------------------ background

    async def _sync_quietly(self, peer_id: str) -> None:
        """A background sync: failures are logged and counted, never raised."""
        if self._lock_for(peer_id).locked():
            self._again.add(peer_id)  # the running one goes round once more
            return
        try:
            stats = await self.sync_with(peer_id)
        except SyncRefused as exc:
            logger.debug("sync with %s declined: %s", peer_id, exc)
        except PeerMisbehaved as exc:
            logger.info("sync with %s failed: %s: %s", peer_id, type(exc).__name__, exc)
        except P2PGPUError as exc:
            logger.info("sync with %s failed: %s: %s", peer_id, type(exc).__name__, exc)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            logger.info("sync with %s failed: %r", peer_id, exc)
        else:
            if stats.applied:
                logger.info("synced %d entries from %s in %.2f s", stats.applied, peer_id, stats.seconds)

    async def _watch_peers(self) -> None:
        """Sync with every peer as it connects (the host offers no hook, so poll)."""
        assert self._nursery is not None
        known: set[str] = set()
        while True:
            current = set(self.host.peers())
            for peer in sorted(current - known):
                self._want_sync(peer)
            known = current
            await trio.sleep(self.peer_poll_s)

    async def _periodic_sync(self) -> None:
        assert self._nursery is not None
        while True:
            await trio.sleep(self.sync_interval_s * random.uniform(0.8, 1.2))
            peers = self.host.peers()
            if peers:
                self._want_sync(random.choice(peers))

    async def _ticker(self) -> None:
        """Entries stamped ahead of our clock wait in the ledger until ``tick``."""
        while True:
            await trio.sleep(self.tick_interval_s)
            applied = self.ledger.tick(self.now_ms())
            if applied:
                self._unacked.extend((entry, TICK) for entry in applied)
                self._commit_soon()

    async def _fetcher(self) -> None:
        """Fetch by id what gossiped entries still wait for after a grace
        period (the missing entry usually arrives by gossip meanwhile): from
        the gossip origin if connected, else from a random peer; three tries."""
        while True:
            await trio.sleep(max(0.05, self.fetch_delay_s / 2))
            if not self._wanted:
                continue
            now = trio.current_time()
            still_missing = self.ledger.unchecked.missing_ids()
            peers = self.host.peers()
            by_peer: dict[str, list[bytes]] = {}
            for entry_id, (since, hint, attempts) in list(self._wanted.items()):
                if self.ledger.has_entry(entry_id) or entry_id not in still_missing or attempts >= 3:
                    del self._wanted[entry_id]
                    continue
                if not peers or now - since < self.fetch_delay_s:
                    continue
                peer = hint if hint in peers and attempts == 0 else random.choice(peers)
                self._wanted[entry_id] = (now, hint, attempts + 1)
                by_peer.setdefault(peer, []).append(entry_id)
            for peer, ids in by_peer.items():
                try:
                    stats = await self.fetch_from(peer, ids[: self.limits.max_fetch_ids])
                except (P2PGPUError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                    logger.debug("fetch from %s failed: %r", peer, exc)
                    continue
                logger.debug("fetched %d of %d wanted entries from %s", stats.received, len(ids), peer)

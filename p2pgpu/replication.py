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

Who decides: every choice above (when to commit, what to announce, when and
how fast, when to pull from whom, what to fetch, what a fork proof becomes,
whom to serve) is made by ``p2pgpu.core.replication_policy.ReplicationPolicy``,
a sans-IO state machine that a simulator can drive without trio or libp2p.
This module feeds it events (applies, commits, peers, the ends of sessions),
sleeps until its ``next_deadline()``, and carries out its actions; what is
left here is moving bytes: the session pipeline, the gossip validator, the
publisher, and the translation of library errors.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import trio

from p2pgpu.core.ledger import ApplyResult, Entry, Ledger, decode_entry, signature_items
from p2pgpu.core.protocols import LEDGER_SYNC_PROTOCOL, ledger_topic, network_tag
from p2pgpu.core.replication_policy import (
    Acknowledge,
    Action,
    Admission,
    Commit,
    FetchIds,
    PullOutcome,
    ReplicationConfig,
    ReplicationPolicy,
    SessionNext,
    Source,
    StartSync,
    SyncReason,
    Tick,
    Publish,
    fetch_batches,
)
from p2pgpu.core.sync import (
    ERR_BAD_REQUEST,
    ERR_BUSY,
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
    local_summary,
    order_wires,
    plan,
    summary_frames,
)
from p2pgpu.errors import BadSignature, ConfigError, MalformedInput, P2PGPUError, Truncated
from p2pgpu.net import FrameStream, GossipMessage, P2PHost, PublishRejected
from p2pgpu.net.peerlog import Trouble, refine
from p2pgpu.verify import ThreadedVerifier

__all__ = ["LedgerReplicator", "SyncStats"]

logger = logging.getLogger(__name__)

refine(SyncTimeout, Trouble.TIMEOUT)

_COUNTED_AS = {Source.LOCAL: "applied_local", Source.OFFERED: "applied_offered", Source.GOSSIP: "applied_gossip",
               Source.SYNC: "applied_sync", Source.TICK: "applied_tick"}

INLINE_VERIFY_MAX = 4  # signatures checked on the trio thread (~70 us each) rather than in the pool
_VALIDATED_CACHE = 512


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


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
        self.missing: dict[bytes, None] = {}  # ordered: a simulator replays the same fetches


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
        self.announce_delay_s = announce_delay_s
        self.config = ReplicationConfig(
            sync_interval_ms=_ms(sync_interval_s), commit_interval_ms=_ms(commit_interval_s),
            fresh_window_ms=fresh_window_ms, announce_linger_ms=round(announce_delay_s * 1000),
            announce_rate=announce_rate, announce_burst=announce_burst,
            fetch_delay_ms=round(fetch_delay_s * 1000), max_fetch_ids=limits.max_fetch_ids,
            tick_interval_ms=_ms(tick_interval_s), max_serving=max_serving)
        self._policy: ReplicationPolicy[str] = ReplicationPolicy(ledger, self.config)
        self._verifier = ThreadedVerifier(threads=verify_threads)
        self._validated: OrderedDict[bytes, list[Entry]] = OrderedDict()
        self._pull_locks: dict[str, trio.Lock] = {}
        self._outbox: deque[Publish] = deque()  # announcements the policy released, for the publisher
        self._outbox_ready = trio.Event()
        self._wake = trio.Event()  # the policy's next deadline moved earlier than the driver's sleep
        self._sleeping_until = math.inf
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
        out["forks_seen"] = len(self._policy.forked_authors)
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
                self._policy.start(self._clock())
                nursery.start_soon(self._receive_gossip, subscription)
                nursery.start_soon(self._publisher)
                nursery.start_soon(self._drive)
                task_status.started()
        finally:
            self._nursery = None
            self._policy.stop()
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
                self._execute(self._policy.settle())
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

    # ------------------------------------------------------------ driving the policy

    def _clock(self) -> int:
        """The policy's timer clock: trio's (monotonic; a test's MockClock)."""
        return round(trio.current_time() * 1000)

    def _execute(self, actions: list[Action]) -> None:
        """Carry out the policy's actions, in order. Synchronous: a commit
        and its acknowledgement happen with no other task in between."""
        for action in actions:
            if isinstance(action, Commit):
                self._commit()
            elif isinstance(action, Acknowledge):
                self._acknowledge(action.entries)
            elif isinstance(action, Publish):
                self._outbox.append(action)
                self._outbox_ready.set()
            elif isinstance(action, StartSync):
                self._start(self._sync_quietly, action.peer, action.reason,
                            on_refused=lambda peer: self._policy.pull_ended(
                                self._clock(), peer, PullOutcome.FAILED, 0))
            elif isinstance(action, FetchIds):
                self._start(self._fetch_quietly, action.peer, action.ids,
                            on_refused=lambda peer: self._policy.fetch_ended(self._clock(), peer))
            elif isinstance(action, Tick):
                applied = self.ledger.tick(self.now_ms())
                self._execute(self._policy.ticked(self._clock(), applied))
        self._poke()

    def _start(self, fn: Callable[..., Any], peer: str, arg: Any, *, on_refused: Callable[[str], Any]) -> None:
        """Start a background task, or tell the policy it could not run
        (no ``run()``, or it is ending) so that its bookkeeping stays true."""
        if self._nursery is not None:
            try:
                self._nursery.start_soon(fn, peer, arg)
                return
            except RuntimeError:  # the nursery is closed to new arrivals
                pass
        on_refused(peer)

    def _poke(self) -> None:
        """Wake the driver if the policy now wants it sooner than it sleeps."""
        deadline = self._policy.next_deadline()
        if deadline is not None and deadline < self._sleeping_until:
            self._wake.set()

    async def _drive(self) -> None:
        """Feed the policy the clock and the connected peers (the host offers
        no hook for connections, so poll every ``peer_poll_s``)."""
        peer_poll_ms = _ms(self.peer_poll_s)
        next_peer_poll = -math.inf
        while True:
            now = self._clock()
            if now >= next_peer_poll:
                self._execute(self._policy.peers_changed(now, sorted(self.host.peers())))
                next_peer_poll = now + peer_poll_ms
            self._execute(self._policy.poll(now))
            deadline = self._policy.next_deadline()
            until = next_peer_poll if deadline is None else min(deadline, next_peer_poll)
            self._wake = trio.Event()
            self._sleeping_until = until
            with trio.move_on_at(until / 1000):
                await self._wake.wait()
            self._sleeping_until = math.inf

    def _track(self, result: ApplyResult, source: Source, hint: str | None = None) -> None:
        self._policy.track(self._clock(), result, source, hint)

    def _commit(self) -> None:
        """Commit everything staged, then let the policy acknowledge it
        (count, queue announcements, tell ``on_applied``)."""
        self.ledger.commit()
        self._execute(self._policy.committed(self._clock(), self.now_ms()))

    def _acknowledge(self, acked: tuple[tuple[Entry, Source], ...]) -> None:
        for _, source in acked:
            self._counters[_COUNTED_AS[source]] += 1
        if self.on_applied is not None:
            try:
                self.on_applied([entry for entry, _ in acked])
            except Exception:  # noqa: BLE001 - a listener must not stop replication
                logger.warning("on_applied raised", exc_info=True)

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
        self._policy.stage(entries, Source.LOCAL)
        self._execute(self._policy.staged(self._clock(), Source.LOCAL, durable=True))
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
                self._track(result, Source.OFFERED)
            else:
                self._counters["rejected"] += 1
        self._execute(self._policy.staged(self._clock(), Source.OFFERED, durable=durable))
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
            self.host.peer_log.failed(logger, origin, self.topic, exc)
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
                # Can be an honest race (time-dependent rules), so DEBUG; counted all the same.
                self._counters["rejected"] += 1
                self.host.peer_log.failed(logger, message.from_peer_id, self.topic, exc, level=logging.DEBUG)
                continue
            self._track(result, Source.GOSSIP, hint=message.from_peer_id)
        self._execute(self._policy.staged(self._clock(), Source.GOSSIP))

    async def _publisher(self) -> None:
        """Publish the announcements the policy released (it paces them),
        in order, off the driver's task: a slow publish delays no timer."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            while self._outbox:
                action = self._outbox.popleft()
                try:
                    await self.host.publish(self.topic, action.data)
                except (PublishRejected, MalformedInput) as exc:
                    logger.warning("could not announce ledger entries: %s", exc)
                    continue
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                self._counters["announcements"] += 1
                self._counters["announced_entries"] += action.entries
                if action.fork_proof:
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
        (the policy's ``pull_ended``). Raises ``SyncError``/``MalformedInput`` (and resets
        the stream) when the peer misbehaves, ``SyncRefused`` when it
        declines, and the host's ``PeerUnreachable``/``ProtocolNotSupported``/
        ``StreamAborted``.
        """
        started = time.perf_counter()
        tally = _Tally()
        policy = self._policy
        async with self._lock_for(peer_id):
            policy.pull_started(peer_id)
            outcome = PullOutcome.FAILED
            try:
                while True:
                    policy.session_starting(peer_id)
                    truncated = await self._pull(peer_id, tally)
                    if policy.session_ended(peer_id, truncated, tally.sessions) is SessionNext.DONE:
                        break
                await self._follow_up(peer_id, tally)
                outcome = PullOutcome.COMPLETED
            except Exception:
                self._counters["sync_failed"] += 1
                raise
            finally:
                if outcome is PullOutcome.COMPLETED:
                    self._counters["sync_sessions"] += 1
                self._execute(policy.pull_ended(self._clock(), peer_id, outcome, tally.applied))
        return self._stats(peer_id, tally, started)

    async def fetch_from(self, peer_id: str, ids: Iterable[bytes], *, follow_up: bool = False) -> SyncStats:
        """Fetch specific entries by id (at most 1024 per request; more are
        split) and apply them. ``follow_up``: then fetch from the same peer
        what those entries wait for, a few rounds deep (for a peer that is
        the author of the chain we lack a piece of)."""
        started = time.perf_counter()
        tally = _Tally()
        try:
            for batch in fetch_batches(ids, self.config.max_fetch_ids):
                await self._fetch(peer_id, list(batch), tally)
            if follow_up:
                await self._follow_up(peer_id, tally)
        finally:
            self._execute(self._policy.settle())
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
        follow_up = self._policy.follow_up()
        while batches := follow_up.next_batches(tally.missing):
            tally.missing.clear()
            for batch in batches:
                await self._fetch(peer_id, list(batch), tally)

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
            self._track(result, Source.SYNC, hint=peer_id)
            if result.status == "applied":
                tally.applied += len(result.applied)
            elif result.status == "duplicate":
                tally.duplicates += 1
            else:
                tally.waiting += 1
                if result.missing is not None:
                    tally.missing[result.missing] = None
        self._execute(self._policy.staged(self._clock(), Source.SYNC))
        if bad is not None:
            # An honest responder only sends entries it applied, and validity
            # is the same on every replica: this peer is lying.
            raise SyncError(f"peer sent an invalid entry: {type(bad).__name__}: {bad}")

    # ------------------------------------------------------------ anti-entropy: responder

    async def _serve(self, stream: FrameStream) -> None:
        """Stream handler for ``LEDGER_SYNC_PROTOCOL``: one request, one answer.
        Errors propagate to the host's wrapper, which resets the stream."""
        peer = stream.remote_peer_id
        if self._policy.admit(peer) is Admission.BUSY:
            await stream.send_frame(encode_message(Refusal(ERR_BUSY, "try again later")))
            return
        try:
            with _deadline(self.session_timeout_s, "serving a sync session"):
                await self._answer(stream, peer)
        except (MalformedInput, SyncError) as exc:
            self._counters["serve_failed"] += 1
            with trio.move_on_after(1):
                try:
                    await stream.send_frame(encode_message(Refusal(ERR_BAD_REQUEST, str(exc))))
                except (P2PGPUError, trio.ClosedResourceError, trio.BrokenResourceError):
                    # Bad framing has already reset the stream: the error
                    # the host logs must stay the peer's, not this one.
                    pass
            raise
        except BaseException:
            self._counters["serve_failed"] += 1
            raise
        finally:
            self._policy.serve_ended(peer)

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
        self._execute(self._policy.served(self._clock(), peer, decided.peer_has_more))

    # ------------------------------------------------------------ background

    async def _sync_quietly(self, peer_id: str, reason: SyncReason) -> None:
        """A background sync (``StartSync``): failures are logged and counted,
        never raised."""
        try:
            stats = await self.sync_with(peer_id)
        except SyncRefused as exc:
            logger.debug("sync (%s) with %s declined: %s", reason.value, peer_id, exc)
        except P2PGPUError as exc:
            # A peer that answers garbage, or connects again and again to
            # get synced with, is one line, not one per session.
            self.host.peer_log.failed(logger, peer_id, LEDGER_SYNC_PROTOCOL, exc, what=f"sync ({reason.value})")
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            logger.info("sync (%s) with %s failed: %r", reason.value, peer_id, exc)
        else:
            if stats.applied:
                logger.info("synced %d entries from %s in %.2f s", stats.applied, peer_id, stats.seconds)

    async def _fetch_quietly(self, peer_id: str, ids: tuple[bytes, ...]) -> None:
        """A background fetch (``FetchIds``) of what parked entries wait for."""
        try:
            stats = await self.fetch_from(peer_id, ids)
        except P2PGPUError as exc:
            self.host.peer_log.failed(logger, peer_id, LEDGER_SYNC_PROTOCOL, exc, what="fetch", level=logging.DEBUG)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            logger.debug("fetch from %s failed: %r", peer_id, exc)
        else:
            logger.debug("fetched %d of %d wanted entries from %s", stats.received, len(ids), peer_id)
        finally:
            self._policy.fetch_ended(self._clock(), peer_id)
            self._poke()

"""One simulated node's ledger and its replication: the sim's stand-in for
``p2pgpu.replication.LedgerReplicator``.

Every replication decision is the node's own: a ``ReplicationPolicy[int]``
(``p2pgpu.core.replication_policy``; peers are node indices) decides when
to commit, what to announce and how fast, when to pull from whom (on
connect, periodically, pull-backs, "sync with me" after learning entries,
again on truncation), what to fetch by id and from whom, the follow-up
fetches after a sync, and whom to serve. This module does what
``LedgerReplicator`` does around it, over the simulated network: it feeds
the policy its events (applies, commits, peers, the ends of sessions, the
clock: one timer per node at ``next_deadline()``) and carries out its
actions (``Commit``: ``ledger.commit``; ``Acknowledge``: the conservation
check and the node's ``on_applied``; ``Publish``: gossip on the ledger
topic; ``StartSync`` / ``FetchIds``: sessions over simulated streams;
``Tick``: ``ledger.tick``).

Also real: the ``Ledger`` (every rule, every signature check), its store
with LevelDB's crash semantics (``MemoryStore`` holds exactly what
``commit`` wrote; the ``Overlay``'s staged writes die with the node), and
every byte on the wire: announcements are ``pack_announcements`` /
``decode_announcement`` (inside the policy), sync sessions are
``SyncRequester`` / ``SyncResponder`` frames, the responder's answer is
``plan`` + ``EntryStream`` + ``entry_frames``, and fetches are ``Fetch`` /
``order_wires``.

The sessions themselves (``_Pull``: ``sync_with`` / ``fetch_from``;
``_Serve``: ``_serve`` / ``_answer``) are transcriptions of the trio code's
byte moving; the choices in them (go round again, follow up, admit) are
the policy's. A responder answers at once, so its admission slot is held
for no simulated time and it is never busy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from p2pgpu.core.ledger import KIND_NAMES, ApplyResult, Entry, Ledger, signature_items, verify_sequentially
from p2pgpu.core.replication_policy import (
    Acknowledge,
    Action,
    Admission,
    Commit,
    FetchIds,
    FollowUp,
    PullOutcome,
    Publish,
    ReplicationConfig,
    ReplicationPolicy,
    SessionNext,
    Source,
    StartSync,
    SyncReason,
    Tick,
    fetch_batches,
)
from p2pgpu.core.sync import (
    ERR_BUSY,
    End,
    Entries,
    EntryStream,
    Fetch,
    FetchRequest,
    Refusal,
    SyncRefused,
    SyncRequester,
    SyncResponder,
    decode_announcement,
    encode_message,
    entry_frames,
    local_summary,
    order_wires,
    plan,
    summary_frames,
)
from p2pgpu.errors import P2PGPUError
from p2pgpu.testing.sim.config import Plant, Timing

if TYPE_CHECKING:
    from p2pgpu.testing.sim.host import NodeHost
    from p2pgpu.testing.sim.network import Stream

__all__ = ["Replica", "LEDGER_TOPIC", "replication_config"]

LEDGER_TOPIC = "ledger"
MAX_SESSION_ENTRIES = 100_000  # SyncLimits().max_session_entries: a responder's answer, at most


def replication_config(timing: Timing) -> ReplicationConfig:
    """The policy's knobs in the simulated time scale (per instance, as the
    node builds its own from its config; the defaults stay the node's)."""
    return ReplicationConfig(
        sync_interval_ms=timing.sync_interval_ms, commit_interval_ms=timing.commit_ms,
        announce_linger_ms=timing.announce_linger_ms, fetch_delay_ms=timing.fetch_delay_ms,
        pull_back_interval_ms=timing.pull_back_ms, tick_interval_ms=timing.tick_interval_ms)


class Replica:
    """A node's ledger plus the policy that replicates it. Lives as long as
    one incarnation of its node; the store outlives it."""

    def __init__(self, node: NodeHost) -> None:
        self.node = node
        self.world = node.world
        self.ledger = Ledger(node.store, node.genesis)
        self.policy: ReplicationPolicy[int] = ReplicationPolicy(self.ledger, replication_config(node.timing),
                                                                rng=node.world.rng)
        self._wake_at: int | None = None  # the one timer armed for the policy's next deadline
        self._risk_open = False  # staged entries wait for a group commit (a crash window)

    def start(self) -> None:
        """The replicator's ``run``: background work begins."""
        self.policy.start(self.world.now)
        self._arm()

    # ---------------------------------------------------------------- driving the policy

    def execute(self, actions: list[Action]) -> None:
        """Carry out the policy's actions in order (``_execute``), then re-arm
        the timer if the policy now wants to be woken sooner."""
        for action in actions:
            if isinstance(action, Commit):
                self._commit()
            elif isinstance(action, Acknowledge):
                self._acknowledge(action.entries)
            elif isinstance(action, Publish):
                self.world.publish(self.node.index, LEDGER_TOPIC, action.data)
            elif isinstance(action, StartSync):
                if self.node.plant is Plant.NO_ANTI_ENTROPY:  # the planted bug: every pull refused at once
                    self.execute(self.policy.pull_ended(self.world.now, action.peer, PullOutcome.FAILED, 0))
                else:
                    _Pull(self, action.peer, None, reason=action.reason, follow_up=True).start()
            elif isinstance(action, FetchIds):
                _Pull(self, action.peer, list(action.ids), follow_up=False, policy_fetch=True).start()
            elif isinstance(action, Tick):
                self.execute(self.policy.ticked(self.world.now, self.ledger.tick(self.node.now())))
        self._arm()

    def _arm(self) -> None:
        deadline = self.policy.next_deadline()
        if deadline is None or (self._wake_at is not None and self._wake_at <= deadline):
            return
        self._wake_at = deadline
        self.node.later(max(0, deadline - self.world.now), self._wake, deadline)

    def _wake(self, at: int) -> None:
        if self._wake_at != at:
            return  # superseded by an earlier deadline
        self._wake_at = None
        self.execute(self.policy.poll(self.world.now))
        deadline = self.policy.next_deadline()
        if deadline is not None and deadline <= at and self._wake_at == deadline:
            # poll left something due that it does not act on: do not spin at one instant
            self.world.count("policy_spins")
            self._wake_at = at + 1
            self.node.later(1, self._wake, at + 1)

    def staged(self, source: Source) -> None:
        """Entries from ``source`` were staged: let the policy decide the commit."""
        actions = self.policy.staged(self.world.now, source)
        if not actions and source is not Source.SYNC and not self._risk_open and self.policy.has_staged():
            self._risk_open = True  # not durable until the group commit: the fault plan may crash us
            self.world.risky(self.node.index, self.policy.config.commit_interval_ms)
        self.execute(actions)

    def _commit(self) -> None:
        self._risk_open = False
        self.ledger.commit()
        self.execute(self.policy.committed(self.world.now, self.node.now()))

    def _acknowledge(self, acked: tuple[tuple[Entry, Source], ...]) -> None:
        """Durable now: where conservation is checked, on every acknowledged
        batch; then the node hears of them (``on_applied``)."""
        node = self.node
        if self.world.tracing:
            node.trace(f"commits {len(acked)}: " + ", ".join(f"{KIND_NAMES[e.kind]} {e.author.hex()[:6]}#{e.seq} "
                                                             f"({source.value})" for e, source in acked))
        node.checks.conservation(node)
        node.on_applied([entry for entry, _ in acked])

    # ---------------------------------------------------------------- local entries

    def append(self, make: Callable[[Ledger], Entry | list[Entry]]) -> list[Entry]:
        """A local append, committed and announced (``replicator.append``).
        The ledger's typed errors propagate; a refused append changed nothing."""
        made = make(self.ledger)
        entries = [made] if isinstance(made, Entry) else list(made)
        self.policy.stage(entries, Source.LOCAL)
        self.execute(self.policy.staged(self.world.now, Source.LOCAL, durable=True))
        return entries

    def offer(self, wires: list[bytes], *, durable: bool) -> list[ApplyResult | P2PGPUError]:
        """Entries handed to us outside the network (a job's hold and context)."""
        results = self.ledger.offer_batch(wires, self.node.now())
        for result in results:
            if isinstance(result, ApplyResult):
                self.policy.track(self.world.now, result, Source.OFFERED)
        if durable:
            self.execute(self.policy.staged(self.world.now, Source.OFFERED, durable=True))
        else:
            self.staged(Source.OFFERED)
        return results

    # ---------------------------------------------------------------- gossip

    def on_gossip(self, data: bytes, origin: int) -> None:
        """An announcement: the topic validator's envelope check, then each
        entry through the ledger (signature checked there, duplicates free)."""
        try:
            wires = decode_announcement(data)
        except P2PGPUError as exc:
            self.node.checks.fail("wire", f"{self.node.name} could not decode an announcement: {exc}")
            return
        now, clock = self.node.now(), self.world.now
        for wire in wires:
            try:
                result = self.ledger.offer(wire, now)
            except P2PGPUError as exc:
                self.node.checks.entry_refused(self.node, wire, exc)
                continue
            self.policy.track(clock, result, Source.GOSSIP, origin)
        self.staged(Source.GOSSIP)

    # ---------------------------------------------------------------- anti-entropy

    def on_connected(self, peers: list[int]) -> None:
        """The peers we reach now (``_drive``'s peer poll; here on every change)."""
        self.execute(self.policy.peers_changed(self.world.now, peers))

    def fetch(self, peer: int, ids: list[bytes], *, follow_up: bool,
              done: Callable[[], None] | None = None) -> None:
        """Fetch ``ids`` from ``peer`` (``fetch_from``); ``done`` runs after."""
        _Pull(self, peer, ids, follow_up=follow_up, done=done).start()

    def serve(self, stream: Stream, data: bytes) -> None:
        """A sync or fetch request arrived on a new stream."""
        server = _Serve(self, stream)
        stream.attach(1, server)
        server.on_frame(data)

    def idle(self) -> bool:
        """Nothing staged, queued, wanted or running (the policy's ``idle``), nothing parked."""
        return self.policy.idle() and not len(self.ledger.unchecked)


class _Pull:
    """The requester's side of one ``sync_with`` (``ids`` None) or
    ``fetch_from``: sessions over fresh streams, follow-up fetches of what
    the new entries wait for, then the policy hears the end. A cut stream,
    an unreachable peer or a refusal ends it as failed; what applied stays."""

    def __init__(self, replica: Replica, peer: int, ids: list[bytes] | None, *, follow_up: bool,
                 reason: SyncReason | None = None, policy_fetch: bool = False,
                 done: Callable[[], None] | None = None) -> None:
        self.replica = replica
        self.policy = replica.policy
        self.peer = peer
        self.ids = ids
        self.reason = reason
        self.follow_up = follow_up
        self.policy_fetch = policy_fetch  # a ``FetchIds``: report ``fetch_ended``
        self.done = done
        self.applied = 0
        self.sessions = 0
        self.missing: dict[bytes, None] = {}  # ordered: the same fetches every replay
        self.batches: list[tuple[bytes, ...]] = []  # fetch requests still to send
        self.following: FollowUp | None = None
        self.stream: Stream | None = None
        self.requester: SyncRequester | None = None
        self.fetching = False
        self.over = False

    def start(self) -> None:
        if self.ids is None:
            self.policy.pull_started(self.peer)
            self._sync_session()
        else:
            self.batches = fetch_batches(self.ids, self.policy.config.max_fetch_ids)
            self._next_fetch()

    def _open(self) -> Stream | None:
        node = self.replica.node
        stream = node.world.open_stream(node.index, self.peer)
        if stream is None:
            self._end(PullOutcome.FAILED)
            return None
        stream.protocol = "sync"
        stream.attach(0, self)
        self.stream = stream
        return stream

    def _sync_session(self) -> None:
        self.policy.session_starting(self.peer)
        stream = self._open()
        if stream is None:
            return
        self.fetching = False
        self.requester = SyncRequester()
        node = self.replica.node
        node.world.count("sync_sessions")
        why = "again" if self.sessions else self.reason.value if self.reason is not None else "asked"
        node.trace(f"syncs with node{self.peer} ({why}, #{stream.id})")
        for frame in summary_frames(local_summary(self.replica.ledger)):
            stream.send(0, frame)

    def _next_fetch(self) -> None:
        """The next fetch request: of this fetch, or of the follow-up."""
        if not self.batches and self.follow_up:
            if self.following is None:
                self.following = self.policy.follow_up()
            self.batches = self.following.next_batches(self.missing)
            self.missing.clear()
        if not self.batches:
            self._end(PullOutcome.COMPLETED)
            return
        ids = self.batches.pop(0)
        stream = self._open()
        if stream is None:
            return
        self.fetching = True
        self.requester = SyncRequester(max_entries=len(ids))
        node = self.replica.node
        node.world.count("fetch_sessions")
        node.trace(f"fetches {len(ids)} entries from node{self.peer} (#{stream.id})")
        stream.send(0, encode_message(Fetch(ids)))

    def on_frame(self, data: bytes) -> None:
        if self.over:
            return
        assert self.requester is not None and self.stream is not None
        replica, node = self.replica, self.replica.node
        try:
            message = self.requester.receive(data)
        except SyncRefused as exc:
            node.trace(f"node{self.peer} declined: {exc}")
            self._end(PullOutcome.FAILED)
            return
        except P2PGPUError as exc:
            node.checks.fail("sync", f"{node.name} refused a sync frame from node{self.peer}: {exc!r}")
            return
        if isinstance(message, Entries):
            ledger, policy, clock = replica.ledger, self.policy, node.world.now
            decoded = ledger.decode_batch(list(message.wires))
            verdicts = verify_sequentially(signature_items(decoded))
            for wire, result in zip(message.wires, ledger.apply_checked(decoded, verdicts, node.now())):
                if isinstance(result, P2PGPUError):
                    node.checks.entry_refused(node, wire, result)
                    continue
                policy.track(clock, result, Source.SYNC, self.peer)
                if result.status == "applied":
                    self.applied += len(result.applied)
                elif result.status == "waiting" and result.missing is not None:
                    self.missing[result.missing] = None
            replica.staged(Source.SYNC)
            return
        assert isinstance(message, End)
        self.stream.close(0)
        self.stream = None
        self.sessions += 1
        if not self.fetching and self.policy.session_ended(self.peer, message.truncated,
                                                           self.sessions) is SessionNext.AGAIN:
            self._sync_session()
            return
        self._next_fetch()

    def on_lost(self) -> None:
        if not self.over:
            self._end(PullOutcome.FAILED)

    def _end(self, outcome: PullOutcome) -> None:
        if self.over:
            return
        self.over = True
        if self.stream is not None:
            self.stream.close(0)
        replica, now = self.replica, self.replica.world.now
        if self.ids is None:
            replica.execute(self.policy.pull_ended(now, self.peer, outcome, self.applied))
        else:
            replica.execute(self.policy.settle())
            if self.policy_fetch:
                self.policy.fetch_ended(now, self.peer)
                replica.execute([])  # the next fetch round may be due
        if self.done is not None:
            self.done()


class _Serve:
    """The responder's side of one session (``replicator._serve``/``_answer``)."""

    def __init__(self, replica: Replica, stream: Stream) -> None:
        self.replica = replica
        self.stream = stream
        self.responder = SyncResponder()
        self.admitted = False  # holds one of the policy's serving slots until ``_done``

    def on_frame(self, data: bytes) -> None:
        replica, node, stream = self.replica, self.replica.node, self.stream
        peer = stream.nodes[0]
        policy = replica.policy
        if not self.admitted:
            if policy.admit(peer) is Admission.BUSY:
                stream.send(1, encode_message(Refusal(ERR_BUSY, "try again later")))
                stream.close(1)
                return
            self.admitted = True
        try:
            request = self.responder.receive(data)
        except P2PGPUError as exc:
            self._done()
            node.checks.fail("sync", f"{node.name} refused a sync request: {exc!r}")
            return
        if request is None:
            return
        ledger = replica.ledger
        frames: Any
        if isinstance(request, FetchRequest):
            wires = order_wires(w for w in map(ledger.get_wire, request.ids) if w is not None)
            frames = list(entry_frames(wires))
            frames.append(encode_message(End(len(wires), False)))
            peer_has_more = None
        else:
            decided = plan(ledger, local_summary(ledger), request.summary)
            entries = EntryStream(ledger, decided.ranges, MAX_SESSION_ENTRIES)
            frames = list(entry_frames(entries))
            frames.append(encode_message(End(entries.sent, entries.truncated)))
            peer_has_more = decided.peer_has_more
        for frame in frames:
            stream.send(1, frame)
        stream.close(1)
        self._done()
        if peer_has_more is not None:
            replica.execute(policy.served(replica.world.now, peer, peer_has_more))

    def _done(self) -> None:
        if self.admitted:
            self.admitted = False
            self.replica.policy.serve_ended(self.stream.nodes[0])

    def on_lost(self) -> None:
        self._done()  # cut before the request was whole

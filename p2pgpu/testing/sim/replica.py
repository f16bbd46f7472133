"""One simulated node's ledger and its replication: the sim's stand-in for
``p2pgpu.replication.LedgerReplicator``.

What is real here: the ``Ledger`` (every rule, every signature check), its
store with LevelDB's crash semantics (``MemoryStore`` holds exactly what
``commit`` wrote; the ``Overlay``'s staged writes die with the node), and
every byte on the wire: announcements are ``pack_announcements`` /
``decode_announcement``, sync sessions are ``SyncRequester`` /
``SyncResponder`` frames, the responder's answer is ``plan`` +
``EntryStream`` + ``entry_frames``, and fetches are ``Fetch`` / ``order_wires``.

What is re-implemented (thinly, from ``p2pgpu.replication``, because those
choices live in the trio edge and not yet in a pure module): *when* to
commit (local appends and durable offers at once, the rest grouped every
``commit_ms``), what to announce after a commit (own and offered entries,
synced ones while fresh), when to sync (on connect, periodically with a
random peer, a pull-back when a requester holds more, "sync with me" after
learning entries by sync), and fetching by id what parked entries wait for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from p2pgpu.core.ledger import KIND_NAMES, ApplyResult, Entry, Ledger, signature_items, verify_sequentially
from p2pgpu.core.sync import (
    End,
    Entries,
    EntryStream,
    Fetch,
    FetchRequest,
    SyncRequester,
    SyncResponder,
    decode_announcement,
    encode_message,
    entry_frames,
    local_summary,
    order_wires,
    pack_announcements,
    plan,
    summary_frames,
)
from p2pgpu.errors import P2PGPUError
from p2pgpu.testing.sim.config import Plant

if TYPE_CHECKING:
    from p2pgpu.testing.sim.host import NodeHost
    from p2pgpu.testing.sim.network import Stream

__all__ = ["Replica", "LEDGER_TOPIC"]

LEDGER_TOPIC = "ledger"
LOCAL, OFFERED, GOSSIP, SYNC = "local", "offered", "gossip", "sync"
FRESH_WINDOW_MS = 120_000
MAX_FOLLOW_UP_ROUNDS = 32
FETCH_TRIES = 3


class Replica:
    """A node's ledger plus the replication decisions around it. Lives as
    long as one incarnation of its node; the store outlives it."""

    def __init__(self, node: NodeHost) -> None:
        self.node = node
        self.world = node.world
        self.ledger = Ledger(node.store, node.genesis)
        self.unacked: list[tuple[Entry, str]] = []
        self.commit_due = False
        self.to_announce: list[bytes] = []
        self.announce_due = False
        self.wanted: dict[bytes, list] = {}  # missing id -> [since, hint peer, attempts]
        self.fetcher_due = False
        self.pulls: dict[int, _Pull] = {}  # running pull per peer
        self.again: list[int] = []  # peers to pull from once more when their running pull ends
        self.last_pull_back: dict[int, int] = {}
        self.pull_back_pending: list[int] = []
        self.known_peers: list[int] = []

    # ---------------------------------------------------------------- commits

    def append(self, make: Callable[[Ledger], Entry | list[Entry]]) -> list[Entry]:
        """A local append, committed and announced at once (``replicator.append``).
        The ledger's typed errors propagate; a refused append changed nothing."""
        made = make(self.ledger)
        entries = [made] if isinstance(made, Entry) else list(made)
        self.unacked.extend((entry, LOCAL) for entry in entries)
        self.commit()
        return entries

    def offer(self, wires: list[bytes], *, durable: bool) -> list[ApplyResult | P2PGPUError]:
        """Entries handed to us outside the network (a job's hold and context)."""
        results = self.ledger.offer_batch(wires, self.node.now())
        for result in results:
            if isinstance(result, ApplyResult):
                self._track(result, OFFERED, None)
        if durable:
            self.commit()
        else:
            self._commit_soon()
        return results

    def _track(self, result: ApplyResult, source: str, hint: int | None) -> None:
        if result.status == "applied":
            self.unacked.extend((entry, source) for entry in result.applied)
        elif result.status == "waiting" and result.missing is not None:
            if result.missing not in self.wanted and not self.ledger.has_entry(result.missing):
                self.wanted[result.missing] = [self.world.now, hint, 0]
                self._fetcher_soon()

    def _commit_soon(self) -> None:
        if not self.commit_due and (self.unacked or self.ledger.uncommitted):
            self.commit_due = True
            self.node.later(self.node.timing.commit_ms, self._scheduled_commit)
            self.world.risky(self.node.index, self.node.timing.commit_ms)

    def _scheduled_commit(self) -> None:
        self.commit_due = False
        self.commit()

    def commit(self) -> None:
        """Commit what is staged, then acknowledge it: announce, tell the node.
        Also where conservation is checked, on every acknowledged batch."""
        self.ledger.commit()
        acked, self.unacked = self.unacked, []
        if not acked:
            return
        if self.world.tracing:
            self.node.trace(f"commits {len(acked)}: " + ", ".join(f"{KIND_NAMES[e.kind]} {e.author.hex()[:6]}#{e.seq} ({source})"
                                                             for e, source in acked))
        fresh_after = self.node.now() - FRESH_WINDOW_MS
        for entry, source in acked:
            if source in (LOCAL, OFFERED) or (source == SYNC and entry.timestamp_ms >= fresh_after):
                self.to_announce.append(entry.wire)
        if self.to_announce and not self.announce_due:
            self.announce_due = True
            self.node.later(self.node.timing.announce_linger_ms, self._announce)
        self.node.checks.conservation(self.node)
        self.node.on_applied([entry for entry, _ in acked])

    def _announce(self) -> None:
        self.announce_due = False
        wires, self.to_announce = self.to_announce, []
        for data in pack_announcements(wires):
            self.world.publish(self.node.index, LEDGER_TOPIC, data)

    # ---------------------------------------------------------------- gossip

    def on_gossip(self, data: bytes, origin: int) -> None:
        """An announcement: the topic validator's envelope check, then each
        entry through the ledger (signature checked there, duplicates free)."""
        try:
            wires = decode_announcement(data)
        except P2PGPUError as exc:
            self.node.checks.fail("wire", f"{self.node.name} could not decode an announcement: {exc}")
            return
        now = self.node.now()
        for wire in wires:
            try:
                result = self.ledger.offer(wire, now)
            except P2PGPUError as exc:
                self.node.checks.entry_refused(self.node, wire, exc)
                continue
            self._track(result, GOSSIP, origin)
        self._commit_soon()

    # ---------------------------------------------------------------- anti-entropy

    def on_connected(self, peers: list[int]) -> None:
        """Pull from every newly reachable peer (``_watch_peers``)."""
        for peer in peers:
            if peer not in self.known_peers:
                self.want_sync(peer)
        self.known_peers = peers

    def periodic(self) -> None:
        peers = self.world.peers_of(self.node.index)
        if peers:
            self.want_sync(peers[self.world.rng.randrange(len(peers))])
        low = self.node.timing.sync_interval_ms * 8 // 10
        self.node.later(self.world.rng.randint(low, low * 3 // 2), self.periodic)

    def want_sync(self, peer: int) -> None:
        """A pull from ``peer``, coalesced with a running one (which then goes
        round once more)."""
        if self.node.plant is Plant.NO_ANTI_ENTROPY:
            return  # the planted bug
        if peer in self.pulls:
            if peer not in self.again:
                self.again.append(peer)
            return
        pull = _Pull(self, peer, None, follow_up=True)
        self.pulls[peer] = pull
        pull.start()

    def fetch(self, peer: int, ids: list[bytes], *, follow_up: bool,
              done: Callable[[], None] | None = None) -> None:
        """Fetch ``ids`` from ``peer`` (``fetch_from``); ``done`` runs after."""
        _Pull(self, peer, ids, follow_up=follow_up, done=done).start()

    def pull_ended(self, pull: _Pull) -> None:
        if pull.ids is None:
            self.pulls.pop(pull.peer, None)
            if pull.applied:
                for other in self.world.peers_of(self.node.index):  # ``_propagate``
                    if other != pull.peer:
                        self.want_sync(other)
            if pull.peer in self.again:
                self.again.remove(pull.peer)
                self.want_sync(pull.peer)

    def pull_back(self, peer: int) -> None:
        """The requester holds what we lack: pull from it, at most once per
        ``pull_back_ms`` per peer (deferred, not dropped)."""
        if peer in self.pull_back_pending:
            return
        wait = self.last_pull_back.get(peer, -10**9) + self.node.timing.pull_back_ms - self.world.now
        self.pull_back_pending.append(peer)
        self.node.later(max(0, wait), self._pull_back_now, peer)

    def _pull_back_now(self, peer: int) -> None:
        self.pull_back_pending.remove(peer)
        self.last_pull_back[peer] = self.world.now
        if self.world.reachable(self.node.index, peer):
            self.want_sync(peer)

    def serve(self, stream: Stream, data: bytes) -> None:
        """A sync or fetch request arrived on a new stream."""
        server = _Serve(self, stream)
        stream.attach(1, server)
        server.on_frame(data)

    # ---------------------------------------------------------------- fetching missing entries

    def _fetcher_soon(self) -> None:
        if not self.fetcher_due:
            self.fetcher_due = True
            self.node.later(self.node.timing.fetch_delay_ms // 2, self._fetcher)

    def _fetcher(self) -> None:
        """Fetch by id what parked entries still wait for, after a grace
        period: from the gossip origin first, then random peers; three tries."""
        self.fetcher_due = False
        if not self.wanted:
            return
        now = self.world.now
        still_missing = self.ledger.unchecked.missing_ids()
        peers = self.world.peers_of(self.node.index)
        by_peer: dict[int, list[bytes]] = {}
        for entry_id, (since, hint, attempts) in list(self.wanted.items()):
            if self.ledger.has_entry(entry_id) or entry_id not in still_missing or attempts >= FETCH_TRIES:
                del self.wanted[entry_id]
                continue
            if not peers or now - since < self.node.timing.fetch_delay_ms:
                continue
            peer = hint if hint in peers and attempts == 0 else peers[self.world.rng.randrange(len(peers))]
            self.wanted[entry_id] = [now, hint, attempts + 1]
            by_peer.setdefault(peer, []).append(entry_id)
        for peer, ids in by_peer.items():
            self.fetch(peer, ids, follow_up=False)
        if self.wanted:
            self._fetcher_soon()

    def idle(self) -> bool:
        """Nothing staged, nothing wanted, nothing parked, no pull running."""
        return (not self.unacked and not self.ledger.uncommitted and not self.wanted and not self.pulls
                and not len(self.ledger.unchecked) and not self.to_announce)


class _Pull:
    """The requester's side of one ``sync_with`` (ids None) or ``fetch_from``:
    sessions over fresh streams, follow-up fetches of what the new entries
    wait for, then a commit. A cut stream ends it; what applied stays."""

    def __init__(self, replica: Replica, peer: int, ids: list[bytes] | None, *, follow_up: bool,
                 done: Callable[[], None] | None = None) -> None:
        self.replica = replica
        self.peer = peer
        self.ids = ids
        self.follow_up = follow_up
        self.done = done
        self.applied = 0
        self.missing: list[bytes] = []
        self.asked: set[bytes] = set()
        self.rounds = 0
        self.stream: Stream | None = None
        self.requester: SyncRequester | None = None
        self.fetching: list[bytes] | None = None
        self.over = False

    def start(self) -> None:
        if self.ids is None:
            self._session(None)
        else:
            self._session(list(dict.fromkeys(self.ids)))

    def _session(self, ids: list[bytes] | None) -> None:
        node = self.replica.node
        stream = node.world.open_stream(node.index, self.peer)
        if stream is None:
            self._end()
            return
        stream.protocol = "sync"
        self.stream, self.fetching = stream, ids
        stream.attach(0, self)
        if ids is None:
            self.requester = SyncRequester()
            frames = summary_frames(local_summary(self.replica.ledger))
        else:
            self.asked.update(ids)
            self.requester = SyncRequester(max_entries=len(ids))
            frames = [encode_message(Fetch(tuple(ids)))]
        node.world.count("sync_sessions" if ids is None else "fetch_sessions")
        node.trace(f"{'syncs with' if ids is None else f'fetches {len(ids)} entries from'} node{self.peer} (#{stream.id})")
        for frame in frames:
            stream.send(0, frame)

    def on_frame(self, data: bytes) -> None:
        if self.over:
            return
        assert self.requester is not None and self.stream is not None
        replica, node = self.replica, self.replica.node
        try:
            message = self.requester.receive(data)
        except P2PGPUError as exc:
            node.checks.fail("sync", f"{node.name} refused a sync frame from node{self.peer}: {exc!r}")
            return
        if isinstance(message, Entries):
            decoded = replica.ledger.decode_batch(list(message.wires))
            verdicts = verify_sequentially(signature_items(decoded))
            for wire, result in zip(message.wires, replica.ledger.apply_checked(decoded, verdicts, node.now())):
                if isinstance(result, P2PGPUError):
                    node.checks.entry_refused(node, wire, result)
                    continue
                replica._track(result, SYNC, self.peer)
                if result.status == "applied":
                    self.applied += len(result.applied)
                elif result.status == "waiting" and result.missing is not None:
                    self.missing.append(result.missing)
            return
        assert isinstance(message, End)
        self.stream.close(0)
        self.stream = None
        if self.fetching is None and (message.truncated or self.peer in replica.again) and self.rounds < 64:
            self.rounds += 1
            if self.peer in replica.again:
                replica.again.remove(self.peer)
            self._session(None)
            return
        self._follow_up()

    def _follow_up(self) -> None:
        ledger = self.replica.ledger
        if self.follow_up and self.rounds < MAX_FOLLOW_UP_ROUNDS + 64:
            missing = [m for m in dict.fromkeys(self.missing) if m not in self.asked and not ledger.has_entry(m)]
            self.missing = []
            if missing:
                self.rounds += 1
                self._session(missing[:1024])
                return
        self._end()

    def on_lost(self) -> None:
        if not self.over:
            self._end()

    def _end(self) -> None:
        if self.over:
            return
        self.over = True
        if self.stream is not None:
            self.stream.close(0)
        replica = self.replica
        if replica.unacked or replica.ledger.uncommitted:
            replica.commit()
        replica.pull_ended(self)
        if self.done is not None:
            self.done()


class _Serve:
    """The responder's side of one session (``replicator._answer``)."""

    def __init__(self, replica: Replica, stream: Stream) -> None:
        self.replica = replica
        self.stream = stream
        self.responder = SyncResponder()

    def on_frame(self, data: bytes) -> None:
        node = self.replica.node
        try:
            request = self.responder.receive(data)
        except P2PGPUError as exc:
            node.checks.fail("sync", f"{node.name} refused a sync request: {exc!r}")
            return
        if request is None:
            return
        ledger = self.replica.ledger
        stream = self.stream
        if isinstance(request, FetchRequest):
            wires = order_wires(w for w in map(ledger.get_wire, request.ids) if w is not None)
            frames: Any = list(entry_frames(wires))
            frames.append(encode_message(End(len(wires), False)))
            peer_has_more = False
        else:
            decided = plan(ledger, local_summary(ledger), request.summary)
            entries = EntryStream(ledger, decided.ranges, 100_000)
            frames = list(entry_frames(entries))
            frames.append(encode_message(End(entries.sent, entries.truncated)))
            peer_has_more = decided.peer_has_more
        for frame in frames:
            stream.send(1, frame)
        stream.close(1)
        if peer_has_more:
            self.replica.pull_back(stream.nodes[0])

    def on_lost(self) -> None:
        pass

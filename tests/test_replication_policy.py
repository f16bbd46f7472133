"""The replicator's decisions, without trio or libp2p (``p2pgpu.core.replication_policy``).

The policy is driven here the way the edge and the simulator drive it:
events with a clock, then ``poll`` at ``next_deadline()``. A fake view
stands in for the ledger where only a few facts matter (held ids, what
parked entries wait for, how much is staged); fork proofs use a real one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.core.codec import Tag, sign_object
from p2pgpu.core.kv import MemoryStore
from p2pgpu.core.ledger import SEND, ApplyResult, Ledger
from p2pgpu.core.replication_policy import (
    Acknowledge,
    Admission,
    Commit,
    FetchIds,
    Publish,
    PullOutcome,
    ReplicationConfig,
    ReplicationPolicy,
    SessionNext,
    Source,
    StartSync,
    SyncReason,
    Tick,
    fetch_batches,
)
from p2pgpu.core.sync import decode_announcement
from p2pgpu.errors import ConfigError
from p2pgpu.testing.ledger import START_MS, key_for, make_genesis

NET = b"n" * 32


@dataclass(frozen=True)
class FakeEntry:
    """All the policy reads of an entry it announces."""

    wire: bytes
    timestamp_ms: int


class FakeView:
    """The ledger facts the policy reads, set by hand."""

    network_id = NET

    def __init__(self) -> None:
        self.held: set[bytes] = set()
        self.parked_on: set[bytes] = set()  # ids that parked entries wait for
        self.uncommitted = 0

    @property
    def unchecked(self) -> FakeView:
        return self

    def missing_ids(self) -> set[bytes]:
        return self.parked_on - self.held

    def has_entry(self, entry_id: bytes) -> bool:
        return entry_id in self.held

    def chain(self, author: bytes, from_seq: int = 1, limit: int = 1000) -> list[bytes]:
        return []


def policy(config: ReplicationConfig = ReplicationConfig(), *, start: int | None = 0,
           seed: int = 1) -> tuple[ReplicationPolicy[str], FakeView]:
    view = FakeView()
    p: ReplicationPolicy[str] = ReplicationPolicy(view, config, rng=random.Random(seed))  # type: ignore[arg-type]
    if start is not None:
        p.start(start)
    return p, view


def applied(*entries: FakeEntry) -> ApplyResult:
    return ApplyResult("applied", b"x" * 32, tuple(entries))  # type: ignore[arg-type]


def waiting(missing: bytes) -> ApplyResult:
    return ApplyResult("waiting", b"w" * 32, (), missing)


def drive(p: ReplicationPolicy, until_ms: int, on_action=None, *, now: int = 0) -> list[tuple[int, object]]:
    """Poll at each deadline up to ``until_ms`` (at ``now`` for one already
    past, as the edge does); (time, action) in order. Checks on the way that
    a poll always moves the deadline past the time it ran at."""
    out: list[tuple[int, object]] = []
    while (deadline := p.next_deadline()) is not None and deadline <= until_ms:
        now = max(now, deadline)
        for action in p.poll(now):
            out.append((now, action))
            if on_action is not None:
                on_action(now, action)
        after = p.next_deadline()
        assert after is None or after > now, "a poll left work due now: the edge would spin"
    return out


def of_type(timed: list[tuple[int, object]], kind: type) -> list[tuple[int, object]]:
    return [(t, a) for t, a in timed if isinstance(a, kind)]


# ------------------------------------------------------------------ commits


def test_durable_staging_commits_at_once() -> None:
    p, view = policy()
    view.uncommitted = 1
    assert p.staged(0, Source.LOCAL, durable=True) == [Commit()]


def test_gossip_is_committed_in_groups_by_time_or_count() -> None:
    config = ReplicationConfig(commit_interval_ms=20, gossip_commit_entries=4)
    p, view = policy(config, start=None)
    view.uncommitted = 1
    p.track(100, applied(FakeEntry(b"a", 0)), Source.GOSSIP, "bob")
    assert p.staged(100, Source.GOSSIP) == []
    assert p.next_deadline() == 120
    assert p.poll(119) == []
    assert p.poll(120) == [Commit()]
    view.uncommitted = 4
    assert p.staged(130, Source.GOSSIP) == [Commit()]


def test_a_sync_commits_only_in_large_groups_and_at_its_end() -> None:
    config = ReplicationConfig(sync_commit_entries=10)
    p, view = policy(config, start=None)
    view.uncommitted = 9
    assert p.staged(0, Source.SYNC) == [] and p.next_deadline() is None  # no group-commit timer mid-session
    view.uncommitted = 10
    assert p.staged(0, Source.SYNC) == [Commit()]
    p.pull_started("bob")
    view.uncommitted = 3
    assert p.pull_ended(5, "bob", PullOutcome.COMPLETED, 0) == [Commit()]


def test_a_commit_acknowledges_everything_and_announces_by_source() -> None:
    config = ReplicationConfig(fresh_window_ms=1000, announce_linger_ms=50)
    p, view = policy(config)
    now = START_MS
    local, offered, gossip = FakeEntry(b"local", now), FakeEntry(b"offered", now), FakeEntry(b"gossip", now)
    fresh, stale, ticked = FakeEntry(b"fresh", now - 500), FakeEntry(b"stale", now - 5000), FakeEntry(b"tick", now)
    p.stage([local], Source.LOCAL)
    p.track(0, applied(offered), Source.OFFERED)
    p.track(0, applied(gossip), Source.GOSSIP, "bob")
    p.track(0, applied(fresh, stale), Source.SYNC, "carol")
    p.ticked(0, [ticked])
    [ack] = p.committed(10, now)
    assert ack == Acknowledge(((local, Source.LOCAL), (offered, Source.OFFERED), (gossip, Source.GOSSIP),
                               (fresh, Source.SYNC), (stale, Source.SYNC), (ticked, Source.TICK)))
    assert p.committed(11, now) == []  # nothing new staged
    assert p.next_deadline() == 60  # the linger
    [(_, publish)] = of_type(drive(p, 60), Publish)
    assert decode_announcement(publish.data) == [b"local", b"offered", b"fresh", b"tick"]
    assert publish.entries == 4 and not publish.fork_proof


def test_the_announce_bucket_paces_publishing() -> None:
    config = ReplicationConfig(announce_rate=2.0, announce_burst=2.0, announce_batch=1, announce_linger_ms=0)
    p, _ = policy(config)
    p.stage([FakeEntry(bytes([i]), 0) for i in range(5)], Source.LOCAL)
    p.committed(0, 0)
    times = [t for t, _ in of_type(drive(p, 10_000), Publish)]
    assert times == [0, 0, 500, 1000, 1500]


# ------------------------------------------------------------------ forks


def _signed_send(name: str, seq: int, to: str, amount: int, memo: str, genesis_net: bytes) -> bytes:
    key = key_for(name)
    return sign_object(key, Tag.ENTRY, genesis_net, START_MS, [seq, b"", SEND, [key_for(to).public_key, amount, memo]]).wire


def test_a_fork_becomes_one_canonical_proof_announced_before_entries() -> None:
    genesis = make_genesis(("alice", "bob", "carol", "mallory"))
    ledger = Ledger(MemoryStore(), genesis)
    p: ReplicationPolicy[str] = ReplicationPolicy(ledger, ReplicationConfig(announce_linger_ms=0),
                                                  rng=random.Random(0))
    p.start(0)
    first = _signed_send("mallory", 1, "alice", 5, "one", genesis.network_id)
    second = _signed_send("mallory", 1, "bob", 5, "two", genesis.network_id)
    p.track(0, ledger.offer(first, START_MS), Source.GOSSIP, "bob")
    result = ledger.offer(second, START_MS)
    assert result.forks
    p.track(0, result, Source.OFFERED)
    ledger.commit()
    p.committed(0, START_MS)
    publishes = [a for _, a in of_type(drive(p, 1000), Publish)]
    assert publishes[0].fork_proof and sorted(decode_announcement(publishes[0].data)) == sorted([first, second])
    assert not publishes[1].fork_proof and decode_announcement(publishes[1].data) == [second]
    assert p.forked_authors == {key_for("mallory").public_key}


# ------------------------------------------------------------------ sync scheduling


def test_new_peers_are_pulled_from_once_and_only_after_start() -> None:
    p, _ = policy(start=None)
    assert p.peers_changed(0, ["bob"]) == []  # not running: no background pulls
    p.start(0)
    assert p.peers_changed(1, ["bob", "carol"]) == [StartSync("carol", SyncReason.CONNECTED)]
    assert p.peers_changed(2, ["bob", "carol"]) == []


def test_a_request_during_a_pull_makes_it_go_round_again() -> None:
    p, _ = policy()
    p.peers_changed(0, ["bob", "carol"])  # pulls from both start
    p.session_starting("bob")
    assert p.peers_changed(1, ["bob", "carol", "dave"]) == [StartSync("dave", SyncReason.CONNECTED)]
    assert p.served(1, "bob", True) == []  # bob is being pulled from: coalesced
    assert p.session_ended("bob", False, 1) is SessionNext.AGAIN
    p.session_starting("bob")
    assert p.session_ended("bob", False, 2) is SessionNext.DONE
    assert p.session_ended("bob", True, 3) is SessionNext.AGAIN  # truncated
    assert p.session_ended("bob", True, 64) is SessionNext.DONE  # bounded


def test_learning_by_sync_asks_every_other_peer_and_a_late_request_runs_after() -> None:
    p, _ = policy()
    p.peers_changed(0, ["bob", "carol", "dave"])
    for peer in ("carol", "dave"):
        p.pull_ended(1, peer, PullOutcome.COMPLETED, 0)
    p.session_starting("bob")
    p.served(2, "bob", True)  # after bob's last session began: a new round is owed
    actions = p.pull_ended(3, "bob", PullOutcome.COMPLETED, applied=7)
    assert actions == [StartSync("carol", SyncReason.PROPAGATE), StartSync("dave", SyncReason.PROPAGATE),
                       StartSync("bob", SyncReason.AGAIN)]


def test_a_failed_pull_drops_its_pending_round() -> None:
    p, _ = policy()
    p.peers_changed(0, ["bob"])
    p.served(1, "bob", True)
    assert p.pull_ended(2, "bob", PullOutcome.FAILED, applied=3) == []
    assert "bob" not in p.pulling()


def test_periodic_pulls_pick_a_peer_within_the_jittered_interval() -> None:
    config = ReplicationConfig(sync_interval_ms=1000, sync_jitter=0.2)
    p, _ = policy(config)
    p.peers_changed(0, ["bob", "carol"])
    for peer in ("bob", "carol"):
        p.pull_ended(0, peer, PullOutcome.COMPLETED, 0)
    starts = []

    def pulled(t: int, action: object) -> None:
        if isinstance(action, StartSync):
            assert action.reason is SyncReason.PERIODIC
            starts.append(t)
            p.pull_ended(t, action.peer, PullOutcome.COMPLETED, 0)

    drive(p, 20_000, pulled)
    gaps = [b - a for a, b in zip([0, *starts], starts)]
    assert len(starts) >= 16 and all(800 <= gap <= 1200 for gap in gaps)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3000), st.sampled_from(["bob", "carol"])), max_size=40))
def test_pull_backs_are_rate_limited_per_peer_and_never_dropped(requests: list[tuple[int, str]]) -> None:
    """However often requesters show more, a peer is pulled back from at
    most once per interval; every request is served by a pull-back at or
    after it."""
    interval = 1000
    p, _ = policy(ReplicationConfig(pull_back_interval_ms=interval, sync_interval_ms=10**9, tick_interval_ms=10**9))
    p.peers_changed(0, ["bob", "carol"])
    for peer in ("bob", "carol"):
        p.pull_ended(0, peer, PullOutcome.COMPLETED, 0)
    pulls: dict[str, list[int]] = {"bob": [], "carol": []}

    def pulled(t: int, action: object) -> None:
        if isinstance(action, StartSync):
            assert action.reason is SyncReason.PULL_BACK
            pulls[action.peer].append(t)
            p.pull_ended(t, action.peer, PullOutcome.COMPLETED, 0)  # over at once

    for t, peer in sorted(requests):
        drive(p, t, pulled)
        for action in p.served(t, peer, True):
            pulled(t, action)
    drive(p, 10_000, pulled)
    for peer, times in pulls.items():
        assert all(b - a >= interval for a, b in zip(times, times[1:]))
        for t, who in requests:
            if who == peer:
                assert any(pull >= t for pull in times)


# ------------------------------------------------------------------ fetching by id


def test_a_missing_parent_is_fetched_from_the_hint_then_elsewhere_then_given_up() -> None:
    config = ReplicationConfig(fetch_delay_ms=500, fetch_tries=3, tick_interval_ms=10**9, sync_interval_ms=10**9)
    p, view = policy(config)
    p.peers_changed(0, ["bob", "carol", "dave"])
    for peer in ("bob", "carol", "dave"):
        p.pull_ended(0, peer, PullOutcome.COMPLETED, 0)
    parent = b"p" * 32
    view.parked_on.add(parent)
    p.track(100, waiting(parent), Source.GOSSIP, "carol")
    assert p.next_deadline() == 600  # the grace period: gossip usually brings it
    fetches = []

    def fetched(t: int, action: object) -> None:
        if isinstance(action, FetchIds):
            fetches.append((t, action))
            p.fetch_ended(t, action.peer)

    drive(p, 10_000, fetched)
    assert [t for t, _ in fetches] == [600, 1100, 1600]
    assert fetches[0][1] == FetchIds("carol", (parent,))
    assert not p.wanted() and p.next_deadline() >= 10**8  # given up after three tries: only far timers


def test_a_wanted_id_that_arrives_or_is_no_longer_needed_is_dropped() -> None:
    p, view = policy(ReplicationConfig(fetch_delay_ms=10))
    p.peers_changed(0, ["bob"])
    p.pull_ended(0, "bob", PullOutcome.COMPLETED, 0)
    view.parked_on.update({b"a" * 32, b"b" * 32})
    p.track(0, waiting(b"a" * 32), Source.GOSSIP, "bob")
    p.track(0, waiting(b"b" * 32), Source.GOSSIP, "bob")
    p.track(0, waiting(b"b" * 32), Source.GOSSIP, "bob")  # wanted once
    view.held.add(b"a" * 32)
    view.parked_on.discard(b"b" * 32)
    assert of_type(drive(p, 100), FetchIds) == [] and not p.wanted()


def test_one_fetch_round_at_a_time_with_bounded_requests() -> None:
    config = ReplicationConfig(fetch_delay_ms=0, max_fetch_ids=2, tick_interval_ms=10**9, sync_interval_ms=10**9)
    p, view = policy(config)
    p.peers_changed(0, ["bob"])
    p.pull_ended(0, "bob", PullOutcome.COMPLETED, 0)
    ids = [bytes([i]) * 32 for i in range(5)]
    view.parked_on.update(ids)
    for entry_id in ids:
        p.track(0, waiting(entry_id), Source.SYNC, "bob")
    assert p.poll(0) == [FetchIds("bob", tuple(ids[:2]))]
    assert p.next_deadline() >= 10**8  # the round is in flight: only far timers
    p.fetch_ended(5, "bob")
    assert p.poll(5) == [FetchIds("bob", tuple(ids[2:4]))]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 7), st.sampled_from(["bob", "carol", None])),
             min_size=1, max_size=30),
    st.sets(st.integers(0, 7)),
    st.integers(0, 2**32),
)
def test_every_missing_id_is_fetched_or_given_up_after_bounded_tries(
        parked: list[tuple[int, int, str | None]], peers_hold: set[int], seed: int) -> None:
    config = ReplicationConfig(fetch_delay_ms=300, fetch_tries=3, tick_interval_ms=10**9, sync_interval_ms=10**9)
    p, view = policy(config, seed=seed)
    p.peers_changed(0, ["bob", "carol"])
    for peer in ("bob", "carol"):
        p.pull_ended(0, peer, PullOutcome.COMPLETED, 0)
    asked: dict[bytes, int] = {}
    tracked: dict[bytes, int] = {}  # an id given up on and needed again is wanted afresh

    def fetched(t: int, action: object) -> None:
        if isinstance(action, FetchIds):
            assert len(set(action.ids)) == len(action.ids) <= config.max_fetch_ids
            for entry_id in action.ids:
                asked[entry_id] = asked.get(entry_id, 0) + 1
                if entry_id[0] in peers_hold:  # the peers hold some; the rest nobody has
                    view.held.add(entry_id)
            p.fetch_ended(t, action.peer)

    for t, n, hint in sorted(parked, key=lambda item: item[0]):
        drive(p, t, fetched)
        entry_id = bytes([n]) * 32
        view.parked_on.add(entry_id)
        if not view.has_entry(entry_id):
            tracked[entry_id] = tracked.get(entry_id, 0) + (entry_id not in p.wanted())
            p.track(t, waiting(entry_id), Source.GOSSIP, hint)
    drive(p, 10**6, fetched)
    assert not p.wanted() and p.next_deadline() >= 10**8
    for entry_id, episodes in tracked.items():
        assert 1 <= asked.get(entry_id, 0) <= config.fetch_tries * episodes
        if entry_id[0] in peers_hold:
            assert view.has_entry(entry_id)


# ------------------------------------------------------------------ announcements


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 3000)), min_size=1, max_size=60),
       st.sampled_from([1, 3, 64]), st.integers(1, 20))
def test_batching_never_loses_reorders_or_outpaces_announcements(
        commits: list[tuple[int, int]], batch: int, burst: int) -> None:
    rate = 4.0
    config = ReplicationConfig(announce_batch=batch, announce_rate=rate, announce_burst=float(burst),
                               tick_interval_ms=10**9, sync_interval_ms=10**9)
    p, _ = policy(config)
    expected: list[bytes] = []
    published: list[tuple[int, Publish]] = []
    serial = 0
    for count, t in sorted(commits, key=lambda item: item[1]):
        published += of_type(drive(p, t), Publish)  # type: ignore[arg-type]
        wires = [b"w%05d" % (serial + i) + bytes(i % 7) for i in range(count)]
        serial += count
        expected += wires
        p.stage([FakeEntry(w, 0) for w in wires], Source.LOCAL)
        p.committed(t, 0)
    published += of_type(drive(p, 10**7), Publish)  # type: ignore[arg-type]
    assert [w for _, action in published for w in decode_announcement(action.data)] == expected
    assert all(len(decode_announcement(a.data)) <= batch for _, a in published)
    assert sum(a.entries for _, a in published) == len(expected)
    times = [t for t, _ in published]
    for i, start in enumerate(times):  # token bucket: never more than burst + rate * elapsed
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rate * (times[j] - start) / 1000 + 1e-9
    assert p.idle()


# ------------------------------------------------------------------ timers and the rest


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["gossip", "peer", "wait", "serve", "end"]),
                          st.sampled_from(["bob", "carol", "dave"])), max_size=40),
       st.integers(0, 2**32))
def test_deadlines_move_forward_under_any_events(events: list[tuple[int, str, str]], seed: int) -> None:
    """Whatever happens, a poll at the deadline leaves the next one later
    (``drive`` checks it), and the clock the edge follows never goes back."""
    p, view = policy(ReplicationConfig(commit_interval_ms=20, fetch_delay_ms=100), seed=seed)
    peers: list[str] = []
    last = 0

    def react(deadline: int, action: object) -> None:
        nonlocal last
        assert deadline >= last
        last = deadline
        if isinstance(action, Commit):
            view.uncommitted = 0
            p.committed(deadline, START_MS)
        elif isinstance(action, FetchIds):
            p.fetch_ended(deadline, action.peer)
        elif isinstance(action, StartSync):
            p.pull_ended(deadline, action.peer, PullOutcome.COMPLETED, 0)

    for t, kind, peer in sorted(events, key=lambda item: item[0]):
        drive(p, t, react, now=last)
        last = max(last, t)
        if kind == "gossip":
            view.uncommitted += 1
            p.track(t, applied(FakeEntry(bytes([t % 256]), START_MS)), Source.GOSSIP, peer)
            p.staged(t, Source.GOSSIP)
        elif kind == "peer":
            peers = sorted({*peers, peer})
            p.peers_changed(t, peers)
        elif kind == "wait":
            view.parked_on.add(peer.encode())
            p.track(t, waiting(peer.encode()), Source.GOSSIP, peer)
        elif kind == "serve":
            p.served(t, peer, True)
        elif kind == "end":
            p.pull_ended(t, peer, PullOutcome.COMPLETED, 1)
    assert all(isinstance(a, (Commit, Publish, StartSync, FetchIds, Tick))
               for _, a in drive(p, 10**6, react, now=last))


def test_serving_admits_two_per_peer_and_a_total() -> None:
    p, _ = policy(ReplicationConfig(max_serving=3))
    assert [p.admit("bob") for _ in range(3)] == [Admission.SERVE, Admission.SERVE, Admission.BUSY]
    assert p.admit("carol") is Admission.SERVE
    assert p.admit("dave") is Admission.BUSY  # three in all
    p.serve_ended("bob")
    assert p.admit("dave") is Admission.SERVE


def test_follow_up_walks_back_without_asking_twice_and_stops() -> None:
    p, view = policy(ReplicationConfig(max_follow_up_rounds=2, max_fetch_ids=2))
    follow = p.follow_up()
    view.held.add(b"held")
    assert follow.next_batches([b"a", b"b", b"held", b"c", b"a"]) == [(b"a", b"b"), (b"c",)]
    assert follow.next_batches([b"a"]) == []  # asked already
    assert follow.next_batches([b"d"]) == [(b"d",)]
    assert follow.next_batches([b"e"]) == []  # two rounds


def test_ticks_run_on_their_interval() -> None:
    p, _ = policy(ReplicationConfig(tick_interval_ms=1000, sync_interval_ms=10**9))
    assert [t for t, _ in of_type(drive(p, 3500), Tick)] == [1000, 2000, 3000]


def test_fetch_batches_dedupe_and_split() -> None:
    assert fetch_batches([b"a", b"b", b"a", b"c"], 2) == [(b"a", b"b"), (b"c",)]


@pytest.mark.parametrize("bad", [dict(sync_interval_ms=0), dict(sync_jitter=1.0), dict(announce_rate=0),
                                 dict(max_fetch_ids=5000), dict(fetch_delay_ms=-1)])
def test_a_bad_config_is_refused(bad: dict) -> None:
    with pytest.raises(ConfigError):
        ReplicationConfig(**bad)

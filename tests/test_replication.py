"""Ledger replication between real libp2p hosts on 127.0.0.1.

Every wait is on a condition with a generous deadline (the suite must hold
on a loaded 2-core machine). Where a test claims that something does *not*
happen, it first waits for a later event that proves the pipeline ran, then
watches for a bounded window: an observation period, never a synchronisation.
Periodic sync is switched off (``sync_interval_s`` of an hour) wherever a test
must prove that gossip, or the sync on connect, did the work.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from p2pgpu.core.codec import Tag, sign_object
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.kv import MemoryStore
from p2pgpu.core.ledger import SEND, ApplyResult, Entry, Ledger, decode_entry
from p2pgpu.core.protocols import LEDGER_SYNC_PROTOCOL
from p2pgpu.core.sync import (
    End,
    Entries,
    Heads,
    SyncError,
    SyncTimeout,
    UnexpectedMessage,
    encode_announcement,
    encode_message,
)
from p2pgpu.errors import BadSignature, InsufficientFunds, MalformedInput, Oversized, P2PGPUError, Truncated
from p2pgpu.net import FrameStream, GossipConfig, P2PHost, StreamAborted, open_host
from p2pgpu.replication import LedgerReplicator
from p2pgpu.store import LevelDBStore
from p2pgpu.testing.ledger import NAMES, START_MS, LedgerSim, key_for, make_genesis
from p2pgpu.testing.waiting import wait_until

DEADLINE = 30  # seconds for anything that should take well under one
NAMES6 = (*NAMES, "mallory")
GENESIS = make_genesis(NAMES6)
NET = GENESIS.network_id
HOUR = 3600.0


def now_ms() -> int:
    return int(time.time() * 1000)




@dataclass
class Node:
    name: str
    host: P2PHost
    ledger: Ledger
    rep: LedgerReplicator
    applied: list[Entry] = field(default_factory=list)

    @property
    def addr(self) -> str:
        return self.host.listen_addrs()[0]


class Network:
    """Nodes, each a host + ledger + running replicator, all closed on exit.

    Exit order matters: each replicator is stopped through its own cancel
    scope before its host closes. Cancelling the whole nursery first would
    turn a failing assertion in the test body into a Cancelled that the
    nursery then swallows: the test would pass.
    """

    def __init__(self, stack: AsyncExitStack, nursery: trio.Nursery, tmp: Path | None) -> None:
        self._stack, self._nursery, self._tmp = stack, nursery, tmp
        self.nodes: list[Node] = []

    async def add(self, name: str, ledger: Ledger | None = None, run: bool = True, **options) -> Node:
        if ledger is None:
            store = MemoryStore() if self._tmp is None else LevelDBStore(self._tmp / name)
            ledger = Ledger(store, GENESIS)
            if self._tmp is not None:
                self._stack.callback(store.close)
        host = await self._stack.enter_async_context(open_host(NodeKey.generate(), gossip=GossipConfig()))
        options.setdefault("sync_interval_s", HOUR)
        node = Node(name, host, ledger, None)  # type: ignore[arg-type]
        node.rep = LedgerReplicator(host, ledger, network_id=NET, now_ms=now_ms,
                                    on_applied=node.applied.extend, **options)
        self._stack.callback(node.rep.close)
        if run:
            scope = trio.CancelScope()
            stopped = trio.Event()

            async def run_node(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                try:
                    with scope:
                        await node.rep.run(task_status=task_status)
                finally:
                    stopped.set()

            async def stop() -> None:
                scope.cancel()
                await stopped.wait()

            await self._nursery.start(run_node)
            self._stack.push_async_callback(stop)
        self.nodes.append(node)
        return node

    async def host(self, **options) -> P2PHost:
        """A bare host (no replicator) for hostile peers."""
        return await self._stack.enter_async_context(open_host(NodeKey.generate(), **options))


@asynccontextmanager
async def network(tmp: Path | None = None) -> AsyncIterator[Network]:
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        yield Network(stack, nursery, tmp)


async def connect_line(nodes: list[Node]) -> None:
    for left, right in zip(nodes, nodes[1:]):
        await left.host.connect(right.addr)


async def wait_for_mesh(nodes: list[Node], pairs: list[tuple[int, int]]) -> None:
    """Both ends of every link have each other in their ledger-topic mesh."""
    topic = nodes[0].rep.topic

    def meshed() -> bool:
        return all(nodes[j].host.peer_id in nodes[i].host.mesh_peers(topic)
                   and nodes[i].host.peer_id in nodes[j].host.mesh_peers(topic) for i, j in pairs)

    await wait_until(meshed)


async def wait_synced_on_connect(nodes: list[Node]) -> None:
    """Every node finished (or failed, with a bare host) its sync with each
    peer it connected to."""

    def done(n: Node) -> bool:
        stats = n.rep.stats()
        return stats["sync_sessions"] + stats["sync_failed"] >= len(n.host.peers())

    await wait_until(lambda: all(done(n) for n in nodes))


def same_state(nodes: list[Node]) -> bool:
    return len({n.ledger.state_hash() for n in nodes}) == 1


def signed_send(name: str, seq: int, prev: bytes, to: str, amount: int, ts: int, memo: str = "",
                network_id: bytes = NET) -> bytes:
    key = key_for(name)
    return sign_object(key, Tag.ENTRY, network_id, ts, [seq, prev, SEND, [key_for(to).public_key, amount, memo]]).wire


# ------------------------------------------------------------------ gossip


async def test_an_appended_entry_reaches_every_node_of_a_five_node_line(tmp_path: Path) -> None:
    async with network(tmp_path) as net:
        nodes = [await net.add(name) for name in NAMES]
        await connect_line(nodes)
        await wait_for_mesh(nodes, [(i, i + 1) for i in range(4)])
        await wait_synced_on_connect(nodes)
        alice, bob, erin = key_for("alice"), key_for("bob"), nodes[4]

        (send,) = await nodes[0].rep.append(lambda l: l.send(alice, bob.public_key, 250, now_ms(), memo="hi"))
        await wait_until(lambda: all(n.ledger.has_entry(send.id) for n in nodes))
        # bob's node takes it in; the RECEIVE travels the other way.
        received = await nodes[1].rep.append(lambda l: l.receive_all(bob, now_ms()))
        assert len(received) == 1
        await wait_until(lambda: all(len(n.applied) == 2 for n in nodes[2:]) and same_state(nodes))

        assert erin.ledger.account(bob.public_key).balance == 1250
        assert [e.id for e in erin.applied] == [send.id, received[0].id]  # acknowledged, in order
        assert nodes[0].rep.stats()["announced_entries"] == 1
        assert all(n.rep.stats()["applied_gossip"] == 2 for n in nodes[2:])  # by gossip, not sync
        assert all(n.rep.stats()["rejected"] == 0 for n in nodes)


async def test_a_refused_append_raises_the_ledgers_error_and_changes_nothing() -> None:
    async with network() as net:
        node = await net.add("alice")
        before = node.ledger.state_hash()
        with pytest.raises(InsufficientFunds):
            await node.rep.append(lambda l: l.send(key_for("alice"), key_for("bob").public_key, 10**9, now_ms()))
        assert node.ledger.state_hash() == before
        assert node.rep.stats()["announced_entries"] == 0 and node.applied == []


async def test_forged_garbage_and_foreign_announcements_are_not_forwarded() -> None:
    """mallory - bob - carol: mallory's raw host publishes whatever it likes;
    bob's validator must stop everything invalid, so carol never sees it."""
    other_network = make_genesis(NAMES6, name="othernet").network_id
    genuine = signed_send("alice", 1, b"", "bob", 5, START_MS, memo="marker")
    waiting = signed_send("alice", 9, b"\x07" * 32, "bob", 5, START_MS + 1)  # parent unknown: waits
    forged = key_for("mallory")  # signs payloads that name alice: the signatures do not verify
    alice_payload = sign_object(key_for("alice"), Tag.ENTRY, NET, START_MS, [1, b"", SEND,
                                [key_for("mallory").public_key, 900, "steal"]])
    forgery = encode_announcement([alice_payload.wire[:-64] + forged.sign(alice_payload.payload)])
    forged_waiting = sign_object(key_for("alice"), Tag.ENTRY, NET, START_MS, [7, b"\x08" * 32, SEND,
                                 [key_for("mallory").public_key, 1, ""]])
    bad_messages = [
        b"\x00garbage",
        encode_announcement([b"not an entry"]),
        forgery,
        encode_announcement([forged_waiting.wire[:-64] + forged.sign(forged_waiting.payload)]),
        encode_announcement([signed_send("alice", 1, b"", "bob", 5, START_MS, network_id=other_network)]),
        encode_announcement([genuine, b"\x93\x01\x02\x03"]),  # one bad entry spoils the message
    ]
    async with network() as net:
        bob, carol = await net.add("bob"), await net.add("carol")
        topic = bob.rep.topic
        mallory = await net.host(gossip=GossipConfig())
        seen_by_mallory = await mallory.subscribe(topic)
        await mallory.connect(bob.addr)
        await bob.host.connect(carol.addr)
        topic_mesh = lambda: (mallory.peer_id in bob.host.mesh_peers(topic)  # noqa: E731
                              and bob.host.peer_id in mallory.mesh_peers(topic)
                              and carol.host.peer_id in bob.host.mesh_peers(topic))
        await wait_until(topic_mesh)
        await wait_synced_on_connect([bob, carol])
        reference = Ledger(MemoryStore(), GENESIS)
        before = bob.ledger.state_hash()
        assert before == reference.state_hash()

        for data in bad_messages:
            await mallory.publish(topic, data)
        await mallory.publish(topic, encode_announcement([waiting]))  # valid to forward, though it waits
        await mallory.publish(topic, encode_announcement([genuine]))
        await wait_until(lambda: carol.rep.stats()["gossip_messages"] >= 2)
        await trio.sleep(1.5)  # negative claim: watch a heartbeat or so for stragglers

        assert bob.rep.stats()["gossip_rejected"] == len(bad_messages)
        assert carol.rep.stats()["gossip_rejected"] == 0  # nothing bad ever reached carol
        assert carol.rep.stats()["gossip_messages"] == 2
        reference.offer(genuine, now_ms())
        reference.commit()
        assert bob.ledger.state_hash() == carol.ledger.state_hash() == reference.state_hash()
        assert len(bob.ledger.unchecked) == len(carol.ledger.unchecked) == 1  # the waiting one
        await seen_by_mallory.aclose()


# ------------------------------------------------------------------ forks


async def test_a_double_spend_is_flagged_on_every_node(tmp_path: Path) -> None:
    mallory = key_for("mallory").public_key
    to_alice = signed_send("mallory", 1, b"", "alice", 600, now_ms(), memo="pay alice")
    to_bob = signed_send("mallory", 1, b"", "bob", 600, now_ms(), memo="pay bob")
    async with network(tmp_path) as net:
        nodes = [await net.add(name) for name in NAMES]
        await connect_line(nodes)
        await wait_for_mesh(nodes, [(i, i + 1) for i in range(4)])
        await wait_synced_on_connect(nodes)
        async with trio.open_nursery() as both:  # one to each end, at the same time
            both.start_soon(nodes[0].rep.offer, [to_alice])
            both.start_soon(nodes[4].rep.offer, [to_bob])
        await wait_until(lambda: all(n.ledger.frozen().get(mallory) == "fork" for n in nodes) and same_state(nodes))
        for node in nodes:
            assert node.rep.stats()["forks_seen"] == 1
            total, minted = node.ledger.conservation()
            assert total == minted
            assert node.ledger.account(mallory).balance == -200  # the fork loss shows


async def test_a_node_that_detects_a_fork_announces_the_proof() -> None:
    """alice - bob - carol. carol alone holds one branch (it never travelled:
    periodic sync is off and the connection syncs are over). The other branch
    is announced at alice; carol detects the fork on delivery and must
    announce both entries, so bob and alice learn of the fork by gossip."""
    mallory = key_for("mallory").public_key
    first = signed_send("mallory", 1, b"", "alice", 700, now_ms(), memo="first")
    second = signed_send("mallory", 1, b"", "carol", 700, now_ms(), memo="second")
    async with network() as net:
        nodes = [await net.add(name) for name in ("alice", "bob", "carol")]
        alice, bob, carol = nodes
        await connect_line(nodes)
        await wait_for_mesh(nodes, [(0, 1), (1, 2)])
        await wait_synced_on_connect(nodes)
        assert carol.ledger.offer(second, now_ms()).status == "applied"  # silently
        carol.ledger.commit()

        await alice.rep.offer([first])
        await wait_until(lambda: all(n.ledger.frozen().get(mallory) == "fork" for n in nodes) and same_state(nodes))
        assert carol.rep.stats()["fork_proofs_announced"] == 1
        assert alice.ledger.has_entry(decode_entry(second, NET).id)
        assert all(n.rep.stats()["sync_sessions"] == len(n.host.peers()) for n in nodes)  # no sync did it


# ------------------------------------------------------------------ anti-entropy


def simulated_history(min_entries: int = 300) -> LedgerSim:
    import random

    rng = random.Random(3)
    sim = LedgerSim(genesis=GENESIS)
    while len(sim.wires) < min_entries:
        sim.step((rng.randint(0, 6), rng.randint(0, 5), rng.randint(0, 5), rng.randint(1, 300), rng.randint(0, 3)))
    sim.world.commit()
    return sim


async def test_a_late_node_catches_up_by_sync_and_verifies_everything(tmp_path: Path) -> None:
    sim = simulated_history(320)
    async with network(tmp_path) as net:
        origin = await net.add("alice", ledger=sim.world)
        others = [await net.add(name) for name in ("bob", "carol")]
        await connect_line([origin, *others])
        await wait_until(lambda: same_state([origin, *others]))
        late = await net.add("dave")
        await late.host.connect(others[-1].addr)  # only to the far end of the line
        await wait_until(lambda: late.rep.stats()["applied_sync"] == len(sim.wires))
        assert same_state([origin, *others, late])
        stats = late.rep.stats()
        assert stats["applied_sync"] == len(sim.wires) and stats["rejected"] == 0
        assert stats["unchecked"] == 0
        assert late.ledger.heads() == sim.world.heads()
        assert late.rep.stats()["announced_entries"] == 0  # old entries are not re-gossiped


async def test_sync_with_reports_and_a_second_sync_moves_nothing() -> None:
    sim = simulated_history(300)
    async with network() as net:
        source = await net.add("alice", ledger=sim.world)
        fresh = await net.add("bob", run=False)
        await fresh.host.connect(source.addr)
        stats = await fresh.rep.sync_with(source.host.peer_id)
        assert stats.applied == stats.received == len(sim.wires) and stats.rejected == 0
        assert stats.sessions >= 1 and stats.seconds > 0 and not stats.truncated
        assert fresh.ledger.state_hash() == sim.world.state_hash()
        again = await fresh.rep.sync_with(source.host.peer_id)
        assert again.applied == 0 and again.received == 0


async def test_a_partition_heals_and_every_node_converges() -> None:
    async with network() as net:
        nodes = [await net.add(name) for name in ("alice", "bob", "carol", "dave")]
        a, b, c, d = nodes
        await connect_line(nodes)
        await wait_for_mesh(nodes, [(0, 1), (1, 2), (2, 3)])
        await wait_synced_on_connect(nodes)
        await b.host.disconnect(c.host.peer_id)
        await wait_until(lambda: c.host.peer_id not in b.host.peers() and b.host.peer_id not in c.host.peers())

        west = await a.rep.append(lambda l: l.send(key_for("alice"), key_for("dave").public_key, 10, now_ms()))
        east = await d.rep.append(lambda l: l.send(key_for("dave"), key_for("alice").public_key, 20, now_ms()))
        await wait_until(lambda: b.ledger.has_entry(west[0].id) and c.ledger.has_entry(east[0].id))
        assert not c.ledger.has_entry(west[0].id) and not b.ledger.has_entry(east[0].id)

        await b.host.connect(c.addr)  # heal: b and c sync on connect...
        # ...and a and d, which took no part in it, learn the other side's
        # entries from b's and c's re-announcements or pull-back (or from
        # gossipsub's own IHAVE/IWANT, which retries recent messages).
        await wait_until(lambda: all(n.ledger.has_entry(e[0].id) for n in nodes for e in (west, east))
                         and same_state(nodes))
        assert all(n.rep.stats()["rejected"] == 0 for n in nodes)


async def test_an_entry_waiting_for_its_parent_fetches_it_by_id() -> None:
    """bob gets a RECEIVE by gossip whose SEND only alice's node holds (never
    announced): after a grace period it fetches the SEND from the origin."""
    async with network() as net:
        a, b = await net.add("alice", fetch_delay_s=0.2), await net.add("bob", fetch_delay_s=0.2)
        await a.host.connect(b.addr)
        await wait_for_mesh([a, b], [(0, 1)])
        await wait_synced_on_connect([a, b])
        send = a.ledger.send(key_for("carol"), key_for("dave").public_key, 7, now_ms())  # silently
        a.ledger.commit()
        (receive,) = await a.rep.append(lambda l: l.receive(key_for("dave"), send.id, now_ms()))
        # acknowledged, not just applied: a fetch applies as it reads and
        # counts and commits when the fetch ends
        await wait_until(lambda: any(e.id == receive.id for e in b.applied) and same_state([a, b]))
        assert b.rep.stats()["fetched"] >= 1
        assert b.rep.stats()["sync_sessions"] == 1  # the connection's only


# ------------------------------------------------------------------ offers


def tampered(wire: bytes) -> bytes:
    """The same entry (same payload, so the same id) with a signature that does not verify."""
    return wire[:-64] + bytes(64)


def bob_chain(count: int) -> list[bytes]:
    """bob's first ``count`` entries, small SENDs to carol, each naming the one before."""
    wires, prev = [], b""
    for seq in range(1, count + 1):
        wires.append(signed_send("bob", seq, prev, "carol", 1, now_ms()))
        prev = decode_entry(wires[-1], NET).id
    return wires


async def test_an_offered_entry_we_hold_is_a_duplicate_whatever_its_signature(tmp_path: Path) -> None:
    """``offer`` checks the signatures of the entries it does not hold only:
    one we hold, with its signature bytes altered, is a duplicate that
    changes nothing (the stored wire stays the valid one), while an unknown
    entry with a bad signature is still refused. Verdicts stay in line with
    their entries, with the thread pool (over 4 to check) or without."""
    async with network(tmp_path) as net:
        node = await net.add("alice")
        (send,) = await node.rep.append(lambda l: l.send(key_for("alice"), key_for("bob").public_key, 5, now_ms()))
        before = node.ledger.state_hash()
        [again] = await node.rep.offer([tampered(send.wire)])
        assert isinstance(again, ApplyResult) and again.status == "duplicate" and again.entry_id == send.id
        assert node.ledger.state_hash() == before and node.ledger.get_wire(send.id) == send.wire
        assert node.ledger.uncommitted == 0 and len(node.ledger.unchecked) == 0

        first, *rest = bob_chain(6)
        [forged] = await node.rep.offer([tampered(first)])
        assert isinstance(forged, BadSignature)
        assert node.ledger.state_hash() == before and not node.ledger.has_entry(decode_entry(first, NET).id)

        batches = [
            ([b"garbage", tampered(send.wire), tampered(first), first],  # two to check: inline
             [MalformedInput, "duplicate", BadSignature, "applied"]),
            ([tampered(send.wire), tampered(first), *rest],  # five to check: the thread pool
             ["duplicate", "duplicate", *["applied"] * len(rest)]),
        ]
        for batch, expected in batches:
            results = await node.rep.offer(batch)
            assert [r.status if isinstance(r, ApplyResult) else type(r) for r in results] == expected
        assert node.ledger.head(key_for("bob").public_key)[0] == 6
        assert all(node.ledger.get_wire(decode_entry(w, NET).id) == w for w in [send.wire, first, *rest])
        assert node.rep.stats()["rejected"] == 3 and node.rep.stats()["applied_offered"] == 6


async def test_an_offer_that_need_not_be_durable_waits_for_the_group_commit(tmp_path: Path) -> None:
    async with network(tmp_path) as net:
        node = await net.add("alice")
        durable, lazy = bob_chain(2)
        [result] = await node.rep.offer([durable])
        assert result.status == "applied" and node.ledger.uncommitted == 0  # committed before it returned
        assert len(node.applied) == 1

        [result] = await node.rep.offer([lazy], durable=False)
        assert result.status == "applied" and node.ledger.has_entry(result.entry_id)
        assert node.ledger.uncommitted > 0 and len(node.applied) == 1  # applied, not yet acknowledged
        [again] = await node.rep.offer([tampered(lazy)], durable=False)  # held, if not yet durably
        assert again.status == "duplicate" and node.ledger.uncommitted > 0
        await wait_until(lambda: node.ledger.uncommitted == 0, DEADLINE, what="the group commit")
        assert [e.id for e in node.applied] == [decode_entry(w, NET).id for w in (durable, lazy)]
        assert node.rep.stats()["applied_offered"] == 2


# ------------------------------------------------------------------ misbehaving peers


async def _read_request(stream: FrameStream) -> None:
    while True:
        frame = await stream.receive_frame()
        if frame is None:
            return
        # stop after the last HEADS frame (more=False) or a FETCH
        if frame[1:2] != b"\x01" or frame[2:3] == b"\xc2":
            return


def _valid_wire() -> bytes:
    return signed_send("alice", 1, b"", "bob", 5, START_MS)


HOSTILE_SERVERS: list[tuple[str, list[bytes], type[P2PGPUError]]] = [
    ("garbage frame", [b"\xc1\xc1 not msgpack"], MalformedInput),
    ("unknown message type", [b"\x92\x09\x90"], MalformedInput),
    ("heads instead of entries", [encode_message(Heads((), False))], UnexpectedMessage),
    ("forged entry", [encode_message(Entries((_valid_wire()[:-64] + b"\x00" * 64,)))], SyncError),
    ("entry of another network",
     [encode_message(Entries((signed_send("alice", 1, b"", "bob", 5, START_MS,
                                          network_id=make_genesis(NAMES6, name="x").network_id),)))], SyncError),
    ("end with the wrong count", [encode_message(End(5, False))], UnexpectedMessage),
]


async def test_a_hostile_sync_server_is_reset_and_changes_nothing() -> None:
    async with network() as net:
        victim = await net.add("alice", run=False, frame_timeout_s=1.0)
        honest = await net.add("bob", ledger=simulated_history(60).world)
        evil = await net.host(max_frame=4 << 20)
        script: list[bytes] = []
        saw: list[str] = []

        async def hostile(stream: FrameStream) -> None:
            await _read_request(stream)
            try:
                for frame in script:
                    await stream.send_frame(frame)
                with trio.fail_after(DEADLINE):
                    while await stream.receive_frame() is not None:
                        pass
                saw.append("clean close")
            except StreamAborted:
                saw.append("reset")

        evil.set_stream_handler(LEDGER_SYNC_PROTOCOL, hostile)
        await victim.host.connect(evil.listen_addrs()[0])
        await victim.host.connect(honest.addr)
        before = victim.ledger.state_hash()
        cases = [*HOSTILE_SERVERS, ("oversized frame", [b"\x00" * (2 << 20)], Oversized)]
        for name, frames, error in cases:
            script[:] = frames
            with pytest.raises(error):
                await victim.rep.sync_with(evil.peer_id)
            assert victim.ledger.state_hash() == before, name
            assert len(victim.ledger.unchecked) == 0, name
        await wait_until(lambda: len(saw) == len(cases))
        assert saw == ["reset"] * len(cases)

        # A server that hangs up before END, and one that never answers:
        # typed errors too, and the node still syncs with an honest peer.
        async def hang_up(stream: FrameStream) -> None:
            await _read_request(stream)  # ...and returns: the stream closes before END

        async def silent(stream: FrameStream) -> None:
            await trio.sleep(DEADLINE)

        evil.set_stream_handler(LEDGER_SYNC_PROTOCOL, hang_up)
        with pytest.raises(Truncated):
            await victim.rep.sync_with(evil.peer_id)
        evil.set_stream_handler(LEDGER_SYNC_PROTOCOL, silent)
        with pytest.raises(SyncTimeout):
            await victim.rep.sync_with(evil.peer_id)
        assert victim.ledger.state_hash() == before
        stats = await victim.rep.sync_with(honest.host.peer_id)
        assert stats.applied > 0 and victim.ledger.state_hash() == honest.ledger.state_hash()


async def test_a_hostile_sync_client_is_reset_and_the_server_keeps_serving() -> None:
    async with network() as net:
        server = await net.add("alice", ledger=simulated_history(40).world, frame_timeout_s=1.0)
        evil = await net.host()
        await evil.connect(server.addr)
        requests = [
            [b"\xc1 garbage"],
            [encode_message(Entries((_valid_wire(),)))],
            [encode_message(Heads((), True))] * 70,  # more than max_request_frames
            [encode_message(Heads((), True))],  # never finishes: times out
        ]
        for frames in requests:
            stream = await evil.open_stream(server.host.peer_id, LEDGER_SYNC_PROTOCOL)
            with pytest.raises((P2PGPUError, trio.BrokenResourceError, trio.ClosedResourceError)):
                with trio.fail_after(DEADLINE):
                    for frame in frames:
                        await stream.send_frame(frame)
                    while True:  # the server may say why (an ERROR frame) before it resets
                        reply = await stream.receive_frame()
                        if reply is None:
                            break
                    raise AssertionError("the server closed cleanly instead of resetting")
            await stream.reset()
        await wait_until(lambda: server.rep.stats()["serve_failed"] == len(requests))
        # ...and still serves an honest peer.
        fresh = await net.add("bob", run=False)
        await fresh.host.connect(server.addr)
        stats = await fresh.rep.sync_with(server.host.peer_id)
        assert stats.applied > 0 and fresh.ledger.state_hash() == server.ledger.state_hash()


async def test_the_catch_up_benchmark_runs_against_a_server_process() -> None:
    from p2pgpu.testing.sync_bench import measure_catch_up

    result = await measure_catch_up(300)
    assert result["state_hash_equal"] is True
    assert result["applied"] == result["entries"] == 300 and result["server"] == "separate process"
    assert result["entries_per_s"] > 0

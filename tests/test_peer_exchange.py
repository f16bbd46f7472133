"""Peer exchange: the codec refuses every malformed message, and three real
hosts that only know a hub end up connected to each other."""

from __future__ import annotations

import random

import pytest
import trio

from p2pgpu.core.identity import NodeKey
from p2pgpu.core.peerex import choose_dials, decode_reply, decode_request, encode_reply, encode_request
from p2pgpu.core.codec import pack
from p2pgpu.errors import MalformedInput, P2PGPUError
from p2pgpu.net import GossipConfig, open_host
from p2pgpu.net.peer_exchange import PeerExchange

A = NodeKey(b"a" * 32).peer_id
ADDR = "/ip4/127.0.0.1/tcp/4001"


def test_round_trips():
    assert decode_request(encode_request([ADDR, f"{ADDR}/p2p/{A}"])) == [ADDR, f"{ADDR}/p2p/{A}"]
    assert decode_reply(encode_reply([(A, [ADDR])])) == [(A, [ADDR])]


@pytest.mark.parametrize(
    "data",
    [
        b"", b"\xc1", pack([2, []]), pack([1]), pack([1, "x"]), pack([1, ["/dns4/evil/tcp/1"]]),
        pack([1, ["/ip4/1.2.3.4/udp/1"]]), pack([1, ["/ip4/" + "1" * 300 + "/tcp/1"]]), pack([1, [ADDR] * 9]),
    ],
)
def test_bad_requests_are_refused(data):
    with pytest.raises(MalformedInput):
        decode_request(data)


@pytest.mark.parametrize(
    "data",
    [pack([1, [["not-a-peer-id", [ADDR]]]]), pack([1, [[A, [ADDR] * 5]]]), pack([1, [[A, [ADDR]]] * 33]), pack([1, [[A]]])],
)
def test_bad_replies_are_refused(data):
    with pytest.raises(P2PGPUError):
        decode_reply(data)


def test_choose_dials_skips_self_and_connected():
    b, c = NodeKey(b"b" * 32).peer_id, NodeKey(b"c" * 32).peer_id
    offered = [(A, [ADDR]), (b, [ADDR]), (c, [])]
    assert choose_dials(offered, connected={b}, self_id="me", want=5, rng=random.Random(1)) == [(A, [ADDR])]
    assert choose_dials(offered, connected=set(), self_id=A, want=0, rng=random.Random(1)) == []


async def test_leaves_of_a_hub_find_each_other():
    keys = [NodeKey(bytes([i + 1]) * 32) for i in range(4)]
    async with open_host(keys[0], ["/ip4/127.0.0.1/tcp/0"], gossip=GossipConfig()) as hub, trio.open_nursery() as nursery:
        await nursery.start(PeerExchange(hub, target=3, interval_s=0.1).run)
        hub_addr = next(a for a in hub.listen_addrs() if "127.0.0.1" in a)
        leaves = []
        for key in keys[1:]:
            leaf = await nursery.start(_leaf, key, hub_addr)
            leaves.append(leaf)
        with trio.fail_after(30):
            while not all(len(leaf.peers()) >= 3 for leaf in leaves):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def _leaf(key, hub_addr, *, task_status=trio.TASK_STATUS_IGNORED):
    async with open_host(key, ["/ip4/127.0.0.1/tcp/0"], gossip=GossipConfig()) as host, trio.open_nursery() as nursery:
        await host.connect(hub_addr)
        await nursery.start(PeerExchange(host, target=3, interval_s=0.1).run)
        task_status.started(host)
        await trio.sleep_forever()

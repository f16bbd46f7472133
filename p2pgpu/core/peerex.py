"""Peer exchange: how a node finds more peers than its bootstrap list.

Gossipsub needs every node to hold several connections: a node attached only
to a busy hub is pruned from the hub's mesh and starves (libp2p probe,
pitfall 6). On ``/p2pgpu/peers/1.0.0`` a node sends its own listen addresses
and gets back the advertised addresses of the answering peer's other
connected peers; it dials some until it holds its target number of
connections.

Addresses are hints, never trust: a dial to a peer id succeeds only if noise
authenticates that id, so a peer lying about addresses wastes a dial at most.

Messages (msgpack, one frame each way):
    request  = [1, [listen multiaddr, ...]]                     at most 8 addrs
    reply    = [1, [[peer id, [multiaddr, ...]], ...]]          at most 32 peers, 4 addrs each
Multiaddrs are strings of at most 256 ASCII characters starting with "/ip4/"
or "/ip6/" and containing "/tcp/".
"""

from __future__ import annotations

import random
from typing import Iterable

from p2pgpu.core.codec import check_list, check_str, pack, unpack
from p2pgpu.core.identity import public_key_from_peer_id
from p2pgpu.errors import MalformedInput

VERSION = 1
MAX_OWN_ADDRS = 8
MAX_PEERS = 32
MAX_PEER_ADDRS = 4
MAX_ADDR = 256
MAX_MESSAGE = 32 * 1024


def _check_addr(value: object, name: str) -> str:
    addr = check_str(value, name, MAX_ADDR)
    if not addr.isascii() or not addr.startswith(("/ip4/", "/ip6/")) or "/tcp/" not in addr:
        raise MalformedInput(f"{name}: not a TCP multiaddr: {addr[:60]!r}")
    return addr


def encode_request(own_addrs: Iterable[str]) -> bytes:
    return pack([VERSION, [_check_addr(a, "own address") for a in list(own_addrs)[:MAX_OWN_ADDRS]]])


def decode_request(data: bytes) -> list[str]:
    message = check_list(unpack(data, max_size=MAX_MESSAGE, what="peer request"), "peer request", length=2)
    if message[0] != VERSION:
        raise MalformedInput(f"peer request: unknown version {message[0]!r}")
    addrs = check_list(message[1], "addresses", max_len=MAX_OWN_ADDRS)
    return [_check_addr(a, "address") for a in addrs]


def encode_reply(peers: Iterable[tuple[str, Iterable[str]]]) -> bytes:
    items = [[peer_id, list(addrs)[:MAX_PEER_ADDRS]] for peer_id, addrs in list(peers)[:MAX_PEERS]]
    return pack([VERSION, items])


def decode_reply(data: bytes) -> list[tuple[str, list[str]]]:
    """Peers with their addresses; entries with a bad peer id or no usable
    address are refused as a whole (the peer broke the protocol)."""
    message = check_list(unpack(data, max_size=MAX_MESSAGE, what="peer reply"), "peer reply", length=2)
    if message[0] != VERSION:
        raise MalformedInput(f"peer reply: unknown version {message[0]!r}")
    out = []
    for item in check_list(message[1], "peers", max_len=MAX_PEERS):
        peer_id, addrs = check_list(item, "peer", length=2)
        public_key_from_peer_id(check_str(peer_id, "peer id", 128))
        addrs = [_check_addr(a, "address") for a in check_list(addrs, "addresses", max_len=MAX_PEER_ADDRS)]
        out.append((peer_id, addrs))
    return out


def choose_dials(
    offered: Iterable[tuple[str, list[str]]], connected: set[str], self_id: str, want: int, rng: random.Random
) -> list[tuple[str, list[str]]]:
    """Up to ``want`` offered peers we are not connected to, in random order
    (so that many nodes asking one hub spread over different peers)."""
    fresh = [(pid, addrs) for pid, addrs in offered if pid != self_id and pid not in connected and addrs]
    rng.shuffle(fresh)
    return fresh[: max(0, want)]

"""Peer exchange over ``/p2pgpu/peers/1.0.0`` (messages in ``p2pgpu.core.peerex``).

Every node serves the protocol and, while it holds fewer than ``target``
connections, asks a random connected peer for more every ``interval_s`` and
dials a few of the answers. Asking also tells the answering peer our own
listen addresses, which is how a node that only ever dialled its bootstrap
peer becomes known to everyone else.
"""

from __future__ import annotations

import logging
import random

import trio

from p2pgpu.core.peerex import choose_dials, decode_reply, decode_request, encode_reply, encode_request
from p2pgpu.core.protocols import PEERS_PROTOCOL
from p2pgpu.errors import P2PGPUError
from p2pgpu.net.host import FrameStream, P2PHost

log = logging.getLogger(__name__)

MAX_REMEMBERED = 1024


def _with_peer_id(addr: str, peer_id: str) -> str | None:
    """``addr`` ending in ``/p2p/<peer_id>``; None if it names another peer."""
    if "/p2p/" in addr:
        return addr if addr.rsplit("/p2p/", 1)[1] == peer_id else None
    return f"{addr}/p2p/{peer_id}"


class PeerExchange:
    def __init__(self, host: P2PHost, *, target: int = 6, interval_s: float = 2.0, seed: int | None = None) -> None:
        self.host = host
        self.target = target
        self.interval_s = interval_s
        self._rng = random.Random(seed)
        self._advertised: dict[str, tuple[str, ...]] = {}
        self.dialled = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(PEERS_PROTOCOL, self._serve)
        task_status.started()
        asked: set[str] = set()
        while True:
            connected = self.host.peers()
            # Ask every new peer once (so it learns our address), and keep
            # asking while we are short of connections.
            fresh = [p for p in connected if p not in asked]
            if fresh or (connected and len(connected) < self.target):
                peer = fresh[0] if fresh else self._rng.choice(connected)
                asked.add(peer)
                with trio.move_on_after(10):
                    await self._ask(peer)
            asked &= set(connected)
            await trio.sleep(self.interval_s)

    def _remember(self, peer_id: str, addrs: list[str]) -> None:
        checked = tuple(a for a in (_with_peer_id(addr, peer_id) for addr in addrs) if a)
        if not checked:
            return
        if peer_id not in self._advertised and len(self._advertised) >= MAX_REMEMBERED:
            self._advertised.pop(next(iter(self._advertised)))
        self._advertised[peer_id] = checked

    def _known_connected(self, exclude: str) -> list[tuple[str, tuple[str, ...]]]:
        connected = set(self.host.peers())
        known = dict(self._advertised)
        for state in self.host.peer_list():  # peers we dialled ourselves (bootstrap, earlier answers)
            if state.connected and state.peer_id not in known:
                dialable = tuple(a for a in state.addrs if "/tcp/" in a)
                if dialable:
                    known[state.peer_id] = dialable
        peers = [(pid, addrs) for pid, addrs in known.items() if pid in connected and pid != exclude]
        self._rng.shuffle(peers)
        return peers

    async def _serve(self, stream: FrameStream) -> None:
        async with stream:
            request = await stream.receive_frame()
            if request is None:
                return
            self._remember(stream.remote_peer_id, decode_request(request))
            await stream.send_frame(encode_reply(self._known_connected(exclude=stream.remote_peer_id)))

    async def _ask(self, peer_id: str) -> None:
        try:
            async with await self.host.open_stream(peer_id, PEERS_PROTOCOL) as stream:
                await stream.send_frame(encode_request(a for a in self.host.listen_addrs() if "/tcp/" in a))
                reply = await stream.receive_frame()
            if reply is None:
                return
            offered = decode_reply(reply)
        except P2PGPUError as exc:
            # A reply that does not decode is the peer's: one line per peer
            # and kind (resets and refusals stay at DEBUG).
            self.host.peer_log.failed(log, peer_id, PEERS_PROTOCOL, exc, what="peer exchange")
            return
        connected = set(self.host.peers())
        want = self.target - len(connected)
        for candidate, addrs in choose_dials(offered, connected, self.host.peer_id, want, self._rng):
            for addr in addrs:
                full = _with_peer_id(addr, candidate)
                if full is None:
                    continue
                try:
                    await self.host.connect(full, timeout=5.0)
                    self.dialled += 1
                    log.debug("peer exchange: connected to %s", candidate)
                    break
                except P2PGPUError as exc:
                    log.debug("peer exchange: %s unreachable at %s: %s", candidate, addr, exc)

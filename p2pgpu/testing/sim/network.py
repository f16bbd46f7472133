"""The simulated world's clock, event queue and network.

Theory of operation
-------------------
``World`` is a discrete-event loop: a heap of ``(time, seq, callback,
args)``, simulated milliseconds, nothing else. ``seq`` breaks ties in
scheduling order, so two runs of one seed pop the same events in the same
order. All randomness comes from ``World.rng`` (one ``random.Random(seed)``);
nothing reads the wall clock, and nothing iterates a set or a dict whose
order depends on hashing (bytes hash differently in every process).

The network has two kinds of links, as the node's libp2p host does:

- **gossip** (``publish``): to every node reachable from the sender, each
  copy delayed on its own (so messages reorder), lost with the profile's
  loss rate and delivered twice with its duplication rate. gossipsub's
  forwarding is not modelled: every node is the sender's direct mesh peer
  (true for the few nodes of a run), so one lost copy is one node missing
  the message until anti-entropy repairs it.
- **streams** (``Stream``): a job or sync session over TCP + yamux. Frames
  neither vanish nor reorder (each direction is FIFO), but a crash of either
  end or a partition between them cuts the stream: frames in flight are
  dropped and each surviving end hears ``on_lost`` after a detection delay.

A node is reachable when it is up and in the same partition group. Nodes
are addressed by index; a node's *incarnation* grows with every crash, so
a message addressed to an earlier incarnation is dropped on arrival.
"""

from __future__ import annotations

import heapq
import random
from typing import Any, Callable, Protocol

from p2pgpu.core.codec import MAX_SIGNED_SIZE, unpack
from p2pgpu.core.jobs import FRAME_NAMES, TOKENS, VOUCHER, decode_frame
from p2pgpu.core.ledger import KIND_NAMES
from p2pgpu.core.sync import Entries, decode_announcement, decode_message
from p2pgpu.errors import P2PGPUError
from p2pgpu.testing.sim.config import CALM, START_MS, FaultProfile, Timing

__all__ = ["World", "Stream", "StreamEnd", "Endpoint", "describe"]


class Endpoint(Protocol):
    """What the network needs from a node (``SimNode``)."""

    index: int
    name: str
    up: bool
    incarnation: int

    def on_gossip(self, topic: str, data: bytes, origin: int) -> None: ...

    def on_connected(self, peers: list[int]) -> None: ...

    def on_stream(self, stream: Stream, side: int, data: bytes) -> None: ...


class StreamEnd(Protocol):
    def on_frame(self, data: bytes) -> None: ...

    def on_lost(self) -> None: ...


def describe(kind: str, data: bytes) -> str:
    """A short description of a message for traces: its type, and for
    ledger entries their kind, author and seq."""
    try:
        if kind == "ledger":
            return "announcement [" + ", ".join(_peek_entry(w) for w in decode_announcement(data)) + "]"
        if kind == "offers":
            return "offer"
        if kind == "sync":
            message = decode_message(data)
            if isinstance(message, Entries):
                return f"entries [{', '.join(_peek_entry(w) for w in message.wires)}]"
            return type(message).__name__.lower()
        if kind == "job":
            frame = decode_frame(data)
            name = FRAME_NAMES[frame.type]
            if frame.type == TOKENS:
                return f"{name} seq {frame.args[0]} +{frame.args[2]} = {frame.args[3]}"
            if frame.type == VOUCHER:
                return f"{name} {_peek(frame.args[0])[-1]}"
            return name
    except P2PGPUError as exc:
        return f"{kind} message ({len(data)} bytes, {type(exc).__name__})"
    return f"{kind} message ({len(data)} bytes)"


def _peek(wire: bytes) -> list:
    """The payload fields of a signed object (our own trusted bytes)."""
    return unpack(unpack(wire, max_size=MAX_SIGNED_SIZE)[0], max_size=MAX_SIGNED_SIZE)


def _peek_entry(wire: bytes) -> str:
    payload = _peek(wire)
    return f"{KIND_NAMES.get(payload[7], '?')} {payload[3].hex()[:6]}#{payload[5]}"


class World:
    """Clock, event queue, randomness and the network of one run."""

    def __init__(self, seed: int, profile: FaultProfile, timing: Timing, *, tracing: bool = False) -> None:
        self.seed = seed
        self.timing = timing
        self.rng = random.Random(seed)
        self.profile = profile
        self.now = START_MS
        self._queue: list[tuple[int, int, Callable[..., Any], tuple]] = []
        self._seq = 0
        self.events = 0
        self.nodes: list[Endpoint] = []
        self.group: list[int] = []  # partition group per node
        self.calm = False  # after the horizon: no loss, no new faults
        self.streams: dict[int, Stream] = {}  # open streams by id, in opening order
        self._stream_ids = 0
        self.tracing = tracing
        self.trace: list[str] = []
        self.counters: dict[str, int] = {}
        self.index_by_key: dict[bytes, int] = {}  # public key -> node index
        self.answers: dict[str, list[str]] = {}  # prompt -> the simulated model's one answer
        self.on_risk: Callable[[int, int], None] | None = None  # the fault plan's hook, see ``risky``

    def index_of(self, public_key: bytes) -> int:
        return self.index_by_key[public_key]

    def name_of(self, public_key: bytes) -> str:
        return f"node{self.index_by_key[public_key]}"

    def answer_for(self, prompt: str) -> list[str]:
        return self.answers[prompt]

    # ---------------------------------------------------------------- events

    def at(self, time_ms: int, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` at simulated ``time_ms`` (not before now)."""
        self._seq += 1
        heapq.heappush(self._queue, (max(time_ms, self.now), self._seq, callback, args))

    def after(self, delay_ms: int, callback: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + delay_ms, callback, *args)

    def run_until(self, time_ms: int, stop: Callable[[], bool] | None = None) -> None:
        """Pop events up to ``time_ms``; after each, ``stop()`` may end the run."""
        queue = self._queue
        while queue and queue[0][0] <= time_ms:
            when, _, callback, args = heapq.heappop(queue)
            self.now = when
            self.events += 1
            callback(*args)
            if stop is not None and stop():
                return
        self.now = max(self.now, time_ms)

    def log(self, who: str, what: str) -> None:
        """One trace line (only while tracing: formatting costs)."""
        self.trace.append(f"{self.now - START_MS:>7} {who:<6} {what}")

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # ---------------------------------------------------------------- network

    def delay(self) -> int:
        low, high = self.profile.delay_ms
        value = self.rng.randint(low, high)
        if self.profile.tail_rate and self.rng.random() < self.profile.tail_rate:
            value *= 10
        return value

    def reachable(self, a: int, b: int) -> bool:
        nodes = self.nodes
        return nodes[a].up and nodes[b].up and self.group[a] == self.group[b]

    def peers_of(self, a: int) -> list[int]:
        return [b for b in range(len(self.nodes)) if b != a and self.reachable(a, b)]

    def publish(self, origin: int, topic: str, data: bytes) -> None:
        """Gossip ``data`` from ``origin`` to every node it reaches now."""
        profile, rng = self.profile, self.rng
        fate = []
        for target in self.peers_of(origin):
            if profile.gossip_loss and rng.random() < profile.gossip_loss:
                self.count("gossip_lost")
                fate.append(f"node{target} lost")
                continue
            copies = 2 if profile.gossip_dup and rng.random() < profile.gossip_dup else 1
            for _ in range(copies):
                self.after(self.delay(), self._deliver_gossip, target, self.nodes[target].incarnation, origin, topic, data)
            fate.append(f"node{target}" + (" twice" if copies == 2 else ""))
        if self.tracing:
            self.log(f"node{origin}", f"gossips {describe(topic, data)} to {', '.join(fate) or 'nobody'}")

    def _deliver_gossip(self, target: int, incarnation: int, origin: int, topic: str, data: bytes) -> None:
        node = self.nodes[target]
        if not node.up or node.incarnation != incarnation or self.group[origin] != self.group[target]:
            self.count("gossip_dropped")
            return
        self.count("gossip_delivered")
        if self.tracing:
            self.log(node.name, f"gets {describe(topic, data)} from node{origin}")
        node.on_gossip(topic, data, origin)

    def open_stream(self, a: int, b: int) -> Stream | None:
        """A stream from node ``a`` to node ``b``, or None if ``b`` is out of reach."""
        if not self.reachable(a, b):
            return None
        self._stream_ids += 1
        stream = Stream(self, self._stream_ids, a, b)
        self.streams[stream.id] = stream
        return stream

    # ---------------------------------------------------------------- faults

    def set_groups(self, groups: list[int]) -> None:
        """Partition (or heal): cut every stream between groups, then tell
        each node which peers it can reach now."""
        self.group = list(groups)
        for stream in list(self.streams.values()):
            if self.group[stream.nodes[0]] != self.group[stream.nodes[1]]:
                stream.cut()
        self.connectivity_changed()

    def node_down(self, index: int) -> None:
        """Node ``index`` crashed: every stream it had is cut."""
        for stream in list(self.streams.values()):
            if index in stream.nodes:
                stream.cut()
        self.connectivity_changed()

    def connectivity_changed(self) -> None:
        for node in self.nodes:
            if node.up:
                node.on_connected(self.peers_of(node.index))

    def risky(self, node: int, window_ms: int) -> None:
        """Node ``node`` holds something not yet durable for ``window_ms``:
        the fault plan may crash it inside that window."""
        if self.on_risk is not None and not self.calm:
            self.on_risk(node, window_ms)

    def become_calm(self) -> None:
        self.calm = True
        self.profile = CALM


class Stream:
    """One bidirectional, reliable, ordered stream between two nodes' current
    incarnations. Side 0 is the opener. The opener attaches its end before
    sending; the acceptor's node attaches one when the first frame reaches
    it (``SimNode.on_stream``). A side that is done ``close``s: the other side
    still gets every frame sent before, then end-of-stream (``on_lost``, as
    a reader that hits EOF calls ``connection_lost``)."""

    __slots__ = ("world", "id", "nodes", "incarnations", "ends", "last_at", "broken", "closed", "protocol")

    def __init__(self, world: World, stream_id: int, a: int, b: int) -> None:
        self.world = world
        self.id = stream_id
        self.nodes = (a, b)
        self.incarnations = (world.nodes[a].incarnation, world.nodes[b].incarnation)
        self.ends: list[StreamEnd | None] = [None, None]
        self.last_at = [0, 0]  # delivery time of the last frame each way (FIFO)
        self.broken = False
        self.closed = [False, False]
        self.protocol = ""  # "sync" or "job": what the acceptor's node serves it with

    def attach(self, side: int, end: StreamEnd) -> None:
        self.ends[side] = end

    def send(self, side: int, data: bytes | None) -> None:
        """Queue ``data`` (None: end of stream) from ``side`` to the other
        side: FIFO, after a delay."""
        if self.broken or self.closed[side]:
            return
        world = self.world
        when = max(world.now + world.delay(), self.last_at[side])
        self.last_at[side] = when
        world.at(when, self._deliver, 1 - side, data)

    def _deliver(self, side: int, data: bytes | None) -> None:
        if self.broken:
            return
        node = self.world.nodes[self.nodes[side]]
        if not node.up or node.incarnation != self.incarnations[side]:
            return
        end = self.ends[side]
        if self.world.tracing:
            self.world.log(node.name, f"{self.protocol} #{self.id} from node{self.nodes[1 - side]}: "
                                      f"{'end of stream' if data is None else describe(self.protocol, data)}")
        if data is None:
            if end is not None:
                end.on_lost()
        elif end is None:
            node.on_stream(self, side, data)
        else:
            end.on_frame(data)

    def close(self, side: int) -> None:
        """``side`` is done: end-of-stream follows its last frame."""
        if self.closed[side]:
            return
        self.send(side, None)
        self.closed[side] = True
        if self.closed[0] and self.closed[1]:
            self.world.streams.pop(self.id, None)

    def cut(self) -> None:
        """Break the stream: in-flight frames vanish; each end hears
        ``on_lost`` once it notices (a detection delay later)."""
        if self.broken:
            return
        self.broken = True
        self.world.streams.pop(self.id, None)
        if self.world.tracing:
            self.world.log("world", f"{self.protocol} #{self.id} node{self.nodes[0]}-node{self.nodes[1]} is cut")
        low, high = self.world.timing.detect_ms
        for side in (0, 1):
            end = self.ends[side]
            if end is not None and not self.closed[side]:
                self.world.after(self.world.rng.randint(low, high), self._lost, side, end)

    def _lost(self, side: int, end: StreamEnd) -> None:
        node = self.world.nodes[self.nodes[side]]
        if node.up and node.incarnation == self.incarnations[side]:
            if self.world.tracing:
                self.world.log(node.name, f"{self.protocol} #{self.id}: notices the cut")
            end.on_lost()

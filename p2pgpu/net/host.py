"""The libp2p edge: the one module of p2pgpu that imports py-libp2p (DESIGN §9).

py-libp2p 0.8.1 works, but its defaults are unsafe or lossy. Everything the
rest of the node needs from the network goes through ``open_host`` and the
``P2PHost`` it yields, which fix those defaults in one place and translate the
library's exceptions into ours once, so no other module ever sees a libp2p
type. Each guard below names the pitfall it answers; the numbers are those of
``reference/libp2p-probe/README.md``.

Connections
    * Noise only (pitfall 1): the library offers plaintext by default, and
      plaintext lets anyone who knows our *public* key connect as us.
    * Yamux only (pitfall 11): mplex breaks against some js-libp2p versions.
    * ``max_connections_per_peer=1`` (pitfall 2): otherwise every dial waits
      the 250 ms happy-eyeballs timer even after it succeeded.
    * mDNS off (pitfall 10): it multicasts on every interface.
    * The swarm's auto-connector is switched off. Measured here: it redials
      every peer in the peerstore (even one we disconnected on purpose, once a
      60 s back-off has passed) whenever the node has fewer than 50
      connections, i.e. always in a 5-20 node network. Who we dial is policy,
      and policy lives in our bootstrap loop, not in a library default.
    * ``connect`` lifts the swarm's 60 s "negative cache" block before it
      dials and refuses to trust a connection that is already dead (pitfall
      7); it refuses to dial ourselves (the library happily connects a host to
      itself).
    * ``connect`` makes the address it was given the one the swarm dials:
      measured, the swarm dials a single address per transport from its
      peerstore, so a peer that restarted on a new port stayed unreachable
      while its old address was still listed (120 s).
    * ``host.close()`` runs before ``host.run()`` is left (pitfall 4):
      leaving ``run()`` alone keeps the listener open.
    * Listen addresses must be ``/ip4|ip6/<ip>/tcp/<port>`` and must really
      be bound. Measured: the library silently listens on nothing for an
      address it cannot bind, and on *every interface* for a ``/dns4`` name it
      cannot resolve.
    * The library's TCP listeners set SO_REUSEPORT (for hole punching, which
      we do not use): a second node started on a port already in use bound
      it too, started silently and shared our inbound connections. Ours are
      bound without it (``_ExclusiveTCPListener``), so the kernel refuses the
      second bind and the second node fails with ``AddressInUse``.

Streams
    * Every stream handler is wrapped (pitfall 3): an exception in a handler
      resets that stream and is logged; in the bare library it tears down the
      whole host. The gossipsub handlers the library registers itself are
      wrapped too: measured here, one varint-prefixed garbage frame on
      ``/meshsub/1.1.0`` from any connected peer raised protobuf's
      ``DecodeError`` out of the pubsub handler and killed the host.
    * Streams carry length-prefixed frames decoded by the pure
      ``p2pgpu.core.framing`` (oversized and truncated input are rejected).
    * Library exceptions become ours here, once. One needed more than a
      mapping: the library reports a remote reset, and a connection dying
      under a stream, as a plain end-of-stream (measured); ``FrameStream``
      asks the yamux stream whether a reset arrived, so a crashed handler on
      the other side is ``StreamAborted``, not a clean end.

Gossip (pitfalls 5 and 6)
    * heartbeat 1 s (library default: 120 s) and a short prune back-off (5 s
      instead of 60 s, which starves pruned leaves and hides them from IHAVE).
    * The GossipSub "adaptive gossip" feature is off. Measured here: on a
      3-node line it rates the network's health as poor after 30 s and
      silently raises the heartbeat from 1 s to 30 s (leaves) and 60 s (the
      middle node), undoing the setting above.
    * The built-in spam cap (10 msg/s per *forwarding* peer per topic, excess
      dropped silently) is off; we rate-limit per *origin* instead, with a
      token bucket per (origin, topic), inside the topic validator.
    * Message ids are the SHA-256 of the payload, so the same bytes published
      by two nodes, or arriving over two paths, are delivered once.
    * Message size is enforced by us (``MAX_GOSSIP_MESSAGE``, 64 KiB), well
      below the library's silent 1 MiB drop.
    * Queues: the library's per-peer outbound queue and per-subscription
      channel both hold 32 messages and drop the rest silently; both are
      raised (``GossipConfig.outbound_queue``, ``subscription_queue``) and a
      full subscription queue is counted and logged.
    * Validators run before delivery *and* before forwarding, so a message a
      node rejects stops there. The library's validation cache (which would
      remember a rate-limit rejection for 5 minutes by content) is disabled:
      our verdict depends on the sender and on time, not only on content.
    * Exceptions while handling a received message (a validator that raises,
      an undecodable signing key in a message) are logged and the message is
      dropped; in the bare library the latter killed the host (measured).

Logging (pitfall 8)
    libp2p logs benign races at ERROR; its logger is set to CRITICAL unless
    ``debug=True``. This is process-wide: the last host opened decides.
    What peers cause (bad frames, failed handlers, refused gossip) is
    logged through ``host.peer_log`` (``p2pgpu.net.peerlog``): one line per
    peer and kind of trouble, repeats counted and summarised once a window,
    never a traceback; tracebacks are for our own bugs, rate-limited too.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import random
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import multiaddr
import trio

from libp2p import new_host
from libp2p.abc import INotifee
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.ping import PingService
from libp2p.io.trio import TrioTCPStream
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.network.stream.net_stream import StreamState
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.protocol_muxer.exceptions import MultiselectClientError, ProtocolNotSupportedError
from libp2p.protocol_muxer.multiselect import MULTISELECT_PROTOCOL_ID, PROTOCOL_NOT_FOUND_MSG
from libp2p.utils import encode_delim, read_delim
from libp2p.utils.address_validation import expand_wildcard_address
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub, ValidationCache
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedStreamReset
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from libp2p.transport.exceptions import OpenConnectionError
from libp2p.transport.tcp.tcp import TCP, TCPListener

from p2pgpu.core.framing import FrameDecoder, encode_frame
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.protocols import MAX_FRAME, MAX_GOSSIP_MESSAGE
from p2pgpu.errors import AddressInUse, ConfigError, MalformedInput, Oversized, P2PGPUError, PeerMisbehaved
from p2pgpu.net.peerlog import PeerLog, Trouble, refine, trouble_of

__all__ = [
    "DEFAULT_LISTEN_ADDRS",
    "BootstrapConfig",
    "FrameStream",
    "GossipConfig",
    "GossipMessage",
    "P2PHost",
    "PeerState",
    "ProtocolNotSupported",
    "PeerUnreachable",
    "PublishRejected",
    "StreamAborted",
    "StreamHandler",
    "Subscription",
    "TopicValidator",
    "check_addresses",
    "open_host",
]

logger = logging.getLogger(__name__)

DEFAULT_LISTEN_ADDRS = ("/ip4/127.0.0.1/tcp/0",)

# How much one read asks of the muxer. Frames larger than this arrive in
# several reads; smaller ones several to a read. 64 KiB matched the probe's
# best bulk throughput.
_READ_CHUNK = 64 * 1024
# A connection we already hold must answer a ping within this long, or
# ``connect`` treats it as stale and dials afresh (pitfall 7).
_LIVENESS_TIMEOUT = 2.0
# Disconnected peers kept in the peer list for ``p2pgpu peers``.
_MAX_REMEMBERED_PEERS = 1024


# --- errors ------------------------------------------------------------------
# errors.py is the project's tree and stays closed; the network's own
# refinements hang under its families here.


class StreamAborted(PeerMisbehaved):
    """A stream ended without a clean close: the remote reset it, or the
    connection under it died. Whatever was in flight is lost."""


class ProtocolNotSupported(PeerMisbehaved):
    """The remote peer does not speak the protocol we asked for on a new stream."""


class PeerUnreachable(PeerMisbehaved):
    """A dial failed: nothing listens at the address, the peer there has
    another peer id, or the handshake did not finish in time. Filed under
    PeerMisbehaved because the remote did not honour the address it
    advertised; the caller decides whether to try elsewhere."""


class PublishRejected(MalformedInput):
    """Our own gossip message failed the topic's validator, so it was not sent."""


refine(StreamAborted, Trouble.RESET)
refine(ProtocolNotSupported, Trouble.REFUSED_PROTOCOL)
refine(PeerUnreachable, Trouble.UNREACHABLE)


# --- configuration -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Gossipsub tuning for networks of 5-20 nodes (DESIGN §9, probe p3/p3b/p3c).

    ``degree``/``degree_low``/``degree_high`` are gossipsub's D, D_lo, D_hi:
    4/3/8 keeps every node in a mesh of 3-8 even on a line, and with a small
    network most nodes end up meshed with all their neighbours.
    ``rate_per_second``/``rate_burst`` bound what one *origin* may inject on one
    topic (token bucket); ``None`` disables the limit. Offers come every ~10 s
    per provider and ledger announcements a few per second at most, so the
    defaults only bite on floods.
    """

    degree: int = 4
    degree_low: int = 3
    degree_high: int = 8
    heartbeat_interval: int = 1
    heartbeat_initial_delay: float = 0.1
    prune_back_off: int = 5
    unsubscribe_back_off: int = 5
    gossip_window: int = 3
    gossip_history: int = 5
    fanout_ttl: int = 60
    seen_ttl: int = 120
    max_message_size: int = MAX_GOSSIP_MESSAGE
    rate_per_second: float | None = 10.0
    rate_burst: float = 50.0
    max_rate_buckets: int = 10_000
    subscription_queue: int = 1024
    outbound_queue: int = 1024

    def __post_init__(self) -> None:
        if not 0 < self.degree_low <= self.degree <= self.degree_high:
            raise ValueError("need 0 < degree_low <= degree <= degree_high")
        if self.heartbeat_interval < 1:
            raise ValueError("heartbeat_interval is whole seconds, at least 1")
        if not 0 < self.max_message_size < (1 << 20):
            raise ValueError("max_message_size must stay below libp2p's silent 1 MiB drop")
        if self.rate_per_second is not None and not (
            self.rate_per_second > 0 and self.rate_burst >= 1
        ):
            raise ValueError("rate_per_second must be > 0 and rate_burst >= 1")
        if self.subscription_queue < 1 or self.outbound_queue < 1 or self.max_rate_buckets < 1:
            raise ValueError("queue sizes and max_rate_buckets must be positive")


@dataclass(frozen=True, slots=True)
class BootstrapConfig:
    """Peers to keep connected to, dialled with exponential back-off.

    Each entry is a full multiaddr ending in ``/p2p/<peer id>``. A peer that
    drops is redialled, starting again at ``initial_backoff`` and doubling up
    to ``max_backoff`` (with ±20 % jitter so restarted networks do not dial in
    lock step). An entry naming our own peer id is skipped, so one list can be
    shared by every node of a network, bootstrap nodes included.
    """

    peers: tuple[str, ...] = ()
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    dial_timeout: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.peers, str):
            raise TypeError("peers is a sequence of multiaddr strings, not one string")
        object.__setattr__(self, "peers", tuple(self.peers))
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError("need 0 < initial_backoff <= max_backoff")
        if self.dial_timeout <= 0:
            raise ValueError("dial_timeout must be positive")


@dataclass(frozen=True, slots=True)
class PeerState:
    """One row of ``p2pgpu peers``: a peer we are or were connected to.

    ``since`` is ``trio.current_time()`` when ``connected`` last changed.
    """

    peer_id: str
    addrs: tuple[str, ...]
    connected: bool
    since: float
    bootstrap: bool


class GossipMessage(NamedTuple):
    """A delivered gossip message: ``from_peer_id`` is the *origin*, whose
    signature over the message libp2p checked (strict signing), not the
    neighbour that forwarded it."""

    from_peer_id: str
    data: bytes


TopicValidator = Callable[[str, bytes], bool]
"""``(origin peer id, payload) -> accept?``; runs before delivery and forwarding."""


# --- streams -----------------------------------------------------------------


def _map_stream_error(exc: BaseException, what: str) -> P2PGPUError:
    """Translate a library stream exception into ours (the one place we do)."""
    if isinstance(exc, (StreamReset, MuxedStreamReset)):
        return StreamAborted(f"{what}: stream reset by the remote peer")
    return StreamAborted(f"{what}: {type(exc).__name__}: {exc}")


_LIBRARY_IO_ERRORS = (BaseLibp2pError, trio.BrokenResourceError)
NEGOTIATE_TIMEOUT_S = 10.0  # multistream-select on a stream we open
_STREAM_OPEN = StreamState.OPEN


class FrameStream:
    """A libp2p stream carrying length-prefixed frames (``p2pgpu.core.framing``).

    ``remote_peer_id`` is the peer id noise authenticated for the connection
    under this stream (``stream.muxed_conn.peer_id``, DESIGN §2), the only
    peer id on it worth trusting.

    Ending a stream: ``close_write()`` sends our end-of-stream and keeps
    receiving (a requester's "that was all"); ``close()`` is done with the
    stream; ``reset()`` aborts both directions. All three are idempotent. Used
    as an async context manager, the stream is closed on a clean exit and
    reset when the body raises.

    Errors: ``Oversized``/``Truncated`` for bad framing from the remote (the
    stream is reset first, since its framing is lost); ``StreamAborted`` when
    the remote reset the stream or the connection died; ``Oversized`` from
    ``send_frame`` for a payload over the limit (nothing is sent);
    ``trio.ClosedResourceError`` for sending after we closed or reset it
    (our bug, not the peer's); ``trio.BusyResourceError`` for two tasks
    receiving at once.
    """

    __slots__ = (
        "_stream",
        "_decoder",
        "_frames",
        "_max_frame",
        "_send_lock",
        "_receiving",
        "_write_closed",
        "_finished",
        "_eof",
        "remote_peer_id",
        "protocol_id",
    )

    def __init__(self, stream: Any, max_frame: int = MAX_FRAME) -> None:
        self._stream = stream
        self.remote_peer_id: str = str(stream.muxed_conn.peer_id)
        self.protocol_id: str = str(stream.get_protocol())
        self._max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self._frames: deque[bytes] = deque()
        self._send_lock = trio.Lock()
        self._receiving = False
        self._write_closed = False  # we sent our FIN, or reset
        self._finished = False  # close() or reset() ran
        self._eof = False  # the remote's clean end was read

    def __repr__(self) -> str:
        return f"FrameStream({self.protocol_id} with {self.remote_peer_id})"

    def looks_open(self) -> bool:
        """What we know without a round trip: False once we or the remote
        closed or reset the stream, or its connection went away (a killed
        peer's OS closes the socket, so that shows here within moments).
        True is a good guess, not a promise: the peer may die right after."""
        if self._finished or self._write_closed or self._eof or self._frames:
            return False  # a stream kept idle must have nothing unread either
        try:
            if self._stream.muxed_conn.is_closed:
                return False
            muxed = self._stream.muxed_stream
            if muxed.closed or muxed.send_closed or muxed.recv_closed or muxed.reset_received:
                return False
            return getattr(self._stream, "_state", None) in (None, _STREAM_OPEN)
        except AttributeError:  # a library change: say no, and open a fresh stream
            return False

    async def send_frame(self, payload: bytes) -> None:
        """Send one frame. Holds a lock so concurrent senders never interleave."""
        data = encode_frame(payload, self._max_frame)
        async with self._send_lock:
            if self._write_closed:
                raise trio.ClosedResourceError("this stream was closed for sending")
            try:
                await self._stream.write(data)
            except _LIBRARY_IO_ERRORS as exc:
                raise _map_stream_error(exc, "send") from exc

    async def receive_frame(self) -> bytes | None:
        """The next frame's payload, or ``None`` once the remote closed cleanly.

        EOF inside a frame raises ``Truncated``; a length over the limit raises
        ``Oversized`` as soon as its header arrives, before the body is read;
        a reset by the remote (or a dead connection) raises ``StreamAborted``.
        ``None`` only says the remote will send nothing more: a protocol that
        needs to know the exchange *succeeded* ends with a message of its own.
        """
        if self._frames:
            return self._frames.popleft()
        if self._finished:
            raise trio.ClosedResourceError("this stream was closed or reset locally")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            while not self._frames:
                if self._eof:
                    return None
                try:
                    chunk = await self._stream.read(_READ_CHUNK)
                except StreamEOF:
                    chunk = b""
                except _LIBRARY_IO_ERRORS as exc:
                    raise _map_stream_error(exc, "receive") from exc
                if not chunk and self._ended_by_reset():
                    raise StreamAborted("receive: stream reset by the remote peer, "
                                        "or its connection died")
                try:
                    if not chunk:
                        self._eof = True
                        self._decoder.eof()
                        return None
                    self._frames.extend(self._decoder.feed(chunk))
                except MalformedInput:
                    # The byte stream has lost its framing: nothing after this
                    # point can be read, so tell the remote at once.
                    await self.reset()
                    raise
            return self._frames.popleft()
        finally:
            self._receiving = False

    def _ended_by_reset(self) -> bool:
        # py-libp2p 0.8.1 reports a remote RST, and a connection torn down
        # under the stream, as plain StreamEOF (measured): yamux forgets the
        # stream and read() says "Stream closed". Only the yamux stream object
        # still knows, so ask it: without this a handler that crashed would
        # look like a clean end to the other side.
        muxed = getattr(self._stream, "muxed_stream", None)
        if muxed is None:
            return False
        return bool(getattr(muxed, "reset_received", False)) or not getattr(
            muxed, "recv_closed", True
        )

    async def close_write(self) -> None:
        """Send end-of-stream; we can still receive until the remote closes."""
        async with self._send_lock:
            if self._write_closed:
                return
            self._write_closed = True
            try:
                await self._stream.close_write()
            except _LIBRARY_IO_ERRORS as exc:
                logger.debug("close_write on %r failed: %s", self, exc)

    async def close(self) -> None:
        """Done with the stream: our side ends cleanly, unread input is dropped."""
        if self._finished:
            return
        self._finished = True
        self._write_closed = True
        try:
            await self._stream.close()
        except _LIBRARY_IO_ERRORS as exc:
            logger.debug("close on %r failed: %s", self, exc)

    async def reset(self) -> None:
        """Abort both directions; the remote sees ``StreamAborted``."""
        if self._finished:
            return
        self._finished = True
        self._write_closed = True
        try:
            await self._stream.reset()
        except _LIBRARY_IO_ERRORS as exc:
            logger.debug("reset on %r failed: %s", self, exc)

    async def __aenter__(self) -> FrameStream:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            await self.close()
        else:
            with trio.CancelScope(shield=True):
                await self.reset()


StreamHandler = Callable[[FrameStream], Awaitable[None]]


# --- gossip internals --------------------------------------------------------


class _RateLimiter:
    """Token buckets keyed by (origin, topic), oldest-touched evicted first.

    Eviction forgets a bucket, which refills it: that is harmless, because an
    evicted bucket is the least recently used one. The cap keeps memory bounded
    when someone invents peer ids by the thousand.
    """

    __slots__ = ("_rate", "_burst", "_max_keys", "_buckets")

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def allow(self, key: tuple[str, str], now: float) -> bool:
        held = self._buckets.get(key)
        if held is None:
            tokens = self._burst
        else:
            tokens, last = held
            tokens = min(self._burst, tokens + max(0.0, now - last) * self._rate)
            self._buckets.move_to_end(key)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed


class _NoValidationCache(ValidationCache):
    """Never remembers a verdict: ours depends on the sender and the time."""

    def __init__(self) -> None:
        super().__init__(ttl=0, max_size=1)

    def get(self, msg_id: bytes) -> None:  # type: ignore[override]
        return None

    def put(self, msg_id: bytes, result: Any) -> None:
        return None


class _SizedQueues(dict):  # type: ignore[type-arg]
    """``Pubsub.peer_queues`` that raises each new queue's limit on insertion.

    The library builds every per-peer outbound ``RpcQueue()`` with its default
    bound of 32 and drops what does not fit (pitfall 5); it offers no
    parameter. Raising the bound the moment the queue is stored, before any
    await, means no message ever meets the small one.
    """

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self._max_size = max_size

    def __setitem__(self, key: Any, queue: Any) -> None:
        inner = getattr(queue, "_queue", None)
        if inner is not None and hasattr(inner, "max_size"):
            inner.max_size = self._max_size
        else:  # a libp2p other than 0.8.1: keep working with its default
            logger.warning("cannot raise the gossip outbound queue limit on %r", queue)
        super().__setitem__(key, queue)


def _content_msg_id(msg: Any) -> bytes:
    """Message id = SHA-256 of the payload: same bytes, same message."""
    return hashlib.sha256(msg.data).digest()


class _Pubsub(Pubsub):
    """Pubsub with our delivery path and a guard around message handling."""

    def __init__(self, *args: Any, deliver: Callable[[Any], None], peer_log: PeerLog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._p2pgpu_deliver = deliver
        self._p2pgpu_peer_log = peer_log

    def notify_subscriptions(self, publish_message: Any) -> None:
        # Replaces the library's per-topic channel of 32 (dropped silently).
        self._p2pgpu_deliver(publish_message)

    async def push_msg(self, msg_forwarder: ID, msg: Any) -> None:
        # Runs as a free-standing task for every received message; an
        # exception here would stop the pubsub service (measured: a message
        # whose signing key does not decode did exactly that).
        try:
            await super().push_msg(msg_forwarder, msg)
        except Exception as exc:  # noqa: BLE001 - remote input must never crash us
            # Whatever the library raised, the message was the forwarder's.
            self._p2pgpu_peer_log.note(logger, str(msg_forwarder), "gossip", Trouble.MALFORMED,
                                       f"a message the library could not handle: {exc!r}")


class _NoAutoConnector(AutoConnector):
    """The swarm's auto-connector, never started (see the module docstring)."""

    async def start(self) -> None:
        self._started = False


class _ConnectionNotifee(INotifee):
    """Feeds connection events into the host's peer table."""

    def __init__(self, host: P2PHost) -> None:
        self._host = host

    async def connected(self, network: Any, conn: Any) -> None:
        self._host._on_connection_change(conn, gone=False)

    async def disconnected(self, network: Any, conn: Any) -> None:
        self._host._on_connection_change(conn, gone=True)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


@dataclass(slots=True)
class _PeerRecord:
    connected: bool
    since: float
    addrs: tuple[str, ...] = ()
    bootstrap: bool = False


# --- subscriptions -----------------------------------------------------------


class Subscription:
    """Messages on one topic, as ``GossipMessage(from_peer_id, data)`` tuples.

    An async iterator and an async context manager; iteration ends when the
    subscription or the host is closed. If the consumer falls more than
    ``GossipConfig.subscription_queue`` messages behind, newer messages are
    dropped for it (counted in ``P2PHost.gossip_stats()['queue_full']``):
    gossip is lossy by nature, and the protocols above it resynchronise.
    """

    def __init__(self, host: P2PHost, topic: str, queue_size: int) -> None:
        self.topic = topic
        self._host = host
        self._send, self._receive = trio.open_memory_channel[GossipMessage](queue_size)
        self._closed = False
        self._behind = False

    async def receive(self) -> GossipMessage:
        """The next message; raises ``trio.EndOfChannel`` once closed."""
        try:
            return await self._receive.receive()
        except trio.ClosedResourceError:
            raise trio.EndOfChannel from None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> GossipMessage:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def _offer(self, message: GossipMessage) -> bool:
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return True

    def _end(self) -> None:
        self._closed = True
        self._send.close()

    async def aclose(self) -> None:
        """Stop receiving; the last subscriber to leave unsubscribes the node."""
        if self._closed:
            return
        self._end()
        self._receive.close()
        await self._host._unsubscribe(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()


# --- the host ----------------------------------------------------------------


async def _refuse_stream(net_stream: Any) -> None:
    """Handler left behind by ``remove_stream_handler``: reset and forget."""
    try:
        await net_stream.reset()
    except Exception:  # noqa: BLE001 - the peer may already be gone
        pass


def _parse_peer_id(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception as exc:  # noqa: BLE001 - base58/multihash raise a zoo
        raise MalformedInput(f"not a peer id: {peer_id!r}") from exc


def _parse_p2p_addr(addr: str) -> Any:
    try:
        maddr = multiaddr.Multiaddr(addr)
        names = [p.name for p in maddr.protocols()]
    except Exception as exc:  # noqa: BLE001
        raise MalformedInput(f"not a multiaddr: {addr!r} ({exc})") from exc
    if not names or names[-1] != "p2p":
        raise MalformedInput(
            f"{addr!r} does not end in /p2p/<peer id>: give the peer's whole address, "
            "as `p2pgpu status` shows it on that node (e.g. /ip4/203.0.113.7/tcp/4001/p2p/12D3KooW...)"
        )
    try:
        return info_from_p2p_addr(maddr)
    except Exception as exc:  # noqa: BLE001
        raise MalformedInput(f"not a multiaddr ending in /p2p/<peer id>: {addr!r} ({exc})") from exc


def check_addresses(listen_addrs: Iterable[str], bootstrap: Iterable[str] = ()) -> None:
    """Check listen and bootstrap addresses as ``open_host`` would, before
    anything starts: ``ConfigError`` naming the bad one. ``p2pgpu node run``
    calls it first, so a typo fails before the data dir or the ledger is
    touched."""
    for addr in listen_addrs:
        _parse_listen_addr(addr)
    for addr in bootstrap:
        try:
            _parse_p2p_addr(addr)
        except MalformedInput as exc:
            raise ConfigError(f"bootstrap address: {exc}") from None


def _concrete(addr: str) -> list[str]:
    """``addr`` itself, or for a wildcard one, the addresses it listens on."""
    ma = multiaddr.Multiaddr(addr)
    names = {p.name for p in ma.protocols()}
    if "ip4" in names and ma.value_for_protocol("ip4") == "0.0.0.0":
        loopback = "/ip4/127.0.0.1"
    elif "ip6" in names and ma.value_for_protocol("ip6") in ("::", "0:0:0:0:0:0:0:0"):
        loopback = "/ip6/::1"
    else:
        return [addr]
    rest = addr.split("/", 3)[3]  # what follows /ip4/0.0.0.0/ : tcp/PORT...
    expanded = [str(a) for a in expand_wildcard_address(ma)]
    return [a for a in expanded if "0.0.0.0" not in a and "/::/" not in a] + [f"{loopback}/{rest}"]


def _protocol_refused(exc: BaseException) -> bool:
    """Did multistream-select end in "na" (protocol not supported)?

    The library raises the same ``StreamFailure`` for a refused protocol, a
    negotiation timeout and a broken stream; only the chained
    ``MultiselectClientError`` and its message tell them apart.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ProtocolNotSupportedError):
            return True
        if isinstance(cur, MultiselectClientError) and "not supported" in str(cur):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


class P2PHost:
    """A running libp2p host; made by ``open_host``, valid inside its block.

    Peer ids, protocol ids, topics and addresses are plain strings here.
    """

    def __init__(
        self,
        libp2p_host: Any,
        node_key: NodeKey,
        *,
        max_frame: int,
        gossip: GossipConfig | None,
        peer_log: PeerLog | None = None,
    ) -> None:
        self._host = libp2p_host
        self._swarm = libp2p_host.get_network()
        self._id: ID = libp2p_host.get_id()
        self.peer_id: str = node_key.peer_id
        self._max_frame = max_frame
        self._gossip_config = gossip
        self._pubsub: _Pubsub | None = None
        self._router: GossipSub | None = None
        self._closing = False
        self._peers: dict[str, _PeerRecord] = {}
        self._conn_changed = trio.Event()
        self._subs: dict[str, list[Subscription]] = {}
        self._validators: dict[str, TopicValidator] = {}
        self._validated_topics: set[str] = set()
        self._limiter = (
            _RateLimiter(gossip.rate_per_second, gossip.rate_burst, gossip.max_rate_buckets)
            if gossip is not None and gossip.rate_per_second is not None
            else None
        )
        self._stats = {"delivered": 0, "rejected": 0, "rate_limited": 0, "oversized": 0,
                       "queue_full": 0}
        # What our peers caused, logged once per (peer, trouble, protocol)
        # and counted; every module serving peers through this host logs
        # their misbehaviour here.
        self.peer_log = peer_log if peer_log is not None else PeerLog()

    def __repr__(self) -> str:
        return f"P2PHost({self.peer_id})"

    # -- addresses and peers --------------------------------------------------

    def listen_addrs(self) -> list[str]:
        """Our dialable addresses, each ending in ``/p2p/<our peer id>``.

        A wildcard listen address (``0.0.0.0``, ``::``, the default config's)
        is nobody's address to dial: it becomes this machine's interface
        addresses (py-libp2p's ``expand_wildcard_address``) and loopback, so
        what offers and peer exchange hand out can be dialled."""
        out: list[str] = []
        for addr in self._host.get_addrs():
            base = str(addr).partition("/p2p/")[0]
            for candidate in _concrete(base):
                full = f"{candidate}/p2p/{self.peer_id}"
                if full not in out:
                    out.append(full)
        return out

    def peers(self) -> list[str]:
        """Peer ids with a live connection right now."""
        return sorted(
            str(pid)
            for pid, conns in self._swarm.connections.items()
            if pid != self._id and any(not c.is_closed for c in conns)
        )

    def is_connected(self, peer_id: str) -> bool:
        return any(not c.is_closed for c in self._swarm.get_connections(_parse_peer_id(peer_id)))

    def peer_list(self) -> list[PeerState]:
        """Every peer we are or were connected to (and every bootstrap peer)."""
        out = []
        now = trio.current_time()
        for pid, rec in sorted(self._peers.items()):
            # Connection events reach us through the swarm's notifiers a
            # little after the swarm's own table changes; the swarm is the
            # truth, so agree with ``peers()`` even inside that window.
            live = self.is_connected(pid)
            if live != rec.connected:
                rec.connected, rec.since = live, now
            addrs = set(rec.addrs)
            try:
                known = self._host.get_peerstore().addrs(ID.from_base58(pid))
            except Exception:  # noqa: BLE001 - the peerstore raises when it knows none
                known = []
            for a in known:
                text = str(a)
                addrs.add(text if "/p2p/" in text else f"{text}/p2p/{pid}")
            out.append(PeerState(pid, tuple(sorted(addrs)), rec.connected, rec.since,
                                 rec.bootstrap))
        return out

    def _on_connection_change(self, conn: Any, *, gone: bool) -> None:
        try:
            pid = conn.muxed_conn.peer_id
        except AttributeError:
            return
        # The swarm still lists the connection it reports as gone.
        connected = any(
            not c.is_closed and not (gone and c is conn)
            for c in self._swarm.get_connections(pid)
        )
        key = str(pid)
        rec = self._peers.get(key)
        now = trio.current_time()
        if rec is None:
            self._peers[key] = _PeerRecord(connected, now)
            self._forget_old_peers()
        elif rec.connected != connected:
            rec.connected = connected
            rec.since = now
        logger.debug("peer %s %s", key, "connected" if connected else "disconnected")
        self._conn_changed.set()
        self._conn_changed = trio.Event()

    def _forget_old_peers(self) -> None:
        if len(self._peers) <= _MAX_REMEMBERED_PEERS:
            return
        gone = sorted(
            (rec.since, pid) for pid, rec in self._peers.items()
            if not rec.connected and not rec.bootstrap
        )
        for _, pid in gone[: len(self._peers) - _MAX_REMEMBERED_PEERS]:
            del self._peers[pid]

    def _remember(self, peer_id: str, addr: str, *, bootstrap: bool = False) -> None:
        rec = self._peers.get(peer_id)
        if rec is None:
            rec = self._peers[peer_id] = _PeerRecord(
                self.is_connected(peer_id), trio.current_time()
            )
        if addr not in rec.addrs:
            rec.addrs = (*rec.addrs, addr)
        rec.bootstrap = rec.bootstrap or bootstrap

    # -- dialing --------------------------------------------------------------

    async def connect(self, addr: str, *, timeout: float = 10.0) -> str:
        """Connect to the peer at ``addr`` (``.../p2p/<peer id>``); return its id.

        Returns at once when a live connection exists. A connection that is
        closed, or does not answer a ping within 2 s, is dropped and
        redialled: right after a peer dies the library keeps listing it as
        connected for a moment and would "succeed" on the corpse (pitfall 7).
        Before dialing, the peer is lifted from the swarm's negative cache,
        which otherwise refuses any dial for 60 s after one failed (pitfall
        7), and ``addr`` replaces the addresses the peerstore held for it,
        since the swarm would dial only one of them (possibly a stale one).
        Retry policy is the caller's (see ``BootstrapConfig``).
        Raises ``MalformedInput`` for a bad address or our own, and
        ``PeerUnreachable`` when the dial fails.
        """
        info = _parse_p2p_addr(addr)
        pid = info.peer_id
        if pid == self._id:
            raise MalformedInput(f"{addr} is this node's own address")
        self._remember(str(pid), addr)
        if await self._has_live_connection(pid):
            return str(pid)
        self._swarm.unblock_peer(pid)
        # The swarm dials only ONE address per transport class (measured:
        # "smart address selection"), taken from the peerstore. A peer that
        # restarted on a new port is still listed there under its old address
        # (kept 120 s), so the new one would never be tried. We were asked to
        # dial this address: make it the one the swarm knows.
        try:
            self._host.get_peerstore().clear_addrs(pid)
        except Exception as exc:  # noqa: BLE001
            logger.debug("could not clear old addresses of %s: %r", pid, exc)
        try:
            with trio.fail_after(timeout):
                await self._host.connect(info)
        except trio.TooSlowError as exc:
            raise PeerUnreachable(f"dial to {addr} timed out after {timeout} s") from exc
        except (*_LIBRARY_IO_ERRORS, OSError) as exc:
            raise PeerUnreachable(f"dial to {addr} failed: {exc}") from exc
        # A failed dial leaves a negative-cache entry behind even when a
        # concurrent one succeeded; never let it outlive a success.
        self._swarm.unblock_peer(pid)
        logger.debug("connected to %s", addr)
        return str(pid)

    async def _has_live_connection(self, pid: ID) -> bool:
        conns = self._swarm.get_connections(pid)
        if not conns:
            return False
        if all(c.is_closed for c in conns):
            await self._drop_connections(pid)
            return False
        alive = False
        with trio.move_on_after(_LIVENESS_TIMEOUT):
            try:
                await PingService(self._host).ping(pid, ping_amt=1)
                alive = True
            except Exception as exc:  # noqa: BLE001 - any failure means "stale"
                logger.debug("existing connection to %s failed a ping: %r", pid, exc)
        if not alive:
            logger.info("dropping a stale connection to %s", pid)
            await self._drop_connections(pid)
        return alive

    async def _drop_connections(self, pid: ID) -> None:
        try:
            await self._host.disconnect(pid)
        except Exception as exc:  # noqa: BLE001 - closing a dead conn may raise anything
            logger.debug("closing connections to %s: %r", pid, exc)

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id``. A bootstrap peer is redialled
        by the bootstrap loop after its back-off."""
        await self._drop_connections(_parse_peer_id(peer_id))

    # -- streams --------------------------------------------------------------

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """Serve ``protocol_id``: ``handler(stream)`` runs for each inbound stream.

        The handler gets a ``FrameStream``. If it returns, the stream is
        closed; if it raises, the stream is reset and the error logged in
        ``peer_log``: what the peer caused (our own error types, framing,
        resets) as one line per peer and kind, anything else (our bug) with
        a traceback at WARNING, rate-limited too; and the host carries on
        (pitfall 3).
        """
        wrapped = self._wrap_handler(protocol_id, handler)
        self._host.set_stream_handler(TProtocol(protocol_id), wrapped)

    def remove_stream_handler(self, protocol_id: str) -> None:
        """Stop serving ``protocol_id``: later streams for it are reset.

        The id is never removed from libp2p's table. py-libp2p 0.8.1's
        multistream-select checks that a protocol is there, awaits a write,
        then looks the handler up again; a handler removed in between raises
        KeyError out of the swarm and tears the whole host down (seen when a
        node shut its sync service while a peer was opening a sync stream).
        """
        self._host.set_stream_handler(TProtocol(protocol_id), _refuse_stream)

    def _wrap_handler(
        self, protocol_id: str, handler: StreamHandler
    ) -> Callable[[Any], Awaitable[None]]:
        max_frame = self._max_frame
        peer_log = self.peer_log

        async def run_handler(net_stream: Any) -> None:
            try:
                stream = FrameStream(net_stream, max_frame)
            except Exception as exc:  # noqa: BLE001
                peer_log.bug(logger, protocol_id, exc, f"could not wrap an inbound {protocol_id} stream")
                await _best_effort_reset(net_stream)
                return
            try:
                await handler(stream)
            except Exception as exc:  # noqa: BLE001 - the peer's doing or our bug: peer_log tells which
                peer_log.failed(logger, stream.remote_peer_id, protocol_id, exc)
                await stream.reset()
            else:
                await stream.close()

        return run_handler

    async def open_stream(self, peer_id: str, protocol_id: str) -> FrameStream:
        """Open a stream to ``peer_id`` speaking ``protocol_id``.

        Dials from the peerstore if not connected. Raises
        ``ProtocolNotSupported`` if the peer does not serve the protocol and
        ``PeerUnreachable`` if there is no way to reach it.
        """
        pid = _parse_peer_id(peer_id)
        if pid == self._id:
            raise MalformedInput("cannot open a stream to ourselves")
        if not self._swarm.get_connections(pid):
            self._swarm.unblock_peer(pid)  # pitfall 7: our caller decides on retries
        try:
            if self._swarm.get_connections(pid):
                net_stream = await self._new_stream_pipelined(pid, protocol_id)
            else:
                net_stream = await self._host.new_stream(pid, [TProtocol(protocol_id)])
        except (*_LIBRARY_IO_ERRORS, OSError) as exc:
            if _protocol_refused(exc):
                raise ProtocolNotSupported(
                    f"{peer_id} does not serve {protocol_id}"
                ) from exc
            if self._swarm.get_connections(pid):
                raise StreamAborted(f"opening {protocol_id} to {peer_id}: {exc}") from exc
            raise PeerUnreachable(f"cannot reach {peer_id}: {exc}") from exc
        return FrameStream(net_stream, self._max_frame)

    async def _new_stream_pipelined(self, pid: ID, protocol_id: str) -> Any:
        """A stream on an existing connection, negotiated in one round trip.

        The library's multistream-select client writes the multistream
        header, waits for it to come back, then writes the protocol and waits
        again: two round trips, a quarter of a job's time to first token on
        loopback. The listener reads each message exactly (varint length,
        then that many bytes), so both can go in one write and both answers
        be read after it, which multistream-select allows (the listener
        answers each message in order). An answer other than the header and
        then the protocol fails the stream as the library's client would.
        """
        net_stream = await self._swarm.new_stream(pid)
        try:
            with trio.fail_after(NEGOTIATE_TIMEOUT_S):
                await net_stream.write(
                    encode_delim(MULTISELECT_PROTOCOL_ID.encode()) + encode_delim(protocol_id.encode()))
                header = (await read_delim(net_stream)).decode(errors="replace")
                if header != MULTISELECT_PROTOCOL_ID:
                    raise MultiselectClientError(f"multiselect protocol ID mismatch: got {header[:60]!r}")
                answer = (await read_delim(net_stream)).decode(errors="replace")
                if answer == PROTOCOL_NOT_FOUND_MSG:
                    raise ProtocolNotSupportedError(f"protocol {protocol_id} not supported")
                if answer != protocol_id:
                    raise MultiselectClientError(f"asked for {protocol_id}, the peer answered {answer[:60]!r}")
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                try:
                    await net_stream.reset()
                except Exception:  # noqa: BLE001 - it is going away either way
                    pass
            if isinstance(exc, trio.TooSlowError):
                raise MultiselectClientError(f"negotiating {protocol_id} timed out") from exc
            raise
        net_stream.set_protocol(TProtocol(protocol_id))
        return net_stream

    # -- gossip ---------------------------------------------------------------

    def _require_gossip(self) -> _Pubsub:
        if self._pubsub is None:
            raise RuntimeError("gossip is off on this host: pass gossip=GossipConfig()")
        return self._pubsub

    def set_topic_validator(self, topic: str, validator: TopicValidator | None) -> None:
        """Install ``validator(from_peer_id, data) -> bool`` for ``topic``.

        It runs on every message before it is delivered here or forwarded to
        anyone, after our size check and rate limit. ``from_peer_id`` is the
        signed origin. Returning False, or raising, drops the message. Our own
        publishes are checked too, and ``publish`` raises ``PublishRejected``
        instead of sending. ``None`` removes it.
        """
        self._require_gossip()
        if validator is None:
            self._validators.pop(topic, None)
        else:
            self._validators[topic] = validator
        self._install_validator(topic)

    def _install_validator(self, topic: str) -> None:
        pubsub = self._require_gossip()
        if topic in self._validated_topics:
            return

        def validate(forwarder: ID, msg: Any) -> bool:
            return self._validate(topic, forwarder, msg)

        pubsub.set_topic_validator(topic, validate, is_async_validator=False)
        self._validated_topics.add(topic)

    def _validate(self, topic: str, forwarder: ID, msg: Any) -> bool:
        config = self._gossip_config
        assert config is not None
        data = msg.data
        if len(msg.topicIDs) != 1:
            # We never publish to several topics at once; refusing such
            # messages means one validator always has the last word.
            self._stats["rejected"] += 1
            return False
        if len(data) > config.max_message_size:
            self._stats["oversized"] += 1
            return False
        try:
            origin = ID(msg.from_id).to_base58()
        except Exception:  # noqa: BLE001
            self._stats["rejected"] += 1
            return False
        if origin == self.peer_id:
            # Our own publish, already checked by ``publish``; anything else
            # claiming to be from us is an echo or a forgery.
            return forwarder == self._id
        if self._limiter is not None and not self._limiter.allow(
            (origin, topic), trio.current_time()
        ):
            # Before the validator on purpose: a flood must not buy itself
            # signature checks.
            self._stats["rate_limited"] += 1
            self.peer_log.note(logger, origin, topic, Trouble.RATE_LIMITED, "message dropped")
            return False
        validator = self._validators.get(topic)
        if validator is None:
            return True
        try:
            ok = bool(validator(origin, bytes(data)))
        except Exception as exc:  # noqa: BLE001 - a validator that raises drops the message
            self.peer_log.failed(logger, origin, topic, exc)
            ok = False
        if not ok:
            self._stats["rejected"] += 1
            logger.debug("validator rejected a message from %s on %s", origin, topic)
        return ok

    def _deliver(self, msg: Any) -> None:
        try:
            origin = ID(msg.from_id).to_base58()
        except Exception:  # noqa: BLE001 - validated already; belt and braces
            return
        for topic in msg.topicIDs:
            for sub in self._subs.get(topic, ()):
                if sub._offer(GossipMessage(origin, bytes(msg.data))):
                    self._stats["delivered"] += 1
                    sub._behind = False
                    continue
                self._stats["queue_full"] += 1
                if not sub._behind:  # once per episode, not once per message
                    sub._behind = True
                    logger.warning("a subscriber to %s fell %d messages behind; dropping "
                                   "new messages until it catches up", topic,
                                   sub._send.statistics().current_buffer_used)

    async def subscribe(self, topic: str) -> Subscription:
        """Start receiving ``topic``; several subscribers per topic are fine.

        Messages we publish ourselves are delivered to our subscribers too.
        """
        pubsub = self._require_gossip()
        config = self._gossip_config
        assert config is not None
        if self._closing:
            raise trio.ClosedResourceError("host is closing")
        self._install_validator(topic)
        sub = Subscription(self, topic, config.subscription_queue)
        first = topic not in self._subs
        self._subs.setdefault(topic, []).append(sub)
        if first:
            await pubsub.subscribe(topic)
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.topic)
        if not subs or sub not in subs:
            return
        subs.remove(sub)
        if not subs:
            del self._subs[sub.topic]
            if self._pubsub is not None and not self._closing:
                await self._pubsub.unsubscribe(sub.topic)

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish ``data`` on ``topic``.

        Raises ``Oversized`` above ``GossipConfig.max_message_size`` and
        ``PublishRejected`` if the topic's validator refuses it. Identical
        bytes published again within ``seen_ttl`` are deduplicated (message id
        = content hash), so every message should carry something unique, such
        as a sequence number.
        """
        pubsub = self._require_gossip()
        config = self._gossip_config
        assert config is not None
        data = bytes(data)
        if len(data) > config.max_message_size:
            raise Oversized(
                f"gossip message of {len(data)} bytes exceeds {config.max_message_size}"
            )
        validator = self._validators.get(topic)
        if validator is not None and not validator(self.peer_id, data):
            raise PublishRejected(f"our own message failed the validator for {topic}")
        self._install_validator(topic)
        await pubsub.publish(topic, data)

    def mesh_peers(self, topic: str) -> list[str]:
        """Peers in our gossipsub mesh for ``topic`` (those we forward to)."""
        if self._router is None:
            return []
        return sorted(str(p) for p in self._router.mesh.get(topic, ()))

    def topic_peers(self, topic: str) -> list[str]:
        """Connected peers that told us they subscribe to ``topic``."""
        if self._pubsub is None:
            return []
        return sorted(str(p) for p in self._pubsub.peer_topics.get(topic, ()))

    def gossip_stats(self) -> dict[str, int]:
        """Counters: delivered, rejected, rate_limited, oversized, queue_full."""
        return dict(self._stats)

    def _end_subscriptions(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub._end()

    # -- bootstrap ------------------------------------------------------------

    async def _keep_connected(self, addr: str, config: BootstrapConfig) -> None:
        """Dial ``addr`` until connected; when it drops, start over."""
        pid_str = str(_parse_p2p_addr(addr).peer_id)
        backoff = config.initial_backoff
        while True:
            if self.is_connected(pid_str):
                backoff = config.initial_backoff
                changed = self._conn_changed
                # Woken by any connection event. The timeout is a safety net:
                # the swarm may still list a connection for a moment after
                # reporting it gone.
                with trio.move_on_after(1):
                    await changed.wait()
                continue
            try:
                await self.connect(addr, timeout=config.dial_timeout)
            except Exception as exc:  # noqa: BLE001 - this loop must outlive any dial
                if not isinstance(exc, P2PGPUError):
                    logger.warning("unexpected error dialing bootstrap peer %s", pid_str,
                                   exc_info=True)
                delay = backoff * random.uniform(0.8, 1.2)
                logger.debug("bootstrap peer %s unreachable (%s); retry in %.1f s",
                             pid_str, exc, delay)
                await trio.sleep(delay)
                backoff = min(backoff * 2, config.max_backoff)
            else:
                logger.info("connected to bootstrap peer %s", pid_str)

    def _start_bootstrap(self, nursery: trio.Nursery, config: BootstrapConfig) -> None:
        for addr in config.peers:
            pid = str(_parse_p2p_addr(addr).peer_id)
            if pid == self.peer_id:
                continue
            self._remember(pid, addr, bootstrap=True)
            nursery.start_soon(self._keep_connected, addr, config)


async def _best_effort_reset(net_stream: Any) -> None:
    try:
        await net_stream.reset()
    except Exception:  # noqa: BLE001
        pass


def _quiet_libp2p_logs(debug: bool) -> None:
    lib = logging.getLogger("libp2p")
    if debug:
        # importing libp2p set propagate=False; let our handlers see it all
        lib.setLevel(logging.DEBUG)
        lib.propagate = True
    else:
        lib.setLevel(logging.CRITICAL)
        # this child sets its own level (INFO) at import time
        logging.getLogger("libp2p.network.auto_connector").setLevel(logging.CRITICAL)


def _key_pair(node_key: NodeKey) -> KeyPair:
    private = Ed25519PrivateKey.from_bytes(node_key.seed)
    return KeyPair(private, private.get_public_key())


def _guard_pubsub_handler(pubsub: Pubsub, peer_log: PeerLog, protocol_id: str) -> Callable[[Any], Awaitable[None]]:
    """Pitfall 3 for the handlers the library registers for gossipsub."""

    async def guarded(net_stream: Any) -> None:
        try:
            await pubsub.stream_handler(net_stream)
        except Exception as exc:  # noqa: BLE001 - remote input must never crash us
            peer = getattr(getattr(net_stream, "muxed_conn", None), "peer_id", None)
            # The library's own exceptions (protobuf's DecodeError...): the
            # peer's bytes all the same, so one line, never a traceback.
            trouble = trouble_of(exc) or Trouble.MALFORMED
            peer_log.note(logger, None if peer is None else str(peer), protocol_id, trouble,
                          f"{type(exc).__name__}: {exc}")
            await _best_effort_reset(net_stream)
            if peer is not None:
                try:
                    pubsub._handle_dead_peer(peer)
                except Exception:  # noqa: BLE001
                    pass

    return guarded


@asynccontextmanager
async def open_host(
    node_key: NodeKey,
    listen_addrs: Sequence[str] = DEFAULT_LISTEN_ADDRS,
    *,
    gossip: GossipConfig | None = None,
    bootstrap: BootstrapConfig | Iterable[str] | None = None,
    max_frame: int = MAX_FRAME,
    debug: bool = False,
    peer_log: PeerLog | None = None,
) -> AsyncIterator[P2PHost]:
    """Run a libp2p host for ``node_key`` for the duration of the block.

    The host's peer id is ``node_key.peer_id`` (same seed, same id). It
    listens on ``listen_addrs`` (loopback and a free port by default), runs
    gossipsub if ``gossip`` is given, and keeps the ``bootstrap`` peers
    connected. Its background tasks live in a nursery inside this block, so
    they stop with it; on the way out it closes the libp2p host before leaving
    ``host.run()`` (pitfall 4), so the listening port is released.
    ``peer_log``: where what peers cause is logged (``host.peer_log``; a
    default ``PeerLog`` if not given; tests pass one with their own clock).
    """
    _quiet_libp2p_logs(debug)
    maddrs = [_parse_listen_addr(a) for a in listen_addrs]
    if not maddrs:
        raise ConfigError("a host needs at least one listen address")
    if bootstrap is not None and not isinstance(bootstrap, BootstrapConfig):
        bootstrap = BootstrapConfig(peers=tuple(bootstrap))
    if bootstrap is not None:
        check_addresses((), bootstrap.peers)  # fail now, not in a background task

    key_pair = _key_pair(node_key)
    tcp = _ExclusiveTCP()
    libp2p_host = new_host(
        key_pair=key_pair,
        listen_addrs=maddrs,
        transports=[tcp],  # the only transport: TCP, bound without SO_REUSEPORT
        # pitfall 1: noise only; the default list includes plaintext
        sec_opt={
            NOISE_PROTOCOL_ID: NoiseTransport(
                key_pair, noise_privkey=create_x25519_key_pair().private_key
            )
        },
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        # pitfall 2: without this every dial waits 250 ms
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        enable_mDNS=False,  # pitfall 10
    )
    if str(libp2p_host.get_id()) != node_key.peer_id:
        raise AssertionError("libp2p derived another peer id from our key")
    swarm = libp2p_host.get_network()
    swarm.auto_connector = _NoAutoConnector(
        swarm, auto_connect_interval=swarm.connection_config.auto_connect_interval
    )
    host = P2PHost(libp2p_host, node_key, max_frame=max_frame, gossip=gossip, peer_log=peer_log)
    swarm.register_notifee(_ConnectionNotifee(host))

    # Our nursery and libp2p's own (host.run, its services) each wrap an
    # exception in an ExceptionGroup, several layers deep. A caller who writes
    # ``except PeerUnreachable`` around this block should catch what their
    # own code raised (and ``except ConfigError`` what startup raised), so a
    # group holding a single exception is unwrapped back to it. Groups with
    # several exceptions stay groups: they really are several failures.
    unwrapped: BaseException | None = None
    try:
        async with _run_host(libp2p_host, host, maddrs, gossip, bootstrap, tcp.bind_errors) as running:
            yield running
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) != 1:
            raise
        unwrapped = leaves[0]
    if unwrapped is not None:
        raise unwrapped


def _parse_listen_addr(addr: str) -> Any:
    """Accept ``/ip4|ip6/<address>/tcp/<port>`` only.

    Measured on the library: an address it cannot bind (another machine's IP,
    a UDP address) "starts" a host that listens on nothing, silently; and a
    ``/dns4/<name>/tcp/<port>`` it cannot resolve makes it listen on *every
    interface*. Neither is acceptable for a node that must stay where it was
    told (tests stay on loopback, pitfall 10's reasoning).
    """
    try:
        maddr = multiaddr.Multiaddr(addr)
        names = [p.name for p in maddr.protocols()]
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"not a multiaddr: {addr!r} ({exc})") from exc
    if len(names) != 2 or names[0] not in ("ip4", "ip6") or names[1] != "tcp":
        raise ConfigError(f"listen addresses are /ip4|ip6/<address>/tcp/<port>, got {addr!r}")
    return maddr


def _check_listening(libp2p_host: Any, wanted: list[Any], bind_errors: dict[str, OSError]) -> None:
    """Every requested listen address must have produced a listener.

    The swarm swallows a listener's failure (it only logs it, at a level we
    silence); ``bind_errors`` is where ``_ExclusiveTCPListener`` kept why.
    """
    have = [(a.value_for_protocol(a.protocols()[0].name), a.value_for_protocol("tcp"))
            for a in libp2p_host.get_transport_addrs()]
    for maddr in wanted:
        ip = maddr.value_for_protocol(maddr.protocols()[0].name)
        port = maddr.value_for_protocol("tcp")
        if not any(ip == h_ip and (port == "0" or port == h_port) for h_ip, h_port in have):
            error = bind_errors.get(str(maddr))
            if error is not None and error.errno == errno.EADDRINUSE:
                raise AddressInUse(
                    f"cannot listen on {maddr}: the p2p port is in use (is another node running? "
                    "pick another with --listen, or tcp/0 for any free port)"
                )
            reason = f": {error.strerror or error}" if error is not None else ""
            raise ConfigError(f"could not listen on {maddr}{reason}")


class _ExclusiveTCPListener(TCPListener):
    """py-libp2p 0.8.1's TCP listener with its sockets bound without
    SO_REUSEPORT.

    The library binds with SO_REUSEADDR and SO_REUSEPORT (so that hole
    punching can dial out from the listening port; we never do). With
    SO_REUSEPORT the kernel lets a second socket of the same user bind the
    same address, so a second node on our port started silently and the
    kernel shared our inbound connections between the two. Binding without
    it (SO_REUSEADDR alone never allows two listeners on one port) makes
    the bind itself fail with
    EADDRINUSE: no race window, unlike checking that the port is free and
    then letting the library bind it. Port 0 still picks a free port.

    Only ``listen`` differs from the library's: it binds our sockets, then
    serves them in the library's own background nursery, so the inherited
    ``close`` and ``get_addrs`` work unchanged (they rely on the library's
    private ``_lifecycle_lock``, ``_closed`` and ``_nursery``: the version is
    pinned, and ``test_net_host`` fails if they change).
    """

    def __init__(self, handler_function: Any, bind_errors: dict[str, OSError]) -> None:
        super().__init__(handler_function)
        self._bind_errors = bind_errors

    async def listen(self, maddr: Any) -> None:
        family = trio.socket.AF_INET6 if maddr.protocols()[0].name == "ip6" else trio.socket.AF_INET
        ip = maddr.value_for_protocol(maddr.protocols()[0].name)
        port = int(maddr.value_for_protocol("tcp"))
        sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
        try:
            # As the library does, less SO_REUSEPORT. SO_REUSEADDR only lets
            # us rebind a port whose old connections linger in TIME_WAIT.
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            await sock.bind((ip, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            self._bind_errors[str(maddr)] = exc
            raise OpenConnectionError(f"cannot listen on {maddr}: {exc}") from exc
        listeners = [trio.SocketListener(sock)]

        async def serve(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            await trio.serve_listeners(self._serve_connection, listeners, task_status=task_status)

        async with self._lifecycle_lock:
            try:
                if self._closed:
                    raise OpenConnectionError(f"cannot listen on {maddr}: the listener is closed")
                if self._nursery is None:
                    await self._spawn_background_task()
                if self._nursery is None:
                    raise OpenConnectionError(f"cannot listen on {maddr}: no background task")
                await self._nursery.start(serve)
            except BaseException:
                for listener in listeners:
                    await listener.aclose()
                raise
            self.listeners.extend(listeners)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            await self.handler(TrioTCPStream(stream))
        except Exception as exc:  # noqa: BLE001 - as the library's own listener: one bad connection is not fatal
            logger.debug("inbound connection failed: %r", exc)


class _ExclusiveTCP(TCP):
    """The TCP transport with ``_ExclusiveTCPListener`` listeners; keeps
    each failed bind's ``OSError`` by listen address for ``_check_listening``."""

    def __init__(self) -> None:
        super().__init__()
        self.bind_errors: dict[str, OSError] = {}

    def create_listener(self, handler_function: Any) -> TCPListener:
        return _ExclusiveTCPListener(handler_function, self.bind_errors)


def _leaves(exc: BaseException) -> Iterable[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


@asynccontextmanager
async def _run_host(
    libp2p_host: Any,
    host: P2PHost,
    maddrs: list[Any],
    gossip: GossipConfig | None,
    bootstrap: BootstrapConfig | None,
    bind_errors: dict[str, OSError],
) -> AsyncIterator[P2PHost]:
    """The running part of ``open_host``: services, tasks, orderly shutdown."""
    async with libp2p_host.run(maddrs):
        try:
            _check_listening(libp2p_host, maddrs, bind_errors)
            async with AsyncExitStack() as services:
                if gossip is not None:
                    router = GossipSub(
                        protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
                        degree=gossip.degree,
                        degree_low=gossip.degree_low,
                        degree_high=gossip.degree_high,
                        time_to_live=gossip.fanout_ttl,
                        gossip_window=gossip.gossip_window,
                        gossip_history=gossip.gossip_history,
                        heartbeat_initial_delay=gossip.heartbeat_initial_delay,
                        heartbeat_interval=gossip.heartbeat_interval,
                        prune_back_off=gossip.prune_back_off,
                        unsubscribe_back_off=gossip.unsubscribe_back_off,
                        spam_protection_enabled=False,
                        adaptive_gossip_enabled=False,
                    )
                    pubsub = _Pubsub(
                        libp2p_host,
                        router,
                        deliver=host._deliver,
                        peer_log=host.peer_log,
                        strict_signing=True,
                        msg_id_constructor=_content_msg_id,
                        seen_ttl=gossip.seen_ttl,
                    )
                    pubsub.validation_cache = _NoValidationCache()
                    pubsub.peer_queues = _SizedQueues(gossip.outbound_queue)
                    for proto in router.get_protocols():
                        guarded = _guard_pubsub_handler(pubsub, host.peer_log, str(proto))
                        libp2p_host.set_stream_handler(proto, guarded)
                    await services.enter_async_context(background_trio_service(pubsub))
                    await services.enter_async_context(background_trio_service(router))
                    await pubsub.wait_until_ready()
                    host._pubsub, host._router = pubsub, router
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(host.peer_log.run)
                    if bootstrap is not None:
                        host._start_bootstrap(nursery, bootstrap)
                    logger.info("host %s listening on %s", host.peer_id, host.listen_addrs())
                    try:
                        yield host
                    finally:
                        host._closing = True
                        host._end_subscriptions()
                        nursery.cancel_scope.cancel()
        finally:
            host._closing = True
            host._end_subscriptions()
            host.peer_log.flush(final=True)
            # Shielded, but bounded: close() must run even when we are being
            # cancelled, or the listener stays open (pitfall 4).
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await libp2p_host.close()
            logger.info("host %s closed", host.peer_id)

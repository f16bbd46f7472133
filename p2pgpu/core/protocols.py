"""Protocol ids, topic names and size limits of the p2pgpu wire: one place.

Everything another node must agree on to talk to us by name lives here, so a
version bump is one edit and a grep finds every user (DESIGN §4).

Stream protocols are libp2p protocol ids negotiated by multistream-select on
every new stream. Gossip topics carry the network tag so that two networks
(a local test network and a public one, say) never mix messages even when
their nodes happen to connect: a node simply is not subscribed to the other
network's topics, and libp2p ignores messages for topics it does not follow.

Size limits, and why they are what they are:

- ``MAX_FRAME`` (1 MiB) bounds one length-prefixed frame on a stream. A job
  stream carries requests, token chunks, vouchers and receipts, all far
  smaller; the limit exists so that a peer cannot make us buffer an arbitrary
  amount of memory by announcing a huge length.
- ``MAX_GOSSIP_MESSAGE`` (64 KiB) bounds one gossip message. py-libp2p 0.8.1
  silently drops pubsub RPCs over 1 MiB (probe pitfall 5), so anything near
  that would vanish without an error; offers and ledger announcements are a
  few hundred bytes to a few KiB, and every gossip byte is paid for by every
  node, so the limit sits far below the silent cliff.

Pure module: standard library only.
"""

from __future__ import annotations

import re

__all__ = [
    "JOB_PROTOCOL",
    "LEDGER_SYNC_PROTOCOL",
    "PEERS_PROTOCOL",
    "STREAM_PROTOCOLS",
    "FRAME_HEADER_SIZE",
    "MAX_FRAME",
    "MAX_GOSSIP_MESSAGE",
    "NETWORK_TAG_BYTES",
    "network_tag",
    "offers_topic",
    "ledger_topic",
]

# --- stream protocols (libp2p protocol ids) ---------------------------------
JOB_PROTOCOL = "/p2pgpu/job/1.0.0"
"""One job: request, accept/reject, tokens, vouchers, receipt (DESIGN §4)."""

LEDGER_SYNC_PROTOCOL = "/p2pgpu/ledger-sync/1.0.0"
"""Anti-entropy: exchange chain heads, fetch missing ranges (DESIGN §5)."""

PEERS_PROTOCOL = "/p2pgpu/peers/1.0.0"
"""Peer exchange: learn more peers' addresses than the bootstrap list (``core.peerex``)."""

STREAM_PROTOCOLS = (JOB_PROTOCOL, LEDGER_SYNC_PROTOCOL, PEERS_PROTOCOL)

# --- frame and message limits ------------------------------------------------
FRAME_HEADER_SIZE = 4
"""Frames start with a 4-byte big-endian unsigned payload length."""

MAX_FRAME = 1 << 20
"""Largest frame payload accepted or sent on a stream (1 MiB)."""

MAX_GOSSIP_MESSAGE = 64 * 1024
"""Largest gossip message payload we publish, accept or forward (64 KiB)."""

# --- gossip topics -----------------------------------------------------------
NETWORK_TAG_BYTES = 8
"""A network tag is the first 8 bytes of the network id, as 16 hex digits."""

_TAG_RE = re.compile(r"^[0-9a-f]{1,64}$")


def network_tag(network_id: bytes) -> str:
    """The short hex tag that names a network inside topic names.

    ``network_id`` is the genesis hash; the tag is its first 8 bytes in lower
    hex. 64 bits are plenty to keep independently created networks apart in
    topic names; the full id is still inside every signed object, which is what
    actually stops cross-network replay (DESIGN §3).
    """
    if not isinstance(network_id, bytes) or len(network_id) < NETWORK_TAG_BYTES:
        raise ValueError(f"a network id is at least {NETWORK_TAG_BYTES} bytes")
    return network_id[:NETWORK_TAG_BYTES].hex()


def _check_tag(tag: str) -> str:
    # Topic names are matched byte for byte; refuse anything that could make
    # two spellings of one network (upper case) or smuggle a "/" into a topic.
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        raise ValueError(f"a network tag is 1-64 lower-case hex digits, got {tag!r}")
    return tag


def offers_topic(tag: str) -> str:
    """Gossip topic for signed offers and withdrawals: ``p2pgpu/<net>/offers/1``."""
    return f"p2pgpu/{_check_tag(tag)}/offers/1"


def ledger_topic(tag: str) -> str:
    """Gossip topic for ledger announcements and fork proofs: ``p2pgpu/<net>/ledger/1``."""
    return f"p2pgpu/{_check_tag(tag)}/ledger/1"

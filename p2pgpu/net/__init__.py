"""The network edge: libp2p hosts, framed streams, gossip and bootstrap.

``p2pgpu.net.host`` is the only module in the project that imports py-libp2p
(DESIGN §9); everything here speaks plain strings and bytes, and raises the
errors of ``p2pgpu.errors`` (plus the refinements defined in ``host``).
"""

from p2pgpu.net.host import (
    DEFAULT_LISTEN_ADDRS,
    BootstrapConfig,
    FrameStream,
    GossipConfig,
    GossipMessage,
    P2PHost,
    PeerState,
    PeerUnreachable,
    ProtocolNotSupported,
    PublishRejected,
    StreamAborted,
    StreamHandler,
    Subscription,
    TopicValidator,
    open_host,
)

__all__ = [
    "DEFAULT_LISTEN_ADDRS",
    "BootstrapConfig",
    "FrameStream",
    "GossipConfig",
    "GossipMessage",
    "P2PHost",
    "PeerState",
    "PeerUnreachable",
    "ProtocolNotSupported",
    "PublishRejected",
    "StreamAborted",
    "StreamHandler",
    "Subscription",
    "TopicValidator",
    "open_host",
]

"""What a simulated node's parts see of their node.

The replica, the consumer and provider sides, and the invariant observer
each hold their node; ``NodeHost`` is that view, so those modules need not
import ``node`` (which builds them: the import graph stays acyclic).
``SimNode`` is the one implementation.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from p2pgpu.core.genesis import Genesis
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.ledger import Entry
from p2pgpu.testing.sim.config import Plant, Timing
from p2pgpu.testing.sim.network import World

__all__ = ["NodeHost"]


class NodeHost(Protocol):
    world: World
    index: int
    name: str
    key: NodeKey
    genesis: Genesis
    network_id: bytes
    timing: Timing
    plant: Plant | None
    skew: int
    up: bool
    incarnation: int
    kept_store: dict[bytes, bytes]  # durable: the job store's kept vouchers
    checks: Any  # invariants.Checks
    replica: Any  # replica.Replica; None while the node is down

    def now(self) -> int:
        """This node's clock (ms)."""

    def later(self, delay_ms: int, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback`` after ``delay_ms`` unless the node crashed meanwhile."""

    def later_at(self, node_ms: int, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback`` when this node's clock reads ``node_ms`` (same condition)."""

    def trace(self, what: str) -> None:
        """One trace line, while the world traces."""

    def offer_soon(self) -> None:
        """A slot was taken or freed: offer again soon."""

    def on_applied(self, entries: list[Entry]) -> None:
        """Entries acknowledged by a commit."""

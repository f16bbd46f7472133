"""Real nodes in one trio process, for tests: ``LocalNetwork``.

Each node is a real ``p2pgpu.node.Node`` (real libp2p host on 127.0.0.1,
real LevelDB in its own data dir under ``root``, the Ollama stand-in for
the providers), started in the test's nursery. A node can be stopped
gracefully (``stop``: its offer is withdrawn, its databases closed, and the
call returns once it has ended, so its data dir can be opened again),
crashed (``crash``: cancelled with no goodbye, what a killed process looks
like to its peers) and started again on the same data dir. The same in
separate OS processes is ``p2pgpu.testing.devnet``.
"""

from __future__ import annotations

import dataclasses
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from p2pgpu.api import SubmitRequest
from p2pgpu.config import NodeConfig
from p2pgpu.core.genesis import Genesis, LedgerParams
from p2pgpu.core.identity import NodeKey
from p2pgpu.datadir import DataDir
from p2pgpu.node import Node, now_ms

__all__ = ["HEARTBEAT_S", "TTL_S", "MALLORY", "LocalNetwork", "collect", "first_loopback", "live", "settled",
           "tokens_seen"]

HEARTBEAT_S = 0.5
TTL_S = 2.0
STOP_DEADLINE_S = 60.0  # generous: a loaded two-core machine
MALLORY = NodeKey(b"m" * 32)  # funded in every genesis, run by no node: the tests' forger
COINS = 10**9  # base units each account starts with


def first_loopback(addrs: list[str]) -> str:
    return next(a for a in addrs if "/127.0.0.1/" in a)


class LocalNetwork:
    """``count`` nodes' keys and one genesis that funds them (and
    ``MALLORY``); nodes start when a test asks. Node 0 holds the faucet.

    ``config(index, ...)`` is every node's ``NodeConfig``: loopback only,
    fast heartbeats, a provider exactly when it is given an Ollama.
    """

    def __init__(self, root: Path, count: int, params: LedgerParams = LedgerParams(), *,
                 queue_timeout_s: float | None = None) -> None:
        self.root = root
        self.keys: list[NodeKey] = []
        for index in range(count):
            data_dir = DataDir(root / f"node{index}")
            data_dir.ensure()
            self.keys.append(data_dir.load_or_create_key(create=True))
        self.genesis = Genesis(
            "localnet", now_ms(), self.keys[0].public_key,
            tuple(sorted([(k.public_key, COINS) for k in self.keys] + [(MALLORY.public_key, COINS)])),
            params,
        )
        (root / "genesis.json").write_text(self.genesis.to_json())
        self.queue_timeout_s = queue_timeout_s
        self.nodes: list[Node] = []
        self.scopes: list[trio.CancelScope] = []
        self.ended: dict[int, trio.Event] = {}

    def config(self, index: int, bootstrap: tuple[str, ...], ollama_host: str | None) -> NodeConfig:
        config = NodeConfig(
            data_dir=self.root / f"node{index}",
            listen="/ip4/127.0.0.1/tcp/0",
            bootstrap=bootstrap,
            genesis=self.root / "genesis.json",
            ollama_host=ollama_host or "http://127.0.0.1:9",
            provide=ollama_host is not None,
            offer_cpu=True,
            heartbeat_s=HEARTBEAT_S,
            offer_ttl_s=TTL_S,
            sync_interval_s=1.0,
            gateway_listen="127.0.0.1:0",  # every node its own free port (the default 11435 is one per machine)
        )
        if self.queue_timeout_s is not None:
            config = dataclasses.replace(config, queue_timeout_s=self.queue_timeout_s)
        return config

    async def start(self, nursery: trio.Nursery, index: int, ollama_host: str | None = None) -> Node:
        """Start node ``index`` (again, on the same data dir, if it ran
        before), bootstrapping from any other node still running."""
        others = [n for i, n in enumerate(self.nodes) if i != index and not self.ended[i].is_set()]
        bootstrap = (first_loopback(others[0].host.listen_addrs()),) if others else ()
        node = Node(self.config(index, bootstrap, ollama_host))
        scope = trio.CancelScope()
        ended = trio.Event()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            try:
                with scope:
                    await node.run(task_status=task_status)
            finally:
                ended.set()

        await nursery.start(run)
        if index < len(self.nodes):  # a restart: same slot
            self.nodes[index], self.scopes[index] = node, scope
        else:
            self.nodes.append(node)
            self.scopes.append(scope)
        self.ended[index] = ended
        return node

    def crash(self, index: int) -> None:
        """Cancel a node without a withdrawal: what a killed process looks like."""
        self.scopes[index].cancel()

    async def stop(self, index: int) -> None:
        self.nodes[index].stop()
        with trio.fail_after(STOP_DEADLINE_S):
            await self.ended[index].wait()

    async def stop_all(self) -> None:
        for index in range(len(self.nodes)):
            if not self.ended[index].is_set():
                await self.stop(index)


def live(node: Node) -> list:
    """The offers ``node`` holds that have not expired."""
    return node.book.live(now_ms())


async def collect(node: Node, request: SubmitRequest, on_event=None) -> list[dict]:
    """Every event of one ``submit``; ``on_event`` is awaited after each."""
    events = []
    async for event in node.submit(request):
        events.append(event)
        if on_event is not None:
            await on_event(event)
    return events


def tokens_seen(events: list[dict]) -> int:
    return sum(1 for e in events if e["type"] == "token")


def settled(nodes: list[Node]) -> bool:
    """One ledger state on every node and nothing held by anyone."""
    return len({n.ledger.state_hash() for n in nodes}) == 1 and all(
        n.ledger.account(m.key.public_key).held == 0 for n in nodes for m in nodes)


async def run_replicator(stack: AsyncExitStack, nursery: trio.Nursery, replicator) -> None:
    """Run ``replicator`` (a ``LedgerReplicator``) in ``nursery`` until
    ``stack`` closes, then stop it and wait until it has: for tests that
    build hosts and replicators by hand rather than whole nodes."""
    scope = trio.CancelScope()
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await replicator.run(task_status=task_status)
        finally:
            stopped.set()

    async def stop() -> None:
        scope.cancel()
        await stopped.wait()

    await nursery.start(run)
    stack.push_async_callback(stop)

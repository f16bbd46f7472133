"""A peer flooding a node with bad streams costs the node's log a few lines.

Real libp2p hosts on 127.0.0.1 (mDNS off, as every host). ``mallory``
opens hundreds of streams to a node and writes garbage on each (a 2 GB
length prefix, truncated frames, undecodable msgpack); the node must keep
serving, and its log must hold one line per kind of trouble and, once the
window has passed, one summary per kind: no traceback, nothing per stream.
The node's peer log runs on a clock the test moves, so "the window has
passed" takes no waiting. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import trio

from p2pgpu.core.codec import pack
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.jobs import Prices
from p2pgpu.core.kv import MemoryStore
from p2pgpu.core.ledger import Ledger
from p2pgpu.core.protocols import JOB_PROTOCOL, LEDGER_SYNC_PROTOCOL, PEERS_PROTOCOL
from p2pgpu.errors import P2PGPUError
from p2pgpu.executor import OllamaBackend
from p2pgpu.jobrunner import ProviderService, run_job
from p2pgpu.net import GossipConfig, P2PHost, open_host
from p2pgpu.net.peer_exchange import PeerExchange
from p2pgpu.net.peerlog import PeerLog
from p2pgpu.replication import LedgerReplicator
from p2pgpu.testing.ledger import key_for, make_genesis
from p2pgpu.testing.ollama_standin import serve_standin
from p2pgpu.testing.nodes import run_replicator
from p2pgpu.testing.waiting import wait_until

DEADLINE = 60.0  # for a flood of hundreds of streams on a loaded 2-core machine
GENESIS = make_genesis(("alice", "bob", "carol"), allocation=10**9)
NET = GENESIS.network_id
MODEL = "llama3.2:1b"
PRICES = Prices(price_in=1_000_000, price_out=2_000_000)
HOUR = 3600.0

GIANT = (2**31).to_bytes(4, "big")  # a 2 GB frame announced
TRUNCATED = (100).to_bytes(4, "big") + b"0123456789"  # 100 bytes promised, 10 sent, then EOF


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


GARBAGE = (GIANT, TRUNCATED, frame(b"\xc1"), frame(b"\x93\x01\x02"), frame(pack([99, "what?"])))


def now_ms() -> int:
    return int(time.time() * 1000)


class Clock:
    """The victim's peer-log clock: moved by the test, never slept on."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Node:
    host: P2PHost
    ledger: Ledger
    rep: LedgerReplicator


@asynccontextmanager
async def node(stack: AsyncExitStack, nursery: trio.Nursery, key: NodeKey, peer_log: PeerLog | None = None
               ) -> AsyncIterator[Node]:
    host = await stack.enter_async_context(open_host(key, gossip=GossipConfig(), peer_log=peer_log))
    ledger = Ledger(MemoryStore(), GENESIS)
    rep = LedgerReplicator(host, ledger, network_id=NET, now_ms=now_ms, sync_interval_s=HOUR)
    stack.callback(rep.close)
    await run_replicator(stack, nursery, rep)
    yield Node(host, ledger, rep)


async def flood(mallory: P2PHost, victim: str, protocol: str, payloads: list[bytes], parallel: int = 10) -> int:
    """One stream per payload, ``parallel`` at a time: write the raw bytes
    (the public API frames them properly, so write underneath it), end our
    side, read whatever comes back until the victim resets or closes.
    Returns how many payloads were written."""
    todo = list(payloads)
    written = 0

    async def worker() -> None:
        nonlocal written
        while todo:
            payload = todo.pop()
            try:
                stream = await mallory.open_stream(victim, protocol)
            except P2PGPUError:
                continue  # the victim may reset a stream while it opens: a flood does not care
            try:
                await stream._stream.write(payload)  # noqa: SLF001 - an attacker speaks raw bytes
                written += 1
                await stream.close_write()
                with trio.move_on_after(DEADLINE):
                    while await stream.receive_frame() is not None:
                        pass
            except (P2PGPUError, trio.ClosedResourceError):
                pass
            finally:
                await stream.reset()

    async with trio.open_nursery() as nursery:
        for _ in range(parallel):
            nursery.start_soon(worker)
    return written


def about(caplog, peer_id: str) -> list[logging.LogRecord]:
    """The records the victim wrote about ``peer_id`` (not the attacker's
    own host's, which run in this process too)."""
    return [r for r in caplog.records if r.getMessage().startswith(f"peer {peer_id} ")]


def subject(record: logging.LogRecord) -> str:
    """``peer X sent oversized input on P``: the part a line and its summary share."""
    return record.getMessage().split(": ")[0].split(" \u2026 ")[0]


def no_traceback(records: list[logging.LogRecord]) -> bool:
    return all(r.exc_info is None and r.exc_text is None and "Traceback" not in r.getMessage() for r in records)


async def test_a_flood_of_bad_sync_and_peer_exchange_streams_is_a_few_lines(caplog) -> None:
    caplog.set_level(logging.INFO, logger="p2pgpu")
    clock = Clock()
    peer_log = PeerLog(clock=clock)
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        victim = await stack.enter_async_context(node(stack, nursery, key_for("bob"), peer_log))
        await nursery.start(PeerExchange(victim.host, interval_s=HOUR).run)
        mallory = await stack.enter_async_context(open_host(NodeKey.generate()))
        entry = (await victim.rep.append(lambda lg: lg.send(key_for("bob"), key_for("carol").public_key, 7,
                                                            now_ms())))[0]
        await mallory.connect(victim.host.listen_addrs()[0])

        sync_payloads = [GARBAGE[i % len(GARBAGE)] for i in range(200)]
        peers_payloads = [frame(b"\xc1"), frame(pack([1, "x"]))] * 25
        with trio.fail_after(DEADLINE):
            # One sync stream at a time: more from one peer are answered
            # "busy" without a byte read (the replication policy's limit).
            sent = await flood(mallory, victim.host.peer_id, LEDGER_SYNC_PROTOCOL, sync_payloads, parallel=1)
            sent += await flood(mallory, victim.host.peer_id, PEERS_PROTOCOL, peers_payloads)
        assert sent >= 200

        def counted() -> int:
            stats = peer_log.stats()
            return stats["oversized"] + stats["truncated"] + stats["malformed"] + stats["protocol"]

        await wait_until(lambda: counted() >= sent, DEADLINE, what="the victim to handle every bad stream")

        # Still serving: an honest peer syncs the victim's entry.
        alice = await stack.enter_async_context(node(stack, nursery, key_for("alice")))
        await alice.host.connect(victim.host.listen_addrs()[0])
        with trio.fail_after(DEADLINE):
            await alice.rep.sync_with(victim.host.peer_id)
        assert alice.ledger.has_entry(entry.id)

        lines = about(caplog, mallory.peer_id)
        kinds = {subject(r) for r in lines}
        # One line per kind of trouble and protocol (undecodable msgpack and
        # an unknown message type are both malformed input).
        who = f"peer {mallory.peer_id}"
        assert kinds == {f"{who} sent oversized input on {LEDGER_SYNC_PROTOCOL}",
                         f"{who} sent truncated input on {LEDGER_SYNC_PROTOCOL}",
                         f"{who} sent malformed input on {LEDGER_SYNC_PROTOCOL}",
                         f"{who} sent malformed input on {PEERS_PROTOCOL}"}
        assert len(lines) == len(kinds), [r.getMessage() for r in lines]
        assert no_traceback(lines) and "Traceback" not in caplog.text

        # The window passes: one summary per kind, still no traceback.
        clock.now += 61
        await wait_until(lambda: len(about(caplog, mallory.peer_id)) == 2 * len(kinds), DEADLINE,
                         what="a summary per kind")
        lines = about(caplog, mallory.peer_id)
        summaries = [r.getMessage() for r in lines if "more like it in the last 60 s" in r.getMessage()]
        assert len(summaries) == len(kinds) == len({subject(r) for r in lines})
        suppressed = sum(int(s.split(" and ")[-1].split(" more")[0]) for s in summaries)
        assert suppressed + len(kinds) == counted()
        assert no_traceback(lines) and "Traceback" not in caplog.text
        nursery.cancel_scope.cancel()


async def test_a_flood_of_bad_job_streams_is_a_few_lines_and_jobs_still_run(caplog) -> None:
    caplog.set_level(logging.INFO, logger="p2pgpu")
    clock = Clock()
    peer_log = PeerLog(clock=clock)
    async with AsyncExitStack() as stack:
        standin = await stack.enter_async_context(serve_standin([MODEL]))
        nursery = await stack.enter_async_context(trio.open_nursery())
        bob = await stack.enter_async_context(node(stack, nursery, key_for("bob"), peer_log))
        service = ProviderService(bob.host, bob.rep, bob.ledger, key_for("bob"), OllamaBackend(standin.host),
                                  prices=PRICES, slots=1, now_ms=now_ms)
        service.start()
        stack.callback(service.close)
        mallory = await stack.enter_async_context(open_host(NodeKey.generate()))
        await mallory.connect(bob.host.listen_addrs()[0])

        with trio.fail_after(DEADLINE):
            sent = await flood(mallory, bob.host.peer_id, JOB_PROTOCOL, [GARBAGE[i % len(GARBAGE)] for i in range(200)])
        assert sent >= 150
        await wait_until(lambda: service.jobs_served >= sent, DEADLINE, what="bob to end every bad job stream")

        alice = await stack.enter_async_context(node(stack, nursery, key_for("alice")))
        await alice.host.connect(bob.host.listen_addrs()[0])
        with trio.fail_after(DEADLINE):
            result = await run_job(alice.host, alice.rep, alice.ledger, key_for("alice"), bob.host.peer_id, PRICES,
                                   model=MODEL, prompt="Why is the sky blue?", max_tokens=8, now_ms=now_ms)
        assert result.status == "completed", result.reason

        lines = about(caplog, mallory.peer_id)
        kinds = {subject(r) for r in lines}
        who = f"peer {mallory.peer_id}"
        assert kinds == {f"{who} sent {what} input on {JOB_PROTOCOL}" for what in ("oversized", "truncated", "malformed")}
        assert len(lines) == len(kinds), [r.getMessage() for r in lines]
        assert no_traceback(lines) and "Traceback" not in caplog.text

        clock.now += 61
        await wait_until(lambda: len(about(caplog, mallory.peer_id)) == 2 * len(kinds), DEADLINE,
                         what="a summary per kind")
        assert no_traceback(about(caplog, mallory.peer_id)) and "Traceback" not in caplog.text
        nursery.cancel_scope.cancel()

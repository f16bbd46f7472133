"""Catch-up benchmark: how fast a fresh node syncs a ledger from a peer.

    python -m p2pgpu.testing.sync_bench 50000            # prints one JSON line
    python -m p2pgpu.testing.sync_bench 50000 --in-process

``measure_catch_up(n)`` builds a ledger of ``n`` signed entries (``make_history``:
many accounts sending to each other and taking the sends in, so most entries
are RECEIVEs that name another chain's SEND, like a real ledger), serves it
from a real libp2p host on 127.0.0.1 (by default in a separate OS process,
so the server's work does not share our GIL), and times a fresh node on
LevelDB pulling all of it with ``LedgerReplicator.sync_with``: signatures
verified, rules applied, committed. The server process is
``python -m p2pgpu.testing.sync_bench serve N START_MS``; it prints
``READY <addr> <state hash hex>`` and serves until its stdin closes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from p2pgpu.core.genesis import Genesis, LedgerParams
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.kv import KeyValueStore, MemoryStore
from p2pgpu.core.ledger import Ledger
from p2pgpu.net import open_host
from p2pgpu.replication import LedgerReplicator
from p2pgpu.store import LevelDBStore
from p2pgpu.testing.ledger import key_for

ACCOUNTS = 200
ALLOCATION = 10**15


def bench_keys(accounts: int = ACCOUNTS) -> list[NodeKey]:
    return [key_for(f"bench{i:05d}") for i in range(accounts)]


def bench_genesis(start_ms: int, accounts: int = ACCOUNTS) -> Genesis:
    return Genesis(
        name="sync-bench",
        created_ms=start_ms,
        faucet=key_for("faucet").public_key,
        allocations=tuple(sorted((k.public_key, ALLOCATION) for k in bench_keys(accounts))),
        params=LedgerParams(),
    )


def make_history(n_entries: int, start_ms: int, store: KeyValueStore | None = None,
                 accounts: int = ACCOUNTS, seed: int = 1) -> Ledger:
    """A ledger holding exactly ``n_entries`` valid entries, stamped from
    ``start_ms`` on, one millisecond apart. Deterministic for a given seed."""
    rng = random.Random(seed)
    keys = bench_keys(accounts)
    ledger = Ledger(store if store is not None else MemoryStore(), bench_genesis(start_ms, accounts))
    pending: list[list[bytes]] = [[] for _ in keys]
    for i in range(n_entries):
        now = start_ms + i
        actor = rng.randrange(accounts)
        if pending[actor] and rng.random() < 0.5:
            ledger.receive(keys[actor], pending[actor].pop(), now)
        else:
            to = rng.randrange(accounts - 1)
            to += to >= actor
            sent = ledger.send(keys[actor], keys[to].public_key, 1 + rng.randrange(1000), now)
            pending[to].append(sent.id)
        if i % 2000 == 1999:
            ledger.commit()
    ledger.commit()
    return ledger


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _serve_forever(n_entries: int, start_ms: int) -> None:
    ledger = make_history(n_entries, start_ms)
    key = NodeKey.generate()
    async with open_host(key) as host:
        replicator = LedgerReplicator(host, ledger, network_id=ledger.network_id, now_ms=_now_ms)
        replicator.serve_requests()  # sync only: the benchmark measures catch-up, not gossip
        print("READY", host.listen_addrs()[0], ledger.state_hash().hex(), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async with stdin:
            while await stdin.receive_some(1024):
                pass
        replicator.close()


async def measure_catch_up(n_entries: int, *, separate_process: bool = True) -> dict:
    """Time a fresh LevelDB node syncing ``n_entries`` from a peer.

    Returns ``{"entries", "seconds", "entries_per_s", "state_hash_equal",
    "applied", "sessions", "server"}``; ``seconds`` runs from the sync
    request to the last commit (connection set-up excluded, generation
    excluded).
    """
    start_ms = _now_ms() - n_entries - 3_600_000
    genesis = bench_genesis(start_ms)
    tmp = Path(tempfile.mkdtemp(prefix="p2pgpu-sync-bench-"))
    store = LevelDBStore(tmp / "ledger")
    proc: subprocess.Popen | None = None
    try:
        ledger = Ledger(store, genesis)
        async with AsyncExitStack() as stack:
            if separate_process:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "p2pgpu.testing.sync_bench", "serve", str(n_entries), str(start_ms)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                )
                assert proc.stdout is not None
                with trio.fail_after(600):
                    line = await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
                if not line.startswith(b"READY "):
                    raise RuntimeError(f"benchmark server did not start: {line!r}")
                _, addr, server_hash = line.decode().split()
                server_state = bytes.fromhex(server_hash)
            else:
                source = make_history(n_entries, start_ms)
                server_state = source.state_hash()
                server_host = await stack.enter_async_context(open_host(NodeKey.generate()))
                server = LedgerReplicator(server_host, source, network_id=genesis.network_id, now_ms=_now_ms)
                stack.callback(server.close)
                server.serve_requests()
                addr = server_host.listen_addrs()[0]
            async with open_host(NodeKey.generate()) as host:
                client = LedgerReplicator(host, ledger, network_id=genesis.network_id, now_ms=_now_ms)
                try:
                    peer = await host.connect(addr)
                    t0 = time.perf_counter()
                    stats = await client.sync_with(peer)
                    seconds = time.perf_counter() - t0
                finally:
                    client.close()
                equal = ledger.state_hash() == server_state
        return {
            "entries": n_entries,
            "seconds": round(seconds, 3),
            "entries_per_s": round(stats.applied / seconds, 1),
            "state_hash_equal": equal,
            "applied": stats.applied,
            "sessions": stats.sessions,
            "server": "separate process" if separate_process else "in process",
        }
    finally:
        if proc is not None:
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> None:
    if argv[:1] == ["serve"]:
        trio.run(_serve_forever, int(argv[1]), int(argv[2]))
        return
    n = int(argv[0]) if argv else 50_000
    result = trio.run(lambda: measure_catch_up(n, separate_process="--in-process" not in argv))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])

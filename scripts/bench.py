#!/usr/bin/env python3
"""Benchmarks: ours against the reference ceiling, side by side, in one run.

    scripts/bench.py ledger [--json] [--entries N] [--runs R]

Each suite prints human-readable lines, then (with --json) one JSON object as
the very last line. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nacl.bindings  # noqa: E402

from p2pgpu.core.genesis import Genesis  # noqa: E402
from p2pgpu.core.identity import NodeKey  # noqa: E402
from p2pgpu.core.kv import MemoryStore  # noqa: E402
from p2pgpu.core.ledger import ApplyResult, Ledger  # noqa: E402
from p2pgpu.store import LevelDBStore  # noqa: E402
from p2pgpu.verify import ThreadedVerifier  # noqa: E402

GROUP = 100  # entries per synced write


def _median_rate(fn, count: int, runs: int) -> tuple[float, list[float]]:
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates), rates


def _peer_entries(accounts: int, count: int, seed: int = 7) -> tuple[Genesis, list[bytes]]:
    """A realistic replication stream: many accounts sending to each other and
    taking in what they were sent, in the order an honest network produces."""
    rng = random.Random(seed)
    keys = [NodeKey(rng.randbytes(32)) for _ in range(accounts)]
    faucet = NodeKey(rng.randbytes(32))
    genesis = Genesis("bench", 0, faucet.public_key, tuple((k.public_key, 10**12) for k in keys))
    author = Ledger(MemoryStore(), genesis)
    wires: list[bytes] = []
    pending: list[tuple[NodeKey, bytes]] = []
    now = 1_700_000_000_000
    while len(wires) < count:
        now += 1
        if pending and rng.random() < 0.5:
            key, send_id = pending.pop(rng.randrange(len(pending)))
            entry = author.receive(key, send_id, now)
        else:
            sender, recipient = rng.sample(keys, 2)
            entry = author.send(sender, recipient.public_key, rng.randint(1, 1000), now)
            pending.append((recipient, entry.id))
        wires.append(entry.wire)
        if len(wires) % 1000 == 0:
            author.commit()
    return genesis, wires


def bench_ledger(args) -> dict:
    n = args.entries
    runs = args.runs
    print(f"ledger: {n} entries per run, {runs} runs, synced groups of {GROUP}, {os.cpu_count()} cores")
    genesis, wires = _peer_entries(accounts=200, count=n)
    from p2pgpu.core.ledger import decode_entry

    entries = [decode_entry(w, genesis.network_id, verify=False) for w in wires]
    payloads = [(e.signed.signature + e.signed.payload, e.author) for e in entries]

    def raw_verify():
        for signed_message, public_key in payloads:
            nacl.bindings.crypto_sign_open(signed_message, public_key)

    verify_rate, verify_runs = _median_rate(raw_verify, n, runs)
    print(f"  raw ed25519 verify (PyNaCl, 1 thread)  {verify_rate:10,.0f}/s")
    verifier = ThreadedVerifier(threads=2)
    triples = [(e.author, e.signed.payload, e.signed.signature) for e in entries]

    def raw_verify_threads():
        for i in range(0, n, GROUP):
            verifier(triples[i : i + GROUP])

    verify2_rate, _ = _median_rate(raw_verify_threads, n, runs)
    print(f"  raw ed25519 verify (PyNaCl, 2 threads) {verify2_rate:10,.0f}/s")

    tmp = Path(tempfile.mkdtemp(prefix="p2pgpu-bench-"))
    try:
        def verify_apply():
            path = tmp / f"apply-{time.monotonic_ns()}"
            ledger = Ledger(LevelDBStore(path), genesis)
            now = 1_800_000_000_000
            for i, wire in enumerate(wires):
                result = ledger.offer(wire, now)
                if result.status != "applied":
                    raise SystemExit(f"bench stream broke at entry {i}: {result}")
                if i % GROUP == GROUP - 1:
                    ledger.commit()
            ledger.commit()
            ledger.close()

        single_rate, _ = _median_rate(verify_apply, n, runs)
        print(f"  verify + apply, one by one, 1 thread   {single_rate:10,.0f}/s")

        def verify_apply_batched():
            path = tmp / f"batch-{time.monotonic_ns()}"
            ledger = Ledger(LevelDBStore(path), genesis)
            now = 1_800_000_000_000
            for i in range(0, n, GROUP):
                for result in ledger.offer_batch(wires[i : i + GROUP], now, verifier):
                    if not isinstance(result, ApplyResult) or result.status != "applied":
                        raise SystemExit(f"bench stream broke near entry {i}: {result}")
                ledger.commit()
            ledger.close()

        apply_rate, _ = _median_rate(verify_apply_batched, n, runs)
        print(f"  verify + apply, batches of {GROUP}, 2 verify threads {apply_rate:10,.0f}/s")

        key = NodeKey(b"\x05" * 32)
        messages = [p[len(e.signed.signature):] for p, e in zip((m for m, _ in payloads), entries)]

        def raw_sign():
            for message in messages:
                key.sign(message)

        sign_rate, sign_runs = _median_rate(raw_sign, n, runs)
        print(f"  raw ed25519 sign (PyNaCl)              {sign_rate:10,.0f}/s")

        rng = random.Random(3)
        local_keys = [NodeKey(rng.randbytes(32)) for _ in range(50)]
        local_genesis = Genesis("bench-local", 0, key.public_key, tuple((k.public_key, 10**12) for k in local_keys))

        def local_append():
            path = tmp / f"append-{time.monotonic_ns()}"
            ledger = Ledger(LevelDBStore(path), local_genesis)
            now = 1_800_000_000_000
            for i in range(n):
                sender = local_keys[i % len(local_keys)]
                recipient = local_keys[(i + 1) % len(local_keys)]
                ledger.send(sender, recipient.public_key, 1, now + i)
                if i % GROUP == GROUP - 1:
                    ledger.commit()
            ledger.commit()
            ledger.close()

        append_rate, append_runs = _median_rate(local_append, n, runs)
        print(f"  local append to LevelDB (synced/{GROUP})    {append_rate:10,.0f}/s")
    finally:
        verifier.close()
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "suite": "ledger",
        "entries": n,
        "runs": runs,
        "group": GROUP,
        "raw_verify_per_s": round(verify_rate),
        "raw_verify_2_threads_per_s": round(verify2_rate),
        "verify_apply_per_s": round(apply_rate),
        "verify_apply_single_thread_per_s": round(single_rate),
        "verify_apply_single_thread_ratio": round(single_rate / verify_rate, 3),
        "verify_apply_vs_2_thread_verify_ratio": round(apply_rate / verify2_rate, 3),
        "raw_sign_per_s": round(sign_rate),
        "local_append_per_s": round(append_rate),
        "verify_apply_ratio": round(apply_rate / verify_rate, 3),
        "append_sign_ratio": round(append_rate / sign_rate, 3),
        "targets": {"verify_apply_ratio": 0.70, "append_sign_ratio": 0.50},
        "machine": {"python": platform.python_version(), "cores": os.cpu_count(), "platform": platform.platform()},
    }
    print(
        f"  ratios: verify+apply (batched) / raw verify = {result['verify_apply_ratio']:.2f} (target 0.70; "
        f"one-by-one single thread {result['verify_apply_single_thread_ratio']:.2f}; "
        f"batched vs 2-thread raw verify {result['verify_apply_vs_2_thread_verify_ratio']:.2f}), "
        f"append / sign = {result['append_sign_ratio']:.2f} (target 0.50)"
    )
    return result


SUITES = {"ledger": bench_ledger}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    result = SUITES[args.suite](args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

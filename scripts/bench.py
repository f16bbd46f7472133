#!/usr/bin/env python3
"""Benchmarks: ours against the reference ceiling, side by side, in one run.

    scripts/bench.py ledger [--json] [--entries N] [--runs R]
    scripts/bench.py gossip [--json] [--nodes N] [--rounds R] [--settle S]
    scripts/bench.py sync [--json] [--entries N]
    scripts/bench.py job [--json] [--rounds R]
    scripts/bench.py gateway [--json] [--rounds R] [--streams 10,50,100] [--stream-tokens T] [--out DIR]
    scripts/bench.py all [--json] [--out DIR] [--gossip-nodes 5,10,15,20] [--quick]

Each suite prints human-readable lines, then (with --json) one JSON object as
the very last line. Speed is measured here, never asserted in tests.

``all`` runs ledger, sync, job, then gossip at each of --gossip-nodes, and
writes DIR/benchmarks.json (the machine, the command, every suite's dict),
DIR/img/*.png and DIR/benchmarks.md (DIR defaults to docs/). It needs
matplotlib: ``pip install -e '.[bench]'``. ``--quick`` uses smoke-test sizes
(about a minute; the figures mean nothing): send it to another --out.

``gateway`` (about two minutes) is not part of ``all``: it measures a node's
Ollama and OpenAI gateway against the stand-in straight, then one gateway
under 10, 50 and 100 concurrent streams, and draws DIR/img/gateway_load.png
(with matplotlib). It needs the ``openai`` client (the test extra).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_report, bench_plots

import nacl.bindings  # noqa: E402

from p2pgpu.core.genesis import Genesis  # noqa: E402
from p2pgpu.core.identity import NodeKey  # noqa: E402
from p2pgpu.core.kv import MemoryStore  # noqa: E402
from p2pgpu.core.ledger import ApplyResult, Ledger  # noqa: E402
from p2pgpu.store import LevelDBStore  # noqa: E402
from p2pgpu.verify import ThreadedVerifier, offer_pipelined  # noqa: E402

GROUP = 100  # entries per synced write


class Interleaved:
    """Times several contenders chunk by chunk, in turn, over the same work.

    Load on a shared 2-core machine drifts over seconds; timing the reference
    and ours on alternating chunks of about 1000 items means both see the same
    conditions, so their ratio holds even when absolute rates move.

    Two ratios come out: ``ratio`` (total rate over total rate: a chunk that
    ran during a burst of load elsewhere weighs in with its slow time) and
    ``chunk_ratio``, the median over chunks of the ratio within each chunk,
    where ours and the reference ran back to back: a burst that hit only one
    of the pair moves that chunk's ratio, up or down, and the median sets
    it aside. Both are reported.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.items: dict[str, int] = {}
        self.chunks: dict[str, list[float]] = {}  # per-chunk rates, in order

    def time(self, name: str, fn, count: int) -> None:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        self.items[name] = self.items.get(name, 0) + count
        self.chunks.setdefault(name, []).append(count / elapsed)

    def rate(self, name: str) -> float:
        return self.items[name] / self.seconds[name]

    def ratio(self, ours: str, reference: str) -> float:
        return self.rate(ours) / self.rate(reference)

    def chunk_ratio(self, ours: str, reference: str) -> float:
        return statistics.median(a / b for a, b in zip(self.chunks[ours], self.chunks[reference]))


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
    """Ledger rates against PyNaCl's, interleaved chunk by chunk.

    - raw verify (1 and 2 threads) vs verify + apply of the same entries from
      a peer: 200 accounts sending and receiving, written to LevelDB in
      synced groups of GROUP; once one by one (``offer``), once in batches
      (``offer_batch`` with the 2-thread verifier the node uses for sync);
    - raw sign vs local append (sign + apply + synced group writes).
    """
    n = args.entries
    runs = args.runs
    chunk = 10 * GROUP
    print(f"ledger: {n} entries x {runs} runs, chunks of {chunk}, synced groups of {GROUP}, {os.cpu_count()} cores")
    genesis, wires = _peer_entries(accounts=200, count=n)
    from p2pgpu.core.ledger import decode_entry

    entries = [decode_entry(w, genesis.network_id, verify=False) for w in wires]
    signed_messages = [(e.signed.signature + e.signed.payload, e.author) for e in entries]
    triples = [(e.author, e.signed.payload, e.signed.signature) for e in entries]
    messages = [e.signed.payload for e in entries]
    sign_key = NodeKey(b"\x05" * 32)
    rng = random.Random(3)
    local_keys = [NodeKey(rng.randbytes(32)) for _ in range(50)]
    local_genesis = Genesis("bench-local", 0, sign_key.public_key, tuple((k.public_key, 10**12) for k in local_keys))
    now = 1_800_000_000_000
    clock = Interleaved()
    tmp = Path(tempfile.mkdtemp(prefix="p2pgpu-bench-"))
    verifier = ThreadedVerifier(threads=2)
    writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ledger-commit")
    try:
        for run in range(runs):
            one_by_one = Ledger(LevelDBStore(tmp / f"one-{run}"), genesis)
            batched = Ledger(LevelDBStore(tmp / f"batch-{run}"), genesis)
            appender = Ledger(LevelDBStore(tmp / f"append-{run}"), local_genesis)
            pipelined = Ledger(LevelDBStore(tmp / f"pipelined-{run}"), local_genesis)
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                count = stop - start

                def raw_verify():
                    for signed_message, public_key in signed_messages[start:stop]:
                        nacl.bindings.crypto_sign_open(signed_message, public_key)

                def raw_verify_threads():
                    for i in range(start, stop, GROUP):
                        verifier(triples[i : min(i + GROUP, stop)])

                def apply_one_by_one():
                    for i in range(start, stop):
                        if one_by_one.offer(wires[i], now).status != "applied":
                            raise SystemExit(f"bench stream broke at entry {i}")
                        if i % GROUP == GROUP - 1:
                            one_by_one.commit()

                def apply_batched():
                    batches = [wires[i : min(i + GROUP, stop)] for i in range(start, stop, GROUP)]
                    for result in offer_pipelined(batched, batches, now, verifier):
                        if not isinstance(result, ApplyResult) or result.status != "applied":
                            raise SystemExit(f"bench stream broke near entry {start}: {result}")

                def raw_sign():
                    for message in messages[start:stop]:
                        sign_key.sign(message)

                def local_append():
                    for i in range(start, stop):
                        sender = local_keys[i % len(local_keys)]
                        appender.send(sender, local_keys[(i + 1) % len(local_keys)].public_key, 1, now + i)
                        if i % GROUP == GROUP - 1:
                            appender.commit()

                def local_append_pipelined():
                    # the same, with each group's synced write on a thread while
                    # the next group is signed; the chunk ends when its last
                    # group is durable (Ledger.begin_commit)
                    writing = None
                    for i in range(start, stop):
                        sender = local_keys[i % len(local_keys)]
                        pipelined.send(sender, local_keys[(i + 1) % len(local_keys)].public_key, 1, now + i)
                        if i % GROUP == GROUP - 1:
                            if writing is not None:
                                writing[1].result()
                                writing[0].finish()
                            pending = pipelined.begin_commit()
                            writing = (pending, writer.submit(pending.write))
                    if writing is not None:
                        writing[1].result()
                        writing[0].finish()

                clock.time("raw_verify", raw_verify, count)
                clock.time("apply_one_by_one", apply_one_by_one, count)
                clock.time("raw_verify_2_threads", raw_verify_threads, count)
                clock.time("apply_batched", apply_batched, count)
                clock.time("raw_sign", raw_sign, count)
                clock.time("local_append", local_append, count)
                clock.time("local_append_pipelined", local_append_pipelined, count)
            for ledger in (one_by_one, batched, appender, pipelined):
                ledger.close()
    finally:
        verifier.close()
        writer.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    rates = {name: clock.rate(name) for name in clock.seconds}
    for label, name in [
        ("raw ed25519 verify, 1 thread (PyNaCl)", "raw_verify"),
        ("raw ed25519 verify, 2 threads (PyNaCl)", "raw_verify_2_threads"),
        ("verify + apply, one by one, 1 thread", "apply_one_by_one"),
        (f"verify + apply, pipelined batches of {GROUP}, 2 threads", "apply_batched"),
        ("raw ed25519 sign (PyNaCl)", "raw_sign"),
        (f"local append, synced groups of {GROUP}", "local_append"),
        (f"local append, group writes pipelined", "local_append_pipelined"),
    ]:
        print(f"  {label:48s} {rates[name]:10,.0f}/s")
    result = {
        "suite": "ledger",
        "entries": n,
        "runs": runs,
        "group": GROUP,
        "raw_verify_per_s": round(rates["raw_verify"]),
        "raw_verify_2_threads_per_s": round(rates["raw_verify_2_threads"]),
        "verify_apply_per_s": round(rates["apply_batched"]),
        "verify_apply_single_thread_per_s": round(rates["apply_one_by_one"]),
        "raw_sign_per_s": round(rates["raw_sign"]),
        "local_append_per_s": round(rates["local_append"]),
        "verify_apply_ratio": round(rates["apply_batched"] / rates["raw_verify"], 3),
        "verify_apply_chunk_median_ratio": round(clock.chunk_ratio("apply_batched", "raw_verify"), 3),
        "verify_apply_single_thread_ratio": round(rates["apply_one_by_one"] / rates["raw_verify"], 3),
        "verify_apply_vs_2_thread_verify_ratio": round(rates["apply_batched"] / rates["raw_verify_2_threads"], 3),
        "append_sign_ratio": round(rates["local_append"] / rates["raw_sign"], 3),
        "append_sign_chunk_median_ratio": round(clock.chunk_ratio("local_append", "raw_sign"), 3),
        "local_append_pipelined_per_s": round(rates["local_append_pipelined"]),
        "append_pipelined_sign_ratio": round(rates["local_append_pipelined"] / rates["raw_sign"], 3),
        "append_pipelined_sign_chunk_median_ratio": round(clock.chunk_ratio("local_append_pipelined", "raw_sign"), 3),
        "targets": {"verify_apply_ratio": 0.70, "append_sign_ratio": 0.50,
                    "verify_apply_chunk_median_ratio": 0.70, "append_sign_chunk_median_ratio": 0.50,
                    "append_pipelined_sign_ratio": 0.50, "append_pipelined_sign_chunk_median_ratio": 0.50},
        "machine": {"python": platform.python_version(), "cores": os.cpu_count(), "platform": platform.platform()},
    }
    print(
        f"  verify+apply / raw verify: batched {result['verify_apply_ratio']:.2f} (target 0.70), "
        f"one by one {result['verify_apply_single_thread_ratio']:.2f}; "
        f"batched / 2-thread raw verify {result['verify_apply_vs_2_thread_verify_ratio']:.2f}"
    )
    print(f"  local append / raw sign: {result['append_sign_ratio']:.2f} (target 0.50)")
    print(f"  local append with pipelined group writes / raw sign: {result['append_pipelined_sign_ratio']:.2f}")
    print(f"  median of per-chunk ratios: verify+apply {result['verify_apply_chunk_median_ratio']:.2f}, "
          f"append {result['append_sign_chunk_median_ratio']:.2f}, "
          f"append pipelined {result['append_pipelined_sign_chunk_median_ratio']:.2f}")
    return result


def _proc_sample(pid: int) -> tuple[int, float]:
    """(RSS bytes, CPU seconds so far) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_kb * 1024, (int(fields[11]) + int(fields[12])) / ticks


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def bench_gossip(args) -> dict:
    """Offer spread across N node processes on 127.0.0.1, and what an idle node costs.

    One provider signs a new offer every heartbeat; every other node records
    when it accepted each one (``received_ms``). The spread of one offer is
    the time from its signature until the *last* node held it. Nodes read
    the same clock, so no polling error enters the figure.
    """
    from p2pgpu.testing.devnet import Devnet

    n = args.nodes
    heartbeat = 0.5
    rounds = args.rounds
    root = Path(tempfile.mkdtemp(prefix="p2pgpu-bench-gossip-"))
    net = Devnet(root, nodes=n, providers=1, heartbeat_s=heartbeat, offer_ttl_s=3.0, sync_interval_s=5.0)
    print(f"gossip: {n} node processes, 1 provider, heartbeat {heartbeat} s, {rounds} offers")
    try:
        start = time.monotonic()
        net.up(timeout=300)
        up_seconds = time.monotonic() - start
        print(f"  all {n} nodes up in {up_seconds:.1f} s")
        clients = [node.client() for node in net.nodes[1:]]
        deadline = time.monotonic() + 120
        while not all(c.offers(None) for c in clients):
            if time.monotonic() > deadline:
                raise SystemExit("the offer never reached every node")
            time.sleep(0.1)
        time.sleep(heartbeat * (rounds + 2) + args.settle)  # nodes remember their last 64 arrivals each
        spreads: dict[int, dict[int, int]] = {}  # seq -> node index -> received - signed
        for index, client in enumerate(clients):
            for offer in client.offers(None):
                for seq, signed_ms, received_ms in offer["arrivals"]:
                    spreads.setdefault(seq, {})[index] = received_ms - signed_ms
        complete = sorted(seq for seq, seen in spreads.items() if len(seen) == len(clients))[-rounds:]
        if not complete:
            raise SystemExit("no offer was seen complete on every node")
        all_nodes_ms = [max(spreads[seq].values()) for seq in complete]
        print("  per offer, ms until the last node held it:", all_nodes_ms)
        per_node_ms = [ms for seq in complete for ms in spreads[seq].values()]
        # idle cost: RSS and CPU over a quiet window (offers keep flowing, no jobs)
        pids = [node.pid for node in net.nodes if node.pid]
        before = {pid: _proc_sample(pid) for pid in pids}
        window = 5.0
        time.sleep(window)
        if not all(node.running for node in net.nodes):
            raise SystemExit("a node process exited during the idle window")
        after = {pid: _proc_sample(pid) for pid in pids}
        rss_mb = [after[pid][0] / 2**20 for pid in pids]  # one figure per node process
        cpu_pct = [100 * (after[pid][1] - before[pid][1]) / window for pid in pids]
    finally:
        net.down()
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "suite": "gossip",
        "nodes": n,
        "offers_requested": rounds,
        "offers_measured": len(complete),
        "every_node_median_ms": statistics.median(all_nodes_ms),
        "every_node_p95_ms": _percentile(all_nodes_ms, 0.95),
        "per_node_median_ms": statistics.median(per_node_ms),
        "targets": {"every_node_median_ms": 100, "every_node_p95_ms": 250},
        "idle_rss_mb_median": round(statistics.median(rss_mb), 1),
        "idle_rss_mb_max": round(max(rss_mb), 1),
        "idle_cpu_percent_median": round(statistics.median(cpu_pct), 2),
        "idle_cpu_percent_max": round(max(cpu_pct), 2),
        "idle_rss_mb_per_node": [round(x, 1) for x in rss_mb],
        "idle_cpu_percent_per_node": [round(x, 2) for x in cpu_pct],
        "idle_window_s": window,
        "up_seconds": round(up_seconds, 1),
        "heartbeat_s": heartbeat,
        "machine": {"python": platform.python_version(), "cores": os.cpu_count(), "platform": platform.platform()},
    }
    print(f"  time until every node holds an offer: median {result['every_node_median_ms']} ms, "
          f"p95 {result['every_node_p95_ms']} ms (targets 100 / 250) over {len(complete)} offers")
    print(f"  one node's median: {result['per_node_median_ms']} ms")
    print(f"  idle per node: RSS median {result['idle_rss_mb_median']} MiB (max {result['idle_rss_mb_max']}), "
          f"CPU median {result['idle_cpu_percent_median']} % (max {result['idle_cpu_percent_max']})")
    return result


def bench_sync(args) -> dict:
    """A fresh LevelDB node catching up ``--entries`` from a peer in another
    process over 127.0.0.1 (every signature verified, every rule applied),
    next to the raw single-thread verify rate measured in the same run."""
    import trio

    from p2pgpu.testing.sync_bench import make_history, measure_catch_up

    n = args.entries
    print(f"sync: a fresh node catches up {n} entries from a peer process")
    from p2pgpu.core.ledger import decode_entry

    sample = make_history(min(n, 5_000), 1_700_000_000_000)
    verify_items = []
    for author in sample.heads():
        for wire in sample.chain(author, 1, n):
            entry = decode_entry(wire, sample.network_id, verify=False)
            verify_items.append((entry.author, entry.signed.signature + entry.signed.payload))
    result = trio.run(lambda: measure_catch_up(n, separate_process=True))
    if verify_items:
        start = time.perf_counter()
        for public_key, signed_message in verify_items:
            nacl.bindings.crypto_sign_open(signed_message, public_key)
        result["raw_verify_per_s"] = round(len(verify_items) / (time.perf_counter() - start))
    result["node_rss_mb_after"] = round(_proc_sample(os.getpid())[0] / 2**20, 1)
    result.update(suite="sync", target_entries_per_s=5_000, targets={"entries_per_s": 5_000})
    result["machine"] = {"python": platform.python_version(), "cores": os.cpu_count(), "platform": platform.platform()}
    print(f"  {result['entries']} entries in {result['seconds']} s: {result['entries_per_s']:,.0f} entries/s "
          f"(target 5,000); state hashes equal: {result['state_hash_equal']}")
    print(f"  the caught-up node's process: RSS {result['node_rss_mb_after']} MiB (idle CPU per node: see the gossip suite)")
    return result


def bench_job(args) -> dict:
    """Jobs through the network against the same stand-in used directly.

    Four node processes (3 providers, each with a stand-in at 500 tokens/s,
    and a consumer). For the same prompts: time to first token and tokens/s
    straight from a stand-in with the official client, and through
    ``p2pgpu submit`` (API -> ranking -> hold -> libp2p stream -> provider ->
    Ollama client -> vouchers). Then 20 jobs at once over the 3 providers.
    """
    import ollama

    from p2pgpu.testing.devnet import Devnet

    rounds, max_tokens, rate = args.rounds, 200, 500.0
    root = Path(tempfile.mkdtemp(prefix="p2pgpu-bench-job-"))
    net = Devnet(root, nodes=4, providers=3, tokens_per_second=rate, heartbeat_s=1.0, offer_ttl_s=5.0, reply_tokens=1000)
    print(f"job: 3 providers (stand-ins at {rate:.0f} tokens/s), 1 consumer; {rounds} prompts x {max_tokens} tokens")
    try:
        net.up(timeout=300)
        consumer = net.nodes[3].client()
        deadline = time.monotonic() + 60
        while len(consumer.offers(None)) < 3:
            if time.monotonic() > deadline:
                raise SystemExit("offers did not reach the consumer")
            time.sleep(0.1)
        direct = ollama.Client(host=net.standins[0].host)
        prompts = [f"benchmark prompt number {i}: tell me about GPUs" for i in range(rounds)]

        def through_network(prompt: str) -> tuple[float, float, int, str]:
            start = time.perf_counter()
            first = None
            count = 0
            final = {}
            for event in net.nodes[3].client().submit("llama3.2:1b", prompt, max_tokens=max_tokens):
                if event["type"] == "token":
                    count += 1
                    first = first or time.perf_counter()
                elif event["type"] in ("done", "error"):
                    final = event
            end = time.perf_counter()
            return (first or end) - start, count / max(end - (first or end), 1e-9), count, final.get("type", "")

        direct_ttft, direct_tps, net_ttft, net_tps = [], [], [], []
        for prompt in prompts:
            start = time.perf_counter()
            first = None
            count = 0
            for chunk in direct.generate(model="llama3.2:1b", prompt=prompt, stream=True, options={"num_predict": max_tokens}):
                if chunk.response:
                    count += 1
                    first = first or time.perf_counter()
            end = time.perf_counter()
            direct_ttft.append(first - start)
            direct_tps.append(count / (end - first))
            ttft, tps, count, kind = through_network(prompt)
            if kind != "done" or count != max_tokens:
                raise SystemExit(f"network job ended {kind} with {count} tokens")
            net_ttft.append(ttft)
            net_tps.append(tps)
        with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
            start = time.perf_counter()
            outcomes = list(pool.map(through_network, [f"concurrent job {i}" for i in range(20)]))
            concurrent_s = time.perf_counter() - start
        completed = sum(1 for *_, kind in outcomes if kind == "done")
    finally:
        net.down()
        shutil.rmtree(root, ignore_errors=True)
    added_ttft_ms = [1000 * (n - d) for n, d in zip(net_ttft, direct_ttft)]
    result = {
        "suite": "job",
        "prompts": rounds,
        "max_tokens": max_tokens,
        "standin_tokens_per_s": rate,
        "direct_ttft_ms_median": round(1000 * statistics.median(direct_ttft), 1),
        "network_ttft_ms_median": round(1000 * statistics.median(net_ttft), 1),
        "added_ttft_ms_median": round(statistics.median(added_ttft_ms), 1),
        "direct_tokens_per_s_median": round(statistics.median(direct_tps), 1),
        "network_tokens_per_s_median": round(statistics.median(net_tps), 1),
        "throughput_ratio": round(statistics.median(net_tps) / statistics.median(direct_tps), 3),
        "concurrent_jobs": 20,
        "concurrent_completed": completed,
        "concurrent_seconds": round(concurrent_s, 2),
        "targets": {"added_ttft_ms_median": 15, "throughput_ratio": 0.95, "concurrent_completed": 20},
        "machine": {"python": platform.python_version(), "cores": os.cpu_count(), "platform": platform.platform()},
    }
    print(f"  time to first token: direct {result['direct_ttft_ms_median']} ms, through the network "
          f"{result['network_ttft_ms_median']} ms: added {result['added_ttft_ms_median']} ms (target <= 15)")
    print(f"  tokens/s: direct {result['direct_tokens_per_s_median']}, network {result['network_tokens_per_s_median']}: "
          f"ratio {result['throughput_ratio']} (target >= 0.95)")
    print(f"  20 concurrent jobs over 3 providers: {completed} completed in {result['concurrent_seconds']} s")
    return result


# ------------------------------------------------------------------ gateway

GATEWAY_MODEL = "llama3.2:1b"
# the spending limit is the owner's guard, not what this suite measures: raised for the nodes it starts
GATEWAY_LIMITS_ENV = {"P2PGPU_GATEWAY_LIMIT_REQUEST": "1000", "P2PGPU_GATEWAY_LIMIT_HOUR": "1000000"}
LOAD_SHORTFALL = 0.9  # a load level whose ratio falls under this says why
LOAD_GROUPS = {"gateway_node": "gateway node", "provider_nodes": "provider nodes", "standins": "stand-ins",
               "bench_client": "bench client"}  # the processes whose CPU a load level reads, as said
GATEWAY_TARGETS = {"ollama_added_ttft_ms_median": 15, "ollama_throughput_ratio": 0.95,
                   "openai_added_ttft_ms_median": 15, "openai_throughput_ratio": 0.95}


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """``os.environ`` with ``values`` set (the node processes started inside inherit them), then restored."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _gateway_of(node, timeout: float = 30.0) -> tuple[str, str]:
    """(URL, API token) of a devnet node's gateway, once it wrote ``gateway.addr``."""
    deadline = time.monotonic() + timeout
    while (url := node.gateway_url()) is None:
        if not node.running or time.monotonic() > deadline:
            raise SystemExit(f"{node.name} wrote no gateway.addr (does it run its gateway?); see {node.log_path}")
        time.sleep(0.05)
    return url, (node.data_dir / "api.token").read_text().strip()


def _wait_for_offers(client, providers: int, slots_free: int | None = None, timeout: float = 60.0) -> bool:
    """Until ``providers`` offers (with ``slots_free`` free slots in all) reached the node; False past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        offers = client.offers(None)
        if len(offers) >= providers and (slots_free is None or sum(o.get("slots_free", 0) for o in offers) >= slots_free):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _timed_stream(open_stream, text_of, finish_of) -> dict:
    """Time one streamed answer: ``open_stream()`` sends the request and
    yields chunks; a chunk with text is a token. Time to first token, and
    tokens/s from the first token to the end (as the ``job`` suite counts)."""
    start = time.perf_counter()
    first = None
    count = 0
    finish = None
    for chunk in open_stream():
        if text_of(chunk):
            count += 1
            if first is None:
                first = time.perf_counter()
        finish = finish_of(chunk) or finish
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "tps": count / max(end - first, 1e-9), "tokens": count, "finish": finish}


def surface_figures(prefix: str, direct: list[dict], gateway: list[dict]) -> dict:
    """Medians of paired samples (the same prompts, straight vs through the
    gateway): TTFT, the TTFT the gateway added, tokens/s and their ratio.
    Without ``direct`` samples only the gateway's own figures."""
    figures = {
        f"{prefix}_gateway_ttft_ms_median": round(1000 * statistics.median(s["ttft"] for s in gateway), 1),
        f"{prefix}_gateway_tokens_per_s_median": round(statistics.median(s["tps"] for s in gateway), 1),
    }
    if direct:
        added = [1000 * (g["ttft"] - d["ttft"]) for d, g in zip(direct, gateway)]
        direct_tps = statistics.median(s["tps"] for s in direct)
        figures.update({
            f"{prefix}_direct_ttft_ms_median": round(1000 * statistics.median(s["ttft"] for s in direct), 1),
            f"{prefix}_added_ttft_ms_median": round(statistics.median(added), 1),
            f"{prefix}_direct_tokens_per_s_median": round(direct_tps, 1),
            f"{prefix}_throughput_ratio": round(figures[f"{prefix}_gateway_tokens_per_s_median"] / direct_tps, 3),
        })
    return figures


def load_figures(records: list[dict], *, streams: int, rate: float, max_tokens: int, wall_s: float,
                 cpu_percent: dict[str, float], machine_cpu_percent: float, cores: int) -> dict:
    """One load level's figures from its streams' records.

    A record: ``start`` (request sent), ``first``/``last`` (first and last
    token received), ``tokens`` received, the stand-in's own ``eval_count``
    and ``eval_duration_ns`` (its final chunk, passed through by the
    gateway), ``error`` (None when the stream delivered all ``max_tokens``).

    Aggregates are sums of per-stream rates: received = (tokens - 1) over
    the time from the first to the last token, as each client saw it; sent
    = eval_count / eval_duration, as each stand-in timed its own decoding.
    ``ratio`` compares the two (did the network keep up with what the
    stand-ins produced), ``nominal_ratio`` compares received with what was
    asked (streams x rate).
    """
    ok = [r for r in records if r.get("error") is None]
    received_rates = [(r["tokens"] - 1) / (r["last"] - r["first"]) for r in ok
                      if r["tokens"] > 1 and r["last"] > r["first"]]
    sent_rates = [r["eval_count"] / (r["eval_duration_ns"] / 1e9) for r in ok
                  if r.get("eval_count") and r.get("eval_duration_ns")]
    received, sent = sum(received_rates), sum(sent_rates)
    nominal = streams * rate
    ttft_ms = [1000 * (r["first"] - r["start"]) for r in ok if r.get("first") is not None]
    errors = [r["error"] for r in records if r.get("error") is not None]
    received_tokens = sum(r["tokens"] for r in records)
    # CPU each process group spent per token the clients received, and the
    # rate the whole machine could relay at that cost
    cpu_ms_per_token = {name: 10 * percent * wall_s / received_tokens if received_tokens else None
                        for name, percent in cpu_percent.items()}
    chain_ms = sum(v for v in cpu_ms_per_token.values() if v is not None)
    # what the rest of the machine took meanwhile (other work on a shared machine), % of one core
    other = max(0.0, machine_cpu_percent * cores - sum(cpu_percent.values()))
    figures = {
        "streams": streams,
        "tokens_per_stream": max_tokens,
        "completed": len(ok),
        "errors": len(errors),
        "nominal_tokens_per_s": round(nominal, 1),
        "standin_tokens_per_s": round(sent, 1),
        "received_tokens_per_s": round(received, 1),
        "ratio": round(received / sent, 3) if sent else None,
        "nominal_ratio": round(received / nominal, 3) if nominal else None,
        "per_stream_tokens_per_s_median": round(statistics.median(received_rates), 1) if received_rates else None,
        "goodput_tokens_per_s": round(received_tokens / wall_s, 1) if wall_s > 0 else None,
        "ttft_ms_p50": round(_percentile(ttft_ms, 0.5), 1) if ttft_ms else None,
        "ttft_ms_p95": round(_percentile(ttft_ms, 0.95), 1) if ttft_ms else None,
        "ttft_ms_max": round(max(ttft_ms), 1) if ttft_ms else None,
        "wall_s": round(wall_s, 2),
        "cpu_percent": {name: round(value, 1) for name, value in cpu_percent.items()},
        "machine_cpu_percent": round(machine_cpu_percent, 1),
        "other_processes_cpu_percent": round(other, 1),
        "cpu_ms_per_token": {name: None if v is None else round(v, 3) for name, v in cpu_ms_per_token.items()},
        "cpu_bound_tokens_per_s": round(cores * 1000 / chain_ms) if chain_ms else None,
        "cores": cores,
        "first_error": errors[0] if errors else None,
    }
    figures["why"] = load_verdict(figures)
    return figures


def load_verdict(level: dict, shortfall: float = LOAD_SHORTFALL) -> str | None:
    """Why a load level fell short (a ratio under ``shortfall``, or errors),
    from its own figures; None when it did not."""
    ratios = [level.get("ratio"), level.get("nominal_ratio")]
    if not level.get("errors") and all(r is None or r >= shortfall for r in ratios):
        return None
    cpu = level.get("cpu_percent") or {}
    gateway, busy, cores = cpu.get("gateway_node", 0.0), level.get("machine_cpu_percent", 0.0), level.get("cores") or 1
    reasons = []
    if level.get("errors"):
        reasons.append(f"{level['errors']} of {level['streams']} streams failed (first: {level.get('first_error')})")
    if gateway >= 85:
        reasons.append(f"the gateway node's process is CPU-bound at {gateway:.0f}% of one core "
                       "(one Python process relays every token)")
    if busy >= 90:
        shares = ", ".join(f"{LOAD_GROUPS.get(name, name)} {value:.0f}%" for name, value in cpu.items())
        other = level.get("other_processes_cpu_percent") or 0.0
        reason = (f"the machine is saturated: {busy:.0f}% of its {cores} cores busy ({shares}"
                  + (f", other processes {other:.0f}%" if other >= 5 else "") + ", each in % of one core)")
        per_token = level.get("cpu_ms_per_token") or {}
        if level.get("cpu_bound_tokens_per_s") and per_token:
            costs = ", ".join(f"{LOAD_GROUPS.get(name, name)} {v:.2f}" for name, v in per_token.items() if v is not None)
            reason += (f"; each token relayed costs {sum(v for v in per_token.values() if v is not None):.2f} ms "
                       f"of CPU ({costs}), so {cores} cores carry at most about "
                       f"{level['cpu_bound_tokens_per_s']:,} tokens/s")
        reasons.append(reason)
    nominal, sent = level.get("nominal_tokens_per_s") or 0, level.get("standin_tokens_per_s") or 0
    if nominal and sent < shortfall * nominal:
        reasons.append(f"the stand-ins themselves decoded only {sent:,.0f} of the {nominal:,.0f} tokens/s asked "
                       "(they share the CPU with the nodes)")
    other = level.get("other_processes_cpu_percent") or 0.0
    if other >= 25:
        reasons.append(f"other processes on the machine took {other:.0f}% of a core meanwhile (a shared machine: "
                       "the figures understate what the network relays on its own)")
    if len(reasons) == (1 if level.get("errors") else 0):
        reasons.append(f"no CPU saturation seen (gateway node {gateway:.0f}% of a core, machine {busy:.0f}% busy): "
                       "the shortfall is latency in the relay, not capacity")
    return "; ".join(reasons)


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


async def _load_level(url: str, token: str, streams: int, max_tokens: int) -> tuple[list[dict], float]:
    """``streams`` streamed ``/api/chat`` requests at once through one gateway
    (httpx under trio, one connection each); every stream's record and the
    wall time from their start to the last one's end."""
    import httpx
    import trio

    records: list[dict] = []
    go = trio.Event()
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, limits=limits,
                                 timeout=httpx.Timeout(120.0)) as client:

        async def one(index: int) -> None:
            body = {"model": GATEWAY_MODEL, "stream": True, "options": {"num_predict": max_tokens},
                    "messages": [{"role": "user", "content": f"load stream {index}: tell me about GPUs"}]}
            record = {"start": 0.0, "first": None, "last": None, "tokens": 0, "eval_count": 0,
                      "eval_duration_ns": 0, "error": None}
            await go.wait()
            record["start"] = time.perf_counter()
            done = False
            try:
                async with client.stream("POST", "/api/chat", json=body) as response:
                    if response.status_code != 200:
                        text = (await response.aread()).decode("utf-8", "replace")
                        record["error"] = f"HTTP {response.status_code}: {text[:160]}"
                        return
                    async for line in response.aiter_lines():
                        if not line:
                            continue
                        now = time.perf_counter()
                        chunk = json.loads(line)
                        if "error" in chunk:
                            record["error"] = f"error line: {str(chunk['error'])[:160]}"
                            return
                        if chunk.get("done"):
                            done = True
                            record["eval_count"] = int(chunk.get("eval_count") or 0)
                            record["eval_duration_ns"] = int(chunk.get("eval_duration") or 0)
                        elif (chunk.get("message") or {}).get("content"):
                            record["tokens"] += 1
                            record["first"] = record["first"] or now
                            record["last"] = now
                if not done or record["tokens"] != max_tokens:
                    record["error"] = f"stream ended {'done' if done else 'without its final chunk'} " \
                                      f"after {record['tokens']} of {max_tokens} tokens"
            except (httpx.HTTPError, ValueError) as exc:
                record["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            finally:
                record["end"] = time.perf_counter()
                records.append(record)

        async with trio.open_nursery() as nursery:
            for index in range(streams):
                nursery.start_soon(one, index)
            await trio.sleep(0)  # every task waits at the line
            start = time.perf_counter()
            go.set()
    return records, max(r["end"] for r in records) - start


def bench_gateway(args) -> dict:
    """The gateway (Ollama and OpenAI surfaces of a node) against the stand-in itself.

    1. Added latency and throughput, one stream at a time: 3 providers
       (stand-ins at 500 tokens/s) and a consumer. For the same prompts, in
       turn: the official ``ollama`` client straight at a stand-in and at the
       consumer's gateway, then the ``openai`` client straight at the
       stand-in's ``/v1`` and at the gateway's ``/v1``.
    2. Under load: one gateway node, 4 providers x ``--load-slots`` slots
       (stand-ins decoding that many streams at once, each at 50 tokens/s);
       at each of ``--streams`` concurrent streams, the tokens/s the clients
       received against what the stand-ins sent, TTFT, errors, and the CPU
       of the gateway node, the providers, the stand-ins and this process
       (the client), from /proc.
    """
    try:
        import httpx
        import ollama
        import openai
        import trio
    except ImportError as exc:
        raise SystemExit(f"the gateway suite needs {exc.name}: pip install -e '.[test]' "
                         "(ollama, openai, httpx)") from None
    from p2pgpu.testing.devnet import Devnet

    rounds, max_tokens, rate = args.rounds, 200, 500.0
    levels = _stream_counts(args.streams)
    load_tokens, load_rate, load_providers, slots = args.stream_tokens, 50.0, 4, args.load_slots
    cores = os.cpu_count() or 1
    result: dict = {"suite": "gateway", "prompts": rounds, "max_tokens": max_tokens, "standin_tokens_per_s": rate}
    started = time.monotonic()

    # -------------------------------------------------- 1. one stream at a time
    print(f"gateway: 3 providers (stand-ins at {rate:.0f} tokens/s), 1 consumer; {rounds} prompts x {max_tokens} "
          "tokens, straight vs through the consumer's gateway, Ollama and OpenAI clients")
    root = Path(tempfile.mkdtemp(prefix="p2pgpu-bench-gateway-"))
    net = Devnet(root, nodes=4, providers=3, tokens_per_second=rate, heartbeat_s=1.0, offer_ttl_s=5.0,
                 reply_tokens=1000)
    try:
        with _environ(GATEWAY_LIMITS_ENV):
            net.up(timeout=300)
        consumer = net.nodes[3]
        if not _wait_for_offers(consumer.client(), 3):
            raise SystemExit("offers did not reach the consumer")
        url, token = _gateway_of(consumer)
        standin = net.standins[0].host
        clients = {
            ("ollama", "direct"): ollama.Client(host=standin),
            ("ollama", "gateway"): ollama.Client(host=url, headers={"Authorization": f"Bearer {token}"}),
            ("openai", "direct"): openai.OpenAI(base_url=f"{standin}/v1", api_key="ollama", max_retries=0, timeout=60),
            ("openai", "gateway"): openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=60),
        }
        probe = httpx.post(f"{standin}/v1/chat/completions", timeout=10, json={
            "model": GATEWAY_MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "probe"}]})
        openai_direct = probe.status_code == 200
        if not openai_direct:
            result["openai_direct_unavailable"] = f"the stand-in answers /v1/chat/completions with {probe.status_code}"
            print(f"  the stand-in has no OpenAI routes ({probe.status_code}): openai measured through the gateway only")

        def ask(surface: str, where: str, prompt: str) -> dict:
            client = clients[(surface, where)]
            messages = [{"role": "user", "content": prompt}]
            if surface == "ollama":
                sample = _timed_stream(
                    lambda: client.chat(model=GATEWAY_MODEL, messages=messages, stream=True,
                                        options={"num_predict": max_tokens}),
                    lambda c: c.message.content, lambda c: c.done_reason if c.done else None)
            else:
                sample = _timed_stream(
                    lambda: client.chat.completions.create(model=GATEWAY_MODEL, messages=messages, stream=True,
                                                           max_tokens=max_tokens),
                    lambda c: c.choices[0].delta.content if c.choices else None,
                    lambda c: c.choices[0].finish_reason if c.choices else None)
            if sample["tokens"] != max_tokens:
                raise SystemExit(f"{surface} {where}: {sample['tokens']} of {max_tokens} tokens "
                                 f"(finish {sample['finish']!r})")
            return sample

        paths = [("ollama", "direct"), ("ollama", "gateway"), ("openai", "gateway")]
        if openai_direct:
            paths.insert(2, ("openai", "direct"))
        for surface, where in paths:  # one uncounted request each: connections open, models warm
            ask(surface, where, "warm-up")
        samples: dict = {path: [] for path in paths}
        for i in range(rounds):
            prompt = f"benchmark prompt number {i}: tell me about GPUs"
            for surface, where in paths:  # interleaved: every path sees the same machine load
                samples[(surface, where)].append(ask(surface, where, prompt))
        for surface in ("ollama", "openai"):
            result.update(surface_figures(surface, samples.get((surface, "direct"), []), samples[(surface, "gateway")]))
    finally:
        net.down()
        shutil.rmtree(root, ignore_errors=True)
    for surface in ("ollama", "openai"):
        line = (f"  {surface}: TTFT through the gateway {result[f'{surface}_gateway_ttft_ms_median']} ms, "
                f"{result[f'{surface}_gateway_tokens_per_s_median']} tokens/s")
        if f"{surface}_direct_ttft_ms_median" in result:
            line += (f"; straight {result[f'{surface}_direct_ttft_ms_median']} ms, "
                     f"{result[f'{surface}_direct_tokens_per_s_median']} tokens/s: added "
                     f"{result[f'{surface}_added_ttft_ms_median']} ms (target <= 15), throughput ratio "
                     f"{result[f'{surface}_throughput_ratio']} (target >= 0.95)")
        print(line)

    # -------------------------------------------------- 2. under load
    print(f"gateway under load: 1 gateway node, {load_providers} providers x {slots} slots (stand-ins at "
          f"{load_rate:.0f} tokens/s per stream); {', '.join(map(str, levels))} concurrent streams x {load_tokens} "
          f"tokens; {cores} cores")
    root = Path(tempfile.mkdtemp(prefix="p2pgpu-bench-gateway-load-"))
    net = Devnet(root, nodes=load_providers + 1, providers=load_providers, tokens_per_second=load_rate,
                 heartbeat_s=1.0, offer_ttl_s=5.0, reply_tokens=1000, slots=slots)
    result["load"] = []
    try:
        with _environ(GATEWAY_LIMITS_ENV):
            net.up(timeout=300)
        gateway_node = net.nodes[load_providers]
        consumer = gateway_node.client()
        if not _wait_for_offers(consumer, load_providers, load_providers * slots):
            raise SystemExit("the providers' offers (with every slot free) did not reach the gateway node")
        url, token = _gateway_of(gateway_node)
        trio.run(_load_level, url, token, 1, load_tokens)  # the path works before the clock starts
        groups = {"gateway_node": [gateway_node.pid], "provider_nodes": [n.pid for n in net.nodes[:load_providers]],
                  "standins": [s.pid for s in net.standins], "bench_client": [os.getpid()]}
        for streams in levels:
            if not _wait_for_offers(consumer, load_providers, load_providers * slots, timeout=30):
                print("  (not every slot was advertised free again within 30 s; going on)")
            before = {name: sum(_proc_sample(pid)[1] for pid in pids) for name, pids in groups.items()}
            machine_before = _machine_ticks()
            records, wall = trio.run(_load_level, url, token, streams, load_tokens)
            after = {name: sum(_proc_sample(pid)[1] for pid in pids) for name, pids in groups.items()}
            machine_after = _machine_ticks()
            busy = machine_after[0] - machine_before[0]
            total = max(1, machine_after[1] - machine_before[1])
            level = load_figures(records, streams=streams, rate=load_rate, max_tokens=load_tokens, wall_s=wall,
                                 cpu_percent={name: 100 * (after[name] - before[name]) / wall for name in groups},
                                 machine_cpu_percent=100 * busy / total, cores=cores)
            result["load"].append(level)
            cpu = level["cpu_percent"]
            print(f"  {streams:4d} streams: received {level['received_tokens_per_s']:8,.0f} tokens/s, stand-ins sent "
                  f"{level['standin_tokens_per_s']:8,.0f} (asked {level['nominal_tokens_per_s']:,.0f}): ratio "
                  f"{level['ratio']}, of asked {level['nominal_ratio']}; TTFT p50 {level['ttft_ms_p50']} ms, p95 "
                  f"{level['ttft_ms_p95']} ms; {level['errors']} errors; CPU % of a core: gateway node "
                  f"{cpu['gateway_node']}, providers {cpu['provider_nodes']}, stand-ins {cpu['standins']}, "
                  f"bench client {cpu['bench_client']}, other processes {level['other_processes_cpu_percent']}; "
                  f"machine {level['machine_cpu_percent']}% busy")
            if level["why"]:
                print(f"       short of {LOAD_SHORTFALL}: {level['why']}")
    finally:
        net.down()
        shutil.rmtree(root, ignore_errors=True)
    result.update({
        "load_providers": load_providers,
        "load_slots_per_provider": slots,
        "load_standin_tokens_per_s": load_rate,
        "load_tokens_per_stream": load_tokens,
        "targets": {k: v for k, v in GATEWAY_TARGETS.items() if k in result},
        "duration_s": round(time.monotonic() - started, 1),
        "machine": {"python": platform.python_version(), "cores": cores, "platform": platform.platform()},
    })
    if args.out and result["load"]:
        path = Path(args.out) / "img" / "gateway_load.png"
        try:
            plot_gateway_load(result, path)
            result["plot"] = str(path)
            print(f"  plot: {path}")
        except ImportError:
            print(f"  no plot: matplotlib is not installed ({BENCH_EXTRA_HINT})")
    return result


def _stream_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise SystemExit(f"--streams takes stream counts separated by commas, not {text!r}") from None
    if not counts or min(counts) < 1:
        raise SystemExit("--streams needs stream counts of at least 1")
    return counts


def plot_gateway_load(result: dict, path: Path) -> Path:
    """Tokens/s (asked, sent by the stand-ins, received through the gateway)
    and CPU by process group, against concurrent streams."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [level for level in result["load"]]
    xs = [level["streams"] for level in levels]
    fig, (tokens, cpu) = plt.subplots(1, 2, figsize=(11, 5.4))
    tokens.plot(xs, [level["standin_tokens_per_s"] for level in levels], "s-", color="#ff7f0e",
                label="stand-ins sent (sum of per-stream rates)")
    tokens.plot(xs, [level["received_tokens_per_s"] for level in levels], "o-", color="#1f77b4",
                label="clients received (sum of per-stream rates)")
    tokens.plot(xs, [level.get("goodput_tokens_per_s") or float("nan") for level in levels], "D-", color="#2ca02c",
                label="clients received: all tokens / wall time")
    tokens.plot(xs, [level["nominal_tokens_per_s"] for level in levels], "--", color="#616161", linewidth=1,
                label=f"asked: streams x {result['load_standin_tokens_per_s']:g} tokens/s")
    ceiling = [level.get("cpu_bound_tokens_per_s") for level in levels]
    if any(ceiling):
        tokens.plot(xs, [c or float("nan") for c in ceiling], ":", color="#d62728", linewidth=1,
                    label="what the cores could relay at the CPU per token measured")
    tokens.set_xlabel("concurrent streams through one gateway")
    tokens.set_ylabel("aggregate tokens/s")
    tokens.set_title("Gateway under load: tokens/s", fontsize=10)
    for name, style in zip(LOAD_GROUPS, ["o-", "s-", "^-", "v:"]):
        cpu.plot(xs, [level["cpu_percent"].get(name, 0) for level in levels], style, label=LOAD_GROUPS[name])
    cores = levels[0].get("cores") or 1
    cpu.plot(xs, [level.get("other_processes_cpu_percent", 0) for level in levels], "x:", color="#7f7f7f",
             label="other processes on the machine")
    cpu.plot(xs, [level["machine_cpu_percent"] * cores for level in levels], "k--", linewidth=1,
             label="whole machine, every process")
    cpu.axhline(100, color="#d62728", linestyle=":", linewidth=1, label="one core")
    if cores > 1:
        cpu.axhline(100 * cores, color="#d62728", linestyle="-.", linewidth=1, label=f"all {cores} cores")
    cpu.set_xlabel("concurrent streams through one gateway")
    cpu.set_ylabel("CPU, % of one core")
    cpu.set_title("Gateway under load: CPU by process group", fontsize=10)
    for ax in (tokens, cpu):
        ax.set_xticks(xs)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SUITES = {"ledger": bench_ledger, "gossip": bench_gossip, "sync": bench_sync, "job": bench_job,
          "gateway": bench_gateway}

# sizes when an option is not given: one suite on its own, `all`, and `all --quick`
DEFAULTS = {"entries": 20_000, "runs": 3, "nodes": 10, "rounds": 20, "settle": 10.0,
            "streams": "10,50,100", "stream_tokens": 150, "load_slots": 25}
ALL_DEFAULTS = {"entries": 20_000, "runs": 3, "sync_entries": 50_000, "job_rounds": 20,
                "gossip_nodes": "5,10,15,20", "rounds": 20, "settle": 10.0}
QUICK_DEFAULTS = {"entries": 2_000, "runs": 1, "sync_entries": 2_000, "job_rounds": 3,
                  "gossip_nodes": "3,5", "rounds": 5, "settle": 2.0}
DOCS = Path(__file__).resolve().parent.parent / "docs"
BENCH_EXTRA_HINT = "pip install -e '.[bench]'"


def require_matplotlib() -> None:
    """`all` draws plots; say how to get matplotlib before spending minutes on suites."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "scripts/bench.py all draws its plots with matplotlib, which is not installed.\n"
            f"Install the bench extra:  {BENCH_EXTRA_HINT}"
        ) from None


def _node_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise SystemExit(f"--gossip-nodes takes node counts separated by commas, not {text!r}") from None
    if not counts or min(counts) < 2:
        raise SystemExit("--gossip-nodes needs node counts of at least 2 (a provider and a listener)")
    return counts


def _run_suite(name: str, args: argparse.Namespace, **overrides) -> tuple[dict, float]:
    """One suite with its own copy of the options; a failure is recorded, not raised."""
    suite_args = argparse.Namespace(**{**vars(args), **overrides})
    print(f"\n== {name} " + " ".join(f"{k}={v}" for k, v in overrides.items()), flush=True)
    start = time.monotonic()
    try:
        result = SUITES[name](suite_args)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the other suites still run, the error is shown
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        message = str(exc.code) if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
        print(f"  {name} FAILED: {message}", flush=True)
        result = {"suite": name, "error": message, **overrides}
    return result, round(time.monotonic() - start, 1)


def bench_all(args: argparse.Namespace, argv: list[str]) -> dict:
    """Every suite (gossip at each of --gossip-nodes), then benchmarks.json,
    the plots and benchmarks.md under --out."""
    require_matplotlib()
    import bench_report

    out = Path(args.out)
    counts = _node_counts(args.gossip_nodes)
    command = "scripts/bench.py " + shlex.join(argv)
    machine = bench_report.machine_info()
    print(f"all: ledger, sync, job, gossip at {counts} nodes -> {out}"
          + (" (quick: smoke-test sizes)" if args.quick else ""))
    print(f"  {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB, Python {machine['python']}, "
          f"load {machine['load_average_at_start']}")
    started = time.monotonic()
    suites: dict = {}
    seconds: dict = {}
    suites["ledger"], seconds["ledger"] = _run_suite("ledger", args, entries=args.entries, runs=args.runs)
    suites["sync"], seconds["sync"] = _run_suite("sync", args, entries=args.sync_entries)
    suites["job"], seconds["job"] = _run_suite("job", args, rounds=args.job_rounds)
    suites["gossip"] = []
    for count in counts:
        result, seconds[f"gossip_{count}"] = _run_suite("gossip", args, nodes=count, rounds=args.rounds,
                                                         settle=args.settle)
        suites["gossip"].append(result)
    results = {
        "command": command,
        "quick": bool(args.quick),
        "machine": machine,
        "duration_s": round(time.monotonic() - started, 1),
        "suite_seconds": seconds,
        "suites": suites,
    }
    results["failed"] = [r["suite"] for r in [suites["ledger"], suites["sync"], suites["job"], *suites["gossip"]]
                         if "error" in r]
    written = bench_report.write_report(results, out)
    print("\nwrote:")
    for path in written.values():
        print(f"  {path}")
    if results["failed"]:
        print(f"FAILED: {', '.join(results['failed'])} (shown as failed in benchmarks.md)")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=[*sorted(SUITES), "all"])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--entries", type=int, help="ledger (and sync on its own): entries [20000; quick 2000]")
    parser.add_argument("--runs", type=int, help="ledger: interleaved runs [3; quick 1]")
    parser.add_argument("--nodes", type=int, help="gossip: node processes [10]")
    parser.add_argument("--rounds", type=int, help="gossip (and job, gateway on their own): offers or prompts [20; quick 5]")
    parser.add_argument("--settle", type=float, help="gossip: seconds to let the mesh form first [10; quick 2]")
    parser.add_argument("--gossip-nodes", help="all: gossip node counts, comma-separated [5,10,15,20; quick 3,5]")
    parser.add_argument("--sync-entries", type=int, help="all: entries the sync suite catches up [50000; quick 2000]")
    parser.add_argument("--job-rounds", type=int, help="all: prompts in the job suite [20; quick 3]")
    parser.add_argument("--streams", help="gateway: concurrent streams of each load level [10,50,100]")
    parser.add_argument("--stream-tokens", type=int, help="gateway: tokens per load stream [150]")
    parser.add_argument("--load-slots", type=int, help="gateway: slots of each of the 4 load providers [25]")
    parser.add_argument("--out", default=str(DOCS),
                        help="all: where benchmarks.json, .md and img/ go; gateway: img/gateway_load.png [docs/]")
    parser.add_argument("--quick", action="store_true", help="all: smoke-test sizes, about a minute")
    args = parser.parse_args(argv)
    defaults = DEFAULTS if args.suite != "all" else QUICK_DEFAULTS if args.quick else ALL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.suite == "all":
        result = bench_all(args, argv)
    else:
        result = SUITES[args.suite](args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 1 if result.get("failed") else 0


if __name__ == "__main__":
    raise SystemExit(main())

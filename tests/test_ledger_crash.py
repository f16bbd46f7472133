"""Property 9: nothing acknowledged is lost on kill -9.

A writer process appends entries to a LevelDB ledger in synced groups and
prints an acknowledgement only after each commit returns. The test kills it
with SIGKILL at random moments (20 times), reopens the store, and checks that
every acknowledged entry is there, the chains verify, coins are conserved,
and a rebuild reproduces the same state.

It runs twice: with plain commits, and with pipelined ones
(``Ledger.begin_commit``: a group's write on a thread while the next group
is made, acknowledged when that write returned).

SIGKILL ends the process but not the OS page cache, so this tests LevelDB's
log and the atomicity of our batches, not power loss.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from p2pgpu.core.kv import MemoryStore
from p2pgpu.core.ledger import Ledger
from p2pgpu.store import LevelDBStore
from p2pgpu.testing.ledger import START_MS, key_for, make_genesis

WRITER = r"""
import random, sys, threading
from p2pgpu.core.ledger import Ledger
from p2pgpu.store import LevelDBStore
from p2pgpu.testing.ledger import START_MS, key_for, make_genesis

path, seed, pipelined = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "pipelined"
rng = random.Random(seed)
genesis = make_genesis(allocation=10**9)
ledger = Ledger(LevelDBStore(path), genesis)
alice, bob = key_for("alice"), key_for("bob")
now = START_MS
print("ready", flush=True)
writing = None  # pipelined: (pending commit, its writer thread, the heads it covers)

def heads():
    a, b = ledger.head(alice.public_key), ledger.head(bob.public_key)
    return a[0], b[0] if b else 0

while True:
    group = rng.randint(1, 60)
    for _ in range(group):
        now += 1
        sent = ledger.send(alice, bob.public_key, rng.randint(1, 9), now)
        if rng.random() < 0.5:
            ledger.receive(bob, sent.id, now)
    if not pipelined:
        ledger.commit()
        print(*heads(), flush=True)  # acknowledged only now: alice's and bob's head sequence numbers
        continue
    # pipelined: this group was made while the last one was being written
    if writing is not None:
        pending, thread, covered = writing
        thread.join()
        pending.finish()
        print(*covered, flush=True)  # acknowledged only once its batch is written
    pending = ledger.begin_commit()
    thread = threading.Thread(target=pending.write)
    thread.start()
    writing = (pending, thread, heads())
"""

TRIALS = 20


def run_and_kill(path: str, seed: int, rng: random.Random, mode: str) -> tuple[int, int]:
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, path, str(seed), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked = [0, 0]
    ready = threading.Event()

    def drain() -> None:  # keep reading so the writer never blocks on a full pipe
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("ready"):
                ready.set()
                continue
            parts = line.split()
            if not line.endswith("\n") or len(parts) != 2:
                continue  # a line cut short by the kill was never acknowledged
            acked[0], acked[1] = int(parts[0]), int(parts[1])

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert ready.wait(60), "writer did not start"
        time.sleep(rng.uniform(0.02, 0.4))  # a random moment to crash at, not a synchronisation
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        reader.join(30)
    return acked[0], acked[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "pipelined"])
def test_kill_9_loses_no_acknowledged_entry(tmp_path, mode):
    """``pipelined``: each group's synced write runs on a thread while the
    next group is made (``Ledger.begin_commit``)."""
    rng = random.Random(20261122)
    genesis = make_genesis(allocation=10**9)
    alice, bob = key_for("alice"), key_for("bob")
    acknowledged_any = False
    for trial in range(TRIALS):
        path = str(tmp_path / f"ledger{trial}")
        acked = run_and_kill(path, seed=trial, rng=rng, mode=mode)
        acknowledged_any |= acked[0] > 0
        ledger = Ledger(LevelDBStore(path), genesis)
        try:
            heads = [ledger.head(k.public_key) for k in (alice, bob)]
            recovered = tuple(h[0] if h else 0 for h in heads)
            assert recovered[0] >= acked[0] and recovered[1] >= acked[1], (
                f"trial {trial}: acknowledged {acked} but recovered {recovered}"
            )
            total, minted = ledger.conservation()
            assert total == minted
            before = ledger.state_hash()
            # every stored entry verifies and replays to the same state elsewhere
            replica = Ledger(MemoryStore(), genesis)
            for key in (alice, bob):
                for wire in ledger.chain(key.public_key, 1, 10**9):
                    assert replica.offer(wire, START_MS + 10**9).status == "applied"
            assert replica.state_hash() == before
            ledger.rebuild()
            assert ledger.state_hash() == before
        finally:
            ledger.close()
    assert acknowledged_any, "the writer never got to acknowledge anything"

"""The threaded signature verifier and the pipelined batch path agree exactly
with one-by-one application, and never deadlock however many batches are in
flight (a task waiting on its own pool once did)."""

from __future__ import annotations

import random
import threading

from p2pgpu.core.kv import MemoryStore
from p2pgpu.core.ledger import ApplyResult, Ledger, signature_items
from p2pgpu.errors import BadSignature, MalformedInput
from p2pgpu.testing.ledger import LedgerSim, replay
from p2pgpu.verify import ThreadedVerifier, offer_pipelined

OPS = [(1, a, b, 20 + a, 0) for a in range(5) for b in range(5)] + [(2, a, 0, 1, f) for a in range(5) for f in range(3)]


def history() -> tuple[LedgerSim, list[bytes]]:
    sim = LedgerSim()
    return sim, sim.run(OPS * 3)


def test_threaded_verdicts_match_signatures():
    sim, wires = history()
    ledger = Ledger(MemoryStore(), sim.genesis)
    decoded = ledger.decode_batch(wires)
    items = [(e.signed.signer, e.signed.payload, e.signed.signature) for e in decoded]
    rng = random.Random(1)
    broken = set(rng.sample(range(len(items)), 10))
    items = [(pk, msg, bytes(64) if i in broken else sig) for i, (pk, msg, sig) in enumerate(items)]
    with ThreadedVerifier(threads=2, min_batch=1) as verifier:
        verdicts = verifier(items)
    assert verdicts == [i not in broken for i in range(len(items))]


def test_pipelined_batches_equal_one_by_one_and_report_bad_input():
    sim, wires = history()
    rng = random.Random(7)
    shuffled = wires[:]
    rng.shuffle(shuffled)
    forged = bytearray(shuffled[3])
    forged[-2] ^= 1
    shuffled.insert(5, bytes(forged))
    shuffled.insert(9, b"\x92garbage")
    batches = [shuffled[i : i + 16] for i in range(0, len(shuffled), 16)]
    ledger = Ledger(MemoryStore(), sim.genesis)
    seen: list[int] = []
    with ThreadedVerifier(threads=2, min_batch=1) as verifier:
        results = offer_pipelined(ledger, batches, 10**13, verifier, on_batch=lambda r: seen.append(len(r)))
    assert seen == [len(b) for b in batches]
    assert isinstance(results[5], BadSignature)
    assert isinstance(results[9], MalformedInput)
    assert all(isinstance(r, ApplyResult) for i, r in enumerate(results) if i not in (5, 9))
    assert ledger.state_hash() == replay(wires, MemoryStore(), sim.genesis).state_hash() == sim.world.state_hash()


def test_many_batches_in_flight_do_not_deadlock():
    sim, wires = history()
    ledger = Ledger(MemoryStore(), sim.genesis)
    batches = [wires[i : i + 2] for i in range(0, len(wires), 2)]
    done = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with ThreadedVerifier(threads=2, min_batch=1) as verifier:
                offer_pipelined(ledger, batches, 10**13, verifier)
                for batch in batches:  # the synchronous call path, from the same pool
                    verifier(signature_items(ledger.decode_batch(batch)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    assert done.wait(120), "verifier deadlocked"
    assert not errors, errors
    assert ledger.state_hash() == sim.world.state_hash()

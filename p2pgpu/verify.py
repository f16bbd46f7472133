"""Signature checking spread over threads (an edge: it starts threads).

Ed25519 verification is the ceiling of ledger replication (~60 us of the
~70 us it costs to apply a peer's entry). PyNaCl releases the GIL inside
libsodium, so on this 2-core machine two threads verify ~1.7x as many
signatures per second as one. The ledger's pure ``offer_batch`` takes any
``VerifyMany``; this is the one the node and the benchmarks pass in.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from p2pgpu.core.ledger import Ledger, signature_items, verify_sequentially

class PendingVerdicts:
    """Verdicts still being computed by the pool, in submission order."""

    def __init__(self, futures: "list[Future[list[bool]]]") -> None:
        self._futures = futures

    def result(self) -> list[bool]:
        verdicts: list[bool] = []
        for future in self._futures:
            verdicts.extend(future.result())
        return verdicts


class ThreadedVerifier:
    """A ``VerifyMany`` backed by a small thread pool. Close it when done."""

    def __init__(self, threads: int | None = None, min_batch: int = 32) -> None:
        self.threads = max(1, threads or min(4, os.cpu_count() or 1))
        self.min_batch = min_batch
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="p2pgpu-verify")

    def __call__(self, items: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
        if self.threads == 1 or len(items) < self.min_batch:
            return verify_sequentially(items)
        return self.submit(items).result()

    def submit(self, items: list[tuple[bytes, bytes, bytes]]) -> "PendingVerdicts":
        """Start verifying ``items`` on the pool; ``.result()`` waits and
        returns what ``self(items)`` would.

        Chunks go straight to the pool's workers: a task that itself waited
        on pool tasks would deadlock once every worker held such a task.
        """
        size = max(1, -(-len(items) // self.threads))
        return PendingVerdicts([self._pool.submit(verify_sequentially, items[i : i + size]) for i in range(0, len(items), size)])

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "ThreadedVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def offer_pipelined(
    ledger: Ledger,
    batches: list[list[bytes]],
    now_ms: int,
    verifier: ThreadedVerifier,
    on_batch: Callable[[list], None] | None = None,
) -> list:
    """Offer batches of wires with verification overlapping application.

    While the rules apply batch k on this thread, the pool already verifies
    batch k+1 (libsodium releases the GIL), so on two cores the slower of the
    two stages sets the pace instead of their sum. The ledger commits once per
    batch, then ``on_batch(results)`` runs (acknowledgement point).
    Returns the results of all batches, in order.
    """
    results: list = []
    if not batches:
        return results
    decoded = ledger.decode_batch(batches[0])
    pending = verifier.submit(signature_items(decoded))
    for index in range(len(batches)):
        if index + 1 < len(batches):
            next_decoded = ledger.decode_batch(batches[index + 1])
            next_pending = verifier.submit(signature_items(next_decoded))
        batch_results = ledger.apply_checked(decoded, pending.result(), now_ms)
        ledger.commit()
        if on_batch is not None:
            on_batch(batch_results)
        results.extend(batch_results)
        if index + 1 < len(batches):
            decoded, pending = next_decoded, next_pending
    return results

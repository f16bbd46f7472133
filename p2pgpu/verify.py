"""Signature checking spread over threads (an edge: it starts threads).

Ed25519 verification is the ceiling of ledger replication (~60 us of the
~70 us it costs to apply a peer's entry). PyNaCl releases the GIL inside
libsodium, so on this 2-core machine two threads verify ~1.7x as many
signatures per second as one. The ledger's pure ``offer_batch`` takes any
``VerifyMany``; this is the one the node and the benchmarks pass in.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import nacl.bindings
import nacl.exceptions

SIGNATURE_SIZE = 64


def _verify_chunk(items: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
    out = []
    open_signed = nacl.bindings.crypto_sign_open
    for public_key, message, signature in items:
        if len(signature) != SIGNATURE_SIZE or len(public_key) != 32:
            out.append(False)
            continue
        try:
            open_signed(signature + message, public_key)
            out.append(True)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            out.append(False)
    return out


class ThreadedVerifier:
    """A ``VerifyMany`` backed by a small thread pool. Close it when done."""

    def __init__(self, threads: int | None = None, min_batch: int = 32) -> None:
        self.threads = max(1, threads or min(4, os.cpu_count() or 1))
        self.min_batch = min_batch
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="p2pgpu-verify")

    def __call__(self, items: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
        if self.threads == 1 or len(items) < self.min_batch:
            return _verify_chunk(items)
        size = -(-len(items) // self.threads)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        results: list[bool] = []
        for part in self._pool.map(_verify_chunk, chunks):
            results.extend(part)
        return results

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "ThreadedVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The key-value seam between ledger rules and storage.

``KeyValueStore`` is what the ledger needs from a database: point reads,
ordered prefix scans, and one atomic write of many puts/deletes, optionally
synced to disk. ``p2pgpu.store.LevelDBStore`` is the real one; ``MemoryStore``
here is the in-memory double for fast tests (same ordering semantics: keys are
compared as bytes, so big-endian integers scan in numeric order).

``Overlay`` stages writes on top of a store. The ledger validates and applies
many entries into an overlay, reads its own staged writes back, and flushes
them in one synced ``write`` (group commit): durability costs one fsync per
group instead of one per entry.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Protocol

from sortedcontainers import SortedDict


class KeyValueStore(Protocol):
    def get(self, key: bytes) -> bytes | None:
        """The value at ``key``, or None."""

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) whose key starts with ``prefix``, in key order."""

    def write(self, changes: Mapping[bytes, bytes | None], sync: bool) -> None:
        """Apply puts (bytes) and deletes (None) atomically; fsync if ``sync``."""

    def close(self) -> None:
        """Release the store. Further calls are errors."""


def _prefix_range(mapping: SortedDict, prefix: bytes) -> Iterator[bytes]:
    for key in mapping.irange(minimum=prefix):
        if not key.startswith(prefix):
            return
        yield key


class MemoryStore:
    """A ``KeyValueStore`` in a sorted dict. Counts writes and syncs for tests."""

    def __init__(self) -> None:
        self._data: SortedDict = SortedDict()
        self.writes = 0
        self.synced_writes = 0
        self.closed = False

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        for key in list(_prefix_range(self._data, prefix)):
            yield key, self._data[key]

    def write(self, changes: Mapping[bytes, bytes | None], sync: bool) -> None:
        for key, value in changes.items():
            if value is None:
                self._data.pop(key, None)
            else:
                self._data[key] = bytes(value)
        self.writes += 1
        self.synced_writes += int(sync)

    def close(self) -> None:
        self.closed = True

    def dump(self) -> dict[bytes, bytes]:
        """A copy of every key and value, for byte-for-byte comparisons."""
        return dict(self._data)


_MISSING = object()


class Overlay:
    """Writes staged over a store; reads see staged values first.

    Staging is a plain dict (point reads and writes are the hot path); the
    rare prefix scans sort the staged keys they match. Not a transaction
    manager: callers finish validating before they stage anything, so a
    rejected input leaves the overlay untouched.
    """

    def __init__(self, store: KeyValueStore) -> None:
        self.store = store
        # One dict for the overlay's whole life (flush and discard empty it
        # in place), so ``put`` can be the dict's own bound ``__setitem__``:
        # a Python-level method would double the cost of the ledger's
        # several puts per entry.
        self._staged: dict[bytes, bytes | None] = {}
        self.put: Callable[[bytes, bytes], None] = self._staged.__setitem__
        """Stage ``value`` at ``key``."""
        self._writing: dict[bytes, bytes | None] | None = None  # handed to ``begin_flush``, not yet written

    def __len__(self) -> int:
        return len(self._staged)

    def get(self, key: bytes) -> bytes | None:
        value = self._staged.get(key, _MISSING)
        if value is _MISSING:
            if self._writing is not None:
                value = self._writing.get(key, _MISSING)
                if value is not _MISSING:
                    return value  # type: ignore[return-value]
            return self.store.get(key)
        return value  # type: ignore[return-value]

    def delete(self, key: bytes) -> None:
        self._staged[key] = None

    def scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Merge the store's and the staged keys under ``prefix`` in order
        (staged over any batch still being written, over the store)."""
        staged = self._staged
        if self._writing is not None:
            staged = {**{k: v for k, v in self._writing.items() if k.startswith(prefix)}, **staged}
        staged_keys = sorted(k for k in staged if k.startswith(prefix))
        if not staged_keys:
            yield from self.store.scan(prefix)
            return
        staged_iter = iter(staged_keys)
        next_staged = next(staged_iter, None)
        for key, value in self.store.scan(prefix):
            while next_staged is not None and next_staged < key:
                staged_value = staged[next_staged]
                if staged_value is not None:
                    yield next_staged, staged_value
                next_staged = next(staged_iter, None)
            if next_staged == key:
                staged_value = staged[key]
                if staged_value is not None:
                    yield key, staged_value
                next_staged = next(staged_iter, None)
            else:
                yield key, value
        while next_staged is not None:
            staged_value = staged[next_staged]
            if staged_value is not None:
                yield next_staged, staged_value
            next_staged = next(staged_iter, None)

    def flush(self, sync: bool = True) -> int:
        """Write everything staged in one atomic batch; returns keys written."""
        if self._writing is not None:
            raise RuntimeError("a batch handed to begin_flush is still being written")
        count = len(self._staged)
        if count:
            self.store.write(self._staged, sync=sync)
            self._staged.clear()
        return count

    def begin_flush(self) -> Callable[[], None]:
        """Hand everything staged over as one synced batch to be written by
        the returned call, which may run on another thread (for a store
        that allows concurrent reads, as LevelDB does) while this overlay
        stages the next batch. Reads see the handed-over writes until
        ``end_flush``. One batch at a time, so the store only ever holds a
        prefix of the batches."""
        if self._writing is not None:
            raise RuntimeError("a batch handed to begin_flush is still being written")
        batch, store = dict(self._staged), self.store
        self._staged.clear()
        self._writing = batch

        def write() -> None:
            if batch:
                store.write(batch, sync=True)

        return write

    def end_flush(self) -> None:
        """The call ``begin_flush`` returned has returned: the batch is in the store."""
        self._writing = None

    def discard(self) -> None:
        self._staged.clear()

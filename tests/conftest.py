"""Shared fixtures. ``store_factory`` runs a test once per ledger store: the
in-memory double and real LevelDB in a temporary directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from p2pgpu.core.kv import MemoryStore
from p2pgpu.store import LevelDBStore


# Nodes that tests start as processes (``p2pgpu node run``) inherit this: each
# gateway on a free port, never the one default port (11435) that a second
# node on the machine, or the developer's own node, would already hold.
os.environ.setdefault("P2PGPU_GATEWAY_LISTEN", "127.0.0.1:0")


class StoreFactory:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._root = Path(tempfile.mkdtemp(prefix="p2pgpu-test-"))
        self._count = 0
        self._opened: list = []

    def __call__(self):
        if self.kind == "memory":
            return MemoryStore()
        self._count += 1
        store = LevelDBStore(self._root / f"db{self._count}")
        self._opened.append(store)
        return store

    def close(self) -> None:
        for store in self._opened:
            store.close()
        shutil.rmtree(self._root, ignore_errors=True)


@pytest.fixture(params=["memory", "leveldb"])
def store_factory(request):
    factory = StoreFactory(request.param)
    yield factory
    factory.close()

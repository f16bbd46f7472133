"""``Ledger.begin_commit``: a group's synced write runs on another thread
while the next group is made. Reads must see the batch being written,
batches must reach the store in order and whole, and nothing may be
acknowledged before its batch is durable. Real LevelDB, real threads."""

from __future__ import annotations

import threading

import pytest

from p2pgpu.core.kv import MemoryStore, Overlay
from p2pgpu.core.ledger import Ledger
from p2pgpu.store import LevelDBStore
from p2pgpu.testing.ledger import START_MS, key_for, make_genesis

alice, bob, carol = key_for("alice"), key_for("bob"), key_for("carol")


def test_overlay_reads_see_the_batch_being_written_under_what_is_staged_since():
    store = MemoryStore()
    store.write({b"k1": b"old", b"k2": b"old", b"k4": b"old"}, sync=True)
    overlay = Overlay(store)
    overlay.put(b"k1", b"first")
    overlay.delete(b"k2")
    overlay.put(b"k3", b"first")
    write = overlay.begin_flush()
    assert store.get(b"k1") == b"old"  # nothing written yet
    overlay.put(b"k3", b"second")  # staged after the hand-over: wins over the batch
    overlay.put(b"k5", b"second")
    assert [overlay.get(k) for k in (b"k1", b"k2", b"k3", b"k4", b"k5")] == [b"first", None, b"second", b"old", b"second"]
    assert list(overlay.scan(b"k")) == [(b"k1", b"first"), (b"k3", b"second"), (b"k4", b"old"), (b"k5", b"second")]
    with pytest.raises(RuntimeError):
        overlay.flush()  # one batch at a time: the store only ever holds a prefix of them
    with pytest.raises(RuntimeError):
        overlay.begin_flush()
    write()
    overlay.end_flush()
    assert store.dump() == {b"k1": b"first", b"k3": b"first", b"k4": b"old"}
    assert overlay.get(b"k3") == b"second" and overlay.get(b"k2") is None
    overlay.flush()
    assert store.dump() == {b"k1": b"first", b"k3": b"second", b"k4": b"old", b"k5": b"second"}


def _payments(ledger: Ledger, start: int, count: int) -> None:
    keys = [alice, bob, carol]
    for i in range(start, start + count):
        ledger.send(keys[i % 3], keys[(i + 1) % 3].public_key, 1 + i % 7, START_MS + i)


def test_pipelined_commits_end_in_the_same_state_as_plain_ones_and_survive_a_reopen(tmp_path):
    genesis = make_genesis()
    plain = Ledger(LevelDBStore(tmp_path / "plain"), genesis)
    piped = Ledger(LevelDBStore(tmp_path / "piped"), genesis)
    acknowledged = 0
    for group in range(12):
        _payments(plain, group * 50, 50)
        plain.commit()
        _payments(piped, group * 50, 50)
        pending = piped.begin_commit()
        assert piped.uncommitted == 0 and pending.entries == (50 if group == 0 else 55)  # + those made during the last write
        writer = threading.Thread(target=pending.write)
        writer.start()
        # the next group is made while the last one is written: its rules
        # read balances and chain heads that are only in the batch in flight
        _payments(piped, 10_000 + group * 5, 5)
        _payments(plain, 10_000 + group * 5, 5)
        writer.join()
        acknowledged += pending.finish()
    acknowledged += piped.commit()
    plain.commit()
    assert acknowledged == 12 * 55
    assert piped.state_hash() == plain.state_hash()
    assert piped.conservation() == plain.conservation()
    expected = plain.state_hash()
    piped.close()
    plain.close()
    reopened = Ledger(LevelDBStore(tmp_path / "piped"), genesis)
    assert reopened.state_hash() == expected
    reopened.close()


def test_an_unfinished_pipelined_commit_blocks_a_plain_one_and_close(tmp_path):
    ledger = Ledger(LevelDBStore(tmp_path / "db"), make_genesis())
    _payments(ledger, 0, 3)
    pending = ledger.begin_commit()
    with pytest.raises(RuntimeError):
        ledger.commit()
    pending.write()
    assert pending.finish() == 3
    ledger.close()

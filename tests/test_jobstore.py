"""The job store edge (``p2pgpu.jobstore``) on a real LevelDB in tmp_path:
persistence across reopening, damaged values, the bound, prefix lookup."""

from __future__ import annotations

from dataclasses import replace

import plyvel
import pytest

from p2pgpu.core.jobrecords import (
    COMPLETED,
    CONSUMER,
    FAILED,
    MAX_TEXT_CHARS,
    PROVIDER,
    QUEUED,
    RUNNING,
    JobRecord,
    advance,
)
from p2pgpu.errors import AmbiguousJobId, ConfigError, MalformedInput, UnknownJob
from p2pgpu.jobstore import INTERRUPTED, JobStore
from p2pgpu.testing.ledger import key_for

ALICE, BOB = key_for("alice").public_key, key_for("bob").public_key
T0 = 1_700_000_000_000


def job_id(n: int) -> bytes:
    return n.to_bytes(2, "big") + b"\x00" * 14


def done(n: int, role: str = CONSUMER) -> JobRecord:
    record = JobRecord(job_id(n), role, QUEUED if role == CONSUMER else RUNNING, "llama3.2:1b", ALICE,
                       BOB if role == PROVIDER else None, T0 + n)
    record = advance(record, RUNNING, T0 + n + 1, provider=BOB)
    return advance(record, COMPLETED, T0 + n + 2, tokens_out=n, cost=10 * n)


def test_records_and_texts_survive_a_reopen(tmp_path):
    path = tmp_path / "jobs"
    with JobStore(path) as store:
        store.put(done(1), "first answer")
        store.put(done(2, PROVIDER))
        store.put(done(3), "é" * (MAX_TEXT_CHARS + 10))
        running = advance(JobRecord(job_id(4), CONSUMER, QUEUED, "m", ALICE, None, T0 + 4), RUNNING, T0 + 5,
                          provider=BOB)
        store.put(running)
    with JobStore(path, now_ms=T0 + 1_000) as store:
        assert len(store) == 4
        assert [r.job_id for r in store.newest()] == [job_id(4), job_id(3), job_id(2), job_id(1)]
        assert [r.job_id for r in store.newest(PROVIDER)] == [job_id(2)]
        assert [r.job_id for r in store.newest(CONSUMER, limit=2)] == [job_id(4), job_id(3)]
        assert store.get(job_id(1)) == done(1)
        assert store.text(job_id(1)) == "first answer"
        assert store.text(job_id(3)) == "é" * MAX_TEXT_CHARS
        assert store.text(job_id(2)) is None
        # a job that was running when the node stopped did not survive it
        interrupted = store.get(job_id(4))
        assert interrupted.status == FAILED and interrupted.reason == INTERRUPTED and interrupted.ended_ms == T0 + 1_000
    with JobStore(path) as store:
        assert store.get(job_id(4)).status == FAILED  # and that was written down


def test_damaged_values_are_dropped_not_fatal(tmp_path):
    path = tmp_path / "jobs"
    with JobStore(path) as store:
        store.put(done(1), "ok")
        store.put(done(2), "also ok")
    db = plyvel.DB(str(path))
    db.put(b"r" + job_id(2), b"\xc1garbage")  # damaged record
    db.put(b"r" + job_id(3), done(1).to_wire())  # a record under another id
    db.put(b"t" + job_id(1), b"\x07")  # damaged text
    db.close()
    with JobStore(path) as store:
        assert [r.job_id for r in store.newest()] == [job_id(1)]
        assert store.text(job_id(1)) is None
    db = plyvel.DB(str(path))
    assert db.get(b"r" + job_id(2)) is None and db.get(b"r" + job_id(3)) is None  # cleaned away
    db.close()


def test_the_store_keeps_the_newest_and_never_drops_a_live_job(tmp_path):
    with JobStore(tmp_path / "jobs", max_jobs=3) as store:
        live = JobRecord(job_id(0), CONSUMER, QUEUED, "m", ALICE, None, T0)
        store.put(live)
        for n in range(1, 6):
            store.put(done(n), f"answer {n}")
        assert [r.job_id for r in store.newest()] == [job_id(5), job_id(4), job_id(0)]
        assert store.text(job_id(1)) is None and store.text(job_id(5)) == "answer 5"
    with JobStore(tmp_path / "jobs", max_jobs=2) as store:  # a smaller bound applies at once
        assert len(store) == 2


def test_find_by_id_or_prefix(tmp_path):
    twins = [bytes.fromhex("1234" + "00" * 14), bytes.fromhex("1234" + "01" * 14)]
    with JobStore(tmp_path / "jobs") as store:
        for n, ident in enumerate([*twins, job_id(0xABCD)]):
            store.put(replace(done(n + 1), job_id=ident))
        assert store.find(job_id(0xABCD).hex()).job_id == job_id(0xABCD)
        assert store.find("ABCD").job_id == job_id(0xABCD)
        assert store.find("123401").job_id == twins[1]
        with pytest.raises(AmbiguousJobId, match="1234"):
            store.find("1234")
        with pytest.raises(UnknownJob):
            store.find("ffff")
        with pytest.raises(UnknownJob):
            store.find("ff" * 16)
        with pytest.raises(MalformedInput):
            store.find("xyz!")
        with pytest.raises(MalformedInput):
            store.find("123")


def test_a_second_store_on_the_same_directory_is_a_clear_error(tmp_path):
    with JobStore(tmp_path / "jobs"):
        with pytest.raises(ConfigError, match="another node"):
            JobStore(tmp_path / "jobs")


def test_kept_vouchers_survive_a_reopen_apart_from_the_records_until_forgotten(tmp_path):
    path = tmp_path / "jobs"
    with JobStore(path, max_jobs=1) as store:
        store.keep_voucher(job_id(1), b"first voucher")
        store.keep_voucher(job_id(1), b"newer voucher")  # only the newest is kept
        store.keep_voucher(job_id(2), b"another job's")
        store.put(done(3))
        store.put(done(4))  # the bound prunes records, never a voucher still to be claimed
    with JobStore(path) as store:
        assert store.kept_vouchers() == [(job_id(1), b"newer voucher"), (job_id(2), b"another job's")]
        assert len(store) == 1
        store.forget_voucher(job_id(1))
        assert store.kept_vouchers() == [(job_id(2), b"another job's")]
    store = JobStore(path)
    store.close()
    with pytest.raises(ConfigError):  # a worker thread late for a closed store gets an error, not a crash
        store.keep_voucher(job_id(5), b"late")

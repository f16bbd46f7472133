"""The node's job store: its own jobs in LevelDB (plyvel), in ``<data dir>/jobs``.

An edge: it holds no rules (``p2pgpu.core.jobrecords`` has the record, its
transitions and its wire format); it keeps every record in memory for
listings and writes each change through to its own database, apart from the
ledger's, so ``p2pgpu jobs`` still lists them after a restart.

Layout (one-byte prefixes)::

    r + job id  ->  JobRecord.to_wire()      (small: listed at start-up)
    t + job id  ->  the answer text          (up to 64 Ki characters; read on demand)
    v + job id  ->  KeptVoucher.to_wire()    (provider: the newest voucher kept, until claimed)

Bounded: at most ``max_jobs`` records (newest kept). When a new record
passes the bound, the oldest finished ones go, record and text together in
one write batch; jobs still queued or running are never dropped.

Writes are not synced: losing the last few job records in a power cut is
acceptable (the ledger, which holds the money, syncs its own writes), and
syncing every status change would cost far more than it protects. The one
exception is a served job's newest voucher (``keep_voucher``): it *is*
money, the pay for everything it covers, so it is written synced (about
0.2 ms; from a worker thread, so the event loop never waits for the disk)
before the provider serves more than a credit window past it
(``p2pgpu.core.jobs``, ``durable_vouchers``). After a crash the node claims
what these cover (docs/protocol.md §7).

A stored value that does not decode (a damaged disk, a newer version) is
logged and deleted at start-up, never fatal. Records of jobs that were
queued or running when the node stopped are marked failed then: their
sessions died with the process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import plyvel
from sortedcontainers import SortedList

from p2pgpu.core.jobrecords import (
    FAILED, INTERRUPTED, JobRecord, advance, decode_text, encode_text, match_job, parse_job_ref,
)
from p2pgpu.errors import ConfigError, MalformedInput, UnknownJob

__all__ = ["JOBS_DIR", "DEFAULT_MAX_JOBS", "JobStore"]

log = logging.getLogger(__name__)

JOBS_DIR = "jobs"
DEFAULT_MAX_JOBS = 10_000
P_RECORD = b"r"
P_TEXT = b"t"
P_VOUCHER = b"v"


def _reason(exc: Exception) -> str:
    detail = exc.args[0] if exc.args else exc
    return detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)


class JobStore:
    """This node's jobs, newest kept. Single-threaded (the trio thread).

    ``open`` loads every record; ``put`` writes one (and its answer text,
    when given); ``get``/``find``/``newest`` read from memory; ``text``
    reads the stored answer. ``close`` when done.
    """

    def __init__(self, path: str | Path, *, max_jobs: int = DEFAULT_MAX_JOBS, now_ms: int = 0) -> None:
        if max_jobs < 1:
            raise ConfigError(f"the job store must keep at least one job, not {max_jobs}")
        self.path = Path(path)
        self.max_jobs = max_jobs
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._db = plyvel.DB(str(self.path), create_if_missing=True)
        except plyvel.IOError as exc:
            raise ConfigError(
                f"cannot open the job store at {self.path}: {_reason(exc)} (is another node using this data dir?)"
            ) from exc
        except plyvel.CorruptionError as exc:
            raise ConfigError(f"the job store at {self.path} is corrupt: {_reason(exc)}") from exc
        self._records: dict[bytes, JobRecord] = {}
        self._order: SortedList = SortedList()  # (created_ms, job id)
        self._closing = threading.Lock()  # keep_voucher runs on worker threads: never while closing
        try:
            self._load(now_ms)
        except BaseException:
            self._db.close()
            raise

    def _load(self, now_ms: int) -> None:
        damaged: list[bytes] = []
        interrupted: list[JobRecord] = []
        with self._db.iterator(prefix=P_RECORD) as iterator:
            for key, value in iterator:
                try:
                    record = JobRecord.from_wire(value)
                    if record.job_id != key[1:]:
                        raise MalformedInput("job record: stored under another id")
                except MalformedInput as exc:
                    log.warning("job store: dropping a damaged record %s: %s", key[1:].hex()[:16], exc)
                    damaged.append(key[1:])
                    continue
                if not record.final:
                    record = advance(record, FAILED, max(now_ms, record.created_ms), reason=INTERRUPTED)
                    interrupted.append(record)
                self._remember(record)
        if damaged:
            with self._db.write_batch() as batch:
                for job_id in damaged:
                    batch.delete(P_RECORD + job_id)
                    batch.delete(P_TEXT + job_id)
        for record in interrupted:
            self._db.put(P_RECORD + record.job_id, record.to_wire())
        self._prune()

    def _remember(self, record: JobRecord) -> None:
        old = self._records.get(record.job_id)
        if old is not None:
            self._order.discard((old.created_ms, old.job_id))
        self._records[record.job_id] = record
        self._order.add((record.created_ms, record.job_id))

    def _prune(self) -> None:
        excess = len(self._records) - self.max_jobs
        if excess <= 0:
            return
        victims = []
        for _, job_id in self._order:  # oldest first
            if self._records[job_id].final:
                victims.append(job_id)
                if len(victims) == excess:
                    break
        if not victims:
            return
        with self._db.write_batch() as batch:
            for job_id in victims:
                record = self._records.pop(job_id)
                self._order.discard((record.created_ms, job_id))
                batch.delete(P_RECORD + job_id)
                batch.delete(P_TEXT + job_id)

    # ------------------------------------------------------------ writing

    def put(self, record: JobRecord, text: str | None = None) -> None:
        """Store ``record`` (replacing the one with its id) and, when given,
        its answer text (cut to the stored length)."""
        with self._db.write_batch() as batch:
            batch.put(P_RECORD + record.job_id, record.to_wire())
            if text is not None:
                batch.put(P_TEXT + record.job_id, encode_text(text))
        self._remember(record)
        self._prune()

    # ------------------------------------------------------------ vouchers (provider)

    def keep_voucher(self, job_id: bytes, kept: bytes) -> None:
        """Store a served job's newest voucher (``KeptVoucher.to_wire()``),
        synced: durable when this returns. Safe to call from a worker thread
        (it touches only LevelDB, which is thread-safe, and never a closed one)."""
        with self._closing:
            if self._db.closed:
                raise ConfigError("the job store is closed")
            self._db.put(P_VOUCHER + job_id, kept, sync=True)

    def kept_vouchers(self) -> list[tuple[bytes, bytes]]:
        """(job id, stored kept voucher) for every voucher not yet forgotten."""
        with self._db.iterator(prefix=P_VOUCHER) as iterator:
            return [(key[1:], value) for key, value in iterator]

    def forget_voucher(self, job_id: bytes) -> None:
        """Its hold is claimed (or its pay lost): the voucher is no longer needed."""
        self._db.delete(P_VOUCHER + job_id)

    # ------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._records

    def get(self, job_id: bytes) -> JobRecord | None:
        return self._records.get(job_id)

    def find(self, ref: str) -> JobRecord:
        """The job whose id is ``ref`` or starts with it (at least 4 hex
        digits): ``MalformedInput``, ``UnknownJob`` or ``AmbiguousJobId``."""
        ref = parse_job_ref(ref)
        if len(ref) == 32:
            record = self._records.get(bytes.fromhex(ref))
            if record is None:
                raise UnknownJob(f"this node has no job {ref}")
            return record
        return self._records[match_job(self._records, ref)]

    def newest(self, role: str | None = None, limit: int | None = None) -> Iterator[JobRecord]:
        """Records newest first, only ``role``'s when given, at most ``limit``."""
        count = 0
        for _, job_id in reversed(self._order):
            if limit is not None and count >= limit:
                return
            record = self._records[job_id]
            if role is None or record.role == role:
                count += 1
                yield record

    def text(self, job_id: bytes) -> str | None:
        """The stored answer text; None if there is none (or it was damaged)."""
        raw = self._db.get(P_TEXT + job_id)
        if raw is None:
            return None
        try:
            return decode_text(raw)
        except MalformedInput as exc:
            log.warning("job store: the text of job %s is damaged: %s", job_id.hex()[:16], exc)
            return None

    def close(self) -> None:
        with self._closing:
            if not self._db.closed:
                self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

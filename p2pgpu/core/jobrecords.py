"""What a node remembers about its own jobs (issue #4, "job store").

Theory of operation
-------------------
Every node keeps a record of each job it took part in: as *consumer* (a job
it submitted) and as *provider* (a job it served). A record is a frozen
``JobRecord``; the edge (``p2pgpu.jobstore``) persists it, the node makes a
new one at every step with ``advance``, and the local API shows it through
``job_info``. A node only ever holds its own jobs, so listing them can never
show another node's.

One table of transitions (``TRANSITIONS``)::

    queued    -> queued, running, failed, cancelled
    running   -> queued (a busy provider: back in line), running (the next
                 attempt, the first token), completed, failed, cancelled, rejected
    completed, failed, cancelled, rejected: final, no way out

A consumer's record starts *queued* (waiting for a provider with a free
slot, even if only for a moment); a provider's starts *running* (accepted)
or *rejected*. ``advance`` stamps ``started_ms`` on the first move to
running and ``ended_ms`` on the move to a final status, so those two can
never disagree with the status.

Records are stored as positional msgpack arrays (``to_wire`` /
``from_wire``), checked field by field on the way back in like anything
read from outside, so a damaged database value is a ``MalformedInput``,
never a crash. The answer text is stored beside the record, not in it (a
listing never reads it), and cut to ``MAX_TEXT_CHARS``.

Pure module: no I/O; time is always a parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Iterable

from p2pgpu.core.codec import (
    MAX_INT, MAX_TIMESTAMP_MS, Signed, Tag, check_bytes, check_int, check_list, check_str, decode_signed, pack, unpack,
)
from p2pgpu.core.identity import PUBLIC_KEY_SIZE, peer_id_from_public_key
from p2pgpu.core.ledger import HOLD, MAX_AMOUNT, MAX_ENTRY_SIZE, Entry, Hold, decode_entry
from p2pgpu.core.offers import MAX_MODEL_NAME_CHARS
from p2pgpu.core.settlement import ReleaseState
from p2pgpu.errors import AmbiguousJobId, JobStateConflict, MalformedInput, UnknownJob

__all__ = [
    "CONSUMER", "PROVIDER", "ROLES",
    "QUEUED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "REJECTED", "STATUSES", "FINAL", "TRANSITIONS",
    "RELEASES", "ReleaseState", "MAX_ATTEMPTS", "MAX_REASON_CHARS", "MAX_TEXT_CHARS", "MAX_RECORD_BYTES",
    "Attempt", "JobRecord", "KeptVoucher", "advance", "check_cancellable", "job_info", "parse_job_ref", "match_job",
    "settle_attempt", "served_pay", "start_attempt", "end_attempt",
    "cut_text", "encode_text", "decode_text",
]

CONSUMER, PROVIDER = "consumer", "provider"
ROLES = frozenset({CONSUMER, PROVIDER})

QUEUED, RUNNING = "queued", "running"
COMPLETED, FAILED, CANCELLED, REJECTED = "completed", "failed", "cancelled", "rejected"
STATUSES = frozenset({QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED, REJECTED})
FINAL = frozenset({COMPLETED, FAILED, CANCELLED, REJECTED})

TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({QUEUED, RUNNING, FAILED, CANCELLED}),
    RUNNING: frozenset({QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED, REJECTED}),
    **{status: frozenset() for status in FINAL},
}

# What became of a job's hold, as the consumer sees it (``ReleaseState``):
# "" (no hold yet), "released" (the unclaimed rest is back), "pending" (to
# be released once the provider's claim shows up or the hold expires).
RELEASES = frozenset(ReleaseState)

INTERRUPTED = "interrupted: the node stopped while the job ran"

JOB_ID_SIZE = 16
HOLD_ID_SIZE = 32
MAX_ATTEMPTS = 32  # the newest attempts are kept
MAX_REASON_CHARS = 256
MAX_TEXT_CHARS = 64 * 1024
MAX_RECORD_BYTES = 64 * 1024
MAX_TEXT_BYTES = 4 * MAX_TEXT_CHARS + 16
WIRE_VERSION = 1
_RECORD_FIELDS = 19
_ATTEMPT_FIELDS = 6
_OLD_ATTEMPT_FIELDS = 5  # before ``paid``
_HEX = re.compile(r"[0-9a-f]+")
MIN_PREFIX = 4


@dataclass(frozen=True, slots=True)
class Attempt:
    """One provider tried for a consumer's job, and how it went."""

    provider: bytes  # public key
    started_ms: int
    outcome: str = ""  # "" while it runs; then "completed", "busy", or why it failed
    hold_id: bytes | None = None
    release: ReleaseState = ReleaseState.NONE
    # What this attempt costs us: the last voucher we signed for its hold
    # until the hold is settled, then what the provider was paid from it.
    # None when unknown (records written before this field).
    paid: int | None = None

    def to_wire(self) -> list[Any]:
        return [self.provider, self.started_ms, self.outcome, self.hold_id, self.release, self.paid]

    @classmethod
    def from_wire(cls, value: Any) -> Attempt:
        check_list(value, "attempt")
        if len(value) == _OLD_ATTEMPT_FIELDS:
            value = [*value, None]
        provider, started, outcome, hold_id, release, paid = check_list(value, "attempt", length=_ATTEMPT_FIELDS)
        check_bytes(provider, "attempt provider", size=PUBLIC_KEY_SIZE)
        check_int(started, "attempt start", 0, MAX_TIMESTAMP_MS)
        check_str(outcome, "attempt outcome", MAX_REASON_CHARS)
        if hold_id is not None:
            check_bytes(hold_id, "attempt hold id", size=HOLD_ID_SIZE)
        if paid is not None:
            check_int(paid, "attempt paid", 0, MAX_INT)
        return cls(provider, started, outcome, hold_id, _check_release(release), paid)


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job as this node saw it. Amounts in base units, times in ms.

    ``provider`` is None while a consumer's job waits for its first
    provider. ``tokens_in`` is the prompt tokens the provider reported
    (None until known); ``tokens_out`` the tokens delivered (consumer) or
    sent (provider); ``cost`` what the consumer pays for them (the last
    voucher: what the provider may claim). ``text_chars`` is the length of
    the stored answer text, ``text_cut`` whether it was longer.
    """

    job_id: bytes
    role: str
    status: str
    model: str
    consumer: bytes
    provider: bytes | None
    created_ms: int
    started_ms: int | None = None
    first_token_ms: int | None = None
    ended_ms: int | None = None
    tokens_in: int | None = None
    tokens_out: int = 0
    cost: int = 0
    hold_id: bytes | None = None
    release: ReleaseState = ReleaseState.NONE
    reason: str = ""
    attempts: tuple[Attempt, ...] = ()
    text_chars: int = 0
    text_cut: bool = False

    @property
    def id_hex(self) -> str:
        return self.job_id.hex()

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def peer(self) -> bytes | None:
        """The other side: the provider of our job, or the consumer we served."""
        return self.provider if self.role == CONSUMER else self.consumer

    def to_wire(self) -> bytes:
        return pack([
            WIRE_VERSION, self.job_id, self.role, self.status, self.model, self.consumer, self.provider,
            self.created_ms, self.started_ms, self.first_token_ms, self.ended_ms, self.tokens_in,
            self.tokens_out, self.cost, self.hold_id, self.release, self.reason,
            [a.to_wire() for a in self.attempts], [self.text_chars, self.text_cut],
        ])

    @classmethod
    def from_wire(cls, data: bytes) -> JobRecord:
        """A stored record; ``MalformedInput`` for anything that is not one."""
        value = check_list(unpack(data, max_size=MAX_RECORD_BYTES, what="job record"), "job record",
                           length=_RECORD_FIELDS)
        (version, job_id, role, status, model, consumer, provider, created, started, first_token, ended,
         tokens_in, tokens_out, cost, hold_id, release, reason, attempts, text) = value
        if version != WIRE_VERSION:
            raise MalformedInput(f"job record: unknown version {version!r}")
        check_bytes(job_id, "job id", size=JOB_ID_SIZE)
        if role not in ROLES:
            raise MalformedInput(f"job record: unknown role {role!r}")
        if status not in STATUSES:
            raise MalformedInput(f"job record: unknown status {status!r}")
        check_str(model, "model", MAX_MODEL_NAME_CHARS)
        check_bytes(consumer, "consumer", size=PUBLIC_KEY_SIZE)
        if provider is not None:
            check_bytes(provider, "provider", size=PUBLIC_KEY_SIZE)
        check_int(created, "created", 0, MAX_TIMESTAMP_MS)
        for name, moment in (("started", started), ("first token", first_token), ("ended", ended)):
            if moment is not None:
                check_int(moment, name, 0, MAX_TIMESTAMP_MS)
        if tokens_in is not None:
            check_int(tokens_in, "tokens in")
        check_int(tokens_out, "tokens out")
        check_int(cost, "cost", 0, MAX_INT)
        if hold_id is not None:
            check_bytes(hold_id, "hold id", size=HOLD_ID_SIZE)
        release = _check_release(release)
        check_str(reason, "reason", MAX_REASON_CHARS)
        tried = tuple(Attempt.from_wire(a) for a in check_list(attempts, "attempts", max_len=MAX_ATTEMPTS))
        text_chars, text_cut = check_list(text, "text facts", length=2)
        check_int(text_chars, "text length", 0, MAX_TEXT_CHARS)
        if type(text_cut) is not bool:
            raise MalformedInput("job record: text cut flag is not a boolean")
        if (ended is not None) != (status in FINAL):
            raise MalformedInput(f"job record: status {status} with end time {ended}")
        return cls(job_id, role, status, model, consumer, provider, created, started, first_token, ended,
                   tokens_in, tokens_out, cost, hold_id, release, reason, tried, text_chars, text_cut)


@dataclass(frozen=True, slots=True)
class KeptVoucher:
    """The newest voucher a provider has made durable for a job it serves,
    with the hold it pays from (so the CLAIM can be made after a restart
    even if our ledger lost the hold with the crash) and the job's model
    (so its record can be rebuilt if that was lost too). Stored by the job
    store beside the job's record until the hold is claimed."""

    job_id: bytes
    model: str
    hold: Entry
    voucher: Signed

    @property
    def hold_id(self) -> bytes:
        return self.hold.id

    @property
    def amount(self) -> int:
        return self.voucher.fields[1]

    @property
    def expiry_ms(self) -> int:
        body: Hold = self.hold.body  # type: ignore[assignment]
        return body.expiry_ms

    def to_wire(self) -> bytes:
        return pack([WIRE_VERSION, self.job_id, self.model, self.hold.wire, self.voucher.wire])

    @classmethod
    def from_wire(cls, data: bytes, network_id: bytes) -> KeptVoucher:
        """A stored kept voucher, signatures checked; ``MalformedInput`` (or
        another ``decode_signed`` error) for anything that is not one."""
        value = check_list(unpack(data, max_size=3 * MAX_ENTRY_SIZE, what="kept voucher"), "kept voucher", length=5)
        version, job_id, model, hold_wire, voucher_wire = value
        if version != WIRE_VERSION:
            raise MalformedInput(f"kept voucher: unknown version {version!r}")
        check_bytes(job_id, "job id", size=JOB_ID_SIZE)
        check_str(model, "model", MAX_MODEL_NAME_CHARS)
        hold = decode_entry(check_bytes(hold_wire, "hold", max_size=MAX_ENTRY_SIZE), network_id)
        voucher = decode_signed(check_bytes(voucher_wire, "voucher", max_size=MAX_ENTRY_SIZE),
                                network_id=network_id, tags=(Tag.VOUCHER,))
        fields = check_list(list(voucher.fields), "voucher fields", length=2)
        check_int(fields[1], "voucher amount", 1, MAX_AMOUNT)
        if hold.kind != HOLD or hold.body.job_id != job_id:  # type: ignore[union-attr]
            raise MalformedInput("kept voucher: the entry is not this job's hold")
        if fields[0] != hold.id or voucher.signer != hold.author:
            raise MalformedInput("kept voucher: the voucher is not the hold's consumer's for this hold")
        return cls(job_id, model, hold, voucher)


def _check_release(release: Any) -> ReleaseState:
    if not isinstance(release, str) or release not in RELEASES:
        raise MalformedInput(f"job record: unknown release state {release!r}")
    return ReleaseState(release)


# ------------------------------------------------------------ transitions


def advance(record: JobRecord, status: str, now_ms: int, **changes: Any) -> JobRecord:
    """``record`` moved to ``status`` at ``now_ms`` with ``changes`` applied.

    Raises ``JobStateConflict`` for a move the table does not allow (above
    all, out of a final status). Stamps ``started_ms`` on the first move to
    running and ``ended_ms`` on the move to a final status; cuts the reason
    and keeps only the newest ``MAX_ATTEMPTS`` attempts.
    """
    if status not in TRANSITIONS.get(record.status, ()):
        raise JobStateConflict(f"job {record.id_hex} is {record.status}; it cannot become {status}")
    if status == RUNNING and record.started_ms is None and "started_ms" not in changes:
        changes["started_ms"] = now_ms
    if status in FINAL:
        changes["ended_ms"] = now_ms
    if "reason" in changes:
        changes["reason"] = changes["reason"][:MAX_REASON_CHARS]
    if "attempts" in changes:
        changes["attempts"] = tuple(changes["attempts"])[-MAX_ATTEMPTS:]
    return replace(record, status=status, **changes)


def served_outcome(*, accepted: bool, outcome: str, cancelled: bool, finished: bool,
                   rejected: bool = False) -> tuple[str, str]:
    """How a job we served ended, as (status, reason), from what the
    provider's side knows at the end: whether it accepted the job or
    ``rejected`` it, why it ended early if it did (``outcome``, text for
    people: "rejected: ..." or "backend failed: ..."), whether either side
    cancelled, and whether the backend's final counts came (``finished``;
    without them the consumer went away)."""
    if not accepted:
        if rejected:
            return REJECTED, outcome
        return CANCELLED, outcome or "the consumer left before the job started"
    if cancelled:
        return CANCELLED, "cancelled"
    if outcome:
        return FAILED, outcome
    if not finished:
        return FAILED, "connection lost"
    return COMPLETED, ""


def served_record(old: JobRecord | None, *, job_id: bytes, model: str, consumer: bytes, provider: bytes,
                  hold_id: bytes, now_ms: int, tokens_out: int, cost: int, tokens_in: int | None,
                  ended: tuple[str, str] | None) -> JobRecord:
    """The record of a job we serve, as the provider's side learns of it:
    when it is accepted and as it runs (``ended`` None), and when it ends
    (``ended`` = ``served_outcome(...)``). A record that is not a running
    provider record of this job (none yet, or one left from an earlier
    life of the id) starts afresh, so a job id a consumer reuses cannot
    inherit another job's history."""
    running = old is not None and old.role == PROVIDER and old.status == RUNNING
    base = old if running else JobRecord(
        job_id, PROVIDER, RUNNING, model, consumer, provider, now_ms, started_ms=now_ms, hold_id=hold_id)
    assert base is not None
    facts = {"tokens_out": tokens_out, "cost": cost, "tokens_in": tokens_in}
    if ended is None:
        return replace(base, **facts)
    status, reason = ended
    return advance(base, status, now_ms, reason=reason, **facts)


def settle_attempt(record: JobRecord, hold_id: bytes, payout: int) -> JobRecord:
    """A consumer's ``record`` once the hold ``hold_id`` of one of its
    attempts is released and the ledger says the provider was paid
    ``payout`` from it: the attempt costs exactly that (not the last voucher
    we signed, which a provider that crashed may never have kept), and the
    job's cost moves by the difference. Idempotent; an attempt whose
    voucher amount is unknown (an old record) keeps the job's cost as it is.
    """
    attempts, delta = [], 0
    for attempt in record.attempts:
        if attempt.hold_id == hold_id:
            if attempt.paid is not None:
                delta += payout - attempt.paid
            attempt = replace(attempt, release=ReleaseState.RELEASED, paid=payout)
        attempts.append(attempt)
    changes: dict[str, Any] = {"attempts": tuple(attempts), "cost": max(0, record.cost + delta)}
    if record.hold_id == hold_id:
        changes["release"] = ReleaseState.RELEASED
    return replace(record, **changes)


def start_attempt(record: JobRecord, provider: bytes, now_ms: int) -> JobRecord:
    """A consumer's ``record`` as a new attempt on ``provider`` begins: running there."""
    return advance(record, RUNNING, now_ms, provider=provider, attempts=(*record.attempts, Attempt(provider, now_ms)))


def end_attempt(record: JobRecord, note: str, *, hold_id: bytes | None = None, release: Any = "",
                paid: int | None = None, cost: int | None = None, tokens_out: int | None = None,
                tokens_in: int | None = None) -> JobRecord:
    """A consumer's ``record`` as its last attempt ends with ``note``
    ("completed", "busy", or why it failed). An attempt that got as far as
    a hold (``hold_id``) also says what became of it and what it costs us
    (``paid``: its last voucher), and the job takes its totals so far
    (``cost``, ``tokens_out``; ``tokens_in`` when a receipt said). The
    status is left as it is: what comes next is the caller's to say."""
    if not record.attempts:
        return record
    last = replace(record.attempts[-1], outcome=note[:MAX_REASON_CHARS], hold_id=hold_id,
                   release=_check_release(str(release)), paid=paid)
    changes: dict[str, Any] = {"attempts": (*record.attempts[:-1], last)}
    if hold_id is not None:
        changes.update(hold_id=hold_id, release=last.release)
    if cost is not None:
        changes["cost"] = cost
    if tokens_out is not None:
        changes["tokens_out"] = tokens_out
    if tokens_in is not None:
        changes["tokens_in"] = tokens_in
    return replace(record, **changes)


def served_pay(record: JobRecord | None, kept: KeptVoucher, provider: bytes, now_ms: int, *,
               claimed: int = 0, lost: str = "") -> JobRecord:
    """A job we (``provider``) served that a stop or crash cut short, once
    the voucher we had ``kept`` for it is settled
    (``p2pgpu.core.settlement.plan_claim``): it cost the consumer what we
    ``claimed``; or the pay was ``lost`` (why: the hold expired first). A
    record still running is failed (its session died with the process); a
    final one keeps its status; a lost one is rebuilt from the voucher."""
    if record is None:
        hold_ms = kept.hold.timestamp_ms
        record = JobRecord(kept.job_id, PROVIDER, RUNNING, kept.model, kept.hold.author, provider, hold_ms,
                           started_ms=hold_ms, hold_id=kept.hold_id)
    if not record.final:
        record = advance(record, FAILED, now_ms, reason=INTERRUPTED)
    if not lost:
        return replace(record, cost=claimed)
    note = f"pay lost: {lost}"
    if note in record.reason:
        return replace(record, cost=0)
    reason = f"{record.reason}; {note}" if record.reason else note
    return replace(record, cost=0, reason=reason[:MAX_REASON_CHARS])


def check_cancellable(record: JobRecord) -> None:
    """``JobStateConflict`` unless the job can still be cancelled."""
    if record.final:
        raise JobStateConflict(f"job {record.id_hex} already ended ({record.status}); there is nothing to cancel")


def cut_text(text: str) -> tuple[str, bool]:
    """The answer as stored: at most ``MAX_TEXT_CHARS``, and whether it was cut."""
    return (text, False) if len(text) <= MAX_TEXT_CHARS else (text[:MAX_TEXT_CHARS], True)


def encode_text(text: str) -> bytes:
    return pack(cut_text(text)[0])


def decode_text(data: bytes) -> str:
    """Stored answer text; ``MalformedInput`` if the value is not one."""
    return check_str(unpack(data, max_size=MAX_TEXT_BYTES, what="job text"), "job text", MAX_TEXT_CHARS)


# ------------------------------------------------------------- showing it


def _peer(public_key: bytes | None) -> str | None:
    return None if public_key is None else peer_id_from_public_key(public_key)


def job_info(record: JobRecord, now_ms: int) -> dict[str, Any]:
    """The record as the local API shows it (``p2pgpu.api.JobInfo``)."""
    return {
        "id": record.id_hex,
        "role": record.role,
        "status": record.status,
        "model": record.model,
        "consumer": _peer(record.consumer),
        "provider": _peer(record.provider),
        "peer": _peer(record.peer),
        "created_ms": record.created_ms,
        "started_ms": record.started_ms,
        "first_token_ms": record.first_token_ms,
        "ended_ms": record.ended_ms,
        "age_s": round(max(0, now_ms - record.created_ms) / 1000, 1),
        "tokens_in": record.tokens_in,
        "tokens_out": record.tokens_out,
        "cost": record.cost,
        "hold_id": None if record.hold_id is None else record.hold_id.hex(),
        "release": str(record.release) or None,  # the enum's plain string, as the API has always said
        "reason": record.reason,
        "attempts": [
            {"provider": _peer(a.provider), "started_ms": a.started_ms, "outcome": a.outcome,
             "hold_id": None if a.hold_id is None else a.hold_id.hex(), "release": str(a.release) or None,
             "paid": a.paid}
            for a in record.attempts
        ],
    }


# ------------------------------------------------------------ finding one


def parse_job_ref(text: Any) -> str:
    """A job id or a prefix of one, as lower-case hex: ``MIN_PREFIX`` to 32
    hex digits, else ``MalformedInput``."""
    if not isinstance(text, str):
        raise MalformedInput(f"a job id must be a string of hex digits, got {type(text).__name__}")
    ref = text.strip().lower()
    if not _HEX.fullmatch(ref) or not MIN_PREFIX <= len(ref) <= 2 * JOB_ID_SIZE:
        raise MalformedInput(
            f"{text[:80]!r} is not a job id: expected {MIN_PREFIX} to {2 * JOB_ID_SIZE} hex digits "
            "(an id or the start of one)"
        )
    return ref


def match_job(ids: Iterable[bytes], ref: str) -> bytes:
    """The one id among ``ids`` that starts with ``ref`` (from
    ``parse_job_ref``); ``UnknownJob`` if none does, ``AmbiguousJobId`` if
    several do."""
    found = [job_id for job_id in ids if job_id.hex().startswith(ref)]
    if not found:
        raise UnknownJob(f"this node has no job {ref}" + ("" if len(ref) == 2 * JOB_ID_SIZE else "..."))
    if len(found) > 1:
        raise AmbiguousJobId(f"{ref} is the start of {len(found)} job ids; give more of the id")
    return found[0]

"""The pure pieces of the job store, the waitlist and hold settlement
(``p2pgpu.core.jobrecords``, ``p2pgpu.core.waitlist``,
``p2pgpu.core.settlement``): no I/O, time passed in."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pgpu.core.codec import pack
from p2pgpu.core.jobrecords import (
    CANCELLED,
    COMPLETED,
    CONSUMER,
    FAILED,
    FINAL,
    INTERRUPTED,
    MAX_ATTEMPTS,
    MAX_TEXT_CHARS,
    PROVIDER,
    QUEUED,
    REJECTED,
    RUNNING,
    STATUSES,
    TRANSITIONS,
    Attempt,
    JobRecord,
    KeptVoucher,
    advance,
    check_cancellable,
    cut_text,
    decode_text,
    encode_text,
    job_info,
    match_job,
    parse_job_ref,
    served_outcome,
    served_pay,
    served_record,
    settle_attempt,
)
from p2pgpu.core.kv import MemoryStore
from p2pgpu.core.ledger import BASIS_CLAIM, BASIS_PROVIDER_ENTRY, BASIS_TIMEOUT, Ledger, make_voucher
from p2pgpu.core.settlement import (
    Claimed, ClaimNow, OpenHold, PayLost, ReleaseNow, WaitUntil, plan_claim, plan_release,
)
from p2pgpu.core.waitlist import assign, free_slots
from p2pgpu.errors import AmbiguousJobId, JobStateConflict, MalformedInput, UnknownJob
from p2pgpu.testing.ledger import START_MS, key_for, make_genesis

ALICE, BOB, CAROL = (key_for(n).public_key for n in ("alice", "bob", "carol"))
T0 = 1_700_000_000_000


def queued(job_id: bytes = b"\x01" * 16) -> JobRecord:
    return JobRecord(job_id, CONSUMER, QUEUED, "llama3.2:1b", ALICE, None, T0)


def finished() -> JobRecord:
    record = advance(queued(), RUNNING, T0 + 10, provider=BOB, attempts=[Attempt(BOB, T0 + 10)])
    record = advance(record, COMPLETED, T0 + 900, tokens_in=12, tokens_out=40, cost=123, hold_id=b"h" * 32,
                     release="released", attempts=[Attempt(BOB, T0 + 10, "completed", b"h" * 32, "released")],
                     text_chars=5)
    return replace(record, first_token_ms=T0 + 50)


# ------------------------------------------------------------ records


def test_the_life_of_a_consumer_job_stamps_its_times():
    record = queued()
    assert record.started_ms is None and not record.final and record.peer is None
    running = advance(record, RUNNING, T0 + 10, provider=BOB)
    assert running.started_ms == T0 + 10 and running.ended_ms is None and running.peer == BOB
    again = advance(advance(running, QUEUED, T0 + 20), RUNNING, T0 + 30, provider=CAROL)
    assert again.started_ms == T0 + 10  # the first start counts
    done = advance(again, COMPLETED, T0 + 99, reason="x" * 1000)
    assert done.final and done.ended_ms == T0 + 99 and len(done.reason) == 256


def test_a_provider_record_names_the_consumer_as_peer():
    record = JobRecord(b"\x02" * 16, PROVIDER, RUNNING, "m", ALICE, BOB, T0, started_ms=T0)
    assert record.peer == ALICE


@pytest.mark.parametrize("status", sorted(FINAL))
def test_nothing_leaves_a_final_status(status):
    record = advance(advance(queued(), RUNNING, T0), status, T0 + 1)
    for target in STATUSES:
        with pytest.raises(JobStateConflict, match="cannot become"):
            advance(record, target, T0 + 2)
    with pytest.raises(JobStateConflict, match="already ended"):
        check_cancellable(record)


def test_the_table_covers_every_status_and_queued_cannot_be_rejected():
    assert set(TRANSITIONS) == STATUSES
    with pytest.raises(JobStateConflict):
        advance(queued(), REJECTED, T0)
    with pytest.raises(JobStateConflict):
        advance(queued(), COMPLETED, T0)
    check_cancellable(queued())


def test_only_the_newest_attempts_are_kept():
    attempts = [Attempt(BOB, T0 + i, "busy") for i in range(MAX_ATTEMPTS + 5)]
    record = advance(queued(), QUEUED, T0, attempts=attempts)
    assert len(record.attempts) == MAX_ATTEMPTS and record.attempts[-1].started_ms == T0 + MAX_ATTEMPTS + 4


def test_records_survive_the_wire():
    for record in (queued(), finished(), JobRecord(b"\x03" * 16, PROVIDER, REJECTED, "m", ALICE, BOB, T0,
                                                     ended_ms=T0, reason="rejected: no free slot")):
        assert JobRecord.from_wire(record.to_wire()) == record


def _wire(record: JobRecord, index: int, value) -> bytes:
    from p2pgpu.core.codec import unpack

    fields = unpack(record.to_wire(), max_size=1 << 20)
    fields[index] = value
    return pack(fields)


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, 2),  # version
        (1, b"short"),  # job id
        (2, "auditor"),  # role
        (3, "paused"),  # status
        (4, 5),  # model
        (5, b"k"),  # consumer
        (6, "bob"),  # provider
        (7, -1),  # created
        (10, None),  # a completed job without an end time
        (12, -5),  # tokens out
        (13, 1.5),  # cost
        (14, b"h"),  # hold id
        (15, "lost"),  # release
        (17, [[BOB]]),  # an attempt of the wrong shape
        (18, [MAX_TEXT_CHARS + 1, False]),
        (18, [5, "yes"]),
    ],
)
def test_malformed_records_are_refused(index, value):
    with pytest.raises(MalformedInput):
        JobRecord.from_wire(_wire(finished(), index, value))


@pytest.mark.parametrize("data", [b"", b"\xc1", pack([1, 2]), pack("text"), b"\x92\x01"])
def test_garbage_is_not_a_record(data):
    with pytest.raises(MalformedInput):
        JobRecord.from_wire(data)


def test_text_is_cut_and_stored_whole_otherwise():
    assert cut_text("hello") == ("hello", False)
    long = "é" * (MAX_TEXT_CHARS + 3)
    stored, cut = cut_text(long)
    assert cut and len(stored) == MAX_TEXT_CHARS
    assert decode_text(encode_text(long)) == stored
    with pytest.raises(MalformedInput):
        decode_text(pack(7))


def test_job_info_shows_peer_ids_and_hex():
    info = job_info(finished(), T0 + 2_500)
    assert info["id"] == "01" * 16 and info["role"] == CONSUMER and info["status"] == COMPLETED
    assert info["provider"] == key_for("bob").peer_id == info["peer"]
    assert info["consumer"] == key_for("alice").peer_id
    assert info["age_s"] == 2.5 and info["cost"] == 123 and info["tokens_in"] == 12
    assert info["hold_id"] == "68" * 32 and info["release"] == "released"
    assert info["attempts"] == [{"provider": key_for("bob").peer_id, "started_ms": T0 + 10, "outcome": "completed",
                                 "hold_id": "68" * 32, "release": "released", "paid": None}]
    assert job_info(queued(), T0)["provider"] is None and job_info(queued(), T0)["release"] is None


# ------------------------------------------------------------ finding a job


@pytest.mark.parametrize("text", ["abc", "xyz1", "12 34", "0" * 33, "", "g" * 8])
def test_bad_job_refs(text):
    with pytest.raises(MalformedInput):
        parse_job_ref(text)
    with pytest.raises(MalformedInput):
        parse_job_ref(123)


def test_prefixes_find_exactly_one_job():
    ids = [bytes.fromhex("abcd" + "00" * 14), bytes.fromhex("abce" + "00" * 14), bytes.fromhex("ffff" + "11" * 14)]
    assert match_job(ids, parse_job_ref("ABCD")) == ids[0]
    assert match_job(ids, parse_job_ref(" ffff1 ")) == ids[2]
    with pytest.raises(AmbiguousJobId, match="2 job ids"):
        match_job(ids + [bytes.fromhex("abcd" + "01" * 14)], "abcd")
    assert match_job(ids + [bytes.fromhex("abcd" + "01" * 14)], "abcd01") == bytes.fromhex("abcd" + "01" * 14)
    with pytest.raises(UnknownJob):
        match_job(ids, "0000")


# ------------------------------------------------------------ the waitlist


def test_free_slots_counts_other_consumers_from_the_offer_and_ours_exactly():
    assert free_slots(1, 1, 0) == 1
    assert free_slots(1, 0, 0) == 0  # someone else's job
    assert free_slots(1, 0, 0, ours_at_offer=1) == 1  # ours, and it has ended since
    assert free_slots(1, 0, 1, ours_at_offer=1) == 0
    assert free_slots(4, 1, 1, ours_at_offer=2) == 2  # 1 other, 1 of ours now
    assert free_slots(2, 2, 5) == 0  # never negative


def test_assign_is_first_come_first_served():
    room = {BOB: 1, CAROL: 1}
    waiting = [("j1", [BOB, CAROL]), ("j2", [BOB, CAROL]), ("j3", [BOB, CAROL])]
    assert assign(waiting, room) == [("j1", BOB), ("j2", CAROL)]
    # an older job that wants only a full provider keeps no one else waiting
    assert assign([("old", [ALICE]), ("young", [BOB])], room) == [("young", BOB)]
    assert assign([("j", [ALICE])], {}) == []
    assert room == {BOB: 1, CAROL: 1}  # not changed


def test_assign_stops_reading_once_every_slot_is_taken():
    def waiting():
        yield "j1", [BOB]
        raise AssertionError("read past the last free slot")

    assert assign(waiting(), {BOB: 1, CAROL: 0}) == [("j1", BOB)]
    assert assign(waiting(), {}) == []  # nothing free: not read at all


@given(st.lists(st.lists(st.sampled_from([ALICE, BOB, CAROL]), unique=True), max_size=12),
       st.dictionaries(st.sampled_from([ALICE, BOB, CAROL]), st.integers(0, 3)))
def test_assign_never_overbooks_and_never_skips_an_older_job(wants, room):
    waiting = list(enumerate(wants))
    given_out = assign(waiting, room)
    counts: dict[bytes, int] = {}
    for _, provider in given_out:
        counts[provider] = counts.get(provider, 0) + 1
    assert all(counts[p] <= room.get(p, 0) for p in counts)
    served = {job for job, _ in given_out}
    for job, candidates in waiting:
        if job not in served:
            # it got nothing: everything it wanted was taken (by older jobs) or had no room
            assert all(counts.get(p, 0) >= room.get(p, 0) for p in candidates)


# ------------------------------------------------------------ settlement

HOLD = OpenHold(b"h" * 32, BOB, 500, expiry_ms=T0 + 10_000)
GRACE = 3_000


def plan(hold=HOLD, now=T0, claims=None, released=False, after=None):
    return plan_release(hold, now_ms=now, release_grace_ms=GRACE, claims=claims or {}, released=released,
                        provider_entry_after_expiry=after)


def test_a_released_hold_needs_nothing():
    assert plan(released=True, claims={b"c" * 32: 5}) is None


def test_a_claim_is_the_basis_as_soon_as_it_is_seen():
    assert plan(claims={b"d" * 32: 5, b"c" * 32: 9}) == ReleaseNow(BASIS_CLAIM, b"c" * 32)


def test_without_a_claim_wait_for_expiry_then_a_provider_entry_or_the_grace():
    assert plan() == WaitUntil(T0 + 10_001)
    assert plan(now=T0 + 10_000) == WaitUntil(T0 + 10_001)  # a claim stamped at expiry is still valid
    assert plan(now=T0 + 10_001) == WaitUntil(T0 + 10_000 + GRACE + 1)
    assert plan(now=T0 + 10_001, after=b"e" * 32) == ReleaseNow(BASIS_PROVIDER_ENTRY, b"e" * 32)
    assert plan(now=T0 + 10_000 + GRACE) == WaitUntil(T0 + 10_000 + GRACE + 1)
    assert plan(now=T0 + 10_000 + GRACE + 1) == ReleaseNow(BASIS_TIMEOUT, b"")


def test_a_hold_its_job_still_settles_is_left_alone_until_then():
    busy = replace(HOLD, not_before_ms=T0 + 5_000)
    assert plan(busy, now=T0, claims={b"c" * 32: 5}) == WaitUntil(T0 + 5_000)
    assert plan(busy, now=T0 + 5_000, claims={b"c" * 32: 5}) == ReleaseNow(BASIS_CLAIM, b"c" * 32)


def test_how_a_served_job_ended_is_read_from_what_the_provider_knows():
    assert served_outcome(accepted=False, rejected=True, outcome="rejected: no free slot", cancelled=False,
                          finished=False) == (
        REJECTED, "rejected: no free slot")
    assert served_outcome(accepted=False, outcome="", cancelled=False, finished=False) == (
        CANCELLED, "the consumer left before the job started")
    # the flag decides, not the text: a reason that merely reads "rejected" is not a rejection
    assert served_outcome(accepted=False, outcome="rejected: spoofed", cancelled=False, finished=False)[0] == CANCELLED
    assert served_outcome(accepted=True, outcome="", cancelled=True, finished=True) == (CANCELLED, "cancelled")
    assert served_outcome(accepted=True, outcome="backend failed: boom", cancelled=False, finished=False) == (
        FAILED, "backend failed: boom")
    assert served_outcome(accepted=True, outcome="", cancelled=False, finished=False) == (FAILED, "connection lost")
    assert served_outcome(accepted=True, outcome="", cancelled=False, finished=True) == (COMPLETED, "")


# ------------------------------------------------------------ a provider's crash: kept vouchers and who paid what


def test_plan_claim_claims_a_kept_voucher_until_the_hold_expires():
    def claim(now=T0, claims=None, known=True):
        return plan_claim(amount=70, expiry_ms=T0 + 10_000, now_ms=now, claims=claims or {}, hold_known=known)

    assert claim() == ClaimNow(70)
    assert claim(now=T0 + 10_000) == ClaimNow(70)  # a CLAIM stamped at expiry is still valid
    assert claim(claims={b"c" * 32: 70}) == Claimed(70)  # claimed before the crash, or by an earlier start
    assert claim(now=T0 + 99_999, claims={b"c" * 32: 40}) == Claimed(40)
    assert claim(known=False) == WaitUntil(T0 + 10_001)  # our ledger lost the hold: wait for sync
    lost = claim(now=T0 + 10_001)
    assert isinstance(lost, PayLost) and "expired" in lost.reason and "70" in lost.reason
    assert isinstance(claim(now=T0 + 10_001, known=False), PayLost)


def attempt_record(*attempts: Attempt, cost: int) -> JobRecord:
    record = advance(queued(), RUNNING, T0 + 10, provider=BOB, attempts=attempts)
    return replace(record, cost=cost, hold_id=attempts[-1].hold_id, release=attempts[-1].release)


def test_a_released_hold_makes_its_attempt_cost_what_the_provider_was_paid():
    crashed = Attempt(BOB, T0, "connection lost", b"h" * 32, "pending", paid=90)
    done = Attempt(CAROL, T0 + 5, "completed", b"i" * 32, "pending", paid=200)
    record = attempt_record(crashed, done, cost=290)
    # the crashed provider had kept only the voucher for 60 of the 90 we signed
    settled = settle_attempt(record, b"h" * 32, 60)
    assert settled.cost == 260 and settled.attempts[0].paid == 60 and settled.attempts[0].release == "released"
    assert settled.release == "pending" and settled.attempts[1] == done  # the last attempt's hold is not this one
    assert settle_attempt(settled, b"h" * 32, 60) == settled  # idempotent
    settled = settle_attempt(settled, b"i" * 32, 200)
    assert settled.cost == 260 and settled.release == "released"
    # a hold released without any claim (timeout, waiver): that attempt cost nothing
    assert settle_attempt(record, b"h" * 32, 0).cost == 200
    # an attempt recorded before ``paid`` existed: the cost stays as it was
    old = attempt_record(replace(crashed, paid=None), cost=90)
    assert settle_attempt(old, b"h" * 32, 60).cost == 90
    assert settle_attempt(record, b"z" * 32, 5) == replace(record, attempts=record.attempts)


def test_attempts_keep_paid_on_the_wire_and_old_attempts_still_read():
    record = attempt_record(Attempt(BOB, T0, "completed", b"h" * 32, "released", paid=42), cost=42)
    assert JobRecord.from_wire(record.to_wire()) == record
    old = _wire(record, 17, [[BOB, T0, "completed", b"h" * 32, "released"]])
    assert JobRecord.from_wire(old).attempts[0].paid is None
    with pytest.raises(MalformedInput):
        JobRecord.from_wire(_wire(record, 17, [[BOB, T0, "completed", b"h" * 32, "released", -1]]))


def kept_voucher(amount=70, job_id=b"\x05" * 16, expiry=START_MS + 60_000):
    genesis = make_genesis(allocation=10**9)
    alice = key_for("alice")
    ledger = Ledger(MemoryStore(), genesis)
    hold = ledger.hold(alice, BOB, 1_000, expiry, job_id, START_MS)
    voucher = make_voucher(alice, genesis.network_id, hold.id, amount, START_MS + 5)
    return genesis.network_id, KeptVoucher(job_id, "llama3.2:1b", hold, voucher)


def test_a_kept_voucher_survives_the_wire_and_refuses_anything_else():
    network_id, kept = kept_voucher()
    again = KeptVoucher.from_wire(kept.to_wire(), network_id)
    assert (again.job_id, again.model, again.hold_id, again.amount, again.expiry_ms) == (
        kept.job_id, "llama3.2:1b", kept.hold.id, 70, START_MS + 60_000)
    assert again.voucher.wire == kept.voucher.wire
    _, other = kept_voucher(job_id=b"\x06" * 16)
    for bad in (b"", pack([1, 2]), pack([2, kept.job_id, "m", kept.hold.wire, kept.voucher.wire]),
                pack([1, kept.job_id, "m", kept.hold.wire, other.voucher.wire]),  # the voucher names another hold
                pack([1, b"\x06" * 16, "m", kept.hold.wire, kept.voucher.wire]),  # the hold is another job's
                pack([1, kept.job_id, "m", kept.voucher.wire, kept.voucher.wire])):
        with pytest.raises(MalformedInput):
            KeptVoucher.from_wire(bad, network_id)


def test_a_served_job_cut_short_costs_what_was_claimed_or_says_its_pay_was_lost():
    _, kept = kept_voucher()
    running = JobRecord(kept.job_id, PROVIDER, RUNNING, "llama3.2:1b", key_for("alice").public_key, BOB, T0,
                        started_ms=T0, hold_id=kept.hold_id)
    interrupted = advance(running, FAILED, T0 + 50, reason=INTERRUPTED)  # as the job store loads it
    claimed = served_pay(interrupted, kept, BOB, T0 + 99, claimed=70)
    assert (claimed.status, claimed.cost, claimed.reason, claimed.ended_ms) == (FAILED, 70, INTERRUPTED, T0 + 50)
    assert served_pay(running, kept, BOB, T0 + 99, claimed=70) == replace(claimed, ended_ms=T0 + 99)
    lost = served_pay(interrupted, kept, BOB, T0 + 99, lost="the hold expired")
    assert lost.cost == 0 and lost.reason == f"{INTERRUPTED}; pay lost: the hold expired"
    assert served_pay(lost, kept, BOB, T0 + 200, lost="the hold expired") == lost  # said once
    # its record was lost too (never synced): rebuilt from the kept voucher
    rebuilt = served_pay(None, kept, BOB, T0 + 99, claimed=70)
    assert (rebuilt.job_id, rebuilt.role, rebuilt.status, rebuilt.cost, rebuilt.hold_id, rebuilt.provider) == (
        kept.job_id, PROVIDER, FAILED, 70, kept.hold_id, BOB)
    assert rebuilt.consumer == kept.hold.author and rebuilt.model == "llama3.2:1b"


def test_a_served_job_record_runs_then_ends_and_never_inherits_another_jobs_history():
    job = b"j" * 16
    facts = dict(job_id=job, model="llama3.2:1b", consumer=ALICE, provider=BOB, hold_id=b"h" * 32)
    accepted = served_record(None, **facts, now_ms=T0, tokens_out=0, cost=0, tokens_in=None, ended=None)
    assert (accepted.role, accepted.status, accepted.started_ms, accepted.hold_id) == (PROVIDER, RUNNING, T0, b"h" * 32)
    ended = served_record(accepted, **facts, now_ms=T0 + 5, tokens_out=12, cost=40, tokens_in=7,
                          ended=served_outcome(accepted=True, outcome="", cancelled=False, finished=True))
    assert (ended.status, ended.tokens_out, ended.cost, ended.tokens_in, ended.ended_ms) == (COMPLETED, 12, 40, 7, T0 + 5)
    assert ended.created_ms == T0  # the same record, advanced
    # an ended record (or a consumer's record of the same id) is not continued: a new one starts
    again = served_record(ended, **facts, now_ms=T0 + 9, tokens_out=0, cost=0, tokens_in=None, ended=None)
    assert again.status == RUNNING and again.created_ms == T0 + 9 and again.cost == 0

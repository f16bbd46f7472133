"""The one release rule (``p2pgpu.core.settlement.plan_release``) with the
provider's waiver as one of its bases, and the release state as an enum
that keeps the API's strings. Pure: no I/O, time passed in.

(The claim, provider-entry and timeout bases are in ``test_jobrecords``.)
"""

from __future__ import annotations

import json
from dataclasses import replace

from p2pgpu.core.jobrecords import CONSUMER, FAILED, Attempt, JobRecord, job_info
from p2pgpu.core.ledger import BASIS_CLAIM, BASIS_TIMEOUT, BASIS_WAIVER
from p2pgpu.core.settlement import AwaitClaim, OpenHold, ReleaseNow, ReleaseState, WaitUntil, plan_release

T0 = 1_700_000_000_000
BOB = b"\x02" * 32
ALICE = b"\x01" * 32
GRACE = 3_000
HOLD = OpenHold(b"h" * 32, BOB, 500, expiry_ms=T0 + 10_000)
WAIVER = b"signed waiver"
CLAIM = b"c" * 32


def plan(hold=HOLD, now=T0, claims=None, released=False, after=None):
    return plan_release(hold, now_ms=now, release_grace_ms=GRACE, claims=claims or {}, released=released,
                        provider_entry_after_expiry=after)


def test_a_waiver_releases_the_whole_hold_at_once_once_its_job_has_ended():
    waived = replace(HOLD, waiver=WAIVER)
    assert plan(waived) == ReleaseNow(BASIS_WAIVER, WAIVER)
    # the waiver comes first: a provider that also claimed contradicts itself (the ledger freezes it)
    assert plan(waived, claims={CLAIM: 5}) == ReleaseNow(BASIS_WAIVER, WAIVER)
    # after expiry too: it refunds all, where time alone would wait for the grace
    assert plan(waived, now=T0 + 10_001) == ReleaseNow(BASIS_WAIVER, WAIVER)
    assert plan(waived, released=True) is None


def test_nothing_is_released_while_the_job_still_runs_even_with_a_waiver_or_a_claim():
    running = replace(HOLD, not_before_ms=HOLD.expiry_ms + 1, waiver=WAIVER)
    assert plan(running, claims={CLAIM: 5}) == WaitUntil(HOLD.expiry_ms + 1)
    assert plan(running, now=HOLD.expiry_ms + 1) == ReleaseNow(BASIS_WAIVER, WAIVER)


def test_a_paid_provider_s_claim_is_awaited_and_an_unpaid_one_s_is_not():
    paid = replace(HOLD, paid=120)
    assert plan(paid) == AwaitClaim(T0 + 10_001)
    assert isinstance(plan(paid), WaitUntil)  # a caller woken by its ledger treats both alike
    assert plan(HOLD) == WaitUntil(T0 + 10_001) and not isinstance(plan(HOLD), AwaitClaim)
    assert plan(paid, claims={CLAIM: 120}) == ReleaseNow(BASIS_CLAIM, CLAIM)
    # past expiry no claim can come: the claim hint no longer matters
    assert plan(paid, now=T0 + 10_000 + GRACE + 1) == ReleaseNow(BASIS_TIMEOUT, b"")


def test_the_release_state_is_an_enum_that_keeps_the_api_strings():
    assert [state.value for state in ReleaseState] == ["", "pending", "released"]
    attempt = Attempt(BOB, T0, "completed", b"h" * 32, ReleaseState.PENDING, paid=7)
    record = JobRecord(b"j" * 16, CONSUMER, FAILED, "m", ALICE, BOB, T0, ended_ms=T0 + 1, hold_id=b"h" * 32,
                       release=ReleaseState.RELEASED, attempts=(attempt,))
    again = JobRecord.from_wire(record.to_wire())
    assert again == record and again.release is ReleaseState.RELEASED
    assert again.attempts[0].release is ReleaseState.PENDING
    info = job_info(again, T0)
    assert type(info["release"]) is str and info["release"] == "released"
    assert type(info["attempts"][0]["release"]) is str and info["attempts"][0]["release"] == "pending"
    assert json.loads(json.dumps(info))["release"] == "released"
    assert job_info(replace(again, release=ReleaseState.NONE), T0)["release"] is None

"""The holds owner (``p2pgpu.holds.Holds``) with a real job: the job runner
only reports what it got, the owner releases by the one rule and reports
the release. Two real hosts on 127.0.0.1 (``test_jobrunner.pair``), the
Ollama stand-in; every wait is on a condition with a deadline."""

from __future__ import annotations

import trio

from p2pgpu.core.jobs import job_cost
from p2pgpu.core.ledger import BASIS_CLAIM, BASIS_WAIVER
from p2pgpu.core.settlement import ReleaseState
from p2pgpu.holds import HoldReleased, Holds
from p2pgpu.testing.waiting import wait_until
from test_jobrunner import DEADLINE, PRICES, now_ms, pair


async def _with_holds(p, nursery) -> tuple[Holds, list[HoldReleased]]:
    """alice's holds owner, fed by her replicator and settling in ``nursery``."""
    released: list[HoldReleased] = []
    holds = Holds(p.alice.ledger, p.alice.rep, p.alice.key, now_ms=now_ms, on_released=released.append)
    p.alice.rep.on_applied = holds.track
    nursery.start_soon(holds.run)
    return holds, released


async def test_a_completed_job_s_hold_is_released_against_the_claim_and_the_payout_reported() -> None:
    async with pair() as p, trio.open_nursery() as nursery:
        holds, released = await _with_holds(p, nursery)
        with trio.fail_after(DEADLINE):
            result = await p.job(settle=holds.job_ended)
        assert result.status == "completed", result.reason
        # the claim races the end of the job: released now, or by the owner's task once it comes
        assert result.release in (ReleaseState.RELEASED, ReleaseState.PENDING)
        await wait_until(lambda: [r.hold_id for r in released] == [result.hold_id], DEADLINE)
        (report,) = released
        assert report.job_id == result.job_id
        assert report.payout == result.receipt.cost == job_cost(PRICES, result.receipt.prompt_eval_count, 40)
        ((_, basis, _),) = p.alice.ledger.releases_of(result.hold_id)
        assert basis == BASIS_CLAIM
        assert len(holds) == 0 and p.alice.ledger.account(p.alice.key.public_key).held == 0
        nursery.cancel_scope.cancel()


async def test_a_rejected_job_s_waiver_releases_its_hold_before_the_result_returns() -> None:
    async with pair() as p, trio.open_nursery() as nursery:
        holds, released = await _with_holds(p, nursery)
        with trio.fail_after(DEADLINE):
            result = await p.job(model="no-such-model:7b", settle=holds.job_ended)
        assert result.status == "rejected" and result.release is ReleaseState.RELEASED
        ((_, basis, _),) = p.alice.ledger.releases_of(result.hold_id)
        assert basis == BASIS_WAIVER
        assert released == [HoldReleased(result.job_id, result.hold_id, 0)]
        assert len(holds) == 0 and p.alice.ledger.account(p.alice.key.public_key).held == 0
        nursery.cancel_scope.cancel()


async def test_a_hold_is_left_alone_while_its_job_runs() -> None:
    """Between the HOLD and the job's report the owner does nothing, even
    once a claim shows up (the job may still be paying under it)."""
    async with pair(tokens_per_second=50) as p, trio.open_nursery() as nursery:
        holds, released = await _with_holds(p, nursery)
        reported = trio.Event()
        seen_open: list[bool] = []

        async def slow_report(ended):
            # the job is over but has not reported yet: the owner still holds off
            seen_open.append(ended.hold_id in holds and holds.get(ended.hold_id).not_before_ms > now_ms())
            await wait_until(lambda: p.alice.ledger.claims_of(ended.hold_id), DEADLINE)
            # the claim's apply woke the owner's task; it still leaves the hold alone
            seen_open.append(not p.alice.ledger.releases_of(ended.hold_id))
            reported.set()
            return await holds.job_ended(ended)

        with trio.fail_after(DEADLINE):
            result = await p.job(max_tokens=10, settle=slow_report)
        assert reported.is_set() and seen_open == [True, True]
        assert result.release is ReleaseState.RELEASED  # the claim was there when it reported
        assert [r.hold_id for r in released] == [result.hold_id]
        nursery.cancel_scope.cancel()

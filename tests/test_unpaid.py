"""Bounded trust, decided by the provider (issue 12, item 2): a consumer
that asks for more credit than the provider gives is refused before
anything runs, and one that stops paying gets at most the provider's window
of tokens, once; its identity is refused from then on.

Two real hosts on 127.0.0.1 with their ledgers and replicators, the
provider's ``ProviderService`` in front of the Ollama stand-in, and the
consumer's real ``run_job``; the consumer that never pays is the real
consumer session with its voucher-making method replaced by one that sends
nothing (what an attacker's client would do).
"""

from __future__ import annotations

import trio

from p2pgpu.core.jobs import R_UNPAID, R_WINDOW, ConsumerSession, SessionConfig
from p2pgpu.core.trust import DEFAULT_MAX_CREDIT_WINDOW, Debtors
from p2pgpu.testing.waiting import wait_until
from tests.test_jobrunner import ALLOCATION, DEADLINE, pair



async def test_a_credit_window_larger_than_the_providers_is_refused_before_anything_runs() -> None:
    async with pair() as p:
        with trio.fail_after(DEADLINE):
            result = await p.job(max_tokens=64, credit_window=64)
        assert result.status == "rejected" and result.code == R_WINDOW, result.reason
        assert "credit window of 64 tokens exceeds ours of 32" in result.reason
        assert result.cost == 0 and result.text == "" and result.release == "released"
        assert p.standin.generations == () or p.standin.generations == []
        assert p.alice.balance() == ALLOCATION


async def test_a_consumer_that_never_pays_gets_one_window_once_and_is_refused_after(monkeypatch) -> None:
    async with pair(tokens_per_second=None, config=SessionConfig(pause_grace_ms=300)) as p:
        received: list[str] = []
        with monkeypatch.context() as attack:
            attack.setattr(ConsumerSession, "_voucher", lambda self, amount, now_ms: [])  # never a voucher
            with trio.fail_after(DEADLINE):
                first = await p.job(max_tokens=200, on_tokens=lambda text, count, channel: received.append(text))
        assert first.status != "completed"
        assert 0 < len(received) <= DEFAULT_MAX_CREDIT_WINDOW  # at most the window, unpaid
        # the provider's side ends once it gave up waiting for a final voucher
        await wait_until(lambda: p.service.debtors.owed(p.alice.key.public_key) > 0, DEADLINE)
        owed = p.service.debtors.owed(p.alice.key.public_key)
        assert 0 < owed <= DEFAULT_MAX_CREDIT_WINDOW
        assert p.bob.balance() == ALLOCATION  # nothing to claim: no voucher ever came

        with trio.fail_after(DEADLINE):  # even a well-behaved request of the same identity
            second = await p.job(max_tokens=10)
        assert second.status == "rejected" and second.code == R_UNPAID
        assert f"left {owed} token(s) unpaid" in second.reason
        assert len(p.standin.generations) == 1  # the second never reached the model


async def test_a_consumer_that_pays_is_never_a_debtor() -> None:
    async with pair(tokens_per_second=None) as p:
        for _ in range(3):
            with trio.fail_after(DEADLINE):
                result = await p.job(max_tokens=60)
            assert result.status == "completed", result.reason
        assert len(p.service.debtors) == 0


def test_the_debtor_table_is_bounded_oldest_forgotten_first() -> None:
    debtors = Debtors(limit=3)
    for i in range(5):
        debtors.record(bytes([i]) * 32, 10 + i)
    assert len(debtors) == 3
    assert debtors.owed(bytes([0]) * 32) == 0 and debtors.refusal(bytes([1]) * 32) is None
    assert debtors.owed(bytes([4]) * 32) == 14
    debtors.record(bytes([4]) * 32, 1)
    debtors.record(bytes([9]) * 32, 0)  # nothing owed: nothing remembered
    assert debtors.owed(bytes([4]) * 32) == 15 and len(debtors) == 3
    assert "15 token(s) unpaid" in debtors.refusal(bytes([4]) * 32)

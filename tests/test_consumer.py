"""The consumer edge (``p2pgpu.consumer``) over its seams: a real job store
(LevelDB in tmp_path), real signed offers, and a scripted ``AttemptRunner``
in place of the network, so the paths a real network rarely takes on cue
(a provider that says busy, one that cannot be reached, a wait that times
out, a cancel in line) run in order and at once, on trio's autojump clock.
The same paths over real libp2p hosts are in ``test_jobs_node.py`` and
``test_submit.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from p2pgpu.api import SubmitRequest
from p2pgpu.consumer import Consumer
from p2pgpu.core.continuation import Work
from p2pgpu.core.jobrecords import CANCELLED, COMPLETED, FAILED, QUEUED
from p2pgpu.core.jobs import R_BUSY
from p2pgpu.core.offers import Offer
from p2pgpu.core.submission import SubmissionConfig
from p2pgpu.errors import ExecutionFailed
from p2pgpu.jobrunner import JobEnd, JobResult
from p2pgpu.jobstore import JobStore
from p2pgpu.testing.ledger import key_for
from test_submission import MODEL, T0, offer

alice, bob, carol = (key_for(n) for n in ("alice", "bob", "carol"))


class Offers:
    """An ``OfferView`` over a list the test changes."""

    def __init__(self, offers: list[Offer]) -> None:
        self.offers = {o.provider: o for o in offers}

    def live(self, now_ms: int, model: str | None = None) -> list[Offer]:
        return [o for o in self.offers.values() if o.is_live(now_ms)]

    def get(self, provider: bytes) -> Offer | None:
        return self.offers.get(provider)


def result(status: str, *, tokens: int = 0, code: int | None = None, reason: str = "") -> JobResult:
    return JobResult(status=JobEnd(status), reason=reason, text="w" * tokens, tokens=tokens, cost=tokens, receipt=None,
                     provider="", job_id=b"", hold_id=bytes(32), hold_amount=100, release="pending",
                     retryable=True, ttft_s=0.01 if tokens else None, tokens_per_s=None, code=code)


class ScriptedAttempts:
    """An ``AttemptRunner`` that plays one scripted step per attempt: a
    ``JobResult`` (its tokens streamed first), an exception to raise, or
    ``"hang"`` to run until cancelled."""

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.calls: list[tuple[bytes, Work]] = []
        self.started = trio.Event()

    async def run(self, offer: Offer, work: Work, *, model: str, job_id: bytes, on_tokens, cancel: trio.Event):
        self.calls.append((offer.provider, work))
        self.started.set()
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        if step == "hang":
            on_tokens("w", 1)
            await cancel.wait()
            return result("failed", tokens=1, reason="cancelled")
        for _ in range(step.tokens):
            on_tokens("w", 1)
            await trio.sleep(0.01)
        return step


@pytest.fixture
def store(tmp_path):
    with JobStore(tmp_path / "jobs") as store:
        yield store


def consumer(nursery, store, offers: Offers, attempts: ScriptedAttempts, **config) -> Consumer:
    return Consumer(me=alice.public_key, offers=offers, records=store, save=store.put, attempts=attempts,
                    spendable=lambda: 10**12, nursery=nursery, now_ms=lambda: T0 + int(trio.current_time() * 1000),
                    config=SubmissionConfig(**config))


async def collect(c: Consumer, **request) -> list[dict]:
    return [e async for e in c.submit(SubmitRequest(model=MODEL, prompt="hi", max_tokens=4, **request))]


def kinds(events: list[dict]) -> list[str]:
    return [e["type"] for e in events if e["type"] != "token"]


async def test_a_busy_provider_is_waited_for_until_its_next_offer(autojump_clock, store):
    offers = Offers([offer(bob, now=T0)])
    attempts = ScriptedAttempts([result("rejected", code=R_BUSY, reason="rejected (busy): no free slot"),
                                 result("completed", tokens=4)])
    async with trio.open_nursery() as nursery:
        c = consumer(nursery, store, offers, attempts)

        async def next_offer() -> None:  # the provider's early beat, once its slot is free
            await trio.sleep(3)
            offers.offers[bob.public_key] = offer(bob, now=T0, seq=2)
            c.offer_arrived(bob.public_key)

        nursery.start_soon(next_offer)
        events = await collect(c)
    assert kinds(events) == ["provider", "queued", "provider", "done"]
    assert [e["attempt"] for e in events if e["type"] == "provider"] == [1, 1]  # busy was not an attempt
    done = events[-1]
    record = store.get(bytes.fromhex(done["job_id"]))
    assert record.status == COMPLETED and [a.outcome for a in record.attempts] == ["busy", "completed"]
    assert record.tokens_out == 4 and store.text(record.job_id) == "wwww"
    assert not c.waitlist and c.waitlist.inflight(bob.public_key) == 0  # every slot given back


async def test_an_unreachable_provider_is_failed_over_and_blamed(autojump_clock, store):
    offers = Offers([offer(bob, now=T0), offer(carol, now=T0)])
    attempts = ScriptedAttempts([ExecutionFailed("unreachable at its offered addresses"),
                                 result("completed", tokens=4)])
    async with trio.open_nursery() as nursery:
        c = consumer(nursery, store, offers, attempts)
        events = await collect(c)
    assert kinds(events) == ["provider", "retry", "provider", "done"]
    retry = events[1]
    assert retry["continues"] is False and retry["tokens_delivered"] == 0
    first, second = (p for p, _ in attempts.calls)
    assert first != second and c.history.get(first).failed == 1 and c.history.get(second).completed == 1
    assert events[-1]["attempts"] == 2


async def test_a_job_cancelled_in_line_costs_nothing_and_frees_its_place(autojump_clock, store):
    offers = Offers([offer(bob, now=T0)])
    attempts = ScriptedAttempts(["hang"])
    async with trio.open_nursery() as nursery:
        c = consumer(nursery, store, offers, attempts)
        first: list[dict] = []
        second: list[dict] = []

        async def fill(into: list[dict]) -> None:
            async for event in c.submit(SubmitRequest(model=MODEL, prompt="hi", max_tokens=4)):
                into.append(event)

        nursery.start_soon(fill, first)
        await attempts.started.wait()
        nursery.start_soon(fill, second)
        await trio.sleep(1)
        assert kinds(second) == ["queued"] and second[0]["position"] == 1
        waiting = bytes.fromhex(second[0]["job_id"])
        assert store.get(waiting).status == QUEUED and c.progress(waiting) == 0
        assert c.cancel(waiting)
        await trio.sleep(1)
        assert second[-1]["kind"] == "Cancelled" and store.get(waiting).status == CANCELLED
        assert store.get(waiting).attempts == () and not c.waitlist and not c.cancel(waiting)
        running = bytes.fromhex(first[0]["job_id"])
        assert c.progress(running) == 1 and c.text(running) == "w"
        c.cancel(running)
    assert first[-1]["kind"] == "Cancelled" and store.get(running).status == CANCELLED
    assert c.waitlist.inflight(bob.public_key) == 0


async def test_a_job_with_no_free_slot_in_time_says_so(autojump_clock, store):
    offers = Offers([offer(bob, now=T0, slots_free=0)])  # someone else's job holds the one slot
    async with trio.open_nursery() as nursery:
        c = consumer(nursery, store, offers, ScriptedAttempts([]), queue_timeout_ms=2_000)
        events = await collect(c)
    assert kinds(events) == ["queued", "error"]
    assert events[-1]["kind"] == "QueueTimeout" and "free slot within 2 s" in events[-1]["error"]
    record = store.get(bytes.fromhex(events[0]["job_id"]))
    assert record.status == FAILED and record.attempts == () and "free slot within 2 s" in record.reason

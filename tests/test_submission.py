"""One submission's life as a pure machine (``p2pgpu.core.submission``).

Every entry of ``TRANSITIONS`` is driven at least once; each rule (busy
back-off, queue deadline, failover and continuation, every token counts,
the max_price budget, cancel) has a test of its own; Hypothesis drives
random sequences of inputs and checks what must hold whatever happens. The
waitlist's bookkeeping (``Waitlist``) is tested at the end. No I/O: time is
a number (``T0`` is "now" unless a test moves it).
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.core.continuation import ASSISTANT, Work
from p2pgpu.core.hardware import HardwareReport
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.jobparams import JobParams, MessageExtra
from p2pgpu.core.jobrecords import CANCELLED, COMPLETED, FAILED, REJECTED
from p2pgpu.core.jobs import MAX_BODY
from p2pgpu.core.offers import ModelOffer, Offer, decode_offer_message, make_offer
from p2pgpu.core.ranking import ProviderHistory
from p2pgpu.core.submission import (
    TRANSITIONS, AttemptOutcome, AttemptReport, Emit, EndAttempt, Finish, GiveBackSlot, Input, JoinLine, LeaveLine,
    MarkBusy, Outcome, RecordFailure, RecordQueued, RecordSuccess, RunAttempt, State, StopAttempt, Submission,
    SubmissionConfig, admit, work_of,
)
from p2pgpu.core.waitlist import Waitlist
from p2pgpu.errors import ExecutionFailed, InsufficientFunds, JobStateConflict, MalformedInput
from p2pgpu.testing.ledger import START_MS, key_for, make_genesis

NET = make_genesis().network_id
T0 = START_MS
MODEL = "llama3.2:1b"
JOB_ID = bytes(range(16))
bob, carol, dave = (key_for(n) for n in ("bob", "carol", "dave"))
NO_GPU = HardwareReport(gpus=(), nvml_available=False, error="none")
CONFIG = SubmissionConfig(queue_timeout_ms=1_000, busy_backoff_ms=50, busy_backoff_max_ms=2_000)


def offer(key: NodeKey, *, now: int = T0, slots_free: int = 1, slots_total: int = 1, seq: int = 1,
          price_in: int = 100_000, price_out: int = 300_000) -> Offer:
    signed = make_offer(key, NET, now, seq=seq, ttl_ms=120_000, hardware=NO_GPU, models=[ModelOffer(MODEL)],
                        price_in=price_in, price_out=price_out, slots_free=slots_free, slots_total=slots_total,
                        addrs=["/ip4/127.0.0.1/tcp/4001"])
    message = decode_offer_message(signed.wire, NET, now)
    assert isinstance(message, Offer)
    return message


OFFERS = [offer(bob), offer(carol), offer(dave)]


def machine(*, max_tokens: int = 20, max_price: int | None = None, retry: bool = True,
            config: SubmissionConfig = CONFIG, seed: int = 7, prompt: str = "why is the sky blue?") -> Submission:
    return Submission(JOB_ID, MODEL, Work(prompt, None, max_tokens, max_price), retry=retry, config=config,
                      rng=random.Random(seed))


def events(actions) -> list[dict[str, Any]]:
    return [a.event for a in actions if isinstance(a, (Emit, Finish))]


def finish(actions) -> Finish:
    (found,) = [a for a in actions if isinstance(a, Finish)]
    return found


def waiting(now: int = T0) -> Submission:
    """A machine in line, no slot yet (the queued event is out)."""
    m = machine()
    assert m.start(now) == [JoinLine()]
    m.in_line(now, position=1, offers=OFFERS)
    return m


def running(provider: NodeKey = bob, now: int = T0, **kwargs) -> Submission:
    m = machine(**kwargs)
    m.start(now)
    m.slot_assigned(now, provider=provider.public_key, price_in=1, price_out=2)
    assert m.state is State.RUNNING
    return m


def backing_off(now: int = T0) -> Submission:
    m = running(now=now)
    m.attempt_ended(now, AttemptReport(AttemptOutcome.BUSY, "rejected (busy): no free slot"), offers=OFFERS)
    assert m.state is State.BACKING_OFF
    return m


def done() -> Submission:
    m = machine()
    m.cancel(T0)
    assert m.done
    return m


# ------------------------------------------------------------------ the table, entry by entry

MAKERS = {State.NEW: machine, State.WAITING: waiting, State.RUNNING: running, State.BACKING_OFF: backing_off,
          State.DONE: done}
FAILED_REPORT = AttemptReport(AttemptOutcome.FAILED, "connection lost", tokens=3, text="abc", cost=10)


def feed(m: Submission, what: Input, now: int = T0) -> list:
    if what is Input.START:
        return m.start(now)
    if what is Input.IN_LINE:
        return m.in_line(now, position=1, offers=OFFERS)
    if what is Input.SLOT:
        return m.slot_assigned(now, provider=carol.public_key, price_in=1, price_out=2)
    if what is Input.ENDED:
        return m.attempt_ended(now, FAILED_REPORT, offers=OFFERS)
    if what is Input.CANCEL:
        return m.cancel(now)
    return m.timer(now + 10_000)


@pytest.mark.parametrize("state,what", [(s, i) for s, row in TRANSITIONS.items() for i in row])
def test_every_transition_in_the_table_goes_where_the_table_says(state: State, what: Input) -> None:
    m = MAKERS[state]()
    feed(m, what)
    assert m.state in TRANSITIONS[state][what]


@pytest.mark.parametrize("state,what", [(s, i) for s in State for i in Input if i not in TRANSITIONS[s]])
def test_an_input_the_state_does_not_take_is_a_driver_bug(state: State, what: Input) -> None:
    m = MAKERS[state]()
    with pytest.raises(JobStateConflict, match=what.value):
        feed(m, what)
    assert m.state is state  # and nothing changed


def test_start_gets_in_line_and_a_wait_announces_itself_once():
    m = machine()
    assert m.next_deadline() is None
    assert m.start(T0) == [JoinLine()]
    actions = m.in_line(T0 + 5, position=3, offers=OFFERS)
    assert actions == [Emit({"type": "queued", "position": 3, "job_id": JOB_ID.hex()})]  # the record starts queued
    assert m.next_deadline() == T0 + 5 + CONFIG.queue_timeout_ms
    assert m.in_line(T0 + 9, position=2, offers=OFFERS) == []  # said once; the deadline stays
    assert m.next_deadline() == T0 + 5 + CONFIG.queue_timeout_ms


def test_a_slot_starts_an_attempt_and_says_which_provider():
    m = machine()
    m.start(T0)
    actions = m.slot_assigned(T0, provider=bob.public_key, price_in=11, price_out=22)
    assert actions == [
        Emit({"type": "provider", "provider": bob.peer_id, "attempt": 1, "job_id": JOB_ID.hex(),
              "price_in": 11, "price_out": 22}),
        RunAttempt(bob.public_key, m.original, 1),
    ]
    assert m.state is State.RUNNING and m.provider == bob.public_key and m.next_deadline() is None
    assert m.timer(T0 + 10**6) == []  # the attempt has timers of its own


def test_the_queue_deadline_ends_a_wait_and_says_how_many_were_ahead():
    m = waiting()
    assert m.timer(T0 + CONFIG.queue_timeout_ms - 1, ahead=2) == []
    actions = m.timer(T0 + CONFIG.queue_timeout_ms, ahead=2)
    assert actions[0] == LeaveLine()
    end = finish(actions)
    assert end.outcome is Outcome.QUEUE_TIMEOUT and end.outcome.status == FAILED
    assert end.event == {"type": "error", "kind": "QueueTimeout", "error": (
        f"no provider serving {MODEL!r} had a free slot within 1 s (2 of this node's jobs were ahead of it)")}
    assert m.done and m.outcome is Outcome.QUEUE_TIMEOUT and m.next_deadline() is None


def test_a_completed_attempt_finishes_the_job_with_its_figures():
    m = running(now=T0)
    report = AttemptReport(AttemptOutcome.COMPLETED, tokens=20, text="x" * 20, cost=500, prompt_tokens=7,
                           billed_tokens=20, ttft_s=0.25, tokens_per_s=40.0, release="released",
                           durations_ns=(9, 1, 2, 6))
    actions = m.attempt_ended(T0 + 1_000, report, offers=OFFERS)
    assert actions[:2] == [RecordSuccess(bob.public_key, 250, 40.0),
                           EndAttempt("completed", cost=500, tokens_out=20, tokens_in=7)]
    end = finish(actions)
    assert end.outcome is Outcome.COMPLETED and end.outcome.status == COMPLETED and end.reason == ""
    assert end.event == {"type": "done", "job_id": JOB_ID.hex(), "provider": bob.peer_id, "tokens": 20,
                         "prompt_tokens": 7, "cost": 500, "attempts": 1, "tokens_per_s": 40.0, "ttft_s": 0.25,
                         "release": "released", "done_reason": "length", "eval_count": 20,
                         "durations_ns": {"total": 9, "load": 1, "prompt_eval": 2, "eval": 6}}


def test_a_completed_attempt_without_timings_is_measured_over_its_run():
    m = running(now=T0)
    actions = m.attempt_ended(T0 + 2_000, AttemptReport(AttemptOutcome.COMPLETED, tokens=10, text="y"), offers=OFFERS)
    assert actions[0] == RecordSuccess(bob.public_key, 2_000, 5.0)


# ------------------------------------------------------------------ busy


def test_busy_is_not_failure_it_backs_off_and_gets_back_in_line():
    m = running(now=T0)
    actions = m.attempt_ended(T0 + 10, AttemptReport(AttemptOutcome.BUSY, "rejected (busy): no free slot"),
                              offers=OFFERS)
    assert actions == [EndAttempt("busy", cost=0, tokens_out=0, tokens_in=None), MarkBusy(bob.public_key),
                       RecordQueued()]
    assert m.state is State.BACKING_OFF and m.attempts == 0 and not m.excluded
    until = m.next_deadline()
    assert until is not None and T0 + 10 + 50 <= until < T0 + 10 + 100  # first answer: 100 ms times [0.5, 1)
    assert m.timer(until - 1) == []
    assert m.timer(until) == [JoinLine()]
    assert m.state is State.WAITING
    # the back-off counted against this wait: its deadline started at the busy answer
    assert m.in_line(until, position=1, offers=OFFERS) == [Emit({"type": "queued", "position": 1,
                                                                  "job_id": JOB_ID.hex()})]
    assert m.next_deadline() == T0 + 10 + CONFIG.queue_timeout_ms
    again = m.slot_assigned(until, provider=bob.public_key, price_in=1, price_out=2)
    assert events(again)[0]["attempt"] == 1  # a busy answer is not an attempt


def test_the_busy_back_off_doubles_up_to_its_cap_with_the_jitter_given():
    config = SubmissionConfig(busy_backoff_ms=50, busy_backoff_max_ms=2_000, busy_doublings=8)
    assert [config.backoff_ms(n, 1.0) for n in range(1, 8)] == [100, 200, 400, 800, 1600, 2000, 2000]
    assert config.backoff_ms(1, 0.5) == 50 and config.backoff_ms(40, 0.5) == 1000


def test_the_jitter_comes_from_the_random_given_so_a_seed_replays():
    def pauses(seed: int) -> list[int]:
        m = running(seed=seed)
        out = []
        for step in range(5):
            now = T0 + 10_000 * step
            m.attempt_ended(now, AttemptReport(AttemptOutcome.BUSY, "busy"), offers=OFFERS)
            out.append(m.next_deadline() - now)
            m.timer(m.next_deadline())
            m.slot_assigned(m.next_deadline() or now, provider=bob.public_key, price_in=1, price_out=2)
        return out

    assert pauses(1) == pauses(1) != pauses(2)


def test_a_busy_answer_after_a_cancel_ends_the_job_cancelled():
    m = running()
    assert m.cancel(T0) == [StopAttempt()]
    actions = m.attempt_ended(T0, AttemptReport(AttemptOutcome.BUSY, "rejected (busy): no free slot"), offers=OFFERS)
    assert actions[0] == EndAttempt("rejected (busy): no free slot", cost=0, tokens_out=0, tokens_in=None)
    assert finish(actions).outcome is Outcome.CANCELLED


# ------------------------------------------------------------------ failover


def test_a_provider_that_fails_mid_answer_is_excluded_and_the_next_continues_it():
    m = running(max_tokens=20)
    report = AttemptReport(AttemptOutcome.FAILED, "connection lost", tokens=5, text="Hello", cost=30,
                           billed_tokens=None)
    actions = m.attempt_ended(T0, report, offers=OFFERS)
    reason = f"{bob.peer_id}: failed: connection lost"
    assert actions == [
        EndAttempt("connection lost", cost=30, tokens_out=5, tokens_in=None),
        RecordFailure(bob.public_key, "connection lost"),
        Emit({"type": "retry", "provider": bob.peer_id, "reason": reason, "tokens_delivered": 5, "continues": True}),
        JoinLine(),
    ]
    assert m.state is State.WAITING and m.excluded == {bob.public_key} and m.next_deadline() is None
    assert m.work.prompt is None and m.work.messages[-1] == (ASSISTANT, "Hello") and m.work.max_tokens == 15
    assert {r.provider for r in m.candidates(OFFERS, ProviderHistory(), T0)} == {carol.public_key, dave.public_key}
    # its slot, should a driver hand it out anyway, goes back
    assert m.slot_assigned(T0, provider=bob.public_key, price_in=1, price_out=2) == [
        GiveBackSlot(bob.public_key), JoinLine()]
    again = m.slot_assigned(T0, provider=carol.public_key, price_in=1, price_out=2)
    assert events(again)[0]["attempt"] == 2 and again[-1] == RunAttempt(carol.public_key, m.work, 2)
    end = finish(m.attempt_ended(T0, AttemptReport(AttemptOutcome.COMPLETED, tokens=15, text="!" * 15, cost=70,
                                                   prompt_tokens=9, billed_tokens=15), offers=OFFERS))
    assert end.event["tokens"] == 20 and end.event["cost"] == 100 and end.event["attempts"] == 2
    assert m.answer == "Hello" + "!" * 15


def test_tokens_billed_after_a_cancel_count_in_the_record():
    m = running()
    m.cancel(T0)
    actions = m.attempt_ended(T0, AttemptReport(AttemptOutcome.FAILED, "cancelled", retryable=False, tokens=4,
                                                text="abcd", cost=9, prompt_tokens=3, billed_tokens=6), offers=OFFERS)
    assert actions[0] == EndAttempt("cancelled", cost=9, tokens_out=6, tokens_in=3)
    end = finish(actions)
    assert end.outcome is Outcome.CANCELLED and end.outcome.status == CANCELLED
    assert end.event == {"type": "error", "error": "the job was cancelled", "kind": "Cancelled"}
    assert not any(isinstance(a, RecordFailure) for a in actions)  # our cancel is not the provider's failure


def test_a_provider_that_dies_after_the_last_token_leaves_a_completed_job():
    m = running(max_tokens=5)
    actions = m.attempt_ended(T0, AttemptReport(AttemptOutcome.FAILED, "connection lost", tokens=5, text="abcde",
                                                cost=40), offers=OFFERS)
    end = finish(actions)
    assert end.outcome is Outcome.COMPLETED
    assert end.reason == f"every token was delivered before {bob.peer_id}: failed: connection lost"
    assert end.event == {"type": "done", "job_id": JOB_ID.hex(), "provider": bob.peer_id, "tokens": 5,
                         "prompt_tokens": 0, "cost": 40, "attempts": 1, "tokens_per_s": None, "ttft_s": None,
                         "release": "pending", "done_reason": "length", "eval_count": 5,
                         "durations_ns": {"total": 0, "load": 0, "prompt_eval": 0, "eval": 0}}


@pytest.mark.parametrize("kwargs,report,outcome,words", [
    ({"retry": False}, FAILED_REPORT, Outcome.FAILED, "did not complete"),
    ({"retry": False}, AttemptReport(AttemptOutcome.REJECTED, "rejected (price): too cheap"), Outcome.REJECTED,
     "rejected"),
    ({"max_price": 10}, FAILED_REPORT, Outcome.FAILED, "--max-price is spent"),
    ({"config": SubmissionConfig(max_attempts=1)}, FAILED_REPORT, Outcome.FAILED, "1 providers were tried"),
    ({}, AttemptReport(AttemptOutcome.FAILED, "x", retryable=False), Outcome.FAILED, "did not complete"),
])
def test_when_failover_is_not_allowed_the_job_fails_with_the_last_reason(kwargs, report, outcome, words):
    m = running(**kwargs)
    actions = m.attempt_ended(T0, report, offers=OFFERS)
    end = finish(actions)
    assert end.outcome is outcome and words in end.reason and bob.peer_id in end.reason
    assert end.event == {"type": "error", "error": end.reason, "kind": "ExecutionFailed"}
    assert outcome.status in (FAILED, REJECTED)
    assert not any(e["type"] == "retry" for e in events(actions)) and m.done


def test_an_answer_too_long_to_continue_fails_the_job():
    m = running(max_tokens=10**6)
    text = "x" * MAX_BODY
    end = finish(m.attempt_ended(T0, AttemptReport(AttemptOutcome.FAILED, "lost", tokens=10, text=text),
                                 offers=OFFERS))
    assert end.outcome is Outcome.FAILED and "too long to be continued" in end.reason


def test_with_no_provider_left_there_is_no_retry():
    m = running()
    actions = m.attempt_ended(T0, FAILED_REPORT, offers=[OFFERS[0]])  # only the one that failed
    assert finish(actions).reason == f"the job did not complete ({bob.peer_id}: failed: connection lost)"
    assert [e["type"] for e in events(actions)] == ["error"]


def test_a_provider_gone_while_the_job_waited_again_ends_it():
    m = running()
    m.attempt_ended(T0, FAILED_REPORT, offers=OFFERS)
    actions = m.in_line(T0, position=1, offers=[OFFERS[0]])  # carol and dave withdrew meanwhile
    assert actions[0] == LeaveLine()
    assert finish(actions).outcome is Outcome.FAILED


def test_an_unreachable_provider_is_blamed_and_costs_nothing():
    m = running()
    actions = m.attempt_ended(T0, AttemptReport(AttemptOutcome.UNREACHABLE, "no route"), offers=OFFERS)
    assert actions[:2] == [RecordFailure(bob.public_key, "no route"), EndAttempt("no route")]
    assert actions[2].event["reason"] == f"{bob.peer_id}: no route" and m.paid == 0
    assert m.state is State.WAITING


def test_no_funds_ends_the_job_without_blaming_anyone():
    m = running()
    actions = m.attempt_ended(T0, AttemptReport(AttemptOutcome.NO_FUNDS, "you can spend 0 coins"), offers=OFFERS)
    assert actions[0] == EndAttempt("not started: you can spend 0 coins")
    end = finish(actions)
    assert end.outcome is Outcome.NO_FUNDS and end.outcome.status == FAILED
    assert end.event == {"type": "error", "error": "you can spend 0 coins", "kind": "InsufficientFunds"}
    assert not m.excluded


# ------------------------------------------------------------------ cancel


def test_cancel_while_waiting_leaves_the_line():
    m = waiting()
    actions = m.cancel(T0)
    assert actions[0] == LeaveLine() and finish(actions).outcome is Outcome.CANCELLED
    assert m.cancel(T0) == [] and m.timer(T0 + 10**6) == []
    assert m.slot_assigned(T0, provider=bob.public_key, price_in=1, price_out=2) == [GiveBackSlot(bob.public_key)]


def test_cancel_while_backing_off_ends_the_job_there():
    m = backing_off()
    actions = m.cancel(T0)
    assert LeaveLine() not in actions and finish(actions).outcome is Outcome.CANCELLED


def test_a_completed_attempt_wins_over_a_cancel_that_came_too_late():
    m = running()
    m.cancel(T0)
    assert m.cancel(T0) == []  # said once
    actions = m.attempt_ended(T0, AttemptReport(AttemptOutcome.COMPLETED, tokens=20, text="z" * 20), offers=OFFERS)
    assert finish(actions).outcome is Outcome.COMPLETED


def test_a_clock_that_steps_back_moves_no_deadline_earlier():
    m = machine()
    m.start(T0)
    m.in_line(T0 + 500, position=1, offers=OFFERS)
    assert m.timer(T0) == []  # the clock stepped back: still 500 ms in, not due
    assert m.next_deadline() == T0 + 500 + CONFIG.queue_timeout_ms


# ------------------------------------------------------------------ before the machine


def test_work_of_puts_the_system_prompt_first_and_the_prompt_last():
    assert work_of("hi", None, None, 5, None) == Work("hi", None, 5, None)
    assert work_of("hi", None, "be brief", 5, 9) == Work(None, (("system", "be brief"), ("user", "hi")), 5, 9)
    chat = (("user", "a"), ("assistant", "b"))
    assert work_of(None, chat, "s", 5, None) == Work(None, (("system", "s"), *chat), 5, None)
    assert work_of(None, chat, None, 5, None) == Work(None, chat, 5, None)


PNG = "iVBORw0KGgo="


def test_work_of_moves_the_params_with_their_messages():
    extra = MessageExtra(images=(PNG,))
    chat = (("user", "look"), ("assistant", "a cat"), ("user", "and now?"))
    params = JobParams(message_extras=((0, extra), (2, MessageExtra(thinking="hm"))), think=True)
    work = work_of(None, chat, "be brief", 5, None, params=params)  # the system message goes first: +1
    assert work.messages == (("system", "be brief"), *chat)
    assert work.params == replace(params, message_extras=((1, extra), (3, MessageExtra(thinking="hm"))))
    assert work_of(None, chat, None, 5, None, params=params).params == params
    # a prompt with images becomes a chat when a system prompt comes along: the images go onto its message
    work = work_of("describe", None, "be brief", 5, None, params=JobParams(images=(PNG,), think=True))
    assert work.messages == (("system", "be brief"), ("user", "describe"))
    assert work.params == JobParams(think=True, message_extras=((1, extra),))
    assert work_of("describe", None, None, 5, None, params=JobParams(images=(PNG,))).params.images == (PNG,)


def test_work_of_makes_an_embed_job_and_refuses_what_cannot_be_sent():
    work = work_of(None, None, None, 99, 7, params=JobParams(dimensions=32), inputs=["a", "b"])
    assert work == Work(None, None, 2, 7, JobParams(dimensions=32), ("a", "b"))  # one token per input
    with pytest.raises(MalformedInput, match="embed"):
        work_of("x", None, None, 5, None, inputs=["a"])
    with pytest.raises(MalformedInput, match="only truncate and dimensions"):
        work_of(None, None, None, 1, None, params=JobParams(think=True), inputs=["a"])
    with pytest.raises(MalformedInput, match=r"message_extras\[5\]"):
        work_of(None, (("user", "hi"),), None, 5, None, params=JobParams(message_extras=((5, MessageExtra(
            thinking="x")),)))
    with pytest.raises(MalformedInput, match="exceeds"):  # a REQUEST body could not carry it
        work_of("x" * MAX_BODY, None, None, 5, None)


def test_an_embed_job_that_completes_says_stop_and_one_that_fails_over_asks_for_the_rest():
    m = Submission(JOB_ID, MODEL, work_of(None, None, None, 3, None, inputs=["a", "b", "c"]),
                   config=CONFIG, rng=random.Random(1))
    m.start(T0)
    m.slot_assigned(T0, provider=bob.public_key, price_in=1, price_out=2)
    actions = m.attempt_ended(T0, AttemptReport(AttemptOutcome.FAILED, "connection lost", tokens=2, cost=4),
                              offers=OFFERS)
    assert actions[-1] == JoinLine() and m.work.inputs == ("c",) and m.work.max_tokens == 1
    m.slot_assigned(T0, provider=carol.public_key, price_in=1, price_out=2)
    end = finish(m.attempt_ended(T0, AttemptReport(AttemptOutcome.COMPLETED, tokens=1, cost=2, prompt_tokens=1,
                                                   billed_tokens=1, durations_ns=(5, 0, 0, 0)), offers=OFFERS))
    assert end.event["done_reason"] == "stop" and end.event["eval_count"] == 3 and end.event["tokens"] == 3
    assert end.event["durations_ns"] == {"total": 5, "load": 0, "prompt_eval": 0, "eval": 0}


def test_admit_says_why_nothing_fits_and_checks_the_balance_against_the_cheapest():
    work = Work("hello", None, 100, None)
    with pytest.raises(ExecutionFailed, match="qwen"):
        admit(OFFERS, "qwen2.5:7b", work, history=ProviderHistory(), now_ms=T0, spendable=10**9)
    busy = [offer(bob, slots_free=0)]
    assert admit(busy, MODEL, work, history=ProviderHistory(), now_ms=T0, spendable=10**9)  # it waits for a slot
    with pytest.raises(InsufficientFunds, match="may cost up to"):
        admit(OFFERS, MODEL, work, history=ProviderHistory(), now_ms=T0, spendable=0)


def test_a_config_with_negative_knobs_is_refused():
    with pytest.raises(MalformedInput):
        SubmissionConfig(queue_timeout_ms=-1)
    with pytest.raises(MalformedInput):
        SubmissionConfig(max_attempts=0)


# ------------------------------------------------------------------ whatever happens


# weighted: cancels and timers end a job, so they come less often than the rest
INPUTS = ["slot"] * 4 + ["ended"] * 4 + ["timer"] * 2 + ["in_line", "cancel"]
# ...and failures, which fail over, more often than the ends of a job
OUTCOMES = [AttemptOutcome.FAILED, AttemptOutcome.UNREACHABLE, AttemptOutcome.REJECTED, AttemptOutcome.BUSY] * 2 + [
    AttemptOutcome.COMPLETED, AttemptOutcome.NO_FUNDS]


class Driver:
    """A minimal, honest edge for the property test: it carries out the
    machine's line actions (``JoinLine`` answered at once by a slot or by
    ``in_line``), keeps the clock, and records what the machine said."""

    def __init__(self, m: Submission, data: st.DataObject) -> None:
        self.m, self.data = m, data
        self.now = T0
        self.actions: list = []
        self.cancelled = False
        self.reported_tokens = self.reported_cost = 0
        self.deadlines: list[tuple[State, int | None]] = []

    def apply(self, actions: list) -> None:
        for action in actions:
            self.actions.append(action)
            if isinstance(action, JoinLine):
                self.answer_join()

    def answer_join(self) -> None:
        if self.data.draw(st.booleans(), label="slot at once"):
            self.slot()
        else:
            offers = self.data.draw(st.sampled_from([OFFERS] * 4 + [OFFERS[:1], []]), label="offers")
            self.apply(self.m.in_line(self.now, position=1, offers=offers))

    def slot(self) -> None:
        key = self.data.draw(st.sampled_from([bob, carol, dave]), label="slot")
        self.apply(self.m.slot_assigned(self.now, provider=key.public_key, price_in=1, price_out=2))

    def step(self) -> None:
        self.now += self.data.draw(st.integers(0, 400), label="ms pass")
        choice = self.data.draw(st.sampled_from(INPUTS), label="input")
        state = self.m.state
        if state is State.NEW and choice != "cancel":
            self.apply(self.m.start(self.now))
        elif choice == "cancel":
            self.cancelled = True
            self.apply(self.m.cancel(self.now))
        elif choice == "timer":
            self.apply(self.m.timer(self.now, ahead=self.data.draw(st.integers(0, 3), label="ahead")))
        elif choice == "slot" and state is not State.NEW:
            self.slot()
        elif choice == "ended" and state is State.RUNNING:
            self.apply(self.m.attempt_ended(self.now, self.report(), offers=self.data.draw(
                st.sampled_from([OFFERS] * 4 + [OFFERS[1:], []]), label="offers now")))
        elif choice == "in_line" and state in (State.WAITING, State.DONE):
            self.apply(self.m.in_line(self.now, position=2, offers=OFFERS))
        self.deadlines.append((self.m.state, self.m.next_deadline()))

    def report(self) -> AttemptReport:
        outcome = self.data.draw(st.sampled_from(OUTCOMES), label="outcome")
        started = outcome not in (AttemptOutcome.NO_FUNDS, AttemptOutcome.UNREACHABLE)
        tokens = self.data.draw(st.integers(0, 4), label="tokens") if started else 0
        cost = self.data.draw(st.integers(0, 50), label="cost") if started else 0
        self.reported_tokens += tokens
        self.reported_cost += cost
        return AttemptReport(outcome, f"{outcome.value} here", tokens=tokens, text="t" * tokens, cost=cost)

    def to_the_end(self) -> int:
        """Drive the job to its end with nothing but time and failures: no
        cancel, no slots; returns the inputs it took."""
        steps = 0
        while not self.m.done:
            steps += 1
            assert steps < 20, (self.m.state, self.m.next_deadline())
            if self.m.state is State.RUNNING:
                self.apply(self.m.attempt_ended(self.now, AttemptReport(AttemptOutcome.FAILED, "gone"), offers=[]))
            elif self.m.state is State.NEW:
                self.apply(self.m.start(self.now))
            else:
                deadline = self.m.next_deadline()
                assert deadline is not None, self.m.state  # a waiting job always has a timer
                self.now = max(self.now, deadline)
                self.apply(self.m.timer(self.now))
        return steps


@settings(max_examples=500, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**32), max_tokens=st.integers(8, 40),
       max_attempts=st.sampled_from([4, 3, 2, 1]), retry=st.sampled_from([True, True, False]), start=st.booleans())
def test_whatever_happens_the_machine_keeps_its_promises(data, seed, max_tokens, max_attempts, retry, start):
    config = SubmissionConfig(queue_timeout_ms=1_000, max_attempts=max_attempts)
    m = machine(max_tokens=max_tokens, retry=retry, config=config, seed=seed)
    drive = Driver(m, data)
    if start:
        drive.apply(m.start(T0))
    for _ in range(data.draw(st.integers(0, 40), label="steps")):
        drive.step()
    drive.to_the_end()

    actions = drive.actions
    finishes = [i for i, a in enumerate(actions) if isinstance(a, Finish)]
    assert len(finishes) == 1 and m.done and m.outcome is actions[finishes[0]].outcome  # it always ends, once
    after = actions[finishes[0] + 1:]
    assert all(isinstance(a, GiveBackSlot) for a in after)  # nothing but late slots handed back after the end
    final = actions[finishes[0]].event
    assert (final["type"] == "done") == (m.outcome is Outcome.COMPLETED)
    if m.outcome is not Outcome.COMPLETED:
        assert final["kind"] == m.outcome.kind

    runs = [a for a in actions if isinstance(a, RunAttempt)]
    excluded_so_far: set[bytes] = set()
    cancel_seen = False
    for action in actions:
        if isinstance(action, StopAttempt) or (isinstance(action, Finish) and action.outcome is Outcome.CANCELLED):
            cancel_seen = True
        if isinstance(action, RunAttempt):
            assert not cancel_seen, "an attempt started after a cancel"
            assert action.provider not in excluded_so_far, "an attempt on a provider that failed the job"
            assert action.attempt <= max_attempts
        if isinstance(action, RecordFailure):
            excluded_so_far.add(action.provider)
    assert len({r.provider for r in runs if r.provider in m.excluded}) == len(m.excluded) <= 3
    assert m.attempts <= max_attempts
    emitted = [e for e in events(actions)]
    assert sum(1 for e in emitted if e["type"] == "queued") <= 1
    assert all(e["type"] in ("queued", "provider", "retry", "done", "error") for e in emitted)
    assert m.delivered == drive.reported_tokens and m.paid == drive.reported_cost
    assert m.answer == "t" * drive.reported_tokens
    if not retry:
        assert not any(e["type"] == "retry" for e in emitted)

    # deadlines: a wait's deadline never moves earlier while the job stays in that state
    for (s1, d1), (s2, d2) in zip(drive.deadlines, drive.deadlines[1:]):
        if s1 is s2 and d1 is not None and d2 is not None:
            assert d2 >= d1


# ------------------------------------------------------------------ the line (core.waitlist.Waitlist)


class Job:
    """A job handle as the line sees one: any object, by identity."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def test_the_line_is_fifo_by_submission_order_and_a_busy_provider_counts_as_full():
    line: Waitlist[Job] = Waitlist(busy_mark_ms=5_000)
    a, b, c = Job("a"), Job("b"), Job("c")
    for order, job in enumerate([a, b, c]):
        line.join(job, order)
    line.leave(a)
    line.join(a, 0)  # back from a busy provider: keeps its place
    assert [line.position(j) for j in (a, b, c)] == [1, 2, 3] and line.ahead(c) == 2 and line.position(Job("z")) == 0
    one = offer(bob)  # one slot, free
    given = line.dispatch([one], lambda job: [bob.public_key], T0)
    assert given == [(a, bob.public_key)] and a not in line and line.inflight(bob.public_key) == 1
    assert line.dispatch([one], lambda job: [bob.public_key], T0) == []  # ours now
    line.freed(bob.public_key)
    line.mark_busy(bob.public_key, one.seq, T0)
    assert line.room(one, T0 + 4_999) == 0  # it said busy: full until its next offer...
    assert line.room(offer(bob, seq=2), T0 + 1) == 1  # ...which may say otherwise
    line.mark_busy(bob.public_key, one.seq, T0)
    assert line.room(one, T0 + 5_000) == 1  # ...or for at most busy_mark_ms


def test_an_offer_that_counts_our_own_job_frees_its_slot_when_that_job_ends():
    line: Waitlist[Job] = Waitlist()
    a, b = Job("a"), Job("b")
    line.join(a, 0)
    assert line.dispatch([offer(bob)], lambda job: [bob.public_key], T0) == [(a, bob.public_key)]
    line.offer_arrived(bob.public_key)  # its next offer: no slot free, and the one taken is ours
    full = offer(bob, slots_free=0, seq=2)
    line.join(b, 1)
    assert line.dispatch([full], lambda job: [bob.public_key], T0) == []
    line.freed(bob.public_key)  # ours ended: the slot is free before the provider says so
    assert line.dispatch([full], lambda job: [bob.public_key], T0) == [(b, bob.public_key)]


def test_an_answer_shorter_than_max_tokens_is_done_with_stop():
    m = running(max_tokens=20)
    end = finish(m.attempt_ended(T0, AttemptReport(AttemptOutcome.COMPLETED, tokens=12, text="x" * 12, cost=9,
                                                   prompt_tokens=3, billed_tokens=12), offers=OFFERS))
    assert end.event["done_reason"] == "stop" and end.event["eval_count"] == 12
    assert end.event["durations_ns"] == {"total": 0, "load": 0, "prompt_eval": 0, "eval": 0}  # no receipt figures

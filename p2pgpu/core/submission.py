"""One submission's life, from ``submit`` to its final event: a pure state machine.

Theory of operation
-------------------
A consumer's job ("submission") may take several *attempts*: it waits in
this node's line for a provider slot, runs on the provider it is given,
and when that provider fails, fails over to the next one, asking it to
*continue* the answer (``p2pgpu.core.continuation``); when a provider turns
it away as busy, it backs off a moment and gets back in line. This module
decides all of that; the edge (``p2pgpu.consumer``) owns the line, the
clock, the streams and the job store, feeds the machine what happened, and
carries out the actions it returns, in order. Like h11 and aioquic: no
I/O, no clock of its own (every input takes ``now_ms``), and
``next_deadline()`` says when to call ``timer``.

States and inputs, one table (``TRANSITIONS``; an input a state does not
list is a driver bug, ``JobStateConflict``)::

    NEW          start -> WAITING                       [JoinLine]
                 cancel -> DONE                         [Finish(CANCELLED)]
    WAITING      in_line -> WAITING (first time: a "queued" event; the
                            queue deadline starts) | DONE (every provider
                            left has failed it)
                 slot_assigned -> RUNNING                [Emit(provider), RunAttempt]
                 cancel -> DONE                          [LeaveLine, Finish(CANCELLED)]
                 timer -> DONE at the queue deadline     [LeaveLine, Finish(QUEUE_TIMEOUT)]
    RUNNING      attempt_ended -> DONE (completed; every token asked for was
                            delivered; no failover left) | BACKING_OFF (busy)
                            | WAITING (failover: an Emit(retry), JoinLine)
                 cancel -> RUNNING                       [StopAttempt] (the attempt ends itself)
    BACKING_OFF  timer -> WAITING at the back-off's end [JoinLine]
                 cancel -> DONE                          [Finish(CANCELLED)]
    DONE         anything -> DONE, nothing to do (a slot that arrives late is
                 given back)

The rules it owns:

- **Busy is not failure.** A provider that says busy (``R_BUSY``; our count
  of its slots was behind) is not blamed, not excluded and not counted as
  an attempt; it counts as full until its next offer (``MarkBusy``) and the
  job backs off ``busy_backoff_ms`` doubling per busy answer, at most
  ``busy_backoff_max_ms``, times a jitter in [0.5, 1) drawn from the
  ``random.Random`` the caller passes (seed it and a run replays).
- **The queue deadline** bounds one wait for a slot (back-offs included),
  not the whole job: it starts when the job first finds no slot, and
  starts again after a failover.
- **Failover**: a provider that failed the job (or was unreachable) is
  blamed in the ranking history and excluded; the next attempt continues
  the answer; ``retry=False``, an answer too long to continue, a spent
  ``max_price`` budget, ``max_attempts`` attempts or no provider left end
  the job instead.
- **Every token delivered counts as completed**: a provider that died after
  the last token asked for, before its receipt, leaves a complete answer.
- **Cancel** wins over everything but a completed attempt, and no attempt
  starts after it.

Events (``Emit`` and ``Finish.event``) are the local API's JSON shapes
(``p2pgpu.api.NodeView.submit``), built here so every driver emits the
same ones. Pure module: no I/O; time is the ``now_ms`` parameter.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable

from p2pgpu.core.continuation import ContinuationKind, Work, params_for_chat, plan_continuation
from p2pgpu.core.identity import peer_id_from_public_key
from p2pgpu.core.jobparams import JobParams
from p2pgpu.core.jobs import check_job_params
from p2pgpu.core.jobrecords import CANCELLED, COMPLETED, FAILED, REJECTED
from p2pgpu.core.offers import Offer
from p2pgpu.core.ranking import ProviderHistory, RankedOffer, explain_no_match, rank
from p2pgpu.core.units import format_coins
from p2pgpu.errors import ExecutionFailed, InsufficientFunds, JobStateConflict, MalformedInput

__all__ = [
    "State", "Input", "TRANSITIONS", "AttemptOutcome", "Outcome", "AttemptReport", "SubmissionConfig",
    "JoinLine", "LeaveLine", "GiveBackSlot", "RunAttempt", "StopAttempt", "MarkBusy", "RecordSuccess",
    "RecordFailure", "RecordQueued", "EndAttempt", "Emit", "Finish", "Action",
    "Submission", "work_of", "admit", "CANCELLED_EVENT",
]


class State(enum.Enum):
    NEW = "new"  # made, not started
    WAITING = "waiting"  # in this node's line for a provider slot
    RUNNING = "running"  # an attempt runs on one provider
    BACKING_OFF = "backing_off"  # a provider said busy: a moment before getting back in line
    DONE = "done"  # the final event is out


class Input(enum.Enum):
    START = "start"
    IN_LINE = "in_line"  # joined the line and no slot was free at once
    SLOT = "slot_assigned"
    ENDED = "attempt_ended"
    CANCEL = "cancel"
    TIMER = "timer"


_S, _I = State, Input
TRANSITIONS: dict[State, dict[Input, frozenset[State]]] = {
    _S.NEW: {_I.START: frozenset({_S.WAITING}), _I.CANCEL: frozenset({_S.DONE}), _I.TIMER: frozenset({_S.NEW})},
    _S.WAITING: {
        _I.IN_LINE: frozenset({_S.WAITING, _S.DONE}),
        _I.SLOT: frozenset({_S.RUNNING, _S.WAITING}),  # WAITING: a provider it may not use, given back
        _I.CANCEL: frozenset({_S.DONE}),
        _I.TIMER: frozenset({_S.WAITING, _S.DONE}),
    },
    _S.RUNNING: {
        _I.ENDED: frozenset({_S.DONE, _S.BACKING_OFF, _S.WAITING}),
        _I.CANCEL: frozenset({_S.RUNNING}),
        _I.TIMER: frozenset({_S.RUNNING}),
        _I.SLOT: frozenset({_S.RUNNING}),  # not in line: given back
    },
    _S.BACKING_OFF: {
        _I.TIMER: frozenset({_S.BACKING_OFF, _S.WAITING}),
        _I.CANCEL: frozenset({_S.DONE}),
        _I.SLOT: frozenset({_S.BACKING_OFF}),  # not in line: given back
    },
    _S.DONE: {i: frozenset({_S.DONE}) for i in (_I.IN_LINE, _I.SLOT, _I.CANCEL, _I.TIMER)},
}


class AttemptOutcome(enum.Enum):
    """How one attempt ended, as the edge reports it (``AttemptReport``)."""

    COMPLETED = "completed"  # the provider's receipt came: the answer is whole
    BUSY = "busy"  # turned away for want of a free slot (``R_BUSY``): not the provider's failure
    REJECTED = "rejected"  # turned away for another reason
    FAILED = "failed"  # accepted, then ended early (died, stalled, stopped...)
    NO_FUNDS = "no_funds"  # not started: our balance cannot hold its cost
    UNREACHABLE = "unreachable"  # not started: no stream to the provider (any error before its hold)


class Outcome(enum.Enum):
    """How a submission ended (``Finish``)."""

    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"  # failed, and its last provider had turned it away
    QUEUE_TIMEOUT = "queue_timeout"  # no slot within the queue timeout
    NO_FUNDS = "no_funds"
    CANCELLED = "cancelled"

    @property
    def status(self) -> str:
        """The job record's final status (``p2pgpu.core.jobrecords``)."""
        return _STATUS[self]

    @property
    def kind(self) -> str | None:
        """The error event's ``kind`` (None: completed, the final event is "done")."""
        return _KIND[self]


_STATUS = {Outcome.COMPLETED: COMPLETED, Outcome.FAILED: FAILED, Outcome.REJECTED: REJECTED,
           Outcome.QUEUE_TIMEOUT: FAILED, Outcome.NO_FUNDS: FAILED, Outcome.CANCELLED: CANCELLED}
_KIND = {Outcome.COMPLETED: None, Outcome.FAILED: ExecutionFailed.__name__, Outcome.REJECTED: ExecutionFailed.__name__,
         Outcome.QUEUE_TIMEOUT: "QueueTimeout", Outcome.NO_FUNDS: InsufficientFunds.__name__,
         Outcome.CANCELLED: "Cancelled"}

CANCELLED_EVENT = {"type": "error", "error": "the job was cancelled", "kind": "Cancelled"}
CANCELLED_REASON = "cancelled by the user"


@dataclass(frozen=True, slots=True)
class AttemptReport:
    """What one attempt came to (the ``attempt_ended`` input).

    ``tokens``/``text``: what it delivered (to the user too); ``cost``: what
    it costs us (its last voucher). ``prompt_tokens``/``billed_tokens``: the
    receipt's counts when one came (tokens still in flight when we
    cancelled are billed, hence counted in the record). ``retryable``: the
    session's word on whether another provider is worth trying.
    """

    outcome: AttemptOutcome
    reason: str = ""
    retryable: bool = True
    tokens: int = 0
    text: str = ""
    cost: int = 0
    prompt_tokens: int | None = None
    billed_tokens: int | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    release: str = "pending"  # what became of its hold, for the done event
    durations_ns: tuple[int, int, int, int] | None = None  # the receipt's (total, load, prompt_eval, eval)

    @property
    def started(self) -> bool:
        """Whether it got as far as a hold (and so may have cost something)."""
        return self.outcome not in (AttemptOutcome.NO_FUNDS, AttemptOutcome.UNREACHABLE)


@dataclass(frozen=True, slots=True)
class SubmissionConfig:
    """The knobs of a submission's waiting and failing over, in ms."""

    queue_timeout_ms: int = 300_000  # longest one wait for a free slot (busy back-offs included)
    busy_backoff_ms: int = 50  # after the first busy answer; doubling with each one...
    busy_backoff_max_ms: int = 2_000  # ...up to this (before the jitter)
    busy_doublings: int = 8
    max_attempts: int = 32  # providers tried at most (busy answers do not count); records keep 32

    def __post_init__(self) -> None:
        for name in ("queue_timeout_ms", "busy_backoff_ms", "busy_backoff_max_ms", "busy_doublings"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise MalformedInput(f"submission config: {name} must be a non-negative integer, got {value!r}")
        if type(self.max_attempts) is not int or self.max_attempts < 1:
            raise MalformedInput(f"submission config: max_attempts must be at least 1, got {self.max_attempts!r}")

    def backoff_ms(self, busy_answers: int, jitter: float) -> int:
        """The pause after the ``busy_answers``-th busy answer; ``jitter`` in [0.5, 1)."""
        base = min(self.busy_backoff_max_ms, self.busy_backoff_ms * 2 ** min(busy_answers, self.busy_doublings))
        return max(1, int(jitter * base))


# ------------------------------------------------------------------ actions


@dataclass(frozen=True, slots=True)
class JoinLine:
    """Put the job in this node's line and hand out free slots; then feed
    ``slot_assigned`` if it got one at once, else ``in_line``."""


@dataclass(frozen=True, slots=True)
class LeaveLine:
    """Take the job out of the line and give back a slot reserved for it."""


@dataclass(frozen=True, slots=True)
class GiveBackSlot:
    """A slot of ``provider`` was handed to this job but it will not use it."""

    provider: bytes


@dataclass(frozen=True, slots=True)
class RunAttempt:
    """Record the attempt's start, then run ``work`` on ``provider`` (the
    slot just assigned) and feed ``attempt_ended``. ``attempt``: its number."""

    provider: bytes
    work: Work
    attempt: int


@dataclass(frozen=True, slots=True)
class StopAttempt:
    """Stop the running attempt (it pays for what was delivered) and still
    feed ``attempt_ended`` when it has ended."""


@dataclass(frozen=True, slots=True)
class MarkBusy:
    """``provider`` counts as full until its next offer (``p2pgpu.core.waitlist``)."""

    provider: bytes


@dataclass(frozen=True, slots=True)
class RecordSuccess:
    """For the ranking history (``ProviderHistory.record_success``)."""

    provider: bytes
    ttft_ms: int
    tokens_per_s: float


@dataclass(frozen=True, slots=True)
class RecordFailure:
    """For the ranking history (``ProviderHistory.record_failure``)."""

    provider: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class RecordQueued:
    """The job's record goes (back) to "queued"."""


@dataclass(frozen=True, slots=True)
class EndAttempt:
    """The running attempt's record ends with ``note`` ("completed", "busy",
    or why it failed). When it got as far as a hold (``cost`` not None), the
    job's record also takes the job's totals so far: ``cost``,
    ``tokens_out`` and, when a receipt said, ``tokens_in``."""

    note: str
    cost: int | None = None
    tokens_out: int | None = None
    tokens_in: int | None = None


@dataclass(frozen=True, slots=True)
class Emit:
    """Send ``event`` to the submitter (not the last one: see ``Finish``)."""

    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Finish:
    """The job is over: end its record as ``outcome.status`` with ``reason``,
    and send ``event`` (a "done" or an "error") as its last event."""

    outcome: Outcome
    reason: str
    event: dict[str, Any]


Action = (JoinLine | LeaveLine | GiveBackSlot | RunAttempt | StopAttempt | MarkBusy | RecordSuccess | RecordFailure
          | RecordQueued | EndAttempt | Emit | Finish)

_NO_HISTORY = ProviderHistory(1)  # counting candidates needs no scores


# ------------------------------------------------------------------ the machine


@dataclass(eq=False)
class Submission:
    """One submission (module docstring). Drive it with ``start``, then the
    inputs as they happen; each returns the actions to carry out, in order.

    ``job_id``: 16 bytes, one for all its attempts. ``work``: the request as
    its first attempt sends it (``work_of``). ``retry``: fail over at all.
    ``rng``: draws the busy back-off's jitter.
    """

    job_id: bytes
    model: str
    original: Work
    retry: bool = True
    config: SubmissionConfig = SubmissionConfig()
    rng: random.Random = field(default_factory=random.Random)

    state: State = field(default=State.NEW, init=False)
    work: Work = field(init=False)  # what the next attempt sends (continued after a failover)
    attempts: int = field(default=0, init=False)  # the current attempt's number; busy answers do not count
    busy_answers: int = field(default=0, init=False)
    delivered: int = field(default=0, init=False)  # tokens delivered over all attempts
    paid: int = field(default=0, init=False)  # what all attempts cost
    answer: str = field(default="", init=False)  # the answer so far, over all attempts
    outcome: Outcome | None = field(default=None, init=False)
    reason: str = field(default="", init=False)
    cancel_requested: bool = field(default=False, init=False)
    _excluded: set[bytes] = field(default_factory=set, init=False)
    _provider: bytes | None = field(default=None, init=False)
    _started_ms: int = field(default=0, init=False)
    _wait_deadline: int | None = field(default=None, init=False)
    _backoff_until: int | None = field(default=None, init=False)
    _announced: bool = field(default=False, init=False)
    _record_queued: bool = field(default=True, init=False)  # a new job's record starts queued
    _last_reason: str = field(default="no provider was tried", init=False)
    _last_outcome: Outcome = field(default=Outcome.FAILED, init=False)
    _now: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.work = self.original

    # --------------------------------------------------------------- queries

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    @property
    def excluded(self) -> frozenset[bytes]:
        """Providers that failed this job: never given another attempt."""
        return frozenset(self._excluded)

    @property
    def provider(self) -> bytes | None:
        """The provider of the running (or last) attempt."""
        return self._provider

    def next_deadline(self) -> int | None:
        """When to call ``timer`` (ms, the clock of the inputs); None: no timer."""
        if self.state is State.WAITING:
            return self._wait_deadline
        if self.state is State.BACKING_OFF:
            return self._backoff_until
        return None

    def candidates(self, offers: Iterable[Offer], history: ProviderHistory, now_ms: int) -> list[RankedOffer]:
        """Providers for what is left of the job, best first, busy ones
        included (it waits for their slots), without those that failed it."""
        work = self.work
        ranked = rank(offers, self.model, max_tokens=work.max_tokens, prompt_tokens_estimate=work.prompt_tokens_bound,
                      history=history, now_ms=now_ms, max_price=work.max_price, include_busy=True)
        return [r for r in ranked if r.provider not in self._excluded]

    # --------------------------------------------------------------- inputs

    def start(self, now_ms: int) -> list[Action]:
        """Begin: get in line."""
        return self._step(Input.START, now_ms, self._on_start)

    def in_line(self, now_ms: int, *, position: int, offers: Iterable[Offer]) -> list[Action]:
        """The job joined the line and got no slot at once: it is
        ``position`` (1: next); ``offers``: the live offers of others now."""
        return self._step(Input.IN_LINE, now_ms, lambda now: self._on_in_line(now, position, offers))

    def slot_assigned(self, now_ms: int, *, provider: bytes, price_in: int, price_out: int) -> list[Action]:
        """A slot of ``provider`` (its offer's prices) was handed to the job."""
        return self._step(Input.SLOT, now_ms, lambda now: self._on_slot(now, provider, price_in, price_out))

    def attempt_ended(self, now_ms: int, report: AttemptReport, *, offers: Iterable[Offer]) -> list[Action]:
        """The running attempt is over (``report``); ``offers``: the live
        offers of others now (is there anyone left to fail over to?)."""
        return self._step(Input.ENDED, now_ms, lambda now: self._on_ended(now, report, offers))

    def cancel(self, now_ms: int) -> list[Action]:
        """The user (or a reader that went away) stops the job."""
        return self._step(Input.CANCEL, now_ms, self._on_cancel)

    def timer(self, now_ms: int, *, ahead: int = 0) -> list[Action]:
        """``next_deadline()`` may have come. ``ahead``: the jobs ahead of
        this one in the line now (for the queue timeout's message)."""
        return self._step(Input.TIMER, now_ms, lambda now: self._on_timer(now, ahead))

    # --------------------------------------------------------------- the table

    def _step(self, what: Input, now_ms: int, handler: Callable[[int], tuple[State, list[Action]]]) -> list[Action]:
        allowed = TRANSITIONS[self.state].get(what)
        if allowed is None:
            raise JobStateConflict(f"submission {self.job_id.hex()[:8]} is {self.state.value}: "
                                   f"{what.value} is not an input it takes")
        self._now = now = max(self._now, now_ms)  # a clock stepping back must not move a deadline earlier
        state, actions = handler(now)
        assert state in allowed, (self.state, what, state)
        self.state = state
        for action in actions:
            if isinstance(action, Finish):
                self.outcome, self.reason = action.outcome, action.reason
        return actions

    # --------------------------------------------------------------- handlers

    def _on_start(self, now: int) -> tuple[State, list[Action]]:
        return State.WAITING, [JoinLine()]

    def _on_in_line(self, now: int, position: int, offers: Iterable[Offer]) -> tuple[State, list[Action]]:
        if self.state is State.DONE:
            return State.DONE, []
        if self._excluded and not self._remaining(offers, now):
            return self._finish(self._last_outcome, f"the job did not complete ({self._last_reason})", leave=True)
        actions: list[Action] = []
        if not self._announced:
            self._announced = True
            actions.append(Emit({"type": "queued", "position": position, "job_id": self.job_id.hex()}))
        if not self._record_queued:
            self._record_queued = True
            actions.append(RecordQueued())
        if self._wait_deadline is None:
            self._wait_deadline = now + self.config.queue_timeout_ms
        return State.WAITING, actions

    def _on_slot(self, now: int, provider: bytes, price_in: int, price_out: int) -> tuple[State, list[Action]]:
        if self.state is not State.WAITING:
            return self.state, [GiveBackSlot(provider)]
        if provider in self._excluded:  # a driver that ranked without our exclusions: back in line
            return State.WAITING, [GiveBackSlot(provider), JoinLine()]
        self.attempts += 1
        self._provider, self._started_ms = provider, now
        self._record_queued = False
        event = {"type": "provider", "provider": peer_id_from_public_key(provider), "attempt": self.attempts,
                 "job_id": self.job_id.hex(), "price_in": price_in, "price_out": price_out}
        return State.RUNNING, [Emit(event), RunAttempt(provider, self.work, self.attempts)]

    def _on_cancel(self, now: int) -> tuple[State, list[Action]]:
        first = not self.cancel_requested
        self.cancel_requested = True
        if self.state is State.RUNNING:
            return State.RUNNING, [StopAttempt()] if first else []
        if self.state is State.DONE:
            return State.DONE, []
        return self._finish(Outcome.CANCELLED, CANCELLED_REASON, leave=self.state is State.WAITING)

    def _on_timer(self, now: int, ahead: int) -> tuple[State, list[Action]]:
        if self.state is State.WAITING and self._wait_deadline is not None and now >= self._wait_deadline:
            return self._finish(Outcome.QUEUE_TIMEOUT, (
                f"no provider serving {self.model!r} had a free slot within "
                f"{self.config.queue_timeout_ms / 1000:g} s ({ahead} of this node's jobs were ahead of it)"
            ), leave=True)
        if self.state is State.BACKING_OFF and self._backoff_until is not None and now >= self._backoff_until:
            self._backoff_until = None
            return State.WAITING, [JoinLine()]
        return self.state, []

    def _on_ended(self, now: int, report: AttemptReport, offers: Iterable[Offer]) -> tuple[State, list[Action]]:
        provider = self._provider
        assert provider is not None
        peer = peer_id_from_public_key(provider)
        kind = report.outcome
        if kind is AttemptOutcome.NO_FUNDS:  # our balance, not the provider's fault: no failover helps
            return self._finish(Outcome.NO_FUNDS, report.reason, [EndAttempt(f"not started: {report.reason}")])
        before = self.delivered
        self.delivered += report.tokens
        self.paid += report.cost
        self.answer += report.text
        actions: list[Action] = []

        def end(note: str) -> EndAttempt:
            if not report.started:
                return EndAttempt(note)
            tokens_out = self.delivered if report.billed_tokens is None else before + report.billed_tokens
            return EndAttempt(note, cost=self.paid, tokens_out=tokens_out, tokens_in=report.prompt_tokens)

        if kind is AttemptOutcome.COMPLETED:
            elapsed = max(1, now - self._started_ms)
            ttft_ms = int((report.ttft_s or elapsed / 1000) * 1000)
            tps = report.tokens_per_s or report.tokens * 1000 / elapsed
            return self._finish(Outcome.COMPLETED, "", [RecordSuccess(provider, ttft_ms, tps), end("completed")],
                                report=report)
        if kind is AttemptOutcome.BUSY and not self.cancel_requested:
            # Full after all (our count of its slots was behind): not the
            # provider's failure, and not an attempt: back in line soon.
            self.attempts -= 1
            self.busy_answers += 1
            if self._wait_deadline is None:  # the back-off counts against the wait it starts
                self._wait_deadline = now + self.config.queue_timeout_ms
            self._record_queued = True
            self._backoff_until = now + self.config.backoff_ms(self.busy_answers, self.rng.uniform(0.5, 1.0))
            return State.BACKING_OFF, [end("busy"), MarkBusy(provider), RecordQueued()]
        if kind is AttemptOutcome.UNREACHABLE:
            actions += [RecordFailure(provider, report.reason), end(report.reason)]
            self._last_reason, self._last_outcome = f"{peer}: {report.reason}", Outcome.FAILED
            if self.cancel_requested:
                return self._finish(Outcome.CANCELLED, CANCELLED_REASON, actions)
        else:
            status = "rejected" if kind in (AttemptOutcome.REJECTED, AttemptOutcome.BUSY) else "failed"
            actions.append(end(report.reason or status))
            if self.cancel_requested:
                return self._finish(Outcome.CANCELLED, CANCELLED_REASON, actions)
            actions.append(RecordFailure(provider, report.reason))
            self._last_reason = f"{peer}: {status}: {report.reason}"
            self._last_outcome = Outcome.REJECTED if status == "rejected" else Outcome.FAILED
        return self._fail_over(now, peer, report, offers, actions)

    def _fail_over(self, now: int, peer: str, report: AttemptReport, offers: Iterable[Offer],
                   actions: list[Action]) -> tuple[State, list[Action]]:
        assert self._provider is not None
        self._excluded.add(self._provider)
        failed = f"the job did not complete ({self._last_reason})"
        plan = plan_continuation(self.original, self.answer, self.delivered, self.paid)
        if plan.kind is ContinuationKind.WHOLE:  # it died after the last token, before its receipt
            return self._finish(Outcome.COMPLETED, f"every token was delivered before {self._last_reason}", actions)
        if not self.retry or not report.retryable:
            return self._finish(self._last_outcome, failed, actions)
        if plan.kind is ContinuationKind.TOO_LONG:
            return self._finish(self._last_outcome, (
                f"{failed}; its answer so far is too long to be continued on another provider"), actions)
        if plan.kind is ContinuationKind.NO_BUDGET:
            return self._finish(self._last_outcome, f"{failed}; --max-price is spent on what was delivered", actions)
        if self.attempts >= self.config.max_attempts:
            return self._finish(self._last_outcome, f"{failed}; {self.attempts} providers were tried", actions)
        self.work = plan.work
        offers = list(offers)
        if not self._remaining(offers, now):
            return self._finish(self._last_outcome, failed, actions)
        actions.append(Emit({"type": "retry", "provider": peer, "reason": self._last_reason,
                             "tokens_delivered": self.delivered, "continues": plan.kind is ContinuationKind.CONTINUE}))
        actions.append(JoinLine())
        self._wait_deadline = None  # the queue deadline bounds each wait, not the whole job
        return State.WAITING, actions

    # --------------------------------------------------------------- inside

    def _remaining(self, offers: Iterable[Offer], now: int) -> bool:
        return bool(self.candidates(offers, _NO_HISTORY, now))

    def _finish(self, outcome: Outcome, reason: str, actions: list[Action] | None = None, *, leave: bool = False,
                report: AttemptReport | None = None) -> tuple[State, list[Action]]:
        actions = list(actions or ())
        if leave:
            actions.append(LeaveLine())
        if outcome is Outcome.COMPLETED:
            event = self._done_event(report)
        elif outcome is Outcome.CANCELLED:
            event = dict(CANCELLED_EVENT)
        else:
            event = {"type": "error", "error": reason, "kind": outcome.kind}
        actions.append(Finish(outcome, reason, event))
        return State.DONE, actions

    def _done_event(self, report: AttemptReport | None) -> dict[str, Any]:
        """``tokens`` and ``cost`` over all attempts (after a failover each
        provider is paid for its part of the answer); speed, release and
        durations from the last attempt's ``report``, when it completed (a
        provider that died after its last token has none: zeros).

        ``eval_count`` is ``tokens`` under Ollama's name (every output token
        delivered, on any channel); ``done_reason`` is "length" when they
        reached ``max_tokens`` (the answer was cut there), else "stop". An
        embed job always asks for exactly one token per input, so its
        reason is "stop"."""
        assert self._provider is not None
        durations = (report.durations_ns if report is not None else None) or (0, 0, 0, 0)
        cut = self.original.inputs is None and self.delivered >= self.original.max_tokens
        return {
            "type": "done",
            "job_id": self.job_id.hex(),
            "provider": peer_id_from_public_key(self._provider),
            "tokens": self.delivered,
            "prompt_tokens": (report.prompt_tokens or 0) if report is not None else 0,
            "cost": self.paid,
            "attempts": self.attempts,
            "tokens_per_s": report.tokens_per_s if report is not None else None,
            "ttft_s": report.ttft_s if report is not None else None,
            "release": report.release if report is not None else "pending",
            "done_reason": "length" if cut else "stop",
            "eval_count": self.delivered,
            "durations_ns": dict(zip(("total", "load", "prompt_eval", "eval"), durations)),
        }


# ------------------------------------------------------------------ before the machine


def work_of(prompt: str | None, messages: Iterable[tuple[str, str]] | None, system: str | None, max_tokens: int,
            max_price: int | None, *, params: JobParams = JobParams(), inputs: Iterable[str] | None = None) -> Work:
    """A request as its first attempt sends it: a plain prompt as is; with a
    system prompt or chat messages, a chat whose first message is the
    system prompt (and whose last is ``prompt``, when both are given);
    ``inputs``: an embed job, one vector (one token) per input.

    ``params`` name messages by their index in ``messages``: a system
    message put first moves them one on, and a prompt's images go onto its
    user message. ``MalformedInput`` (naming the field) when the params do
    not fit the job or the whole does not fit a REQUEST body, so a user
    hears it before anything is held or sent."""
    if inputs is not None:
        if prompt is not None or messages is not None or system is not None:
            raise MalformedInput("an embed job has inputs and no prompt, messages or system prompt")
        texts = tuple(inputs)
        work = Work(None, None, len(texts), max_price, params, texts)
    elif messages is None and system is None:
        work = Work(prompt, None, max_tokens, max_price, params)
    else:
        chat = list(messages or ())
        if system is not None:
            chat.insert(0, ("system", system))
        user_index = None
        if prompt is not None:
            chat.append(("user", prompt))
            user_index = len(chat) - 1
        work = Work(None, tuple(chat), max_tokens, max_price,
                    params_for_chat(params, 1 if system is not None else 0, user_index))
    check_job_params(work.kind, work.params, len(work.messages or ()))
    work.body()  # MalformedInput: more than a REQUEST body holds
    return work


def admit(offers: Iterable[Offer], model: str, work: Work, *, history: ProviderHistory, now_ms: int,
          spendable: int) -> list[RankedOffer]:
    """The errors a submission gets before anything is streamed: nobody
    serves the model within the budget (``ExecutionFailed``, saying why), or
    our spendable balance cannot hold even the cheapest candidate's worst
    case (``InsufficientFunds``). Busy providers count: the job waits for a
    slot instead of failing. Returns the candidates, best first."""
    offers = list(offers)
    estimate = work.prompt_tokens_bound
    ranked = rank(offers, model, max_tokens=work.max_tokens, prompt_tokens_estimate=estimate, history=history,
                  now_ms=now_ms, max_price=work.max_price, include_busy=True)
    if not ranked:
        raise ExecutionFailed(explain_no_match(offers, model, now_ms, max_tokens=work.max_tokens,
                                               prompt_tokens_estimate=estimate, max_price=work.max_price,
                                               include_busy=True))
    cheapest = min(r.cost for r in ranked)
    if spendable < cheapest:
        raise InsufficientFunds(
            f"this job may cost up to {format_coins(cheapest)} coins (held until it ends); "
            f"you can spend {format_coins(spendable)}"
        )
    return ranked

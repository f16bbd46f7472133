"""The consumer side of a node: our submissions, from ``submit`` to their last event.

Theory of operation
-------------------
Each ``submit`` becomes a ``p2pgpu.core.submission.Submission`` (the pure
machine that decides when to wait, run, back off, fail over or give up)
and one task of the node's nursery that drives it: it feeds the machine
what happened (a slot was handed out, an attempt ended, the user
cancelled, a deadline came) with the clock's reading, and carries out the
actions it returns, in order. This module only does what needs I/O or
trio:

- the line (``p2pgpu.core.waitlist.Waitlist``): ``_dispatch`` hands free
  provider slots to waiting jobs whenever one may have come free (one of
  our attempts ended, an offer arrived, a job joined the line) and wakes
  the jobs that got one;
- attempts: through an ``AttemptRunner`` (over libp2p,
  ``NetworkAttempts``: reach the provider at its offered addresses, then
  ``p2pgpu.jobrunner.run_job``); tokens go to the submitter as they come,
  each with its output channel (content, thinking, a tool call, an
  embedding), the result is translated once into a typed ``AttemptReport``;
- the job records of our submissions (``p2pgpu.core.jobrecords``), written
  through the ``save`` callback the composition root gives (one writer for
  the job store, whose saves also wake ``cancel_job``);
- the views the local API needs of a live job: its tokens so far, its
  answer so far, and stopping it.

It imports neither the node nor the holds or market modules: the node
passes what it needs as callables and small protocols (``OfferView``,
``JobRecords``, ``AttemptRunner``), so the import graph stays a tree.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import random
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import trio

from p2pgpu.api import SubmitRequest
from p2pgpu.core.continuation import Work
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.jobrecords import (
    CONSUMER, FAILED, QUEUED, JobRecord, advance, cut_text, end_attempt, start_attempt,
)
from p2pgpu.core.jobs import CHANNEL_NAMES, CONTENT, JOB_ID_SIZE, R_BUSY, Prices
from p2pgpu.core.ledger import Ledger
from p2pgpu.core.offers import MAX_MODEL_NAME_CHARS, Offer, normalize_model_name
from p2pgpu.core.ranking import ProviderHistory, RankedOffer
from p2pgpu.core.submission import (
    Action, AttemptOutcome, AttemptReport, Emit, EndAttempt, Finish, GiveBackSlot, JoinLine, LeaveLine, MarkBusy,
    RecordFailure, RecordQueued, RecordSuccess, RunAttempt, StopAttempt, Submission, SubmissionConfig, admit, work_of,
)
from p2pgpu.core.waitlist import Waitlist
from p2pgpu.errors import ExecutionFailed, InsufficientFunds, P2PGPUError
from p2pgpu.jobrunner import JobEnd, JobResult, JobStreamPool, SettleHold, run_job
from p2pgpu.net import P2PHost
from p2pgpu.replication import LedgerReplicator

log = logging.getLogger(__name__)

__all__ = ["OfferView", "JobRecords", "AttemptRunner", "NetworkAttempts", "Consumer", "report_of"]

INTERRUPTED = "interrupted: the node stopped"
BUSY_MARK_MS = 5_000  # a provider that said busy counts as full until its next offer, at most this long

Emitter = Callable[[dict[str, Any]], None]
OnTokens = Callable[..., None]  # (text, count[, channel]): the channel defaults to content


# ------------------------------------------------------------------ seams


class OfferView(Protocol):
    """The offer book as the consumer reads it (``p2pgpu.core.offers.OfferBook``)."""

    def live(self, now_ms: int, model: str | None = None) -> list[Offer]: ...

    def get(self, provider: bytes) -> Offer | None: ...


class JobRecords(Protocol):
    """The job store as the consumer reads it (``p2pgpu.jobstore.JobStore``);
    it writes through the ``save`` callback."""

    def get(self, job_id: bytes) -> JobRecord | None: ...


class AttemptRunner(Protocol):
    """Runs one attempt of a submission on one provider."""

    async def run(self, offer: Offer, work: Work, *, model: str, job_id: bytes,
                  on_tokens: OnTokens, cancel: trio.Event) -> JobResult:
        """Run ``work`` on ``offer``'s provider at its prices, calling
        ``on_tokens(text, count, channel)`` as tokens arrive (``channel``
        may be left out for content); setting ``cancel`` stops
        it (the provider is paid for what it sent). Raises
        ``InsufficientFunds`` when our balance cannot hold its cost, any
        other ``P2PGPUError`` when it could not start (the provider is
        unreachable); every end after its hold is a ``JobResult``."""
        ...



class NetworkAttempts:
    """``AttemptRunner`` over libp2p: connect to the provider at the
    addresses its offer carries, then ``run_job`` (hold, stream, vouchers;
    ``settle``: where a job reports its hold at the end, the node's holds
    owner)."""

    def __init__(self, host: P2PHost, replicator: LedgerReplicator, ledger: Ledger, key: NodeKey, *,
                 now_ms: Callable[[], int], streams: JobStreamPool | None = None,
                 settle: SettleHold | None = None) -> None:
        self.host, self.replicator, self.ledger, self.key = host, replicator, ledger, key
        self.now_ms, self.streams, self.settle = now_ms, streams, settle

    async def run(self, offer: Offer, work: Work, *, model: str, job_id: bytes,
                  on_tokens: OnTokens, cancel: trio.Event) -> JobResult:
        await self._reach(offer)
        return await run_job(
            self.host, self.replicator, self.ledger, self.key, offer.peer_id, Prices(offer.price_in, offer.price_out),
            model=model, prompt=work.prompt, messages=work.messages, max_tokens=work.max_tokens, now_ms=self.now_ms,
            on_tokens=on_tokens, max_prompt_tokens=work.prompt_tokens_bound, cancel=cancel, job_id=job_id,
            streams=self.streams, settle=self.settle, params=work.params, inputs=work.inputs,
        )

    async def _reach(self, offer: Offer) -> None:
        """Connect to a provider we only know from its offer: offers carry
        the provider's listen addresses for exactly this (noise checks the
        peer id, so a wrong address is only a failed dial)."""
        if self.host.is_connected(offer.peer_id):
            return
        failure: Exception | None = None
        for addr in offer.addrs:
            full = addr if "/p2p/" in addr else f"{addr}/p2p/{offer.peer_id}"
            if not full.endswith(offer.peer_id):
                continue
            try:
                await self.host.connect(full, timeout=5.0)
                return
            except P2PGPUError as exc:
                failure = exc
        raise ExecutionFailed(f"provider {offer.peer_id} is unreachable at its offered addresses ({failure})")


def report_of(result: JobResult) -> AttemptReport:
    """``run_job``'s result as the submission machine takes it: the one
    place that reads its status and reason code."""
    if result.status is JobEnd.COMPLETED:
        outcome = AttemptOutcome.COMPLETED
    elif result.status is JobEnd.REJECTED:
        outcome = AttemptOutcome.BUSY if result.code == R_BUSY else AttemptOutcome.REJECTED
    else:
        outcome = AttemptOutcome.FAILED
    receipt = result.receipt
    return AttemptReport(
        outcome, result.reason, result.retryable, result.tokens, result.text, result.cost,
        prompt_tokens=receipt.prompt_eval_count if receipt is not None else None,
        billed_tokens=receipt.output_tokens if receipt is not None else None,
        ttft_s=result.ttft_s, tokens_per_s=result.tokens_per_s, release=str(result.release),
        durations_ns=receipt.durations_ns if receipt is not None else None,
    )


# ------------------------------------------------------------------ the consumer


@dataclass(eq=False)
class _Ticket:
    """One submission of ours until it ends: its machine, its place in the
    line, the slot it was handed, how to stop it, and the running attempt's
    answer so far (the machine learns it when the attempt ends)."""

    machine: Submission
    order: int  # submission order: the line's FIFO key
    cancel: trio.Event = field(default_factory=trio.Event)  # set: stop the job (the attempt's cancel too)
    wake: trio.Event = field(default_factory=trio.Event)  # set: a slot was handed out, or the job stopped
    assigned: RankedOffer | None = None  # handed out by ``_dispatch``, not yet fed to the machine
    slot: RankedOffer | None = None  # fed to the machine: the next attempt runs there
    result: JobResult | None = None  # the attempt that just ended, until its record is written
    cancel_fed: bool = False
    chunks: list[str] = field(default_factory=list)  # the running attempt's text so far
    streaming: int = 0  # ...and its tokens (live progress for `jobs`)

    @property
    def job_id(self) -> bytes:
        return self.machine.job_id

    def stop(self) -> None:
        self.cancel.set()
        self.wake.set()


class Consumer:
    """This node's submissions (module docstring). Built by the composition
    root once the node runs; ``submit`` is the API's, ``offer_arrived`` the
    market's, ``progress``/``text``/``cancel`` serve the job views.

    ``me``: our public key (our own offers are not candidates).
    ``spendable()``: our spendable balance now. ``save(record, text)``:
    write a job record (and its answer). ``nursery``: where submissions run.
    ``rng``: the busy back-off's jitter (seed it to replay a run).
    """

    def __init__(self, *, me: bytes, offers: OfferView, records: JobRecords,
                 save: Callable[[JobRecord, str | None], None], attempts: AttemptRunner,
                 spendable: Callable[[], int], nursery: trio.Nursery, now_ms: Callable[[], int],
                 config: SubmissionConfig = SubmissionConfig(), history: ProviderHistory | None = None,
                 rng: random.Random | None = None, busy_mark_ms: int = BUSY_MARK_MS) -> None:
        self.me = me
        self.offers, self.records, self._save, self.attempts = offers, records, save, attempts
        self.spendable, self.nursery, self.now_ms, self.config = spendable, nursery, now_ms, config
        self.history = ProviderHistory() if history is None else history  # our own record of providers we used
        self.rng = random.Random() if rng is None else rng
        self.waitlist: Waitlist[_Ticket] = Waitlist(busy_mark_ms=busy_mark_ms)
        self._live: dict[bytes, _Ticket] = {}
        self._order = itertools.count()

    # ------------------------------------------------------------ API

    async def submit(self, request: SubmitRequest) -> AsyncIterator[dict[str, Any]]:
        """Run a job on the best provider with a free slot, failing over to
        the next one; wait in line while every candidate is full.

        Errors found before anything is streamed (no provider for the model,
        not enough coins; ``core.submission.admit``) are raised, so the API
        answers with an error status. The job itself runs as a task of the
        node's nursery, feeding a channel; closing this generator early (the
        client went away) cancels the job, which then pays only for tokens
        delivered; so does ``cancel``.
        """
        model = normalize_model_name(request.model)
        now = self.now_ms()
        work = work_of(request.prompt, request.messages, request.system, request.max_tokens, request.max_price,
                       params=request.params, inputs=request.inputs)
        admit(self._others_offers(now), model, work, history=self.history, now_ms=now, spendable=self.spendable())
        machine = Submission(secrets.token_bytes(JOB_ID_SIZE), model, work, retry=request.retry, config=self.config,
                             rng=self.rng)
        job = _Ticket(machine, next(self._order))
        self._save(JobRecord(job.job_id, CONSUMER, QUEUED, model[:MAX_MODEL_NAME_CHARS], self.me, None, now), None)
        self._live[job.job_id] = job
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        self.nursery.start_soon(self._run_submission, job, send)
        try:
            async with receive:
                async for event in receive:
                    yield event
        finally:
            job.stop()

    def offer_arrived(self, provider: bytes) -> None:
        """A new offer (or a withdrawal) was accepted: its slot count now
        includes our jobs in flight there, and a slot may be free."""
        if provider == self.me:
            return
        self.waitlist.offer_arrived(provider)
        self._dispatch()

    def progress(self, job_id: bytes) -> int | None:
        """A live job's tokens so far (its record is written when an attempt
        starts and ends; the count streams in between); None if not live."""
        job = self._live.get(job_id)
        return None if job is None else job.machine.delivered + job.streaming

    def text(self, job_id: bytes) -> str | None:
        """A live job's answer so far; None if not live."""
        job = self._live.get(job_id)
        return None if job is None else job.machine.answer + "".join(job.chunks)

    def cancel(self, job_id: bytes) -> bool:
        """Stop a live job (it pays for the tokens delivered); False if it
        is not running on this node."""
        job = self._live.get(job_id)
        if job is None:
            return False
        job.stop()
        return True

    # ------------------------------------------------------------ one submission

    async def _run_submission(self, job: _Ticket, send: trio.MemorySendChannel[dict[str, Any]]) -> None:
        """The body of a ``submit``, as a task of the node's nursery: it must
        never raise (that would stop the node), and a reader that went away
        cancels the job instead of breaking it."""

        def emit(event: dict[str, Any]) -> None:
            try:
                send.send_nowait(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                job.stop()  # nobody is reading: stop the job, pay for what was delivered

        async with send:
            try:
                final = await self._drive(job, emit)
            except Exception as exc:  # noqa: BLE001 - a bug must not take the node down
                log.exception("job submission failed")
                final = {"type": "error", "error": f"internal error: {exc!r}", "kind": type(exc).__name__}
                self._end_job(job, FAILED, f"internal error: {exc!r}")
            finally:
                # Also on shutdown (Cancelled): the record must not stay "running".
                self._leave_line(job)
                self._live.pop(job.job_id, None)
                if not self._record(job).final:
                    self._end_job(job, FAILED, INTERRUPTED)
            emit(final)

    async def _drive(self, job: _Ticket, emit: Emitter) -> dict[str, Any]:
        """Feed the machine and carry out its actions until it finishes;
        returns the final event."""
        actions: collections.deque[Action] = collections.deque(job.machine.start(self.now_ms()))
        while True:
            while actions:
                action = actions.popleft()
                if isinstance(action, Finish):
                    self._end_job(job, action.outcome.status, action.reason)
                    return action.event
                actions.extend(await self._carry_out(job, action, emit))
            actions.extend(await self._next_input(job))

    async def _next_input(self, job: _Ticket) -> list[Action]:
        """Wait for what the machine takes next while it waits (a cancel, a
        slot, its deadline) and feed it."""
        machine = job.machine
        while True:
            if job.cancel.is_set() and not job.cancel_fed:
                return self._feed_cancel(job)
            if job.assigned is not None:
                return self._feed_slot(job)
            now = self.now_ms()
            deadline = machine.next_deadline()
            if deadline is not None and now >= deadline:
                return machine.timer(now, ahead=self.waitlist.ahead(job))
            job.wake = trio.Event()
            with trio.move_on_after(math.inf if deadline is None else (deadline - now) / 1000):
                await job.wake.wait()

    def _feed_cancel(self, job: _Ticket) -> list[Action]:
        job.cancel_fed = True
        return job.machine.cancel(self.now_ms())

    def _feed_slot(self, job: _Ticket) -> list[Action]:
        choice, job.assigned = job.assigned, None
        assert choice is not None
        job.slot = choice
        offer = choice.offer
        return job.machine.slot_assigned(self.now_ms(), provider=offer.provider, price_in=offer.price_in,
                                         price_out=offer.price_out)

    async def _carry_out(self, job: _Ticket, action: Action, emit: Emitter) -> list[Action]:
        """One action; returns what the machine said to the input it fed, if any."""
        if isinstance(action, Emit):
            emit(action.event)
        elif isinstance(action, JoinLine):
            return self._join_line(job)
        elif isinstance(action, RunAttempt):
            return await self._attempt(job, action, emit)
        elif isinstance(action, EndAttempt):
            result, job.result = job.result, None
            self._save(end_attempt(
                self._record(job), action.note, hold_id=result.hold_id if result is not None else None,
                release=result.release if result is not None else "", paid=result.cost if result is not None else None,
                cost=action.cost, tokens_out=action.tokens_out, tokens_in=action.tokens_in), None)
        elif isinstance(action, RecordQueued):
            self._save(advance(self._record(job), QUEUED, self.now_ms()), None)
        elif isinstance(action, RecordSuccess):
            self.history.record_success(action.provider, self.now_ms(), action.ttft_ms, action.tokens_per_s)
        elif isinstance(action, RecordFailure):
            self.history.record_failure(action.provider, self.now_ms(), action.reason)
        elif isinstance(action, MarkBusy):
            offer = self.offers.get(action.provider)
            self.waitlist.mark_busy(action.provider, offer.seq if offer is not None else 0, self.now_ms())
        elif isinstance(action, GiveBackSlot):
            job.slot = None
            self._slot_freed(action.provider)
        elif isinstance(action, LeaveLine):
            self._leave_line(job)
        elif isinstance(action, StopAttempt):
            job.cancel.set()
        else:  # pragma: no cover - every action is handled above
            raise AssertionError(f"unknown action {action!r}")
        return []

    def _join_line(self, job: _Ticket) -> list[Action]:
        if job.cancel.is_set() and not job.cancel_fed:
            return self._feed_cancel(job)  # no slot for a job being stopped
        self.waitlist.join(job, job.order)
        self._dispatch()
        if job.assigned is not None:
            return self._feed_slot(job)
        now = self.now_ms()
        return job.machine.in_line(now, position=self.waitlist.position(job), offers=self._others_offers(now))

    async def _attempt(self, job: _Ticket, run: RunAttempt, emit: Emitter) -> list[Action]:
        """Run one attempt in the slot the job was handed; feed its end."""
        machine = job.machine
        choice, job.slot = job.slot, None
        assert choice is not None and choice.provider == run.provider
        offer = choice.offer
        result: JobResult | None = None
        try:
            self._save(start_attempt(self._record(job), offer.provider, self.now_ms()), None)
            result = await self.attempts.run(
                offer, run.work, model=machine.model, job_id=machine.job_id,
                on_tokens=lambda text, count, channel=CONTENT: self._token(job, text, count, channel, emit),
                cancel=job.cancel)
            report = report_of(result)
        except InsufficientFunds as exc:  # our balance, not the provider's fault
            report = AttemptReport(AttemptOutcome.NO_FUNDS, str(exc))
        except P2PGPUError as exc:
            report = AttemptReport(AttemptOutcome.UNREACHABLE, str(exc))
        finally:
            self._slot_freed(offer.provider)
        job.result = result
        now = self.now_ms()
        actions: list[Action] = []
        if job.cancel.is_set() and not job.cancel_fed:
            actions += self._feed_cancel(job)  # StopAttempt: the attempt has stopped already
        actions += machine.attempt_ended(now, report, offers=self._others_offers(now))
        job.chunks.clear()  # the machine's answer has them now
        job.streaming = 0
        return actions

    def _token(self, job: _Ticket, text: str, count: int, channel: int, emit: Emitter) -> None:
        """One delivered frame: an event for the submitter (with its channel
        unless content, so content events are as they always were); only
        content is the job's answer (its record's text, ``text``, and what
        a failover continues)."""
        if not job.streaming and (record := self._record(job)).first_token_ms is None:
            self._save(replace(record, first_token_ms=self.now_ms()), None)
        if channel == CONTENT:
            job.chunks.append(text)
        job.streaming += count
        if channel == CONTENT:
            emit({"type": "token", "text": text})
        else:
            emit({"type": "token", "text": text, "channel": CHANNEL_NAMES[channel]})

    # ------------------------------------------------------------ the line

    def _others_offers(self, now: int) -> list[Offer]:
        return [o for o in self.offers.live(now) if o.provider != self.me]

    def _dispatch(self) -> None:
        """Hand free provider slots to waiting jobs, oldest first, and wake
        them. Synchronous: called whenever a slot may have come free (one of
        our attempts ended, an offer arrived) or a job joined the line."""
        if not self.waitlist:
            return
        now = self.now_ms()
        offers = self._others_offers(now)
        choices: dict[tuple[int, bytes], RankedOffer] = {}

        def candidates(job: _Ticket) -> list[bytes]:  # ranked lazily: only while some slot is free
            ranked = job.machine.candidates(offers, self.history, now)
            for r in ranked:
                choices[(job.order, r.provider)] = r
            return [r.provider for r in ranked]

        for job, provider in self.waitlist.dispatch(offers, candidates, now):
            job.assigned = choices[(job.order, provider)]
            job.wake.set()

    def _slot_freed(self, provider: bytes) -> None:
        self.waitlist.freed(provider)
        self._dispatch()

    def _leave_line(self, job: _Ticket) -> None:
        self.waitlist.leave(job)
        if job.assigned is not None:  # a slot was reserved for it: give it back
            provider, job.assigned = job.assigned.provider, None
            self._slot_freed(provider)
        if job.slot is not None:  # fed to a machine that did not use it
            provider, job.slot = job.slot.provider, None
            self._slot_freed(provider)

    # ------------------------------------------------------------ records

    def _record(self, job: _Ticket) -> JobRecord:
        record = self.records.get(job.job_id)
        assert record is not None, "a live job's record is never pruned"
        return record

    def _end_job(self, job: _Ticket, status: str, reason: str) -> None:
        record = self._record(job)
        if record.final:
            return
        text = job.machine.answer + "".join(job.chunks)
        stored, cut = cut_text(text)
        self._save(advance(record, status, self.now_ms(), reason=reason, text_chars=len(stored), text_cut=cut), text)

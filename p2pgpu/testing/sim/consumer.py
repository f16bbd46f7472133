"""A simulated node's consumer side: submissions, failover, the waitlist,
job streams, and releasing holds.

Real decision code driven here: the submission machine
(``core.submission.Submission``: wait for a slot, run, back off on "busy",
fail over and continue, give up; ``admit`` before it), the line
(``core.waitlist.Waitlist``: FIFO, slots in flight, busy marks,
``assign``), ``rank`` and ``ProviderHistory`` (``core.ranking``),
``OfferBook`` (``core.offers``), ``make_request`` and ``ConsumerSession``
(``core.jobs``), ``plan_release`` (``core.settlement``), and the ledger.

The driver is a transcription of the edges that feed them, kept thin:
``p2pgpu/consumer.py`` (``Consumer._drive``/``_carry_out``/``_join_line``/
``_attempt``/``_dispatch``/``report_of``), ``p2pgpu/jobrunner.py``
(``run_job``: the hold's amount and lifetime, ``_chain_context``, what an
attempt cost) and ``p2pgpu/holds.py`` (``Holds.find``/``track``/
``job_ended``/``run``: when to ask ``plan_release`` and how to carry it
out). Those are trio code; here the same steps run as simulated events.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from p2pgpu.core.codec import Tag, decode_signed
from p2pgpu.core.continuation import Work
from p2pgpu.core.jobs import (
    MAX_REQUEST_CONTEXT,
    R_BUSY,
    RECEIPT,
    TOKENS,
    VOUCHER,
    Completed,
    ConsumerSession,
    ConsumerState,
    Deliver,
    Failed,
    Prices,
    ReleaseHold,
    Send,
    decode_frame,
    job_cost,
    make_request,
)
from p2pgpu.core.ledger import BASIS_NAMES, HOLD, RELEASE, Entry
from p2pgpu.core.offers import Offer, OfferBook
from p2pgpu.core.ranking import ProviderHistory, RankedOffer
from p2pgpu.core.settlement import OpenHold, ReleaseNow, WaitUntil, plan_release
from p2pgpu.core.submission import (
    Action,
    AttemptOutcome,
    AttemptReport,
    Emit,
    EndAttempt,
    Finish,
    GiveBackSlot,
    JoinLine,
    LeaveLine,
    MarkBusy,
    Outcome,
    RecordFailure,
    RecordQueued,
    RecordSuccess,
    RunAttempt,
    StopAttempt,
    Submission,
    SubmissionConfig,
    admit,
    work_of,
)
from p2pgpu.core.waitlist import Waitlist
from p2pgpu.errors import InsufficientFunds, P2PGPUError
from p2pgpu.testing.sim.config import CREDIT_WINDOW, MODEL, SESSION_CONFIG, Plant
from p2pgpu.testing.sim.invariants import HoldFacts, JobStatus, SubmissionRecord
from p2pgpu.testing.sim.sessions import SessionEdge

if TYPE_CHECKING:
    from p2pgpu.testing.sim.host import NodeHost
    from p2pgpu.testing.sim.network import Stream

__all__ = ["ConsumerSide", "HoldSettler", "ConsumerJob", "Ticket"]

REQUEST_CONTEXT_WINDOW_MS = 10_000
BUSY_MARK_MS = 5_000
INTERRUPTED = "interrupted: the node stopped"
LIVE = (ConsumerState.REQUESTED, ConsumerState.ACCEPTED, ConsumerState.STREAMING)
_STATUS = {Outcome.COMPLETED: JobStatus.COMPLETED, Outcome.CANCELLED: JobStatus.CANCELLED}


def _open_hold(entry: Entry, *, not_before_ms: int) -> OpenHold:
    body = entry.body
    return OpenHold(entry.id, body.provider, body.amount, body.expiry_ms, not_before_ms,  # type: ignore[union-attr]
                    job_id=body.job_id)  # type: ignore[union-attr]


class _OverpayingSession(ConsumerSession):
    """Planted bug ``overpay-voucher``: every voucher pays a credit window
    ahead of the tokens received (capped by the hold)."""

    def _voucher(self, amount: int, now_ms: int):  # type: ignore[override]
        extra = job_cost(self.prices, 0, self.request.credit_window)
        return super()._voucher(min(amount + extra, self.request.hold.body.amount), now_ms)  # type: ignore[union-attr]


class _RestartingSubmission(Submission):
    """Planted bug ``double-pay-on-failover``: failover forgets what was
    delivered, so the next provider starts the answer again (and is paid
    again for its first part)."""

    def _fail_over(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        answer, delivered = self.answer, self.delivered
        self.answer, self.delivered = "", 0
        try:
            return super()._fail_over(*args, **kwargs)
        finally:
            self.answer, self.delivered = answer, delivered


@dataclass(eq=False)
class Ticket:
    """One submission of ours until it ends (``p2pgpu.consumer._Ticket``)."""

    machine: Submission
    record: SubmissionRecord
    order: int  # submission order: the line's FIFO key
    stop_paying_after: int | None  # vouchers sent before this consumer stops paying (a fault)
    assigned: RankedOffer | None = None  # handed out by the line, not yet fed to the machine
    slot: RankedOffer | None = None  # fed to the machine: the next attempt runs there
    job: ConsumerJob | None = None  # the running attempt
    cancel: bool = False  # the user asked to stop it
    cancel_fed: bool = False
    armed: int | None = None  # the machine's deadline a timer is set for
    wake_due: bool = False
    chunks: list[str] = field(default_factory=list)  # the running attempt's text so far


class ConsumerSide:
    """Everything a node does as a consumer, for one incarnation
    (``p2pgpu.consumer.Consumer`` and the parts of ``run_job`` it drives)."""

    def __init__(self, node: NodeHost) -> None:
        self.node = node
        self.world = node.world
        self.book = OfferBook(node.network_id)
        self.history = ProviderHistory()
        self.waitlist: Waitlist[Ticket] = Waitlist(busy_mark_ms=BUSY_MARK_MS)
        self.config = SubmissionConfig(queue_timeout_ms=node.timing.queue_timeout_ms)
        self.tickets: list[Ticket] = []
        self.next_order = 0
        self.settler = HoldSettler(node)

    # ---------------------------------------------------------------- offers

    def on_offer(self, wire: bytes) -> None:
        try:
            message = self.book.accept(wire, self.node.now())
        except P2PGPUError:
            return  # stale, a duplicate, or from before a restart: the book says no
        if isinstance(message, Offer) and message.provider != self.node.key.public_key:
            self.waitlist.offer_arrived(message.provider)
            self._dispatch()

    def _others(self, now: int) -> list[Offer]:
        me = self.node.key.public_key
        return [o for o in self.book.live(now) if o.provider != me]

    # ---------------------------------------------------------------- submitting (Consumer.submit)

    def submit(self, record: SubmissionRecord, job_id: bytes, stop_paying_after: int | None,
               cancel_after_ms: int | None) -> None:
        node = self.node
        now = node.now()
        work = work_of(record.prompt, None, None, record.max_tokens, None)
        try:
            admit(self._others(now), MODEL, work, history=self.history, now_ms=now,
                  spendable=node.replica.ledger.spendable(node.key.public_key))
        except P2PGPUError as exc:  # the API answers with this error; nothing runs
            self._end_record(record, JobStatus.FAILED, str(exc))
            return
        machine_type = _RestartingSubmission if node.plant is Plant.DOUBLE_PAY_ON_FAILOVER else Submission
        machine = machine_type(job_id, MODEL, work, retry=True, config=self.config, rng=self.world.rng)
        self.next_order += 1
        ticket = Ticket(machine, record, self.next_order, stop_paying_after)
        self.tickets.append(ticket)
        if cancel_after_ms is not None:
            node.later(cancel_after_ms, self.cancel, ticket)
        node.trace(f"job {record.number}: submitted, {record.max_tokens} tokens")
        self._run(ticket, machine.start(now))

    def cancel(self, ticket: Ticket) -> None:
        """The user cancels (``Consumer.cancel``): the running attempt stops
        now and pays for what was delivered (``run_job``'s cancel); the
        machine hears of it when it next takes an input."""
        if ticket.machine.done or ticket.cancel:
            return
        ticket.cancel = True
        self.node.trace(f"job {ticket.record.number}: the user cancels")
        job = ticket.job
        if job is not None and not job.done:
            if job.session.state in LIVE:
                job.apply(job.session.cancel(self.node.now()))
        else:
            self._wake(ticket)

    # ---------------------------------------------------------------- driving the machine (Consumer._drive)

    def _run(self, ticket: Ticket, actions: list[Action]) -> None:
        """Carry out ``actions`` in order, with what each input they feed
        returns; then set the machine's timer."""
        queue = collections.deque(actions)
        while queue:
            action = queue.popleft()
            if isinstance(action, Finish):
                self._finish(ticket, action)
                return
            queue.extend(self._carry_out(ticket, action))
        self._arm(ticket)

    def _carry_out(self, ticket: Ticket, action: Action) -> list[Action]:
        node = self.node
        if isinstance(action, JoinLine):
            return self._join_line(ticket)
        if isinstance(action, RunAttempt):
            return self._attempt(ticket, action)
        if isinstance(action, RecordSuccess):
            self.history.record_success(action.provider, node.now(), action.ttft_ms, action.tokens_per_s)
        elif isinstance(action, RecordFailure):
            self.history.record_failure(action.provider, node.now(), action.reason)
        elif isinstance(action, MarkBusy):
            offer = self.book.get(action.provider)
            self.waitlist.mark_busy(action.provider, offer.seq if offer is not None else 0, node.now())
        elif isinstance(action, GiveBackSlot):
            ticket.slot = None
            self._slot_freed(action.provider)
        elif isinstance(action, LeaveLine):
            self._leave_line(ticket)
        elif isinstance(action, StopAttempt):
            job = ticket.job
            if job is not None and not job.done and job.session.state in LIVE:
                job.apply(job.session.cancel(node.now()))
        elif isinstance(action, Emit):
            if node.world.tracing and action.event.get("type") in ("queued", "retry"):
                node.trace(f"job {ticket.record.number}: {action.event['type']}")
        elif not isinstance(action, (EndAttempt, RecordQueued)):  # job records are not simulated
            raise AssertionError(f"unknown action {action!r}")
        return []

    def _feed_cancel(self, ticket: Ticket) -> list[Action]:
        ticket.cancel_fed = True
        return ticket.machine.cancel(self.node.now())

    def _feed_slot(self, ticket: Ticket) -> list[Action]:
        choice, ticket.assigned = ticket.assigned, None
        assert choice is not None
        ticket.slot = choice
        offer = choice.offer
        return ticket.machine.slot_assigned(self.node.now(), provider=offer.provider, price_in=offer.price_in,
                                            price_out=offer.price_out)

    def _wake(self, ticket: Ticket) -> None:
        """Something the waiting machine takes may have come (``_next_input``)."""
        if not ticket.wake_due:
            ticket.wake_due = True
            self.node.later(0, self._woken, ticket)

    def _woken(self, ticket: Ticket) -> None:
        ticket.wake_due = False
        machine = ticket.machine
        if machine.done or ticket.job is not None:
            return
        if ticket.cancel and not ticket.cancel_fed:
            self._run(ticket, self._feed_cancel(ticket))
        elif ticket.assigned is not None:
            self._run(ticket, self._feed_slot(ticket))

    def _arm(self, ticket: Ticket) -> None:
        deadline = ticket.machine.next_deadline()
        if deadline is not None and deadline != ticket.armed and not ticket.machine.done:
            ticket.armed = deadline
            self.node.later_at(deadline, self._timer, ticket, deadline)

    def _timer(self, ticket: Ticket, deadline: int) -> None:
        if ticket.armed != deadline or ticket.machine.done:
            return
        ticket.armed = None
        self._run(ticket, ticket.machine.timer(self.node.now(), ahead=self.waitlist.ahead(ticket)))

    def _finish(self, ticket: Ticket, finish: Finish) -> None:
        self._leave_line(ticket)
        if ticket in self.tickets:
            self.tickets.remove(ticket)
        self._end_record(ticket.record, _STATUS.get(finish.outcome, JobStatus.FAILED), finish.reason)

    def _end_record(self, record: SubmissionRecord, status: JobStatus, reason: str) -> None:
        record.status, record.reason = status, reason
        self.node.trace(f"job {record.number}: {status.value}{': ' + reason if reason else ''}")

    def crashed(self) -> None:
        """The node died: its submissions end as the node records them on the way down."""
        for ticket in list(self.tickets):
            self._end_record(ticket.record, JobStatus.FAILED, INTERRUPTED)

    # ---------------------------------------------------------------- the line (Consumer._join_line, _dispatch)

    def _join_line(self, ticket: Ticket) -> list[Action]:
        if ticket.cancel and not ticket.cancel_fed:
            return self._feed_cancel(ticket)  # no slot for a job being stopped
        self.waitlist.join(ticket, ticket.order)
        self._dispatch()
        if ticket.assigned is not None:
            return self._feed_slot(ticket)
        now = self.node.now()
        return ticket.machine.in_line(now, position=self.waitlist.position(ticket), offers=self._others(now))

    def _dispatch(self) -> None:
        if not self.waitlist:
            return
        now = self.node.now()
        offers = self._others(now)
        choices: dict[tuple[int, bytes], RankedOffer] = {}

        def candidates(ticket: Ticket) -> list[bytes]:
            ranked = ticket.machine.candidates(offers, self.history, now)
            for r in ranked:
                choices[(ticket.order, r.provider)] = r
            return [r.provider for r in ranked]

        for ticket, provider in self.waitlist.dispatch(offers, candidates, now):
            ticket.assigned = choices[(ticket.order, provider)]
            self._wake(ticket)

    def _slot_freed(self, provider: bytes) -> None:
        self.waitlist.freed(provider)
        self._dispatch()

    def _leave_line(self, ticket: Ticket) -> None:
        self.waitlist.leave(ticket)
        if ticket.assigned is not None:
            provider, ticket.assigned = ticket.assigned.provider, None
            self._slot_freed(provider)
        if ticket.slot is not None:
            provider, ticket.slot = ticket.slot.provider, None
            self._slot_freed(provider)

    # ---------------------------------------------------------------- one attempt (Consumer._attempt, run_job)

    def _attempt(self, ticket: Ticket, run: RunAttempt) -> list[Action]:
        choice, ticket.slot = ticket.slot, None
        assert choice is not None and choice.provider == run.provider
        offer = choice.offer
        ticket.record.attempts += 1
        node = self.node
        node.trace(f"job {ticket.record.number}: attempt {run.attempt} on {self.world.name_of(offer.provider)}")
        try:
            ticket.job = self._start_job(ticket, offer, run.work)
        except InsufficientFunds as exc:
            return self._attempt_over(ticket, offer, AttemptReport(AttemptOutcome.NO_FUNDS, str(exc)))
        except P2PGPUError as exc:
            return self._attempt_over(ticket, offer, AttemptReport(AttemptOutcome.UNREACHABLE, str(exc)))
        return []

    def _start_job(self, ticket: Ticket, offer: Offer, work: Work) -> ConsumerJob:
        node = self.node
        provider_index = self.world.index_of(offer.provider)
        stream = self.world.open_stream(node.index, provider_index)
        if stream is None:
            raise P2PGPUError(f"provider {self.world.name_of(offer.provider)} is unreachable")
        stream.protocol = "job"
        prices = Prices(offer.price_in, offer.price_out)
        estimate = work.prompt_tokens_bound
        amount = max(1, job_cost(prices, estimate, work.max_tokens))
        hold_ms = min(node.timing.hold_ms, node.genesis.params.max_hold_ms)
        now = node.now()
        job_id = ticket.machine.job_id
        try:
            hold = node.replica.append(lambda lg: lg.hold(node.key, offer.provider, amount, now + hold_ms, job_id, now))[0]
        except BaseException:
            stream.close(0)
            raise
        signed, body = make_request(
            node.key, node.network_id, now, job_id=job_id, model=MODEL, hold=hold, prices=prices,
            max_prompt_tokens=estimate, max_tokens=work.max_tokens, credit_window=CREDIT_WINDOW,
            prompt=work.prompt, messages=work.messages)
        session_type = _OverpayingSession if node.plant is Plant.OVERPAY_VOUCHER else ConsumerSession
        session = session_type(node.key, node.network_id, signed, body, SESSION_CONFIG,
                               context=self._chain_context(hold, now))
        node.checks.hold_made(hold.id, HoldFacts(node.index, provider_index, prices, estimate, amount,
                                                 now + hold_ms))
        job = ConsumerJob(self, ticket, offer, stream, session, hold)
        stream.attach(0, job)
        job.apply(session.start(now))
        return job

    def _chain_context(self, hold: Entry, now: int) -> tuple[bytes, ...]:
        """jobrunner's ``_chain_context``: our recent entries before the hold."""
        ledger = self.node.replica.ledger
        recent = ledger.history(self.node.key.public_key, last=MAX_REQUEST_CONTEXT + 1)
        fresh_after = now - REQUEST_CONTEXT_WINDOW_MS
        return tuple(e.wire for e in recent if e.id != hold.id and e.timestamp_ms >= fresh_after)[-MAX_REQUEST_CONTEXT:]

    def job_ended(self, job: ConsumerJob) -> None:
        """An attempt's session is over: its hold goes to the settler (which
        releases it now if the rule allows), then the machine hears how it
        went (``run_job``'s end, ``report_of``, ``Consumer._attempt``)."""
        ticket, release, outcome = job.ticket, job.release, job.outcome
        assert release is not None and outcome is not None
        ticket.job = None
        released = self.settler.job_ended(release.hold_id, release.waiver, release.paid)
        cost = job.session.paid
        if released:
            settled = self.node.replica.ledger.hold_status(release.hold_id)
            if settled is not None:
                cost = settled[0]
        receipt = outcome.receipt
        if isinstance(outcome, Completed):
            kind, reason, retryable = AttemptOutcome.COMPLETED, "", False
        else:
            reason, retryable = outcome.reason, outcome.retryable
            if outcome.rejected:
                kind = AttemptOutcome.BUSY if outcome.code == R_BUSY else AttemptOutcome.REJECTED
            else:
                kind = AttemptOutcome.FAILED
        report = AttemptReport(
            kind, reason, retryable, job.tokens, "".join(ticket.chunks), cost,
            prompt_tokens=receipt.prompt_eval_count if receipt is not None else None,
            billed_tokens=receipt.output_tokens if receipt is not None else None,
            release="released" if released else "pending")
        ticket.chunks = []
        self._run(ticket, self._attempt_over(ticket, job.offer, report))

    def _attempt_over(self, ticket: Ticket, offer: Offer, report: AttemptReport) -> list[Action]:
        self._slot_freed(offer.provider)
        now = self.node.now()
        actions: list[Action] = []
        if ticket.cancel and not ticket.cancel_fed:
            actions += self._feed_cancel(ticket)  # StopAttempt: the attempt has stopped already
        return actions + ticket.machine.attempt_ended(now, report, offers=self._others(now))


class ConsumerJob(SessionEdge):
    """The edge of one ``ConsumerSession`` (jobrunner's ``_ConsumerJob``):
    feeds it frames and timers, carries out its actions."""

    role = "consumer"

    def __init__(self, side: ConsumerSide, ticket: Ticket, offer: Offer, stream: Stream, session: ConsumerSession,
                 hold: Entry) -> None:
        super().__init__()
        self.side = side
        self.node = side.node
        self.ticket = ticket
        self.offer = offer
        self.stream = stream
        self.session = session
        self.hold_id = hold.id
        self.tokens = 0
        self.vouchers_sent = 0
        self.release: ReleaseHold | None = None
        self.outcome: Completed | Failed | None = None
        self.done = False

    def apply(self, actions: list) -> None:
        if self.node.world.tracing:
            self._trace(actions)
        node = self.node
        for action in actions:
            if isinstance(action, Send):
                frame = decode_frame(action.data)
                if frame.type == VOUCHER:
                    stop = self.ticket.stop_paying_after
                    if stop is not None and self.vouchers_sent >= stop:
                        node.world.count("vouchers_withheld")
                        continue  # a consumer that stopped paying
                    amount = decode_signed(frame.args[0], network_id=node.network_id, tags=(Tag.VOUCHER,),
                                           verify=False).fields[1]
                    node.checks.voucher_sent(node, self.hold_id, amount)
                    self.vouchers_sent += 1
                self.stream.send(0, action.data)
            elif isinstance(action, Deliver):
                self.ticket.chunks.append(action.text)
                self.ticket.record.text.append(action.text)
                self.tokens += action.count
            elif isinstance(action, ReleaseHold):
                self.release = action
            elif isinstance(action, (Completed, Failed)):
                self.outcome = action
        if self.session.state is ConsumerState.DONE:
            if not self.done:
                self.done = True
                self.stream.close(0)
                self.side.job_ended(self)
            return
        self._arm()

    def on_frame(self, data: bytes) -> None:
        if self.done:
            return
        checks = self.node.checks
        try:
            frame = decode_frame(data)
            if frame.type == TOKENS:
                checks.tokens_arrived(self.hold_id, frame.args[2])
            elif frame.type == RECEIPT:
                receipt = decode_signed(frame.args[0], network_id=self.node.network_id, verify=False)
                checks.receipt_arrived(self.hold_id, receipt.fields[3])
            actions = self.session.receive(data, self.node.now())
        except P2PGPUError as exc:
            self.node.trace(f"job {self.ticket.record.number}: bad frame from the provider: {exc}")
            self.stream.cut()
            actions = self.session.connection_lost(self.node.now())
        self.apply(actions)

    def on_lost(self) -> None:
        if not self.done:
            self.apply(self.session.connection_lost(self.node.now()))


class HoldSettler:
    """Our open holds and the task that releases them (``p2pgpu.holds.Holds``:
    ``find``, ``track``, ``job_ended``, ``run``/``_settle``):
    ``plan_release`` decides, this loop reads the ledger and the clock and
    appends what it says."""

    def __init__(self, node: NodeHost) -> None:
        self.node = node
        self.open: dict[bytes, OpenHold] = {}
        self.pass_at: int | None = None

    def find_open(self) -> None:
        """At start: our holds never released (a job cut short by a crash)."""
        ledger = self.node.replica.ledger  # type: ignore[union-attr]
        for entry in ledger.history(self.node.key.public_key, last=1_000):
            if entry.kind == HOLD and not ledger.releases_of(entry.id):
                self.open[entry.id] = _open_hold(entry, not_before_ms=0)
        if self.open:
            self.wake(0)

    def on_applied(self, entries: list[Entry]) -> None:
        me = self.node.key.public_key
        providers = {hold.provider for hold in self.open.values()}
        wake = False
        for entry in entries:
            if entry.author == me and entry.kind == HOLD:
                if entry.id not in self.open:  # its job reports its end; until then (or expiry) the rule keeps away
                    self.open[entry.id] = _open_hold(entry, not_before_ms=entry.body.expiry_ms + 1)  # type: ignore[union-attr]
                    wake = True
            elif entry.author == me and entry.kind == RELEASE:
                self.open.pop(entry.body.hold_id, None)  # type: ignore[union-attr]
            elif entry.author in providers:
                wake = True
        if wake:
            self.wake()

    def job_ended(self, hold_id: bytes, waiver: bytes | None, paid: int) -> bool:
        """Its job is over: settle it now if the ledger allows. True if released."""
        hold = self.open.get(hold_id)
        if hold is not None:
            self.open[hold_id] = replace(hold, not_before_ms=0, waiver=waiver, paid=paid)
            self.run_pass()
        return bool(self.node.replica.ledger.releases_of(hold_id))  # type: ignore[union-attr]

    def wake(self, delay: int | None = None) -> None:
        at = self.node.world.now + (self.node.timing.settle_min_ms if delay is None else delay)
        if self.pass_at is None or at < self.pass_at:
            self.pass_at = at
            self.node.later(at - self.node.world.now, self._scheduled, at)

    def _scheduled(self, at: int) -> None:
        if self.pass_at == at:
            self.pass_at = None
            self.run_pass()

    def run_pass(self) -> None:
        node = self.node
        ledger = node.replica.ledger  # type: ignore[union-attr]
        grace = node.genesis.params.release_grace_ms
        ignore_claims = node.plant is Plant.RELEASE_IGNORES_CLAIM
        next_at: int | None = None
        for hold in list(self.open.values()):
            if hold.hold_id not in self.open:
                continue
            now = node.now()
            plan = plan_release(
                hold, now_ms=now, release_grace_ms=grace,
                claims={} if ignore_claims else ledger.claims_of(hold.hold_id),
                released=bool(ledger.releases_of(hold.hold_id)),
                provider_entry_after_expiry=None if ignore_claims else self._provider_entry_after(hold, now),
            )
            if plan is None:
                self.open.pop(hold.hold_id, None)
            elif isinstance(plan, WaitUntil):
                next_at = plan.at_ms if next_at is None else min(next_at, plan.at_ms)
            else:
                assert isinstance(plan, ReleaseNow)
                if not self._release(hold.hold_id, plan.basis, plan.ref):
                    retry = now + node.timing.settle_retry_ms
                    if hold.hold_id in self.open:
                        self.open[hold.hold_id] = replace(self.open[hold.hold_id], not_before_ms=retry)
                    next_at = retry if next_at is None else min(next_at, retry)
        if self.open:
            idle_at = node.now() + node.timing.settle_idle_ms
            self.wake(max(0, min(idle_at, next_at if next_at is not None else idle_at) - node.now()))

    def _release(self, hold_id: bytes, basis: int, ref: bytes) -> bool:
        node = self.node
        node.checks.release_decided(node, hold_id, basis)
        try:
            node.replica.append(lambda lg: lg.release(node.key, hold_id, basis, ref, node.now()))  # type: ignore[union-attr]
        except P2PGPUError as exc:
            node.trace(f"release of hold {hold_id.hex()[:8]} ({BASIS_NAMES[basis]}) refused: {exc}")
            return False
        node.trace(f"released hold {hold_id.hex()[:8]} ({BASIS_NAMES[basis]})")
        return True

    def _provider_entry_after(self, hold: OpenHold, now: int) -> bytes | None:
        if now <= hold.expiry_ms:
            return None
        ledger = self.node.replica.ledger  # type: ignore[union-attr]
        head = ledger.head(hold.provider)
        if head is None:
            return None
        entry = ledger.get_entry(head[1])
        return entry.id if entry is not None and entry.timestamp_ms > hold.expiry_ms else None

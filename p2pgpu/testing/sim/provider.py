"""A simulated node's provider side: admission, the simulated Ollama, job
streams, durable vouchers and claims.

Real decision code driven here: ``ProviderSession`` (``core.jobs``) with
``durable_vouchers``, ``admission_refusal``, ``KeptVoucher`` bytes
(``core.jobrecords``), ``plan_claim`` (``core.settlement``) and the ledger.

Re-implemented here because it lives in trio modules (``p2pgpu/jobrunner.py``
``ProviderService._admission``/``_ProviderJob``, ``p2pgpu/holds.py``
``KeptVouchers.run``): the admission sequence around
``admission_refusal`` (offer the hold and its context to the ledger, fetch
the consumer's chain when the hold waits, refuse a settled hold, re-check
the slot), the keeper that writes one voucher at a time and skips to the
newest, forgetting the kept voucher once claimed, and the restart loop
around ``plan_claim``.

The backend ("Ollama") is ``Generation``: a deterministic model whose one
answer to a prompt is fixed by the world, streamed in chunks of 1 to 3
tokens, that continues an answer from an assistant prefill (as Ollama
does), and that can fail or stall mid-stream (a fault).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from p2pgpu.core.jobrecords import KeptVoucher
from p2pgpu.core.jobs import (
    R_BUSY,
    R_HOLD,
    Claim,
    JobRequest,
    KeepVoucher,
    Pause,
    Prices,
    ProviderSession,
    ProviderState,
    RequestReceived,
    Resume,
    Send,
    StopGeneration,
    admission_refusal,
)
from p2pgpu.core.ledger import ApplyResult
from p2pgpu.core.settlement import ClaimNow, Claimed, PayLost, WaitUntil, plan_claim
from p2pgpu.errors import P2PGPUError
from p2pgpu.testing.sim.config import MODEL, SESSION_CONFIG, Plant
from p2pgpu.testing.sim.sessions import SessionEdge

if TYPE_CHECKING:
    from p2pgpu.testing.sim.network import Stream
    from p2pgpu.testing.sim.host import NodeHost

__all__ = ["ProviderService", "ProviderJob", "Generation", "answer_tokens"]

LIVE = (ProviderState.RUNNING, ProviderState.PAUSED, ProviderState.STOPPING)
GENERATING = (ProviderState.RUNNING, ProviderState.PAUSED)


def answer_tokens(length: int) -> list[str]:
    """The simulated model's answer: ``length`` distinct tokens. Distinct,
    so that an answer delivered twice or out of order shows."""
    return [f"w{i} " for i in range(length)]


class ProviderService:
    """Everything a node does as a provider, for one incarnation."""

    def __init__(self, node: NodeHost, prices: Prices, slots: int) -> None:
        self.node = node
        self.prices = prices
        self.slots = slots
        self.active = 0
        self.jobs: list[ProviderJob] = []
        self.config = replace(SESSION_CONFIG, durable_vouchers=True)  # it keeps vouchers, as the node does
        self.kept: dict[bytes, KeptVoucher] = {}
        self.offered: list[bytes] = []
        self.claimer_at: int | None = None

    def on_stream(self, stream: Stream, data: bytes) -> None:
        job = ProviderJob(self, stream)
        stream.attach(1, job)
        self.jobs.append(job)
        job.apply(job.session.open(self.node.now()))
        job.on_frame(data)

    def slots_changed(self, delta: int) -> None:
        self.active += delta
        self.node.offer_soon()

    def job_over(self, job: ProviderJob) -> None:
        if job in self.jobs:
            self.jobs.remove(job)

    # ---------------------------------------------------------------- kept vouchers (holds.KeptVouchers)

    def find_kept(self) -> None:
        """At start: vouchers kept for jobs a crash cut short."""
        if self.node.plant is Plant.FORGET_KEPT_VOUCHERS:
            self.node.kept_store.clear()  # the planted bug
        for job_id, raw in list(self.node.kept_store.items()):
            try:
                self.kept[job_id] = KeptVoucher.from_wire(raw, self.node.network_id)
            except P2PGPUError:
                del self.node.kept_store[job_id]
        if self.kept:
            self.node.trace(f"{len(self.kept)} kept voucher(s) to claim")
            self.wake_claimer(0)

    def wake_claimer(self, delay: int | None = None) -> None:
        if not self.kept:
            return
        at = self.node.world.now + (self.node.timing.settle_min_ms if delay is None else delay)
        if self.claimer_at is None or at < self.claimer_at:
            self.claimer_at = at
            self.node.later(at - self.node.world.now, self._claimer, at)

    def _claimer(self, at: int) -> None:
        if self.claimer_at != at:
            return
        self.claimer_at = None
        node = self.node
        replica = node.replica
        assert replica is not None
        ledger = replica.ledger
        next_at: int | None = None
        for job_id, kept in list(self.kept.items()):
            hold_id = kept.hold_id
            if not ledger.has_entry(hold_id) and hold_id not in self.offered:
                self.offered.append(hold_id)
                replica.offer([kept.hold.wire], durable=True)
            plan = plan_claim(amount=kept.amount, expiry_ms=kept.expiry_ms, now_ms=node.now(),
                              claims=ledger.claims_of(hold_id), hold_known=ledger.has_entry(hold_id))
            if isinstance(plan, ClaimNow):
                try:
                    replica.append(lambda lg: lg.claim(node.key, hold_id, kept.voucher, node.now()))
                except P2PGPUError as exc:
                    node.trace(f"claim of kept voucher {kept.amount} refused: {exc}")
                    plan = WaitUntil(min(kept.expiry_ms + 1, node.now() + node.timing.settle_retry_ms))
                else:
                    node.trace(f"claimed kept voucher {kept.amount} of hold {hold_id.hex()[:8]}")
                    plan = Claimed(kept.amount)
            if isinstance(plan, WaitUntil):
                next_at = plan.at_ms if next_at is None else min(next_at, plan.at_ms)
                continue
            if isinstance(plan, PayLost):
                node.trace(f"kept voucher of hold {hold_id.hex()[:8]}: {plan.reason}")
                node.world.count("pay_lost")
                node.checks.claim_lost(hold_id)
            node.kept_store.pop(job_id, None)
            del self.kept[job_id]
        if self.kept:
            idle_at = node.now() + node.timing.settle_idle_ms
            wait = min(idle_at, next_at if next_at is not None else idle_at) - node.now()
            self.wake_claimer(max(node.timing.settle_min_ms, wait))


class ProviderJob(SessionEdge):
    """The edge of one ``ProviderSession`` (jobrunner's ``_ProviderJob``)."""

    role = "provider"

    def __init__(self, service: ProviderService, stream: Stream) -> None:
        super().__init__()
        self.service = service
        self.node = service.node
        self.stream = stream
        self.session = ProviderSession(self.node.key, self.node.network_id, service.config)
        self.generation: Generation | None = None
        self.holds_slot = False
        self.deciding = False
        self.keeping = False
        self.to_keep: KeepVoucher | None = None
        self.forget_after_keep = False
        self.done = False

    def apply(self, actions: list) -> None:
        if self.node.world.tracing:
            self._trace(actions)
        for action in actions:
            if isinstance(action, Send):
                self.stream.send(1, action.data)
            elif isinstance(action, RequestReceived):
                self._admit(action.request, action.context)
            elif isinstance(action, Pause):
                if self.generation is not None:
                    self.generation.paused = True
            elif isinstance(action, Resume):
                if self.generation is not None:
                    self.generation.resume()
            elif isinstance(action, StopGeneration):
                if self.generation is not None:
                    self.generation.stop()
            elif isinstance(action, KeepVoucher):
                self.to_keep = action
                if not self.keeping:
                    self._keep_next()
            elif isinstance(action, Claim):
                self._claim(action)
        if self.session.state is ProviderState.DONE:
            if not self.done:
                self.done = True
                self.stream.close(1)
                self.service.job_over(self)
            return
        self._arm()

    def on_frame(self, data: bytes) -> None:
        if self.done:
            return
        try:
            actions = self.session.receive(data, self.node.now())
        except P2PGPUError as exc:
            self.node.trace(f"job stream from node{self.stream.nodes[0]}: bad frame: {exc}")
            self.stream.cut()
            actions = self.session.connection_lost(self.node.now())
        self.apply(actions)

    def on_lost(self) -> None:
        if not self.done:
            self.apply(self.session.connection_lost(self.node.now()))

    # ---------------------------------------------------------------- admission (ProviderService._admission)

    def _admit(self, request: JobRequest, context: tuple[bytes, ...]) -> None:
        service, node = self.service, self.node
        refusal = admission_refusal(request, served_models={MODEL}, prices=service.prices,
                                    active=service.active, slots=service.slots)
        if refusal is not None:
            self._decide(request, refusal)
            return
        replica = node.replica
        assert replica is not None
        result = replica.offer([*context, request.hold.wire], durable=False)[-1]
        if isinstance(result, ApplyResult) and result.status == "waiting" and result.missing is not None:
            # The hold follows entries of the consumer's we lack: fetch them from it, a while at most.
            self.deciding = True
            consumer = node.world.index_of(request.consumer)
            replica.fetch(consumer, [result.missing], follow_up=True, done=lambda: self._fetched(request))
            node.later(node.timing.hold_fetch_ms, self._fetched, request)
            return
        if not isinstance(result, ApplyResult) or result.status not in ("applied", "duplicate"):
            self._decide(request, (R_HOLD, f"hold not valid on our ledger: {getattr(result, 'status', result)}"))
            return
        self._decide(request, None)

    def _fetched(self, request: JobRequest) -> None:
        if not self.deciding:
            return
        self.deciding = False
        if self.node.replica.ledger.has_entry(request.hold_id):  # type: ignore[union-attr]
            self._decide(request, None)
        else:
            self._decide(request, (R_HOLD, "hold not valid on our ledger: waiting"))

    def _decide(self, request: JobRequest, refusal: tuple[int, str] | None) -> None:
        service, node = self.service, self.node
        if self.done or self.session.state is not ProviderState.DECIDING:
            return
        ledger = node.replica.ledger  # type: ignore[union-attr]
        if refusal is None and (ledger.hold_status(request.hold_id) is not None or ledger.releases_of(request.hold_id)):
            refusal = (R_HOLD, "hold already settled")
        if refusal is None and service.active >= service.slots:
            refusal = (R_BUSY, "no free slot")
        now = node.now()
        if refusal is not None:
            node.trace(f"rejects a job of node{self.stream.nodes[0]}: {refusal[1]}")
            self.apply(self.session.reject(now, *refusal))
            return
        service.slots_changed(+1)
        self.holds_slot = True
        node.trace(f"accepts a job of node{self.stream.nodes[0]} ({request.max_tokens} tokens)")
        self.generation = Generation(self, request)
        self.apply(self.session.accept(now))
        self.generation.begin()

    def free_slot(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            self.service.slots_changed(-1)

    # ---------------------------------------------------------------- vouchers and the claim

    def _keep_next(self) -> None:
        action, self.to_keep = self.to_keep, None
        if action is None:
            self.keeping = False
            if self.forget_after_keep:
                self._forget()
            return
        self.keeping = True
        low, high = self.node.timing.keep_ms
        delay = self.node.world.rng.randint(low, high)
        self.node.later(delay, self._kept, action)
        self.node.world.risky(self.node.index, delay)

    def _kept(self, action: KeepVoucher) -> None:
        request = self.session.request
        assert request is not None
        self.node.kept_store[request.job_id] = KeptVoucher(request.job_id, request.model, request.hold,
                                                            action.voucher).to_wire()
        self.node.checks.voucher_kept(request.hold_id, action.amount)
        self.apply(self.session.voucher_kept(self.node.now(), action.amount))
        self._keep_next()

    def _claim(self, claim: Claim) -> None:
        node = self.node
        try:
            node.replica.append(lambda lg: lg.claim(node.key, claim.hold_id, claim.voucher, node.now()))  # type: ignore[union-attr]
        except P2PGPUError as exc:
            node.trace(f"claim of {claim.amount} from hold {claim.hold_id.hex()[:8]} refused: {exc}")
            node.world.count("claims_refused")
            node.checks.claim_lost(claim.hold_id)
            return
        node.trace(f"claims {claim.amount} from hold {claim.hold_id.hex()[:8]}")
        if self.keeping:
            self.forget_after_keep = True
        else:
            self._forget()

    def _forget(self) -> None:
        if self.session.request is not None:
            self.node.kept_store.pop(self.session.request.job_id, None)


class Generation:
    """The simulated Ollama for one job (jobrunner's ``_generate`` around it)."""

    def __init__(self, job: ProviderJob, request: JobRequest) -> None:
        self.job = job
        self.node = job.node
        world = self.node.world
        if request.messages is not None:
            prompt = request.messages[0][1]
            prefill = request.messages[-1][1] if request.messages[-1][0] == "assistant" else ""
        else:
            prompt, prefill = request.prompt or "", ""
        self.tokens = world.answer_for(prompt)
        self.pos = prefill.count(" ")  # the answer's tokens each end in one space
        self.end = min(len(self.tokens), self.pos + request.max_tokens)
        self.prompt_eval_count = len(prompt.split()) + len(prefill.split()) + 8
        self.eval_count = 0
        self.paused = False
        self.waiting = False
        self.stopped = False
        self.fault: tuple[str, int] | None = None
        profile = world.profile
        if not world.calm and profile.backend_fault and world.rng.random() < profile.backend_fault:
            self.fault = (world.rng.choice(("fail", "stall")), self.pos + world.rng.randint(0, max(0, self.end - self.pos)))

    def begin(self) -> None:
        self.node.later(self.node.world.rng.randint(10, 200), self.step)

    def _live(self) -> bool:
        return not self.stopped and not self.job.done and self.job.session.state in LIVE

    def step(self) -> None:
        if not self._live():
            return
        if self.paused:
            self.waiting = True
            return
        job, session, now = self.job, self.job.session, self.node.now()
        if self.fault is not None and self.pos >= self.fault[1]:
            kind = self.fault[0]
            self.node.trace(f"backend {'fails' if kind == 'fail' else 'stalls'} at token {self.pos}")
            if kind == "stall":
                return  # silent for ever; only a stop ends it
            self.stopped = True
            job.free_slot()
            job.apply(session.failed(now, "backend failed (simulated)"))
            return
        if self.pos >= self.end:
            self.stopped = True
            job.free_slot()
            job.apply(session.finished(now, self.prompt_eval_count, self.eval_count))
            return
        count = min(self.node.world.rng.randint(1, 3), self.end - self.pos)
        text = "".join(self.tokens[self.pos:self.pos + count])
        self.pos += count
        self.eval_count += count
        job.apply(session.tokens(now, text, count))
        low, high = self.node.timing.chunk_ms
        self.node.later(self.node.world.rng.randint(low, high), self.step)

    def resume(self) -> None:
        self.paused = False
        if self.waiting:
            self.waiting = False
            self.node.later(1, self.step)

    def stop(self) -> None:
        """StopGeneration: the stream ends; Ollama's counts are lost, input is not charged."""
        if self.stopped:
            return
        self.stopped = True
        self.node.later(1, self._stopped)

    def _stopped(self) -> None:
        job = self.job
        job.free_slot()
        if not job.done and job.session.state in LIVE:
            job.apply(job.session.finished(self.node.now(), 0, self.eval_count))

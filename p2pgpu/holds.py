"""Our holds until they are settled: the one owner of a hold's state.

Theory of operation
-------------------
A node keeps two kinds of hold state, both here and nowhere else:

- As consumer, ``Holds``: every hold of ours not yet released, as an
  ``OpenHold``, from the moment its HOLD is applied (``track``, fed by the
  replicator's ``on_applied``) until its RELEASE is. While its job runs the
  hold is left alone; the job's runner then reports what it got
  (``job_ended``: the provider's waiver if it gave one, our last voucher)
  and decides nothing. From then on ``p2pgpu.core.settlement.plan_release``,
  the one release rule, says when and on which basis (waiver, claim,
  provider entry after expiry, timeout) the hold is released; this class
  only reads the ledger and the clock and appends what the rule says.
  ``job_ended`` plans at once, so a waived hold, or one whose claim is
  already here, is back before the job's result is returned; ``run`` plans
  again on ledger applies and timers for the rest. Each release is
  reported through ``on_released`` (``HoldReleased``: what the ledger paid
  the provider from it), which the composition root connects to the job
  records, so a job's record says what its attempt really cost.
- As provider, ``KeptVouchers``: the newest voucher of each job we serve is
  made durable while tokens flow (``keep``), so a crash costs at most one
  credit window, and forgotten once its hold is claimed (``forget``). After
  a restart, ``run`` claims what the vouchers a crash left behind cover
  (``p2pgpu.core.settlement.plan_claim`` decides) and reports the outcome
  through ``on_settled`` (``PaySettled``).

Neither imports the consumer side, the provider's job records or the node:
they report through callbacks the composition root connects, so the import
graph stays a tree. Both run on the trio thread; the only awaits are
ledger appends and the job store's synced writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import trio

from p2pgpu.core.codec import Signed
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.jobrecords import KeptVoucher
from p2pgpu.core.jobs import JobRequest
from p2pgpu.core.ledger import BASIS_NAMES, HOLD, RELEASE, Entry, Ledger
from p2pgpu.core.settlement import (
    AwaitClaim, Claimed, ClaimNow, OpenHold, PayLost, ReleaseNow, ReleaseState, WaitUntil, plan_claim, plan_release,
)
from p2pgpu.core.units import format_coins
from p2pgpu.errors import P2PGPUError
from p2pgpu.jobstore import JobStore
from p2pgpu.replication import LedgerReplicator

log = logging.getLogger(__name__)

__all__ = ["SettleConfig", "HoldReleased", "Holds", "PaySettled", "KeptVouchers"]

NowMs = Callable[[], int]


@dataclass(frozen=True, slots=True)
class SettleConfig:
    """How often and how much the settling tasks look (the rules themselves
    are ``p2pgpu.core.settlement``'s and the network's genesis parameters)."""

    idle_s: float = 60.0  # plan again at least this often, even if nothing happened
    min_interval_s: float = 0.1  # after a pass: gathers a burst of ledger applies into one pass
    retry_ms: int = 30_000  # after an append the ledger refused
    max_open_holds: int = 10_000  # holds tracked at once; more are found again after a restart
    open_hold_scan: int = 1_000  # own entries read at start for holds never released
    claim_poll_s: float = 0.05  # ``job_ended(await_claim_s=...)``: how often to look for the claim


@dataclass(frozen=True, slots=True)
class HoldReleased:
    """A hold of ours is released: the ledger paid its provider ``payout``
    from it (less than our last voucher when the provider crashed before it
    kept that one). ``job_id``: the job it paid for."""

    job_id: bytes
    hold_id: bytes
    payout: int


class Holds:
    """Our open holds as consumer, and the task that releases them.

    ``on_released``: told of every release of ours that the ledger applied
    (see ``HoldReleased``). Without ``run`` (a bare ``run_job``),
    ``job_ended(await_claim_s=...)`` still releases one hold by the same
    rule, looking for the provider's claim for a while.
    """

    def __init__(self, ledger: Ledger, replicator: LedgerReplicator, key: NodeKey, *, now_ms: NowMs,
                 config: SettleConfig = SettleConfig(),
                 on_released: Callable[[HoldReleased], None] | None = None) -> None:
        self.ledger, self.replicator, self.key = ledger, replicator, key
        self.now_ms = now_ms
        self.config = config
        self.on_released = on_released
        self._open: dict[bytes, OpenHold] = {}
        self._releasing: set[bytes] = set()  # an append of its RELEASE is under way
        self._wakeup = trio.Event()

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, hold_id: object) -> bool:
        return hold_id in self._open

    def get(self, hold_id: bytes) -> OpenHold | None:
        return self._open.get(hold_id)

    # ------------------------------------------------------------ events in

    def find(self) -> None:
        """At start: our recent holds that were never released (a job cut
        short by a stop or a crash); nothing of ours runs yet, so each may
        be settled at once."""
        for entry in self.ledger.history(self.key.public_key, last=self.config.open_hold_scan):
            if entry.kind == HOLD and not self.ledger.releases_of(entry.id):
                self._open[entry.id] = _open_hold(entry, not_before_ms=0)
        if self._open:
            log.info("%d hold(s) of ours are still open; releasing them when the ledger allows", len(self._open))

    def track(self, entries: Iterable[Entry]) -> None:
        """Entries the ledger applied (the replicator's ``on_applied``): our
        holds open (left alone until their job ends or they expire), our
        releases close them, and any entry of one of their providers (a
        claim, an entry stamped after expiry) may let one be released."""
        me = self.key.public_key
        providers = {hold.provider for hold in self._open.values()}
        wake = False
        for entry in entries:
            if entry.author == me and entry.kind == HOLD:
                if entry.id not in self._open and len(self._open) < self.config.max_open_holds:
                    self._open[entry.id] = _open_hold(entry, not_before_ms=entry.body.expiry_ms + 1)  # type: ignore[union-attr]
                    wake = True
            elif entry.author == me and entry.kind == RELEASE:
                self._released(entry.body.hold_id)  # type: ignore[union-attr]
            elif entry.author in providers:
                wake = True
        if wake:
            self._wakeup.set()

    async def job_ended(self, ended: OpenHold, *, await_claim_s: float = 0.0) -> ReleaseState:
        """The job that placed ``ended.hold_id`` is over, and ``ended``
        carries what it got (``waiver``, ``paid``). Releases the hold now
        if the rule allows, else leaves it to ``run``; says which.

        ``await_claim_s``: while the rule says the provider's claim is due
        (``AwaitClaim``), look for it this long before answering "pending"
        (for a caller with no ``run`` task; the node's task is woken by the
        ledger instead)."""
        if ended.hold_id not in self._open and self.ledger.releases_of(ended.hold_id):
            return ReleaseState.RELEASED
        known = self._open.get(ended.hold_id)
        hold = replace(known or ended, not_before_ms=0, waiver=ended.waiver, paid=ended.paid,
                       job_id=ended.job_id if known is None or known.job_id is None else known.job_id)
        self._open[hold.hold_id] = hold
        deadline = trio.current_time() + await_claim_s
        while True:
            state, wait = await self._settle(hold)
            if state is ReleaseState.RELEASED or not isinstance(wait, AwaitClaim) \
                    or trio.current_time() >= deadline:
                break
            await trio.sleep(self.config.claim_poll_s)
            hold = self._open.get(hold.hold_id, hold)
        if state is ReleaseState.PENDING:
            self._wakeup.set()
        return state

    # ------------------------------------------------------------ the task

    async def run(self) -> None:
        """Release our open holds once the rule allows it. Wakes on ledger
        applies (``track``), job ends and timers."""
        while True:
            self._wakeup = trio.Event()
            next_at: int | None = None
            for hold_id in list(self._open):
                hold = self._open.get(hold_id)  # an earlier append may have closed it
                if hold is None:
                    continue
                _, wait = await self._settle(hold)
                if wait is not None:
                    next_at = wait.at_ms if next_at is None else min(next_at, wait.at_ms)
            wait_s = self.config.idle_s if next_at is None else \
                min(self.config.idle_s, max(0.0, (next_at - self.now_ms()) / 1000))
            with trio.move_on_after(wait_s):
                await self._wakeup.wait()
            await trio.sleep(self.config.min_interval_s)

    # ------------------------------------------------------------ inside

    async def _settle(self, hold: OpenHold) -> tuple[ReleaseState, WaitUntil | None]:
        """Ask the rule about ``hold`` and carry it out: released (None) or
        pending with when to look again."""
        now = self.now_ms()
        plan = plan_release(
            hold, now_ms=now, release_grace_ms=self.ledger.params.release_grace_ms,
            claims=self.ledger.claims_of(hold.hold_id), released=bool(self.ledger.releases_of(hold.hold_id)),
            provider_entry_after_expiry=self._provider_entry_after(hold, now),
        )
        if plan is None:
            self._released(hold.hold_id)
            return ReleaseState.RELEASED, None
        if isinstance(plan, WaitUntil):
            return ReleaseState.PENDING, plan
        assert isinstance(plan, ReleaseNow)
        if hold.hold_id in self._releasing:  # the other path is appending it now
            return ReleaseState.PENDING, WaitUntil(now + self.config.retry_ms)
        self._releasing.add(hold.hold_id)
        try:
            await self.replicator.append(
                lambda ledger: ledger.release(self.key, hold.hold_id, plan.basis, plan.ref, self.now_ms()))
        except P2PGPUError as exc:
            log.warning("release of hold %s failed: %s; trying again later", hold.hold_id.hex()[:8], exc)
            retry = self.now_ms() + self.config.retry_ms
            if hold.hold_id in self._open:
                self._open[hold.hold_id] = replace(self._open[hold.hold_id], not_before_ms=retry)
            return ReleaseState.PENDING, WaitUntil(retry)
        finally:
            self._releasing.discard(hold.hold_id)
        log.info("released hold %s (%s)", hold.hold_id.hex()[:8], BASIS_NAMES[plan.basis])
        if hold.hold_id in self._open:  # ``track`` did not hear of it (a bare ``run_job`` has no listener)
            self._released(hold.hold_id)
        return ReleaseState.RELEASED, None

    def _released(self, hold_id: bytes) -> None:
        """A RELEASE of ours is applied: the hold is closed; report what the
        ledger paid its provider from it."""
        hold = self._open.pop(hold_id, None)
        if self.on_released is None:
            return
        job_id = hold.job_id if hold is not None else None
        if job_id is None:  # not tracked (from before a restart, or past the cap): its entry names the job
            entry = self.ledger.get_entry(hold_id)
            job_id = entry.body.job_id if entry is not None and entry.kind == HOLD else None  # type: ignore[union-attr]
        settled = self.ledger.hold_status(hold_id)
        if job_id is None or settled is None:
            return
        try:
            self.on_released(HoldReleased(job_id, hold_id, settled[0]))
        except Exception:  # noqa: BLE001 - bookkeeping must not stop settling
            log.exception("on_released callback failed")

    def _provider_entry_after(self, hold: OpenHold, now: int) -> bytes | None:
        """The provider's newest entry, if it is stamped after the hold's expiry."""
        if now <= hold.expiry_ms:
            return None
        head = self.ledger.head(hold.provider)
        if head is None:
            return None
        entry = self.ledger.get_entry(head[1])
        return entry.id if entry is not None and entry.timestamp_ms > hold.expiry_ms else None


def _open_hold(entry: Entry, *, not_before_ms: int) -> OpenHold:
    body = entry.body
    return OpenHold(entry.id, body.provider, body.amount, body.expiry_ms, not_before_ms,  # type: ignore[union-attr]
                    job_id=body.job_id)  # type: ignore[union-attr]


# ====================================================================== provider


@dataclass(frozen=True, slots=True)
class PaySettled:
    """A voucher kept for a job a crash or stop cut short is settled: we
    ``claimed`` that much, or the pay was ``lost`` (why)."""

    kept: KeptVoucher
    claimed: int = 0
    lost: str = ""


class KeptVouchers:
    """The provider's newest voucher per served job, made durable, and the
    task that claims what a crash left behind.

    ``keep`` and ``forget`` are ``ProviderService``'s ``keep_voucher`` and
    ``forget_voucher``. ``find`` reads, at start and before we serve
    anything, the vouchers a crash or stop left (a job that ended claimed
    its own); ``run`` claims them and reports each through ``on_settled``.
    """

    def __init__(self, ledger: Ledger, replicator: LedgerReplicator, key: NodeKey, job_store: JobStore, *,
                 now_ms: NowMs, config: SettleConfig = SettleConfig(),
                 on_settled: Callable[[PaySettled], None] | None = None) -> None:
        self.ledger, self.replicator, self.key, self.job_store = ledger, replicator, key, job_store
        self.now_ms = now_ms
        self.config = config
        self.on_settled = on_settled
        self._kept: dict[bytes, KeptVoucher] = {}  # vouchers of jobs a crash cut short, to claim
        self._wakeup = trio.Event()

    def __len__(self) -> int:
        return len(self._kept)

    async def keep(self, request: JobRequest, voucher: Signed) -> None:
        """A served job's newest voucher, written synced to the job store by
        a worker thread (returns once it is durable)."""
        kept = KeptVoucher(request.job_id, request.model, request.hold, voucher).to_wire()
        await trio.to_thread.run_sync(self.job_store.keep_voucher, request.job_id, kept)

    def forget(self, job_id: bytes) -> None:
        """Its hold is claimed: the kept voucher may go."""
        self.job_store.forget_voucher(job_id)

    def find(self) -> None:
        for job_id, raw in self.job_store.kept_vouchers():
            try:
                self._kept[job_id] = KeptVoucher.from_wire(raw, self.ledger.network_id)
            except P2PGPUError as exc:
                log.warning("job store: dropping the damaged kept voucher of job %s: %s", job_id.hex()[:16], exc)
                self.job_store.forget_voucher(job_id)
        if self._kept:
            log.info("%d job(s) we served were cut short; claiming what their vouchers cover", len(self._kept))

    def wake(self) -> None:
        """The ledger changed: a hold a kept voucher waits for may have come."""
        if self._kept:
            self._wakeup.set()

    async def run(self) -> None:
        """CLAIM what the kept vouchers cover and report the outcomes. A hold
        our ledger lost with the crash is offered again from the kept copy;
        if it still waits for the consumer's earlier entries, sync brings
        them. Ends once every kept voucher is settled."""
        offered: set[bytes] = set()
        while self._kept:
            self._wakeup = trio.Event()
            next_at: int | None = None
            for job_id, kept in list(self._kept.items()):
                hold_id = kept.hold_id
                if not self.ledger.has_entry(hold_id) and hold_id not in offered:
                    offered.add(hold_id)
                    await self.replicator.offer([kept.hold.wire])
                plan = plan_claim(amount=kept.amount, expiry_ms=kept.expiry_ms, now_ms=self.now_ms(),
                                  claims=self.ledger.claims_of(hold_id), hold_known=self.ledger.has_entry(hold_id))
                if isinstance(plan, ClaimNow):
                    plan = await self._claim(job_id, kept)
                if isinstance(plan, WaitUntil):
                    next_at = plan.at_ms if next_at is None else min(next_at, plan.at_ms)
                    continue
                if isinstance(plan, PayLost):
                    log.warning("job %s: %s", job_id.hex()[:8], plan.reason)
                settled = PaySettled(kept, claimed=plan.amount) if isinstance(plan, Claimed) \
                    else PaySettled(kept, lost=plan.reason)
                if self.on_settled is not None:
                    try:
                        self.on_settled(settled)
                    except Exception:  # noqa: BLE001 - bookkeeping must not stop claiming
                        log.exception("on_settled callback failed")
                self.job_store.forget_voucher(job_id)
                del self._kept[job_id]
            if self._kept:
                wait_s = self.config.idle_s if next_at is None else \
                    min(self.config.idle_s, max(0.0, (next_at - self.now_ms()) / 1000))
                with trio.move_on_after(wait_s):
                    await self._wakeup.wait()
                await trio.sleep(self.config.min_interval_s)

    async def _claim(self, job_id: bytes, kept: KeptVoucher) -> Claimed | WaitUntil:
        hold_id = kept.hold_id
        try:
            await self.replicator.append(
                lambda ledger: ledger.claim(self.key, hold_id, kept.voucher, self.now_ms()))
        except P2PGPUError as exc:
            log.warning("claim of hold %s for %s coins failed: %s; trying again later",
                        hold_id.hex()[:8], format_coins(kept.amount), exc)
            return WaitUntil(min(kept.expiry_ms + 1, self.now_ms() + self.config.retry_ms))
        log.info("claimed %s coins from hold %s of job %s, cut short by our stop",
                 format_coins(kept.amount), hold_id.hex()[:8], job_id.hex()[:8])
        return Claimed(kept.amount)

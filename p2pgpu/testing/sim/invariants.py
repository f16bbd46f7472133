"""What must hold in every simulated run, and the bookkeeping to check it.

Each invariant is a pure function of values (``*_error`` functions return
None or what is wrong), so a test can hand one a made-up violation and see
it caught. ``Checks`` is the simulator's omniscient observer: it records what
the network carried (vouchers a consumer sent, tokens that reached it,
receipts) and calls the pure checks during the run and at its end. The first
violation ends the run (``InvariantBroken``): the same seed then stops at the
same event, which is what makes ``--replay`` reproduce it exactly.

During the run:

- ``conservation``: on every replica, after every acknowledged batch,
  Σ(balance + held + pending_in) == minted (allocations + MINTs).
- ``entry-refused``: a replica refused an entry its author made (honest
  authors only make valid entries; validity is the same on every replica).
- ``voucher-above-delivered``: a consumer's voucher for a hold is at most
  ``job_cost`` of the output tokens that reached it on that job's stream
  (plus the receipt's input tokens, capped by the request, once it has the
  receipt): a consumer pays for delivered tokens only.
- ``release-voids-known-claim``: a consumer released a hold on any basis but
  the claim while its own ledger held the provider's CLAIM of it (that
  voids the claim: the provider loses pay for tokens it delivered).
- ``hold-locked``: once the network is whole, no hold stays unreleased on
  its consumer's ledger past max(expiry + grace, heal) + slack.

At the end (everything healed and restarted, run to quiescence):

- ``replicas-agree``: every replica's state hash is the same.
- ``conservation`` / ``accounts``: again, and no negative balance, held or
  pending amount, no frozen account (honest nodes never fork), nothing held.
- ``holds-settled``: every HOLD is released (payout + refund = amount).
- ``claim-bound``: every hold paid out at most the largest voucher its
  consumer sent for it, at most the hold, and at most the cost of the tokens
  delivered under it.
- ``kept-voucher-paid``: a provider is paid at least the newest voucher
  it made durable for a hold, unless the pay was lost by the rules (its
  claim came after the hold's expiry, or a release on time alone won over a
  claim its consumer never saw).
- ``jobs-ended``: every submission ended completed, failed with a reason,
  or cancelled; no job session is still open anywhere.
- ``one-answer``: what a submission delivered, over all its attempts, is a
  prefix of its one answer (the whole answer when completed), never more
  tokens than asked for.
- ``quiescence``: the run settled before its bound.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from p2pgpu.core.jobs import Prices, job_cost
from p2pgpu.core.ledger import BASIS_CLAIM, BASIS_NAMES, BASIS_TIMEOUT, HOLD, AccountState, decode_entry
from p2pgpu.testing.sim.config import START_MS

if TYPE_CHECKING:
    from p2pgpu.testing.sim.host import NodeHost
    from p2pgpu.testing.sim.network import World

__all__ = [
    "Violation", "InvariantBroken", "JobStatus", "HoldFacts", "SubmissionRecord", "Checks",
    "conservation_error", "account_errors", "voucher_bound", "voucher_error", "release_error",
    "replicas_error", "payout_error", "kept_error", "answer_error", "job_end_error",
]


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant: which, what exactly, and when (simulated ms since the start)."""

    invariant: str
    detail: str
    time_ms: int


class InvariantBroken(Exception):
    """Raised inside the event loop at the first violation; ends the run."""

    def __init__(self, violation: Violation) -> None:
        super().__init__(f"{violation.invariant}: {violation.detail}")
        self.violation = violation


class JobStatus(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class HoldFacts:
    """What the network showed about one hold's job (the observer's count,
    not the sessions')."""

    consumer: int
    provider: int
    prices: Prices
    max_prompt_tokens: int
    amount: int
    expiry_ms: int
    delivered: int = 0  # output tokens in TOKENS frames that reached the consumer
    receipt_prompt: int | None = None  # the receipt's prompt_eval_count, once it arrived
    max_voucher: int = 0  # the largest voucher the consumer sent

    @property
    def bound(self) -> int:
        return voucher_bound(self.prices, self.max_prompt_tokens, self.delivered, self.receipt_prompt)


@dataclass(slots=True)
class SubmissionRecord:
    """One job a user submitted, as the user sees it."""

    number: int
    consumer: int
    prompt: str
    max_tokens: int
    answer: list[str]  # the model's one answer to the prompt, token by token
    status: JobStatus | None = None
    reason: str = ""
    text: list[str] = field(default_factory=list)  # what reached the user, over all attempts
    attempts: int = 0


# ---------------------------------------------------------------- pure checks


def conservation_error(total: int, minted: int) -> str | None:
    if total != minted:
        return f"balances + held + pending = {total}, minted = {minted} (difference {total - minted})"
    return None


def account_errors(accounts: Iterable[AccountState], *, settled: bool) -> list[str]:
    """Negative amounts or frozen accounts (``settled``: nothing may be held either)."""
    errors = []
    for account in accounts:
        who = account.public_key.hex()[:8]
        if account.balance < 0 or account.held < 0 or account.pending_in < 0:
            errors.append(f"account {who}: balance {account.balance}, held {account.held}, pending {account.pending_in}")
        if account.frozen is not None:
            errors.append(f"account {who} is frozen ({account.frozen})")
        if settled and account.held:
            errors.append(f"account {who} still holds {account.held}")
    return errors


def voucher_bound(prices: Prices, max_prompt_tokens: int, delivered: int, receipt_prompt: int | None) -> int:
    """The most a consumer may owe for a job: its delivered output tokens,
    plus (once it holds the receipt) the reported input tokens, capped."""
    prompt = 0 if receipt_prompt is None else min(receipt_prompt, max_prompt_tokens)
    return job_cost(prices, prompt, delivered)


def voucher_error(amount: int, bound: int, hold_amount: int) -> str | None:
    if amount > bound:
        return f"voucher of {amount} exceeds the cost of the delivered tokens ({bound})"
    if amount > hold_amount:
        return f"voucher of {amount} exceeds the hold of {hold_amount}"
    return None


def release_error(basis: int, known_claims: dict[bytes, int]) -> str | None:
    if basis != BASIS_CLAIM and known_claims:
        amounts = ", ".join(str(a) for a in known_claims.values())
        return f"released on basis {BASIS_NAMES.get(basis, basis)} while holding the provider's claim ({amounts})"
    return None


def replicas_error(hashes: list[tuple[str, bytes]]) -> str | None:
    distinct = {h for _, h in hashes}
    if len(distinct) > 1:
        return "state hashes differ: " + ", ".join(f"{name} {h.hex()[:12]}" for name, h in hashes)
    return None


def payout_error(amount: int, payout: int, refund: int, max_voucher: int, bound: int) -> str | None:
    if payout + refund != amount:
        return f"hold of {amount} not settled (payout {payout}, refund {refund})"
    if payout > max_voucher:
        return f"paid out {payout}, above the largest voucher sent ({max_voucher})"
    if payout > bound:
        return f"paid out {payout}, above the cost of the delivered tokens ({bound})"
    return None


def answer_error(text: str, answer: list[str], max_tokens: int, status: JobStatus | None) -> str | None:
    """``text`` must be a prefix of the one answer (cut at ``max_tokens``), all of it when completed."""
    whole = "".join(answer[:max_tokens])
    if not whole.startswith(text):
        return f"delivered {text[:60]!r}... is not a prefix of the answer {whole[:60]!r}..."
    if status is JobStatus.COMPLETED and text != whole:
        return f"completed with {len(text)} of the answer's {len(whole)} characters"
    return None


def kept_error(kept: int, payout: int, pay_lost: bool, deciding_basis: int | None) -> str | None:
    """A provider's durable voucher is paid unless the rules took the pay away."""
    if payout >= kept or pay_lost or deciding_basis == BASIS_TIMEOUT:
        return None
    return f"paid out {payout}, below the voucher of {kept} its provider kept"


def job_end_error(status: JobStatus | None, reason: str) -> str | None:
    if status is None:
        return "never ended"
    if status is JobStatus.FAILED and not reason:
        return "failed without a reason"
    return None


# ---------------------------------------------------------------- the observer


class Checks:
    """Records what the network carried and checks the invariants."""

    def __init__(self, world: World, *, grace_ms: int, settle_slack_ms: int) -> None:
        self.world = world
        self.holds: dict[bytes, HoldFacts] = {}
        self.submissions: list[SubmissionRecord] = []
        self.grace_ms = grace_ms
        self.settle_slack_ms = settle_slack_ms
        self.healed_at: int | None = None
        self.kept: dict[bytes, int] = {}  # hold id -> the newest voucher amount its provider made durable
        self.pay_lost: set[bytes] = set()  # holds whose provider's claim was refused or came too late

    def fail(self, invariant: str, detail: str) -> None:
        raise InvariantBroken(Violation(invariant, detail, self.world.now - START_MS))

    # --- during the run

    def conservation(self, node: NodeHost) -> None:
        total, minted = node.replica.ledger.conservation()  # type: ignore[union-attr]
        error = conservation_error(total, minted)
        if error:
            self.fail("conservation", f"{node.name}: {error}")

    def entry_refused(self, node: NodeHost, wire: bytes, exc: Exception) -> None:
        try:
            what = repr(decode_entry(wire, node.network_id, verify=False))
        except Exception:  # noqa: BLE001 - only for the message
            what = f"{len(wire)} bytes"
        self.fail("entry-refused", f"{node.name} refused {what}: {type(exc).__name__}: {exc}")

    def hold_made(self, hold_id: bytes, facts: HoldFacts) -> None:
        self.holds[hold_id] = facts

    def tokens_arrived(self, hold_id: bytes, count: int) -> None:
        self.holds[hold_id].delivered += count

    def receipt_arrived(self, hold_id: bytes, prompt_eval_count: int) -> None:
        facts = self.holds[hold_id]
        if facts.receipt_prompt is None:
            facts.receipt_prompt = prompt_eval_count

    def voucher_sent(self, node: NodeHost, hold_id: bytes, amount: int) -> None:
        facts = self.holds[hold_id]
        error = voucher_error(amount, facts.bound, facts.amount)
        if error:
            self.fail("voucher-above-delivered", f"{node.name}, hold {hold_id.hex()[:8]}: {error}")
        facts.max_voucher = max(facts.max_voucher, amount)

    def voucher_kept(self, hold_id: bytes, amount: int) -> None:
        self.kept[hold_id] = max(self.kept.get(hold_id, 0), amount)

    def claim_lost(self, hold_id: bytes) -> None:
        self.pay_lost.add(hold_id)

    def release_decided(self, node: NodeHost, hold_id: bytes, basis: int) -> None:
        error = release_error(basis, node.replica.ledger.claims_of(hold_id))  # type: ignore[union-attr]
        if error:
            self.fail("release-voids-known-claim", f"{node.name}, hold {hold_id.hex()[:8]}: {error}")

    def holds_released_in_time(self, nodes: list[NodeHost]) -> None:
        """Once whole: each hold is released on its consumer's ledger by
        max(expiry + grace, heal) + slack (consumer's clock)."""
        if self.healed_at is None:
            return
        for hold_id, facts in self.holds.items():
            node = nodes[facts.consumer]
            if not node.up:
                continue
            ledger = node.replica.ledger  # type: ignore[union-attr]
            deadline = max(facts.expiry_ms + self.grace_ms, self.healed_at + node.skew) + self.settle_slack_ms
            if node.now() > deadline and ledger.has_entry(hold_id) and not ledger.releases_of(hold_id):
                self.fail("hold-locked", f"{node.name}: hold {hold_id.hex()[:8]} (expiry +{facts.expiry_ms - node.now()} ms) "
                                         "is still locked after expiry, grace and heal")

    # --- at the end

    def final(self, nodes: list[NodeHost], quiescent: bool, pending: str) -> None:
        ledgers = [(node.name, node.replica.ledger) for node in nodes]  # type: ignore[union-attr]
        error = replicas_error([(name, ledger.state_hash()) for name, ledger in ledgers])
        if error:
            self.fail("replicas-agree", error + (f" (not quiescent: {pending})" if not quiescent else ""))
        for name, ledger in ledgers:
            error = conservation_error(*ledger.conservation())
            if error:
                self.fail("conservation", f"{name}: {error}")
            errors = account_errors(ledger.accounts(), settled=True)
            if errors:
                self.fail("accounts", f"{name}: {'; '.join(errors)}")
        name, ledger = ledgers[0]
        holds = [e for account in ledger.accounts() for e in ledger.history(account.public_key) if e.kind == HOLD]
        for entry in holds:
            facts = self.holds.get(entry.id)
            if facts is None:
                self.fail("holds-settled", f"hold {entry.id.hex()[:8]} was made outside any job the observer saw")
            settled = ledger.hold_status(entry.id) or (0, 0)
            error = payout_error(facts.amount, settled[0], settled[1], facts.max_voucher, facts.bound)
            if error:
                self.fail("claim-bound" if "paid out" in error else "holds-settled", f"hold {entry.id.hex()[:8]}: {error}")
            releases = ledger.releases_of(entry.id)
            deciding = min(releases)[1] if releases else None
            error = kept_error(self.kept.get(entry.id, 0), settled[0], entry.id in self.pay_lost, deciding)
            if error:
                self.fail("kept-voucher-paid", f"hold {entry.id.hex()[:8]}: {error}")
        for record in self.submissions:
            error = job_end_error(record.status, record.reason)
            if error:
                self.fail("jobs-ended", f"job {record.number} of node{record.consumer}: {error}")
            error = answer_error("".join(record.text), record.answer, record.max_tokens, record.status)
            if error:
                self.fail("one-answer", f"job {record.number} of node{record.consumer}: {error}")
        if not quiescent:
            self.fail("quiescence", f"not settled by the end of the run: {pending}")

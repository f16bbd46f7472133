"""Getting our held coins back: when and how to RELEASE a hold of ours.

Theory of operation
-------------------
A consumer's job ends with a RELEASE of its hold (DESIGN §5, rules 3 and 4).
This module is the one rule for it; the node's holds owner
(``p2pgpu.holds``) reads the ledger and the clock, asks ``plan_release``,
and appends what it says. The job runner decides nothing: when a job ends
it only reports what it got (``OpenHold.waiver``: the provider's signed
waiver, if it gave one; ``OpenHold.paid``: our last voucher, the claim it
hints at). ``plan_release`` picks the first basis the ledger will accept:

1. the provider waived the hold (it rejected the job, or ended it before
   anything was owed) -> ``BASIS_WAIVER`` with the waiver (refund = all);
2. the provider's CLAIM is on our ledger -> ``BASIS_CLAIM`` naming it
   (refund = hold - claimed); a claim can arrive any time up to expiry;
3. the hold has expired and we hold a provider entry stamped after the
   expiry -> ``BASIS_PROVIDER_ENTRY`` naming it (rule 2 says no valid
   claim can follow; the ledger checks none came before);
4. expiry plus the network's release grace has passed -> ``BASIS_TIMEOUT``
   (the provider vanished);
5. otherwise wait: until expiry, or until the grace is over. New entries
   on the ledger (a claim, a provider entry) can change the answer sooner,
   so the owner plans again whenever it applies some. While the hold has
   not expired and we paid the provider something (``paid > 0``), its
   CLAIM is due any moment (a provider claims as the job ends), so the
   wait is an ``AwaitClaim``: worth watching the ledger closely for.

``not_before_ms`` keeps the rule away from a hold whose job still runs
(from the HOLD until the job reports its end, or the hold expires if it
never does: a job cut short by our own stop): releasing against an early
claim, or on a waiver, mid-job would end the job's payment under it.

What became of a hold, as job records and results show it, is a
``ReleaseState`` (the strings are the API's: "", "pending", "released").

The provider's side, ``plan_claim``: a job cut short by the provider's own
crash or stop left its newest *kept* voucher in the job store (the window
of ``p2pgpu.core.jobs`` counts from it). When the node starts again it
claims that voucher unless the hold is already claimed on our chain; a
CLAIM must be stamped no later than the hold's expiry (docs/ledger.md §3),
so after expiry the pay is lost, and the job's record says so.

Pure module: no I/O; time is a parameter.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from p2pgpu.core.ledger import BASIS_CLAIM, BASIS_PROVIDER_ENTRY, BASIS_TIMEOUT, BASIS_WAIVER

__all__ = [
    "ReleaseState", "OpenHold", "ReleaseNow", "WaitUntil", "AwaitClaim", "plan_release",
    "ClaimNow", "Claimed", "PayLost", "plan_claim",
]


class ReleaseState(enum.StrEnum):
    """What became of a consumer's hold, as its job record, the job's
    result and the local API show it. A ``StrEnum`` so the API's JSON and
    the stored records keep the same strings."""

    NONE = ""  # no hold yet, or its job has not ended
    PENDING = "pending"  # to be released once the provider's claim shows up or the hold expires
    RELEASED = "released"  # the unclaimed rest is back


@dataclass(frozen=True, slots=True)
class OpenHold:
    """A hold of ours not yet released."""

    hold_id: bytes
    provider: bytes
    amount: int
    expiry_ms: int
    not_before_ms: int = 0  # do nothing before this: its job may still run
    job_id: bytes | None = None  # the job it pays for (the HOLD entry names it)
    waiver: bytes | None = None  # the provider's signed waiver, reported by the job as it ended
    paid: int = 0  # our last voucher for it, reported by the job as it ended: what a claim will be


@dataclass(frozen=True, slots=True)
class ReleaseNow:
    """Append ``RELEASE(hold, basis, ref)`` now."""

    basis: int
    ref: bytes


@dataclass(frozen=True, slots=True)
class WaitUntil:
    """Nothing to do before ``at_ms`` unless the ledger changes first."""

    at_ms: int


@dataclass(frozen=True, slots=True)
class AwaitClaim(WaitUntil):
    """A ``WaitUntil`` whose provider's CLAIM is due any moment (we paid it
    something and the hold has not expired): a caller that cannot be woken
    by the ledger may poll for it a little while instead."""


def plan_release(
    hold: OpenHold,
    *,
    now_ms: int,
    release_grace_ms: int,
    claims: Mapping[bytes, int],
    released: bool,
    provider_entry_after_expiry: bytes | None = None,
) -> ReleaseNow | WaitUntil | None:
    """What to do about ``hold`` now; None once it is released. The
    bases, in order, are the module docstring's list.

    ``claims``: the provider's CLAIMs of the hold on our ledger (id ->
    amount). ``provider_entry_after_expiry``: the id of a provider entry
    stamped after the hold's expiry, if our ledger has one.
    """
    if released:
        return None
    if now_ms < hold.not_before_ms:
        return WaitUntil(hold.not_before_ms)
    if hold.waiver is not None:
        # Refunds all. A provider that also claimed has signed two things
        # that contradict each other; the ledger freezes it for that.
        return ReleaseNow(BASIS_WAIVER, hold.waiver)
    if claims:
        return ReleaseNow(BASIS_CLAIM, min(claims))  # any claim is valid; the smallest id is deterministic
    if now_ms <= hold.expiry_ms:
        # Nothing paid, no waiver: no claim can come (a claim needs a
        # voucher), so only expiry frees it.
        return AwaitClaim(hold.expiry_ms + 1) if hold.paid > 0 else WaitUntil(hold.expiry_ms + 1)
    if provider_entry_after_expiry is not None:
        return ReleaseNow(BASIS_PROVIDER_ENTRY, provider_entry_after_expiry)
    timeout_at = hold.expiry_ms + release_grace_ms + 1  # the ledger wants strictly after expiry + grace
    if now_ms >= timeout_at:
        return ReleaseNow(BASIS_TIMEOUT, b"")
    return WaitUntil(timeout_at)


@dataclass(frozen=True, slots=True)
class ClaimNow:
    """Append a CLAIM of the hold with the kept voucher now."""

    amount: int


@dataclass(frozen=True, slots=True)
class Claimed:
    """The hold is already claimed on our chain, for ``amount``: nothing to do."""

    amount: int


@dataclass(frozen=True, slots=True)
class PayLost:
    """The voucher can no longer be claimed: ``reason`` says why."""

    reason: str


def plan_claim(
    *,
    amount: int,
    expiry_ms: int,
    now_ms: int,
    claims: Mapping[bytes, int],
    hold_known: bool,
) -> ClaimNow | Claimed | PayLost | WaitUntil:
    """What a provider does about a voucher of ``amount`` it kept for a
    hold expiring at ``expiry_ms``. ``claims``: CLAIMs of the hold on our
    ledger (only its provider, we, can make them: id -> amount);
    ``hold_known``: our ledger holds the hold entry (a CLAIM must follow
    it; a crash can lose an entry applied shortly before, and then it waits
    for sync to bring it back)."""
    if claims:
        return Claimed(max(claims.values()))
    if now_ms > expiry_ms:
        return PayLost(f"the hold expired before its voucher of {amount} could be claimed")
    if not hold_known:
        return WaitUntil(expiry_ms + 1)
    return ClaimNow(amount)

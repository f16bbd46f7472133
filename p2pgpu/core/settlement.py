"""Getting our held coins back: when and how to RELEASE a hold of ours.

Theory of operation
-------------------
A consumer's job ends with a RELEASE of its hold (DESIGN §5, rules 3 and 4).
The job runner releases at once when the provider waived the hold or when
its CLAIM shows up within a few seconds; otherwise the hold is left
*pending* and the node's settling task finishes it later with
``plan_release``, which picks the first basis the ledger will accept:

1. the provider's CLAIM is on our ledger -> ``BASIS_CLAIM`` naming it
   (refund = hold - claimed); a claim can arrive any time up to expiry;
2. the hold has expired and we hold a provider entry stamped after the
   expiry -> ``BASIS_PROVIDER_ENTRY`` naming it (rule 2 says no valid
   claim can follow; the ledger checks none came before);
3. expiry plus the network's release grace has passed -> ``BASIS_TIMEOUT``
   (the provider vanished);
4. otherwise wait: until expiry, or until the grace is over. New entries
   on the ledger (a claim, a provider entry) can change the answer sooner,
   so the node plans again whenever it applies some.

``not_before_ms`` keeps the task away from a hold whose job may still be
settling it itself (the job runner's own release would race ours).

The provider's side, ``plan_claim``: a job cut short by the provider's own
crash or stop left its newest *kept* voucher in the job store (the window
of ``p2pgpu.core.jobs`` counts from it). When the node starts again it
claims that voucher unless the hold is already claimed on our chain; a
CLAIM must be stamped no later than the hold's expiry (docs/ledger.md §3),
so after expiry the pay is lost, and the job's record says so.

Pure module: no I/O; time is a parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from p2pgpu.core.ledger import BASIS_CLAIM, BASIS_PROVIDER_ENTRY, BASIS_TIMEOUT

__all__ = ["OpenHold", "ReleaseNow", "WaitUntil", "plan_release", "ClaimNow", "Claimed", "PayLost", "plan_claim"]


@dataclass(frozen=True, slots=True)
class OpenHold:
    """A hold of ours not yet released."""

    hold_id: bytes
    provider: bytes
    amount: int
    expiry_ms: int
    not_before_ms: int = 0  # do nothing before this (its job may still release it)


@dataclass(frozen=True, slots=True)
class ReleaseNow:
    """Append ``RELEASE(hold, basis, ref)`` now."""

    basis: int
    ref: bytes


@dataclass(frozen=True, slots=True)
class WaitUntil:
    """Nothing to do before ``at_ms`` unless the ledger changes first."""

    at_ms: int


def plan_release(
    hold: OpenHold,
    *,
    now_ms: int,
    release_grace_ms: int,
    claims: Mapping[bytes, int],
    released: bool,
    provider_entry_after_expiry: bytes | None = None,
) -> ReleaseNow | WaitUntil | None:
    """What to do about ``hold`` now; None once it is released.

    ``claims``: the provider's CLAIMs of the hold on our ledger (id ->
    amount). ``provider_entry_after_expiry``: the id of a provider entry
    stamped after the hold's expiry, if our ledger has one.
    """
    if released:
        return None
    if now_ms < hold.not_before_ms:
        return WaitUntil(hold.not_before_ms)
    if claims:
        return ReleaseNow(BASIS_CLAIM, min(claims))  # any claim is valid; the smallest id is deterministic
    if now_ms <= hold.expiry_ms:
        return WaitUntil(hold.expiry_ms + 1)
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

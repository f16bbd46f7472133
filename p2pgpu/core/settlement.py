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

Pure module: no I/O; time is a parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from p2pgpu.core.ledger import BASIS_CLAIM, BASIS_PROVIDER_ENTRY, BASIS_TIMEOUT

__all__ = ["OpenHold", "ReleaseNow", "WaitUntil", "plan_release"]


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

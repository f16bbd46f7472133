"""Waiting for a free provider slot: the consumer's side of admission.

Theory of operation
-------------------
A provider runs at most ``slots_total`` jobs at once and turns away the rest
(``R_BUSY``). Rather than send a job that will be turned away, the consumer
counts its own jobs in flight at each provider and keeps a job *waiting*
(queued) until one of its candidates has room. Two pure pieces:

``free_slots``: how many more of our jobs a provider will take now. Its
newest offer says ``slots_free`` of ``slots_total``; part of the used slots
may be our own jobs, and those we count exactly ourselves. So::

    others = slots_total - slots_free - ours_at_offer     (at least 0)
    free   = slots_total - others - ours_now              (at least 0)

where ``ours_at_offer`` is how many of our jobs were in flight there when
that offer arrived. Without it (0) this is the plain ``slots_free -
ours_now``. Using the offer's count of *other* consumers' jobs, rather than
its ``slots_free`` as is, lets our next job start the moment one of ours
ends instead of at the provider's next heartbeat; an estimate that is off
only costs a busy rejection, after which the job waits again.

``assign``: hand the free slots to the waiting jobs in FIFO order. Each job
lists its candidates best first; the oldest job takes its best candidate
with room, then the next job, and so on. A job that finds nothing keeps its
place; a younger job can only take a slot that no older job wanted, so no
job is ever overtaken for a slot it could have used.

Pure module: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

__all__ = ["free_slots", "assign"]

K = TypeVar("K", bound=Hashable)


def free_slots(slots_total: int, slots_free: int, ours_now: int, ours_at_offer: int = 0) -> int:
    """Jobs of ours the provider would still take (module docstring)."""
    others = max(0, slots_total - slots_free - ours_at_offer)
    return max(0, slots_total - others - ours_now)


def assign(waiting: Iterable[tuple[K, Sequence[bytes]]], room: Mapping[bytes, int]) -> list[tuple[K, bytes]]:
    """Pairs (job, provider) for the jobs that get a slot now, oldest first.

    ``waiting``: (job, candidate providers best first), oldest job first.
    ``room``: free slots per provider (missing means none). A provider is
    handed out at most as many times as it has room. ``waiting`` is read
    only while some room is left, so the caller may build it lazily.
    """
    left = {provider: free for provider, free in room.items() if free > 0}
    total = sum(left.values())
    given: list[tuple[K, bytes]] = []
    if total == 0:
        return given
    for job, candidates in waiting:
        for provider in candidates:
            if left.get(provider, 0) > 0:
                left[provider] -= 1
                total -= 1
                given.append((job, provider))
                break
        if total == 0:
            break
    return given

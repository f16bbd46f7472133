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

``Waitlist``: the line itself and the counts both need, in one owner: the
jobs waiting (FIFO by submission order, so a job back from a busy provider
keeps its place), our jobs in flight per provider, how many were there
when its newest offer came, and the providers that just said busy (they
count as full until their next offer, at most ``busy_mark_ms``: our count
of their slots was behind). ``dispatch`` hands the free slots out.

Pure module: no I/O; time is a parameter.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Generic, TypeVar

from p2pgpu.core.offers import Offer

__all__ = ["free_slots", "assign", "Waitlist"]

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


class Waitlist(Generic[K]):
    """This node's line for provider slots and its count of them (module
    docstring). ``K``: the caller's job handle (hashable, by identity)."""

    def __init__(self, *, busy_mark_ms: int = 5_000, max_tracked: int = 4096) -> None:
        self.busy_mark_ms = busy_mark_ms
        self.max_tracked = max_tracked
        self._line: list[tuple[int, K]] = []  # (submission order, job), oldest first
        self._inflight: collections.Counter[bytes] = collections.Counter()  # our jobs per provider
        self._at_offer: dict[bytes, int] = {}  # our jobs there when its newest offer came
        self._busy: dict[bytes, tuple[int, int]] = {}  # provider -> (offer seq, ms) of a busy answer

    def __len__(self) -> int:
        return len(self._line)

    def __contains__(self, job: object) -> bool:
        return any(other is job for _, other in self._line)

    def inflight(self, provider: bytes) -> int:
        """Our jobs running (or with a slot reserved) at ``provider``."""
        return self._inflight[provider]

    def join(self, job: K, order: int) -> None:
        """Into the line by ``order`` (submission order); already in: no change."""
        if job in self:
            return
        index = next((i for i, (o, _) in enumerate(self._line) if o > order), len(self._line))
        self._line.insert(index, (order, job))

    def leave(self, job: K) -> bool:
        """Out of the line; False if it was not in it."""
        for i, (_, other) in enumerate(self._line):
            if other is job:
                del self._line[i]
                return True
        return False

    def ahead(self, job: K) -> int:
        """Jobs ahead of ``job`` in the line (0 if it is not in it)."""
        return next((i for i, (_, other) in enumerate(self._line) if other is job), 0)

    def position(self, job: K) -> int:
        """``job``'s place in the line, 1 being next; 0 if it is not in it."""
        return next((i + 1 for i, (_, other) in enumerate(self._line) if other is job), 0)

    def room(self, offer: Offer, now_ms: int) -> int:
        """Jobs of ours ``offer``'s provider would take now."""
        provider = offer.provider
        busy = self._busy.get(provider)
        if busy is not None:
            seq, since = busy
            if offer.seq <= seq and now_ms - since < self.busy_mark_ms:
                return 0  # it said busy; wait for its next offer
            del self._busy[provider]
        return free_slots(offer.slots_total, offer.slots_free, self._inflight[provider], self._at_offer.get(provider, 0))

    def dispatch(self, offers: Iterable[Offer], candidates: Callable[[K], Sequence[bytes]],
                 now_ms: int) -> list[tuple[K, bytes]]:
        """Hand free slots to waiting jobs, oldest first (``assign``):
        ``candidates(job)`` lists a job's providers best first (asked only
        while some slot is free). Each job given a slot leaves the line and
        the slot counts as taken at once."""
        if not self._line:
            return []
        room = {o.provider: self.room(o, now_ms) for o in offers}
        given = assign(((job, candidates(job)) for _, job in list(self._line)), room)
        for job, provider in given:
            self.leave(job)
            self._inflight[provider] += 1  # reserved now, so the next job sees it taken
        return given

    def freed(self, provider: bytes) -> None:
        """A slot of ours at ``provider`` is free again (its job ended, or a
        reserved slot was not used)."""
        self._inflight[provider] -= 1
        if self._inflight[provider] <= 0:
            del self._inflight[provider]

    def mark_busy(self, provider: bytes, offer_seq: int, now_ms: int) -> None:
        """``provider`` said busy while its newest offer was ``offer_seq``."""
        self._busy[provider] = (offer_seq, now_ms)
        if len(self._busy) > self.max_tracked:
            self._busy = {p: b for p, b in self._busy.items() if now_ms - b[1] < self.busy_mark_ms}

    def offer_arrived(self, provider: bytes) -> None:
        """A new offer (or a withdrawal) of ``provider``: its slot count now
        includes our jobs in flight there."""
        self._at_offer[provider] = self._inflight[provider]
        if len(self._at_offer) > self.max_tracked:
            self._at_offer = {p: n for p, n in self._at_offer.items() if n or p in self._inflight}

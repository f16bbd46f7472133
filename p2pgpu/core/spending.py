"""The gateway's spending limit: how much of the owner's coins tools may spend.

Theory of operation
-------------------
The gateway (``p2pgpu.gateway``) lets any program that speaks Ollama's or
OpenAI's API spend the node owner's coins, possibly without a token (an
owner may choose tokenless loopback use, as Ollama works). So a limit
always applies, whoever asks: at most ``per_request`` base units for one
request, at most ``per_hour`` over any sliding hour.

A request cannot know its cost before it runs, but the job protocol bounds
it: a job never costs more than its ``max_price``. So each request first
*reserves* its bound (``reserve``): the per-request limit, or less when the
client asked for less, or less again when only that much of the hour's
budget is left. The job then runs with that reservation as its
``max_price``, and ``settle`` replaces the reservation with what the job
actually cost. Reservations count against the hour until settled, so
concurrent requests can never overrun it together. What a job cost stays
in the window for an hour from the moment it was settled.

A reservation of nothing is refused (``LimitReached``, which the gateway
answers with 429 naming the limit); so is one too small for the work, which
the gateway finds out from the network's prices (``refusal_for``).

Pure module: time is a parameter (``now_ms``), nothing here reads a clock.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

from p2pgpu.core.units import format_coins
from p2pgpu.errors import P2PGPUError

__all__ = ["SpendingLimits", "SpendingBudget", "Reservation", "LimitReached", "HOUR_MS"]

HOUR_MS = 3_600_000


class LimitReached(P2PGPUError):
    """A request would pass a spending limit; ``limit`` names which
    ("per_request" or "per_hour") and the message says it in coins."""

    def __init__(self, message: str, limit: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class SpendingLimits:
    """Base units: most for one request, most in any hour."""

    per_request: int
    per_hour: int

    def __post_init__(self) -> None:
        for name in ("per_request", "per_hour"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"spending limit {name} must be a non-negative integer, not {value!r}")


@dataclass(frozen=True, slots=True)
class Reservation:
    id: int
    amount: int  # the job's max_price
    bound_by: str  # what set the amount: "client", "per_request" or "per_hour"


@dataclass
class SpendingBudget:
    """The live account of one gateway's spending (module docstring)."""

    limits: SpendingLimits
    window_ms: int = HOUR_MS
    _spent: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)  # (settled at, amount)
    _reserved: dict[int, int] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)

    def spent(self, now_ms: int) -> int:
        """What settled requests cost in the last ``window_ms``."""
        self._expire(now_ms)
        return sum(amount for _, amount in self._spent)

    def reserved(self) -> int:
        return sum(self._reserved.values())

    def room(self, now_ms: int) -> int:
        """What the hour still allows: its limit less spent and reserved."""
        return max(0, self.limits.per_hour - self.spent(now_ms) - self.reserved())

    def reserve(self, now_ms: int, wanted: int | None = None) -> Reservation:
        """Reserve a request's bound: ``wanted`` (the client's own cap, base
        units) or the per-request limit, whichever is less, and no more than
        the hour's room. ``LimitReached`` when nothing is left."""
        amount, bound_by = self.limits.per_request, "per_request"
        if wanted is not None and wanted < amount:
            amount, bound_by = wanted, "client"
        room = self.room(now_ms)
        if room < amount:
            amount, bound_by = room, "per_hour"
        if amount <= 0:
            if bound_by == "client":
                raise LimitReached("the request's own price bound is zero", "client")
            raise self._refusal(now_ms, "per_hour" if self.limits.per_request > 0 else "per_request")
        reservation = Reservation(next(self._ids), amount, bound_by)
        self._reserved[reservation.id] = amount
        return reservation

    def settle(self, reservation: Reservation, cost: int, now_ms: int) -> None:
        """The request ended having cost ``cost``; its reservation is freed.
        Settling twice is harmless (the second does nothing)."""
        if self._reserved.pop(reservation.id, None) is None:
            return
        if cost > 0:
            self._spent.append((now_ms, cost))

    def refusal_for(self, reservation: Reservation, needed: int, now_ms: int) -> LimitReached | None:
        """When the cheapest provider's worst case (``needed``) does not fit
        the reservation because a limit cut it: the ``LimitReached`` to
        answer (None if it fits, or if only the client's own bound is short,
        which is the client's business)."""
        if needed <= reservation.amount or reservation.bound_by == "client":
            return None
        return self._refusal(now_ms, reservation.bound_by, needed)

    def _refusal(self, now_ms: int, limit: str, needed: int | None = None) -> LimitReached:
        need = "" if needed is None else f"; this request may cost up to {format_coins(needed)} coins"
        if limit == "per_request":
            return LimitReached(
                f"spending limit: at most {format_coins(self.limits.per_request)} coins per request"
                f"{need} (raise gateway_limit_request in the node's config)", "per_request")
        self._expire(now_ms)
        retry = None
        if self._spent:
            retry = max(1, -(-(self._spent[0][0] + self.window_ms - now_ms) // 1000))
        return LimitReached(
            f"spending limit: at most {format_coins(self.limits.per_hour)} coins per hour; "
            f"{format_coins(self.spent(now_ms))} spent and {format_coins(self.reserved())} reserved in the last hour"
            f"{need} (raise gateway_limit_hour in the node's config)", "per_hour", retry)

    def _expire(self, now_ms: int) -> None:
        while self._spent and self._spent[0][0] <= now_ms - self.window_ms:
            self._spent.popleft()

"""Choosing a provider for a job (DESIGN §4, "A job", step 1).

Theory of operation
-------------------
The consumer ranks the live offers for a model by what they are likely to
cost it and how its own past jobs with each provider went. Two parts:

- ``ProviderHistory``: a small, bounded book the consumer keeps about each
  provider it has used: jobs started / completed / failed, exponentially
  weighted moving averages (EWMA) of time to first token and of throughput,
  and the time and reason of the last failure. It is the consumer's own
  observation, never gossiped, and persisted by the node as plain lists
  (``to_wire`` / ``from_wire``; integers only, so the canonical codec can
  carry it).
- ``rank``: filters offers (live, serving the model, a free slot, worst-case
  cost within ``max_price``) and sorts them best first by one score.

The score
---------
Every factor is a number in [0, 1], higher is better::

    cost        (c_min + 1) / (c + 1)       c = job_cost(prices, prompt_est, max_tokens),
                                            the worst case, c_min the cheapest candidate
    success     (completed + 1) / (completed + failed + 2)   Laplace-smoothed
    latency     L / (L + ttft_ewma)         L = LATENCY_REF_MS
    throughput  tps / (tps + R)             R = THROUGHPUT_REF_TPS
    slots       slots_free / slots_total
    penalty     2 ** (-(now - last_failure) / FAILURE_HALF_LIFE_MS)   (0 without a failure)

    score = 0.40 cost + 0.25 success + 0.15 latency + 0.10 throughput
            + 0.10 slots - 0.30 penalty

Why this shape:

- A weighted sum of bounded factors keeps each one's influence predictable
  and lets ``p2pgpu offers --explain`` show each contribution.
- Cost is relative to the cheapest candidate, so the factor does not depend
  on the currency's scale; ``+ 1`` handles free offers.
- The success rate counts finished jobs only (a job still running has no
  outcome yet). An unknown provider scores 1/2 on success, and unknown
  latency and throughput get the same neutral prior (``LATENCY_REF_MS`` and
  ``THROUGHPUT_REF_TPS`` themselves, i.e. 1/2), so a new provider beats one
  with a poor record and still gets tried.
- A failure hurts twice: a lasting dent in the success rate, and a penalty
  that halves every ``FAILURE_HALF_LIFE_MS``, so a provider that just failed
  is not retried at once but comes back once things have calmed down.

Ties (equal scores, which equal inputs give exactly: the arithmetic is the
same in the same order) are broken by the provider key, so every run and
every permutation of the input gives the same order.

Pure module: no I/O; time is always the ``now_ms`` parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable

from p2pgpu.core.codec import MAX_INT, MAX_TIMESTAMP_MS, check_bytes, check_int, check_list, check_str
from p2pgpu.core.identity import PUBLIC_KEY_SIZE
from p2pgpu.core.jobs import Prices, job_cost
from p2pgpu.core.offers import Offer, normalize_model_name
from p2pgpu.core.units import format_coins
from p2pgpu.errors import MalformedInput

__all__ = [
    "DEFAULT_MAX_HISTORY",
    "EWMA_WEIGHT_NEW",
    "FAILURE_HALF_LIFE_MS",
    "HISTORY_VERSION",
    "LATENCY_REF_MS",
    "MAX_REASON_CHARS",
    "THROUGHPUT_REF_TPS",
    "WEIGHTS",
    "ProviderHistory",
    "ProviderRecord",
    "RankedOffer",
    "ScoreBreakdown",
    "explain_no_match",
    "rank",
]

# ------------------------------------------------------------------ tuning

WEIGHTS: dict[str, float] = {
    "cost": 0.40,
    "success": 0.25,
    "latency": 0.15,
    "throughput": 0.10,
    "slots": 0.10,
    "penalty": 0.30,  # subtracted
}
LATENCY_REF_MS = 1_000
"""Time to first token that scores 1/2; also the prior for unknown providers."""
THROUGHPUT_REF_TPS = 30.0
"""Tokens per second that score 1/2; also the prior for unknown providers."""
FAILURE_HALF_LIFE_MS = 60_000
"""The recent-failure penalty halves every minute."""
EWMA_WEIGHT_NEW = (1, 4)
"""Weight of a new sample in the moving averages, as a fraction (1/4)."""

DEFAULT_MAX_HISTORY = 1024
MAX_REASON_CHARS = 256
HISTORY_VERSION = 1
RECORD_FIELDS = 9
_MILLI = 1000


# ------------------------------------------------------------------ history


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """What this consumer has seen of one provider.

    ``ttft_ms`` and ``throughput_mtps`` (milli-tokens per second) are integer
    EWMAs of successful jobs, ``None`` until the first one. ``started`` is at
    least ``completed + failed`` (an outcome implies a start; jobs still
    running account for the difference). ``last_seen_ms`` is the time of the
    latest event and decides who is evicted from a full history.
    """

    provider: bytes
    started: int = 0
    completed: int = 0
    failed: int = 0
    ttft_ms: int | None = None
    throughput_mtps: int | None = None
    last_failure_ms: int | None = None
    last_failure_reason: str = ""
    last_seen_ms: int = 0

    @property
    def tokens_per_s(self) -> float | None:
        return None if self.throughput_mtps is None else self.throughput_mtps / _MILLI

    @property
    def success_rate(self) -> float:
        """Laplace-smoothed: (completed + 1) / (finished + 2); 1/2 when unknown."""
        return (self.completed + 1) / (self.completed + self.failed + 2)

    def to_wire(self) -> list[Any]:
        return [
            self.provider, self.started, self.completed, self.failed, self.ttft_ms,
            self.throughput_mtps, self.last_failure_ms, self.last_failure_reason, self.last_seen_ms,
        ]

    @classmethod
    def from_wire(cls, value: Any) -> ProviderRecord:
        """Raises MalformedInput on any wrong shape, type or inconsistency."""
        check_list(value, "provider record", length=RECORD_FIELDS)
        provider, started, completed, failed, ttft, mtps, last_failure, reason, last_seen = value
        check_bytes(provider, "provider key", size=PUBLIC_KEY_SIZE)
        check_int(started, "jobs started")
        check_int(completed, "jobs completed")
        check_int(failed, "jobs failed")
        if completed + failed > started:
            raise MalformedInput(f"provider record: {completed} completed + {failed} failed > {started} started")
        if ttft is not None:
            check_int(ttft, "time to first token", 0, MAX_TIMESTAMP_MS)
        if mtps is not None:
            check_int(mtps, "throughput")
        if (ttft is None) != (mtps is None):
            raise MalformedInput("provider record: latency and throughput must be both known or both unknown")
        if ttft is not None and completed == 0:
            raise MalformedInput("provider record: latency known without a completed job")
        check_int(last_seen, "last seen", 0, MAX_TIMESTAMP_MS)
        if last_failure is not None:
            check_int(last_failure, "last failure", 0, MAX_TIMESTAMP_MS)
            if last_failure > last_seen:
                raise MalformedInput("provider record: last failure is after last seen")
        if (last_failure is None) != (failed == 0):
            raise MalformedInput("provider record: a failure time needs a failure count and vice versa")
        check_str(reason, "failure reason", MAX_REASON_CHARS)
        if reason and last_failure is None:
            raise MalformedInput("provider record: a failure reason without a failure")
        return cls(provider, started, completed, failed, ttft, mtps, last_failure, reason, last_seen)


def _ewma(old: int | None, sample: int) -> int:
    if old is None:
        return sample
    num, den = EWMA_WEIGHT_NEW
    return (old * (den - num) + sample * num + den // 2) // den  # rounded, integers only


class ProviderHistory:
    """The consumer's per-provider book, at most ``max_providers`` records.

    Mutable and single-threaded; the node records each job's outcome and
    persists ``to_wire()``. When a new provider arrives at a full book, the
    record seen least recently (ties: smaller provider key) is evicted.
    """

    def __init__(self, max_providers: int = DEFAULT_MAX_HISTORY) -> None:
        if type(max_providers) is not int or max_providers < 1:
            raise MalformedInput(f"max_providers must be a positive integer, got {max_providers!r}")
        self.max_providers = max_providers
        self._records: dict[bytes, ProviderRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, provider: object) -> bool:
        return provider in self._records

    def get(self, provider: bytes) -> ProviderRecord | None:
        return self._records.get(provider)

    def records(self) -> list[ProviderRecord]:
        """Every record, by provider key."""
        return [self._records[p] for p in sorted(self._records)]

    def record_start(self, provider: bytes, now_ms: int) -> ProviderRecord:
        """A job was sent to ``provider`` (optional: an outcome implies a start)."""
        old = self._prepare(provider, now_ms)
        return self._put(replace(old, started=old.started + 1, last_seen_ms=max(old.last_seen_ms, now_ms)))

    def record_success(self, provider: bytes, now_ms: int, ttft_ms: int | float, tokens_per_s: int | float) -> ProviderRecord:
        """A job completed: first token after ``ttft_ms``, ``tokens_per_s`` output rate."""
        ttft = _measure(ttft_ms, "time to first token", 1, MAX_TIMESTAMP_MS)
        mtps = _measure(tokens_per_s, "tokens per second", _MILLI, MAX_INT // 2)
        old = self._prepare(provider, now_ms)
        completed = old.completed + 1
        return self._put(replace(
            old,
            started=max(old.started, completed + old.failed),
            completed=completed,
            ttft_ms=_ewma(old.ttft_ms, ttft),
            throughput_mtps=_ewma(old.throughput_mtps, mtps),
            last_seen_ms=max(old.last_seen_ms, now_ms),
        ))

    def record_failure(self, provider: bytes, now_ms: int, reason: str) -> ProviderRecord:
        """A job failed (rejected, vanished, stalled...); ``reason`` is kept,
        cut to ``MAX_REASON_CHARS``, for ``--explain``."""
        if type(reason) is not str:
            raise MalformedInput(f"failure reason: expected a string, got {type(reason).__name__}")
        old = self._prepare(provider, now_ms)
        failed = old.failed + 1
        last_failure = max(old.last_failure_ms or 0, now_ms)
        return self._put(replace(
            old,
            started=max(old.started, old.completed + failed),
            failed=failed,
            last_failure_ms=last_failure,
            last_failure_reason=reason[:MAX_REASON_CHARS],
            last_seen_ms=max(old.last_seen_ms, now_ms),
        ))

    def to_wire(self) -> list[Any]:
        """``[version, [record, ...]]``, records by provider key: plain lists
        of bytes, ints, str and None."""
        return [HISTORY_VERSION, [r.to_wire() for r in self.records()]]

    @classmethod
    def from_wire(cls, value: Any, max_providers: int = DEFAULT_MAX_HISTORY) -> ProviderHistory:
        """Rebuild a history; raises MalformedInput on a bad shape, an unknown
        version, a bad record or a provider listed twice. More records than
        ``max_providers`` (a smaller bound than when it was saved) are cut
        down by the usual eviction rule."""
        history = cls(max_providers)
        check_list(value, "provider history", length=2)
        version, records = value
        if type(version) is not int or version != HISTORY_VERSION:
            raise MalformedInput(f"provider history: unknown version {version!r}")
        check_list(records, "provider history records")
        for item in records:
            record = ProviderRecord.from_wire(item)
            if record.provider in history._records:
                raise MalformedInput("provider history: a provider is listed twice")
            history._records[record.provider] = record
        while len(history._records) > max_providers:
            history._evict()
        return history

    # --------------------------------------------------------------- internals

    def _prepare(self, provider: bytes, now_ms: int) -> ProviderRecord:
        check_bytes(provider, "provider key", size=PUBLIC_KEY_SIZE)
        check_int(now_ms, "now", 0, MAX_TIMESTAMP_MS)
        old = self._records.get(provider)
        if old is not None:
            return old
        if len(self._records) >= self.max_providers:
            self._evict()
        return ProviderRecord(provider, last_seen_ms=now_ms)

    def _put(self, record: ProviderRecord) -> ProviderRecord:
        self._records[record.provider] = record
        return record

    def _evict(self) -> None:
        victim = min(self._records.values(), key=lambda r: (r.last_seen_ms, r.provider))
        del self._records[victim.provider]


def _measure(value: Any, name: str, scale: int, hi: int) -> int:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise MalformedInput(f"{name}: expected a finite non-negative number, got {value!r}")
    if value * scale > hi:
        raise MalformedInput(f"{name}: {value} is too large")
    return round(value * scale)


# ------------------------------------------------------------------ ranking


@dataclass(frozen=True, slots=True)
class ScoreBreakdown:
    """The factors behind one score, each in [0, 1] (module docstring).

    ``known`` says whether the consumer has a history with this provider
    (if not, success, latency and throughput are the neutral prior)."""

    cost: float
    success: float
    latency: float
    throughput: float
    slots: float
    penalty: float
    known: bool

    def contributions(self) -> dict[str, float]:
        """Each factor times its weight; the penalty negative. Sums to the score."""
        return {
            "cost": WEIGHTS["cost"] * self.cost,
            "success": WEIGHTS["success"] * self.success,
            "latency": WEIGHTS["latency"] * self.latency,
            "throughput": WEIGHTS["throughput"] * self.throughput,
            "slots": WEIGHTS["slots"] * self.slots,
            "penalty": -WEIGHTS["penalty"] * self.penalty,
        }

    @property
    def score(self) -> float:
        total = 0.0
        for value in self.contributions().values():  # fixed order: deterministic
            total += value
        return total


@dataclass(frozen=True, slots=True)
class RankedOffer:
    """One candidate: the offer, its worst-case ``cost`` in base units for
    the whole job, its ``score`` (higher is better) and the breakdown."""

    offer: Offer
    score: float
    cost: int
    breakdown: ScoreBreakdown

    @property
    def provider(self) -> bytes:
        return self.offer.provider


def _worst_cost(offer: Offer, prompt_tokens_estimate: int, max_tokens: int) -> int:
    return job_cost(Prices(offer.price_in, offer.price_out), prompt_tokens_estimate, max_tokens)


def _check_job(max_tokens: int, prompt_tokens_estimate: int, now_ms: int, max_price: int | None) -> None:
    check_int(max_tokens, "max tokens")
    check_int(prompt_tokens_estimate, "prompt tokens estimate")
    check_int(now_ms, "now", 0, MAX_TIMESTAMP_MS)
    if max_price is not None:
        check_int(max_price, "max price")


def _candidates(
    offers: Iterable[Offer], model: str, now_ms: int, max_tokens: int, prompt_tokens_estimate: int,
    max_price: int | None, include_busy: bool = False,
) -> list[tuple[Offer, int]]:
    key = normalize_model_name(model)
    found = []
    for offer in offers:
        if not offer.is_live(now_ms) or key not in offer.model_keys or offer.slots_total < 1:
            continue
        if offer.slots_free < 1 and not include_busy:
            continue
        cost = _worst_cost(offer, prompt_tokens_estimate, max_tokens)
        if max_price is not None and cost > max_price:
            continue
        found.append((offer, cost))
    return found


def _breakdown(offer: Offer, cost: int, cheapest: int, record: ProviderRecord | None, now_ms: int) -> ScoreBreakdown:
    ttft = LATENCY_REF_MS if record is None or record.ttft_ms is None else record.ttft_ms
    tps = THROUGHPUT_REF_TPS if record is None or record.tokens_per_s is None else record.tokens_per_s
    penalty = 0.0
    if record is not None and record.last_failure_ms is not None:
        age = max(0, now_ms - record.last_failure_ms)
        penalty = 2.0 ** (-age / FAILURE_HALF_LIFE_MS)
    return ScoreBreakdown(
        cost=(cheapest + 1) / (cost + 1),
        success=0.5 if record is None else record.success_rate,
        latency=LATENCY_REF_MS / (LATENCY_REF_MS + ttft),
        throughput=tps / (tps + THROUGHPUT_REF_TPS),
        slots=offer.slots_free / offer.slots_total,
        penalty=penalty,
        known=record is not None,
    )


def rank(
    offers: Iterable[Offer],
    model: str,
    *,
    max_tokens: int,
    prompt_tokens_estimate: int,
    history: ProviderHistory,
    now_ms: int,
    max_price: int | None = None,
    include_busy: bool = False,
) -> list[RankedOffer]:
    """The offers worth trying for this job, best first.

    Keeps offers that are live at ``now_ms``, serve ``model`` (Ollama name
    rules), have a free slot and, with ``max_price`` (base units for the
    whole job), whose worst-case cost ``job_cost(prices,
    prompt_tokens_estimate, max_tokens)`` is at most ``max_price``. Sorted by
    score (module docstring), then provider key. If a provider appears twice,
    the offer with the higher seq counts. Empty when nothing fits:
    ``explain_no_match`` says why. Raises MalformedInput on bad arguments.

    ``include_busy`` keeps offers with no free slot too (any slots at all):
    for a consumer that waits for a slot (``p2pgpu.core.waitlist``) rather
    than give up; a busy offer's slots factor is 0, so it ranks lower.
    """
    _check_job(max_tokens, prompt_tokens_estimate, now_ms, max_price)
    newest: dict[bytes, tuple[Offer, int]] = {}
    for offer, cost in _candidates(offers, model, now_ms, max_tokens, prompt_tokens_estimate, max_price,
                                   include_busy):
        held = newest.get(offer.provider)
        if held is None or (offer.seq, offer.wire) > (held[0].seq, held[0].wire):
            newest[offer.provider] = (offer, cost)
    if not newest:
        return []
    cheapest = min(cost for _, cost in newest.values())
    ranked = []
    for offer, cost in newest.values():
        breakdown = _breakdown(offer, cost, cheapest, history.get(offer.provider), now_ms)
        ranked.append(RankedOffer(offer, breakdown.score, cost, breakdown))
    ranked.sort(key=lambda r: (-r.score, r.offer.provider))
    return ranked


def explain_no_match(
    offers: Iterable[Offer],
    model: str,
    now_ms: int,
    *,
    max_tokens: int = 0,
    prompt_tokens_estimate: int = 0,
    max_price: int | None = None,
    include_busy: bool = False,
) -> str:
    """Why ``rank`` with these arguments finds nothing, in one sentence for
    the user: no live offers; nobody serves the model (naming the models the
    network does offer); every provider serving it is busy; every free one
    costs more than ``max_price``. Says so if there is in fact a match.
    ``include_busy`` as ``rank`` takes it: busy providers count (a job
    waits for them), so being busy is never the reason."""
    _check_job(max_tokens, prompt_tokens_estimate, now_ms, max_price)
    key = normalize_model_name(model)
    live = [o for o in offers if o.is_live(now_ms)]
    if not live:
        return "no live offers: no provider has announced itself recently (is the node connected to peers?)"
    serving = [o for o in live if key in o.model_keys]
    if not serving:
        available = sorted({m for o in live for m in o.model_keys})
        return (
            f"no provider serves model {key!r}; the network offers: {', '.join(available)}"
            if available else f"no provider serves model {key!r}; the network offers no models at all"
        )
    free = serving if include_busy else [o for o in serving if o.slots_free > 0]
    providers = len({o.provider for o in serving})
    if not free:
        return f"all {providers} providers serving {key!r} are busy (no free job slots); try again shortly"
    costs = sorted(_worst_cost(o, prompt_tokens_estimate, max_tokens) for o in free)
    if max_price is not None and costs[0] > max_price:
        busy = providers - len({o.provider for o in free})
        busy_note = f" ({busy} more are busy)" if busy else ""
        return (
            f"every {'' if include_busy else 'free '}provider serving {key!r}{busy_note} costs more than the limit of "
            f"{format_coins(max_price)} coins for this job (worst case {prompt_tokens_estimate} input + "
            f"{max_tokens} output tokens); the cheapest would cost {format_coins(costs[0])} coins"
        )
    fitting = sum(1 for c in costs if max_price is None or c <= max_price)
    return f"{fitting} offer(s) for {key!r} match; nothing is wrong"

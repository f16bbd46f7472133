"""The gateway's spending limit (``p2pgpu.core.spending``): per request, per
sliding hour, reservations that concurrent requests cannot overrun together."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.core.spending import HOUR_MS, LimitReached, SpendingBudget, SpendingLimits


def test_a_request_reserves_the_per_request_limit_or_the_clients_own_lower_bound():
    budget = SpendingBudget(SpendingLimits(per_request=100, per_hour=1_000))
    assert (budget.reserve(0).amount, budget.reserve(0, 40).amount, budget.reserve(0, 500).amount) == (100, 40, 100)
    assert budget.reserve(0, 40).bound_by == "client"
    assert budget.reserved() == 280


def test_the_hour_is_never_overrun_by_concurrent_requests_and_the_refusal_names_the_limit():
    budget = SpendingBudget(SpendingLimits(per_request=400, per_hour=1_000))
    first, second = budget.reserve(0), budget.reserve(0)
    third = budget.reserve(0)
    assert (first.amount, second.amount, third.amount) == (400, 400, 200) and third.bound_by == "per_hour"
    with pytest.raises(LimitReached, match="0.001 coins per hour") as refused:
        budget.reserve(1)
    assert refused.value.limit == "per_hour"
    budget.settle(first, 10, 5)  # it cost far less than its bound: the rest is free again
    assert budget.reserve(6).amount == 390
    budget.settle(first, 10, 7)  # settling twice changes nothing
    assert budget.spent(8) == 10


def test_what_was_spent_leaves_the_window_an_hour_after_it_was_settled():
    budget = SpendingBudget(SpendingLimits(per_request=1_000, per_hour=1_000))
    budget.settle(budget.reserve(0), 1_000, 100)
    with pytest.raises(LimitReached) as refused:
        budget.reserve(HOUR_MS)
    assert refused.value.retry_after_s == 1  # 100 ms left, rounded up to a whole second
    assert budget.reserve(HOUR_MS + 100).amount == 1_000


def test_a_limit_too_small_for_the_cheapest_provider_is_refused_naming_that_limit():
    budget = SpendingBudget(SpendingLimits(per_request=50, per_hour=1_000))
    reservation = budget.reserve(0)
    refusal = budget.refusal_for(reservation, 80, 0)
    assert refusal is not None and refusal.limit == "per_request" and "0.00005 coins per request" in str(refusal)
    assert budget.refusal_for(reservation, 50, 0) is None
    assert budget.refusal_for(budget.reserve(0, 10), 80, 0) is None  # the client's own bound: its business
    with pytest.raises(LimitReached, match="per request"):
        SpendingBudget(SpendingLimits(per_request=0, per_hour=10)).reserve(0)
    with pytest.raises(ValueError):
        SpendingLimits(per_request=-1, per_hour=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 500), st.integers(0, 2 * HOUR_MS // 10)), max_size=60))
def test_spent_plus_reserved_never_passes_the_hourly_limit(steps):
    budget = SpendingBudget(SpendingLimits(per_request=300, per_hour=1_000))
    open_reservations, now = [], 0
    for reserve, cost, gap in steps:
        now += gap
        if reserve or not open_reservations:
            try:
                open_reservations.append(budget.reserve(now))
            except LimitReached:
                pass
        else:
            reservation = open_reservations.pop(0)
            budget.settle(reservation, min(cost, reservation.amount), now)
        assert budget.spent(now) + budget.reserved() <= 1_000

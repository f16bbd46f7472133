"""Ranking offers for a job (p2pgpu.core.ranking): what is filtered out,
how the score orders what is left, that the order is deterministic, and the
consumer's provider history (EWMAs, bound, wire round trip).

Time is a number here: ``T0`` is "now" unless a test moves it.
"""

from __future__ import annotations

from p2pgpu.core.units import format_coins

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.core.codec import pack, unpack
from p2pgpu.core.hardware import HardwareReport
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.jobs import Prices, job_cost
from p2pgpu.core.offers import ModelOffer, Offer, decode_offer_message, make_offer
from p2pgpu.core.ranking import (
    FAILURE_HALF_LIFE_MS,
    MAX_REASON_CHARS,
    ProviderHistory,
    ProviderRecord,
    explain_no_match,
    rank,
)
from p2pgpu.errors import MalformedInput
from p2pgpu.testing.ledger import START_MS, key_for, make_genesis

NET = make_genesis().network_id
T0 = START_MS
alice, bob, carol, dave = (key_for(n) for n in ("alice", "bob", "carol", "dave"))
NO_GPU = HardwareReport(gpus=(), nvml_available=False, error="none")
LLAMA = ModelOffer("llama3.2:1b", warm=True)
QWEN = ModelOffer("qwen2.5:7b")
JOB = dict(max_tokens=1000, prompt_tokens_estimate=500)


def offer(key: NodeKey, *, now: int = T0, ttl_ms: int = 30_000, models=(LLAMA,), price_in: int = 100_000,
          price_out: int = 300_000, slots_free: int = 2, slots_total: int = 4, seq: int = 1) -> Offer:
    signed = make_offer(
        key, NET, now, seq=seq, ttl_ms=ttl_ms, hardware=NO_GPU, models=list(models), price_in=price_in,
        price_out=price_out, slots_free=slots_free, slots_total=slots_total,
        addrs=["/ip4/127.0.0.1/tcp/4001"],
    )
    message = decode_offer_message(signed.wire, NET, now)
    assert isinstance(message, Offer)
    return message


def ranked(offers, model="llama3.2:1b", history=None, now=T0, **kwargs) -> list[bytes]:
    args = {**JOB, **kwargs}
    result = rank(offers, model, history=history or ProviderHistory(), now_ms=now, **args)
    return [r.offer.provider for r in result]


# ------------------------------------------------------------------ filtering


def test_only_live_serving_free_affordable_offers_are_kept() -> None:
    good = offer(alice)
    busy = offer(bob, slots_free=0)
    other_model = offer(carol, models=(QWEN,))
    expired = offer(dave, now=T0 - 30_000)  # expires exactly at T0
    assert ranked([good, busy, other_model, expired]) == [alice.public_key]


def test_max_price_is_the_worst_case_cost_of_the_whole_job() -> None:
    cheap, dear = offer(alice), offer(bob, price_in=1_000_000, price_out=3_000_000)
    cheap_cost = job_cost(Prices(100_000, 300_000), 500, 1000)
    assert ranked([cheap, dear], max_price=cheap_cost) == [alice.public_key]
    assert ranked([cheap, dear], max_price=cheap_cost - 1) == []
    result = rank([cheap], "llama3.2:1b", history=ProviderHistory(), now_ms=T0, **JOB)
    assert result[0].cost == cheap_cost


def test_model_names_are_normalised() -> None:
    assert ranked([offer(alice)], model="LLaMA3.2:1B") == [alice.public_key]
    latest = offer(bob, models=(ModelOffer("Llama3"),))
    assert ranked([latest], model="llama3:latest") == [bob.public_key]
    assert ranked([latest], model="llama3:8b") == []


def test_a_provider_listed_twice_counts_once_with_its_newest_offer() -> None:
    old, new = offer(alice, seq=1, price_out=300), offer(alice, seq=2, price_out=900)
    for offers in ([old, new], [new, old]):
        result = rank(offers, "llama3.2:1b", history=ProviderHistory(), now_ms=T0, **JOB)
        assert [r.offer.seq for r in result] == [2]


def test_bad_arguments_are_refused() -> None:
    for bad in (dict(max_tokens=-1), dict(prompt_tokens_estimate=1.5), dict(max_price=-1), dict(now=-1)):
        with pytest.raises(MalformedInput):
            ranked([offer(alice)], **bad)


# ------------------------------------------------------------------ ordering


def test_same_inputs_same_order_whatever_the_input_order() -> None:
    history = ProviderHistory()
    history.record_success(bob.public_key, T0 - 5000, 400, 50.0)
    history.record_failure(carol.public_key, T0 - 90_000, "stalled")
    offers = [offer(alice), offer(bob, price_out=350_000), offer(carol, price_in=50_000), offer(dave, slots_free=4)]
    expected = rank(offers, "llama3.2:1b", history=history, now_ms=T0, **JOB)
    assert len(expected) == 4
    for perm in itertools.permutations(offers):
        assert rank(list(perm), "llama3.2:1b", history=history, now_ms=T0, **JOB) == expected


def test_equal_offers_tie_break_by_provider_key() -> None:
    offers = [offer(k) for k in (alice, bob, carol, dave)]
    result = rank(offers, "llama3.2:1b", history=ProviderHistory(), now_ms=T0, **JOB)
    assert len({r.score for r in result}) == 1
    assert [r.offer.provider for r in result] == sorted(k.public_key for k in (alice, bob, carol, dave))


def test_cheaper_wins_when_all_else_is_equal() -> None:
    # give the dearer one the smaller key, so the tie-break would favour it
    first, second = sorted((alice, bob), key=lambda k: k.public_key)
    offers = [offer(first, price_out=301_000), offer(second, price_out=300_000)]
    assert ranked(offers) == [second.public_key, first.public_key]
    offers = [offer(first, price_in=101_000), offer(second, price_in=100_000)]
    assert ranked(offers) == [second.public_key, first.public_key]


def test_more_free_slots_win_when_all_else_is_equal() -> None:
    first, second = sorted((alice, bob), key=lambda k: k.public_key)
    assert ranked([offer(first, slots_free=1), offer(second, slots_free=3)]) == [second.public_key, first.public_key]


def test_faster_history_wins_when_all_else_is_equal() -> None:
    history = ProviderHistory()
    history.record_success(alice.public_key, T0, 200, 80.0)
    history.record_success(bob.public_key, T0, 2000, 10.0)
    assert ranked([offer(alice), offer(bob)], history=history) == [alice.public_key, bob.public_key]


def test_a_recent_failure_drops_a_provider_until_the_penalty_decays() -> None:
    # alice is a little cheaper, so she wins without history...
    offers = [offer(alice, price_out=250_000), offer(bob)]
    history = ProviderHistory()
    for p in (alice.public_key, bob.public_key):
        for i in range(9):
            history.record_success(p, T0 - 600_000 + i, 500, 40.0)
    assert ranked(offers, history=history) == [alice.public_key, bob.public_key]
    # ...but just after a failure she drops below bob,
    history.record_failure(alice.public_key, T0, "stream stalled")
    assert ranked(offers, history=history) == [bob.public_key, alice.public_key]
    assert ranked(offers, history=history, now=T0 + 20_000) == [bob.public_key, alice.public_key]
    # and comes back once the penalty has decayed (the lower success rate remains).
    later = T0 + 20 * FAILURE_HALF_LIFE_MS
    result = rank([offer(alice, now=later, price_out=250_000), offer(bob, now=later)], "llama3.2:1b",
                  history=history, now_ms=later, **JOB)
    assert [r.offer.provider for r in result] == [alice.public_key, bob.public_key]
    assert result[0].breakdown.penalty < 1e-5
    assert result[0].breakdown.success < result[1].breakdown.success


def test_unknown_providers_are_not_starved() -> None:
    history = ProviderHistory()
    history.record_success(alice.public_key, T0 - 10_000, 3000, 5.0)
    for i in range(3):
        history.record_failure(alice.public_key, T0 - 600_000 + i, "rejected: busy")
    new = offer(bob)
    assert ranked([offer(alice), new], history=history) == [bob.public_key, alice.public_key]
    result = rank([new], "llama3.2:1b", history=history, now_ms=T0, **JOB)
    b = result[0].breakdown
    assert not b.known and b.success == b.latency == b.throughput == 0.5 and b.penalty == 0


def test_the_breakdown_adds_up_to_the_score() -> None:
    history = ProviderHistory()
    history.record_success(alice.public_key, T0 - 1, 700, 33.0)
    history.record_failure(alice.public_key, T0 - 30_000, "cancelled")
    for r in rank([offer(alice), offer(bob, price_out=600_000)], "llama3.2:1b", history=history, now_ms=T0, **JOB):
        assert r.score == pytest.approx(sum(r.breakdown.contributions().values()))
        for name in ("cost", "success", "latency", "throughput", "slots", "penalty"):
            assert 0 <= getattr(r.breakdown, name) <= 1
    assert rank([offer(alice)], "llama3.2:1b", history=history, now_ms=T0, **JOB)[0].breakdown.known


# ------------------------------------------------------------------ explaining


def test_explain_no_live_offers() -> None:
    assert "no live offers" in explain_no_match([], "llama3.2:1b", T0)
    assert "no live offers" in explain_no_match([offer(alice, now=T0 - 40_000)], "llama3.2:1b", T0)


def test_explain_nobody_serves_the_model_lists_what_is_offered() -> None:
    text = explain_no_match([offer(alice, models=(QWEN,)), offer(bob, models=(QWEN, ModelOffer("Mistral")))],
                            "Llama3.2:1B", T0)
    assert "llama3.2:1b" in text and "qwen2.5:7b, mistral:latest" not in text
    assert "mistral:latest, qwen2.5:7b" in text


def test_explain_all_busy() -> None:
    text = explain_no_match([offer(alice, slots_free=0), offer(bob, slots_free=0), offer(carol, models=(QWEN,))],
                            "llama3.2:1b", T0)
    assert "all 2 providers" in text and "busy" in text


def test_explain_for_a_job_that_would_wait_names_the_price_not_the_busy_providers() -> None:
    offers = [offer(alice, slots_free=0), offer(bob, slots_free=0)]
    cost = job_cost(Prices(100_000, 300_000), 500, 1000)
    text = explain_no_match(offers, "llama3.2:1b", T0, max_price=cost - 1, include_busy=True, **JOB)
    assert "every provider serving" in text and "more than the limit" in text and "busy" not in text
    assert "busy" in explain_no_match(offers, "llama3.2:1b", T0, max_price=cost - 1, **JOB)


def test_explain_too_expensive() -> None:
    offers = [offer(alice), offer(bob, slots_free=0, price_out=1)]
    cost = job_cost(Prices(100_000, 300_000), 500, 1000)
    text = explain_no_match(offers, "llama3.2:1b", T0, max_price=cost - 1, **JOB)
    assert "more than the limit" in text and f"would cost {format_coins(cost)} coins" in text and "1 more are busy" in text
    assert f"limit of {format_coins(cost - 1)} coins" in text and "base units" not in text
    assert ranked(offers, max_price=cost - 1) == []
    assert "match" in explain_no_match(offers, "llama3.2:1b", T0, max_price=cost, **JOB)


# ------------------------------------------------------------------ history


def test_history_counts_and_moving_averages() -> None:
    history = ProviderHistory()
    p = alice.public_key
    assert history.get(p) is None
    history.record_start(p, T0)
    history.record_success(p, T0 + 1, 1000, 40.0)
    r = history.record_success(p, T0 + 2, 200, 20.0)
    assert (r.started, r.completed, r.failed) == (2, 2, 0)
    assert r.ttft_ms == 800 and r.tokens_per_s == 35.0  # new samples weigh 1/4
    history.record_start(p, T0 + 3)  # still running
    r = history.record_failure(p, T0 + 4, "x" * 1000)
    assert (r.started, r.completed, r.failed) == (3, 2, 1)
    assert r.last_failure_ms == T0 + 4 and len(r.last_failure_reason) == MAX_REASON_CHARS
    assert r.success_rate == 3 / 5
    assert history.get(p) == r


@pytest.mark.parametrize("call", [
    lambda h: h.record_success(b"short", T0, 1, 1.0),
    lambda h: h.record_success(alice.public_key, T0, -1, 1.0),
    lambda h: h.record_success(alice.public_key, T0, 1, float("nan")),
    lambda h: h.record_success(alice.public_key, T0, 1, 1e300),
    lambda h: h.record_success(alice.public_key, -5, 1, 1.0),
    lambda h: h.record_failure(alice.public_key, T0, 42),
    lambda h: h.record_start(alice.public_key, 1.5),
])
def test_history_refuses_bad_measurements(call) -> None:
    history = ProviderHistory()
    with pytest.raises(MalformedInput):
        call(history)
    assert len(history) == 0


def test_history_is_bounded_and_evicts_the_least_recently_seen() -> None:
    keys = [key_for(f"p{i}").public_key for i in range(5)]
    history = ProviderHistory(max_providers=3)
    history.record_success(keys[0], T0 + 0, 100, 10.0)
    history.record_success(keys[1], T0 + 1, 100, 10.0)
    history.record_failure(keys[2], T0 + 2, "gone")
    history.record_start(keys[0], T0 + 3)  # keys[0] is recent again
    history.record_success(keys[3], T0 + 4, 100, 10.0)
    assert len(history) == 3 and keys[1] not in history
    history.record_failure(keys[4], T0 + 5, "gone")
    assert len(history) == 3 and keys[2] not in history
    assert {r.provider for r in history.records()} == {keys[0], keys[3], keys[4]}
    smaller = ProviderHistory.from_wire(history.to_wire(), max_providers=2)
    assert {r.provider for r in smaller.records()} == {keys[3], keys[4]}


PROVIDERS = [key_for(n).public_key for n in ("alice", "bob", "carol", "dave", "erin")]
events = st.lists(
    st.tuples(
        st.sampled_from(["start", "success", "failure"]),
        st.sampled_from(PROVIDERS),
        st.integers(0, 10**7),
        st.integers(0, 10**6),
        st.floats(0, 10**6, allow_nan=False),
        st.text(max_size=300),
    ),
    max_size=40,
)


def play(events_, max_providers: int = 3) -> ProviderHistory:
    history = ProviderHistory(max_providers=max_providers)
    for kind, provider, dt, ttft, tps, reason in events_:
        if kind == "start":
            history.record_start(provider, T0 + dt)
        elif kind == "success":
            history.record_success(provider, T0 + dt, ttft, tps)
        else:
            history.record_failure(provider, T0 + dt, reason)
    return history


@settings(max_examples=200, deadline=None)
@given(events)
def test_history_wire_round_trip(events_) -> None:
    history = play(events_)
    assert len(history) <= 3
    wire = history.to_wire()
    again = ProviderHistory.from_wire(unpack(pack(wire), max_size=1 << 20), max_providers=3)
    assert again.to_wire() == wire
    assert again.records() == history.records()
    for r in history.records():
        assert r.completed + r.failed <= r.started


def _good_wire() -> list:
    history = ProviderHistory()
    history.record_success(alice.public_key, T0, 300, 25.0)
    history.record_failure(alice.public_key, T0 + 1, "busy")
    return history.to_wire()


def _with(index: int, value) -> list:
    version, records = _good_wire()
    record = list(records[0])
    record[index] = value
    return [version, [record]]


@pytest.mark.parametrize("wire", [
    None,
    [],
    [2, []],
    [True, []],
    [1, {}],
    [1, [[]]],
    [1, [_good_wire()[1][0][:-1]]],
    [1, _good_wire()[1] * 2],  # provider twice
    _with(0, b"\x00" * 31),
    _with(1, 1),  # started < completed + failed
    _with(2, -1),
    _with(3, True),
    _with(4, 1.5),
    _with(4, None),  # ttft unknown but throughput known
    _with(6, None),  # failures without a failure time
    _with(6, T0 + 99),  # failure after last seen
    _with(7, 7),
    _with(7, "x" * (MAX_REASON_CHARS + 1)),
    _with(8, -1),
])
def test_malformed_history_wire_is_refused(wire) -> None:
    with pytest.raises(MalformedInput):
        ProviderHistory.from_wire(wire)


def test_good_wire_parses() -> None:
    history = ProviderHistory.from_wire(_good_wire())
    r = history.get(alice.public_key)
    assert isinstance(r, ProviderRecord) and r.failed == 1 and r.last_failure_reason == "busy"

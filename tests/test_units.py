"""Coins <-> base units: exact both ways, never a rounded amount."""

from __future__ import annotations

from decimal import Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pgpu.core import genesis as genesis_module
from p2pgpu.core.units import BASE_UNITS_PER_COIN, COIN_DECIMALS, format_coins, parse_coins
from p2pgpu.errors import MalformedInput


def test_base_unit_matches_the_genesis_constant():
    assert BASE_UNITS_PER_COIN == genesis_module.BASE_UNITS_PER_COIN == 10**COIN_DECIMALS


@pytest.mark.parametrize(
    ("base_units", "text"),
    [
        (0, "0"),
        (1, "0.000001"),
        (12_500_000, "12.5"),
        (-3_000_000, "-3"),
        (-1, "-0.000001"),
        (1_000_000, "1"),
        (1_234_567, "1.234567"),
        (10**30 + 10, "1000000000000000000000000.00001"),
    ],
)
def test_format_coins(base_units, text):
    assert format_coins(base_units) == text


@pytest.mark.parametrize(
    ("text", "base_units"),
    [
        ("12.5", 12_500_000),
        ("0.000001", 1),
        ("1", 1_000_000),
        ("1.", 1_000_000),
        (".5", 500_000),
        ("+2", 2_000_000),
        (" 3.25 ", 3_250_000),
        ("007", 7_000_000),
        ("1.5000000000", 1_500_000),  # trailing zeros lose nothing
        ("-0", 0),
        # Far past the default decimal precision (28 digits): still exact.
        ("123456789012345678901234567890.123456", 123456789012345678901234567890123456),
    ],
)
def test_parse_coins(text, base_units):
    assert parse_coins(text) == base_units


@pytest.mark.parametrize(
    "text",
    ["", " ", ".", "+", "-", "abc", "1e3", "1E-6", "NaN", "inf", "-Infinity"]
    + ["1_000", "1.2.3", "1,5", "0x10", "--1", "1 000", "\u0661"],  # the last: an Arabic-Indic digit
)
def test_parse_coins_rejects_anything_but_plain_decimals(text):
    with pytest.raises(MalformedInput):
        parse_coins(text)


def test_parse_coins_refuses_amounts_finer_than_one_base_unit():
    with pytest.raises(MalformedInput, match="more than 6 decimal places"):
        parse_coins("0.0000001")
    with pytest.raises(MalformedInput, match="more than 6 decimal places"):
        parse_coins("12.0000015")


def test_parse_coins_refuses_negatives_unless_asked():
    with pytest.raises(MalformedInput, match="negative"):
        parse_coins("-1")
    assert parse_coins("-1.5", allow_negative=True) == -1_500_000


def test_parse_coins_refuses_huge_text_and_non_text():
    with pytest.raises(MalformedInput, match="longer than"):
        parse_coins("1" * 65)
    with pytest.raises(MalformedInput):
        parse_coins(1.5)  # type: ignore[arg-type]
    with pytest.raises(MalformedInput):
        format_coins(1.5)  # type: ignore[arg-type]


@given(st.integers(min_value=-(10**40), max_value=10**40))
def test_round_trip_from_base_units(base_units):
    assert parse_coins(format_coins(base_units), allow_negative=True) == base_units


@given(st.decimals(min_value=0, max_value=10**20, places=COIN_DECIMALS, allow_nan=False, allow_infinity=False))
def test_parse_agrees_with_exact_decimal_arithmetic(amount):
    with localcontext() as ctx:
        ctx.prec = 100
        expected = int(amount * BASE_UNITS_PER_COIN)
    assert parse_coins(format(amount, "f")) == expected
    assert Decimal(format_coins(expected)) == amount


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=1, max_value=9))
def test_a_seventh_decimal_is_always_refused(whole, seventh):
    with pytest.raises(MalformedInput):
        parse_coins(f"{whole}.000000{seventh}")

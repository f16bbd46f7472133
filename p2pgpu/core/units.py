"""Coins as people write them, base units as the ledger counts them.

The ledger only ever holds integers (DESIGN §3: no floats near a balance).
People type and read coins, with up to ``COIN_DECIMALS`` decimal places
("12.5", "0.000001"). These two functions are the only bridge between the
two, and both are exact:

- ``parse_coins`` goes through ``decimal.Decimal`` for the syntax but converts
  from the decimal's (sign, digits, exponent) tuple with integer arithmetic, so
  no decimal context (precision 28 by default) can round a long amount. An
  amount finer than one base unit is refused, never rounded: silently turning
  "0.0000015" into 1 or 2 base units would move money nobody asked to move.
- ``format_coins`` prints the shortest exact decimal (no trailing zeros), so
  ``parse_coins(format_coins(n)) == n`` for every integer ``n``.

Pure: stdlib and ``p2pgpu.errors`` only.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from p2pgpu.errors import MalformedInput

COIN_DECIMALS = 6
# The one definition (``p2pgpu.core.genesis`` re-exports it); kept here so this
# module stays importable with nothing but the stdlib (a test pins the two).
BASE_UNITS_PER_COIN = 10**COIN_DECIMALS

# Plain decimal notation only. Decimal() alone would also take "NaN", "inf",
# "1e3" and "1_000", none of which a person means as an amount of money.
_COINS = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
# Longer input is a mistake (or an attack on the parser), not an amount.
MAX_COINS_TEXT = 64


def format_coins(base_units: int) -> str:
    """Exact decimal coins for an integer of base units: 12_500_000 -> "12.5",
    1 -> "0.000001", -3_000_000 -> "-3"."""
    if type(base_units) is not int:
        raise MalformedInput(f"base units must be an integer, got {type(base_units).__name__}")
    sign = "-" if base_units < 0 else ""
    whole, fraction = divmod(abs(base_units), BASE_UNITS_PER_COIN)
    if fraction == 0:
        return f"{sign}{whole}"
    digits = f"{fraction:0{COIN_DECIMALS}d}".rstrip("0")
    return f"{sign}{whole}.{digits}"


def parse_coins(text: str, *, allow_negative: bool = False) -> int:
    """Base units for a coin amount typed by a person ("12.5" -> 12_500_000).

    Raises ``MalformedInput`` for anything but plain decimal notation, for an
    amount with a non-zero digit beyond the sixth decimal place, and for a
    negative amount unless ``allow_negative`` (amounts people type are never
    negative; the flag exists so the function is the exact inverse of
    ``format_coins``). Trailing zeros are harmless: "1.50000000" is 1_500_000.
    """
    if not isinstance(text, str):
        raise MalformedInput(f"a coin amount must be text, got {type(text).__name__}")
    cleaned = text.strip()
    if len(cleaned) > MAX_COINS_TEXT:
        raise MalformedInput(f"coin amount is longer than {MAX_COINS_TEXT} characters")
    if not _COINS.fullmatch(cleaned):
        raise MalformedInput(f"not a coin amount: {text!r} (write it like 12.5)")
    try:
        sign, digits, exponent = Decimal(cleaned).as_tuple()
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only valid decimals
        raise MalformedInput(f"not a coin amount: {text!r}") from exc
    assert isinstance(exponent, int)  # finite: the pattern admits no NaN or infinity
    magnitude = int("".join(map(str, digits)))
    shift = exponent + COIN_DECIMALS
    if shift >= 0:
        base_units = magnitude * 10**shift
    else:
        base_units, rest = divmod(magnitude, 10**-shift)
        if rest:
            raise MalformedInput(
                f"coin amount {text!r} has more than {COIN_DECIMALS} decimal places "
                f"(the smallest amount is 0.{'0' * (COIN_DECIMALS - 1)}1)"
            )
    if sign and base_units:
        if not allow_negative:
            raise MalformedInput(f"coin amount {text!r} is negative")
        base_units = -base_units
    return base_units

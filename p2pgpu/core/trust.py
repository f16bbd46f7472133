"""Bounded trust between a provider and the consumers it serves.

Theory of operation
-------------------
Vouchers are a consumer's promise to pay, and a provider streams ahead of
them by a *credit window*: tokens sent that no kept voucher covers yet
(``p2pgpu.core.jobs``). Whoever chooses that window chooses how much a
provider may lose. A consumer must not choose it alone: one that asked for
a window as large as its whole answer and never sent a voucher would get
the answer for nothing. So the provider decides, in two rules:

1. **A maximum window** (``max_credit_window``, 32 tokens by default, the
   consumers' default too): a request asking for more is refused before
   anything runs (``R_WINDOW``), so no job of any consumer can cost a
   provider more than that many unpaid tokens.
2. **Once, not job after job** (``Debtors``): a consumer whose job ended
   with tokens sent beyond what its last voucher covers (it stopped paying,
   or vanished mid-stream) is remembered by its identity and refused from
   then on (``R_UNPAID``). The worst a consumer identity can take from a
   provider is therefore one window, once. New identities are free to make,
   but each must hold coins for a HOLD before the provider streams a token,
   and the hold comes back to it only after expiry plus grace, so a stream
   of fresh identities pays in locked coins and time for every window.

The table is bounded (oldest forgotten first): a flood of identities cannot
grow a provider's memory, and one forgotten is the same as a fresh identity.

Pure module: no I/O, no clock.
"""

from __future__ import annotations

import collections
from typing import Final

__all__ = ["DEFAULT_MAX_CREDIT_WINDOW", "MAX_DEBTORS", "Debtors"]

DEFAULT_MAX_CREDIT_WINDOW: Final = 32
"""Tokens a provider streams ahead of the vouchers it holds, at most (the
consumers' default window is the same, so default nodes always agree)."""
MAX_DEBTORS: Final = 100_000


class Debtors:
    """Consumers (public keys) that left tokens unpaid here, newest last,
    with how many tokens; at most ``limit`` remembered."""

    def __init__(self, limit: int = MAX_DEBTORS) -> None:
        if limit < 1:
            raise ValueError("a debtor table needs room for at least one consumer")
        self.limit = limit
        self._owed: collections.OrderedDict[bytes, int] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._owed)

    def record(self, consumer: bytes, unpaid_tokens: int) -> None:
        """A job of ``consumer``'s ended ``unpaid_tokens`` (> 0) short."""
        if unpaid_tokens <= 0:
            return
        self._owed[consumer] = self._owed.pop(consumer, 0) + unpaid_tokens
        while len(self._owed) > self.limit:
            self._owed.popitem(last=False)

    def owed(self, consumer: bytes) -> int:
        """Tokens ``consumer`` left unpaid here (0: none we remember)."""
        return self._owed.get(consumer, 0)

    def refusal(self, consumer: bytes) -> str | None:
        """Why a request of ``consumer``'s is refused, or None."""
        owed = self._owed.get(consumer, 0)
        if not owed:
            return None
        return f"an earlier job of yours left {owed} token(s) unpaid here"

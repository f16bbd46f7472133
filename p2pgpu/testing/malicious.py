"""Malicious providers for tests: an honest ``ProviderSession`` that cheats.

A cheating provider is made by the smallest realistic means: its job
sessions are the real state machine (``p2pgpu.core.jobs.ProviderSession``),
keeping every honest count, and a ``Cheat`` rewrites what they put on the
wire (a TOKENS frame with a count past ``max_tokens``, a wrong running
total, a skipped seq, frames withheld, a CANCEL of its own it does not
keep to, a receipt signed over other figures), what they are fed (more tokens counted than the model gave),
what they hear of the consumer (a CANCEL never seen) or the CLAIM they
would make. Everything else (the node, the edge in
``p2pgpu.jobrunner``, the ledger) is untouched.

``Sessions`` records every job session made while it is installed, both
sides, so a test can read what each side counted, signed and was paid;
``sessions.cheat(public_key, cheat)`` turns that provider's sessions (and
only its: all nodes of a test share one process) into cheats. The class is
swapped on the instance, so the sessions stay ``ProviderSession``s.

``forge_claim`` and ``tampered_voucher``: the raw material of a provider
that appends a CLAIM above what its consumer signed, signed with its key
and linked to its chain but never admitted by its own ledger (which would
refuse it), so the test can hand it to other replicas.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from p2pgpu.core.codec import Signed, Tag, pack, sign_object, unpack
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.jobs import (
    CANCEL,
    CONTENT,
    R_OTHER,
    RECEIPT,
    TOKENS,
    Claim,
    ConsumerSession,
    Frame,
    ProviderSession,
    ProviderState,
    Send,
    decode_frame,
    decode_receipt,
    encode_frame,
    make_receipt,
)
from p2pgpu.core.ledger import CLAIM, Ledger

__all__ = [
    "Cheat", "CheatingSession", "Sessions", "TokensPastMaxTokens", "ExtraTokensFrame", "WrongRunningTotal",
    "SkippedSeq", "WithheldTokens", "ForgedReceipt", "InflatedCounts", "CancelsAndStreamsOn", "IgnoresCancel",
    "KeepsItsClaim", "forge_claim", "tampered_voucher", "BOGUS_HASH",
]

BOGUS_HASH = hashlib.blake2b(b"not what was streamed", digest_size=32).digest()


def _tokens_frame(job_id: bytes, seq: int, text: str, count: int, total: int, channel: int) -> bytes:
    if channel == CONTENT:
        return encode_frame(TOKENS, job_id, seq, text, count, total)
    return encode_frame(TOKENS, job_id, seq, text, count, total, channel)


class Cheat:
    """What a provider does differently; every hook defaults to honesty."""

    def heed(self, session: ProviderSession, frame: Frame) -> bool:
        """Whether the session gets to see this frame of the consumer's."""
        return True

    def count(self, session: ProviderSession, count: int) -> int | None:
        """Tokens to count for a chunk the model gave as ``count`` (None: drop it)."""
        return count

    def frames(self, session: ProviderSession, frame: Frame, data: bytes) -> list[bytes]:
        """The frames to send instead of ``data`` (an honest frame, decoded as ``frame``)."""
        return [data]

    def claim(self, session: ProviderSession, claim: Claim) -> list[Any]:
        """The actions to take instead of ``claim``."""
        return [claim]


class CheatingSession(ProviderSession):
    """A ``ProviderSession`` whose output passes through ``cheat``."""

    cheat: Cheat

    def _dispatch(self, event, *args):  # type: ignore[override]
        out: list[Any] = []
        for action in super()._dispatch(event, *args):
            if isinstance(action, Send):
                out += [Send(data) for data in self.cheat.frames(self, decode_frame(action.data), action.data)]
            elif isinstance(action, Claim):
                out += self.cheat.claim(self, action)
            else:
                out.append(action)
        return out

    def receive(self, data: bytes, now_ms: int) -> list:
        if self.state is not ProviderState.WAITING and not self.cheat.heed(self, decode_frame(data)):
            return []
        return super().receive(data, now_ms)

    def tokens(self, now_ms: int, text: str, count: int = 1, channel: int = CONTENT) -> list:
        counted = self.cheat.count(self, count)
        if counted is None:
            return []
        return super().tokens(now_ms, text, counted, channel)


@dataclass
class TokensPastMaxTokens(Cheat):
    """TOKENS frame ``at_seq`` bills ``max_tokens`` tokens more than it carries
    (count and running total both, so only the request's bound gives it away)."""

    at_seq: int

    def frames(self, session, frame, data):
        if frame.type != TOKENS or frame.args[0] != self.at_seq:
            return [data]
        seq, text, count, total, channel = frame.args
        extra = session.request.max_tokens  # type: ignore[union-attr]
        return [_tokens_frame(frame.job_id, seq, text, count + extra, total + extra, channel)]


@dataclass
class ExtraTokensFrame(Cheat):
    """One more TOKENS frame after the last one the model gave, just before
    the receipt: more tokens than the request asked for."""

    text: str = " and more"

    def frames(self, session, frame, data):
        if frame.type != RECEIPT:
            return [data]
        extra = _tokens_frame(frame.job_id, session.seq, self.text, 1, session.sent + 1, CONTENT)
        return [extra, data]


@dataclass
class WrongRunningTotal(Cheat):
    """TOKENS frame ``at_seq`` says a running total one above the counts sent."""

    at_seq: int

    def frames(self, session, frame, data):
        if frame.type != TOKENS or frame.args[0] != self.at_seq:
            return [data]
        seq, text, count, total, channel = frame.args
        return [_tokens_frame(frame.job_id, seq, text, count, total + 1, channel)]


@dataclass
class SkippedSeq(Cheat):
    """From TOKENS frame ``at_seq`` on, every seq is one too high (a frame skipped)."""

    at_seq: int

    def frames(self, session, frame, data):
        if frame.type != TOKENS or frame.args[0] < self.at_seq:
            return [data]
        seq, text, count, total, channel = frame.args
        return [_tokens_frame(frame.job_id, seq + 1, text, count, total, channel)]


@dataclass
class WithheldTokens(Cheat):
    """Sends no TOKENS frame from ``from_seq`` on, yet signs the honest receipt:
    one for every token the model gave, delivered or not."""

    from_seq: int

    def frames(self, session, frame, data):
        if frame.type == TOKENS and frame.args[0] >= self.from_seq:
            return []
        return [data]


@dataclass
class ForgedReceipt(Cheat):
    """The receipt is signed over other figures: ``changes`` maps a
    ``make_receipt`` keyword (``out_hash``, ``output_tokens``,
    ``prompt_eval_count``, ``cost``...) to a function of the honest value.
    The session's own books stay honest (it settles as if it had not lied)."""

    changes: dict[str, Any]

    def frames(self, session, frame, data):
        if frame.type != RECEIPT:
            return [data]
        honest = decode_receipt(frame.args[0], session.network_id)
        figures = dict(job_id=honest.job_id, hold_id=honest.hold_id, status=honest.status,
                       prompt_eval_count=honest.prompt_eval_count, eval_count=honest.eval_count,
                       output_tokens=honest.output_tokens, durations_ns=honest.durations_ns,
                       out_hash=honest.output_hash, cost=honest.cost)
        for name, change in self.changes.items():
            figures[name] = change(figures[name])
        forged = make_receipt(session.key, session.network_id, honest.signed.timestamp_ms, **figures)
        return [encode_frame(RECEIPT, frame.job_id, forged.wire)]


@dataclass
class InflatedCounts(Cheat):
    """Counts every chunk of the model's ``factor`` times, consistently: the
    counts, running totals and receipt all agree with each other, and the
    stream ends at ``max_tokens`` billed tokens (chunks past it are dropped)."""

    factor: int = 2

    def count(self, session, count):
        buffered = sum(c for _, c, _ in session.buffer)
        room = session.request.max_tokens - session.sent - buffered  # type: ignore[union-attr]
        counted = min(count * self.factor, room)
        return counted if counted > 0 else None


@dataclass
class CancelsAndStreamsOn(Cheat):
    """Sends a CANCEL of its own right after TOKENS frame ``at_seq``, then
    streams on to the end as if it had not, and signs a receipt for all of it."""

    at_seq: int

    def frames(self, session, frame, data):
        if frame.type != TOKENS or frame.args[0] != self.at_seq:
            return [data]
        return [data, encode_frame(CANCEL, frame.job_id, R_OTHER, "stopping here")]


@dataclass
class IgnoresCancel(Cheat):
    """Never sees the consumer's CANCEL: streams on to ``max_tokens`` and
    signs a receipt for all of it, paid or shown or not."""

    def heed(self, session, frame):
        return frame.type != CANCEL


@dataclass
class KeepsItsClaim(Cheat):
    """Makes no CLAIM of its own: keeps the voucher (``claims``) for the
    test to claim with, or to forge a bigger claim from."""

    claims: list[Claim] = field(default_factory=list)

    def claim(self, session, claim):
        self.claims.append(claim)
        return []


class Sessions:
    """Every job session made while ``installed``: ``providers[public_key]``
    and ``consumers``, in order of making; ``cheats[public_key]`` makes that
    provider's sessions cheat."""

    def __init__(self) -> None:
        self.providers: dict[bytes, list[ProviderSession]] = defaultdict(list)
        self.consumers: list[ConsumerSession] = []
        self.cheats: dict[bytes, Cheat] = {}

    def cheat(self, provider: bytes, cheat: Cheat) -> Cheat:
        self.cheats[provider] = cheat
        return cheat

    def consumer_of(self, provider: bytes) -> list[ConsumerSession]:
        """The consumer sessions (one per attempt) that ran on ``provider``."""
        return [s for s in self.consumers if s.provider == provider]

    @contextmanager
    def installed(self) -> Iterator[Sessions]:
        provider_init, consumer_init = ProviderSession.__init__, ConsumerSession.__init__
        sessions = self

        def make_provider(self: ProviderSession, key: NodeKey, *args: Any, **kwargs: Any) -> None:
            provider_init(self, key, *args, **kwargs)
            sessions.providers[key.public_key].append(self)
            cheat = sessions.cheats.get(key.public_key)
            if cheat is not None and type(self) is ProviderSession:
                self.__class__ = CheatingSession
                self.cheat = cheat  # type: ignore[attr-defined]

        def make_consumer(self: ConsumerSession, *args: Any, **kwargs: Any) -> None:
            consumer_init(self, *args, **kwargs)
            sessions.consumers.append(self)

        ProviderSession.__init__ = make_provider  # type: ignore[method-assign]
        ConsumerSession.__init__ = make_consumer  # type: ignore[method-assign]
        try:
            yield self
        finally:
            ProviderSession.__init__ = provider_init  # type: ignore[method-assign]
            ConsumerSession.__init__ = consumer_init  # type: ignore[method-assign]


def tampered_voucher(voucher: Signed, amount: int) -> bytes:
    """``voucher`` with its amount changed and its signature kept: what a
    provider makes of a consumer's voucher to claim more than it says."""
    body = list(unpack(voucher.payload, max_size=len(voucher.payload), what="voucher"))
    body[-1] = amount  # [tag, version, network, signer, timestamp, hold id, amount]
    return pack([pack(body), voucher.signature])


def forge_claim(ledger: Ledger, key: NodeKey, hold_id: bytes, voucher_wire: bytes, now_ms: int) -> bytes:
    """A CLAIM entry of ``key``'s, next on its chain as ``ledger`` holds it,
    signed but never admitted anywhere: the wire of a claim its author's
    own ledger would have refused."""
    head = ledger.head(key.public_key)
    if head is None:
        seq, prev, timestamp = 1, b"", now_ms
    else:
        seq, prev = head[0] + 1, head[1]
        parent = ledger.get_entry(prev)
        assert parent is not None
        timestamp = max(now_ms, parent.timestamp_ms)
    signed = sign_object(key, Tag.ENTRY, ledger.network_id, timestamp, (seq, prev, CLAIM, [hold_id, voucher_wire]))
    return signed.wire

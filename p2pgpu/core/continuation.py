"""Failover that keeps one answer: the next provider continues, it does not restart.

Theory of operation
-------------------
A job's tokens reach the user as they are generated. When its provider dies
mid-stream, the tokens already delivered are on the user's screen (or in the
file they piped into) and have been paid for by vouchers. Starting the job
again elsewhere would print a second, different answer after the first
one's fragment: a corrupted answer for anything that reads stdout, and the
consumer would pay twice for the same part of it.

So the next attempt asks the next provider to *continue* the answer: the
request becomes a chat whose last message is the assistant's partial reply
(a prefill; Ollama renders the template up to that message and leaves it
open, so the model goes on from its last token), with ``max_tokens`` reduced
by the tokens already delivered and ``max_price`` by what was already paid.
The consumer prints only what the new provider adds, pays it only for that
(plus reading the longer prompt), and the user sees one answer. A plain
prompt becomes the chat ``[user: prompt]`` first, which Ollama renders the
same way as a generate request.

``plan_continuation`` decides; the node carries it out. Pure module: no I/O,
no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from p2pgpu.core.jobs import MAX_MESSAGES, encode_body, prompt_token_bound
from p2pgpu.errors import MalformedInput

ASSISTANT = "assistant"


class ContinuationKind(enum.Enum):
    SAME = "same"  # nothing was delivered: send the request as it was
    CONTINUE = "continue"  # ask for the rest of the answer
    WHOLE = "whole"  # every token asked for was delivered: the answer is complete
    TOO_LONG = "too_long"  # the answer so far no longer fits in a job request
    NO_BUDGET = "no_budget"  # max_price is spent


@dataclass(frozen=True, slots=True)
class Work:
    """What is left of a submission: the request the next attempt sends."""

    prompt: str | None
    messages: tuple[tuple[str, str], ...] | None
    max_tokens: int
    max_price: int | None  # base units left for the rest of the job; None: no limit

    @property
    def prompt_tokens_bound(self) -> int:
        return prompt_token_bound(self.prompt, self.messages)


@dataclass(frozen=True, slots=True)
class Continuation:
    kind: ContinuationKind
    work: Work  # the next attempt's request (unchanged unless kind is CONTINUE)


def _fits_a_request(messages: tuple[tuple[str, str], ...]) -> bool:
    """Whether the job codec can carry this chat (the one encoding, not an estimate)."""
    if len(messages) > MAX_MESSAGES:
        return False
    try:
        encode_body("chat", None, messages)
    except MalformedInput:
        return False
    return True


def plan_continuation(original: Work, answer: str, delivered_tokens: int, paid: int) -> Continuation:
    """How the next attempt continues ``original`` after ``answer`` (made
    of ``delivered_tokens`` tokens) was delivered and ``paid`` base units
    were paid for the job so far, over all attempts."""
    max_price = None if original.max_price is None else original.max_price - paid
    if max_price is not None and max_price <= 0:
        return Continuation(ContinuationKind.NO_BUDGET, original)
    if delivered_tokens <= 0 or not answer:
        return Continuation(ContinuationKind.SAME, Work(original.prompt, original.messages, original.max_tokens,
                                                        max_price))
    left = original.max_tokens - delivered_tokens
    if left <= 0:
        return Continuation(ContinuationKind.WHOLE, original)
    if original.messages is not None:
        messages = list(original.messages)
    else:
        messages = [("user", original.prompt or "")]
    if messages and messages[-1][0] == ASSISTANT:  # the user's own prefill: the answer extends it
        messages[-1] = (ASSISTANT, messages[-1][1] + answer)
    else:
        messages.append((ASSISTANT, answer))
    continued = tuple(messages)
    if not _fits_a_request(continued):
        return Continuation(ContinuationKind.TOO_LONG, original)
    return Continuation(ContinuationKind.CONTINUE, Work(None, continued, left, max_price))

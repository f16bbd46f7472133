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

Only the *content* channel is continued: thinking and tool calls already
delivered stay delivered (they are counted among the tokens delivered, as
they were paid), and the prefill is the answer's text. The job's params go
along unchanged (a prompt's images move onto its user message, which is
where a chat carries them). An embed job is continued by asking only for
the inputs whose vectors have not arrived: each vector is one token, so
the tokens delivered say how many inputs are done.

``plan_continuation`` decides; the node carries it out. Pure module: no I/O,
no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from p2pgpu.core.jobparams import JobParams, MessageExtra
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
    """What is left of a submission: the request the next attempt sends.
    ``inputs`` makes it an embed job (``max_tokens`` is then their number)."""

    prompt: str | None
    messages: tuple[tuple[str, str], ...] | None
    max_tokens: int
    max_price: int | None  # base units left for the rest of the job; None: no limit
    params: JobParams = JobParams()
    inputs: tuple[str, ...] | None = None

    @property
    def prompt_tokens_bound(self) -> int:
        return prompt_token_bound(self.prompt, self.messages, params=self.params, inputs=self.inputs)

    @property
    def kind(self) -> str:
        return "embed" if self.inputs is not None else "chat" if self.messages is not None else "generate"

    def body(self) -> bytes:
        """The REQUEST body this work makes (``MalformedInput`` when it
        makes none: params that do not fit, or more than a body holds)."""
        return encode_body(self.kind, self.prompt, self.messages, self.params, self.inputs)


def params_for_chat(params: JobParams, shift: int, user_index: int | None) -> JobParams:
    """``params`` of a job whose messages move ``shift`` places on (a system
    message put first) and whose prompt becomes the user message at
    ``user_index``: extras follow their messages, and a prompt's images go
    onto that user message, where a chat carries them."""
    if params.empty or (shift == 0 and not params.images):
        return params
    extras = [(index + shift, extra) for index, extra in params.message_extras]
    if params.images and user_index is not None:
        extras.append((user_index, MessageExtra(images=params.images)))
    return replace(params, images=(), message_extras=tuple(sorted(extras, key=lambda item: item[0])))


@dataclass(frozen=True, slots=True)
class Continuation:
    kind: ContinuationKind
    work: Work  # the next attempt's request (unchanged unless kind is CONTINUE)


def _fits_a_request(messages: tuple[tuple[str, str], ...], params: JobParams) -> bool:
    """Whether the job codec can carry this chat (the one encoding, not an estimate)."""
    if len(messages) > MAX_MESSAGES:
        return False
    try:
        encode_body("chat", None, messages, params)
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
    if original.inputs is not None:
        return _continue_embedding(original, delivered_tokens, max_price)
    if delivered_tokens <= 0 or not answer:
        return Continuation(ContinuationKind.SAME, replace(original, max_price=max_price))
    left = original.max_tokens - delivered_tokens
    if left <= 0:
        return Continuation(ContinuationKind.WHOLE, original)
    if original.messages is not None:
        messages = list(original.messages)
        params = original.params
    else:
        messages = [("user", original.prompt or "")]
        params = params_for_chat(original.params, 0, 0)
    if messages and messages[-1][0] == ASSISTANT:  # the user's own prefill: the answer extends it
        messages[-1] = (ASSISTANT, messages[-1][1] + answer)
    else:
        messages.append((ASSISTANT, answer))
    continued = tuple(messages)
    if not _fits_a_request(continued, params):
        return Continuation(ContinuationKind.TOO_LONG, original)
    return Continuation(ContinuationKind.CONTINUE, Work(None, continued, left, max_price, params))


def _continue_embedding(original: Work, delivered: int, max_price: int | None) -> Continuation:
    """The vectors come in the inputs' order, one token each: the next
    attempt embeds only the inputs after the ``delivered`` first ones."""
    assert original.inputs is not None
    if delivered <= 0:
        return Continuation(ContinuationKind.SAME, replace(original, max_price=max_price))
    rest = original.inputs[delivered:]
    if not rest:
        return Continuation(ContinuationKind.WHOLE, original)
    return Continuation(ContinuationKind.CONTINUE, replace(original, inputs=rest, max_tokens=len(rest),
                                                            max_price=max_price))

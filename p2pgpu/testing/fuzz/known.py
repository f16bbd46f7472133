"""Findings we know of and have reported, but that are not fixed yet, and
the ones fixed since (kept as regression inputs).

Each entry is a finding's signature (``Finding.signature``: target, kind,
exception type, the p2pgpu function that raised) with the smallest input we
know that makes it, in the target's own input form (or a function that
makes it from the corpus). ``tests/test_fuzz.py`` checks both ways:

- the short pass finds nothing outside this list, so the list cannot grow
  silently: a new finding fails the test until it is fixed or added here
  (with its reproducer and a note);
- every reproducer still makes its finding, so a fixed bug fails the test
  too, saying which entry to delete: the list never keeps an entry that no
  longer protects anything.

Move an entry to ``FIXED_FINDINGS`` in the commit that fixes it: from then
on its reproducer must stay handled (``tests/test_fuzz.py``). Several
entries share one root cause; the notes say which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["KnownFinding", "KNOWN_FINDINGS", "KNOWN_SIGNATURES", "FIXED_FINDINGS"]


@dataclass(frozen=True)
class KnownFinding:
    signature: str
    input: Any  # the reproducer, as the target's ``generate`` would make it, or a function making it
    note: str
    bound_s: float | None = None  # a slow finding: the reproducer takes longer than this (5 times it here)

    def make(self) -> Any:
        return self.input() if callable(self.input) else self.input


# Root cause (file:line as of the run that found it; a signature names the function):
#
# J. A lone surrogate in the text of a submitted job (a "\ud800" escape in a
#    client's JSON: the prompt, a message, the system prompt, an input to
#    embed, a stop sequence) passes the local API's and the gateway's checks
#    and reaches the msgpack packer in p2pgpu/core/jobs.py:433 and :436
#    (encode_body, through submission.work_of): UnicodeEncodeError, not
#    MalformedInput. The API answers 500 (for a stop sequence already at
#    p2pgpu/api.py:646, _submit_request, measuring params.to_json() as
#    UTF-8); each gateway surface raises it out of prompt_bound
#    (p2pgpu/gateway/jobs.py, which catches MalformedInput only), so out of
#    its handler. Not reachable from peers: msgpack strings are strict UTF-8.


def _submit(body: bytes) -> tuple[str, bytes, bytes, bool]:
    return "POST", b"/v1/submit", body, True


KNOWN_FINDINGS: tuple[KnownFinding, ...] = (
    KnownFinding("api: check 'status 500' UnicodeEncodeError at p2pgpu/core/jobs.py:encode_body",
                 _submit(b'{"model":"m","prompt":"\\ud800"}'), "J"),
    KnownFinding("api: check 'status 500' UnicodeEncodeError at p2pgpu/api.py:_submit_request",
                 _submit(b'{"model":"m","prompt":"hi","params":{"options":{"stop":"\\ud800"}}}'), "J"),
    KnownFinding("gateway.ollama.chat_request: untyped UnicodeEncodeError at p2pgpu/core/jobs.py:encode_body",
                 {"model": "m", "messages": [{"role": "user", "content": "\ud800"}]}, "J"),
    KnownFinding("gateway.ollama.generate_request: untyped UnicodeEncodeError at p2pgpu/core/jobs.py:encode_body",
                 {"model": "m", "prompt": "\ud800"}, "J"),
    KnownFinding("gateway.openai.chat_request: untyped UnicodeEncodeError at p2pgpu/core/jobs.py:encode_body",
                 {"model": "m", "messages": [{"role": "user", "content": "\ud800"}]}, "J"),
    KnownFinding("gateway.openai.completion_request: untyped UnicodeEncodeError at p2pgpu/core/jobs.py:encode_body",
                 {"model": "m", "prompt": "\ud800"}, "J"),
)


KNOWN_SIGNATURES = frozenset(k.signature for k in KNOWN_FINDINGS)

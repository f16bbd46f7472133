"""Logging what remote peers cause: one line per kind of trouble, counted, rate-limited.

Theory of operation
-------------------
Anything a remote peer sends it can send again, thousands of times a second
and from as many identities as it cares to generate. Logging each bad frame
(worse, with a traceback) hands every peer a way to fill our disk and bury
what matters. So every place that logs something a peer caused goes through
one ``PeerLog`` per host, which:

* classifies the cause (``Trouble``: oversized input, a bad signature, a
  reset stream...) from the exception, never logging a traceback for it;
* logs the first occurrence per (peer, trouble, protocol or topic) as one
  line, ``peer 12D3KooW... sent oversized input on /p2pgpu/ledger-sync/1.0.0:
  ...``, and only counts the repeats for the next ``window_s`` seconds;
* when that window has passed, says in one line how many repeats it did not
  log (``... and 532 more like it in the last 60 s``), and keeps counting
  while they go on: a peer that never stops costs one line per window;
* holds at most ``max_keys`` keys, least recently seen out first, so a
  flood of fresh identities cannot grow the table; and writes at most
  ``max_lines`` lines of this kind per window in all, folding the rest into
  one line at the window's end, so it cannot fill the log either;
* keeps tracebacks for our own bugs (an exception no peer input should
  produce), rate-limited the same way per (protocol, exception type).

``EventLimiter`` is the decision, sans-IO: the time is a parameter of every
call, and it returns what to write (``Line``, ``Summary``, ``Overflow``).
``PeerLog`` reads a monotonic clock (injectable), renders those into log
records on the caller's logger, and counts every event per ``Trouble`` for
the node's status (``stats()``). Summaries fall due without any new event,
so the host runs ``PeerLog.run`` (a flush every second) in its nursery.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from p2pgpu.errors import (
    BadSignature,
    LedgerRuleViolation,
    MalformedInput,
    Oversized,
    P2PGPUError,
    PeerMisbehaved,
    Truncated,
    WrongNetwork,
)

__all__ = [
    "EventLimiter",
    "Line",
    "Overflow",
    "PeerLog",
    "Summary",
    "Trouble",
    "one_line",
    "refine",
    "trouble_of",
]

WINDOW_S = 60.0
MAX_KEYS = 4096
MAX_LINES = 100  # per window, every key together
MAX_DETAIL = 300  # characters of a reason kept on its line
FLUSH_INTERVAL_S = 1.0


class Trouble(enum.Enum):
    """What a peer did, as the log line says it, and the level it is logged at."""

    OVERSIZED = ("oversized", "sent oversized input", logging.INFO)
    TRUNCATED = ("truncated", "sent truncated input", logging.INFO)
    MALFORMED = ("malformed", "sent malformed input", logging.INFO)
    BAD_SIGNATURE = ("bad_signature", "sent a bad signature", logging.INFO)
    WRONG_NETWORK = ("wrong_network", "sent another network's object", logging.INFO)
    INVALID_ENTRY = ("invalid_entry", "sent an entry the ledger refuses", logging.INFO)
    TIMEOUT = ("timeout", "was too slow", logging.INFO)
    PROTOCOL = ("protocol", "broke the protocol", logging.INFO)
    ERROR = ("error", "caused an error", logging.INFO)
    REJECTED = ("rejected", "had a request refused", logging.INFO)
    # Common in an honest network (a peer shutting down, a restart), so
    # counted but kept out of an INFO log.
    RESET = ("reset", "reset the stream or lost its connection", logging.DEBUG)
    UNREACHABLE = ("unreachable", "could not be reached", logging.DEBUG)
    REFUSED_PROTOCOL = ("refused_protocol", "does not serve the protocol", logging.DEBUG)
    RATE_LIMITED = ("rate_limited", "sent over its gossip rate", logging.DEBUG)

    def __init__(self, label: str, phrase: str, level: int) -> None:
        self.label = label
        self.phrase = phrase
        self.level = level


# Exception families, most specific first. The network's own refinements of
# these (StreamAborted...) are added by the module that defines them.
_REFINED: list[tuple[type[BaseException], Trouble]] = []
_FAMILIES: tuple[tuple[type[BaseException], Trouble], ...] = (
    (Oversized, Trouble.OVERSIZED),
    (Truncated, Trouble.TRUNCATED),
    (MalformedInput, Trouble.MALFORMED),
    (BadSignature, Trouble.BAD_SIGNATURE),
    (WrongNetwork, Trouble.WRONG_NETWORK),
    (LedgerRuleViolation, Trouble.INVALID_ENTRY),
    (PeerMisbehaved, Trouble.PROTOCOL),
    (P2PGPUError, Trouble.ERROR),
    # Should have been translated into MalformedInput where they were
    # raised; the bytes were the peer's all the same.
    (msgpack.UnpackException, Trouble.MALFORMED),
    (msgpack.ExtraData, Trouble.MALFORMED),
    # trio's word for "something outside failed" (a connection died).
    (trio.BrokenResourceError, Trouble.RESET),
)


def refine(exc_type: type[BaseException], trouble: Trouble) -> None:
    """Classify ``exc_type`` (and its subclasses) as ``trouble``, ahead of
    the families above: for an error class that refines one of them in
    another module (``StreamAborted`` is a ``PeerMisbehaved`` that is a
    reset). Call at import time."""
    _REFINED[:] = [(t, k) for t, k in _REFINED if t is not exc_type]
    _REFINED.insert(0, (exc_type, trouble))


def trouble_of(exc: BaseException) -> Trouble | None:
    """What a peer did to raise ``exc``; None when no peer input explains
    it (our own bug). A group counts as the peer's when every exception in
    it is (the first one names it)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [leaf for leaf in _leaves(exc) if not isinstance(leaf, trio.Cancelled)]
        troubles = [trouble_of(leaf) for leaf in leaves]
        if troubles and all(t is not None for t in troubles):
            return troubles[0]
        return None
    for exc_type, trouble in (*_REFINED, *_FAMILIES):
        if isinstance(exc, exc_type):
            return trouble
    return None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _leaf(exc: BaseException) -> BaseException:
    """The exception whose message a line quotes (the first of a group)."""
    leaves = [leaf for leaf in _leaves(exc) if not isinstance(leaf, trio.Cancelled)]
    return leaves[0] if leaves else exc


def one_line(text: str, limit: int = MAX_DETAIL) -> str:
    """``text`` fit for one log line: unprintable characters (newlines
    included: a peer must not be able to forge lines) escaped, at most
    ``limit`` characters."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


# --- the decision (sans-IO) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    """Write the first event of a window for ``key``."""

    key: Hashable
    context: Any


@dataclass(frozen=True, slots=True)
class Summary:
    """``count`` more events like the one written for ``key`` came in the
    ``window_s`` after it; a new window has begun."""

    key: Hashable
    context: Any
    count: int
    window_s: float


@dataclass(frozen=True, slots=True)
class Overflow:
    """``count`` events in the last ``window_s`` that no line speaks for:
    past the line budget, or their keys were pushed out of the table."""

    count: int
    window_s: float


Emit = Line | Summary | Overflow


class _Window:
    __slots__ = ("started", "count", "logged", "context")

    def __init__(self, started: float, logged: bool, context: Any) -> None:
        self.started = started
        self.count = 0  # events after the first, not written
        self.logged = logged  # a Line was written for this window
        self.context = context


class EventLimiter:
    """Which events to write, per key, in windows of ``window_s`` seconds.

    ``event(key, now, context)`` returns what to write now: a ``Line`` for
    the first event of a key (or the first after a quiet window), nothing
    for a repeat within the window (it is counted). ``due(now)`` returns a
    ``Summary`` for each key whose window has passed with repeats in it (the
    key then starts a new window and keeps counting), and an ``Overflow``
    once per window for events no line covers. Lines and summaries share a
    budget of ``max_lines`` per window; past it events only go into the
    overflow. At most ``max_keys`` keys are held, the least recently seen
    dropped first (its unwritten count goes to the overflow).

    ``now`` is any monotonic clock in seconds; nothing here reads one.
    """

    def __init__(self, window_s: float = WINDOW_S, max_keys: int = MAX_KEYS, max_lines: int = MAX_LINES) -> None:
        if window_s <= 0 or max_keys < 1 or max_lines < 1:
            raise ValueError("need window_s > 0, max_keys >= 1 and max_lines >= 1")
        self.window_s = window_s
        self.max_keys = max_keys
        self.max_lines = max_lines
        self._windows: OrderedDict[Hashable, _Window] = OrderedDict()
        self._period_started: float | None = None
        self._lines_left = max_lines
        self._overflow = 0
        self.events = 0  # every event seen
        self.written = 0  # lines and summaries written
        self.evicted = 0  # keys dropped to make room

    def __len__(self) -> int:
        return len(self._windows)

    def event(self, key: Hashable, now: float, context: Any = None) -> list[Emit]:
        self.events += 1
        out: list[Emit] = []
        self._roll_period(now, out)
        window = self._windows.get(key)
        if window is not None and now >= window.started + self.window_s:
            self._close(key, window, now, out)
            window = self._windows.get(key)
        if window is None:
            logged = self._take_line()
            self._insert(key, _Window(now, logged, context))
            if logged:
                out.append(Line(key, context))
            else:
                self._overflow += 1
            return out
        self._windows.move_to_end(key)
        if window.logged:
            window.count += 1
        else:
            self._overflow += 1
        return out

    def due(self, now: float, *, final: bool = False) -> list[Emit]:
        """``final``: we are closing; summarise every window now, ended or
        not (a summary's ``window_s`` is then the time it really covers)."""
        out: list[Emit] = []
        if not final:
            self._roll_period(now, out)
        ended = [(key, w) for key, w in self._windows.items() if final or now >= w.started + self.window_s]
        for key, window in ended:
            self._close(key, window, now, out)
        if final:  # last, so that what the budget left out is in it
            self._roll_period(now, out, final=True)
        return out

    def pending(self) -> int:
        """Events counted but not yet written in any summary."""
        return self._overflow + sum(w.count for w in self._windows.values())

    def _close(self, key: Hashable, window: _Window, now: float, out: list[Emit]) -> None:
        if window.logged and window.count:
            if self._take_line():
                span = max(0.1, round(min(now - window.started, self.window_s), 1))
                out.append(Summary(key, window.context, window.count, span))
                window.started, window.count = now, 0  # still going: keep counting
                return
            self._overflow += window.count
        del self._windows[key]

    def _roll_period(self, now: float, out: list[Emit], *, final: bool = False) -> None:
        if self._period_started is None:
            self._period_started = now
        elif final or now >= self._period_started + self.window_s:
            if self._overflow:
                span = max(0.1, round(min(now - self._period_started, self.window_s), 1))
                out.append(Overflow(self._overflow, span))
                self.written += 1
            self._overflow = 0
            self._lines_left = self.max_lines
            self._period_started = now

    def _take_line(self) -> bool:
        if self._lines_left <= 0:
            return False
        self._lines_left -= 1
        self.written += 1
        return True

    def _insert(self, key: Hashable, window: _Window) -> None:
        while len(self._windows) >= self.max_keys:
            _, old = self._windows.popitem(last=False)
            self.evicted += 1
            if old.logged:
                self._overflow += old.count
        self._windows[key] = window


# --- the edge: clock, log records, counters -----------------------------------


@dataclass(frozen=True, slots=True)
class _Said:
    """What a window's summary repeats of its first line."""

    logger: logging.Logger
    level: int
    subject: str  # "peer X sent oversized input on P"


class PeerLog:
    """One host's log of what its peers caused (see the module docstring).

    ``failed(logger, peer_id, where, exc)``: the peer's input raised ``exc``
    while we served ``where`` (a protocol id or topic); written as the
    peer's trouble without a traceback, or as our bug with one when no
    peer input explains it. ``note(...)``: the same for a trouble already
    named. ``bug(logger, where, exc, what)``: our own bug, traceback and
    all, at most one per (``where``, exception type) per window.
    ``clock``: monotonic seconds (tests pass their own).
    """

    def __init__(self, *, window_s: float = WINDOW_S, max_keys: int = MAX_KEYS, max_lines: int = MAX_LINES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._peers = EventLimiter(window_s, max_keys, max_lines)
        self._bugs = EventLimiter(window_s, 256, max_lines)
        self._counts = dict.fromkeys((t.label for t in Trouble), 0)
        self._counts["bugs"] = 0
        self._overflow_logger = logging.getLogger(__name__)

    def failed(self, logger: logging.Logger, peer_id: str | None, where: str, exc: BaseException,
               *, what: str = "", level: int | None = None) -> None:
        """``what``: what we were doing, to start the reason with (``"sync
        (periodic)"``); ``level``: instead of the trouble's own."""
        trouble = trouble_of(exc)
        if trouble is None:
            self.bug(logger, where, exc, f"{what or 'serving ' + where} with peer {peer_id} raised")
            return
        leaf = _leaf(exc)
        detail = f"{type(leaf).__name__}: {leaf}" if trouble is Trouble.ERROR else str(leaf) or type(leaf).__name__
        self.note(logger, peer_id, where, trouble, f"{what}: {detail}" if what else detail, level=level)

    def note(self, logger: logging.Logger, peer_id: str | None, where: str, trouble: Trouble, detail: str,
             *, level: int | None = None) -> None:
        self._counts[trouble.label] += 1
        peer = peer_id or "(unknown)"
        key = (peer, trouble, where)
        level = trouble.level if level is None else level
        said = _Said(logger, level, f"peer {peer} {trouble.phrase} on {where}")
        for emit in self._peers.event(key, self.clock(), said):
            self._write(emit, f"{said.subject}: {one_line(detail)}")

    def bug(self, logger: logging.Logger, where: str, exc: BaseException, what: str) -> None:
        self._counts["bugs"] += 1
        key = (where, type(exc).__qualname__)
        said = _Said(logger, logging.WARNING, one_line(what))
        for emit in self._bugs.event(key, self.clock(), said):
            if isinstance(emit, Line):
                logger.warning("%s", said.subject, exc_info=exc)
            else:
                self._write(emit, "", bugs=True)

    def flush(self, *, final: bool = False) -> None:
        """Write the summaries that have fallen due (``run`` calls this);
        ``final``: every count not yet written (the host is closing)."""
        now = self.clock()
        for limiter in (self._peers, self._bugs):
            for emit in limiter.due(now, final=final):
                self._write(emit, "", bugs=limiter is self._bugs)

    async def run(self, interval_s: float = FLUSH_INTERVAL_S) -> None:
        """Flush every ``interval_s`` until cancelled."""
        while True:
            await trio.sleep(interval_s)
            self.flush()

    def stats(self) -> dict[str, int]:
        """Events per trouble (``Trouble.label``) since start, ``bugs``, and
        the log's own state: ``lines`` written, ``unwritten`` repeats not yet
        summarised, ``tracked`` keys, ``evicted`` keys."""
        out = dict(self._counts)
        out["lines"] = self._peers.written + self._bugs.written
        out["unwritten"] = self._peers.pending() + self._bugs.pending()
        out["tracked"] = len(self._peers)
        out["evicted"] = self._peers.evicted
        return out

    def _write(self, emit: Emit, line: str, *, bugs: bool = False) -> None:
        if isinstance(emit, Line):
            said: _Said = emit.context
            said.logger.log(said.level, "%s", line)
        elif isinstance(emit, Summary):
            said = emit.context
            said.logger.log(said.level, "%s \u2026 and %d more like it in the last %g s",
                            said.subject, emit.count, emit.window_s)
        else:
            self._overflow_logger.info(
                "\u2026 and %d more %s in the last %g s, not logged one by one "
                "(over %d lines, or more keys than the log tracks)",
                emit.count, "errors of ours" if bugs else "events caused by peers", emit.window_s,
                self._peers.max_lines)

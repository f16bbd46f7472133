"""The peer log's limiter (sans-IO, time as a parameter) and its log records.

No sleeping anywhere: the limiter takes ``now``, and ``PeerLog`` a clock
that the tests move by hand.
"""

from __future__ import annotations

import logging

import msgpack
import pytest
import trio

from p2pgpu.core.sync import SyncTimeout
from p2pgpu.errors import (
    BadSignature, ConfigError, MalformedInput, Oversized, P2PGPUError, PeerMisbehaved, Truncated,
)
from p2pgpu.net import PeerUnreachable, ProtocolNotSupported, StreamAborted
from p2pgpu.net.peerlog import EventLimiter, Line, Overflow, PeerLog, Summary, Trouble, one_line, trouble_of

from p2pgpu.testing.waiting import wait_until

import p2pgpu.replication  # noqa: F401 - refines SyncTimeout

SYNC = "/p2pgpu/ledger-sync/1.0.0"
ALICE = "12D3KooWAlice"
MALLORY = "12D3KooWMallory"
log = logging.getLogger("p2pgpu.test_peerlog")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- EventLimiter ---------------------------------------------------------------


def test_first_event_is_written_repeats_are_counted_and_summarised_after_the_window():
    limiter = EventLimiter(window_s=60, max_keys=16, max_lines=100)
    assert limiter.event("k", 0.0, "ctx") == [Line("k", "ctx")]
    for t in range(1, 533):
        assert limiter.event("k", t * 0.1, "ctx") == []
    assert limiter.due(59.9) == []
    assert limiter.pending() == 532
    assert limiter.due(60.0) == [Summary("k", "ctx", 532, 60.0)]
    assert limiter.pending() == 0
    # Still going: counted in a new window, summarised again, never a new line.
    assert limiter.event("k", 61.0) == []
    assert limiter.due(120.0) == [Summary("k", "ctx", 1, 60.0)]
    # A window with no repeats ends quietly, and the next event is a line again.
    assert limiter.due(180.0) == []
    assert len(limiter) == 0
    assert limiter.event("k", 181.0, "again") == [Line("k", "again")]


def test_a_repeat_after_the_window_brings_its_summary_with_it():
    # No flush ran in between: the event itself closes the old window.
    limiter = EventLimiter(window_s=60)
    limiter.event("k", 0.0, "ctx")
    limiter.event("k", 1.0)
    assert limiter.event("k", 75.0) == [Summary("k", "ctx", 1, 60.0)]
    assert limiter.due(134.0) == []
    assert limiter.due(135.0) == [Summary("k", "ctx", 1, 60.0)]  # the event at 75 s


def test_keys_are_independent():
    limiter = EventLimiter(window_s=10)
    assert limiter.event(("p1", "oversized"), 0.0, 1) == [Line(("p1", "oversized"), 1)]
    assert limiter.event(("p1", "truncated"), 0.0, 2) == [Line(("p1", "truncated"), 2)]
    assert limiter.event(("p2", "oversized"), 0.0, 3) == [Line(("p2", "oversized"), 3)]
    assert limiter.event(("p1", "oversized"), 1.0) == []
    assert limiter.due(10.0) == [Summary(("p1", "oversized"), 1, 1, 10.0)]


def test_the_table_is_capped_least_recently_seen_out_first():
    limiter = EventLimiter(window_s=60, max_keys=3, max_lines=1000)
    for i in range(3):
        limiter.event(i, 0.0)
    limiter.event(0, 1.0)  # 0 is now the most recently seen
    limiter.event(0, 1.0)
    limiter.event(99, 2.0)  # pushes out 1, the least recently seen
    assert len(limiter) == 3 and limiter.evicted == 1
    assert limiter.event(0, 3.0) == []  # still known: counted
    assert limiter.event(1, 3.0) == [Line(1, None)]  # forgotten: a line again (and 2 goes)
    for i in range(10_000):  # a flood of fresh identities
        limiter.event(("sybil", i), 4.0)
    assert len(limiter) == 3
    assert limiter.evicted == 2 + 10_000


def test_lines_are_budgeted_per_window_and_the_rest_is_one_overflow():
    limiter = EventLimiter(window_s=60, max_keys=4096, max_lines=5)
    written = [e for i in range(1000) for e in limiter.event(("sybil", i), 0.0)]
    assert written == [Line(("sybil", i), None) for i in range(5)]
    assert limiter.pending() == 995
    out = limiter.due(60.0)
    assert out == [Overflow(995, 60.0)]
    assert limiter.due(120.0) == []


def test_summaries_share_the_budget_and_what_they_leave_out_overflows():
    limiter = EventLimiter(window_s=60, max_keys=100, max_lines=3)
    for key in "abc":
        limiter.event(key, 0.0)
        limiter.event(key, 1.0)
    assert limiter.event("d", 2.0) == []  # over budget: no line
    # New window: budget 3 again; the three summaries take it all.
    out = limiter.due(60.0)
    assert out[0] == Overflow(1, 60.0)
    assert [e.count for e in out[1:]] == [1, 1, 1]


def test_final_flush_summarises_unfinished_windows():
    limiter = EventLimiter(window_s=60, max_lines=1)
    limiter.event("a", 0.0, "ctx")
    limiter.event("a", 1.0)
    limiter.event("b", 2.0)  # over budget
    assert limiter.due(12.0) == []
    assert limiter.due(12.0, final=True) == [Overflow(2, 12.0)]  # b's event, and a's: the budget is spent
    limiter = EventLimiter(window_s=60)
    limiter.event("a", 0.0, "ctx")
    limiter.event("a", 1.0)
    assert limiter.due(12.34, final=True) == [Summary("a", "ctx", 1, 12.3)]


def test_limits_are_checked():
    with pytest.raises(ValueError):
        EventLimiter(window_s=0)
    with pytest.raises(ValueError):
        EventLimiter(max_keys=0)


# --- classification ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "trouble"),
    [
        (Oversized("2147483648 bytes"), Trouble.OVERSIZED),
        (Truncated("short"), Trouble.TRUNCATED),
        (MalformedInput("bad"), Trouble.MALFORMED),
        (BadSignature("bad"), Trouble.BAD_SIGNATURE),
        (PeerMisbehaved("rude"), Trouble.PROTOCOL),
        (SyncTimeout("slow"), Trouble.TIMEOUT),
        (StreamAborted("reset"), Trouble.RESET),
        (ProtocolNotSupported("no"), Trouble.REFUSED_PROTOCOL),
        (PeerUnreachable("gone"), Trouble.UNREACHABLE),
        (ConfigError("ours, but on purpose"), Trouble.ERROR),
        (msgpack.exceptions.ExtraData(1, b"x"), Trouble.MALFORMED),
        (msgpack.exceptions.FormatError("x"), Trouble.MALFORMED),
        (trio.BrokenResourceError(), Trouble.RESET),
        (ExceptionGroup("g", [Truncated("a"), StreamAborted("b")]), Trouble.TRUNCATED),
    ],
)
def test_what_peers_cause_is_classified(exc, trouble):
    assert trouble_of(exc) is trouble


@pytest.mark.parametrize(
    "exc",
    [ValueError("a bug"), KeyError("k"), trio.ClosedResourceError(), AssertionError(),
     ExceptionGroup("g", [Truncated("a"), ValueError("bug")])],
)
def test_our_bugs_are_not_the_peers(exc):
    assert trouble_of(exc) is None


def test_a_reason_stays_on_one_line():
    assert one_line("a\nb\r\x1b[31m") == "a\\nb\\r\\x1b[31m"
    assert len(one_line("x" * 10_000)) == 300


# --- PeerLog: records -----------------------------------------------------------------


def records(caplog, who: str = MALLORY) -> list[logging.LogRecord]:
    return [r for r in caplog.records if who in r.getMessage()]


def test_a_flood_from_one_peer_is_one_line_then_one_summary(caplog):
    caplog.set_level(logging.DEBUG, logger="p2pgpu")
    clock = Clock()
    peer_log = PeerLog(clock=clock)
    for _ in range(533):
        peer_log.failed(log, MALLORY, SYNC, Oversized("peer announced a 2147483648-byte frame; the limit is 1048576"))
        clock.now += 0.01
    first = records(caplog)
    assert [r.getMessage() for r in first] == [
        f"peer {MALLORY} sent oversized input on {SYNC}: "
        "peer announced a 2147483648-byte frame; the limit is 1048576"]
    assert first[0].levelno == logging.INFO and first[0].exc_info is None and first[0].name == log.name
    peer_log.flush()
    assert len(records(caplog)) == 1  # the window has not passed
    clock.now += 60
    peer_log.flush()
    summary = records(caplog)[1]
    assert summary.getMessage() == (f"peer {MALLORY} sent oversized input on {SYNC} "
                                    "\u2026 and 532 more like it in the last 60 s")
    assert "Traceback" not in caplog.text
    stats = peer_log.stats()
    assert stats["oversized"] == 533 and stats["bugs"] == 0 and stats["lines"] == 2
    assert stats["tracked"] == 1 and stats["unwritten"] == 0


def test_other_peers_and_kinds_get_their_own_line(caplog):
    caplog.set_level(logging.INFO, logger="p2pgpu")
    peer_log = PeerLog(clock=Clock())
    for _ in range(5):
        peer_log.failed(log, MALLORY, SYNC, Oversized("big"))
        peer_log.failed(log, MALLORY, SYNC, Truncated("short"))
        peer_log.failed(log, ALICE, SYNC, Oversized("big"))
        peer_log.failed(log, MALLORY, SYNC, StreamAborted("reset"))  # DEBUG: counted, not at INFO
    assert [r.getMessage() for r in caplog.records] == [
        f"peer {MALLORY} sent oversized input on {SYNC}: big",
        f"peer {MALLORY} sent truncated input on {SYNC}: short",
        f"peer {ALICE} sent oversized input on {SYNC}: big",
    ]
    assert peer_log.stats()["reset"] == 5


def test_a_peers_newlines_cannot_forge_log_lines(caplog):
    caplog.set_level(logging.INFO, logger="p2pgpu")
    PeerLog(clock=Clock()).failed(log, MALLORY, SYNC, MalformedInput("x\nINFO p2pgpu: all is well"))
    (record,) = caplog.records
    assert "\n" not in record.getMessage()


def test_our_bugs_keep_their_traceback_once_per_window(caplog):
    caplog.set_level(logging.INFO, logger="p2pgpu")
    clock = Clock()
    peer_log = PeerLog(clock=clock)
    for _ in range(50):
        try:
            raise ValueError("a bug of ours")
        except ValueError as exc:
            peer_log.failed(log, MALLORY, SYNC, exc)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.exc_info is not None
    assert "Traceback" in caplog.text and "a bug of ours" in caplog.text
    peer_log.bug(log, SYNC, KeyError("k"), "another type: its own line")
    assert len(caplog.records) == 2
    clock.now += 61
    peer_log.flush()
    assert caplog.records[-1].getMessage() == (
        f"serving {SYNC} with peer {MALLORY} raised \u2026 and 49 more like it in the last 60 s")
    assert caplog.records[-1].exc_info is None
    assert peer_log.stats()["bugs"] == 51


def test_a_sybil_flood_keeps_the_table_and_the_log_bounded(caplog):
    caplog.set_level(logging.INFO, logger="p2pgpu")
    clock = Clock()
    peer_log = PeerLog(clock=clock, max_keys=64, max_lines=10)
    for i in range(20_000):
        peer_log.failed(log, f"12D3KooWSybil{i}", SYNC, Oversized("big"))
    assert peer_log.stats()["tracked"] == 64
    assert len(caplog.records) == 10
    clock.now += 60
    peer_log.flush()
    assert len(caplog.records) == 11
    assert caplog.records[-1].getMessage() == (
        "\u2026 and 19990 more events caused by peers in the last 60 s, not logged one by one "
        "(over 10 lines, or more keys than the log tracks)")
    assert peer_log.stats()["oversized"] == 20_000


async def test_the_flush_task_writes_summaries_without_new_events(caplog):
    caplog.set_level(logging.INFO, logger="p2pgpu")
    clock = Clock()
    peer_log = PeerLog(clock=clock)
    peer_log.failed(log, MALLORY, SYNC, Oversized("big"))
    peer_log.failed(log, MALLORY, SYNC, Oversized("big"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer_log.run, 0.001)
        clock.now += 60
        await wait_until(lambda: len(caplog.records) == 2, 30, what="the summary")
        nursery.cancel_scope.cancel()
    assert caplog.records[-1].getMessage().endswith("\u2026 and 1 more like it in the last 60 s")


def test_p2pgpu_errors_that_are_ours_on_purpose_still_name_their_type(caplog):
    caplog.set_level(logging.INFO, logger="p2pgpu")
    PeerLog(clock=Clock()).failed(log, MALLORY, SYNC, P2PGPUError("odd"), what="sync (periodic)")
    assert caplog.records[0].getMessage() == f"peer {MALLORY} caused an error on {SYNC}: sync (periodic): P2PGPUError: odd"

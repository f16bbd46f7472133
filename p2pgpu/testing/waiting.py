"""Waiting on conditions in trio tests: the one way the suite waits.

Tests never sleep a fixed time to synchronise; they poll a condition with a
generous deadline, so a loaded 2-core machine only makes them slower, never
wrong.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio


async def wait_until(condition: Callable[[], object], timeout: float = 30.0, *, poll: float = 0.01,
                     what: str = "condition") -> float:
    """Poll ``condition`` until it is true; returns the seconds it took.

    Raises ``trio.TooSlowError`` naming ``what`` after ``timeout`` seconds.
    """
    start = time.monotonic()
    try:
        with trio.fail_after(timeout):
            while not condition():
                await trio.sleep(poll)
    except trio.TooSlowError as exc:
        raise trio.TooSlowError(f"timed out after {timeout} s waiting for {what}") from exc
    return time.monotonic() - start


def poll_until(condition: Callable[[], object], timeout: float = 30.0, *, poll: float = 0.05,
               what: str = "condition") -> object:
    """``wait_until`` for tests that drive other processes from plain
    threads: poll ``condition`` until it returns something truthy, and
    return that. Raises ``AssertionError`` naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
    return value

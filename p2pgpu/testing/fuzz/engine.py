"""Running targets: one chunk of inputs in one process, chunks spread over
worker processes, findings merged and classified.

Theory of operation
-------------------
Input ``i`` of target ``T`` under seed ``S`` is made by a ``random.Random``
seeded from (S, T, i) alone, so a chunk is any index range, chunks can run
in any process in any order, and a finding's index is enough to make its
input again (``input_at``). Every outcome of one input is one of:

- **ok**: the target returned, or raised what it allows (the typed error);
- **untyped**: any other exception: a decoder bug;
- **check**: the target's own extra check failed (``targets.Bad``);
- **slow**: it took longer than the time bound, twice in a row (the rerun
  keeps a garbage collection or a busy machine from counting);
- **hang**: it did not return at all: the parent saw no progress for
  ``hang_s`` and killed the worker, then ran the rest of the chunk in a new one;
- **crash**: the worker died under it (a segfault in a C extension);
- **harness**: making the input failed: a bug of the fuzzer's own, reported
  like a finding (so it cannot hide) without stopping the run.

Findings are grouped by *signature*: target, kind, exception type and the
innermost p2pgpu function on the traceback (file and function, not line,
so a signature survives edits elsewhere in the file). Per signature the
engine keeps a count and the three shortest inputs it saw.
"""

from __future__ import annotations

import gc
import hashlib
import math
import multiprocessing
import os
import random
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing import connection
from pathlib import Path
from typing import Any

import p2pgpu
from p2pgpu.testing.fuzz.corpus import corpus
from p2pgpu.testing.fuzz.targets import MAX_RENDER, TARGETS, Bad, Target

__all__ = ["Example", "Finding", "TargetStats", "Report", "run", "run_chunk", "input_at", "outcome_of",
           "make_target", "HarnessError", "DEFAULT_BOUND_S"]

DEFAULT_BOUND_S = 1.0
"""Longest one input may take (checked twice before it counts as slow)."""
EXAMPLES = 3
_PACKAGE = Path(p2pgpu.__file__).resolve().parent
_HERE = Path(__file__).resolve().parent


class HarnessError(RuntimeError):
    """A worker failed outside any input (a target could not be set up): not a finding."""


@dataclass
class Example:
    index: int
    input: str  # the rendered input, cut at MAX_RENDER characters
    size: int  # length of the whole rendering
    message: str
    line: str  # the traceback line that raised (path:line: code)


@dataclass
class Finding:
    target: str
    kind: str  # untyped | check | slow | hang | crash | harness
    exception: str  # exception type name ("" for slow, hang, crash)
    where: str  # "p2pgpu/core/x.py:function" ("" when none)
    label: str = ""  # a check's name ("status 500")
    count: int = 0
    examples: list[Example] = field(default_factory=list)

    @property
    def signature(self) -> str:
        parts = [f"{self.target}:", self.kind]
        if self.label:
            parts.append(f"'{self.label}'")
        if self.exception:
            parts.append(self.exception)
        if self.where:
            parts.append(f"at {self.where}")
        return " ".join(parts)

    def add(self, example: Example) -> None:
        self.count += 1
        self.examples.append(example)
        self.examples.sort(key=lambda e: (e.size, e.index))
        del self.examples[EXAMPLES:]

    def merge(self, other: Finding) -> None:
        self.count += other.count
        self.examples = sorted(self.examples + other.examples, key=lambda e: (e.size, e.index))[:EXAMPLES]

    def to_json(self) -> dict[str, Any]:
        return {"signature": self.signature, "target": self.target, "kind": self.kind,
                "exception": self.exception, "where": self.where, "label": self.label, "count": self.count,
                "examples": [vars(e) for e in self.examples]}


@dataclass
class TargetStats:
    target: str
    inputs: int = 0
    seconds: float = 0.0  # wall time spent inside the target's ``run`` only
    wall: float = 0.0  # the chunks' whole time, input making included
    cpu: float = 0.0  # the chunks' processor time: what inputs/s is computed from, so a busy machine
    # (other processes on the cores) does not change the figure
    slowest_s: float = 0.0
    slowest_index: int = -1
    slowest_input: str = ""
    findings: dict[str, Finding] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Inputs per second of one core, making them included."""
        spent = self.cpu or self.wall
        return self.inputs / spent if spent > 0 else 0.0

    def add(self, finding: Finding, example: Example) -> None:
        self.findings.setdefault(finding.signature, finding).add(example)

    def merge(self, other: TargetStats) -> None:
        self.inputs += other.inputs
        self.seconds += other.seconds
        self.wall += other.wall
        self.cpu += other.cpu
        if other.slowest_s > self.slowest_s:
            self.slowest_s, self.slowest_index, self.slowest_input = (other.slowest_s, other.slowest_index,
                                                                      other.slowest_input)
        for signature, finding in other.findings.items():
            if signature in self.findings:
                self.findings[signature].merge(finding)
            else:
                self.findings[signature] = finding


@dataclass
class Report:
    seed: int
    inputs: int  # per target
    workers: int
    bound_s: float
    seconds: float = 0.0  # wall clock of the whole run
    targets: dict[str, TargetStats] = field(default_factory=dict)

    @property
    def findings(self) -> list[Finding]:
        return [f for stats in self.targets.values() for f in stats.findings.values()]


# ------------------------------------------------------------------ one input


def make_target(name: str) -> Target:
    if name not in TARGETS:
        raise KeyError(f"no fuzz target {name!r}; targets: {', '.join(TARGETS)}")
    return TARGETS[name](corpus())


def _base(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") << 40


def input_at(target: Target, seed: int, index: int) -> Any:
    """Input ``index`` of ``target`` under ``seed``: the same in any process."""
    rng = random.Random((_base(seed, target.name) + index))
    return target.generate(rng)


def _where(exc: BaseException) -> tuple[str, str]:
    """("p2pgpu/x.py:function", "p2pgpu/x.py:LINE: code") of the innermost
    p2pgpu frame outside the fuzzer (the innermost frame when none)."""
    frames = traceback.extract_tb(exc.__traceback__)
    chosen = None
    for frame in frames:
        path = Path(frame.filename).resolve()
        if path.is_relative_to(_PACKAGE) and not path.is_relative_to(_HERE):
            chosen = frame
    if chosen is None and frames:
        chosen = frames[-1]
    if chosen is None:
        return "", ""
    path = Path(chosen.filename).resolve()
    shown = str(path.relative_to(_PACKAGE.parent)) if path.is_relative_to(_PACKAGE.parent) else path.name
    return f"{shown}:{chosen.name}", f"{shown}:{chosen.lineno}: {(chosen.line or '').strip()}"


def classify(target: Target, exc: BaseException) -> tuple[Finding, str, str]:
    """The finding an exception out of ``target.run`` makes, with its
    message and traceback line."""
    if isinstance(exc, Bad):
        cause = exc.cause
        where, line = _where(cause) if cause is not None else ("", "")
        finding = Finding(target.name, "check", type(cause).__name__ if cause is not None else "", where,
                          exc.what.split(":")[0])
        message = exc.what + (f": {type(cause).__name__}: {cause}" if cause is not None else "")
        return finding, message[:300], line
    where, line = _where(exc)
    return Finding(target.name, "untyped", type(exc).__name__, where), f"{type(exc).__name__}: {exc}"[:300], line


def _render(target: Target, value: Any) -> tuple[str, int]:
    text = target.render(value)
    return (text if len(text) <= MAX_RENDER else text[:MAX_RENDER] + f"... ({len(text)} characters in all)",
            len(text))


def outcome_of(target: Target, value: Any, bound_s: float | None = None) -> Finding | None:
    """What one input does: the finding it makes (count 1, the input as its
    example), or None when it is handled. With ``bound_s``, an input that
    takes longer than that, twice, is a slow finding; without, time is not
    looked at."""

    def attempt() -> Finding | None:
        try:
            if target.asynchronous:
                import trio

                trio.run(target.run, value)
            else:
                target.run(value)
        except target.allowed:
            return None
        except Exception as exc:  # noqa: BLE001 - anything else is what we are looking for
            finding, message, line = classify(target, exc)
            text, size = _render(target, value)
            finding.add(Example(-1, text, size, message, line))
            return finding
        return None

    began = time.perf_counter()
    finding = attempt()
    if finding is None and bound_s is not None and time.perf_counter() - began > bound_s:
        began = time.perf_counter()
        attempt()
        spent = time.perf_counter() - began
        if spent > bound_s:
            text, size = _render(target, value)
            finding = Finding(target.name, "slow", "", "")
            finding.add(Example(-1, text, size, f"took {spent:.2f} s (twice over {bound_s:g} s)", ""))
    return finding


# ------------------------------------------------------------------ one chunk


def run_chunk(name: str, seed: int, start: int, stop: int, bound_s: float = DEFAULT_BOUND_S,
              progress: Any = None) -> TargetStats:
    """Inputs ``start`` to ``stop - 1`` of target ``name``, in this process.
    ``progress.value`` (a shared integer, for the parent's hang watch) is
    ``2 * index`` while input ``index`` is made and ``2 * index + 1`` while
    it runs."""
    target = make_target(name)
    if target.asynchronous:
        import trio

        return trio.run(_chunk_async, target, seed, start, stop, bound_s, progress)
    return _chunk(target, seed, start, stop, bound_s, progress)


def _chunk(target: Target, seed: int, start: int, stop: int, bound_s: float, progress: Any) -> TargetStats:
    stats = TargetStats(target.name)
    rng, base, run, allowed = random.Random(), _base(seed, target.name), target.run, target.allowed
    clock = time.perf_counter
    began, cpu = clock(), time.process_time()
    for index in range(start, stop):
        if progress is not None:
            progress.value = 2 * index  # making input ``index``
        rng.seed(base + index)
        try:
            value = target.generate(rng)
        except Exception as exc:  # noqa: BLE001 - the fuzzer's own bug: reported, and the run goes on
            _harness(stats, target, index, exc)
            continue
        if progress is not None:
            progress.value = 2 * index + 1  # running it
        t0 = clock()
        try:
            run(value)
            exc = None
        except allowed:
            exc = None
        except Exception as error:  # noqa: BLE001 - a finding
            exc = error
        spent = clock() - t0
        if spent > bound_s:
            t1 = clock()
            try:
                run(value)
            except Exception:  # noqa: BLE001 - only the time matters on the rerun
                pass
            spent = min(spent, clock() - t1)
        _record(stats, target, index, value, spent, exc, bound_s)
    stats.inputs = stop - start
    stats.wall, stats.cpu = clock() - began, time.process_time() - cpu
    _finish(stats, target, seed)
    return stats


async def _chunk_async(target: Target, seed: int, start: int, stop: int, bound_s: float,
                       progress: Any) -> TargetStats:
    stats = TargetStats(target.name)
    rng, base, run, allowed = random.Random(), _base(seed, target.name), target.run, target.allowed
    clock = time.perf_counter
    began, cpu = clock(), time.process_time()
    for index in range(start, stop):
        if progress is not None:
            progress.value = 2 * index  # making input ``index``
        rng.seed(base + index)
        try:
            value = target.generate(rng)
        except Exception as exc:  # noqa: BLE001 - the fuzzer's own bug: reported, and the run goes on
            _harness(stats, target, index, exc)
            continue
        if progress is not None:
            progress.value = 2 * index + 1  # running it
        t0 = clock()
        try:
            await run(value)
            exc = None
        except allowed:
            exc = None
        except Exception as error:  # noqa: BLE001 - a finding
            exc = error
        spent = clock() - t0
        if spent > bound_s:
            t1 = clock()
            try:
                await run(value)
            except Exception:  # noqa: BLE001 - only the time matters on the rerun
                pass
            spent = min(spent, clock() - t1)
        _record(stats, target, index, value, spent, exc, bound_s)
    stats.inputs = stop - start
    stats.wall, stats.cpu = clock() - began, time.process_time() - cpu
    _finish(stats, target, seed)
    return stats


def _harness(stats: TargetStats, target: Target, index: int, exc: Exception) -> None:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    path = Path(frame.filename).resolve()
    shown = str(path.relative_to(_PACKAGE.parent)) if path.is_relative_to(_PACKAGE.parent) else path.name
    stats.add(Finding(target.name, "harness", type(exc).__name__, f"{shown}:{frame.name}"),
              Example(index, "", 0, f"making the input failed: {type(exc).__name__}: {exc}"[:300],
                      f"{shown}:{frame.lineno}: {(frame.line or '').strip()}"))


def _record(stats: TargetStats, target: Target, index: int, value: Any, spent: float, exc: BaseException | None,
            bound_s: float) -> None:
    stats.seconds += spent
    if spent > stats.slowest_s:
        stats.slowest_s, stats.slowest_index = spent, index
    if exc is not None:
        finding, message, line = classify(target, exc)
        existing = stats.findings.get(finding.signature)
        if existing is not None and existing.count >= 200:  # enough examples: count the rest
            existing.count += 1
        else:
            text, size = _render(target, value)
            stats.add(finding, Example(index, text, size, message, line))
    if spent > bound_s:
        text, size = _render(target, value)
        stats.add(Finding(target.name, "slow", "", ""),
                  Example(index, text, size, f"took {spent:.2f} s (twice over the {bound_s:g} s bound)", ""))


def _finish(stats: TargetStats, target: Target, seed: int) -> None:
    if stats.slowest_index >= 0:
        stats.slowest_input = _render(target, input_at(target, seed, stats.slowest_index))[0][:2_000]


# ------------------------------------------------------------------ many chunks, many processes


@dataclass
class _Chunk:
    name: str
    start: int
    stop: int


@dataclass
class _Running:
    chunk: _Chunk
    process: Any
    conn: Any
    progress: Any
    seen: int
    since: float


def _child(conn: Any, name: str, seed: int, start: int, stop: int, bound_s: float, progress: Any) -> None:
    try:
        stats = run_chunk(name, seed, start, stop, bound_s, progress)
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        conn.send(("error", traceback.format_exc()))
    else:
        conn.send(("ok", stats))
    conn.close()


def plan(names: Iterable[str], inputs: int, workers: int, chunk: int | None = None) -> list[_Chunk]:
    """Index ranges, the targets interleaved so that both workers stay busy
    to the end whichever targets are slow."""
    size = chunk or max(1_000, min(50_000, math.ceil(inputs / max(1, 2 * workers))))
    per_target = [[_Chunk(n, a, min(a + size, inputs)) for a in range(0, inputs, size)] for n in names]
    out: list[_Chunk] = []
    for row in range(max((len(p) for p in per_target), default=0)):
        out += [p[row] for p in per_target if row < len(p)]
    return out


def run(names: Iterable[str], inputs: int, seed: int = 0, *, workers: int = 2, bound_s: float = DEFAULT_BOUND_S,
        hang_s: float | None = None, chunk: int | None = None,
        on_chunk: Callable[[str, TargetStats], None] | None = None) -> Report:
    """Fuzz ``names`` with ``inputs`` inputs each. ``workers`` processes
    (0: everything in this process, with no hang watch); a worker that
    makes no progress for ``hang_s`` (default: 10 bounds, at least 10 s) is
    killed and its input reported as a hang."""
    names = list(names)
    for name in names:
        make_target(name)  # unknown names fail here; the corpus is built before the workers fork
    report = Report(seed, inputs, workers, bound_s, targets={n: TargetStats(n) for n in names})
    began = time.monotonic()
    chunks = plan(names, inputs, max(1, workers), chunk)

    def merge(stats: TargetStats) -> None:
        report.targets[stats.target].merge(stats)
        if on_chunk is not None:
            on_chunk(stats.target, stats)

    if workers <= 0:
        for c in chunks:
            merge(run_chunk(c.name, seed, c.start, c.stop, bound_s))
    else:
        _run_processes(chunks, seed, workers, bound_s, hang_s or max(10.0, 10 * bound_s), merge)
    report.seconds = time.monotonic() - began
    return report


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _run_processes(chunks: list[_Chunk], seed: int, workers: int, bound_s: float, hang_s: float,
                   merge: Callable[[TargetStats], None]) -> None:
    ctx = _context()
    gc.freeze()  # forked workers share the parent's objects; a collection in them would copy every page
    pending = deque(chunks)
    running: list[_Running] = []
    try:
        while pending or running:
            while pending and len(running) < workers:
                c = pending.popleft()
                reader, writer = ctx.Pipe(duplex=False)
                progress = ctx.RawValue("q", 2 * c.start)
                process = ctx.Process(target=_child, args=(writer, c.name, seed, c.start, c.stop, bound_s, progress),
                                      daemon=True)
                process.start()
                writer.close()
                running.append(_Running(c, process, reader, progress, 2 * c.start, time.monotonic()))
            connection.wait([r.conn for r in running] + [r.process.sentinel for r in running], timeout=0.5)
            for r in list(running):
                if r.conn.poll():
                    try:
                        status, payload = r.conn.recv()
                    except EOFError:
                        status, payload = "died", None
                    if status == "error":
                        raise HarnessError(f"fuzz worker for {r.chunk.name} failed:\n{payload}")
                    if status == "ok":
                        r.process.join()
                        r.conn.close()
                        running.remove(r)
                        merge(payload)
                        continue
                if not r.process.is_alive() and not r.conn.poll():
                    _lost(r, "crash", f"the worker died (exit code {r.process.exitcode})", seed, merge, pending)
                    running.remove(r)
                    continue
                index = r.progress.value
                now = time.monotonic()
                if index != r.seen:
                    r.seen, r.since = index, now
                elif now - r.since > hang_s:
                    r.process.kill()
                    r.process.join()
                    _lost(r, "hang", f"no answer after {hang_s:g} s; the worker was killed", seed, merge, pending)
                    running.remove(r)
    finally:
        for r in running:
            r.process.kill()
            r.process.join()
        gc.unfreeze()


def _lost(r: _Running, kind: str, message: str, seed: int, merge: Callable[[TargetStats], None],
          pending: deque) -> None:
    """A worker that will not report: its current input is the finding; the
    chunk's inputs before it are counted, the ones after it run again. When
    it died making the input (a bug of the fuzzer's), the finding says so and
    the input is not made again here."""
    index, running = divmod(r.progress.value, 2)
    stats = TargetStats(r.chunk.name, inputs=index - r.chunk.start + 1)
    if running:
        target = make_target(r.chunk.name)
        text, size = _render(target, input_at(target, seed, index))
        stats.add(Finding(r.chunk.name, kind, "", ""), Example(index, text, size, message, ""))
    else:
        stats.add(Finding(r.chunk.name, "harness", "", f"making the input: {kind}"),
                  Example(index, "", 0, message, ""))
    merge(stats)
    if index + 1 < r.chunk.stop:
        pending.appendleft(_Chunk(r.chunk.name, index + 1, r.chunk.stop))
    r.conn.close()


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

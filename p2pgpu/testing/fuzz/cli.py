"""``scripts/fuzz`` (``python -m p2pgpu.testing.fuzz``): fuzz every decoder, report findings.

    scripts/fuzz                                  # the full pass: 1,000,000 inputs per target
    scripts/fuzz --inputs 20000 --json            # a quick one; last line one JSON object
    scripts/fuzz --target api --target gateway    # some targets (a name, or the part before a dot)
    scripts/fuzz --target jobs.decode_frame --seed 3 --replay 4711   # one input again, unprotected
    scripts/fuzz --list                           # the targets and what each calls

stdout: one line per target (inputs, inputs per second of one core, the
slowest input), then every finding with its first inputs (hex, or JSON for
JSON values), the line that raised and the command that replays it, then a
summary; with ``--json`` the summary is one JSON object on the last line.
Progress goes to stderr every 15 s. Exit status 0 when nothing was found,
1 when something was (with ``--allow-known``: something not in
``KNOWN_FINDINGS``), 2 on a usage error, 3 when the fuzzer itself failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from typing import Any

from p2pgpu.testing.fuzz.engine import (
    DEFAULT_BOUND_S, HarnessError, Report, TargetStats, default_workers, input_at, make_target, outcome_of, run,
)
from p2pgpu.testing.fuzz.known import KNOWN_SIGNATURES
from p2pgpu.testing.fuzz.targets import TARGETS

__all__ = ["main", "select", "summary"]

PROG = "scripts/fuzz"
FULL_PASS = 1_000_000


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"{PROG}: error: {message} (see {PROG} --help)\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Fuzz every decoder and validator that takes bytes or JSON from outside.")
    parser.add_argument("--inputs", type=int, default=FULL_PASS, metavar="N",
                        help=f"inputs per target (default {FULL_PASS:,}: the full pass)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="the run's seed (default 0)")
    parser.add_argument("--target", action="append", default=[], metavar="NAME",
                        help="a target, or a group (the part of names before a dot: codec, jobs, gateway...); "
                             "repeatable; default all")
    parser.add_argument("--workers", type=int, default=None, metavar="W",
                        help="worker processes (default: the CPUs; 0 runs in this process, without the hang watch)")
    parser.add_argument("--bound", type=float, default=DEFAULT_BOUND_S, metavar="SECONDS",
                        help=f"longest one input may take (default {DEFAULT_BOUND_S:g})")
    parser.add_argument("--json", action="store_true", help="the summary is one JSON object on the last line")
    parser.add_argument("--allow-known", action="store_true",
                        help="exit 0 when every finding is a known one (KNOWN_FINDINGS)")
    parser.add_argument("--replay", type=int, default=None, metavar="INDEX",
                        help="make input INDEX of the one --target (under --seed) again, print it, run it "
                             "unprotected and show what it raises")
    parser.add_argument("--list", action="store_true", help="list the targets and what each calls")
    return parser


def select(names: list[str]) -> list[str]:
    """Target names for ``--target`` values: exact names or groups."""
    if not names:
        return list(TARGETS)
    chosen: list[str] = []
    for name in names:
        matched = [t for t in TARGETS if t == name or t.startswith(name + ".")]
        if not matched:
            raise ValueError(f"no fuzz target {name!r} (see {PROG} --list)")
        chosen += [m for m in matched if m not in chosen]
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for name, cls in TARGETS.items():
            print(f"{name:36s} {cls.calls}")
        return 0
    try:
        names = select(args.target)
    except ValueError as exc:
        _parser().error(str(exc))
    if args.inputs < 1 or args.bound <= 0 or (args.workers is not None and args.workers < 0):
        _parser().error("--inputs must be at least 1, --bound more than 0 and --workers not negative")
    if args.replay is not None:
        if len(names) != 1:
            _parser().error("--replay needs exactly one --target")
        return _replay(names[0], args.seed, args.replay)
    workers = default_workers() if args.workers is None else args.workers
    progress = _Progress(len(names) * args.inputs)
    try:
        report = run(names, args.inputs, args.seed, workers=workers, bound_s=args.bound, on_chunk=progress)
    except HarnessError as exc:
        sys.stderr.write(f"{PROG}: the fuzzer failed (not a finding): {exc}\n")
        return 3
    _print(report)
    result = summary(report)
    if args.json:
        print(json.dumps(result, separators=(",", ":")))
    new = result["new_findings"]
    return 1 if (new if args.allow_known else result["findings"]) else 0


class _Progress:
    """Prints inputs done so far on stderr, every 15 s."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.found = total, 0, 0
        self.began = self.shown = time.monotonic()

    def __call__(self, name: str, stats: TargetStats) -> None:
        self.done += stats.inputs
        self.found += sum(f.count for f in stats.findings.values())
        now = time.monotonic()
        if now - self.shown >= 15:
            self.shown = now
            sys.stderr.write(f"   [{now - self.began:.0f} s] {self.done:,} of {self.total:,} inputs; "
                             f"{self.found:,} found so far\n")
            sys.stderr.flush()


def _replay_command(target: str, seed: int, index: int) -> str:
    return f"{PROG} --target {target} --seed {seed} --replay {index}"


def _print(report: Report) -> None:
    width = max(len(n) for n in report.targets)
    print(f"{'target':{width}s}  {'inputs':>11s}  {'inputs/s':>9s}  {'slowest':>10s}  findings")
    for stats in report.targets.values():
        count = len(stats.findings)
        print(f"{stats.target:{width}s}  {stats.inputs:11,d}  {stats.rate:9,.0f}  {stats.slowest_s * 1000:7.1f} ms  "
              f"{count or '-'}")
    for finding in report.findings:
        known = " [known]" if finding.signature in KNOWN_SIGNATURES else ""
        print(f"\nFINDING {finding.signature} ({finding.count:,} inputs){known}")
        for example in finding.examples:
            print(f"  {example.message}")
            if example.line:
                print(f"  {example.line}")
            shown = example.input if len(example.input) <= 600 else example.input[:600] + f"... ({example.size:,})"
            print(f"  input #{example.index}: {shown}")
            print(f"  replay: {_replay_command(finding.target, report.seed, example.index)}")
    total = sum(s.inputs for s in report.targets.values())
    found = len(report.findings)
    known = sum(f.signature in KNOWN_SIGNATURES for f in report.findings)
    print(f"\n{len(report.targets)} targets, {total:,} inputs in {report.seconds:.0f} s on {report.workers} workers: "
          f"{found} findings ({known} known)")


def summary(report: Report) -> dict[str, Any]:
    """The run as one JSON-able object (``--json``'s last line)."""
    findings = report.findings
    return {
        "seed": report.seed,
        "inputs_per_target": report.inputs,
        "workers": report.workers,
        "bound_s": report.bound_s,
        "seconds": round(report.seconds, 1),
        "inputs": sum(s.inputs for s in report.targets.values()),
        "findings": len(findings),
        "new_findings": sum(f.signature not in KNOWN_SIGNATURES for f in findings),
        "targets": [
            {"target": s.target, "inputs": s.inputs, "inputs_per_s": round(s.rate),
             "slowest_ms": round(s.slowest_s * 1000, 1), "slowest_index": s.slowest_index,
             "slowest_input": s.slowest_input[:400],
             "findings": [dict(f.to_json(), known=f.signature in KNOWN_SIGNATURES) for f in s.findings.values()]}
            for s in report.targets.values()
        ],
    }


def _replay(name: str, seed: int, index: int) -> int:
    target = make_target(name)
    value = input_at(target, seed, index)
    print(target.render(value))
    finding = outcome_of(target, value)
    if finding is None:
        sys.stderr.write(f"input {index} of {name} (seed {seed}) is handled: no finding\n")
        return 0
    sys.stderr.write(f"FINDING {finding.signature}\n")
    try:  # once more, to show the whole traceback
        if target.asynchronous:
            import trio

            trio.run(target.run, value)
        else:
            target.run(value)
    except Exception:  # noqa: BLE001 - shown, not handled
        traceback.print_exc()
    return 1

"""``scripts/sim`` (``python -m p2pgpu.testing.sim``): run many seeds, report failures.

    scripts/sim --seeds 1000                      # seeds 0..999 at --faults medium
    scripts/sim --seeds 10000 --json              # the long sweep; last line one JSON object
    scripts/sim --seed 17 --replay                # one seed, its trace (one line per event) on stderr
    scripts/sim --seeds 100 --plant release-ignores-claim   # a deliberate bug: must be found

stdout: one JSON line per failing seed, as it is found (in seed order:
worker processes run ahead, results are printed in order), then a summary;
with ``--json`` the summary is one JSON object on the last line. Exit status
0 when every run held every invariant, 1 when some did not, 2 on a usage
error. Each seed's run is the same in any process, so ``--processes`` only
changes the speed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import sys
import time
from collections.abc import Iterable, Iterator

from p2pgpu.testing.sim.config import FaultLevel, Plant, SimConfig
from p2pgpu.testing.sim.simulation import RunResult, run_seed

__all__ = ["main", "run_many", "replay_command", "failure_line"]

PROG = "scripts/sim"


def replay_command(seed: int, config: SimConfig) -> str:
    """The one-line command that replays ``seed`` with its trace."""
    parts = [PROG, "--seed", str(seed), "--replay", "--faults", config.faults.value]
    if config.nodes is not None:
        parts += ["--nodes", str(config.nodes)]
    if config.plant is not None:
        parts += ["--plant", config.plant.value]
    return " ".join(shlex.quote(p) for p in parts)


def failure_line(result: RunResult) -> dict:
    """The JSON object printed for a failing seed."""
    assert result.violation is not None
    return {
        "seed": result.seed,
        "invariant": result.violation.invariant,
        "detail": result.violation.detail,
        "time_ms": result.violation.time_ms,
        "nodes": result.nodes,
        "faults": result.config.faults.value,
        "plant": result.config.plant.value if result.config.plant else None,
        "replay": replay_command(result.seed, result.config),
    }


def _run_one(args: tuple[int, SimConfig]) -> RunResult:
    seed, config = args
    return run_seed(seed, config)


def run_many(seeds: Iterable[int], config: SimConfig, processes: int = 1) -> Iterator[RunResult]:
    """Results of ``seeds`` in the order given, run by ``processes`` workers."""
    jobs = ((seed, config) for seed in seeds)
    if processes <= 1:
        yield from map(_run_one, jobs)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(processes) as pool:
        yield from pool.imap(_run_one, jobs, chunksize=4)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"{PROG}: error: {message} (see {PROG} --help)\n")
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=(
        "Deterministic simulation of a p2pgpu network: many nodes' real decision code over a faulty "
        "simulated network and clock, checked against invariants. A seed fixes everything."))
    parser.add_argument("--seeds", type=int, default=100, metavar="N", help="how many seeds to run (default 100)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="the first seed (default 0); with --replay, the one seed to run")
    parser.add_argument("--nodes", type=int, default=None, metavar="K", help="nodes per run, 2..12 (default: 4 or 5, drawn)")
    parser.add_argument("--faults", choices=[f.value for f in FaultLevel], default=FaultLevel.MEDIUM.value,
                        help="how hostile the world is (default medium)")
    parser.add_argument("--plant", choices=[p.value for p in Plant], default=None,
                        help="put a deliberate bug into the decision code (to test the simulator)")
    parser.add_argument("--replay", action="store_true", help="run only --seed, with its trace on stderr")
    parser.add_argument("--json", action="store_true", help="the summary as one JSON object on the last line")
    parser.add_argument("--processes", type=int, default=None, metavar="P",
                        help="worker processes (default: the CPUs, at most 2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.seeds < 1:
        _parser().error("--seeds must be at least 1")
    if args.seed < 0:
        _parser().error("--seed must not be negative")
    if args.processes is not None and args.processes < 1:
        _parser().error("--processes must be at least 1")
    try:
        config = SimConfig(nodes=args.nodes, faults=FaultLevel(args.faults),
                           plant=Plant(args.plant) if args.plant else None)
    except ValueError as exc:
        _parser().error(str(exc))
    out = sys.stdout
    started = time.perf_counter()
    runs = failures = operations = 0
    if args.replay:
        result = run_seed(args.seed, config, tracing=True)
        for line in result.trace:
            sys.stderr.write(line + "\n")
        results: Iterable[RunResult] = [result]
        first, count = args.seed, 1
    else:
        first, count = args.seed, args.seeds
        processes = args.processes or max(1, min(2, os.cpu_count() or 1))
        results = run_many(range(first, first + count), config, processes=min(processes, count))
    for result in results:
        runs += 1
        operations += result.events
        if not result.ok:
            failures += 1
            out.write(json.dumps(failure_line(result)) + "\n")
            out.flush()
    seconds = time.perf_counter() - started
    summary = {
        "runs": runs,
        "failures": failures,
        "runs_per_second": round(runs / seconds, 2) if seconds > 0 else None,
        "operations": operations,
        "seconds": round(seconds, 2),
        "first_seed": first,
        "nodes": config.nodes,
        "faults": config.faults.value,
        "plant": config.plant.value if config.plant else None,
    }
    if args.json:
        out.write(json.dumps(summary) + "\n")
    else:
        nodes = "4-5" if config.nodes is None else str(config.nodes)
        out.write(f"{runs} run(s) of seeds {first}..{first + count - 1} ({nodes} nodes, faults {config.faults.value}"
                  f"{', plant ' + config.plant.value if config.plant else ''}): {failures} failure(s); "
                  f"{summary['runs_per_second']} runs/s, {operations} operations simulated in {seconds:.1f} s\n")
    return 1 if failures else 0

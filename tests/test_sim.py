"""The deterministic simulator (p2pgpu.testing.sim, docs/simulation.md).

A sweep of seeds at the default fault level must hold every invariant; a run
is a pure function of its seed (same trace in another process, under another
hash seed); each planted bug is found within 100 seeds and its replay fails
the same way; every invariant checker can fail; and the CLI keeps its
contract. ``P2PGPU_SIM_SEEDS`` sizes the sweep (default 300; the long sweep
is ``scripts/sim --seeds 10000 --json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pgpu.core.codec import pack
from p2pgpu.core.jobs import Prices
from p2pgpu.core.ledger import BASIS_CLAIM, BASIS_PROVIDER_ENTRY, BASIS_TIMEOUT, AccountState
from p2pgpu.testing.sim import FaultLevel, Plant, SimConfig, run_seed
from p2pgpu.testing.sim import cli
from p2pgpu.testing.sim.consumer import HoldSettler
from p2pgpu.testing.sim.invariants import (
    InvariantBroken,
    JobStatus,
    account_errors,
    answer_error,
    conservation_error,
    job_end_error,
    kept_error,
    payout_error,
    release_error,
    replicas_error,
    voucher_bound,
    voucher_error,
)
from p2pgpu.testing.sim.replica import Replica
from p2pgpu.testing.sim.simulation import Simulation

ROOT = Path(__file__).resolve().parent.parent
SWEEP_SEEDS = int(os.environ.get("P2PGPU_SIM_SEEDS", "300"))
PROCESSES = max(1, min(2, os.cpu_count() or 1))


def _failures(results) -> list[str]:
    return [json.dumps(cli.failure_line(r)) for r in results if not r.ok]


# ---------------------------------------------------------------- sweeps


def test_a_sweep_at_the_default_level_holds_every_invariant():
    results = list(cli.run_many(range(SWEEP_SEEDS), SimConfig(), processes=PROCESSES))
    assert len(results) == SWEEP_SEEDS
    assert [r.seed for r in results] == list(range(SWEEP_SEEDS))  # in seed order, whatever the workers did
    assert _failures(results) == []
    assert sum(r.jobs for r in results) > SWEEP_SEEDS  # the runs did real work
    assert sum(r.completed for r in results) > SWEEP_SEEDS // 2


@pytest.mark.parametrize("level", [FaultLevel.NONE, FaultLevel.LOW, FaultLevel.HIGH])
def test_every_fault_level_holds_every_invariant(level):
    results = list(cli.run_many(range(1_000, 1_040), SimConfig(faults=level), processes=PROCESSES))
    assert _failures(results) == []


def test_other_network_sizes_hold_every_invariant():
    for nodes in (2, 7):
        results = list(cli.run_many(range(20), SimConfig(nodes=nodes), processes=PROCESSES))
        assert _failures(results) == []
        assert {r.nodes for r in results} == {nodes}


# ---------------------------------------------------------------- determinism


def _fingerprint(seed: int, faults: FaultLevel = FaultLevel.HIGH) -> str:
    result = run_seed(seed, SimConfig(faults=faults), tracing=True)
    return result.digest + hashlib.sha256("\n".join(result.trace).encode()).hexdigest()


def test_a_seed_gives_the_same_trace_and_result_every_time():
    first = run_seed(11, SimConfig(faults=FaultLevel.HIGH), tracing=True)
    second = run_seed(11, SimConfig(faults=FaultLevel.HIGH), tracing=True)
    assert first.trace == second.trace and len(first.trace) > 100
    assert (first.digest, first.events, first.violation) == (second.digest, second.events, second.violation)
    untraced = run_seed(11, SimConfig(faults=FaultLevel.HIGH))
    assert (untraced.digest, untraced.events) == (first.digest, first.events)  # tracing changes nothing


def test_different_seeds_give_different_runs():
    assert len({_fingerprint(seed) for seed in range(5)}) == 5


def test_a_seed_gives_the_same_trace_in_another_process_under_another_hash_seed():
    """bytes and str hash differently per process: a run must not depend on it."""
    code = (
        "import hashlib\n"
        "from p2pgpu.testing.sim import FaultLevel, SimConfig, run_seed\n"
        "for seed, faults in ((3, FaultLevel.HIGH), (4, FaultLevel.MEDIUM)):\n"
        "    r = run_seed(seed, SimConfig(faults=faults), tracing=True)\n"
        "    print(r.digest + hashlib.sha256('\\n'.join(r.trace).encode()).hexdigest())\n"
    )
    outputs = []
    for hash_seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120, check=True)
        outputs.append(done.stdout.split())
    assert outputs[0] == outputs[1] == [_fingerprint(3), _fingerprint(4, FaultLevel.MEDIUM)]


# ---------------------------------------------------------------- planted bugs


@pytest.mark.parametrize("plant, invariant", [
    (Plant.RELEASE_IGNORES_CLAIM, "release-voids-known-claim"),
    (Plant.DOUBLE_PAY_ON_FAILOVER, "one-answer"),
    (Plant.OVERPAY_VOUCHER, "voucher-above-delivered"),
    (Plant.FORGET_KEPT_VOUCHERS, "kept-voucher-paid"),
    (Plant.NO_ANTI_ENTROPY, "replicas-agree"),
])
def test_a_planted_bug_is_found_within_100_seeds_and_its_replay_reproduces_it(plant, invariant):
    config = SimConfig(plant=plant)
    found = next((r for r in cli.run_many(range(100), config, processes=1) if not r.ok), None)
    assert found is not None, f"{plant.value} was not found in 100 seeds"
    assert found.violation.invariant == invariant
    replayed = run_seed(found.seed, config, tracing=True)
    assert replayed.violation == found.violation
    assert replayed.digest == found.digest
    assert replayed.trace[-1].endswith(f"INVARIANT BROKEN {invariant}: {found.violation.detail}")


def test_the_same_seeds_without_the_plant_pass():
    assert _failures(cli.run_many(range(10), SimConfig(), processes=PROCESSES)) == []


# ---------------------------------------------------------------- the checkers can fail


def test_each_pure_checker_catches_a_hand_made_violation():
    assert conservation_error(1_001, 1_000) and conservation_error(1_000, 1_000) is None
    healthy = AccountState(b"a" * 32, 10, 0, 0, 1, None, 1)
    assert account_errors([healthy], settled=True) == []
    assert account_errors([AccountState(b"a" * 32, -1, 0, 0, 1, None, 1)], settled=False)
    assert account_errors([AccountState(b"a" * 32, 5, 0, 0, 1, "fork", 1)], settled=False)
    assert account_errors([AccountState(b"a" * 32, 5, 3, 0, 1, None, 1)], settled=True)
    prices = Prices(1_000_000, 2_000_000)
    assert voucher_bound(prices, 10, 5, None) == 10 and voucher_bound(prices, 10, 5, 50) == 20
    assert voucher_error(11, 10, 100) and voucher_error(10, 10, 9) and voucher_error(10, 10, 100) is None
    assert release_error(BASIS_TIMEOUT, {b"c" * 32: 5}) and release_error(BASIS_PROVIDER_ENTRY, {b"c" * 32: 5})
    assert release_error(BASIS_CLAIM, {b"c" * 32: 5}) is None and release_error(BASIS_TIMEOUT, {}) is None
    assert replicas_error([("node0", b"x"), ("node1", b"y")]) and replicas_error([("node0", b"x")] * 3) is None
    assert payout_error(100, 40, 50, 40, 40)  # not settled
    assert payout_error(100, 41, 59, 40, 50)  # above the largest voucher
    assert payout_error(100, 41, 59, 50, 40)  # above the delivered tokens' cost
    assert payout_error(100, 40, 60, 40, 40) is None
    assert kept_error(30, 20, False, BASIS_CLAIM) and kept_error(30, 20, False, None)
    assert kept_error(30, 30, False, BASIS_CLAIM) is None and kept_error(30, 0, True, BASIS_PROVIDER_ENTRY) is None
    assert kept_error(30, 0, False, BASIS_TIMEOUT) is None  # the release won over a claim it never saw
    answer = ["w0 ", "w1 ", "w2 ", "w3 "]
    assert answer_error("w0 w1 w0 ", answer, 4, JobStatus.FAILED)  # started again: two answers
    assert answer_error("w0 w1 ", answer, 4, JobStatus.COMPLETED)  # completed but short
    assert answer_error("w0 w1 w2 ", answer, 2, JobStatus.FAILED)  # more than asked for
    assert answer_error("w0 w1 ", answer, 4, JobStatus.FAILED) is None
    assert answer_error("w0 w1 w2 w3 ", answer, 9, JobStatus.COMPLETED) is None
    assert job_end_error(None, "") and job_end_error(JobStatus.FAILED, "")
    assert job_end_error(JobStatus.CANCELLED, "") is None


def test_the_final_checks_catch_a_tampered_replica():
    sim = Simulation(5, SimConfig(faults=FaultLevel.LOW))
    assert sim.run().ok
    node = sim.nodes[1]
    key = b"a" + node.key.public_key
    balance, held, pending, entries, tips = __import__("msgpack").unpackb(node.store.get(key))
    node.store.write({key: pack([balance + 1, held, pending, entries, tips])}, sync=True)
    node.replica = Replica(node)  # reopen from the store
    with pytest.raises(InvariantBroken) as caught:
        sim.checks.final(sim.nodes, True, "")
    assert caught.value.violation.invariant == "replicas-agree"


def test_a_settler_that_never_releases_is_caught(monkeypatch):
    monkeypatch.setattr(HoldSettler, "run_pass", lambda self: None)
    result = next(r for r in (run_seed(seed, SimConfig()) for seed in range(10)) if not r.ok)
    assert result.violation.invariant in ("hold-locked", "holds-settled")


# ---------------------------------------------------------------- the command line


def test_cli_json_summary_and_exit_codes(capsys):
    assert cli.main(["--seeds", "3", "--json", "--processes", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert set(summary) == {"runs", "failures", "runs_per_second", "operations", "seconds", "first_seed", "nodes",
                            "faults", "plant"}
    assert (summary["runs"], summary["failures"], summary["first_seed"], summary["faults"]) == (3, 0, 0, "medium")
    assert summary["operations"] > 0 and summary["runs_per_second"] > 0

    assert cli.main(["--seeds", "2", "--seed", "40", "--plant", "overpay-voucher", "--json", "--processes", "1"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    failures = [json.loads(line) for line in lines[:-1]]
    assert [f["seed"] for f in failures] == [40, 41]
    assert failures[0]["invariant"] == "voucher-above-delivered"
    assert failures[0]["replay"] == "scripts/sim --seed 40 --replay --faults medium --plant overpay-voucher"
    assert json.loads(lines[-1])["failures"] == 2


def test_cli_replay_traces_to_stderr_and_reproduces_the_failure(capsys):
    assert cli.main(["--seed", "40", "--replay", "--plant", "overpay-voucher"]) == 1
    captured = capsys.readouterr()
    failure = json.loads(captured.out.splitlines()[0])
    assert failure["seed"] == 40 and failure["invariant"] == "voucher-above-delivered"
    assert len(captured.err.splitlines()) > 20
    assert "INVARIANT BROKEN voucher-above-delivered" in captured.err.splitlines()[-1]


@pytest.mark.parametrize("argv", [["--faults", "extreme"], ["--seeds", "0"], ["--nodes", "40"], ["--bogus"],
                                  ["--plant", "nothing"]])
def test_cli_usage_errors_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scripts/sim: error:")


def test_scripts_sim_runs():
    done = subprocess.run([str(ROOT / "scripts" / "sim"), "--seeds", "2", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["runs"] == 2

"""The fuzzer (``p2pgpu.testing.fuzz``, docs/fuzzing.md): a short pass over
every target, and the engine's own promises.

The short pass runs every target on 2,000 inputs of a fixed seed in two
worker processes, the way ``scripts/fuzz`` does, and must find nothing but
the ``KNOWN_FINDINGS``; each of those must still reproduce from its input,
so a fixed bug fails here until its entry is deleted. The full pass
(``scripts/fuzz``: 1,000,000 inputs a target) is the long run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from typing import Any

import pytest

from p2pgpu.errors import MalformedInput
from p2pgpu.testing.fuzz import (
    FIXED_FINDINGS, KNOWN_FINDINGS, KNOWN_SIGNATURES, TARGETS, input_at, make_target, outcome_of, run,
)
from p2pgpu.testing.fuzz import cli
from p2pgpu.testing.fuzz.engine import Report
from p2pgpu.testing.fuzz.targets import Target

SEED = 1
INPUTS = int(os.environ.get("P2PGPU_FUZZ_INPUTS", "2000"))
# The full pass holds each input to 1 s. Here, on a shared two-core machine
# running the rest of the suite, the bound only has to catch a real blow-up.
BOUND_S = 5.0

FORK = "fork" in multiprocessing.get_all_start_methods()


def _describe(report: Report, signatures: set[str]) -> str:
    lines = []
    for finding in report.findings:
        if finding.signature in signatures:
            example = finding.examples[0]
            lines += [f"{finding.signature} ({finding.count} inputs)", f"  {example.message}", f"  {example.line}",
                      f"  input #{example.index}: {example.input[:400]}",
                      f"  replay: scripts/fuzz --target {finding.target} --seed {report.seed} --replay {example.index}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def short_pass() -> Report:
    return run(list(TARGETS), INPUTS, SEED, workers=2, bound_s=BOUND_S)


@pytest.mark.slow
def test_the_short_pass_finds_nothing_but_the_known_findings(short_pass: Report) -> None:
    new = {f.signature for f in short_pass.findings} - KNOWN_SIGNATURES
    assert not new, "new fuzz findings (fix them, or add them to KNOWN_FINDINGS with a reproducer):\n" + _describe(
        short_pass, new)


@pytest.mark.slow
def test_the_short_pass_runs_every_input_of_every_target(short_pass: Report) -> None:
    assert list(short_pass.targets) == list(TARGETS)
    for stats in short_pass.targets.values():
        assert stats.inputs == INPUTS, stats.target
        assert stats.rate > 0


@pytest.mark.parametrize("known", KNOWN_FINDINGS, ids=lambda k: k.signature)
def test_each_known_finding_still_reproduces(known: Any) -> None:
    target = make_target(known.signature.split(":")[0])
    finding = outcome_of(target, known.make(), known.bound_s)
    assert finding is not None, f"fixed: delete {known.signature!r} from KNOWN_FINDINGS"
    assert finding.signature == known.signature, f"it now fails differently: {finding.signature}"


@pytest.mark.parametrize("fixed", FIXED_FINDINGS, ids=lambda k: k.signature)
def test_each_fixed_finding_stays_fixed(fixed: Any) -> None:
    """What the first full pass found, fed again: each now decodes or is a typed error, quickly."""
    target = make_target(fixed.signature.split(":")[0])
    finding = outcome_of(target, fixed.make(), fixed.bound_s or BOUND_S)
    assert finding is None, f"{fixed.signature} is back: {finding.signature}"


def test_known_findings_are_listed_once_each() -> None:
    assert len(KNOWN_SIGNATURES) == len(KNOWN_FINDINGS)
    assert all(k.signature.split(":")[0] in TARGETS and k.note for k in KNOWN_FINDINGS)


# ------------------------------------------------------------------ the engine


@pytest.mark.parametrize("name", list(TARGETS))
def test_an_input_is_made_from_seed_target_and_index_alone(name: str) -> None:
    first, second = make_target(name), make_target(name)
    for index in (0, 1, 977):
        a, b = input_at(first, 7, index), input_at(second, 7, index)
        assert first.render(a) == second.render(b)
    assert {first.render(input_at(first, seed, 5)) for seed in range(6)} != {first.render(input_at(first, 0, 5))}


class Planted(Target):
    """A decoder with one bug of each kind, on inputs chosen by value."""

    name = "planted"
    calls = "a decoder with planted bugs"

    @staticmethod
    def bug(value: int) -> str | None:
        return "untyped" if value < 4 else "slow" if value < 6 else "hang" if value == 6 else None

    def generate(self, rng: Any) -> Any:
        return rng.randrange(40)

    def run(self, value: int) -> None:
        kind = self.bug(value)
        if kind == "untyped":
            raise KeyError(value)
        if kind == "slow":
            time.sleep(0.2)
        if kind == "hang":
            time.sleep(3_600)
        raise MalformedInput("typed")


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(TARGETS, Planted.name, Planted)
    return Planted.name


@pytest.mark.slow
@pytest.mark.skipif(not FORK, reason="the planted target reaches the workers only through fork")
def test_the_engine_finds_an_untyped_exception_a_slow_input_and_a_hang(planted: str) -> None:
    target = make_target(planted)
    # a seed whose 40 inputs hang exactly once (each hang costs the watch's wait)
    seed = next(s for s in range(100)
                if [Planted.bug(input_at(target, s, i)) for i in range(40)].count("hang") == 1
                and {Planted.bug(input_at(target, s, i)) for i in range(40)} >= {"untyped", "slow"})
    report = run([planted], 40, seed, workers=2, bound_s=0.1, hang_s=1.5)
    found = {f.kind: f for f in report.findings}
    assert set(found) == {"untyped", "slow", "hang"}
    assert found["untyped"].signature == "planted: untyped KeyError at tests/test_fuzz.py:run"
    for finding in found.values():
        for example in finding.examples:
            assert Planted.bug(input_at(target, seed, example.index)) == finding.kind
    assert found["hang"].count == 1
    assert report.targets[planted].inputs == 40  # the chunk went on after the killed worker


def test_outcome_of_classifies_one_input(planted: str) -> None:
    target = make_target(planted)
    assert outcome_of(target, 39) is None  # the typed error
    finding = outcome_of(target, 3)
    assert finding is not None and finding.kind == "untyped" and finding.exception == "KeyError"


@pytest.mark.slow
def test_the_cli_prints_a_table_and_a_json_summary(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["--target", "peerex", "--inputs", "300", "--workers", "1", "--json"])
    out = capsys.readouterr().out.splitlines()
    summary = json.loads(out[-1])
    assert status == 0 and summary["findings"] == 0
    assert [t["target"] for t in summary["targets"]] == ["peerex.decode_request", "peerex.decode_reply"]
    assert all(t["inputs"] == 300 and t["inputs_per_s"] > 0 for t in summary["targets"])
    assert out[0].split()[:2] == ["target", "inputs"]


def test_the_cli_refuses_an_unknown_target(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--target", "nonsense"])
    assert exit_info.value.code == 2
    assert "no fuzz target 'nonsense'" in capsys.readouterr().err


def test_the_cli_replays_one_input(planted: str, capsys: pytest.CaptureFixture[str]) -> None:
    target = make_target(planted)
    index = next(i for i in range(100) if input_at(target, 4, i) == 3)
    assert cli.main(["--target", planted, "--seed", "4", "--replay", str(index)]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == "json:3"
    assert "FINDING planted: untyped KeyError" in captured.err and "Traceback" in captured.err

"""scripts/demo.py is the README's promise to a new user: it must run to the
end, show the offer and the payments, leave nothing running, and never
print a claim its own output contradicts (issue 9: once in seven runs it
printed three different state hashes under "identical ledger on every node")."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from p2pgpu.core.units import format_coins, parse_coins

ROOT = Path(__file__).resolve().parent.parent


def load_demo():
    spec = importlib.util.spec_from_file_location("p2pgpu_demo_script", ROOT / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = load_demo()

ROW = re.compile(r"^  (alice|bob|carol)\b.*?\s(\S+) coins   state ([0-9a-f]{12})")


def rows_after(out: str, title: str) -> dict[str, tuple[int, str]]:
    """The three balance rows printed under the line starting with ``title``: name -> (base units, state)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = {}
    for line in lines[start + 1 : start + 4]:
        match = ROW.match(line)
        assert match, f"not a balance row: {line!r}"
        rows[match.group(1)] = (parse_coins(match.group(2)), match.group(3))
    assert set(rows) == {"alice", "bob", "carol"}
    return rows


@pytest.mark.slow
def test_demo_runs_to_the_end_and_its_output_agrees_with_itself():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Every node's offer book holds alice's signed offer" in out
    assert "[streaming from alice]" in out and "job done: 48 tokens" in out
    assert out.rstrip().endswith("All demo processes stopped.")
    assert "FAILED" not in out + result.stderr

    before = rows_after(out, "Balances before (the same ledger state on every node")
    after = rows_after(out, "Balances after (identical ledger on every node")
    # "identical" and "the same" are true of what is printed under them
    assert len({state for _, state in before.values()}) == 1
    assert len({state for _, state in after.values()}) == 1
    # the coins moved by exactly the printed cost (and the 12.5 sent)
    cost = parse_coins(re.search(r"job done: 48 tokens.*, cost (\S+) coins", out).group(1))
    assert cost > 0
    sent = parse_coins("12.5")
    assert after["alice"][0] == before["alice"][0] + cost
    assert after["bob"][0] == before["bob"][0] - cost - sent
    assert after["carol"][0] == before["carol"][0] + sent
    assert f"alice +{format_coins(cost)}: her claim" in out


# ------------------------------------------------------- the convergence wait


def status(state: str, balance: int = 1_000_000_000, held: int = 0, pending_in: int = 0, peer: str = "p") -> dict:
    return {"state_hash": state * 64, "balance": balance, "held": held, "pending_in": pending_in,
            "peer_id": peer * 20, "peers": 2}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


def test_disagreements_names_every_difference():
    same = [status("a"), status("a"), status("a")]
    assert demo.disagreements(same) == []
    split = [status("a"), status("b"), status("a")]
    assert demo.disagreements(split) == [
        "the nodes report 2 different ledger states: alice aaaaaaaaaaaa, bob bbbbbbbbbbbb, carol aaaaaaaaaaaa"]
    expect = [{"balance": 1_000_000_000, "held": 0}, {"balance": 987_500_000, "held": 0}, {"pending_in": 0}]
    assert demo.disagreements([status("a"), status("a", 987_500_000, held=5), status("a", pending_in=12_500_000)],
                              expect) == ["bob's held is 0.000005, not 0", "carol's pending in is 12.5, not 0"]
    assert demo.disagreements(same, [{"balance": 1_000_000_000}] * 3) == []


def test_wait_for_returns_the_very_answer_it_checked():
    """Converging replicas: the wait goes on while they differ and hands back
    the agreeing answer itself, so what is printed is what was checked."""
    answers = iter([
        [status("a"), status("b"), status("b")],
        [status("b"), status("b"), status("c")],
        [status("c"), status("c"), status("c")],
        [status("d"), status("e"), status("f")],  # never asked for
    ])
    clock = FakeClock()
    value, took = demo.wait_for(lambda: next(answers), demo.disagreements, 60, "agreement",
                                clock=clock, sleep=clock.sleep, interval=0.5)
    assert [s["state_hash"][0] for s in value] == ["c", "c", "c"]
    assert took == 1.0 and clock.sleeps == 2


def test_wait_for_says_plainly_when_the_nodes_never_agree():
    clock = FakeClock()
    polls = []

    def poll():
        polls.append(clock.now)
        return [status("a"), status("b"), status("a")]

    with pytest.raises(demo.DemoFailed) as failed:
        demo.wait_for(poll, demo.disagreements, 120, "one ledger state on every node",
                      describe=demo.table, clock=clock, sleep=clock.sleep, interval=1.0)
    message = str(failed.value)
    assert message.startswith("after 120 s, still not true: one ledger state on every node")
    assert "2 different ledger states" in message
    assert "state bbbbbbbbbbbb" in message  # what each node reported last
    assert 120 < polls[-1] <= 122  # it waited out the whole deadline, and no longer


def test_missing_offer_names_the_nodes_without_it():
    mine = {"provider": "alice-id"}
    assert demo.missing_offer([[mine], [{"provider": "x"}, mine], [mine]], "alice-id") == []
    assert demo.missing_offer([[mine], [], [{"provider": "x"}]], "alice-id") == [
        "bob's offer book has no offer from alice", "carol's offer book has no offer from alice"]

"""``scripts/devnet``, driven as a user drives it: every step is the real
script in a subprocess, and the processes it starts outlive each command.

The big test is issue #5's first "done when": five nodes (three providers),
ten jobs at once, a provider killed while they stream; every job completes
(the consumers fail over), every ledger replica ends in one state, no coin is
created or lost, and ``down`` leaves no process behind. Everything waits on
conditions with generous deadlines, never on fixed sleeps, so a loaded
2-core machine makes it slower, not flaky.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from p2pgpu.testing.devnet import STATE_FILE, Devnet, NodeProcess, ProcessRef

ROOT = Path(__file__).resolve().parent.parent
DEVNET = ROOT / "scripts" / "devnet"
MODEL = "llama3.2:1b"
COINS = 1_000 * 1_000_000  # what the devnet's genesis gives each node, in base units


def devnet(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "P2PGPU_DEVNET_DIR": str(root)}
    return subprocess.run([str(DEVNET), *args], env=env, capture_output=True, text=True, timeout=timeout)


def ok(root: Path, *args: str, timeout: float = 300) -> str:
    result = devnet(root, *args, timeout=timeout)
    assert result.returncode == 0, f"devnet {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def status(root: Path) -> dict:
    """``status --json``: exit 0 when every node is up and answering, 3 when
    one is not (a node just restarted, or all stopped); the report either way."""
    result = devnet(root, "status", "--json")
    assert result.returncode in (0, 3), f"devnet status failed:\n{result.stdout}\n{result.stderr}"
    report = json.loads(result.stdout)
    everyone = all(n["up"] and n["status"] for n in report["nodes"])
    assert result.returncode == (0 if everyone else 3), (result.returncode, report)
    return report


def wait_until(condition, timeout: float, what: str, poll: float = 0.5, root: Path | None = None):
    """Poll ``condition`` until it returns something truthy; returns that.
    With ``root``, a timeout says what every node reported last."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (explain(root) if root else ""))
        time.sleep(poll)


def explain(root: Path) -> str:
    """The devnet's state for a failure message: every node's view and its log's tail."""
    lines = ["", devnet(root, "status").stdout]
    for name in [n["name"] for n in json.loads(devnet(root, "status", "--json").stdout or "{}").get("nodes", [])]:
        lines.append(f"--- {name} peers: " + devnet(root, "p2pgpu", name, "--json", "peers").stdout.replace("\n", " "))
        lines.append(f"--- {name} log:\n" + devnet(root, "logs", name, "-n", "30").stdout)
    return "\n".join(lines)


def recorded(root: Path) -> set[ProcessRef]:
    """Every process the state file names as running now."""
    try:
        state = json.loads((root / STATE_FILE).read_text())
    except FileNotFoundError:
        return set()
    return {ProcessRef(item["pid"], item["start_time"]) for item in state["nodes"] + state["standins"]
            if item.get("pid") is not None}


@pytest.fixture
def net_dir(tmp_path):
    """A devnet directory that is always brought down, and then checked:
    every process it ever recorded must be gone."""
    root = tmp_path / "devnet"
    seen: set[ProcessRef] = set()
    watching = threading.Event()

    def watch() -> None:  # catch processes that come and go between our looks
        while not watching.wait(0.5):
            seen.update(recorded(root))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield root
    finally:
        watching.set()
        watcher.join()
        seen.update(recorded(root))
        down = devnet(root, "down") if (root / STATE_FILE).exists() else None
        if down is not None and down.returncode != 0:
            Devnet.attach(root).down()  # stop them anyway (by recorded PID), then fail
        left = [ref.pid for ref in seen if ref.alive()]
        assert not left, f"processes left behind: {left}"
        assert down is None or down.returncode == 0, down.stdout + down.stderr


class Job(threading.Thread):
    """One ``scripts/devnet submit --json`` in a subprocess, its events recorded as they stream."""

    def __init__(self, root: Path, node: str, prompt: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.args = ["submit", "--node", node, "--json", "--model", MODEL, "--max-tokens", str(max_tokens), prompt]
        self.root = root
        self.events: list[dict] = []
        self.returncode: int | None = None
        self.stderr = ""

    def run(self) -> None:
        env = {**os.environ, "P2PGPU_DEVNET_DIR": str(self.root)}
        process = subprocess.Popen([str(DEVNET), *self.args], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout is not None and process.stderr is not None
        for line in process.stdout:
            if line.strip():
                self.events.append(json.loads(line))
        self.stderr = process.stderr.read()
        self.returncode = process.wait()

    def streaming_from(self) -> str | None:
        """The provider whose tokens are arriving now, if any."""
        provider = None
        for event in self.events:
            if event["type"] == "provider":
                provider = event["provider"]
            elif event["type"] in ("done", "error"):
                return None
        tokens_since = any(e["type"] == "token" for e in self.events[self._last_provider():])
        return provider if tokens_since else None

    def _last_provider(self) -> int:
        indices = [i for i, e in enumerate(self.events) if e["type"] == "provider"]
        return indices[-1] if indices else len(self.events)

    @property
    def final(self) -> dict | None:
        return self.events[-1] if self.events and self.events[-1]["type"] in ("done", "error") else None


@pytest.mark.slow
def test_ten_jobs_a_killed_provider_one_ledger_state_and_nothing_left_behind(net_dir):
    root = net_dir
    out = ok(root, "up", "--nodes", "5", "--providers", "3", "--standin", "--slots", "10",
             "--tokens-per-second", "40", "--reply-tokens", "1000")
    assert "All 5 nodes answer" in out

    every = wait_until(lambda: (s := status(root)) and all(
        n["status"] and n["status"]["offers_seen"] == 3 for n in s["nodes"]) and s, 120,
        "every node to hold all three providers' offers")
    names = {n["peer_id"]: n["name"] for n in every["nodes"]}
    providers = {n["name"] for n in every["nodes"] if n["provider"]}
    assert providers == {"node0", "node1", "node2"}
    total = every["genesis_total"]

    jobs = [Job(root, "node3" if i % 2 else "node4", f"job {i}: tell me about GPUs", 400) for i in range(10)]
    for job in jobs:
        job.start()

    def busiest() -> str | None:
        streaming = [job.streaming_from() for job in jobs]
        counts = {p: streaming.count(p) for p in streaming if p}
        return max(sorted(counts), key=counts.__getitem__) if counts else None

    victim = names[wait_until(busiest, 120, "a provider streaming tokens", poll=0.05)]
    ok(root, "kill", victim)
    for job in jobs:
        job.join(300)
        assert not job.is_alive(), "a job never ended"

    failed = [(job.args[-1], job.final, job.stderr) for job in jobs if job.returncode != 0 or job.final is None
              or job.final["type"] != "done"]
    assert not failed, f"jobs that did not complete: {failed}"
    assert all(job.final["tokens"] == 400 for job in jobs)
    assert all(names[job.final["provider"]] != victim for job in jobs)
    failed_over = [job for job in jobs if any(e["type"] == "retry" for e in job.events)]
    assert failed_over, "no job was streaming from the killed provider"

    # the killed provider comes back; then every replica must agree and the coins add up
    ok(root, "restart", victim)

    def converged() -> dict | None:
        report = status(root)
        nodes = report["nodes"]
        if not all(n["up"] and n["status"] for n in nodes) or not report["state_hashes_equal"]:
            return None
        if sum(own(n) for n in nodes) != total or any(n["status"]["held"] for n in nodes):
            return None
        # Every hold is settled, so each consumer spent exactly what its job
        # records say the jobs cost: an attempt cut off by the kill costs what
        # the provider claimed after its restart (its last kept voucher, up
        # to a credit window below the last one we signed), the rest what
        # their receipts said.
        for node in nodes:
            if not node["provider"] and COINS - own(node) != recorded_cost(node["name"]):
                return None
        return report

    def recorded_cost(name: str) -> int:
        listed = json.loads(ok(root, "p2pgpu", name, "--json", "jobs", "--role", "consumer"))["jobs"]
        return sum(job["cost"] for job in listed)

    def own(node: dict) -> int:
        return node["status"]["balance"] + node["status"]["held"] + node["status"]["pending_in"]

    # a job's final cost counts the vouchers it signed on every attempt: at
    # least what was paid in the end
    signed = sum(job.final["cost"] for job in jobs)
    assert signed > 0
    wait_until(converged, 180, "one ledger state on every node, coins conserved, every job paid", root=root)
    spent = sum(COINS - own(n) for n in status(root)["nodes"] if not n["provider"])
    assert 0 < spent <= signed

    refs = recorded(root)
    assert len(refs) == 5 + 3
    ok(root, "down")
    assert not [ref.pid for ref in refs if ref.alive()], "down left processes behind"
    after = status(root)
    assert not any(n["up"] for n in after["nodes"] + after["standins"])


def test_error_paths_without_a_devnet(tmp_path):
    root = tmp_path / "none"
    result = devnet(root, "status")
    assert result.returncode == 1 and "no devnet in" in result.stderr
    result = devnet(root, "kill", "node1")
    assert result.returncode == 1 and "no devnet in" in result.stderr
    result = devnet(root, "down")
    assert result.returncode == 0 and "nothing to stop" in result.stdout
    result = devnet(root, "up", "--nodes", "2", "--providers", "3")
    assert result.returncode == 2 and "more providers" in result.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    result = devnet(tmp_path / "other", "up", "--nodes", "1", "--providers", "0")
    assert result.returncode == 1 and "not empty" in result.stderr
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_every_command_answers_help_with_usage_and_exit_0(tmp_path):
    """`scripts/devnet CMD --help` used to print "error: 0" and exit 1 (click's
    help exit is a RuntimeError, which the error handler caught)."""
    from click.testing import CliRunner

    from p2pgpu.testing.devnet_cli import cli

    assert {"up", "status", "submit", "p2pgpu", "kill", "restart", "partition", "heal", "down", "logs"} <= set(
        cli.commands)
    for name in [*sorted(cli.commands), None]:
        for flag in ("--help", "-h"):
            args = [name, flag] if name else [flag]
            result = CliRunner().invoke(cli, args, env={"P2PGPU_DEVNET_DIR": str(tmp_path / "none")})
            assert result.exit_code == 0, (args, result.output)
            assert result.output.startswith("Usage: ") and "error" not in result.output, (args, result.output)
    # and the real script, as a user types it
    result = devnet(tmp_path / "none", "up", "--help")
    assert result.returncode == 0 and result.stdout.startswith("Usage: scripts/devnet up") and not result.stderr
    assert not (tmp_path / "none").exists()


def test_status_exits_3_when_a_node_is_down(tmp_path):
    """A devnet whose nodes are all stopped (the state file a `down` leaves):
    the report is printed, the nodes that are down named, and the exit
    status is 3, with or without --json."""
    root = tmp_path / "devnet"
    net = Devnet(root, 2, providers=0)
    net.make_genesis()
    net.nodes = [NodeProcess(f"node{i}", root / f"node{i}", root / f"node{i}.log", peer_id=peer)
                 for i, peer in enumerate(net.peer_ids)]
    net.save()
    result = devnet(root, "status")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "0/2 nodes up" in result.stdout and "not running: node0, node1" in result.stderr
    assert [line.split()[-2] for line in result.stdout.splitlines()[1:3]] == ["down", "down"]
    result = devnet(root, "status", "--json")
    assert result.returncode == 3
    assert [n["up"] for n in json.loads(result.stdout)["nodes"]] == [False, False]


@pytest.mark.slow
def test_error_paths_with_a_devnet(net_dir):
    root = net_dir
    started = devnet(root, "up", "--nodes", "1", "--providers", "0")
    assert started.returncode == 0, started.stdout + started.stderr
    # progress while it starts, on stderr: each node started, then ready, with the seconds
    assert re.search(r"^\[ *\d+\.\d s\] node0 started, pid \d+", started.stderr, re.M), started.stderr
    assert re.search(r"^\[ *\d+\.\d s\] node0 ready", started.stderr, re.M), started.stderr
    result = devnet(root, "status")
    assert result.returncode == 0 and "1/1 nodes up, 1 answering" in result.stdout, result.stdout + result.stderr
    result = devnet(root, "kill", "node7")
    assert result.returncode == 1 and "no node or stand-in named 'node7'" in result.stderr
    result = devnet(root, "up", "--nodes", "1", "--providers", "0")
    assert result.returncode == 1 and "already running" in result.stderr
    result = devnet(root, "partition", "node0", "node0")
    assert result.returncode == 1 and "--netns" in result.stderr
    result = devnet(root, "logs", "node0", "-n", "3")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 3
    refs = recorded(root)
    assert len(refs) == 1
    assert "stopped 1 processes" in ok(root, "down")
    assert not [ref for ref in refs if ref.alive()]
    assert "nothing was running" in ok(root, "down")
    report = status(root)
    assert [n["up"] for n in report["nodes"]] == [False]
    result = devnet(root, "submit", "--model", MODEL, "hi")
    assert result.returncode == 1 and "no node of the devnet" in result.stderr
    ok(root, "down", "--clean")
    assert not root.exists()


def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "ip", "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _netns_usable(), reason="needs root, iproute2 and veth support (network namespaces)")
def test_a_real_partition_splits_the_ledger_and_heal_joins_it(net_dir):
    root = net_dir
    ok(root, "up", "--nodes", "4", "--providers", "2", "--netns", "--offer-ttl", "3")
    # every node connected to every other first: a side whose nodes only
    # knew each other through the other side would (rightly) fall apart
    first = wait_until(lambda: (s := status(root)) and all(
        n["status"] and n["status"]["offers_seen"] == 2 and n["status"]["peers"] == 3 for n in s["nodes"]) and s,
        120, "both offers everywhere, every node connected to the three others", root=root)
    peer = {n["name"]: n["peer_id"] for n in first["nodes"]}
    ours = set(first["netns"])
    assert len(ours) == 5 and ours <= namespaces()

    ok(root, "partition", "node0,node2", "node1,node3")

    def side_offers() -> dict | None:
        report = status(root)
        seen = {n["name"]: n["status"]["offers_seen"] for n in report["nodes"]}
        return report if all(count == 1 for count in seen.values()) else None

    wait_until(side_offers, 60, "each side to see only its own provider's offer", root=root)
    sent = json.loads(ok(root, "p2pgpu", "node2", "--json", "send", peer["node3"], "5"))
    assert sent["amount"] == 5_000_000

    def split() -> dict | None:
        nodes = {n["name"]: n["status"] for n in status(root)["nodes"]}
        if nodes["node0"]["state_hash"] != nodes["node2"]["state_hash"]:
            return None
        return nodes if nodes["node2"]["balance"] == COINS - 5_000_000 else None

    nodes = wait_until(split, 60, "node0 and node2 to agree on the send", root=root)
    # the other side cannot have it: no path carries it there
    assert nodes["node1"]["state_hash"] == nodes["node3"]["state_hash"] != nodes["node0"]["state_hash"]
    assert nodes["node3"]["balance"] == COINS and nodes["node3"]["pending_in"] == 0
    job = [json.loads(line) for line in ok(root, "submit", "--node", "node3", "--json", "--model", MODEL,
                                           "--max-tokens", "5", "hello").splitlines() if line.strip()]
    assert job[-1]["type"] == "done" and job[-1]["provider"] == peer["node1"]

    ok(root, "heal")

    def joined() -> dict | None:
        report = status(root)
        nodes = {n["name"]: n["status"] for n in report["nodes"]}
        mine = nodes["node3"]
        # the coins sent across the split arrived; the job it ran meanwhile was paid for
        arrived = mine["pending_in"] == 0 and mine["balance"] + mine["held"] == COINS + 5_000_000 - job[-1]["cost"]
        return report if report["state_hashes_equal"] and arrived else None

    wait_until(joined, 180, "one ledger state again after heal, node3 holding the coins", root=root)
    ok(root, "down")
    assert not (ours & namespaces()), "down left network namespaces behind"


def namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}

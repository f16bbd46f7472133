"""Five nodes in separate OS processes (``p2pgpu node run``), driven through
the real CLI and local API, as a user would.

Every process is started by ``p2pgpu.testing.devnet`` with its PID recorded
and stopped by that PID; the test checks none is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from click.testing import CliRunner

from p2pgpu.cli import cli
from p2pgpu.testing.devnet import Devnet, pid_alive
from p2pgpu.testing.waiting import poll_until


def wait_until(condition, timeout: float = 30.0, what: str = "condition"):
    return poll_until(condition, timeout, what=what)


def run_cli(node, *args: str) -> dict:
    result = CliRunner().invoke(cli, ["--data-dir", str(node.data_dir), "--json", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.slow
def test_five_processes_offers_payments_and_a_killed_provider(tmp_path):
    net = Devnet(tmp_path / "net", nodes=5, providers=1, heartbeat_s=0.5, offer_ttl_s=2.0, sync_interval_s=1.0)
    try:
        net.up()
        clients = [node.client() for node in net.nodes]
        wait_until(lambda: all(c.offers(None) for c in clients), what="the offer on every node")
        offers = run_cli(net.nodes[3], "offers")["offers"]
        assert offers[0]["provider"] == net.peer_ids[0]
        assert {m["name"] for m in offers[0]["models"]} == {"llama3.2:1b", "qwen2.5:0.5b"}

        # coins move through the CLI and every process ends with one state
        run_cli(net.nodes[1], "send", net.peer_ids[2], "2.5", "--memo", "lunch")
        run_cli(net.nodes[0], "faucet", net.peer_ids[4], "10")
        wait_until(lambda: len({c.status()["state_hash"] for c in clients}) == 1
                   and clients[4].wallet(None)["balance"] == 1_010_000_000
                   and clients[2].wallet(None)["balance"] == 1_002_500_000, what="one ledger state")
        wallet = run_cli(net.nodes[2], "wallet")
        assert any(item["memo"] == "lunch" and item["direction"] == "in" for item in wallet["history"])
        status = run_cli(net.nodes[3], "status")
        assert status["peers"] >= 1 and status["network"]["name"].startswith("devnet-")

        # a provider killed with SIGKILL sends no withdrawal: its offer leaves every book by expiry
        # (TTL + heartbeat on a quiet machine; not asserted: a loaded one only makes the polls slower)
        net.nodes[0].kill()
        wait_until(lambda: not any(c.offers(None) for c in clients[1:]), timeout=60, what="the offer to vanish")

        # a node restarted with the same data dir rejoins and agrees
        net.restart(3)
        clients = [node.client() for node in net.nodes[1:]]  # node 3 has a new API port now
        wait_until(lambda: len({c.status()["state_hash"] for c in clients}) == 1, what="the restarted node to agree")
    finally:
        pids = net.pids()
        net.down()
    assert not [pid for pid in pids if pid_alive(pid)], "processes left behind"
    result = CliRunner().invoke(cli, ["--data-dir", str(net.nodes[1].data_dir), "status"])
    assert result.exit_code == 3 and "not running" in result.output


@pytest.mark.slow
def test_sigterm_withdraws_the_offer_and_exits_within_two_seconds(tmp_path):
    net = Devnet(tmp_path / "net", nodes=2, providers=1, heartbeat_s=0.5, offer_ttl_s=30.0)
    try:
        net.up()
        consumer = net.nodes[1].client()
        wait_until(lambda: bool(consumer.offers(None)), what="the offer")
        provider = net.nodes[0].process
        start = time.monotonic()
        os.kill(provider.pid, signal.SIGTERM)
        provider.wait(30)
        assert time.monotonic() - start < 2.0 and provider.returncode == 0
        # with a 30 s TTL, only the signed withdrawal can empty the book this fast
        wait_until(lambda: not consumer.offers(None), timeout=5, what="the withdrawal")
    finally:
        net.down()

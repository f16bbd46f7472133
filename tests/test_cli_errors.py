"""How the command line fails (issue 9): one clear line, a stable JSON shape
with --json, documented exit statuses.

The ``node run`` failures run the real console script against a real node
process on 127.0.0.1 (ports 0, mDNS off as every host is), because what
they are about is processes: a port another process holds, a data dir
another process has locked, a signal. The other cases run in-process
through click's CliRunner.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from test_cli import console_script, two_party_genesis, write_genesis

from p2pgpu.api import write_api_address
from p2pgpu.api_client import ApiClient
from p2pgpu.cli import EXIT_INTERRUPTED, EXIT_NOT_RUNNING, _as_failure, cli
from p2pgpu.config import NodeConfig
from p2pgpu.datadir import DataDir
from p2pgpu.errors import ConfigError
from p2pgpu.node import Node
from p2pgpu.testing.ledger import make_genesis
from p2pgpu.testing.waiting import wait_until

START_DEADLINE = 60  # a cold interpreter importing libp2p on a busy 2-core box
LOG_LEVELS = ("DEBUG ", "INFO ", "WARNING ")


def environment(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PGPU_")}
    env.update({"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "xdg"),
                "OLLAMA_HOST": "http://127.0.0.1:9"})  # nothing there: --no-provide anyway
    return env


async def p2pgpu(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """The console script, to its end (killed if it runs past the deadline)."""
    with trio.fail_after(START_DEADLINE):
        return await trio.run_process([*console_script(), *args], capture_stdout=True, capture_stderr=True,
                                      check=False, env=environment(tmp_path))


def the_error(result: subprocess.CompletedProcess[bytes], code: int = 1) -> str:
    """The one error line of a failed run: besides the node's own log lines
    (``LEVEL logger: ...``), stderr holds exactly one line, and no traceback."""
    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert "Traceback" not in stderr and "ExceptionGroup" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if not line.startswith(LOG_LEVELS)]
    assert len(lines) == 1, stderr
    return lines[0]


def the_json_error(result: subprocess.CompletedProcess[bytes], code: int = 1) -> dict:
    error = json.loads(the_error(result, code))["error"]
    assert set(error) == {"code", "message", "exit_code"} and error["exit_code"] == code
    return error


@dataclass
class NodeProcess:
    process: trio.Process
    data_dir: DataDir
    log: Path

    def api_port(self) -> int:
        return int((self.data_dir.path / "api.addr").read_text().strip().rsplit(":", 1)[1])

    async def p2p_port(self) -> int:
        def listen_addrs() -> list[str]:
            with ApiClient.from_data_dir(self.data_dir) as client:
                return client.status()["listen_addrs"]

        return int((await trio.to_thread.run_sync(listen_addrs))[0].split("/")[4])


@asynccontextmanager
async def node_process(tmp_path: Path, name: str, genesis: Path) -> AsyncIterator[NodeProcess]:
    """``p2pgpu node run`` in a process of its own, up (its API answers);
    stopped by its PID on the way out."""
    data_dir = DataDir(tmp_path / name)
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as log:
        process = await trio.lowlevel.open_process(
            [*console_script(), "--data-dir", str(data_dir.path), "node", "run", "--genesis", str(genesis),
             "--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0", "--no-provide"],
            stdout=log, stderr=subprocess.STDOUT, env=environment(tmp_path))
    pid = process.pid
    try:
        await wait_until(lambda: (data_dir.path / "api.addr").exists() or process.poll() is not None,
                         START_DEADLINE, what=f"{name}'s API")
        assert process.poll() is None, log_path.read_text()
        yield NodeProcess(process, data_dir, log_path)
    finally:
        if process.poll() is None:
            os.kill(pid, signal.SIGTERM)
            with trio.move_on_after(20):
                await process.wait()
        if process.poll() is None:
            os.kill(pid, signal.SIGKILL)
            await process.wait()


# ------------------------------------------------------------------ node run


async def test_node_run_mistakes_are_one_line_each(tmp_path):
    """Each used to be a 60-90 line exception-group traceback."""
    genesis = write_genesis(tmp_path / "genesis.json", two_party_genesis())
    async with node_process(tmp_path, "first", genesis) as first:
        second = ["--data-dir", str(tmp_path / "second"), "node", "run", "--genesis", str(genesis), "--no-provide"]

        api_taken = await p2pgpu(tmp_path, *second, "--listen", "/ip4/127.0.0.1/tcp/0",
                                 "--api-port", str(first.api_port()), "--json")
        error = the_json_error(api_taken)
        assert error["code"] == "address_in_use"
        assert f"127.0.0.1:{first.api_port()}" in error["message"] and "--api-port" in error["message"]

        # py-libp2p binds with SO_REUSEPORT: this second node used to start silently
        p2p_port = await first.p2p_port()
        p2p_taken = await p2pgpu(tmp_path, *second, "--listen", f"/ip4/127.0.0.1/tcp/{p2p_port}")
        line = the_error(p2p_taken)
        assert line.startswith("error: ") and f"tcp/{p2p_port}: the p2p port is in use" in line and "--listen" in line

        same_dir = await p2pgpu(tmp_path, "--data-dir", str(first.data_dir.path), "node", "run",
                                "--listen", "/ip4/127.0.0.1/tcp/0", "--no-provide")
        line = the_error(same_dir)
        assert line.startswith("error: ") and "another node" in line and "--data-dir" in line

        assert first.process.poll() is None  # none of this disturbed the first node
        with ApiClient.from_data_dir(first.data_dir) as client:
            assert (await trio.to_thread.run_sync(client.status))["peer_id"]


@pytest.mark.parametrize(
    ("flags", "fragment", "json_flag"),
    [
        (["--listen", "/ip4/1.2.3/tcp/4001"], "not a multiaddr: '/ip4/1.2.3/tcp/4001'", False),
        (["--listen", "/ip4/127.0.0.1/udp/4001"], "listen addresses are /ip4|ip6/<address>/tcp/<port>", True),
        (["--bootstrap", "/ip4/127.0.0.1/tcp/4001"], "does not end in /p2p/<peer id>", False),
        (["--bootstrap", "/ip4/127.0.0.1/tcp/4001/p2p/notapeer"], "bootstrap address", True),
    ],
)
async def test_bad_addresses_are_refused_before_anything_starts(tmp_path, flags, fragment, json_flag):
    genesis = write_genesis(tmp_path / "genesis.json", two_party_genesis())
    data_dir = tmp_path / "node"
    args = ["--data-dir", str(data_dir), "node", "run", "--genesis", str(genesis), "--no-provide", *flags]
    if json_flag:
        error = the_json_error(await p2pgpu(tmp_path, *args, "--json"))
        assert error["code"] == "config_error" and fragment in error["message"]
    else:
        line = the_error(await p2pgpu(tmp_path, *args))
        assert line.startswith("error: ") and fragment in line
    assert not data_dir.exists()  # checked before the data dir, key or ledger was touched


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, 0)])
async def test_a_signal_stops_the_node_cleanly_with_its_exit_status(tmp_path, signum, status):
    genesis = write_genesis(tmp_path / "genesis.json", two_party_genesis())
    async with node_process(tmp_path, "node", genesis) as node:
        os.kill(node.process.pid, signum)
        with trio.fail_after(30):
            await node.process.wait()
    log = node.log.read_text()
    assert node.process.returncode == status, log
    assert f"received {signal.Signals(signum).name}; shutting down" in log and "stopped" in log
    assert "Traceback" not in log and not any(line.startswith("error") for line in log.splitlines())
    assert not (node.data_dir.path / "api.addr").exists()  # a clean shutdown removes it


@pytest.mark.parametrize("json_flag", [False, True])
async def test_ctrl_c_in_a_client_command_exits_130(tmp_path, json_flag):
    """`status` waiting on a node that accepted the connection but never
    answers: Ctrl-C must end it with 130 and one line, not click's
    "Aborted!" and 1 (nor a traceback)."""
    data_dir = DataDir(tmp_path / "node")
    data_dir.load_or_create_token(create=True)
    with trio.socket.socket() as silent:
        await silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        write_api_address(data_dir, silent.getsockname()[1])
        args = ["--data-dir", str(data_dir.path), "status", *(["--json"] if json_flag else [])]
        process = await trio.lowlevel.open_process([*console_script(), *args], stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, env=environment(tmp_path))
        try:
            with trio.fail_after(START_DEADLINE):
                connection, _ = await silent.accept()
                with connection:
                    request = b""
                    while b"\r\n\r\n" not in request:  # the request is sent: it now waits for the answer
                        request += await connection.recv(4096)
                    os.kill(process.pid, signal.SIGINT)
                    await process.wait()
                    stderr = b""
                    while chunk := await process.stderr.receive_some(65536):
                        stderr += chunk
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                await process.wait()
            await process.stdout.aclose()
            await process.stderr.aclose()
    result = subprocess.CompletedProcess(args, process.returncode, b"", stderr)
    if json_flag:
        assert the_json_error(result, EXIT_INTERRUPTED)["code"] == "interrupted"
    else:
        assert the_error(result, EXIT_INTERRUPTED) == "error: interrupted"


# --------------------------------------------------------------- in-process


@pytest.fixture
def runner(tmp_path) -> CliRunner:
    return CliRunner(env={"P2PGPU_DATA_DIR": str(tmp_path / "node"), "HOME": str(tmp_path / "home"),
                          "XDG_DATA_HOME": str(tmp_path / "xdg")})


@pytest.mark.parametrize(
    ("args", "code", "exit_code"),
    [
        (["id"], "identity_error", 1),  # no key yet
        (["genesis", "show", "/nonexistent/genesis.json"], "config_error", 1),
        (["send", "12D3KooWnobody", "0"], "malformed_input", 1),
        (["status"], "node_not_running", EXIT_NOT_RUNNING),
        (["send"], "usage_error", 2),  # missing arguments
        (["wallet", "--no-such-option"], "usage_error", 2),
        (["no-such-command"], "usage_error", 2),
        (["jobs", "--limit", "0"], "usage_error", 2),  # a bad value
    ],
)
def test_with_json_every_error_is_one_json_object_on_stderr(runner, args, code, exit_code):
    for where in ([*args, "--json"], ["--json", *args]):
        result = runner.invoke(cli, where, catch_exceptions=False)
        assert result.exit_code == exit_code, (where, result.stderr)
        assert result.stdout == "" and result.stderr.count("\n") == 1, (where, result.stderr)
        error = json.loads(result.stderr)["error"]
        assert error == {"code": code, "message": error["message"], "exit_code": exit_code}
        assert error["message"] and "\n" not in error["message"]
    if exit_code != 2:  # without --json: the same message as one `error:` line
        plain = runner.invoke(cli, args, catch_exceptions=False)
        assert plain.exit_code == exit_code and plain.stderr == f"error: {error['message']}\n"


def test_without_json_usage_errors_are_one_line_naming_the_help(runner):
    result = runner.invoke(cli, ["send"], catch_exceptions=False, prog_name="p2pgpu")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: Missing argument") and result.stderr.count("\n") == 1
    assert "`p2pgpu send --help`" in result.stderr
    result = runner.invoke(cli, ["nosuchcmd"], catch_exceptions=False, prog_name="p2pgpu")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "`p2pgpu --help`" in result.stderr


def test_exception_groups_are_reported_as_the_error_inside():
    """trio nurseries wrap a failure in groups, several layers deep."""
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [ConfigError("the port\nis in use")])])
    failure = _as_failure(nested, json_output=False)
    assert failure is not None and failure.message == "the port is in use"
    assert (failure.code, failure.exit_code) == ("config_error", 1)
    interrupted = _as_failure(BaseExceptionGroup("g", [KeyboardInterrupt(), ConfigError("x")]), json_output=True)
    assert interrupted is not None and (interrupted.code, interrupted.exit_code) == ("interrupted", 130)
    # anything that is not ours is a bug, and keeps its traceback
    assert _as_failure(ExceptionGroup("g", [ValueError("bug")]), json_output=False) is None
    assert _as_failure(ExceptionGroup("g", [ConfigError("x"), ValueError("bug")]), json_output=False) is None
    assert _as_failure(ValueError("bug"), json_output=False) is None


# ------------------------------------------------------------ node run --help


def test_node_run_help_shows_the_defaults_of_node_config(runner, monkeypatch):
    text = " ".join(runner.invoke(cli, ["node", "run", "--help"], catch_exceptions=False).stdout.split())
    defaults = {f.name: f.default for f in dataclasses.fields(NodeConfig)}
    for option, name in [("--listen", "listen"), ("--slots", "slots"), ("--api-port", "api_port")]:
        assert f"{option} " in text and f"[default: {defaults[name]}]" in text, (option, text)
    for name in ("heartbeat_s", "offer_ttl_s", "sync_interval_s", "queue_timeout_s"):
        assert f"[default: {defaults[name]:g}]" in text, name
    assert "[default: --provide]" in text and "[default: --no-offer-cpu]" in text
    # derived, not written out: another default shows as soon as config.py says so
    monkeypatch.setattr("p2pgpu.config.setting_defaults", lambda: {"slots": 7, "price_in": 2_500_000})
    text = " ".join(runner.invoke(cli, ["node", "run", "--help"], catch_exceptions=False).stdout.split())
    assert "[default: 7]" in text and "[default: 2.5 coins]" in text
    assert "[default: /ip4/0.0.0.0/tcp/4001]" not in text


# --------------------------------------------------- a damaged installed genesis


def test_init_replaces_an_unreadable_installed_genesis_and_says_so(runner, tmp_path):
    good = write_genesis(tmp_path / "good.json", two_party_genesis())
    other = write_genesis(tmp_path / "other.json", make_genesis())
    data_dir = DataDir(tmp_path / "node")
    assert runner.invoke(cli, ["init", "--genesis", str(good)]).exit_code == 0
    data_dir.genesis_path.write_bytes(b'{"version": 1, "name": "cut sh')  # a crash mid-write, say

    broken = runner.invoke(cli, ["genesis", "show"])
    assert broken.exit_code == 1 and "p2pgpu init --genesis FILE" in broken.stderr  # says how to repair it

    result = runner.invoke(cli, ["init", "--genesis", str(good)], catch_exceptions=False)
    assert result.exit_code == 0 and "replacing an unreadable genesis file" in result.stdout
    assert data_dir.genesis() == two_party_genesis()
    again = json.loads(runner.invoke(cli, ["init", "--genesis", str(good), "--json"]).stdout)
    assert again["genesis_repaired"] is False and again["genesis_installed"] is False

    # a valid genesis of another network is still refused: that is a real mistake
    refused = runner.invoke(cli, ["init", "--genesis", str(other)])
    assert refused.exit_code == 1 and "already belongs to network" in refused.stderr
    assert data_dir.genesis() == two_party_genesis()


def test_node_run_genesis_replaces_an_unreadable_one_and_logs_it(tmp_path, caplog):
    good = write_genesis(tmp_path / "good.json", two_party_genesis())
    data_dir = DataDir(tmp_path / "node")
    data_dir.ensure()
    data_dir.genesis_path.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="p2pgpu.node"):
        node = Node(NodeConfig(data_dir=data_dir.path, genesis=good))
    assert node.genesis == two_party_genesis() and data_dir.genesis() == two_party_genesis()
    assert "was unreadable; replaced it" in caplog.text
    with pytest.raises(ConfigError, match="already belongs to network"):
        Node(NodeConfig(data_dir=data_dir.path, genesis=write_genesis(tmp_path / "other.json", make_genesis())))

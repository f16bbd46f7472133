"""The CLI's node commands (`status`, `peers`, `offers`, `wallet`, `send`,
`faucet`) and ``ApiClient`` against a real served API.

The CLI and its client are synchronous, so the server cannot share their
thread: ``ThreadedApi`` runs ``serve_api`` with a ``FakeNodeView`` under its
own ``trio.run`` in a background thread, and stops it on exit by cancelling
that run's scope through its trio token, then joins the thread. Waits are on
events with generous deadlines, never on sleeps.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
import trio
from click.testing import CliRunner, Result
from p2pgpu.testing.fake_view import ALICE, BOB, CAROL, NETWORK_ID, FakeNodeView

from p2pgpu import errors
from p2pgpu.api import create_app, serve_api, write_api_address
from p2pgpu.api_client import ApiClient, ApiError, NodeNotRunning, TokenMismatch
from p2pgpu.cli import cli
from p2pgpu.datadir import DataDir

DEADLINE = 60.0  # seconds; for a loaded two-core machine
EXPECTED = FakeNodeView(on_trio_thread=False)  # what the served fake answers, for comparison


class ThreadedApi:
    """``serve_api`` in a thread of its own, as a context manager."""

    def __init__(self, view: FakeNodeView, token: str) -> None:
        self.view = view
        self._app = create_app(view, token)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="threaded-api", daemon=True)
        self._scope: trio.CancelScope | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._error: BaseException | None = None
        self.port = 0

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by __enter__ / __exit__
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                self.port = await nursery.start(serve_api, self._app)
                self._ready.set()

    def __enter__(self) -> ThreadedApi:
        self._thread.start()
        assert self._ready.wait(DEADLINE), "the API server did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._thread.is_alive():
            assert self._scope is not None and self._trio_token is not None
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._trio_token)
            except trio.RunFinishedError:
                pass
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), "the API server thread did not stop"
        if self._error is not None and exc_type is None:
            raise self._error


class Node:
    """A data dir whose node "runs": its token, its api.addr, a served fake."""

    def __init__(self, tmp_path: Path, view: FakeNodeView) -> None:
        self.tmp = tmp_path
        self.data_dir = DataDir(tmp_path / "node")
        self.token = self.data_dir.load_or_create_token(create=True)
        self.view = view
        self.env = {
            "P2PGPU_DATA_DIR": str(self.data_dir.path),
            "HOME": str(tmp_path / "home"),
            "XDG_DATA_HOME": str(tmp_path / "xdg"),
        }
        self.runner = CliRunner(env=self.env)

    def __call__(self, *args: str) -> Result:
        result = self.runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)

    def fails(self, *args: str, code: int = 1) -> Result:
        """A command that must fail cleanly: exit ``code``, one error line
        (one JSON object with --json), no traceback. Usage errors (2) are click's."""
        result = self.runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == code, (result.stdout, result.stderr)
        if code != 2:
            assert result.stderr.count("\n") == 1, result.stderr
            if "--json" in args:
                assert json.loads(result.stderr)["error"]["exit_code"] == code, result.stderr
            else:
                assert result.stderr.startswith("error: "), result.stderr
        assert "Traceback" not in result.stderr
        return result


@contextmanager
def running_node(tmp_path, view) -> Iterator[Node]:
    """A data dir whose api.addr points at the real API serving ``view``."""
    running = Node(tmp_path, view)
    with ThreadedApi(view, running.token) as server:
        write_api_address(running.data_dir, server.port)
        yield running


@pytest.fixture
def node(tmp_path) -> Iterator[Node]:
    with running_node(tmp_path, FakeNodeView()) as running:
        yield running


@pytest.fixture
def stopped(tmp_path) -> Node:
    """A data dir with an identity whose node is not running."""
    return Node(tmp_path, FakeNodeView())


NODE_COMMANDS = [
    ("status",),
    ("peers",),
    ("offers",),
    ("offers", "--model", "llama3.2:3b"),
    ("wallet",),
    ("wallet", "--account", BOB),
    ("send", BOB, "1"),
    ("faucet", "1"),
    ("faucet", BOB, "1"),
]


# ------------------------------------------------------------- the commands


def test_status(node):
    out = node("status").stdout
    for fact in (ALICE, NETWORK_ID, "testnet", "both", "0.1.0", "1h 2m", "/ip4/127.0.0.1/tcp/4001"):
        assert fact in out
    assert "12.5 coins" in out  # balance
    assert "0.25 coins" in out  # pending in
    assert "42 entries" in out
    assert any(line.startswith("frozen:") and CAROL in line for line in out.splitlines())
    assert "cd" * 32 not in out  # a view's extras are for --json
    assert "2 connected" in out
    assert node.json("status") == EXPECTED.status()


def test_peers(node):
    out = node("peers").stdout
    assert out.splitlines()[0].split() == ["PEER", "ID", "STATE", "SINCE", "BOOTSTRAP", "ADDRESS"]
    bob_line = next(line for line in out.splitlines() if BOB in line)
    assert "connected" in bob_line and "2m 5s" in bob_line and "yes" in bob_line
    assert "/ip4/10.0.0.7/tcp/4001 (+1 more)" in bob_line
    carol_line = next(line for line in out.splitlines() if CAROL in line)
    assert "known" in carol_line
    assert node.json("peers") == {"peers": EXPECTED.peers()}


def test_offers(node):
    out = node("offers").stdout
    assert BOB in out and CAROL in out
    assert "llama3.2:3b*" in out and "qwen2.5:7b" in out  # * marks the warm model
    assert "NVIDIA GeForce RTX 4090 (24.0 GiB, 20.0 GiB free)" in out
    assert "CPU only" in out
    assert "coins per million tokens" in out
    bob_line = next(line for line in out.splitlines() if BOB in line)
    assert " 0.5 " in bob_line and " 1.5 " in bob_line and "1/2" in bob_line
    assert node.json("offers") == {"offers": EXPECTED.offers(None)}


def test_offers_by_model(node):
    data = node.json("offers", "--model", "llama3.2:3b")
    assert [offer["provider"] for offer in data["offers"]] == [BOB]
    assert ("offers", "llama3.2:3b") in node.view.calls
    assert "No offers for nothing:1b seen yet." in node("offers", "--model", "nothing:1b").stdout


def test_wallet(node):
    out = node("wallet").stdout
    assert ALICE in out
    for label, value in [("balance", "12.5"), ("held", "1"), ("pending in", "0.25"), ("spendable", "12.5")]:
        assert any(line.startswith(f"{label}:") and f"{value} coins" in line for line in out.splitlines()), label
    lines = out.splitlines()
    sent = next(line for line in lines if CAROL in line)
    received = next(line for line in lines if BOB in line)
    assert "sent" in sent and "-0.5" in sent and "2023-11-14T22:14:20Z" in sent
    assert "received" in received and "+13" in received and "welcome" in received
    # A memo is another peer's text: its escape sequence must not reach the terminal.
    assert "\x1b" not in out and "tea \\u001b[31mred" in out
    data = node.json("wallet")
    assert data["history"][0]["memo"] == "tea \x1b[31mred"  # JSON carries it exactly
    assert data == EXPECTED.wallet(None)


def test_wallet_of_another_account(node):
    out = node("wallet", "--account", CAROL).stdout
    assert CAROL in out and "No history yet." in out and "frozen:" in out
    assert ("wallet", CAROL) in node.view.calls


def test_wallet_of_a_malformed_account_is_a_clean_error(node):
    result = node.fails("wallet", "--account", "nobody")
    assert "account" in result.stderr and "peer id" in result.stderr


def test_send(node):
    out = node("send", BOB, "2.5", "--memo", "lunch").stdout
    assert "sent:" in out and f"2.5 coins to {BOB}" in out
    assert node.view.calls == [("send", BOB, 2_500_000, "lunch")]
    data = node.json("send", BOB, "0.000001")
    assert data["amount"] == 1 and data["to"] == BOB and len(data["entry_id"]) == 64
    assert node.json("wallet")["balance"] == 12_500_000 - 2_500_000 - 1


def test_send_more_than_spendable_is_a_clean_error(node):
    result = node.fails("send", BOB, "100")
    assert result.stderr == "error: sending 100 coins needs more than the 12.5 spendable\n"


@pytest.mark.parametrize("amount", ["abc", "0", "1.0000001", "1e3", "-"])
def test_send_refuses_a_bad_amount_before_asking_the_node(node, amount):
    node.fails("send", BOB, amount)
    assert node.view.calls == []


def test_send_to_a_malformed_peer_id_is_a_clean_error(node):
    assert "peer id" in node.fails("send", "bob", "1").stderr


def test_faucet_defaults_to_this_node(node):
    node.view.is_faucet = True
    out = node("faucet", "5").stdout
    assert f"5 coins to {ALICE}" in out and "minted:" in out
    assert ("faucet", ALICE, 5_000_000) in node.view.calls
    data = node.json("faucet", BOB, "0.5")
    assert data["to"] == BOB and data["amount"] == 500_000


def test_faucet_on_a_node_without_the_key_is_a_clean_error(node):
    assert "faucet key" in node.fails("faucet", "5").stderr


@pytest.mark.parametrize("words", [(), (BOB, "1", "2")])
def test_faucet_with_the_wrong_number_of_arguments_is_a_usage_error(node, words):
    result = node.fails("faucet", *words, code=2)
    assert "[TO] AMOUNT_COINS" in result.stderr


def test_proxy_settings_in_the_environment_are_ignored(node, monkeypatch):
    """A proxy must never see the token: the client does not read them."""
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert node.json("status")["peer_id"] == ALICE


def test_an_unexpected_error_in_the_node_is_a_clean_error(node):
    node.view.fail_next = RuntimeError("boom")
    result = node.fails("status")
    assert "internal error in the node" in result.stderr and "boom" not in result.stderr


# ------------------------------------------------------ node not running


@pytest.mark.parametrize("args", NODE_COMMANDS)
def test_every_node_command_says_the_node_is_not_running(stopped, args):
    result = stopped.fails(*args, code=3)
    assert result.stderr.startswith("error: the node is not running (no local API at ")
    assert "start it with `p2pgpu node run`" in result.stderr
    error = json.loads(stopped.fails(*args, "--json", code=3).stderr)["error"]
    assert error["code"] == "node_not_running" and error["exit_code"] == 3
    assert error["message"] == result.stderr.removeprefix("error: ").rstrip("\n")
    assert str(stopped.data_dir.path) in result.stderr


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port bound but not listening: connecting to it is refused, and no
    one else can take it while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize("args", NODE_COMMANDS)
def test_a_stale_api_addr_says_the_node_is_not_running(stopped, dead_port, args):
    write_api_address(stopped.data_dir, dead_port)
    result = stopped.fails(*args, code=3)
    assert f"no local API at http://127.0.0.1:{dead_port}" in result.stderr
    assert "start it with `p2pgpu node run`" in result.stderr


def test_an_api_addr_pointing_off_this_host_is_refused(stopped):
    (stopped.data_dir.path / "api.addr").write_text("http://10.1.2.3:8080\n")
    assert "does not hold a local API address" in stopped.fails("status").stderr


def test_a_token_mismatch_is_explained(tmp_path):
    node = Node(tmp_path, FakeNodeView())
    with ThreadedApi(node.view, "0" * 64) as server:
        write_api_address(node.data_dir, server.port)
        result = node.fails("status")
    assert "token mismatch" in result.stderr
    assert f"the API token in {node.data_dir.path} does not match the running node's" in result.stderr
    assert "Restart the node" in result.stderr and "`p2pgpu node run`" in result.stderr
    assert node.view.calls == []


def test_a_missing_token_file_is_a_clean_error(tmp_path, dead_port):
    """No node answers: a new token (init, or the next node run) is the fix."""
    node = Node(tmp_path, FakeNodeView())
    write_api_address(node.data_dir, dead_port)
    node.data_dir.token_path.unlink()
    result = node.fails("status")
    assert "no API token" in result.stderr and "p2pgpu init" in result.stderr


def test_a_missing_token_while_the_node_runs_says_restart_it(node):
    """`p2pgpu init` would write a token the running node does not know: the
    message must send the user to restart the node, not to init alone."""
    node.data_dir.token_path.unlink()
    result = node.fails("status")
    assert "a node is running from this data dir" in result.stderr
    assert "Restart the node" in result.stderr and "`p2pgpu node run`" in result.stderr
    assert json.loads(node.fails("status", "--json").stderr)["error"]["code"] == "token_mismatch"
    assert node.view.calls == []


# ------------------------------------------------------------- the client


def test_the_client_mirrors_the_view(node):
    with ApiClient.from_data_dir(node.data_dir) as client:
        assert client.ping() is True
        assert client.status()["peer_id"] == ALICE
        assert [peer["peer_id"] for peer in client.peers()] == [BOB, CAROL]
        assert len(client.offers()) == 2 and len(client.offers("llama3.2:3b")) == 1
        assert client.wallet()["account"] == ALICE and client.wallet(BOB)["account"] == BOB
        assert client.send(BOB, 7, "hi")["amount"] == 7
        with pytest.raises(errors.InsufficientFunds, match="spendable"):
            client.send(BOB, 10**12)
        with pytest.raises(errors.MalformedInput, match="peer id"):
            client.send("nobody", 1)
        with pytest.raises(errors.LedgerRuleViolation, match="faucet key"):
            client.faucet(ALICE, 1)


def mock_client(handler: Any) -> ApiClient:
    return ApiClient("http://127.0.0.1:1", "t" * 64, transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("response", "error", "fragment"),
    [
        (httpx.Response(200, text="<html>hello</html>"), ApiError, "not the node's JSON"),
        (httpx.Response(200, json=[1, 2]), ApiError, "not the node's JSON"),
        (httpx.Response(502, text="Bad Gateway"), ApiError, "HTTP 502"),
        (httpx.Response(500, json={"error": "internal", "type": "InternalError"}), ApiError, "internal"),
        (httpx.Response(409, json={"error": "short", "type": "InsufficientFunds"}), errors.InsufficientFunds, "short"),
        (httpx.Response(400, json={"error": "odd", "type": "__class__"}), ApiError, "odd"),
        (httpx.Response(400, json={"error": "odd", "type": "Path"}), ApiError, "odd"),
        (httpx.Response(400, json={"error": "odd", "type": "ValueError"}), ApiError, "odd"),
        (httpx.Response(400, json={"type": "ConfigError"}), ApiError, "without an error message"),
        (httpx.Response(401, text="nope"), TokenMismatch, "token mismatch"),
    ],
)
def test_the_client_maps_every_answer_to_a_p2pgpu_error(response, error, fragment):
    with mock_client(lambda request: response) as client:
        with pytest.raises(error, match=fragment) as caught:
            client.status()
    assert type(caught.value) is error
    assert isinstance(caught.value, errors.P2PGPUError)


def test_the_client_maps_transport_failures(dead_port):
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def dropped(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed", request=request)

    with mock_client(timeout) as client, pytest.raises(ApiError, match="did not answer in time"):
        client.status()
    with mock_client(dropped) as client, pytest.raises(ApiError, match="lost the connection"):
        client.status()
    with ApiClient(f"http://127.0.0.1:{dead_port}", "t" * 64) as client, pytest.raises(NodeNotRunning):
        client.status()


def test_the_client_sends_the_token_and_no_proxy_settings():
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"peers": []})

    with mock_client(record) as client:
        assert client.peers() == []
    assert seen[0].headers["authorization"] == "Bearer " + "t" * 64
    assert seen[0].url.path == "/v1/peers"

"""The node's local HTTP API over real HTTP: ``serve_api`` on 127.0.0.1:0 in
the test's own nursery, a fake node behind it, a real ``httpx.AsyncClient``.

Every server a test starts lives in a nursery that the test (or its fixture)
cancels before it returns, and every check that waits does so on a
condition, never on a sleep.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import p2pgpu.api as api_module
from p2pgpu.api import (
    MAX_BODY,
    NodeView,
    api_address_path,
    create_app,
    read_api_address,
    remove_api_address,
    serve_api,
    write_api_address,
)
from p2pgpu.datadir import DataDir
from p2pgpu.errors import ConfigError, InsufficientFunds, LedgerRuleViolation, MalformedInput, P2PGPUError
from p2pgpu.testing.fake_view import ALICE, BOB, CAROL, NETWORK_ID, TOKEN, FakeNodeView

# Generous: these tests must pass on a loaded two-core machine.
HTTP_TIMEOUT = 30.0


# --------------------------------------------------------------- the fake


def _check_protocol(view: FakeNodeView) -> NodeView:
    return view  # the type checker confirms the fake fits the seam


# ------------------------------------------------------------ the fixture


@dataclass
class Served:
    view: FakeNodeView
    port: int
    client: httpx.AsyncClient  # sends the right token
    bare: httpx.AsyncClient  # sends no token

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    view = FakeNodeView()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_api, create_app(view, TOKEN))
        url = f"http://127.0.0.1:{port}"
        async with (
            httpx.AsyncClient(base_url=url, headers=auth(), timeout=HTTP_TIMEOUT, trust_env=False) as client,
            httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT, trust_env=False) as bare,
        ):
            yield Served(view, port, client, bare)
        nursery.cancel_scope.cancel()


def assert_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "type"}, body
    assert body["type"] == kind
    assert "Traceback" not in response.text
    return body["error"]


ROUTES = [
    ("GET", "/v1/ping"),
    ("GET", "/v1/status"),
    ("GET", "/v1/peers"),
    ("GET", "/v1/offers"),
    ("GET", "/v1/wallet"),
    ("POST", "/v1/send"),
    ("POST", "/v1/faucet"),
    ("GET", "/no/such/route"),
    ("DELETE", "/v1/status"),
]


# ------------------------------------------------------- authentication


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_every_route_refuses_a_request_without_the_token(served, method, path):
    body = {"to": BOB, "amount": 1} if method == "POST" else None
    response = await served.bare.request(method, path, json=body)
    message = assert_error(response, 401, "Unauthorized")
    assert "Bearer" in message
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert served.view.calls == []


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize(
    "header",
    [
        f"Bearer {TOKEN[:-1]}",  # one character short
        f"Bearer {TOKEN}0",  # one too many
        f"Bearer {TOKEN.upper()}",
        "Bearer " + "0" * 64,
        f"Basic {TOKEN}",  # right secret, wrong scheme
        f"{TOKEN}",
        "Bearer",
        "",
    ],
)
async def test_every_route_refuses_a_wrong_token(served, method, path, header):
    response = await served.bare.request(method, path, headers={"Authorization": header})
    assert_error(response, 401, "Unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert served.view.calls == []


async def test_two_authorization_headers_are_refused(served):
    headers = [("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")]
    response = await served.bare.get("/v1/status", headers=headers)
    assert_error(response, 401, "Unauthorized")


async def test_the_scheme_is_case_insensitive(served):
    response = await served.bare.get("/v1/ping", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status_code == 200
    assert response.json() == {"ok": True}


async def test_a_wrong_token_is_named_invalid_token(served):
    response = await served.bare.get("/v1/status", headers=auth("f" * 64))
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert "wrong API token" in response.json()["error"]


async def test_the_token_is_compared_in_constant_time_by_construction(served, monkeypatch):
    """The decision goes through ``hmac.compare_digest`` on two SHA-256
    digests: 32 bytes against 32 bytes whatever was sent, so neither the
    token's bytes nor its length show in the timing."""
    assert api_module.compare_digest is hmac.compare_digest
    seen: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(api_module, "compare_digest", spy)
    for token in ("x", "f" * 64, "f" * 500, TOKEN):
        await served.bare.get("/v1/ping", headers=auth(token))
    expected = hashlib.sha256(TOKEN.encode()).digest()
    assert len(seen) == 4
    assert all(len(a) == len(b) == 32 and b == expected for a, b in seen)
    assert [a == b for a, b in seen] == [False, False, False, True]


def test_create_app_refuses_a_token_that_would_let_anyone_in():
    for token in ("", " ", "with space", "tab\t", "nön-ascii"):
        with pytest.raises(ConfigError):
            create_app(FakeNodeView(), token)


# ------------------------------------------------------------ listening


def listening_addresses(port: int) -> set[str]:
    """Local addresses (kernel hex) of the TCP sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
async def test_it_listens_on_127_0_0_1_only(served):
    assert listening_addresses(served.port) == {"0100007F"}  # 127.0.0.1, little-endian
    # Another loopback address reaches the same host on Linux, yet nothing
    # answers there: the socket is bound to 127.0.0.1, not to a wildcard.
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.2", served.port)
    stream = await trio.open_tcp_stream("127.0.0.1", served.port)
    await stream.aclose()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::1", "localhost", "10.0.0.1", "127.0.0.2", ""])
async def test_serve_api_refuses_any_other_host(host):
    with trio.fail_after(HTTP_TIMEOUT):
        with pytest.raises(ConfigError, match="127.0.0.1 only"):
            await serve_api(create_app(FakeNodeView(), TOKEN), host=host)


@pytest.mark.parametrize("port", [-1, 65536, "80", 1.5])
async def test_serve_api_refuses_a_bad_port(port):
    with pytest.raises(ConfigError):
        await serve_api(create_app(FakeNodeView(), TOKEN), port=port)


async def test_a_port_in_use_is_a_config_error(served):
    with trio.fail_after(HTTP_TIMEOUT):
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{served.port}"):
            await serve_api(create_app(FakeNodeView(), TOKEN), served.port)  # positional, as nursery.start passes it
    assert (await served.client.get("/v1/ping")).status_code == 200  # the first one is unharmed


async def test_cancelling_stops_the_server_and_closes_the_port():
    """Even with a client holding an idle keep-alive connection, and quickly:
    hypercorn's graceful shutdown runs, bounded by the shield's deadline."""
    view = FakeNodeView()
    async with httpx.AsyncClient(headers=auth(), timeout=HTTP_TIMEOUT, trust_env=False) as client:
        with trio.fail_after(HTTP_TIMEOUT):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_api, create_app(view, TOKEN))
                response = await client.get(f"http://127.0.0.1:{port}/v1/status")
                assert response.status_code == 200
                nursery.cancel_scope.cancel()
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/v1/status")
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_a_request_in_flight_is_finished_when_the_server_stops(monkeypatch):
    monkeypatch.setattr(api_module, "SHUTDOWN_GRACE_S", HTTP_TIMEOUT)  # generous for a loaded machine
    view = FakeNodeView()
    view.send_gate = trio.Event()
    answers: list[httpx.Response] = []
    async with httpx.AsyncClient(headers=auth(), timeout=HTTP_TIMEOUT, trust_env=False) as client:
        with trio.fail_after(HTTP_TIMEOUT * 2):
            async with trio.open_nursery() as clients:
                async with trio.open_nursery() as server:
                    port = await server.start(serve_api, create_app(view, TOKEN))

                    async def send() -> None:
                        url = f"http://127.0.0.1:{port}/v1/send"
                        answers.append(await client.post(url, json={"to": BOB, "amount": 1}))

                    clients.start_soon(send)
                    assert view.send_entered is not None
                    await view.send_entered.wait()
                    server.cancel_scope.cancel()
                    view.send_gate.set()
    assert [answer.status_code for answer in answers] == [200]


async def test_a_request_that_outlasts_the_grace_period_is_cut_off(monkeypatch):
    monkeypatch.setattr(api_module, "SHUTDOWN_GRACE_S", 0.1)
    view = FakeNodeView()
    view.send_gate = trio.Event()  # never set: the send hangs
    failures: list[BaseException] = []
    async with httpx.AsyncClient(headers=auth(), timeout=HTTP_TIMEOUT, trust_env=False) as client:
        with trio.fail_after(HTTP_TIMEOUT):
            async with trio.open_nursery() as clients:
                async with trio.open_nursery() as server:
                    port = await server.start(serve_api, create_app(view, TOKEN))

                    async def send() -> None:
                        try:
                            await client.post(f"http://127.0.0.1:{port}/v1/send", json={"to": BOB, "amount": 1})
                        except httpx.HTTPError as exc:
                            failures.append(exc)

                    clients.start_soon(send)
                    assert view.send_entered is not None
                    await view.send_entered.wait()
                    server.cancel_scope.cancel()
    assert len(failures) == 1 and isinstance(failures[0], httpx.RemoteProtocolError)


async def test_serve_api_reports_the_port_it_bound():
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_api, create_app(FakeNodeView(), TOKEN))
        assert isinstance(port, int) and 0 < port < 65536
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- routes


async def test_ping(served):
    response = await served.client.get("/v1/ping")
    assert response.status_code == 200
    assert response.json() == {"ok": True}
    assert served.view.calls == []  # ping never bothers the node


async def test_status(served):
    response = await served.client.get("/v1/status")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == FakeNodeView().status()
    assert "server" not in response.headers  # no software banner


async def test_peers(served):
    response = await served.client.get("/v1/peers")
    assert response.json() == {"peers": FakeNodeView().peers()}


async def test_offers_unfiltered_and_by_model(served):
    everything = (await served.client.get("/v1/offers")).json()
    assert [o["provider"] for o in everything["offers"]] == [BOB, CAROL]
    only = (await served.client.get("/v1/offers", params={"model": "llama3.2:3b"})).json()
    assert [o["provider"] for o in only["offers"]] == [BOB]
    empty = (await served.client.get("/v1/offers?model=")).json()
    assert len(empty["offers"]) == 2  # an empty filter is no filter
    assert served.view.calls == [("offers", None), ("offers", "llama3.2:3b"), ("offers", None)]


async def test_a_repeated_query_parameter_is_refused(served):
    response = await served.client.get("/v1/offers?model=a&model=b")
    assert "given 2 times" in assert_error(response, 422, "MalformedInput")


async def test_wallet_of_this_node_and_of_another_account(served):
    own = (await served.client.get("/v1/wallet")).json()
    assert own["account"] == ALICE
    assert own["spendable"] == 12_500_000
    assert [item["direction"] for item in own["history"]] == ["out", "in"]
    other = (await served.client.get("/v1/wallet", params={"account": BOB})).json()
    assert other["account"] == BOB and other["balance"] == 0
    assert served.view.calls == [("wallet", None), ("wallet", BOB)]


async def test_wallet_refuses_an_account_that_is_not_a_peer_id(served):
    response = await served.client.get("/v1/wallet", params={"account": "12D3KooWnotreally"})
    assert "account" in assert_error(response, 422, "MalformedInput")
    assert served.view.calls == []


async def test_send_with_base_units(served):
    response = await served.client.post("/v1/send", json={"to": BOB, "amount": 2_000_000, "memo": "lunch"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["amount"] == 2_000_000 and body["to"] == BOB and len(body["entry_id"]) == 64
    assert served.view.calls == [("send", BOB, 2_000_000, "lunch")]
    assert served.view.balance == 10_500_000


async def test_send_with_coins_and_no_memo(served):
    response = await served.client.post("/v1/send", json={"to": BOB, "coins": "2.5"})
    assert response.status_code == 200, response.text
    assert served.view.calls == [("send", BOB, 2_500_000, "")]


async def test_insufficient_funds_is_a_conflict_with_the_views_message(served):
    response = await served.client.post("/v1/send", json={"to": BOB, "coins": "100"})
    message = assert_error(response, 409, "InsufficientFunds")
    assert message == "sending 100 coins needs more than the 12.5 spendable"
    assert served.view.balance == 12_500_000


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InsufficientFunds("short"), 409),
        (LedgerRuleViolation("late claim"), 409),
        (MalformedInput("memo too long"), 422),
        (ConfigError("not the faucet"), 400),
        (P2PGPUError("plain"), 400),
    ],
)
async def test_error_mapping(served, error, status):
    served.view.fail_next = error
    response = await served.client.post("/v1/send", json={"to": BOB, "amount": 1})
    assert assert_error(response, status, type(error).__name__) == str(error)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"amount": 1}, '"to"'),
        ({"to": None, "amount": 1}, '"to"'),
        ({"to": "bob", "amount": 1}, "peer id"),
        ({"to": BOB}, "exactly one"),
        ({"to": BOB, "amount": 1, "coins": "1"}, "exactly one"),
        ({"to": BOB, "amount": 1.0}, "integer"),
        ({"to": BOB, "amount": True}, "integer"),
        ({"to": BOB, "amount": "1"}, "integer"),
        ({"to": BOB, "amount": 0}, "more than zero"),
        ({"to": BOB, "amount": -5}, "more than zero"),
        ({"to": BOB, "coins": "0"}, "more than zero"),
        ({"to": BOB, "coins": "1.0000001"}, "decimal places"),
        ({"to": BOB, "coins": "1e3"}, "not a coin amount"),
        ({"to": BOB, "coins": 5}, "must be text"),
        ({"to": BOB, "amount": 1, "memo": 7}, '"memo"'),
        ({"to": BOB, "amount": 1, "ammount": 1}, "unknown field"),
    ],
)
async def test_send_refuses_malformed_requests(served, body, fragment):
    response = await served.client.post("/v1/send", json=body)
    assert fragment in assert_error(response, 422, "MalformedInput")
    assert served.view.calls == []


async def test_faucet_on_a_node_without_the_faucet_key(served):
    response = await served.client.post("/v1/faucet", json={"to": ALICE, "coins": "5"})
    assert "faucet key" in assert_error(response, 409, "LedgerRuleViolation")


async def test_faucet_on_the_faucet_node(served):
    served.view.is_faucet = True
    response = await served.client.post("/v1/faucet", json={"to": ALICE, "amount": 5_000_000})
    assert response.status_code == 200, response.text
    assert response.json()["to"] == ALICE
    assert served.view.balance == 17_500_000
    refused = await served.client.post("/v1/faucet", json={"to": ALICE, "amount": 5, "memo": "x"})
    assert "unknown field" in assert_error(refused, 422, "MalformedInput")


# ---------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"   ", b"\xff\xfe{}", b'{"to": "' + b"\x80" * 4 + b'"}', b"[1, 2", b"9" * 5000],
)
async def test_a_body_that_is_not_json_is_a_bad_request(served, raw):
    response = await served.client.post("/v1/send", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, "BadRequest")
    assert served.view.calls == []


@pytest.mark.parametrize("raw", [b"[]", b'"to"', b"null", b"42"])
async def test_json_that_is_not_an_object_is_malformed(served, raw):
    response = await served.client.post("/v1/send", content=raw)
    assert "JSON object" in assert_error(response, 422, "MalformedInput")


async def test_a_body_over_64_kib_is_refused(served):
    body = json.dumps({"to": BOB, "amount": 1, "memo": "x" * MAX_BODY}).encode()
    response = await served.client.post("/v1/send", content=body)
    assert str(MAX_BODY) in assert_error(response, 413, "PayloadTooLarge")
    assert served.view.calls == []


async def test_a_chunked_body_is_cut_off_at_64_kib(served):
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"to": "' + BOB.encode() + b'", "amount": 1, "memo": "'
        for _ in range(9):
            yield b"x" * 8192
        yield b'"}'

    response = await served.client.post("/v1/send", content=chunks())
    assert response.request.headers["transfer-encoding"] == "chunked"  # no Content-Length to trust
    assert_error(response, 413, "PayloadTooLarge")
    assert served.view.calls == []


async def test_a_body_of_exactly_64_kib_is_read(served):
    head = json.dumps({"to": BOB, "amount": 1, "memo": "m"}).encode()
    body = head + b" " * (MAX_BODY - len(head))
    assert len(body) == MAX_BODY
    response = await served.client.post("/v1/send", content=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "path", ["/", "/v1", "/v1/", "/v2/status", "/v1/status/", "/V1/STATUS", "/v1/status/x", "/%00", "/v1/st%61tus2"]
)
async def test_unknown_paths_are_a_json_404(served, path):
    response = await served.client.get(path)
    assert "no such route" in assert_error(response, 404, "NotFound")


async def test_a_wrong_method_is_a_json_405(served):
    response = await served.client.post("/v1/status", json={})
    assert_error(response, 405, "MethodNotAllowed")
    assert "GET" in response.headers["allow"]
    response = await served.client.get("/v1/send")
    assert_error(response, 405, "MethodNotAllowed")


async def test_an_unexpected_error_is_a_generic_500_and_the_server_keeps_serving(served, caplog):
    served.view.fail_next = RuntimeError("secret internals at 0xdeadbeef")
    with caplog.at_level(logging.ERROR, logger="p2pgpu.api"):
        response = await served.client.get("/v1/status")
    message = assert_error(response, 500, "InternalError")
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert "log" in message
    logged = [record for record in caplog.records if record.name == "p2pgpu.api"]
    assert logged and logged[0].exc_info is not None  # the traceback went to the log
    assert (await served.client.get("/v1/status")).status_code == 200


async def test_an_async_view_method_failing_is_a_500_too(served):
    served.view.fail_next = KeyError("hold")
    response = await served.client.post("/v1/send", json={"to": BOB, "amount": 1})
    assert_error(response, 500, "InternalError")
    assert (await served.client.get("/v1/ping")).status_code == 200


async def test_a_view_answer_json_cannot_hold_is_a_500(served):
    served.view.misbehave = True
    response = await served.client.get("/v1/status")
    assert_error(response, 500, "InternalError")


async def test_concurrent_requests_are_all_answered(served):
    results: list[int] = []

    async def one(path: str) -> None:
        results.append((await served.client.get(path)).status_code)

    async with trio.open_nursery() as nursery:
        for index in range(20):
            nursery.start_soon(one, ["/v1/status", "/v1/peers", "/v1/wallet", "/nope"][index % 4])
    assert sorted(results) == [200] * 15 + [404] * 5


# --------------------------------------------------------- api.addr file


def test_api_address_round_trip(tmp_path):
    data_dir = DataDir(tmp_path)
    assert read_api_address(data_dir) is None
    path = write_api_address(data_dir, 43123)
    assert path == api_address_path(data_dir) == tmp_path / "api.addr"
    assert path.read_text() == "http://127.0.0.1:43123\n"
    assert read_api_address(data_dir) == "http://127.0.0.1:43123"
    write_api_address(data_dir, 43124)  # replaced, never appended to
    assert read_api_address(data_dir) == "http://127.0.0.1:43124"
    assert [p.name for p in tmp_path.iterdir()] == ["api.addr"]  # no temp file left
    assert remove_api_address(data_dir) is True
    assert read_api_address(data_dir) is None
    assert remove_api_address(data_dir) is False


def test_remove_api_address_leaves_another_nodes_address(tmp_path):
    data_dir = DataDir(tmp_path)
    write_api_address(data_dir, 5000)
    assert remove_api_address(data_dir, 5001) is False
    assert read_api_address(data_dir) == "http://127.0.0.1:5000"
    assert remove_api_address(data_dir, 5000) is True


@pytest.mark.parametrize(
    "content",
    [
        "http://10.0.0.1:5000\n",  # the token must never be sent off this host
        "http://localhost:5000\n",
        "https://127.0.0.1:5000\n",
        "http://127.0.0.1:0\n",
        "http://127.0.0.1:70000\n",
        "http://127.0.0.1:5000/evil\n",
        "http://127.0.0.1@evil.example:5000\n",
        "",
        "x" * 1000,
    ],
)
def test_read_api_address_refuses_anything_but_loopback(tmp_path, content):
    (tmp_path / "api.addr").write_text(content)
    with pytest.raises(ConfigError, match="api.addr"):
        read_api_address(DataDir(tmp_path))


@pytest.mark.parametrize("port", [0, -1, 65536, "80"])
def test_write_api_address_refuses_a_bad_port(tmp_path, port):
    with pytest.raises(ConfigError):
        write_api_address(DataDir(tmp_path), port)


def test_the_fake_fits_the_protocol():
    assert _check_protocol(FakeNodeView()) is not None

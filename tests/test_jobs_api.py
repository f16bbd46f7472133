"""``/v1/jobs`` over real HTTP, ``ApiClient.jobs/job/cancel_job`` and the
``p2pgpu jobs`` / ``p2pgpu job show|cancel`` commands, against a fake view
(``JobsView``) that keeps a few job records with the core's own helpers.
The real node behind the same routes is in tests/test_jobs_node.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
import trio
from p2pgpu.testing.fake_view import ALICE, BOB, CAROL, FakeNodeView
from test_api import assert_error, auth
from test_cli_api import Node, running_node
from test_submit_api import serving

from p2pgpu.api import NodeView
from p2pgpu.api_client import ApiClient
from p2pgpu.core.identity import public_key_from_peer_id
from p2pgpu.core.jobrecords import (
    CANCELLED,
    COMPLETED,
    CONSUMER,
    PROVIDER,
    QUEUED,
    RUNNING,
    Attempt,
    JobRecord,
    advance,
    check_cancellable,
    job_info,
    match_job,
    parse_job_ref,
)
from p2pgpu.errors import AmbiguousJobId, JobStateConflict, MalformedInput, UnknownJob
from p2pgpu.testing.ledger import START_MS

NOW = START_MS + 3_725_000
DONE_ID = bytes.fromhex("c0ffee00" + "11" * 12)
SERVING_ID = bytes.fromhex("beef0000" + "22" * 12)
WAITING_ID = bytes.fromhex("c0ffee01" + "33" * 12)
A, B, C = (public_key_from_peer_id(p) for p in (ALICE, BOB, CAROL))


def records() -> list[JobRecord]:
    done = JobRecord(DONE_ID, CONSUMER, QUEUED, "llama3.2:3b", A, None, START_MS)
    done = advance(done, RUNNING, START_MS + 40, provider=B, attempts=[Attempt(C, START_MS + 10, "busy"),
                                                                         Attempt(B, START_MS + 40)])
    done = advance(done, COMPLETED, START_MS + 2_000, tokens_in=7, tokens_out=3, cost=250_000, hold_id=b"\xab" * 32,
                   release="released", attempts=[Attempt(C, START_MS + 10, "busy"),
                                                 Attempt(B, START_MS + 40, "completed", b"\xab" * 32, "released")],
                   text_chars=18)
    done = replace(done, first_token_ms=START_MS + 500)
    serving = JobRecord(SERVING_ID, PROVIDER, RUNNING, "qwen2.5:7b", C, A, START_MS + 60_000,
                        started_ms=START_MS + 60_000, tokens_out=12, cost=40)
    waiting = JobRecord(WAITING_ID, CONSUMER, QUEUED, "llama3.2:3b", A, None, START_MS + 120_000)
    return [done, serving, waiting]


class JobsView(FakeNodeView):
    """``FakeNodeView`` plus three jobs: a finished consumer job, one we
    serve, and one waiting for a slot."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.records = {r.job_id: r for r in records()}
        self.texts = {DONE_ID: "Hello, world\x1b[2J!!"}

    def _find(self, ref: str) -> JobRecord:
        return self.records[match_job(self.records, parse_job_ref(ref))]

    def jobs(self, role: str | None, limit: int) -> list[dict[str, Any]]:
        self._enter("jobs", role, limit)
        newest = sorted(self.records.values(), key=lambda r: r.created_ms, reverse=True)
        return [job_info(r, NOW) for r in newest if role is None or r.role == role][:limit]

    def job(self, job_id: str) -> dict[str, Any]:
        self._enter("job", job_id)
        record = self._find(job_id)
        return {**job_info(record, NOW), "text": self.texts.get(record.job_id, ""), "text_cut": False}

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        self._enter("cancel_job", job_id)
        await trio.lowlevel.checkpoint()
        record = self._find(job_id)
        check_cancellable(record)
        record = advance(record, CANCELLED, NOW, reason="cancelled by the user")
        self.records[record.job_id] = record
        return job_info(record, NOW)


def _check_protocol(view: JobsView) -> NodeView:
    return view  # the type checker confirms the fake fits the seam


@pytest.fixture
async def served() -> AsyncIterator[tuple[JobsView, httpx.AsyncClient, httpx.AsyncClient]]:
    view = JobsView()
    async with serving(view) as (client, bare):
        yield view, client, bare


EXPECTED = JobsView(on_trio_thread=False)


# ------------------------------------------------------------------ the API


async def test_list_newest_first_by_role_and_limit(served):
    view, client, _ = served
    everything = (await client.get("/v1/jobs")).json()
    assert [j["id"] for j in everything["jobs"]] == [WAITING_ID.hex(), SERVING_ID.hex(), DONE_ID.hex()]
    assert everything == {"jobs": EXPECTED.jobs(None, 100)}
    only = (await client.get("/v1/jobs", params={"role": "provider"})).json()["jobs"]
    assert [j["id"] for j in only] == [SERVING_ID.hex()] and only[0]["peer"] == CAROL
    one = (await client.get("/v1/jobs?role=consumer&limit=1")).json()["jobs"]
    assert [j["id"] for j in one] == [WAITING_ID.hex()]
    assert view.calls == [("jobs", None, 100), ("jobs", "provider", 100), ("jobs", "consumer", 1)]


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("role=auditor", "role"),
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("limit=%C2%B2", "limit"),  # a superscript two is a digit to str.isdigit, not a number
        ("role=consumer&role=provider", "given 2 times"),
        # a node has only its own jobs: there is no way to ask for anyone else's
        (f"account={BOB}", "unknown query parameter"),
        (f"peer={BOB}", "unknown query parameter"),
        (f"consumer={BOB}", "unknown query parameter"),
    ],
)
async def test_bad_list_queries_are_refused(served, query, fragment):
    view, client, _ = served
    assert fragment in assert_error(await client.get(f"/v1/jobs?{query}"), 422, "MalformedInput")
    assert view.calls == []


async def test_show_by_id_and_by_prefix(served):
    view, client, _ = served
    whole = await client.get(f"/v1/jobs/{DONE_ID.hex()}")
    assert whole.status_code == 200
    assert whole.json() == EXPECTED.job(DONE_ID.hex())
    body = whole.json()
    assert body["text"] == "Hello, world\x1b[2J!!" and body["status"] == COMPLETED and body["provider"] == BOB
    assert [a["outcome"] for a in body["attempts"]] == ["busy", "completed"]
    assert (await client.get("/v1/jobs/BEEF")).json()["id"] == SERVING_ID.hex()  # any case, 4 digits
    assert view.calls == [("job", DONE_ID.hex()), ("job", "beef")]


@pytest.mark.parametrize("ref", ["xyz1", "abc", "a" * 33, "c0ffee%20", "%2e%2e"])
async def test_bad_ids_are_malformed(served, ref):
    view, client, _ = served
    response = await client.get(f"/v1/jobs/{ref}")
    if response.status_code == 404:  # a path the router does not even match
        assert_error(response, 404, "NotFound")
    else:
        assert "not a job id" in assert_error(response, 422, "MalformedInput")
    assert view.calls == []


async def test_unknown_and_ambiguous_ids(served):
    _, client, _ = served
    assert "no job" in assert_error(await client.get("/v1/jobs/ffff"), 404, "UnknownJob")
    assert "no job" in assert_error(await client.get(f"/v1/jobs/{'ff' * 16}"), 404, "UnknownJob")
    assert "2 job ids" in assert_error(await client.get("/v1/jobs/c0ffee"), 422, "AmbiguousJobId")
    assert_error(await client.post("/v1/jobs/ffff/cancel"), 404, "UnknownJob")


async def test_cancel_a_waiting_job_then_again(served):
    view, client, _ = served
    response = await client.post(f"/v1/jobs/{WAITING_ID.hex()[:8]}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == CANCELLED and response.json()["id"] == WAITING_ID.hex()
    again = await client.post(f"/v1/jobs/{WAITING_ID.hex()[:8]}/cancel", json={})
    assert "already ended" in assert_error(again, 409, "JobStateConflict")


async def test_cancel_a_finished_job_is_a_conflict(served):
    view, client, _ = served
    assert "already ended (completed)" in assert_error(await client.post("/v1/jobs/c0ffee00/cancel"), 409,
                                                      "JobStateConflict")
    assert view.records[DONE_ID].status == COMPLETED


async def test_cancel_takes_no_fields_and_only_post(served):
    view, client, _ = served
    response = await client.post("/v1/jobs/beef/cancel", json={"force": True})
    assert "no fields" in assert_error(response, 422, "MalformedInput")
    assert_error(await client.get("/v1/jobs/beef/cancel"), 405, "MethodNotAllowed")
    assert_error(await client.delete("/v1/jobs/beef"), 405, "MethodNotAllowed")
    assert view.records[SERVING_ID].status == RUNNING


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/jobs"), ("GET", "/v1/jobs/beef"),
                                              ("POST", "/v1/jobs/beef/cancel")])
async def test_the_job_routes_need_the_token(served, method, path):
    view, _, bare = served
    assert_error(await bare.request(method, path), 401, "Unauthorized")
    wrong = await bare.request(method, path, headers=auth("0" * 64))
    assert_error(wrong, 401, "Unauthorized")
    assert view.calls == []


# ------------------------------------------------------- client and the CLI


@pytest.fixture
def node(tmp_path) -> Iterator[Node]:
    with running_node(tmp_path, JobsView()) as running:
        yield running


def test_the_client(node):
    with ApiClient.from_data_dir(node.data_dir) as client:
        assert client.jobs() == EXPECTED.jobs(None, 100)
        assert [j["id"] for j in client.jobs("provider", 5)] == [SERVING_ID.hex()]
        assert client.job("beef")["id"] == SERVING_ID.hex()
        with pytest.raises(UnknownJob):
            client.job("ffff")
        with pytest.raises(AmbiguousJobId):
            client.job("c0ffee")
        with pytest.raises(MalformedInput):
            client.job("../status")  # refused before any request: no path tricks
        with pytest.raises(MalformedInput):
            client.cancel_job("beef?x=1")
        assert client.cancel_job("beef")["status"] == CANCELLED
        with pytest.raises(JobStateConflict):
            client.cancel_job("beef")
    assert ("jobs", "provider", 5) in node.view.calls


def test_cli_jobs_table(node):
    out = node("jobs").stdout
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "ROLE", "STATUS", "MODEL", "PEER", "TOKENS", "COST", "AGE"]
    assert [line.split()[0] for line in lines[1:]] == [WAITING_ID.hex()[:12], SERVING_ID.hex()[:12], DONE_ID.hex()[:12]]
    done = lines[3].split()
    assert done[1:4] == ["consumer", "completed", "llama3.2:3b"]
    assert done[4] == "..." + BOB[-12:] and done[5] == "7/3" and done[6] == "0.25" and done[7:] == ["1h", "2m"]
    serving = lines[2].split()
    assert serving[1:3] == ["provider", "running"] and serving[4] == "..." + CAROL[-12:] and serving[5] == "-/12"
    assert lines[1].split()[4] == "-"  # waiting: no provider yet
    assert node.json("jobs") == {"jobs": EXPECTED.jobs(None, 50)}
    assert [j["id"] for j in node.json("jobs", "--role", "provider")["jobs"]] == [SERVING_ID.hex()]
    node("jobs", "--role", "consumer", "--limit", "2")
    assert node.view.calls[-1] == ("jobs", "consumer", 2)
    node.fails("jobs", "--role", "auditor", code=2)


def test_cli_jobs_when_there_are_none(tmp_path):
    view = JobsView()
    view.records = {}
    with running_node(tmp_path, view) as node:
        assert node("jobs").stdout == "No jobs yet.\n"
        assert node("jobs", "--role", "provider").stdout == "No provider jobs yet.\n"
        assert node.json("jobs") == {"jobs": []}


def test_cli_job_show(node):
    out = node("job", "show", "c0ffee00").stdout
    for fact in (DONE_ID.hex(), "consumer", "completed", "llama3.2:3b", BOB, ALICE, "7/3 (in/out)",
                 "0.25 coins", "+0.04 s", "+0.50 s", "+2.00 s", "(released)",
                 f"1. {CAROL}: busy", f"2. {BOB}: completed"):
        assert fact in out, fact
    assert out.endswith("answer:\nHello, world\\u001b[2J!!\n")  # the escape sequence is defused
    assert node.json("job", "show", "c0ffee00") == EXPECTED.job("c0ffee00")
    assert "running" in node("job", "show", "beef").stdout


@pytest.mark.parametrize(
    ("ref", "fragment"),
    [("ffff", "no job ffff"), ("c0ffee", "2 job ids"), ("xyz1", "not a job id"), ("abc", "not a job id")],
)
def test_cli_job_show_errors(node, ref, fragment):
    assert fragment in node.fails("job", "show", ref).stderr


def test_cli_job_cancel(node):
    out = node("job", "cancel", "beef").stdout
    assert out == f"Job {SERVING_ID.hex()} is cancelled: 12 tokens delivered, cost 0.00004 coins.\n"
    assert "already ended (cancelled)" in node.fails("job", "cancel", "beef").stderr
    assert "already ended (completed)" in node.fails("job", "cancel", "c0ffee00").stderr
    data = node.json("job", "cancel", WAITING_ID.hex())
    assert data["status"] == CANCELLED and data["id"] == WAITING_ID.hex()


def test_cli_job_commands_on_a_stopped_node(tmp_path):
    stopped = Node(tmp_path, JobsView())
    for args in (("jobs",), ("job", "show", "beef"), ("job", "cancel", "beef"), ("jobs", "--json")):
        assert "not running" in stopped.fails(*args, code=3).stderr


def test_submit_says_when_a_job_waits_in_line(tmp_path):
    from test_submit_api import DONE, PROVIDER, SubmitView

    view = SubmitView()
    view.script = [{"type": "queued", "position": 3, "job_id": WAITING_ID.hex()}, PROVIDER, DONE]
    with running_node(tmp_path, view) as node:
        result = node("submit", "--model", "m", "hi")
        assert f"waiting: every provider is busy; this job ({WAITING_ID.hex()}) is number 3 in line" in result.stderr
        lines = node("submit", "--model", "m", "--json", "hi").stdout.splitlines()
    assert json.loads(lines[0]) == {"type": "queued", "position": 3, "job_id": WAITING_ID.hex()}

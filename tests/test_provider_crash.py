"""Issue 9 item 2: a provider that crashes keeps its pay.

In one process first (``p2pgpu.testing.nodes.LocalNetwork``: real hosts, real LevelDB, the
stand-in; a "crash" cancels the node without a goodbye): the voucher the
provider kept is on disk after the crash and is exactly what it claims when
it comes back; come back after the hold expired, it records the pay as lost
and the consumer's record agrees that the attempt cost nothing.

Then for real: node0 provides (a stand-in Ollama at 20 tokens/s),
node1 submits one long job, node2 only watches the ledger. Once vouchers
have flowed, node0 is killed with SIGKILL mid-stream and started again on
the same data dir. Then, with nothing but waiting on conditions:

- node0 CLAIMs the hold, after the restart, for what its last kept voucher
  covers: at least the tokens node1 received less one credit window, at
  most what node1's vouchers promised;
- node0's record of the job (failed: interrupted) costs exactly that claim,
  and so does node1's record of the attempt and of the job;
- node1 releases the rest of the hold at once: nothing stays held;
- every node ends in one ledger state and no coin is created or lost.

Every process is started by ``Devnet`` and stopped by its PID.
"""

from __future__ import annotations

import threading
import time

import pytest

import trio

from p2pgpu.api import SubmitRequest
from p2pgpu.core.genesis import LedgerParams
from p2pgpu.core.jobrecords import CONSUMER, FAILED, PROVIDER, KeptVoucher
from p2pgpu.core.jobs import Prices, job_cost
from p2pgpu.core.ledger import HOLD
from p2pgpu.jobrunner import DEFAULT_CREDIT_WINDOW
from p2pgpu.jobstore import JOBS_DIR, JobStore
from p2pgpu.node import now_ms
from p2pgpu.testing.devnet import COINS_PER_NODE, Devnet, pid_alive
from p2pgpu.testing.ollama_standin import serve_standin
from p2pgpu.testing.waiting import poll_until
from p2pgpu.testing.nodes import LocalNetwork, live, settled, tokens_seen
from p2pgpu.testing.waiting import wait_until as wait_for
from test_jobs_node import DEADLINE, _fill

MODEL = "llama3.2:1b"
LONG = 5_000  # tokens in the stand-in's replies: the jobs are cut short long before
SHORT_HOLDS = LedgerParams(max_clock_skew_ms=60_000, release_grace_ms=1_000, max_hold_ms=6_000)


async def _crash_mid_job(net: LocalNetwork, nursery, standin, tokens: int) -> tuple[bytes, object, KeptVoucher]:
    """Start a provider and a consumer, run a job until the consumer has
    ``tokens`` tokens, crash the provider; returns the job id, the hold and
    the voucher the provider had kept on disk."""
    await net.start(nursery, 0, standin.host)
    consumer = await net.start(nursery, 1)
    await wait_for(lambda: live(consumer), timeout=DEADLINE, what="the provider's offer")
    events: list[dict] = []
    nursery.start_soon(_fill, consumer, SubmitRequest(model=MODEL, prompt="tell me a story", max_tokens=400), events)
    await wait_for(lambda: tokens_seen(events) >= tokens, timeout=DEADLINE, what="tokens")
    net.crash(0)
    with trio.fail_after(DEADLINE):
        await net.ended[0].wait()
    await wait_for(lambda: events and events[-1]["type"] == "error", timeout=DEADLINE, what="the job to fail")
    job_id = bytes.fromhex(next(e["job_id"] for e in events if e["type"] == "provider"))
    hold = next(e for e in consumer.ledger.history(consumer.key.public_key) if e.kind == HOLD)
    with JobStore(net.nodes[0].data_dir.path / JOBS_DIR) as store:
        ((kept_job, raw),) = store.kept_vouchers()
    kept = KeptVoucher.from_wire(raw, net.genesis.network_id)
    assert kept_job == job_id and kept.hold_id == hold.id and kept.amount > 0
    return job_id, hold, kept


async def test_the_voucher_kept_on_disk_is_what_the_restarted_provider_claims(tmp_path):
    async with serve_standin(models=(MODEL,), tokens_per_second=40, default_length=LONG) as standin, \
            trio.open_nursery() as nursery:
        net = LocalNetwork(tmp_path, 2)
        job_id, hold, kept = await _crash_mid_job(net, nursery, standin, tokens=2 * DEFAULT_CREDIT_WINDOW)
        consumer = net.nodes[1]
        signed = consumer.job_store.get(job_id).attempts[-1].paid  # our last voucher, before the claim
        assert kept.amount <= signed
        provider = await net.start(nursery, 0, standin.host)
        await wait_for(lambda: provider.ledger.claims_of(hold.id), timeout=DEADLINE, what="the claim")
        assert list(provider.ledger.claims_of(hold.id).values()) == [kept.amount]
        await wait_for(lambda: settled([provider, consumer]), timeout=DEADLINE, what="the hold to be released")
        await wait_for(lambda: consumer.job_store.get(job_id).release == "released", timeout=DEADLINE)
        ours, theirs = consumer.job_store.get(job_id), provider.job_store.get(job_id)
        assert (ours.role, theirs.role) == (CONSUMER, PROVIDER) and theirs.status == ours.status == FAILED
        assert theirs.cost == ours.cost == ours.attempts[-1].paid == kept.amount
        assert provider.job_store.kept_vouchers() == []  # claimed: forgotten
        await net.stop_all()


async def test_a_provider_back_after_the_hold_expired_records_its_pay_as_lost(tmp_path):
    async with serve_standin(models=(MODEL,), tokens_per_second=40, default_length=LONG) as standin, \
            trio.open_nursery() as nursery:
        net = LocalNetwork(tmp_path, 2, SHORT_HOLDS)
        job_id, hold, kept = await _crash_mid_job(net, nursery, standin, tokens=DEFAULT_CREDIT_WINDOW)
        consumer = net.nodes[1]
        await wait_for(lambda: now_ms() > kept.expiry_ms, timeout=DEADLINE, what="the hold to expire")
        provider = await net.start(nursery, 0, standin.host)
        await wait_for(lambda: "pay lost" in provider.job_store.get(job_id).reason, timeout=DEADLINE)
        served = provider.job_store.get(job_id)
        assert served.status == FAILED and served.cost == 0 and "expired" in served.reason
        assert provider.job_store.kept_vouchers() == [] and not provider.ledger.claims_of(hold.id)
        # the consumer takes its hold back on time alone; the attempt cost it nothing
        await wait_for(lambda: settled([provider, consumer]), timeout=DEADLINE, what="the hold to be released")
        await wait_for(lambda: consumer.job_store.get(job_id).release == "released", timeout=DEADLINE)
        ours = consumer.job_store.get(job_id)
        assert ours.cost == 0 and ours.attempts[-1].paid == 0
        await net.stop_all()


def wait_until(condition, timeout: float, what: str):
    return poll_until(condition, timeout, poll=0.1, what=what)


class Submission(threading.Thread):
    """One job submitted through node1's API, its events recorded as they stream."""

    def __init__(self, client, prompt: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.client, self.prompt, self.max_tokens = client, prompt, max_tokens
        self.events: list[dict] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event in self.client.submit(MODEL, self.prompt, max_tokens=self.max_tokens, retry=True):
                self.events.append(event)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def tokens(self) -> int:
        return sum(1 for e in list(self.events) if e["type"] == "token")

    def first(self, kind: str) -> dict | None:
        return next((e for e in list(self.events) if e["type"] == kind), None)


@pytest.mark.slow
def test_a_provider_killed_mid_job_claims_its_kept_voucher_after_a_restart_and_both_records_agree(tmp_path):
    net = Devnet(tmp_path / "net", nodes=3, providers=1, tokens_per_second=20.0, reply_tokens=5_000,
                 heartbeat_s=0.5, offer_ttl_s=3.0, sync_interval_s=1.0)
    pids: set[int] = set()
    try:
        net.up()
        pids.update(net.pids())
        provider, consumer, watcher = net.nodes
        client = consumer.client()
        wait_until(lambda: client.offers(MODEL), 60, "the provider's offer at the consumer")

        job = Submission(client, "tell me a very long story about GPUs", max_tokens=2_000)
        job.start()
        # well past a few vouchers (one every 16 tokens) and a whole window
        wait_until(lambda: job.tokens() >= 5 * DEFAULT_CREDIT_WINDOW // 2 or job.error, 120,
                   "tokens to stream from the provider")
        assert job.error is None, job.error
        chosen = job.first("provider")
        assert chosen is not None and chosen["provider"] == provider.peer_id
        prices = Prices(chosen["price_in"], chosen["price_out"])
        job_id = chosen["job_id"]
        killed_ms = int(time.time() * 1000)
        net.kill(provider.name)  # SIGKILL, by PID

        job.join(120)
        assert not job.is_alive(), "the job never ended after its only provider died"
        assert job.events and job.events[-1]["type"] == "error"  # nobody else serves the model

        net.restart(provider.name)
        pids.update(net.pids())
        restarted = provider.client()

        def claim_line() -> dict | None:
            claims = [line for line in restarted.wallet()["history"] if line["kind"] == "claim"]
            assert len(claims) <= 1, claims
            return claims[0] if claims else None

        claim = wait_until(claim_line, 60, "the restarted provider to claim its kept voucher")
        assert claim["timestamp_ms"] > killed_ms  # made after the restart, from the voucher on disk
        claimed = claim["amount"]

        # the consumer releases the rest of the hold once the claim reaches it
        wait_until(lambda: client.wallet()["held"] == 0, 60, "the consumer's hold to be released")
        record = wait_until(lambda: (r := client.job(job_id))["attempts"][0]["release"] == "released" and r,
                            30, "the consumer's record to see the release")
        (attempt,) = record["attempts"]
        received = record["tokens_out"]
        assert received >= 5 * DEFAULT_CREDIT_WINDOW // 2
        # the provider served at most one window past its kept voucher, and
        # the consumer never promised more than it received
        assert job_cost(prices, 0, received - DEFAULT_CREDIT_WINDOW) <= claimed <= job_cost(prices, 0, received)
        assert claimed > 0
        assert attempt["paid"] == claimed and record["cost"] == claimed and record["status"] == "failed"

        served = wait_until(lambda: (r := restarted.job(job_id))["cost"] == claimed and r, 30,
                            "the provider's record to show the claim")
        assert served["role"] == "provider" and served["status"] == "failed" and "interrupted" in served["reason"]

        # one ledger state everywhere; every coin still there
        clients = [restarted, client, watcher.client()]

        def converged() -> list[dict] | None:
            statuses = [c.status() for c in clients]
            return statuses if len({s["state_hash"] for s in statuses}) == 1 else None

        statuses = wait_until(converged, 60, "every node to hold one ledger state")
        assert sum(s["balance"] + s["held"] + s["pending_in"] for s in statuses) == 3 * COINS_PER_NODE * 1_000_000
        assert statuses[1]["held"] == 0
        assert statuses[0]["balance"] == COINS_PER_NODE * 1_000_000 + claimed
        assert statuses[1]["balance"] == COINS_PER_NODE * 1_000_000 - claimed
    finally:
        pids.update(net.pids())
        net.down()
    assert not [pid for pid in pids if pid_alive(pid)], "processes left behind"

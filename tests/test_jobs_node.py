"""Jobs through real nodes (issue #4): the job store on both sides, cancel
from either side, waiting in line for busy providers, and holds released
after the fact. Real libp2p hosts on 127.0.0.1, real LevelDB in tmp_path,
the Ollama stand-in; one trio process. Every wait is on a condition with a
generous deadline; every node is stopped (or crashed on purpose) and every
stand-in closed before a test returns.
"""

from __future__ import annotations

import trio

from p2pgpu.api import SubmitRequest
from p2pgpu.core.genesis import LedgerParams
from p2pgpu.core.jobrecords import CANCELLED, COMPLETED, CONSUMER, FAILED, PROVIDER
from p2pgpu.core.jobs import Prices, job_cost
from p2pgpu.core.ledger import BASIS_TIMEOUT, HOLD
from p2pgpu.node import Node
from p2pgpu.testing.ollama_standin import serve_standin
from p2pgpu.testing.nodes import LocalNetwork, collect, live, settled, tokens_seen
from p2pgpu.testing.waiting import wait_until as wait_for

MODEL = "llama3.2:1b"
DEADLINE = 60.0  # seconds: for a loaded two-core machine


def balance(node: Node, of: Node) -> int:
    return node.ledger.account(of.key.public_key).balance


# ------------------------------------------------------------------ cancel


async def test_cancel_stops_both_sides_and_pays_only_for_what_was_sent(tmp_path):
    async with serve_standin(models=(MODEL,), tokens_per_second=20) as standin, trio.open_nursery() as nursery:
        net = LocalNetwork(tmp_path, 2)
        provider = await net.start(nursery, 0, standin.host)
        consumer = await net.start(nursery, 1)
        await wait_for(lambda: live(consumer), timeout=DEADLINE, what="the provider's offer")
        before = {n.key.peer_id: balance(consumer, n) for n in net.nodes}
        prices = Prices(provider.config.price_in, provider.config.price_out)
        request = SubmitRequest(model=MODEL, prompt="tell me a long story", max_tokens=200)

        # --- the consumer cancels (what `p2pgpu job cancel` does) after a few tokens
        events: list[dict] = []
        waiting: list[dict] = []
        async with trio.open_nursery() as jobs:
            jobs.start_soon(_fill, consumer, request, events)
            await wait_for(lambda: tokens_seen(events) >= 3, timeout=DEADLINE, what="three tokens")
            job_id = next(e["job_id"] for e in events if e["type"] == "provider")
            # `p2pgpu jobs` shows a running job's tokens as they stream, on both sides
            for node in (consumer, provider):
                await wait_for(lambda: (j := node.jobs(None, 1)[0])["status"] == "running" and j["tokens_out"] >= 3,
                               timeout=DEADLINE, what="live progress in the job list")
            assert consumer.job(job_id)["tokens_out"] >= 3
            # a second job waits for the one slot; cancelled there, it costs nothing
            jobs.start_soon(_fill, consumer, SubmitRequest(model=MODEL, prompt="another", max_tokens=4), waiting)
            await wait_for(lambda: waiting, timeout=DEADLINE, what="the second job's first event")
            assert waiting[0]["type"] == "queued" and waiting[0]["position"] == 1
            queued_info = await consumer.cancel_job(waiting[0]["job_id"])
            assert queued_info["status"] == CANCELLED and queued_info["cost"] == 0 and queued_info["attempts"] == []
            info = await consumer.cancel_job(job_id[:8])  # a prefix is enough
        assert waiting[-1]["kind"] == "Cancelled"
        assert info["status"] == CANCELLED and info["id"] == job_id and info["role"] == CONSUMER
        assert events[-1] == {"type": "error", "error": "the job was cancelled", "kind": "Cancelled"}
        assert not any(e["type"] == "retry" for e in events)  # cancelled is not failed: no failover

        ours = consumer.job_store.get(bytes.fromhex(job_id))
        await wait_for(lambda: provider.job_store.get(bytes.fromhex(job_id)) is not None
                       and provider.job_store.get(bytes.fromhex(job_id)).final, timeout=DEADLINE,
                       what="the provider's record to end")
        theirs = provider.job_store.get(bytes.fromhex(job_id))
        assert theirs.role == PROVIDER and theirs.status == CANCELLED and theirs.consumer == consumer.key.public_key
        assert provider.provider_service.active == 0 and not provider.provider_service.live
        # it stopped early; both sides count the same tokens and the same price for them
        assert tokens_seen(events) <= ours.tokens_out == theirs.tokens_out < 200
        assert ours.cost == theirs.cost == job_cost(prices, ours.tokens_in or 0, ours.tokens_out) > 0
        assert ours.text_chars > 0 and consumer.job(job_id[:6])["text"]

        # --- the provider's operator cancels the next one: the consumer pays for
        # what it got; with no other provider, its job ends there
        events = []
        async with trio.open_nursery() as jobs:
            jobs.start_soon(_fill, consumer, request, events)
            await wait_for(lambda: tokens_seen(events) >= 3, timeout=DEADLINE, what="three tokens")
            second = next(e["job_id"] for e in events if e["type"] == "provider")
            await wait_for(lambda: provider.job_store.get(bytes.fromhex(second)) is not None,
                           timeout=DEADLINE, what="the provider's record")
            info = await provider.cancel_job(second)
        assert info["status"] == CANCELLED and info["role"] == PROVIDER
        assert events[-1]["type"] == "error" and "did not complete" in events[-1]["error"]
        await wait_for(lambda: consumer.job_store.get(bytes.fromhex(second)).final, timeout=DEADLINE)
        ours2 = consumer.job_store.get(bytes.fromhex(second))
        theirs2 = provider.job_store.get(bytes.fromhex(second))
        assert ours2.status == FAILED and "cancelled by the provider" in ours2.reason
        assert ours2.cost == theirs2.cost == job_cost(prices, 0, theirs2.tokens_out)

        # cancelling what has ended is a clear error, on both sides
        for node, ref in ((consumer, job_id), (provider, job_id), (consumer, second)):
            try:
                await node.cancel_job(ref)
            except Exception as exc:  # noqa: BLE001 - checked below
                assert type(exc).__name__ == "JobStateConflict" and "already ended" in str(exc)
            else:
                raise AssertionError("cancelling a finished job must fail")

        # the coins moved by exactly those two costs, on every ledger
        await wait_for(lambda: settled(net.nodes), timeout=DEADLINE, what="the ledgers to settle")
        for node in net.nodes:
            paid = before[consumer.key.peer_id] - balance(node, consumer)
            earned = balance(node, provider) - before[provider.key.peer_id]
            assert paid == earned == ours.cost + ours2.cost
            total, minted = node.ledger.conservation()
            assert total == minted
        await net.stop_all()


async def _fill(node: Node, request: SubmitRequest, events: list[dict]) -> None:
    async for event in node.submit(request):
        events.append(event)


# ------------------------------------------------------------------ waiting


async def test_eight_jobs_over_two_one_slot_providers_all_complete_and_each_is_paid_once(tmp_path):
    async with serve_standin(models=(MODEL,), tokens_per_second=200) as standin, trio.open_nursery() as nursery:
        net = LocalNetwork(tmp_path, 3)
        providers = [await net.start(nursery, 0, standin.host), await net.start(nursery, 1, standin.host)]
        consumer = await net.start(nursery, 2)
        await wait_for(lambda: len(live(consumer)) == 2, timeout=DEADLINE, what="both offers")
        before = {n.key.peer_id: balance(consumer, n) for n in net.nodes}

        results: dict[int, list[dict]] = {}

        async def one(i: int) -> None:
            results[i] = await collect(consumer, SubmitRequest(model=MODEL, prompt=f"job number {i}", max_tokens=16))

        with trio.fail_after(DEADLINE * 2):
            async with trio.open_nursery() as jobs:
                for i in range(8):
                    jobs.start_soon(one, i)

        finals = [events[-1] for events in results.values()]
        assert all(f["type"] == "done" for f in finals), finals
        assert all(f["tokens"] == 16 for f in finals)
        assert len({f["job_id"] for f in finals}) == 8
        retries = [e for events in results.values() for e in events if e["type"] == "retry"]
        assert not retries, retries
        queued = [e for events in results.values() for e in events if e["type"] == "queued"]
        assert queued and all(e["position"] >= 1 for e in queued)  # two at once; the rest waited in line
        for events in results.values():
            assert sum(1 for e in events if e["type"] == "queued") <= 1  # said once per job

        # every job is in the consumer's store, and in the store of the provider that served it
        def served_everywhere() -> bool:
            for final in finals:
                server = next(p for p in providers if p.key.peer_id == final["provider"])
                record = server.job_store.get(bytes.fromhex(final["job_id"]))
                if record is None or not record.final:
                    return False
            return True

        await wait_for(served_everywhere, timeout=DEADLINE, what="the providers' records to end")
        for final in finals:
            job_id = bytes.fromhex(final["job_id"])
            ours = consumer.job_store.get(job_id)
            assert ours.status == COMPLETED and ours.cost == final["cost"] and ours.tokens_out == 16
            server = next(p for p in providers if p.key.peer_id == final["provider"])
            theirs = server.job_store.get(job_id)
            assert theirs.status == COMPLETED and theirs.cost == final["cost"], (theirs, final)
            other = next(p for p in providers if p is not server)
            assert other.job_store.get(job_id) is None or other.job_store.get(job_id).status != COMPLETED

        # nobody was paid twice: what the consumer lost is what the providers gained
        await wait_for(lambda: settled(net.nodes), timeout=DEADLINE, what="the ledgers to settle")
        total_cost = sum(f["cost"] for f in finals)
        for node in net.nodes:
            assert before[consumer.key.peer_id] - balance(node, consumer) == total_cost
            assert sum(balance(node, p) - before[p.key.peer_id] for p in providers) == total_cost
            for p in providers:
                earned = sum(f["cost"] for f in finals if f["provider"] == p.key.peer_id)
                assert balance(node, p) - before[p.key.peer_id] == earned
            total, minted = node.ledger.conservation()
            assert total == minted

        # a node lists only its own jobs; and they are still listed after a restart
        assert {j["role"] for j in providers[0].jobs(None, 100)} <= {PROVIDER}
        assert {j["id"] for j in providers[0].jobs(None, 100)}.isdisjoint(
            {j["id"] for j in providers[1].jobs(None, 100) if j["status"] == COMPLETED})
        listed = consumer.jobs(CONSUMER, 100)
        assert len(listed) == 8 and consumer.jobs(PROVIDER, 100) == []
        await net.stop(2)
        again = await net.start(nursery, 2)
        relisted = again.jobs(None, 100)
        assert [j["id"] for j in relisted] == [j["id"] for j in listed]
        assert {j["status"] for j in relisted} == {COMPLETED}
        assert again.job(finals[0]["job_id"][:10])["text"]
        await net.stop_all()


async def test_a_job_that_finds_no_free_slot_in_time_says_so(tmp_path):
    async with serve_standin(models=(MODEL,), tokens_per_second=10) as standin, trio.open_nursery() as nursery:
        net = LocalNetwork(tmp_path, 2, queue_timeout_s=1.0)
        await net.start(nursery, 0, standin.host)
        consumer = await net.start(nursery, 1)
        await wait_for(lambda: live(consumer), timeout=DEADLINE, what="the provider's offer")
        long: list[dict] = []
        async with trio.open_nursery() as jobs:
            jobs.start_soon(_fill, consumer, SubmitRequest(model=MODEL, prompt="a long one", max_tokens=400), long)
            await wait_for(lambda: tokens_seen(long) >= 1, timeout=DEADLINE, what="the first job to run")
            events = await collect(consumer, SubmitRequest(model=MODEL, prompt="a short one", max_tokens=4))
            assert [e["type"] for e in events] == ["queued", "error"]
            assert events[0]["position"] == 1
            assert events[-1]["kind"] == "QueueTimeout" and "free slot within 1 s" in events[-1]["error"]
            record = consumer.job_store.get(bytes.fromhex(events[0]["job_id"]))
            assert record.status == FAILED and record.attempts == () and record.cost == 0
            assert "free slot within 1 s" in record.reason
            await consumer.cancel_job(next(e["job_id"] for e in long if e["type"] == "provider"))
        await net.stop_all()


# ------------------------------------------------------------------ holds

SHORT_HOLDS = LedgerParams(max_clock_skew_ms=60_000, release_grace_ms=1_000, max_hold_ms=6_000)


async def test_a_hold_left_pending_by_a_vanished_provider_is_released_later(tmp_path):
    async with serve_standin(models=(MODEL,), tokens_per_second=20) as standin, trio.open_nursery() as nursery:
        net = LocalNetwork(tmp_path, 2, SHORT_HOLDS)
        await net.start(nursery, 0, standin.host)
        consumer = await net.start(nursery, 1)
        await wait_for(lambda: live(consumer), timeout=DEADLINE, what="the provider's offer")

        async def crash_after_three_tokens(event: dict) -> None:
            if event["type"] == "token" and tokens_seen(events) == 3:
                net.crash(0)

        events: list[dict] = []

        async def on_event(event: dict) -> None:
            events.append(event)
            await crash_after_three_tokens(event)

        await collect(consumer, SubmitRequest(model=MODEL, prompt="tell me a story", max_tokens=100), on_event)
        assert events[-1]["type"] == "error"
        job_id = bytes.fromhex(next(e["job_id"] for e in events if e["type"] == "provider"))
        record = consumer.job_store.get(job_id)
        hold_id = record.hold_id
        assert record.status == FAILED and hold_id is not None and record.release == "pending"
        assert consumer.ledger.account(consumer.key.public_key).held > 0
        # nobody claims it: after expiry plus the grace the node takes it back on time alone
        await wait_for(lambda: consumer.ledger.releases_of(hold_id), timeout=DEADLINE, what="the release")
        assert consumer.ledger.releases_of(hold_id)[0][1] == BASIS_TIMEOUT
        assert consumer.ledger.account(consumer.key.public_key).held == 0
        await wait_for(lambda: consumer.job_store.get(job_id).release == "released", timeout=DEADLINE)
        assert consumer.job_store.get(job_id).attempts[-1].release == "released"
        total, minted = consumer.ledger.conservation()
        assert total == minted
        await net.stop(1)


async def test_a_hold_open_when_the_consumer_crashed_is_released_after_a_restart(tmp_path):
    async with serve_standin(models=(MODEL,), tokens_per_second=20) as standin, trio.open_nursery() as nursery:
        net = LocalNetwork(tmp_path, 2, SHORT_HOLDS)
        provider = await net.start(nursery, 0, standin.host)
        consumer = await net.start(nursery, 1)
        await wait_for(lambda: live(consumer), timeout=DEADLINE, what="the provider's offer")
        events: list[dict] = []
        nursery.start_soon(_fill, consumer, SubmitRequest(model=MODEL, prompt="tell me a story", max_tokens=100),
                           events)
        await wait_for(lambda: tokens_seen(events) >= 2, timeout=DEADLINE, what="two tokens")
        job_id = bytes.fromhex(next(e["job_id"] for e in events if e["type"] == "provider"))
        hold = next(e for e in consumer.ledger.history(consumer.key.public_key) if e.kind == HOLD)
        net.crash(1)
        with trio.fail_after(DEADLINE):
            await net.ended[1].wait()
        # the provider saw its consumer vanish: its record ends, its slot is free again
        await wait_for(lambda: provider.job_store.get(job_id) is not None and provider.job_store.get(job_id).final,
                       timeout=DEADLINE)
        assert provider.provider_service.active == 0
        again = await net.start(nursery, 1)
        assert again.job_store.get(job_id).status == FAILED  # not left "running" by the crash
        await wait_for(lambda: again.ledger.releases_of(hold.id), timeout=DEADLINE, what="the release")
        assert again.ledger.account(again.key.public_key).held == 0
        await wait_for(lambda: settled([provider, again]), timeout=DEADLINE, what="the ledgers to settle")
        await net.stop_all()

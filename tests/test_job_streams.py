"""Job latency paths of ``p2pgpu.jobrunner`` over real libp2p hosts.

``JobStreamPool``: job streams opened ahead of need, taken by the next job
only while they look open and are young enough. Request context: the
REQUEST carries the consumer's recent entries, so a provider that has not
heard of them yet applies the hold at once; without them it fetches them
from the consumer; with neither it refuses the hold.

Two real hosts on 127.0.0.1 with MemoryStore ledgers and running
replicators (``test_jobrunner.pair``), the Ollama stand-in behind the
provider. Every wait is on a condition with a generous deadline; every
host, replicator, stream and stand-in is closed on exit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio

import p2pgpu.jobrunner as jobrunner
from p2pgpu.core.jobs import MAX_REQUEST_CONTEXT, SessionConfig
from p2pgpu.core.protocols import LEDGER_SYNC_PROTOCOL
from p2pgpu.jobrunner import JobResult, JobStreamPool
from p2pgpu.net import FrameStream, P2PHost
from p2pgpu.testing.ollama_standin import serve_standin
from p2pgpu.testing.waiting import wait_until
from test_jobrunner import ALLOCATION, DEADLINE, MODEL, PROMPT, Pair, _peer, now_ms, pair, provider
from test_replication import HOUR, wait_synced_on_connect

TOKENS = 8
# Nothing reaches the provider but what a job hands it: no periodic sync
# (the only sync is the one on connect) and no fetching of what a gossiped
# hold waits for.
ISOLATED = {"sync_interval_s": HOUR, "fetch_delay_s": HOUR}


@asynccontextmanager
async def stream_pool(host: P2PHost, **kw: float) -> AsyncIterator[JobStreamPool]:
    """A pool whose background opens run in a nursery of its own; the idle
    streams it still holds are reset on the way out."""
    async with trio.open_nursery() as nursery:
        pool = JobStreamPool(host, nursery, **kw)
        try:
            yield pool
        finally:
            for peer in list(pool._idle):  # noqa: SLF001
                pool._discard(pool._idle.pop(peer)[0])  # noqa: SLF001


def idle_stream(pool: JobStreamPool, peer_id: str) -> FrameStream:
    return pool._idle[peer_id][0]  # noqa: SLF001


async def completes_as_the_standin_says(p: Pair, pool: JobStreamPool | None = None) -> JobResult:
    with trio.fail_after(DEADLINE):
        result = await p.job(max_tokens=TOKENS, streams=pool)
    expected = p.standin.expected_completion(MODEL, PROMPT, num_predict=TOKENS)
    assert result.status == "completed", result.reason
    assert result.text == expected.text and result.tokens == expected.eval_count == TOKENS
    return result


async def settled(p: Pair, result: JobResult) -> None:
    """Both ledgers hold the job's release and agree."""
    await wait_until(lambda: len(p.bob.ledger.releases_of(result.hold_id)) == 1 and p.agree(), DEADLINE,
                     what="the job to settle on both ledgers")


async def refilled(p: Pair, pool: JobStreamPool, opened: int) -> None:
    """The pool holds a fresh idle stream to bob, its ``opened``-th."""
    await wait_until(lambda: len(pool) == 1 and pool.opened == opened, DEADLINE, what="the pool's refill")
    assert idle_stream(pool, p.bob.host.peer_id).looks_open()


# ------------------------------------------------------------------ JobStreamPool


async def test_the_next_job_takes_the_stream_opened_after_the_last_one() -> None:
    async with pair() as p, stream_pool(p.alice.host) as pool:
        assert pool.take(p.bob.host.peer_id) is None  # nothing yet: the first job opens its own
        first = await completes_as_the_standin_says(p, pool)
        await refilled(p, pool, opened=1)
        assert pool.taken == 0

        second = await completes_as_the_standin_says(p, pool)
        assert pool.taken == 1  # the second job came on the stream already open
        await refilled(p, pool, opened=2)
        for result in (first, second):
            await settled(p, result)
        assert p.bob.balance() == ALLOCATION + first.cost + second.cost


async def test_a_stream_whose_provider_went_away_is_not_handed_out() -> None:
    """bob's host stops with a stream of ours idle in the pool; bob comes
    back (same key, same ledger, a new host). The dead stream is dropped and
    the job opens a fresh one to the new host."""
    async with AsyncExitStack() as stack:
        standin = await stack.enter_async_context(serve_standin([MODEL]))
        nursery = await stack.enter_async_context(trio.open_nursery())
        alice = await _peer(stack, nursery, "alice")
        pool = await stack.enter_async_context(stream_pool(alice.host))
        async with AsyncExitStack() as first_life:
            bob, service = await provider(first_life, nursery, standin)
            await alice.host.connect(bob.host.listen_addrs()[0])
            p = Pair(alice, bob, service, standin)
            await completes_as_the_standin_says(p, pool)
            await refilled(p, pool, opened=1)
            stale = idle_stream(pool, bob.host.peer_id)
        await wait_until(lambda: not stale.looks_open(), DEADLINE, what="the stream to die with bob's host")

        bob, service = await provider(stack, nursery, standin, ledger=bob.ledger)
        await alice.host.connect(bob.host.listen_addrs()[0])
        p = Pair(alice, bob, service, standin)
        result = await completes_as_the_standin_says(p, pool)
        assert pool.taken == 0  # the job opened a fresh stream, to the new host
        await refilled(p, pool, opened=2)
        assert idle_stream(pool, bob.host.peer_id) is not stale
        await settled(p, result)


async def test_a_stream_older_than_max_age_is_discarded() -> None:
    max_age_s = 0.001
    async with pair() as p, stream_pool(p.alice.host, max_age_s=max_age_s) as pool:
        await completes_as_the_standin_says(p, pool)
        await refilled(p, pool, opened=1)
        refilled_by = trio.current_time()
        await wait_until(lambda: trio.current_time() - refilled_by > max_age_s, what="the idle stream to age")

        await completes_as_the_standin_says(p, pool)
        assert pool.taken == 0
        # bob saw three streams end: the first job's, the aged one (reset by
        # the pool) and the second job's; the pool holds a fourth.
        await wait_until(lambda: p.service.jobs_served == 3, DEADLINE, what="the aged stream's reset")
        await refilled(p, pool, opened=2)


async def test_an_idle_stream_the_provider_ended_is_not_handed_out() -> None:
    """A provider waits ``request_wait_ms`` for the request on a new stream,
    then ends it by itself; the pool sees that and the job opens another."""
    async with pair(config=SessionConfig(request_wait_ms=2500)) as p, stream_pool(p.alice.host) as pool:
        await completes_as_the_standin_says(p, pool)
        await refilled(p, pool, opened=1)
        idle = idle_stream(pool, p.bob.host.peer_id)
        await wait_until(lambda: p.service.jobs_served == 2, DEADLINE, what="bob to end the idle stream")
        await wait_until(lambda: not idle.looks_open(), DEADLINE, what="bob's end of the idle stream to arrive")

        await completes_as_the_standin_says(p, pool)
        assert pool.taken == 0
        await refilled(p, pool, opened=2)
        assert idle_stream(pool, p.bob.host.peer_id) is not idle


# ------------------------------------------------------------------ request context


async def isolated_pair_with_a_silent_send(stack: AsyncExitStack) -> tuple[Pair, bytes]:
    """A pair whose connection syncs are over, and a SEND on alice's ledger
    that nothing announced (made on the ledger, not through the replicator):
    alice's next hold follows an entry bob has not got."""
    p = await stack.enter_async_context(pair(rep_kw=ISOLATED))
    await wait_synced_on_connect([p.alice, p.bob])  # type: ignore[list-item]
    send = p.alice.ledger.send(p.alice.key, p.bob.key.public_key, 5, now_ms(), memo="not announced")
    p.alice.ledger.commit()
    assert not p.bob.ledger.has_entry(send.id)
    return p, send.id


def spy_on_chain_fetch(p: Pair, monkeypatch) -> list[bytes]:
    """Job ids for which bob fetched the consumer's chain."""
    fetched: list[bytes] = []
    fetch = p.service._fetch_consumer_chain  # noqa: SLF001

    async def spy(request, waiting, consumer_peer):  # type: ignore[no-untyped-def]
        fetched.append(request.job_id)
        return await fetch(request, waiting, consumer_peer)

    monkeypatch.setattr(p.service, "_fetch_consumer_chain", spy)
    return fetched


async def test_the_request_carries_the_entries_the_provider_lacks(monkeypatch) -> None:
    contexts: list[tuple[bytes, ...]] = []
    chain_context = jobrunner._chain_context  # noqa: SLF001

    def recorded(*args):  # type: ignore[no-untyped-def]
        contexts.append(chain_context(*args))
        return contexts[-1]

    monkeypatch.setattr(jobrunner, "_chain_context", recorded)
    async with AsyncExitStack() as stack:
        p, send_id = await isolated_pair_with_a_silent_send(stack)
        fetched = spy_on_chain_fetch(p, monkeypatch)
        result = await completes_as_the_standin_says(p)
        [context] = contexts
        assert p.alice.ledger.get_wire(send_id) in context
        assert fetched == [] and p.bob.rep.stats()["fetched"] == 0  # the request brought it
        assert p.bob.ledger.has_entry(send_id)
        await settled(p, result)


async def test_without_the_context_the_provider_fetches_the_chain_from_the_consumer(monkeypatch) -> None:
    monkeypatch.setattr(jobrunner, "_chain_context", lambda *args: ())
    async with AsyncExitStack() as stack:
        p, send_id = await isolated_pair_with_a_silent_send(stack)
        fetched = spy_on_chain_fetch(p, monkeypatch)
        result = await completes_as_the_standin_says(p)
        assert fetched == [result.job_id]
        assert p.bob.rep.stats()["fetched"] >= 1 and p.alice.rep.stats()["fetch_served"] >= 1
        assert p.bob.ledger.has_entry(send_id)
        await settled(p, result)


async def test_a_chain_longer_than_the_context_is_completed_by_a_fetch(monkeypatch) -> None:
    """More unannounced entries than a request carries: the hold waits behind
    the oldest ones, which bob fetches from alice."""
    async with AsyncExitStack() as stack:
        p, send_id = await isolated_pair_with_a_silent_send(stack)
        silent = [send_id] + [p.alice.ledger.send(p.alice.key, p.bob.key.public_key, 1, now_ms()).id
                              for _ in range(MAX_REQUEST_CONTEXT + 2)]
        p.alice.ledger.commit()
        fetched = spy_on_chain_fetch(p, monkeypatch)
        result = await completes_as_the_standin_says(p)
        assert fetched == [result.job_id]
        assert all(p.bob.ledger.has_entry(entry_id) for entry_id in silent)
        await settled(p, result)


async def test_a_hold_the_provider_cannot_place_is_refused_and_nothing_is_paid(monkeypatch) -> None:
    """No context, and alice serves no ledger sync: bob cannot get the entry
    her hold follows, so it refuses the hold (R_HOLD) and waives it."""
    monkeypatch.setattr(jobrunner, "_chain_context", lambda *args: ())
    async with AsyncExitStack() as stack:
        p, send_id = await isolated_pair_with_a_silent_send(stack)
        p.alice.host.remove_stream_handler(LEDGER_SYNC_PROTOCOL)
        fetched = spy_on_chain_fetch(p, monkeypatch)
        with trio.fail_after(DEADLINE):
            result = await p.job(max_tokens=TOKENS)
        assert result.status == "rejected" and result.reason.startswith("rejected (hold)"), result.reason
        assert "waiting" in result.reason
        assert fetched == [result.job_id]  # it did try
        assert result.cost == 0 and result.text == "" and result.receipt is None
        assert result.release == "released"  # by bob's waiver
        alice_account = p.alice.ledger.account(p.alice.key.public_key)
        assert alice_account.balance == ALLOCATION - 5 and alice_account.held == 0  # only the SEND left
        assert p.alice.ledger.claims_of(result.hold_id) == {} and p.service.claims == []
        assert not p.bob.ledger.has_entry(send_id) and not p.bob.ledger.has_entry(result.hold_id)
        assert p.bob.balance() == ALLOCATION
        assert p.standin.generations == ()

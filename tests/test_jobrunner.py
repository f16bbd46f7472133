"""One job end to end over a real libp2p stream (p2pgpu.jobrunner).

Two real hosts on 127.0.0.1, each with a Ledger over MemoryStore and a
running LedgerReplicator, connected; the provider runs ``ProviderService``
in front of the Ollama stand-in. Every wait is on a condition with a
generous deadline; every host, replicator and stand-in is closed on exit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import trio

from p2pgpu.core.identity import NodeKey
from p2pgpu.core.jobs import R_PRICE, Prices, job_cost
from p2pgpu.core.protocols import JOB_PROTOCOL
from p2pgpu.core.kv import MemoryStore
from p2pgpu.core.ledger import Ledger
from p2pgpu.executor import OllamaBackend
from p2pgpu.jobrunner import JobResult, ProviderService, run_job
from p2pgpu.net import GossipConfig, P2PHost, StreamAborted, open_host
from p2pgpu.replication import LedgerReplicator
from p2pgpu.testing.ledger import key_for, make_genesis
from p2pgpu.testing.ollama_standin import OllamaStandin, serve_standin
from p2pgpu.testing.nodes import run_replicator
from p2pgpu.testing.waiting import wait_until

DEADLINE = 30.0
MODEL = "llama3.2:1b"
PROMPT = "Why is the sky blue?"
ALLOCATION = 10**9
GENESIS = make_genesis(("alice", "bob"), allocation=ALLOCATION)
NET = GENESIS.network_id
PRICES = Prices(price_in=1_000_000, price_out=2_000_000)  # 1 and 2 base units per token


def now_ms() -> int:
    return int(time.time() * 1000)




@dataclass
class Peer:
    key: NodeKey
    host: P2PHost
    ledger: Ledger
    rep: LedgerReplicator

    def balance(self) -> int:
        return self.ledger.account(self.key.public_key).balance


@dataclass
class Pair:
    alice: Peer  # consumer
    bob: Peer  # provider
    service: ProviderService
    standin: OllamaStandin

    def agree(self) -> bool:
        return self.alice.ledger.state_hash() == self.bob.ledger.state_hash()

    async def job(self, **kw) -> JobResult:
        args = dict(model=MODEL, prompt=PROMPT, max_tokens=40, now_ms=now_ms)
        args.update(kw)
        return await run_job(self.alice.host, self.alice.rep, self.alice.ledger, self.alice.key,
                             self.bob.host.peer_id, PRICES, **args)


async def _peer(stack: AsyncExitStack, nursery: trio.Nursery, name: str, ledger: Ledger | None = None,
                **rep_kw) -> Peer:
    """A host + ledger + running replicator, all closed by ``stack``.
    ``ledger``: an existing one (a node restarting on its data);
    ``rep_kw``: replicator options over this file's defaults."""
    key = key_for(name)
    host = await stack.enter_async_context(open_host(key, gossip=GossipConfig()))
    if ledger is None:
        ledger = Ledger(MemoryStore(), GENESIS)
    rep_kw.setdefault("sync_interval_s", 1.0)
    rep = LedgerReplicator(host, ledger, network_id=NET, now_ms=now_ms, **rep_kw)
    stack.callback(rep.close)
    await run_replicator(stack, nursery, rep)
    return Peer(key, host, ledger, rep)


async def provider(stack: AsyncExitStack, nursery: trio.Nursery, standin: OllamaStandin, *,
                   ledger: Ledger | None = None, rep_kw: dict | None = None, slots: int = 1,
                   **service_kw) -> tuple[Peer, ProviderService]:
    """bob, serving jobs in front of ``standin`` until ``stack`` closes."""
    bob = await _peer(stack, nursery, "bob", ledger, **(rep_kw or {}))
    service = ProviderService(bob.host, bob.rep, bob.ledger, bob.key, OllamaBackend(standin.host),
                              prices=PRICES, slots=slots, now_ms=now_ms, **service_kw)
    service.start()
    stack.callback(service.close)
    return bob, service


@asynccontextmanager
async def pair(*, tokens_per_second: float | None = None, rep_kw: dict | None = None,
               **service_kw) -> AsyncIterator[Pair]:
    """``rep_kw``: replicator options for both peers; ``service_kw``: the provider's."""
    async with AsyncExitStack() as stack:
        standin = await stack.enter_async_context(serve_standin([MODEL], tokens_per_second=tokens_per_second))
        nursery = await stack.enter_async_context(trio.open_nursery())
        alice = await _peer(stack, nursery, "alice", **(rep_kw or {}))
        bob, service = await provider(stack, nursery, standin, rep_kw=rep_kw, **service_kw)
        await alice.host.connect(bob.host.listen_addrs()[0])
        yield Pair(alice, bob, service, standin)


async def test_a_job_streams_the_expected_text_and_settles_on_both_ledgers() -> None:
    async with pair() as p:
        seen: list[str] = []
        with trio.fail_after(DEADLINE):
            result = await p.job(on_tokens=lambda text, count, channel: seen.append(text))
        expected = p.standin.expected_completion(MODEL, PROMPT, num_predict=40)
        assert result.status == "completed", result.reason
        assert result.text == expected.text == "".join(seen)
        assert result.tokens == expected.eval_count == 40
        receipt = result.receipt
        assert receipt is not None and receipt.output_tokens == 40
        assert receipt.prompt_eval_count == expected.prompt_eval_count
        assert receipt.cost == job_cost(PRICES, expected.prompt_eval_count, 40) == result.cost
        assert result.release == "released"
        assert result.ttft_s is not None and result.tokens_per_s is not None
        # both replicas hold the hold, the claim and the release, and agree
        await wait_until(lambda: len(p.bob.ledger.releases_of(result.hold_id)) == 1 and p.agree())
        for ledger in (p.alice.ledger, p.bob.ledger):
            assert ledger.account(p.bob.key.public_key).balance == ALLOCATION + receipt.cost
            assert ledger.account(p.alice.key.public_key).balance == ALLOCATION - receipt.cost
            assert ledger.account(p.alice.key.public_key).held == 0
        assert p.service.active == 0


async def test_a_chat_job_with_a_small_credit_window_pauses_and_still_completes(caplog) -> None:
    caplog.set_level(logging.INFO, logger="p2pgpu.core.jobs")
    messages = [("user", "Say hello to the network.")]
    async with pair(tokens_per_second=500) as p:
        with trio.fail_after(DEADLINE):
            result = await p.job(prompt=None, messages=messages, max_tokens=30, credit_window=1)
        wire = [{"role": r, "content": c} for r, c in messages]
        expected = p.standin.expected_completion(MODEL, wire, num_predict=30)
        assert result.status == "completed", result.reason
        assert result.text == expected.text
        assert result.cost == job_cost(PRICES, expected.prompt_eval_count, 30)
        # window 1: every token pauses the provider until its voucher arrives
        assert any("credit window full" in r.getMessage() for r in caplog.records)
        await wait_until(lambda: len(p.bob.ledger.releases_of(result.hold_id)) == 1 and p.agree())
        assert p.bob.balance() == ALLOCATION + result.cost
        assert p.alice.balance() == ALLOCATION - result.cost


async def test_an_unknown_model_is_rejected_and_the_waiver_releases_the_hold() -> None:
    async with pair() as p:
        with trio.fail_after(DEADLINE):
            result = await p.job(model="no-such-model:7b")
        assert result.status == "rejected"
        assert "(model)" in result.reason
        assert result.cost == 0 and result.text == "" and result.receipt is None
        assert result.release == "released"
        assert p.alice.balance() == ALLOCATION
        assert p.alice.ledger.account(p.alice.key.public_key).held == 0
        await wait_until(lambda: p.bob.ledger.has_entry(result.hold_id)
                         and len(p.bob.ledger.releases_of(result.hold_id)) == 1 and p.agree())
        assert p.bob.balance() == ALLOCATION
        assert p.standin.generations == [] or all(g.model != "no-such-model:7b" for g in p.standin.generations)


async def test_prices_below_the_providers_are_rejected_with_code_price() -> None:
    async with pair() as p:
        with trio.fail_after(DEADLINE):
            result = await run_job(p.alice.host, p.alice.rep, p.alice.ledger, p.alice.key, p.bob.host.peer_id,
                                   Prices(1, 1), model=MODEL, prompt=PROMPT, max_tokens=10, now_ms=now_ms)
        assert result.status == "rejected" and "(price)" in result.reason and result.code == R_PRICE
        assert result.release == "released"
        assert p.alice.balance() == ALLOCATION


async def test_a_cancelled_job_pays_exactly_the_tokens_sent() -> None:
    async with pair(tokens_per_second=50) as p:
        cancel = trio.Event()
        seen: list[str] = []

        def on_tokens(text: str, count: int, channel: int) -> None:
            seen.append(text)
            if len(seen) == 5:
                cancel.set()

        with trio.fail_after(DEADLINE):
            result = await p.job(max_tokens=200, on_tokens=on_tokens, cancel=cancel)
        assert result.status == "failed" and not result.retryable
        receipt = result.receipt
        assert receipt is not None and receipt.status == 1  # CANCELLED
        assert 5 <= receipt.output_tokens < 200
        assert result.tokens <= receipt.output_tokens  # tokens in flight at the cancel are paid, not shown
        expected = p.standin.expected_completion(MODEL, PROMPT, num_predict=200)
        assert expected.text.startswith(result.text)
        assert result.cost == receipt.cost == job_cost(PRICES, receipt.prompt_eval_count,
                                                       receipt.output_tokens)
        assert result.release == "released"
        await wait_until(lambda: len(p.bob.ledger.releases_of(result.hold_id)) == 1 and p.agree())
        assert p.bob.balance() == ALLOCATION + result.cost
        assert p.alice.balance() == ALLOCATION - result.cost
        await wait_until(lambda: p.service.active == 0)


async def test_a_garbage_frame_closes_only_its_own_stream() -> None:
    async with pair() as p:
        with trio.fail_after(DEADLINE):
            stream = await p.alice.host.open_stream(p.bob.host.peer_id, JOB_PROTOCOL)
            await stream.send_frame(b"\xc1 not msgpack")
            try:
                assert await stream.receive_frame() is None
            except StreamAborted:
                pass
            await stream.close()
            result = await p.job(max_tokens=8)
        assert result.status == "completed", result.reason
        assert result.text == p.standin.expected_completion(MODEL, PROMPT, num_predict=8).text

"""A consumer against a cheating provider, on a live stream (issue 12, item 3).

Three real nodes in one process (``LocalNetwork``: libp2p on 127.0.0.1,
LevelDB, the Ollama stand-in): a cheating provider, an honest one, and a
consumer that tries the cheat first (the honest one has a "recent failure"
in its ranking history). The cheat is the real ``ProviderSession`` with its
wire output rewritten (``p2pgpu.testing.malicious``): more tokens than
asked, running totals or seqs that do not add up, a receipt that does not
match the stream, a receipt over other figures, a CANCEL not heeded, a
CLAIM above what the consumer signed.

What each test holds the consumer to:

- it catches the lie (``ConsumerSession._on_tokens`` / ``_on_receipt`` in
  ``p2pgpu/core/jobs.py``; the ledger's ``_admit_claim`` for claims), the
  job still ends with exactly the stand-in's answer (failed over, and the
  honest provider continues it), and the cheat is demoted in the
  consumer's ``ProviderHistory``;
- nobody overpays: once every ledger agrees, the consumer has paid the
  honest provider exactly its receipt's cost plus the cheat at most its
  vouchers, which cover only tokens the consumer accepted, and coins are
  conserved on every replica.

Where a lie cannot be caught (the provider's own figures, which the
consumer has no way to check: the prompt's token count, a chunk's), the
test pins down the bound on what it costs the consumer instead. A provider
that streams on after a CANCEL (the consumer's, or its own) used to be paid
for everything it streamed, up to ``max_tokens``; the consumer now refuses
any frame past what could have been in flight (``ConsumerSession._close``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from p2pgpu.api import SubmitRequest
from p2pgpu.core.jobs import ConsumerSession, Prices, ProviderSession, ProviderState, job_cost, prompt_token_bound
from p2pgpu.core.ledger import decode_entry, make_voucher
from p2pgpu.core.ranking import ProviderRecord
from p2pgpu.core.sync import encode_announcement
from p2pgpu.errors import BadSignature, LedgerRuleViolation
from p2pgpu.node import Node, now_ms
from p2pgpu.testing.malicious import (
    BOGUS_HASH, CancelsAndStreamsOn, Cheat, ExtraTokensFrame, ForgedReceipt, IgnoresCancel, InflatedCounts,
    KeepsItsClaim, Sessions, SkippedSeq, TokensPastMaxTokens, WithheldTokens, WrongRunningTotal, forge_claim,
    tampered_voucher,
)
from p2pgpu.testing.nodes import LocalNetwork, collect, live
from p2pgpu.testing.ollama_standin import expected_completion, serve_standin
from p2pgpu.testing.waiting import wait_until

MODEL = "llama3.2:1b"
PROMPT = "tell me a story"
MAX_TOKENS = 30
# The consumer pays a voucher every 16 tokens (half the default credit
# window of 32): a cheat caught at frame 20 holds one voucher, so its claim
# and the consumer's release settle the hold at once.
AT = 20
DEADLINE = 60.0  # generous: a loaded two-core machine
EXPECTED = expected_completion(MODEL, PROMPT, num_predict=MAX_TOKENS)
LONG = 400  # tokens: an answer that goes on well past a cancel


@dataclass
class Market:
    net: LocalNetwork
    cheat: Node
    honest: Node
    consumer: Node
    sessions: Sessions
    before: dict[Node, dict[bytes, int]]  # each node's balances before the job

    @property
    def nodes(self) -> list[Node]:
        return [self.cheat, self.honest, self.consumer]

    def pub(self, node: Node) -> bytes:
        return node.key.public_key

    async def submit(self, max_tokens: int = MAX_TOKENS, on_event=None) -> list[dict]:
        with trio.fail_after(DEADLINE):
            return await collect(self.consumer, SubmitRequest(model=MODEL, prompt=PROMPT, max_tokens=max_tokens),
                                 on_event)

    def attempt_on(self, provider: Node) -> tuple[ConsumerSession, ProviderSession]:
        """The one attempt on ``provider``: the consumer's session and the provider's."""
        (consumer_side,) = self.sessions.consumer_of(self.pub(provider))
        (provider_side,) = [s for s in self.sessions.providers[self.pub(provider)] if s.request is not None]
        return consumer_side, provider_side

    def history(self, provider: Node) -> ProviderRecord | None:
        assert self.consumer.consumer is not None
        return self.consumer.consumer.history.get(self.pub(provider))

    def agree(self) -> bool:
        return len({n.ledger.state_hash() for n in self.nodes}) == 1

    def released_everywhere(self, hold_id: bytes) -> bool:
        return all(n.ledger.releases_of(hold_id) for n in self.nodes)

    async def settled(self) -> None:
        """Every provider session is over (the final voucher, if any, has
        reached it), every hold whose provider holds a voucher is claimed and
        released on every replica (one left without a voucher has nothing to
        claim: its hold comes back after expiry), and every ledger agrees."""
        def done() -> bool:
            jobs = [s for p in (self.cheat, self.honest) for s in self.sessions.providers[self.pub(p)]
                    if s.request is not None]
            return (all(s.state is ProviderState.DONE for s in jobs)
                    and all(self.released_everywhere(s.request.hold_id) for s in jobs if s.voucher is not None)
                    and self.agree())

        await wait_until(done, timeout=DEADLINE, what="the holds settled and every ledger agreeing")

    def books(self, node: Node) -> tuple[int, int, int]:
        """On ``node``'s ledger: (what the consumer has paid out, what the
        cheat earned, what the honest provider earned)."""
        ledger, before = node.ledger, self.before[node]
        consumer = ledger.account(self.pub(self.consumer))
        paid = before[self.pub(self.consumer)] - consumer.balance - consumer.held  # a hold still open is not paid
        earned = [ledger.account(self.pub(p)).balance - before[self.pub(p)] for p in (self.cheat, self.honest)]
        return paid, earned[0], earned[1]


@asynccontextmanager
async def market(tmp_path, cheat: Cheat, **cheats_standin: Any) -> AsyncIterator[Market]:
    """Two providers in front of their own stand-in (node 0 cheats with
    ``cheat``, its stand-in made with ``cheats_standin``, by default
    streaming all at once; node 1 is honest) and a consumer (node 2) that
    tries the cheat first. Every node is stopped on the way out."""
    sessions = Sessions()
    cheats_standin.setdefault("tokens_per_second", None)
    async with serve_standin(models=(MODEL,), **cheats_standin) as cheat_ollama, \
            serve_standin(models=(MODEL,), tokens_per_second=None) as honest_ollama, \
            trio.open_nursery() as nursery:
        net = LocalNetwork(tmp_path, 3)
        with sessions.installed():
            try:
                cheat_node = await net.start(nursery, 0, cheat_ollama.host)
                sessions.cheat(cheat_node.key.public_key, cheat)
                honest = await net.start(nursery, 1, honest_ollama.host)
                consumer = await net.start(nursery, 2)
                await wait_until(lambda: len(live(consumer)) == 2, timeout=DEADLINE, what="both offers")
                # make the cheat the first choice: the honest one "failed recently"
                assert consumer.consumer is not None
                consumer.consumer.history.record_failure(honest.key.public_key, now_ms(), "warm-up")
                before = {n: {k.public_key: n.ledger.account(k.public_key).balance for k in net.keys}
                          for n in (cheat_node, honest, consumer)}
                yield Market(net, cheat_node, honest, consumer, sessions, before)
            finally:
                with trio.CancelScope(shield=True):
                    await net.stop_all()


def answer(events: list[dict]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "token")


def not_tokens(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] != "token"]


def check_conservation(m: Market) -> None:
    for node in m.nodes:
        total, minted = node.ledger.conservation()
        assert total == minted


# ---------------------------------------------------------------- caught mid-stream: the job fails over

# name: (the cheat, tokens the consumer accepts from it: those before the lie)
CAUGHT_MID_STREAM: dict[str, tuple[Callable[[], Cheat], int]] = {
    # frame 20 bills max_tokens more than it carries: more tokens than asked
    "tokens_past_max_tokens": (lambda: TokensPastMaxTokens(at_seq=AT), AT),
    # frame 20's running total is one above the counts sent
    "running_total_off_by_one": (lambda: WrongRunningTotal(at_seq=AT), AT),
    # frame 20 goes out as 21
    "skipped_seq": (lambda: SkippedSeq(at_seq=AT), AT),
    # frames from 20 on never go out, but the receipt bills all 30
    "receipt_for_tokens_not_delivered": (lambda: WithheldTokens(from_seq=AT), AT),
    # a CANCEL after frame 20, then the rest of the answer anyway, and a receipt for all 30
    "tokens_after_its_own_cancel": (lambda: CancelsAndStreamsOn(at_seq=AT), AT + 1),
}


@pytest.mark.parametrize("lie", sorted(CAUGHT_MID_STREAM))
async def test_a_lie_mid_stream_is_caught_and_the_honest_provider_finishes_the_answer(tmp_path, lie) -> None:
    make_cheat, accepted = CAUGHT_MID_STREAM[lie]
    async with market(tmp_path, make_cheat()) as m:
        events = await m.submit()
        kinds = [e["type"] for e in events]
        assert kinds[-1] == "done" and kinds.count("provider") == 2, not_tokens(events)
        first, retry, done = events[0], next(e for e in events if e["type"] == "retry"), events[-1]
        assert first["provider"] == m.cheat.key.peer_id
        assert retry["provider"] == m.cheat.key.peer_id and retry["continues"] is True
        assert retry["tokens_delivered"] == accepted  # the frames before the lie, not one more
        assert done["provider"] == m.honest.key.peer_id and done["attempts"] == 2 and done["tokens"] == MAX_TOKENS
        assert answer(events) == EXPECTED.text  # one answer: the cheat's good part, continued

        # demoted: a failure on the consumer's record of it, and it never completed a job
        record = m.history(m.cheat)
        assert record is not None and record.failed == 1 and record.completed == 0
        assert m.history(m.honest).completed == 1

        cheated, cheat_side = m.attempt_on(m.cheat)
        served, honest_side = m.attempt_on(m.honest)
        prices: Prices = cheated.prices
        # The consumer signed vouchers only for tokens it accepted, never the final one (no receipt it took).
        assert cheated.received == accepted and 0 < cheated.paid_tokens <= cheated.received
        assert cheated.paid == job_cost(prices, 0, cheated.paid_tokens)
        assert done["cost"] == cheated.paid + served.paid

        await m.settled()
        check_conservation(m)
        assert cheat_side.paid <= cheated.paid
        # The honest provider was paid its receipt, exactly.
        assert honest_side.final_cost == honest_side.paid == served.paid
        for node in m.nodes:
            paid, cheat_earned, honest_earned = m.books(node)
            assert honest_earned == honest_side.final_cost
            assert cheat_earned <= cheated.paid <= job_cost(prices, 0, accepted)  # nothing for the lie, nor past it
            assert paid == cheat_earned + honest_earned


# ---------------------------------------------------------------- caught after the last token: no failover needed

CAUGHT_AT_THE_END: dict[str, Callable[[], Cheat]] = {
    # one TOKENS frame more than max_tokens, right before the receipt
    "a_frame_past_max_tokens": lambda: ExtraTokensFrame(),
    # the receipt's output hash is not the stream's
    "receipt_with_another_output_hash": lambda: ForgedReceipt({"out_hash": lambda _: BOGUS_HASH}),
    # the receipt bills one output token more than was streamed
    "receipt_with_one_token_more": lambda: ForgedReceipt({"output_tokens": lambda n: n + 1}),
}


@pytest.mark.parametrize("lie", sorted(CAUGHT_AT_THE_END))
async def test_a_lie_after_the_last_token_is_caught_and_its_receipt_is_not_paid(tmp_path, lie) -> None:
    """Every token asked for had arrived when the lie came: the answer is
    complete (nothing to fail over), but the cheat is refused its receipt, so
    it never gets the final voucher (input tokens and the tail of the output)."""
    async with market(tmp_path, CAUGHT_AT_THE_END[lie]()) as m:
        events = await m.submit()
        assert [e["type"] for e in events].count("provider") == 1, not_tokens(events)
        done = events[-1]
        assert done["type"] == "done" and done["provider"] == m.cheat.key.peer_id, not_tokens(events)
        assert done["attempts"] == 1 and done["tokens"] == MAX_TOKENS
        assert answer(events) == EXPECTED.text
        record = m.history(m.cheat)
        assert record is not None and record.failed == 1 and record.completed == 0

        cheated, cheat_side = m.attempt_on(m.cheat)
        prices: Prices = cheated.prices
        assert cheated.received == MAX_TOKENS
        assert cheated.paid == job_cost(prices, 0, cheated.paid_tokens) < job_cost(prices, 0, MAX_TOKENS)
        assert done["cost"] == cheated.paid
        assert [s for s in m.sessions.providers[m.pub(m.honest)] if s.request is not None] == []  # never asked

        await m.settled()
        check_conservation(m)
        assert cheat_side.paid <= cheated.paid
        for node in m.nodes:
            paid, cheat_earned, honest_earned = m.books(node)
            assert honest_earned == 0 and cheat_earned <= cheated.paid and paid == cheat_earned


# ---------------------------------------------------------------- the receipt's own figures: bounded, not caught


async def test_a_receipt_with_an_inflated_cost_is_ignored_the_consumer_prices_the_job_itself(tmp_path) -> None:
    async with market(tmp_path, ForgedReceipt({"cost": lambda cost: cost * 100})) as m:
        events = await m.submit()
        done = events[-1]
        assert done["type"] == "done" and done["provider"] == m.cheat.key.peer_id and done["attempts"] == 1
        assert answer(events) == EXPECTED.text
        cheated, cheat_side = m.attempt_on(m.cheat)
        honest_cost = job_cost(cheated.prices, EXPECTED.prompt_eval_count, MAX_TOKENS)
        assert cheated.paid == honest_cost == done["cost"]
        await m.settled()
        check_conservation(m)
        assert cheat_side.final_cost == cheat_side.paid == honest_cost
        for node in m.nodes:
            paid, cheat_earned, honest_earned = m.books(node)
            assert paid == cheat_earned == honest_cost and honest_earned == 0


async def test_an_inflated_prompt_eval_count_costs_at_most_the_requests_prompt_bound(tmp_path) -> None:
    """Not catchable: only the provider's model knows how many tokens the
    prompt was, and the consumer takes its word (docs/protocol.md §7). The
    worst it can cost is the request's ``max_prompt_tokens`` (a byte count of
    the prompt plus the template's margin), never a coin past the hold."""
    async with market(tmp_path, ForgedReceipt({"prompt_eval_count": lambda n: n + 10_000})) as m:
        events = await m.submit()
        done = events[-1]
        assert done["type"] == "done" and done["provider"] == m.cheat.key.peer_id and done["attempts"] == 1
        assert answer(events) == EXPECTED.text
        cheated, _ = m.attempt_on(m.cheat)
        bound = prompt_token_bound(PROMPT)
        assert cheated.request.max_prompt_tokens == bound < EXPECTED.prompt_eval_count + 10_000
        capped = job_cost(cheated.prices, bound, MAX_TOKENS)
        assert cheated.paid == capped == done["cost"]
        assert capped <= cheated.request.hold.body.amount  # type: ignore[union-attr]
        await m.settled()
        check_conservation(m)
        for node in m.nodes:
            paid, cheat_earned, _ = m.books(node)
            assert paid == cheat_earned == capped


async def test_token_counts_inflated_consistently_cost_at_most_max_tokens(tmp_path) -> None:
    """A provider that bills each streamed chunk as two tokens, with counts,
    running totals and receipt all agreeing, is not caught: the consumer
    cannot tokenize, so it counts what the frames say (one token per chunk is
    what Ollama streams, but the protocol allows up to 4096 a frame, and the
    simulator batches). It gets half the answer billed as all of it; the
    bound is the request's ``max_tokens`` (and the hold)."""
    async with market(tmp_path, InflatedCounts(factor=2)) as m:
        events = await m.submit()
        done = events[-1]
        assert done["type"] == "done" and done["provider"] == m.cheat.key.peer_id and done["attempts"] == 1
        chunks = [e for e in events if e["type"] == "token"]
        assert len(chunks) == MAX_TOKENS // 2 and answer(events) != EXPECTED.text  # half the answer...
        assert done["tokens"] == MAX_TOKENS  # ...billed as all of it
        cheated, _ = m.attempt_on(m.cheat)
        assert cheated.received == MAX_TOKENS
        assert cheated.paid == job_cost(cheated.prices, EXPECTED.prompt_eval_count, MAX_TOKENS)
        assert cheated.paid <= cheated.request.hold.body.amount  # type: ignore[union-attr]
        await m.settled()
        check_conservation(m)


# ---------------------------------------------------------------- a cancel the provider does not heed


async def test_a_provider_that_ignores_the_cancel_is_paid_at_most_one_credit_window_past_it(tmp_path) -> None:
    """The user stops the job after 5 tokens; the cheat never hears the
    CANCEL and streams on to ``max_tokens``, then signs a receipt for all
    of it. An honest provider has at most one credit window of tokens in
    flight past the vouchers it holds, so that is the most the consumer may
    count, and pay for, past what it had delivered when it cancelled.
    (Anything else going wrong raises before the bound is checked, once the
    nodes have stopped.)"""
    async with market(tmp_path, IgnoresCancel(), tokens_per_second=200, default_length=LONG) as m:
        consumer = m.consumer.consumer
        assert consumer is not None
        others: list[dict] = []
        shown = 0

        async def cancel_after_five_tokens(event: dict) -> None:
            nonlocal shown
            if event["type"] != "token":
                others.append(event)
            else:
                shown += 1
                if shown == 5:
                    if not consumer.cancel(bytes.fromhex(others[0]["job_id"])):
                        raise RuntimeError("the job was not live to cancel")

        events = await m.submit(max_tokens=LONG, on_event=cancel_after_five_tokens)
        if events[-1].get("kind") != "Cancelled":
            raise RuntimeError(f"not cancelled: {not_tokens(events)}")
        delivered = len(events) - len(not_tokens(events))  # shown before the cancel took effect: 5 or a few more
        cheated, _ = m.attempt_on(m.cheat)
        window, prices = cheated.request.credit_window, cheated.prices
        await m.settled()
        books = [m.books(node) for node in m.nodes]
        conserved = [node.ledger.conservation() for node in m.nodes]
    assert 5 <= delivered < LONG
    for (paid, cheat_earned, honest_earned), (total, minted) in zip(books, conserved):
        assert total == minted and paid == cheat_earned + honest_earned and cheat_earned <= cheated.paid
    assert cheated.received <= delivered + window
    assert cheated.paid <= job_cost(prices, cheated.request.max_prompt_tokens, delivered + window)


# ---------------------------------------------------------------- a claim above the last voucher


async def test_a_claim_above_the_consumers_last_voucher_is_refused_by_every_replica(tmp_path) -> None:
    """After an honest job the cheat keeps its voucher and appends CLAIMs
    for the whole hold instead: with the consumer's voucher, its amount
    raised (the signature no longer verifies), and with a voucher it signed
    itself. Announced by gossip and handed to each replica directly, they are
    refused everywhere (its own ledger too); its honest claim of the real
    voucher then settles the hold, and a second claim is refused again."""
    cheat = KeepsItsClaim()
    async with market(tmp_path, cheat) as m:
        events = await m.submit()
        done = events[-1]
        assert done["type"] == "done" and done["provider"] == m.cheat.key.peer_id and done["attempts"] == 1
        assert answer(events) == EXPECTED.text
        await wait_until(lambda: len(cheat.claims) == 1, timeout=DEADLINE, what="the cheat's final voucher")
        (claim,) = cheat.claims
        cheated, _ = m.attempt_on(m.cheat)
        assert claim.amount == cheated.paid == done["cost"]  # the final voucher: what the job cost
        hold_id = claim.hold_id
        hold_amount = cheated.request.hold.body.amount  # type: ignore[union-attr]
        assert claim.amount < hold_amount
        await wait_until(lambda: all(n.ledger.has_entry(hold_id) for n in m.nodes), timeout=DEADLINE,
                         what="the hold on every replica")

        network_id = m.cheat.ledger.network_id
        forged = [
            (forge_claim(m.cheat.ledger, m.cheat.key, hold_id, tampered_voucher(claim.voucher, hold_amount), now_ms()),
             BadSignature),
            (forge_claim(m.cheat.ledger, m.cheat.key, hold_id,
                         make_voucher(m.cheat.key, network_id, hold_id, hold_amount, now_ms()).wire, now_ms()),
             LedgerRuleViolation),
        ]
        ids = [decode_entry(wire, network_id, verify=False).id for wire, _ in forged]

        # by gossip, as the cheat would announce its own entries
        others = (m.consumer, m.honest)
        rejected = {n: n.replicator.stats().get("rejected", 0) for n in others}
        for wire, _ in forged:
            await m.cheat.host.publish(m.cheat.replicator.topic, encode_announcement([wire]))
        await wait_until(lambda: all(n.replicator.stats().get("rejected", 0) >= rejected[n] + len(forged)
                                     for n in others), timeout=DEADLINE, what="the announced claims refused")
        # and by hand, to each replica (the cheat's own included)
        for node in m.nodes:
            results = await node.replicator.offer([wire for wire, _ in forged])
            for result, (_, error) in zip(results, forged):
                assert isinstance(result, error), (node.key.peer_id, result)
        for node in m.nodes:
            assert not any(node.ledger.has_entry(i) for i in ids)
            assert node.ledger.claims_of(hold_id) == {}
            assert node.ledger.account(m.pub(m.consumer)).held == hold_amount
            assert node.ledger.account(m.pub(m.cheat)).balance == m.before[node][m.pub(m.cheat)]
        assert m.agree()

        # The real voucher is good for exactly what the consumer signed.
        await m.cheat.replicator.append(lambda ledger: ledger.claim(m.cheat.key, hold_id, claim.voucher, now_ms()))
        await wait_until(lambda: m.released_everywhere(hold_id) and m.agree(), timeout=DEADLINE,
                         what="the claim and the release on every replica")
        check_conservation(m)
        for node in m.nodes:
            paid, cheat_earned, honest_earned = m.books(node)
            assert paid == cheat_earned == claim.amount and honest_earned == 0
            assert node.ledger.account(m.pub(m.consumer)).held == 0

        # A second claim, of the genuine voucher or a raised one: the hold is claimed already.
        for voucher in (claim.voucher.wire, tampered_voucher(claim.voucher, hold_amount)):
            wire = forge_claim(m.cheat.ledger, m.cheat.key, hold_id, voucher, now_ms())
            for node in m.nodes:
                (result,) = await node.replicator.offer([wire])
                assert isinstance(result, LedgerRuleViolation) and "already claimed" in str(result), result
        for node in m.nodes:
            paid, cheat_earned, _ = m.books(node)
            assert paid == cheat_earned == claim.amount

"""Jobs through the node (issue #4): ``Node.submit`` ranks the offers, holds
the maximum cost, streams tokens from a provider's Ollama stand-in, pays by
vouchers, and fails over when a provider dies mid-stream, with every ledger
agreeing and nobody paid twice. Real libp2p hosts and LevelDB, one process.
"""

from __future__ import annotations

import pytest
import trio

from p2pgpu.api import SubmitRequest
from p2pgpu.errors import ExecutionFailed, InsufficientFunds
from p2pgpu.testing.ollama_standin import expected_completion, serve_standin
from p2pgpu.node import now_ms
from p2pgpu.testing.nodes import LocalNetwork, collect, live
from p2pgpu.testing.waiting import wait_until as wait_for

MODEL = "llama3.2:1b"


def settled(net) -> bool:
    hashes = {n.ledger.state_hash() for n in net.nodes}
    return len(hashes) == 1 and all(n.ledger.account(k.public_key).held == 0 for n in net.nodes for k in net.keys)


async def test_a_job_streams_the_providers_tokens_and_pays_exactly_the_receipt(tmp_path):
    async with serve_standin(models=(MODEL,), tokens_per_second=None) as standin, trio.open_nursery() as nursery:
        net = LocalNetwork(tmp_path, 3)
        provider = await net.start(nursery, 0, standin.host)
        consumer = await net.start(nursery, 1)
        await net.start(nursery, 2)
        await wait_for(lambda: live(consumer))
        before = {k.peer_id: consumer.ledger.account(k.public_key).balance for k in net.keys}

        events = await collect(consumer, SubmitRequest(model=MODEL, prompt="why is the sky blue?", max_tokens=24))
        kinds = [e["type"] for e in events]
        assert kinds[0] == "provider" and kinds[-1] == "done", kinds
        text = "".join(e["text"] for e in events if e["type"] == "token")
        expected = expected_completion(MODEL, "why is the sky blue?", num_predict=24)
        assert text == expected.text
        done = events[-1]
        assert done["provider"] == provider.key.peer_id and done["tokens"] == 24 and done["cost"] > 0

        await wait_for(lambda: settled(net), timeout=30)
        for node in net.nodes:
            paid = before[consumer.key.peer_id] - node.ledger.account(consumer.key.public_key).balance
            earned = node.ledger.account(provider.key.public_key).balance - before[provider.key.peer_id]
            assert paid == earned == done["cost"]
            total, minted = node.ledger.conservation()
            assert total == minted

        with pytest.raises(ExecutionFailed, match="qwen|model"):
            await collect(consumer, SubmitRequest(model="qwen9:404b", prompt="x"))
        spendable = consumer.ledger.spendable(consumer.key.public_key)
        await consumer.send(net.keys[2].peer_id, spendable - 10, "drain")
        with pytest.raises(InsufficientFunds):  # before any stream opens
            await collect(consumer, SubmitRequest(model=MODEL, prompt="x", max_tokens=1_000))
        for node in net.nodes:
            node.stop()


async def test_a_provider_killed_mid_stream_and_the_job_finishes_elsewhere(tmp_path):
    async with serve_standin(models=(MODEL,), tokens_per_second=40) as first, \
            serve_standin(models=(MODEL,), tokens_per_second=None) as second, trio.open_nursery() as nursery:
        net = LocalNetwork(tmp_path, 3)
        providers = [await net.start(nursery, 0, first.host), await net.start(nursery, 1, second.host)]
        consumer = await net.start(nursery, 2)
        await wait_for(lambda: len(live(consumer)) == 2)
        chosen: list[str] = []
        tokens_before_crash = 0

        async def crash_the_first_after_a_few_tokens(event):
            nonlocal tokens_before_crash
            if event["type"] == "provider":
                chosen.append(event["provider"])
            elif event["type"] == "token" and len(chosen) == 1:
                tokens_before_crash += 1
                if tokens_before_crash == 5:
                    index = next(i for i, p in enumerate(providers) if p.key.peer_id == chosen[0])
                    net.crash(index)

        # make the slow stand-in the first choice: the other provider is "recently failed"
        fast = next(p for p in providers if p.config.ollama_host == second.host)
        consumer.consumer.history.record_failure(fast.key.public_key, now_ms(), "warm-up")
        events = await collect(consumer, SubmitRequest(model=MODEL, prompt="tell me a story", max_tokens=30),
                               crash_the_first_after_a_few_tokens)
        kinds = [e["type"] for e in events]
        assert kinds.count("provider") == 2 and "retry" in kinds and kinds[-1] == "done", [e for e in events if e["type"] != "token"]
        assert events[-1]["provider"] == fast.key.peer_id
        # One answer, not the dead provider's fragment followed by a new one:
        # the second provider continued it (a chat ending in the partial
        # answer), asked only for the tokens still missing.
        text = "".join(e["text"] for e in events if e["type"] == "token")
        assert text == expected_completion(MODEL, "tell me a story", num_predict=30).text
        retry = next(e for e in events if e["type"] == "retry")
        delivered = retry["tokens_delivered"]
        assert retry["continues"] is True and 5 <= delivered < 30
        assert events[-1]["tokens"] == 30 and events[-1]["attempts"] == 2
        (continued,) = [r.body for r in second.requests if r.path == "/api/chat"]
        assert continued["messages"][0] == {"role": "user", "content": "tell me a story"}
        prefix = continued["messages"][-1]
        assert prefix["role"] == "assistant" and text.startswith(prefix["content"]) and prefix["content"] != text
        assert continued["options"]["num_predict"] == 30 - delivered
        record = consumer.job_store.get(bytes.fromhex(events[-1]["job_id"]))
        assert record.tokens_out == 30 and len(record.attempts) == 2 and record.cost == events[-1]["cost"]
        assert consumer.job_store.text(record.job_id) == text
        survivors = [n for i, n in enumerate(net.nodes) if net.nodes[i].key.peer_id != chosen[0]]
        await wait_for(lambda: len({n.ledger.state_hash() for n in survivors}) == 1, timeout=30)
        for node in survivors:
            total, minted = node.ledger.conservation()
            assert total == minted
            crashed = next(k for k in net.keys if k.peer_id == chosen[0])
            # it died before claiming: it is paid nothing, and the hold for it
            # comes back to the consumer after expiry (release on time alone)
            assert node.ledger.account(crashed.public_key).balance == 10**9
        for node in survivors:
            node.stop()

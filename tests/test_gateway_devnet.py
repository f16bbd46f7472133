"""The gateway of a node process, with the real clients, when a provider
process is SIGKILLed mid-stream (issue 11).

Three node processes from ``p2pgpu.testing.devnet`` (two providers with slow
stand-ins, each node's gateway on its own free port, written to
``gateway.addr``), the ``ollama`` client streaming a chat through the
consumer's gateway and the ``openai`` client listing models and answering
through it. The provider serving the stream is killed by its recorded PID
after a few tokens: the client's stream still completes with the one answer
the model gives, and the dead provider is paid nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ollama
import openai
import pytest

from p2pgpu.testing.devnet import Devnet
from p2pgpu.testing.ollama_standin import expected_completion
from p2pgpu.testing.waiting import poll_until

MODEL = "llama3.2:1b"
MAX_TOKENS = 40
P2PGPU = Path(sys.executable).with_name("p2pgpu")


@pytest.mark.slow
def test_a_provider_process_killed_mid_stream_and_the_gateway_stream_still_completes(tmp_path):
    net = Devnet(tmp_path / "net", nodes=3, providers=2, tokens_per_second=20, reply_tokens=MAX_TOKENS,
                 heartbeat_s=0.5, offer_ttl_s=2.0, sync_interval_s=1.0)
    with net:
        net.up()
        consumer = net.nodes[2]
        api = consumer.client()
        poll_until(lambda: len(api.offers(MODEL)) == 2, 60, what="both providers' offers at the consumer")
        url = poll_until(consumer.gateway_url, 30, what="the consumer's gateway address")
        assert api.status()["gateway"] == url
        shown = subprocess.run([str(P2PGPU), "--data-dir", str(consumer.data_dir), "status"], capture_output=True,
                               text=True, timeout=60)
        assert shown.returncode == 0 and f"{url} (Ollama API; OpenAI under /v1)" in shown.stdout, shown.stdout
        token = (consumer.data_dir / "api.token").read_text().strip()

        models = openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0).models.list()
        assert MODEL in [m.id for m in models.data]

        client = ollama.Client(host=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        messages = [{"role": "user", "content": "tell me a long story about GPUs"}]
        texts: list[str] = []
        victim = None
        for chunk in client.chat(MODEL, messages=messages, stream=True, options={"num_predict": MAX_TOKENS}):
            if chunk.message.content:
                texts.append(chunk.message.content)
            if len(texts) == 5 and victim is None:
                running = next(j for j in api.jobs("consumer", 1) if j["status"] == "running")
                victim = net.peer_ids.index(running["provider"])
                assert net.kill(f"node{victim}")
            final = chunk
        assert victim is not None
        assert "".join(texts) == expected_completion(MODEL, messages, num_predict=MAX_TOKENS).text
        assert final.done and final.eval_count == MAX_TOKENS

        job = api.job(running["id"])
        assert job["status"] == "completed" and len(job["attempts"]) == 2
        survivor = 1 - victim
        assert job["attempts"][-1]["provider"] == net.peer_ids[survivor]
        wallet = poll_until(lambda: (w := api.wallet(net.peer_ids[survivor]))["balance"] > 10**9 and w, 60,
                            what="the surviving provider's claim")
        assert api.wallet(net.peer_ids[victim])["balance"] == 10**9  # the dead one claimed nothing
        assert wallet["balance"] - 10**9 <= job["cost"]

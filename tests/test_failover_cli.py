"""A provider SIGKILLed mid-stream, seen from ``p2pgpu submit`` (issue #9):
stdout carries one clean answer, stderr says what happened.

Three node processes (two providers with slow stand-ins) from
``p2pgpu.testing.devnet``; the real ``p2pgpu submit`` in a subprocess, its
plain stdout read as it streams; the provider serving the job is killed by
its recorded PID after a few tokens. The next provider continues the
answer, so stdout is exactly the answer the model gives the prompt, not the
dead provider's fragment glued to a second answer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from p2pgpu.testing.devnet import Devnet
from p2pgpu.testing.ollama_standin import expected_completion
from p2pgpu.testing.waiting import poll_until

MODEL = "llama3.2:1b"
PROMPT = "tell me a long story about GPUs"
MAX_TOKENS = 60
P2PGPU = Path(sys.executable).with_name("p2pgpu")


@pytest.mark.slow
def test_a_killed_provider_leaves_one_clean_answer_on_stdout(tmp_path):
    net = Devnet(tmp_path / "net", nodes=3, providers=2, tokens_per_second=20, reply_tokens=MAX_TOKENS,
                 heartbeat_s=0.5, offer_ttl_s=2.0, sync_interval_s=1.0)
    with net:
        net.up()
        consumer = net.nodes[2]
        client = consumer.client()
        poll_until(lambda: len(client.offers(MODEL)) == 2, 60, what="both providers' offers at the consumer")

        process = subprocess.Popen(
            [str(P2PGPU), "--data-dir", str(consumer.data_dir), "submit", "--model", MODEL,
             "--max-tokens", str(MAX_TOKENS), PROMPT],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out: list[bytes] = []

        def read() -> None:
            while chunk := process.stdout.read1(4096):
                out.append(chunk)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            poll_until(lambda: len(b"".join(out).split()) >= 5, 60, what="the first tokens on stdout")
            running = poll_until(lambda: next((j for j in client.jobs("consumer", 1) if j["status"] == "running"
                                               and j.get("provider")), None), 30, what="the running job's provider")
            victim = net.peer_ids.index(running["provider"])
            assert net.kill(f"node{victim}")
            reader.join(120)  # stdout closes when the command ends
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join(10)
        stderr = process.stderr.read().decode()
        process.stderr.close()
        process.stdout.close()

        answer = expected_completion(MODEL, PROMPT, num_predict=MAX_TOKENS, default_length=MAX_TOKENS).text
        assert process.returncode == 0, stderr
        assert b"".join(out).decode() == answer + "\n"
        assert "the next provider continues the answer" in stderr, stderr
        assert f"{MAX_TOKENS} tokens" in stderr.splitlines()[-1]
        job = client.job(running["id"])
        assert job["status"] == "completed" and job["text"] == answer and len(job["attempts"]) == 2

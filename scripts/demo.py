#!/usr/bin/env python3
"""Three p2pgpu nodes on 127.0.0.1, each its own process: watch them find
each other, see the provider's signed offer reach every node, stream a job's
tokens from the provider's (stand-in) Ollama, and see the coins move by
exactly the job's cost, identically on every node. Everything started is
stopped at the end, by PID.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pgpu.core.units import format_coins  # noqa: E402
from p2pgpu.testing.devnet import Devnet  # noqa: E402

NAMES = ["alice (provider, faucet)", "bob", "carol"]
MODEL = "llama3.2:1b"
MAX_TOKENS = 48


def wait_until(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def balances(clients) -> list[str]:
    return [format_coins(c.wallet(None)["balance"]) for c in clients]


def show_balances(title: str, clients) -> None:
    print(f"\n{title}")
    for name, client, balance in zip(NAMES, clients, balances(clients)):
        status = client.status()
        print(f"  {name:26s} {status['peer_id'][:20]}…  {balance:>12s} coins   state {status['state_hash'][:12]}")


def main() -> int:
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="p2pgpu-demo-"))
    print(f"Starting 3 nodes and an Ollama stand-in in {root} ...")
    net = Devnet(root, nodes=3, providers=1, heartbeat_s=1.0, offer_ttl_s=5.0, sync_interval_s=2.0)
    try:
        net.up()
        clients = [node.client() for node in net.nodes]
        took = wait_until(lambda: all(c.status()["peers"] >= 2 for c in clients), 30, "the nodes to meet")
        print(f"All three nodes are connected to each other ({took:.1f} s after start-up).")

        wait_until(lambda: all(c.offers(None) for c in clients), 30, "the offer to spread")
        offer = clients[2].offers(None)[0]
        print(f"\ncarol's offer book holds alice's signed offer (expires in {offer['expires_in_s']:.0f} s unless renewed; alice renews it every second):")
        print(f"  provider {offer['provider'][:20]}…  models {', '.join(m['name'] for m in offer['models'])}")
        print(f"  price {format_coins(offer['price_in'])} / {format_coins(offer['price_out'])} coins per million tokens in/out,"
              f" {offer['slots_free']}/{offer['slots_total']} slots, {'CPU' if offer['cpu'] else 'GPU'}")

        show_balances("Balances before:", clients)
        prompt = "Explain in one paragraph why peer-to-peer GPU markets matter."
        print(f"\nbob submits a job to the network: {MODEL}, {MAX_TOKENS} tokens at most\n  > {prompt}\n")
        done = None
        sys.stdout.write("  ")
        for event in clients[1].submit(MODEL, prompt, max_tokens=MAX_TOKENS):
            if event["type"] == "provider":
                who = "alice" if event["provider"] == net.peer_ids[0] else event["provider"][:16]
                sys.stdout.write(f"[streaming from {who}] ")
            elif event["type"] == "token":
                sys.stdout.write(event["text"])
            elif event["type"] == "done":
                done = event
            elif event["type"] == "error":
                raise SystemExit(f"demo: the job failed: {event['error']}")
            sys.stdout.flush()
        assert done is not None
        rate = f"{done['tokens_per_s']:.0f} tokens/s" if done["tokens_per_s"] else ""
        print(f"\n\n  job done: {done['tokens']} tokens {rate}, cost {format_coins(done['cost'])} coins "
              f"(paid to alice by bob's signed vouchers, claimed against his hold)")

        print("\nand bob sends carol 12.5 coins ...")
        clients[1].send(net.peer_ids[2], 12_500_000, "demo")
        cost = done["cost"]
        want = [format_coins(1_000_000_000 + cost), format_coins(987_500_000 - cost), "1012.5"]
        wait_until(
            lambda: len({c.status()["state_hash"] for c in clients}) == 1 and balances(clients) == want
            and clients[1].wallet(None)["held"] == 0,
            60,
            "every node to agree",
        )
        show_balances("Balances after (identical ledger on every node):", clients)
        print(f"\nDone in {time.monotonic() - start:.1f} s. Each node's log is in {root}.")
        return 0
    finally:
        net.down()
        print("All demo processes stopped.")


if __name__ == "__main__":
    raise SystemExit(main())

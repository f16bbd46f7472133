#!/usr/bin/env python3
"""Three p2pgpu nodes on 127.0.0.1, each its own process: watch them find
each other, see the provider's signed offer reach every node, stream a job's
tokens from the provider's (stand-in) Ollama, and see the coins move by
exactly the job's cost, identically on every node. Everything started is
stopped at the end, by PID.

Every claim it prints has been checked first, against what the nodes report
at that moment: replicas converge in their own time (more slowly on a busy
machine), so the demo waits (with a generous deadline) until they agree and
prints the very answers it checked. When they do not agree in time it says
so, shows what each node reported, and exits with status 1.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2pgpu.core.units import format_coins  # noqa: E402
from p2pgpu.errors import P2PGPUError  # noqa: E402
from p2pgpu.testing.devnet import Devnet  # noqa: E402

NAMES = ["alice (provider, faucet)", "bob", "carol"]
MODEL = "llama3.2:1b"
MAX_TOKENS = 48
SENT = 12_500_000  # bob -> carol, base units
# Generous: a loaded 2-core machine makes the demo slower, not wrong.
MEET_S = 60.0
OFFER_S = 60.0
AGREE_S = 120.0

T = TypeVar("T")


class DemoFailed(Exception):
    """A claim the demo was about to print turned out not to hold in time."""


# ------------------------------------------------------------------ checking


def wait_for(
    poll: Callable[[], T],
    problems: Callable[[T], list[str]],
    timeout: float,
    what: str,
    *,
    describe: Callable[[T], str] = lambda value: "",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    interval: float = 0.1,
) -> tuple[T, float]:
    """Poll until ``problems(poll())`` is empty; returns that polled value
    (the one that was checked, so what is printed is what was checked) and
    the seconds it took. ``DemoFailed`` saying what was still wrong, and
    ``describe`` of the last value, when ``timeout`` passes first."""
    start = clock()
    while True:
        value = poll()
        wrong = problems(value)
        if not wrong:
            return value, clock() - start
        if clock() - start > timeout:
            detail = describe(value)
            raise DemoFailed(
                f"after {timeout:.0f} s, still not true: {what}:\n"
                + "".join(f"  - {line}\n" for line in wrong)
                + (f"what the nodes reported last:\n{detail}" if detail else "")
            )
        sleep(interval)


def disagreements(statuses: Sequence[dict[str, Any]], expect: Sequence[dict[str, int]] | None = None) -> list[str]:
    """Why ``statuses`` (one ``status`` answer per node, in ``NAMES`` order)
    do not show one ledger state on every node, with each node's own account
    as in ``expect`` (keys of ``status``: balance, held, pending_in); empty
    when they do."""
    wrong = []
    hashes = [s["state_hash"] for s in statuses]
    if len(set(hashes)) != 1:
        wrong.append(f"the nodes report {len(set(hashes))} different ledger states: "
                     + ", ".join(f"{name.split()[0]} {h[:12]}" for name, h in zip(NAMES, hashes)))
    for name, status, want in zip(NAMES, statuses, expect or []):
        for key, value in want.items():
            if status[key] != value:
                wrong.append(f"{name.split()[0]}'s {key.replace('_', ' ')} is {format_coins(status[key])}, "
                             f"not {format_coins(value)}")
    return wrong


def missing_offer(books: Sequence[list[dict[str, Any]]], provider: str) -> list[str]:
    """The nodes whose offer book (``offers`` answer) lacks ``provider``'s offer."""
    return [f"{name.split()[0]}'s offer book has no offer from alice" for name, book in zip(NAMES, books)
            if not any(offer["provider"] == provider for offer in book)]


def table(statuses: Sequence[dict[str, Any]]) -> str:
    return "\n".join(
        f"  {name:26s} {s['peer_id'][:20]}…  {format_coins(s['balance']):>12s} coins   state {s['state_hash'][:12]}"
        + (f"   held {format_coins(s['held'])}" if s["held"] else "")
        + (f"   pending in {format_coins(s['pending_in'])}" if s["pending_in"] else "")
        for name, s in zip(NAMES, statuses)
    )


def account(status: dict[str, Any]) -> dict[str, int]:
    return {key: status[key] for key in ("balance", "held", "pending_in")}


# ---------------------------------------------------------------------- demo


def run(net: Devnet, root: Path, start: float) -> None:
    net.up()
    clients = [node.client() for node in net.nodes]
    alice, bob, carol = net.peer_ids

    def statuses() -> list[dict[str, Any]]:
        return [c.status() for c in clients]

    _, took = wait_for(statuses, lambda ss: [f"{name.split()[0]} has {s['peers']} peers, not 2"
                                             for name, s in zip(NAMES, ss) if s["peers"] < 2],
                       MEET_S, "every node connected to the two others")
    print(f"All three nodes are connected to each other ({took:.1f} s after start-up).")

    books, _ = wait_for(lambda: [c.offers(None) for c in clients], lambda b: missing_offer(b, alice),
                        OFFER_S, "alice's offer in every node's offer book")
    offer = next(o for o in books[2] if o["provider"] == alice)
    print(f"\nEvery node's offer book holds alice's signed offer; carol's copy (expires in {offer['expires_in_s']:.0f} s"
          f" unless renewed; alice renews it every {net.heartbeat_s:g} s):")
    print(f"  provider {offer['provider'][:20]}…  models {', '.join(m['name'] for m in offer['models'])}")
    print(f"  price {format_coins(offer['price_in'])} / {format_coins(offer['price_out'])} coins per million tokens"
          f" in/out, {offer['slots_free']}/{offer['slots_total']} slots, {'CPU' if offer['cpu'] else 'GPU'}")

    before, _ = wait_for(statuses, disagreements, AGREE_S, "one ledger state on every node before the job",
                         describe=table)
    print("\nBalances before (the same ledger state on every node):")
    print(table(before))

    prompt = "Explain in one paragraph why peer-to-peer GPU markets matter."
    print(f"\nbob submits a job to the network: {MODEL}, {MAX_TOKENS} tokens at most\n  > {prompt}\n")
    done = None
    sys.stdout.write("  ")
    for event in clients[1].submit(MODEL, prompt, max_tokens=MAX_TOKENS):
        if event["type"] == "provider":
            who = "alice" if event["provider"] == alice else event["provider"][:16]
            sys.stdout.write(f"[streaming from {who}] ")
        elif event["type"] == "token":
            sys.stdout.write(event["text"])
        elif event["type"] == "done":
            done = event
        elif event["type"] == "error":
            raise DemoFailed(f"the job failed: {event['error']}")
        sys.stdout.flush()
    if done is None:
        raise DemoFailed("the job's stream ended without a result")
    if done.get("provider") != alice:
        raise DemoFailed(f"the job ran on {done.get('provider')}, not on alice")
    cost = done["cost"]
    rate = f", {done['tokens_per_s']:.0f} tokens/s" if done["tokens_per_s"] else ""
    print(f"\n\n  job done: {done['tokens']} tokens{rate}, cost {format_coins(cost)} coins")

    print(f"\nand bob sends carol {format_coins(SENT)} coins ...")
    clients[1].send(carol, SENT, "demo")
    # what must hold once everything has settled: alice claimed exactly the
    # job's cost against bob's hold, bob took the rest of the hold back, carol
    # took the coins in; nothing left held or pending anywhere
    alice0, bob0, carol0 = (s["balance"] for s in before)
    expect = [{"balance": alice0 + cost, "held": 0, "pending_in": 0},
              {"balance": bob0 - cost - SENT, "held": 0, "pending_in": 0},
              {"balance": carol0 + SENT, "held": 0, "pending_in": 0}]
    after, took = wait_for(statuses, lambda ss: disagreements(ss, expect), AGREE_S,
                           "one ledger state on every node, with the coins moved by exactly the job's cost",
                           describe=table)
    # the ledger is one on every node, so carol's replica shows alice's claim
    claims = [line for line in clients[2].wallet(alice)["history"]
              if line["kind"] == "claim" and line["counterparty"] == bob]
    if [line["amount"] for line in claims] != [cost]:
        raise DemoFailed(f"alice's claims on bob's holds are {[line['amount'] for line in claims]}, not [{cost}]")
    print(f"\nBalances after (identical ledger on every node, {took:.1f} s after the send):")
    print(table(after))
    print(f"\n  alice +{format_coins(cost)}: her claim, with bob's signed voucher, on his hold for the job;"
          f"\n  bob   -{format_coins(cost)} for the job (the rest of the hold came back) and -{format_coins(SENT)} to carol;"
          f"\n  carol +{format_coins(SENT)}; nothing is held or pending anywhere.")
    print(f"\nDone in {time.monotonic() - start:.1f} s. Each node's log is in {root}.")


def main() -> int:
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="p2pgpu-demo-"))
    print(f"Starting 3 nodes and an Ollama stand-in in {root} ...")
    net = Devnet(root, nodes=3, providers=1, heartbeat_s=1.0, offer_ttl_s=5.0, sync_interval_s=2.0)
    code = 1
    try:
        run(net, root, start)
        code = 0
    except DemoFailed as exc:
        sys.stdout.flush()
        print(f"\ndemo FAILED: {exc}".rstrip() + f"\n(each node's log is in {root})", file=sys.stderr)
    except P2PGPUError as exc:
        sys.stdout.flush()
        print(f"\ndemo FAILED: a node's local API: {exc}\n(each node's log is in {root})", file=sys.stderr)
    finally:
        try:
            net.down()
        finally:
            left = net.running()
            if left:
                sys.stdout.flush()
                print("demo: still running after SIGKILL: "
                      + ", ".join(f"{p.name} (pid {p.pid})" for p in left), file=sys.stderr)
                code = 1
            else:
                print("All demo processes stopped.")
    return code


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(prog="scripts/demo", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    raise SystemExit(main())

"""A fake node behind the local API: ``FakeNodeView``, for tests of the
API, its client and the CLI without a network.

It fits ``p2pgpu.api.NodeView`` (the seam the daemon fills), with a few
fixed facts and a working wallet, so tests of the HTTP layer and of the
CLI's rendering need no libp2p host, ledger or Ollama. Shipped in the
package, like ``trio.testing``, so tests and tools share one fake.
"""

from __future__ import annotations

import hashlib
from typing import Any

import trio

from p2pgpu.core.units import format_coins
from p2pgpu.errors import InsufficientFunds, LedgerRuleViolation
from p2pgpu.testing.ledger import START_MS, key_for

__all__ = ["ALICE", "BOB", "CAROL", "NETWORK_ID", "TOKEN", "FakeNodeView"]

ALICE, BOB, CAROL = (key_for(name).peer_id for name in ("alice", "bob", "carol"))
TOKEN = "5eed" * 16
NETWORK_ID = "ab" * 32


class FakeNodeView:
    """A ``NodeView`` for alice's node with a few fixed facts and a working
    wallet: ``send`` moves coins and records history, ``faucet`` mints when
    the node holds the faucet key.

    ``calls`` records every call; ``fail_next`` makes the next call raise
    the given exception (a ``P2PGPUError`` or a bug); ``misbehave`` makes
    ``status`` return something JSON cannot hold. Each call also checks that
    it runs on the trio thread, as the API promises the daemon (pass
    ``on_trio_thread=False`` for a copy that only supplies expected answers).
    """

    def __init__(self, *, balance: int = 12_500_000, faucet: bool = False, on_trio_thread: bool = True) -> None:
        self.on_trio_thread = on_trio_thread
        self.peer_id = ALICE
        self.balance = balance
        self.held = 1_000_000
        self.pending_in = 250_000
        self.is_faucet = faucet
        self.calls: list[tuple[Any, ...]] = []
        self.fail_next: BaseException | None = None
        self.misbehave = False
        # When set, `send` signals `send_entered` and then waits for the gate.
        self.send_gate: trio.Event | None = None
        self.send_entered = trio.Event() if on_trio_thread else None
        self._seq = 2
        self.history: list[dict[str, Any]] = [
            {
                "id": "11" * 32,
                "seq": 2,
                "kind": "send",
                "timestamp_ms": START_MS + 60_000,
                "counterparty": CAROL,
                "amount": 500_000,
                "memo": "tea \x1b[31mred",
                "direction": "out",
            },
            {
                "id": "22" * 32,
                "seq": 1,
                "kind": "receive",
                "timestamp_ms": START_MS,
                "counterparty": BOB,
                "amount": 13_000_000,
                "memo": "welcome",
                "direction": "in",
            },
        ]

    def _enter(self, *call: Any) -> None:
        if self.on_trio_thread:
            trio.lowlevel.current_trio_token()  # RuntimeError off the trio thread
        self.calls.append(call)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error

    def status(self) -> dict[str, Any]:
        self._enter("status")
        if self.misbehave:
            return {"peer_id": object()}
        return {
            "version": "0.1.0",
            "peer_id": self.peer_id,
            "network": {"id": NETWORK_ID, "name": "testnet"},
            "listen_addrs": ["/ip4/127.0.0.1/tcp/4001", "/ip4/10.0.0.5/tcp/4001"],
            "peers": 2,
            "offers_seen": 2,
            "role": "both",
            "faucet": self.is_faucet,
            "balance": self.balance,
            "held": self.held,
            "pending_in": self.pending_in,
            "spendable": self.balance,
            "entries": 42,
            "frozen": [CAROL],
            "uptime_s": 3_725.5,
            "state_hash": "cd" * 32,  # a view's own extra, passed through
        }

    def peers(self) -> list[dict[str, Any]]:
        self._enter("peers")
        return [
            {
                "peer_id": BOB,
                "addrs": ["/ip4/10.0.0.7/tcp/4001", "/ip4/192.168.1.7/tcp/4001"],
                "connected": True,
                "since_s": 125.0,
                "bootstrap": True,
            },
            {"peer_id": CAROL, "addrs": [], "connected": False, "since_s": None, "bootstrap": False},
        ]

    def offers(self, model: str | None) -> list[dict[str, Any]]:
        self._enter("offers", model)
        every = [
            {
                "provider": BOB,
                "models": [{"name": "llama3.2:3b", "warm": True}, {"name": "qwen2.5:7b", "warm": False}],
                "gpus": [
                    {"name": "NVIDIA GeForce RTX 4090", "vram_total": 24 * 2**30, "vram_free": 20 * 2**30, "util": 3}
                ],
                "price_in": 500_000,
                "price_out": 1_500_000,
                "slots_free": 1,
                "slots_total": 2,
                "expires_in_s": 25.0,
                "cpu": False,
            },
            {
                "provider": CAROL,
                "models": [{"name": "qwen2.5:7b", "warm": True}],
                "gpus": [],
                "price_in": 100_000,
                "price_out": 200_000,
                "slots_free": 4,
                "slots_total": 4,
                "expires_in_s": 55.0,
                "cpu": True,
            },
        ]
        return [o for o in every if model is None or any(m["name"] == model for m in o["models"])]

    def wallet(self, account: str | None) -> dict[str, Any]:
        self._enter("wallet", account)
        if account not in (None, self.peer_id):
            return {
                "account": account,
                "balance": 0,
                "held": 0,
                "pending_in": 0,
                "spendable": 0,
                "frozen": account == CAROL,
                "history": [],
            }
        return {
            "account": self.peer_id,
            "balance": self.balance,
            "held": self.held,
            "pending_in": self.pending_in,
            "spendable": self.balance,
            "frozen": False,
            "history": list(self.history),
        }

    def _record(self, kind: str, to: str, amount: int, memo: str) -> dict[str, Any]:
        self._seq += 1
        entry_id = hashlib.sha256(f"{kind}{self._seq}{to}{amount}".encode()).hexdigest()
        self.history.insert(
            0,
            {
                "id": entry_id,
                "seq": self._seq,
                "kind": kind,
                "timestamp_ms": START_MS + self._seq * 1000,
                "counterparty": None if kind == "mint" else to,
                "amount": amount,
                "memo": memo,
                "direction": "in" if kind == "mint" else "out",
            },
        )
        return {"entry_id": entry_id, "amount": amount, "to": to}

    async def send(self, to: str, amount: int, memo: str) -> dict[str, Any]:
        self._enter("send", to, amount, memo)
        await trio.lowlevel.checkpoint()
        if self.send_gate is not None:
            assert self.send_entered is not None
            self.send_entered.set()
            await self.send_gate.wait()
        if amount > self.balance:
            raise InsufficientFunds(
                f"sending {format_coins(amount)} coins needs more than the {format_coins(self.balance)} spendable"
            )
        self.balance -= amount
        return self._record("send", to, amount, memo)

    async def faucet(self, to: str, amount: int) -> dict[str, Any]:
        self._enter("faucet", to, amount)
        await trio.lowlevel.checkpoint()
        if not self.is_faucet:
            raise LedgerRuleViolation("this node does not hold the network's faucet key")
        if to == self.peer_id:
            self.balance += amount
        return self._record("mint", to, amount, "faucet")

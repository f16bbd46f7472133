"""An account's statement reads every kind of entry the same way the wallet
shows it: amounts, counterparties and directions, newest first."""

from __future__ import annotations

from p2pgpu.core.ledger import BASIS_CLAIM, Ledger, make_voucher
from p2pgpu.testing.ledger import START_MS, key_for, make_genesis

alice, bob, faucet = key_for("alice"), key_for("bob"), key_for("faucet")


def test_statement_lines_for_every_kind(store_factory):
    genesis = make_genesis()
    ledger = Ledger(store_factory(), genesis)
    ledger.mint(faucet, 50, START_MS, "drip")
    sent = ledger.send(alice, bob.public_key, 100, START_MS + 1, "lunch")
    ledger.receive(bob, sent.id, START_MS + 2)
    hold = ledger.hold(alice, bob.public_key, 300, START_MS + 5_000, b"job", START_MS + 3)
    claim = ledger.claim(bob, hold.id, make_voucher(alice, genesis.network_id, hold.id, 120, START_MS + 4), START_MS + 5)
    ledger.release(alice, hold.id, BASIS_CLAIM, claim.id, START_MS + 6)

    alice_lines = [(l.kind, l.direction, l.amount, l.counterparty, l.memo) for l in ledger.statement(alice.public_key)]
    assert alice_lines == [
        ("release", "in", 180, bob.public_key, ""),
        ("hold", "out", 300, bob.public_key, ""),
        ("send", "out", 100, bob.public_key, "lunch"),
    ]
    bob_lines = [(l.kind, l.direction, l.amount, l.counterparty, l.memo) for l in ledger.statement(bob.public_key)]
    assert bob_lines == [("claim", "in", 120, alice.public_key, ""), ("receive", "in", 100, alice.public_key, "lunch")]
    assert [(l.kind, l.amount, l.counterparty) for l in ledger.statement(faucet.public_key)] == [("mint", 50, None)]
    assert [l.seq for l in ledger.statement(alice.public_key, last=2)] == [3, 2]


def test_an_account_takes_in_coins_only_when_sends_wait_and_its_chain_is_not_frozen():
    from p2pgpu.core.kv import MemoryStore
    from p2pgpu.core.ledger import Ledger
    from p2pgpu.testing.ledger import START_MS, key_for, make_genesis

    alice, bob = key_for("alice"), key_for("bob")
    ledger = Ledger(MemoryStore(), make_genesis())
    assert not ledger.can_take_in(bob.public_key)  # nothing sent to it
    ledger.send(alice, bob.public_key, 10, START_MS)
    assert ledger.can_take_in(bob.public_key)
    ledger.receive_all(bob, START_MS + 1)
    assert not ledger.can_take_in(bob.public_key)

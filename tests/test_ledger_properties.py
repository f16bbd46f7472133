"""The eleven ledger properties of shared/reference/ledger-anchors.md, each
pinned on both stores (the ``store_factory`` fixture runs every test twice:
in-memory and real LevelDB). Property 9 (crash) lives in test_ledger_crash.py.

Scenarios come from ``p2pgpu.testing.ledger.LedgerSim``: Hypothesis picks a
list of operations, the simulator turns it into a legal (sometimes hostile)
history, and replicas receive that history in other orders.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pgpu.core.codec import Tag, sign_object
from p2pgpu.core.genesis import Genesis
from p2pgpu.core.ledger import (
    BASIS_CLAIM,
    BASIS_TIMEOUT,
    BASIS_WAIVER,
    FROZEN_EQUIVOCATION,
    FROZEN_FORK,
    SEND,
    Ledger,
    decode_entry,
    make_voucher,
    make_waiver,
    parse_entry,
)
from p2pgpu.errors import (
    BadSignature,
    InsufficientFunds,
    LedgerRuleViolation,
    MalformedInput,
    P2PGPUError,
    WrongNetwork,
)
from p2pgpu.testing.ledger import START_MS, LedgerSim, key_for, make_genesis, operations, replay

PROPERTY = settings(
    max_examples=75,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LATER = START_MS + 10**9
alice, bob, carol, faucet = key_for("alice"), key_for("bob"), key_for("carol"), key_for("faucet")


def snapshot(store) -> dict:
    return store.dump()


def assert_conserved(ledger: Ledger) -> None:
    total, minted = ledger.conservation()
    assert total == minted, f"coins not conserved: accounts hold {total}, minted {minted}"


# 1. Convergence --------------------------------------------------------------


@PROPERTY
@given(ops=operations(), seed=st.integers(0, 2**32), dup_rate=st.floats(0, 0.5), cut=st.floats(0, 1))
def test_convergence_under_permutation_duplication_and_partition(store_factory, ops, seed, dup_rate, cut):
    sim = LedgerSim()
    wires = sim.run(ops)
    expected = sim.world.state_hash()
    rng = random.Random(seed)

    shuffled = wires + [w for w in wires if rng.random() < dup_rate]
    rng.shuffle(shuffled)
    assert replay(shuffled, store_factory(), sim.genesis).state_hash() == expected

    # A partition: two replicas each see part of the history, then heal by
    # exchanging everything they have, in reverse order for good measure.
    split = int(len(wires) * cut)
    left = replay(wires[:split], store_factory(), sim.genesis)
    right = replay(list(reversed(wires[split:])), store_factory(), sim.genesis)
    for wire in reversed(wires[:split]):
        right.offer(wire, LATER)
    for wire in wires[split:]:
        left.offer(wire, LATER)
    assert left.state_hash() == right.state_hash() == expected


# 2. Conservation ---------------------------------------------------------------


@PROPERTY
@given(ops=operations())
def test_conservation_balances_plus_held_plus_pending_equal_minted(store_factory, ops):
    sim = LedgerSim(store=store_factory())
    sim.run(ops)
    assert_conserved(sim.world)
    assert sim.world.minted >= sim.genesis.total_allocated


@PROPERTY
@given(ops=operations(hostile=False))
def test_honest_histories_settle_exactly_what_each_chain_can_spend(store_factory, ops):
    sim = LedgerSim(store=store_factory())
    sim.run(ops)
    for account in sim.world.accounts():
        assert account.frozen is None
        assert account.balance >= 0 and account.held >= 0 and account.pending_in >= 0
        assert account.balance == sim.world.spendable(account.public_key)


# 3. Forgery --------------------------------------------------------------------


@PROPERTY
@given(ops=operations(max_size=12), pick=st.integers(0, 10**6), bit=st.integers(0, 10**6))
def test_flipped_bits_are_rejected_and_change_nothing(store_factory, ops, pick, bit):
    sim = LedgerSim()
    wires = sim.run(ops)
    if not wires:
        return
    index = pick % len(wires)
    # The replica holds everything before the target, so the genuine entry
    # would apply; any flipped bit must be refused and leave no trace.
    replica = replay(wires[:index], store_factory(), sim.genesis)
    before = snapshot(replica._kv.store)
    wire = bytearray(wires[index])
    position = bit % (len(wire) * 8)
    wire[position // 8] ^= 1 << (position % 8)
    with pytest.raises(P2PGPUError):
        replica.offer(bytes(wire), LATER)
    replica.commit()
    assert snapshot(replica._kv.store) == before
    assert len(replica.unchecked) == 0  # forgeries are never parked
    assert replica.offer(wires[index], LATER).status == "applied"


def test_wrong_author_and_wrong_network_are_rejected(store_factory):
    genesis = make_genesis()
    ledger = Ledger(store_factory(), genesis)
    before = snapshot(ledger._kv.store)
    # bob signs an entry that claims to be alice's
    payload_fields = [1, b"", SEND, [carol.public_key, 10, ""]]
    forged = sign_object(bob, Tag.ENTRY, genesis.network_id, START_MS, payload_fields)
    forged_wire = forged.wire.replace(bob.public_key, alice.public_key)
    with pytest.raises(BadSignature):
        ledger.offer(forged_wire, LATER)
    # a perfectly valid entry of another network
    other = Ledger(store_factory(), make_genesis(name="othernet"))
    foreign = other.send(alice, bob.public_key, 10, START_MS)
    with pytest.raises(WrongNetwork):
        ledger.offer(foreign.wire, LATER)
    ledger.commit()
    assert snapshot(ledger._kv.store) == before


# 4. Order ----------------------------------------------------------------------


def test_missing_predecessor_waits_then_applies(store_factory):
    genesis = make_genesis()
    author = Ledger(store_factory(), genesis)
    first = author.send(alice, bob.public_key, 10, START_MS)
    second = author.send(alice, carol.public_key, 20, START_MS + 1)
    replica = Ledger(store_factory(), genesis)
    waiting = replica.offer(second.wire, LATER)
    assert waiting.status == "waiting" and waiting.missing == first.id
    assert replica.account(alice.public_key).entries == 0
    applied = replica.offer(first.wire, LATER)
    assert applied.status == "applied"
    assert [e.id for e in applied.applied] == [first.id, second.id]
    assert replica.state_hash() == author.state_hash()


def test_bad_prev_is_rejected(store_factory):
    genesis = make_genesis()
    author = Ledger(store_factory(), genesis)
    first = author.send(alice, bob.public_key, 10, START_MS)
    author.send(alice, bob.public_key, 10, START_MS + 1)
    replica = replay([e for e in author.chain(alice.public_key)], store_factory(), genesis)
    before = replica.state_hash()
    # seq 3 whose prev names seq 1 instead of seq 2
    bad = sign_object(alice, Tag.ENTRY, genesis.network_id, START_MS + 2, [3, first.id, SEND, [bob.public_key, 1, ""]])
    with pytest.raises(LedgerRuleViolation, match="prev"):
        replica.offer(bad.wire, LATER)
    # timestamps must not go backwards along a chain
    back = sign_object(alice, Tag.ENTRY, genesis.network_id, START_MS - 5, [3, author.head(alice.public_key)[1], SEND, [bob.public_key, 1, ""]])
    with pytest.raises(LedgerRuleViolation, match="timestamp"):
        replica.offer(back.wire, LATER)
    assert replica.state_hash() == before


def test_future_timestamps_wait_for_the_clock(store_factory):
    genesis = make_genesis()
    author = Ledger(store_factory(), genesis)
    far = START_MS + 10 * genesis.params.max_clock_skew_ms
    entry = author.send(alice, bob.public_key, 10, far)
    replica = Ledger(store_factory(), genesis)
    assert replica.offer(entry.wire, START_MS).status == "waiting"
    assert replica.tick(START_MS) == []
    assert [e.id for e in replica.tick(far)] == [entry.id]


# 5. Replay ---------------------------------------------------------------------


@PROPERTY
@given(ops=operations(max_size=15))
def test_duplicates_change_nothing(store_factory, ops):
    sim = LedgerSim()
    wires = sim.run(ops)
    replica = replay(wires, store_factory(), sim.genesis)
    before = snapshot(replica._kv.store)
    for wire in wires:
        assert replica.offer(wire, LATER).status == "duplicate"
    replica.commit()
    assert snapshot(replica._kv.store) == before


def test_stale_and_foreign_vouchers_are_rejected(store_factory):
    genesis = make_genesis()
    ledger = Ledger(store_factory(), genesis)
    hold = ledger.hold(alice, bob.public_key, 500, START_MS + 5_000, b"j1", START_MS)
    other_hold = ledger.hold(alice, bob.public_key, 100, START_MS + 5_000, b"j2", START_MS)
    ledger.claim(bob, hold.id, make_voucher(alice, genesis.network_id, hold.id, 100, START_MS + 1), START_MS + 2)
    before = ledger.state_hash()
    later_voucher = make_voucher(alice, genesis.network_id, hold.id, 300, START_MS + 3)
    with pytest.raises(LedgerRuleViolation, match="already claimed"):
        ledger.claim(bob, hold.id, later_voucher, START_MS + 4)
    foreign = make_voucher(alice, genesis.network_id, other_hold.id, 50, START_MS + 3)
    with pytest.raises(LedgerRuleViolation, match="another hold"):
        ledger.claim(bob, hold.id, foreign, START_MS + 4)
    forged = make_voucher(carol, genesis.network_id, other_hold.id, 50, START_MS + 3)
    with pytest.raises(LedgerRuleViolation, match="consumer"):
        ledger.claim(bob, other_hold.id, forged, START_MS + 4)
    assert ledger.state_hash() == before


# 6. Double spend ---------------------------------------------------------------


def test_double_spend_is_flagged_by_every_replica_and_they_agree(store_factory):
    genesis = make_genesis()
    world = Ledger(store_factory(), genesis)
    to_bob = world.send(alice, bob.public_key, 800, START_MS)
    to_carol = parse_entry(
        sign_object(alice, Tag.ENTRY, genesis.network_id, START_MS, [1, b"", SEND, [carol.public_key, 800, "double"]])
    )
    assert world.offer_entry(to_carol, START_MS).forks == (alice.public_key,)
    bob_takes = world.receive(bob, to_bob.id, START_MS + 1)
    carol_takes = world.receive(carol, to_carol.id, START_MS + 1)

    branch_one = [to_bob.wire, bob_takes.wire]
    branch_two = [to_carol.wire, carol_takes.wire]
    one_only = replay(branch_one, store_factory(), genesis)
    assert one_only.frozen() == {}  # no proof yet: nothing to flag

    first = replay(branch_one + branch_two, store_factory(), genesis)
    second = replay(branch_two + branch_one, store_factory(), genesis)
    for replica in (first, second, world):
        assert replica.frozen() == {alice.public_key: FROZEN_FORK}
        assert_conserved(replica)
        # both honest recipients keep what they received; alice carries the loss
        assert replica.account(bob.public_key).balance == 1_800
        assert replica.account(carol.public_key).balance == 1_800
        assert replica.account(alice.public_key).balance == 1_000 - 1_600
    assert first.state_hash() == second.state_hash() == world.state_hash()
    with pytest.raises(LedgerRuleViolation, match="frozen"):
        world.send(alice, bob.public_key, 1, START_MS + 2)


# 7. Overspend, non-positive amounts, double receive ---------------------------


def test_overspend_nonpositive_and_double_receive_are_rejected(store_factory):
    genesis = make_genesis()
    ledger = Ledger(store_factory(), genesis)
    with pytest.raises(InsufficientFunds, match=r"needs 0\.001001 coins but only 0\.001 are spendable"):
        ledger.send(alice, bob.public_key, 1_001, START_MS)  # people read coins, not base units
    for amount in (0, -5):
        with pytest.raises(MalformedInput):
            ledger.send(alice, bob.public_key, amount, START_MS)
        raw = sign_object(alice, Tag.ENTRY, genesis.network_id, START_MS, [1, b"", SEND, [bob.public_key, amount, ""]])
        with pytest.raises(MalformedInput):
            ledger.offer(raw.wire, LATER)
    overspend = sign_object(alice, Tag.ENTRY, genesis.network_id, START_MS, [1, b"", SEND, [bob.public_key, 5_000, ""]])
    with pytest.raises(InsufficientFunds):
        ledger.offer(overspend.wire, LATER)
    sent = ledger.send(alice, bob.public_key, 100, START_MS)
    ledger.receive(bob, sent.id, START_MS + 1)
    with pytest.raises(LedgerRuleViolation, match="already received"):
        ledger.receive(bob, sent.id, START_MS + 2)
    with pytest.raises(LedgerRuleViolation, match="someone else"):
        ledger.receive(carol, sent.id, START_MS + 2)
    assert ledger.account(bob.public_key).balance == 1_100
    assert_conserved(ledger)


# 8. Escrow ---------------------------------------------------------------------


def test_escrow_pays_at_most_the_hold_and_locks_it(store_factory):
    genesis = make_genesis()
    ledger = Ledger(store_factory(), genesis)
    expiry = START_MS + 5_000
    hold = ledger.hold(alice, bob.public_key, 700, expiry, b"job", START_MS)
    with pytest.raises(InsufficientFunds):
        ledger.send(alice, carol.public_key, 400, START_MS + 1)  # held coins are not spendable
    too_much = make_voucher(alice, genesis.network_id, hold.id, 701, START_MS + 1)
    with pytest.raises(LedgerRuleViolation, match="exceeds"):
        ledger.claim(bob, hold.id, too_much, START_MS + 2)
    voucher = make_voucher(alice, genesis.network_id, hold.id, 250, START_MS + 1)
    with pytest.raises(LedgerRuleViolation, match="after the hold expired"):
        ledger.claim(bob, hold.id, voucher, expiry + 1)
    with pytest.raises(LedgerRuleViolation, match="provider"):
        ledger.claim(carol, hold.id, voucher, START_MS + 2)
    claim = ledger.claim(bob, hold.id, voucher, START_MS + 2)
    assert ledger.account(bob.public_key).balance == 1_250
    assert ledger.account(alice.public_key).held == 450
    ledger.release(alice, hold.id, BASIS_CLAIM, claim.id, START_MS + 3)
    state = ledger.account(alice.public_key)
    assert (state.balance, state.held) == (750, 0)
    with pytest.raises(LedgerRuleViolation, match="already released"):
        ledger.release(alice, hold.id, BASIS_TIMEOUT, b"", expiry + 10**6)
    assert_conserved(ledger)


def test_timeout_release_waits_for_grace_and_wins_over_a_late_claim(store_factory):
    genesis = make_genesis()
    ledger = Ledger(store_factory(), genesis)
    expiry = START_MS + 5_000
    hold = ledger.hold(alice, bob.public_key, 300, expiry, b"job", START_MS)
    with pytest.raises(LedgerRuleViolation, match="grace"):
        ledger.release(alice, hold.id, BASIS_TIMEOUT, b"", expiry + 1)
    release_time = expiry + genesis.params.release_grace_ms + 1
    ledger.release(alice, hold.id, BASIS_TIMEOUT, b"", release_time)
    assert ledger.account(alice.public_key).balance == 1_000
    # bob was offline; his claim, stamped before expiry, surfaces afterwards
    voucher = make_voucher(alice, genesis.network_id, hold.id, 300, START_MS + 10)
    ledger.claim(bob, hold.id, voucher, START_MS + 20)
    assert ledger.hold_status(hold.id) == (0, 300)  # the release won: the claim is void
    assert ledger.account(bob.public_key).balance == 1_000
    assert_conserved(ledger)


def test_waiver_then_claim_is_equivocation(store_factory):
    genesis = make_genesis()
    ledger = Ledger(store_factory(), genesis)
    hold = ledger.hold(alice, bob.public_key, 300, START_MS + 5_000, b"job", START_MS)
    waiver = make_waiver(bob, genesis.network_id, hold.id, "no slot free", START_MS + 1)
    forged_waiver = make_waiver(carol, genesis.network_id, hold.id, "not mine to give", START_MS + 1)
    with pytest.raises(LedgerRuleViolation, match="waiver"):
        ledger.release(alice, hold.id, BASIS_WAIVER, forged_waiver.wire, START_MS + 2)
    ledger.release(alice, hold.id, BASIS_WAIVER, waiver.wire, START_MS + 2)
    assert ledger.account(alice.public_key).balance == 1_000
    voucher = make_voucher(alice, genesis.network_id, hold.id, 300, START_MS + 1)
    ledger.claim(bob, hold.id, voucher, START_MS + 3)
    assert ledger.frozen() == {bob.public_key: FROZEN_EQUIVOCATION}
    assert ledger.account(bob.public_key).balance == 1_000  # the claim pays nothing
    assert_conserved(ledger)


@PROPERTY
@given(ops=operations())
def test_no_hold_ever_pays_out_more_than_it_locked(store_factory, ops):
    sim = LedgerSim(store=store_factory())
    sim.run(ops)
    for hold in sim.holds:
        status = sim.world.hold_status(hold.entry.id)
        if status is not None:
            payout, refund = status
            assert 0 <= payout <= hold.amount and 0 <= refund and payout + refund <= hold.amount


# 10. Bootstrap from a hostile peer --------------------------------------------


@PROPERTY
@given(ops=operations(), seed=st.integers(0, 2**32))
def test_a_withholding_forging_peer_cannot_change_honest_state(store_factory, ops, seed):
    sim = LedgerSim()
    wires = sim.run(ops)
    rng = random.Random(seed)
    replica = Ledger(store_factory(), sim.genesis)
    mallory = key_for("mallory")
    served = [w for w in wires if rng.random() < 0.6]  # withholds the rest
    rng.shuffle(served)
    for wire in served:
        tampered = bytearray(wire)
        tampered[-1 - rng.randrange(64)] ^= 0xFF  # break the signature
        with pytest.raises(BadSignature):
            replica.offer(bytes(tampered), LATER)
        entry = decode_entry(wire, sim.genesis.network_id)
        # mallory re-signs an honest author's entry as if it were theirs
        stolen = sign_object(mallory, Tag.ENTRY, sim.genesis.network_id, entry.timestamp_ms, list(entry.signed.fields))
        with pytest.raises(P2PGPUError):
            replica.offer(stolen.wire.replace(mallory.public_key, entry.author), LATER)
        replica.offer(wire, LATER)
    # honest peers then serve the whole history
    for wire in wires:
        replica.offer(wire, LATER)
    assert replica.state_hash() == sim.world.state_hash()


# 11. Rebuild -------------------------------------------------------------------


@PROPERTY
@given(ops=operations())
def test_rebuild_reproduces_derived_state_exactly(store_factory, ops):
    sim = LedgerSim(store=store_factory())
    sim.run(ops)
    before = sim.world.state_hash()
    sim.world.rebuild()
    assert sim.world.state_hash() == before
    assert_conserved(sim.world)


def test_reopening_a_store_keeps_state(tmp_path):
    from p2pgpu.store import LevelDBStore

    sim = LedgerSim(store=LevelDBStore(tmp_path / "db"))
    sim.run([(1, 0, 1, 50, 0), (2, 1, 0, 1, 0), (3, 1, 2, 100, 0), (4, 0, 0, 3, 0), (5, 0, 0, 0, 0)])
    before = sim.world.state_hash()
    sim.world.close()
    reopened = Ledger(LevelDBStore(tmp_path / "db"), sim.genesis)
    assert reopened.state_hash() == before
    reopened.close()
    with pytest.raises(P2PGPUError, match="network"):
        Ledger(LevelDBStore(tmp_path / "db"), make_genesis(name="othernet"))

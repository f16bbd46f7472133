"""Every way a signed object can be malformed gets its own typed error, from
the decoder and from the ledger, and a rejected entry leaves the store
byte-for-byte unchanged (on both stores)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.core.codec import MAX_SIGNED_SIZE, Tag, decode_signed, pack, sign_object
from p2pgpu.core.identity import NodeKey, peer_id_from_public_key, public_key_from_peer_id
from p2pgpu.core.ledger import MAX_ENTRY_SIZE, SEND, Ledger, decode_entry
from p2pgpu.errors import (
    BadSignature,
    MalformedInput,
    NonCanonical,
    Oversized,
    P2PGPUError,
    Truncated,
    UnknownType,
    WrongNetwork,
)
from p2pgpu.testing.ledger import START_MS, key_for, make_genesis

GENESIS = make_genesis()
NET = GENESIS.network_id
alice, bob = key_for("alice"), key_for("bob")


def entry_payload(**override) -> list:
    fields = {
        "tag": Tag.ENTRY, "version": 1, "net": NET, "signer": alice.public_key, "ts": START_MS,
        "seq": 1, "prev": b"", "kind": SEND, "body": [bob.public_key, 5, ""],
    }
    fields.update(override)
    return list(fields.values())


def signed_wire(payload_value, key: NodeKey = alice, raw_payload: bytes | None = None) -> bytes:
    payload = raw_payload if raw_payload is not None else pack(payload_value)
    return pack([payload, key.sign(payload)])


GOOD = signed_wire(entry_payload())

MALFORMED: list[tuple[str, bytes, type[P2PGPUError]]] = [
    ("empty input", b"", Truncated),
    ("truncated object", GOOD[:-10], Truncated),
    ("truncated payload", pack([pack(entry_payload())[:-3], b"\0" * 64]), Truncated),
    ("trailing bytes", GOOD + b"\x00", MalformedInput),
    ("not msgpack", b"\xc1\xc1\xc1", MalformedInput),
    ("a map, not an array", pack({"payload": b"x", "sig": b"y"}), MalformedInput),
    ("three items", pack([b"p", b"s" * 64, b"extra"]), MalformedInput),
    ("signature too short", pack([pack(entry_payload()), b"s" * 10]), MalformedInput),
    ("payload is a string", pack(["payload", b"s" * 64]), MalformedInput),
    ("timestamp is a float", signed_wire(entry_payload(ts=1.5)), MalformedInput),
    ("negative timestamp", signed_wire(entry_payload(ts=-1)), MalformedInput),
    ("network id too short", signed_wire(entry_payload(net=b"x" * 8)), MalformedInput),
    ("amount is a string", signed_wire(entry_payload(body=[bob.public_key, "5", ""])), MalformedInput),
    ("amount is a bool", signed_wire(entry_payload(body=[bob.public_key, True, ""])), MalformedInput),
    ("amount too large", signed_wire(entry_payload(body=[bob.public_key, 2**63, ""])), MalformedInput),
    ("recipient wrong size", signed_wire(entry_payload(body=[b"short", 5, ""])), MalformedInput),
    ("body too long", signed_wire(entry_payload(body=[bob.public_key, 5, "", "x"])), MalformedInput),
    ("memo too long", signed_wire(entry_payload(body=[bob.public_key, 5, "m" * 300])), MalformedInput),
    ("prev on first entry", signed_wire(entry_payload(prev=b"p" * 32)), MalformedInput),
    ("unknown kind", signed_wire(entry_payload(kind=99)), MalformedInput),
    ("unknown type tag", signed_wire(entry_payload(tag=200)), UnknownType),
    ("unknown version", signed_wire(entry_payload(version=9)), UnknownType),
    ("an offer where an entry belongs", signed_wire(entry_payload(tag=Tag.OFFER)), UnknownType),
    ("oversized", pack([b"x" * (MAX_SIGNED_SIZE + 1), b"s" * 64]), Oversized),
    ("extension type", pack([msgpack.ExtType(5, b"x"), b"s" * 64]), MalformedInput),
    ("wrong network", signed_wire(entry_payload(net=make_genesis(name="elsewhere").network_id)), WrongNetwork),
    ("bad signature", pack([pack(entry_payload()), b"\1" * 64]), BadSignature),
    ("signed by someone else", signed_wire(entry_payload(), key=bob), BadSignature),
    # 5 packed as a 64-bit integer instead of a fixint: same value, other bytes
    (
        "non-canonical integer",
        signed_wire(None, raw_payload=pack(entry_payload())[:-1].replace(b"\xc4\x20" + bob.public_key + b"\x05", b"\xc4\x20" + bob.public_key + b"\xcf" + (5).to_bytes(8, "big")) + b"\xa0"),
        NonCanonical,
    ),
]


def test_the_good_entry_decodes():
    entry = decode_entry(GOOD, NET)
    assert entry.seq == 1 and entry.body.amount == 5 and entry.wire == GOOD


@pytest.mark.parametrize("name,wire,error", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_decoder_gives_a_typed_error(name, wire, error):
    with pytest.raises(error):
        decode_entry(wire, NET)


@pytest.mark.parametrize("name,wire,error", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_ledger_rejects_and_changes_nothing(store_factory, name, wire, error):
    ledger = Ledger(store_factory(), GENESIS)
    before = ledger._kv.store.dump()
    with pytest.raises(error):
        ledger.offer(wire, START_MS)
    ledger.commit()
    assert ledger._kv.store.dump() == before
    assert len(ledger.unchecked) == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        decode_signed(data, network_id=NET)
    except P2PGPUError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=10), lambda c: st.lists(c, max_size=6), max_leaves=20))
def test_random_msgpack_payloads_are_rejected_cleanly(value):
    wire = pack([pack([Tag.ENTRY, 1, NET, alice.public_key, START_MS, value]), b"\0" * 64])
    with pytest.raises(P2PGPUError):
        decode_entry(wire, NET)


def test_entries_have_a_smaller_limit_than_other_signed_objects():
    big = signed_wire(entry_payload(body=[bob.public_key, 5, "m" * 200]))
    assert len(big) < MAX_ENTRY_SIZE
    with pytest.raises(Oversized):
        decode_entry(pack([b"x" * MAX_ENTRY_SIZE, b"s" * 64]), NET)


def test_signed_objects_round_trip_and_sign_exact_bytes():
    signed = sign_object(alice, Tag.VOUCHER, NET, START_MS, [b"h" * 32, 10])
    again = decode_signed(signed.wire, network_id=NET, tags=(Tag.VOUCHER,))
    assert again == signed
    assert again.id == signed.id and again.payload == signed.payload


def test_peer_ids_round_trip_and_reject_garbage():
    key = NodeKey.generate()
    assert key.peer_id.startswith("12D3KooW")
    assert public_key_from_peer_id(key.peer_id) == key.public_key
    assert peer_id_from_public_key(key.public_key) == key.peer_id
    for garbage in ("", "not-base58-0OIl", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"):
        with pytest.raises(MalformedInput):
            public_key_from_peer_id(garbage)


def test_libp2p_derives_the_same_peer_id():
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID
    from nacl.signing import SigningKey

    key = NodeKey.generate()
    private = Ed25519PrivateKey(SigningKey(key.seed))
    assert ID.from_pubkey(private.get_public_key()).to_base58() == key.peer_id

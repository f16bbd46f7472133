"""Offers and withdrawals (p2pgpu.core.offers): the wire round trip, a typed
error for every way a message can be bad, the offer book's rules (newest
wins, withdrawals, expiry, bounds), and convergence: books fed the same
messages in any order, with duplicates, hold the same offer.

Time is a number here: ``T0`` is "now" unless a test moves it.
"""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from p2pgpu.core.codec import Tag, pack
from p2pgpu.core.hardware import GpuInfo, HardwareReport
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.offers import (
    DEFAULT_AGENT,
    DEFAULT_MAX_SKEW_MS,
    DEFAULT_MAX_TTL_MS,
    MAX_ADDRS,
    MAX_MODELS,
    MAX_OFFER_SIZE,
    BookFull,
    Expired,
    FutureTimestamp,
    ModelOffer,
    Offer,
    OfferBook,
    SeqNotNewer,
    StaleOffer,
    TtlTooLong,
    Withdrawal,
    decode_offer_message,
    make_offer,
    make_withdrawal,
    next_seq,
    normalize_model_name,
    order_key,
)
from p2pgpu.errors import (
    BadSignature,
    ConfigError,
    MalformedInput,
    NonCanonical,
    Oversized,
    P2PGPUError,
    Truncated,
    UnknownType,
    WrongNetwork,
)
from p2pgpu.testing.ledger import START_MS, key_for, make_genesis

NET = make_genesis().network_id
OTHER_NET = make_genesis(name="elsewhere").network_id
T0 = START_MS
alice, bob, carol = key_for("alice"), key_for("bob"), key_for("carol")

H100 = GpuInfo(
    index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-5a1c0f7e-1b2c-4d5e-8f90-123456789abc",
    memory_total_bytes=85_520_809_984, memory_free_bytes=84_000_000_000, utilization_percent=3,
    driver_version="550.54.15", cuda_version="12.4", compute_capability=(9, 0),
)
ONE_GPU = HardwareReport(gpus=(H100,), nvml_available=True)
NO_NVML = HardwareReport(gpus=(), nvml_available=False, error="NVML Shared Library Not Found")
LLAMA = ModelOffer("llama3.2:latest", warm=True, size_bytes=2_019_393_189)
QWEN = ModelOffer("qwen2.5:7b", warm=False, size_bytes=4_683_087_332)
ADDRS = ["/ip4/203.0.113.7/tcp/4001", "/ip6/2001:db8::7/tcp/4001"]


def offer_kwargs(**override) -> dict:
    kwargs = dict(
        seq=1, ttl_ms=30_000, hardware=ONE_GPU, models=[LLAMA, QWEN], price_in=100, price_out=300,
        slots_free=2, slots_total=4, addrs=ADDRS, cpu=False, agent=DEFAULT_AGENT,
    )
    kwargs.update(override)
    return kwargs


def offer(key: NodeKey = alice, now: int = T0, net: bytes = NET, **override) -> bytes:
    """The wire of a valid offer made at ``now``."""
    return make_offer(key, net, now, **offer_kwargs(**override)).wire


def withdrawal(key: NodeKey = alice, now: int = T0, seq: int = 2) -> bytes:
    return make_withdrawal(key, NET, now, seq).wire


def offer_fields(**override) -> list:
    """The positional fields of a valid offer, for crafting bad ones."""
    fields = {
        "seq": 1, "expiry": T0 + 30_000, "hardware": ONE_GPU.to_wire(),
        "models": [LLAMA.to_wire(), QWEN.to_wire()], "price_in": 100, "price_out": 300,
        "slots_free": 2, "slots_total": 4, "addrs": list(ADDRS), "cpu": False, "agent": DEFAULT_AGENT,
    }
    fields.update(override)
    return list(fields.values())


def signed_wire(fields: list, *, tag: int = Tag.OFFER, version: int = 1, ts: int = T0,
                net: bytes = NET, key: NodeKey = alice) -> bytes:
    """Sign arbitrary fields, bypassing make_offer's checks (what a broken or
    hostile peer could send)."""
    return sign_payload(pack([tag, version, net, key.public_key, ts, *fields]), key)


def sign_payload(payload: bytes, key: NodeKey = alice) -> bytes:
    return pack([payload, key.sign(payload)])


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, "the bytes to patch must be unambiguous"
    return data.replace(old, new)


PRICE_300 = b"\xcd\x01\x2c"  # msgpack uint16 300: the default output price


def test_crafted_offer_matches_make_offer() -> None:
    # The crafting helper builds exactly what make_offer signs, so a crafted
    # message that fails differs from a good one only in what the test changed.
    assert signed_wire(offer_fields()) == offer()


# ------------------------------------------------------------- round trip

_printable = st.characters(categories=("L", "N", "P", "S"))  # all printable, no whitespace
_text = st.text(_printable, max_size=24)

gpus = st.builds(
    GpuInfo,
    index=st.just(0),
    name=st.none() | _text,
    uuid=st.none() | _text,
    memory_total_bytes=st.none() | st.integers(0, 2**40),
    memory_free_bytes=st.none(),
    utilization_percent=st.none() | st.integers(0, 100),
    driver_version=st.none() | _text,
    cuda_version=st.none() | _text,
    compute_capability=st.none() | st.tuples(st.integers(0, 255), st.integers(0, 255)),
)


@st.composite
def hardware(draw) -> HardwareReport:
    if not draw(st.booleans()):
        return HardwareReport(gpus=(), nvml_available=False, error=draw(st.text(_printable, min_size=1, max_size=40)))
    found = draw(st.lists(gpus, max_size=4))
    return HardwareReport(
        gpus=tuple(dataclasses.replace(g, index=i) for i, g in enumerate(found)),
        nvml_available=True,
        error=draw(st.none() | _text),
    )


models = st.lists(
    st.builds(
        ModelOffer,
        name=st.text(_printable, min_size=1, max_size=40).filter(normalize_model_name),
        warm=st.booleans(),
        size_bytes=st.none() | st.integers(0, 2**63 - 1),
    ),
    max_size=6,
    unique_by=lambda m: normalize_model_name(m.name),
)
addrs = st.lists(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=59).map(lambda s: "/" + s),
    max_size=MAX_ADDRS,
)


@st.composite
def offer_args(draw) -> dict:
    total = draw(st.integers(0, 1024))
    return dict(
        seq=draw(st.integers(1, 2**62)),
        ttl_ms=draw(st.integers(1, DEFAULT_MAX_TTL_MS)),
        hardware=draw(hardware()),
        models=draw(models),
        price_in=draw(st.integers(0, 2**62)),
        price_out=draw(st.integers(0, 2**62)),
        slots_free=draw(st.integers(0, total)),
        slots_total=total,
        addrs=draw(addrs),
        cpu=draw(st.booleans()),
        agent=draw(st.text(_printable, max_size=64)),
    )


@settings(max_examples=150, deadline=None)
@given(args=offer_args(), now=st.integers(0, 2**50), key_name=st.sampled_from(["alice", "bob", "carol"]))
def test_offer_round_trip(args: dict, now: int, key_name: str) -> None:
    key = key_for(key_name)
    signed = make_offer(key, NET, now, **args)
    assert len(signed.wire) <= MAX_OFFER_SIZE
    got = decode_offer_message(signed.wire, NET, now)
    assert type(got) is Offer
    assert got.signed == signed and got.wire == signed.wire
    assert (got.provider, got.peer_id) == (key.public_key, key.peer_id)
    assert (got.seq, got.timestamp_ms, got.expiry_ms, got.ttl_ms) == (args["seq"], now, now + args["ttl_ms"], args["ttl_ms"])
    assert got.hardware == args["hardware"]
    assert got.models == tuple(args["models"])
    assert (got.price_in, got.price_out) == (args["price_in"], args["price_out"])
    assert (got.slots_free, got.slots_total) == (args["slots_free"], args["slots_total"])
    assert got.addrs == tuple(args["addrs"])
    assert (got.cpu, got.agent) == (args["cpu"], args["agent"])
    for model in args["models"]:
        assert got.serves(model.name)
    # a decoded offer is a value: decoding again gives an equal one
    assert decode_offer_message(signed.wire, NET, now) == got


@settings(max_examples=50, deadline=None)
@given(seq=st.integers(1, 2**62), now=st.integers(0, 2**50))
def test_withdrawal_round_trip(seq: int, now: int) -> None:
    signed = make_withdrawal(bob, NET, now, seq)
    got = decode_offer_message(signed.wire, NET, now)
    assert type(got) is Withdrawal
    assert (got.provider, got.seq, got.timestamp_ms, got.wire) == (bob.public_key, seq, now, signed.wire)


def test_realistic_offer_is_well_under_the_limit() -> None:
    eight = HardwareReport(gpus=tuple(dataclasses.replace(H100, index=i) for i in range(8)), nvml_available=True)
    fifty = [ModelOffer(f"model-{i}:8b-instruct-q4_K_M", warm=i < 3, size_bytes=4_900_000_000) for i in range(50)]
    wire = offer(hardware=eight, models=fifty, addrs=ADDRS * 2)
    assert len(wire) < MAX_OFFER_SIZE // 2


# ------------------------------------------------------------- typed errors

LATER = T0 + 30_000  # the default offer's expiry

BAD: list[tuple[str, bytes, type[P2PGPUError]]] = [
    ("empty", b"", Truncated),
    ("truncated", offer()[:-7], Truncated),
    ("not msgpack", b"\xc1\xc1", MalformedInput),
    ("trailing byte", offer() + b"\x00", MalformedInput),
    ("oversized: 1000 models", signed_wire(offer_fields(models=[[f"model-{i}:7b", False, None] for i in range(1000)])), Oversized),
    ("oversized: padding", pack([b"x" * MAX_OFFER_SIZE, b"s" * 64]), Oversized),
    ("too many models, though small", signed_wire(offer_fields(models=[[f"m{i}", False, None] for i in range(MAX_MODELS + 1)])), MalformedInput),
    ("wrong network", offer(net=OTHER_NET), WrongNetwork),
    ("unknown version", signed_wire(offer_fields(), version=2), UnknownType),
    ("a ledger entry tag", signed_wire(offer_fields(), tag=Tag.ENTRY), UnknownType),
    ("a voucher tag", signed_wire([b"h" * 32, 5], tag=Tag.VOUCHER), UnknownType),
    ("signature of zeros", pack([msgpack.unpackb(offer())[0], b"\0" * 64]), BadSignature),
    ("signed by someone else", pack([msgpack.unpackb(offer())[0], bob.sign(msgpack.unpackb(offer())[0])]), BadSignature),
    ("non-canonical price", sign_payload(replace_once(pack([Tag.OFFER, 1, NET, alice.public_key, T0, *offer_fields()]), PRICE_300, b"\xce\x00\x00\x01\x2c")), NonCanonical),
    ("one field missing", signed_wire(offer_fields()[:-1]), MalformedInput),
    ("one field too many", signed_wire(offer_fields() + [0]), MalformedInput),
    ("seq zero", signed_wire(offer_fields(seq=0)), MalformedInput),
    ("seq is a string", signed_wire(offer_fields(seq="1")), MalformedInput),
    ("seq too large", signed_wire(offer_fields(seq=2**62 + 1)), MalformedInput),
    ("expiry is a float", signed_wire(offer_fields(expiry=1.7e12)), MalformedInput),
    ("expiry before timestamp", signed_wire(offer_fields(expiry=T0 - 1)), MalformedInput),
    ("expiry equals timestamp", signed_wire(offer_fields(expiry=T0)), MalformedInput),
    ("hardware is a string", signed_wire(offer_fields(hardware="H100")), MalformedInput),
    ("hardware with 17 GPUs", signed_wire(offer_fields(hardware=[True, None, [H100.to_wire()] * 17])), MalformedInput),
    ("GPU free memory above total", signed_wire(offer_fields(hardware=[True, None, [[0, "x", None, 1, 2, None, None, None, None, None]]])), MalformedInput),
    ("models is a map", signed_wire(offer_fields(models={"llama3": True})), MalformedInput),
    ("model entry too short", signed_wire(offer_fields(models=[["llama3", True]])), MalformedInput),
    ("model name empty", signed_wire(offer_fields(models=[["", True, None]])), MalformedInput),
    ("model name too long", signed_wire(offer_fields(models=[["m" * 129, True, None]])), MalformedInput),
    ("model name with escape", signed_wire(offer_fields(models=[["llama\x1b[2J", True, None]])), MalformedInput),
    ("model name that names nothing", signed_wire(offer_fields(models=[["library/", True, None]])), MalformedInput),
    ("model name with space", signed_wire(offer_fields(models=[["llama 3", True, None]])), MalformedInput),
    ("model listed twice", signed_wire(offer_fields(models=[["Llama3", True, None], ["llama3:latest", False, None]])), MalformedInput),
    ("warm is an int", signed_wire(offer_fields(models=[["llama3", 1, None]])), MalformedInput),
    ("model size negative", signed_wire(offer_fields(models=[["llama3", True, -1]])), MalformedInput),
    ("price is a bool", signed_wire(offer_fields(price_in=True)), MalformedInput),
    ("price negative", signed_wire(offer_fields(price_out=-1)), MalformedInput),
    ("price above 2^62", signed_wire(offer_fields(price_out=2**62 + 1)), MalformedInput),
    ("price is a float", signed_wire(offer_fields(price_out=0.5)), MalformedInput),
    ("free slots above total", signed_wire(offer_fields(slots_free=5, slots_total=4)), MalformedInput),
    ("total slots above 1024", signed_wire(offer_fields(slots_free=0, slots_total=1025)), MalformedInput),
    ("addrs is a string", signed_wire(offer_fields(addrs="/ip4/1.2.3.4/tcp/1")), MalformedInput),
    ("too many addrs", signed_wire(offer_fields(addrs=[f"/ip4/10.0.0.{i}/tcp/4001" for i in range(MAX_ADDRS + 1)])), MalformedInput),
    ("addr too long", signed_wire(offer_fields(addrs=["/dns4/" + "a" * 260])), MalformedInput),
    ("addr not a multiaddr", signed_wire(offer_fields(addrs=["203.0.113.7:4001"])), MalformedInput),
    ("addr is bytes", signed_wire(offer_fields(addrs=[b"/ip4/1.2.3.4"])), MalformedInput),
    ("cpu is an int", signed_wire(offer_fields(cpu=1)), MalformedInput),
    ("agent too long", signed_wire(offer_fields(agent="a" * 65)), MalformedInput),
    ("agent is bytes", signed_wire(offer_fields(agent=b"p2pgpu")), MalformedInput),
    ("withdrawal seq zero", signed_wire([0], tag=Tag.WITHDRAWAL), MalformedInput),
    ("withdrawal with two fields", signed_wire([2, 3], tag=Tag.WITHDRAWAL), MalformedInput),
    ("withdrawal with no seq", signed_wire([], tag=Tag.WITHDRAWAL), MalformedInput),
    ("withdrawal of another network", signed_wire([2], tag=Tag.WITHDRAWAL, net=OTHER_NET), WrongNetwork),
    ("withdrawal, unknown version", signed_wire([2], tag=Tag.WITHDRAWAL, version=3), UnknownType),
    ("ttl too long", signed_wire(offer_fields(expiry=T0 + DEFAULT_MAX_TTL_MS + 1)), TtlTooLong),
    ("far future offer", offer(now=T0 + DEFAULT_MAX_SKEW_MS + 1), FutureTimestamp),
    ("far future withdrawal", withdrawal(now=T0 + DEFAULT_MAX_SKEW_MS + 1), FutureTimestamp),
    ("expired offer", offer(now=T0 - 30_000), Expired),
    ("offer expired long ago", offer(now=T0 - 100_000), Expired),
    ("withdrawal older than the longest ttl", withdrawal(now=T0 - DEFAULT_MAX_TTL_MS), Expired),
]


@pytest.mark.parametrize("wire, error", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_message_gets_its_typed_error(wire: bytes, error: type[P2PGPUError]) -> None:
    with pytest.raises(error) as info:
        decode_offer_message(wire, NET, T0)
    # exactly that class where a subclass would say something else
    if error in (MalformedInput, P2PGPUError):
        assert not isinstance(info.value, (Oversized, Truncated, UnknownType, StaleOffer))
    # the book refuses it the same way, and stores nothing
    book = OfferBook(NET)
    with pytest.raises(error):
        book.check(wire, T0)
    with pytest.raises(error):
        book.accept(wire, T0)
    assert len(book) == 0 and book.high_seq(alice.public_key, T0) is None


def test_time_limits_are_inclusive_where_documented() -> None:
    # skew exactly at the limit is fine; a ttl exactly at the limit is fine
    assert decode_offer_message(offer(now=T0 + DEFAULT_MAX_SKEW_MS), NET, T0).seq == 1
    assert decode_offer_message(signed_wire(offer_fields(expiry=T0 + DEFAULT_MAX_TTL_MS)), NET, T0).ttl_ms == DEFAULT_MAX_TTL_MS
    # an offer is live until the millisecond before its expiry
    assert decode_offer_message(offer(), NET, LATER - 1).seq == 1
    with pytest.raises(Expired):
        decode_offer_message(offer(), NET, LATER)
    # the limits are the caller's to choose
    with pytest.raises(TtlTooLong):
        decode_offer_message(offer(), NET, T0, max_ttl_ms=29_999)
    with pytest.raises(FutureTimestamp):
        decode_offer_message(offer(now=T0 + 2), NET, T0, max_skew_ms=1)


def test_stale_errors_are_malformed_input() -> None:
    # a validator that drops MalformedInput drops every stale message too
    for error in (Expired, FutureTimestamp, TtlTooLong, SeqNotNewer):
        assert issubclass(error, StaleOffer) and issubclass(error, MalformedInput)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_flipped_bit_is_refused_with_a_typed_error(data) -> None:
    wire = data.draw(st.sampled_from([offer(), withdrawal()]))
    bit = data.draw(st.integers(0, len(wire) * 8 - 1))
    flipped = bytearray(wire)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(P2PGPUError):
        decode_offer_message(bytes(flipped), NET, T0)


def test_flipped_signature_or_price_bit_is_a_bad_signature() -> None:
    wire = offer()
    payload, signature = msgpack.unpackb(wire)
    bad_sig = pack([payload, bytes([signature[0] ^ 1]) + signature[1:]])
    cheaper = replace_once(payload, PRICE_300, b"\xcd\x01\x2b")  # price_out 300 -> 299
    for forged in (bad_sig, pack([cheaper, signature])):
        with pytest.raises(BadSignature):
            decode_offer_message(forged, NET, T0)


# ------------------------------------------------------------- making

MAKE_BAD: list[tuple[str, dict, type[P2PGPUError]]] = [
    ("1000 models", dict(models=[ModelOffer(f"model-{i}:7b") for i in range(1000)]), MalformedInput),
    ("models too big to gossip", dict(models=[ModelOffer(f"{i:03d}" + "m" * 125) for i in range(100)]), Oversized),
    ("free slots above total", dict(slots_free=5, slots_total=4), MalformedInput),
    ("too many addrs", dict(addrs=[f"/ip4/10.0.0.{i}/tcp/4001" for i in range(9)]), MalformedInput),
    ("ttl too long", dict(ttl_ms=DEFAULT_MAX_TTL_MS + 1), TtlTooLong),
    ("ttl zero", dict(ttl_ms=0), MalformedInput),
    ("seq zero", dict(seq=0), MalformedInput),
    ("price is a float", dict(price_out=1.0), MalformedInput),
    ("models as tuples", dict(models=[("llama3", True, None)]), MalformedInput),
    ("hardware as a list", dict(hardware=ONE_GPU.to_wire()), MalformedInput),
    ("agent with a newline", dict(agent="p2pgpu\n"), MalformedInput),
    ("one model twice", dict(models=[ModelOffer("Llama3"), ModelOffer("llama3:latest")]), MalformedInput),
]


@pytest.mark.parametrize("override, error", [b[1:] for b in MAKE_BAD], ids=[b[0] for b in MAKE_BAD])
def test_make_offer_refuses_what_peers_would_refuse(override: dict, error: type[P2PGPUError]) -> None:
    with pytest.raises(error):
        make_offer(alice, NET, T0, **offer_kwargs(**override))


def test_model_offer_validates_itself() -> None:
    for bad in (dict(name=""), dict(name="registry.ollama.ai/library/"), dict(name="a b"), dict(name="x" * 129), dict(name=3), dict(name="m", warm="yes"),
                dict(name="m", size_bytes=-5), dict(name="m", size_bytes=True)):
        with pytest.raises(MalformedInput):
            ModelOffer(**bad)


def test_make_withdrawal_and_next_seq() -> None:
    with pytest.raises(MalformedInput):
        make_withdrawal(alice, NET, T0, 0)
    with pytest.raises(MalformedInput):
        make_withdrawal(alice, b"short", T0, 1)
    assert next_seq(None, T0) == T0
    assert next_seq(T0 + 5, T0) == T0 + 6  # clock stepped back: still grows


def test_cpu_only_offer_round_trips() -> None:
    got = decode_offer_message(offer(hardware=NO_NVML, cpu=True), NET, T0)
    assert got.cpu and got.hardware.gpus == () and not got.hardware.nvml_available


# ------------------------------------------------------------- names


@pytest.mark.parametrize(
    "asked, listed, match",
    [
        ("llama3.2", "llama3.2:latest", True),
        ("Llama3.2:LATEST", "llama3.2", True),
        ("registry.ollama.ai/library/llama3.2", "llama3.2:latest", True),
        ("library/qwen2.5:7b", "Qwen2.5:7B", True),
        ("llama3.2:1b", "llama3.2", False),
        ("llama3", "llama3.2", False),
        ("myuser/llama3", "llama3", False),
        ("localhost:5000/llama3", "localhost:5000/llama3:latest", True),
    ],
)
def test_serves_uses_ollama_name_rules(asked: str, listed: str, match: bool) -> None:
    got = decode_offer_message(offer(models=[ModelOffer(listed)]), NET, T0)
    assert got.serves(asked) is match


# ------------------------------------------------------------- the book


def book(**kwargs) -> OfferBook:
    return OfferBook(NET, **kwargs)


def test_newest_offer_wins_and_older_ones_are_refused() -> None:
    b = book()
    first, second = offer(seq=1), offer(seq=2, now=T0 + 10_000, price_out=250)
    assert b.accept(first, T0).seq == 1
    assert b.accept(second, T0 + 10_000).seq == 2
    assert b.get(alice.public_key).price_out == 250
    for late in (first, second):  # an old heartbeat arriving late, and a duplicate
        with pytest.raises(SeqNotNewer):
            b.check(late, T0 + 10_001)
        with pytest.raises(SeqNotNewer):
            b.accept(late, T0 + 10_001)
    assert b.get(alice.public_key).seq == 2 and len(b) == 1


def test_check_changes_nothing() -> None:
    b = book()
    wire = offer()
    assert b.check(wire, T0).seq == 1
    assert b.check(wire, T0).seq == 1  # still not stored, so not a duplicate yet
    assert len(b) == 0 and b.get(alice.public_key) is None and b.high_seq(alice.public_key, T0) is None
    b.accept(wire, T0)
    with pytest.raises(SeqNotNewer, match="duplicate"):
        b.check(wire, T0)


def test_a_forged_newer_offer_is_refused_and_leaves_the_stored_one() -> None:
    b = book()
    b.accept(offer(seq=1), T0)
    payload, _ = msgpack.unpackb(offer(seq=9))
    with pytest.raises(BadSignature):
        b.accept(pack([payload, bob.sign(payload)]), T0)
    assert b.get(alice.public_key).seq == 1 and b.high_seq(alice.public_key, T0) == 1


def test_withdrawal_removes_and_blocks_older_offers_until_a_restart() -> None:
    b = book()
    b.accept(offer(seq=5), T0)
    assert type(b.accept(withdrawal(seq=6, now=T0 + 1), T0 + 1)) is Withdrawal
    assert b.get(alice.public_key) is None and b.live(T0 + 1) == []
    # replays: the withdrawn offer, an older one, one at the withdrawal's seq, the withdrawal itself
    for replay in (offer(seq=5), offer(seq=3), offer(seq=6), withdrawal(seq=6, now=T0 + 1), withdrawal(seq=6, now=T0 + 2)):
        with pytest.raises(SeqNotNewer):
            b.accept(replay, T0 + 2)
    assert b.get(alice.public_key) is None
    # the provider restarts and publishes a higher seq
    assert b.accept(offer(seq=7, now=T0 + 3), T0 + 3).seq == 7
    assert b.get(alice.public_key).seq == 7


def test_withdrawal_at_the_offers_own_seq_removes_it() -> None:
    b = book()
    b.accept(offer(seq=5), T0)
    b.accept(withdrawal(seq=5), T0)
    assert b.get(alice.public_key) is None
    with pytest.raises(SeqNotNewer, match="withdrawn"):
        b.check(offer(seq=5), T0)


def test_a_replayed_old_withdrawal_cannot_kill_a_newer_offer() -> None:
    b = book()
    old_withdrawal = withdrawal(seq=4)
    b.accept(old_withdrawal, T0)
    b.accept(offer(seq=5, now=T0 + 1), T0 + 1)
    with pytest.raises(SeqNotNewer):
        b.accept(old_withdrawal, T0 + 2)
    assert b.get(alice.public_key).seq == 5


def test_withdrawal_arriving_before_the_offer_it_withdraws() -> None:
    b = book()
    b.accept(withdrawal(seq=3), T0)  # gossip reordered: nothing to remove yet
    with pytest.raises(SeqNotNewer):
        b.accept(offer(seq=2), T0)
    assert b.get(alice.public_key) is None and b.high_seq(alice.public_key, T0) == 3


def test_expiry_removes_offers_and_queries_ignore_expired_ones_meanwhile() -> None:
    b = book()
    b.accept(offer(key=alice, ttl_ms=30_000), T0)
    b.accept(offer(key=bob, ttl_ms=60_000), T0)
    assert [o.provider for o in b.live(LATER - 1)] == sorted([alice.public_key, bob.public_key])
    # expired but not yet swept: invisible to every query that knows the time
    assert [o.provider for o in b.live(LATER)] == [bob.public_key]
    assert b.get(alice.public_key, LATER) is None and b.get(alice.public_key) is not None
    assert b.models(LATER) == {"llama3.2:latest": 1, "qwen2.5:7b": 1}
    assert b.expire(LATER - 1) == []
    assert b.expire(LATER) == [alice.public_key]
    assert b.get(alice.public_key) is None and len(b) == 1
    assert b.expire(T0 + 60_000) == [bob.public_key] and len(b) == 0


def test_high_mark_outlives_the_offer_until_older_offers_cannot_be_live() -> None:
    b = book()
    long_lived = offer(seq=1, ttl_ms=90_000)  # signed first, with a long ttl
    b.accept(long_lived, T0)
    b.accept(offer(seq=2, now=T0 + 1, ttl_ms=10_000), T0 + 1)
    assert b.expire(T0 + 10_001) == [alice.public_key]
    # seq 1 is unexpired until T0 + 90 s, but seq 2 was seen: still refused
    with pytest.raises(SeqNotNewer):
        b.accept(long_lived, T0 + 20_000)
    # forgotten once nothing older can be live: max timestamp + max ttl
    forget_at = T0 + 1 + DEFAULT_MAX_TTL_MS
    assert b.high_seq(alice.public_key, forget_at - 1) == 2
    assert b.high_seq(alice.public_key, forget_at) is None
    b.expire(forget_at)
    assert b._tombstones == {}


def test_live_filters_by_model_and_orders_deterministically() -> None:
    b = book()
    b.accept(offer(key=alice, models=[ModelOffer("llama3.2")], price_out=300, price_in=10), T0)
    b.accept(offer(key=bob, models=[ModelOffer("Llama3.2:latest"), QWEN], price_out=200), T0)
    b.accept(offer(key=carol, models=[ModelOffer("registry.ollama.ai/library/llama3.2:1b")], price_out=300, price_in=5), T0)
    assert [o.provider for o in b.live(T0)] == [bob.public_key, carol.public_key, alice.public_key]
    assert [o.provider for o in b.live(T0, model="LLAMA3.2")] == [bob.public_key, alice.public_key]
    assert [o.provider for o in b.live(T0, model="llama3.2:1b")] == [carol.public_key]
    assert [o.provider for o in b.live(T0, model="qwen2.5:7B")] == [bob.public_key]
    assert b.live(T0, model="mistral") == []
    assert b.models(T0) == {"llama3.2:1b": 1, "llama3.2:latest": 2, "qwen2.5:7b": 1}
    # equal prices: provider key decides
    b2 = book()
    for key in (carol, alice, bob):
        b2.accept(offer(key=key), T0)
    assert [o.provider for o in b2.live(T0)] == sorted(k.public_key for k in (alice, bob, carol))


def test_full_book_evicts_the_offer_that_expires_first() -> None:
    b = book(max_providers=2)
    b.accept(offer(key=alice, ttl_ms=10_000), T0)
    b.accept(offer(key=bob, ttl_ms=20_000), T0)
    with pytest.raises(BookFull):  # expires before everything stored
        b.accept(offer(key=carol, ttl_ms=5_000), T0)
    assert carol.public_key not in b and b.high_seq(carol.public_key, T0) is None
    b.accept(offer(key=carol, ttl_ms=30_000), T0)
    assert alice.public_key not in b and len(b) == 2
    # the evicted provider's replay is still refused (its high mark was kept)
    with pytest.raises(SeqNotNewer):
        b.check(offer(key=alice, ttl_ms=10_000), T0)
    # an expired offer makes room without evicting anyone live
    b.accept(offer(key=alice, seq=2, now=T0 + 20_000, ttl_ms=30_000), T0 + 20_000)
    assert bob.public_key not in b and {alice.public_key, carol.public_key} == set(b._offers)
    # a provider already in a full book can always refresh its offer
    b.accept(offer(key=carol, seq=2, now=T0 + 20_001, ttl_ms=1_000), T0 + 20_001)
    assert b.get(carol.public_key).seq == 2


def test_tombstones_are_bounded_and_the_cost_is_one_more_replay() -> None:
    b = book(max_tombstones=1)
    early = offer(key=alice, seq=1)
    b.accept(early, T0)
    b.accept(withdrawal(key=alice, seq=2), T0)
    b.accept(withdrawal(key=bob, seq=2, now=T0 + 1), T0 + 1)  # pushes alice's tombstone out
    assert len(b._tombstones) == 1 and b.high_seq(bob.public_key, T0 + 1) == 2
    assert b.high_seq(alice.public_key, T0 + 1) is None
    # documented cost: alice's still-unexpired old offer is accepted once more
    assert b.accept(early, T0 + 2).seq == 1
    with pytest.raises(SeqNotNewer):
        b.accept(early, T0 + 3)


def test_heartbeats_without_sweeps_keep_memory_bounded() -> None:
    b = book()
    for i in range(300):
        b.accept(offer(seq=i + 1, now=T0 + i), T0 + i)
    assert len(b) == 1 and len(b._expiry_heap) <= 2 * 1 + 64 + 1
    b.expire(T0 + 10**6)
    assert len(b) == 0


def test_book_rejects_bad_configuration() -> None:
    for bad in (dict(network_id=b"x" * 8), dict(network_id=NET, max_ttl_ms=0), dict(network_id=NET, max_providers=0),
                dict(network_id=NET, max_skew_ms=1.5), dict(network_id=NET, max_tombstones=-1)):
        with pytest.raises(ConfigError):
            OfferBook(**bad)


def test_equivocating_provider_still_converges() -> None:
    # two different offers signed with one seq: every book keeps the same one
    a, b_ = offer(seq=3, price_out=1), offer(seq=3, price_out=2)
    winner = max((a, b_), key=lambda w: order_key(decode_offer_message(w, NET, T0)))
    for order in ((a, b_), (b_, a)):
        b = book()
        for wire in order:
            try:
                b.accept(wire, T0)
            except SeqNotNewer as exc:
                assert "tie-break" in str(exc)
        assert b.get(alice.public_key).wire == winner


# ------------------------------------------------------------- convergence

PEOPLE = (alice, bob)


@st.composite
def histories(draw) -> tuple[list[bytes], int]:
    """A few offers and withdrawals per provider (seqs collide on purpose:
    equivocation), and a delivery time at which some have expired."""
    specs = draw(st.lists(
        st.tuples(
            st.sampled_from(PEOPLE),
            st.sampled_from(["offer", "offer", "offer", "withdrawal"]),
            st.integers(1, 4),  # seq
            st.integers(0, 70_000),  # signed at T0 + this
            st.integers(1, 60_000),  # ttl
            st.integers(0, 2),  # price, so equal-seq offers can differ
        ),
        min_size=1, max_size=10,
    ))
    wires = []
    for key, kind, seq, at, ttl, price in specs:
        if kind == "offer":
            wires.append(offer(key=key, now=T0 + at, seq=seq, ttl_ms=ttl, price_out=price))
        else:
            wires.append(withdrawal(key=key, now=T0 + at, seq=seq))
    now = draw(st.integers(T0, T0 + 80_000))
    return wires, now


def deliver(wires: list[bytes], now: int, *, sweep_every: int | None = None) -> OfferBook:
    b = book()
    for i, wire in enumerate(wires):
        try:
            checked = b.check(wire, now)
        except P2PGPUError as exc:
            with pytest.raises(type(exc)):  # check and accept always agree
                b.accept(wire, now)
        else:
            assert b.accept(wire, now) == checked
        if sweep_every and i % sweep_every == 0:
            b.expire(now)
    return b


@settings(max_examples=150, deadline=None)
@given(history=histories(), data=st.data())
def test_any_order_with_duplicates_converges(history, data) -> None:
    wires, now = history
    # what the rule says the answer is: the greatest-keyed valid message
    expected: dict[bytes, Offer | None] = {}
    best: dict[bytes, tuple] = {}
    for wire in set(wires):
        try:
            message = decode_offer_message(wire, NET, now)
        except StaleOffer:
            continue
        key = order_key(message)
        if message.provider not in best or key > best[message.provider]:
            best[message.provider] = key
            expected[message.provider] = message if type(message) is Offer else None

    def delivery():
        extra = data.draw(st.lists(st.sampled_from(wires), max_size=6))
        return data.draw(st.permutations(wires + extra))

    event("outcome", ",".join(sorted("offer" if v else "withdrawn" for v in expected.values())) or "nothing valid")
    one = deliver(delivery(), now)
    two = deliver(delivery(), now, sweep_every=data.draw(st.integers(1, 4)))
    for key in PEOPLE:
        p = key.public_key
        assert one.get(p, now) == two.get(p, now) == expected.get(p)
        assert one.high_seq(p, now) == two.high_seq(p, now) == (best[p][0] if p in best else None)
    assert one.live(now) == two.live(now)
    assert one.models(now) == two.models(now)

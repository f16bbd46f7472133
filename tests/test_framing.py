"""Pure tests of the length-prefixed frame codec (no sockets, no trio)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.core import protocols
from p2pgpu.core.framing import FrameDecoder, encode_frame
from p2pgpu.errors import MalformedInput, Oversized, Truncated

SMALL_MAX = 64

payloads = st.lists(st.binary(max_size=SMALL_MAX), max_size=12)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    pieces.append(data[start:])
    return pieces


@given(frames=payloads, cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_any_chunking_yields_the_same_frames(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(f, SMALL_MAX) for f in frames)
    decoder = FrameDecoder(SMALL_MAX)
    out: list[bytes] = []
    for piece in split_at(stream, cuts):
        out.extend(decoder.feed(piece))
    decoder.eof()
    assert out == frames
    assert decoder.at_boundary


@given(frames=payloads)
def test_byte_at_a_time(frames: list[bytes]) -> None:
    stream = b"".join(encode_frame(f, SMALL_MAX) for f in frames)
    decoder = FrameDecoder(SMALL_MAX)
    out = [frame for i in range(len(stream)) for frame in decoder.feed(stream[i : i + 1])]
    assert out == frames


@given(
    good=payloads,
    size=st.integers(min_value=SMALL_MAX + 1, max_value=2**32 - 1),
    tail=st.binary(max_size=200),
)
def test_oversized_header_rejected_before_its_body(
    good: list[bytes], size: int, tail: bytes
) -> None:
    prefix = b"".join(encode_frame(f, SMALL_MAX) for f in good)
    decoder = FrameDecoder(SMALL_MAX)
    assert decoder.feed(prefix) == good
    # The header alone is enough to refuse: no body byte has been sent.
    with pytest.raises(Oversized):
        decoder.feed(size.to_bytes(4, "big"))
    assert decoder.buffered == 0
    # Poisoned: the stream lost its framing, nothing later is accepted.
    with pytest.raises(Oversized):
        decoder.feed(tail)
    with pytest.raises(Oversized):
        decoder.eof()


@given(frames=st.lists(st.binary(min_size=1, max_size=SMALL_MAX), min_size=1, max_size=6),
       data=st.data())
def test_truncation_detected_at_eof(frames: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(f, SMALL_MAX) for f in frames)
    # Every proper prefix that does not end on a frame boundary is truncated.
    boundaries = {0}
    at = 0
    for f in frames:
        at += 4 + len(f)
        boundaries.add(at)
    cut = data.draw(
        st.integers(min_value=1, max_value=len(stream) - 1).filter(lambda c: c not in boundaries)
    )
    decoder = FrameDecoder(SMALL_MAX)
    decoder.feed(stream[:cut])
    assert not decoder.at_boundary
    with pytest.raises(Truncated):
        decoder.eof()


@given(frames=payloads)
def test_clean_eof_at_every_boundary(frames: list[bytes]) -> None:
    decoder = FrameDecoder(SMALL_MAX)
    for f in frames:
        assert decoder.feed(encode_frame(f, SMALL_MAX)) == [f]
        decoder.eof()  # must not raise at a boundary


def test_encode_refuses_oversized_payload() -> None:
    encode_frame(b"x" * SMALL_MAX, SMALL_MAX)
    with pytest.raises(Oversized):
        encode_frame(b"x" * (SMALL_MAX + 1), SMALL_MAX)
    with pytest.raises(Oversized):
        encode_frame(b"x" * (protocols.MAX_FRAME + 1))


def test_encode_layout_is_big_endian_length_then_payload() -> None:
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"x" * 258)[:4] == b"\x00\x00\x01\x02"


def test_default_limit_is_the_protocol_constant() -> None:
    decoder = FrameDecoder()
    assert decoder.max_frame == protocols.MAX_FRAME
    assert decoder.feed(encode_frame(b"x" * protocols.MAX_FRAME)) == [b"x" * protocols.MAX_FRAME]
    with pytest.raises(Oversized):
        decoder.feed((protocols.MAX_FRAME + 1).to_bytes(4, "big"))


def test_truncated_inside_header() -> None:
    decoder = FrameDecoder(SMALL_MAX)
    decoder.feed(b"\x00\x00")
    assert decoder.needed() == 2
    with pytest.raises(Truncated):
        decoder.eof()


def test_many_small_frames_in_one_chunk_is_linear() -> None:
    # Token streaming puts thousands of tiny frames in one read.
    frames = [b"tok%d" % i for i in range(50_000)]
    decoder = FrameDecoder()
    assert decoder.feed(b"".join(encode_frame(f) for f in frames)) == frames


def test_errors_are_malformed_input() -> None:
    assert issubclass(Oversized, MalformedInput) and issubclass(Truncated, MalformedInput)


@settings(max_examples=50)
@given(tag_bytes=st.binary(min_size=8, max_size=40))
def test_topics_embed_the_network_tag(tag_bytes: bytes) -> None:
    tag = protocols.network_tag(tag_bytes)
    assert tag == tag_bytes[:8].hex()
    assert protocols.offers_topic(tag) == f"p2pgpu/{tag}/offers/1"
    assert protocols.ledger_topic(tag) == f"p2pgpu/{tag}/ledger/1"


def test_protocol_constants() -> None:
    assert protocols.JOB_PROTOCOL == "/p2pgpu/job/1.0.0"
    assert protocols.LEDGER_SYNC_PROTOCOL == "/p2pgpu/ledger-sync/1.0.0"
    assert protocols.MAX_GOSSIP_MESSAGE < (1 << 20)  # below libp2p's silent drop
    for bad in ("", "ABCD", "ab/cd", "xyz", "0" * 65):
        with pytest.raises(ValueError):
            protocols.offers_topic(bad)
    with pytest.raises(ValueError):
        protocols.network_tag(b"short")

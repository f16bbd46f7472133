"""Length-prefixed frames, sans-IO.

Theory of operation
-------------------
A frame is a 4-byte big-endian unsigned length ``n`` followed by exactly ``n``
payload bytes (DESIGN §3). ``encode_frame`` turns a payload into bytes;
``FrameDecoder`` turns an arbitrary chunking of a byte stream back into the
payloads, like h11's ``receive_data``: the caller moves bytes, this module
never touches a socket, so every edge case is testable without one.

The decoder has three states, all implicit in its buffer:

==================  ========================================================
buffer holds        meaning
==================  ========================================================
< 4 bytes           waiting for a header
header, short body  waiting for the body; ``needed`` says how many bytes
nothing             at a frame boundary: the only place EOF is clean
==================  ========================================================

Hostile input is rejected as early as it can be:

- a header announcing more than ``max_frame`` raises ``Oversized`` the moment
  its 4 bytes have arrived, before a single body byte is buffered, so a peer
  cannot make us hold (or wait for) a gigabyte it never intends to send;
- EOF inside a header or a body raises ``Truncated`` from ``eof()``.

After an error the decoder is *poisoned*: every later call raises the same
error again, because the byte stream has lost its framing and nothing after
the bad header can be trusted.

Pure module: no trio, no libp2p.
"""

from __future__ import annotations

from p2pgpu.core.protocols import FRAME_HEADER_SIZE, MAX_FRAME
from p2pgpu.errors import MalformedInput, Oversized, Truncated

__all__ = ["encode_frame", "FrameDecoder"]

_MAX_HEADER_VALUE = (1 << (8 * FRAME_HEADER_SIZE)) - 1


def encode_frame(payload: bytes, max_frame: int = MAX_FRAME) -> bytes:
    """``payload`` with its 4-byte big-endian length in front.

    Raises ``Oversized`` if the payload is longer than ``max_frame``: we never
    send what we would refuse to receive.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"a frame payload is bytes, got {type(payload).__name__}")
    size = len(payload)
    if size > max_frame:
        raise Oversized(f"frame payload of {size} bytes exceeds the {max_frame}-byte limit")
    return size.to_bytes(FRAME_HEADER_SIZE, "big") + bytes(payload)


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes in any chunking, get whole frames out.

    ``feed(data)`` returns the payloads completed by ``data`` (possibly none,
    possibly several). Call ``eof()`` when the byte stream ends: it returns
    quietly at a frame boundary and raises ``Truncated`` otherwise.
    """

    __slots__ = ("_buffer", "_max_frame", "_pending", "_error")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        if not 0 <= max_frame <= _MAX_HEADER_VALUE:
            raise ValueError(f"max_frame must fit the 4-byte header, got {max_frame}")
        self._buffer = bytearray()
        self._max_frame = max_frame
        # Body length of the frame whose header we have consumed, or None
        # while we are waiting for a header.
        self._pending: int | None = None
        self._error: MalformedInput | None = None

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole frame (header bytes included)."""
        held = len(self._buffer)
        return held + FRAME_HEADER_SIZE if self._pending is not None else held

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is held: EOF here is a clean end."""
        return self._pending is None and not self._buffer

    def needed(self) -> int:
        """How many more bytes complete the current header or body (>= 1 unless idle)."""
        if self._pending is None:
            return FRAME_HEADER_SIZE - len(self._buffer)
        return self._pending - len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return every frame payload it completes, in order.

        Raises ``Oversized`` as soon as a header announces more than
        ``max_frame`` bytes. Frames completed earlier in the same ``data`` are
        lost with the error, which is fine: the stream is unusable after it.
        """
        if self._error is not None:
            raise self._error
        if data:
            self._buffer += data
        frames: list[bytes] = []
        buf = self._buffer
        # Walk with an offset and compact once at the end: deleting from the
        # front of a bytearray per frame would make a chunk holding many small
        # frames (token streaming) quadratic.
        pos = 0
        end = len(buf)
        while True:
            if self._pending is None:
                if end - pos < FRAME_HEADER_SIZE:
                    break
                size = int.from_bytes(buf[pos : pos + FRAME_HEADER_SIZE], "big")
                pos += FRAME_HEADER_SIZE
                if size > self._max_frame:
                    self._error = Oversized(
                        f"peer announced a {size}-byte frame; the limit is {self._max_frame}"
                    )
                    buf.clear()
                    self._pending = None
                    raise self._error
                self._pending = size
            if end - pos < self._pending:
                break
            frames.append(bytes(buf[pos : pos + self._pending]))
            pos += self._pending
            self._pending = None
        if pos:
            del buf[:pos]
        return frames

    def eof(self) -> None:
        """The byte stream ended. Raise ``Truncated`` unless at a frame boundary."""
        if self._error is not None:
            raise self._error
        if self._pending is not None:
            self._error = Truncated(
                f"stream ended {self._pending - len(self._buffer)} bytes short of "
                f"a {self._pending}-byte frame"
            )
            raise self._error
        if self._buffer:
            self._error = Truncated(
                f"stream ended inside a frame header ({len(self._buffer)} of "
                f"{FRAME_HEADER_SIZE} bytes)"
            )
            raise self._error

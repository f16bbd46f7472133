"""How fuzz inputs are made: generated values and mutations of valid ones.

Everything here is driven by one ``random.Random`` passed in, and nothing
else (no clock, no global state), so an input is a pure function of the
generator's state: the engine seeds a fresh state per input from (seed,
target, index) and any input can be made again from those three numbers.

Three families, for the three shapes decoders take:

- **bytes**: random bytes; msgpack values packed canonically or with odd
  encodings (a small integer as uint64, a short string as str32, an ext
  type: the canonicality checks must refuse them); and byte-level
  mutations of valid wires (bit flips, msgpack marker bytes, inserted,
  deleted, duplicated or spliced ranges, truncation, length fields
  overwritten with edge numbers).
- **msgpack values**: structural mutations of a decoded valid value
  (``mutate_value``): a node somewhere in the tree replaced by an edge value
  (huge, negative, wrong type, deep nesting, an over-long string), deleted,
  duplicated or wrapped. The caller repacks, and re-signs signed objects, so
  the mutation reaches past the signature check to the field checks.
- **JSON values**: what ``json.loads`` can hand a parser, and only that:
  objects with string keys, arrays, strings (lone surrogates included: a
  ``\\ud800`` escape makes one), integers of up to 4,300 digits, floats
  including ``NaN`` and ``Infinity`` (Python's parser accepts both), nesting
  below the parser's recursion limit.
"""

from __future__ import annotations

import json
import math
import random
import struct
from collections.abc import Callable, Sequence
from typing import Any

from p2pgpu.core.codec import pack

__all__ = [
    "random_bytes", "random_msgpack", "odd_pack", "mutate_bytes", "mutate_value", "random_json",
    "mutate_json", "mutate_text", "json_text", "safe_pack", "pick", "text_variant", "PACKABLE_INTS",
]

# ------------------------------------------------------------------ edge values

PACKABLE_INTS: tuple[int, ...] = (
    0, 1, -1, 2, 31, 32, 127, 128, 255, 256, -32, -33, -128, -129, 1023, 1024, 1025,
    2**15 - 1, 2**15, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
    2**53, 2**53 + 1, 2**62, 2**62 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**63),
)
"""Integers msgpack can carry (``[-2**63, 2**64 - 1]``) at every limit the
decoders draw: type widths, 2**53 (timestamps), 2**62 (amounts, seqs), 2**63."""

_JSON_INTS: tuple[int, ...] = PACKABLE_INTS + (2**64, -(2**63) - 1, 10**20, -(10**20), 10**400, -(10**400), 10**4000)
_FLOATS: tuple[float, ...] = (0.0, -0.0, 0.5, 1.0, -1.0, 1.5, 2.0, 1e-308, 1e308, -1e308, 2.0**53, 2.0**63,
                              math.inf, -math.inf, math.nan)
_TEXT_LENGTHS = (0, 1, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1024, 1025, 4097, 65537)
_ODD_TEXT = ("", " ", "\x00", "\x1b[31m", "\n", "\u202e", "\ud800", "\udfff", "é", "😀", "\uffff", "/", ":",
             ":latest", "/ip4/1.2.3.4/tcp/1", "NaN", "null", "true", "0", "-1", "1e400", "{}", "[]")
_MARKER_BYTES = bytes([
    0x00, 0x01, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xC8,
    0xC9, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA,
    0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xE0, 0xFF,
])
"""Every msgpack type marker that changes what follows it (fixmap/fixarray/
fixstr bases, nil, never-used 0xc1, bin/ext/float/int/str/array/map heads)."""


def _length(rng: random.Random, small: int = 16, limit: int = 70_000) -> int:
    """Mostly small, sometimes around a power of two, rarely large."""
    roll = rng.random()
    if roll < 0.7:
        return rng.randrange(small + 1)
    if roll < 0.95:
        return min(limit, rng.choice(_TEXT_LENGTHS[:14]))
    return rng.randrange(limit + 1)


def safe_pack(value: Any) -> bytes:
    """``pack(value)``; a value msgpack refuses to pack (nested deeper than
    its packer goes) becomes as deep a nest of one-element arrays, written
    by hand: the decoder still gets to see something that deep."""
    try:
        return pack(value)
    except (ValueError, OverflowError, TypeError):
        return b"\x91" * 3000 + b"\xc0"


def random_bytes(rng: random.Random, limit: int = 70_000) -> bytes:
    return rng.randbytes(_length(rng, 48, limit))


_ASCII = "abcxyz019:/._- "
_LOW = [chr(c) for c in range(0x300)]


def _random_text(rng: random.Random, *, surrogates: bool) -> str:
    roll = rng.random()
    if roll < 0.3:
        text = rng.choice(_ODD_TEXT)
        return text if surrogates or not (0xD800 <= ord(text[:1] or "a") <= 0xDFFF) else "x"
    if roll < 0.6:
        return "".join(rng.choices(_ASCII, k=_length(rng, 12, 300)))
    if roll < 0.8:
        return "".join(rng.choices(_LOW, k=_length(rng, 8, 100)))
    if roll < 0.9:
        codes = [rng.randrange(0x110000) for _ in range(_length(rng, 4, 20))]
        if not surrogates:
            codes = [0xFFFD if 0xD800 <= c <= 0xDFFF else c for c in codes]
        return "".join(map(chr, codes))
    return rng.choice("ax\u00e9") * rng.choice(_TEXT_LENGTHS)


# ------------------------------------------------------------------ msgpack


class _Budget:
    """How many more nodes a random value may have: keeps values small
    (tens of nodes) while any one of them may still be long or deep."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


def random_msgpack(rng: random.Random, depth: int = 0, keys: Sequence[str] = (), budget: _Budget | None = None) -> Any:
    """A value msgpack can pack (ints in range, no lone surrogates), of any shape."""
    if budget is None:
        budget = _Budget(rng.choice((4, 16, 64)))
    budget.left -= 1
    roll = rng.random()
    if depth > 4 or budget.left <= 0 or roll < 0.55:
        kind = rng.randrange(8)
        if kind == 0:
            return None
        if kind == 1:
            return rng.random() < 0.5
        if kind == 2:
            return rng.choice(PACKABLE_INTS) if rng.random() < 0.6 else rng.randrange(-(2**63), 2**64)
        if kind == 3:
            return rng.choice(_FLOATS)
        if kind in (4, 5):
            return _random_text(rng, surrogates=False)
        return rng.choice((b"", bytes(32), rng.randbytes(32), rng.randbytes(64), rng.randbytes(_length(rng))))
    if roll < 0.78:
        return [random_msgpack(rng, depth + 1, keys, budget) for _ in range(min(budget.left, _length(rng, 6, 40)))]
    if roll < 0.96:
        out: dict[Any, Any] = {}
        for _ in range(min(budget.left, _length(rng, 5, 20))):
            key: Any = rng.choice(keys) if keys and rng.random() < 0.7 else _random_text(rng, surrogates=False)
            if rng.random() < 0.1:
                key = key.encode()  # msgpack map keys may be bin too
            out[key] = random_msgpack(rng, depth + 1, keys, budget)
        return out
    if roll < 0.98:
        return [rng.choice((0, None, "", b"", []))] * rng.choice((16, 17, 1025, 65537))  # long and flat
    return _deep(rng, [0])


def _deep(rng: random.Random, leaf: Any, depths: Sequence[int] = (20, 33, 100, 600, 2000)) -> Any:
    value = leaf
    if rng.random() < 0.8:
        for _ in range(rng.choice(depths)):
            value = [value]
    else:
        for _ in range(rng.choice(depths)):
            value = {"a": value}
    return value


def odd_pack(rng: random.Random, value: Any) -> bytes:
    """msgpack bytes for ``value`` with randomly chosen, valid but often
    non-canonical widths (uint64 for 1, str32 for "a", array32 for []), and
    sometimes an ext type: what a canonicality check must refuse."""
    out = bytearray()
    _odd(rng, value, out, 0)
    return bytes(out)


def _odd(rng: random.Random, value: Any, out: bytearray, depth: int) -> None:
    if depth > 40 or rng.random() < 0.05:
        out += safe_pack(value) if depth <= 40 else b"\xc0"
        return
    if rng.random() < 0.01:  # an ext value (fixext 1) where the value was: refused outright
        out += bytes([0xD4, rng.randrange(256), rng.randrange(256)])
        return
    if value is None or type(value) is bool:
        out += safe_pack(value)
    elif type(value) is int:
        forms = []
        if 0 <= value <= 0x7F:
            forms.append(bytes([value]))
        if -32 <= value < 0:
            forms.append(struct.pack(">b", value))
        for marker, fmt, lo, hi in ((0xCC, ">B", 0, 2**8 - 1), (0xCD, ">H", 0, 2**16 - 1), (0xCE, ">I", 0, 2**32 - 1),
                                    (0xCF, ">Q", 0, 2**64 - 1), (0xD0, ">b", -(2**7), 2**7 - 1),
                                    (0xD1, ">h", -(2**15), 2**15 - 1), (0xD2, ">i", -(2**31), 2**31 - 1),
                                    (0xD3, ">q", -(2**63), 2**63 - 1)):
            if lo <= value <= hi:
                forms.append(bytes([marker]) + struct.pack(fmt, value))
        out += rng.choice(forms) if forms else safe_pack(value)
    elif type(value) is float:
        if rng.random() < 0.5:
            out += b"\xca" + struct.pack(">f", value) if abs(value) < 3e38 or not math.isfinite(value) else pack(value)
        else:
            out += b"\xcb" + struct.pack(">d", value)
    elif type(value) in (str, bytes):
        data = value.encode() if type(value) is str else value
        n = len(data)
        if type(value) is str:
            heads = [(0xD9, ">B", 2**8), (0xDA, ">H", 2**16), (0xDB, ">I", 2**32)]
            if n < 32:
                out_head = [bytes([0xA0 | n])]
            else:
                out_head = []
        else:
            heads = [(0xC4, ">B", 2**8), (0xC5, ">H", 2**16), (0xC6, ">I", 2**32)]
            out_head = []
        out_head += [bytes([m]) + struct.pack(f, n) for m, f, lim in heads if n < lim]
        out += rng.choice(out_head) + data
    elif type(value) in (list, tuple):
        n = len(value)
        heads = ([bytes([0x90 | n])] if n < 16 else []) + ([b"\xdc" + struct.pack(">H", n)] if n < 2**16 else [])
        heads.append(b"\xdd" + struct.pack(">I", n))
        out += rng.choice(heads)
        if n > 64:  # long: only the head is odd (re-encoding every item would cost more than decoding it)
            canonical = safe_pack(list(value))
            out += canonical[1 if n < 16 else 3 if n < 2**16 else 5:]
            return
        for item in value:
            _odd(rng, item, out, depth + 1)
    elif type(value) is dict:
        n = len(value)
        heads = ([bytes([0x80 | n])] if n < 16 else []) + ([b"\xde" + struct.pack(">H", n)] if n < 2**16 else [])
        heads.append(b"\xdf" + struct.pack(">I", n))
        out += rng.choice(heads)
        for key, item in value.items():
            _odd(rng, key, out, depth + 1)
            _odd(rng, item, out, depth + 1)
    else:
        out += safe_pack(value)


def mutate_bytes(rng: random.Random, data: bytes, others: Sequence[bytes] = ()) -> bytes:
    """``data`` with 1 to 8 random byte-level edits."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 1, 2, 2, 3, 4, 8))):
        n = len(buf)
        op = rng.randrange(12)
        pos = rng.randrange(n + 1)
        if op == 0 and n:
            buf[pos % n] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[pos % n] = rng.randrange(256)
        elif op == 2 and n:
            buf[pos % n] = rng.choice(_MARKER_BYTES)
        elif op == 3:
            buf[pos:pos] = rng.randbytes(rng.choice((1, 1, 2, 4, 8, 33)))
        elif op == 4 and n:
            del buf[pos: pos + rng.choice((1, 1, 2, 4, 16, 64))]
        elif op == 5 and n:
            start = rng.randrange(n)
            buf[pos:pos] = buf[start: start + rng.choice((1, 4, 16, 64, n))]
        elif op == 6:
            del buf[pos:]
        elif op == 7:
            buf += rng.randbytes(rng.choice((1, 2, 8)))
        elif op == 8 and others:
            other = rng.choice(others)
            buf[pos:] = other[rng.randrange(len(other) + 1):]
        elif op == 9 and n >= 1:
            # an integer field (a msgpack length, a frame header) set to an edge number
            width = rng.choice((1, 2, 4, 8))
            number = rng.choice(PACKABLE_INTS) % (1 << (8 * width))
            buf[pos: pos + width] = number.to_bytes(width, "big")
        elif op == 10 and n >= 2:
            a, b = sorted(rng.sample(range(n), 2))
            buf[a], buf[b] = buf[b], buf[a]
        elif op == 11 and n:
            # repeat a byte many times: long runs find quadratic loops
            buf[pos:pos] = bytes([buf[pos % n]]) * rng.choice((16, 256, 4096))
    return bytes(buf)


# ------------------------------------------------------------------ structure


def _nodes(value: Any, path: tuple = (), out: list | None = None, limit: int = 400) -> list[tuple]:
    """Paths (tuples of keys/indexes) of every node of a list/dict tree."""
    if out is None:
        out = []
    out.append(path)
    if len(path) < 30:
        if type(value) is list:
            for i, item in enumerate(value):
                if len(out) >= limit:
                    break
                _nodes(item, (*path, i), out, limit)
        elif type(value) is dict:
            for key, item in value.items():
                if len(out) >= limit:
                    break
                _nodes(item, (*path, key), out, limit)
    return out


def _get(value: Any, path: tuple) -> Any:
    for step in path:
        value = value[step]
    return value


def _copy(value: Any, depth: int = 0) -> Any:
    """A copy deep enough to edit: ``_nodes`` never reaches below 30 levels,
    so what lies deeper is shared, not copied."""
    if depth > 32:
        return value
    if type(value) is list:
        return [_copy(v, depth + 1) for v in value]
    if type(value) is dict:
        return {k: _copy(v, depth + 1) for k, v in value.items()}
    return value


def _small(value: Any) -> bool:
    """Small enough to repeat a thousand times: not a container, not a long string."""
    return type(value) not in (list, dict) and not (type(value) in (str, bytes) and len(value) > 64)


def _edge_msgpack(rng: random.Random, old: Any) -> Any:
    roll = rng.randrange(10)
    if roll == 0:
        return rng.choice(PACKABLE_INTS)
    if roll == 1 and type(old) is int and not isinstance(old, bool):
        return max(-(2**63), min(2**64 - 1, old + rng.choice((-1, 1, -2**32, 2**32, -old - 1))))
    if roll == 2:
        return rng.choice((None, True, False, 0.0, math.nan, math.inf, 1.5, "", b"", [], {}))
    if roll == 3 and type(old) is bytes:
        return rng.choice((old[:-1], old + b"\x00", old[: len(old) // 2], bytes(len(old)), old.hex().encode()))
    if roll == 4 and type(old) is str:
        if old[:1] in ("{", "[") and rng.random() < 0.6:  # JSON inside msgpack (job params, tool calls)
            return text_variant(rng, old)
        return rng.choice((old[:-1], old + "x", old.upper(), old * 3, old + "\x1b", " " + old, old.encode()))
    if roll == 5:
        return rng.choice(("x" * rng.choice(_TEXT_LENGTHS), b"\x00" * rng.choice((31, 32, 33, 64, 65, 1025, 4097))))
    if roll == 6:
        return _deep(rng, old if type(old) not in (list, dict) else 0)
    if roll == 7 and type(old) in (str, bytes):
        return old.decode("utf-8", "replace") if type(old) is bytes else old.encode()  # the other byte type
    if roll == 8:
        return [old] * rng.choice((1, 2, 17, 1025) if _small(old) else (1, 2))
    return random_msgpack(rng, 3)


def text_variant(rng: random.Random, text: str) -> str:
    """Another text where ``text`` was, as msgpack can carry it (no lone
    surrogates): JSON text is edited as text or as a value and written back
    with ``\\u`` escapes (so a ``\\ud800`` escape gets through); other
    text becomes an edge case (base64 gone wrong, control characters, sizes)."""
    if text[:1] in ("{", "[") and rng.random() < 0.8:
        if rng.random() < 0.5:
            edited = mutate_text(rng, text)
        else:
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                value = None
            edited = json_text(rng, mutate_value(rng, value, json=True)) if value is not None else text
            if rng.random() < 0.5:
                try:
                    edited = json.dumps(json.loads(edited), ensure_ascii=True)
                except (ValueError, RecursionError):
                    pass  # not JSON any more (json_text's stand-in for the unwritable): keep it as it is
    else:
        edited = rng.choice((
            "", "=", "====", "AAAA", "AAA=", "A" * 5, "QUJD\n", "é", "\x00", "\x1b[2J", text[:-1], text * 2,
            "x" * rng.choice((4096, 65536, 65537)), mutate_text(rng, text), '{"name":"a","arguments":{}}',
        ))
    return edited.encode("utf-8", "replace").decode("utf-8")


def mutate_value(rng: random.Random, value: Any, *, json: bool = False, keys: Sequence[str] = ()) -> Any:
    """A copy of ``value`` (a list/dict tree) with 1 to 3 structural edits.

    With ``json``, replacement values are JSON's (huge ints, NaN, lone
    surrogates) instead of msgpack's (bytes, ints that fit 64 bits)."""
    value = _copy(value)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        paths = _nodes(value)
        path = rng.choice(paths)
        old = _get(value, path)
        op = rng.randrange(10)
        if not path:
            if op < 2 and type(value) in (list, dict):
                value = [value] if op == 0 else {rng.choice(keys) if keys else "x": value}
            else:
                value = random_json(rng, 2, keys) if json else random_msgpack(rng, 2, keys)
            continue
        parent, key = _get(value, path[:-1]), path[-1]
        if op == 0:  # delete
            del parent[key]
        elif op == 1 and type(parent) is list:  # duplicate
            parent.insert(key, _copy(old))
        elif op == 2 and type(parent) is dict:  # a key from the vocabulary, any value
            new_key = rng.choice(keys) if keys and rng.random() < 0.8 else _random_text(rng, surrogates=json)
            parent[new_key] = random_json(rng, 3, keys) if json else random_msgpack(rng, 3, keys)
        elif op == 3 and type(parent) is list:
            parent.append(random_json(rng, 3, keys) if json else random_msgpack(rng, 3, keys))
        else:
            parent[key] = _edge_json(rng, old, keys) if json else _edge_msgpack(rng, old)
    return value


# ------------------------------------------------------------------ JSON


def _edge_json(rng: random.Random, old: Any, keys: Sequence[str]) -> Any:
    roll = rng.randrange(10)
    if roll == 0:
        return rng.choice(_JSON_INTS)
    if roll == 1:
        return rng.choice(_FLOATS)
    if roll == 2:
        return rng.choice((None, True, False, "", [], {}, 0, 1, -1))
    if roll == 3:
        return rng.choice(_ODD_TEXT)
    if roll == 4 and type(old) is str:
        return rng.choice((old[:-1], old + "\ud800", old.upper(), old * 3, old + "\x1b", " " + old, [old], {old: old}))
    if roll == 5:
        return "x" * rng.choice(_TEXT_LENGTHS)
    if roll == 6:
        return _deep_json(rng, old if type(old) not in (list, dict) else 0)
    if roll == 7 and type(old) in (int, float) and not isinstance(old, bool):
        return rng.choice((-old, old + 1, old - 1, float(old) if abs(old) < 1e300 else old, str(old)))
    if roll == 8:  # many copies of something small; of anything else only two (sizes must not multiply)
        return [old] * rng.choice((1, 2, 17, 65, 1025) if _small(old) else (1, 2))
    return random_json(rng, 3, keys)


def _deep_json(rng: random.Random, leaf: Any) -> Any:
    # json.loads stops near 1,000 levels (RecursionError), so a parsed value
    # is never deeper than that; deeper values would be inputs no parser
    # ever hands its caller.
    return _deep(rng, leaf, (20, 31, 32, 33, 100, 500, 900))


def random_json(rng: random.Random, depth: int = 0, keys: Sequence[str] = (), budget: _Budget | None = None) -> Any:
    """A value ``json.loads`` could return."""
    if budget is None:
        budget = _Budget(rng.choice((4, 16, 64)))
    budget.left -= 1
    roll = rng.random()
    if depth > 4 or budget.left <= 0 or roll < 0.55:
        kind = rng.randrange(7)
        if kind == 0:
            return None
        if kind == 1:
            return rng.random() < 0.5
        if kind == 2:
            return rng.choice(_JSON_INTS) if rng.random() < 0.5 else rng.randrange(-1000, 100_000)
        if kind == 3:
            return rng.choice(_FLOATS) if rng.random() < 0.6 else rng.uniform(-3, 3)
        return _random_text(rng, surrogates=True) if rng.random() < 0.7 or not keys else rng.choice(keys)
    if roll < 0.78:
        return [random_json(rng, depth + 1, keys, budget) for _ in range(min(budget.left, _length(rng, 5, 40)))]
    if roll < 0.97:
        return {
            (rng.choice(keys) if keys and rng.random() < 0.8 else _random_text(rng, surrogates=True)):
                random_json(rng, depth + 1, keys, budget)
            for _ in range(min(budget.left, _length(rng, 5, 20)))
        }
    if roll < 0.98:
        return [rng.choice((0, None, "", [], {}))] * rng.choice((16, 17, 65, 1025))
    return _deep_json(rng, None)


def mutate_json(rng: random.Random, seeds: Sequence[Any], keys: Sequence[str]) -> Any:
    """A JSON value: mostly a mutated seed, sometimes a random one."""
    if rng.random() < 0.15:
        return random_json(rng, 0, keys)
    return mutate_value(rng, rng.choice(seeds), json=True, keys=keys)


def json_text(rng: random.Random, value: Any) -> str:
    """``value`` as JSON text, in one of the spellings a parser must accept."""
    roll = rng.random()
    try:
        if roll < 0.6:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        if roll < 0.8:
            return json.dumps(value, ensure_ascii=True)
        return json.dumps(value, indent=rng.choice((1, 2)), ensure_ascii=rng.random() < 0.5)
    except (ValueError, RecursionError):
        return "[" * 50_000  # deeper than the encoder goes: the parser's own limit


def mutate_text(rng: random.Random, text: str, others: Sequence[str] = ()) -> str:
    """``text`` with 1 to 4 character-level edits (JSON-aware: brackets,
    quotes, escapes, numbers)."""
    chars = list(text)
    for _ in range(rng.choice((1, 1, 2, 4))):
        n = len(chars)
        pos = rng.randrange(n + 1)
        op = rng.randrange(8)
        if op == 0 and n:
            del chars[pos: pos + rng.choice((1, 1, 3, 10))]
        elif op == 1:
            chars[pos:pos] = list(rng.choice(('"', "{", "}", "[", "]", ",", ":", "\\", "\\u", "\\ud800", "1e999",
                                              "-", "0", "99999999999999999999", "NaN", "Infinity", "null", "\x00",
                                              "\ud800", " ")))
        elif op == 2:
            del chars[pos:]
        elif op == 3 and n:
            chars[pos % n] = chr(rng.randrange(0x80 if rng.random() < 0.8 else 0x110000))
        elif op == 4 and n:
            start = rng.randrange(n)
            chars[pos:pos] = chars[start: start + rng.choice((1, 8, 64, n))]
        elif op == 5:
            depth = rng.choice((10, 100, 1000, 5000))
            chars[pos:pos] = list(rng.choice(("[", '{"a":')) * depth)
        elif op == 6 and others:
            other = rng.choice(others)
            chars[pos:] = list(other[rng.randrange(len(other) + 1):])
        elif op == 7:
            chars[pos:pos] = list("9" * rng.choice((20, 400, 4299, 4301, 5000)))
    return "".join(chars)


def pick(rng: random.Random, weighted: Sequence[tuple[float, Callable[[], Any]]]) -> Any:
    """Call one of ``(weight, make)`` pairs, chosen by weight."""
    total = sum(w for w, _ in weighted)
    roll = rng.random() * total
    for weight, make in weighted:
        roll -= weight
        if roll < 0:
            return make()
    return weighted[-1][1]()

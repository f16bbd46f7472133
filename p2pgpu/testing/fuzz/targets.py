"""The fuzz targets: every decoder and validator that takes bytes or JSON
from outside, each with its own input maker and its own idea of success.

A target's ``run(value)`` calls the real code on one input. It returns
(the input decoded), raises one of ``allowed`` (the typed refusal: a
``P2PGPUError`` for the core, a 4xx ``GatewayError`` for the gateway's
translators), raises ``Bad`` when an extra check of its own fails (the API
answered 500, chunking changed what ``FrameDecoder`` decoded, a decoded
object does not re-encode to its wire), or raises anything else: an
untyped exception, which is a finding. ``generate(rng)`` makes one input
from a seeded ``random.Random`` and the seed corpus.

Targets are classes, not functions, because several need state built once
per process (a ledger replica to copy, an API app, a key vocabulary); the
state never carries from one input to the next, so every input is
reproducible on its own.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, ClassVar
from urllib.parse import quote, unquote

import msgpack

from p2pgpu.core import jobs, peerex, sync
from p2pgpu.core.codec import MAX_SIGNED_SIZE, Signed, decode_signed, pack, unpack
from p2pgpu.core.framing import FrameDecoder
from p2pgpu.core.genesis import Genesis
from p2pgpu.core.jobparams import JobParams
from p2pgpu.core.kv import MemoryStore
from p2pgpu.core.ledger import Ledger, _parse_voucher, decode_entry, make_voucher, parse_waiver
from p2pgpu.core.offers import OfferBook, decode_offer_message
from p2pgpu.core.protocols import MAX_FRAME
from p2pgpu.errors import P2PGPUError
from p2pgpu.testing.fuzz.corpus import IMAGE, JOB_ID, NOW_MS, Corpus, frames_of, resign
from p2pgpu.testing.fuzz.inputs import (
    _get, _nodes, json_text, mutate_bytes, mutate_json, mutate_text, mutate_value, odd_pack, pick, random_bytes,
    random_json, random_msgpack, safe_pack, text_variant,
)

__all__ = ["Bad", "Target", "TARGETS", "render"]


class Bad(Exception):
    """A target's own check failed: ``what`` says which; ``cause`` is the
    exception behind it when there is one (the API logs the exception that
    made its 500)."""

    def __init__(self, what: str, cause: BaseException | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.cause = cause


# ------------------------------------------------------------------ rendering

MAX_RENDER = 16_384


def render(value: Any) -> str:
    """An input as text: bytes and strings in hex (the exact bytes; a
    string as its UTF-8, lone surrogates kept), JSON values as JSON,
    tuples item by item."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, str):
        return "utf8:" + value.encode("utf-8", "surrogatepass").hex()
    if isinstance(value, tuple):
        return " ".join(f"[{i}]={render(item)}" for i, item in enumerate(value))
    try:
        return "json:" + json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        return repr(value)


# ------------------------------------------------------------------ structure-aware mutation


def _looks_signed(data: Any) -> bool:
    if type(data) is not bytes or len(data) < 70 or data[0] != 0x92:
        return False
    try:
        value = msgpack.unpackb(data, raw=False)
    except Exception:  # noqa: BLE001 - not msgpack at all: not a signed wire
        return False
    return type(value) is list and len(value) == 2 and type(value[0]) is bytes and type(value[1]) is bytes \
        and len(value[1]) == 64


def mutate_wire(c: Corpus, rng: random.Random, data: bytes, depth: int = 0) -> bytes:
    """A structural mutation of msgpack ``data``. A signed wire has its
    payload mutated and is re-signed by the payload's signer (so the
    decoder's field checks see the mutation, not a bad signature); signed
    wires nested inside (a voucher in a CLAIM, the HOLD in a request, entries
    in a sync message) are mutated and re-signed the same way."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - not msgpack: mutate the bytes instead
        return mutate_bytes(rng, data)
    if _looks_signed(data) and depth < 4 and rng.random() < 0.9:
        payload, signature = value
        mutated = mutate_wire(c, rng, payload, depth + 1)
        return resign(c, mutated) if rng.random() < 0.9 else pack([mutated, signature])
    nested = [p for p in _nodes(value) if p and _looks_signed(_get(value, p))]
    if nested and depth < 4 and rng.random() < 0.4:
        path = rng.choice(nested)
        parent = _get(value, path[:-1])
        parent[path[-1]] = mutate_wire(c, rng, parent[path[-1]], depth + 1)
        return safe_pack(value)
    return safe_pack(mutate_value(rng, value))


# ------------------------------------------------------------------ the base


class Target:
    """One decoder or validator under fuzz (module docstring)."""

    name: ClassVar[str]
    calls: ClassVar[str]  # what it runs, for ``--list`` and the docs
    allowed: ClassVar[tuple[type[BaseException], ...]] = (P2PGPUError,)
    asynchronous: ClassVar[bool] = False  # ``run`` is a coroutine function (the API)

    def __init__(self, c: Corpus) -> None:
        self.c = c

    def generate(self, rng: random.Random) -> Any:
        raise NotImplementedError

    def run(self, value: Any) -> Any:
        raise NotImplementedError

    def render(self, value: Any) -> str:
        return render(value)


class BytesTarget(Target):
    """A decoder of one byte string: random bytes, random msgpack (packed
    canonically or oddly), byte-level and structural mutations of the seeds,
    a seed re-encoded with other widths, and the seeds themselves."""

    def seeds(self) -> Sequence[bytes]:
        raise NotImplementedError

    def __init__(self, c: Corpus) -> None:
        super().__init__(c)
        self._seeds = list(self.seeds())
        self._splice = c.all_bytes

    def generate(self, rng: random.Random) -> bytes:
        return make_bytes(self.c, rng, self._seeds, self._splice)


def make_bytes(c: Corpus, rng: random.Random, seeds: Sequence[bytes], splice: Sequence[bytes]) -> bytes:
    seed = rng.choice(seeds)
    return pick(rng, [
        (0.08, lambda: random_bytes(rng)),
        (0.07, lambda: safe_pack(random_msgpack(rng))),
        (0.05, lambda: odd_pack(rng, random_msgpack(rng))),
        (0.35, lambda: mutate_bytes(rng, seed, splice)),
        (0.35, lambda: mutate_wire(c, rng, seed)),
        (0.07, lambda: odd_pack(rng, msgpack.unpackb(seed, raw=False))),
        (0.03, lambda: seed),
    ])


# ------------------------------------------------------------------ codec


class CodecUnpack(BytesTarget):
    name = "codec.unpack"
    calls = "p2pgpu.core.codec.unpack(data, max_size=MAX_SIGNED_SIZE)"

    def seeds(self) -> Sequence[bytes]:
        return self.c.all_bytes

    def run(self, value: bytes) -> Any:
        return unpack(value, max_size=MAX_SIGNED_SIZE)


class CodecDecodeSigned(BytesTarget):
    name = "codec.decode_signed"
    calls = "p2pgpu.core.codec.decode_signed(wire, network_id=...) (any tag, signature verified)"

    def seeds(self) -> Sequence[bytes]:
        return self.c.signed

    def run(self, value: bytes) -> Signed:
        signed = decode_signed(value, network_id=self.c.network_id)
        if signed.wire != value:
            raise Bad("decoded object's wire differs from the input")
        return signed


# ------------------------------------------------------------------ framing


class Framing(Target):
    name = "framing.FrameDecoder"
    calls = "p2pgpu.core.framing.FrameDecoder.feed (random chunking) and .eof; chunking must not change the result"

    def generate(self, rng: random.Random) -> tuple[int, bytes, tuple[int, ...]]:
        payloads = [rng.choice(self.c.all_bytes) if rng.random() < 0.9 else b"" for _ in range(rng.randrange(1, 5))]
        data = frames_of(payloads)
        if rng.random() < 0.6:
            data = mutate_bytes(rng, data, self.c.all_bytes)
        elif rng.random() < 0.1:
            data = random_bytes(rng)
        max_frame = rng.choice((MAX_FRAME, MAX_FRAME, 0, 1, 64, 1024, 2**32 - 1))
        cuts = tuple(sorted(rng.randrange(len(data) + 1) for _ in range(rng.choice((0, 1, 2, 5, 20)))))
        return max_frame, data, cuts

    @staticmethod
    def _decode(max_frame: int, chunks: Sequence[Any]) -> tuple[list[bytes], type | None]:
        decoder = FrameDecoder(max_frame)
        frames: list[bytes] = []
        try:
            for chunk in chunks:
                frames += decoder.feed(chunk)
            decoder.eof()
        except P2PGPUError as exc:
            again = None
            try:
                decoder.eof()
            except P2PGPUError as second:
                again = second
            if again is not exc:
                raise Bad("a poisoned decoder does not raise its first error again") from None
            return frames, type(exc)
        return frames, None

    def run(self, value: tuple[int, bytes, tuple[int, ...]]) -> Any:
        max_frame, data, cuts = value
        whole = self._decode(max_frame, [data])
        bounds = (0, *cuts, len(data))
        kinds = (bytes, bytearray, memoryview)
        chunks = [kinds[i % 3](data[a:b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        split = self._decode(max_frame, chunks)
        if whole[1] != split[1] or (whole[1] is None and whole[0] != split[0]):
            raise Bad(f"chunking changed the result: {whole[1]} vs {split[1]}")
        return whole

    def render(self, value: Any) -> str:
        max_frame, data, cuts = value
        return f"max_frame={max_frame} cuts={list(cuts)} data={data.hex()}"


# ------------------------------------------------------------------ offers


class OfferDecode(BytesTarget):
    name = "offers.decode_offer_message"
    calls = "p2pgpu.core.offers.decode_offer_message(wire, network_id, now_ms)"

    def seeds(self) -> Sequence[bytes]:
        return self.c.offers

    def run(self, value: bytes) -> Any:
        return decode_offer_message(value, self.c.network_id, NOW_MS)


class OfferBookAccept(Target):
    name = "offers.OfferBook"
    calls = ("p2pgpu.core.offers.OfferBook.accept on 1-5 messages in a row (a full book: 1 provider, 1 tombstone), "
             "then expire/live/models")

    def generate(self, rng: random.Random) -> tuple:
        items = []
        for _ in range(rng.randrange(1, 6)):
            wire = rng.choice(self.c.offers) if rng.random() < 0.3 else make_bytes(
                self.c, rng, self.c.offers, self.c.all_bytes)
            items.append((wire, rng.choice((0, 0, 1, 1_000, 30_000, 200_000))))
        return tuple(items)

    def run(self, value: tuple) -> Any:
        book = OfferBook(self.c.network_id, max_providers=1, max_tombstones=1)
        now = NOW_MS - 2_000
        for wire, step in value:
            now += step
            try:
                book.accept(wire, now)
            except self.allowed:
                pass
        book.expire(now)
        return book.live(now), book.models(now)

    def render(self, value: tuple) -> str:
        return " ".join(f"[+{step}ms]={wire.hex()}" for wire, step in value)


# ------------------------------------------------------------------ ledger


class EntryDecode(BytesTarget):
    name = "ledger.decode_entry"
    calls = "p2pgpu.core.ledger.decode_entry(wire, network_id) (signature verified)"

    def seeds(self) -> Sequence[bytes]:
        return self.c.entries

    def run(self, value: bytes) -> Any:
        entry = decode_entry(value, self.c.network_id)
        if entry.wire != value:
            raise Bad("decoded entry's wire differs from the input")
        return entry


class VoucherParse(BytesTarget):
    name = "ledger.parse_voucher"
    calls = "p2pgpu.core.ledger._parse_voucher(wire, network_id) (what a CLAIM embeds)"

    def seeds(self) -> Sequence[bytes]:
        return self.c.vouchers

    def run(self, value: bytes) -> Any:
        return _parse_voucher(value, self.c.network_id)


class WaiverParse(BytesTarget):
    name = "ledger.parse_waiver"
    calls = "p2pgpu.core.ledger.parse_waiver(wire, network_id)"

    def seeds(self) -> Sequence[bytes]:
        return self.c.waivers

    def run(self, value: bytes) -> Any:
        return parse_waiver(value, self.c.network_id)


class LedgerOffer(Target):
    name = "ledger.Ledger.offer"
    calls = ("p2pgpu.core.ledger.Ledger.offer on 1-3 entries (mostly mutated and re-signed) against a replica "
             "holding the corpus's history, then tick and commit; conservation must hold")

    def __init__(self, c: Corpus) -> None:
        super().__init__(c)
        store = MemoryStore()
        replica = Ledger(store, c.genesis)
        for wire in c.history:
            replica.offer(wire, NOW_MS)
        replica.commit()
        self._snapshot = store.dump()

    def generate(self, rng: random.Random) -> tuple[bytes, ...]:
        return tuple(
            rng.choice(self.c.entries) if rng.random() < 0.1 else mutate_wire(self.c, rng, rng.choice(self.c.entries))
            if rng.random() < 0.8 else make_bytes(self.c, rng, self.c.entries, self.c.all_bytes)
            for _ in range(rng.randrange(1, 4))
        )

    def run(self, value: tuple[bytes, ...]) -> Any:
        store = MemoryStore()
        store.write(self._snapshot, sync=False)
        ledger = Ledger(store, self.c.genesis)
        for wire in value:
            try:
                ledger.offer(wire, NOW_MS)
            except self.allowed:
                pass
        ledger.tick(NOW_MS + 10**7)
        ledger.commit()
        total, minted = ledger.conservation()
        if total != minted:
            raise Bad(f"conservation broken: accounts hold {total}, {minted} were minted")
        return ledger


# ------------------------------------------------------------------ jobs


class JobFrameDecode(BytesTarget):
    name = "jobs.decode_frame"
    calls = "p2pgpu.core.jobs.decode_frame(data)"

    def seeds(self) -> Sequence[bytes]:
        return self.c.job_frames

    def run(self, value: bytes) -> Any:
        return jobs.decode_frame(value)


class RequestDecode(Target):
    name = "jobs.decode_request"
    calls = "p2pgpu.core.jobs.decode_request(wire, body, network_id) (mutated bodies re-hashed and re-signed)"

    def generate(self, rng: random.Random) -> tuple[bytes, bytes]:
        wire, body = rng.choice(self.c.requests)
        roll = rng.random()
        if roll < 0.35:  # a new body, hashed and signed for: the body decoder sees it
            body = _mutate_body(rng, body)
            wire = _with_body_hash(self.c, wire, jobs.body_hash(body))
        elif roll < 0.55:
            body = mutate_bytes(rng, body)
        elif roll < 0.85:
            wire = mutate_wire(self.c, rng, wire)
        elif roll < 0.95:
            wire = mutate_bytes(rng, wire, self.c.all_bytes)
        else:
            body = rng.choice(self.c.requests)[1]
        return wire, body

    def run(self, value: tuple[bytes, bytes]) -> Any:
        return jobs.decode_request(value[0], value[1], self.c.network_id)

    def render(self, value: tuple[bytes, bytes]) -> str:
        return f"wire={value[0].hex()} body={value[1].hex()}"


def _mutate_body(rng: random.Random, body: bytes) -> bytes:
    value = msgpack.unpackb(body, raw=False)
    roll = rng.random()
    if roll < 0.15 and type(value) is dict and "params" in value:
        params = value["params"]
        value["params"] = _clean(mutate_text(rng, params) if rng.random() < 0.5 else
                                 json_text(rng, mutate_value(rng, json.loads(params), json=True, keys=PARAMS_KEYS)))
        return pack(value)
    if roll < 0.25 and type(value) is dict:
        value["params"] = _clean(json_text(rng, mutate_json(rng, [{}], PARAMS_KEYS)))
        return pack(value)
    if roll < 0.3:
        return odd_pack(rng, value)
    return safe_pack(mutate_value(rng, value))


def _clean(text: str) -> str:
    """``text`` without lone surrogates, which msgpack cannot carry (a
    JSON ``\\ud800`` escape still can, and does)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _with_body_hash(c: Corpus, wire: bytes, digest: bytes) -> bytes:
    payload, _ = msgpack.unpackb(wire, raw=False)
    fields = msgpack.unpackb(payload, raw=False)
    fields[8] = digest  # [tag, version, net, signer, ts, job_id, model, kind, body hash, ...]
    return resign(c, pack(fields))


class ReceiptDecode(BytesTarget):
    name = "jobs.decode_receipt"
    calls = "p2pgpu.core.jobs.decode_receipt(wire, network_id)"

    def seeds(self) -> Sequence[bytes]:
        return self.c.receipts

    def run(self, value: bytes) -> Any:
        return jobs.decode_receipt(value, self.c.network_id)


class BodyDecode(Target):
    name = "jobs.decode_body"
    calls = "p2pgpu.core.jobs._decode_body(kind, body) (the prompt, messages, inputs and params of a REQUEST)"

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        wire, body = rng.choice(self.c.requests)
        kind = msgpack.unpackb(msgpack.unpackb(wire)[0], raw=False)[7]
        if rng.random() < 0.1:
            kind = rng.choice(jobs.KINDS)
        if rng.random() < 0.9:
            body = _mutate_body(rng, body) if rng.random() < 0.7 else mutate_bytes(rng, body)
        return kind, body

    def run(self, value: tuple[str, bytes]) -> Any:
        return jobs._decode_body(value[0], value[1])

    def render(self, value: tuple[str, bytes]) -> str:
        return f"kind={value[0]} body={value[1].hex()}"


def _mutate_frames(c: Corpus, rng: random.Random, frames: list[bytes], pool: Sequence[bytes]) -> list[bytes]:
    frames = list(frames)
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.randrange(8)
        i = rng.randrange(len(frames)) if frames else 0
        if op >= 6 and frames:
            frames[i] = _retoken(rng, frames[i])
        elif op <= 1 and frames:
            frames[i] = mutate_wire(c, rng, frames[i])
        elif op == 2 and frames:
            frames[i] = mutate_bytes(rng, frames[i], pool)
        elif op == 3:
            frames.insert(i, rng.choice(pool))
        elif op == 4 and frames:
            del frames[i]
        elif op == 5 and len(frames) > 1:
            j = rng.randrange(len(frames))
            frames[i], frames[j] = frames[j], frames[i]
    return frames


def _retoken(rng: random.Random, frame: bytes) -> bytes:
    """A TOKENS frame with another text, channel or count (what the consumer
    checks output against), still well-formed; other frames unchanged."""
    try:
        value = msgpack.unpackb(frame, raw=False)
    except Exception:  # noqa: BLE001 - an earlier edit broke it: leave it broken
        return frame
    if type(value) is not list or len(value) < 6 or value[0] != jobs.TOKENS or type(value[3]) is not str \
            or type(value[5]) is not int:
        return frame
    roll = rng.random()
    if roll < 0.6:
        value[3] = text_variant(rng, value[3])
    elif roll < 0.8:
        channel = rng.choice((0, 1, 2, 3, 4, 255))
        value[6:] = [channel] if channel else []
    else:
        value[4] = rng.choice((1, 2, 4096, 4097))
        value[5] = value[5] - 1 + value[4]
    return safe_pack(value)


class ConsumerSessionRun(Target):
    name = "jobs.ConsumerSession"
    calls = ("p2pgpu.core.jobs.ConsumerSession: start, then a provider's frames (mutated from whole valid jobs), "
             "timers and cancels; a refused frame ends the stream as the edge does (connection_lost)")

    def __init__(self, c: Corpus) -> None:
        super().__init__(c)
        self._requests = [decode_signed(w, network_id=c.network_id) for w, _ in c.requests]

    def generate(self, rng: random.Random) -> tuple:
        index, frames = rng.choice(self.c.consumer_scripts)
        if rng.random() < 0.9:
            frames = _mutate_frames(self.c, rng, frames, self.c.job_frames)
        steps: list[tuple] = [("frame", f) for f in frames]
        for _ in range(rng.choice((0, 0, 1, 2))):
            steps.insert(rng.randrange(len(steps) + 1),
                         rng.choice((("timer", rng.choice((1, 15_000, 40_000))), ("cancel",), ("lost",))))
        return index, tuple(steps)

    def run(self, value: tuple) -> Any:
        index, steps = value
        session = jobs.ConsumerSession(self.c.keys["alice"], self.c.network_id, self._requests[index],
                                       self.c.requests[index][1])
        now = NOW_MS
        actions = session.start(now)
        for step in steps:
            now += 1
            try:
                if step[0] == "frame":
                    actions += session.receive(step[1], now)
                elif step[0] == "timer":
                    now += step[1]
                    actions += session.on_timer(now)
                elif step[0] == "cancel":
                    actions += session.cancel(now)
                else:
                    actions += session.connection_lost(now)
            except self.allowed:
                actions += session.connection_lost(now)
                break
        return actions

    def render(self, value: tuple) -> str:
        index, steps = value
        return f"request={index} " + " ".join(
            f"frame={s[1].hex()}" if s[0] == "frame" else ":".join(map(str, s)) for s in steps)


class ProviderSessionRun(Target):
    name = "jobs.ProviderSession"
    calls = ("p2pgpu.core.jobs.ProviderSession: open, a REQUEST frame, then the consumer's frames (vouchers, "
             "cancels) mixed with the edge's own calls (accept, tokens, finished, voucher_kept, timers)")

    def __init__(self, c: Corpus) -> None:
        super().__init__(c)
        alice, hold = c.keys["alice"], c.hold
        assert hold is not None
        self._requests = [jobs.encode_frame(jobs.REQUEST, JOB_ID, w, b, []) for w, b in c.requests]
        self._remote = [jobs.encode_frame(jobs.VOUCHER, JOB_ID, make_voucher(alice, c.network_id, hold.id, amount,
                                                                             NOW_MS).wire)
                        for amount in (1, 3, 50, 10_000, 10**9)]
        self._remote.append(jobs.encode_frame(jobs.CANCEL, JOB_ID, jobs.R_USER, "stop"))

    def generate(self, rng: random.Random) -> tuple:
        index = rng.randrange(len(self._requests))
        request = self._requests[index]
        if rng.random() < 0.3:
            request = mutate_wire(self.c, rng, request) if rng.random() < 0.7 else mutate_bytes(rng, request)
        local = (("accept",), ("tokens", "tok", 1, 0), ("tokens", "x" * 40, 7, 0), ("tokens", "think", 2, 1),
                 ("tokens", '{"name":"weather","arguments":{}}', 1, 2), ("tokens", "AACAPwAAAEA=", 1, 3),
                 ("finished", 12, 9), ("failed",), ("kept", 3), ("kept", 10_000), ("timer", 11_000), ("cancel",),
                 ("lost",))
        steps: list[tuple] = [("frame", request), ("accept",)]
        for _ in range(rng.randrange(1, 9)):
            if rng.random() < 0.45:
                frame = rng.choice(self._remote)
                if rng.random() < 0.5:
                    frame = mutate_wire(self.c, rng, frame) if rng.random() < 0.7 else mutate_bytes(rng, frame)
                steps.append(("frame", frame))
            else:
                steps.append(rng.choice(local))
        return rng.random() < 0.5, tuple(steps)

    def run(self, value: tuple) -> Any:
        durable, steps = value
        session = jobs.ProviderSession(self.c.keys["bob"], self.c.network_id,
                                       jobs.SessionConfig(durable_vouchers=durable))
        now = NOW_MS
        actions = session.open(now)
        for step in steps:
            now += 1
            kind = step[0]
            try:
                if kind == "frame":
                    try:
                        actions += session.receive(step[1], now)
                    except self.allowed:
                        session.connection_lost(now)
                        break
                elif kind == "accept":
                    actions += session.accept(now)
                elif kind == "tokens":
                    actions += session.tokens(now, step[1], step[2], step[3])
                elif kind == "finished":
                    actions += session.finished(now, step[1], step[2])
                elif kind == "failed":
                    actions += session.failed(now, "backend failed")
                elif kind == "kept":
                    actions += session.voucher_kept(now, step[1])
                elif kind == "timer":
                    now += step[1]
                    actions += session.on_timer(now)
                elif kind == "cancel":
                    actions += session.cancel(now, "shutting down")
                else:
                    actions += session.connection_lost(now)
            except jobs.LocalProtocolError:
                pass  # the edge's own call out of turn: our script's doing, not the peer's
        return actions

    def render(self, value: tuple) -> str:
        durable, steps = value
        return f"durable={durable} " + " ".join(
            f"frame={s[1].hex()}" if s[0] == "frame" else ":".join(map(str, s)) for s in steps)


# ------------------------------------------------------------------ JSON texts

PARAMS_KEYS = ("options", "format", "tools", "think", "images", "message_extras", "truncate", "dimensions",
               "temperature", "top_p", "min_p", "typical_p", "top_k", "seed", "repeat_penalty", "repeat_last_n",
               "presence_penalty", "frequency_penalty", "stop", "num_ctx", "num_predict", "type", "function", "name",
               "parameters", "properties", "arguments", "tool_calls", "tool_name", "thinking", "description")


class TextTarget(Target):
    """A parser of JSON text: mutated seeds (as values, then written in
    some spelling), text-level edits of the seeds, random JSON, and texts
    no encoder writes (deep nesting, 5,000-digit numbers)."""

    keys: ClassVar[tuple[str, ...]] = ()

    def seeds(self) -> Sequence[str]:
        raise NotImplementedError

    def __init__(self, c: Corpus) -> None:
        super().__init__(c)
        self._seeds = list(self.seeds())
        self._values = [json.loads(s) for s in self._seeds]

    def generate(self, rng: random.Random) -> str:
        # Both parsers get text from strict UTF-8 (a msgpack string, a file's
        # bytes), which never holds a lone surrogate; a JSON \\ud800 escape
        # still makes one inside the parsed value, and does.
        return _clean(self._text(rng))

    def _text(self, rng: random.Random) -> str:
        return pick(rng, [
            (0.5, lambda: json_text(rng, mutate_json(rng, self._values, self.keys))),
            (0.3, lambda: mutate_text(rng, rng.choice(self._seeds), self._seeds)),
            (0.1, lambda: json_text(rng, random_json(rng, 0, self.keys))),
            (0.05, lambda: rng.choice(("[", '{"a":', "-")) * rng.choice((10, 999, 1000, 5000, 100_000))),
            (0.05, lambda: random_bytes(rng, 5000).decode("latin-1")),
        ])


class ParamsFromJson(TextTarget):
    name = "jobparams.JobParams.from_json"
    calls = "p2pgpu.core.jobparams.JobParams.from_json(text); a success must survive to_json/from_json unchanged"
    keys = PARAMS_KEYS

    def seeds(self) -> Sequence[str]:
        return self.c.params_texts

    def run(self, value: str) -> Any:
        params = JobParams.from_json(value)
        if JobParams.from_json(params.to_json()) != params:
            raise Bad("params changed through to_json/from_json")
        return params


class GenesisFromJson(TextTarget):
    name = "genesis.Genesis.from_json"
    calls = "p2pgpu.core.genesis.Genesis.from_json(text); a success must survive to_json/from_json unchanged"
    keys = ("version", "name", "created_ms", "faucet", "allocations", "params", "max_clock_skew_ms",
            "release_grace_ms", "max_hold_ms")

    def seeds(self) -> Sequence[str]:
        return self.c.genesis_texts

    def run(self, value: str) -> Any:
        genesis = Genesis.from_json(value)
        if Genesis.from_json(genesis.to_json()) != genesis:
            raise Bad("genesis changed through to_json/from_json")
        return genesis


# ------------------------------------------------------------------ sync and peer exchange


class SyncDecode(BytesTarget):
    name = "sync.decode_message"
    calls = "p2pgpu.core.sync.decode_message(data)"

    def seeds(self) -> Sequence[bytes]:
        return self.c.sync_messages

    def run(self, value: bytes) -> Any:
        return sync.decode_message(value)


class AnnouncementDecode(BytesTarget):
    name = "sync.decode_announcement"
    calls = "p2pgpu.core.sync.decode_announcement(data)"

    def seeds(self) -> Sequence[bytes]:
        return self.c.announcements

    def run(self, value: bytes) -> Any:
        return sync.decode_announcement(value)


class PeerRequestDecode(BytesTarget):
    name = "peerex.decode_request"
    calls = "p2pgpu.core.peerex.decode_request(data)"

    def seeds(self) -> Sequence[bytes]:
        return self.c.peer_requests

    def run(self, value: bytes) -> Any:
        return peerex.decode_request(value)


class PeerReplyDecode(BytesTarget):
    name = "peerex.decode_reply"
    calls = "p2pgpu.core.peerex.decode_reply(data)"

    def seeds(self) -> Sequence[bytes]:
        return self.c.peer_replies

    def run(self, value: bytes) -> Any:
        return peerex.decode_reply(value)


# ------------------------------------------------------------------ gateway


_TOOL = {"type": "function", "function": {"name": "weather", "description": "the weather",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
OLLAMA_CHAT = [
    {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "llama3.2:1b", "stream": False, "think": "low", "keep_alive": "5m", "format": {"type": "object"},
     "tools": [_TOOL], "options": {"temperature": 0.5, "num_predict": 64, "num_ctx": 4096, "stop": ["\n"], "seed": 1},
     "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "images": [IMAGE]},
                  {"role": "assistant", "content": "", "thinking": "hm",
                   "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
                  {"role": "tool", "content": "sunny", "tool_name": "weather"}]},
]
OLLAMA_GENERATE = [
    {"model": "llama3.2:1b", "prompt": "why is the sky blue?"},
    {"model": "llama3.2:1b", "prompt": "describe", "system": "brief", "images": [IMAGE], "format": "json",
     "stream": True, "think": True, "options": {"top_k": 40, "top_p": 0.9, "num_predict": -1, "repeat_last_n": 64}},
]
OPENAI_CHAT = [
    {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hi"}]},
    {"model": "llama3.2:1b", "max_tokens": 64, "temperature": 0.2, "top_p": 0.9, "seed": 1, "stop": ["\n"],
     "stream": True, "stream_options": {"include_usage": True}, "n": 1, "tools": [_TOOL], "tool_choice": "auto",
     "reasoning_effort": "low",
     "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}},
     "messages": [{"role": "developer", "content": "be brief"},
                  {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                               {"type": "image_url",
                                                "image_url": {"url": "data:image/png;base64," + IMAGE}}]},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function",
                       "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]},
]
OPENAI_COMPLETION = [
    {"model": "llama3.2:1b", "prompt": "once upon a time"},
    {"model": "llama3.2:1b", "prompt": ["once"], "max_tokens": 16, "temperature": 0, "stop": "\n", "stream": False,
     "echo": False, "best_of": 1, "suffix": "", "n": 1, "logprobs": None, "user": "me"},
]


def _keys_of(values: Sequence[Any], extra: Sequence[str] = ()) -> tuple[str, ...]:
    found = set(extra)
    for value in values:
        stack = [value]
        while stack:
            item = stack.pop()
            if type(item) is dict:
                found.update(item)
                stack.extend(item.values())
            elif type(item) is list:
                stack.extend(item)
    return tuple(sorted(found))


class GatewayTarget(Target):
    """A gateway translator on a JSON value: it returns, or raises a
    ``GatewayError`` with a 4xx status."""

    translate: ClassVar[Callable[..., Any]]
    bodies: ClassVar[list[Any]]

    def __init__(self, c: Corpus) -> None:
        super().__init__(c)
        from p2pgpu.gateway.jobs import GatewayError  # the gateway imports trio: only where it is fuzzed

        self.allowed = (GatewayError,)
        self._keys = _keys_of(self.bodies, PARAMS_KEYS + ("logprobs", "top_logprobs", "suffix", "template", "raw",
                                                           "context", "echo", "best_of", "functions", "audio"))

    def generate(self, rng: random.Random) -> Any:
        return mutate_json(rng, self.bodies, self._keys)

    def run(self, value: Any) -> Any:
        from p2pgpu.gateway.jobs import prompt_bound

        try:
            # what a handler does with a body before anything is spent: translate it,
            # then size its prompt (which builds the job's body)
            request = type(self).translate(value, 256)[0]
            return prompt_bound(request)
        except self.allowed as exc:
            if not 400 <= exc.status < 500:  # type: ignore[attr-defined]
                raise Bad(f"GatewayError with status {exc.status}") from None  # type: ignore[attr-defined]
            raise


def _gateway_targets() -> list[type[Target]]:
    from p2pgpu.gateway import ollama_api, openai_api

    made = []
    for name, fn, bodies in (("gateway.ollama.chat_request", ollama_api.chat_request, OLLAMA_CHAT),
                             ("gateway.ollama.generate_request", ollama_api.generate_request, OLLAMA_GENERATE),
                             ("gateway.openai.chat_request", openai_api.chat_request, OPENAI_CHAT),
                             ("gateway.openai.completion_request", openai_api.completion_request, OPENAI_COMPLETION)):
        made.append(type(name.replace(".", "_"), (GatewayTarget,), {
            "name": name,
            "calls": f"p2pgpu.gateway.{fn.__module__.rsplit('.', 1)[1]}.{fn.__name__}(body, 256), then "
                     "gateway.jobs.prompt_bound on the request (as the handler does)",
            "translate": staticmethod(fn), "bodies": bodies,
        }))
    return made


# ------------------------------------------------------------------ the local API


class _LogCatcher(logging.Handler):
    """Keeps the exception of the last ERROR record (the API logs the one
    behind each 500), and keeps those records off the terminal."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.exc: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.exc = record.exc_info[1]


class Api(Target):
    name = "api"
    calls = ("the local API app (p2pgpu.api.create_app over a fake node) on whole HTTP requests: "
             "mutated bodies, random bytes, paths and queries; never a 500, never an exception out of the app")
    asynchronous = True

    ROUTES = (("POST", "/v1/send"), ("POST", "/v1/faucet"), ("POST", "/v1/submit"), ("GET", "/v1/wallet"),
              ("GET", "/v1/offers"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/{id}"), ("POST", "/v1/jobs/{id}/cancel"),
              ("GET", "/v1/status"), ("GET", "/v1/peers"), ("GET", "/v1/ping"))

    def __init__(self, c: Corpus) -> None:
        super().__init__(c)
        from p2pgpu.testing.fake_view import ALICE, BOB, CAROL

        self._bodies: dict[str, list[Any]] = {
            "/v1/send": [{"to": BOB, "amount": 1_000, "memo": "tea"}, {"to": CAROL, "coins": "1.5"}],
            "/v1/faucet": [{"to": ALICE, "amount": 5}, {"to": BOB, "coins": "0.000001"}],
            "/v1/submit": [
                {"model": "llama3.2:3b", "prompt": "why is the sky blue?"},
                {"model": "qwen2.5:7b", "messages": [["system", "brief"], ["user", "hi"]], "max_tokens": 16,
                 "max_price": 1_000, "retry": False, "system": "be kind",
                 "params": {"options": {"temperature": 0.5, "stop": ["\n"]}, "format": {"type": "object"},
                            "tools": [_TOOL], "think": "low",
                            "message_extras": [[1, {"images": [IMAGE], "thinking": "hm"}]]}},
                {"model": "llama3.2:3b", "prompt": "describe", "max_price_coins": "0.5",
                 "params": {"images": [IMAGE], "format": "json", "think": True}},
                {"model": "nomic-embed-text", "input": ["one", "two"], "params": {"truncate": True, "dimensions": 8}},
            ],
            "/v1/jobs/{id}/cancel": [{}],
        }
        self._keys = _keys_of([b for bodies in self._bodies.values() for b in bodies], PARAMS_KEYS)
        self._queries = ["", "model=llama3.2:3b", "account=" + BOB, "role=consumer&limit=5", "limit=10000",
                         "role=provider", "x=1"]
        self._app = None

    def generate(self, rng: random.Random) -> tuple[str, bytes, bytes, bool]:
        """(method, request target, body, whether the token is sent). The
        target is what hypercorn can hand the app: h11 takes only visible
        ASCII there, so anything else arrives percent-encoded."""
        method, path = rng.choice(self.ROUTES)
        route = path
        if "{id}" in path:
            ref = rng.choice(("0123abcd", "00112233445566778899aabbccddeeff", "0123", "ab", "zz", "%00", "..",
                              _random_text_ascii(rng), "0" * 33))
            path = path.replace("{id}", ref)
        if rng.random() < 0.05:
            method = rng.choice(("GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "X" * 20))
        if rng.random() < 0.05:
            path = rng.choice(("/", "/v1", "/v1/", "/v1/status/", "//v1/ping", "/v1/jobs/", "/v2/send")) \
                + _random_text_ascii(rng)
        query = rng.choice(self._queries)
        if rng.random() < 0.2:
            query = mutate_text(rng, query, self._queries)
        target = _target_bytes(path) + (b"?" + _target_bytes(query) if query or rng.random() < 0.1 else b"")
        body = b""
        seeds = self._bodies.get(route, [])
        if method == "POST" or rng.random() < 0.1:
            roll = rng.random()
            if seeds and roll < 0.7:
                text = json_text(rng, mutate_json(rng, seeds, self._keys))
                if rng.random() < 0.15:
                    text = mutate_text(rng, text)
                body = text.encode("utf-8", "surrogatepass")
            elif roll < 0.85:
                body = json_text(rng, random_json(rng, 0, self._keys)).encode("utf-8", "surrogatepass")
            elif roll < 0.95:
                body = random_bytes(rng, 80_000)
            else:
                body = rng.choice((b"", b" ", b"{}", b"null", b"[" * 5000, b"1" * 5000, b"\xff\xfe"))
        return method, target, body, rng.random() < 0.97

    def _make_app(self) -> Any:
        from p2pgpu.api import create_app
        from p2pgpu.testing.fake_view import TOKEN

        self._view = _fuzz_view_class()()
        proxy = _Proxy(self)
        self._app = create_app(proxy, TOKEN)  # type: ignore[arg-type]
        self._token = TOKEN
        self._catcher = _LogCatcher()
        for name in ("p2pgpu.api", "p2pgpu.httpserve"):
            log = logging.getLogger(name)
            log.addHandler(self._catcher)
            log.propagate = False

    async def run(self, value: tuple[str, bytes, bytes, bool]) -> Any:  # type: ignore[override]
        import trio

        if self._app is None:
            self._make_app()
        self._view = _fuzz_view_class()()  # a fresh wallet for every request
        self._catcher.exc = None
        method, target, body, authorized = value
        headers = [(b"host", b"127.0.0.1"), (b"content-length", str(len(body)).encode())]
        if authorized:
            headers.append((b"authorization", b"Bearer " + self._token.encode()))
        raw_path, _, query = target.partition(b"?")  # as hypercorn builds the scope
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": unquote(raw_path.decode("ascii")), "raw_path": raw_path,
                 "query_string": query, "root_path": "", "headers": headers, "client": ("127.0.0.1", 50000),
                 "server": ("127.0.0.1", 5001)}
        done = trio.Event()
        sent_body = False
        status: list[int] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                done.set()

        with trio.move_on_after(30):
            try:
                await self._app(scope, receive, send)
            except Exception as exc:
                raise Bad("exception out of the app", exc) from None
        if not status:
            raise Bad("no response")
        if status[0] >= 500:
            raise Bad(f"status {status[0]}", self._catcher.exc)
        return status[0]

    def render(self, value: tuple[str, bytes, bytes, bool]) -> str:
        method, target, body, authorized = value
        return f"{method} {target.decode('ascii')} token={'yes' if authorized else 'no'} body={body.hex()}"


def _random_text_ascii(rng: random.Random) -> str:
    return "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(0, 40)))


def _target_bytes(text: str) -> bytes:
    """``text`` as h11 lets it through: visible ASCII, the rest percent-encoded."""
    return quote(text, safe="".join(chr(c) for c in range(0x21, 0x7F)), errors="surrogatepass").encode("ascii")


class _Proxy:
    """The view the app holds: forwards to the target's current fresh view."""

    def __init__(self, target: Api) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target._view, name)


@functools.cache
def _fuzz_view_class() -> type:
    from p2pgpu.core.jobrecords import match_job, parse_job_ref
    from p2pgpu.core.submission import work_of
    from p2pgpu.errors import JobStateConflict
    from p2pgpu.testing.fake_view import FakeNodeView

    ids = [bytes.fromhex("0123abcd" + "00" * 12), bytes.fromhex("0123abce" + "11" * 12), bytes(range(16))]

    class FuzzView(FakeNodeView):
        """``FakeNodeView`` plus the job routes and a one-token ``submit``."""

        def __init__(self) -> None:
            super().__init__(on_trio_thread=False)

        async def submit(self, request: Any) -> Any:
            # the node's first step with a request (p2pgpu.consumer): its work, whose body must encode
            work_of(request.prompt, request.messages, request.system, request.max_tokens, request.max_price,
                    params=request.params, inputs=request.inputs)
            yield {"type": "token", "text": "hi"}
            yield {"type": "done", "tokens": 1, "cost": 1}

        def jobs(self, role: str | None, limit: int) -> list[dict[str, Any]]:
            return []

        def job(self, job_id: str) -> dict[str, Any]:
            return {"id": match_job(ids, parse_job_ref(job_id)).hex(), "text": ""}

        async def cancel_job(self, job_id: str) -> dict[str, Any]:
            found = match_job(ids, parse_job_ref(job_id))
            if found == ids[0]:
                raise JobStateConflict("the job has ended")
            return {"id": found.hex()}

    return FuzzView


# ------------------------------------------------------------------ the table


def _all() -> dict[str, type[Target]]:
    classes: list[type[Target]] = [
        CodecUnpack, CodecDecodeSigned, Framing, OfferDecode, OfferBookAccept, EntryDecode, VoucherParse,
        WaiverParse, LedgerOffer, JobFrameDecode, RequestDecode, ReceiptDecode, BodyDecode, ConsumerSessionRun,
        ProviderSessionRun, ParamsFromJson, SyncDecode, AnnouncementDecode, PeerRequestDecode, PeerReplyDecode,
        GenesisFromJson, Api, *_gateway_targets(),
    ]
    return {cls.name: cls for cls in classes}


TARGETS: dict[str, type[Target]] = _all()
"""Every target by name, in the order they are reported."""

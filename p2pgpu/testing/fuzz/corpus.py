"""The seed corpus: one valid example of every wire object, made with the
real constructors (``Ledger.send``, ``make_offer``, ``make_request``...).

Mutating valid objects reaches much deeper than random bytes: a flipped
byte inside a valid offer gets past the msgpack and shape checks to the
field checks behind them, and a re-signed mutation (``resign``) gets past
the signature too. Every key, clock value and text here is fixed, and
ed25519 signatures are deterministic, so the corpus is the same bytes in
every process and every run: an input is reproducible from (seed, target,
index) alone.
"""

from __future__ import annotations

import base64
import functools
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from p2pgpu.core import jobs, peerex, sync
from p2pgpu.core.codec import Tag, pack, sign_object
from p2pgpu.core.framing import encode_frame as frame_bytes
from p2pgpu.core.genesis import Genesis
from p2pgpu.core.hardware import GpuInfo, HardwareReport
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.jobparams import JobParams, MessageExtra, ToolCall, canonical_json
from p2pgpu.core.kv import MemoryStore
from p2pgpu.core.ledger import (
    BASIS_CLAIM, BASIS_PROVIDER_ENTRY, BASIS_TIMEOUT, BASIS_WAIVER, SEND, Entry, Ledger, make_voucher, make_waiver,
)
from p2pgpu.core.offers import ModelOffer, make_offer, make_withdrawal
from p2pgpu.testing.ledger import SIM_PARAMS, START_MS, key_for, make_genesis

__all__ = ["Corpus", "corpus", "NOW_MS"]

NOW_MS = START_MS + 300_000
"""The clock every target decodes at: after the whole corpus was made, and
before its offers expire."""

JOB_ID = bytes(range(16))
IMAGE = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(24)).decode()


@dataclass
class Corpus:
    """Valid objects by kind, and what it takes to re-sign a mutation."""

    genesis: Genesis
    network_id: bytes
    keys: dict[str, NodeKey]
    by_public_key: dict[bytes, NodeKey]
    entries: list[bytes] = field(default_factory=list)  # ledger entry wires, every kind and basis, a fork
    history: list[bytes] = field(default_factory=list)  # the entries a replica starts from (no fork)
    vouchers: list[bytes] = field(default_factory=list)
    waivers: list[bytes] = field(default_factory=list)
    offers: list[bytes] = field(default_factory=list)  # offers and withdrawals
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)  # (signed request, body)
    receipts: list[bytes] = field(default_factory=list)
    job_frames: list[bytes] = field(default_factory=list)
    consumer_scripts: list[tuple[int, list[bytes]]] = field(default_factory=list)  # (request index, frames from P)
    sync_messages: list[bytes] = field(default_factory=list)
    announcements: list[bytes] = field(default_factory=list)
    peer_requests: list[bytes] = field(default_factory=list)
    peer_replies: list[bytes] = field(default_factory=list)
    genesis_texts: list[str] = field(default_factory=list)
    params_texts: list[str] = field(default_factory=list)
    hold: Entry | None = None  # alice's hold for JOB_ID, provider bob

    @property
    def signed(self) -> list[bytes]:
        """Every signed wire of the corpus."""
        return [*self.entries, *self.vouchers, *self.waivers, *self.offers, *(w for w, _ in self.requests),
                *self.receipts]

    @property
    def all_bytes(self) -> list[bytes]:
        """Every byte string of the corpus, signed or not (splice material)."""
        return [*self.signed, *(b for _, b in self.requests), *self.job_frames, *self.sync_messages,
                *self.announcements, *self.peer_requests, *self.peer_replies]


@functools.cache
def corpus() -> Corpus:
    """The corpus (built once per process, a few tens of milliseconds)."""
    names = ("alice", "bob", "carol", "faucet")
    keys = {name: key_for(name) for name in names}
    genesis = make_genesis(names=("alice", "bob", "carol"), allocation=10**12, params=SIM_PARAMS)
    c = Corpus(genesis, genesis.network_id, keys, {k.public_key: k for k in keys.values()})
    _ledger(c)
    _offers(c)
    _jobs(c)
    _sync(c)
    _peers(c)
    c.genesis_texts = [
        genesis.to_json(),
        make_genesis(names=(), params=SIM_PARAMS, name="empty").to_json(),
        json.dumps({"version": 1, "name": "minimal", "created_ms": 0, "faucet": keys["faucet"].peer_id}),
    ]
    return c


def _ledger(c: Corpus) -> None:
    alice, bob, carol, faucet = (c.keys[n] for n in ("alice", "bob", "carol", "faucet"))
    world = Ledger(MemoryStore(), c.genesis)
    net, t = c.network_id, START_MS + 1_000
    made: list[Entry] = []
    made.append(world.mint(faucet, 5_000_000, t, "drip"))
    made.append(world.send(faucet, alice.public_key, 1_000_000, t + 1, "welcome"))
    made.append(world.send(alice, bob.public_key, 250_000, t + 2, "tea"))
    made.append(world.receive(bob, made[-1].id, t + 3))
    made.append(world.receive(alice, made[1].id, t + 4))
    # a hold claimed with a voucher, then released on the claim
    hold = world.hold(alice, bob.public_key, 2_000_000, t + 50_000, b"job-claimed", t + 5)
    voucher = make_voucher(alice, net, hold.id, 1_500, t + 6)
    claim = world.claim(bob, hold.id, voucher, t + 7)
    made += [hold, claim, world.release(alice, hold.id, BASIS_CLAIM, claim.id, t + 8)]
    # a hold the provider waived
    hold = world.hold(alice, carol.public_key, 100_000, t + 50_000, b"job-waived", t + 9)
    waiver = make_waiver(carol, net, hold.id, "busy", t + 10)
    made += [hold, world.release(alice, hold.id, BASIS_WAIVER, waiver.wire, t + 11)]
    # holds released on the provider's later entry, and on time alone
    short = world.hold(alice, bob.public_key, 10_000, t + 1_000, b"job-lapsed", t + 12)
    gone = world.hold(alice, carol.public_key, 10_000, t + 1_000, b"job-vanished", t + 13)
    marker = world.send(bob, alice.public_key, 1, t + 2_000, "after expiry")
    made += [short, gone, marker, world.release(alice, short.id, BASIS_PROVIDER_ENTRY, marker.id, t + 2_001)]
    late = t + 1_000 + SIM_PARAMS.release_grace_ms + 1
    made.append(world.release(alice, gone.id, BASIS_TIMEOUT, b"", late))
    # the hold every job request of the corpus spends from
    c.hold = world.hold(alice, bob.public_key, 10**11, late + 500_000, JOB_ID, late + 1)
    made.append(c.hold)
    world.commit()
    c.history = [e.wire for e in made]
    # a fork: bob signs a second entry at a seq he has used
    fork = sign_object(bob, Tag.ENTRY, net, late + 2, [1, b"", SEND, [alice.public_key, 7, "twice"]])
    c.entries = [*c.history, fork.wire]
    c.vouchers = [voucher.wire, make_voucher(alice, net, c.hold.id, 10**6, late + 3).wire]
    c.waivers = [waiver.wire, make_waiver(bob, net, c.hold.id, "", late + 4).wire]


def _offers(c: Corpus) -> None:
    bob, carol = c.keys["bob"], c.keys["carol"]
    now = NOW_MS - 1_000
    h100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-8f1c2e4a-0000-1111-2222-333344445555", 80 * 2**30, 70 * 2**30, 3,
                   "550.54.15", "12.4", (9, 0))
    unknown = GpuInfo(1, None, None, None, None, None, None, None)
    gpus = HardwareReport((h100, unknown), True)
    models = [ModelOffer("llama3.2:1b", True, 1_300_000_000), ModelOffer("qwen2.5:7b"),
              ModelOffer("registry.ollama.ai/library/mistral", False, 4 * 2**30)]
    c.offers = [
        make_offer(bob, c.network_id, now, seq=now, ttl_ms=30_000, hardware=gpus, models=models, price_in=500_000,
                   price_out=1_500_000, slots_free=1, slots_total=2,
                   addrs=["/ip4/10.0.0.7/tcp/4001", "/ip6/::1/tcp/4001"]).wire,
        make_offer(carol, c.network_id, now, seq=1, ttl_ms=120_000,
                   hardware=HardwareReport((), False, "NVML Shared Library Not Found"),
                   models=[ModelOffer("qwen2.5:7b", True)], price_in=0, price_out=1, slots_free=0, slots_total=0,
                   addrs=[], cpu=True, agent="").wire,
        make_withdrawal(bob, c.network_id, now + 1, seq=now + 1).wire,
    ]


def _jobs(c: Corpus) -> None:
    alice, bob = c.keys["alice"], c.keys["bob"]
    net, now, hold = c.network_id, NOW_MS - 2_000, c.hold
    assert hold is not None
    prices = jobs.Prices(1_000, 2_000)
    common: dict[str, Any] = dict(job_id=JOB_ID, model="llama3.2:1b", hold=hold, prices=prices,
                                  max_prompt_tokens=4_000, max_tokens=200, credit_window=16)
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    tools = [{"type": "function", "function": {"name": "weather", "description": "the weather",
                                               "parameters": {"type": "object", "properties": {}}}}]
    chat_params = JobParams(
        options=(("stop", ("\n\n",)), ("temperature", 0.7), ("top_k", 40)), tools_json=canonical_json(tools),
        think="high", message_extras=(
            (1, MessageExtra(tool_calls=(ToolCall.of("weather", {"city": "Oslo"}),), thinking="hm")),
            (2, MessageExtra(images=(IMAGE,), tool_name="weather")),
        ),
    )
    generate_params = JobParams(options=(("seed", 7),), format=canonical_json(schema), images=(IMAGE,), think=True)
    made = [
        jobs.make_request(alice, net, now, prompt="why is the sky blue?", **common),
        jobs.make_request(alice, net, now, messages=[("system", "be brief"), ("assistant", ""), ("tool", "sunny"),
                                                     ("user", "and tomorrow?")], params=chat_params, **common),
        jobs.make_request(alice, net, now, prompt="json please", params=generate_params, **common),
        jobs.make_request(alice, net, now, inputs=["one", "two"],
                          params=JobParams(truncate=True, dimensions=256), **{**common, "max_tokens": 2}),
        jobs.make_request(alice, net, now, messages=[("user", "hi")], **common),
    ]
    c.requests = [(signed.wire, body) for signed, body in made]
    c.params_texts = [JobParams().to_json(), chat_params.to_json(), generate_params.to_json(),
                      JobParams(truncate=False, dimensions=1).to_json(),
                      JobParams(options=(("frequency_penalty", -2.0), ("min_p", 0.05), ("repeat_last_n", -1),
                                         ("seed", -(2**63)))).to_json()]

    # What bob answers each request with: a whole job per request.
    waiver = make_waiver(bob, net, hold.id, "busy", now + 1).wire
    texts = {0: [(jobs.CONTENT, "Rayleigh", 2), (jobs.CONTENT, " scattering.", 3)],
             1: [(jobs.THINKING, "they ask", 2), (jobs.TOOL_CALL, canonical_json({"name": "weather", "arguments":
                                                                                  {"city": "Oslo"}}), 1),
                 (jobs.CONTENT, "Sunny.", 1)],
             2: [(jobs.CONTENT, '{"answer":"blue"}', 5)],
             3: [(jobs.EMBEDDING, base64.b64encode(struct.pack("<4f", 0.1, 0.2, 0.3, 0.4)).decode(), 1),
                 (jobs.EMBEDDING, base64.b64encode(struct.pack("<4f", 1, 2, 3, 4)).decode(), 1)],
             4: [(jobs.CONTENT, "hello", 1)]}
    for index, frames in texts.items():
        script = [jobs.encode_frame(jobs.ACCEPT, JOB_ID)]
        total = 0
        for seq, (channel, text, count) in enumerate(frames):
            total += count
            args = [seq, text, count, total] + ([channel] if channel != jobs.CONTENT else [])
            script.append(jobs.encode_frame(jobs.TOKENS, JOB_ID, *args))
        receipt = jobs.make_receipt(bob, net, now + 100, job_id=JOB_ID, hold_id=hold.id, status=jobs.DONE,
                                    prompt_eval_count=12, eval_count=total, output_tokens=total,
                                    durations_ns=(5_000_000, 1_000, 2_000, 3_000),
                                    out_hash=jobs.output_hash_of((ch, tx) for ch, tx, _ in frames), cost=1)
        c.receipts.append(receipt.wire)
        script.append(jobs.encode_frame(jobs.RECEIPT, JOB_ID, receipt.wire))
        c.consumer_scripts.append((index, script))
    c.consumer_scripts += [
        (0, [jobs.encode_frame(jobs.REJECT, JOB_ID, jobs.R_BUSY, "no free slot", waiver)]),
        (0, [jobs.encode_frame(jobs.ACCEPT, JOB_ID), jobs.encode_frame(jobs.ERROR, JOB_ID, jobs.R_BACKEND, "oom",
                                                                     waiver)]),
        (0, [jobs.encode_frame(jobs.ACCEPT, JOB_ID), jobs.encode_frame(jobs.TOKENS, JOB_ID, 0, "Ray", 1, 1),
             jobs.encode_frame(jobs.CANCEL, JOB_ID, jobs.R_UNPAID, "unpaid"), c.consumer_scripts[0][1][-1]]),
    ]
    voucher = make_voucher(alice, net, hold.id, 1, now + 50).wire
    c.job_frames = [
        jobs.encode_frame(jobs.REQUEST, JOB_ID, c.requests[0][0], c.requests[0][1], [c.history[1]]),
        jobs.encode_frame(jobs.REQUEST, JOB_ID, c.requests[1][0], c.requests[1][1], []),
        jobs.encode_frame(jobs.VOUCHER, JOB_ID, voucher),
        jobs.encode_frame(jobs.CANCEL, JOB_ID, jobs.R_USER, "cancelled by the user"),
        *(frame for _, script in c.consumer_scripts for frame in script),
    ]


def _sync(c: Corpus) -> None:
    alice, bob = c.keys["alice"], c.keys["bob"]
    ids = [sync_id for sync_id in (msgpack.unpackb(w)[0] for w in c.entries[:3])]
    from p2pgpu.core.codec import object_id

    tips = tuple(object_id(payload) for payload in ids)
    c.sync_messages = [
        sync.encode_message(sync.Heads((sync.HeadInfo(alice.public_key, 7, tips[:1]),
                                        sync.HeadInfo(bob.public_key, 2, tips[1:3])), True)),
        sync.encode_message(sync.Heads((), False)),
        sync.encode_message(sync.Entries(tuple(c.entries[:4]))),
        sync.encode_message(sync.End(4, False)),
        sync.encode_message(sync.Fetch(tips)),
        sync.encode_message(sync.Refusal(sync.ERR_BUSY, "busy")),
    ]
    c.announcements = [sync.encode_announcement(c.entries[:1]), sync.encode_announcement(c.entries[2:6]),
                       sync.fork_proof([(object_id(msgpack.unpackb(w)[0]), w) for w in c.entries[-2:]])]


def _peers(c: Corpus) -> None:
    bob, carol = c.keys["bob"], c.keys["carol"]
    c.peer_requests = [peerex.encode_request(["/ip4/10.0.0.5/tcp/4001", "/ip6/::1/tcp/4001"]),
                       peerex.encode_request([])]
    c.peer_replies = [peerex.encode_reply([(bob.peer_id, ["/ip4/10.0.0.7/tcp/4001"]),
                                           (carol.peer_id, ["/ip4/10.0.0.8/tcp/4001", "/ip6/::1/tcp/1"])]),
                      peerex.encode_reply([])]


def frames_of(payloads: list[bytes]) -> bytes:
    """Length-prefixed frames (``p2pgpu.core.framing``) of ``payloads``, back to back."""
    return b"".join(frame_bytes(p) for p in payloads)


def resign(c: Corpus, payload: bytes, fallback: bytes = bytes(64)) -> bytes:
    """``[payload, signature]`` signed by the key the payload names as its
    signer, when the corpus holds that key (else ``fallback`` as the signature)."""
    signer = None
    try:
        body = msgpack.unpackb(payload, raw=False)
        if type(body) is list and len(body) > 3 and type(body[3]) is bytes:
            signer = c.by_public_key.get(body[3])
    except Exception:  # noqa: BLE001 - any undecodable payload just keeps the fallback signature
        pass
    return pack([payload, signer.sign(payload) if signer is not None else fallback])

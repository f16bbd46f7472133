"""The market as this node sees it: the offer book it follows and its own offer.

Theory of operation
-------------------
``Market.follow`` subscribes to the network's offers topic with the book's
own check as the topic validator, so invalid or stale offers are neither
delivered nor forwarded; every offer the book accepts (a withdrawal
included) is announced to ``on_offer`` with its provider's key: the
consumer side subscribes to it to hand out slots that just came free. A
second task expires offers whose TTL ran out.

``Market.provide`` is the provider's heartbeat: every beat it reads the
local Ollama's models and the GPUs, signs a fresh offer and publishes it
(``p2pgpu.core.heartbeat`` decides what to read, what to advertise, why
there is nothing to offer, and when the next beat is due: early when a
job took or freed a slot, ``beat_soon``, or Ollama failed a job,
``backend_suspect``). ``leave`` stops the heartbeat and withdraws the
offer, so the network hears we are gone rather than waiting for expiry.

This module imports neither the consumer side nor the node; the
composition root connects ``on_offer`` and ``serving`` (the provider
service whose slot count and model list the offer reflects).
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from p2pgpu import __version__
from p2pgpu.config import NodeConfig
from p2pgpu.core.genesis import Genesis
from p2pgpu.core.hardware import HardwareReport
from p2pgpu.core.heartbeat import HeartbeatConfig, book_max_ttl_ms, next_beat_at, offer_refusal, plan_beat, slots_free
from p2pgpu.core.identity import NodeKey, peer_id_from_public_key
from p2pgpu.core.offers import (
    ModelOffer, OfferBook, StaleOffer, make_offer, make_withdrawal, next_seq, normalize_model_name,
)
from p2pgpu.core.protocols import offers_topic
from p2pgpu.core.units import format_coins
from p2pgpu.errors import ExecutionFailed, P2PGPUError
from p2pgpu.executor import OllamaBackend
from p2pgpu.gpu import probe
from p2pgpu.net import P2PHost

log = logging.getLogger(__name__)

__all__ = ["MarketConfig", "Market", "Serving", "AGENT"]

AGENT = f"p2pgpu/{__version__}"
NOT_PROVIDING = "not providing (started with --no-provide, or provide = false)"


@dataclass(frozen=True, slots=True)
class MarketConfig:
    """What our offer says and how the book is kept."""

    provide: bool = True
    price_in: int = 500_000
    price_out: int = 1_500_000
    slots: int = 1
    offer_cpu: bool = False
    offer_ttl_s: float = 30.0
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    max_clock_skew_ms: int = 60_000
    withdrawal_linger_s: float = 0.5  # gossip has no acknowledgement: let the withdrawal leave our queues
    withdraw_timeout_s: float = 1.0
    expire_interval_s: float = 1.0
    arrivals_kept: int = 64  # recent offers remembered per provider, as [seq, signed_ms, received_ms]
    listen_addrs_offered: int = 8

    @property
    def max_ttl_ms(self) -> int:
        return book_max_ttl_ms(self.offer_ttl_s)

    @classmethod
    def from_node(cls, config: NodeConfig) -> MarketConfig:
        return cls(provide=config.provide, price_in=config.price_in, price_out=config.price_out,
                   slots=config.slots, offer_cpu=config.offer_cpu, offer_ttl_s=config.offer_ttl_s,
                   heartbeat=HeartbeatConfig(heartbeat_s=config.heartbeat_s))


class Serving(Protocol):
    """What the offer reflects of the provider service (``ProviderService``)."""

    active: int  # jobs holding a slot now
    models: set[str] | None  # the served model names admission checks


class Market:
    """The offer book we follow and, when we provide, our heartbeat offer.

    ``book``, ``arrivals`` (per provider, its recent offers as (seq,
    signed_ms, received_ms): how fresh the book is, and what the gossip
    benchmark reads), ``advertising`` and ``note`` (why we offer what we
    do, for the node's status) are read by the node's views.
    """

    def __init__(self, key: NodeKey, genesis: Genesis, backend: OllamaBackend, config: MarketConfig, *,
                 now_ms: Callable[[], int], on_offer: Callable[[bytes], None] | None = None) -> None:
        self.key, self.genesis, self.backend, self.config = key, genesis, backend, config
        self.now_ms = now_ms
        self.on_offer = on_offer
        self.serving: Serving | None = None
        self.book = OfferBook(genesis.network_id, max_skew_ms=config.max_clock_skew_ms, max_ttl_ms=config.max_ttl_ms)
        self.arrivals: dict[bytes, collections.deque[tuple[int, int, int]]] = {}
        self.hardware: HardwareReport | None = None
        self.advertising = False
        self.note = "starting" if config.provide else NOT_PROVIDING
        self.host: P2PHost | None = None
        self._topic = offers_topic(genesis.network_tag)
        self._offer_seq = 0
        self._beat_now = trio.Event()  # offer again before the heartbeat is due
        self._early_asked: float | None = None  # when (trio time) that was asked for
        self._recheck_backend = False  # ...and ask Ollama again first (a job saw it fail)
        self._provide_scope = trio.CancelScope()

    # ------------------------------------------------------------ the book

    async def follow(self, host: P2PHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the offers topic (started once subscribed) and expire offers."""
        self.host = host

        def validate(from_peer: str, data: bytes) -> bool:
            try:
                self.book.check(data, self.now_ms())
                return True
            except StaleOffer as exc:  # a race or a replay: honest peers send these too
                log.debug("offer from %s refused: %s", from_peer, exc)
                return False
            except P2PGPUError as exc:
                if from_peer == host.peer_id:  # our own: publish raises PublishRejected for it
                    log.debug("our own offer refused: %s", exc)
                else:
                    host.peer_log.failed(log, from_peer, self._topic, exc)
                return False

        host.set_topic_validator(self._topic, validate)
        subscription = await host.subscribe(self._topic)
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire_offers)
            async for message in subscription:
                self._accept_offer(message.data, message.from_peer_id)

    async def _expire_offers(self) -> None:
        while True:
            for provider in self.book.expire(self.now_ms()):
                log.info("offer of %s expired", peer_id_from_public_key(provider))
            await trio.sleep(self.config.expire_interval_s)

    def _accept_offer(self, wire: bytes, source: str) -> None:
        now = self.now_ms()
        try:
            message = self.book.accept(wire, now)
        except P2PGPUError as exc:  # raced with a newer one, or expired in flight
            log.debug("offer from %s dropped: %s", source, exc)
            return
        arrivals = self.arrivals.setdefault(message.provider, collections.deque(maxlen=self.config.arrivals_kept))
        arrivals.append((message.seq, message.timestamp_ms, now))
        if self.on_offer is not None:
            self.on_offer(message.provider)

    def _record_own(self, wire: bytes) -> None:
        """Our own offer or withdrawal in our own book (gossip may already
        have delivered it back to us, which is fine)."""
        self._accept_offer(wire, "self")

    # ------------------------------------------------------------ our offer

    async def provide(self) -> None:
        """Publish a fresh signed offer every heartbeat while Ollama answers,
        until ``leave``."""
        with self._provide_scope:
            await self._provide_forever()

    def beat_soon(self) -> None:
        """A job took or freed a slot: offer again soon, not a heartbeat later."""
        if self._early_asked is None:
            self._early_asked = trio.current_time()
        self._beat_now.set()

    def backend_suspect(self) -> None:
        """A job could not run on Ollama: ask it again now, and stop
        advertising if it does not answer."""
        self._recheck_backend = True
        self.beat_soon()

    async def leave(self) -> None:
        """Stop the heartbeat (none may re-advertise after the withdrawal),
        withdraw the offer and give the withdrawal a moment to leave our
        queues before the host closes its connections (shutdown stays well
        under 2 s)."""
        self._provide_scope.cancel()
        if await self._withdraw():
            await trio.sleep(self.config.withdrawal_linger_s)

    async def _provide_forever(self) -> None:
        assert self.host is not None, "follow() first"
        config = self.config
        probed_at = asked_at = -math.inf
        models: list | None = None
        while True:
            beat_started = trio.current_time()
            try:
                plan = plan_beat(config.heartbeat, beat_started, have_models=models is not None, asked_at_s=asked_at,
                                 recheck_backend=self._recheck_backend, have_hardware=self.hardware is not None,
                                 probed_at_s=probed_at)
                if plan.ask_backend:
                    self._recheck_backend = False
                    models = None
                    models = await self.backend.models()
                    asked_at = beat_started
                if plan.probe_hardware:
                    self.hardware = await trio.to_thread.run_sync(probe)
                    probed_at = beat_started
                assert models is not None and self.hardware is not None
                if self.serving is not None and models:
                    # admission checks this heartbeat's list instead of asking Ollama per request
                    self.serving.models = {normalize_model_name(m.name) for m in models}
                refusal = offer_refusal(models=len(models), gpus=len(self.hardware.gpus), offer_cpu=config.offer_cpu,
                                        backend_host=self.backend.host)
                if refusal is not None:
                    raise ExecutionFailed(refusal)
                now = self.now_ms()
                self._offer_seq = next_seq(self._offer_seq, now)  # clock-based: grows across restarts too
                wire = make_offer(
                    self.key,
                    self.genesis.network_id,
                    now,
                    seq=self._offer_seq,
                    ttl_ms=int(config.offer_ttl_s * 1000),
                    hardware=self.hardware,
                    models=[ModelOffer(m.name, m.warm, m.size_bytes) for m in models],
                    price_in=config.price_in,
                    price_out=config.price_out,
                    slots_free=slots_free(config.slots, self.serving.active if self.serving is not None else 0),
                    slots_total=config.slots,
                    addrs=self.host.listen_addrs()[:config.listen_addrs_offered],
                    cpu=not self.hardware.gpus,
                    agent=AGENT,
                    max_ttl_ms=config.max_ttl_ms,
                ).wire
                # Publish first: the host runs our topic validator on our own
                # messages too, and the book would refuse a seq it already holds.
                await self.host.publish(self._topic, wire)
                self._record_own(wire)
                if not self.advertising:
                    log.info("offering %s at %s/%s coins per million tokens in/out", [m.name for m in models],
                             format_coins(config.price_in), format_coins(config.price_out))
                self.advertising, self.note = True, "offering"
            except P2PGPUError as exc:  # Ollama down, no GPU, or a model name peers would refuse
                models = None
                if self.advertising:
                    log.warning("stopped offering: %s", exc)
                    await self._withdraw()
                self.advertising, self.note = False, str(exc)
            await self._until_next_beat(beat_started)

    async def _until_next_beat(self, beat_started: float) -> None:
        """Sleep until ``next_beat_at`` says: a heartbeat, or less once an
        early beat is asked for."""
        with trio.move_on_at(next_beat_at(self.config.heartbeat, beat_started)):
            await self._beat_now.wait()
            await trio.sleep_until(next_beat_at(self.config.heartbeat, beat_started, self._early_asked))
        self._beat_now = trio.Event()
        self._early_asked = None

    async def _withdraw(self) -> bool:
        """Tell the network we are gone now rather than letting the offer
        expire. True if a withdrawal was published."""
        if not self.advertising or self.host is None:
            return False
        self.advertising = False
        published = False
        with trio.move_on_after(self.config.withdraw_timeout_s):
            self._offer_seq = next_seq(self._offer_seq, self.now_ms())
            wire = make_withdrawal(self.key, self.genesis.network_id, self.now_ms(), self._offer_seq).wire
            try:
                await self.host.publish(self._topic, wire)
                self._record_own(wire)
                published = True
                log.info("offer withdrawn")
            except P2PGPUError as exc:
                log.warning("could not withdraw the offer: %s", exc)
        return published

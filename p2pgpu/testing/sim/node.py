"""One simulated node: its durable state, its current incarnation, its roles.

What survives a crash is what a real node keeps on disk: the ledger's store
(only what ``commit`` wrote: ``MemoryStore`` behind the ledger's overlay
models LevelDB's atomic, synced write batches) and the job store's kept
vouchers (written by the provider's keeper, one synced write each, after a
simulated write delay). Everything else (the ledger object with its staged
writes and parked entries, sessions, the offer book, the waitlist, timers)
belongs to one *incarnation* and is dropped by ``crash``; every callback a
node schedules carries its incarnation and is skipped once it changed.

Each node reads its own clock, the world's time plus a fixed skew.
"""

from __future__ import annotations

from typing import Any, Callable

from p2pgpu.core.genesis import Genesis
from p2pgpu.core.hardware import HardwareReport
from p2pgpu.core.heartbeat import HeartbeatConfig, next_beat_at, offer_refusal, slots_free
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.jobs import Prices
from p2pgpu.core.kv import MemoryStore
from p2pgpu.core.ledger import SEND, Entry
from p2pgpu.core.offers import ModelOffer, make_offer, next_seq
from p2pgpu.errors import P2PGPUError
from p2pgpu.testing.sim.config import MODEL, START_MS, Plant, Timing
from p2pgpu.testing.sim.consumer import ConsumerSide
from p2pgpu.testing.sim.invariants import Checks
from p2pgpu.testing.sim.network import Stream, World
from p2pgpu.testing.sim.provider import ProviderService
from p2pgpu.testing.sim.replica import LEDGER_TOPIC, Replica

__all__ = ["SimNode", "OFFERS_TOPIC"]

OFFERS_TOPIC = "offers"
HARDWARE = HardwareReport(gpus=(), nvml_available=False, error="simulated node")


def _seconds(world_ms: int) -> float:
    """``core.heartbeat`` reads seconds on a monotonic clock: the run's, from its start."""
    return (world_ms - START_MS) / 1000


class SimNode:
    """A node of the simulated network (``p2pgpu.node.Node``'s stand-in)."""

    def __init__(self, world: World, index: int, key: NodeKey, genesis: Genesis, *, checks: Checks,
                 timing: Timing, skew_ms: int, prices: Prices | None, slots: int, consumer: bool,
                 plant: Plant | None) -> None:
        self.world = world
        self.index = index
        self.name = f"node{index}"
        self.key = key
        self.genesis = genesis
        self.network_id = genesis.network_id
        self.checks = checks
        self.timing = timing
        self.skew = skew_ms
        self.prices = prices  # None: not a provider
        self.slots = slots
        self.is_consumer = consumer
        self.plant = plant
        self.heartbeat = HeartbeatConfig(heartbeat_s=timing.offer_interval_ms / 1000,
                                         min_offer_interval_s=timing.min_offer_interval_ms / 1000,
                                         early_offer_delay_s=timing.early_offer_ms / 1000)
        # durable
        self.store = MemoryStore()
        self.kept_store: dict[bytes, bytes] = {}  # job id -> KeptVoucher wire (the job store's "v" records)
        # one incarnation
        self.up = False
        self.incarnation = 0
        self.replica: Replica | None = None
        self.provider: ProviderService | None = None
        self.consumer: ConsumerSide | None = None
        self.offer_seq: int | None = None
        self.beat_started = 0  # when the last beat began (world ms)
        self.beat_at: int | None = None  # when the next is due
        self.early_asked: int | None = None  # when a slot change asked for an early beat
        self.take_in_due = False

    def __repr__(self) -> str:
        return f"SimNode({self.name})"

    # ---------------------------------------------------------------- time

    def now(self) -> int:
        return self.world.now + self.skew

    def later(self, delay_ms: int, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback`` after ``delay_ms`` unless this incarnation ended."""
        self.world.after(delay_ms, self._if_alive, self.incarnation, callback, args)

    def later_at(self, node_ms: int, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback`` when our clock reads ``node_ms`` (same condition)."""
        self.world.at(node_ms - self.skew, self._if_alive, self.incarnation, callback, args)

    def _if_alive(self, incarnation: int, callback: Callable[..., Any], args: tuple) -> None:
        if self.up and self.incarnation == incarnation:
            callback(*args)

    def trace(self, what: str) -> None:
        if self.world.tracing:
            self.world.log(self.name, what)

    # ---------------------------------------------------------------- life

    def boot(self) -> None:
        """Start (or restart) from what the disk holds."""
        self.up = True
        self.trace("up" if self.incarnation == 0 else f"restarts (incarnation {self.incarnation})")
        self.replica = Replica(self)
        self.replica.start()
        self.checks.conservation(self)
        if self.is_consumer:
            self.consumer = ConsumerSide(self)
            self.consumer.settler.find_open()
        if self.prices is not None:
            self.provider = ProviderService(self, self.prices, self.slots)
            self.provider.find_kept()
            self.later(self.world.rng.randint(0, 100), self._beat)
        self.later(0, self._take_in)
        self.world.connectivity_changed()

    def crash(self) -> None:
        """Die at once: what was not committed is gone."""
        self.trace("crashes")
        self.world.count("crashes")
        if self.consumer is not None:
            self.consumer.crashed()
        self.up = False
        self.incarnation += 1
        self.replica = self.provider = self.consumer = None
        self.beat_at = self.early_asked = None
        self.take_in_due = False
        self.world.node_down(self.index)

    def live_jobs(self) -> int:
        jobs = len(self.provider.jobs) if self.provider is not None else 0
        return jobs + (len(self.consumer.tickets) if self.consumer is not None else 0)

    # ---------------------------------------------------------------- the network

    def on_connected(self, peers: list[int]) -> None:
        if self.replica is not None:
            self.replica.on_connected(peers)

    def on_gossip(self, topic: str, data: bytes, origin: int) -> None:
        if topic == LEDGER_TOPIC:
            self.replica.on_gossip(data, origin)  # type: ignore[union-attr]
        elif self.consumer is not None:
            self.consumer.on_offer(data)

    def on_stream(self, stream: Stream, side: int, data: bytes) -> None:
        """The first frame of a stream someone opened to us."""
        if stream.protocol == "sync":
            self.replica.serve(stream, data)  # type: ignore[union-attr]
        elif self.provider is not None:
            self.provider.on_stream(stream, data)
        else:
            stream.cut()  # no handler for the protocol: the stream is reset

    def on_applied(self, entries: list[Entry]) -> None:
        """Entries acknowledged by a commit (the replicator's ``on_applied``)."""
        me = self.key.public_key
        if any(e.kind == SEND and e.body.to == me for e in entries):  # type: ignore[union-attr]
            if not self.take_in_due:
                self.take_in_due = True
                self.later(5, self._take_in)
        if self.consumer is not None:
            self.consumer.settler.on_applied(entries)
        if self.provider is not None and self.provider.kept:
            self.provider.wake_claimer()

    def _take_in(self) -> None:
        """RECEIVE every send addressed to us (``Node._take_in_coins``)."""
        self.take_in_due = False
        ledger = self.replica.ledger  # type: ignore[union-attr]
        if ledger.receivable(self.key.public_key) and ledger.frozen().get(self.key.public_key) is None:
            try:
                self.replica.append(lambda lg: lg.receive_all(self.key, self.now()))  # type: ignore[union-attr]
            except P2PGPUError as exc:
                self.trace(f"could not take in coins: {exc}")

    # ---------------------------------------------------------------- offers

    def _beat(self) -> None:
        """One heartbeat (``Market.provide``): offer, then sleep until
        ``next_beat_at`` says (a heartbeat, or sooner once a slot changes)."""
        self.beat_started = self.world.now
        self.early_asked = None
        self._publish_offer()
        self._arm_beat()

    def _arm_beat(self) -> None:
        early = None if self.early_asked is None else _seconds(self.early_asked)
        at = START_MS + round(1000 * next_beat_at(self.heartbeat, _seconds(self.beat_started), early))
        if self.beat_at is None or at < self.beat_at:
            self.beat_at = at
            self.later(at - self.world.now, self._beat_due, at)

    def _beat_due(self, at: int) -> None:
        if self.beat_at == at:
            self.beat_at = None
            self._beat()

    def offer_soon(self) -> None:
        """A slot was taken or freed: offer again soon, not a heartbeat later."""
        if self.early_asked is None and self.beat_at is not None:
            self.early_asked = self.world.now
            self._arm_beat()

    def _publish_offer(self) -> None:
        assert self.provider is not None and self.prices is not None
        if offer_refusal(models=1, gpus=len(HARDWARE.gpus), offer_cpu=True, backend_host="sim") is not None:
            return  # never: the simulated backend always serves its model, on the CPU
        now = self.now()
        self.offer_seq = next_seq(self.offer_seq, now)
        signed = make_offer(
            self.key, self.network_id, now, seq=self.offer_seq, ttl_ms=self.timing.offer_ttl_ms, hardware=HARDWARE,
            models=[ModelOffer(MODEL, warm=True)], price_in=self.prices.price_in, price_out=self.prices.price_out,
            slots_free=slots_free(self.slots, self.provider.active), slots_total=self.slots,
            addrs=[f"/ip4/10.0.0.{self.index + 1}/tcp/4001"], cpu=True)
        self.world.publish(self.index, OFFERS_TOPIC, signed.wire)

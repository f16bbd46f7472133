"""The node daemon: one trio process that wires the edges to the core.

Theory of operation
-------------------
``Node.run`` opens, in one nursery:

- the libp2p host (``p2pgpu.net``) with gossip and bootstrap redial;
- ledger replication (``p2pgpu.replication``): gossip of new entries and
  anti-entropy sync over ``/p2pgpu/ledger-sync/1.0.0``;
- the offer book: a gossip subscription whose topic validator is the book's
  own check, so invalid or stale offers are neither delivered nor forwarded;
- the provider loop (when this node provides): every heartbeat, read the
  local Ollama's models and the GPUs, sign a fresh offer, publish it;
- incoming coins: sends addressed to this node are taken in (RECEIVE) as
  they arrive, so they become spendable;
- jobs: each ``submit`` is a task that waits in this node's FIFO line for a
  provider slot (``p2pgpu.core.waitlist``: a provider's free slots are its
  offer's count of other consumers' jobs plus our own count of ours), runs
  the job (``p2pgpu.jobrunner``), fails over or, on a busy rejection, gets
  back in line; every job, ours and those we serve, is kept in the job
  store (``p2pgpu.jobstore``) so ``p2pgpu jobs`` lists it after a restart;
- holds: a task releases our holds that a job could not release at its end,
  against the provider's CLAIM or once the hold expired
  (``p2pgpu.core.settlement``), woken by ledger applies and timers;
- the local HTTP API on 127.0.0.1 with the bearer token from the data dir.

The node holds no rules: the ledger, offers and job sessions decide;
this module moves bytes, reads clocks, and serialises ledger access on the
trio thread. ``stop()`` withdraws the offer and lets everything close; the CLI
calls it on SIGINT/SIGTERM.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator

import trio

from p2pgpu import __version__
from p2pgpu.api import SubmitRequest, create_app, remove_api_address, serve_api, write_api_address
from p2pgpu.config import NodeConfig
from p2pgpu.core.genesis import Genesis
from p2pgpu.core.hardware import HardwareReport
from p2pgpu.core.identity import peer_id_from_public_key, public_key_from_peer_id
from p2pgpu.core.ledger import BASIS_NAMES, HOLD, RELEASE, SEND, Entry, Ledger, StatementLine
from p2pgpu.core.jobrecords import (
    CANCELLED, COMPLETED, CONSUMER, FAILED, MAX_REASON_CHARS, PROVIDER, QUEUED, REJECTED, RUNNING,
    Attempt, JobRecord, KeptVoucher, advance, check_cancellable, cut_text, job_info, served_outcome, served_pay,
    settle_attempt,
)
from p2pgpu.core.continuation import ContinuationKind, Work, plan_continuation
from p2pgpu.core.codec import Signed
from p2pgpu.core.jobs import JOB_ID_SIZE, R_BUSY, JobRequest, Prices, ProviderState
from p2pgpu.core.offers import (
    MAX_MODEL_NAME_CHARS, ModelOffer, Offer, OfferBook, make_offer, make_withdrawal, next_seq, normalize_model_name,
)
from p2pgpu.core.ranking import ProviderHistory, RankedOffer, explain_no_match, rank
from p2pgpu.core.settlement import Claimed, ClaimNow, OpenHold, PayLost, WaitUntil, plan_claim, plan_release
from p2pgpu.core.waitlist import assign, free_slots
from p2pgpu.core.units import format_coins
from p2pgpu.core.protocols import offers_topic
from p2pgpu.datadir import DataDir, GenesisInstall, read_genesis_file
from p2pgpu.errors import (
    ConfigError, ExecutionFailed, InsufficientFunds, JobStateConflict, LedgerRuleViolation, P2PGPUError, QueueTimeout,
)
from p2pgpu.executor import OllamaBackend
from p2pgpu.gpu import probe
from p2pgpu.jobrunner import JobResult, JobStreamPool, ProviderService, run_job
from p2pgpu.jobstore import JOBS_DIR, JobStore
from p2pgpu.net import BootstrapConfig, GossipConfig, P2PHost, open_host
from p2pgpu.net.peer_exchange import PeerExchange
from p2pgpu.replication import LedgerReplicator

log = logging.getLogger(__name__)

AGENT = f"p2pgpu/{__version__}"
MAX_CLOCK_SKEW_MS = 60_000
HISTORY_LIMIT = 100  # newest wallet entries returned: the API runs on the trio thread
WITHDRAWAL_LINGER_S = 0.5
MIN_OFFER_INTERVAL_S = 0.25  # early re-offers (a slot taken or freed) come at most this often
EARLY_OFFER_DELAY_S = 0.05  # ...and this long after the change, off the path of the job's first token
HARDWARE_PROBE_INTERVAL_S = 30.0
ARRIVALS_KEPT = 64  # recent offers remembered per provider, as [seq, signed_ms, received_ms]

# Jobs: waiting for a slot, cancelling, settling holds.
BUSY_BACKOFF_S = 0.05  # after a busy rejection: jittered, doubling, at most BUSY_BACKOFF_MAX_S
BUSY_BACKOFF_MAX_S = 2.0
BUSY_MARK_S = 5.0  # a provider that said busy counts as full until its next offer, at most this long
MAX_TRACKED_PROVIDERS = 4096
CANCEL_WAIT_S = 15.0  # cancel_job waits this long for the job to stop (a receipt takes up to 10 s)
MAX_OPEN_HOLDS = 10_000
OPEN_HOLD_SCAN = 1_000  # own entries read at start for holds never released
SETTLE_IDLE_S = 60.0
SETTLE_MIN_INTERVAL_S = 0.1
SETTLE_RETRY_MS = 30_000


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(eq=False)
class _Ticket:
    """One consumer job of ours until it ends: its request, its place in
    the waitlist, the slot it was given and how to stop it."""

    job_id: bytes
    request: SubmitRequest
    model: str
    seq: int  # submission order: the waitlist's FIFO key
    work: Work  # what is left of the request: the next attempt sends this (core.continuation)
    cancel: trio.Event = field(default_factory=trio.Event)  # set: stop the job (run_job's cancel)
    wake: trio.Event = field(default_factory=trio.Event)  # set: a slot was assigned, or the job stopped
    excluded: set[bytes] = field(default_factory=set)  # providers that failed it
    assigned: RankedOffer | None = None
    chunks: list[str] = field(default_factory=list)  # the answer so far, over all attempts
    delivered: int = 0  # tokens of it from attempts that ended
    streaming: int = 0  # tokens of it from the attempt running now (live progress for `jobs`)
    paid: int = 0  # over all attempts

    @property
    def estimate(self) -> int:
        """The hold's bound on prompt tokens for the next attempt."""
        return self.work.prompt_tokens_bound

    def stop(self) -> None:
        self.cancel.set()
        self.wake.set()


class Node:
    """A running p2pgpu node. Implements ``p2pgpu.api.NodeView``."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.data_dir = DataDir(config.data_dir)
        self.data_dir.ensure()
        self.key = self.data_dir.load_or_create_key(create=True)
        self.token = self.data_dir.load_or_create_token(create=True)
        if config.genesis is not None:
            if self.data_dir.install_genesis(read_genesis_file(config.genesis)) is GenesisInstall.REPAIRED:
                log.warning("the installed genesis in %s was unreadable; replaced it with %s",
                            self.data_dir.path, config.genesis)
        if not self.data_dir.has_genesis():
            raise ConfigError(
                f"no network configured in {self.data_dir.path}: pass --genesis FILE "
                "(make one with `p2pgpu genesis new`)"
            )
        self.genesis: Genesis = self.data_dir.genesis()
        self.network_id = self.genesis.network_id
        self.ledger: Ledger | None = None
        self.host: P2PHost | None = None
        self.replicator: LedgerReplicator | None = None
        self.max_ttl_ms = max(int(4 * config.offer_ttl_s * 1000), 120_000)
        self.book = OfferBook(self.network_id, max_skew_ms=MAX_CLOCK_SKEW_MS, max_ttl_ms=self.max_ttl_ms)
        self.backend = OllamaBackend(config.ollama_host)
        self.hardware: HardwareReport | None = None
        self.api_port: int | None = None
        self.started_at = time.monotonic()
        self.advertising = False
        self.provider_note = (
            "starting" if config.provide else "not providing (started with --no-provide, or provide = false)")
        self._offer_seq = 0
        self._arrivals: dict[bytes, collections.deque[tuple[int, int, int]]] = {}
        self._stopping = trio.Event()
        self._incoming = trio.Event()
        self._cancel: trio.CancelScope | None = None
        self.is_faucet = self.key.public_key == self.genesis.faucet
        self.history = ProviderHistory()  # this node's own record of providers it used
        self.provider_service: ProviderService | None = None
        self._nursery: trio.Nursery | None = None
        self.job_streams: JobStreamPool | None = None  # job streams opened ahead to providers we use
        self._beat_now = trio.Event()  # offer again before the heartbeat is due
        self._recheck_backend = False  # ...and ask Ollama again first (a job saw it fail)
        # jobs (see "jobs (consumer)" below)
        self.job_store: JobStore | None = None
        self._live_jobs: dict[bytes, _Ticket] = {}
        self._waitlist: list[_Ticket] = []  # jobs waiting for a slot, oldest first
        self._ticket_seq = itertools.count()
        self._inflight: collections.Counter[bytes] = collections.Counter()  # our jobs per provider
        self._at_offer: dict[bytes, int] = {}  # our jobs there when its newest offer came
        self._busy: dict[bytes, tuple[int, float]] = {}  # provider -> (offer seq, time) of a busy rejection
        self._job_saved = trio.Event()
        self._open_holds: dict[bytes, OpenHold] = {}
        self._hold_jobs: dict[bytes, bytes] = {}  # hold id -> the job it was for
        self._settle_wakeup = trio.Event()
        self._kept: dict[bytes, KeptVoucher] = {}  # provider: vouchers of jobs a crash cut short, to claim
        self._kept_wakeup = trio.Event()

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        self.ledger = self.data_dir.open_ledger()
        try:
            self.job_store = JobStore(self.data_dir.path / JOBS_DIR, now_ms=now_ms())
            self._find_open_holds()
            self._find_kept_vouchers()
            async with open_host(
                self.key,
                [config.listen],
                gossip=GossipConfig(),
                bootstrap=BootstrapConfig(list(config.bootstrap)) if config.bootstrap else None,
            ) as host:
                self.host = host
                self.replicator = LedgerReplicator(
                    host,
                    self.ledger,
                    network_id=self.network_id,
                    now_ms=now_ms,
                    sync_interval_s=config.sync_interval_s,
                    on_applied=self._on_applied,
                )
                async with trio.open_nursery() as nursery:
                    self._cancel = nursery.cancel_scope
                    self._nursery = nursery
                    self.job_streams = JobStreamPool(host, nursery)
                    await nursery.start(PeerExchange(host).run)
                    await nursery.start(self.replicator.run)
                    await nursery.start(self._follow_offers)
                    nursery.start_soon(self._take_in_coins)
                    nursery.start_soon(self._settle_holds)
                    nursery.start_soon(self._claim_kept_vouchers)
                    provider_scope = trio.CancelScope()
                    if config.provide:
                        self.provider_service = ProviderService(
                            host, self.replicator, self.ledger, self.key, self.backend,
                            prices=Prices(config.price_in, config.price_out), slots=config.slots, now_ms=now_ms,
                            on_backend_failure=lambda exc: self._backend_suspect(),
                            on_slots_changed=lambda: self._beat_now.set(),
                            on_job=self._on_provider_job,
                            keep_voucher=self._keep_voucher, forget_voucher=self.job_store.forget_voucher,
                        )
                        self.provider_service.start()
                        nursery.start_soon(self._provide, provider_scope)
                    self.api_port = await nursery.start(serve_api, create_app(self, self.token), config.api_port)
                    write_api_address(self.data_dir, self.api_port)
                    log.info("node %s up: p2p %s, api 127.0.0.1:%d", self.key.peer_id, host.listen_addrs(), self.api_port)
                    self._incoming.set()  # take in anything that arrived while we were offline
                    task_status.started(self)
                    await self._stopping.wait()
                    provider_scope.cancel()  # no heartbeat may re-advertise after the withdrawal
                    if await self._withdraw():
                        # Gossip has no acknowledgement: give the withdrawal a
                        # moment to leave our queues before the host closes
                        # its connections (shutdown stays well under 2 s).
                        await trio.sleep(WITHDRAWAL_LINGER_S)
                    nursery.cancel_scope.cancel()
        finally:
            remove_api_address(self.data_dir, self.api_port)
            if self.job_store is not None:
                self.job_store.close()
            # The databases first: an await here raises at once when the
            # node is cancelled from outside (a crash in the tests), and
            # must not leave them locked.
            self.ledger.close()
            await self.backend.aclose()
            log.info("node %s stopped", self.key.peer_id)

    def stop(self) -> None:
        """Begin a graceful shutdown: withdraw the offer, close everything."""
        self._stopping.set()

    # ------------------------------------------------------------ offers

    async def _follow_offers(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        assert self.host is not None
        topic = offers_topic(self.genesis.network_tag)

        def validate(from_peer: str, data: bytes) -> bool:
            try:
                self.book.check(data, now_ms())
                return True
            except P2PGPUError as exc:
                log.debug("offer from %s refused: %s", from_peer, exc)
                return False

        self.host.set_topic_validator(topic, validate)
        subscription = await self.host.subscribe(topic)
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire_offers)
            async for message in subscription:
                self._accept_offer(message.data, message.from_peer_id)

    async def _expire_offers(self) -> None:
        while True:
            for provider in self.book.expire(now_ms()):
                log.info("offer of %s expired", peer_id_from_public_key(provider))
            await trio.sleep(1.0)

    async def _provide(self, scope: trio.CancelScope) -> None:
        """Publish a fresh signed offer every heartbeat while Ollama answers,
        until ``scope`` is cancelled (shutdown)."""
        with scope:
            await self._provide_forever()

    async def _provide_forever(self) -> None:
        assert self.host is not None
        topic = offers_topic(self.genesis.network_tag)
        probed_at = -math.inf
        models: list | None = None
        asked_at = -math.inf
        while True:
            beat_started = trio.current_time()
            try:
                # An early beat for a slot count reuses the inventory of the
                # last one: asking Ollama costs two HTTP calls on the loop
                # that is streaming the job which caused the beat.
                if models is None or self._recheck_backend or beat_started - asked_at >= 0.9 * self.config.heartbeat_s:
                    self._recheck_backend = False
                    models = None
                    models = await self.backend.models()
                    asked_at = beat_started
                if beat_started - probed_at >= HARDWARE_PROBE_INTERVAL_S or self.hardware is None:
                    self.hardware = await trio.to_thread.run_sync(probe)
                    probed_at = beat_started
                if not models:
                    raise ExecutionFailed(f"Ollama at {self.backend.host} serves no models")
                if self.provider_service is not None:
                    # admission checks this heartbeat's list instead of asking Ollama per request
                    self.provider_service.models = {normalize_model_name(m.name) for m in models}
                if not self.hardware.gpus and not self.config.offer_cpu:
                    raise ExecutionFailed("no GPU found; to offer CPU inference, restart the node with --offer-cpu "
                                          "(or offer_cpu = true in its config file)")
                now = now_ms()
                self._offer_seq = next_seq(self._offer_seq, now)  # clock-based: grows across restarts too
                wire = make_offer(
                    self.key,
                    self.network_id,
                    now,
                    seq=self._offer_seq,
                    ttl_ms=int(self.config.offer_ttl_s * 1000),
                    hardware=self.hardware,
                    models=[ModelOffer(m.name, m.warm, m.size_bytes) for m in models],
                    price_in=self.config.price_in,
                    price_out=self.config.price_out,
                    slots_free=max(0, self.config.slots - (self.provider_service.active if self.provider_service else 0)),
                    slots_total=self.config.slots,
                    addrs=self.host.listen_addrs()[:8],
                    cpu=not self.hardware.gpus,
                    agent=AGENT,
                    max_ttl_ms=self.max_ttl_ms,
                ).wire
                # Publish first: the host runs our topic validator on our own
                # messages too, and the book would refuse a seq it already holds.
                await self.host.publish(topic, wire)
                self._record_own(wire)
                if not self.advertising:
                    log.info("offering %s at %s/%s coins per million tokens in/out", [m.name for m in models],
                             format_coins(self.config.price_in), format_coins(self.config.price_out))
                self.advertising, self.provider_note = True, "offering"
            except P2PGPUError as exc:  # Ollama down, no GPU, or a model name peers would refuse
                models = None
                if self.advertising:
                    log.warning("stopped offering: %s", exc)
                    await self._withdraw()
                self.advertising, self.provider_note = False, str(exc)
            await self._until_next_beat(beat_started)

    async def _until_next_beat(self, beat_started: float) -> None:
        """Sleep a heartbeat, or less when a job took or freed a slot or the
        backend failed: consumers then see free slots (and a dead Ollama's
        withdrawal) at once instead of up to a heartbeat later. Early beats
        are spaced by ``MIN_OFFER_INTERVAL_S``, well inside gossip's
        per-origin rate limit, and wait ``EARLY_OFFER_DELAY_S`` so that a
        job's start and the offer that follows do not compete for the loop
        (the delay also folds one job's end and the next one's start into
        one offer)."""
        with trio.move_on_at(beat_started + self.config.heartbeat_s):
            await self._beat_now.wait()
            await trio.sleep_until(max(beat_started + MIN_OFFER_INTERVAL_S, trio.current_time() + EARLY_OFFER_DELAY_S))
        self._beat_now = trio.Event()

    def _backend_suspect(self) -> None:
        """A job could not run on Ollama: ask it again now, and stop
        advertising if it does not answer."""
        self._recheck_backend = True
        self._beat_now.set()

    async def _withdraw(self) -> bool:
        """Tell the network we are gone now rather than letting the offer
        expire. True if a withdrawal was published."""
        if not self.advertising or self.host is None:
            return False
        self.advertising = False
        published = False
        with trio.move_on_after(1.0):
            self._offer_seq = next_seq(self._offer_seq, now_ms())
            wire = make_withdrawal(self.key, self.network_id, now_ms(), self._offer_seq).wire
            try:
                await self.host.publish(offers_topic(self.genesis.network_tag), wire)
                self._record_own(wire)
                published = True
                log.info("offer withdrawn")
            except P2PGPUError as exc:
                log.warning("could not withdraw the offer: %s", exc)
        return published

    def _accept_offer(self, wire: bytes, source: str) -> None:
        now = now_ms()
        try:
            message = self.book.accept(wire, now)
        except P2PGPUError as exc:  # raced with a newer one, or expired in flight
            log.debug("offer from %s dropped: %s", source, exc)
            return
        # (seq, signed, received) of each provider's recent offers: how fresh
        # the book is, and what the gossip benchmark reads to measure spread
        arrivals = self._arrivals.setdefault(message.provider, collections.deque(maxlen=ARRIVALS_KEPT))
        arrivals.append((message.seq, message.timestamp_ms, now))
        self._offer_arrived(message.provider)

    def _record_own(self, wire: bytes) -> None:
        """Our own offer or withdrawal in our own book (gossip may already
        have delivered it back to us, which is fine)."""
        self._accept_offer(wire, "self")

    # ------------------------------------------------------------ coins

    def _on_applied(self, entries: list[Entry]) -> None:
        me = self.key.public_key
        if any(e.kind == SEND and e.body.to == me for e in entries):  # type: ignore[union-attr]
            self._incoming.set()
        self._track_holds(entries)
        if self._kept:
            self._kept_wakeup.set()  # a hold a kept voucher waits for may have come

    async def _take_in_coins(self) -> None:
        """RECEIVE every send addressed to this node, so it becomes spendable."""
        assert self.replicator is not None and self.ledger is not None
        while True:
            await self._incoming.wait()
            self._incoming = trio.Event()
            if self.ledger.receivable(self.key.public_key) and self.ledger.frozen().get(self.key.public_key) is None:
                try:
                    taken = await self.replicator.append(lambda ledger: ledger.receive_all(self.key, now_ms()))
                    log.info("took in %d incoming send(s)", len(taken))
                except P2PGPUError as exc:
                    log.warning("could not take in incoming coins: %s", exc)

    # ------------------------------------------------------------ NodeView

    def status(self) -> dict[str, Any]:
        assert self.ledger is not None and self.host is not None
        me = self.ledger.account(self.key.public_key)
        return {
            "peer_id": self.key.peer_id,
            "version": __version__,
            "network": {"id": self.network_id.hex(), "name": self.genesis.name},
            "listen_addrs": self.host.listen_addrs(),
            "peers": len(self.host.peers()),
            "offers_seen": len(self.book.live(now_ms())),
            "role": "provider" if self.advertising else "consumer",
            "provider": self.provider_note,
            "faucet": self.is_faucet,
            "balance": me.balance,
            "held": me.held,
            "pending_in": me.pending_in,
            "spendable": self.ledger.spendable(self.key.public_key),
            "entries": me.entries,
            "state_hash": self.ledger.state_hash().hex(),
            "frozen": [peer_id_from_public_key(pk) for pk in self.ledger.frozen()],
            "replication": self.replicator.stats() if self.replicator else {},
            "uptime_s": round(time.monotonic() - self.started_at, 1),
        }

    def peers(self) -> list[dict[str, Any]]:
        assert self.host is not None
        now = trio.current_time()
        return [
            {
                "peer_id": p.peer_id,
                "addrs": list(p.addrs),
                "connected": p.connected,
                "since_s": round(now - p.since, 1) if p.since is not None else None,
                "bootstrap": p.bootstrap,
            }
            for p in self.host.peer_list()
        ]

    def offers(self, model: str | None) -> list[dict[str, Any]]:  # type: ignore[override]
        now = now_ms()
        return [
            {
                "provider": offer.peer_id,
                "models": [{"name": m.name, "warm": m.warm} for m in offer.models],
                "gpus": [
                    {"name": g.name, "vram_total": g.memory_total_bytes, "vram_free": g.memory_free_bytes, "util": g.utilization_percent}
                    for g in offer.hardware.gpus
                ],
                "price_in": offer.price_in,
                "price_out": offer.price_out,
                "slots_free": offer.slots_free,
                "slots_total": offer.slots_total,
                "expires_in_s": round((offer.expiry_ms - now) / 1000, 1),
                "seq": offer.seq,
                "arrivals": [list(a) for a in self._arrivals.get(offer.provider, ())],
                "cpu": offer.cpu,
                "addrs": list(offer.addrs),
            }
            for offer in self.book.live(now, model)
        ]

    def wallet(self, account: str | None) -> dict[str, Any]:
        assert self.ledger is not None
        public_key = public_key_from_peer_id(account) if account else self.key.public_key
        state = self.ledger.account(public_key)
        return {
            "account": peer_id_from_public_key(public_key),
            "balance": state.balance,
            "held": state.held,
            "pending_in": state.pending_in,
            "spendable": self.ledger.spendable(public_key),
            "frozen": state.frozen,
            "history": [_statement_item(line) for line in self.ledger.statement(public_key, last=HISTORY_LIMIT)],
        }

    async def send(self, to: str, amount: int, memo: str) -> dict[str, Any]:
        assert self.replicator is not None
        recipient = public_key_from_peer_id(to)
        entries = await self.replicator.append(lambda ledger: ledger.send(self.key, recipient, amount, now_ms(), memo))
        return {"entry_id": entries[0].id.hex(), "amount": amount, "to": to}

    # ------------------------------------------------------------ jobs (consumer)

    async def submit(self, request: SubmitRequest) -> AsyncIterator[dict[str, Any]]:
        """Run a job on the best provider with a free slot, failing over to
        the next one; wait in line while every candidate is full.

        Errors found before anything is streamed (no provider for the model,
        not enough coins) are raised, so the API answers with an error
        status. The job itself runs as a task of the node's nursery, feeding
        a channel; closing this generator early (the client went away)
        cancels the job, which then pays only for tokens delivered; so does
        ``cancel_job``.
        """
        assert self._nursery is not None and self.ledger is not None and self.job_store is not None
        model = normalize_model_name(request.model)
        now = now_ms()
        offers = self._others_offers(now)
        work = _work(request)
        estimate = work.prompt_tokens_bound
        # Busy providers count: the job waits for a slot instead of failing.
        ranked = rank(offers, model, max_tokens=request.max_tokens, prompt_tokens_estimate=estimate,
                      history=self.history, now_ms=now, max_price=request.max_price, include_busy=True)
        if not ranked:
            raise ExecutionFailed(explain_no_match(offers, model, now, max_tokens=request.max_tokens,
                                                   prompt_tokens_estimate=estimate, max_price=request.max_price))
        spendable = self.ledger.spendable(self.key.public_key)
        cheapest = min(r.cost for r in ranked)
        if spendable < cheapest:
            raise InsufficientFunds(
                f"this job may cost up to {format_coins(cheapest)} coins (held until it ends); "
                f"you can spend {format_coins(spendable)}"
            )
        job = _Ticket(secrets.token_bytes(JOB_ID_SIZE), request, model, next(self._ticket_seq), work)
        self._save(JobRecord(job.job_id, CONSUMER, QUEUED, model[:MAX_MODEL_NAME_CHARS], self.key.public_key,
                             None, now))
        self._live_jobs[job.job_id] = job
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        self._nursery.start_soon(self._run_submission, job, send)
        try:
            async with receive:
                async for event in receive:
                    yield event
        finally:
            job.stop()

    async def _run_submission(self, job: _Ticket, send: trio.MemorySendChannel[dict[str, Any]]) -> None:
        """The body of a ``submit``, as a task of the node's nursery: it must
        never raise (that would stop the node), and a reader that went away
        cancels the job instead of breaking it."""

        def emit(event: dict[str, Any]) -> None:
            try:
                send.send_nowait(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                job.stop()  # nobody is reading: stop the job, pay for what was delivered

        async with send:
            try:
                final = await self._attempts(job, emit)
            except Exception as exc:  # noqa: BLE001 - a bug must not take the node down
                log.exception("job submission failed")
                final = {"type": "error", "error": f"internal error: {exc!r}", "kind": type(exc).__name__}
                self._end_job(job, FAILED, reason=f"internal error: {exc!r}")
            finally:
                # Also on shutdown (Cancelled): the record must not stay "running".
                self._leave_waitlist(job)
                self._live_jobs.pop(job.job_id, None)
                if not self._record(job).final:
                    self._end_job(job, FAILED, reason="interrupted: the node stopped")
            emit(final)

    async def _attempts(self, job: _Ticket, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Wait for a provider slot, run the job there, fail over or wait
        again as needed; returns the final event (done or error). A failover
        after tokens were delivered asks the next provider to continue the
        answer (``core.continuation``), so the answer streamed is one answer."""
        assert self.host is not None and self.replicator is not None and self.ledger is not None
        request = job.request
        last_reason = "no provider was tried"
        last_status = FAILED
        attempt = 0
        busy_rejections = 0
        waiting_since: float | None = None  # trio time this wait for a slot began (busy backoffs included)
        announced = False
        while True:
            if job.cancel.is_set():
                return self._cancelled(job)
            self._join_waitlist(job)
            if job.assigned is None:
                if job.excluded and not self._candidates(job, now_ms()):
                    self._leave_waitlist(job)  # everyone who serves it failed it
                    return self._failed(job, last_status, f"the job did not complete ({last_reason})")
                if not announced:
                    announced = True
                    emit({"type": "queued", "position": self._waitlist.index(job) + 1, "job_id": job.job_id.hex()})
                if self._record(job).status != QUEUED:
                    self._update(job, QUEUED)
                if waiting_since is None:
                    waiting_since = trio.current_time()
                if not await self._wait_turn(job, waiting_since + self.config.queue_timeout_s):
                    if job.cancel.is_set():
                        return self._cancelled(job)
                    ahead = self._waitlist.index(job) if job in self._waitlist else 0
                    self._leave_waitlist(job)
                    return self._failed(job, FAILED, (
                        f"no provider serving {job.model!r} had a free slot within "
                        f"{self.config.queue_timeout_s:g} s ({ahead} of this node's jobs were ahead of it)"
                    ), kind=QueueTimeout)
            choice, job.assigned = job.assigned, None
            assert choice is not None
            offer = choice.offer
            if job.cancel.is_set():
                self._slot_freed(offer.provider)
                return self._cancelled(job)
            attempt += 1
            emit({"type": "provider", "provider": offer.peer_id, "attempt": attempt, "job_id": job.job_id.hex(),
                  "price_in": offer.price_in, "price_out": offer.price_out})
            self._start_attempt(job, offer.provider)
            started = now_ms()
            result: JobResult | None = None
            try:
                await self._reach(offer)
                result = await run_job(
                    self.host, self.replicator, self.ledger, self.key, offer.peer_id,
                    Prices(offer.price_in, offer.price_out), model=job.model, prompt=job.work.prompt,
                    messages=job.work.messages, max_tokens=job.work.max_tokens, now_ms=now_ms,
                    on_tokens=lambda text, count: self._token(job, text, count, emit),
                    max_prompt_tokens=job.estimate, cancel=job.cancel, job_id=job.job_id,
                    release_wait_s=0, streams=self.job_streams,  # _settle_holds releases against the claim
                )
            except InsufficientFunds as exc:  # our balance, not the provider's fault
                self._end_attempt(job, f"not started: {exc}")
                return self._failed(job, FAILED, str(exc), kind=InsufficientFunds)
            except P2PGPUError as exc:
                self.history.record_failure(offer.provider, now_ms(), str(exc))
                last_reason, last_status = f"{offer.peer_id}: {exc}", FAILED
                self._end_attempt(job, str(exc))
            finally:
                self._slot_freed(offer.provider)
            if result is not None:
                self._note_hold(job, result)
                if result.status == "completed":
                    elapsed = max(1, now_ms() - started)
                    self.history.record_success(
                        offer.provider, now_ms(), int((result.ttft_s or elapsed / 1000) * 1000),
                        result.tokens_per_s or result.tokens * 1000 / elapsed,
                    )
                    self._end_attempt(job, "completed", result)
                    self._end_job(job, COMPLETED, result=result)
                    return _done_event(job, offer.peer_id, attempt, result)
                if result.status == "rejected" and result.code == R_BUSY and not job.cancel.is_set():
                    # Full after all (our count of its slots was behind): not
                    # the provider's failure, and not an attempt: back in line.
                    self._end_attempt(job, "busy", result)
                    self._mark_busy(offer.provider)
                    attempt -= 1
                    busy_rejections += 1
                    if waiting_since is None:
                        waiting_since = trio.current_time()
                    self._update(job, QUEUED)
                    delay = random.uniform(0.5, 1.0) * min(BUSY_BACKOFF_MAX_S, BUSY_BACKOFF_S * 2 ** min(busy_rejections, 8))
                    with trio.move_on_after(delay):
                        await job.cancel.wait()
                    continue
                self._end_attempt(job, result.reason or result.status, result)
                if job.cancel.is_set():
                    return self._cancelled(job, result)
                self.history.record_failure(offer.provider, now_ms(), result.reason)
                last_reason = f"{offer.peer_id}: {result.status}: {result.reason}"
                last_status = REJECTED if result.status == "rejected" else FAILED
            if job.cancel.is_set():
                return self._cancelled(job)
            job.excluded.add(offer.provider)
            plan = plan_continuation(_work(request), "".join(job.chunks), job.delivered, job.paid)
            if plan.kind is ContinuationKind.WHOLE:  # it died after the last token, before its receipt
                self._end_job(job, COMPLETED, reason=f"every token was delivered before {last_reason}")
                return _done_event(job, offer.peer_id, attempt)
            if not request.retry:
                return self._failed(job, last_status, f"the job did not complete ({last_reason})")
            if plan.kind is ContinuationKind.TOO_LONG:
                return self._failed(job, last_status, (
                    f"the job did not complete ({last_reason}); its answer so far is too long "
                    "to be continued on another provider"))
            if plan.kind is ContinuationKind.NO_BUDGET:
                return self._failed(job, last_status, (
                    f"the job did not complete ({last_reason}); --max-price is spent on what was delivered"))
            job.work = plan.work
            if not self._candidates(job, now_ms()):
                return self._failed(job, last_status, f"the job did not complete ({last_reason})")
            emit({"type": "retry", "provider": offer.peer_id, "reason": last_reason,
                  "tokens_delivered": job.delivered, "continues": plan.kind is ContinuationKind.CONTINUE})
            waiting_since = None  # the queue deadline bounds each wait, not the whole job

    async def _reach(self, offer: Any) -> None:
        """Connect to a provider we only know from its offer: offers carry
        the provider's listen addresses for exactly this (noise checks the
        peer id, so a wrong address is only a failed dial)."""
        assert self.host is not None
        if self.host.is_connected(offer.peer_id):
            return
        failure: Exception | None = None
        for addr in offer.addrs:
            full = addr if "/p2p/" in addr else f"{addr}/p2p/{offer.peer_id}"
            if not full.endswith(offer.peer_id):
                continue
            try:
                await self.host.connect(full, timeout=5.0)
                return
            except P2PGPUError as exc:
                failure = exc
        raise ExecutionFailed(f"provider {offer.peer_id} is unreachable at its offered addresses ({failure})")

    # --- the waitlist: FIFO over providers' free slots (p2pgpu.core.waitlist)

    def _others_offers(self, now: int) -> list[Offer]:
        return [o for o in self.book.live(now) if o.provider != self.key.public_key]

    def _candidates(self, job: _Ticket, now: int, offers: list[Offer] | None = None) -> list[RankedOffer]:
        """Providers for ``job``, best first, busy ones included, without
        those that failed it."""
        work = job.work
        ranked = rank(self._others_offers(now) if offers is None else offers, job.model,
                      max_tokens=work.max_tokens, prompt_tokens_estimate=job.estimate,
                      history=self.history, now_ms=now, max_price=work.max_price, include_busy=True)
        return [r for r in ranked if r.provider not in job.excluded]

    def _room(self, offer: Offer) -> int:
        provider = offer.provider
        busy = self._busy.get(provider)
        if busy is not None:
            seq, since = busy
            if offer.seq <= seq and trio.current_time() - since < BUSY_MARK_S:
                return 0  # it said busy; wait for its next offer
            del self._busy[provider]
        return free_slots(offer.slots_total, offer.slots_free, self._inflight[provider], self._at_offer.get(provider, 0))

    def _dispatch(self) -> None:
        """Hand free provider slots to waiting jobs, oldest first. Synchronous:
        called whenever a slot may have freed (one of our jobs ended, a new
        offer arrived) or a job joined the line."""
        if not self._waitlist:
            return
        now = now_ms()
        offers = self._others_offers(now)
        room = {o.provider: self._room(o) for o in offers}
        choices: dict[tuple[int, bytes], RankedOffer] = {}

        def waiting() -> Iterator[tuple[_Ticket, list[bytes]]]:
            for job in list(self._waitlist):  # ranked lazily: only while some slot is free
                ranked = self._candidates(job, now, offers)
                for r in ranked:
                    choices[(job.seq, r.provider)] = r
                yield job, [r.provider for r in ranked]

        for job, provider in assign(waiting(), room):
            self._waitlist.remove(job)
            job.assigned = choices[(job.seq, provider)]
            self._inflight[provider] += 1  # reserved now, so the next job sees it taken
            job.wake.set()

    def _join_waitlist(self, job: _Ticket) -> None:
        if job not in self._waitlist:
            # by submission order: a job back from a busy provider keeps its place
            index = next((i for i, other in enumerate(self._waitlist) if other.seq > job.seq), len(self._waitlist))
            self._waitlist.insert(index, job)
        self._dispatch()

    def _leave_waitlist(self, job: _Ticket) -> None:
        if job in self._waitlist:
            self._waitlist.remove(job)
        if job.assigned is not None:  # a slot was reserved for it: give it back
            provider, job.assigned = job.assigned.provider, None
            self._slot_freed(provider)

    async def _wait_turn(self, job: _Ticket, deadline: float) -> bool:
        """Wait until a slot is assigned to ``job``; False at the deadline or
        when the job is cancelled."""
        while job.assigned is None and not job.cancel.is_set():
            job.wake = trio.Event()
            with trio.move_on_at(deadline):
                await job.wake.wait()
            if job.assigned is None and trio.current_time() >= deadline:
                return False
        return job.assigned is not None and not job.cancel.is_set()

    def _slot_freed(self, provider: bytes) -> None:
        self._inflight[provider] -= 1
        if self._inflight[provider] <= 0:
            del self._inflight[provider]
        self._dispatch()

    def _mark_busy(self, provider: bytes) -> None:
        offer = self.book.get(provider)
        self._busy[provider] = (offer.seq if offer is not None else 0, trio.current_time())

    def _offer_arrived(self, provider: bytes) -> None:
        """A new offer (or a withdrawal): its slot count now includes our
        jobs in flight there."""
        if provider == self.key.public_key:
            return
        self._at_offer[provider] = self._inflight[provider]
        if len(self._at_offer) > MAX_TRACKED_PROVIDERS:
            self._at_offer = {p: n for p, n in self._at_offer.items() if n or p in self._inflight}
        self._dispatch()

    # --- the job's record (p2pgpu.core.jobrecords, kept by p2pgpu.jobstore)

    def _save(self, record: JobRecord, text: str | None = None) -> None:
        assert self.job_store is not None
        self.job_store.put(record, text)
        self._job_saved.set()
        self._job_saved = trio.Event()

    def _record(self, job: _Ticket) -> JobRecord:
        assert self.job_store is not None
        record = self.job_store.get(job.job_id)
        assert record is not None, "a live job's record is never pruned"
        return record

    def _update(self, job: _Ticket, status: str, **changes: Any) -> None:
        self._save(advance(self._record(job), status, now_ms(), **changes))

    def _start_attempt(self, job: _Ticket, provider: bytes) -> None:
        record = self._record(job)
        self._update(job, RUNNING, provider=provider, attempts=(*record.attempts, Attempt(provider, now_ms())))

    def _end_attempt(self, job: _Ticket, outcome: str, result: JobResult | None = None) -> None:
        record = self._record(job)
        if not record.attempts:
            return
        last = record.attempts[-1]
        last = replace(last, outcome=outcome[:MAX_REASON_CHARS],
                       hold_id=result.hold_id if result is not None else None,
                       release=result.release if result is not None else "",
                       paid=result.cost if result is not None else None)
        changes: dict[str, Any] = {"attempts": (*record.attempts[:-1], last)}
        if result is not None:
            before = job.delivered
            job.paid += result.cost
            job.delivered += result.tokens
            job.streaming = 0
            changes.update(cost=job.paid, hold_id=result.hold_id, release=last.release, tokens_out=job.delivered)
            if result.receipt is not None:
                # what was paid for: tokens still in flight when we cancelled count too
                changes.update(tokens_in=result.receipt.prompt_eval_count,
                               tokens_out=before + result.receipt.output_tokens)
        self._save(replace(record, **changes))

    def _token(self, job: _Ticket, text: str, count: int, emit: Callable[[dict[str, Any]], None]) -> None:
        if not job.chunks and self._record(job).first_token_ms is None:
            self._save(replace(self._record(job), first_token_ms=now_ms()))
        job.chunks.append(text)
        job.streaming += count
        emit({"type": "token", "text": text})

    def _end_job(self, job: _Ticket, status: str, *, reason: str = "", result: JobResult | None = None) -> None:
        record = self._record(job)
        if record.final:
            return
        text = "".join(job.chunks)
        stored, cut = cut_text(text)
        self._save(advance(record, status, now_ms(), reason=reason, text_chars=len(stored), text_cut=cut), text)

    def _cancelled(self, job: _Ticket, result: JobResult | None = None) -> dict[str, Any]:
        self._end_job(job, CANCELLED, reason="cancelled by the user", result=result)
        return {"type": "error", "error": "the job was cancelled", "kind": "Cancelled"}

    def _failed(self, job: _Ticket, status: str, message: str, kind: type[P2PGPUError] = ExecutionFailed) -> dict[str, Any]:
        self._end_job(job, status, reason=message)
        return {"type": "error", "error": message, "kind": kind.__name__}

    # ------------------------------------------------------------ jobs (provider)

    def _on_provider_job(self, served: Any) -> None:
        """``ProviderService``'s ``on_job``: a job we serve was accepted or ended."""
        session = served.session
        request = session.request
        if request is None or self.job_store is None:
            return  # no valid request ever came: nothing to remember
        now = now_ms()
        old = self.job_store.get(request.job_id)
        running = old is not None and old.role == PROVIDER and old.status == RUNNING
        base = old if running else JobRecord(
            request.job_id, PROVIDER, RUNNING, request.model, request.consumer, self.key.public_key, now,
            started_ms=now, hold_id=request.hold_id)
        facts: dict[str, Any] = {"tokens_out": session.sent, "cost": session.paid, "tokens_in": served.prompt_tokens}
        if session.state is not ProviderState.DONE:  # accepted, generating
            self._save(replace(base, **facts))
            return
        status, reason = served_outcome(accepted=served.accepted, outcome=served.outcome,
                                        cancelled=session.cancelled, finished=served.prompt_tokens is not None)
        self._save(advance(base, status, now, reason=reason, **facts))

    async def _keep_voucher(self, request: JobRequest, voucher: Signed) -> None:
        """``ProviderService``'s ``keep_voucher``: a served job's newest
        voucher, written synced to the job store by a worker thread."""
        assert self.job_store is not None
        kept = KeptVoucher(request.job_id, request.model, request.hold, voucher).to_wire()
        await trio.to_thread.run_sync(self.job_store.keep_voucher, request.job_id, kept)

    def _find_kept_vouchers(self) -> None:
        """At start, before we serve anything: the vouchers kept for jobs
        that a crash or stop cut short (a job that ended claimed its own)."""
        assert self.job_store is not None
        for job_id, raw in self.job_store.kept_vouchers():
            try:
                self._kept[job_id] = KeptVoucher.from_wire(raw, self.network_id)
            except P2PGPUError as exc:
                log.warning("job store: dropping the damaged kept voucher of job %s: %s", job_id.hex()[:16], exc)
                self.job_store.forget_voucher(job_id)
        if self._kept:
            log.info("%d job(s) we served were cut short; claiming what their vouchers cover", len(self._kept))

    async def _claim_kept_vouchers(self) -> None:
        """CLAIM what the kept vouchers cover (``p2pgpu.core.settlement.plan_claim``
        decides) and put the outcome in the jobs' records. A hold our ledger
        lost with the crash is offered again from the kept copy; if it still
        waits for the consumer's earlier entries, sync brings them."""
        assert self.job_store is not None and self.ledger is not None and self.replicator is not None
        offered: set[bytes] = set()
        while self._kept:
            self._kept_wakeup = trio.Event()
            next_at: int | None = None
            for job_id, kept in list(self._kept.items()):
                hold_id = kept.hold_id
                if not self.ledger.has_entry(hold_id) and hold_id not in offered:
                    offered.add(hold_id)
                    await self.replicator.offer([kept.hold.wire])
                plan = plan_claim(amount=kept.amount, expiry_ms=kept.expiry_ms, now_ms=now_ms(),
                                  claims=self.ledger.claims_of(hold_id), hold_known=self.ledger.has_entry(hold_id))
                if isinstance(plan, ClaimNow):
                    try:
                        await self.replicator.append(
                            lambda ledger: ledger.claim(self.key, hold_id, kept.voucher, now_ms()))
                    except P2PGPUError as exc:
                        log.warning("claim of hold %s for %s coins failed: %s; trying again later",
                                    hold_id.hex()[:8], format_coins(kept.amount), exc)
                        plan = WaitUntil(min(kept.expiry_ms + 1, now_ms() + SETTLE_RETRY_MS))
                    else:
                        log.info("claimed %s coins from hold %s of job %s, cut short by our stop",
                                 format_coins(kept.amount), hold_id.hex()[:8], job_id.hex()[:8])
                        plan = Claimed(kept.amount)
                if isinstance(plan, WaitUntil):
                    next_at = plan.at_ms if next_at is None else min(next_at, plan.at_ms)
                    continue
                if isinstance(plan, PayLost):
                    log.warning("job %s: %s", job_id.hex()[:8], plan.reason)
                claimed, lost = (plan.amount, "") if isinstance(plan, Claimed) else (0, plan.reason)
                self._save(served_pay(self.job_store.get(job_id), kept, self.key.public_key, now_ms(),
                                      claimed=claimed, lost=lost))
                self.job_store.forget_voucher(job_id)
                del self._kept[job_id]
            if self._kept:
                wait_s = SETTLE_IDLE_S if next_at is None else min(SETTLE_IDLE_S, max(0.0, (next_at - now_ms()) / 1000))
                with trio.move_on_after(wait_s):
                    await self._kept_wakeup.wait()
                await trio.sleep(SETTLE_MIN_INTERVAL_S)

    # ------------------------------------------------------------ jobs (API)

    def jobs(self, role: str | None, limit: int) -> list[dict[str, Any]]:
        assert self.job_store is not None
        now = now_ms()
        return [self._with_progress(job_info(record, now), record) for record in self.job_store.newest(role, limit)]

    def _with_progress(self, info: dict[str, Any], record: JobRecord) -> dict[str, Any]:
        """A running job's tokens so far: its record is written when an
        attempt starts and ends, the count streams in between."""
        if record.final:
            return info
        if record.role == CONSUMER and (ticket := self._live_jobs.get(record.job_id)) is not None:
            info["tokens_out"] = ticket.delivered + ticket.streaming
        elif record.role == PROVIDER and self.provider_service is not None \
                and (served := self.provider_service.live.get(record.job_id)) is not None:
            info["tokens_out"] = served.session.sent
        return info

    def job(self, job_id: str) -> dict[str, Any]:
        assert self.job_store is not None
        record = self.job_store.find(job_id)
        info = self._with_progress(job_info(record, now_ms()), record)
        live = self._live_jobs.get(record.job_id)
        if live is not None:
            text, cut = cut_text("".join(live.chunks))
        else:
            text, cut = self.job_store.text(record.job_id) or "", record.text_cut
        info.update(text=text, text_cut=cut)
        return info

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Stop one of our jobs and wait (a little) until it has: a consumer
        job goes the way of a client that went away (the provider stops, we
        pay for the tokens delivered); a job we serve is stopped here and the
        consumer pays for what it was sent."""
        assert self.job_store is not None
        record = self.job_store.find(job_id)
        check_cancellable(record)
        if record.role == CONSUMER:
            live = self._live_jobs.get(record.job_id)
            if live is None:
                raise JobStateConflict(f"job {record.id_hex} is no longer running on this node")
            live.stop()
        elif self.provider_service is None or not self.provider_service.cancel(
                record.job_id, "cancelled by the provider's operator"):
            raise JobStateConflict(f"job {record.id_hex} is not generating now; there is nothing to stop")
        with trio.move_on_after(CANCEL_WAIT_S):
            while not self.job_store.get(record.job_id).final:  # type: ignore[union-attr]
                await self._job_saved.wait()
        return job_info(self.job_store.get(record.job_id), now_ms())  # type: ignore[arg-type]

    # ------------------------------------------------------------ holds

    def _note_hold(self, job: _Ticket, result: JobResult) -> None:
        """After a job: a hold its runner could not release is ours to
        release (``_settle_holds``) from now on."""
        self._hold_jobs[result.hold_id] = job.job_id
        if len(self._hold_jobs) > MAX_OPEN_HOLDS:
            self._hold_jobs.pop(next(iter(self._hold_jobs)))
        hold = self._open_holds.get(result.hold_id)
        if hold is None:
            return
        if result.release == "pending":
            self._open_holds[result.hold_id] = replace(hold, not_before_ms=0)
            self._settle_wakeup.set()

    def _track_holds(self, entries: list[Entry]) -> None:
        me = self.key.public_key
        providers = {hold.provider for hold in self._open_holds.values()}
        wake = False
        for entry in entries:
            if entry.author == me and entry.kind == HOLD:
                body = entry.body
                if len(self._open_holds) < MAX_OPEN_HOLDS:
                    # its job releases it if it can; from expiry on, so may we
                    self._open_holds[entry.id] = OpenHold(entry.id, body.provider, body.amount,  # type: ignore[union-attr]
                                                          body.expiry_ms, body.expiry_ms + 1)  # type: ignore[union-attr]
                    wake = True
            elif entry.author == me and entry.kind == RELEASE:
                hold_id = entry.body.hold_id  # type: ignore[union-attr]
                self._open_holds.pop(hold_id, None)
                self._hold_released(hold_id)
            elif entry.author in providers:
                wake = True  # a claim, or an entry stamped after expiry
        if wake:
            self._settle_wakeup.set()

    def _hold_released(self, hold_id: bytes) -> None:
        """A hold of ours is released: its attempt cost what the ledger paid
        the provider from it (``settle_attempt``), which is less than our
        last voucher when the provider crashed before it kept that one."""
        assert self.ledger is not None
        job_id = self._hold_jobs.pop(hold_id, None)
        if job_id is None:  # a hold from before a restart: its entry names the job
            entry = self.ledger.get_entry(hold_id)
            job_id = entry.body.job_id if entry is not None and entry.kind == HOLD else None  # type: ignore[union-attr]
        record = self.job_store.get(job_id) if job_id is not None and self.job_store is not None else None
        settled = self.ledger.hold_status(hold_id)
        if record is None or record.role != CONSUMER or settled is None:
            return
        self._save(settle_attempt(record, hold_id, settled[0]))

    def _find_open_holds(self) -> None:
        """At start: our recent holds that were never released (a job cut
        short by a stop or a crash); nothing of ours still runs, so each may
        be settled at once."""
        assert self.ledger is not None
        for entry in self.ledger.history(self.key.public_key, last=OPEN_HOLD_SCAN):
            if entry.kind == HOLD and not self.ledger.releases_of(entry.id):
                body = entry.body
                self._open_holds[entry.id] = OpenHold(entry.id, body.provider, body.amount, body.expiry_ms)  # type: ignore[union-attr]
        if self._open_holds:
            log.info("%d hold(s) of ours are still open; releasing them when the ledger allows", len(self._open_holds))

    async def _settle_holds(self) -> None:
        """Release our open holds once the ledger allows it (against the
        provider's CLAIM, a provider entry after expiry, or expiry plus the
        grace): ``p2pgpu.core.settlement.plan_release`` decides, this task
        reads the clock and appends. Wakes on ledger applies and timers."""
        assert self.ledger is not None and self.replicator is not None
        grace = self.genesis.params.release_grace_ms
        while True:
            self._settle_wakeup = trio.Event()
            next_at: int | None = None
            for hold in list(self._open_holds.values()):
                now = now_ms()
                plan = plan_release(
                    hold, now_ms=now, release_grace_ms=grace, claims=self.ledger.claims_of(hold.hold_id),
                    released=bool(self.ledger.releases_of(hold.hold_id)),
                    provider_entry_after_expiry=self._provider_entry_after(hold, now),
                )
                if plan is None:
                    self._open_holds.pop(hold.hold_id, None)
                    self._hold_released(hold.hold_id)
                elif isinstance(plan, WaitUntil):
                    next_at = plan.at_ms if next_at is None else min(next_at, plan.at_ms)
                else:
                    try:
                        await self.replicator.append(
                            lambda ledger: ledger.release(self.key, hold.hold_id, plan.basis, plan.ref, now_ms()))
                        log.info("released hold %s (%s)", hold.hold_id.hex()[:8], BASIS_NAMES[plan.basis])
                    except P2PGPUError as exc:
                        log.warning("release of hold %s failed: %s; trying again later", hold.hold_id.hex()[:8], exc)
                        retry = now_ms() + SETTLE_RETRY_MS
                        if hold.hold_id in self._open_holds:
                            self._open_holds[hold.hold_id] = replace(hold, not_before_ms=retry)
                        next_at = retry if next_at is None else min(next_at, retry)
            wait_s = SETTLE_IDLE_S if next_at is None else min(SETTLE_IDLE_S, max(0.0, (next_at - now_ms()) / 1000))
            with trio.move_on_after(wait_s):
                await self._settle_wakeup.wait()
            await trio.sleep(SETTLE_MIN_INTERVAL_S)  # gather a burst of applies into one pass

    def _provider_entry_after(self, hold: OpenHold, now: int) -> bytes | None:
        """The provider's newest entry, if it is stamped after the hold's expiry."""
        assert self.ledger is not None
        if now <= hold.expiry_ms:
            return None
        head = self.ledger.head(hold.provider)
        if head is None:
            return None
        entry = self.ledger.get_entry(head[1])
        return entry.id if entry is not None and entry.timestamp_ms > hold.expiry_ms else None

    # ------------------------------------------------------------ the faucet

    async def faucet(self, to: str, amount: int) -> dict[str, Any]:
        assert self.replicator is not None
        if not self.is_faucet:
            raise LedgerRuleViolation("this node does not hold the network's faucet key")
        recipient = public_key_from_peer_id(to)

        def mint_and_send(ledger: Ledger) -> list[Entry]:
            now = now_ms()
            minted = ledger.mint(self.key, amount, now, "faucet")
            if recipient == self.key.public_key:
                return [minted]
            return [minted, ledger.send(self.key, recipient, amount, now, "faucet")]

        entries = await self.replicator.append(mint_and_send)
        return {"entry_id": entries[-1].id.hex(), "amount": amount, "to": to}


def _with_system(request: SubmitRequest) -> list[tuple[str, str]] | None:
    """Chat messages with the system prompt first; None for a plain prompt
    (the job runner then sends ``prompt``; a system prompt rides along as
    the first message of a chat instead)."""
    if request.messages is None and request.system is None:
        return None
    messages = list(request.messages or ())
    if request.system is not None:
        messages.insert(0, ("system", request.system))
    if request.prompt is not None:
        messages.append(("user", request.prompt))
    return messages


def _work(request: SubmitRequest) -> Work:
    """The request as its first attempt sends it (a system prompt rides
    along as the first chat message)."""
    messages = _with_system(request)
    return Work(request.prompt if messages is None else None, None if messages is None else tuple(messages),
                request.max_tokens, request.max_price)


def _done_event(job: _Ticket, provider: str, attempts: int, result: JobResult | None = None) -> dict[str, Any]:
    """The final event of a completed job: ``tokens`` and ``cost`` over all
    its attempts (after a failover each provider is paid for its part of
    the answer); speed and release from the last attempt's ``result``, when
    it ended with one (a provider that died after its last token has none)."""
    receipt = result.receipt if result is not None else None
    return {
        "type": "done",
        "job_id": job.job_id.hex(),
        "provider": provider,
        "tokens": job.delivered,
        "prompt_tokens": receipt.prompt_eval_count if receipt is not None else 0,
        "cost": job.paid,
        "attempts": attempts,
        "tokens_per_s": result.tokens_per_s if result is not None else None,
        "ttft_s": result.ttft_s if result is not None else None,
        "release": result.release if result is not None else "pending",
    }


def _statement_item(line: StatementLine) -> dict[str, Any]:
    """A ledger statement line as the API shows it (peer ids, hex)."""
    return {
        "id": line.entry_id.hex(),
        "seq": line.seq,
        "kind": line.kind,
        "timestamp_ms": line.timestamp_ms,
        "counterparty": peer_id_from_public_key(line.counterparty) if line.counterparty else None,
        "amount": line.amount,
        "memo": line.memo,
        "direction": line.direction,
    }


async def run_until_signalled(config: NodeConfig) -> int | None:
    """What ``p2pgpu node run`` does: run a node until SIGINT or SIGTERM,
    then shut down gracefully (withdraw the offer, close the host and the
    database). Returns the signal that stopped it (the CLI's exit status
    depends on which)."""
    import signal

    node = Node(config)
    received: list[int] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("received %s; shutting down", signal.Signals(signum).name)
                    received.append(signum)
                    node.stop()
                    return

            nursery.start_soon(stop_on_signal)
            await node.run()
            nursery.cancel_scope.cancel()
    return received[0] if received else None

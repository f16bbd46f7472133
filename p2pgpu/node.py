"""The node daemon: one trio process that wires the edges to the core.

Theory of operation
-------------------
``Node.run`` opens, in one nursery:

- the libp2p host (``p2pgpu.net``) with gossip and bootstrap redial;
- ledger replication (``p2pgpu.replication``): gossip of new entries and
  anti-entropy sync over ``/p2pgpu/ledger-sync/1.0.0``;
- the market (``p2pgpu.market``): the offer book we follow and, when this
  node provides, our heartbeat offer; each offer it accepts is announced to
  the consumer side (a slot may have come free);
- incoming coins: sends addressed to this node are taken in (RECEIVE) as
  they arrive, so they become spendable;
- the consumer side (``p2pgpu.consumer``): each ``submit`` is a task that
  drives one ``p2pgpu.core.submission`` machine (wait in this node's line
  for a provider slot, run, fail over, back off on busy); the market tells
  it of each offer; every job, ours and those we serve, is kept in the job
  store (``p2pgpu.jobstore``) so ``p2pgpu jobs`` lists it after a restart;
- holds (``p2pgpu.holds``): the one owner of our open holds and of the
  provider's kept vouchers; a job reports its end there, and the release
  rule (``p2pgpu.core.settlement``) decides; releases and claims come back
  to the job records through callbacks wired here;
- the local HTTP API on 127.0.0.1 with the bearer token from the data dir.

The node holds no rules: the ledger, offers and job sessions decide;
this module moves bytes, reads clocks, and serialises ledger access on the
trio thread. ``stop()`` withdraws the offer and lets everything close; the CLI
calls it on SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

import trio

from p2pgpu import __version__
from p2pgpu.api import SubmitRequest, create_app, remove_api_address, serve_api, write_api_address
from p2pgpu.config import NodeConfig
from p2pgpu.core.genesis import Genesis
from p2pgpu.core.identity import peer_id_from_public_key, public_key_from_peer_id
from p2pgpu.core.ledger import SEND, Entry, Ledger, StatementLine
from p2pgpu.core.jobrecords import (
    CONSUMER, PROVIDER, JobRecord, check_cancellable, cut_text, job_info, served_outcome, served_pay, served_record,
    settle_attempt,
)
from p2pgpu.core.jobs import Prices, ProviderState
from p2pgpu.core.submission import SubmissionConfig
from p2pgpu.consumer import Consumer, NetworkAttempts
from p2pgpu.datadir import DataDir, GenesisInstall, read_genesis_file
from p2pgpu.errors import ConfigError, JobStateConflict, LedgerRuleViolation, P2PGPUError
from p2pgpu.executor import OllamaBackend
from p2pgpu.gateway import Gateway, serve_gateway
from p2pgpu.gateway.app import gateway_url, remove_gateway_address, write_gateway_address
from p2pgpu.holds import HoldReleased, Holds, KeptVouchers, PaySettled, SettleConfig
from p2pgpu.jobrunner import JobStreamPool, ProviderService
from p2pgpu.market import Market, MarketConfig
from p2pgpu.jobstore import JOBS_DIR, JobStore
from p2pgpu.net import BootstrapConfig, GossipConfig, P2PHost, open_host
from p2pgpu.net.peer_exchange import PeerExchange
from p2pgpu.replication import LedgerReplicator

log = logging.getLogger(__name__)

HISTORY_LIMIT = 100  # newest wallet entries returned: the API runs on the trio thread

CANCEL_WAIT_S = 15.0  # cancel_job waits this long for the job to stop (a receipt takes up to 10 s)


def now_ms() -> int:
    return int(time.time() * 1000)


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
        self.backend = OllamaBackend(config.ollama_host)
        self.market = Market(self.key, self.genesis, self.backend, MarketConfig.from_node(config), now_ms=now_ms,
                             on_offer=self._offer_arrived)
        self.book = self.market.book  # the consumer side ranks and reserves from it
        self.api_port: int | None = None
        self.gateway: Gateway | None = None
        self.gateway_port: int | None = None
        self.started_at = time.monotonic()
        self._stopping = trio.Event()
        self._incoming = trio.Event()
        self._cancel: trio.CancelScope | None = None
        self.is_faucet = self.key.public_key == self.genesis.faucet
        self.provider_service: ProviderService | None = None
        self._nursery: trio.Nursery | None = None
        self.job_streams: JobStreamPool | None = None  # job streams opened ahead to providers we use
        self.job_store: JobStore | None = None
        self.consumer: Consumer | None = None  # our submissions (p2pgpu.consumer), once running
        self._job_saved = trio.Event()
        self.holds: Holds | None = None  # our open holds (consumer)
        self.kept_vouchers: KeptVouchers | None = None  # vouchers of jobs we serve (provider)

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        self.ledger = self.data_dir.open_ledger()
        try:
            self.job_store = JobStore(self.data_dir.path / JOBS_DIR, now_ms=now_ms())
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
                settle = SettleConfig()
                self.holds = Holds(self.ledger, self.replicator, self.key, now_ms=now_ms, config=settle,
                                   on_released=self._attempt_settled)
                self.kept_vouchers = KeptVouchers(self.ledger, self.replicator, self.key, self.job_store,
                                                  now_ms=now_ms, config=settle, on_settled=self._served_pay_settled)
                self.holds.find()
                self.kept_vouchers.find()  # before we serve anything
                async with trio.open_nursery() as nursery:
                    self._cancel = nursery.cancel_scope
                    self._nursery = nursery
                    self.job_streams = JobStreamPool(host, nursery)
                    self.consumer = Consumer(
                        me=self.key.public_key, offers=self.book, records=self.job_store, save=self._save,
                        attempts=NetworkAttempts(host, self.replicator, self.ledger, self.key, now_ms=now_ms,
                                                 streams=self.job_streams, settle=self.holds.job_ended),
                        spendable=lambda: self.ledger.spendable(self.key.public_key),  # type: ignore[union-attr]
                        nursery=nursery, now_ms=now_ms,
                        config=SubmissionConfig(queue_timeout_ms=round(config.queue_timeout_s * 1000)),
                    )
                    await nursery.start(PeerExchange(host).run)
                    await nursery.start(self.replicator.run)
                    await nursery.start(self.market.follow, host)
                    nursery.start_soon(self._take_in_coins)
                    nursery.start_soon(self.holds.run)
                    nursery.start_soon(self.kept_vouchers.run)
                    if config.provide:
                        self.provider_service = ProviderService(
                            host, self.replicator, self.ledger, self.key, self.backend,
                            prices=Prices(config.price_in, config.price_out), slots=config.slots, now_ms=now_ms,
                            on_backend_failure=lambda exc: self.market.backend_suspect(),
                            on_slots_changed=self.market.beat_soon,
                            on_job=self._on_provider_job,
                            keep_voucher=self.kept_vouchers.keep, forget_voucher=self.kept_vouchers.forget,
                            max_credit_window=config.max_credit_window,
                        )
                        self.market.serving = self.provider_service
                        self.provider_service.start()
                        nursery.start_soon(self.market.provide)
                    self.api_port = await nursery.start(serve_api, create_app(self, self.token), config.api_port)
                    write_api_address(self.data_dir, self.api_port)
                    gateway = config.gateway()
                    if gateway.enabled:
                        self.gateway = Gateway(self, self.token, self.key.peer_id, gateway)
                        self.gateway_port = await nursery.start(serve_gateway, self.gateway)
                        write_gateway_address(self.data_dir, gateway.address()[0], self.gateway_port)
                    log.info("node %s up: p2p %s, api 127.0.0.1:%d", self.key.peer_id, host.listen_addrs(), self.api_port)
                    self._incoming.set()  # take in anything that arrived while we were offline
                    task_status.started(self)
                    await self._stopping.wait()
                    await self.market.leave()  # the heartbeat stops, the withdrawal goes out
                    nursery.cancel_scope.cancel()
        finally:
            remove_api_address(self.data_dir, self.api_port)
            remove_gateway_address(self.data_dir)
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

    @property
    def advertising(self) -> bool:
        """Our offer is out (``p2pgpu.market``)."""
        return self.market.advertising

    # ------------------------------------------------------------ coins

    def _on_applied(self, entries: list[Entry]) -> None:
        me = self.key.public_key
        if any(e.kind == SEND and e.body.to == me for e in entries):  # type: ignore[union-attr]
            self._incoming.set()
        if self.holds is not None:
            self.holds.track(entries)
        if self.kept_vouchers is not None:
            self.kept_vouchers.wake()

    async def _take_in_coins(self) -> None:
        """RECEIVE every send addressed to this node, so it becomes spendable."""
        assert self.replicator is not None and self.ledger is not None
        while True:
            await self._incoming.wait()
            self._incoming = trio.Event()
            if self.ledger.can_take_in(self.key.public_key):
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
            "role": "provider" if self.market.advertising else "consumer",
            "provider": self.market.note,
            "faucet": self.is_faucet,
            "balance": me.balance,
            "held": me.held,
            "pending_in": me.pending_in,
            "spendable": self.ledger.spendable(self.key.public_key),
            "entries": me.entries,
            "state_hash": self.ledger.state_hash().hex(),
            "frozen": [peer_id_from_public_key(pk) for pk in self.ledger.frozen()],
            "replication": self.replicator.stats() if self.replicator else {},
            "peer_trouble": self.host.peer_log.stats(),  # what peers did wrong, counted (p2pgpu.net.peerlog)
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "gateway": (gateway_url(self.config.gateway().address()[0], self.gateway_port)
                        if self.gateway_port is not None else None),
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
                "arrivals": [list(a) for a in self.market.arrivals.get(offer.provider, ())],
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

    # ------------------------------------------------------------ jobs (consumer: p2pgpu.consumer)

    def submit(self, request: SubmitRequest) -> AsyncIterator[dict[str, Any]]:
        """``Consumer.submit``: run a job, fail over, wait in line for a slot."""
        assert self.consumer is not None
        return self.consumer.submit(request)

    def _offer_arrived(self, provider: bytes) -> None:
        """The market's ``on_offer``: the consumer side may have a slot now."""
        if self.consumer is not None:
            self.consumer.offer_arrived(provider)

    # --- the job store's one writer: consumer, provider and holds records all go through here

    def _save(self, record: JobRecord, text: str | None = None) -> None:
        assert self.job_store is not None
        self.job_store.put(record, text)
        self._job_saved.set()
        self._job_saved = trio.Event()

    # ------------------------------------------------------------ jobs (provider)

    def _on_provider_job(self, served: Any) -> None:
        """``ProviderService``'s ``on_job``: a job we serve was accepted or ended."""
        session = served.session
        request = session.request
        if request is None or self.job_store is None:
            return  # no valid request ever came: nothing to remember
        ended = None
        if session.state is ProviderState.DONE:
            ended = served_outcome(accepted=served.accepted, rejected=served.rejected, outcome=served.outcome,
                                   cancelled=session.cancelled, finished=served.prompt_tokens is not None)
        self._save(served_record(
            self.job_store.get(request.job_id), job_id=request.job_id, model=request.model,
            consumer=request.consumer, provider=self.key.public_key, hold_id=request.hold_id, now_ms=now_ms(),
            tokens_out=session.sent, cost=session.paid, tokens_in=served.prompt_tokens, ended=ended))

    # --- what the holds owner reports back, into the job records (p2pgpu.holds)

    def _attempt_settled(self, released: HoldReleased) -> None:
        """``Holds``' ``on_released``: a hold of one of our jobs' attempts is
        released; the attempt costs what the ledger paid the provider from
        it (``settle_attempt``), less than our last voucher when the
        provider crashed before it kept that one."""
        record = self.job_store.get(released.job_id) if self.job_store is not None else None
        if record is not None and record.role == CONSUMER:
            self._save(settle_attempt(record, released.hold_id, released.payout))

    def _served_pay_settled(self, settled: PaySettled) -> None:
        """``KeptVouchers``' ``on_settled``: a job we served that a crash cut
        short is paid (or its pay lost); its record says so."""
        assert self.job_store is not None
        self._save(served_pay(self.job_store.get(settled.kept.job_id), settled.kept, self.key.public_key, now_ms(),
                              claimed=settled.claimed, lost=settled.lost))

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
        if record.role == CONSUMER and self.consumer is not None \
                and (tokens := self.consumer.progress(record.job_id)) is not None:
            info["tokens_out"] = tokens
        elif record.role == PROVIDER and self.provider_service is not None \
                and (served := self.provider_service.live.get(record.job_id)) is not None:
            info["tokens_out"] = served.session.sent
        return info

    def job(self, job_id: str) -> dict[str, Any]:
        assert self.job_store is not None
        record = self.job_store.find(job_id)
        info = self._with_progress(job_info(record, now_ms()), record)
        live = self.consumer.text(record.job_id) if self.consumer is not None else None
        if live is not None:
            text, cut = cut_text(live)
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
            if self.consumer is None or not self.consumer.cancel(record.job_id):
                raise JobStateConflict(f"job {record.id_hex} is no longer running on this node")
        elif self.provider_service is None or not self.provider_service.cancel(
                record.job_id, "cancelled by the provider's operator"):
            raise JobStateConflict(f"job {record.id_hex} is not generating now; there is nothing to stop")
        with trio.move_on_after(CANCEL_WAIT_S):
            while not self.job_store.get(record.job_id).final:  # type: ignore[union-attr]
                await self._job_saved.wait()
        return job_info(self.job_store.get(record.job_id), now_ms())  # type: ignore[arg-type]

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

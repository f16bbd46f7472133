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
- the local HTTP API on 127.0.0.1 with the bearer token from the data dir.

The node holds no rules: the ledger, offers and (later) job sessions decide;
this module moves bytes, reads clocks, and serialises ledger access on the
trio thread. ``stop()`` withdraws the offer and lets everything close; the CLI
calls it on SIGINT/SIGTERM.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from typing import Any, AsyncIterator

import trio

from p2pgpu import __version__
from p2pgpu.api import SubmitRequest, create_app, remove_api_address, serve_api, write_api_address
from p2pgpu.config import NodeConfig
from p2pgpu.core.genesis import Genesis
from p2pgpu.core.hardware import HardwareReport
from p2pgpu.core.identity import peer_id_from_public_key, public_key_from_peer_id
from p2pgpu.core.ledger import SEND, Entry, Ledger, StatementLine
from p2pgpu.core.jobs import Prices, prompt_token_bound
from p2pgpu.core.offers import ModelOffer, OfferBook, make_offer, make_withdrawal, next_seq, normalize_model_name
from p2pgpu.core.ranking import ProviderHistory, explain_no_match, rank
from p2pgpu.core.units import format_coins
from p2pgpu.core.protocols import offers_topic
from p2pgpu.datadir import DataDir, read_genesis_file
from p2pgpu.errors import ConfigError, ExecutionFailed, InsufficientFunds, LedgerRuleViolation, P2PGPUError
from p2pgpu.executor import OllamaBackend
from p2pgpu.gpu import probe
from p2pgpu.jobrunner import ProviderService, run_job
from p2pgpu.net import BootstrapConfig, GossipConfig, P2PHost, open_host
from p2pgpu.net.peer_exchange import PeerExchange
from p2pgpu.replication import LedgerReplicator

log = logging.getLogger(__name__)

AGENT = f"p2pgpu/{__version__}"
MAX_CLOCK_SKEW_MS = 60_000
HISTORY_LIMIT = 100  # newest wallet entries returned: the API runs on the trio thread
WITHDRAWAL_LINGER_S = 0.5
ARRIVALS_KEPT = 64  # recent offers remembered per provider, as [seq, signed_ms, received_ms]


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
            self.data_dir.install_genesis(read_genesis_file(config.genesis))
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
        self.provider_note = "not providing"
        self._offer_seq = 0
        self._arrivals: dict[bytes, collections.deque[tuple[int, int, int]]] = {}
        self._stopping = trio.Event()
        self._incoming = trio.Event()
        self._cancel: trio.CancelScope | None = None
        self.is_faucet = self.key.public_key == self.genesis.faucet
        self.history = ProviderHistory()  # this node's own record of providers it used
        self.provider_service: ProviderService | None = None
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        self.ledger = self.data_dir.open_ledger()
        try:
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
                    await nursery.start(PeerExchange(host).run)
                    await nursery.start(self.replicator.run)
                    await nursery.start(self._follow_offers)
                    nursery.start_soon(self._take_in_coins)
                    provider_scope = trio.CancelScope()
                    if config.provide:
                        self.provider_service = ProviderService(
                            host, self.replicator, self.ledger, self.key, self.backend,
                            prices=Prices(config.price_in, config.price_out), slots=config.slots, now_ms=now_ms,
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
            self.ledger.close()
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
        beats = 0
        while True:
            try:
                models = await self.backend.models()
                if beats % 6 == 0 or self.hardware is None:
                    self.hardware = await trio.to_thread.run_sync(probe)
                beats += 1
                if not models:
                    raise ExecutionFailed(f"Ollama at {self.backend.host} serves no models")
                if self.provider_service is not None:
                    # admission checks this heartbeat's list instead of asking Ollama per request
                    self.provider_service.models = {normalize_model_name(m.name) for m in models}
                if not self.hardware.gpus and not self.config.offer_cpu:
                    raise ExecutionFailed("no GPU found (set offer_cpu = true to offer CPU inference)")
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
                    log.info("offering %s at %d/%d per Mtok", [m.name for m in models], self.config.price_in, self.config.price_out)
                self.advertising, self.provider_note = True, "offering"
            except P2PGPUError as exc:  # Ollama down, no GPU, or a model name peers would refuse
                if self.advertising:
                    log.warning("stopped offering: %s", exc)
                    await self._withdraw()
                self.advertising, self.provider_note = False, str(exc)
            await trio.sleep(self.config.heartbeat_s)

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

    def _record_own(self, wire: bytes) -> None:
        """Our own offer or withdrawal in our own book (gossip may already
        have delivered it back to us, which is fine)."""
        self._accept_offer(wire, "self")

    # ------------------------------------------------------------ coins

    def _on_applied(self, entries: list[Entry]) -> None:
        me = self.key.public_key
        if any(e.kind == SEND and e.body.to == me for e in entries):  # type: ignore[union-attr]
            self._incoming.set()

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

    async def submit(self, request: SubmitRequest) -> AsyncIterator[dict[str, Any]]:
        """Run a job on the best provider, failing over to the next one.

        Errors found before anything is streamed (no provider for the model,
        not enough coins) are raised, so the API answers with an error
        status. The job itself runs as a task of the node's nursery, feeding
        a channel; closing this generator early (the client went away)
        cancels the job, which then pays only for tokens delivered.
        """
        assert self._nursery is not None and self.ledger is not None
        model = normalize_model_name(request.model)
        now = now_ms()
        offers = [o for o in self.book.live(now) if o.provider != self.key.public_key]
        estimate = _prompt_estimate(request)
        ranked = rank(offers, model, max_tokens=request.max_tokens, prompt_tokens_estimate=estimate,
                      history=self.history, now_ms=now, max_price=request.max_price)
        if not ranked:
            raise ExecutionFailed(explain_no_match(offers, model, now, max_tokens=request.max_tokens,
                                                   prompt_tokens_estimate=estimate, max_price=request.max_price))
        spendable = self.ledger.spendable(self.key.public_key)
        if spendable < ranked[0].cost:
            raise InsufficientFunds(
                f"this job may cost up to {format_coins(ranked[0].cost)} coins (held until it ends); "
                f"you can spend {format_coins(spendable)}"
            )
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        cancel = trio.Event()
        self._nursery.start_soon(self._run_submission, request, model, ranked, send, cancel)
        try:
            async with receive:
                async for event in receive:
                    yield event
        finally:
            cancel.set()

    async def _run_submission(self, request: SubmitRequest, model: str, ranked: list, send, cancel: trio.Event) -> None:
        """The body of a ``submit``, as a task of the node's nursery: it must
        never raise (that would stop the node), and a reader that went away
        cancels the job instead of breaking it."""

        def emit(event: dict[str, Any]) -> None:
            try:
                send.send_nowait(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                cancel.set()  # nobody is reading: stop the job, pay for what was delivered

        async with send:
            try:
                emit(await self._attempts(request, model, ranked, emit, cancel))
            except Exception as exc:  # noqa: BLE001 - a bug must not take the node down
                log.exception("job submission failed")
                emit({"type": "error", "error": f"internal error: {exc!r}", "kind": type(exc).__name__})

    async def _attempts(self, request: SubmitRequest, model: str, ranked: list, emit, cancel: trio.Event) -> dict[str, Any]:
        """Try providers best-first; returns the final event (done or error)."""
        assert self.host is not None and self.replicator is not None and self.ledger is not None
        messages = _with_system(request)
        prompt = request.prompt if messages is None else None
        candidates = ranked if request.retry else ranked[:1]
        last_reason = "no provider was tried"
        for attempt, choice in enumerate(candidates, start=1):
            offer = choice.offer
            emit({"type": "provider", "provider": offer.peer_id, "attempt": attempt,
                  "price_in": offer.price_in, "price_out": offer.price_out})
            started = now_ms()
            try:
                await self._reach(offer)
                result = await run_job(
                    self.host, self.replicator, self.ledger, self.key, offer.peer_id,
                    Prices(offer.price_in, offer.price_out), model=model, prompt=prompt, messages=messages,
                    max_tokens=request.max_tokens, now_ms=now_ms,
                    on_tokens=lambda text: emit({"type": "token", "text": text}),
                    max_prompt_tokens=_prompt_estimate(request), cancel=cancel,
                )
            except P2PGPUError as exc:
                self.history.record_failure(offer.provider, now_ms(), str(exc))
                last_reason = f"{offer.peer_id}: {exc}"
            else:
                if result.status == "completed":
                    elapsed = max(1, now_ms() - started)
                    self.history.record_success(
                        offer.provider, now_ms(), int((result.ttft_s or elapsed / 1000) * 1000),
                        result.tokens_per_s or result.tokens * 1000 / elapsed,
                    )
                    return _job_result_event(result)
                self.history.record_failure(offer.provider, now_ms(), result.reason)
                last_reason = f"{offer.peer_id}: {result.status}: {result.reason}"
            if cancel.is_set():
                return {"type": "error", "error": "the job was cancelled", "kind": "Cancelled"}
            if attempt < len(candidates):
                emit({"type": "retry", "provider": offer.peer_id, "reason": last_reason})
        return {"type": "error", "error": f"the job did not complete ({last_reason})", "kind": "ExecutionFailed"}

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


def _prompt_estimate(request: SubmitRequest) -> int:
    """The hold's bound on input tokens for this request, computed on what
    will actually be sent (the core's one formula)."""
    messages = _with_system(request)
    return prompt_token_bound(request.prompt if messages is None else None, messages)


def _job_result_event(result: Any) -> dict[str, Any]:
    receipt = result.receipt
    return {
        "type": "done",
        "job_id": result.job_id.hex(),
        "provider": result.provider,
        "tokens": result.tokens,
        "prompt_tokens": receipt.prompt_eval_count if receipt is not None else 0,
        "cost": result.cost,
        "tokens_per_s": result.tokens_per_s,
        "ttft_s": result.ttft_s,
        "release": result.release,
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


async def run_until_signalled(config: NodeConfig) -> None:
    """What ``p2pgpu node run`` does: run a node until SIGINT or SIGTERM,
    then shut down gracefully (withdraw the offer, close the host and the
    database)."""
    import signal

    node = Node(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("received %s; shutting down", signal.Signals(signum).name)
                    node.stop()
                    return

            nursery.start_soon(stop_on_signal)
            await node.run()
            nursery.cancel_scope.cancel()

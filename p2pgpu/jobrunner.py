"""Run jobs over real libp2p streams: the trio edge of ``p2pgpu.core.jobs``.

``ProviderService`` serves ``JOB_PROTOCOL``: one ``ProviderSession`` per
stream, admission (model, prices, slots, the embedded hold), the backend's
token stream fed into the session, pause/resume/stop, and the CLAIM.
``run_job`` is the consumer: HOLD, request, stream, vouchers; at the end
it reports what it got (the provider's waiver, our last voucher) to the
holds owner (``p2pgpu.holds``), which decides the RELEASE by the one rule
in ``p2pgpu.core.settlement``.

Shape of one job on either side (one trio nursery per stream):

- a *reader* task feeds peer frames to the session;
- a *writer* task owns the stream's sending side: every ``Send`` action goes
  through one unbounded memory channel, so frames leave in exactly the order
  the session produced them, whichever task called the session;
- a *timer* task sleeps until ``next_deadline()`` (woken when it changes);
- provider only: the *generator* task, started on accept, and the *keeper*
  task, which makes the newest voucher durable (``keep_voucher``) while
  tokens flow, one write at a time, skipping to the newest voucher that
  came meanwhile, and tells the session when it is (``voucher_kept``).

Session calls are synchronous and actions are carried out at once
(``_apply``); only ledger appends (claim/release) await. Every error on one
job ends that job's stream only: a peer's bad frame becomes
``connection_lost`` and the stream is reset.
"""

from __future__ import annotations

import base64
import enum
import logging
import math
import secrets
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import trio

from p2pgpu.core.identity import NodeKey, peer_id_from_public_key, public_key_from_peer_id
from p2pgpu.core.jobparams import JobParams
from p2pgpu.core.trust import DEFAULT_MAX_CREDIT_WINDOW, Debtors
from p2pgpu.core.jobs import (
    CONTENT,
    EMBEDDING,
    MAX_REQUEST_CONTEXT,
    MAX_TOKENS_PER_FRAME,
    MAX_TOKENS_TEXT,
    R_BUSY,
    admission_refusal,
    prompt_token_bound,
    R_HOLD,
    R_OTHER,
    Claim,
    Completed,
    ConsumerSession,
    ConsumerState,
    Deliver,
    Failed,
    JobRequest,
    KeepVoucher,
    Pause,
    Prices,
    ProviderSession,
    ProviderState,
    Receipt,
    ReleaseHold,
    RequestReceived,
    Resume,
    Send,
    SessionConfig,
    TOOL_CALL,
    StopGeneration,
    check_job_params,
    encode_body,
    job_cost,
    make_request,
)
from p2pgpu.core.ledger import ApplyResult, Ledger
from p2pgpu.core.offers import normalize_model_name
from p2pgpu.core.protocols import JOB_PROTOCOL, LEDGER_SYNC_PROTOCOL
from p2pgpu.core.settlement import OpenHold, ReleaseState
from p2pgpu.core.units import format_coins
from p2pgpu.errors import ExecutionFailed, MalformedInput, P2PGPUError
from p2pgpu.executor import (
    Backend, Busy, Chunk, EmbedResult, Finished, GenerationRequest, Message, ModelNotFound, Refused,
)
from p2pgpu.holds import Holds
from p2pgpu.net import FrameStream, P2PHost
from p2pgpu.net.peerlog import PeerLog, Trouble
from p2pgpu.replication import LedgerReplicator

log = logging.getLogger(__name__)

__all__ = ["ProviderService", "run_job", "JobResult", "JobStreamPool", "wall_ms"]

NowMs = Callable[[], int]
OnTokens = Callable[[str, int, int], None]  # (text, count, channel) as each TOKENS frame is delivered
SettleHold = Callable[[OpenHold], Awaitable[ReleaseState]]  # ``Holds.job_ended``: report a job's end, get its hold's state
DEFAULT_HOLD_MS = 300_000
DEFAULT_CREDIT_WINDOW = DEFAULT_MAX_CREDIT_WINDOW  # what consumers ask for: what default providers give
REQUEST_CONTEXT_WINDOW_MS = 10_000  # entries older than this have long been announced
HOLD_CHAIN_FETCH_S = 5.0  # longest a provider spends fetching a consumer's entries before a hold


def wall_ms() -> int:
    return int(time.time() * 1000)


def _vector_text(vector: list[float]) -> str:
    """One embedding as an ``EMBEDDING`` frame's text: base64 of its values
    as little-endian float32 (what Ollama computes in; half the bytes of
    float64, and exact for every value it sends). ``ExecutionFailed`` for
    a vector no frame can carry."""
    try:
        data = struct.pack(f"<{len(vector)}f", *vector)
    except (struct.error, OverflowError, TypeError) as exc:
        raise ExecutionFailed(f"the backend sent an embedding that is not float32 values: {exc}") from None
    text = base64.b64encode(data).decode("ascii")
    if not data or len(text) > MAX_TOKENS_TEXT:
        raise ExecutionFailed(f"an embedding of {len(vector)} values does not fit a tokens frame "
                              f"({MAX_TOKENS_TEXT} characters of base64)")
    return text


class _Edge:
    """What both sides share: outgoing queue, writer, timer, reader loop."""

    session: Any

    def __init__(self, stream: FrameStream, now_ms: NowMs) -> None:
        self.stream = stream
        self.now_ms = now_ms
        self._out_send, self._out_recv = trio.open_memory_channel[bytes](math.inf)
        self._timer_changed = trio.Event()
        self.finished = trio.Event()  # the session reached its end state
        self.nursery: trio.Nursery | None = None
        self.failure: BaseException | None = None  # why the stream broke, if it did

    # --- to be provided
    def _is_done(self) -> bool:
        raise NotImplementedError

    def _handle(self, action: Any) -> None:
        raise NotImplementedError

    # --- shared
    def _apply(self, actions: Iterable[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                try:
                    self._out_send.send_nowait(action.data)
                except trio.ClosedResourceError:
                    log.debug("dropping a frame after the stream ended")
            else:
                self._handle(action)
        self._timer_changed.set()
        if self._is_done():
            self._finish()

    def _finish(self) -> None:
        if not self.finished.is_set():
            self.finished.set()
            self._timer_changed.set()
            self._out_send.close()  # the writer drains what is queued, then ends

    async def _writer(self) -> None:
        async with self._out_recv:
            async for data in self._out_recv:
                try:
                    await self.stream.send_frame(data)
                except (P2PGPUError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    # Per frame detail: the job's end is logged once, through the peer log.
                    log.debug("job stream with %s: send failed: %s", self.stream.remote_peer_id, exc)
                    if self.failure is None:
                        self.failure = exc
                    self._apply(self.session.connection_lost(self.now_ms()))
                    self._finish()
                    return

    async def _timer(self) -> None:
        while not self.finished.is_set():
            self._timer_changed = trio.Event()
            deadline = self.session.next_deadline()
            if deadline is None:
                await self._timer_changed.wait()
                continue
            now = self.now_ms()
            if now < deadline:
                with trio.move_on_after((deadline - now) / 1000):
                    await self._timer_changed.wait()
                continue
            self._apply(self.session.on_timer(now))

    async def _reader(self) -> None:
        """Feed frames until the session ends or the stream does. A bad frame
        or a broken stream is ``connection_lost``; raises it afterwards so
        the stream gets reset."""
        while not self.finished.is_set():
            try:
                data = await self.stream.receive_frame()
                if data is None:
                    self._apply(self.session.connection_lost(self.now_ms()))
                    return
                self._apply(self.session.receive(data, self.now_ms()))
            except (P2PGPUError, trio.BrokenResourceError) as exc:
                # Raised on: the host's handler wrapper (provider) or the
                # consumer's run logs it once, through the peer log.
                log.debug("job stream with %s: %s", self.stream.remote_peer_id, exc)
                self._apply(self.session.connection_lost(self.now_ms()))
                raise

    async def _drive(self, more: Callable[[trio.Nursery], None] | None = None) -> None:
        """Run the job's tasks until the session is over and everything
        queued is sent; the reader is cancelled then."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._writer)
            nursery.start_soon(self._timer)
            if more is not None:
                more(nursery)
            reader_scope = trio.CancelScope()

            async def read() -> None:
                with reader_scope:
                    try:
                        await self._reader()
                    except (P2PGPUError, trio.BrokenResourceError) as exc:
                        if self.failure is None:
                            self.failure = exc
                self._finish()  # a stream that ended before the request ends the job too

            nursery.start_soon(read)
            await self.finished.wait()
            # finished also closed the out channel: the writer ends once drained
            reader_scope.cancel()
        if self.failure is not None:
            raise self.failure


# ====================================================================== provider


_GENERATING = (ProviderState.RUNNING, ProviderState.PAUSED, ProviderState.STOPPING)
"""Session states in which the backend's output still goes to the consumer."""


class _ProviderJob(_Edge):
    def __init__(self, service: ProviderService, stream: FrameStream) -> None:
        super().__init__(stream, service.now_ms)
        self.service = service
        self.session = ProviderSession(service.key, service.network_id, service.config)
        self.resumed = trio.Event()
        self.resumed.set()
        self.stop_scope = trio.CancelScope()
        self.holds_slot = False  # a slot of ours is taken by this job now
        self.accepted = False  # and this stays True once accepted, slot or not
        self.outcome = ""  # why it ended early (rejected, backend failed), for ``on_job``
        self.rejected = False  # we turned it away (a REJECT frame went out)
        self.prompt_tokens: int | None = None  # Ollama's prompt_eval_count, once known
        self._to_keep: KeepVoucher | None = None  # the newest voucher not yet handed to keep_voucher
        self._keeper_idle = trio.Event()  # set while no voucher is being written
        self._keeper_idle.set()

    def _is_done(self) -> bool:
        return self.session.state is ProviderState.DONE

    def _handle(self, action: Any) -> None:
        assert self.nursery is not None
        if isinstance(action, RequestReceived):
            self.nursery.start_soon(self._admit, action.request, action.context)
        elif isinstance(action, Pause):
            if self.resumed.is_set():
                self.resumed = trio.Event()
        elif isinstance(action, Resume):
            self.resumed.set()
        elif isinstance(action, StopGeneration):
            log.info("job %s: stopping generation: %s", self.session.job_id.hex()[:8], action.reason)
            self.stop_scope.cancel()
        elif isinstance(action, KeepVoucher):
            self._to_keep = action
            if self._keeper_idle.is_set():
                self._keeper_idle = trio.Event()
                self.nursery.start_soon(self._keeper)
        elif isinstance(action, Claim):
            self.nursery.start_soon(self._claim, action)

    async def _keeper(self) -> None:
        """Write vouchers to disk one at a time, always the newest one
        (``ProviderSession`` counts its window from the last one written)."""
        keep = self.service.keep_voucher
        assert keep is not None and self.session.request is not None
        try:
            while self._to_keep is not None:
                action, self._to_keep = self._to_keep, None
                try:
                    await keep(self.session.request, action.voucher)
                except Exception:  # noqa: BLE001 - the session stays paused at the window; its timers end it
                    log.exception("job %s: could not keep a voucher", self.session.job_id.hex()[:8])
                    return
                self._apply(self.session.voucher_kept(self.now_ms(), action.amount))
        finally:
            self._keeper_idle.set()

    async def _claim(self, claim: Claim) -> None:
        if await self.service._claim(claim) and self.service.forget_voucher is not None:
            await self._keeper_idle.wait()  # a voucher being written now must not outlive the forgetting
            self.service.forget_voucher(self.session.job_id)

    async def _admit(self, request: JobRequest, context: tuple[bytes, ...] = ()) -> None:
        code, text = await self.service._admission(request, self.stream.remote_peer_id, context)
        if self.session.state is not ProviderState.DECIDING:
            return  # cancelled while we decided
        now = self.now_ms()
        if code is not None:
            # Per consumer and rate-limited: a peer sending request after
            # request we refuse must not flood the log.
            self.service.host.peer_log.note(log, self.stream.remote_peer_id, JOB_PROTOCOL, Trouble.REJECTED,
                                            f"job {request.job_id.hex()[:8]}: rejecting: {text}")
            self.outcome, self.rejected = f"rejected: {text}", True
            self._apply(self.session.reject(now, code, text))
            return
        if self.service.active >= self.service.slots:  # taken while we awaited the ledger
            self.outcome, self.rejected = "rejected: no free slot", True
            self._apply(self.session.reject(now, R_BUSY, "no free slot"))
            return
        self.service._slots_changed(+1)
        self.holds_slot = self.accepted = True
        self.service.live[request.job_id] = self
        self._apply(self.session.accept(now))
        self.service._job_changed(self)
        assert self.nursery is not None
        self.nursery.start_soon(self._generate, request)

    async def _generate(self, request: JobRequest) -> None:
        if request.inputs is not None:
            await self._embed(request, request.inputs)
            return
        try:
            messages = None
            if request.messages is not None:
                messages = tuple(Message(role, content) for role, content in request.messages)
            gen = GenerationRequest(model=request.model, max_tokens=request.max_tokens,
                                    messages=messages, prompt=request.prompt, params=request.params)
        except MalformedInput as exc:  # a request the wire allows but this backend cannot run (a huge max_tokens)
            self._free_slot()
            self.outcome = f"not runnable here: {exc}"
            self._apply(self.session.failed(self.now_ms(), f"not runnable here: {exc}"))
            return
        eval_count = 0
        final: Finished | None = None
        # Tool calls wait for the final chunk. Ollama decodes a call's tokens
        # without streaming them and hands the call over whole, so a chunk
        # count of 1 would leave most of them unpaid; the final chunk's
        # eval_count says how many tokens went unstreamed, and the last call
        # is counted with them (within max_tokens and a frame's count).
        held: list[Chunk] = []
        try:
            with self.stop_scope:
                async with self.service.backend.stream(gen) as events:
                    async for event in events:
                        if isinstance(event, Chunk):
                            if event.tokens < 1 or not event.text:
                                continue
                            if self.session.state not in _GENERATING:
                                return
                            if eval_count + event.tokens > request.max_tokens:
                                # One decoded token can come as two chunks (the end of a
                                # thought and the start of the answer, or text and a tool
                                # call); at the length limit the job is full: drop the
                                # excess, but read on to the final chunk and its counts.
                                log.info("job %s: output past max_tokens dropped", request.job_id.hex()[:8])
                                continue
                            eval_count += event.tokens
                            if event.channel == TOOL_CALL:
                                held.append(event)
                                continue
                            if not await self._send_chunks(held + [event]):
                                return
                            held = []
                        elif isinstance(event, Finished):
                            final = event
                            if held:
                                unstreamed = min(final.eval_count - eval_count, request.max_tokens - eval_count,
                                                 MAX_TOKENS_PER_FRAME - held[-1].tokens)
                                if unstreamed > 0:
                                    held[-1] = replace(held[-1], tokens=held[-1].tokens + unstreamed)
                                    eval_count += unstreamed
                                if not await self._send_chunks(held):
                                    return
                                held = []
        except ExecutionFailed as exc:
            self._backend_failed(request, exc)
            return
        finally:
            self._free_slot()
        if self.session.state not in _GENERATING:
            return
        if final is not None:
            self.prompt_tokens = final.prompt_eval_count
            self._apply(self.session.finished(
                self.now_ms(), final.prompt_eval_count, final.eval_count,
                (final.total_duration_ns, final.load_duration_ns,
                 final.prompt_eval_duration_ns, final.eval_duration_ns)))
        else:  # stopped: Ollama's counts are lost with the stream; input is not charged
            self._apply(self.session.finished(self.now_ms(), 0, eval_count))

    def _backend_failed(self, request: JobRequest, exc: ExecutionFailed) -> None:
        """The backend failed this job (generation or embedding): say so,
        tell the service (a failing Ollama is suspect), end the session."""
        log.info("job %s: backend failed: %s", request.job_id.hex()[:8], exc)
        self.outcome = f"backend failed: {exc}"
        self.service.backend_failed(exc)
        if self.session.state in _GENERATING:
            self._apply(self.session.failed(self.now_ms(), str(exc)))

    async def _send_chunks(self, chunks: list[Chunk]) -> bool:
        """Hand ``chunks`` to the session in order, waiting while it is
        paused; False once the job is no longer generating."""
        for chunk in chunks:
            if self.session.state not in _GENERATING:
                return False
            self._apply(self.session.tokens(self.now_ms(), chunk.text, chunk.tokens, chunk.channel))
            await self.resumed.wait()  # paused: stop reading until Resume
        return True

    async def _embed(self, request: JobRequest, inputs: tuple[str, ...]) -> None:
        """An embed job: one backend call, then one ``EMBEDDING`` frame per
        vector, in the inputs' order (count 1 each, so the credit window
        and the vouchers work as for tokens), then the receipt with
        Ollama's input count. A stop before the answer abandons the call."""
        result: EmbedResult | None = None
        try:
            with self.stop_scope:
                result = await self.service.backend.embed(
                    request.model, list(inputs), truncate=request.params.truncate,
                    dimensions=request.params.dimensions)
                if not await self._send_chunks([Chunk(_vector_text(v), 1, EMBEDDING) for v in result.vectors]):
                    return
        except ExecutionFailed as exc:
            self._backend_failed(request, exc)
            return
        finally:
            self._free_slot()
        if self.session.state not in _GENERATING:
            return
        if result is None:  # stopped before Ollama answered: nothing was read, nothing is charged
            self._apply(self.session.finished(self.now_ms(), 0, 0))
            return
        self.prompt_tokens = result.prompt_eval_count
        self._apply(self.session.finished(self.now_ms(), result.prompt_eval_count, len(result.vectors),
                                          (result.total_duration_ns, result.load_duration_ns, 0, 0)))

    def _free_slot(self) -> None:
        """The GPU is done with this job: let the next one in. Called as
        generation ends, before the receipt is queued, so a consumer that
        starts its next job the moment it holds the receipt finds the slot
        free; the voucher exchange that follows needs no GPU."""
        if self.holds_slot:
            self.holds_slot = False
            self.service._slots_changed(-1)

    async def run(self) -> None:
        self._apply(self.session.open(self.now_ms()))  # the request is due within request_wait_ms
        try:
            await self._drive()
        finally:
            self.stop_scope.cancel()
            self._free_slot()
            self.service.job_ended(self.session)


class ProviderService:
    """Serve jobs on ``JOB_PROTOCOL`` (call ``start()``; ``close()`` stops).

    ``models``: the served model names; None asks ``backend.models()`` for
    every request. ``slots``: jobs at once (what the offer advertises).
    ``on_backend_failure``: called when a job could not run on the backend
    (Ollama unreachable, failed mid-stream) but not for a job's own problem
    (an unknown model, a busy Ollama), so the node can re-check Ollama at
    once and stop advertising instead of waiting for its next heartbeat.
    ``on_slots_changed``: called after a job takes or frees a slot, so the
    node can tell the network its free slots without waiting either.
    ``on_job``: called with the job (a ``_ProviderJob``: its ``session``,
    ``outcome``, ``prompt_tokens``) when it is accepted and when it ends,
    for the node's job store. ``cancel(job_id)`` stops a running job.
    ``keep_voucher(request, voucher)``: make a job's newest voucher durable
    (returns once it is); given, the sessions count their credit window
    from the vouchers kept (``SessionConfig.durable_vouchers``), so a crash
    costs at most a window's pay. ``forget_voucher(job_id)``: its hold is
    claimed, the kept voucher may go.
    """

    def __init__(self, host: P2PHost, replicator: LedgerReplicator, ledger: Ledger, key: NodeKey, backend: Backend,
                 *, prices: Prices, slots: int, now_ms: NowMs = wall_ms, models: Iterable[str] | None = None,
                 config: SessionConfig = SessionConfig(),
                 on_backend_failure: Callable[[ExecutionFailed], None] | None = None,
                 on_slots_changed: Callable[[], None] | None = None,
                 on_job: Callable[[Any], None] | None = None,
                 keep_voucher: Callable[[JobRequest, Any], Awaitable[None]] | None = None,
                 forget_voucher: Callable[[bytes], None] | None = None,
                 max_credit_window: int = DEFAULT_MAX_CREDIT_WINDOW, debtors: Debtors | None = None) -> None:
        """``max_credit_window``: the most tokens we stream ahead of a
        consumer's vouchers (a request asking for more is refused);
        ``debtors``: consumers that left tokens unpaid here, refused from
        then on (``p2pgpu.core.trust``)."""
        self.host, self.replicator, self.ledger, self.key = host, replicator, ledger, key
        self.max_credit_window = max_credit_window
        self.debtors = Debtors() if debtors is None else debtors
        self.on_job = on_job
        self.keep_voucher = keep_voucher
        self.forget_voucher = forget_voucher
        self.live: dict[bytes, _ProviderJob] = {}  # accepted jobs not yet over, by job id
        self.on_backend_failure = on_backend_failure
        self.on_slots_changed = on_slots_changed
        self.backend = backend
        self.prices = prices
        self.slots = slots
        self.now_ms = now_ms
        self.models = None if models is None else {normalize_model_name(m) for m in models}
        self.config = replace(config, durable_vouchers=keep_voucher is not None)
        self.network_id = ledger.network_id
        self.active = 0
        self.claims: list[bytes] = []  # ids of CLAIM entries made
        self.jobs_served = 0

    def start(self) -> None:
        self.host.set_stream_handler(JOB_PROTOCOL, self._serve)

    def backend_failed(self, exc: ExecutionFailed) -> None:
        # A job's own problem (a model we lack, a full queue, a request Ollama
        # refused as the consumer made it) says nothing about the backend.
        if self.on_backend_failure is not None and not isinstance(exc, (ModelNotFound, Busy, Refused)):
            self.on_backend_failure(exc)

    def _slots_changed(self, delta: int) -> None:
        self.active += delta
        if self.on_slots_changed is not None:
            self.on_slots_changed()

    def close(self) -> None:
        self.host.remove_stream_handler(JOB_PROTOCOL)

    def cancel(self, job_id: bytes, reason: str = "cancelled by the provider") -> bool:
        """Stop a running job (the consumer pays for what it was sent);
        False if no job with that id is generating now."""
        job = self.live.get(job_id)
        if job is None or job.session.state not in (ProviderState.RUNNING, ProviderState.PAUSED):
            return False
        job._apply(job.session.cancel(job.now_ms(), reason))
        return True

    def _job_changed(self, job: _ProviderJob) -> None:
        if self.on_job is not None:
            try:
                self.on_job(job)
            except Exception:  # noqa: BLE001 - bookkeeping must not break a job
                log.exception("on_job callback failed")

    def job_ended(self, session: ProviderSession) -> None:
        """A job of ours is over: a consumer that left tokens unpaid (it
        stopped paying, or vanished mid-stream) is remembered and refused
        from now on, so it costs us one credit window at most, once."""
        unpaid = session.unpaid_tokens
        if unpaid > 0 and session.request is not None:
            self.debtors.record(session.request.consumer, unpaid)
            log.info("job %s: consumer %s left %d token(s) unpaid; its requests are refused from now on",
                     session.job_id.hex()[:8], peer_id_from_public_key(session.request.consumer)[:20], unpaid)

    async def _serve(self, stream: FrameStream) -> None:
        job = _ProviderJob(self, stream)
        try:
            await job.run()
        finally:
            self.jobs_served += 1
            if self.live.get(job.session.job_id) is job:
                del self.live[job.session.job_id]
            self._job_changed(job)

    async def _served_models(self) -> set[str]:
        if self.models is not None:
            return self.models
        return {normalize_model_name(m.name) for m in await self.backend.models()}

    async def _admission(self, request: JobRequest, consumer_peer: str,
                         context: tuple[bytes, ...] = ()) -> tuple[int | None, str]:
        """(None, "") to accept, else (reason code, text). ``context``: the
        consumer's entries before the hold, offered first (see ``run_job``)."""
        try:
            served = await self._served_models()
        except ExecutionFailed as exc:
            self.backend_failed(exc)
            return R_OTHER, f"backend unavailable: {exc}"[:200]
        refusal = admission_refusal(request, served_models=served, prices=self.prices, active=self.active,
                                    slots=self.slots, max_credit_window=self.max_credit_window,
                                    debt=self.debtors.refusal(request.consumer))
        if refusal is not None:
            return refusal
        results = await self.replicator.offer([*context, request.hold.wire], durable=False)
        result = results[-1]
        if isinstance(result, ApplyResult) and result.status == "waiting" and result.missing is not None:
            result = await self._fetch_consumer_chain(request, result, consumer_peer)
        if not isinstance(result, ApplyResult) or result.status not in ("applied", "duplicate"):
            return R_HOLD, f"hold not valid on our ledger: {getattr(result, 'status', result)}"[:200]
        if self.ledger.hold_status(request.hold_id) is not None or self.ledger.releases_of(request.hold_id):
            return R_HOLD, "hold already settled"
        return None, ""

    async def _fetch_consumer_chain(self, request: JobRequest, waiting: ApplyResult, consumer_peer: str) -> ApplyResult:
        """The hold follows entries of the consumer's that have not reached
        us yet (its last job's release, still on its way by gossip): fetch
        them from the consumer, which holds its whole chain. The hold then
        applies from where it was parked."""
        with trio.move_on_after(HOLD_CHAIN_FETCH_S):
            try:
                await self.replicator.fetch_from(consumer_peer, [waiting.missing], follow_up=True)  # type: ignore[list-item]
            except P2PGPUError as exc:
                self.host.peer_log.failed(log, consumer_peer, LEDGER_SYNC_PROTOCOL, exc,
                                          what=f"job {request.job_id.hex()[:8]}: fetching the consumer's chain")
        if self.ledger.has_entry(request.hold_id):
            return ApplyResult("applied", request.hold_id)
        return waiting

    async def _claim(self, claim: Claim) -> bool:
        try:
            entries = await self.replicator.append(
                lambda ledger: ledger.claim(self.key, claim.hold_id, claim.voucher, self.now_ms()))
        except P2PGPUError as exc:
            log.warning("claim of hold %s for %s coins failed: %s", claim.hold_id.hex()[:8], format_coins(claim.amount), exc)
            return False
        self.claims.extend(e.id for e in entries)
        log.info("claimed %s coins from hold %s", format_coins(claim.amount), claim.hold_id.hex()[:8])
        return True


# ====================================================================== consumer


class JobEnd(enum.StrEnum):
    """How one job ended for the consumer (equal to the strings the API and
    older callers compare with)."""

    COMPLETED = "completed"
    REJECTED = "rejected"  # turned away before it ran (busy, price, model, hold)
    FAILED = "failed"  # cut short: provider failure, lost connection, cancel, timeout


@dataclass
class JobResult:
    """How one job ended, from the consumer's side.

    ``status``: a ``JobEnd``. ``cost``: the last
    voucher (what the provider may claim); once the hold is released, what
    the ledger paid the provider from it (less, if it crashed before it
    kept our last voucher). ``release``: what the holds owner made of the
    hold as the job ended (``ReleaseState``): RELEASED (the unclaimed part
    is back) or PENDING (the provider's claim not seen yet, or no waiver:
    released later against the claim or after expiry). ``code``: the
    provider's reason code when it rejected or failed the job (``R_BUSY``:
    it was full).
    """

    status: JobEnd
    reason: str
    text: str  # the content delivered (thinking, tool calls and vectors went to ``on_tokens`` only)
    tokens: int  # output tokens delivered, every channel
    cost: int
    receipt: Receipt | None
    provider: str
    job_id: bytes
    hold_id: bytes
    hold_amount: int
    release: ReleaseState
    retryable: bool
    ttft_s: float | None
    tokens_per_s: float | None
    chunks: list[str] = field(default_factory=list)
    code: int | None = None


class _ConsumerJob(_Edge):
    def __init__(self, session: ConsumerSession, stream: FrameStream, now_ms: NowMs,
                 on_tokens: OnTokens | None, peer_log: PeerLog | None = None) -> None:
        super().__init__(stream, now_ms)
        self.peer_log = peer_log
        self.session = session
        self.on_tokens = on_tokens
        self.chunks: list[str] = []
        self.tokens = 0
        self.release: ReleaseHold | None = None
        self.outcome: Completed | Failed | None = None
        self.started = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self._cancel_watch: trio.CancelScope | None = None

    def _is_done(self) -> bool:
        return self.session.state is ConsumerState.DONE

    def _handle(self, action: Any) -> None:
        if isinstance(action, Deliver):
            now = time.monotonic()
            if self.first_token is None:
                self.first_token = now
            self.last_token = now
            if action.channel == CONTENT:
                self.chunks.append(action.text)
            self.tokens += action.count
            if self.on_tokens is not None:
                try:
                    self.on_tokens(action.text, action.count, action.channel)
                except Exception:  # the user's callback must not break the job
                    log.exception("on_tokens callback failed")
        elif isinstance(action, ReleaseHold):
            self.release = action
        elif isinstance(action, (Completed, Failed)):
            self.outcome = action

    async def _watch_cancel(self, cancel: trio.Event) -> None:
        with trio.CancelScope() as scope:
            self._cancel_watch = scope
            if self.finished.is_set():
                return
            await cancel.wait()
            if self.session.state in (ConsumerState.REQUESTED, ConsumerState.ACCEPTED, ConsumerState.STREAMING):
                self._apply(self.session.cancel(self.now_ms()))

    def _finish(self) -> None:
        super()._finish()
        if self._cancel_watch is not None:
            self._cancel_watch.cancel()

    async def run(self, cancel: trio.Event | None = None) -> None:
        self._apply(self.session.start(self.now_ms()))
        try:
            await self._drive(None if cancel is None else lambda n: n.start_soon(self._watch_cancel, cancel))
        except (P2PGPUError, trio.BrokenResourceError) as exc:
            if self.peer_log is None:
                log.info("job %s: stream ended badly: %s", self.session.job_id.hex()[:8], exc)
            else:  # the provider's doing: one line per provider and kind, not one per job
                self.peer_log.failed(log, self.stream.remote_peer_id, JOB_PROTOCOL, exc,
                                     what=f"job {self.session.job_id.hex()[:8]}: stream ended badly")
            with trio.CancelScope(shield=True):
                await self.stream.reset()
        else:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                await self.stream.close()


async def run_job(
    host: P2PHost,
    replicator: LedgerReplicator,
    ledger: Ledger,
    key: NodeKey,
    provider_peer_id: str,
    offer_prices: Prices,
    *,
    model: str,
    prompt: str | None = None,
    messages: Iterable[tuple[str, str]] | None = None,
    max_tokens: int,
    now_ms: NowMs = wall_ms,
    on_tokens: OnTokens | None = None,
    max_prompt_tokens: int | None = None,
    credit_window: int = DEFAULT_CREDIT_WINDOW,
    hold_ms: int = DEFAULT_HOLD_MS,
    config: SessionConfig = SessionConfig(),
    release_wait_s: float = 10.0,
    cancel: trio.Event | None = None,
    job_id: bytes | None = None,
    streams: JobStreamPool | None = None,
    settle: SettleHold | None = None,
    params: JobParams = JobParams(),
    inputs: Iterable[str] | None = None,
) -> JobResult:
    """Run one job on ``provider_peer_id`` at ``offer_prices``; see ``JobResult``.

    The job is ``prompt``, ``messages`` or (embed) ``inputs``, with
    ``params`` (``make_request``). ``on_tokens(text, count, channel)`` is
    called for every TOKENS frame delivered, whatever its channel; the
    result's ``text`` is the content alone.

    Opens the stream first (so an unreachable provider costs no hold), then
    HOLDs ``job_cost(prices, max_prompt_tokens, max_tokens)``. After the end,
    reports what it got (the provider's waiver, our last voucher) to
    ``settle`` (the node's ``Holds.job_ended``), which releases the
    unclaimed part when the rule allows (at once with a waiver, else once
    the provider's CLAIM shows up) and says whether it did. Without
    ``settle``, a holds owner of its own does the same for this one hold,
    looking for the provider's claim for up to ``release_wait_s``.
    Setting ``cancel`` cancels the job: the provider stops and sends a
    receipt for what it sent, and we pay exactly that (status "failed").
    Raises ``P2PGPUError`` only before the hold exists (unreachable provider,
    insufficient funds, bad arguments).

    ``job_id``: 16 bytes naming the job (default: random); the node passes
    one id for all attempts of a submission, so both sides' job stores
    know the job by the same id.

    ``streams``: take a stream opened ahead of need from this pool when it
    has one for the provider, and have it open the next one once this job
    has completed (see ``JobStreamPool``).
    """
    msgs = None if messages is None else tuple((role, content) for role, content in messages)
    texts = None if inputs is None else tuple(inputs)
    # The request's own checks before anything is held: a job that cannot be
    # signed must not leave a hold behind it (MalformedInput).
    kind = "embed" if texts is not None else "chat" if msgs is not None else "generate"
    check_job_params(kind, params, len(msgs or ()))
    encode_body(kind, prompt, msgs, params, texts)
    if texts is not None and max_tokens != len(texts):
        raise MalformedInput(f"an embed job's max_tokens is its number of inputs ({len(texts)})")
    if max_prompt_tokens is None:
        max_prompt_tokens = prompt_token_bound(prompt, msgs, params=params, inputs=texts)
    provider_key = public_key_from_peer_id(provider_peer_id)
    network_id = ledger.network_id
    job_id = secrets.token_bytes(16) if job_id is None else job_id
    amount = max(1, job_cost(offer_prices, max_prompt_tokens, max_tokens))
    hold_ms = min(hold_ms, ledger.params.max_hold_ms)

    stream = streams.take(provider_peer_id) if streams is not None else None
    if stream is None:
        stream = await host.open_stream(provider_peer_id, JOB_PROTOCOL)
    try:
        now = now_ms()
        hold = (await replicator.append(
            lambda lg: lg.hold(key, provider_key, amount, now + hold_ms, job_id, now)))[0]
        signed, body = make_request(
            key, network_id, now, job_id=job_id, model=model, hold=hold, prices=offer_prices,
            max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, credit_window=credit_window,
            prompt=prompt, messages=msgs, params=params, inputs=texts)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.reset()
        raise
    session = ConsumerSession(key, network_id, signed, body, config,
                              context=_chain_context(ledger, key.public_key, hold, now))
    job = _ConsumerJob(session, stream, now_ms, on_tokens, host.peer_log)
    await job.run(cancel)

    outcome = job.outcome
    assert outcome is not None and job.release is not None
    if settle is None:
        settle = partial(Holds(ledger, replicator, key, now_ms=now_ms).job_ended, await_claim_s=release_wait_s)
    ended = OpenHold(hold.id, provider_key, amount, hold.body.expiry_ms, job_id=job_id,  # type: ignore[union-attr]
                     waiver=job.release.waiver, paid=job.release.paid)
    release = await settle(ended)
    cost = session.paid
    settled = ledger.hold_status(hold.id) if release is ReleaseState.RELEASED else None
    if settled is not None:
        cost = settled[0]
    code = None
    if isinstance(outcome, Completed):
        status, reason, receipt, retryable = JobEnd.COMPLETED, "", outcome.receipt, False
        if streams is not None:
            streams.refill(provider_peer_id)
    else:
        status = JobEnd.REJECTED if outcome.rejected else JobEnd.FAILED
        reason, receipt, retryable, code = outcome.reason, outcome.receipt, outcome.retryable, outcome.code
    ttft = None if job.first_token is None else job.first_token - job.started
    tps = None
    if job.first_token is not None and job.last_token is not None and job.tokens > 1 \
            and job.last_token > job.first_token:
        tps = (job.tokens - 1) / (job.last_token - job.first_token)
    return JobResult(
        status=status, reason=reason, text="".join(job.chunks), tokens=job.tokens, cost=cost,
        receipt=receipt, provider=provider_peer_id, job_id=job_id, hold_id=hold.id, hold_amount=amount,
        release=release, retryable=retryable, ttft_s=ttft, tokens_per_s=tps, chunks=job.chunks, code=code,
    )


def _chain_context(ledger: Ledger, author: bytes, hold: Any, now: int) -> tuple[bytes, ...]:
    """Our entries just before the hold that the provider may not have yet.

    The provider must apply the hold, and a hold follows our previous
    entries (the last job's release, say), which gossip announces after a
    moment's linger. Sending the recent ones along with the request lets
    the provider apply the hold at once instead of fetching them from us
    (it offers them first; those it holds cost it a lookup)."""
    recent = ledger.history(author, last=MAX_REQUEST_CONTEXT + 1)
    fresh_after = now - REQUEST_CONTEXT_WINDOW_MS
    return tuple(e.wire for e in recent if e.id != hold.id and e.timestamp_ms >= fresh_after)[-MAX_REQUEST_CONTEXT:]


class JobStreamPool:
    """Job streams opened ahead of need: at most one idle stream per provider.

    Opening a stream costs a round trip of multistream-select before the
    request can go, a good part of what a job adds to its first token on
    loopback. So after a job with a provider completes, the consumer opens
    the next stream to it in the background (``refill``), and its next job
    there sends the request at once (``take``). The provider waits
    ``SessionConfig.request_wait_ms`` for a request on a fresh stream; a
    stream is taken only while it looks open (``FrameStream.looks_open``)
    and is younger than ``max_age_s``, well inside that. Anything else is
    reset and the job opens a stream as before. A stream that looked open
    but whose provider died at that moment fails like any provider dying
    mid-job. At most ``max_providers`` idle streams, oldest dropped first.
    """

    def __init__(self, host: P2PHost, nursery: trio.Nursery, *, max_age_s: float = 30.0,
                 max_providers: int = 16) -> None:
        self.host, self.nursery = host, nursery
        self.max_age_s, self.max_providers = max_age_s, max_providers
        self._idle: dict[str, tuple[FrameStream, float]] = {}  # provider peer id -> (stream, opened at)
        self._opening: set[str] = set()
        self.taken = self.opened = 0

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, peer_id: str) -> FrameStream | None:
        item = self._idle.pop(peer_id, None)
        if item is None:
            return None
        stream, opened_at = item
        if trio.current_time() - opened_at <= self.max_age_s and stream.looks_open():
            self.taken += 1
            return stream
        self._discard(stream)
        return None

    def refill(self, peer_id: str) -> None:
        if peer_id in self._idle or peer_id in self._opening:
            return
        while self._idle and len(self._idle) + len(self._opening) >= self.max_providers:
            oldest = min(self._idle, key=lambda p: self._idle[p][1])
            self._discard(self._idle.pop(oldest)[0])
        if len(self._opening) >= self.max_providers:
            return
        self._opening.add(peer_id)
        self.nursery.start_soon(self._open, peer_id)

    async def _open(self, peer_id: str) -> None:
        try:
            stream = await self.host.open_stream(peer_id, JOB_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - a task of the node's nursery must not raise
            log.debug("opening a job stream ahead to %s failed: %s", peer_id, exc)
            return
        finally:
            self._opening.discard(peer_id)
        self.opened += 1
        old = self._idle.pop(peer_id, None)
        if old is not None:
            self._discard(old[0])
        self._idle[peer_id] = (stream, trio.current_time())

    def _discard(self, stream: FrameStream) -> None:
        self.nursery.start_soon(self._reset, stream)

    @staticmethod
    async def _reset(stream: FrameStream) -> None:
        with trio.move_on_after(5):
            try:
                await stream.reset()
            except Exception:  # noqa: BLE001 - it is going away either way
                pass


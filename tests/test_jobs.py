"""Job sessions (p2pgpu.core.jobs): two pure state machines joined in memory.

``Net`` is the fake link (h11's / aioquic's habit): it moves ``Send`` actions
from one session to the other with a fake clock, optionally dropping or
delaying frames (a stream keeps order, so a delayed frame delays those
behind it), and plays a tiny executor on the provider side that produces one
token every ``TOKEN_MS`` while not paused. A frame the receiver refuses
closes the stream, as the real edge does: both sides get ``connection_lost``.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pgpu.core import jobs
from p2pgpu.core.codec import decode_signed, pack
from p2pgpu.core.jobs import (
    CANCELLED,
    DONE,
    Claim,
    Completed,
    ConsumerSession,
    ConsumerState,
    Deliver,
    Failed,
    KeepVoucher,
    LocalProtocolError,
    Pause,
    Prices,
    ProtocolViolation,
    ProviderSession,
    ProviderState,
    ReleaseHold,
    RequestReceived,
    Resume,
    Send,
    SessionConfig,
    StopGeneration,
    covered_tokens,
    decode_frame,
    decode_receipt,
    decode_request,
    encode_frame,
    job_cost,
    make_receipt,
    make_request,
    output_hash,
)
from p2pgpu.core.kv import MemoryStore
from p2pgpu.core.ledger import BASIS_CLAIM, BASIS_WAIVER, Ledger, make_voucher, make_waiver
from p2pgpu.errors import (
    BadSignature,
    LedgerRuleViolation,
    MalformedInput,
    Oversized,
    P2PGPUError,
    Truncated,
    WrongNetwork,
)
from p2pgpu.testing.ledger import START_MS, key_for, make_genesis

alice, bob, carol = key_for("alice"), key_for("bob"), key_for("carol")  # consumer, provider, stranger
GENESIS = make_genesis(allocation=10**9)
NET_ID = GENESIS.network_id
PRICES = Prices(price_in=1_000_000, price_out=2_500_000)  # 1 and 2.5 base units per token
MAX_PROMPT, MAX_TOKENS, WINDOW = 20, 50, 8
PROMPT_TOKENS = 7  # what the fake Ollama reports as prompt_eval_count
TOKEN_MS = 10
CONFIG = SessionConfig(first_token_ms=30_000, stall_ms=5_000, receipt_ms=5_000, pause_grace_ms=2_000, settle_ms=2_000)
JOB_ID = bytes(range(16))


def make_job(ledger: Ledger | None = None, *, prices=PRICES, window=WINDOW, max_tokens=MAX_TOKENS,
             hold_amount=None, provider=bob, job_id=JOB_ID, expiry=START_MS + 600_000):
    ledger = ledger or Ledger(MemoryStore(), GENESIS)
    amount = hold_amount or job_cost(prices, MAX_PROMPT, max_tokens)
    hold = ledger.hold(alice, provider.public_key, amount, expiry, job_id, START_MS)
    signed, body = make_request(
        alice, NET_ID, START_MS, job_id=job_id, model="llama3.2", hold=hold, prices=prices,
        max_prompt_tokens=MAX_PROMPT, max_tokens=max_tokens, credit_window=window, prompt="why is the sky blue?",
    )
    return ledger, hold, signed, body


class Net:
    """Consumer alice and provider bob joined by an in-memory stream."""

    def __init__(self, *, tokens=20, drop=None, delay=None, decide="accept", prices=PRICES, window=WINDOW,
                 config=CONFIG, keep_ms=None):
        self.ledger, self.hold, signed, body = make_job(prices=prices, window=window)
        self.now = START_MS
        self.c = ConsumerSession(alice, NET_ID, signed, body, config)
        self.p = ProviderSession(bob, NET_ID, config)
        self.queues = {"c2p": [], "p2c": []}  # (due_ms, bytes), in stream order
        self.counts = {"c2p": 0, "p2c": 0}
        self.drop = drop or (lambda direction, index, frame: False)
        self.delay = delay or (lambda direction, index, frame: 0)
        self.decide = decide
        self.to_produce = tokens
        self.produced = 0
        self.produced_text = ""
        self.paused = self.stopped = self.running = self.finished = False
        self.next_token_ms = None
        self.broken = False
        self.c_actions: list = []
        self.p_actions: list = []
        self.frames: dict[str, list] = {"c2p": [], "p2c": []}  # decoded frames actually delivered
        self.keep_ms = keep_ms  # durable_vouchers: a KeepVoucher is written this long after (None: never)
        self.keeps: list[tuple[int, int]] = []  # (due, amount)
        self.most_unkept = 0  # the most tokens ever sent past what the kept vouchers cover

    # --- moving actions
    def _send(self, direction: str, data: bytes) -> None:
        index = self.counts[direction]
        self.counts[direction] += 1
        frame = decode_frame(data)
        if self.broken or self.drop(direction, index, frame):
            return
        queue = self.queues[direction]
        due = self.now + self.delay(direction, index, frame)
        if queue:
            due = max(due, queue[-1][0])  # a stream never reorders
        queue.append((due, data))

    def on_consumer(self, actions) -> None:
        for action in actions:
            self.c_actions.append(action)
            if isinstance(action, Send):
                self._send("c2p", action.data)

    def on_provider(self, actions) -> None:
        for action in actions:
            self.p_actions.append(action)
            if isinstance(action, Send):
                self._send("p2c", action.data)
            elif isinstance(action, RequestReceived):
                if self.decide == "accept":
                    self.on_provider(self.p.accept(self.now))
                    self.running = True
                    self.next_token_ms = self.now + TOKEN_MS
                elif self.decide == "reject":
                    self.on_provider(self.p.reject(self.now, jobs.R_BUSY, "no free slot"))
            elif isinstance(action, Pause):
                self.paused = True
            elif isinstance(action, Resume):
                self.paused = False
                self.next_token_ms = self.now + TOKEN_MS
            elif isinstance(action, StopGeneration):
                self.stopped = True
            elif isinstance(action, KeepVoucher) and self.keep_ms is not None:
                self.keeps.append((self.now + self.keep_ms, action.amount))
        if self.p.request is not None:
            unkept = self.p.sent - covered_tokens(self.p.request.prices, self.p.kept)
            self.most_unkept = max(self.most_unkept, unkept)

    def break_link(self) -> None:
        self.broken = True
        self.queues = {"c2p": [], "p2c": []}
        self.on_consumer(self.c.connection_lost(self.now))
        self.on_provider(self.p.connection_lost(self.now))

    # --- the loop
    def start(self) -> "Net":
        self.on_consumer(self.c.start(self.now))
        return self

    def step(self) -> bool:
        """Do everything due now; return False when nothing is left to do."""
        for direction, receiver, handle in (("c2p", self.p, self.on_provider), ("p2c", self.c, self.on_consumer)):
            queue = self.queues[direction]
            while queue and queue[0][0] <= self.now and not self.broken:
                _, data = queue.pop(0)
                try:
                    actions = receiver.receive(data, self.now)
                except P2PGPUError:
                    self.break_link()
                    break
                self.frames[direction].append(decode_frame(data))  # only frames the receiver took
                handle(actions)
        while self.keeps and self.keeps[0][0] <= self.now:
            _, amount = self.keeps.pop(0)
            self.on_provider(self.p.voucher_kept(self.now, amount))
        for session, handle in ((self.c, self.on_consumer), (self.p, self.on_provider)):
            deadline = session.next_deadline()
            if deadline is not None and deadline <= self.now:
                handle(session.on_timer(self.now))
        self._executor()
        times = [q[0][0] for q in self.queues.values() if q]
        times += [d for d in (self.c.next_deadline(), self.p.next_deadline()) if d is not None]
        times += [due for due, _ in self.keeps[:1]]
        if self.p.state is ProviderState.DONE:
            self.running = False  # the session is over; so is the executor
        if self.running and not self.finished and not (self.paused and not self.stopped):
            times.append(self.next_token_ms if not self.stopped else self.now)
        if not times:
            return False
        self.now = max(self.now + 1, min(times)) if min(times) <= self.now else min(times)
        return True

    def _executor(self) -> None:
        if not self.running or self.finished or self.p.state in (ProviderState.DONE,):
            return
        if self.stopped or self.produced == self.to_produce:
            self.finished = True
            self.on_provider(self.p.finished(self.now, PROMPT_TOKENS, self.produced, (5, 1, 2, 2)))
            return
        if not self.paused and self.now >= self.next_token_ms:
            text = f"tok{self.produced} "
            self.produced += 1
            self.produced_text += text
            self.on_provider(self.p.tokens(self.now, text, 1))
            self.next_token_ms = self.now + TOKEN_MS

    def run(self, until_ms: int = START_MS + 200_000) -> "Net":
        while self.now < until_ms and self.step():
            pass
        return self

    # --- what happened
    def outcome(self):
        ends = [a for a in self.c_actions if isinstance(a, (Completed, Failed))]
        assert len(ends) <= 1
        return ends[0] if ends else None

    def delivered_text(self) -> str:
        return "".join(a.text for a in self.c_actions if isinstance(a, Deliver))

    def vouchers(self):
        return [decode_signed(f.args[0], network_id=NET_ID) for f in self.frames["c2p"] if f.type == jobs.VOUCHER]

    def sent_vouchers(self):
        return [decode_signed(decode_frame(a.data).args[0], network_id=NET_ID)
                for a in self.c_actions if isinstance(a, Send) and decode_frame(a.data).type == jobs.VOUCHER]

    def claims(self):
        return [a for a in self.p_actions if isinstance(a, Claim)]


# ------------------------------------------------------------------ pricing


def test_job_cost_rounds_up_once_over_the_sum():
    assert job_cost(PRICES, 0, 0) == 0
    assert job_cost(PRICES, 0, 1) == 3  # 2.5 -> 3
    assert job_cost(PRICES, 1, 1) == 4  # 3.5 -> 4, not 1 + 3
    assert job_cost(Prices(1, 1), 1, 1) == 1
    with pytest.raises(MalformedInput):
        job_cost(PRICES, -1, 0)


@given(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(0, 10**6), st.integers(0, 10**6))
def test_job_cost_is_monotonic_and_coverage_is_its_inverse(pin, pout, n_in, n_out):
    prices = Prices(pin, pout)
    cost = job_cost(prices, n_in, n_out)
    assert job_cost(prices, n_in + 1, n_out) >= cost <= job_cost(prices, n_in, n_out + 1)
    assert cost * 10**6 >= pin * n_in + pout * n_out > (cost - 1) * 10**6 or cost == 0
    amount = job_cost(prices, 0, n_out)
    covered = covered_tokens(prices, amount)
    assert covered >= n_out
    if pout:
        assert job_cost(prices, 0, covered) <= amount < job_cost(prices, 0, covered + 1)


# ------------------------------------------------------------------ happy path


def test_happy_path_pays_exactly_the_receipt_and_the_ledger_accepts_the_claim():
    net = Net(tokens=20).start().run()
    outcome = net.outcome()
    assert isinstance(outcome, Completed), outcome
    receipt = outcome.receipt
    assert net.delivered_text() == net.produced_text
    assert receipt.output_tokens == receipt.eval_count == 20 == net.c.received
    assert receipt.status == DONE and receipt.prompt_eval_count == PROMPT_TOKENS
    assert receipt.output_hash == output_hash(net.produced_text)
    assert receipt.durations_ns == (5, 1, 2, 2)
    assert receipt.cost == job_cost(PRICES, PROMPT_TOKENS, 20) == outcome.paid
    vouchers = net.vouchers()
    assert [v.fields[1] for v in vouchers] == sorted({v.fields[1] for v in vouchers})  # cumulative, increasing
    final = vouchers[-1]
    final.verify()
    assert final.signer == alice.public_key and final.fields == (net.hold.id, receipt.cost)
    (claim,) = net.claims()
    assert claim.voucher.wire == final.wire and claim.amount == receipt.cost and claim.hold_id == net.hold.id
    assert net.p.state is ProviderState.DONE and net.c.state is ConsumerState.DONE
    assert not any(isinstance(a, Pause) for a in net.p_actions)  # an honest consumer keeps up
    (release,) = [a for a in net.c_actions if isinstance(a, ReleaseHold)]
    assert release == ReleaseHold(net.hold.id, None, receipt.cost)
    # The provider's CLAIM and the consumer's RELEASE settle the hold exactly.
    claim_entry = net.ledger.claim(bob, net.hold.id, claim.voucher, net.now)
    before = net.ledger.account(alice.public_key).balance
    net.ledger.release(alice, net.hold.id, BASIS_CLAIM, claim_entry.id, net.now)
    assert net.ledger.account(alice.public_key).balance == before + net.hold.body.amount - receipt.cost
    assert net.ledger.account(bob.public_key).balance == 10**9 + receipt.cost


def test_zero_output_tokens_completes_with_a_voucher_for_the_prompt():
    net = Net(tokens=0).start().run()
    outcome = net.outcome()
    assert isinstance(outcome, Completed) and outcome.receipt.output_tokens == 0
    assert outcome.paid == job_cost(PRICES, PROMPT_TOKENS, 0) == net.claims()[0].amount


def test_free_output_needs_no_streaming_voucher():
    net = Net(tokens=30, prices=Prices(1_000_000, 0)).start().run()
    outcome = net.outcome()
    assert isinstance(outcome, Completed) and outcome.paid == PROMPT_TOKENS
    assert len(net.vouchers()) == 1 and not any(isinstance(a, Pause) for a in net.p_actions)


# ------------------------------------------------------------------ reject, loss, delay


def test_reject_comes_with_a_waiver_the_ledger_accepts():
    net = Net(decide="reject").start().run()
    outcome = net.outcome()
    assert isinstance(outcome, Failed) and outcome.retryable and "busy" in outcome.reason and outcome.code == jobs.R_BUSY
    (release,) = [a for a in net.c_actions if isinstance(a, ReleaseHold)]
    assert release.waiver is not None and release.paid == 0
    net.ledger.release(alice, net.hold.id, BASIS_WAIVER, release.waiver, net.now + 1)
    assert net.ledger.account(alice.public_key).balance == 10**9
    assert net.p.state is ProviderState.DONE and not net.claims()


def test_lost_request_fires_the_first_token_deadline():
    net = Net(drop=lambda d, i, f: d == "c2p" and f.type == jobs.REQUEST).start().run()
    outcome = net.outcome()
    assert isinstance(outcome, Failed) and outcome.retryable and "first token" in outcome.reason
    assert START_MS + CONFIG.first_token_ms <= net.now <= START_MS + CONFIG.first_token_ms + 1


def test_stream_that_goes_silent_fires_the_stall_deadline():
    # everything from the provider after its 6th frame (accept + 5 tokens) is lost
    net = Net(drop=lambda d, i, f: d == "p2c" and i >= 6).start().run()
    outcome = net.outcome()
    assert isinstance(outcome, Failed) and outcome.retryable and "stalled" in outcome.reason
    assert net.c.received == 5
    assert outcome.paid <= job_cost(PRICES, 0, 5)


def test_a_lost_tokens_frame_is_a_gap_and_closes_the_stream():
    net = Net(drop=lambda d, i, f: d == "p2c" and f.type == jobs.TOKENS and f.args[0] == 3).start().run()
    outcome = net.outcome()
    assert isinstance(outcome, Failed) and outcome.retryable and outcome.reason == "connection lost"
    assert net.c.received == 3
    claims = net.claims()
    assert all(c.amount <= job_cost(PRICES, 0, 3) for c in claims)


def test_delay_changes_nothing_but_time():
    net = Net(tokens=30, delay=lambda d, i, f: 300).start().run()
    outcome = net.outcome()
    assert isinstance(outcome, Completed)
    assert net.delivered_text() == net.produced_text
    assert outcome.paid == outcome.receipt.cost == net.claims()[0].amount
    # 300 ms each way is longer than the window lasts: the provider paused and resumed
    assert any(isinstance(a, Pause) for a in net.p_actions) and any(isinstance(a, Resume) for a in net.p_actions)


# ------------------------------------------------------------------ cancel


def test_consumer_cancel_pays_the_delivered_tokens():
    net = Net(tokens=40).start()
    while net.c.received < 10:
        net.step()
    net.on_consumer(net.c.cancel(net.now))
    net.run()
    outcome = net.outcome()
    assert isinstance(outcome, Failed) and not outcome.retryable and outcome.receipt is not None
    receipt = outcome.receipt
    assert receipt.status == CANCELLED and receipt.output_tokens == net.c.received == net.p.sent
    assert any(isinstance(a, StopGeneration) for a in net.p_actions)
    assert outcome.paid == receipt.cost == job_cost(PRICES, PROMPT_TOKENS, net.c.received)
    assert net.claims()[-1].amount == receipt.cost
    assert net.p.sent < 40


def test_consumer_cancel_before_the_answer_ends_at_once():
    net = Net().start()
    net.on_consumer(net.c.cancel(net.now))
    outcome = net.outcome()
    assert isinstance(outcome, Failed) and not outcome.retryable
    net.run()
    assert net.p.state is ProviderState.DONE and not net.claims()


def test_provider_cancel_sends_a_receipt_and_is_retryable():
    net = Net(tokens=40).start()
    while net.p.sent < 12:
        net.step()
    net.on_provider(net.p.cancel(net.now, "shutting down"))
    net.run()
    outcome = net.outcome()
    assert isinstance(outcome, Failed) and outcome.retryable and "shutting down" in outcome.reason
    assert outcome.receipt.status == CANCELLED and outcome.receipt.output_tokens == 12 == net.c.received
    assert outcome.paid == outcome.receipt.cost == net.claims()[-1].amount


def test_backend_failure_before_any_voucher_sends_a_waiver():
    net = Net().start()
    while net.p.state is not ProviderState.RUNNING:
        net.step()
    net.running = False
    net.on_provider(net.p.failed(net.now, "model not loaded"))
    net.run()
    outcome = net.outcome()
    assert isinstance(outcome, Failed) and outcome.retryable and "backend" in outcome.reason
    (release,) = [a for a in net.c_actions if isinstance(a, ReleaseHold)]
    assert release.waiver is not None


# ------------------------------------------------------------------ credit window


def test_consumer_that_stops_paying_is_paused_then_stopped():
    net = Net(tokens=40, drop=lambda d, i, f: f.type == jobs.VOUCHER).start().run()
    pauses = [i for i, a in enumerate(net.p_actions) if isinstance(a, Pause)]
    stops = [i for i, a in enumerate(net.p_actions) if isinstance(a, StopGeneration)]
    assert len(pauses) == 1 and len(stops) == 1 and pauses[0] < stops[0]
    assert net.p.sent == WINDOW  # not one token past the window
    cancel = [f for f in net.frames["p2c"] if f.type == jobs.CANCEL]
    assert cancel and cancel[0].args[0] == jobs.R_UNPAID
    outcome = net.outcome()
    assert isinstance(outcome, Failed) and outcome.retryable and outcome.receipt.output_tokens == WINDOW
    assert not net.claims()  # nothing it could claim


def test_tokens_produced_while_paused_are_buffered_then_flushed():
    _, hold, signed, body = make_job(window=2)
    p = ProviderSession(bob, NET_ID, CONFIG)
    p.receive(encode_frame(jobs.REQUEST, JOB_ID, signed.wire, body, []), START_MS)
    p.accept(START_MS)
    p.tokens(START_MS, "a", 1)
    actions = p.tokens(START_MS, "b", 1)
    assert Pause() in actions and p.state is ProviderState.PAUSED
    assert p.tokens(START_MS, "c", 1) == [] and p.tokens(START_MS, "d", 1) == []
    voucher = make_voucher(alice, NET_ID, hold.id, job_cost(PRICES, 0, 2), START_MS)
    actions = p.receive(encode_frame(jobs.VOUCHER, JOB_ID, voucher.wire), START_MS + 1)
    sent = [decode_frame(a.data) for a in actions if isinstance(a, Send)]
    assert [f.args[1] for f in sent] == ["c", "d"] and p.state is ProviderState.PAUSED and p.sent == 4
    # model finishes while paused with nothing buffered: a normal receipt
    actions = p.finished(START_MS + 2, 3, 4)
    receipt = decode_receipt(decode_frame(actions[0].data).args[0], NET_ID)
    assert receipt.output_tokens == 4 and receipt.status == DONE


# ------------------------------------------------------------------ durable vouchers

DURABLE = SessionConfig(first_token_ms=30_000, stall_ms=5_000, receipt_ms=5_000, pause_grace_ms=2_000,
                        settle_ms=2_000, durable_vouchers=True)


@pytest.mark.parametrize("keep_ms", [0, 3, 40, 1_500])
def test_a_durable_provider_never_serves_a_window_past_its_kept_voucher(keep_ms):
    net = Net(tokens=40, config=DURABLE, keep_ms=keep_ms).start().run()
    assert isinstance(net.outcome(), Completed)
    assert net.p.sent == 40 and net.most_unkept <= WINDOW  # a crash at any moment costs at most a window
    (claim,) = net.claims()
    assert claim.amount == net.outcome().paid == net.p.paid  # the final voucher: the CLAIM itself is durable
    keeps = [a for a in net.p_actions if isinstance(a, KeepVoucher)]
    assert keeps and all(k.amount < claim.amount for k in keeps)  # the final one is claimed, not kept
    if keep_ms >= 40:  # a slow disk pauses the stream; a fast one does not
        assert any(isinstance(a, Pause) for a in net.p_actions)
    if keep_ms == 0:
        assert not any(isinstance(a, Pause) for a in net.p_actions)


def test_a_disk_that_never_keeps_the_voucher_stops_the_stream_at_one_window_but_not_as_unpaid():
    net = Net(tokens=40, config=DURABLE, keep_ms=None).start().run()
    assert net.p.sent == WINDOW and net.p.kept == 0 and net.p.paid > 0
    assert not [f for f in net.frames["p2c"] if f.type == jobs.CANCEL]  # it was paid: never "unpaid"
    outcome = net.outcome()
    assert isinstance(outcome, Failed) and outcome.retryable and "stalled" in outcome.reason
    (claim,) = net.claims()  # it still claims the newest voucher it holds
    assert claim.amount == net.p.paid


def test_voucher_kept_resumes_a_paused_provider_and_checks_its_amount():
    _, hold, signed, body = make_job(window=2)
    p = ProviderSession(bob, NET_ID, DURABLE)
    p.receive(encode_frame(jobs.REQUEST, JOB_ID, signed.wire, body, []), START_MS)
    p.accept(START_MS)
    p.tokens(START_MS, "a", 1)
    assert Pause() in p.tokens(START_MS, "b", 1) and p.tokens(START_MS, "c", 1) == []
    voucher = make_voucher(alice, NET_ID, hold.id, job_cost(PRICES, 0, 2), START_MS)
    amount = voucher.fields[1]
    assert p.receive(encode_frame(jobs.VOUCHER, JOB_ID, voucher.wire), START_MS) == [KeepVoucher(voucher, amount)]
    assert p.state is ProviderState.PAUSED and p.paid == amount and p.kept == 0
    # paid but not yet kept: the pause grace runs out without stopping the job
    grace = p.next_deadline()
    assert p.on_timer(grace) == [] and p.state is ProviderState.PAUSED and p.next_deadline() == grace + 2_000
    before = p.snapshot()
    with pytest.raises(LocalProtocolError):
        p.voucher_kept(grace, amount + 1)  # never received
    assert p.snapshot() == before
    actions = p.voucher_kept(grace, amount)
    sent = [decode_frame(a.data).args[1] for a in actions if isinstance(a, Send)]
    assert sent == ["c"] and Resume() in actions and p.state is ProviderState.RUNNING and p.kept == amount
    assert p.voucher_kept(grace, amount) == []  # twice changes nothing
    p.cancel(grace, "operator")
    p.finished(grace, 0, 3)
    p.connection_lost(grace)
    assert p.state is ProviderState.DONE and p.voucher_kept(grace, amount) == []  # a late write: nothing


# ------------------------------------------------------------------ a greedy provider


def test_greedy_provider_gets_only_what_was_delivered_and_the_ledger_refuses_more():
    ledger, hold, signed, body = make_job()
    c = ConsumerSession(alice, NET_ID, signed, body, CONFIG)
    c.start(START_MS)
    c.receive(encode_frame(jobs.ACCEPT, JOB_ID), START_MS)
    # the provider ignores the credit window: 30 tokens, far past it
    for seq in range(30):
        c.receive(encode_frame(jobs.TOKENS, JOB_ID, seq, "x", 1, seq + 1), START_MS + seq)
    assert c.paid <= job_cost(PRICES, 0, 30)
    # and claims, in its receipt, more than it delivered: refused, nothing changes
    bad = make_receipt(bob, NET_ID, START_MS, job_id=JOB_ID, hold_id=hold.id, status=DONE, prompt_eval_count=5,
                       eval_count=45, output_tokens=45, durations_ns=(0, 0, 0, 0), out_hash=output_hash("x" * 45),
                       cost=job_cost(PRICES, 5, 45))
    before = c.snapshot()
    with pytest.raises(ProtocolViolation):
        c.receive(encode_frame(jobs.RECEIPT, JOB_ID, bad.wire), START_MS + 100)
    assert c.snapshot() == before
    # tokens past the request's max_tokens are refused too
    with pytest.raises(ProtocolViolation):
        c.receive(encode_frame(jobs.TOKENS, JOB_ID, 30, "x", 21, 51), START_MS + 100)
    # The ledger pays at most the voucher: a voucher the consumer never signed,
    # or one above the hold, cannot be claimed.
    forged = make_voucher(bob, NET_ID, hold.id, job_cost(PRICES, 5, 45), START_MS)
    with pytest.raises(LedgerRuleViolation):
        ledger.claim(bob, hold.id, forged, START_MS + 200)
    too_big = make_voucher(alice, NET_ID, hold.id, hold.body.amount + 1, START_MS)
    with pytest.raises(LedgerRuleViolation):
        ledger.claim(bob, hold.id, too_big, START_MS + 200)
    honest = make_voucher(alice, NET_ID, hold.id, c.paid, START_MS)
    ledger.claim(bob, hold.id, honest, START_MS + 200)
    assert ledger.claims_of(hold.id) and max(ledger.claims_of(hold.id).values()) == c.paid


# ------------------------------------------------------------------ malformed and out of order


def streaming_pair():
    """A consumer and provider three tokens into a job, frames moved by hand."""
    ledger, hold, signed, body = make_job()
    c = ConsumerSession(alice, NET_ID, signed, body, CONFIG)
    p = ProviderSession(bob, NET_ID, CONFIG)
    (send,) = c.start(START_MS)
    assert isinstance(p.receive(send.data, START_MS)[0], RequestReceived)
    (send,) = p.accept(START_MS)
    c.receive(send.data, START_MS)
    for i in range(3):
        (send,) = p.tokens(START_MS, f"t{i}", 1)
        c.receive(send.data, START_MS)
    return ledger, hold, c, p


def _tokens(seq, total, count=1, job=JOB_ID):
    return encode_frame(jobs.TOKENS, job, seq, "x", count, total)


OTHER_JOB = bytes(16)
BAD_FOR_CONSUMER = {
    "empty": (b"", Truncated),
    "garbage": (b"\xc1", MalformedInput),
    "truncated": (_tokens(3, 4)[:-1], Truncated),
    "oversized": (b"\x00" * (jobs.MAX_JOB_FRAME + 1), Oversized),
    "not an array": (pack({"a": 1}), MalformedInput),
    "unknown type": (pack([99, JOB_ID]), MalformedInput),
    "wrong length": (pack([jobs.TOKENS, JOB_ID, 3]), MalformedInput),
    "short job id": (pack([jobs.ACCEPT, b"x"]), MalformedInput),
    "float count": (pack([jobs.TOKENS, JOB_ID, 3, "x", 1.0, 4]), MalformedInput),
    "zero count": (_tokens(3, 3, count=0), MalformedInput),
    "text too long": (pack([jobs.TOKENS, JOB_ID, 3, "x" * (jobs.MAX_TOKENS_TEXT + 1), 1, 4]), MalformedInput),
    "another job": (_tokens(3, 4, job=OTHER_JOB), ProtocolViolation),
    "seq gap": (_tokens(4, 4), ProtocolViolation),
    "seq replay": (_tokens(2, 4), ProtocolViolation),
    "bad total": (_tokens(3, 7), ProtocolViolation),
    "past max tokens": (_tokens(3, MAX_TOKENS + 1, count=MAX_TOKENS - 2), ProtocolViolation),
    "accept again": (encode_frame(jobs.ACCEPT, JOB_ID), ProtocolViolation),
    "reject now": (encode_frame(jobs.REJECT, JOB_ID, 1, "no", b""), ProtocolViolation),
    "request to consumer": (encode_frame(jobs.REQUEST, JOB_ID, b"", b"", []), ProtocolViolation),
    "voucher to consumer": (encode_frame(jobs.VOUCHER, JOB_ID, b"x"), ProtocolViolation),
    "receipt garbage": (encode_frame(jobs.RECEIPT, JOB_ID, b"\x92\x01"), MalformedInput),
    "error with bad waiver": (encode_frame(jobs.ERROR, JOB_ID, 7, "x", b"\x01"), MalformedInput),
}


@pytest.mark.parametrize("name", sorted(BAD_FOR_CONSUMER))
def test_consumer_refuses_bad_frames_and_changes_nothing(name):
    _, _, c, _ = streaming_pair()
    data, error = BAD_FOR_CONSUMER[name]
    before = c.snapshot()
    with pytest.raises(error):
        c.receive(data, START_MS + 1)
    assert c.snapshot() == before
    # and the session still works afterwards
    c.receive(_tokens(3, 4), START_MS + 2)
    assert c.received == 4


def _receipt(key=bob, hold_id=None, *, net=NET_ID, job=JOB_ID, out=3, text="t0t1t2"):
    return make_receipt(key, net, START_MS, job_id=job, hold_id=hold_id, status=DONE, prompt_eval_count=1,
                        eval_count=out, output_tokens=out, durations_ns=(0, 0, 0, 0), out_hash=output_hash(text),
                        cost=1).wire


def test_consumer_refuses_bad_receipts_and_waivers():
    _, hold, c, _ = streaming_pair()
    other_net = bytes(32)
    cases = [
        (_receipt(carol, hold.id), ProtocolViolation),
        (_receipt(bob, bytes(32)), ProtocolViolation),
        (_receipt(bob, hold.id, out=2), ProtocolViolation),
        (_receipt(bob, hold.id, text="other"), ProtocolViolation),
        (_receipt(bob, hold.id, net=other_net), WrongNetwork),
        (_receipt(bob, hold.id)[:-1] + b"\x00", (BadSignature, MalformedInput)),
    ]
    for wire, error in cases:
        before = c.snapshot()
        with pytest.raises(error):
            c.receive(encode_frame(jobs.RECEIPT, JOB_ID, wire), START_MS + 1)
        assert c.snapshot() == before
    for waiver, error in [
        (make_waiver(carol, NET_ID, hold.id, "x", START_MS).wire, ProtocolViolation),
        (make_waiver(bob, NET_ID, bytes(32), "x", START_MS).wire, ProtocolViolation),
    ]:
        before = c.snapshot()
        with pytest.raises(error):
            c.receive(encode_frame(jobs.ERROR, JOB_ID, 7, "boom", waiver), START_MS + 1)
        assert c.snapshot() == before
    c.receive(encode_frame(jobs.RECEIPT, JOB_ID, _receipt(bob, hold.id)), START_MS + 2)
    assert c.state is ConsumerState.DONE


def test_provider_refuses_bad_vouchers_and_frames_and_changes_nothing():
    _, hold, c, p = streaming_pair()
    good = job_cost(PRICES, 0, 3)
    p.receive(encode_frame(jobs.VOUCHER, JOB_ID, make_voucher(alice, NET_ID, hold.id, good, START_MS).wire), START_MS)
    cases = [
        (make_voucher(carol, NET_ID, hold.id, good + 1, START_MS).wire, ProtocolViolation),  # not the consumer
        (make_voucher(alice, NET_ID, bytes(32), good + 1, START_MS).wire, ProtocolViolation),  # other hold
        (make_voucher(alice, NET_ID, hold.id, good, START_MS).wire, ProtocolViolation),  # not increasing
        (make_voucher(alice, NET_ID, hold.id, hold.body.amount + 1, START_MS).wire, ProtocolViolation),
        (make_voucher(alice, bytes(32), hold.id, good + 1, START_MS).wire, WrongNetwork),
        (make_waiver(alice, NET_ID, hold.id, "x", START_MS).wire, MalformedInput),  # wrong object type
        (b"\x92\xc4\x01x\xc4\x01y", MalformedInput),
    ]
    frames = [encode_frame(jobs.VOUCHER, JOB_ID, wire) for wire, _ in cases]
    errors = [error for _, error in cases]
    frames += [encode_frame(jobs.VOUCHER, OTHER_JOB, make_voucher(alice, NET_ID, hold.id, good + 1, START_MS).wire),
               encode_frame(jobs.ACCEPT, JOB_ID), _tokens(3, 4), c._request_frame, b"\xff"]
    errors += [ProtocolViolation, ProtocolViolation, ProtocolViolation, ProtocolViolation, MalformedInput]
    for data, error in zip(frames, errors):
        before = p.snapshot()
        with pytest.raises(error):
            p.receive(data, START_MS + 1)
        assert p.snapshot() == before


def test_provider_refuses_bad_requests():
    ledger, hold, signed, body = make_job()
    p = ProviderSession(carol, NET_ID, CONFIG)  # the hold names bob
    with pytest.raises(ProtocolViolation):
        p.receive(encode_frame(jobs.REQUEST, JOB_ID, signed.wire, body, []), START_MS)
    p = ProviderSession(bob, NET_ID, CONFIG)
    for data, error in [
        (encode_frame(jobs.REQUEST, JOB_ID, signed.wire, body + b"x", []), MalformedInput),  # body hash
        (encode_frame(jobs.REQUEST, OTHER_JOB, signed.wire, body, []), ProtocolViolation),
        (encode_frame(jobs.ACCEPT, JOB_ID), ProtocolViolation),  # before the request
        (encode_frame(jobs.REQUEST, JOB_ID, signed.wire[:-1] + b"\x00", body, []), BadSignature),
    ]:
        before = p.snapshot()
        with pytest.raises(error):
            p.receive(data, START_MS)
        assert p.snapshot() == before
    with pytest.raises(ProtocolViolation):  # hold expired by now
        p.receive(encode_frame(jobs.REQUEST, JOB_ID, signed.wire, body, []), START_MS + 600_000)
    assert p.state is ProviderState.WAITING
    p.receive(encode_frame(jobs.REQUEST, JOB_ID, signed.wire, body, []), START_MS)
    assert p.state is ProviderState.DECIDING


def test_request_context_is_shape_checked_and_handed_on_unchecked():
    ledger = Ledger(MemoryStore(), GENESIS)
    previous = ledger.send(alice, carol.public_key, 5, START_MS - 1).wire  # alice's entry before the hold
    ledger, hold, signed, body = make_job(ledger)
    p = ProviderSession(bob, NET_ID, CONFIG)
    for context in ([b"x"] * (jobs.MAX_REQUEST_CONTEXT + 1), ["not bytes"], [b"y" * (jobs.MAX_WIRE + 1)], b"nope"):
        with pytest.raises(MalformedInput):
            p.receive(pack([jobs.REQUEST, JOB_ID, signed.wire, body, context]), START_MS)
        assert p.state is ProviderState.WAITING
    with pytest.raises(MalformedInput):  # the old four-item frame
        p.receive(pack([jobs.REQUEST, JOB_ID, signed.wire, body]), START_MS)
    (received,) = p.receive(encode_frame(jobs.REQUEST, JOB_ID, signed.wire, body, [previous]), START_MS)
    assert isinstance(received, RequestReceived) and received.context == (previous,)
    with pytest.raises(LocalProtocolError):
        ConsumerSession(alice, NET_ID, signed, body, CONFIG, context=(previous,) * (jobs.MAX_REQUEST_CONTEXT + 1))
    c = ConsumerSession(alice, NET_ID, signed, body, CONFIG, context=(previous,))
    (send,) = c.start(START_MS)
    assert decode_frame(send.data).args[2] == (previous,)


def test_a_stream_that_never_brings_a_request_ends_quietly_at_its_deadline():
    p = ProviderSession(bob, NET_ID, CONFIG)
    assert p.next_deadline() is None
    assert p.open(START_MS) == [] and p.next_deadline() == START_MS + CONFIG.request_wait_ms
    assert p.on_timer(START_MS + CONFIG.request_wait_ms - 1) == [] and p.state is ProviderState.WAITING
    assert p.on_timer(START_MS + CONFIG.request_wait_ms) == [] and p.state is ProviderState.DONE
    # a request in time clears the deadline: deciding takes as long as it takes
    _, _, signed, body = make_job()
    p = ProviderSession(bob, NET_ID, CONFIG)
    p.open(START_MS)
    p.receive(encode_frame(jobs.REQUEST, JOB_ID, signed.wire, body, []), START_MS + 10)
    assert p.state is ProviderState.DECIDING and p.next_deadline() is None


def test_request_must_be_covered_by_its_own_hold():
    ledger = Ledger(MemoryStore(), GENESIS)
    small = ledger.hold(alice, bob.public_key, 10, START_MS + 60_000, JOB_ID, START_MS)
    with pytest.raises(MalformedInput, match="does not cover"):
        make_request(alice, NET_ID, START_MS, job_id=JOB_ID, model="llama3.2", hold=small, prices=PRICES,
                     max_prompt_tokens=MAX_PROMPT, max_tokens=MAX_TOKENS, credit_window=WINDOW, prompt="hi")
    other = ledger.hold(alice, bob.public_key, 10**6, START_MS + 60_000, OTHER_JOB, START_MS)
    with pytest.raises(MalformedInput, match="another job"):
        make_request(alice, NET_ID, START_MS, job_id=JOB_ID, model="llama3.2", hold=other, prices=PRICES,
                     max_prompt_tokens=MAX_PROMPT, max_tokens=MAX_TOKENS, credit_window=WINDOW, prompt="hi")
    good = ledger.hold(alice, bob.public_key, 10**6, START_MS + 60_000, JOB_ID, START_MS)
    signed, body = make_request(alice, NET_ID, START_MS, job_id=JOB_ID, model="Llama3.2", hold=good, prices=PRICES,
                                max_prompt_tokens=MAX_PROMPT, max_tokens=MAX_TOKENS, credit_window=WINDOW,
                                messages=[("user", "hi"), ("assistant", "hello")])
    request = decode_request(signed.wire, body, NET_ID)
    assert request.kind == "chat" and request.model == "llama3.2:latest"
    assert request.messages == (("user", "hi"), ("assistant", "hello")) and request.prompt is None


def test_local_misuse_is_a_local_error_and_changes_nothing():
    _, _, c, p = streaming_pair()
    for call in (lambda: c.start(START_MS), lambda: p.accept(START_MS), lambda: p.reject(START_MS, 1, "x")):
        before = (c.snapshot(), p.snapshot())
        with pytest.raises(LocalProtocolError):
            call()
        assert (c.snapshot(), p.snapshot()) == before
    fresh = ProviderSession(bob, NET_ID, CONFIG)
    with pytest.raises(LocalProtocolError):
        fresh.tokens(START_MS, "x", 1)
    with pytest.raises(LocalProtocolError):
        p.tokens(START_MS, "x" * 3, MAX_TOKENS)  # past max_tokens
    assert p.sent == 3


def test_timers_do_nothing_before_their_deadline():
    _, _, c, p = streaming_pair()
    deadline = c.next_deadline()
    assert deadline == START_MS + CONFIG.stall_ms and p.next_deadline() is None
    assert c.on_timer(deadline - 1) == [] and c.state is ConsumerState.STREAMING
    (cancel, release, failed) = c.on_timer(deadline)
    assert decode_frame(cancel.data).type == jobs.CANCEL and isinstance(failed, Failed) and failed.retryable
    assert c.next_deadline() is None


# ------------------------------------------------------------------ any interleaving

@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.integers(0, 30),
    window=st.integers(1, 12),
    drops=st.sets(st.tuples(st.sampled_from(["c2p", "p2c"]), st.integers(0, 40)), max_size=4),
    delays=st.dictionaries(st.tuples(st.sampled_from(["c2p", "p2c"]), st.integers(0, 40)),
                           st.integers(0, 20_000), max_size=6),
    cancel_at=st.one_of(st.none(), st.integers(0, 30)),
    provider_cancel_at=st.one_of(st.none(), st.integers(0, 30)),
    keep_ms=st.one_of(st.none(), st.integers(0, 2_500)),  # None: vouchers count at once; else durable, this slow
)
def test_any_interleaving_ends_and_never_overpays(tokens, window, drops, delays, cancel_at, provider_cancel_at,
                                                   keep_ms):
    # a round trip slowed by less than the pause grace never stops a job
    undisturbed = not drops and sum(delays.values()) < CONFIG.pause_grace_ms and (cancel_at, provider_cancel_at) == (None, None)
    net = Net(tokens=tokens, window=window,
              drop=lambda d, i, f: (d, i) in drops,
              delay=lambda d, i, f: delays.get((d, i), 0),
              config=CONFIG if keep_ms is None else DURABLE, keep_ms=keep_ms).start()
    while net.step():
        assert net.now < START_MS + 500_000, "the link never went quiet"
        if cancel_at is not None and net.c.received >= cancel_at and net.c.state in (
                ConsumerState.REQUESTED, ConsumerState.ACCEPTED, ConsumerState.STREAMING):
            net.on_consumer(net.c.cancel(net.now))
            cancel_at = None
        if provider_cancel_at is not None and net.p.sent >= provider_cancel_at and net.p.state in (
                ProviderState.RUNNING, ProviderState.PAUSED):
            net.on_provider(net.p.cancel(net.now, "going away"))
            provider_cancel_at = None
    outcome = net.outcome()
    assert isinstance(outcome, (Completed, Failed))
    assert net.c.state is ConsumerState.DONE
    assert net.p.state in (ProviderState.DONE, ProviderState.WAITING)
    delivered = sum(f.args[2] for f in net.frames["p2c"] if f.type == jobs.TOKENS)
    assert net.c.received == delivered <= net.p.sent
    paid = [v.fields[1] for v in net.sent_vouchers()]
    assert paid == sorted(set(paid))
    last = paid[-1] if paid else 0
    assert last == outcome.paid == net.c.paid
    assert last <= job_cost(PRICES, PROMPT_TOKENS, delivered)
    if not isinstance(outcome, Completed) and not (outcome.receipt is not None):
        assert last <= job_cost(PRICES, 0, delivered)  # no receipt: output tokens only
    if undisturbed:
        assert isinstance(outcome, Completed), outcome
    if isinstance(outcome, Completed):
        assert net.delivered_text() == net.produced_text and outcome.paid == outcome.receipt.cost
    for claim in net.claims():
        assert claim.amount <= last and claim.voucher.fields[1] == claim.amount
        claim.voucher.verify()
    assert len(net.claims()) <= 1
    assert net.most_unkept <= window  # never a window past the vouchers a crash would leave


# ------------------------------------------------------------------ the rest of the tables


def _frames(actions):
    return [a.data for a in actions if isinstance(a, Send)]


def test_backend_failure_mid_stream_and_while_closing():
    _, hold, c, p = streaming_pair()
    (error,) = _frames(p.failed(START_MS, "out of memory"))  # RUNNING -> DONE, no voucher yet: waiver
    actions = c.receive(error, START_MS)  # STREAMING + ERROR
    assert isinstance(actions[-1], Failed) and actions[-1].retryable and actions[0].waiver is not None
    assert p.state is ProviderState.DONE and c.state is ConsumerState.DONE

    _, hold, c, p = streaming_pair()
    voucher = make_voucher(alice, NET_ID, hold.id, job_cost(PRICES, 0, 3), START_MS)
    (cancel,) = _frames(c.cancel(START_MS))
    assert c.state is ConsumerState.CLOSING
    (in_flight,) = _frames(p.tokens(START_MS, "t3", 1))  # crossed our cancel: counted, not delivered
    assert not any(isinstance(a, Deliver) for a in c.receive(in_flight, START_MS)) and c.received == 4
    assert p.receive(cancel, START_MS) == [StopGeneration("cancelled by the consumer")]
    assert p.tokens(START_MS, "late", 1) == [] and p.sent == 4  # STOPPING: produced after the stop, never sent
    assert p.receive(encode_frame(jobs.VOUCHER, JOB_ID, voucher.wire), START_MS) == []  # STOPPING + voucher
    (error, claim) = p.failed(START_MS, "crashed while stopping")
    assert isinstance(claim, Claim) and claim.amount == voucher.fields[1]
    assert decode_frame(error.data).args[2] == b""  # it holds a voucher: no waiver
    actions = c.receive(error.data, START_MS)  # CLOSING + ERROR
    assert isinstance(actions[-1], Failed) and actions[0].waiver is None


def test_no_first_token_after_accept():
    _, _, signed, body = make_job()
    c = ConsumerSession(alice, NET_ID, signed, body, CONFIG)
    c.start(START_MS)
    c.receive(encode_frame(jobs.ACCEPT, JOB_ID), START_MS + 5)
    assert c.next_deadline() == START_MS + CONFIG.first_token_ms  # accepting does not restart the clock
    actions = c.on_timer(START_MS + CONFIG.first_token_ms)
    assert isinstance(actions[-1], Failed) and "first token" in actions[-1].reason


def test_provider_deciding_can_be_cancelled_or_lost():
    _, _, signed, body = make_job()
    request = encode_frame(jobs.REQUEST, JOB_ID, signed.wire, body, [])
    p = ProviderSession(bob, NET_ID, CONFIG)
    p.receive(request, START_MS)
    assert p.receive(encode_frame(jobs.CANCEL, JOB_ID, jobs.R_USER, "never mind"), START_MS) == []
    assert p.state is ProviderState.DONE
    p = ProviderSession(bob, NET_ID, CONFIG)
    p.receive(request, START_MS)
    assert p.connection_lost(START_MS) == [] and p.state is ProviderState.DONE


def test_backend_failure_while_paused_claims_what_was_paid():
    _, hold, signed, body = make_job(window=2)
    p = ProviderSession(bob, NET_ID, CONFIG)
    p.receive(encode_frame(jobs.REQUEST, JOB_ID, signed.wire, body, []), START_MS)
    p.accept(START_MS)
    p.tokens(START_MS, "a", 1)
    voucher = make_voucher(alice, NET_ID, hold.id, job_cost(PRICES, 0, 1), START_MS)
    p.receive(encode_frame(jobs.VOUCHER, JOB_ID, voucher.wire), START_MS)
    p.tokens(START_MS, "b", 1)
    p.tokens(START_MS, "c", 1)
    assert p.state is ProviderState.PAUSED and p.next_deadline() == START_MS + CONFIG.pause_grace_ms
    (error, claim) = p.failed(START_MS + 1, "gpu fell off the bus")
    assert claim == Claim(hold.id, voucher, voucher.fields[1]) and p.next_deadline() is None


def test_provider_cancel_while_paused():
    _, hold, signed, body = make_job(window=1)
    p = ProviderSession(bob, NET_ID, CONFIG)
    p.receive(encode_frame(jobs.REQUEST, JOB_ID, signed.wire, body, []), START_MS)
    p.accept(START_MS)
    assert Pause() in p.tokens(START_MS, "a", 1)
    cancel, stop = p.cancel(START_MS, "draining", jobs.R_BUSY)
    assert decode_frame(cancel.data).args[:2] == (jobs.R_BUSY, "draining") and isinstance(stop, StopGeneration)
    assert p.state is ProviderState.STOPPING and p.next_deadline() is None
    (receipt,) = _frames(p.finished(START_MS, 4, 2))
    assert decode_receipt(decode_frame(receipt).args[0], NET_ID).status == CANCELLED
    assert p.state is ProviderState.SETTLING and p.next_deadline() == START_MS + CONFIG.settle_ms
    assert p.on_timer(START_MS + CONFIG.settle_ms) == [] and p.state is ProviderState.DONE  # no voucher: no claim
    assert p.receive(encode_frame(jobs.CANCEL, JOB_ID, jobs.R_USER, "late"), START_MS) == []  # DONE ignores


def test_admission_refusals_come_from_the_provider_state_alone():
    from p2pgpu.core.jobs import R_BUSY, R_MODEL, R_PRICE, admission_refusal

    _, _, signed, body = make_job()
    request = decode_request(signed.wire, body, NET_ID)
    ours = Prices(request.prices.price_in, request.prices.price_out)
    ok = dict(served_models={request.model}, prices=ours, active=0, slots=1)
    assert admission_refusal(request, **ok) is None
    assert admission_refusal(request, **{**ok, "served_models": set()})[0] == R_MODEL
    assert admission_refusal(request, **{**ok, "prices": Prices(ours.price_in + 1, ours.price_out)})[0] == R_PRICE
    assert admission_refusal(request, **{**ok, "active": 1})[0] == R_BUSY

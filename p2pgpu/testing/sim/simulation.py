"""One simulated run: build the network from the seed, drive a random
workload through it under faults, heal, settle, check.

A run, in simulated time::

    0 .. horizon        nodes boot; the workload (faucet mints, sends, jobs)
                        and the faults (partitions, crashes, backend faults,
                        consumers that stop paying, user cancels) happen
    horizon             everything heals: partitions end, crashed nodes
                        restart, gossip stops losing messages, no new faults
    horizon .. bound    the nodes settle by themselves; every ``probe_ms``
                        the run checks whether they are quiescent (no job,
                        stream, open hold, kept voucher or parked entry
                        left, every replica with the same state hash)
    end                 the final invariants (``invariants.Checks.final``)

``run_seed`` is the whole contract: (seed, config) -> ``RunResult``, the
same for the same inputs in any process (the determinism test runs one seed
under two ``PYTHONHASHSEED`` values and compares traces).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from p2pgpu.core.genesis import Genesis
from p2pgpu.core.identity import NodeKey
from p2pgpu.core.jobs import Prices
from p2pgpu.errors import P2PGPUError
from p2pgpu.testing.sim.config import START_MS, SimConfig, SIM_PARAMS
from p2pgpu.testing.sim.invariants import Checks, InvariantBroken, SubmissionRecord, Violation
from p2pgpu.testing.sim.network import World
from p2pgpu.testing.sim.node import SimNode
from p2pgpu.testing.sim.provider import answer_tokens

__all__ = ["RunResult", "Simulation", "run_seed"]

ALLOCATION = 20_000  # base units per node at genesis
FAUCET_MINT = (1_000, 20_000)


@dataclass(frozen=True, slots=True)
class RunResult:
    """How one seed's run ended. ``digest`` sums up the final state (every
    replica's state hash, the counters, the jobs' outcomes): two runs of
    one seed must have equal digests."""

    seed: int
    config: SimConfig
    nodes: int
    violation: Violation | None
    events: int
    sim_ms: int
    digest: str
    jobs: int
    completed: int
    trace: tuple[str, ...] = field(default=(), repr=False)

    @property
    def ok(self) -> bool:
        return self.violation is None


def _key(seed: int, index: int) -> NodeKey:
    return NodeKey(hashlib.blake2b(f"p2pgpu-sim:{seed}:{index}".encode(), digest_size=32).digest())


class Simulation:
    """The world of one seed, built and ready to ``run``."""

    def __init__(self, seed: int, config: SimConfig, *, tracing: bool = False) -> None:
        self.seed = seed
        self.config = config
        self.timing = config.timing
        world = self.world = World(seed, config.profile, config.timing, tracing=tracing)
        rng = world.rng
        count = config.nodes if config.nodes is not None else rng.choice((4, 5))
        keys = [_key(seed, i) for i in range(count)]
        genesis = Genesis(name="sim", created_ms=START_MS, faucet=keys[0].public_key,
                          allocations=tuple(sorted((k.public_key, ALLOCATION) for k in keys)), params=SIM_PARAMS)
        self.checks = Checks(world, grace_ms=SIM_PARAMS.release_grace_ms,
                             settle_slack_ms=self.timing.settle_idle_ms + self.timing.settle_retry_ms + 2_000)
        order = list(range(count))
        rng.shuffle(order)
        providers = order[:rng.randint(1, max(1, count // 2))]
        self.consumers = [i for i in range(count) if i not in providers or rng.random() < 0.3]
        profile = config.profile
        max_skew = SIM_PARAMS.max_clock_skew_ms // 2
        self.nodes: list[SimNode] = []
        for i, key in enumerate(keys):
            prices = None
            if i in providers:
                prices = Prices(rng.randint(0, 4) * 250_000, rng.randint(1, 8) * 250_000)
            skew = round(rng.uniform(-1.0, 1.0) * profile.skew * max_skew)
            self.nodes.append(SimNode(world, i, key, genesis, checks=self.checks, timing=self.timing, skew_ms=skew,
                                      prices=prices, slots=rng.randint(1, 2), consumer=i in self.consumers,
                                      plant=config.plant))
        world.nodes = self.nodes
        world.group = [0] * count
        world.index_by_key = {k.public_key: i for i, k in enumerate(keys)}
        self.submissions = 0
        self.partition_episode = 0
        self.quiet = False
        self.pending = ""
        self.risky_crashes = config.profile.risky_crashes
        world.on_risk = self._risk

    # ---------------------------------------------------------------- plan

    def _schedule(self) -> None:
        world, rng, horizon, profile = self.world, self.world.rng, self.timing.horizon_ms, self.config.profile
        for node in self.nodes:
            world.at(START_MS + rng.randint(0, 200), node.boot)
        low, high = self.timing.workload_ops
        for _ in range(rng.randint(low, high)):
            world.at(START_MS + rng.randint(1_500, horizon - 3_000), self._operation)
        for _ in range(rng.randint(0, profile.partitions)):
            start = rng.randint(1_000, horizon - 1_000)
            world.at(START_MS + start, self._partition, rng.randint(*profile.partition_ms))
        for _ in range(rng.randint(0, profile.crashes)):
            world.at(START_MS + rng.randint(300, horizon - 300), self._crash)
        world.at(START_MS + horizon, self._heal)

    # ---------------------------------------------------------------- the workload

    def _operation(self) -> None:
        rng = self.world.rng
        roll = rng.random()
        if roll < 0.55:
            self._submit()
        elif roll < 0.8:
            self._send()
        else:
            self._faucet()

    def _submit(self) -> None:
        rng, profile = self.world.rng, self.world.profile
        node = self.nodes[self.consumers[rng.randrange(len(self.consumers))]]
        self.submissions += 1
        number = self.submissions
        max_tokens = rng.randint(3, 40)
        prompt = f"question {number} from {node.name}: " + " ".join(f"q{i}" for i in range(rng.randint(1, 12)))
        answer = answer_tokens(rng.randint(2, 60))
        self.world.answers[prompt] = answer
        record = SubmissionRecord(number, node.index, prompt, max_tokens, answer)
        stop_paying = rng.randint(0, 3) if profile.stop_paying and rng.random() < profile.stop_paying else None
        cancel = rng.randint(0, 2_000) if profile.cancel and rng.random() < profile.cancel else None
        job_id = rng.getrandbits(128).to_bytes(16, "big")
        if not node.up or node.consumer is None:
            return  # the user's command has no node to talk to: nothing is submitted
        self.checks.submissions.append(record)
        node.consumer.submit(record, job_id, stop_paying, cancel)

    def _send(self) -> None:
        rng = self.world.rng
        node = self.nodes[rng.randrange(len(self.nodes))]
        if not node.up:
            return
        to = self.nodes[rng.randrange(len(self.nodes))]
        if to is node:
            return
        spendable = node.replica.ledger.spendable(node.key.public_key)  # type: ignore[union-attr]
        if spendable < 2:
            return
        amount = rng.randint(1, spendable // 4 or 1)
        try:
            node.replica.append(lambda lg: lg.send(node.key, to.key.public_key, amount, node.now(), "sim"))  # type: ignore[union-attr]
            node.trace(f"sends {amount} to {to.name}")
        except P2PGPUError as exc:
            node.trace(f"send refused: {exc}")

    def _faucet(self) -> None:
        rng = self.world.rng
        faucet = self.nodes[0]
        to = self.nodes[rng.randrange(len(self.nodes))]
        amount = rng.randint(*FAUCET_MINT)
        if not faucet.up:
            return

        def mint_and_send(ledger):
            now = faucet.now()
            minted = ledger.mint(faucet.key, amount, now, "faucet")
            if to is faucet:
                return [minted]
            return [minted, ledger.send(faucet.key, to.key.public_key, amount, now, "faucet")]

        faucet.replica.append(mint_and_send)  # type: ignore[union-attr]
        faucet.trace(f"mints {amount} for {to.name}")

    # ---------------------------------------------------------------- faults

    def _partition(self, duration: int) -> None:
        world = self.world
        if world.calm or any(world.group):
            return  # one partition at a time
        rng = world.rng
        count = len(self.nodes)
        side = rng.sample(range(count), rng.randint(1, count - 1))
        groups = [1 if i in side else 0 for i in range(count)]
        self.partition_episode += 1
        episode = self.partition_episode
        if world.tracing:
            world.log("world", f"partition {sorted(side)} | {[i for i in range(count) if i not in side]} for {duration} ms")
        world.count("partitions")
        world.set_groups(groups)
        world.after(duration, self._end_partition, episode)

    def _end_partition(self, episode: int) -> None:
        if self.partition_episode == episode and any(self.world.group) and not self.world.calm:
            if self.world.tracing:
                self.world.log("world", "partition heals")
            self.world.set_groups([0] * len(self.nodes))

    def _crash(self) -> None:
        world = self.world
        if world.calm:
            return
        rng = world.rng
        up = [n for n in self.nodes if n.up]
        if not up:
            return
        busy = [n for n in up if n.live_jobs()]
        pool = busy if busy and rng.random() < 0.6 else up
        node = pool[rng.randrange(len(pool))]
        node.crash()
        down = rng.randint(*world.profile.down_ms)
        world.after(down, self._restart, node, node.incarnation)

    def _risk(self, index: int, window_ms: int) -> None:
        """Maybe crash node ``index`` inside a window where it holds something
        not yet durable (``World.risky``)."""
        rng = self.world.rng
        if self.risky_crashes > 0 and rng.random() < self.world.profile.risky_rate:
            self.risky_crashes -= 1
            node = self.nodes[index]
            self.world.after(rng.randint(0, max(0, window_ms - 1)), self._crash_now, node, node.incarnation)

    def _crash_now(self, node: SimNode, incarnation: int) -> None:
        if node.up and node.incarnation == incarnation and not self.world.calm:
            node.crash()
            self.world.after(self.world.rng.randint(*self.world.profile.down_ms), self._restart, node, node.incarnation)

    def _restart(self, node: SimNode, incarnation: int) -> None:
        if not node.up and node.incarnation == incarnation and not self.world.calm:
            node.boot()

    # ---------------------------------------------------------------- heal, settle, check

    def _heal(self) -> None:
        world = self.world
        if world.tracing:
            world.log("world", "horizon: heal everything, no more faults")
        world.become_calm()
        self.checks.healed_at = world.now
        if any(world.group):
            world.set_groups([0] * len(self.nodes))
        for node in self.nodes:
            if not node.up:
                node.boot()
        world.after(self.timing.probe_ms, self._probe)

    def _probe(self) -> None:
        self.checks.holds_released_in_time(self.nodes)
        pending = self._pending()
        if not pending:
            self.quiet = True
            return
        self.pending = pending
        self.world.after(self.timing.probe_ms, self._probe)

    def _pending(self) -> str:
        """What keeps the run from being quiescent ("" once it is), cheapest first."""
        if self.world.streams:
            return f"{len(self.world.streams)} open stream(s)"
        for node in self.nodes:
            if not node.up:
                return f"{node.name} is down"
            if node.live_jobs():
                return f"{node.name} has {node.live_jobs()} live job(s)"
            if node.consumer is not None and node.consumer.settler.open:
                return f"{node.name} has {len(node.consumer.settler.open)} open hold(s)"
            if node.kept_store:
                return f"{node.name} has {len(node.kept_store)} kept voucher(s)"
            if not node.replica.idle():  # type: ignore[union-attr]
                return f"{node.name} is still replicating"
        hashes = {node.replica.ledger.state_hash() for node in self.nodes}  # type: ignore[union-attr]
        if len(hashes) > 1:
            return "replicas differ"
        return ""

    def run(self) -> RunResult:
        world = self.world
        violation = None
        self._schedule()
        bound = START_MS + self.timing.horizon_ms + self.timing.hold_ms + SIM_PARAMS.release_grace_ms \
            + self.timing.quiesce_extra_ms
        try:
            world.run_until(bound, stop=lambda: self.quiet)
            self.checks.final(self.nodes, self.quiet, self.pending or self._pending())
        except InvariantBroken as broken:
            violation = broken.violation
            if world.tracing:
                world.log("world", f"INVARIANT BROKEN {violation.invariant}: {violation.detail}")
        return RunResult(self.seed, self.config, len(self.nodes), violation, world.events, world.now - START_MS,
                         self._digest(violation), len(self.checks.submissions),
                         sum(1 for r in self.checks.submissions if r.status is not None and r.status.value == "completed"),
                         tuple(world.trace))

    def _digest(self, violation: Violation | None) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for node in self.nodes:
            if node.replica is not None:
                digest.update(node.replica.ledger.state_hash())
        for name, value in sorted(self.world.counters.items()):
            digest.update(f"{name}={value};".encode())
        for record in self.checks.submissions:
            digest.update(f"{record.number}:{record.status}:{record.reason}:{''.join(record.text)};".encode())
        digest.update(repr(violation).encode())
        digest.update(str(self.world.events).encode())
        return digest.hexdigest()


def run_seed(seed: int, config: SimConfig = SimConfig(), *, tracing: bool = False) -> RunResult:
    """Run one seed to its end; never raises for a broken invariant (see
    ``RunResult.violation``)."""
    return Simulation(seed, config, tracing=tracing).run()

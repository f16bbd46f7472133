"""What one simulated run looks like: fault levels, sizes and timings.

Everything here is a frozen value. A run is fixed by (seed, ``SimConfig``):
the seed drives one ``random.Random`` that draws the roles, the workload and
every fault; the config picks how hostile the world is. Timings are
simulated milliseconds, scaled down from the node's real ones (a job's hold
lasts 20 s, not 5 min; the release grace is 15 s, not an hour) so that a run
covers whole hold lifetimes, grace periods included, in a few hundred
events; the rules do not care about the scale, only about the order of
things.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from p2pgpu.core.genesis import LedgerParams
from p2pgpu.core.jobs import SessionConfig

__all__ = ["FaultLevel", "FaultProfile", "PROFILES", "CALM", "SimConfig", "SIM_PARAMS", "Timing", "TIMING", "Plant",
           "MODEL", "SESSION_CONFIG", "CREDIT_WINDOW"]

START_MS = 1_700_000_000_000
"""Simulated wall clock at the start of every run (ms since the epoch)."""

SIM_PARAMS = LedgerParams(max_clock_skew_ms=1_000, release_grace_ms=15_000, max_hold_ms=600_000)
"""The simulated network's genesis parameters: short grace and skew, so a
run reaches every release basis (timeout included) within its horizon."""

MODEL = "sim:1b"
"""The one model every simulated provider serves."""
SESSION_CONFIG = SessionConfig(first_token_ms=6_000, stall_ms=3_000, receipt_ms=2_000, pause_grace_ms=2_000,
                               settle_ms=2_000, request_wait_ms=10_000)
"""The job sessions' timers, scaled like the rest of the simulated time."""
CREDIT_WINDOW = 8
"""Tokens; small, so that vouchers, pauses and unpaid stops happen often."""


class FaultLevel(enum.Enum):
    NONE = "none"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class Plant(enum.Enum):
    """A deliberate bug the simulator can put into the decision code, to
    show that its invariants catch such bugs (a checker that cannot fail is
    a defect). Never set outside tests of the simulator itself."""

    RELEASE_IGNORES_CLAIM = "release-ignores-claim"  # the consumer's release rule never looks at the provider's CLAIM
    DOUBLE_PAY_ON_FAILOVER = "double-pay-on-failover"  # failover starts the answer again instead of continuing it
    OVERPAY_VOUCHER = "overpay-voucher"  # the consumer's vouchers pay for tokens not yet received
    FORGET_KEPT_VOUCHERS = "forget-kept-vouchers"  # a restarted provider drops the vouchers it kept
    NO_ANTI_ENTROPY = "no-anti-entropy"  # replicas never sync: gossip alone, lossy as it is


@dataclass(frozen=True, slots=True)
class FaultProfile:
    """How hostile the simulated world is.

    Network: every message takes ``delay_ms`` (uniform), and with
    ``tail_rate`` ten times that (so gossip reorders). Gossip loses a message
    per receiver with ``gossip_loss`` and delivers it twice with
    ``gossip_dup``; job and sync streams (TCP + yamux) neither lose nor
    reorder, but a crash or a partition cuts them. Up to ``partitions``
    episodes split the nodes in two for ``partition_ms``; up to ``crashes``
    nodes crash at random moments (losing what was not committed) and
    restart after ``down_ms``; up to ``risky_crashes`` more crash inside a
    window where something is not durable yet (entries staged for the next
    group commit, a voucher being written), each such window drawing one
    with ``risky_rate``. Per job: the backend fails or stalls mid-stream with
    ``backend_fault``, the consumer stops paying with ``stop_paying``, the
    user cancels with ``cancel``. ``skew`` scales each node's clock offset
    within half the genesis's ``max_clock_skew_ms`` (so any two nodes stay
    within the bound).
    """

    delay_ms: tuple[int, int]
    tail_rate: float
    gossip_loss: float
    gossip_dup: float
    partitions: int
    partition_ms: tuple[int, int]
    crashes: int
    down_ms: tuple[int, int]
    risky_crashes: int
    risky_rate: float
    backend_fault: float
    stop_paying: float
    cancel: float
    skew: float


PROFILES: dict[FaultLevel, FaultProfile] = {
    FaultLevel.NONE: FaultProfile((1, 5), 0.0, 0.0, 0.0, 0, (0, 0), 0, (0, 0), 0, 0.0, 0.0, 0.0, 0.0, 0.0),
    FaultLevel.LOW: FaultProfile((1, 20), 0.02, 0.02, 0.01, 1, (1_000, 6_000), 1, (500, 5_000), 0, 0.0,
                                 0.05, 0.02, 0.03, 0.5),
    FaultLevel.MEDIUM: FaultProfile((1, 50), 0.05, 0.08, 0.04, 2, (1_000, 12_000), 2, (300, 8_000), 1, 0.01,
                                    0.12, 0.06, 0.05, 1.0),
    FaultLevel.HIGH: FaultProfile((1, 120), 0.10, 0.25, 0.10, 4, (1_000, 20_000), 4, (100, 30_000), 2, 0.02,
                                  0.25, 0.12, 0.08, 1.0),
}

CALM = replace(PROFILES[FaultLevel.NONE], delay_ms=(1, 20))
"""The world after the horizon: everything healed, nothing lost, no new faults."""


@dataclass(frozen=True, slots=True)
class Timing:
    """Simulated timings, in ms (the node's real ones in brackets)."""

    horizon_ms: int = 40_000  # workload and faults happen before this
    workload_ops: tuple[int, int] = (14, 24)  # operations drawn per run
    hold_ms: int = 20_000  # a job's hold lifetime [300 s]
    commit_ms: int = 20  # group commit of gossip applies [20 ms]
    announce_linger_ms: int = 50  # announcements wait this long for company [50 ms]
    sync_interval_ms: int = 4_000  # periodic anti-entropy [10 s]
    fetch_delay_ms: int = 500  # missing entries are fetched after this [0.5 s]
    pull_back_ms: int = 1_000  # one pull-back per peer per this [1 s]
    tick_interval_ms: int = 1_000  # ledger.tick, for entries stamped ahead of our clock [1 s]
    offer_interval_ms: int = 5_000  # provider heartbeat [10 s]
    offer_ttl_ms: int = 15_000  # [30 s]
    early_offer_ms: int = 50  # a slot change is offered this soon [50 ms]
    min_offer_interval_ms: int = 250  # early offers come at most this often [250 ms]
    queue_timeout_ms: int = 20_000  # a job waits this long for a free slot [300 s]
    settle_idle_ms: int = 5_000  # the hold settler looks again at least this often [60 s]
    settle_min_ms: int = 100  # ... and at most this often [0.1 s]
    settle_retry_ms: int = 3_000  # after a refused release or claim [30 s]
    hold_fetch_ms: int = 5_000  # a provider fetches a consumer's chain this long at most [5 s]
    detect_ms: tuple[int, int] = (20, 2_000)  # a cut stream is noticed after this
    keep_ms: tuple[int, int] = (1, 6)  # a voucher's synced write [0.2 ms + queueing]
    chunk_ms: tuple[int, int] = (5, 40)  # between the backend's chunks
    probe_ms: int = 1_000  # quiescence is checked this often after the horizon
    quiesce_extra_ms: int = 30_000  # after the horizon: hold + grace + this, at most


TIMING = Timing()


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One run's knobs besides the seed. ``nodes`` None: 4 or 5, drawn."""

    nodes: int | None = None
    faults: FaultLevel = FaultLevel.MEDIUM
    plant: Plant | None = None
    timing: Timing = TIMING

    def __post_init__(self) -> None:
        if self.nodes is not None and not 2 <= self.nodes <= 12:
            raise ValueError("a simulated network has 2 to 12 nodes")

    @property
    def profile(self) -> FaultProfile:
        return PROFILES[self.faults]

"""A deterministic simulator of a whole p2pgpu network (DESIGN §8).

Many nodes' real decision code (ledger rules and signatures, the wire
codec, sync planning and sessions, the replication policy, the offer
heartbeat's rules, job sessions, ranking, the waitlist, continuation,
settlement) runs in one process over a simulated network,
clock and disks, with faults injected; one seed fixes everything, and a
failure is replayed from its seed (FoundationDB's simulation testing,
TigerBeetle's VOPR). See docs/simulation.md; ``python -m p2pgpu.testing.sim
--help`` (``scripts/sim``) runs it.
"""

from p2pgpu.testing.sim.config import FaultLevel, Plant, SimConfig
from p2pgpu.testing.sim.invariants import Violation
from p2pgpu.testing.sim.simulation import RunResult, run_seed

__all__ = ["FaultLevel", "Plant", "SimConfig", "Violation", "RunResult", "run_seed"]

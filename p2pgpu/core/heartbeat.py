"""Our own offer: when to publish it again, and what it says.

Theory of operation
-------------------
A provider publishes a fresh signed offer every heartbeat (DESIGN §4); the
edge (``p2pgpu.market``) reads Ollama and the GPUs, signs and publishes.
The choices it makes on the way are these functions:

- ``plan_beat``: what to read before signing. Ollama's model list is asked
  for at most about once a heartbeat: an early beat (a slot taken or
  freed) reuses the last list, because asking costs two HTTP calls on the
  loop that is streaming the job that caused the beat; a job that saw
  Ollama fail asks for a fresh one. The GPUs are probed every
  ``hardware_probe_interval_s``.
- ``offer_refusal``: why we offer nothing this beat (Ollama serves no
  models; no GPU and CPU offers not allowed), as the text the node's
  status shows; None when there is something to offer.
- ``slots_free``: the free slots the offer advertises.
- ``next_beat_at``: a heartbeat after this beat, or sooner when a job took
  or freed a slot or the backend failed, so consumers see free slots (and
  a dead Ollama's withdrawal) at once. Early beats are spaced by
  ``min_offer_interval_s``, well inside gossip's per-origin rate limit,
  and wait ``early_offer_delay_s`` so that a job's start and the offer
  that follows do not compete for the loop (the delay also folds one
  job's end and the next one's start into one offer).
- ``book_max_ttl_ms``: the longest offer TTL our book accepts from others.

Pure module: no I/O; times are seconds on the caller's monotonic clock.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HeartbeatConfig", "BeatPlan", "plan_beat", "offer_refusal", "slots_free", "next_beat_at",
           "book_max_ttl_ms"]


@dataclass(frozen=True, slots=True)
class HeartbeatConfig:
    heartbeat_s: float = 10.0
    min_offer_interval_s: float = 0.25  # early re-offers (a slot taken or freed) come at most this often
    early_offer_delay_s: float = 0.05  # ...and this long after the change, off the path of the job's first token
    backend_refresh: float = 0.9  # ask Ollama again once this fraction of a heartbeat has passed
    hardware_probe_interval_s: float = 30.0


@dataclass(frozen=True, slots=True)
class BeatPlan:
    """What to read before this beat's offer is signed."""

    ask_backend: bool  # ask Ollama for its models (else reuse the last list)
    probe_hardware: bool  # probe the GPUs (else reuse the last report)


def plan_beat(config: HeartbeatConfig, now_s: float, *, have_models: bool, asked_at_s: float,
              recheck_backend: bool, have_hardware: bool, probed_at_s: float) -> BeatPlan:
    """``asked_at_s`` / ``probed_at_s``: when the last model list and
    hardware report were read (``-inf``: never); ``recheck_backend``: a job
    saw Ollama fail since."""
    ask = not have_models or recheck_backend or now_s - asked_at_s >= config.backend_refresh * config.heartbeat_s
    probe = not have_hardware or now_s - probed_at_s >= config.hardware_probe_interval_s
    return BeatPlan(ask, probe)


def offer_refusal(*, models: int, gpus: int, offer_cpu: bool, backend_host: str) -> str | None:
    """Why there is no offer to make, or None: ``models`` served by the
    Ollama at ``backend_host``, ``gpus`` found, and whether CPU inference
    may be offered."""
    if not models:
        return f"Ollama at {backend_host} serves no models"
    if not gpus and not offer_cpu:
        return ("no GPU found; to offer CPU inference, restart the node with --offer-cpu "
                "(or offer_cpu = true in its config file)")
    return None


def slots_free(total: int, active: int) -> int:
    """The free slots to advertise: ``total`` less the jobs running now."""
    return max(0, total - active)


def next_beat_at(config: HeartbeatConfig, beat_started_s: float, early_asked_s: float | None = None) -> float:
    """When the beat after the one that began at ``beat_started_s`` is due;
    ``early_asked_s``: when something asked for an early one (None: nothing
    did)."""
    due = beat_started_s + config.heartbeat_s
    if early_asked_s is None:
        return due
    early = max(beat_started_s + config.min_offer_interval_s, early_asked_s + config.early_offer_delay_s)
    return min(due, early)


def book_max_ttl_ms(offer_ttl_s: float) -> int:
    """The longest TTL our offer book accepts: four of our own TTLs, and
    never under two minutes (a network may run a longer TTL than ours)."""
    return max(int(4 * offer_ttl_s * 1000), 120_000)

"""A fuzzer for every decoder and validator that takes bytes or JSON from
outside (docs/fuzzing.md).

The contract under test is the one ``p2pgpu.errors`` states: peer input
that does not decode raises a ``P2PGPUError`` (usually ``MalformedInput``),
never anything else, and a peer cannot make a node spend long on one
message. So each input must return or raise the target's typed error
within a time bound; any other exception, a hang, a crash or a slow input
is a *finding*.

- ``targets``: the decoders (codec, framing, offers and the offer book,
  ledger entries, vouchers, waivers and a replica's ``offer``, job frames,
  requests, receipts and bodies and both job sessions, job params, sync and
  peer-exchange messages, genesis, the local API over ASGI, the gateway's
  four request translators), each with its input maker and checks;
- ``inputs``: generation and mutation, driven by one seeded
  ``random.Random`` (random bytes, msgpack packed canonically or oddly,
  byte-level and structural mutations, JSON values and texts);
- ``corpus``: valid wire objects made with the real constructors, the
  seeds that mutations start from;
- ``engine``: runs chunks of inputs in worker processes, watches for hangs,
  groups findings by signature; input ``i`` of a target under seed ``S`` is
  the same in any process, so every finding replays from (S, target, i);
- ``known``: ``KNOWN_FINDINGS``, reported and not yet fixed, each with its
  reproducer; ``tests/test_fuzz.py`` keeps the list exact;
- ``cli``: ``scripts/fuzz``.

Deterministic and dependency-free on purpose (no atheris, no coverage
feedback): a run is fast, reproducible by seed, and runs anywhere the tests do.
"""

from p2pgpu.testing.fuzz.engine import Finding, Report, TargetStats, input_at, make_target, outcome_of, run
from p2pgpu.testing.fuzz.known import FIXED_FINDINGS, KNOWN_FINDINGS, KNOWN_SIGNATURES, KnownFinding
from p2pgpu.testing.fuzz.targets import TARGETS

__all__ = ["TARGETS", "FIXED_FINDINGS", "KNOWN_FINDINGS", "KNOWN_SIGNATURES", "KnownFinding", "Finding", "Report", "TargetStats",
           "run", "input_at", "make_target", "outcome_of"]

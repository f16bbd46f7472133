"""The error tree of p2pgpu.

One root, ``P2PGPUError``, then families, so callers can catch exactly what
they can handle:

- ``MalformedInput``: bytes or values that do not decode or have the wrong
  shape. Always the remote side's (or the user's) fault; log and drop.
- ``BadSignature``: decodes fine but the signature does not verify.
- ``WrongNetwork``: a signed object made for another network (replay).
- ``LedgerRuleViolation``: a well-formed, well-signed entry that the ledger
  rules refuse (overspend, double receive, late claim...).
- ``InsufficientFunds``: a local request that would overspend.
- ``IdentityError``: key files missing, unreadable or too open.
- ``PeerMisbehaved``: a remote peer broke a protocol.
- ``ExecutionFailed``: the inference backend failed (``QueueTimeout``: no
  provider had a free slot in time).
- ``ConfigError``: configuration (files, flags, environment) the user must
  fix; ``AddressInUse``: a port this node was told to listen on is taken.
- ``UnknownJob``, ``JobStateConflict``: a job id this node does not know, or
  a request its job's state refuses (cancelling a finished job);
  ``AmbiguousJobId`` (a ``MalformedInput``): an id prefix naming several jobs.

The library never raises bare ``ValueError``/``KeyError`` on remote input: edges
translate library exceptions into these once.
"""

from __future__ import annotations


class P2PGPUError(Exception):
    """Root of every error p2pgpu raises on purpose."""


class MalformedInput(P2PGPUError):
    """Input does not decode, or decodes to the wrong shape or types."""


class Oversized(MalformedInput):
    """Input is larger than the hard limit for its kind."""


class Truncated(MalformedInput):
    """Input ends before the object it started is complete."""


class UnknownType(MalformedInput):
    """A type tag or version this node does not understand."""


class NonCanonical(MalformedInput):
    """Bytes decode, but are not the canonical encoding of their value."""


class WrongNetwork(P2PGPUError):
    """A signed object names a network id other than ours."""


class BadSignature(P2PGPUError):
    """The signature does not verify against the claimed signer."""


class LedgerRuleViolation(P2PGPUError):
    """A well-formed, correctly signed entry that the ledger rules refuse."""


class InsufficientFunds(LedgerRuleViolation):
    """Spending more than the spendable balance."""


class IdentityError(P2PGPUError):
    """Key or token files are missing, malformed or readable by others."""


class PeerMisbehaved(P2PGPUError):
    """A remote peer broke a protocol rule."""


class ExecutionFailed(P2PGPUError):
    """The inference backend could not run a job."""


class ConfigError(P2PGPUError):
    """Configuration (files, flags, environment) is invalid."""


class AddressInUse(ConfigError):
    """A port this node was told to listen on is taken (EADDRINUSE); the
    message names the port and the setting that picks another."""


class UnknownJob(P2PGPUError):
    """No job of this node has that id (or id prefix). A node knows only its
    own jobs, as consumer and as provider."""


class AmbiguousJobId(MalformedInput):
    """A job id prefix that matches more than one of this node's jobs."""


class JobStateConflict(P2PGPUError):
    """The job's state does not allow the request (cancelling a job that has
    already ended)."""


class QueueTimeout(ExecutionFailed):
    """A job waited for a free provider slot longer than the node allows."""

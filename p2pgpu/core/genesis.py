"""Genesis: the few facts every node of one network must agree on.

A genesis names the faucet key (the only account allowed to MINT), the initial
allocations, and the ledger's time parameters. Its hash is the *network id*
carried in every signed object, so two networks with different geneses can
never accept each other's entries, offers or vouchers.

The file is JSON so people can read and diff it; the network id is computed
from a canonical msgpack encoding of the parsed values (sorted allocations),
so whitespace or key order in the file does not change the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from p2pgpu.core.codec import MAX_INT, check_int, check_str, object_id, pack
from p2pgpu.core.identity import peer_id_from_public_key, public_key_from_peer_id
from p2pgpu.core.units import BASE_UNITS_PER_COIN  # noqa: F401  (re-exported)
from p2pgpu.errors import ConfigError, MalformedInput

GENESIS_VERSION = 1
MAX_ALLOCATIONS = 10_000


@dataclass(frozen=True, slots=True)
class LedgerParams:
    """Time rules of the ledger (DESIGN §5), fixed per network.

    - ``max_clock_skew_ms``: an entry stamped further ahead of our clock than
      this waits until it is not.
    - ``release_grace_ms``: a consumer whose provider vanished may RELEASE a
      hold on time alone only this long after the hold's expiry.
    - ``max_hold_ms``: longest allowed hold lifetime, so coins cannot be locked
      indefinitely by mistake.
    """

    max_clock_skew_ms: int = 60_000
    release_grace_ms: int = 3_600_000
    max_hold_ms: int = 86_400_000

    def to_list(self) -> list[int]:
        return [self.max_clock_skew_ms, self.release_grace_ms, self.max_hold_ms]


@dataclass(frozen=True, slots=True)
class Genesis:
    name: str
    created_ms: int
    faucet: bytes  # 32-byte public key
    allocations: tuple[tuple[bytes, int], ...] = ()
    params: LedgerParams = field(default_factory=LedgerParams)

    @property
    def network_id(self) -> bytes:
        """BLAKE2b-256 of the canonical encoding: the id of this network."""
        return object_id(
            pack(
                [
                    GENESIS_VERSION,
                    self.name,
                    self.created_ms,
                    self.faucet,
                    [[pk, amount] for pk, amount in sorted(self.allocations)],
                    self.params.to_list(),
                ]
            )
        )

    @property
    def network_tag(self) -> str:
        """Short printable form of the network id (topic names, logs)."""
        return self.network_id[:8].hex()

    def allocation_of(self, public_key: bytes) -> int:
        for pk, amount in self.allocations:
            if pk == public_key:
                return amount
        return 0

    @property
    def total_allocated(self) -> int:
        return sum(amount for _, amount in self.allocations)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": GENESIS_VERSION,
                "name": self.name,
                "created_ms": self.created_ms,
                "faucet": peer_id_from_public_key(self.faucet),
                "allocations": {peer_id_from_public_key(pk): amount for pk, amount in sorted(self.allocations)},
                "params": {
                    "max_clock_skew_ms": self.params.max_clock_skew_ms,
                    "release_grace_ms": self.params.release_grace_ms,
                    "max_hold_ms": self.params.max_hold_ms,
                },
            },
            indent=2,
        ) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Genesis":
        """Parse and validate a genesis file's text; ``ConfigError`` on any fault."""
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # ValueError: JSONDecodeError, huge ints
            raise ConfigError(f"genesis is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(raw, dict):
            raise ConfigError("genesis must be a JSON object")
        try:
            if raw.get("version") != GENESIS_VERSION:
                raise ConfigError(f"unsupported genesis version {raw.get('version')!r}")
            name = check_str(raw.get("name"), "name", 64)
            created_ms = check_int(raw.get("created_ms"), "created_ms")
            faucet = public_key_from_peer_id(check_str(raw.get("faucet"), "faucet", 128))
            allocs_raw = raw.get("allocations", {})
            if not isinstance(allocs_raw, dict) or len(allocs_raw) > MAX_ALLOCATIONS:
                raise ConfigError("allocations must be an object of at most 10000 peer ids")
            allocations = []
            for peer_id, amount in allocs_raw.items():
                allocations.append(
                    (public_key_from_peer_id(peer_id), check_int(amount, f"allocation of {peer_id}", 1, MAX_INT // MAX_ALLOCATIONS))
                )
            params_raw = raw.get("params", {})
            if not isinstance(params_raw, dict):
                raise ConfigError("params must be an object")
            defaults = LedgerParams()
            params = LedgerParams(
                max_clock_skew_ms=check_int(params_raw.get("max_clock_skew_ms", defaults.max_clock_skew_ms), "max_clock_skew_ms", 0, 86_400_000),
                release_grace_ms=check_int(params_raw.get("release_grace_ms", defaults.release_grace_ms), "release_grace_ms", 0, 30 * 86_400_000),
                max_hold_ms=check_int(params_raw.get("max_hold_ms", defaults.max_hold_ms), "max_hold_ms", 1, 30 * 86_400_000),
            )
        except MalformedInput as exc:
            raise ConfigError(f"genesis: {exc}") from exc
        return cls(name=name, created_ms=created_ms, faucet=faucet, allocations=tuple(sorted(allocations)), params=params)

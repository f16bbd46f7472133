"""Node identity: one ed25519 key is the libp2p identity, the ledger account
and the signer of every offer and voucher.

The account address is the libp2p peer id (``12D3KooW...``): the base58btc
encoding of an *identity* multihash over the protobuf-encoded public key. For
ed25519 the protobuf is fixed-shape (``08 01 12 20`` + 32 key bytes), so the
public key can be read back out of the peer id and a signature checked from the
peer id alone, with no lookup.

Inside signed objects accounts travel as the raw 32-byte public key (compact,
fixed width); ``peer_id_from_public_key`` renders them for people.
"""

from __future__ import annotations

import base58
import nacl.bindings
import nacl.exceptions

from p2pgpu.errors import BadSignature, MalformedInput

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
SEED_SIZE = 32

# protobuf PublicKey{Type: Ed25519 (1), Data: <32 bytes>} behind an identity
# multihash (code 0x00, length 0x24 = 36).
_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id string of an ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise MalformedInput(f"an ed25519 public key is 32 bytes, got {len(public_key)}")
    return base58.b58encode(_PEER_ID_PREFIX + public_key).decode("ascii")


MAX_PEER_ID_CHARS = 64


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Inverse of ``peer_id_from_public_key``; rejects anything but ed25519 ids."""
    # An ed25519 peer id is 52 characters; base58 decoding takes time
    # quadratic in the length, so anything long is refused before it.
    if not isinstance(peer_id, str) or len(peer_id) > MAX_PEER_ID_CHARS:
        raise MalformedInput(f"not a peer id: {str(peer_id)[:60]!r} is longer than {MAX_PEER_ID_CHARS} characters"
                             if isinstance(peer_id, str) else "a peer id must be a string")
    try:
        raw = base58.b58decode(peer_id)
    except (ValueError, TypeError) as exc:
        raise MalformedInput(f"not a base58 peer id: {peer_id!r}") from exc
    if len(raw) != len(_PEER_ID_PREFIX) + PUBLIC_KEY_SIZE or not raw.startswith(_PEER_ID_PREFIX):
        raise MalformedInput(f"not an ed25519 peer id: {peer_id!r}")
    return raw[len(_PEER_ID_PREFIX):]


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise ``BadSignature`` unless ``signature`` is ``public_key``'s over ``message``."""
    if len(signature) != SIGNATURE_SIZE or len(public_key) != PUBLIC_KEY_SIZE:
        raise BadSignature("signature or public key has the wrong length")
    try:
        nacl.bindings.crypto_sign_open(signature + message, public_key)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as exc:
        raise BadSignature("signature does not verify") from exc


class NodeKey:
    """An ed25519 signing key, held as its 32-byte seed.

    The seed is what the key file stores; the libp2p host is built from the
    same seed (``p2pgpu.net`` wraps it), so the host's peer id and
    ``self.peer_id`` are the same string.
    """

    __slots__ = ("seed", "public_key", "_secret", "peer_id")

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != SEED_SIZE:
            raise MalformedInput("an ed25519 seed is 32 bytes")
        self.seed = seed
        self.public_key, self._secret = nacl.bindings.crypto_sign_seed_keypair(seed)
        self.peer_id = peer_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> "NodeKey":
        return cls(nacl.bindings.randombytes(SEED_SIZE))

    def sign(self, message: bytes) -> bytes:
        """Detached 64-byte signature over ``message``."""
        return nacl.bindings.crypto_sign(message, self._secret)[:SIGNATURE_SIZE]

    def __repr__(self) -> str:  # never print the seed
        return f"NodeKey({self.peer_id})"

"""Keys, signatures, key agreement and authenticated encryption for secure aggregation.

Everything is `cryptography` (X25519, Ed25519, HKDF-SHA256, AES-256-GCM) on raw byte
encodings, so keys travel in protobuf `bytes` fields and Shamir shares hold them whole.
Every derived key and every signed or authenticated message carries a domain-separation
tag, so one kind of value can never be taken for another.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "KEY_BYTES",
    "SEAL_OVERHEAD",
    "KeyPair",
    "agree",
    "identity_keypair",
    "new_x25519",
    "open_sealed",
    "round_keys_message",
    "seal",
    "session_id",
    "share_associated_data",
    "sign",
    "verify",
    "x25519_public_of",
]

KEY_BYTES = 32
_RAW = serialization.Encoding.Raw
_NONCE = 12
_GCM_TAG = 16
SEAL_OVERHEAD = _NONCE + _GCM_TAG
"""What `seal` adds to a plaintext: the nonce in front, the authentication tag behind."""
_TAG = b"fedlora/secagg/"


@dataclass(frozen=True)
class KeyPair:
    """Raw 32-byte encodings of a private key and its public key."""

    private: bytes
    public: bytes


def _raw_private(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def new_x25519(random_source: Callable[[int], bytes] | None = None) -> KeyPair:
    """A fresh X25519 pair for one round; from `random_source(32)` if given (X25519 clamps any 32 bytes)."""
    if random_source is None:
        key = X25519PrivateKey.generate()
    else:
        key = X25519PrivateKey.from_private_bytes(random_source(KEY_BYTES))
    return KeyPair(_raw_private(key), key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def x25519_public_of(private: bytes) -> bytes:
    """The public key of a raw private key: checks a Shamir-reconstructed key against its advertisement."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def identity_keypair() -> KeyPair:
    """A long-term Ed25519 identity: the public half goes on the consortium's allow-list."""
    key = Ed25519PrivateKey.generate()
    return KeyPair(_raw_private(key), key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def sign(identity_private: bytes, message: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(identity_private).sign(message)


def verify(identity_public: bytes, message: bytes, signature: bytes) -> bool:
    """False for a bad signature or a malformed key: callers branch on it, never on an exception."""
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _frame(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: two different tuples never encode the same bytes."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _round(round_: int) -> bytes:
    if not 0 <= round_ < 2**64:
        raise ValueError(f"a round is a 64-bit unsigned integer, got {round_}")
    return round_.to_bytes(8, "big")


def round_keys_message(
    worker_id: str, run_id: str, round_: int, mask_public: bytes, enc_public: bytes, seed_commitment: bytes
) -> bytes:
    """What a worker signs: its id, the run and round attempt, both public keys and its self-seed commitment
    (so none can be swapped)."""
    return _frame(
        _TAG + b"keys/v2", worker_id.encode(), run_id.encode(), _round(round_), mask_public, enc_public, seed_commitment
    )


def seed_commitment(seed: bytes) -> bytes:
    """What a worker publishes of its self-mask seed: enough to check a reconstruction, nothing to unmask with."""
    return hashlib.sha256(_TAG + b"seed/v1" + seed).digest()


def session_id(run_id: str, round_: int, advertised: Mapping[str, tuple[bytes, bytes]]) -> bytes:
    """SHA-256 binding shares and masks to this exact set of advertised keys in this round attempt."""
    parts = [_TAG + b"session/v1", run_id.encode(), _round(round_), len(advertised).to_bytes(4, "big")]
    for worker in sorted(advertised):
        mask_public, enc_public = advertised[worker]
        parts += [worker.encode(), mask_public, enc_public]
    return hashlib.sha256(_frame(*parts)).digest()


def agree(private: bytes, peer_public: bytes, *, session: bytes, purpose: bytes) -> bytes:
    """X25519, then HKDF-SHA256 salted with the session: a 32-byte key for one purpose (b"mask", b"shares")."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session, info=_TAG + purpose).derive(shared)


def share_associated_data(sender: str, recipient: str, round_: int, session: bytes) -> bytes:
    """Binds a sealed share to who sent it, to whom, in which round and session: no replay or redirect."""
    return _frame(_TAG + b"share/v1", sender.encode(), recipient.encode(), _round(round_), session)


def seal(
    key: bytes, plaintext: bytes, *, associated_data: bytes, random_bytes: Callable[[int], bytes] = os.urandom
) -> bytes:
    """AES-256-GCM under a fresh random 12-byte nonce, which is prefixed to the ciphertext."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"an AES-256-GCM key is {KEY_BYTES} bytes, got {len(key)}")
    nonce = random_bytes(_NONCE)
    if len(nonce) != _NONCE:
        raise ValueError(f"random_bytes returned {len(nonce)} bytes, asked for {_NONCE}")
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, *, associated_data: bytes) -> bytes:
    """Decrypt and authenticate; ValueError if anything (key, nonce, data, associated data) differs."""
    if len(key) != KEY_BYTES or len(sealed) < _NONCE:
        raise ValueError("sealed share failed authentication")
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE], sealed[_NONCE:], associated_data)
    except (InvalidTag, ValueError):
        raise ValueError("sealed share failed authentication") from None

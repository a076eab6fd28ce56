"""Keys, signatures, key agreement and authenticated encryption for secure aggregation (`cryptography`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
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

_RAW = serialization.Encoding.Raw
_NONCE = 12


@dataclass(frozen=True)
class KeyPair:
    private: bytes
    public: bytes


def _raw_private(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def new_x25519() -> KeyPair:
    key = X25519PrivateKey.generate()
    return KeyPair(_raw_private(key), key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def x25519_public_of(private: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def identity_keypair() -> KeyPair:
    """A long-term Ed25519 identity: the public half goes on the consortium's allow-list."""
    key = Ed25519PrivateKey.generate()
    return KeyPair(_raw_private(key), key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def sign(identity_private: bytes, message: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(identity_private).sign(message)


def verify(identity_public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _frame(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two different tuples encode the same."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def round_keys_message(worker_id: str, run_id: str, round_: int, mask_public: bytes, enc_public: bytes) -> bytes:
    """What a worker signs: its id, the run and round attempt, and both public keys."""
    return _frame(b"fedlora/secagg/keys/v1", worker_id.encode(), run_id.encode(), round_.to_bytes(8, "big"),
                  mask_public, enc_public)


def session_id(run_id: str, round_: int, advertised: Mapping[str, tuple[bytes, bytes]]) -> bytes:
    """Binds shares and masks to this exact set of advertised keys in this round attempt."""
    parts = [b"fedlora/secagg/session/v1", run_id.encode(), round_.to_bytes(8, "big")]
    for worker in sorted(advertised):
        mask_public, enc_public = advertised[worker]
        parts += [worker.encode(), mask_public, enc_public]
    return hashlib.sha256(_frame(*parts)).digest()


def agree(private: bytes, peer_public: bytes, *, session: bytes, purpose: bytes) -> bytes:
    """X25519, then HKDF-SHA256 salted with the session: a 32-byte key for one purpose."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=session, info=b"fedlora/secagg/" + purpose).derive(shared)


def share_associated_data(sender: str, recipient: str, round_: int, session: bytes) -> bytes:
    return _frame(b"fedlora/secagg/share/v1", sender.encode(), recipient.encode(), round_.to_bytes(8, "big"), session)


def seal(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, *, associated_data: bytes) -> bytes:
    """Decrypt and authenticate; ValueError if anything (key, nonce, data, associated data) differs."""
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE], sealed[_NONCE:], associated_data)
    except (InvalidTag, ValueError):
        raise ValueError("sealed share failed authentication") from None

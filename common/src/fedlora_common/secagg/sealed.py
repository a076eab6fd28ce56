"""A sealed share: what a sender deals one recipient, the two Shamir shares of its secrets under AES-256-GCM.

Worker and coordinator speak of the same object: the sender seals, the recipient opens, and the
coordinator checks its form where it arrives (`SEALED_SHARE_BYTES`) and, when a recipient shows
its decryption key, opens it itself to decide whose fault an unopenable share is.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from fedlora_common.secagg.crypto import SEAL_OVERHEAD, open_sealed, seal
from fedlora_common.secagg.shamir import SHARE_BYTES, Share

__all__ = ["SEALED_SHARE_BYTES", "open_share_pair", "seal_share_pair"]

SEALED_SHARE_BYTES = SEAL_OVERHEAD + 2 * SHARE_BYTES
"""Every sealed share has exactly this length: nonce, the self-seed share, the mask-key share, the tag."""


def seal_share_pair(
    key: bytes,
    seed_share: Share,
    key_share: Share,
    *,
    associated_data: bytes,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> bytes:
    return seal(
        key, seed_share.to_bytes() + key_share.to_bytes(), associated_data=associated_data, random_bytes=random_bytes
    )


def open_share_pair(key: bytes, sealed: bytes, *, associated_data: bytes) -> tuple[Share, Share]:
    """(self-seed share, mask-key share); ValueError if it does not authenticate or does not hold two shares."""
    if len(sealed) != SEALED_SHARE_BYTES:
        raise ValueError(f"a sealed share is {SEALED_SHARE_BYTES} bytes, got {len(sealed)}")
    plain = open_sealed(key, sealed, associated_data=associated_data)
    return Share.from_bytes(plain[:SHARE_BYTES]), Share.from_bytes(plain[SHARE_BYTES:])

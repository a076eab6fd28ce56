"""Shamir t-of-n secret sharing over the prime field p = 2**521 - 1, which holds a 64-byte secret whole.

Any t shares give the secret back; any t-1 are consistent with every secret (information-
theoretic hiding). Coefficients come from the `random_bytes` source passed in (os.urandom).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["PRIME", "Share", "combine_shares", "split_secret"]

PRIME = 2**521 - 1
MAX_SECRET_BYTES = 64
_Y_BYTES = 66


@dataclass(frozen=True)
class Share:
    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(2, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != 2 + _Y_BYTES:
            raise ValueError(f"a share is {2 + _Y_BYTES} bytes, got {len(data)}")
        share = cls(int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big"))
        if share.x == 0 or share.y >= PRIME:
            raise ValueError("not a share of this field")
        return share


def _encode(secret: bytes) -> int:
    """Length-prefixed, so leading zero bytes survive the round trip through an integer."""
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"secrets are at most {MAX_SECRET_BYTES} bytes")
    return int.from_bytes(bytes([len(secret)]) + secret, "big")


def _decode(value: int) -> bytes:
    raw = value.to_bytes(MAX_SECRET_BYTES + 1, "big").lstrip(b"\0")
    if not raw or raw[0] != len(raw) - 1:
        raise ValueError("the shares do not reconstruct a secret (inconsistent or too few)")
    return raw[1:]


def split_secret(
    secret: bytes, *, threshold: int, shares: int, random_bytes: Callable[[int], bytes] = os.urandom
) -> list[Share]:
    if not 1 <= threshold <= shares < 2**16:
        raise ValueError(f"need 1 <= threshold ({threshold}) <= shares ({shares}) < 65536")
    coefficients = [_encode(secret)] + [
        int.from_bytes(random_bytes(_Y_BYTES), "big") % PRIME for _ in range(threshold - 1)
    ]
    out = []
    for x in range(1, shares + 1):
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        out.append(Share(x, y))
    return out


def combine_shares(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Lagrange interpolation at 0 over the first `threshold` shares."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares; {threshold} are needed")
    used = list(shares)[:threshold]
    xs = [s.x for s in used]
    if len(set(xs)) != len(xs):
        raise ValueError("two shares have the same x")
    secret = 0
    for i, share in enumerate(used):
        numerator, denominator = 1, 1
        for j, x in enumerate(xs):
            if i != j:
                numerator = numerator * -x % PRIME
                denominator = denominator * (share.x - x) % PRIME
        secret = (secret + share.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    return _decode(secret)

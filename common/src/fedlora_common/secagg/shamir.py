"""Shamir t-of-n secret sharing over the prime field p = 2**521 - 1.

The field is large enough to hold a 32-byte seed or X25519 key (up to 64 bytes) whole, so a
secret is never split into pieces or truncated. Any `threshold` shares give the secret back;
any fewer are consistent with every secret (information-theoretic hiding). Coefficients are
drawn from the `random_bytes` source passed in, never from a global generator.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_SECRET_BYTES",
    "PRIME",
    "SHARE_BYTES",
    "Share",
    "combine_shares",
    "consistent",
    "inconsistent_shares",
    "split_secret",
]

PRIME = 2**521 - 1
MAX_SECRET_BYTES = 64
_X_BYTES = 2
_Y_BYTES = 66  # ceil(521 / 8)
SHARE_BYTES = _X_BYTES + _Y_BYTES
_MAX_SHARES = 2**16 - 1  # x = 1..n must fit the 2-byte x on the wire


@dataclass(frozen=True)
class Share:
    """One point (x, y) of the sharing polynomial; x = 1..n, never 0 (that point is the secret)."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        """Fixed width (2-byte x, 66-byte y, big-endian) so shares concatenate without framing."""
        return self.x.to_bytes(_X_BYTES, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) != SHARE_BYTES:
            raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        share = cls(int.from_bytes(data[:_X_BYTES], "big"), int.from_bytes(data[_X_BYTES:], "big"))
        _check_share(share)
        return share


def _check_share(share: Share) -> None:
    if not 1 <= share.x <= _MAX_SHARES or not 0 <= share.y < PRIME:
        raise ValueError(f"not a share of this field (x={share.x})")


def _encode(secret: bytes) -> int:
    """Length byte, then the secret right-aligned in 64 bytes: leading zero bytes (and b"") survive."""
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"secrets are at most {MAX_SECRET_BYTES} bytes, got {len(secret)}")
    return int.from_bytes(bytes([len(secret)]) + secret.rjust(MAX_SECRET_BYTES, b"\0"), "big")


def _decode(value: int) -> bytes:
    """Inverse of `_encode`; anything else means inconsistent shares, which must not pass silently."""
    if value >= 1 << (8 * (MAX_SECRET_BYTES + 1)):
        raise ValueError("the shares do not reconstruct a secret (inconsistent shares)")
    raw = value.to_bytes(MAX_SECRET_BYTES + 1, "big")
    length, body = raw[0], raw[1:]
    if length > MAX_SECRET_BYTES or any(body[: MAX_SECRET_BYTES - length]):
        raise ValueError("the shares do not reconstruct a secret (inconsistent shares)")
    return body[MAX_SECRET_BYTES - length :]


def _field_element(random_bytes: Callable[[int], bytes]) -> int:
    """Uniform in [0, p) by rejection: 521 random bits, retried when >= p (probability 2**-521)."""
    while True:
        draw = random_bytes(_Y_BYTES)
        if len(draw) != _Y_BYTES:
            raise ValueError(f"random_bytes returned {len(draw)} bytes, asked for {_Y_BYTES}")
        value = int.from_bytes(draw, "big") & PRIME  # PRIME is 521 one-bits: a mask
        if value < PRIME:
            return value


def split_secret(
    secret: bytes, *, threshold: int, shares: int, random_bytes: Callable[[int], bytes] = os.urandom
) -> list[Share]:
    """Evaluate a random polynomial of degree threshold - 1 with constant term `secret` at x = 1..shares."""
    if not 1 <= threshold <= shares <= _MAX_SHARES:
        raise ValueError(f"need 1 <= threshold ({threshold}) <= shares ({shares}) < {_MAX_SHARES + 1}")
    coefficients = [_encode(secret)] + [_field_element(random_bytes) for _ in range(threshold - 1)]
    out = []
    for x in range(1, shares + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        out.append(Share(x, y))
    return out


def combine_shares(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Lagrange interpolation at 0 over the first `threshold` shares; any `threshold` distinct ones do."""
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, got {threshold}")
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares; {threshold} are needed")
    for share in shares:
        _check_share(share)
    if len({s.x for s in shares}) != len(shares):
        raise ValueError("two shares have the same x")
    return _decode(_interpolate(shares[:threshold], 0))


def _interpolate(points: Sequence[Share], x: int) -> int:
    """The value at x of the polynomial of degree len(points) - 1 through `points`."""
    value = 0
    for i, share in enumerate(points):
        numerator, denominator = 1, 1
        for j, other in enumerate(points):
            if i != j:
                numerator = numerator * (x - other.x) % PRIME
                denominator = denominator * (share.x - other.x) % PRIME
        value = (value + share.y * numerator * pow(denominator, -1, PRIME)) % PRIME
    return value


def consistent(shares: Sequence[Share], *, threshold: int) -> bool:
    """Whether all shares lie on one polynomial of degree threshold - 1 (any `threshold` of them agree)."""
    base = shares[:threshold]
    return all(_interpolate(base, share.x) == share.y for share in shares[threshold:])


def inconsistent_shares(shares: Sequence[Share], *, threshold: int) -> list[int]:
    """Indices of the shares that disagree with all others, when that can be told.

    With at least threshold + 2 shares and a single bad one, leaving the bad one out is the only
    way to make the rest consistent. Returns [] when the shares are consistent or when no single
    share can be singled out (too few shares, or several bad ones).
    """
    if len(shares) < threshold + 2 or consistent(shares, threshold=threshold):
        return []
    culprits = [i for i in range(len(shares)) if consistent([*shares[:i], *shares[i + 1 :]], threshold=threshold)]
    return culprits if len(culprits) == 1 else []

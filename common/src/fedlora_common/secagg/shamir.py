"""Shamir t-of-n secret sharing over the prime field p = 2**521 - 1.

The field is large enough to hold a 32-byte seed or X25519 key (up to 64 bytes) whole, so a
secret is never split into pieces or truncated. Any `threshold` shares give the secret back;
any fewer are consistent with every secret (information-theoretic hiding). Coefficients are
drawn from the `random_bytes` source passed in, never from a global generator.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_SECRET_BYTES",
    "MAX_SUBSETS",
    "PRIME",
    "SHARE_BYTES",
    "Recovered",
    "Share",
    "combine_shares",
    "consistent",
    "recover_secret",
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
    _check_distinct(shares, threshold)
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


@dataclass(frozen=True)
class Recovered:
    """A secret reconstructed from revealed shares, and which of those shares lie off its polynomial."""

    secret: bytes
    off_polynomial: tuple[int, ...]
    """Indices (into the shares given) of the shares that disagree with the secret's polynomial."""


MAX_SUBSETS = 512
"""How many `threshold`-subsets `recover_secret` tries after decoding: enough for every federation of up
to a dozen revealers, a bounded cost (each try is one interpolation) for larger ones."""


def recover_secret(
    shares: Sequence[Share], *, threshold: int, valid: Callable[[bytes], bool], max_subsets: int = MAX_SUBSETS
) -> Recovered:
    """The secret `valid` accepts, from any `threshold` shares that agree on it, and who disagrees.

    `valid` checks a candidate against what its owner committed to (a seed's hash, a key's public
    half), so a lying share can never pass off another secret. Candidates, in order: the first
    `threshold` shares; Berlekamp-Welch decoding, which corrects up to (n - t) // 2 lying shares
    however many revealers there are; then subsets of `threshold` shares (up to `max_subsets`), which
    find the secret even when only t honest shares remain. ValueError when no candidate is valid:
    too many shares lie, or the owner dealt shares of another secret.
    """
    _check_distinct(shares, threshold)
    for points in _candidates(shares, threshold, max_subsets):
        try:
            secret = _decode(_interpolate(points, 0))
        except ValueError:
            continue
        if valid(secret):
            off = tuple(i for i, share in enumerate(shares) if _interpolate(points, share.x) != share.y)
            return Recovered(secret, off)
    raise ValueError(f"no {threshold} of the {len(shares)} shares reconstruct a valid secret")


def _check_distinct(shares: Sequence[Share], threshold: int) -> None:
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, got {threshold}")
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares; {threshold} are needed")
    for share in shares:
        _check_share(share)
    if len({s.x for s in shares}) != len(shares):
        raise ValueError("two shares have the same x")


def _candidates(shares: Sequence[Share], threshold: int, max_subsets: int) -> Iterator[Sequence[Share]]:
    """Sets of `threshold` shares, each fixing one candidate polynomial."""
    yield shares[:threshold]
    errors = (len(shares) - threshold) // 2
    if errors:
        agreeing = _berlekamp_welch(shares, threshold, errors)
        if agreeing is not None:
            yield [shares[i] for i in agreeing[:threshold]]
    yield from itertools.islice(itertools.combinations(shares, threshold), 1, max_subsets + 1)


def _berlekamp_welch(shares: Sequence[Share], threshold: int, errors: int) -> list[int] | None:
    """Indices of the shares on the polynomial of degree < threshold that all but `errors` of them lie on.

    Solves Q(x_i) = y_i E(x_i) for Q of degree < threshold + errors and a monic error locator E of
    degree `errors`; then P = Q / E. None when no such polynomial exists (more shares lie).
    """
    width = threshold + 2 * errors
    rows: list[list[int]] = []
    for share in shares:
        powers = [pow(share.x, k, PRIME) for k in range(threshold + errors)]
        locator = [(-share.y * powers[k]) % PRIME for k in range(errors)]
        rows.append([*powers, *locator, share.y * powers[errors] % PRIME])
    solution = _solve(rows, width)
    if solution is None:
        return None
    q, e = solution[: threshold + errors], [*solution[threshold + errors :], 1]
    p, remainder = _divide(q, e)
    if any(remainder):
        return None
    agreeing = [i for i, share in enumerate(shares) if _horner(p, share.x) == share.y]
    return agreeing if len(agreeing) >= max(threshold, len(shares) - errors) else None


def _solve(rows: list[list[int]], width: int) -> list[int] | None:
    """One solution of the augmented system `rows` (each `width` coefficients, then the constant) mod PRIME;
    free unknowns are 0. None when the system is inconsistent."""
    rows = [row[:] for row in rows]
    pivots: list[int] = []
    rank = 0
    for column in range(width):
        pivot = next((r for r in range(rank, len(rows)) if rows[r][column]), None)
        if pivot is None:
            continue
        rows[rank], rows[pivot] = rows[pivot], rows[rank]
        inverse = pow(rows[rank][column], -1, PRIME)
        rows[rank] = [v * inverse % PRIME for v in rows[rank]]
        for r in range(len(rows)):
            if r != rank and rows[r][column]:
                factor = rows[r][column]
                rows[r] = [(a - factor * b) % PRIME for a, b in zip(rows[r], rows[rank], strict=True)]
        pivots.append(column)
        rank += 1
    if any(row[width] for row in rows[rank:]):
        return None
    solution = [0] * width
    for r, column in enumerate(pivots):
        solution[column] = rows[r][width]
    return solution


def _divide(numerator: list[int], denominator: list[int]) -> tuple[list[int], list[int]]:
    """Polynomial long division mod PRIME over coefficient lists, lowest degree first (denominator monic)."""
    remainder = numerator[:]
    quotient = [0] * max(1, len(numerator) - len(denominator) + 1)
    for k in range(len(numerator) - len(denominator), -1, -1):
        coefficient = remainder[k + len(denominator) - 1]
        quotient[k] = coefficient
        for j, d in enumerate(denominator):
            remainder[k + j] = (remainder[k + j] - coefficient * d) % PRIME
    return quotient, remainder[: len(denominator) - 1]


def _horner(coefficients: Sequence[int], x: int) -> int:
    value = 0
    for c in reversed(coefficients):
        value = (value * x + c) % PRIME
    return value

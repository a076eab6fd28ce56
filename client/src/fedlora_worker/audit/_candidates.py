"""Random secrets of the same format as a true one, the reference set R of the exposure metric."""

from __future__ import annotations

import string

import numpy as np

__all__ = ["candidate_space", "random_candidates"]


def _randomized(char: str, letters: bool) -> str | None:
    """The alphabet ``char`` is drawn from in a candidate, or None if it is kept."""
    if char.isascii() and char.isdigit():
        return string.digits
    if letters and char.isascii() and char.isupper():
        return string.ascii_uppercase
    if letters and char.isascii() and char.islower():
        return string.ascii_lowercase
    return None


def candidate_space(secret: str, *, letters: bool = False) -> int:
    """How many distinct values share ``secret``'s format (the secret included)."""
    size = 1
    for char in secret:
        alphabet = _randomized(char, letters)
        size *= len(alphabet) if alphabet else 1
    return size


def random_candidates(secret: str, count: int, rng: np.random.Generator, *, letters: bool = False) -> list[str]:
    """``count`` distinct values of ``secret``'s format, all different from it.

    Digits become random digits; with ``letters``, ASCII letters become random letters of the same
    case; every other character is kept. Letters are kept by default because in record numbers they
    are the template's fixed prefix ("MRN-"), not secret: randomizing them would let the format
    alone rank the true value first.
    """
    if count < 0:
        raise ValueError(f"count: must be >= 0, got {count}")
    if count > candidate_space(secret, letters=letters) - 1:
        raise ValueError(
            f"count: the format of the secret allows only {candidate_space(secret, letters=letters) - 1} others, got {count}"
        )
    alphabets = [_randomized(char, letters) for char in secret]
    chosen: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        value = "".join(
            char if alphabet is None else alphabet[rng.integers(len(alphabet))]
            for char, alphabet in zip(secret, alphabets, strict=True)
        )
        if value != secret and value not in chosen:
            chosen.add(value)
            out.append(value)
    return out

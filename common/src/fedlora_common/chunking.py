"""Splitting payloads into wire chunks and checking them whole, without copying the payload."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

__all__ = ["DEFAULT_CHUNK_BYTES", "as_bytes", "chunk_count", "iter_chunks", "sha256"]

DEFAULT_CHUNK_BYTES = 2**20


def chunk_count(total_bytes: int, chunk_bytes: int) -> int:
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    return -(-total_bytes // chunk_bytes)


def iter_chunks(payload: bytes | bytearray | memoryview, chunk_bytes: int) -> Iterator[memoryview]:
    """Zero-copy views of consecutive slices of at most chunk_bytes."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    view = memoryview(payload).cast("B")
    for start in range(0, len(view), chunk_bytes):
        yield view[start : start + chunk_bytes]


def sha256(payload: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(payload).digest()


def as_bytes(vector: npt.NDArray[np.generic]) -> memoryview:
    """The raw bytes of a contiguous array, as a view (no copy)."""
    return np.ascontiguousarray(vector).reshape(-1).view(np.uint8).data

"""Masks from an AES-256-CTR keystream, added in Z_2^32 with numpy's wrapping uint32.

A keystream is addressable by element offset, so masks apply slice by slice to a vector
that is streamed, and pairwise masks of workers i and j cancel exactly in the sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["keystream_u32", "mask_vector", "pairwise_sign", "unmask_sum"]

_BLOCK = 16
_SLICE_BYTES = 1 << 20


def keystream_u32(seed: bytes, count: int, *, offset: int = 0) -> npt.NDArray[np.uint32]:
    """Elements [offset, offset + count) of the AES-256-CTR keystream of `seed`, as little-endian uint32."""
    if len(seed) != 32:
        raise ValueError("a mask seed is exactly 32 bytes")
    if count < 0 or offset < 0:
        raise ValueError("count and offset must be non-negative")
    first_byte = offset * 4
    block, skip = divmod(first_byte, _BLOCK)
    counter = block.to_bytes(_BLOCK, "big")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()
    total = skip + count * 4
    buffer = bytearray(total + _BLOCK - 1)
    view = memoryview(buffer)
    zeros = memoryview(bytes(min(_SLICE_BYTES, total) or 1))
    done = 0
    while done < total:
        n = min(_SLICE_BYTES, total - done)
        encryptor.update_into(zeros[:n], view[done : done + n + _BLOCK - 1])
        done += n
    return np.frombuffer(buffer, dtype="<u4", count=count, offset=skip).astype(np.uint32)


def pairwise_sign(me: int, peer: int) -> int:
    """+1 towards higher-numbered peers, -1 towards lower: the pair's masks cancel."""
    if me == peer:
        raise ValueError("no pairwise mask with oneself")
    return 1 if me < peer else -1


def mask_vector(
    values: npt.NDArray[np.uint32],
    *,
    self_seed: bytes,
    pairwise: Sequence[tuple[bytes, int]],
    offset: int = 0,
) -> npt.NDArray[np.uint32]:
    """values + PRG(self_seed) + sum(sign * PRG(seed)) mod 2**32, for the slice starting at `offset`."""
    out = values.astype(np.uint32, copy=True)
    out += keystream_u32(self_seed, out.size, offset=offset)
    for seed, sign in pairwise:
        stream = keystream_u32(seed, out.size, offset=offset)
        if sign > 0:
            out += stream
        else:
            out -= stream
    return out


def unmask_sum(
    total: npt.NDArray[np.uint32],
    *,
    self_seeds: Sequence[bytes],
    dropped_pairwise: Sequence[tuple[bytes, int]],
    offset: int = 0,
) -> npt.NDArray[np.uint32]:
    """Remove survivors' self masks and the pairwise masks they added towards dropped peers."""
    out = total.astype(np.uint32, copy=True)
    for seed in self_seeds:
        out -= keystream_u32(seed, out.size, offset=offset)
    for seed, sign in dropped_pairwise:
        stream = keystream_u32(seed, out.size, offset=offset)
        if sign > 0:
            out -= stream
        else:
            out += stream
    return out

"""Masks from an AES-256-CTR keystream, added in Z_2^32 with numpy's wrapping uint32.

The keystream is the PRG of Bonawitz et al.: a 32-byte seed is the AES-256 key, the counter
starts at the all-zero block, and the bytes are read as little-endian uint32. It is
addressable by element offset, so masks apply slice by slice to a vector that is streamed,
and pairwise masks of workers i and j (same seed, opposite signs) cancel exactly in the sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

__all__ = ["SEED_BYTES", "keystream_u32", "mask_vector", "pairwise_sign", "unmask_sum"]

SEED_BYTES = 32
_BLOCK = 16
_WORD = 4
_SLICE_BYTES = 1 << 20  # per update_into call; OpenSSL runs at GB/s on slices this size
_CHUNK = 1 << 16  # elements masked per pass (256 KiB): the output chunk stays in cache across seeds
_SLACK = (_BLOCK - 1 + _WORD - 1) // _WORD  # cryptography < 43 wants len(out) >= len(in) + 15
_MAX_BYTES = 1 << 132  # 2**128 blocks of 16 bytes; past that the counter would wrap


def _encryptor(seed: bytes, offset: int, count: int) -> CipherContext:
    """A CTR encryptor positioned at element `offset`: counter block offset*4 // 16, then skip the rest."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is exactly {SEED_BYTES} bytes, got {len(seed)}")
    if count < 0 or offset < 0:
        raise ValueError(f"count and offset must be non-negative, got {count} and {offset}")
    if (offset + count) * _WORD > _MAX_BYTES:
        raise ValueError("the keystream is 2**130 elements long")
    block, skip = divmod(offset * _WORD, _BLOCK)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(block.to_bytes(_BLOCK, "big"))).encryptor()
    if skip:
        encryptor.update(bytes(skip))
    return encryptor


def _fill(encryptor: CipherContext, out: memoryview, zeros: memoryview) -> None:
    """Write the next len(out) - slack keystream bytes into `out` (bytes), one slice at a time."""
    total = len(out) - _SLACK * _WORD
    done = 0
    while done < total:
        n = min(len(zeros), total - done)
        encryptor.update_into(zeros[:n], out[done : done + n + _SLACK * _WORD])
        done += n


def _scratch(count: int) -> tuple[npt.NDArray[np.uint32], memoryview]:
    """A little-endian uint32 buffer with the slack `update_into` needs, and a byte view of it."""
    buffer: npt.NDArray[np.uint32] = np.empty(count + _SLACK, dtype="<u4")
    return buffer, buffer.data.cast("B")


def keystream_u32(seed: bytes, count: int, *, offset: int = 0) -> npt.NDArray[np.uint32]:
    """Elements [offset, offset + count) of the AES-256-CTR keystream of `seed`, as little-endian uint32."""
    encryptor = _encryptor(seed, offset, count)
    buffer, raw = _scratch(count)
    _fill(encryptor, raw, memoryview(bytes(min(_SLICE_BYTES, count * _WORD))))
    return buffer[:count].astype(np.uint32, copy=False)


def pairwise_sign(me: int, peer: int) -> int:
    """+1 towards higher-numbered peers, -1 towards lower: the pair's masks cancel in the sum."""
    if me == peer:
        raise ValueError("no pairwise mask with oneself")
    return 1 if me < peer else -1


def _apply(values: npt.NDArray[np.uint32], streams: Sequence[tuple[bytes, int]], offset: int) -> npt.NDArray[np.uint32]:
    """values + sum(sign * PRG(seed)[offset:]) mod 2**32, chunk by chunk with one scratch buffer."""
    if values.dtype != np.uint32 or values.ndim != 1:
        raise ValueError(f"masks apply to a 1-D uint32 vector, got {values.ndim}-D {values.dtype}")
    for _, sign in streams:
        if sign not in (1, -1):
            raise ValueError(f"a mask sign is +1 or -1, got {sign}")
    out = values.copy()
    count = out.size
    encryptors = [(_encryptor(seed, offset, count), sign) for seed, sign in streams]
    chunk = min(_CHUNK, count)
    scratch, raw = _scratch(chunk)
    zeros = memoryview(bytes(chunk * _WORD))
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        part = out[start : start + n]
        stream = scratch[:n]
        for encryptor, sign in encryptors:
            _fill(encryptor, raw[: (n + _SLACK) * _WORD], zeros)
            if sign > 0:
                np.add(part, stream, out=part)
            else:
                np.subtract(part, stream, out=part)
    return out


def mask_vector(
    values: npt.NDArray[np.uint32],
    *,
    self_seed: bytes,
    pairwise: Sequence[tuple[bytes, int]],
    offset: int = 0,
) -> npt.NDArray[np.uint32]:
    """values + PRG(self_seed) + sum(sign * PRG(seed)) mod 2**32, for the slice starting at `offset`."""
    return _apply(values, [(self_seed, 1), *pairwise], offset)


def unmask_sum(
    total: npt.NDArray[np.uint32],
    *,
    self_seeds: Sequence[bytes],
    dropped_pairwise: Sequence[tuple[bytes, int]],
    offset: int = 0,
) -> npt.NDArray[np.uint32]:
    """Subtract survivors' self masks and the pairwise masks they added towards dropped peers.

    Each dropped pair is (seed, sign as the survivor applied it), so sign * PRG(seed) is subtracted.
    """
    removals = [(seed, -1) for seed in self_seeds] + [(seed, -sign) for seed, sign in dropped_pairwise]
    return _apply(total, removals, offset)

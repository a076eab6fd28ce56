"""Receiving one streamed update: each chunk is checked as it arrives and spooled to disk.

Only a complete, verified upload is folded into the round's accumulator, so a stream that
breaks or lies half-way is rejected whole and leaves the sum exactly as it was. Memory per
in-flight upload is one chunk; the accumulator is the only O(model) buffer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedlora_common.aggregation import StreamingAccumulator
from fedlora_common.chunking import chunk_count
from fedlora_common.manifest import WIRE_DTYPE
from fedlora_server.errors import InvalidArgument, ResourceExhausted

__all__ = ["ReceivedUpload", "receive_to_spool"]

FLOAT_BYTES = np.dtype(WIRE_DTYPE).itemsize
FOLD_SLICE_BYTES = 4 * 2**20


@dataclass(frozen=True)
class ReceivedUpload:
    """A verified upload waiting in its spool file."""

    path: Path
    size_bytes: int
    sha256: bytes

    def read(self) -> np.ndarray:
        """The whole vector (for the small initial upload only; deltas are folded in slices)."""
        return np.fromfile(self.path, dtype=np.float32)

    def slices(self, dtype: type[np.generic]) -> Iterator[tuple[int, npt.NDArray[Any]]]:
        """(element offset, values) over the spooled vector, a few MiB at a time."""
        with self.path.open("rb") as f:
            offset = 0
            while block := f.read(FOLD_SLICE_BYTES):
                values = np.frombuffer(block, dtype=dtype)
                yield offset, values
                offset += values.size

    def fold_into(self, accumulator: StreamingAccumulator, weight: float) -> None:
        for offset, values in self.slices(np.float32):
            accumulator.add_slice(offset, values, weight)
        accumulator.close_update(weight)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def receive_to_spool(
    chunks: Iterable[tuple[int, bytes]],
    *,
    spool_path: Path,
    total_size: int,
    declared_chunks: int,
    declared_sha256: bytes,
    max_chunk_bytes: int,
    dtype: str = WIRE_DTYPE,
) -> ReceivedUpload:
    """Consume (seq, data) pairs; raise InvalidArgument/ResourceExhausted and delete the spool on any fault."""
    expected_chunks = chunk_count(total_size, max_chunk_bytes)
    if declared_chunks < expected_chunks:
        raise InvalidArgument(f"{declared_chunks} chunks cannot carry {total_size} bytes")
    check_finite = dtype == WIRE_DTYPE
    digest = hashlib.sha256()
    received = 0
    next_seq = 0
    spool_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with spool_path.open("wb") as out:
            for seq, data in chunks:
                if seq != next_seq:
                    raise InvalidArgument(f"chunk sequence gap: expected {next_seq}, got {seq}")
                if len(data) > max_chunk_bytes:
                    raise ResourceExhausted(f"chunk {seq} has {len(data)} bytes; the limit is {max_chunk_bytes}")
                if len(data) % FLOAT_BYTES:
                    raise InvalidArgument(f"chunk {seq} is not a whole number of {WIRE_DTYPE} values")
                received += len(data)
                if received > total_size:
                    raise InvalidArgument(f"upload exceeds its declared size of {total_size} bytes")
                if check_finite and not np.isfinite(np.frombuffer(data, dtype=np.float32)).all():
                    raise InvalidArgument(f"chunk {seq} holds NaN or Inf")
                digest.update(data)
                out.write(data)
                next_seq += 1
        if next_seq != declared_chunks:
            raise InvalidArgument(f"received {next_seq} chunks, header declared {declared_chunks}")
        if received != total_size:
            raise InvalidArgument(f"received {received} bytes, header declared {total_size}")
        if digest.digest() != declared_sha256:
            raise InvalidArgument("digest mismatch: the upload is not what the header declared")
    except BaseException:
        spool_path.unlink(missing_ok=True)
        raise
    return ReceivedUpload(spool_path, received, digest.digest())

"""Receiving one streamed upload: the header checks every kind shares, and each chunk's checks.

An upload declares its size, chunk count and SHA-256 up front. Each chunk is checked as it
arrives (sequence, size, whole values, NaN/Inf for floats), hashed and handed to a sink; the
digest is checked at the end. Where the bytes go is the sink's business: a spool file for float
uploads (folded once verified: folding floats cannot be undone exactly), or straight into the
secure round's modular sum for masked ones (undone exactly if the stream turns out bad).
On any fault the sink is aborted and the stream refused whole. Bytes count as received once the
upload is taken (fedlora_received_bytes_total holds one copy of each update however often it was
resent); those of a stream refused or cut off count as discarded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedlora_common.chunking import chunk_count
from fedlora_common.manifest import MASKED_DTYPE, WIRE_DTYPE, Manifest
from fedlora_common.messages import UploadHeader, UploadKind
from fedlora_server.errors import CoordinatorError, InvalidArgument, ResourceExhausted, Unavailable
from fedlora_server.metrics import ServerMetrics

__all__ = ["Received", "Spool", "UploadSink", "check_header", "check_initial_manifest", "receive", "wire_dtype"]

READ_SLICE_BYTES = 4 * 2**20


class UploadSink(Protocol):
    """Where a stream's checked values go, element offset by element offset."""

    def write(self, offset: int, values: npt.NDArray[Any]) -> None: ...

    def abort(self) -> None:
        """Undo everything written; called once when the stream is refused."""


@dataclass(frozen=True)
class Received:
    """A stream whose every chunk and whole digest checked out."""

    size_bytes: int
    sha256: bytes
    chunks: int = 0


def wire_dtype(kind: UploadKind) -> str:
    return MASKED_DTYPE if kind is UploadKind.MASKED else WIRE_DTYPE


def check_header(header: UploadHeader, *, chunk_bytes: int, max_update_bytes: int) -> None:
    """What any upload's header must satisfy whatever the phase; kind-specific checks come after."""
    if header.dtype != wire_dtype(header.kind):
        raise InvalidArgument(
            f"dtype {header.dtype!r} is not supported for this upload; send {wire_dtype(header.kind)}"
        )
    if header.total_size > max_update_bytes:
        raise ResourceExhausted(f"declared {header.total_size} bytes; the limit is {max_update_bytes}")
    if len(header.sha256) != 32:
        raise InvalidArgument("sha256 must be 32 bytes")
    if header.chunk_count < chunk_count(header.total_size, chunk_bytes):
        raise InvalidArgument(f"{header.chunk_count} chunks cannot carry {header.total_size} bytes")


def check_initial_manifest(manifest: Manifest) -> None:
    """The layout every later update and download follows: named float32 tensors, none of them empty."""
    for tensor in manifest.tensors:
        if not tensor.name:
            raise InvalidArgument("every tensor of the manifest needs a name")
        if tensor.dtype != WIRE_DTYPE:
            raise InvalidArgument(f"tensor {tensor.name}: dtype {tensor.dtype!r}; the wire carries {WIRE_DTYPE}")
        if any(d < 1 for d in tensor.shape):
            raise InvalidArgument(f"tensor {tensor.name}: shape {tensor.shape} holds no values")


def receive(
    header: UploadHeader,
    chunks: Iterable[tuple[int, bytes]],
    sink: UploadSink,
    *,
    chunk_bytes: int,
    metrics: ServerMetrics,
) -> Received:
    """Consume (seq, data) pairs into `sink`; on any fault abort the sink and raise a CoordinatorError."""
    dtype = np.dtype(wire_dtype(header.kind))
    floats = dtype.kind == "f"
    digest = hashlib.sha256()
    received = next_seq = read = 0
    try:
        for seq, data in chunks:
            read += len(data)
            if seq != next_seq:
                raise InvalidArgument(f"chunk sequence gap: expected {next_seq}, got {seq}")
            if len(data) > chunk_bytes:
                raise ResourceExhausted(f"chunk {seq} has {len(data)} bytes; the limit is {chunk_bytes}")
            if len(data) % dtype.itemsize:
                raise InvalidArgument(f"chunk {seq} is not a whole number of {dtype.name} values")
            if received + len(data) > header.total_size:
                raise InvalidArgument(f"upload exceeds its declared size of {header.total_size} bytes")
            values = np.frombuffer(data, dtype=dtype)
            if floats and not np.isfinite(values).all():
                raise InvalidArgument(f"chunk {seq} holds NaN or Inf")
            digest.update(data)
            sink.write(received // dtype.itemsize, values)
            received += len(data)
            next_seq += 1
        if next_seq != header.chunk_count:
            raise InvalidArgument(f"received {next_seq} chunks, header declared {header.chunk_count}")
        if received != header.total_size:
            raise InvalidArgument(f"received {received} bytes, header declared {header.total_size}")
        if digest.digest() != header.sha256:
            raise InvalidArgument("digest mismatch: the upload is not what the header declared")
    except CoordinatorError as exc:
        sink.abort()
        metrics.rejected_uploads.labels(reason=type(exc).__name__).inc()
        metrics.discarded_bytes.inc(read)
        raise
    except BaseException:
        sink.abort()
        metrics.discarded_bytes.inc(read)
        raise
    return Received(received, digest.digest(), next_seq)


class Spool:
    """A sink that writes the stream to a file, to be read back in slices once the whole is verified.

    The spool is the coordinator's own disk: a fault there (full, read-only, not a directory) is
    Unavailable, never the uploader's fault.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._faults("open"):
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("wb")

    @contextmanager
    def _faults(self, doing: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise Unavailable(f"the coordinator could not {doing} its spool file {self.path}: {exc}") from None

    def write(self, offset: int, values: npt.NDArray[Any]) -> None:
        with self._faults("write"):
            self._file.write(values.data)

    def abort(self) -> None:
        with suppress(OSError):  # what was spooled is dropped either way
            self._file.close()
        with suppress(OSError):
            self.path.unlink(missing_ok=True)

    def slices(self, dtype: type[np.generic]) -> Iterator[tuple[int, npt.NDArray[Any]]]:
        """(element offset, values) over the spooled vector, a few MiB at a time."""
        with self._faults("write"):
            self._file.close()
        with self._faults("read"), self.path.open("rb") as f:
            offset = 0
            while block := f.read(READ_SLICE_BYTES):
                values = np.frombuffer(block, dtype=dtype)
                yield offset, values
                offset += values.size

    def read(self, dtype: type[np.generic]) -> npt.NDArray[Any]:
        """The whole vector (for the small initial model only; updates are read in slices)."""
        with self._faults("write"):
            self._file.close()
        with self._faults("read"):
            return np.fromfile(self.path, dtype=dtype)

    def discard(self) -> None:
        self.abort()

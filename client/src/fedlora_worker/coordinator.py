"""The coordinator as the worker daemon sees it: the calls it makes, whatever carries them.

`fedlora_worker.transport.CoordinatorClient` carries them over gRPC; a simulation engine (or a
test) can carry them in process. The daemon depends on this Protocol only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedlora_common.chunking import as_bytes, chunk_count, sha256
from fedlora_common.manifest import MASKED_DTYPE, WIRE_DTYPE, Manifest
from fedlora_common.messages import MetricsReport, ModelVersion, RunSpec, Task, UploadHeader, UploadKind
from fedlora_common.secagg import Advertisement, Complaint, EncryptedShare, RevealedShare

__all__ = [
    "CONFIGURATION_REFUSALS",
    "Coordinator",
    "DownloadedModel",
    "Misconfigured",
    "NotJoined",
    "Refused",
    "StaleTask",
    "TlsMisconfigured",
    "TransferError",
    "Unreachable",
]

CONFIGURATION_REFUSALS = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED"})
"""Refusals only an operator can lift: the site's token, certificate or identity key is not what the run admits,
or the two sides speak different protocol versions (an upgrade is due)."""


class NotJoined(Exception):
    """The coordinator does not (or no longer) count this worker in the run, e.g. after it restarted: join again."""


class StaleTask(Exception):
    """The coordinator no longer holds the task this call was for (it restarted, or the round moved on): poll again."""


class TransferError(Exception):
    """A download that did not arrive as the coordinator declared it (size, sequence or digest)."""


class Refused(Exception):
    """The coordinator refused a call, and trying again would not change its answer; `code` names its status."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class Misconfigured(Exception):
    """The coordinator refuses this site as it is configured (CONFIGURATION_REFUSALS): the worker tells it why
    and exits 2, since no retry can help before an operator fixes the site's settings."""


class TlsMisconfigured(Misconfigured):
    """TLS with the coordinator fails for a reason of configuration (a name its certificate lacks, a CA, a key or a
    certificate the handshake refuses), the same way `RetrySettings.tls_failures` times in a row: the worker exits 2
    with the message, one line naming the cause. Unlike its parent's, the coordinator is not told: it cannot be
    reached."""


class Unreachable(Exception):
    """The coordinator did not answer through every retry: wait, then join again."""


@dataclass(frozen=True)
class DownloadedModel:
    """A global version as received and verified: its float32 state in manifest order, and its config file."""

    version: ModelVersion
    vector: npt.NDArray[np.float32]
    config_json: str


class Coordinator(Protocol):
    """One worker's calls to the coordinator. Implementations retry what is transient and deduplicate resends."""

    @property
    def worker_id(self) -> str: ...

    def join(self, num_examples: int, *, rank: int = 0, base_precision: str = "") -> RunSpec:
        """Register (again) with the run; returns what is fixed for the whole run. `rank`: the most LoRA rank this
        site trains, `base_precision` how it loads the base (0 and empty: the run's)."""
        ...

    def poll(self, run_id: str) -> Task:
        """The next task; raises NotJoined when the worker must join again."""
        ...

    def download(
        self, run_id: str, version: ModelVersion, *, on_bytes: Callable[[int], None] = ...
    ) -> DownloadedModel: ...

    def upload(
        self,
        *,
        run_id: str,
        round_: int,
        kind: UploadKind,
        base_version: int,
        num_examples: int,
        vector: npt.NDArray[np.float32] | npt.NDArray[np.uint32],
        train_loss: float = ...,
        tag: int = ...,
        manifest: Manifest | None = ...,
        artifact_config_json: str = ...,
        on_bytes: Callable[[int], None] = ...,
    ) -> int:
        """Send one vector; returns the bytes the coordinator acknowledged."""
        ...

    def advertise(self, run_id: str, tag: int, keys: Advertisement) -> None: ...

    def share_keys(self, run_id: str, tag: int, shares: Sequence[EncryptedShare]) -> None: ...

    def reveal(self, run_id: str, tag: int, shares: Sequence[RevealedShare]) -> None: ...

    def complain(self, run_id: str, tag: int, complaint: Complaint) -> None:
        """Show the coordinator that some senders' sealed shares do not open (the attempt then fails)."""
        ...

    def report(self, report: MetricsReport) -> None: ...

    def leave(self, run_id: str, reason: str) -> None:
        """Say why this worker cannot go on, before it exits (best effort)."""
        ...

    def stop(self) -> None:
        """The worker is shutting down (a signal): end calls in flight and retry none; it may come from any thread."""
        ...

    def close(self) -> None: ...


def prepare_upload(
    *,
    worker_id: str,
    chunk_bytes: int,
    run_id: str,
    round_: int,
    kind: UploadKind,
    base_version: int,
    num_examples: int,
    vector: npt.NDArray[np.float32] | npt.NDArray[np.uint32],
    train_loss: float,
    tag: int,
    manifest: Manifest | None,
    artifact_config_json: str,
) -> tuple[UploadHeader, memoryview]:
    """What `Coordinator.upload` sends, whatever carries it: the header and the payload it describes."""
    dtype = MASKED_DTYPE if kind is UploadKind.MASKED else WIRE_DTYPE
    payload = as_bytes(vector.astype(dtype, copy=False))
    header = UploadHeader(
        worker_id=worker_id,
        run_id=run_id,
        round=round_,
        kind=kind,
        base_version=base_version,
        num_examples=num_examples,
        total_size=len(payload),
        chunk_count=chunk_count(len(payload), chunk_bytes),
        sha256=sha256(payload),
        dtype=dtype,
        manifest=manifest,
        artifact_config_json=artifact_config_json,
        train_loss=train_loss,
        tag=tag,
    )
    return header, payload

"""The coordinator's durable state, behind a small contract every backend honours.

Invariants (the shared test class in tests/server/test_store.py checks each backend):
- one run per store; `create_run` on a store that holds a different run is refused;
- a worker's upload for a round is recorded at most once per attempt (`DuplicateUploadError`);
- committed artifact versions strictly increase and are never rewritten; committing a version again
  with the digest it was recorded with changes nothing (a retried commit);
- a write returns only once it is durable: callers announce a decision after it is stored;
- a read or write the medium fails (disk full, read-only, I/O error) raises `errors.Unavailable`,
  the coordinator's own fault, and keeps nothing of the write.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ArtifactRecord",
    "CoordinatorStore",
    "DuplicateUploadError",
    "MetricsRecord",
    "RoundRecord",
    "RoundStatus",
    "RunEvent",
    "RunEventKind",
    "RunRecord",
    "StateError",
    "StoreError",
    "UploadRecord",
    "WorkerRecord",
]

RoundStatus = Literal["training", "evaluating", "completed", "failed"]
RunEventKind = Literal["amended", "retried", "stop_requested"]


class StoreError(Exception):
    """The store refused a write that would break one of its invariants."""


class StateError(Exception):
    """The state directory cannot be resumed from; the message is one line naming the file and the fault."""


class DuplicateUploadError(StoreError):
    pass


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    config_json: str
    created_at: float
    failure: str = ""
    """Why the run ended without finishing its rounds; empty while it runs or once it finished them."""


@dataclass(frozen=True)
class RunEvent:
    """What an operator did to the run, in its journal: amended its settings, retried it after a failure, asked it
    to stop. `detail` is JSON: the changes (amended), the failure left behind (retried), when to stop and why."""

    at: float
    kind: RunEventKind
    detail: str


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    num_examples: int
    joined_at: float
    left_reason: str = ""
    """Why the worker said it could not go on; empty while it takes part."""
    rank: int = 0
    """The LoRA rank the site trains (0: the run's)."""
    base_precision: str = ""
    """How the site loads the base: nf4, bfloat16, float32 (empty: the mode's, or a worker of before)."""


@dataclass(frozen=True)
class RoundRecord:
    round: int
    attempt: int
    status: RoundStatus
    participants: tuple[str, ...]
    started_at: float
    deadline_at: float
    finished_at: float | None = None
    dropped: tuple[str, ...] = ()
    train_loss: float | None = None
    eval_loss: float | None = None
    upload_bytes: int = 0
    download_bytes: int = 0
    secagg: str = ""
    """Per secure-aggregation stage: dropouts, seconds and bytes (JSON); empty without it."""
    excluded: tuple[str, ...] = ()
    """Workers a failed attempt showed to be at fault; they sit out the rest of the round."""
    failure: str = ""
    """Why a failed attempt failed; empty otherwise."""


@dataclass(frozen=True)
class ArtifactRecord:
    version: int
    round: int
    sha256: str
    size_bytes: int
    path: str
    committed_at: float


@dataclass(frozen=True)
class UploadRecord:
    round: int
    attempt: int
    worker_id: str
    num_examples: int
    size_bytes: int
    sha256: str
    train_loss: float


@dataclass(frozen=True)
class MetricsRecord:
    round: int
    worker_id: str
    version: int
    eval_loss: float
    eval_tokens: int
    train_loss: float
    tokens_per_second: float
    record_epsilon: float | None = None
    memorization_json: str = ""
    """A site's aggregate audit rates (MemorizationRates per group) as JSON; empty when not audited."""


class CoordinatorStore(abc.ABC):
    """Durable state of one run. Implementations are safe to call from several threads."""

    @abc.abstractmethod
    def load_run(self) -> RunRecord | None:
        """The run this store holds, or None for a new store."""

    @abc.abstractmethod
    def create_run(self, run: RunRecord) -> None:
        """Start a run; refused if the store already holds another run id."""

    @abc.abstractmethod
    def fail_run(self, reason: str) -> None:
        """Record that the run ended without finishing its rounds, and why."""

    @abc.abstractmethod
    def amend_run(self, config_json: str, event: RunEvent) -> None:
        """Replace the run's pinned settings and journal why, in one transaction; StoreError without a run."""

    @abc.abstractmethod
    def reopen_run(self, event: RunEvent) -> None:
        """Clear the run's failure (it is retried) and journal it, in one transaction; StoreError without a run."""

    @abc.abstractmethod
    def record_event(self, event: RunEvent) -> None:
        """Journal an operator's request (a stop) for a coordinator, running or not, to act on."""

    @abc.abstractmethod
    def events(self) -> list[RunEvent]:
        """The run's journal, oldest first."""

    @abc.abstractmethod
    def upsert_worker(self, worker: WorkerRecord) -> None:
        """Admit a worker, or update its example count and left_reason when it rejoins or leaves."""

    @abc.abstractmethod
    def workers(self) -> list[WorkerRecord]:
        """Admitted workers, by id."""

    @abc.abstractmethod
    def save_round(self, record: RoundRecord) -> None:
        """Insert or replace the record of (round, attempt)."""

    @abc.abstractmethod
    def rounds(self) -> list[RoundRecord]:
        """Every attempt of every round, in (round, attempt) order."""

    @abc.abstractmethod
    def record_upload(self, upload: UploadRecord) -> None:
        """Record an accepted upload; DuplicateUploadError if this worker already uploaded this attempt."""

    @abc.abstractmethod
    def uploads(self, round_: int, attempt: int) -> list[UploadRecord]:
        """Accepted uploads of one attempt of a round."""

    @abc.abstractmethod
    def commit_artifact(self, artifact: ArtifactRecord) -> None:
        """Record a committed global version; StoreError unless it is newer than every other or a repeat."""

    @abc.abstractmethod
    def artifacts(self) -> list[ArtifactRecord]:
        """Committed versions, oldest first."""

    @abc.abstractmethod
    def record_metrics(self, metrics: MetricsRecord) -> None:
        """Insert or replace one worker's evaluation of one round."""

    @abc.abstractmethod
    def metrics(self, round_: int) -> list[MetricsRecord]:
        """Evaluations reported for a round."""

    def latest_artifact(self) -> ArtifactRecord | None:
        found = self.artifacts()
        return found[-1] if found else None

    def close(self) -> None:
        """Release resources; the default holds none."""

"""Transport-free messages of the round protocol; fedlora_common.serde converts them to the wire.

The settings a run is decided by (LoRA, training, privacy and audit plans) are the validated
models of fedlora_common.plans, re-exported here so the protocol reads as one vocabulary.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fedlora_common.manifest import Manifest
from fedlora_common.plans import AuditPlan, GoldfishPlan, LoraSpec, RecordDPPlan, RunSpec, TrainingPlan
from fedlora_common.secagg.protocol import Advertisement, EncryptedShare, SecAggParams

__all__ = [
    "AuditPlan",
    "GoldfishPlan",
    "LoraSpec",
    "Memorization",
    "MemorizationRates",
    "MetricsReport",
    "ModelVersion",
    "RecordDPPlan",
    "RunSpec",
    "SecAggTask",
    "Task",
    "TaskKind",
    "TrainingPlan",
    "UploadHeader",
    "UploadKind",
]


class TaskKind(enum.Enum):
    WAIT = 1
    INITIALIZE = 2
    TRAIN = 3
    EVALUATE = 4
    FINISHED = 5
    SECAGG_SHARE_KEYS = 6
    SECAGG_MASKED_UPLOAD = 7
    SECAGG_UNMASK = 8


class UploadKind(enum.Enum):
    INITIAL = 1
    DELTA = 2
    MASKED = 3


@dataclass(frozen=True)
class ModelVersion:
    version: int
    size_bytes: int
    sha256: bytes
    manifest: Manifest


@dataclass(frozen=True)
class SecAggTask:
    """A secure-aggregation round's parameters and what the current stage hands to the worker."""

    params: SecAggParams
    roster: tuple[Advertisement, ...] = ()
    inbox: tuple[EncryptedShare, ...] = ()
    survivors: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    kind: TaskKind
    round: int = 0
    global_version: ModelVersion | None = None
    training: TrainingPlan | None = None
    participants: tuple[str, ...] = ()
    retry_after_ms: int = 0
    deadline_s: float = 0.0
    secagg: SecAggTask | None = None
    audit: AuditPlan | None = None
    reason: str = ""
    """FINISHED: why the run is over."""


@dataclass(frozen=True)
class UploadHeader:
    worker_id: str
    run_id: str
    round: int
    kind: UploadKind
    base_version: int
    num_examples: int
    total_size: int
    chunk_count: int
    sha256: bytes
    dtype: str
    manifest: Manifest | None = None
    artifact_config_json: str = ""
    train_loss: float = 0.0
    tag: int = 0


@dataclass(frozen=True)
class MetricsReport:
    worker_id: str
    run_id: str
    round: int
    version: int
    eval_loss: float
    eval_tokens: int
    train_loss: float = 0.0
    tokens_per_second: float = 0.0
    record_epsilon: float | None = None
    memorization: Memorization | None = None


@dataclass(frozen=True)
class MemorizationRates:
    """Aggregate audit rates over `count` canaries of one group; no record leaves a site."""

    count: int
    exact_match_rate: float
    approx_match_rate: float
    token_accuracy: float
    pii_extraction_rate: float
    mean_exposure: float


@dataclass(frozen=True)
class Memorization:
    overall: MemorizationRates
    by_duplication: dict[str, MemorizationRates]

"""Where the coordinator keeps what it decided: an abstract contract and its backends."""

from fedlora_server.store.base import (
    ArtifactRecord,
    CoordinatorStore,
    DuplicateUploadError,
    MetricsRecord,
    RoundRecord,
    RunEvent,
    RunRecord,
    StateError,
    StoreError,
    UploadRecord,
    WorkerRecord,
)
from fedlora_server.store.memory import MemoryStore
from fedlora_server.store.sqlite import SqliteStore

__all__ = [
    "ArtifactRecord",
    "CoordinatorStore",
    "DuplicateUploadError",
    "MemoryStore",
    "MetricsRecord",
    "RoundRecord",
    "RunEvent",
    "RunRecord",
    "SqliteStore",
    "StateError",
    "StoreError",
    "UploadRecord",
    "WorkerRecord",
]

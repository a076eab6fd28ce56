"""An in-memory store for tests and throwaway runs: the same contract, no durability."""

from __future__ import annotations

import threading
from dataclasses import replace

from fedlora_server.store.base import (
    ArtifactRecord,
    CoordinatorStore,
    DuplicateUploadError,
    MetricsRecord,
    RoundRecord,
    RunEvent,
    RunRecord,
    StoreError,
    UploadRecord,
    WorkerRecord,
)

__all__ = ["MemoryStore"]


class MemoryStore(CoordinatorStore):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: RunRecord | None = None
        self._workers: dict[str, WorkerRecord] = {}
        self._rounds: dict[tuple[int, int], RoundRecord] = {}
        self._uploads: dict[tuple[int, int, str], UploadRecord] = {}
        self._artifacts: list[ArtifactRecord] = []
        self._metrics: dict[tuple[int, str], MetricsRecord] = {}
        self._events: list[RunEvent] = []

    def load_run(self) -> RunRecord | None:
        return self._run

    def create_run(self, run: RunRecord) -> None:
        with self._lock:
            if self._run is not None and self._run.run_id != run.run_id:
                raise StoreError(f"store holds run {self._run.run_id}, not {run.run_id}")
            self._run = self._run or run

    def fail_run(self, reason: str) -> None:
        with self._lock:
            if self._run is not None:
                self._run = replace(self._run, failure=reason)

    def amend_run(self, config_json: str, event: RunEvent) -> None:
        with self._lock:
            if self._run is None:
                raise StoreError("no run to amend")
            self._run = replace(self._run, config_json=config_json)
            self._events.append(event)

    def reopen_run(self, event: RunEvent) -> None:
        with self._lock:
            if self._run is None:
                raise StoreError("no run to retry")
            self._run = replace(self._run, failure="")
            self._events.append(event)

    def record_event(self, event: RunEvent) -> None:
        with self._lock:
            self._events.append(event)

    def events(self) -> list[RunEvent]:
        with self._lock:
            return list(self._events)

    def upsert_worker(self, worker: WorkerRecord) -> None:
        with self._lock:
            first = self._workers.get(worker.worker_id)
            self._workers[worker.worker_id] = worker if first is None else replace(worker, joined_at=first.joined_at)

    def workers(self) -> list[WorkerRecord]:
        with self._lock:
            return [self._workers[k] for k in sorted(self._workers)]

    def save_round(self, record: RoundRecord) -> None:
        with self._lock:
            self._rounds[(record.round, record.attempt)] = record

    def rounds(self) -> list[RoundRecord]:
        with self._lock:
            return [self._rounds[k] for k in sorted(self._rounds)]

    def record_upload(self, upload: UploadRecord) -> None:
        key = (upload.round, upload.attempt, upload.worker_id)
        with self._lock:
            if key in self._uploads:
                raise DuplicateUploadError(f"{upload.worker_id} already uploaded round {upload.round}")
            self._uploads[key] = upload

    def uploads(self, round_: int, attempt: int) -> list[UploadRecord]:
        with self._lock:
            return [u for (r, a, _), u in sorted(self._uploads.items()) if (r, a) == (round_, attempt)]

    def commit_artifact(self, artifact: ArtifactRecord) -> None:
        with self._lock:
            if any(a.version == artifact.version and a.sha256 == artifact.sha256 for a in self._artifacts):
                return
            if self._artifacts and artifact.version <= self._artifacts[-1].version:
                raise StoreError(f"version {artifact.version} is not newer than {self._artifacts[-1].version}")
            self._artifacts.append(artifact)

    def artifacts(self) -> list[ArtifactRecord]:
        with self._lock:
            return list(self._artifacts)

    def record_metrics(self, metrics: MetricsRecord) -> None:
        with self._lock:
            self._metrics[(metrics.round, metrics.worker_id)] = metrics

    def metrics(self, round_: int) -> list[MetricsRecord]:
        with self._lock:
            return [m for (r, _), m in sorted(self._metrics.items()) if r == round_]

"""The phase machine driven directly, without gRPC: phases, tasks, commits, retries and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from fedlora_common.messages import TaskKind, UploadKind
from fedlora_server.coordinator import Coordinator
from fedlora_server.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from fedlora_server.metrics import ServerMetrics
from fedlora_server.store import MemoryStore
from tests.server.conftest import (
    MANIFEST,
    WORKERS,
    Clock,
    eval_report,
    initial_vector,
    initialized,
    run_settings,
    upload_header,
    vector_chunks,
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def coordinator(tmp_path: Path, clock: Clock) -> Coordinator:
    return Coordinator(
        settings=run_settings(tmp_path, min_workers=2),
        store=MemoryStore(),
        metrics=ServerMetrics(CollectorRegistry()),
        clock=clock,
    )


def test_the_machine_walks_admission_initialize_evaluate_train_and_commits_the_weighted_mean(
    coordinator: Coordinator,
) -> None:
    assert coordinator.phase == "admission"
    initialized(coordinator)
    assert coordinator.phase == "train"
    deltas = {w: np.full(MANIFEST.numel, float(i + 1), dtype=np.float32) for i, w in enumerate(WORKERS)}
    examples = {"clinical": 100, "finance": 300, "legal": 600}

    for w in WORKERS:
        task = coordinator.poll(w)
        assert (task.kind, task.round) == (TaskKind.TRAIN, 1)
        assert task.training is not None
        header = upload_header(w, deltas[w], round_=1, kind=UploadKind.DELTA, num_examples=examples[w])
        assert coordinator.receive_upload(header, vector_chunks(deltas[w])) == 1

    assert coordinator.phase == "evaluate"
    committed = coordinator.global_model("legal", 1)
    expected = initial_vector() + (1 * 100 + 2 * 300 + 3 * 600) / 1000
    np.testing.assert_allclose(committed.vector, expected, rtol=1e-6)
    with pytest.raises(NotFound):
        coordinator.global_model("legal", 0)


def test_a_worker_that_was_not_asked_gets_wait_and_cannot_initialize(coordinator: Coordinator) -> None:
    for w in WORKERS:
        coordinator.join(w, 100)
    vector = initial_vector()

    assert coordinator.poll("legal").kind is TaskKind.WAIT
    with pytest.raises(PermissionDenied):
        coordinator.receive_upload(
            upload_header("legal", vector, round_=0, kind=UploadKind.INITIAL), vector_chunks(vector)
        )
    assert coordinator.phase == "initialize"


def test_an_attempt_that_fails_is_recorded_and_retried_with_a_new_attempt(
    coordinator: Coordinator, clock: Clock
) -> None:
    initialized(coordinator)
    one = np.ones(MANIFEST.numel, dtype=np.float32)
    coordinator.receive_upload(upload_header("clinical", one, round_=1, kind=UploadKind.DELTA), vector_chunks(one))

    clock.now += 10**6
    task = coordinator.poll("finance")

    assert (task.kind, task.round) == (TaskKind.TRAIN, 1)
    assert coordinator.phase == "train"
    with pytest.raises(NotFound):
        coordinator.global_model("finance", 1)


def test_an_upload_outside_training_is_a_failed_precondition_and_bad_reports_are_refused(
    coordinator: Coordinator,
) -> None:
    for w in WORKERS:
        coordinator.join(w, 100)
    one = np.ones(MANIFEST.numel, dtype=np.float32)

    with pytest.raises(FailedPrecondition, match="phase initialize"):
        coordinator.receive_upload(upload_header("clinical", one, round_=1, kind=UploadKind.DELTA), vector_chunks(one))
    with pytest.raises(InvalidArgument, match="eval_loss"):
        coordinator.report_metrics(eval_report("clinical", 0, float("nan")))
    with pytest.raises(FailedPrecondition, match="no evaluation"):
        coordinator.report_metrics(eval_report("clinical", 0, 1.0))


def test_a_restarted_machine_resumes_at_the_last_committed_version(tmp_path: Path, clock: Clock) -> None:
    store = MemoryStore()
    settings = run_settings(tmp_path, min_workers=3)
    first = Coordinator(settings=settings, store=store, metrics=ServerMetrics(CollectorRegistry()), clock=clock)
    initialized(first)
    assert first.phase == "train"

    second = Coordinator(settings=settings, store=store, metrics=ServerMetrics(CollectorRegistry()), clock=clock)
    for w in WORKERS:
        second.join(w, 100)

    assert second.phase == "train"
    task = second.poll("legal")
    assert (task.kind, task.round) == (TaskKind.TRAIN, 1)
    assert task.global_version is not None
    assert task.global_version.version == 0
    np.testing.assert_array_equal(second.global_model("legal", 0).vector, initial_vector())

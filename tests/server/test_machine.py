"""The phase machine driven directly, without gRPC: phases, tasks, commits, retries and resume."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from fedlora_common.messages import Task, TaskKind, UploadKind
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


def test_a_round_that_keeps_failing_backs_off_longer_each_time_and_fails_the_run_at_its_last_attempt(
    tmp_path: Path, clock: Clock
) -> None:
    # Prepare: nobody ever uploads, so every attempt of round 1 fails at its deadline.
    registry = CollectorRegistry()
    timeouts = {"poll_wait_ms": 2000, "retry_backoff_s": 4.0, "retry_backoff_max_s": 10.0, "attempts_per_round": 5}
    coordinator = Coordinator(
        settings=run_settings(tmp_path, min_workers=2, timeouts=timeouts),
        store=MemoryStore(),
        metrics=ServerMetrics(registry),
        clock=clock,
    )
    initialized(coordinator)
    waits: list[float] = []

    # Execute: let each attempt run out; measure how long the machine holds the round before the next.
    for _ in range(4):
        assert coordinator.phase == "train"
        clock.now += 10**6
        coordinator.tick()
        started = clock.now
        while coordinator.phase == "backoff":
            task = coordinator.poll("legal")
            assert task.kind is TaskKind.WAIT
            assert 0 < task.retry_after_ms <= 2000
            assert registry.get_sample_value("fedlora_round_backoff") == 1
            clock.now += 0.5
            coordinator.tick()
        waits.append(clock.now - started)
    clock.now += 10**6
    coordinator.tick()

    # Assert: at once, then 4 s, 8 s, then capped at 10 s; the fifth failure ends the run with its reason.
    assert waits == [0.0, 4.0, 8.0, 10.0]
    assert coordinator.phase == "finished"
    assert coordinator.failure is not None
    assert coordinator.failure.startswith("round 1 failed all 5 attempts; the last: ")
    assert coordinator.poll("legal").kind is TaskKind.FINISHED
    assert registry.get_sample_value("fedlora_round_attempt") == 5
    assert registry.get_sample_value("fedlora_round_backoff") == 0
    assert registry.get_sample_value("fedlora_rounds_failed_total") == 5
    assert (registry.get_sample_value("fedlora_run_failed"), registry.get_sample_value("fedlora_run_finished")) == (
        1,
        0,
    )


def test_a_worker_leaving_during_a_backoff_below_min_workers_fails_the_run(tmp_path: Path, clock: Clock) -> None:
    coordinator = Coordinator(
        settings=run_settings(tmp_path, min_workers=3, timeouts={"retry_backoff_s": 30.0}),
        store=MemoryStore(),
        metrics=ServerMetrics(CollectorRegistry()),
        clock=clock,
    )
    initialized(coordinator)
    for _ in range(2):
        clock.now += 10**6
        coordinator.tick()
    assert coordinator.phase == "backoff"

    coordinator.leave("finance", "disk failed")

    assert coordinator.phase == "finished"
    assert coordinator.failure is not None
    assert "finance: disk failed" in coordinator.failure


def test_a_run_that_commits_all_its_rounds_says_it_finished_to_prometheus(tmp_path: Path, clock: Clock) -> None:
    registry = CollectorRegistry()
    coordinator = Coordinator(
        settings=run_settings(tmp_path, min_workers=2, rounds=1),
        store=MemoryStore(),
        metrics=ServerMetrics(registry),
        clock=clock,
    )
    initialized(coordinator)
    assert registry.get_sample_value("fedlora_run_finished") == 0
    one = np.ones(MANIFEST.numel, dtype=np.float32)

    for w in WORKERS:
        coordinator.receive_upload(upload_header(w, one, round_=1, kind=UploadKind.DELTA), vector_chunks(one))
    for w in WORKERS:
        coordinator.report_metrics(eval_report(w, 1, 2.0))

    assert coordinator.phase == "finished"
    assert (registry.get_sample_value("fedlora_run_finished"), registry.get_sample_value("fedlora_run_failed")) == (
        1,
        0,
    )


def test_a_held_poll_is_answered_as_soon_as_its_workers_phase_opens(coordinator: Coordinator) -> None:
    # Prepare: every worker joined and version 0 committed; legal and finance have reported on it, clinical not.
    for w in WORKERS:
        coordinator.join(w, 100)
    vector = initial_vector()
    coordinator.receive_upload(
        upload_header("clinical", vector, round_=0, kind=UploadKind.INITIAL), vector_chunks(vector)
    )
    for w in ("legal", "finance"):
        coordinator.report_metrics(eval_report(w, 0, 3.0))
    answered: list[Task] = []
    polling = threading.Thread(target=lambda: answered.append(coordinator.poll("legal", hold_s=600)), daemon=True)
    polling.start()

    # Execute: the last report closes the evaluation, which opens round 1.
    coordinator.report_metrics(eval_report("clinical", 0, 3.0))
    polling.join(timeout=60)

    # Assert: legal's poll, held for up to 10 minutes, came back with its training task.
    assert not polling.is_alive()
    assert [(t.kind, t.round) for t in answered] == [(TaskKind.TRAIN, 1)]


def test_a_held_poll_with_nothing_to_do_says_wait_and_ask_again_at_once(coordinator: Coordinator) -> None:
    for w in WORKERS:
        coordinator.join(w, 100)

    task = coordinator.poll("legal", hold_s=0.05)

    assert (task.kind, task.retry_after_ms) == (TaskKind.WAIT, 0)
    assert coordinator.poll("legal").retry_after_ms == 10  # unheld: the coordinator's poll_wait_ms


def test_under_hetlora_each_rank_index_is_averaged_over_the_sites_that_trained_it(tmp_path: Path, clock: Clock) -> None:
    # Prepare: sites of rank 1, 2 and 4 (the run's) in the clear; each sends a delta of ones up to its rank.
    ranks, examples = {"clinical": 1, "finance": 2, "legal": 4}, {"clinical": 100, "finance": 300, "legal": 600}
    coordinator = Coordinator(
        settings=run_settings(tmp_path, aggregation="hetlora", lora={"rank": 4, "alpha": 8}),
        store=MemoryStore(),
        metrics=ServerMetrics(CollectorRegistry()),
        clock=clock,
    )
    initialized(coordinator, ranks)
    a_shape, b_shape = MANIFEST.tensors[0].shape, MANIFEST.tensors[1].shape

    # Execute
    for w in WORKERS:
        a, b = np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32)
        a[: ranks[w]], b[:, : ranks[w]] = 1.0, 1.0
        delta = np.concatenate([a.ravel(), b.ravel()]) * np.float32(WORKERS.index(w) + 1)
        header = upload_header(w, delta, round_=1, kind=UploadKind.DELTA, num_examples=examples[w])
        coordinator.receive_upload(header, vector_chunks(delta))

    # Assert: index 0 is every site's weighted mean, index 1 clinical's excluded, 2-3 legal's alone.
    moved = coordinator.global_model("legal", 1).vector - initial_vector()
    a = moved[: a_shape[0] * a_shape[1]].reshape(a_shape)
    value = {w: WORKERS.index(w) + 1 for w in WORKERS}
    expect = [
        sum(examples[w] * value[w] for w in WORKERS) / 1000,
        (examples["finance"] * value["finance"] + examples["legal"] * value["legal"]) / 900,
        value["legal"],
        value["legal"],
    ]
    np.testing.assert_allclose(a.mean(axis=1), expect, rtol=1e-5)
    np.testing.assert_allclose(a, np.repeat(np.array(expect)[:, None], a_shape[1], axis=1), rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "join", "message"),
    [
        (
            {},
            {"rank": 2},
            "rank 2: this run trains rank 4 at every site; a site of less rank takes part only in a "
            "run with aggregation: hetlora",
        ),
        (
            {},
            {"base_precision": "nf4"},
            "base_precision 'nf4': this run allows bfloat16, float32 (run.yaml "
            "base_precisions); set one of them in worker.yaml",
        ),
    ],
    ids=["less-rank-without-hetlora", "nf4-in-a-lora-run"],
)
def test_a_site_whose_rank_or_precision_the_run_does_not_allow_is_refused_at_join(
    tmp_path: Path, clock: Clock, overrides: dict, join: dict, message: str
) -> None:
    coordinator = Coordinator(
        settings=run_settings(tmp_path, lora={"rank": 4, "alpha": 8}, **overrides),
        store=MemoryStore(),
        metrics=ServerMetrics(CollectorRegistry()),
        clock=clock,
    )

    with pytest.raises(PermissionDenied) as caught:
        coordinator.join("clinical", 100, **join)

    assert str(caught.value) == message
    assert coordinator.phase == "admission"


@dataclass
class SlowDisk:
    """Round 1 with all but the last update in, and a version write that blocks until `release` is set."""

    writing: threading.Event
    release: threading.Event
    delta: np.ndarray


@pytest.fixture
def slow_disk(coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch) -> SlowDisk:
    initialized(coordinator)
    versions = coordinator._versions
    writing, release = threading.Event(), threading.Event()
    commit_update = versions.commit_update

    def slow_commit(*args: object, **kwargs: object) -> object:
        writing.set()
        assert release.wait(30)
        return commit_update(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(versions, "commit_update", slow_commit)
    delta = np.ones(MANIFEST.numel, dtype=np.float32)
    for w in WORKERS[:-1]:
        coordinator.receive_upload(upload_header(w, delta, round_=1, kind=UploadKind.DELTA), vector_chunks(delta))
    return SlowDisk(writing, release, delta)


def test_requests_are_answered_while_a_version_is_written_and_the_round_moves_on_once_it_stands(
    coordinator: Coordinator, slow_disk: SlowDisk
) -> None:
    # Prepare: a commit whose write blocks until released (a slow disk), as the last upload closes round 1.
    writing, release, delta = slow_disk.writing, slow_disk.release, slow_disk.delta
    last = WORKERS[-1]
    uploader = threading.Thread(
        target=coordinator.receive_upload,
        args=(upload_header(last, delta, round_=1, kind=UploadKind.DELTA), vector_chunks(delta)),
    )
    uploader.start()
    assert writing.wait(30)

    # Execute: while the version is written, other requests come in (each would deadlock under the lock).
    answers: list[Task] = []
    poller = threading.Thread(target=lambda: answers.append(coordinator.poll(WORKERS[0])))
    poller.start()
    poller.join(10)
    phase_meanwhile = coordinator.phase
    with pytest.raises(FailedPrecondition, match="not accepting updates"):
        coordinator.receive_upload(
            upload_header(WORKERS[0], delta, round_=1, kind=UploadKind.DELTA), vector_chunks(delta)
        )
    release.set()
    uploader.join(30)

    # Assert: answered (wait) during the write; the round then committed and its evaluation opened.
    assert not poller.is_alive()
    assert [a.kind for a in answers] == [TaskKind.WAIT]
    assert phase_meanwhile == "commit"
    assert not uploader.is_alive()
    assert coordinator.phase == "evaluate"
    assert coordinator.poll(WORKERS[0]).kind is TaskKind.EVALUATE


def test_an_operator_stop_during_the_write_ends_the_run_once_the_version_stands(
    coordinator: Coordinator, slow_disk: SlowDisk
) -> None:
    writing, release, delta = slow_disk.writing, slow_disk.release, slow_disk.delta
    uploader = threading.Thread(
        target=coordinator.receive_upload,
        args=(upload_header(WORKERS[-1], delta, round_=1, kind=UploadKind.DELTA), vector_chunks(delta)),
    )
    uploader.start()
    assert writing.wait(30)

    coordinator.stop(now=True, reason="maintenance")
    phase_meanwhile = coordinator.phase
    release.set()
    uploader.join(30)

    assert phase_meanwhile == "commit"
    assert coordinator.phase == "finished"
    assert coordinator._versions.current is not None
    assert coordinator._versions.current.number == 1  # the version written stands


def test_held_polls_of_every_worker_hear_at_once_that_a_written_round_is_under_evaluation(
    coordinator: Coordinator,
) -> None:
    # Prepare: round 1 with two updates in; the other workers' polls held (long) while the last one closes it.
    initialized(coordinator)
    delta = np.ones(MANIFEST.numel, dtype=np.float32)
    for w in WORKERS[:-1]:
        coordinator.receive_upload(upload_header(w, delta, round_=1, kind=UploadKind.DELTA), vector_chunks(delta))
    answers: dict[str, tuple[TaskKind, float]] = {}

    def held(worker: str) -> None:
        task = coordinator.poll(worker, hold_s=30.0)
        answers[worker] = (task.kind, time.monotonic())

    pollers = [threading.Thread(target=held, args=(w,)) for w in WORKERS[:-1]]
    for poller in pollers:
        poller.start()
    time.sleep(0.2)  # both held

    # Execute: the last upload closes the round; its own thread writes the version.
    coordinator.receive_upload(upload_header(WORKERS[-1], delta, round_=1, kind=UploadKind.DELTA), vector_chunks(delta))
    written = time.monotonic()
    for poller in pollers:
        poller.join(30)

    # Assert: each held poll answered EVALUATE when the version stood, not when its 30 s hold ran out.
    assert {w: kind for w, (kind, _) in answers.items()} == dict.fromkeys(WORKERS[:-1], TaskKind.EVALUATE)
    assert all(at - written < 10 for _, at in answers.values())


def test_held_polls_hear_at_once_that_the_initial_model_is_under_evaluation(coordinator: Coordinator) -> None:
    for w in WORKERS:
        coordinator.join(w, 100)
    assert coordinator.poll("clinical").kind is TaskKind.INITIALIZE
    answers: list[tuple[TaskKind, float]] = []
    poller = threading.Thread(
        target=lambda: answers.append((coordinator.poll("legal", hold_s=30.0).kind, time.monotonic()))
    )
    poller.start()
    time.sleep(0.2)

    vector = initial_vector()
    coordinator.receive_upload(
        upload_header("clinical", vector, round_=0, kind=UploadKind.INITIAL), vector_chunks(vector)
    )
    uploaded = time.monotonic()
    poller.join(30)

    assert [kind for kind, _ in answers] == [TaskKind.EVALUATE]
    assert answers[0][1] - uploaded < 10

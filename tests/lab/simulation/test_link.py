"""The in-process transport over a real coordinator: chunks, digests, byte counts, and refusals as the Protocol's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from fedlora_common.messages import ModelVersion, TaskKind, UploadKind
from fedlora_lab.simulation.clock import ContendedClock
from fedlora_lab.simulation.link import InProcessClient
from fedlora_server.coordinator import Coordinator
from fedlora_server.metrics import ServerMetrics
from fedlora_server.store import MemoryStore
from fedlora_worker.coordinator import NotJoined, Refused, StaleTask
from tests.server.conftest import ADAPTER_CONFIG, MANIFEST, WORKERS, eval_report, initial_vector, run_settings

CHUNK = 1024


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def coordinator(tmp_path: Path, registry: CollectorRegistry) -> Coordinator:
    return Coordinator(settings=run_settings(tmp_path), store=MemoryStore(), metrics=ServerMetrics(registry))


@pytest.fixture
def clock() -> ContendedClock:
    return ContendedClock(cores=1, threads=1)  # its pace is 1 / the sites working, once two or more work


@pytest.fixture
def clients(coordinator: Coordinator, clock: ContendedClock) -> dict[str, InProcessClient]:
    return {w: InProcessClient(coordinator=coordinator, worker_id=w, clock=clock, chunk_bytes=CHUNK) for w in WORKERS}


def _join_all(clients: dict[str, InProcessClient]) -> None:
    """Each joins and is told to wait (admission, then clinical initializes)."""
    for client in clients.values():
        client.join(100)
        assert client.poll("test-run").kind is TaskKind.WAIT


def _initialize(clients: dict[str, InProcessClient]) -> list[int]:
    """Join all, let clinical upload the initial model; returns the byte counts its upload reported."""
    _join_all(clients)
    task = clients["clinical"].poll("test-run")
    assert task.kind is TaskKind.INITIALIZE
    sent: list[int] = []
    clients["clinical"].upload(
        run_id="test-run",
        round_=0,
        kind=UploadKind.INITIAL,
        base_version=0,
        num_examples=100,
        vector=initial_vector(),
        manifest=MANIFEST,
        artifact_config_json=ADAPTER_CONFIG,
        on_bytes=sent.append,
    )
    return sent


def test_a_poll_before_join_is_not_joined(clients: dict[str, InProcessClient], clock: ContendedClock) -> None:
    with pytest.raises(NotJoined):
        clients["clinical"].poll("test-run")

    assert clock.pace == 1.0


def test_a_site_works_from_its_join_or_a_poll_that_gives_it_a_task_until_its_next_poll(
    clients: dict[str, InProcessClient], clock: ContendedClock
) -> None:
    clients["clinical"].join(100)  # loading its model
    clients["legal"].join(100)
    both_loading = clock.pace
    clients["clinical"].poll("test-run")
    clients["legal"].poll("test-run")
    clients["finance"].join(100)
    clients["finance"].poll("test-run")
    nobody = clock.pace
    initialize = clients["clinical"].poll("test-run")
    legal_waits = clients["legal"].poll("test-run")
    one_works = clock.pace

    assert both_loading == 0.5
    assert nobody == 1.0
    assert (initialize.kind, legal_waits.kind) == (TaskKind.INITIALIZE, TaskKind.WAIT)
    assert one_works == 1.0
    clients["legal"].join(100)  # a rejoin: loading again, beside clinical's initial upload
    assert clock.pace == 0.5


def test_a_poll_for_another_run_is_not_joined(clients: dict[str, InProcessClient]) -> None:
    clients["clinical"].join(100)

    with pytest.raises(NotJoined, match="not this coordinator's run"):
        clients["clinical"].poll("another-run")


def test_the_initial_upload_goes_in_chunks_and_the_download_gives_it_back_verified(
    clients: dict[str, InProcessClient], coordinator: Coordinator, registry: CollectorRegistry
) -> None:
    size = initial_vector().nbytes

    sent = _initialize(clients)
    task = clients["clinical"].poll("test-run")
    assert task.kind is TaskKind.EVALUATE
    assert task.global_version is not None
    received: list[int] = []
    model = clients["clinical"].download("test-run", task.global_version, on_bytes=received.append)

    assert sent == [CHUNK] * (size // CHUNK) + ([size % CHUNK] if size % CHUNK else [])
    assert received == sent
    np.testing.assert_array_equal(model.vector, initial_vector())
    assert model.version == task.global_version
    assert model.config_json == ADAPTER_CONFIG
    assert registry.get_sample_value("fedlora_sent_bytes_total") == size


def test_a_version_the_coordinator_no_longer_holds_is_a_stale_task(clients: dict[str, InProcessClient]) -> None:
    _initialize(clients)
    gone = ModelVersion(version=7, size_bytes=4, sha256=b"\0" * 32, manifest=MANIFEST)

    with pytest.raises(StaleTask, match="version 7"):
        clients["legal"].download("test-run", gone)


def test_an_update_outside_training_and_a_report_of_a_closed_round_are_stale_tasks(
    clients: dict[str, InProcessClient],
) -> None:
    _initialize(clients)
    delta = np.ones(MANIFEST.numel, dtype=np.float32)

    with pytest.raises(StaleTask, match="not accepting updates"):
        clients["legal"].upload(
            run_id="test-run", round_=1, kind=UploadKind.DELTA, base_version=1, num_examples=100, vector=delta
        )
    with pytest.raises(StaleTask, match="no evaluation of round 3"):
        clients["legal"].report(eval_report("legal", 3, 1.0))


def test_a_report_acting_for_another_worker_is_refused(clients: dict[str, InProcessClient]) -> None:
    _initialize(clients)

    with pytest.raises(
        Refused, match="report: PERMISSION_DENIED: credentials of legal cannot act as 'finance'"
    ) as info:
        clients["legal"].report(eval_report("finance", 0, 1.0))
    assert info.value.code == "PERMISSION_DENIED"


def test_a_resent_update_counts_as_received_and_is_taken_once(
    clients: dict[str, InProcessClient], registry: CollectorRegistry
) -> None:
    _initialize(clients)
    for worker, client in clients.items():
        client.report(eval_report(worker, 0, 3.0))
    delta = np.full(MANIFEST.numel, 0.01, dtype=np.float32)

    def send() -> int:
        return clients["legal"].upload(
            run_id="test-run", round_=1, kind=UploadKind.DELTA, base_version=0, num_examples=100, vector=delta
        )

    before = registry.get_sample_value("fedlora_received_bytes_total") or 0.0
    first, again = send(), send()

    assert first == again == delta.nbytes
    assert registry.get_sample_value("fedlora_received_bytes_total") == before + delta.nbytes


def test_a_site_that_leaves_or_is_told_the_run_finished_works_no_more(
    clients: dict[str, InProcessClient], coordinator: Coordinator, clock: ContendedClock
) -> None:
    _join_all(clients)
    for client in clients.values():
        client.join(100)  # each loading its model again: three work

    clients["finance"].leave("test-run", "out of memory")
    finance_left = clock.pace
    finished = clients["clinical"].poll("test-run")

    assert coordinator.failure is not None
    assert finance_left == 0.5
    assert finished.kind is TaskKind.FINISHED
    assert clock.pace == 1.0  # legal alone

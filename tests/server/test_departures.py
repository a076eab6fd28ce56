"""A participant that fails fails at most its attempt; a worker that cannot go on is dropped at once, and named."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from fedlora_common.messages import TaskKind, UploadKind
from fedlora_server.coordinator import Coordinator
from fedlora_server.errors import InvalidArgument
from fedlora_server.intake import UploadSink
from fedlora_server.machine import PhaseMachine
from fedlora_server.metrics import ServerMetrics
from fedlora_server.phases import Training
from fedlora_server.planning import RoundPlans
from fedlora_server.report import build_report
from fedlora_server.server import SERVICE_NAME, CoordinatorServer
from fedlora_server.store import MemoryStore
from fedlora_server.versions import Versions
from tests.server.conftest import (
    LEGAL_AT_FAULT,
    MANIFEST,
    WORKERS,
    Clock,
    ScriptedAttempts,
    connect,
    initial_vector,
    initialized,
    run_settings,
    upload_header,
    vector_chunks,
)


def _coordinator(tmp_path: Path, **overrides: object) -> tuple[Coordinator, MemoryStore]:
    store = MemoryStore()
    settings = run_settings(tmp_path, **overrides)
    return Coordinator(settings=settings, store=store, metrics=ServerMetrics(CollectorRegistry()), clock=Clock()), store


def _upload(coordinator: Coordinator, worker: str, value: float) -> None:
    delta = np.full(MANIFEST.numel, value, dtype=np.float32)
    coordinator.receive_upload(upload_header(worker, delta, round_=1, kind=UploadKind.DELTA), vector_chunks(delta))


def test_a_worker_that_leaves_mid_round_is_not_waited_for_and_is_named(tmp_path: Path) -> None:
    coordinator, store = _coordinator(tmp_path, min_workers=2)
    initialized(coordinator)
    _upload(coordinator, "clinical", 1.0)
    _upload(coordinator, "finance", 3.0)

    coordinator.leave("legal", "CUDA out of memory:\n tried to allocate 2.00 GiB")

    assert coordinator.phase == "evaluate"  # committed at once, no deadline waited out
    np.testing.assert_allclose(coordinator.global_model("clinical", 1).vector, initial_vector() + 2.0, rtol=1e-6)
    report = build_report(run_settings(tmp_path, min_workers=2), store)
    legal = next(w for w in report["workers"] if w["id"] == "legal")
    assert legal["left"] == "CUDA out of memory: tried to allocate 2.00 GiB"
    assert report["failure"] is None


def test_when_too_few_workers_remain_the_run_fails_with_their_reasons(tmp_path: Path) -> None:
    coordinator, store = _coordinator(tmp_path, min_workers=2)
    initialized(coordinator)

    coordinator.leave("legal", "data: /data/legal.jsonl row 3: text is empty")
    assert coordinator.failure is None
    coordinator.leave("finance", "model: base model path does not exist")

    assert coordinator.finished.is_set()
    assert coordinator.failure is not None
    assert "legal: data: /data/legal.jsonl row 3: text is empty" in coordinator.failure
    assert "finance: model: base model path does not exist" in coordinator.failure
    assert coordinator.poll("clinical").kind is TaskKind.FINISHED
    report = build_report(run_settings(tmp_path, min_workers=2), store)
    assert report["failure"] == coordinator.failure
    assert report["adapter_path"] is None  # nothing trained was committed
    assert report["attempt_failures"][-1]["reason"] == coordinator.failure


def test_the_initializer_that_leaves_is_replaced_at_once(tmp_path: Path) -> None:
    coordinator, _ = _coordinator(tmp_path, min_workers=2)
    for w in WORKERS:
        coordinator.join(w, 100)
    assert coordinator.poll("clinical").kind is TaskKind.INITIALIZE

    coordinator.leave("clinical", "model: could not load")

    assert coordinator.poll("finance").kind is TaskKind.INITIALIZE


def test_an_offender_sits_out_the_retry_and_is_named_in_the_failed_attempt(tmp_path: Path) -> None:
    settings = run_settings(tmp_path, min_workers=2)
    store, clock = MemoryStore(), Clock()
    aggregator = ScriptedAttempts(commit=True)
    metrics = ServerMetrics(CollectorRegistry())
    machine = PhaseMachine(
        settings=settings,
        store=store,
        metrics=metrics,
        versions=Versions(state_dir=tmp_path, mode="lora", aggregation="fedavg", store=store, clock=clock),
        aggregator=aggregator,
        plans=RoundPlans(settings, None),
        privacy=None,
        clock=clock,
        spool_dir=tmp_path / "spool",
    )

    initialized(machine)  # type: ignore[arg-type]

    assert [p.participants for p in aggregator.plans] == [WORKERS, ("clinical", "finance")]
    failed = next(r for r in store.rounds() if r.status == "failed")
    assert (failed.excluded, failed.failure) == (("legal",), LEGAL_AT_FAULT)
    assert metrics.excluded_workers._value.get() == 1
    assert machine.phase == "evaluate"


def test_input_that_breaks_the_aggregation_fails_the_attempt_not_the_coordinator(tmp_path: Path) -> None:
    coordinator, store = _coordinator(tmp_path, min_workers=2)
    initialized(coordinator)
    phase = coordinator.current_phase
    assert isinstance(phase, Training)

    def broken(*args: object) -> UploadSink:
        raise KeyError("an unforeseen gap")

    phase.aggregation.open_upload = broken  # type: ignore[method-assign]
    with pytest.raises(InvalidArgument, match="could not be taken into the round"):
        _upload(coordinator, "legal", 1.0)

    attempts = [(r.attempt, r.status, r.excluded) for r in store.rounds() if r.round == 1]
    assert attempts == [(1, "failed", ("legal",)), (2, "training", ())]
    for w in ("clinical", "finance"):
        _upload(coordinator, w, 1.0)
    assert coordinator.phase == "evaluate"


def test_health_turns_not_serving_when_the_run_fails(tmp_path: Path) -> None:
    settings = run_settings(tmp_path, min_workers=2)
    with CoordinatorServer(settings=settings) as server, connect(server) as wire:
        for w in WORKERS:
            wire.join(w)
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        serving = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status

        for w in ("legal", "finance"):
            wire.leave(w, "cannot load the base model")
        deadline = time.monotonic() + 5
        status = serving
        while status == serving and time.monotonic() < deadline:
            time.sleep(0.05)
            status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status

    assert serving == health_pb2.HealthCheckResponse.SERVING
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    report = json.loads((tmp_path / "report.json").read_text())
    assert "cannot load the base model" in report["failure"]


def test_a_failed_run_stays_failed_when_the_coordinator_restarts(tmp_path: Path) -> None:
    coordinator, store = _coordinator(tmp_path, min_workers=2)
    initialized(coordinator)
    for w in ("legal", "finance"):
        coordinator.leave(w, "out of memory")

    restarted = Coordinator(
        settings=run_settings(tmp_path, min_workers=2),
        store=store,
        metrics=ServerMetrics(CollectorRegistry()),
        clock=Clock(),
    )
    restarted.join("clinical", 100)

    assert restarted.finished.is_set()
    assert restarted.failure == coordinator.failure
    assert restarted.poll("clinical").kind is TaskKind.FINISHED

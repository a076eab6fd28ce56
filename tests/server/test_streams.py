"""Strangers cost nothing: credentials are checked before a stream is read, and held streams are bounded."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_server.server import SERVICE_NAME, CoordinatorServer
from fedlora_server.streams import Budget, OverBudget
from tests.server.conftest import MANIFEST, WORKERS, connect, run_settings, start_round_one

UPLOAD = f"/{SERVICE_NAME}/UploadUpdate"


def _held_open(release: threading.Event) -> Iterator[bytes]:
    """A request stream that sends nothing until the test lets it go."""
    release.wait()
    yield from ()


def _open_uploads(
    channel: grpc.Channel, count: int, release: threading.Event, metadata: tuple[tuple[str, str], ...] | None = None
) -> list[grpc.Future]:
    call = channel.stream_unary(UPLOAD, request_serializer=None, response_deserializer=pb.UploadReceipt.FromString)
    return [call.future(_held_open(release), metadata=metadata, timeout=60) for _ in range(count)]


def _health_seconds(port: int) -> float:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        started = time.perf_counter()
        status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        return time.perf_counter() - started


def test_500_idle_unauthenticated_streams_cost_nothing_while_a_round_completes(tmp_path: Path) -> None:
    release = threading.Event()
    with CoordinatorServer(settings=run_settings(tmp_path, rounds=1)) as server, connect(server) as wire:
        strangers = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            # Prepare: 500 streams opened with no token, none of them sending anything.
            held = _open_uploads(strangers, 500, release)
            health_s = max(_health_seconds(server.port) for _ in range(5))

            # Execute: a whole legitimate round meanwhile.
            start_round_one(wire)
            for w in WORKERS:
                wire.upload(w, np.ones(MANIFEST.numel, dtype=np.float32), round_=1)
            for w in WORKERS:
                wire.report(w, 1, 1)
            finished = server.wait_finished()
            codes = [f.exception().code() for f in held]  # type: ignore[union-attr]
        finally:
            release.set()
            strangers.close()

    # Assert
    assert finished
    assert health_s < 1.0
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    assert json.loads((tmp_path / "report.json").read_text())["rounds"][0]["round"] == 1


def test_a_worker_may_hold_only_so_many_streams(tmp_path: Path) -> None:
    settings = run_settings(tmp_path, limits={"chunk_bytes": 1024, "max_streams_per_worker": 2})
    release = threading.Event()
    with CoordinatorServer(settings=settings) as server, connect(server) as wire:
        start_round_one(wire)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        held = _open_uploads(channel, 2, release, wire.md("legal"))
        time.sleep(0.3)  # both streams admitted and waiting for their header
        try:
            wire.upload("legal", np.ones(MANIFEST.numel, dtype=np.float32), round_=1)
            refused = None
        except grpc.RpcError as exc:
            refused = exc.code()
        finally:
            release.set()
        for future in held:
            future.exception()
        accepted = wire.upload("legal", np.ones(MANIFEST.numel, dtype=np.float32), round_=1)
        channel.close()

    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert accepted.round == 1


def test_an_idle_upload_is_cancelled_and_the_worker_can_upload_again(tmp_path: Path) -> None:
    settings = run_settings(tmp_path, limits={"chunk_bytes": 1024, "stream_idle_s": 0.5})
    release = threading.Event()
    with CoordinatorServer(settings=settings) as server, connect(server) as wire:
        start_round_one(wire)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        (idle,) = _open_uploads(channel, 1, release, wire.md("legal"))
        started = time.perf_counter()
        error = idle.exception(timeout=10)
        waited = time.perf_counter() - started
        release.set()
        accepted = wire.upload("legal", np.ones(MANIFEST.numel, dtype=np.float32), round_=1)
        channel.close()

    assert error is not None
    assert error.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert waited < 5
    assert accepted.round == 1


def test_a_budget_refuses_past_its_limit_in_all_and_past_one_callers_share() -> None:
    budget = Budget("calls", 3, per_caller=2)
    budget.take("legal")
    budget.take("legal")

    with pytest.raises(OverBudget) as own:
        budget.take("legal")
    budget.take("clinical")
    with pytest.raises(OverBudget) as all_:
        budget.take("finance")

    assert own.value.per_caller
    assert not all_.value.per_caller
    assert budget.held() == 3


def test_a_slot_is_given_back_once_however_often_it_is_released() -> None:
    budget = Budget("calls", 1)
    slot = budget.take("legal")

    slot.release()
    slot.release()
    budget.take("legal")

    assert budget.held() == 1
    with pytest.raises(OverBudget):
        budget.take("clinical")

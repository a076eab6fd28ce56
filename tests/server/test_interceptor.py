"""The door: strangers are refused before a byte of their request is read, every class of call has capacity
of its own that no other can take, and a request that never finishes arriving is cut at the read deadline.

Half-sent requests come from a raw HTTP/2 client (tests/h2client.py): a length prefix declaring 100,000
bytes, then 10 of them, the stream never ended."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedlora_common.messages import TaskKind
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_server.server import SERVICE_NAME, CoordinatorServer
from fedlora_worker.config import RetrySettings
from fedlora_worker.transport import CoordinatorClient
from tests.h2client import RawConnection
from tests.server.conftest import Wire, connect, run_settings, token_of

JOIN, POLL = f"/{SERVICE_NAME}/Join", f"/{SERVICE_NAME}/PollTask"
HEALTH = "/grpc.health.v1.Health/Check"
HALF_SENT: dict[str, Any] = {"body": b"\0" * 10, "declared": 100_000}
UNAUTHENTICATED, CANCELLED, RESOURCE_EXHAUSTED = "16", "1", "8"
PATIENCE_S = 30.0
"""How long a test waits for an answer that must come: generous, never a bound on how fast it comes."""


def _settings(tmp_path: Path, **limits: Any) -> Any:
    # Chunks of 1 MiB (the default) let a message declare 100,000 bytes: gRPC refuses larger ones itself.
    return run_settings(tmp_path, limits={"chunk_bytes": 2**20, **limits})


def _health(port: int) -> tuple[int, float]:
    """The coordinator's health as a probe sees it, and how long the answer took."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        started = time.perf_counter()
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=PATIENCE_S
        )
        return response.status, time.perf_counter() - started


def _poll(wire: Wire, worker: str) -> tuple[int, float]:
    started = time.perf_counter()
    task = wire.stub.PollTask(
        pb.PollTaskRequest(worker_id=worker, run_id="test-run"), metadata=wire.md(worker), timeout=PATIENCE_S
    )
    return task.kind, time.perf_counter() - started


def _refused(server: CoordinatorServer, reason: str) -> float:
    return server.registry.get_sample_value("fedlora_door_refused_total", {"reason": reason}) or 0.0


def test_a_hundred_half_sent_joins_without_a_token_on_one_connection_leave_health_and_polls_answering(
    tmp_path: Path,
) -> None:
    with CoordinatorServer(settings=_settings(tmp_path)) as server, connect(server) as wire:
        wire.join("clinical")
        with RawConnection(server.port) as flood:
            # Prepare: one connection carrying 100 Joins without a token, each stopped after 10 of its 100,000 bytes.
            calls = [flood.call(JOIN, **HALF_SENT) for _ in range(100)]
            ended = flood.statuses(calls, timeout_s=PATIENCE_S)

            # Execute: while that connection stays open, a probe and a joined worker call.
            health, health_s = _health(server.port)
            task, poll_s = _poll(wire, "clinical")
            unauthenticated = _refused(server, "unauthenticated")
    print(f"under the flood: health answered in {health_s * 1e3:.1f} ms, a poll in {poll_s * 1e3:.1f} ms")

    # Assert: each flood call was refused unread (or, past the connection's limit of calls, reset), none held.
    assert len(ended) == len(calls)
    assert all(status == UNAUTHENTICATED or status.startswith("reset ") for status in ended.values()), ended
    assert unauthenticated == list(ended.values()).count(UNAUTHENTICATED) > 0
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert task == pb.TASK_KIND_WAIT


def test_a_half_sent_request_of_a_worker_is_cancelled_once_the_read_deadline_passes(tmp_path: Path) -> None:
    with CoordinatorServer(settings=_settings(tmp_path, request_read_s=0.5)) as server, connect(server) as wire:
        wire.join("clinical")
        with RawConnection(server.port) as raw:
            # Prepare: a poll with the worker's own token that stops after 10 of its 100,000 bytes.
            call = raw.call(POLL, metadata=wire.md("clinical"), **HALF_SENT)

            # Execute
            ended = raw.statuses([call], timeout_s=PATIENCE_S)
            task, _ = _poll(wire, "clinical")

    # Assert: the coordinator ended it by itself, counted it, and the worker's next poll is answered.
    assert ended == {call: CANCELLED}
    assert _refused(server, "read_deadline") == 1
    assert task == pb.TASK_KIND_WAIT


def test_a_worker_holding_calls_open_is_refused_more_while_other_workers_and_health_go_on(tmp_path: Path) -> None:
    settings = _settings(tmp_path, max_calls_per_worker=4)
    with CoordinatorServer(settings=settings) as server, connect(server) as wire:
        for worker in ("clinical", "legal"):
            wire.join(worker)
        with RawConnection(server.port) as raw:
            # Prepare: "legal" opens ten half-sent polls; four take its slots, the rest are refused at once.
            calls = [raw.call(POLL, metadata=wire.md("legal"), **HALF_SENT) for _ in range(10)]
            refused = raw.statuses(calls, timeout_s=PATIENCE_S, at_least=6)

            # Execute: its own poll, another worker's, and a probe, while the four are held.
            try:
                wire.poll("legal")
                own = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                own = exc.code()
            other, _ = _poll(wire, "clinical")
            health, _ = _health(server.port)
        # Hung up: the four held calls end, and a worker that retries RESOURCE_EXHAUSTED gets through.
        client = CoordinatorClient(
            target=f"127.0.0.1:{server.port}",
            worker_id="legal",
            token=token_of("legal"),
            retry=RetrySettings(attempts=50, initial_backoff_s=0.05, max_backoff_s=0.2),
        )
        later = client.poll("test-run")
        client.close()

    # Assert
    assert sorted(refused.values()) == [RESOURCE_EXHAUSTED] * 6
    assert own == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _refused(server, "worker_limit") >= 7
    assert other == pb.TASK_KIND_WAIT
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert later.kind is TaskKind.WAIT


def test_half_sent_health_checks_take_only_the_health_budget_and_end_at_the_read_deadline(tmp_path: Path) -> None:
    settings = _settings(tmp_path, max_health_calls=2, request_read_s=1.0)
    with CoordinatorServer(settings=settings) as server, connect(server) as wire:
        wire.join("clinical")
        with RawConnection(server.port) as raw:
            # Prepare: five half-sent health checks from a stranger (health needs no token); two take the budget.
            calls = [raw.call(HEALTH, **HALF_SENT) for _ in range(5)]
            refused = raw.statuses(calls, timeout_s=PATIENCE_S, at_least=3)

            # Execute: a worker polls meanwhile; then the two held are cut at the read deadline.
            task, _ = _poll(wire, "clinical")
            ended = raw.statuses(calls, timeout_s=PATIENCE_S)
        health, _ = _health(server.port)

    # Assert
    assert sorted(refused.values()) == [RESOURCE_EXHAUSTED] * 3
    assert task == pb.TASK_KIND_WAIT
    assert sorted(ended.values()) == [CANCELLED] * 2 + [RESOURCE_EXHAUSTED] * 3
    assert _refused(server, "health_busy") == 3
    assert _refused(server, "read_deadline") == 2
    assert health == health_pb2.HealthCheckResponse.SERVING

"""A coordinator on port 0 with three allowed workers, and a way to speak the raw wire to it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedlora_common.chunking import iter_chunks, sha256
from fedlora_common.manifest import Manifest, TensorSpec
from fedlora_common.messages import MetricsReport, TaskKind, UploadHeader, UploadKind
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.proto.fedlora.v1 import coordinator_pb2_grpc as pb_grpc
from fedlora_common.serde import manifest_to_proto
from fedlora_server.aggregation import (
    Aggregate,
    AggregationFailed,
    Aggregator,
    Ask,
    AttemptPlan,
    Closing,
    RoundAggregation,
)
from fedlora_server.config import RunSettings
from fedlora_server.coordinator import Coordinator
from fedlora_server.errors import FailedPrecondition
from fedlora_server.intake import Received, UploadSink
from fedlora_server.server import CoordinatorServer

WORKERS = ("clinical", "finance", "legal")
MANIFEST = Manifest(
    (
        TensorSpec("base_model.model.layers.0.q_proj.lora_A.weight", (4, 128)),
        TensorSpec("base_model.model.layers.0.q_proj.lora_B.weight", (128, 4)),
    )
)
ADAPTER_CONFIG = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})


def token_of(worker: str) -> str:
    return f"token-of-{worker}"


def run_settings(state_dir: Path, **overrides: Any) -> RunSettings:
    values: dict[str, Any] = {
        "run_id": "test-run",
        "base_model": "tiny",
        "rounds": 2,
        "min_workers": 3,
        "workers": [{"id": w, "token_sha256": hashlib.sha256(token_of(w).encode()).hexdigest()} for w in WORKERS],
        "state_dir": state_dir,
        "listen": {"host": "127.0.0.1", "port": 0, "metrics_port": 0},
        "timeouts": {"poll_wait_ms": 10},
        "limits": {"chunk_bytes": 1024},
        "secure_aggregation": {"enabled": False},
    }
    values.update(overrides)
    return RunSettings.model_validate(values)


@dataclass
class Wire:
    """A raw client of the coordinator: it can send anything, including what a real worker never would."""

    stub: pb_grpc.CoordinatorStub

    def md(self, worker: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token_of(worker)}"),)

    def join(self, worker: str, examples: int = 100) -> pb.JoinResponse:
        return self.stub.Join(pb.JoinRequest(worker_id=worker, num_examples=examples), metadata=self.md(worker))

    def poll(self, worker: str) -> pb.Task:
        return self.stub.PollTask(pb.PollTaskRequest(worker_id=worker, run_id="test-run"), metadata=self.md(worker))

    def upload(
        self,
        worker: str,
        vector: np.ndarray,
        *,
        round_: int,
        kind: int = pb.UPLOAD_KIND_DELTA,
        base_version: int = 0,
        examples: int = 100,
        chunk_bytes: int = 1024,
        mutate: Any = None,
        header_changes: dict[str, Any] | None = None,
    ) -> pb.UploadReceipt:
        payload = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        chunks = [bytes(c) for c in iter_chunks(payload, chunk_bytes)]
        header = pb.UploadHeader(
            worker_id=worker,
            run_id="test-run",
            round=round_,
            kind=kind,
            base_version=base_version,
            num_examples=examples,
            total_size=len(payload),
            chunk_count=len(chunks),
            sha256=sha256(payload),
            dtype="float32",
            train_loss=1.0,
        )
        if kind == pb.UPLOAD_KIND_INITIAL:
            header.manifest.CopyFrom(manifest_to_proto(MANIFEST))
            header.artifact_config_json = ADAPTER_CONFIG
        for key, value in (header_changes or {}).items():
            setattr(header, key, value)
        messages = [pb.UploadMessage(header=header)] + [
            pb.UploadMessage(chunk=pb.Chunk(seq=i, data=c)) for i, c in enumerate(chunks)
        ]
        if mutate is not None:
            messages = mutate(messages)
        return self.stub.UploadUpdate(iter(messages), metadata=self.md(worker))

    def download(self, worker: str, version: int) -> tuple[pb.DownloadHeader, bytes]:
        stream = self.stub.DownloadGlobal(
            pb.DownloadRequest(worker_id=worker, run_id="test-run", version=version), metadata=self.md(worker)
        )
        header = next(stream).header
        return header, b"".join(m.chunk.data for m in stream)

    def leave(self, worker: str, reason: str) -> None:
        request = pb.LeaveRequest(worker_id=worker, run_id="test-run", reason=reason)
        self.stub.Leave(request, metadata=self.md(worker))

    def report(self, worker: str, round_: int, version: int, loss: float = 2.0) -> None:
        self.stub.ReportMetrics(
            pb.MetricsReport(
                worker_id=worker, run_id="test-run", round=round_, version=version, eval_loss=loss, eval_tokens=50
            ),
            metadata=self.md(worker),
        )


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CoordinatorServer]:
    with CoordinatorServer(settings=run_settings(tmp_path)) as running:
        yield running


@contextmanager
def connect(server: CoordinatorServer) -> Iterator[Wire]:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Wire(pb_grpc.CoordinatorStub(channel))
    finally:
        channel.close()


@pytest.fixture
def wire(server: CoordinatorServer) -> Iterator[Wire]:
    with connect(server) as connected:
        yield connected


def initial_vector() -> np.ndarray:
    return np.random.default_rng(0).normal(size=MANIFEST.numel).astype(np.float32) * 0.1


def start_round_one(wire: Wire) -> None:
    """Join all, initialize, evaluate version 0: leaves the coordinator accepting round-1 updates."""
    for w in WORKERS:
        wire.join(w)
    assert wire.poll("clinical").kind == pb.TASK_KIND_INITIALIZE
    wire.upload("clinical", initial_vector(), round_=0, kind=pb.UPLOAD_KIND_INITIAL)
    for w in WORKERS:
        task = wire.poll(w)
        assert task.kind == pb.TASK_KIND_EVALUATE
        wire.report(w, 0, 0, loss=3.0)
    assert wire.poll("legal").kind == pb.TASK_KIND_TRAIN


# ---- driving the coordinator directly, without gRPC ---------------------------------------


class Clock:
    """A clock a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def vector_chunks(vector: np.ndarray) -> Iterator[tuple[int, bytes]]:
    return ((i, bytes(c)) for i, c in enumerate(iter_chunks(vector.tobytes(), 1024)))


def upload_header(
    worker: str, vector: np.ndarray, *, round_: int, kind: UploadKind, num_examples: int = 100
) -> UploadHeader:
    payload = vector.tobytes()
    return UploadHeader(
        worker_id=worker,
        run_id="test-run",
        round=round_,
        kind=kind,
        base_version=0,
        num_examples=num_examples,
        total_size=len(payload),
        chunk_count=-(-len(payload) // 1024),
        sha256=sha256(payload),
        dtype="float32",
        manifest=MANIFEST if kind is UploadKind.INITIAL else None,
        artifact_config_json=ADAPTER_CONFIG if kind is UploadKind.INITIAL else "",
        train_loss=1.0,
    )


def eval_report(worker: str, round_: int, loss: float) -> MetricsReport:
    return MetricsReport(worker, "test-run", round_, round_, eval_loss=loss, eval_tokens=50)


def initialized(coordinator: Coordinator, ranks: dict[str, int] | None = None) -> None:
    """Join all (at `ranks`, if given), initialize and evaluate version 0 directly: leaves the coordinator in
    round 1's training."""
    for w in WORKERS:
        coordinator.join(w, 100, rank=(ranks or {}).get(w, 0))
    assert coordinator.phase == "initialize"
    task = coordinator.poll("clinical")
    assert task.kind is TaskKind.INITIALIZE
    vector = initial_vector()
    coordinator.receive_upload(
        upload_header("clinical", vector, round_=0, kind=UploadKind.INITIAL), vector_chunks(vector)
    )
    for w in WORKERS:
        coordinator.report_metrics(eval_report(w, 0, 3.0))


# ---- an aggregator a test scripts ----------------------------------------------------------------

LEGAL_AT_FAULT = "legal revealed a share off the polynomial"


class ScriptedAttempts(Aggregator):
    """Attempts that take no upload: with `cheat` the first fails showing legal at fault (LEGAL_AT_FAULT); the
    others commit a zero update at once with `commit`, or stay open until the test moves on."""

    def __init__(self, *, cheat: bool = True, commit: bool = False) -> None:
        self.plans: list[AttemptPlan] = []
        self._cheat = cheat
        self._commit = commit

    def open(self, plan: AttemptPlan) -> RoundAggregation:
        self.plans.append(plan)
        return _ScriptedAttempt(plan, fail=self._cheat and len(self.plans) == 1, commit=self._commit)


class _ScriptedAttempt(RoundAggregation):
    def __init__(self, plan: AttemptPlan, *, fail: bool, commit: bool) -> None:
        super().__init__(plan)
        self._fail = fail
        self._commit = commit

    @property
    def deadline_at(self) -> float:
        return float("inf")

    def ask(self, worker: str) -> Ask | None:
        return None

    def open_upload(self, header: UploadHeader) -> UploadSink:
        raise FailedPrecondition("this scripted attempt takes no upload")

    def accept(self, header: UploadHeader, sink: UploadSink, received: Received) -> int:
        raise FailedPrecondition("this scripted attempt takes no upload")

    def drop(self, worker: str) -> None:
        pass

    def step(self, now: float) -> Closing | None:
        if self._fail:
            raise AggregationFailed(LEGAL_AT_FAULT, offenders=("legal",))
        if not self._commit:
            return None
        return Closing(lambda: Aggregate(np.zeros(self.plan.numel, dtype=np.float32), self.plan.participants))

    def progress(self) -> Hashable:
        return self._fail

    @property
    def missing(self) -> tuple[str, ...]:
        return ()

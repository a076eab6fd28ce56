"""Self-reported numbers are bounded: out-of-range values are INVALID_ARGUMENT, never UNKNOWN or a spoiled report."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_server.server import CoordinatorServer
from tests.server.conftest import MANIFEST, WORKERS, Wire, start_round_one


def _status(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        call()  # type: ignore[operator]
    return refused.value.code()


def _report(wire: Wire, **fields: object) -> grpc.StatusCode:
    values: dict[str, object] = {
        "worker_id": "clinical",
        "run_id": "test-run",
        "round": 0,
        "version": 0,
        "eval_loss": 2.0,
        "eval_tokens": 50,
    }
    values.update(fields)
    return _status(lambda: wire.stub.ReportMetrics(pb.MetricsReport(**values), metadata=wire.md("clinical")))


@pytest.mark.parametrize(
    "fields",
    [
        {"eval_loss": 1e308},
        {"eval_loss": float("nan")},
        {"eval_loss": -1.0},
        {"train_loss": float("inf")},
        {"tokens_per_second": float("inf")},
        {"record_epsilon": float("nan")},
        {"eval_tokens": 2**64 - 1},
        {"memorization": pb.Memorization(overall=pb.MemorizationRates(count=3, exact_match_rate=1.5))},
        {"memorization": pb.Memorization(overall=pb.MemorizationRates(count=3, mean_exposure=float("inf")))},
    ],
)
def test_a_report_out_of_range_is_invalid_argument(wire: Wire, fields: dict[str, object]) -> None:
    for w in WORKERS:
        wire.join(w)

    assert _report(wire, **fields) == grpc.StatusCode.INVALID_ARGUMENT


def test_counts_beyond_64_bits_are_invalid_argument(server: CoordinatorServer, wire: Wire) -> None:
    join = pb.JoinRequest(worker_id="clinical", num_examples=2**64 - 1)

    assert _status(lambda: wire.stub.Join(join, metadata=wire.md("clinical"))) == grpc.StatusCode.INVALID_ARGUMENT
    start_round_one(wire)
    delta = np.ones(MANIFEST.numel, dtype=np.float32)
    code = _status(lambda: wire.upload("legal", delta, round_=1, examples=2**63 + 5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert server.coordinator.phase == "train"

"""Every refusal has its status, and leaves the coordinator as it was."""

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from fedlora_common.compatibility import OLDEST_PROTOCOL, PROTOCOL
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_server.aggregation import PlainRoundAggregation
from fedlora_server.phases import Training
from fedlora_server.server import CoordinatorServer
from tests.server.conftest import MANIFEST, Wire, start_round_one

GOOD = np.linspace(-1, 1, MANIFEST.numel).astype(np.float32)


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _accumulated(server: CoordinatorServer) -> tuple[float, int]:
    phase = server.coordinator.current_phase
    assert isinstance(phase, Training)
    aggregation = phase.aggregation
    assert isinstance(aggregation, PlainRoundAggregation)
    acc = aggregation.accumulator
    return float(np.abs(acc._sum).sum()), acc.contributors


def test_unknown_or_missing_credentials_are_unauthenticated(wire: Wire) -> None:
    request = pb.JoinRequest(worker_id="clinical", num_examples=1)

    assert _code(lambda: wire.stub.Join(request)) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        _code(lambda: wire.stub.Join(request, metadata=(("authorization", "Bearer forged"),)))
        == grpc.StatusCode.UNAUTHENTICATED
    )


def test_acting_as_another_worker_is_permission_denied(wire: Wire) -> None:
    request = pb.JoinRequest(worker_id="legal", num_examples=1)

    assert _code(lambda: wire.stub.Join(request, metadata=wire.md("clinical"))) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(("protocol", "upgrade"), [(PROTOCOL + 1, "coordinator"), (OLDEST_PROTOCOL - 1 or None, None)])
def test_a_worker_speaking_another_protocol_is_refused_naming_both_versions(
    server: CoordinatorServer, wire: Wire, protocol: int | None, upgrade: str | None
) -> None:
    # Prepare: a worker of a release the coordinator cannot speak with (or, where no older protocol is retired
    # yet, one that sends no version at all, as fedlora 0.1 did).
    request = pb.JoinRequest(worker_id="clinical", num_examples=1, software_version="9.9.9", protocol_version=protocol)

    if upgrade is None:  # protocol 1 is the oldest: a worker that sends none is admitted
        wire.stub.Join(request, metadata=wire.md("clinical"))
        return
    with pytest.raises(grpc.RpcError) as refused:
        wire.stub.Join(request, metadata=wire.md("clinical"))

    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    details = refused.value.details()
    assert f"the worker speaks protocol {protocol} (fedlora 9.9.9)" in details
    assert f"the coordinator protocols {OLDEST_PROTOCOL}-{PROTOCOL}" in details
    assert details.endswith(f"upgrade the {upgrade}")
    assert server.coordinator.phase == "admission"


def test_polling_before_joining_is_a_failed_precondition(wire: Wire) -> None:
    assert _code(lambda: wire.poll("clinical")) == grpc.StatusCode.FAILED_PRECONDITION


def test_an_initial_model_from_a_worker_not_asked_is_refused(wire: Wire) -> None:
    for w in ("clinical", "finance", "legal"):
        wire.join(w)

    code = _code(lambda: wire.upload("legal", GOOD, round_=0, kind=pb.UPLOAD_KIND_INITIAL))

    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert wire.poll("clinical").kind == pb.TASK_KIND_INITIALIZE


def _drop_chunk(messages: list[pb.UploadMessage]) -> list[pb.UploadMessage]:
    return messages[:1] + messages[2:]


def _corrupt_chunk(messages: list[pb.UploadMessage]) -> list[pb.UploadMessage]:
    messages[1].chunk.data = bytes(len(messages[1].chunk.data))
    return messages


def _second_header(messages: list[pb.UploadMessage]) -> list[pb.UploadMessage]:
    return [*messages[:2], messages[0], *messages[2:]]


def _truncate(messages: list[pb.UploadMessage]) -> list[pb.UploadMessage]:
    return messages[:-1]


BAD_UPLOADS: dict[str, tuple[dict[str, Any], Any, Any, grpc.StatusCode]] = {
    "sequence gap": ({}, _drop_chunk, GOOD, grpc.StatusCode.INVALID_ARGUMENT),
    "digest mismatch": ({}, _corrupt_chunk, GOOD, grpc.StatusCode.INVALID_ARGUMENT),
    "wrong total size": ({"total_size": MANIFEST.nbytes - 4}, None, GOOD, grpc.StatusCode.INVALID_ARGUMENT),
    "truncated stream": ({}, _truncate, GOOD, grpc.StatusCode.INVALID_ARGUMENT),
    "header twice": ({}, _second_header, GOOD, grpc.StatusCode.INVALID_ARGUMENT),
    "nan": ({}, None, np.where(np.arange(MANIFEST.numel) == 7, np.nan, GOOD), grpc.StatusCode.INVALID_ARGUMENT),
    "inf": ({}, None, np.where(np.arange(MANIFEST.numel) == 300, np.inf, GOOD), grpc.StatusCode.INVALID_ARGUMENT),
    "wrong dtype": ({"dtype": "float16"}, None, GOOD, grpc.StatusCode.INVALID_ARGUMENT),
    "oversize": ({"total_size": 2**40}, None, GOOD, grpc.StatusCode.RESOURCE_EXHAUSTED),
    "wrong round": ({"round": 5}, None, GOOD, grpc.StatusCode.FAILED_PRECONDITION),
    "stale base version": ({"base_version": 3}, None, GOOD, grpc.StatusCode.FAILED_PRECONDITION),
    "wrong run": ({"run_id": "other-run"}, None, GOOD, grpc.StatusCode.FAILED_PRECONDITION),
    "unspecified kind": ({"kind": pb.UPLOAD_KIND_UNSPECIFIED}, None, GOOD, grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_a_bad_upload_is_rejected_whole_and_the_accumulator_is_unchanged(
    server: CoordinatorServer, wire: Wire, case: str
) -> None:
    start_round_one(wire)
    wire.upload("clinical", GOOD, round_=1)
    before = _accumulated(server)
    changes, mutate, vector, status = BAD_UPLOADS[case]

    code = _code(lambda: wire.upload("legal", vector, round_=1, header_changes=changes, mutate=mutate))

    assert code == status
    assert _accumulated(server) == before
    wire.upload("legal", GOOD, round_=1)
    assert _accumulated(server)[1] == before[1] + 1


def test_a_chunk_over_the_limit_is_resource_exhausted(server: CoordinatorServer, wire: Wire) -> None:
    start_round_one(wire)

    code = _code(lambda: wire.upload("legal", GOOD, round_=1, chunk_bytes=2048, header_changes={"chunk_count": 4}))

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _accumulated(server) == (0.0, 0)


def test_a_duplicate_upload_already_exists_and_counts_once(server: CoordinatorServer, wire: Wire) -> None:
    start_round_one(wire)
    wire.upload("clinical", GOOD, round_=1)
    before = _accumulated(server)

    code = _code(lambda: wire.upload("clinical", GOOD, round_=1))

    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert _accumulated(server) == before


def test_downloading_a_version_that_is_not_current_is_not_found(wire: Wire) -> None:
    start_round_one(wire)

    assert _code(lambda: wire.download("legal", 7)) == grpc.StatusCode.NOT_FOUND


def test_metrics_for_a_round_not_under_evaluation_are_refused(wire: Wire) -> None:
    start_round_one(wire)

    assert _code(lambda: wire.report("legal", 1, 1)) == grpc.StatusCode.FAILED_PRECONDITION
    assert _code(lambda: wire.report("legal", 1, 1, loss=float("nan"))) == grpc.StatusCode.INVALID_ARGUMENT

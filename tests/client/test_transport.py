"""The worker's client against a real in-process coordinator, and its retry policy."""

from pathlib import Path

import grpc
import numpy as np
import pytest

from fedlora_common.messages import TaskKind, UploadKind
from fedlora_server.server import CoordinatorServer
from fedlora_worker.config import RetrySettings
from fedlora_worker.coordinator import NotJoined, Refused
from fedlora_worker.transport import CoordinatorClient
from tests.server.conftest import ADAPTER_CONFIG, MANIFEST, WORKERS, initial_vector, run_settings, token_of


class _Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"refused with {self._code.name}"


def _client(port: int, worker: str, sleeps: list[float] | None = None) -> CoordinatorClient:
    return CoordinatorClient(
        target=f"127.0.0.1:{port}",
        worker_id=worker,
        token=token_of(worker),
        retry=RetrySettings(attempts=4, initial_backoff_s=0.5, max_backoff_s=1.0),
        chunk_bytes=1024,
        sleep=(sleeps.append if sleeps is not None else lambda s: None),
    )


def test_transient_failures_are_retried_with_growing_backoff(tmp_path: Path) -> None:
    sleeps: list[float] = []
    client = _client(1, "clinical", sleeps)
    outcomes = [_Status(grpc.StatusCode.UNAVAILABLE), _Status(grpc.StatusCode.UNAVAILABLE), "ok"]

    def flaky() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert client._with_retry("test", flaky) == "ok"
    assert len(sleeps) == 2
    assert 0.25 <= sleeps[0] <= 0.5
    assert 0.5 <= sleeps[1] <= 1.0
    client.close()


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE])
def test_a_coordinator_at_its_limits_is_waited_out_with_backoff(code: grpc.StatusCode) -> None:
    sleeps: list[float] = []
    client = _client(1, "clinical", sleeps)
    outcomes: list[_Status | str] = [_Status(code), _Status(code), _Status(code), "ok"]

    def busy() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    answer = client._with_retry("poll", busy)

    assert answer == "ok"
    assert len(sleeps) == 3
    client.close()


def test_a_refusal_is_not_retried() -> None:
    sleeps: list[float] = []
    client = _client(1, "clinical", sleeps)

    def refused() -> None:
        raise _Status(grpc.StatusCode.PERMISSION_DENIED)

    with pytest.raises(Refused, match="test: PERMISSION_DENIED: refused with PERMISSION_DENIED") as info:
        client._with_retry("test", refused)
    assert info.value.code == "PERMISSION_DENIED"
    assert sleeps == []
    client.close()


def test_the_client_joins_initializes_and_downloads_a_verified_version(tmp_path: Path) -> None:
    with CoordinatorServer(settings=run_settings(tmp_path)) as server:
        clients = {w: _client(server.port, w) for w in WORKERS}
        specs = [c.join(100) for c in clients.values()]
        spec = specs[0]
        task = clients["clinical"].poll(spec.run_id)
        assert task.kind is TaskKind.INITIALIZE

        clients["clinical"].upload(
            run_id=spec.run_id,
            round_=0,
            kind=UploadKind.INITIAL,
            base_version=0,
            num_examples=100,
            vector=initial_vector(),
            manifest=MANIFEST,
            artifact_config_json=ADAPTER_CONFIG,
        )
        evaluate = clients["legal"].poll(spec.run_id)
        assert evaluate.kind is TaskKind.EVALUATE
        assert evaluate.global_version is not None
        seen: list[int] = []
        model = clients["legal"].download(spec.run_id, evaluate.global_version, on_bytes=seen.append)

        np.testing.assert_array_equal(model.vector, initial_vector())
        assert sum(seen) == MANIFEST.nbytes
        assert model.config_json == ADAPTER_CONFIG
        for client in clients.values():
            client.close()


def test_a_poll_from_a_worker_the_coordinator_has_not_admitted_asks_it_to_join_again(tmp_path: Path) -> None:
    with CoordinatorServer(settings=run_settings(tmp_path)) as server:
        joined, stranger = _client(server.port, "clinical"), _client(server.port, "legal")
        spec = joined.join(100)

        with pytest.raises(NotJoined):
            stranger.poll(spec.run_id)  # as after a coordinator restart: it knows the run, not this worker
        joined.close()
        stranger.close()

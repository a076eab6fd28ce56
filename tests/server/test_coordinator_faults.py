"""The coordinator's own faults are never a worker's: a disk it cannot write, a round it cannot staff.

A state directory or spool it cannot write is refused at start (exit 2, one line, no file touched).
A disk that fails during a round fails the attempt with the coordinator's own reason: the worker
hears UNAVAILABLE (and retries), nobody is excluded, and the round completes once the disk is back.
Root is needed (and held in CI) for what permission bits cannot show root: read-only mounts,
immutable directories, a small tmpfs to fill.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from fedlora_common.messages import UploadKind
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.secagg import identity_keypair
from fedlora_server.coordinator import Coordinator
from fedlora_server.errors import InvalidArgument, Unavailable
from fedlora_server.intake import UploadSink
from fedlora_server.metrics import ServerMetrics
from fedlora_server.phases import Training
from fedlora_server.server import CoordinatorServer
from fedlora_server.store import MemoryStore, RoundRecord
from tests.server.aggregation.test_aggregators import SecureSites
from tests.server.conftest import (
    MANIFEST,
    WORKERS,
    Clock,
    Wire,
    connect,
    initialized,
    run_settings,
    start_round_one,
    token_of,
    upload_header,
    vector_chunks,
)
from tests.server.statedir import files_of, one_round_committed, start_refused


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"`{' '.join(command)}` failed ({done.stderr.strip()}): this test needs root (CAP_SYS_ADMIN)")


@contextmanager
def _read_only(directory: Path) -> Iterator[None]:
    """`directory` bind-mounted read-only onto itself: refused to root too, unlike permission bits."""
    _run("mount", "--bind", str(directory), str(directory))
    try:
        _run("mount", "-o", "remount,bind,ro", str(directory))
        yield
    finally:
        _run("umount", str(directory))


@contextmanager
def _immutable(path: Path) -> Iterator[None]:
    _run("chattr", "+i", str(path))
    try:
        yield
    finally:
        _run("chattr", "-i", str(path))


@contextmanager
def _small_disk(directory: Path, size: str) -> Iterator[None]:
    directory.mkdir(parents=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory))
    try:
        yield
    finally:
        _run("umount", str(directory))


def _fill(disk: Path) -> Path:
    """Write a file until the disk holds not one more byte; delete it to give the space back."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        for block in (2**16, 2**12, 1):
            with pytest.raises(OSError, match="No space left on device"):
                _write_until_refused(f, bytes(block))
    return filler


def _write_until_refused(f: BinaryIO, block: bytes) -> None:
    while True:
        f.write(block)


def _upload_all(wire: Wire, round_: int, *, base_version: int) -> None:
    for w in WORKERS:
        wire.upload(w, np.full(MANIFEST.numel, 0.25, dtype=np.float32), round_=round_, base_version=base_version)


def _round_one(server: CoordinatorServer) -> list[RoundRecord]:
    return [r for r in server._store.rounds() if r.round == 1]


# ---- at start ---------------------------------------------------------------------------


@contextmanager
def _state_read_only(state: Path) -> Iterator[None]:
    with _read_only(state):
        yield


@contextmanager
def _artifacts_immutable(state: Path) -> Iterator[None]:
    with _immutable(state / "artifacts"):
        yield


@contextmanager
def _spool_a_file(state: Path) -> Iterator[None]:
    shutil.rmtree(state / "spool", ignore_errors=True)
    (state / "spool").write_text("not a directory\n")
    yield


@pytest.mark.parametrize(
    ("fault", "named"),
    [
        (_state_read_only, "state: the coordinator cannot write here (Read-only file system)"),
        (_artifacts_immutable, "artifacts: the coordinator cannot write here (Operation not permitted)"),
        (_spool_a_file, "spool: is not a directory"),
    ],
)
def test_a_state_directory_the_coordinator_cannot_write_is_refused_at_start_in_one_line(
    tmp_path: Path, fault: object, named: str
) -> None:
    # Prepare: a run with a committed round, then the fault.
    state = tmp_path / "state"
    one_round_committed(state)
    with fault(state):  # type: ignore[operator]
        before = files_of(state)

        # Execute
        finished = start_refused(state)

        # Assert
        assert finished.returncode == 2, finished.stderr
        assert finished.stderr.count("\n") == 1, finished.stderr
        assert named in finished.stderr
        assert files_of(state) == before


# ---- during a round ---------------------------------------------------------------------


def test_a_spool_broken_mid_round_fails_the_attempt_blaming_nobody(tmp_path: Path) -> None:
    # Prepare: round 1 open; then the spool directory turns into a file.
    with CoordinatorServer(settings=run_settings(tmp_path)) as server, connect(server) as wire:
        start_round_one(wire)
        spool = tmp_path / "spool"
        shutil.rmtree(spool)
        spool.write_text("")

        # Execute
        with pytest.raises(grpc.RpcError) as refused:
            wire.upload("legal", np.ones(MANIFEST.numel, dtype=np.float32), round_=1)
        spool.unlink()
        _upload_all(wire, 1, base_version=0)

        # Assert: UNAVAILABLE, nobody excluded, and the retried attempt completed with every worker.
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "spool" in (refused.value.details() or "")
        failed, retried = _round_one(server)
        assert (failed.status, failed.excluded) == ("failed", ())
        assert failed.failure.startswith("the coordinator could not open its spool file")
        assert (retried.status, retried.participants) == ("evaluating", WORKERS)


def test_a_full_disk_mid_round_blames_nobody_and_the_round_completes_once_space_returns(tmp_path: Path) -> None:
    # Prepare: the state directory on a small disk; round 1 open, one update in; then the disk fills up.
    disk = tmp_path / "state"
    with _small_disk(disk, "2m"), CoordinatorServer(settings=run_settings(disk)) as server, connect(server) as wire:
        start_round_one(wire)
        wire.upload("clinical", np.ones(MANIFEST.numel, dtype=np.float32), round_=1)
        filler = _fill(disk)

        # Execute: an upload on the full disk; then the space comes back and every worker uploads.
        with pytest.raises(grpc.RpcError) as refused:
            wire.upload("legal", np.ones(MANIFEST.numel, dtype=np.float32), round_=1)
        filler.unlink()
        assert wire.poll("legal").kind == pb.TASK_KIND_TRAIN
        _upload_all(wire, 1, base_version=0)
        attempts = _round_one(server)
        committed = wire.poll("legal").kind

    # Assert: UNAVAILABLE; every failed attempt is the coordinator's own, nobody excluded; round 1 committed.
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert committed == pb.TASK_KIND_EVALUATE
    *failed, last = attempts
    assert failed
    assert all(a.status == "failed" and a.excluded == () and "the coordinator" in a.failure for a in failed)
    assert (last.status, last.participants) == ("evaluating", WORKERS)


def test_a_commit_the_disk_refuses_fails_the_attempt_blaming_nobody(tmp_path: Path) -> None:
    # Prepare: round 1 open, two updates in; the artifacts directory cannot be written to.
    with CoordinatorServer(settings=run_settings(tmp_path)) as server, connect(server) as wire:
        start_round_one(wire)
        for w in ("clinical", "finance"):
            wire.upload(w, np.ones(MANIFEST.numel, dtype=np.float32), round_=1)

        # Execute: the last update triggers the commit, which the disk refuses; then the disk is back.
        with _immutable(tmp_path / "artifacts"):
            receipt = wire.upload("legal", np.ones(MANIFEST.numel, dtype=np.float32), round_=1)
            after_fault = wire.poll("legal").kind
        _upload_all(wire, 1, base_version=0)

        # Assert: the update that triggered it was taken; the attempt failed as the coordinator's own fault.
        assert receipt.round == 1
        assert after_fault == pb.TASK_KIND_TRAIN
        failed, retried = _round_one(server)
        assert (failed.status, failed.excluded) == ("failed", ())
        assert failed.failure.startswith("the coordinator could not commit round 1")
        assert (retried.status, retried.participants) == ("evaluating", WORKERS)
        assert wire.poll("legal").kind == pb.TASK_KIND_EVALUATE


def test_a_masked_upload_journal_on_a_full_disk_is_unavailable_and_leaves_the_sum_exact(tmp_path: Path) -> None:
    disk = tmp_path / "journals"
    with _small_disk(disk, "256k"):
        sites = SecureSites(disk, ServerMetrics(CollectorRegistry()))
        sites.through_share()
        for w in ("clinical", "finance"):
            sites.upload(w, sites.masked(w))
        payload = sites.masked("legal")
        filler = _fill(disk)

        with pytest.raises(Unavailable, match="masked-upload journal"):
            sites.upload("legal", payload)
        filler.unlink()
        sites.upload("legal", payload)  # the worker retries with the same bytes
        result = sites.reveal_all(101.0)

    assert result is not None
    np.testing.assert_allclose(result.mean, sites.expected(WORKERS), rtol=1e-6)


# ---- a round it cannot staff ------------------------------------------------------------


def test_a_round_that_exclusions_leave_too_small_to_aggregate_fails_the_run_with_one_reason(tmp_path: Path) -> None:
    # Prepare: secure aggregation (it needs two), and input that breaks the attempt, twice.
    workers = [
        {
            "id": w,
            "token_sha256": hashlib.sha256(token_of(w).encode()).hexdigest(),
            "identity_public": identity_keypair().public.hex(),
        }
        for w in WORKERS
    ]
    settings = run_settings(tmp_path, min_workers=2, workers=workers, secure_aggregation={"enabled": True})
    coordinator = Coordinator(
        settings=settings, store=MemoryStore(), metrics=ServerMetrics(CollectorRegistry()), clock=Clock()
    )
    initialized(coordinator)

    # Execute: legal's input breaks attempt 1, finance's attempt 2.
    for offender in ("legal", "finance"):
        phase = coordinator.current_phase
        assert isinstance(phase, Training)

        def broken(*args: object) -> UploadSink:
            raise KeyError("an unforeseen gap")

        phase.aggregation.open_upload = broken  # type: ignore[method-assign,assignment]
        delta = np.ones(MANIFEST.numel, dtype=np.float32)
        with pytest.raises(InvalidArgument):
            coordinator.receive_upload(
                upload_header(offender, delta, round_=1, kind=UploadKind.DELTA), vector_chunks(delta)
            )

    # Assert: the run failed, saying why in one line.
    assert coordinator.finished.is_set()
    assert coordinator.failure == (
        "round 1 cannot go on: 1 workers can take part once finance, legal sit out for faults its attempts showed, "
        "and the run needs 2"
    )
    assert "\n" not in coordinator.failure

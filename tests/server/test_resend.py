"""A resend that races the stream it replaces is told to try again (ABORTED), never that its update is in."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from fedlora_common.chunking import sha256
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_server.server import CoordinatorServer
from fedlora_worker.transport import TRANSIENT
from tests.server.conftest import MANIFEST, connect, run_settings, start_round_one


def _header_then_wait(release: threading.Event, header: pb.UploadHeader) -> Iterator[pb.UploadMessage]:
    """An upload whose header arrived and whose chunks are still on their way (a link that stalled)."""
    yield pb.UploadMessage(header=header)
    release.wait()


def test_an_upload_racing_the_workers_unfinished_stream_is_aborted_and_the_resend_after_it_is_taken(
    tmp_path: Path,
) -> None:
    # Prepare: legal's first upload stream has sent its header and stalls.
    vector = np.ones(MANIFEST.numel, dtype=np.float32)
    payload = vector.tobytes()
    header = pb.UploadHeader(
        worker_id="legal",
        run_id="test-run",
        round=1,
        kind=pb.UPLOAD_KIND_DELTA,
        num_examples=100,
        total_size=len(payload),
        chunk_count=len(payload) // 1024,
        sha256=sha256(payload),
        dtype="float32",
    )
    release = threading.Event()
    with CoordinatorServer(settings=run_settings(tmp_path)) as server, connect(server) as wire:
        start_round_one(wire)
        stalled = wire.stub.UploadUpdate.future(_header_then_wait(release, header), metadata=wire.md("legal"))
        while "legal" not in server.coordinator._uploading:
            threading.Event().wait(0.01)

        # Execute: the resend arrives while the first stream is still open, then again once it ended.
        try:
            wire.upload("legal", vector, round_=1)
            racing = None
        except grpc.RpcError as exc:
            racing = exc.code()
        finally:
            release.set()
        first = stalled.exception(timeout=10)
        accepted = wire.upload("legal", vector, round_=1)
        uploads = server._store.uploads(1, 1)

    # Assert
    assert racing == grpc.StatusCode.ABORTED
    assert racing in TRANSIENT  # the worker's transport tries it again
    assert first is not None
    assert first.code() == grpc.StatusCode.INVALID_ARGUMENT  # it ended before its chunks
    assert accepted.round == 1
    assert [u.worker_id for u in uploads] == ["legal"]

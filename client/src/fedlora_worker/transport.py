"""The worker's side of the wire: authenticated calls, chunked streams, retries with backoff.

`CoordinatorClient` is the gRPC implementation of `fedlora_worker.coordinator.Coordinator`.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import grpc
import numpy as np
import numpy.typing as npt
import structlog

from fedlora_common.chunking import iter_chunks
from fedlora_common.compatibility import PROTOCOL, software_version
from fedlora_common.manifest import Manifest
from fedlora_common.messages import MetricsReport, ModelVersion, RunSpec, Task, UploadKind
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.proto.fedlora.v1 import coordinator_pb2_grpc as pb_grpc
from fedlora_common.secagg import Advertisement, Complaint, EncryptedShare, RevealedShare
from fedlora_common.serde import (
    advertisement_to_proto,
    encrypted_share_to_proto,
    metrics_to_proto,
    model_version_from_proto,
    revealed_share_to_proto,
    run_spec_from_proto,
    task_from_proto,
    upload_header_to_proto,
)
from fedlora_worker.config import RetrySettings, TlsClientSettings
from fedlora_worker.coordinator import (
    DownloadedModel,
    NotJoined,
    Refused,
    StaleTask,
    TlsMisconfigured,
    TransferError,
    Unreachable,
    prepare_upload,
)
from fedlora_worker.tls import HandshakeDoctor

__all__ = ["CoordinatorClient"]

T = TypeVar("T")
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        # The coordinator is at a limit of calls in flight (all workers' together, or this worker's own): nothing was
        # done, and a later try finds room. (An upload over its max_update_bytes is refused so too, and retried in vain.)
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DATA_LOSS,
        # The worker never cancels its own calls: a cancelled one was ended by the coordinator (a stream idle or
        # slower than its limits allow, e.g. behind a stalled link) or by the network; it is tried again.
        grpc.StatusCode.CANCELLED,
    }
)
POLL_TIMEOUT_S = 90.0
"""A poll is held by the coordinator up to its timeouts.poll_wait_ms (60 s at most) before it answers WAIT."""
STALE = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND})
"""What a coordinator answers a worker whose task it no longer holds (it restarted, or the round moved on)."""
log = structlog.get_logger()


def _channel(target: str, tls: TlsClientSettings | None, chunk_bytes: int) -> grpc.Channel:
    options: list[tuple[str, str | int]] = [
        ("grpc.max_receive_message_length", chunk_bytes + 2**20),
        ("grpc.max_send_message_length", chunk_bytes + 2**16),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes() if tls.key else None,
        certificate_chain=tls.cert.read_bytes() if tls.cert else None,
    )
    return grpc.secure_channel(target, credentials, options=options)


class _Progress:
    """Reports bytes past the furthest point any attempt of one transfer reached, so a retried one counts once."""

    def __init__(self, on_bytes: Callable[[int], None]) -> None:
        self._on_bytes = on_bytes
        self._furthest = 0

    def reached(self, offset: int) -> None:
        if offset > self._furthest:
            self._on_bytes(offset - self._furthest)
            self._furthest = offset


class CoordinatorClient:
    """One worker's connection to the coordinator. Safe to retry: every call is idempotent or deduplicated."""

    def __init__(
        self,
        *,
        target: str,
        worker_id: str,
        token: str,
        retry: RetrySettings,
        tls: TlsClientSettings | None = None,
        chunk_bytes: int = 2**20,
        on_retry: Callable[[], None] = lambda: None,
        on_tls_failure: Callable[[], None] = lambda: None,
        sleep: Callable[[float], object] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.worker_id = worker_id
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._retry = retry
        self._chunk_bytes = chunk_bytes
        self._channel = _channel(target, tls, chunk_bytes)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._on_retry = on_retry
        self._on_tls_failure = on_tls_failure
        self._stopped = threading.Event()
        self._sleep = sleep or self._stopped.wait
        self._rng = rng or random.Random()
        self._doctor = HandshakeDoctor(target=target, tls=tls) if tls is not None else None
        self._tls_fault = ""
        self._tls_failures = 0

    def close(self) -> None:
        self._channel.close()

    def stop(self) -> None:
        """The worker is shutting down: calls in flight end now (cancelled), and none is tried again."""
        self._stopped.set()
        self._channel.close()

    def _with_retry(self, what: str, call: Callable[[], T]) -> T:
        """Retry transient failures with backoff; then Unreachable, StaleTask or Refused (the coordinator's answer),
        or TlsMisconfigured when TLS fails for a reason of configuration (`_count_tls_failure`)."""
        delay = self._retry.initial_backoff_s
        for attempt in range(1, self._retry.attempts + 1):
            if self._stopped.is_set():
                raise Unreachable(f"{what}: the worker is stopping")
            try:
                answer = call()
            except Exception as exc:
                if self._stopped.is_set():  # cancelled by stop(), or refused by the closed channel
                    raise Unreachable(f"{what}: the worker is stopping") from exc
                if not isinstance(exc, (grpc.RpcError, TransferError)):
                    raise
                code = exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.DATA_LOSS
                self._count_tls_failure(what, code, exc)
                if code in STALE:
                    raise StaleTask(f"{what}: {_details(exc)}") from exc
                if code not in TRANSIENT:
                    raise Refused(f"{what}: {code.name}: {_details(exc)}", code=code.name) from exc
                if attempt == self._retry.attempts:
                    raise Unreachable(f"{what}: {code.name} after {attempt} attempts") from exc
                log.warning("call_retry", call=what, code=code.name, attempt=attempt, backoff_s=round(delay, 2))
                self._on_retry()
                self._sleep(delay * self._rng.uniform(0.5, 1.0))
                delay = min(delay * 2, self._retry.max_backoff_s)
            else:
                self._count_tls_failure(what, grpc.StatusCode.OK, None)
                return answer
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _count_tls_failure(self, what: str, code: grpc.StatusCode, exc: grpc.RpcError | TransferError | None) -> None:
        """A call that ended `code`: if TLS failed for a reason of configuration, count it; at the
        `retry.tls_failures`-th same cause in a row, TlsMisconfigured (exit 2). Anything else ends the streak."""
        fault = None
        if self._doctor is not None and code is grpc.StatusCode.UNAVAILABLE and exc is not None:
            fault = self._doctor.explain(_details(exc))
        if fault is None:
            if self._tls_failures and self._doctor is not None:
                self._doctor.reset()
            self._tls_fault, self._tls_failures = "", 0
            return
        self._tls_failures = self._tls_failures + 1 if fault == self._tls_fault else 1
        self._tls_fault = fault
        self._on_tls_failure()
        log.warning("tls_failed", call=what, reason=fault, failures=self._tls_failures, limit=self._retry.tls_failures)
        if self._tls_failures >= self._retry.tls_failures:
            raise TlsMisconfigured(fault) from exc

    def join(self, num_examples: int, *, rank: int = 0, base_precision: str = "") -> RunSpec:
        request = pb.JoinRequest(
            worker_id=self.worker_id,
            num_examples=num_examples,
            software_version=software_version(),
            protocol_version=PROTOCOL,
            rank=rank,
            base_precision=base_precision,
        )
        response = self._with_retry("join", lambda: self._stub.Join(request, metadata=self._metadata, timeout=30))
        return run_spec_from_proto(response.run)

    def poll(self, run_id: str) -> Task:
        """The next task; NotJoined when the coordinator answers FAILED_PRECONDITION (it lost this worker)."""
        request = pb.PollTaskRequest(worker_id=self.worker_id, run_id=run_id)
        try:
            response = self._with_retry(
                "poll", lambda: self._stub.PollTask(request, metadata=self._metadata, timeout=POLL_TIMEOUT_S)
            )
        except StaleTask as exc:
            raise NotJoined(str(exc)) from exc
        return task_from_proto(response, run_id=run_id)

    def download(
        self, run_id: str, version: ModelVersion, *, on_bytes: Callable[[int], None] = lambda n: None
    ) -> DownloadedModel:
        """Stream a global version and verify its size, chunk sequence and digest."""
        request = pb.DownloadRequest(worker_id=self.worker_id, run_id=run_id, version=version.version)
        progress = _Progress(on_bytes)
        return self._with_retry("download", lambda: self._download_once(request, version, progress))

    def _download_once(
        self, request: pb.DownloadRequest, expected: ModelVersion, progress: _Progress
    ) -> DownloadedModel:
        stream = self._stub.DownloadGlobal(
            request, metadata=self._metadata, timeout=_stream_timeout(expected.size_bytes)
        )
        first = next(stream)
        if first.WhichOneof("part") != "header":
            raise TransferError("download did not start with a header")
        declared = model_version_from_proto(first.header.model)
        if declared.version != expected.version or declared.sha256 != expected.sha256:
            raise TransferError(f"coordinator sent version {declared.version}, expected {expected.version}")
        buffer = bytearray(declared.size_bytes)
        digest = hashlib.sha256()
        offset = 0
        for seq, message in enumerate(stream):
            if message.WhichOneof("part") != "chunk" or message.chunk.seq != seq:
                raise TransferError(f"download chunk {seq} out of sequence")
            data = message.chunk.data
            if offset + len(data) > len(buffer):
                raise TransferError("download is longer than declared")
            buffer[offset : offset + len(data)] = data
            digest.update(data)
            offset += len(data)
            progress.reached(offset)
        if offset != declared.size_bytes or digest.digest() != declared.sha256:
            raise TransferError("download is incomplete or its digest does not match")
        vector = np.frombuffer(buffer, dtype=np.float32)
        return DownloadedModel(declared, vector, first.header.artifact_config_json)

    def upload(
        self,
        *,
        run_id: str,
        round_: int,
        kind: UploadKind,
        base_version: int,
        num_examples: int,
        vector: npt.NDArray[np.float32] | npt.NDArray[np.uint32],
        train_loss: float = 0.0,
        tag: int = 0,
        manifest: Manifest | None = None,
        artifact_config_json: str = "",
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> int:
        """Stream one vector; a retry resends it whole (`on_bytes` counts it once). Returns the bytes acknowledged."""
        header, payload = prepare_upload(
            worker_id=self.worker_id,
            chunk_bytes=self._chunk_bytes,
            run_id=run_id,
            round_=round_,
            kind=kind,
            base_version=base_version,
            num_examples=num_examples,
            vector=vector,
            train_loss=train_loss,
            tag=tag,
            manifest=manifest,
            artifact_config_json=artifact_config_json,
        )

        progress = _Progress(on_bytes)

        def messages() -> Iterator[pb.UploadMessage]:
            yield pb.UploadMessage(header=upload_header_to_proto(header))
            sent = 0
            for seq, piece in enumerate(iter_chunks(payload, self._chunk_bytes)):
                yield pb.UploadMessage(chunk=pb.Chunk(seq=seq, data=piece.tobytes()))
                sent += len(piece)
                progress.reached(sent)

        def send() -> int:
            try:
                receipt = self._stub.UploadUpdate(
                    messages(), metadata=self._metadata, timeout=_stream_timeout(len(payload))
                )
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.ALREADY_EXISTS:
                    log.info("upload_already_received", round=round_)
                    progress.reached(len(payload))
                    return len(payload)
                raise
            return int(receipt.bytes_received)

        return self._with_retry("upload", send)

    def advertise(self, run_id: str, tag: int, keys: Advertisement) -> None:
        request = pb.AdvertiseKeysRequest(
            worker_id=self.worker_id, run_id=run_id, tag=tag, keys=advertisement_to_proto(keys)
        )
        self._with_retry(
            "advertise",
            lambda: _deduplicated(lambda: self._stub.AdvertiseKeys(request, metadata=self._metadata, timeout=30)),
        )

    def share_keys(self, run_id: str, tag: int, shares: Sequence[EncryptedShare]) -> None:
        request = pb.ShareKeysRequest(
            worker_id=self.worker_id, run_id=run_id, tag=tag, shares=[encrypted_share_to_proto(s) for s in shares]
        )
        self._with_retry(
            "share_keys",
            lambda: _deduplicated(lambda: self._stub.ShareKeys(request, metadata=self._metadata, timeout=60)),
        )

    def reveal(self, run_id: str, tag: int, shares: Sequence[RevealedShare]) -> None:
        request = pb.RevealSharesRequest(
            worker_id=self.worker_id, run_id=run_id, tag=tag, shares=[revealed_share_to_proto(s) for s in shares]
        )
        self._with_retry(
            "reveal",
            lambda: _deduplicated(lambda: self._stub.RevealShares(request, metadata=self._metadata, timeout=60)),
        )

    def complain(self, run_id: str, tag: int, complaint: Complaint) -> None:
        request = pb.ComplainSharesRequest(
            worker_id=self.worker_id,
            run_id=run_id,
            tag=tag,
            accused=list(complaint.accused),
            enc_private=complaint.enc_private,
        )
        self._with_retry(
            "complain",
            lambda: _deduplicated(lambda: self._stub.ComplainShares(request, metadata=self._metadata, timeout=30)),
        )

    def leave(self, run_id: str, reason: str) -> None:
        """Tell the coordinator this worker cannot go on; one try, since the worker exits either way."""
        request = pb.LeaveRequest(worker_id=self.worker_id, run_id=run_id, reason=reason)
        try:
            self._stub.Leave(request, metadata=self._metadata, timeout=10)
        except grpc.RpcError as exc:
            log.warning("leave_not_delivered", code=exc.code().name)

    def report(self, report: MetricsReport) -> None:
        message = metrics_to_proto(report)
        self._with_retry(
            "report",
            lambda: _deduplicated(lambda: self._stub.ReportMetrics(message, metadata=self._metadata, timeout=30)),
        )


def _details(exc: grpc.RpcError | TransferError) -> str:
    return str(exc.details()) if isinstance(exc, grpc.RpcError) else str(exc)


def _deduplicated(call: Callable[[], object]) -> None:
    """A retried message that already arrived is answered ALREADY_EXISTS: that is success."""
    try:
        call()
    except grpc.RpcError as exc:
        if exc.code() is not grpc.StatusCode.ALREADY_EXISTS:
            raise


def _stream_timeout(nbytes: int) -> float:
    """Streams get time in proportion to their size: about 1 MiB/s at the slowest, plus a minute."""
    return 60.0 + nbytes / 2**20

"""The in-process transport: one virtual client's `fedlora_worker.coordinator.Coordinator`, over the object.

It carries what the gRPC pair (`fedlora_worker.transport.CoordinatorClient` and
`fedlora_server.servicer.CoordinatorServicer`) carries, without the network: every message goes
through the same protobuf conversion as on the wire (so the daemon receives exactly the objects a
deployed worker decodes), uploads and downloads go in the same chunks with the same digests, the
coordinator counts the same bytes, and its refusals become the Protocol's exceptions as the gRPC
client maps their status codes: FAILED_PRECONDITION or NOT_FOUND -> StaleTask (NotJoined for a
poll), ALREADY_EXISTS on a resend -> success, anything else raised as the coordinator's own
refusal. Nothing is transient in process, so nothing is retried.

Every client calls at once, as deployed workers do; a poll that would wait is held open as the
servicer holds it. The client tells the simulation's clock (`ContendedClock`) when its site works: from
the join (it loads its model) or a poll that gives it a task, to its next poll.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import grpc
import numpy as np
import numpy.typing as npt
import structlog

from fedlora_common.chunking import as_bytes, iter_chunks
from fedlora_common.manifest import Manifest
from fedlora_common.messages import MetricsReport, ModelVersion, RunSpec, Task, TaskKind, UploadKind
from fedlora_common.secagg import Advertisement, Complaint, EncryptedShare, RevealedShare
from fedlora_common.serde import (
    advertisement_from_proto,
    advertisement_to_proto,
    encrypted_share_from_proto,
    encrypted_share_to_proto,
    metrics_from_proto,
    metrics_to_proto,
    model_version_from_proto,
    model_version_to_proto,
    revealed_share_from_proto,
    revealed_share_to_proto,
    run_spec_from_proto,
    run_spec_to_proto,
    task_from_proto,
    task_to_proto,
    upload_header_from_proto,
    upload_header_to_proto,
)
from fedlora_lab.simulation.clock import ContendedClock
from fedlora_server.aggregation import KeyShares, Reveal, SecureMessage
from fedlora_server.auth import check_claim
from fedlora_server.coordinator import Coordinator
from fedlora_server.errors import AlreadyExists, CoordinatorError, FailedPrecondition, InvalidArgument, NotFound
from fedlora_server.status import STATUS_OF
from fedlora_worker.coordinator import (
    DownloadedModel,
    NotJoined,
    Refused,
    StaleTask,
    TransferError,
    prepare_upload,
)

__all__ = ["InProcessClient"]

T = TypeVar("T")
log = structlog.get_logger()


class InProcessClient:
    """One virtual client's calls, made directly on the coordinator object it shares with the others."""

    def __init__(self, *, coordinator: Coordinator, worker_id: str, clock: ContendedClock, chunk_bytes: int) -> None:
        self.worker_id = worker_id
        self._coordinator = coordinator
        self._clock = clock
        self._chunk_bytes = chunk_bytes
        self._hold_s = coordinator.settings.timeouts.poll_wait_ms / 1000

    def close(self) -> None:
        self._clock.working(self.worker_id, False)

    def stop(self) -> None:
        """Nothing to cancel in process: a held poll returns within poll_wait_ms, and the site works no more."""
        self._clock.working(self.worker_id, False)

    def _refused(self, what: str, call: Callable[[], T]) -> T:
        """The coordinator's answer; a refusal for a task it no longer holds becomes StaleTask, any other Refused
        (as the gRPC transport has them)."""
        try:
            return call()
        except (FailedPrecondition, NotFound) as exc:
            raise StaleTask(f"{what}: {exc}") from exc
        except CoordinatorError as exc:
            code = STATUS_OF.get(type(exc), grpc.StatusCode.INTERNAL).name
            raise Refused(f"{what}: {code}: {exc}", code=code) from exc

    def _acting_for(self, claimed_id: str, run_id: str | None = None) -> None:
        """What the servicer checks of every request: it acts for its caller, in this coordinator's run."""
        check_claim(self.worker_id, claimed_id)
        if run_id is not None and run_id != self._coordinator.run_spec.run_id:
            raise FailedPrecondition(f"run {run_id!r} is not this coordinator's run")

    def join(self, num_examples: int, *, rank: int = 0, base_precision: str = "") -> RunSpec:
        """Join; what the daemon does on joining (loading its model) is work."""
        spec = self._refused(
            "join",
            lambda: self._coordinator.join(self.worker_id, num_examples, rank=rank, base_precision=base_precision),
        )
        self._clock.working(self.worker_id, True)
        return run_spec_from_proto(run_spec_to_proto(spec))

    def poll(self, run_id: str) -> Task:
        """The next task, held as the servicer holds it; NotJoined when the coordinator does not count this client."""
        self._clock.working(self.worker_id, False)
        try:
            self._acting_for(self.worker_id, run_id)
            task = self._coordinator.poll(self.worker_id, hold_s=self._hold_s)
            task = task_from_proto(task_to_proto(task), run_id=run_id)
        except (FailedPrecondition, NotFound) as exc:
            raise NotJoined(f"poll: {exc}") from exc
        self._clock.working(self.worker_id, task.kind not in (TaskKind.WAIT, TaskKind.FINISHED))
        return task

    def download(
        self, run_id: str, version: ModelVersion, *, on_bytes: Callable[[int], None] = lambda n: None
    ) -> DownloadedModel:
        """The global version in chunks, checked as the gRPC client checks it: version, size, sequence, digest."""

        def once() -> DownloadedModel:
            self._acting_for(self.worker_id, run_id)
            model = self._coordinator.global_model(self.worker_id, version.version)
            declared = model_version_from_proto(model_version_to_proto(model.version))
            if declared.version != version.version or declared.sha256 != version.sha256:
                raise TransferError(f"coordinator sent version {declared.version}, expected {version.version}")
            payload = as_bytes(model.vector)
            buffer = bytearray(declared.size_bytes)
            digest = hashlib.sha256()
            offset = chunks = 0
            for piece in iter_chunks(payload, self._chunk_bytes):
                data = piece.tobytes()
                if offset + len(data) > len(buffer):
                    raise TransferError("download is longer than declared")
                buffer[offset : offset + len(data)] = data
                digest.update(data)
                offset += len(data)
                chunks += 1
                on_bytes(len(data))
            self._coordinator.count_download(offset, chunks)
            if offset != declared.size_bytes or digest.digest() != declared.sha256:
                raise TransferError("download is incomplete or its digest does not match")
            return DownloadedModel(declared, np.frombuffer(buffer, dtype=np.float32), model.config_json)

        return self._refused("download", once)

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
        """One vector in sequence-numbered chunks after its header; a duplicate counts as received."""
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

        def chunks() -> Iterator[tuple[int, bytes]]:
            for seq, piece in enumerate(iter_chunks(payload, self._chunk_bytes)):
                yield seq, piece.tobytes()
                on_bytes(len(piece))

        def send() -> int:
            try:
                received = upload_header_from_proto(upload_header_to_proto(header))
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            self._acting_for(received.worker_id)
            try:
                self._coordinator.receive_upload(received, chunks())
            except AlreadyExists:
                log.info("upload_already_received", round=round_)
                return len(payload)
            return received.total_size

        return self._refused("upload", send)

    def advertise(self, run_id: str, tag: int, keys: Advertisement) -> None:
        self._secure("advertise", run_id, tag, lambda: advertisement_from_proto(advertisement_to_proto(keys)))

    def share_keys(self, run_id: str, tag: int, shares: Sequence[EncryptedShare]) -> None:
        self._secure(
            "share_keys",
            run_id,
            tag,
            lambda: KeyShares(tuple(encrypted_share_from_proto(encrypted_share_to_proto(s)) for s in shares)),
        )

    def reveal(self, run_id: str, tag: int, shares: Sequence[RevealedShare]) -> None:
        self._secure(
            "reveal",
            run_id,
            tag,
            lambda: Reveal(tuple(revealed_share_from_proto(revealed_share_to_proto(s)) for s in shares)),
        )

    def complain(self, run_id: str, tag: int, complaint: Complaint) -> None:
        self._secure("complain", run_id, tag, lambda: Complaint(tuple(complaint.accused), bytes(complaint.enc_private)))

    def _secure(self, what: str, run_id: str, tag: int, message: Callable[[], SecureMessage]) -> None:
        def deliver() -> None:
            self._acting_for(self.worker_id, run_id)
            try:
                decoded = message()
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            with contextlib.suppress(AlreadyExists):  # a resend of a message that already arrived
                self._coordinator.secure_message(self.worker_id, tag, decoded)

        self._refused(what, deliver)

    def report(self, report: MetricsReport) -> None:
        decoded = metrics_from_proto(metrics_to_proto(report))

        def deliver() -> None:
            self._acting_for(decoded.worker_id, decoded.run_id)
            self._coordinator.report_metrics(decoded)

        self._refused("report", deliver)

    def leave(self, run_id: str, reason: str) -> None:
        """Tell the coordinator this client cannot go on; one try."""
        try:
            self._acting_for(self.worker_id, run_id)
            self._coordinator.leave(self.worker_id, reason)
        except CoordinatorError as exc:
            log.warning("leave_not_delivered", reason=str(exc))
        finally:
            self._clock.working(self.worker_id, False)

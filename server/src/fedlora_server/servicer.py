"""The gRPC face of the coordinator: decode, check the request acts for its caller, call the logic, map refusals.

Credentials were already checked from the call's metadata at the door (interceptor.Door).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import structlog

from fedlora_common.chunking import as_bytes, chunk_count, iter_chunks
from fedlora_common.compatibility import incompatibility
from fedlora_common.proto.fedlora.v1 import coordinator_pb2 as pb
from fedlora_common.proto.fedlora.v1 import coordinator_pb2_grpc as pb_grpc
from fedlora_common.secagg import Complaint
from fedlora_common.serde import (
    advertisement_from_proto,
    encrypted_share_from_proto,
    metrics_from_proto,
    model_version_to_proto,
    revealed_share_from_proto,
    run_spec_to_proto,
    task_to_proto,
    upload_header_from_proto,
)
from fedlora_server.aggregation import KeyShares, Reveal, SecureMessage
from fedlora_server.auth import check_claim
from fedlora_server.coordinator import Coordinator
from fedlora_server.errors import FailedPrecondition, Incompatible, InvalidArgument, StreamCancelled
from fedlora_server.interceptor import caller
from fedlora_server.status import answering
from fedlora_server.streams import StreamGuard, Watched

__all__ = ["CoordinatorServicer"]

log = structlog.get_logger()


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, *, coordinator: Coordinator, chunk_bytes: int, streams: StreamGuard) -> None:
        self._coordinator = coordinator
        self._chunk_bytes = chunk_bytes
        self._streams = streams

    def _acting_for(self, claimed_id: str, run_id: str | None = None) -> str:
        worker_id = check_claim(caller(), claimed_id)
        if run_id is not None and run_id != self._coordinator.run_spec.run_id:
            raise FailedPrecondition(f"run {run_id!r} is not this coordinator's run")
        return worker_id

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        with answering(context):
            worker_id = self._acting_for(request.worker_id)
            if why := incompatibility(request.protocol_version, request.software_version):
                raise Incompatible(why)
            spec = self._coordinator.join(
                worker_id, request.num_examples, rank=request.rank, base_precision=request.base_precision
            )
            return pb.JoinResponse(run_id=spec.run_id, worker_id=worker_id, run=run_spec_to_proto(spec))

    def PollTask(self, request: pb.PollTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        with answering(context):
            worker_id = self._acting_for(request.worker_id, request.run_id)
            hold_s = self._coordinator.settings.timeouts.poll_wait_ms / 1000
            return task_to_proto(self._coordinator.poll(worker_id, hold_s=hold_s))

    def DownloadGlobal(self, request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[pb.DownloadChunk]:
        with answering(context):
            worker_id = self._acting_for(request.worker_id, request.run_id)
            model = self._coordinator.global_model(worker_id, request.version)
            watched = self._streams.admit(worker_id, context)
        try:
            payload = as_bytes(model.vector)
            watched.allow(self._streams.total_s(len(payload)))
            yield pb.DownloadChunk(
                header=pb.DownloadHeader(
                    model=model_version_to_proto(model.version),
                    chunk_count=chunk_count(len(payload), self._chunk_bytes),
                    artifact_config_json=model.config_json,
                )
            )
            sent = chunks = 0
            for seq, piece in enumerate(iter_chunks(payload, self._chunk_bytes)):
                yield pb.DownloadChunk(chunk=pb.Chunk(seq=seq, data=piece.tobytes()))
                watched.touch(time.monotonic())
                sent += len(piece)
                chunks += 1
            self._coordinator.count_download(sent, chunks)
        finally:
            self._streams.release(watched)

    def UploadUpdate(
        self, request_iterator: Iterator[pb.UploadMessage], context: grpc.ServicerContext
    ) -> pb.UploadReceipt:
        with answering(context), self._streams.admitted(caller(), context) as watched:
            messages = _watched(request_iterator, watched)
            first = next(messages, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidArgument("an upload starts with its header")
            try:
                header = upload_header_from_proto(first.header)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            worker_id = self._acting_for(header.worker_id)
            watched.allow(self._streams.total_s(header.total_size))
            round_ = self._coordinator.receive_upload(header, _chunks(messages))
            log.debug("upload_received", worker_id=worker_id, round=round_)
            return pb.UploadReceipt(round=round_, bytes_received=header.total_size)

    def ReportMetrics(self, request: pb.MetricsReport, context: grpc.ServicerContext) -> pb.MetricsReceipt:
        with answering(context):
            self._acting_for(request.worker_id, request.run_id)
            self._coordinator.report_metrics(metrics_from_proto(request))
            return pb.MetricsReceipt()

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReceipt:
        with answering(context):
            worker_id = self._acting_for(request.worker_id, request.run_id)
            self._coordinator.leave(worker_id, request.reason)
            return pb.LeaveReceipt()

    def AdvertiseKeys(self, request: pb.AdvertiseKeysRequest, context: grpc.ServicerContext) -> pb.SecAggReceipt:
        return self._secure(request, context, lambda: advertisement_from_proto(request.keys))

    def ShareKeys(self, request: pb.ShareKeysRequest, context: grpc.ServicerContext) -> pb.SecAggReceipt:
        return self._secure(
            request, context, lambda: KeyShares(tuple(encrypted_share_from_proto(s) for s in request.shares))
        )

    def RevealShares(self, request: pb.RevealSharesRequest, context: grpc.ServicerContext) -> pb.SecAggReceipt:
        return self._secure(
            request, context, lambda: Reveal(tuple(revealed_share_from_proto(s) for s in request.shares))
        )

    def ComplainShares(self, request: pb.ComplainSharesRequest, context: grpc.ServicerContext) -> pb.SecAggReceipt:
        return self._secure(request, context, lambda: Complaint(tuple(request.accused), bytes(request.enc_private)))

    def _secure(
        self,
        request: pb.AdvertiseKeysRequest | pb.ShareKeysRequest | pb.RevealSharesRequest | pb.ComplainSharesRequest,
        context: grpc.ServicerContext,
        decode: Callable[[], SecureMessage],
    ) -> pb.SecAggReceipt:
        with answering(context):
            worker_id = self._acting_for(request.worker_id, request.run_id)
            try:
                message = decode()
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            self._coordinator.secure_message(worker_id, request.tag, message)
            return pb.SecAggReceipt(tag=request.tag)


def _watched(messages: Iterator[pb.UploadMessage], watched: Watched) -> Iterator[pb.UploadMessage]:
    """The stream's messages, each one resetting its idle clock; a cancelled stream ends in StreamCancelled."""
    try:
        for message in messages:
            watched.touch(time.monotonic())
            yield message
    except grpc.RpcError:
        reason = watched.expired or "the caller cancelled the stream"
        raise StreamCancelled(f"upload ended before its last chunk: {reason}", overdue=bool(watched.expired)) from None


def _chunks(messages: Iterator[pb.UploadMessage]) -> Iterator[tuple[int, bytes]]:
    for message in messages:
        if message.WhichOneof("part") != "chunk":
            raise InvalidArgument("only chunks may follow the upload header")
        yield message.chunk.seq, message.chunk.data

"""The one mapping from the coordinator's refusals to gRPC status codes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import grpc
import structlog

from fedlora_server.errors import (
    Aborted,
    AlreadyExists,
    CoordinatorError,
    FailedPrecondition,
    Incompatible,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StreamCancelled,
    Unauthenticated,
    Unavailable,
)

__all__ = ["STATUS_OF", "abort_with", "answering"]

log = structlog.get_logger()

STATUS_OF: dict[type[CoordinatorError], grpc.StatusCode] = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Aborted: grpc.StatusCode.ABORTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Incompatible: grpc.StatusCode.UNIMPLEMENTED,
}


def abort_with(context: grpc.ServicerContext, error: CoordinatorError) -> NoReturn:
    """End the call with the status that names the refusal; nothing was changed."""
    if isinstance(error, StreamCancelled):
        code = grpc.StatusCode.DEADLINE_EXCEEDED if error.overdue else grpc.StatusCode.CANCELLED
        context.abort(code, str(error))
    code = next((STATUS_OF[kind] for kind in type(error).__mro__ if kind in STATUS_OF), grpc.StatusCode.INTERNAL)
    context.abort(code, str(error))


@contextmanager
def answering(context: grpc.ServicerContext) -> Iterator[None]:
    """Around a handler's work: a refusal ends the call with its status; anything else is INTERNAL, logged.

    A client never sees UNKNOWN (the status gRPC gives an escaped exception), and the logic's own
    error handling (failing the round attempt, not the run) has already run by then.
    """
    try:
        yield
    except CoordinatorError as exc:
        abort_with(context, exc)
    except Exception:
        log.exception("rpc_failed")
        context.abort(grpc.StatusCode.INTERNAL, "internal error; the coordinator logged it")

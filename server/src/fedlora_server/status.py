"""The one mapping from the coordinator's refusals to gRPC status codes."""

from __future__ import annotations

from typing import NoReturn

import grpc

from fedlora_server.errors import (
    AlreadyExists,
    CoordinatorError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)

__all__ = ["STATUS_OF", "abort_with"]

STATUS_OF: dict[type[CoordinatorError], grpc.StatusCode] = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    NotFound: grpc.StatusCode.NOT_FOUND,
}


def abort_with(context: grpc.ServicerContext, error: CoordinatorError) -> NoReturn:
    """End the call with the status that names the refusal; nothing was changed."""
    context.abort(STATUS_OF.get(type(error), grpc.StatusCode.INTERNAL), str(error))

"""What the coordinator's logic refuses, in its own terms; the servicer maps each to a gRPC status."""

from __future__ import annotations

__all__ = [
    "Aborted",
    "AlreadyExists",
    "CoordinatorError",
    "FailedPrecondition",
    "Incompatible",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StreamCancelled",
    "Unauthenticated",
    "Unavailable",
]


class CoordinatorError(Exception):
    """A request the coordinator refuses; its state is unchanged."""


class Unauthenticated(CoordinatorError):
    pass


class PermissionDenied(CoordinatorError):
    pass


class FailedPrecondition(CoordinatorError):
    """Right request, wrong moment: another round, phase or version."""


class InvalidArgument(CoordinatorError):
    pass


class ResourceExhausted(CoordinatorError):
    pass


class AlreadyExists(CoordinatorError):
    pass


class Aborted(CoordinatorError):
    """Collides with a call still in flight (a resend racing the stream it replaces): try again shortly."""


class NotFound(CoordinatorError):
    pass


class StreamCancelled(CoordinatorError):
    """A stream ended before its last message: the caller went away, or it overran its deadline."""

    def __init__(self, message: str, *, overdue: bool) -> None:
        super().__init__(message)
        self.overdue = overdue


class Unavailable(CoordinatorError):
    """The coordinator cannot take this now through a fault of its own (its disk, its database): retry later.

    Never the caller's fault: nobody is excluded for it."""


class Incompatible(CoordinatorError):
    """The caller speaks a wire protocol this coordinator does not: one side must be upgraded first."""

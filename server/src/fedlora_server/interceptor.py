"""Authentication at the door: each call's credentials are checked from its metadata before any
handler runs and before any message of a stream is read. Handlers learn who called from `caller()`.

Bytes that do not decode as the method's request message are refused with INVALID_ARGUMENT (after
the credentials, like any other input); left to gRPC they would be answered INTERNAL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, cast

import grpc

from fedlora_server.auth import Authenticator
from fedlora_server.errors import CoordinatorError, InvalidArgument
from fedlora_server.status import abort_with

__all__ = ["AuthInterceptor", "caller"]

_CALLER: ContextVar[str] = ContextVar("fedlora_caller")
Behaviour = Callable[[Any, grpc.ServicerContext], Any]
Deserializer = Callable[[bytes], Any]


class _Undecodable:
    """Stands in for a request message whose bytes did not decode."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Deserializer | None) -> Deserializer | None:
    """Decode as `deserializer` does, but hand over an _Undecodable instead of raising."""
    if deserializer is None:
        return None
    decode = deserializer

    def tolerant(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception as exc:
            return _Undecodable(f"the request is not a valid message of this method ({type(exc).__name__})")

    return tolerant


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(request.reason)
    return request


def _decoded_stream(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        yield _decoded(request)


def caller() -> str:
    """The authenticated worker id of the call being handled (set by AuthInterceptor)."""
    return _CALLER.get()


class AuthInterceptor(grpc.ServerInterceptor):
    """Guards every method under `service_prefix`; others (gRPC health) stay open for probes."""

    def __init__(self, authenticator: Authenticator, *, service_prefix: str) -> None:
        self._authenticator = authenticator
        self._prefix = service_prefix

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        shape = (handler.request_streaming, handler.response_streaming)
        behaviour, make = {
            (False, False): (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
            (False, True): (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
            (True, False): (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
            (True, True): (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
        }[shape]
        if behaviour is None:
            return handler
        guard = self._guard_stream if handler.response_streaming else self._guard
        return make(
            guard(cast(Behaviour, behaviour), streaming=handler.request_streaming),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _identify(self, context: grpc.ServicerContext) -> str:
        metadata = dict(context.invocation_metadata())
        token = str(metadata.get("authorization", "")).removeprefix("Bearer ").strip() or None
        # grpc-stubs types these values as bytes; grpc hands over a list of bytes per property.
        names = [n.decode() for n in cast(list[bytes], context.auth_context().get("x509_common_name", []))]
        try:
            return self._authenticator.identify(token, names)
        except CoordinatorError as exc:
            abort_with(context, exc)

    def _checked(self, request: Any, context: grpc.ServicerContext, *, streaming: bool) -> Any:
        """The request (or request stream) to hand to the handler; an undecodable unary request ends the call."""
        if streaming:
            return _decoded_stream(request)
        try:
            return _decoded(request)
        except CoordinatorError as exc:
            abort_with(context, exc)

    def _guard(self, behaviour: Behaviour, *, streaming: bool) -> Behaviour:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            token = _CALLER.set(self._identify(context))
            try:
                return behaviour(self._checked(request, context, streaming=streaming), context)
            finally:
                _CALLER.reset(token)

        return guarded

    def _guard_stream(self, behaviour: Behaviour, *, streaming: bool) -> Behaviour:
        def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            token = _CALLER.set(self._identify(context))
            try:
                yield from behaviour(self._checked(request, context, streaming=streaming), context)
            finally:
                _CALLER.reset(token)

        return guarded

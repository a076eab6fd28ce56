"""The door: each call is classed, then refused or admitted, from its method and metadata alone, before
any byte of its request is read. Handlers learn who called from `caller()`.

A call to the coordinator's service needs a bearer token on the allow-list; without one it is refused
UNAUTHENTICATED at once. An admitted call takes a place in its class's budget (allowed workers, and each
worker; health checks, open to anyone) and runs on that class's threads; over budget it is refused
RESOURCE_EXHAUSTED. Refusals are answered on threads of their own, unread.

gRPC's sync server reads a unary request whole, in a server thread and with no deadline, before it calls
the behaviour: a request that never finishes arriving would hold that thread for good. So every method is
served here in request-streaming form (the wire is the same): the behaviour runs at once, and the one
request is read under the read deadline. With mutual TLS the certificate is checked then, before the
request is read (it needs the call's auth context, which the metadata does not carry).

Bytes that do not decode as the method's request message are refused with INVALID_ARGUMENT (after
the credentials, like any other input); left to gRPC they would be answered INTERNAL."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeAlias, cast

import grpc
import structlog

from fedlora_server.auth import Authenticator
from fedlora_server.errors import CoordinatorError, InvalidArgument, StreamCancelled, Unauthenticated
from fedlora_server.metrics import DoorMetrics
from fedlora_server.status import abort_with
from fedlora_server.streams import Lane, OverBudget, StreamGuard

__all__ = ["Door", "caller"]

log = structlog.get_logger()
_CALLER: ContextVar[str] = ContextVar("fedlora_caller")
Behaviour = Callable[..., Any]
Deserializer = Callable[[bytes], Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


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


def _token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    value = dict(metadata or ()).get("authorization", "")
    return str(value).removeprefix("Bearer ").strip() or None


def caller() -> str:
    """The authenticated worker id of the call being handled (set by the Door)."""
    return _CALLER.get()


class _OnThreads:
    """A behaviour as gRPC calls it: on the threads it names (gRPC reads `experimental_thread_pool`), with a
    callback to send responses through when it is non-blocking."""

    def __init__(self, run: Behaviour, threads: ThreadPoolExecutor, *, non_blocking: bool = False) -> None:
        self._run = run
        self.experimental_thread_pool = threads
        self.experimental_non_blocking = non_blocking

    def __call__(self, request: Any, context: grpc.ServicerContext, *respond: Any) -> Any:
        return self._run(request, context, *respond)


class Door(grpc.ServerInterceptor):
    """Guards every method under `service_prefix` with credentials and the workers' budgets; other methods
    (gRPC health) stay open for probes, within the health budget."""

    def __init__(
        self, authenticator: Authenticator, guard: StreamGuard, metrics: DoorMetrics, *, service_prefix: str
    ) -> None:
        self._authenticator = authenticator
        self._guard = guard
        self._metrics = metrics
        self._prefix = service_prefix

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        """Runs on gRPC's one polling thread for every call: it reads nothing and waits for nothing."""
        handler = continuation(details)
        if handler is None:
            return None  # gRPC answers UNIMPLEMENTED itself, on no thread
        if not details.method.startswith(self._prefix):
            return self._admitted(handler, self._guard.health, worker=None)
        try:
            worker = self._authenticator.owner(_token(details.invocation_metadata))
        except Unauthenticated as exc:
            return self._refused(exc, "unauthenticated")
        return self._admitted(handler, self._guard.workers, worker=worker)

    def _refused(self, error: CoordinatorError, reason: str) -> Handler:
        self._metrics.refused.labels(reason=reason).inc()

        def refuse(requests: Iterator[bytes], context: grpc.ServicerContext) -> None:
            abort_with(context, error)

        return grpc.stream_unary_rpc_method_handler(_OnThreads(refuse, self._guard.refusals))

    def _admitted(self, handler: Handler, lane: Lane, *, worker: str | None) -> Handler:
        try:
            slot = lane.budget.take(worker or "")
        except OverBudget as exc:
            return self._refused(exc, "worker_limit" if exc.per_caller else f"{lane.name}_busy")
        behaviour = cast(
            Behaviour,
            {
                (False, False): handler.unary_unary,
                (False, True): handler.unary_stream,
                (True, False): handler.stream_unary,
                (True, True): handler.stream_stream,
            }[(handler.request_streaming, handler.response_streaming)],
        )
        streaming = handler.request_streaming

        @contextmanager
        def entered(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            """The argument the behaviour takes, with the caller known; the slot is given back after."""
            context.add_callback(slot.release)  # should the call end before the behaviour does
            try:
                with self._acting(worker, context):
                    yield _decoded_stream(requests) if streaming else self._request(requests, context)
            finally:
                slot.release()

        def unary(requests: Iterator[Any], context: grpc.ServicerContext, *respond: Any) -> Any:
            with entered(requests, context) as argument:
                return behaviour(argument, context, *respond)

        def stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            with entered(requests, context) as argument:
                yield from behaviour(argument, context)

        serializers: dict[str, Any] = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if not handler.response_streaming:
            return grpc.stream_unary_rpc_method_handler(_OnThreads(unary, lane.threads), **serializers)
        if getattr(behaviour, "experimental_non_blocking", False):  # gRPC health's Watch: it holds no thread
            return grpc.stream_stream_rpc_method_handler(
                _OnThreads(unary, lane.threads, non_blocking=True), **serializers
            )
        return grpc.stream_stream_rpc_method_handler(_OnThreads(stream, lane.threads), **serializers)

    @contextmanager
    def _acting(self, worker: str | None, context: grpc.ServicerContext) -> Iterator[None]:
        """`caller()` is `worker` inside, once its certificate is checked (with mutual TLS); health checks have none."""
        if worker is None:
            yield
            return
        # grpc-stubs types these values as bytes; grpc hands over a list of bytes per property.
        names = [n.decode() for n in cast(list[bytes], context.auth_context().get("x509_common_name", []))]
        try:
            self._authenticator.check_certificate(worker, names)
        except CoordinatorError as exc:
            self._metrics.refused.labels(reason="certificate").inc()
            log.warning("certificate_refused", worker_id=worker, certificate_names=names, reason=str(exc))
            abort_with(context, exc)
        token = _CALLER.set(worker)
        try:
            yield
        finally:
            _CALLER.reset(token)

    def _request(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """The call's one request message, read under the read deadline; a late, missing or undecodable one ends the call."""
        with self._guard.reading(context, late=self._metrics.refused.labels(reason="read_deadline").inc) as watched:
            try:
                request = next(requests, None)
            except grpc.RpcError:
                reason = watched.expired or "the caller cancelled the call"
                abort_with(
                    context, StreamCancelled(f"the request did not arrive: {reason}", overdue=bool(watched.expired))
                )
        try:
            if request is None:
                raise InvalidArgument("the call ended without its request message")
            return _decoded(request)
        except CoordinatorError as exc:
            abort_with(context, exc)

"""The coordinator daemon: gRPC service, health, metrics endpoint and the deadline clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from fedlora_common.certificates import not_valid_after
from fedlora_common.proto.fedlora.v1 import coordinator_pb2_grpc as pb_grpc
from fedlora_server.auth import Authenticator
from fedlora_server.config import RunSettings, TlsServerSettings
from fedlora_server.control import RunControl
from fedlora_server.coordinator import Coordinator
from fedlora_server.interceptor import Door
from fedlora_server.metrics import DoorMetrics, ServerMetrics
from fedlora_server.report import build_report, write_reports
from fedlora_server.run_status import RunStatus, read_status
from fedlora_server.servicer import CoordinatorServicer
from fedlora_server.state_check import DATABASE, check_state_dir
from fedlora_server.store import CoordinatorStore, SqliteStore
from fedlora_server.streams import StreamGuard

__all__ = ["SERVICE_NAME", "CannotListen", "CoordinatorServer"]

SERVICE_NAME = "fedlora.v1.Coordinator"
log = structlog.get_logger()


def _server_credentials(settings: RunSettings) -> grpc.ServerCredentials | None:
    tls = settings.listen.tls
    if tls is None:
        return None
    root = tls.client_ca.read_bytes() if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )


class CannotListen(Exception):
    """The coordinator cannot serve on the address its settings name; the message is one line naming the setting."""


class CoordinatorServer:
    """One run's coordinator. `start()` binds (port 0 picks one) and returns; `shutdown()` is idempotent."""

    def __init__(
        self,
        *,
        settings: RunSettings,
        registry: CollectorRegistry | None = None,
        store: CoordinatorStore | None = None,
        tick: timedelta = timedelta(milliseconds=250),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        # NOT_SERVING from the first moment: grpc_health starts the whole server ("") at SERVING, and
        # nothing may say so before the state below is restored and start() has looked at it.
        self._health = health.HealthServicer()
        self._serving: bool | None = None
        self._set_serving(False)
        self.registry = registry or CollectorRegistry()
        self._metrics = ServerMetrics(self.registry)
        owned = store is None
        if store is None:  # the state on disk is judged before anything is written to it
            check_state_dir(settings)
            store = SqliteStore(settings.state_dir / DATABASE)
        self._store = store
        try:
            self.coordinator = Coordinator(settings=settings, store=store, metrics=self._metrics, clock=clock)
        except BaseException:
            if owned:
                store.close()
            raise
        self._tick = tick
        self._stopping = threading.Event()
        self._grpc: grpc.Server | None = None
        self._streams: StreamGuard | None = None
        self._metrics_http: Any = None
        self._ticker: threading.Thread | None = None
        self._reported = False
        self._report_paths: list[Path] = []
        self._report_lock = threading.Lock()
        self.port = 0
        self.metrics_port: int | None = None

    def start(self) -> int:
        s = self._settings
        authenticator = Authenticator(s.workers, require_client_cert=bool(s.listen.tls and s.listen.tls.client_ca))
        self._streams = StreamGuard(s.limits)
        door = Door(authenticator, self._streams, DoorMetrics(self.registry), service_prefix=f"/{SERVICE_NAME}/")
        self._control = RunControl(store=self._store, machine=self.coordinator, authenticator=authenticator, settings=s)
        self._grpc = grpc.server(
            # The door sends every call to the threads of its class (workers, health) or to those that answer
            # refusals; no global count of calls, which a flood of strangers could fill for everyone.
            self._streams.refusals,
            interceptors=[door],
            options=s.limits.grpc_options(),
        )
        servicer = CoordinatorServicer(
            coordinator=self.coordinator, chunk_bytes=s.limits.chunk_bytes, streams=self._streams
        )
        pb_grpc.add_CoordinatorServicer_to_server(servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        address = f"{s.listen.host}:{s.listen.port}"
        credentials = _server_credentials(s)
        try:
            if credentials is None:
                self.port = self._grpc.add_insecure_port(address)
            else:
                self.port = self._grpc.add_secure_port(address, credentials)
        except RuntimeError:  # gRPC's own words ask for GRPC_VERBOSITY=debug
            self.port = 0
        if self.port == 0:
            raise CannotListen(
                f"listen.port: cannot listen on {address}: another program holds it, or it is no address of this host"
            )
        if s.listen.plaintext_off_loopback:
            log.warning("plaintext_listener", host=s.listen.host, reason="listen.insecure is set; no TLS")
        self._grpc.start()
        if s.listen.metrics_port is not None:
            try:
                self._metrics_http, _ = start_http_server(s.listen.metrics_port, s.listen.host, registry=self.registry)
            except OSError as exc:
                self._grpc.stop(0)
                where = f"{s.listen.host}:{s.listen.metrics_port}"
                raise CannotListen(f"listen.metrics_port: cannot listen on {where}: {exc.strerror}") from None
            self.metrics_port = int(self._metrics_http.server_port)
        if s.listen.tls is not None:
            self._export_certificate_expiry(s.listen.tls)
        # The state was restored in the constructor: a run that had already failed never reports SERVING.
        self._set_serving(self.coordinator.failure is None)
        self._ticker = threading.Thread(target=self._run_clock, name="deadlines", daemon=True)
        self._ticker.start()
        log.info("coordinator_listening", port=self.port, metrics_port=self.metrics_port, run_id=s.run_id)
        return self.port

    def _export_certificate_expiry(self, tls: TlsServerSettings) -> None:
        for name, path in (("server", tls.cert), ("client_ca", tls.client_ca)):
            if path is not None:
                self._metrics.certificate_expiry.labels(certificate=name).set(not_valid_after(path))

    def _set_serving(self, serving: bool) -> None:
        """The health service tells whether the coordinator can make progress."""
        if serving == self._serving:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self._health.set(name, status)

    def _run_clock(self) -> None:
        while not self._stopping.wait(self._tick.total_seconds()):
            try:
                self._control.poll()
                self.coordinator.tick()
            except Exception:
                log.exception("deadline_tick_failed")
                self._set_serving(False)
            else:
                self._set_serving(self.coordinator.failure is None)
            if self.coordinator.finished.is_set() and not self._reported:
                self.write_report()

    def write_report(self) -> list[Path]:
        """Write report.json/md/html; once the run finished they cannot change, so they are written once."""
        with self._report_lock:  # the deadline clock and the program's main thread may both ask
            if self._reported and self.coordinator.finished.is_set():
                return self._report_paths
            self._report_paths = write_reports(
                build_report(self.coordinator.settings, self._store), self._settings.state_dir
            )
            self._reported = self.coordinator.finished.is_set()
            log.info("report_written", path=str(self._report_paths[0]))
            return self._report_paths

    def status(self) -> RunStatus:
        """Where the run stands, as `fedlora-server status` reads it from the state."""
        found = read_status(self._store, rounds=self.coordinator.settings.rounds)
        assert found is not None, "a coordinator's store holds its run from the constructor on"
        return found

    def wait_finished(self, timeout: timedelta | None = None) -> bool:
        return self.coordinator.finished.wait(None if timeout is None else timeout.total_seconds())

    def shutdown(self, grace: timedelta = timedelta(seconds=2)) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            self._grpc.stop(grace.total_seconds()).wait()
        if self._streams is not None:
            self._streams.shutdown()
        if self._ticker is not None:
            self._ticker.join()
        if self.coordinator.finished.is_set() and not self._reported:  # finished between two ticks
            self.write_report()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        self._store.close()

    def __enter__(self) -> CoordinatorServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()

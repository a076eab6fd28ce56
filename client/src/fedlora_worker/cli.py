"""`fedlora-worker --config worker.yaml`: take part in a federation until it finishes."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import grpc
import structlog
import torch
from prometheus_client import CollectorRegistry, start_http_server

from fedlora_common.logs import configure_logging
from fedlora_common.secagg import identity_keypair
from fedlora_common.settings import ConfigError, load_settings
from fedlora_worker.config import WorkerSettings
from fedlora_worker.daemon import Worker, WorkerFailed
from fedlora_worker.metrics import WorkerMetrics
from fedlora_worker.transport import CoordinatorClient

__all__ = ["main"]

USAGE = (
    "usage: fedlora-worker --config worker.yaml [--field value ...] (FEDLORA_* variables override the file)\n"
    "       fedlora-worker keygen --out FILE   (writes an Ed25519 identity key, prints its public half)"
)


def keygen(argv: Sequence[str]) -> int:
    """Write a new long-term identity key (hex, mode 0600) and print the public key for the allow-list."""
    if len(argv) != 2 or argv[0] != "--out":
        sys.stderr.write("fedlora-worker keygen: usage: fedlora-worker keygen --out FILE\n")
        return 2
    path = Path(argv[1])
    if path.exists():
        sys.stderr.write(f"fedlora-worker keygen: {path} exists; refusing to overwrite an identity key\n")
        return 2
    keys = identity_keypair()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as f:
        f.write(keys.private.hex() + "\n")
    sys.stdout.write(keys.public.hex() + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE + "\n")
        return 0
    if args and args[0] == "keygen":
        return keygen(args[1:])
    try:
        settings = load_settings(WorkerSettings, args)
        token = settings.bearer_token()
    except ConfigError as exc:
        sys.stderr.write(f"fedlora-worker: config error: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"fedlora-worker: config error: token_file: {exc.strerror}\n")
        return 2
    configure_logging(json=True)
    structlog.contextvars.bind_contextvars(worker_id=settings.worker_id, component="worker")
    log = structlog.get_logger()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    if settings.metrics_port is not None:
        http, _ = start_http_server(settings.metrics_port, registry=registry)
        log.info("metrics_listening", port=http.server_port)
    client = CoordinatorClient(
        target=settings.coordinator,
        worker_id=settings.worker_id,
        token=token,
        retry=settings.retry,
        tls=settings.tls,
        on_retry=metrics.retries.inc,
    )
    try:
        worker = Worker(settings=settings, client=client, metrics=metrics)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"fedlora-worker: data: {exc}\n")
        return 2

    def on_signal(signum: int, frame: FrameType | None) -> None:
        worker.shutdown()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with worker:
        try:
            outcome = worker.run()
        except WorkerFailed as exc:
            sys.stderr.write(f"fedlora-worker: cannot go on: {exc}\n")
            return 1
        except grpc.RpcError as exc:
            log.error("coordinator_refused", code=exc.code().name, details=exc.details())
            sys.stderr.write(f"fedlora-worker: the coordinator refused: {exc.code().name}: {exc.details()}\n")
            return 1
    return 0 if outcome.finished else 1

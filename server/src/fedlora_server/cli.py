"""`fedlora-server --config run.yaml [--rounds N ...]`: run one federation to its end."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta
from types import FrameType

import structlog

from fedlora_common.logs import configure_logging
from fedlora_common.settings import ConfigError, load_settings
from fedlora_server.config import RunSettings
from fedlora_server.server import CoordinatorServer
from fedlora_server.store import StateError

__all__ = ["main"]

USAGE = "usage: fedlora-server --config run.yaml [--field value ...] (FEDLORA_* variables override the file)"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE + "\n")
        return 0
    try:
        settings = load_settings(RunSettings, args)
    except ConfigError as exc:
        sys.stderr.write(f"fedlora-server: config error: {exc}\n")
        return 2
    configure_logging(json=True)
    structlog.contextvars.bind_contextvars(run_id=settings.run_id, component="coordinator")
    try:
        server = CoordinatorServer(settings=settings)
    except StateError as exc:
        sys.stderr.write(f"fedlora-server: state error: {exc}\n")
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
        sys.stdout.write(
            json.dumps({"event": "listening", "port": server.port, "metrics_port": server.metrics_port}) + "\n"
        )
        sys.stdout.flush()
        while not stop.is_set() and not server.wait_finished(timedelta(seconds=0.5)):
            pass
        if stop.is_set():
            structlog.get_logger().info("coordinator_stopping", reason="signal")
            return 0
        server.write_report()
        # Let every worker poll once more and see FINISHED before the endpoint goes away.
        stop.wait(2 * settings.timeouts.poll_wait_ms / 1000 + 1)
        if server.coordinator.failure is not None:
            sys.stderr.write(f"fedlora-server: the run failed: {server.coordinator.failure}\n")
            return 1
    except OSError as exc:
        sys.stderr.write(f"fedlora-server: {exc}\n")
        return 1
    finally:
        server.shutdown()
    return 0

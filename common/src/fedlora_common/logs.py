"""structlog set up for JSON lines (services) or readable console output (a terminal)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import TextIO, cast

import structlog

__all__ = ["configure_logging", "quiet_grpc_core"]


def quiet_grpc_core(environ: MutableMapping[str, str] = os.environ) -> None:
    """gRPC's C core writes plain-text lines of its own (E1205 12:00:00 ...) to stderr, which breaks a stream of
    JSON logs; keep it silent unless the operator asked for its output (GRPC_VERBOSITY). gRPC reads this once,
    when first imported: call it at program start. What matters of a gRPC failure reaches the program anyway,
    in the status and details of the call that failed."""
    environ.setdefault("GRPC_VERBOSITY", "NONE")


class _StdlibBridge(logging.StreamHandler):  # type: ignore[type-arg]
    """Renders what libraries log through the standard logging module (transformers, bitsandbytes, warnings) the
    way structlog renders the program's own events, so a log stream holds one format."""


class _CurrentStderr:
    """Whatever sys.stderr is at the moment of writing (it may be replaced after configuration)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(*, json: bool = True, level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog once per process, at program start (never at import)."""
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    target = stream or cast(TextIO, _CurrentStderr())
    number = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(file=target),
        cache_logger_on_first_use=False,
    )
    bridge = _StdlibBridge(target)
    bridge.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *processors],
        )
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdlibBridge)]:
        root.removeHandler(handler)
    root.addHandler(bridge)
    root.setLevel(number)
    logging.captureWarnings(True)

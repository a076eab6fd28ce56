"""One log format per stream: the program's events and what libraries log through `logging` alike."""

from __future__ import annotations

import io
import json
import logging
import warnings

import pytest
import structlog

from fedlora_common.logs import configure_logging, quiet_grpc_core


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()  # the autouse fixture in tests/conftest.py undoes the configuration afterwards


def test_library_log_records_and_warnings_come_out_as_json_lines_beside_the_programs_events(
    stream: io.StringIO,
) -> None:
    # Prepare
    configure_logging(json=True, level="info", stream=stream)

    # Execute: an event of the program, a library's warning through logging, a Python warning, and a debug
    # record below the level.
    structlog.get_logger().info("joined", worker_id="clinical")
    logging.getLogger("bitsandbytes.cextension").warning("Failed to load %s kernel", "gemm_4bit")
    warnings.warn("a deprecated argument", UserWarning, stacklevel=1)
    logging.getLogger("transformers").debug("noise")

    # Assert: three JSON objects, one per line, each with its level and a timestamp.
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["event"], r["level"]) for r in records][:2] == [
        ("joined", "info"),
        ("Failed to load gemm_4bit kernel", "warning"),
    ]
    assert records[1]["logger"] == "bitsandbytes.cextension"
    assert "a deprecated argument" in records[2]["event"]
    assert len(records) == 3
    assert all("timestamp" in r for r in records)


def test_grpc_core_is_silenced_unless_the_operator_asked_for_its_output() -> None:
    quiet: dict[str, str] = {}
    asked = {"GRPC_VERBOSITY": "debug"}

    quiet_grpc_core(quiet)
    quiet_grpc_core(asked)

    assert quiet == {"GRPC_VERBOSITY": "NONE"}
    assert asked == {"GRPC_VERBOSITY": "debug"}

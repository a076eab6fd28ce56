from collections.abc import Iterator

import pytest
import structlog

pytest_plugins = ["tests.lab_fixtures"]


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Each test starts from structlog's defaults: a CLI run in-process configures logging for the process
    (a level filter, stderr), which would otherwise hide later tests' events from `capture_logs`."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()

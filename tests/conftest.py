import logging
import os
from collections.abc import Generator, Iterator

import pytest
import structlog
from hypothesis import is_hypothesis_test, settings

from fedlora_common.logs import _StdlibBridge
from tests.seeds import VARIABLE, replay_hint, session_seed

pytest_plugins = ["tests.lab_fixtures"]

HYPOTHESIS_PROFILE = "fedlora"
"""Every @given's settings unless --hypothesis-profile names another: no example database (a failure
replays from the run's seed, not from files left by earlier runs), no per-example deadline (a wall-clock
assertion, which a loaded machine fails), and @reproduce_failure printed under every failure."""
SEED = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)  # before hypothesis' own plugin reads --hypothesis-seed
def pytest_configure(config: pytest.Config) -> None:
    settings.register_profile(HYPOTHESIS_PROFILE, database=None, deadline=None, print_blob=True)
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile(HYPOTHESIS_PROFILE)
    try:
        seed = session_seed(os.environ, config.getoption("hypothesis_seed", None))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.option.hypothesis_seed = str(seed)  # every @given of the run draws from it
    config.stash[SEED] = seed


def pytest_report_header(config: pytest.Config) -> str:
    return f"{VARIABLE}={config.stash[SEED]} (generated cases; {replay_hint(config.stash[SEED])} ...)"


@pytest.fixture
def fuzz_seed(request: pytest.FixtureRequest) -> int:
    """The run's seed, for tests that run their own searches (see tests/seeds.py)."""
    return request.config.stash[SEED]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under every failing test that generates cases: the seed that generated them, and how to replay it."""
    report = yield
    generates = is_hypothesis_test(getattr(item, "obj", None)) or "fuzz_seed" in getattr(item, "fixturenames", ())
    if report.failed and generates:
        report.sections.append(("generated cases", replay_hint(item.config.stash[SEED], item.nodeid)))
    return report


def _logging_defaults() -> None:
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdlibBridge)]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(False)


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Each test starts from the logging defaults: a CLI run in-process configures logging for the process
    (a level filter, stderr, the standard library's records bridged into it), which would otherwise hide later
    tests' events from `capture_logs` or render them into a stream that is gone."""
    _logging_defaults()
    yield
    _logging_defaults()
